//! HTTP routing: maps Kubernetes REST paths and verbs onto the store.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use crate::discovery;
use crate::error::{ApiError, ApiResult};
use crate::patch::PatchKind;
use crate::request::{
    AppState, Representation, Target, error_response, flag, json_response, parse_body, parse_json,
    parse_yaml, partial_metadata, selectors, write_options,
};
use crate::resources::ResourceType;
use crate::store::{DeleteOptions, Deleted, Store, Subresource};

/// Largest request body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// The single request entry point; every failure becomes a `Status` response.
pub(crate) async fn handle(state: Arc<AppState>, req: axum::extract::Request) -> Response {
    let (parts, body) = req.into_parts();
    let query: HashMap<String, String> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let mut record = crate::audit::request_info(parts.method.as_str(), parts.uri.path(), &query);
    record.user_agent = parts
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            let response =
                error_response(&ApiError::new(413, "RequestEntityTooLarge", e.to_string()));
            record.code = response.status().as_u16();
            state.control.audit.record(record);
            return response;
        }
    };
    let result = route(
        &state,
        &parts.method,
        parts.uri.path(),
        &query,
        &parts.headers,
        body,
    )
    .await;
    let response = match result {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    };
    record.code = response.status().as_u16();
    state.control.audit.record(record);
    tracing::debug!(
        method = %parts.method,
        uri = %parts.uri,
        status = response.status().as_u16(),
        "kube-emulator request"
    );
    response
}

