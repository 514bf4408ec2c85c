//! One fault scenario's world: own Postgres and Redis, a TCP proxy between the operators and
//! Redis, an emulated cluster with four workers of 250 sessions each, an audit trigger, and
//! the measurements every scenario reports.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use session_operator::store::{Entry, Store};
use sqlx::{AssertSqlSafe, PgPool};

use crate::common::ChaosProxy;
use crate::harness::{Cluster, OperatorConfig, Stores, eventually};
use crate::instances::{OwnPostgres, OwnRedis};

const RS_OLD: &str = "workers-6b7c8d9f5";
const RS_NEW: &str = "workers-5f4d3c2b1";
const WORKERS: usize = 4;
pub(crate) const PER_WORKER: usize = 250;
/// Longest a scenario may take to converge once its fault ended.
const CONVERGE_WITHIN: Duration = Duration::from_secs(90);

pub(crate) struct Scene {
    pub name: &'static str,
    pub cluster: Cluster,
    pub pg: OwnPostgres,
    pub redis: OwnRedis,
    /// Between the operators and Redis (the test's own store talks to Redis directly).
    pub proxy: ChaosProxy,
    pub stores: Stores,
    pub old: Vec<String>,
    pub new: Vec<String>,
    pub seeded: u64,
    pool: PgPool,
}

/// What a proxy would see: where sessions are, in Postgres and in Redis.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Measure {
    pub present: Option<u64>,
    pub departed: Option<u64>,
    pub stale: Option<u64>,
}

impl Scene {
    pub(crate) async fn new(name: &'static str, persistent_redis: bool) -> Self {
        let pg = OwnPostgres::start();
        let redis = OwnRedis::start(persistent_redis);
        let proxy = ChaosProxy::start(&format!("127.0.0.1:{}", redis.port)).await;
        let cluster = Cluster::start().await;
        let stores = Stores::at(&pg.url(), &redis.url()).await;
        let pool = PgPool::connect(&pg.url()).await.expect("connect");
        install_audit(&pool, &stores.schema.name).await;
        let old: Vec<String> = (0..WORKERS).map(|i| format!("{RS_OLD}-x{i:04}")).collect();
        let new: Vec<String> = (0..WORKERS).map(|i| format!("{RS_NEW}-x{i:04}")).collect();
        for pod in &old {
            cluster
                .ready_pod(pod, "worker", Some(("ReplicaSet", RS_OLD)))
                .await;
        }
        let seeded = stores.seed(&old, PER_WORKER).await;
        // Concurrent seeding lets the cache refuse some copies (their shards were invalidated
        // meanwhile): read every session once, as proxies would, so Redis holds them all.
        for w in &old {
            for i in 0..PER_WORKER {
                stores
                    .store
                    .get(&format!("s-{w}-{i}"))
                    .await
                    .expect("warm the cache");
            }
        }
        cluster
            .apply_policy(
                "workers",
                json!({"selector": {"matchLabels": {"app": "worker"}},
                       "migration": {"replacementWait": "30s"}}),
            )
            .await;
        Self {
            name,
            cluster,
            pg,
            redis,
            proxy,
            stores,
            old,
            new,
            seeded,
            pool,
        }
    }

