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
    // The kind's description in `kubectl explain sessionpolicy` (kube's default would be
    // "Auto-generated derived type for SessionPolicySpec via `CustomResource`").
    doc = "A SessionPolicy tells session-operator which pods of its namespace are session workers (spec.selector) and what happens to the sessions routed to a worker when its pod departs: they move to a Ready replacement, or are deleted or rebalanced when none comes (spec.migration). The operator also runs this policy's idle sweep (spec.idleTTL) and reports what it saw and did in status.",
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
#[schemars(transform = unwrap_descriptions)]
pub struct SessionPolicySpec {
    /// Which pods of this namespace are workers: a Kubernetes label selector that must name what
    /// it selects (a matchLabels entry, or a matchExpressions requirement with In or Exists).
    #[schemars(schema_with = "super::selector::schema")]
    pub selector: LabelSelector,

    /// How a worker id is derived from a pod; it must equal the worker id proxies write.
    #[serde(default)]
    pub worker_id: WorkerIdSpec,

    /// Sessions idle longer than this are removed by this policy's idle sweep; `0s` disables it.
    /// Otherwise at least 1m: proxies record a session's last access only now and then.
    #[serde(default = "default_idle_ttl", rename = "idleTTL")]
    #[schemars(schema_with = "idle_ttl_schema")]
    pub idle_ttl: String,

    /// How often the idle sweep runs; at least 1s.
    #[serde(default = "default_idle_sweep_interval")]
    #[schemars(schema_with = "interval_schema")]
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

/// How a pod's worker id is derived. It must equal the worker id the proxies write into the
/// session store for that pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new(
    "self.from == 'PodName' || self.from == 'PodUID' || (has(self.key) && self.key != '')"
).message("workerId.key is required when workerId.from is Label or Annotation"))]
#[schemars(transform = unwrap_descriptions)]
pub struct WorkerIdSpec {
    /// Where the worker id comes from: `PodName` (default), `PodUID`, `Label` or `Annotation`
    /// (the last two read the label or annotation named by `key`).
    #[serde(default)]
    pub from: WorkerIdSource,
    /// Label or annotation key holding the worker id (for `Label` and `Annotation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Source of a pod's worker id.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WorkerIdSource {
    #[default]
    PodName,
    #[serde(rename = "PodUID")]
    PodUid,
    Label,
    Annotation,
}

/// What happens to the sessions of a worker pod that departs (is deleted, terminates or
/// finishes).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = unwrap_descriptions)]
pub struct MigrationSpec {
    /// A departed worker with a Ready replacement: `Reroute` (default) moves its sessions
    /// there, `Delete` deletes them.
    #[serde(default)]
    pub on_replace: OnReplace,
    /// A departed worker with no replacement within `replacementWait`: `Delete` (default)
    /// deletes its sessions, `Reroute` moves them to the least-loaded Ready worker of this
    /// policy.
    #[serde(default)]
    pub on_terminate: OnTerminate,
    /// How long to wait for a Ready replacement before `onTerminate` applies: `0s` (no wait)
    /// or at least 1s.
    #[serde(default = "default_replacement_wait")]
    #[schemars(schema_with = "replacement_wait_schema")]
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

/// Action for the sessions of a departed worker that has a Ready replacement.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnReplace {
    #[default]
    Reroute,
    Delete,
}

/// Action for the sessions of a departed worker that got no Ready replacement in time.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnTerminate {
    #[default]
    Delete,
    Reroute,
}

/// Observed state, written by the operator replica that holds the lease (standby replicas
/// never write it).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = unwrap_descriptions)]
pub struct SessionPolicyStatus {
    /// The `metadata.generation` of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `StoreAvailable` and `Degraded`, in the standard `metav1.Condition` shape, at
    /// most one per type (a map list keyed by `type`, so server-side apply merges by type).
    /// Reasons are listed in docs/troubleshooting.md.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Worker pods selected by this policy, by state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<WorkerCounts>,
    /// Live sessions held by this policy's workers (Ready ones and departed ones whose
    /// sessions have not moved yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<u64>,
    /// Sessions moved or deleted by this policy's migrations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrations: Option<MigrationCounters>,
    /// The last idle sweep of this policy (absent until the first one, or with `idleTTL: 0s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_idle_sweep: Option<IdleSweepRecord>,
}

/// Worker pods of a policy by state.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = unwrap_descriptions)]
pub struct WorkerCounts {
    /// Selected pods that are Ready and carry a worker id: they may receive sessions.
    pub ready: u32,
    /// Selected pods that are terminating (deletionTimestamp set) or finished.
    pub terminating: u32,
}

/// Sessions moved or deleted by migrations since the policy was created.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = unwrap_descriptions)]
pub struct MigrationCounters {
    /// Sessions moved from a departed worker to another worker.
    pub rerouted: u64,
    /// Sessions deleted because their worker departed.
    pub deleted: u64,
}

/// When the last idle sweep of a policy ran and what it removed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = unwrap_descriptions)]
pub struct IdleSweepRecord {
    /// When the sweep ran.
    pub time: Time,
    /// Sessions it removed for being idle longer than `idleTTL`.
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

/// A duration with a CEL floor (`duration()` reads the same Go duration syntax as the pattern;
/// a bare `0` is tested first, as not every CEL implementation's `duration()` takes it).
fn floored(gen_: &mut SchemaGenerator, rule: &str, message: &str) -> Schema {
    let mut schema = duration_schema(gen_);
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{"rule": rule, "message": message}]),
    );
    schema
}

/// Doc comments are wrapped at 100 columns and schemars keeps their line breaks, which
/// `kubectl explain` would print as they are. Joins the lines of each paragraph of a type's own
/// description and of its fields' (nested types do it for theirs).
fn unwrap_descriptions(schema: &mut Schema) {
    fn unwrap(value: Option<&mut serde_json::Value>) {
        if let Some(serde_json::Value::String(text)) = value {
            *text = text
                .split("\n\n")
                .map(|paragraph| paragraph.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join("\n\n");
        }
    }
    unwrap(schema.get_mut("description"));
    if let Some(properties) = schema
        .get_mut("properties")
        .and_then(serde_json::Value::as_object_mut)
    {
        for property in properties.values_mut() {
            unwrap(property.get_mut("description"));
        }
    }
}

fn interval_schema(gen_: &mut SchemaGenerator) -> Schema {
    floored(
        gen_,
        "self != '0' && duration(self) >= duration('1s')",
        "must be at least 1s",
    )
}

fn idle_ttl_schema(gen_: &mut SchemaGenerator) -> Schema {
    floored(
        gen_,
        "self == '0' || duration(self) == duration('0s') || duration(self) >= duration('1m')",
        "must be 0s (no idle sweep) or at least 1m",
    )
}

fn replacement_wait_schema(gen_: &mut SchemaGenerator) -> Schema {
    floored(
        gen_,
        "self == '0' || duration(self) == duration('0s') || duration(self) >= duration('1s')",
        "must be 0s (no wait) or at least 1s",
    )
}
