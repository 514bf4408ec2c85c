//! The four PATCH flavours: JSON merge patch (RFC 7386), JSON patch (RFC 6902),
//! strategic merge patch and server-side apply.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult, Cause};

/// Patch body formats, keyed by request `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> ApiResult<Self> {
        let base = ct.split(';').next().unwrap_or("").trim();
        match base {
            "application/json-patch+json" => Ok(Self::Json),
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Ok(Self::Apply),
            _ => Err(ApiError::unsupported_media_type(ct)),
        }
    }
}

/// RFC 7386 merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// RFC 6902 JSON patch; failures (e.g. a failed `test`) are 422 like the API server.
pub(crate) fn json_patch(target: &mut Value, patch: &Value) -> ApiResult<()> {
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
    // Applied one at a time so a `test` for `null` passes on a missing path, as in
    // the API server (kube-runtime's finalizer helper relies on it). The caller works
    // on a copy, so a failure part-way leaves the stored object untouched.
    for op in ops.0 {
        if let json_patch::PatchOperation::Test(t) = &op
            && t.value.is_null()
            && target.pointer(t.path.as_str()).is_none()
        {
            continue;
        }
        json_patch::patch(target, &[op]).map_err(|e| {
            ApiError::new(
                422,
                "Invalid",
                format!("the server rejected our request due to an error in our request: {e}"),
            )
        })?;
    }
    Ok(())
}

/// Merge key for list fields that Kubernetes merges by key in strategic merge patch.
/// Lists not named here are replaced wholesale, as for most built-in list fields.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "readinessGates" => Some("name"),
        "conditions" => Some("type"),
        "ports" => Some("containerPort"),
        "volumeMounts" => Some("mountPath"),
        "ownerReferences" => Some("uid"),
        _ => None,
    }
}

/// Primitive lists that strategic merge treats as sets.
fn is_set_list(field: &str) -> bool {
    field == "finalizers"
}

/// Strategic merge patch with the directives clients actually send
/// (`$patch: replace|delete`, `$deleteFromPrimitiveList/…`, `$setElementOrder/…` is ignored).
pub(crate) fn strategic_merge(target: &mut Value, patch: &Value) {
    let Some(patch_map) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if patch_map.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch.clone();
        if let Some(m) = replaced.as_object_mut() {
            m.remove("$patch");
        }
        *target = replaced;
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(target_map) = target.as_object_mut() else {
        return;
    };
    for (key, pv) in patch_map {
        if key == "$patch" || key.starts_with("$setElementOrder/") || key == "$retainKeys" {
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(list), Some(remove)) = (
                target_map.get_mut(field).and_then(Value::as_array_mut),
                pv.as_array(),
            ) {
                list.retain(|x| !remove.contains(x));
            }
            continue;
        }
        match pv {
            Value::Null => {
                target_map.remove(key);
            }
            Value::Object(_) => {
                if pv.get("$patch").and_then(Value::as_str) == Some("delete") {
                    target_map.remove(key);
                    continue;
                }
                let slot = target_map.entry(key.clone()).or_insert(Value::Null);
                strategic_merge(slot, pv);
            }
            Value::Array(items) => {
                let existing = target_map.get_mut(key).and_then(Value::as_array_mut);
                match (merge_key(key), existing) {
                    (Some(mk), Some(list)) => merge_keyed_list(list, items, mk),
                    (None, Some(list)) if is_set_list(key) => {
                        for item in items {
                            if !list.contains(item) {
                                list.push(item.clone());
                            }
                        }
                    }
                    _ => {
                        let cleaned: Vec<Value> = items
                            .iter()
                            .filter(|i| i.get("$patch").is_none())
                            .cloned()
                            .collect();
                        target_map.insert(key.clone(), Value::Array(cleaned));
                    }
                }
            }
            _ => {
                target_map.insert(key.clone(), pv.clone());
            }
        }
    }
}

