//! Per-resource rules applied on write, in the spirit of the API server's
//! registry strategies: body shape checks, namespace scoping, server-set fields and
//! defaults on create, and validation (built-in minimal rules, CRD schemas).

use serde_json::{Map, Value, json};

use crate::crd;
use crate::error::{ApiError, ApiResult, Cause};
use crate::resources::{ResourceType, Subresource};
use crate::util::meta_str;

/// The part of an applied configuration a subresource write can touch.
pub(crate) fn applied_for_subresource(rt: &ResourceType, body: &Value, sub: Subresource) -> Value {
    let mut applied = body.clone();
    if let Some(map) = applied.as_object_mut() {
        match sub {
            Subresource::Main if rt.status_subresource => {
                map.remove("status");
            }
            Subresource::Status => {
                map.retain(|k, _| {
                    matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status")
                });
            }
            Subresource::Main => {}
        }
    }
    applied
}

/// Objects must be maps with map `metadata`, as they must decode into ObjectMeta.
pub(crate) fn check_shape(obj: &Value) -> ApiResult<()> {
    if !obj.is_object() {
        return Err(ApiError::bad_request("object must be a JSON object"));
    }
    if obj.get("metadata").is_some_and(|m| !m.is_object()) {
        return Err(ApiError::bad_request("metadata must be a JSON object"));
    }
    Ok(())
}

pub(crate) fn is_pod(rt: &ResourceType) -> bool {
    rt.group.is_empty() && rt.plural == "pods"
}

pub(crate) fn pod_finished(pod: &Value) -> bool {
    matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    )
}

/// Whether a pod is bound to a node; unscheduled pods have no kubelet to stop them, so the
/// API server deletes them at once.
pub(crate) fn pod_scheduled(pod: &Value) -> bool {
    pod.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty())
}

/// Go's name for a JSON value's type in `encoding/json` errors.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Label and annotation maps hold strings: a body with anything else does not decode into
/// `ObjectMeta`, which the API server answers with a 400 before any validation.
fn check_string_maps(rt: &ResourceType, obj: &Value) -> ApiResult<()> {
    for field in ["labels", "annotations"] {
        let Some(map) = obj.get("metadata").and_then(|m| m.get(field)) else {
            continue;
        };
        let wrong = match map {
            Value::Null => None,
            Value::Object(m) => m
                .values()
                .find(|v| !v.is_string())
                .map(|v| (json_type(v), "string")),
            other => Some((json_type(other), "map[string]string")),
        };
        if let Some((got, want)) = wrong {
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"{version}\" cannot be handled as a {kind}: json: cannot \
                 unmarshal {got} into Go struct field ObjectMeta.metadata.{field} of type {want}",
                kind = rt.kind,
                version = rt.version,
            )));
        }
    }
    Ok(())
}

/// A patch's result must decode into the type: `metadata` (and a built-in kind's `spec` and
/// `status`) an object, labels and annotations strings. The API server reports a result
/// that does not as a 422 on the field `patch` (after applying it, so not a 400).
pub(crate) fn check_patched(rt: &ResourceType, name: &str, obj: &Value) -> ApiResult<()> {
    check_shape(obj).map_err(|e| patch_invalid(rt, name, &e.message))?;
    let typed: &[&str] = if rt.custom { &[] } else { &["spec", "status"] };
    for field in typed {
        if let Some(v) = obj.get(*field)
            && !v.is_object()
            && !v.is_null()
        {
            return Err(patch_invalid(
                rt,
                name,
                &format!(
                    "json: cannot unmarshal {} into Go struct field {}.{field}",
                    json_type(v),
                    rt.kind
                ),
            ));
        }
    }
    check_string_maps(rt, obj).map_err(|e| patch_invalid(rt, name, &e.message))
}

fn patch_invalid(rt: &ResourceType, name: &str, why: &str) -> ApiError {
    ApiError::invalid(
        &rt.group,
        &rt.kind,
        name,
        vec![Cause {
            reason: "FieldValueInvalid",
            field: "patch".into(),
            message: format!("Invalid value: the patched object: {why}"),
        }],
    )
}

