//! Postgres store: the source of truth, blockyard's `blockyard_sessions` table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use super::{Entry, Result, Store, StoreError, StoreOptions, Sweep, validate_id};

/// Schema blockyard keeps its tables in.
pub const DEFAULT_SCHEMA: &str = "blockyard";

/// `expires_at` of a set or touch: now plus the TTL, or far future when the TTL is zero
/// (blockyard's encoding of "never expires"). `$TTL` is a float8 of seconds or NULL.
macro_rules! expires_at_sql {
    ($ttl:literal) => {
        concat!(
            "COALESCE(now() + make_interval(secs => ",
            $ttl,
            "::float8), '9999-12-31 23:59:59+00'::timestamptz)"
        )
    };
}

/// Sessions in Postgres; every statement is plain SQL against `blockyard_sessions`.
///
/// Connections set `search_path` to the configured schema, so blockyard and this store share
/// the table without schema-qualified names.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    options: StoreOptions,
}

impl PostgresStore {
    /// Connects to `url` using tables in `schema` (`DEFAULT_SCHEMA` unless told otherwise).
    ///
    /// Fails fast with a one-line error when the URL is malformed or the server cannot be
    /// reached; the error never contains the password.
    pub async fn connect(url: &str, schema: &str, options: StoreOptions) -> Result<Self> {
        validate_schema(schema)?;
        options.validate()?;
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("invalid database URL: {e}")))?
            .application_name("session-operator")
            .options([("search_path", format!("{schema},public"))]);
        // One direct connection first: the pool would retry until its timeout and then report
        // only "timed out", hiding why (refused, bad password, unknown database).
        PgConnection::connect_with(&connect).await?.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(connect)
            .await?;
        Ok(Self { pool, options })
    }

    /// A store over an existing pool whose connections already use the right `search_path`.
    pub fn from_pool(pool: PgPool, options: StoreOptions) -> Self {
        Self { pool, options }
    }

    /// The connection pool (for migrations and tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the schema if needed and applies `migrations/`. Safe to run against a database
    /// where blockyard already created the table, and safe to run concurrently.
    pub async fn migrate(&self, schema: &str) -> Result<()> {
        validate_schema(schema)?;
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.create_schema(schema.to_string());
        migrator.dangerous_set_table_name(format!("{schema}.session_operator_migrations"));
        migrator.run(&self.pool).await?;
        Ok(())
    }

    fn ttl_secs(&self) -> Option<f64> {
        self.options.expiry_ttl().map(|d| d.as_secs_f64())
    }

    /// Runs `sql` (which takes `$1` = worker, `$2` = limit, optionally `$3`) in batches until a
    /// batch touches no row; bounded batches keep row locks short.
    ///
    /// A short batch does not mean the work is done: rows a proxy changed while the batch waited
    /// for their locks drop out of it. Batches pick ids with `id = ANY(ARRAY(subquery))`, a
    /// primary-key lookup that follows concurrently updated rows (`id IN (subquery)` would
    /// hash-join against a full table scan, making every batch O(table)). The subquery's
    /// `FOR UPDATE` re-checks its condition on the latest row version and holds the lock, so the
    /// outer statement needs no condition of its own (one would tempt the planner into scanning
    /// by that column instead of the primary key).
    async fn batched(&self, sql: &'static str, worker: &str, extra: Option<&str>) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = self
                .batch_ids(sql, worker, extra, self.options.batch())
                .await?
                .len() as u64;
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }

    /// One batch of `sql` (`$1` = worker, `$2` = limit, optionally `$3`; `RETURNING id`).
    async fn batch_ids(
        &self,
        sql: &'static str,
        worker: &str,
        extra: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        let mut query = sqlx::query_scalar(sql)
            .bind(worker)
            .bind(limit.max(1) as i64);
        if let Some(extra) = extra {
            query = query.bind(extra);
        }
        Ok(query.fetch_all(&self.pool).await?)
    }
}

/// Deletes one batch of a worker's rows, expired or not.
const DELETE_WORKER_BATCH: &str = "DELETE FROM blockyard_sessions WHERE id = ANY(ARRAY(
         SELECT id FROM blockyard_sessions WHERE worker_id = $1 LIMIT $2 FOR UPDATE))
     RETURNING id";

