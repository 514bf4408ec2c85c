//! Benchmark: list latency at 10k pods and watch fan-out to 100 watchers.
//!
//! Run `cargo bench -p kube-emulator --bench emulator`; set `BENCH_SMOKE=1` (or pass
//! `--smoke`) for a quick small-size run that only checks the benchmark works.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube_emulator::Emulator;
use serde_json::json;

struct Sizes {
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
            pods: 200,
            list_rounds: 3,
            watchers: 10,
            events: 50,
        }
    } else {
        Sizes {
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
    Ok(())
}