/// Rejects bodies whose `kind`/`apiVersion` name a different type, or that do not decode
/// into it.
pub(crate) fn check_kind(rt: &ResourceType, obj: &Value) -> ApiResult<()> {
    check_shape(obj)?;
    check_string_maps(rt, obj)?;
    if let Some(kind) = obj.get("kind").and_then(Value::as_str)
        && !kind.is_empty()
        && kind != rt.kind
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({}) does not match the expected API version ({}) or kind {kind} does not match {}",
            obj.get("apiVersion").and_then(Value::as_str).unwrap_or(""),
            rt.api_version(),
            rt.kind
        )));
    }
    if let Some(av) = obj.get("apiVersion").and_then(Value::as_str)
        && !av.is_empty()
        && rt.custom
        && av.split('/').next() != Some(rt.group.as_str())
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({})",
            rt.api_version()
        )));
    }
    Ok(())
}

pub(crate) fn scope_namespace(rt: &ResourceType, url_ns: &str, obj: &Value) -> ApiResult<String> {
    if !rt.namespaced {
        return Ok(String::new());
    }
    let body_ns = meta_str(obj, "namespace").unwrap_or("");
    if !body_ns.is_empty() && !url_ns.is_empty() && body_ns != url_ns {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let ns = if url_ns.is_empty() { body_ns } else { url_ns };
    if ns.is_empty() {
        return Err(ApiError::bad_request(
            "a namespace must be specified for a namespaced resource",
        ));
    }
    Ok(ns.to_string())
}

/// Server-side initialisation on create, per resource: the defaults of
/// [`apply_defaults`] plus the status a new object starts with.
pub(crate) fn prepare_create(rt: &ResourceType, obj: &mut Value) {
    set_server_labels(rt, obj);
    apply_defaults(rt, obj);
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "pods") => {
            map.insert(
                "status".into(),
                json!({"phase": "Pending", "qosClass": "BestEffort"}),
            );
        }
        ("", "namespaces") => {
            map.insert("status".into(), json!({"phase": "Active"}));
        }
        ("apps", "deployments" | "replicasets" | "statefulsets")
        | ("", "services")
        | ("batch", "jobs") => {
            map.remove("status");
        }
        _ if rt.status_subresource => {
            map.remove("status");
        }
        _ => {}
    }
}

/// The defaulting functions (`SetDefaults_*`) the API server runs when it decodes any
/// write — create, update, patch and apply alike. Applying them only on create would
/// leave a container added by a patch undefaulted, so a Deployment's template would never
/// equal the (defaulted) template of the ReplicaSet made from it: the Deployment
/// controller would make a new ReplicaSet on every sync.
pub(crate) fn apply_defaults(rt: &ResourceType, obj: &mut Value) {
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "pods") => {
            if let Some(spec) = map.get_mut("spec") {
                default_pod_spec(spec);
            }
        }
        ("apps", "deployments" | "replicasets" | "statefulsets") => {
            if let Some(spec) = map.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("replicas").or_insert(json!(1));
                if rt.plural == "statefulsets" {
                    spec.entry("podManagementPolicy")
                        .or_insert(json!("OrderedReady"));
                    spec.entry("revisionHistoryLimit").or_insert(json!(10));
                    // SetDefaults_StatefulSet
                    if let Some(rolling) = default_strategy(spec, "updateStrategy", "RollingUpdate")
                    {
                        rolling.entry("partition").or_insert(json!(0));
                    }
                }
                if rt.plural == "deployments" {
                    spec.entry("revisionHistoryLimit").or_insert(json!(10));
                    spec.entry("progressDeadlineSeconds").or_insert(json!(600));
                    // SetDefaults_Deployment
                    if let Some(rolling) = default_strategy(spec, "strategy", "RollingUpdate") {
                        rolling.entry("maxSurge").or_insert(json!("25%"));
                        rolling.entry("maxUnavailable").or_insert(json!("25%"));
                    }
                }
                if let Some(pod) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
                    default_pod_spec(pod);
                }
            }
        }
        ("", "secrets") => {
            // SetDefaults_Secret
            let ty = map.entry("type").or_insert(json!("Opaque"));
            if ty.as_str().is_none_or(str::is_empty) {
                *ty = json!("Opaque");
            }
        }
        ("", "services") => {
            if let Some(spec) = map.get_mut("spec").and_then(Value::as_object_mut) {
                default_service_spec(spec);
            }
        }
        ("batch", "jobs") => {
            if let Some(spec) = map.get_mut("spec").and_then(Value::as_object_mut) {
                // SetDefaults_Job
                spec.entry("parallelism").or_insert(json!(1));
                spec.entry("completions").or_insert(json!(1));
                spec.entry("backoffLimit").or_insert(json!(6));
                spec.entry("completionMode").or_insert(json!("NonIndexed"));
                spec.entry("suspend").or_insert(json!(false));
                if let Some(pod) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
                    default_pod_spec(pod);
                }
            }
        }
        _ => {}
    }
}

