//! Details a 1.34 API server gets right that clients notice: server-maintained labels
//! and the shape of server-side apply conflicts.

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::{backends, on_each};

#[tokio::test]
async fn namespaces_carry_their_name_label() {
    on_each(backends("ns-label").await, async |b| {
        let client = b.client.clone();
        let namespaces: Api<Namespace> = Api::all(client);
        let label = |ns: &Namespace| {
            ns.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/metadata.name"))
                .cloned()
        };
        let default = namespaces.get("default").await.expect("default");
        assert_eq!(label(&default).as_deref(), Some("default"));
        let apps = format!("{}-apps", b.ns);
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": apps, "labels": {"team": "a"}}}))
                .expect("ns");
        let created = namespaces
            .create(&PostParams::default(), &ns)
            .await
            .expect("create");
        assert_eq!(label(&created).as_deref(), Some(apps.as_str()));
        // A write that drops or changes it gets it back.
        let patched = namespaces
        .patch(
            &apps,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"kubernetes.io/metadata.name": null, "team": "b"}}}),
            ),
        )
        .await
        .expect("patch");
        assert_eq!(label(&patched).as_deref(), Some(apps.as_str()));
        assert_eq!(
            patched
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("team"))
                .map(String::as_str),
            Some("b")
        );
        namespaces
            .delete(&apps, &kube::api::DeleteParams::default())
            .await
            .expect("delete");
    })
    .await;
}

#[tokio::test]
async fn apply_conflicts_name_manager_and_field() {
    on_each(backends("apply-conflicts").await, async |b| {
        let client = b.client.clone();
        let cms: Api<ConfigMap> = Api::namespaced(client, &b.ns);
        let applied = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "shared"}, "data": {"mode": "a", "size": "1"}});
        cms.patch(
            "shared",
            &PatchParams::apply("first"),
            &Patch::Apply(&applied),
        )
        .await
        .expect("first apply");
        let other = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "shared"}, "data": {"mode": "b"}});
        let err = cms
            .patch(
                "shared",
                &PatchParams::apply("second"),
                &Patch::Apply(&other),
            )
            .await
            .expect_err("conflict");
        let kube::Error::Api(status) = err else {
            panic!("expected a Status, got {err:?}");
        };
        assert_eq!(status.code, 409);
        assert_eq!(status.reason, "Conflict");
        assert_eq!(
            status.message,
            "Apply failed with 1 conflict: conflict with \"first\": .data.mode"
        );
        let causes = status
            .details
            .as_ref()
            .map(|d| d.causes.clone())
            .unwrap_or_default();
        assert_eq!(causes.len(), 1, "{status:?}");
        assert_eq!(causes[0].reason, "FieldManagerConflict");
        assert_eq!(causes[0].field, ".data.mode");
        assert_eq!(causes[0].message, "conflict with \"first\"");

        let both = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "shared"}, "data": {"mode": "c", "size": "2"}});
        let err = cms
            .patch(
                "shared",
                &PatchParams::apply("second"),
                &Patch::Apply(&both),
            )
            .await
            .expect_err("conflicts");
        let kube::Error::Api(status) = err else {
            panic!("expected a Status, got {err:?}");
        };
        assert_eq!(
            status.message,
            "Apply failed with 2 conflicts: conflicts with \"first\":\n- .data.mode\n- .data.size"
        );
    })
    .await;
}
