//! Command-line interface: `session-operator <command>`.

mod run;
mod sessions;

use clap::{Parser, Subcommand};

use crate::connect::StoreArgs;
use run::RunArgs;

/// Keeps session-sticky routing tables consistent with worker pods.
#[derive(Debug, Parser)]
// A flag given twice takes its last value (as in kubectl), so a wrapper can override defaults.
#[command(name = "session-operator", version, about, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The commands; `demo` and `bench` exist only in a build with the feature `lab` (the default;
/// the image is built without it).
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the operator: watch SessionPolicies and worker pods, migrate sessions, sweep.
    Run(Box<RunArgs>),
    /// Print the SessionPolicy CustomResourceDefinition as YAML.
    Crd,
    /// Watch a rolling update, a scale-down and a crash move sessions in an emulated cluster.
    #[cfg(feature = "lab")]
    Demo(Box<crate::lab::demo::DemoArgs>),
    /// Create the schema, table and indexes in Postgres (idempotent).
    Migrate {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Inspect and operate on sessions.
    Sessions(sessions::SessionsArgs),
    /// Run benchmarks and print their figures.
    #[cfg(feature = "lab")]
    Bench {
        #[command(subcommand)]
        bench: crate::lab::bench::BenchCommand,
    },
}

/// The one line printed for a failed command: the cause chain, each cause once. Libraries
/// often repeat their source's message in their own (kube's kubeconfig errors do, twice), so
/// a cause whose text is already on the line is left out.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    one_line(&line)
}

/// Joins a multi-line message into one line, without the source snippets some parsers add
/// (`--> <input>:2:11`, `2 | clusters: [oops`, `  |   ^ unclosed bracket`): their first line
/// already says what and where.
fn one_line(text: &str) -> String {
    let snippet = |l: &str| {
        let l = l.trim_start();
        l.starts_with("-->")
            || l.trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start()
                .starts_with('|')
    };
    text.lines()
        .filter(|l| !snippet(l))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the parsed command. `run`, the operator process, sets up its own logging (format and
/// level from its flags); every other command logs as a command-line tool.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if !matches!(cli.command, Command::Run(_)) {
        crate::telemetry::init_cli_logging();
    }
    match cli.command {
        Command::Run(args) => run::run(*args).await,
        #[cfg(feature = "lab")]
        Command::Demo(args) => crate::lab::demo::run(*args).await,
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
        #[cfg(feature = "lab")]
        Command::Bench { bench } => crate::lab::bench::run(bench).await,
    }
}

#[cfg(test)]
mod tests {
    use super::error_line;

    #[derive(Debug, thiserror::Error)]
    #[error("kubeconfig parse error: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("invalid type: expected a map at line 2 column 1")]
    struct Inner;

    #[test]
    fn each_cause_is_printed_once() {
        let err = anyhow::Error::new(Outer(Inner)).context("no Kubernetes configuration");
        let line = error_line(&err);
        assert_eq!(
            line,
            "no Kubernetes configuration: kubeconfig parse error: invalid type: expected a map \
             at line 2 column 1"
        );
        assert_eq!(line.matches("invalid type").count(), 1);
    }

    #[test]
    fn source_snippets_are_left_out() {
        let text = "failed to parse kubeconfig YAML: error: line 2 column 11: unclosed bracket '['\n \
                    --> <input>:2:11\n  |\n1 | apiVersion: v1\n2 | clusters: [oops\n  |           ^ unclosed bracket '['";
        assert_eq!(
            super::one_line(text),
            "failed to parse kubeconfig YAML: error: line 2 column 11: unclosed bracket '['"
        );
        assert_eq!(super::one_line("first\nsecond"), "first second");
    }
}
