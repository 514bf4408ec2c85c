//! StatefulSet controller: pods `{name}-{ordinal}` whose names are reused by their
//! replacements, OrderedReady (one at a time, in order, each Running and Ready before
//! the next; scale-down from the highest ordinal) and Parallel pod management, and
//! RollingUpdate in reverse ordinal order down to `partition` (OnDelete leaves pods
//! alone). Each template is recorded in a ControllerRevision `{name}-{hash}` (the pods'
//! `controller-revision-hash` label names it), which `kubectl rollout history|undo` use.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::pods::{self, REVISION_HASH, availability, int_at, is_ready, label_selector};
use super::{Client, Reconciler};
use crate::store::WatchEvent;
use crate::util::meta_str;

const MANAGER: &str = "statefulset-controller";

pub(crate) struct StatefulSetController {
    client: Client,
    /// Templates by revision name, for recreating pods below the partition.
    templates: HashMap<String, Value>,
}

impl StatefulSetController {
    pub(super) fn new(client: Client) -> Self {
        Self {
            client,
            templates: HashMap::new(),
        }
    }
}

impl Reconciler for StatefulSetController {
    type Key = (String, String);

    fn keys_for(&mut self, event: &WatchEvent, out: &mut Vec<Self::Key>) {
        let ns = &event.namespace;
        if event.key == self.client.statefulsets.storage_key() {
            if let Some(name) = meta_str(&event.object, "name") {
                out.push((ns.clone(), name.to_string()));
            }
        } else if event.key == self.client.pods.storage_key()
            && let Some(("StatefulSet", name, _)) = pods::controller_of(&event.object)
        {
            out.push((ns.clone(), name.to_string()));
        }
    }

    fn all_keys(&mut self) -> Vec<Self::Key> {
        super::replicaset::keys_of(&self.client.list(
            &self.client.statefulsets,
            None,
            &Default::default(),
        ))
    }

    fn reconcile(&mut self, key: &Self::Key) -> Option<Duration> {
        let (ns, name) = key;
        let sts = self.client.get(&self.client.statefulsets, ns, name)?;
        label_selector(sts.pointer("/spec/selector"))?;
        let template = sts.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let update_revision = if pods::is_terminating(&sts) {
            format!("{name}-{}", pods::template_hash(&template, 0))
        } else {
            match self.revisions(ns, name, &sts, &template) {
                Some(r) => r,
                None => return Some(Duration::from_millis(200)),
            }
        };
        let current_revision = sts
            .pointer("/status/currentRevision")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
            .unwrap_or(&update_revision)
            .to_string();
        let requeue = if pods::is_terminating(&sts) {
            None
        } else {
            self.sync(ns, name, &sts, &current_revision, &update_revision)
        };
        self.status(ns, name, &current_revision, &update_revision)
            .or(requeue)
    }
}

