//! A cache store over a primary store (Redis over Postgres in production).
//!
//! Reads go to the cache first and fill it on a miss; writes go to the primary first, then the
//! cache; aggregates come from the primary. The primary's answer is what callers see: cache
//! failures are logged and counted, never returned.
//!
//! The cache must never answer with a worker the primary no longer holds, whatever the
//! interleaving of the processes sharing it (proxies and the operator). Three mechanisms keep
//! that promise:
//!
//! - **Ticketed cache writes** ([`Cache`]): a fill or a copied `set` takes a ticket (the
//!   invalidation epoch of the id's shard) before it touches the primary, and the cache refuses
//!   the write if an invalidation happened since. Every mutation invalidates the ids it changed
//!   after the primary committed them, so a fill that read the primary before a reroute can
//!   neither land after the reroute's invalidation nor survive it.
//! - **Per-batch cache updates by id.** Worker-level operations run in committed primary
//!   batches; each batch's ids are rerouted or deleted in the cache right away (O(ids), never a
//!   scan of Redis). When the primary fails mid-operation, the ids of the failing batch are
//!   unknown, so the cache drops every session of the worker it knows of.
//! - **Repair before trust.** When a cache write fails, the affected session ids (or whole
//!   workers) are remembered as *dirty*, in memory and **durably in the primary**
//!   ([`Store::record_cache_repairs`], table `session_operator_cache_repairs`), so a restart or a
//!   failover does not forget them. While anything is dirty, this process's reads bypass the
//!   cache; a repair (deleting the dirty keys from the cache) runs at most once a second on
//!   store calls, and the operator runs [`LayeredStore::repair_pending`] every
//!   [`REPAIR_INTERVAL`] on its own, so that it happens as soon as the cache answers again, and
//!   once more before it shuts down. A repair also takes the marks other processes recorded in
//!   the primary. Once it succeeds, the cache is trusted again.
//!
//! What a *foreign* reader of the cache (blockyard's proxies read Redis first) sees meanwhile:
//! while the operator cannot reach Redis, the hashes it could not fix still name the old
//! worker; they are deleted within one repair interval after Redis answers the operator again
//! (the next read then falls through to the primary). The store cannot promise more: a cache
//! it cannot reach is a cache it cannot change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;

use tokio_util::task::TaskTracker;

use super::migrate::{self, BatchRun, Unguarded, WorkerMove, migrate_worker};
use super::{
    Cache, Entry, Fencing, Lookup, RepairKind, Result, Store, StoreError, StoreOptions, Sweep,
    validate_id,
};

/// Dirty session ids remembered before the layered store gives up tracking them one by one and
/// clears the whole cache instead.
const MAX_DIRTY_IDS: usize = 100_000;
/// Minimum pause between two cache repair attempts on store calls while the cache is failing.
const REPAIR_INTERVAL: Duration = Duration::from_secs(1);

/// What a failed cache write may have left stale.
#[derive(Debug, Clone, Copy)]
enum Mark<'a> {
    Ids(&'a [String]),
    Worker(&'a str),
}

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
    /// Marks (session ids, workers, or "everything") awaiting a cache repair: those this
    /// process holds in memory or those last read from the primary, whichever is more.
    pub pending_repairs: u64,
    /// Whether the last cache operation succeeded.
    pub cache_available: bool,
}

