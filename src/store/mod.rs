//! The session store: the routing table "session id → worker id" shared by proxies.
//!
//! [`Store`] is blockyard's `session.Store` interface made Rust-native: every operation returns a
//! `Result`, so "no session" and "backend down" are different answers. Four implementations share
//! one conformance suite (`tests/store_conformance.rs`):
//!
//! - [`MemoryStore`]: in-process, the embedded default;
//! - [`PostgresStore`]: the source of truth, table `blockyard_sessions`;
//! - [`RedisStore`]: hashes `{prefix}session:{id}` plus a per-worker index;
//! - [`LayeredStore`]: a cache store over a primary store.

mod cache;
mod entry;
mod error;
mod fencing;
mod layered;
mod memory;
mod migrate;
mod options;
mod postgres;
mod redis;
mod repair;
mod worker_records;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_trait::async_trait;

pub use cache::{Cache, Lookup, Ticket};
pub use entry::{Entry, MAX_ID_BYTES, validate_id};
pub use error::{StoreError, redact_url};
pub use fencing::{Fencing, Grant};
pub use layered::{LayeredStats, LayeredStore};
pub use memory::MemoryStore;
pub use migrate::{
    BatchGuard, BatchRun, Migration, MigrationStop, Unguarded, WorkerMove, migrate_worker,
};
pub use options::{StoreOptions, check_postgres_url, redis_key_prefix};
pub use postgres::{DEFAULT_SCHEMA, FencedTransaction, PostgresOptions, PostgresStore};
pub use redis::{DEFAULT_PREFIX, RedisOptions, RedisStore};
pub use repair::{CacheRepair, RepairKind};
pub use worker_records::{
    MemoryWorkerRecords, PgWorkerRecords, RedisWorkerRecords, WorkerRecord, WorkerRecords,
};

/// Result of a store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which sessions a maintenance sweep removes.
#[derive(Debug, Clone, Copy)]
pub enum Sweep<'a> {
    /// Sessions whose `expires_at` has passed (the Postgres expiry loop).
    Expired,
    /// Sessions whose last access is older than `max_age` (plus the touch window, see
    /// [`StoreOptions::touch_window`]), optionally only those of the given workers.
    Idle {
        max_age: Duration,
        workers: Option<&'a [String]>,
    },
}

/// A session routing table.
///
/// Worker-level operations (`delete_by_worker`, `count_for_worker`, `reroute_worker`,
/// `entries_for_worker`) cost O(sessions of that worker) in every implementation. Reads and counts
/// never include sessions whose idle TTL has passed, even before a sweep removed them.
#[async_trait]
pub trait Store: Send + Sync {
    /// Looks a session up; `None` when it does not exist or has expired.
    async fn get(&self, id: &str) -> Result<Option<Entry>>;

    /// Creates or replaces a session and restarts its idle TTL.
    async fn set(&self, id: &str, entry: &Entry) -> Result<()>;

    /// Sets `last_access` to now and restarts the idle TTL; `false` when the session is absent.
    async fn touch(&self, id: &str) -> Result<bool>;

    /// Removes one session; `false` when it was absent.
    async fn delete(&self, id: &str) -> Result<bool>;

    /// Removes the given sessions (absent ones are skipped); returns how many were removed.
    async fn delete_many(&self, ids: &[String]) -> Result<u64>;

    /// Removes every session of a worker; returns how many were removed.
    async fn delete_by_worker(&self, worker_id: &str) -> Result<u64>;

    /// Number of live sessions of a worker.
    async fn count_for_worker(&self, worker_id: &str) -> Result<u64>;

    /// Number of live sessions of all the given workers together.
    async fn count_for_workers(&self, worker_ids: &[String]) -> Result<u64>;

    /// Live session counts of every worker that has at least one session.
    async fn counts_by_worker(&self) -> Result<BTreeMap<String, u64>>;

    /// Ids of the workers that hold at least one session, for the operator's level-triggered
    /// passes, which need the set of workers rather than a count of every session.
    ///
    /// The provided implementation derives it from [`Store::counts_by_worker`], which costs
    /// O(sessions); stores override it where an index answers in O(workers).
    async fn workers_with_sessions(&self) -> Result<BTreeSet<String>> {
        Ok(self.counts_by_worker().await?.into_keys().collect())
    }

