//! Layered store (Redis over Postgres): touch coalescing, and consistency when Redis becomes
//! unreachable mid-operation. Redis is reached through a TCP proxy the tests can cut.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{ChaosProxy, PgSchema, RedisPrefix};
use session_operator::store::{
    BatchRun, Entry, LayeredStore, PostgresStore, RedisStore, Store, StoreOptions, Unguarded,
    WorkerMove, migrate_worker,
};

struct Setup {
    layered: Arc<LayeredStore>,
    primary: Arc<PostgresStore>,
    cache: Arc<RedisStore>,
    proxy: ChaosProxy,
    _schema: PgSchema,
    prefix: RedisPrefix,
}

async fn setup(options: StoreOptions) -> Setup {
    let schema = PgSchema::new().await;
    let prefix = RedisPrefix::new();
    let proxy = ChaosProxy::start("127.0.0.1:6379").await;
    let primary = Arc::new(schema.store(options.clone()).await);
    let cache = Arc::new(
        prefix
            .store_at(&proxy.redis_url(), options.clone(), true)
            .await,
    );
    let layered = Arc::new(
        LayeredStore::new(cache.clone(), primary.clone(), options).expect("consistent options"),
    );
    Setup {
        layered,
        primary,
        cache,
        proxy,
        _schema: schema,
        prefix,
    }
}

