//! Deployment controller: one ReplicaSet per pod template (`pod-template-hash`),
//! RollingUpdate (maxSurge/maxUnavailable, minReadySeconds through the replica sets'
//! availability) and Recreate rollouts, pausing, revisions, history cleanup and the
//! status and conditions `kubectl rollout status` reads. The algorithms follow
//! kube-controller-manager's `pkg/controller/deployment` (rolling.go, recreate.go,
//! sync.go, progress.go), one step per pass: each pass makes at most one scaling
//! decision and the resulting change events trigger the next.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::pods::{self, POD_TEMPLATE_HASH, int_at, int_or_percent, label_selector};
use super::{Client, Reconciler};
use crate::store::{Subresource, WatchEvent};
use crate::util::{meta_str, now_rfc3339};

const MANAGER: &str = "deployment-controller";
pub(crate) const REVISION: &str = "deployment.kubernetes.io/revision";
const DESIRED: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
/// Deployment annotations not copied onto replica sets.
const NOT_COPIED: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    "deployment.kubernetes.io/revision-history",
    DESIRED,
    MAX_REPLICAS,
    "deprecated.deployment.rollback.to",
];

pub(crate) struct DeploymentController {
    client: Client,
}

impl DeploymentController {
    pub(super) fn new(client: Client) -> Self {
        Self { client }
    }
}

impl Reconciler for DeploymentController {
    type Key = (String, String);

    fn keys_for(&mut self, event: &WatchEvent, out: &mut Vec<Self::Key>) {
        let c = &self.client;
        let ns = &event.namespace;
        if event.key == c.deployments.storage_key() {
            if let Some(name) = meta_str(&event.object, "name") {
                out.push((ns.clone(), name.to_string()));
            }
        } else if event.key == c.replicasets.storage_key() {
            for obj in std::iter::once(&event.object).chain(event.previous.as_ref()) {
                if let Some(("Deployment", name, _)) = pods::controller_of(obj) {
                    out.push((ns.clone(), name.to_string()));
                }
            }
        } else if event.key == c.pods.storage_key()
            && event.kind == crate::store::EventType::Deleted
        {
            // Recreate waits for the old pods to be gone.
            if let Some(("ReplicaSet", rs, _)) = pods::controller_of(&event.object)
                && let Some(rs) = c.get(&c.replicasets, ns, rs)
                && let Some(("Deployment", name, _)) = pods::controller_of(&rs)
            {
                out.push((ns.clone(), name.to_string()));
            }
        }
    }

    fn all_keys(&mut self) -> Vec<Self::Key> {
        super::replicaset::keys_of(&self.client.list(
            &self.client.deployments,
            None,
            &Default::default(),
        ))
    }

    fn reconcile(&mut self, key: &Self::Key) -> Option<Duration> {
        let (ns, name) = key;
        let d = self.client.get(&self.client.deployments, ns, name)?;
        if pods::is_terminating(&d) {
            return None;
        }
        label_selector(d.pointer("/spec/selector"))?;
        let sync = Sync {
            client: &self.client,
            ns,
            name,
            uid: meta_str(&d, "uid").unwrap_or("").to_string(),
            d: &d,
            replicas: int_at(&d, "/spec/replicas"),
        };
        match sync.run() {
            Ok(requeue) => requeue,
            Err(Retry) => Some(Duration::from_millis(200)),
        }
    }
}

/// A write failed (conflict, collision): try the whole pass again shortly.
struct Retry;

struct Sync<'a> {
    client: &'a Client,
    ns: &'a str,
    name: &'a str,
    uid: String,
    d: &'a Value,
    replicas: i64,
}

fn spec_replicas(rs: &Value) -> i64 {
    int_at(rs, "/spec/replicas")
}

