//! Discovery documents: `/version`, `/api`, `/apis` and per group-version resource lists.
//!
//! Only the legacy (unaggregated) JSON format is served; clients that ask for
//! aggregated discovery fall back to it based on the response content type.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::resources::ResourceType;

pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0-kube-emulator",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

pub(crate) fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]
    })
}

/// `/apis`: every non-core group with its served versions (first listed is preferred).
pub(crate) fn group_list(resources: &[ResourceType]) -> Value {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in resources.iter().filter(|r| !r.group.is_empty()) {
        let versions = groups.entry(&r.group).or_default();
        if !versions.contains(&r.version.as_str()) {
            versions.push(&r.version);
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(name, versions)| {
            let vs: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
                .collect();
            json!({"name": name, "versions": vs, "preferredVersion": vs[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`: a single group.
pub(crate) fn group(resources: &[ResourceType], group: &str) -> Option<Value> {
    let list = group_list(resources);
    list["groups"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == group)
        .map(|g| {
            let mut g = g.clone();
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            g
        })
}

/// `/api/v1` or `/apis/{group}/{version}`; `None` if nothing is served there.
pub(crate) fn resource_list(
    resources: &[ResourceType],
    group: &str,
    version: &str,
) -> Option<Value> {
    let served: Vec<&ResourceType> = resources
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if served.is_empty() {
        return None;
    }
    let mut list = Vec::new();
    for r in served {
        let mut resource = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        });
        // `shortNames` and `categories` are `omitempty` in APIResource.
        if !r.short_names.is_empty() {
            resource["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            resource["categories"] = json!(r.categories);
        }
        list.push(resource);
        if crate::scale::has_scale(r) {
            list.push(json!({
                "name": format!("{}/scale", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        if r.status_subresource {
            list.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}),
    )
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: one entry per served group-version.
///
/// kubectl reads these documents only to learn that the server accepts the
/// `fieldValidation` parameter, after which it leaves validation to the server.
pub(crate) fn openapi_v3_root(resources: &[ResourceType]) -> Value {
    let mut paths = serde_json::Map::new();
    for r in resources {
        let p = gv_path(&r.group, &r.version);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}")}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/{api/v1|apis/g/v}`: object paths with their PATCH operations, no schemas.
pub(crate) fn openapi_v3_group_version(
    resources: &[ResourceType],
    group: &str,
    version: &str,
) -> Option<Value> {
    let served: Vec<&ResourceType> = resources
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if served.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    let prefix = gv_path(group, version);
    for r in served {
        let item = if r.namespaced {
            format!("/{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("/{prefix}/{}/{{name}}", r.plural)
        };
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let op = json!({
            "operationId": format!("patch{}", r.kind),
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": gvk,
            "parameters": [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}}
            ],
            "responses": {"200": {"description": "OK"}}
        });
        paths.insert(item, json!({"patch": op}));
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (kube-emulator)", "version": "v1.34.0"},
        "paths": paths,
        "components": {"schemas": {}}
    }))
}

/// `/openapi/v2` as JSON: an empty document (no paths, no definitions).
pub(crate) fn openapi_v2_json() -> Value {
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes (kube-emulator)", "version": "v1.34.0"},
        "paths": {},
        "definitions": {}
    })
}

/// The same empty document in the gnostic protobuf encoding older kubectl versions
/// (before OpenAPI v3 support) insist on. With no definitions, kubectl skips client-side
/// validation and computes patches from its compiled-in types.
pub(crate) fn openapi_v2_protobuf() -> Vec<u8> {
    fn field(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
        // Length-delimited field; every length here is below 128 so it fits one byte.
        out.push((number << 3) | 2);
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    }
    let mut info = Vec::new();
    field(&mut info, 1, b"Kubernetes (kube-emulator)"); // Info.title
    field(&mut info, 2, b"v1.34.0"); // Info.version
    let mut doc = Vec::new();
    field(&mut doc, 1, b"2.0"); // Document.swagger
    field(&mut doc, 2, &info); // Document.info
    field(&mut doc, 8, &[]); // Document.paths
    doc
}
