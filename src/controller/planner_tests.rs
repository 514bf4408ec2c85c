//! Unit and property tests of the migration planner.
//!
//! The tests drive [`plan`] pass by pass through a small harness that plays the controller: it
//! derives `with_sessions` and `loads` from a simulated `worker → sessions` map, executes the
//! planned actions on that map and reports them with [`Memory::started`] and
//! [`Memory::completed`]. The property test also lets actions stay in flight across passes and
//! fail.
//!
//! Times are whole seconds after a fixed epoch (`t(0)`); the default rules wait 120 s for a
//! replacement and 10 s before an unknown id with sessions counts as an orphan departure.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;

use super::*;
use crate::controller::workers::{Family, Observed, Worker};
use crate::policy::{OnReplace, OnTerminate};

const WAIT: i64 = 120;
const GRACE: i64 = 10;

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).expect("timestamp")
}

fn rules() -> Rules {
    Rules {
        on_replace: OnReplace::Reroute,
        on_terminate: OnTerminate::Delete,
        replacement_wait: Duration::from_secs(WAIT as u64),
        orphan_grace: Duration::from_secs(GRACE as u64),
    }
}

fn web() -> Option<Family> {
    Some(Family::Deployment("web".into()))
}

fn api() -> Option<Family> {
    Some(Family::Deployment("api".into()))
}

fn sts() -> Option<Family> {
    Some(Family::StatefulSet("db".into()))
}

/// A Ready pod of the `web` Deployment, created at `created`, Ready since `ready_at`.
fn ready(id: &str, created: i64, ready_at: i64) -> Worker {
    Worker {
        id: id.into(),
        pod: id.into(),
        ready: true,
        departing: false,
        ready_since: Some(t(ready_at)),
        created: Some(t(created)),
        family: web(),
        deletion_cost: None,
        departed_at: None,
        observed: None,
        owner: None,
    }
}

/// A live pod that is not Ready (Pending, starting, crash-looping).
fn pending(id: &str, created: i64) -> Worker {
    Worker {
        ready: false,
        ready_since: None,
        ..ready(id, created, created)
    }
}

/// A terminating pod (deletionTimestamp set), created at `created`.
fn terminating(id: &str, created: i64) -> Worker {
    Worker {
        ready: false,
        departing: true,
        ready_since: None,
        ..ready(id, created, created)
    }
}

fn family(mut w: Worker, family: Option<Family>) -> Worker {
    w.family = family;
    w
}

/// Readable form of an action: `from->to Reason` or `worker deleted Reason`.
fn show(action: &Action) -> String {
    match action {
        Action::Reroute {
            from, to, reason, ..
        } => format!("{from}->{to} {}", reason.as_str()),
        Action::Delete { worker, reason, .. } => format!("{worker} deleted {}", reason.as_str()),
    }
}

/// The controller, played against a simulated store.
struct World {
    rules: Rules,
    memory: Memory,
    sessions: BTreeMap<String, u64>,
    /// Pods that exist but left the policy's selector.
    unselected: BTreeSet<String>,
}

impl World {
    fn new(rules: Rules, sessions: &[(&str, u64)]) -> Self {
        Self {
            rules,
            memory: Memory::default(),
            sessions: sessions
                .iter()
                .map(|(id, n)| (id.to_string(), *n))
                .collect(),
            unselected: BTreeSet::new(),
        }
    }

    /// A proxy writes `n` sessions for `id`.
    fn write(&mut self, id: &str, n: u64) {
        *self.sessions.entry(id.into()).or_default() += n;
    }

    fn count(&self, id: &str) -> u64 {
        self.sessions.get(id).copied().unwrap_or(0)
    }

    fn plan(&mut self, now: i64, workers: &[Worker]) -> Plan {
        self.plan_with_orphans(now, workers, &[])
    }

    fn plan_with_orphans(
        &mut self,
        now: i64,
        workers: &[Worker],
        orphans: &[(&str, Option<Family>)],
    ) -> Plan {
        let with_sessions: BTreeSet<String> = self
            .sessions
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(id, _)| id.clone())
            .collect();
        let orphans: BTreeMap<String, Option<Family>> = orphans
            .iter()
            .map(|(id, f)| (id.to_string(), f.clone()))
            .collect();
        // As the controller reads it: every pod given was numbered before.
        let seen_through = workers
            .iter()
            .filter_map(|w| w.observed)
            .map(|o| o.seq.max(o.departed.map_or(0, |(seq, _)| seq)) + 1)
            .max()
            .unwrap_or(0);
        plan(
            &mut self.memory,
            &Input {
                now: t(now),
                rules: &self.rules,
                workers,
                with_sessions: &with_sessions,
                orphans: &orphans,
                loads: &self.sessions,
                unselected: &self.unselected,
                seen_through,
            },
        )
    }

    /// Executes the plan's actions on the store and reports them to the memory.
    fn apply(&mut self, now: i64, plan: &Plan) {
        for action in &plan.actions {
            match action {
                Action::Reroute { from, to, .. } => {
                    let moved = self.sessions.remove(from).unwrap_or(0);
                    *self.sessions.entry(to.clone()).or_default() += moved;
                }
                Action::Delete { worker, .. } => {
                    self.sessions.remove(worker);
                }
            }
            self.memory.started(action, t(now));
            self.memory.completed(action, t(now));
        }
    }

    /// Plans and executes one pass; returns the actions in readable form.
    fn step(&mut self, now: i64, workers: &[Worker]) -> Vec<String> {
        let plan = self.plan(now, workers);
        self.apply(now, &plan);
        plan.actions.iter().map(show).collect()
    }
}

#[test]
fn reasons_and_action_workers_are_named() {
    assert_eq!(Reason::Replaced.as_str(), "Replaced");
    assert_eq!(Reason::Terminated.as_str(), "Terminated");
    assert_eq!(Reason::LateSessions.as_str(), "LateSessions");
    let reroute = Action::Reroute {
        from: "a".into(),
        to: "b".into(),
        observed_at: t(0),
        reason: Reason::Replaced,
    };
    let delete = Action::Delete {
        worker: "c".into(),
        observed_at: t(0),
        reason: Reason::Terminated,
    };
    assert_eq!(reroute.worker(), "a");
    assert_eq!(delete.worker(), "c");
}

#[test]
fn nothing_to_do_while_every_pod_is_live() {
    let mut w = World::new(rules(), &[("a", 3), ("b", 2), ("p", 1)]);
    let pods = [ready("a", 0, 5), ready("b", 0, 5), pending("p", 0)];
    for now in [0, 1_000, 100_000] {
        let plan = w.plan(now, &pods);
        assert!(plan.actions.is_empty());
        assert_eq!((plan.waiting, plan.stuck_no_ready_worker), (0, 0));
        assert_eq!(plan.wake_at, None);
    }
    assert!(w.memory.departures.is_empty());
    assert!(w.memory.knows("a") && w.memory.knows("p"));
}

#[test]
fn a_live_pod_that_is_not_ready_keeps_its_sessions() {
    // A crash-looping or starting pod is not a departure, however long it stays unready.
    let mut w = World::new(rules(), &[("p", 4)]);
    for now in [0, 500, 50_000] {
        assert!(w.step(now, &[pending("p", 0), ready("b", 0, 5)]).is_empty());
    }
    assert_eq!(w.count("p"), 4);
}

#[test]
fn surge_rollout_pairs_one_to_one_least_loaded_first() {
    let mut w = World::new(rules(), &[("a", 5), ("b", 3), ("c", 4), ("r1", 2)]);
    let old = |id| ready(id, 0, 5);
    assert!(
        w.step(
            1_000,
            &[
                old("a"),
                old("b"),
                old("c"),
                ready("r1", 990, 995),
                ready("r2", 991, 996)
            ]
        )
        .is_empty()
    );

    // Surge: both replacements are Ready before the old pods terminate. The first departure
    // takes the least-loaded replacement (r2: 0 < 2), the second the other one; the
    // long-standing pod c is never taken for a replacement.
    let plan = w.plan(
        1_010,
        &[
            terminating("a", 0),
            terminating("b", 0),
            old("c"),
            ready("r1", 990, 995),
            ready("r2", 991, 996),
        ],
    );
    let shown: Vec<String> = plan.actions.iter().map(show).collect();
    assert_eq!(shown, ["a->r2 Replaced", "b->r1 Replaced"]);
    assert!(plan.actions.iter().all(|a| a.observed_at() == t(1_010)));
    w.apply(1_010, &plan);

    // c terminates while both replacements are taken and r3 is not Ready yet: it waits.
    let pods = |r3: Worker| {
        vec![
            terminating("c", 0),
            ready("r1", 990, 995),
            ready("r2", 991, 996),
            r3,
        ]
    };
    let plan = w.plan(1_020, &pods(pending("r3", 1_015)));
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.waiting, 1);
    assert_eq!(plan.wake_at, Some(t(1_020 + WAIT)));

    // r3 becomes Ready: c goes there, not onto an already paired replacement.
    assert_eq!(
        w.step(1_030, &pods(ready("r3", 1_015, 1_025))),
        ["c->r3 Replaced"]
    );
    assert_eq!(
        (w.count("r1"), w.count("r2"), w.count("r3")),
        (2 + 3, 5, 4),
        "no session lost or duplicated"
    );
    assert_eq!((w.count("a"), w.count("b"), w.count("c")), (0, 0, 0));
}

