//! One reconciliation of a policy: gather pods and store facts, let the planner decide, start
//! the migrations (only as leader; they run as tasks of their own, each batch behind the
//! fence), then sweeps, deletion costs and status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::migrations;
use super::ownership::{self, Ceded};
use super::planner::{self, Memory, Resolution, Rules};
use super::status::{Cond, MigrationHealth, conditions, policy_sessions};
use super::workers::{self, DELETION_COST_ANNOTATION, Family, Worker};
use super::{Context, GuardedPolicy, SessionCounts};
use crate::leader::Fence;
use crate::policy::{
    IdleSweepRecord, MigrationCounters, SessionPolicy, SessionPolicyStatus, ValidPolicy,
    WorkerCounts, duration,
};
use crate::telemetry::StoreOp;

const FIELD_MANAGER: &str = "session-operator";
/// Requeue at least this often: the pass is level-triggered and cheap.
const RESYNC: Duration = Duration::from_secs(10);

/// What the operator remembers about one policy between passes. Migration tasks record their
/// outcomes here too (see [`super::migrations`]).
#[derive(Debug, Default)]
pub struct PolicyState {
    pub(super) memory: Memory,
    /// Taken from status when this replica becomes leader, then kept here.
    pub(super) counters: Option<MigrationCounters>,
    /// Workers whose last migration failed → the error, until one succeeds.
    pub(super) failing: BTreeMap<String, String>,
    last_idle_sweep: Option<(Instant, IdleSweepRecord)>,
    last_status: Option<(Instant, SessionPolicyStatus)>,
    /// Worker ids of pods another policy owns (see [`ownership`]).
    ceded: Ceded,
    /// Migrations that keep failing or leave sessions behind.
    migration_health: MigrationHealth,
    /// The policy's durable worker records (see [`super::records`]).
    records: super::records::RecordsState,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

pub fn error_policy(_: Arc<GuardedPolicy>, error: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics.error("kube");
    tracing::warn!(%error, "reconcile failed");
    Requeue::requeue(Duration::from_secs(5))
}

pub async fn reconcile(object: Arc<GuardedPolicy>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let key = ObjectRef::from_obj(object.as_ref());
    ctx.forget_deleted();
    let namespace = object.namespace().unwrap_or_default();
    let name = object.name_any();
    if object.meta().deletion_timestamp.is_some() {
        ctx.forget(&key);
        return Ok(Requeue::await_change());
    }
    let policy = match &object.0 {
        Ok(policy) => policy,
        Err(invalid) => {
            let message = format!(
                "the object does not match the SessionPolicy schema: {}",
                invalid.error
            );
            let generation = object.meta().generation;
            return invalid_policy(&ctx, &namespace, &name, generation, None, message).await;
        }
    };
    let valid = match ValidPolicy::new(&policy.spec) {
        Ok(valid) => valid,
        Err(message) => {
            let generation = policy.meta().generation;
            return invalid_policy(&ctx, &namespace, &name, generation, Some(policy), message)
                .await;
        }
    };
    let handle = ctx.state(&key);
    let mut state = handle.lock().await;
    let result = pass(&ctx, &key, &handle, policy, &valid, &mut state).await;
    ctx.metrics.reconciled(result.is_ok());
    result
}

/// A policy the operator cannot act on: `Ready=False, InvalidSpec`, no store mutation. The rest
/// of its status (counters, last sweep) is kept when the object could be read.
async fn invalid_policy(
    ctx: &Context,
    namespace: &str,
    name: &str,
    generation: Option<i64>,
    policy: Option<&SessionPolicy>,
    message: String,
) -> Result<Requeue, Error> {
    ctx.metrics.error("invalid_policy");
    tracing::warn!(%namespace, %name, %message, "invalid SessionPolicy");
    if ctx.fence.is_open() {
        let now = Timestamp::now();
        let previous = policy.map(previous_conditions).unwrap_or(&[]);
        let mut status = policy.and_then(|p| p.status.clone()).unwrap_or_default();
        status.observed_generation = generation;
        status.conditions = conditions(
            &[
                Cond::new("Ready", false, "InvalidSpec", &message),
                Cond::new("Degraded", true, "InvalidSpec", &message),
            ],
            previous,
            generation,
            now,
        );
        let status = json!({
            "apiVersion": "sessions.blockyard.io/v1alpha1",
            "kind": "SessionPolicy",
            "status": status,
        });
        let api: Api<SessionPolicy> = Api::namespaced(ctx.client.clone(), namespace);
        api.patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(status),
        )
        .await?;
    }
    Ok(Requeue::await_change())
}

