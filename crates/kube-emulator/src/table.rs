//! `meta.k8s.io/v1` `Table` responses, which kubectl asks for to print `get` output.
//!
//! Columns follow the built-in printers for the kinds we serve; custom resources get
//! NAME and their CRD version's `additionalPrinterColumns` (a JSONPath subset: fields,
//! `[n]`, `[*]` and `[?(@.field=="value")]`), or NAME and AGE without any; everything
//! else gets NAME and AGE.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::resources::ResourceType;
use crate::util::parse_time;

/// Whether the `Accept` header asks for a Table.
pub(crate) fn wants_table(accept: &str) -> bool {
    accept.contains("as=Table")
}

fn column(name: &str, ty: &str, format: &str, priority: u8) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": "", "priority": priority})
}

/// Column definitions for a resource type.
pub(crate) fn columns(rt: &ResourceType) -> Vec<Value> {
    let mut cols = vec![column("Name", "string", "name", 0)];
    if rt.custom && !rt.printer_columns.is_empty() {
        for c in &rt.printer_columns {
            let text = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("");
            let priority = c.get("priority").and_then(Value::as_u64).unwrap_or(0);
            let mut col = column(text("name"), text("type"), text("format"), 0);
            col["priority"] = json!(priority);
            col["description"] = json!(text("description"));
            cols.push(col);
        }
        return cols;
    }
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "pods") => {
            cols.push(column("Ready", "string", "", 0));
            cols.push(column("Status", "string", "", 0));
            cols.push(column("Restarts", "string", "", 0));
            cols.push(column("Age", "string", "", 0));
            cols.push(column("IP", "string", "", 1));
        }
        ("", "namespaces") => {
            cols.push(column("Status", "string", "", 0));
            cols.push(column("Age", "string", "", 0));
        }
        ("apps", "deployments" | "replicasets" | "statefulsets") => {
            cols.push(column("Ready", "string", "", 0));
            cols.push(column("Age", "string", "", 0));
        }
        ("coordination.k8s.io", "leases") => {
            cols.push(column("Holder", "string", "", 0));
            cols.push(column("Age", "string", "", 0));
        }
        ("" | "events.k8s.io", "events") => {
            // kubectl's event printer: NAME is hidden behind LAST SEEN etc.
            cols = vec![
                column("Last Seen", "string", "", 0),
                column("Type", "string", "", 0),
                column("Reason", "string", "", 0),
                column("Object", "string", "", 0),
                column("Message", "string", "", 0),
            ];
        }
        _ => cols.push(column("Age", "string", "", 0)),
    }
    cols
}

/// Cells of one row, in the order of [`columns`].
pub(crate) fn cells(rt: &ResourceType, obj: &Value, now: SystemTime) -> Vec<Value> {
    let name = obj
        .pointer("/metadata/name")
        .cloned()
        .unwrap_or(Value::Null);
    let age = json!(age(obj, now));
    let int = |p: &str| obj.pointer(p).and_then(Value::as_i64).unwrap_or(0);
    if rt.custom && !rt.printer_columns.is_empty() {
        let mut row = vec![name];
        for c in &rt.printer_columns {
            let path = c.get("jsonPath").and_then(Value::as_str).unwrap_or("");
            let ty = c.get("type").and_then(Value::as_str).unwrap_or("string");
            row.push(printer_cell(obj, path, ty, now));
        }
        return row;
    }
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "pods") => {
            let total = obj
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let statuses = obj
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array);
            let ready = statuses.map_or(0, |s| {
                s.iter()
                    .filter(|c| c.get("ready") == Some(&json!(true)))
                    .count()
            });
            let restarts: i64 = statuses.map_or(0, |s| {
                s.iter()
                    .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                    .sum()
            });
            let status = if obj.pointer("/metadata/deletionTimestamp").is_some() {
                "Terminating".to_string()
            } else {
                obj.pointer("/status/phase")
                    .and_then(Value::as_str)
                    .unwrap_or("Unknown")
                    .to_string()
            };
            let ip = obj
                .pointer("/status/podIP")
                .and_then(Value::as_str)
                .unwrap_or("<none>");
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(status),
                json!(restarts.to_string()),
                age,
                json!(ip),
            ]
        }
        ("", "namespaces") => {
            let phase = obj
                .pointer("/status/phase")
                .and_then(Value::as_str)
                .unwrap_or("Active");
            vec![name, json!(phase), age]
        }
        ("apps", "deployments" | "replicasets" | "statefulsets") => {
            let ready = format!("{}/{}", int("/status/readyReplicas"), int("/spec/replicas"));
            vec![name, json!(ready), age]
        }
        ("" | "events.k8s.io", "events") => event_cells(obj, now),
        ("coordination.k8s.io", "leases") => {
            let holder = obj
                .pointer("/spec/holderIdentity")
                .and_then(Value::as_str)
                .unwrap_or("");
            vec![name, json!(holder), age]
        }
        _ => vec![name, age],
    }
}

/// A Table with one row per object; rows carry the object's metadata, as with
/// the API server's default `includeObject=Metadata`.
pub(crate) fn table(
    rt: &ResourceType,
    objects: &[Value],
    metadata: Value,
    with_columns: bool,
) -> Value {
    let now = SystemTime::now();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            json!({
                "cells": cells(rt, o, now),
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o.get("metadata").cloned().unwrap_or_else(|| json!({})),
                },
            })
        })
        .collect();
    let mut t = json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": metadata, "rows": rows});
    if with_columns {
        t["columnDefinitions"] = Value::Array(columns(rt));
    }
    t
}

