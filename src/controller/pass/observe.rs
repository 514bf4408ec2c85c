//! Observe: what the watched pods and the session store say about one policy.
//!
//! [`pods`] needs no client and no store: it reads the reflector caches, in one scan of the
//! watched pods, with the specs parsed once by the [`PolicyIndex`](super::super::index). Only
//! [`store`] does I/O (two reads; the counts are usually a cached snapshot).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::{Resource, ResourceExt};

use super::super::index::{Indexed, Policies};
use super::super::ownership;
use super::super::workers::{self, Worker};
use super::super::{Context, SessionCounts};
use crate::policy::overlap::Claimant;
use crate::policy::{SessionPolicy, ValidPolicy};
use crate::store::StoreError;
use crate::telemetry::{ErrorKind, StoreOp};

/// The watched pods, as one policy's pass needs them.
#[derive(Debug, Default)]
pub(crate) struct Pods {
    /// The workers of the pods this policy selects and owns.
    pub workers: Vec<Worker>,
    /// Selected, owned pods without a worker id (a missing label or annotation).
    pub missing_id: usize,
    /// Ids of live pods of the namespace this policy does not select (any more), or that
    /// another policy owns: never departures, nor orphans.
    pub unselected: BTreeSet<String>,
    /// Worker ids of the pods of every valid policy (an id no policy holds may be an orphan).
    pub live_ids: BTreeSet<String>,
    /// Worker ids of selected pods another policy owns → that policy's name.
    pub ceded: BTreeMap<String, String>,
    /// The `OverlappingSelector` message, when some selected pods belong to another policy.
    pub overlap: Option<String>,
}

impl Pods {
    /// The ids of this policy's workers.
    pub(super) fn selected(&self) -> BTreeSet<&str> {
        self.workers.iter().map(|w| w.id.as_str()).collect()
    }
}

/// One scan of the watched pods for `policy` (parsed as `valid`); `policies` are all valid
/// policies of the pass.
pub(crate) fn pods(
    ctx: &Context,
    policies: &Policies,
    policy: &SessionPolicy,
    valid: &ValidPolicy,
) -> Pods {
    let namespace = policy.namespace();
    let me = Claimant {
        name: policy.name_any(),
        created: policy.meta().creation_timestamp.as_ref().map(|t| t.0),
        policy: valid.clone(),
    };
    let others: Vec<Claimant> = policies
        .in_namespace(&namespace)
        .iter()
        .filter(|p| p.name != me.name && !p.deleting)
        .map(Indexed::claimant)
        .collect();
    let mut selected = Vec::new();
    let mut unselected = BTreeSet::new();
    let mut live_ids = BTreeSet::new();
    for pod in ctx.all_pods() {
        let pod_namespace = pod.namespace();
        live_ids.extend(
            policies
                .in_namespace(&pod_namespace)
                .iter()
                .filter(|p| p.valid.selects(&pod))
                .filter_map(|p| p.valid.worker_id(&pod)),
        );
        if pod_namespace.is_none() || pod_namespace != namespace {
            continue;
        }
        if valid.selects(&pod) {
            selected.push(pod);
        } else if !departing(&pod)
            && let Some(id) = valid.worker_id(&pod)
        {
            unselected.insert(id);
        }
    }
    from_selected(ctx, &me, &others, valid, selected, unselected, live_ids)
}

/// The ownership split of the selected pods, and their workers.
fn from_selected(
    ctx: &Context,
    me: &Claimant,
    others: &[Claimant],
    valid: &ValidPolicy,
    selected: Vec<Arc<Pod>>,
    mut unselected: BTreeSet<String>,
    live_ids: BTreeSet<String>,
) -> Pods {
    let split = ownership::split(me, others, valid, selected);
    let mut missing_id = 0;
    let workers: Vec<Worker> = split
        .owned
        .iter()
        .filter_map(|p| {
            let w = workers::worker(valid, p, ctx.observations.of(p));
            missing_id += usize::from(w.is_none());
            w
        })
        .collect();
    unselected.extend(split.ceded_live);
    for w in &workers {
        unselected.remove(&w.id);
    }
    Pods {
        workers,
        missing_id,
        unselected,
        live_ids,
        ceded: split.ceded,
        overlap: split.message,
    }
}

fn departing(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some() || workers::is_finished(pod)
}

/// What the session store says: which workers hold sessions, and (at a slower cadence) how
/// many each.
#[derive(Debug)]
pub(crate) struct StoreFacts {
    pub with_sessions: BTreeSet<String>,
    pub counts: SessionCounts,
}

/// Reads the store. An error makes the pass report `StoreUnavailable` and nothing else.
pub(crate) async fn store(ctx: &Arc<Context>) -> Result<StoreFacts, StoreError> {
    let started = Instant::now();
    let with_sessions = ctx.store.workers_with_sessions().await;
    ctx.metrics
        .observe_store(StoreOp::WorkersWithSessions, started.elapsed());
    let with_sessions = with_sessions?;
    let counts = session_counts(ctx).await?;
    ctx.health.store_ok.store(true, Ordering::Relaxed);
    Ok(StoreFacts {
        with_sessions,
        counts,
    })
}

/// Session counts of all workers. A full count costs O(sessions), so it never delays a pass:
/// once a snapshot exists, passes use it and a stale one is refreshed in the background.
async fn session_counts(ctx: &Arc<Context>) -> Result<SessionCounts, StoreError> {
    let snapshot = ctx
        .counts
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    match snapshot {
        Some((at, counts)) => {
            if at.elapsed() >= ctx.settings.counts_interval
                && !ctx.counts_refreshing.swap(true, Ordering::AcqRel)
            {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = refresh_counts(&ctx).await {
                        ctx.metrics.error(ErrorKind::Store);
                        tracing::warn!(error = %e, "refreshing session counts failed");
                    }
                    ctx.counts_refreshing.store(false, Ordering::Release);
                });
            }
            Ok(counts)
        }
        None => refresh_counts(ctx).await,
    }
}

async fn refresh_counts(ctx: &Context) -> Result<SessionCounts, StoreError> {
    let started = Instant::now();
    let counts = ctx.store.counts_by_worker().await;
    ctx.metrics
        .observe_store(StoreOp::CountsByWorker, started.elapsed());
    let counts = Arc::new(counts?);
    *ctx.counts
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) =
        Some((Instant::now(), counts.clone()));
    Ok(counts)
}

/// The Redis cache as the operator sees it (with a layered store only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CacheView {
    /// The last cache error, while the cache fails.
    pub error: Option<String>,
    /// Cache entries that await repair.
    pub pending_repairs: u64,
}

/// The cache's state now; `None` without a cache layer.
pub(crate) fn cache(ctx: &Context) -> Option<CacheView> {
    let layered = ctx.layered.as_ref()?;
    Some(CacheView {
        error: layered.cache_error(),
        pending_repairs: layered.stats().pending_repairs,
    })
}
