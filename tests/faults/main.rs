//! The fault suite: rollouts under injected faults, against Postgres and Redis instances of the
//! suite's own (stopped, killed, partitioned by a TCP proxy), the API-server emulator and the
//! real `session-operator run` binary. Each scenario prints one row — sessions expected,
//! present, on departed workers, stale in Redis (as a proxy reading Redis first sees them),
//! row changes committed under a superseded leadership epoch, and the time to converge after
//! the fault ended — and asserts that it converged with nothing lost.
//!
//! `cargo test --test faults quick_` runs the quick subset (part of `scripts/test.sh`);
//! `./scripts/faults.sh` runs them all and prints the table (docs/reliability.md).

#[path = "../e2e/backend.rs"]
#[allow(dead_code)] // the harness's backend selection; the suite runs on the emulator
mod backend;
#[path = "../common/mod.rs"]
mod common;
#[path = "../e2e/harness.rs"]
#[allow(dead_code)] // the e2e harness, of which the suite uses a part
mod harness;
mod instances;
mod scene;

use std::time::{Duration, Instant};

use scene::{Scene, converge};

use crate::harness::{Operator, OperatorConfig, eventually};

/// A lock timeout far beyond the lease, as in the report that found the fencing gap.
fn long_lock_wait(mut config: OperatorConfig<'_>) -> OperatorConfig<'_> {
    config.extra = vec!["--pg-lock-timeout".into(), "30s".into()];
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quick_redis_partitioned_mid_rollout() {
    let scene = Scene::new("Redis partitioned from the operator mid-rollout", false).await;
    let a = Operator::start(&scene.cluster, &scene.stores, scene.operator("op-a")).await;
    a.wait_leader(Duration::from_secs(20)).await;
    scene.proxy.cut();
    scene.rollout().await;
    scene.migrated_in_postgres().await;
    scene.condition("CacheAvailable", "False").await;
    let during = scene.measure().await;
    scene.proxy.restore();
    let ended = Instant::now();
    let took = converge(&scene, ended).await;
    scene.report(during, took).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quick_redis_down_at_start() {
    let mut scene = Scene::new(
        "Redis down when the operator starts (persistent Redis)",
        true,
    )
    .await;
    scene.redis.kill();
    let a = Operator::start(&scene.cluster, &scene.stores, scene.operator("op-a")).await;
    a.wait_leader(Duration::from_secs(20)).await;
    scene.rollout().await;
    scene.migrated_in_postgres().await;
    scene.condition("CacheAvailable", "False").await;
    scene.redis.resume();
    let ended = Instant::now();
    let during = scene.measure().await;
    let took = converge(&scene, ended).await;
    scene.condition("CacheAvailable", "True").await;
    scene.report(during, took).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_with_persistence_and_operator_restart() {
    let mut scene = Scene::new(
        "Redis killed (persistent), operator restarted meanwhile",
        true,
    )
    .await;
    let mut a = Operator::start(&scene.cluster, &scene.stores, scene.operator("op-a")).await;
    a.wait_leader(Duration::from_secs(20)).await;
    scene.redis.kill();
    scene.rollout().await;
    scene.migrated_in_postgres().await;
    assert_eq!(a.terminate().await, Some(0), "clean exit on SIGTERM");
    let b = Operator::start(&scene.cluster, &scene.stores, scene.operator("op-a2")).await;
    b.wait_leader(Duration::from_secs(30)).await;
    scene.redis.resume();
    let ended = Instant::now();
    let during = scene.measure().await;
    let took = converge(&scene, ended).await;
    scene.report(during, took).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_without_persistence() {
    let mut scene = Scene::new("Redis killed (no persistence) mid-rollout", false).await;
    let a = Operator::start(&scene.cluster, &scene.stores, scene.operator("op-a")).await;
    a.wait_leader(Duration::from_secs(20)).await;
    scene.redis.kill();
    scene.rollout().await;
    scene.migrated_in_postgres().await;
    scene.redis.resume();
    let ended = Instant::now();
    let during = scene.measure().await;
    let took = converge(&scene, ended).await;
    scene.report(during, took).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_mid_rollout() {
    let scene = Scene::new("Postgres stopped mid-rollout", false).await;
    let a = Operator::start(&scene.cluster, &scene.stores, scene.operator("op-a")).await;
    a.wait_leader(Duration::from_secs(20)).await;
    scene.pg.stop();
    scene.rollout().await;
    scene.condition("StoreAvailable", "False").await;
    // Once the pool's connections are gone, the cause is named, not "pool timed out".
    let message = scene
        .condition_saying("StoreAvailable", "False", "Connection refused")
        .await;
    println!("FAULTS-NOTE | Postgres stopped: StoreAvailable=False, {message}");
    scene.pg.resume();
    let ended = Instant::now();
    let during = scene.measure().await;
    let took = converge(&scene, ended).await;
    scene.report(during, took).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_sigkill_mid_rollout() {
    let scene = Scene::new("leader SIGKILL mid-rollout, standby takes over", false).await;
    let mut a = Operator::start(&scene.cluster, &scene.stores, scene.operator("op-a")).await;
    a.wait_leader(Duration::from_secs(20)).await;
    let b = Operator::start(&scene.cluster, &scene.stores, scene.operator("op-b")).await;
    scene.rollout().await;
    eventually(
        Duration::from_secs(20),
        "op-a committed a batch",
        || async { (!a.mutations().is_empty()).then_some(()) },
    )
    .await;
    a.kill().await;
    let ended = Instant::now();
    let during = scene.measure().await;
    b.wait_leader(Duration::from_secs(30)).await;
    let took = converge(&scene, ended).await;
    scene.report(during, took).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_sigstop_with_a_held_row_lock() {
    let scene = Scene::new(
        "leader SIGSTOP, a proxy holding a row of each worker",
        false,
    )
    .await;
    let mut a = Operator::start(
        &scene.cluster,
        &scene.stores,
        long_lock_wait(scene.operator("op-a")),
    )
    .await;
    a.wait_leader(Duration::from_secs(20)).await;
    let b = Operator::start(
        &scene.cluster,
        &scene.stores,
        long_lock_wait(scene.operator("op-b")),
    )
    .await;
    let proxy = scene.hold_one_row_of_each_old_worker().await;
    scene.rollout().await;
    // Everything but the locked rows moves although the locks are held.
    scene.departed_at_most(scene.old.len() as u64).await;
    a.signal("STOP");
    b.wait_leader(Duration::from_secs(30)).await;
    proxy.commit().await.expect("release the rows");
    let ended = Instant::now();
    let during = scene.measure().await;
    let took = converge(&scene, ended).await;
    a.signal("CONT");
    assert_ne!(
        a.wait_exit(Duration::from_secs(20)).await,
        Some(0),
        "op-a exits deposed"
    );
    scene.report(during, took).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_down_for_a_whole_rollout() {
    let scene = Scene::new("operator down for a whole rollout", false).await;
    scene.rollout().await;
    scene.old_pods_gone().await;
    let during = scene.measure().await;
    let started = Instant::now();
    let a = Operator::start(&scene.cluster, &scene.stores, scene.operator("op-a")).await;
    let took = converge(&scene, started).await;
    drop(a);
    scene.report(during, took).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_under_concurrent_writers() {
    let mut scene = Scene::new("rollout under 8 concurrent writers", false).await;
    let a = Operator::start(&scene.cluster, &scene.stores, scene.operator("op-a")).await;
    a.wait_leader(Duration::from_secs(20)).await;
    let writers = scene::Writers::start(&scene, 8);
    scene.rollout().await;
    writers.route(scene.new.clone());
    tokio::time::sleep(Duration::from_secs(2)).await; // writers keep writing meanwhile
    let written = writers.stop().await;
    scene.seeded += written;
    let ended = Instant::now();
    let during = scene.measure().await;
    let took = converge(&scene, ended).await;
    scene.report(during, took).await;
}
