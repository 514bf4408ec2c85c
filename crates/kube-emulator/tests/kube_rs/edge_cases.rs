//! Request-controlled values and event sequences that once misbehaved.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams, WatchEvent};
use serde_json::json;

use crate::{backends, eventually, install_crd, on_each, start, widget_crd};

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        // Scheduled: unscheduled pods are deleted at once, without a grace period.
        "spec": {"nodeName": crate::IDLE_NODE, "containers": [{"name": "main", "image": "busybox"}]}
    }))
    .expect("pod")
}

/// A pod no scheduler binds: on a real cluster kube-scheduler would bind one without a
/// `nodeName` (and kwok start it) while the test looks at it.
fn unscheduled(name: &str) -> Pod {
    let mut p = pod(name);
    let spec = p.spec.as_mut().expect("spec");
    spec.node_name = None;
    spec.scheduler_name = Some("no-scheduler".into());
    p
}

fn delete_request(ns: &str, name: &str, grace: i64) -> http::Request<Vec<u8>> {
    http::Request::builder()
        .method("DELETE")
        .uri(format!("/api/v1/namespaces/{ns}/pods/{name}"))
        .header("content-type", "application/json")
        .body(
            serde_json::to_vec(
                &json!({"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": grace}),
            )
            .expect("body"),
        )
        .expect("request")
}

#[tokio::test]
async fn extreme_grace_periods_and_watch_timeouts_do_not_break_the_server() {
    on_each(backends("extremes").await, async |b| {
    let client = b.client.clone();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &b.ns);

    // A grace period near i64::MAX is capped instead of overflowing.
    pods.create(&PostParams::default(), &pod("forever"))
        .await
        .expect("create");
    let marked: Pod = client
        .request(delete_request(&b.ns, "forever", i64::MAX))
        .await
        .expect("delete with a huge grace period");
    let grace = marked
        .metadata
        .deletion_grace_period_seconds
        .expect("grace period recorded");
    assert!(grace > 0, "still terminating gracefully, got {grace}");
    assert!(marked.metadata.deletion_timestamp.is_some());

    // A huge terminationGracePeriodSeconds in the spec is capped as well.
    let mut long = pod("long");
    long.spec
        .as_mut()
        .expect("spec")
        .termination_grace_period_seconds = Some(i64::MAX);
    pods.create(&PostParams::default(), &long)
        .await
        .expect("create");
    let marked: Pod = client
        .request(
            http::Request::builder()
                .method("DELETE")
                .uri(format!("/api/v1/namespaces/{}/pods/long", b.ns))
                .body(Vec::new())
                .expect("request"),
        )
        .await
        .expect("delete using the spec's grace period");
    assert!(marked.metadata.deletion_timestamp.is_some());

    // A negative grace period counts as one second, like the API server.
    pods.create(&PostParams::default(), &pod("negative"))
        .await
        .expect("create");
    let marked: Pod = client
        .request(delete_request(&b.ns, "negative", -5))
        .await
        .expect("delete with a negative grace period");
    assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(1));
    if !b.is_real() {
        // The emulator ends grace periods itself; on a real cluster the pod's kubelet does
        // (`IDLE_NODE` has none).
        eventually("pod with a negative grace period disappears", || async {
            pods.get_opt("negative").await.expect("get").is_none()
        })
        .await;
    }

    // A timeout beyond int64 is a 400, as the API server's query decoding says.
    let too_big = http::Request::builder()
        .uri(format!(
            "/api/v1/namespaces/{}/pods?watch=true&resourceVersion=0&timeoutSeconds=18446744073709551615",
            b.ns
        ))
        .body(Vec::new())
        .expect("request");
    match client.request_events::<Pod>(too_big).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (400, "BadRequest")),
        Err(other) => panic!("expected a 400 Status, got {other:?}"),
        Ok(_) => panic!("expected a 400 Status, got a watch"),
    }
    // A huge watch timeout (about 31 years) keeps the watch open instead of killing it.
    // (Near i64::MAX seconds Go's Duration overflows and a real server ends the watch at
    // once: a listed difference.)
    let request = http::Request::builder()
        .uri(format!(
            "/api/v1/namespaces/{}/pods?watch=true&resourceVersion=0&timeoutSeconds=1000000000",
            b.ns
        ))
        .body(Vec::new())
        .expect("request");
    let mut events = client
        .request_events::<Pod>(request)
        .await
        .expect("watch")
        .boxed();
    pods.create(&PostParams::default(), &pod("watched"))
        .await
        .expect("create");
    let mut seen = false;
    while let Some(ev) = tokio::time::timeout(std::time::Duration::from_secs(60), events.try_next())
        .await
        .expect("watch keeps delivering")
        .expect("watch event")
    {
        if let WatchEvent::Added(p) = ev
            && p.metadata.name.as_deref() == Some("watched")
        {
            seen = true;
            break;
        }
    }
    assert!(seen, "the watch delivered the new pod before ending");
    drop(events);
    assert!(
        pods.get_opt("forever")
            .await
            .expect("server still serves")
            .is_some()
    );
    })
    .await;
}

