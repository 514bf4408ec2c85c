//! Pure helpers shared by the workload controllers: pod state, owner references,
//! label selectors, template hashing, int-or-percent values and timestamps.

use std::cmp::Ordering;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};

use crate::selector::LabelSelector;
use crate::util::{meta_str, parse_time};

/// Label the deployment controller puts on replica sets and their pods.
pub(super) const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// Label the statefulset controller puts on its pods.
pub(super) const REVISION_HASH: &str = "controller-revision-hash";
/// Scale-down preference of a pod (lower goes first).
pub(super) const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

pub(super) fn is_terminating(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some()
}

pub(super) fn phase(pod: &Value) -> &str {
    pod.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending")
}

pub(super) fn is_finished(pod: &Value) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

/// Counted by replica sets: neither finished nor being deleted.
pub(super) fn is_active(pod: &Value) -> bool {
    !is_finished(pod) && !is_terminating(pod)
}

pub(super) fn node_name(pod: &Value) -> &str {
    pod.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn condition<'a>(obj: &'a Value, ty: &str) -> Option<&'a Value> {
    obj.pointer("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(ty))
}

pub(super) fn is_ready(pod: &Value) -> bool {
    condition(pod, "Ready").and_then(|c| c.get("status")) == Some(&json!("True"))
}

/// When the pod last became Ready, if it is.
pub(super) fn ready_since(pod: &Value) -> Option<SystemTime> {
    if !is_ready(pod) {
        return None;
    }
    condition(pod, "Ready")
        .and_then(|c| c.get("lastTransitionTime"))
        .and_then(Value::as_str)
        .and_then(parse_time)
}

/// Whether a pod has been ready for `min_ready` (the API's "available"); if it is ready
/// but not yet available, how long until it is.
pub(super) fn availability(
    pod: &Value,
    min_ready: Duration,
    now: SystemTime,
) -> (bool, Option<Duration>) {
    if !is_ready(pod) {
        return (false, None);
    }
    if min_ready.is_zero() {
        return (true, None);
    }
    let Some(since) = ready_since(pod) else {
        return (true, None);
    };
    let at = since + min_ready;
    match at.duration_since(now) {
        Ok(wait) if !wait.is_zero() => (false, Some(wait)),
        _ => (true, None),
    }
}

pub(super) fn restart_count(pod: &Value) -> i64 {
    pod.pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map_or(0, |cs| {
            cs.iter()
                .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                .max()
                .unwrap_or(0)
        })
}

pub(super) fn deletion_cost(pod: &Value) -> i64 {
    pod.pointer("/metadata/annotations")
        .and_then(|a| a.get(DELETION_COST))
        .and_then(Value::as_str)
        .and_then(|c| c.trim().parse::<i64>().ok())
        .unwrap_or(0)
}

pub(super) fn creation(obj: &Value) -> Option<SystemTime> {
    meta_str(obj, "creationTimestamp").and_then(parse_time)
}

/// The replica set controller's scale-down order (`ActivePodsWithRanks`): the pod that
/// sorts first is deleted first — unscheduled before scheduled, Pending before Running,
/// not ready before ready, lower deletion cost first, ready for less time first, more
/// restarts first, newer before older.
pub(super) fn victim_order(a: &Value, b: &Value) -> Ordering {
    let unassigned = |p: &Value| node_name(p).is_empty();
    let phase_rank = |p: &Value| match phase(p) {
        "Pending" => 0,
        "Unknown" => 1,
        "Running" => 2,
        _ => 3,
    };
    unassigned(b)
        .cmp(&unassigned(a))
        .then_with(|| phase_rank(a).cmp(&phase_rank(b)))
        .then_with(|| is_ready(a).cmp(&is_ready(b)))
        .then_with(|| deletion_cost(a).cmp(&deletion_cost(b)))
        .then_with(|| ready_since(b).cmp(&ready_since(a)))
        .then_with(|| restart_count(b).cmp(&restart_count(a)))
        .then_with(|| creation(b).cmp(&creation(a)))
        .then_with(|| meta_str(b, "name").cmp(&meta_str(a, "name")))
}

