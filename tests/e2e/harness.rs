//! The end-to-end harness: an emulated cluster (kube-emulator, in this process), real Postgres
//! and Redis (a schema and a key prefix of their own), and the real `session-operator run`
//! binary as child processes.

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

use crate::common::{PgSchema, RedisPrefix, pg_url, redis_url, unique};

pub const NS: &str = "apps";

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
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

/// An emulated cluster with the SessionPolicy CRD and namespace `apps`.
pub struct Cluster {
    pub emulator: Emulator,
    pub client: Client,
    pub kubeconfig: PathBuf,
}

impl Cluster {
    pub async fn start() -> Self {
        let emulator = Emulator::start().await.expect("start the emulator");
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
            emulator,
            client,
            kubeconfig,
        }
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), NS)
    }

    pub fn policies(&self) -> Api<SessionPolicy> {
        Api::namespaced(self.client.clone(), NS)
    }

    /// Creates a policy from a JSON spec.
    pub async fn apply_policy(&self, name: &str, spec: Value) -> SessionPolicy {
        self.apply_policy_in(NS, name, spec).await
    }

    pub async fn apply_policy_in(&self, ns: &str, name: &str, spec: Value) -> SessionPolicy {
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
    pub async fn ready_pod(&self, name: &str, app: &str, owner: Option<(&str, &str)>) {
        self.ready_pod_in(NS, name, app, owner).await
    }

    pub async fn ready_pod_in(&self, ns: &str, name: &str, app: &str, owner: Option<(&str, &str)>) {
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
        let control = self.emulator.control();
        control.create(pod).expect("create pod");
        control.set_pod_phase(ns, name, "Running").expect("running");
        control.set_pod_ready(ns, name, true).expect("ready");
    }

    /// Starts a graceful deletion (deletionTimestamp; removed after its 1 s grace period).
    pub async fn delete_pod(&self, name: &str) {
        self.pods()
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete pod");
    }

    /// Names of pods that are Ready and not terminating.
    pub async fn ready_workers(&self) -> BTreeSet<String> {
        let pods = self
            .pods()
            .list(&Default::default())
            .await
            .expect("list pods");
        pods.items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .map(|p| p.name_any())
            .collect()
    }

    pub async fn policy_condition(&self, policy: &str, type_: &str) -> Option<(String, String)> {
        let policy = self.policies().get(policy).await.ok()?;
        let status = policy.status?;
        let c = status.conditions.into_iter().find(|c| c.type_ == type_)?;
        Some((c.status, c.reason))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// Real Postgres + Redis under a schema and prefix of their own, and the test's own layered
/// store over them (a proxy's view).
pub struct Stores {
    pub schema: PgSchema,
    pub prefix: RedisPrefix,
    pub store: Arc<LayeredStore>,
}

impl Stores {
    pub async fn new() -> Self {
        let schema = PgSchema::new().await;
        let prefix = RedisPrefix::new();
        let options = StoreOptions::default();
        let primary = Arc::new(schema.store(options.clone()).await);
        let cache = Arc::new(prefix.store(options.clone(), false).await);
        let store = Arc::new(LayeredStore::new(cache, primary, options).expect("layered store"));
        Self {
            schema,
            prefix,
            store,
        }
    }

    /// Creates `per_worker` sessions on each worker (32 writes at a time); returns how many.
    pub async fn seed(&self, workers: &[String], per_worker: usize) -> u64 {
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
    pub async fn counts(&self) -> BTreeMap<String, u64> {
        self.store.counts_by_worker().await.expect("counts")
    }
}

/// A `session-operator run` child process; its JSON log lines are collected.
pub struct Operator {
    pub identity: String,
    child: Child,
    logs: Arc<Mutex<Vec<Value>>>,
}

pub struct OperatorConfig<'a> {
    pub identity: &'a str,
    pub lease_duration: &'a str,
    pub extra: Vec<String>,
}

impl Default for OperatorConfig<'_> {
    fn default() -> Self {
        Self {
            identity: "op-a",
            lease_duration: "4s",
            extra: Vec::new(),
        }
    }
}

impl Operator {
    pub async fn start(cluster: &Cluster, stores: &Stores, config: OperatorConfig<'_>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_session-operator"));
        command
            .arg("run")
            .args(["--database-url", &pg_url()])
            .args(["--redis-url", &redis_url()])
            .args(["--schema", &stores.schema.name])
            .args(["--redis-prefix", &stores.prefix.prefix])
            .args(["--identity", config.identity])
            .args(["--lease-namespace", "default"])
            .args(["--lease-duration", config.lease_duration])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--log-format", "json"])
            .args(["--orphan-grace", "1s"])
            .args(["--counts-interval", "1s"])
            .args(&config.extra)
            .env("KUBECONFIG", &cluster.kubeconfig)
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
    pub fn mutations(&self) -> Vec<Value> {
        self.logs
            .lock()
            .expect("logs")
            .iter()
            .filter(|l| l.get("mutation").is_some())
            .cloned()
            .collect()
    }

    pub fn logged(&self, message: &str) -> bool {
        self.logs
            .lock()
            .expect("logs")
            .iter()
            .any(|l| l.get("message").and_then(Value::as_str) == Some(message))
    }

    /// Waits until this operator says it became leader.
    pub async fn wait_leader(&self, timeout: Duration) {
        eventually(
            timeout,
            &format!("{} to become leader", self.identity),
            || async { self.logged("became leader").then_some(()) },
        )
        .await;
    }

    /// SIGKILL: no lease release, no cleanup.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then waits for the exit code.
    pub async fn terminate(&mut self) -> Option<i32> {
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
