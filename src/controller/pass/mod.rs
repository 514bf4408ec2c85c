//! One reconciliation of a policy, as a pipeline of named steps:
//!
//! 1. [`observe`] — the watched pods (no client: the reflector caches, one scan) and the store;
//! 2. [`plan`] — the planner's decisions and the migration verdict (pure);
//! 3. [`act`] — as leader: start the migrations (tasks of their own, each batch behind the
//!    fence), write the worker records, sweep idle sessions, keep deletion costs;
//! 4. [`report`] — the desired status (pure), written by [`writer`], the one status writer.
//!
//! A policy that cannot be acted on (invalid) and a pass the store does not answer end early,
//! each with its own status from `report`, through the same writer.

mod act;
mod observe;
mod plan;
mod report;
mod writer;

pub(super) use observe::Listing;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action as Requeue;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::planner::Plan;
use super::state::PolicyState;
use super::status::policy_sessions;
use super::workers::Worker;
use super::{Context, GuardedPolicy, records};
use crate::policy::{SessionPolicy, WorkerCounts};
use crate::telemetry::ErrorKind;

/// Requeue at least this often: the pass is level-triggered and cheap.
const RESYNC: Duration = Duration::from_secs(10);
/// A pass the store did not answer is retried this soon.
const STORE_RETRY: Duration = Duration::from_secs(5);

/// Why a pass failed (it is retried by [`error_policy`]).
#[derive(Debug, thiserror::Error)]
pub(super) enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// How the failure is counted in `session_operator_errors_total`.
    pub(super) fn kind(&self) -> ErrorKind {
        match self {
            Error::Kube(_) => ErrorKind::Kube,
        }
    }
}

pub(super) fn error_policy(_: Arc<GuardedPolicy>, error: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics.error(error.kind());
    tracing::warn!(%error, "reconcile failed");
    Requeue::requeue(Duration::from_secs(5))
}

pub(super) async fn reconcile(
    object: Arc<GuardedPolicy>,
    ctx: Arc<Context>,
) -> Result<Requeue, Error> {
    let key = ObjectRef::from_obj(object.as_ref());
    ctx.forget_deleted();
    if object.meta().deletion_timestamp.is_some() {
        ctx.forget(&key);
        return Ok(Requeue::await_change());
    }
    let generation = object.meta().generation;
    let policy = match &object.0 {
        Ok(policy) => policy,
        Err(invalid) => {
            let message = format!(
                "the object does not match the SessionPolicy schema: {}",
                invalid.error
            );
            return invalid_policy(&ctx, &object, None, generation, message).await;
        }
    };
    let valid = match ctx.index.parse(policy) {
        Ok(valid) => valid,
        Err(invalid) => {
            return invalid_policy(&ctx, &object, Some(policy), generation, invalid.to_string())
                .await;
        }
    };
    let handle = ctx.state(&key);
    let mut state = handle.lock().await;
    let target = act::Target {
        key: &key,
        handle: &handle,
        policy,
        valid: &valid,
    };
    let (result, cost) = crate::telemetry::measure_pass(pass(&ctx, &target, &mut state)).await;
    ctx.metrics.observe_pass(&cost);
    ctx.metrics.reconciled(result.is_ok());
    result
}

/// A policy the operator cannot act on: `Ready=False, InvalidSpec`, no store mutation.
async fn invalid_policy(
    ctx: &Context,
    object: &GuardedPolicy,
    policy: Option<&SessionPolicy>,
    generation: Option<i64>,
    message: String,
) -> Result<Requeue, Error> {
    let (namespace, name) = (object.namespace().unwrap_or_default(), object.name_any());
    ctx.metrics.error(ErrorKind::InvalidPolicy);
    tracing::warn!(%namespace, %name, %message, "invalid SessionPolicy");
    if ctx.fence.is_open() {
        let status = report::invalid(policy, generation, &message, Timestamp::now());
        writer::write(ctx, &namespace, &name, status, None).await?;
    }
    Ok(Requeue::await_change())
}

