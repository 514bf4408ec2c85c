//! The `autoscaling/v1` `Scale` subresource of deployments and replica sets.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::patch::PatchKind;
use crate::request::{json_response, parse_body, parse_json, parse_yaml, write_options};
use crate::resources::ResourceType;
use crate::store::{Store, Subresource};

/// Resources with an `autoscaling/v1` `Scale` subresource.
pub(crate) fn has_scale(rt: &ResourceType) -> bool {
    rt.group == "apps"
        && matches!(
            rt.plural.as_str(),
            "deployments" | "replicasets" | "statefulsets"
        )
}

/// The `Scale` view of a deployment or replica set.
fn to_scale(obj: &Value) -> Value {
    let selector: Vec<String> = obj
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    let meta = obj.get("metadata").cloned().unwrap_or_else(|| json!({}));
    let pick = |f: &str| meta.get(f).cloned().unwrap_or(Value::Null);
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": pick("name"), "namespace": pick("namespace"), "uid": pick("uid"),
            "resourceVersion": pick("resourceVersion"), "creationTimestamp": pick("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
        "status": {
            "replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector.join(","),
        },
    })
}

/// GET/PUT/PATCH on `…/scale`: reads and writes `spec.replicas` of the parent object.
#[allow(clippy::too_many_arguments)]
pub(crate) fn serve_scale(
    store: &Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    method: &Method,
    headers: &HeaderMap,
    body: &Bytes,
    query: &HashMap<String, String>,
) -> ApiResult<Response> {
    let current = store.get(rt, ns, name)?;
    let scale = to_scale(&current);
    let desired = match *method {
        Method::GET => return Ok(json_response(StatusCode::OK, &scale)),
        Method::PUT => parse_body(headers, body)?,
        Method::PATCH => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let mut patched = scale.clone();
            match PatchKind::from_content_type(content_type)? {
                PatchKind::Json => crate::patch::json_patch(&mut patched, &parse_json(body)?)?,
                PatchKind::Merge | PatchKind::Strategic => {
                    crate::patch::merge_patch(&mut patched, &parse_json(body)?);
                }
                PatchKind::Apply => crate::patch::merge_patch(&mut patched, &parse_yaml(body)?),
            }
            patched
        }
        _ => {
            return Err(ApiError::method_not_allowed(
                "scale supports get, update and patch",
            ));
        }
    };
    let replicas = desired
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .ok_or_else(|| {
            ApiError::invalid(
                "autoscaling",
                "Scale",
                name,
                vec![crate::error::Cause {
                    reason: "FieldValueRequired",
                    field: "spec.replicas".into(),
                    message: "Required value".into(),
                }],
            )
        })?;
    let mut change = json!({"spec": {"replicas": replicas}});
    if let Some(rv) = desired
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        && !rv.is_empty()
    {
        change["metadata"] = json!({"resourceVersion": rv});
    }
    let updated = store.patch(
        rt,
        ns,
        name,
        PatchKind::Merge,
        &change,
        Subresource::Main,
        &write_options(query, headers),
    )?;
    Ok(json_response(StatusCode::OK, &to_scale(&updated)))
}
