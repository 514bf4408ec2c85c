//! The end-to-end harness: a cluster (kube-emulator in this process, or the real control plane
//! with `E2E_BACKEND=real`, see `backend.rs`), real Postgres and Redis (a schema and a key prefix
//! of their own), and the real `session-operator run` binary as child processes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube_emulator::Emulator;
use serde_json::{Value, json};
use session_operator::policy::SessionPolicy;
use session_operator::store::{Entry, LayeredStore, Store, StoreOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::backend::{Backend, RealCluster};
use crate::common::{PgSchema, RedisPrefix, pg_url, redis_url, unique};

pub(crate) const NS: &str = "apps";

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
pub(crate) async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether to skip (part of) a scenario on the real lane: there it prints `e2e: SKIPPED on
/// E2E_BACKEND=real: <what>: <why>` past the test harness's output capture, so that every run
/// shows what it did not test.
pub(crate) fn skipped_on_real(what: &str, why: &str) -> bool {
    use std::io::Write;
    if Backend::selected() != Backend::Real {
        return false;
    }
    let _ = writeln!(
        std::io::stderr(),
        "e2e: SKIPPED on E2E_BACKEND=real: {what}: {why}"
    );
    true
}

/// A cluster with the SessionPolicy CRD and namespace `apps`: the emulator, or the shared real
/// control plane (one test at a time, see `backend.rs`).
pub(crate) struct Cluster {
    backend: ClusterBackend,
    pub client: Client,
    /// The kubeconfig the operator runs with (on the real cluster: the chart's RBAC).
    pub kubeconfig: PathBuf,
}

enum ClusterBackend {
    Emulator(Emulator),
    Real(RealCluster),
}

impl Cluster {
    pub(crate) async fn start() -> Self {
        match Backend::selected() {
            Backend::Emulator => Self::emulated().await,
            Backend::Real => {
                let real = RealCluster::start(NS, &session_operator::policy::crd_yaml()).await;
                Self {
                    client: real.admin.clone(),
                    kubeconfig: real.operator_kubeconfig.clone(),
                    backend: ClusterBackend::Real(real),
                }
            }
        }
    }

    /// A cluster whose workload controllers run: on the emulator its simulated ones
    /// (deployment, replicaset, statefulset, gc, scheduler, kubelet stages on 3 nodes), on the
    /// real lane kube-controller-manager, kube-scheduler and kwok.
    pub(crate) async fn start_with_workloads() -> Self {
        match Backend::selected() {
            Backend::Emulator => {
                let emulator = Emulator::builder()
                    .controllers(kube_emulator::Controllers::all())
                    .nodes(3)
                    .pod_ready_delay(Duration::from_millis(100))
                    .start()
                    .await
                    .expect("start the emulator");
                Self::emulated_with(emulator)
            }
            Backend::Real => Self::start().await,
        }
    }

    async fn emulated() -> Self {
        Self::emulated_with(Emulator::start().await.expect("start the emulator"))
    }

    fn emulated_with(emulator: Emulator) -> Self {
        let control = emulator.control();
        control
            .load_yaml(&session_operator::policy::crd_yaml())
            .expect("install the CRD");
        control
            .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))
            .expect("create namespace");
        let kubeconfig = std::env::temp_dir().join(format!("{}.kubeconfig", unique("e2e")));
        std::fs::write(&kubeconfig, emulator.kubeconfig()).expect("write kubeconfig");
        let client = emulator.client().expect("client");
        Self {
            backend: ClusterBackend::Emulator(emulator),
            client,
            kubeconfig,
        }
    }

    /// Like [`Cluster::start`], with the workload controllers running: the emulator's
    /// (Deployments roll out by themselves, pods turn Ready at once), or on the real lane
    /// kube-controller-manager, kube-scheduler and kwok.
    pub(crate) async fn start_with_controllers() -> Self {
        match Backend::selected() {
            Backend::Emulator => {
                let emulator = Emulator::builder()
                    .controllers(kube_emulator::Controllers::all())
                    .start()
                    .await
                    .expect("start the emulator");
                Self::emulated_with(emulator)
            }
            Backend::Real => Self::start().await,
        }
    }

    /// Whether this is the real control plane.
    pub(crate) fn is_real(&self) -> bool {
        matches!(self.backend, ClusterBackend::Real(_))
    }

    /// The emulator, for what only its hooks do (e.g. holding a pod NotReady against its own
    /// kubelet); callers check [`Cluster::is_real`] first.
    pub(crate) fn emulator(&self) -> &Emulator {
        match &self.backend {
            ClusterBackend::Emulator(emulator) => emulator,
            ClusterBackend::Real(_) => {
                panic!("an emulator hook used on E2E_BACKEND=real: use the real counterpart")
            }
        }
    }

    /// The operator's lease namespace and name: the emulator's defaults, or on the real
    /// cluster the ones the chart's RBAC grants.
    pub(crate) fn lease(&self) -> (String, String) {
        match &self.backend {
            ClusterBackend::Emulator(_) => ("default".into(), "session-operator".into()),
            ClusterBackend::Real(real) => real.lease.clone(),
        }
    }

    pub(crate) fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), NS)
    }

    pub(crate) fn policies(&self) -> Api<SessionPolicy> {
        Api::namespaced(self.client.clone(), NS)
    }

    /// Creates a policy from a JSON spec.
    pub(crate) async fn apply_policy(&self, name: &str, spec: Value) -> SessionPolicy {
        self.apply_policy_in(NS, name, spec).await
    }

    pub(crate) async fn apply_policy_in(&self, ns: &str, name: &str, spec: Value) -> SessionPolicy {
        let policy: SessionPolicy = serde_json::from_value(json!({
            "apiVersion": "sessions.blockyard.io/v1alpha1",
            "kind": "SessionPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }))
        .expect("policy");
        Api::<SessionPolicy>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &policy)
            .await
            .expect("create policy")
    }

    /// Creates a Running, Ready worker pod. `owner` is `(kind, name)` of its controller, with the
    /// `pod-template-hash` label for ReplicaSets named `<deployment>-<hash>`.
    pub(crate) async fn ready_pod(&self, name: &str, app: &str, owner: Option<(&str, &str)>) {
        self.ready_pod_in(NS, name, app, owner).await;
    }

    pub(crate) async fn ready_pod_in(
        &self,
        ns: &str,
        name: &str,
        app: &str,
        owner: Option<(&str, &str)>,
    ) {
        let mut pod = WorkerPod::new(name, app).in_namespace(ns);
        pod.owner = owner;
        self.ready_pods(&[pod]).await;
    }

    /// Creates the pods, then waits until each is Running and Ready; returns them as they are
    /// then. On the emulator the test plays the kubelet (its hooks set phase and readiness);
    /// on the real lane kube-scheduler binds them to kwok's nodes and kwok runs them, and a
    /// pod's owner is a real object (see [`RealCluster::held_owner`]). Creating all before
    /// waiting keeps their creation close together.
    pub(crate) async fn ready_pods(&self, pods: &[WorkerPod<'_>]) -> Vec<Pod> {
        let mut objects = Vec::new();
        for pod in pods {
            let mut labels = pod.labels.clone();
            let mut metadata = json!({"name": pod.name, "namespace": pod.ns,
                                      "annotations": pod.annotations});
            if let Some((kind, owner_name)) = pod.owner {
                let mut owner_labels = json!({"app": labels["app"]});
                if kind == "ReplicaSet" {
                    let hash = owner_name.rsplit('-').next().unwrap_or_default();
                    labels["pod-template-hash"] = json!(hash);
                    owner_labels["pod-template-hash"] = json!(hash);
                }
                let uid = match &self.backend {
                    ClusterBackend::Emulator(_) => format!("uid-{owner_name}"),
                    ClusterBackend::Real(real) => {
                        real.held_owner(pod.ns, kind, owner_name, &owner_labels)
                            .await
                    }
                };
                metadata["ownerReferences"] = json!([{
                    "apiVersion": "apps/v1", "kind": kind, "name": owner_name,
                    "uid": uid, "controller": true,
                }]);
            }
            metadata["labels"] = labels;
            objects.push(json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                "spec": {"containers": [{"name": "worker", "image": "worker:1"}],
                         "terminationGracePeriodSeconds": 1},
            }));
        }
        let mut ready = Vec::new();
        match &self.backend {
            ClusterBackend::Emulator(emulator) => {
                let control = emulator.control();
                for (object, pod) in objects.into_iter().zip(pods) {
                    control.create(object).expect("create pod");
                    control
                        .set_pod_phase(pod.ns, pod.name, "Running")
                        .expect("running");
                    let object = control
                        .set_pod_ready(pod.ns, pod.name, true)
                        .expect("ready");
                    ready.push(serde_json::from_value(object).expect("pod"));
                }
            }
            ClusterBackend::Real(_) => {
                for (object, pod) in objects.into_iter().zip(pods) {
                    let api: Api<Pod> = Api::namespaced(self.client.clone(), pod.ns);
                    let object: Pod = serde_json::from_value(object).expect("pod");
                    api.create(&PostParams::default(), &object)
                        .await
                        .unwrap_or_else(|e| panic!("create pod {}: {e}", pod.name));
                }
                for pod in pods {
                    let api: Api<Pod> = Api::namespaced(self.client.clone(), pod.ns);
                    let object = eventually(
                        Duration::from_secs(60),
                        &format!("{} scheduled, Running and Ready", pod.name),
                        || async {
                            let object = api.get(pod.name).await.ok()?;
                            is_ready(&object).then_some(object)
                        },
                    )
                    .await;
                    ready.push(object);
                }
            }
        }
        ready
    }

    /// Sets a pod's `Ready` (and `ContainersReady`) condition as its kubelet does when the
    /// readiness probe fails or passes again: through the status subresource on the real lane
    /// (kwok leaves a running pod's conditions to whoever writes them), the emulator's hook
    /// otherwise. Not for clusters whose emulated kubelet runs (it would undo it).
    pub(crate) async fn set_pod_ready(&self, name: &str, ready: bool) {
        match &self.backend {
            ClusterBackend::Emulator(emulator) => {
                emulator
                    .control()
                    .set_pod_ready(NS, name, ready)
                    .expect("set readiness");
            }
            ClusterBackend::Real(_) => {
                let status = if ready { "True" } else { "False" };
                let patch = json!({"status": {"conditions": conditions(status)}});
                self.pods()
                    .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
                    .await
                    .unwrap_or_else(|e| panic!("set {name} Ready={status}: {e}"));
            }
        }
    }

    /// The pod fails for good (`status.phase: Failed`, not Ready), as its kubelet reports a
    /// container that exited and will not restart.
    pub(crate) async fn fail_pod(&self, name: &str) {
        match &self.backend {
            ClusterBackend::Emulator(emulator) => {
                emulator
                    .control()
                    .set_pod_phase(NS, name, "Failed")
                    .expect("fail");
            }
            ClusterBackend::Real(_) => {
                let patch = json!({"status": {"phase": "Failed",
                                              "conditions": conditions("False")}});
                self.pods()
                    .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
                    .await
                    .unwrap_or_else(|e| panic!("fail {name}: {e}"));
            }
        }
    }

    /// Creates namespace `name` (on the real lane: one of the namespaces reset between tests).
    pub(crate) async fn ensure_namespace(&self, name: &str) {
        match &self.backend {
            ClusterBackend::Emulator(emulator) => {
                emulator
                    .control()
                    .create(json!({"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": name}}))
                    .expect("create namespace");
            }
            ClusterBackend::Real(_) => crate::backend::ensure_namespace(&self.client, name).await,
        }
    }

    /// Starts a graceful deletion (deletionTimestamp; removed after its 1 s grace period).
    pub(crate) async fn delete_pod(&self, name: &str) {
        self.pods()
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete pod");
    }

    /// Names of pods that are Ready and not terminating.
    pub(crate) async fn ready_workers(&self) -> BTreeSet<String> {
        let pods = self
            .pods()
            .list(&Default::default())
            .await
            .expect("list pods");
        pods.items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| is_ready(p))
            .map(kube::ResourceExt::name_any)
            .collect()
    }

    pub(crate) async fn policy_condition(
        &self,
        policy: &str,
        type_: &str,
    ) -> Option<(String, String)> {
        let policy = self.policies().get(policy).await.ok()?;
        let status = policy.status?;
        let c = status.conditions.into_iter().find(|c| c.type_ == type_)?;
        Some((c.status, c.reason))
    }
}

