//! The migration planner: pure decision logic, no I/O.
//!
//! Input: the policy's worker pods, which worker ids hold sessions in the store, approximate
//! loads, the policy's rules, the time, and the planner's [`Memory`] of earlier passes. Output:
//! the store actions to take now and when to look again. The controller hands each action it
//! executes to [`Memory::started`] and reports its end with [`Memory::completed`] or
//! [`Memory::failed`]; actions run outside the pass, so later passes may plan while they run.
//!
//! Semantics (level-triggered, so nothing depends on seeing every watch event):
//!
//! - **Departure**: a worker pod that is terminating or finished, one that disappeared since
//!   the last pass, or — after `orphan_grace` — a worker id holding sessions that belongs to the
//!   policy (by memory, or by its name's family) but matches no pod.
//! - **Replacement**: a Ready, non-departing worker created after the departed pod and at most
//!   `max(replacement_wait, ARRIVAL_WINDOW)` before the departure (with surge it is often Ready
//!   first), that is not the replacement of another departure. Same family first, then least
//!   loaded, then the first Ready. A worker id reused by a live pod (StatefulSet) needs no
//!   migration, and a StatefulSet pod is replaced only by the pod recreated under its name.
//! - **Termination**: no replacement within `replacement_wait` → `on_terminate`.
//! - **Late sessions**: a worker already migrated that holds sessions again (a proxy lagging
//!   behind) is migrated again, to the same target while it is Ready.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::workers::{Family, Observed, Worker};
use crate::policy::{OnReplace, OnTerminate};

/// The policy's rules, as the planner needs them.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub on_replace: OnReplace,
    pub on_terminate: OnTerminate,
    pub replacement_wait: Duration,
    /// How long an unknown worker id must hold sessions without a pod before it counts as
    /// departed: a pod the watch has not shown yet must not be taken for a vanished one.
    pub orphan_grace: Duration,
}

/// A worker as [`Memory::remembered`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Remembered {
    pub pod: Option<String>,
    pub family: Option<Family>,
    pub created: Option<Timestamp>,
    pub departed: Option<Timestamp>,
}

/// One pass's view of the world.
#[derive(Debug)]
pub(crate) struct Input<'a> {
    pub now: Timestamp,
    pub rules: &'a Rules,
    /// The policy's worker pods (with worker ids), live or departing.
    pub workers: &'a [Worker],
    /// Worker ids that hold sessions in the store.
    pub with_sessions: &'a BTreeSet<String>,
    /// Worker ids holding sessions, matching no pod of any policy, that this policy claims
    /// (by the name's family), with that family.
    pub orphans: &'a BTreeMap<String, Option<Family>>,
    /// Approximate session counts per worker, for "least loaded".
    pub loads: &'a BTreeMap<String, u64>,
    /// Worker ids of pods that exist and are not departing but that the policy no longer
    /// selects (relabelled out of rotation, a narrowed selector). Proxies may still route to
    /// them: their sessions are left alone, never taken for a departure.
    pub unselected: &'a BTreeSet<String>,
    /// The watch's numbering (see [`Observed::seq`]) when this pass read the pods: every pod it
    /// sees was first shown by a watch with a lower number.
    pub seen_through: u64,
}

/// What to do with a departed worker's sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    Reroute {
        from: String,
        to: String,
        /// When the departure was observed, for the migration latency metric.
        observed_at: Timestamp,
        reason: Reason,
    },
    Delete {
        worker: String,
        observed_at: Timestamp,
        reason: Reason,
    },
}

impl Action {
    /// The departed worker the action migrates.
    pub(crate) fn worker(&self) -> &str {
        match self {
            Action::Reroute { from, .. } => from,
            Action::Delete { worker, .. } => worker,
        }
    }

    /// When the departure (or the late sessions) the action handles was observed.
    pub(crate) fn observed_at(&self) -> Timestamp {
        match self {
            Action::Reroute { observed_at, .. } | Action::Delete { observed_at, .. } => {
                *observed_at
            }
        }
    }
}

/// Why an action was planned; becomes the Event's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// A departed worker with a Ready replacement.
    Replaced,
    /// No replacement within `replacementWait`.
    Terminated,
    /// Sessions written for a worker after it was migrated.
    LateSessions,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::Replaced => "Replaced",
            Reason::Terminated => "Terminated",
            Reason::LateSessions => "LateSessions",
        }
    }
}

