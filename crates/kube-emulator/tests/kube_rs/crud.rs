//! Every verb through `kube::Api`, with the error codes clients depend on.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::ResourceExt;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, Preconditions,
    WatchEvent, WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::Discovery;
use kube_emulator::Fault;
use serde_json::json;

use crate::{Backend, backends, eventually, install_crd, on_each, start, widget_crd};

fn pod(name: &str, labels: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        // Scheduled: unscheduled pods are deleted at once, without a grace period.
        "spec": {"nodeName": crate::IDLE_NODE, "containers": [{"name": "main", "image": "busybox"}]}
    }))
    .expect("pod")
}

fn api_error(err: kube::Error) -> kube::core::Status {
    match err {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

pub(crate) fn widgets_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    )
}

pub(crate) async fn install_widgets(b: &Backend) {
    install_crd(b, widget_crd()).await;
}

#[tokio::test]
async fn discovery_lists_builtins_and_custom_resources() {
    on_each(backends("discovery").await, async |b| {
        let client = b.client.clone();
        let version = client.apiserver_version().await.expect("version");
        assert_eq!(version.major, "1");
        install_widgets(b).await;
        let discovery = Discovery::new(client.clone())
            .run()
            .await
            .expect("discovery");
        let mut found = Vec::new();
        for group in discovery.groups() {
            for (ar, _) in group.recommended_resources() {
                found.push(format!("{}/{}", ar.group, ar.plural));
            }
        }
        for expected in [
            "/pods",
            "/namespaces",
            "/events",
            "events.k8s.io/events",
            "coordination.k8s.io/leases",
            "/nodes",
            "/secrets",
            "/services",
            "apps/deployments",
            "apps/replicasets",
            "apiextensions.k8s.io/customresourcedefinitions",
            "example.com/widgets",
        ] {
            assert!(
                found.contains(&expected.to_string()),
                "{expected} missing from {found:?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn create_get_list_and_errors() {
    on_each(backends("crud-basics").await, async |b| {
        let client = b.client.clone();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &b.ns);
        let created = pods
            .create(
                &PostParams::default(),
                &pod("a", json!({"app": "web", "tier": "front"})),
            )
            .await
            .expect("create");
        let meta = &created.metadata;
        assert!(
            meta.uid.is_some()
                && meta.creation_timestamp.is_some()
                && meta.resource_version.is_some()
        );
        assert_eq!(
            created.status.and_then(|s| s.phase).as_deref(),
            Some("Pending")
        );

        let err = api_error(
            pods.create(&PostParams::default(), &pod("a", json!({})))
                .await
                .expect_err("duplicate"),
        );
        assert_eq!((err.code, err.reason.as_str()), (409, "AlreadyExists"));
        let err = api_error(pods.get("missing").await.expect_err("missing"));
        assert_eq!((err.code, err.reason.as_str()), (404, "NotFound"));
        let nowhere: Api<Pod> = Api::namespaced(client.clone(), "nowhere");
        let err = api_error(
            nowhere
                .create(&PostParams::default(), &pod("x", json!({})))
                .await
                .expect_err("no ns"),
        );
        assert_eq!(err.code, 404);
        let mut bad = pod("bad", json!({}));
        bad.spec.as_mut().expect("spec").containers.clear();
        let err = api_error(
            pods.create(&PostParams::default(), &bad)
                .await
                .expect_err("invalid"),
        );
        assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
        assert!(err.message.contains("spec.containers"), "{}", err.message);

        pods.create(
            &PostParams::default(),
            &pod("b", json!({"app": "db", "tier": "back"})),
        )
        .await
        .expect("b");
        pods.create(&PostParams::default(), &pod("c", json!({"app": "web"})))
            .await
            .expect("c");
        let names = |list: kube::core::ObjectList<Pod>| -> Vec<String> {
            list.items
                .into_iter()
                .map(|p| p.metadata.name.unwrap_or_default())
                .collect()
        };
        for (selector, expected) in [
            ("app=web", vec!["a", "c"]),
            ("app==web,tier", vec!["a"]),
            ("app!=web", vec!["b"]),
            ("app in (db,cache)", vec!["b"]),
            ("app notin (db)", vec!["a", "c"]),
            ("!tier", vec!["c"]),
        ] {
            let got = names(
                pods.list(&ListParams::default().labels(selector))
                    .await
                    .expect("list"),
            );
            assert_eq!(got, expected, "selector {selector}");
        }
        // Through the status subresource, as a kubelet writes it (on both servers).
        pods.patch_status(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .expect("phase");
        let running = names(
            pods.list(&ListParams::default().fields("status.phase=Running"))
                .await
                .expect("list"),
        );
        assert_eq!(running, vec!["b"]);
        let by_name = names(
            pods.list(&ListParams::default().fields("metadata.name=c"))
                .await
                .expect("list"),
        );
        assert_eq!(by_name, vec!["c"]);
        let err = api_error(
            pods.list(&ListParams::default().fields("spec.bogus=1"))
                .await
                .expect_err("bad field"),
        );
        assert_eq!(err.code, 400);

        // Pagination returns every object exactly once.
        let mut seen = Vec::new();
        let mut params = ListParams::default().limit(2);
        loop {
            let page = pods.list(&params).await.expect("page");
            assert!(page.items.len() <= 2);
            let token = page.metadata.continue_.clone();
            seen.extend(names(page));
            match token {
                Some(t) if !t.is_empty() => params = params.continue_token(&t),
                _ => break,
            }
        }
        assert_eq!(seen, vec!["a", "b", "c"]);

        // The cluster-wide list holds the three (a shared real server holds other
        // scenarios' pods besides).
        let all: Api<Pod> = Api::all(client.clone());
        let mine = all
            .list(&ListParams::default())
            .await
            .expect("all")
            .items
            .into_iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(b.ns.as_str()))
            .count();
        assert_eq!(mine, 3);
    })
    .await;
}

/// Emulator-only: on a real cluster kube-controller-manager's deployment controller writes
/// the Deployment's status right after each change, so the stale-write and status steps
/// would race it (the emulator's controllers are off here).
#[tokio::test]
async fn replace_uses_optimistic_concurrency_and_tracks_generation() {
    let (emulator, client) = start().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}
    })).expect("deployment");
    let created = deployments
        .create(&PostParams::default(), &d)
        .await
        .expect("create");
    assert_eq!(created.metadata.generation, Some(1));

    let mut labelled = created.clone();
    labelled.metadata.labels = Some([("x".to_string(), "y".to_string())].into());
    let labelled = deployments
        .replace("web", &PostParams::default(), &labelled)
        .await
        .expect("label");
    assert_eq!(
        labelled.metadata.generation,
        Some(1),
        "metadata changes keep generation"
    );

    let mut scaled = labelled.clone();
    scaled.spec.as_mut().expect("spec").replicas = Some(3);
    let scaled = deployments
        .replace("web", &PostParams::default(), &scaled)
        .await
        .expect("scale");
    assert_eq!(scaled.metadata.generation, Some(2));

    // Writing with the stale version loses.
    let err = api_error(
        deployments
            .replace("web", &PostParams::default(), &labelled)
            .await
            .expect_err("stale"),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));

    // Status is a subresource for deployments: the main endpoint ignores it.
    let mut with_status = scaled.clone();
    with_status.status = Some(serde_json::from_value(json!({"replicas": 7})).expect("status"));
    let after = deployments
        .replace("web", &PostParams::default(), &with_status)
        .await
        .expect("replace");
    assert!(after.status.and_then(|s| s.replicas).is_none());
    let status = deployments
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 7}})),
        )
        .await
        .expect("status patch");
    assert_eq!(status.status.and_then(|s| s.replicas), Some(7));
    assert_eq!(
        status.metadata.generation,
        Some(2),
        "status writes keep generation"
    );

    // The scale subresource reads and writes spec.replicas.
    let scale = deployments.get_scale("web").await.expect("get scale");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(3));
    let scaled = deployments
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .expect("patch scale");
    assert_eq!(scaled.spec.and_then(|s| s.replicas), Some(5));
    let d = deployments.get("web").await.expect("get");
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(5));
    assert_eq!(d.metadata.generation, Some(3));
    assert_eq!(
        d.spec.and_then(|s| s.revision_history_limit),
        Some(10),
        "defaults applied on create"
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn merge_json_and_strategic_patches() {
    on_each(backends("patches").await, async |b| {
        let client = b.client.clone();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &b.ns);
        let mut p = pod("p", json!({"app": "web"}));
        p.spec
            .as_mut()
            .expect("spec")
            .containers
            .push(serde_json::from_value(json!({"name": "side", "image": "envoy:1"})).expect("c"));
        pods.create(&PostParams::default(), &p)
            .await
            .expect("create");

        let merged = pods
            .patch(
                "p",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"app": null, "new": "1"}}})),
            )
            .await
            .expect("merge");
        assert_eq!(
            merged.metadata.labels,
            Some([("new".to_string(), "1".to_string())].into())
        );

        let jp: json_patch_v4::Patch = serde_json::from_value(json!([
            {"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}},
            {"op": "replace", "path": "/spec/containers/0/image", "value": "busybox:2"}
        ]))
        .expect("json patch");
        let patched = pods
            .patch("p", &PatchParams::default(), &Patch::<()>::Json(jp))
            .await
            .expect("json patch");
        assert_eq!(
            patched.spec.as_ref().expect("spec").containers[0]
                .image
                .as_deref(),
            Some("busybox:2")
        );
        let failing: json_patch_v4::Patch = serde_json::from_value(
            json!([{"op": "test", "path": "/metadata/name", "value": "other"}]),
        )
        .expect("patch");
        let err = api_error(
            pods.patch("p", &PatchParams::default(), &Patch::<()>::Json(failing))
                .await
                .expect_err("test op"),
        );
        assert_eq!(err.code, 422);

        // Strategic merge: containers merge by name instead of being replaced.
        let sm = pods
            .patch(
                "p",
                &PatchParams::default(),
                &Patch::Strategic(
                    json!({"spec": {"containers": [{"name": "side", "image": "envoy:2"}]}}),
                ),
            )
            .await
            .expect("strategic");
        let containers = sm.spec.expect("spec").containers;
        assert_eq!(containers.len(), 2);
        assert_eq!(containers[0].image.as_deref(), Some("busybox:2"));
        assert_eq!(containers[1].image.as_deref(), Some("envoy:2"));

        // A patch carrying a stale resourceVersion is a conflict.
        let err = api_error(
            pods.patch(
                "p",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"resourceVersion": "1", "labels": {"z": "z"}}})),
            )
            .await
            .expect_err("stale patch"),
        );
        assert_eq!(err.code, 409);
        let err = api_error(
            pods.patch("nope", &PatchParams::default(), &Patch::Merge(json!({})))
                .await
                .expect_err("missing"),
        );
        assert_eq!(err.code, 404);
    })
    .await;
}

