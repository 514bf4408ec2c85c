//! The `SessionPolicy` custom resource (`sessions.blockyard.io/v1alpha1`).
//!
//! Field names are part of the public API: users' manifests depend on them. Validation lives in
//! the schema (enums, duration patterns, CEL rules) so that `kubectl apply` rejects a bad policy;
//! [`super::ValidPolicy`] re-checks everything the schema cannot express.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use super::duration;

/// Declares which pods are session workers and how their sessions follow them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sessions.blockyard.io",
    version = "v1alpha1",
    kind = "SessionPolicy",
    namespaced,
    shortname = "sp",
    status = "SessionPolicyStatus",
    printcolumn = r#"{"name":"Idle TTL","type":"string","jsonPath":".spec.idleTTL"}"#,
    printcolumn = r#"{"name":"Ready Workers","type":"integer","jsonPath":".status.workers.ready"}"#,
    printcolumn = r#"{"name":"Sessions","type":"integer","jsonPath":".status.sessions"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SessionPolicySpec {
    /// Which pods of this namespace are workers. Must not be empty.
    #[x_kube(validation = Rule::new(
        "(has(self.matchLabels) && size(self.matchLabels) > 0) || \
         (has(self.matchExpressions) && size(self.matchExpressions) > 0)"
    ).message("selector must not be empty: it would select every pod in the namespace"))]
    pub selector: LabelSelector,

    /// How a worker id is derived from a pod; it must equal the worker id proxies write.
    #[serde(default)]
    pub worker_id: WorkerIdSpec,

    /// Sessions idle longer than this are removed by this policy's idle sweep; `0s` disables it.
    #[serde(default = "default_idle_ttl", rename = "idleTTL")]
    #[schemars(schema_with = "duration_schema")]
    pub idle_ttl: String,

    /// How often the idle sweep runs.
    #[serde(default = "default_idle_sweep_interval")]
    #[schemars(schema_with = "positive_duration_schema")]
    pub idle_sweep_interval: String,

    /// What happens to the sessions of a worker pod that departs.
    #[serde(default)]
    pub migration: MigrationSpec,

    /// Stops every store mutation for this policy (migrations, sweeps, annotations); status
    /// keeps being reported.
    #[serde(default)]
    pub paused: bool,

    /// Keep `controller.kubernetes.io/pod-deletion-cost` of each worker pod equal to its session
    /// count, so that a ReplicaSet scale-down removes the pods holding the fewest sessions first.
    #[serde(default)]
    pub pod_deletion_cost: bool,
}

/// Where a pod's worker id comes from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new(
    "self.from == 'PodName' || self.from == 'PodUID' || (has(self.key) && self.key != '')"
).message("workerId.key is required when workerId.from is Label or Annotation"))]
pub struct WorkerIdSpec {
    #[serde(default)]
    pub from: WorkerIdSource,
    /// Label or annotation key holding the worker id (for `Label` and `Annotation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WorkerIdSource {
    #[default]
    PodName,
    #[serde(rename = "PodUID")]
    PodUid,
    Label,
    Annotation,
}

/// Migration behaviour.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSpec {
    /// A departed worker with a Ready replacement: move its sessions there, or delete them.
    #[serde(default)]
    pub on_replace: OnReplace,
    /// A departed worker with no replacement within `replacementWait`: delete its sessions, or
    /// move them to the least-loaded Ready worker of this policy.
    #[serde(default)]
    pub on_terminate: OnTerminate,
    /// How long to wait for a Ready replacement before `onTerminate` applies.
    #[serde(default = "default_replacement_wait")]
    #[schemars(schema_with = "duration_schema")]
    pub replacement_wait: String,
}

impl Default for MigrationSpec {
    fn default() -> Self {
        Self {
            on_replace: OnReplace::default(),
            on_terminate: OnTerminate::default(),
            replacement_wait: default_replacement_wait(),
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnReplace {
    #[default]
    Reroute,
    Delete,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnTerminate {
    #[default]
    Delete,
    Reroute,
}

/// Observed state, written by the operator replica that holds the lease.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `StoreAvailable` and `Degraded`, in the standard `metav1.Condition` shape.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<WorkerCounts>,
    /// Live sessions held by this policy's workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrations: Option<MigrationCounters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_idle_sweep: Option<IdleSweepRecord>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerCounts {
    pub ready: u32,
    pub terminating: u32,
}

/// Sessions moved or deleted by migrations since the policy was created.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationCounters {
    pub rerouted: u64,
    pub deleted: u64,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IdleSweepRecord {
    pub time: Time,
    pub removed: u64,
}

fn default_idle_ttl() -> String {
    "0s".into()
}

fn default_idle_sweep_interval() -> String {
    "1m".into()
}

fn default_replacement_wait() -> String {
    "2m".into()
}

fn duration_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "pattern": duration::PATTERN,
        "description": "A duration such as 30s, 5m or 1h30m.",
    })
}

fn positive_duration_schema(gen_: &mut SchemaGenerator) -> Schema {
    let mut schema = duration_schema(gen_);
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{
            "rule": "!self.matches('^0+(\\\\.0+)?(ns|us|µs|ms|s|m|h)?$')",
            "message": "must be greater than zero",
        }]),
    );
    schema
}
