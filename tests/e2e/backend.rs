//! Which API server the end-to-end tests run against.
//!
//! - `E2E_BACKEND` unset or `emulator`: an in-process kube-emulator per test (the default).
//! - `E2E_BACKEND=real`: the real control plane of `scripts/control-plane.sh up DIR`
//!   (kube-apiserver, kube-controller-manager, kube-scheduler, kwok), named by
//!   `E2E_KUBECONFIG` (its admin kubeconfig, `DIR/kubeconfig`). The operator then runs with a
//!   ServiceAccount token whose permissions are exactly the chart's rendered RBAC, read from
//!   `E2E_OPERATOR_RBAC` (written by `tests/chart/operator_rbac.py`). `scripts/test-real.sh`
//!   sets all of this up.
//!
//! One real cluster serves every test of the process, so tests on it take turns (a lock
//! held by each `Cluster`) and each starts from clean namespaces.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ReplicaSet, StatefulSet};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};
use tokio::sync::{Mutex, MutexGuard};

use crate::harness::eventually;

/// The API server the tests talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Emulator,
    Real,
}

impl Backend {
    /// From `E2E_BACKEND`; anything but `emulator`/`real` is a configuration error.
    pub(crate) fn selected() -> Self {
        match std::env::var("E2E_BACKEND").as_deref() {
            Err(_) | Ok("" | "emulator") => Self::Emulator,
            Ok("real") => Self::Real,
            Ok(other) => panic!("E2E_BACKEND must be `emulator` or `real`, not {other:?}"),
        }
    }
}

/// Namespaces the scenarios use; reset before each test on the real cluster.
const TEST_NAMESPACES: &[&str] = &["apps", "other"];

/// The finalizer that holds the owners of hand-made pods in deletion (see
/// [`RealCluster::held_owner`]); removed when the namespaces are reset.
const HOLD: &str = "e2e.blockyard.io/hold";

static TURN: Mutex<()> = Mutex::const_new(());

/// A turn on the shared real cluster: admin client, and the operator's own kubeconfig.
pub(crate) struct RealCluster {
    pub admin: Client,
    /// Kubeconfig with the operator's ServiceAccount token (the chart's RBAC).
    pub operator_kubeconfig: PathBuf,
    /// `--lease-namespace`/`--lease-name` the chart's RBAC allows.
    pub lease: (String, String),
    _turn: MutexGuard<'static, ()>,
}

fn env_path(var: &str) -> PathBuf {
    let value = std::env::var(var).unwrap_or_else(|_| {
        panic!("E2E_BACKEND=real needs {var} (scripts/test-real.sh sets it up)")
    });
    PathBuf::from(value)
}

async fn client_from(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("read kubeconfig {}: {e}", path.display()));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(config).expect("client")
}

/// The operator's RBAC as rendered from the chart: objects plus the names the chart uses.
struct OperatorRbac {
    objects: Vec<Value>,
    service_account: (String, String),
    lease: (String, String),
}

fn read_rbac(path: &Path) -> OperatorRbac {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text).expect("E2E_OPERATOR_RBAC is JSON");
    let pair = |v: &Value| {
        (
            v["namespace"].as_str().expect("namespace").to_string(),
            v["name"].as_str().expect("name").to_string(),
        )
    };
    OperatorRbac {
        objects: doc["objects"].as_array().expect("objects").clone(),
        service_account: pair(&doc["serviceAccount"]),
        lease: pair(&doc["lease"]),
    }
}