/// The result of one pass.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub actions: Vec<Action>,
    /// The earliest time a waiting departure needs another look.
    pub wake_at: Option<Timestamp>,
    /// Departures waiting for a replacement or for a Ready worker.
    pub waiting: usize,
    /// Departures that `on_terminate: Reroute` cannot place: no worker of the policy is Ready.
    pub stuck_no_ready_worker: usize,
}

/// A departure the planner is tracking.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Departure {
    pub observed_at: Timestamp,
    pub created: Option<Timestamp>,
    pub family: Option<Family>,
    /// The departed pod's name, when a pod was seen: a StatefulSet pod is replaced only by the
    /// pod of the same name.
    pub pod: Option<String>,
    /// Found in the store without a pod: any Ready worker of its family may replace it.
    pub orphan: bool,
    /// When the watch first showed the departed pod, to order pods created in its second.
    pub observed: Option<Observed>,
    /// The departed pod's controller (`Kind/name`).
    pub owner: Option<String>,
}

/// What the planner remembers of a worker it saw in the last pass.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Seen {
    pub family: Option<Family>,
    pub created: Option<Timestamp>,
    pub pod: String,
    pub observed: Option<Observed>,
    pub owner: Option<String>,
}

impl Seen {
    fn of(w: &Worker) -> Self {
        Self {
            family: w.family.clone(),
            created: w.created,
            pod: w.pod.clone(),
            observed: w.observed,
            owner: w.owner.clone(),
        }
    }
}

/// How a departure ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resolution {
    Rerouted {
        to: String,
    },
    Deleted,
    /// It held no sessions when its turn came.
    Empty,
}

/// A worker of the policy known from the durable records (see [`Memory::restore`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Recorded {
    pub pod: String,
    pub family: Option<Family>,
    pub created: Option<Timestamp>,
    /// When a previous operator saw it depart, if it did.
    pub departed: Option<Timestamp>,
}

/// What the planner remembers between passes. The controller keeps the set of workers it knows
/// durably (see [`Memory::remembered`] and [`Memory::restore`]); the rest (pairings, in-flight
/// actions, late-session waits) is rebuilt from the store and the pods.
#[derive(Debug, Default, Clone)]
pub(crate) struct Memory {
    /// Workers known from the durable records and not seen since: a pass that finds no pod for
    /// one departs it (it vanished, or departed under a previous leader).
    recorded: BTreeMap<String, Recorded>,
    /// Workers seen in the last pass, to notice disappearances.
    last_seen: BTreeMap<String, Seen>,
    pub departures: BTreeMap<String, Departure>,
    /// Finished migrations, kept for `retention` to catch late sessions.
    resolved: BTreeMap<String, (Resolution, Timestamp, Option<Family>)>,
    /// Replacement worker → when it was paired; a worker replaces one departure only.
    paired: BTreeMap<String, Timestamp>,
    /// Departed worker → the replacement its planned `Delete` (`onReplace: Delete`) was paired
    /// with, recorded in `paired` when the delete starts.
    delete_pairs: BTreeMap<String, String>,
    /// Workers whose action was handed to the executor and not reported back yet → the
    /// replacement the action pairs with. Migrations run outside the pass, so a pass must
    /// neither plan them again nor pair their replacement with another departure.
    in_flight: BTreeMap<String, Option<String>>,
    /// Departed worker → the replacement of its failed action, and what that action would
    /// have made of it. A migration commits in batches, so a failed one may already have moved
    /// some or all of the sessions: its replacement stays paired with this departure (another
    /// departure must not land on it too), the retry goes there again, and a departure found
    /// empty by the retry counts as migrated there (late sessions follow).
    unfinished: BTreeMap<String, (String, Resolution)>,
    /// [`Input::seen_through`] of the last pass: a pod that vanished since departed after
    /// every pod that pass saw had appeared.
    seen_through: Option<u64>,
    /// Unknown worker ids with sessions → first seen.
    orphans_seen: BTreeMap<String, Timestamp>,
    /// Migrated workers with late sessions whose target is live but not Ready → since when.
    late_waiting: BTreeMap<String, Timestamp>,
}

