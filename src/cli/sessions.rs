//! `session-operator sessions …`: inspect and operate on the routing table.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use crate::connect::StoreArgs;
use crate::store::{Entry, Store};

#[derive(Debug, Args)]
pub(super) struct SessionsArgs {
    #[command(subcommand)]
    command: SessionsCommand,
    #[command(flatten)]
    store: StoreArgs,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum SessionsCommand {
    /// List sessions, of one worker or of all.
    List {
        #[arg(long)]
        worker: Option<String>,
    },
    /// Show one session.
    Get { id: String },
    /// Create or replace a session.
    Set {
        id: String,
        #[arg(long)]
        worker: String,
        #[arg(long, default_value = "")]
        user_sub: String,
    },
    /// Delete one session.
    Delete { id: String },
    /// Session counts per worker (all workers, or the ones given).
    Count {
        #[arg(long = "worker")]
        workers: Vec<String>,
    },
    /// Move every session of one worker to another.
    Reroute {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
    /// Delete every session of a worker.
    DeleteWorker { worker: String },
    /// Delete sessions idle longer than --max-age (of the given workers only, if any).
    SweepIdle {
        #[arg(long, value_parser = humantime::parse_duration)]
        max_age: Duration,
        #[arg(long = "worker")]
        workers: Vec<String>,
    },
    /// Delete sessions whose expires_at has passed.
    Expire,
}

pub(super) async fn run(args: SessionsArgs) -> anyhow::Result<()> {
    let connected = args.store.connect().await?;
    let store = connected.store.clone();
    let out = args.output;
    match args.command {
        SessionsCommand::List { worker } => {
            let mut rows: BTreeMap<String, Entry> = BTreeMap::new();
            let workers = match worker {
                Some(w) => vec![w],
                None => store.counts_by_worker().await?.into_keys().collect(),
            };
            for w in &workers {
                rows.extend(store.entries_for_worker(w).await?);
            }
            match out {
                Output::Json => print_json(&rows)?,
                Output::Text => {
                    println!(
                        "{:<40} {:<30} {:<20} LAST ACCESS",
                        "SESSION", "WORKER", "USER"
                    );
                    for (id, e) in &rows {
                        println!(
                            "{id:<40} {:<30} {:<20} {}",
                            e.worker_id,
                            e.user_sub,
                            e.last_access.to_rfc3339()
                        );
                    }
                }
            }
        }
        SessionsCommand::Get { id } => {
            let entry = store
                .get(&id)
                .await?
                .with_context(|| format!("session {id:?} not found"))?;
            match out {
                Output::Json => print_json(&json!({ "id": id, "entry": entry }))?,
                Output::Text => println!(
                    "session {id}\n  worker:      {}\n  user:        {}\n  last access: {}",
                    entry.worker_id,
                    entry.user_sub,
                    entry.last_access.to_rfc3339()
                ),
            }
        }
        SessionsCommand::Set {
            id,
            worker,
            user_sub,
        } => {
            store.set(&id, &Entry::new(worker, user_sub)).await?;
            report(out, "set", 1, &format!("session {id} set"))?;
        }
        SessionsCommand::Delete { id } => {
            let n = u64::from(store.delete(&id).await?);
            report(out, "deleted", n, &format!("{} deleted", sessions(n, "")))?;
        }
        SessionsCommand::Count { workers } => {
            let counts = counts(store.as_ref(), &workers).await?;
            match out {
                Output::Json => print_json(&counts)?,
                Output::Text => {
                    println!("{:<40} SESSIONS", "WORKER");
                    for (w, n) in &counts {
                        println!("{w:<40} {n}");
                    }
                    println!("{:<40} {}", "TOTAL", counts.values().sum::<u64>());
                }
            }
        }
        SessionsCommand::Reroute { from, to } => {
            let n = store.reroute_worker(&from, &to).await?;
            report(
                out,
                "rerouted",
                n,
                &format!("{} rerouted from {from} to {to}", sessions(n, "")),
            )?;
        }
        SessionsCommand::DeleteWorker { worker } => {
            let n = store.delete_by_worker(&worker).await?;
            report(
                out,
                "deleted",
                n,
                &format!("{} of {worker} deleted", sessions(n, "")),
            )?;
        }
        SessionsCommand::SweepIdle { max_age, workers } => {
            let n = if workers.is_empty() {
                store.sweep_idle(max_age).await?
            } else {
                store.sweep_idle_for_workers(max_age, &workers).await?
            };
            report(
                out,
                "removed",
                n,
                &format!("{} removed", sessions(n, "idle ")),
            )?;
        }
        SessionsCommand::Expire => {
            let n = store.expire().await?;
            report(
                out,
                "removed",
                n,
                &format!("{} removed", sessions(n, "expired ")),
            )?;
        }
    }
    connected.finish().await
}

async fn counts(store: &dyn Store, workers: &[String]) -> anyhow::Result<BTreeMap<String, u64>> {
    if workers.is_empty() {
        return Ok(store.counts_by_worker().await?);
    }
    let mut counts = BTreeMap::new();
    for w in workers {
        counts.insert(w.clone(), store.count_for_worker(w).await?);
    }
    Ok(counts)
}

/// "1 idle session", "2 idle sessions".
fn sessions(n: u64, kind: &str) -> String {
    format!("{n} {kind}session{}", if n == 1 { "" } else { "s" })
}

fn report(out: Output, key: &str, n: u64, text: &str) -> anyhow::Result<()> {
    match out {
        Output::Json => print_json(&json!({ key: n })),
        Output::Text => {
            println!("{text}");
            Ok(())
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
