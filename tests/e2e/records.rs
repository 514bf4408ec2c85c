//! The durable memory of each policy's workers: a worker that vanished while no operator ran,
//! or whose departure the previous leader saw, is completed by whoever leads next — for every
//! `workerId.from`, bare pods included, with Postgres or Redis alone. Sessions of ids no policy
//! ever selected stay untouched.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::{Value, json};
use session_operator::store::{Entry, Store, StoreOptions};

use crate::common::redis_url;
use crate::harness::{Cluster, NS, Operator, OperatorConfig, Stores, WorkerPod, eventually};

const ID_KEY: &str = "example.com/worker-id";

/// A bare (ownerless) Running, Ready pod labelled `app=worker`, with its worker id in a label
/// and an annotation too. Returns its uid.
async fn bare_pod(cluster: &Cluster, name: &str, id: &str) -> String {
    let pod = WorkerPod::new(name, "worker")
        .labels(json!({"app": "worker", ID_KEY: id}))
        .annotations(json!({ID_KEY: id}));
    let pods = cluster.ready_pods(&[pod]).await;
    pods[0].metadata.uid.clone().expect("uid")
}

async fn gone(cluster: &Cluster, name: &str) {
    eventually(Duration::from_secs(15), &format!("{name} gone"), || async {
        cluster
            .pods()
            .get_opt(name)
            .await
            .expect("get")
            .is_none()
            .then_some(())
    })
    .await;
}

/// Rows of the policy in the operator's table: worker id → departed?
async fn pg_records(stores: &Stores, policy: &str) -> BTreeMap<String, bool> {
    let pool = crate::harness::pg_pool(1).await;
    let rows: Vec<(String, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT worker_id, departed_at IS NOT NULL FROM {}.session_operator_workers
         WHERE policy = $1",
        stores.schema.name
    )))
    .bind(policy)
    .fetch_all(&pool)
    .await
    .expect("records query");
    pool.close().await;
    rows.into_iter().collect()
}

