//! Per-policy gauges read from each SessionPolicy's status at scrape time.
//!
//! The status is what the leader last wrote; every replica's policy reflector holds it, so
//! every replica exports the same series (alerts and dashboards aggregate them with
//! `max by (policy_namespace, policy)`), and a standby's scrape shows the state it would take
//! over. Reading the status instead of keeping gauges next to the reconciler means the numbers
//! can never disagree with `kubectl get sp`, and a deleted policy's series vanish with it.
//!
//! Labels are `policy_namespace` and `policy`, not `namespace`: Prometheus' own `namespace`
//! target label (the operator's namespace) would otherwise clash and be renamed.

use std::fmt;
use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::policy::SessionPolicy;

/// What one policy's status says, in the shape of the exported series.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PolicySnapshot {
    pub namespace: String,
    pub name: String,
    /// (type, reason, status is `True`) of every condition whose status is `True` or `False`.
    pub conditions: Vec<(String, String, bool)>,
    pub sessions: Option<u64>,
    /// (ready, terminating) workers.
    pub workers: Option<(u32, u32)>,
}

impl PolicySnapshot {
    /// The snapshot of a policy as its status stands; `None` for a policy without a namespace.
    pub(crate) fn of(policy: &SessionPolicy) -> Option<Self> {
        let namespace = policy.metadata.namespace.clone()?;
        let name = policy.metadata.name.clone()?;
        let status = policy.status.as_ref();
        Some(Self {
            namespace,
            name,
            conditions: status
                .map(|s| {
                    s.conditions
                        .iter()
                        .filter_map(|c| match c.status.as_str() {
                            "True" => Some((c.type_.clone(), c.reason.clone(), true)),
                            "False" => Some((c.type_.clone(), c.reason.clone(), false)),
                            _ => None, // Unknown: neither 1 nor 0 would be true
                        })
                        .collect()
                })
                .unwrap_or_default(),
            sessions: status.and_then(|s| s.sessions),
            workers: status
                .and_then(|s| s.workers)
                .map(|w| (w.ready, w.terminating)),
        })
    }
}

type Source = Arc<dyn Fn() -> Vec<PolicySnapshot> + Send + Sync>;

/// Where the collector reads the policies from; set once the controller's reflectors exist.
/// Until then (and in processes without a controller) the families are exported empty.
#[derive(Clone, Default)]
pub(crate) struct PolicySource(Arc<RwLock<Option<Source>>>);

impl PolicySource {
    pub(crate) fn set(&self, source: impl Fn() -> Vec<PolicySnapshot> + Send + Sync + 'static) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(source));
    }

    fn snapshots(&self) -> Vec<PolicySnapshot> {
        let source = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        source.map(|f| f()).unwrap_or_default()
    }
}

impl fmt::Debug for PolicySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySource").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy_namespace: String,
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConditionLabels {
    policy_namespace: String,
    policy: String,
    r#type: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    policy_namespace: String,
    policy: String,
    state: &'static str,
}

/// Encodes `session_operator_policy_*` on every scrape.
#[derive(Debug)]
pub(super) struct PolicyCollector(pub PolicySource);

