//! The simulated cluster driven by kube-rs: deployments, replica sets, stateful sets,
//! scheduler, kubelet stages, garbage collection, test hooks and the request log.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::{Client, ResourceExt};
use kube_emulator::{Controllers, Crash, Emulator};
use serde_json::{Value, json};

async fn start_cluster(nodes: usize, ready_delay: Duration) -> (Emulator, Client) {
    let emulator = Emulator::builder()
        .controllers(Controllers::all())
        .nodes(nodes)
        .pod_ready_delay(ready_delay)
        .start()
        .await
        .expect("emulator starts");
    let client = emulator.client().expect("client");
    (emulator, client)
}

/// Polls `check` until it returns true, failing the test after a generous timeout.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn deployment(name: &str, replicas: i32, strategy: Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": strategy,
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "main", "image": "example/worker:1"}]
                }
            }
        }
    }))
    .expect("deployment")
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn is_live(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

fn hash_of(pod: &Pod) -> String {
    pod.labels()
        .get("pod-template-hash")
        .cloned()
        .unwrap_or_default()
}

async fn ready_pods(pods: &Api<Pod>, selector: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(selector))
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter(|p| is_live(p) && is_ready(p))
        .collect()
}

async fn wait_complete(deploys: &Api<Deployment>, name: &str, replicas: i32) {
    eventually(&format!("deployment {name} complete"), || async {
        let d = deploys.get(name).await.expect("get deployment");
        let generation = d.metadata.generation.unwrap_or(0);
        let status = d.status.unwrap_or_default();
        status.observed_generation.unwrap_or(0) >= generation
            && status.updated_replicas.unwrap_or(0) == replicas
            && status.replicas.unwrap_or(0) == replicas
            && status.available_replicas.unwrap_or(0) == replicas
    })
    .await;
}

#[tokio::test]
async fn deployment_gets_ready_pods_on_nodes() {
    let (emulator, client) = start_cluster(3, Duration::from_millis(50)).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let nodes: Api<Node> = Api::all(client.clone());
    let node_list = nodes.list(&ListParams::default()).await.expect("nodes");
    assert_eq!(node_list.items.len(), 3);
    assert!(node_list.items.iter().all(|n| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    }));

    deploys
        .create(
            &PostParams::default(),
            &deployment("web", 3, json!({"type": "RollingUpdate"})),
        )
        .await
        .expect("create");
    wait_complete(&deploys, "web", 3).await;
    let ready = ready_pods(&pods, "app=web").await;
    assert_eq!(ready.len(), 3);
    // Spread over the nodes by the scheduler, started by the kubelet.
    let mut used: Vec<String> = ready
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), 3, "one pod per node: {used:?}");
    for pod in &ready {
        let status = pod.status.as_ref().expect("status");
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert!(status.pod_ip.is_some() && status.start_time.is_some());
        assert!(status.conditions.as_ref().is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "PodScheduled" && c.status == "True")
        }));
    }

    let d = deploys.get("web").await.expect("get");
    assert_eq!(
        d.annotations()
            .get("deployment.kubernetes.io/revision")
            .map(String::as_str),
        Some("1")
    );
    let conditions = d.status.and_then(|s| s.conditions).unwrap_or_default();
    let reason = |ty: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == ty)
            .map(|c| (c.status.clone(), c.reason.clone().unwrap_or_default()))
    };
    assert_eq!(
        reason("Available"),
        Some(("True".into(), "MinimumReplicasAvailable".into()))
    );
    assert_eq!(
        reason("Progressing"),
        Some(("True".into(), "NewReplicaSetAvailable".into()))
    );

    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let rs_list = rss.list(&ListParams::default()).await.expect("rs");
    assert_eq!(rs_list.items.len(), 1);
    let rs = &rs_list.items[0];
    let hash = rs.labels().get("pod-template-hash").cloned().expect("hash");
    assert_eq!(rs.name_any(), format!("web-{hash}"));
    assert_eq!(
        rs.owner_references()[0].uid,
        d.metadata.uid.clone().expect("uid")
    );
    assert!(ready.iter().all(|p| hash_of(p) == hash
        && p.name_any().starts_with(&format!("web-{hash}-"))
        && p.owner_references()[0].name == rs.name_any()));
    emulator.shutdown().await;
}

