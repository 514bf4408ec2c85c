//! `kube-emulator` binary: serves an in-memory API server until interrupted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "kube-emulator",
    about = "In-memory Kubernetes API server for tests"
)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig pointing at the emulator to this file.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Events retained for resuming watches; older versions get 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    history_limit: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 5)]
    bookmark_interval: u64,
    /// YAML/JSON files of objects (e.g. CRDs, namespaces) to create before serving;
    /// may be repeated. The kubeconfig is written only after they are loaded.
    #[arg(long = "load", value_name = "FILE")]
    load: Vec<PathBuf>,
    /// Simulated controllers: `all`, `none`, or a comma-separated list of
    /// deployment,replicaset,statefulset,gc,scheduler,kubelet.
    #[arg(long, default_value = "all")]
    controllers: kube_emulator::Controllers,
    /// Number of emulated nodes (with the scheduler or kubelet).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Milliseconds the emulated kubelet keeps a started pod NotReady.
    #[arg(long, default_value_t = 200)]
    pod_ready_delay_ms: u64,
    /// Up to this many milliseconds more per pod, picked by the pod's uid (readiness spread
    /// out as with real probes).
    #[arg(long, default_value_t = 0)]
    pod_ready_jitter_ms: u64,
    /// Append one JSON line per request served to this file (created or truncated).
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut builder = kube_emulator::Emulator::builder()
        .listen(args.listen)
        .history_limit(args.history_limit)
        .bookmark_interval(Duration::from_secs(args.bookmark_interval.max(1)))
        .controllers(args.controllers)
        .nodes(args.nodes)
        .pod_ready_delay(Duration::from_millis(args.pod_ready_delay_ms))
        .pod_ready_jitter(Duration::from_millis(args.pod_ready_jitter_ms));
    if let Some(path) = &args.audit_log {
        builder = builder.audit_log(path);
    }
    let emulator = builder
        .start()
        .await
        .with_context(|| format!("starting on {}", args.listen))?;
    for file in &args.load {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let count = emulator
            .control()
            .load_yaml(&text)
            .with_context(|| format!("loading {}", file.display()))?;
        eprintln!(
            "kube-emulator: loaded {count} object(s) from {}",
            file.display()
        );
    }
    if let Some(path) = &args.kubeconfig_out {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, emulator.kubeconfig())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "kube-emulator: controllers {} ({} node(s), pod ready delay {} ms)",
        args.controllers,
        args.nodes.max(1),
        args.pod_ready_delay_ms
    );
    println!("kube-emulator listening on {}", emulator.url());
    wait_for_signal().await?;
    // A second signal, or a shutdown that takes too long, ends the process at once.
    let impatient = tokio::spawn(async {
        let _ = wait_for_signal().await;
        std::process::exit(130);
    });
    if tokio::time::timeout(Duration::from_secs(10), emulator.shutdown())
        .await
        .is_err()
    {
        eprintln!("kube-emulator: shutdown timed out");
        std::process::exit(1);
    }
    impatient.abort();
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
