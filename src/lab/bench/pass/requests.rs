//! Requests per rollout: the API requests the operator makes during a rolling update of N
//! worker pods, counted from the emulator's request log (the benchmark's own requests carry
//! their own `User-Agent` and are left out; the emulator's controllers are in-process and make
//! none). If the operator did per-pod work for every pod on each event, the count per pod would
//! grow with N; it should stay flat.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, PostParams};
use kube_emulator::{Controllers, Emulator, RequestRecord};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::super::BenchStores;
use super::super::harness::{self, BENCH_USER_AGENT, Operator};
use super::{NS, Point, seed};
use crate::lab::shared::{
    WORKERS, pod_reader, prepare, ready_workers, restart, rollout_complete, session_policy,
    workers_deployment,
};
use crate::policy::SessionPolicy;

/// Sessions per worker pod.
const SESSIONS_PER_POD: usize = 100;

/// What the operator asked of the API server during one rollout.
struct Counted {
    pods: usize,
    /// From the restart to the operator's last request about it.
    took: Duration,
    /// Requests by `verb resource[/subresource]`, Lease requests apart.
    by_kind: BTreeMap<String, usize>,
    /// Lease renewals: they follow the clock, not the rollout.
    leases: usize,
}

impl Counted {
    fn total(&self) -> usize {
        self.by_kind.values().sum()
    }

    fn per_pod(&self) -> f64 {
        self.total() as f64 / self.pods as f64
    }
}

pub(super) async fn run(stores: &BenchStores, sizes: &[usize]) -> anyhow::Result<()> {
    println!(
        "requests per rollout: the operator's API requests during a rolling update of N worker pods \
         (maxSurge 25 %, {SESSIONS_PER_POD} sessions per pod, podDeletionCost on; Lease renewals apart)"
    );
    let mut rows = Vec::new();
    for &pods in sizes {
        let tag = format!("bench_requests_{}_{pods}", std::process::id());
        let result = rollout(stores, pods, &tag).await;
        harness::cleanup(stores, &tag).await;
        let counted = result?;
        let mut kinds: Vec<(&String, &usize)> = counted.by_kind.iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(a.1));
        let kinds: Vec<String> = kinds
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        println!(
            "  N = {pods}: {} requests, {:.2} per pod, in {:.1} s (+ {} Lease requests): {}",
            counted.total(),
            counted.per_pod(),
            counted.took.as_secs_f64(),
            counted.leases,
            kinds.join(", ")
        );
        rows.push(counted);
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last())
        && last.pods > first.pods
    {
        println!(
            "  requests per pod from N = {} to N = {}: × {:.2} (growth with N keeps it near × 1; with N² it would be × {:.0})",
            first.pods,
            last.pods,
            last.per_pod() / first.per_pod().max(f64::MIN_POSITIVE),
            last.pods as f64 / first.pods as f64
        );
    }
    Ok(())
}

/// A rolling update of `pods` worker pods with the operator watching; its requests meanwhile.
async fn rollout(stores: &BenchStores, pods: usize, tag: &str) -> anyhow::Result<Counted> {
    let store = harness::layered_store(stores, tag).await?;
    let emulator = Emulator::builder()
        .controllers(Controllers::all())
        .nodes(10)
        .pod_ready_delay(Duration::from_millis(100))
        .request_log_limit(1_000_000)
        .start()
        .await?;
    prepare(&emulator, NS)?;
    let stop = CancellationToken::new();
    let result = async {
        let client = harness::bench_client(&emulator)?;
        let reader = pod_reader(&client, NS, stop.clone());
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
        let replicas = u32::try_from(pods).context("--rollouts: too many pods")?;
        deployments
            .create(
                &PostParams::default(),
                &workers_deployment(NS, replicas, 2)?,
            )
            .await?;
        let deadline = Instant::now() + Duration::from_secs(300);
        while ready_workers(&reader).len() < pods {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the workers did not become Ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let sessions = pods * SESSIONS_PER_POD;
        seed(&stores.database_url, tag, &ready_workers(&reader), sessions).await?;
        let policy = session_policy(NS, json!({"replacementWait": "2m"}), true)?;
        Api::<SessionPolicy>::namespaced(client.clone(), NS)
            .create(&PostParams::default(), &policy)
            .await
            .context("creating the SessionPolicy")?;
        let operator = Operator::start(stores, &emulator, tag, NS, None)?;
        let counted = async {
            Point {
                workers: pods,
                sessions,
            }
            .settle(&operator)
            .await?;
            emulator.control().clear_requests();
            let started = Instant::now();
            restart(&deployments, WORKERS).await?;
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the rollout did not finish in 10 minutes"
                );
                if !rollout_complete(&deployments.get(WORKERS).await?) {
                    continue;
                }
                let ready = ready_workers(&reader);
                let holders = store.workers_with_sessions().await?;
                if holders.iter().all(|w| ready.binary_search(w).is_ok()) {
                    break;
                }
            }
            let (records, last) = quiet_requests(&emulator).await;
            let mut counted = count(&records);
            counted.pods = pods;
            counted.took = last.map_or_else(|| started.elapsed(), |at| at - started);
            anyhow::Ok(counted)
        }
        .await;
        operator.stop().await;
        counted
    }
    .await;
    stop.cancel();
    emulator.shutdown().await;
    result
}

