//! `/readyz` of the real binary: ready once every watch listed and the store answers, with or
//! without policies; unready while the store is unreachable, ready again when it is back.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{ChaosProxy, pg_url};
use crate::harness::{Cluster, Operator, OperatorConfig, Stores, eventually, http_get};

/// The requirement: ready within 5 s of the health server answering.
const READY_WITHIN: Duration = Duration::from_secs(5);

/// Starts the operator, waits for its health server, then polls `/readyz` until 200 for at most
/// [`READY_WITHIN`]; returns how long it took, or the last answer.
async fn start_and_time_ready(
    cluster: &Cluster,
    stores: &Stores,
) -> (Operator, Result<Duration, String>) {
    let operator = Operator::start(cluster, stores, OperatorConfig::default()).await;
    let addr = operator.metrics_addr(Duration::from_secs(30)).await;
    // The clock starts when the process serves its probes (what a readinessProbe sees).
    eventually(Duration::from_secs(30), "the health server answers", || {
        let addr = addr.clone();
        async move { http_get(&addr, "/healthz").await }
    })
    .await;
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < READY_WITHIN {
        match http_get(&addr, "/readyz").await {
            Some((200, _)) => return (operator, Ok(started.elapsed())),
            Some((code, body)) => last = format!("{code} {body}"),
            None => last = "no answer".into(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (operator, Err(last))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_turns_ready_at_every_start_with_and_without_policies() {
    for scenario in [
        "no policy",
        "a policy selecting no pod",
        "policies and pods",
    ] {
        let cluster = Cluster::start().await;
        let stores = Stores::new().await;
        match scenario {
            "no policy" => {}
            "a policy selecting no pod" => {
                cluster
                    .apply_policy(
                        "nobody",
                        json!({"selector": {"matchLabels": {"app": "nobody"}}}),
                    )
                    .await;
            }
            _ => {
                for (policy, app) in [("workers", "worker"), ("api", "api")] {
                    cluster
                        .apply_policy(policy, json!({"selector": {"matchLabels": {"app": app}}}))
                        .await;
                    for i in 0..3 {
                        cluster.ready_pod(&format!("{app}-{i}"), app, None).await;
                    }
                }
            }
        }
        let mut times = Vec::new();
        for start in 0..10 {
            let (mut operator, ready) = start_and_time_ready(&cluster, &stores).await;
            let took = ready.unwrap_or_else(|last| {
                panic!(
                    "{scenario}, start {start}: /readyz not 200 within {READY_WITHIN:?}; last: {last}"
                )
            });
            times.push(took.as_millis());
            assert_eq!(operator.terminate().await, Some(0), "clean exit");
        }
        eprintln!("{scenario}: /readyz 200 after (ms) {times:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_follows_the_store() {
    let cluster = Cluster::start().await;
    let stores = Stores::new().await;
    // The operator reaches Postgres only through a proxy the test can cut; no policy exists, so
    // no pass would notice on its own.
    let mut url = url::Url::parse(&pg_url()).expect("DATABASE_URL");
    let target = format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5432)
    );
    let proxy = ChaosProxy::start(&target).await;
    url.set_host(Some(&proxy.addr.ip().to_string()))
        .expect("host");
    url.set_port(Some(proxy.addr.port())).expect("port");
    let config = OperatorConfig {
        store_args: Some(vec!["--database-url".into(), url.to_string()]),
        ..Default::default()
    };
    let mut operator = Operator::start(&cluster, &stores, config).await;
    let addr = operator.metrics_addr(Duration::from_secs(30)).await;
    let readyz = |addr: String| async move { http_get(&addr, "/readyz").await };
    eventually(Duration::from_secs(30), "ready", || async {
        readyz(addr.clone()).await.filter(|(code, _)| *code == 200)
    })
    .await;

    proxy.cut();
    let (code, body) = eventually(
        Duration::from_secs(30),
        "unready without the store",
        || async { readyz(addr.clone()).await.filter(|(code, _)| *code != 200) },
    )
    .await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("store reachable=false"), "{body}");

    proxy.restore();
    eventually(Duration::from_secs(30), "ready again", || async {
        readyz(addr.clone()).await.filter(|(code, _)| *code == 200)
    })
    .await;
    assert_eq!(operator.terminate().await, Some(0));
}