/// Labels the API server maintains itself: every namespace carries
/// `kubernetes.io/metadata.name` with its name (set on create and on every update).
pub(crate) fn set_server_labels(rt: &ResourceType, obj: &mut Value) {
    if !(rt.group.is_empty() && rt.plural == "namespaces") {
        return;
    }
    let Some(name) = meta_str(obj, "name").map(str::to_string) else {
        return;
    };
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        let labels = meta.entry("labels").or_insert_with(|| json!({}));
        if !labels.is_object() {
            *labels = json!({});
        }
        labels["kubernetes.io/metadata.name"] = json!(name);
    }
}

/// Defaults `spec.<field>.type` to `rolling` and, for that type, returns the
/// `rollingUpdate` map (created if missing) to default its fields.
fn default_strategy<'a>(
    spec: &'a mut Map<String, Value>,
    field: &str,
    rolling: &str,
) -> Option<&'a mut Map<String, Value>> {
    let strategy = spec.entry(field).or_insert_with(|| json!({}));
    if !strategy.is_object() {
        *strategy = json!({});
    }
    let strategy = strategy.as_object_mut()?;
    let ty = strategy.entry("type").or_insert(json!(rolling));
    if ty.as_str().is_none_or(str::is_empty) {
        *ty = json!(rolling);
    }
    if ty.as_str() != Some(rolling) {
        return None;
    }
    let update = strategy.entry("rollingUpdate").or_insert_with(|| json!({}));
    if !update.is_object() {
        *update = json!({});
    }
    update.as_object_mut()
}

/// `SetDefaults_Service` for what clients see: type, session affinity, port protocol and
/// target port.
fn default_service_spec(spec: &mut Map<String, Value>) {
    spec.entry("type").or_insert(json!("ClusterIP"));
    spec.entry("sessionAffinity").or_insert(json!("None"));
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for port in ports.iter_mut().filter_map(Value::as_object_mut) {
            port.entry("protocol").or_insert(json!("TCP"));
            if let Some(p) = port.get("port").cloned() {
                let target = port.entry("targetPort").or_insert(p.clone());
                if target.as_i64() == Some(0) || target.as_str().is_some_and(str::is_empty) {
                    *target = p;
                }
            }
        }
    }
}

/// The most visible defaults the API server applies to pod specs.
fn default_pod_spec(spec: &mut Value) {
    let Some(spec) = spec.as_object_mut() else {
        return;
    };
    spec.entry("restartPolicy").or_insert(json!("Always"));
    spec.entry("terminationGracePeriodSeconds")
        .or_insert(json!(30));
    spec.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
    spec.entry("schedulerName")
        .or_insert(json!("default-scheduler"));
    spec.entry("securityContext").or_insert(json!({}));
    for list in ["initContainers", "containers"] {
        let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for c in containers.iter_mut().filter_map(Value::as_object_mut) {
            let image = c.get("image").and_then(Value::as_str).unwrap_or("");
            let tag = image
                .rsplit('/')
                .next()
                .and_then(|last| last.split_once(':'))
                .map(|(_, t)| t);
            let policy = if matches!(tag, None | Some("latest")) && !image.contains('@') {
                "Always"
            } else {
                "IfNotPresent"
            };
            c.entry("imagePullPolicy").or_insert(json!(policy));
            c.entry("terminationMessagePath")
                .or_insert(json!("/dev/termination-log"));
            c.entry("terminationMessagePolicy").or_insert(json!("File"));
            c.entry("resources").or_insert(json!({}));
            // SetDefaults_ContainerPort
            if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                for port in ports.iter_mut().filter_map(Value::as_object_mut) {
                    let protocol = port.entry("protocol").or_insert(json!("TCP"));
                    if protocol.as_str().is_none_or(str::is_empty) {
                        *protocol = json!("TCP");
                    }
                }
            }
        }
    }
}

