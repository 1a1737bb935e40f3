#!/usr/bin/env bash
# pacloud IMDS guard: containers must not reach the instance metadata service
# (and with it the instance role's credentials). Inserts, once, at the top of
# Docker's DOCKER-USER chain (FORWARD traffic from containers):
#
#   -i docker+ -d 169.254.169.254/32 -j DROP   (the default bridge)
#   -i br-+    -d 169.254.169.254/32 -j DROP   (user-defined bridges)
#
# Creates the chain (and FORWARD's jump to it) when Docker has not yet, so
# the rule holds from the first container on. Idempotent: run by
# pacloud-imds-guard.service after docker.service at every boot (the rule is
# persisted by re-applying it, and survives hibernation in memory). Together
# with the launch template's IMDSv2 hop limit 1 (DESIGN.md §6). Does not
# cover `--network host`, which pacloud never uses.
# IPTABLES selects the binary (default: iptables).
set -euo pipefail

ipt=${IPTABLES:-iptables}
imds=169.254.169.254/32
chain=DOCKER-USER

"$ipt" -w -n -L "$chain" >/dev/null 2>&1 || "$ipt" -w -N "$chain"
"$ipt" -w -C FORWARD -j "$chain" 2>/dev/null || "$ipt" -w -I FORWARD 1 -j "$chain"
# Inserted in reverse so docker+ ends up first.
for iface in br-+ docker+; do
  if ! "$ipt" -w -C "$chain" -i "$iface" -d "$imds" -j DROP 2>/dev/null; then
    "$ipt" -w -I "$chain" 1 -i "$iface" -d "$imds" -j DROP
  fi
done
echo "pacloud-imds-guard: container traffic to ${imds%/32} is dropped (${chain})"
