//! Wire compatibility with blockyard: rows and hashes written exactly as blockyard writes them
//! (raw SQL, raw HSET without any index) are read, counted, rerouted and deleted correctly, and
//! what this project writes is what blockyard reads.

mod common;

use common::{PgSchema, RedisPrefix};
use redis::AsyncCommands;
use session_operator::store::{Entry, PostgresStore, Store, StoreOptions};

const BLOCKYARD_DDL: &str = "
CREATE TABLE blockyard_sessions (
    id TEXT PRIMARY KEY,
    worker_id TEXT NOT NULL,
    user_sub TEXT NOT NULL DEFAULT '',
    last_access TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX blockyard_sessions_expires_at ON blockyard_sessions (expires_at);
CREATE INDEX blockyard_sessions_worker ON blockyard_sessions (worker_id);
CREATE INDEX blockyard_sessions_last_access ON blockyard_sessions (last_access);
";

async fn raw_exec(store: &PostgresStore, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(store.pool())
        .await
        .expect("raw sql");
}

#[tokio::test]
async fn migrations_are_idempotent_over_blockyards_table() {
    let schema = PgSchema::new().await;
    // Connect without migrating, create the table as blockyard does, add a row.
    let store = PostgresStore::connect(&common::pg_url(), &schema.name, StoreOptions::default())
        .await
        .unwrap();
    raw_exec(&store, &format!("CREATE SCHEMA {}", schema.name)).await;
    raw_exec(&store, BLOCKYARD_DDL).await;
    raw_exec(
        &store,
        "INSERT INTO blockyard_sessions VALUES ('s1', 'w1', 'alice', now(), now() + interval '1 hour')",
    )
    .await;
    store.migrate(&schema.name).await.expect("first migrate");
    store.migrate(&schema.name).await.expect("second migrate");
    let indexes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND tablename = 'blockyard_sessions'",
    )
    .bind(&schema.name)
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        indexes, 4,
        "primary key + blockyard's three indexes, no duplicates"
    );
    let got = store.get("s1").await.unwrap().expect("row kept");
    assert_eq!(
        (got.worker_id.as_str(), got.user_sub.as_str()),
        ("w1", "alice")
    );
}

#[tokio::test]
async fn fresh_migration_creates_blockyards_layout() {
    let schema = PgSchema::new().await;
    let store = schema.store(StoreOptions::default()).await;
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text, is_nullable::text FROM information_schema.columns
         WHERE table_schema = $1 AND table_name = 'blockyard_sessions' ORDER BY ordinal_position",
    )
    .bind(&schema.name)
    .fetch_all(store.pool())
    .await
    .unwrap();
    let expected = [
        ("id", "text"),
        ("worker_id", "text"),
        ("user_sub", "text"),
        ("last_access", "timestamp with time zone"),
        ("expires_at", "timestamp with time zone"),
    ];
    assert_eq!(columns.len(), expected.len());
    for ((name, ty, nullable), (en, et)) in columns.iter().zip(expected) {
        assert_eq!(
            (name.as_str(), ty.as_str(), nullable.as_str()),
            (en, et, "NO")
        );
    }
    for col in ["expires_at", "worker_id", "last_access"] {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND indexdef LIKE '%(' || $2 || ')'",
        )
        .bind(&schema.name)
        .bind(col)
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(n, 1, "index on {col}");
    }
}

