//! Test controls: things a real cluster does on its own (kubelet status updates,
//! grace periods expiring, connections dropping, errors) made explicit and
//! deterministic for tests.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::audit::{AuditLog, RequestRecord};
use crate::controllers::kubelet::{self, Crash};
use crate::controllers::{Client, KubeletHooks};
use crate::error::{ApiError, ApiResult};
use crate::store::Store;
use crate::util::now_rfc3339;

pub use crate::controllers::EMULATED_NODE;

/// `obj.status` as a map, replacing anything that is not an object.
fn status_object(obj: &mut Value) -> Option<&mut serde_json::Map<String, Value>> {
    let status = obj
        .as_object_mut()?
        .entry("status")
        .or_insert_with(|| json!({}));
    if !status.is_object() {
        *status = json!({});
    }
    status.as_object_mut()
}

/// A failure to inject: the next `count` matching requests fail with `code`.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Resource plural (e.g. `pods`); `None` matches every resource.
    pub resource: Option<String>,
    /// Lowercase verb (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`); `None` matches every verb.
    pub verb: Option<String>,
    pub count: u32,
    pub code: u16,
}

impl Fault {
    /// The next `count` requests on `resource` fail with 500 InternalError.
    pub fn internal_errors(resource: &str, count: u32) -> Self {
        Self {
            resource: Some(resource.to_string()),
            verb: None,
            count,
            code: 500,
        }
    }

    /// Restricts the fault to one verb.
    pub fn on_verb(mut self, verb: &str) -> Self {
        self.verb = Some(verb.to_string());
        self
    }
}

#[derive(Default)]
struct Faults {
    rules: Vec<Fault>,
    latency: Duration,
}

/// Shared between the server and the [`Control`] handle.
pub(crate) struct ControlState {
    faults: Mutex<Faults>,
    watch_epoch: watch::Sender<u64>,
    /// Counter for pod IPs handed out by `set_pod_phase`.
    next_ip: AtomicU32,
    /// Shared with the emulated kubelet (crash, flap, stall hooks).
    pub(crate) kubelet: Arc<KubeletHooks>,
    /// Every request served.
    pub(crate) audit: AuditLog,
}

impl ControlState {
    pub(crate) fn new(audit: AuditLog) -> Self {
        Self {
            faults: Mutex::new(Faults::default()),
            watch_epoch: watch::channel(0).0,
            next_ip: AtomicU32::new(0),
            kubelet: Arc::new(KubeletHooks::default()),
            audit,
        }
    }

    /// Receives a change whenever open watches must be dropped.
    pub(crate) fn watch_epoch(&self) -> watch::Receiver<u64> {
        self.watch_epoch.subscribe()
    }

    pub(crate) fn drop_watches(&self) {
        self.watch_epoch.send_modify(|e| *e += 1);
    }

    /// Latency to add and an injected error for this request, if any.
    pub(crate) fn check(&self, resource: &str, verb: &str) -> (Duration, Option<ApiError>) {
        let mut faults = self
            .faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let latency = faults.latency;
        let hit = faults.rules.iter_mut().find(|f| {
            f.count > 0
                && f.resource.as_deref().is_none_or(|r| r == resource)
                && f.verb.as_deref().is_none_or(|v| v == verb)
        });
        let err = hit.map(|f| {
            f.count -= 1;
            let reason = match f.code {
                429 => "TooManyRequests",
                503 => "ServiceUnavailable",
                504 => "Timeout",
                _ => "InternalError",
            };
            ApiError::new(
                f.code,
                reason,
                format!("injected failure for {verb} {resource}"),
            )
        });
        faults.rules.retain(|f| f.count > 0);
        (latency, err)
    }
}

/// Binds an unscheduled pod to [`EMULATED_NODE`], as the scheduler would.
fn schedule(pod: &mut Value) {
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let bound = spec
        .get("nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    if !bound {
        spec.insert("nodeName".into(), json!(EMULATED_NODE));
    }
}

/// Handle for test-only manipulation of a running emulator.
#[derive(Clone)]
pub struct Control {
    pub(crate) store: Arc<Store>,
    pub(crate) state: Arc<ControlState>,
}

