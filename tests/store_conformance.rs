//! One conformance suite, run against every store: memory, Postgres, Redis, and the layered
//! store over real Postgres and Redis. Stores use a tiny batch size so that every batched loop
//! runs many rounds.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{SubsecRound, TimeDelta, Utc};
use common::{PgSchema, RedisPrefix};
use session_operator::store::{
    Entry, LayeredStore, MAX_ID_BYTES, MemoryStore, Store, StoreError, StoreOptions, Sweep,
};

/// Keeps a store's backing resources alive (and cleans them up) for one test.
#[allow(dead_code)]
enum Fixture {
    None,
    Pg(PgSchema),
    Redis(RedisPrefix),
    Both(PgSchema, RedisPrefix),
}

fn options(idle_ttl: Duration) -> StoreOptions {
    StoreOptions {
        idle_ttl,
        batch_size: 7,
        ..StoreOptions::default()
    }
}

async fn memory(opts: StoreOptions) -> (Arc<dyn Store>, Fixture) {
    (Arc::new(MemoryStore::new(opts)), Fixture::None)
}

async fn postgres(opts: StoreOptions) -> (Arc<dyn Store>, Fixture) {
    let schema = PgSchema::new().await;
    (Arc::new(schema.store(opts).await), Fixture::Pg(schema))
}

async fn redis(opts: StoreOptions) -> (Arc<dyn Store>, Fixture) {
    let prefix = RedisPrefix::new();
    (
        Arc::new(prefix.store(opts, false).await),
        Fixture::Redis(prefix),
    )
}

/// Redis without the SCAN for foreign writers: nothing repairs a missing index update here.
async fn redis_index_only(opts: StoreOptions) -> (Arc<dyn Store>, Fixture) {
    let prefix = RedisPrefix::new();
    (
        Arc::new(prefix.store(opts, true).await),
        Fixture::Redis(prefix),
    )
}

async fn layered(opts: StoreOptions) -> (Arc<dyn Store>, Fixture) {
    layered_with(opts, false).await
}

async fn layered_index_only(opts: StoreOptions) -> (Arc<dyn Store>, Fixture) {
    layered_with(opts, true).await
}

/// Layered with touch coalescing: the window must be shorter than the 1 s TTL of the expiry test.
async fn layered_window(mut opts: StoreOptions) -> (Arc<dyn Store>, Fixture) {
    opts.touch_window = Duration::from_millis(400);
    layered_with(opts, true).await
}

async fn layered_with(opts: StoreOptions, index_only: bool) -> (Arc<dyn Store>, Fixture) {
    let schema = PgSchema::new().await;
    let prefix = RedisPrefix::new();
    let primary = Arc::new(schema.store(opts.clone()).await);
    let cache = Arc::new(prefix.store(opts.clone(), index_only).await);
    (
        Arc::new(LayeredStore::new(cache, primary, opts).expect("consistent options")),
        Fixture::Both(schema, prefix),
    )
}

fn entry(worker: &str) -> Entry {
    Entry::new(worker, "")
}

fn aged(worker: &str, age_secs: i64) -> Entry {
    let mut e = Entry::new(worker, "user");
    e.last_access -= TimeDelta::seconds(age_secs);
    e
}

async fn seed(store: &dyn Store, worker: &str, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{worker}-s{i}")).collect();
    for id in &ids {
        store.set(id, &entry(worker)).await.expect("set");
    }
    ids
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(std::string::ToString::to_string).collect()
}

async fn get_set_replace(store: Arc<dyn Store>) {
    assert_eq!(store.get("nope").await.unwrap(), None);
    let e = Entry::new("w1", "alice");
    store.set("s1", &e).await.unwrap();
    assert_eq!(store.get("s1").await.unwrap(), Some(e.clone()));
    let replaced = Entry::new("w2", "");
    store.set("s1", &replaced).await.unwrap();
    assert_eq!(store.get("s1").await.unwrap(), Some(replaced));
    assert_eq!(store.count_for_worker("w1").await.unwrap(), 0);
    assert_eq!(store.count_for_worker("w2").await.unwrap(), 1);
}

async fn touch_refreshes_last_access(store: Arc<dyn Store>) {
    assert!(!store.touch("absent").await.unwrap());
    store.set("s", &aged("w", 3600)).await.unwrap();
    let before = Utc::now() - TimeDelta::seconds(2);
    assert!(store.touch("s").await.unwrap());
    let got = store.get("s").await.unwrap().expect("still there");
    assert!(
        got.last_access >= before,
        "last_access {} not refreshed",
        got.last_access
    );
    assert_eq!(got.worker_id, "w");
    assert_eq!(got.user_sub, "user");
}

