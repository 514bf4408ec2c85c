//! `bench operator`: migration latency of a rolling update of a large worker pool, with the real
//! operator binary against the emulator and a layered store (Redis over Postgres), and the
//! operator's peak memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, PostParams};
use kube_emulator::{Controllers, Emulator};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::harness::{self, Operator};
use super::percentile_ms;
use crate::lab::shared::{
    LOOK_EVERY, Tracker, WORKERS, pod_reader, prepare, ready_workers, restart, rollout_complete,
    session_policy, workers_deployment,
};
use crate::policy::SessionPolicy;
use crate::store::{Entry, Store};

#[derive(Debug, Args)]
pub(crate) struct OperatorBench {
    #[command(flatten)]
    stores: super::BenchStores,
    /// Worker pods in the Deployment.
    #[arg(long, default_value_t = 200)]
    workers: usize,
    /// Sessions spread over the workers (a tenth also written through the cache).
    #[arg(long, default_value_t = 200_000)]
    sessions: usize,
    /// Spread the new pods' readiness over up to this long (each pod gets its own share), as
    /// real readiness probes do. `0s` (the default) is the worst case: every surge pod turns
    /// Ready at once, so a whole wave of old pods departs together.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    ready_jitter: Duration,
    /// Small sizes for a quick check (used by scripts/test.sh).
    #[arg(long)]
    smoke: bool,
    /// Write the operator's log (JSON; info, the controller at debug) to this file, to see where a migration's
    /// time goes; by default it logs warnings only, to its stderr.
    #[arg(long)]
    operator_log: Option<std::path::PathBuf>,
}

const NS: &str = "bench";

pub(crate) async fn run(mut args: OperatorBench) -> anyhow::Result<()> {
    if args.smoke {
        args.workers = 10;
        args.sessions = 2_000;
    }
    let tag = format!("bench_operator_{}", std::process::id());
    let result = async {
        let store = harness::layered_store(&args.stores, &tag).await?;
        measure(&args, &tag, store).await
    }
    .await;
    harness::cleanup(&args.stores, &tag).await;
    result
}

