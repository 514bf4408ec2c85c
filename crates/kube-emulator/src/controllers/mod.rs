//! Optional in-process controllers that make the emulator a small simulated cluster:
//! deployment, replicaset and statefulset controllers, a garbage collector for dangling
//! dependents, a scheduler and KWOK-like kubelet stages.
//!
//! They are API clients of the emulator: every read and write goes through the same
//! [`Store`] operations the HTTP handlers call (so writes produce watch events,
//! resourceVersions and generations like any client's), and they are driven by the
//! store's change feed (no polling of objects).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::Hash;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, broadcast};
use tokio::task::JoinHandle;

use crate::store::{Store, WatchEvent};

mod client;
mod deployment;
mod gc;
pub(crate) mod kubelet;
mod pods;
mod replicaset;
mod scheduler;
mod statefulset;

pub(crate) use client::Client;

/// Name of the first emulated node, and the `spec.nodeName` the `Control` pod helpers
/// bind unscheduled pods to.
pub const EMULATED_NODE: &str = "emulated-node";
pub(crate) use kubelet::KubeletHooks;

/// Which simulated controllers run. The library default is [`Controllers::none`]; the
/// binary defaults to [`Controllers::all`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Controllers {
    pub deployment: bool,
    pub replicaset: bool,
    pub statefulset: bool,
    pub gc: bool,
    pub scheduler: bool,
    pub kubelet: bool,
}

const NAMES: [&str; 6] = [
    "deployment",
    "replicaset",
    "statefulset",
    "gc",
    "scheduler",
    "kubelet",
];

impl Controllers {
    /// Every controller.
    pub fn all() -> Self {
        Self {
            deployment: true,
            replicaset: true,
            statefulset: true,
            gc: true,
            scheduler: true,
            kubelet: true,
        }
    }

    /// No controllers: the emulator is an API server only.
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether no controller is enabled.
    pub fn is_none(&self) -> bool {
        *self == Self::none()
    }

    fn flag_mut(&mut self, name: &str) -> Option<&mut bool> {
        Some(match name {
            "deployment" => &mut self.deployment,
            "replicaset" => &mut self.replicaset,
            "statefulset" => &mut self.statefulset,
            "gc" => &mut self.gc,
            "scheduler" => &mut self.scheduler,
            "kubelet" => &mut self.kubelet,
            _ => return None,
        })
    }

    fn flags(&self) -> [bool; 6] {
        [
            self.deployment,
            self.replicaset,
            self.statefulset,
            self.gc,
            self.scheduler,
            self.kubelet,
        ]
    }
}

/// Parses `none`, `all`, or a comma-separated list of
/// `deployment,replicaset,statefulset,gc,scheduler,kubelet`.
impl FromStr for Controllers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = Controllers::none();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "none" => {}
                "all" => out = Controllers::all(),
                name => match out.flag_mut(name) {
                    Some(flag) => *flag = true,
                    None => {
                        return Err(format!(
                            "unknown controller {name:?} (expected none, all or a list of {})",
                            NAMES.join(",")
                        ));
                    }
                },
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Controllers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on: Vec<&str> = NAMES
            .iter()
            .zip(self.flags())
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect();
        if on.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&on.join(","))
        }
    }
}

/// Settings shared by the controllers.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub nodes: usize,
    pub pod_ready_delay: Duration,
    pub pod_ready_jitter: Duration,
}

/// Creates the emulated nodes (when the scheduler or kubelet run) and spawns the
/// enabled controllers.
pub(crate) fn spawn(
    store: Arc<Store>,
    controllers: Controllers,
    settings: Settings,
    hooks: Arc<KubeletHooks>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    let Some(client) = Client::new(store) else {
        tracing::error!("kube-emulator: built-in workload types are not served; no controllers");
        return tasks;
    };
    if controllers.scheduler || controllers.kubelet {
        scheduler::ensure_nodes(&client, settings.nodes.max(1));
    }
    if controllers.replicaset {
        tasks.push(tokio::spawn(run(
            client.clone(),
            replicaset::ReplicaSetController::new(client.clone()),
            None,
        )));
    }
    if controllers.deployment {
        tasks.push(tokio::spawn(run(
            client.clone(),
            deployment::DeploymentController::new(client.clone()),
            None,
        )));
    }
    if controllers.statefulset {
        tasks.push(tokio::spawn(run(
            client.clone(),
            statefulset::StatefulSetController::new(client.clone()),
            None,
        )));
    }
    if controllers.gc {
        tasks.push(tokio::spawn(run(
            client.clone(),
            gc::GarbageCollector::new(client.clone()),
            None,
        )));
    }
    if controllers.scheduler {
        tasks.push(tokio::spawn(run(
            client.clone(),
            scheduler::Scheduler::new(client.clone(), settings.nodes.max(1)),
            None,
        )));
    }
    if controllers.kubelet {
        let wake = hooks.wake.clone();
        tasks.push(tokio::spawn(run(
            client.clone(),
            kubelet::Kubelet::new(
                client.clone(),
                settings.pod_ready_delay,
                settings.pod_ready_jitter,
                hooks,
            ),
            Some(wake),
        )));
    }
    tasks
}