/// A pod's `Ready` and `ContainersReady` conditions with this status, as a kubelet writes them.
fn conditions(status: &str) -> Value {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let reason = if status == "True" {
        ""
    } else {
        "ContainersNotReady"
    };
    json!([
        {"type": "Ready", "status": status, "reason": reason, "lastTransitionTime": now},
        {"type": "ContainersReady", "status": status, "reason": reason, "lastTransitionTime": now},
    ])
}

/// A worker pod the test makes by hand, as a workload controller would
/// ([`Cluster::ready_pods`]).
pub(crate) struct WorkerPod<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    /// `app` names the workload; ReplicaSet owners add `pod-template-hash`.
    pub labels: Value,
    pub annotations: Value,
    /// `(kind, name)` of its controller: `ReplicaSet` or `StatefulSet`.
    pub owner: Option<(&'a str, &'a str)>,
}

impl<'a> WorkerPod<'a> {
    /// A bare pod `name` labelled `app=<app>` in namespace `apps`.
    pub(crate) fn new(name: &'a str, app: &str) -> Self {
        Self {
            ns: NS,
            name,
            labels: json!({"app": app}),
            annotations: json!({}),
            owner: None,
        }
    }

    pub(crate) fn in_namespace(self, ns: &'a str) -> Self {
        Self { ns, ..self }
    }

