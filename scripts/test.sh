#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need
# (Debian packages, a Python venv with pinned portage and validators), then
# checks formatting and lints and runs every test. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*" >&2; }

# Debian packages the tests use: bubblewrap (build sandbox), zstd and tar
# (GPKG packages), python3-venv (the test venv and the first-run venv), gnupg
# (portage verifies signed binary packages with gpg).
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
# wget: portage's default FETCHCOMMAND (the fetch step's source downloads).
command -v wget >/dev/null 2>&1 || need+=(wget)
command -v gpg >/dev/null 2>&1 || need+=(gnupg)
# The real Gentoo packages of ../shared/gentoo-subset build with Debian's
# toolchain, build tools and -dev libraries (its README, step 5; the build
# root's package.provided lists them; DEPEND comes from the host, SYSROOT=/).
for p in build-essential autoconf automake libtool autotools-dev cmake ninja-build help2man bison texinfo \
  libncurses-dev libpcre2-dev libgmp-dev zlib1g-dev libbz2-dev liblzma-dev pkgconf pax-utils gawk \
  liblzo2-dev libattr1-dev libacl1-dev gettext; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
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

# The docker sandbox tests run on a real engine with the stand-in builder
# image (docs/sandboxes.md). Make an engine answer (start it if it is
# installed but down); in CI a missing engine FAILS the run, it is never
# skipped. Elsewhere the docker tests then fail on their own, naming it.
engine_answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
if ! command -v docker >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  log "installing docker.io (the docker sandbox tests need an engine)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null || true
fi
if command -v docker >/dev/null 2>&1 && ! engine_answers && [ "$(id -u)" = 0 ]; then
  log "no Docker engine answers: starting it"
  service docker start >/dev/null 2>&1 || true
  for _ in $(seq 30); do engine_answers && break; sleep 1; done
  if ! engine_answers && command -v dockerd >/dev/null 2>&1; then
    (dockerd >/var/log/pacloud-test-dockerd.log 2>&1 &)
    for _ in $(seq 60); do engine_answers && break; sleep 1; done
  fi
fi
if engine_answers; then
  log "docker engine $(docker version --format '{{.Server.Version}}'); building (or reusing) the stand-in builder image"
  PACLOUD_BUILDER_IMAGE=$(scripts/builder-image.sh | tail -n1)
  export PACLOUD_BUILDER_IMAGE
  log "builder image $PACLOUD_BUILDER_IMAGE"
elif [ "${CI:-}" = true ]; then
  log "FAIL: no Docker engine answers and none could be started; the docker sandbox tests cannot run"
  exit 1
else
  log "WARNING: no Docker engine answers; the docker sandbox tests will fail"
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo test"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$out"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
     END { printf "\ntotal: %d passed, %d failed, %d skipped\n", p, f, g }' "$out"
exit "$status"
