//! Structural OpenAPI v3 schemas of CustomResourceDefinitions: validation, pruning
//! of unknown fields and defaulting, the way the API server applies them on write.

use std::collections::BTreeMap;

use regex::Regex;
use serde_json::{Map, Value};

use crate::error::Cause;

/// A parsed structural schema node.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    pub ty: Option<String>,
    pub properties: BTreeMap<String, Schema>,
    pub required: Vec<String>,
    pub items: Option<Box<Schema>>,
    /// `additionalProperties` given as a schema (maps).
    pub additional: Option<Box<Schema>>,
    /// `additionalProperties: true` or `x-kubernetes-preserve-unknown-fields`.
    pub preserve_unknown: bool,
    pub int_or_string: bool,
    pub nullable: bool,
    pub enum_values: Vec<Value>,
    pub minimum: Option<f64>,
    pub maximum: Option<f64>,
    pub exclusive_minimum: bool,
    pub exclusive_maximum: bool,
    pub min_length: Option<u64>,
    pub max_length: Option<u64>,
    pub min_items: Option<u64>,
    pub max_items: Option<u64>,
    pub pattern: Option<Regex>,
    pub default: Option<Value>,
}

impl Schema {
    /// Parses an `openAPIV3Schema` value. Invalid regular expressions are reported.
    pub fn parse(v: &Value) -> Result<Schema, String> {
        let mut s = Schema {
            ty: v.get("type").and_then(Value::as_str).map(str::to_string),
            ..Schema::default()
        };
        if let Some(props) = v.get("properties").and_then(Value::as_object) {
            for (k, pv) in props {
                s.properties.insert(k.clone(), Schema::parse(pv)?);
            }
        }
        if let Some(req) = v.get("required").and_then(Value::as_array) {
            s.required = req
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
        }
        if let Some(items) = v.get("items") {
            s.items = Some(Box::new(Schema::parse(items)?));
        }
        match v.get("additionalProperties") {
            Some(Value::Bool(true)) => s.preserve_unknown = true,
            Some(ap @ Value::Object(_)) => s.additional = Some(Box::new(Schema::parse(ap)?)),
            _ => {}
        }
        let flag = |name: &str| v.get(name).and_then(Value::as_bool).unwrap_or(false);
        if flag("x-kubernetes-preserve-unknown-fields") {
            s.preserve_unknown = true;
        }
        s.int_or_string = flag("x-kubernetes-int-or-string");
        s.nullable = flag("nullable");
        s.exclusive_minimum = flag("exclusiveMinimum");
        s.exclusive_maximum = flag("exclusiveMaximum");
        s.enum_values = v
            .get("enum")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        s.minimum = v.get("minimum").and_then(Value::as_f64);
        s.maximum = v.get("maximum").and_then(Value::as_f64);
        s.min_length = v.get("minLength").and_then(Value::as_u64);
        s.max_length = v.get("maxLength").and_then(Value::as_u64);
        s.min_items = v.get("minItems").and_then(Value::as_u64);
        s.max_items = v.get("maxItems").and_then(Value::as_u64);
        if let Some(p) = v.get("pattern").and_then(Value::as_str) {
            s.pattern = Some(Regex::new(p).map_err(|e| format!("invalid pattern {p:?}: {e}"))?);
        }
        s.default = v.get("default").cloned();
        Ok(s)
    }

    /// Prunes unknown fields, applies defaults and validates `obj` in place.
    ///
    /// `apiVersion`, `kind` and `metadata` at the root are never pruned or validated
    /// here; the server handles metadata itself.
    pub fn apply_to_object(&self, obj: &mut Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let Some(map) = obj.as_object_mut() else {
            causes.push(Cause {
                reason: "FieldValueInvalid",
                field: "<root>".into(),
                message: "must be an object".into(),
            });
            return causes;
        };
        if !self.preserve_unknown {
            map.retain(|k, _| {
                matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
                    || self.properties.contains_key(k)
            });
        }
        self.default_properties(map);
        for (k, v) in map.iter_mut() {
            if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            if let Some(ps) = self.properties.get(k) {
                ps.walk(v, k, &mut causes);
            }
        }
        self.check_required(map, "", &mut causes);
        causes
    }

    fn default_properties(&self, map: &mut Map<String, Value>) {
        for (k, ps) in &self.properties {
            if !map.contains_key(k)
                && let Some(d) = &ps.default
            {
                map.insert(k.clone(), d.clone());
            }
        }
    }

    fn check_required(&self, map: &Map<String, Value>, path: &str, causes: &mut Vec<Cause>) {
        for r in &self.required {
            if !map.contains_key(r) {
                causes.push(Cause {
                    reason: "FieldValueRequired",
                    field: join(path, r),
                    message: "Required value".into(),
                });
            }
        }
    }

