//! The operator's runtime: leader election, the controller and the expiry loop, wired together.
//! `session-operator run` starts it in a pod; `session-operator demo` starts it in-process next to
//! an emulated cluster.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::connect::Connected;
use crate::controller::{self, Settings};
use crate::leader::{self, Fence, LeaseConfig};
use crate::telemetry::{Health, Metrics};

/// How one operator replica runs.
#[derive(Debug, Clone)]
pub(crate) struct OperatorConfig {
    pub identity: String,
    /// `None`: leader election off (one replica only).
    pub lease: Option<LeaseConfig>,
    pub expiry_interval: Duration,
    pub controller: Settings,
}

/// Runs until `shutdown` is cancelled (`Ok`) or leadership is lost after it was held (`Err`: the
/// process should exit so that it restarts as a clean standby).
pub(crate) async fn run(
    client: kube::Client,
    store: Connected,
    config: OperatorConfig,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let identity = config.identity.clone();
    let fence = match &config.lease {
        Some(lease) => {
            let fence =
                Fence::new_standby(&identity, &format!("{}/{}", lease.namespace, lease.name));
            // Every mutation proves this replica's epoch in the store (see store::Fencing).
            store.store.set_fencing(Arc::new(fence.clone()));
            fence
        }
        None => Fence::always_open(&identity),
    };
    // The lease is released only after the controller stopped, so no store mutation, status
    // write or Event of this replica can follow the handover.
    let release = CancellationToken::new();
    let mut leader_task = config.lease.map(|lease| {
        tokio::spawn(leader::run(
            client.clone(),
            lease,
            fence.clone(),
            store.store.clone(),
            release.clone(),
        ))
    });
    tokio::spawn(leader_gauge(fence.clone(), metrics.clone()));
    let layered = store.layered.clone();
    if let Some(layered) = layered.clone() {
        tokio::spawn(crate::cache_repair::repair_loop(
            layered,
            fence.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(crate::sweep::expiry_loop(
        store.store.clone(),
        fence.clone(),
        metrics.clone(),
        config.expiry_interval,
        shutdown.clone(),
    ));
    tracing::info!(%identity, leader_elect = leader_task.is_some(), "session-operator starting");
    let controller = tokio::spawn(controller::run(
        client,
        store,
        fence.clone(),
        metrics,
        health,
        config.controller,
        shutdown.clone(),
    ));

    let outcome = if let Some(task) = leader_task.as_mut() {
        tokio::select! {
            result = task => {
                leader_task = None;
                match result {
                    Ok(result) => result,
                    Err(e) => Err(anyhow::anyhow!("leader election task failed: {e}")),
                }
            }
            () = shutdown.cancelled() => Ok(()),
        }
    } else {
        shutdown.cancelled().await;
        Ok(())
    };
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
    // What the cache could not be told yet is repaired before the lease is released (and stays
    // recorded in Postgres for the next leader if Redis still does not answer).
    if let Some(layered) = layered {
        // The migrations' delayed cache re-applications first (at most their delay), then
        // the repair of what the cache could not be told.
        layered.wait_reapplied().await;
        crate::cache_repair::before_shutdown(&layered, &fence).await;
    }
    release.cancel();
    if let Some(task) = leader_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    tracing::info!(%identity, "session-operator stopped");
    outcome
}

async fn leader_gauge(fence: Fence, metrics: Metrics) {
    let mut leading = fence.subscribe();
    loop {
        metrics.leader.set(i64::from(*leading.borrow_and_update()));
        metrics.epoch.set(fence.epoch().unwrap_or(0));
        if leading.changed().await.is_err() {
            return;
        }
    }
}
