//! Benchmarks behind `session-operator bench`, printing their figures. Each result is reported
//! with a baseline measured in the same run, so figures from noisy machines stay comparable.

mod harness;
mod operator;
mod pass;
mod store;

use clap::{Args, Subcommand};

use operator::OperatorBench;
use pass::PassBench;
use store::StoreBench;

/// Where the benchmarks find Postgres and Redis (each run uses a schema and key prefix of its
/// own and removes them afterwards).
#[derive(Debug, Args)]
pub(crate) struct BenchStores {
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub(crate) database_url: String,
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub(crate) redis_url: String,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Store operations: indexed vs full-scan worker operations, touch coalescing, batched expiry.
    Store(StoreBench),
    /// Migration latency of a rolling update (real operator binary, emulator, Redis over
    /// Postgres) and the operator's peak memory.
    Operator(OperatorBench),
    /// The cost of one level-triggered pass (store time, operator CPU time, p50/p99) at
    /// 1k/10k workers and 1M/10M sessions, the operator's RSS with every worker pod watched,
    /// and the API requests it makes per rolling update of N pods.
    Pass(PassBench),
}

pub(crate) async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Store(args) => store::run(args).await,
        BenchCommand::Operator(args) => operator::run(args).await,
        BenchCommand::Pass(args) => pass::run(args).await,
    }
}

/// A latency percentile of a sorted sample, in milliseconds.
fn percentile_ms(sorted: &[std::time::Duration], p: f64) -> f64 {
    super::shared::percentile(sorted, p).as_secs_f64() * 1e3
}
