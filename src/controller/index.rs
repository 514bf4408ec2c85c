//! The policies as the controller needs them, parsed once per generation.
//!
//! A spec is checked and parsed ([`ValidPolicy::new`]: the selector, the durations) each time
//! something needs it — the pass of the policy itself, every other policy's pass (ownership of
//! overlapping pods, the worker ids of all policies), and the pod-event mapper (which policies
//! select a pod). With many policies and pods that was the same parse thousands of times per
//! second. [`PolicyIndex`] keeps the result per (uid, generation): a spec change bumps
//! `metadata.generation`, so an entry is never stale; entries of versions no longer watched are
//! dropped at each [`PolicyIndex::snapshot`].
//!
//! [`Policies`] is one pass's view: every watched policy, parsed, grouped by namespace, so that
//! the pass scans the watched pods once (see `pass::observe`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};

use super::GuardedPolicy;
use crate::policy::overlap::Claimant;
use crate::policy::{InvalidSpec, SessionPolicy, ValidPolicy};

/// A spec, checked and parsed, or why it cannot be acted on.
pub(super) type Parsed = Result<Arc<ValidPolicy>, InvalidSpec>;

/// One version of one policy: its uid and generation. Objects without a generation (an API
/// server that does not track it) are keyed by their resourceVersion instead.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Version {
    uid: String,
    generation: Option<i64>,
    resource_version: Option<String>,
}

impl Version {
    fn of(policy: &SessionPolicy) -> Self {
        let meta = policy.meta();
        Self {
            uid: meta.uid.clone().unwrap_or_else(|| {
                format!(
                    "{}/{}",
                    policy.namespace().unwrap_or_default(),
                    policy.name_any()
                )
            }),
            generation: meta.generation,
            resource_version: meta
                .generation
                .is_none()
                .then(|| meta.resource_version.clone())
                .flatten(),
        }
    }
}

/// Parsed specs per policy version, shared by every pass and the pod-event mapper.
#[derive(Debug, Default)]
pub(super) struct PolicyIndex {
    parsed: Mutex<HashMap<Version, Parsed>>,
}

impl PolicyIndex {
    /// The parsed spec of `policy`, parsed now only if this version was not parsed before.
    pub(super) fn parse(&self, policy: &SessionPolicy) -> Parsed {
        let version = Version::of(policy);
        if let Some(parsed) = self.lock().get(&version) {
            return parsed.clone();
        }
        // Parsed outside the lock: concurrent passes may parse the same new version twice, and
        // agree.
        let parsed = ValidPolicy::new(&policy.spec).map(Arc::new);
        self.lock().insert(version, parsed.clone());
        parsed
    }

    /// Every policy in `objects`, parsed (from the index where possible); forgets the versions
    /// no longer among them.
    pub(super) fn snapshot(&self, objects: &[Arc<GuardedPolicy>]) -> Policies {
        let mut by_namespace: HashMap<Option<String>, Vec<Indexed>> = HashMap::new();
        let mut live = HashSet::new();
        for object in objects {
            let Ok(policy) = object.0.as_ref() else {
                continue;
            };
            live.insert(Version::of(policy));
            let Ok(valid) = self.parse(policy) else {
                continue;
            };
            by_namespace
                .entry(policy.namespace())
                .or_default()
                .push(Indexed {
                    name: policy.name_any(),
                    created: policy.meta().creation_timestamp.as_ref().map(|t| t.0),
                    deleting: policy.meta().deletion_timestamp.is_some(),
                    valid,
                });
        }
        self.lock().retain(|version, _| live.contains(version));
        Policies { by_namespace }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Version, Parsed>> {
        self.parsed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A valid policy as a pass sees the others.
#[derive(Debug, Clone)]
pub(super) struct Indexed {
    pub name: String,
    pub created: Option<Timestamp>,
    pub deleting: bool,
    pub valid: Arc<ValidPolicy>,
}

impl Indexed {
    /// The policy as the ownership rule sees it.
    pub(super) fn claimant(&self) -> Claimant {
        Claimant {
            name: self.name.clone(),
            created: self.created,
            policy: self.valid.as_ref().clone(),
        }
    }
}

/// The valid policies of every watched scope, by namespace.
#[derive(Debug, Default)]
pub(super) struct Policies {
    by_namespace: HashMap<Option<String>, Vec<Indexed>>,
}

impl Policies {
    /// The valid policies of a namespace (deleted ones included).
    pub(super) fn in_namespace(&self, namespace: &Option<String>) -> &[Indexed] {
        self.by_namespace
            .get(namespace)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(uid: &str, generation: i64, app: &str, idle_ttl: &str) -> Arc<GuardedPolicy> {
        let value = json!({
            "apiVersion": "sessions.blockyard.io/v1alpha1", "kind": "SessionPolicy",
            "metadata": {"name": uid, "namespace": "apps", "uid": uid, "generation": generation},
            "spec": {"selector": {"matchLabels": {"app": app}}, "idleTTL": idle_ttl},
        });
        Arc::new(serde_json::from_value(value).expect("policy"))
    }

    fn spec_of(object: &GuardedPolicy) -> &SessionPolicy {
        object.0.as_ref().expect("deserialized")
    }

    #[test]
    fn a_version_is_parsed_once_and_a_new_generation_again() {
        let index = PolicyIndex::default();
        let a1 = policy("a", 1, "w", "30m");
        let first = index.parse(spec_of(&a1)).expect("valid");
        let again = index.parse(spec_of(&a1)).expect("valid");
        assert!(
            Arc::ptr_eq(&first, &again),
            "the same version is not parsed twice"
        );
        // The spec changed (new generation): parsed afresh, and now invalid.
        let a2 = policy("a", 2, "w", "1s");
        let invalid = index
            .parse(spec_of(&a2))
            .expect_err("idleTTL below the minimum");
        assert!(invalid.to_string().contains("spec.idleTTL"), "{invalid}");
    }

    #[test]
    fn a_snapshot_groups_valid_policies_and_forgets_old_versions() {
        let index = PolicyIndex::default();
        let (a1, a2, b) = (
            policy("a", 1, "w", "30m"),
            policy("a", 2, "w", "30m"),
            policy("b", 1, "v", "1s"),
        );
        index.parse(spec_of(&a1)).expect("valid");
        let policies = index.snapshot(&[a2, b]);
        let names: Vec<&str> = policies
            .in_namespace(&Some("apps".into()))
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["a"], "b is invalid");
        assert!(policies.in_namespace(&Some("other".into())).is_empty());
        assert_eq!(index.len(), 2, "a@1 forgotten; a@2 and b (invalid) kept");
    }
}
