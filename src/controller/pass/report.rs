//! Report: the status a pass wants the policy to show, as a pure function of what the pass
//! learned. Needs no client; [`super::writer`] writes the result.
//!
//! Three kinds of passes end in a status: a valid policy's full pass ([`reconciled`]), a
//! policy the operator cannot act on ([`invalid`]), and a pass the store did not answer
//! ([`store_unavailable`]). `Ready` and `Degraded` show one reason each, the first by the
//! declaration order of [`ReadyReason`] and [`DegradedReason`].

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;

use super::super::status::{Cond, DegradedReason, ReadyReason, Trouble, conditions};
use super::observe::CacheView;
use crate::policy::WorkerCounts;
use crate::policy::{IdleSweepRecord, MigrationCounters, SessionPolicy, SessionPolicyStatus};

/// What is wrong with a pass that did run; each becomes a `Degraded` reason.
#[derive(Debug, Default)]
pub(crate) struct Problems {
    /// The `OverlappingSelector` message.
    pub overlap: Option<String>,
    /// Selected pods without a worker id.
    pub missing_id: usize,
    /// A migration that fails or leaves sessions behind.
    pub trouble: Option<Trouble>,
    /// Departed workers waiting for a Ready worker.
    pub stuck_no_ready_worker: usize,
    pub idle_sweep_failed: Option<String>,
    pub deletion_cost_failed: Option<String>,
}

impl Problems {
    /// Every `Degraded` reason that applies, with its message, by priority.
    pub(super) fn degraded(&self) -> Vec<(DegradedReason, String)> {
        let mut reasons = Vec::new();
        if let Some(message) = &self.overlap {
            reasons.push((DegradedReason::OverlappingSelector, message.clone()));
        }
        if self.missing_id > 0 {
            reasons.push((
                DegradedReason::WorkerIdMissing,
                format!(
                    "{} selected pod(s) lack the label or annotation holding the worker id",
                    self.missing_id
                ),
            ));
        }
        if let Some(trouble) = &self.trouble {
            reasons.push((trouble.reason, trouble.message.clone()));
        }
        if self.stuck_no_ready_worker > 0 {
            reasons.push((
                DegradedReason::NoReadyWorker,
                format!(
                    "{} departed worker(s) wait for a Ready worker to take their sessions",
                    self.stuck_no_ready_worker
                ),
            ));
        }
        if let Some(message) = &self.idle_sweep_failed {
            reasons.push((DegradedReason::IdleSweepFailed, message.clone()));
        }
        if let Some(message) = &self.deletion_cost_failed {
            reasons.push((DegradedReason::DeletionCostFailed, message.clone()));
        }
        reasons.sort_by_key(|(reason, _)| *reason);
        reasons
    }
}

/// What a valid policy's pass learned, as its status reports it.
#[derive(Debug, Default)]
pub(crate) struct Learned {
    pub paused: bool,
    pub workers: WorkerCounts,
    /// The policy's sessions as of the last count.
    pub sessions: u64,
    pub in_flight: usize,
    /// Departures waiting for a replacement or a Ready worker.
    pub waiting: usize,
    pub problems: Problems,
    /// `None` without a cache layer.
    pub cache: Option<CacheView>,
    pub counters: Option<MigrationCounters>,
    /// This replica's last idle sweep, if it swept.
    pub last_idle_sweep: Option<IdleSweepRecord>,
}

