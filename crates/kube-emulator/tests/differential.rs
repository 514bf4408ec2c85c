//! Differential fidelity: the same requests against kube-emulator and a real kube-apiserver
//! v1.34 (`DIFF_KUBECONFIG`, an admin kubeconfig of `scripts/control-plane.sh up`; the
//! real-cluster lane `scripts/test-real.sh` sets it), compared on what clients depend on:
//! status codes, reasons, `Status` details, returned objects' fields (defaults included),
//! discovery categories, table columns of a CRD, the core view of events.k8s.io Events and a
//! watch's event sequence. Without `DIFF_KUBECONFIG` the test says so loudly and compares
//! nothing. Deliberate differences are listed in the crate README ("Differences from
//! Kubernetes"), not here.

use std::time::Duration;

use futures::{AsyncBufReadExt, TryStreamExt};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube_emulator::Emulator;
use serde_json::{Value, json};

struct Target {
    name: &'static str,
    client: Client,
    ns: String,
}

/// One request; returns the status code and the JSON body (or the text as a string).
async fn call(
    t: &Target,
    method: &str,
    path: &str,
    body: Option<Value>,
    content_type: &str,
) -> (u16, Value) {
    call_accept(t, method, path, body, content_type, "application/json").await
}

async fn call_accept(
    t: &Target,
    method: &str,
    path: &str,
    body: Option<Value>,
    content_type: &str,
    accept: &str,
) -> (u16, Value) {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .header("accept", accept)
        .body(kube::client::Body::from(
            body.map(|b| b.to_string().into_bytes()).unwrap_or_default(),
        ))
        .expect("request");
    let response = t.client.send(request).await.expect("send");
    let code = response.status().as_u16();
    let bytes = response.into_body().collect_bytes().await.expect("body");
    let value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)));
    (code, value)
}

const JSON: &str = "application/json";

fn pick(v: &Value, paths: &[&str]) -> Value {
    let mut out = serde_json::Map::new();
    for p in paths {
        out.insert(
            (*p).to_string(),
            v.pointer(p).cloned().unwrap_or(Value::Null),
        );
    }
    Value::Object(out)
}

/// `Status` fields clients read.
fn status_of(code: u16, v: &Value) -> Value {
    json!({"code": code, "kind": v["kind"], "status": v["status"], "reason": v["reason"],
           "message": v["message"], "details": v["details"]})
}