    pub(crate) fn labels(self, labels: Value) -> Self {
        Self { labels, ..self }
    }

    pub(crate) fn annotations(self, annotations: Value) -> Self {
        Self {
            annotations,
            ..self
        }
    }
}

/// Whether a pod's Ready condition is True.
pub(crate) fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// `GET path` on `addr` (HTTP/1.0): the status code and body, `None` when nothing answers.
pub(crate) async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut raw))
        .await
        .ok()?
        .ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// How many sessions [`Stores::seed`] writes at a time. Each write holds one of the test
/// store's pooled Postgres connections, and the pool opens one per concurrent write: the tests,
/// their operators and whatever else shares the server must stay below its `max_connections`
/// (100 by default). Past it sqlx retries "too many clients" until its acquire timeout, and the
/// operator then reports a pool whose connections all "stayed busy".
const SEED_CONCURRENCY: usize = 8;

/// A pool of at most `max` connections to `DATABASE_URL`, for a test's own SQL.
pub(crate) async fn pg_pool(max: u32) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .connect(&pg_url())
        .await
        .expect("connect to Postgres")
}

/// Real Postgres + Redis under a schema and prefix of their own, and the test's own layered
/// store over them (a proxy's view).
pub(crate) struct Stores {
    pub schema: PgSchema,
    pub prefix: RedisPrefix,
    pub store: Arc<LayeredStore>,
}

