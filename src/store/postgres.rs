//! Postgres store: the source of truth, blockyard's `blockyard_sessions` table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection};

use super::fencing::fenced;
use super::{
    CacheRepair, Entry, Fencing, Grant, RepairKind, Result, Store, StoreError, StoreOptions, Sweep,
    validate_id,
};

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

/// Runs one mutating statement (`$body`, with `$conn` as its executor) with lock-timeout retries;
/// in a fenced store, inside a transaction that proves the epoch (see [`PostgresStore::begin`]
/// and [`PostgresStore::prove_epoch`]). Every attempt asks the fence again, so a retry never
/// runs past the leader's deadline.
macro_rules! mutate {
    ($self:ident, $what:expr, |$conn:ident| $body:expr) => {
        $self
            .with_lock_retries($what, || async move {
                match $self.fencing.get() {
                    None => {
                        let $conn = &$self.pool;
                        Ok::<_, StoreError>($body)
                    }
                    Some(fencing) => {
                        let grant = fencing.grant()?;
                        let mut tx = $self.begin(grant).await?;
                        let out = {
                            let $conn = &mut *tx;
                            $body
                        };
                        $self.prove_epoch(&mut tx, fencing.scope(), grant).await?;
                        tx.commit().await?;
                        Ok(out)
                    }
                }
            })
            .await
    };
}

/// Settings of the Postgres store beyond [`StoreOptions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Schema of `blockyard_sessions` (blockyard's default: `blockyard`).
    pub schema: String,
    /// Longest wait for a lock per statement (`lock_timeout`): a proxy holding a session's row
    /// lock (idle in transaction) must not stall a reroute or sweep indefinitely.
    pub lock_timeout: Duration,
    /// Longest run of any statement (`statement_timeout`); migrations are exempt.
    pub statement_timeout: Duration,
    /// How often a batch that hit `lock_timeout` is retried before the operation fails.
    pub lock_retries: u32,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            schema: DEFAULT_SCHEMA.to_string(),
            lock_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(60),
            lock_retries: 3,
        }
    }
}

/// Sessions in Postgres; every statement is plain SQL against `blockyard_sessions`, qualified
/// with its schema, so a table of the same name elsewhere (`public`) is never used by mistake.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    options: StoreOptions,
    pg: PostgresOptions,
    /// `"schema".blockyard_sessions`.
    table: String,
    /// `"schema".session_operator_epochs`.
    epochs: String,
    /// `"schema"`, for the operator's other tables.
    schema: String,
    /// Set once by the operator: mutations then prove its epoch (see [`Fencing`]).
    fencing: Arc<OnceLock<Arc<dyn Fencing>>>,
    /// For a direct connection that tells why the pool cannot connect.
    probe: Probe,
}

/// Connection options kept for [`PostgresStore::explain`]; never printed (they hold the
/// password).
#[derive(Clone)]
struct Probe(PgConnectOptions);

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Probe")
    }
}