/// Watches pods of `selector` from the current state until `done` holds, asserting at
/// every event that at most `max_pods` live pods exist and at least `min_ready` are Ready.
/// Returns every pod name seen.
async fn check_rollout<F>(
    pods: &Api<Pod>,
    selector: &str,
    max_pods: usize,
    min_ready: usize,
    trigger: impl Future<Output = ()>,
    done: F,
) -> Vec<String>
where
    F: Fn(&BTreeMap<String, Pod>) -> bool,
{
    let list = pods
        .list(&ListParams::default().labels(selector))
        .await
        .expect("list");
    let rv = list.metadata.resource_version.clone().expect("rv");
    let mut state: BTreeMap<String, Pod> =
        list.items.into_iter().map(|p| (p.name_any(), p)).collect();
    let mut seen: Vec<String> = state.keys().cloned().collect();
    let stream = pods
        .watch(&WatchParams::default().labels(selector).timeout(240), &rv)
        .await
        .expect("watch");
    let mut stream = stream.boxed();
    trigger.await;
    let mut events = 0;
    let result = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(event) = stream.try_next().await.expect("watch stream") {
            match event {
                WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                    if !seen.contains(&p.name_any()) {
                        seen.push(p.name_any());
                    }
                    state.insert(p.name_any(), p);
                }
                WatchEvent::Deleted(p) => {
                    state.remove(&p.name_any());
                }
                WatchEvent::Bookmark(_) => continue,
                WatchEvent::Error(e) => panic!("watch error: {e:?}"),
            }
            events += 1;
            let live = state.values().filter(|p| is_live(p)).count();
            let ready = state.values().filter(|p| is_live(p) && is_ready(p)).count();
            assert!(
                live <= max_pods,
                "{live} live pods exceed {max_pods} after event {events}"
            );
            assert!(
                ready >= min_ready,
                "{ready} ready pods fall below {min_ready} after event {events}"
            );
            if done(&state) {
                return;
            }
        }
        panic!("watch ended before the rollout finished");
    })
    .await;
    assert!(result.is_ok(), "rollout did not finish in time");
    assert!(events > 0);
    seen
}

fn restart_patch() -> Patch<Value> {
    Patch::Strategic(json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": "2024-01-01T00:00:00Z"
    }}}}}))
}

/// Whether every live pod runs `hash`, `replicas` are Ready and nothing else is left.
fn rolled_out(state: &BTreeMap<String, Pod>, old: &[String], replicas: usize) -> bool {
    let ready_new = state
        .values()
        .filter(|p| is_live(p) && is_ready(p) && !old.contains(&p.name_any()))
        .count();
    ready_new == replicas && state.values().all(|p| !old.contains(&p.name_any()))
}

