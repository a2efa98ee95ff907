//! `hashq`: one binary for the endpoint (`node`), the worker, the client CLI and the bench.

mod cli;

use std::future::Future;
use std::io::IsTerminal;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hashq_node::config::LogFormat;
use hashq_node::NodeArgs;

#[derive(Parser)]
#[command(
    name = "hashq",
    version,
    about = "A Raft-replicated queue of SHA-512 work"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an endpoint: a Raft voter with the HTTP API.
    Node(Box<NodeArgs>),
    /// Run a worker: lease work from the cluster, hash it, hand results back.
    Worker(cli::WorkerArgs),
    /// Enqueue files as work items.
    Enqueue(cli::EnqueueArgs),
    /// Take completed results (each result is handed out once, cluster-wide).
    Pull(cli::PullArgs),
    /// Show the cluster's status as one node sees it.
    Status(cli::StatusArgs),
    /// Work items: `hashq work get ID [--wait 30s]`.
    Work(cli::WorkArgs),
    /// Cluster administration.
    Cluster(cli::ClusterArgs),
    /// Start a cluster on loopback, run a fixed workload, print the figures as JSON.
    Bench(cli::BenchArgs),
    /// Convert a stopped node's data dir written by hashq 0.1 to the current format.
    Migrate(cli::MigrateArgs),
    /// Make a stopped node the only voter of its cluster, when a majority is lost for good.
    Recover(cli::RecoverArgs),
    /// Create the cluster CA (once) and issue a node's certificate with it.
    Tls(cli::TlsArgs),
}

/// Runs `main` on a runtime whose threads all carry `name`, so every log line says which
/// process it came from (the node id, for a node).
fn run_named<F>(name: String, main: F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(name)
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async { tokio::spawn(main).await.context("main task")? })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_thread_names(true)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Node(args) => {
            init_logging(args.log_format);
            let name = format!("node-{}", args.id);
            run_named(name, cli::node::run(*args))
        }
        Command::Worker(args) => {
            init_logging(args.log_format);
            run_named("worker".into(), cli::worker::run(args))
        }
        Command::Enqueue(args) => run_named("hashq".into(), cli::client::enqueue(args)),
        Command::Pull(args) => run_named("hashq".into(), cli::client::pull(args)),
        Command::Status(args) => run_named("hashq".into(), cli::client::status(args)),
        Command::Work(args) => run_named("hashq".into(), cli::client::work(args)),
        Command::Cluster(args) => run_named("hashq".into(), cli::client::cluster(args)),
        Command::Bench(args) => run_named("bench".into(), cli::bench::run(args)),
        Command::Migrate(args) => {
            init_logging(LogFormat::Text);
            cli::migrate(args)
        }
        Command::Recover(args) => {
            init_logging(LogFormat::Text);
            run_named("hashq".into(), cli::recover(args))
        }
        Command::Tls(args) => cli::tls(args),
    }
}
