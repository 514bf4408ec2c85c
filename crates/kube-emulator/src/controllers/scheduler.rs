//! Scheduler: binds pending pods (of the default scheduler) to the least-loaded emulated
//! node through the `pods/binding` subresource. Also creates the emulated Node objects.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::EMULATED_NODE;
use super::pods::{self, node_name};
use super::{Client, Reconciler};
use crate::store::{EventType, WatchEvent};
use crate::util::{meta_str, now_rfc3339};

const MANAGER: &str = "kube-scheduler";

/// Name of emulated node `i`: `emulated-node`, `emulated-node-1`, `emulated-node-2`, …
/// (node 0 is the one the `Control` pod helpers bind to).
pub(crate) fn node_name_of(i: usize) -> String {
    if i == 0 {
        EMULATED_NODE.to_string()
    } else {
        format!("{EMULATED_NODE}-{i}")
    }
}

/// The InternalIP of an emulated node (`10.0.0.1` for node 0).
pub(crate) fn node_ip(node: &str) -> String {
    let index = node
        .strip_prefix(EMULATED_NODE)
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|i| i.parse::<usize>().ok())
        .unwrap_or(0);
    format!("10.0.{}.{}", (index / 250) % 256, index % 250 + 1)
}

/// Creates `count` Ready nodes unless they exist.
pub(crate) fn ensure_nodes(client: &Client, count: usize) {
    for i in 0..count {
        let name = node_name_of(i);
        if client.get(&client.nodes, "", &name).is_some() {
            continue;
        }
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "type": "kube-emulator",
            }},
            "spec": {},
        });
        let created = match client.create(MANAGER, &client.nodes, "", node) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(node = name, error = %e, "creating emulated node failed");
                continue;
            }
        };
        let now = now_rfc3339();
        let condition = |ty: &str, status: &str, reason: &str, message: &str| {
            json!({"type": ty, "status": status, "reason": reason, "message": message,
                   "lastHeartbeatTime": now, "lastTransitionTime": now})
        };
        let capacity = json!({"cpu": "32", "memory": "256Gi", "pods": "1100"});
        let status = json!({
            "phase": "Running",
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": node_ip(&name)},
                {"type": "Hostname", "address": name},
            ],
            "capacity": capacity, "allocatable": capacity,
            "nodeInfo": {
                "architecture": "amd64", "operatingSystem": "linux", "osImage": "kube-emulator",
                "kernelVersion": "", "containerRuntimeVersion": "emulated://1",
                "kubeletVersion": "v1.34.0", "kubeProxyVersion": "",
                "machineID": "", "systemUUID": "", "bootID": "",
            },
        });
        if let Err(e) = client.replace_status(MANAGER, &client.nodes, &created, status) {
            tracing::warn!(node = name, error = %e, "node status write failed");
        }
    }
}

pub(crate) struct Scheduler {
    client: Client,
    nodes: Vec<String>,
    /// Where each known pod is bound, and how many pods each node holds.
    placed: HashMap<(String, String), String>,
    load: HashMap<String, usize>,
}

impl Scheduler {
    pub(super) fn new(client: Client, nodes: usize) -> Self {
        Self {
            client,
            nodes: (0..nodes).map(node_name_of).collect(),
            placed: HashMap::new(),
            load: HashMap::new(),
        }
    }

    fn record(&mut self, key: (String, String), node: Option<String>) {
        if let Some(old) = self.placed.remove(&key)
            && let Some(n) = self.load.get_mut(&old)
        {
            *n = n.saturating_sub(1);
        }
        if let Some(node) = node {
            *self.load.entry(node.clone()).or_default() += 1;
            self.placed.insert(key, node);
        }
    }

    fn wants_scheduling(pod: &Value) -> bool {
        let scheduler = pod
            .pointer("/spec/schedulerName")
            .and_then(Value::as_str)
            .unwrap_or("default-scheduler");
        node_name(pod).is_empty()
            && scheduler == "default-scheduler"
            && !pods::is_terminating(pod)
            && !pods::is_finished(pod)
    }
}

impl Reconciler for Scheduler {
    type Key = (String, String);

    fn keys_for(&mut self, event: &WatchEvent, out: &mut Vec<Self::Key>) {
        if event.key != self.client.pods.storage_key() {
            return;
        }
        let Some(name) = meta_str(&event.object, "name") else {
            return;
        };
        let key = (event.namespace.clone(), name.to_string());
        let node = node_name(&event.object);
        if event.kind == EventType::Deleted || pods::is_finished(&event.object) {
            self.record(key, None);
        } else if !node.is_empty() {
            if self.placed.get(&key).map(String::as_str) != Some(node) {
                self.record(key, Some(node.to_string()));
            }
        } else if Self::wants_scheduling(&event.object) {
            out.push(key);
        }
    }

    fn all_keys(&mut self) -> Vec<Self::Key> {
        let all = self
            .client
            .list(&self.client.pods, None, &Default::default());
        let mut keys = Vec::new();
        for pod in &all {
            let key = (
                meta_str(pod, "namespace").unwrap_or("").to_string(),
                meta_str(pod, "name").unwrap_or("").to_string(),
            );
            if !node_name(pod).is_empty() && !pods::is_finished(pod) {
                self.record(key, Some(node_name(pod).to_string()));
            } else if Self::wants_scheduling(pod) {
                keys.push(key);
            }
        }
        keys
    }

    fn reconcile(&mut self, key: &Self::Key) -> Option<Duration> {
        let pod = self.client.get(&self.client.pods, &key.0, &key.1)?;
        if !Self::wants_scheduling(&pod) {
            return None;
        }
        let node = self
            .nodes
            .iter()
            .min_by_key(|n| self.load.get(*n).copied().unwrap_or(0))?
            .clone();
        match self.client.store.bind_pod(&key.0, &key.1, &node) {
            Ok(_) => {
                self.record(key.clone(), Some(node));
                None
            }
            Err(e) if e.code == 404 || e.code == 409 => None,
            Err(e) => {
                tracing::debug!(pod = key.1, error = %e, "binding failed");
                Some(Duration::from_millis(200))
            }
        }
    }
}
