//! `bench pass`: what the operator's level-triggered pass costs at scale, and what a rolling
//! update costs in API requests.
//!
//! 1. **Pass cost** — for each number of workers W and of sessions S: W Ready worker pods (a
//!    Deployment on the emulator), S sessions seeded straight into Postgres, and the real
//!    operator binary (Redis over Postgres, as in production with both). Once it settled, the
//!    SessionPolicy's annotation is touched, one pass at a time, and each pass's cost is read
//!    from the operator's own histograms (`session_operator_pass_*`): as the difference of
//!    their `_sum` between consecutive passes, so every pass is one exact sample rather than a
//!    bucket. Nothing changes between the passes: each is the level-triggered pass a resync or
//!    an unrelated event causes. Then the operator's peak RSS with the W pods watched.
//! 2. **Requests per rollout** (see [`requests`]) — the API requests the operator makes during
//!    a rolling update of N pods, for a few N.

mod requests;
mod scrape;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_emulator::{Controllers, Emulator};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::BenchStores;
use super::harness::{self, Operator};
use crate::lab::shared::{
    WORKERS, percentile, pod_reader, prepare, ready_workers, session_policy, workers_deployment,
};
use crate::policy::SessionPolicy;
use scrape::Totals;

#[derive(Debug, Args)]
pub(crate) struct PassBench {
    #[command(flatten)]
    stores: BenchStores,
    /// Worker pod counts W; each is measured with each session count.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    workers: Vec<usize>,
    /// Session counts S.
    #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
    sessions: Vec<usize>,
    /// Passes measured at each size.
    #[arg(long, default_value_t = 100)]
    passes: usize,
    /// Sizes N of the rolling updates whose API requests are counted.
    #[arg(long, value_delimiter = ',', default_value = "20,40,80")]
    rollouts: Vec<usize>,
    /// Parts to run (default: both).
    #[arg(long, value_enum, value_delimiter = ',')]
    parts: Vec<Part>,
    /// Small sizes for a quick check that every part runs (used by scripts/test.sh).
    #[arg(long)]
    smoke: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Store and CPU time per pass, and peak RSS, at each W × S.
    Pass,
    /// API requests per rolling update of N pods.
    Requests,
}

const NS: &str = "bench";
/// The targets.
const STORE_TARGET_MS: f64 = 100.0;
const CPU_TARGET_MS: f64 = 20.0;
const RSS_TARGET_MIB: f64 = 128.0;

pub(crate) async fn run(mut args: PassBench) -> anyhow::Result<()> {
    if args.smoke {
        args.workers = vec![20];
        args.sessions = vec![2_000];
        args.passes = 5;
        args.rollouts = vec![4, 8];
    }
    anyhow::ensure!(args.passes > 0, "--passes must be at least 1");
    let parts = if args.parts.is_empty() {
        vec![Part::Pass, Part::Requests]
    } else {
        args.parts.clone()
    };
    if parts.contains(&Part::Pass) {
        for &workers in &args.workers {
            pass_costs(&args, workers).await?;
        }
    }
    if parts.contains(&Part::Requests) {
        requests::run(&args.stores, &args.rollouts).await?;
    }
    Ok(())
}

/// W Ready worker pods on an emulator, measured with each session count in turn.
async fn pass_costs(args: &PassBench, workers: usize) -> anyhow::Result<()> {
    let emulator = Emulator::builder()
        .controllers(Controllers::all())
        .nodes(10)
        .pod_ready_delay(Duration::from_millis(100))
        .start()
        .await?;
    prepare(&emulator, NS)?;
    let stop = CancellationToken::new();
    let result = async {
        let client = harness::bench_client(&emulator)?;
        let started = Instant::now();
        let pods = start_workers(&client, workers, stop.clone()).await?;
        println!(
            "pass bench: {workers} worker pods Ready in {:.1} s (a Deployment on the emulator)",
            started.elapsed().as_secs_f64()
        );
        for &sessions in &args.sessions {
            let point = Point { workers, sessions };
            let tag = format!("bench_pass_{}_{workers}_{sessions}", std::process::id());
            let result = point.measure(args, &emulator, &client, &pods, &tag).await;
            harness::cleanup(&args.stores, &tag).await;
            result?;
        }
        anyhow::Ok(())
    }
    .await;
    stop.cancel();
    emulator.shutdown().await;
    result
}

