//! Request-controlled values and event sequences that once misbehaved.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams, WatchEvent};
use serde_json::json;

use crate::{eventually, start};

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}
    }))
    .expect("pod")
}

fn delete_request(name: &str, grace: i64) -> http::Request<Vec<u8>> {
    http::Request::builder()
        .method("DELETE")
        .uri(format!("/api/v1/namespaces/default/pods/{name}"))
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
    let (emulator, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    // A grace period near i64::MAX is capped instead of overflowing.
    pods.create(&PostParams::default(), &pod("forever"))
        .await
        .expect("create");
    let marked: Pod = client
        .request(delete_request("forever", i64::MAX))
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
                .uri("/api/v1/namespaces/default/pods/long")
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
        .request(delete_request("negative", -5))
        .await
        .expect("delete with a negative grace period");
    assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(1));
    eventually("pod with a negative grace period disappears", || async {
        pods.get_opt("negative").await.expect("get").is_none()
    })
    .await;

    // A huge watch timeout keeps the watch open instead of killing it.
    let request = http::Request::builder()
        .uri("/api/v1/namespaces/default/pods?watch=true&resourceVersion=0&timeoutSeconds=18446744073709551615")
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
    emulator.shutdown().await;
}

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
    let (emulator, client) = start().await;
    crate::crud::install_widgets(&client).await;
    let widgets: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &crate::crud::widgets_resource());
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
    emulator.shutdown().await;
}
