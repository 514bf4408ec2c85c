//! Postgres-specific behaviour: batched operations stay complete while proxies write the same
//! rows concurrently.

mod common;

use std::future::Future;
use std::time::Duration;

use common::PgSchema;
use session_operator::store::{
    PostgresOptions, PostgresStore, Result, Store, StoreError, StoreOptions,
};

async fn seeded(schema: &PgSchema, n: usize) -> PostgresStore {
    let store = schema
        .store(StoreOptions {
            batch_size: 100,
            ..StoreOptions::default()
        })
        .await;
    sqlx::query(
        "INSERT INTO blockyard_sessions SELECT 's' || i, 'old', '', now(), 'infinity'
         FROM generate_series(0, $1::int - 1) AS i",
    )
    .bind(n as i32)
    .execute(store.pool())
    .await
    .unwrap();
    store
}

/// Runs `op` while a proxy-like transaction holds `ids` locked after running `sql` on them
/// (`$1` = ids), committing only once `op` has had time to block on those locks.
async fn while_proxy_writes<T: Send + 'static>(
    store: &PostgresStore,
    sql: &'static str,
    ids: Vec<String>,
    op: impl Future<Output = Result<T>> + Send + 'static,
) -> T {
    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query(sql).bind(ids).execute(&mut *tx).await.unwrap();
    let op = tokio::spawn(op);
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.commit().await.unwrap();
    op.await.unwrap().unwrap()
}

const TOUCH: &str = "UPDATE blockyard_sessions SET last_access = now() WHERE id = ANY($1)";

fn every_fifth() -> Vec<String> {
    (0..250).step_by(5).map(|i| format!("s{i}")).collect()
}

/// Proxies touch rows of a departing worker while the reroute runs: the row locks make batches
/// wait, and rows that changed while a batch waited must still be moved, not skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reroute_moves_rows_touched_while_it_waits() {
    let schema = PgSchema::new().await;
    let store = seeded(&schema, 250).await;
    let op = {
        let store = store.clone();
        async move { store.reroute_worker("old", "new").await }
    };
    assert_eq!(
        while_proxy_writes(&store, TOUCH, every_fifth(), op).await,
        250
    );
    assert_eq!(store.count_for_worker("old").await.unwrap(), 0);
    assert_eq!(store.count_for_worker("new").await.unwrap(), 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_by_worker_removes_rows_touched_while_it_waits() {
    let schema = PgSchema::new().await;
    let store = seeded(&schema, 250).await;
    let op = {
        let store = store.clone();
        async move { store.delete_by_worker("old").await }
    };
    assert_eq!(
        while_proxy_writes(&store, TOUCH, every_fifth(), op).await,
        250
    );
    assert_eq!(store.count_for_worker("old").await.unwrap(), 0);
}

/// A proxy re-sets a session to another worker while the reroute waits for its lock: that row
/// is no longer the old worker's and must be left alone, and the rest still moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reroute_skips_rows_moved_elsewhere_meanwhile() {
    let schema = PgSchema::new().await;
    let store = seeded(&schema, 250).await;
    let op = {
        let store = store.clone();
        async move { store.reroute_worker("old", "new").await }
    };
    let moved = while_proxy_writes(
        &store,
        "UPDATE blockyard_sessions SET worker_id = 'elsewhere' WHERE id = ANY($1)",
        vec!["s1".to_string(), "s2".to_string()],
        op,
    )
    .await;
    assert_eq!(moved, 248);
    assert_eq!(store.count_for_worker("old").await.unwrap(), 0);
    let s1 = store.get("s1").await.unwrap().expect("s1 kept");
    assert_eq!(s1.worker_id, "elsewhere");
}

async fn with_timeouts(schema: &PgSchema, lock_retries: u32) -> PostgresStore {
    schema.store(StoreOptions::default()).await; // migrated
    let pg = PostgresOptions {
        schema: schema.name.clone(),
        lock_timeout: Duration::from_millis(200),
        lock_retries,
        ..PostgresOptions::default()
    };
    let opts = StoreOptions {
        batch_size: 10,
        ..StoreOptions::default()
    };
    let store = PostgresStore::connect_with(&common::pg_url(), pg, opts)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO blockyard_sessions SELECT 's' || i, 'old', '', now(), 'infinity'
         FROM generate_series(0, 29) AS i",
    )
    .execute(store.pool())
    .await
    .unwrap();
    store
}

