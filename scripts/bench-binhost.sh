#!/usr/bin/env bash
# Prints the binhost serving figures (docs/benchmarks.md): pacloud serve and
# Debian's nginx side by side on the same files in one run: index req/s,
# 10 KB package req/s, 500 MB package throughput, and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
if ((${#need[@]})); then
  [ "$(id -u)" = 0 ] || { echo "install ${need[*]} (Debian packages) first" >&2; exit 2; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  # The Debian package may start a system nginx; the benchmark runs its own.
  command -v systemctl >/dev/null && systemctl disable --now nginx >/dev/null 2>&1 || true
fi
export PATH="$PATH:/usr/sbin"
cargo build --release --locked -p pacloud -p pacloud-bench
exec target/release/bench-binhost --pacloud target/release/pacloud "$@"