impl Collector for PolicyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let mut policies = self.0.snapshots();
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let labels = |p: &PolicySnapshot| PolicyLabels {
            policy_namespace: p.namespace.clone(),
            policy: p.name.clone(),
        };

        let mut family = encoder.encode_descriptor(
            "policy_condition",
            "Conditions of each SessionPolicy's status (1 = True, 0 = False), by type and reason.",
            None,
            MetricType::Gauge,
        )?;
        for p in &policies {
            for (type_, reason, status) in &p.conditions {
                let labels = ConditionLabels {
                    policy_namespace: p.namespace.clone(),
                    policy: p.name.clone(),
                    r#type: type_.clone(),
                    reason: reason.clone(),
                };
                ConstGauge::new(i64::from(*status)).encode(family.encode_family(&labels)?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "policy_sessions",
            "Live sessions held by each SessionPolicy's workers (status.sessions).",
            None,
            MetricType::Gauge,
        )?;
        for p in &policies {
            if let Some(sessions) = p.sessions {
                let value = i64::try_from(sessions).unwrap_or(i64::MAX);
                ConstGauge::new(value).encode(family.encode_family(&labels(p))?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "policy_workers",
            "Workers of each SessionPolicy by state, ready or terminating (status.workers).",
            None,
            MetricType::Gauge,
        )?;
        for p in &policies {
            if let Some((ready, terminating)) = p.workers {
                for (state, count) in [("ready", ready), ("terminating", terminating)] {
                    let labels = WorkerLabels {
                        policy_namespace: p.namespace.clone(),
                        policy: p.name.clone(),
                        state,
                    };
                    ConstGauge::new(i64::from(count)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{SessionPolicyStatus, WorkerCounts};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use prometheus_client::registry::Registry;

    fn condition(type_: &str, status: &str, reason: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time("2026-01-01T00:00:00Z".parse().expect("time")),
        }
    }

    fn policy(status: Option<SessionPolicyStatus>) -> SessionPolicy {
        let spec = serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"app": "w"}}
        }))
        .expect("spec");
        let mut p = SessionPolicy::new("shiny", spec);
        p.metadata.namespace = Some("apps".into());
        p.status = status;
        p
    }

    #[test]
    fn snapshot_reads_the_status() {
        let status = SessionPolicyStatus {
            conditions: vec![
                condition("Ready", "True", "Reconciled"),
                condition("Degraded", "False", "AsExpected"),
                condition("StoreAvailable", "Unknown", "Starting"),
            ],
            sessions: Some(7),
            workers: Some(WorkerCounts {
                ready: 2,
                terminating: 1,
            }),
            ..Default::default()
        };
        let snap = PolicySnapshot::of(&policy(Some(status))).expect("namespaced");
        assert_eq!(snap.namespace, "apps");
        assert_eq!(
            snap.conditions,
            vec![
                ("Ready".into(), "Reconciled".into(), true),
                ("Degraded".into(), "AsExpected".into(), false),
            ]
        );
        assert_eq!(snap.sessions, Some(7));
        assert_eq!(snap.workers, Some((2, 1)));
        let bare = PolicySnapshot::of(&policy(None)).expect("namespaced");
        assert!(bare.conditions.is_empty() && bare.sessions.is_none() && bare.workers.is_none());
    }

    #[test]
    fn collector_encodes_every_family() {
        let source = PolicySource::default();
        let mut registry = Registry::default();
        registry
            .sub_registry_with_prefix("session_operator")
            .register_collector(Box::new(PolicyCollector(source.clone())));
        let scrape = |registry: &Registry| {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, registry).expect("encode");
            out
        };
        // Before the controller sets a source the families are there, empty.
        let empty = scrape(&registry);
        assert!(empty.contains("# TYPE session_operator_policy_condition gauge"));
        assert!(!empty.contains("session_operator_policy_sessions{"));

        let snap = PolicySnapshot {
            namespace: "apps".into(),
            name: "shiny".into(),
            conditions: vec![("Ready".into(), "InvalidSpec".into(), false)],
            sessions: Some(3),
            workers: Some((2, 0)),
        };
        source.set(move || vec![snap.clone()]);
        let out = scrape(&registry);
        for line in [
            r#"session_operator_policy_condition{policy_namespace="apps",policy="shiny",type="Ready",reason="InvalidSpec"} 0"#,
            r#"session_operator_policy_sessions{policy_namespace="apps",policy="shiny"} 3"#,
            r#"session_operator_policy_workers{policy_namespace="apps",policy="shiny",state="ready"} 2"#,
            r#"session_operator_policy_workers{policy_namespace="apps",policy="shiny",state="terminating"} 0"#,
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing in\n{out}");
        }
    }
}