impl Memory {
    /// Records that an action of the last plan was handed to the executor. Until it is
    /// reported with [`Self::completed`] or [`Self::failed`], its worker is not planned again and
    /// a `Replaced` action's replacement stays paired.
    pub(crate) fn started(&mut self, action: &Action, now: Timestamp) {
        let id = action.worker();
        let target = match action {
            Action::Reroute {
                to,
                reason: Reason::Replaced,
                ..
            } => Some(to.clone()),
            Action::Delete {
                reason: Reason::Replaced,
                ..
            } => self.delete_pairs.get(id).cloned(),
            _ => None,
        };
        if let Some(target) = &target {
            self.paired.insert(target.clone(), now);
        }
        self.in_flight.insert(id.to_string(), target);
    }

    /// Records a successfully executed action.
    pub(crate) fn completed(&mut self, action: &Action, now: Timestamp) {
        let id = action.worker().to_string();
        self.unfinished.remove(&id);
        if let Some(Some(target)) = self.in_flight.remove(&id) {
            // Retention of the pairing counts from the moment the sessions arrived.
            self.paired.insert(target, now);
        }
        // A late-sessions action has no departure: keep the family already known.
        let family = match self.departures.remove(&id) {
            Some(d) => d.family,
            None => self.resolved.get(&id).and_then(|(_, _, f)| f.clone()),
        };
        let resolution = match action {
            Action::Reroute { to, .. } => Resolution::Rerouted { to: to.clone() },
            Action::Delete { .. } => Resolution::Deleted,
        };
        self.resolved.insert(id, (resolution, now, family));
    }

    /// Records an action that failed: its worker is planned again by the next pass, onto the
    /// same replacement while that one is Ready (see [`Memory::unfinished`]); the replacement
    /// stays paired with it either way, since the failed action may have moved sessions there.
    pub(crate) fn failed(&mut self, action: &Action) {
        if let Some(Some(target)) = self.in_flight.remove(action.worker()) {
            let resolution = match action {
                Action::Reroute { to, .. } => Resolution::Rerouted { to: to.clone() },
                Action::Delete { .. } => Resolution::Deleted,
            };
            self.unfinished
                .insert(action.worker().to_string(), (target, resolution));
        }
    }

    /// How many actions are executing.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Worker ids the planner has seen or tracked, and so claims for this policy.
    pub(crate) fn knows(&self, id: &str) -> bool {
        self.last_seen.contains_key(id)
            || self.departures.contains_key(id)
            || self.resolved.contains_key(id)
            || self.recorded.contains_key(id)
    }

    /// Every id this memory tracks: the ones [`Memory::knows`], and the orphans it watches.
    pub(crate) fn tracked_ids(&self) -> impl Iterator<Item = &str> {
        self.last_seen
            .keys()
            .chain(self.departures.keys())
            .chain(self.resolved.keys())
            .chain(self.recorded.keys())
            .chain(self.orphans_seen.keys())
            .map(String::as_str)
    }

    /// Adds the workers of the durable records that this memory does not know yet. The next
    /// pass departs each one whose id no pod holds: a vanished worker, or one whose departure a
    /// previous leader observed, is completed like a departure seen here (its replacement is
    /// any Ready worker of its family, as for an orphan).
    pub(crate) fn restore(&mut self, records: impl IntoIterator<Item = (String, Recorded)>) {
        for (id, record) in records {
            if !self.knows(&id) {
                self.recorded.insert(id, record);
            }
        }
    }

    /// Every worker this memory knows, as the durable records should hold it: serving workers
    /// without `departed`, departures and resolved ones (kept while late sessions may follow)
    /// with it. Pod details the memory no longer holds (resolved workers) are `None`.
    pub(crate) fn remembered(&self) -> BTreeMap<String, Remembered> {
        let mut out: BTreeMap<String, Remembered> = BTreeMap::new();
        for (id, r) in &self.recorded {
            out.insert(
                id.clone(),
                Remembered {
                    pod: Some(r.pod.clone()),
                    family: r.family.clone(),
                    created: r.created,
                    departed: r.departed,
                },
            );
        }
        for (id, seen) in &self.last_seen {
            out.insert(
                id.clone(),
                Remembered {
                    pod: Some(seen.pod.clone()),
                    family: seen.family.clone(),
                    created: seen.created,
                    departed: None,
                },
            );
        }
        for (id, (_, at, family)) in &self.resolved {
            out.insert(
                id.clone(),
                Remembered {
                    pod: None,
                    family: family.clone(),
                    created: None,
                    departed: Some(*at),
                },
            );
        }
        for (id, d) in &self.departures {
            out.insert(
                id.clone(),
                Remembered {
                    pod: d.pod.clone(),
                    family: d.family.clone(),
                    created: d.created,
                    departed: Some(d.observed_at),
                },
            );
        }
        out
    }

