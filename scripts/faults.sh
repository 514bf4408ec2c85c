#!/usr/bin/env bash
# The fault suite (tests/faults): every scenario starts its own Postgres (initdb/pg_ctl from
# Debian's postgresql package) and Redis (redis-server) on free ports in temporary directories,
# a TCP proxy between the operators and Redis, the API-server emulator, and (in the api_connections
# scenarios) a TCP proxy of each operator's own in front of it; it never touches the shared servers
# on 5432/6379. Prints one row per scenario (docs/reliability.md explains them).
#
#   ./scripts/faults.sh            # every scenario, one at a time (test profile, like cargo test)
#   ./scripts/faults.sh quick_     # only the quick subset (also run by scripts/test.sh)
#   ./scripts/faults.sh postgres   # scenarios whose name contains "postgres"
#   ./scripts/faults.sh api_connections   # the API server's connections cut (reset, blackhole)
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || apt_install postgresql
command -v redis-server >/dev/null || apt_install redis-server

filter="${1:-}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --test faults -- --test-threads=1 --nocapture ${filter:+"$filter"} 2>&1 \
  | tee "$log" | grep -E 'FAULTS|^test |panicked' || status=$?
grep -q '^test result: ok' "$log" || status=1

echo
echo "| scenario | expected | present | on departed workers | stale in Redis (fault end) | stale in Redis (converged) | changes by a deposed leader | converged after the fault ended |"
echo "|---|---|---|---|---|---|---|---|"
grep -o 'FAULTS | .*' "$log" | sed 's/^FAULTS //'
echo
grep -o 'FAULTS-NOTE | .*' "$log" | sed 's/^FAULTS-NOTE | //' || true
exit $status
