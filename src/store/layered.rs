//! A cache store over a primary store (Redis over Postgres in production).
//!
//! Reads go to the cache first and fill it on a miss; writes go to the primary first, then the
//! cache; aggregates come from the primary. The primary's answer is what callers see: cache
//! failures are logged and counted, never returned.
//!
//! The cache must never answer with a worker the primary no longer holds. Two mechanisms keep
//! that promise:
//!
//! - **Repair before trust.** When a cache write fails, the affected session ids (or whole
//!   workers, for reroutes and deletions) are remembered as *dirty*. While anything is dirty,
//!   reads bypass the cache; a repair (deleting the dirty keys from the cache) runs at most once a
//!   second and, once it succeeds, the cache is trusted again.
//! - **Guarded fills.** A read that misses the cache fills it from the primary only if no
//!   mutation that could affect that session started while the read was in flight; a mutation
//!   that starts after the fill's check makes the fill undo itself. Without this, a slow read
//!   could put a pre-reroute worker back into the cache after the reroute updated it.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Entry, Result, Store, StoreError, StoreOptions, Sweep};

/// Dirty session ids remembered before the layered store gives up tracking them one by one and
/// clears the whole cache instead.
const MAX_DIRTY_IDS: usize = 100_000;
/// Minimum pause between two cache repair attempts while the cache is failing.
const REPAIR_INTERVAL: Duration = Duration::from_secs(1);
/// Mutation counter shards for session-level operations.
const SHARDS: usize = 64;

/// Counters of a [`LayeredStore`], for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayeredStats {
    /// Cache operations that failed (and were hidden from callers).
    pub cache_errors: u64,
    /// `get`s answered by the cache.
    pub cache_hits: u64,
    /// `touch`es that reached the primary.
    pub primary_touches: u64,
    /// `touch`es answered by the cache alone (coalesced).
    pub coalesced_touches: u64,
    /// Whether reads currently bypass the cache until a repair succeeds.
    pub bypassing: bool,
}

/// Cache over primary; see the module docs for the consistency rules.
pub struct LayeredStore {
    cache: Arc<dyn Store>,
    primary: Arc<dyn Store>,
    options: StoreOptions,
    /// When each session was last touched in the primary (for coalescing).
    primary_touched: Mutex<TouchLog>,
    mutations: MutationCounters,
    dirty: Mutex<Dirty>,
    repairing: tokio::sync::Mutex<Option<Instant>>,
    cache_errors: AtomicU64,
    cache_hits: AtomicU64,
    primary_touches: AtomicU64,
    coalesced_touches: AtomicU64,
}