async fn delete_one_and_many(store: Arc<dyn Store>) {
    seed(store.as_ref(), "w", 3).await;
    assert!(store.delete("w-s0").await.unwrap());
    assert!(!store.delete("w-s0").await.unwrap());
    assert_eq!(store.get("w-s0").await.unwrap(), None);
    let n = store
        .delete_many(&strings(&["w-s1", "w-s2", "unknown"]))
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(store.count_for_worker("w").await.unwrap(), 0);
    assert_eq!(store.delete_many(&[]).await.unwrap(), 0);
}

async fn delete_by_worker_leaves_others(store: Arc<dyn Store>) {
    seed(store.as_ref(), "a", 20).await;
    let keep = seed(store.as_ref(), "b", 3).await;
    assert_eq!(store.delete_by_worker("a").await.unwrap(), 20);
    assert_eq!(store.delete_by_worker("a").await.unwrap(), 0);
    assert_eq!(store.delete_by_worker("unknown").await.unwrap(), 0);
    assert_eq!(store.count_for_worker("a").await.unwrap(), 0);
    for id in &keep {
        assert_eq!(store.get(id).await.unwrap().unwrap().worker_id, "b");
    }
    assert_eq!(store.get("a-s5").await.unwrap(), None);
}

async fn counts(store: Arc<dyn Store>) {
    seed(store.as_ref(), "a", 3).await;
    seed(store.as_ref(), "b", 2).await;
    assert_eq!(store.count_for_worker("a").await.unwrap(), 3);
    assert_eq!(store.count_for_worker("zzz").await.unwrap(), 0);
    assert_eq!(store.count_for_workers(&[]).await.unwrap(), 0);
    assert_eq!(
        store
            .count_for_workers(&strings(&["a", "b", "zzz"]))
            .await
            .unwrap(),
        5
    );
    assert_eq!(
        store
            .count_for_workers(&strings(&["a", "a"]))
            .await
            .unwrap(),
        3
    );
    let all = store.counts_by_worker().await.unwrap();
    assert_eq!(
        all.into_iter().collect::<Vec<_>>(),
        vec![("a".into(), 3), ("b".into(), 2)]
    );
}

async fn reroute_moves_everything(store: Arc<dyn Store>) {
    let moved = seed(store.as_ref(), "old", 30).await;
    let existing = seed(store.as_ref(), "new", 2).await;
    assert_eq!(store.reroute_worker("old", "new").await.unwrap(), 30);
    assert_eq!(store.count_for_worker("old").await.unwrap(), 0);
    assert_eq!(store.count_for_worker("new").await.unwrap(), 32);
    for id in moved.iter().chain(&existing) {
        assert_eq!(
            store.get(id).await.unwrap().unwrap().worker_id,
            "new",
            "{id}"
        );
    }
    assert_eq!(store.reroute_worker("old", "new").await.unwrap(), 0);
    assert_eq!(store.reroute_worker("unknown", "new").await.unwrap(), 0);
}

async fn reroute_to_same_worker_is_a_no_op(store: Arc<dyn Store>) {
    let ids = seed(store.as_ref(), "w", 10).await;
    assert_eq!(store.reroute_worker("w", "w").await.unwrap(), 10);
    assert_eq!(store.count_for_worker("w").await.unwrap(), 10);
    for id in &ids {
        assert_eq!(store.get(id).await.unwrap().unwrap().worker_id, "w");
    }
}

async fn entries_snapshot(store: Arc<dyn Store>) {
    let e1 = Entry::new("w", "alice");
    let e2 = Entry::new("w", "");
    store.set("x1", &e1).await.unwrap();
    store.set("x2", &e2).await.unwrap();
    store.set("y", &entry("other")).await.unwrap();
    let entries = store.entries_for_worker("w").await.unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries["x1"], e1);
    assert_eq!(entries["x2"], e2);
    assert!(store.entries_for_worker("nobody").await.unwrap().is_empty());
}

async fn sweep_idle_removes_only_idle(store: Arc<dyn Store>) {
    for i in 0..15 {
        store
            .set(&format!("old{i}"), &aged("a", 600))
            .await
            .unwrap();
    }
    store.set("fresh", &aged("a", 5)).await.unwrap();
    store.set("old-b", &aged("b", 600)).await.unwrap();
    assert_eq!(store.sweep_idle(Duration::from_secs(60)).await.unwrap(), 16);
    assert!(store.get("fresh").await.unwrap().is_some());
    assert_eq!(store.get("old3").await.unwrap(), None);
    assert_eq!(store.get("old-b").await.unwrap(), None);
    assert_eq!(
        store
            .count_for_workers(&strings(&["a", "b"]))
            .await
            .unwrap(),
        1
    );
}