/// A level-triggered reconciler driven by the change feed.
pub(crate) trait Reconciler: Send + 'static {
    type Key: Clone + Eq + Hash + Send + fmt::Debug;

    /// Keys to reconcile because of one committed change.
    fn keys_for(&mut self, event: &WatchEvent, out: &mut Vec<Self::Key>);

    /// Every key, for the first pass and after the feed lagged.
    fn all_keys(&mut self) -> Vec<Self::Key>;

    /// Keys requested from outside the feed (test hooks); empty by default.
    fn poked(&mut self) -> Vec<Self::Key> {
        Vec::new()
    }

    /// Brings one key to its desired state; `Some(d)` reconciles it again after `d`.
    fn reconcile(&mut self, key: &Self::Key) -> Option<Duration>;
}

/// A de-duplicating FIFO where re-queueing a key moves it to the back, plus timers
/// (at most one per key: the earliest asked for).
struct Queue<K: Clone + Eq + Hash> {
    seq: u64,
    order: BTreeMap<u64, K>,
    position: HashMap<K, u64>,
    timers: BTreeMap<(Instant, u64), K>,
    scheduled: HashMap<K, (Instant, u64)>,
}

impl<K: Clone + Eq + Hash> Queue<K> {
    fn new() -> Self {
        Self {
            seq: 0,
            order: BTreeMap::new(),
            position: HashMap::new(),
            timers: BTreeMap::new(),
            scheduled: HashMap::new(),
        }
    }

    fn push(&mut self, key: K) {
        self.seq += 1;
        if let Some(old) = self.position.insert(key.clone(), self.seq) {
            self.order.remove(&old);
        }
        self.order.insert(self.seq, key);
    }

    fn pop(&mut self) -> Option<K> {
        let (_, key) = self.order.pop_first()?;
        self.position.remove(&key);
        Some(key)
    }

    fn after(&mut self, key: K, delay: Duration) {
        let at = Instant::now() + delay;
        if let Some(existing) = self.scheduled.get(&key) {
            if existing.0 <= at {
                return;
            }
            self.timers.remove(existing);
        }
        self.seq += 1;
        self.scheduled.insert(key.clone(), (at, self.seq));
        self.timers.insert((at, self.seq), key);
    }

    /// Moves due timers into the queue; returns the next deadline.
    fn fire_due(&mut self) -> Option<Instant> {
        let now = Instant::now();
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                return Some(entry.key().0);
            }
            let key = entry.remove();
            self.scheduled.remove(&key);
            self.push(key);
        }
        None
    }
}

/// Runs a reconciler until the store's feed closes (or the task is aborted).
async fn run<R: Reconciler>(client: Client, mut reconciler: R, wake: Option<Arc<Notify>>) {
    let mut feed = client.store.feed();
    let mut queue = Queue::new();
    let mut keys = Vec::new();
    for key in reconciler.all_keys() {
        queue.push(key);
    }
    let wake = wake.unwrap_or_default();
    let mut since_yield = 0u32;
    loop {
        // Take in everything committed so far before reconciling, so each pass sees
        // (and de-duplicates) the latest changes.
        loop {
            match feed.try_recv() {
                Ok(event) => {
                    reconciler.keys_for(&event, &mut keys);
                    for key in keys.drain(..) {
                        queue.push(key);
                    }
                }
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    for key in reconciler.all_keys() {
                        queue.push(key);
                    }
                }
                Err(broadcast::error::TryRecvError::Closed) => return,
            }
        }
        for key in reconciler.poked() {
            queue.push(key);
        }
        let next_timer = queue.fire_due();
        if let Some(key) = queue.pop() {
            if let Some(delay) = reconciler.reconcile(&key) {
                queue.after(key, delay);
            }
            since_yield += 1;
            if since_yield >= 16 {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
            continue;
        }
        let sleep = async {
            match next_timer {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = feed.recv() => match received {
                Ok(event) => {
                    reconciler.keys_for(&event, &mut keys);
                    for key in keys.drain(..) {
                        queue.push(key);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    for key in reconciler.all_keys() {
                        queue.push(key);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = wake.notified() => {}
            () = sleep => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controllers_parse() {
        assert_eq!("all".parse::<Controllers>(), Ok(Controllers::all()));
        assert_eq!("none".parse::<Controllers>(), Ok(Controllers::none()));
        assert_eq!("".parse::<Controllers>(), Ok(Controllers::none()));
        let some: Controllers = "kubelet, scheduler".parse().expect("parses");
        assert!(some.kubelet && some.scheduler && !some.deployment && !some.gc);
        assert_eq!(some.to_string(), "scheduler,kubelet");
        assert!("kubelet,dns".parse::<Controllers>().is_err());
        assert_eq!(Controllers::all().to_string(), NAMES.join(","));
    }

    #[test]
    fn one_timer_per_key_keeps_the_earliest() {
        let mut q = Queue::new();
        q.after("a", Duration::from_secs(60));
        q.after("a", Duration::ZERO);
        q.after("a", Duration::from_secs(30));
        assert_eq!(q.timers.len(), 1);
        assert_eq!(q.fire_due(), None);
        assert_eq!(q.pop(), Some("a"));
        assert!(q.scheduled.is_empty());
    }

    #[test]
    fn requeue_moves_a_key_to_the_back() {
        let mut q = Queue::new();
        q.push("a");
        q.push("b");
        q.push("a");
        assert_eq!(q.pop(), Some("b"));
        assert_eq!(q.pop(), Some("a"));
        assert_eq!(q.pop(), None);
    }
}
