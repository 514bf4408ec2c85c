//! KWOK-like kubelet stages for pods bound to emulated nodes: Pending → Running at
//! once, Ready after a delay; terminating pods turn NotReady at once (removal when the
//! grace period ends is the store's part, as before). Test hooks crash pods, flap their
//! readiness and stall them in Pending.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Notify;

use super::pods::{self, is_ready, node_name};
use super::{Client, Reconciler};
use crate::error::{ApiError, ApiResult};
use crate::store::{EventType, WatchEvent};
use crate::util::{meta_str, now_rfc3339};

const MANAGER: &str = "kubelet";

/// Per-pod override of the ready delay, e.g. `"500ms"`, `"2s"`, `"0"`.
pub const READY_DELAY_ANNOTATION: &str = "kube-emulator.io/ready-delay";
/// `"true"` keeps the pod in `Pending` (the kubelet never starts it).
pub const STALL_ANNOTATION: &str = "kube-emulator.io/stall";

type PodKey = (String, String);

/// State shared between the kubelet and the [`crate::Control`] test hooks.
#[derive(Default)]
pub(crate) struct KubeletHooks {
    pub wake: Arc<Notify>,
    state: Mutex<HookState>,
}

#[derive(Default)]
struct HookState {
    stalled: HashSet<PodKey>,
    not_ready_until: HashMap<PodKey, Instant>,
    restarted: HashMap<PodKey, Instant>,
    poked: Vec<PodKey>,
}

impl KubeletHooks {
    fn with<T>(&self, f: impl FnOnce(&mut HookState) -> T) -> T {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut state)
    }

    fn poke(&self, key: PodKey) {
        self.with(|s| s.poked.push(key));
        self.wake.notify_one();
    }

    pub(crate) fn set_stalled(&self, ns: &str, name: &str, stalled: bool) {
        let key = (ns.to_string(), name.to_string());
        self.with(|s| {
            if stalled {
                s.stalled.insert(key.clone());
            } else {
                s.stalled.remove(&key);
            }
        });
        self.poke(key);
    }

    fn restarted(&self, key: PodKey) {
        self.with(|s| s.restarted.insert(key.clone(), Instant::now()));
        self.poke(key);
    }

    fn forget(&self, key: &PodKey) {
        self.with(|s| {
            s.not_ready_until.remove(key);
            s.restarted.remove(key);
        });
    }
}

/// How a crashed pod ends up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// The containers exit and are restarted: `restartCount` + 1, `lastState.terminated`,
    /// NotReady until the ready delay has passed again.
    Restart,
    /// The pod fails for good: phase `Failed`, containers terminated with exit code 1.
    Fail,
}

pub(crate) struct Kubelet {
    client: Client,
    delay: Duration,
    /// Up to this much more per pod (see [`Kubelet::ready_delay`]).
    jitter: Duration,
    hooks: Arc<KubeletHooks>,
    started: HashMap<PodKey, Instant>,
    next_ip: u32,
}

impl Kubelet {
    pub(crate) fn new(
        client: Client,
        delay: Duration,
        jitter: Duration,
        hooks: Arc<KubeletHooks>,
    ) -> Self {
        Self {
            client,
            delay,
            jitter,
            hooks,
            started: HashMap::new(),
            next_ip: 0,
        }
    }

    /// The pod's annotation, else the delay plus the pod's share of the jitter: a fraction of
    /// it that a hash of the pod's uid picks, so that pods started together become Ready
    /// spread out (as real readiness probes do) and the same pod always waits the same.
    fn ready_delay(&self, pod: &Value) -> Duration {
        pod.pointer("/metadata/annotations")
            .and_then(|a| a.get(READY_DELAY_ANNOTATION))
            .and_then(Value::as_str)
            .and_then(parse_duration)
            .unwrap_or_else(|| {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::hash::DefaultHasher::new();
                meta_str(pod, "uid").unwrap_or_default().hash(&mut hasher);
                let share = (hasher.finish() % 1_000) as f64 / 1_000.0;
                self.delay + self.jitter.mul_f64(share)
            })
    }

    fn stalled(&self, key: &PodKey, pod: &Value) -> bool {
        let annotated = pod
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(STALL_ANNOTATION))
            .and_then(Value::as_str)
            == Some("true");
        annotated || self.hooks.with(|s| s.stalled.contains(key))
    }

    fn pod_ip(&mut self) -> String {
        let n = self.next_ip;
        self.next_ip = self.next_ip.wrapping_add(1);
        format!("10.244.{}.{}", 128 + (n / 250) % 128, n % 250 + 2)
    }
}

impl Reconciler for Kubelet {
    type Key = PodKey;

    fn keys_for(&mut self, event: &WatchEvent, out: &mut Vec<Self::Key>) {
        if event.key != self.client.pods.storage_key() {
            return;
        }
        let Some(name) = meta_str(&event.object, "name") else {
            return;
        };
        let key = (event.namespace.clone(), name.to_string());
        if event.kind == EventType::Deleted {
            self.started.remove(&key);
            self.hooks.forget(&key);
            return;
        }
        if !node_name(&event.object).is_empty() {
            out.push(key);
        }
    }

