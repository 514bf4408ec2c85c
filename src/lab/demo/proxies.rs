//! Simulated proxies: they create sessions on Ready workers, then keep reading and touching
//! them, as a session-sticky proxy does on every request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::Store as Reader;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::lab::shared::ready_workers;
use crate::store::{Entry, Store};

pub(super) struct Proxies {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    stale_reads: Arc<AtomicU64>,
    ids: Arc<Mutex<Vec<String>>>,
}

/// A tiny deterministic generator: the demo needs spread, not statistics.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % below.max(1) as u64) as usize
    }
}

impl Proxies {
    /// Starts `n` proxies that create `target` sessions in all, then keep using them.
    pub(super) fn start(store: Arc<dyn Store>, pods: Reader<Pod>, n: u32, target: u64) -> Self {
        let stop = CancellationToken::new();
        let created = Arc::new(AtomicU64::new(0));
        let stale_reads = Arc::new(AtomicU64::new(0));
        let ids = Arc::new(Mutex::new(Vec::new()));
        // Proxies learn about pods from a watch too, and lag behind it a little.
        let routable = Arc::new(RwLock::new(ready_workers(&pods)));
        let mut tasks = vec![tokio::spawn({
            let (routable, stop) = (routable.clone(), stop.clone());
            async move {
                while !stop.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let ready = ready_workers(&pods);
                    if !ready.is_empty() {
                        *routable
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = ready;
                    }
                }
            }
        })];
        for t in 0..n {
            let (store, stop, routable) = (store.clone(), stop.clone(), routable.clone());
            let (created, stale_reads, ids) = (created.clone(), stale_reads.clone(), ids.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (u64::from(t) + 1));
                while !stop.is_cancelled() {
                    let workers = routable
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone();
                    let n = created.fetch_add(1, Ordering::Relaxed);
                    if n < target {
                        let id = format!("session-{n:07}");
                        let worker = workers[rng.next(workers.len())].clone();
                        if store.set(&id, &Entry::new(worker, "")).await.is_ok() {
                            ids.lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .push(id);
                        } else {
                            created.fetch_sub(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    created.fetch_sub(1, Ordering::Relaxed);
                    let id = {
                        let ids = ids
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        ids[rng.next(ids.len())].clone()
                    };
                    if let Ok(Some(entry)) = store.get(&id).await {
                        if !workers.contains(&entry.worker_id) {
                            stale_reads.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = store.touch(&id).await;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        Self {
            stop,
            tasks,
            stale_reads,
            ids,
        }
    }

    pub(super) fn created(&self) -> u64 {
        self.ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len() as u64
    }

    pub(super) fn stale_reads(&self) -> u64 {
        self.stale_reads.load(Ordering::Relaxed)
    }

    /// Sessions the proxies created that the store no longer holds.
    pub(super) async fn missing_sessions(&self, store: &dyn Store) -> anyhow::Result<u64> {
        let ids = self
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let missing = futures::stream::iter(ids)
            .map(|id| async move { store.get(&id).await.map(|e| u64::from(e.is_none())) })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        let mut total = 0;
        for m in missing {
            total += m?;
        }
        Ok(total)
    }

    pub(super) async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