async fn sweep_idle_restricted_to_workers(store: Arc<dyn Store>) {
    for w in ["a", "b", "c"] {
        for i in 0..9 {
            store.set(&format!("{w}{i}"), &aged(w, 600)).await.unwrap();
        }
    }
    let max_age = Duration::from_secs(60);
    assert_eq!(store.sweep_idle_for_workers(max_age, &[]).await.unwrap(), 0);
    assert_eq!(
        store
            .count_for_workers(&strings(&["a", "b", "c"]))
            .await
            .unwrap(),
        27
    );
    assert_eq!(
        store
            .sweep_idle_for_workers(max_age, &strings(&["a", "c", "unknown"]))
            .await
            .unwrap(),
        18
    );
    assert_eq!(store.count_for_worker("a").await.unwrap(), 0);
    assert_eq!(store.count_for_worker("b").await.unwrap(), 9);
    assert_eq!(store.count_for_worker("c").await.unwrap(), 0);
}

async fn sweep_batch_respects_its_limit(store: Arc<dyn Store>) {
    for w in ["a", "b"] {
        for i in 0..10 {
            store.set(&format!("{w}{i}"), &aged(w, 600)).await.unwrap();
        }
    }
    let sweep = Sweep::Idle {
        max_age: Duration::from_secs(60),
        workers: None,
    };
    let first = store.sweep_batch(sweep, 5).await.unwrap();
    assert_eq!(first.len(), 5);
    for id in &first {
        assert_eq!(
            store.get(id).await.unwrap(),
            None,
            "{id} reported but not removed"
        );
    }
    assert_eq!(
        store
            .count_for_workers(&strings(&["a", "b"]))
            .await
            .unwrap(),
        15
    );
    assert_eq!(store.sweep(sweep).await.unwrap(), 15);
}

async fn ttl_expiry_hides_sessions(store: Arc<dyn Store>) {
    // Built with a 1 s idle TTL.
    seed(store.as_ref(), "w", 3).await;
    seed(store.as_ref(), "x", 2).await;
    assert_eq!(store.count_for_worker("w").await.unwrap(), 3);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    // Nothing but the expiry sweep has looked at the expired sessions yet: it reports them all
    // (Redis: the index members its hashes left behind), a batch at most `limit` of them.
    let first = store.sweep_batch(Sweep::Expired, 2).await.unwrap();
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(
        store.expire().await.unwrap(),
        3,
        "the other expired sessions"
    );
    assert_eq!(store.expire().await.unwrap(), 0);
    assert_eq!(store.get("w-s0").await.unwrap(), None);
    assert!(!store.touch("w-s1").await.unwrap());
    assert_eq!(store.count_for_worker("w").await.unwrap(), 0);
    assert!(store.entries_for_worker("w").await.unwrap().is_empty());
    assert!(store.counts_by_worker().await.unwrap().is_empty());
    assert!(store.workers_with_sessions().await.unwrap().is_empty());
    assert_eq!(store.reroute_worker("w", "v").await.unwrap(), 0);
    assert_eq!(store.count_for_worker("v").await.unwrap(), 0);
    assert_eq!(store.get("w-s2").await.unwrap(), None);
    // A fresh set after expiry works as new.
    store.set("w-s0", &entry("w")).await.unwrap();
    assert_eq!(store.count_for_worker("w").await.unwrap(), 1);
}

async fn odd_ids_are_faithful(store: Arc<dyn Store>) {
    let long = "x".repeat(MAX_ID_BYTES);
    let odd = [
        "sé$$ion-ünïcödé-🙂",
        "glob*?[]{}\\^",
        "*",
        "with space and : colon",
        "session:nested",
        long.as_str(),
    ];
    for (i, id) in odd.iter().enumerate() {
        let worker = format!("wörker*[{i}]");
        store.set(id, &entry(&worker)).await.unwrap();
        assert_eq!(
            store.get(id).await.unwrap().unwrap().worker_id,
            worker,
            "{id}"
        );
        let entries = store.entries_for_worker(&worker).await.unwrap();
        assert_eq!(entries.keys().collect::<Vec<_>>(), vec![*id]);
        assert_eq!(store.reroute_worker(&worker, "plain").await.unwrap(), 1);
    }
    assert_eq!(
        store.count_for_worker("plain").await.unwrap(),
        odd.len() as u64
    );
    // Globs in one id must not match others.
    assert!(store.delete("*").await.unwrap());
    assert_eq!(
        store.count_for_worker("plain").await.unwrap(),
        odd.len() as u64 - 1
    );
    assert_eq!(
        store.delete_by_worker("plain").await.unwrap(),
        odd.len() as u64 - 1
    );
}

