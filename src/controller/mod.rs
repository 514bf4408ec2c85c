//! The SessionPolicy controller: watches policies and worker pods, and per policy plans and
//! executes session migrations, idle sweeps, pod deletion costs and status.
//!
//! - `pass` — one pass over a policy, as the pipeline `observe → plan → act → report`, with
//!   one status writer;
//! - `index` — every policy's spec, parsed once per generation;
//! - `state` — what the operator remembers per policy, and the one way migrations change it;
//! - [`workers`] — the planner's view of a pod;
//! - [`planner`] — the pure decision logic;
//! - `migrations` — the planned actions, each a task of its own;
//! - `events` — Kubernetes Events, published by one background task;
//! - [`status`] — conditions and their reasons, the session count, migration health;
//! - `ownership` — pods selected by several policies belong to one;
//! - `records` — the durable memory of each policy's workers;
//! - [`observe`] — what the watch streams say beyond the objects (readiness, pod order).
//!
//! Dependencies point one way: `pass` uses `state`, `migrations`, `records` and the pure
//! modules; `migrations` uses `state` only to report outcomes.

mod events;
mod index;
mod migrations;
pub(crate) mod observe;
mod ownership;
mod pass;
pub(crate) mod planner;
mod records;
mod state;
pub(crate) mod status;
pub(crate) mod workers;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{self, ObjectRef, Store as Reader};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use events::Events;
use migrations::Migrations;
use pass::Listing;

use crate::connect::Connected;
use crate::leader::Fence;
use crate::policy::SessionPolicy;
use crate::store::{LayeredStore, Store, WorkerRecords};
use crate::telemetry::{ErrorKind, Health, Metrics, PolicySnapshot};

pub(crate) use state::PolicyState;

/// A policy object that may have failed to deserialize (it then gets `Ready=False`).
pub(crate) type GuardedPolicy = DeserializeGuard<SessionPolicy>;

/// Session counts of all workers, shared by the passes of every policy.
pub(crate) type SessionCounts = Arc<BTreeMap<String, u64>>;

/// Operator-wide settings of the controller.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// How long an unknown worker id must hold sessions without a pod before it counts as
    /// departed (see [`planner::Rules::orphan_grace`]).
    pub orphan_grace: Duration,
    /// How often session counts (status, loads, deletion costs) are refreshed from the store.
    pub counts_interval: Duration,
    /// How many migrations (of all policies) run concurrently.
    pub migration_concurrency: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            orphan_grace: Duration::from_secs(10),
            counts_interval: Duration::from_secs(10),
            migration_concurrency: 16,
        }
    }
}

/// Shared by every reconciliation.
pub(crate) struct Context {
    pub client: Client,
    pub store: Arc<dyn Store>,
    /// The layered store behind `store`, when Redis caches Postgres.
    pub layered: Option<Arc<LayeredStore>>,
    /// The durable memory of each policy's workers; written only through [`records::persist`].
    records: Arc<dyn WorkerRecords>,
    /// One reader per watched scope (a namespace, or all).
    pods: Vec<Reader<Pod>>,
    policies: Vec<Reader<GuardedPolicy>>,
    /// Every policy's spec, parsed once per generation (shared with the pod-event mappers).
    index: Arc<index::PolicyIndex>,
    /// In which order the pod watches first showed each pod (see [`observe`]).
    pub observations: Arc<observe::Observations>,
    pub fence: Fence,
    events: Events,
    migrations: Migrations,
    /// Per watched scope, the way to ask its Controller for another pass over a policy.
    triggers: Vec<(
        Option<String>,
        mpsc::UnboundedSender<ObjectRef<GuardedPolicy>>,
    )>,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub settings: Settings,
    /// Per-policy memory (planner memory, counters, sweep times).
    states: Mutex<HashMap<ObjectRef<GuardedPolicy>, Arc<tokio::sync::Mutex<PolicyState>>>>,
    /// The store-wide listing (session counts, workers holding sessions), refreshed every
    /// `counts_interval` in the background (see [`pass`]'s observe step).
    listing: std::sync::RwLock<Option<Arc<Listing>>>,
    listing_refreshing: std::sync::atomic::AtomicBool,
}

