#!/usr/bin/env bash
# Builds the upstream control plane the real-cluster test lane runs on:
# kube-apiserver, kube-controller-manager, kube-scheduler and kubectl from
# k8s.io/kubernetes v1.34.4, etcd from go.etcd.io/etcd/server/v3 (the version
# Kubernetes v1.34.4 itself requires) and kwok from sigs.k8s.io/kwok.
#
# Usage: scripts/build-control-plane.sh [--force]
#
# The binaries land in tools/control-plane/bin/ (ignored by git). A stamp of the
# go.mod/go.sum files and of this script's build flags is kept beside them, so a
# second run with nothing changed returns at once; after a change, Go's own
# build cache (GOCACHE) makes the rebuild a matter of linking. Only the Go module
# proxy is used to fetch sources (GOPROXY as configured, by default the public
# proxy); go.sum in the repository pins every module's hash.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS="$ROOT/tools/control-plane"
BIN="$TOOLS/bin"
K8S_VERSION=v1.34.4
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

command -v go >/dev/null || { echo "build-control-plane: go is not installed (Go >= 1.24 needed)" >&2; exit 1; }

# The checksum database is not reachable from the project's machines (only the
# module proxy is). Every module's hash is already in the committed go.sum
# files, which Go verifies whether or not a checksum database is consulted, so
# turning the database off loses nothing for these two modules.
export GOSUMDB="${GOSUMDB:-off}"
# -mod=mod: the tools modules have no vendor directory; -buildvcs=false: the
# module sits inside this git repository and its state is no part of the build.
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

# Version information as the upstream release build stamps it (hack/lib/version.sh):
# without it /version would report v0.0.0-master.
MAJOR="${K8S_VERSION#v}"; MAJOR="${MAJOR%%.*}"
MINOR="${K8S_VERSION#v*.}"; MINOR="${MINOR%%.*}"
X=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  X+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$MAJOR -X $pkg.gitMinor=$MINOR"
  X+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=2026-02-10T12:53:36Z"
done
# -s -w: no symbol table or DWARF; the binaries are half the size and link faster.
LDFLAGS="-s -w$X"

stamp() {
  cat "$TOOLS/go.mod" "$TOOLS/go.sum" "$TOOLS/kwok/go.mod" "$TOOLS/kwok/go.sum"
  echo "$LDFLAGS $(go env GOVERSION)"
}
WANT="$(stamp | sha256sum | cut -d' ' -f1)"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok)
all_there() { for b in "${BINARIES[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done; }
if [[ $FORCE == 0 && -f "$BIN/.stamp" && "$(cat "$BIN/.stamp")" == "$WANT" ]] && all_there; then
  echo "build-control-plane: up to date in $BIN"
  exit 0
fi

mkdir -p "$BIN"
rm -f "$BIN/.stamp"
start=$(date +%s)
echo "build-control-plane: building ${BINARIES[*]} into $BIN (GOCACHE=$(go env GOCACHE))"
(
  cd "$TOOLS"
  go mod download
  # One invocation for all Kubernetes binaries: their shared packages compile once.
  # `etcd` is the main package at the root of go.etcd.io/etcd/server/v3.
  go build -trimpath -ldflags "$LDFLAGS" -o "$BIN/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
)
(
  cd "$TOOLS/kwok"
  go mod download
  go build -trimpath -ldflags "-s -w" -o "$BIN/kwok" sigs.k8s.io/kwok/cmd/kwok
)
all_there
echo "$WANT" > "$BIN/.stamp"
echo "build-control-plane: built in $(( $(date +%s) - start ))s"