    pub(crate) fn resolution(&self, id: &str) -> Option<&Resolution> {
        self.resolved.get(id).map(|(r, _, _)| r)
    }
}

fn after(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

fn before(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_sub(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MIN)
}

/// Runs one pass: updates `memory` with what it observes and returns the actions to take.
pub(crate) fn plan(memory: &mut Memory, input: &Input<'_>) -> Plan {
    let mut plan = Plan::default();
    let pass = Pass::new(input);
    note_departures(memory, &pass);
    note_orphans(memory, &pass, &mut plan);
    // Loads as this plan changes them.
    let mut loads = input.loads.clone();
    late_sessions(memory, &pass, &mut plan);
    pair_departures(memory, &pass, &mut loads, &mut plan);
    forget(memory, &pass);
    plan
}

/// What every step of a pass reads.
struct Pass<'a> {
    input: &'a Input<'a>,
    now: Timestamp,
    rules: &'a Rules,
    /// How long resolved migrations and pairings are remembered.
    retention: Duration,
    /// Ids held by a live (non-departing) pod: their sessions stay where they are.
    live: BTreeSet<&'a str>,
    ready: Vec<&'a Worker>,
}

impl<'a> Pass<'a> {
    fn new(input: &'a Input<'a>) -> Self {
        let live = input
            .workers
            .iter()
            .filter(|w| !w.departing)
            .map(|w| w.id.as_str())
            .chain(input.unselected.iter().map(String::as_str))
            .collect();
        Self {
            input,
            now: input.now,
            rules: input.rules,
            retention: input.rules.replacement_wait.max(Duration::from_secs(600)),
            live,
            ready: input.workers.iter().filter(|w| w.ready).collect(),
        }
    }
}

/// Step 1. Departures: terminating/finished pods, pods gone since the last pass, and recorded
/// workers no pod holds.
fn note_departures(memory: &mut Memory, pass: &Pass<'_>) {
    let (input, now, live) = (pass.input, pass.now, &pass.live);
    for w in input.workers.iter().filter(|w| w.departing) {
        if !live.contains(w.id.as_str()) && !memory.resolved.contains_key(&w.id) {
            memory.departures.entry(w.id.clone()).or_insert(Departure {
                // The deletion request, when known: a pass that runs late must not make a
                // replacement that was Ready in time look too old.
                observed_at: w.departed_at.map_or(now, |t| t.min(now)),
                created: w.created,
                family: w.family.clone(),
                pod: Some(w.pod.clone()),
                orphan: false,
                observed: w.observed,
                owner: w.owner.clone(),
            });
        }
    }
    let present: BTreeSet<&str> = input.workers.iter().map(|w| w.id.as_str()).collect();
    for (id, seen) in &memory.last_seen {
        if !present.contains(id.as_str()) && !memory.resolved.contains_key(id) {
            memory.departures.entry(id.clone()).or_insert(Departure {
                observed_at: now,
                created: seen.created,
                family: seen.family.clone(),
                pod: Some(seen.pod.clone()),
                orphan: false,
                observed: seen.observed.map(|o| vanished(o, memory.seen_through)),
                owner: seen.owner.clone(),
            });
        }
    }
    memory.seen_through = Some(input.seen_through);
    // Unselected pods stay remembered: when they are deleted later, they depart like any worker.
    let mut seen: BTreeMap<String, Seen> = input
        .workers
        .iter()
        .map(|w| (w.id.clone(), Seen::of(w)))
        .collect();
    for (id, info) in std::mem::take(&mut memory.last_seen) {
        if input.unselected.contains(&id) {
            seen.entry(id).or_insert(info);
        }
    }
    memory.last_seen = seen;

    // Recorded workers: one a pod holds is simply a worker again; one no pod holds departed
    // while this memory did not watch (or under the previous leader).
    for (id, record) in std::mem::take(&mut memory.recorded) {
        if present.contains(id.as_str()) {
            continue;
        }
        if live.contains(id.as_str()) {
            // A pod the policy no longer selects: remembered, like any unselected worker.
            memory.last_seen.entry(id).or_insert(Seen {
                family: record.family,
                created: record.created,
                pod: record.pod,
                observed: None,
                owner: None,
            });
            continue;
        }
        if memory.departures.contains_key(&id) || memory.resolved.contains_key(&id) {
            continue;
        }
        memory.departures.insert(
            id,
            Departure {
                observed_at: record.departed.map_or(now, |t| t.min(now)),
                created: record.created,
                family: record.family,
                pod: Some(record.pod),
                orphan: true,
                observed: None,
                owner: None,
            },
        );
    }

    // A live pod holds the id again (a StatefulSet's reused name): nothing to migrate.
    memory
        .departures
        .retain(|id, _| !live.contains(id.as_str()));
    memory.resolved.retain(|id, _| !live.contains(id.as_str()));
}