    /// An operator against this scene's Postgres and (through the proxy) Redis.
    pub(crate) fn operator<'a>(&self, identity: &'a str) -> OperatorConfig<'a> {
        OperatorConfig {
            identity,
            database_url: Some(self.pg.url()),
            redis_url: Some(self.proxy.redis_url()),
            ..Default::default()
        }
    }

    /// Each old pod gets its replacement and is deleted (all at once, as a fast rollout).
    pub(crate) async fn rollout(&self) {
        self.replace(0..self.old.len()).await;
    }

    /// Old pods `workers` get their replacements and are deleted: a part of the rollout.
    pub(crate) async fn replace(&self, workers: std::ops::Range<usize>) {
        for (old, new) in self.old[workers.clone()].iter().zip(&self.new[workers]) {
            self.cluster
                .ready_pod(new, "worker", Some(("ReplicaSet", RS_NEW)))
                .await;
            self.cluster.delete_pod(old).await;
        }
    }

    pub(crate) async fn old_pods_gone(&self) {
        eventually(Duration::from_secs(30), "old pods removed", || async {
            let pods = self.cluster.pods().list(&Default::default()).await.ok()?;
            let names: BTreeSet<String> = pods
                .items
                .iter()
                .filter_map(|p| p.metadata.name.clone())
                .collect();
            self.old.iter().all(|o| !names.contains(o)).then_some(())
        })
        .await;
    }

    /// Waits until Postgres holds no session on a departed worker.
    pub(crate) async fn migrated_in_postgres(&self) {
        self.departed_at_most(0).await;
    }

    pub(crate) async fn departed_at_most(&self, n: u64) {
        eventually(
            Duration::from_secs(60),
            &format!("at most {n} session(s) on departed workers in Postgres"),
            || async {
                self.measure()
                    .await
                    .departed
                    .filter(|d| *d <= n)
                    .map(|_| ())
            },
        )
        .await;
    }

    /// Waits until the policy's condition `type_` has `status`; its reason and message.
    pub(crate) async fn condition(&self, type_: &str, status: &str) -> String {
        self.condition_saying(type_, status, "").await
    }

    /// Waits until the policy's condition `type_` has `status` and its message contains `text`.
    pub(crate) async fn condition_saying(&self, type_: &str, status: &str, text: &str) -> String {
        eventually(
            Duration::from_secs(60),
            &format!("{type_}={status} saying {text:?}"),
            || async {
                let policy = self.cluster.policies().get("workers").await.ok()?;
                let c = policy
                    .status?
                    .conditions
                    .into_iter()
                    .find(|c| c.type_ == type_)?;
                (c.status == status && c.message.contains(text))
                    .then_some(format!("{}: {}", c.reason, c.message))
            },
        )
        .await
    }

    /// A proxy transaction holding one row of each old worker (idle in transaction).
    pub(crate) async fn hold_one_row_of_each_old_worker(
        &self,
    ) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut tx = self.pool.begin().await.expect("begin");
        let ids: Vec<String> = self.old.iter().map(|w| format!("s-{w}-0")).collect();
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {}.blockyard_sessions SET last_access = now() WHERE id = ANY($1)",
            self.stores.schema.name
        )))
        .bind(ids)
        .execute(&mut *tx)
        .await
        .expect("lock the rows");
        tx
    }

    /// Sessions present and on departed workers (Postgres), and sessions whose Redis hash names
    /// another worker than Postgres (stale). `None` where a server does not answer.
    pub(crate) async fn measure(&self) -> Measure {
        let ready = self.cluster.ready_workers().await;
        let rows: Option<Vec<(String, String)>> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT id, worker_id FROM {}.blockyard_sessions",
            self.stores.schema.name
        )))
        .fetch_all(&self.pool)
        .await
        .ok();
        let Some(rows) = rows else {
            return Measure::default();
        };
        let present = rows.len() as u64;
        let departed = rows.iter().filter(|(_, w)| !ready.contains(w)).count() as u64;
        Measure {
            present: Some(present),
            departed: Some(departed),
            stale: self.stale_in_redis(&rows).await,
        }
    }

    async fn stale_in_redis(&self, rows: &[(String, String)]) -> Option<u64> {
        let client = redis::Client::open(self.redis.url()).ok()?;
        let mut conn = tokio::time::timeout(
            Duration::from_secs(1),
            client.get_multiplexed_async_connection(),
        )
        .await
        .ok()?
        .ok()?;
        let mut stale = 0;
        for chunk in rows.chunks(1000) {
            let mut pipe = redis::pipe();
            for (id, _) in chunk {
                pipe.hget(
                    format!("{}session:{id}", self.stores.prefix.prefix),
                    "worker_id",
                );
            }
            let cached: Vec<Option<String>> = pipe.query_async(&mut conn).await.ok()?;
            stale += chunk
                .iter()
                .zip(cached)
                .filter(|((_, worker), cached)| cached.as_ref().is_some_and(|c| c != worker))
                .count() as u64;
        }
        Some(stale)
    }

    /// Row changes committed under an epoch after the next epoch was claimed.
    async fn superseded_changes(&self) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {s}.audit a WHERE a.epoch IS NOT NULL AND EXISTS (
                 SELECT 1 FROM {s}.epoch_audit e WHERE e.epoch > a.epoch::bigint AND e.at < a.at)",
            s = self.stores.schema.name
        )))
        .fetch_one(&self.pool)
        .await
        .expect("read the audit")
    }

    /// Prints the scenario's row and asserts that nothing was lost or changed by a deposed
    /// leader.
    pub(crate) async fn report(&self, during: Measure, took: Duration) {
        let end = self.measure().await;
        let superseded = self.superseded_changes().await;
        let show = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        println!(
            "FAULTS | {} | {} | {} | {} | {} | {} | {superseded} | {:.1} s |",
            self.name,
            self.seeded,
            show(end.present),
            show(end.departed),
            show(during.stale),
            show(end.stale),
            took.as_secs_f64()
        );
        assert_eq!(
            end.present,
            Some(self.seeded),
            "{}: sessions lost",
            self.name
        );
        assert_eq!(end.departed, Some(0), "{}", self.name);
        assert_eq!(end.stale, Some(0), "{}", self.name);
        assert_eq!(superseded, 0, "{}: changes by a deposed leader", self.name);
    }
}

