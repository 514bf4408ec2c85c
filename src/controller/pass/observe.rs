//! Observe: what the watched pods and the session store say about one policy.
//!
//! [`pods`] needs no client and no store: it reads the reflector caches, in one scan of the
//! watched pods, with the specs parsed once by the [`PolicyIndex`](super::super::index). Only
//! [`listing`] (a shared snapshot, usually cached) and [`facts`] (one probe of the ids that
//! must be fresh) do I/O.

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
    /// [`Observations::next_seq`](super::super::observe::Observations::next_seq) after the
    /// scan: the planner orders pods that vanish before the next pass by it.
    pub seen_through: u64,
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
    let seen_through = ctx.observations.next_seq();
    Pods {
        seen_through,
        ..from_selected(ctx, &me, &others, valid, selected, unselected, live_ids)
    }
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
        seen_through: 0,
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

/// The store-wide view every policy's passes share, read in the background every
/// `--counts-interval`: the session count of every worker, and every worker holding a session.
/// Both cost O(sessions) or O(workers) (a full `GROUP BY`; a skip scan with one index descent
/// per worker id, 60–70 ms at 10k workers), so no pass waits for them once a first listing
/// exists.
#[derive(Debug)]
pub(crate) struct Listing {
    at: Instant,
    counts: SessionCounts,
    holders: Arc<BTreeSet<String>>,
}

/// The store, as one pass needs it: the shared [`Listing`], then [`facts`] for the ids whose
/// answer must be fresh. An error makes the pass report `StoreUnavailable` and nothing else.
pub(crate) async fn listing(ctx: &Arc<Context>) -> Result<Arc<Listing>, StoreError> {
    let snapshot = ctx
        .listing
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    match snapshot {
        Some(listing) => {
            if listing.at.elapsed() >= ctx.settings.counts_interval
                && !ctx.listing_refreshing.swap(true, Ordering::AcqRel)
            {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = refresh_listing(&ctx).await {
                        ctx.metrics.error(ErrorKind::Store);
                        tracing::warn!(error = %e, "refreshing the session listing failed");
                    }
                    ctx.listing_refreshing.store(false, Ordering::Release);
                });
            }
            Ok(listing)
        }
        None => refresh_listing(ctx).await,
    }
}

async fn refresh_listing(ctx: &Context) -> Result<Arc<Listing>, StoreError> {
    let started = Instant::now();
    let holders = ctx.store.workers_with_sessions().await;
    ctx.metrics
        .observe_store(StoreOp::WorkersWithSessions, started.elapsed());
    let holders = Arc::new(holders?);
    let started = Instant::now();
    let counts = ctx.store.counts_by_worker().await;
    ctx.metrics
        .observe_store(StoreOp::CountsByWorker, started.elapsed());
    let listing = Arc::new(Listing {
        at: Instant::now(),
        counts: Arc::new(counts?),
        holders,
    });
    *ctx.listing
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(listing.clone());
    Ok(listing)
}

/// The ids whose holding this pass must read fresh: every id the policy tracks (`tracked`:
/// its memory, the ids it ceded) or the listing names that no live pod holds — departures,
/// vanished workers, orphans, late sessions — and this policy's departing workers. For a live
/// worker the listing answers: its holding matters only for "least loaded" choices until it
/// departs, and then it is probed.
pub(crate) fn probe_ids<'a>(
    listing: &'a Listing,
    tracked: impl Iterator<Item = &'a str>,
    pods: &'a Pods,
) -> BTreeSet<&'a str> {
    let live = |id: &str| pods.live_ids.contains(id) || pods.unselected.contains(id);
    let mut probe: BTreeSet<&str> = listing
        .holders
        .iter()
        .map(String::as_str)
        .chain(tracked)
        .filter(|id| !live(id))
        .collect();
    probe.extend(
        pods.workers
            .iter()
            .filter(|w| w.departing)
            .map(|w| w.id.as_str()),
    );
    probe
}

/// The pass's one store read: which of the `probe` ids hold sessions (a ping when there are
/// none, so that every pass notices an unreachable store), merged with the listing's answer for
/// every other id.
pub(crate) async fn facts(
    ctx: &Context,
    listing: &Listing,
    probe: &BTreeSet<&str>,
) -> Result<StoreFacts, StoreError> {
    let started = Instant::now();
    let asked: Vec<String> = probe.iter().map(|id| (*id).to_string()).collect();
    let held = if asked.is_empty() {
        ctx.store.ping().await.map(|()| BTreeSet::new())
    } else {
        ctx.store.workers_holding(&asked).await
    };
    ctx.metrics
        .observe_store(StoreOp::WorkersHolding, started.elapsed());
    let mut with_sessions = held?;
    with_sessions.extend(
        listing
            .holders
            .iter()
            .filter(|id| !probe.contains(id.as_str()))
            .cloned(),
    );
    ctx.health.store_ok.store(true, Ordering::Relaxed);
    Ok(StoreFacts {
        with_sessions,
        counts: listing.counts.clone(),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, departing: bool) -> Worker {
        Worker {
            id: id.into(),
            pod: id.into(),
            ready: !departing,
            departing,
            ready_since: None,
            created: None,
            departed_at: None,
            family: None,
            deletion_cost: None,
            observed: None,
            owner: None,
        }
    }

    fn ids(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_pass_probes_what_no_live_pod_holds_and_its_departing_workers() {
        let listing = Listing {
            at: Instant::now(),
            counts: Arc::default(),
            // live-a and leaving hold sessions by the listing, gone-1 is an orphan or vanished
            // worker, other is a live pod this policy does not select.
            holders: Arc::new(ids(&["live-a", "leaving", "gone-1", "other"])),
        };
        let pods = Pods {
            workers: vec![
                worker("live-a", false),
                worker("live-b", false),
                worker("leaving", true),
            ],
            live_ids: ids(&["live-a", "live-b", "leaving"]),
            unselected: ids(&["other"]),
            ..Pods::default()
        };
        // The memory tracks a live worker and one that vanished since the listing was taken.
        let tracked = ["live-b", "vanished"].into_iter();
        let probe = probe_ids(&listing, tracked, &pods);
        assert_eq!(
            probe,
            ["gone-1", "leaving", "vanished"]
                .into_iter()
                .collect::<BTreeSet<&str>>()
        );
    }

    #[test]
    fn nothing_to_probe_when_every_holder_is_a_live_worker() {
        let listing = Listing {
            at: Instant::now(),
            counts: Arc::default(),
            holders: Arc::new(ids(&["a", "b"])),
        };
        let pods = Pods {
            workers: vec![worker("a", false), worker("b", false)],
            live_ids: ids(&["a", "b"]),
            ..Pods::default()
        };
        assert!(probe_ids(&listing, ["a", "b"].into_iter(), &pods).is_empty());
    }
}
