//! Malformed requests get Kubernetes `Status` errors, and the server keeps serving.

use kube::Client;
use serde_json::json;

use crate::start;

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
        .body(body.to_vec())
        .expect("request");
    match client.request::<serde_json::Value>(request).await {
        Ok(_) => (200, String::new()),
        Err(kube::Error::Api(status)) => (status.code, status.reason.clone()),
        Err(other) => panic!("{method} {uri}: expected a Status error, got {other:?}"),
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
    let (emulator, client) = start().await;
    let pods = "/api/v1/namespaces/default/pods";
    let json = "application/json";
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "i"}]}})
    .to_string();
    assert_eq!(
        send(&client, "POST", pods, json, pod.as_bytes()).await.0,
        200
    );

    let cases: Vec<Case> = vec![
        ("POST", pods.into(), json, b"{not json".to_vec(), 400, "BadRequest"),
        ("POST", pods.into(), json, b"[1,2]".to_vec(), 400, "BadRequest"),
        ("POST", pods.into(), json, br#"{"kind":"Service","metadata":{"name":"x"}}"#.to_vec(), 400, "BadRequest"),
        ("POST", pods.into(), json, br#"{"metadata":{"name":"x","namespace":"other"},"spec":{"containers":[{"name":"c","image":"i"}]}}"#.to_vec(), 400, "BadRequest"),
        ("POST", pods.into(), json, br#"{"metadata":{"name":"Bad_Name"},"spec":{"containers":[{"name":"c","image":"i"}]}}"#.to_vec(), 422, "Invalid"),
        ("POST", pods.into(), json, br#"{"metadata":{"name":"l","labels":{"a":1}},"spec":{"containers":[{"name":"c","image":"i"}]}}"#.to_vec(), 422, "Invalid"),
        ("POST", format!("{pods}/p"), json, pod.clone().into_bytes(), 405, "MethodNotAllowed"),
        ("PUT", format!("{pods}/other"), json, pod.clone().into_bytes(), 400, "BadRequest"),
        ("PATCH", format!("{pods}/p"), "text/plain", b"{}".to_vec(), 415, "UnsupportedMediaType"),
        ("PATCH", format!("{pods}/p"), "application/json-patch+json", br#"{"op":"add"}"#.to_vec(), 400, "BadRequest"),
        ("PATCH", format!("{pods}/p"), "application/json-patch+json", br#"[{"op":"replace","path":"","value":5}]"#.to_vec(), 400, "BadRequest"),
        ("PATCH", format!("{pods}/p"), "application/json-patch+json", br#"[{"op":"remove","path":"/nope/deeper"}]"#.to_vec(), 422, "Invalid"),
        ("PATCH", format!("{pods}/p"), "application/merge-patch+json", br#"{"metadata":"x"}"#.to_vec(), 400, "BadRequest"),
        ("PATCH", format!("{pods}/p"), "application/apply-patch+yaml", b"apiVersion: v1\nkind: Pod\n".to_vec(), 400, "BadRequest"),
        ("PATCH", format!("{pods}/p?fieldManager=m"), "application/apply-patch+yaml", b": : :\n\t- [".to_vec(), 400, "BadRequest"),
        ("PATCH", format!("{pods}/p/status"), "application/merge-patch+json", br#"{"status":"weird"}"#.to_vec(), 200, ""),
        ("GET", format!("{pods}?labelSelector=a%20in%20b"), json, vec![], 400, "BadRequest"),
        ("GET", format!("{pods}?fieldSelector=spec.x%3D1"), json, vec![], 400, "BadRequest"),
        ("GET", format!("{pods}?limit=-1"), json, vec![], 400, "BadRequest"),
        ("GET", format!("{pods}?limit=1&continue=zz"), json, vec![], 400, "BadRequest"),
        ("GET", format!("{pods}?watch=true&resourceVersion=abc"), json, vec![], 400, "BadRequest"),
        ("GET", format!("{pods}/p/log"), json, vec![], 404, "NotFound"),
        ("GET", "/api/v1/nothings".into(), json, vec![], 404, "NotFound"),
        ("GET", "/apis/nope.example.com/v1".into(), json, vec![], 404, "NotFound"),
        ("DELETE", format!("{pods}/p"), json, b"{bad".to_vec(), 400, "BadRequest"),
        ("GET", "/api/v1/namespaces/default/configmaps/missing".into(), json, vec![], 404, "NotFound"),
    ];
    for (method, uri, ct, body, code, reason) in cases {
        let (got_code, got_reason) = send(&client, method, &uri, ct, &body).await;
        assert_eq!(
            (got_code, got_reason.as_str()),
            (code, reason),
            "{method} {uri} {}",
            String::from_utf8_lossy(&body)
        );
    }
    // The odd status write above did not break the test helpers or the server.
    emulator
        .control()
        .set_pod_phase("default", "p", "Running")
        .expect("set phase");
    emulator
        .control()
        .set_pod_ready("default", "p", true)
        .expect("set ready");
    assert_eq!(
        send(&client, "GET", &format!("{pods}/p"), json, &[])
            .await
            .0,
        200
    );
    emulator.shutdown().await;
}
