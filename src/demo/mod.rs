//! `session-operator demo`: an emulated cluster (kube-emulator with its workload controllers),
//! the real operator in-process, simulated proxies that create and use sessions, and a rolling
//! update, a scale-down and a crash — with a live progress line and a closing report.

mod proxies;
mod tracker;

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store as Reader};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use kube_emulator::{Controllers, Crash, Emulator};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cli::StoreArgs;
use crate::controller::{SessionStore, Settings};
use crate::leader::LeaseConfig;
use crate::operator::{self, OperatorConfig};
use crate::policy::SessionPolicy;
use crate::store::{MemoryStore, Store};
use crate::telemetry::{Health, Metrics};
use proxies::Proxies;
pub(crate) use tracker::{LOOK_EVERY, Tracker};

const NS: &str = "demo";
const DEPLOYMENT: &str = "workers";

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Sessions live in Postgres and/or Redis when URLs are given; in memory otherwise.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Worker pods in the Deployment.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=500))]
    pub workers: u32,
    /// Sessions the simulated proxies create before the rollout.
    #[arg(long, default_value_t = 2000)]
    pub sessions: u64,
    /// Simulated proxy tasks.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub proxies: u32,
    /// The policy's `migration.replacementWait`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub replacement_wait: Duration,
    /// How long an emulated pod takes from start to Ready.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pub pod_ready_delay: Duration,
    /// After the scenario, keep the cluster, operator and proxies running and print a
    /// kubeconfig path for kubectl; stop with Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
}

/// Runs the demo; fails when a session was lost or left on a departed worker.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
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
        "Deployment {DEPLOYMENT}: {} workers; SessionPolicy {DEPLOYMENT}: reroute on replace and on terminate, replacementWait {}",
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
    let restarted = json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": k8s_openapi::jiff::Timestamp::now().to_string()}}}}});
    deployments
        .patch(
            DEPLOYMENT,
            &PatchParams::default(),
            &Patch::Strategic(&restarted),
        )
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
            DEPLOYMENT,
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
            "\nThe cluster keeps running. Try:\n  export KUBECONFIG={}\n  kubectl -n {NS} get sp,pods\n  kubectl -n {NS} rollout restart deployment/{DEPLOYMENT}\nStop with Ctrl-C.",
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
async fn connect(args: &DemoArgs) -> anyhow::Result<(SessionStore, String)> {
    if args.store.database_url.is_none() && args.store.redis_url.is_none() {
        return Ok((
            SessionStore::plain(Arc::new(MemoryStore::new(args.store.options()))),
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
    let name = match (&args.store.database_url, &args.store.redis_url) {
        (Some(_), Some(_)) => "Redis cache over Postgres (layered)",
        (Some(_), None) => "Postgres",
        _ => "Redis",
    };
    let store = SessionStore {
        layered: connected.layered(),
        records: connected.records.clone(),
        store: connected.store,
    };
    Ok((store, name.into()))
}

async fn create_workload(client: &Client, args: &DemoArgs) -> anyhow::Result<()> {
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": DEPLOYMENT, "namespace": NS},
        "spec": {
            "replicas": args.workers,
            "selector": {"matchLabels": {"app": "worker"}},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": "worker"}},
                "spec": {"terminationGracePeriodSeconds": 2,
                         "containers": [{"name": "app", "image": "shiny-worker:1"}]},
            },
        },
    }))?;
    Api::<Deployment>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &deployment)
        .await
        .context("creating the Deployment")?;
    let policy: SessionPolicy = serde_json::from_value(json!({
        "apiVersion": "sessions.blockyard.io/v1alpha1", "kind": "SessionPolicy",
        "metadata": {"name": DEPLOYMENT, "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "worker"}},
            "migration": {"onReplace": "Reroute", "onTerminate": "Reroute",
                          "replacementWait": crate::policy::duration::format(args.replacement_wait)},
            "podDeletionCost": true,
        },
    }))?;
    Api::<SessionPolicy>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &policy)
        .await
        .context("creating the SessionPolicy")?;
    Ok(())
}

/// A cache of the pods of `namespace`, kept until `shutdown`.
/// Installs the SessionPolicy CRD in an emulated cluster and creates `namespace`.
pub(crate) fn prepare(emulator: &Emulator, namespace: &str) -> anyhow::Result<()> {
    let control = emulator.control();
    control
        .load_yaml(&crate::policy::crd_yaml())
        .map_err(|e| anyhow::anyhow!("installing the CRD: {e}"))?;
    control
        .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}))
        .map_err(|e| anyhow::anyhow!("creating namespace {namespace}: {e}"))?;
    Ok(())
}

