//! A kube-rs Controller reconciling a small CRD on each backend.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::watcher;
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{backends, eventually, install_crd, on_each};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "demo.example.com",
    version = "v1",
    kind = "Gadget",
    namespaced,
    status = "GadgetStatus"
)]
pub(crate) struct GadgetSpec {
    pub size: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
pub(crate) struct GadgetStatus {
    pub doubled: u32,
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct ReconcileError(#[from] kube::Error);

const FINALIZER: &str = "demo.example.com/cleanup";

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct FinalizerError(#[from] finalizer::Error<ReconcileError>);

/// Uses the kube-runtime finalizer helper (JSON patches with `test` ops) and
/// server-side apply on the status subresource, as typical operators do.
async fn reconcile(gadget: Arc<Gadget>, api: Arc<Api<Gadget>>) -> Result<Action, FinalizerError> {
    let inner = api.clone();
    Ok(finalizer(&api, FINALIZER, gadget, |event| async move {
        match event {
            finalizer::Event::Apply(g) => {
                let status = serde_json::json!({
                    "apiVersion": "demo.example.com/v1", "kind": "Gadget",
                    "status": {"doubled": g.spec.size * 2}
                });
                let params = PatchParams::apply("gadget-controller").force();
                inner
                    .patch_status(&g.name_any(), &params, &Patch::Apply(status))
                    .await?;
                Ok(Action::requeue(Duration::from_secs(300)))
            }
            finalizer::Event::Cleanup(_) => Ok(Action::await_change()),
        }
    })
    .await?)
}

#[tokio::test]
async fn controller_reconciles_custom_resources() {
    on_each(backends("controller").await, async |b| {
        let client = b.client.clone();
        // The CRD from kube-derive is accepted.
        install_crd(b, serde_json::to_value(Gadget::crd()).expect("crd json")).await;
        let gadgets: Api<Gadget> = Api::namespaced(client.clone(), &b.ns);
        let ctx = Arc::new(gadgets.clone());
        let controller = Controller::new(gadgets.clone(), watcher::Config::default())
            .run(
                reconcile,
                |_, e, _| {
                    eprintln!("reconcile error: {e:?}");
                    Action::requeue(Duration::from_millis(200))
                },
                ctx,
            )
            .for_each(|_| async {});
        let task = tokio::spawn(controller);

        for i in 1..=5u32 {
            let g = Gadget::new(&format!("g{i}"), GadgetSpec { size: i });
            gadgets
                .create(&PostParams::default(), &g)
                .await
                .expect("create");
        }
        let all_doubled = || async {
            let list = gadgets.list(&Default::default()).await.expect("list");
            list.items.len() == 5
                && list
                    .items
                    .iter()
                    .all(|g| g.status.as_ref().map(|s| s.doubled) == Some(g.spec.size * 2))
        };
        eventually("every gadget reconciled", all_doubled).await;

        gadgets
            .patch(
                "g3",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"size": 10}})),
            )
            .await
            .expect("update spec");
        eventually("spec change reconciled", || async {
            gadgets
                .get("g3")
                .await
                .expect("get")
                .status
                .map(|s| s.doubled)
                == Some(20)
        })
        .await;
        let g3 = gadgets.get("g3").await.expect("get");
        assert_eq!(g3.finalizers(), [FINALIZER.to_string()]);
        assert_eq!(g3.spec.size, 10, "status apply leaves spec alone");

        // Deletion waits for the controller to remove its finalizer.
        gadgets
            .delete("g3", &Default::default())
            .await
            .expect("delete");
        eventually("finalizer cleanup completes deletion", || async {
            gadgets.get_opt("g3").await.expect("get").is_none()
        })
        .await;
        task.abort();
    })
    .await;
}
