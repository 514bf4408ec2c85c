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
