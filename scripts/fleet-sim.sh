#!/usr/bin/env bash
# The fleet economics: runs the fleet simulator (crates/pacloud-fleet-sim,
# the same policy code as the scaler Lambda) on a default day, a stormy spot
# market, a quiet day and a busy day, prints the tables, regenerates the
# tables between the fleet-sim markers of docs/fleet.md and the SVG plots in
# docs/fleet/. Deterministic: same seeds, same output.
# Usage: scripts/fleet-sim.sh [--no-docs]
set -euo pipefail
cd "$(dirname "$0")/.."

update_docs=1
[ "${1:-}" = "--no-docs" ] && update_docs=0

cargo build --release --locked -q -p pacloud-fleet-sim
sim=target/release/pacloud-fleet-sim

# name | flags (the defaults are documented in docs/fleet.md and crates/pacloud-fleet-sim/src/params.rs)
scenarios=(
  "Default day (30 builds/h, interruptions 0.0003/instance-h, capacity outages 0.02/type-h)|"
  "High-interruption day: stormy spot market (interruptions 0.05/instance-h, outages 0.5/type-h)|--interruption-rate 0.05 --capacity-error-rate 0.5"
  "Quiet day (5 builds/h)|--arrival-rate 5"
  "Busy day (150 builds/h)|--arrival-rate 150"
)

tables=$(mktemp)
trap 'rm -f "$tables"' EXIT
for s in "${scenarios[@]}"; do
  title=${s%%|*}
  flags=${s#*|}
  # shellcheck disable=SC2086 # flags are fixed words from the list above
  {
    printf '\n#### %s\n\n`pacloud-fleet-sim --seed 1 %s`\n\n' "$title" "$flags"
    $sim --seed 1 $flags --markdown
  } >>"$tables"
done
# Other seeds of the default day: is the default day typical?
{
  printf '\n#### Default day, seeds 2–5 (pacloud and the two closest baselines)\n\n'
  printf '| seed | policy | $/build | wait p95 |\n|---:|---|---:|---:|\n'
  for seed in 2 3 4 5; do
    $sim --seed "$seed" --json | while read -r line; do
      pol=$(printf '%s' "$line" | sed -n 's/.*"policy":"\([^"]*\)".*/\1/p')
      case $pol in pacloud | watch-pending | per-job) ;; *) continue ;; esac
      cpb=$(printf '%s' "$line" | sed -n 's/.*"cost_per_build_usd":\([0-9.e-]*\).*/\1/p')
      p95=$(printf '%s' "$line" | sed -n 's/.*"wait_p95_s":\([0-9]*\).*/\1/p')
      printf '| %s | %s | %.4f | %s s |\n' "$seed" "$pol" "$cpb" "$p95"
    done
  done
} >>"$tables"
# Sensitivity: the idle timeouts that decide the cost/wait trade-off.
{
  printf '\n#### Default day, seed 1: idle timeouts (sensitivity)\n\n'
  printf '| variant | $/build | wait p50 | wait p95 |\n|---|---:|---:|---:|\n'
  cfg=$(mktemp)
  printf '{"idle_timeout_s": 120, "expected_boot_s": 90}' >"$cfg"
  row() { sed -n 's/.*"cost_per_build_usd":\([0-9.e-]*\).*"wait_p50_s":\([0-9]*\),"wait_p95_s":\([0-9]*\).*/\1 \2 \3/p'; }
  read -r c p50 p95 < <($sim --seed 1 --policy pacloud --json | row)
  printf '| pacloud (idle 10 s, freeing window 30 s: the defaults) | %.4f | %s s | %s s |\n' "$c" "$p50" "$p95"
  read -r c p50 p95 < <($sim --seed 1 --policy pacloud --config "$cfg" --json | row)
  printf '| pacloud with the previous defaults (idle 120 s, window 90 s) | %.4f | %s s | %s s |\n' "$c" "$p50" "$p95"
  read -r c p50 p95 < <($sim --seed 1 --policy watch-pending --json | row)
  printf '| watch-pending, idle 120 s (as compared) | %.4f | %s s | %s s |\n' "$c" "$p50" "$p95"
  read -r c p50 p95 < <($sim --seed 1 --policy watch-pending --watch-pending-idle-s 10 --json | row)
  printf '| watch-pending with pacloud'"'"'s 10 s idle | %.4f | %s s | %s s |\n' "$c" "$p50" "$p95"
  rm -f "$cfg"
} >>"$tables"
cat "$tables"

if [ "$update_docs" = 1 ]; then
  $sim --seed 1 --plot-dir docs/fleet >/dev/null
  doc=docs/fleet.md
  grep -q '<!-- fleet-sim:begin -->' "$doc" || { echo "no fleet-sim markers in $doc" >&2; exit 1; }
  awk -v tables="$tables" '
    /<!-- fleet-sim:begin -->/ { print; while ((getline l < tables) > 0) print l; skip = 1; next }
    /<!-- fleet-sim:end -->/ { skip = 0 }
    !skip { print }
  ' "$doc" >"$doc.tmp"
  mv "$doc.tmp" "$doc"
  echo "updated $doc and docs/fleet/*.svg" >&2
fi