/// Emulator-only: seeding through `Control::create` and `drop_watches` are hooks.
#[tokio::test]
async fn dropping_watches_during_the_initial_replay_ends_them() {
    let (emulator, client) = start().await;
    // Enough data that replaying it to a client that does not read blocks the watch
    // task part-way (channel, HTTP and socket buffers all fill up).
    let filler = "x".repeat(20_000);
    for i in 0..1000 {
        emulator
            .control()
            .create(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": format!("cm-{i}"), "namespace": "default"},
                "data": {"filler": filler}
            }))
            .expect("create");
    }
    let request = http::Request::builder()
        .uri("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=0")
        .body(Vec::new())
        .expect("request");
    let events = client
        .request_events::<k8s_openapi::api::core::v1::ConfigMap>(request)
        .await
        .expect("watch");
    // Not reading yet: the replay stalls; the drop arrives while it is under way.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    emulator.control().drop_watches();
    let received = tokio::time::timeout(std::time::Duration::from_secs(60), events.count())
        .await
        .expect("the dropped watch ends instead of staying open");
    assert!(received > 0);
    emulator.shutdown().await;
}

fn widget(name: &str) -> kube::api::DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"name": name, "finalizers": ["example.com/hold"]},
        "spec": {"size": 1}
    }))
    .expect("widget")
}

#[tokio::test]
async fn marking_for_deletion_bumps_generation() {
    on_each(backends("mark-generation").await, async |b| {
        let client = b.client.clone();
        install_crd(b, widget_crd()).await;
        let widgets: Api<kube::api::DynamicObject> =
            Api::namespaced_with(client.clone(), &b.ns, &crate::crud::widgets_resource());
        let created = widgets
            .create(&PostParams::default(), &widget("held"))
            .await
            .expect("create");
        let generation = created.metadata.generation.expect("generation tracked");
        let marked = widgets
            .delete("held", &kube::api::DeleteParams::default())
            .await
            .expect("delete")
            .left()
            .expect("the finalizer keeps it");
        assert!(marked.metadata.deletion_timestamp.is_some());
        assert_eq!(marked.metadata.generation, Some(generation + 1));
        // A repeated delete changes nothing.
        widgets
            .delete("held", &kube::api::DeleteParams::default())
            .await
            .expect("delete again");
        let current = widgets.get("held").await.expect("get");
        assert_eq!(current.metadata.generation, Some(generation + 1));
    })
    .await;
}