impl std::fmt::Debug for LayeredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayeredStore")
            .field("options", &self.options)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl LayeredStore {
    /// Layers `cache` over `primary`. `options.touch_window` is the coalescing window (zero
    /// touches the primary on every call); the primary should be built with the same options so
    /// its sweeps allow for the window.
    pub fn new(cache: Arc<dyn Store>, primary: Arc<dyn Store>, options: StoreOptions) -> Self {
        Self {
            cache,
            primary,
            options,
            primary_touched: Mutex::default(),
            mutations: MutationCounters::new(),
            dirty: Mutex::default(),
            repairing: tokio::sync::Mutex::new(None),
            cache_errors: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            primary_touches: AtomicU64::new(0),
            coalesced_touches: AtomicU64::new(0),
        }
    }

    /// Current counters.
    pub fn stats(&self) -> LayeredStats {
        LayeredStats {
            cache_errors: self.cache_errors.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            primary_touches: self.primary_touches.load(Ordering::Relaxed),
            coalesced_touches: self.coalesced_touches.load(Ordering::Relaxed),
            bypassing: !lock(&self.dirty).is_clean(),
        }
    }

    fn cache_failed(&self, op: &str, err: &StoreError) {
        self.cache_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(op, error = %err, "session cache operation failed; serving from primary");
    }

    /// Records a failed cache write: `mark` adds what may now be stale in the cache.
    fn cache_write_failed(&self, op: &str, err: &StoreError, mark: impl FnOnce(&mut Dirty)) {
        self.cache_failed(op, err);
        mark(&mut lock(&self.dirty));
    }

    /// Whether the cache may be read now. Repairs the cache first if it has dirty keys and the
    /// last attempt is long enough ago (an unreachable Redis is not retried on every call).
    async fn cache_trusted(&self) -> bool {
        if lock(&self.dirty).is_clean() {
            return true;
        }
        let Ok(mut last_attempt) = self.repairing.try_lock() else {
            return false; // another task is repairing right now
        };
        if last_attempt.is_some_and(|at| at.elapsed() < REPAIR_INTERVAL) {
            return false;
        }
        *last_attempt = Some(Instant::now());
        match self.repair_dirty().await {
            Ok(clean) => clean,
            Err(err) => {
                self.cache_failed("repair", &err);
                false
            }
        }
    }

    /// Gives a pending cache repair its chance before a write: writers that never read (the
    /// operator) must get the cache repaired too.
    async fn retry_repair(&self) {
        self.cache_trusted().await;
    }

    /// Repairs the cache now if failed cache writes left it possibly stale, and fails if it
    /// still is: for one-shot callers (the CLI) that must not exit with a stale cache unnoticed.
    /// Long-running callers need not call it: reads and writes retry repairs by themselves.
    pub async fn repair_cache(&self) -> Result<()> {
        let mut last_attempt = self.repairing.lock().await;
        *last_attempt = Some(Instant::now());
        if self.repair_dirty().await? {
            Ok(())
        } else {
            Err(StoreError::CacheStale(
                "cache writes failed again while it was being repaired".to_string(),
            ))
        }
    }

    /// One repair pass over what is dirty now; `Ok(true)` when nothing is left dirty.
    async fn repair_dirty(&self) -> Result<bool> {
        let snapshot = lock(&self.dirty).clone();
        if snapshot.is_clean() {
            return Ok(true);
        }
        self.repair(&snapshot).await?;
        let mut dirty = lock(&self.dirty);
        dirty.forget_up_to(snapshot.generation);
        let clean = dirty.is_clean();
        if clean {
            tracing::info!("session cache repaired; reading from it again");
        }
        Ok(clean)
    }

    /// Deletes from the cache everything that may be stale.
    async fn repair(&self, dirty: &Dirty) -> Result<()> {
        if dirty.overflow.is_some() {
            for worker in self.cache.counts_by_worker().await?.keys() {
                self.cache.delete_by_worker(worker).await?;
            }
        }
        for worker in dirty.workers.keys() {
            self.cache.delete_by_worker(worker).await?;
        }
        let ids: Vec<String> = dirty.ids.keys().cloned().collect();
        self.cache.delete_many(&ids).await?;
        Ok(())
    }

    /// Fills the cache after a miss, unless a mutation raced with the primary read.
    async fn fill(&self, id: &str, entry: &Entry, before: Snapshot) {
        if let Err(err) = self.cache.set(id, entry).await {
            return self.cache_write_failed("fill", &err, |d| d.add_id(id));
        }
        if self.mutations.changed_since(id, before)
            && let Err(err) = self.cache.delete(id).await
        {
            self.cache_write_failed("fill", &err, |d| d.add_id(id));
        }
    }

    fn touched_recently(&self, id: &str, now: Instant) -> bool {
        !self.options.touch_window.is_zero()
            && lock(&self.primary_touched)
                .last
                .get(id)
                .is_some_and(|at| now.duration_since(*at) < self.options.touch_window)
    }
}