    fn all_keys(&mut self) -> Vec<Self::Key> {
        super::replicaset::keys_of(
            &self
                .client
                .list(&self.client.pods, None, &Default::default())
                .into_iter()
                .filter(|p| !node_name(p).is_empty())
                .collect::<Vec<_>>(),
        )
    }

    fn poked(&mut self) -> Vec<Self::Key> {
        self.hooks.with(|s| std::mem::take(&mut s.poked))
    }

    fn reconcile(&mut self, key: &Self::Key) -> Option<Duration> {
        let pod = self.client.get(&self.client.pods, &key.0, &key.1)?;
        let node = node_name(&pod).to_string();
        if node.is_empty() || pods::is_finished(&pod) {
            return None;
        }
        if pods::is_terminating(&pod) {
            if is_ready(&pod) {
                self.write(&pod, |status| set_readiness(status, false));
            }
            return None;
        }
        if let Some(at) = self.hooks.with(|s| s.restarted.remove(key)) {
            self.started.insert(key.clone(), at);
        }
        let stalled = self.stalled(key, &pod);
        let delay = self.ready_delay(&pod);
        let now = Instant::now();
        let hold = self
            .hooks
            .with(|s| s.not_ready_until.get(key).copied())
            .filter(|until| *until > now);
        if pods::phase(&pod) == "Pending" {
            if stalled {
                return None;
            }
            let ip = self.pod_ip();
            let ready_now = delay.is_zero() && hold.is_none();
            self.started.insert(key.clone(), now);
            let host_ip = super::scheduler::node_ip(&node);
            self.write(&pod, |status| {
                start(status, &pod, &host_ip, &ip);
                set_readiness(status, ready_now);
            });
            return (!ready_now).then(|| delay.max(hold.map_or(Duration::ZERO, |h| h - now)));
        }
        if is_ready(&pod) || stalled {
            return None;
        }
        let started = *self.started.entry(key.clone()).or_insert(now);
        let mut due = started + delay;
        if let Some(h) = hold {
            due = due.max(h);
        }
        if due > now {
            return Some(due - now);
        }
        self.write(&pod, |status| set_readiness(status, true));
        None
    }
}

impl Kubelet {
    /// Replaces the pod's status with `f` applied (PUT `/status`, optimistic concurrency;
    /// a conflict is retried when the newer version's event arrives).
    fn write(&self, pod: &Value, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
        let mut status = pod.get("status").cloned().unwrap_or_else(|| json!({}));
        if let Some(map) = status.as_object_mut() {
            f(map);
        }
        if let Err(e) = self
            .client
            .replace_status(MANAGER, &self.client.pods, pod, status)
        {
            tracing::debug!(pod = meta_str(pod, "name"), error = %e, "kubelet status write failed");
        }
    }
}

