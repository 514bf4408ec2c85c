//! Kubernetes Events on policies, published by one background task.
//!
//! Passes and migrations only queue an Event: a rollout's next wave must not wait for one API
//! call per migration, and one publisher keeps the [`Recorder`]'s aggregation cache (repeats of
//! an Event become a series) free of races.
//!
//! Late-session migrations are summarised: under lagging writers a departed worker receives
//! sessions for a while and each pass moves the few that arrived, which made thousands of
//! Events and info lines in seconds. They are tallied per policy, worker and target and
//! reported once per [`LATE_SUMMARY_EVERY`] (one Event and one info line with the counts); each
//! migration is still logged at debug level.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};
use tokio::sync::mpsc;

use crate::leader::Fence;
use crate::policy::SessionPolicy;
use crate::telemetry::{ErrorKind, Metrics};

/// Events waiting to be published; beyond this, new ones are dropped (and counted as errors)
/// rather than letting a slow API server grow the operator's memory.
const QUEUE: usize = 4096;

/// How often late-session migrations are summarised (per policy, worker and target).
pub(super) const LATE_SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// One late-session migration, as reported to [`Events::late_sessions`].
#[derive(Debug, Clone)]
pub(super) struct LateMigration {
    pub namespace: String,
    pub policy: String,
    pub from: String,
    /// `None` for a delete.
    pub to: Option<String>,
    pub moved: u64,
    /// The departed pod, as the Event's related object.
    pub related: Option<ObjectReference>,
}

enum Queued {
    Event(ObjectReference, Event),
    Late(ObjectReference, LateMigration),
}

/// The sending side: cheap to clone, never blocks.
#[derive(Clone)]
pub(super) struct Events {
    queue: mpsc::Sender<Queued>,
    metrics: Metrics,
}

impl Events {
    /// Starts the publisher. It publishes only while this replica leads: a standby's Events
    /// would describe mutations it did not make.
    pub(super) fn spawn(recorder: Recorder, fence: Fence, metrics: Metrics) -> Self {
        let (queue, mut rx) = mpsc::channel::<Queued>(QUEUE);
        tokio::spawn({
            let metrics = metrics.clone();
            async move {
                let mut late = LateTally::default();
                let mut tick = tokio::time::interval(LATE_SUMMARY_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    let queued = tokio::select! {
                        queued = rx.recv() => queued,
                        _ = tick.tick() => {
                            for (reference, event) in late.drain(fence.identity()) {
                                publish(&recorder, &fence, &metrics, &reference, &event).await;
                            }
                            continue;
                        }
                    };
                    match queued {
                        Some(Queued::Event(reference, event)) => {
                            publish(&recorder, &fence, &metrics, &reference, &event).await;
                        }
                        Some(Queued::Late(reference, migration)) => late.add(reference, migration),
                        None => break,
                    }
                }
                for (reference, event) in late.drain(fence.identity()) {
                    publish(&recorder, &fence, &metrics, &reference, &event).await;
                }
            }
        });
        Self { queue, metrics }
    }

    /// Queues an Event on `policy`.
    pub(super) fn publish(&self, policy: &SessionPolicy, event: Event) {
        self.send(Queued::Event(reference(policy), event));
    }

    /// Tallies a late-session migration for the next summary.
    pub(super) fn late_sessions(&self, policy: &SessionPolicy, migration: LateMigration) {
        self.send(Queued::Late(reference(policy), migration));
    }

    fn send(&self, queued: Queued) {
        if self.queue.try_send(queued).is_err() {
            self.metrics.error(ErrorKind::Event);
            tracing::debug!("event queue full; an event was dropped");
        }
    }
}

async fn publish(
    recorder: &Recorder,
    fence: &Fence,
    metrics: &Metrics,
    reference: &ObjectReference,
    event: &Event,
) {
    if !fence.is_open() {
        return;
    }
    if let Err(e) = recorder.publish(event, reference).await {
        metrics.error(ErrorKind::Event);
        tracing::debug!(error = %e, "publishing an event failed");
    }
}

