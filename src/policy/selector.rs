//! Label selectors checked exactly as Kubernetes checks them (`ValidateLabelSelector` of
//! apimachinery), plus the operator's own rule: a selector must name what it matches.
//!
//! kube's [`kube::core::Selector`] converts any `LabelSelector` it can parse and ignores what
//! Kubernetes rejects (`Exists` with values, `In` without values, malformed keys), so a policy
//! that no API server would accept as a pod selector could silently select other pools. The
//! same rules are CEL rules in the CRD (see [`schema`]); this module is the operator's copy for
//! objects that reached it anyway (an API server without CEL, an emulator, an old CRD).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::{Schema, SchemaGenerator, json_schema};

use super::InvalidSpec;

/// A label key or value Kubernetes rejects; the text says what a valid one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidLabel(String);

/// Longest label name (the part after an optional `prefix/`).
pub const NAME_MAX: usize = 63;
/// Longest label key prefix (a DNS subdomain).
pub const PREFIX_MAX: usize = 253;
/// Longest label value.
pub const VALUE_MAX: usize = 63;
/// Bounds that keep the CEL rules' estimated cost within the API server's budget; far beyond
/// any real pod selector.
pub const MAX_REQUIREMENTS: usize = 64;
pub const MAX_VALUES: usize = 256;

/// RE2 (CEL) and Rust regex syntax of a label name / value (without the length rule).
const NAME_RE: &str = "[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?";
/// A DNS-1123 subdomain (without the length rule).
const SUBDOMAIN_RE: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*";

const KEY_HELP: &str = "a label key is an optional DNS subdomain prefix of at most 253 \
    characters and '/', then a name of at most 63 characters: alphanumerics, '-', '_' or '.', \
    starting and ending with an alphanumeric";
const VALUE_HELP: &str = "a label value is empty or at most 63 characters: alphanumerics, '-', \
    '_' or '.', starting and ending with an alphanumeric";

/// Checks a selector; the error names the offending field (`spec.selector…`) the way
/// Kubernetes' field errors do.
pub fn validate(selector: &LabelSelector) -> Result<(), InvalidSpec> {
    let field = "spec.selector";
    let labels = selector.match_labels.as_ref();
    let exprs = selector.match_expressions.as_deref().unwrap_or_default();
    for (key, value) in labels.into_iter().flatten() {
        check_key(key).map_err(|e| format!("{field}.matchLabels: invalid key {key:?}: {e}"))?;
        check_value(value)
            .map_err(|e| format!("{field}.matchLabels[{key}]: invalid value {value:?}: {e}"))?;
    }
    for (i, req) in exprs.iter().enumerate() {
        let at = format!("{field}.matchExpressions[{i}]");
        let values = req.values.as_deref().unwrap_or_default();
        match req.operator.as_str() {
            "In" | "NotIn" => {
                if values.is_empty() {
                    return Err(InvalidSpec(format!(
                        "{at}.values: Required value: must be specified when `operator` is \
                         'In' or 'NotIn'"
                    )));
                }
            }
            "Exists" | "DoesNotExist" => {
                if !values.is_empty() {
                    return Err(InvalidSpec(format!(
                        "{at}.values: Forbidden: may not be specified when `operator` is \
                         'Exists' or 'DoesNotExist'"
                    )));
                }
            }
            other => {
                return Err(InvalidSpec(format!(
                    "{at}.operator: Unsupported value: {other:?}: supported values: \"In\", \
                     \"NotIn\", \"Exists\", \"DoesNotExist\""
                )));
            }
        }
        check_key(&req.key)
            .map_err(|e| format!("{at}.key: invalid label key {:?}: {e}", req.key))?;
        for (j, value) in values.iter().enumerate() {
            check_value(value)
                .map_err(|e| format!("{at}.values[{j}]: invalid value {value:?}: {e}"))?;
        }
    }
    if exprs.len() > MAX_REQUIREMENTS {
        return Err(InvalidSpec(format!(
            "{field}.matchExpressions: Too many: {}: must have at most {MAX_REQUIREMENTS} items",
            exprs.len()
        )));
    }
    let positive = labels.is_some_and(|l| !l.is_empty())
        || exprs
            .iter()
            .any(|r| matches!(r.operator.as_str(), "In" | "Exists"));
    if !positive {
        return Err(InvalidSpec(format!(
            "{field} must name what it selects: at least one matchLabels entry or a \
             matchExpressions requirement with operator In or Exists (NotIn and DoesNotExist \
             alone select every other pod of the namespace)"
        )));
    }
    Ok(())
}

