//! The workload of the demo and the benchmarks: a Deployment of worker pods and the
//! SessionPolicy that selects them.

use k8s_openapi::api::apps::v1::Deployment;
use serde_json::{Value, json};

use crate::policy::SessionPolicy;

/// The name of the Deployment and of its SessionPolicy.
pub(crate) const WORKERS: &str = "workers";

/// `replicas` worker pods labelled `app: worker`, rolled out a quarter at a time with no pod
/// unavailable (a surge first, then the old pods depart), as a session-sticky app is.
pub(crate) fn workers_deployment(
    namespace: &str,
    replicas: u32,
    grace_seconds: u32,
) -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": WORKERS, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "worker"}},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": "worker"}},
                "spec": {"terminationGracePeriodSeconds": grace_seconds,
                         "containers": [{"name": "app", "image": "shiny-worker:1"}]},
            },
        },
    }))?)
}

/// The SessionPolicy selecting the workers, with the given `spec.migration`.
pub(crate) fn session_policy(
    namespace: &str,
    migration: Value,
    pod_deletion_cost: bool,
) -> anyhow::Result<SessionPolicy> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "sessions.blockyard.io/v1alpha1", "kind": "SessionPolicy",
        "metadata": {"name": WORKERS, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": "worker"}},
            "migration": migration,
            "podDeletionCost": pod_deletion_cost,
        },
    }))?)
}
