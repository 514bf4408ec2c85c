//! Replacements created in the same second as the pod they replace (creationTimestamp has
//! one-second resolution): the operator orders pods by its watch and by ownership, and never
//! deletes what it could move.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::harness::{Cluster, NS, Operator, OperatorConfig, Stores, WorkerPod, eventually};

/// Sleeps until just after the next whole second, so that what follows happens within one
/// second of creation timestamps (the tie the test is about, not a way around it).
async fn start_of_a_second() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let into = Duration::from_nanos(u64::from(now.subsec_nanos()));
    tokio::time::sleep(Duration::from_secs(1) - into + Duration::from_millis(5)).await;
}

/// The second of a pod's creationTimestamp.
fn created(pod: &Pod) -> Option<i64> {
    pod.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
}

fn deletes(operator: &Operator) -> Vec<serde_json::Value> {
    operator
        .mutations()
        .into_iter()
        .filter(|m| m["mutation"] == "delete_by_worker")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replacement_created_in_the_same_second_receives_the_sessions() {
    let cluster = Cluster::start().await;
    let stores = Stores::new().await;
    cluster
        .apply_policy(
            "workers",
            json!({"selector": {"matchLabels": {"app": "worker"}},
                   "migration": {"onTerminate": "Delete", "replacementWait": "20s"}}),
        )
        .await;
    let mut operator = Operator::start(&cluster, &stores, OperatorConfig::default()).await;
    operator.wait_leader(Duration::from_secs(20)).await;

    // Three times, each within one second: create old-N and new-N, give old-N 50 sessions,
    // delete old-N with a 30 s grace period (a platform starting a new worker and retiring the
    // old one at once). Both are created before either is waited for: on the real lane a pod
    // is Ready only once kube-scheduler and kwok ran it.
    let mut seconds = Vec::new();
    for n in 1..=3 {
        start_of_a_second().await;
        let old = format!("old-{n}");
        let new = format!("new-{n}");
        let pods = cluster
            .ready_pods(&[
                WorkerPod::new(&old, "worker"),
                WorkerPod::new(&new, "worker"),
            ])
            .await;
        stores.seed(std::slice::from_ref(&old), 50).await;
        cluster
            .pods()
            .delete(
                &old,
                &DeleteParams {
                    grace_period_seconds: Some(30),
                    ..Default::default()
                },
            )
            .await
            .expect("delete old");
        seconds.push((created(&pods[0]), created(&pods[1])));
    }
    eprintln!("creation seconds (old, new): {seconds:?}");
    assert!(
        seconds.iter().any(|(old, new)| old == new),
        "at least one pair shares its creation second: {seconds:?}"
    );

    let counts: BTreeMap<String, u64> = eventually(
        Duration::from_secs(30),
        "every session on new-N",
        || async {
            let counts = stores.counts().await;
            (counts.keys().all(|w| w.starts_with("new-")) && counts.values().sum::<u64>() == 150)
                .then_some(counts)
        },
    )
    .await;
    assert_eq!(
        counts,
        (1..=3).map(|n| (format!("new-{n}"), 50)).collect(),
        "each old-N moved to its own new-N"
    );
    assert!(deletes(&operator).is_empty(), "{:?}", deletes(&operator));
    assert_eq!(operator.terminate().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_restart_right_after_ready_reroutes_every_departure() {
    let cluster = Cluster::start_with_controllers().await;
    let stores = Stores::new().await;
    cluster
        .apply_policy(
            "workers",
            json!({"selector": {"matchLabels": {"app": "worker"}},
                   "migration": {"onTerminate": "Delete", "replacementWait": "30s"}}),
        )
        .await;
    let mut operator = Operator::start(&cluster, &stores, OperatorConfig::default()).await;
    operator.wait_leader(Duration::from_secs(20)).await;

    // A 4-replica Deployment with the default strategy (25 % surge / 25 % unavailable), run by
    // the Deployment and ReplicaSet controllers (the emulator's, or kube-controller-manager's).
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "workers", "namespace": NS},
        "spec": {
            "replicas": 4,
            "selector": {"matchLabels": {"app": "worker"}},
            "template": {
                "metadata": {"labels": {"app": "worker"}},
                "spec": {"terminationGracePeriodSeconds": 1,
                         "containers": [{"name": "app", "image": "worker:1"}]},
            },
        },
    }))
    .expect("deployment");
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), NS);
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
    let first = eventually(Duration::from_secs(30), "4 Ready pods", || async {
        let ready = cluster.ready_workers().await;
        (ready.len() == 4).then_some(ready)
    })
    .await;
    let first: Vec<String> = first.into_iter().collect();
    stores.seed(&first, 50).await;

    // `kubectl rollout restart`, at once.
    let restarted = json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": k8s_openapi::jiff::Timestamp::now().to_string()}}}}});
    deployments
        .patch(
            "workers",
            &PatchParams::default(),
            &Patch::Strategic(&restarted),
        )
        .await
        .expect("restart");

    let counts = eventually(
        Duration::from_secs(60),
        "the rollout done and every session on a new pod",
        || async {
            let pods = cluster.pods().list(&Default::default()).await.ok()?;
            if pods.items.iter().any(|p| first.contains(&p.name_any())) {
                return None;
            }
            let ready = cluster.ready_workers().await;
            let counts = stores.counts().await;
            (ready.len() == 4
                && counts.keys().all(|w| ready.contains(w))
                && counts.values().sum::<u64>() == 200)
                .then_some(counts)
        },
    )
    .await;
    let reroutes: Vec<_> = operator
        .mutations()
        .into_iter()
        .filter(|m| m["mutation"] == "reroute_worker")
        .filter_map(|m| m["from"].as_str().map(String::from))
        .collect();
    for pod in &first {
        assert!(reroutes.contains(pod), "{pod} rerouted: {reroutes:?}");
    }
    assert!(deletes(&operator).is_empty(), "{:?}", deletes(&operator));
    eprintln!("after the rollout: {counts:?}");
    // Which departure went where, and any failed migration, so that a failure says why.
    let moves: Vec<String> = operator
        .mutations()
        .iter()
        .filter(|m| m["mutation"] == "reroute_worker")
        .map(|m| {
            format!(
                "{} -> {} ({}, {})",
                m["from"], m["to"], m["reason"], m["sessions"]
            )
        })
        .collect();
    let failures: Vec<String> = operator
        .logs_with_message("migration failed")
        .iter()
        .map(|l| format!("{}: {}", l["worker"], l["error"]))
        .collect();
    assert!(
        counts.len() == 4 && counts.values().all(|n| *n == 50),
        "one departure per new pod: {counts:?}\nreroutes: {moves:#?}\nfailed: {failures:#?}"
    );
    assert_eq!(operator.terminate().await, Some(0));
}
