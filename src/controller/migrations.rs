//! Migrations run as tasks of their own, outside the pass that planned them.
//!
//! A rolling update removes pods in waves; if a pass waited for every migration it planned, a
//! departure seen meanwhile would wait for the whole wave before its own migration could even
//! start. Instead a pass hands each action to a task and returns: the next pass (triggered by
//! the next pod event) plans the new departures while earlier ones are still moving. The
//! planner's memory knows what is in flight, so nothing is planned twice, and each task
//! reports its end to the policy's state ([`PolicyState::record_outcome`], the only way it
//! touches that state) and asks for another pass (status, late sessions,
//! retries).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::planner::{Action, Reason};
use super::state::PolicyState;
use super::{Context, GuardedPolicy};
use crate::leader::NotLeader;
use crate::policy::{SessionPolicy, WorkerIdSource};
use crate::store::{BatchGuard, BatchRun, MigrationStop, StoreError, WorkerMove, migrate_worker};
use crate::telemetry::{ErrorKind, StoreOp};

/// The migrations of every policy.
pub(super) struct Migrations {
    /// At most this many migrations touch the store at once.
    permits: Arc<Semaphore>,
    tasks: TaskTracker,
    /// Cancelled on shutdown: running migrations stop at their next batch boundary.
    stop: CancellationToken,
}

impl Migrations {
    pub(super) fn new(concurrency: usize, stop: CancellationToken) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            tasks: TaskTracker::new(),
            stop,
        }
    }

    /// Waits until every migration task ended; called once the controllers stopped, so that
    /// the Lease is released only when no store mutation can follow (the store's delayed cache
    /// re-applications are waited for by the operator, see `LayeredStore::wait_reapplied`).
    pub(super) async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Starts one task per action. The caller marked them started in the policy's state (which
/// it holds locked, as `handle`); each task reports its outcome there when it ends.
pub(super) fn spawn(
    ctx: &Arc<Context>,
    key: &ObjectRef<GuardedPolicy>,
    handle: &Arc<Mutex<PolicyState>>,
    policy: &SessionPolicy,
    actions: Vec<Action>,
) {
    if actions.is_empty() {
        return;
    }
    let policy = Arc::new(policy.clone());
    for action in actions {
        ctx.migrations.tasks.spawn(run(
            ctx.clone(),
            key.clone(),
            handle.clone(),
            policy.clone(),
            action,
        ));
    }
}

/// Why a migration stopped before its worker held no sessions. Its text is the `failing`
/// message status and the Warning Event show.
#[derive(Debug, thiserror::Error)]
pub(super) enum MigrationError {
    /// Leadership ended (or was never confirmed) between two batches.
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
    #[error("{worker}: shutting down")]
    ShuttingDown { worker: String },
    #[error("{worker}: {source}")]
    Store { worker: String, source: StoreError },
    #[error(
        "{worker}: moved {moved} session(s); {left} left that another transaction holds locked \
         (look for 'idle in transaction' in pg_stat_activity); retrying"
    )]
    Locked {
        worker: String,
        moved: usize,
        left: u64,
    },
}

impl MigrationError {
    /// How the error is counted in `session_operator_errors_total` (a shutdown is not an error).
    pub(super) fn kind(&self) -> Option<ErrorKind> {
        match self {
            MigrationError::NotLeader(_) => Some(ErrorKind::Fenced),
            MigrationError::ShuttingDown { .. } => None,
            MigrationError::Store {
                source: StoreError::Fenced(_),
                ..
            } => Some(ErrorKind::Fenced),
            MigrationError::Store { .. } => Some(ErrorKind::Store),
            MigrationError::Locked { .. } => Some(ErrorKind::Locked),
        }
    }
}