#[tokio::test]
async fn rolling_update_respects_surge_and_unavailability() {
    let (emulator, client) = start_cluster(2, Duration::from_millis(30)).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // Integers: 6 replicas, at most 8 pods, at least 5 ready.
    let strategy =
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 2, "maxUnavailable": 1}});
    deploys
        .create(&PostParams::default(), &deployment("ints", 6, strategy))
        .await
        .expect("create");
    // Percentages of 10: surge 25% rounds up to 3, unavailable 25% rounds down to 2.
    let strategy = json!({"type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}});
    deploys
        .create(&PostParams::default(), &deployment("pct", 10, strategy))
        .await
        .expect("create");
    // maxUnavailable 0 with minReadySeconds: a surge-only rollout.
    let mut surge_only = deployment(
        "surge",
        3,
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
    );
    surge_only.spec.as_mut().expect("spec").min_ready_seconds = Some(1);
    deploys
        .create(&PostParams::default(), &surge_only)
        .await
        .expect("create");
    for (name, replicas) in [("ints", 6), ("pct", 10), ("surge", 3)] {
        wait_complete(&deploys, name, replicas).await;
    }
    for (name, replicas, max_pods, min_ready) in
        [("ints", 6, 8, 5), ("pct", 10, 13, 8), ("surge", 3, 4, 3)]
    {
        let selector = format!("app={name}");
        let old: Vec<String> = ready_pods(&pods, &selector)
            .await
            .iter()
            .map(kube::ResourceExt::name_any)
            .collect();
        assert_eq!(old.len(), replicas);
        let trigger = async {
            deploys
                .patch(name, &PatchParams::default(), &restart_patch())
                .await
                .expect("restart");
        };
        let seen = check_rollout(&pods, &selector, max_pods, min_ready, trigger, |s| {
            rolled_out(s, &old, replicas)
        })
        .await;
        assert!(
            seen.len() >= 2 * replicas,
            "{name}: every pod replaced: {seen:?}"
        );
        wait_complete(&deploys, name, replicas as i32).await;
        let d = deploys.get(name).await.expect("get");
        assert_eq!(
            d.annotations()
                .get("deployment.kubernetes.io/revision")
                .map(String::as_str),
            Some("2")
        );
    }
    // The old replica sets are kept, scaled to zero.
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let ints: Vec<ReplicaSet> = rss
        .list(&ListParams::default().labels("app=ints"))
        .await
        .expect("rs")
        .items;
    assert_eq!(ints.len(), 2);
    assert_eq!(
        ints.iter()
            .filter_map(|rs| rs.spec.as_ref()?.replicas)
            .sum::<i32>(),
        6
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn stalled_rollouts_exceed_their_progress_deadline() {
    let (emulator, client) = start_cluster(1, Duration::ZERO).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut stuck = deployment("stuck", 2, json!({"type": "RollingUpdate"}));
    let spec = stuck.spec.as_mut().expect("spec");
    spec.progress_deadline_seconds = Some(1);
    spec.template
        .metadata
        .get_or_insert_with(Default::default)
        .annotations = Some([("kube-emulator.io/stall".to_string(), "true".to_string())].into());
    deploys
        .create(&PostParams::default(), &stuck)
        .await
        .expect("create");
    let progressing = |d: &Deployment| {
        d.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Progressing").cloned())
    };
    eventually("rollout progressing", || async {
        let d = deploys.get("stuck").await.expect("get");
        progressing(&d).is_some_and(|c| c.status == "True")
    })
    .await;
    eventually("progress deadline exceeded", || async {
        let d = deploys.get("stuck").await.expect("get");
        progressing(&d).is_some_and(|c| {
            c.status == "False" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        })
    })
    .await;
    let stalled = pods
        .list(&ListParams::default().labels("app=stuck"))
        .await
        .expect("list")
        .items;
    assert_eq!(stalled.len(), 2);
    assert!(stalled.iter().all(|p| !is_ready(p)));
    // Releasing the pods lets the rollout progress and complete.
    for pod in &stalled {
        pods.patch(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"kube-emulator.io/stall": null}}})),
        )
        .await
        .expect("release");
    }
    wait_complete(&deploys, "stuck", 2).await;
    eventually("rollout complete", || async {
        let d = deploys.get("stuck").await.expect("get");
        progressing(&d).is_some_and(|c| {
            c.status == "True" && c.reason.as_deref() == Some("NewReplicaSetAvailable")
        })
    })
    .await;
    emulator.shutdown().await;
}

#[tokio::test]
async fn recreate_stops_old_pods_before_starting_new_ones() {
    let (emulator, client) = start_cluster(1, Duration::from_millis(20)).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    deploys
        .create(
            &PostParams::default(),
            &deployment("re", 3, json!({"type": "Recreate"})),
        )
        .await
        .expect("create");
    wait_complete(&deploys, "re", 3).await;
    let old: Vec<String> = ready_pods(&pods, "app=re")
        .await
        .iter()
        .map(kube::ResourceExt::name_any)
        .collect();
    let list = pods
        .list(&ListParams::default().labels("app=re"))
        .await
        .expect("list");
    let rv = list.metadata.resource_version.expect("rv");
    let mut stream = pods
        .watch(&WatchParams::default().labels("app=re"), &rv)
        .await
        .expect("watch")
        .boxed();
    deploys
        .patch("re", &PatchParams::default(), &restart_patch())
        .await
        .expect("restart");
    let mut remaining_old: Vec<String> = old.clone();
    let mut new_ready = 0;
    let finished = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = stream.try_next().await.expect("watch") {
            match event {
                WatchEvent::Added(p) => assert!(
                    remaining_old.is_empty(),
                    "new pod {} created while old pods {remaining_old:?} still exist",
                    p.name_any()
                ),
                WatchEvent::Deleted(p) => remaining_old.retain(|n| *n != p.name_any()),
                WatchEvent::Modified(p) if !old.contains(&p.name_any()) && is_ready(&p) => {
                    new_ready += 1;
                    if new_ready == 3 {
                        return;
                    }
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(finished.is_ok(), "recreate rollout did not finish");
    wait_complete(&deploys, "re", 3).await;
    emulator.shutdown().await;
}

#[tokio::test]
async fn scale_down_removes_pods_with_the_lowest_deletion_cost() {
    let (emulator, client) = start_cluster(2, Duration::ZERO).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    deploys
        .create(
            &PostParams::default(),
            &deployment("cost", 5, json!({"type": "RollingUpdate"})),
        )
        .await
        .expect("create");
    wait_complete(&deploys, "cost", 5).await;
    let mut names: Vec<String> = ready_pods(&pods, "app=cost")
        .await
        .iter()
        .map(kube::ResourceExt::name_any)
        .collect();
    names.sort();
    // Costs 0, 100, -5, 50, 7: keeping two leaves the pods with cost 100 and 50.
    let costs = [0, 100, -5, 50, 7];
    for (name, cost) in names.iter().zip(costs) {
        let patch = json!({"metadata": {"annotations": {
            "controller.kubernetes.io/pod-deletion-cost": cost.to_string()}}});
        pods.patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .expect("annotate");
    }
    deploys
        .patch(
            "cost",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .expect("scale");
    wait_complete(&deploys, "cost", 2).await;
    let mut kept: Vec<String> = pods
        .list(&ListParams::default().labels("app=cost"))
        .await
        .expect("list")
        .items
        .into_iter()
        .filter(is_live)
        .map(|p| p.name_any())
        .collect();
    kept.sort();
    let mut expected = vec![names[1].clone(), names[3].clone()];
    expected.sort();
    assert_eq!(kept, expected);
    emulator.shutdown().await;
}

fn statefulset(name: &str, replicas: i32, policy: &str) -> StatefulSet {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "podManagementPolicy": policy,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "main", "image": "example/web:1"}]
                }
            }
        }
    }))
    .expect("statefulset")
}