fn merge_keyed_list(list: &mut Vec<Value>, items: &[Value], mk: &str) {
    if items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *list = items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .cloned()
            .collect();
        return;
    }
    for item in items {
        let Some(key_value) = item.get(mk) else {
            list.push(item.clone());
            continue;
        };
        let pos = list.iter().position(|e| e.get(mk) == Some(key_value));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                list.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge(&mut list[i], item),
            (None, false) => {
                let mut fresh = Value::Object(Map::new());
                strategic_merge(&mut fresh, item);
                list.push(fresh);
            }
        }
    }
}

/// Fields owned by server-side-apply managers, as JSON pointers to leaf values.
///
/// Only *appliers* are tracked. A non-apply write that changes a field takes it away
/// from every applier (as an `Update` manager would take ownership), so later applies
/// conflict only with fields another applier still owns.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FieldOwners {
    appliers: BTreeMap<String, BTreeSet<String>>,
}

/// Suffix of the owner key for applies to the `status` subresource.
pub(crate) const STATUS_OWNER_SUFFIX: &str = " (status)";

impl FieldOwners {
    /// `metadata.managedFields` entries (operation `Apply`, `FieldsV1`) for the appliers.
    pub(crate) fn managed_fields(&self, api_version: &str) -> Vec<Value> {
        self.appliers
            .iter()
            .map(|(key, paths)| {
                let (manager, subresource) = match key.strip_suffix(STATUS_OWNER_SUFFIX) {
                    Some(m) => (m, Some("status")),
                    None => (key.as_str(), None),
                };
                let mut fields = Map::new();
                for path in paths {
                    insert_fields_v1(&mut fields, path);
                }
                let mut entry = serde_json::json!({
                    "manager": manager,
                    "operation": "Apply",
                    "apiVersion": api_version,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": fields,
                });
                if let (Some(sub), Some(m)) = (subresource, entry.as_object_mut()) {
                    m.insert("subresource".into(), Value::String(sub.into()));
                }
                entry
            })
            .collect()
    }

    /// Drops ownership of every field whose value differs between `old` and `new`.
    pub(crate) fn forget_changed(&mut self, old: &Value, new: &Value) {
        for fields in self.appliers.values_mut() {
            fields.retain(|p| resolve(old, p) == resolve(new, p));
        }
        self.appliers.retain(|_, f| !f.is_empty());
    }
}

/// Adds a JSON pointer to a `FieldsV1` set (`{"f:spec": {"f:replicas": {}}}`).
fn insert_fields_v1(root: &mut Map<String, Value>, pointer: &str) {
    let mut current = root;
    for segment in pointer.split('/').skip(1) {
        let raw = unescape(segment);
        let key = match raw
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|r| r.split_once('='))
        {
            Some((k, v)) => format!("k:{{\"{k}\":{v}}}"),
            None => format!("f:{raw}"),
        };
        let child = current
            .entry(key)
            .or_insert_with(|| Value::Object(Map::new()));
        if !child.is_object() {
            *child = Value::Object(Map::new());
        }
        match child {
            Value::Object(map) => current = map,
            _ => return,
        }
    }
}

/// How server-side apply treats lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListSemantics {
    /// Every list is one atomic value (custom resources without list-type markers).
    Atomic,
    /// The built-in lists strategic merge merges by key (`containers` by `name`,
    /// `conditions` by `type`, ...) are maps of items; other lists are atomic.
    KeyedBuiltins,
}

/// Leaf fields an applier can own: everything except identity/system metadata.
/// Keyed list items are addressed as `[key=<json value>]` path segments.
fn owned_leaves(v: &Value, lists: ListSemantics) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    if let Some(map) = v.as_object() {
        for (k, child) in map {
            match k.as_str() {
                "apiVersion" | "kind" => {}
                "metadata" => {
                    for mk in ["labels", "annotations"] {
                        if let Some(m) = child.get(mk) {
                            flatten(m, &format!("/metadata/{mk}"), mk, lists, &mut out);
                        }
                    }
                    if let Some(f) = child.get("finalizers") {
                        out.insert("/metadata/finalizers".into(), f.clone());
                    }
                }
                _ => flatten(child, &format!("/{}", escape(k)), k, lists, &mut out),
            }
        }
    }
    out
}

