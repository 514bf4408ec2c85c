//! What the benchmarks that run the real operator share: its stores (a Postgres schema and a
//! Redis prefix of the run's own, removed afterwards), the operator process itself, a client
//! of the emulator whose requests are told apart from the operator's, and the operator's
//! memory and metrics as the system shows them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::Context as _;
use kube_emulator::Emulator;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::BenchStores;
use crate::store::{LayeredStore, PostgresStore, RedisOptions, RedisStore, Store, StoreOptions};

/// The `User-Agent` of the benchmarks' own API requests (the operator sends none of its own).
pub(super) const BENCH_USER_AGENT: &str = "session-operator-bench";

/// A migrated Postgres schema and a Redis prefix named `tag`, as a layered store.
pub(super) async fn layered_store(
    stores: &BenchStores,
    tag: &str,
) -> anyhow::Result<Arc<dyn Store>> {
    let options = StoreOptions::default();
    let primary = Arc::new(
        PostgresStore::connect(&stores.database_url, tag, options.clone())
            .await
            .context("connecting to Postgres")?,
    );
    primary.migrate(tag).await.context("migrating")?;
    let cache = Arc::new(
        RedisStore::connect(
            &stores.redis_url,
            options.clone(),
            RedisOptions {
                prefix: prefix(tag),
                ..RedisOptions::default()
            },
        )
        .await
        .context("connecting to Redis")?,
    );
    Ok(Arc::new(LayeredStore::new(cache, primary, options)?))
}

/// The Redis key prefix of the run `tag`.
pub(super) fn prefix(tag: &str) -> String {
    format!("{tag}:")
}

/// A client of the emulator that sends [`BENCH_USER_AGENT`], so the request log tells the
/// benchmark's requests from the operator's.
pub(super) fn bench_client(emulator: &Emulator) -> anyhow::Result<kube::Client> {
    use axum::http::{HeaderValue, header};
    let mut config = emulator.kube_config()?;
    config.headers.push((
        header::USER_AGENT,
        HeaderValue::from_static(BENCH_USER_AGENT),
    ));
    Ok(kube::Client::try_from(config)?)
}

/// The real operator binary (this executable's `run`) against `emulator`, with Redis over
/// Postgres under the run's schema and prefix, leader of its own Lease in `namespace`.
pub(super) struct Operator {
    child: tokio::process::Child,
    kubeconfig: PathBuf,
    /// Where its `/metrics` are served.
    pub(super) metrics: std::net::SocketAddr,
}

impl Operator {
    /// With `log`, its log (JSON, info level) goes to that file; else it logs warnings only,
    /// to its stderr.
    pub(super) fn start(
        stores: &BenchStores,
        emulator: &Emulator,
        tag: &str,
        namespace: &str,
        log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let kubeconfig = std::env::temp_dir().join(format!("{tag}.kubeconfig"));
        std::fs::write(&kubeconfig, emulator.kubeconfig())?;
        let metrics = free_port()?;
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("run")
            .args([
                "--database-url",
                &stores.database_url,
                "--redis-url",
                &stores.redis_url,
            ])
            .args(["--schema", tag, "--redis-prefix", &prefix(tag)])
            // A Lease of the run's own: a killed operator's Lease need not expire first.
            .args(["--lease-name", &tag.replace('_', "-")])
            .args([
                "--lease-namespace",
                namespace,
                "--identity",
                "bench-operator",
            ])
            .args([
                "--metrics-addr",
                &metrics.to_string(),
                "--log-format",
                "json",
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env(
                "RUST_LOG",
                if log.is_some() {
                    "info,session_operator::controller=debug"
                } else {
                    "warn"
                },
            )
            .stdout(match log {
                Some(path) => Stdio::from(
                    std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?,
                ),
                None => Stdio::null(),
            })
            .kill_on_drop(true)
            .spawn()
            .context("starting the operator")?;
        Ok(Self {
            child,
            kubeconfig,
            metrics,
        })
    }

    /// Peak resident set size so far, in KiB (`None` without /proc).
    pub(super) fn peak_rss_kib(&self) -> Option<u64> {
        self.child.id().and_then(peak_rss_kib)
    }

    /// CPU time (user + system) it used so far, in seconds (`None` without /proc).
    pub(super) fn cpu_seconds(&self) -> Option<f64> {
        self.child.id().and_then(cpu_seconds)
    }

    /// The text of its `/metrics`.
    pub(super) async fn scrape(&self) -> anyhow::Result<String> {
        scrape(self.metrics).await
    }

    pub(super) async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// A port nobody listens on now (the operator binds it moments later).
fn free_port() -> anyhow::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// `GET /metrics` over HTTP/1.0 (the server closes the connection after the body).
async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the operator's metrics at {addr}"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("a metrics response without a body")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "GET /metrics: {}",
        head.lines().next().unwrap_or_default()
    );
    Ok(body.to_string())
}

/// Peak resident set size of a process, from `/proc/<pid>/status` (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// CPU time (user + system) a process used so far, from `/proc/<pid>/stat`, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Some(ticks as f64 / 100.0)
}

/// Drops the run's schema and deletes its Redis keys (best effort).
pub(super) async fn cleanup(stores: &BenchStores, tag: &str) {
    if let Ok(pool) = sqlx::PgPool::connect(&stores.database_url).await {
        let sql = format!("DROP SCHEMA IF EXISTS \"{tag}\" CASCADE");
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
        pool.close().await;
    }
    if let Ok(client) = redis::Client::open(stores.redis_url.as_str())
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let mut cursor: u64 = 0;
        loop {
            let reply: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", prefix(tag)))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await;
            let Ok((next, keys)) = reply else { break };
            if !keys.is_empty() {
                let _: redis::RedisResult<()> =
                    redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
}
