//! Logging setup.

use tracing_subscriber::EnvFilter;

/// Logs to stderr, `warn` and above unless `RUST_LOG` says otherwise; stdout stays for output.
/// sqlx's slow-statement warnings are left out by default: bulk commands are slow by design.
pub fn init_cli_logging() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,sqlx::query=error"));
    // Ignore the error of a second initialisation (tests may call this more than once).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
