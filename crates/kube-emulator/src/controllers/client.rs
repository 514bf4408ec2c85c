//! The controllers' API client: typed shortcuts over the store operations the HTTP
//! handlers use, with a field manager per controller.

use std::sync::Arc;

use serde_json::Value;

use crate::error::ApiResult;
use crate::patch::PatchKind;
use crate::resources::ResourceType;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{DeleteOptions, Deleted, Store, Subresource, WriteOptions};

/// Resource types the controllers work with, resolved once.
#[derive(Clone)]
pub(crate) struct Client {
    pub store: Arc<Store>,
    pub pods: ResourceType,
    pub nodes: ResourceType,
    pub replicasets: ResourceType,
    pub deployments: ResourceType,
    pub statefulsets: ResourceType,
    pub controllerrevisions: ResourceType,
}

impl Client {
    pub(crate) fn new(store: Arc<Store>) -> Option<Self> {
        Some(Self {
            pods: store.resource("", "v1", "pods")?,
            nodes: store.resource("", "v1", "nodes")?,
            replicasets: store.resource("apps", "v1", "replicasets")?,
            deployments: store.resource("apps", "v1", "deployments")?,
            statefulsets: store.resource("apps", "v1", "statefulsets")?,
            controllerrevisions: store.resource("apps", "v1", "controllerrevisions")?,
            store,
        })
    }

    fn opts(manager: &str) -> WriteOptions {
        WriteOptions {
            dry_run: false,
            field_manager: Some(manager.to_string()),
            force: false,
        }
    }

    pub(crate) fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Option<Value> {
        self.store.get(rt, ns, name).ok()
    }

    /// Every object of a type (all namespaces), optionally filtered by labels.
    pub(crate) fn list(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        labels: &LabelSelector,
    ) -> Vec<Value> {
        self.store
            .list(rt, ns, labels, &FieldSelector::default(), None, None)
            .map(|page| page.items)
            .unwrap_or_default()
    }

    /// Objects in `ns` owned by `owner_uid` (the owner index).
    pub(crate) fn owned(&self, rt: &ResourceType, ns: &str, owner_uid: &str) -> Vec<Value> {
        self.store.list_owned(rt, ns, owner_uid)
    }

    pub(crate) fn create(
        &self,
        manager: &str,
        rt: &ResourceType,
        ns: &str,
        obj: Value,
    ) -> ApiResult<Value> {
        self.store.create(rt, ns, obj, &Self::opts(manager))
    }

    /// JSON merge patch of the main resource or its status.
    pub(crate) fn merge(
        &self,
        manager: &str,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        patch: &Value,
        sub: Subresource,
    ) -> ApiResult<Value> {
        self.store.patch(
            rt,
            ns,
            name,
            PatchKind::Merge,
            patch,
            sub,
            &Self::opts(manager),
        )
    }

    /// Replaces `.status` (PUT on `/status`) unless it is unchanged.
    pub(crate) fn replace_status(
        &self,
        manager: &str,
        rt: &ResourceType,
        current: &Value,
        status: Value,
    ) -> ApiResult<()> {
        if current.get("status") == Some(&status) {
            return Ok(());
        }
        let mut body = current.clone();
        body["status"] = status;
        let ns = crate::util::meta_str(current, "namespace").unwrap_or("");
        let name = crate::util::meta_str(current, "name").unwrap_or("");
        self.store
            .update(
                rt,
                ns,
                name,
                body,
                Subresource::Status,
                &Self::opts(manager),
            )
            .map(|_| ())
    }

    /// Deletes with the default (background) propagation and the object's grace period,
    /// guarded by a uid precondition so a replacement with the same name is never hit.
    pub(crate) fn delete(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        uid: Option<&str>,
    ) -> ApiResult<Deleted> {
        let opts = DeleteOptions {
            precondition_uid: uid.map(str::to_string),
            ..DeleteOptions::default()
        };
        self.store.delete(rt, ns, name, &opts)
    }
}
