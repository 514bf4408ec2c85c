//! Concurrent writers racing on one object.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::{backends, on_each};

#[tokio::test]
async fn exactly_one_of_each_conflicting_pair_wins() {
    on_each(backends("race-pair").await, async |b| {
        let client = b.client.clone();
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &b.ns);
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": "race"}, "data": {"n": "0"}}))
                .expect("cm");
        cms.create(&PostParams::default(), &cm)
            .await
            .expect("create");
        for round in 0..40 {
            let base = cms.get("race").await.expect("get");
            let writers: Vec<_> = (0..2)
                .map(|w| {
                    let cms = cms.clone();
                    let mut next = base.clone();
                    next.data = Some([("n".to_string(), format!("{round}-{w}"))].into());
                    tokio::spawn(
                        async move { cms.replace("race", &PostParams::default(), &next).await },
                    )
                })
                .collect();
            let mut wins = 0;
            for writer in writers {
                match writer.await.expect("join") {
                    Ok(_) => wins += 1,
                    Err(kube::Error::Api(s)) => {
                        assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
                    }
                    Err(other) => panic!("unexpected error {other:?}"),
                }
            }
            assert_eq!(wins, 1, "round {round}");
        }
    })
    .await;
}

#[tokio::test]
async fn retrying_writers_never_lose_updates() {
    on_each(backends("race-retry").await, async |b| {
        let client = b.client.clone();
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &b.ns);
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": "counter"}, "data": {"n": "0"}}))
                .expect("cm");
        cms.create(&PostParams::default(), &cm)
            .await
            .expect("create");
        let (writers, increments) = (8, 10);
        let tasks: Vec<_> = (0..writers)
            .map(|_| {
                let cms = cms.clone();
                tokio::spawn(async move {
                    let mut conflicts = 0;
                    for _ in 0..increments {
                        loop {
                            let mut current = cms.get("counter").await.expect("get");
                            let data = current.data.get_or_insert_with(Default::default);
                            let n: u64 =
                                data.get("n").and_then(|v| v.parse().ok()).expect("number");
                            data.insert("n".into(), (n + 1).to_string());
                            match cms
                                .replace("counter", &PostParams::default(), &current)
                                .await
                            {
                                Ok(_) => break,
                                Err(kube::Error::Api(s)) if s.code == 409 => conflicts += 1,
                                Err(other) => panic!("unexpected error {other:?}"),
                            }
                        }
                    }
                    conflicts
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("join");
        }
        let n = cms.get("counter").await.expect("get").data.expect("data")["n"].clone();
        assert_eq!(n, (writers * increments).to_string());
    })
    .await;
}
