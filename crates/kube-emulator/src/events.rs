//! events.k8s.io/v1 Events as a view over core/v1 Event storage, so an event recorded
//! through either API is visible through both (as in Kubernetes).

use serde_json::{Map, Value, json};

use crate::resources::ResourceType;

/// Field correspondences: (events.k8s.io/v1, core/v1).
const FIELDS: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("related", "related"),
    ("note", "message"),
    ("reason", "reason"),
    ("type", "type"),
    ("action", "action"),
    ("eventTime", "eventTime"),
    ("series", "series"),
    ("reportingController", "reportingComponent"),
    ("reportingInstance", "reportingInstance"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

/// Whether `rt` is the events.k8s.io/v1 view.
pub(crate) fn is_view(rt: &ResourceType) -> bool {
    rt.is_event_view()
}

fn convert(obj: &Value, api_version: &str, to_core: bool) -> Value {
    let mut out = Map::new();
    out.insert("apiVersion".into(), json!(api_version));
    out.insert("kind".into(), json!("Event"));
    if let Some(meta) = obj.get("metadata") {
        out.insert("metadata".into(), meta.clone());
    }
    for (view, core) in FIELDS {
        let (from, to) = if to_core { (view, core) } else { (core, view) };
        if let Some(v) = obj.get(*from).filter(|v| !v.is_null()) {
            out.insert((*to).to_string(), v.clone());
        }
    }
    Value::Object(out)
}

/// A stored core/v1 Event as events.k8s.io/v1.
pub(crate) fn core_to_view(obj: &Value) -> Value {
    convert(obj, "events.k8s.io/v1", false)
}

/// An events.k8s.io/v1 Event in core/v1 storage form. Non-object input is passed
/// through so the usual shape checks report it.
pub(crate) fn view_to_core(obj: &Value) -> Value {
    if !obj.is_object() {
        return obj.clone();
    }
    convert(obj, "v1", true)
}

/// Translates a field selector written against the view into core field names.
pub(crate) fn view_field_selector(s: &str) -> String {
    s.split(',')
        .map(|part| {
            let part = part.trim();
            for (view, core) in FIELDS {
                if let Some(rest) = part.strip_prefix(view)
                    && (rest.starts_with('.') || rest.starts_with('=') || rest.starts_with('!'))
                {
                    return format!("{core}{rest}");
                }
            }
            part.to_string()
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Field selectors core/v1 events support besides `metadata.*`.
pub(crate) const CORE_EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_between_versions() {
        let view = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e", "namespace": "default"},
            "regarding": {"kind": "Pod", "name": "p"}, "note": "hello", "reason": "Started",
            "type": "Normal", "reportingController": "ctl", "reportingInstance": "ctl-1",
            "action": "Start", "eventTime": "2026-01-01T00:00:00.000000Z", "series": {"count": 2}});
        let core = view_to_core(&view);
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "p");
        assert_eq!(core["message"], "hello");
        assert_eq!(core["reportingComponent"], "ctl");
        assert_eq!(core_to_view(&core), view);
    }

    #[test]
    fn selectors_are_translated() {
        assert_eq!(
            view_field_selector("regarding.name=p,reportingController!=x,metadata.name=e"),
            "involvedObject.name=p,reportingComponent!=x,metadata.name=e"
        );
    }
}