#[test]
fn a_replacement_paired_in_an_earlier_pass_is_not_reused() {
    let mut w = World::new(rules(), &[("a", 1), ("b", 1)]);
    let r1 = ready("r1", 990, 995);
    w.step(1_000, &[ready("a", 0, 5), ready("b", 0, 5), r1.clone()]);
    assert_eq!(
        w.step(1_010, &[terminating("a", 0), ready("b", 0, 5), r1.clone()]),
        ["a->r1 Replaced"]
    );
    // b departs a little later; r1 already replaced a, so b waits for its own replacement.
    let plan = w.plan(1_020, &[terminating("b", 0), r1.clone()]);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.waiting, 1);
    assert_eq!(
        w.step(1_030, &[terminating("b", 0), r1, ready("r2", 1_025, 1_028)]),
        ["b->r2 Replaced"]
    );
}

#[test]
fn max_unavailable_rollout_waits_for_the_replacement_then_reroutes_when_ready() {
    let mut w = World::new(rules(), &[("a", 6), ("b", 2)]);
    w.step(1_000, &[ready("a", 0, 5), ready("b", 0, 5)]);

    // The old pod goes first; its replacement exists but is not Ready: wait, never reroute
    // onto a pod that is not Ready.
    let plan = w.plan(1_100, &[terminating("a", 0), ready("b", 0, 5)]);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.waiting, 1);
    assert_eq!(plan.wake_at, Some(t(1_100 + WAIT)));
    let plan = w.plan(1_101, &[ready("b", 0, 5), pending("r", 1_101)]);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(
        plan.wake_at,
        Some(t(1_100 + WAIT)),
        "the deadline does not move"
    );

    let plan = w.plan(1_130, &[ready("b", 0, 5), ready("r", 1_101, 1_128)]);
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a->r Replaced"]
    );
    assert_eq!(
        plan.actions[0].observed_at(),
        t(1_100),
        "latency counts from the departure"
    );
    w.apply(1_130, &plan);
    assert_eq!((w.count("a"), w.count("r"), w.count("b")), (0, 6, 2));
    assert_eq!(
        w.memory.resolution("a"),
        Some(&Resolution::Rerouted { to: "r".into() })
    );
}

#[test]
fn without_replacement_on_terminate_delete_applies_after_replacement_wait() {
    let mut w = World::new(rules(), &[("a", 6), ("b", 2)]);
    w.step(1_000, &[ready("a", 0, 5), ready("b", 0, 5)]);
    let pods = [terminating("a", 0), ready("b", 0, 5)];
    let plan = w.plan(1_100, &pods);
    assert!(plan.actions.is_empty());
    assert_eq!((plan.waiting, plan.wake_at), (1, Some(t(1_100 + WAIT))));
    let plan = w.plan(1_100 + WAIT - 1, &[ready("b", 0, 5)]);
    assert!(plan.actions.is_empty(), "one second before the deadline");
    assert_eq!(plan.waiting, 1);

    let plan = w.plan(1_100 + WAIT, &[ready("b", 0, 5)]);
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a deleted Terminated"]
    );
    assert_eq!(plan.actions[0].observed_at(), t(1_100));
    assert_eq!(plan.waiting, 0);
    w.apply(1_100 + WAIT, &plan);
    assert_eq!((w.count("a"), w.count("b")), (0, 2));
    assert_eq!(w.memory.resolution("a"), Some(&Resolution::Deleted));
}

#[test]
fn without_replacement_on_terminate_reroute_goes_to_the_least_loaded_ready_worker() {
    let mut w = World::new(
        Rules {
            on_terminate: OnTerminate::Reroute,
            ..rules()
        },
        &[("a", 4), ("f", 1), ("b", 5), ("c", 3), ("e", 0)],
    );
    // A shrinking pool: a and f go, nobody replaces them. d is empty but not Ready; e is the
    // emptiest Ready worker but of another family.
    let pods = |a: Worker, f: Worker| {
        vec![
            a,
            f,
            ready("b", 0, 5),
            ready("c", 0, 5),
            pending("d", 0),
            family(ready("e", 0, 5), api()),
        ]
    };
    w.step(1_000, &pods(ready("a", 0, 5), ready("f", 0, 5)));
    let plan = w.plan(1_100, &pods(terminating("a", 0), terminating("f", 0)));
    assert!(plan.actions.is_empty());
    assert_eq!(plan.waiting, 2);

    // a (4 sessions) goes to c (3 < 5); that makes c 7, so f goes to b (5 < 7).
    let shown = w.step(
        1_100 + WAIT,
        &pods(terminating("a", 0), terminating("f", 0)),
    );
    assert_eq!(shown, ["a->c Terminated", "f->b Terminated"]);
    assert_eq!((w.count("b"), w.count("c"), w.count("e")), (6, 7, 0));
}

#[test]
fn sessions_moved_earlier_in_a_pass_count_for_later_choices() {
    // replacementWait 0: a and b terminate together; a's sessions go to its fresh replacement
    // r, which makes r the fuller worker when onTerminate places b in the same pass.
    let mut w = World::new(
        Rules {
            on_terminate: OnTerminate::Reroute,
            replacement_wait: Duration::ZERO,
            ..rules()
        },
        &[("a", 10), ("b", 2), ("c", 3)],
    );
    let shown = w.step(
        1_000,
        &[
            terminating("a", 0),
            terminating("b", 0),
            ready("c", 0, 5),
            ready("r", 990, 1_000),
        ],
    );
    assert_eq!(shown, ["a->r Replaced", "b->c Terminated"]);
    assert_eq!((w.count("r"), w.count("c")), (10, 5));
}

#[test]
fn on_terminate_reroute_with_no_ready_worker_is_stuck_until_one_is_ready() {
    let mut w = World::new(
        Rules {
            on_terminate: OnTerminate::Reroute,
            ..rules()
        },
        &[("a", 4)],
    );
    w.step(1_000, &[ready("a", 10, 15), pending("b", 0)]);
    w.step(1_100, &[terminating("a", 10), pending("b", 0)]);
    let plan = w.plan(1_100 + WAIT, &[pending("b", 0)]);
    assert!(
        plan.actions.is_empty(),
        "never onto a pod that is not Ready"
    );
    assert_eq!((plan.waiting, plan.stuck_no_ready_worker), (1, 1));
    assert_eq!(w.count("a"), 4);

    // b (older than a, so not its replacement) becomes Ready: onTerminate can place a now.
    let plan = w.plan(1_300, &[ready("b", 0, 1_290)]);
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a->b Terminated"]
    );
    assert_eq!(plan.stuck_no_ready_worker, 0);
}

#[test]
fn on_terminate_delete_does_not_need_a_ready_worker() {
    let mut w = World::new(rules(), &[("a", 4)]);
    w.step(1_000, &[ready("a", 0, 5)]);
    w.step(1_100, &[terminating("a", 0)]);
    let plan = w.plan(1_100 + WAIT, &[]);
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a deleted Terminated"]
    );
    assert_eq!(plan.stuck_no_ready_worker, 0);
}

#[test]
fn on_replace_delete_deletes_once_the_replacement_is_ready() {
    let mut w = World::new(
        Rules {
            on_replace: OnReplace::Delete,
            ..rules()
        },
        &[("a", 3), ("r", 1)],
    );
    w.step(1_000, &[ready("a", 0, 5)]);
    let plan = w.plan(1_100, &[terminating("a", 0), pending("r", 1_099)]);
    assert!(plan.actions.is_empty(), "waits for a Ready replacement");
    let plan = w.plan(1_110, &[ready("r", 1_099, 1_105)]);
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a deleted Replaced"]
    );
    assert_eq!(plan.actions[0].observed_at(), t(1_100));
    w.apply(1_110, &plan);
    assert_eq!((w.count("a"), w.count("r")), (0, 1));
}

/// Bug found by this test: with `onReplace: Delete` the pairing was remembered only within the
/// pass (`Memory::completed` recorded pairs for reroutes only, as a `Delete` names no target),
/// so one replacement "replaced" every departure of the next passes. Here b would have been
/// deleted as `Replaced` on r1, although r1 replaced a and b's own replacement never came;
/// `onTerminate: Reroute` must apply to b instead. Fixed by remembering the replacement a
/// planned `Delete` was paired with and recording the pair when it starts.
#[test]
fn on_replace_delete_still_pairs_one_to_one_across_passes() {
    let mut w = World::new(
        Rules {
            on_replace: OnReplace::Delete,
            on_terminate: OnTerminate::Reroute,
            ..rules()
        },
        &[("a", 3), ("b", 2), ("c", 9)],
    );
    let r1 = ready("r1", 990, 995);
    w.step(
        1_000,
        &[ready("a", 0, 5), ready("b", 0, 5), ready("c", 0, 5)],
    );
    assert_eq!(
        w.step(
            1_010,
            &[
                terminating("a", 0),
                ready("b", 0, 5),
                ready("c", 0, 5),
                r1.clone()
            ]
        ),
        ["a deleted Replaced"]
    );
    let pods = [terminating("b", 0), ready("c", 0, 5), r1.clone()];
    let plan = w.plan(1_020, &pods);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.waiting, 1);
    // No replacement for b within replacementWait: onTerminate reroutes it to the
    // least-loaded Ready worker.
    assert_eq!(
        w.step(1_020 + WAIT, &[ready("c", 0, 5), r1]),
        ["b->r1 Terminated"]
    );
    assert_eq!((w.count("b"), w.count("r1"), w.count("c")), (0, 2, 9));
}

