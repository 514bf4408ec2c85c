//! The SessionPolicy controller: watches policies and worker pods, and per policy plans and
//! executes session migrations, idle sweeps, pod deletion costs and status.
//!
//! - [`workers`] — the planner's view of a pod;
//! - [`planner`] — the pure decision logic;
//! - `reconcile` — one pass over a policy (I/O at the edges of the planner);
//! - [`status`] — conditions.

pub mod planner;
mod reconcile;
pub mod status;
pub mod workers;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store as Reader};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::leader::Fence;
use crate::policy::{SessionPolicy, ValidPolicy};
use crate::store::{LayeredStore, Store};
use crate::telemetry::{Health, Metrics};

pub use reconcile::PolicyState;

/// A policy object that may have failed to deserialize (it then gets `Ready=False`).
pub type GuardedPolicy = DeserializeGuard<SessionPolicy>;

/// The session store the operator mutates, and the layered store behind it when Redis caches
/// Postgres (migrations are re-applied to its cache after a delay).
#[derive(Clone)]
pub struct SessionStore {
    pub store: Arc<dyn Store>,
    pub layered: Option<Arc<LayeredStore>>,
}

impl SessionStore {
    /// A store without a cache layer.
    pub fn plain(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            layered: None,
        }
    }
}

/// Session counts of all workers, shared by the passes of every policy.
pub type SessionCounts = Arc<BTreeMap<String, u64>>;

/// Operator-wide settings of the controller.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// How long an unknown worker id must hold sessions without a pod before it counts as
    /// departed (see [`planner::Rules::orphan_grace`]).
    pub orphan_grace: Duration,
    /// How often session counts (status, loads, deletion costs) are refreshed from the store.
    pub counts_interval: Duration,
    /// How many migrations of one pass run concurrently.
    pub migration_concurrency: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            orphan_grace: Duration::from_secs(10),
            counts_interval: Duration::from_secs(10),
            migration_concurrency: 8,
        }
    }
}

/// Shared by every reconciliation.
pub struct Context {
    pub client: Client,
    pub store: Arc<dyn Store>,
    /// The layered store behind `store`, when Redis caches Postgres.
    pub layered: Option<Arc<LayeredStore>>,
    pub pods: Reader<Pod>,
    pub policies: Reader<GuardedPolicy>,
    pub fence: Fence,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub settings: Settings,
    /// Per-policy memory (planner memory, counters, sweep times).
    states: Mutex<HashMap<ObjectRef<GuardedPolicy>, Arc<tokio::sync::Mutex<PolicyState>>>>,
    /// Session counts of all workers, refreshed every `counts_interval`.
    counts: tokio::sync::Mutex<Option<(Instant, SessionCounts)>>,
}

impl Context {
    fn state(&self, key: &ObjectRef<GuardedPolicy>) -> Arc<tokio::sync::Mutex<PolicyState>> {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states.entry(key.clone()).or_default().clone()
    }

    fn forget(&self, key: &ObjectRef<GuardedPolicy>) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states.remove(key);
    }

    /// Drops the memory of policies that no longer exist (deletions are not reconciled).
    fn forget_deleted(&self) {
        let live: std::collections::HashSet<ObjectRef<GuardedPolicy>> = self
            .policies
            .state()
            .iter()
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect();
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states.retain(|key, _| live.contains(key));
    }
}

/// Runs the controller until `shutdown` is cancelled.
pub async fn run(
    client: Client,
    store: SessionStore,
    fence: Fence,
    metrics: Metrics,
    health: Arc<Health>,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let (policies, policy_writer) = reflector::store::<GuardedPolicy>();
    let (pods, pod_writer) = reflector::store::<Pod>();

    let policy_stream = watch_all::<GuardedPolicy>(&client, &settings.namespaces)
        .default_backoff()
        .reflect(policy_writer)
        .applied_objects();
    let pod_stream = watch_all::<Pod>(&client, &settings.namespaces)
        .default_backoff()
        .modify(slim_pod)
        .reflect(pod_writer)
        .touched_objects();

    let reporter = Reporter {
        controller: "session-operator".into(),
        instance: Some(fence.identity().to_string()),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        store: store.store,
        layered: store.layered,
        pods: pods.clone(),
        policies: policies.clone(),
        fence: fence.clone(),
        metrics,
        health: health.clone(),
        settings,
        states: Mutex::default(),
        counts: tokio::sync::Mutex::default(),
    });

    // Readiness: both watches delivered their initial lists.
    tokio::spawn({
        let (pods, policies, health) = (pods.clone(), policies.clone(), health.clone());
        async move {
            if pods.wait_until_ready().await.is_ok() && policies.wait_until_ready().await.is_ok() {
                health
                    .synced
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });

    // A new leader reconciles everything at once.
    let leadership = became_leader(fence.subscribe());

    let mapper_policies = policies.clone();
    Controller::for_stream(policy_stream, policies)
        .watches_stream(pod_stream, move |pod: Pod| {
            policies_selecting(&mapper_policies, &pod)
        })
        .reconcile_all_on(leadership)
        .with_config(controller::Config::default().concurrency(4))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
}

/// One watch stream over the given namespaces (all when empty).
fn watch_all<K>(
    client: &Client,
    namespaces: &[String],
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let config = watcher::Config::default();
    if namespaces.is_empty() {
        watcher(Api::<K>::all(client.clone()), config).boxed()
    } else {
        stream::select_all(
            namespaces.iter().map(|ns| {
                watcher(Api::<K>::namespaced(client.clone(), ns), config.clone()).boxed()
            }),
        )
        .boxed()
    }
}

/// Keeps only what the controller reads from a pod, so a large cluster's pods fit in memory.
fn slim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.spec = None;
    if let Some(status) = pod.status.as_mut() {
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            conditions: status.conditions.take(),
            ..Default::default()
        };
    }
}

/// The policies in the pod's namespace whose selector matches it.
fn policies_selecting(
    policies: &Reader<GuardedPolicy>,
    pod: &Pod,
) -> Vec<ObjectRef<GuardedPolicy>> {
    let namespace = pod.namespace();
    policies
        .state()
        .iter()
        .filter(|p| p.namespace() == namespace)
        .filter(|p| {
            p.0.as_ref()
                .ok()
                .and_then(|policy| ValidPolicy::new(&policy.spec).ok())
                .is_some_and(|valid| valid.selects(pod))
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// A stream that yields whenever this replica becomes leader.
fn became_leader(
    rx: tokio::sync::watch::Receiver<bool>,
) -> impl Stream<Item = ()> + Send + 'static {
    stream::unfold(rx, |mut rx| async move {
        loop {
            rx.changed().await.ok()?;
            if *rx.borrow_and_update() {
                return Some(((), rx));
            }
        }
    })
}