/// The observation of a pod that vanished between two passes without a pass seeing it depart
/// (deleted at once, or terminating only briefly). Its departure is known to have come after
/// every pod the last pass saw: a sibling that pass saw is a peer (the next pod of a rollout,
/// not its replacement), one that appeared later may replace it (see [`sibling_order`]).
fn vanished(o: Observed, last_pass: Option<u64>) -> Observed {
    Observed {
        // Numbered just below the pods that appeared after that pass (`seq >= last_pass`).
        departed: o
            .departed
            .or_else(|| last_pass.map(|seq| (seq.saturating_sub(1), false))),
        ..o
    }
}

/// Step 2. Orphans: unknown ids with sessions, after a grace period.
fn note_orphans(memory: &mut Memory, pass: &Pass<'_>, plan: &mut Plan) {
    let (input, now, rules) = (pass.input, pass.now, pass.rules);
    memory
        .orphans_seen
        .retain(|id, _| input.orphans.contains_key(id));
    for (id, family) in input.orphans {
        if memory.departures.contains_key(id) || memory.resolved.contains_key(id) {
            continue;
        }
        let first = *memory.orphans_seen.entry(id.clone()).or_insert(now);
        let due = after(first, rules.orphan_grace);
        if now >= due {
            memory.orphans_seen.remove(id);
            memory.departures.insert(
                id.clone(),
                Departure {
                    observed_at: now,
                    created: None,
                    family: family.clone(),
                    pod: None,
                    orphan: true,
                    observed: None,
                    owner: None,
                },
            );
        } else {
            plan.wake_at = earliest(plan.wake_at, due);
        }
    }
}

/// Step 3. Late sessions on workers already migrated.
fn late_sessions(memory: &mut Memory, pass: &Pass<'_>, plan: &mut Plan) {
    let (input, now, rules, live, ready) =
        (pass.input, pass.now, pass.rules, &pass.live, &pass.ready);
    let mut late = Vec::new();
    let mut late_waiting = std::mem::take(&mut memory.late_waiting);
    late_waiting.retain(|id, _| input.with_sessions.contains(id));
    for (id, (resolution, at, family)) in &memory.resolved {
        if !input.with_sessions.contains(id) || memory.in_flight.contains_key(id) {
            continue;
        }
        // Follow the target's own migrations: A→B then B→C sends A's late sessions to C.
        let mut target = match resolution {
            Resolution::Rerouted { to } => Some(to),
            _ => None,
        };
        let mut hops = 0;
        while let Some(Resolution::Rerouted { to }) = target
            .and_then(|t| memory.resolved.get(t))
            .map(|(r, _, _)| r)
        {
            hops += 1;
            if hops > 8 || to == id {
                break;
            }
            target = Some(to);
        }
        match resolution {
            Resolution::Rerouted { .. }
                if target.is_some_and(|to| ready.iter().any(|w| &w.id == to)) =>
            {
                plan.actions.push(Action::Reroute {
                    from: id.clone(),
                    to: target.cloned().unwrap_or_default(),
                    observed_at: now,
                    reason: Reason::LateSessions,
                });
            }
            // The target is live but not Ready at the moment: wait for it, at most
            // `replacement_wait`; then the sessions look for another worker.
            Resolution::Rerouted { .. }
                if target.is_some_and(|to| live.contains(to.as_str()))
                    && now
                        < after(
                            *late_waiting.entry(id.clone()).or_insert(now),
                            rules.replacement_wait,
                        ) =>
            {
                plan.waiting += 1;
                let since = late_waiting.get(id).copied().unwrap_or(now);
                plan.wake_at = earliest(plan.wake_at, after(since, rules.replacement_wait));
            }
            Resolution::Deleted => plan.actions.push(Action::Delete {
                worker: id.clone(),
                observed_at: now,
                reason: Reason::LateSessions,
            }),
            // The target is gone too, or nothing was there before: a departure again.
            _ => late.push((id.clone(), *at, family.clone())),
        }
    }
    memory.late_waiting = late_waiting;
    for (id, _, family) in late {
        memory.late_waiting.remove(&id);
        memory.resolved.remove(&id);
        memory.departures.insert(
            id,
            Departure {
                observed_at: now,
                created: None,
                family,
                pod: None,
                orphan: true,
                observed: None,
                owner: None,
            },
        );
    }
}