/// Migrations run outside the pass: while one runs, later passes neither plan its worker
/// again nor hand its replacement to another departure.
#[test]
fn an_action_in_flight_is_not_planned_again_and_keeps_its_replacement() {
    let mut w = World::new(rules(), &[("a", 4), ("b", 3)]);
    w.step(1_000, &[ready("a", 0, 5), ready("b", 0, 5)]);
    let (r1, r2) = (ready("r1", 990, 995), ready("r2", 991, 996));
    let plan = w.plan(
        1_010,
        &[
            terminating("a", 0),
            ready("b", 0, 5),
            r1.clone(),
            r2.clone(),
        ],
    );
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a->r1 Replaced"]
    );
    w.memory.started(&plan.actions[0], t(1_010));
    assert_eq!(w.memory.in_flight(), 1);

    // b departs while a's migration runs (a still holds its sessions).
    let next = w.plan(
        1_011,
        &[
            terminating("a", 0),
            terminating("b", 0),
            r1.clone(),
            r2.clone(),
        ],
    );
    assert_eq!(
        next.actions.iter().map(show).collect::<Vec<_>>(),
        ["b->r2 Replaced"]
    );
    w.apply(1_011, &next);

    // a's migration landed in the store but is not reported yet: a without sessions is
    // neither "empty" nor planned.
    w.sessions.remove("a");
    *w.sessions.entry("r1".into()).or_default() += 4;
    let quiet = w.plan(1_012, &[r1.clone(), r2.clone()]);
    assert!(quiet.actions.is_empty(), "{:?}", quiet.actions);
    w.memory.completed(&plan.actions[0], t(1_012));
    assert_eq!(w.memory.in_flight(), 0);
    assert_eq!(
        w.memory.resolution("a"),
        Some(&Resolution::Rerouted { to: "r1".into() })
    );
    // A lagging proxy writes for a again: its sessions follow to r1.
    w.write("a", 1);
    assert_eq!(w.step(1_013, &[r1, r2]), ["a->r1 LateSessions"]);
}

#[test]
fn a_failed_action_is_planned_again_onto_the_same_replacement() {
    let mut w = World::new(rules(), &[("a", 4)]);
    w.step(1_000, &[ready("a", 0, 5)]);
    let r = ready("r", 990, 995);
    // r2 would win a fresh choice (Ready earlier): the retry still goes where a's action went.
    let r2 = ready("r2", 990, 992);
    let plan = w.plan(1_010, &[terminating("a", 0), r.clone()]);
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a->r Replaced"]
    );
    w.memory.started(&plan.actions[0], t(1_010));
    w.memory.failed(&plan.actions[0]);
    assert_eq!(w.memory.in_flight(), 0);
    assert_eq!(
        w.step(1_015, &[terminating("a", 0), r, r2]),
        ["a->r Replaced"]
    );
    assert_eq!(w.count("r"), 4);
}

/// A migration commits in batches: one that fails after its last batch (a store error on the
/// final count, a lost lease) has moved every session. Its replacement must not take a second
/// departure, and the departure found empty counts as rerouted there.
#[test]
fn a_failed_action_that_moved_the_sessions_keeps_its_replacement() {
    let mut w = World::new(rules(), &[("a", 4), ("b", 4)]);
    w.step(1_000, &[ready("a", 0, 5), ready("b", 0, 5)]);
    let r = ready("r", 990, 995);
    let plan = w.plan(1_010, &[terminating("a", 0), ready("b", 0, 5), r.clone()]);
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a->r Replaced"]
    );
    w.memory.started(&plan.actions[0], t(1_010));
    // The batches landed, then the action failed.
    w.sessions.remove("a");
    *w.sessions.entry("r".into()).or_default() += 4;
    w.memory.failed(&plan.actions[0]);
    // b departs: r replaced a already, so b waits for a replacement of its own.
    let next = w.plan(
        1_012,
        &[terminating("a", 0), terminating("b", 0), r.clone()],
    );
    assert!(next.actions.is_empty(), "{:?}", next.actions);
    assert_eq!(next.waiting, 1);
    assert_eq!(
        w.memory.resolution("a"),
        Some(&Resolution::Rerouted { to: "r".into() })
    );
    let r3 = ready("r3", 1_011, 1_013);
    assert_eq!(
        w.step(1_014, &[terminating("b", 0), r.clone(), r3.clone()]),
        ["b->r3 Replaced"]
    );
    // A lagging proxy writes for a again: its sessions follow to r.
    w.write("a", 1);
    assert_eq!(w.step(1_016, &[r, r3]), ["a->r LateSessions"]);
    assert_eq!((w.count("r"), w.count("r3")), (5, 4));
}

#[test]
fn an_on_replace_delete_in_flight_keeps_its_replacement_paired() {
    let mut w = World::new(
        Rules {
            on_replace: OnReplace::Delete,
            ..rules()
        },
        &[("a", 2), ("b", 2)],
    );
    w.step(1_000, &[ready("a", 0, 5), ready("b", 0, 5)]);
    let r = ready("r", 990, 995);
    let plan = w.plan(1_010, &[terminating("a", 0), ready("b", 0, 5), r.clone()]);
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a deleted Replaced"]
    );
    w.memory.started(&plan.actions[0], t(1_010));
    // b departs during a's delete: r is taken, so b waits for a replacement of its own.
    let next = w.plan(1_011, &[terminating("a", 0), terminating("b", 0), r]);
    assert!(next.actions.is_empty(), "{:?}", next.actions);
    assert_eq!(next.waiting, 1);
}

#[test]
fn a_pod_that_vanishes_between_passes_is_a_departure() {
    // No terminating state was ever seen: the pod is simply not there any more.
    let mut w = World::new(rules(), &[("a", 2), ("b", 1), ("x", 5)]);
    w.step(
        1_000,
        &[ready("a", 0, 5), ready("b", 0, 5), ready("x", 0, 5)],
    );
    let plan = w.plan(1_100, &[ready("b", 0, 5), ready("r", 1_090, 1_095)]);
    let shown: Vec<String> = plan.actions.iter().map(show).collect();
    // a has a fresh replacement; x vanished too, and waits for one of its own.
    assert_eq!(shown, ["a->r Replaced"]);
    assert_eq!(plan.actions[0].observed_at(), t(1_100));
    assert_eq!(plan.waiting, 1);
    assert!(w.memory.departures.contains_key("x"));
    w.apply(1_100, &plan);
    assert_eq!(
        w.step(1_100 + WAIT, &[ready("b", 0, 5), ready("r", 1_090, 1_095)]),
        ["x deleted Terminated"]
    );
}

#[test]
fn a_pod_that_leaves_the_selector_keeps_its_sessions() {
    // Relabelled out of rotation (or the selector narrowed): the pod still runs and proxies may
    // still route to it, so it is no departure, however long it stays out.
    let mut w = World::new(rules(), &[("a", 3), ("b", 1)]);
    w.step(1_000, &[ready("a", 0, 5), ready("b", 0, 5)]);
    w.unselected.insert("a".into());
    let fresh = ready("r", 1_090, 1_095);
    assert!(w.step(1_100, &[ready("b", 0, 5), fresh.clone()]).is_empty());
    assert!(
        w.step(1_100 + 10 * WAIT, &[ready("b", 0, 5), fresh.clone()])
            .is_empty()
    );
    assert!(!w.memory.departures.contains_key("a"));
    // Deleted later, it departs like any worker.
    w.unselected.clear();
    let plan = w.plan(1_200 + 10 * WAIT, &[ready("b", 0, 5), fresh]);
    assert!(w.memory.departures.contains_key("a"), "{plan:?}");
}

#[test]
fn late_sessions_wait_for_a_target_that_is_live_but_not_ready() {
    let mut w = World::new(rules(), &[("a", 2)]);
    w.step(1_000, &[ready("a", 0, 5)]);
    assert_eq!(
        w.step(1_010, &[terminating("a", 0), ready("b", 1_005, 1_006)]),
        ["a->b Replaced"]
    );
    // A lagging proxy writes for a while b is briefly NotReady: nothing is deleted, nothing moves.
    w.write("a", 1);
    let plan = w.plan(1_020 + 2 * WAIT, &[pending("b", 1_005)]);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.waiting, 1);
    // b is Ready again: the late session follows.
    assert_eq!(
        w.step(1_030 + 2 * WAIT, &[ready("b", 1_005, 1_029 + 2 * WAIT)]),
        ["a->b LateSessions"]
    );
}

#[test]
fn late_sessions_follow_the_targets_own_migration() {
    let mut w = World::new(rules(), &[("a", 2)]);
    w.step(1_000, &[ready("a", 0, 5)]);
    assert_eq!(
        w.step(1_010, &[terminating("a", 0), ready("b", 1_005, 1_006)]),
        ["a->b Replaced"]
    );
    assert_eq!(
        w.step(1_020, &[terminating("b", 1_005), ready("c", 1_015, 1_016)]),
        ["b->c Replaced"]
    );
    w.write("a", 1);
    assert_eq!(
        w.step(1_030, &[ready("c", 1_015, 1_016)]),
        ["a->c LateSessions"]
    );
}

#[test]
fn a_reused_worker_id_needs_no_migration() {
    // StatefulSet: db-0 is deleted and recreated under the same name, so the same worker id.
    let mut w = World::new(rules(), &[("db-0", 5), ("db-1", 5)]);
    let pod = |p: Worker| family(p, sts());
    let db1 = pod(ready("db-1", 1, 6));
    w.step(1_000, &[pod(ready("db-0", 0, 5)), db1.clone()]);
    let plan = w.plan(1_010, &[pod(terminating("db-0", 0)), db1.clone()]);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.waiting, 1);
    assert!(w.plan(1_020, std::slice::from_ref(&db1)).actions.is_empty());
    // The new db-0 exists (not Ready yet): the departure is over, nothing moves.
    let plan = w.plan(1_030, &[pod(pending("db-0", 1_025)), db1.clone()]);
    assert!(plan.actions.is_empty());
    assert_eq!((plan.waiting, plan.wake_at), (0, None));
    assert!(w.memory.departures.is_empty());
    for now in [1_040, 1_040 + WAIT, 5_000] {
        assert!(
            w.step(now, &[pod(ready("db-0", 1_025, 1_035)), db1.clone()])
                .is_empty()
        );
    }
    assert_eq!((w.count("db-0"), w.count("db-1")), (5, 5));
}

