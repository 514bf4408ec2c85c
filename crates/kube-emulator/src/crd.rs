//! Turning CustomResourceDefinitions into served resource types.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::error::Cause;
use crate::resources::ResourceType;
use crate::schema::Schema;

/// Validates a CRD and derives one [`ResourceType`] per served version.
pub(crate) fn resource_types(crd: &Value) -> Result<Vec<ResourceType>, Vec<Cause>> {
    let mut causes = Vec::new();
    let spec = crd.get("spec").cloned().unwrap_or(Value::Null);
    let s = |path: &str| {
        spec.pointer(path)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let group = s("/group");
    let plural = s("/names/plural");
    let kind = s("/names/kind");
    let scope = s("/scope");
    let mut require = |value: &str, field: &str| {
        if value.is_empty() {
            causes.push(Cause {
                reason: "FieldValueRequired",
                field: field.into(),
                message: "Required value".into(),
            });
        }
    };
    require(&group, "spec.group");
    require(&plural, "spec.names.plural");
    require(&kind, "spec.names.kind");
    if scope != "Namespaced" && scope != "Cluster" {
        causes.push(Cause {
            reason: "FieldValueNotSupported",
            field: "spec.scope".into(),
            message: format!(
                "Unsupported value: {scope:?}: supported values: \"Cluster\", \"Namespaced\""
            ),
        });
    }
    let name = crd
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    if name != format!("{plural}.{group}") {
        causes.push(Cause {
            reason: "FieldValueInvalid",
            field: "metadata.name".into(),
            message: format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
        });
    }
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        causes.push(Cause {
            reason: "FieldValueRequired",
            field: "spec.versions".into(),
            message: "must have exactly one version marked as storage version".into(),
        });
    }
    let storage_count = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .count();
    if !versions.is_empty() && storage_count != 1 {
        causes.push(Cause {
            reason: "FieldValueInvalid",
            field: "spec.versions".into(),
            message: "must have exactly one version marked as storage version".into(),
        });
    }
    let strings = |path: &str| -> Vec<String> {
        spec.pointer(path)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut types = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        if v.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let version = v
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let schema = match v.pointer("/schema/openAPIV3Schema") {
            Some(raw) => match Schema::parse(raw) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    causes.push(Cause {
                        reason: "FieldValueInvalid",
                        field: format!("spec.versions[{i}].schema.openAPIV3Schema"),
                        message: e,
                    });
                    None
                }
            },
            None => None,
        };
        let singular = s("/names/singular");
        types.push(ResourceType {
            group: group.clone(),
            version,
            kind: kind.clone(),
            plural: plural.clone(),
            singular: if singular.is_empty() {
                kind.to_lowercase()
            } else {
                singular
            },
            namespaced: scope == "Namespaced",
            short_names: strings("/names/shortNames"),
            categories: strings("/names/categories"),
            status_subresource: v.pointer("/subresources/status").is_some(),
            schema,
            custom: true,
            printer_columns: v
                .get("additionalPrinterColumns")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        });
    }
    if causes.is_empty() {
        Ok(types)
    } else {
        Err(causes)
    }
}

/// The status a real API server reports once a CRD's names are accepted.
pub(crate) fn established_status(crd: &Value, now: &str) -> Value {
    let names = crd
        .pointer("/spec/names")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    json!({
        "acceptedNames": names,
        "storedVersions": stored,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": now}
        ]
    })
}