/// One migration task: migrate, record the outcome in the policy's state, queue its Event and
/// ask for another pass.
async fn run(
    ctx: Arc<Context>,
    key: ObjectRef<GuardedPolicy>,
    state: Arc<Mutex<PolicyState>>,
    policy: Arc<SessionPolicy>,
    action: Action,
) {
    let result = match ctx.migrations.permits.clone().acquire_owned().await {
        Ok(_permit) => migrate(&ctx, &policy, &action).await,
        Err(_) => Err(MigrationError::ShuttingDown {
            worker: action.worker().to_string(),
        }),
    };
    let finished = Timestamp::now();
    let failed = result.is_err();
    let result = result.map_err(|e| e.to_string());
    let event = {
        // The pass holds this lock while it reads the store and plans: an outcome is recorded
        // (and counted in the metrics) between passes, never in the middle of one.
        let mut state = state.lock().await;
        state.record_outcome(
            &action,
            result.as_ref().copied().map_err(String::as_str),
            finished,
        );
        match result {
            Ok(moved) => {
                let latency = action.observed_at().duration_until(finished).unsigned_abs();
                ctx.metrics.migration_latency.observe(latency.as_secs_f64());
                success(&ctx, &policy, &action, moved)
            }
            Err(message) => {
                tracing::warn!(worker = action.worker(), error = %message, "migration failed");
                Some(Event {
                    type_: EventType::Warning,
                    reason: "MigrationFailed".into(),
                    note: Some(truncate(&message)),
                    action: "Migrate".into(),
                    secondary: None,
                })
            }
        }
    };
    // Each departed pod is the Event's related object, so that the Recorder keeps one Event
    // (series) per migrated worker instead of folding them all into the first one.
    if let Some(mut event) = event {
        event.secondary = related_pod(&policy, &action);
        ctx.events.publish(&policy, event);
    }
    if failed {
        // Not at once: a store that refuses this migration would be hammered in a loop.
        tokio::select! {
            () = tokio::time::sleep(RETRY_AFTER) => {}
            () = ctx.migrations.stop.cancelled() => return,
        }
    }
    ctx.request_pass(&key);
}

/// How long after a failed migration its policy gets another pass (pod events may bring one
/// sooner).
const RETRY_AFTER: Duration = Duration::from_secs(5);

fn related_pod(policy: &SessionPolicy, action: &Action) -> Option<ObjectReference> {
    (policy.spec.worker_id.from == WorkerIdSource::PodName).then(|| ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(action.worker().to_string()),
        namespace: policy.namespace(),
        ..Default::default()
    })
}

/// One migration, in committed batches ([`crate::store::migrate_worker`]), each behind the
/// fence: a replica whose lease ran out stops between two batches, and so does one that is
/// shutting down (the next leader finishes the migration); the store itself refuses a batch of
/// a superseded epoch (see [`crate::store::Fencing`]). Every committed batch is logged and
/// counted as it commits, so a migration that fails later still accounts for what it changed.
///
/// Rows another transaction holds locked are skipped (`SKIP LOCKED`): a proxy idle in a
/// transaction must not keep the rest of the worker's sessions from moving. When only such
/// rows are left, the migration ends with an error saying how many, and is retried. With a
/// Redis cache, the store re-applies the moved ids to the cache once more a moment later (see
/// [`crate::store::LayeredStore::reapply_migrations_after`]).
async fn migrate(
    ctx: &Context,
    policy: &SessionPolicy,
    action: &Action,
) -> Result<u64, MigrationError> {
    let started = Instant::now();
    let (mv, op) = match action {
        Action::Reroute { from, to, .. } => {
            (WorkerMove::Reroute { from, to }, StoreOp::RerouteWorker)
        }
        Action::Delete { worker, .. } => (WorkerMove::Delete { worker }, StoreOp::DeleteByWorker),
    };
    let guard = Guard {
        ctx,
        policy,
        action,
    };
    let limit = ctx.store.options().batch();
    let run = migrate_worker(
        ctx.store.as_ref(),
        mv,
        BatchRun::skipping_locked(),
        limit,
        &guard,
    )
    .await;
    ctx.metrics.observe_store(op, started.elapsed());
    let worker = || action.worker().to_string();
    let result = match run.outcome {
        Ok(()) => Ok(run.ids.len() as u64),
        Err(MigrationStop::Guard(e)) => Err(e),
        Err(MigrationStop::Store(source)) => Err(MigrationError::Store {
            worker: worker(),
            source,
        }),
        Err(MigrationStop::Locked { left }) => Err(MigrationError::Locked {
            worker: worker(),
            moved: run.ids.len(),
            left,
        }),
    };
    if let Err(e) = &result
        && let Some(kind) = e.kind()
    {
        ctx.metrics.error(kind);
    }
    result
}

/// What lets a migration go on between two batches: this replica leads and is not shutting
/// down. It also logs and counts each committed batch.
struct Guard<'a> {
    ctx: &'a Context,
    policy: &'a SessionPolicy,
    action: &'a Action,
}

