//! The emulated cluster as the demo and the benchmarks use it.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store as Reader};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use kube_emulator::Emulator;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Installs the SessionPolicy CRD in an emulated cluster and creates `namespace`.
pub(crate) fn prepare(emulator: &Emulator, namespace: &str) -> anyhow::Result<()> {
    let control = emulator.control();
    control
        .load_yaml(&crate::policy::crd_yaml())
        .map_err(|e| anyhow::anyhow!("installing the CRD: {e}"))?;
    control
        .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}))
        .map_err(|e| anyhow::anyhow!("creating namespace {namespace}: {e}"))?;
    Ok(())
}

/// A cache of the pods of `namespace`, kept until `shutdown`.
pub(crate) fn pod_reader(
    client: &Client,
    namespace: &str,
    shutdown: CancellationToken,
) -> Reader<Pod> {
    let (reader, writer) = reflector::store();
    let stream = watcher(
        Api::<Pod>::namespaced(client.clone(), namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects();
    tokio::spawn(async move {
        use futures::StreamExt;
        let mut stream = std::pin::pin!(stream.take_until(shutdown.cancelled_owned()));
        while stream.next().await.is_some() {}
    });
    reader
}

/// Names of the Ready, non-terminating worker pods.
pub(crate) fn ready_workers(pods: &Reader<Pod>) -> Vec<String> {
    let mut names: Vec<String> = pods
        .state()
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status.as_ref().is_some_and(|s| {
                s.phase.as_deref() == Some("Running")
                    && s.conditions
                        .as_ref()
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
        })
        .map(|p| p.name_any())
        .collect();
    names.sort();
    names
}

/// Starts a rolling update of Deployment `name`, as `kubectl rollout restart` does.
pub(crate) async fn restart(deployments: &Api<Deployment>, name: &str) -> anyhow::Result<()> {
    let restarted = json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": k8s_openapi::jiff::Timestamp::now().to_string()}}}}});
    deployments
        .patch(name, &PatchParams::default(), &Patch::Strategic(&restarted))
        .await?;
    Ok(())
}

/// Whether the Deployment's controller saw its latest spec and every replica is updated and
/// available, with no old one left.
pub(crate) fn rollout_complete(d: &Deployment) -> bool {
    let (Some(spec), Some(status)) = (&d.spec, &d.status) else {
        return false;
    };
    let want = spec.replicas.unwrap_or(1);
    status.observed_generation >= d.metadata.generation
        && status.updated_replicas == Some(want)
        && status.available_replicas == Some(want)
        && status.replicas == Some(want)
}