/// Cache over primary; see the module docs for the consistency rules.
pub struct LayeredStore {
    cache: Arc<dyn Cache>,
    primary: Arc<dyn Store>,
    options: StoreOptions,
    /// When each session was last touched in the primary (for coalescing).
    primary_touched: Mutex<TouchLog>,
    dirty: Mutex<Dirty>,
    repairing: tokio::sync::Mutex<Option<Instant>>,
    cache_errors: AtomicU64,
    cache_hits: AtomicU64,
    primary_touches: AtomicU64,
    coalesced_touches: AtomicU64,
    /// The last cache error, until a cache operation succeeds again.
    cache_down: Mutex<Option<String>>,
    /// Durable marks seen at the last look at the primary.
    durable_pending: AtomicU64,
    /// How long after a migration run its ids are applied to the cache once more (unset: never;
    /// see [`LayeredStore::reapply_migrations_after`]).
    reapply_after: OnceLock<Duration>,
    /// The pending re-applications.
    reapplies: TaskTracker,
    /// The fence of the mutations of this store, once set; a re-application checks it.
    fencing: OnceLock<Arc<dyn Fencing>>,
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
    /// touches the primary on every call).
    ///
    /// Fails when the options disagree: the primary must be built with the same idle TTL and
    /// touch window (its sweeps and `expires_at` allow for the window; with a shorter window
    /// there, an idle sweep would delete sessions in active use), and the cache with the same
    /// idle TTL (a longer one would keep routing sessions the primary expired).
    pub fn new(
        cache: Arc<dyn Cache>,
        primary: Arc<dyn Store>,
        options: StoreOptions,
    ) -> Result<Self> {
        options.validate()?;
        let (p, c) = (primary.options(), cache.options());
        if p.touch_window != options.touch_window || p.idle_ttl != options.idle_ttl {
            return Err(StoreError::Config(format!(
                "the primary store was built with idle TTL {:?} and touch window {:?}, the \
                 layered store with {:?} and {:?}: build both with the same options",
                p.idle_ttl, p.touch_window, options.idle_ttl, options.touch_window
            )));
        }
        if c.idle_ttl != options.idle_ttl {
            return Err(StoreError::Config(format!(
                "the cache store was built with idle TTL {:?}, the layered store with {:?}: \
                 build both with the same idle TTL",
                c.idle_ttl, options.idle_ttl
            )));
        }
        Ok(Self {
            cache,
            primary,
            options,
            primary_touched: Mutex::default(),
            dirty: Mutex::default(),
            repairing: tokio::sync::Mutex::new(None),
            cache_errors: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            primary_touches: AtomicU64::new(0),
            coalesced_touches: AtomicU64::new(0),
            cache_down: Mutex::default(),
            durable_pending: AtomicU64::new(0),
            reapply_after: OnceLock::new(),
            reapplies: TaskTracker::new(),
            fencing: OnceLock::new(),
        })
    }

    /// Layers `cache` over `primary` when the cache did not answer at start: the store is
    /// usable (the primary answers everything) and the cache counts as unavailable until an
    /// operation on it succeeds.
    pub fn new_degraded(
        cache: Arc<dyn Cache>,
        primary: Arc<dyn Store>,
        options: StoreOptions,
        error: String,
    ) -> Result<Self> {
        let store = Self::new(cache, primary, options)?;
        *lock(&store.cache_down) = Some(error);
        Ok(store)
    }

    /// Why the cache is failing, while it is (`None` once an operation on it succeeded).
    pub fn cache_error(&self) -> Option<String> {
        lock(&self.cache_down).clone()
    }

    /// Current counters.
    pub fn stats(&self) -> LayeredStats {
        let (bypassing, in_memory) = {
            let dirty = lock(&self.dirty);
            (!dirty.is_clean(), dirty.len())
        };
        LayeredStats {
            cache_errors: self.cache_errors.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            primary_touches: self.primary_touches.load(Ordering::Relaxed),
            coalesced_touches: self.coalesced_touches.load(Ordering::Relaxed),
            bypassing,
            pending_repairs: in_memory.max(self.durable_pending.load(Ordering::Relaxed)),
            cache_available: lock(&self.cache_down).is_none(),
        }
    }

