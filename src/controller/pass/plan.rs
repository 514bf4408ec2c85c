//! Plan: from what was observed to what to do. Needs no client and no store: it updates the
//! policy's memory and returns the planner's decisions and the migration verdict.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::super::planner::{self, Plan, Resolution, Rules};
use super::super::state::PolicyState;
use super::super::status::Trouble;
use super::super::workers::{self, Family};
use super::observe::{Pods, StoreFacts};
use crate::policy::{SessionPolicy, ValidPolicy};

/// What the plan step decided.
#[derive(Debug)]
pub(crate) struct Planned {
    pub plan: Plan,
    /// Workers holding sessions, without the ids this policy left to another policy.
    pub with_sessions: BTreeSet<String>,
    /// Migrations that fail or leave sessions behind (the longest-standing one).
    pub trouble: Option<Trouble>,
}

/// Plans one pass over `valid` and keeps the policy's memory up to date.
pub(crate) fn plan(
    state: &mut PolicyState,
    valid: &ValidPolicy,
    pods: &Pods,
    store: &StoreFacts,
    orphan_grace: Duration,
    now: Timestamp,
) -> Planned {
    // Ids of pods another policy owns hold no sessions as far as this policy is concerned: it
    // never plans a departure, late session or orphan of them.
    state
        .ceded
        .update(&pods.ceded, &pods.selected(), &store.with_sessions);
    let with_sessions: BTreeSet<String> = store
        .with_sessions
        .iter()
        .filter(|id| !state.ceded.contains(id))
        .cloned()
        .collect();
    let orphans = orphans(state, valid, pods, &with_sessions);
    let rules = Rules {
        on_replace: valid.on_replace,
        on_terminate: valid.on_terminate,
        replacement_wait: valid.replacement_wait,
        orphan_grace,
    };
    let plan = planner::plan(
        &mut state.memory,
        &planner::Input {
            now,
            rules: &rules,
            workers: &pods.workers,
            with_sessions: &with_sessions,
            orphans: &orphans,
            loads: &store.counts,
            unselected: &pods.unselected,
            seen_through: pods.seen_through,
        },
    );
    let trouble = migration_health(state, &with_sessions);
    Planned {
        plan,
        with_sessions,
        trouble,
    }
}

/// Unknown ids with sessions that plausibly belong to a workload of this policy.
fn orphans(
    state: &PolicyState,
    valid: &ValidPolicy,
    pods: &Pods,
    with_sessions: &BTreeSet<String>,
) -> BTreeMap<String, Option<Family>> {
    let families: Vec<Family> = pods
        .workers
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
    with_sessions
        .iter()
        .filter(|id| {
            !pods.live_ids.contains(id.as_str())
                && !pods.unselected.contains(id.as_str())
                && !state.memory.knows(id)
        })
        .filter_map(|id| {
            workers::claims_orphan(valid, &families, id).map(|family| (id.clone(), Some(family)))
        })
        .collect()
}

/// Failures are retried by later passes; one is over once its worker holds no sessions.
/// Migrated workers that hold sessions again or still (late sessions, or rows a migration could
/// not move) are watched too: persistent ones, and failures, are reported.
fn migration_health(state: &mut PolicyState, with_sessions: &BTreeSet<String>) -> Option<Trouble> {
    state
        .failing
        .retain(|worker, _| with_sessions.contains(worker));
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
    state.migration_health.verdict()
}

/// The migration counters the status carries: a leader takes them from status once, then
/// counts on; a standby forgets them (it takes them from status again when it leads).
pub(crate) fn adopt_counters(state: &mut PolicyState, policy: &SessionPolicy, leader: bool) {
    if !leader {
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
}
