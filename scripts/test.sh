#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need
# (Debian packages, a Python venv with pinned portage and validators), then
# checks formatting and lints and runs every test. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*" >&2; }

# Debian packages the tests use: bubblewrap (build sandbox), zstd and tar
# (GPKG packages), python3-venv (the test venv).
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3 python3-venv)
# The worker image's tests: shellcheck, network namespaces with iptables and
# ping (the IMDS guard), debootstrap (the stand-in container's rootfs).
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
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
# checkov in its own venv: its dependency pins conflict with the test venv's.
if [ ! -x .venv-checkov/bin/checkov ] || ! .venv-checkov/bin/checkov --version 2>/dev/null | grep -qx "$(sed -n 's/^checkov==//p' tests/requirements-checkov.txt)"; then
  log "installing tests/requirements-checkov.txt into .venv-checkov"
  [ -x .venv-checkov/bin/python ] || /usr/bin/python3 -m venv .venv-checkov
  .venv-checkov/bin/python -m pip install --disable-pip-version-check -q -r tests/requirements-checkov.txt
fi

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
  log "docker engine answers: provisioning the worker image in its stand-in container"
  cargo test --locked -p pacloud --test worker_image -- --ignored 2>&1 | tee -a "$out"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  set -e
else
  log "docker sandbox integration test and worker image container test NOT RUN: no Docker engine answers on this machine (they stay ignored, not passed)"
fi
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
     END { printf "\ntotal: %d passed, %d failed, %d skipped\n", p, f, g }' "$out"
exit "$status"