#[tokio::test]
async fn server_side_apply_creates_merges_and_detects_conflicts() {
    on_each(backends("ssa").await, async |b| {
    let client = b.client.clone();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &b.ns);
    let apply = |manager: &str, force: bool| {
        let mut p = PatchParams::apply(manager);
        p.force = force;
        p
    };
    let first = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"owner": "alice", "a": "1"}});
    let created = cms
        .patch("cfg", &apply("alice", false), &Patch::Apply(&first))
        .await
        .expect("apply creates");
    assert!(
        created.metadata.generation.is_none(),
        "config maps have no generation"
    );
    let managed = created.metadata.managed_fields.clone().unwrap_or_default();
    assert_eq!(managed.len(), 1);
    assert_eq!(
        (
            managed[0].manager.as_deref(),
            managed[0].operation.as_deref()
        ),
        (Some("alice"), Some("Apply"))
    );
    let fields = managed[0]
        .fields_v1
        .as_ref()
        .map(|f| f.0.clone())
        .unwrap_or_default();
    assert_eq!(fields, json!({"f:data": {"f:a": {}, "f:owner": {}}}));
    assert_eq!(
        created
            .data
            .as_ref()
            .and_then(|d| d.get("a"))
            .map(String::as_str),
        Some("1")
    );

    let bob = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"owner": "bob", "b": "2"}});
    let err = api_error(
        cms.patch("cfg", &apply("bob", false), &Patch::Apply(&bob))
            .await
            .expect_err("conflict"),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    let forced = cms
        .patch("cfg", &apply("bob", true), &Patch::Apply(&bob))
        .await
        .expect("force");
    let owners_of_owner: Vec<String> = forced
        .metadata
        .managed_fields
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer("/f:data/f:owner").is_some())
        })
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(owners_of_owner, vec!["bob"], "force transfers ownership");
    let data = forced.data.expect("data");
    assert_eq!(data.get("owner").map(String::as_str), Some("bob"));
    assert_eq!(data.get("a").map(String::as_str), Some("1"));

    // Alice drops field `a` from her configuration: the server removes it.
    let shrink =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {}});
    let after = cms
        .patch("cfg", &apply("alice", false), &Patch::Apply(&shrink))
        .await
        .expect("shrink");
    let data = after.data.expect("data");
    assert!(!data.contains_key("a"), "{data:?}");
    assert_eq!(data.get("b").map(String::as_str), Some("2"));

    // One manager applying spec and status separately: the subresources are owned
    // separately, so neither apply removes the other's fields.
    install_widgets(b).await;
    let widgets: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &b.ns, &widgets_resource());
    let spec = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 2}});
    widgets
        .patch("w", &apply("ctl", true), &Patch::Apply(&spec))
        .await
        .expect("apply spec");
    let status = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "status": {"observed": 2}});
    let w = widgets
        .patch_status("w", &apply("ctl", true), &Patch::Apply(&status))
        .await
        .expect("apply status");
    assert_eq!(
        (
            w.data["spec"]["size"].as_i64(),
            w.data["status"]["observed"].as_i64()
        ),
        (Some(2), Some(2))
    );
    let w = widgets
        .patch("w", &apply("ctl", true), &Patch::Apply(&spec))
        .await
        .expect("re-apply spec");
    assert_eq!(w.data["status"]["observed"], 2);
    let invalid = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 0}});
    let err = api_error(
        widgets
            .patch("w", &apply("ctl", true), &Patch::Apply(&invalid))
            .await
            .expect_err("invalid apply"),
    );
    assert_eq!(err.code, 422);

    // Built-in keyed lists merge by key: two managers each own one container. (In a pod
    // template: a pod's own container list cannot change after creation.)
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &b.ns);
    let main = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ssa"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "ssa"}},
            "template": {"metadata": {"labels": {"app": "ssa"}},
                "spec": {"containers": [{"name": "main", "image": "app:1"}]}}}});
    deployments
        .patch("ssa", &apply("app", false), &Patch::Apply(&main))
        .await
        .expect("apply main");
    let side = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ssa"},
        "spec": {"template": {"spec": {"containers": [{"name": "proxy", "image": "proxy:1"}]}}}});
    let merged = deployments
        .patch("ssa", &apply("mesh", false), &Patch::Apply(&side))
        .await
        .expect("apply sidecar");
    let names: Vec<String> = merged
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec")
        .containers
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["main", "proxy"]);
    })
    .await;
}