/// Waits until the layered store trusts its cache again (repairs run at most once a second).
async fn until_repaired(store: &LayeredStore) {
    for _ in 0..100 {
        let _ = store.get("probe").await.unwrap();
        if !store.stats().bypassing {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cache never repaired: {:?}", store.stats());
}

async fn worker_of(store: &dyn Store, id: &str) -> Option<String> {
    store.get(id).await.unwrap().map(|e| e.worker_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coalesced_touches_skip_the_primary() {
    let s = setup(StoreOptions {
        touch_window: Duration::from_secs(3600),
        ..StoreOptions::default()
    })
    .await;
    s.layered.set("s", &Entry::new("w", "")).await.unwrap();
    for _ in 0..10 {
        assert!(s.layered.touch("s").await.unwrap());
    }
    let stats = s.layered.stats();
    assert_eq!(
        (stats.primary_touches, stats.coalesced_touches),
        (0, 10),
        "{stats:?}"
    );
    assert!(!s.layered.touch("absent").await.unwrap());
    assert_eq!(
        s.layered.stats().primary_touches,
        1,
        "a miss asks the primary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_through_without_window() {
    let s = setup(StoreOptions::default()).await;
    s.layered.set("s", &Entry::new("w", "")).await.unwrap();
    for _ in 0..5 {
        assert!(s.layered.touch("s").await.unwrap());
    }
    assert_eq!(s.layered.stats().primary_touches, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sweep_never_deletes_a_session_touched_within_its_ttl() {
    // Window 2 s, idle TTL 3 s: the primary's last_access lags by up to the window, and every
    // store widens its idle cutoff by the window to stay correct.
    let options = StoreOptions {
        touch_window: Duration::from_secs(2),
        ..StoreOptions::default()
    };
    let s = setup(options).await;
    let max_age = Duration::from_secs(3);
    s.layered.set("s", &Entry::new("w", "")).await.unwrap();
    // `last_access` has whole seconds: the primary's copy may be up to 1 s older than the set.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(s.layered.touch("s").await.unwrap());
    assert_eq!(
        s.layered.stats().coalesced_touches,
        1,
        "touch must be coalesced"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Last real touch 1.5 s ago (< 3 s TTL); the primary last saw it 2-3 s ago.
    assert_eq!(s.layered.sweep_idle(max_age).await.unwrap(), 0);
    assert_eq!(
        s.primary.sweep_idle(max_age).await.unwrap(),
        0,
        "the operator sweeps the primary"
    );
    assert!(s.layered.get("s").await.unwrap().is_some());
    // Untouched past TTL + window (+ 1 s of precision): removed, from the cache too.
    tokio::time::sleep(Duration::from_millis(4600)).await;
    assert_eq!(s.layered.sweep_idle(max_age).await.unwrap(), 1);
    assert_eq!(s.layered.get("s").await.unwrap(), None);
    assert_eq!(s.cache.get("s").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_fall_back_to_the_primary_while_redis_is_down() {
    let s = setup(StoreOptions::default()).await;
    s.layered.set("s", &Entry::new("w", "")).await.unwrap();
    s.proxy.cut();
    assert_eq!(
        worker_of(s.layered.as_ref(), "s").await.as_deref(),
        Some("w")
    );
    assert!(s.layered.touch("s").await.unwrap());
    s.layered.set("t", &Entry::new("v", "")).await.unwrap();
    assert_eq!(
        worker_of(s.layered.as_ref(), "t").await.as_deref(),
        Some("v")
    );
    assert!(s.layered.stats().cache_errors > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reroute_delete_and_set_during_an_outage_leave_no_stale_worker() {
    let s = setup(StoreOptions::default()).await;
    for id in ["r1", "r2", "d1", "x1"] {
        s.layered.set(id, &Entry::new("old", "")).await.unwrap();
        // Warm the cache.
        assert_eq!(
            worker_of(s.layered.as_ref(), id).await.as_deref(),
            Some("old")
        );
    }
    s.proxy.cut();
    s.layered.delete("d1").await.unwrap();
    s.layered.set("x1", &Entry::new("other", "")).await.unwrap();
    assert_eq!(s.layered.reroute_worker("old", "new").await.unwrap(), 2);
    assert!(s.layered.stats().bypassing);
    let check = |when: &'static str| {
        let layered = s.layered.clone();
        async move {
            assert_eq!(
                worker_of(layered.as_ref(), "r1").await.as_deref(),
                Some("new"),
                "{when}"
            );
            assert_eq!(
                worker_of(layered.as_ref(), "r2").await.as_deref(),
                Some("new"),
                "{when}"
            );
            assert_eq!(worker_of(layered.as_ref(), "d1").await, None, "{when}");
            assert_eq!(
                worker_of(layered.as_ref(), "x1").await.as_deref(),
                Some("other"),
                "{when}"
            );
        }
    };
    check("during the outage").await;
    s.proxy.restore();
    until_repaired(&s.layered).await;
    check("after repair").await;
    // The cache itself no longer holds the stale worker for any of them.
    for id in ["r1", "r2", "d1", "x1"] {
        let cached = s.cache.get(id).await.unwrap().map(|e| e.worker_id);
        assert_ne!(cached.as_deref(), Some("old"), "{id} stale in cache");
    }
    assert_eq!(
        worker_of(s.cache.as_ref(), "r1").await.as_deref(),
        Some("new"),
        "refilled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cut_in_the_middle_of_a_large_reroute() {
    let s = setup(StoreOptions {
        batch_size: 25,
        ..StoreOptions::default()
    })
    .await;
    let ids: Vec<String> = (0..5000).map(|i| format!("s{i}")).collect();
    // Bulk-load both layers with the same rows (a warm cache).
    sqlx::query(
        "INSERT INTO blockyard_sessions SELECT 's' || i, 'old', '', now(), 'infinity'
         FROM generate_series(0, 4999) AS i",
    )
    .execute(s.primary.pool())
    .await
    .unwrap();
    let warm: Vec<(String, Entry)> = ids
        .iter()
        .map(|id| (id.clone(), Entry::new("old", "")))
        .collect();
    s.cache.set_many(&warm).await.unwrap();
    // Cut Redis once the cache half of the reroute is partly applied, seen through a direct,
    // unproxied connection.
    let direct = s.prefix.store(StoreOptions::default(), true).await;
    let (moved, ()) = tokio::join!(s.layered.reroute_worker("old", "new"), async {
        while direct.count_for_worker("new").await.unwrap() == 0 {
            tokio::task::yield_now().await;
        }
        s.proxy.cut();
    });
    assert_eq!(moved.unwrap(), 5000);
    assert!(
        s.layered.stats().cache_errors > 0,
        "the cut must hit the reroute"
    );
    for when in ["during the outage", "after repair"] {
        for id in ids.iter().step_by(7) {
            assert_eq!(
                worker_of(s.layered.as_ref(), id).await.as_deref(),
                Some("new"),
                "{id} {when}"
            );
        }
        s.proxy.restore();
        until_repaired(&s.layered).await;
    }
    let stale = s.cache.count_for_worker("old").await.unwrap();
    assert_eq!(stale, 0, "stale cache entries for the old worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sweeps_remove_swept_sessions_from_the_cache() {
    let s = setup(StoreOptions::default()).await;
    let mut old = Entry::new("w", "");
    old.last_access -= chrono::TimeDelta::seconds(600);
    s.layered.set("idle", &old).await.unwrap();
    assert!(s.cache.get("idle").await.unwrap().is_some());
    assert_eq!(
        s.layered.sweep_idle(Duration::from_secs(60)).await.unwrap(),
        1
    );
    assert_eq!(s.cache.get("idle").await.unwrap(), None);
    assert_eq!(s.layered.get("idle").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repair_cache_reports_a_cache_it_could_not_fix() {
    let s = setup(StoreOptions::default()).await;
    s.layered.set("s", &Entry::new("old", "")).await.unwrap();
    s.proxy.cut();
    s.layered.reroute_worker("old", "new").await.unwrap();
    assert!(
        s.layered.repair_cache().await.is_err(),
        "Redis is still cut"
    );
    s.proxy.restore();
    s.layered
        .repair_cache()
        .await
        .expect("repair once Redis answers");
    assert!(!s.layered.stats().bypassing);
    assert_ne!(
        worker_of(s.cache.as_ref(), "s").await.as_deref(),
        Some("old")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_alone_repair_the_cache() {
    // The operator never reads sessions; its writes must still get a stale cache repaired.
    let s = setup(StoreOptions::default()).await;
    s.layered.set("s", &Entry::new("old", "")).await.unwrap();
    s.proxy.cut();
    s.layered.reroute_worker("old", "new").await.unwrap();
    s.proxy.restore();
    let mut repaired = false;
    for i in 0..50 {
        s.layered
            .set(&format!("other{i}"), &Entry::new("x", ""))
            .await
            .unwrap();
        if !s.layered.stats().bypassing {
            repaired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(repaired, "{:?}", s.layered.stats());
    assert_ne!(
        worker_of(s.cache.as_ref(), "s").await.as_deref(),
        Some("old")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_touch_the_primary_refuses_drops_the_cache_copy() {
    // Another process filled the cache with a session the primary no longer holds.
    let s = setup(StoreOptions::default()).await;
    s.cache
        .set("ghost", &Entry::new("gone-pod", ""))
        .await
        .unwrap();
    assert!(!s.layered.touch("ghost").await.unwrap());
    assert_eq!(s.cache.get("ghost").await.unwrap(), None);
    assert_eq!(s.layered.get("ghost").await.unwrap(), None);
}

/// Redis expires cached hashes before the sweep deletes their Postgres rows: the sweep's cache
/// deletes then find no hash, and the index members pointing at them must still go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_sessions_leave_nothing_behind_in_the_cache_index() {
    const N: usize = 20_000;
    let s = setup(StoreOptions::with_idle_ttl(Duration::from_secs(3))).await;
    sqlx::query(
        "INSERT INTO blockyard_sessions
         SELECT 's' || i, 'w' || (i % 7), '', now(), now() + interval '3 seconds'
         FROM generate_series(0, $1::int - 1) AS i",
    )
    .bind(N as i32)
    .execute(s.primary.pool())
    .await
    .unwrap();
    // A few touched through the layered store on the way: right after the rows were written,
    // so that filling the cache below, however long a loaded machine takes for it, cannot
    // outlast their TTL first.
    for i in 0..50 {
        assert!(s.layered.touch(&format!("s{i}")).await.unwrap());
    }
    let cached: Vec<(String, Entry)> = (0..N)
        .map(|i| (format!("s{i}"), Entry::new(format!("w{}", i % 7), "")))
        .collect();
    s.cache.set_many(&cached).await.unwrap();
    // Every row and every cached hash expired (the hashes 3 s after the fill began).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(s.layered.expire().await.unwrap(), N as u64);
    let mut conn = s.prefix.conn().await;
    let p = &s.prefix.prefix;
    for w in 0..7 {
        let left: u64 = redis::cmd("ZCARD")
            .arg(format!("{p}session-index:worker:w{w}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, 0, "index of w{w}");
    }
    let workers: u64 = redis::cmd("SCARD")
        .arg(format!("{p}session-index:workers"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(workers, 0);
}

/// A `set` with an old `last_access` must not let coalesced touches keep Postgres at that old
/// time: an idle sweep would delete a session in active use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_set_with_an_old_last_access_is_not_coalesced_away() {
    let s = setup(StoreOptions {
        touch_window: Duration::from_secs(60),
        ..StoreOptions::default()
    })
    .await;
    let mut old = Entry::new("w", "");
    old.last_access -= chrono::TimeDelta::hours(1);
    s.layered.set("s", &old).await.unwrap();
    assert!(s.layered.touch("s").await.unwrap());
    assert_eq!(
        s.layered.stats().primary_touches,
        1,
        "{:?}",
        s.layered.stats()
    );
    assert_eq!(
        s.primary
            .sweep_idle(Duration::from_secs(600))
            .await
            .unwrap(),
        0,
        "a session touched just now"
    );
    // A recent set is coalesced as before.
    s.layered.set("t", &Entry::new("w", "")).await.unwrap();
    assert!(s.layered.touch("t").await.unwrap());
    assert_eq!(s.layered.stats().coalesced_touches, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inconsistent_options_are_rejected() {
    let schema = PgSchema::new().await;
    let prefix = RedisPrefix::new();
    let window = StoreOptions {
        touch_window: Duration::from_secs(10),
        ..StoreOptions::with_idle_ttl(Duration::from_secs(60))
    };
    let plain = StoreOptions::with_idle_ttl(Duration::from_secs(60));
    let primary_plain = Arc::new(schema.store(plain.clone()).await);
    let primary_window = Arc::new(schema.store(window.clone()).await);
    let cache = Arc::new(prefix.store(plain.clone(), true).await);
    let other_ttl = Arc::new(
        prefix
            .store(StoreOptions::with_idle_ttl(Duration::from_secs(30)), true)
            .await,
    );
    // The primary would sweep without allowing for the window.
    let err = LayeredStore::new(cache.clone(), primary_plain.clone(), window.clone()).unwrap_err();
    assert!(err.to_string().contains("touch window"), "{err}");
    // The cache would keep sessions for another TTL.
    let err = LayeredStore::new(other_ttl, primary_window.clone(), window.clone()).unwrap_err();
    assert!(err.to_string().contains("idle TTL"), "{err}");
    // A window as long as the TTL.
    let too_long = StoreOptions {
        touch_window: Duration::from_secs(60),
        ..plain.clone()
    };
    assert!(LayeredStore::new(cache.clone(), primary_plain.clone(), too_long).is_err());
    assert!(LayeredStore::new(cache.clone(), primary_window, window).is_ok());
    assert!(LayeredStore::new(cache, primary_plain, plain).is_ok());
}

/// blockyard's proxies fill the cache with their own code (no ticket): the operator re-applies
/// its reroute to the cache by id after a delay, overwriting a copy filled from a stale read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delayed_double_invalidation_fixes_a_foreign_stale_fill() {
    let s = setup(StoreOptions::default()).await;
    s.layered.set("s", &Entry::new("w1", "")).await.unwrap();
    s.layered.set("t", &Entry::new("w1", "")).await.unwrap();
    let moved = s.layered.reroute_batch("w1", "w2", 10).await.unwrap();
    assert_eq!(moved.len(), 2);
    // A foreign proxy writes what it read before the reroute, as blockyard does.
    let mut conn = s.prefix.conn().await;
    let _: () = redis::AsyncCommands::hset(&mut conn, s.cache.session_key("s"), "worker_id", "w1")
        .await
        .unwrap();
    s.layered
        .cache_reroute_ids(&moved, "w1", "w2")
        .await
        .unwrap();
    assert_eq!(
        worker_of(s.layered.as_ref(), "s").await.as_deref(),
        Some("w2")
    );
    let _: () = redis::AsyncCommands::hset(&mut conn, s.cache.session_key("t"), "worker_id", "w1")
        .await
        .unwrap();
    s.layered
        .cache_invalidate(&["t".to_string()])
        .await
        .unwrap();
    assert_eq!(s.cache.get("t").await.unwrap(), None);
}

/// The same through the store's own re-application: a migration run of a layered store asked
/// to re-apply migrations applies its ids to the cache once more after the delay, whichever
/// caller ran it (the operator's guarded run here), overwriting a foreign stale fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_run_is_reapplied_to_the_cache_after_the_delay() {
    let s = setup(StoreOptions::default()).await;
    s.layered
        .reapply_migrations_after(Duration::from_millis(200));
    for id in ["s", "t"] {
        s.layered.set(id, &Entry::new("w1", "")).await.unwrap();
    }
    s.layered.set("d", &Entry::new("w3", "")).await.unwrap();
    let run = migrate_worker(
        s.layered.as_ref(),
        WorkerMove::Reroute {
            from: "w1",
            to: "w2",
        },
        BatchRun::skipping_locked(),
        1,
        &Unguarded,
    )
    .await;
    assert!(run.outcome.is_ok());
    assert_eq!(run.ids.len(), 2, "one batch per session");
    let deleted = migrate_worker(
        s.layered.as_ref(),
        WorkerMove::Delete { worker: "w3" },
        BatchRun::skipping_locked(),
        10,
        &Unguarded,
    )
    .await;
    assert_eq!(deleted.ids, vec!["d".to_string()]);
    // Foreign proxies write what they read before the migration.
    let mut conn = s.prefix.conn().await;
    for (id, worker) in [("s", "w1"), ("t", "w1"), ("d", "w3")] {
        let _: () =
            redis::AsyncCommands::hset(&mut conn, s.cache.session_key(id), "worker_id", worker)
                .await
                .unwrap();
    }
    s.layered.wait_reapplied().await;
    for id in ["s", "t"] {
        assert_eq!(
            worker_of(s.layered.as_ref(), id).await.as_deref(),
            Some("w2"),
            "{id}"
        );
    }
    assert_eq!(s.cache.get("d").await.unwrap(), None);
}

/// The ids a reroute could not update in Redis survive the process: another layered store over
/// the same Postgres (a restarted operator, or the next leader), which never saw the failure,
/// repairs them as soon as Redis answers, and clears the marks it repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repairs_survive_a_restart_and_run_once_redis_answers() {
    let options = StoreOptions::default();
    let s = setup(options.clone()).await;
    let ids: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
    for id in &ids {
        s.layered.set(id, &Entry::new("old", "")).await.unwrap();
    }
    // What a proxy reading Redis directly sees.
    let direct = s.prefix.store(options.clone(), true).await;
    s.proxy.cut();
    assert_eq!(s.layered.reroute_worker("old", "new").await.unwrap(), 20);
    assert_eq!(s.layered.stats().pending_repairs, 20);
    assert!(!s.layered.stats().cache_available);
    assert_eq!(
        s.primary.cache_repairs().await.unwrap().len(),
        20,
        "recorded in Postgres"
    );

    let restarted =
        LayeredStore::new(s.cache.clone(), s.primary.clone(), options).expect("layered store");
    assert_eq!(
        restarted.stats().pending_repairs,
        0,
        "a new process knows nothing itself"
    );
    for id in &ids {
        assert_eq!(
            worker_of(&direct, id).await.as_deref(),
            Some("old"),
            "stale before"
        );
    }
    s.proxy.restore();
    let mut left = None;
    for _ in 0..50 {
        left = restarted.repair_pending().await.ok();
        if left == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, Some(0), "repaired once Redis answers");
    for id in &ids {
        assert_ne!(
            worker_of(&direct, id).await.as_deref(),
            Some("old"),
            "{id} still stale"
        );
    }
    assert!(
        s.primary.cache_repairs().await.unwrap().is_empty(),
        "marks cleared"
    );
    assert!(restarted.stats().cache_available);
}