/// Creates the workers' Deployment and waits until all its pods are Ready.
async fn start_workers(
    client: &kube::Client,
    workers: usize,
    stop: CancellationToken,
) -> anyhow::Result<kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Pod>> {
    let pods = pod_reader(client, NS, stop);
    let replicas = u32::try_from(workers).context("--workers is too large")?;
    Api::<Deployment>::namespaced(client.clone(), NS)
        .create(
            &PostParams::default(),
            &workers_deployment(NS, replicas, 5)?,
        )
        .await
        .context("creating the workers' Deployment")?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while ready_workers(&pods).len() < workers {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {workers} workers Ready after 10 minutes",
            ready_workers(&pods).len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(pods)
}

/// One size of the pass benchmark.
#[derive(Debug, Clone, Copy)]
struct Point {
    workers: usize,
    sessions: usize,
}

/// The cost of one pass, in seconds.
#[derive(Debug, Clone, Copy)]
struct Sample {
    duration: f64,
    store: f64,
    cpu: f64,
}

const PASS_DURATION: &str = "session_operator_pass_duration_seconds";
const PASS_STORE: &str = "session_operator_pass_store_seconds";
const PASS_CPU: &str = "session_operator_pass_cpu_seconds";
const STORE_LATENCY: &str = "session_operator_store_latency_seconds";

impl Point {
    async fn measure(
        self,
        args: &PassBench,
        emulator: &Emulator,
        client: &kube::Client,
        pods: &kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Pod>,
        tag: &str,
    ) -> anyhow::Result<()> {
        harness::layered_store(&args.stores, tag).await?;
        let names = ready_workers(pods);
        anyhow::ensure!(
            names.len() == self.workers,
            "{} workers Ready, {} expected",
            names.len(),
            self.workers
        );
        let seeded = seed(&args.stores.database_url, tag, &names, self.sessions).await?;
        println!(
            "  {} workers, {} sessions: seeded in {:.1} s (insert {:.1} s, indexes {:.1} s, vacuum {:.1} s)",
            self.workers,
            self.sessions,
            seeded.total().as_secs_f64(),
            seeded.insert.as_secs_f64(),
            seeded.indexes.as_secs_f64(),
            seeded.vacuum.as_secs_f64()
        );

        let policies = Api::<SessionPolicy>::namespaced(client.clone(), NS);
        let policy = session_policy(NS, json!({}), true)?;
        policies
            .create(&PostParams::default(), &policy)
            .await
            .context("creating the SessionPolicy")?;
        let operator = Operator::start(&args.stores, emulator, tag, NS, None)?;
        let result = self.passes(args.passes, &operator, &policies).await;
        let rss = operator.peak_rss_kib();
        operator.stop().await;
        policies
            .delete(WORKERS, &Default::default())
            .await
            .context("deleting the SessionPolicy")?;
        let (samples, skipped, counts) = result?;

        let pick = |f: fn(&Sample) -> f64| {
            let mut v: Vec<Duration> = samples
                .iter()
                .map(|s| Duration::from_secs_f64(f(s).max(0.0)))
                .collect();
            v.sort();
            (
                percentile(&v, 0.5).as_secs_f64() * 1e3,
                percentile(&v, 0.99).as_secs_f64() * 1e3,
            )
        };
        let (store50, store99) = pick(|s| s.store);
        let (cpu50, cpu99) = pick(|s| s.cpu);
        let (wall50, wall99) = pick(|s| s.duration);
        println!(
            "    passes measured: {} ({skipped} skipped: two passes ran between two looks)",
            samples.len()
        );
        println!(
            "    store time per pass: p50 {store50:.1} ms, p99 {store99:.1} ms (target p99 ≤ {STORE_TARGET_MS:.0} ms){}",
            verdict(store99 <= STORE_TARGET_MS)
        );
        println!(
            "    CPU time per pass:   p50 {cpu50:.1} ms, p99 {cpu99:.1} ms (target p99 ≤ {CPU_TARGET_MS:.0} ms){}",
            verdict(cpu99 <= CPU_TARGET_MS)
        );
        println!("    wall time per pass:  p50 {wall50:.1} ms, p99 {wall99:.1} ms");
        if counts.count > 0 {
            println!(
                "    full session counts (CountsByWorker: in the first pass, then in the background every 10 s, not in a pass): {}, {:.0} ms each on average",
                counts.count,
                counts.sum / counts.count as f64 * 1e3
            );
        }
        match rss {
            Some(kib) => {
                let mib = kib as f64 / 1024.0;
                println!(
                    "    operator peak RSS: {mib:.1} MiB with {} pods watched (target ≤ {RSS_TARGET_MIB:.0} MiB){}",
                    self.workers,
                    verdict(mib <= RSS_TARGET_MIB)
                );
            }
            None => println!("    operator peak RSS: unavailable (no /proc)"),
        }
        Ok(())
    }

    /// Waits until the operator settled on this size, then triggers `count` passes, one at a
    /// time, and reads each one's cost. Returns the samples, how many looks saw two passes
    /// (not attributable, skipped), and the full session counts the operator made (the first
    /// pass's, then the background refreshes).
    async fn passes(
        self,
        count: usize,
        operator: &Operator,
        policies: &Api<SessionPolicy>,
    ) -> anyhow::Result<(Vec<Sample>, usize, Totals)> {
        self.settle(operator).await?;
        let mut before = PassTotals::of(&operator.scrape().await?);
        let mut samples = Vec::with_capacity(count);
        let mut skipped = 0;
        for i in 0..count {
            let poke = json!({"metadata": {"annotations": {"bench.session-operator/poke": i.to_string()}}});
            policies
                .patch(WORKERS, &PatchParams::default(), &Patch::Merge(&poke))
                .await
                .context("touching the SessionPolicy")?;
            let deadline = Instant::now() + Duration::from_secs(120);
            let after = loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let now = PassTotals::of(&operator.scrape().await?);
                if now.duration.count > before.duration.count {
                    break now;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "no pass within 2 minutes of touching the SessionPolicy"
                );
            };
            if after.duration.count == before.duration.count + 1 {
                samples.push(after.since(before));
            } else {
                skipped += 1;
            }
            before = after;
        }
        let counts = Totals::of(
            &operator.scrape().await?,
            STORE_LATENCY,
            &[("op", "CountsByWorker")],
        );
        Ok((samples, skipped, counts))
    }

    /// Until the operator's status of the policy shows every worker Ready and every session
    /// counted, its deletion costs are written (the first passes patch every pod), and a pass
    /// ran since.
    async fn settle(self, operator: &Operator) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(900);
        let policy = [("policy_namespace", NS), ("policy", WORKERS)];
        let mut last_passes = 0;
        let mut quiet_since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            anyhow::ensure!(
                Instant::now() < deadline,
                "the operator did not settle in 15 minutes"
            );
            let Ok(text) = operator.scrape().await else {
                continue;
            };
            let ready = scrape::value(
                &text,
                "session_operator_policy_workers",
                &[policy[0], policy[1], ("state", "ready")],
            );
            let sessions = scrape::value(&text, "session_operator_policy_sessions", &policy);
            let passes = Totals::of(&text, PASS_DURATION, &[]).count;
            if passes != last_passes {
                last_passes = passes;
                quiet_since = Instant::now();
            }
            // Passes stopped following each other (pod events of the deletion-cost patches).
            let quiet = quiet_since.elapsed() >= Duration::from_secs(2);
            if ready == Some(self.workers as f64)
                && sessions == Some(self.sessions as f64)
                && passes > 0
                && quiet
            {
                return Ok(());
            }
        }
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "" } else { " — MISSED" }
}

