#!/usr/bin/env bash
# Prints key version 2's figures (docs/benchmarks.md, "Key version 2"): the
# gentoo subset's tree index by real portage (size, time), a full-tree-sized
# index (size, parse, cold load), and the cache-hit handler with the tree
# check next to the version 1 anchor. Needs .venv (scripts/test.sh makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p pacloud-bench --bin bench-usekey
exec target/release/bench-usekey --venv .venv --subset ../shared/gentoo-subset "$@"
