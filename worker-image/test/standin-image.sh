#!/usr/bin/env bash
# Builds (once) the local stand-in for the worker AMI's OS that the tests run
# worker-image/provision.sh in: a minimal Debian rootfs made with debootstrap
# (systemd for `systemctl enable` / `systemd-analyze verify`, iptables,
# iproute2), imported into the Docker engine. No registry is involved: the
# rootfs comes from the same Debian mirror apt uses on this machine, and the
# tarball is cached under ${PACLOUD_CACHE:-~/.cache/pacloud} so later runs
# only `docker import` it (or reuse the image the engine already has).
# Prints the image reference on its last line.
set -euo pipefail

suite=bookworm
packages=systemd,iptables,iproute2,ca-certificates
# The tag changes when the recipe does, so a stale image is never reused.
recipe_hash=$(printf '%s\n' "$suite" "$packages" "v1" | sha256sum | cut -c1-12)
image="pacloud-worker-standin:${suite}-${recipe_hash}"

if docker image inspect "$image" >/dev/null 2>&1; then
  printf '%s\n' "$image"
  exit 0
fi

cache="${PACLOUD_CACHE:-${HOME:-/root}/.cache/pacloud}"
tarball="$cache/standin-${suite}-${recipe_hash}.tar"
mkdir -p "$cache"
if [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  # The mirror apt already uses here (deb822 or one-line sources).
  mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1 || true)
  if [ -z "$mirror" ]; then
    mirror=$(awk '$1 == "deb" && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
  fi
  [ -n "$mirror" ] || { echo "standin-image.sh: no Debian mirror found in apt's sources" >&2; exit 1; }
  root=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  echo "standin-image.sh: debootstrap $suite ($packages) into $root" >&2
  debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >&2
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" --numeric-owner -cf "$tarball.part" .
  mv "$tarball.part" "$tarball"
fi
docker import "$tarball" "$image" >&2
printf '%s\n' "$image"
