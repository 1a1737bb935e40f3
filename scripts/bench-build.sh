#!/usr/bin/env bash
# Prints the build path's figures (docs/benchmarks.md): worker overhead per
# build, enqueue -> emerge-start latency, and the 5-package chain built by the
# service versus from source every time. Needs the test venv (scripts/test.sh
# creates it) and bubblewrap.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/emerge ] || { /usr/bin/python3 -m venv .venv && .venv/bin/python -m pip install -q -r tests/requirements.txt; }
cargo build --release --locked -p pacloud-bench --bin bench-build
exec target/release/bench-build "$@"