#[async_trait]
impl Store for LayeredStore {
    async fn get(&self, id: &str) -> Result<Option<Entry>> {
        let trusted = self.cache_trusted().await;
        if trusted {
            match self.cache.get(id).await {
                Ok(Some(entry)) => {
                    self.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Some(entry));
                }
                Ok(None) => {}
                // The primary is still the truth; a bad cache entry or an outage is no reason
                // to fail a lookup.
                Err(err) => self.cache_failed("get", &err),
            }
        }
        let before = self.mutations.snapshot(id);
        let found = self.primary.get(id).await?;
        if let (Some(entry), Some(before), true) = (&found, before, trusted) {
            self.fill(id, entry, before).await;
        }
        Ok(found)
    }

    async fn set(&self, id: &str, entry: &Entry) -> Result<()> {
        self.retry_repair().await;
        let _m = self.mutations.begin(Some(id));
        self.primary.set(id, entry).await?;
        lock(&self.primary_touched).record(id, Instant::now(), self.options.touch_window);
        if let Err(err) = self.cache.set(id, entry).await {
            self.cache_write_failed("set", &err, |d| d.add_id(id));
        }
        Ok(())
    }

    async fn touch(&self, id: &str) -> Result<bool> {
        let now = Instant::now();
        if self.touched_recently(id, now) && self.cache_trusted().await {
            match self.cache.touch(id).await {
                Ok(true) => {
                    self.coalesced_touches.fetch_add(1, Ordering::Relaxed);
                    return Ok(true);
                }
                Ok(false) => {}
                Err(err) => self.cache_failed("touch", &err),
            }
        }
        self.primary_touches.fetch_add(1, Ordering::Relaxed);
        let found = self.primary.touch(id).await?;
        {
            let mut log = lock(&self.primary_touched);
            if found {
                log.record(id, now, self.options.touch_window);
            } else {
                log.last.remove(id);
            }
        }
        if found {
            if let Err(err) = self.cache.touch(id).await {
                // A missed cache touch only shortens the cache copy's TTL: no stale worker.
                self.cache_failed("touch", &err);
            }
        } else if let Err(err) = self.cache.delete(id).await {
            // The primary does not hold it: whatever the cache holds (a fill by another
            // process that lost a race) must not route another request.
            self.cache_write_failed("touch", &err, |d| d.add_id(id));
        }
        Ok(found)
    }

    async fn delete(&self, id: &str) -> Result<bool> {
        self.retry_repair().await;
        let _m = self.mutations.begin(Some(id));
        let existed = self.primary.delete(id).await?;
        lock(&self.primary_touched).last.remove(id);
        if let Err(err) = self.cache.delete(id).await {
            self.cache_write_failed("delete", &err, |d| d.add_id(id));
        }
        Ok(existed)
    }

    async fn delete_many(&self, ids: &[String]) -> Result<u64> {
        self.retry_repair().await;
        let _m = self.mutations.begin(None);
        let removed = self.primary.delete_many(ids).await?;
        if let Err(err) = self.cache.delete_many(ids).await {
            self.cache_write_failed("delete_many", &err, |d| {
                ids.iter().for_each(|id| d.add_id(id))
            });
        }
        Ok(removed)
    }

    async fn delete_by_worker(&self, worker_id: &str) -> Result<u64> {
        self.retry_repair().await;
        let _m = self.mutations.begin(None);
        let removed = self.primary.delete_by_worker(worker_id).await?;
        if let Err(err) = self.cache.delete_by_worker(worker_id).await {
            self.cache_write_failed("delete_by_worker", &err, |d| d.add_worker(worker_id));
        }
        Ok(removed)
    }

    async fn count_for_worker(&self, worker_id: &str) -> Result<u64> {
        self.primary.count_for_worker(worker_id).await
    }

    async fn count_for_workers(&self, worker_ids: &[String]) -> Result<u64> {
        self.primary.count_for_workers(worker_ids).await
    }

    async fn counts_by_worker(&self) -> Result<BTreeMap<String, u64>> {
        self.primary.counts_by_worker().await
    }

    async fn reroute_worker(&self, from: &str, to: &str) -> Result<u64> {
        self.retry_repair().await;
        let _m = self.mutations.begin(None);
        let moved = self.primary.reroute_worker(from, to).await?;
        if let Err(err) = self.cache.reroute_worker(from, to).await {
            // Whatever the cache still holds for `from` is stale: drop it on repair.
            self.cache_write_failed("reroute_worker", &err, |d| d.add_worker(from));
        }
        Ok(moved)
    }

    async fn entries_for_worker(&self, worker_id: &str) -> Result<HashMap<String, Entry>> {
        self.primary.entries_for_worker(worker_id).await
    }

    async fn sweep_batch(&self, sweep: Sweep<'_>, limit: usize) -> Result<Vec<String>> {
        self.retry_repair().await;
        let _m = self.mutations.begin(None);
        let removed = self.primary.sweep_batch(sweep, limit).await?;
        if !removed.is_empty()
            && let Err(err) = self.cache.delete_many(&removed).await
        {
            self.cache_write_failed("sweep", &err, |d| {
                removed.iter().for_each(|id| d.add_id(id))
            });
        }
        Ok(removed)
    }

    fn options(&self) -> &StoreOptions {
        &self.options
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent across a panic (plain inserts and removals).
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the cache may hold stale after failed cache writes.
///
/// Every entry carries the generation it was (last) marked in, so a repair forgets only what
/// was dirty when it started, never a failure recorded while it ran.
#[derive(Debug, Clone, Default)]
struct Dirty {
    ids: HashMap<String, u64>,
    workers: HashMap<String, u64>,
    /// Too many ids to track: the whole cache must be cleared.
    overflow: Option<u64>,
    generation: u64,
}

impl Dirty {
    fn is_clean(&self) -> bool {
        self.ids.is_empty() && self.workers.is_empty() && self.overflow.is_none()
    }

    fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    fn add_id(&mut self, id: &str) {
        let generation = self.next_generation();
        if self.overflow.is_some() {
            self.overflow = Some(generation);
            return;
        }
        self.ids.insert(id.to_string(), generation);
        if self.ids.len() > MAX_DIRTY_IDS {
            self.ids.clear();
            self.overflow = Some(generation);
        }
    }

    fn add_worker(&mut self, worker: &str) {
        let generation = self.next_generation();
        self.workers.insert(worker.to_string(), generation);
    }

    /// Forgets what was marked up to `generation`: a repair that started then has cleaned it.
    fn forget_up_to(&mut self, generation: u64) {
        self.ids.retain(|_, g| *g > generation);
        self.workers.retain(|_, g| *g > generation);
        self.overflow = self.overflow.filter(|g| *g > generation);
    }
}

/// Last primary touch per session, pruned of entries older than the window as it grows.
#[derive(Debug, Default)]
struct TouchLog {
    last: HashMap<String, Instant>,
    prune_at: usize,
}

impl TouchLog {
    fn record(&mut self, id: &str, at: Instant, window: Duration) {
        if window.is_zero() {
            return;
        }
        self.last.insert(id.to_string(), at);
        if self.last.len() > self.prune_at.max(1024) {
            self.last.retain(|_, t| at.duration_since(*t) < window);
            self.prune_at = self.last.len() * 2;
        }
    }
}

/// Started/finished counters of mutations, global (worker-level) and sharded by session id.
struct MutationCounters {
    hasher: RandomState,
    global: Counter,
    shards: Vec<Counter>,
}

#[derive(Default)]
struct Counter {
    started: AtomicU64,
    finished: AtomicU64,
}

/// Mutation counts seen by a read before it went to the primary.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    global: u64,
    shard: u64,
}