/// The level-triggered pass over a valid policy.
async fn pass(
    ctx: &Arc<Context>,
    key: &ObjectRef<GuardedPolicy>,
    handle: &Arc<tokio::sync::Mutex<PolicyState>>,
    policy: &SessionPolicy,
    valid: &ValidPolicy,
    state: &mut PolicyState,
) -> Result<Requeue, Error> {
    let namespace = policy.namespace().unwrap_or_default();
    let now = Timestamp::now();
    let leader = ctx.fence.is_open();
    let mut conds: Vec<Cond> = Vec::new();
    let mut degraded: Vec<(&'static str, String)> = Vec::new();

    // Pods of this policy (those it selects and owns), and the worker ids of every policy's
    // pods (for orphan detection).
    let split = ownership::split(ctx, policy, valid, &namespace);
    if let Some(message) = split.message.clone() {
        degraded.push(("OverlappingSelector", message));
    }
    let pods: Vec<Arc<Pod>> = split.owned;
    let mut missing_id = 0;
    let workers: Vec<Worker> = pods
        .iter()
        .filter_map(|p| {
            let w = workers::worker(valid, p, ctx.observations.of(p));
            missing_id += usize::from(w.is_none());
            w
        })
        .collect();
    if missing_id > 0 {
        degraded.push((
            "WorkerIdMissing",
            format!(
                "{missing_id} selected pod(s) lack the label or annotation holding the worker id"
            ),
        ));
    }
    let live_ids = live_worker_ids(ctx);
    // Running pods of the namespace that this policy does not select (any more): their ids
    // are never departures, nor orphans.
    let selected: BTreeSet<&str> = workers.iter().map(|w| w.id.as_str()).collect();
    let unselected: BTreeSet<String> = ctx
        .all_pods()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()) && !valid.selects(p))
        .filter(|p| p.metadata.deletion_timestamp.is_none() && !workers::is_finished(p))
        .filter_map(|p| valid.worker_id(p))
        .chain(split.ceded_live.iter().cloned())
        .filter(|id| !selected.contains(id.as_str()))
        .collect();

    // The store: which workers hold sessions, and (at a slower cadence) how many.
    let started = Instant::now();
    let with_sessions = ctx.store.workers_with_sessions().await;
    ctx.metrics
        .observe_store(StoreOp::WorkersWithSessions, started.elapsed());
    let with_sessions = match with_sessions {
        Ok(ids) => ids,
        Err(e) => return store_unavailable(ctx, policy, state, &workers, e.to_string()).await,
    };
    // Ids of pods another policy owns hold no sessions as far as this policy is concerned: it
    // never plans a departure, late session or orphan of them.
    state.ceded.update(&split.ceded, &selected, &with_sessions);
    let with_sessions: BTreeSet<String> = with_sessions
        .into_iter()
        .filter(|id| !state.ceded.contains(id))
        .collect();
    let counts = match session_counts(ctx).await {
        Ok(counts) => counts,
        Err(e) => return store_unavailable(ctx, policy, state, &workers, e.to_string()).await,
    };
    ctx.health.store_ok.store(true, Ordering::Relaxed);
    super::records::load(ctx, key, &mut state.records, &mut state.memory, leader).await;

    let families: Vec<Family> = workers
        .iter()
        .filter_map(|w| w.family.clone())
        .chain(
            state
                .memory
                .departures
                .values()
                .filter_map(|d| d.family.clone()),
        )
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let orphans: BTreeMap<String, Option<Family>> = with_sessions
        .iter()
        .filter(|id| {
            !live_ids.contains(id.as_str())
                && !unselected.contains(id.as_str())
                && !state.memory.knows(id)
        })
        .filter_map(|id| {
            workers::claims_orphan(valid, &families, id).map(|family| (id.clone(), Some(family)))
        })
        .collect();

    let rules = Rules {
        on_replace: valid.on_replace,
        on_terminate: valid.on_terminate,
        replacement_wait: valid.replacement_wait,
        orphan_grace: ctx.settings.orphan_grace,
    };
    let mut plan = planner::plan(
        &mut state.memory,
        &planner::Input {
            now,
            rules: &rules,
            workers: &workers,
            with_sessions: &with_sessions,
            orphans: &orphans,
            loads: &counts,
            unselected: &unselected,
        },
    );

    tracing::debug!(
        policy = %policy.name_any(),
        workers = workers.len(),
        ready = workers.iter().filter(|w| w.ready).count(),
        with_sessions = with_sessions.len(),
        departures = ?state.memory.departures.keys().collect::<Vec<_>>(),
        actions = ?plan.actions,
        waiting = plan.waiting,
        "planned"
    );
    if !leader {
        // A standby takes the counters from status again when it becomes leader.
        state.counters = None;
    } else if state.counters.is_none() {
        state.counters = Some(
            policy
                .status
                .as_ref()
                .and_then(|s| s.migrations)
                .unwrap_or_default(),
        );
    }
    if leader && !valid.paused {
        let mut actions = std::mem::take(&mut plan.actions);
        actions.retain(|a| !state.ceded.contains(a.worker()));
        migrations::dispatch(ctx, key, handle, &mut state.memory, policy, actions);
    }
    if leader {
        super::records::save(ctx, key, &mut state.records, &state.memory).await;
    }
    // A failure is retried by a later pass; it is over once the worker holds no sessions.
    state
        .failing
        .retain(|worker, _| with_sessions.contains(worker));
    // Migrated workers that hold sessions again or still: late sessions, or rows a migration
    // could not move. Persistent ones (and failures) are reported.
    let lingering: BTreeSet<String> = with_sessions
        .iter()
        .filter(|id| {
            matches!(
                state.memory.resolution(id),
                Some(Resolution::Rerouted { .. } | Resolution::Deleted)
            )
        })
        .cloned()
        .collect();
    state.migration_health.observe(&state.failing, &lingering);
    let trouble = state.migration_health.verdict();
    if let Some(trouble) = &trouble {
        degraded.push((trouble.reason, trouble.message.clone()));
    }
    if plan.stuck_no_ready_worker > 0 {
        degraded.push((
            "NoReadyWorker",
            format!(
                "{} departed worker(s) wait for a Ready worker to take their sessions",
                plan.stuck_no_ready_worker
            ),
        ));
    }

    // Idle sweep, restricted to this policy's workers.
    let mut next_sweep = None;
    if let Some(ttl) = valid.idle_ttl {
        let due = state
            .last_idle_sweep
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= valid.idle_sweep_interval);
        if due && leader && !valid.paused {
            let ids: Vec<String> = workers
                .iter()
                .map(|w| w.id.clone())
                .chain(state.memory.departures.keys().cloned())
                .filter(|id| !state.ceded.contains(id))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            match idle_sweep(ctx, policy, ttl, &ids).await {
                Ok(removed) => {
                    state.last_idle_sweep = Some((
                        Instant::now(),
                        IdleSweepRecord {
                            time: Time(Timestamp::now()),
                            removed,
                        },
                    ));
                }
                Err(e) => degraded.push(("IdleSweepFailed", e)),
            }
        }
        next_sweep = Some(valid.idle_sweep_interval);
    }

    // Deletion costs follow session counts.
    if valid.pod_deletion_cost
        && leader
        && !valid.paused
        && let Err(e) = deletion_costs(ctx, &namespace, &workers, &counts).await
    {
        degraded.push(("DeletionCostFailed", e.to_string()));
    }

    // Status.
    let mut status_held_back = None;
    if leader {
        let worker_counts = worker_counts(&workers);
        // Over every id the policy knows (workers, departures, recent migrations): the count
        // snapshot may predate the last migrations (see `policy_sessions`).
        let sessions = policy_sessions(&counts, |id| {
            (selected.contains(id) || state.memory.knows(id))
                && !state.ceded.contains(id)
                && !unselected.contains(id)
        });
        let ready_message = if valid.paused {
            "paused: no store mutation for this policy".to_string()
        } else {
            format!(
                "{} ready worker(s), {} migration(s) running, {} departure(s) waiting{}",
                worker_counts.ready,
                state.memory.in_flight(),
                plan.waiting,
                trouble
                    .as_ref()
                    .map(|t| format!("; {}", t.message))
                    .unwrap_or_default()
            )
        };
        conds.push(match &trouble {
            // Sessions keep routing to a departed worker: the policy is not doing its job.
            Some(t) if t.persistent && !valid.paused => {
                Cond::new("Ready", false, "MigrationFailing", ready_message)
            }
            _ => Cond::new(
                "Ready",
                true,
                if valid.paused { "Paused" } else { "Reconciled" },
                ready_message,
            ),
        });
        conds.push(Cond::new(
            "StoreAvailable",
            true,
            "StoreReachable",
            "the session store answers",
        ));
        conds.extend(cache_condition(ctx));
        conds.push(match degraded.first() {
            Some((reason, message)) => Cond::new("Degraded", true, reason, message.clone()),
            None => Cond::new("Degraded", false, "AsExpected", ""),
        });
        let status = SessionPolicyStatus {
            observed_generation: policy.meta().generation,
            conditions: conditions(
                &conds,
                previous_conditions(policy),
                policy.meta().generation,
                now,
            ),
            workers: Some(worker_counts),
            sessions: Some(sessions),
            migrations: state.counters,
            last_idle_sweep: state
                .last_idle_sweep
                .as_ref()
                .map(|(_, r)| r.clone())
                .or_else(|| {
                    policy
                        .status
                        .as_ref()
                        .and_then(|s| s.last_idle_sweep.clone())
                }),
        };
        status_held_back = write_status(ctx, policy, state, status).await?;
    }

    let mut requeue = RESYNC;
    if let Some(wait) = status_held_back {
        requeue = requeue.min(wait);
    }
    if let Some(wake) = plan.wake_at {
        let until = now.duration_until(wake).unsigned_abs();
        requeue = requeue.min(until.max(Duration::from_millis(50)));
    }
    if let Some(interval) = next_sweep {
        requeue = requeue.min(interval);
    }
    Ok(Requeue::requeue(requeue))
}

