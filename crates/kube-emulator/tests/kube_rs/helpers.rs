//! Test helpers of `Control`, cluster-scoped CRDs and clean shutdown.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams, WatchEvent, WatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

use crate::{backends, eventually, install_crd, on_each, start};

/// A pod no scheduler binds (on a real cluster kube-scheduler would, and record an event
/// about it).
fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"schedulerName": "no-scheduler", "containers": [{"name": "main", "image": "busybox"}]}
    }))
    .expect("pod")
}

#[tokio::test]
async fn pod_status_and_grace_helpers() {
    let (emulator, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("p"))
        .await
        .expect("create");
    emulator
        .control()
        .set_pod_phase("default", "p", "Running")
        .expect("phase");
    emulator
        .control()
        .set_pod_ready("default", "p", true)
        .expect("ready");
    let status = pods.get("p").await.expect("get").status.expect("status");
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let ready = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready condition");
    assert_eq!(ready.status, "True");
    emulator
        .control()
        .set_pod_ready("default", "p", false)
        .expect("not ready");
    let conditions = pods
        .get("p")
        .await
        .expect("get")
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default();
    assert_eq!(
        conditions.iter().filter(|c| c.type_ == "Ready").count(),
        1,
        "condition replaced, not duplicated"
    );
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "False")
    );
    assert!(
        emulator
            .control()
            .set_pod_phase("default", "missing", "Running")
            .is_err()
    );

    // A capped grace period: the 1 hour default becomes 1 second.
    emulator
        .control()
        .set_max_grace_period(Some(Duration::from_secs(1)));
    let marked = pods
        .delete("p", &DeleteParams::default().grace_period(3600))
        .await
        .expect("delete");
    assert_eq!(
        marked
            .left()
            .expect("terminating")
            .metadata
            .deletion_grace_period_seconds,
        Some(1)
    );
    eventually("capped grace period ends", || async {
        pods.get_opt("p").await.expect("get").is_none()
    })
    .await;
    emulator.shutdown().await;
}

#[tokio::test]
async fn latency_injection_delays_requests() {
    let (emulator, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    emulator.control().set_latency(Duration::from_millis(300));
    let started = Instant::now();
    pods.get_opt("nothing").await.expect("get");
    // A lower bound only: sleeping guarantees at least this much.
    assert!(started.elapsed() >= Duration::from_millis(300));
    emulator.control().clear_faults();
    emulator.shutdown().await;
}

#[tokio::test]
async fn cluster_scoped_custom_resources() {
    on_each(backends("cluster-crd").await, async |b| {
    let client = b.client.clone();
    let crd_resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
        "customresourcedefinitions",
    );
    let crds: Api<DynamicObject> = Api::all_with(client.clone(), &crd_resource);
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "realms.example.com"},
        "spec": {"group": "example.com", "scope": "Cluster",
            "names": {"plural": "realms", "singular": "realm", "kind": "Realm"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
    });
    install_crd(b, crd).await;
    // Established (the emulator says so in the create response already, a real server's
    // controller a moment later).
    eventually("the CRD is Established", || async {
        let current = crds.get("realms.example.com").await.expect("get CRD");
        current.data["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
            })
    })
    .await;

    let realm = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Realm"),
        "realms",
    );
    let realms: Api<DynamicObject> = Api::all_with(client.clone(), &realm);
    let obj: DynamicObject =
        serde_json::from_value(json!({"apiVersion": "example.com/v1", "kind": "Realm",
        "metadata": {"name": "north"}, "anything": {"goes": [1, 2]}}))
        .expect("realm");
    let created = realms
        .create(&PostParams::default(), &obj)
        .await
        .expect("create realm");
    assert!(created.metadata.namespace.is_none());
    assert_eq!(
        created.data["anything"]["goes"],
        json!([1, 2]),
        "preserve-unknown-fields keeps data"
    );
    assert_eq!(
        realms
            .list(&Default::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    // There is no namespaced path for a cluster-scoped resource.
    let namespaced: Api<DynamicObject> = Api::namespaced_with(client.clone(), &b.ns, &realm);
    assert!(namespaced.get("north").await.is_err());

    // Deleting the CRD removes its objects and stops serving the resource.
    crds.delete("realms.example.com", &DeleteParams::default())
        .await
        .expect("delete CRD");
    // (At once in the emulator; a real server first deletes the objects, then the CRD.)
    eventually("the resource is no longer served", || async {
        match realms.list(&Default::default()).await {
            Err(kube::Error::Api(s)) => s.code == 404,
            Ok(_) => false,
            other => panic!("expected 404 after CRD deletion, got {other:?}"),
        }
    })
    .await;
    })
    .await;
}