/// How long the pool waits for a connection before the store looks for the reason.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the direct connection that looks for the reason may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl PostgresStore {
    /// Connects to `url` using tables in `schema` (`DEFAULT_SCHEMA` unless told otherwise),
    /// with the default timeouts of [`PostgresOptions`].
    ///
    /// Fails fast with a one-line error when the URL is malformed or the server cannot be
    /// reached; the error never contains the password.
    pub async fn connect(url: &str, schema: &str, options: StoreOptions) -> Result<Self> {
        let pg = PostgresOptions {
            schema: schema.to_string(),
            ..PostgresOptions::default()
        };
        Self::connect_with(url, pg, options).await
    }

    /// Connects to `url` with explicit Postgres settings.
    pub async fn connect_with(
        url: &str,
        pg: PostgresOptions,
        options: StoreOptions,
    ) -> Result<Self> {
        validate_schema(&pg.schema)?;
        options.validate()?;
        super::options::check_postgres_url(url)?;
        let millis = super::options::postgres_timeout;
        // search_path holds only the schema, so the migrations' unqualified names resolve there
        // and nowhere else.
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("invalid database URL: {e}")))?
            .application_name("session-operator")
            .options([
                ("search_path", quote_ident(&pg.schema)),
                ("lock_timeout", millis(pg.lock_timeout)),
                ("statement_timeout", millis(pg.statement_timeout)),
            ]);
        // One direct connection first: the pool would retry until its timeout and then report
        // only "timed out", hiding why (refused, bad password, unknown database).
        PgConnection::connect_with(&connect).await?.close().await?;
        let probe = Probe(connect.clone());
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(connect)
            .await?;
        let table = format!("{}.blockyard_sessions", quote_ident(&pg.schema));
        let epochs = format!("{}.session_operator_epochs", quote_ident(&pg.schema));
        let schema = quote_ident(&pg.schema);
        Ok(Self {
            pool,
            options,
            pg,
            table,
            epochs,
            schema,
            fencing: Arc::default(),
            probe,
        })
    }

    /// The same table and pool with other store options (e.g. another touch window).
    pub fn with_options(&self, options: StoreOptions) -> Result<Self> {
        options.validate()?;
        Ok(Self {
            options,
            ..self.clone()
        })
    }

    /// The connection pool (for migrations and tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `sql` with `blockyard_sessions` qualified by the configured schema.
    fn sql(&self, sql: &str) -> AssertSqlSafe<String> {
        AssertSqlSafe(sql.replace("blockyard_sessions", &self.table))
    }

    /// Creates the schema if needed and applies `migrations/`. Safe to run against a database
    /// where blockyard already created the table, and safe to run concurrently.
    ///
    /// Refuses to create the table when `blockyard_sessions` exists only in `blockyard` or
    /// `public` (where blockyard keeps it) and not in `schema`: an empty table there would
    /// silently hide the sessions proxies use.
    pub async fn migrate(&self, schema: &str) -> Result<()> {
        validate_schema(schema)?;
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relname = 'blockyard_sessions' AND c.relkind IN ('r', 'p')
             ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?;
        let elsewhere: Vec<&String> = found
            .iter()
            .filter(|n| n.as_str() == DEFAULT_SCHEMA || n.as_str() == "public")
            .collect();
        if !found.iter().any(|n| n == schema) && !elsewhere.is_empty() {
            let names: Vec<String> = elsewhere.iter().map(|n| format!("{n:?}")).collect();
            return Err(StoreError::Config(format!(
                "blockyard_sessions exists in schema {} but not in {schema:?}; refusing to create \
                 an empty table that would hide it. Pass --schema {} (SESSION_SCHEMA) to use it",
                names.join(", "),
                elsewhere[0]
            )));
        }
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.create_schema(quote_ident(schema));
        migrator.dangerous_set_table_name(format!(
            "{}.session_operator_migrations",
            quote_ident(schema)
        ));
        // Index builds on a large table may take longer than the statement timeout.
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await?;
        let migrated = migrator.run(&mut *conn).await;
        sqlx::query("RESET statement_timeout")
            .execute(&mut *conn)
            .await?;
        migrated?;
        Ok(())
    }

    /// Runs `attempt` again when it failed on `lock_timeout` (a row held by another
    /// transaction), up to [`PostgresOptions::lock_retries`] times, then fails with a message
    /// that says what to look for.
    async fn with_lock_retries<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut + Send,
        Fut: std::future::Future<Output = Result<T>> + Send,
        T: Send,
    {
        let mut tries = 0;
        loop {
            match attempt().await {
                Err(StoreError::Postgres(err)) if is_lock_timeout(&err) => {
                    tries += 1;
                    if tries > self.pg.lock_retries {
                        return Err(StoreError::Timeout(format!(
                            "{what}: rows stayed locked by another transaction for longer than \
                             the lock timeout ({:?}) in {tries} attempts; look for sessions \
                             'idle in transaction' in pg_stat_activity",
                            self.pg.lock_timeout
                        )));
                    }
                    tracing::warn!(what, tries, "rows locked by another transaction; retrying");
                    tokio::time::sleep(Duration::from_millis(100) * tries).await;
                }
                Err(StoreError::Postgres(err)) if is_statement_timeout(&err) => {
                    return Err(StoreError::Timeout(format!(
                        "{what}: a statement ran longer than the statement timeout ({:?}) or \
                         the time left to the leader's fence",
                        self.pg.statement_timeout
                    )));
                }
                Err(StoreError::Postgres(err)) if is_idle_timeout(&err) => {
                    return Err(fenced(format!(
                        "{what}: Postgres ended the transaction because this process did not \
                         finish it before its fence deadline (was it paused?)"
                    )));
                }
                Err(err) => return Err(self.explain(err).await),
                Ok(out) => return Ok(out),
            }
        }
    }

    /// Replaces the pool's "timed out while waiting for an open connection" with the reason:
    /// a direct connection attempt says whether the server refuses connections, rejects the
    /// credentials, fails TLS or does not answer; when it succeeds, every connection was busy.
    async fn explain(&self, err: StoreError) -> StoreError {
        if !matches!(err, StoreError::Postgres(sqlx::Error::PoolTimedOut)) {
            return err;
        }
        match tokio::time::timeout(PROBE_TIMEOUT, PgConnection::connect_with(&self.probe.0)).await {
            Ok(Err(cause)) => StoreError::Postgres(cause),
            Err(_) => StoreError::Timeout(format!(
                "postgres: no connection within {ACQUIRE_TIMEOUT:?}, and a new connection did not \
                 answer within {PROBE_TIMEOUT:?} (server down or network partitioned?)"
            )),
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                StoreError::Timeout(format!(
                    "postgres: every pooled connection stayed busy for {ACQUIRE_TIMEOUT:?} \
                     (the server accepts new connections)"
                ))
            }
        }
    }

    /// A transaction for one fenced mutation. Its lock, statement and idle timeouts are bounded
    /// by the time left on the grant: a statement that waits for a lock, or a client frozen
    /// between two statements, cannot hold the transaction past the leader's deadline. The
    /// epoch is also recorded as `session_operator.epoch`, so an audit trigger can tell which
    /// term made a change.
    async fn begin(&self, grant: Grant) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        if grant.left.is_zero() {
            return Err(fenced("the leader's deadline has passed"));
        }
        let millis = |d: Duration| format!("{}ms", d.as_millis().max(1));
        let bound = |d: Duration| millis(d.min(grant.left));
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "SELECT set_config('lock_timeout', $1, true),
                    set_config('statement_timeout', $2, true),
                    set_config('idle_in_transaction_session_timeout', $3, true),
                    set_config('session_operator.epoch', $4, true)",
        )
        .bind(bound(self.pg.lock_timeout))
        .bind(bound(self.pg.statement_timeout))
        .bind(millis(grant.left))
        .bind(grant.epoch.to_string())
        .execute(&mut *tx)
        .await?;
        Ok(tx)
    }

    /// The last statement of a fenced transaction; see [`prove_epoch`].
    async fn prove_epoch(&self, tx: &mut PgConnection, scope: &str, grant: Grant) -> Result<()> {
        prove_epoch(&self.epochs, tx, scope, grant).await
    }

    /// A transaction for mutations of the operator's own that are not session batches (e.g.
    /// durable worker records): in a fenced store it carries the same guarantees as every
    /// session mutation — timeouts bounded by the fence, and [`FencedTransaction::commit`]
    /// commits only while this process's epoch is current. Unfenced, it is a plain transaction.
    pub async fn begin_mutation(&self) -> Result<FencedTransaction> {
        match self.fencing.get() {
            None => Ok(FencedTransaction {
                tx: self.pool.begin().await?,
                proof: None,
            }),
            Some(fencing) => {
                let grant = fencing.grant()?;
                Ok(FencedTransaction {
                    tx: self.begin(grant).await?,
                    proof: Some((self.epochs.clone(), fencing.scope().to_string(), grant)),
                })
            }
        }
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
        mutate!(self, &format!("sessions of worker {worker:?}"), |conn| {
            let mut query = sqlx::query_scalar(self.sql(sql))
                .bind(worker)
                .bind(limit.max(1) as i64);
            if let Some(extra) = extra {
                query = query.bind(extra);
            }
            query.fetch_all(conn).await?
        })
    }
}