#[tokio::test]
async fn custom_resources_are_validated_and_have_a_status_subresource() {
    on_each(backends("cr-validation").await, async |b| {
    let client = b.client.clone();
    install_widgets(b).await;
    let widgets: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &b.ns, &widgets_resource());
    let w = |spec: serde_json::Value| -> DynamicObject {
        serde_json::from_value(json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": spec})).expect("widget")
    };
    let err = api_error(
        widgets
            .create(
                &PostParams::default(),
                &w(json!({"size": 11, "color": "green", "owner": "Bob1"})),
            )
            .await
            .expect_err("invalid"),
    );
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    for field in ["spec.size", "spec.color", "spec.owner"] {
        assert!(
            err.message.contains(field),
            "{field} not in {}",
            err.message
        );
    }
    let err = api_error(
        widgets
            .create(&PostParams::default(), &w(json!({"color": "red"})))
            .await
            .expect_err("required"),
    );
    assert!(err.message.contains("spec.size"), "{}", err.message);
    let err = api_error(
        widgets
            .create(&PostParams::default(), &w(json!({"size": "big"})))
            .await
            .expect_err("type"),
    );
    assert_eq!(err.code, 422);

    let mut ok = w(json!({"size": 2, "unknown": true}));
    ok.data["status"] = json!({"observed": 5});
    let created = widgets
        .create(&PostParams::default(), &ok)
        .await
        .expect("valid");
    assert_eq!(
        created.data["spec"],
        json!({"size": 2}),
        "unknown fields are pruned"
    );
    assert!(
        created.data.get("status").is_none(),
        "status is ignored on create"
    );

    let status = widgets
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 9}, "status": {"observed": 1}})),
        )
        .await
        .expect("status");
    assert_eq!(status.data["status"]["observed"], 1);
    assert_eq!(status.data["spec"]["size"], 2, "/status ignores spec");
    assert_eq!(status.metadata.generation, Some(1));
    let main = widgets
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 3}, "status": {"observed": 99}})),
        )
        .await
        .expect("main");
    assert_eq!(
        main.data["status"]["observed"], 1,
        "main endpoint ignores status"
    );
    assert_eq!(main.metadata.generation, Some(2));
    let err = api_error(
        widgets
            .patch_status(
                "w",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"observed": "x"}})),
            )
            .await
            .expect_err("bad status"),
    );
    assert_eq!(err.code, 422);
    let err = api_error(
        widgets
            .patch(
                "w",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"size": 4}})),
            )
            .await
            .expect_err("strategic on CR"),
    );
    assert_eq!(err.code, 415);
    })
    .await;
}

