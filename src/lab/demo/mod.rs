//! `session-operator demo`: an emulated cluster (kube-emulator with its workload controllers),
//! the real operator in-process, simulated proxies that create and use sessions, and a rolling
//! update, a scale-down and a crash — with a live progress line and a closing report.

mod proxies;
mod report;

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store as Reader;
use kube_emulator::{Controllers, Crash, Emulator};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::shared::{
    Tracker, WORKERS, pod_reader, prepare, ready_workers, restart, rollout_complete,
    session_policy, workers_deployment,
};
use crate::connect::Connected;
use crate::connect::StoreArgs;
use crate::controller::Settings;
use crate::leader::LeaseConfig;
use crate::operator::{self, OperatorConfig};
use crate::policy::SessionPolicy;
use crate::store::MemoryStore;
use crate::telemetry::{Health, Metrics};
use proxies::Proxies;
use report::Report;

const NS: &str = "demo";

#[derive(Debug, Clone, Args)]
pub(crate) struct DemoArgs {
    /// Sessions live in Postgres and/or Redis when URLs are given; in memory otherwise.
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Worker pods in the Deployment.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=500))]
    pub(crate) workers: u32,
    /// Sessions the simulated proxies create before the rollout.
    #[arg(long, default_value_t = 2000)]
    pub(crate) sessions: u64,
    /// Simulated proxy tasks.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) proxies: u32,
    /// The policy's `migration.replacementWait`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) replacement_wait: Duration,
    /// How long an emulated pod takes from start to Ready.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pub(crate) pod_ready_delay: Duration,
    /// After the scenario, keep the cluster, operator and proxies running and print a
    /// kubeconfig path for kubectl; stop with Ctrl-C.
    #[arg(long)]
    pub(crate) keep_running: bool,
}

/// Runs the demo; fails when a session was lost or left on a departed worker.
pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let out = Output::new();
    out.say("Starting an emulated cluster (kube-emulator: 3 nodes, workload controllers, kubelet)");
    let emulator = Emulator::builder()
        .controllers(Controllers::all())
        .nodes(3)
        .pod_ready_delay(args.pod_ready_delay)
        .start()
        .await
        .context("starting the emulator")?;
    let control = emulator.control();
    prepare(&emulator, NS)?;
    let client = emulator.client()?;

    let (sessions, store_name) = connect(&args).await?;
    let store = sessions.store.clone();
    out.say(&format!("Session store: {store_name}"));

    // The operator, exactly as `run` wires it, with leader election on the emulator's Lease.
    let shutdown = CancellationToken::new();
    let metrics = Metrics::default();
    let operator = tokio::spawn(operator::run(
        client.clone(),
        sessions,
        OperatorConfig {
            identity: "demo-operator".into(),
            lease: Some(LeaseConfig {
                name: "session-operator".into(),
                namespace: NS.into(),
                identity: "demo-operator".into(),
                duration: Duration::from_secs(15),
            }),
            expiry_interval: Duration::from_secs(60),
            controller: Settings {
                namespaces: vec![NS.into()],
                orphan_grace: Duration::from_secs(2),
                counts_interval: Duration::from_secs(2),
                ..Settings::default()
            },
        },
        metrics.clone(),
        Arc::new(Health::default()),
        shutdown.clone(),
    ));

    let pods = pod_reader(&client, NS, shutdown.clone());
    create_workload(&client, &args).await?;
    out.say(&format!(
        "Deployment {WORKERS}: {} workers; SessionPolicy {WORKERS}: reroute on replace and on terminate, replacementWait {}",
        args.workers,
        humantime::format_duration(args.replacement_wait)
    ));
    let ready_target = args.workers as usize;
    wait(&out, "pods starting", Duration::from_secs(60), || {
        let ready = ready_workers(&pods).len();
        (
            ready >= ready_target,
            format!("{ready}/{ready_target} pods Ready"),
        )
    })
    .await?;

    let proxies = Proxies::start(store.clone(), pods.clone(), args.proxies, args.sessions);
    let tracker = Tracker::start(store.clone(), pods.clone(), args.replacement_wait);
    let started = Instant::now();
    wait(
        &out,
        "proxies creating sessions",
        Duration::from_secs(120),
        || {
            let created = proxies.created();
            (created >= args.sessions, format!("{created} sessions"))
        },
    )
    .await?;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    out.say("Rolling update (as `kubectl rollout restart deployment/workers`)");
    tracker.phase("rolling update");
    restart(&deployments, WORKERS)
        .await
        .context("restarting the Deployment")?;
    settle(
        &out,
        "rolling update",
        &deployments,
        &pods,
        &tracker,
        &metrics,
    )
    .await?;

    let scaled = (args.workers * 5 / 8).max(1);
    out.say(&format!("Scale-down {} → {scaled}", args.workers));
    tracker.phase("scale-down");
    deployments
        .patch(
            WORKERS,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"replicas": scaled}})),
        )
        .await
        .context("scaling the Deployment")?;
    settle(&out, "scale-down", &deployments, &pods, &tracker, &metrics).await?;

    let victim = ready_workers(&pods)
        .into_iter()
        .next()
        .context("no Ready worker to crash")?;
    out.say(&format!(
        "Worker {victim} crashes (phase Failed); its ReplicaSet replaces it"
    ));
    tracker.phase("crash");
    control
        .crash_pod(NS, &victim, Crash::Fail)
        .map_err(|e| anyhow::anyhow!("crashing {victim}: {e}"))?;
    settle(&out, "crash", &deployments, &pods, &tracker, &metrics).await?;

    let report = Report::gather(
        &store,
        &proxies,
        &tracker,
        &metrics,
        args.replacement_wait,
        started.elapsed(),
    )
    .await?;
    out.say("");
    print!("{report}");
    if args.keep_running {
        let path = std::env::temp_dir().join("session-operator-demo.kubeconfig");
        std::fs::write(&path, emulator.kubeconfig())
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "\nThe cluster keeps running. Try:\n  export KUBECONFIG={}\n  kubectl -n {NS} get sp,pods\n  kubectl -n {NS} rollout restart deployment/{WORKERS}\nStop with Ctrl-C.",
            path.display()
        );
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
    }
    proxies.stop().await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
    emulator.shutdown().await;
    report.verdict()
}

