//! Fencing tokens checked by the store itself.
//!
//! A leader's own deadline ([`crate::leader::Fence`]) stops it from *starting* a mutation once its
//! lease may have run out, but a statement already on its way — waiting for a lock, or sent by a
//! process that was frozen (SIGSTOP, a long GC-like pause, a VM migration) — would still commit
//! after a new leader took over. So each leadership term gets an **epoch**: a number the new
//! leader increments in the store when it acquires the lease ([`super::Store::claim_epoch`]), and
//! every mutation of a fenced store proves, inside its own transaction or script, that the epoch
//! it was granted is still the current one:
//!
//! - **Postgres**: each mutating statement runs in a transaction that ends with
//!   `SELECT epoch … FOR SHARE` on the scope's row of `session_operator_epochs`. A new leader's
//!   increment takes the row's exclusive lock, so it waits for every such transaction that
//!   checked before it and commits before any that checks after; a transaction that sees another
//!   epoch rolls back. A stale statement that arrives late therefore changes nothing. The
//!   transaction's `lock_timeout`, `statement_timeout` and `idle_in_transaction_session_timeout`
//!   are bounded by the time left on the grant, so a frozen client cannot keep its transaction (and
//!   its row locks) past the deadline either.
//! - **Redis**: every script of a fenced store first compares the epoch under
//!   `{prefix}operator-epoch:{scope}` with its own: a higher one fails the script before it
//!   writes anything; a lower one (the new leader could not reach Redis when it claimed) is raised
//!   to its own, which fences the older leader from then on.
//!
//! Callers pass the grant through a [`Fencing`] implementation given once to the store
//! ([`super::Store::set_fencing`]); code that writes to the store on the leader's behalf (sweeps,
//! migrations, worker records) is fenced by using that store, with nothing else to do.

use std::time::Duration;

use super::{Result, StoreError};

/// What a fenced store may do right now: the epoch of the current leadership term and how long
/// the leader may still mutate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The epoch this process claimed for its term ([`super::Store::claim_epoch`]).
    pub epoch: i64,
    /// Time left before the leader's own deadline; statements are bounded by it.
    pub left: Duration,
}

/// The source of a fenced store's [`Grant`]s (the leader's fence).
pub trait Fencing: Send + Sync + std::fmt::Debug {
    /// The grant for a mutation starting now, or [`StoreError::Fenced`] when this process must
    /// not mutate (not leading, deadline passed, epoch not claimed yet).
    fn grant(&self) -> Result<Grant>;

    /// Name of the fenced scope (the Lease, `namespace/name`): each scope has its own epoch.
    fn scope(&self) -> &str;
}

/// Builds the error of a mutation refused by the fence.
pub(crate) fn fenced(message: impl Into<String>) -> StoreError {
    StoreError::Fenced(message.into())
}
