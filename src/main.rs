use std::process::ExitCode;

use clap::Parser;
use session_operator::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    match cli::run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, the whole cause chain; URLs in it were redacted where they were added.
            // Each cause once (see `cli::error_line`).
            eprintln!("error: {}", cli::error_line(&err));
            ExitCode::FAILURE
        }
    }
}
