//! Sessions follow pods that workload controllers replace: on the emulator its simulated
//! controllers, on the real lane (`E2E_BACKEND=real`) kube-controller-manager's Deployment,
//! ReplicaSet and StatefulSet controllers, kube-scheduler and kwok. Nothing here sets pod
//! state by hand except through the API a kubelet would use (the status subresource).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::harness::{Cluster, NS, Operator, OperatorConfig, Stores, eventually, is_ready};

const APP: &str = "worker";

fn template() -> Value {
    json!({
        "metadata": {"labels": {"app": APP}},
        "spec": {"terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "worker", "image": "worker:1"}]}
    })
}

async fn create_deployment(cluster: &Cluster, name: &str, replicas: i32) -> Api<Deployment> {
    let deploys: Api<Deployment> = Api::namespaced(cluster.client.clone(), NS);
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": APP}},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": template(),
        }
    }))
    .expect("deployment");
    deploys
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
    deploys
}

/// Live pods (not terminating) of the app, by name.
async fn live_pods(cluster: &Cluster) -> BTreeMap<String, Pod> {
    cluster
        .pods()
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| (p.name_any(), p))
        .collect()
}

/// The rollout is complete and only its `replicas` pods remain, all Ready.
async fn wait_rolled_out(cluster: &Cluster, deploys: &Api<Deployment>, name: &str, replicas: i32) {
    eventually(
        Duration::from_secs(120),
        &format!("deployment {name} rolled out with {replicas} Ready pods"),
        || async {
            let d = deploys.get(name).await.ok()?;
            let status = d.status?;
            let done = status.observed_generation? >= d.metadata.generation?
                && status.updated_replicas.unwrap_or(0) == replicas
                && status.replicas.unwrap_or(0) == replicas
                && status.available_replicas.unwrap_or(0) == replicas;
            let all = cluster
                .pods()
                .list(&ListParams::default().labels(&format!("app={APP}")))
                .await
                .ok()?;
            let settled = all.items.len() == replicas as usize && all.items.iter().all(is_ready);
            (done && settled).then_some(())
        },
    )
    .await;
}