fn revision_of(pod: &Value) -> &str {
    pod.pointer("/metadata/labels")
        .and_then(|l| l.get(REVISION_HASH))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn healthy(pod: &Value) -> bool {
    pods::phase(pod) == "Running" && is_ready(pod) && !pods::is_terminating(pod)
}

/// The pod template a ControllerRevision records (`data.spec.template`).
fn revision_template(revision: &Value) -> Value {
    let mut t = revision
        .pointer("/data/spec/template")
        .cloned()
        .unwrap_or(json!({}));
    if let Some(m) = t.as_object_mut() {
        m.remove("$patch");
    }
    t
}

fn revision_number(revision: &Value) -> i64 {
    int_at(revision, "/revision")
}

impl StatefulSetController {
    /// Keeps one ControllerRevision per template (`kubectl rollout history|undo` read
    /// them): finds the revision of `template` — renumbering it as the newest if an older
    /// one is reused — or creates it, prunes unused ones beyond `revisionHistoryLimit`,
    /// and remembers every revision's template. Returns the update revision's name.
    fn revisions(&mut self, ns: &str, name: &str, sts: &Value, template: &Value) -> Option<String> {
        let c = &self.client;
        let uid = meta_str(sts, "uid").unwrap_or("");
        let mut revisions = c.owned(&c.controllerrevisions, ns, uid);
        revisions.sort_by_key(revision_number);
        for r in &revisions {
            if let Some(rname) = meta_str(r, "name") {
                self.templates
                    .insert(rname.to_string(), revision_template(r));
            }
        }
        let newest = revisions.last().map_or(0, revision_number);
        let want = pods::normalized(template);
        if let Some(existing) = revisions
            .iter()
            .rev()
            .find(|r| pods::normalized(&revision_template(r)) == want)
        {
            let rname = meta_str(existing, "name").unwrap_or("").to_string();
            if revision_number(existing) < newest {
                let patch = json!({"revision": newest + 1});
                c.merge(
                    MANAGER,
                    &c.controllerrevisions,
                    ns,
                    &rname,
                    &patch,
                    crate::store::Subresource::Main,
                )
                .ok()?;
            }
            self.prune(ns, sts, &revisions, revisions.len(), &rname);
            return Some(rname);
        }
        let collisions = int_at(sts, "/status/collisionCount");
        let hash = pods::template_hash(template, collisions);
        let rname = format!("{name}-{hash}");
        let mut labels = template
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        if !labels.is_object() {
            labels = json!({});
        }
        labels[REVISION_HASH] = json!(hash);
        let mut data_template = template.clone();
        data_template["$patch"] = json!("replace");
        let revision = json!({
            "apiVersion": "apps/v1",
            "kind": "ControllerRevision",
            "metadata": {
                "name": rname,
                "namespace": ns,
                "labels": labels,
                "ownerReferences": [pods::owner_reference(sts)],
            },
            "data": {"spec": {"template": data_template}},
            "revision": newest + 1,
        });
        match c.create(MANAGER, &c.controllerrevisions, ns, revision) {
            Ok(_) => {
                self.templates.insert(rname.clone(), template.clone());
                self.prune(ns, sts, &revisions, revisions.len() + 1, &rname);
                Some(rname)
            }
            Err(e) if e.code == 409 => {
                // Same name, other template: a hash collision; try the next name.
                let mut status = sts.get("status").cloned().unwrap_or(json!({}));
                status["collisionCount"] = json!(collisions + 1);
                let _ = c.replace_status(MANAGER, &c.statefulsets, sts, status);
                None
            }
            Err(e) => {
                tracing::debug!(statefulset = name, error = %e, "creating revision failed");
                None
            }
        }
    }

    /// Deletes the oldest revisions beyond `revisionHistoryLimit` that neither the status
    /// nor any pod refers to.
    fn prune(&self, ns: &str, sts: &Value, revisions: &[Value], total: usize, update: &str) {
        let c = &self.client;
        let limit = usize::try_from(
            sts.pointer("/spec/revisionHistoryLimit")
                .and_then(Value::as_i64)
                .unwrap_or(10)
                .max(0),
        )
        .unwrap_or(10);
        let name = meta_str(sts, "name").unwrap_or("");
        let pods = self.pods_by_ordinal(ns, name, sts);
        let current = sts
            .pointer("/status/currentRevision")
            .and_then(Value::as_str)
            .unwrap_or("");
        let live: Vec<&Value> = revisions
            .iter()
            .filter(|r| {
                let rname = meta_str(r, "name").unwrap_or("");
                rname != update
                    && rname != current
                    && pods.values().all(|p| revision_of(p) != rname)
            })
            .collect();
        let excess = total.saturating_sub(limit);
        for r in live.into_iter().take(excess) {
            let rname = meta_str(r, "name").unwrap_or("");
            let _ = c.delete(&c.controllerrevisions, ns, rname, meta_str(r, "uid"));
        }
    }

    /// Owned pods by ordinal.
    fn pods_by_ordinal(&self, ns: &str, name: &str, sts: &Value) -> BTreeMap<i64, Value> {
        let uid = meta_str(sts, "uid").unwrap_or("");
        let prefix = format!("{name}-");
        self.client
            .owned(&self.client.pods, ns, uid)
            .into_iter()
            .filter_map(|p| {
                let ordinal = meta_str(&p, "name")?
                    .strip_prefix(&prefix)?
                    .parse::<i64>()
                    .ok()?;
                Some((ordinal, p))
            })
            .collect()
    }

    fn new_pod(&self, sts: &Value, name: &str, ordinal: i64, revision: &str) -> Value {
        let mut owner = sts.clone();
        if let Some(t) = self.templates.get(revision) {
            owner["spec"]["template"] = t.clone();
        }
        let pod_name = format!("{name}-{ordinal}");
        let mut pod = super::replicaset::pod_from_template(&owner, None, Some(&pod_name));
        let labels = &mut pod["metadata"]["labels"];
        if !labels.is_object() {
            *labels = json!({});
        }
        labels[REVISION_HASH] = json!(revision);
        labels["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
        labels["apps.kubernetes.io/pod-index"] = json!(ordinal.to_string());
        pod["spec"]["hostname"] = json!(pod_name);
        if let Some(service) = sts.pointer("/spec/serviceName").and_then(Value::as_str)
            && !service.is_empty()
        {
            pod["spec"]["subdomain"] = json!(service);
        }
        pod
    }

    /// One pass of `updateStatefulSet`; `Some` asks for another pass later.
    fn sync(
        &self,
        ns: &str,
        name: &str,
        sts: &Value,
        current_revision: &str,
        update_revision: &str,
    ) -> Option<Duration> {
        let replicas = int_at(sts, "/spec/replicas").max(0);
        let ordered = sts
            .pointer("/spec/podManagementPolicy")
            .and_then(Value::as_str)
            != Some("Parallel");
        let rolling = sts
            .pointer("/spec/updateStrategy/type")
            .and_then(Value::as_str)
            != Some("OnDelete");
        let partition = if rolling {
            int_at(sts, "/spec/updateStrategy/rollingUpdate/partition").max(0)
        } else {
            replicas
        };
        let pods = self.pods_by_ordinal(ns, name, sts);
        // Create, replace failed pods, and (OrderedReady) wait for each to be healthy.
        for ordinal in 0..replicas {
            match pods.get(&ordinal) {
                None => {
                    let revision = if ordinal < partition {
                        current_revision
                    } else {
                        update_revision
                    };
                    let pod = self.new_pod(sts, name, ordinal, revision);
                    if let Err(e) = self.client.create(MANAGER, &self.client.pods, ns, pod) {
                        tracing::debug!(statefulset = name, error = %e, "creating pod failed");
                        return Some(Duration::from_millis(200));
                    }
                    if ordered {
                        return None;
                    }
                }
                Some(pod) if pods::is_finished(pod) && !pods::is_terminating(pod) => {
                    let pname = meta_str(pod, "name").unwrap_or("");
                    let _ = self
                        .client
                        .delete(&self.client.pods, ns, pname, meta_str(pod, "uid"));
                    if ordered {
                        return None;
                    }
                }
                Some(pod) if ordered && !healthy(pod) => return None,
                Some(_) => {}
            }
        }
        // Scale down: highest ordinal first.
        let condemned: Vec<&Value> = pods.range(replicas..).rev().map(|(_, p)| p).collect();
        for pod in &condemned {
            if pods::is_terminating(pod) {
                if ordered {
                    return None;
                }
                continue;
            }
            let pname = meta_str(pod, "name").unwrap_or("");
            let _ = self
                .client
                .delete(&self.client.pods, ns, pname, meta_str(pod, "uid"));
            if ordered {
                return None;
            }
        }
        if !condemned.is_empty() || !rolling {
            return None;
        }
        // RollingUpdate: from the highest ordinal down to the partition, one pod at a time.
        for ordinal in (partition..replicas).rev() {
            let pod = pods.get(&ordinal)?;
            if revision_of(pod) != update_revision && !pods::is_terminating(pod) {
                let pname = meta_str(pod, "name").unwrap_or("");
                let _ = self
                    .client
                    .delete(&self.client.pods, ns, pname, meta_str(pod, "uid"));
                return None;
            }
            if !healthy(pod) {
                return None;
            }
        }
        None
    }

    fn status(
        &self,
        ns: &str,
        name: &str,
        current_revision: &str,
        update_revision: &str,
    ) -> Option<Duration> {
        let sts = self.client.get(&self.client.statefulsets, ns, name)?;
        let pods = self.pods_by_ordinal(ns, name, &sts);
        let min_ready =
            Duration::from_secs(u64::try_from(int_at(&sts, "/spec/minReadySeconds")).unwrap_or(0));
        let now = SystemTime::now();
        let mut requeue: Option<Duration> = None;
        let (mut replicas, mut ready, mut available, mut current, mut updated) = (0, 0, 0, 0, 0);
        for pod in pods.values() {
            if pods::is_terminating(pod) {
                continue;
            }
            replicas += 1;
            if is_ready(pod) {
                ready += 1;
            }
            match availability(pod, min_ready, now) {
                (true, _) => available += 1,
                (false, Some(wait)) => requeue = Some(requeue.map_or(wait, |r| r.min(wait))),
                _ => {}
            }
            let revision = revision_of(pod);
            if revision == current_revision {
                current += 1;
            }
            if revision == update_revision {
                updated += 1;
            }
        }
        let mut current_revision = current_revision.to_string();
        if updated == replicas && ready == replicas && replicas == int_at(&sts, "/spec/replicas") {
            current_revision = update_revision.to_string();
            current = updated;
        }
        let status = json!({
            "observedGeneration": int_at(&sts, "/metadata/generation"),
            "replicas": replicas,
            "readyReplicas": ready,
            "availableReplicas": available,
            "currentReplicas": current,
            "updatedReplicas": updated,
            "currentRevision": current_revision,
            "updateRevision": update_revision,
            "collisionCount": int_at(&sts, "/status/collisionCount"),
        });
        if let Err(e) = self
            .client
            .replace_status(MANAGER, &self.client.statefulsets, &sts, status)
        {
            tracing::debug!(statefulset = name, error = %e, "status update failed");
            return Some(Duration::from_millis(100));
        }
        requeue.map(|d| d + Duration::from_millis(50))
    }
}
