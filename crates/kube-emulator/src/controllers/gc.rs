//! Garbage collector for dangling dependents. Cascading deletion when an owner is
//! deleted (background, foreground with the `foregroundDeletion` finalizer, orphan) is
//! part of the store's delete operation and always on; this controller adds what the
//! real garbage collector does besides: an object whose owners are all gone — e.g. a
//! pod a controller created while its owner was being deleted, or an object created
//! with a stale owner reference — is deleted in the background.

use std::time::Duration;

use serde_json::Value;

use super::{Client, Reconciler};
use crate::resources::{ResourceType, StorageKey};
use crate::store::{EventType, WatchEvent};
use crate::util::meta_str;

pub(crate) struct GarbageCollector {
    client: Client,
}

impl GarbageCollector {
    pub(super) fn new(client: Client) -> Self {
        Self { client }
    }

    fn resource_of(&self, key: &StorageKey) -> Option<ResourceType> {
        self.client
            .store
            .resources()
            .into_iter()
            .find(|r| r.storage_key() == *key)
    }

    /// Whether the owner named by `reference` exists (same uid) in `ns`.
    fn owner_exists(&self, ns: &str, reference: &Value) -> bool {
        let field = |f: &str| reference.get(f).and_then(Value::as_str).unwrap_or("");
        let (group, version) = field("apiVersion")
            .split_once('/')
            .unwrap_or(("", field("apiVersion")));
        let Some(rt) = self
            .client
            .store
            .resources()
            .into_iter()
            .find(|r| r.group == group && r.version == version && r.kind == field("kind"))
        else {
            // An owner of a kind this server does not serve cannot be checked; keep it.
            return true;
        };
        let owner_ns = if rt.namespaced { ns } else { "" };
        self.client
            .get(&rt, owner_ns, field("name"))
            .is_some_and(|o| meta_str(&o, "uid") == Some(field("uid")))
    }
}

fn has_owners(obj: &Value) -> bool {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|r| !r.is_empty())
}

impl Reconciler for GarbageCollector {
    type Key = (StorageKey, String, String);

    fn keys_for(&mut self, event: &WatchEvent, out: &mut Vec<Self::Key>) {
        // Only new dependents: later owner deletions cascade in the store.
        if event.kind == EventType::Added
            && has_owners(&event.object)
            && let Some(name) = meta_str(&event.object, "name")
        {
            out.push((event.key.clone(), event.namespace.clone(), name.to_string()));
        }
    }

    fn all_keys(&mut self) -> Vec<Self::Key> {
        Vec::new()
    }

    fn reconcile(&mut self, key: &Self::Key) -> Option<Duration> {
        let (skey, ns, name) = key;
        let rt = self.resource_of(skey)?;
        let obj = self.client.get(&rt, ns, name)?;
        if obj.pointer("/metadata/deletionTimestamp").is_some() {
            return None;
        }
        let refs = obj.pointer("/metadata/ownerReferences")?.as_array()?;
        if refs.is_empty() || refs.iter().any(|r| self.owner_exists(ns, r)) {
            return None;
        }
        tracing::debug!(object = name, "deleting dependent whose owners are gone");
        let _ = self.client.delete(&rt, ns, name, meta_str(&obj, "uid"));
        None
    }
}