fn escape(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

fn unescape(k: &str) -> String {
    k.replace("~1", "/").replace("~0", "~")
}

/// The merge key of a list treated as a map of items under `lists`, if every item has it.
fn list_key(field: &str, items: &[Value], lists: ListSemantics) -> Option<&'static str> {
    if lists != ListSemantics::KeyedBuiltins {
        return None;
    }
    // An empty keyed list applies no items (it does not clear other managers' items).
    let key = merge_key(field)?;
    items.iter().all(|i| i.get(key).is_some()).then_some(key)
}

fn item_segment(key: &str, value: &Value) -> String {
    escape(&format!("[{key}={value}]"))
}

fn flatten(
    v: &Value,
    prefix: &str,
    field: &str,
    lists: ListSemantics,
    out: &mut BTreeMap<String, Value>,
) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, child) in map {
                flatten(child, &format!("{prefix}/{}", escape(k)), k, lists, out);
            }
        }
        Value::Array(items) => match list_key(field, items, lists) {
            Some(key) => {
                for item in items {
                    let segment = item_segment(key, &item[key]);
                    flatten(item, &format!("{prefix}/{segment}"), "", lists, out);
                }
            }
            None => {
                out.insert(prefix.to_string(), v.clone());
            }
        },
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// A parsed path segment: a map field or a keyed list item.
enum Segment {
    Field(String),
    Item { key: String, value: String },
}

fn segments(path: &str) -> Vec<Segment> {
    path.split('/')
        .skip(1)
        .map(|raw| {
            let seg = unescape(raw);
            match seg
                .strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.split_once('='))
            {
                Some((key, value)) => Segment::Item {
                    key: key.to_string(),
                    value: value.to_string(),
                },
                None => Segment::Field(seg),
            }
        })
        .collect()
}

fn item_matches(item: &Value, key: &str, value: &str) -> bool {
    item.get(key)
        .is_some_and(|v| serde_json::to_string(v).is_ok_and(|encoded| encoded == value))
}

/// Resolves a path with keyed list segments.
fn resolve<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut current = v;
    for segment in segments(path) {
        current = match segment {
            Segment::Field(name) => current.get(&name)?,
            Segment::Item { key, value } => current
                .as_array()?
                .iter()
                .find(|i| item_matches(i, &key, &value))?,
        };
    }
    Some(current)
}

/// Removes the field or list item a path names.
fn remove_path(v: &mut Value, path: &str) {
    let mut segs = segments(path);
    let Some(last) = segs.pop() else { return };
    let mut current = v;
    for segment in segs {
        let next = match segment {
            Segment::Field(name) => current.get_mut(&name),
            Segment::Item { key, value } => current
                .as_array_mut()
                .and_then(|items| items.iter_mut().find(|i| item_matches(i, &key, &value))),
        };
        match next {
            Some(n) => current = n,
            None => return,
        }
    }
    match last {
        Segment::Field(name) => {
            if let Some(m) = current.as_object_mut() {
                m.remove(&name);
            }
        }
        Segment::Item { key, value } => {
            if let Some(items) = current.as_array_mut() {
                items.retain(|i| !item_matches(i, &key, &value));
            }
        }
    }
}

/// Prefixes of `path` that end in a keyed list item, deepest first.
fn item_prefixes(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut prefix = String::new();
    for raw in path.split('/').skip(1) {
        prefix.push('/');
        prefix.push_str(raw);
        if unescape(raw).starts_with('[') {
            out.push(prefix.clone());
        }
    }
    out.reverse();
    out
}

/// A field another applier owns with a different value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Conflict {
    /// Owner key of the other applier (`name`, or `name (status)` for the status
    /// subresource).
    pub manager: String,
    /// The field in structured-merge-diff's path syntax: `.spec.replicas`,
    /// `.spec.containers[name="main"].image`.
    pub path: String,
}

impl Conflict {
    /// The manager as the API server prints it: `"name"`, or
    /// `"name" with subresource "status"`.
    pub(crate) fn manager_display(&self) -> String {
        match self.manager.strip_suffix(STATUS_OWNER_SUFFIX) {
            Some(m) => format!("{m:?} with subresource \"status\""),
            None => format!("{:?}", self.manager),
        }
    }
}