async fn wait_sts_ready(sts: &Api<StatefulSet>, name: &str, replicas: i32) {
    eventually(&format!("statefulset {name} ready"), || async {
        let s = sts.get(name).await.expect("get");
        let generation = s.metadata.generation.unwrap_or(0);
        let status = s.status.unwrap_or_default();
        status.observed_generation.unwrap_or(0) >= generation
            && status.ready_replicas.unwrap_or(0) == replicas
            && status.updated_replicas.unwrap_or(0) == replicas
            && status.replicas == replicas
            && status.current_revision == status.update_revision
    })
    .await;
}

#[tokio::test]
async fn statefulset_creates_in_order_and_rolls_in_reverse() {
    let (emulator, client) = start_cluster(1, Duration::from_millis(30)).await;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = pods.list(&ListParams::default()).await.expect("list");
    let rv = list.metadata.resource_version.expect("rv");
    let mut stream = pods
        .watch(&WatchParams::default().labels("app=web"), &rv)
        .await
        .expect("watch")
        .boxed();
    sts.create(
        &PostParams::default(),
        &statefulset("web", 3, "OrderedReady"),
    )
    .await
    .expect("create");
    // OrderedReady: web-1 is created only once web-0 is Ready, and so on.
    let mut created = Vec::new();
    let mut ready: Vec<String> = Vec::new();
    let ordered = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = stream.try_next().await.expect("watch") {
            match event {
                WatchEvent::Added(p) => {
                    assert_eq!(
                        ready.len(),
                        created.len(),
                        "{} created before its predecessor was ready",
                        p.name_any()
                    );
                    created.push(p.name_any());
                }
                WatchEvent::Modified(p) if is_ready(&p) && !ready.contains(&p.name_any()) => {
                    ready.push(p.name_any());
                    if ready.len() == 3 {
                        return;
                    }
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(ordered.is_ok(), "statefulset did not come up");
    assert_eq!(created, ["web-0", "web-1", "web-2"]);
    wait_sts_ready(&sts, "web", 3).await;
    let before: BTreeMap<String, String> = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("list")
        .items
        .iter()
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect();

    // A template change rolls web-2, web-1, web-0 in that order, under the same names.
    sts.patch("web", &PatchParams::default(), &restart_patch())
        .await
        .expect("update template");
    let mut deleted = Vec::new();
    let rolled = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = stream.try_next().await.expect("watch") {
            if let WatchEvent::Deleted(p) = event {
                deleted.push(p.name_any());
                if deleted.len() == 3 {
                    return;
                }
            }
        }
    })
    .await;
    assert!(rolled.is_ok(), "rolling update did not delete every pod");
    assert_eq!(deleted, ["web-2", "web-1", "web-0"]);
    wait_sts_ready(&sts, "web", 3).await;
    let after = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("list")
        .items;
    let s = sts.get("web").await.expect("get");
    let revision = s.status.and_then(|s| s.update_revision).expect("revision");
    assert_eq!(after.len(), 3);
    for pod in &after {
        assert_ne!(
            before.get(&pod.name_any()),
            Some(&pod.uid().unwrap_or_default()),
            "{} was replaced",
            pod.name_any()
        );
        assert_eq!(
            pod.labels().get("controller-revision-hash"),
            Some(&revision)
        );
    }

    // Scale down from the highest ordinal.
    sts.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await
    .expect("scale");
    eventually("scaled to web-0", || async {
        let names: Vec<String> = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .expect("list")
            .items
            .iter()
            .map(kube::ResourceExt::name_any)
            .collect();
        names == ["web-0"]
    })
    .await;
    emulator.shutdown().await;
}

#[tokio::test]
async fn statefulset_partition_and_parallel() {
    let (emulator, client) = start_cluster(1, Duration::ZERO).await;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    sts.create(&PostParams::default(), &statefulset("db", 4, "Parallel"))
        .await
        .expect("create");
    wait_sts_ready(&sts, "db", 4).await;
    let old = sts
        .get("db")
        .await
        .expect("get")
        .status
        .and_then(|s| s.current_revision)
        .expect("revision");
    sts.patch(
        "db",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"updateStrategy": {"type": "RollingUpdate",
            "rollingUpdate": {"partition": 2}}}})),
    )
    .await
    .expect("partition");
    sts.patch("db", &PatchParams::default(), &restart_patch())
        .await
        .expect("update");
    eventually("ordinals 2 and 3 updated", || async {
        let s = sts.get("db").await.expect("get");
        s.status
            .is_some_and(|st| st.updated_replicas == Some(2) && st.ready_replicas == Some(4))
    })
    .await;
    let revisions: BTreeMap<String, String> = pods
        .list(&ListParams::default().labels("app=db"))
        .await
        .expect("list")
        .items
        .iter()
        .filter(|p| is_live(p))
        .map(|p| {
            (
                p.name_any(),
                p.labels()
                    .get("controller-revision-hash")
                    .cloned()
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(revisions.get("db-0"), Some(&old));
    assert_eq!(revisions.get("db-1"), Some(&old));
    assert_ne!(revisions.get("db-2"), Some(&old));
    assert_ne!(revisions.get("db-3"), Some(&old));
    emulator.shutdown().await;
}

#[tokio::test]
async fn deleting_a_deployment_cascades() {
    let (emulator, client) = start_cluster(1, Duration::ZERO).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for name in ["bg", "fg"] {
        deploys
            .create(
                &PostParams::default(),
                &deployment(name, 2, json!({"type": "RollingUpdate"})),
            )
            .await
            .expect("create");
        wait_complete(&deploys, name, 2).await;
    }
    // Background: the deployment goes at once, then its replica sets and pods.
    deploys
        .delete("bg", &DeleteParams::background())
        .await
        .expect("delete");
    assert!(deploys.get_opt("bg").await.expect("get").is_none());
    eventually("bg dependents gone", || async {
        rss.list(&ListParams::default().labels("app=bg"))
            .await
            .expect("rs")
            .items
            .is_empty()
            && pods
                .list(&ListParams::default().labels("app=bg"))
                .await
                .expect("pods")
                .items
                .is_empty()
    })
    .await;

    // Foreground: the deployment stays (foregroundDeletion) while its pods terminate.
    deploys
        .delete("fg", &DeleteParams::foreground())
        .await
        .expect("delete");
    let held = deploys.get("fg").await.expect("owner kept");
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(held.finalizers().iter().any(|f| f == "foregroundDeletion"));
    assert!(
        !pods
            .list(&ListParams::default().labels("app=fg"))
            .await
            .expect("pods")
            .items
            .is_empty(),
        "pods are still terminating while the owner waits"
    );
    eventually("fg deployment gone after its pods", || async {
        deploys.get_opt("fg").await.expect("get").is_none()
    })
    .await;
    assert!(
        pods.list(&ListParams::default().labels("app=fg"))
            .await
            .expect("pods")
            .items
            .is_empty()
    );

    // Orphan: replica set and pods stay, without the owner reference.
    deploys
        .create(
            &PostParams::default(),
            &deployment("orph", 1, json!({"type": "RollingUpdate"})),
        )
        .await
        .expect("create");
    wait_complete(&deploys, "orph", 1).await;
    deploys
        .delete("orph", &DeleteParams::orphan())
        .await
        .expect("delete");
    let orphaned = rss
        .list(&ListParams::default().labels("app=orph"))
        .await
        .expect("rs")
        .items;
    assert_eq!(orphaned.len(), 1);
    assert!(orphaned[0].owner_references().is_empty());
    emulator.shutdown().await;
}

#[tokio::test]
async fn garbage_collector_removes_dependents_of_missing_owners() {
    let (emulator, client) = start_cluster(1, Duration::ZERO).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "stray", "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "gone",
            "uid": "00000000-0000-4000-8000-000000000000", "controller": true}]},
        "spec": {"terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "main", "image": "busybox"}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create");
    eventually("dangling dependent collected", || async {
        pods.get_opt("stray").await.expect("get").is_none()
    })
    .await;
    emulator.shutdown().await;
}

