//! What the planner needs to know about a worker pod, derived from the pod object.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

pub(crate) use super::observe::Observed;
use crate::policy::{ValidPolicy, WorkerIdSource};

/// A pod selected by a policy, seen through the planner's eyes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Worker {
    /// The worker id proxies route to.
    pub id: String,
    /// The pod's name, for events and the deletion-cost annotation.
    pub pod: String,
    /// Ready condition true, phase Running, not terminating.
    pub ready: bool,
    /// Terminating (deletionTimestamp) or finished (phase Failed/Succeeded).
    pub departing: bool,
    /// When the Ready condition last turned true (only meaningful while `ready`).
    pub ready_since: Option<Timestamp>,
    pub created: Option<Timestamp>,
    /// When the pod started to depart: its deletion request (deletionTimestamp minus the grace
    /// period). `None` for pods that finished (phase Failed/Succeeded) or are not departing.
    pub departed_at: Option<Timestamp>,
    /// The workload the pod belongs to; replacements from the same family are preferred.
    pub family: Option<Family>,
    /// Current `controller.kubernetes.io/pod-deletion-cost`, if set.
    pub deletion_cost: Option<i64>,
    /// When and in which order the operator's watch first showed the pod: orders pods created
    /// in the same second, which `created` cannot.
    pub observed: Option<Observed>,
    /// The pod's controller (`Kind/name`, e.g. its ReplicaSet): a pod of another ReplicaSet of
    /// the same Deployment replaces one of the old ReplicaSet.
    pub owner: Option<String>,
}

/// The workload that owns a pod, and what its pods' names look like, so that sessions of a pod
/// that vanished while no operator was running can still be attributed to the policy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Family {
    /// Pods `<deployment>-<pod-template-hash>-<suffix>` of a Deployment's ReplicaSets.
    Deployment(String),
    /// Pods `<statefulset>-<ordinal>`.
    StatefulSet(String),
    /// Pods named `<generateName><suffix>` by another owner (a bare ReplicaSet, a Job, …).
    Generated(String),
}

impl Family {
    /// Whether `name` looks like the name of a pod of this family.
    pub(crate) fn matches_name(&self, name: &str) -> bool {
        let suffix_ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
        match self {
            Family::Deployment(deployment) => name
                .strip_prefix(deployment.as_str())
                .and_then(|rest| rest.strip_prefix('-'))
                .and_then(|rest| rest.split_once('-'))
                .is_some_and(|(hash, suffix)| suffix_ok(hash) && suffix_ok(suffix)),
            Family::StatefulSet(set) => name
                .strip_prefix(set.as_str())
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|ordinal| {
                    !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit())
                }),
            Family::Generated(prefix) => name.strip_prefix(prefix.as_str()).is_some_and(suffix_ok),
        }
    }
}

/// Whether a pod's phase is final (Failed or Succeeded): it will not serve again.
pub(crate) fn is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Failed" | "Succeeded")
    )
}

pub(crate) const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";

/// The worker view of a pod the policy selects, with the watch's first observation of it;
/// `None` when the pod has no worker id (a missing label or annotation).
pub(crate) fn worker(
    policy: &ValidPolicy,
    pod: &Pod,
    observed: Option<Observed>,
) -> Option<Worker> {
    let id = policy.worker_id(pod)?;
    let meta = &pod.metadata;
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    let departing = meta.deletion_timestamp.is_some() || is_finished(pod);
    let ready_condition = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    let ready = !departing
        && phase == Some("Running")
        && ready_condition.is_some_and(|c| c.status == "True");
    Some(Worker {
        id,
        pod: meta.name.clone().unwrap_or_default(),
        ready,
        departing,
        ready_since: ready
            .then(|| ready_condition.and_then(|c| c.last_transition_time.as_ref()))
            .flatten()
            .map(|t| t.0),
        created: meta.creation_timestamp.as_ref().map(|t| t.0),
        departed_at: meta.deletion_timestamp.as_ref().map(|t| {
            let grace = meta.deletion_grace_period_seconds.unwrap_or(0).max(0);
            t.0.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(grace))
                .unwrap_or(t.0)
        }),
        family: family(pod),
        deletion_cost: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(DELETION_COST_ANNOTATION))
            .and_then(|v| v.parse().ok()),
        observed,
        owner: owner(pod),
    })
}