/// Waits until the operator made no request but Lease renewals for 3 s (its status writes
/// and Events trail the last migration), and returns its requests and when the last came.
async fn quiet_requests(emulator: &Emulator) -> (Vec<RequestRecord>, Option<Instant>) {
    let mut seen = 0;
    let mut last = None;
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let records: Vec<RequestRecord> = emulator
            .control()
            .requests()
            .into_iter()
            .filter(from_operator)
            .collect();
        let now = records.iter().filter(|r| r.resource != "leases").count();
        if now != seen {
            seen = now;
            last = Some(Instant::now());
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_secs(3) {
            return (records, last);
        }
    }
}

fn from_operator(record: &RequestRecord) -> bool {
    record.user_agent.as_deref() != Some(BENCH_USER_AGENT)
}

/// The operator's requests by kind, Lease requests apart.
fn count(records: &[RequestRecord]) -> Counted {
    let mut by_kind = BTreeMap::new();
    let mut leases = 0;
    for r in records.iter().filter(|r| from_operator(r)) {
        if r.resource == "leases" {
            leases += 1;
            continue;
        }
        let what = if r.is_resource_request() {
            match &r.subresource {
                Some(sub) => format!("{} {}/{sub}", r.verb, r.resource),
                None => format!("{} {}", r.verb, r.resource),
            }
        } else {
            format!(
                "{} {}",
                r.verb,
                r.non_resource_url.as_deref().unwrap_or_default()
            )
        };
        *by_kind.entry(what).or_insert(0) += 1;
    }
    Counted {
        pods: 0,
        took: Duration::ZERO,
        by_kind,
        leases,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(verb: &str, resource: &str, sub: Option<&str>, agent: Option<&str>) -> RequestRecord {
        RequestRecord {
            time: String::new(),
            verb: verb.into(),
            api_group: String::new(),
            api_version: "v1".into(),
            resource: resource.into(),
            subresource: sub.map(Into::into),
            namespace: Some(NS.into()),
            name: None,
            non_resource_url: None,
            user_agent: agent.map(Into::into),
            code: 200,
        }
    }

    #[test]
    fn counts_the_operators_requests_by_kind_with_leases_apart() {
        let records = vec![
            record("patch", "pods", None, None),
            record("patch", "pods", None, None),
            record("patch", "sessionpolicies", Some("status"), None),
            record("create", "events", None, None),
            record("update", "leases", None, None),
            // The benchmark's own requests are not the operator's.
            record("get", "deployments", None, Some(BENCH_USER_AGENT)),
            record("patch", "pods", None, Some(BENCH_USER_AGENT)),
        ];
        let counted = count(&records);
        assert_eq!(counted.leases, 1);
        assert_eq!(counted.total(), 4);
        assert_eq!(counted.by_kind["patch pods"], 2);
        assert_eq!(counted.by_kind["patch sessionpolicies/status"], 1);
        assert_eq!(counted.by_kind["create events"], 1);
        assert!(!counted.by_kind.contains_key("get deployments"));
    }
}
