#!/usr/bin/env bash
# Prints the real-package figures (docs/benchmarks.md, issue 9): the real set
# of ../shared/gentoo-subset from an empty store and again fully cached, the
# worker overhead per package beyond emerge, and the real chains (lzo <- lzop,
# attr <- acl) through the service versus every dependency rebuilt in a fresh
# sandbox. Needs the test venv and the Debian build tools (scripts/test.sh
# installs both) and bubblewrap. Takes about 20 min on 2 cores.
# usage: scripts/bench-real.sh [--only set|chain]   (PROFILE=dev for a debug build)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d ../shared/gentoo-subset/repo ] || { echo "../shared/gentoo-subset is missing" >&2; exit 2; }
[ -x .venv/bin/emerge ] || { /usr/bin/python3 -m venv .venv && .venv/bin/python -m pip install -q -r tests/requirements.txt; }
profile=${PROFILE:-release}
cargo build --profile "$profile" --locked -p pacloud-bench --bin bench-real
dir=release
[ "$profile" = dev ] && dir=debug
exec "target/$dir/bench-real" "$@"