/// A proxy that went idle in a transaction holding a session's row lock must not stall a
/// reroute forever: it fails with an error saying what to look for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_locked_by_an_idle_transaction_fails_the_reroute_clearly() {
    let schema = PgSchema::new().await;
    let store = with_timeouts(&schema, 2).await;
    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query(TOUCH)
        .bind(vec!["s5".to_string()])
        .execute(&mut *tx)
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(60), store.reroute_worker("old", "new"))
        .await
        .expect("the reroute must not wait for the lock indefinitely");
    let err = result.unwrap_err();
    assert!(matches!(err, StoreError::Timeout(_)), "{err}");
    assert!(err.to_string().contains("idle in transaction"), "{err}");
    tx.rollback().await.unwrap();
    // Once the lock is gone, the rest moves.
    assert!(store.reroute_worker("old", "new").await.unwrap() > 0);
    assert_eq!(store.count_for_worker("old").await.unwrap(), 0);
}

/// A lock held for a moment longer than the lock timeout is waited out by the retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_briefly_held_row_lock_is_waited_out_by_retries() {
    let schema = PgSchema::new().await;
    let store = with_timeouts(&schema, 5).await;
    let op = {
        let store = store.clone();
        async move { store.delete_by_worker("old").await }
    };
    let removed = while_proxy_writes(&store, TOUCH, vec!["s3".to_string()], op).await;
    assert_eq!(removed, 30);
}

/// `0` is Postgres' "no timeout": zero durations reach the server as `0`, not as `1ms`.
#[tokio::test]
async fn zero_timeouts_reach_postgres_as_disabled() {
    let schema = PgSchema::new().await;
    let show = |pg: PostgresOptions| async move {
        let store = PostgresStore::connect_with(&common::pg_url(), pg, StoreOptions::default())
            .await
            .unwrap();
        let mut conn = store.pool().acquire().await.unwrap();
        let lock: String = sqlx::query_scalar("SHOW lock_timeout")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        let statement: String = sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        (lock, statement)
    };
    let zero = PostgresOptions {
        schema: schema.name.clone(),
        lock_timeout: Duration::ZERO,
        statement_timeout: Duration::ZERO,
        ..PostgresOptions::default()
    };
    assert_eq!(show(zero).await, ("0".to_string(), "0".to_string()));
    let tiny = PostgresOptions {
        schema: schema.name.clone(),
        lock_timeout: Duration::from_micros(10),
        statement_timeout: Duration::from_secs(5),
        ..PostgresOptions::default()
    };
    assert_eq!(show(tiny).await, ("1ms".to_string(), "5s".to_string()));
}

/// A URL of another database is refused before connecting.
#[tokio::test]
async fn other_schemes_are_not_postgres() {
    let err = PostgresStore::connect("mysql://u:pw@127.0.0.1:1/db", "s", StoreOptions::default())
        .await
        .expect_err("mysql");
    assert!(matches!(err, StoreError::Config(_)), "{err}");
    assert!(err.to_string().contains("\"mysql\""), "{err}");
}

/// A fence whose grant the test sets: the epoch a leader claimed, and plenty of time left, so
/// that only the store's epoch check can stop a late statement.
#[derive(Debug)]
struct TestFence(std::sync::Mutex<Option<i64>>);

impl session_operator::store::Fencing for TestFence {
    fn grant(&self) -> Result<session_operator::store::Grant> {
        match *self.0.lock().unwrap() {
            Some(epoch) => Ok(session_operator::store::Grant {
                epoch,
                left: Duration::from_secs(60),
            }),
            None => Err(StoreError::Fenced("test fence closed".into())),
        }
    }

    fn scope(&self) -> &str {
        "default/session-operator"
    }
}

