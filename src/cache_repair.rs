//! The operator's cache repair: with Redis over Postgres, entries the operator could not update
//! in Redis (recorded in memory and in Postgres, see [`LayeredStore`]) are repaired as soon as
//! Redis answers again, not at the next store call or sweep, and once more before shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::leader::Fence;
use crate::store::LayeredStore;
use crate::telemetry::Metrics;

/// How often a pending repair is attempted (and the cache's health copied into the metrics).
pub(crate) const REPAIR_EVERY: Duration = Duration::from_millis(500);

/// How often the leader looks for marks recorded by other processes (a former leader, a CLI
/// run) when it knows of none itself.
pub(crate) const LOOK_EVERY: Duration = Duration::from_secs(5);

/// Longest time a shutdown spends repairing the cache before it releases the lease.
pub(crate) const SHUTDOWN_BUDGET: Duration = Duration::from_secs(5);

/// Repairs pending cache entries while this replica leads (the repair is a cache mutation, so
/// it is fenced like the others); keeps the cache metrics current on every replica.
pub(crate) async fn repair_loop(
    layered: Arc<LayeredStore>,
    fence: Fence,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(REPAIR_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut looked: Option<Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stats = layered.stats();
        metrics.observe_cache(&stats);
        if !fence.is_open() {
            looked = None; // a new term looks at once
            continue;
        }
        let idle = stats.pending_repairs == 0 && stats.cache_available;
        if idle && looked.is_some_and(|at| at.elapsed() < LOOK_EVERY) {
            continue;
        }
        looked = Some(Instant::now());
        match layered.repair_pending().await {
            Ok(0) => {}
            Ok(left) => tracing::debug!(left, "cache repair incomplete; retrying"),
            Err(e) => tracing::debug!(error = %e, "cache repair failed; retrying"),
        }
        metrics.observe_cache(&layered.stats());
    }
}

/// One last repair before the lease is released, within [`SHUTDOWN_BUDGET`]; what it cannot
/// repair stays recorded in Postgres for the next leader.
pub(crate) async fn before_shutdown(layered: &LayeredStore, fence: &Fence) {
    if !fence.is_open() {
        return;
    }
    match tokio::time::timeout(SHUTDOWN_BUDGET, layered.repair_pending()).await {
        Ok(Ok(0)) => {}
        Ok(Ok(left)) => {
            tracing::warn!(
                left,
                "shutting down with cache entries still to repair; they stay recorded in Postgres for the next leader"
            );
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cache repair before shutdown failed; the entries stay recorded in Postgres for the next leader");
        }
        Err(_) => tracing::warn!(
            "cache repair before shutdown timed out; the entries stay recorded in Postgres for the next leader"
        ),
    }
}
