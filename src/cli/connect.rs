//! Store selection from command-line flags and environment variables.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::store::{
    DEFAULT_PREFIX, DEFAULT_SCHEMA, LayeredStore, PostgresOptions, PostgresStore, RedisOptions,
    RedisStore, Store, StoreOptions, redact_url,
};

/// Where the sessions live. With both URLs the layered store (Redis over Postgres) is used;
/// with one, that store alone.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Postgres URL, e.g. postgres://user@host:5432/db.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// Redis URL, e.g. redis://host:6379/0.
    #[arg(long, env = "REDIS_URL", hide_env_values = true, global = true)]
    pub redis_url: Option<String>,
    /// Postgres schema of the blockyard_sessions table.
    #[arg(long, env = "SESSION_SCHEMA", default_value = DEFAULT_SCHEMA, global = true)]
    pub schema: String,
    /// Prefix of Redis keys.
    #[arg(long, env = "REDIS_PREFIX", default_value = DEFAULT_PREFIX, global = true)]
    pub redis_prefix: String,
    /// Idle TTL written with sessions (e.g. 30m); 0s means sessions never expire.
    #[arg(long, env = "SESSION_IDLE_TTL", default_value = "0s", value_parser = humantime::parse_duration, global = true)]
    pub idle_ttl: Duration,
    /// Touch coalescing window of the layered store; must match the proxies' setting.
    #[arg(long, env = "SESSION_TOUCH_WINDOW", default_value = "0s", value_parser = humantime::parse_duration, global = true)]
    pub touch_window: Duration,
    /// Longest wait for a Postgres row lock per statement before a batch is retried.
    #[arg(long, env = "SESSION_PG_LOCK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub pg_lock_timeout: Duration,
    /// Longest run of any Postgres statement (migrations are exempt).
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
    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            idle_ttl: self.idle_ttl,
            touch_window: self.touch_window,
            ..StoreOptions::default()
        }
    }

    pub fn database_url(&self) -> anyhow::Result<&str> {
        self.database_url
            .as_deref()
            .context("no Postgres configured: pass --database-url or set DATABASE_URL")
    }

    pub async fn postgres(&self, url: &str) -> anyhow::Result<PostgresStore> {
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

    pub async fn redis(&self, url: &str) -> anyhow::Result<RedisStore> {
        let redis = RedisOptions {
            prefix: self.redis_prefix.clone(),
            index_only: self.redis_index_only,
            ca_file: self.redis_ca_file.clone(),
            ..RedisOptions::default()
        };
        RedisStore::connect(url, self.options(), redis)
            .await
            .with_context(|| format!("connecting to Redis at {}", redact_url(url)))
    }

    /// The configured store: layered with both URLs, otherwise the one given.
    pub async fn connect(&self) -> anyhow::Result<Connected> {
        let (store, layered): (Arc<dyn Store>, _) = match (&self.database_url, &self.redis_url) {
            (Some(pg), Some(redis)) => {
                let primary = Arc::new(self.postgres(pg).await?);
                let cache = Arc::new(self.redis(redis).await?);
                let layered = Arc::new(
                    LayeredStore::new(cache, primary, self.options())
                        .context("combining the Redis cache with Postgres")?,
                );
                (layered.clone(), Some(layered))
            }
            (Some(pg), None) => (Arc::new(self.postgres(pg).await?), None),
            (None, Some(redis)) => (Arc::new(self.redis(redis).await?), None),
            (None, None) => bail!(
                "no session store configured: pass --database-url and/or --redis-url \
                 (or set DATABASE_URL / REDIS_URL)"
            ),
        };
        Ok(Connected { store, layered })
    }
}

/// A connected store, and the layered store behind it if there is one.
pub struct Connected {
    pub store: Arc<dyn Store>,
    layered: Option<Arc<LayeredStore>>,
}

impl Connected {
    /// The layered store, when both URLs were given.
    pub fn layered(&self) -> Option<Arc<LayeredStore>> {
        self.layered.clone()
    }

    /// Call before exiting: a one-shot command must not leave stale routes in the cache
    /// unnoticed when a cache write failed.
    pub async fn finish(&self) -> anyhow::Result<()> {
        if let Some(layered) = &self.layered {
            layered.repair_cache().await.context(
                "Postgres holds the result, but the Redis cache could not be updated; \
                 re-run the command once Redis answers",
            )?;
        }
        Ok(())
    }
}
