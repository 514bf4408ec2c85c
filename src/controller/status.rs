//! Conditions of a policy's status, and the numbers and verdicts that must tell the truth:
//! the policy's session count across a rollout, and migrations that keep failing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The reasons of the `Ready` condition. **Declaration order is priority**: when several
/// apply, the first one is shown (docs/operator.md, "Conditions and their priority").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ReadyReason {
    /// The spec cannot be acted on; nothing else is looked at.
    InvalidSpec,
    /// The session store could not be read: the pass learned nothing.
    StoreUnavailable,
    /// `spec.paused`: nothing is mutated, so no migration can be failing on purpose.
    Paused,
    /// A departed worker's migration kept failing (or kept leaving sessions) for
    /// [`PERSISTENT`] or more.
    MigrationFailing,
    /// The last pass succeeded.
    Reconciled,
}

impl ReadyReason {
    /// The condition's `reason` string.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ReadyReason::InvalidSpec => "InvalidSpec",
            ReadyReason::StoreUnavailable => "StoreUnavailable",
            ReadyReason::Paused => "Paused",
            ReadyReason::MigrationFailing => "MigrationFailing",
            ReadyReason::Reconciled => "Reconciled",
        }
    }

    /// The condition's status with this reason.
    pub(crate) fn is_ready(self) -> bool {
        matches!(self, ReadyReason::Paused | ReadyReason::Reconciled)
    }
}

/// The reasons of `Degraded=True`. **Declaration order is priority**: `Degraded` shows one
/// reason at a time, the first that applies; fixing it may reveal the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum DegradedReason {
    InvalidSpec,
    StoreUnavailable,
    /// Some selected pods belong to another policy.
    OverlappingSelector,
    /// Selected pods lack the label or annotation that holds the worker id.
    WorkerIdMissing,
    /// A migration failed (shown at once).
    MigrationFailed,
    /// A migrated worker kept holding sessions for [`PERSISTENT`] or more.
    MigrationIncomplete,
    /// Departed workers wait for a Ready worker to take their sessions.
    NoReadyWorker,
    IdleSweepFailed,
    DeletionCostFailed,
}

impl DegradedReason {
    /// The condition's `reason` string.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DegradedReason::InvalidSpec => "InvalidSpec",
            DegradedReason::StoreUnavailable => "StoreUnavailable",
            DegradedReason::OverlappingSelector => "OverlappingSelector",
            DegradedReason::WorkerIdMissing => "WorkerIdMissing",
            DegradedReason::MigrationFailed => "MigrationFailed",
            DegradedReason::MigrationIncomplete => "MigrationIncomplete",
            DegradedReason::NoReadyWorker => "NoReadyWorker",
            DegradedReason::IdleSweepFailed => "IdleSweepFailed",
            DegradedReason::DeletionCostFailed => "DeletionCostFailed",
        }
    }
}

