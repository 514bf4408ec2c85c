//! Two operator processes: only the lease holder mutates; a standby takes over when the leader
//! dies and finishes its work.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use serde_json::json;
use session_operator::store::{Entry, Store};

use crate::harness::{Cluster, Operator, OperatorConfig, Stores, eventually};

const RS_OLD: &str = "workers-6b7c8d9f5";
const RS_NEW: &str = "workers-5f4d3c2b1";

async fn holder(cluster: &Cluster) -> Option<String> {
    let (namespace, name) = cluster.lease();
    let leases: kube::Api<Lease> = kube::Api::namespaced(cluster.client.clone(), &namespace);
    leases.get_opt(&name).await.ok()??.spec?.holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standby_takes_over_a_killed_leader_and_finishes_the_rollout() {
    let cluster = Cluster::start().await;
    let stores = Stores::new().await;
    let old: Vec<String> = (0..6).map(|i| format!("{RS_OLD}-l{i:04}")).collect();
    for name in &old {
        cluster
            .ready_pod(name, "worker", Some(("ReplicaSet", RS_OLD)))
            .await;
        for i in 0..20 {
            stores
                .store
                .set(&format!("{name}-{i}"), &Entry::new(name.clone(), ""))
                .await
                .expect("set");
        }
    }
    cluster
        .apply_policy(
            "workers",
            json!({"selector": {"matchLabels": {"app": "worker"}}, "migration": {"replacementWait": "30s"}}),
        )
        .await;
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
    let b = Operator::start(
        &cluster,
        &stores,
        OperatorConfig {
            identity: "op-b",
            ..Default::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(holder(&cluster).await.as_deref(), Some("op-a"));

    // Half the rollout under op-a.
    for (i, pod) in old.iter().enumerate().take(3) {
        cluster
            .ready_pod(
                &format!("{RS_NEW}-l{i:04}"),
                "worker",
                Some(("ReplicaSet", RS_NEW)),
            )
            .await;
        cluster.delete_pod(pod).await;
    }
    eventually(
        Duration::from_secs(20),
        "op-a migrated the first half",
        || async {
            let counts = stores.counts().await;
            old.iter()
                .take(3)
                .all(|p| !counts.contains_key(p))
                .then_some(())
        },
    )
    .await;
    assert!(
        b.mutations().is_empty(),
        "the standby mutated: {:?}",
        b.mutations()
    );

    // op-a dies without releasing the lease; the rest of the rollout happens meanwhile.
    a.kill().await;
    let killed = Instant::now();
    for (i, pod) in old.iter().enumerate().skip(3) {
        cluster
            .ready_pod(
                &format!("{RS_NEW}-l{i:04}"),
                "worker",
                Some(("ReplicaSet", RS_NEW)),
            )
            .await;
        cluster.delete_pod(pod).await;
    }
    b.wait_leader(Duration::from_secs(20)).await;
    let took = killed.elapsed();
    eventually(
        Duration::from_secs(30),
        "op-b finished the rollout",
        || async {
            let counts = stores.counts().await;
            (counts.keys().all(|w| w.starts_with(RS_NEW)) && counts.values().sum::<u64>() == 120)
                .then_some(())
        },
    )
    .await;
    assert_eq!(holder(&cluster).await.as_deref(), Some("op-b"));
    // Lease of 4 s: the standby may take over only after it expired, and soon after.
    assert!(
        took >= Duration::from_secs(1),
        "took over before the lease could expire: {took:?}"
    );
    // The log line follows the commit (and the cache update): wait for it too.
    let sources = eventually(Duration::from_secs(10), "op-b logged the rest", || async {
        let sources: Vec<String> = b
            .mutations()
            .iter()
            .filter_map(|m| m["from"].as_str().map(String::from))
            .collect();
        old.iter()
            .skip(3)
            .all(|p| sources.contains(p))
            .then_some(sources)
    })
    .await;
    assert!(
        old.iter().skip(3).all(|p| sources.contains(p)),
        "op-b migrated the rest: {sources:?}"
    );
    assert!(
        b.mutations().iter().all(|m| m["identity"] == "op-b"),
        "mutations are audited with the identity that made them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_releases_the_lease_for_a_fast_handover() {
    let cluster = Cluster::start().await;
    let stores = Stores::new().await;
    let cfg = |identity| OperatorConfig {
        identity,
        lease_duration: "30s",
        ..Default::default()
    };
    let mut a = Operator::start(&cluster, &stores, cfg("op-a")).await;
    a.wait_leader(Duration::from_secs(20)).await;
    let b = Operator::start(&cluster, &stores, cfg("op-b")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopped = Instant::now();
    assert_eq!(a.terminate().await, Some(0), "clean exit on SIGTERM");
    // Well before the 30 s lease could expire.
    b.wait_leader(Duration::from_secs(15)).await;
    assert!(stopped.elapsed() < Duration::from_secs(20));
    assert_eq!(holder(&cluster).await.as_deref(), Some("op-b"));
}
