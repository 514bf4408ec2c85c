//! Deletion: grace periods (the kubelet's part for pods), finalizers, owner-reference
//! garbage collection (background, foreground, orphan) and namespace/CRD cascades.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

use super::{
    DeleteOptions, Deleted, EventType, FOREGROUND_FINALIZER, Inner, ObjectKey, Store, Stored,
    get_stored, present, resource_for,
};
use crate::admission::{is_pod, pod_finished, pod_scheduled};
use crate::crd;
use crate::error::{ApiError, ApiResult};
use crate::resources::{ResourceType, StorageKey};
use crate::selector::{FieldSelector, LabelSelector};
use crate::util::{format_time, has_finalizers, meta_mut, meta_str};

/// Longest grace period honoured (ten years); longer requests are clamped so the
/// deadline arithmetic cannot overflow.
pub(crate) const MAX_GRACE_SECONDS: i64 = 10 * 365 * 24 * 3600;

/// A requested pod grace period as the API server treats it: 0 deletes immediately, a
/// negative value counts as 1 second, and absurdly long periods are capped.
fn clamp_grace(requested: i64) -> i64 {
    match requested {
        0 => 0,
        r if r < 0 => 1,
        r => r.min(MAX_GRACE_SECONDS),
    }
}

impl Store {
    /// Removes an object that is marked for deletion once nothing holds it back.
    pub(super) fn finish_deletion_if_done(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        key: &ObjectKey,
    ) {
        let Some(stored) = inner
            .buckets
            .get(&rt.storage_key())
            .and_then(|b| b.get(key))
        else {
            return;
        };
        if !Self::ready_to_remove(inner, rt, key, &stored.obj) {
            return;
        }
        self.remove_locked(inner, rt, key.clone(), false);
    }

    /// Whether `obj` (the current or about-to-be-written state of `key`) is marked for
    /// deletion with nothing holding it back: no finalizers and, for pods, no grace period
    /// still running.
    pub(super) fn ready_to_remove(
        inner: &Inner,
        rt: &ResourceType,
        key: &ObjectKey,
        obj: &Value,
    ) -> bool {
        obj.pointer("/metadata/deletionTimestamp").is_some()
            && !has_finalizers(obj)
            && !(inner.terminating.contains_key(key) && is_pod(rt))
    }