/// The status of a valid policy after a pass.
pub(crate) fn reconciled(
    policy: &SessionPolicy,
    learned: &Learned,
    now: Timestamp,
) -> SessionPolicyStatus {
    let trouble = learned.problems.trouble.as_ref();
    let ready_message = if learned.paused {
        "paused: no store mutation for this policy".to_string()
    } else {
        format!(
            "{} ready worker(s), {} migration(s) running, {} departure(s) waiting{}",
            learned.workers.ready,
            learned.in_flight,
            learned.waiting,
            trouble
                .map(|t| format!("; {}", t.message))
                .unwrap_or_default()
        )
    };
    let ready = [
        learned.paused.then_some(ReadyReason::Paused),
        // Sessions keep routing to a departed worker: the policy is not doing its job.
        trouble
            .filter(|t| t.persistent)
            .map(|_| ReadyReason::MigrationFailing),
        Some(ReadyReason::Reconciled),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(ReadyReason::Reconciled);
    let mut conds = vec![
        ready_condition(ready, ready_message),
        Cond::new(
            "StoreAvailable",
            true,
            "StoreReachable",
            "the session store answers",
        ),
    ];
    conds.extend(learned.cache.as_ref().map(cache_condition));
    conds.push(degraded_condition(learned.problems.degraded().first()));
    SessionPolicyStatus {
        observed_generation: policy.meta().generation,
        conditions: conditions(
            &conds,
            previous_conditions(Some(policy)),
            policy.meta().generation,
            now,
        ),
        workers: Some(learned.workers),
        sessions: Some(learned.sessions),
        migrations: learned.counters,
        last_idle_sweep: learned.last_idle_sweep.clone().or_else(|| {
            policy
                .status
                .as_ref()
                .and_then(|s| s.last_idle_sweep.clone())
        }),
    }
}

/// A policy the operator cannot act on: `Ready=False, InvalidSpec`. The rest of its status
/// (counters, last sweep) is kept when the object could be read (`policy`).
pub(crate) fn invalid(
    policy: Option<&SessionPolicy>,
    generation: Option<i64>,
    message: &str,
    now: Timestamp,
) -> SessionPolicyStatus {
    let mut status = policy.and_then(|p| p.status.clone()).unwrap_or_default();
    status.observed_generation = generation;
    status.conditions = conditions(
        &[
            ready_condition(ReadyReason::InvalidSpec, message),
            degraded_condition(Some(&(DegradedReason::InvalidSpec, message.to_string()))),
        ],
        previous_conditions(policy),
        generation,
        now,
    );
    status
}

/// A pass the store did not answer: what the pass could not learn keeps its last value.
pub(crate) fn store_unavailable(
    policy: &SessionPolicy,
    workers: WorkerCounts,
    message: &str,
    now: Timestamp,
) -> SessionPolicyStatus {
    let conds = [
        ready_condition(ReadyReason::StoreUnavailable, message),
        Cond::new("StoreAvailable", false, "StoreError", message),
        degraded_condition(Some(&(
            DegradedReason::StoreUnavailable,
            message.to_string(),
        ))),
    ];
    let mut status = policy.status.clone().unwrap_or_default();
    status.observed_generation = policy.meta().generation;
    status.conditions = conditions(
        &conds,
        previous_conditions(Some(policy)),
        policy.meta().generation,
        now,
    );
    status.workers = Some(workers);
    status
}

fn ready_condition(reason: ReadyReason, message: impl Into<String>) -> Cond {
    Cond::new("Ready", reason.is_ready(), reason.as_str(), message)
}

fn degraded_condition(first: Option<&(DegradedReason, String)>) -> Cond {
    match first {
        Some((reason, message)) => Cond::new("Degraded", true, reason.as_str(), message.clone()),
        None => Cond::new("Degraded", false, "AsExpected", ""),
    }
}

/// `CacheAvailable`, only with Redis over Postgres: whether the operator can update the Redis
/// cache, and whether entries it could not update still await repair. `StoreAvailable` keeps
/// meaning the primary (Postgres): migrations go on while the cache fails.
fn cache_condition(cache: &CacheView) -> Cond {
    let pending = cache.pending_repairs;
    match &cache.error {
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
    }
}

fn previous_conditions(policy: Option<&SessionPolicy>) -> &[Condition] {
    policy
        .and_then(|p| p.status.as_ref())
        .map_or(&[], |s| s.conditions.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(status: serde_json::Value) -> SessionPolicy {
        serde_json::from_value(json!({
            "apiVersion": "sessions.blockyard.io/v1alpha1", "kind": "SessionPolicy",
            "metadata": {"name": "p", "namespace": "apps", "generation": 3},
            "spec": {"selector": {"matchLabels": {"app": "w"}}},
            "status": status,
        }))
        .expect("policy")
    }

    fn at(text: &str) -> Timestamp {
        text.parse().expect("time")
    }

    /// (type, status, reason, message) of each condition.
    fn conds(status: &SessionPolicyStatus) -> Vec<(String, String, String, String)> {
        status
            .conditions
            .iter()
            .map(|c| {
                (
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                )
            })
            .collect()
    }

    fn condition<'a>(status: &'a SessionPolicyStatus, type_: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition")
    }

    fn trouble(reason: DegradedReason, persistent: bool) -> Trouble {
        Trouble {
            reason,
            message: "1 worker(s) not fully migrated; worker w-1 for 31s: lock timeout".into(),
            persistent,
        }
    }

    #[test]
    fn a_valid_pass_reports_its_numbers_and_is_ready() {
        let learned = Learned {
            workers: WorkerCounts {
                ready: 3,
                terminating: 1,
            },
            sessions: 42,
            in_flight: 2,
            waiting: 1,
            counters: Some(MigrationCounters {
                rerouted: 5,
                deleted: 1,
            }),
            ..Default::default()
        };
        let status = reconciled(&policy(json!({})), &learned, at("2026-01-01T00:00:00Z"));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(
            conds(&status),
            [
                (
                    "Ready".into(),
                    "True".into(),
                    "Reconciled".into(),
                    "3 ready worker(s), 2 migration(s) running, 1 departure(s) waiting".into()
                ),
                (
                    "StoreAvailable".into(),
                    "True".into(),
                    "StoreReachable".into(),
                    "the session store answers".into()
                ),
                (
                    "Degraded".into(),
                    "False".into(),
                    "AsExpected".into(),
                    String::new()
                ),
            ]
        );
        assert_eq!(
            (status.sessions, status.workers),
            (Some(42), Some(learned.workers))
        );
        assert_eq!(status.migrations, learned.counters);
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
    }

    #[test]
    fn paused_wins_over_a_failing_migration_and_a_persistent_one_is_not_ready() {
        let failing = |paused| Learned {
            paused,
            problems: Problems {
                trouble: Some(trouble(DegradedReason::MigrationFailed, true)),
                ..Default::default()
            },
            ..Default::default()
        };
        let now = at("2026-01-01T00:00:00Z");
        let status = reconciled(&policy(json!({})), &failing(false), now);
        let ready = condition(&status, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "MigrationFailing")
        );
        assert!(
            ready
                .message
                .ends_with("; 1 worker(s) not fully migrated; worker w-1 for 31s: lock timeout")
        );
        assert_eq!(condition(&status, "Degraded").reason, "MigrationFailed");

        let status = reconciled(&policy(json!({})), &failing(true), now);
        let ready = condition(&status, "Ready");
        assert_eq!(
            (
                ready.status.as_str(),
                ready.reason.as_str(),
                ready.message.as_str()
            ),
            (
                "True",
                "Paused",
                "paused: no store mutation for this policy"
            )
        );
        // A trouble that is not persistent yet keeps the policy Ready.
        let mut young = failing(false);
        young.problems.trouble = Some(trouble(DegradedReason::MigrationIncomplete, false));
        let status = reconciled(&policy(json!({})), &young, now);
        assert_eq!(condition(&status, "Ready").reason, "Reconciled");
        assert_eq!(condition(&status, "Degraded").reason, "MigrationIncomplete");
    }

    #[test]
    fn degraded_shows_the_first_reason_by_priority() {
        let mut problems = Problems {
            deletion_cost_failed: Some("forbidden".into()),
            idle_sweep_failed: Some("idle sweep: timeout".into()),
            stuck_no_ready_worker: 2,
            trouble: Some(trouble(DegradedReason::MigrationFailed, false)),
            missing_id: 1,
            overlap: Some("2 selected pod(s) are also selected by policy old".into()),
        };
        let mut shown = Vec::new();
        loop {
            let reasons = problems.degraded();
            let Some((reason, message)) = reasons.first().cloned() else {
                break;
            };
            shown.push(reason.as_str());
            match reason {
                DegradedReason::OverlappingSelector => problems.overlap = None,
                DegradedReason::WorkerIdMissing => {
                    assert_eq!(
                        message,
                        "1 selected pod(s) lack the label or annotation holding the worker id"
                    );
                    problems.missing_id = 0;
                }
                DegradedReason::MigrationFailed => problems.trouble = None,
                DegradedReason::NoReadyWorker => {
                    assert_eq!(
                        message,
                        "2 departed worker(s) wait for a Ready worker to take their sessions"
                    );
                    problems.stuck_no_ready_worker = 0;
                }
                DegradedReason::IdleSweepFailed => problems.idle_sweep_failed = None,
                DegradedReason::DeletionCostFailed => problems.deletion_cost_failed = None,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            shown,
            [
                "OverlappingSelector",
                "WorkerIdMissing",
                "MigrationFailed",
                "NoReadyWorker",
                "IdleSweepFailed",
                "DeletionCostFailed"
            ]
        );
        let status = reconciled(
            &policy(json!({})),
            &Learned::default(),
            at("2026-01-01T00:00:00Z"),
        );
        assert_eq!(condition(&status, "Degraded").reason, "AsExpected");
    }

    #[test]
    fn the_cache_condition_follows_the_cache() {
        let now = at("2026-01-01T00:00:00Z");
        let with = |error: Option<&str>, pending| {
            let learned = Learned {
                cache: Some(CacheView {
                    error: error.map(str::to_string),
                    pending_repairs: pending,
                }),
                ..Default::default()
            };
            let status = reconciled(&policy(json!({})), &learned, now);
            let c = condition(&status, "CacheAvailable");
            (c.status.clone(), c.reason.clone())
        };
        assert_eq!(with(None, 0), ("True".into(), "CacheReachable".into()));
        assert_eq!(with(None, 3), ("False".into(), "CacheRepairPending".into()));
        assert_eq!(
            with(Some("refused"), 3),
            ("False".into(), "CacheUnreachable".into())
        );
        let status = reconciled(&policy(json!({})), &Learned::default(), now);
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.type_ != "CacheAvailable")
        );
    }

    #[test]
    fn an_invalid_spec_keeps_the_rest_of_the_status() {
        let previous = json!({
            "observedGeneration": 2, "sessions": 9,
            "migrations": {"rerouted": 4, "deleted": 0},
            "conditions": [{"type": "Ready", "status": "False", "reason": "InvalidSpec",
                "message": "old", "lastTransitionTime": "2025-12-31T00:00:00Z"}],
        });
        let p = policy(previous);
        let status = invalid(
            Some(&p),
            Some(3),
            "spec.idleTTL: too short",
            at("2026-01-01T00:00:00Z"),
        );
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.sessions, Some(9));
        assert_eq!(status.migrations.map(|m| m.rerouted), Some(4));
        assert_eq!(
            conds(&status),
            [
                (
                    "Ready".into(),
                    "False".into(),
                    "InvalidSpec".into(),
                    "spec.idleTTL: too short".into()
                ),
                (
                    "Degraded".into(),
                    "True".into(),
                    "InvalidSpec".into(),
                    "spec.idleTTL: too short".into()
                ),
            ]
        );
        // Ready stayed False: its transition time is kept.
        assert_eq!(
            condition(&status, "Ready").last_transition_time.0,
            at("2025-12-31T00:00:00Z")
        );
        // An object that could not even be read: conditions only.
        let bare = invalid(None, Some(1), "schema", at("2026-01-01T00:00:00Z"));
        assert_eq!((bare.sessions, bare.conditions.len()), (None, 2));
    }

    #[test]
    fn an_unavailable_store_keeps_the_numbers_and_says_why() {
        let p = policy(json!({"sessions": 9, "migrations": {"rerouted": 4, "deleted": 0}}));
        let workers = WorkerCounts {
            ready: 2,
            terminating: 0,
        };
        let status = store_unavailable(
            &p,
            workers,
            "connection refused",
            at("2026-01-01T00:00:00Z"),
        );
        assert_eq!(
            conds(&status),
            [
                (
                    "Ready".into(),
                    "False".into(),
                    "StoreUnavailable".into(),
                    "connection refused".into()
                ),
                (
                    "StoreAvailable".into(),
                    "False".into(),
                    "StoreError".into(),
                    "connection refused".into()
                ),
                (
                    "Degraded".into(),
                    "True".into(),
                    "StoreUnavailable".into(),
                    "connection refused".into()
                ),
            ]
        );
        assert_eq!((status.sessions, status.workers), (Some(9), Some(workers)));
        assert_eq!(status.migrations.map(|m| m.rerouted), Some(4));
        assert_eq!(status.observed_generation, Some(3));
    }
}