#[tokio::test]
async fn pod_deletion_honours_grace_periods_finalizers_and_preconditions() {
    on_each(backends("deletion").await, async |b| {
        let client = b.client.clone();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &b.ns);
        let created = pods
            .create(&PostParams::default(), &pod("slow", json!({})))
            .await
            .expect("create");
        let mut events = pods
            .watch(
                &WatchParams::default().fields("metadata.name=slow"),
                created.metadata.resource_version.as_deref().expect("rv"),
            )
            .await
            .expect("watch")
            .boxed();
        let pending = pods
            .delete("slow", &DeleteParams::default().grace_period(600))
            .await
            .expect("delete");
        let marked = pending.left().expect("pod is still terminating");
        assert!(marked.metadata.deletion_timestamp.is_some());
        assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(600));
        assert!(
            pods.get("slow").await.is_ok(),
            "pod survives until its grace period ends"
        );
        // A forced delete (grace 0) ends the grace period now; a kubelet would do this once the
        // containers stopped (the emulator-only test below ends it through its hook).
        pods.delete("slow", &DeleteParams::default().grace_period(0))
            .await
            .expect("forced delete");
        assert_eq!(
            api_error(pods.get("slow").await.expect_err("gone")).code,
            404
        );
        // Watchers see the marking (MODIFIED with deletionTimestamp), the forced delete's
        // write of a zero grace period (MODIFIED), then the removal.
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let event = tokio::time::timeout(std::time::Duration::from_secs(60), events.try_next())
                .await
                .expect("watch event arrives")
                .expect("watch event")
                .expect("stream open");
            match event {
                WatchEvent::Modified(p) => {
                    assert!(
                        p.metadata.deletion_timestamp.is_some(),
                        "MODIFIED carries deletionTimestamp"
                    );
                    seen.push("MODIFIED");
                }
                WatchEvent::Deleted(p) => {
                    assert!(p.metadata.deletion_timestamp.is_some());
                    seen.push("DELETED");
                }
                WatchEvent::Bookmark(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen, ["MODIFIED", "MODIFIED", "DELETED"]);
        drop(events);

        pods.create(&PostParams::default(), &pod("quick", json!({})))
            .await
            .expect("create");
        pods.delete("quick", &DeleteParams::default().grace_period(0))
            .await
            .expect("delete");
        assert_eq!(
            api_error(pods.get("quick").await.expect_err("gone")).code,
            404
        );

        // Preconditions.
        let p = pods
            .create(&PostParams::default(), &pod("pre", json!({})))
            .await
            .expect("create");
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some("not-the-uid".into()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        assert_eq!(
            api_error(pods.delete("pre", &dp).await.expect_err("precondition")).code,
            409
        );
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: p.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        pods.delete("pre", &dp)
            .await
            .expect("delete with matching uid");

        // Finalizers hold objects until cleared.
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &b.ns);
        let cm: ConfigMap = serde_json::from_value(
            json!({"metadata": {"name": "held", "finalizers": ["example.com/hold"]}}),
        )
        .expect("cm");
        cms.create(&PostParams::default(), &cm)
            .await
            .expect("create");
        let pending = cms
            .delete("held", &DeleteParams::default())
            .await
            .expect("delete");
        assert!(pending.is_left(), "finalizer keeps the object");
        assert!(
            cms.get("held")
                .await
                .expect("still there")
                .metadata
                .deletion_timestamp
                .is_some()
        );
        cms.patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("clear");
        assert!(cms.get_opt("held").await.expect("get").is_none());

        // deletecollection by label.
        for (name, tier) in [("x1", "a"), ("x2", "a"), ("x3", "b")] {
            cms.create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"metadata": {"name": name, "labels": {"tier": tier}}}),
                )
                .expect("cm"),
            )
            .await
            .expect("create");
        }
        cms.delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("tier=a"),
        )
        .await
        .expect("deletecollection");
        // Among the labelled ones: a real server also keeps `kube-root-ca.crt` in every
        // namespace (a listed difference).
        let left: Vec<String> = cms
            .list(&ListParams::default().labels("tier"))
            .await
            .expect("list")
            .items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect();
        assert_eq!(left, vec!["x3"]);
    })
    .await;
}

