//! `session-operator bench store`.
//!
//! 1. Worker operations (reroute, delete_by_worker) of k sessions among N, Redis and Postgres,
//!    against a full-scan baseline at each N: blockyard's Lua `SCAN` script for Redis, a
//!    sequential-scan `UPDATE`/`DELETE` for Postgres.
//! 2. Layered (Redis over Postgres, Redis in its default blockyard-compatible mode) reroute and
//!    delete_by_worker of k among N: the cache is updated by the ids the primary returns, next
//!    to what the SCAN path of a standalone Redis costs at the same N.
//! 3. `workers_with_sessions` (skip scan / index) vs `counts_by_worker`, N sessions over
//!    N / 500 workers.
//! 4. How long other Redis clients wait (PING round trips) while one worker with 100k sessions
//!    is counted, listed, rerouted and deleted: every script handles at most one batch.
//! 5. Layered touch throughput with coalescing vs write-through, 64 concurrent callers.
//! 6. Expiry of many expired rows in batches vs one unbounded `DELETE`, with the latency of
//!    concurrent `get`s and of blockyard-style touches (which wait on row locks) meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use redis::Script;

use super::percentile_ms;
use crate::store::{
    Entry, LayeredStore, PostgresStore, RedisOptions, RedisStore, Store, StoreOptions,
};

#[derive(Debug, Args)]
pub(crate) struct StoreBench {
    #[command(flatten)]
    stores: super::BenchStores,
    /// Total session counts N to measure at.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    sizes: Vec<usize>,
    /// Sessions of the worker that is rerouted or deleted.
    #[arg(long, default_value_t = 1000)]
    k: usize,
    /// Expired rows for the expiry benchmark.
    #[arg(long, default_value_t = 1_000_000)]
    expired: usize,
    /// Concurrent callers for the touch benchmark.
    #[arg(long, default_value_t = 64)]
    callers: usize,
    /// Duration of each touch run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    touch_time: Duration,
    /// Parts to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    parts: Vec<Part>,
    /// Small sizes for a quick check that every part runs (used by scripts/test.sh).
    #[arg(long)]
    smoke: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Redis worker operations vs the Lua SCAN baseline.
    Redis,
    /// Postgres worker operations vs sequential scans.
    Postgres,
    /// Layered worker operations (cache updated by id) vs the Redis SCAN path.
    Layered,
    /// workers_with_sessions vs counts_by_worker.
    Workers,
    /// How long other Redis clients wait while one worker with many sessions is counted,
    /// listed, rerouted and deleted.
    Blocking,
    /// Layered touch throughput, coalesced vs write-through.
    Touch,
    /// Batched vs single-statement expiry under concurrent load.
    Expiry,
}

/// An expiry far in the future: the rows the worker benchmarks fill never expire meanwhile.
const FAR: &str = "'9999-12-31 23:59:59+00'::timestamptz";

/// blockyard's reroute: a Lua script that SCANs the whole keyspace (the baseline).
const SCAN_REROUTE: &str = r#"
local cursor, n = '0', 0
repeat
  local r = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = r[1]
  for _, key in ipairs(r[2]) do
    if redis.call('HGET', key, 'worker_id') == ARGV[2] then
      if ARGV[3] == '' then redis.call('DEL', key) else redis.call('HSET', key, 'worker_id', ARGV[3]) end
      n = n + 1
    end
  end
until cursor == '0'
return n
"#;

pub(crate) async fn run(mut args: StoreBench) -> anyhow::Result<()> {
    if args.smoke {
        args.sizes = vec![2_000, 8_000];
        args.k = 200;
        args.expired = 5_000;
        args.callers = 16;
        args.touch_time = Duration::from_millis(500);
    }
    anyhow::ensure!(
        args.sizes.iter().all(|&n| n >= args.k),
        "every size must be >= k"
    );
    let tag = format!("bench_{}", std::process::id());
    let pg = PostgresStore::connect(&args.stores.database_url, &tag, StoreOptions::default())
        .await
        .context("connecting to Postgres")?;
    pg.migrate(&tag).await?;
    let result = run_all(&args, &tag, &pg).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {tag} CASCADE")))
        .execute(pg.pool())
        .await?;
    result
}

