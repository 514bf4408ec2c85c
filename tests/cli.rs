//! The `session-operator` binary: migrate, the sessions commands, and its errors.

mod common;

use std::process::Output;

use common::{PgSchema, RedisPrefix};
use serde_json::Value;

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_session-operator"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run session-operator")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&ok(out)).expect("json output")
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure");
    assert_eq!(out.status.code(), Some(1), "an error exit, not a panic");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

#[tokio::test]
async fn migrate_then_operate_on_sessions_with_both_stores() {
    let schema = PgSchema::new().await;
    let prefix = RedisPrefix::new();
    let pg = common::pg_url();
    let redis = common::redis_url();
    let store = [
        "--database-url",
        pg.as_str(),
        "--redis-url",
        redis.as_str(),
        "--schema",
        schema.name.as_str(),
        "--redis-prefix",
        prefix.prefix.as_str(),
    ];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(store.iter())
            .map(std::string::ToString::to_string)
            .collect()
    };
    let call = |args: &[&str]| {
        let args = with(args);
        run(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[])
    };

    assert!(ok(&call(&["migrate"])).contains(&schema.name));
    ok(&call(&["migrate"])); // idempotent
    for (id, worker) in [("s1", "pod-a"), ("s2", "pod-a"), ("s3", "pod-b")] {
        ok(&call(&[
            "sessions",
            "set",
            id,
            "--worker",
            worker,
            "--user-sub",
            "alice",
        ]));
    }
    let got = json(&call(&["sessions", "get", "s1", "-o", "json"]));
    assert_eq!(got["entry"]["worker_id"], "pod-a");
    assert_eq!(got["entry"]["user_sub"], "alice");
    let counts = json(&call(&["sessions", "count", "-o", "json"]));
    assert_eq!(counts, serde_json::json!({ "pod-a": 2, "pod-b": 1 }));
    let text = ok(&call(&["sessions", "count"]));
    assert!(text.contains("pod-a") && text.contains("TOTAL"), "{text}");
    let moved = json(&call(&[
        "sessions", "reroute", "--from", "pod-a", "--to", "pod-c", "-o", "json",
    ]));
    assert_eq!(moved["rerouted"], 2);
    assert!(
        ok(&call(&[
            "sessions", "reroute", "--from", "pod-c", "--to", "pod-d"
        ]))
        .starts_with("2 sessions rerouted")
    );
    let list = json(&call(&[
        "sessions", "list", "--worker", "pod-d", "-o", "json",
    ]));
    assert_eq!(list.as_object().map(serde_json::Map::len), Some(2));
    let deleted = json(&call(&["sessions", "delete-worker", "pod-d", "-o", "json"]));
    assert_eq!(deleted["deleted"], 2);
    let swept = json(&call(&[
        "sessions",
        "sweep-idle",
        "--max-age",
        "1h",
        "--worker",
        "pod-b",
        "-o",
        "json",
    ]));
    assert_eq!(swept["removed"], 0);
    let expired = json(&call(&["sessions", "expire", "-o", "json"]));
    assert_eq!(expired["removed"], 0);
    let missing = call(&["sessions", "get", "s1"]);
    assert!(one_line_error(&missing).contains("not found"));
}

#[test]
fn no_store_configured_is_a_clear_error() {
    let err = one_line_error(&run(&["sessions", "count"], &[]));
    assert!(err.contains("--database-url"), "{err}");
}