/// The controller owner reference of an object, as (kind, name, uid).
pub(super) fn controller_of(obj: &Value) -> Option<(&str, &str, &str)> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)?
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
        .and_then(|r| {
            Some((
                r.get("kind")?.as_str()?,
                r.get("name")?.as_str()?,
                r.get("uid")?.as_str()?,
            ))
        })
}

/// A controller owner reference pointing at `owner`.
pub(super) fn owner_reference(owner: &Value) -> Value {
    json!({
        "apiVersion": owner.get("apiVersion").cloned().unwrap_or(json!("apps/v1")),
        "kind": owner.get("kind").cloned().unwrap_or(Value::Null),
        "name": meta_str(owner, "name").unwrap_or(""),
        "uid": meta_str(owner, "uid").unwrap_or(""),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// Converts a `metav1.LabelSelector` into a parsed selector. An empty or missing
/// selector yields `None`: workload controllers ignore objects that select nothing.
pub(super) fn label_selector(selector: Option<&Value>) -> Option<LabelSelector> {
    let selector = selector?;
    let mut parts = Vec::new();
    if let Some(labels) = selector.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in labels {
            parts.push(format!("{k}={}", v.as_str().unwrap_or("")));
        }
    }
    if let Some(exprs) = selector.get("matchExpressions").and_then(Value::as_array) {
        for e in exprs {
            let key = e.get("key").and_then(Value::as_str)?;
            let values: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|vs| vs.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match e.get("operator").and_then(Value::as_str)? {
                "In" => parts.push(format!("{key} in ({})", values.join(","))),
                "NotIn" => parts.push(format!("{key} notin ({})", values.join(","))),
                "Exists" => parts.push(key.to_string()),
                "DoesNotExist" => parts.push(format!("!{key}")),
                _ => return None,
            }
        }
    }
    if parts.is_empty() {
        return None;
    }
    LabelSelector::parse(&parts.join(",")).ok()
}

/// A template with nulls and empty maps/lists removed, the way the API machinery's
/// semantic equality treats nil and empty as equal.
pub(super) fn normalized(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let n = normalized(v);
                let empty = match &n {
                    Value::Null => true,
                    Value::Object(m) => m.is_empty(),
                    Value::Array(a) => a.is_empty(),
                    _ => false,
                };
                if !empty {
                    out.insert(k.clone(), n);
                }
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        other => other.clone(),
    }
}

/// A pod template without the label `label` (the controller's own hash label).
pub(super) fn without_label(template: &Value, label: &str) -> Value {
    let mut t = normalized(template);
    if let Some(labels) = t
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        labels.remove(label);
        if labels.is_empty()
            && let Some(meta) = t.get_mut("metadata").and_then(Value::as_object_mut)
        {
            meta.remove("labels");
        }
    }
    normalized(&t)
}

/// `ComputeHash`: FNV-1a (32 bit) of the template (plus a collision count), rendered with
/// the alphabet Kubernetes uses for generated names.
pub(super) fn template_hash(template: &Value, collision_count: i64) -> String {
    let text = serde_json::to_string(&normalized(template)).unwrap_or_default();
    let mut hash: u32 = 0x811c_9dc5;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u32::from(*b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    };
    feed(text.as_bytes());
    if collision_count > 0 {
        feed(&collision_count.to_le_bytes());
    }
    safe_encode(&hash.to_string())
}

/// `rand.SafeEncodeString`: maps each byte onto a vowel-free alphabet.
fn safe_encode(s: &str) -> String {
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    s.bytes()
        .map(|b| ALPHANUMS[usize::from(b) % ALPHANUMS.len()] as char)
        .collect()
}

/// Resolves an int-or-percent field against `total` (percentages round up or down).
pub(super) fn int_or_percent(v: Option<&Value>, total: i64, round_up: bool, default: &str) -> i64 {
    let fallback = json!(default);
    let v = v.unwrap_or(&fallback);
    if let Some(i) = v.as_i64() {
        return i.max(0);
    }
    let s = v.as_str().unwrap_or(default).trim();
    match s
        .strip_suffix('%')
        .and_then(|p| p.trim().parse::<i64>().ok())
    {
        Some(pct) => {
            let scaled = pct.max(0) * total;
            if round_up {
                (scaled + 99) / 100
            } else {
                scaled / 100
            }
        }
        None => s.parse::<i64>().unwrap_or(0).max(0),
    }
}

