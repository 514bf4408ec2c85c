//! ReplicaSet controller: keeps `spec.replicas` active pods per replica set, choosing
//! scale-down victims as kube-controller-manager does, and reports status.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::pods::{self, availability, is_active, is_ready, label_selector, owner_reference};
use super::{Client, Reconciler};
use crate::store::WatchEvent;
use crate::util::meta_str;

const MANAGER: &str = "replicaset-controller";

/// At most this many pods are created or deleted per pass (the real controller's burst).
const BURST: usize = 500;

pub(crate) struct ReplicaSetController {
    client: Client,
}

impl ReplicaSetController {
    pub(super) fn new(client: Client) -> Self {
        Self { client }
    }
}

impl Reconciler for ReplicaSetController {
    type Key = (String, String);

    fn keys_for(&mut self, event: &WatchEvent, out: &mut Vec<Self::Key>) {
        let ns = &event.namespace;
        if event.key == self.client.replicasets.storage_key() {
            if let Some(name) = meta_str(&event.object, "name") {
                out.push((ns.clone(), name.to_string()));
            }
        } else if event.key == self.client.pods.storage_key() {
            for obj in std::iter::once(&event.object).chain(event.previous.as_ref()) {
                if let Some(("ReplicaSet", name, _)) = pods::controller_of(obj) {
                    out.push((ns.clone(), name.to_string()));
                }
            }
        }
    }

    fn all_keys(&mut self) -> Vec<Self::Key> {
        keys_of(
            &self
                .client
                .list(&self.client.replicasets, None, &Default::default()),
        )
    }

    fn reconcile(&mut self, key: &Self::Key) -> Option<Duration> {
        let (ns, name) = key;
        let rs = self.client.get(&self.client.replicasets, ns, name)?;
        sync(&self.client, &rs, true)
    }
}

pub(super) fn keys_of(objects: &[Value]) -> Vec<(String, String)> {
    objects
        .iter()
        .filter_map(|o| {
            Some((
                meta_str(o, "namespace").unwrap_or("").to_string(),
                meta_str(o, "name")?.to_string(),
            ))
        })
        .collect()
}

/// A new pod for `owner` from its `spec.template`, named `{prefix}…`.
pub(super) fn pod_from_template(
    owner: &Value,
    generate_name: Option<&str>,
    name: Option<&str>,
) -> Value {
    let template = owner
        .pointer("/spec/template")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let mut meta = json!({
        "labels": template.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
        "ownerReferences": [owner_reference(owner)],
    });
    if let Some(a) = template.pointer("/metadata/annotations") {
        meta["annotations"] = a.clone();
    }
    if let Some(f) = template.pointer("/metadata/finalizers") {
        meta["finalizers"] = f.clone();
    }
    if let Some(g) = generate_name {
        meta["generateName"] = json!(g);
    }
    if let Some(n) = name {
        meta["name"] = json!(n);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
    })
}

/// Replica sets with the same controller (a Deployment's old and new ones), except `rs`.
fn siblings(client: &Client, rs: &Value) -> Vec<Value> {
    let Some((_, _, owner_uid)) = pods::controller_of(rs) else {
        return Vec::new();
    };
    let ns = meta_str(rs, "namespace").unwrap_or("");
    let uid = meta_str(rs, "uid");
    client
        .owned(&client.replicasets, ns, owner_uid)
        .into_iter()
        .filter(|s| meta_str(s, "uid") != uid)
        .collect()
}

/// Whether `rs` has more active pods than it wants.
fn has_surplus(client: &Client, rs: &Value) -> bool {
    let ns = meta_str(rs, "namespace").unwrap_or("");
    let uid = meta_str(rs, "uid").unwrap_or("");
    let want = usize::try_from(pods::int_at(rs, "/spec/replicas")).unwrap_or(0);
    client
        .owned(&client.pods, ns, uid)
        .iter()
        .filter(|p| is_active(p))
        .count()
        > want
}

/// One pass for a replica set. Before creating pods it lets sibling replica sets (of
/// the same Deployment) that must shrink do so first: controllers run concurrently here
/// and may read a scale-up before they process the scale-down that preceded it, which
/// would briefly exceed the Deployment's `maxSurge`.
fn sync(client: &Client, rs: &Value, settle_siblings: bool) -> Option<Duration> {
    let ns = meta_str(rs, "namespace").unwrap_or("");
    let name = meta_str(rs, "name").unwrap_or("");
    let uid = meta_str(rs, "uid").unwrap_or("");
    label_selector(rs.pointer("/spec/selector"))?;
    let want = usize::try_from(pods::int_at(rs, "/spec/replicas")).unwrap_or(0);
    let owned = client.owned(&client.pods, ns, uid);
    let mut active: Vec<&Value> = owned.iter().filter(|p| is_active(p)).collect();
    if rs.pointer("/metadata/deletionTimestamp").is_none() {
        if active.len() < want {
            if settle_siblings {
                for sibling in siblings(client, rs) {
                    if has_surplus(client, &sibling) {
                        sync(client, &sibling, false);
                    }
                }
            }
            let prefix = format!("{name}-");
            for _ in 0..(want - active.len()).min(BURST) {
                let pod = pod_from_template(rs, Some(&prefix), None);
                if let Err(e) = client.create(MANAGER, &client.pods, ns, pod) {
                    tracing::debug!(replicaset = name, error = %e, "creating pod failed");
                    return Some(Duration::from_secs(1));
                }
            }
        } else if active.len() > want {
            active.sort_by(|a, b| pods::victim_order(a, b));
            for victim in active.iter().take((active.len() - want).min(BURST)) {
                let pname = meta_str(victim, "name").unwrap_or("");
                let _ = client.delete(&client.pods, ns, pname, meta_str(victim, "uid"));
            }
        }
    }
    // Status from the state after this pass.
    let owned = client.owned(&client.pods, ns, uid);
    let min_ready =
        Duration::from_secs(u64::try_from(pods::int_at(rs, "/spec/minReadySeconds")).unwrap_or(0));
    let now = SystemTime::now();
    let mut requeue: Option<Duration> = None;
    let (mut replicas, mut ready, mut available) = (0, 0, 0);
    for pod in &owned {
        if !is_active(pod) {
            continue;
        }
        replicas += 1;
        if is_ready(pod) {
            ready += 1;
        }
        match availability(pod, min_ready, now) {
            (true, _) => available += 1,
            (false, Some(wait)) => requeue = Some(requeue.map_or(wait, |r| r.min(wait))),
            (false, None) => {}
        }
    }
    let mut status = json!({
        "replicas": replicas,
        "fullyLabeledReplicas": replicas,
        "readyReplicas": ready,
        "availableReplicas": available,
        "observedGeneration": pods::int_at(rs, "/metadata/generation"),
    });
    if let Some(conds) = rs.pointer("/status/conditions") {
        status["conditions"] = conds.clone();
    }
    if let Some(current) = client.get(&client.replicasets, ns, name)
        && let Err(e) = client.replace_status(MANAGER, &client.replicasets, &current, status)
    {
        tracing::debug!(replicaset = name, error = %e, "status update failed");
        return Some(Duration::from_millis(100));
    }
    requeue.map(|d| d + Duration::from_millis(50))
}
