#!/usr/bin/env bash
# Prints the Lambda function's figures (docs/benchmarks.md): init time
# (process start -> first /runtime/invocation/next at a fake Runtime API,
# median over cold starts of the release binary), warm invoke latency
# against moto (p50/p99), and the size of the release deployment zip built
# by cargo-lambda (PyPI, installed into a throwaway venv; arm64 when the
# aarch64 standard library can be had, otherwise x86_64, said in the output).
# Extra arguments go to bench-lambda (--cold-starts N, --invokes N).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-lambda >/dev/null; then
  venv="$(mktemp -d)/cargo-lambda-venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q cargo-lambda
  export PATH="$venv/bin:$PATH"
fi

arch=arm64
if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
  rustup target add aarch64-unknown-linux-gnu >/dev/null 2>&1 || arch=x86_64
fi
# The workspace's release profile keeps line tables (debug =
# "line-tables-only"); the deployed binary does not need them, so the zip is
# built stripped (13.8 MB -> 4.3 MB for arm64). Only the cross target's
# build sees this setting, so host release builds are not invalidated.
export CARGO_PROFILE_RELEASE_STRIP=symbols
if [ "$arch" = arm64 ]; then
  # The path infra/template.yaml's CodeUri points at.
  cargo lambda build --release --arm64 --output-format zip -p pacloud-lambda
  zip=target/lambda/pacloud-lambda/bootstrap.zip
else
  echo "aarch64 standard library unavailable: building the x86_64 zip instead" >&2
  cargo lambda build --release --x86-64 --output-format zip -p pacloud-lambda --lambda-dir target/lambda-x86_64
  zip=target/lambda-x86_64/pacloud-lambda/bootstrap.zip
fi
unset CARGO_PROFILE_RELEASE_STRIP
echo "zip: CARGO_PROFILE_RELEASE_STRIP=symbols cargo lambda build --release --${arch/x86_64/x86-64} --output-format zip -p pacloud-lambda" >&2

cargo build --release --locked -p pacloud-lambda --features bench --bins
exec target/release/bench-lambda --bin target/release/pacloud-lambda --zip "$zip" --zip-arch "$arch" "$@"
