//! The servers a scenario runs on: a fresh emulator, and the real kube-apiserver named by
//! `DIFF_KUBECONFIG` when it is set.

use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use kube_emulator::{Control, Emulator, EmulatorBuilder};
use serde_json::json;

/// The environment variable naming the real API server's admin kubeconfig.
const REAL_KUBECONFIG: &str = "DIFF_KUBECONFIG";

/// The node the scenarios' "scheduled" pods are bound to. On the real server it is a Node
/// object nothing runs pods on (not one of kwok's, which would start them and remove them
/// as soon as they are deleted): its pods stay Pending and terminating pods stay until a
/// forced delete, as with a stopped kubelet. It exists so that the pod garbage collector
/// leaves them alone (it deletes pods bound to missing nodes); `scripts/test-real.sh`
/// deletes it afterwards. The emulator needs no Node object for it.
pub const IDLE_NODE: &str = "idle-node";

/// One server and a namespace of the scenario's own on it.
pub struct Backend {
    /// `kube-emulator` or `kube-apiserver`, for failure messages.
    pub name: &'static str,
    pub client: Client,
    /// A fresh namespace: runs on a shared real server must not see each other's objects.
    pub ns: String,
    emulator: Option<Emulator>,
}

impl Backend {
    /// The emulator's test hooks; `None` on the real server.
    pub fn control(&self) -> Option<&Control> {
        self.emulator.as_ref().map(Emulator::control)
    }

    pub fn is_real(&self) -> bool {
        self.emulator.is_none()
    }

    /// Shuts the emulator down, or deletes the namespace on the real server (its deletion
    /// completes in the background). A failed scenario leaves its namespace behind: the
    /// real lane throws the whole cluster away.
    pub async fn finish(self) {
        if let Some(emulator) = self.emulator {
            emulator.shutdown().await;
        } else {
            let namespaces: Api<Namespace> = Api::all(self.client.clone());
            namespaces
                .delete(&self.ns, &DeleteParams::default())
                .await
                .expect("delete the scenario's namespace");
        }
    }
}

/// The backends for scenario `tag` (short, unique among the tests): an emulator started
/// with default settings, and the real server if `DIFF_KUBECONFIG` is set.
pub async fn backends(tag: &str) -> Vec<Backend> {
    backends_with(tag, Emulator::builder()).await
}

/// Like [`backends`], with the emulator started from `builder`.
pub async fn backends_with(tag: &str, builder: EmulatorBuilder) -> Vec<Backend> {
    let emulator = builder.start().await.expect("emulator starts");
    let client = emulator.client().expect("client");
    let mut out = vec![Backend {
        name: "kube-emulator",
        client,
        ns: tag.to_string(),
        emulator: Some(emulator),
    }];
    if let Ok(path) = std::env::var(REAL_KUBECONFIG) {
        let kubeconfig = Kubeconfig::read_from(&path).expect("DIFF_KUBECONFIG is a kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("kubeconfig");
        out.push(Backend {
            name: "kube-apiserver",
            client: Client::try_from(config).expect("client"),
            // Unique per run: a namespace of an earlier run may still be terminating.
            ns: format!("{tag}-{}", std::process::id()),
            emulator: None,
        });
    }
    for b in &out {
        if b.is_real() {
            create_idle_node(b).await;
        }
        create_namespace(b).await;
    }
    out
}

/// Creates [`IDLE_NODE`] unless a parallel scenario (or an earlier run) did.
async fn create_idle_node(b: &Backend) {
    let nodes: Api<Node> = Api::all(b.client.clone());
    let node: Node =
        serde_json::from_value(json!({"metadata": {"name": IDLE_NODE}})).expect("node");
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("{}: create node {IDLE_NODE}: {e}", b.name),
    }
}

/// Creates the backend's namespace and waits for its `default` ServiceAccount: the real
/// server's ServiceAccount admission refuses pods until the serviceaccount controller made it
/// (the emulator creates it with the namespace).
async fn create_namespace(b: &Backend) {
    let namespaces: Api<Namespace> = Api::all(b.client.clone());
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": b.ns}})).expect("namespace");
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("{}: create namespace {}: {e}", b.name, b.ns));
    let accounts: Api<ServiceAccount> = Api::namespaced(b.client.clone(), &b.ns);
    crate::eventually("the namespace's default ServiceAccount", || async {
        accounts.get_opt("default").await.expect("get").is_some()
    })
    .await;
}

/// Runs `scenario` on every backend in turn, naming the backend if it fails.
pub async fn on_each(backends: Vec<Backend>, scenario: impl AsyncFn(&Backend)) {
    for b in backends {
        eprintln!("scenario on {} (namespace {})", b.name, b.ns);
        scenario(&b).await;
        b.finish().await;
    }
}

/// Installs a CRD (JSON) for `b` and returns once its resource is served in `b.ns`. On the
/// emulator the create must succeed and serves at once. On the real server CRDs are
/// cluster-wide and shared by the scenarios of every run: one that exists already (same
/// spec, from a parallel scenario or an earlier run) is fine, and the resource is served a
/// moment after the CRD is Established.
pub async fn install_crd(b: &Backend, crd: serde_json::Value) {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
        "customresourcedefinitions",
    );
    let crds: Api<DynamicObject> = Api::all_with(b.client.clone(), &resource);
    let object: DynamicObject = serde_json::from_value(crd.clone()).expect("crd");
    match crds.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if b.is_real() && s.code == 409 => {}
        Err(e) => panic!("{}: create CRD: {e}", b.name),
    }
    let group = crd["spec"]["group"].as_str().expect("group");
    let plural = crd["spec"]["names"]["plural"].as_str().expect("plural");
    let version = crd["spec"]["versions"][0]["name"]
        .as_str()
        .expect("version");
    let kind = crd["spec"]["names"]["kind"].as_str().expect("kind");
    let served =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    let objects: Api<DynamicObject> = if crd["spec"]["scope"] == "Cluster" {
        Api::all_with(b.client.clone(), &served)
    } else {
        Api::namespaced_with(b.client.clone(), &b.ns, &served)
    };
    crate::eventually("the custom resource is served", || async {
        objects.list(&ListParams::default().limit(1)).await.is_ok()
    })
    .await;
}