/// Server-side applies `object` (any kind the server serves) as the test harness.
async fn apply(client: &Client, object: &Value) {
    let (group, version) = match object["apiVersion"].as_str().expect("apiVersion") {
        av if av.contains('/') => av
            .split_once('/')
            .map(|(g, v)| (g.to_string(), v.to_string())),
        av => Some((String::new(), av.to_string())),
    }
    .expect("apiVersion");
    let kind = object["kind"].as_str().expect("kind");
    let gvk = GroupVersionKind::gvk(&group, &version, kind);
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("discover {kind}: {e}"));
    let name = object["metadata"]["name"].as_str().expect("name");
    let api: Api<DynamicObject> = match (caps.scope, object["metadata"]["namespace"].as_str()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => {
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        _ => Api::all_with(client.clone(), &resource),
    };
    api.patch(
        name,
        &PatchParams::apply("e2e-harness").force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {kind} {name}: {e}"));
}

/// Creates namespace `name` if needed and waits for its `default` ServiceAccount.
pub(crate) async fn ensure_namespace(client: &Client, name: &str) {
    apply(
        client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    )
    .await;
    // The ServiceAccount admission plugin refuses pods until the serviceaccount controller
    // made the namespace's `default` ServiceAccount.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    eventually(
        Duration::from_secs(30),
        &format!("the default ServiceAccount of {name}"),
        || async { accounts.get_opt("default").await.ok().flatten().map(|_| ()) },
    )
    .await;
}

/// Deletes the test namespaces and waits until the namespace controller removed them; first
/// lets go of the owners held in deletion, whose finalizer would keep a namespace forever.
async fn reset_namespaces(client: &Client) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in TEST_NAMESPACES {
        release_held::<ReplicaSet>(client, ns).await;
        release_held::<StatefulSet>(client, ns).await;
    }
    for ns in TEST_NAMESPACES {
        match namespaces.delete(ns, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => panic!("delete namespace {ns}: {e}"),
        }
    }
    for ns in TEST_NAMESPACES {
        eventually(
            Duration::from_secs(90),
            &format!("namespace {ns} deleted"),
            || async { namespaces.get_opt(ns).await.ok()?.is_none().then_some(()) },
        )
        .await;
    }
}

/// Removes [`HOLD`] from every object of kind `K` in `ns` that carries it.
async fn release_held<K>(client: &Client, ns: &str)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let list = match api.list(&Default::default()).await {
        Ok(list) => list,
        Err(kube::Error::Api(s)) if s.code == 404 => return,
        Err(e) => panic!("list held owners in {ns}: {e}"),
    };
    for object in list.items {
        let meta = object.meta();
        let finalizers = meta.finalizers.clone().unwrap_or_default();
        if !finalizers.iter().any(|f| f == HOLD) {
            continue;
        }
        let name = meta.name.clone().unwrap_or_default();
        let rest: Vec<String> = finalizers.into_iter().filter(|f| f != HOLD).collect();
        let patch = json!({"metadata": {"finalizers": rest}});
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => panic!("release {name} in {ns}: {e}"),
        }
    }
}

impl RealCluster {
    /// The uid of a ReplicaSet or StatefulSet `name` in `ns` that the test's hand-made pods
    /// (labelled `labels`) name as their controller, creating it on first use.
    ///
    /// The owner must exist, or the garbage collector deletes the pods that name it. It must
    /// not act on them either: created with no replicas and held in deletion by a finalizer,
    /// it is left alone by its controller (a ReplicaSet or StatefulSet being deleted neither
    /// creates, deletes, adopts nor releases pods) and by the garbage collector (the owner
    /// still exists, deleted in the background). The pods may only be created once the
    /// controller has seen the deletion (`status.observedGeneration` reaches the generation
    /// the deletion bumped): before that it would delete them to honour `replicas: 0`.
    pub(crate) async fn held_owner(
        &self,
        ns: &str,
        kind: &str,
        name: &str,
        labels: &Value,
    ) -> String {
        match kind {
            "ReplicaSet" => self.held::<ReplicaSet>(ns, kind, name, labels).await,
            "StatefulSet" => self.held::<StatefulSet>(ns, kind, name, labels).await,
            other => panic!("no held owner of kind {other} (ReplicaSet or StatefulSet)"),
        }
    }

