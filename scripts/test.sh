#!/usr/bin/env bash
# The whole test suite: builds kubectl and the real control plane from their Go modules, makes
# sure Postgres and Redis answer (installing and starting them from Debian packages on a fresh
# machine), then runs formatting and lint checks, every test of the workspace (end to end on the
# emulator), the chart tests, the real-cluster lane (scripts/test-real.sh) and the benchmarks
# in smoke mode.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_HOST=127.0.0.1 PG_PORT=5432 REDIS_PORT=6379

answers() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() {
  for _ in $(seq 1 60); do answers "$1" "$2" && return 0; sleep 0.5; done
  echo "error: nothing answers on $1:$2" >&2
  return 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

ensure_postgres() {
  answers $PG_HOST $PG_PORT && return 0
  echo "Postgres does not answer on $PG_HOST:$PG_PORT; installing/starting it" >&2
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  local version; version=$(ls /etc/postgresql | sort -V | tail -n1)
  local hba="/etc/postgresql/$version/main/pg_hba.conf"
  # Test machine only: local TCP connections without a password, as on the development machines.
  if ! as_root grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for $PG_HOST $PG_PORT
}

ensure_redis() {
  answers 127.0.0.1 $REDIS_PORT && return 0
  echo "Redis does not answer on 127.0.0.1:$REDIS_PORT; installing/starting it" >&2
  command -v redis-server >/dev/null || apt_install redis-server
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 --port $REDIS_PORT --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for 127.0.0.1 $REDIS_PORT
}

# kubectl >= 1.30 for the kubectl tests (Debian's kubernetes-client is 1.20): the one built with
# the real control plane from k8s.io/kubernetes v1.34 (scripts/build-control-plane.sh, needs
# Go; seconds when built before), first on PATH for everything below.
ensure_control_plane() {
  command -v go >/dev/null || {
    echo "error: Go (>= 1.24) is needed to build kubectl and the real control plane" >&2
    return 1
  }
  ./scripts/build-control-plane.sh
  export PATH="$PWD/tools/control-plane/bin:$PATH"
  kubectl version --client
}

ensure_control_plane
ensure_postgres
command -v psql >/dev/null || apt_install postgresql-client
ensure_redis
# The Redis TLS test starts its own TLS redis-server with certificates made by openssl.
command -v redis-server >/dev/null || apt_install redis-server
command -v openssl >/dev/null || apt_install openssl

# A database of its own for this run, dropped afterwards.
db="session_operator_test_$$"
admin_url="postgres://postgres@$PG_HOST:$PG_PORT/postgres"
psql_admin() { psql "$admin_url" -v ON_ERROR_STOP=1 -qc "$1" >/dev/null; }
psql_admin "CREATE DATABASE $db"
trap 'psql_admin "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true' EXIT
export DATABASE_URL="postgres://postgres@$PG_HOST:$PG_PORT/$db"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The image's build (the Dockerfile's `--no-default-features`): it must link no emulator, and
# stay lint-clean without the lab code that uses much of the library.
if cargo tree -p session-operator -e normal --no-default-features --prefix none | grep -q '^kube-emulator '; then
  echo "error: session-operator built with --no-default-features (the image's build) depends on kube-emulator;" \
    "only the feature \`lab\` and the dev-dependencies may bring it in" >&2
  exit 1
fi
cargo clippy -p session-operator --no-default-features --all-targets -- -D warnings
# The fault suite is `test = false` (not part of `cargo test --workspace`), so --all-targets skips it.
cargo clippy --test faults -- -D warnings
cargo test --workspace
# The fault suite's quick subset (own Postgres/Redis instances; the full set: ./scripts/faults.sh).
cargo test --test faults quick_
# Helm chart, Dockerfile and install checks (a Python venv with Helm's Go SDK, kubernetes-validate,
# checkov, hadolint), including the chart/binary drift and RBAC-from-reality tests.
# (test_real_cluster.py needs the real control plane: scripts/test-real.sh runs it.)
CHART_TEST_REQUIRE_BINARIES=1 ./scripts/chart-test.sh --ignore=tests/chart/test_real_cluster.py
# The whole end-to-end suite again and the chart's Helm install on a real control plane:
# kube-apiserver, kube-controller-manager, kube-scheduler, etcd, kwok.
./scripts/test-real.sh
cargo run -q -- bench store --smoke
cargo run -q -- bench operator --smoke
cargo run -q -- bench pass --smoke
# Benchmark targets built in the test profile and run once with small sizes.
BENCH_SMOKE=1 cargo test -q -p kube-emulator --bench emulator
echo "all tests passed"
