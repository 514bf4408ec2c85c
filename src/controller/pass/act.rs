//! Act: what the leader does with a plan. Migrations start as tasks of their own (see
//! [`super::super::migrations`]); the worker records, the idle sweep and the deletion costs are
//! written here, each behind the leader fence. A failure is reported, never fatal to the pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::Mutex;

use super::super::planner::Plan;
use super::super::state::PolicyState;
use super::super::workers::{DELETION_COST_ANNOTATION, Worker};
use super::super::{Context, GuardedPolicy, migrations, records};
use crate::leader::Fence;
use crate::policy::{IdleSweepRecord, SessionPolicy, ValidPolicy, duration};
use crate::sweep::SweepError;

/// What acting on a plan went wrong with, and when the next idle sweep is due.
#[derive(Debug, Default)]
pub(crate) struct Acted {
    pub idle_sweep_failed: Option<SweepError>,
    pub deletion_cost_failed: Option<kube::Error>,
    /// The idle sweep interval, when the policy sweeps.
    pub next_sweep: Option<Duration>,
}

/// The policy a pass acts for: its key, its state's handle (locked by the caller as `state`),
/// the object and its parsed spec.
pub(crate) struct Target<'a> {
    pub key: &'a ObjectRef<GuardedPolicy>,
    pub handle: &'a Arc<Mutex<PolicyState>>,
    pub policy: &'a SessionPolicy,
    pub valid: &'a ValidPolicy,
}

/// Starts the plan's migrations, writes the worker records, sweeps idle sessions and keeps
/// deletion costs, as far as this replica leads and the policy is not paused.
pub(crate) async fn act(
    ctx: &Arc<Context>,
    target: &Target<'_>,
    state: &mut PolicyState,
    plan: &mut Plan,
    workers: &[Worker],
    counts: &BTreeMap<String, u64>,
    leader: bool,
) -> Acted {
    let (policy, valid) = (target.policy, target.valid);
    let mutate = leader && !valid.paused;
    if mutate {
        let mut actions = std::mem::take(&mut plan.actions);
        actions.retain(|a| !state.ceded.contains(a.worker()));
        state.record_started(&actions, Timestamp::now());
        migrations::spawn(ctx, target.key, target.handle, policy, actions);
    }
    if leader {
        crate::telemetry::awaiting_store(records::save(
            ctx,
            target.key,
            &mut state.records,
            &state.memory,
        ))
        .await;
    }
    let mut acted = Acted::default();
    if let Some(ttl) = valid.idle_ttl {
        let due = state
            .last_idle_sweep
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= valid.idle_sweep_interval);
        if due && mutate {
            acted.idle_sweep_failed = idle_sweep(ctx, policy, state, ttl, workers).await.err();
        }
        acted.next_sweep = Some(valid.idle_sweep_interval);
    }
    if valid.pod_deletion_cost && mutate {
        let namespace = policy.namespace().unwrap_or_default();
        acted.deletion_cost_failed = deletion_costs(ctx, &namespace, workers, counts).await.err();
    }
    acted
}

/// The idle sweep, restricted to this policy's workers and departures (not those it ceded).
async fn idle_sweep(
    ctx: &Context,
    policy: &SessionPolicy,
    state: &mut PolicyState,
    ttl: Duration,
    workers: &[Worker],
) -> Result<(), SweepError> {
    let ids: Vec<String> = workers
        .iter()
        .map(|w| w.id.clone())
        .chain(state.memory.departures.keys().cloned())
        .filter(|id| !state.ceded.contains(id))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let removed =
        crate::sweep::idle(ctx.store.as_ref(), &ctx.fence, &ctx.metrics, ttl, &ids).await?;
    tracing::info!(
        policy = %policy.name_any(), identity = %ctx.fence.identity(), mutation = "sweep_idle",
        idle_ttl = %duration::format(ttl), workers = ids.len(), sessions = removed,
        "idle sweep"
    );
    if removed > 0 {
        let event = Event {
            type_: EventType::Normal,
            reason: "IdleSweep".into(),
            note: Some(format!(
                "removed {removed} session(s) idle longer than {}",
                duration::format(ttl)
            )),
            action: "Sweep".into(),
            secondary: None,
        };
        ctx.events.publish(policy, event);
    }
    state.last_idle_sweep = Some((
        Instant::now(),
        IdleSweepRecord {
            time: Time(Timestamp::now()),
            removed,
        },
    ));
    Ok(())
}

/// Keeps each worker pod's deletion cost near its session count. Hysteresis: a pod is patched
/// only when its count moved by more than 10% (and at least 2) from the annotated value. A few
/// patches run at a time, so that switching `podDeletionCost` on for a large pool takes seconds.
async fn deletion_costs(
    ctx: &Context,
    namespace: &str,
    workers: &[Worker],
    counts: &BTreeMap<String, u64>,
) -> Result<(), kube::Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let patches: Vec<_> = workers
        .iter()
        .filter(|w| !w.departing)
        .filter_map(|w| {
            let want = counts.get(&w.id).copied().unwrap_or(0).min(i32::MAX as u64) as i64;
            needs_cost_update(w.deletion_cost, want)
                .then(|| patch_cost(api.clone(), ctx.fence.clone(), w.pod.clone(), want))
        })
        .collect();
    let results: Vec<Result<(), kube::Error>> = stream::iter(patches)
        .buffer_unordered(DELETION_COST_PATCHES)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn patch_cost(
    api: Api<Pod>,
    fence: Fence,
    pod: String,
    want: i64,
) -> Result<(), kube::Error> {
    if !fence.is_open() {
        return Ok(());
    }
    let patch = json!({"metadata": {"annotations": {DELETION_COST_ANNOTATION: want.to_string()}}});
    match api
        .patch(&pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // The pod went away meanwhile: nothing to annotate.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletion-cost patches in flight at once.
const DELETION_COST_PATCHES: usize = 8;

/// Whether an annotated cost differs enough from the wanted one to be patched.
pub(crate) fn needs_cost_update(current: Option<i64>, want: i64) -> bool {
    match current {
        None => true,
        Some(current) => {
            let tolerance = (current.abs() / 10).max(1);
            (current - want).abs() > tolerance
        }
    }
}

#[cfg(test)]
mod tests {
    use super::needs_cost_update;

    #[test]
    fn deletion_cost_hysteresis() {
        assert!(needs_cost_update(None, 0));
        assert!(!needs_cost_update(Some(0), 1));
        assert!(needs_cost_update(Some(0), 2));
        assert!(!needs_cost_update(Some(100), 109));
        assert!(needs_cost_update(Some(100), 111));
        assert!(needs_cost_update(Some(100), 0));
    }
}
