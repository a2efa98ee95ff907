//! `hashq worker`.

use hashq_raft::WorkerId;
use hashq_worker::config::WorkerConfig;

use super::node::shutdown_signal;
use super::WorkerArgs;

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let defaults = WorkerConfig::default();
    let config = WorkerConfig {
        endpoints: args.endpoints,
        cluster_token: args.cluster_token.filter(|t| !t.is_empty()),
        slot: args.worker_id.map(WorkerId),
        parent: args.parent,
        handle: args.handle.unwrap_or(defaults.handle.clone()),
        idle_timeout: args.idle_timeout,
        threads: args.threads,
        prefetch: args.prefetch,
        no_endpoint_exit_after: args.no_endpoint_exit_after,
        ..defaults
    };
    let reason = hashq_worker::run::run(config, shutdown_signal()).await?;
    tracing::info!(%reason, "worker stopped");
    Ok(())
}