/// The configured store, or an embedded memory store when no URL is given.
async fn connect(args: &DemoArgs) -> anyhow::Result<(Connected, String)> {
    if args.store.database_url.is_none() && args.store.redis_url.is_none() {
        return Ok((
            Connected::plain(Arc::new(MemoryStore::new(args.store.options()))),
            "embedded memory store (pass --database-url/--redis-url for Postgres/Redis)".into(),
        ));
    }
    if let Some(url) = &args.store.database_url {
        args.store
            .postgres(url)
            .await?
            .migrate(&args.store.schema)
            .await
            .context("migrating the Postgres schema")?;
    }
    let connected = args.store.connect().await?;
    connected.reapply_migrations();
    let name = match (&args.store.database_url, &args.store.redis_url) {
        (Some(_), Some(_)) => "Redis cache over Postgres (layered)",
        (Some(_), None) => "Postgres",
        _ => "Redis",
    };
    Ok((connected, name.into()))
}

async fn create_workload(client: &Client, args: &DemoArgs) -> anyhow::Result<()> {
    Api::<Deployment>::namespaced(client.clone(), NS)
        .create(
            &PostParams::default(),
            &workers_deployment(NS, args.workers, 2)?,
        )
        .await
        .context("creating the Deployment")?;
    let migration = json!({"onReplace": "Reroute", "onTerminate": "Reroute",
        "replacementWait": crate::policy::duration::format(args.replacement_wait)});
    Api::<SessionPolicy>::namespaced(client.clone(), NS)
        .create(
            &PostParams::default(),
            &session_policy(NS, migration, true)?,
        )
        .await
        .context("creating the SessionPolicy")?;
    Ok(())
}

/// Waits until the Deployment finished its rollout and no session sits on a departed worker.
async fn settle(
    out: &Output,
    phase: &str,
    deployments: &Api<Deployment>,
    pods: &Reader<Pod>,
    tracker: &Tracker,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    // Let the controllers see the change first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut rolled_out = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(d) = deployments.get(WORKERS).await {
            rolled_out = rollout_complete(&d);
        }
        let on_departed = tracker.sessions_on_departed().await?;
        let ready = ready_workers(pods).len();
        // A Failed pod stays until garbage-collected; its ReplicaSet already replaced it.
        let total = pods
            .state()
            .iter()
            .filter(|p| !crate::controller::workers::is_finished(p))
            .count();
        out.progress(&format!(
            "  [{phase}] pods {ready} Ready / {total} · sessions on departed workers {on_departed} · rerouted {} · deleted {}",
            metrics.sessions_rerouted.get(),
            metrics.sessions_deleted.get(),
        ));
        if rolled_out && on_departed == 0 && total == ready && tracker.pending() == 0 {
            out.done();
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{phase} did not settle within 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for `check` to say done, showing its progress text.
async fn wait(
    out: &Output,
    phase: &str,
    timeout: Duration,
    mut check: impl FnMut() -> (bool, String),
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let (done, text) = check();
        out.progress(&format!("  [{phase}] {text}"));
        if done {
            out.done();
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{phase}: no progress within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A progress line that rewrites itself on a terminal and prints sparingly elsewhere.
struct Output {
    tty: bool,
    last: std::sync::Mutex<(Instant, String)>,
}

impl Output {
    fn new() -> Self {
        Self {
            tty: std::io::stdout().is_terminal(),
            last: std::sync::Mutex::new((Instant::now(), String::new())),
        }
    }

    fn say(&self, line: &str) {
        println!("{line}");
    }

    fn progress(&self, line: &str) {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.tty {
            print!("\r\x1b[2K{line}");
            let _ = std::io::stdout().flush();
        } else if last.0.elapsed() >= Duration::from_secs(2) && last.1 != line {
            println!("{line}");
            last.0 = Instant::now();
        }
        last.1 = line.to_string();
    }

    /// Ends a progress line, keeping its final state on screen.
    fn done(&self) {
        let last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.tty {
            println!();
        } else {
            println!("{}", last.1);
        }
    }
}
