//! `/healthz`, `/readyz` and `/metrics` on the metrics address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Readiness inputs, flipped by the components that know.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// The pod and policy watches delivered their initial lists.
    pub synced: AtomicBool,
    /// The last store call succeeded.
    pub store_ok: AtomicBool,
}

impl Health {
    pub(crate) fn ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed) && self.store_ok.load(Ordering::Relaxed)
    }
}

/// `session_operator_ready`: what `/readyz` answers, as a gauge read at scrape time, so an alert
/// sees a replica that is up but not ready (a probe failure is otherwise only a pod condition).
#[derive(Debug)]
struct ReadyCollector(Arc<Health>);

impl Collector for ReadyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(i64::from(self.0.ready()));
        let metric = encoder.encode_descriptor(
            "session_operator_ready",
            "1 while /readyz answers 200 (watches synced and the store reachable).",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

struct AppState {
    registry: Registry,
    health: Arc<Health>,
}

/// Serves until `shutdown` is cancelled.
pub(crate) async fn serve(
    addr: SocketAddr,
    mut registry: Registry,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    registry.register_collector(Box::new(ReadyCollector(health.clone())));
    let state = Arc::new(AppState { registry, health });
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the metrics address {addr}: {e}"))?;
    // The bound address: with port 0 the system picks one.
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let health = &state.health;
    if health.ready() {
        (StatusCode::OK, "ready".to_string())
    } else {
        let synced = health.synced.load(Ordering::Relaxed);
        let store = health.store_ok.load(Ordering::Relaxed);
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: watches synced={synced}, store reachable={store}"),
        )
    }
}

async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> impl IntoResponse {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains("application/openmetrics-text") {
        // Prometheus asks for OpenMetrics first.
        let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
        (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response()
    } else {
        let content_type = "text/plain; version=0.0.4; charset=utf-8";
        let text = openmetrics_to_text(&body);
        (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], text).into_response()
    }
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition, for clients that do not ask
/// for OpenMetrics (`curl`, `promtool check metrics`, older agents): they read `# TYPE x counter`
/// as a family whose samples are named `x`, so the `x_total` samples would be untyped and
/// without help. Counter families are renamed to their `_total` sample name; `# UNIT` and
/// `# EOF`, which the text format lacks, are dropped, and so are exemplars (none are recorded).
fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, "counter")) = rest.split_once(' ')
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|prefix| line.starts_with(prefix));
        match descriptor {
            Some(prefix) => {
                let rest = &line[prefix.len()..];
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line.split(" # ").next().unwrap_or(line)),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_names_counter_families_by_their_samples() {
        let openmetrics = "# HELP so_errors Errors by kind.\n# TYPE so_errors counter\n\
            so_errors_total{kind=\"store\"} 2 # {trace_id=\"a\"} 1.0\n\
            # HELP so_latency_seconds Latency.\n# TYPE so_latency_seconds histogram\n\
            # UNIT so_latency_seconds seconds\nso_latency_seconds_count 1\n\
            # HELP so_leader Leader.\n# TYPE so_leader gauge\nso_leader 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(openmetrics),
            "# HELP so_errors_total Errors by kind.\n# TYPE so_errors_total counter\n\
             so_errors_total{kind=\"store\"} 2\n\
             # HELP so_latency_seconds Latency.\n# TYPE so_latency_seconds histogram\n\
             so_latency_seconds_count 1\n\
             # HELP so_leader Leader.\n# TYPE so_leader gauge\nso_leader 1\n"
        );
    }
}