/// Moves one batch of a worker's rows to `$3`. Expired but unswept rows move too: blockyard's
/// `Get` has no expiry filter, so they still route requests until the sweep removes them.
const REROUTE_BATCH: &str = "UPDATE blockyard_sessions SET worker_id = $3 WHERE id = ANY(ARRAY(
         SELECT id FROM blockyard_sessions WHERE worker_id = $1 LIMIT $2 FOR UPDATE))
     RETURNING id";

/// The schema goes into `search_path` unquoted, so only plain lower-case identifiers are allowed.
fn validate_schema(schema: &str) -> Result<()> {
    let mut chars = schema.chars();
    let ok = schema.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Config(format!(
            "schema {schema:?} must be a lower-case SQL identifier ([a-z_][a-z0-9_]*, at most 63 bytes)"
        )))
    }
}

type Row = (String, String, String, DateTime<Utc>);

fn entry_of((_, worker_id, user_sub, last_access): &Row) -> Entry {
    Entry {
        worker_id: worker_id.clone(),
        user_sub: user_sub.clone(),
        last_access: *last_access,
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, id: &str) -> Result<Option<Entry>> {
        validate_id("session id", id)?;
        let row: Option<(String, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT worker_id, user_sub, last_access FROM blockyard_sessions
             WHERE id = $1 AND expires_at > now()",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(worker_id, user_sub, last_access)| Entry {
            worker_id,
            user_sub,
            last_access,
        }))
    }

    async fn set(&self, id: &str, entry: &Entry) -> Result<()> {
        validate_id("session id", id)?;
        validate_id("worker id", &entry.worker_id)?;
        sqlx::query(concat!(
            "INSERT INTO blockyard_sessions (id, worker_id, user_sub, last_access, expires_at)
             VALUES ($1, $2, $3, $4, ",
            expires_at_sql!("$5"),
            ")
             ON CONFLICT (id) DO UPDATE SET worker_id = EXCLUDED.worker_id,
                 user_sub = EXCLUDED.user_sub, last_access = EXCLUDED.last_access,
                 expires_at = EXCLUDED.expires_at"
        ))
        .bind(id)
        .bind(&entry.worker_id)
        .bind(&entry.user_sub)
        .bind(entry.last_access)
        .bind(self.ttl_secs())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn touch(&self, id: &str) -> Result<bool> {
        validate_id("session id", id)?;
        let done = sqlx::query(concat!(
            "UPDATE blockyard_sessions
             SET last_access = date_trunc('second', now()), expires_at = ",
            expires_at_sql!("$2"),
            " WHERE id = $1 AND expires_at > now()"
        ))
        .bind(id)
        .bind(self.ttl_secs())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete(&self, id: &str) -> Result<bool> {
        validate_id("session id", id)?;
        let done = sqlx::query("DELETE FROM blockyard_sessions WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_many(&self, ids: &[String]) -> Result<u64> {
        for id in ids {
            validate_id("session id", id)?;
        }
        let mut total = 0;
        for chunk in ids.chunks(self.options.batch()) {
            total += sqlx::query("DELETE FROM blockyard_sessions WHERE id = ANY($1)")
                .bind(chunk)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(total)
    }

    async fn delete_by_worker(&self, worker_id: &str) -> Result<u64> {
        validate_id("worker id", worker_id)?;
        self.batched(DELETE_WORKER_BATCH, worker_id, None).await
    }

    async fn delete_worker_batch(&self, worker_id: &str, limit: usize) -> Result<Vec<String>> {
        validate_id("worker id", worker_id)?;
        self.batch_ids(DELETE_WORKER_BATCH, worker_id, None, limit)
            .await
    }

    async fn count_for_worker(&self, worker_id: &str) -> Result<u64> {
        self.count_for_workers(&[worker_id.to_string()]).await
    }

    async fn count_for_workers(&self, worker_ids: &[String]) -> Result<u64> {
        for w in worker_ids {
            validate_id("worker id", w)?;
        }
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM blockyard_sessions
             WHERE worker_id = ANY($1) AND expires_at > now()",
        )
        .bind(worker_ids)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as u64)
    }

    async fn counts_by_worker(&self) -> Result<BTreeMap<String, u64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT worker_id, count(*) FROM blockyard_sessions
             WHERE expires_at > now() GROUP BY worker_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(w, n)| (w, n as u64)).collect())
    }

    async fn reroute_worker(&self, from: &str, to: &str) -> Result<u64> {
        validate_id("worker id", from)?;
        validate_id("worker id", to)?;
        if from == to {
            return self.count_for_worker(from).await;
        }
        self.batched(REROUTE_BATCH, from, Some(to)).await
    }

    async fn reroute_batch(&self, from: &str, to: &str, limit: usize) -> Result<Vec<String>> {
        validate_id("worker id", from)?;
        validate_id("worker id", to)?;
        if from == to {
            return Ok(Vec::new());
        }
        self.batch_ids(REROUTE_BATCH, from, Some(to), limit).await
    }

    /// A skip scan over the `worker_id` index (recursive CTE, one index probe per worker):
    /// O(workers · log sessions), where `GROUP BY worker_id` reads every row. Rows that expired
    /// but were not swept yet count: blockyard still routes requests by them.
    async fn workers_with_sessions(&self) -> Result<BTreeSet<String>> {
        let workers: Vec<String> = sqlx::query_scalar(
            "WITH RECURSIVE w(worker_id) AS (
                 (SELECT worker_id FROM blockyard_sessions ORDER BY worker_id LIMIT 1)
                 UNION ALL
                 SELECT (SELECT s.worker_id FROM blockyard_sessions s
                         WHERE s.worker_id > w.worker_id ORDER BY s.worker_id LIMIT 1)
                 FROM w WHERE w.worker_id IS NOT NULL
             )
             SELECT worker_id FROM w WHERE worker_id IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(workers.into_iter().collect())
    }

    async fn entries_for_worker(&self, worker_id: &str) -> Result<HashMap<String, Entry>> {
        validate_id("worker id", worker_id)?;
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, worker_id, user_sub, last_access FROM blockyard_sessions
             WHERE worker_id = $1 AND expires_at > now()",
        )
        .bind(worker_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| (row.0.clone(), entry_of(row)))
            .collect())
    }

    async fn sweep_batch(&self, sweep: Sweep<'_>, limit: usize) -> Result<Vec<String>> {
        if let Sweep::Idle {
            workers: Some(workers),
            ..
        } = sweep
        {
            for w in workers {
                validate_id("worker id", w)?;
            }
        }
        // Sweeps pick rows by `ctid` (twice as fast per batch as by `id`): a row that a proxy
        // updated between the statement's snapshot and our lock is simply not deleted by this
        // batch and is found again by the next one.
        // SKIP LOCKED: rows a proxy is touching right now are left for the next batch instead of
        // making the sweep (and everyone queued behind it) wait. ORDER BY walks the index, so
        // each batch skips the rows earlier batches deleted instead of rescanning them in the
        // heap (a sequential scan made 1M rows ten times slower).
        let ids = match sweep {
            Sweep::Expired => {
                sqlx::query_scalar(
                    "DELETE FROM blockyard_sessions WHERE ctid = ANY(ARRAY(
                         SELECT ctid FROM blockyard_sessions WHERE expires_at <= now()
                         ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED))
                     RETURNING id",
                )
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?
            }
            Sweep::Idle { max_age, workers } => {
                // `last_access` is written in whole seconds (blockyard's precision): a session
                // stored with second S may have been used until S + 1 s, hence the extra second.
                let age = self.options.idle_cutoff_age(max_age).as_secs_f64();
                sqlx::query_scalar(
                    "DELETE FROM blockyard_sessions WHERE ctid = ANY(ARRAY(
                         SELECT ctid FROM blockyard_sessions
                         WHERE last_access <= now() - make_interval(secs => $1::float8 + 1)
                           AND ($2::text[] IS NULL OR worker_id = ANY($2))
                         ORDER BY last_access LIMIT $3 FOR UPDATE SKIP LOCKED))
                     RETURNING id",
                )
                .bind(age)
                .bind(workers)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?
            }
        };
        Ok(ids)
    }

    fn options(&self) -> &StoreOptions {
        &self.options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        assert!(validate_schema("blockyard").is_ok());
        assert!(validate_schema("_t_123").is_ok());
        for bad in ["", "Blockyard", "a-b", "x;drop", "1abc", &"a".repeat(64)] {
            assert!(validate_schema(bad).is_err(), "{bad:?} accepted");
        }
    }
}
