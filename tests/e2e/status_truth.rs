//! Status tells the truth: the session count across a rollout, a migration that keeps failing,
//! and late sessions summarised instead of one Event and log line each.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event as KubeEvent;
use serde_json::json;
use session_operator::store::{Entry, Store};

use crate::harness::{Cluster, NS, Operator, OperatorConfig, Stores, eventually};

const RS_OLD: &str = "workers-6b7c8d9f5";
const RS_NEW: &str = "workers-5f4d3c2b1";

async fn sessions(cluster: &Cluster, policy: &str) -> Option<u64> {
    cluster.policies().get(policy).await.ok()?.status?.sessions
}

async fn condition(
    cluster: &Cluster,
    policy: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let policy = cluster.policies().get(policy).await.ok()?;
    let c = policy
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status, c.reason, c.message))
}

/// With the default 10 s count interval, `status.sessions` read 0 for seconds after every
/// rollout although every session was still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_sessions_stays_true_across_a_rollout() {
    let cluster = Cluster::start().await;
    let stores = Stores::new().await;
    let old: Vec<String> = (0..3).map(|i| format!("{RS_OLD}-o{i}")).collect();
    for name in &old {
        cluster
            .ready_pod(name, "worker", Some(("ReplicaSet", RS_OLD)))
            .await;
    }
    let seeded = stores.seed(&old, 50).await;
    cluster
        .apply_policy(
            "workers",
            json!({"selector": {"matchLabels": {"app": "worker"}},
                   "migration": {"replacementWait": "5s"}}),
        )
        .await;
    let config = OperatorConfig {
        extra: vec!["--counts-interval".into(), "10s".into()],
        ..OperatorConfig::default()
    };
    let mut operator = Operator::start(&cluster, &stores, config).await;
    operator.wait_leader(Duration::from_secs(20)).await;
    eventually(
        Duration::from_secs(20),
        "status.sessions counted",
        || async { (sessions(&cluster, "workers").await == Some(seeded)).then_some(()) },
    )
    .await;

    let watching = Arc::new(AtomicBool::new(true));
    let lowest = Arc::new(AtomicU64::new(u64::MAX));
    let watcher = tokio::spawn({
        let (watching, lowest) = (watching.clone(), lowest.clone());
        let policies = cluster.policies();
        async move {
            while watching.load(Ordering::Relaxed) {
                if let Some(n) = policies
                    .get("workers")
                    .await
                    .ok()
                    .and_then(|p| p.status?.sessions)
                {
                    lowest.fetch_min(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    for (i, old_pod) in old.iter().enumerate() {
        cluster
            .ready_pod(
                &format!("{RS_NEW}-n{i}"),
                "worker",
                Some(("ReplicaSet", RS_NEW)),
            )
            .await;
        cluster.delete_pod(old_pod).await;
    }
    eventually(Duration::from_secs(30), "every session moved", || async {
        let counts = stores.counts().await;
        counts.keys().all(|w| w.starts_with(RS_NEW)).then_some(())
    })
    .await;
    // Through the next count (10 s) and the status write after it.
    let until = Instant::now() + Duration::from_secs(14);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    watching.store(false, Ordering::Relaxed);
    watcher.await.expect("watcher");
    assert_eq!(
        lowest.load(Ordering::Relaxed),
        seeded,
        "status.sessions must stay {seeded} while sessions only move"
    );
    assert_eq!(sessions(&cluster, "workers").await, Some(seeded));
    operator.terminate().await;
}

/// A migration that cannot finish (a row kept locked by another transaction) makes the policy
/// `Degraded` naming the worker, and `Ready=False` once it persists; both clear when it
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_that_keeps_failing_is_degraded_and_not_ready() {
    let cluster = Cluster::start().await;
    let stores = Stores::new().await;
    for name in ["w-0", "w-1"] {
        cluster.ready_pod(name, "worker", None).await;
    }
    stores.seed(&["w-0".to_string()], 10).await;
    cluster
        .apply_policy(
            "workers",
            json!({"selector": {"matchLabels": {"app": "worker"}},
                   "migration": {"replacementWait": "1s", "onTerminate": "Reroute"}}),
        )
        .await;
    let config = OperatorConfig {
        extra: vec!["--pg-lock-timeout".into(), "200ms".into()],
        ..OperatorConfig::default()
    };
    let mut operator = Operator::start(&cluster, &stores, config).await;
    operator.wait_leader(Duration::from_secs(20)).await;

    // A proxy's transaction holds one of w-0's rows and stays idle.
    let pool = crate::harness::pg_pool(1).await;
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM {}.blockyard_sessions WHERE id = 's-w-0-0' FOR UPDATE",
        stores.schema.name
    )))
    .fetch_one(&mut *tx)
    .await
    .expect("lock a row");
    cluster.delete_pod("w-0").await;

    let (_, reason, message) = eventually(
        Duration::from_secs(90),
        "Ready=False because the migration keeps failing",
        || async {
            condition(&cluster, "workers", "Ready")
                .await
                .filter(|(s, _, _)| s == "False")
        },
    )
    .await;
    assert_eq!(reason, "MigrationFailing", "{message}");
    assert!(message.contains("worker w-0"), "{message}");
    let (status, reason, message) = condition(&cluster, "workers", "Degraded")
        .await
        .expect("Degraded");
    assert_eq!(status, "True");
    assert!(
        reason == "MigrationFailed" || reason == "MigrationIncomplete",
        "{reason}: {message}"
    );
    assert!(message.contains("worker w-0"), "{message}");

    tx.rollback().await.expect("release the row");
    eventually(Duration::from_secs(30), "Ready again", || async {
        let ready = condition(&cluster, "workers", "Ready").await?;
        let degraded = condition(&cluster, "workers", "Degraded").await?;
        (ready.0 == "True" && degraded.0 == "False").then_some(())
    })
    .await;
    assert_eq!(stores.counts().await.get("w-1"), Some(&10));
    operator.terminate().await;
}

/// A proxy that keeps writing sessions for a departed worker for seconds: every pass moves the
/// few that arrived. One Event and one info line per worker per summary interval, with counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_sessions_are_summarised_not_reported_one_by_one() {
    let cluster = Cluster::start().await;
    let stores = Stores::new().await;
    let old = format!("{RS_OLD}-o0");
    let new = format!("{RS_NEW}-n0");
    cluster
        .ready_pod(&old, "worker", Some(("ReplicaSet", RS_OLD)))
        .await;
    cluster
        .ready_pod(&new, "worker", Some(("ReplicaSet", RS_NEW)))
        .await;
    stores.seed(std::slice::from_ref(&old), 20).await;
    cluster
        .apply_policy(
            "workers",
            json!({"selector": {"matchLabels": {"app": "worker"}},
                   "migration": {"replacementWait": "5s"}}),
        )
        .await;
    let mut operator = Operator::start(&cluster, &stores, OperatorConfig::default()).await;
    operator.wait_leader(Duration::from_secs(20)).await;
    cluster.delete_pod(&old).await;
    eventually(
        Duration::from_secs(20),
        "the departure migrated",
        || async { (stores.counts().await.get(&new) == Some(&20)).then_some(()) },
    )
    .await;
    // Late means after the departure's own migration ended: until its last look at the worker
    // it takes newly written sessions itself (and reports them in its own Event).
    eventually(
        Duration::from_secs(20),
        "the departure's migration ended",
        || async {
            operator
                .logs_with_message("rerouted sessions")
                .iter()
                .any(|l| l["reason"] != "LateSessions")
                .then_some(())
        },
    )
    .await;

    // The lagging proxy: 4 s of writes for the departed worker.
    let mut late = 0u64;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        stores
            .store
            .set(&format!("late-{late}"), &Entry::new(old.clone(), ""))
            .await
            .expect("late write");
        late += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eventually(Duration::from_secs(20), "late sessions moved", || async {
        let counts = stores.counts().await;
        (counts.get(&new) == Some(&(20 + late)) && !counts.contains_key(&old)).then_some(())
    })
    .await;
    let migrations = operator
        .mutations()
        .iter()
        .filter(|m| m["reason"] == "LateSessions" && m["mutation"] == "reroute_worker")
        .count();
    assert!(
        migrations > 3,
        "the test made many late migrations: {migrations}"
    );

    // The summary of the last interval is out within the interval.
    let events: kube::Api<KubeEvent> = kube::Api::namespaced(cluster.client.clone(), NS);
    let notes = eventually(Duration::from_secs(15), "the summary Events", || async {
        let list = events.list(&Default::default()).await.ok()?;
        let notes: Vec<String> = list
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("ReroutedLateSessions"))
            .filter_map(|e| e.note.clone())
            .collect();
        let moved: u64 = notes
            .iter()
            .filter_map(|n| {
                n.strip_prefix("moved ")?
                    .split(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        (moved == late).then_some(notes)
    })
    .await;
    // 4 s of writes span at most two 10 s intervals (and the sessions of the last one).
    assert!(
        notes.len() <= 3,
        "{} late Events for {migrations} migrations: {notes:?}",
        notes.len()
    );
    let summaries = operator.logs_with_message("late sessions migrated").len();
    eprintln!(
        "late sessions: {late} written, {migrations} migrations, {} Events, {summaries} info lines",
        notes.len()
    );
    assert!(
        (1..=3).contains(&summaries),
        "{summaries} info lines for {migrations} late migrations"
    );
    operator.terminate().await;
}
