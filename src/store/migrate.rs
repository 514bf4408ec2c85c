//! Worker migrations: moving or deleting every session of one worker in committed batches.
//!
//! One loop serves every caller: the stores' own `reroute_worker`/`delete_by_worker` where
//! they work batch by batch with something to do after each batch (the layered store updates
//! its cache by the batch's ids), and the operator, which must stop between two batches once
//! its lease may have run out. What differs is a parameter, not a second loop:
//!
//! - a [`BatchGuard`] says before each batch whether the migration may go on (the operator's
//!   fence and shutdown; [`Unguarded`] always goes on) and hears each committed batch (the
//!   operator logs and counts it with the epoch that made it);
//! - [`Store::migration_batch`] runs one batch with the run's [`BatchRun`] state (the layered
//!   store remembers there that the cache failed, so later batches of the same run only mark
//!   their ids for repair instead of waiting for an unreachable cache again);
//! - [`Store::migration_done`] hears the whole run's ids once it ended (the layered store
//!   re-applies them to its cache a moment later, when asked to, see
//!   [`super::LayeredStore::reapply_migrations_after`]).

use std::convert::Infallible;

use super::{Result, Store, StoreError};

/// What a migration does with a worker's sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerMove<'a> {
    /// Every session of `from` moves to `to`.
    Reroute { from: &'a str, to: &'a str },
    /// Every session of `worker` is deleted.
    Delete { worker: &'a str },
}

impl WorkerMove<'_> {
    /// The worker whose sessions leave.
    pub fn worker(&self) -> &str {
        match self {
            WorkerMove::Reroute { from, .. } => from,
            WorkerMove::Delete { worker } => worker,
        }
    }
}

/// The state of one migration run, passed to each of its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRun {
    /// Skip rows another transaction holds locked (Postgres `SKIP LOCKED`) instead of waiting
    /// for them; see [`Store::reroute_unlocked_batch`].
    pub skip_locked: bool,
    /// Whether the cache (of a layered store) took every batch of this run so far; once it
    /// failed, later batches only mark their ids for repair.
    pub cache_up: bool,
}

impl BatchRun {
    /// A run that waits for locked rows (a store's own `reroute_worker`/`delete_by_worker`).
    pub fn waiting() -> Self {
        Self {
            skip_locked: false,
            cache_up: true,
        }
    }

    /// A run that skips locked rows and comes back for them (the operator's migrations).
    pub fn skipping_locked() -> Self {
        Self {
            skip_locked: true,
            cache_up: true,
        }
    }
}

/// Decides before each batch whether a migration may go on, and hears each committed batch.
pub trait BatchGuard: Send + Sync {
    /// Why the migration stopped early.
    type Stop: Send;

    /// `Err` stops the migration before the next batch (the batches committed so far stay).
    fn before_batch(&self) -> std::result::Result<(), Self::Stop>;

    /// One batch committed these ids.
    fn committed(&self, _ids: &[String]) {}
}

/// A guard that never stops a migration.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unguarded;

impl BatchGuard for Unguarded {
    type Stop = Infallible;

    fn before_batch(&self) -> std::result::Result<(), Infallible> {
        Ok(())
    }
}

/// Why a migration ended before its worker held no session.
#[derive(Debug)]
pub enum MigrationStop<S> {
    /// The guard stopped it.
    Guard(S),
    /// A batch (or the final count) failed.
    Store(StoreError),
    /// Only rows another transaction holds locked are left (runs that skip locked rows).
    Locked { left: u64 },
}

/// How a migration ended: every id its committed batches moved or deleted, also when a later
/// batch failed, and whether it finished.
#[derive(Debug)]
pub struct Migration<S> {
    pub ids: Vec<String>,
    pub outcome: std::result::Result<(), MigrationStop<S>>,
}

