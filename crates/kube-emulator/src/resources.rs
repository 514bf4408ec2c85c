//! The catalogue of served resource types: built-ins plus those created by CRDs.

use std::sync::Arc;

use crate::schema::Schema;

/// Everything the server needs to know about one served group/version/resource.
#[derive(Debug, Clone)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Whether `/status` is a separate subresource (then the main endpoint ignores `.status`).
    pub status_subresource: bool,
    /// Structural schema for custom resources; `None` for built-ins.
    pub schema: Option<Arc<Schema>>,
    /// True for types defined by a CustomResourceDefinition.
    pub custom: bool,
    /// A CRD version's `additionalPrinterColumns` (`name`, `type`, `jsonPath`, ...), the
    /// columns of `kubectl get` after NAME.
    pub printer_columns: Vec<serde_json::Value>,
}

impl ResourceType {
    /// `apiVersion` value for objects of this type.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Whether this is the events.k8s.io/v1 view of core/v1 Events.
    pub fn is_event_view(&self) -> bool {
        self.group == "events.k8s.io" && self.plural == "events"
    }

    /// Storage key: objects are shared between versions of the same group/resource.
    /// events.k8s.io/v1 Events are stored as core/v1 Events.
    pub fn storage_key(&self) -> StorageKey {
        if self.is_event_view() {
            return StorageKey {
                group: String::new(),
                plural: "events".into(),
            };
        }
        StorageKey {
            group: self.group.clone(),
            plural: self.plural.clone(),
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    fn builtin(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        namespaced: bool,
        status: bool,
        short_names: &[&str],
    ) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            namespaced,
            short_names: short_names
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
            categories: Vec::new(),
            status_subresource: status,
            schema: None,
            custom: false,
            printer_columns: Vec::new(),
        }
    }
}

/// Which subresource a write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    Main,
    Status,
}

/// Identifies one storage bucket (group + plural, independent of version).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageKey {
    pub group: String,
    pub plural: String,
}

/// The resources every emulator serves from the start.
pub fn builtin_resources() -> Vec<ResourceType> {
    let mut pods = ResourceType::builtin("", "v1", "Pod", "pods", true, true, &["po"]);
    pods.categories = vec!["all".into()];
    let mut deployments = ResourceType::builtin(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        true,
        true,
        &["deploy"],
    );
    deployments.categories = vec!["all".into()];
    let mut replicasets = ResourceType::builtin(
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        true,
        true,
        &["rs"],
    );
    replicasets.categories = vec!["all".into()];
    let mut statefulsets = ResourceType::builtin(
        "apps",
        "v1",
        "StatefulSet",
        "statefulsets",
        true,
        true,
        &["sts"],
    );
    statefulsets.categories = vec!["all".into()];
    let mut services = ResourceType::builtin("", "v1", "Service", "services", true, true, &["svc"]);
    services.categories = vec!["all".into()];
    let mut jobs = ResourceType::builtin("batch", "v1", "Job", "jobs", true, true, &[]);
    jobs.categories = vec!["all".into()];
    let mut cronjobs =
        ResourceType::builtin("batch", "v1", "CronJob", "cronjobs", true, true, &["cj"]);
    cronjobs.categories = vec!["all".into()];
    vec![
        ResourceType::builtin("", "v1", "Namespace", "namespaces", false, true, &["ns"]),
        pods,
        ResourceType::builtin("", "v1", "Event", "events", true, false, &["ev"]),
        ResourceType::builtin("", "v1", "ConfigMap", "configmaps", true, false, &["cm"]),
        ResourceType::builtin("", "v1", "Secret", "secrets", true, false, &[]),
        services,
        ResourceType::builtin("", "v1", "Node", "nodes", false, true, &["no"]),
        ResourceType::builtin(
            "events.k8s.io",
            "v1",
            "Event",
            "events",
            true,
            false,
            &["ev"],
        ),
        ResourceType::builtin(
            "coordination.k8s.io",
            "v1",
            "Lease",
            "leases",
            true,
            false,
            &[],
        ),
        deployments,
        replicasets,
        statefulsets,
        ResourceType::builtin(
            "apps",
            "v1",
            "ControllerRevision",
            "controllerrevisions",
            true,
            false,
            &[],
        ),
        ResourceType::builtin(
            "",
            "v1",
            "ServiceAccount",
            "serviceaccounts",
            true,
            false,
            &["sa"],
        ),
        jobs,
        cronjobs,
        ResourceType::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "Role",
            "roles",
            true,
            false,
            &[],
        ),
        ResourceType::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "RoleBinding",
            "rolebindings",
            true,
            false,
            &[],
        ),
        ResourceType::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRole",
            "clusterroles",
            false,
            false,
            &[],
        ),
        ResourceType::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
            false,
            &[],
        ),
        ResourceType::builtin(
            "policy",
            "v1",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            true,
            true,
            &["pdb"],
        ),
        ResourceType::builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
            true,
            &["crd", "crds"],
        ),
    ]
}