/// Step 4. Pair departures with replacements, oldest departure first; without one in time,
/// `on_terminate` applies.
fn pair_departures(
    memory: &mut Memory,
    pass: &Pass<'_>,
    loads: &mut BTreeMap<String, u64>,
    plan: &mut Plan,
) {
    let (input, now, rules, live, ready) =
        (pass.input, pass.now, pass.rules, &pass.live, &pass.ready);
    let retention = pass.retention;
    memory
        .paired
        .retain(|id, at| live.contains(id.as_str()) && now < after(*at, retention));
    // Pairs of deletes planned earlier and not started are planned afresh below.
    memory.delete_pairs.clear();
    let mut order: Vec<(String, Departure)> = memory
        .departures
        .iter()
        .map(|(id, d)| (id.clone(), d.clone()))
        .collect();
    order.sort_by(|a, b| (a.1.observed_at, &a.0).cmp(&(b.1.observed_at, &b.0)));
    let mut paired_now: BTreeSet<String> = BTreeSet::new();
    for (id, departure) in order {
        if memory.in_flight.contains_key(&id) {
            continue;
        }
        if !input.with_sessions.contains(&id) {
            memory.departures.remove(&id);
            // Emptied by an action that failed after its last batch: migrated all the same.
            let resolution = memory
                .unfinished
                .remove(&id)
                .map_or(Resolution::Empty, |(_, resolution)| resolution);
            memory
                .resolved
                .insert(id, (resolution, now, departure.family));
            continue;
        }
        // The retry of a failed action goes where that action went, while it is Ready: the
        // sessions it moved are there, and splitting a worker over two replacements would
        // leave the second one paired twice over.
        let retry = memory
            .unfinished
            .get(&id)
            .and_then(|(to, _)| ready.iter().find(|w| &w.id == to))
            .copied();
        let candidates: Vec<(&Worker, Fit)> = ready
            .iter()
            .filter(|w| w.id != id)
            .filter(|w| !memory.paired.contains_key(&w.id) && !paired_now.contains(&w.id))
            .filter_map(|w| fit(w, &departure, rules).map(|fit| (*w, fit)))
            .collect();
        let best = |wanted: Fit| {
            candidates
                .iter()
                .filter(|(_, fit)| *fit == wanted)
                .map(|(w, _)| *w)
                .min_by_key(|w| candidate_key(w, &departure, loads, input.with_sessions))
        };
        let deadline = after(departure.observed_at, rules.replacement_wait);
        // A replacement that is ambiguous (created in the departed pod's second, order unseen)
        // is taken only when the alternative is deleting the sessions: a move can be undone.
        let replacement = retry.or_else(|| best(Fit::Clear)).or_else(|| {
            (now >= deadline
                && rules.on_terminate == OnTerminate::Delete
                && rules.on_replace == OnReplace::Reroute)
                .then(|| best(Fit::Ambiguous))
                .flatten()
        });
        if let Some(to) = replacement {
            paired_now.insert(to.id.clone());
            plan.actions
                .push(replace(memory, pass, loads, id, &departure, to));
        } else if now < deadline {
            plan.waiting += 1;
            plan.wake_at = earliest(plan.wake_at, deadline);
        } else {
            terminate(pass, loads, plan, id, &departure);
        }
    }
}