/// The `Status` message of an apply conflict, as `managedfields` words it.
pub(crate) fn conflict_message(conflicts: &[Conflict]) -> String {
    if let [one] = conflicts {
        return format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            one.manager_display(),
            one.path
        );
    }
    let mut by_manager: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for c in conflicts {
        by_manager
            .entry(c.manager_display())
            .or_default()
            .push(&c.path);
    }
    let mut lines = Vec::new();
    for (manager, paths) in by_manager {
        lines.push(format!("conflicts with {manager}:"));
        lines.extend(paths.iter().map(|p| format!("- {p}")));
    }
    format!(
        "Apply failed with {} conflicts: {}",
        conflicts.len(),
        lines.join("\n")
    )
}

/// The 409 `Status` of an apply conflict.
pub(crate) fn conflict_error(conflicts: &[Conflict]) -> ApiError {
    let causes = conflicts
        .iter()
        .map(|c| Cause {
            reason: "FieldManagerConflict",
            field: c.path.clone(),
            message: format!("conflict with {}", c.manager_display()),
        })
        .collect();
    ApiError::apply_conflict(conflict_message(conflicts), causes)
}

/// A JSON pointer of [`FieldOwners`] in fieldpath syntax (`.a.b`, `[k="v"]` items).
fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').skip(1) {
        let raw = unescape(segment);
        if raw.starts_with('[') && raw.contains('=') {
            out.push_str(&raw);
        } else {
            out.push('.');
            out.push_str(&raw);
        }
    }
    out
}