/// The pod's controller owner as `Kind/name`.
pub(crate) fn owner(pod: &Pod) -> Option<String> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| format!("{}/{}", o.kind, o.name))
}

/// The family of a pod, from its controller owner reference.
pub(crate) fn family(pod: &Pod) -> Option<Family> {
    let meta = &pod.metadata;
    let owner = meta
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))?;
    let hash = meta
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    match (owner.kind.as_str(), hash) {
        ("ReplicaSet", Some(hash)) => match owner.name.strip_suffix(&format!("-{hash}")) {
            Some(deployment) => Some(Family::Deployment(deployment.to_string())),
            None => Some(Family::Generated(format!("{}-", owner.name))),
        },
        ("StatefulSet", _) => Some(Family::StatefulSet(owner.name.clone())),
        _ => meta.generate_name.clone().map(Family::Generated),
    }
}

/// Whether sessions of the unknown worker id `id` plausibly belong to a pod of `families`.
/// Only pod names carry a family; uids, labels and annotations do not.
pub(crate) fn claims_orphan(policy: &ValidPolicy, families: &[Family], id: &str) -> Option<Family> {
    if policy.worker_id.from != WorkerIdSource::PodName {
        return None;
    }
    families.iter().find(|f| f.matches_name(id)).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("pod")
    }

    fn policy() -> ValidPolicy {
        let spec = serde_json::from_value(json!({"selector": {"matchLabels": {"app": "w"}}}))
            .expect("spec");
        ValidPolicy::new(&spec).expect("valid")
    }

    #[test]
    fn readiness_and_departure_follow_the_pod() {
        let running = |extra: serde_json::Value| {
            let mut p = json!({
                "metadata": {"name": "w-1", "creationTimestamp": "2026-01-01T00:00:00Z"},
                "status": {"phase": "Running", "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:05Z"}]}
            });
            json_patch_merge(&mut p, extra);
            worker(&policy(), &pod(p), None).expect("worker")
        };
        let w = running(json!({}));
        assert!(w.ready && !w.departing);
        assert_eq!(
            w.ready_since.map(|t| t.to_string()).as_deref(),
            Some("2026-01-01T00:00:05Z")
        );
        let w = running(json!({"metadata": {"deletionTimestamp": "2026-01-01T00:01:00Z"}}));
        assert!(!w.ready && w.departing);
        let w = running(json!({"status": {"phase": "Failed"}}));
        assert!(!w.ready && w.departing);
        let w = running(json!({"status": {"phase": "Pending"}}));
        assert!(!w.ready && !w.departing);
    }

    fn json_patch_merge(target: &mut serde_json::Value, patch: serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    json_patch_merge(t.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (t, p) => *t = p,
        }
    }

    #[test]
    fn families_come_from_owners_and_match_pod_names() {
        let rs_pod = pod(json!({"metadata": {
            "name": "workers-7d9f8c6b5-abcde", "labels": {"pod-template-hash": "7d9f8c6b5"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "workers-7d9f8c6b5", "uid": "u", "controller": true}]}}));
        let f = family(&rs_pod).expect("family");
        assert_eq!(f, Family::Deployment("workers".into()));
        assert!(f.matches_name("workers-5f6d7c8b9-zzzzz"));
        assert!(!f.matches_name("workers-api-5f6d7c8b9-zzzzz"));
        assert!(!f.matches_name("workers-x"));

        let sts_pod = pod(json!({"metadata": {"name": "web-2",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                "name": "web", "uid": "u", "controller": true}]}}));
        let f = family(&sts_pod).expect("family");
        assert!(f.matches_name("web-0") && f.matches_name("web-17"));
        assert!(!f.matches_name("web-a") && !f.matches_name("webx-1") && !f.matches_name("web-"));

        let bare = pod(json!({"metadata": {"name": "solo"}}));
        assert_eq!(family(&bare), None);
    }
}