async fn bad_ids_are_rejected(store: Arc<dyn Store>) {
    let too_long = "x".repeat(64 * 1024);
    for bad in ["", "nul\0byte", too_long.as_str()] {
        let e = entry("w");
        let errs = [
            store.set(bad, &e).await.err(),
            store.get(bad).await.err(),
            store.touch(bad).await.err(),
            store.delete(bad).await.err(),
            store.set("ok", &entry(bad)).await.err(),
            store.count_for_worker(bad).await.err(),
            store.delete_by_worker(bad).await.err(),
            store.reroute_worker("w", bad).await.err(),
            store.entries_for_worker(bad).await.err(),
            store.delete_many(&[bad.to_string()]).await.err(),
            store
                .count_for_workers(&["w".into(), bad.to_string()])
                .await
                .err(),
            store
                .sweep_idle_for_workers(Duration::from_secs(1), &[bad.to_string()])
                .await
                .err(),
            store.reroute_batch(bad, "w", 1).await.err(),
            store.delete_worker_batch(bad, 1).await.err(),
            store
                .workers_holding(&["w".into(), bad.to_string()])
                .await
                .err(),
        ];
        for err in errs {
            let err = err.unwrap_or_else(|| panic!("{:?} accepted", &bad[..bad.len().min(10)]));
            assert!(matches!(err, StoreError::InvalidId { .. }), "{err}");
        }
    }
    assert_eq!(store.get("ok").await.unwrap(), None, "nothing was written");
}

async fn concurrent_set_touch_reroute(store: Arc<dyn Store>) {
    // 16 writers add sessions to "a" while 8 touchers touch and a rerouter moves "a" to "b".
    // Whatever the interleaving, a final reroute must leave every session on "b": none lost.
    let initial = seed(store.as_ref(), "a", 40).await;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                store.set(&format!("t{t}-{i}"), &entry("a")).await.unwrap();
            }
        }));
    }
    for _ in 0..8 {
        let (store, ids) = (store.clone(), initial.clone());
        tasks.push(tokio::spawn(async move {
            for id in &ids {
                assert!(store.touch(id).await.unwrap(), "{id} vanished");
            }
        }));
    }
    for _ in 0..3 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.reroute_worker("a", "b").await.unwrap();
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    store.reroute_worker("a", "b").await.unwrap();
    assert_eq!(store.count_for_worker("a").await.unwrap(), 0);
    assert_eq!(store.count_for_worker("b").await.unwrap(), 40 + 160);
    let ids: HashSet<String> = store
        .entries_for_worker("b")
        .await
        .unwrap()
        .into_keys()
        .collect();
    assert!(initial.iter().all(|id| ids.contains(id)));
    for id in &initial {
        assert_eq!(store.get(id).await.unwrap().unwrap().worker_id, "b");
    }
}