async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The observations of one target, step by step.
async fn transcript(t: &Target) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = Vec::new();
    let ns = &t.ns;
    let (code, _) = call(
        t,
        "POST",
        "/api/v1/namespaces",
        Some(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})),
        JSON,
    )
    .await;
    assert_eq!(code, 201, "{}: create namespace", t.name);

    // ConfigMaps: create, duplicate, missing, stale update, delete.
    let cms = format!("/api/v1/namespaces/{ns}/configmaps");
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}});
    let (code, created) = call(t, "POST", &cms, Some(cm.clone()), JSON).await;
    out.push((
        "configmap create".into(),
        json!({"code": code, "kind": created["kind"], "data": created["data"],
        "has_uid": created.pointer("/metadata/uid").is_some()}),
    ));
    let (code, dup) = call(t, "POST", &cms, Some(cm.clone()), JSON).await;
    out.push(("configmap duplicate".into(), status_of(code, &dup)));
    let (code, missing) = call(t, "GET", &format!("{cms}/nope"), None, JSON).await;
    out.push(("configmap missing".into(), status_of(code, &missing)));
    let mut stale = created.clone();
    stale["metadata"]["resourceVersion"] = json!("1");
    stale["data"]["k"] = json!("w");
    let (code, conflict) = call(t, "PUT", &format!("{cms}/a"), Some(stale), JSON).await;
    out.push(("configmap stale update".into(), status_of(code, &conflict)));
    let (code, deleted) = call(t, "DELETE", &format!("{cms}/a"), None, JSON).await;
    let mut deleted_status = status_of(code, &deleted);
    // The uid is the object's own: compare that, not its value.
    deleted_status["details"]["uid"] =
        json!(deleted.pointer("/details/uid") == created.pointer("/metadata/uid"));
    out.push(("configmap delete".into(), deleted_status));

    // Services: port defaults; DELETE returns the object.
    let svcs = format!("/api/v1/namespaces/{ns}/services");
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                     "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}});
    let (code, created) = call(t, "POST", &svcs, Some(svc), JSON).await;
    out.push((
        "service create".into(),
        json!({"code": code, "type": created["spec"]["type"],
        "sessionAffinity": created["spec"]["sessionAffinity"],
        "port": pick(&created["spec"]["ports"][0], &["/port", "/protocol", "/targetPort"])}),
    ));
    let (code, deleted) = call(t, "DELETE", &format!("{svcs}/web"), None, JSON).await;
    out.push((
        "service delete".into(),
        json!({"code": code, "kind": deleted["kind"], "name": deleted["metadata"]["name"]}),
    ));

    // ServiceAccounts: every namespace has `default`; DELETE returns the object.
    let sas = format!("/api/v1/namespaces/{ns}/serviceaccounts");
    let default = eventually("the default ServiceAccount", || async {
        let (code, sa) = call(t, "GET", &format!("{sas}/default"), None, JSON).await;
        (code == 200).then_some(sa)
    })
    .await;
    out.push((
        "default serviceaccount".into(),
        pick(&default, &["/kind", "/metadata/name"]),
    ));
    let (code, _) = call(
        t,
        "POST",
        &sas,
        Some(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "robot"}})),
        JSON,
    )
    .await;
    assert_eq!(code, 201);
    let (code, deleted) = call(t, "DELETE", &format!("{sas}/robot"), None, JSON).await;
    out.push((
        "serviceaccount delete".into(),
        json!({"code": code, "kind": deleted["kind"], "name": deleted["metadata"]["name"]}),
    ));

    // Deployments: defaults on create and on a patch that adds a container.
    let deploys = format!("/apis/apps/v1/namespaces/{ns}/deployments");
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "d"}}, "template": {
            "metadata": {"labels": {"app": "d"}},
            "spec": {"containers": [{"name": "main", "image": "example/main:1", "ports": [{"containerPort": 8080}]}]}}}});
    let container_defaults = [
        "/imagePullPolicy",
        "/terminationMessagePath",
        "/terminationMessagePolicy",
        "/ports/0/protocol",
    ];
    let pod_defaults = [
        "/restartPolicy",
        "/dnsPolicy",
        "/schedulerName",
        "/terminationGracePeriodSeconds",
    ];
    let (code, created) = call(t, "POST", &deploys, Some(deployment), JSON).await;
    out.push(("deployment create".into(), json!({"code": code,
        "strategy": created["spec"]["strategy"], "revisionHistoryLimit": created["spec"]["revisionHistoryLimit"],
        "progressDeadlineSeconds": created["spec"]["progressDeadlineSeconds"],
        "pod": pick(&created["spec"]["template"]["spec"], &pod_defaults),
        "container": pick(&created["spec"]["template"]["spec"]["containers"][0], &container_defaults)})));
    let patch = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "side", "image": "example/side:2", "ports": [{"containerPort": 9090}]}]}}}});
    let (code, patched) = call(
        t,
        "PATCH",
        &format!("{deploys}/d"),
        Some(patch),
        "application/strategic-merge-patch+json",
    )
    .await;
    let side = patched["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "side"))
        .cloned()
        .unwrap_or(Value::Null);
    out.push((
        "deployment patch adds a container".into(),
        json!({"code": code, "container": pick(&side, &container_defaults)}),
    ));

    // Discovery: category `all` of the served built-ins.
    let mut categories = serde_json::Map::new();
    for (path, names) in [
        (
            "/api/v1",
            &["pods", "services", "configmaps", "serviceaccounts"][..],
        ),
        (
            "/apis/apps/v1",
            &["deployments", "replicasets", "statefulsets"][..],
        ),
        ("/apis/batch/v1", &["jobs", "cronjobs"][..]),
    ] {
        let (_, list) = call(t, "GET", path, None, JSON).await;
        for name in names {
            let found = list["resources"]
                .as_array()
                .and_then(|rs| rs.iter().find(|r| r["name"] == *name))
                .map_or(Value::Null, |r| r["categories"].clone());
            categories.insert((*name).to_string(), found);
        }
    }
    out.push(("categories".into(), Value::Object(categories)));

    // Events recorded through events.k8s.io/v1 are listed by core/v1 too.
    let event = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": "e1"}, "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "example.com/ctl", "reportingInstance": "ctl-1",
        "action": "Sync", "reason": "Synced", "note": "all good", "type": "Normal",
        "regarding": {"apiVersion": "v1", "kind": "Pod", "name": "p", "namespace": ns}});
    let (code, _) = call(
        t,
        "POST",
        &format!("/apis/events.k8s.io/v1/namespaces/{ns}/events"),
        Some(event),
        JSON,
    )
    .await;
    assert_eq!(code, 201, "{}: create event", t.name);
    let (_, core) = call(
        t,
        "GET",
        &format!("/api/v1/namespaces/{ns}/events/e1"),
        None,
        JSON,
    )
    .await;
    out.push((
        "core view of an events.k8s.io event".into(),
        pick(
            &core,
            &[
                "/kind",
                "/reason",
                "/message",
                "/type",
                "/action",
                "/involvedObject/kind",
                "/involvedObject/name",
                "/reportingComponent",
                "/reportingInstance",
            ],
        ),
    ));

    // A watch sees ADDED, MODIFIED, DELETED in order.
    let (_, list) = call(t, "GET", &cms, None, JSON).await;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .to_string();
    let request = http::Request::builder()
        .uri(format!(
            "{cms}?watch=true&resourceVersion={rv}&timeoutSeconds=30"
        ))
        .body(Vec::new())
        .expect("watch");
    let lines = t
        .client
        .request_stream(request)
        .await
        .expect("watch")
        .lines();
    let watcher = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut lines = std::pin::pin!(lines);
        while let Ok(Some(line)) = lines.try_next().await {
            let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            let kind = event["type"].as_str().unwrap_or("").to_string();
            if kind == "BOOKMARK" {
                continue;
            }
            seen.push(json!([
                kind,
                event["object"]["metadata"]["name"],
                event["object"]["data"]
            ]));
            if kind == "DELETED" {
                break;
            }
        }
        seen
    });
    let b = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}, "data": {"n": "1"}});
    call(t, "POST", &cms, Some(b), JSON).await;
    call(
        t,
        "PATCH",
        &format!("{cms}/b"),
        Some(json!({"data": {"n": "2"}})),
        "application/merge-patch+json",
    )
    .await;
    call(t, "DELETE", &format!("{cms}/b"), None, JSON).await;
    let seen = tokio::time::timeout(Duration::from_secs(30), watcher)
        .await
        .expect("watch events")
        .expect("watcher");
    out.push(("watch sequence".into(), json!(seen)));
    out
}

