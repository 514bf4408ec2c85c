#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, for tests: etcd, kube-apiserver (TLS, RBAC,
# default admission), kube-controller-manager, kube-scheduler and kwok managing fake Ready
# nodes. Binaries come from scripts/build-control-plane.sh (built on first use).
#
#   scripts/control-plane.sh up DIR [--nodes N]   start; exits 0 once /readyz passes and the
#                                                 N nodes (node-1 … node-N) are Ready and
#                                                 renew their Leases
#   scripts/control-plane.sh check DIR            what a user checks first: /version is v1.34.x,
#                                                 a Deployment rolls out and `rollout restart` makes
#                                                 a second ReplicaSet, the `default`
#                                                 ServiceAccount exists, a ServiceAccount without a
#                                                 Role may not list pods, the SessionPolicy CRD's
#                                                 CEL rules refuse a policy at apply
#   scripts/control-plane.sh down DIR             stop every process `up` started in DIR
#
# DIR/kubeconfig is an admin kubeconfig (client certificate in group system:masters).
# DIR/env holds the ports and paths for scripts (KUBE_APISERVER_URL, ETCD_URL, ...).
# Logs are in DIR/logs/. Everything listens on 127.0.0.1 ports picked at start.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${CONTROL_PLANE_BIN:-$ROOT/tools/control-plane/bin}"
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

usage() { echo "usage: $0 up DIR [--nodes N] | check DIR | down DIR" >&2; exit 2; }
log() { echo "control-plane: $*" >&2; }
die() { log "error: $*"; exit 1; }

# A free loopback TCP port (the kernel picks; the port is free again once the socket closes).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The pid recorded for a component, if that process is still the component we started.
live_pid() {
  local dir=$1 name=$2 pid
  [[ -f "$dir/pids/$name" ]] || return 1
  pid=$(cat "$dir/pids/$name")
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$BIN/$name" || return 1
  echo "$pid"
}

# Whether the process started as `name` still runs (not exited, not a zombie). Unlike
# live_pid it does not look at the command line: right after `start` the pid may still be the
# forked shell that has yet to exec the component, whose command line is this script's.
running() {
  local dir=$1 name=$2 pid state
  pid=$(cat "$dir/pids/$name" 2>/dev/null) || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ -n "$state" && "$state" != Z ]]
}

