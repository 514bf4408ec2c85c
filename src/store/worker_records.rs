//! The operator's durable memory of each policy's workers.
//!
//! The planner learns which worker ids belong to a policy from the pods it sees. A worker whose
//! pod vanished while no operator ran (or that the previous leader saw depart) is invisible to a
//! fresh process unless its id can be attributed by name (a Deployment's or StatefulSet's pod
//! name). These records keep that knowledge in the store, next to the sessions:
//!
//! - Postgres: table `session_operator_workers` in the operator's schema (migration
//!   `20261203000010_worker_records.sql`);
//! - Redis only: one hash per policy, `{prefix}operator-workers:{policy}`, field = worker id,
//!   value = the record as JSON;
//! - memory: for the embedded store (demo, tests), lost with the process like the sessions.
//!
//! Records are written when a policy's set of workers changes (a worker appears, departs or is
//! forgotten), never on every pass, and only by the leader (the caller fences the writes).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use super::{PostgresStore, Result, StoreError};

/// One worker a policy selected, as remembered across operator restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub worker_id: String,
    /// The pod that held the id when last seen.
    pub pod: String,
    /// The pod's workload family (`Deployment/web`, `StatefulSet/db`, `Generated/job-`), which
    /// replacement candidates are preferred from.
    pub family: Option<String>,
    /// The pod's creationTimestamp.
    pub created: Option<DateTime<Utc>>,
    /// When the operator first recorded the worker.
    pub first_seen: DateTime<Utc>,
    /// When the record was last written while the pod existed.
    pub last_seen: DateTime<Utc>,
    /// When the operator saw it depart; `None` while it serves.
    pub departed: Option<DateTime<Utc>>,
}

/// Where the records of every policy live. `policy` is `namespace/name`.
#[async_trait]
pub trait WorkerRecords: Send + Sync {
    /// Every record of a policy.
    async fn load(&self, policy: &str) -> Result<Vec<WorkerRecord>>;

    /// Writes `upsert` and removes the records of `remove`, in one transaction (Postgres) or
    /// one MULTI (Redis).
    async fn apply(&self, policy: &str, upsert: &[WorkerRecord], remove: &[String]) -> Result<()>;
}

/// Records in Postgres, table `session_operator_workers` of the operator's schema.
#[derive(Debug, Clone)]
pub struct PgWorkerRecords {
    /// The session store's Postgres: writes are fenced mutations of its leadership epoch.
    store: PostgresStore,
    table: String,
}

impl PgWorkerRecords {
    /// `schema` must already be valid (it is the store's schema).
    pub fn new(store: PostgresStore, schema: &str) -> Self {
        Self {
            store,
            table: format!("\"{}\".session_operator_workers", schema.replace('"', "")),
        }
    }
}