/// Waits until every session is on a ready worker in Postgres and Redis holds no stale hash;
/// the time since `since`.
pub(crate) async fn converge(scene: &Scene, since: Instant) -> Duration {
    eventually(CONVERGE_WITHIN, scene.name, || async {
        let m = scene.measure().await;
        (m.present == Some(scene.seeded) && m.departed == Some(0) && m.stale == Some(0))
            .then(|| since.elapsed())
    })
    .await
}

/// An audit trigger on the sessions (who changed what, under which epoch, when) and on the
/// epochs (when each was claimed).
async fn install_audit(pool: &PgPool, schema: &str) {
    let sql = format!(
        r#"
        CREATE TABLE {s}.audit (
            at timestamptz NOT NULL DEFAULT clock_timestamp(), pid int NOT NULL, epoch text,
            op text NOT NULL, id text NOT NULL, old_worker text, new_worker text);
        CREATE FUNCTION {s}.audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {s}.audit (pid, epoch, op, id, old_worker, new_worker)
            VALUES (pg_backend_pid(), current_setting('session_operator.epoch', true), TG_OP,
                    COALESCE(NEW.id, OLD.id), OLD.worker_id, NEW.worker_id);
            RETURN NULL;
        END $$;
        CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON {s}.blockyard_sessions
            FOR EACH ROW EXECUTE FUNCTION {s}.audit_row();
        CREATE TABLE {s}.epoch_audit (at timestamptz NOT NULL DEFAULT clock_timestamp(),
            epoch bigint NOT NULL, holder text NOT NULL);
        CREATE FUNCTION {s}.audit_epoch() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {s}.epoch_audit (epoch, holder) VALUES (NEW.epoch, NEW.holder);
            RETURN NULL;
        END $$;
        CREATE TRIGGER audit AFTER INSERT OR UPDATE ON {s}.session_operator_epochs
            FOR EACH ROW EXECUTE FUNCTION {s}.audit_epoch();
        "#,
        s = schema
    );
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(pool)
        .await
        .expect("install the audit triggers");
}

/// Proxies creating sessions on the workers they route to, which the test changes.
pub(crate) struct Writers {
    routable: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    pub(crate) fn start(scene: &Scene, n: usize) -> Self {
        let routable = Arc::new(Mutex::new(scene.old.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let tasks = (0..n)
            .map(|t| {
                let (routable, stop, written) = (routable.clone(), stop.clone(), written.clone());
                let store = scene.stores.store.clone();
                tokio::spawn(async move {
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let worker = {
                            let r = routable.lock().expect("routable");
                            r[(i * 7 + t) % r.len()].clone()
                        };
                        store
                            .set(&format!("live-{t}-{i}"), &Entry::new(worker, ""))
                            .await
                            .expect("proxy write");
                        written.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Self {
            routable,
            stop,
            written,
            tasks,
        }
    }

    pub(crate) fn route(&self, workers: Vec<String>) {
        *self.routable.lock().expect("routable") = workers;
    }

    pub(crate) async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("writer");
        }
        self.written.load(Ordering::Relaxed)
    }
}