/// Late-session migrations since the last summary, per (namespace, policy, worker, target).
#[derive(Debug, Default)]
pub(super) struct LateTally {
    tallies: BTreeMap<(String, String, String, Option<String>), Tally>,
}

#[derive(Debug)]
struct Tally {
    reference: ObjectReference,
    related: Option<ObjectReference>,
    migrations: u64,
    sessions: u64,
}

impl LateTally {
    pub(super) fn add(&mut self, reference: ObjectReference, m: LateMigration) {
        let key = (m.namespace, m.policy, m.from, m.to);
        let tally = self.tallies.entry(key).or_insert(Tally {
            reference,
            related: m.related,
            migrations: 0,
            sessions: 0,
        });
        tally.migrations += 1;
        tally.sessions += m.moved;
    }

    /// Logs one info line per tally and returns its Event (none for tallies that moved no
    /// session: nothing happened worth an Event).
    pub(super) fn drain(&mut self, identity: &str) -> Vec<(ObjectReference, Event)> {
        let every = LATE_SUMMARY_EVERY.as_secs();
        std::mem::take(&mut self.tallies)
            .into_iter()
            .filter_map(|((_, policy, from, to), t)| {
                let (mutation, reason, action, note) = match &to {
                    Some(to) => (
                        "reroute_worker",
                        "ReroutedLateSessions",
                        "Reroute",
                        format!(
                            "moved {} late session(s) from worker {from} to {to} in {} \
                             migration(s) over the last {every}s",
                            t.sessions, t.migrations
                        ),
                    ),
                    None => (
                        "delete_by_worker",
                        "DeletedLateSessions",
                        "Delete",
                        format!(
                            "deleted {} late session(s) of departed worker {from} in {} \
                             migration(s) over the last {every}s",
                            t.sessions, t.migrations
                        ),
                    ),
                };
                tracing::info!(
                    %policy, %identity, summary = mutation, from = %from,
                    to = to.as_deref().unwrap_or(""), sessions = t.sessions,
                    migrations = t.migrations, reason = "LateSessions",
                    "late sessions migrated"
                );
                (t.sessions > 0).then(|| {
                    let event = Event {
                        type_: EventType::Normal,
                        reason: reason.into(),
                        note: Some(note),
                        action: action.into(),
                        secondary: t.related,
                    };
                    (t.reference, event)
                })
            })
            .collect()
    }
}

/// The policy's reference without its resourceVersion: the key of an Event series must not
/// change with every status write.
pub(super) fn reference(policy: &SessionPolicy) -> ObjectReference {
    let mut reference = policy.object_ref(&());
    reference.resource_version = None;
    reference
}

#[cfg(test)]
mod tests {
    use super::*;

    fn late(from: &str, to: Option<&str>, moved: u64) -> LateMigration {
        LateMigration {
            namespace: "apps".into(),
            policy: "p".into(),
            from: from.into(),
            to: to.map(Into::into),
            moved,
            related: None,
        }
    }

    #[test]
    fn late_migrations_become_one_event_per_worker_and_target() {
        let mut tally = LateTally::default();
        for _ in 0..1000 {
            tally.add(ObjectReference::default(), late("old-1", Some("new-1"), 3));
        }
        tally.add(ObjectReference::default(), late("old-2", None, 2));
        tally.add(ObjectReference::default(), late("old-3", Some("new-3"), 0));
        let events = tally.drain("op-a");
        let notes: Vec<String> = events.iter().filter_map(|(_, e)| e.note.clone()).collect();
        assert_eq!(
            notes,
            [
                "moved 3000 late session(s) from worker old-1 to new-1 in 1000 migration(s) over the last 10s",
                "deleted 2 late session(s) of departed worker old-2 in 1 migration(s) over the last 10s",
            ],
            "one Event per worker with sessions moved; none for old-3 (moved 0)"
        );
        assert!(tally.drain("op-a").is_empty(), "drained");
    }
}