/// Merges an applied configuration into the live object for `manager`.
///
/// Returns the conflicting field paths when another applier owns a field with a
/// different value and `force` is false. Fields the manager applied before but
/// omits now are removed unless someone else owns them; so are keyed list items
/// nobody owns any part of any more.
pub(crate) fn server_side_apply(
    live: &Value,
    applied: &Value,
    manager: &str,
    force: bool,
    owners: &mut FieldOwners,
    lists: ListSemantics,
) -> Result<Value, Vec<Conflict>> {
    let leaves = owned_leaves(applied, lists);
    let mut conflicts = Vec::new();
    for (path, value) in &leaves {
        if resolve(live, path) == Some(value) {
            continue;
        }
        for (other, fields) in &owners.appliers {
            if other != manager && fields.contains(path) {
                conflicts.push(Conflict {
                    manager: other.clone(),
                    path: field_path(path),
                });
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    let mut merged = live.clone();
    if !merged.is_object() {
        merged = Value::Object(Map::new());
    }
    apply_merge(&mut merged, applied, lists);
    let previous = owners.appliers.remove(manager).unwrap_or_default();
    for (path, value) in &leaves {
        if resolve(live, path) != Some(value) {
            for fields in owners.appliers.values_mut() {
                fields.remove(path);
            }
        }
    }
    owners.appliers.retain(|_, f| !f.is_empty());
    let dropped: Vec<&String> = previous
        .iter()
        .filter(|p| !leaves.contains_key(*p))
        .collect();
    // A keyed item disappears once nobody owns anything inside it (removed first,
    // while its key still identifies it); then single fields nobody owns any more.
    for path in &dropped {
        for prefix in item_prefixes(path) {
            let inside = format!("{prefix}/");
            let still_owned = leaves.keys().any(|p| p.starts_with(&inside))
                || owners
                    .appliers
                    .values()
                    .any(|f| f.iter().any(|p| p.starts_with(&inside)));
            if !still_owned {
                remove_path(&mut merged, &prefix);
            }
        }
    }
    for path in &dropped {
        if !owners.appliers.values().any(|f| f.contains(*path)) {
            remove_path(&mut merged, path);
        }
    }
    owners
        .appliers
        .insert(manager.to_string(), leaves.into_keys().collect());
    Ok(merged)
}

/// Merges an applied configuration into the live object. Maps merge recursively, keyed
/// lists merge item by item, other lists are replaced (atomic); an explicit `null`
/// removes the field, as in merge patch.
fn apply_merge(target: &mut Value, applied: &Value, lists: ListSemantics) {
    let Some(applied_map) = applied.as_object() else {
        *target = applied.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(target_map) = target.as_object_mut() else {
        return;
    };
    for (k, v) in applied_map {
        match v {
            Value::Null => {
                target_map.remove(k);
            }
            Value::Array(items) => {
                let live_items = target_map.get_mut(k).and_then(Value::as_array_mut);
                match (list_key(k, items, lists), live_items) {
                    (Some(key), Some(live_items)) => {
                        for item in items {
                            let found = live_items.iter_mut().find(|l| l.get(key) == item.get(key));
                            match found {
                                Some(existing) => apply_merge(existing, item, lists),
                                None => live_items.push(item.clone()),
                            }
                        }
                    }
                    _ => {
                        target_map.insert(k.clone(), v.clone());
                    }
                }
            }
            Value::Object(_) => {
                let slot = target_map.entry(k.clone()).or_insert(Value::Null);
                apply_merge(slot, v, lists);
            }
            _ => {
                target_map.insert(k.clone(), v.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_containers_and_conditions_by_key() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]},
            "status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "Initialized", "status": "True"}]},
            "metadata": {"finalizers": ["x"]}});
        strategic_merge(
            &mut pod,
            &json!({
            "spec": {"containers": [{"name": "b", "image": "b:2"}, {"name": "c", "image": "c:1"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            "metadata": {"finalizers": ["y"]}}),
        );
        assert_eq!(
            pod["spec"]["containers"],
            json!([
            {"name": "a", "image": "a:1"}, {"name": "b", "image": "b:2"}, {"name": "c", "image": "c:1"}])
        );
        assert_eq!(
            pod["status"]["conditions"],
            json!([
            {"type": "Ready", "status": "True"}, {"type": "Initialized", "status": "True"}])
        );
        assert_eq!(pod["metadata"]["finalizers"], json!(["x", "y"]));
        strategic_merge(
            &mut pod,
            &json!({"spec": {"containers": [{"name": "a", "$patch": "delete"}]},
            "$deleteFromPrimitiveList/finalizers": ["x"]}),
        );
        assert_eq!(pod["spec"]["containers"].as_array().map(Vec::len), Some(2));
        strategic_merge(
            &mut pod,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["x"]}}),
        );
        assert_eq!(pod["metadata"]["finalizers"], json!(["y"]));
    }

    #[test]
    fn strategic_null_deletes() {
        let mut v = json!({"spec": {"a": 1, "b": 2}});
        strategic_merge(&mut v, &json!({"spec": {"a": null}}));
        assert_eq!(v, json!({"spec": {"b": 2}}));
    }

    #[test]
    fn apply_conflicts_between_managers_unless_forced() {
        let mut owners = FieldOwners::default();
        let live = Value::Null;
        let a = json!({"spec": {"holder": "a", "renew": 1}});
        let live = server_side_apply(&live, &a, "a", false, &mut owners, ListSemantics::Atomic)
            .expect("first apply");
        // Same value: shared, no conflict.
        let same = json!({"spec": {"holder": "a"}});
        assert!(
            server_side_apply(
                &live,
                &same,
                "b",
                false,
                &mut owners.clone(),
                ListSemantics::Atomic
            )
            .is_ok()
        );
        let b = json!({"spec": {"holder": "b"}});
        let err = server_side_apply(&live, &b, "b", false, &mut owners, ListSemantics::Atomic)
            .expect_err("conflict");
        assert_eq!(err.len(), 1);
        assert_eq!(
            conflict_message(&err),
            "Apply failed with 1 conflict: conflict with \"a\": .spec.holder"
        );
        let live = server_side_apply(&live, &b, "b", true, &mut owners, ListSemantics::Atomic)
            .expect("forced");
        assert_eq!(live["spec"]["holder"], "b");
        // Manager a re-applies without `renew`: the field it alone owned disappears.
        let live = server_side_apply(
            &live,
            &json!({"spec": {}}),
            "a",
            false,
            &mut owners,
            ListSemantics::Atomic,
        )
        .expect("shrink");
        assert_eq!(live, json!({"spec": {"holder": "b"}}));
    }

    #[test]
    fn managed_fields_render_as_fields_v1() {
        let mut owners = FieldOwners::default();
        let applied =
            json!({"metadata": {"labels": {"a/b": "1"}}, "spec": {"replicas": 2, "ports": [1]}});
        server_side_apply(
            &Value::Null,
            &applied,
            "m",
            false,
            &mut owners,
            ListSemantics::Atomic,
        )
        .expect("apply");
        let status = json!({"status": {"ready": true}});
        server_side_apply(
            &applied,
            &status,
            &format!("m{STATUS_OWNER_SUFFIX}"),
            false,
            &mut owners,
            ListSemantics::Atomic,
        )
        .expect("status apply");
        let entries = owners.managed_fields("apps/v1");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0]["manager"], "m");
        assert_eq!(
            entries[0]["fieldsV1"],
            json!({"f:metadata": {"f:labels": {"f:a/b": {}}}, "f:spec": {"f:ports": {}, "f:replicas": {}}})
        );
        assert_eq!(entries[1]["subresource"], "status");
        assert_eq!(entries[1]["fieldsV1"], json!({"f:status": {"f:ready": {}}}));
    }

    #[test]
    fn updates_take_ownership_away_from_appliers() {
        let mut owners = FieldOwners::default();
        let live = server_side_apply(
            &Value::Null,
            &json!({"spec": {"h": "a"}}),
            "a",
            false,
            &mut owners,
            ListSemantics::Atomic,
        )
        .expect("apply");
        let mut updated = live.clone();
        updated["spec"]["h"] = json!("z");
        owners.forget_changed(&live, &updated);
        assert!(
            server_side_apply(
                &updated,
                &json!({"spec": {"h": "b"}}),
                "b",
                false,
                &mut owners,
                ListSemantics::Atomic
            )
            .is_ok()
        );
    }

    #[test]
    fn keyed_lists_merge_by_key_between_managers() {
        let keyed = ListSemantics::KeyedBuiltins;
        let mut owners = FieldOwners::default();
        let main = json!({"spec": {"containers": [{"name": "main", "image": "app:1"}]}});
        let live =
            server_side_apply(&Value::Null, &main, "ctl", false, &mut owners, keyed).expect("main");
        let side = json!({"spec": {"containers": [{"name": "side", "image": "proxy:1"}]}});
        let live = server_side_apply(&live, &side, "mesh", false, &mut owners, keyed)
            .expect("no conflict");
        assert_eq!(
            live["spec"]["containers"],
            json!([{"name": "main", "image": "app:1"}, {"name": "side", "image": "proxy:1"}])
        );
        // Changing the other manager's container image conflicts.
        let steal = json!({"spec": {"containers": [{"name": "main", "image": "app:2"}]}});
        let err = server_side_apply(&live, &steal, "mesh", false, &mut owners.clone(), keyed)
            .expect_err("conflict");
        assert_eq!(err[0].path, ".spec.containers[name=\"main\"].image");
        assert_eq!(err[0].manager_display(), "\"ctl\"");
        // Dropping an item from one's configuration removes it when nobody else owns it.
        let live = server_side_apply(
            &live,
            &json!({"spec": {"containers": []}}),
            "mesh",
            false,
            &mut owners,
            keyed,
        )
        .expect("drop");
        assert_eq!(
            live["spec"]["containers"],
            json!([{"name": "main", "image": "app:1"}])
        );
        let rendered = owners.managed_fields("v1");
        assert_eq!(
            rendered[0]["fieldsV1"],
            json!({"f:spec": {"f:containers": {"k:{\"name\":\"main\"}": {"f:image": {}, "f:name": {}}}}})
        );
        // Keys containing slashes (volumeMounts by mountPath) resolve too.
        let mut owners = FieldOwners::default();
        let mounts = json!({"spec": {"volumeMounts": [{"mountPath": "/data", "name": "d"}]}});
        let live = server_side_apply(&Value::Null, &mounts, "a", false, &mut owners, keyed)
            .expect("mounts");
        let again =
            server_side_apply(&live, &mounts, "b", false, &mut owners, keyed).expect("same value");
        assert_eq!(again, live);
    }
}