async fn run_all(args: &StoreBench, tag: &str, pg: &PostgresStore) -> anyhow::Result<()> {
    let prefix = format!("{tag}:");
    let redis_opts = |index_only| RedisOptions {
        prefix: prefix.clone(),
        index_only,
        response_timeout: Duration::from_secs(60),
        ca_file: None,
    };
    let indexed = RedisStore::connect(
        &args.stores.redis_url,
        StoreOptions::default(),
        redis_opts(true),
    )
    .await
    .context("connecting to Redis")?;
    let fallback = RedisStore::connect(
        &args.stores.redis_url,
        StoreOptions::default(),
        redis_opts(false),
    )
    .await?;
    let result = async {
        let run = |part: Part| args.parts.is_empty() || args.parts.contains(&part);
        if run(Part::Redis) {
            redis_worker_ops(args, &indexed, &fallback).await?;
        }
        if run(Part::Postgres) {
            postgres_worker_ops(args, pg).await?;
        }
        if run(Part::Layered) {
            let prefix = format!("{tag}:layered:");
            let cache = RedisStore::connect(
                &args.stores.redis_url,
                StoreOptions::default(),
                RedisOptions {
                    prefix,
                    index_only: false,
                    response_timeout: Duration::from_secs(60),
                    ca_file: None,
                },
            )
            .await?;
            let ops = layered_worker_ops(args, pg, &cache).await;
            clear_prefix(&cache, &args.stores.redis_url).await?;
            ops?;
        }
        if run(Part::Workers) {
            let prefix = format!("{tag}:workers:");
            let redis = RedisStore::connect(
                &args.stores.redis_url,
                StoreOptions::default(),
                RedisOptions {
                    prefix,
                    index_only: true,
                    response_timeout: Duration::from_secs(60),
                    ca_file: None,
                },
            )
            .await?;
            let ops = worker_listing(args, pg, &redis).await;
            clear_prefix(&redis, &args.stores.redis_url).await?;
            ops?;
        }
        if run(Part::Blocking) {
            redis_blocking(args, &indexed).await?;
        }
        if run(Part::Touch) {
            layered_touches(args, pg, &indexed).await?;
        }
        if run(Part::Expiry) {
            expiry(args, pg).await?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(err) = &result {
        eprintln!("error: {err:#}; cleaning up");
    }
    // Clean up the benchmark's keys, whatever happened: index the hashes the baseline script
    // moved behind the index's back, then delete worker by worker.
    indexed.adopt_unindexed().await?;
    clear_prefix(&indexed, &args.stores.redis_url).await?;
    result
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn timed<T>(
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Duration)> {
    let start = Instant::now();
    let out = f.await?;
    Ok((out, start.elapsed()))
}

fn sessions(
    range: std::ops::Range<usize>,
    worker: impl Fn(usize) -> String,
) -> Vec<(String, Entry)> {
    range
        .map(|i| (format!("s{i}"), Entry::new(worker(i), "")))
        .collect()
}

/// Filler worker of session `i`: 1,000 sessions per worker, like a busy fleet.
fn filler(i: usize) -> String {
    format!("w{}", i / 1000)
}

async fn redis_worker_ops(
    args: &StoreBench,
    store: &RedisStore,
    fallback: &RedisStore,
) -> anyhow::Result<()> {
    println!(
        "\n== Redis: reroute / delete_by_worker of k = {} sessions among N ==",
        args.k
    );
    println!(
        "{:>9} {:>13} {:>13} {:>13} {:>15} {:>13} {:>13} {:>9} {:>9}",
        "N",
        "1st rr ms",
        "reroute ms",
        "delete ms",
        "fallback ms",
        "scan rr ms",
        "scan del ms",
        "rr ratio",
        "del ratio"
    );
    let script = Script::new(SCAN_REROUTE);
    let pattern = format!("{}session:*", store.prefix());
    // The baseline blocks Redis for seconds at 1M keys: no response timeout for it.
    let mut conn = redis::Client::open(args.stores.redis_url.as_str())?
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await?;
    let hot = sessions(0..args.k, |_| "hot".to_string());
    let restore_hot = || async {
        store
            .set_many(&hot)
            .await
            .context("restoring the hot worker")
    };
    restore_hot().await?;
    let mut filled = args.k;
    for &n in &args.sizes {
        store
            .set_many(&sessions(filled..n, filler))
            .await
            .context("populating Redis")?;
        filled = n;
        // Ten reroutes (five there and back): the first one right after a large fill pays for
        // Redis settling (incremental rehashing of the keyspace, Lua garbage collection), so
        // the median is reported next to it.
        let mut reroutes = Vec::new();
        for (from, to) in [("hot", "hot2"), ("hot2", "hot")].repeat(5) {
            let (moved, took) = timed(async { Ok(store.reroute_worker(from, to).await?) })
                .await
                .context("indexed reroute")?;
            anyhow::ensure!(moved == args.k as u64, "indexed reroute moved {moved}");
            reroutes.push(took);
        }
        let first_rr = reroutes[0];
        reroutes.sort();
        let rr = reroutes[reroutes.len() / 2];
        let (moved_fb, fb) = timed(async { Ok(fallback.reroute_worker("hot", "hot2").await?) })
            .await
            .context("fallback reroute")?;
        anyhow::ensure!(
            moved_fb == args.k as u64,
            "fallback reroute moved {moved_fb}"
        );
        let (moved_scan, scan) = timed(async {
            Ok(script
                .arg(&pattern)
                .arg("hot2")
                .arg("hot")
                .invoke_async::<u64>(&mut conn)
                .await?)
        })
        .await
        .context("baseline scan script")?;
        anyhow::ensure!(
            moved_scan == args.k as u64,
            "scan reroute moved {moved_scan}"
        );
        // Untimed: re-index the hashes the scan moved and clear the worker for the next step.
        let deleted = fallback
            .delete_by_worker("hot")
            .await
            .context("fallback delete")?;
        anyhow::ensure!(deleted == args.k as u64, "delete removed {deleted}");
        restore_hot().await?;
        let (deleted, delete_idx) = timed(async { Ok(store.delete_by_worker("hot").await?) })
            .await
            .context("indexed delete")?;
        anyhow::ensure!(deleted == args.k as u64, "indexed delete removed {deleted}");
        restore_hot().await?;
        let (deleted, scan_del) = timed(async {
            Ok(script
                .arg(&pattern)
                .arg("hot")
                .arg("")
                .invoke_async::<u64>(&mut conn)
                .await?)
        })
        .await
        .context("baseline scan script")?;
        anyhow::ensure!(deleted == args.k as u64, "scan delete removed {deleted}");
        restore_hot().await?;
        println!(
            "{n:>9} {:>13.2} {:>13.2} {:>13.2} {:>15.2} {:>13.2} {:>13.2} {:>8.1}x {:>8.1}x",
            ms(first_rr),
            ms(rr),
            ms(delete_idx),
            ms(fb),
            ms(scan),
            ms(scan_del),
            scan.as_secs_f64() / rr.as_secs_f64(),
            scan_del.as_secs_f64() / delete_idx.as_secs_f64()
        );
    }
    println!(
        "(reroute = median of 10, 1st rr = the first right after filling; fallback = reroute with the SCAN for foreign, unindexed hashes; scan = blockyard's Lua SCAN script, blocking Redis)"
    );
    Ok(())
}

async fn pg_fill(
    pg: &PostgresStore,
    from: usize,
    to: usize,
    worker_sql: &str,
    expires_sql: &str,
) -> anyhow::Result<()> {
    let sql = format!(
        "INSERT INTO blockyard_sessions (id, worker_id, user_sub, last_access, expires_at)
         SELECT 's' || i, {worker_sql}, '', now(), {expires_sql} FROM generate_series($1::bigint, $2::bigint - 1) AS i"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(from as i64)
        .bind(to as i64)
        .execute(pg.pool())
        .await?;
    sqlx::query("ANALYZE blockyard_sessions")
        .execute(pg.pool())
        .await?;
    Ok(())
}

/// A reroute (or delete, with `to = None`) by sequential scan: the full-scan baseline.
async fn pg_seqscan(pg: &PostgresStore, from: &str, to: Option<&str>) -> anyhow::Result<u64> {
    let mut tx = pg.pool().begin().await?;
    sqlx::query("SET LOCAL enable_indexscan = off")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SET LOCAL enable_bitmapscan = off")
        .execute(&mut *tx)
        .await?;
    let done = match to {
        Some(to) => {
            sqlx::query("UPDATE blockyard_sessions SET worker_id = $2 WHERE worker_id = $1")
                .bind(from)
                .bind(to)
                .execute(&mut *tx)
                .await?
        }
        None => {
            sqlx::query("DELETE FROM blockyard_sessions WHERE worker_id = $1")
                .bind(from)
                .execute(&mut *tx)
                .await?
        }
    };
    tx.commit().await?;
    Ok(done.rows_affected())
}

async fn postgres_worker_ops(args: &StoreBench, pg: &PostgresStore) -> anyhow::Result<()> {
    println!(
        "\n== Postgres: reroute / delete_by_worker of k = {} sessions among N ==",
        args.k
    );
    println!(
        "{:>9} {:>13} {:>13} {:>13} {:>13} {:>9} {:>9}",
        "N", "reroute ms", "delete ms", "seq rr ms", "seq del ms", "rr ratio", "del ratio"
    );
    let k = args.k;
    let hot =
        |pg: &'static str| format!("CASE WHEN i < {k} THEN '{pg}' ELSE 'w' || (i / 1000) END");
    pg_fill(pg, 0, k, &hot("hot"), FAR).await?;
    let mut filled = k;
    for &n in &args.sizes {
        pg_fill(pg, filled, n, "'w' || (i / 1000)", FAR).await?;
        filled = n;
        let (moved, rr) = timed(async { Ok(pg.reroute_worker("hot", "hot2").await?) }).await?;
        anyhow::ensure!(moved == k as u64, "reroute moved {moved}");
        let (moved, seq_rr) = timed(pg_seqscan(pg, "hot2", Some("hot"))).await?;
        anyhow::ensure!(moved == k as u64, "seq reroute moved {moved}");
        let (deleted, del) = timed(async { Ok(pg.delete_by_worker("hot").await?) }).await?;
        anyhow::ensure!(deleted == k as u64, "delete removed {deleted}");
        pg_fill(pg, 0, k, "'hot'", FAR).await?;
        let (deleted, seq_del) = timed(pg_seqscan(pg, "hot", None)).await?;
        anyhow::ensure!(deleted == k as u64, "seq delete removed {deleted}");
        pg_fill(pg, 0, k, "'hot'", FAR).await?;
        println!(
            "{n:>9} {:>13.2} {:>13.2} {:>13.2} {:>13.2} {:>8.1}x {:>8.1}x",
            ms(rr),
            ms(del),
            ms(seq_rr),
            ms(seq_del),
            seq_rr.as_secs_f64() / rr.as_secs_f64(),
            seq_del.as_secs_f64() / del.as_secs_f64()
        );
    }
    sqlx::query("TRUNCATE blockyard_sessions")
        .execute(pg.pool())
        .await?;
    Ok(())
}

/// Deletes every indexed session under a store's prefix, and its invalidation epochs. Through
/// an index-only twin: in default mode every worker deletion would SCAN the whole keyspace.
async fn clear_prefix(store: &RedisStore, url: &str) -> anyhow::Result<()> {
    let twin = RedisStore::connect(
        url,
        StoreOptions::default(),
        RedisOptions {
            prefix: store.prefix().to_string(),
            index_only: true,
            response_timeout: Duration::from_secs(60),
            ca_file: None,
        },
    )
    .await?;
    for w in twin.workers_with_sessions().await? {
        twin.delete_by_worker(&w).await?;
    }
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{}session-epochs", store.prefix()))
        .query_async(&mut conn)
        .await?;
    Ok(())
}

/// Runs `op` while another client PINGs Redis in a loop; returns the op's time and the
/// longest PING round trip meanwhile (how long Redis was blocked for everyone else).
async fn while_pinging<T>(
    url: &str,
    op: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Duration, Duration)> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let _: String = redis::cmd("PING").query_async(&mut conn).await?;
                worst = worst.max(t.elapsed());
            }
            anyhow::Ok(worst)
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (out, took) = timed(op).await?;
    stop.store(true, Ordering::Relaxed);
    let worst = pinger.await??;
    Ok((out, took, worst))
}

async fn redis_blocking(args: &StoreBench, store: &RedisStore) -> anyhow::Result<()> {
    let n = if args.smoke { 5_000 } else { 100_000 };
    println!(
        "\n== Redis: one worker with {n} sessions; longest PING of another client meanwhile =="
    );
    println!(
        "{:>22} {:>12} {:>16}",
        "operation", "total ms", "max PING ms"
    );
    store
        .set_many(&sessions(0..n, |_| "big".to_string()))
        .await?;
    let ((), took, worst) = while_pinging(&args.stores.redis_url, async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    })
    .await?;
    println!(
        "{:>22} {:>12.2} {:>16.2}",
        "(idle, baseline)",
        ms(took),
        ms(worst)
    );
    let (count, took, worst) = while_pinging(&args.stores.redis_url, async {
        Ok(store.count_for_worker("big").await?)
    })
    .await?;
    anyhow::ensure!(count == n as u64, "counted {count}");
    println!(
        "{:>22} {:>12.2} {:>16.2}",
        "count_for_worker",
        ms(took),
        ms(worst)
    );
    let (entries, took, worst) = while_pinging(&args.stores.redis_url, async {
        Ok(store.entries_for_worker("big").await?)
    })
    .await?;
    anyhow::ensure!(entries.len() == n, "listed {}", entries.len());
    println!(
        "{:>22} {:>12.2} {:>16.2}",
        "entries_for_worker",
        ms(took),
        ms(worst)
    );
    let (moved, took, worst) = while_pinging(&args.stores.redis_url, async {
        Ok(store.reroute_worker("big", "big2").await?)
    })
    .await?;
    anyhow::ensure!(moved == n as u64, "moved {moved}");
    println!(
        "{:>22} {:>12.2} {:>16.2}",
        "reroute_worker",
        ms(took),
        ms(worst)
    );
    let (deleted, took, worst) = while_pinging(&args.stores.redis_url, async {
        Ok(store.delete_by_worker("big2").await?)
    })
    .await?;
    anyhow::ensure!(deleted == n as u64, "deleted {deleted}");
    println!(
        "{:>22} {:>12.2} {:>16.2}",
        "delete_by_worker",
        ms(took),
        ms(worst)
    );
    Ok(())
}

async fn layered_worker_ops(
    args: &StoreBench,
    pg: &PostgresStore,
    cache: &RedisStore,
) -> anyhow::Result<()> {
    println!(
        "\n== Layered (Redis default mode over Postgres): reroute / delete_by_worker of k = {} among N ==",
        args.k
    );
    println!(
        "{:>9} {:>13} {:>13} {:>13} {:>18} {:>14}",
        "N", "1st rr ms", "reroute ms", "delete ms", "redis SCAN rr ms", "rr t(N)/t(N0)"
    );
    let k = args.k;
    let layered = LayeredStore::new(
        Arc::new(cache.clone()),
        Arc::new(pg.with_options(StoreOptions::default())?),
        StoreOptions::default(),
    )?;
    let hot = sessions(0..k, |_| "hot".to_string());
    let restore_hot = || async {
        pg_fill(pg, 0, k, "'hot'", FAR).await?;
        cache
            .set_many(&hot)
            .await
            .context("restoring the hot worker")
    };
    restore_hot().await?;
    let mut filled = k;
    let mut first = None;
    for &n in &args.sizes {
        pg_fill(pg, filled, n, "'w' || (i / 1000)", FAR).await?;
        cache
            .set_many(&sessions(filled..n, filler))
            .await
            .context("populating Redis")?;
        filled = n;
        // Six reroutes (three there and back), reported as the median: the first right after
        // a large fill pays for both servers settling (see the Redis part).
        let mut reroutes = Vec::new();
        for (from, to) in [("hot", "hot2"), ("hot2", "hot")].repeat(3) {
            let (moved, took) =
                timed(async { Ok(layered.reroute_worker(from, to).await?) }).await?;
            anyhow::ensure!(moved == k as u64, "layered reroute moved {moved}");
            reroutes.push(took);
        }
        let first_rr = reroutes[0];
        reroutes.sort();
        let rr = reroutes[reroutes.len() / 2];
        anyhow::ensure!(
            cache.get("s0").await?.map(|e| e.worker_id).as_deref() == Some("hot"),
            "cache not updated"
        );
        let (deleted, del) = timed(async { Ok(layered.delete_by_worker("hot").await?) }).await?;
        anyhow::ensure!(deleted == k as u64, "layered delete removed {deleted}");
        anyhow::ensure!(cache.get("s0").await?.is_none(), "cache not invalidated");
        restore_hot().await?;
        // What the cache half cost before: a standalone Redis reroute in default mode (SCAN).
        let (moved, scan) = timed(async { Ok(cache.reroute_worker("hot", "hot2").await?) }).await?;
        anyhow::ensure!(moved == k as u64, "redis SCAN reroute moved {moved}");
        cache.reroute_worker("hot2", "hot").await?;
        let base = *first.get_or_insert(rr);
        println!(
            "{n:>9} {:>13.2} {:>13.2} {:>13.2} {:>18.2} {:>13.2}x",
            ms(first_rr),
            ms(rr),
            ms(del),
            ms(scan),
            rr.as_secs_f64() / base.as_secs_f64()
        );
    }
    println!(
        "(reroute = median of 6; no Redis SCAN on the layered path: the cache is updated by the ids \
         Postgres moved. The SCAN path walks every key of the Redis instance, whatever N is.)"
    );
    sqlx::query("TRUNCATE blockyard_sessions")
        .execute(pg.pool())
        .await?;
    Ok(())
}

async fn worker_listing(
    args: &StoreBench,
    pg: &PostgresStore,
    redis: &RedisStore,
) -> anyhow::Result<()> {
    println!("\n== workers_with_sessions vs counts_by_worker, N sessions, 500 per worker ==");
    println!(
        "{:>9} {:>8} {:>17} {:>17} {:>17} {:>17}",
        "N", "workers", "pg workers ms", "pg counts ms", "redis workers ms", "redis counts ms"
    );
    let mut filled = 0;
    for &n in &args.sizes {
        pg_fill(pg, filled, n, "'w' || (i / 500)", FAR).await?;
        redis
            .set_many(&sessions(filled..n, |i| format!("w{}", i / 500)))
            .await?;
        filled = n;
        let workers = n.div_ceil(500);
        let (listed, pg_w) = timed(async { Ok(pg.workers_with_sessions().await?) }).await?;
        anyhow::ensure!(listed.len() == workers, "pg listed {}", listed.len());
        let (counts, pg_c) = timed(async { Ok(pg.counts_by_worker().await?) }).await?;
        anyhow::ensure!(counts.len() == workers, "pg counted {}", counts.len());
        let (listed, r_w) = timed(async { Ok(redis.workers_with_sessions().await?) }).await?;
        anyhow::ensure!(listed.len() == workers, "redis listed {}", listed.len());
        let (counts, r_c) = timed(async { Ok(redis.counts_by_worker().await?) }).await?;
        anyhow::ensure!(counts.len() == workers, "redis counted {}", counts.len());
        println!(
            "{n:>9} {workers:>8} {:>17.2} {:>17.2} {:>17.2} {:>17.2}",
            ms(pg_w),
            ms(pg_c),
            ms(r_w),
            ms(r_c)
        );
    }
    sqlx::query("TRUNCATE blockyard_sessions")
        .execute(pg.pool())
        .await?;
    Ok(())
}

async fn layered_touches(
    args: &StoreBench,
    pg: &PostgresStore,
    cache: &RedisStore,
) -> anyhow::Result<()> {
    const SESSIONS: usize = 10_000;
    println!(
        "\n== Layered touch throughput, {} concurrent callers, {:?} per run ==",
        args.callers, args.touch_time
    );
    let ids: Arc<Vec<String>> = Arc::new((0..SESSIONS).map(|i| format!("t{i}")).collect());
    let mut results = Vec::new();
    for (label, window) in [
        ("write-through", Duration::ZERO),
        ("coalesced (60s window)", Duration::from_secs(60)),
    ] {
        let options = StoreOptions {
            touch_window: window,
            ..StoreOptions::default()
        };
        let primary: Arc<dyn Store> = Arc::new(pg.with_options(options.clone())?);
        let layered = Arc::new(LayeredStore::new(
            Arc::new(cache.clone()),
            primary,
            options,
        )?);
        for id in ids.iter() {
            layered.set(id, &Entry::new("w", "")).await?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..args.callers {
            let (layered, ids, stop, done) =
                (layered.clone(), ids.clone(), stop.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = c * 7919;
                while !stop.load(Ordering::Relaxed) {
                    i = (i + 104_729) % ids.len();
                    layered.touch(&ids[i]).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            }));
        }
        tokio::time::sleep(args.touch_time).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await??;
        }
        let rate = done.load(Ordering::Relaxed) as f64 / args.touch_time.as_secs_f64();
        let stats = layered.stats();
        println!(
            "{label:>24}: {rate:>10.0} touches/s  (primary touches {}, coalesced {})",
            stats.primary_touches, stats.coalesced_touches
        );
        results.push(rate);
        layered.delete_many(&ids).await?;
    }
    println!(
        "{:>24}: {:>9.1}x",
        "coalesced / write-through",
        results[1] / results[0]
    );
    Ok(())
}

