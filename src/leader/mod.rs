//! Leader election on a `coordination.k8s.io` Lease, with fencing.
//!
//! [`kube_lease_manager`] acquires and renews the lease. Its "am I leader" channel can keep
//! saying `true` while renewals hang, so mutations are guarded by a [`Fence`] of our own: a
//! deadline of *last renewal the API server confirmed* + lease duration − a safety margin,
//! learned by watching the Lease object itself. Past the deadline nothing is mutated, and a
//! replica that loses the lease exits (like controller-runtime) so it restarts as a clean
//! standby; another replica cannot acquire the lease before the deadline has passed.
//!
//! The deadline alone cannot stop a statement that is already on its way (waiting for a lock,
//! or sent by a process frozen past its deadline), so each term also claims a new **epoch** in
//! the store before the fence opens, and the store checks it in every mutation (see
//! [`crate::store::Fencing`]): the fence is that check's [`Grant`] source.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::store::{Fencing, Grant, Store, StoreError};

/// Guards store mutations: open only while this replica holds a confirmed lease.
#[derive(Clone, Debug)]
pub(crate) struct Fence {
    inner: Arc<FenceInner>,
}

#[derive(Debug)]
struct FenceInner {
    identity: String,
    /// The fenced scope: the Lease as `namespace/name`.
    scope: String,
    /// `None`: not leader. Leader election off: [`Instant`] far in the future.
    deadline: Mutex<Option<Instant>>,
    /// The epoch of this term, once claimed in the store.
    claim: Mutex<Claim>,
    leading: watch::Sender<bool>,
}

/// Whether this term's epoch has been claimed in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Not yet: the fence stays closed.
    Pending,
    /// Claimed; `None` when the store keeps no epochs (nothing to prove).
    Held(Option<i64>),
}

/// A store mutation was refused because this replica does not hold the lease.
#[derive(Debug, thiserror::Error)]
#[error("not the leader: {identity} does not hold a confirmed lease")]
pub(crate) struct NotLeader {
    pub identity: String,
}

impl Fence {
    fn new(identity: &str, scope: &str, deadline: Option<Instant>, claim: Claim) -> Self {
        let (leading, _) = watch::channel(deadline.is_some() && claim != Claim::Pending);
        Self {
            inner: Arc::new(FenceInner {
                identity: identity.to_string(),
                scope: scope.to_string(),
                deadline: Mutex::new(deadline),
                claim: Mutex::new(claim),
                leading,
            }),
        }
    }

    /// A closed fence that leader election opens once this replica holds the lease of `scope`
    /// (`namespace/name`) and claimed the term's epoch.
    pub(crate) fn new_standby(identity: &str, scope: &str) -> Self {
        Self::new(identity, scope, None, Claim::Pending)
    }

    /// A fence that is always open: leader election disabled (one replica), no epoch.
    pub(crate) fn always_open(identity: &str) -> Self {
        Self::new(
            identity,
            "",
            Some(Instant::now() + Duration::from_secs(100 * 365 * 86_400)),
            Claim::Held(None),
        )
    }

    /// The epoch of the current term, when one was claimed.
    pub(crate) fn epoch(&self) -> Option<i64> {
        match *self
            .inner
            .claim
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Claim::Held(epoch) => epoch,
            Claim::Pending => None,
        }
    }

    fn claimed(&self) -> bool {
        *self
            .inner
            .claim
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            != Claim::Pending
    }

    fn deadline(&self) -> Option<Instant> {
        *self
            .inner
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ok while this replica may mutate the store. Call before every mutation.
    pub(crate) fn check(&self) -> Result<(), NotLeader> {
        if self.is_open() {
            Ok(())
        } else {
            Err(NotLeader {
                identity: self.inner.identity.clone(),
            })
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.claimed() && self.deadline().is_some_and(|d| Instant::now() < d)
    }

    pub(crate) fn identity(&self) -> &str {
        &self.inner.identity
    }

    /// Changes of leadership (true once leading), for starting and stopping leader-only loops.
    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.inner.leading.subscribe()
    }

    fn set_deadline(&self, deadline: Option<Instant>) {
        *self
            .inner
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = deadline;
        if deadline.is_none() {
            // A later term claims an epoch of its own.
            *self
                .inner
                .claim
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Claim::Pending;
        }
        self.notify();
    }

    fn set_claim(&self, claim: Claim) {
        *self
            .inner
            .claim
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = claim;
        self.notify();
    }

    /// Leading = the lease is held and the term's epoch claimed.
    fn notify(&self) {
        let now = self.deadline().is_some() && self.claimed();
        self.inner
            .leading
            .send_if_modified(|leading| std::mem::replace(leading, now) != now);
    }
}