impl Stores {
    pub(crate) async fn new() -> Self {
        Self::at(&pg_url(), &redis_url()).await
    }

    /// The same over other servers (the fault suite's own instances).
    pub(crate) async fn at(pg: &str, redis: &str) -> Self {
        let schema = PgSchema::new().await;
        let prefix = RedisPrefix::new();
        let options = StoreOptions::default();
        let primary = Arc::new(schema.store_at(pg, options.clone()).await);
        let cache = Arc::new(prefix.store_at(redis, options.clone(), false).await);
        let store = Arc::new(LayeredStore::new(cache, primary, options).expect("layered store"));
        Self {
            schema,
            prefix,
            store,
        }
    }

    /// Creates `per_worker` sessions on each worker ([`SEED_CONCURRENCY`] writes at a time);
    /// returns how many.
    pub(crate) async fn seed(&self, workers: &[String], per_worker: usize) -> u64 {
        let ids: Vec<(String, String)> = workers
            .iter()
            .flat_map(|w| (0..per_worker).map(move |i| (format!("s-{w}-{i}"), w.clone())))
            .collect();
        let n = ids.len() as u64;
        futures::stream::iter(ids)
            .for_each_concurrent(SEED_CONCURRENCY, |(id, w)| {
                let store = self.store.clone();
                async move {
                    store
                        .set(&id, &Entry::new(w, ""))
                        .await
                        .expect("seed a session");
                }
            })
            .await;
        n
    }

    /// Sessions per worker, from the primary (the source of truth).
    pub(crate) async fn counts(&self) -> BTreeMap<String, u64> {
        self.store.counts_by_worker().await.expect("counts")
    }
}

/// A `session-operator run` child process; its JSON log lines are collected.
pub(crate) struct Operator {
    pub identity: String,
    child: Child,
    logs: Arc<Mutex<Vec<Value>>>,
}

pub(crate) struct OperatorConfig<'a> {
    pub identity: &'a str,
    pub lease_duration: &'a str,
    pub extra: Vec<String>,
    /// Other servers than `DATABASE_URL` / `REDIS_URL` (the fault suite's own instances).
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    /// Store flags instead of `--database-url` + `--redis-url` of the shared servers (e.g. a
    /// URL through a proxy, or Redis alone).
    pub store_args: Option<Vec<String>>,
    /// Another kubeconfig than the cluster's (the fault suite's: one naming a proxy in front of
    /// the API server).
    pub kubeconfig: Option<PathBuf>,
}

