//! Maintenance sweeps: the store-wide expiry loop and per-policy idle sweeps. Both run only on
//! the replica that holds the lease, and check the fence before every call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::leader::{Fence, NotLeader};
use crate::store::{Store, StoreError};
use crate::telemetry::{ErrorKind, Metrics, StoreOp};

/// Why an idle sweep did not run or did not finish; reported as `Degraded=True, IdleSweepFailed`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SweepError {
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
    #[error("idle sweep: {0}")]
    Store(#[from] StoreError),
}

/// Removes expired sessions (`expires_at` passed) every `interval` while leading.
pub(crate) async fn expiry_loop(
    store: Arc<dyn Store>,
    fence: Fence,
    metrics: Metrics,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if fence.check().is_err() {
            continue;
        }
        let started = Instant::now();
        let result = store.expire().await;
        metrics.observe_store(StoreOp::Expire, started.elapsed());
        match result {
            Ok(removed) => {
                metrics.swept("expiry", removed);
                tracing::info!(
                    identity = %fence.identity(), mutation = "expire", sessions = removed,
                    "expiry sweep"
                );
            }
            Err(e) => {
                metrics.error(ErrorKind::Store);
                tracing::warn!(error = %e, "expiry sweep failed");
            }
        }
    }
}

/// Removes sessions of `worker_ids` idle longer than `ttl`; never touches other workers'
/// sessions, so one policy's TTL cannot delete another policy's sessions.
pub(crate) async fn idle(
    store: &dyn Store,
    fence: &Fence,
    metrics: &Metrics,
    ttl: Duration,
    worker_ids: &[String],
) -> Result<u64, SweepError> {
    fence.check()?;
    let started = Instant::now();
    let result = store.sweep_idle_for_workers(ttl, worker_ids).await;
    metrics.observe_store(StoreOp::SweepIdle, started.elapsed());
    let removed = result.inspect_err(|_| metrics.error(ErrorKind::Store))?;
    metrics.swept("idle", removed);
    Ok(removed)
}
