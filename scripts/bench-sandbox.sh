#!/usr/bin/env bash
# Prints the per-build startup overhead of the docker sandbox backend against
# bubblewrap, side by side in one run (docs/benchmarks.md, docs/sandboxes.md):
# a no-op build and a tiny fixture emerge in each. Builds (or reuses) the
# stand-in builder image and needs the test venv (scripts/test.sh creates
# it), bubblewrap and a Docker engine. Extra arguments go to bench-sandbox
# (--repeat N).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/emerge ] || { /usr/bin/python3 -m venv .venv && .venv/bin/python -m pip install -q -r tests/requirements.txt; }
image=$(scripts/builder-image.sh | tail -n1)
cargo build --release --locked -p pacloud-bench --bin bench-sandbox
exec target/release/bench-sandbox --image "$image" "$@"