/// The action that hands a departure's sessions to its replacement `to`.
fn replace(
    memory: &mut Memory,
    pass: &Pass<'_>,
    loads: &mut BTreeMap<String, u64>,
    id: String,
    departure: &Departure,
    to: &Worker,
) -> Action {
    match pass.rules.on_replace {
        OnReplace::Reroute => {
            let moved = pass.input.loads.get(&id).copied().unwrap_or(0);
            *loads.entry(to.id.clone()).or_default() += moved;
            Action::Reroute {
                from: id,
                to: to.id.clone(),
                observed_at: departure.observed_at,
                reason: Reason::Replaced,
            }
        }
        OnReplace::Delete => {
            memory.delete_pairs.insert(id.clone(), to.id.clone());
            Action::Delete {
                worker: id,
                observed_at: departure.observed_at,
                reason: Reason::Replaced,
            }
        }
    }
}

/// A departure without a replacement after `replacement_wait`: `on_terminate`.
fn terminate(
    pass: &Pass<'_>,
    loads: &mut BTreeMap<String, u64>,
    plan: &mut Plan,
    id: String,
    departure: &Departure,
) {
    let (input, ready) = (pass.input, &pass.ready);
    match pass.rules.on_terminate {
        OnTerminate::Delete => plan.actions.push(Action::Delete {
            worker: id,
            observed_at: departure.observed_at,
            reason: Reason::Terminated,
        }),
        OnTerminate::Reroute => {
            let target = ready
                .iter()
                .filter(|w| w.id != id)
                .min_by_key(|w| candidate_key(w, departure, loads, input.with_sessions));
            if let Some(to) = target {
                let moved = input.loads.get(&id).copied().unwrap_or(0);
                *loads.entry(to.id.clone()).or_default() += moved;
                plan.actions.push(Action::Reroute {
                    from: id,
                    to: to.id.clone(),
                    observed_at: departure.observed_at,
                    reason: Reason::Terminated,
                });
            } else {
                plan.waiting += 1;
                plan.stuck_no_ready_worker += 1;
            }
        }
    }
}

/// Step 5. Forget what no longer matters.
fn forget(memory: &mut Memory, pass: &Pass<'_>) {
    let (input, now, retention) = (pass.input, pass.now, pass.retention);
    let departures = &memory.departures;
    memory
        .unfinished
        .retain(|id, _| departures.contains_key(id));
    memory
        .resolved
        .retain(|id, (_, at, _)| input.with_sessions.contains(id) || now < after(*at, retention));
}

/// How well a Ready worker fits as the replacement of a departure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    /// It appeared after the departed pod.
    Clear,
    /// Neither time, the watch nor ownership tells whether it replaces the departed pod: two
    /// ownerless pods created in one second and both listed, or a newer sibling that was there
    /// before the departure.
    Ambiguous,
}

/// Whether `w` may replace `departure`: it appeared after the departed pod (see [`arrival`]),
/// and it is not a long-standing pod of a pool that merely shrank (created at most
/// [`ARRIVAL_WINDOW`] or `replacement_wait`, whichever is longer, before the departure). A surge
/// replacement is often created and Ready well before the old pod is deleted, so the window is
/// generous; pods that already replaced another departure, and departing pods (never Ready),
/// are excluded by the caller.
fn fit(w: &Worker, departure: &Departure, rules: &Rules) -> Option<Fit> {
    if departure.orphan {
        // Departed while nobody watched: any Ready worker of its family may take over.
        return (departure.family.is_none() || w.family == departure.family).then_some(Fit::Clear);
    }
    // A StatefulSet recreates a departed pod under its own name: its siblings, however new,
    // are not its replacement.
    if matches!(departure.family, Some(Family::StatefulSet(_)))
        && w.family == departure.family
        && departure.pod.as_ref().is_some_and(|pod| *pod != w.pod)
    {
        return None;
    }
    let window = rules.replacement_wait.max(ARRIVAL_WINDOW);
    if w.created
        .is_some_and(|created| created < before(departure.observed_at, window))
    {
        return None;
    }
    match arrival(w, departure) {
        Arrival::After => Some(Fit::Clear),
        Arrival::Before => None,
        Arrival::Unknown => Some(Fit::Ambiguous),
    }
}

/// Whether a worker appeared after a departed pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    After,
    Before,
    Unknown,
}