/// Event types (and the object's finalizers) for `name` until it is DELETED.
async fn kinds_until_deleted<K>(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<K>>> + Unpin),
    name: &str,
) -> Vec<(&'static str, usize)>
where
    K: kube::Resource + Clone,
{
    let mut kinds = Vec::new();
    loop {
        let ev = tokio::time::timeout(std::time::Duration::from_secs(60), stream.try_next())
            .await
            .expect("an event arrives")
            .expect("watch event")
            .expect("stream open");
        let (kind, obj) = match ev {
            WatchEvent::Added(o) => ("ADDED", o),
            WatchEvent::Modified(o) => ("MODIFIED", o),
            WatchEvent::Deleted(o) => ("DELETED", o),
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        };
        if obj.meta().name.as_deref() != Some(name) {
            continue;
        }
        let finalizers = obj.meta().finalizers.as_ref().map_or(0, Vec::len);
        kinds.push((kind, finalizers));
        if kind == "DELETED" {
            return kinds;
        }
    }
}

#[tokio::test]
async fn removing_the_last_finalizer_emits_only_deleted() {
    on_each(backends("last-finalizer").await, async |b| {
        let client = b.client.clone();
        install_crd(b, widget_crd()).await;
        let widgets: Api<kube::api::DynamicObject> =
            Api::namespaced_with(client.clone(), &b.ns, &crate::crud::widgets_resource());
        let created = widgets
            .create(&PostParams::default(), &widget("held"))
            .await
            .expect("create");
        let rv = created.metadata.resource_version.expect("rv");
        let mut stream = widgets
            .watch(&kube::api::WatchParams::default(), &rv)
            .await
            .expect("watch")
            .boxed();
        widgets
            .delete("held", &kube::api::DeleteParams::default())
            .await
            .expect("delete");
        let cleared = widgets
            .patch(
                "held",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
            .expect("clear finalizers");
        assert!(cleared.metadata.finalizers.is_none_or(|f| f.is_empty()));
        assert_eq!(
            kinds_until_deleted(&mut stream, "held").await,
            [("MODIFIED", 1), ("DELETED", 1)],
            "marking is MODIFIED; removing the last finalizer is only DELETED, which carries \
             the last stored state (its finalizer still in it), as etcd's previous value"
        );
        assert!(widgets.get_opt("held").await.expect("get").is_none());
        drop(stream);

        // A pod still in its grace period stays (MODIFIED) until the grace period ends.
        let pods: Api<Pod> = Api::namespaced(client.clone(), &b.ns);
        let mut held = pod("held-pod");
        held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
        let created = pods
            .create(&PostParams::default(), &held)
            .await
            .expect("create");
        let rv = created.metadata.resource_version.expect("rv");
        let mut stream = pods
            .watch(&kube::api::WatchParams::default(), &rv)
            .await
            .expect("watch")
            .boxed();
        pods.delete(
            "held-pod",
            &kube::api::DeleteParams::default().grace_period(600),
        )
        .await
        .expect("delete");
        pods.patch(
            "held-pod",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("clear finalizers");
        assert!(pods.get_opt("held-pod").await.expect("get").is_some());
        // The grace period ends: a forced delete, as a kubelet sends once the containers stopped.
        pods.delete(
            "held-pod",
            &kube::api::DeleteParams::default().grace_period(0),
        )
        .await
        .expect("forced delete");
        assert_eq!(
            kinds_until_deleted(&mut stream, "held-pod").await,
            // Marked, finalizer cleared, the forced delete's zero grace period written, removed.
            [
                ("MODIFIED", 1),
                ("MODIFIED", 0),
                ("MODIFIED", 0),
                ("DELETED", 0)
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn unscheduled_pods_are_deleted_at_once() {
    on_each(backends("unscheduled").await, async |b| {
        let pods: Api<Pod> = Api::namespaced(b.client.clone(), &b.ns);
        pods.create(&PostParams::default(), &unscheduled("unscheduled"))
            .await
            .expect("create");
        pods.delete("unscheduled", &kube::api::DeleteParams::default())
            .await
            .expect("delete");
        assert!(
            pods.get_opt("unscheduled").await.expect("get").is_none(),
            "no node, no grace period"
        );
    })
    .await;
}

/// Emulator-only: `set_pod_phase`/`set_pod_ready` are hooks (they bind the pod, as a
/// scheduler and kubelet would) and `expire_grace_periods` ends the grace period.
#[tokio::test]
async fn pods_the_kubelet_helpers_bound_are_deleted_gracefully() {
    let (emulator, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut started = pod("started");
    started.spec.as_mut().expect("spec").node_name = None;
    pods.create(&PostParams::default(), &started)
        .await
        .expect("create");
    emulator
        .control()
        .set_pod_phase("default", "started", "Running")
        .expect("running");
    let bound = pods.get("started").await.expect("get");
    assert_eq!(
        bound.spec.and_then(|s| s.node_name).as_deref(),
        Some(kube_emulator::EMULATED_NODE)
    );
    let marked = pods
        .delete("started", &kube::api::DeleteParams::default())
        .await
        .expect("delete")
        .left()
        .expect("a running pod terminates gracefully");
    assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(30));
    emulator.control().expire_grace_periods();
    assert!(pods.get_opt("started").await.expect("get").is_none());

    let mut ready = pod("ready");
    ready.spec.as_mut().expect("spec").node_name = None;
    pods.create(&PostParams::default(), &ready)
        .await
        .expect("create");
    let readied = emulator
        .control()
        .set_pod_ready("default", "ready", true)
        .expect("ready");
    assert_eq!(
        readied.pointer("/spec/nodeName"),
        Some(&json!(kube_emulator::EMULATED_NODE))
    );
    emulator.shutdown().await;
}
