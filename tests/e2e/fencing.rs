//! Fencing enforced by the store, tested the way it failed: the leader is frozen (SIGSTOP) while
//! its UPDATE waits for a lock, a standby takes over, the lock goes away, the old leader is
//! resumed — and no row changes under the old leader's epoch.

use std::time::Duration;

use serde_json::json;
use sqlx::{AssertSqlSafe, PgPool};

use crate::harness::{Cluster, Operator, OperatorConfig, Stores, eventually};

const RS_OLD: &str = "workers-6b7c8d9f5";
const RS_NEW: &str = "workers-5f4d3c2b1";

/// An audit trigger recording every committed change of a session: which backend made it, and
/// which leadership epoch its transaction claimed (`session_operator.epoch`).
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
        "#,
        s = schema
    );
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(pool)
        .await
        .expect("install the audit trigger");
}

async fn epoch(pool: &PgPool, schema: &str) -> Option<i64> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT epoch FROM {schema}.session_operator_epochs"
    )))
    .fetch_optional(pool)
    .await
    .expect("read the epoch")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_leader_changes_nothing_after_a_standby_took_over() {
    let cluster = Cluster::start().await;
    let stores = Stores::new().await;
    let schema = stores.schema.name.clone();
    // The table lock's transaction, and one connection for the test's queries.
    let pool = crate::harness::pg_pool(2).await;
    let old = format!("{RS_OLD}-f0000");
    let new = format!("{RS_NEW}-f0000");
    cluster
        .ready_pod(&old, "worker", Some(("ReplicaSet", RS_OLD)))
        .await;
    let seeded = stores.seed(std::slice::from_ref(&old), 200).await;
    install_audit(&pool, &schema).await;
    cluster
        .apply_policy(
            "workers",
            json!({"selector": {"matchLabels": {"app": "worker"}}, "migration": {"replacementWait": "30s"}}),
        )
        .await;
    // A lock timeout far beyond the lease, as in the report: only the fence bounds the wait.
    let cfg = |identity| OperatorConfig {
        identity,
        extra: vec!["--pg-lock-timeout".into(), "30s".into()],
        ..Default::default()
    };
    let mut a = Operator::start(&cluster, &stores, cfg("op-a")).await;
    a.wait_leader(Duration::from_secs(20)).await;
    let first = eventually(Duration::from_secs(10), "op-a claimed an epoch", || async {
        epoch(&pool, &schema).await
    })
    .await;
    let mut b = Operator::start(&cluster, &stores, cfg("op-b")).await;

    // Something holds the table (an index build, a DBA's LOCK TABLE): the reroute waits.
    let mut blocker = pool.begin().await.expect("begin");
    sqlx::query(AssertSqlSafe(format!(
        "LOCK TABLE {schema}.blockyard_sessions IN SHARE MODE"
    )))
    .execute(&mut *blocker)
    .await
    .expect("lock the table");
    cluster
        .ready_pod(&new, "worker", Some(("ReplicaSet", RS_NEW)))
        .await;
    cluster.delete_pod(&old).await;
    let waiting: Vec<i32> = eventually(
        Duration::from_secs(20),
        "op-a's UPDATE waits for the lock",
        || async {
            let pids: Vec<i32> = sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity
                 WHERE application_name = 'session-operator' AND wait_event_type = 'Lock'
                   AND query LIKE 'UPDATE %blockyard_sessions SET worker_id%'",
            )
            .fetch_all(&pool)
            .await
            .expect("pg_stat_activity");
            (!pids.is_empty()).then_some(pids)
        },
    )
    .await;

    // Frozen with its statement in flight; the standby takes over and claims the next epoch.
    a.signal("STOP");
    b.wait_leader(Duration::from_secs(30)).await;
    let second = eventually(Duration::from_secs(10), "op-b claimed an epoch", || async {
        epoch(&pool, &schema).await.filter(|e| *e > first)
    })
    .await;
    blocker.commit().await.expect("release the table");
    eventually(
        Duration::from_secs(30),
        "op-b moved every session",
        || async { (stores.counts().await.get(&new) == Some(&seeded)).then_some(()) },
    )
    .await;
    a.signal("CONT");
    assert_ne!(
        a.wait_exit(Duration::from_secs(20)).await,
        Some(0),
        "the deposed leader exits as having lost its lease"
    );

    let rows: Vec<(i32, Option<String>, String, Option<String>)> = sqlx::query_as(AssertSqlSafe(
        format!("SELECT pid, epoch, op, new_worker FROM {schema}.audit WHERE op <> 'INSERT'"),
    ))
    .fetch_all(&pool)
    .await
    .expect("read the audit");
    let by_a: Vec<_> = rows
        .iter()
        .filter(|(pid, epoch, ..)| {
            waiting.contains(pid) || epoch.as_deref() == Some(&first.to_string())
        })
        .collect();
    assert!(
        by_a.is_empty(),
        "{} row change(s) committed by the deposed leader (epoch {first}): {:?}",
        by_a.len(),
        &by_a[..by_a.len().min(3)]
    );
    assert_eq!(rows.len() as u64, seeded, "each session changed once");
    assert!(
        rows.iter().all(|(_, epoch, op, to)| op == "UPDATE"
            && epoch.as_deref() == Some(&second.to_string())
            && to.as_deref() == Some(new.as_str())),
        "every change was op-b's reroute under epoch {second}"
    );
    assert!(a.mutations().is_empty(), "op-a logged {:?}", a.mutations());
    let _ = b.terminate().await;
}
