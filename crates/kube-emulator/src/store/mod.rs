//! Object storage: an etcd-like global `resourceVersion`, bounded event history and
//! watch fan-out, plus the write semantics every resource shares (optimistic
//! concurrency, generation, status subresource, finalizers, graceful pod deletion,
//! owner-reference garbage collection).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::broadcast;

mod deletion;

use crate::admission::{
    applied_for_subresource, apply_defaults, check_kind, check_patched, check_shape,
    fold_string_data, prepare_create, scope_namespace, set_server_labels, spec_of,
    tracks_generation, validate,
};
use crate::crd;
use crate::error::{ApiError, ApiResult, Cause};
use crate::events;
use crate::patch::{self, FieldOwners, PatchKind};
pub use crate::resources::Subresource;
use crate::resources::{ResourceType, StorageKey, builtin_resources};
use crate::selector::{FieldSelector, LabelSelector};
use crate::util::{self, meta_mut, meta_str, now_rfc3339};

/// Tunables for a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// How many events are retained for watches that resume from a `resourceVersion`.
    /// Older versions get `410 Gone`.
    pub history_limit: usize,
    /// Capacity of the live fan-out channel; a watcher that falls further behind is closed.
    pub watch_buffer: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            history_limit: 10_000,
            watch_buffer: 16_384,
        }
    }
}

/// Watch event types as they appear on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One committed change. The object is serialized once and shared by all watchers.
#[derive(Debug)]
pub struct WatchEvent {
    pub rv: u64,
    pub key: StorageKey,
    pub namespace: String,
    pub kind: EventType,
    pub object: Value,
    pub json: String,
    /// The object before a modification, to translate selector transitions.
    pub previous: Option<Value>,
}

/// Options shared by write verbs.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub dry_run: bool,
    pub field_manager: Option<String>,
    pub force: bool,
}

/// Parsed `DeleteOptions`.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    pub grace_period_seconds: Option<i64>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub orphan: bool,
    /// `propagationPolicy=Foreground`: the owner stays (with the `foregroundDeletion`
    /// finalizer) until its dependents are gone.
    pub foreground: bool,
    pub dry_run: bool,
}

/// Result of a delete: removed now, or marked for deletion (grace period / finalizers).
#[derive(Debug)]
pub enum Deleted {
    Removed(Value),
    Pending(Value),
}

/// A page of list results.
#[derive(Debug)]
pub struct ListPage<T = Value> {
    pub items: Vec<T>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
}

/// How a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStart {
    /// `resourceVersion` unset or `0`: synthetic ADDED events for current objects first.
    Current,
    /// Resume after this version; 410 if it is older than the retained history.
    After(u64),
}

/// A registered watch: backlog to replay, then the live channel.
pub struct Subscription {
    pub backlog: Vec<Arc<WatchEvent>>,
    pub receiver: broadcast::Receiver<Arc<WatchEvent>>,
    pub start_rv: u64,
}

struct Stored {
    obj: Value,
    owners: FieldOwners,
}

type ObjectKey = (String, String);

struct Inner {
    rv: u64,
    resources: Vec<ResourceType>,
    buckets: HashMap<StorageKey, BTreeMap<ObjectKey, Stored>>,
    history: VecDeque<Arc<WatchEvent>>,
    /// Events with `rv <= compacted` have been dropped from history.
    compacted: u64,
    /// Pods in their termination grace period, by (namespace, name) -> (uid, deadline).
    terminating: HashMap<ObjectKey, (String, Instant)>,
    /// Upper bound applied to pod grace periods (test helper).
    max_grace: Option<Duration>,
    /// owner uid -> dependents, for garbage collection on owner removal.
    dependents: HashMap<String, HashSet<(StorageKey, String, String)>>,
    /// Owners in foreground deletion, by uid, waiting for their dependents.
    foreground: HashMap<String, (StorageKey, String, String)>,
}

/// The in-memory object store shared by all request handlers.
pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<WatchEvent>>,
    config: StoreConfig,
}

const POD_STATUS_FIELDS: &[&str] = &["status.phase", "spec.nodeName"];

