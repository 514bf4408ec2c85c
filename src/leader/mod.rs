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
    /// Between `became leader` and the term's end. Only a term can be lost: a standby that sees
    /// its own identity on an expired Lease (left by an earlier process with the same name) is
    /// not a deposed leader.
    in_term: std::sync::atomic::AtomicBool,
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
    pub(crate) identity: String,
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
                in_term: std::sync::atomic::AtomicBool::new(false),
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

    /// The deadline the newest observation of the Lease grants (`None`: not ours). It never
    /// touches the term's epoch claim: an observation can be older than the term (a read sent
    /// before this replica took the lease and answered after it claimed its epoch), and such a
    /// stale view must only close the fence until the next observation, not for the whole term.
    fn set_deadline(&self, deadline: Option<Instant>) {
        *self
            .inner
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = deadline;
        self.notify();
    }

    /// A new term starts: its epoch has yet to be claimed.
    fn begin_term(&self) {
        self.inner
            .in_term
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.set_claim(Claim::Pending);
    }

    fn in_term(&self) -> bool {
        self.inner.in_term.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The term is over (lost, or the lease released): the fence closes and a later term claims
    /// an epoch of its own.
    fn end_term(&self) {
        self.inner
            .in_term
            .store(false, std::sync::atomic::Ordering::SeqCst);
        *self
            .inner
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        *self
            .inner
            .claim
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Claim::Pending;
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
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) identity: String,
    pub(crate) duration: Duration,
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
    let left = release_window(
        result.is_ok(),
        fence.in_term(),
        fence.deadline(),
        Instant::now(),
    );
    fence.end_term();
    match left {
        // The release patch carries no resourceVersion, and the election library also sends it
        // when the Lease it last read has expired: sent after a lost term (or answered after
        // the deadline), it could clear the holder another replica has meanwhile — that
        // replica would then lead with no Lease behind it. So only a shutdown of a replica that
        // still holds a confirmed lease releases it, and only while its deadline lasts.
        Some(left) => match tokio::time::timeout(left, manager.release()).await {
            Ok(Ok(())) => tracing::info!(identity = %config.identity, "lease released"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "releasing the lease failed; it expires by itself");
            }
            Err(_) => tracing::warn!("releasing the lease timed out; it expires by itself"),
        },
        None if result.is_err() => tracing::info!(
            identity = %config.identity,
            "not releasing the lease: the term was lost; it expires by itself"
        ),
        None => {}
    }
    result
}