/// A transaction of [`PostgresStore::begin_mutation`].
pub struct FencedTransaction {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    /// Epochs table, scope and grant to prove at commit (fenced stores).
    proof: Option<(String, String, Grant)>,
}

impl FencedTransaction {
    /// The connection to run statements on.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Proves the epoch (fenced stores) and commits; a superseded epoch rolls everything back
    /// and fails with [`StoreError::Fenced`].
    pub async fn commit(mut self) -> Result<()> {
        if let Some((epochs, scope, grant)) = &self.proof
            && let Err(err) = prove_epoch(epochs, &mut self.tx, scope, *grant).await
        {
            let _ = self.tx.rollback().await;
            return Err(err);
        }
        self.tx.commit().await?;
        Ok(())
    }
}

/// The last statement of a fenced transaction: the scope's epoch in `epochs` must still be the
/// granted one. `FOR SHARE` makes a new leader's increment wait for this transaction to end, so
/// no change proven here can commit after the increment.
async fn prove_epoch(epochs: &str, tx: &mut PgConnection, scope: &str, grant: Grant) -> Result<()> {
    let current: Option<(i64, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT epoch, holder FROM {epochs} WHERE scope = $1 FOR SHARE"
    )))
    .bind(scope)
    .fetch_optional(&mut *tx)
    .await?;
    match current {
        Some((epoch, _)) if epoch == grant.epoch => Ok(()),
        Some((epoch, holder)) => Err(fenced(format!(
            "leadership epoch {} of {scope} was superseded by epoch {epoch} ({holder}); \
             the change was rolled back",
            grant.epoch
        ))),
        None => Err(fenced(format!(
            "no leadership epoch recorded for {scope}; the change was rolled back"
        ))),
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

/// [`DELETE_WORKER_BATCH`] that leaves rows another transaction holds locked for later.
const DELETE_WORKER_BATCH_SKIP_LOCKED: &str = "DELETE FROM blockyard_sessions WHERE id = ANY(ARRAY(
         SELECT id FROM blockyard_sessions WHERE worker_id = $1 LIMIT $2 FOR UPDATE SKIP LOCKED))
     RETURNING id";

