//! `session-operator run`: the operator process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgAction, Args};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::connect::Connected;
use crate::connect::StoreArgs;
use crate::controller::Settings;
use crate::leader::LeaseConfig;
use crate::operator::{self, OperatorConfig};
use crate::store::redact_url;
use crate::telemetry::{self, Health, LogFormat, Metrics};

#[derive(Debug, Clone, Args)]
pub(super) struct RunArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Namespace to watch for SessionPolicies and pods (repeatable); all namespaces when absent.
    #[arg(
        long = "watch-namespace",
        env = "WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    pub watch_namespaces: Vec<String>,
    /// Elect a leader among replicas with a Lease; only the leader mutates the store.
    /// Required whenever more than one replica runs.
    #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "session-operator")]
    pub lease_name: String,
    /// Namespace of the Lease [default: $POD_NAMESPACE, else the kubeconfig's namespace].
    #[arg(long, env = "LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Lease duration: a standby takes over at most this long after the leader dies.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// This replica's identity in the Lease [default: $POD_NAME, else the host name].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// How often expired sessions (expires_at passed) are removed store-wide.
    #[arg(long, env = "EXPIRY_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub expiry_interval: Duration,
    /// How long an unknown worker id must hold sessions without a matching pod before its
    /// sessions are migrated (a pod the watch has not shown yet is not a vanished one).
    #[arg(long, env = "ORPHAN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub orphan_grace: Duration,
    /// How often session counts (status, loads, deletion costs) are refreshed from the store.
    #[arg(long, env = "COUNTS_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub counts_interval: Duration,
    /// Parse and validate flags and environment, print the resulting configuration, and exit
    /// without connecting to anything.
    #[arg(long)]
    pub check_config: bool,
}

impl RunArgs {
    fn validate(&self) -> anyhow::Result<()> {
        if self.store.database_url.is_none() && self.store.redis_url.is_none() {
            anyhow::bail!(
                "no session store configured: pass --database-url and/or --redis-url \
                 (or set DATABASE_URL / REDIS_URL)"
            );
        }
        self.store.check_urls()?;
        if self.leader_elect {
            anyhow::ensure!(
                self.lease_duration >= Duration::from_secs(2),
                "--lease-duration must be at least 2s"
            );
        }
        for (name, value) in [
            ("--expiry-interval", self.expiry_interval),
            ("--counts-interval", self.counts_interval),
        ] {
            anyhow::ensure!(!value.is_zero(), "{name} must be greater than zero");
        }
        for ns in &self.watch_namespaces {
            anyhow::ensure!(
                is_dns_label(ns),
                "--watch-namespace {ns:?} is not a valid namespace name"
            );
        }
        self.store
            .options()
            .validate()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }

    /// `--lease-namespace`, else `$POD_NAMESPACE`; `None` leaves it to the kubeconfig.
    fn lease_namespace(&self) -> Option<String> {
        self.lease_namespace.clone().or_else(|| {
            std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|s| !s.is_empty())
        })
    }

    fn identity(&self) -> String {
        self.identity
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| "session-operator".into())
    }

    fn summary(&self) -> String {
        let url = |u: &Option<String>| u.as_deref().map_or_else(|| "-".into(), redact_url);
        let namespaces = if self.watch_namespaces.is_empty() {
            "all".to_string()
        } else {
            self.watch_namespaces.join(",")
        };
        format!(
            "configuration is valid\n\
             database-url:     {}\n\
             redis-url:        {}\n\
             schema:           {}\n\
             redis-prefix:     {}\n\
             touch-window:     {}\n\
             watch-namespaces: {namespaces}\n\
             leader-elect:     {}\n\
             lease:            {}/{} ({})\n\
             identity:         {}\n\
             metrics-addr:     {}\n\
             log-format:       {:?}\n\
             expiry-interval:  {}\n\
             orphan-grace:     {}\n\
             counts-interval:  {}",
            url(&self.store.database_url),
            url(&self.store.redis_url),
            self.store.schema,
            self.store.effective_redis_prefix(),
            humantime::format_duration(self.store.touch_window),
            self.leader_elect,
            self.lease_namespace()
                .unwrap_or_else(|| "<kubeconfig namespace>".into()),
            self.lease_name,
            humantime::format_duration(self.lease_duration),
            self.identity(),
            self.metrics_addr,
            self.log_format,
            humantime::format_duration(self.expiry_interval),
            humantime::format_duration(self.orphan_grace),
            humantime::format_duration(self.counts_interval),
        )
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Runs the operator until SIGTERM/SIGINT, or until leadership is lost (then exits non-zero so
/// Kubernetes restarts the replica as a clean standby).
pub(super) async fn run(args: RunArgs) -> anyhow::Result<()> {
    args.validate()?;
    if args.check_config {
        println!("{}", args.summary());
        return Ok(());
    }
    telemetry::init_operator_logging(args.log_format);
    let identity = args.identity();
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));

    let args_metrics_addr = args.metrics_addr;
    let metrics = Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let health = Arc::new(Health::default());
    // Without its health endpoints the pod would be killed by its probes with no explanation:
    // a server that cannot start stops the process with the reason.
    let server = tokio::spawn({
        let (health, shutdown) = (health.clone(), shutdown.clone());
        async move {
            let result =
                telemetry::serve(args_metrics_addr, registry, health, shutdown.clone()).await;
            if let Err(e) = &result {
                tracing::error!(error = %super::error_line(e), "metrics server failed");
                shutdown.cancel();
            }
            result
        }
    });

    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration: run in a pod or set KUBECONFIG")?;
    let Some(store) = connect_store(&args, &shutdown).await else {
        return Ok(());
    };
    health
        .store_ok
        .store(true, std::sync::atomic::Ordering::Relaxed);

    let lease = args.leader_elect.then(|| LeaseConfig {
        name: args.lease_name.clone(),
        namespace: args
            .lease_namespace()
            .unwrap_or_else(|| client.default_namespace().to_string()),
        identity: identity.clone(),
        duration: args.lease_duration,
    });
    let config = OperatorConfig {
        identity,
        lease,
        expiry_interval: args.expiry_interval,
        controller: Settings {
            namespaces: args.watch_namespaces.clone(),
            orphan_grace: args.orphan_grace,
            counts_interval: args.counts_interval,
            ..Settings::default()
        },
    };
    let outcome = operator::run(client, store, config, metrics, health, shutdown.clone()).await;
    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => outcome.and(Err(e)),
        _ => outcome,
    }
}

/// Connects to the store, retrying with backoff: a store that is down at start-up makes the
/// replica unready, not a crash loop. `None` when shut down meanwhile.
async fn connect_store(args: &RunArgs, shutdown: &CancellationToken) -> Option<Connected> {
    let mut delay = Duration::from_millis(500);
    loop {
        match args.store.connect_operator().await {
            Ok(connected) => return Some(connected),
            Err(e) => {
                tracing::warn!(error = %super::error_line(&e), retry_in = ?delay, "cannot reach the session store");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received");
    shutdown.cancel();
}
