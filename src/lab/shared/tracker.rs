//! Measures migrations from the outside: from the moment a worker pod is seen departing
//! (deletionTimestamp or phase Failed) to the moment the store holds none of its sessions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::Store as Reader;

use crate::store::Store;

#[derive(Default)]
struct State {
    /// The scenario step departures are attributed to.
    phase: &'static str,
    seen: BTreeSet<String>,
    pending: BTreeMap<String, (Instant, &'static str)>,
    latencies: BTreeMap<&'static str, Vec<Duration>>,
    stuck: BTreeSet<String>,
}

/// How often the tracker looks at the pods and the store.
pub(crate) const LOOK_EVERY: Duration = Duration::from_millis(20);

pub(crate) struct Tracker {
    store: Arc<dyn Store>,
    pods: Reader<Pod>,
    state: Arc<Mutex<State>>,
}

impl Tracker {
    /// Starts tracking. Each look reads which workers hold sessions (one cheap query, so the
    /// measurement does not load the store it measures), then which pods are departing. A
    /// departure of a worker that held sessions is timed from the look before the one that
    /// first sees it departing to the first look that finds it holding none: an upper bound of
    /// the operator's latency, by at most two looks.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        pods: Reader<Pod>,
        replacement_wait: Duration,
    ) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let give_up = replacement_wait + Duration::from_secs(5);
        tokio::spawn({
            let (store, pods, state) = (store.clone(), pods.clone(), Arc::downgrade(&state));
            async move {
                let mut holding = BTreeSet::new();
                // The pods were last seen not departing then: a departure seen now happened
                // after it, and is timed from it (an upper bound).
                let mut last_look = Instant::now();
                loop {
                    tokio::time::sleep(LOOK_EVERY).await;
                    let Some(state) = state.upgrade() else { return };
                    // The store first, then the pods: a pod the operator migrated between the
                    // two reads is seen departing while the store still showed its sessions.
                    let Ok(now_holding) = store.workers_with_sessions().await else {
                        continue;
                    };
                    let answered = Instant::now();
                    let departing: Vec<String> = pods
                        .state()
                        .iter()
                        .filter(|p| {
                            p.metadata.deletion_timestamp.is_some()
                                || p.status.as_ref().and_then(|s| s.phase.as_deref())
                                    == Some("Failed")
                        })
                        .map(|p| p.name_any())
                        .collect();
                    let mut s = lock(&state);
                    let phase = s.phase;
                    for pod in departing {
                        let held = holding.contains(&pod) || now_holding.contains(&pod);
                        if held && s.seen.insert(pod.clone()) {
                            s.pending.insert(pod, (last_look, phase));
                        }
                    }
                    let done: Vec<String> = s
                        .pending
                        .keys()
                        .filter(|pod| !now_holding.contains(*pod))
                        .cloned()
                        .collect();
                    for pod in done {
                        if let Some((since, phase)) = s.pending.remove(&pod) {
                            s.latencies.entry(phase).or_default().push(answered - since);
                        }
                    }
                    let late: Vec<String> = s
                        .pending
                        .iter()
                        .filter(|(_, (since, _))| since.elapsed() > give_up)
                        .map(|(pod, _)| pod.clone())
                        .collect();
                    s.stuck.extend(late);
                    holding = now_holding;
                    last_look = answered;
                }
            }
        });
        Self { store, pods, state }
    }

    /// Departures whose sessions have not been seen moved yet.
    pub(crate) fn pending(&self) -> usize {
        lock(&self.state).pending.len()
    }

    /// Sessions held by workers that are not Ready, live pods.
    pub(crate) async fn sessions_on_departed(&self) -> anyhow::Result<u64> {
        let ready: BTreeSet<String> = super::cluster::ready_workers(&self.pods)
            .into_iter()
            .collect();
        let mut total = 0;
        for worker in self.store.workers_with_sessions().await? {
            if !ready.contains(&worker) {
                total += self.store.count_for_worker(&worker).await?;
            }
        }
        Ok(total)
    }

    /// Attributes the departures seen from now on to `phase`.
    pub(crate) fn phase(&self, phase: &'static str) {
        lock(&self.state).phase = phase;
    }

    /// Departure-to-moved latencies per phase.
    pub(crate) fn latencies(&self) -> BTreeMap<&'static str, Vec<Duration>> {
        lock(&self.state).latencies.clone()
    }

    /// Departed workers that still held sessions after `replacementWait` (+5 s).
    pub(crate) fn stuck(&self) -> usize {
        lock(&self.state).stuck.len()
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `q` quantile (0 to 1) of a sorted sample, by nearest rank; zero for an empty sample.
pub(crate) fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::percentile;

    #[test]
    fn percentile_picks_the_nearest_rank() {
        let ms = |n| Duration::from_millis(n);
        let sample: Vec<Duration> = (1..=101).map(ms).collect();
        assert_eq!(percentile(&sample, 0.5), ms(51));
        assert_eq!(percentile(&sample, 0.99), ms(100));
        assert_eq!(percentile(&sample, 1.0), ms(101));
        assert_eq!(percentile(&[], 0.99), Duration::ZERO);
    }
}