/// [`REROUTE_BATCH`] that leaves rows another transaction holds locked for later.
const REROUTE_BATCH_SKIP_LOCKED: &str =
    "UPDATE blockyard_sessions SET worker_id = $3 WHERE id = ANY(ARRAY(
         SELECT id FROM blockyard_sessions WHERE worker_id = $1 LIMIT $2 FOR UPDATE SKIP LOCKED))
     RETURNING id";

/// Schema names are plain lower-case identifiers (always quoted in SQL, so reserved words such
/// as `user` work); `pg_*` schemas (`pg_temp`, `pg_catalog`) and `information_schema` belong to
/// Postgres itself and are rejected.
fn validate_schema(schema: &str) -> Result<()> {
    let mut chars = schema.chars();
    let ok = schema.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        return Err(StoreError::Config(format!(
            "schema {schema:?} must be a lower-case SQL identifier ([a-z_][a-z0-9_]*, at most 63 bytes)"
        )));
    }
    if schema.starts_with("pg_") || schema == "information_schema" {
        return Err(StoreError::Config(format!(
            "schema {schema:?} is reserved by Postgres; use a schema of your own (default {DEFAULT_SCHEMA:?})"
        )));
    }
    Ok(())
}

/// A schema name as a quoted identifier (validated names contain no quote).
fn quote_ident(schema: &str) -> String {
    format!("\"{schema}\"")
}

fn sqlstate(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(sqlx::error::DatabaseError::code)
        .map(std::borrow::Cow::into_owned)
}

/// `lock_not_available`: `lock_timeout` expired.
fn is_lock_timeout(err: &sqlx::Error) -> bool {
    sqlstate(err).as_deref() == Some("55P03")
}

/// `idle_in_transaction_session_timeout`: the server ended a transaction its client left idle.
fn is_idle_timeout(err: &sqlx::Error) -> bool {
    sqlstate(err).as_deref() == Some("25P03")
}

