//! Benchmark: list latency at 10k pods, watch fan-out to 100 watchers, and a rolling
//! update of a 200-replica Deployment run by the simulated controllers.
//!
//! Run `cargo bench -p kube-emulator --bench emulator`; set `BENCH_SMOKE=1` (or pass
//! `--smoke`) for a quick small-size run that only checks the benchmark works.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube_emulator::{Controllers, Emulator};
use serde_json::json;

struct Sizes {
    rollout_replicas: i32,
    pods: usize,
    list_rounds: usize,
    watchers: usize,
    events: usize,
}

fn sizes() -> (Sizes, bool) {
    let smoke = std::env::var("BENCH_SMOKE").is_ok_and(|v| !v.is_empty() && v != "0")
        || std::env::args().any(|a| a == "--smoke");
    let s = if smoke {
        Sizes {
            rollout_replicas: 20,
            pods: 200,
            list_rounds: 3,
            watchers: 10,
            events: 50,
        }
    } else {
        Sizes {
            rollout_replicas: 200,
            pods: 10_000,
            list_rounds: 20,
            watchers: 100,
            events: 2_000,
        }
    };
    (s, smoke)
}

fn pod(i: usize) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": format!("pod-{i:05}"), "labels": {"app": "bench", "shard": (i % 100).to_string()}},
        "spec": {"containers": [{"name": "main", "image": "busybox:1.36", "env": [{"name": "INDEX", "value": i.to_string()}]}]}
    }))
    .expect("pod")
}

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p50 = samples[samples.len() / 2];
    let p95 = samples[(samples.len() * 95 / 100).min(samples.len() - 1)];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    format!(
        "p50 {:.1} ms, p95 {:.1} ms, mean {:.1} ms",
        ms(p50),
        ms(p95),
        ms(mean)
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (sizes, smoke) = sizes();
    println!(
        "kube-emulator benchmark ({} mode)",
        if smoke { "smoke" } else { "full" }
    );
    let emulator = Emulator::builder()
        .history_limit(sizes.events * 2 + sizes.pods)
        .start()
        .await?;
    let client = emulator.client()?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    let started = Instant::now();
    futures::stream::iter(0..sizes.pods)
        .map(|i| {
            let pods = pods.clone();
            async move { pods.create(&PostParams::default(), &pod(i)).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    let elapsed = started.elapsed();
    println!(
        "create: {} pods in {:.2} s ({:.0} creates/s, 16 concurrent clients)",
        sizes.pods,
        elapsed.as_secs_f64(),
        sizes.pods as f64 / elapsed.as_secs_f64()
    );

    let mut full = Vec::new();
    let mut selected = Vec::new();
    let mut paged = Vec::new();
    for _ in 0..sizes.list_rounds {
        let t = Instant::now();
        let list = pods.list(&ListParams::default()).await?;
        full.push(t.elapsed());
        assert_eq!(list.items.len(), sizes.pods);

        let t = Instant::now();
        let list = pods.list(&ListParams::default().labels("shard=7")).await?;
        selected.push(t.elapsed());
        assert_eq!(list.items.len(), sizes.pods.div_ceil(100).min(sizes.pods));

        let t = Instant::now();
        let mut params = ListParams::default().limit(500);
        let mut seen = 0;
        loop {
            let page = pods.list(&params).await?;
            seen += page.items.len();
            match page.metadata.continue_ {
                Some(c) if !c.is_empty() => params = params.continue_token(&c),
                _ => break,
            }
        }
        paged.push(t.elapsed());
        assert_eq!(seen, sizes.pods);
    }
    println!(
        "list {} pods (typed kube-rs client, full decode): {}",
        sizes.pods,
        summary(full)
    );
    println!(
        "list with labelSelector (1% match):         {}",
        summary(selected)
    );
    println!(
        "list paginated, limit=500:                   {}",
        summary(paged)
    );

    // Watch fan-out: raw line counting so client-side decoding does not dominate.
    let rv = pods
        .list_metadata(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let delivered = Arc::new(AtomicU64::new(0));
    let mut watchers = Vec::new();
    for _ in 0..sizes.watchers {
        let request = http::Request::get(format!(
            "/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}"
        ))
        .body(Vec::new())?;
        let stream = client.request_stream(request).await?;
        let delivered = delivered.clone();
        watchers.push(tokio::spawn(async move {
            let mut lines = stream.lines();
            while let Some(Ok(line)) = lines.next().await {
                if line.contains("\"type\":\"MODIFIED\"") {
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let expected = (sizes.events * sizes.watchers) as u64;
    let started = Instant::now();
    futures::stream::iter(0..sizes.events)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let patch = Patch::Merge(
                    json!({"metadata": {"annotations": {"bench/round": i.to_string()}}}),
                );
                pods.patch(
                    &format!("pod-{:05}", i % sizes.pods),
                    &PatchParams::default(),
                    &patch,
                )
                .await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    let write_time = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = started.elapsed();
    let got = delivered.load(Ordering::Relaxed);
    println!(
        "watch fan-out: {} events x {} watchers = {got}/{expected} deliveries in {:.2} s ({:.0} events/s delivered; writes took {:.2} s)",
        sizes.events,
        sizes.watchers,
        total.as_secs_f64(),
        got as f64 / total.as_secs_f64(),
        write_time.as_secs_f64()
    );
    for w in watchers {
        w.abort();
    }
    emulator.shutdown().await;
    anyhow::ensure!(got == expected, "watchers missed events");
    rolling_update(sizes.rollout_replicas).await
}

/// Whether a deployment is rolled out, by `kubectl rollout status`'s rules.
fn rolled_out(d: &Deployment) -> bool {
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = d.status.clone().unwrap_or_default();
    d.metadata.generation.unwrap_or(0) <= status.observed_generation.unwrap_or(0)
        && status.updated_replicas.unwrap_or(0) == replicas
        && status.replicas.unwrap_or(0) == replicas
        && status.available_replicas.unwrap_or(0) == replicas
}

/// Waits (via a watch) until the deployment is rolled out; returns the elapsed time.
async fn until_rolled_out(
    deploys: &Api<Deployment>,
    name: &str,
    since: Instant,
) -> anyhow::Result<Duration> {
    let params = WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(600);
    let mut stream = deploys.watch(&params, "0").await?.boxed();
    while let Some(event) = stream.try_next().await? {
        if let WatchEvent::Added(d) | WatchEvent::Modified(d) = event
            && rolled_out(&d)
        {
            return Ok(since.elapsed());
        }
    }
    anyhow::bail!("watch ended before {name} rolled out")
}

/// A Deployment rolled by the simulated controllers (kubelet delay 0, maxSurge 25%):
/// time until `rollout status` would succeed, and committed changes per second (every
/// commit is one watch event).
async fn rolling_update(replicas: i32) -> anyhow::Result<()> {
    let emulator = Emulator::builder()
        .controllers(Controllers::all())
        .nodes(10)
        .pod_ready_delay(Duration::ZERO)
        .start()
        .await?;
    let client = emulator.client()?;
    let deploys: Api<Deployment> = Api::namespaced(client, "default");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "bench"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "bench"}},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
            "template": {
                "metadata": {"labels": {"app": "bench"}},
                "spec": {"terminationGracePeriodSeconds": 1,
                         "containers": [{"name": "main", "image": "busybox:1.36"}]}
            }
        }
    }))?;
    let store = emulator.control().store();
    let rv0 = store.resource_version();
    let started = Instant::now();
    deploys.create(&PostParams::default(), &deployment).await?;
    let initial = until_rolled_out(&deploys, "bench", started).await?;
    let rv1 = store.resource_version();
    println!(
        "deployment scale-up to {replicas} ready pods: {:.2} s ({} changes, {:.0} changes/s)",
        initial.as_secs_f64(),
        rv1 - rv0,
        (rv1 - rv0) as f64 / initial.as_secs_f64()
    );
    let started = Instant::now();
    let restart = json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": "2024-01-01T00:00:00Z"}}}}});
    deploys
        .patch("bench", &PatchParams::default(), &Patch::Strategic(restart))
        .await?;
    let rollout = until_rolled_out(&deploys, "bench", started).await?;
    let rv2 = store.resource_version();
    println!(
        "rolling update of {replicas} replicas (maxSurge 25%, kubelet delay 0): rolled out in {:.2} s ({} changes, {:.0} changes/s = watch events/s)",
        rollout.as_secs_f64(),
        rv2 - rv1,
        (rv2 - rv1) as f64 / rollout.as_secs_f64()
    );
    emulator.shutdown().await;
    Ok(())
}