/// Folds a Secret's write-only `stringData` into base64 `data`, as the API server does.
pub(crate) fn fold_string_data(rt: &ResourceType, obj: &mut Value) {
    if !(rt.group.is_empty() && rt.plural == "secrets") {
        return;
    }
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    let Some(Value::Object(string_data)) = map.remove("stringData") else {
        return;
    };
    let data = map.entry("data").or_insert_with(|| json!({}));
    if !data.is_object() {
        *data = json!({});
    }
    if let Some(data) = data.as_object_mut() {
        for (k, v) in string_data {
            let text = v.as_str().unwrap_or_default();
            data.insert(k, json!(crate::util::base64(text.as_bytes())));
        }
    }
}

/// Built-in validation (minimal) and structural-schema validation for custom resources.
pub(crate) fn validate(rt: &ResourceType, obj: &mut Value, name: &str) -> ApiResult<()> {
    let mut causes = Vec::new();
    if let Some(schema) = &rt.schema {
        causes.extend(schema.apply_to_object(obj));
    }
    if is_pod(rt) {
        match obj.pointer("/spec/containers").and_then(Value::as_array) {
            Some(cs) if !cs.is_empty() => {
                for (i, c) in cs.iter().enumerate() {
                    for field in ["name", "image"] {
                        if c.get(field)
                            .and_then(Value::as_str)
                            .is_none_or(str::is_empty)
                        {
                            causes.push(Cause {
                                reason: "FieldValueRequired",
                                field: format!("spec.containers[{i}].{field}"),
                                message: "Required value".into(),
                            });
                        }
                    }
                }
            }
            _ => causes.push(Cause {
                reason: "FieldValueRequired",
                field: "spec.containers".into(),
                message: "Required value".into(),
            }),
        }
    }
    if rt.group.is_empty() && rt.plural == "events" {
        causes.extend(event_namespace(obj));
    }
    if rt.group == "apiextensions.k8s.io"
        && rt.plural == "customresourcedefinitions"
        && let Err(c) = crd::resource_types(obj)
    {
        causes.extend(c);
    }
    if let Some(labels) = obj.pointer("/metadata/labels") {
        let valid = labels
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_string));
        if !valid {
            causes.push(Cause {
                reason: "FieldValueInvalid",
                field: "metadata.labels".into(),
                message: "label values must be strings".into(),
            });
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(&rt.group, &rt.kind, name, causes))
    }
}

/// A core Event's `involvedObject.namespace` must be its own namespace; an empty one (a
/// cluster-scoped object's) only goes with `default` (or no namespace), as the API server's
/// event validation says.
fn event_namespace(obj: &Value) -> Option<Cause> {
    let own = meta_str(obj, "namespace").unwrap_or("");
    let involved = obj
        .pointer("/involvedObject/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let fine = if involved.is_empty() {
        own.is_empty() || own == "default"
    } else {
        involved == own
    };
    (!fine).then(|| Cause {
        reason: "FieldValueInvalid",
        field: "involvedObject.namespace".into(),
        message: format!("Invalid value: {involved:?}: does not match event.namespace"),
    })
}

/// Kinds whose `metadata.generation` counts spec changes; others (ConfigMaps, Secrets,
/// Events, Leases, Namespaces, Services) have no generation, as in Kubernetes.
pub(crate) fn tracks_generation(rt: &ResourceType) -> bool {
    rt.custom
        || matches!(
            (rt.group.as_str(), rt.plural.as_str()),
            ("", "pods")
                | ("apps", "deployments" | "replicasets" | "statefulsets")
                | ("batch", "jobs" | "cronjobs")
                | ("policy", "poddisruptionbudgets")
                | ("apiextensions.k8s.io", "customresourcedefinitions")
        )
}

/// Everything but metadata and status: a change here bumps `generation`.
pub(crate) fn spec_of(obj: &Value) -> Map<String, Value> {
    obj.as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "metadata" | "status" | "apiVersion" | "kind")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}
