#!/usr/bin/env bash
# Provisions the pacloud worker AMI (Amazon Linux 2023). The EC2 Image
# Builder component of infra/template.yaml downloads the release bundle
# (worker-image/bundle.sh makes it), unpacks it and runs
#
#   provision.sh --bundle DIR all
#
# Steps (each idempotent; `all` runs them in this order):
#   packages  dnf: docker, ec2-hibinit-agent (hibernation), iptables-nft
#   binary    DIR/pacloud -> /usr/local/bin/pacloud
#   guard     the IMDS guard (DOCKER-USER DROP of 169.254.169.254 for
#             container interfaces) and its oneshot unit, re-applied at
#             every boot after docker.service
#   unit      pacloud-worker.service + /etc/pacloud/pacloud.toml
#   image     `docker load` of DIR/builder-image.tar.gz, the reference in
#             DIR/builder-image.ref must resolve; written into pacloud.toml
#   enable    systemctl enable docker, hibinit-agent, guard, worker
#
# Options: --bundle DIR (required by binary/image), --root DIR (install
# under DIR, offline, for tests; `--root /` installs into / without touching
# the running system: `packages` refuses it, `image` then needs a Docker
# engine that already answers, and `enable` enables only pacloud's units). Runs as root. The tests (crates/pacloud/tests/worker_image.rs) run the
# steps binary, guard, unit and enable in a container and apply the guard's
# rule in a network namespace; `packages` and `image` need AL2023 and a
# Docker engine inside the image build.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bundle=""
root=""
offline=0
steps=()

die() { printf 'provision.sh: %s\n' "$*" >&2; exit 2; }
log() { printf 'provision.sh: %s\n' "$*" >&2; }

while (($#)); do
  case "$1" in
    --bundle) [ $# -ge 2 ] || die "--bundle needs a directory"; bundle=$2; shift 2 ;;
    --root) [ $# -ge 2 ] || die "--root needs a directory"; root=${2%/}; offline=1; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//; /^set -euo/d'; exit 0 ;;
    packages|binary|guard|unit|image|enable) steps+=("$1"); shift ;;
    all) steps+=(packages binary guard unit image enable); shift ;;
    *) die "unknown argument '$1' (steps: packages binary guard unit image enable all)" ;;
  esac
done
((${#steps[@]})) || die "no step given (steps: packages binary guard unit image enable all)"
[ "$(id -u)" = 0 ] || die "must run as root"

config_dir="$root/etc/pacloud"
config="$config_dir/pacloud.toml"
unit_dir="$root/etc/systemd/system"
libexec="$root/usr/local/libexec/pacloud"

need_bundle() {
  [ -n "$bundle" ] || die "step '$1' needs --bundle DIR"
  [ -d "$bundle" ] || die "bundle directory '$bundle' does not exist"
}

need_live_root() {
  [ "$offline" = 0 ] || die "step '$1' changes the running system and cannot use --root"
}

step_packages() {
  need_live_root packages
  command -v dnf >/dev/null 2>&1 || die "step 'packages' needs dnf (Amazon Linux 2023)"
  dnf install -y docker ec2-hibinit-agent iptables-nft
}

step_binary() {
  need_bundle binary
  [ -f "$bundle/pacloud" ] || die "the bundle has no 'pacloud' binary"
  install -D -m 0755 "$bundle/pacloud" "$root/usr/local/bin/pacloud"
  if [ "$offline" = 0 ]; then
    /usr/local/bin/pacloud --version >/dev/null || die "/usr/local/bin/pacloud does not run on this host"
  fi
}

step_guard() {
  install -D -m 0755 "$here/imds-guard.sh" "$libexec/imds-guard"
  install -D -m 0644 "$here/pacloud-imds-guard.service" "$unit_dir/pacloud-imds-guard.service"
}

step_unit() {
  install -D -m 0644 "$here/pacloud-worker.service" "$unit_dir/pacloud-worker.service"
  install -d -m 0755 "$config_dir"
  if [ ! -e "$config" ]; then
    # Targets (if the release defines its own) first, then the build table.
    {
      echo "# pacloud worker settings (worker-image/provision.sh). Queue, table and"
      echo "# bucket come from /etc/pacloud/worker.env (the launch template's user data)."
      if [ -n "$bundle" ] && [ -f "$bundle/targets.toml" ]; then
        cat "$bundle/targets.toml"
      fi
      echo
      echo "[build]"
      echo 'backend = "docker"'
    } >"$config"
    chmod 0644 "$config"
  fi
}

step_image() {
  need_bundle image
  [ -z "$root" ] || die "step 'image' loads into the local Docker engine and only accepts --root /"
  local tarball="$bundle/builder-image.tar.gz" ref
  [ -f "$tarball" ] || die "the bundle has no builder-image.tar.gz"
  [ -f "$bundle/builder-image.ref" ] || die "the bundle has no builder-image.ref"
  ref=$(tr -d '[:space:]' <"$bundle/builder-image.ref")
  [[ "$ref" =~ ^([a-z0-9][a-z0-9._/:-]*@)?sha256:[0-9a-f]{64}$ ]] || die "builder-image.ref '$ref' is not sha256:<64 hex> or name@sha256:<64 hex>"
  [ "$offline" = 1 ] || systemctl start docker
  gzip -dc "$tarball" | docker load >&2 || die "docker load of builder-image.tar.gz failed"
  # The docker backend runs only pinned references: name@sha256:<digest> or
  # the image ID sha256:<64 hex>. Docker's classic image store keeps a
  # repository digest only for images pulled from a registry, so bundle.sh
  # records the image ID, which survives docker save/load.
  docker image inspect "$ref" >/dev/null 2>&1 ||
    die "after docker load, '$ref' does not resolve: this engine keeps no repository digest for a loaded archive (record the image ID sha256:<64 hex> instead, as bundle.sh does)"
  grep -q '^image = ' "$config" 2>/dev/null && sed -i '/^image = /d' "$config"
  sed -i "/^\[build\]\$/a image = \"$ref\"" "$config"
  log "builder image $ref loaded"
}

step_enable() {
  local units=(pacloud-imds-guard.service pacloud-worker.service)
  if [ "$offline" = 0 ]; then
    units=(docker.service hibinit-agent.service "${units[@]}")
    systemctl enable "${units[@]}"
  else
    systemctl --root="${root:-/}" enable "${units[@]}"
  fi
}

for s in "${steps[@]}"; do
  log "step $s"
  "step_$s"
done
log "done: ${steps[*]}"
