//! Leader election on a `coordination.k8s.io` Lease, with fencing.
//!
//! [`kube_lease_manager`] acquires and renews the lease. Its "am I leader" channel can keep
//! saying `true` while renewals hang, so mutations are guarded by a [`Fence`] of our own: a
//! deadline of *last renewal the API server confirmed* + lease duration − a safety margin,
//! learned by watching the Lease object itself. Past the deadline nothing is mutated, and a
//! replica that loses the lease exits (like controller-runtime) so it restarts as a clean
//! standby; another replica cannot acquire the lease before the deadline has passed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// Guards store mutations: open only while this replica holds a confirmed lease.
#[derive(Clone, Debug)]
pub struct Fence {
    inner: Arc<FenceInner>,
}

#[derive(Debug)]
struct FenceInner {
    identity: String,
    /// `None`: not leader. Leader election off: [`Instant`] far in the future.
    deadline: Mutex<Option<Instant>>,
    leading: watch::Sender<bool>,
}

/// A store mutation was refused because this replica does not hold the lease.
#[derive(Debug, thiserror::Error)]
#[error("not the leader: {identity} does not hold a confirmed lease")]
pub struct NotLeader {
    pub identity: String,
}

impl Fence {
    fn new(identity: &str, deadline: Option<Instant>) -> Self {
        let (leading, _) = watch::channel(deadline.is_some());
        Self {
            inner: Arc::new(FenceInner {
                identity: identity.to_string(),
                deadline: Mutex::new(deadline),
                leading,
            }),
        }
    }

    /// A closed fence that leader election opens once this replica holds the lease.
    pub fn new_standby(identity: &str) -> Self {
        Self::new(identity, None)
    }

    /// A fence that is always open: leader election disabled (one replica).
    pub fn always_open(identity: &str) -> Self {
        Self::new(
            identity,
            Some(Instant::now() + Duration::from_secs(100 * 365 * 86_400)),
        )
    }

    /// Ok while this replica may mutate the store. Call before every mutation.
    pub fn check(&self) -> Result<(), NotLeader> {
        if self.is_open() {
            Ok(())
        } else {
            Err(NotLeader {
                identity: self.inner.identity.clone(),
            })
        }
    }

    pub fn is_open(&self) -> bool {
        let deadline = *self
            .inner
            .deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        deadline.is_some_and(|d| Instant::now() < d)
    }

    pub fn identity(&self) -> &str {
        &self.inner.identity
    }

    /// Changes of leadership (true once leading), for starting and stopping leader-only loops.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.inner.leading.subscribe()
    }

    fn set_deadline(&self, deadline: Option<Instant>) {
        *self
            .inner
            .deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = deadline;
        self.inner.leading.send_if_modified(|leading| {
            let now = deadline.is_some();
            std::mem::replace(leading, now) != now
        });
    }
}

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
}

impl LeaseConfig {
    /// Renew when half of the lease is left, so a slow or failed renewal has time to be retried
    /// before the fence closes.
    fn renew_grace(&self) -> u64 {
        (self.duration.as_secs() / 2).max(1)
    }

    /// Stop mutating this long before the lease could expire, for clock skew between replicas.
    fn safety_margin(&self) -> Duration {
        (self.duration / 6).max(Duration::from_millis(500))
    }
}

/// Runs leader election until `shutdown` is cancelled (then releases the lease) or leadership is
/// lost after it was held (then returns an error: the process should exit and restart).
pub async fn run(
    client: Client,
    config: LeaseConfig,
    fence: Fence,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.duration >= Duration::from_secs(2),
        "--lease-duration must be at least 2s"
    );
    let mut manager = build_manager(&client, &config).await?;
    let lost = CancellationToken::new();
    let released = Arc::new(Notify::new());
    let observer = tokio::spawn(observe_lease(
        Api::namespaced(client.clone(), &config.namespace),
        config.clone(),
        fence.clone(),
        lost.clone(),
        released.clone(),
    ));
    let result = campaign(&client, &mut manager, &config, &shutdown, &lost, &released).await;
    observer.abort();
    fence.set_deadline(None);
    if let Err(e) = manager.release().await {
        tracing::warn!(error = %e, "releasing the lease failed; it expires by itself");
    } else {
        tracing::info!(identity = %config.identity, "lease released");
    }
    result
}

async fn build_manager(client: &Client, config: &LeaseConfig) -> anyhow::Result<LeaseManager> {
    LeaseManagerBuilder::new(client.clone(), &config.name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(config.duration.as_secs())
        .with_grace(config.renew_grace())
        .with_field_manager(format!("session-operator/{}", config.identity))
        .build()
        .await
        .map_err(|e| anyhow::anyhow!("lease {}/{}: {e}", config.namespace, config.name))
}

async fn campaign(
    client: &Client,
    manager: &mut LeaseManager,
    config: &LeaseConfig,
    shutdown: &CancellationToken,
    lost: &CancellationToken,
    released: &Notify,
) -> anyhow::Result<()> {
    let mut was_leader = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            // The holder released the lease. The manager would sleep until the lease it last
            // read expires; a fresh one reads the released lease and takes it now.
            _ = released.notified(), if !was_leader => match build_manager(client, config).await {
                Ok(fresh) => *manager = fresh,
                Err(e) => tracing::warn!(error = %e, "re-reading the released lease failed"),
            },
            _ = lost.cancelled() => {
                anyhow::bail!("leadership lost: the lease was not renewed in time")
            }
            changed = manager.changed() => match changed {
                Ok(true) => {
                    was_leader = true;
                    tracing::info!(identity = %config.identity, lease = %config.name, "became leader");
                }
                Ok(false) if was_leader => {
                    anyhow::bail!("leadership lost: another replica holds the lease")
                }
                Ok(false) => {}
                // A failed renewal is retried: only the fence deadline ends a leadership, so an
                // API-server blip does not restart the leader.
                Err(e) if was_leader => {
                    tracing::warn!(error = %e, "lease renewal failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease election error; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
        }
    }
}

/// Watches the Lease and keeps the fence's deadline at last confirmed renewal + duration −
/// safety margin. Cancels `lost` when a held lease's deadline passes without renewal, and
/// notifies `released` when the lease has no holder.
async fn observe_lease(
    api: Api<Lease>,
    config: LeaseConfig,
    fence: Fence,
    lost: CancellationToken,
    released: Arc<Notify>,
) {
    let selector = format!("metadata.name={}", config.name);
    let mut events = watcher(api, watcher::Config::default().fields(&selector))
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(lease)) => {
                    let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref());
                    if holder.is_none_or(str::is_empty) {
                        released.notify_one();
                    }
                    fence.set_deadline(deadline(&lease, &config));
                }
                Some(Err(e)) => tracing::debug!(error = %e, "lease watch error"),
                None => return,
            },
            _ = tick.tick() => {
                let held = fence.inner.deadline.lock().map(|d| d.is_some()).unwrap_or(false);
                if held && !fence.is_open() {
                    fence.set_deadline(None);
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

/// The fence deadline a Lease grants this replica, if it holds it.
fn deadline(lease: &Lease, config: &LeaseConfig) -> Option<Instant> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return None;
    }
    let renewed: SystemTime = spec.renew_time.as_ref()?.0.into();
    let duration = spec
        .lease_duration_seconds
        .map(|s| Duration::from_secs(s.max(0) as u64))
        .unwrap_or(config.duration);
    let until = renewed + duration.saturating_sub(config.safety_margin());
    let left = until.duration_since(SystemTime::now()).ok()?;
    Some(Instant::now() + left)
}