async fn measure(args: &OperatorBench, schema: &str, store: Arc<dyn Store>) -> anyhow::Result<()> {
    let emulator = Emulator::builder()
        .controllers(Controllers::all())
        .nodes(10)
        .pod_ready_delay(Duration::from_millis(100))
        .pod_ready_jitter(args.ready_jitter)
        .start()
        .await?;
    prepare(&emulator, NS)?;
    let client = emulator.client()?;
    let stop = CancellationToken::new();
    let pods = pod_reader(&client, NS, stop.clone());

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let replicas = u32::try_from(args.workers).context("--workers is too large")?;
    deployments
        .create(
            &PostParams::default(),
            &workers_deployment(NS, replicas, 5)?,
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while ready_workers(&pods).len() < args.workers {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the workers did not become Ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let workers = ready_workers(&pods);
    let seeded = Instant::now();
    seed(args, schema, &workers, store.as_ref()).await?;
    println!(
        "operator bench: {} workers, {} sessions (seeded in {:.1} s), layered store, pods Ready {}",
        workers.len(),
        args.sessions,
        seeded.elapsed().as_secs_f64(),
        if args.ready_jitter.is_zero() {
            "100 ms after start, all at once".to_string()
        } else {
            format!(
                "100 ms + up to {} after start",
                humantime::format_duration(args.ready_jitter)
            )
        }
    );

    let policy = session_policy(NS, json!({"replacementWait": "2m"}), false)?;
    Api::<SessionPolicy>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &policy)
        .await
        .context("creating the SessionPolicy")?;
    let operator = Operator::start(
        &args.stores,
        &emulator,
        schema,
        NS,
        args.operator_log.as_deref(),
    )?;
    // Let it elect itself and settle its first pass.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let tracker = Tracker::start(store.clone(), pods.clone(), Duration::from_secs(120));
    tracker.phase("rolling update");
    let started = Instant::now();
    restart(&deployments, WORKERS).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let done = rollout_complete(&deployments.get(WORKERS).await?);
        // Counting what departed workers hold loads the store being measured: only at the end.
        if done && tracker.pending() == 0 && tracker.sessions_on_departed().await? == 0 {
            // The last pods may have departed and been migrated since the tracker's last look:
            // let it look again so that their departures are timed too.
            tokio::time::sleep(LOOK_EVERY * 3).await;
            if tracker.pending() == 0 {
                break;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the rollout did not finish in 10 minutes"
        );
    }
    let rollout = started.elapsed();
    let rss = operator.peak_rss_kib();
    let cpu = operator.cpu_seconds();
    operator.stop().await;
    let workers = ready_workers(&pods);
    stop.cancel();
    emulator.shutdown().await;

    let mut latencies = tracker
        .latencies()
        .remove("rolling update")
        .unwrap_or_default();
    latencies.sort();
    let total: u64 = store.counts_by_worker().await?.values().sum();
    println!(
        "rolling update of {} workers: {:.1} s; {} of {} departures measured",
        args.workers,
        rollout.as_secs_f64(),
        latencies.len(),
        args.workers
    );
    let p99 = percentile_ms(&latencies, 0.99);
    println!(
        "migration latency (departure seen → sessions moved, looked at every {} ms): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target p99 ≤ 500 ms)",
        LOOK_EVERY.as_millis(),
        percentile_ms(&latencies, 0.5),
        p99,
        percentile_ms(&latencies, 1.0)
    );
    match rss {
        Some(kib) => println!(
            "operator peak RSS: {:.1} MiB (target ≤ 64 MiB)",
            kib as f64 / 1024.0
        ),
        None => println!("operator peak RSS: unavailable (no /proc)"),
    }
    if let Some(cpu) = cpu {
        println!(
            "operator CPU time: {cpu:.2} s from its start to the rollout's end ({:.0} % of one core during the rollout)",
            100.0 * cpu / rollout.as_secs_f64().max(0.001)
        );
    }
    anyhow::ensure!(
        total == args.sessions as u64,
        "sessions lost: {total} of {} left",
        args.sessions
    );
    println!("sessions lost: 0 ({total} of {})", args.sessions);

    // The floor: what Postgres alone needs to move one wave (maxSurge 25 % of the pods depart
    // together) with the operator's concurrency, on a machine no longer busy with the rollout.
    let wave = args.workers.div_ceil(4).min(workers.len());
    let concurrency = crate::controller::Settings::default().migration_concurrency;
    let floor = postgres_floor(
        &args.stores.database_url,
        schema,
        &workers[..wave],
        concurrency,
    )
    .await?;
    let floor_ms = floor.as_secs_f64() * 1000.0;
    println!(
        "floor: Postgres alone moves one wave ({wave} workers, {} sessions, {concurrency} at a time) in {floor_ms:.0} ms; migration p99 = {:.2} × floor",
        wave * args.sessions / args.workers.max(1),
        p99 / floor_ms.max(1.0)
    );
    Ok(())
}

/// Times plain `UPDATE`s moving every session of `workers` (one statement per worker,
/// `concurrency` at a time): the least store work a wave's migrations can cost.
async fn postgres_floor(
    url: &str,
    schema: &str,
    workers: &[String],
    concurrency: usize,
) -> anyhow::Result<Duration> {
    use futures::{StreamExt, TryStreamExt};
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(concurrency as u32)
        .connect(url)
        .await?;
    // Open every connection before the clock starts.
    futures::stream::iter(0..concurrency)
        .map(|_| sqlx::query("SELECT pg_sleep(0.05)").execute(&pool))
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let sql =
        format!("UPDATE \"{schema}\".blockyard_sessions SET worker_id = $2 WHERE worker_id = $1");
    let started = Instant::now();
    futures::stream::iter(workers)
        .map(|w| {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(w)
                .bind(format!("{w}-floor"))
                .execute(&pool)
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(started.elapsed())
}

/// Most sessions go straight into Postgres (fast); a tenth through the layered store, so the
/// cache holds entries the reroutes must update.
async fn seed(
    args: &OperatorBench,
    schema: &str,
    workers: &[String],
    store: &dyn Store,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let cached = args.sessions / 10;
    let pool = sqlx::PgPool::connect(&args.stores.database_url).await?;
    let sql = format!(
        "INSERT INTO \"{schema}\".blockyard_sessions (id, worker_id, user_sub, last_access, expires_at)
         SELECT 'bench-' || g, ($1::text[])[1 + g % $2], '', now(), 'infinity'::timestamptz
         FROM generate_series($3::bigint, $4::bigint - 1) g"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(workers)
        .bind(workers.len() as i64)
        .bind(cached as i64)
        .bind(args.sessions as i64)
        .execute(&pool)
        .await
        .context("seeding sessions")?;
    let results: Vec<_> = futures::stream::iter(0..cached)
        .map(|g| {
            let worker = workers[g % workers.len()].clone();
            async move {
                store
                    .set(&format!("bench-{g}"), &Entry::new(worker, ""))
                    .await
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}
