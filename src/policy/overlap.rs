//! Pods selected by more than one policy: each belongs to exactly one of them.
//!
//! Two policies acting on the same worker would both migrate its sessions (perhaps to different
//! targets) and sweep them with different TTLs. The rule, the same on every replica and every
//! pass: among the valid, non-deleted policies of the pod's namespace that select it, the pod
//! belongs to the **oldest** (`metadata.creationTimestamp`), ties broken by the **name**
//! (alphabetically first). The other policies leave the pod and its sessions alone and report
//! `Degraded`, reason `OverlappingSelector`, naming the owner.
//!
//! Oldest wins so that adding a policy never takes workers away from one that already manages
//! them.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

use super::ValidPolicy;

/// A valid policy of the namespace, as the ownership rule sees it.
#[derive(Debug, Clone)]
pub struct Claimant {
    pub name: String,
    pub created: Option<Timestamp>,
    pub policy: ValidPolicy,
}

impl Claimant {
    /// The ownership order: older first, then by name. A policy without a creation time (never
    /// the case for an object read from the API) sorts last.
    fn rank(&self) -> (bool, Option<Timestamp>, &str) {
        (self.created.is_none(), self.created, self.name.as_str())
    }

    /// Whether this policy takes precedence over `other` for a pod both select.
    pub fn outranks(&self, other: &Claimant) -> bool {
        self.rank() < other.rank()
    }
}

/// The policy of `others` that owns `pod` instead of `me`, if any: the highest-ranked among
/// those that select it and outrank `me`. `others` must not contain `me`.
pub fn owner_instead<'a>(me: &Claimant, others: &'a [Claimant], pod: &Pod) -> Option<&'a Claimant> {
    others
        .iter()
        .filter(|o| o.outranks(me) && o.policy.selects(pod))
        .min_by(|a, b| a.rank().cmp(&b.rank()))
}

/// The `Degraded` message of a policy that leaves `count` pods to other policies; `owners` are
/// the owning policies' names (at least one).
pub fn message(count: usize, owners: &[&str]) -> String {
    let named = match owners {
        [one] => format!("policy {one}"),
        [first, rest @ ..] => format!("policies {first} and {} other(s)", rest.len()),
        [] => "another policy".to_string(),
    };
    format!(
        "{count} selected pod(s) are also selected by {named}, which owns them (the oldest \
         policy owns a pod selected by several; ties go by name): this policy does not migrate, \
         sweep or annotate them"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claimant(name: &str, created: &str, labels: serde_json::Value) -> Claimant {
        let spec =
            serde_json::from_value(json!({"selector": {"matchLabels": labels}})).expect("spec");
        Claimant {
            name: name.into(),
            created: Some(created.parse().expect("time")),
            policy: ValidPolicy::new(&spec).expect("valid"),
        }
    }

    fn pod(labels: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "labels": labels}})).expect("pod")
    }

    #[test]
    fn the_oldest_policy_owns_then_the_first_name() {
        let t0 = "2026-01-01T00:00:00Z";
        let t1 = "2026-01-01T00:00:01Z";
        let old = claimant("zeta", t0, json!({"app": "w"}));
        let young = claimant("alpha", t1, json!({"app": "w"}));
        let twin = claimant("beta", t0, json!({"app": "w"}));
        let p = pod(json!({"app": "w"}));
        let all = [old.clone(), young.clone(), twin.clone()];
        let others = |me: &Claimant| -> Vec<Claimant> {
            all.iter().filter(|c| c.name != me.name).cloned().collect()
        };
        // beta and zeta are created in the same second: beta (first by name) owns.
        assert_eq!(
            owner_instead(&twin, &others(&twin), &p).map(|c| c.name.as_str()),
            None
        );
        assert_eq!(
            owner_instead(&old, &others(&old), &p).map(|c| c.name.as_str()),
            Some("beta")
        );
        assert_eq!(
            owner_instead(&young, &others(&young), &p).map(|c| c.name.as_str()),
            Some("beta")
        );
    }

    #[test]
    fn a_policy_that_does_not_select_the_pod_claims_nothing() {
        let old = claimant("old", "2026-01-01T00:00:00Z", json!({"app": "other"}));
        let young = claimant("young", "2026-01-02T00:00:00Z", json!({"app": "w"}));
        let p = pod(json!({"app": "w"}));
        assert!(owner_instead(&young, std::slice::from_ref(&old), &p).is_none());
    }

    #[test]
    fn message_names_the_owner() {
        assert!(
            message(3, &["pool-a"])
                .starts_with("3 selected pod(s) are also selected by policy pool-a")
        );
        assert!(message(3, &["a", "b", "c"]).contains("policies a and 2 other(s)"));
    }
}