/// Orders `w` against the departed pod.
///
/// - A sibling of the same controller (ReplicaSet, Job, …) clearly replaces a pod only when it
///   appeared after the pod departed (a crash, an eviction); one the watch showed before the
///   departure is a peer (older) or ambiguous (newer: the next pod of a rollout), see
///   [`sibling_order`].
/// - `creationTimestamp` has one-second resolution: it decides only when the seconds differ.
/// - Within a second, the watch's order decides: a pod it saw appear came after one it listed,
///   and two it saw appear are ordered by when.
/// - Then ownership: a pod of another ReplicaSet of the same Deployment belongs to the newer
///   ReplicaSet; siblings created in one second were created together.
fn arrival(w: &Worker, d: &Departure) -> Arrival {
    let siblings = matches!((&w.owner, &d.owner), (Some(a), Some(b)) if a == b);
    if siblings && let Some(order) = sibling_order(w, d) {
        return order;
    }
    if let (Some(wc), Some(dc)) = (w.created, d.created) {
        let (ws, ds) = (wc.as_second(), dc.as_second());
        if ws != ds {
            return if ws > ds {
                Arrival::After
            } else {
                Arrival::Before
            };
        }
    }
    if let (Some(wo), Some(dobs)) = (w.observed, d.observed) {
        match (wo.listed, dobs.listed) {
            (false, false) if wo.seq > dobs.seq => return Arrival::After,
            (false | true, false) => return Arrival::Before,
            (false, true) => return Arrival::After,
            (true, true) => {}
        }
    }
    if siblings {
        return Arrival::Before;
    }
    if w.owner.is_some()
        && d.owner.is_some()
        && matches!(d.family, Some(Family::Deployment(_)))
        && w.family == d.family
    {
        return Arrival::After;
    }
    if w.created.is_none() || d.created.is_none() {
        // Nothing says it is older (no creation times at all): it may replace.
        return Arrival::After;
    }
    Arrival::Unknown
}

/// A sibling against its departed peer, by the watch. One that appeared after the departure
/// was seen is a replacement. One that was there before is a peer that merely stays when it is
/// also older than the departed pod, and ambiguous when it is newer (the next pod of a rollout,
/// or a pod started just before the old one was retired): it is taken only rather than delete.
/// `None` when the watch cannot tell (the departure was only listed, or not seen).
fn sibling_order(w: &Worker, d: &Departure) -> Option<Arrival> {
    let wo = w.observed?;
    let dobs = d.observed?;
    let (departed, departure_listed) = dobs.departed?;
    if departure_listed {
        return None;
    }
    if !wo.listed && wo.seq > departed {
        return Some(Arrival::After);
    }
    let newer = match (wo.listed, dobs.listed) {
        (false, false) => wo.seq > dobs.seq,
        (false, true) => true,
        (true, false) => false,
        (true, true) => {
            matches!((w.created, d.created), (Some(a), Some(b)) if a.as_second() > b.as_second())
        }
    };
    Some(if newer {
        Arrival::Unknown
    } else {
        Arrival::Before
    })
}

/// How long before a departure a pod may have been created and still count as its replacement.
pub(crate) const ARRIVAL_WINDOW: Duration = Duration::from_secs(300);

/// Sort key: same family first, then workers holding no session (a fresh pod rather than one
/// that may be the next to leave; `with_sessions` is read every pass, loads are sampled less
/// often), then least loaded, then the earliest Ready (a rolling update brings replacements up
/// in the order it removes old pods), then the first seen by the watch, then the id.
#[allow(clippy::type_complexity)]
fn candidate_key<'w>(
    w: &'w Worker,
    departure: &Departure,
    loads: &BTreeMap<String, u64>,
    with_sessions: &BTreeSet<String>,
) -> (bool, bool, u64, Option<Timestamp>, Option<u64>, &'w str) {
    let load = loads.get(&w.id).copied().unwrap_or(0);
    (
        departure.family.is_some() && w.family != departure.family,
        load > 0 || with_sessions.contains(&w.id),
        load,
        w.ready_since,
        w.observed.map(|o| o.seq),
        w.id.as_str(),
    )
}

fn earliest(current: Option<Timestamp>, t: Timestamp) -> Option<Timestamp> {
    Some(current.map_or(t, |c| c.min(t)))
}

#[cfg(test)]
#[path = "planner_tests.rs"]
mod tests;
