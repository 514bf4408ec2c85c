//! `session-operator demo`, the README's first command, run as a user runs it: the binary with
//! small sizes, on the embedded store and on real Postgres + Redis.

#[path = "common/mod.rs"]
mod common;

use std::process::Command;

fn demo(extra: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_session-operator"))
        .args([
            "demo",
            "--workers",
            "4",
            "--sessions",
            "300",
            "--replacement-wait",
            "2s",
        ])
        .args(extra)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .output()
        .expect("run the demo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn assert_report(ok: bool, text: &str) {
    assert!(ok, "the demo failed:\n{text}");
    for line in [
        "sessions created by the proxies        300",
        "sessions lost                          0",
        "after replacementWait                0",
        "rolling update",
        "scale-down",
        "crash",
    ] {
        assert!(text.contains(line), "the report lacks {line:?}:\n{text}");
    }
    let rerouted: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("sessions rerouted by the operator"))
        .and_then(|n| n.trim().parse().ok())
        .expect("rerouted count");
    assert!(
        rerouted >= 300,
        "a rolling update moves every session at least once:\n{text}"
    );
}

#[test]
fn demo_on_the_embedded_store_loses_nothing() {
    let (ok, text) = demo(&[]);
    assert!(text.contains("embedded memory store"), "{text}");
    assert_report(ok, &text);
}

#[test]
fn demo_on_postgres_and_redis_loses_nothing() {
    let schema = common::unique("demo");
    let prefix = format!("{}:", common::unique("demo"));
    let (ok, text) = demo(&[
        "--database-url",
        &common::pg_url(),
        "--redis-url",
        &common::redis_url(),
        "--schema",
        &schema,
        "--redis-prefix",
        &prefix,
    ]);
    // Clean up what the demo created, whatever its outcome.
    let cleanup = std::process::Command::new("psql")
        .arg(common::pg_url())
        .args(["-qc", &format!("DROP SCHEMA IF EXISTS {schema} CASCADE")])
        .status();
    let _ = cleanup;
    assert!(text.contains("Redis cache over Postgres"), "{text}");
    assert_report(ok, &text);
}