/// A label key: `[prefix/]name` (Kubernetes' `IsQualifiedName`).
pub fn check_key(key: &str) -> Result<(), InvalidLabel> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err(InvalidLabel(format!(
                "prefix part must be non-empty; {KEY_HELP}"
            )));
        }
        if prefix.len() > PREFIX_MAX {
            return Err(InvalidLabel(format!(
                "prefix part must be no more than {PREFIX_MAX} characters; {KEY_HELP}"
            )));
        }
        if !full_match(SUBDOMAIN_RE, prefix) {
            return Err(InvalidLabel(format!(
                "prefix part must be a lowercase DNS subdomain; {KEY_HELP}"
            )));
        }
    }
    if name.is_empty() {
        return Err(InvalidLabel(format!(
            "name part must be non-empty; {KEY_HELP}"
        )));
    }
    if name.len() > NAME_MAX {
        return Err(InvalidLabel(format!(
            "name part must be no more than {NAME_MAX} characters; {KEY_HELP}"
        )));
    }
    if !full_match(NAME_RE, name) {
        return Err(InvalidLabel(format!("name part is malformed; {KEY_HELP}")));
    }
    Ok(())
}

/// A label value (Kubernetes' `IsValidLabelValue`).
pub fn check_value(value: &str) -> Result<(), InvalidLabel> {
    if value.len() > VALUE_MAX {
        return Err(InvalidLabel(format!(
            "must be no more than {VALUE_MAX} characters; {VALUE_HELP}"
        )));
    }
    if !value.is_empty() && !full_match(NAME_RE, value) {
        return Err(InvalidLabel(VALUE_HELP.to_string()));
    }
    Ok(())
}

/// Whether `text` is entirely of the shape `pattern` ([`NAME_RE`] or [`SUBDOMAIN_RE`]),
/// checked by hand (the patterns are for CEL; a test checks both agree).
fn full_match(pattern: &str, text: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    let edges = |s: &[u8], ok: &dyn Fn(u8) -> bool| {
        s.first().copied().is_some_and(ok) && s.last().copied().is_some_and(ok)
    };
    let bytes = text.as_bytes();
    if pattern == NAME_RE {
        return edges(bytes, &alnum)
            && bytes
                .iter()
                .all(|&b| alnum(b) || matches!(b, b'-' | b'_' | b'.'));
    }
    let lower = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    text.split('.').all(|label| {
        let label = label.as_bytes();
        edges(label, &lower) && label.iter().all(|&b| lower(b) || b == b'-')
    })
}

/// CEL: a label key (a string `k`) is valid. Two regexes because RE2 has no look-ahead: one for
/// the shape, one for the lengths of prefix and name.
fn key_rule(k: &str) -> String {
    format!(
        "{k}.matches('^({SUBDOMAIN_RE}/)?{NAME_RE}$') && \
         {k}.matches('^([^/]{{1,{PREFIX_MAX}}}/)?[^/]{{1,{NAME_MAX}}}$')"
    )
}