/// Emulator-only: the emulator removes a pod when its grace period ends (on a real cluster the
/// pod's kubelet does, and the real lane's pods on `IDLE_NODE` have none), and
/// `expire_grace_periods` is a hook.
#[tokio::test]
async fn grace_periods_end_without_a_kubelet() {
    let (emulator, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("slow", json!({})))
        .await
        .expect("create");
    pods.delete("slow", &DeleteParams::default().grace_period(600))
        .await
        .expect("delete");
    assert!(pods.get_opt("slow").await.expect("get").is_some());
    emulator.control().expire_grace_periods();
    assert!(pods.get_opt("slow").await.expect("get").is_none());

    // A short grace period ends on its own.
    pods.create(&PostParams::default(), &pod("short", json!({})))
        .await
        .expect("create");
    pods.delete("short", &DeleteParams::default().grace_period(1))
        .await
        .expect("delete");
    eventually("pod with 1s grace period disappears", || async {
        pods.get_opt("short").await.expect("get").is_none()
    })
    .await;
    emulator.shutdown().await;
}

#[tokio::test]
async fn owners_and_namespaces() {
    on_each(backends("owners").await, async |b| {
        let client = b.client.clone();
        // Owners and dependents are config maps and pods: kinds no controller of a real
        // cluster acts on, so only the garbage collector changes them. It works in the
        // background there (at once in the emulator), hence `eventually`.
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &b.ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &b.ns);
        let cm = |name: &str, owner: Option<&ConfigMap>| -> ConfigMap {
            let refs: Vec<serde_json::Value> = owner
                .map(|o| {
                    json!({"apiVersion": "v1", "kind": "ConfigMap", "name": o.name_any(),
                           "uid": o.metadata.uid, "blockOwnerDeletion": true})
                })
                .into_iter()
                .collect();
            serde_json::from_value(json!({"metadata": {"name": name, "ownerReferences": refs}}))
                .expect("cm")
        };
        let owned_pod = |name: &str, owner: &ConfigMap| -> Pod {
            let mut p = pod(name, json!({}));
            p.metadata.owner_references = serde_json::from_value(json!([{"apiVersion": "v1",
                "kind": "ConfigMap", "name": owner.name_any(), "uid": owner.metadata.uid,
                "blockOwnerDeletion": true}]))
            .expect("refs");
            p
        };
        let pp = PostParams::default();

        // Background: the owner goes at once, its dependent after it.
        let d = cms.create(&pp, &cm("d", None)).await.expect("owner");
        cms.create(&pp, &cm("d-1", Some(&d)))
            .await
            .expect("dependent");
        cms.delete("d", &DeleteParams::background())
            .await
            .expect("delete owner");
        eventually("dependent collected", || async {
            cms.get_opt("d-1").await.expect("get").is_none()
        })
        .await;

        // Foreground: the owner waits, marked, until its dependents (and theirs) are gone.
        let d2 = cms.create(&pp, &cm("d2", None)).await.expect("owner");
        let d21 = cms
            .create(&pp, &cm("d2-1", Some(&d2)))
            .await
            .expect("dependent");
        pods.create(&pp, &owned_pod("worker", &d21))
            .await
            .expect("pod");
        let pending = cms
            .delete("d2", &DeleteParams::foreground())
            .await
            .expect("foreground delete");
        let marked = pending.left().expect("owner waits for dependents");
        assert!(marked.metadata.deletion_timestamp.is_some());
        assert!(
            marked
                .finalizers()
                .contains(&"foregroundDeletion".to_string())
        );
        eventually("the dependent's pod is terminating", || async {
            pods.get("worker")
                .await
                .expect("pod")
                .metadata
                .deletion_timestamp
                .is_some()
        })
        .await;
        assert!(
            cms.get_opt("d2").await.expect("get").is_some(),
            "the owner waits for the terminating pod"
        );
        // The pod's grace period ends (no kubelet here: a forced delete).
        pods.delete("worker", &DeleteParams::default().grace_period(0))
            .await
            .expect("forced delete");
        eventually("foreground chain completes", || async {
            cms.get_opt("d2").await.expect("get").is_none()
                && cms.get_opt("d2-1").await.expect("get").is_none()
        })
        .await;

        // Orphan: dependents stay and lose the owner reference.
        let rs3 = cms.create(&pp, &cm("rs3", None)).await.expect("owner");
        pods.create(&pp, &owned_pod("orphan", &rs3))
            .await
            .expect("pod");
        cms.delete("rs3", &DeleteParams::orphan())
            .await
            .expect("orphan delete");
        eventually("the orphan loses its owner reference", || async {
            pods.get("orphan")
                .await
                .expect("orphan survives")
                .metadata
                .owner_references
                .unwrap_or_default()
                .is_empty()
        })
        .await;
        eventually("the orphaning owner is gone", || async {
            cms.get_opt("rs3").await.expect("get").is_none()
        })
        .await;

        // Deleting a namespace removes what is in it, then the namespace.
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let team = format!("{}-team", b.ns);
        namespaces
            .create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"name": team}})).expect("ns"),
            )
            .await
            .expect("ns");
        let team_cms: Api<ConfigMap> = Api::namespaced(client.clone(), &team);
        team_cms.create(&pp, &cm("c", None)).await.expect("cm");
        namespaces
            .delete(&team, &DeleteParams::default())
            .await
            .expect("delete ns");
        eventually("the namespace and its objects are gone", || async {
            namespaces.get_opt(&team).await.expect("get").is_none()
        })
        .await;
        assert!(
            team_cms
                .list(&ListParams::default())
                .await
                .expect("list")
                .items
                .is_empty()
        );
    })
    .await;
}

/// Emulator-only: fault injection is a hook.
#[tokio::test]
async fn injected_faults_fail_requests_until_used_up() {
    let (emulator, client) = start().await;
    let default_pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    emulator
        .control()
        .inject(Fault::internal_errors("pods", 2).on_verb("list"));
    for _ in 0..2 {
        let err = api_error(
            default_pods
                .list(&ListParams::default())
                .await
                .expect_err("injected"),
        );
        assert_eq!((err.code, err.reason.as_str()), (500, "InternalError"));
    }
    default_pods
        .list(&ListParams::default())
        .await
        .expect("faults are used up");
    emulator.shutdown().await;
}
