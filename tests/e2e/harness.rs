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
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
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

    /// Like [`Cluster::start`], with the emulator's workload controllers and kubelet running
    /// (Deployments roll out by themselves, pods turn Ready on their own); emulator only.
    pub(crate) async fn start_with_controllers() -> Self {
        let emulator = Emulator::builder()
            .controllers(kube_emulator::Controllers::all())
            .start()
            .await
            .expect("start the emulator");
        Self::emulated_with(emulator)
    }

    /// Whether this is the real control plane.
    pub(crate) fn is_real(&self) -> bool {
        matches!(self.backend, ClusterBackend::Real(_))
    }

    /// The emulator, for scenarios that use its hooks (crash, flapping readiness, pods with
    /// made-up owners); they run on the emulator backend only.
    pub(crate) fn emulator(&self) -> &Emulator {
        match &self.backend {
            ClusterBackend::Emulator(emulator) => emulator,
            ClusterBackend::Real(_) => panic!(
                "this scenario uses the emulator's hooks and runs with E2E_BACKEND=emulator only; \
                 its real-cluster counterpart is in tests/e2e/workloads.rs"
            ),
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
        let mut metadata = json!({"name": name, "namespace": ns, "labels": {"app": app}});
        if let Some((kind, owner_name)) = owner {
            metadata["ownerReferences"] = json!([{
                "apiVersion": "apps/v1", "kind": kind, "name": owner_name,
                "uid": format!("uid-{owner_name}"), "controller": true,
            }]);
            if kind == "ReplicaSet" {
                let hash = owner_name.rsplit('-').next().unwrap_or_default();
                metadata["labels"]["pod-template-hash"] = json!(hash);
            }
        }
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {"containers": [{"name": "worker", "image": "worker:1"}],
                     "terminationGracePeriodSeconds": 1},
        });
        match &self.backend {
            ClusterBackend::Emulator(emulator) => {
                let control = emulator.control();
                control.create(pod).expect("create pod");
                control.set_pod_phase(ns, name, "Running").expect("running");
                control.set_pod_ready(ns, name, true).expect("ready");
            }
            ClusterBackend::Real(_) => {
                assert!(
                    owner.is_none(),
                    "{name}: a pod with a made-up owner is an emulator shortcut (the real garbage \
                     collector deletes it); real workloads are in tests/e2e/workloads.rs"
                );
                // The scheduler binds it to a kwok node, kwok makes it Running and Ready.
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
                let pod: Pod = serde_json::from_value(pod).expect("pod");
                pods.create(&PostParams::default(), &pod)
                    .await
                    .expect("create pod");
                eventually(
                    Duration::from_secs(60),
                    &format!("{name} Ready"),
                    || async {
                        let pod = pods.get(name).await.ok()?;
                        is_ready(&pod).then_some(())
                    },
                )
                .await;
            }
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
            .map(ResourceExt::name_any)
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

    /// Creates `per_worker` sessions on each worker (32 writes at a time); returns how many.
    pub(crate) async fn seed(&self, workers: &[String], per_worker: usize) -> u64 {
        let ids: Vec<(String, String)> = workers
            .iter()
            .flat_map(|w| (0..per_worker).map(move |i| (format!("s-{w}-{i}"), w.clone())))
            .collect();
        let n = ids.len() as u64;
        futures::stream::iter(ids)
            .for_each_concurrent(32, |(id, w)| {
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
