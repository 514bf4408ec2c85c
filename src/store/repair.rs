//! Durable marks of cache entries a [`super::LayeredStore`] could not update.
//!
//! While the cache (Redis) is unreachable, the primary (Postgres) commits migrations that the
//! cache still shows the old way. The ids are remembered in memory *and* in the primary, so a
//! restart or a failover does not forget them: whoever leads next repairs them as soon as the
//! cache answers (see `LayeredStore::repair_pending`).

/// What a mark covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RepairKind {
    /// One session id.
    Id,
    /// Every cached session of a worker (a primary batch failed with unknown ids).
    Worker,
    /// The whole cache (too many ids to track one by one).
    All,
}

impl RepairKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RepairKind::Id => "id",
            RepairKind::Worker => "worker",
            RepairKind::All => "all",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "id" => Some(RepairKind::Id),
            "worker" => Some(RepairKind::Worker),
            "all" => Some(RepairKind::All),
            _ => None,
        }
    }
}

/// One durable mark, as read back from the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRepair {
    pub kind: RepairKind,
    pub key: String,
    /// Changes whenever the mark is set again: clearing a mark that was set again while it was
    /// being repaired keeps it.
    pub seq: i64,
}
