//! Serving watch requests: per-watch filtering of the global event stream,
//! bookmarks, timeouts and disconnects.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::error::{ApiError, ApiResult};
use crate::events;
use crate::request::{AppState, Representation, Target, flag, selectors};
use crate::resources::ResourceType;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{WatchEvent, WatchStart};

/// Longest watch `timeoutSeconds` honoured (one year).
const MAX_TIMEOUT_SECONDS: u64 = 365 * 24 * 3600;

/// A watch's `timeoutSeconds`: an int64 as the API server decodes it (anything else is a
/// 400 with Go's `strconv` message), zero or negative meaning none. Capped so the deadline
/// arithmetic cannot overflow; a year is "forever" here.
fn parse_timeout_seconds(text: &str) -> Result<Option<Duration>, ApiError> {
    let seconds = text.parse::<i64>().map_err(|e| {
        let why = match e.kind() {
            std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => {
                "value out of range"
            }
            _ => "invalid syntax",
        };
        ApiError::bad_request(format!("strconv.ParseInt: parsing {text:?}: {why}"))
    })?;
    Ok(u64::try_from(seconds)
        .ok()
        .filter(|t| *t > 0)
        .map(|t| Duration::from_secs(t.min(MAX_TIMEOUT_SECONDS))))
}

/// Filters the global event stream down to one watch's resource, namespace and selectors.
struct WatchFilter {
    rt: ResourceType,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    representation: Representation,
    /// Table watches carry column definitions in their first row only.
    sent_any: bool,
    /// `apiVersion` of the watched type, for re-rendering custom resources.
    api_version: String,
}

impl WatchFilter {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The wire line for an event, translating selector transitions the way the API
    /// server does (entering the selection is ADDED, leaving it is DELETED).
    fn line(&mut self, ev: &WatchEvent) -> Option<String> {
        if ev.key != self.rt.storage_key()
            || self.namespace.as_ref().is_some_and(|n| *n != ev.namespace)
        {
            return None;
        }
        let now = self.matches(&ev.object);
        let before = ev.previous.as_ref().map(|p| self.matches(p));
        let ty = match (ev.kind.as_str(), now, before) {
            ("MODIFIED", true, Some(false)) => "ADDED",
            ("MODIFIED", false, Some(true)) => "DELETED",
            (_, false, _) => return None,
            (t, true, _) => t,
        };
        let first = !self.sent_any;
        self.sent_any = true;
        if events::is_view(&self.rt) {
            let view = events::core_to_view(&ev.object);
            let object = self.representation.object(&self.rt, &view, first);
            return Some(format!("{{\"type\":\"{ty}\",\"object\":{object}}}\n"));
        }
        // Custom resources stored under another served version are re-rendered with the
        // version this watch asked for (there is no conversion beyond apiVersion).
        let other_version = self.rt.custom
            && ev.object.get("apiVersion").and_then(Value::as_str)
                != Some(self.api_version.as_str());
        if self.representation != Representation::Full || other_version {
            let mut object = self.representation.object(&self.rt, &ev.object, first);
            if other_version && self.representation == Representation::Full {
                object["apiVersion"] = json!(self.api_version);
            }
            return Some(format!("{{\"type\":\"{ty}\",\"object\":{object}}}\n"));
        }
        Some(format!("{{\"type\":\"{ty}\",\"object\":{}}}\n", ev.json))
    }
}

