#!/usr/bin/env bash
# The real-cluster lane: starts a real control plane (scripts/control-plane.sh: etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, kwok with 3 fake nodes) and runs
# against it
#   - the end-to-end suite (tests/e2e, E2E_BACKEND=real, see tests/e2e/backend.rs): the
#     operator running with a ServiceAccount token that has exactly the chart's rendered RBAC,
#     rollouts done by kube-controller-manager, pods run by kube-scheduler and kwok;
#   - the chart's Helm SDK install/upgrade/uninstall and CEL tests (tests/chart/test_real_cluster.py);
#   - the emulator's differential test (crates/kube-emulator/tests/differential.rs: the same
#     requests against both, compared) and its kube-rs and kubectl scenario tests (tests/kube_rs,
#     tests/kubectl.rs, tests/kubectl_workloads.rs: every scenario that needs no emulator hook
#     asserts the same on the real server, in a namespace of its own);
# then stops the control plane. Needs Go (the binaries are built on first use, see
# scripts/build-control-plane.sh), openssl, curl, python3, cargo, Postgres and Redis
# (DATABASE_URL/REDIS_URL as scripts/test.sh sets them).
#
#   ./scripts/test-real.sh            # everything above
#   ./scripts/test-real.sh e2e ARGS   # only the e2e lane; ARGS (filters, --nocapture, ...)
#                                     # go to the test binary
#   ./scripts/test-real.sh chart|diff # only the chart tests / the emulator's tests
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-all}
[[ $# -gt 0 ]] && shift

./scripts/build-control-plane.sh
dir=$(mktemp -d "${TMPDIR:-/tmp}/session-operator-cp.XXXXXX")
# On failure the components' logs are kept (the cluster directory itself is removed).
cleanup() {
  local rc=$?
  ./scripts/control-plane.sh down "$dir" >/dev/null 2>&1 || true
  if [[ $rc != 0 && -d "$dir/logs" ]]; then
    local kept="${TMPDIR:-/tmp}/session-operator-cp-logs.$$"
    cp -r "$dir/logs" "$kept" && echo "test-real: failed (status $rc); control-plane logs kept in $kept" >&2
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
./scripts/control-plane.sh up "$dir" --nodes 3
./scripts/control-plane.sh check "$dir"
export PATH="$PWD/tools/control-plane/bin:$PATH"

# The chart's Python tools (Helm's Go SDK) render the operator's RBAC.
if [ ! -x .venv-chart/bin/python ]; then
  ./scripts/chart-test.sh --collect-only -q tests/chart/test_render.py >/dev/null
fi
.venv-chart/bin/python tests/chart/operator_rbac.py "$dir/operator-rbac.json" cluster-wide

export E2E_KUBECONFIG="$dir/kubeconfig" E2E_OPERATOR_RBAC="$dir/operator-rbac.json"
if [[ $what == all || $what == e2e ]]; then
  # The test binary is built before the clock starts; one cluster serves every test in turn.
  E2E_BACKEND=real cargo test -q --test e2e --no-run
  started=$SECONDS
  rc=0
  E2E_BACKEND=real cargo test -q --test e2e -- "$@" || rc=$?
  echo "test-real: e2e took $((SECONDS - started)) s"
  [[ $rc == 0 ]] || exit "$rc"
fi
if [[ $what == all || $what == diff ]]; then
  # --workspace: the features of `cargo test --workspace`, so nothing is rebuilt. Built before
  # the clock starts.
  emulator_tests=(--test differential --test kube_rs --test kubectl --test kubectl_workloads)
  cargo test -q --workspace "${emulator_tests[@]}" --no-run
  started=$SECONDS
  rc=0
  DIFF_KUBECONFIG="$dir/kubeconfig" cargo test -q --workspace "${emulator_tests[@]}" || rc=$?
  echo "test-real: emulator tests on both servers took $((SECONDS - started)) s"
  [[ $rc == 0 ]] || exit "$rc"
  # The Node the kube_rs scenarios bind their idle pods to (tests/kube_rs/backend.rs).
  kubectl --kubeconfig "$dir/kubeconfig" delete node idle-node --ignore-not-found >/dev/null
fi
if [[ $what == all || $what == chart ]]; then
  REAL_KUBECONFIG="$dir/kubeconfig" CHART_TEST_REQUIRE_BINARIES=1 \
    .venv-chart/bin/python -m pytest -q -p no:cacheprovider tests/chart/test_real_cluster.py
fi
