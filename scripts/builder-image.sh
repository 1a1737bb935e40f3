#!/usr/bin/env bash
# Builds the STAND-IN builder image locally (no registry needed) and prints
# the image reference it built as its LAST line: the content-addressed image
# ID `sha256:<64 hex>`, which `docker run` accepts and which pins the image
# the way a registry digest would (settings: build.image).
#
# Recipe: worker-image/builder/standin/ (Dockerfile, packages.txt, profile/)
# and worker-image/builder/make.conf, plus the build-root preparation of the
# small real Gentoo tree (../shared/gentoo-subset, or $PACLOUD_GENTOO_SUBSET):
# its host-config/package.provided.host, host-config/inject-vdb.py and
# host-tools/ are copied into the build CONTEXT (never into the repository)
# and baked into the image (standin/Dockerfile says how); the recipe hash
# covers their contents, so a changed subset makes a new image (a relative
# $PACLOUD_GENTOO_SUBSET is taken from the repository's root).
# A Debian root of this machine's release
# is made with debootstrap from the Debian mirror apt already uses here (read
# from /etc/apt/sources.list*), then `docker build` adds portage from PyPI
# (downloaded here by the host's pip, hash-checked, installed offline in the
# image: the build's containers need no network trust setup of their own).
# Cached: the image carries a label with the hash of its recipe, and an image
# with that label is reused unless --force is given.
#
# Needs root (debootstrap) and a Docker engine. Production uses the Gentoo
# stage3 image of worker-image/builder/Dockerfile instead (see its README).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== builder-image: %s\n' "$*" >&2; }
die() { printf 'builder-image.sh: %s\n' "$*" >&2; exit 2; }
# Never a silent exit: name the command that failed.
trap 'printf "builder-image.sh: line %s: a command failed (status %s)\n" "$LINENO" "$?" >&2' ERR

force=0
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  *) die "usage: scripts/builder-image.sh [--force]" ;;
esac

recipe=worker-image/builder
label=org.pacloud.builder.recipe
. /etc/os-release
suite=${VERSION_CODENAME:?/etc/os-release has no VERSION_CODENAME}

command -v docker >/dev/null 2>&1 || die "the docker CLI is not installed"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 || die "no Docker engine answers \`docker version\`"

# The subset's build-root inputs (paths relative to the subset's directory).
subset=${PACLOUD_GENTOO_SUBSET:-../shared/gentoo-subset}
[ -d "$subset/host-tools" ] && [ -f "$subset/host-config/package.provided.host" ] \
  || die "the Gentoo subset is not at $subset (host-tools/, host-config/package.provided.host); set PACLOUD_GENTOO_SUBSET"
mapfile -t subset_files < <(cd "$subset" && { printf '%s\n' host-config/package.provided.host host-config/inject-vdb.py; find host-tools -type f -o -type l; } | LC_ALL=C sort)

# The recipe's hash: every file that goes into the image, and the suite.
mapfile -t files < <(printf '%s\n' scripts/builder-image.sh "$recipe/make.conf"; find "$recipe/standin" -type f | LC_ALL=C sort)
hash=$({
  echo "suite=$suite"
  for f in "${files[@]}"; do echo "== $f"; cat "$f"; done
  for f in "${subset_files[@]}"; do
    if [ -L "$subset/$f" ]; then echo "== subset/$f -> $(readlink "$subset/$f")"; else echo "== subset/$f"; cat "$subset/$f"; fi
  done
} | sha256sum | cut -c1-64)
tag="pacloud-builder-standin:${hash:0:12}"

# Both labels: images built FROM the stand-in (the production Dockerfile's
# check) inherit the recipe label but set org.pacloud.builder to their own.
existing=$(docker image ls -q --no-trunc --filter "label=$label=$hash" --filter "label=org.pacloud.builder=standin" | sed -n 1p)
if [ -n "$existing" ] && [ "$force" = 0 ]; then
  log "up to date ($tag)"
  echo "$existing"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "building the image needs root (debootstrap); run it as root"
if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

# The Debian mirror apt uses here: the first source (one-line or deb822
# format) that serves "$suite" itself (not -security or -updates).
mirror=$(
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] && cat "$f" && echo
  done | awk -v suite="$suite" '
    # Reads all of its input (no early exit: with pipefail, a writer killed
    # by SIGPIPE would fail the whole assignment, silently, under set -e).
    function found(u) { if (pick == "") pick = u }
    /^[[:space:]]*#/ { next }
    /^deb[[:space:]]/ {
      n = split($0, w, /[[:space:]]+/); i = 2
      if (w[i] ~ /^\[/) { while (i <= n && w[i] !~ /\]$/) i++; i++ }
      if (w[i + 1] == suite) found(w[i])
      next
    }
    /^[[:space:]]*$/ { if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ")) found(uri); types = uris = suites = ""; next }
    /^Types:/ { sub(/^Types:[[:space:]]*/, ""); types = $0 }
    /^URIs:/ { sub(/^URIs:[[:space:]]*/, ""); split($0, u, /[[:space:]]+/); uri = u[1] }
    /^Suites:/ { sub(/^Suites:[[:space:]]*/, ""); suites = $0 }
    END { if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ")) found(uri); if (pick != "") print pick }'
)
[ -n "$mirror" ] || die "no Debian source for suite $suite in /etc/apt/sources.list*"

include=$(grep -v '^[[:space:]]*#' "$recipe/standin/packages.txt" | tr -d ' ' | grep . | paste -sd,)
ctx=$(mktemp -d /var/tmp/pacloud-builder.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
started=$(date +%s)
log "debootstrap $suite (minbase + packages.txt) into $ctx/rootfs"
debootstrap --variant=minbase --include="$include" "$suite" "$ctx/rootfs" "$mirror" >"$ctx/debootstrap.log" 2>&1 \
  || { tail -n 30 "$ctx/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
rm -rf "$ctx"/rootfs/var/cache/apt/archives/*.deb "$ctx"/rootfs/var/lib/apt/lists/*
tar --numeric-owner --xattrs -C "$ctx/rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf "$ctx/rootfs.tar" .
rm -rf "$ctx/rootfs"
log "downloading portage (standin/requirements.txt, hash-checked)"
python3 -m venv "$ctx/pip-venv"
"$ctx/pip-venv/bin/pip" download --disable-pip-version-check -q --no-deps --only-binary=:all: --require-hashes \
  -r "$recipe/standin/requirements.txt" -d "$ctx/wheels" >&2
rm -rf "$ctx/pip-venv"
cp "$recipe/standin/Dockerfile" "$recipe/standin/requirements.txt" "$recipe/make.conf" "$ctx/"
cp -r "$recipe/standin/profile" "$ctx/profile"
mkdir "$ctx/subset"
(cd "$subset" && cp -a --parents "${subset_files[@]}" "$ctx/subset/")
log "docker build ($tag)"
docker build --quiet --force-rm --label "$label=$hash" --tag "$tag" --iidfile "$ctx/iid" "$ctx" >&2
id=$(cat "$ctx/iid")
log "built $tag in $(($(date +%s) - started)) s"
echo "$id"