#[tokio::test]
async fn shutdown_ends_open_watches_and_stops_listening() {
    let (emulator, client) = start().await;
    let addr = emulator.addr();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut stream = pods
        .watch(&WatchParams::default(), "0")
        .await
        .expect("watch")
        .boxed();
    pods.create(&PostParams::default(), &pod("before"))
        .await
        .expect("create");
    assert!(matches!(
        stream.next().await,
        Some(Ok(WatchEvent::Added(_)))
    ));
    emulator.shutdown().await;
    // The stream ends (cleanly or with a transport error) instead of hanging.
    let rest = tokio::time::timeout(Duration::from_secs(30), stream.collect::<Vec<_>>()).await;
    assert!(rest.is_ok(), "watch stream did not end after shutdown");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening after shutdown"
    );
}

#[tokio::test]
async fn events_are_shared_between_the_two_event_apis() {
    use k8s_openapi::api::core::v1::Event as CoreEvent;
    use k8s_openapi::api::events::v1::Event as NewEvent;
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};

    on_each(backends("events").await, async |b| {
        let client = b.client.clone();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &b.ns);
        let p = pods
            .create(&PostParams::default(), &pod("evented"))
            .await
            .expect("create");
        let reporter = Reporter {
            controller: "test-controller".into(),
            instance: Some("i-1".into()),
        };
        let recorder = Recorder::new(client.clone(), reporter);
        let event = Event {
            type_: EventType::Normal,
            reason: "Routed".into(),
            note: Some("pod joined the routing table".into()),
            action: "Route".into(),
            secondary: None,
        };
        recorder
            .publish(&event, &p.object_ref(&()))
            .await
            .expect("publish");
        recorder
            .publish(&event, &p.object_ref(&()))
            .await
            .expect("publish again (series)");

        // Recorded through events.k8s.io/v1, read through core/v1 with kubectl-describe-style selectors.
        let core: Api<CoreEvent> = Api::namespaced(client.clone(), &b.ns);
        let lp = kube::api::ListParams::default()
            .fields("involvedObject.name=evented,involvedObject.kind=Pod");
        let listed = core.list(&lp).await.expect("list core events");
        assert_eq!(
            listed.items.len(),
            1,
            "repeated events are one object with a series"
        );
        let e = &listed.items[0];
        assert_eq!(e.message.as_deref(), Some("pod joined the routing table"));
        assert_eq!(e.reporting_component.as_deref(), Some("test-controller"));
        assert_eq!(e.involved_object.uid, p.metadata.uid);

        // And the other way round: a core event shows up in events.k8s.io/v1, also on watches.
        let new_api: Api<NewEvent> = Api::namespaced(client.clone(), &b.ns);
        let mut stream = new_api
            .watch(&WatchParams::default(), "0")
            .await
            .expect("watch")
            .boxed();
        let core_event: CoreEvent = serde_json::from_value(json!({
            "metadata": {"name": "legacy"}, "involvedObject": {"kind": "Pod", "name": "evented", "namespace": b.ns},
            "reason": "Old", "message": "from core", "type": "Warning"
        }))
        .expect("event");
        core.create(&PostParams::default(), &core_event)
            .await
            .expect("create core event");
        let mut received = Vec::new();
        while received.len() < 2 {
            match stream.next().await.expect("stream open").expect("event") {
                WatchEvent::Added(e) | WatchEvent::Modified(e) => received.push(e),
                _ => {}
            }
        }
        // The first event is the initial (replayed) one for the recorded event: converted once,
        // with every field intact.
        let first = &received[0];
        assert_eq!(
            first.note.as_deref(),
            Some("pod joined the routing table"),
            "{first:?}"
        );
        assert_eq!(
            first.regarding.as_ref().and_then(|r| r.name.as_deref()),
            Some("evented"),
            "{first:?}"
        );
        assert_eq!(
            first.reporting_controller.as_deref(),
            Some("test-controller")
        );
        let notes: Vec<String> = received
            .iter()
            .map(|e| e.note.clone().unwrap_or_default())
            .collect();
        assert!(notes.contains(&"from core".to_string()), "{notes:?}");
        drop(stream);

        // Field selectors apply to initial events too.
        let mut selected = new_api
            .watch(
                &WatchParams::default().fields("regarding.name=evented,reason=Routed"),
                "0",
            )
            .await
            .expect("watch with a field selector")
            .boxed();
        match tokio::time::timeout(std::time::Duration::from_secs(60), selected.next())
            .await
            .expect("the initial event arrives")
            .expect("stream open")
            .expect("event")
        {
            WatchEvent::Added(e) => {
                assert_eq!(e.reason.as_deref(), Some("Routed"));
                assert_eq!(e.note.as_deref(), Some("pod joined the routing table"));
            }
            other => panic!("expected the initial ADDED, got {other:?}"),
        }
        drop(selected);
        let fetched = new_api.get("legacy").await.expect("get as events.k8s.io");
        assert_eq!(
            fetched.regarding.and_then(|r| r.name).as_deref(),
            Some("evented")
        );
        assert_eq!(fetched.type_.as_deref(), Some("Warning"));
    })
    .await;
}

