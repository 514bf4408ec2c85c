//! Policies whose selectors overlap, and selectors only the operator can refuse on an API
//! server without CEL: a pod belongs to one policy; the others leave it alone and say so.

use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use serde_json::{Value, json};
use session_operator::policy::SessionPolicy;
use session_operator::store::{Entry, Store};

use crate::harness::{Cluster, NS, Operator, OperatorConfig, Stores, WorkerPod, eventually};

/// A Running, Ready bare pod with these labels.
async fn labelled_pod(cluster: &Cluster, name: &str, labels: Value) {
    cluster
        .ready_pods(&[WorkerPod::new(name, "").labels(labels)])
        .await;
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

/// `a-keeper` (older) and `b-sweeper` both select `shared-0` and `shared-1`; `b-sweeper` alone
/// selects `own-0`. The sweeper's 1m idle TTL, its deletes on termination and its deletion
/// costs reach its own pod only; the keeper's 1h TTL and its reroute decide for the shared pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_selected_by_two_policies_is_managed_by_the_older_one_only() {
    let cluster = Cluster::start().await;
    let stores = Stores::new().await;
    for name in ["shared-0", "shared-1"] {
        labelled_pod(&cluster, name, json!({"app": "worker", "pool": "x"})).await;
    }
    labelled_pod(&cluster, "own-0", json!({"pool": "y"})).await;
    let stale = Utc::now() - chrono::Duration::seconds(120);
    for worker in ["shared-0", "shared-1", "own-0"] {
        for i in 0..10 {
            let mut entry = Entry::new(worker, "");
            entry.last_access = stale;
            stores
                .store
                .set(&format!("{worker}-idle-{i}"), &entry)
                .await
                .expect("set");
        }
    }
    cluster
        .apply_policy(
            "a-keeper",
            json!({"selector": {"matchLabels": {"app": "worker"}}, "idleTTL": "1h",
                   "idleSweepInterval": "1s",
                   "migration": {"replacementWait": "1s", "onTerminate": "Reroute"}}),
        )
        .await;
    cluster
        .apply_policy(
            "b-sweeper",
            json!({"selector": {"matchExpressions": [{"key": "pool", "operator": "Exists"}]},
                   "idleTTL": "1m", "idleSweepInterval": "1s", "podDeletionCost": true,
                   "migration": {"replacementWait": "1s", "onTerminate": "Delete"}}),
        )
        .await;
    let mut operator = Operator::start(&cluster, &stores, OperatorConfig::default()).await;
    operator.wait_leader(Duration::from_secs(20)).await;

    let (status, reason, message) = eventually(
        Duration::from_secs(20),
        "b-sweeper reports the overlap",
        || async {
            condition(&cluster, "b-sweeper", "Degraded")
                .await
                .filter(|(s, _, _)| s == "True")
        },
    )
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "OverlappingSelector")
    );
    assert!(
        message.starts_with("2 selected pod(s) are also selected by policy a-keeper"),
        "{message}"
    );
    let (status, reason, _) = eventually(Duration::from_secs(20), "a-keeper's status", || async {
        condition(&cluster, "a-keeper", "Degraded").await
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "AsExpected"),
        "the owner is not degraded"
    );

    // The sweeper sweeps its own pod's idle sessions — in the same sweep it would have taken
    // the shared pods' if it included them.
    eventually(Duration::from_secs(20), "own-0 swept", || async {
        (!stores.counts().await.contains_key("own-0")).then_some(())
    })
    .await;
    let counts = stores.counts().await;
    assert_eq!(counts.get("shared-0"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("shared-1"), Some(&10), "{counts:?}");
    // It annotates its own pod, never the shared ones.
    eventually(Duration::from_secs(10), "own-0 annotated", || async {
        let pod = cluster.pods().get("own-0").await.ok()?;
        pod.metadata
            .annotations?
            .contains_key("controller.kubernetes.io/pod-deletion-cost")
            .then_some(())
    })
    .await;
    for shared in ["shared-0", "shared-1"] {
        let pod = cluster.pods().get(shared).await.expect("pod");
        let annotated = pod
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("controller.kubernetes.io/pod-deletion-cost");
        assert!(!annotated, "{shared} annotated by the non-owner");
    }

    // A shared pod departs: the owner reroutes its sessions; the sweeper (onTerminate: Delete)
    // deletes none of them.
    cluster.delete_pod("shared-0").await;
    eventually(Duration::from_secs(20), "shared-0 rerouted", || async {
        let counts = stores.counts().await;
        (!counts.contains_key("shared-0")).then_some(())
    })
    .await;
    // Long enough for the sweeper's replacementWait and a few of its passes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counts = stores.counts().await;
    assert_eq!(
        counts.get("shared-1"),
        Some(&20),
        "nothing deleted: {counts:?}"
    );
    let sweeper_touched: Vec<Value> = operator
        .mutations()
        .into_iter()
        .filter(|m| m["policy"] == "b-sweeper")
        .filter(|m| {
            ["worker", "from", "to"]
                .iter()
                .any(|f| m[f].as_str().is_some_and(|w| w.starts_with("shared-")))
        })
        .collect();
    assert!(sweeper_touched.is_empty(), "{sweeper_touched:?}");
    let events: kube::Api<KubeEvent> = kube::Api::namespaced(cluster.client.clone(), NS);
    let list = events.list(&Default::default()).await.expect("events");
    let sweeper_migrations: Vec<_> = list
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("b-sweeper"))
        .filter(|e| {
            e.action
                .as_deref()
                .is_some_and(|a| a == "Reroute" || a == "Delete")
        })
        .map(|e| e.note.clone())
        .collect();
    assert!(sweeper_migrations.is_empty(), "{sweeper_migrations:?}");
    operator.terminate().await;
}