    pub fn delete(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> ApiResult<Deleted> {
        let mut inner = self.lock();
        self.delete_locked(&mut inner, rt, ns, name, opts)
    }

    pub(super) fn delete_locked(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> ApiResult<Deleted> {
        let current = get_stored(inner, rt, ns, name)?;
        let obj = current.obj.clone();
        let owners = current.owners.clone();
        if let Some(uid) = &opts.precondition_uid
            && meta_str(&obj, "uid") != Some(uid.as_str())
        {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&obj, "uid").unwrap_or("")
                ),
            ));
        }
        if let Some(rv) = &opts.precondition_rv
            && meta_str(&obj, "resourceVersion") != Some(rv.as_str())
        {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta_str(&obj, "resourceVersion").unwrap_or("")
                ),
            ));
        }
        if opts.dry_run {
            return Ok(Deleted::Pending(present(rt, &obj)));
        }
        let key = (ns.to_string(), name.to_string());
        let grace = if is_pod(rt) && !pod_finished(&obj) && pod_scheduled(&obj) {
            let requested = opts
                .grace_period_seconds
                .or_else(|| {
                    obj.pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                })
                .unwrap_or(30);
            let requested = clamp_grace(requested);
            match inner.max_grace {
                Some(max) => requested.min(i64::try_from(max.as_secs()).unwrap_or(i64::MAX)),
                None => requested,
            }
        } else {
            0
        };
        let uid = meta_str(&obj, "uid").unwrap_or("").to_string();
        let wait_for_dependents = opts.foreground
            && !opts.orphan
            && inner.dependents.get(&uid).is_some_and(|d| !d.is_empty());
        if grace == 0 && !has_finalizers(&obj) && !wait_for_dependents {
            inner.terminating.remove(&key);
            // Pods have a graceful-deletion strategy: even a deletion without a grace period
            // is first written (deletionTimestamp now, grace 0: MODIFIED), then removed
            // (DELETED) — unless a zero grace period was written already.
            let zero_written = obj
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                == Some(0);
            if is_pod(rt) && !zero_written {
                let mut marked = obj.clone();
                if let Some(m) = meta_mut(&mut marked) {
                    mark_for_deletion(m, 0);
                }
                self.commit(
                    inner,
                    rt,
                    key.clone(),
                    Some(Stored {
                        obj: marked,
                        owners: owners.clone(),
                    }),
                    EventType::Modified,
                );
            }
            let removed = self.remove_locked(inner, rt, key, opts.orphan);
            return Ok(Deleted::Removed(present(rt, &removed)));
        }
        if grace > 0 {
            let now = Instant::now();
            let deadline = now
                .checked_add(Duration::from_secs(grace.unsigned_abs()))
                .unwrap_or(now);
            let uid = meta_str(&obj, "uid").unwrap_or("").to_string();
            let entry = inner
                .terminating
                .entry(key.clone())
                .or_insert((uid, deadline));
            if deadline < entry.1 {
                entry.1 = deadline;
            }
        } else {
            inner.terminating.remove(&key);
        }
        let mut marked = obj.clone();
        if let Some(m) = meta_mut(&mut marked) {
            // deletionTimestamp is set once; a later delete may only shorten the grace period.
            let current_grace = m.get("deletionGracePeriodSeconds").and_then(Value::as_i64);
            if current_grace.is_none_or(|g| grace < g) {
                mark_for_deletion(m, grace);
            }
            if wait_for_dependents {
                let finalizers = m.entry("finalizers").or_insert_with(|| json!([]));
                if let Some(list) = finalizers.as_array_mut()
                    && !list.contains(&json!(FOREGROUND_FINALIZER))
                {
                    list.push(json!(FOREGROUND_FINALIZER));
                }
            }
        }
        if wait_for_dependents {
            inner.foreground.insert(
                uid.clone(),
                (rt.storage_key(), key.0.clone(), key.1.clone()),
            );
        }
        if marked == obj {
            return Ok(Deleted::Pending(present(rt, &obj)));
        }
        let committed = self.commit(
            inner,
            rt,
            key.clone(),
            Some(Stored {
                obj: marked,
                owners,
            }),
            EventType::Modified,
        );
        if wait_for_dependents {
            let deps: Vec<_> = inner
                .dependents
                .get(&uid)
                .map(|d| d.iter().cloned().collect())
                .unwrap_or_default();
            for (skey, dns, dname) in deps {
                if let Some(dep_rt) = resource_for(inner, &skey) {
                    let cascade = DeleteOptions {
                        foreground: true,
                        ..DeleteOptions::default()
                    };
                    let _ = self.delete_locked(inner, &dep_rt, &dns, &dname, &cascade);
                }
            }
        }
        self.finish_deletion_if_done(inner, rt, &key);
        let current = inner
            .buckets
            .get(&rt.storage_key())
            .and_then(|b| b.get(&key))
            .map(|s| present(rt, &s.obj));
        Ok(match current {
            Some(obj) => Deleted::Pending(obj),
            None => Deleted::Removed(present(rt, &committed)),
        })
    }

    /// Lets an owner in foreground deletion go once its last dependent is gone.
    pub(super) fn release_foreground_owners(&self, inner: &mut Inner, removed: &Value) {
        let owner_uids: Vec<String> = removed
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .map(|refs| {
                refs.iter()
                    .filter_map(|r| r.get("uid")?.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        for uid in owner_uids {
            if inner.dependents.get(&uid).is_some_and(|d| !d.is_empty()) {
                continue;
            }
            let Some((skey, ns, name)) = inner.foreground.remove(&uid) else {
                continue;
            };
            let Some(owner_rt) = resource_for(inner, &skey) else {
                continue;
            };
            let key = (ns, name);
            let Some(stored) = inner.buckets.get(&skey).and_then(|b| b.get(&key)) else {
                continue;
            };
            let mut obj = stored.obj.clone();
            let owners = stored.owners.clone();
            if let Some(list) = obj
                .pointer_mut("/metadata/finalizers")
                .and_then(Value::as_array_mut)
            {
                list.retain(|f| f != FOREGROUND_FINALIZER);
            }
            if Self::ready_to_remove(inner, &owner_rt, &key, &obj) {
                // Only DELETED, carrying the last stored state (`foregroundDeletion` still in
                // it), as when the garbage collector's update removes the last finalizer.
                self.remove_locked(inner, &owner_rt, key, false);
            } else {
                self.commit(
                    inner,
                    &owner_rt,
                    key,
                    Some(Stored { obj, owners }),
                    EventType::Modified,
                );
            }
        }
    }

    /// Removes the owner reference to `owner_uid` from an orphaned dependent.
    pub(super) fn orphan_dependent(
        &self,
        inner: &mut Inner,
        dep: &(StorageKey, String, String),
        owner_uid: &str,
    ) {
        let (skey, ns, name) = dep;
        let Some(dep_rt) = resource_for(inner, skey) else {
            return;
        };
        let key = (ns.clone(), name.clone());
        let Some(stored) = inner.buckets.get(skey).and_then(|b| b.get(&key)) else {
            return;
        };
        let mut obj = stored.obj.clone();
        let owners = stored.owners.clone();
        if let Some(refs) = obj
            .pointer_mut("/metadata/ownerReferences")
            .and_then(Value::as_array_mut)
        {
            refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
        }
        self.commit(
            inner,
            &dep_rt,
            key,
            Some(Stored { obj, owners }),
            EventType::Modified,
        );
    }

    /// Deletes every object matching the selectors; returns the affected objects.
    pub fn delete_collection(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        opts: &DeleteOptions,
    ) -> ApiResult<Vec<Value>> {
        let mut inner = self.lock();
        let keys: Vec<ObjectKey> = inner
            .buckets
            .get(&rt.storage_key())
            .map(|b| {
                b.iter()
                    .filter(|((ons, _), s)| {
                        ns.is_none_or(|n| n == ons)
                            && labels.matches(&s.obj)
                            && fields.matches(&s.obj)
                    })
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut out = Vec::with_capacity(keys.len());
        for (ons, name) in keys {
            match self.delete_locked(&mut inner, rt, &ons, &name, opts)? {
                Deleted::Removed(o) | Deleted::Pending(o) => out.push(o),
            }
        }
        Ok(out)
    }

    /// Removes the object now, emits DELETED (carrying the stored state at the deletion's
    /// resourceVersion), and cascades to dependents and namespace contents.
    pub(super) fn remove_locked(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        key: ObjectKey,
        orphan: bool,
    ) -> Value {
        let removed = self.commit(inner, rt, key.clone(), None, EventType::Deleted);
        inner.terminating.remove(&key);
        if rt.group.is_empty() && rt.plural == "namespaces" {
            self.purge_namespace(inner, &key.1);
        }
        if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
            self.unregister_crd(inner, &removed);
        }
        if let Some(uid) = meta_str(&removed, "uid")
            && let Some(deps) = inner.dependents.remove(uid)
        {
            inner.foreground.remove(uid);
            for dep in deps {
                if orphan {
                    self.orphan_dependent(inner, &dep, uid);
                } else if let Some(dep_rt) = resource_for(inner, &dep.0) {
                    let _ = self.delete_locked(
                        inner,
                        &dep_rt,
                        &dep.1,
                        &dep.2,
                        &DeleteOptions::default(),
                    );
                }
            }
        }
        self.release_foreground_owners(inner, &removed);
        removed
    }

    pub(super) fn purge_namespace(&self, inner: &mut Inner, ns: &str) {
        let types: Vec<ResourceType> = inner
            .resources
            .iter()
            .filter(|r| r.namespaced)
            .cloned()
            .collect();
        let mut seen = HashSet::new();
        for rt in types {
            if !seen.insert(rt.storage_key()) {
                continue;
            }
            let keys: Vec<ObjectKey> = inner
                .buckets
                .get(&rt.storage_key())
                .map(|b| b.keys().filter(|(o, _)| o == ns).cloned().collect())
                .unwrap_or_default();
            for key in keys {
                self.remove_locked(inner, &rt, key, true);
            }
        }
    }

    pub(super) fn unregister_crd(&self, inner: &mut Inner, crd: &Value) {
        let Ok(types) = crd::resource_types(crd) else {
            return;
        };
        let Some(first) = types.first() else { return };
        let skey = first.storage_key();
        let keys: Vec<ObjectKey> = inner
            .buckets
            .get(&skey)
            .map(|b| b.keys().cloned().collect())
            .unwrap_or_default();
        for key in keys {
            self.remove_locked(inner, first, key, true);
        }
        inner.buckets.remove(&skey);
        inner
            .resources
            .retain(|r| !(r.custom && r.storage_key() == skey));
    }

    /// Removes pods whose grace period has ended. Called periodically by the emulator.
    pub fn reap_terminated_pods(&self) {
        let mut inner = self.lock();
        let now = Instant::now();
        let due: Vec<ObjectKey> = inner
            .terminating
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let Some(pods) = inner.resources.iter().find(|r| is_pod(r)).cloned() else {
            return;
        };
        for key in due {
            inner.terminating.remove(&key);
            self.finish_deletion_if_done(&mut inner, &pods, &key);
        }
    }

    /// Ends all current grace periods now (test helper).
    pub fn expire_grace_periods(&self) {
        {
            let mut inner = self.lock();
            let now = Instant::now();
            for entry in inner.terminating.values_mut() {
                entry.1 = now;
            }
        }
        self.reap_terminated_pods();
    }

    /// Caps grace periods of future pod deletions (test helper).
    pub fn set_max_grace_period(&self, max: Option<Duration>) {
        self.lock().max_grace = max;
    }
}

/// Writes a deletion with `grace` seconds into an object's metadata: `deletionTimestamp`
/// (now + grace) and `deletionGracePeriodSeconds`. Like the API server, setting
/// `deletionTimestamp` (not shortening it) bumps a tracked generation.
fn mark_for_deletion(m: &mut serde_json::Map<String, Value>, grace: i64) {
    if !m.contains_key("deletionTimestamp")
        && let Some(generation) = m
            .get("generation")
            .and_then(Value::as_i64)
            .filter(|g| *g > 0)
    {
        m.insert("generation".into(), json!(generation + 1));
    }
    let now = SystemTime::now();
    let at = now
        .checked_add(Duration::from_secs(grace.unsigned_abs()))
        .unwrap_or(now);
    m.insert("deletionTimestamp".into(), json!(format_time(at, false)));
    m.insert("deletionGracePeriodSeconds".into(), json!(grace));
}

#[cfg(test)]
mod tests {
    use super::{MAX_GRACE_SECONDS, clamp_grace};

    #[test]
    fn grace_periods_are_clamped() {
        assert_eq!(clamp_grace(0), 0);
        assert_eq!(clamp_grace(-5), 1);
        assert_eq!(clamp_grace(i64::MIN), 1);
        assert_eq!(clamp_grace(30), 30);
        assert_eq!(clamp_grace(i64::MAX), MAX_GRACE_SECONDS);
    }
}