/// The table columns `kubectl get` shows for a CRD's objects.
async fn crd_table(t: &Target) -> Value {
    let crd: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../crds/sessionpolicies.sessions.blockyard.io.yaml"
        ))
        .expect("CRD file"),
    )
    .expect("CRD YAML");
    let (code, _) = call(
        t,
        "PATCH",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/sessionpolicies.sessions.blockyard.io?fieldManager=differential&force=true",
        Some(crd),
        "application/apply-patch+yaml",
    )
    .await;
    assert!(code == 200 || code == 201, "{}: apply CRD: {code}", t.name);
    let path = format!(
        "/apis/sessions.blockyard.io/v1alpha1/namespaces/{}/sessionpolicies",
        t.ns
    );
    let policy = json!({"apiVersion": "sessions.blockyard.io/v1alpha1", "kind": "SessionPolicy",
        "metadata": {"name": "p"}, "spec": {"selector": {"matchLabels": {"app": "w"}}, "idleTTL": "30m"}});
    eventually("the CRD served", || async {
        let (code, _) = call(t, "POST", &path, Some(policy.clone()), JSON).await;
        (code == 201).then_some(())
    })
    .await;
    let (_, table) = call_accept(
        t,
        "GET",
        &path,
        None,
        JSON,
        "application/json;as=Table;v=v1;g=meta.k8s.io",
    )
    .await;
    let columns: Vec<Value> = table["columnDefinitions"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| json!([c["name"], c["type"], c["priority"]]))
                .collect()
        })
        .unwrap_or_default();
    let cells = table["rows"][0]["cells"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // Name, Idle TTL; the Age cell depends on the clock.
    json!({"columns": columns, "name": cells.first(), "idleTTL": cells.get(1), "cells": cells.len()})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_and_real_api_server_answer_alike() {
    let Ok(path) = std::env::var("DIFF_KUBECONFIG") else {
        eprintln!(
            "\n*** differential test SKIPPED: DIFF_KUBECONFIG is not set (scripts/test-real.sh runs it against a real API server) ***\n"
        );
        return;
    };
    let kubeconfig = Kubeconfig::read_from(&path).expect("DIFF_KUBECONFIG");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    let ns = format!("diff-{}", std::process::id());
    let real = Target {
        name: "kube-apiserver",
        client: Client::try_from(config).expect("client"),
        ns: ns.clone(),
    };
    let emulator = Emulator::start().await.expect("emulator");
    let emulated = Target {
        name: "kube-emulator",
        client: emulator.client().expect("client"),
        ns,
    };

    let (want, got) = (transcript(&real).await, transcript(&emulated).await);
    let (want_table, got_table) = (crd_table(&real).await, crd_table(&emulated).await);
    call(
        &real,
        "DELETE",
        &format!("/api/v1/namespaces/{}", real.ns),
        None,
        JSON,
    )
    .await;

    let mut differences = Vec::new();
    for ((step, real_value), (_, emulator_value)) in want.iter().zip(got.iter()) {
        if real_value != emulator_value {
            differences.push(format!(
                "{step}:\n  kube-apiserver: {real_value}\n  kube-emulator:  {emulator_value}"
            ));
        }
    }
    if want_table != got_table {
        differences.push(format!(
            "CRD table:\n  kube-apiserver: {want_table}\n  kube-emulator:  {got_table}"
        ));
    }
    assert_eq!(want.len(), got.len());
    assert!(
        differences.is_empty(),
        "{} differences:\n{}",
        differences.len(),
        differences.join("\n")
    );
}
