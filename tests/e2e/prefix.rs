//! blockyard's Redis key prefix: the operator, configured with `REDIS_PREFIX=myapp` as
//! blockyard is, updates the hashes blockyard wrote under `myapp:`.

use std::time::Duration;

use redis::AsyncCommands;
use serde_json::json;
use session_operator::store::{Entry, Store, StoreOptions};

use crate::harness::{Cluster, Operator, OperatorConfig, Stores, eventually};

const RS_OLD: &str = "workers-6b7c8d9f5";
const RS_NEW: &str = "workers-5f4d3c2b1";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_reroutes_hashes_blockyard_wrote_under_a_prefix_without_colon() {
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
    // blockyard, configured with the prefix without its colon, writes the row and the hash
    // (under the prefix with the colon it appends).
    let primary = stores.schema.store(StoreOptions::default()).await;
    let mut conn = stores.prefix.conn().await;
    for i in 0..5 {
        let id = format!("b{i}");
        primary
            .set(&id, &Entry::new(old.clone(), "u"))
            .await
            .expect("row");
        let key = format!("{}session:{id}", stores.prefix.prefix);
        let now = chrono::Utc::now().timestamp().to_string();
        let _: () = conn
            .hset_multiple(
                &key,
                &[
                    ("worker_id", old.as_str()),
                    ("user_sub", "u"),
                    ("last_access", now.as_str()),
                ],
            )
            .await
            .expect("hset");
        let _: () = conn.expire(&key, 1800).await.expect("expire");
    }
    cluster
        .apply_policy(
            "workers",
            json!({"selector": {"matchLabels": {"app": "worker"}},
                   "migration": {"replacementWait": "5s"}}),
        )
        .await;
    let configured = stores.prefix.prefix.trim_end_matches(':').to_string();
    let config = OperatorConfig {
        extra: vec!["--redis-prefix".into(), configured],
        ..OperatorConfig::default()
    };
    let mut operator = Operator::start(&cluster, &stores, config).await;
    operator.wait_leader(Duration::from_secs(20)).await;
    cluster.delete_pod(&old).await;
    eventually(Duration::from_secs(20), "Postgres rows moved", || async {
        (stores.counts().await.get(&new) == Some(&5)).then_some(())
    })
    .await;
    // The cache, as blockyard reads it, routes to the new worker too.
    eventually(
        Duration::from_secs(10),
        "blockyard's hashes moved",
        || async {
            for i in 0..5 {
                let key = format!("{}session:b{i}", stores.prefix.prefix);
                let worker: Option<String> = conn.clone().hget(&key, "worker_id").await.ok()?;
                if worker.as_deref() != Some(new.as_str()) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    operator.terminate().await;
}