#[tokio::test]
async fn postgres_rows_written_by_blockyard() {
    let schema = PgSchema::new().await;
    let store = schema.store(StoreOptions::default()).await;
    raw_exec(
        &store,
        "INSERT INTO blockyard_sessions (id, worker_id, user_sub, last_access, expires_at) VALUES
           ('a1', 'old', 'alice', now(), now() + interval '30 minutes'),
           ('a2', 'old', '', now(), '9999-12-31 23:59:59+00'),
           ('gone', 'old', '', now() - interval '2 hours', now() - interval '1 hour'),
           ('b1', 'other', 'bob', now(), now() + interval '30 minutes')",
    )
    .await;
    assert_eq!(store.get("a1").await.unwrap().unwrap().user_sub, "alice");
    assert_eq!(
        store.get("gone").await.unwrap(),
        None,
        "expired rows are not served"
    );
    assert_eq!(store.count_for_worker("old").await.unwrap(), 2);
    // blockyard's Get has no expiry filter: until the sweep removes it, the expired row still
    // routes requests, so a reroute moves it too.
    assert_eq!(store.reroute_worker("old", "new").await.unwrap(), 3);
    assert_eq!(store.get("a2").await.unwrap().unwrap().worker_id, "new");
    let gone: String =
        sqlx::query_scalar("SELECT worker_id FROM blockyard_sessions WHERE id = 'gone'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(gone, "new", "the expired, unswept row is rerouted");
    assert_eq!(
        store
            .workers_with_sessions()
            .await
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        vec!["new".to_string(), "other".to_string()]
    );
    raw_exec(
        &store,
        "INSERT INTO blockyard_sessions VALUES ('gone2', 'new', '', now() - interval '2 hours', now() - interval '1 hour')",
    )
    .await;
    assert_eq!(store.expire().await.unwrap(), 2);
    raw_exec(
        &store,
        "INSERT INTO blockyard_sessions VALUES ('gone3', 'new', '', now() - interval '2 hours', now() - interval '1 hour')",
    )
    .await;
    // delete_by_worker removes expired, unswept rows too.
    assert_eq!(store.delete_by_worker("new").await.unwrap(), 3);
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM blockyard_sessions WHERE worker_id = 'new'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(left, 0);
    assert_eq!(
        store
            .counts_by_worker()
            .await
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        vec![("other".into(), 1)]
    );
}

#[tokio::test]
async fn postgres_rows_written_here_read_as_blockyard_reads_them() {
    let schema = PgSchema::new().await;
    let store = schema.store(StoreOptions::default()).await; // idle TTL 0: never expires
    store.set("s", &Entry::new("w", "carol")).await.unwrap();
    let (worker, sub, far_future): (String, String, bool) = sqlx::query_as(
        "SELECT worker_id, user_sub, expires_at > now() + interval '100 years' FROM blockyard_sessions WHERE id = 's'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        (worker.as_str(), sub.as_str(), far_future),
        ("w", "carol", true)
    );
}

/// HSET + EXPIRE exactly as blockyard's Redis store writes a session: no index.
async fn blockyard_hset(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    id: &str,
    worker: &str,
) {
    let key = format!("{prefix}session:{id}");
    let now = chrono::Utc::now().timestamp().to_string();
    let _: () = conn
        .hset_multiple(
            &key,
            &[
                ("worker_id", worker),
                ("user_sub", "u"),
                ("last_access", now.as_str()),
            ],
        )
        .await
        .unwrap();
    let _: () = conn.expire(&key, 1800).await.unwrap();
}

#[tokio::test]
async fn redis_hashes_written_by_blockyard() {
    let prefix = RedisPrefix::new();
    let store = prefix.store(StoreOptions::default(), false).await;
    let mut conn = prefix.conn().await;
    for i in 0..25 {
        blockyard_hset(&mut conn, &prefix.prefix, &format!("f{i}"), "old").await;
    }
    blockyard_hset(&mut conn, &prefix.prefix, "other", "keep").await;
    store.set("mine", &Entry::new("old", "")).await.unwrap();

    assert_eq!(store.get("f3").await.unwrap().unwrap().worker_id, "old");
    assert_eq!(store.count_for_worker("old").await.unwrap(), 26);
    assert_eq!(store.entries_for_worker("old").await.unwrap().len(), 26);
    assert_eq!(store.counts_by_worker().await.unwrap()["keep"], 1);
    assert_eq!(store.reroute_worker("old", "new").await.unwrap(), 26);
    assert_eq!(store.get("f7").await.unwrap().unwrap().worker_id, "new");
    // blockyard keeps writing unindexed sessions for the old worker (a lagging proxy).
    blockyard_hset(&mut conn, &prefix.prefix, "late", "old").await;
    assert_eq!(store.reroute_worker("old", "new").await.unwrap(), 1);
    assert_eq!(store.delete_by_worker("new").await.unwrap(), 27);
    assert_eq!(store.get("f1").await.unwrap(), None);
    assert_eq!(store.get("other").await.unwrap().unwrap().worker_id, "keep");
}

#[tokio::test]
async fn redis_index_repairs_after_foreign_changes() {
    let prefix = RedisPrefix::new();
    let store = prefix.store(StoreOptions::default(), false).await;
    let mut conn = prefix.conn().await;
    store.set("s1", &Entry::new("a", "")).await.unwrap();
    store.set("s2", &Entry::new("a", "")).await.unwrap();
    // blockyard moves s1 to b and deletes s2 behind the index's back.
    let _: () = conn
        .hset(format!("{}session:s1", prefix.prefix), "worker_id", "b")
        .await
        .unwrap();
    let _: () = conn
        .del(format!("{}session:s2", prefix.prefix))
        .await
        .unwrap();
    assert_eq!(store.count_for_worker("a").await.unwrap(), 0);
    assert_eq!(store.count_for_worker("b").await.unwrap(), 1);
    assert_eq!(store.reroute_worker("a", "c").await.unwrap(), 0);
    assert_eq!(store.get("s1").await.unwrap().unwrap().worker_id, "b");
}

#[tokio::test]
async fn redis_hashes_written_here_read_as_blockyard_reads_them() {
    let prefix = RedisPrefix::new();
    let store = prefix
        .store(
            StoreOptions::with_idle_ttl(std::time::Duration::from_secs(1800)),
            true,
        )
        .await;
    let entry = Entry::new("w", "dave");
    store.set("s", &entry).await.unwrap();
    let mut conn = prefix.conn().await;
    let key = format!("{}session:s", prefix.prefix);
    let hash: std::collections::HashMap<String, String> = conn.hgetall(&key).await.unwrap();
    assert_eq!(hash["worker_id"], "w");
    assert_eq!(hash["user_sub"], "dave");
    assert_eq!(
        hash["last_access"],
        entry.last_access.timestamp().to_string()
    );
    assert_eq!(hash.len(), 3, "no extra fields in blockyard's hash");
    let ttl: i64 = conn.ttl(&key).await.unwrap();
    assert!((1790..=1800).contains(&ttl), "ttl {ttl}");
}

#[tokio::test]
async fn redis_sessions_kept_alive_by_blockyard_touches_stay_counted() {
    let prefix = RedisPrefix::new();
    let store = prefix.store(StoreOptions::default(), false).await;
    let index_only = prefix.store(StoreOptions::default(), true).await;
    let mut conn = prefix.conn().await;
    let key = format!("{}session:s", prefix.prefix);
    blockyard_hset(&mut conn, &prefix.prefix, "s", "w").await;
    let _: () = conn.expire(&key, 2).await.unwrap();
    // Indexed with a score from its 2 s TTL...
    assert_eq!(store.count_for_worker("w").await.unwrap(), 1);
    // ...then blockyard's Touch extends the TTL without knowing about the index.
    let _: () = conn.expire(&key, 1800).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(store.count_for_worker("w").await.unwrap(), 1);
    assert_eq!(store.entries_for_worker("w").await.unwrap().len(), 1);
    assert_eq!(store.expire().await.unwrap(), 0, "alive: nothing expired");
    assert_eq!(
        index_only.count_for_worker("w").await.unwrap(),
        1,
        "re-scored, not dropped"
    );
    assert_eq!(store.reroute_worker("w", "v").await.unwrap(), 1);
}

/// Shapes blockyard's Redis store can leave behind: its Touch is `HSET last_access` then
/// `EXPIRE`, not atomic, so a session that expired in between leaves a hash holding only
/// `last_access`; any writer can leave a garbled `last_access` or a key that is not UTF-8.
#[tokio::test]
async fn redis_shapes_left_by_foreign_writers_are_skipped() {
    let prefix = RedisPrefix::new();
    let store = prefix.store(StoreOptions::default(), false).await;
    let mut conn = prefix.conn().await;
    blockyard_hset(&mut conn, &prefix.prefix, "good", "w").await;
    store.set("mine", &Entry::new("w", "")).await.unwrap();
    let p = &prefix.prefix;
    let _: () = conn
        .hset(format!("{p}session:half"), "last_access", "1700000000")
        .await
        .unwrap();
    let _: () = conn
        .hset_multiple(
            format!("{p}session:garbled"),
            &[("worker_id", "w"), ("last_access", "yesterday")],
        )
        .await
        .unwrap();
    let mut binary_key = format!("{p}session:").into_bytes();
    binary_key.extend_from_slice(&[0xff, 0xfe, 0x00]);
    let _: () = conn
        .hset(binary_key.as_slice(), "worker_id", "w")
        .await
        .unwrap();

    assert_eq!(store.get("half").await.unwrap(), None, "not Corrupt");
    let entries = store.entries_for_worker("w").await.unwrap();
    let mut ids: Vec<&String> = entries.keys().collect();
    ids.sort();
    assert_eq!(ids, ["good", "mine"], "the garbled hash is skipped");
    assert_eq!(store.count_for_worker("w").await.unwrap(), 3);
    assert_eq!(store.reroute_worker("w", "v").await.unwrap(), 3);
    assert_eq!(store.get("good").await.unwrap().unwrap().worker_id, "v");
    assert_eq!(store.delete_by_worker("v").await.unwrap(), 3);
    assert_eq!(store.get("half").await.unwrap(), None);
    assert!(store.workers_with_sessions().await.unwrap().is_empty());
}

/// blockyard's table lives in `public` (an older setup), the operator is configured with the
/// default schema `blockyard` by mistake: migrate must refuse instead of creating an empty table
/// that hides the real one, and queries must never fall back to `public`.
#[tokio::test]
async fn migrate_refuses_to_shadow_blockyards_table_in_another_schema() {
    let db = common::TestDatabase::new().await;
    let public = PostgresStore::connect(&db.url, "public", StoreOptions::default())
        .await
        .unwrap();
    raw_exec(&public, BLOCKYARD_DDL).await;
    raw_exec(
        &public,
        "INSERT INTO blockyard_sessions VALUES ('s1', 'w1', '', now(), now() + interval '1 hour')",
    )
    .await;
    let store = PostgresStore::connect(&db.url, "blockyard", StoreOptions::default())
        .await
        .unwrap();
    // Unqualified, the query would have found public's table through a search path.
    let err = store.get("s1").await.unwrap_err().to_string();
    assert!(err.contains("migrate"), "{err}");
    let err = store.migrate("blockyard").await.unwrap_err().to_string();
    assert!(
        err.contains("\"public\"") && err.contains("--schema public"),
        "{err}"
    );
    let created: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relname = 'blockyard_sessions' AND n.nspname = 'blockyard'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(created, 0, "no shadow table");
    // The flag the message names works.
    public.migrate("public").await.unwrap();
    assert_eq!(public.get("s1").await.unwrap().unwrap().worker_id, "w1");
}

#[tokio::test]
async fn reserved_words_as_schema_names_are_quoted() {
    let db = common::TestDatabase::new().await;
    let store = PostgresStore::connect(&db.url, "user", StoreOptions::default())
        .await
        .unwrap();
    store.migrate("user").await.unwrap();
    store.migrate("user").await.unwrap();
    store.set("s", &Entry::new("w", "")).await.unwrap();
    assert_eq!(store.reroute_worker("w", "v").await.unwrap(), 1);
    assert_eq!(store.get("s").await.unwrap().unwrap().worker_id, "v");
    assert_eq!(
        store.workers_with_sessions().await.unwrap().len(),
        1,
        "skip scan in a quoted schema"
    );
    let err = PostgresStore::connect(&db.url, "pg_temp", StoreOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
}

/// blockyard appends `:` to a key prefix that lacks one (`REDIS_PREFIX=myapp` → keys
/// `myapp:session:ID`); the library and the CLI, given the same `myapp`, use the same keys.
#[tokio::test]
async fn a_prefix_without_colon_means_what_it_means_to_blockyard() {
    let prefix = RedisPrefix::new();
    let mut conn = prefix.conn().await;
    // What blockyard was configured with, and the keys it writes.
    let configured = prefix.prefix.trim_end_matches(':').to_string();
    assert!(!configured.ends_with(':'));
    blockyard_hset(&mut conn, &prefix.prefix, "s1", "old").await;
    blockyard_hset(&mut conn, &prefix.prefix, "s2", "old").await;

    // The library, configured like blockyard.
    let mut options = prefix.options(false);
    options.prefix = configured.clone();
    let store = session_operator::store::RedisStore::connect(
        &common::redis_url(),
        StoreOptions::default(),
        options,
    )
    .await
    .expect("connect");
    assert_eq!(store.prefix(), prefix.prefix);
    assert_eq!(store.get("s1").await.unwrap().unwrap().worker_id, "old");

    // The CLI, configured like blockyard, reroutes blockyard's hashes.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-operator"))
        .args([
            "sessions", "reroute", "--from", "old", "--to", "new", "-o", "json",
        ])
        .args([
            "--redis-url",
            &common::redis_url(),
            "--redis-prefix",
            &configured,
        ])
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .output()
        .expect("run the CLI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["rerouted"], 2, "{json}");
    for id in ["s1", "s2"] {
        let worker: Option<String> = conn
            .hget(format!("{}session:{id}", prefix.prefix), "worker_id")
            .await
            .unwrap();
        assert_eq!(worker.as_deref(), Some("new"), "{id} as blockyard reads it");
    }
    let glob = configured
        .replace('[', "\\[")
        .replace(']', "\\]")
        .replace('*', "\\*");
    let stray: Vec<String> = conn.keys(format!("{glob}session*")).await.unwrap();
    assert!(stray.is_empty(), "keys without the colon: {stray:?}");
}
