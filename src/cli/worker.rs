//! `hashq worker`.

use std::time::Duration;

use anyhow::Context;
use hashq_proto::WorkerId;
use hashq_worker::config::{Ec2Parent, ParentCheck, WorkerConfig};

use futures::FutureExt;

use super::node::shutdown_signal;
use super::WorkerArgs;

/// The EC2 parent check may call the API this often per worker without throttling a fleet.
const EC2_PARENT_CHECK_EVERY: Duration = Duration::from_secs(15);

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let defaults = WorkerConfig::default();
    let parent_check = match args.ec2_parent_instance.filter(|i| !i.is_empty()) {
        Some(parent_instance) => ParentCheck::Ec2(Ec2Parent {
            region: args.ec2_region.filter(|r| !r.is_empty()),
            endpoint_url: args.ec2_endpoint_url.filter(|u| !u.is_empty()),
            parent_instance,
            cluster: args.cluster_name.clone(),
        }),
        None => ParentCheck::Health,
    };
    let parent_check_every = args.parent_check_every.unwrap_or(match parent_check {
        ParentCheck::Ec2(_) => EC2_PARENT_CHECK_EVERY,
        ParentCheck::Health => defaults.parent_check_every,
    });
    let config = WorkerConfig {
        endpoints: args.endpoints,
        tls_ca: args.tls_ca,
        worker_token: args.worker_token.filter(|t| !t.is_empty()),
        slot: args.worker_id.map(WorkerId),
        parent: args.parent,
        handle: args.handle.unwrap_or(defaults.handle.clone()),
        idle_timeout: args.idle_timeout,
        threads: args.threads,
        prefetch: args.prefetch,
        prefetch_window: args.prefetch_window,
        no_endpoint_exit_after: args.no_endpoint_exit_after,
        parent_check,
        parent_check_every,
        ..defaults
    };
    let reason = hashq_worker::run::run_boxed(config, shutdown_signal().boxed()).await?;
    tracing::info!(%reason, "worker stopped");
    if args.shutdown_on_orphan && reason.is_orphaned() {
        // With no endpoint of its cluster alive, the worker terminates itself;
        // on EC2 the instance's shutdown behaviour turns this power-off into a termination.
        tracing::warn!(command = %args.orphan_shutdown_command, "the cluster is gone; shutting this machine down");
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&args.orphan_shutdown_command)
            .status()
            .await
            .context("running the orphan shutdown command")?;
        anyhow::ensure!(
            status.success(),
            "the orphan shutdown command failed: {status}"
        );
    }
    Ok(())
}
