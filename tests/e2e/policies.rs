//! Policies: validation, per-policy idle sweeps, status.

use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use session_operator::store::{Entry, Store};

use crate::harness::{Cluster, NS, Operator, OperatorConfig, Stores, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_policies_are_rejected_or_marked_not_ready() {
    let cluster = Cluster::start().await;
    let stores = Stores::new().await;
    let api = cluster.client.clone();
    let raw: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        api,
        NS,
        &kube::api::ApiResource::erase::<session_operator::policy::SessionPolicy>(&()),
    );
    // The schema rejects a wrong enum and a malformed duration at the API.
    for (name, spec) in [
        (
            "bad-enum",
            json!({"selector": {"matchLabels": {"a": "b"}}, "migration": {"onReplace": "Teleport"}}),
        ),
        (
            "bad-duration",
            json!({"selector": {"matchLabels": {"a": "b"}}, "idleTTL": "5 minutes"}),
        ),
        ("no-selector", json!({"idleTTL": "5m"})),
    ] {
        let object: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "sessions.blockyard.io/v1alpha1", "kind": "SessionPolicy",
            "metadata": {"name": name, "namespace": NS}, "spec": spec,
        }))
        .expect("object");
        let err = raw
            .create(&Default::default(), &object)
            .await
            .expect_err(&format!("{name} must be rejected"));
        assert!(
            matches!(err, kube::Error::Api(ref s) if s.code == 422),
            "{name}: {err}"
        );
    }
    // What only CEL catches (an empty selector): the real API server refuses it; the emulator
    // evaluates no CEL, so there it reaches the operator, which refuses it (InvalidSpec).
    let mut operator = Operator::start(&cluster, &stores, OperatorConfig::default()).await;
    if cluster.is_real() {
        let object: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "sessions.blockyard.io/v1alpha1", "kind": "SessionPolicy",
            "metadata": {"name": "empty-selector", "namespace": NS}, "spec": {"selector": {}},
        }))
        .expect("object");
        let err = raw
            .create(&Default::default(), &object)
            .await
            .expect_err("the CEL rule refuses an empty selector");
        assert!(
            matches!(err, kube::Error::Api(ref s) if s.code == 422
                && s.message.contains("selector must name what it selects")),
            "{err}"
        );
    } else {
        cluster
            .apply_policy("empty-selector", json!({"selector": {}}))
            .await;
        let (status, reason) = eventually(Duration::from_secs(20), "Ready=False", || async {
            cluster.policy_condition("empty-selector", "Ready").await
        })
        .await;
        assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    }
    // A valid policy next to it is Ready: one bad object does not break the watch.
    cluster.ready_pod("w-0", "worker", None).await;
    cluster
        .apply_policy(
            "good",
            json!({"selector": {"matchLabels": {"app": "worker"}}}),
        )
        .await;
    let (status, reason) = eventually(Duration::from_secs(20), "Ready=True", || async {
        cluster
            .policy_condition("good", "Ready")
            .await
            .filter(|(s, _)| s == "True")
    })
    .await;
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Reconciled"));
    let good = cluster.policies().get("good").await.expect("get");
    let status = good.status.expect("status");
    assert_eq!(status.workers.map(|w| w.ready), Some(1));
    assert_eq!(status.observed_generation, good.metadata.generation);
    operator.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sweep_of_one_policy_never_touches_another_policys_sessions() {
    let cluster = Cluster::start().await;
    let stores = Stores::new().await;
    cluster.ready_pod("short-0", "short", None).await;
    cluster.ready_pod("long-0", "long", None).await;
    let stale = Utc::now() - chrono::Duration::seconds(120);
    for worker in ["short-0", "long-0"] {
        for i in 0..10 {
            let mut entry = Entry::new(worker, "");
            entry.last_access = stale;
            stores
                .store
                .set(&format!("{worker}-idle-{i}"), &entry)
                .await
                .expect("set");
            stores
                .store
                .set(&format!("{worker}-fresh-{i}"), &Entry::new(worker, ""))
                .await
                .expect("set");
        }
    }
    cluster
        .apply_policy(
            "short",
            json!({"selector": {"matchLabels": {"app": "short"}}, "idleTTL": "60s", "idleSweepInterval": "1s"}),
        )
        .await;
    cluster
        .apply_policy(
            "long",
            json!({"selector": {"matchLabels": {"app": "long"}}, "idleTTL": "1h", "idleSweepInterval": "1s"}),
        )
        .await;
    let mut operator = Operator::start(&cluster, &stores, OperatorConfig::default()).await;
    eventually(
        Duration::from_secs(20),
        "short policy swept its idle sessions",
        || async { (stores.counts().await.get("short-0") == Some(&10)).then_some(()) },
    )
    .await;
    // Several sweeps later the other policy's stale sessions are all still there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counts = stores.counts().await;
    assert_eq!(counts.get("long-0"), Some(&20), "{counts:?}");
    assert_eq!(counts.get("short-0"), Some(&10), "{counts:?}");
    // Status shows the last sweep (later ones removed nothing); an Event records the removal.
    let status = cluster
        .policies()
        .get("short")
        .await
        .expect("get")
        .status
        .expect("status");
    assert!(status.last_idle_sweep.is_some(), "{status:?}");
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(cluster.client.clone(), NS);
    eventually(Duration::from_secs(10), "an IdleSweep event", || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("IdleSweep")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("short")
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.starts_with("removed 10 session"))
            })
            .then_some(())
    })
    .await;
    operator.terminate().await;
}