impl Default for OperatorConfig<'_> {
    fn default() -> Self {
        Self {
            identity: "op-a",
            lease_duration: "4s",
            extra: Vec::new(),
            database_url: None,
            redis_url: None,
            store_args: None,
            kubeconfig: None,
        }
    }
}

impl Operator {
    pub(crate) async fn start(
        cluster: &Cluster,
        stores: &Stores,
        config: OperatorConfig<'_>,
    ) -> Self {
        let (lease_namespace, lease_name) = cluster.lease();
        let mut command = Command::new(env!("CARGO_BIN_EXE_session-operator"));
        let store_args = config.store_args.clone().unwrap_or_else(|| {
            vec![
                "--database-url".into(),
                config.database_url.clone().unwrap_or_else(pg_url),
                "--redis-url".into(),
                config.redis_url.clone().unwrap_or_else(redis_url),
            ]
        });
        command
            .arg("run")
            .args(&store_args)
            .args(["--schema", &stores.schema.name])
            .args(["--redis-prefix", &stores.prefix.prefix])
            .args(["--identity", config.identity])
            .args(["--lease-namespace", &lease_namespace])
            .args(["--lease-name", &lease_name])
            .args(["--lease-duration", config.lease_duration])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--log-format", "json"])
            .args(["--orphan-grace", "1s"])
            .args(["--counts-interval", "1s"])
            .args(&config.extra)
            .env(
                "KUBECONFIG",
                config.kubeconfig.as_ref().unwrap_or(&cluster.kubeconfig),
            )
            .env("RUST_LOG", "info,session_operator=debug")
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn session-operator");
        let logs = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let logs = logs.clone();
            let identity = config.identity.to_string();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if std::env::var_os("E2E_VERBOSE").is_some() {
                        eprintln!("[{identity}] {line}");
                    }
                    let value = serde_json::from_str(&line).unwrap_or(json!({"raw": line}));
                    logs.lock().expect("logs").push(value);
                }
            });
        }
        Self {
            identity: config.identity.to_string(),
            child,
            logs,
        }
    }

    /// Store mutations this operator logged (`mutation` field), in order.
    pub(crate) fn mutations(&self) -> Vec<Value> {
        self.logs
            .lock()
            .expect("logs")
            .iter()
            .filter(|l| l.get("mutation").is_some())
            .cloned()
            .collect()
    }

    pub(crate) fn logged(&self, message: &str) -> bool {
        self.logs
            .lock()
            .expect("logs")
            .iter()
            .any(|l| l.get("message").and_then(Value::as_str) == Some(message))
    }

    /// Log lines with this message.
    pub(crate) fn logs_with_message(&self, message: &str) -> Vec<Value> {
        self.logs
            .lock()
            .expect("logs")
            .iter()
            .filter(|l| l.get("message").and_then(Value::as_str) == Some(message))
            .cloned()
            .collect()
    }

    /// The address of its `/healthz`, `/readyz` and `/metrics` server, once it serves.
    pub(crate) async fn metrics_addr(&self, timeout: Duration) -> String {
        eventually(timeout, "the metrics server to listen", || async {
            self.logs
                .lock()
                .expect("logs")
                .iter()
                .find(|l| {
                    l.get("message").and_then(Value::as_str)
                        == Some("serving /healthz, /readyz and /metrics")
                })
                .and_then(|l| l.get("addr").and_then(Value::as_str).map(String::from))
        })
        .await
    }

    /// Waits until this operator says it became leader.
    pub(crate) async fn wait_leader(&self, timeout: Duration) {
        eventually(
            timeout,
            &format!("{} to become leader", self.identity),
            || async { self.logged("became leader").then_some(()) },
        )
        .await;
    }

    /// SIGKILL: no lease release, no cleanup.
    pub(crate) async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends a signal (`STOP`, `CONT`, …) to the process.
    pub(crate) fn signal(&self, signal: &str) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .status();
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; its exit code.
    pub(crate) async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => None,
        }
    }

    /// SIGTERM, then waits for the exit code.
    pub(crate) async fn terminate(&mut self) -> Option<i32> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => None,
        }
    }
}
