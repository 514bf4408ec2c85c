//! Malformed requests get Kubernetes `Status` errors, and the server keeps serving.

use kube::Client;
use serde_json::json;

use crate::{backends, on_each};

/// Sends one request; returns the status code and the `reason` of a `Status` body (empty
/// for success or a Status without one, `NOT A STATUS` for any other error body, such as the
/// API server's plain-text `404 page not found`).
async fn send(
    client: &Client,
    method: &str,
    uri: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    let request = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", content_type)
        .body(kube::client::Body::from(body.to_vec()))
        .expect("request");
    let response = client
        .send(request)
        .await
        .unwrap_or_else(|e| panic!("{method} {uri}: {e}"));
    let code = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect_bytes()
        .await
        .unwrap_or_else(|e| panic!("{method} {uri}: body: {e}"));
    if code < 400 {
        return (code, String::new());
    }
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(status) if status["kind"] == "Status" => (
            code,
            status["reason"].as_str().unwrap_or_default().to_string(),
        ),
        _ => (code, "NOT A STATUS".to_string()),
    }
}

/// method, uri, content type, body, expected code, expected reason
type Case = (
    &'static str,
    String,
    &'static str,
    Vec<u8>,
    u16,
    &'static str,
);

#[tokio::test]
async fn bad_requests_get_status_errors() {
    on_each(backends("bad-requests").await, async |b| {
    let client = b.client.clone();
    let pods = &format!("/api/v1/namespaces/{}/pods", b.ns);
    let pods = pods.as_str();
    let json = "application/json";
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "i"}]}})
    .to_string();
    assert_eq!(
        send(&client, "POST", pods, json, pod.as_bytes()).await.0,
        201
    );

    let mut cases: Vec<Case> = vec![
        ("POST", pods.into(), json, b"{not json".to_vec(), 400, "BadRequest"),
        ("POST", pods.into(), json, b"[1,2]".to_vec(), 400, "BadRequest"),
        ("POST", pods.into(), json, br#"{"kind":"Service","metadata":{"name":"x"}}"#.to_vec(), 400, "BadRequest"),
        ("POST", pods.into(), json, br#"{"metadata":{"name":"x","namespace":"other"},"spec":{"containers":[{"name":"c","image":"i"}]}}"#.to_vec(), 400, "BadRequest"),
        ("POST", pods.into(), json, br#"{"metadata":{"name":"Bad_Name"},"spec":{"containers":[{"name":"c","image":"i"}]}}"#.to_vec(), 422, "Invalid"),
        ("POST", pods.into(), json, br#"{"metadata":{"name":"l","labels":{"a":1}},"spec":{"containers":[{"name":"c","image":"i"}]}}"#.to_vec(), 400, "BadRequest"),
        ("POST", format!("{pods}/p"), json, pod.clone().into_bytes(), 405, "MethodNotAllowed"),
        ("PUT", format!("{pods}/other"), json, pod.clone().into_bytes(), 400, "BadRequest"),
        ("PATCH", format!("{pods}/p"), "text/plain", b"{}".to_vec(), 415, "UnsupportedMediaType"),
        ("PATCH", format!("{pods}/p"), "application/json-patch+json", br#"{"op":"add"}"#.to_vec(), 400, "BadRequest"),
        ("PATCH", format!("{pods}/p"), "application/json-patch+json", br#"[{"op":"remove","path":"/nope/deeper"}]"#.to_vec(), 422, "Invalid"),
        ("PATCH", format!("{pods}/p"), "application/merge-patch+json", br#"{"metadata":"x"}"#.to_vec(), 422, "Invalid"),
        ("PATCH", format!("{pods}/p"), "application/apply-patch+yaml", b"apiVersion: v1\nkind: Pod\n".to_vec(), 422, "Invalid"),
        ("PATCH", format!("{pods}/p?fieldManager=m"), "application/apply-patch+yaml", b": : :\n\t- [".to_vec(), 400, "BadRequest"),
        ("PATCH", format!("{pods}/p/status"), "application/merge-patch+json", br#"{"status":"weird"}"#.to_vec(), 422, "Invalid"),
        ("GET", format!("{pods}?labelSelector=a%20in%20b"), json, vec![], 400, "BadRequest"),
        ("GET", format!("{pods}?fieldSelector=spec.x%3D1"), json, vec![], 400, "BadRequest"),
        ("GET", format!("{pods}?limit=-1"), json, vec![], 200, ""),
        ("GET", format!("{pods}?limit=1&continue=zz"), json, vec![], 400, "BadRequest"),
        ("GET", format!("{pods}?watch=true&resourceVersion=abc"), json, vec![], 500, ""),
        ("GET", "/api/v1/nothings".into(), json, vec![], 404, "NotFound"),
        ("GET", "/apis/nope.example.com/v1".into(), json, vec![], 404, "NOT A STATUS"),
        ("DELETE", format!("{pods}/p"), json, b"{bad".to_vec(), 500, ""),
        ("GET", format!("/api/v1/namespaces/{}/configmaps/missing", b.ns), json, vec![], 404, "NotFound"),
    ];
    if b.control().is_some() {
        // Emulator-only (listed differences): logs are not emulated (a real server asks the
        // node's kubelet), and a JSON patch replacing the whole object with a non-object is
        // refused as a result that is not an object (a real server answers 200 and leaves the
        // object as it was).
        cases.push(("GET", format!("{pods}/p/log"), json, vec![], 404, "NotFound"));
        cases.push(("PATCH", format!("{pods}/p"), "application/json-patch+json", br#"[{"op":"replace","path":"","value":5}]"#.to_vec(), 422, "Invalid"));
    }
    // Every case is sent before judging, so one run lists every difference.
    let mut wrong = Vec::new();
    for (method, uri, ct, body, code, reason) in cases {
        let (got_code, got_reason) = send(&client, method, &uri, ct, &body).await;
        if (got_code, got_reason.as_str()) != (code, reason) {
            wrong.push(format!(
                "{method} {uri} {}: got {got_code} {got_reason}, want {code} {reason}",
                String::from_utf8_lossy(&body)
            ));
        }
    }
    assert!(wrong.is_empty(), "{}:\n{}", b.name, wrong.join("\n"));
    // The refused status write above did not break the test helpers or the server.
    if let Some(control) = b.control() {
        control.set_pod_phase(&b.ns, "p", "Running").expect("set phase");
        control.set_pod_ready(&b.ns, "p", true).expect("set ready");
    }
    assert_eq!(
        send(&client, "GET", &format!("{pods}/p"), json, &[])
            .await
            .0,
        200
    );
    })
    .await;
}