    fn cache_failed(&self, op: &str, err: &StoreError) {
        self.cache_errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.cache_down) = Some(err.to_string());
        tracing::warn!(op, error = %err, "session cache operation failed; serving from primary");
    }

    /// A cache operation succeeded: the cache answers again.
    fn cache_ok(&self) {
        if lock(&self.cache_down).take().is_some() {
            tracing::info!("session cache answers again");
        }
    }

    /// Records a failed cache write: `mark` is what may now be stale in the cache.
    async fn cache_write_failed(&self, op: &str, err: &StoreError, mark: Mark<'_>) {
        self.cache_failed(op, err);
        self.mark_dirty(mark).await;
    }

    /// Remembers what may be stale in the cache, in memory and durably in the primary (a
    /// failure to record it there is logged: the memory mark still bypasses and repairs).
    async fn mark_dirty(&self, mark: Mark<'_>) {
        let (was_overflow, overflow) = {
            let mut dirty = lock(&self.dirty);
            let was = dirty.overflow.is_some();
            match mark {
                Mark::Ids(ids) => dirty.add_ids(ids),
                Mark::Worker(worker) => dirty.add_worker(worker),
            }
            (was, dirty.overflow.is_some())
        };
        let recorded = match mark {
            // Too many ids to track: the whole cache is repaired, recorded once.
            _ if was_overflow => Ok(()),
            _ if overflow => {
                self.primary
                    .record_cache_repairs(RepairKind::All, &[])
                    .await
            }
            Mark::Ids(ids) => self.primary.record_cache_repairs(RepairKind::Id, ids).await,
            Mark::Worker(worker) => {
                self.primary
                    .record_cache_repairs(RepairKind::Worker, &[worker.to_string()])
                    .await
            }
        };
        if let Err(err) = recorded {
            tracing::warn!(error = %err, "recording cache repairs in the primary failed; kept in memory only");
        }
    }

    /// Deletes `ids` from the cache after the primary changed (or may have changed) them;
    /// `false` when the cache failed (the ids are then marked for repair).
    async fn invalidate(&self, op: &str, ids: &[String]) -> bool {
        if ids.is_empty() {
            return true;
        }
        match self.cache.invalidate(ids).await {
            Ok(()) => {
                self.cache_ok();
                true
            }
            Err(err) => {
                self.cache_write_failed(op, &err, Mark::Ids(ids)).await;
                false
            }
        }
    }

    /// After the primary failed in a worker-level operation, some of the worker's sessions may
    /// have changed in a batch whose ids never came back: drop all its cached sessions.
    async fn invalidate_worker(&self, op: &str, worker: &str) {
        if let Err(err) = self.cache.invalidate_worker(worker).await {
            self.cache_write_failed(op, &err, Mark::Worker(worker))
                .await;
        }
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
        if lock(&self.dirty).is_clean() {
            return Ok(());
        }
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

    /// One repair pass over what is dirty now, in memory and in the primary's durable marks;
    /// `Ok(true)` when nothing is left dirty.
    async fn repair_dirty(&self) -> Result<bool> {
        let durable = match self.primary.cache_repairs().await {
            Ok(marks) => marks,
            Err(err) => {
                // The memory marks are still repaired; the durable ones wait for the next pass.
                tracing::warn!(error = %err, "reading the cache repairs recorded in the primary failed");
                Vec::new()
            }
        };
        self.durable_pending
            .store(durable.len() as u64, Ordering::Relaxed);
        if !durable.is_empty() {
            let mut dirty = lock(&self.dirty);
            for mark in &durable {
                match mark.kind {
                    RepairKind::Id => dirty.add_id(&mark.key),
                    RepairKind::Worker => dirty.add_worker(&mark.key),
                    RepairKind::All => dirty.add_all(),
                }
            }
        }
        let snapshot = lock(&self.dirty).clone();
        if snapshot.is_clean() {
            return Ok(true);
        }
        self.repair(&snapshot).await?;
        self.cache_ok();
        if !durable.is_empty() {
            match self.primary.clear_cache_repairs(&durable).await {
                Ok(()) => self.durable_pending.store(0, Ordering::Relaxed),
                Err(err) => {
                    tracing::warn!(error = %err, "clearing repaired cache marks in the primary failed; they are repaired again later");
                }
            }
        }
        let mut dirty = lock(&self.dirty);
        dirty.forget_up_to(snapshot.generation);
        let clean = dirty.is_clean();
        if clean {
            tracing::info!(
                ids = snapshot.ids.len(),
                workers = snapshot.workers.len(),
                all = snapshot.overflow.is_some(),
                "session cache repaired; reading from it again"
            );
        }
        Ok(clean)
    }

    /// Repairs whatever is marked, in memory or durably in the primary (by this process before
    /// a restart, by a former leader, by a CLI run), and notices a cache that answers again.
    /// The operator calls it every [`REPAIR_INTERVAL`] while leading and once before it stops,
    /// so a repair runs as soon as the cache answers rather than at the next sweep. Returns how
    /// many marks are left (0: the cache is clean).
    pub async fn repair_pending(&self) -> Result<u64> {
        let mut last_attempt = self.repairing.lock().await;
        *last_attempt = Some(Instant::now());
        if self.repair_dirty().await? {
            if self.cache_error().is_some() {
                Cache::ping(self.cache.as_ref()).await?;
                self.cache_ok();
            }
            return Ok(0);
        }
        Ok(lock(&self.dirty).len())
    }

    /// Deletes from the cache everything that may be stale.
    async fn repair(&self, dirty: &Dirty) -> Result<()> {
        if dirty.overflow.is_some() {
            for worker in self.cache.workers_with_sessions().await? {
                self.cache.invalidate_worker(&worker).await?;
            }
        }
        for worker in dirty.workers.keys() {
            self.cache.invalidate_worker(worker).await?;
        }
        let ids: Vec<String> = dirty.ids.keys().cloned().collect();
        self.cache.invalidate(&ids).await?;
        Ok(())
    }

    /// Re-applies a reroute of `ids` (as returned by [`Store::reroute_batch`]) to the cache:
    /// the operator's *delayed double invalidation*, which overwrites a copy that a foreign
    /// proxy (one that honours no ticket, like blockyard's) filled from a pre-reroute read.
    pub async fn cache_reroute_ids(&self, ids: &[String], from: &str, to: &str) -> Result<()> {
        self.cache.reroute_ids(ids, from, to).await
    }

    /// Deletes `ids` from the cache again (see [`Self::cache_reroute_ids`]), e.g. some time
    /// after [`Store::delete_worker_batch`] removed them.
    pub async fn cache_invalidate(&self, ids: &[String]) -> Result<()> {
        self.cache.invalidate(ids).await
    }

    /// Makes every worker migration run ([`migrate_worker`], also `reroute_worker` and
    /// `delete_by_worker`) apply its ids to the cache once more `delay` after it ended: the
    /// *delayed double invalidation*. A proxy that honours none of this library's cache tickets
    /// (blockyard's own) may have read the primary just before a batch committed and fill the
    /// cache with the old worker afterwards; re-applying the migration by id a moment later
    /// overwrites such a copy. Set once (the operator sets it; one-shot commands do not, as
    /// they would exit before it fires); later calls are ignored.
    pub fn reapply_migrations_after(&self, delay: Duration) {
        let _ = self.reapply_after.set(delay);
    }

    /// Waits until every pending re-application (see [`Self::reapply_migrations_after`]) ran:
    /// called before the operator releases its lease, so that none is lost with the process.
    pub async fn wait_reapplied(&self) {
        self.reapplies.close();
        self.reapplies.wait().await;
        self.reapplies.reopen();
    }

    /// `reroute_worker`/`delete_by_worker`: the whole migration, unguarded, waiting for locked
    /// rows, after a repair attempt if the cache needs one.
    async fn migrate_all(&self, mv: WorkerMove<'_>) -> Result<u64> {
        self.retry_repair().await;
        let run = migrate_worker(
            self,
            mv,
            BatchRun::waiting(),
            self.options.batch(),
            &Unguarded,
        );
        migrate::moved(run.await)
    }

    /// Remembers a primary write of `last_access` for coalescing. The time is the entry's own
    /// `last_access` (a `set` may write an old one), so coalescing never lets the primary lag
    /// the real last access by more than the window.
    fn record_primary_touch(&self, id: &str, last_access: chrono::DateTime<Utc>) {
        let now = Instant::now();
        let lag = (Utc::now() - last_access).to_std().unwrap_or_default();
        // An instant before the process started cannot be represented: then not recent anyway.
        match now.checked_sub(lag) {
            Some(at) => lock(&self.primary_touched).record(id, at, self.options.touch_window),
            None => {
                lock(&self.primary_touched).last.remove(id);
            }
        }
    }

    /// One primary batch of a reroute, then the cache update of its ids. Once a cache update
    /// failed (`cache_up` false), later batches of the same operation only mark their ids for
    /// repair instead of waiting for an unreachable cache again.
    async fn reroute_step(
        &self,
        from: &str,
        to: &str,
        limit: usize,
        cache_up: &mut bool,
        skip_locked: bool,
    ) -> Result<Vec<String>> {
        let batch = if skip_locked {
            self.primary.reroute_unlocked_batch(from, to, limit).await
        } else {
            self.primary.reroute_batch(from, to, limit).await
        };
        match batch {
            Ok(ids) => {
                let update = self.cache.reroute_ids(&ids, from, to);
                self.cache_step("reroute_worker", &ids, cache_up, update)
                    .await;
                Ok(ids)
            }
            Err(err) => {
                self.after_primary_failure("reroute_worker", from, *cache_up)
                    .await;
                Err(err)
            }
        }
    }

    /// One primary batch of a worker deletion, then the cache invalidation of its ids; see
    /// [`Self::reroute_step`].
    async fn delete_step(
        &self,
        worker: &str,
        limit: usize,
        cache_up: &mut bool,
        skip_locked: bool,
    ) -> Result<Vec<String>> {
        let batch = if skip_locked {
            self.primary.delete_unlocked_batch(worker, limit).await
        } else {
            self.primary.delete_worker_batch(worker, limit).await
        };
        match batch {
            Ok(ids) => {
                let update = self.cache.invalidate(&ids);
                self.cache_step("delete_by_worker", &ids, cache_up, update)
                    .await;
                Ok(ids)
            }
            Err(err) => {
                self.after_primary_failure("delete_by_worker", worker, *cache_up)
                    .await;
                Err(err)
            }
        }
    }

    /// Applies a committed primary batch's `ids` to the cache with `update`, unless an earlier
    /// cache failure of the same operation says the cache is down: then they are only marked
    /// for repair.
    async fn cache_step(
        &self,
        op: &str,
        ids: &[String],
        cache_up: &mut bool,
        update: impl std::future::Future<Output = Result<()>>,
    ) {
        if ids.is_empty() {
            return;
        }
        if !*cache_up {
            self.mark_dirty(Mark::Ids(ids)).await;
        } else {
            match update.await {
                Ok(()) => self.cache_ok(),
                Err(err) => {
                    *cache_up = false;
                    self.cache_write_failed(op, &err, Mark::Ids(ids)).await;
                }
            }
        }
    }

    /// The primary failed mid-operation on `worker`: the failing batch may have committed ids
    /// that never came back, so every cached session of the worker is dropped (or marked for
    /// repair when the cache is down too).
    async fn after_primary_failure(&self, op: &str, worker: &str, cache_up: bool) {
        if cache_up {
            self.invalidate_worker(op, worker).await;
        } else {
            self.mark_dirty(Mark::Worker(worker)).await;
        }
    }

    fn touched_recently(&self, id: &str, now: Instant) -> bool {
        !self.options.touch_window.is_zero()
            && lock(&self.primary_touched)
                .last
                .get(id)
                .is_some_and(|at| now.saturating_duration_since(*at) < self.options.touch_window)
    }
}