    /// One round trip to the store, to learn that it answers: the operator's pass pings it when
    /// it has nothing else to ask, so that every pass notices an unreachable store. Stores
    /// without a connection (memory) answer at once.
    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    /// Which of `worker_ids` hold at least one session, counted as [`Store::workers_with_sessions`]
    /// counts them (rows expired but not swept yet included). The operator's passes ask this of
    /// the few ids whose answer must be fresh (departures, vanished workers, orphans) and take
    /// the rest from a listing refreshed in the background: a probe costs O(ids asked), where a
    /// full listing costs O(workers) on every pass.
    ///
    /// The provided implementation filters [`Store::workers_with_sessions`]; stores override it
    /// with a probe per id.
    async fn workers_holding(&self, worker_ids: &[String]) -> Result<BTreeSet<String>> {
        for w in worker_ids {
            validate_id("worker id", w)?;
        }
        if worker_ids.is_empty() {
            return Ok(BTreeSet::new());
        }
        let all = self.workers_with_sessions().await?;
        Ok(worker_ids
            .iter()
            .filter(|w| all.contains(*w))
            .cloned()
            .collect())
    }

    /// Moves every session of `from` to `to`; returns how many moved.
    ///
    /// Sessions that expired but were not swept yet are moved too (Postgres and memory): blockyard
    /// still routes requests by such rows, since its `Get` has no expiry filter.
    async fn reroute_worker(&self, from: &str, to: &str) -> Result<u64>;

    /// Moves at most `limit` sessions of `from` to `to` (one committed batch) and returns their
    /// ids; an empty list means `from` has no session left. Lets a caller act on each batch as
    /// it commits (the layered store updates its cache by these ids).
    ///
    /// The provided implementation is a non-atomic fallback over `entries_for_worker`, `get`
    /// and `set`, for test doubles; every store of this crate overrides it.
    async fn reroute_batch(&self, from: &str, to: &str, limit: usize) -> Result<Vec<String>> {
        validate_id("worker id", to)?;
        if from == to {
            validate_id("worker id", from)?;
            return Ok(Vec::new());
        }
        let mut moved = Vec::new();
        for id in self
            .entries_for_worker(from)
            .await?
            .into_keys()
            .take(limit.max(1))
        {
            if let Some(mut entry) = self.get(&id).await?
                && entry.worker_id == from
            {
                entry.worker_id = to.to_string();
                self.set(&id, &entry).await?;
                moved.push(id);
            }
        }
        Ok(moved)
    }

    /// Deletes at most `limit` sessions of `worker_id` (one committed batch) and returns their
    /// ids; an empty list means the worker has no session left.
    ///
    /// The provided implementation is a fallback over `entries_for_worker` and `delete_many`,
    /// for test doubles; every store of this crate overrides it.
    async fn delete_worker_batch(&self, worker_id: &str, limit: usize) -> Result<Vec<String>> {
        let ids: Vec<String> = self
            .entries_for_worker(worker_id)
            .await?
            .into_keys()
            .take(limit.max(1))
            .collect();
        self.delete_many(&ids).await?;
        Ok(ids)
    }

    /// [`Store::reroute_batch`] that skips sessions another transaction holds locked (Postgres
    /// `SKIP LOCKED`) instead of waiting for them: an empty list then means nothing *unlocked*
    /// is left, and the caller comes back for the rest. The operator's migrations use it, so a
    /// proxy idle in a transaction cannot keep the other sessions of a worker from moving.
    /// Stores without row locks move everything, like `reroute_batch`.
    async fn reroute_unlocked_batch(
        &self,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        self.reroute_batch(from, to, limit).await
    }

    /// [`Store::delete_worker_batch`] that skips locked sessions; see
    /// [`Store::reroute_unlocked_batch`].
    async fn delete_unlocked_batch(&self, worker_id: &str, limit: usize) -> Result<Vec<String>> {
        self.delete_worker_batch(worker_id, limit).await
    }