    fn walk(&self, v: &mut Value, path: &str, causes: &mut Vec<Cause>) {
        if v.is_null() {
            if !self.nullable {
                causes.push(invalid(path, v, "must not be null"));
            }
            return;
        }
        if self.int_or_string {
            if !(v.is_i64() || v.is_u64() || v.is_string()) {
                causes.push(invalid(path, v, "must be an integer or a string"));
            }
            return;
        }
        match self.ty.as_deref() {
            Some("object") => {
                let Some(map) = v.as_object_mut() else {
                    causes.push(type_error(path, v, "object"));
                    return;
                };
                if let Some(additional) = &self.additional {
                    for (k, item) in map.iter_mut() {
                        additional.walk(item, &join(path, k), causes);
                    }
                } else {
                    if !self.preserve_unknown {
                        map.retain(|k, _| self.properties.contains_key(k));
                    }
                    self.default_properties(map);
                    for (k, item) in map.iter_mut() {
                        if let Some(ps) = self.properties.get(k) {
                            ps.walk(item, &join(path, k), causes);
                        }
                    }
                }
                self.check_required(map, path, causes);
            }
            Some("array") => {
                let Some(items) = v.as_array_mut() else {
                    causes.push(type_error(path, v, "array"));
                    return;
                };
                let n = items.len() as u64;
                if let Some(min) = self.min_items
                    && n < min
                {
                    causes.push(invalid_owned(
                        path,
                        format!("must have at least {min} items"),
                    ));
                }
                if let Some(max) = self.max_items
                    && n > max
                {
                    causes.push(invalid_owned(
                        path,
                        format!("must have at most {max} items"),
                    ));
                }
                if let Some(item_schema) = &self.items {
                    for (i, item) in items.iter_mut().enumerate() {
                        item_schema.walk(item, &format!("{path}[{i}]"), causes);
                    }
                }
            }
            Some("string") => {
                let Some(s) = v.as_str() else {
                    causes.push(type_error(path, v, "string"));
                    return;
                };
                let len = s.chars().count() as u64;
                if let Some(min) = self.min_length
                    && len < min
                {
                    causes.push(invalid(
                        path,
                        v,
                        &format!("{path} in body should be at least {min} chars long"),
                    ));
                }
                if let Some(max) = self.max_length
                    && len > max
                {
                    causes.push(invalid(
                        path,
                        v,
                        &format!("{path} in body may not be more than {max} chars long"),
                    ));
                }
                if let Some(re) = &self.pattern
                    && !re.is_match(s)
                {
                    causes.push(invalid(
                        path,
                        v,
                        &format!("{path} in body should match '{}'", re.as_str()),
                    ));
                }
            }
            Some("integer") => {
                if !(v.is_i64() || v.is_u64()) {
                    causes.push(type_error(path, v, "integer"));
                    return;
                }
                self.check_bounds(v, path, causes);
            }
            Some("number") => {
                if !v.is_number() {
                    causes.push(type_error(path, v, "number"));
                    return;
                }
                self.check_bounds(v, path, causes);
            }
            Some("boolean") if !v.is_boolean() => {
                causes.push(type_error(path, v, "boolean"));
                return;
            }
            _ => {}
        }
        if !self.enum_values.is_empty() && !self.enum_values.contains(v) {
            let allowed: Vec<String> = self.enum_values.iter().map(Value::to_string).collect();
            causes.push(Cause {
                reason: "FieldValueNotSupported",
                field: path.to_string(),
                message: format!(
                    "Unsupported value: {v}: supported values: {}",
                    allowed.join(", ")
                ),
            });
        }
    }

    fn check_bounds(&self, v: &Value, path: &str, causes: &mut Vec<Cause>) {
        let Some(n) = v.as_f64() else { return };
        if let Some(min) = self.minimum {
            let bad = if self.exclusive_minimum {
                n <= min
            } else {
                n < min
            };
            if bad {
                let op = if self.exclusive_minimum {
                    "greater than"
                } else {
                    "greater than or equal to"
                };
                causes.push(invalid(
                    path,
                    v,
                    &format!("{path} in body should be {op} {min}"),
                ));
            }
        }
        if let Some(max) = self.maximum {
            let bad = if self.exclusive_maximum {
                n >= max
            } else {
                n > max
            };
            if bad {
                let op = if self.exclusive_maximum {
                    "less than"
                } else {
                    "less than or equal to"
                };
                causes.push(invalid(
                    path,
                    v,
                    &format!("{path} in body should be {op} {max}"),
                ));
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn invalid(path: &str, v: &Value, message: &str) -> Cause {
    Cause {
        reason: "FieldValueInvalid",
        field: path.to_string(),
        message: format!("Invalid value: {v}: {message}"),
    }
}

fn invalid_owned(path: &str, message: String) -> Cause {
    Cause {
        reason: "FieldValueInvalid",
        field: path.to_string(),
        message,
    }
}

fn type_error(path: &str, v: &Value, expected: &str) -> Cause {
    let actual = match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    Cause {
        reason: "FieldValueTypeInvalid",
        field: path.to_string(),
        message: format!(
            "Invalid value: \"{actual}\": {path} in body must be of type {expected}: \"{actual}\""
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::parse(&json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["size"],
                    "properties": {
                        "size": {"type": "integer", "minimum": 1, "maximum": 5},
                        "mode": {"type": "string", "enum": ["a", "b"], "default": "a"},
                        "name": {"type": "string", "pattern": "^[a-z]+$"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}}
                    }
                },
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
            }
        }))
        .expect("schema parses")
    }

    #[test]
    fn valid_object_is_defaulted_and_pruned() {
        let mut obj = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"},
            "spec": {"size": 2, "junk": 1}, "extra": true, "status": {"free": {"form": 1}}});
        assert!(schema().apply_to_object(&mut obj).is_empty());
        assert_eq!(obj["spec"], json!({"size": 2, "mode": "a"}));
        assert!(obj.get("extra").is_none());
        assert_eq!(obj["status"]["free"]["form"], 1);
    }

    #[test]
    fn reports_every_violation_with_paths() {
        let mut obj = json!({"spec": {"size": 9, "mode": "c", "name": "A1", "tags": [1], "labels": {"k": 2}}});
        let causes = schema().apply_to_object(&mut obj);
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.labels.k",
                "spec.mode",
                "spec.name",
                "spec.size",
                "spec.tags[0]"
            ]
        );
        let mut missing = json!({"spec": {}});
        let causes = schema().apply_to_object(&mut missing);
        assert_eq!(causes[0].field, "spec.size");
        assert_eq!(causes[0].reason, "FieldValueRequired");
    }
}