#[test]
fn a_worker_id_held_by_a_live_pod_is_never_migrated_even_if_another_pod_with_it_departs() {
    // Worker ids from a label: the new pod carries the id while the old one still terminates.
    let mut w = World::new(rules(), &[("shared", 3)]);
    let pods = [
        terminating("shared", 0),
        ready("shared", 1_000, 1_005),
        ready("other", 1_000, 1_005),
    ];
    for now in [1_010, 1_010 + WAIT, 1_010 + 10 * WAIT] {
        let plan = w.plan(now, &pods);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert_eq!(plan.waiting, 0);
    }
    assert_eq!(w.count("shared"), 3);
}

/// Bug found by this test: in a StatefulSet rolling update (highest ordinal first, each pod
/// deleted and recreated under its own name), the sibling updated just before (db-2: created
/// after db-1, Ready moments ago) passed the "newer and recently Ready" test and db-1's sessions
/// were rerouted to it at once — although db-1 comes back under the same worker id and its
/// sessions need not move. Fixed: a departed StatefulSet pod is replaced only by the pod of its
/// own name (the same id with PodName worker ids, a new pod with PodUID ids).
#[test]
fn a_statefulset_rolling_update_moves_no_sessions_to_siblings() {
    let mut w = World::new(rules(), &[("db-0", 5), ("db-1", 5), ("db-2", 5)]);
    let pod = |p: Worker| family(p, sts());
    let mut all = Vec::new();
    let mut db0 = pod(ready("db-0", 0, 5));
    let mut db1 = pod(ready("db-1", 1, 6));
    all.extend(w.step(1_000, &[db0.clone(), db1.clone(), pod(ready("db-2", 2, 7))]));
    // db-2 is updated: deleted, gone, recreated, Ready.
    all.extend(w.step(
        1_010,
        &[db0.clone(), db1.clone(), pod(terminating("db-2", 2))],
    ));
    all.extend(w.step(1_020, &[db0.clone(), db1.clone()]));
    let db2 = pod(ready("db-2", 1_025, 1_035));
    all.extend(w.step(
        1_030,
        &[db0.clone(), db1.clone(), pod(pending("db-2", 1_025))],
    ));
    all.extend(w.step(1_040, &[db0.clone(), db1.clone(), db2.clone()]));
    // Then db-1: db-2 is newer than db-1 and Ready moments ago, but not db-1's replacement.
    let plan = w.plan(
        1_050,
        &[db0.clone(), pod(terminating("db-1", 1)), db2.clone()],
    );
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.waiting, 1);
    all.extend(w.step(1_060, &[db0.clone(), db2.clone()]));
    db1 = pod(ready("db-1", 1_065, 1_075));
    all.extend(w.step(
        1_070,
        &[db0.clone(), pod(pending("db-1", 1_065)), db2.clone()],
    ));
    all.extend(w.step(1_080, &[db0.clone(), db1.clone(), db2.clone()]));
    // And db-0.
    all.extend(w.step(
        1_090,
        &[pod(terminating("db-0", 0)), db1.clone(), db2.clone()],
    ));
    db0 = pod(ready("db-0", 1_095, 1_100));
    all.extend(w.step(1_100, &[db0.clone(), db1.clone(), db2.clone()]));
    all.extend(w.step(1_100 + 2 * WAIT, &[db0, db1, db2]));
    assert!(all.is_empty(), "{all:?}");
    assert_eq!(
        (w.count("db-0"), w.count("db-1"), w.count("db-2")),
        (5, 5, 5)
    );
}

#[test]
fn a_statefulset_pod_with_uid_worker_ids_is_replaced_by_the_pod_of_its_own_name() {
    // With PodUID worker ids the recreated pod has a new id; it, not a sibling, replaces. (Before
    // the fix above, the sibling db-1 — newer than db-0 and Ready recently — took the sessions
    // the moment db-0 terminated.)
    let mut w = World::new(rules(), &[("uid-a", 5), ("uid-b", 1)]);
    let pod = |id: &str, name: &str, p: Worker| {
        let mut p = family(p, sts());
        p.id = id.into();
        p.pod = name.into();
        p
    };
    let sibling = pod("uid-b", "db-1", ready("x", 1_000, 1_005));
    w.step(
        1_010,
        &[pod("uid-a", "db-0", ready("x", 0, 5)), sibling.clone()],
    );
    let plan = w.plan(
        1_020,
        &[pod("uid-a", "db-0", terminating("x", 0)), sibling.clone()],
    );
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(
        w.step(
            1_040,
            &[pod("uid-c", "db-0", ready("x", 1_030, 1_035)), sibling]
        ),
        ["uid-a->uid-c Replaced"]
    );
}

#[test]
fn old_pods_of_a_shrinking_pool_are_not_replacements() {
    let mut w = World::new(rules(), &[("c", 4), ("a", 1), ("b", 1), ("d", 0)]);
    // a and b were created before c: not its replacements. d was created after c but has been
    // Ready for long: a long-standing pod of a pool that merely shrinks.
    let pods = |c: Worker| vec![ready("a", 0, 5), ready("b", 0, 5), c, ready("d", 60, 65)];
    w.step(1_000, &pods(ready("c", 50, 55)));
    let plan = w.plan(1_010, &pods(terminating("c", 50)));
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.waiting, 1);
    assert_eq!(
        w.step(1_010 + WAIT, &pods(terminating("c", 50))),
        ["c deleted Terminated"]
    );
}

#[test]
fn created_at_the_same_instant_without_order_waits_then_moves_rather_than_deletes() {
    // Both listed, created in one second, no owners: nothing tells which came first. The
    // planner waits for a clear replacement; at the deadline it moves rather than deletes.
    let mut w = World::new(rules(), &[("a", 1)]);
    w.step(1_000, &[ready("a", 1_000, 1_000), ready("b", 1_000, 1_000)]);
    let plan = w.plan(1_010, &[terminating("a", 1_000), ready("b", 1_000, 1_000)]);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.waiting, 1);
    assert_eq!(
        w.step(
            1_010 + WAIT,
            &[terminating("a", 1_000), ready("b", 1_000, 1_000)]
        ),
        ["a->b Replaced"]
    );
}

// ---------------------------------------------------------------------------------------------
// Ties: creationTimestamp has one-second resolution; the watch's order and ownership decide.

/// `w` as first seen by the watch: `seq`-th, appearing live or found in a list.
fn seen(mut w: Worker, seq: u64, listed: bool) -> Worker {
    w.observed = Some(Observed {
        seq,
        at: t(1_000),
        listed,
        departed: None,
    });
    w
}

/// `w` whose departure the watch showed as the `seq`-th event (live).
fn departed_seen(mut w: Worker, seq: u64) -> Worker {
    if let Some(o) = w.observed.as_mut() {
        o.departed = Some((seq, false));
    }
    w
}

fn owned(mut w: Worker, owner: &str) -> Worker {
    w.owner = Some(owner.into());
    w
}

fn bare(w: Worker) -> Worker {
    family(w, None)
}

#[test]
fn replacements_created_in_the_departed_pods_second_are_ordered_by_the_watch() {
    // The issue's sequence, three times within one second: create old-N, give it sessions,
    // create new-N, delete old-N. Bare pods, all created at t=1000.
    let mut w = World::new(rules(), &[("old-1", 50), ("old-2", 50), ("old-3", 50)]);
    let pod = |id: &str, seq: u64, departing: bool| {
        let p = if departing {
            terminating(id, 1_000)
        } else {
            ready(id, 1_000, 1_000)
        };
        bare(seen(p, seq, false))
    };
    // old-1 leaves while old-2 (holding sessions, the next to leave) and new-1 are Ready.
    let pass1 = [
        pod("old-1", 1, true),
        pod("new-1", 2, false),
        pod("old-2", 3, false),
    ];
    assert_eq!(w.step(1_000, &pass1), ["old-1->new-1 Replaced"]);
    let pass2 = [
        pod("new-1", 2, false),
        pod("old-2", 3, true),
        pod("new-2", 4, false),
        pod("old-3", 5, true),
        pod("new-3", 6, false),
    ];
    let mut actions = w.step(1_000, &pass2);
    actions.sort();
    assert_eq!(actions, ["old-2->new-2 Replaced", "old-3->new-3 Replaced"]);
    assert_eq!(
        (w.count("new-1"), w.count("new-2"), w.count("new-3")),
        (50, 50, 50)
    );
}

#[test]
fn a_pod_the_watch_showed_before_the_departed_pod_is_never_its_replacement() {
    let mut w = World::new(rules(), &[("a", 5)]);
    let older = bare(seen(ready("b", 1_000, 1_000), 1, false));
    let departed = bare(seen(terminating("a", 1_000), 2, false));
    let plan = w.plan(1_000, &[departed.clone(), older.clone()]);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    // Not even at the deadline: it is older, not ambiguous.
    assert_eq!(
        w.step(1_000 + WAIT, &[departed, older]),
        ["a deleted Terminated"]
    );
}

