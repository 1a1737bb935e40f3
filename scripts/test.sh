#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need
# (Debian packages, a Python venv with pinned portage and validators), then
# checks formatting and lints and runs every test. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*" >&2; }

# Debian packages the tests use: bubblewrap (build sandbox), zstd and tar
# (GPKG packages), python3-venv (the test venv), gnupg (portage verifies
# signed binary packages with gpg).
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v gpg >/dev/null 2>&1 || need+=(gnupg)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3 python3-venv)
if ((${#need[@]})); then
  log "installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The test venv: pinned versions from tests/requirements.txt. Made from
# Debian's python3 so that builds can run as nobody (a python under a
# private home directory is not reachable from uid 65534).
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  /usr/bin/python3 -m venv .venv
fi
log "installing tests/requirements.txt into .venv"
.venv/bin/python -m pip install --disable-pip-version-check -q -r tests/requirements.txt

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo test"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
cargo test --workspace --locked 2>&1 | tee "$out"
status=${PIPESTATUS[0]}
set -e
# The docker backend's engine test runs only where an engine answers; it is
# reported as not run (never as passed) otherwise.
if command -v docker >/dev/null 2>&1 && docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  log "docker engine answers: running the docker sandbox integration test"
  set +e
  cargo test --locked -p pacloud-worker -- --ignored docker 2>&1 | tee -a "$out"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  set -e
else
  log "docker sandbox integration test NOT RUN: no Docker engine answers on this machine (it stays ignored, not passed)"
fi
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
     END { printf "\ntotal: %d passed, %d failed, %d skipped\n", p, f, g }' "$out"
exit "$status"