impl Context {
    fn state(&self, key: &ObjectRef<GuardedPolicy>) -> Arc<tokio::sync::Mutex<PolicyState>> {
        let mut states = self
            .states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        states.entry(key.clone()).or_default().clone()
    }

    fn forget(&self, key: &ObjectRef<GuardedPolicy>) {
        let mut states = self
            .states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        states.remove(key);
    }

    /// Every cached pod of every watched scope.
    pub(crate) fn all_pods(&self) -> Vec<Arc<Pod>> {
        self.pods.iter().flat_map(Reader::state).collect()
    }

    /// Every cached policy of every watched scope.
    pub(crate) fn all_policies(&self) -> Vec<Arc<GuardedPolicy>> {
        self.policies.iter().flat_map(Reader::state).collect()
    }

    /// Asks for another pass over a policy (one of its migrations ended).
    fn request_pass(&self, key: &ObjectRef<GuardedPolicy>) {
        for (scope, trigger) in &self.triggers {
            if scope.is_none() || *scope == key.namespace {
                // The receiver is gone only when the controller stopped.
                let _ = trigger.send(key.clone());
            }
        }
    }

    /// Drops the memory of policies that no longer exist (deletions are not reconciled).
    fn forget_deleted(&self) {
        let live: std::collections::HashSet<ObjectRef<GuardedPolicy>> = self
            .all_policies()
            .iter()
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect();
        let mut states = self
            .states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        states.retain(|key, _| live.contains(key));
    }
}

/// Runs the controller until `shutdown` is cancelled.
pub(crate) async fn run(
    client: Client,
    store: Connected,
    fence: Fence,
    metrics: Metrics,
    health: Arc<Health>,
    settings: Settings,
    shutdown: CancellationToken,
) {
    // One scope per watched namespace (or one for all): a reflector mixes up the initial lists
    // of several merged watches, so each scope gets its own readers and its own Controller,
    // all sharing one Context.
    let namespaces: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    let mut scopes = Vec::new();
    let mut triggers = Vec::new();
    for namespace in namespaces {
        let (tx, requests) = mpsc::unbounded_channel();
        triggers.push((namespace.clone(), tx));
        scopes.push(Scope {
            namespace,
            policies: reflector::store::<GuardedPolicy>(),
            pods: reflector::store::<Pod>(),
            requests,
        });
    }
    let policies: Vec<Reader<GuardedPolicy>> =
        scopes.iter().map(|s| s.policies.0.clone()).collect();
    // session_operator_policy_* are read from these readers at scrape time.
    metrics.policies.set({
        let policies = policies.clone();
        move || {
            policies
                .iter()
                .flat_map(Reader::state)
                .filter_map(|p| p.0.as_ref().ok().and_then(PolicySnapshot::of))
                .collect()
        }
    });
    let reporter = Reporter {
        controller: "session-operator".into(),
        instance: Some(fence.identity().to_string()),
    };
    let ctx = Arc::new(Context {
        events: Events::spawn(
            Recorder::new(client.clone(), reporter),
            fence.clone(),
            metrics.clone(),
        ),
        migrations: Migrations::new(settings.migration_concurrency, shutdown.clone()),
        triggers,
        client,
        store: store.store,
        layered: store.layered,
        records: store.records,
        pods: scopes.iter().map(|s| s.pods.0.clone()).collect(),
        policies,
        index: Arc::default(),
        observations: Arc::default(),
        fence,
        metrics,
        health,
        settings,
        states: Mutex::default(),
        listing: std::sync::RwLock::default(),
        listing_refreshing: std::sync::atomic::AtomicBool::new(false),
    });

    // Readiness: every watch stream delivered its initial list (its own InitDone event), and
    // the store answers (see `probe_store`).
    tokio::spawn(probe_store(ctx.clone(), shutdown.clone()));
    let synced = Arc::new(observe::Synced::new(scopes.len() * 2));
    let controllers = scopes
        .into_iter()
        .enumerate()
        .map(|(index, scope)| scope_controller(&ctx, index, scope, &synced, &shutdown))
        .collect::<Vec<_>>();
    futures::future::join_all(controllers).await;
    ctx.migrations.wait().await;
}