#[test]
fn a_pod_seen_appearing_is_newer_than_a_listed_one_and_not_the_other_way_round() {
    let mut w = World::new(rules(), &[("a", 5)]);
    let plan = w.plan(
        1_000,
        &[
            bare(seen(terminating("a", 1_000), 7, true)),
            bare(seen(ready("b", 1_000, 1_000), 8, false)),
        ],
    );
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a->b Replaced"]
    );

    let mut w = World::new(rules(), &[("a", 5)]);
    let pods = [
        bare(seen(terminating("a", 1_000), 9, false)),
        bare(seen(ready("b", 1_000, 1_000), 3, true)),
    ];
    assert!(w.plan(1_000, &pods).actions.is_empty());
    assert_eq!(w.step(1_000 + WAIT, &pods), ["a deleted Terminated"]);
}

#[test]
fn another_replicaset_of_the_deployment_replaces_the_old_one_within_a_second() {
    // Both listed (the operator started after them), created in one second.
    let mut w = World::new(rules(), &[("old", 5)]);
    let plan = w.plan(
        1_000,
        &[
            owned(seen(terminating("old", 1_000), 1, true), "ReplicaSet/web-1"),
            owned(
                seen(ready("new", 1_000, 1_000), 2, true),
                "ReplicaSet/web-2",
            ),
        ],
    );
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["old->new Replaced"]
    );
}

#[test]
fn a_sibling_of_the_same_replicaset_created_in_the_same_second_is_not_a_replacement() {
    // A scale-down of pods created together: the sibling is no replacement, so onTerminate
    // applies (Delete).
    let mut w = World::new(rules(), &[("a", 5)]);
    let pods = [
        owned(seen(terminating("a", 1_000), 2, true), "ReplicaSet/web-1"),
        owned(seen(ready("b", 1_000, 1_000), 1, true), "ReplicaSet/web-1"),
    ];
    assert!(w.plan(1_000, &pods).actions.is_empty());
    assert_eq!(w.step(1_000 + WAIT, &pods), ["a deleted Terminated"]);
}

#[test]
fn a_sibling_the_watch_showed_before_the_departure_is_a_peer_even_if_created_later() {
    // A rollout right after the Deployment became Ready: the old ReplicaSet's pods were created
    // over two seconds; old-1 is deleted while its sibling old-2 (created a second later) and
    // no new pod is Ready. old-2 is the next to leave, not a replacement.
    let rs_old = "ReplicaSet/web-1";
    let mut w = World::new(rules(), &[("old-1", 50), ("old-2", 50)]);
    let old1 = departed_seen(
        owned(seen(terminating("old-1", 1_000), 1, false), rs_old),
        10,
    );
    let old2 = owned(seen(ready("old-2", 1_001, 1_001), 2, false), rs_old);
    let plan = w.plan(1_003, &[old1.clone(), old2.clone()]);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    let new1 = owned(
        seen(ready("new-1", 1_003, 1_004), 11, false),
        "ReplicaSet/web-2",
    );
    assert_eq!(
        w.step(1_004, &[old1.clone(), old2.clone(), new1]),
        ["old-1->new-1 Replaced"]
    );

    // Had no new pod come, old-2 takes the sessions at the deadline rather than a delete.
    let mut w = World::new(rules(), &[("old-1", 50), ("old-2", 50)]);
    assert!(
        w.plan(1_003, &[old1.clone(), old2.clone()])
            .actions
            .is_empty()
    );
    assert_eq!(
        w.step(1_003 + WAIT, &[old1, old2]),
        ["old-1->old-2 Replaced"]
    );
    // An older sibling (created before old-1) is a peer: onTerminate applies.
    let rs_old = "ReplicaSet/web-1";
    let mut w = World::new(rules(), &[("old-1", 50)]);
    let old1 = departed_seen(
        owned(seen(terminating("old-1", 1_001), 2, false), rs_old),
        10,
    );
    let old0 = owned(seen(ready("old-0", 1_000, 1_000), 1, false), rs_old);
    assert!(
        w.plan(1_003, &[old1.clone(), old0.clone()])
            .actions
            .is_empty()
    );
    assert_eq!(
        w.step(1_003 + WAIT, &[old1, old0]),
        ["old-1 deleted Terminated"]
    );
}

/// The same rollout when no pass saw old-1 terminating: its ReplicaSet deleted it with a short
/// grace period (or the kubelet had already stopped it), so it only vanished between two passes.
/// Found on the real control plane: old-1's sessions went to old-2, and old-2's, later, both to
/// one new pod.
#[test]
fn a_sibling_seen_before_a_pod_vanished_is_a_peer_even_if_created_later() {
    let rs_old = "ReplicaSet/web-1";
    let mut w = World::new(rules(), &[("old-1", 50), ("old-2", 50)]);
    let old1 = owned(seen(ready("old-1", 1_000, 1_000), 1, false), rs_old);
    let old2 = owned(seen(ready("old-2", 1_001, 1_001), 2, false), rs_old);
    assert!(w.step(1_002, &[old1, old2.clone()]).is_empty());
    // old-1 is gone; old-2 (created a second later, seen before) is not its replacement.
    let plan = w.plan(1_003, std::slice::from_ref(&old2));
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.waiting, 1);
    // A pod of the new ReplicaSet is; so would be a sibling that appeared after the last pass.
    let new1 = owned(
        seen(ready("new-1", 1_003, 1_004), 3, false),
        "ReplicaSet/web-2",
    );
    assert_eq!(
        w.step(1_004, &[old2.clone(), new1]),
        ["old-1->new-1 Replaced"]
    );

    let mut w = World::new(rules(), &[("a", 5)]);
    let a = owned(seen(ready("a", 1_000, 1_000), 1, false), rs_old);
    let peer = owned(seen(ready("peer", 1_001, 1_001), 2, false), rs_old);
    assert!(w.step(1_002, &[a, peer.clone()]).is_empty());
    let successor = owned(seen(ready("successor", 1_002, 1_002), 3, false), rs_old);
    assert_eq!(w.step(1_003, &[peer, successor]), ["a->successor Replaced"]);
}

#[test]
fn a_sibling_that_appeared_after_the_departure_replaces_it() {
    // A crash: the pod fails, its ReplicaSet creates a new pod in the same second.
    let rs = "ReplicaSet/web-1";
    let mut w = World::new(rules(), &[("a", 5)]);
    let mut failed = departed_seen(owned(seen(terminating("a", 1_000), 1, true), rs), 5);
    failed.departed_at = None;
    let replacement = owned(seen(ready("b", 1_000, 1_000), 6, false), rs);
    let old_peer = owned(seen(ready("c", 1_000, 1_000), 2, true), rs);
    assert_eq!(
        w.step(1_000, &[failed, old_peer, replacement]),
        ["a->b Replaced"]
    );
}

#[test]
fn a_clear_replacement_wins_over_an_ambiguous_one_and_ambiguity_never_deletes() {
    let mut w = World::new(rules(), &[("a", 5)]);
    let departed = bare(seen(terminating("a", 1_000), 1, true));
    let tie = bare(seen(ready("tie", 1_000, 1_000), 2, true));
    assert!(
        w.plan(1_000, &[departed.clone(), tie.clone()])
            .actions
            .is_empty()
    );
    let clear = bare(seen(ready("clear", 1_000, 1_001), 3, false));
    assert_eq!(
        w.step(1_001, &[departed.clone(), tie.clone(), clear]),
        ["a->clear Replaced"]
    );

    // onTerminate: Reroute keeps its own fallback (least loaded); onReplace: Delete with
    // onTerminate: Delete deletes either way.
    let mut r = rules();
    r.on_replace = OnReplace::Delete;
    let mut w = World::new(r, &[("a", 5)]);
    assert!(
        w.plan(1_000, &[departed.clone(), tie.clone()])
            .actions
            .is_empty()
    );
    assert_eq!(
        w.step(1_000 + WAIT, &[departed, tie]),
        ["a deleted Terminated"]
    );
}

#[test]
fn created_exactly_the_arrival_window_before_the_departure_still_counts() {
    let mut w = World::new(rules(), &[("a", 1)]);
    let departed_at = 1_000;
    let window = super::ARRIVAL_WINDOW
        .max(Duration::from_secs(WAIT as u64))
        .as_secs() as i64;
    let plan = w.plan(
        departed_at,
        &[
            terminating("a", 0),
            ready("r", departed_at - window - 1, departed_at - window),
            ready("s", departed_at - window, departed_at - window + 1),
        ],
    );
    // r was created one second too early; s just in time (r, Ready first, would win otherwise).
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a->s Replaced"]
    );
}

#[test]
fn a_ready_pod_without_known_timestamps_may_replace() {
    // Missing creation or readiness times must not block a replacement.
    let mut w = World::new(rules(), &[("a", 1)]);
    let mut r = ready("r", 0, 0);
    r.created = None;
    r.ready_since = None;
    let plan = w.plan(1_000, &[terminating("a", 0), r]);
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a->r Replaced"]
    );
}

#[test]
fn replacements_of_the_same_family_come_first() {
    let mut w = World::new(rules(), &[("a", 1), ("mine", 50)]);
    let plan = w.plan(
        1_000,
        &[
            terminating("a", 0),
            family(ready("theirs", 990, 995), api()),
            ready("mine", 990, 995),
        ],
    );
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a->mine Replaced"]
    );
}

#[test]
fn with_equal_loads_the_first_ready_candidate_replaces() {
    let mut w = World::new(rules(), &[("a", 1)]);
    let plan = w.plan(
        1_000,
        &[
            terminating("a", 0),
            ready("r-old", 980, 985),
            ready("r-new", 990, 995),
        ],
    );
    // A rolling update brings replacements up in the order it removes old pods.
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a->r-old Replaced"]
    );
}