#[async_trait]
impl Store for LayeredStore {
    async fn get(&self, id: &str) -> Result<Option<Entry>> {
        let mut ticket = None;
        if self.cache_trusted().await {
            match self.cache.lookup(id).await {
                Ok(Lookup::Hit(entry)) => {
                    self.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Some(entry));
                }
                Ok(Lookup::Miss(t)) => ticket = Some(t),
                // The primary is still the truth; a bad cache entry or an outage is no reason
                // to fail a lookup.
                Err(err) => self.cache_failed("get", &err),
            }
        }
        let found = self.primary.get(id).await?;
        if let (Some(entry), Some(ticket)) = (&found, ticket)
            && let Err(err) = self.cache.fill(id, entry, ticket).await
        {
            // A fill is atomic and ticketed: failed, it wrote nothing stale.
            self.cache_failed("fill", &err);
        }
        Ok(found)
    }

    async fn set(&self, id: &str, entry: &Entry) -> Result<()> {
        validate_id("session id", id)?;
        validate_id("worker id", &entry.worker_id)?;
        self.retry_repair().await;
        let ticket = self.cache.ticket(id).await;
        if let Err(err) = self.primary.set(id, entry).await {
            // It may have committed all the same.
            self.invalidate("set", std::slice::from_ref(&id.to_string()))
                .await;
            return Err(err);
        }
        self.record_primary_touch(id, entry.last_access);
        let written = match ticket {
            Ok(ticket) => self.cache.overwrite(id, entry, ticket).await.map(|_| ()),
            Err(err) => Err(err),
        };
        if let Err(err) = written {
            self.cache_write_failed("set", &err, Mark::Ids(&[id.to_string()]))
                .await;
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
        } else {
            // The primary does not hold it: whatever the cache holds (written by a foreign
            // proxy) must not route another request.
            self.invalidate("touch", std::slice::from_ref(&id.to_string()))
                .await;
        }
        Ok(found)
    }

    async fn delete(&self, id: &str) -> Result<bool> {
        validate_id("session id", id)?;
        self.retry_repair().await;
        let existed = self.primary.delete(id).await;
        lock(&self.primary_touched).last.remove(id);
        self.invalidate("delete", std::slice::from_ref(&id.to_string()))
            .await;
        existed
    }

    async fn delete_many(&self, ids: &[String]) -> Result<u64> {
        for id in ids {
            validate_id("session id", id)?;
        }
        self.retry_repair().await;
        let mut removed = 0;
        let mut cache_up = true;
        for chunk in ids.chunks(self.options.batch()) {
            // Invalidate each committed (or possibly committed) chunk before going on.
            let done = self.primary.delete_many(chunk).await;
            if cache_up {
                cache_up = self.invalidate("delete_many", chunk).await;
            } else {
                self.mark_dirty(Mark::Ids(chunk)).await;
            }
            removed += done?;
        }
        Ok(removed)
    }

    async fn delete_by_worker(&self, worker_id: &str) -> Result<u64> {
        validate_id("worker id", worker_id)?;
        self.migrate_all(WorkerMove::Delete { worker: worker_id })
            .await
    }

    async fn delete_worker_batch(&self, worker_id: &str, limit: usize) -> Result<Vec<String>> {
        self.delete_step(worker_id, limit, &mut true, false).await
    }

    async fn delete_unlocked_batch(&self, worker_id: &str, limit: usize) -> Result<Vec<String>> {
        self.delete_step(worker_id, limit, &mut true, true).await
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

    async fn workers_with_sessions(&self) -> Result<BTreeSet<String>> {
        self.primary.workers_with_sessions().await
    }

    async fn ping(&self) -> Result<()> {
        self.primary.ping().await
    }

    async fn workers_holding(&self, worker_ids: &[String]) -> Result<BTreeSet<String>> {
        self.primary.workers_holding(worker_ids).await
    }

    async fn reroute_worker(&self, from: &str, to: &str) -> Result<u64> {
        validate_id("worker id", from)?;
        validate_id("worker id", to)?;
        if from == to {
            return self.primary.count_for_worker(from).await;
        }
        self.migrate_all(WorkerMove::Reroute { from, to }).await
    }

    async fn reroute_batch(&self, from: &str, to: &str, limit: usize) -> Result<Vec<String>> {
        self.reroute_step(from, to, limit, &mut true, false).await
    }

    async fn reroute_unlocked_batch(
        &self,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        self.reroute_step(from, to, limit, &mut true, true).await
    }

    async fn migration_batch(
        &self,
        mv: WorkerMove<'_>,
        limit: usize,
        run: &mut BatchRun,
    ) -> Result<Vec<String>> {
        match mv {
            WorkerMove::Reroute { from, to } => {
                self.reroute_step(from, to, limit, &mut run.cache_up, run.skip_locked)
                    .await
            }
            WorkerMove::Delete { worker } => {
                self.delete_step(worker, limit, &mut run.cache_up, run.skip_locked)
                    .await
            }
        }
    }

    async fn migration_done(&self, mv: WorkerMove<'_>, ids: &[String]) {
        let Some(delay) = self.reapply_after.get().copied() else {
            return;
        };
        let cache = self.cache.clone();
        let fencing = self.fencing.get().cloned();
        let ids = ids.to_vec();
        let (worker, to) = match mv {
            WorkerMove::Reroute { from, to } => (from.to_string(), Some(to.to_string())),
            WorkerMove::Delete { worker } => (worker.to_string(), None),
        };
        self.reapplies.spawn(async move {
            tokio::time::sleep(delay).await;
            // Only while this process may still mutate: a deposed leader's copy is stale.
            if fencing.is_some_and(|f| f.grant().is_err()) {
                return;
            }
            let result = match &to {
                Some(to) => cache.reroute_ids(&ids, &worker, to).await,
                None => cache.invalidate(&ids).await,
            };
            if let Err(e) = result {
                tracing::warn!(%worker, error = %e, "re-applying a migration to the cache failed");
            }
        });
    }

    async fn entries_for_worker(&self, worker_id: &str) -> Result<HashMap<String, Entry>> {
        self.primary.entries_for_worker(worker_id).await
    }

    async fn sweep_batch(&self, sweep: Sweep<'_>, limit: usize) -> Result<Vec<String>> {
        self.retry_repair().await;
        // A batch that fails after committing leaves its (unknown) ids in the cache until
        // their cache TTL ends or a primary touch finds them gone: they were idle or expired,
        // so no request is routed by them in between unless a client comes back.
        let removed = self.primary.sweep_batch(sweep, limit).await?;
        self.invalidate("sweep", &removed).await;
        Ok(removed)
    }

    /// Sweeps the primary in batches, then prunes the cache's own expired entries: Redis
    /// expires the cached hashes by itself, but not the index members pointing at them.
    async fn sweep(&self, sweep: Sweep<'_>) -> Result<u64> {
        let mut removed = 0;
        if !matches!(
            sweep,
            Sweep::Idle {
                workers: Some([]),
                ..
            }
        ) {
            loop {
                let batch = self.sweep_batch(sweep, self.options.batch()).await?;
                if batch.is_empty() {
                    break;
                }
                removed += batch.len() as u64;
            }
        }
        if let Err(err) = self.cache.sweep(Sweep::Expired).await {
            self.cache_failed("prune", &err);
        }
        Ok(removed)
    }

    fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// The primary keeps the epoch; the cache learns it from the first fenced script that
    /// runs with it (see [`super::Fencing`]).
    async fn claim_epoch(&self, scope: &str, holder: &str) -> Result<Option<i64>> {
        self.primary.claim_epoch(scope, holder).await
    }

    fn set_fencing(&self, fencing: Arc<dyn Fencing>) {
        self.primary.set_fencing(fencing.clone());
        self.cache.set_fencing(fencing.clone());
        let _ = self.fencing.set(fencing);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent across a panic (plain inserts and removals).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

    fn add_ids(&mut self, ids: &[String]) {
        for id in ids {
            self.add_id(id);
        }
    }

    fn add_worker(&mut self, worker: &str) {
        let generation = self.next_generation();
        self.workers.insert(worker.to_string(), generation);
    }

    /// The whole cache must be cleared.
    fn add_all(&mut self) {
        let generation = self.next_generation();
        self.ids.clear();
        self.overflow = Some(generation);
    }

    /// How many marks are held (the whole cache counts as one).
    fn len(&self) -> u64 {
        (self.ids.len() + self.workers.len() + usize::from(self.overflow.is_some())) as u64
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

#[cfg(test)]
mod tests {
    use super::*;

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