/// Runs `mv` in batches of at most `limit` until the worker holds no session, `guard` stops it,
/// or a batch fails.
///
/// A short batch does not always mean done: rows skipped because another transaction holds
/// them, or sessions a proxy wrote for the worker meanwhile, are still there. So after each
/// batch the worker's sessions are counted: none left ends the run; some left after a batch
/// that took nothing (in a run that skips locked rows) ends it as [`MigrationStop::Locked`];
/// otherwise the next batch takes them. A run that waits for locks ends at its first empty
/// batch, as nothing it could take is left.
pub async fn migrate_worker<G: BatchGuard>(
    store: &(impl Store + ?Sized),
    mv: WorkerMove<'_>,
    mut run: BatchRun,
    limit: usize,
    guard: &G,
) -> Migration<G::Stop> {
    let limit = limit.max(1);
    let mut ids: Vec<String> = Vec::new();
    let outcome = loop {
        if let Err(stop) = guard.before_batch() {
            break Err(MigrationStop::Guard(stop));
        }
        let batch = match store.migration_batch(mv, limit, &mut run).await {
            Ok(batch) => batch,
            Err(e) => break Err(MigrationStop::Store(e)),
        };
        let n = batch.len();
        if n > 0 {
            guard.committed(&batch);
            ids.extend(batch);
        }
        if n == 0 && !run.skip_locked {
            break Ok(());
        }
        // Also after a full batch: a count is a read, where another batch that finds nothing
        // would be one more (fenced, synced) write transaction — for a worker of exactly
        // `limit` sessions, or the last full batch of any worker.
        match store.count_for_worker(mv.worker()).await {
            Ok(0) => break Ok(()),
            Ok(left) if n == 0 => break Err(MigrationStop::Locked { left }),
            Ok(_) => {}
            Err(e) => break Err(MigrationStop::Store(e)),
        }
    };
    if !ids.is_empty() {
        store.migration_done(mv, &ids).await;
    }
    Migration { ids, outcome }
}

/// The number of sessions an unguarded run moved, or its store error: what `reroute_worker`
/// and `delete_by_worker` return.
pub(crate) fn moved(migration: Migration<Infallible>) -> Result<u64> {
    match migration.outcome {
        Ok(()) => Ok(migration.ids.len() as u64),
        Err(MigrationStop::Store(e)) => Err(e),
        Err(MigrationStop::Locked { left }) => Err(StoreError::Timeout(format!(
            "{left} session(s) stayed locked by another transaction"
        ))),
        Err(MigrationStop::Guard(never)) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::store::{Entry, MemoryStore, StoreOptions};

    async fn store_with(sessions: usize) -> MemoryStore {
        let store = MemoryStore::new(StoreOptions::default());
        for i in 0..sessions {
            store
                .set(&format!("s{i}"), &Entry::new("old", ""))
                .await
                .unwrap();
        }
        store
    }

    /// Lets `batches` batches through, then stops; counts what it heard committed.
    struct Allow {
        batches: usize,
        seen: AtomicUsize,
        committed: AtomicUsize,
    }

    impl BatchGuard for Allow {
        type Stop = &'static str;

        fn before_batch(&self) -> std::result::Result<(), &'static str> {
            if self.seen.fetch_add(1, Ordering::SeqCst) < self.batches {
                Ok(())
            } else {
                Err("stopped")
            }
        }

        fn committed(&self, ids: &[String]) {
            self.committed.fetch_add(ids.len(), Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_guard_stops_between_batches_and_keeps_what_committed() {
        let store = store_with(5).await;
        let guard = Allow {
            batches: 2,
            seen: AtomicUsize::new(0),
            committed: AtomicUsize::new(0),
        };
        let mv = WorkerMove::Reroute {
            from: "old",
            to: "new",
        };
        let run = migrate_worker(&store, mv, BatchRun::skipping_locked(), 2, &guard).await;
        assert!(matches!(run.outcome, Err(MigrationStop::Guard("stopped"))));
        assert_eq!(run.ids.len(), 4);
        assert_eq!(guard.committed.load(Ordering::SeqCst), 4);
        assert_eq!(store.count_for_worker("new").await.unwrap(), 4);
        assert_eq!(store.count_for_worker("old").await.unwrap(), 1);
    }

    #[tokio::test]
    async fn an_unguarded_run_moves_everything_in_batches() {
        let store = store_with(7).await;
        let mv = WorkerMove::Delete { worker: "old" };
        let run = migrate_worker(&store, mv, BatchRun::waiting(), 3, &Unguarded).await;
        assert_eq!(moved(run).unwrap(), 7);
        assert_eq!(store.count_for_worker("old").await.unwrap(), 0);
        // Nothing left: an empty run.
        let run = migrate_worker(&store, mv, BatchRun::skipping_locked(), 3, &Unguarded).await;
        assert!(run.outcome.is_ok() && run.ids.is_empty());
    }
}