/// One condition as the reconciler decides it; turned into a `metav1.Condition` that keeps its
/// `lastTransitionTime` while its status does not change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    pub(crate) fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// Builds conditions, carrying `lastTransitionTime` over from `previous` when the status of a
/// condition type did not change.
pub(crate) fn conditions(
    wanted: &[Cond],
    previous: &[Condition],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    wanted
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map_or(Time(now), |p| p.last_transition_time.clone());
            Condition {
                type_: c.type_.to_string(),
                status: status.to_string(),
                reason: c.reason.to_string(),
                message: c.message.clone(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// The policy's sessions in a count snapshot: the sum over the worker ids that `belongs` says
/// are the policy's.
///
/// The snapshot is refreshed every `countsInterval`, so after a migration it still holds the
/// sessions under the departed worker's id and not yet under its replacement's. Summing over
/// the ids the policy knows — its workers, its departures *and* the workers it migrated
/// recently — keeps the total true as of the count (a rollout moves sessions between the
/// policy's own workers), where summing over the current pods alone read 0 after every
/// rollout until the next count.
pub(crate) fn policy_sessions(
    counts: &BTreeMap<String, u64>,
    belongs: impl Fn(&str) -> bool,
) -> u64 {
    counts
        .iter()
        .filter(|(id, _)| belongs(id))
        .map(|(_, n)| *n)
        .sum()
}

/// How long a migration may keep failing (or keep leaving sessions behind) before the policy
/// stops claiming `Ready`: a few retries (one every 5 s) ride out a blip.
pub(crate) const PERSISTENT: Duration = Duration::from_secs(30);

/// Workers whose migration keeps failing or leaves sessions behind, and since when.
#[derive(Debug, Default)]
pub(crate) struct MigrationHealth {
    /// worker → (since, reason, message)
    troubled: BTreeMap<String, (Instant, DegradedReason, String)>,
}

/// What [`MigrationHealth`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Trouble {
    /// `MigrationFailed` or `MigrationIncomplete`.
    pub reason: DegradedReason,
    pub message: String,
    /// Longer than [`PERSISTENT`]: `Ready` is False.
    pub persistent: bool,
}

impl MigrationHealth {
    /// Records one pass: `failing` are workers whose last migration failed (→ the error);
    /// `lingering` are workers the policy migrated that still hold sessions (rows it could not
    /// move, or a proxy still writing for them). A worker in neither is healthy again.
    pub(crate) fn observe(
        &mut self,
        failing: &BTreeMap<String, String>,
        lingering: &BTreeSet<String>,
    ) {
        self.observe_at(Instant::now(), failing, lingering);
    }

    fn observe_at(
        &mut self,
        now: Instant,
        failing: &BTreeMap<String, String>,
        lingering: &BTreeSet<String>,
    ) {
        self.troubled
            .retain(|id, _| failing.contains_key(id) || lingering.contains(id));
        for (id, error) in failing {
            let entry = self.troubled.entry(id.clone()).or_insert((
                now,
                DegradedReason::MigrationFailed,
                String::new(),
            ));
            entry.1 = DegradedReason::MigrationFailed;
            entry.2 = error.clone();
        }
        for id in lingering.iter().filter(|id| !failing.contains_key(*id)) {
            let entry = self.troubled.entry(id.clone()).or_insert((
                now,
                DegradedReason::MigrationIncomplete,
                String::new(),
            ));
            entry.1 = DegradedReason::MigrationIncomplete;
            entry.2 = "still holds sessions after its migration (rows locked by another \
                       transaction, or a proxy still writing for the departed worker); retrying"
                .into();
        }
    }

    /// The longest-standing trouble, with how many workers are in trouble.
    pub(crate) fn verdict(&self) -> Option<Trouble> {
        self.verdict_at(Instant::now())
    }

    fn verdict_at(&self, now: Instant) -> Option<Trouble> {
        // Late sessions come and go during any rollout with lagging proxies: sessions left
        // behind count only once they persist; a failed migration counts at once.
        let shown = |(since, reason, _): &(Instant, DegradedReason, String)| {
            *reason == DegradedReason::MigrationFailed
                || now.saturating_duration_since(*since) >= PERSISTENT
        };
        let count = self.troubled.values().filter(|t| shown(t)).count();
        let (worker, (since, reason, message)) = self
            .troubled
            .iter()
            .filter(|(_, t)| shown(t))
            .min_by_key(|(id, (since, _, _))| (*since, *id))?;
        let age = now.saturating_duration_since(*since);
        Some(Trouble {
            reason: *reason,
            message: format!(
                "{count} worker(s) not fully migrated; worker {worker} for {}s: {message}",
                age.as_secs()
            ),
            persistent: age >= PERSISTENT,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_count_survives_a_rollout_before_the_next_count() {
        // Counted before the rollout: all sessions on the old pods.
        let counts: BTreeMap<String, u64> = [
            ("old-1".to_string(), 40),
            ("old-2".to_string(), 60),
            ("other".to_string(), 7),
        ]
        .into();
        // After it: new pods (not in the snapshot yet), the old ones remembered as migrated.
        let known = ["new-1", "new-2", "old-1", "old-2"];
        assert_eq!(policy_sessions(&counts, |id| known.contains(&id)), 100);
        // Only the current pods: what status said before (0 until the next count).
        assert_eq!(policy_sessions(&counts, |id| id.starts_with("new")), 0);
    }

    #[test]
    fn a_migration_that_keeps_failing_becomes_persistent() {
        let mut health = MigrationHealth::default();
        let t0 = Instant::now();
        let failing: BTreeMap<String, String> =
            [("w-1".to_string(), "w-1: lock timeout".to_string())].into();
        health.observe_at(t0, &failing, &BTreeSet::new());
        let early = health
            .verdict_at(t0 + Duration::from_secs(5))
            .expect("trouble");
        assert_eq!(early.reason, DegradedReason::MigrationFailed);
        assert!(!early.persistent);
        assert!(early.message.contains("worker w-1") && early.message.contains("lock timeout"));
        // Still failing later: persistent. The start time is kept across passes.
        health.observe_at(t0 + Duration::from_secs(20), &failing, &BTreeSet::new());
        let late = health.verdict_at(t0 + PERSISTENT).expect("trouble");
        assert!(late.persistent, "{late:?}");
        // Sessions left behind briefly (late sessions) are not reported.
        let mut fresh = MigrationHealth::default();
        fresh.observe_at(t0, &BTreeMap::new(), &["w-2".to_string()].into());
        assert_eq!(fresh.verdict_at(t0 + Duration::from_secs(5)), None);
        // Failing no more but sessions left behind: incomplete, still since t0.
        let lingering: BTreeSet<String> = ["w-1".to_string()].into();
        health.observe_at(t0 + PERSISTENT, &BTreeMap::new(), &lingering);
        let incomplete = health.verdict_at(t0 + PERSISTENT).expect("trouble");
        assert_eq!(incomplete.reason, DegradedReason::MigrationIncomplete);
        assert!(incomplete.persistent);
        // Done: healthy.
        health.observe_at(t0 + PERSISTENT, &BTreeMap::new(), &BTreeSet::new());
        assert_eq!(health.verdict_at(t0 + PERSISTENT), None);
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let t1: Timestamp = "2026-01-01T00:05:00Z".parse().expect("time");
        let first = conditions(
            &[Cond::new("Ready", true, "Reconciled", "")],
            &[],
            Some(1),
            t0,
        );
        let same = conditions(
            &[Cond::new("Ready", true, "Reconciled", "x")],
            &first,
            Some(2),
            t1,
        );
        assert_eq!(same[0].last_transition_time, Time(t0));
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = conditions(
            &[Cond::new("Ready", false, "StoreUnavailable", "")],
            &same,
            Some(2),
            t1,
        );
        assert_eq!(flipped[0].last_transition_time, Time(t1));
        assert_eq!(flipped[0].status, "False");
    }
}
