//! Store selection from command-line flags and environment variables: the flags every command
//! that opens the session store shares (`run`, `migrate`, `sessions`, and the lab's `demo`).
//! They live outside `cli` so that the lab code uses them without importing the command line
//! that in turn dispatches to it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::store::{
    DEFAULT_PREFIX, DEFAULT_SCHEMA, LayeredStore, PgWorkerRecords, PostgresOptions, PostgresStore,
    RedisOptions, RedisStore, RedisWorkerRecords, Store, StoreOptions, WorkerRecords, redact_url,
    redis_key_prefix,
};

/// Where the sessions live. With both URLs the layered store (Redis over Postgres) is used;
/// with one, that store alone.
#[derive(Debug, Clone, Args)]
pub(crate) struct StoreArgs {
    /// Postgres URL, e.g. postgres://user@host:5432/db.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// Redis URL, e.g. redis://host:6379/0.
    #[arg(long, env = "REDIS_URL", hide_env_values = true, global = true)]
    pub redis_url: Option<String>,
    /// Postgres schema of the blockyard_sessions table.
    #[arg(long, env = "SESSION_SCHEMA", default_value = DEFAULT_SCHEMA, global = true)]
    pub schema: String,
    /// Prefix of Redis keys; one without a trailing `:` gets it, as blockyard does (myapp →
    /// keys myapp:session:ID).
    #[arg(long, env = "REDIS_PREFIX", default_value = DEFAULT_PREFIX, global = true)]
    pub redis_prefix: String,
    /// Idle TTL written with sessions (e.g. 30m); 0s means sessions never expire.
    #[arg(long, env = "SESSION_IDLE_TTL", default_value = "0s", value_parser = humantime::parse_duration, global = true)]
    pub idle_ttl: Duration,
    /// Touch coalescing window of the layered store; must match the proxies' setting.
    #[arg(long, env = "SESSION_TOUCH_WINDOW", default_value = "0s", value_parser = humantime::parse_duration, global = true)]
    pub touch_window: Duration,
    /// Longest wait for a Postgres row lock per statement before a batch is retried; 0s waits
    /// forever (Postgres' "disabled").
    #[arg(long, env = "SESSION_PG_LOCK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub pg_lock_timeout: Duration,
    /// Longest run of any Postgres statement (migrations are exempt); 0s means no limit.
    #[arg(long, env = "SESSION_PG_STATEMENT_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration, global = true)]
    pub pg_statement_timeout: Duration,
    /// Every Redis writer maintains the per-worker index: skip the SCAN for foreign hashes.
    #[arg(long, env = "REDIS_INDEX_ONLY", global = true)]
    pub redis_index_only: bool,
    /// PEM file of the CA of a `rediss://` server whose certificate the system does not trust.
    #[arg(long, env = "REDIS_CA_FILE", global = true)]
    pub redis_ca_file: Option<std::path::PathBuf>,
}

impl StoreArgs {
    pub(crate) fn options(&self) -> StoreOptions {
        StoreOptions {
            idle_ttl: self.idle_ttl,
            touch_window: self.touch_window,
            ..StoreOptions::default()
        }
    }

    pub(crate) fn database_url(&self) -> anyhow::Result<&str> {
        let url = self
            .database_url
            .as_deref()
            .context("no Postgres configured: pass --database-url or set DATABASE_URL")?;
        self.check_urls()?;
        Ok(url)
    }

    /// Checks the URLs' schemes before anything connects: a `mysql://` URL must not be read as
    /// Postgres settings and sent to whatever answers on that port.
    pub(crate) fn check_urls(&self) -> anyhow::Result<()> {
        for (name, url, schemes) in [
            (
                "--database-url",
                &self.database_url,
                &["postgres", "postgresql"][..],
            ),
            (
                "--redis-url",
                &self.redis_url,
                &["redis", "rediss", "redis+unix", "unix"][..],
            ),
        ] {
            if let Some(url) = url {
                let parsed = url::Url::parse(url)
                    .with_context(|| format!("{name} {} is not a URL", redact_url(url)))?;
                anyhow::ensure!(
                    schemes.contains(&parsed.scheme()),
                    "{name} {} must use one of the schemes {}",
                    redact_url(url),
                    schemes.join(", ")
                );
            }
        }
        Ok(())
    }

    /// The Redis key prefix as it is used (see [`redis_key_prefix`]).
    pub(crate) fn effective_redis_prefix(&self) -> String {
        redis_key_prefix(&self.redis_prefix)
    }

    pub(crate) async fn postgres(&self, url: &str) -> anyhow::Result<PostgresStore> {
        let pg = PostgresOptions {
            schema: self.schema.clone(),
            lock_timeout: self.pg_lock_timeout,
            statement_timeout: self.pg_statement_timeout,
            ..PostgresOptions::default()
        };
        PostgresStore::connect_with(url, pg, self.options())
            .await
            .with_context(|| format!("connecting to Postgres at {}", redact_url(url)))
    }

    fn redis_options(&self) -> RedisOptions {
        RedisOptions {
            prefix: self.redis_prefix.clone(),
            index_only: self.redis_index_only,
            ca_file: self.redis_ca_file.clone(),
            ..RedisOptions::default()
        }
    }