fn revision(rs: &Value) -> i64 {
    rs.pointer("/metadata/annotations")
        .and_then(|a| a.get(REVISION))
        .and_then(Value::as_str)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn sum(rss: &[Value], pointer: &str) -> i64 {
    rss.iter().map(|rs| int_at(rs, pointer)).sum()
}

impl Sync<'_> {
    /// One pass; `Ok(Some(d))` asks to be run again when the progress deadline may pass.
    fn run(&self) -> Result<Option<Duration>, Retry> {
        let paused = self
            .d
            .pointer("/spec/paused")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let recreate = self
            .d
            .pointer("/spec/strategy/type")
            .and_then(Value::as_str)
            == Some("Recreate");
        if paused {
            self.sync_paused()?;
        } else if recreate {
            self.rollout_recreate()?;
        } else {
            self.rollout_rolling()?;
        }
        self.sync_status(paused)
    }

    fn owned_replica_sets(&self) -> Vec<Value> {
        let mut rss: Vec<Value> = self
            .client
            .owned(&self.client.replicasets, self.ns, &self.uid)
            .into_iter()
            .filter(|rs| {
                !pods::is_terminating(rs)
                    && matches!(pods::controller_of(rs), Some(("Deployment", _, uid)) if uid == self.uid)
            })
            .collect();
        rss.sort_by(|a, b| {
            pods::creation(a)
                .cmp(&pods::creation(b))
                .then_with(|| meta_str(a, "name").cmp(&meta_str(b, "name")))
        });
        rss
    }

    fn template(&self) -> Value {
        self.d
            .pointer("/spec/template")
            .cloned()
            .unwrap_or(json!({}))
    }

    /// The replica set running the current template (oldest if several) and the others.
    fn new_and_old(&self) -> (Option<Value>, Vec<Value>) {
        let want = pods::without_label(&self.template(), POD_TEMPLATE_HASH);
        let mut new = None;
        let mut old = Vec::new();
        for rs in self.owned_replica_sets() {
            let t = rs.pointer("/spec/template").cloned().unwrap_or(json!({}));
            if new.is_none() && pods::without_label(&t, POD_TEMPLATE_HASH) == want {
                new = Some(rs);
            } else {
                old.push(rs);
            }
        }
        (new, old)
    }

    fn max_surge(&self) -> i64 {
        if self.recreate() {
            return 0;
        }
        int_or_percent(
            self.d.pointer("/spec/strategy/rollingUpdate/maxSurge"),
            self.replicas,
            true,
            "25%",
        )
    }

    fn recreate(&self) -> bool {
        self.d
            .pointer("/spec/strategy/type")
            .and_then(Value::as_str)
            == Some("Recreate")
    }

    /// `MaxUnavailable`: never more than replicas; 0 with 0 surge counts as 1.
    fn max_unavailable(&self) -> i64 {
        if self.recreate() || self.replicas == 0 {
            return 0;
        }
        let surge = self.max_surge();
        let mut unavailable = int_or_percent(
            self.d
                .pointer("/spec/strategy/rollingUpdate/maxUnavailable"),
            self.replicas,
            false,
            "25%",
        );
        if surge == 0 && unavailable == 0 {
            unavailable = 1;
        }
        unavailable.min(self.replicas)
    }

    fn copied_annotations(&self) -> Map<String, Value> {
        self.d
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
            .map(|a| {
                a.iter()
                    .filter(|(k, _)| !NOT_COPIED.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn set_deployment_revision(&self, revision: i64) -> Result<(), Retry> {
        let current = self
            .d
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(REVISION))
            .and_then(Value::as_str);
        if current == Some(revision.to_string().as_str()) {
            return Ok(());
        }
        let patch = json!({"metadata": {"annotations": {REVISION: revision.to_string()}}});
        self.client
            .merge(
                MANAGER,
                &self.client.deployments,
                self.ns,
                self.name,
                &patch,
                Subresource::Main,
            )
            .map(|_| ())
            .map_err(|_| Retry)
    }

    /// Finds or (when `create`) creates the new replica set, keeping its revision the
    /// highest (`getNewReplicaSet`).
    fn new_replica_set(
        &self,
        new: Option<Value>,
        old: &[Value],
        create: bool,
    ) -> Result<Option<Value>, Retry> {
        let max_old = old.iter().map(revision).max().unwrap_or(0);
        let new_revision = max_old + 1;
        if let Some(rs) = new {
            let mut annotations = self.copied_annotations();
            let rev = revision(&rs).max(new_revision);
            annotations.insert(REVISION.into(), json!(rev.to_string()));
            let existing = rs
                .pointer("/metadata/annotations")
                .and_then(Value::as_object);
            let changed = annotations
                .iter()
                .any(|(k, v)| existing.and_then(|e| e.get(k)) != Some(v));
            let rs = if changed {
                let patch = json!({"metadata": {"annotations": annotations}});
                self.client
                    .merge(
                        MANAGER,
                        &self.client.replicasets,
                        self.ns,
                        meta_str(&rs, "name").unwrap_or(""),
                        &patch,
                        Subresource::Main,
                    )
                    .map_err(|_| Retry)?
            } else {
                rs
            };
            self.set_deployment_revision(rev)?;
            return Ok(Some(rs));
        }
        if !create {
            return Ok(None);
        }
        let collisions = int_at(self.d, "/status/collisionCount");
        let template = self.template();
        let hash = pods::template_hash(&template, collisions);
        let mut template = template;
        template["metadata"]["labels"][POD_TEMPLATE_HASH] = json!(hash);
        let mut selector = self
            .d
            .pointer("/spec/selector")
            .cloned()
            .unwrap_or(json!({}));
        selector["matchLabels"][POD_TEMPLATE_HASH] = json!(hash);
        let initial = self.new_rs_replicas(old, None);
        let mut annotations = self.copied_annotations();
        annotations.insert(REVISION.into(), json!(new_revision.to_string()));
        annotations.insert(DESIRED.into(), json!(self.replicas.to_string()));
        annotations.insert(
            MAX_REPLICAS.into(),
            json!((self.replicas + self.max_surge()).to_string()),
        );
        let rs_name = format!("{}-{hash}", self.name);
        let rs = json!({
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": rs_name,
                "namespace": self.ns,
                "labels": template.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
                "annotations": annotations,
                "ownerReferences": [pods::owner_reference(self.d)],
            },
            "spec": {
                "replicas": initial,
                "minReadySeconds": int_at(self.d, "/spec/minReadySeconds"),
                "selector": selector,
                "template": template,
            },
        });
        match self
            .client
            .create(MANAGER, &self.client.replicasets, self.ns, rs)
        {
            Ok(created) => {
                self.set_deployment_revision(new_revision)?;
                Ok(Some(created))
            }
            Err(e) if e.code == 409 => {
                // A replica set with that name but another template: a hash collision.
                let mut status = self.d.get("status").cloned().unwrap_or(json!({}));
                status["collisionCount"] = json!(collisions + 1);
                if let Some(current) = self
                    .client
                    .get(&self.client.deployments, self.ns, self.name)
                {
                    let _ = self.client.replace_status(
                        MANAGER,
                        &self.client.deployments,
                        &current,
                        status,
                    );
                }
                Err(Retry)
            }
            Err(e) => {
                tracing::debug!(deployment = self.name, error = %e, "creating replica set failed");
                Err(Retry)
            }
        }
    }

    /// `NewRSNewReplicas`: how far the new replica set may grow now.
    fn new_rs_replicas(&self, old: &[Value], new: Option<&Value>) -> i64 {
        if self.recreate() {
            return self.replicas;
        }
        let new_spec = new.map_or(0, spec_replicas);
        let current: i64 = sum(old, "/spec/replicas") + new_spec;
        let max_total = self.replicas + self.max_surge();
        if current >= max_total {
            return new_spec;
        }
        let up = (max_total - current).min(self.replicas - new_spec).max(0);
        new_spec + up
    }

    fn scale(&self, rs: &Value, replicas: i64) -> Result<(), Retry> {
        let patch = json!({
            "metadata": {"annotations": {
                DESIRED: self.replicas.to_string(),
                MAX_REPLICAS: (self.replicas + self.max_surge()).to_string(),
            }},
            "spec": {"replicas": replicas},
        });
        self.client
            .merge(
                MANAGER,
                &self.client.replicasets,
                self.ns,
                meta_str(rs, "name").unwrap_or(""),
                &patch,
                Subresource::Main,
            )
            .map(|_| ())
            .map_err(|_| Retry)
    }

    fn rollout_rolling(&self) -> Result<(), Retry> {
        let (new, old) = self.new_and_old();
        let new = self.new_replica_set(new, &old, true)?;
        // reconcileNewReplicaSet
        if let Some(new) = &new {
            let current = spec_replicas(new);
            if current != self.replicas {
                let target = if current > self.replicas {
                    self.replicas
                } else {
                    self.new_rs_replicas(&old, Some(new))
                };
                if target != current {
                    return self.scale(new, target);
                }
            }
        }
        // reconcileOldReplicaSets
        if self.reconcile_old(&old, new.as_ref())? {
            return Ok(());
        }
        self.cleanup_if_complete(&old, new.as_ref())
    }

    fn reconcile_old(&self, old: &[Value], new: Option<&Value>) -> Result<bool, Retry> {
        let old_count = sum(old, "/spec/replicas");
        if old_count == 0 {
            return Ok(false);
        }
        // Scale down only on replica set statuses that reflect their current spec: a
        // replica set controller between deleting pods and reporting it would make the
        // old availability look higher than it is. Its status update triggers the next pass.
        let settled = |rs: &Value| {
            int_at(rs, "/status/observedGeneration") >= int_at(rs, "/metadata/generation")
        };
        if !old.iter().chain(new).all(settled) {
            return Ok(false);
        }
        let new_spec = new.map_or(0, spec_replicas);
        let all_count = old_count + new_spec;
        let min_available = self.replicas - self.max_unavailable();
        let new_unavailable = new_spec - new.map_or(0, |n| int_at(n, "/status/availableReplicas"));
        let max_scaled_down = all_count - min_available - new_unavailable;
        if max_scaled_down <= 0 {
            return Ok(false);
        }
        // cleanupUnhealthyReplicas: old pods that are not available go first.
        let mut scaled = false;
        let mut budget = max_scaled_down;
        let mut remaining: Vec<(Value, i64)> = old
            .iter()
            .map(|rs| (rs.clone(), spec_replicas(rs)))
            .collect();
        for (rs, spec) in &mut remaining {
            if budget <= 0 {
                break;
            }
            let available = int_at(rs, "/status/availableReplicas");
            if *spec == 0 || *spec <= available {
                continue;
            }
            let down = budget.min(*spec - available);
            *spec -= down;
            budget -= down;
            self.scale(rs, *spec)?;
            scaled = true;
        }
        // scaleDownOldReplicaSetsForRollingUpdate: available pods above the minimum.
        let available: i64 = sum(old, "/status/availableReplicas")
            + new.map_or(0, |n| int_at(n, "/status/availableReplicas"));
        if available > min_available {
            let mut total = available - min_available;
            for (rs, spec) in &mut remaining {
                if total <= 0 {
                    break;
                }
                if *spec == 0 {
                    continue;
                }
                let down = total.min(*spec);
                *spec -= down;
                total -= down;
                self.scale(rs, *spec)?;
                scaled = true;
            }
        }
        Ok(scaled)
    }

    fn rollout_recreate(&self) -> Result<(), Retry> {
        let (new, old) = self.new_and_old();
        let mut scaled = false;
        for rs in old.iter().filter(|rs| spec_replicas(rs) > 0) {
            self.scale(rs, 0)?;
            scaled = true;
        }
        if scaled {
            return Ok(());
        }
        // Wait until no pod of an old replica set is left (terminating ones included).
        let old_pods_running = old.iter().any(|rs| {
            let uid = meta_str(rs, "uid").unwrap_or("");
            self.client
                .owned(&self.client.pods, self.ns, uid)
                .iter()
                .any(|p| !pods::is_finished(p))
        });
        if old_pods_running {
            return Ok(());
        }
        let new = self.new_replica_set(new, &old, true)?;
        if let Some(new) = &new
            && spec_replicas(new) != self.replicas
        {
            return self.scale(new, self.replicas);
        }
        self.cleanup_if_complete(&old, new.as_ref())
    }

    /// Paused: no new replica set, only scaling of the active one.
    fn sync_paused(&self) -> Result<(), Retry> {
        let (new, old) = self.new_and_old();
        let new = self.new_replica_set(new, &old, false)?;
        let active: Vec<&Value> = old
            .iter()
            .chain(new.as_ref())
            .filter(|rs| spec_replicas(rs) > 0)
            .collect();
        let target = match (active.as_slice(), &new) {
            ([only], _) => Some(*only),
            ([], Some(new)) => Some(new),
            _ => None,
        };
        if let Some(rs) = target
            && spec_replicas(rs) != self.replicas
        {
            return self.scale(rs, self.replicas);
        }
        Ok(())
    }

    fn is_complete(&self, all: &[Value], new: Option<&Value>) -> bool {
        let updated = new.map_or(0, |n| int_at(n, "/status/replicas"));
        updated == self.replicas
            && sum(all, "/status/replicas") == self.replicas
            && sum(all, "/status/availableReplicas") == self.replicas
    }

    /// Deletes the oldest fully scaled-down replica sets beyond `revisionHistoryLimit`.
    fn cleanup_if_complete(&self, old: &[Value], new: Option<&Value>) -> Result<(), Retry> {
        let all: Vec<Value> = old.iter().chain(new).cloned().collect();
        if !self.is_complete(&all, new) {
            return Ok(());
        }
        let limit = self
            .d
            .pointer("/spec/revisionHistoryLimit")
            .and_then(Value::as_i64)
            .unwrap_or(10)
            .max(0);
        let mut idle: Vec<&Value> = old
            .iter()
            .filter(|rs| spec_replicas(rs) == 0 && int_at(rs, "/status/replicas") == 0)
            .collect();
        let excess = idle
            .len()
            .saturating_sub(usize::try_from(limit).unwrap_or(0));
        idle.sort_by_key(|rs| revision(rs));
        for rs in idle.into_iter().take(excess) {
            let _ = self.client.delete(
                &self.client.replicasets,
                self.ns,
                meta_str(rs, "name").unwrap_or(""),
                meta_str(rs, "uid"),
            );
        }
        Ok(())
    }

    /// `syncRolloutStatus`: counts from the replica sets, Available and Progressing.
    fn sync_status(&self, paused: bool) -> Result<Option<Duration>, Retry> {
        let mut requeue = None;
        let Some(current) = self
            .client
            .get(&self.client.deployments, self.ns, self.name)
        else {
            return Ok(None);
        };
        let (new, old) = self.new_and_old();
        let all: Vec<Value> = old.iter().chain(new.as_ref()).cloned().collect();
        let available = sum(&all, "/status/availableReplicas");
        let total = sum(&all, "/status/replicas");
        let updated = new.as_ref().map_or(0, |n| int_at(n, "/status/replicas"));
        let mut status = Map::new();
        let mut put = |k: &str, v: i64| {
            if v != 0 {
                status.insert(k.into(), json!(v));
            }
        };
        put(
            "observedGeneration",
            int_at(&current, "/metadata/generation"),
        );
        put("replicas", total);
        put("updatedReplicas", updated);
        put("readyReplicas", sum(&all, "/status/readyReplicas"));
        put("availableReplicas", available);
        put("unavailableReplicas", (self.replicas - available).max(0));
        put("collisionCount", int_at(&current, "/status/collisionCount"));
        let now = now_rfc3339();
        let mut conditions: Vec<Value> = current
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if available >= self.replicas - self.max_unavailable() {
            pods::set_condition(
                &mut conditions,
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
                &now,
            );
        } else {
            pods::set_condition(
                &mut conditions,
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
                &now,
            );
        }
        let new_name = new
            .as_ref()
            .and_then(|n| meta_str(n, "name"))
            .unwrap_or(self.name);
        if paused {
            pods::set_condition(
                &mut conditions,
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                "Deployment is paused",
                &now,
            );
        } else if new.is_some() && self.is_complete(&all, new.as_ref()) {
            pods::set_condition(
                &mut conditions,
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                &format!("ReplicaSet \"{new_name}\" has successfully progressed."),
                &now,
            );
        } else if new.is_some() {
            let all_updated = total == updated;
            requeue = self.progress(
                &current,
                &mut conditions,
                new_name,
                all_updated,
                &now,
                |old| {
                    // DeploymentProgressing: more updated, ready or available pods, fewer old.
                    let old_count =
                        |st: &Value| int_at(st, "/replicas") - int_at(st, "/updatedReplicas");
                    updated > int_at(old, "/updatedReplicas")
                        || total - updated < old_count(old)
                        || sum(&all, "/status/readyReplicas") > int_at(old, "/readyReplicas")
                        || available > int_at(old, "/availableReplicas")
                },
            );
        }
        status.insert("conditions".into(), Value::Array(conditions));
        let status = Value::Object(status);
        if current.get("status") == Some(&status) {
            return Ok(requeue);
        }
        self.client
            .replace_status(MANAGER, &self.client.deployments, &current, status)
            .map_err(|_| Retry)?;
        Ok(requeue)
    }

    /// The Progressing condition of a rollout in progress (`progress.go`): refreshed
    /// (`lastUpdateTime` = now) whenever the rollout progressed or a new replica set took
    /// over, `ProgressDeadlineExceeded` once it has not progressed for
    /// `progressDeadlineSeconds`. Returns when to look again.
    fn progress(
        &self,
        current: &Value,
        conditions: &mut Vec<Value>,
        new_name: &str,
        all_updated: bool,
        now: &str,
        progressed: impl FnOnce(&Value) -> bool,
    ) -> Option<Duration> {
        let old_status = current.get("status").cloned().unwrap_or(json!({}));
        let existing = conditions
            .iter()
            .find(|c| c.get("type").and_then(Value::as_str) == Some("Progressing"))
            .cloned();
        let message = |c: &Value| {
            c.get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let reason = |c: &Value| {
            c.get("reason")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        // A completed rollout stays complete while every pod runs the new template (a
        // crashed pod does not reopen it).
        if all_updated
            && existing.as_ref().is_some_and(|c| {
                reason(c) == "NewReplicaSetAvailable"
                    && message(c).contains(&format!("\"{new_name}\""))
            })
        {
            return None;
        }
        let same_rollout = existing.as_ref().is_some_and(|c| {
            message(c).contains(&format!("\"{new_name}\"")) && reason(c) != "NewReplicaSetAvailable"
        });
        let deadline = self
            .d
            .pointer("/spec/progressDeadlineSeconds")
            .and_then(Value::as_i64)
            .filter(|s| *s > 0 && *s < i64::from(i32::MAX));
        let refresh = |conditions: &mut Vec<Value>| {
            conditions.retain(|c| c.get("type").and_then(Value::as_str) != Some("Progressing"));
            conditions.push(json!({
                "type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                "message": format!("ReplicaSet \"{new_name}\" is progressing."),
                "lastUpdateTime": now, "lastTransitionTime":
                    existing.as_ref()
                        .filter(|c| c.get("status").and_then(Value::as_str) == Some("True"))
                        .and_then(|c| c.get("lastTransitionTime").cloned())
                        .unwrap_or_else(|| json!(now)),
            }));
        };
        if !same_rollout || progressed(&old_status) {
            refresh(conditions);
            return deadline
                .map(|s| Duration::from_secs(s.unsigned_abs()) + Duration::from_secs(1));
        }
        let existing = existing?;
        if reason(&existing) == "ProgressDeadlineExceeded" {
            return None;
        }
        let deadline = deadline?;
        let since = existing
            .get("lastUpdateTime")
            .and_then(Value::as_str)
            .and_then(crate::util::parse_time)?;
        let due = since + Duration::from_secs(deadline.unsigned_abs());
        match due.duration_since(std::time::SystemTime::now()) {
            Ok(wait) if !wait.is_zero() => Some(wait + Duration::from_secs(1)),
            _ => {
                pods::set_condition(
                    conditions,
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    &format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                    now,
                );
                None
            }
        }
    }
}
