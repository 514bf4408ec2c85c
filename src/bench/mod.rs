//! Benchmarks behind `session-operator bench`, printing their figures. Each result is reported
//! with a baseline measured in the same run, so figures from noisy machines stay comparable.

mod operator;
mod store;

use clap::Subcommand;

pub use operator::OperatorBench;
pub use store::StoreBench;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Store operations: indexed vs full-scan worker operations, touch coalescing, batched expiry.
    Store(StoreBench),
    /// Migration latency of a rolling update (real operator binary, emulator, Redis over
    /// Postgres) and the operator's peak memory.
    Operator(OperatorBench),
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Store(args) => store::run(args).await,
        BenchCommand::Operator(args) => operator::run(args).await,
    }
}

/// Latency percentiles of a sample, in milliseconds.
fn percentile_ms(sorted: &[std::time::Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1e3
}