impl Store {
    pub fn new(config: StoreConfig) -> Self {
        let (events, _) = broadcast::channel(config.watch_buffer.max(16));
        let store = Self {
            inner: Mutex::new(Inner {
                rv: 1,
                resources: builtin_resources(),
                buckets: HashMap::new(),
                history: VecDeque::new(),
                compacted: 0,
                terminating: HashMap::new(),
                max_grace: None,
                dependents: HashMap::new(),
                foreground: HashMap::new(),
            }),
            events,
            config,
        };
        if let Some(ns_type) = store.resource("", "v1", "namespaces") {
            for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                let obj = json!({"metadata": {"name": name}});
                let _ = store.create(&ns_type, "", obj, &WriteOptions::default());
            }
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave partial writes behind (every
        // commit is a single map insert), so a poisoned lock is safe to reuse.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// All served resource types.
    pub fn resources(&self) -> Vec<ResourceType> {
        self.lock().resources.clone()
    }

    /// Looks up a served type by group, version and plural name.
    pub fn resource(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.lock()
            .resources
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
            .cloned()
    }

    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> ApiResult<Value> {
        let inner = self.lock();
        let stored = inner
            .buckets
            .get(&rt.storage_key())
            .and_then(|b| b.get(&(ns.to_string(), name.to_string())))
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))?;
        Ok(present(rt, &stored.obj))
    }