impl Fencing for Fence {
    fn grant(&self) -> Result<Grant, StoreError> {
        let now = Instant::now();
        match (self.epoch(), self.deadline()) {
            (Some(epoch), Some(deadline)) if now < deadline => Ok(Grant {
                epoch,
                left: deadline - now,
            }),
            _ => Err(StoreError::Fenced(format!(
                "{} does not hold a confirmed lease with a claimed epoch",
                self.inner.identity
            ))),
        }
    }

    fn scope(&self) -> &str {
        &self.inner.scope
    }
}

/// Lease settings.
#[derive(Debug, Clone)]
pub(crate) struct LeaseConfig {
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
pub(crate) async fn run(
    client: Client,
    config: LeaseConfig,
    fence: Fence,
    store: Arc<dyn Store>,
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
    let result = campaign(
        &client,
        &mut manager,
        &config,
        &Term {
            fence: &fence,
            store,
        },
        &shutdown,
        &lost,
        &released,
    )
    .await;
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

/// What a new term needs to claim its epoch.
struct Term<'a> {
    fence: &'a Fence,
    store: Arc<dyn Store>,
}

/// Claims the term's epoch, retrying until the store answers; the fence opens once it is held.
async fn claim_epoch(fence: Fence, store: Arc<dyn Store>, identity: String) {
    let mut delay = Duration::from_millis(200);
    loop {
        match store.claim_epoch(&fence.inner.scope, &identity).await {
            Ok(epoch) => {
                fence.set_claim(Claim::Held(epoch));
                tracing::info!(%identity, scope = %fence.inner.scope, epoch, "claimed the leadership epoch");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "claiming the leadership epoch failed; not mutating until it succeeds");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn campaign(
    client: &Client,
    manager: &mut LeaseManager,
    config: &LeaseConfig,
    term: &Term<'_>,
    shutdown: &CancellationToken,
    lost: &CancellationToken,
    released: &Notify,
) -> anyhow::Result<()> {
    let mut was_leader = false;
    // Aborted when the campaign ends, whatever the reason.
    let mut claiming: Option<tokio::task::JoinHandle<()>> = None;
    let result = loop {
        let step = campaign_step(
            client,
            manager,
            config,
            shutdown,
            lost,
            released,
            &mut was_leader,
        )
        .await;
        match step {
            Step::Continue => {}
            Step::Elected => {
                claiming = Some(tokio::spawn(claim_epoch(
                    term.fence.clone(),
                    term.store.clone(),
                    config.identity.clone(),
                )));
            }
            Step::End(result) => break result,
        }
    };
    if let Some(task) = claiming {
        task.abort();
    }
    result
}

enum Step {
    Continue,
    Elected,
    End(anyhow::Result<()>),
}

async fn campaign_step(
    client: &Client,
    manager: &mut LeaseManager,
    config: &LeaseConfig,
    shutdown: &CancellationToken,
    lost: &CancellationToken,
    released: &Notify,
    was_leader: &mut bool,
) -> Step {
    {
        tokio::select! {
            () = shutdown.cancelled() => Step::End(Ok(())),
            // The holder released the lease. The manager would sleep until the lease it last
            // read expires; a fresh one reads the released lease and takes it now.
            () = released.notified(), if !*was_leader => {
                match build_manager(client, config).await {
                    Ok(fresh) => *manager = fresh,
                    Err(e) => tracing::warn!(error = %e, "re-reading the released lease failed"),
                }
                Step::Continue
            }
            () = lost.cancelled() => {
                Step::End(Err(anyhow::anyhow!("leadership lost: the lease was not renewed in time")))
            }
            changed = manager.changed() => match changed {
                Ok(true) => {
                    *was_leader = true;
                    tracing::info!(identity = %config.identity, lease = %config.name, "became leader");
                    Step::Elected
                }
                Ok(false) if *was_leader => {
                    Step::End(Err(anyhow::anyhow!("leadership lost: another replica holds the lease")))
                }
                Ok(false) => Step::Continue,
                // A failed renewal is retried: only the fence deadline ends a leadership, so an
                // API-server blip does not restart the leader.
                Err(e) if *was_leader => {
                    tracing::warn!(error = %e, "lease renewal failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Step::Continue
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease election error; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Step::Continue
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
                let held = fence.deadline().is_some();
                if held && fence.deadline().is_some_and(|d| Instant::now() >= d) {
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
        .map_or(config.duration, |s| Duration::from_secs(s.max(0) as u64));
    let until = renewed + duration.saturating_sub(config.safety_margin());
    let left = until.duration_since(SystemTime::now()).ok()?;
    Some(Instant::now() + left)
}