/// Latencies of concurrent reads and touches while `sweep` runs.
async fn under_sweep<F>(
    pg: &PostgresStore,
    expired: usize,
    sweep: F,
) -> anyhow::Result<(u64, Duration, Vec<Duration>, Vec<Duration>)>
where
    F: std::future::Future<Output = anyhow::Result<u64>>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..8usize {
        let (pool, stop) = (pg.pool().clone(), stop.clone());
        let store = pg.with_options(StoreOptions::default())?;
        readers.push(tokio::spawn(async move {
            let (mut gets, mut touches) = (Vec::new(), Vec::new());
            let mut i = r * 7919;
            while !stop.load(Ordering::Relaxed) {
                i = (i + 104_729) % 10_000;
                let t = Instant::now();
                store.get(&format!("live{i}")).await?;
                gets.push(t.elapsed());
                // blockyard's Touch has no expiry filter, so it waits for a row being deleted.
                let t = Instant::now();
                sqlx::query("UPDATE blockyard_sessions SET last_access = now() WHERE id = $1")
                    .bind(format!("s{}", i * (expired / 10_000).max(1)))
                    .execute(&pool)
                    .await?;
                touches.push(t.elapsed());
            }
            anyhow::Ok((gets, touches))
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (removed, took) = timed(sweep).await?;
    stop.store(true, Ordering::Relaxed);
    let (mut gets, mut touches) = (Vec::new(), Vec::new());
    for r in readers {
        let (g, t) = r.await??;
        gets.extend(g);
        touches.extend(t);
    }
    gets.sort();
    touches.sort();
    Ok((removed, took, gets, touches))
}

async fn expiry(args: &StoreBench, pg: &PostgresStore) -> anyhow::Result<()> {
    println!(
        "\n== Postgres expiry of {} expired rows, 8 concurrent readers/touchers ==",
        args.expired
    );
    println!(
        "{:>20} {:>10} {:>12} {:>12} {:>14} {:>14}",
        "sweep", "seconds", "get p99 ms", "get max ms", "touch p99 ms", "touch max ms"
    );
    let live = "'9999-12-31 23:59:59+00'::timestamptz";
    for label in ["batched (1000 rows)", "single DELETE"] {
        sqlx::query("TRUNCATE blockyard_sessions")
            .execute(pg.pool())
            .await?;
        pg_fill(
            pg,
            0,
            args.expired,
            "'w' || (i / 1000)",
            "now() - interval '1 hour'",
        )
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO blockyard_sessions SELECT 'live' || i, 'w', '', now(), {live} FROM generate_series(0, 9999) AS i"
        )))
        .execute(pg.pool())
        .await?;
        let (removed, took, gets, touches) = if label.starts_with("batched") {
            under_sweep(pg, args.expired, async { Ok(pg.expire().await?) }).await?
        } else {
            under_sweep(pg, args.expired, async {
                Ok(
                    sqlx::query("DELETE FROM blockyard_sessions WHERE expires_at < now()")
                        .execute(pg.pool())
                        .await?
                        .rows_affected(),
                )
            })
            .await?
        };
        // Rows a toucher held locked at the very end are left for the next pass (SKIP LOCKED);
        // that pass must find exactly them.
        let rest = pg.expire().await?;
        anyhow::ensure!(
            removed + rest == args.expired as u64,
            "{label} removed {removed} + {rest} of {}",
            args.expired
        );
        println!(
            "{label:>20} {:>10.2} {:>12.2} {:>12.2} {:>14.2} {:>14.2}",
            took.as_secs_f64(),
            percentile_ms(&gets, 0.99),
            percentile_ms(&gets, 1.0),
            percentile_ms(&touches, 0.99),
            percentile_ms(&touches, 1.0),
        );
    }
    Ok(())
}