    /// Lists objects in key order, filtered and paginated.
    pub fn list(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> ApiResult<ListPage> {
        self.scan(rt, ns, labels, fields, limit, continue_token, |o| {
            present(rt, o)
        })
    }

    /// Like [`Store::list`], but each item is already JSON-encoded. Encoding under the
    /// lock avoids cloning every object, which dominates large lists.
    pub fn list_encoded(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> ApiResult<ListPage<Vec<u8>>> {
        let as_stored = !rt.custom && !events::is_view(rt);
        self.scan(rt, ns, labels, fields, limit, continue_token, |o| {
            let encoded = if as_stored {
                serde_json::to_vec(o)
            } else {
                serde_json::to_vec(&present(rt, o))
            };
            encoded.unwrap_or_default()
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn scan<T>(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        limit: Option<usize>,
        continue_token: Option<&str>,
        mut render: impl FnMut(&Value) -> T,
    ) -> ApiResult<ListPage<T>> {
        let start = match continue_token {
            Some(t) if !t.is_empty() => Some(decode_continue(t)?),
            _ => None,
        };
        let inner = self.lock();
        // Later pages report the first page's version, as the API server does for its
        // snapshot, so a watch started from the list's version sees every change made
        // while paging. That version must still be inside the watch history.
        let list_rv = match &start {
            Some((rv, _)) if *rv < inner.compacted => {
                return Err(ApiError::gone(format!(
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter (resource version {rv})."
                )));
            }
            Some((rv, _)) => *rv,
            None => inner.rv,
        };
        let mut items = Vec::new();
        let mut last_key: Option<&ObjectKey> = None;
        let mut continue_key = None;
        if let Some(bucket) = inner.buckets.get(&rt.storage_key()) {
            let lower = match (&start, ns) {
                (Some((_, k)), _) => std::ops::Bound::Excluded(k.clone()),
                (None, Some(ns)) => std::ops::Bound::Included((ns.to_string(), String::new())),
                (None, None) => std::ops::Bound::Unbounded,
            };
            for (key, stored) in bucket.range((lower, std::ops::Bound::Unbounded)) {
                if let Some(ns) = ns
                    && key.0 != ns
                {
                    break;
                }
                if !labels.matches(&stored.obj) || !fields.matches(&stored.obj) {
                    continue;
                }
                if limit.is_some_and(|l| l > 0 && items.len() == l) {
                    continue_key = last_key.cloned();
                    break;
                }
                items.push(render(&stored.obj));
                last_key = Some(key);
            }
        }
        Ok(ListPage {
            items,
            resource_version: list_rv,
            continue_token: continue_key.map(|(ns, name)| encode_continue(list_rv, &ns, &name)),
        })
    }

    /// Parses a field selector for `rt`; selectors always apply to the stored form.
    pub fn field_selector(&self, rt: &ResourceType, s: &str) -> ApiResult<FieldSelector> {
        if events::is_view(rt) {
            return FieldSelector::parse(
                &events::view_field_selector(s),
                events::CORE_EVENT_FIELDS,
            );
        }
        let extra: &[&str] = match (rt.group.as_str(), rt.plural.as_str()) {
            ("", "pods") => POD_STATUS_FIELDS,
            ("", "events") => events::CORE_EVENT_FIELDS,
            _ => &[],
        };
        FieldSelector::parse(s, extra)
    }

    /// Registers a watch atomically with respect to commits, so no event is missed.
    pub fn subscribe(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        start: WatchStart,
    ) -> ApiResult<Subscription> {
        let inner = self.lock();
        let receiver = self.events.subscribe();
        let key = rt.storage_key();
        let backlog = match start {
            WatchStart::Current => inner
                .buckets
                .get(&key)
                .map(|b| {
                    b.iter()
                        .filter(|((ons, _), _)| ns.is_none_or(|n| n == ons))
                        .map(|((ons, _), s)| {
                            // The events.k8s.io view keeps the stored core form, like
                            // live events: the watch converts (and filters) it once.
                            let object = if events::is_view(rt) {
                                s.obj.clone()
                            } else {
                                present(rt, &s.obj)
                            };
                            Arc::new(WatchEvent {
                                rv: inner.rv,
                                key: key.clone(),
                                namespace: ons.clone(),
                                kind: EventType::Added,
                                json: serde_json::to_string(&object).unwrap_or_default(),
                                object,
                                previous: None,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
            WatchStart::After(rv) => {
                if rv < inner.compacted {
                    return Err(ApiError::gone(format!(
                        "too old resource version: {rv} ({})",
                        inner.compacted + 1
                    )));
                }
                inner
                    .history
                    .iter()
                    .filter(|e| e.rv > rv)
                    .cloned()
                    .collect()
            }
        };
        Ok(Subscription {
            backlog,
            receiver,
            start_rv: inner.rv,
        })
    }

    pub fn create(
        &self,
        rt: &ResourceType,
        ns: &str,
        body: Value,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        let mut inner = self.lock();
        if events::is_view(rt) {
            let core = core_events(&inner)?;
            let created = self.create_locked(
                &mut inner,
                &core,
                ns,
                events::view_to_core(&body),
                FieldOwners::default(),
                opts,
            )?;
            return Ok(events::core_to_view(&created));
        }
        self.create_locked(&mut inner, rt, ns, body, FieldOwners::default(), opts)
    }

    #[allow(clippy::too_many_arguments)]
    fn create_locked(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        ns: &str,
        mut obj: Value,
        owners: FieldOwners,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        check_kind(rt, &obj)?;
        let ns = scope_namespace(rt, ns, &obj)?;
        if rt.namespaced {
            ensure_namespace(inner, &ns)?;
        }
        let meta = meta_mut(&mut obj)
            .ok_or_else(|| ApiError::bad_request("object must be a JSON object"))?;
        let mut name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty()
            && let Some(prefix) = meta.get("generateName").and_then(Value::as_str)
        {
            name = format!("{prefix}{}", util::random_suffix());
        }
        if name.is_empty() {
            return Err(ApiError::invalid(
                &rt.group,
                &rt.kind,
                "",
                vec![Cause {
                    reason: "FieldValueRequired",
                    field: "metadata.name".into(),
                    message: "Required value: name or generateName is required".into(),
                }],
            ));
        }
        if !util::is_dns_subdomain(&name) {
            return Err(ApiError::invalid(
                &rt.group,
                &rt.kind,
                &name,
                vec![Cause {
                    reason: "FieldValueInvalid",
                    field: "metadata.name".into(),
                    message: format!(
                        "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
                    ),
                }],
            ));
        }
        meta.insert("name".into(), json!(name));
        if rt.namespaced {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        meta.insert("uid".into(), json!(util::new_uid()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        if tracks_generation(rt) {
            meta.insert("generation".into(), json!(1));
        } else {
            meta.remove("generation");
        }
        for system in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ] {
            meta.remove(system);
        }
        set_type(rt, &mut obj);
        prepare_create(rt, &mut obj);
        fold_string_data(rt, &mut obj);
        validate(rt, &mut obj, &name)?;
        let key = rt.storage_key();
        let obj_key = (ns.clone(), name.clone());
        if inner
            .buckets
            .get(&key)
            .is_some_and(|b| b.contains_key(&obj_key))
        {
            return Err(ApiError::already_exists(&rt.group, &rt.plural, &name));
        }
        if opts.dry_run {
            return Ok(obj);
        }
        if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
            register_crd(inner, &obj, &name)?;
            obj["status"] = crd::established_status(&obj, &now_rfc3339());
        }
        let committed = self.commit(
            inner,
            rt,
            obj_key,
            Some(Stored { obj, owners }),
            EventType::Added,
        );
        if rt.group.is_empty() && rt.plural == "namespaces" {
            Self::create_default_service_account(self, inner, &name);
        }
        Ok(present(rt, &committed))
    }

    /// Every namespace gets a `default` ServiceAccount right after it is created (the
    /// serviceaccount controller's job in Kubernetes), so clients that look for it — or
    /// manifests that name it — find it.
    fn create_default_service_account(&self, inner: &mut Inner, ns: &str) {
        let Some(sa) = inner
            .resources
            .iter()
            .find(|r| r.group.is_empty() && r.plural == "serviceaccounts")
            .cloned()
        else {
            return;
        };
        let body =
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}});
        // AlreadyExists (a namespace re-created while its old SA lingers) is fine.
        let _ = self.create_locked(
            inner,
            &sa,
            ns,
            body,
            FieldOwners::default(),
            &WriteOptions::default(),
        );
    }

    /// PUT: full replacement with optimistic concurrency.
    pub fn update(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        body: Value,
        sub: Subresource,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        if events::is_view(rt) {
            let core = core_events(&self.lock())?;
            let updated = self.update(&core, ns, name, events::view_to_core(&body), sub, opts)?;
            return Ok(events::core_to_view(&updated));
        }
        check_kind(rt, &body)?;
        if let Some(body_name) = meta_str(&body, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let mut inner = self.lock();
        let current = get_stored(&inner, rt, ns, name)?;
        let expected_rv = meta_str(&body, "resourceVersion").filter(|rv| !rv.is_empty());
        if let Some(rv) = expected_rv
            && Some(rv) != meta_str(&current.obj, "resourceVersion")
        {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.plural,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        let old = current.obj.clone();
        let owners = current.owners.clone();
        self.write_locked(&mut inner, rt, ns, name, old, body, owners, sub, opts)
    }

    /// PATCH in any of the supported formats; server-side apply may create.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        kind: PatchKind,
        body: &Value,
        sub: Subresource,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        if events::is_view(rt) {
            return self.patch_event_view(rt, ns, name, kind, body, sub, opts);
        }
        let mut inner = self.lock();
        let existing = inner
            .buckets
            .get(&rt.storage_key())
            .and_then(|b| b.get(&(ns.to_string(), name.to_string())))
            .map(|s| (s.obj.clone(), s.owners.clone()));
        let manager = opts.field_manager.clone().unwrap_or_default();
        let Some((old, mut owners)) = existing else {
            if kind != PatchKind::Apply || sub == Subresource::Status {
                return Err(ApiError::not_found(&rt.group, &rt.plural, name));
            }
            let mut created = applied_for_subresource(rt, body, sub);
            if let Some(m) = meta_mut(&mut created) {
                m.insert("name".into(), json!(name));
            }
            let mut owners = FieldOwners::default();
            let applied = patch::server_side_apply(
                &Value::Null,
                &created,
                &manager,
                true,
                &mut owners,
                list_semantics(rt),
            )
            .map_err(|_| ApiError::internal("apply to an empty object conflicted"))?;
            return self.create_locked(&mut inner, rt, ns, applied, owners, opts);
        };
        let mut patched = old.clone();
        match kind {
            PatchKind::Merge => patch::merge_patch(&mut patched, body),
            PatchKind::Json => patch::json_patch(&mut patched, body)?,
            PatchKind::Strategic => {
                if rt.custom {
                    return Err(ApiError::unsupported_media_type(
                        "application/strategic-merge-patch+json is not supported for custom resources",
                    ));
                }
                patch::strategic_merge(&mut patched, body);
            }
            PatchKind::Apply => {
                if manager.is_empty() {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    )
                    .with_details(json!({"group": "meta.k8s.io", "kind": "PatchOptions",
                        "causes": [{"reason": "FieldValueRequired",
                            "message": "Required value: is required for apply patch",
                            "field": "fieldManager"}]})));
                }
                check_kind(rt, body)?;
                // Ownership is tracked per subresource, as managedFields entries are.
                let applied = applied_for_subresource(rt, body, sub);
                let owner_key = match sub {
                    Subresource::Main => manager.clone(),
                    Subresource::Status => format!("{manager}{}", patch::STATUS_OWNER_SUFFIX),
                };
                patched = patch::server_side_apply(
                    &old,
                    &applied,
                    &owner_key,
                    opts.force,
                    &mut owners,
                    list_semantics(rt),
                )
                .map_err(|conflicts| patch::conflict_error(&conflicts))?;
            }
        }
        check_patched(rt, name, &patched)?;
        if let Some(rv) = meta_str(&patched, "resourceVersion")
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.plural,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        if kind != PatchKind::Apply {
            owners.forget_changed(&old, &patched);
        }
        self.write_locked(&mut inner, rt, ns, name, old, patched, owners, sub, opts)
    }

    /// Patches an events.k8s.io/v1 Event: the patch applies to the v1 form, the result
    /// is stored as core/v1. Server-side apply is treated as a merge (no ownership).
    #[allow(clippy::too_many_arguments)]
    fn patch_event_view(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        kind: PatchKind,
        body: &Value,
        sub: Subresource,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        let mut inner = self.lock();
        let core = core_events(&inner)?;
        let existing = get_stored(&inner, &core, ns, name)
            .ok()
            .map(|s| (s.obj.clone(), s.owners.clone()));
        let Some((old, owners)) = existing else {
            if kind != PatchKind::Apply {
                return Err(ApiError::not_found(&rt.group, &rt.plural, name));
            }
            let mut created = body.clone();
            if let Some(m) = meta_mut(&mut created) {
                m.insert("name".into(), json!(name));
            }
            let out = self.create_locked(
                &mut inner,
                &core,
                ns,
                events::view_to_core(&created),
                FieldOwners::default(),
                opts,
            )?;
            return Ok(events::core_to_view(&out));
        };
        let mut view = events::core_to_view(&old);
        match kind {
            PatchKind::Merge | PatchKind::Apply => patch::merge_patch(&mut view, body),
            PatchKind::Json => patch::json_patch(&mut view, body)?,
            PatchKind::Strategic => patch::strategic_merge(&mut view, body),
        }
        check_shape(&view)?;
        if let Some(rv) = meta_str(&view, "resourceVersion")
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.plural,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        let new = events::view_to_core(&view);
        let out = self.write_locked(&mut inner, &core, ns, name, old, new, owners, sub, opts)?;
        Ok(events::core_to_view(&out))
    }

    /// Shared tail of update and patch: preserve system metadata, honour the status
    /// subresource, validate, bump generation, commit, and finish deletion if due.
    #[allow(clippy::too_many_arguments)]
    fn write_locked(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        old: Value,
        mut new: Value,
        owners: FieldOwners,
        sub: Subresource,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        check_shape(&new)?;
        if sub == Subresource::Status {
            let status = new.get("status").cloned();
            new = old.clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        } else if rt.status_subresource {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        if let Some(m) = meta_mut(&mut new) {
            for keep in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "namespace",
                "name",
                "resourceVersion",
            ] {
                match old.get("metadata").and_then(|om| om.get(keep)) {
                    Some(v) => m.insert(keep.to_string(), v.clone()),
                    None => m.remove(keep),
                };
            }
            m.remove("managedFields");
        }
        set_type(rt, &mut new);
        if sub == Subresource::Main {
            apply_defaults(rt, &mut new);
        }
        fold_string_data(rt, &mut new);
        set_server_labels(rt, &mut new);
        validate(rt, &mut new, name)?;
        if tracks_generation(rt) && spec_of(&old) != spec_of(&new) {
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            new["metadata"]["generation"] = json!(generation + 1);
        }
        if opts.dry_run {
            return Ok(present(rt, &new));
        }
        set_managed_fields(&mut new, &owners);
        if new == old {
            // No-op writes do not bump resourceVersion, as in Kubernetes.
            return Ok(present(rt, &new));
        }
        let is_crd = rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions";
        if is_crd && sub == Subresource::Main {
            register_crd(inner, &new, name)?;
        }
        let obj_key = (ns.to_string(), name.to_string());
        if Self::ready_to_remove(inner, rt, &obj_key, &new) {
            // Removing the last finalizer of an object marked for deletion deletes it. As in
            // the API server, the write is never stored: it answers with the written state,
            // and the DELETED event carries the last stored one (finalizers and all, at the
            // deletion's resourceVersion: etcd's previous value of the key).
            self.remove_locked(inner, rt, obj_key, false);
            return Ok(present(rt, &new));
        }
        let committed = self.commit(
            inner,
            rt,
            obj_key,
            Some(Stored { obj: new, owners }),
            EventType::Modified,
        );
        Ok(present(rt, &committed))
    }

    /// Applies a change, assigns the next resourceVersion, records history and fans out.
    /// Returns the committed (or, for deletes, the final) object.
    fn commit(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        key: ObjectKey,
        new: Option<Stored>,
        kind: EventType,
    ) -> Value {
        inner.rv += 1;
        let rv = inner.rv;
        let skey = rt.storage_key();
        let bucket = inner.buckets.entry(skey.clone()).or_default();
        let previous = bucket.remove(&key).map(|s| s.obj);
        let object = if let Some(mut stored) = new {
            set_managed_fields(&mut stored.obj, &stored.owners);
            if let Some(m) = meta_mut(&mut stored.obj) {
                m.insert("resourceVersion".into(), json!(rv.to_string()));
            }
            let obj = stored.obj.clone();
            // A DELETED event (none is committed with a new state now) is not stored.
            if kind != EventType::Deleted {
                bucket.insert(key.clone(), stored);
            }
            obj
        } else {
            let mut obj = previous.clone().unwrap_or(Value::Null);
            if let Some(m) = meta_mut(&mut obj) {
                m.insert("resourceVersion".into(), json!(rv.to_string()));
            }
            obj
        };
        let object_for_index = if kind == EventType::Deleted {
            None
        } else {
            Some(&object)
        };
        update_dependents(inner, &skey, &key, previous.as_ref(), object_for_index);
        let event = Arc::new(WatchEvent {
            rv,
            key: skey,
            namespace: key.0,
            kind,
            json: serde_json::to_string(&object).unwrap_or_default(),
            object: object.clone(),
            previous: if kind == EventType::Modified {
                previous
            } else {
                None
            },
        });
        inner.history.push_back(event.clone());
        while inner.history.len() > self.config.history_limit.max(1) {
            if let Some(old) = inner.history.pop_front() {
                inner.compacted = old.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(event);
        object
    }

    /// Receives every committed change of every resource (the store's change feed), for
    /// in-process controllers. Subscribe before listing so nothing is missed.
    pub fn feed(&self) -> broadcast::Receiver<Arc<WatchEvent>> {
        self.events.subscribe()
    }

    /// Objects of type `rt` in `ns` whose `ownerReferences` name `owner_uid`, from the
    /// owner index (what an informer's owner index answers).
    pub fn list_owned(&self, rt: &ResourceType, ns: &str, owner_uid: &str) -> Vec<Value> {
        let inner = self.lock();
        let skey = rt.storage_key();
        let Some(deps) = inner.dependents.get(owner_uid) else {
            return Vec::new();
        };
        let Some(bucket) = inner.buckets.get(&skey) else {
            return Vec::new();
        };
        let mut out: Vec<Value> = deps
            .iter()
            .filter(|(k, dns, _)| *k == skey && dns == ns)
            .filter_map(|(_, dns, name)| bucket.get(&(dns.clone(), name.clone())))
            .map(|s| present(rt, &s.obj))
            .collect();
        out.sort_by(|a, b| meta_str(a, "name").cmp(&meta_str(b, "name")));
        out
    }

    /// The `pods/binding` subresource: assigns an unbound pod to `node` and records the
    /// `PodScheduled` condition, in one write (no generation bump, as in the registry's
    /// binding REST). A pod that is bound already or being deleted is a 409 Conflict.
    pub fn bind_pod(&self, ns: &str, name: &str, node: &str) -> ApiResult<Value> {
        let mut inner = self.lock();
        let rt = inner
            .resources
            .iter()
            .find(|r| r.group.is_empty() && r.plural == "pods")
            .cloned()
            .ok_or_else(|| ApiError::internal("pods are not served"))?;
        let current = get_stored(&inner, &rt, ns, name)?;
        let bound = current
            .obj
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !bound.is_empty() {
            return Err(ApiError::conflict(
                "",
                "pods",
                name,
                &format!("pod {name} is already assigned to node \"{bound}\""),
            ));
        }
        if current.obj.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError::conflict(
                "",
                "pods",
                name,
                "pod is being deleted, cannot be assigned to a host",
            ));
        }
        let mut obj = current.obj.clone();
        let owners = current.owners.clone();
        obj["spec"]["nodeName"] = json!(node);
        let condition = json!({"type": "PodScheduled", "status": "True",
            "lastProbeTime": null, "lastTransitionTime": now_rfc3339()});
        if !obj.get("status").is_some_and(Value::is_object) {
            obj["status"] = json!({});
        }
        let conditions = obj["status"]
            .as_object_mut()
            .map(|s| s.entry("conditions").or_insert_with(|| json!([])));
        if let Some(list) = conditions.and_then(Value::as_array_mut) {
            list.retain(|c| c.get("type").and_then(Value::as_str) != Some("PodScheduled"));
            list.push(condition);
        }
        let key = (ns.to_string(), name.to_string());
        let committed = self.commit(
            &mut inner,
            &rt,
            key,
            Some(Stored { obj, owners }),
            EventType::Modified,
        );
        Ok(present(&rt, &committed))
    }

    /// Read-modify-write of one object outside the HTTP path (test helpers).
    pub fn modify(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> ApiResult<Value> {
        let mut inner = self.lock();
        let current = get_stored(&inner, rt, ns, name)?;
        let mut obj = current.obj.clone();
        let owners = current.owners.clone();
        f(&mut obj);
        let key = (ns.to_string(), name.to_string());
        let committed = self.commit(
            &mut inner,
            rt,
            key,
            Some(Stored { obj, owners }),
            EventType::Modified,
        );
        Ok(present(rt, &committed))
    }
}

/// Built-in kinds merge their well-known keyed lists in server-side apply; custom
/// resources treat lists atomically (list-type schema markers are not read).
fn list_semantics(rt: &ResourceType) -> patch::ListSemantics {
    if rt.custom {
        patch::ListSemantics::Atomic
    } else {
        patch::ListSemantics::KeyedBuiltins
    }
}

/// Renders appliers' field ownership into `metadata.managedFields`.
fn set_managed_fields(obj: &mut Value, owners: &FieldOwners) {
    let api_version = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let entries = owners.managed_fields(&api_version);
    if let Some(meta) = meta_mut(obj) {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }
}

/// Finalizer that holds an owner in foreground deletion.
const FOREGROUND_FINALIZER: &str = "foregroundDeletion";

/// The (first) served type that stores objects under `skey`.
fn resource_for(inner: &Inner, skey: &StorageKey) -> Option<ResourceType> {
    inner
        .resources
        .iter()
        .find(|r| r.storage_key() == *skey)
        .cloned()
}

/// The core/v1 Event type, which stores events of both event APIs.
fn core_events(inner: &Inner) -> ApiResult<ResourceType> {
    inner
        .resources
        .iter()
        .find(|r| r.group.is_empty() && r.plural == "events")
        .cloned()
        .ok_or_else(|| ApiError::internal("core/v1 events are not served"))
}

fn get_stored<'a>(
    inner: &'a Inner,
    rt: &ResourceType,
    ns: &str,
    name: &str,
) -> ApiResult<&'a Stored> {
    inner
        .buckets
        .get(&rt.storage_key())
        .and_then(|b| b.get(&(ns.to_string(), name.to_string())))
        .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))
}

fn update_dependents(
    inner: &mut Inner,
    skey: &StorageKey,
    key: &ObjectKey,
    old: Option<&Value>,
    new: Option<&Value>,
) {
    let owner_uids = |v: Option<&Value>| -> Vec<String> {
        v.and_then(|o| o.pointer("/metadata/ownerReferences"))
            .and_then(Value::as_array)
            .map(|refs| {
                refs.iter()
                    .filter_map(|r| r.get("uid")?.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (old_uids, new_uids) = (owner_uids(old), owner_uids(new));
    if old_uids == new_uids {
        return;
    }
    let entry = (skey.clone(), key.0.clone(), key.1.clone());
    for uid in old_uids {
        if let Some(set) = inner.dependents.get_mut(&uid) {
            set.remove(&entry);
            if set.is_empty() {
                inner.dependents.remove(&uid);
            }
        }
    }
    for uid in new_uids {
        inner
            .dependents
            .entry(uid)
            .or_default()
            .insert(entry.clone());
    }
}

/// The object as returned for a request on `rt` (apiVersion of the requested version).
fn present(rt: &ResourceType, obj: &Value) -> Value {
    if events::is_view(rt) {
        return events::core_to_view(obj);
    }
    let mut out = obj.clone();
    if rt.custom {
        out["apiVersion"] = json!(rt.api_version());
    }
    out
}

fn set_type(rt: &ResourceType, obj: &mut Value) {
    obj["apiVersion"] = json!(rt.api_version());
    obj["kind"] = json!(rt.kind);
}

fn ensure_namespace(inner: &Inner, ns: &str) -> ApiResult<()> {
    let key = StorageKey {
        group: String::new(),
        plural: "namespaces".into(),
    };
    let stored = inner
        .buckets
        .get(&key)
        .and_then(|b| b.get(&(String::new(), ns.to_string())))
        .ok_or_else(|| ApiError::not_found("", "namespaces", ns))?;
    if stored.obj.pointer("/metadata/deletionTimestamp").is_some() {
        return Err(ApiError::new(
            403,
            "Forbidden",
            format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            ),
        ));
    }
    Ok(())
}

fn register_crd(inner: &mut Inner, crd: &Value, name: &str) -> ApiResult<()> {
    let types = crd::resource_types(crd).map_err(|c| {
        ApiError::invalid("apiextensions.k8s.io", "CustomResourceDefinition", name, c)
    })?;
    if let Some(first) = types.first() {
        let skey = first.storage_key();
        if inner
            .resources
            .iter()
            .any(|r| !r.custom && r.storage_key() == skey)
        {
            return Err(ApiError::invalid(
                "apiextensions.k8s.io",
                "CustomResourceDefinition",
                name,
                vec![Cause {
                    reason: "FieldValueInvalid",
                    field: "spec.names.plural".into(),
                    message: "conflicts with a built-in resource".into(),
                }],
            ));
        }
        inner
            .resources
            .retain(|r| !(r.custom && r.storage_key() == skey));
    }
    inner.resources.extend(types);
    Ok(())
}

/// Continue tokens carry the list's version and the last returned key.
fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    format!("{rv}/{ns}/{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> ApiResult<(u64, ObjectKey)> {
    let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    if !token.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes.ok_or_else(bad)?).map_err(|_| bad())?;
    let (rv, key) = text.split_once('/').ok_or_else(bad)?;
    let rv = rv.parse::<u64>().map_err(|_| bad())?;
    let (ns, name) = key.split_once('/').ok_or_else(bad)?;
    Ok((rv, (ns.to_string(), name.to_string())))
}

impl Store {
    /// Drops all retained history (test helper): older versions now get 410 Gone.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.history.clear();
        inner.compacted = inner.rv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configmaps(store: &Store) -> ResourceType {
        store
            .resource("", "v1", "configmaps")
            .expect("configmaps served")
    }

    fn cm(name: &str) -> Value {
        json!({"metadata": {"name": name}, "data": {"k": "v"}})
    }

    #[test]
    fn history_window_decides_between_replay_and_gone() {
        let store = Store::new(StoreConfig {
            history_limit: 3,
            watch_buffer: 16,
        });
        let rt = configmaps(&store);
        let opts = WriteOptions::default();
        let start = store.resource_version();
        for i in 0..5 {
            store
                .create(&rt, "default", cm(&format!("c{i}")), &opts)
                .expect("create");
        }
        let now = store.resource_version();
        // The last three events are retained: resuming from now-3 replays them all.
        let sub = store
            .subscribe(&rt, Some("default"), WatchStart::After(now - 3))
            .expect("within window");
        assert_eq!(
            sub.backlog.iter().map(|e| e.rv).collect::<Vec<_>>(),
            vec![now - 2, now - 1, now]
        );
        // One version older would miss an event: 410.
        let err = store
            .subscribe(&rt, Some("default"), WatchStart::After(now - 4))
            .err()
            .expect("gone");
        assert_eq!(err.code, 410);
        assert!(
            store
                .subscribe(&rt, None, WatchStart::After(start))
                .is_err()
        );
        // Current-state watches synthesize ADDED events for every object.
        let sub = store
            .subscribe(&rt, Some("default"), WatchStart::Current)
            .expect("current");
        assert_eq!(sub.backlog.len(), 5);
        assert!(sub.backlog.iter().all(|e| e.kind == EventType::Added));
    }

    #[test]
    fn writes_bump_versions_and_noops_do_not() {
        let store = Store::new(StoreConfig::default());
        let rt = configmaps(&store);
        let opts = WriteOptions::default();
        let created = store
            .create(&rt, "default", cm("a"), &opts)
            .expect("create");
        let rv = meta_str(&created, "resourceVersion").map(str::to_string);
        let same = store
            .update(
                &rt,
                "default",
                "a",
                created.clone(),
                Subresource::Main,
                &opts,
            )
            .expect("noop");
        assert_eq!(meta_str(&same, "resourceVersion").map(str::to_string), rv);
        let mut changed = created.clone();
        changed["data"]["k"] = json!("w");
        let updated = store
            .update(
                &rt,
                "default",
                "a",
                changed.clone(),
                Subresource::Main,
                &opts,
            )
            .expect("update");
        assert_ne!(
            meta_str(&updated, "resourceVersion").map(str::to_string),
            rv
        );
        // `changed` still carries the old version: conflict.
        changed["data"]["k"] = json!("x");
        let err = store
            .update(&rt, "default", "a", changed, Subresource::Main, &opts)
            .expect_err("conflict");
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        let dry = WriteOptions {
            dry_run: true,
            ..WriteOptions::default()
        };
        store
            .create(&rt, "default", cm("dry"), &dry)
            .expect("dry run");
        assert!(
            store.get(&rt, "default", "dry").is_err(),
            "dry run does not persist"
        );
    }

    #[test]
    fn continue_tokens_round_trip() {
        let token = encode_continue(42, "ns", "name.with-dots");
        assert_eq!(
            decode_continue(&token).expect("decodes"),
            (42, ("ns".to_string(), "name.with-dots".to_string()))
        );
        assert!(decode_continue("zz").is_err());
        assert!(decode_continue("abc").is_err());
    }
}