fn containers(pod: &Value) -> Vec<(String, String)> {
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let field =
                        |f: &str| c.get(f).and_then(Value::as_str).unwrap_or("").to_string();
                    (field("name"), field("image"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Running with started containers (not yet ready).
fn start(status: &mut serde_json::Map<String, Value>, pod: &Value, host_ip: &str, ip: &str) {
    let now = now_rfc3339();
    let uid = meta_str(pod, "uid").unwrap_or("");
    status.insert("phase".into(), json!("Running"));
    status.insert("hostIP".into(), json!(host_ip));
    status.insert("hostIPs".into(), json!([{"ip": host_ip}]));
    if !status.contains_key("podIP") {
        status.insert("podIP".into(), json!(ip));
        status.insert("podIPs".into(), json!([{"ip": ip}]));
    }
    status.entry("startTime").or_insert_with(|| json!(now));
    let statuses: Vec<Value> = containers(pod)
        .into_iter()
        .map(|(name, image)| {
            json!({
                "name": name, "image": image, "imageID": format!("emulated://{image}"),
                "containerID": format!("emulator://{uid}-{name}"),
                "ready": false, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            })
        })
        .collect();
    status.insert("containerStatuses".into(), Value::Array(statuses));
    let mut conditions = conditions_of(status);
    for (ty, st) in [
        ("PodReadyToStartContainers", "True"),
        ("Initialized", "True"),
        ("PodScheduled", "True"),
    ] {
        put_condition(&mut conditions, ty, st, &now);
    }
    status.insert("conditions".into(), Value::Array(conditions));
}

fn conditions_of(status: &serde_json::Map<String, Value>) -> Vec<Value> {
    status
        .get("conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn put_condition(conditions: &mut Vec<Value>, ty: &str, st: &str, now: &str) {
    match conditions
        .iter_mut()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(ty))
    {
        Some(c) if c.get("status").and_then(Value::as_str) == Some(st) => {}
        Some(c) => {
            *c =
                json!({"type": ty, "status": st, "lastProbeTime": null, "lastTransitionTime": now});
        }
        None => conditions.push(
            json!({"type": ty, "status": st, "lastProbeTime": null, "lastTransitionTime": now}),
        ),
    }
}

/// Sets Ready/ContainersReady and the containers' `ready` flags.
fn set_readiness(status: &mut serde_json::Map<String, Value>, ready: bool) {
    let now = now_rfc3339();
    let st = if ready { "True" } else { "False" };
    let mut conditions = conditions_of(status);
    put_condition(&mut conditions, "ContainersReady", st, &now);
    put_condition(&mut conditions, "Ready", st, &now);
    status.insert("conditions".into(), Value::Array(conditions));
    if let Some(cs) = status
        .get_mut("containerStatuses")
        .and_then(Value::as_array_mut)
    {
        for c in cs.iter_mut().filter_map(Value::as_object_mut) {
            c.insert("ready".into(), json!(ready));
        }
    }
}

/// Parses `"250ms"`, `"2s"`, `"1m"`, `"1.5s"` or a bare number of seconds.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| Duration::from_secs_f64((v * scale).min(1e9)))
}

/// Test hook: crashes a pod (see [`Crash`]). Goes through the pod's status subresource.
pub(crate) fn crash(
    client: &Client,
    hooks: &KubeletHooks,
    ns: &str,
    name: &str,
    how: Crash,
) -> ApiResult<Value> {
    let pod = client
        .get(&client.pods, ns, name)
        .ok_or_else(|| ApiError::not_found("", "pods", name))?;
    let now = now_rfc3339();
    let mut status = pod.get("status").cloned().unwrap_or_else(|| json!({}));
    let Some(map) = status.as_object_mut() else {
        return Err(ApiError::internal("pod status is not an object"));
    };
    set_readiness(map, false);
    let uid = meta_str(&pod, "uid").unwrap_or("");
    let statuses: Vec<Value> = containers(&pod)
        .into_iter()
        .map(|(cname, image)| {
            let previous = map
                .get("containerStatuses")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c.get("name").and_then(Value::as_str) == Some(&cname)))
                .cloned()
                .unwrap_or_else(|| json!({}));
            let restarts = previous.get("restartCount").and_then(Value::as_i64).unwrap_or(0);
            let terminated = json!({"terminated": {"exitCode": 1, "reason": "Error",
                "startedAt": previous.pointer("/state/running/startedAt").cloned().unwrap_or(json!(now)),
                "finishedAt": now, "containerID": format!("emulator://{uid}-{cname}")}});
            match how {
                Crash::Restart => json!({
                    "name": cname, "image": image, "imageID": format!("emulated://{image}"),
                    "containerID": format!("emulator://{uid}-{cname}"),
                    "ready": false, "started": true, "restartCount": restarts + 1,
                    "state": {"running": {"startedAt": now}}, "lastState": terminated,
                }),
                Crash::Fail => json!({
                    "name": cname, "image": image, "imageID": format!("emulated://{image}"),
                    "containerID": format!("emulator://{uid}-{cname}"),
                    "ready": false, "started": false, "restartCount": restarts,
                    "state": terminated,
                }),
            }
        })
        .collect();
    map.insert("containerStatuses".into(), Value::Array(statuses));
    if how == Crash::Fail {
        map.insert("phase".into(), json!("Failed"));
    }
    let mut body = pod.clone();
    body["status"] = status;
    if how == Crash::Restart {
        // Before the write, so the kubelet restarts the ready delay when it sees it.
        hooks.restarted((ns.to_string(), name.to_string()));
    }
    client.store.update(
        &client.pods,
        ns,
        name,
        body,
        crate::store::Subresource::Status,
        &crate::store::WriteOptions {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        },
    )
}

/// Test hook: the pod turns NotReady now and Ready again after `down_for`.
pub(crate) fn flap(
    client: &Client,
    hooks: &KubeletHooks,
    ns: &str,
    name: &str,
    down_for: Duration,
) -> ApiResult<Value> {
    let pod = client
        .get(&client.pods, ns, name)
        .ok_or_else(|| ApiError::not_found("", "pods", name))?;
    // Recorded before the write, so the kubelet never sees the NotReady pod without it.
    hooks.with(|s| {
        s.not_ready_until.insert(
            (ns.to_string(), name.to_string()),
            Instant::now() + down_for,
        )
    });
    let mut status = pod.get("status").cloned().unwrap_or_else(|| json!({}));
    if let Some(map) = status.as_object_mut() {
        set_readiness(map, false);
    }
    let mut body = pod.clone();
    body["status"] = status;
    let written = client.store.update(
        &client.pods,
        ns,
        name,
        body,
        crate::store::Subresource::Status,
        &crate::store::WriteOptions {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        },
    )?;
    hooks.poke((ns.to_string(), name.to_string()));
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("soon"), None);
    }
}