#[test]
fn orphans_wait_orphan_grace_then_migrate_to_a_ready_worker_of_their_family() {
    // Sessions of web-7c9-x, whose pod vanished while no operator ran. web-1 is loaded and
    // Ready since long ago, api-1 is empty but of another family: the family wins.
    let mut w = World::new(rules(), &[("web-7c9-x", 4), ("web-1", 10)]);
    let pods = [ready("web-1", 0, 5), family(ready("api-1", 0, 5), api())];
    let orphans = [("web-7c9-x", web())];
    let plan = w.plan_with_orphans(1_000, &pods, &orphans);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.wake_at, Some(t(1_000 + GRACE)));
    assert!(
        w.memory.departures.is_empty(),
        "not a departure within the grace"
    );
    let plan = w.plan_with_orphans(1_000 + GRACE - 1, &pods, &orphans);
    assert!(plan.actions.is_empty());
    assert_eq!(
        plan.wake_at,
        Some(t(1_000 + GRACE)),
        "the grace does not restart"
    );

    let plan = w.plan_with_orphans(1_000 + GRACE, &pods, &orphans);
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["web-7c9-x->web-1 Replaced"]
    );
    w.apply(1_000 + GRACE, &plan);
    assert!(w.memory.knows("web-7c9-x"));
    assert_eq!(w.count("web-1"), 14);
}

#[test]
fn an_orphan_grace_restarts_when_the_orphan_was_not_seen_in_between() {
    let mut w = World::new(rules(), &[("web-7c9-x", 4)]);
    let pods = [ready("web-1", 0, 5)];
    let orphans = [("web-7c9-x", web())];
    w.plan_with_orphans(1_000, &pods, &orphans);
    // Its pod showed up (or it held no sessions) in between.
    w.plan_with_orphans(1_005, &pods, &[]);
    let plan = w.plan_with_orphans(1_008, &pods, &orphans);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.wake_at, Some(t(1_008 + GRACE)));
    assert!(
        w.plan_with_orphans(1_000 + GRACE, &pods, &orphans)
            .actions
            .is_empty()
    );
}

#[test]
fn an_orphan_without_a_ready_worker_of_its_family_falls_back_to_on_terminate() {
    let mut w = World::new(
        Rules {
            on_terminate: OnTerminate::Reroute,
            ..rules()
        },
        &[("web-7c9-x", 4)],
    );
    let pods = [family(ready("api-1", 0, 5), api())];
    let orphans = [("web-7c9-x", web())];
    w.plan_with_orphans(1_000, &pods, &orphans);
    let plan = w.plan_with_orphans(1_000 + GRACE, &pods, &orphans);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.waiting, 1);
    assert_eq!(plan.wake_at, Some(t(1_000 + GRACE + WAIT)));
    assert_eq!(
        w.step(1_000 + GRACE + WAIT, &pods),
        ["web-7c9-x->api-1 Terminated"]
    );
}

#[test]
fn late_sessions_are_rerouted_again_to_the_same_target() {
    let mut w = World::new(rules(), &[("a", 2)]);
    let r = ready("r", 990, 995);
    let r2 = ready("r2", 1_015, 1_018);
    w.step(1_000, &[ready("a", 0, 5), r.clone()]);
    assert_eq!(
        w.step(1_010, &[terminating("a", 0), r.clone()]),
        ["a->r Replaced"]
    );
    // A lagging proxy writes for a while it still terminates; an emptier Ready worker exists,
    // but a's sessions follow the earlier ones to r.
    w.write("a", 3);
    let plan = w.plan(1_020, &[terminating("a", 0), r.clone(), r2.clone()]);
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a->r LateSessions"]
    );
    assert_eq!(plan.actions[0].observed_at(), t(1_020));
    w.apply(1_020, &plan);
    assert_eq!((w.count("a"), w.count("r")), (0, 5));
    // Again, after a's pod is gone.
    w.write("a", 1);
    assert_eq!(w.step(1_030, &[r, r2]), ["a->r LateSessions"]);
    assert_eq!(w.count("r"), 6);
}

#[test]
fn late_sessions_after_a_delete_are_deleted_again() {
    let mut w = World::new(rules(), &[("a", 2)]);
    w.step(1_000, &[ready("a", 0, 5), ready("b", 0, 5)]);
    w.step(1_010, &[ready("b", 0, 5)]);
    assert_eq!(
        w.step(1_010 + WAIT, &[ready("b", 0, 5)]),
        ["a deleted Terminated"]
    );
    w.write("a", 1);
    assert_eq!(
        w.step(1_200, &[ready("b", 0, 5)]),
        ["a deleted LateSessions"]
    );
}

#[test]
fn late_sessions_become_a_departure_again_when_the_target_is_gone() {
    let mut w = World::new(rules(), &[("a", 2)]);
    w.step(1_000, &[ready("a", 0, 5)]);
    assert_eq!(
        w.step(1_060, &[terminating("a", 0), ready("r", 1_050, 1_055)]),
        ["a->r Replaced"]
    );
    // r leaves without a replacement: its sessions are deleted, so no chain leads on from r.
    w.step(1_080, &[terminating("r", 1_050)]);
    assert_eq!(w.step(1_080 + WAIT, &[]), ["r deleted Terminated"]);
    // a gets late sessions: nowhere to send them by memory, so a departs again.
    w.write("a", 2);
    let now = 1_090 + WAIT;
    let plan = w.plan(now, &[]);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.waiting, 1);
    assert_eq!(plan.wake_at, Some(t(now + WAIT)));
    let departure = w.memory.departures.get("a").expect("a departs again");
    assert!(departure.orphan);
    assert_eq!(departure.family, web());
    // A fresh pod of its family takes a's sessions.
    assert_eq!(
        w.step(now + 10, &[ready("r4", now + 5, now + 6)]),
        ["a->r4 Replaced"]
    );
    assert_eq!((w.count("a"), w.count("r4")), (0, 2));
}

/// Bug found by this test: `Memory::completed` took the family from the departure only, so
/// completing a `LateSessions` reroute (which has no departure) forgot the worker's family. When
/// the target later vanished and more late sessions came, the worker departed again with no
/// family, and any Ready worker — here the emptier pod of another Deployment — could take its
/// sessions. Fixed by keeping the family already recorded for the resolved worker.
#[test]
fn a_late_reroute_keeps_the_workers_family() {
    let mut w = World::new(rules(), &[("a", 2), ("w1", 10)]);
    let others = [family(ready("api-1", 0, 5), api()), ready("w1", 0, 5)];
    let with = |extra: &[Worker]| [extra, &others[..]].concat();
    w.step(1_000, &with(&[ready("a", 0, 5)]));
    assert_eq!(
        w.step(
            1_060,
            &with(&[terminating("a", 0), ready("r", 1_050, 1_055)])
        ),
        ["a->r Replaced"]
    );
    w.write("a", 1);
    assert_eq!(
        w.step(1_070, &with(&[ready("r", 1_050, 1_055)])),
        ["a->r LateSessions"]
    );
    // r vanishes (its own departure waits: w1 and api-1 are older); a gets late sessions again.
    w.write("a", 1);
    let shown = w.step(1_080, &others);
    assert_eq!(shown, ["a->w1 Replaced"], "a stays within its family");
}

#[test]
fn departures_without_sessions_resolve_without_actions() {
    let mut w = World::new(rules(), &[("b", 1)]);
    w.step(
        1_000,
        &[ready("a", 0, 5), ready("b", 0, 5), ready("c", 0, 5)],
    );
    let plan = w.plan(1_010, &[terminating("a", 0), ready("b", 0, 5)]);
    assert!(plan.actions.is_empty());
    assert_eq!((plan.waiting, plan.wake_at), (0, None));
    assert!(w.memory.departures.is_empty());
    assert_eq!(w.memory.resolution("a"), Some(&Resolution::Empty));
    assert_eq!(w.memory.resolution("c"), Some(&Resolution::Empty));
    assert!(w.memory.knows("a") && w.memory.knows("c"));
    // No action ever follows, replacement or not.
    assert!(
        w.step(1_020, &[ready("b", 0, 5), ready("r", 1_015, 1_016)])
            .is_empty()
    );
    assert!(w.step(1_010 + WAIT, &[ready("b", 0, 5)]).is_empty());
}

#[test]
fn an_empty_departure_that_gets_sessions_later_is_migrated() {
    let mut w = World::new(rules(), &[]);
    w.step(1_000, &[ready("a", 0, 5), ready("b", 0, 5)]);
    w.step(1_010, &[terminating("a", 0), ready("b", 0, 5)]);
    assert_eq!(w.memory.resolution("a"), Some(&Resolution::Empty));
    w.write("a", 2);
    // Found in the store without a pod that holds it: any Ready worker of its family.
    assert_eq!(
        w.step(1_020, &[terminating("a", 0), ready("b", 0, 5)]),
        ["a->b Replaced"]
    );
    assert_eq!(w.count("b"), 2);
}