impl Control {
    /// Sets `status.phase` of a pod, as the kubelet would. Moving to `Running` also binds
    /// an unscheduled pod to [`EMULATED_NODE`] (`spec.nodeName`, so deleting it is graceful)
    /// and fills in what a kubelet reports for a started pod if missing: `startTime`,
    /// `hostIP`, a unique `podIP`/`podIPs` (10.244.0.0/16) and running `containerStatuses`.
    /// `Succeeded`/`Failed` mark the containers terminated (exit code 0/1).
    pub fn set_pod_phase(&self, namespace: &str, name: &str, phase: &str) -> ApiResult<Value> {
        let pods = self.pods()?;
        let ip_index = self.state.next_ip.fetch_add(1, Ordering::Relaxed);
        self.store.modify(&pods, namespace, name, |pod| {
            let containers: Vec<(String, String)> = pod
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map(|cs| {
                    cs.iter()
                        .map(|c| {
                            let field = |f: &str| {
                                c.get(f).and_then(Value::as_str).unwrap_or("").to_string()
                            };
                            (field("name"), field("image"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let uid = pod
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if phase == "Running" {
                schedule(pod);
            }
            let Some(status) = status_object(pod) else {
                return;
            };
            status.insert("phase".into(), json!(phase));
            let now = now_rfc3339();
            let ready = status
                .get("conditions")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.get("type") == Some(&json!("Ready"))
                            && c.get("status") == Some(&json!("True"))
                    })
                });
            let state = match phase {
                "Running" => {
                    status.entry("startTime").or_insert_with(|| json!(now));
                    status.entry("hostIP").or_insert_with(|| json!("10.0.0.1"));
                    if !status.contains_key("podIP") {
                        let ip =
                            format!("10.244.{}.{}", (ip_index / 250) % 256, ip_index % 250 + 2);
                        status.insert("podIP".into(), json!(ip));
                        status.insert("podIPs".into(), json!([{"ip": ip}]));
                    }
                    json!({"running": {"startedAt": now}})
                }
                "Succeeded" | "Failed" => {
                    let (code, reason) = if phase == "Succeeded" {
                        (0, "Completed")
                    } else {
                        (1, "Error")
                    };
                    json!({"terminated": {"exitCode": code, "reason": reason, "finishedAt": now}})
                }
                _ => return,
            };
            let running = phase == "Running";
            let statuses: Vec<Value> = containers
                .iter()
                .map(|(cname, image)| {
                    json!({
                        "name": cname, "image": image, "imageID": "",
                        "containerID": format!("emulator://{uid}-{cname}"),
                        "ready": running && ready, "started": running, "restartCount": 0,
                        "state": state,
                    })
                })
                .collect();
            status.insert("containerStatuses".into(), Value::Array(statuses));
        })
    }

    /// Sets the pod's `Ready` and `ContainersReady` conditions (and the containers'
    /// `ready` flags), as the kubelet would. Becoming ready binds an unscheduled pod to
    /// [`EMULATED_NODE`].
    pub fn set_pod_ready(&self, namespace: &str, name: &str, ready: bool) -> ApiResult<Value> {
        let pods = self.pods()?;
        self.store.modify(&pods, namespace, name, |pod| {
            if ready {
                schedule(pod);
            }
            let status = if ready { "True" } else { "False" };
            let now = now_rfc3339();
            let Some(status_map) = status_object(pod) else {
                return;
            };
            let mut conditions: Vec<Value> = status_map
                .get("conditions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for ty in ["Ready", "ContainersReady"] {
                conditions.retain(|c| c.get("type").and_then(Value::as_str) != Some(ty));
                conditions.push(json!({"type": ty, "status": status, "lastTransitionTime": now}));
            }
            status_map.insert("conditions".into(), Value::Array(conditions));
            if let Some(statuses) = status_map
                .get_mut("containerStatuses")
                .and_then(Value::as_array_mut)
            {
                for cs in statuses.iter_mut().filter_map(Value::as_object_mut) {
                    cs.insert("ready".into(), json!(ready));
                }
            }
        })
    }

    /// Sets `status.podIP` and `status.podIPs` explicitly.
    pub fn set_pod_ip(&self, namespace: &str, name: &str, ip: &str) -> ApiResult<Value> {
        let pods = self.pods()?;
        self.store.modify(&pods, namespace, name, |pod| {
            if let Some(status) = status_object(pod) {
                status.insert("podIP".into(), json!(ip));
                status.insert("podIPs".into(), json!([{"ip": ip}]));
            }
        })
    }

    /// Ends every running pod grace period now; pods without finalizers disappear.
    pub fn expire_grace_periods(&self) {
        self.store.expire_grace_periods();
    }

    /// Caps the grace period of future pod deletions (`None` removes the cap).
    pub fn set_max_grace_period(&self, max: Option<Duration>) {
        self.store.set_max_grace_period(max);
    }

    /// Closes every open watch stream; clients must reconnect.
    pub fn drop_watches(&self) {
        self.state.drop_watches();
    }

    /// Forgets all retained watch history, so resuming any older version gets 410 Gone.
    pub fn compact_history(&self) {
        self.store.compact();
    }

    /// Adds a fault rule; rules are consumed in insertion order.
    pub fn inject(&self, fault: Fault) {
        let mut faults = self
            .state
            .faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        faults.rules.push(fault);
    }

    /// Adds a fixed delay to every request.
    pub fn set_latency(&self, latency: Duration) {
        let mut faults = self
            .state
            .faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        faults.latency = latency;
    }

    /// Removes all fault rules and latency.
    pub fn clear_faults(&self) {
        let mut faults = self
            .state
            .faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *faults = Faults::default();
    }

    /// Creates an object without going through HTTP, e.g. to seed a test. The type is
    /// taken from `apiVersion`/`kind`; namespaced objects default to `default`.
    pub fn create(&self, obj: Value) -> ApiResult<Value> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let rt = self
            .store
            .resources()
            .into_iter()
            .find(|r| r.group == group && r.version == version && r.kind == kind)
            .ok_or_else(|| {
                ApiError::bad_request(format!("no served resource for {api_version} {kind}"))
            })?;
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        self.store
            .create(&rt, &ns, obj, &crate::store::WriteOptions::default())
    }

    /// Creates every object of a multi-document YAML (or JSON) text, in order; `kind: List`
    /// documents contribute their items. Returns how many objects were created.
    pub fn load_yaml(&self, text: &str) -> ApiResult<usize> {
        use serde::Deserialize;
        let mut created = 0;
        for document in serde_yaml_ng::Deserializer::from_str(text) {
            let value = Value::deserialize(document)
                .map_err(|e| ApiError::bad_request(format!("invalid YAML document: {e}")))?;
            if value.is_null() {
                continue;
            }
            let objects = match value.get("kind").and_then(Value::as_str) {
                Some(kind) if kind.ends_with("List") && value.get("items").is_some() => {
                    value["items"].as_array().cloned().unwrap_or_default()
                }
                _ => vec![value],
            };
            for obj in objects {
                self.create(obj)?;
                created += 1;
            }
        }
        Ok(created)
    }

    /// Crashes a pod as its containers would: [`Crash::Restart`] bumps `restartCount`,
    /// records `lastState.terminated` and makes it NotReady until the emulated kubelet
    /// (if running) readies it again after the ready delay; [`Crash::Fail`] moves it to
    /// phase `Failed` (a ReplicaSet or StatefulSet then replaces it). Written through the
    /// pod's status subresource.
    pub fn crash_pod(&self, namespace: &str, name: &str, how: Crash) -> ApiResult<Value> {
        let client = self.client()?;
        kubelet::crash(&client, &self.state.kubelet, namespace, name, how)
    }

    /// Makes a pod NotReady now; the emulated kubelet readies it again once `down_for`
    /// has passed (without the kubelet it stays NotReady).
    pub fn flap_readiness(
        &self,
        namespace: &str,
        name: &str,
        down_for: Duration,
    ) -> ApiResult<Value> {
        let client = self.client()?;
        kubelet::flap(&client, &self.state.kubelet, namespace, name, down_for)
    }

    /// Stalls (or releases) a pod in `Pending`: the emulated kubelet does not start it
    /// while stalled. May be called before the pod exists. Pods can also be stalled from
    /// creation with the [`crate::STALL_ANNOTATION`] annotation set to `"true"`.
    pub fn stall_pod(&self, namespace: &str, name: &str, stalled: bool) {
        self.state.kubelet.set_stalled(namespace, name, stalled);
    }

    /// The request log: one record per request served (oldest first), bounded by
    /// [`crate::EmulatorBuilder::request_log_limit`]. Requests of the in-process
    /// controllers do not go through HTTP and are not recorded.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state.audit.snapshot()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.state.audit.clear();
    }

    fn client(&self) -> ApiResult<Client> {
        Client::new(self.store.clone())
            .ok_or_else(|| ApiError::internal("built-in workload types are not served"))
    }

    /// Direct access to the object store (for seeding data without HTTP).
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn pods(&self) -> ApiResult<crate::resources::ResourceType> {
        self.store
            .resource("", "v1", "pods")
            .ok_or_else(|| ApiError::internal("pods are not served"))
    }
}
