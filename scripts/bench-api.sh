#!/usr/bin/env bash
# Prints the request path's figures (docs/benchmarks.md): cache-hit handler
# time in-process, local server cache-hit throughput and p50/p99 at
# concurrency 64, and the 1,000-request dedup storm.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { [ "$(id -u)" = 0 ] && { apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }; }; }
cargo build --release --locked -p pacloud -p pacloud-bench
exec target/release/bench-api --pacloud target/release/pacloud "$@"