async fn workers_with_sessions(store: Arc<dyn Store>) {
    assert!(store.workers_with_sessions().await.unwrap().is_empty());
    seed(store.as_ref(), "a", 3).await;
    seed(store.as_ref(), "b", 20).await;
    seed(store.as_ref(), "c", 1).await;
    let workers = |v: &[&str]| {
        v.iter()
            .map(std::string::ToString::to_string)
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(
        store.workers_with_sessions().await.unwrap(),
        workers(&["a", "b", "c"])
    );
    assert_eq!(store.delete_by_worker("a").await.unwrap(), 3);
    assert_eq!(store.reroute_worker("b", "d").await.unwrap(), 20);
    assert_eq!(
        store.workers_with_sessions().await.unwrap(),
        workers(&["c", "d"])
    );
    // A probe answers for the ids asked, and only those: "a" and "b" were emptied, "zz" never held.
    let ask: Vec<String> = ["a", "b", "c", "zz", "d"].map(String::from).into();
    assert_eq!(
        store.workers_holding(&ask).await.unwrap(),
        workers(&["c", "d"])
    );
    assert_eq!(
        store.workers_holding(&["d".into()]).await.unwrap(),
        workers(&["d"])
    );
    assert!(store.workers_holding(&[]).await.unwrap().is_empty());
    assert!(store.delete("c-s0").await.unwrap());
    assert_eq!(store.workers_holding(&ask).await.unwrap(), workers(&["d"]));
    assert_eq!(
        store.workers_with_sessions().await.unwrap(),
        workers(&["d"])
    );
}

async fn batches_return_the_ids_they_changed(store: Arc<dyn Store>) {
    let ids: BTreeSet<String> = seed(store.as_ref(), "a", 10).await.into_iter().collect();
    let mut moved = BTreeSet::new();
    loop {
        let batch = store.reroute_batch("a", "b", 4).await.unwrap();
        assert!(batch.len() <= 4, "{batch:?}");
        if batch.is_empty() {
            break;
        }
        moved.extend(batch);
    }
    assert_eq!(moved, ids);
    assert_eq!(store.count_for_worker("b").await.unwrap(), 10);
    assert!(store.reroute_batch("b", "b", 4).await.unwrap().is_empty());
    let mut deleted = BTreeSet::new();
    loop {
        let batch = store.delete_worker_batch("b", 3).await.unwrap();
        assert!(batch.len() <= 3, "{batch:?}");
        if batch.is_empty() {
            break;
        }
        deleted.extend(batch);
    }
    assert_eq!(deleted, ids);
    assert_eq!(store.get("a-s1").await.unwrap(), None);
}

async fn scoped_sweep_counts_duplicated_workers_once(store: Arc<dyn Store>) {
    for i in 0..5 {
        store.set(&format!("a{i}"), &aged("a", 600)).await.unwrap();
    }
    let removed = store
        .sweep_idle_for_workers(Duration::from_secs(60), &strings(&["a", "a", "a"]))
        .await
        .unwrap();
    assert_eq!(removed, 5);
}

/// `last_access` has whole seconds: a session stored with second S may have been used until
/// S + 1 s, so a sweep must not remove it before S + 1 s + max_age (+ the touch window).
async fn sweep_never_cuts_a_second_early(store: Arc<dyn Store>) {
    let window = TimeDelta::from_std(store.options().touch_window).unwrap();
    for attempt in 0.. {
        let start = Utc::now().trunc_subsecs(0);
        let mut e = Entry::new("w", "");
        // Stored as if last used at second start - 60 - window: possibly at start - 59.x real.
        e.last_access = start - TimeDelta::seconds(60) - window;
        let id = format!("edge{attempt}");
        store.set(&id, &e).await.unwrap();
        let removed = store.sweep_idle(Duration::from_secs(60)).await.unwrap();
        if Utc::now().trunc_subsecs(0) != start {
            // The clock crossed a second meanwhile: the session may really be idle now.
            store.delete(&id).await.unwrap();
            continue;
        }
        assert_eq!(removed, 0, "swept up to a second early");
        assert!(store.get(&id).await.unwrap().is_some());
        assert_eq!(store.sweep_idle(Duration::from_secs(58)).await.unwrap(), 1);
        return;
    }
}

macro_rules! conformance {
    ($store:ident) => {
        mod $store {
            use super::*;

            async fn store() -> (Arc<dyn Store>, Fixture) {
                super::$store(options(Duration::ZERO)).await
            }

            conformance!(@tests
                get_set_replace,
                touch_refreshes_last_access,
                delete_one_and_many,
                delete_by_worker_leaves_others,
                counts,
                reroute_moves_everything,
                reroute_to_same_worker_is_a_no_op,
                entries_snapshot,
                sweep_idle_removes_only_idle,
                sweep_idle_restricted_to_workers,
                sweep_batch_respects_its_limit,
                odd_ids_are_faithful,
                bad_ids_are_rejected,
                concurrent_set_touch_reroute,
                workers_with_sessions,
                batches_return_the_ids_they_changed,
                scoped_sweep_counts_duplicated_workers_once,
                sweep_never_cuts_a_second_early
            );

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn ttl_expiry_hides_sessions() {
                let (store, _fixture) = super::$store(options(Duration::from_secs(1))).await;
                super::ttl_expiry_hides_sessions(store).await;
            }
        }
    };
    (@tests $($test:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                let (store, _fixture) = store().await;
                super::$test(store).await;
            }
        )*
    };
}

conformance!(memory);
conformance!(postgres);
conformance!(redis);
conformance!(redis_index_only);
conformance!(layered);
conformance!(layered_index_only);
conformance!(layered_window);
