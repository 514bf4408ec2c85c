//! The fault suite: rollouts under injected faults, against Postgres and Redis instances of the
//! suite's own (stopped, killed, partitioned by a TCP proxy), the API-server emulator (cut off
//! from one operator by a TCP proxy of that operator's own) and the real `session-operator run`
//! binary. Each scenario prints one row — sessions expected,
//! present, on departed workers, stale in Redis (as a proxy reading Redis first sees them),
//! row changes committed under a superseded leadership epoch, and the time to converge after
//! the fault ended — and asserts that it converged with nothing lost.
//!
//! `cargo test --test faults quick_` runs the quick subset (part of `scripts/test.sh`);
//! `./scripts/faults.sh` runs them all and prints the table (docs/reliability.md).

mod api_proxy;
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

use api_proxy::{ApiProxy, Mode};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use scene::{PER_WORKER, Scene, converge};

use crate::harness::{Operator, OperatorConfig, eventually};

/// A lock timeout far beyond the lease, as in the report that found the fencing gap.
fn long_lock_wait(mut config: OperatorConfig<'_>) -> OperatorConfig<'_> {
    config.extra = vec!["--pg-lock-timeout".into(), "30s".into()];
    config
}

/// This operator reaches the API server only through `proxy`.
fn behind<'a>(proxy: &ApiProxy, mut config: OperatorConfig<'a>) -> OperatorConfig<'a> {
    config.kubeconfig = Some(proxy.kubeconfig());
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

/// How long the API server stays cut off from a single replica: a lease (4 s) and a little
/// more, about as long as a leader stays cut off below before its standby takes over.
const API_CUT: Duration = Duration::from_secs(5);

/// Two replicas, each behind an API proxy of its own. The leader migrates the first half of
/// the rollout; then its connections to the API server are cut (`mode`) and the second half
/// happens. The standby takes over once the leader's lease expired, and the old leader's
/// connections come back while the new leader works: the old leader must change nothing and
/// exit; the new one finishes the rollout.
async fn api_cut_with_leader_election(name: &'static str, mode: Mode) {
    let scene = Scene::new(name, false).await;
    let api = scene.cluster.emulator().addr();
    let (proxy_a, proxy_b) = (ApiProxy::start(api).await, ApiProxy::start(api).await);
    let mut a = Operator::start(
        &scene.cluster,
        &scene.stores,
        behind(&proxy_a, scene.operator("op-a")),
    )
    .await;
    a.wait_leader(Duration::from_secs(20)).await;
    let mut b = Operator::start(
        &scene.cluster,
        &scene.stores,
        behind(&proxy_b, scene.operator("op-b")),
    )
    .await;
    let half = scene.old.len() / 2;
    scene.replace(0..half).await;
    scene.migrated_in_postgres().await;

    proxy_a.cut(mode).await;
    let cut = Instant::now();
    scene.replace(half..scene.old.len()).await;
    b.wait_leader(Duration::from_secs(30)).await;
    eventually(
        Duration::from_secs(30),
        "op-b claimed the leadership epoch",
        || async { b.logged("claimed the leadership epoch").then_some(()) },
    )
    .await;
    let during = scene.measure().await;
    proxy_a.restore().await;
    let ended = Instant::now();
    let took = converge(&scene, ended).await;
    let exit = a.wait_exit(Duration::from_secs(30)).await;
    println!(
        "FAULTS-NOTE | {name}: op-a cut off for {:.1} s (until op-b claimed its epoch), \
         converged {:.1} s after the cut; op-a exited with {exit:?}",
        ended.duration_since(cut).as_secs_f64(),
        (ended + took).duration_since(cut).as_secs_f64(),
    );
    assert!(
        exit.is_some_and(|code| code != 0),
        "{name}: op-a, deposed, exits with an error (got {exit:?})"
    );
    // What op-a sent while cut off (a renewal, a release) arrived after the handover.
    let (namespace, lease) = scene.cluster.lease();
    let holder = Api::<Lease>::namespaced(scene.cluster.client.clone(), &namespace)
        .get(&lease)
        .await
        .expect("read the Lease")
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(
        holder.as_deref(),
        Some("op-b"),
        "{name}: op-b keeps the Lease"
    );
    assert_eq!(
        b.wait_exit(Duration::ZERO).await,
        None,
        "{name}: op-b keeps leading"
    );
    scene.report(during, took).await;
}

/// One replica without leader election, behind an API proxy. It migrates the first half of
/// the rollout; then its connections to the API server are cut (`mode`) for [`API_CUT`],
/// during which the second half happens. It must see none of it while cut off, keep running,
/// and finish once the connections are back.
async fn api_cut_without_leader_election(name: &'static str, mode: Mode) {
    let scene = Scene::new(name, false).await;
    let proxy = ApiProxy::start(scene.cluster.emulator().addr()).await;
    let mut config = behind(&proxy, scene.operator("op-a"));
    config.extra = vec!["--leader-elect".into(), "false".into()];
    let mut a = Operator::start(&scene.cluster, &scene.stores, config).await;
    let half = scene.old.len() / 2;
    scene.replace(0..half).await;
    scene.migrated_in_postgres().await;

    proxy.cut(mode).await;
    let cut = Instant::now();
    scene.replace(half..scene.old.len()).await;
    scene.old_pods_gone().await;
    tokio::time::sleep_until((cut + API_CUT).into()).await;
    let during = scene.measure().await;
    let cut_off = ((scene.old.len() - half) * PER_WORKER) as u64;
    assert_eq!(
        during.departed,
        Some(cut_off),
        "{name}: cut off, op-a saw nothing of the rollout's second half"
    );
    proxy.restore().await;
    let ended = Instant::now();
    let took = converge(&scene, ended).await;
    let exit = a.wait_exit(Duration::ZERO).await;
    println!(
        "FAULTS-NOTE | {name}: op-a cut off for {:.1} s, {cut_off} sessions on departed \
         workers when the connections came back, converged {:.1} s later",
        ended.duration_since(cut).as_secs_f64(),
        took.as_secs_f64(),
    );
    assert_eq!(exit, None, "{name}: op-a rides out the cut (it exited)");
    scene.report(during, took).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quick_api_connections_reset_with_leader_election() {
    api_cut_with_leader_election(
        "API connections of the leader reset mid-rollout, standby takes over",
        Mode::Reset,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_connections_blackholed_with_leader_election() {
    api_cut_with_leader_election(
        "API connections of the leader blackholed mid-rollout, standby takes over",
        Mode::Blackhole,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quick_api_connections_reset_without_leader_election() {
    api_cut_without_leader_election(
        "API connections reset mid-rollout, one replica, no leader election",
        Mode::Reset,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_connections_blackholed_without_leader_election() {
    api_cut_without_leader_election(
        "API connections blackholed mid-rollout, one replica, no leader election",
        Mode::Blackhole,
    )
    .await;
}