/// Counts the sessions of `worker` in the table itself (no expiry filter).
async fn rows_of(store: &PostgresStore, worker: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM blockyard_sessions WHERE worker_id = $1")
        .bind(worker)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

/// The way it failed: a leader's UPDATE waits for a lock, a new leader claims the next epoch
/// meanwhile, then the lock goes away. The statement completes, but its transaction must not
/// commit: nothing changes under the superseded epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_statement_of_a_superseded_epoch_changes_nothing() {
    let schema = PgSchema::new().await;
    let old_leader = seeded(&schema, 250).await;
    let new_leader = schema.store(StoreOptions::default()).await;
    let scope = "default/session-operator";
    let first = old_leader
        .claim_epoch(scope, "op-a")
        .await
        .unwrap()
        .unwrap();
    let fence = std::sync::Arc::new(TestFence(std::sync::Mutex::new(Some(first))));
    old_leader.set_fencing(fence.clone());

    // A table lock (as an index build or a DBA's LOCK TABLE takes) makes the UPDATE wait.
    let mut blocker = old_leader.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE blockyard_sessions IN SHARE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let late = tokio::spawn({
        let store = old_leader.clone();
        async move { store.reroute_unlocked_batch("old", "new", 1000).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!late.is_finished(), "the UPDATE waits for the table lock");
    let second = new_leader
        .claim_epoch(scope, "op-b")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second, first + 1, "epochs increase by one per term");
    blocker.commit().await.unwrap();

    let err = late.await.unwrap().unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    assert!(err.to_string().contains("superseded"), "{err}");
    assert_eq!(rows_of(&new_leader, "old").await, 250, "rolled back");
    assert_eq!(rows_of(&new_leader, "new").await, 0);
    // Every later mutation of the old term is refused too, before it changes anything.
    let err = old_leader.delete_by_worker("old").await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    assert_eq!(rows_of(&new_leader, "old").await, 250);
    // With the current epoch, the same store mutates again.
    *fence.0.lock().unwrap() = Some(second);
    assert_eq!(old_leader.reroute_worker("old", "new").await.unwrap(), 250);
}

/// A transaction of the current term that proved its epoch commits before the next claim
/// completes: the claim waits for it rather than racing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claiming_an_epoch_waits_for_transactions_that_proved_the_previous_one() {
    let schema = PgSchema::new().await;
    let store = seeded(&schema, 10).await;
    let scope = "default/session-operator";
    let first = store.claim_epoch(scope, "op-a").await.unwrap().unwrap();
    // A proven transaction, not yet committed (what a fenced mutation looks like just before
    // its COMMIT).
    let mut proven = store.pool().begin().await.unwrap();
    sqlx::query("SELECT epoch FROM session_operator_epochs WHERE scope = $1 FOR SHARE")
        .bind(scope)
        .execute(&mut *proven)
        .await
        .unwrap();
    let claim = tokio::spawn({
        let store = store.clone();
        async move { store.claim_epoch(scope, "op-b").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !claim.is_finished(),
        "the claim waits for the proven transaction"
    );
    proven.commit().await.unwrap();
    assert_eq!(claim.await.unwrap().unwrap(), Some(first + 1));
}

/// A proxy idle in a transaction holding one row of a departed worker must not keep the other
/// sessions from moving: the operator's batches skip the locked row and say that it is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unlocked_batches_move_everything_but_the_locked_rows() {
    let schema = PgSchema::new().await;
    let store = seeded(&schema, 250).await;
    let mut proxy = store.pool().begin().await.unwrap();
    sqlx::query(TOUCH)
        .bind(vec!["s7".to_string()])
        .execute(&mut *proxy)
        .await
        .unwrap();
    // Without SKIP LOCKED a batch would wait for the row and fail after the lock retries.
    let mut moved = 0;
    loop {
        let batch = store
            .reroute_unlocked_batch("old", "new", 100)
            .await
            .unwrap();
        if batch.is_empty() {
            break;
        }
        moved += batch.len();
    }
    assert_eq!(moved, 249);
    assert_eq!(rows_of(&store, "old").await, 1, "the locked row is left");
    proxy.commit().await.unwrap();
    assert_eq!(
        store
            .reroute_unlocked_batch("old", "new", 100)
            .await
            .unwrap(),
        vec!["s7"]
    );
    assert_eq!(rows_of(&store, "new").await, 250);
}

/// When Postgres stops answering, the error says why (the connection attempt's own error), not
/// only that the pool timed out waiting for a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_server_is_reported_with_its_cause() {
    let schema = PgSchema::new().await;
    schema.store(StoreOptions::default()).await; // migrated
    let target = url::Url::parse(&common::pg_url()).unwrap();
    let proxy = common::ChaosProxy::start(&format!(
        "{}:{}",
        target.host_str().unwrap(),
        target.port().unwrap_or(5432)
    ))
    .await;
    let mut via_proxy = target.clone();
    via_proxy.set_host(Some("127.0.0.1")).unwrap();
    via_proxy.set_port(Some(proxy.addr.port())).unwrap();
    let store = PostgresStore::connect(via_proxy.as_str(), &schema.name, StoreOptions::default())
        .await
        .unwrap();
    store.workers_with_sessions().await.unwrap();
    proxy.cut();
    let err = store.workers_with_sessions().await.unwrap_err().to_string();
    assert!(!err.contains("pool timed out"), "{err}");
    assert!(err.starts_with("postgres: "), "{err}");
}