fn worker_counts(workers: &[Worker]) -> WorkerCounts {
    WorkerCounts {
        ready: workers.iter().filter(|w| w.ready).count() as u32,
        terminating: workers.iter().filter(|w| w.departing).count() as u32,
    }
}

/// Worker ids of the pods of every valid policy.
fn live_worker_ids(ctx: &Context) -> BTreeSet<String> {
    let policies: Vec<(Option<String>, ValidPolicy)> = ctx
        .all_policies()
        .iter()
        .filter_map(|p| {
            let policy = p.0.as_ref().ok()?;
            Some((policy.namespace(), ValidPolicy::new(&policy.spec).ok()?))
        })
        .collect();
    ctx.all_pods()
        .iter()
        .flat_map(|pod| {
            policies
                .iter()
                .filter(|(ns, v)| *ns == pod.namespace() && v.selects(pod))
                .filter_map(|(_, v)| v.worker_id(pod))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Session counts of all workers. A full count costs O(sessions), so it never delays a pass:
/// once a snapshot exists, passes use it and a stale one is refreshed in the background.
async fn session_counts(ctx: &Arc<Context>) -> Result<SessionCounts, crate::store::StoreError> {
    let snapshot = ctx.counts.read().unwrap_or_else(|e| e.into_inner()).clone();
    match snapshot {
        Some((at, counts)) => {
            if at.elapsed() >= ctx.settings.counts_interval
                && !ctx.counts_refreshing.swap(true, Ordering::AcqRel)
            {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = refresh_counts(&ctx).await {
                        ctx.metrics.error("store");
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

async fn refresh_counts(ctx: &Context) -> Result<SessionCounts, crate::store::StoreError> {
    let started = Instant::now();
    let counts = ctx.store.counts_by_worker().await;
    ctx.metrics
        .observe_store(StoreOp::CountsByWorker, started.elapsed());
    let counts = Arc::new(counts?);
    *ctx.counts.write().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), counts.clone()));
    Ok(counts)
}

async fn idle_sweep(
    ctx: &Context,
    policy: &SessionPolicy,
    ttl: Duration,
    worker_ids: &[String],
) -> Result<u64, String> {
    let removed = crate::sweep::idle(
        ctx.store.as_ref(),
        &ctx.fence,
        &ctx.metrics,
        ttl,
        worker_ids,
    )
    .await?;
    tracing::info!(
        policy = %policy.name_any(), identity = %ctx.fence.identity(), mutation = "sweep_idle",
        idle_ttl = %duration::format(ttl), workers = worker_ids.len(), sessions = removed,
        "idle sweep"
    );
    if removed > 0 {
        let event = Event {
            type_: EventType::Normal,
            reason: "IdleSweep".into(),
            note: Some(format!(
                "removed {removed} session(s) idle longer than {}",
                duration::format(ttl)
            )),
            action: "Sweep".into(),
            secondary: None,
        };
        ctx.events.publish(policy, event);
    }
    Ok(removed)
}

/// Keeps each worker pod's deletion cost near its session count. Hysteresis: a pod is patched
/// only when its count moved by more than 10% (and at least 2) from the annotated value. A few
/// patches run at a time, so that switching `podDeletionCost` on for a large pool takes seconds.
async fn deletion_costs(
    ctx: &Context,
    namespace: &str,
    workers: &[Worker],
    counts: &BTreeMap<String, u64>,
) -> Result<(), kube::Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let patches: Vec<_> = workers
        .iter()
        .filter(|w| !w.departing)
        .filter_map(|w| {
            let want = counts.get(&w.id).copied().unwrap_or(0).min(i32::MAX as u64) as i64;
            needs_cost_update(w.deletion_cost, want)
                .then(|| patch_cost(api.clone(), ctx.fence.clone(), w.pod.clone(), want))
        })
        .collect();
    let results: Vec<Result<(), kube::Error>> = stream::iter(patches)
        .buffer_unordered(DELETION_COST_PATCHES)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn patch_cost(
    api: Api<Pod>,
    fence: Fence,
    pod: String,
    want: i64,
) -> Result<(), kube::Error> {
    if !fence.is_open() {
        return Ok(());
    }
    let patch = json!({"metadata": {"annotations": {DELETION_COST_ANNOTATION: want.to_string()}}});
    match api
        .patch(&pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // The pod went away meanwhile: nothing to annotate.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletion-cost patches in flight at once.
const DELETION_COST_PATCHES: usize = 8;

/// Whether an annotated cost differs enough from the wanted one to be patched.
pub(crate) fn needs_cost_update(current: Option<i64>, want: i64) -> bool {
    match current {
        None => true,
        Some(current) => {
            let tolerance = (current.abs() / 10).max(1);
            (current - want).abs() > tolerance
        }
    }
}

/// `CacheAvailable`, only with Redis over Postgres: whether the operator can update the Redis
/// cache, and whether entries it could not update still await repair. `StoreAvailable` keeps
/// meaning the primary (Postgres): migrations go on while the cache fails.
fn cache_condition(ctx: &Context) -> Option<Cond> {
    let layered = ctx.layered.as_ref()?;
    let pending = layered.stats().pending_repairs;
    Some(match layered.cache_error() {
        Some(error) => Cond::new(
            "CacheAvailable",
            false,
            "CacheUnreachable",
            format!(
                "the Redis cache fails ({error}); migrations go on in Postgres and {pending} \
                 cache entr(ies) await repair once Redis answers"
            ),
        ),
        None if pending > 0 => Cond::new(
            "CacheAvailable",
            false,
            "CacheRepairPending",
            format!("{pending} cache entr(ies) await repair"),
        ),
        None => Cond::new(
            "CacheAvailable",
            true,
            "CacheReachable",
            "the Redis cache answers",
        ),
    })
}

async fn store_unavailable(
    ctx: &Context,
    policy: &SessionPolicy,
    state: &mut PolicyState,
    workers: &[Worker],
    message: String,
) -> Result<Requeue, Error> {
    ctx.metrics.error("store");
    ctx.health.store_ok.store(false, Ordering::Relaxed);
    tracing::warn!(policy = %policy.name_any(), %message, "session store unavailable");
    if ctx.fence.is_open() {
        let now = Timestamp::now();
        let conds = [
            Cond::new("Ready", false, "StoreUnavailable", &message),
            Cond::new("StoreAvailable", false, "StoreError", &message),
            Cond::new("Degraded", true, "StoreUnavailable", &message),
        ];
        let mut status = policy.status.clone().unwrap_or_default();
        status.observed_generation = policy.meta().generation;
        status.conditions = conditions(
            &conds,
            previous_conditions(policy),
            policy.meta().generation,
            now,
        );
        status.workers = Some(worker_counts(workers));
        write_status(ctx, policy, state, status).await?;
    }
    Ok(Requeue::requeue(Duration::from_secs(5)))
}

fn previous_conditions(
    policy: &SessionPolicy,
) -> &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition] {
    policy
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[])
}

/// Status numbers (counts, counters, messages) are written at most this often; a change of a
/// condition's status or reason, or of the generation, is written at once. During a rollout
/// every finished migration asks for a pass, and each pass would otherwise patch the status.
const STATUS_NUMBERS_EVERY: Duration = Duration::from_secs(2);

/// Applies the status when it changed (ignoring condition timestamps) or a minute passed.
/// Returns how long a change of numbers only was held back (see [`STATUS_NUMBERS_EVERY`]): the
/// caller looks again by then.
async fn write_status(
    ctx: &Context,
    policy: &SessionPolicy,
    state: &mut PolicyState,
    status: SessionPolicyStatus,
) -> Result<Option<Duration>, Error> {
    // Leadership may have ended while the pass ran: a former leader must not overwrite the new
    // one's status.
    if !ctx.fence.is_open() {
        return Ok(None);
    }
    if let Some((at, last)) = &state.last_status {
        if *last == status && at.elapsed() < Duration::from_secs(60) {
            return Ok(None);
        }
        if same_conditions(last, &status) && at.elapsed() < STATUS_NUMBERS_EVERY {
            return Ok(Some(STATUS_NUMBERS_EVERY - at.elapsed()));
        }
    }
    let namespace = policy.namespace().unwrap_or_default();
    let api: Api<SessionPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": "sessions.blockyard.io/v1alpha1",
        "kind": "SessionPolicy",
        "status": status,
    });
    api.patch_status(
        &policy.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    state.last_status = Some((Instant::now(), status));
    Ok(None)
}

/// Whether two statuses agree on the generation and on every condition's status and reason.
fn same_conditions(a: &SessionPolicyStatus, b: &SessionPolicyStatus) -> bool {
    let key = |s: &SessionPolicyStatus| {
        s.conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect::<Vec<_>>()
    };
    a.observed_generation == b.observed_generation && key(a) == key(b)
}

#[cfg(test)]
mod tests {
    use super::{Cond, SessionPolicyStatus, conditions, needs_cost_update, same_conditions};
    use k8s_openapi::jiff::Timestamp;

    fn status(
        generation: i64,
        reason: &'static str,
        message: &str,
        sessions: u64,
    ) -> SessionPolicyStatus {
        SessionPolicyStatus {
            observed_generation: Some(generation),
            conditions: conditions(
                &[Cond::new("Ready", true, reason, message)],
                &[],
                Some(generation),
                Timestamp::now(),
            ),
            sessions: Some(sessions),
            ..Default::default()
        }
    }

    #[test]
    fn only_numbers_and_messages_may_wait_for_the_next_status_write() {
        let base = status(1, "Reconciled", "8 ready worker(s)", 100);
        assert!(same_conditions(
            &base,
            &status(1, "Reconciled", "7 ready worker(s)", 90)
        ));
        assert!(!same_conditions(
            &base,
            &status(1, "Paused", "8 ready worker(s)", 100)
        ));
        assert!(!same_conditions(
            &base,
            &status(2, "Reconciled", "8 ready worker(s)", 100)
        ));
    }

    #[test]
    fn deletion_cost_hysteresis() {
        assert!(needs_cost_update(None, 0));
        assert!(!needs_cost_update(Some(0), 1));
        assert!(needs_cost_update(Some(0), 2));
        assert!(!needs_cost_update(Some(100), 109));
        assert!(needs_cost_update(Some(100), 111));
        assert!(needs_cost_update(Some(100), 0));
    }
}
