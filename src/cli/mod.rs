//! Command-line interface: `session-operator <command>`.

mod connect;
mod run;
mod sessions;

use clap::{Parser, Subcommand};

pub use connect::{Connected, StoreArgs};
pub use run::RunArgs;

/// Keeps session-sticky routing tables consistent with worker pods.
#[derive(Debug, Parser)]
#[command(name = "session-operator", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator: watch SessionPolicies and worker pods, migrate sessions, sweep.
    Run(Box<RunArgs>),
    /// Print the SessionPolicy CustomResourceDefinition as YAML.
    Crd,
    /// Watch a rolling update, a scale-down and a crash move sessions in an emulated cluster.
    Demo(Box<crate::demo::DemoArgs>),
    /// Create the schema, table and indexes in Postgres (idempotent).
    Migrate {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Inspect and operate on sessions.
    Sessions(sessions::SessionsArgs),
    /// Run benchmarks and print their figures.
    Bench {
        #[command(subcommand)]
        bench: crate::bench::BenchCommand,
    },
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run::run(*args).await,
        Command::Demo(args) => crate::demo::run(*args).await,
        Command::Crd => {
            print!("{}", crate::policy::crd_yaml());
            Ok(())
        }
        Command::Migrate { store } => {
            let url = store.database_url()?;
            let pg = store.postgres(url).await?;
            pg.migrate(&store.schema).await?;
            println!("migrations applied to schema {}", store.schema);
            Ok(())
        }
        Command::Sessions(args) => sessions::run(args).await,
        Command::Bench { bench } => crate::bench::run(bench).await,
    }
}