#[tokio::test]
async fn secrets_fold_string_data_and_services_are_served() {
    use k8s_openapi::api::core::v1::{Secret, Service};
    on_each(backends("secrets").await, async |b| {
        let client = b.client.clone();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &b.ns);
        let s: Secret = serde_json::from_value(
            json!({"metadata": {"name": "db"}, "stringData": {"password": "foobar"}}),
        )
        .expect("secret");
        let created = secrets
            .create(&PostParams::default(), &s)
            .await
            .expect("create");
        assert!(created.string_data.is_none());
        let data = created.data.expect("data");
        assert_eq!(data["password"].0, b"foobar".to_vec());

        let services: Api<Service> = Api::namespaced(client.clone(), &b.ns);
        let svc: Service = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}))
        .expect("service");
        services
            .create(&PostParams::default(), &svc)
            .await
            .expect("create service");
        assert_eq!(
            services
                .list(&Default::default())
                .await
                .expect("list")
                .items
                .len(),
            1
        );
    })
    .await;
}

#[tokio::test]
async fn multi_version_crds_share_objects() {
    on_each(backends("multi-version").await, async |b| {
    let client = b.client.clone();
    let schema = json!({"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object",
        "properties": {"n": {"type": "integer"}}}}}});
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "dials.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
            "names": {"plural": "dials", "singular": "dial", "kind": "Dial"},
            "versions": [
                {"name": "v1beta1", "served": true, "storage": false, "schema": schema},
                {"name": "v1", "served": true, "storage": true, "schema": schema}
            ]}
    });
    install_crd(b, crd).await;
    let at = |version: &str| {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("example.com", version, "Dial"),
            "dials",
        );
        Api::<DynamicObject>::namespaced_with(client.clone(), &b.ns, &ar)
    };
    let (beta, v1) = (at("v1beta1"), at("v1"));
    let mut stream = v1
        .watch(&WatchParams::default(), "0")
        .await
        .expect("watch")
        .boxed();
    let obj: DynamicObject =
        serde_json::from_value(json!({"apiVersion": "example.com/v1beta1", "kind": "Dial",
        "metadata": {"name": "d"}, "spec": {"n": 1}}))
        .expect("dial");
    beta.create(&PostParams::default(), &obj)
        .await
        .expect("create via v1beta1");
    let got = v1.get("d").await.expect("get via v1");
    assert_eq!(
        got.types.map(|t| t.api_version).as_deref(),
        Some("example.com/v1")
    );
    assert_eq!(got.data["spec"]["n"], 1);
    // Bookmarks may come first (a real server sends one whenever it likes).
    let mut first = stream.next().await;
    while matches!(first, Some(Ok(WatchEvent::Bookmark(_)))) {
        first = stream.next().await;
    }
    match first {
        Some(Ok(WatchEvent::Added(o))) => {
            assert_eq!(
                o.types.map(|t| t.api_version).as_deref(),
                Some("example.com/v1")
            );
        }
        other => panic!("expected ADDED, got {other:?}"),
    }
    })
    .await;
}

