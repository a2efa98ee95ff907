//! Starting and stopping workers: the [`Launcher`] trait and its implementations.
//!
//! A launcher never decides *whether* to start a worker: the budget is enforced by the state
//! machine when a slot is reserved ([`crate::autoscaler`]), and a launcher only turns a
//! reserved slot into a running worker, or stops one the cluster has declared lost.

#[cfg(feature = "ec2")]
pub mod ec2;
pub mod local;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hashq_raft::types::{Millis, WorkerRecord};
use hashq_raft::{NodeId, WorkerId};

use crate::config::{LauncherKind, NodeConfig};

/// Everything a launched worker needs to find its cluster and claim its slot.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub worker: WorkerId,
    pub parent: NodeId,
    /// Client-API base URLs of the members (`http(s)://host:port`).
    pub endpoints: Vec<String>,
    pub idle_timeout: Duration,
    /// Exit when no endpoint answers for this long.
    pub orphan_timeout: Duration,
    pub threads: usize,
}

/// Why a launch or a termination failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LaunchError {
    /// The provider has no capacity or the account hit a limit: the slot is released.
    #[error("no capacity: {0}")]
    Capacity(String),
    #[error("{0}")]
    Failed(String),
}

/// The replicated worker table as the leader sees it, for [`Launcher::reconcile`].
#[derive(Clone, Debug)]
pub struct WorkerTable {
    /// Every worker record, managed or not.
    pub workers: Vec<WorkerRecord>,
    /// The next worker id the state machine will hand out: a machine naming an id at or
    /// above it belongs to a reservation this view does not show yet, not to a stray.
    pub next_worker: u64,
    /// The state machine's time (the leader's clock, stamped into commands).
    pub now: Millis,
}

/// Starts and stops workers.
pub trait Launcher: Send + Sync {
    /// For `/status` and logs.
    fn name(&self) -> &'static str;
    /// Starts a worker for a reserved slot; returns its handle (`pid:<n>`, an instance id).
    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<String, LaunchError>>;
    /// Stops the worker with this handle, if it still runs. Idempotent.
    fn terminate(&self, worker: WorkerId, handle: String)
        -> BoxFuture<'_, Result<(), LaunchError>>;
    /// Stops the workers this node started (the node is shutting down gracefully).
    fn shutdown(&self) -> BoxFuture<'_, ()>;
    /// Compares the replicated worker table with what the provider runs (the leader calls it
    /// now and then): stops strays the table does not know, and returns the workers whose
    /// machine is gone, so their slots are freed. The default knows of no provider state.
    fn reconcile(&self, _table: WorkerTable) -> BoxFuture<'_, Result<Vec<WorkerId>, LaunchError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// Starts nothing: workers are started by hand.
pub struct NoLauncher;

impl Launcher for NoLauncher {
    fn name(&self) -> &'static str {
        "none"
    }
    fn launch(&self, _spec: LaunchSpec) -> BoxFuture<'_, Result<String, LaunchError>> {
        Box::pin(async { Err(LaunchError::Failed("this node has --launcher none".into())) })
    }
    fn terminate(
        &self,
        _worker: WorkerId,
        _handle: String,
    ) -> BoxFuture<'_, Result<(), LaunchError>> {
        Box::pin(async { Ok(()) })
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// The launcher `config` asks for. The `ec2` launcher resolves its region and this node's
/// instance id here, so a node that cannot launch on EC2 says so at startup, not at its first
/// launch.
pub async fn from_config(config: &NodeConfig) -> Result<Arc<dyn Launcher>, String> {
    match config.launcher {
        LauncherKind::None => Ok(Arc::new(NoLauncher)),
        LauncherKind::Local => Ok(Arc::new(local::LocalLauncher::new(
            config.worker_binary.clone(),
            config.data_dir.join("workers"),
            config.credentials.worker.clone(),
            config.tls.as_ref().map(|t| t.ca.clone()),
        ))),
        #[cfg(not(feature = "ec2"))]
        LauncherKind::Ec2 => Err(crate::config::ConfigError::NoEc2Build.to_string()),
        #[cfg(feature = "ec2")]
        LauncherKind::Ec2 => {
            // Workers on other machines get the cluster CA in their user data.
            let ca_pem = match &config.tls {
                Some(tls) => Some(
                    std::fs::read_to_string(&tls.ca)
                        .map_err(|e| format!("{}: {e}", tls.ca.display()))?,
                ),
                None => None,
            };
            let scheme = if config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            Ok(Arc::new(
                ec2::Ec2Launcher::new(
                    &config.ec2,
                    &config.cluster_name,
                    config.credentials.worker.as_deref(),
                    config.own_addr().map(|a| format!("{scheme}://{a}")),
                    ca_pem,
                )
                .await
                .map_err(|e| e.to_string())?,
            ))
        }
    }
}