/// Works on both event versions (core field names first, then events.k8s.io/v1).
fn event_cells(obj: &Value, now: SystemTime) -> Vec<Value> {
    let text = |paths: &[&str]| -> String {
        paths
            .iter()
            .find_map(|p| obj.pointer(p).and_then(Value::as_str))
            .unwrap_or("")
            .to_string()
    };
    let last_seen = [
        "/lastTimestamp",
        "/deprecatedLastTimestamp",
        "/eventTime",
        "/series/lastObservedTime",
    ]
    .iter()
    .find_map(|p| obj.pointer(p).and_then(Value::as_str))
    .and_then(parse_time)
    .map_or_else(
        || age(obj, now),
        |t| human_duration(now.duration_since(t).unwrap_or_default()),
    );
    let kind = text(&["/involvedObject/kind", "/regarding/kind"]).to_lowercase();
    let name = text(&["/involvedObject/name", "/regarding/name"]);
    vec![
        json!(last_seen),
        json!(text(&["/type"])),
        json!(text(&["/reason"])),
        json!(format!("{kind}/{name}")),
        json!(text(&["/message", "/note"])),
    ]
}

/// One `additionalPrinterColumns` cell: the JSONPath's results (several joined with `,`,
/// as the API server's printer does), `date` columns as an age, nothing found as null.
fn printer_cell(obj: &Value, path: &str, ty: &str, now: SystemTime) -> Value {
    let found = json_path(obj, path);
    let Some(&first) = found.first() else {
        return Value::Null;
    };
    if found.len() == 1 {
        return match (ty, first) {
            ("date", Value::String(s)) => parse_time(s).map_or_else(
                || json!(s),
                |t| json!(human_duration(now.duration_since(t).unwrap_or_default())),
            ),
            ("integer" | "number" | "boolean", v @ (Value::Number(_) | Value::Bool(_))) => {
                v.clone()
            }
            (_, Value::String(s)) => json!(s),
            (_, v) => json!(v.to_string()),
        };
    }
    let parts: Vec<String> = found
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        })
        .collect();
    json!(parts.join(","))
}

/// The values a simple JSONPath selects: `.a.b`, `.a[0]`, `.a[*].b`,
/// `.a[?(@.k=="v")].b` (the forms CRD printer columns use).
fn json_path<'a>(obj: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut current = vec![obj];
    let mut rest = path.trim().trim_start_matches('{').trim_end_matches('}');
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let (field, tail) = r.split_at(end);
            if !field.is_empty() {
                current = current.into_iter().filter_map(|v| v.get(field)).collect();
            }
            rest = tail;
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else {
                return Vec::new();
            };
            let (inside, tail) = (&r[..end], &r[end + 1..]);
            let arrays: Vec<&Vec<Value>> =
                current.into_iter().filter_map(Value::as_array).collect();
            let items = arrays.iter().flat_map(|a| a.iter());
            current = if inside == "*" {
                items.collect()
            } else if let Ok(i) = inside.parse::<usize>() {
                arrays.iter().filter_map(|a| a.get(i)).collect()
            } else if let Some(filter) = inside
                .strip_prefix("?(@.")
                .and_then(|f| f.strip_suffix(')'))
            {
                let Some((field, value)) = filter.split_once("==") else {
                    return Vec::new();
                };
                let value = value.trim().trim_matches(['"', '\'']);
                items
                    .filter(|item| {
                        item.pointer(&format!("/{}", field.trim().replace('.', "/")))
                            .is_some_and(|v| match v {
                                Value::String(s) => s == value,
                                v => {
                                    *v == serde_json::from_str::<Value>(value)
                                        .unwrap_or(Value::Null)
                                }
                            })
                    })
                    .collect()
            } else {
                return Vec::new();
            };
            rest = tail;
        } else {
            return Vec::new();
        }
    }
    current
}

fn age(obj: &Value, now: SystemTime) -> String {
    let Some(created) = obj
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(parse_time)
    else {
        return "<unknown>".into();
    };
    human_duration(now.duration_since(created).unwrap_or_default())
}

/// kubectl-style short durations: `45s`, `3m12s`, `25m`, `5h3m`, `20h`, `3d4h`, `12d`.
fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..600 => format!("{}m{}s", s / 60, s % 60),
        600..10_800 => format!("{}m", s / 60),
        10_800..28_800 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        28_800..172_800 => format!("{}h", s / 3600),
        172_800..691_200 => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn durations_and_timestamps() {
        assert_eq!(human_duration(Duration::from_secs(45)), "45s");
        assert_eq!(human_duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(
            human_duration(Duration::from_secs(3 * 86_400 + 4 * 3600)),
            "3d4h"
        );
    }

    #[test]
    fn printer_column_json_paths() {
        let obj = json!({"spec": {"ttl": "30m", "list": [{"a": 1}, {"a": 2}]},
            "status": {"conditions": [{"type": "Other", "status": "False"},
                                      {"type": "Ready", "status": "True"}]}});
        assert_eq!(json_path(&obj, ".spec.ttl"), vec![&json!("30m")]);
        assert_eq!(
            json_path(&obj, r#".status.conditions[?(@.type=="Ready")].status"#),
            vec![&json!("True")]
        );
        assert_eq!(json_path(&obj, ".spec.list[1].a"), vec![&json!(2)]);
        assert_eq!(json_path(&obj, ".spec.list[*].a").len(), 2);
        assert!(json_path(&obj, ".status.missing").is_empty());
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        assert_eq!(
            printer_cell(&obj, ".spec.list[*].a", "integer", now),
            json!("1,2")
        );
        assert_eq!(printer_cell(&obj, ".nope", "string", now), Value::Null);
        let created = json!({"metadata": {"creationTimestamp": "2023-11-14T22:13:20Z"}});
        assert_eq!(
            printer_cell(&created, ".metadata.creationTimestamp", "date", now),
            json!("100s")
        );
    }
}