#[tokio::test]
async fn kubelet_hooks_crash_flap_and_stall() {
    let (emulator, client) = start_cluster(1, Duration::from_millis(50)).await;
    let control = emulator.control();
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    deploys
        .create(
            &PostParams::default(),
            &deployment("hk", 2, json!({"type": "RollingUpdate"})),
        )
        .await
        .expect("create");
    wait_complete(&deploys, "hk", 2).await;
    let names: Vec<String> = ready_pods(&pods, "app=hk")
        .await
        .iter()
        .map(kube::ResourceExt::name_any)
        .collect();

    // A container restart: restartCount 1, NotReady, then Ready again.
    let crashed = control
        .crash_pod("default", &names[0], Crash::Restart)
        .expect("crash");
    assert!(!is_ready(&serde_json::from_value(crashed).expect("pod")));
    eventually("restarted pod ready again", || async {
        let p = pods.get(&names[0]).await.expect("get");
        let restarts = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map_or(0, |cs| cs[0].restart_count);
        restarts == 1 && is_ready(&p)
    })
    .await;

    // Flapping readiness: NotReady for a while, then Ready without a restart.
    control
        .flap_readiness("default", &names[1], Duration::from_millis(300))
        .expect("flap");
    assert!(!is_ready(&pods.get(&names[1]).await.expect("get")));
    eventually("flapped pod ready again", || async {
        is_ready(&pods.get(&names[1]).await.expect("get"))
    })
    .await;

    // A failed pod is replaced by the replica set and stays Failed.
    control
        .crash_pod("default", &names[0], Crash::Fail)
        .expect("fail");
    eventually("replacement ready", || async {
        let ready = ready_pods(&pods, "app=hk").await;
        ready.len() == 2 && ready.iter().all(|p| p.name_any() != names[0])
    })
    .await;
    let failed = pods.get(&names[0]).await.expect("failed pod stays");
    assert_eq!(
        failed.status.and_then(|s| s.phase).as_deref(),
        Some("Failed")
    );

    // Stalled pods stay Pending (bound, never started) until released.
    let stalled: Pod = serde_json::from_value(json!({
        "metadata": {"name": "slow", "annotations": {"kube-emulator.io/stall": "true"}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &stalled)
        .await
        .expect("create");
    control.stall_pod("default", "held", true);
    let held: Pod = serde_json::from_value(json!({
        "metadata": {"name": "held"},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &held)
        .await
        .expect("create");
    eventually("stalled pods bound", || async {
        let mut bound = true;
        for name in ["slow", "held"] {
            let p = pods.get(name).await.expect("get");
            bound &= p.spec.and_then(|s| s.node_name).is_some();
        }
        bound
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for name in ["slow", "held"] {
        let p = pods.get(name).await.expect("get");
        assert_eq!(
            p.status.and_then(|s| s.phase).as_deref(),
            Some("Pending"),
            "{name} stays Pending"
        );
    }
    control.stall_pod("default", "held", false);
    eventually("released pod ready", || async {
        is_ready(&pods.get("held").await.expect("get"))
    })
    .await;

    // A per-pod ready delay keeps the pod Running but NotReady meanwhile.
    let delayed: Pod = serde_json::from_value(json!({
        "metadata": {"name": "late", "annotations": {"kube-emulator.io/ready-delay": "60s"}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &delayed)
        .await
        .expect("create");
    eventually("late pod running", || async {
        let p = pods.get("late").await.expect("get");
        p.status.and_then(|s| s.phase).as_deref() == Some("Running")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!is_ready(&pods.get("late").await.expect("get")));
    emulator.shutdown().await;
}

#[tokio::test]
async fn terminating_pods_turn_not_ready_at_once() {
    let (emulator, client) = start_cluster(1, Duration::ZERO).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "t"},
        "spec": {"terminationGracePeriodSeconds": 2,
                 "containers": [{"name": "main", "image": "busybox"}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create");
    eventually("pod ready", || async {
        is_ready(&pods.get("t").await.expect("get"))
    })
    .await;
    pods.delete("t", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("terminating pod not ready", || async {
        pods.get_opt("t")
            .await
            .expect("get")
            .is_some_and(|p| p.metadata.deletion_timestamp.is_some() && !is_ready(&p))
    })
    .await;
    eventually("pod removed after its grace period", || async {
        pods.get_opt("t").await.expect("get").is_none()
    })
    .await;
    emulator.shutdown().await;
}

#[tokio::test]
async fn controllers_off_leave_pods_alone() {
    let emulator = Emulator::start().await.expect("start");
    let client = emulator.client().expect("client");
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    deploys
        .create(
            &PostParams::default(),
            &deployment("idle", 2, json!({"type": "RollingUpdate"})),
        )
        .await
        .expect("create");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        pods.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty()
    );
    let nodes: Api<Node> = Api::all(client);
    assert!(
        nodes
            .list(&ListParams::default())
            .await
            .expect("nodes")
            .items
            .is_empty()
    );
    emulator.shutdown().await;
}

/// verb, group, resource, subresource, name, code
type Seen = (String, String, String, Option<String>, Option<String>, u16);

#[tokio::test]
async fn request_log_records_rbac_attributes() {
    let emulator = Emulator::start().await.expect("start");
    let mut config = emulator.kube_config().expect("config");
    config.headers.push((
        http::header::USER_AGENT,
        "rbac-probe/1.0".parse().expect("ua"),
    ));
    let client = Client::try_from(config).expect("client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let _ = pods.list(&ListParams::default()).await.expect("list");
    let _ = pods.get_opt("missing").await.expect("get");
    deploys
        .create(
            &PostParams::default(),
            &deployment("logged", 1, json!({"type": "RollingUpdate"})),
        )
        .await
        .expect("create");
    deploys
        .patch(
            "logged",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .expect("patch");
    let _ = deploys
        .get_scale("logged")
        .await
        .expect("scale subresource");
    let stream = pods
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .expect("watch");
    drop(stream);
    let _ = deploys
        .delete("logged", &DeleteParams::default())
        .await
        .expect("delete");
    let records: Vec<_> = emulator
        .control()
        .requests()
        .into_iter()
        .filter(|r| r.user_agent.as_deref() == Some("rbac-probe/1.0"))
        .collect();
    let seen: Vec<Seen> = records
        .iter()
        .filter(|r| r.is_resource_request())
        .map(|r| {
            (
                r.verb.clone(),
                r.api_group.clone(),
                r.resource.clone(),
                r.subresource.clone(),
                r.name.clone(),
                r.code,
            )
        })
        .collect();
    let expect = |verb: &str,
                  group: &str,
                  resource: &str,
                  sub: Option<&str>,
                  name: Option<&str>,
                  code: u16| {
        (
            verb.to_string(),
            group.to_string(),
            resource.to_string(),
            sub.map(str::to_string),
            name.map(str::to_string),
            code,
        )
    };
    assert_eq!(
        seen,
        vec![
            expect("list", "", "pods", None, None, 200),
            expect("get", "", "pods", None, Some("missing"), 404),
            expect("create", "apps", "deployments", None, None, 201),
            expect("patch", "apps", "deployments", None, Some("logged"), 200),
            expect(
                "get",
                "apps",
                "deployments",
                Some("scale"),
                Some("logged"),
                200
            ),
            expect("watch", "", "pods", None, None, 200),
            expect("delete", "apps", "deployments", None, Some("logged"), 200),
        ]
    );
    assert!(
        records
            .iter()
            .all(|r| r.namespace.as_deref() == Some("default") && r.api_version == "v1")
    );
    emulator.control().clear_requests();
    assert!(emulator.control().requests().is_empty());
    emulator.shutdown().await;
}

/// With a ready jitter, pods started together become Ready spread out (each after its own
/// share of the jitter); without one they become Ready together.
#[tokio::test]
async fn ready_jitter_spreads_readiness() {
    async fn readiness_spread(jitter: Duration) -> Duration {
        let emulator = Emulator::builder()
            .controllers(Controllers::all())
            .pod_ready_delay(Duration::ZERO)
            .pod_ready_jitter(jitter)
            .start()
            .await
            .expect("emulator starts");
        let client = emulator.client().expect("client");
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
        let pods: Api<Pod> = Api::namespaced(client, "default");
        let mut watch = pods
            .watch(&WatchParams::default(), "0")
            .await
            .expect("watch")
            .boxed();
        let strategy = json!({"type": "RollingUpdate"});
        deployments
            .create(&PostParams::default(), &deployment("spread", 10, strategy))
            .await
            .expect("create");
        let mut ready_at: BTreeMap<String, tokio::time::Instant> = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while ready_at.len() < 10 {
            let event = tokio::time::timeout_at(deadline, watch.try_next())
                .await
                .expect("all pods Ready in time")
                .expect("watch event")
                .expect("watch open");
            if let WatchEvent::Added(pod) | WatchEvent::Modified(pod) = event
                && is_ready(&pod)
            {
                ready_at
                    .entry(pod.name_any())
                    .or_insert_with(tokio::time::Instant::now);
            }
        }
        emulator.shutdown().await;
        let first = ready_at.values().min().copied().expect("ten pods");
        let last = ready_at.values().max().copied().expect("ten pods");
        last - first
    }

    let together = readiness_spread(Duration::ZERO).await;
    let spread = readiness_spread(Duration::from_secs(2)).await;
    // Ten uniform shares of 2 s span less than 0.5 s with probability about 10 · 0.25⁹.
    assert!(
        spread >= Duration::from_millis(500),
        "with 2 s of jitter, readiness spread over only {spread:?}"
    );
    assert!(
        spread > together,
        "jitter spread readiness over {spread:?}, without it {together:?}"
    );
}

/// Defaults apply on every write, not only on create: a container added by a patch (or a
/// replace, or an apply) gets the same defaults as one created with the Deployment, so the
/// Deployment's template equals that of the ReplicaSet made from it and one rollout makes
/// one ReplicaSet. (Defaulting on create only made the controller create ReplicaSets in a
/// hot loop.)
#[tokio::test]
async fn defaults_apply_on_every_write_so_a_patched_template_rolls_out_once() {
    let (_emulator, client) = start_cluster(1, Duration::from_millis(20)).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deploys
        .create(&PostParams::default(), &deployment("web", 2, json!({})))
        .await
        .expect("create");
    wait_complete(&deploys, "web", 2).await;
    let sidecar = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "main", "image": "example/worker:1"},
        {"name": "sidecar", "image": "example/sidecar:2", "ports": [{"containerPort": 9090}]}
    ]}}}});
    let patched = deploys
        .patch("web", &PatchParams::default(), &Patch::Strategic(&sidecar))
        .await
        .expect("patch");
    let containers = &patched
        .spec
        .as_ref()
        .expect("spec")
        .template
        .spec
        .as_ref()
        .expect("pod spec")
        .containers;
    let added = containers
        .iter()
        .find(|c| c.name == "sidecar")
        .expect("sidecar");
    assert_eq!(added.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(
        added.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    let port = &added.ports.as_ref().expect("ports")[0];
    assert_eq!(
        port.protocol.as_deref(),
        Some("TCP"),
        "protocol defaulted on patch"
    );
    wait_complete(&deploys, "web", 2).await;

    // The same through a full replace (PUT) and a server-side apply.
    let mut current = deploys.get("web").await.expect("get");
    let spec = current.spec.as_mut().expect("spec");
    let pod = spec.template.spec.as_mut().expect("pod spec");
    pod.containers.push(
        serde_json::from_value(json!({"name": "third", "image": "example/third:3"}))
            .expect("container"),
    );
    let replaced = deploys
        .replace("web", &PostParams::default(), &current)
        .await
        .expect("replace");
    let third = replaced
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec")
        .containers
        .into_iter()
        .find(|c| c.name == "third")
        .expect("third");
    assert_eq!(third.termination_message_policy.as_deref(), Some("File"));
    wait_complete(&deploys, "web", 2).await;
    let applied = deploys
        .patch(
            "web",
            &PatchParams::apply("test").force(),
            &Patch::Apply(json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "main", "image": "example/worker:2",
                                             "ports": [{"containerPort": 8080}]}]}}}
            })),
        )
        .await
        .expect("apply");
    let main = &applied
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec")
        .containers[0];
    assert_eq!(
        main.ports.as_ref().expect("ports")[0].protocol.as_deref(),
        Some("TCP")
    );
    wait_complete(&deploys, "web", 2).await;

    // Four templates, four ReplicaSets: no hot loop.
    let sets: Api<ReplicaSet> = Api::namespaced(client, "default");
    let names: Vec<String> = sets
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(kube::ResourceExt::name_any)
        .collect();
    assert_eq!(names.len(), 4, "one ReplicaSet per template: {names:?}");
}