    /// One batch of a worker migration run by [`migrate_worker`], the one batch loop of this
    /// crate: at most `limit` sessions of `mv`'s worker, committed, their ids returned.
    ///
    /// The provided implementation calls the batch methods above (`run.skip_locked` picks the
    /// `*_unlocked_*` ones); the layered store overrides it to update its cache by the batch's
    /// ids and remembers in `run` when the cache failed.
    async fn migration_batch(
        &self,
        mv: WorkerMove<'_>,
        limit: usize,
        run: &mut BatchRun,
    ) -> Result<Vec<String>> {
        match (mv, run.skip_locked) {
            (WorkerMove::Reroute { from, to }, true) => {
                self.reroute_unlocked_batch(from, to, limit).await
            }
            (WorkerMove::Reroute { from, to }, false) => self.reroute_batch(from, to, limit).await,
            (WorkerMove::Delete { worker }, true) => {
                self.delete_unlocked_batch(worker, limit).await
            }
            (WorkerMove::Delete { worker }, false) => self.delete_worker_batch(worker, limit).await,
        }
    }

    /// Hears every id a [`migrate_worker`] run changed, once it ended (also when it stopped
    /// early). Nothing by default; the layered store may re-apply them to its cache later
    /// (see [`LayeredStore::reapply_migrations_after`]).
    async fn migration_done(&self, _mv: WorkerMove<'_>, _ids: &[String]) {}

    /// Snapshot of a worker's live sessions.
    async fn entries_for_worker(&self, worker_id: &str) -> Result<HashMap<String, Entry>>;

    /// Removes at most `limit` sessions selected by `sweep` and returns their ids.
    ///
    /// Sweeps run in bounded batches so that a million expired rows never hold locks long
    /// enough to stall proxies; [`Store::sweep`] loops over batches.
    async fn sweep_batch(&self, sweep: Sweep<'_>, limit: usize) -> Result<Vec<String>>;

    /// The options this store was built with.
    fn options(&self) -> &StoreOptions;

    /// Starts a new leadership term of `scope` for `holder`: increments the scope's epoch in
    /// the store and returns it (see [`Fencing`]). `Ok(None)`: this store keeps no epoch (an
    /// in-process store), so there is nothing to fence against.
    async fn claim_epoch(&self, _scope: &str, _holder: &str) -> Result<Option<i64>> {
        Ok(None)
    }

    /// Durably marks cache entries a layered store over this one could not update (see
    /// [`LayeredStore`]); `keys` are session ids, worker ids, or ignored for
    /// [`RepairKind::All`]. Stores that cannot keep them (Redis, memory) keep nothing.
    async fn record_cache_repairs(&self, _kind: RepairKind, _keys: &[String]) -> Result<()> {
        Ok(())
    }

    /// The durable marks recorded by [`Store::record_cache_repairs`], oldest first.
    async fn cache_repairs(&self) -> Result<Vec<CacheRepair>> {
        Ok(Vec::new())
    }

    /// Removes the given marks, unless they were set again since they were read.
    async fn clear_cache_repairs(&self, _done: &[CacheRepair]) -> Result<()> {
        Ok(())
    }

    /// Makes every later mutation of this store prove that `fencing`'s grant is the current
    /// epoch (see [`Fencing`]). Set once, by the operator, before it mutates; stores without
    /// epochs ignore it.
    fn set_fencing(&self, _fencing: std::sync::Arc<dyn Fencing>) {}

    /// Runs `sweep` to completion in batches of [`StoreOptions::batch`]; returns how many
    /// sessions were removed.
    async fn sweep(&self, sweep: Sweep<'_>) -> Result<u64> {
        if let Sweep::Idle {
            workers: Some([]), ..
        } = sweep
        {
            return Ok(0);
        }
        // Until a batch comes back empty: with SKIP LOCKED a short batch does not mean done.
        let limit = self.options().batch();
        let mut removed = 0;
        loop {
            let batch = self.sweep_batch(sweep, limit).await?;
            if batch.is_empty() {
                return Ok(removed);
            }
            removed += batch.len() as u64;
        }
    }

    /// Removes sessions idle longer than `max_age`.
    async fn sweep_idle(&self, max_age: Duration) -> Result<u64> {
        self.sweep(Sweep::Idle {
            max_age,
            workers: None,
        })
        .await
    }

    /// Removes sessions idle longer than `max_age` that belong to one of `worker_ids`, so that
    /// one policy's TTL never deletes another policy's sessions.
    async fn sweep_idle_for_workers(
        &self,
        max_age: Duration,
        worker_ids: &[String],
    ) -> Result<u64> {
        self.sweep(Sweep::Idle {
            max_age,
            workers: Some(worker_ids),
        })
        .await
    }

    /// Removes sessions whose `expires_at` has passed.
    async fn expire(&self) -> Result<u64> {
        self.sweep(Sweep::Expired).await
    }
}