fn policy(extra: Value) -> Value {
    let mut spec = json!({
        "selector": {"matchLabels": {"app": APP}},
        "migration": {"replacementWait": "20s"},
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    spec
}

fn restart_patch() -> Value {
    json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": chrono::Utc::now().to_rfc3339()
    }}}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_restart_moves_every_session_to_the_new_replicasets_pods() {
    let cluster = Cluster::start_with_workloads().await;
    let stores = Stores::new().await;
    let deploys = create_deployment(&cluster, "workers", 3).await;
    wait_rolled_out(&cluster, &deploys, "workers", 3).await;
    let old: Vec<String> = live_pods(&cluster).await.into_keys().collect();
    let seeded = stores.seed(&old, 100).await;
    cluster.apply_policy("workers", policy(json!({}))).await;
    let mut operator = Operator::start(&cluster, &stores, OperatorConfig::default()).await;
    operator.wait_leader(Duration::from_secs(30)).await;

    // What `kubectl rollout restart` does.
    deploys
        .patch(
            "workers",
            &PatchParams::default(),
            &Patch::Strategic(restart_patch()),
        )
        .await
        .expect("restart");
    wait_rolled_out(&cluster, &deploys, "workers", 3).await;
    let new: Vec<String> = live_pods(&cluster).await.into_keys().collect();
    assert!(new.iter().all(|p| !old.contains(p)), "{old:?} -> {new:?}");

    let counts = eventually(
        Duration::from_secs(60),
        "every session on a new pod",
        || async {
            let counts = stores.counts().await;
            counts.keys().all(|w| new.contains(w)).then_some(counts)
        },
    )
    .await;
    assert_eq!(
        counts.values().sum::<u64>(),
        seeded,
        "nothing lost: {counts:?}"
    );
    let deletes = operator
        .mutations()
        .into_iter()
        .filter(|m| m["mutation"] == "delete_by_worker")
        .count();
    assert_eq!(
        deletes,
        0,
        "a rollout deletes nothing: {:?}",
        operator.mutations()
    );
    assert_eq!(operator.terminate().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_down_removes_the_pods_with_the_fewest_sessions() {
    let cluster = Cluster::start_with_workloads().await;
    let stores = Stores::new().await;
    let deploys = create_deployment(&cluster, "workers", 3).await;
    wait_rolled_out(&cluster, &deploys, "workers", 3).await;
    let pods: Vec<String> = live_pods(&cluster).await.into_keys().collect();
    // The fullest pod is neither the oldest nor the first by name: only the deletion cost
    // makes the ReplicaSet controller keep it.
    let loads = [
        (pods[0].clone(), 5usize),
        (pods[1].clone(), 40),
        (pods[2].clone(), 0),
    ];
    for (pod, n) in &loads {
        stores.seed(std::slice::from_ref(pod), *n).await;
    }
    cluster
        .apply_policy(
            "workers",
            policy(json!({"podDeletionCost": true,
                          "migration": {"replacementWait": "1s", "onTerminate": "Delete"}})),
        )
        .await;
    let mut operator = Operator::start(&cluster, &stores, OperatorConfig::default()).await;
    let cost = |pod: String| {
        let api = cluster.pods();
        async move {
            let pod = api.get(&pod).await.ok()?;
            pod.metadata
                .annotations?
                .get("controller.kubernetes.io/pod-deletion-cost")?
                .parse::<i64>()
                .ok()
        }
    };
    eventually(Duration::from_secs(30), "costs annotated", || async {
        for (pod, n) in &loads {
            if cost(pod.clone()).await? != *n as i64 {
                return None;
            }
        }
        Some(())
    })
    .await;

    deploys
        .patch(
            "workers",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .expect("scale");
    wait_rolled_out(&cluster, &deploys, "workers", 1).await;
    let left: Vec<String> = live_pods(&cluster).await.into_keys().collect();
    assert_eq!(left, vec![pods[1].clone()], "the fullest pod stays");
    let counts = eventually(
        Duration::from_secs(30),
        "the departed pods' sessions deleted",
        || async {
            let counts = stores.counts().await;
            (counts.len() == 1).then_some(counts)
        },
    )
    .await;
    assert_eq!(counts.get(&pods[1]), Some(&40), "{counts:?}");
    operator.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn statefulset_update_keeps_the_sessions_of_pods_recreated_under_their_names() {
    let cluster = Cluster::start_with_workloads().await;
    let stores = Stores::new().await;
    let sets: Api<StatefulSet> = Api::namespaced(cluster.client.clone(), NS);
    let sts: StatefulSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "web"},
        "spec": {"replicas": 3, "serviceName": "web",
                 "selector": {"matchLabels": {"app": APP}}, "template": template()}
    }))
    .expect("statefulset");
    sets.create(&PostParams::default(), &sts)
        .await
        .expect("create");
    let ready = |want_revision: Option<String>| {
        let sets = sets.clone();
        async move {
            let status = sets.get("web").await.ok()?.status?;
            let revision = status.update_revision.clone()?;
            let done = status.ready_replicas == Some(3)
                && status.updated_replicas == Some(3)
                && status.current_revision.as_deref() == Some(revision.as_str())
                && want_revision.as_ref().is_none_or(|w| w != &revision);
            done.then_some(revision)
        }
    };
    let first = eventually(Duration::from_secs(120), "web Ready", || ready(None)).await;
    let pods: Vec<String> = (0..3).map(|i| format!("web-{i}")).collect();
    let uids: BTreeMap<String, String> = live_pods(&cluster)
        .await
        .into_iter()
        .map(|(n, p)| (n, p.uid().unwrap_or_default()))
        .collect();
    let seeded = stores.seed(&pods, 30).await;
    cluster
        .apply_policy(
            "web",
            policy(json!({"migration": {"replacementWait": "60s"}})),
        )
        .await;
    let mut operator = Operator::start(&cluster, &stores, OperatorConfig::default()).await;
    operator.wait_leader(Duration::from_secs(30)).await;

    sets.patch(
        "web",
        &PatchParams::default(),
        &Patch::Strategic(restart_patch()),
    )
    .await
    .expect("update");
    eventually(Duration::from_secs(180), "web updated", || {
        ready(Some(first.clone()))
    })
    .await;
    let after = live_pods(&cluster).await;
    for pod in &pods {
        let uid = after.get(pod).and_then(kube::ResourceExt::uid);
        assert!(
            uid.is_some() && uid != uids.get(pod).cloned(),
            "{pod} was recreated"
        );
    }
    let counts = stores.counts().await;
    assert_eq!(counts.values().sum::<u64>(), seeded, "{counts:?}");
    for pod in &pods {
        assert_eq!(
            counts.get(pod),
            Some(&30),
            "{pod} kept its sessions: {counts:?}"
        );
    }
    assert!(
        operator.mutations().is_empty(),
        "no mutation: {:?}",
        operator.mutations()
    );
    operator.terminate().await;
}

