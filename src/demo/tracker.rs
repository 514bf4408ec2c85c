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

pub struct Tracker {
    store: Arc<dyn Store>,
    pods: Reader<Pod>,
    state: Arc<Mutex<State>>,
}

impl Tracker {
    pub fn start(store: Arc<dyn Store>, pods: Reader<Pod>, replacement_wait: Duration) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let give_up = replacement_wait + Duration::from_secs(5);
        tokio::spawn({
            let (store, pods, state) = (store.clone(), pods.clone(), Arc::downgrade(&state));
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let Some(state) = state.upgrade() else { return };
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
                    for pod in departing {
                        let new = state
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .seen
                            .insert(pod.clone());
                        if new && store.count_for_worker(&pod).await.unwrap_or(0) > 0 {
                            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                            let phase = s.phase;
                            s.pending.insert(pod, (Instant::now(), phase));
                        }
                    }
                    let pending: Vec<(String, Instant, &'static str)> = state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .pending
                        .iter()
                        .map(|(p, (t, phase))| (p.clone(), *t, *phase))
                        .collect();
                    for (pod, since, phase) in pending {
                        let left = store.count_for_worker(&pod).await.unwrap_or(1);
                        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                        if left == 0 {
                            s.pending.remove(&pod);
                            s.latencies.entry(phase).or_default().push(since.elapsed());
                        } else if since.elapsed() > give_up {
                            s.stuck.insert(pod);
                        }
                    }
                }
            }
        });
        Self { store, pods, state }
    }

    /// Sessions held by workers that are not Ready, live pods.
    pub async fn sessions_on_departed(&self) -> anyhow::Result<u64> {
        let ready: BTreeSet<String> = super::ready_workers(&self.pods).into_iter().collect();
        let mut total = 0;
        for worker in self.store.workers_with_sessions().await? {
            if !ready.contains(&worker) {
                total += self.store.count_for_worker(&worker).await?;
            }
        }
        Ok(total)
    }

    /// Attributes the departures seen from now on to `phase`.
    pub fn phase(&self, phase: &'static str) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).phase = phase;
    }

    /// Departure-to-moved latencies per phase.
    pub fn latencies(&self) -> BTreeMap<&'static str, Vec<Duration>> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .latencies
            .clone()
    }

    /// Departed workers that still held sessions after `replacementWait` (+5 s).
    pub fn stuck(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stuck
            .len()
    }
}