async fn route(
    state: &Arc<AppState>,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let resources = state.store.resources();
    match segments.as_slice() {
        ["version"] => return Ok(json_response(StatusCode::OK, &discovery::version())),
        ["healthz" | "readyz" | "livez"] => {
            return Ok(Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Body::from("ok"))
                .unwrap_or_default());
        }
        ["api"] => {
            return Ok(json_response(
                StatusCode::OK,
                &discovery::core_versions(&state.address),
            ));
        }
        ["apis"] => {
            return Ok(json_response(
                StatusCode::OK,
                &discovery::group_list(&resources),
            ));
        }
        ["api", "v1"] => {
            let list = discovery::resource_list(&resources, "", "v1")
                .ok_or_else(|| ApiError::no_route(path))?;
            return Ok(json_response(StatusCode::OK, &list));
        }
        ["apis", group] => {
            return Ok(discovery::group(&resources, group)
                .map_or_else(page_not_found, |g| json_response(StatusCode::OK, &g)));
        }
        ["apis", group, version] => {
            return Ok(discovery::resource_list(&resources, group, version)
                .map_or_else(page_not_found, |l| json_response(StatusCode::OK, &l)));
        }
        ["openapi", "v2"] | ["swagger-2.0.0.pb-v1"] => {
            let accept = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if accept.contains("protobuf") {
                return Ok(Response::builder()
                    .status(StatusCode::OK)
                    .header(
                        header::CONTENT_TYPE,
                        "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                    )
                    .body(Body::from(discovery::openapi_v2_protobuf()))
                    .unwrap_or_default());
            }
            return Ok(json_response(StatusCode::OK, &discovery::openapi_v2_json()));
        }
        ["openapi", "v3"] => {
            return Ok(json_response(
                StatusCode::OK,
                &discovery::openapi_v3_root(&resources),
            ));
        }
        ["openapi", "v3", "api", version] => {
            let doc = discovery::openapi_v3_group_version(&resources, "", version)
                .ok_or_else(|| ApiError::no_route(path))?;
            return Ok(json_response(StatusCode::OK, &doc));
        }
        ["openapi", "v3", "apis", group, version] => {
            let doc = discovery::openapi_v3_group_version(&resources, group, version)
                .ok_or_else(|| ApiError::no_route(path))?;
            return Ok(json_response(StatusCode::OK, &doc));
        }
        _ => {}
    }
    let (target, legacy_watch) =
        resolve(&resources, &segments).ok_or_else(|| ApiError::no_route(path))?;
    let watch = legacy_watch || flag(query, "watch");
    let verb = verb_of(method, &target, watch);
    let (latency, fault) = state.control.check(&target.rt.plural, verb);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(err) = fault {
        return Err(err);
    }
    let rt = &target.rt;
    let ns = target.namespace.clone().unwrap_or_default();
    if target.subresource.as_deref() == Some("scale") && crate::scale::has_scale(rt) {
        let name = target.name.as_deref().unwrap_or("");
        return crate::scale::serve_scale(
            &state.store,
            rt,
            &ns,
            name,
            method,
            headers,
            &body,
            query,
        );
    }
    if target.subresource.as_deref() == Some("binding")
        && rt.group.is_empty()
        && rt.plural == "pods"
        && verb == "create"
    {
        let binding = parse_body(headers, &body)?;
        let node = binding
            .pointer("/target/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::bad_request("binding target.name is required"))?;
        let name = target.name.as_deref().unwrap_or("");
        state.store.bind_pod(&ns, name, node)?;
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201});
        return Ok(json_response(StatusCode::CREATED, &status));
    }
    let sub = match target.subresource.as_deref() {
        None => Subresource::Main,
        Some("status") if rt.status_subresource => Subresource::Status,
        Some(other) => return Err(ApiError::no_route(&format!("{}/{other}", rt.plural))),
    };
    let store = &state.store;
    match (verb, target.name.as_deref()) {
        ("get", Some(name)) => {
            let obj = store.get(rt, &ns, name)?;
            let shown = Representation::from_headers(headers).object(rt, &obj, true);
            Ok(json_response(StatusCode::OK, &shown))
        }
        ("list", None) => list(store, &target, query, Representation::from_headers(headers)),
        ("watch", _) => {
            crate::watch::serve_watch(state, &target, query, Representation::from_headers(headers))
        }
        ("create", None) => {
            let obj = parse_body(headers, &body)?;
            let created = store.create(rt, &ns, obj, &write_options(query, headers))?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        ("update", Some(name)) => {
            let obj = parse_body(headers, &body)?;
            let updated = store.update(rt, &ns, name, obj, sub, &write_options(query, headers))?;
            Ok(json_response(StatusCode::OK, &updated))
        }
        ("patch", Some(name)) => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let kind = PatchKind::from_content_type(content_type)?;
            let patch = if kind == PatchKind::Apply {
                parse_yaml(&body)?
            } else {
                parse_json(&body)?
            };
            let existed = store.get(rt, &ns, name).is_ok();
            let patched = store.patch(
                rt,
                &ns,
                name,
                kind,
                &patch,
                sub,
                &write_options(query, headers),
            )?;
            let code = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok(json_response(code, &patched))
        }
        ("delete", Some(name)) => {
            let opts = delete_options(query, &body)?;
            match store.delete(rt, &ns, name, &opts)? {
                Deleted::Pending(obj) => Ok(json_response(StatusCode::OK, &obj)),
                Deleted::Removed(obj) => {
                    // Registries with `ReturnDeletedObject: true` answer with the object.
                    if rt.group.is_empty()
                        && matches!(
                            rt.plural.as_str(),
                            "pods" | "services" | "serviceaccounts" | "namespaces"
                        )
                    {
                        return Ok(json_response(StatusCode::OK, &obj));
                    }
                    let mut details = json!({"name": name, "kind": rt.plural,
                        "uid": obj.pointer("/metadata/uid").cloned().unwrap_or(Value::Null)});
                    if !rt.group.is_empty() {
                        details["group"] = json!(rt.group);
                    }
                    let status = json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                        "details": details
                    });
                    Ok(json_response(StatusCode::OK, &status))
                }
            }
        }
        ("deletecollection", None) => {
            let opts = delete_options(query, &body)?;
            let (labels, fields) = selectors(store, rt, query)?;
            let items = store.delete_collection(
                rt,
                target.namespace.as_deref(),
                &labels,
                &fields,
                &opts,
            )?;
            let list = json!({
                "kind": rt.list_kind(), "apiVersion": rt.api_version(),
                "metadata": {"resourceVersion": store.resource_version().to_string()},
                "items": items,
            });
            Ok(json_response(StatusCode::OK, &list))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({method} {path})"
        ))),
    }
}

/// Resolves `/api/v1/...` and `/apis/{g}/{v}/...` resource paths (and legacy `/watch/` paths).
fn resolve(resources: &[ResourceType], segments: &[&str]) -> Option<(Target, bool)> {
    let (group, version, rest) = match segments {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (rest, legacy_watch) = match rest {
        ["watch", rest @ ..] => (rest, true),
        _ => (rest, false),
    };
    let find = |plural: &str| {
        resources
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
            .cloned()
    };
    let target =
        |rt: ResourceType, ns: Option<&str>, name: Option<&str>, sub: Option<&str>| Target {
            rt,
            namespace: ns.map(str::to_string),
            name: name.map(str::to_string),
            subresource: sub.map(str::to_string),
        };
    let t = match rest {
        // The namespace object itself and its subresources.
        ["namespaces", name] if group.is_empty() => {
            target(find("namespaces")?, None, Some(name), None)
        }
        ["namespaces", name, sub @ ("status" | "finalize")] if group.is_empty() => {
            target(find("namespaces")?, None, Some(name), Some(sub))
        }
        ["namespaces", ns, plural, tail @ ..] => {
            let rt = find(plural)?;
            if !rt.namespaced {
                return None;
            }
            match tail {
                [] => target(rt, Some(ns), None, None),
                [name] => target(rt, Some(ns), Some(name), None),
                [name, sub] => target(rt, Some(ns), Some(name), Some(sub)),
                _ => return None,
            }
        }
        [plural, tail @ ..] => {
            let rt = find(plural)?;
            match tail {
                [] => target(rt, None, None, None),
                [name] if !rt.namespaced => target(rt, None, Some(name), None),
                [name, sub] if !rt.namespaced => target(rt, None, Some(name), Some(sub)),
                _ => return None,
            }
        }
        _ => return None,
    };
    Some((t, legacy_watch))
}

fn verb_of(method: &Method, target: &Target, watch: bool) -> &'static str {
    let item = target.name.is_some();
    match *method {
        Method::GET if watch => "watch",
        Method::GET if item => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if item => "delete",
        Method::DELETE => "deletecollection",
        _ => "unknown",
    }
}