#[test]
fn wake_at_is_the_earliest_pending_deadline() {
    let mut w = World::new(rules(), &[("a", 1), ("b", 1), ("web-7c9-x", 1)]);
    let stay = ready("s", 0, 5);
    w.step(1_000, &[ready("a", 0, 5), ready("b", 0, 5), stay.clone()]);
    let plan = w.plan(
        1_100,
        &[terminating("a", 0), ready("b", 0, 5), stay.clone()],
    );
    assert_eq!(plan.wake_at, Some(t(1_100 + WAIT)));
    // b departs later (deadline 1_200 + WAIT), an orphan appears (due at 1_200 + GRACE,
    // earlier than a's deadline).
    let plan = w.plan_with_orphans(
        1_200,
        &[terminating("b", 0), stay.clone()],
        &[("web-7c9-x", web())],
    );
    assert_eq!(plan.waiting, 2);
    assert_eq!(plan.wake_at, Some(t(1_200 + GRACE)));
    let plan = w.plan_with_orphans(
        1_210,
        &[terminating("b", 0), stay.clone()],
        &[("web-7c9-x", web())],
    );
    // The orphan became a departure and found s (orphans may use any Ready worker of their
    // family); a's deadline is still the earliest.
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["web-7c9-x->s Replaced"]
    );
    assert_eq!(plan.wake_at, Some(t(1_100 + WAIT)));
    w.apply(1_210, &plan);
    let plan = w.plan(1_100 + WAIT, std::slice::from_ref(&stay));
    assert_eq!(
        plan.actions.iter().map(show).collect::<Vec<_>>(),
        ["a deleted Terminated"]
    );
    assert_eq!(plan.wake_at, Some(t(1_200 + WAIT)));
}

#[test]
fn memory_forgets_resolved_workers_after_retention() {
    for (wait, retention) in [(WAIT, 600), (900, 900)] {
        let mut w = World::new(
            Rules {
                replacement_wait: Duration::from_secs(wait as u64),
                ..rules()
            },
            &[("a", 1)],
        );
        let b = ready("b", 0, 5);
        w.step(1_000, &[terminating("a", 0), b.clone()]);
        assert_eq!(
            w.step(1_000 + wait, std::slice::from_ref(&b)),
            ["a deleted Terminated"]
        );
        let resolved_at = 1_000 + wait;
        w.step(resolved_at + retention - 1, std::slice::from_ref(&b));
        assert!(w.memory.knows("a"), "kept within retention ({wait})");
        assert_eq!(w.memory.resolution("a"), Some(&Resolution::Deleted));
        w.step(resolved_at + retention, std::slice::from_ref(&b));
        assert!(!w.memory.knows("a"), "forgotten after retention ({wait})");
        assert_eq!(w.memory.resolution("a"), None);
        assert!(w.memory.departures.is_empty());
    }
}

#[test]
fn memory_keeps_resolved_workers_that_still_hold_sessions() {
    // A reroute that keeps failing for a resolved worker (the target is Ready, the store not):
    // it must not be forgotten while it holds sessions.
    let mut w = World::new(rules(), &[("a", 1)]);
    let r = ready("r", 990, 995);
    w.step(1_000, &[ready("a", 0, 5), r.clone()]);
    w.step(1_010, &[terminating("a", 0), r.clone()]);
    w.write("a", 1);
    for now in [1_100, 2_000, 5_000] {
        let plan = w.plan(now, std::slice::from_ref(&r));
        assert_eq!(
            plan.actions.iter().map(show).collect::<Vec<_>>(),
            ["a->r LateSessions"]
        );
        // Not applied: the store failed.
    }
    assert!(w.memory.knows("a"));
}

#[test]
fn a_departure_whose_action_failed_is_planned_again() {
    let mut w = World::new(rules(), &[("a", 3)]);
    let r = ready("r", 990, 995);
    w.step(1_000, &[ready("a", 0, 5), r.clone()]);
    let first = w.plan(1_010, &[terminating("a", 0), r.clone()]);
    assert_eq!(
        first.actions.iter().map(show).collect::<Vec<_>>(),
        ["a->r Replaced"]
    );
    // Not executed (store error): the next pass plans the same migration.
    let again = w.plan(1_020, std::slice::from_ref(&r));
    assert_eq!(again.actions, first.actions);
    w.apply(1_020, &again);
    assert_eq!(w.count("r"), 3);
}

#[test]
fn a_worker_recreated_after_its_migration_is_forgotten_as_resolved() {
    // StatefulSet-style reuse after a completed migration: the live pod owns the id again, so
    // new sessions on it are not "late".
    let mut w = World::new(rules(), &[("db-0", 2)]);
    let pod = |p: Worker| family(p, sts());
    w.step(1_000, &[pod(ready("db-0", 0, 5)), pod(ready("db-1", 1, 6))]);
    w.step(1_010, &[pod(ready("db-1", 1, 6))]);
    assert_eq!(
        w.step(1_010 + WAIT, &[pod(ready("db-1", 1, 6))]),
        ["db-0 deleted Terminated"]
    );
    let db0 = pod(ready("db-0", 1_200, 1_205));
    assert!(
        w.step(1_210, &[db0.clone(), pod(ready("db-1", 1, 6))])
            .is_empty()
    );
    assert_eq!(w.memory.resolution("db-0"), None);
    w.write("db-0", 4);
    assert!(w.step(1_220, &[db0, pod(ready("db-1", 1, 6))]).is_empty());
    assert_eq!(w.count("db-0"), 4);
}

// ---------------------------------------------------------------------------------------------
// Property tests: random pod histories against a simulated store.

/// Families of the simulated pool: two Deployments and a StatefulSet.
fn sim_family(f: u8) -> Family {
    match f % 3 {
        0 => Family::Deployment("f0".into()),
        1 => Family::Deployment("f1".into()),
        _ => Family::StatefulSet("s2".into()),
    }
}

/// Worker ids look like the pods' names, so a family claims its orphans by name.
fn sim_id(f: u8, n: usize) -> String {
    match f % 3 {
        2 => format!("s2-{n}"),
        f => format!("f{f}-h{n}-x{n}"),
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A new pod; Ready at once or later.
    Add { family: u8, ready: bool },
    /// Pod i (modulo the pod count) turns Ready.
    Ready(usize),
    /// Pod i loses readiness.
    Unready(usize),
    /// Pod i is deleted (terminating) or finishes.
    Depart(usize),
    /// Pod i disappears without a terminating state ever being seen.
    Vanish(usize),
    /// Pod i is replaced by a new pod with the same worker id (StatefulSet).
    Reuse(usize),
    /// A (possibly lagging) proxy writes sessions for any id ever seen.
    Write { target: usize, n: u64 },
    /// Time passes.
    Advance(u16),
    /// The actions of the next pass fail (a store error, a lost lease): started, then failed;
    /// with `moved`, after their batches landed (the error came with the final count).
    FailNext { moved: bool },
    /// The actions of the next pass stay in flight for two more passes: the first sees them
    /// running (nothing moved yet); the second sees their effect in the store, and they are
    /// reported completed only after it planned (the worst order for the planner).
    DeferNext,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, any::<bool>()).prop_map(|(family, ready)| Op::Add { family, ready }),
        2 => (0usize..8).prop_map(Op::Ready),
        1 => (0usize..8).prop_map(Op::Unready),
        2 => (0usize..8).prop_map(Op::Depart),
        2 => (0usize..8).prop_map(Op::Vanish),
        1 => (0usize..8).prop_map(Op::Reuse),
        4 => (0usize..16, 1u64..20).prop_map(|(target, n)| Op::Write { target, n }),
        3 => (0u16..400).prop_map(Op::Advance),
        1 => any::<bool>().prop_map(|moved| Op::FailNext { moved }),
        2 => Just(Op::DeferNext),
    ]
}

fn sim_rules() -> impl Strategy<Value = Rules> {
    (any::<bool>(), any::<bool>(), 0u64..300, 0u64..60).prop_map(
        |(replace_delete, terminate_reroute, wait, grace)| Rules {
            on_replace: if replace_delete {
                OnReplace::Delete
            } else {
                OnReplace::Reroute
            },
            on_terminate: if terminate_reroute {
                OnTerminate::Reroute
            } else {
                OnTerminate::Delete
            },
            replacement_wait: Duration::from_secs(wait),
            orphan_grace: Duration::from_secs(grace),
        },
    )
}

#[derive(Debug, Clone)]
struct SimPod {
    id: String,
    family: u8,
    created: i64,
    ready_since: Option<i64>,
    departing: bool,
    /// Creation order: the watch saw the pods appear one after another.
    seq: u64,
}

struct Sim {
    rules: Rules,
    memory: Memory,
    now: i64,
    pods: Vec<SimPod>,
    next: usize,
    /// Every worker id ever used, with its family, for lagging writers and orphan claims.
    ids: Vec<(String, u8)>,
    sessions: BTreeMap<String, u64>,
    written: u64,
    deleted: u64,
    fail_next: Option<bool>,
    defer_next: bool,
    /// Every action stays in flight for two passes (as with [`Op::DeferNext`]).
    slow: bool,
    /// Actions started by an earlier pass and not reported back yet, with whether they
    /// already ran through one pass.
    in_flight: Vec<(Action, bool)>,
    /// Replacement → when a `Replaced` reroute onto it started, and from which departure,
    /// while it stays live and within the planner's retention.
    replaced_onto: BTreeMap<String, (i64, String)>,
}

impl Sim {
    fn new(rules: Rules) -> Self {
        Self {
            rules,
            memory: Memory::default(),
            now: 1_000,
            pods: Vec::new(),
            next: 0,
            ids: Vec::new(),
            sessions: BTreeMap::new(),
            written: 0,
            deleted: 0,
            fail_next: None,
            defer_next: false,
            slow: false,
            in_flight: Vec::new(),
            replaced_onto: BTreeMap::new(),
        }
    }