/// The three pass histograms' totals.
#[derive(Debug, Clone, Copy)]
struct PassTotals {
    duration: Totals,
    store: Totals,
    cpu: Totals,
}

impl PassTotals {
    fn of(text: &str) -> Self {
        Self {
            duration: Totals::of(text, PASS_DURATION, &[]),
            store: Totals::of(text, PASS_STORE, &[]),
            cpu: Totals::of(text, PASS_CPU, &[]),
        }
    }

    /// The one pass observed between `earlier` and `self`.
    fn since(self, earlier: Self) -> Sample {
        Sample {
            duration: self.duration.since(earlier.duration).sum,
            store: self.store.since(earlier.store).sum,
            cpu: self.cpu.since(earlier.cpu).sum,
        }
    }
}

/// How long seeding took, by step.
struct Seeded {
    insert: Duration,
    indexes: Duration,
    vacuum: Duration,
}

impl Seeded {
    fn total(&self) -> Duration {
        self.insert + self.indexes + self.vacuum
    }
}

/// `sessions` rows spread evenly over `workers`, in one `INSERT … SELECT generate_series`
/// (joined with the worker ids: subscripting a text array is linear in its length, which made
/// 1M rows over 10k workers take 30 s).
/// The secondary indexes are dropped first and built again afterwards (a sort per index
/// instead of millions of random B-tree inserts); ids are zero-padded, so the primary key
/// grows at its right edge. `VACUUM (ANALYZE)` then sets the visibility map, as autovacuum
/// does for a table that is mostly at rest, so that index-only scans need not visit the heap.
async fn seed(
    url: &str,
    schema: &str,
    workers: &[String],
    sessions: usize,
) -> anyhow::Result<Seeded> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let table = format!("\"{schema}\".blockyard_sessions");
    for setting in [
        "SET maintenance_work_mem = '1GB'",
        "SET synchronous_commit = off",
    ] {
        sqlx::query(setting).execute(&mut conn).await?;
    }
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, pg_get_indexdef(c.oid)
         FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
         WHERE x.indrelid = $1::regclass AND NOT x.indisprimary",
    )
    .bind(&table)
    .fetch_all(&mut conn)
    .await
    .context("listing the table's indexes")?;
    for (name, _) in &indexes {
        let sql = format!("DROP INDEX \"{schema}\".\"{name}\"");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await?;
    }
    let started = Instant::now();
    let sql = format!(
        "INSERT INTO {table} (id, worker_id, user_sub, last_access, expires_at)
         SELECT 'bench-' || lpad(g::text, 10, '0'), w.id, '', now(), 'infinity'::timestamptz
         FROM generate_series(0::bigint, $3::bigint - 1) g
         JOIN unnest($1::text[]) WITH ORDINALITY AS w(id, n) ON w.n = 1 + g % $2"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(workers)
        .bind(workers.len() as i64)
        .bind(sessions as i64)
        .execute(&mut conn)
        .await
        .context("seeding sessions")?;
    let insert = started.elapsed();
    let started = Instant::now();
    for (_, definition) in &indexes {
        sqlx::query(sqlx::AssertSqlSafe(definition.clone()))
            .execute(&mut conn)
            .await
            .context("building an index again")?;
    }
    let indexes = started.elapsed();
    let started = Instant::now();
    let sql = format!("VACUUM (ANALYZE) {table}");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .context("vacuuming")?;
    let vacuum = started.elapsed();
    conn.close().await?;
    Ok(Seeded {
        insert,
        indexes,
        vacuum,
    })
}