pub(crate) fn pod_reader(
    client: &Client,
    namespace: &str,
    shutdown: CancellationToken,
) -> Reader<Pod> {
    let (reader, writer) = reflector::store();
    let stream = watcher(
        Api::<Pod>::namespaced(client.clone(), namespace),
        Default::default(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects();
    tokio::spawn(async move {
        use futures::StreamExt;
        let mut stream = std::pin::pin!(stream.take_until(shutdown.cancelled_owned()));
        while stream.next().await.is_some() {}
    });
    reader
}

/// Names of the Ready, non-terminating worker pods.
pub(crate) fn ready_workers(pods: &Reader<Pod>) -> Vec<String> {
    let mut names: Vec<String> = pods
        .state()
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status.as_ref().is_some_and(|s| {
                s.phase.as_deref() == Some("Running")
                    && s.conditions
                        .as_ref()
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
        })
        .map(|p| p.name_any())
        .collect();
    names.sort();
    names
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
        if let Ok(d) = deployments.get(DEPLOYMENT).await {
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

fn rollout_complete(d: &Deployment) -> bool {
    let (Some(spec), Some(status)) = (&d.spec, &d.status) else {
        return false;
    };
    let want = spec.replicas.unwrap_or(1);
    status.observed_generation >= d.metadata.generation
        && status.updated_replicas == Some(want)
        && status.available_replicas == Some(want)
        && status.replicas == Some(want)
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
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
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
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if self.tty {
            println!();
        } else {
            println!("{}", last.1);
        }
    }
}

/// What the demo proved.
struct Report {
    created: u64,
    missing: u64,
    rerouted: u64,
    deleted: u64,
    stale_reads: u64,
    stuck: usize,
    /// Per phase: departures, p50, p99.
    latency: Vec<(&'static str, usize, Duration, Duration)>,
    replacement_wait: Duration,
    elapsed: Duration,
}

impl Report {
    async fn gather(
        store: &Arc<dyn Store>,
        proxies: &Proxies,
        tracker: &Tracker,
        metrics: &Metrics,
        replacement_wait: Duration,
        elapsed: Duration,
    ) -> anyhow::Result<Self> {
        let missing = proxies.missing_sessions(store.as_ref()).await?;
        let latency = tracker
            .latencies()
            .into_iter()
            .filter(|(_, l)| !l.is_empty())
            .map(|(phase, mut l)| {
                l.sort();
                let pick = |q: f64| l[((l.len() - 1) as f64 * q).round() as usize];
                (phase, l.len(), pick(0.5), pick(0.99))
            })
            .collect();
        Ok(Self {
            created: proxies.created(),
            missing,
            rerouted: metrics.sessions_rerouted.get(),
            deleted: metrics.sessions_deleted.get(),
            stale_reads: proxies.stale_reads(),
            stuck: tracker.stuck(),
            latency,
            replacement_wait,
            elapsed,
        })
    }

    fn verdict(&self) -> anyhow::Result<()> {
        // The policy reroutes on replace and on terminate: every missing session is lost.
        anyhow::ensure!(self.missing == 0, "{} session(s) lost", self.missing);
        anyhow::ensure!(
            self.stuck == 0,
            "{} departed worker(s) still held sessions after replacementWait",
            self.stuck
        );
        Ok(())
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        writeln!(f, "Report ({:.1} s)", self.elapsed.as_secs_f64())?;
        writeln!(
            f,
            "  sessions created by the proxies        {}",
            self.created
        )?;
        writeln!(
            f,
            "  sessions rerouted by the operator      {}",
            self.rerouted
        )?;
        writeln!(
            f,
            "  sessions deleted by the operator       {}",
            self.deleted
        )?;
        writeln!(
            f,
            "  sessions lost                          {}",
            self.missing
        )?;
        writeln!(f, "  departed workers still holding sessions")?;
        writeln!(f, "    after replacementWait                {}", self.stuck)?;
        writeln!(
            f,
            "  migration latency, departure seen → sessions moved (looked at every {} ms):",
            LOOK_EVERY.as_millis()
        )?;
        for (phase, n, p50, p99) in &self.latency {
            writeln!(
                f,
                "    {phase:<16} p50 {:>7} · p99 {:>7}  ({n} departures)",
                ms(*p50),
                ms(*p99)
            )?;
        }
        writeln!(
            f,
            "    (a scale-down has no replacement: its sessions move after replacementWait = {})",
            humantime::format_duration(self.replacement_wait)
        )?;
        writeln!(
            f,
            "  reads that found a departed worker     {} (proxies act before the operator; the next read finds the new worker)",
            self.stale_reads
        )
    }
}