#[tokio::test]
async fn load_yaml_creates_documents_in_order() {
    let (emulator, client) = start().await;
    let text = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: notes.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: notes, singular: note, kind: Note}
  versions:
  - {name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}
---
apiVersion: v1
kind: Namespace
metadata: {name: notes}
---
apiVersion: v1
kind: List
items:
- {apiVersion: example.com/v1, kind: Note, metadata: {name: a, namespace: notes}, text: hello}
- {apiVersion: example.com/v1, kind: Note, metadata: {name: b, namespace: notes}, text: world}
"#;
    assert_eq!(emulator.control().load_yaml(text).expect("load"), 4);
    let notes = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Note"),
        "notes",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "notes", &notes);
    let names: Vec<String> = api
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert_eq!(names, vec!["a", "b"]);
    assert!(emulator.control().load_yaml("kind: [broken").is_err());
    emulator.shutdown().await;
}

#[tokio::test]
async fn await_condition_and_replace_status_work() {
    use kube::runtime::wait::{await_condition, conditions};
    let (emulator, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("waiter"))
        .await
        .expect("create");
    let running = tokio::spawn(await_condition(
        pods.clone(),
        "waiter",
        conditions::is_pod_running(),
    ));
    emulator
        .control()
        .set_pod_phase("default", "waiter", "Running")
        .expect("phase");
    let pod = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("condition reached in time")
        .expect("join")
        .expect("watch ok")
        .expect("pod exists");
    assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Running"));

    // PUT /status replaces only the status.
    let mut current = pods.get_status("waiter").await.expect("get_status");
    current.status.as_mut().expect("status").phase = Some("Succeeded".into());
    current.spec.as_mut().expect("spec").active_deadline_seconds = Some(5);
    let replaced = pods
        .replace_status("waiter", &PostParams::default(), &current)
        .await
        .expect("replace_status");
    assert_eq!(
        replaced.status.and_then(|s| s.phase).as_deref(),
        Some("Succeeded")
    );
    assert_eq!(
        replaced.spec.and_then(|s| s.active_deadline_seconds),
        None,
        "spec untouched"
    );
    let uid = pod_uid(&pods).await;
    let (gone, ()) = tokio::join!(
        tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(pods.clone(), "waiter", conditions::is_deleted(&uid)),
        ),
        async {
            // Finished pods have no grace period: the delete removes it at once.
            pods.delete("waiter", &DeleteParams::default())
                .await
                .expect("delete finished pod");
        }
    );
    gone.expect("deleted in time").expect("watch ok");
    assert!(pods.get_opt("waiter").await.expect("get").is_none());
    emulator.shutdown().await;
}

async fn pod_uid(pods: &Api<Pod>) -> String {
    pods.get("waiter")
        .await
        .expect("get")
        .metadata
        .uid
        .expect("uid")
}