    pub(crate) async fn redis(&self, url: &str) -> anyhow::Result<RedisStore> {
        RedisStore::connect(url, self.options(), self.redis_options())
            .await
            .with_context(|| format!("connecting to Redis at {}", redact_url(url)))
    }

    /// For the operator: like [`Self::connect`], but with both URLs a Redis cache that does not
    /// answer at start does not stop it. Postgres is the source of truth, so the operator
    /// starts on it alone, with the cache counted as unavailable, and repairs the cache once
    /// Redis answers (see `LayeredStore::repair_pending`).
    pub(crate) async fn connect_operator(&self) -> anyhow::Result<Connected> {
        let (Some(pg), Some(redis)) = (&self.database_url, &self.redis_url) else {
            return self.connect().await;
        };
        self.check_urls()?;
        let primary = Arc::new(self.postgres(pg).await?);
        let primary_pg = primary.as_ref().clone();
        let (cache, down) = match self.redis(redis).await {
            Ok(cache) => (cache, None),
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::warn!(error = %reason, "the Redis cache does not answer; starting on Postgres alone");
                let lazy = RedisStore::connect_lazy(redis, self.options(), self.redis_options())
                    .with_context(|| format!("Redis at {}", redact_url(redis)))?;
                (lazy, Some(reason))
            }
        };
        let cache = Arc::new(cache);
        let layered = match down {
            None => LayeredStore::new(cache, primary, self.options()),
            Some(reason) => LayeredStore::new_degraded(cache, primary, self.options(), reason),
        }
        .context("combining the Redis cache with Postgres")?;
        let layered = Arc::new(layered);
        let connected = Connected {
            store: layered.clone(),
            layered: Some(layered),
            records: Arc::new(PgWorkerRecords::new(primary_pg, &self.schema)),
        };
        connected.reapply_migrations();
        Ok(connected)
    }

    /// The configured store: layered with both URLs, otherwise the one given.
    pub(crate) async fn connect(&self) -> anyhow::Result<Connected> {
        self.check_urls()?;
        // The operator's worker records live with the source of truth: Postgres when there is
        // one, otherwise Redis.
        let pg_records = |pg: &PostgresStore| -> Arc<dyn WorkerRecords> {
            Arc::new(PgWorkerRecords::new(pg.clone(), &self.schema))
        };
        let (store, layered, records): (Arc<dyn Store>, _, _) =
            match (&self.database_url, &self.redis_url) {
                (Some(pg), Some(redis)) => {
                    let primary = Arc::new(self.postgres(pg).await?);
                    let records = pg_records(primary.as_ref());
                    let cache = Arc::new(self.redis(redis).await?);
                    let layered = Arc::new(
                        LayeredStore::new(cache, primary, self.options())
                            .context("combining the Redis cache with Postgres")?,
                    );
                    (layered.clone() as Arc<dyn Store>, Some(layered), records)
                }
                (Some(pg), None) => {
                    let primary = self.postgres(pg).await?;
                    let records = pg_records(&primary);
                    (Arc::new(primary) as Arc<dyn Store>, None, records)
                }
                (None, Some(redis)) => {
                    let store = self.redis(redis).await?;
                    // The records share the session store's connection (and its TLS settings).
                    let records: Arc<dyn WorkerRecords> =
                        Arc::new(RedisWorkerRecords::new(store.connection(), store.prefix()));
                    (Arc::new(store) as Arc<dyn Store>, None, records)
                }
                (None, None) => bail!(
                    "no session store configured: pass --database-url and/or --redis-url \
                 (or set DATABASE_URL / REDIS_URL)"
                ),
            };
        Ok(Connected {
            store,
            layered,
            records,
        })
    }
}

/// A connected store: the one handle commands and the operator use. `store` is what they
/// read and mutate; `layered` is the same store seen as the layered store it is when Redis
/// caches Postgres (for its cache health and repairs); `records` is where the operator keeps
/// its durable memory of each policy's workers.
#[derive(Clone)]
pub(crate) struct Connected {
    pub store: Arc<dyn Store>,
    pub layered: Option<Arc<LayeredStore>>,
    pub records: Arc<dyn WorkerRecords>,
}

/// How long after a migration the operator applies it to the Redis cache once more (see
/// [`LayeredStore::reapply_migrations_after`]).
const REAPPLY_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

impl Connected {
    /// A store without a cache layer, whose worker records live in process memory (the
    /// embedded memory store, whose sessions do too). Only the demo runs on it.
    #[cfg(feature = "lab")]
    pub(crate) fn plain(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            layered: None,
            records: Arc::new(crate::store::MemoryWorkerRecords::default()),
        }
    }

    /// For the operator (and the demo's): migrations are applied to the cache once more after
    /// [`REAPPLY_DELAY`]. One-shot commands do not, as they would exit before it fires.
    pub(crate) fn reapply_migrations(&self) {
        if let Some(layered) = &self.layered {
            layered.reapply_migrations_after(REAPPLY_DELAY);
        }
    }

    /// Call before exiting: a one-shot command must not leave stale routes in the cache
    /// unnoticed when a cache write failed.
    pub(crate) async fn finish(&self) -> anyhow::Result<()> {
        if let Some(layered) = &self.layered {
            layered.repair_cache().await.context(
                "Postgres holds the result, but the Redis cache could not be updated; \
                 re-run the command once Redis answers",
            )?;
        }
        Ok(())
    }
}
