//! The `SessionPolicy` custom resource: its types, the CRD, and validation of what the schema
//! cannot express.

pub mod duration;
mod types;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::CustomResourceExt;
use kube::core::{Selector, SelectorExt};

pub use types::{
    IdleSweepRecord, MigrationCounters, MigrationSpec, OnReplace, OnTerminate, SessionPolicy,
    SessionPolicySpec, SessionPolicyStatus, WorkerCounts, WorkerIdSource, WorkerIdSpec,
};

/// The CRD as YAML, as `session-operator crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> String {
    let crd = SessionPolicy::crd();
    // Serializing a generated CRD cannot fail: it is plain data.
    serde_yaml_ng::to_string(&crd).unwrap_or_default()
}

/// A policy whose spec was checked and parsed: durations as [`Duration`]s, the selector as a
/// matcher.
#[derive(Debug, Clone)]
pub struct ValidPolicy {
    pub selector: Selector,
    pub worker_id: WorkerIdSpec,
    /// `None` when the idle sweep is disabled (`idleTTL: 0s`).
    pub idle_ttl: Option<Duration>,
    pub idle_sweep_interval: Duration,
    pub on_replace: OnReplace,
    pub on_terminate: OnTerminate,
    pub replacement_wait: Duration,
    pub paused: bool,
    pub pod_deletion_cost: bool,
}

impl ValidPolicy {
    /// Checks a spec; the error names the field and what is wrong with it (it becomes the
    /// message of a `Ready=False` condition with reason `InvalidSpec`).
    pub fn new(spec: &SessionPolicySpec) -> Result<Self, String> {
        let has_labels = spec
            .selector
            .match_labels
            .as_ref()
            .is_some_and(|m| !m.is_empty());
        let has_exprs = spec
            .selector
            .match_expressions
            .as_ref()
            .is_some_and(|e| !e.is_empty());
        if !has_labels && !has_exprs {
            return Err(
                "spec.selector must not be empty: it would select every pod in the namespace"
                    .into(),
            );
        }
        let selector =
            Selector::try_from(spec.selector.clone()).map_err(|e| format!("spec.selector: {e}"))?;
        let needs_key = matches!(
            spec.worker_id.from,
            WorkerIdSource::Label | WorkerIdSource::Annotation
        );
        if needs_key && spec.worker_id.key.as_deref().is_none_or(str::is_empty) {
            return Err(
                "spec.workerId.key is required when workerId.from is Label or Annotation".into(),
            );
        }
        let field = |name: &str, text: &str| {
            duration::parse(text).map_err(|e| format!("spec.{name}: invalid duration {e}"))
        };
        let idle_ttl = field("idleTTL", &spec.idle_ttl)?;
        let idle_sweep_interval = field("idleSweepInterval", &spec.idle_sweep_interval)?;
        if idle_sweep_interval.is_zero() {
            return Err("spec.idleSweepInterval must be greater than zero".into());
        }
        let replacement_wait = field(
            "migration.replacementWait",
            &spec.migration.replacement_wait,
        )?;
        Ok(Self {
            selector,
            worker_id: spec.worker_id.clone(),
            idle_ttl: (!idle_ttl.is_zero()).then_some(idle_ttl),
            idle_sweep_interval,
            on_replace: spec.migration.on_replace,
            on_terminate: spec.migration.on_terminate,
            replacement_wait,
            paused: spec.paused,
            pod_deletion_cost: spec.pod_deletion_cost,
        })
    }

    /// Whether the policy selects this pod (same namespace is the caller's business).
    pub fn selects(&self, pod: &Pod) -> bool {
        let empty = Default::default();
        self.selector
            .matches(pod.metadata.labels.as_ref().unwrap_or(&empty))
    }