/// `query_canceled`: `statement_timeout` expired.
fn is_statement_timeout(err: &sqlx::Error) -> bool {
    sqlstate(err).as_deref() == Some("57014")
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
        let row: Option<(String, String, DateTime<Utc>)> = sqlx::query_as(self.sql(
            "SELECT worker_id, user_sub, last_access FROM blockyard_sessions
             WHERE id = $1 AND expires_at > now()",
        ))
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
        mutate!(self, "set", |conn| {
            sqlx::query(self.sql(concat!(
                "INSERT INTO blockyard_sessions (id, worker_id, user_sub, last_access, expires_at)
                 VALUES ($1, $2, $3, $4, ",
                expires_at_sql!("$5"),
                ")
                 ON CONFLICT (id) DO UPDATE SET worker_id = EXCLUDED.worker_id,
                     user_sub = EXCLUDED.user_sub, last_access = EXCLUDED.last_access,
                     expires_at = EXCLUDED.expires_at"
            )))
            .bind(id)
            .bind(&entry.worker_id)
            .bind(&entry.user_sub)
            .bind(entry.last_access)
            .bind(self.ttl_secs())
            .execute(conn)
            .await?
        })?;
        Ok(())
    }

    async fn touch(&self, id: &str) -> Result<bool> {
        validate_id("session id", id)?;
        let done = mutate!(self, "touch", |conn| {
            sqlx::query(self.sql(concat!(
                "UPDATE blockyard_sessions
                 SET last_access = date_trunc('second', now()), expires_at = ",
                expires_at_sql!("$2"),
                " WHERE id = $1 AND expires_at > now()"
            )))
            .bind(id)
            .bind(self.ttl_secs())
            .execute(conn)
            .await?
        })?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete(&self, id: &str) -> Result<bool> {
        validate_id("session id", id)?;
        let done = mutate!(self, "delete", |conn| {
            sqlx::query(self.sql("DELETE FROM blockyard_sessions WHERE id = $1"))
                .bind(id)
                .execute(conn)
                .await?
        })?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_many(&self, ids: &[String]) -> Result<u64> {
        for id in ids {
            validate_id("session id", id)?;
        }
        let mut total = 0;
        for chunk in ids.chunks(self.options.batch()) {
            total += mutate!(self, "delete_many", |conn| {
                sqlx::query(self.sql("DELETE FROM blockyard_sessions WHERE id = ANY($1)"))
                    .bind(chunk)
                    .execute(conn)
                    .await?
            })?
            .rows_affected();
        }
        Ok(total)
    }

    /// First everything not locked by another transaction, then the locked rows (waiting for
    /// them, within the lock timeout and its retries).
    async fn delete_by_worker(&self, worker_id: &str) -> Result<u64> {
        validate_id("worker id", worker_id)?;
        Ok(self
            .batched(DELETE_WORKER_BATCH_SKIP_LOCKED, worker_id, None)
            .await?
            + self.batched(DELETE_WORKER_BATCH, worker_id, None).await?)
    }

    async fn delete_unlocked_batch(&self, worker_id: &str, limit: usize) -> Result<Vec<String>> {
        validate_id("worker id", worker_id)?;
        self.batch_ids(DELETE_WORKER_BATCH_SKIP_LOCKED, worker_id, None, limit)
            .await
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
        let n: std::result::Result<i64, sqlx::Error> = sqlx::query_scalar(self.sql(
            "SELECT count(*) FROM blockyard_sessions
             WHERE worker_id = ANY($1) AND expires_at > now()",
        ))
        .bind(worker_ids)
        .fetch_one(&self.pool)
        .await;
        let n: i64 = match n {
            Ok(v) => v,
            Err(e) => return Err(self.explain(e.into()).await),
        };
        Ok(n as u64)
    }

    async fn counts_by_worker(&self) -> Result<BTreeMap<String, u64>> {
        let rows: std::result::Result<Vec<(String, i64)>, sqlx::Error> = sqlx::query_as(self.sql(
            "SELECT worker_id, count(*) FROM blockyard_sessions
             WHERE expires_at > now() GROUP BY worker_id",
        ))
        .fetch_all(&self.pool)
        .await;
        let rows = match rows {
            Ok(v) => v,
            Err(e) => return Err(self.explain(e.into()).await),
        };
        Ok(rows.into_iter().map(|(w, n)| (w, n as u64)).collect())
    }

    async fn reroute_worker(&self, from: &str, to: &str) -> Result<u64> {
        validate_id("worker id", from)?;
        validate_id("worker id", to)?;
        if from == to {
            return self.count_for_worker(from).await;
        }
        // Like delete_by_worker: the unlocked rows first, then the locked ones.
        Ok(self
            .batched(REROUTE_BATCH_SKIP_LOCKED, from, Some(to))
            .await?
            + self.batched(REROUTE_BATCH, from, Some(to)).await?)
    }

    async fn reroute_unlocked_batch(
        &self,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        validate_id("worker id", from)?;
        validate_id("worker id", to)?;
        if from == to {
            return Ok(Vec::new());
        }
        self.batch_ids(REROUTE_BATCH_SKIP_LOCKED, from, Some(to), limit)
            .await
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
        let workers: std::result::Result<Vec<String>, sqlx::Error> = sqlx::query_scalar(self.sql(
            "WITH RECURSIVE w(worker_id) AS (
                 (SELECT worker_id FROM blockyard_sessions ORDER BY worker_id LIMIT 1)
                 UNION ALL
                 SELECT (SELECT s.worker_id FROM blockyard_sessions s
                         WHERE s.worker_id > w.worker_id ORDER BY s.worker_id LIMIT 1)
                 FROM w WHERE w.worker_id IS NOT NULL
             )
             SELECT worker_id FROM w WHERE worker_id IS NOT NULL",
        ))
        .fetch_all(&self.pool)
        .await;
        let workers = match workers {
            Ok(v) => v,
            Err(e) => return Err(self.explain(e.into()).await),
        };
        Ok(workers.into_iter().collect())
    }

    async fn ping(&self) -> Result<()> {
        match sqlx::query("SELECT 1").execute(&self.pool).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.explain(e.into()).await),
        }
    }

    async fn workers_holding(&self, worker_ids: &[String]) -> Result<BTreeSet<String>> {
        for w in worker_ids {
            validate_id("worker id", w)?;
        }
        if worker_ids.is_empty() {
            return Ok(BTreeSet::new());
        }
        // One index probe per id asked (the `worker_id` index), whatever the table holds.
        let workers: std::result::Result<Vec<String>, sqlx::Error> = sqlx::query_scalar(self.sql(
            "SELECT w FROM unnest($1::text[]) AS w
             WHERE EXISTS (SELECT 1 FROM blockyard_sessions s WHERE s.worker_id = w)",
        ))
        .bind(worker_ids)
        .fetch_all(&self.pool)
        .await;
        match workers {
            Ok(v) => Ok(v.into_iter().collect()),
            Err(e) => Err(self.explain(e.into()).await),
        }
    }

    async fn entries_for_worker(&self, worker_id: &str) -> Result<HashMap<String, Entry>> {
        validate_id("worker id", worker_id)?;
        let rows: Vec<Row> = sqlx::query_as(self.sql(
            "SELECT id, worker_id, user_sub, last_access FROM blockyard_sessions
             WHERE worker_id = $1 AND expires_at > now()",
        ))
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
            Sweep::Expired => mutate!(self, "expiry sweep", |conn| {
                sqlx::query_scalar(self.sql(
                    "DELETE FROM blockyard_sessions WHERE ctid = ANY(ARRAY(
                             SELECT ctid FROM blockyard_sessions WHERE expires_at <= now()
                             ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED))
                         RETURNING id",
                ))
                .bind(limit as i64)
                .fetch_all(conn)
                .await?
            })?,
            Sweep::Idle { max_age, workers } => {
                // `last_access` is written in whole seconds (blockyard's precision): a session
                // stored with second S may have been used until S + 1 s, hence the extra second.
                let age = self.options.idle_cutoff_age(max_age).as_secs_f64();
                mutate!(self, "idle sweep", |conn| {
                    sqlx::query_scalar(self.sql(
                        "DELETE FROM blockyard_sessions WHERE ctid = ANY(ARRAY(
                             SELECT ctid FROM blockyard_sessions
                             WHERE last_access <= now() - make_interval(secs => $1::float8 + 1)
                               AND ($2::text[] IS NULL OR worker_id = ANY($2))
                             ORDER BY last_access LIMIT $3 FOR UPDATE SKIP LOCKED))
                         RETURNING id",
                    ))
                    .bind(age)
                    .bind(workers)
                    .bind(limit as i64)
                    .fetch_all(conn)
                    .await?
                })?
            }
        };
        Ok(ids)
    }

    fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Increments the scope's row of `session_operator_epochs`. The row lock waits for every
    /// transaction of the previous term that already proved its epoch (they commit first); the
    /// bounded timeouts of those transactions keep the wait short.
    async fn claim_epoch(&self, scope: &str, holder: &str) -> Result<Option<i64>> {
        let epoch: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "INSERT INTO {0} AS e (scope, epoch, holder, claimed_at) VALUES ($1, 1, $2, now())
             ON CONFLICT (scope) DO UPDATE
                 SET epoch = e.epoch + 1, holder = EXCLUDED.holder, claimed_at = now()
             RETURNING epoch",
            self.epochs
        )))
        .bind(scope)
        .bind(holder)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| match sqlstate(&e).as_deref() {
            // undefined_table: a schema migrated by an older version.
            Some("42P01") => StoreError::Config(format!(
                "{e}: {} is missing; run `session-operator migrate` (the Helm chart's \
                 migration hook) for this version before starting it",
                self.epochs
            )),
            _ => e.into(),
        })?;
        Ok(Some(epoch))
    }

    fn set_fencing(&self, fencing: Arc<dyn Fencing>) {
        if self.fencing.set(fencing).is_err() {
            tracing::warn!("the store is fenced already; keeping the first fence");
        }
    }

    /// Not fenced: marking an entry for repair, or clearing a mark after repairing it, is safe
    /// for anyone to do at any time.
    async fn record_cache_repairs(&self, kind: RepairKind, keys: &[String]) -> Result<()> {
        let all = [String::new()];
        let keys = if kind == RepairKind::All {
            &all[..]
        } else {
            keys
        };
        for chunk in keys.chunks(self.options.batch()) {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {0}.session_operator_cache_repairs (kind, key)
                 SELECT $1, unnest($2::text[])
                 ON CONFLICT (kind, key) DO UPDATE
                     SET seq = nextval('{0}.session_operator_cache_repair_seq'), marked_at = now()",
                self.schema
            )))
            .bind(kind.as_str())
            .bind(chunk)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    async fn cache_repairs(&self) -> Result<Vec<CacheRepair>> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT kind, key, seq FROM {}.session_operator_cache_repairs ORDER BY seq",
            self.schema
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(kind, key, seq)| {
                RepairKind::parse(&kind).map(|kind| CacheRepair { kind, key, seq })
            })
            .collect())
    }

    async fn clear_cache_repairs(&self, done: &[CacheRepair]) -> Result<()> {
        for chunk in done.chunks(self.options.batch()) {
            let kinds: Vec<&str> = chunk.iter().map(|r| r.kind.as_str()).collect();
            let keys: Vec<&str> = chunk.iter().map(|r| r.key.as_str()).collect();
            let seqs: Vec<i64> = chunk.iter().map(|r| r.seq).collect();
            sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {}.session_operator_cache_repairs r
                 USING unnest($1::text[], $2::text[], $3::bigint[]) AS d(kind, key, seq)
                 WHERE r.kind = d.kind AND r.key = d.key AND r.seq = d.seq",
                self.schema
            )))
            .bind(kinds)
            .bind(keys)
            .bind(seqs)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        assert!(validate_schema("blockyard").is_ok());
        assert!(validate_schema("_t_123").is_ok());
        assert!(validate_schema("user").is_ok(), "reserved words are quoted");
        for bad in [
            "",
            "Blockyard",
            "a-b",
            "x;drop",
            "1abc",
            &"a".repeat(64),
            "pg_temp",
            "pg_catalog",
            "information_schema",
        ] {
            assert!(validate_schema(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(quote_ident("user"), "\"user\"");
    }
}