pub(crate) fn serve_watch(
    state: &Arc<AppState>,
    target: &Target,
    query: &HashMap<String, String>,
    representation: Representation,
) -> ApiResult<Response> {
    let rt = target.rt.clone();
    let (labels, mut fields) = selectors(&state.store, &rt, query)?;
    if let Some(name) = &target.name {
        fields = state
            .store
            .field_selector(&rt, &format!("metadata.name={name}"))?;
    }
    let send_initial = flag(query, "sendInitialEvents");
    let start = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => WatchStart::Current,
        Some(_) if send_initial => WatchStart::Current,
        Some(rv) => WatchStart::After(
            // The API server answers an unparsable watch version with a 500 without a reason.
            rv.parse::<u64>().map_err(|_| {
                ApiError::new(
                    500,
                    "",
                    format!(
                        "resourceVersion: Invalid value: {rv:?}: strconv.ParseUint: parsing {rv:?}: invalid syntax"
                    ),
                )
            })?,
        ),
    };
    let bookmarks = flag(query, "allowWatchBookmarks");
    let timeout = match query.get("timeoutSeconds") {
        None => None,
        Some(t) => parse_timeout_seconds(t)?,
    };
    let filter = WatchFilter {
        rt,
        namespace: target.namespace.clone(),
        labels,
        fields,
        representation,
        sent_any: false,
        api_version: target.rt.api_version(),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let first: Option<String> =
        match state
            .store
            .subscribe(&filter.rt, filter.namespace.as_deref(), start)
        {
            Ok(sub) => {
                let task = WatchTask {
                    filter,
                    tx,
                    bookmark_interval: bookmarks.then_some(state.bookmark_interval),
                    timeout,
                    initial_events_end: send_initial,
                    epoch: state.control.watch_epoch(),
                };
                tokio::spawn(task.run(sub));
                None
            }
            // Like the API server: a 200 response carrying a single ERROR event.
            Err(e) => Some(format!(
                "{{\"type\":\"ERROR\",\"object\":{}}}\n",
                e.to_status()
            )),
        };
    let body = if let Some(line) = first {
        Body::from(line)
    } else {
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<Bytes, std::io::Error>(b), rx))
        });
        Body::from_stream(stream)
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(body)
        .unwrap_or_default())
}

struct WatchTask {
    filter: WatchFilter,
    tx: mpsc::Sender<Bytes>,
    bookmark_interval: Option<Duration>,
    timeout: Option<Duration>,
    initial_events_end: bool,
    epoch: tokio::sync::watch::Receiver<u64>,
}

impl WatchTask {
    async fn run(mut self, mut sub: crate::store::Subscription) {
        let mut last_rv = sub.start_rv;
        for ev in &sub.backlog {
            if let Some(line) = self.filter.line(ev)
                && self.tx.send(Bytes::from(line)).await.is_err()
            {
                return;
            }
            last_rv = last_rv.max(ev.rv);
        }
        if self.initial_events_end {
            let line = self.bookmark(last_rv, true);
            if self.tx.send(line).await.is_err() {
                return;
            }
        }
        let deadline = self
            .timeout
            .and_then(|t| tokio::time::Instant::now().checked_add(t));
        let period = self.bookmark_interval.unwrap_or(Duration::from_secs(3600));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        // `epoch` was subscribed before the replay and starts out seen, so a
        // `drop_watches()` requested since then (even mid-replay) still ends this watch.
        loop {
            let sleep_until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                received = sub.receiver.recv() => match received {
                    Ok(ev) => {
                        if ev.rv <= sub.start_rv {
                            continue;
                        }
                        last_rv = ev.rv;
                        if let Some(line) = self.filter.line(&ev)
                            && self.tx.send(Bytes::from(line)).await.is_err()
                        {
                            return;
                        }
                    }
                    // Too slow to keep up (or shut down): end the watch; the client resumes.
                    Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return,
                },
                _ = ticker.tick(), if self.bookmark_interval.is_some() => {
                    if self.tx.send(self.bookmark(last_rv, false)).await.is_err() {
                        return;
                    }
                }
                _ = self.epoch.changed() => return,
                () = sleep_until_deadline => return,
                () = self.tx.closed() => return,
            }
        }
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({"kind": self.filter.rt.kind, "apiVersion": self.filter.rt.api_version(), "metadata": metadata});
        Bytes::from(format!("{{\"type\":\"BOOKMARK\",\"object\":{obj}}}\n"))
    }
}