    /// The worker id proxies use for this pod, or `None` when the pod lacks the label or
    /// annotation that holds it.
    pub fn worker_id(&self, pod: &Pod) -> Option<String> {
        let meta = &pod.metadata;
        let from_map = |map: Option<&std::collections::BTreeMap<String, String>>| {
            let key = self.worker_id.key.as_deref()?;
            map?.get(key).filter(|v| !v.is_empty()).cloned()
        };
        match self.worker_id.from {
            WorkerIdSource::PodName => meta.name.clone(),
            WorkerIdSource::PodUid => meta.uid.clone(),
            WorkerIdSource::Label => from_map(meta.labels.as_ref()),
            WorkerIdSource::Annotation => from_map(meta.annotations.as_ref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: serde_json::Value) -> SessionPolicySpec {
        serde_json::from_value(value).expect("spec deserializes")
    }

    #[test]
    fn defaults_fill_an_minimal_spec() {
        let policy = ValidPolicy::new(&spec(json!({"selector": {"matchLabels": {"app": "w"}}})))
            .expect("valid");
        assert_eq!(policy.worker_id.from, WorkerIdSource::PodName);
        assert_eq!(policy.idle_ttl, None);
        assert_eq!(policy.idle_sweep_interval, Duration::from_secs(60));
        assert_eq!(policy.on_replace, OnReplace::Reroute);
        assert_eq!(policy.on_terminate, OnTerminate::Delete);
        assert_eq!(policy.replacement_wait, Duration::from_secs(120));
        assert!(!policy.paused && !policy.pod_deletion_cost);
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let cases = [
            (json!({"selector": {}}), "spec.selector"),
            (
                json!({"selector": {"matchLabels": {"a": "b"}}, "workerId": {"from": "Label"}}),
                "spec.workerId.key",
            ),
            (
                json!({"selector": {"matchLabels": {"a": "b"}}, "idleTTL": "5 minutes"}),
                "spec.idleTTL",
            ),
            (
                json!({"selector": {"matchLabels": {"a": "b"}}, "idleSweepInterval": "0s"}),
                "spec.idleSweepInterval",
            ),
            (
                json!({"selector": {"matchLabels": {"a": "b"}}, "migration": {"replacementWait": "2d"}}),
                "spec.migration.replacementWait",
            ),
            (
                json!({"selector": {"matchExpressions": [{"key": "a", "operator": "Bogus"}]}}),
                "spec.selector",
            ),
        ];
        for (value, field) in cases {
            let err = ValidPolicy::new(&spec(value.clone())).expect_err(&value.to_string());
            assert!(err.starts_with(field), "{err} should name {field}");
        }
    }

    #[test]
    fn worker_ids_come_from_the_configured_source() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "w-1", "uid": "u-1", "labels": {"app": "w", "wid": "L"},
                         "annotations": {"wid": "A"}}
        }))
        .expect("pod");
        let id = |from: &str| {
            let spec = spec(json!({"selector": {"matchLabels": {"app": "w"}},
                                    "workerId": {"from": from, "key": "wid"}}));
            ValidPolicy::new(&spec).expect("valid").worker_id(&pod)
        };
        assert_eq!(id("PodName").as_deref(), Some("w-1"));
        assert_eq!(id("PodUID").as_deref(), Some("u-1"));
        assert_eq!(id("Label").as_deref(), Some("L"));
        assert_eq!(id("Annotation").as_deref(), Some("A"));
        let spec = spec(json!({"selector": {"matchLabels": {"app": "w"}},
                                "workerId": {"from": "Label", "key": "missing"}}));
        assert_eq!(
            ValidPolicy::new(&spec).expect("valid").worker_id(&pod),
            None
        );
    }

    #[test]
    fn crd_file_matches_the_rust_types() {
        let file = include_str!("../../crds/sessionpolicies.sessions.blockyard.io.yaml");
        assert!(
            file == crd_yaml(),
            "crds/ is stale: run `cargo run -- crd > crds/sessionpolicies.sessions.blockyard.io.yaml` \
             and copy it to charts/session-operator/files/"
        );
    }

    #[test]
    fn crd_has_the_public_names_and_validation() {
        let yaml = crd_yaml();
        for needle in [
            "name: sessionpolicies.sessions.blockyard.io",
            "shortNames:\n    - sp",
            "idleTTL:",
            "idleSweepInterval:",
            "replacementWait:",
            "podDeletionCost:",
            "x-kubernetes-validations:",
            "- Reroute\n",
            "- PodUID\n",
            "subresources:\n      status: {}",
        ] {
            assert!(yaml.contains(needle), "CRD lacks {needle:?}:\n{yaml}");
        }
    }
}
