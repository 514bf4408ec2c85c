//! The `SessionPolicy` custom resource: its types, the CRD, and validation of what the schema
//! cannot express.

pub mod duration;
pub mod overlap;
pub mod selector;
// Public API, re-exported below. kube's `KubeSchema` derive copies each struct, `pub` included,
// into a function body for its schema, and `unreachable_pub` flags the copy at the original's
// line (an `allow` on the struct is not copied along).
#[allow(unreachable_pub)]
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

/// Shortest `idleSweepInterval` (and non-zero `replacementWait`): a shorter one only makes the
/// operator spin (a 1ns interval meant 163 passes and 325 Postgres commits per second).
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest non-zero `idleTTL`: proxies write a session's last access only now and then (touch
/// coalescing), so a shorter TTL would sweep sessions in use.
pub const MIN_IDLE_TTL: Duration = Duration::from_secs(60);

/// Why a spec cannot be acted on. Its text names the field and what is wrong with it: it is the
/// message of the policy's `Ready=False, InvalidSpec` condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

impl From<String> for InvalidSpec {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for InvalidSpec {
    fn from(message: &str) -> Self {
        Self(message.to_string())
    }
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
    pub fn new(spec: &SessionPolicySpec) -> Result<Self, InvalidSpec> {
        selector::validate(&spec.selector)?;
        let selector = Selector::try_from(spec.selector.clone())
            .map_err(|e| InvalidSpec(format!("spec.selector: {e}")))?;
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
            duration::parse(text)
                .map_err(|e| InvalidSpec(format!("spec.{name}: invalid duration {e}")))
        };
        let idle_ttl = field("idleTTL", &spec.idle_ttl)?;
        if !idle_ttl.is_zero() && idle_ttl < MIN_IDLE_TTL {
            return Err(InvalidSpec(format!(
                "spec.idleTTL: {:?} must be 0s (no idle sweep) or at least {}",
                spec.idle_ttl,
                duration::format(MIN_IDLE_TTL)
            )));
        }
        let idle_sweep_interval = field("idleSweepInterval", &spec.idle_sweep_interval)?;
        if idle_sweep_interval < MIN_INTERVAL {
            return Err(InvalidSpec(format!(
                "spec.idleSweepInterval: {:?} must be at least {}",
                spec.idle_sweep_interval,
                duration::format(MIN_INTERVAL)
            )));
        }
        let replacement_wait = field(
            "migration.replacementWait",
            &spec.migration.replacement_wait,
        )?;
        if !replacement_wait.is_zero() && replacement_wait < MIN_INTERVAL {
            return Err(InvalidSpec(format!(
                "spec.migration.replacementWait: {:?} must be 0s (no wait) or at least {}",
                spec.migration.replacement_wait,
                duration::format(MIN_INTERVAL)
            )));
        }
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
            (
                json!({"selector": {"matchLabels": {"a": "b"}}, "idleSweepInterval": "1ns"}),
                "spec.idleSweepInterval: \"1ns\" must be at least 1s",
            ),
            (
                json!({"selector": {"matchLabels": {"a": "b"}}, "idleSweepInterval": "999ms"}),
                "spec.idleSweepInterval",
            ),
            (
                json!({"selector": {"matchLabels": {"a": "b"}}, "idleTTL": "30s"}),
                "spec.idleTTL: \"30s\" must be 0s (no idle sweep) or at least 1m",
            ),
            (
                json!({"selector": {"matchLabels": {"a": "b"}}, "migration": {"replacementWait": "10ms"}}),
                "spec.migration.replacementWait: \"10ms\" must be 0s (no wait) or at least 1s",
            ),
            (
                json!({"selector": {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]}}),
                "spec.selector.matchExpressions[0].values: Forbidden",
            ),
            (
                json!({"selector": {"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}}),
                "spec.selector must name what it selects",
            ),
        ];
        for (value, field) in cases {
            let err = ValidPolicy::new(&spec(value.clone())).expect_err(&value.to_string());
            assert!(err.0.starts_with(field), "{err} should name {field}");
        }
    }

    #[test]
    fn zero_still_disables_and_floors_are_inclusive() {
        let policy = ValidPolicy::new(&spec(json!({"selector": {"matchLabels": {"a": "b"}},
            "idleTTL": "0s", "idleSweepInterval": "1s", "migration": {"replacementWait": "0s"}})))
        .expect("valid");
        assert_eq!(policy.idle_ttl, None);
        assert_eq!(policy.idle_sweep_interval, MIN_INTERVAL);
        assert_eq!(policy.replacement_wait, Duration::ZERO);
        let policy = ValidPolicy::new(&spec(json!({"selector": {"matchLabels": {"a": "b"}},
            "idleTTL": "1m", "migration": {"replacementWait": "1s"}})))
        .expect("valid");
        assert_eq!(policy.idle_ttl, Some(MIN_IDLE_TTL));
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