/// Marks a mutation finished when dropped (also on early error returns).
struct MutationGuard<'a>(&'a Counter);

impl Drop for MutationGuard<'_> {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::SeqCst);
    }
}

impl MutationCounters {
    fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            global: Counter::default(),
            shards: (0..SHARDS).map(|_| Counter::default()).collect(),
        }
    }

    fn shard(&self, id: &str) -> &Counter {
        &self.shards[(self.hasher.hash_one(id) % SHARDS as u64) as usize]
    }

    /// Starts a mutation of one session (`Some(id)`) or of any number (`None`).
    fn begin(&self, id: Option<&str>) -> MutationGuard<'_> {
        let counter = match id {
            Some(id) => self.shard(id),
            None => &self.global,
        };
        counter.started.fetch_add(1, Ordering::SeqCst);
        MutationGuard(counter)
    }

    /// `None` while a mutation that may affect `id` is in flight: a fill must not happen then.
    fn snapshot(&self, id: &str) -> Option<Snapshot> {
        let shard = self.shard(id);
        let (g, s) = (
            self.global.started.load(Ordering::SeqCst),
            shard.started.load(Ordering::SeqCst),
        );
        let idle = self.global.finished.load(Ordering::SeqCst) == g
            && shard.finished.load(Ordering::SeqCst) == s;
        idle.then_some(Snapshot {
            global: g,
            shard: s,
        })
    }

    /// Whether a mutation that may affect `id` started after `before` was taken.
    fn changed_since(&self, id: &str, before: Snapshot) -> bool {
        self.global.started.load(Ordering::SeqCst) != before.global
            || self.shard(id).started.load(Ordering::SeqCst) != before.shard
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_refused_while_a_mutation_is_in_flight() {
        let counters = MutationCounters::new();
        let guard = counters.begin(None);
        assert!(counters.snapshot("a").is_none());
        drop(guard);
        let before = counters.snapshot("a").expect("no mutation in flight");
        assert!(!counters.changed_since("a", before));
        let _g = counters.begin(Some("a"));
        assert!(counters.changed_since("a", before));
    }

    #[test]
    fn dirty_ids_overflow_into_a_full_clear() {
        let mut dirty = Dirty::default();
        for i in 0..=MAX_DIRTY_IDS {
            dirty.add_id(&i.to_string());
        }
        assert!(dirty.overflow.is_some() && dirty.ids.is_empty());
        let snapshot = dirty.clone();
        dirty.add_worker("w");
        dirty.forget_up_to(snapshot.generation);
        assert!(dirty.overflow.is_none());
        assert!(dirty.workers.contains_key("w"));
    }

    #[test]
    fn a_repair_keeps_failures_recorded_while_it_ran() {
        let mut dirty = Dirty::default();
        dirty.add_worker("a");
        dirty.add_id("s");
        let snapshot = dirty.clone();
        dirty.add_worker("a"); // marked again during the repair
        dirty.forget_up_to(snapshot.generation);
        assert!(dirty.workers.contains_key("a"));
        assert!(!dirty.ids.contains_key("s"));
    }

    #[test]
    fn touch_log_prunes_old_entries() {
        let mut log = TouchLog::default();
        let start = Instant::now();
        let window = Duration::from_secs(1);
        for i in 0..3000 {
            log.record(&format!("early{i}"), start, window);
        }
        for i in 0..2000 {
            log.record(&format!("late{i}"), start + Duration::from_secs(5), window);
        }
        assert_eq!(
            log.last.len(),
            2000,
            "entries older than the window are pruned"
        );
        assert!(log.last.keys().all(|id| id.starts_with("late")));
    }
}