/// How long a release may take: the time left to the fence deadline, when the campaign ended
/// cleanly (a shutdown) while this replica held a confirmed lease; else `None`, no release.
fn release_window(
    clean: bool,
    in_term: bool,
    deadline: Option<Instant>,
    now: Instant,
) -> Option<Duration> {
    if !(clean && in_term) {
        return None;
    }
    deadline
        .and_then(|d| d.checked_duration_since(now))
        .filter(|left| !left.is_zero())
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
                term.fence.begin_term();
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

/// Follows the Lease and keeps the fence's deadline at last confirmed renewal + duration −
/// safety margin. Cancels `lost` when a term's deadline passes without renewal, and notifies
/// `released` when the lease has no holder.
///
/// Besides the watch, the Lease is read every third of its duration: a watch whose connection
/// hangs (a blackholed network) delivers nothing and reports no error for minutes, and a stale
/// view (see [`Fence::set_deadline`]) would otherwise keep the fence shut until the next renewal.
async fn observe_lease(
    api: Api<Lease>,
    config: LeaseConfig,
    fence: Fence,
    lost: CancellationToken,
    released: Arc<Notify>,
) {
    let selector = format!("metadata.name={}", config.name);
    let mut events = watcher(api.clone(), watcher::Config::default().fields(&selector))
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let poll_every = (config.duration / 3).max(Duration::from_millis(500));
    let mut poll = tokio::time::interval(poll_every);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut view = LeaseView::default();
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(lease)) => view.apply(&lease, &config, &fence, &released),
                Some(Err(e)) => tracing::debug!(error = %e, "lease watch error"),
                None => return,
            },
            _ = poll.tick() => match tokio::time::timeout(poll_every, api.get_opt(&config.name)).await {
                Ok(Ok(Some(lease))) => view.apply(&lease, &config, &fence, &released),
                Ok(Ok(None)) => fence.set_deadline(None),
                Ok(Err(e)) => tracing::debug!(error = %e, "reading the lease failed"),
                Err(_) => tracing::debug!("reading the lease timed out"),
            },
            _ = tick.tick() => {
                if term_expired(fence.in_term(), fence.deadline(), Instant::now()) {
                    fence.end_term();
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

/// What the observer has learnt of the Lease so far.
#[derive(Debug, Default)]
struct LeaseView {
    /// The latest deadline any observation of our own lease granted. Renewals only move it
    /// forward, so an older observation of our own lease (a read answered late) cannot pull the
    /// deadline back.
    own: Option<Instant>,
}

impl LeaseView {
    fn apply(&mut self, lease: &Lease, config: &LeaseConfig, fence: &Fence, released: &Notify) {
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref());
        if holder.is_none_or(str::is_empty) {
            released.notify_one();
        }
        fence.set_deadline(self.observe(deadline(
            lease,
            config,
            SystemTime::now(),
            Instant::now(),
        )));
    }

    /// The fence deadline after one observation: `None` while another replica (or nobody)
    /// holds the lease, else the latest of our own deadlines.
    fn observe(&mut self, granted: Option<Instant>) -> Option<Instant> {
        let granted = granted?;
        let latest = self.own.map_or(granted, |own| own.max(granted));
        self.own = Some(latest);
        Some(latest)
    }
}

/// A term ends when the deadline of the lease it holds has passed — also when the first
/// observation after an outage shows our own lease already expired (its deadline lies in the
/// past). A fence that is shut because another holder was seen is not a lost term by itself:
/// the lease manager reports that loss.
fn term_expired(in_term: bool, deadline: Option<Instant>, now: Instant) -> bool {
    in_term && deadline.is_some_and(|d| now >= d)
}

/// The fence deadline a Lease grants this replica, if it holds it: its last renewal + duration
/// − the safety margin, as an [`Instant`] (`now` when that moment has passed already).
fn deadline(
    lease: &Lease,
    config: &LeaseConfig,
    wall: SystemTime,
    now: Instant,
) -> Option<Instant> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return None;
    }
    let renewed: SystemTime = spec.renew_time.as_ref()?.0.into();
    let duration = spec
        .lease_duration_seconds
        .map_or(config.duration, |s| Duration::from_secs(s.max(0) as u64));
    let until = renewed + duration.saturating_sub(config.safety_margin());
    Some(match until.duration_since(wall) {
        Ok(left) => now + left,
        Err(_) => now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LeaseConfig {
        LeaseConfig {
            name: "session-operator".into(),
            namespace: "ops".into(),
            identity: "replica-a".into(),
            duration: Duration::from_secs(6),
        }
    }

    fn lease(holder: &str, renewed: SystemTime) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "session-operator", "namespace": "ops" },
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": 6,
                "renewTime": humantime::format_rfc3339_micros(renewed).to_string(),
            }
        }))
        .expect("a valid Lease")
    }

    /// A leader that claimed epoch 3, as `campaign` leaves it.
    fn leading_fence(view: &mut LeaseView, now: Instant) -> Fence {
        let fence = Fence::new_standby("replica-a", "ops/session-operator");
        fence.begin_term();
        fence.set_claim(Claim::Held(Some(3)));
        fence.set_deadline(view.observe(Some(now + Duration::from_secs(5))));
        assert!(fence.is_open());
        fence
    }

    #[test]
    fn an_observation_older_than_the_term_does_not_close_the_fence_for_good() {
        let now = Instant::now();
        let mut view = LeaseView::default();
        let fence = leading_fence(&mut view, now);
        // A read answered late: the Lease still held by the previous leader.
        let stale = lease("replica-b", SystemTime::now());
        fence.set_deadline(view.observe(deadline(&stale, &config(), SystemTime::now(), now)));
        assert!(
            !fence.is_open(),
            "a view of another holder closes the fence"
        );
        assert_eq!(
            fence.epoch(),
            Some(3),
            "but the term keeps its claimed epoch"
        );
        // The next observation shows our own renewal: the fence opens again, same epoch.
        let fresh = lease("replica-a", SystemTime::now());
        fence.set_deadline(view.observe(deadline(&fresh, &config(), SystemTime::now(), now)));
        assert!(fence.is_open());
        assert_eq!(fence.grant().map(|g| g.epoch).ok(), Some(3));
    }

    #[test]
    fn our_own_lease_seen_expired_ends_the_term() {
        let now = Instant::now();
        let wall = SystemTime::now();
        let expired = lease("replica-a", wall - Duration::from_secs(30));
        let seen = deadline(&expired, &config(), wall, now);
        assert_eq!(
            seen,
            Some(now),
            "an expired own lease is a deadline that has passed"
        );
        assert!(term_expired(true, seen, now));
        // A standby that finds its own name on an expired Lease (an earlier process) lost nothing.
        assert!(!term_expired(false, seen, now));
        // Another holder seen: the fence is shut, but the lease manager reports that loss.
        assert!(!term_expired(true, None, now));
        // The term ends for good: the claim is gone, a later term claims its own epoch.
        let mut view = LeaseView::default();
        let fence = leading_fence(&mut view, now);
        fence.end_term();
        assert!(!fence.is_open());
        assert_eq!(fence.epoch(), None);
    }

    #[test]
    fn a_late_read_of_our_own_lease_does_not_pull_the_deadline_back() {
        let now = Instant::now();
        let mut view = LeaseView::default();
        let later = now + Duration::from_secs(10);
        assert_eq!(view.observe(Some(later)), Some(later));
        assert_eq!(
            view.observe(Some(now + Duration::from_secs(2))),
            Some(later)
        );
        assert_eq!(view.observe(None), None, "another holder seen: not ours");
        assert_eq!(view.observe(Some(now)), Some(later));
    }

    #[test]
    fn only_a_shutdown_within_a_confirmed_term_releases_the_lease() {
        let now = Instant::now();
        let later = now + Duration::from_secs(3);
        assert_eq!(
            release_window(true, true, Some(later), now),
            Some(Duration::from_secs(3))
        );
        // A lost term: another replica may hold the Lease by the time the patch arrives.
        assert_eq!(release_window(false, true, Some(later), now), None);
        // Shut down past the deadline, or with a view of another holder: not ours to release.
        assert_eq!(release_window(true, true, Some(now), now), None);
        assert_eq!(release_window(true, true, None, now), None);
        // A standby holds nothing.
        assert_eq!(release_window(true, false, Some(later), now), None);
    }

    #[test]
    fn a_renewal_in_time_grants_its_duration_less_the_margin() {
        let now = Instant::now();
        let wall = SystemTime::now();
        let renewed = lease("replica-a", wall);
        let granted = deadline(&renewed, &config(), wall, now).expect("our lease");
        // 6 s lease − 1 s margin, give or take the microseconds the RFC 3339 text rounds off.
        let left = granted - now;
        assert!(
            left <= Duration::from_secs(5) && left > Duration::from_millis(4_990),
            "{left:?}"
        );
    }
}