down() {
  local dir=$1 pid stopped=() name
  [[ -d "$dir" ]] || die "$dir does not exist"
  # Reverse start order: kwok and the controllers first, etcd last.
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    name=${COMPONENTS[$i]}
    if pid=$(live_pid "$dir" "$name"); then
      kill -TERM "$pid" 2>/dev/null || true
      stopped+=("$name:$pid")
    fi
  done
  for entry in "${stopped[@]}"; do
    pid=${entry#*:}
    for _ in $(seq 1 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    if [[ -d /proc/$pid ]]; then
      log "${entry%%:*} ($pid) ignored SIGTERM for 10 s; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    fi
  done
  rm -f "$dir"/pids/*
  if [[ -f "$dir/ports" ]]; then
    local port
    for port in $(cat "$dir/ports"); do
      listening "$port" && die "port $port is still listening after down"
    done
  fi
  log "stopped (${#stopped[@]} processes)"
}

# openssl helpers: a CA, then leaf certificates signed by it.
cert() {
  local pki=$1 name=$2 subj=$3 ext=$4
  openssl genrsa -out "$pki/$name.key" 2048 2>/dev/null
  openssl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 365 -sha256 -extfile <(printf '%s\n' "$ext") \
    -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr"
}

make_pki() {
  local pki=$1
  mkdir -p "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" \
    -days 365 -subj "/CN=session-operator-test-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
  local client="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  cert "$pki" apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert "$pki" admin "/O=system:masters/CN=kubernetes-admin" "$client"
  cert "$pki" controller-manager "/CN=system:kube-controller-manager" "$client"
  cert "$pki" scheduler "/CN=system:kube-scheduler" "$client"
  # Service-account token signing keys.
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

kubeconfig() {
  local out=$1 server=$2 pki=$3 user=$4
  cat >"$out" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: control-plane
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 "$pki/$user.crt")
    client-key-data: $(base64 -w0 "$pki/$user.key")
contexts:
- name: $user
  context: {cluster: control-plane, user: $user}
current-context: $user
EOF
}

start() {
  local dir=$1 name=$2
  shift 2
  nohup "$BIN/$name" "$@" >"$dir/logs/$name.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$dir/pids/$name"
  # Until the forked shell has exec'd the binary, /proc/PID/cmdline is this script's own and
  # live_pid does not know the component: a `down` then (a failed `up`'s trap, on busy cores)
  # would leave it running. Returns once it is exec'd (or gone: `running` reports that).
  for _ in $(seq 1 200); do
    live_pid "$dir" "$name" >/dev/null && return 0
    [[ -d /proc/$pid ]] || return 0
    sleep 0.05
  done
}

# Waits until `check` succeeds; on timeout shows the component's log tail and fails.
wait_until() {
  local seconds=$1 what=$2 logname=$3
  shift 3
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${seconds}s waiting for $what; last lines of $logname.log:"
      tail -n 20 "$DIR/logs/$logname.log" >&2 || true
      return 1
    fi
    if [[ -n "$logname" ]] && ! running "$DIR" "$logname"; then
      local status=0
      wait "$(cat "$DIR/pids/$logname")" 2>/dev/null || status=$?
      log "$logname exited (status $status) while waiting for $what; last lines of its log:"
      tail -n 20 "$DIR/logs/$logname.log" >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

https_ok() { curl -fsS --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$1"; }
# kube-controller-manager and kube-scheduler serve /healthz to anyone, with their own
# self-signed certificate.
healthz_ok() { curl -fsSk --max-time 2 "https://127.0.0.1:$1/healthz"; }

nodes_ready() {
  local want=$1 ready
  ready=$("$BIN/kubectl" --kubeconfig "$DIR/kubeconfig" get nodes -l type=kwok \
    -o jsonpath='{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}|{.spec.taints}{"\n"}{end}' |
    grep -c '=True|$' || true)
  [[ "$ready" == "$want" ]]
}

# Every node's Lease in kube-node-lease is held and fresh (renewed within its duration): what
# the node-lifecycle controller reads as the node's heartbeat.
node_leases_fresh() {
  local want=$1 fresh
  fresh=$("$BIN/kubectl" --kubeconfig "$DIR/kubeconfig" -n kube-node-lease get leases -o json |
    python3 -c '
import datetime, json, sys
now = datetime.datetime.now(datetime.timezone.utc)
n = 0
for lease in json.load(sys.stdin)["items"]:
    spec = lease.get("spec", {})
    if not lease["metadata"]["name"].startswith("node-") or not spec.get("holderIdentity"):
        continue
    renewed = datetime.datetime.fromisoformat(spec["renewTime"].replace("Z", "+00:00"))
    if (now - renewed).total_seconds() < spec.get("leaseDurationSeconds", 0):
        n += 1
print(n)')
  [[ "$fresh" == "$want" ]]
}

default_sa() { "$BIN/kubectl" --kubeconfig "$DIR/kubeconfig" -n default get serviceaccount default; }

up() {
  local nodes=$NODES started=$SECONDS
  for b in "${COMPONENTS[@]}" kubectl; do
    [[ -x "$BIN/$b" ]] && continue
    [[ -n "${CONTROL_PLANE_BIN:-}" ]] && die "$BIN/$b is missing"
    "$ROOT/scripts/build-control-plane.sh"
    break
  done
  command -v openssl >/dev/null || die "openssl is needed for the certificates"
  command -v curl >/dev/null || die "curl is needed for the readiness checks"
  if [[ -d "$DIR/pids" ]] && ls "$DIR/pids" | grep -q .; then
    for name in "${COMPONENTS[@]}"; do
      live_pid "$DIR" "$name" >/dev/null && die "$name already runs for $DIR (run down first)"
    done
  fi
  rm -rf "$DIR/etcd" "$DIR/logs" "$DIR/pki"
  mkdir -p "$DIR/logs" "$DIR/pids"
  PKI="$DIR/pki"
  make_pki "$PKI"

  local etcd_port etcd_peer api_port kcm_port sched_port kwok_port
  etcd_port=$(free_port) etcd_peer=$(free_port) api_port=$(free_port)
  kcm_port=$(free_port) sched_port=$(free_port) kwok_port=$(free_port)
  echo "$etcd_port $etcd_peer $api_port $kcm_port $sched_port $kwok_port" >"$DIR/ports"
  local api="https://127.0.0.1:$api_port"
  kubeconfig "$DIR/kubeconfig" "$api" "$PKI" admin
  kubeconfig "$DIR/controller-manager.kubeconfig" "$api" "$PKI" controller-manager
  kubeconfig "$DIR/scheduler.kubeconfig" "$api" "$PKI" scheduler
  cat >"$DIR/env" <<EOF
KUBECONFIG=$DIR/kubeconfig
KUBE_APISERVER_URL=$api
ETCD_URL=http://127.0.0.1:$etcd_port
CONTROL_PLANE_BIN=$BIN
EOF

  # --unsafe-no-fsync: a throwaway test cluster; durability across power loss is not needed.
  start "$DIR" etcd --name default --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "default=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync --log-level warn
  wait_until 30 "etcd" etcd curl -fsS --max-time 2 "http://127.0.0.1:$etcd_port/health"

  # Admission: the default plugin set of v1.34 (no --enable-admission-plugins).
  start "$DIR" kube-apiserver --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --authorization-mode Node,RBAC --service-cluster-ip-range 10.96.0.0/16 \
    --allow-privileged=true --profiling=false --cert-dir "$PKI/generated"
  wait_until 60 "kube-apiserver /readyz" kube-apiserver https_ok "$api/readyz"

  # The controllers a workload needs: Deployments, ReplicaSets, StatefulSets and Jobs (the
  # chart's migration hook), garbage collection, namespaces, service accounts and their
  # tokens, pod GC, node lifecycle (lifts the not-ready taint admission puts on new nodes),
  # PodDisruptionBudgets and the kube-root-ca.crt ConfigMap of each namespace. Each runs
  # with its own service account, as in kubeadm clusters.
  start "$DIR" kube-controller-manager --kubeconfig "$DIR/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$DIR/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$DIR/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" --cert-dir "$PKI/generated" \
    --leader-elect=false --use-service-account-credentials=true \
    --root-ca-file "$PKI/ca.crt" --service-account-private-key-file "$PKI/sa.key" \
    --controllers deployment-controller,replicaset-controller,statefulset-controller,job-controller,garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,pod-garbage-collector-controller,node-lifecycle-controller,disruption-controller,root-ca-certificate-publisher-controller
  start "$DIR" kube-scheduler --kubeconfig "$DIR/scheduler.kubeconfig" \
    --authentication-kubeconfig "$DIR/scheduler.kubeconfig" \
    --authorization-kubeconfig "$DIR/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$sched_port" --leader-elect=false
  # kwok plays the kubelet of every node annotated kwok.x-k8s.io/node=fake: node heartbeats,
  # pods Pending → Running → Ready, graceful deletion. --node-lease-duration-seconds: the
  # kubelet's default of 40 s, renewed every 10 s in kube-node-lease. The kwok binary's default
  # is 0, which means no Lease at all and a node-status heartbeat only every 10–20 min: the
  # node-lifecycle controller then finds every node's heartbeat older than its 50 s grace period,
  # marks the node Unknown and sets Ready=False on each of its pods (the pods stay so; kwok puts
  # the node back to Ready at once but never the pods) — every ~55 s, a pod NotReady under any
  # test that outlives the next round.
  start "$DIR" kwok --kubeconfig "$DIR/kubeconfig" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --node-lease-duration-seconds 40 \
    --cidr 10.244.0.0/16 --node-ip 127.0.0.1 --server-address "127.0.0.1:$kwok_port"
  wait_until 60 "kube-controller-manager /healthz" kube-controller-manager healthz_ok "$kcm_port"
  wait_until 60 "kube-scheduler /healthz" kube-scheduler healthz_ok "$sched_port"

  local manifest=""
  for i in $(seq 1 "$nodes"); do
    manifest+="---
apiVersion: v1
kind: Node
metadata:
  name: node-$i
  annotations: {node.alpha.kubernetes.io/ttl: \"0\", kwok.x-k8s.io/node: fake}
  labels: {type: kwok, kubernetes.io/hostname: node-$i, kubernetes.io/os: linux, kubernetes.io/arch: amd64}
status:
  allocatable: {cpu: \"32\", memory: 256Gi, pods: \"110\"}
  capacity: {cpu: \"32\", memory: 256Gi, pods: \"110\"}
"
  done
  echo "$manifest" | "$BIN/kubectl" --kubeconfig "$DIR/kubeconfig" apply -f - >/dev/null
  wait_until 60 "$nodes Ready, untainted nodes" kwok nodes_ready "$nodes"
  wait_until 30 "the $nodes nodes' Leases" kwok node_leases_fresh "$nodes"
  wait_until 30 "the default ServiceAccount" kube-controller-manager default_sa
  log "ready in $((SECONDS - started))s: KUBECONFIG=$DIR/kubeconfig ($api, $nodes nodes)"
}

check() {
  [[ -f "$DIR/kubeconfig" ]] || die "no $DIR/kubeconfig: run up first"
  local k=("$BIN/kubectl" --kubeconfig "$DIR/kubeconfig") ns="cp-check-$$" version
  fail() { "${k[@]}" delete namespace "$ns" --wait=false >/dev/null 2>&1 || true; die "check: $*"; }
  version=$("${k[@]}" get --raw /version | python3 -c 'import json,sys; print(json.load(sys.stdin)["gitVersion"])')
  [[ $version == v1.34.* ]] || fail "/version reports $version, not v1.34.x"
  log "check: /version gitVersion $version"
  "${k[@]}" create namespace "$ns" >/dev/null
  wait_until 30 "the default ServiceAccount of $ns" "" "${k[@]}" -n "$ns" get serviceaccount default ||
    fail "no default ServiceAccount in $ns"
  log "check: namespace $ns has its default ServiceAccount"
  "${k[@]}" -n "$ns" create deployment web --image=example.com/web:1 --replicas=2 >/dev/null
  "${k[@]}" -n "$ns" rollout status deployment/web --timeout=60s >/dev/null || fail "deployment did not roll out"
  "${k[@]}" -n "$ns" rollout restart deployment/web >/dev/null
  "${k[@]}" -n "$ns" rollout status deployment/web --timeout=60s >/dev/null || fail "restart did not roll out"
  local sets
  sets=$("${k[@]}" -n "$ns" get replicasets -l app=web -o name | wc -l)
  [[ $sets == 2 ]] || fail "rollout restart left $sets ReplicaSets, not 2"
  log "check: deployment rolled out; rollout restart made a second ReplicaSet"
  "${k[@]}" -n "$ns" create serviceaccount nobody >/dev/null
  local token server code
  token=$("${k[@]}" -n "$ns" create token nobody)
  server=$(grep '^KUBE_APISERVER_URL=' "$DIR/env" | cut -d= -f2-)
  code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$DIR/pki/ca.crt" \
    -H "Authorization: Bearer $token" "$server/api/v1/namespaces/$ns/pods")
  [[ $code == 403 ]] || fail "a ServiceAccount without a Role got $code listing pods, not 403"
  log "check: a ServiceAccount without a Role is forbidden to list pods (403)"
  "${k[@]}" apply --server-side -f "$ROOT/crds/sessionpolicies.sessions.blockyard.io.yaml" >/dev/null
  "${k[@]}" wait --for=condition=Established crd/sessionpolicies.sessions.blockyard.io --timeout=30s >/dev/null
  local out
  if out=$(printf 'apiVersion: sessions.blockyard.io/v1alpha1\nkind: SessionPolicy\nmetadata: {name: empty, namespace: %s}\nspec: {selector: {}}\n' "$ns" |
    "${k[@]}" apply -f - 2>&1); then
    fail "a SessionPolicy with an empty selector was accepted"
  fi
  [[ $out == *"selector must name what it selects"* ]] || fail "unexpected refusal: $out"
  log "check: the CRD's CEL rule refuses an empty selector at apply"
  "${k[@]}" delete namespace "$ns" --wait=false >/dev/null
  log "check: all passed"
}

[[ $# -ge 2 ]] || usage
CMD=$1 DIR=$2
shift 2
NODES=3
while [[ $# -gt 0 ]]; do
  case $1 in
    --nodes) NODES=${2:?--nodes needs a number}; shift 2 ;;
    *) usage ;;
  esac
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive number, not '$NODES'"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
case $CMD in
  up)
    # A failed start leaves nothing running behind it.
    OK=0
    trap '[[ $OK == 1 ]] || down "$DIR" >/dev/null 2>&1 || true' EXIT
    up
    OK=1
    ;;
  check) check ;;
  down) down "$DIR" ;;
  *) usage ;;
esac