/// The CRD schema of `spec.selector`: `metav1.LabelSelector` with Kubernetes' validation as
/// enums, patterns, bounds and CEL rules.
pub fn schema(_: &mut SchemaGenerator) -> Schema {
    let value = json_schema!({
        "type": "string",
        "maxLength": VALUE_MAX,
        "pattern": format!("^({NAME_RE})?$"),
    });
    json_schema!({
        "type": "object",
        "description": "Which pods of this namespace are workers: a Kubernetes label selector \
            that must name what it selects (at least one matchLabels entry, or a \
            matchExpressions requirement with operator In or Exists).",
        "properties": {
            "matchLabels": {
                "type": "object",
                "description": "Labels a worker pod must carry, as {key: value}.",
                "maxProperties": MAX_REQUIREMENTS,
                "additionalProperties": value.clone(),
                "x-kubernetes-validations": [{
                    "rule": format!("self.all(k, {})", key_rule("k")),
                    "message": format!("matchLabels: invalid label key; {KEY_HELP}"),
                }],
            },
            "matchExpressions": {
                "type": "array",
                "description": "Requirements a worker pod's labels must meet; they are ANDed.",
                "maxItems": MAX_REQUIREMENTS,
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": {
                            "type": "string",
                            "description": "The label key the requirement applies to.",
                            "maxLength": PREFIX_MAX + 1 + NAME_MAX,
                            "x-kubernetes-validations": [{
                                "rule": key_rule("self"),
                                "message": format!("invalid label key; {KEY_HELP}"),
                            }],
                        },
                        "operator": {
                            "type": "string",
                            "description": "In, NotIn, Exists or DoesNotExist.",
                            "enum": ["In", "NotIn", "Exists", "DoesNotExist"],
                        },
                        "values": {
                            "type": "array",
                            "description": "Required (non-empty) for In and NotIn; forbidden \
                                for Exists and DoesNotExist.",
                            "maxItems": MAX_VALUES,
                            "items": value,
                        },
                    },
                    "x-kubernetes-validations": [
                        {
                            "rule": "!(self.operator == 'In' || self.operator == 'NotIn') || \
                                (has(self.values) && size(self.values) > 0)",
                            "message": "values must be specified when operator is 'In' or 'NotIn'",
                        },
                        {
                            "rule": "!(self.operator == 'Exists' || self.operator == 'DoesNotExist') || \
                                !has(self.values) || size(self.values) == 0",
                            "message": "values may not be specified when operator is 'Exists' or 'DoesNotExist'",
                        },
                    ],
                },
            },
        },
        "x-kubernetes-validations": [{
            "rule": "(has(self.matchLabels) && size(self.matchLabels) > 0) || \
                (has(self.matchExpressions) && \
                 self.matchExpressions.exists(e, e.operator == 'In' || e.operator == 'Exists'))",
            "message": "selector must name what it selects: at least one matchLabels entry or a \
                matchExpressions requirement with operator In or Exists (an empty selector, or \
                NotIn/DoesNotExist alone, would select every other pod in the namespace)",
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn selector(value: serde_json::Value) -> LabelSelector {
        serde_json::from_value(value).expect("selector")
    }

    fn err(value: serde_json::Value) -> String {
        validate(&selector(value.clone()))
            .expect_err(&value.to_string())
            .to_string()
    }

    #[test]
    fn kubernetes_accepts_these() {
        for ok in [
            json!({"matchLabels": {"app": "w"}}),
            json!({"matchLabels": {"example.com/worker": "", "a.b-c_d": "x.y-z_1"}}),
            json!({"matchExpressions": [{"key": "app", "operator": "Exists"}]}),
            json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "b"]},
                                        {"key": "tier", "operator": "NotIn", "values": ["x"]},
                                        {"key": "old", "operator": "DoesNotExist", "values": []}]}),
            json!({"matchLabels": {format!("{}/{}", "a".repeat(253), "n".repeat(63)): "v".repeat(63)}}),
        ] {
            assert_eq!(validate(&selector(ok.clone())), Ok(()), "{ok}");
        }
    }

    #[test]
    fn operators_and_values_follow_kubernetes() {
        let e = err(
            json!({"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]}),
        );
        assert!(
            e.starts_with("spec.selector.matchExpressions[0].values: Forbidden"),
            "{e}"
        );
        let e = err(
            json!({"matchExpressions": [{"key": "app", "operator": "DoesNotExist", "values": ["x"]}]}),
        );
        assert!(e.contains("values: Forbidden"), "{e}");
        let e = err(json!({"matchExpressions": [{"key": "app", "operator": "In", "values": []}]}));
        assert!(
            e.starts_with("spec.selector.matchExpressions[0].values: Required"),
            "{e}"
        );
        let e = err(json!({"matchExpressions": [{"key": "app", "operator": "NotIn"}]}));
        assert!(e.contains("values: Required"), "{e}");
        let e = err(json!({"matchExpressions": [{"key": "app", "operator": "exists"}]}));
        assert!(e.contains("operator: Unsupported value"), "{e}");
        let e = err(json!({"matchLabels": {"a": "b"},
                           "matchExpressions": [{"key": "app", "operator": "In", "values": ["ok", "not ok"]}]}));
        assert!(
            e.starts_with("spec.selector.matchExpressions[0].values[1]"),
            "{e}"
        );
    }

    #[test]
    fn label_keys_and_values_follow_kubernetes() {
        for bad_key in [
            "",
            "/app",
            "a/",
            "a/b/c",
            "Example.com/app",
            "-app",
            "app-",
            "app name",
            "ex_ample.com/app",
            &"n".repeat(64),
            &format!("{}/n", "a".repeat(254)),
        ] {
            let e = err(json!({"matchLabels": {bad_key: "v"}}));
            assert!(
                e.starts_with("spec.selector.matchLabels: invalid key"),
                "{bad_key}: {e}"
            );
            let e = err(json!({"matchExpressions": [{"key": bad_key, "operator": "Exists"}]}));
            assert!(
                e.starts_with("spec.selector.matchExpressions[0].key"),
                "{bad_key}: {e}"
            );
        }
        for bad_value in ["-v", "v-", "a b", "ü", &"v".repeat(64)] {
            let e = err(json!({"matchLabels": {"app": bad_value}}));
            assert!(e.starts_with("spec.selector.matchLabels[app]"), "{e}");
        }
    }

    #[test]
    fn a_selector_must_name_what_it_selects() {
        for value in [
            json!({}),
            json!({"matchLabels": {}}),
            json!({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}),
            json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["x"]}]}),
        ] {
            let e = err(value.clone());
            assert!(
                e.starts_with("spec.selector must name what it selects"),
                "{value}: {e}"
            );
        }
    }

    #[test]
    fn hand_written_matchers_agree_with_the_patterns() {
        for pattern in [NAME_RE, SUBDOMAIN_RE] {
            let re = regex::Regex::new(&format!("^(?:{pattern})$")).expect("re");
            for text in [
                "", "a", "A", "a-b", "a_b", "a.b", "-a", "a-", "_a", "a_", ".a", "a.", "a..b",
                "ab.cd", "Ab", "a b", "ü", "a/b", "0", "a-.b", "x.y-z_1",
            ] {
                assert_eq!(
                    full_match(pattern, text),
                    re.is_match(text),
                    "{pattern} {text:?}"
                );
            }
        }
    }

    #[test]
    fn cel_regexes_agree_with_the_checks() {
        // The CEL rules use the same patterns; check them here with the regex crate (RE2
        // syntax is a subset both accept).
        let shape = regex::Regex::new(&format!("^({SUBDOMAIN_RE}/)?{NAME_RE}$")).expect("re");
        let lengths =
            regex::Regex::new(&format!("^([^/]{{1,{PREFIX_MAX}}}/)?[^/]{{1,{NAME_MAX}}}$"))
                .expect("re");
        let long_ok = format!("{}/{}", "a".repeat(253), "n".repeat(63));
        let long_prefix = format!("{}/n", "a".repeat(254));
        let long_name = "n".repeat(64);
        for key in [
            "app",
            "example.com/app",
            "a/b/c",
            "/app",
            "Example.com/app",
            "app-",
            long_ok.as_str(),
            long_prefix.as_str(),
            long_name.as_str(),
        ] {
            let cel = shape.is_match(key) && lengths.is_match(key);
            assert_eq!(cel, check_key(key).is_ok(), "{key}");
        }
    }
}