#[test]
fn unreachable_stores_fail_fast_without_leaking_passwords() {
    let pg = run(
        &[
            "sessions",
            "count",
            "--database-url",
            "postgres://app:hunter2@127.0.0.1:1/db",
        ],
        &[],
    );
    let err = one_line_error(&pg);
    assert!(
        err.contains("Postgres") && err.contains("app:***@127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");

    let redis = run(
        &["sessions", "count"],
        &[("REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")],
    );
    let err = one_line_error(&redis);
    assert!(err.contains("Redis") && !err.contains("hunter2"), "{err}");
}

#[test]
fn malformed_urls_and_flags_are_rejected() {
    let err = one_line_error(&run(
        &["sessions", "count", "--database-url", "not a url hunter2"],
        &[],
    ));
    assert!(!err.contains("hunter2"), "{err}");
    let err = one_line_error(&run(
        &["sessions", "count", "--redis-url", "http://x:hunter2@h/"],
        &[],
    ));
    assert!(!err.contains("hunter2"), "{err}");
    let bad_schema = run(
        &[
            "migrate",
            "--database-url",
            &common::pg_url(),
            "--schema",
            "Robert'); DROP TABLE x;--",
        ],
        &[],
    );
    assert!(one_line_error(&bad_schema).contains("schema"));
    // clap's own usage errors exit 2 with a message, never a panic.
    let out = run(&["sessions", "sweep-idle", "--max-age", "soon"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-age"));
}

#[test]
fn help_does_not_print_environment_secrets() {
    let out = run(
        &["sessions", "--help"],
        &[("DATABASE_URL", "postgres://u:hunter2@h/db")],
    );
    let help = ok(&out);
    assert!(
        help.contains("--database-url") && !help.contains("hunter2"),
        "{help}"
    );
}

#[test]
fn an_unmigrated_schema_points_at_migrate() {
    let pg = common::pg_url();
    let out = run(
        &[
            "sessions",
            "get",
            "s",
            "--database-url",
            &pg,
            "--schema",
            "never_migrated_here",
        ],
        &[],
    );
    let err = one_line_error(&out);
    assert!(err.contains("session-operator migrate"), "{err}");
    // sqlx appends the line of the Postgres server's C source; it means nothing to a user.
    assert!(!err.contains(" at line "), "{err}");
}

/// A URL of another database is refused before anything connects: it used to be read as
/// Postgres settings and sent to whatever answered on the port.
#[test]
fn a_database_url_of_another_scheme_is_refused_without_connecting() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let url = format!("mysql://app:hunter2@127.0.0.1:{port}/db");
    for args in [
        vec!["sessions", "count", "--database-url", url.as_str()],
        vec!["migrate", "--database-url", url.as_str()],
        vec!["sessions", "get", "s", "--database-url", url.as_str()],
    ] {
        let err = one_line_error(&run(&args, &[]));
        assert!(
            err.contains("--database-url") && err.contains("postgres, postgresql"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }
    assert!(
        listener.accept().is_err(),
        "nothing may connect to a mysql:// URL"
    );
}

/// `0s` disables the Postgres timeouts, as `0` does in Postgres: with a row locked for a
/// moment, a write waits for it instead of failing after 1 ms.
#[tokio::test]
async fn zero_postgres_timeouts_mean_no_timeout() {
    let schema = PgSchema::new().await;
    let pg = common::pg_url();
    let store = [
        "--database-url",
        pg.as_str(),
        "--schema",
        schema.name.as_str(),
    ];
    let with = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&store);
        all.iter()
            .map(std::string::ToString::to_string)
            .collect::<Vec<_>>()
    };
    ok(&run(
        &with(&["migrate"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &[],
    ));
    ok(&run(
        &with(&["sessions", "set", "s1", "--worker", "a"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &[],
    ));
    let pool = sqlx::PgPool::connect(&pg).await.expect("pool");
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM {}.blockyard_sessions WHERE id = 's1' FOR UPDATE",
        schema.name
    )))
    .fetch_one(&mut *tx)
    .await
    .expect("lock the row");
    let args = with(&[
        "sessions",
        "set",
        "s1",
        "--worker",
        "b",
        "--pg-lock-timeout",
        "0s",
        "--pg-statement-timeout",
        "0s",
    ]);
    let writer = tokio::task::spawn_blocking(move || {
        run(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[])
    });
    // The write waits on the lock (a 1 ms lock timeout would have failed it by now, retries
    // included); release the row once the write is seen waiting.
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND application_name = 'session-operator' AND datname = current_database()";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let n: i64 = sqlx::query_scalar(waiting)
            .fetch_one(&pool)
            .await
            .expect("pg_stat_activity");
        if n > 0 {
            break;
        }
        assert!(!writer.is_finished(), "the write did not wait for the lock");
        assert!(
            std::time::Instant::now() < deadline,
            "the write never waited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Well past 1 ms and the three retries (0.6 s) the old conversion allowed.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    tx.rollback().await.expect("release");
    ok(&writer.await.expect("writer"));
    let got = json(&run(
        &with(&["sessions", "get", "s1", "-o", "json"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &[],
    ));
    assert_eq!(got["entry"]["worker_id"], "b");
}

/// A kubeconfig that does not parse: the error says so once, on one line (kube's error
/// repeats its source's message, which printed the parse error three times, with snippets).
#[test]
fn a_kubeconfig_parse_error_is_printed_once() {
    let path = std::env::temp_dir().join(format!("cli-bad-{}.kubeconfig", std::process::id()));
    std::fs::write(&path, "apiVersion: v1\nclusters: [oops\n").expect("write");
    let out = run(
        &[
            "run",
            "--database-url",
            &common::pg_url(),
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[("KUBECONFIG", path.to_str().expect("path"))],
    );
    let _ = std::fs::remove_file(&path);
    let err = one_line_error(&out);
    assert_eq!(err.matches("unclosed bracket").count(), 1, "{err}");
    assert!(err.contains("failed to parse kubeconfig YAML"), "{err}");
}

/// Durations from the command line that would overflow when added up are an error, never a
/// panic; a huge sweep age sweeps nothing.
#[tokio::test]
async fn absurd_durations_are_errors_not_panics() {
    let schema = PgSchema::new().await;
    let pg = common::pg_url();
    let store = [
        "--database-url",
        pg.as_str(),
        "--schema",
        schema.name.as_str(),
    ];
    let with = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&store);
        run(&all, &[])
    };
    ok(&with(&["migrate"]));
    for flag in ["--touch-window", "--idle-ttl"] {
        let err = one_line_error(&with(&["sessions", "count", flag, "584000000000y"]));
        assert!(err.contains("100 years"), "{err}");
    }
    ok(&with(&["sessions", "set", "s", "--worker", "w"]));
    let out = with(&[
        "sessions",
        "sweep-idle",
        "--max-age",
        "584000000000y",
        "-o",
        "json",
    ]);
    assert_eq!(json(&out)["removed"], 0, "nothing is that old");
}

#[test]
fn redis_unix_socket_passwords_are_not_printed() {
    let err = one_line_error(&run(
        &[
            "sessions",
            "count",
            "--redis-url",
            "redis+unix:///nonexistent/redis.sock?pass=hunter2",
        ],
        &[],
    ));
    assert!(!err.contains("hunter2"), "{err}");
}
