#!/usr/bin/env bash
# Makes the worker AMI's release bundle, the one object the Image Builder
# component downloads (s3://<ReleaseBucket>/<key>, see docs/fleet.md):
#
#   bundle.sh PACLOUD_BINARY BUILDER_IMAGE_REF OUT.tar.gz [TARGETS_TOML]
#
# PACLOUD_BINARY is the release `pacloud` for the AMI's architecture;
# BUILDER_IMAGE_REF is the last line printed by scripts/builder-image.sh
# (name@sha256:<digest> or a local image ID sha256:<64 hex>), saved with
# `docker save` and gzip and recorded by its image ID (the config digest,
# which survives `docker save`/`docker load`; a repository digest does not on
# a classic-store engine); TARGETS_TOML,
# if given, holds the deployment's [targets] (the same the Lambda gets in
# PACLOUD_TARGETS). The bundle carries worker-image/ itself, so the AMI is
# provisioned by exactly the scripts and units that were tested.
set -euo pipefail

die() { printf 'bundle.sh: %s\n' "$*" >&2; exit 2; }
{ [ $# -ge 3 ] && [ $# -le 4 ]; } || die "usage: bundle.sh PACLOUD_BINARY BUILDER_IMAGE_REF OUT.tar.gz [TARGETS_TOML]"
binary=$1 ref=$2 out=$3 targets=${4:-}
[ -x "$binary" ] || die "'$binary' is not an executable file"
[[ "$ref" =~ ^([a-z0-9][a-z0-9._/:-]*@)?sha256:[0-9a-f]{64}$ ]] || die "'$ref' is not name@sha256:<64 hex> or sha256:<64 hex>"
[ -z "$targets" ] || [ -f "$targets" ] || die "'$targets' does not exist"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/worker-image"
cp "$here"/provision.sh "$here"/imds-guard.sh "$here"/*.service "$work/worker-image/"
install -m 0755 "$binary" "$work/pacloud"
id=$(docker image inspect --format '{{.Id}}' "$ref") || die "'$ref' is not in the local Docker engine"
printf '%s\n' "$id" >"$work/builder-image.ref"
docker save "$ref" | gzip -1 >"$work/builder-image.tar.gz"
[ -z "$targets" ] || cp "$targets" "$work/targets.toml"
tar -C "$work" -czf "$out" .
echo "$out"