    fn add(&mut self, family: u8, ready: bool) {
        let id = sim_id(family, self.next);
        self.next += 1;
        self.ids.push((id.clone(), family));
        self.pods.push(SimPod {
            id,
            family,
            created: self.now,
            ready_since: ready.then_some(self.now),
            departing: false,
            seq: self.next as u64,
        });
    }

    fn apply_op(&mut self, op: &Op) {
        let len = self.pods.len();
        match *op {
            Op::Add { family, ready } => self.add(family, ready),
            Op::Ready(i) if len > 0 => {
                let p = &mut self.pods[i % len];
                if !p.departing && p.ready_since.is_none() {
                    p.ready_since = Some(self.now);
                }
            }
            Op::Unready(i) if len > 0 => self.pods[i % len].ready_since = None,
            Op::Depart(i) if len > 0 => {
                let p = &mut self.pods[i % len];
                p.departing = true;
                p.ready_since = None;
            }
            Op::Vanish(i) if len > 0 => {
                self.pods.remove(i % len);
            }
            Op::Reuse(i) if len > 0 => {
                let seq = self.next as u64;
                self.next += 1;
                let p = &mut self.pods[i % len];
                p.created = self.now;
                p.ready_since = None;
                p.departing = false;
                p.seq = seq;
            }
            Op::Write { target, n } if !self.ids.is_empty() => {
                let id = self.ids[target % self.ids.len()].0.clone();
                *self.sessions.entry(id).or_default() += n;
                self.written += n;
            }
            Op::Advance(secs) => self.now += i64::from(secs),
            Op::FailNext { moved } => self.fail_next = Some(moved),
            Op::DeferNext => self.defer_next = true,
            _ => {}
        }
    }

    fn workers(&self) -> Vec<Worker> {
        self.pods
            .iter()
            .map(|p| {
                let ready = p.ready_since.is_some() && !p.departing;
                Worker {
                    id: p.id.clone(),
                    pod: p.id.clone(),
                    ready,
                    departing: p.departing,
                    ready_since: p.ready_since.filter(|_| ready).map(t),
                    created: Some(t(p.created)),
                    family: Some(sim_family(p.family)),
                    deletion_cost: None,
                    departed_at: None,
                    observed: Some(Observed {
                        seq: p.seq,
                        at: t(p.created),
                        listed: false,
                        departed: None,
                    }),
                    owner: None,
                }
            })
            .collect()
    }

    /// Applies an action to the simulated store.
    fn execute(&mut self, action: &Action) {
        match action {
            Action::Reroute { from, to, .. } => {
                let moved = self.sessions.remove(from).unwrap_or(0);
                *self.sessions.entry(to.clone()).or_default() += moved;
            }
            Action::Delete { worker, .. } => {
                self.deleted += self.sessions.remove(worker).unwrap_or(0);
            }
        }
    }

    /// The per-pass invariants of a plan's actions.
    fn check_actions(
        &self,
        plan: &Plan,
        workers: &[Worker],
        live: &BTreeSet<&str>,
        landed: &[Action],
        running: &[Action],
    ) -> Result<(), TestCaseError> {
        let mut replacements = BTreeSet::new();
        let mut sources = BTreeSet::new();
        for action in &plan.actions {
            // (2) Sessions of a live worker stay where they are.
            prop_assert!(
                !live.contains(action.worker()),
                "action on live worker: {action:?}\nworkers: {workers:?}"
            );
            prop_assert!(
                sources.insert(action.worker().to_string()),
                "two actions for one worker: {:?}",
                plan.actions
            );
            prop_assert!(
                !landed
                    .iter()
                    .chain(running)
                    .any(|a| a.worker() == action.worker()),
                "planned again while in flight: {action:?}\nin flight: {landed:?} {running:?}"
            );
            if let Action::Reroute {
                from, to, reason, ..
            } = action
            {
                // (1) Only ever onto a Ready pod, never onto a departing one.
                prop_assert!(
                    workers.iter().any(|w| &w.id == to && w.ready),
                    "reroute to a worker that is not Ready: {action:?}\nworkers: {workers:?}"
                );
                prop_assert!(
                    !workers.iter().any(|w| &w.id == to && w.departing),
                    "reroute to a departing worker: {action:?}"
                );
                prop_assert_ne!(from, to);
                if *reason == Reason::Replaced {
                    prop_assert!(
                        replacements.insert(to.clone()),
                        "two departures onto one replacement: {:?}",
                        plan.actions
                    );
                    prop_assert!(
                        self.replaced_onto
                            .get(to)
                            .is_none_or(|(_, earlier)| earlier == from),
                        "{to} replaced another departure already: {action:?}"
                    );
                }
            }
        }
        Ok(())
    }

    /// One controller pass; checks the per-pass invariants.
    fn pass(&mut self) -> Result<(), TestCaseError> {
        let (landed, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|(_, aged)| *aged);
        let landed: Vec<Action> = landed.into_iter().map(|(a, _)| a).collect();
        let running: Vec<Action> = running.into_iter().map(|(a, _)| a).collect();
        for action in &landed {
            self.execute(action);
        }
        let workers = self.workers();
        let with_sessions: BTreeSet<String> = self
            .sessions
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(id, _)| id.clone())
            .collect();
        // As the controller: ids holding sessions that match no pod and that the memory does
        // not know, claimed by their name's family.
        let orphans: BTreeMap<String, Option<Family>> = self
            .ids
            .iter()
            .filter(|(id, _)| with_sessions.contains(id))
            .filter(|(id, _)| !workers.iter().any(|w| &w.id == id))
            .filter(|(id, _)| !self.memory.knows(id))
            .map(|(id, f)| (id.clone(), Some(sim_family(*f))))
            .collect();
        let plan = plan(
            &mut self.memory,
            &Input {
                now: t(self.now),
                rules: &self.rules,
                workers: &workers,
                with_sessions: &with_sessions,
                orphans: &orphans,
                loads: &self.sessions,
                unselected: &BTreeSet::new(),
                seen_through: self.next as u64 + 1,
            },
        );

        let live: BTreeSet<&str> = workers
            .iter()
            .filter(|w| !w.departing)
            .map(|w| w.id.as_str())
            .collect();
        let retention = self
            .rules
            .replacement_wait
            .max(Duration::from_secs(600))
            .as_secs() as i64;
        let now = self.now;
        self.replaced_onto
            .retain(|id, (at, _)| live.contains(id.as_str()) && now < *at + retention);
        self.check_actions(&plan, &workers, &live, &landed, &running)?;

        let now = t(self.now);
        for action in &landed {
            self.memory.completed(action, now);
        }
        self.in_flight
            .extend(running.into_iter().map(|action| (action, true)));
        let fail = self.fail_next.take();
        let defer = std::mem::take(&mut self.defer_next) || self.slow;
        for action in &plan.actions {
            self.memory.started(action, now);
            if let Action::Reroute {
                from,
                to,
                reason: Reason::Replaced,
                ..
            } = action
            {
                self.replaced_onto
                    .insert(to.clone(), (self.now, from.clone()));
            }
            if let Some(moved) = fail {
                if moved {
                    self.execute(action);
                }
                self.memory.failed(action);
            } else if defer {
                self.in_flight.push((action.clone(), false));
            } else {
                self.execute(action);
                self.memory.completed(action, now);
            }
        }
        // (4) Reroutes never lose sessions: only deletes remove them.
        let total: u64 = self.sessions.values().sum();
        prop_assert_eq!(total, self.written - self.deleted);
        Ok(())
    }

    /// Ids holding sessions without a live (non-departing) pod.
    fn stranded(&self) -> Vec<(String, u64)> {
        self.sessions
            .iter()
            .filter(|(_, n)| **n > 0)
            .filter(|(id, _)| !self.pods.iter().any(|p| &p.id == *id && !p.departing))
            .map(|(id, n)| (id.clone(), *n))
            .collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn random_histories_keep_the_invariants_and_converge(
        rules in sim_rules(),
        initial in prop::collection::vec((0u8..3, any::<bool>()), 0..5),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        run_history(Sim::new(rules), initial, &ops)?;
    }

    /// Every migration outlives the pass that planned it and the next one: passes plan while
    /// migrations run, as in a rolling update's waves.
    #[test]
    fn random_histories_with_slow_migrations_keep_the_invariants_and_converge(
        rules in sim_rules(),
        initial in prop::collection::vec((0u8..3, any::<bool>()), 0..5),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let mut sim = Sim::new(rules);
        sim.slow = true;
        run_history(sim, initial, &ops)?;
    }
}

/// Plays a history pass by pass, then lets it settle and checks that nothing is stranded.
fn run_history(mut sim: Sim, initial: Vec<(u8, bool)>, ops: &[Op]) -> Result<(), TestCaseError> {
    for (family, ready) in initial {
        sim.add(family, ready);
    }
    sim.pass()?;
    for op in ops {
        sim.apply_op(op);
        sim.pass()?;
    }

    // Settle: the pods stay as they are, at least one of them Ready, no more writes, and
    // time moves past every grace and wait.
    if !sim
        .pods
        .iter()
        .any(|p| p.ready_since.is_some() && !p.departing)
    {
        sim.add(0, true);
    }
    let step = (sim.rules.replacement_wait + sim.rules.orphan_grace).as_secs() as i64 + 1;
    for _ in 0..10 {
        sim.now += step;
        sim.pass()?;
    }
    // (3) Every departed worker's sessions were rerouted or deleted.
    let stranded = sim.stranded();
    prop_assert!(
        stranded.is_empty(),
        "sessions left on departed workers: {stranded:?}\npods: {:?}\nmemory: {:?}",
        sim.pods,
        sim.memory
    );
    Ok(())
}
