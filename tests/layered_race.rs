//! Cache coherence across processes: two independent layered stores (separate Postgres pools and
//! Redis connections, as a proxy and the operator would have) share one table and one Redis
//! prefix. Whatever the interleaving, the cache must never hold a worker the primary has moved
//! away from. Also: Postgres cut in the middle of a batched reroute.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::{ChaosProxy, PgSchema, RedisPrefix};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use session_operator::store::{
    Entry, LayeredStore, PostgresStore, RedisStore, Result, Store, StoreOptions, Sweep,
};
use tokio::sync::Notify;

/// A primary that can pause one `get` after it read the primary, or one `reroute_batch` after
/// it committed, until released: forces an interleaving deterministically.
struct Gated {
    inner: Arc<PostgresStore>,
    hold_get: AtomicBool,
    hold_reroute: AtomicBool,
    /// Random pauses after primary reads and commits, to widen every race window.
    jitter: AtomicBool,
    calls: AtomicU64,
    reached: Notify,
    release: Notify,
}

impl Gated {
    fn new(inner: Arc<PostgresStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            hold_get: AtomicBool::new(false),
            hold_reroute: AtomicBool::new(false),
            jitter: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            reached: Notify::new(),
            release: Notify::new(),
        })
    }

    async fn pause(&self) {
        self.reached.notify_one();
        self.release.notified().await;
    }

    async fn jitter(&self) {
        if self.jitter.load(Ordering::Relaxed) {
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            let micros = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 53; // 0..2048
            tokio::time::sleep(Duration::from_micros(micros)).await;
        }
    }
}

#[async_trait]
impl Store for Gated {
    async fn get(&self, id: &str) -> Result<Option<Entry>> {
        let found = self.inner.get(id).await;
        self.jitter().await;
        if self.hold_get.swap(false, Ordering::SeqCst) {
            self.pause().await;
        }
        found
    }
    async fn set(&self, id: &str, entry: &Entry) -> Result<()> {
        let done = self.inner.set(id, entry).await;
        self.jitter().await;
        done
    }
    async fn touch(&self, id: &str) -> Result<bool> {
        self.inner.touch(id).await
    }
    async fn delete(&self, id: &str) -> Result<bool> {
        let done = self.inner.delete(id).await;
        self.jitter().await;
        done
    }
    async fn delete_many(&self, ids: &[String]) -> Result<u64> {
        self.inner.delete_many(ids).await
    }
    async fn delete_by_worker(&self, worker_id: &str) -> Result<u64> {
        self.inner.delete_by_worker(worker_id).await
    }
    async fn delete_worker_batch(&self, worker_id: &str, limit: usize) -> Result<Vec<String>> {
        self.inner.delete_worker_batch(worker_id, limit).await
    }
    async fn count_for_worker(&self, worker_id: &str) -> Result<u64> {
        self.inner.count_for_worker(worker_id).await
    }
    async fn count_for_workers(&self, worker_ids: &[String]) -> Result<u64> {
        self.inner.count_for_workers(worker_ids).await
    }
    async fn counts_by_worker(&self) -> Result<BTreeMap<String, u64>> {
        self.inner.counts_by_worker().await
    }
    async fn reroute_worker(&self, from: &str, to: &str) -> Result<u64> {
        self.inner.reroute_worker(from, to).await
    }
    async fn reroute_batch(&self, from: &str, to: &str, limit: usize) -> Result<Vec<String>> {
        let moved = self.inner.reroute_batch(from, to, limit).await;
        self.jitter().await;
        if moved.as_ref().is_ok_and(|ids| !ids.is_empty())
            && self.hold_reroute.swap(false, Ordering::SeqCst)
        {
            self.pause().await;
        }
        moved
    }
    async fn entries_for_worker(&self, worker_id: &str) -> Result<HashMap<String, Entry>> {
        self.inner.entries_for_worker(worker_id).await
    }
    async fn sweep_batch(&self, sweep: Sweep<'_>, limit: usize) -> Result<Vec<String>> {
        self.inner.sweep_batch(sweep, limit).await
    }
    fn options(&self) -> &StoreOptions {
        self.inner.options()
    }
}

/// One "process": its own pool, its own Redis connection, its own layered store.
struct Process {
    layered: Arc<LayeredStore>,
    gate: Arc<Gated>,
}

struct Shared {
    schema: PgSchema,
    prefix: RedisPrefix,
    /// Direct views for assertions (a third process).
    primary: PostgresStore,
    cache: RedisStore,
}

