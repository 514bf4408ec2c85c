//! What a [`super::LayeredStore`] needs from its cache beyond [`Store`]: writes that can never
//! put a worker into the cache that the primary has moved away from, whatever the interleaving
//! of *processes* sharing that cache.
//!
//! The protocol uses *invalidation epochs*: the cache keeps a counter per shard of session ids
//! (64 shards, by a hash of the id that every process computes alike). Every invalidation —
//! removing ids, rerouting ids, overwriting an id — bumps the counters of the ids' shards in the
//! same atomic step as the change itself. A cache writer reads the counter (a [`Ticket`])
//! *before* it reads or writes the primary, and its cache write checks the ticket atomically:
//!
//! - a **fill** (after a cache miss) writes only if the id is absent from the cache and its shard
//!   was not invalidated since the ticket was taken;
//! - an **overwrite** (after a `set` in the primary) writes if the shard was not invalidated since
//!   the ticket, and otherwise deletes the id (the order of the two primary writes is unknown, so
//!   the cache must not guess).
//!
//! Why this is enough: a mutation commits in the primary, then invalidates the cache. A cache
//! writer that read the primary before that commit took its ticket even earlier. If the
//! invalidation happens before the cache write, the ticket is stale and the write is refused; if
//! it happens after, the invalidation itself removes or rewrites what the writer wrote.

use async_trait::async_trait;

use super::{Entry, Result, Store};

/// Number of invalidation-epoch shards.
pub(crate) const EPOCH_SHARDS: u64 = 64;

/// The invalidation epoch of an id's shard, read before touching the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(pub(crate) i64);

/// Answer of [`Cache::lookup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The cache holds the session.
    Hit(Entry),
    /// The cache does not hold it; the ticket allows a [`Cache::fill`] from the primary.
    Miss(Ticket),
}

/// A store usable as the cache of a [`super::LayeredStore`]; see the module docs.
#[async_trait]
pub trait Cache: Store {
    /// Looks a session up; on a miss, returns the ticket for filling it.
    async fn lookup(&self, id: &str) -> Result<Lookup>;

    /// The current ticket of `id`, taken before a primary write that will be copied here.
    async fn ticket(&self, id: &str) -> Result<Ticket>;

    /// Writes `entry` only if `id` is absent and its shard was not invalidated since `ticket`.
    /// Returns whether it wrote.
    async fn fill(&self, id: &str, entry: &Entry, ticket: Ticket) -> Result<bool>;

    /// Writes `entry` if the shard of `id` was not invalidated since `ticket`, and deletes `id`
    /// otherwise; either way invalidates the shard. Returns whether it wrote.
    async fn overwrite(&self, id: &str, entry: &Entry, ticket: Ticket) -> Result<bool>;

    /// Deletes `ids` and invalidates their shards.
    async fn invalidate(&self, ids: &[String]) -> Result<()>;

    /// For each of `ids` the cache holds with worker `from`, switches it to `to`; deletes any of
    /// them held with a third worker; invalidates their shards. O(ids), no scan.
    async fn reroute_ids(&self, ids: &[String], from: &str, to: &str) -> Result<()>;

    /// Deletes every cached session of `worker_id` this cache knows from its own index (no scan
    /// for foreign writes) and invalidates their shards: the fallback when the primary failed
    /// mid-operation and the affected ids are unknown.
    async fn invalidate_worker(&self, worker_id: &str) -> Result<()>;

    /// Whether the cache answers (a cheap round trip); in-process caches always do.
    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

/// The epoch shard of a session id: FNV-1a over its bytes, so every process agrees.
pub(crate) fn epoch_shard(id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash % EPOCH_SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        // Fixed values: other processes (other versions of this crate) must compute the same.
        assert_eq!(epoch_shard(""), 0xcbf2_9ce4_8422_2325 % EPOCH_SHARDS);
        assert_eq!(epoch_shard("a"), 0xaf63_dc4c_8601_ec8c % EPOCH_SHARDS);
        let used: std::collections::HashSet<u64> =
            (0..1000).map(|i| epoch_shard(&format!("s{i}"))).collect();
        assert_eq!(used.len() as u64, EPOCH_SHARDS);
    }
}
