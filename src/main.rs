use std::process::ExitCode;

use clap::Parser;
use session_operator::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if !cli.runs_the_operator() {
        session_operator::telemetry::init_cli_logging();
    }
    match cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, the whole cause chain; URLs in it were redacted where they were added.
            // Each cause once (see `cli::error_line`).
            eprintln!("error: {}", cli::error_line(&err));
            ExitCode::FAILURE
        }
    }
}
