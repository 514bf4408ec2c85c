//! What the operator learns from the watch streams themselves, beyond the objects: when each
//! stream delivered its initial list (readiness), and in which order pods appeared.
//!
//! Readiness is derived from each stream's own `InitDone` event rather than from a second waiter
//! on a reflector's `wait_until_ready()`: kube-runtime's `Controller` already waits on the same
//! reader, and its `DelayedInit` keeps only the last waker, so a second waiter may never wake.
//!
//! Pod order: `creationTimestamp` has one-second resolution, so a replacement created in the
//! same second as the pod it replaces does not look newer. The watch delivers pods in the order
//! the API server stored them; [`Observations`] numbers every pod the first time a watch event
//! shows it, which orders them exactly (and stamps them to the millisecond).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher::Event;

/// When and in which order the operator first saw a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Observed {
    /// Increases with every pod first seen by this process; orders pods seen while watching.
    pub seq: u64,
    /// When it was first seen (millisecond resolution).
    pub at: Timestamp,
    /// First seen in a (re)list: it existed before the watch could see it appear, so its order
    /// relative to other listed pods is unknown.
    pub listed: bool,
    /// When the watch first showed it departing (terminating or finished), in the same
    /// numbering, and whether that was in a (re)list: a sibling that appeared after a pod's
    /// departure may be its replacement, one that was there before is a peer.
    pub departed: Option<(u64, bool)>,
}

/// First observations of the pods of every watched scope, keyed by pod uid (a StatefulSet pod
/// recreated under its name is a new pod).
#[derive(Debug, Default)]
pub(crate) struct Observations {
    seq: AtomicU64,
    inner: Mutex<ObservationsInner>,
}

#[derive(Debug, Default)]
struct ObservationsInner {
    pods: HashMap<String, Observed>,
    /// Uids listed since the last `Init`, to forget pods that vanished during a watch gap.
    relisting: Option<HashSet<String>>,
}

impl Observations {
    /// Records what a watch event says about pod order. Call for every event, in stream order,
    /// before the pass that reads the reflector can see the pod.
    pub(crate) fn record(&self, event: &Event<Pod>) {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match event {
            Event::Apply(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    self.first_seen(&mut inner, uid, false, departing(pod));
                }
            }
            Event::InitApply(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    self.first_seen(&mut inner, uid, true, departing(pod));
                    if let Some(listed) = inner.relisting.as_mut() {
                        listed.insert(uid.to_string());
                    }
                }
            }
            Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    inner.pods.remove(uid);
                }
            }
            Event::Init => inner.relisting = Some(HashSet::new()),
            Event::InitDone => {
                if let Some(listed) = inner.relisting.take() {
                    inner.pods.retain(|uid, _| listed.contains(uid));
                }
            }
        }
    }

    fn first_seen(&self, inner: &mut ObservationsInner, uid: &str, listed: bool, gone: bool) {
        let observed = inner
            .pods
            .entry(uid.to_string())
            .or_insert_with(|| Observed {
                seq: self.seq.fetch_add(1, Ordering::AcqRel),
                at: Timestamp::now(),
                listed,
                departed: None,
            });
        if gone && observed.departed.is_none() {
            observed.departed = Some((self.seq.fetch_add(1, Ordering::AcqRel), listed));
        }
    }

    /// The number the next first sighting will get: read after scanning the reflectors, every
    /// pod the scan saw has a lower [`Observed::seq`] (its event was recorded before the
    /// reflector stored it).
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// The first observation of a pod, if a watch showed it.
    pub(crate) fn of(&self, pod: &Pod) -> Option<Observed> {
        let uid = pod.metadata.uid.as_deref()?;
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.pods.get(uid).copied()
    }
}

fn departing(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some() || super::workers::is_finished(pod)
}

/// Whether every watch stream delivered its initial list (`InitDone`) at least once.
#[derive(Debug)]
pub(crate) struct Synced {
    streams: Vec<AtomicBool>,
}

impl Synced {
    pub(crate) fn new(streams: usize) -> Self {
        Self {
            streams: (0..streams).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Marks stream `index` synced when `is_init_done`; returns whether all streams are synced.
    /// A later re-list keeps a stream synced: its reflector keeps serving the previous list.
    pub(crate) fn mark(&self, index: usize, is_init_done: bool) -> bool {
        if is_init_done && let Some(flag) = self.streams.get(index) {
            flag.store(true, Ordering::Relaxed);
        }
        self.all()
    }

    pub(crate) fn all(&self) -> bool {
        self.streams.iter().all(|f| f.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(uid: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": uid, "uid": uid}})).expect("pod")
    }

    #[test]
    fn pods_are_numbered_in_the_order_the_watch_first_shows_them() {
        let o = Observations::default();
        o.record(&Event::Init);
        o.record(&Event::InitApply(pod("a")));
        o.record(&Event::InitDone);
        o.record(&Event::Apply(pod("b")));
        o.record(&Event::Apply(pod("c")));
        // An update does not renumber.
        o.record(&Event::Apply(pod("b")));
        let (a, b, c) = (
            o.of(&pod("a")).expect("a"),
            o.of(&pod("b")).expect("b"),
            o.of(&pod("c")).expect("c"),
        );
        assert!(a.listed && !b.listed && !c.listed);
        assert!(a.seq < b.seq && b.seq < c.seq);
        assert_eq!(a.departed, None);
        // a is deleted: its departure is numbered after c appeared; d appears after that.
        let mut deleting = pod("a");
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        o.record(&Event::Apply(deleting.clone()));
        o.record(&Event::Apply(pod("d")));
        o.record(&Event::Apply(deleting));
        let (a2, d) = (o.of(&pod("a")).expect("a"), o.of(&pod("d")).expect("d"));
        assert_eq!(a2.seq, a.seq);
        let (departed, listed) = a2.departed.expect("departure seen");
        assert!(!listed && c.seq < departed && departed < d.seq);
        o.record(&Event::Delete(pod("b")));
        assert_eq!(o.of(&pod("b")), None);
    }

    #[test]
    fn a_relist_forgets_pods_that_vanished_and_keeps_known_ones() {
        let o = Observations::default();
        o.record(&Event::Apply(pod("a")));
        o.record(&Event::Apply(pod("b")));
        let a = o.of(&pod("a"));
        o.record(&Event::Init);
        o.record(&Event::InitApply(pod("a")));
        o.record(&Event::InitApply(pod("c")));
        o.record(&Event::InitDone);
        assert_eq!(o.of(&pod("a")), a, "a keeps its first observation");
        assert_eq!(o.of(&pod("b")), None, "b vanished during the gap");
        assert!(o.of(&pod("c")).is_some_and(|c| c.listed));
    }

    #[test]
    fn synced_once_every_stream_listed() {
        let s = Synced::new(2);
        assert!(!s.mark(0, false));
        assert!(!s.mark(0, true));
        assert!(s.mark(1, true));
        assert!(s.mark(1, false), "stays synced");
    }
}