type PgRow = (
    String,
    String,
    Option<String>,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

#[async_trait]
impl WorkerRecords for PgWorkerRecords {
    async fn load(&self, policy: &str) -> Result<Vec<WorkerRecord>> {
        let rows: Vec<PgRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT worker_id, pod, family, created_at, first_seen, last_seen, departed_at
             FROM {} WHERE policy = $1 ORDER BY worker_id",
            self.table
        )))
        .bind(policy)
        .fetch_all(self.store.pool())
        .await
        .map_err(StoreError::from)?;
        Ok(rows
            .into_iter()
            .map(
                |(worker_id, pod, family, created, first_seen, last_seen, departed)| WorkerRecord {
                    worker_id,
                    pod,
                    family,
                    created,
                    first_seen,
                    last_seen,
                    departed,
                },
            )
            .collect())
    }

    async fn apply(&self, policy: &str, upsert: &[WorkerRecord], remove: &[String]) -> Result<()> {
        if upsert.is_empty() && remove.is_empty() {
            return Ok(());
        }
        // A fenced transaction: a deposed leader's late write proves a superseded epoch and is
        // rolled back, like its session mutations.
        let mut tx = self.store.begin_mutation().await?;
        if !remove.is_empty() {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {} WHERE policy = $1 AND worker_id = ANY($2)",
                self.table
            )))
            .bind(policy)
            .bind(remove)
            .execute(tx.conn())
            .await
            .map_err(StoreError::from)?;
        }
        if !upsert.is_empty() {
            let col = |f: fn(&WorkerRecord) -> String| upsert.iter().map(f).collect::<Vec<_>>();
            let ids = col(|r| r.worker_id.clone());
            let pods = col(|r| r.pod.clone());
            let families: Vec<Option<String>> = upsert.iter().map(|r| r.family.clone()).collect();
            let created: Vec<Option<DateTime<Utc>>> = upsert.iter().map(|r| r.created).collect();
            let first: Vec<DateTime<Utc>> = upsert.iter().map(|r| r.first_seen).collect();
            let last: Vec<DateTime<Utc>> = upsert.iter().map(|r| r.last_seen).collect();
            let departed: Vec<Option<DateTime<Utc>>> = upsert.iter().map(|r| r.departed).collect();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {} AS w
                     (policy, worker_id, pod, family, created_at, first_seen, last_seen, departed_at)
                 SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::timestamptz[],
                                          $6::timestamptz[], $7::timestamptz[], $8::timestamptz[])
                 ON CONFLICT (policy, worker_id) DO UPDATE SET
                     pod = EXCLUDED.pod, family = EXCLUDED.family,
                     created_at = EXCLUDED.created_at, last_seen = EXCLUDED.last_seen,
                     departed_at = EXCLUDED.departed_at",
                self.table
            )))
            .bind(policy)
            .bind(ids)
            .bind(pods)
            .bind(families)
            .bind(created)
            .bind(first)
            .bind(last)
            .bind(departed)
            .execute(tx.conn())
            .await
            .map_err(StoreError::from)?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Records in Redis (deployments without Postgres): one hash per policy under the key prefix.
#[derive(Clone)]
pub struct RedisWorkerRecords {
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisWorkerRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisWorkerRecords")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisWorkerRecords {
    /// `conn` talks to the Redis that holds the sessions; `prefix` is the store's key prefix.
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_string(),
        }
    }

    /// The hash of a policy's records.
    pub fn key(&self, policy: &str) -> String {
        format!("{}operator-workers:{policy}", self.prefix)
    }
}

#[async_trait]
impl WorkerRecords for RedisWorkerRecords {
    async fn load(&self, policy: &str) -> Result<Vec<WorkerRecord>> {
        let mut conn = self.conn.clone();
        let raw: HashMap<String, String> = conn
            .hgetall(self.key(policy))
            .await
            .map_err(StoreError::Redis)?;
        let mut records = Vec::with_capacity(raw.len());
        for (id, json) in raw {
            let record: WorkerRecord =
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                    id: format!("worker record {policy}/{id}"),
                    detail: e.to_string(),
                })?;
            records.push(record);
        }
        records.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        Ok(records)
    }

    async fn apply(&self, policy: &str, upsert: &[WorkerRecord], remove: &[String]) -> Result<()> {
        if upsert.is_empty() && remove.is_empty() {
            return Ok(());
        }
        let key = self.key(policy);
        let mut pipe = redis::pipe();
        pipe.atomic();
        if !remove.is_empty() {
            pipe.hdel(&key, remove).ignore();
        }
        for record in upsert {
            let json = serde_json::to_string(record).map_err(|e| StoreError::Corrupt {
                id: format!("worker record {policy}/{}", record.worker_id),
                detail: e.to_string(),
            })?;
            pipe.hset(&key, &record.worker_id, json).ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(StoreError::Redis)?;
        Ok(())
    }
}

/// Records in process memory, for the embedded memory store.
#[derive(Debug, Default)]
pub struct MemoryWorkerRecords {
    policies: Mutex<HashMap<String, BTreeMap<String, WorkerRecord>>>,
}

#[async_trait]
impl WorkerRecords for MemoryWorkerRecords {
    async fn load(&self, policy: &str) -> Result<Vec<WorkerRecord>> {
        let policies = self
            .policies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(policies
            .get(policy)
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn apply(&self, policy: &str, upsert: &[WorkerRecord], remove: &[String]) -> Result<()> {
        let mut policies = self
            .policies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let records = policies.entry(policy.to_string()).or_default();
        for id in remove {
            records.remove(id);
        }
        for record in upsert {
            records.insert(record.worker_id.clone(), record.clone());
        }
        Ok(())
    }
}