/// Turns a pod NotReady as its kubelet would when the readiness probe fails. On the real lane
/// kwok leaves a pod's status to whoever writes it, so the test writes Ready=False through the
/// status subresource; the emulator's kubelet would mark a Running pod Ready again at once (its
/// probe "passes"), so there its hook holds the pod NotReady.
async fn fail_readiness(cluster: &Cluster, pod: &str) {
    if !cluster.is_real() {
        cluster
            .emulator()
            .control()
            .flap_readiness(NS, pod, Duration::from_secs(3600))
            .expect("not ready");
        return;
    }
    let not_ready = json!({"status": {"conditions": [
        {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
        {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady"}]}});
    cluster
        .pods()
        .patch_status(pod, &PatchParams::default(), &Patch::Strategic(not_ready))
        .await
        .expect("not ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_pod_keeps_its_sessions_while_not_ready_and_hands_them_to_its_replacement() {
    let cluster = Cluster::start_with_workloads().await;
    let stores = Stores::new().await;
    let deploys = create_deployment(&cluster, "workers", 2).await;
    wait_rolled_out(&cluster, &deploys, "workers", 2).await;
    let pods: Vec<String> = live_pods(&cluster).await.into_keys().collect();
    let seeded = stores.seed(&pods, 40).await;
    cluster.apply_policy("workers", policy(json!({}))).await;
    let mut operator = Operator::start(&cluster, &stores, OperatorConfig::default()).await;
    operator.wait_leader(Duration::from_secs(30)).await;
    let ready_in_status = || async {
        cluster
            .policies()
            .get("workers")
            .await
            .ok()?
            .status?
            .workers
            .map(|w| w.ready)
    };
    eventually(
        Duration::from_secs(30),
        "2 Ready workers in status",
        || async { (ready_in_status().await? == 2).then_some(()) },
    )
    .await;

    // The container fails its readiness probe: the kubelet writes Ready=False through the
    // status subresource. The operator sees one Ready worker, and moves nothing.
    fail_readiness(&cluster, &pods[0]).await;
    eventually(
        Duration::from_secs(30),
        "1 Ready worker in status",
        || async { (ready_in_status().await? == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        stores.counts().await.get(&pods[0]),
        Some(&40),
        "a NotReady pod keeps its sessions"
    );

    // Then it dies for good (deleted with grace 0); its ReplicaSet replaces it.
    cluster
        .pods()
        .delete(
            &pods[0],
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .expect("delete");
    wait_rolled_out(&cluster, &deploys, "workers", 2).await;
    let now: Vec<String> = live_pods(&cluster).await.into_keys().collect();
    let replacement = now
        .iter()
        .find(|p| **p != pods[1])
        .expect("a replacement")
        .clone();
    eventually(
        Duration::from_secs(60),
        "the dead pod's sessions moved",
        || async {
            let counts = stores.counts().await;
            (counts.get(&replacement) == Some(&40) && !counts.contains_key(&pods[0])).then_some(())
        },
    )
    .await;
    let counts = stores.counts().await;
    assert_eq!(counts.values().sum::<u64>(), seeded, "{counts:?}");
    assert_eq!(counts.get(&pods[1]), Some(&40), "{counts:?}");
    operator.terminate().await;
}
