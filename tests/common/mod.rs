//! Shared test fixtures: isolated Postgres schemas, Redis key prefixes, and a TCP proxy that can
//! cut a store off mid-operation.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use session_operator::store::{PostgresStore, RedisOptions, RedisStore, StoreOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub(crate) fn pg_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub(crate) fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A name unique to this process and call, usable as schema name and key prefix.
pub(crate) fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{tag}_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `fut` to completion on a private runtime: for cleanup from `Drop`.
fn block_on_cleanup<F: std::future::Future<Output = ()> + Send + 'static>(fut: F) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(fut);
        }
    })
    .join();
}

/// A migrated Postgres schema of its own, dropped when the value is dropped.
pub(crate) struct PgSchema {
    pub name: String,
}

impl PgSchema {
    pub(crate) async fn new() -> Self {
        Self { name: unique("t") }
    }

    pub(crate) async fn store(&self, options: StoreOptions) -> PostgresStore {
        self.store_at(&pg_url(), options).await
    }

    pub(crate) async fn store_at(&self, url: &str, options: StoreOptions) -> PostgresStore {
        let store = PostgresStore::connect(url, &self.name, options)
            .await
            .expect("connect to Postgres (is it running? see scripts/test.sh)");
        store.migrate(&self.name).await.expect("migrate");
        store
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let schema = self.name.clone();
        block_on_cleanup(async move {
            if let Ok(pool) = sqlx::PgPool::connect(&pg_url()).await {
                let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
            }
        });
    }
}

/// A Redis key prefix of its own; its keys are deleted when the value is dropped.
pub(crate) struct RedisPrefix {
    pub prefix: String,
}

impl RedisPrefix {
    pub(crate) fn new() -> Self {
        // Glob characters in the prefix prove the SCAN fallback escapes it.
        Self {
            prefix: format!("{}[*]:", unique("so-test")),
        }
    }

    pub(crate) fn options(&self, index_only: bool) -> RedisOptions {
        RedisOptions {
            prefix: self.prefix.clone(),
            index_only,
            response_timeout: Duration::from_millis(500),
            ca_file: None,
        }
    }

    pub(crate) async fn store(&self, options: StoreOptions, index_only: bool) -> RedisStore {
        self.store_at(&redis_url(), options, index_only).await
    }

    pub(crate) async fn store_at(
        &self,
        url: &str,
        options: StoreOptions,
        index_only: bool,
    ) -> RedisStore {
        RedisStore::connect(url, options, self.options(index_only))
            .await
            .expect("connect to Redis (is it running? see scripts/test.sh)")
    }

    pub(crate) async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(redis_url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis")
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let pattern = format!(
            "{}*",
            self.prefix
                .replace('[', "\\[")
                .replace(']', "\\]")
                .replace('*', "\\*")
        );
        block_on_cleanup(async move {
            let Ok(client) = redis::Client::open(redis_url()) else {
                return;
            };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                return;
            };
            let mut cursor: u64 = 0;
            loop {
                // Raw bytes: tests also write keys that are not UTF-8.
                let Ok((next, keys)): redis::RedisResult<(u64, Vec<Vec<u8>>)> = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                else {
                    return;
                };
                if !keys.is_empty() {
                    let _: redis::RedisResult<i64> =
                        redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
                }
                if next == 0 {
                    return;
                }
                cursor = next;
            }
        });
    }
}

/// A TCP proxy in front of a server that a test can cut (every connection dropped, new ones
/// closed at once) and restore, to make a store unreachable mid-operation.
pub(crate) struct ChaosProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl ChaosProxy {
    pub(crate) async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let target = target.to_string();
        let accept = {
            let (cut, conns) = (cut.clone(), conns.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let target = target.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    conns.lock().expect("conns").push(task.abort_handle());
                }
            })
            .abort_handle()
        };
        Self {
            addr,
            cut,
            conns,
            accept,
        }
    }

    pub(crate) fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Drops every open connection and refuses new ones until [`ChaosProxy::restore`].
    pub(crate) fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for conn in self.conns.lock().expect("conns").drain(..) {
            conn.abort();
        }
    }

    pub(crate) fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// A database of its own, for tests that need `public` or `blockyard` schemas no other test
/// shares; dropped when the value is dropped.
pub(crate) struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub(crate) async fn new() -> Self {
        let name = unique("db");
        let admin = sqlx::PgPool::connect(&pg_url()).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create database");
        admin.close().await;
        let mut url = url::Url::parse(&pg_url()).expect("DATABASE_URL");
        url.set_path(&name);
        Self {
            name,
            url: url.to_string(),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        block_on_cleanup(async move {
            if let Ok(pool) = sqlx::PgPool::connect(&pg_url()).await {
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
            }
        });
    }
}
