//! Request plumbing shared by the router and the verb handlers: server state, the
//! resolved target of a request, query flags and selectors, body parsing (JSON, YAML,
//! protobuf), representations (full, metadata, Table) and JSON/`Status` responses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::resources::ResourceType;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Store, WriteOptions};
use crate::testing::ControlState;

pub(crate) struct AppState {
    pub store: Arc<Store>,
    pub control: Arc<ControlState>,
    pub bookmark_interval: Duration,
    pub address: String,
}

/// Where a resource request points.
pub(crate) struct Target {
    pub rt: ResourceType,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

pub(crate) fn flag(query: &HashMap<String, String>, name: &str) -> bool {
    query.get(name).is_some_and(|v| v == "true" || v == "1")
}

pub(crate) fn selectors(
    store: &Store,
    rt: &ResourceType,
    query: &HashMap<String, String>,
) -> ApiResult<(LabelSelector, FieldSelector)> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?;
    let fields = store.field_selector(rt, query.get("fieldSelector").map_or("", String::as_str))?;
    Ok((labels, fields))
}

/// How objects are rendered for a read, chosen by the `Accept` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Representation {
    Full,
    /// `PartialObjectMetadata` (kube-rs `Api<PartialObjectMeta<K>>`, `get_metadata`).
    Metadata,
    /// `Table` (kubectl's human-readable `get`).
    Table,
}

impl Representation {
    pub(crate) fn from_headers(headers: &HeaderMap) -> Self {
        let accept: Vec<&str> = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if accept.iter().any(|a| crate::table::wants_table(a)) {
            Representation::Table
        } else if accept
            .iter()
            .any(|a| a.contains("as=PartialObjectMetadata"))
        {
            Representation::Metadata
        } else {
            Representation::Full
        }
    }

    /// One object as sent on the wire; `with_columns` adds Table column definitions.
    pub(crate) fn object(self, rt: &ResourceType, obj: &Value, with_columns: bool) -> Value {
        match self {
            Representation::Full => obj.clone(),
            Representation::Metadata => partial_metadata(obj),
            Representation::Table => {
                crate::table::table(rt, std::slice::from_ref(obj), json!({}), with_columns)
            }
        }
    }
}

pub(crate) fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

pub(crate) fn write_options(query: &HashMap<String, String>, headers: &HeaderMap) -> WriteOptions {
    let manager = query.get("fieldManager").cloned().or_else(|| {
        headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|ua| ua.split('/').next().unwrap_or(ua).to_string())
    });
    WriteOptions {
        dry_run: query.get("dryRun").is_some_and(|v| v == "All"),
        field_manager: manager,
        force: flag(query, "force"),
    }
}

/// Decodes a create/update body: JSON, YAML, or Kubernetes protobuf for the kinds the
/// protobuf tables cover; anything else (CBOR, …) is a 415 so clients can tell the
/// encoding is the problem.
pub(crate) fn parse_body(headers: &HeaderMap, body: &Bytes) -> ApiResult<Value> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let base = content_type.split(';').next().unwrap_or("").trim();
    match base {
        "" | "application/json" | "*/*" => parse_json(body),
        "application/yaml" | "application/x-yaml" | "text/yaml" => parse_yaml(body),
        crate::protobuf::CONTENT_TYPE => crate::protobuf::decode_object(body),
        _ => Err(ApiError::unsupported_media_type(content_type)),
    }
}

pub(crate) fn parse_json(body: &Bytes) -> ApiResult<Value> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

pub(crate) fn parse_yaml(body: &Bytes) -> ApiResult<Value> {
    serde_yaml_ng::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid YAML body: {e}")))
}

pub(crate) fn json_response(code: StatusCode, value: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        // `to_vec` writes straight into a buffer; `Display` goes through fmt and is slower.
        .body(Body::from(serde_json::to_vec(value).unwrap_or_default()))
        .unwrap_or_default()
}

pub(crate) fn error_response(e: &ApiError) -> Response {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &e.to_status())
}