/// What only CEL catches reaches the operator on an API server without CEL (the emulator): it
/// refuses each with `InvalidSpec` and a precise message, and mutates nothing for it. The real
/// API server refuses each at create, with the CRD's CEL message; the operator then never sees
/// them, and touches nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn selectors_and_durations_kubernetes_rejects_are_invalid_specs() {
    let cluster = Cluster::start().await;
    let stores = Stores::new().await;
    labelled_pod(&cluster, "operator-pod", json!({"app": "session-operator"})).await;
    labelled_pod(&cluster, "w-0", json!({"app": "worker"})).await;
    stores.seed(&["operator-pod".to_string()], 5).await;
    let selector = |selector: Value| json!({"selector": selector, "podDeletionCost": true});
    // (name, spec, the operator's message, the CRD's CEL message)
    let cases = [
        (
            "exists-with-values",
            selector(
                json!({"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]}),
            ),
            "matchExpressions[0].values: Forbidden",
            "values may not be specified when operator is 'Exists' or 'DoesNotExist'",
        ),
        (
            "in-without-values",
            selector(json!({"matchExpressions": [{"key": "app", "operator": "In", "values": []}]})),
            "matchExpressions[0].values: Required",
            "values must be specified when operator is 'In' or 'NotIn'",
        ),
        (
            "bad-key",
            selector(json!({"matchExpressions": [{"key": "-app", "operator": "Exists"}]})),
            "matchExpressions[0].key: invalid label key",
            "invalid label key",
        ),
        (
            "lone-does-not-exist",
            selector(json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]})),
            "must name what it selects",
            "selector must name what it selects",
        ),
        (
            "spinning",
            json!({"selector": {"matchLabels": {"app": "worker"}}, "idleTTL": "1h",
                   "idleSweepInterval": "1ns"}),
            "spec.idleSweepInterval: \"1ns\" must be at least 1s",
            "must be at least 1s",
        ),
    ];
    let mut operator = Operator::start(&cluster, &stores, OperatorConfig::default()).await;
    operator.wait_leader(Duration::from_secs(20)).await;
    if cluster.is_real() {
        for (name, spec, _, cel) in &cases {
            let policy: SessionPolicy = serde_json::from_value(json!({
                "apiVersion": "sessions.blockyard.io/v1alpha1", "kind": "SessionPolicy",
                "metadata": {"name": name, "namespace": NS}, "spec": spec,
            }))
            .expect("policy");
            let err = cluster
                .policies()
                .create(&Default::default(), &policy)
                .await
                .expect_err(&format!("the CEL rules refuse {name}"));
            assert!(
                matches!(err, kube::Error::Api(ref s) if s.code == 422 && s.message.contains(cel)),
                "{name}: {err}"
            );
        }
    } else {
        for (name, spec, _, _) in &cases {
            cluster.apply_policy(name, spec.clone()).await;
        }
        for (name, _, wanted, _) in &cases {
            let (status, reason, message) = eventually(
                Duration::from_secs(20),
                &format!("{name} refused"),
                || async { condition(&cluster, name, "Ready").await },
            )
            .await;
            assert_eq!(
                (status.as_str(), reason.as_str()),
                ("False", "InvalidSpec"),
                "{name}"
            );
            assert!(message.contains(wanted), "{name}: {message}");
        }
    }
    // None of them touched the pod or its sessions.
    let pod = cluster.pods().get("operator-pod").await.expect("pod");
    assert!(
        pod.metadata
            .annotations
            .unwrap_or_default()
            .keys()
            .all(|k| k != "controller.kubernetes.io/pod-deletion-cost"),
        "the operator's own pod was annotated"
    );
    assert_eq!(stores.counts().await.get("operator-pod"), Some(&5));
    assert!(
        operator.mutations().is_empty(),
        "{:?}",
        operator.mutations()
    );
    operator.terminate().await;
}