/// The API server's answer for a discovery path of a group or version it does not serve: Go's
/// plain-text mux 404, not a `Status`.
fn page_not_found() -> Response {
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from("404 page not found\n"))
        .unwrap_or_default()
}

fn list(
    store: &Store,
    target: &Target,
    query: &HashMap<String, String>,
    representation: Representation,
) -> ApiResult<Response> {
    let rt = &target.rt;
    let (labels, fields) = selectors(store, rt, query)?;
    // Zero and negative limits mean "no limit", as in the API server.
    let limit = match query.get("limit") {
        Some(l) if !l.is_empty() => usize::try_from(
            l.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        )
        .ok()
        .filter(|l| *l > 0),
        _ => None,
    };
    let continue_token = query.get("continue").map(String::as_str);
    let namespace = target.namespace.as_deref();
    if representation == Representation::Full {
        // Fast path: items are encoded straight from storage.
        let page = store.list_encoded(rt, namespace, &labels, &fields, limit, continue_token)?;
        let mut metadata = json!({"resourceVersion": page.resource_version.to_string()});
        if let Some(c) = page.continue_token {
            metadata["continue"] = json!(c);
        }
        let head =
            json!({"kind": rt.list_kind(), "apiVersion": rt.api_version(), "metadata": metadata});
        let mut body = serde_json::to_vec(&head).unwrap_or_default();
        // Replace the closing brace of the head with the items array.
        body.pop();
        body.extend_from_slice(b",\"items\":[");
        for (i, item) in page.items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(item);
        }
        body.extend_from_slice(b"]}");
        return Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap_or_default());
    }
    let page = store.list(rt, namespace, &labels, &fields, limit, continue_token)?;
    let mut metadata = json!({"resourceVersion": page.resource_version.to_string()});
    if let Some(c) = page.continue_token {
        metadata["continue"] = json!(c);
    }
    let list = match representation {
        Representation::Metadata => {
            let items: Vec<Value> = page.items.iter().map(partial_metadata).collect();
            json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": metadata,
                "items": items,
            })
        }
        Representation::Table => crate::table::table(rt, &page.items, metadata, true),
        Representation::Full => json!({
            "kind": rt.list_kind(),
            "apiVersion": rt.api_version(),
            "metadata": metadata,
            "items": page.items,
        }),
    };
    Ok(json_response(StatusCode::OK, &list))
}

fn delete_options(query: &HashMap<String, String>, body: &Bytes) -> ApiResult<DeleteOptions> {
    let body: Value = if body.is_empty() {
        json!({})
    } else {
        // The API server reads the body's apiVersion/kind first and answers a body that is
        // not JSON with a 500 without a reason.
        serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                500,
                "",
                format!("couldn't get version/kind; json parse error: {e}"),
            )
        })?
    };
    let grace = query
        .get("gracePeriodSeconds")
        .and_then(|g| g.parse::<i64>().ok())
        .or_else(|| body.get("gracePeriodSeconds").and_then(Value::as_i64));
    let policy = query.get("propagationPolicy").cloned().or_else(|| {
        body.get("propagationPolicy")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let orphan =
        policy.as_deref() == Some("Orphan") || body.get("orphanDependents") == Some(&json!(true));
    let dry_run = query.get("dryRun").is_some_and(|v| v == "All")
        || body
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|d| d.iter().any(|v| v == "All"));
    let pre = |f: &str| {
        body.pointer(&format!("/preconditions/{f}"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Ok(DeleteOptions {
        grace_period_seconds: grace,
        precondition_uid: pre("uid"),
        precondition_rv: pre("resourceVersion"),
        orphan,
        foreground: policy.as_deref() == Some("Foreground"),
        dry_run,
    })
}
