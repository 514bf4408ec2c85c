//! Logging setup.

use tracing_subscriber::EnvFilter;

/// Logs to stderr, `warn` and above unless `RUST_LOG` says otherwise; stdout stays for output.
/// sqlx's slow-statement warnings are left out by default: bulk commands are slow by design.
pub(crate) fn init_cli_logging() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,sqlx::query=error"));
    // Ignore the error of a second initialisation (tests may call this more than once).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Log line format of `session-operator run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable lines.
    Text,
}

/// The operator logs `info` and above to stdout unless `RUST_LOG` says otherwise.
pub(crate) fn init_operator_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,sqlx::query=warn,kube_lease_manager=warn,kube_runtime=warn")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