    async fn held<K>(&self, ns: &str, kind: &str, name: &str, labels: &Value) -> String
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + serde::Serialize,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.admin.clone(), ns);
        if let Some(existing) = api.get_opt(name).await.expect("get owner") {
            return existing.meta().uid.clone().expect("owner uid");
        }
        let mut spec = json!({
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"containers": [{"name": "worker", "image": "worker:1"}]}},
        });
        if kind == "StatefulSet" {
            spec["serviceName"] = json!(name);
        }
        let object: K = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": kind,
            "metadata": {"name": name, "namespace": ns, "finalizers": [HOLD]},
            "spec": spec,
        }))
        .expect("owner object");
        let created = api
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("create {kind} {name}: {e}"));
        let uid = created.meta().uid.clone().expect("owner uid");
        api.delete(name, &DeleteParams::background())
            .await
            .unwrap_or_else(|e| panic!("delete {kind} {name}: {e}"));
        eventually(
            Duration::from_secs(30),
            &format!("the {kind} controller saw {name} being deleted"),
            || async {
                let object = api.get(name).await.ok()?;
                let value = serde_json::to_value(&object).ok()?;
                let generation = value["metadata"]["generation"].as_i64()?;
                let observed = value["status"]["observedGeneration"].as_i64()?;
                (object.meta().deletion_timestamp.is_some() && observed >= generation).then_some(())
            },
        )
        .await;
        uid
    }

    /// Waits for the turn, cleans up after the previous test, installs the CRD and the
    /// operator's RBAC, and creates `ns` (its `default` ServiceAccount included).
    pub(crate) async fn start(ns: &str, crd_yaml: &str) -> Self {
        let turn = TURN.lock().await;
        let admin_kubeconfig = env_path("E2E_KUBECONFIG");
        let rbac = read_rbac(&env_path("E2E_OPERATOR_RBAC"));
        let admin = client_from(&admin_kubeconfig).await;

        reset_namespaces(&admin).await;
        let leases: Api<Lease> = Api::namespaced(admin.clone(), &rbac.lease.0);
        let _ = leases.delete(&rbac.lease.1, &DeleteParams::default()).await;

        let crd: Value = serde_yaml_ng::from_str(crd_yaml).expect("CRD YAML");
        apply(&admin, &crd).await;
        let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
        let crd_name = crd["metadata"]["name"]
            .as_str()
            .expect("CRD name")
            .to_string();
        eventually(Duration::from_secs(30), "the CRD Established", || async {
            let crd = crds.get(&crd_name).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        })
        .await;

        ensure_namespace(&admin, &rbac.service_account.0).await;
        for object in &rbac.objects {
            apply(&admin, object).await;
        }
        ensure_namespace(&admin, ns).await;
        let operator_kubeconfig =
            token_kubeconfig(&admin, &admin_kubeconfig, &rbac.service_account).await;
        Self {
            admin,
            operator_kubeconfig,
            lease: rbac.lease,
            _turn: turn,
        }
    }
}

/// A kubeconfig that authenticates as the ServiceAccount with a bound token (TokenRequest),
/// next to the admin kubeconfig's server and CA.
async fn token_kubeconfig(client: &Client, admin: &Path, sa: &(String, String)) -> PathBuf {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &sa.0);
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 3600, "audiences": []},
    }))
    .expect("token request");
    let token = accounts
        .create_token_request(&sa.1, &PostParams::default(), &request)
        .await
        .expect("TokenRequest for the operator's ServiceAccount")
        .status
        .expect("token status")
        .token;
    let kubeconfig = Kubeconfig::read_from(admin).expect("admin kubeconfig");
    let cluster = kubeconfig
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .expect("a cluster in the admin kubeconfig");
    let server = cluster.server.expect("server");
    let ca = cluster
        .certificate_authority_data
        .expect("certificate-authority-data");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: real\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: operator\n  user:\n    token: {token}\ncontexts:\n- name: operator\n  context: {{cluster: real, user: operator, namespace: {ns}}}\ncurrent-context: operator\n",
        ns = sa.0
    );
    let path = std::env::temp_dir().join(format!("{}.kubeconfig", crate::common::unique("e2e-sa")));
    std::fs::write(&path, text).expect("write the operator's kubeconfig");
    path
}