async fn shared() -> Shared {
    let schema = PgSchema::new().await;
    let prefix = RedisPrefix::new();
    let primary = schema.store(options()).await;
    let cache = prefix.store(options(), true).await;
    Shared {
        schema,
        prefix,
        primary,
        cache,
    }
}

fn options() -> StoreOptions {
    StoreOptions {
        batch_size: 3,
        ..StoreOptions::default()
    }
}

async fn process(shared: &Shared) -> Process {
    let gate = Gated::new(Arc::new(shared.schema.store(options()).await));
    let cache = Arc::new(shared.prefix.store(options(), true).await);
    let layered = Arc::new(LayeredStore::new(cache, gate.clone(), options()).expect("options"));
    Process { layered, gate }
}

async fn worker_of(store: &dyn Store, id: &str) -> Option<String> {
    store.get(id).await.unwrap().map(|e| e.worker_id)
}

/// Every session the cache holds has the worker the primary holds for it.
async fn assert_coherent(shared: &Shared, ids: &[String], when: &str) {
    for id in ids {
        if let Some(cached) = shared.cache.get(id).await.unwrap() {
            let truth = shared.primary.get(id).await.unwrap().map(|e| e.worker_id);
            assert_eq!(
                Some(cached.worker_id.clone()),
                truth,
                "{when}: cache routes {id} to {} but the primary says {truth:?}",
                cached.worker_id
            );
        }
    }
}

