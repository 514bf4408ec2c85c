//! What the operator remembers about one policy between passes, and the one way a migration
//! changes it.
//!
//! Two kinds of writers share a policy's state: the pass (which holds its lock while it
//! observes, plans and reports) and the migration tasks the pass started. A task reports its
//! end through [`PolicyState::record_outcome`] only, between passes (it takes the same lock);
//! it never reaches into the pass or its modules, and the pass never waits for a task.

use std::collections::BTreeMap;
use std::time::Instant;

use k8s_openapi::jiff::Timestamp;

use super::ownership::Ceded;
use super::planner::{Action, Memory};
use super::records::RecordsState;
use super::status::MigrationHealth;
use crate::policy::{IdleSweepRecord, MigrationCounters, SessionPolicyStatus};

/// What the operator remembers about one policy between passes.
#[derive(Debug, Default)]
pub(crate) struct PolicyState {
    pub(super) memory: Memory,
    /// Taken from status when this replica becomes leader, then kept here.
    pub(super) counters: Option<MigrationCounters>,
    /// Workers whose last migration failed → the error, until one succeeds.
    pub(super) failing: BTreeMap<String, String>,
    pub(super) last_idle_sweep: Option<(Instant, IdleSweepRecord)>,
    /// The status this replica last wrote, and when (see the pass's status writer).
    pub(super) last_status: Option<(Instant, SessionPolicyStatus)>,
    /// Worker ids of pods another policy owns (see [`super::ownership`]).
    pub(super) ceded: Ceded,
    /// Migrations that keep failing or leave sessions behind.
    pub(super) migration_health: MigrationHealth,
    /// The policy's durable worker records (see [`super::records`]).
    pub(super) records: RecordsState,
}

/// How a migration ended: the sessions it moved, or why it stopped (the message shown in
/// status and in the Warning Event).
pub(super) type Outcome<'a> = Result<u64, &'a str>;

impl PolicyState {
    /// Marks the plan's actions as handed to their tasks: until each reports its outcome, its
    /// worker is not planned again.
    pub(super) fn record_started(&mut self, actions: &[Action], now: Timestamp) {
        for action in actions {
            self.memory.started(action, now);
        }
    }

    /// Records how a migration ended: the planner learns it is done (or free to be planned
    /// again), the failure is remembered for status until one succeeds, and the counters
    /// count what moved.
    pub(super) fn record_outcome(
        &mut self,
        action: &Action,
        outcome: Outcome<'_>,
        finished: Timestamp,
    ) {
        match outcome {
            Ok(moved) => {
                self.memory.completed(action, finished);
                self.failing.remove(action.worker());
                if let Some(counters) = self.counters.as_mut() {
                    match action {
                        Action::Reroute { .. } => counters.rerouted += moved,
                        Action::Delete { .. } => counters.deleted += moved,
                    }
                }
            }
            Err(message) => {
                self.memory.failed(action);
                self.failing
                    .insert(action.worker().to_string(), message.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::planner::Reason;

    fn reroute() -> Action {
        Action::Reroute {
            from: "old".into(),
            to: "new".into(),
            observed_at: Timestamp::UNIX_EPOCH,
            reason: Reason::Replaced,
        }
    }

    #[test]
    fn an_outcome_frees_the_worker_and_counts_or_remembers_the_failure() {
        let mut state = PolicyState {
            counters: Some(MigrationCounters::default()),
            ..Default::default()
        };
        state.record_started(&[reroute()], Timestamp::UNIX_EPOCH);
        assert_eq!(state.memory.in_flight(), 1);
        state.record_outcome(&reroute(), Err("old: store down"), Timestamp::UNIX_EPOCH);
        assert_eq!(state.memory.in_flight(), 0);
        assert_eq!(
            state.failing.get("old").map(String::as_str),
            Some("old: store down")
        );
        state.record_started(&[reroute()], Timestamp::UNIX_EPOCH);
        state.record_outcome(&reroute(), Ok(7), Timestamp::UNIX_EPOCH);
        assert!(state.failing.is_empty());
        assert_eq!(state.counters.map(|c| c.rerouted), Some(7));
        assert_eq!(state.memory.in_flight(), 0);
    }
}
