//! Fencing checked by the stores themselves (see `src/store/fencing.rs`): Redis scripts and the
//! transactions other operator code writes with (`PostgresStore::begin_mutation`).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{PgSchema, RedisPrefix};
use session_operator::store::{Entry, Fencing, Grant, Result, Store, StoreError, StoreOptions};

const SCOPE: &str = "default/session-operator";

/// A fence whose epoch the test sets.
#[derive(Debug)]
struct TestFence(Mutex<i64>);

impl TestFence {
    fn new(epoch: i64) -> Arc<Self> {
        Arc::new(Self(Mutex::new(epoch)))
    }
}

impl Fencing for TestFence {
    fn grant(&self) -> Result<Grant> {
        Ok(Grant {
            epoch: *self.0.lock().unwrap(),
            left: Duration::from_secs(60),
        })
    }

    fn scope(&self) -> &str {
        SCOPE
    }
}

/// Redis-only: two leaders claim epochs one after the other; the older one's scripts are refused
/// before they change anything, the newer one's go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_scripts_of_a_superseded_epoch_change_nothing() {
    let prefix = RedisPrefix::new();
    let proxy = prefix.store(StoreOptions::default(), true).await;
    proxy.set("s1", &Entry::new("old", "")).await.unwrap();
    let (a, b) = (
        prefix.store(StoreOptions::default(), true).await,
        prefix.store(StoreOptions::default(), true).await,
    );
    let first = a.claim_epoch(SCOPE, "op-a").await.unwrap().unwrap();
    a.set_fencing(TestFence::new(first));
    let second = b.claim_epoch(SCOPE, "op-b").await.unwrap().unwrap();
    assert_eq!(second, first + 1);
    b.set_fencing(TestFence::new(second));

    let err = a.reroute_worker("old", "new").await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    assert!(err.to_string().contains("superseded"), "{err}");
    let err = a.delete("s1").await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    assert_eq!(proxy.get("s1").await.unwrap().unwrap().worker_id, "old");

    assert_eq!(b.reroute_worker("old", "new").await.unwrap(), 1);
    assert_eq!(proxy.get("s1").await.unwrap().unwrap().worker_id, "new");
    // Proxies (unfenced) are never refused.
    proxy.set("s2", &Entry::new("w", "")).await.unwrap();
}

/// Redis as the cache of a layered store: the epoch comes from Postgres, and Redis learns it
/// from the new leader's first write, which fences the older leader from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_learns_a_newer_epoch_from_its_first_write() {
    let prefix = RedisPrefix::new();
    let (a, b) = (
        prefix.store(StoreOptions::default(), true).await,
        prefix.store(StoreOptions::default(), true).await,
    );
    a.set_fencing(TestFence::new(7));
    b.set_fencing(TestFence::new(8));
    a.set("s", &Entry::new("w1", "")).await.unwrap(); // raises the key to 7
    b.set("s", &Entry::new("w2", "")).await.unwrap(); // raises it to 8
    let err = a.set("s", &Entry::new("w3", "")).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    assert_eq!(b.get("s").await.unwrap().unwrap().worker_id, "w2");
}

/// Other operator writes (durable worker records, …) get the same guarantee through
/// `begin_mutation`: a commit under a superseded epoch rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_transaction_commits_only_under_the_current_epoch() {
    let schema = PgSchema::new().await;
    let store = schema.store(StoreOptions::default()).await;
    let first = store.claim_epoch(SCOPE, "op-a").await.unwrap().unwrap();
    let fence = TestFence::new(first);
    store.set_fencing(fence.clone());
    sqlx::query("CREATE TABLE records (worker text)")
        .execute(store.pool())
        .await
        .unwrap();
    let insert = |worker: &'static str| {
        let store = store.clone();
        async move {
            let mut tx = store.begin_mutation().await?;
            sqlx::query("INSERT INTO records VALUES ($1)")
                .bind(worker)
                .execute(tx.conn())
                .await
                .map_err(StoreError::from)?;
            tx.commit().await
        }
    };
    insert("a").await.unwrap();
    let second = store.claim_epoch(SCOPE, "op-b").await.unwrap().unwrap();
    let err = insert("b").await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    *fence.0.lock().unwrap() = second;
    insert("c").await.unwrap();
    let rows: Vec<String> = sqlx::query_scalar("SELECT worker FROM records ORDER BY 1")
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(rows, ["a", "c"]);
}