/// One watched scope: its readers and writers, and the requests for another pass.
struct Scope {
    namespace: Option<String>,
    policies: (Reader<GuardedPolicy>, Writer<GuardedPolicy>),
    pods: (Reader<Pod>, Writer<Pod>),
    requests: mpsc::UnboundedReceiver<ObjectRef<GuardedPolicy>>,
}

/// The Controller of scope number `index`: its watches (streams `2 * index` and
/// `2 * index + 1` for readiness), run until `shutdown`.
fn scope_controller(
    ctx: &Arc<Context>,
    index: usize,
    scope: Scope,
    synced: &Arc<observe::Synced>,
    shutdown: &CancellationToken,
) -> impl std::future::Future<Output = ()> + use<> {
    let Scope {
        namespace,
        policies: (policy_reader, policy_writer),
        pods: (_, pod_writer),
        requests,
    } = scope;
    let client = &ctx.client;
    let policy_stream = watcher(
        scoped_api::<GuardedPolicy>(client, &namespace),
        Default::default(),
    )
    .default_backoff()
    .reflect(policy_writer)
    .inspect_ok(mark_synced(synced, &ctx.health, 2 * index))
    .applied_objects();
    let observations = ctx.observations.clone();
    let pod_stream = watcher(scoped_api::<Pod>(client, &namespace), Default::default())
        .default_backoff()
        .modify(slim_pod)
        // Before the reflector: a pass that sees the pod sees its observation.
        .inspect_ok(move |event| observations.record(event))
        .reflect(pod_writer)
        .inspect_ok(mark_synced(synced, &ctx.health, 2 * index + 1))
        .touched_objects();
    let (mapper_policies, mapper_index) = (policy_reader.clone(), ctx.index.clone());
    let requests = stream::unfold(requests, |mut rx| async move {
        rx.recv().await.map(|key| (key, rx))
    });
    let shutdown = shutdown.clone();
    Controller::for_stream(policy_stream, policy_reader)
        .watches_stream(pod_stream, move |pod: Pod| {
            policies_selecting(&mapper_policies, &mapper_index, &pod)
        })
        // A new leader reconciles everything at once.
        .reconcile_all_on(became_leader(ctx.fence.subscribe()))
        .reconcile_on(requests)
        .with_config(controller::Config::default().concurrency(4))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(pass::reconcile, pass::error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        })
}

/// Marks watch stream `index` synced at its `InitDone`; the operator is synced once all are.
fn mark_synced<K>(
    synced: &Arc<observe::Synced>,
    health: &Arc<Health>,
    index: usize,
) -> impl FnMut(&watcher::Event<K>) + Send + 'static {
    let (synced, health) = (synced.clone(), health.clone());
    move |event| {
        if synced.mark(index, matches!(event, watcher::Event::InitDone)) {
            health
                .synced
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// How often the store is probed for `/readyz` (passes report failures sooner).
const STORE_PROBE_EVERY: Duration = Duration::from_secs(2);

/// Keeps `/readyz`'s "store reachable" true to the store even when no policy exists (passes,
/// which also report it, run only for policies): one primary-key lookup every
/// [`STORE_PROBE_EVERY`].
async fn probe_store(ctx: Arc<Context>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(STORE_PROBE_EVERY) => {}
        }
        let ok = match tokio::time::timeout(STORE_PROBE_EVERY * 5, ctx.store.get(PROBE_ID)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "store probe failed");
                false
            }
            Err(_) => {
                tracing::debug!("store probe timed out");
                false
            }
        };
        let was = ctx
            .health
            .store_ok
            .swap(ok, std::sync::atomic::Ordering::Relaxed);
        if was != ok {
            if ok {
                tracing::info!("session store reachable again");
            } else {
                ctx.metrics.error(ErrorKind::Store);
                tracing::warn!("session store unreachable: not ready");
            }
        }
    }
}

/// The session id the store probe looks up (it never exists).
const PROBE_ID: &str = "session-operator-readiness-probe";

/// The API of a namespace, or of all namespaces.
fn scoped_api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
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

/// The policies in the pod's namespace whose selector matches it (specs parsed by `index`).
fn policies_selecting(
    policies: &Reader<GuardedPolicy>,
    index: &index::PolicyIndex,
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
                .and_then(|policy| index.parse(policy).ok())
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
