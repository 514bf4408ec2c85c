//! Leader election with kube-lease-manager against each backend.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube_lease_manager::LeaseManagerBuilder;

use crate::{backends, eventually, on_each};

#[tokio::test]
async fn one_leader_and_takeover_after_it_stops_renewing() {
    on_each(backends("lease").await, async |b| {
        let client = b.client.clone();
        let contender = |identity: &'static str| {
            LeaseManagerBuilder::new(client.clone(), "leader")
                .with_namespace(&b.ns)
                .with_identity(identity)
                .with_duration(6)
                .with_grace(2)
                .build()
        };
        let (rx_a, task_a) = contender("a").await.expect("manager a").watch().await;
        let (rx_b, task_b) = contender("b").await.expect("manager b").watch().await;
        let leases: Api<Lease> = Api::namespaced(client.clone(), &b.ns);
        let holder = || async {
            leases
                .get_opt("leader")
                .await
                .expect("get lease")
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity)
        };
        eventually("someone leads", || async {
            *rx_a.borrow() || *rx_b.borrow()
        })
        .await;
        // Over several renewal periods, exactly one contender leads and the lease agrees.
        for _ in 0..20 {
            let (a, b) = (*rx_a.borrow(), *rx_b.borrow());
            assert!(a ^ b, "exactly one leader (a={a}, b={b})");
            let expected = if a { "a" } else { "b" };
            let current = holder().await;
            // A manager reports leadership only after writing itself into the lease, and
            // nobody releases it here, so the lease always names the leader.
            assert_eq!(
                current.as_deref(),
                Some(expected),
                "lease holder while {expected} leads"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let a_leads = *rx_a.borrow();
        let (leader_task, follower_rx, follower) = if a_leads {
            (task_a, rx_b, "b")
        } else {
            (task_b, rx_a, "a")
        };
        let transitions_before = leases
            .get("leader")
            .await
            .expect("lease")
            .spec
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0);
        // The leader crashes: it neither renews nor releases.
        leader_task.abort();
        eventually("follower takes over", || async { *follower_rx.borrow() }).await;
        eventually("lease names the new holder", || async {
            holder().await.as_deref() == Some(follower)
        })
        .await;
        let transitions_after = leases
            .get("leader")
            .await
            .expect("lease")
            .spec
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0);
        assert!(
            transitions_after > transitions_before,
            "{transitions_before} -> {transitions_after}"
        );
    })
    .await;
}
