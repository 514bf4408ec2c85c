//! The request log: one record per request served, in RBAC terms (verb, API group,
//! resource, subresource, namespace, name), kept in a bounded ring for
//! [`crate::Control::requests`] and optionally written as JSON lines.

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::mpsc;

/// One served request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecord {
    /// RFC 3339 time the request arrived (microseconds).
    pub time: String,
    /// RBAC verb: `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection` (non-resource requests: the lowercase HTTP method, `get` for GET).
    pub verb: String,
    /// API group (`""` for core); empty for non-resource requests.
    pub api_group: String,
    pub api_version: String,
    /// Resource plural (`pods`); empty for non-resource requests.
    pub resource: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subresource: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Path of a non-resource request (`/api`, `/version`, `/openapi/v3`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub non_resource_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// HTTP status of the response (200 for watches that started streaming).
    pub code: u16,
}

impl RequestRecord {
    /// Whether this is a request for a resource (as opposed to discovery, health, …).
    pub fn is_resource_request(&self) -> bool {
        self.non_resource_url.is_none()
    }
}

/// Bounded in-memory log plus an optional JSON-lines sink.
pub(crate) struct AuditLog {
    limit: usize,
    ring: Mutex<VecDeque<RequestRecord>>,
    sink: Mutex<Option<Sink>>,
}

/// The JSON-lines writer: a channel to a thread that owns the file.
struct Sink {
    lines: mpsc::UnboundedSender<String>,
    thread: std::thread::JoinHandle<()>,
}

impl AuditLog {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            ring: Mutex::new(VecDeque::new()),
            sink: Mutex::new(None),
        }
    }

    /// Also appends every record to `path` as a JSON line (the file is created or
    /// truncated). Lines are written by a background task and flushed per batch.
    pub(crate) fn with_file(mut self, path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::create(path)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let thread = std::thread::Builder::new()
            .name("kube-emulator-audit".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(file);
                while let Some(line) = rx.blocking_recv() {
                    let mut ok = writeln!(out, "{line}").is_ok();
                    while let Ok(more) = rx.try_recv() {
                        ok &= writeln!(out, "{more}").is_ok();
                    }
                    if !ok || out.flush().is_err() {
                        tracing::error!("kube-emulator: writing the audit log failed");
                        return;
                    }
                }
            })?;
        self.sink = Mutex::new(Some(Sink { lines: tx, thread }));
        Ok(self)
    }

    pub(crate) fn record(&self, record: RequestRecord) {
        if let Some(sink) = self
            .sink
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            && let Ok(line) = serde_json::to_string(&record)
        {
            let _ = sink.lines.send(line);
        }
        if self.limit == 0 {
            return;
        }
        let mut ring = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while ring.len() >= self.limit {
            ring.pop_front();
        }
        ring.push_back(record);
    }

    /// Stops writing the file after everything recorded so far is written and flushed.
    pub(crate) fn close(&self) {
        let sink = self
            .sink
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(Sink { lines, thread }) = sink {
            drop(lines);
            if thread.join().is_err() {
                tracing::error!("kube-emulator: the audit log writer panicked");
            }
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<RequestRecord> {
        let ring = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ring.iter().cloned().collect()
    }

    pub(crate) fn clear(&self) {
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

/// Derives the RBAC attributes of a request from its method, path and query, as the API
/// server's `RequestInfoFactory` does (served or not).
pub(crate) fn request_info(
    method: &str,
    path: &str,
    query: &std::collections::HashMap<String, String>,
) -> RequestRecord {
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let mut record = RequestRecord {
        time: crate::util::format_time(std::time::SystemTime::now(), true),
        verb: String::new(),
        api_group: String::new(),
        api_version: String::new(),
        resource: String::new(),
        subresource: None,
        namespace: None,
        name: None,
        non_resource_url: None,
        user_agent: None,
        code: 0,
    };
    let (group, version, rest) = match segments.as_slice() {
        ["api", v, rest @ ..] if !rest.is_empty() => ("", *v, rest),
        ["apis", g, v, rest @ ..] if !rest.is_empty() => (*g, *v, rest),
        _ => {
            record.verb = match method {
                "GET" => "get".into(),
                other => other.to_ascii_lowercase(),
            };
            record.non_resource_url = Some(path.to_string());
            return record;
        }
    };
    record.api_group = group.to_string();
    record.api_version = version.to_string();
    let (rest, legacy_watch) = match rest {
        ["watch", rest @ ..] => (rest, true),
        _ => (rest, false),
    };
    let parts: &[&str] = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => {
            record.namespace = Some(ns.to_string());
            tail
        }
        _ => rest,
    };
    if let Some(resource) = parts.first() {
        record.resource = resource.to_string();
    }
    if let Some(name) = parts.get(1) {
        record.name = Some(name.to_string());
    }
    if parts.len() > 2 {
        record.subresource = Some(parts[2..].join("/"));
    }
    let watch = legacy_watch || query.get("watch").is_some_and(|v| v == "true" || v == "1");
    record.verb = match method {
        "GET" | "HEAD" if watch => "watch",
        "GET" | "HEAD" if record.name.is_some() => "get",
        "GET" | "HEAD" => "list",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" if record.name.is_some() => "delete",
        "DELETE" => "deletecollection",
        _ => "unknown",
    }
    .to_string();
    // A list or watch of one object by `metadata.name` is authorized by name.
    if matches!(record.verb.as_str(), "list" | "watch")
        && record.name.is_none()
        && let Some(fs) = query.get("fieldSelector")
    {
        for req in fs.split(',') {
            if let Some(name) = req
                .trim()
                .strip_prefix("metadata.name=")
                .map(|n| n.trim_start_matches('='))
            {
                record.name = Some(name.to_string());
            }
        }
    }
    record
}

#[cfg(test)]
mod tests {
    use super::request_info;
    use std::collections::HashMap;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn request_attributes_follow_rbac() {
        let r = request_info("GET", "/api/v1/namespaces/apps/pods", &q(&[]));
        assert_eq!((r.verb.as_str(), r.resource.as_str()), ("list", "pods"));
        assert_eq!(r.namespace.as_deref(), Some("apps"));
        let r = request_info("GET", "/api/v1/pods", &q(&[("watch", "true")]));
        assert_eq!((r.verb.as_str(), r.namespace), ("watch", None));
        let r = request_info(
            "PATCH",
            "/apis/apps/v1/namespaces/a/deployments/web/scale",
            &q(&[]),
        );
        assert_eq!(r.api_group, "apps");
        assert_eq!(r.subresource.as_deref(), Some("scale"));
        assert_eq!(r.name.as_deref(), Some("web"));
        let r = request_info("DELETE", "/api/v1/namespaces/a/pods", &q(&[]));
        assert_eq!(r.verb, "deletecollection");
        let r = request_info("GET", "/api/v1/namespaces/kube-system", &q(&[]));
        assert_eq!(
            (r.resource.as_str(), r.name.as_deref()),
            ("namespaces", Some("kube-system"))
        );
        let r = request_info(
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/a/leases",
            &q(&[("fieldSelector", "metadata.name=lock"), ("watch", "1")]),
        );
        assert_eq!(
            (r.verb.as_str(), r.name.as_deref()),
            ("watch", Some("lock"))
        );
        let r = request_info("GET", "/api/v1/watch/namespaces/a/pods", &q(&[]));
        assert_eq!(r.verb, "watch");
        let r = request_info("GET", "/apis", &q(&[]));
        assert!(!r.is_resource_request());
        assert_eq!(r.verb, "get");
    }
}