impl BatchGuard for Guard<'_> {
    type Stop = MigrationError;

    fn before_batch(&self) -> Result<(), MigrationError> {
        self.ctx.fence.check()?;
        if self.ctx.migrations.stop.is_cancelled() {
            return Err(MigrationError::ShuttingDown {
                worker: self.action.worker().to_string(),
            });
        }
        Ok(())
    }

    fn committed(&self, ids: &[String]) {
        committed(self.ctx, self.policy, self.action, ids.len() as u64);
    }
}

/// Logs (with the identity and epoch that made the mutation) and counts one committed batch.
fn committed(ctx: &Context, policy: &SessionPolicy, action: &Action, n: u64) {
    let identity = ctx.fence.identity();
    let epoch = ctx.fence.epoch();
    let policy = policy.name_any();
    match action {
        Action::Reroute {
            from, to, reason, ..
        } => {
            ctx.metrics.sessions_rerouted.inc_by(n);
            tracing::info!(
                %policy, %identity, epoch, mutation = "reroute_worker", from = %from, to = %to,
                sessions = n, reason = reason.as_str(), "committed a batch of rerouted sessions"
            );
        }
        Action::Delete { worker, reason, .. } => {
            ctx.metrics.sessions_deleted.inc_by(n);
            tracing::info!(
                %policy, %identity, epoch, mutation = "delete_by_worker", worker = %worker,
                sessions = n, reason = reason.as_str(), "committed a batch of deleted sessions"
            );
        }
    }
}

/// Logs (with the identity that made the mutation), counts and describes a migration. A
/// late-session migration is logged at debug level and tallied for a summary instead (see
/// [`super::events`]): `None`.
fn success(ctx: &Context, policy: &SessionPolicy, action: &Action, moved: u64) -> Option<Event> {
    let identity = ctx.fence.identity();
    let policy_name = policy.name_any();
    if let Action::Reroute {
        reason: Reason::LateSessions,
        ..
    }
    | Action::Delete {
        reason: Reason::LateSessions,
        ..
    } = action
    {
        return late_sessions(ctx, policy, action, moved);
    }
    Some(match action {
        Action::Reroute {
            from, to, reason, ..
        } => {
            ctx.metrics.migration("reroute", reason.as_str());
            tracing::info!(
                policy = %policy_name, %identity, migrated = %from, to = %to,
                sessions = moved, reason = reason.as_str(), "rerouted sessions"
            );
            Event {
                type_: EventType::Normal,
                reason: format!("Rerouted{}", reason.as_str()),
                note: Some(truncate(&format!(
                    "moved {moved} session(s) from worker {from} to {to}"
                ))),
                action: "Reroute".into(),
                secondary: None,
            }
        }
        Action::Delete { worker, reason, .. } => {
            ctx.metrics.migration("delete", reason.as_str());
            tracing::info!(
                policy = %policy_name, %identity, migrated = %worker,
                sessions = moved, reason = reason.as_str(), "deleted sessions"
            );
            Event {
                type_: EventType::Normal,
                reason: format!("Deleted{}", reason.as_str()),
                note: Some(truncate(&format!(
                    "deleted {moved} session(s) of departed worker {worker}"
                ))),
                action: "Delete".into(),
                secondary: None,
            }
        }
    })
}

fn late_sessions(
    ctx: &Context,
    policy: &SessionPolicy,
    action: &Action,
    moved: u64,
) -> Option<Event> {
    let identity = ctx.fence.identity();
    let policy_name = policy.name_any();
    let to = match action {
        Action::Reroute { from, to, .. } => {
            ctx.metrics
                .migration("reroute", Reason::LateSessions.as_str());
            tracing::debug!(
                policy = %policy_name, %identity, from = %from, to = %to,
                sessions = moved, reason = "LateSessions", "rerouted sessions"
            );
            Some(to.clone())
        }
        Action::Delete { worker, .. } => {
            ctx.metrics
                .migration("delete", Reason::LateSessions.as_str());
            tracing::debug!(
                policy = %policy_name, %identity, worker = %worker,
                sessions = moved, reason = "LateSessions", "deleted sessions"
            );
            None
        }
    };
    ctx.events.late_sessions(
        policy,
        super::events::LateMigration {
            namespace: policy.namespace().unwrap_or_default(),
            policy: policy_name,
            from: action.worker().to_string(),
            to,
            moved,
            related: related_pod(policy, action),
        },
    );
    None
}

/// Event notes are limited to 1 kB.
pub(super) fn truncate(text: &str) -> String {
    let mut end = text.len().min(1000);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}