pub(super) fn int_at(obj: &Value, pointer: &str) -> i64 {
    obj.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

/// A condition in the `metav1.Condition`-like shape workloads use, keeping
/// `lastTransitionTime` while the status does not change.
pub(super) fn set_condition(
    conditions: &mut Vec<Value>,
    ty: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: &str,
) {
    let existing = conditions
        .iter()
        .position(|c| c.get("type").and_then(Value::as_str) == Some(ty));
    let transition = existing
        .and_then(|i| {
            let c = &conditions[i];
            (c.get("status").and_then(Value::as_str) == Some(status))
                .then(|| c.get("lastTransitionTime").cloned())
                .flatten()
        })
        .unwrap_or_else(|| json!(now));
    let same = existing.is_some_and(|i| {
        let c = &conditions[i];
        c.get("status").and_then(Value::as_str) == Some(status)
            && c.get("reason").and_then(Value::as_str) == Some(reason)
            && c.get("message").and_then(Value::as_str) == Some(message)
    });
    let update_time = match existing {
        Some(i) if same => conditions[i]
            .get("lastUpdateTime")
            .cloned()
            .unwrap_or_else(|| json!(now)),
        _ => json!(now),
    };
    let cond = json!({
        "type": ty, "status": status, "reason": reason, "message": message,
        "lastUpdateTime": update_time, "lastTransitionTime": transition,
    });
    match existing {
        Some(i) => conditions[i] = cond,
        None => conditions.push(cond),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_round_as_the_deployment_controller_does() {
        assert_eq!(int_or_percent(Some(&json!("25%")), 3, true, "25%"), 1);
        assert_eq!(int_or_percent(Some(&json!("25%")), 3, false, "25%"), 0);
        assert_eq!(int_or_percent(Some(&json!("25%")), 200, true, "25%"), 50);
        assert_eq!(int_or_percent(Some(&json!(2)), 3, true, "25%"), 2);
        assert_eq!(int_or_percent(None, 10, false, "25%"), 2);
    }

    #[test]
    fn hash_ignores_nil_versus_empty() {
        let a = json!({"metadata": {"labels": {"app": "x"}, "creationTimestamp": null},
                       "spec": {"containers": [{"name": "c", "image": "i", "resources": {}}]}});
        let b = json!({"metadata": {"labels": {"app": "x"}},
                       "spec": {"containers": [{"name": "c", "image": "i"}]}});
        assert_eq!(template_hash(&a, 0), template_hash(&b, 0));
        assert_ne!(template_hash(&a, 0), template_hash(&a, 1));
        assert!(
            template_hash(&a, 0)
                .bytes()
                .all(|c| c.is_ascii_alphanumeric())
        );
    }

    #[test]
    fn victims_prefer_low_deletion_cost() {
        let pod = |name: &str, cost: Option<&str>| {
            let mut p = json!({"metadata": {"name": name, "creationTimestamp": "2024-01-01T00:00:00Z"},
                "spec": {"nodeName": "n"},
                "status": {"phase": "Running", "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}]}});
            if let Some(c) = cost {
                p["metadata"]["annotations"] = json!({DELETION_COST: c});
            }
            p
        };
        let mut pods = [pod("a", Some("10")), pod("b", Some("-5")), pod("c", None)];
        pods.sort_by(victim_order);
        let names: Vec<_> = pods.iter().filter_map(|p| meta_str(p, "name")).collect();
        assert_eq!(names, ["b", "c", "a"]);
        let mut pending =
            json!({"metadata": {"name": "p"}, "spec": {}, "status": {"phase": "Pending"}});
        assert_eq!(victim_order(&pending, &pods[0]), Ordering::Less);
        pending["spec"]["nodeName"] = json!("n");
        assert_eq!(victim_order(&pending, &pods[0]), Ordering::Less);
    }
}