fn policy_spec(from: &str) -> Value {
    let mut worker_id = json!({"from": from});
    if from == "Label" || from == "Annotation" {
        worker_id["key"] = json!(ID_KEY);
    }
    json!({"selector": {"matchLabels": {"app": "worker"}}, "workerId": worker_id,
           "migration": {"onTerminate": "Delete", "replacementWait": "30s"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_deleted_while_no_operator_runs_is_migrated_for_every_worker_id_source() {
    for from in ["PodName", "PodUID", "Label", "Annotation"] {
        let cluster = Cluster::start().await;
        let stores = Stores::new().await;
        let uids = [
            bare_pod(&cluster, "pod-a", "wid-a").await,
            bare_pod(&cluster, "pod-b", "wid-b").await,
        ];
        let ids: Vec<String> = match from {
            "PodName" => vec!["pod-a".into(), "pod-b".into()],
            "PodUID" => uids.to_vec(),
            _ => vec!["wid-a".into(), "wid-b".into()],
        };
        stores.seed(&ids, 20).await;
        // Sessions of an id no policy ever selected: never touched.
        stores
            .seed(&["stranger-7d9f8c6b5-zzzzz".to_string()], 5)
            .await;
        cluster.apply_policy("workers", policy_spec(from)).await;

        let mut operator = Operator::start(&cluster, &stores, OperatorConfig::default()).await;
        eventually(
            Duration::from_secs(30),
            &format!("{from}: both workers recorded"),
            || async {
                let records = pg_records(&stores, &format!("{NS}/workers")).await;
                (records.len() == 2 && ids.iter().all(|id| records.get(id) == Some(&false)))
                    .then_some(())
            },
        )
        .await;
        assert_eq!(operator.terminate().await, Some(0));

        // No operator runs: the worker goes away for good.
        cluster.delete_pod("pod-a").await;
        gone(&cluster, "pod-a").await;

        let mut operator = Operator::start(&cluster, &stores, OperatorConfig::default()).await;
        eventually(
            Duration::from_secs(30),
            &format!("{from}: the vanished worker's sessions moved"),
            || async {
                let counts = stores.counts().await;
                (!counts.contains_key(&ids[0]) && counts.get(&ids[1]) == Some(&40)).then_some(())
            },
        )
        .await;
        let counts = stores.counts().await;
        assert_eq!(
            counts.get("stranger-7d9f8c6b5-zzzzz"),
            Some(&5),
            "{from}: {counts:?}"
        );
        assert_eq!(counts.values().sum::<u64>(), 45, "{from}: {counts:?}");
        eventually(
            Duration::from_secs(15),
            &format!("{from}: the record says it departed"),
            || async {
                let records = pg_records(&stores, &format!("{NS}/workers")).await;
                (records.get(&ids[0]) == Some(&true)).then_some(())
            },
        )
        .await;
        assert_eq!(operator.terminate().await, Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_only_keeps_the_records_in_redis() {
    let cluster = Cluster::start().await;
    let stores = Stores::new().await;
    let redis = stores.prefix.store(StoreOptions::default(), false).await;
    bare_pod(&cluster, "pod-a", "wid-a").await;
    bare_pod(&cluster, "pod-b", "wid-b").await;
    for (worker, n) in [("wid-a", 20), ("wid-b", 20), ("never-selected", 3)] {
        for i in 0..n {
            redis
                .set(&format!("s-{worker}-{i}"), &Entry::new(worker, ""))
                .await
                .expect("seed");
        }
    }
    cluster.apply_policy("workers", policy_spec("Label")).await;
    let config = || OperatorConfig {
        store_args: Some(vec!["--redis-url".into(), redis_url()]),
        ..Default::default()
    };
    let key = format!("{}operator-workers:{NS}/workers", stores.prefix.prefix);
    let mut conn = stores.prefix.conn().await;

    let mut operator = Operator::start(&cluster, &stores, config()).await;
    eventually(
        Duration::from_secs(30),
        "both workers recorded in Redis",
        || {
            let (mut conn, key) = (conn.clone(), key.clone());
            async move {
                let fields: Vec<String> = conn.hkeys(&key).await.ok()?;
                (fields.len() == 2).then_some(())
            }
        },
    )
    .await;
    assert_eq!(operator.terminate().await, Some(0));

    cluster.delete_pod("pod-a").await;
    gone(&cluster, "pod-a").await;
    let mut operator = Operator::start(&cluster, &stores, config()).await;
    eventually(
        Duration::from_secs(30),
        "wid-a's sessions moved",
        || async {
            let counts = redis.counts_by_worker().await.ok()?;
            (!counts.contains_key("wid-a") && counts.get("wid-b") == Some(&40)).then_some(())
        },
    )
    .await;
    let counts = redis.counts_by_worker().await.expect("counts");
    assert_eq!(counts.get("never-selected"), Some(&3), "{counts:?}");
    let record: Option<String> = conn.hget(&key, "wid-a").await.expect("hget");
    assert!(
        record.is_some_and(|r| r.contains("\"departed\":\"")),
        "the record says wid-a departed"
    );
    assert_eq!(operator.terminate().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_next_leader_completes_a_departure_the_killed_leader_observed() {
    let cluster = Cluster::start().await;
    let stores = Stores::new().await;
    // pod-b first: an ownerless pod created after pod-a (in a later second, as on a real API
    // server where each pod takes a while to turn Ready) would be pod-a's clear replacement,
    // and this scenario is the one without a replacement.
    bare_pod(&cluster, "pod-b", "wid-b").await;
    bare_pod(&cluster, "pod-a", "wid-a").await;
    stores
        .seed(&["wid-a".to_string(), "wid-b".to_string()], 30)
        .await;
    // No replacement exists when pod-a leaves, so the leader waits (onTerminate: Reroute,
    // replacementWait: 60s) — and is killed meanwhile.
    let mut spec = policy_spec("Label");
    spec["migration"] = json!({"onTerminate": "Reroute", "replacementWait": "60s"});
    cluster.apply_policy("workers", spec).await;
    let mut a = Operator::start(
        &cluster,
        &stores,
        OperatorConfig {
            identity: "op-a",
            ..Default::default()
        },
    )
    .await;
    a.wait_leader(Duration::from_secs(20)).await;
    eventually(Duration::from_secs(30), "both workers recorded", || async {
        (pg_records(&stores, &format!("{NS}/workers")).await.len() == 2).then_some(())
    })
    .await;

    cluster.delete_pod("pod-a").await;
    eventually(
        Duration::from_secs(20),
        "op-a recorded the departure",
        || async {
            let records = pg_records(&stores, &format!("{NS}/workers")).await;
            (records.get("wid-a") == Some(&true)).then_some(())
        },
    )
    .await;
    a.kill().await;
    assert!(
        stores.counts().await.get("wid-a") == Some(&30),
        "op-a had not migrated yet"
    );
    gone(&cluster, "pod-a").await;
    // The platform starts a new worker; then the next leader starts, never having seen pod-a.
    bare_pod(&cluster, "pod-new", "wid-new").await;
    let mut b = Operator::start(
        &cluster,
        &stores,
        OperatorConfig {
            identity: "op-b",
            ..Default::default()
        },
    )
    .await;
    b.wait_leader(Duration::from_secs(30)).await;
    eventually(
        Duration::from_secs(30),
        "op-b moved wid-a's sessions",
        || async {
            let counts = stores.counts().await;
            (!counts.contains_key("wid-a")).then_some(counts)
        },
    )
    .await;
    let counts = stores.counts().await;
    assert_eq!(counts.values().sum::<u64>(), 60, "{counts:?}");
    assert_eq!(
        counts.get("wid-new"),
        Some(&30),
        "to the fresh worker: {counts:?}"
    );
    assert_eq!(b.terminate().await, Some(0));
}