/// The level-triggered pass over a valid policy.
async fn pass(
    ctx: &Arc<Context>,
    target: &act::Target<'_>,
    state: &mut PolicyState,
) -> Result<Requeue, Error> {
    let (policy, valid) = (target.policy, target.valid);
    let (namespace, name) = (policy.namespace().unwrap_or_default(), policy.name_any());
    let now = Timestamp::now();
    let leader = ctx.fence.is_open();

    let policies = ctx.index.snapshot(&ctx.all_policies());
    let pods = observe::pods(ctx, &policies, policy, valid);
    let listing = match observe::listing(ctx).await {
        Ok(listing) => listing,
        Err(e) => return store_unavailable(ctx, policy, state, &pods.workers, e.to_string()).await,
    };
    crate::telemetry::awaiting_store(records::load(
        ctx,
        target.key,
        &mut state.records,
        &mut state.memory,
        leader,
    ))
    .await;
    let probe = observe::probe_ids(
        &listing,
        state.memory.tracked_ids().chain(state.ceded.ids()),
        &pods,
    );
    let store = match observe::facts(ctx, &listing, &probe).await {
        Ok(store) => store,
        Err(e) => return store_unavailable(ctx, policy, state, &pods.workers, e.to_string()).await,
    };

    let mut planned = plan::plan(state, valid, &pods, &store, ctx.settings.orphan_grace, now);
    log_plan(
        policy,
        &pods.workers,
        state,
        &planned.plan,
        planned.with_sessions.len(),
    );
    plan::adopt_counters(state, policy, leader);

    let acted = act::act(
        ctx,
        target,
        state,
        &mut planned.plan,
        &pods.workers,
        &store.counts,
        leader,
    )
    .await;

    let mut status_held_back = None;
    if leader {
        let selected = pods.selected();
        // Over every id the policy knows (workers, departures, recent migrations): the count
        // snapshot may predate the last migrations (see `policy_sessions`).
        let sessions = policy_sessions(&store.counts, |id| {
            (selected.contains(id) || state.memory.knows(id))
                && !state.ceded.contains(id)
                && !pods.unselected.contains(id)
        });
        let learned = report::Learned {
            paused: valid.paused,
            workers: worker_counts(&pods.workers),
            sessions,
            in_flight: state.memory.in_flight(),
            waiting: planned.plan.waiting,
            problems: report::Problems {
                overlap: pods.overlap.clone(),
                missing_id: pods.missing_id,
                trouble: planned.trouble.take(),
                stuck_no_ready_worker: planned.plan.stuck_no_ready_worker,
                idle_sweep_failed: acted.idle_sweep_failed.as_ref().map(ToString::to_string),
                deletion_cost_failed: acted.deletion_cost_failed.as_ref().map(ToString::to_string),
            },
            cache: observe::cache(ctx),
            counters: state.counters,
            last_idle_sweep: state.last_idle_sweep.as_ref().map(|(_, r)| r.clone()),
        };
        let status = report::reconciled(policy, &learned, now);
        status_held_back =
            writer::write(ctx, &namespace, &name, status, Some(&mut state.last_status)).await?;
    }
    Ok(Requeue::requeue(requeue_after(
        now,
        &planned.plan,
        status_held_back,
        acted.next_sweep,
    )))
}

/// The next pass: at the latest after [`RESYNC`], sooner when the plan, a held-back status or
/// the idle sweep is due.
fn requeue_after(
    now: Timestamp,
    plan: &Plan,
    status_held_back: Option<Duration>,
    next_sweep: Option<Duration>,
) -> Duration {
    let mut requeue = RESYNC;
    if let Some(wait) = status_held_back {
        requeue = requeue.min(wait);
    }
    if let Some(wake) = plan.wake_at {
        // A wake-up already past (the planner plans none) means soon, not in |past|.
        let until = Duration::try_from(now.duration_until(wake)).unwrap_or_default();
        requeue = requeue.min(until.max(Duration::from_millis(50)));
    }
    if let Some(interval) = next_sweep {
        requeue = requeue.min(interval);
    }
    requeue
}

fn log_plan(
    policy: &SessionPolicy,
    workers: &[Worker],
    state: &PolicyState,
    plan: &Plan,
    with_sessions: usize,
) {
    tracing::debug!(
        policy = %policy.name_any(),
        workers = workers.len(),
        ready = workers.iter().filter(|w| w.ready).count(),
        with_sessions,
        departures = ?state.memory.departures.keys().collect::<Vec<_>>(),
        actions = ?plan.actions,
        waiting = plan.waiting,
        "planned"
    );
}

fn worker_counts(workers: &[Worker]) -> WorkerCounts {
    WorkerCounts {
        ready: workers.iter().filter(|w| w.ready).count() as u32,
        terminating: workers.iter().filter(|w| w.departing).count() as u32,
    }
}

/// The store did not answer: `StoreUnavailable`, and another pass soon.
async fn store_unavailable(
    ctx: &Context,
    policy: &SessionPolicy,
    state: &mut PolicyState,
    workers: &[Worker],
    message: String,
) -> Result<Requeue, Error> {
    ctx.metrics.error(ErrorKind::Store);
    ctx.health.store_ok.store(false, Ordering::Relaxed);
    tracing::warn!(policy = %policy.name_any(), %message, "session store unavailable");
    if ctx.fence.is_open() {
        let (namespace, name) = (policy.namespace().unwrap_or_default(), policy.name_any());
        let status =
            report::store_unavailable(policy, worker_counts(workers), &message, Timestamp::now());
        writer::write(ctx, &namespace, &name, status, Some(&mut state.last_status)).await?;
    }
    Ok(Requeue::requeue(STORE_RETRY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_pass_comes_when_the_first_thing_is_due() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let plan = |wake: Option<&str>| Plan {
            wake_at: wake.map(|w| w.parse().expect("time")),
            ..Default::default()
        };
        assert_eq!(requeue_after(now, &plan(None), None, None), RESYNC);
        assert_eq!(
            requeue_after(now, &plan(Some("2026-01-01T00:00:03Z")), None, None),
            Duration::from_secs(3)
        );
        // A wake-up in the past still waits a little, not a busy loop.
        assert_eq!(
            requeue_after(now, &plan(Some("2025-12-31T23:59:00Z")), None, None),
            Duration::from_millis(50)
        );
        assert_eq!(
            requeue_after(
                now,
                &plan(None),
                Some(Duration::from_millis(700)),
                Some(Duration::from_secs(1))
            ),
            Duration::from_millis(700)
        );
    }
}