/// The scene of the deterministic races: two processes, a session `s` on `w1` that only
/// Postgres holds (evicted from the cache), and the proxy's read of it, which found `w1` in
/// Postgres and is paused just before filling the cache.
async fn proxy_paused_before_fill(
    shared: &Shared,
) -> (Process, Process, tokio::task::JoinHandle<Option<String>>) {
    let proxy = process(shared).await;
    let operator = process(shared).await;
    operator
        .layered
        .set("s", &Entry::new("w1", ""))
        .await
        .unwrap();
    shared.cache.delete("s").await.unwrap(); // evicted: the proxy's next get misses
    proxy.gate.hold_get.store(true, Ordering::SeqCst);
    let read = tokio::spawn({
        let layered = proxy.layered.clone();
        async move { worker_of(layered.as_ref(), "s").await }
    });
    proxy.gate.reached.notified().await;
    (proxy, operator, read)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_that_read_before_another_process_rerouted_is_refused() {
    let shared = shared().await;
    // The proxy reads w1 from Postgres and pauses before filling the cache.
    let (proxy, operator, read) = proxy_paused_before_fill(&shared).await;
    // Meanwhile the operator reroutes w1 → w2, in Postgres and in the cache.
    assert_eq!(
        operator.layered.reroute_worker("w1", "w2").await.unwrap(),
        1
    );
    proxy.gate.release.notify_one();
    assert_eq!(read.await.unwrap().as_deref(), Some("w1"), "read before");
    let ids = ["s".to_string()];
    assert_coherent(&shared, &ids, "after the late fill").await;
    for p in [&proxy, &operator] {
        assert_eq!(
            worker_of(p.layered.as_ref(), "s").await.as_deref(),
            Some("w2")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_between_the_primary_commit_and_the_cache_update_is_corrected() {
    let shared = shared().await;
    // Proxy: reads w1, pauses.
    let (proxy, operator, read) = proxy_paused_before_fill(&shared).await;
    // Operator: commits the reroute in Postgres, pauses before its cache step.
    operator.gate.hold_reroute.store(true, Ordering::SeqCst);
    let reroute = tokio::spawn({
        let layered = operator.layered.clone();
        async move { layered.reroute_worker("w1", "w2").await }
    });
    operator.gate.reached.notified().await;
    // Proxy fills w1 now, then the operator's cache step runs.
    proxy.gate.release.notify_one();
    assert_eq!(read.await.unwrap().as_deref(), Some("w1"));
    operator.gate.release.notify_one();
    assert_eq!(reroute.await.unwrap().unwrap(), 1);
    assert_coherent(&shared, &["s".to_string()], "after the reroute").await;
    assert_eq!(
        worker_of(proxy.layered.as_ref(), "s").await.as_deref(),
        Some("w2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_that_read_before_another_process_deleted_is_refused() {
    let shared = shared().await;
    let (proxy, operator, read) = proxy_paused_before_fill(&shared).await;
    assert_eq!(operator.layered.delete_by_worker("w1").await.unwrap(), 1);
    proxy.gate.release.notify_one();
    assert_eq!(read.await.unwrap().as_deref(), Some("w1"));
    assert_eq!(shared.cache.get("s").await.unwrap(), None);
    assert_eq!(worker_of(proxy.layered.as_ref(), "s").await, None);
}

/// Many fills (with random cache evictions), sets, deletes and reroutes from two processes,
/// interleaved at random; after every round, no cached session routes elsewhere than the
/// primary does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_fills_and_reroutes_from_two_processes_stay_coherent() {
    let shared = shared().await;
    let a = process(&shared).await;
    let b = process(&shared).await;
    let ids: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
    let workers = ["w0", "w1", "w2", "w3"];
    for (i, id) in ids.iter().enumerate() {
        a.layered
            .set(id, &Entry::new(workers[i % workers.len()], ""))
            .await
            .unwrap();
    }
    for p in [&a, &b] {
        p.gate.jitter.store(true, Ordering::Relaxed);
    }
    let mut rng = StdRng::seed_from_u64(0x5e55_1017);
    let mut conn = shared.prefix.conn().await;
    for round in 0..60 {
        // Evict a few cache entries so that gets must fill again.
        for _ in 0..8 {
            let id = &ids[rng.random_range(0..ids.len())];
            let _: i64 = redis::cmd("DEL")
                .arg(shared.cache.session_key(id))
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        let mut tasks = Vec::new();
        for p in [&a, &b] {
            for _ in 0..6 {
                let layered = p.layered.clone();
                let op = rng.random_range(0..10);
                let id = ids[rng.random_range(0..ids.len())].clone();
                let from = workers[rng.random_range(0..workers.len())];
                let to = workers[rng.random_range(0..workers.len())];
                let delay = Duration::from_micros(rng.random_range(0..3000));
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    match op {
                        0..=5 => {
                            layered.get(&id).await.unwrap();
                        }
                        6 => layered.set(&id, &Entry::new(to, "")).await.unwrap(),
                        7 => {
                            layered.delete(&id).await.unwrap();
                        }
                        8 => {
                            layered.reroute_worker(from, to).await.unwrap();
                        }
                        _ => {
                            layered.touch(&id).await.unwrap();
                        }
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_coherent(&shared, &ids, &format!("round {round}")).await;
    }
}

/// Postgres is cut (TCP proxy) while a worker operation with batch size 1 has committed some
/// batches: the operation fails, and the cache must not keep serving the old worker for the
/// sessions that already moved (or were deleted).
async fn postgres_cut_mid_operation(reroute: bool) {
    let schema = PgSchema::new().await;
    let prefix = RedisPrefix::new();
    let direct = schema.store(StoreOptions::default()).await;
    let mut url = url::Url::parse(&common::pg_url()).unwrap();
    let target = format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5432)
    );
    let proxy = ChaosProxy::start(&target).await;
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(proxy.addr.port())).unwrap();
    let opts = StoreOptions {
        batch_size: 1,
        ..StoreOptions::default()
    };
    let primary = Arc::new(
        PostgresStore::connect(url.as_str(), &schema.name, opts.clone())
            .await
            .unwrap(),
    );
    let cache = Arc::new(prefix.store(opts.clone(), true).await);
    let layered = LayeredStore::new(cache.clone(), primary, opts).unwrap();
    let ids: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
    for id in &ids {
        layered.set(id, &Entry::new("old", "")).await.unwrap(); // cached too
    }
    let operation = async {
        if reroute {
            layered.reroute_worker("old", "new").await
        } else {
            layered.delete_by_worker("old").await
        }
    };
    let (result, ()) = tokio::join!(operation, async {
        while direct.count_for_worker("old").await.unwrap() > 295 {
            tokio::task::yield_now().await;
        }
        proxy.cut();
    });
    assert!(result.is_err(), "the cut must fail the operation");
    let left = direct.count_for_worker("old").await.unwrap();
    assert!(left > 0 && left < 300, "cut mid-way: {left} left");
    for id in &ids {
        if let Some(cached) = cache.get(id).await.unwrap() {
            let truth = direct.get(id).await.unwrap().map(|e| e.worker_id);
            assert_eq!(Some(cached.worker_id), truth, "{id}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_cut_in_the_middle_of_a_reroute_leaves_no_stale_cache() {
    postgres_cut_mid_operation(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_cut_in_the_middle_of_a_worker_deletion_leaves_no_stale_cache() {
    postgres_cut_mid_operation(false).await;
}
