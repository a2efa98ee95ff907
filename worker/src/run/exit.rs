//! How a worker ends: the reasons it stops well ([`ExitReason`]) and the errors retrying
//! cannot help ([`WorkerError`]).

use std::fmt;

use crate::client::ClientError;

/// Why [`run`](super::run) returned without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// No item was held for `idle_timeout`; the worker said goodbye and freed its slot.
    Idle,
    /// The shutdown future fired; held leases were given back.
    Shutdown,
    /// No endpoint answered for `no_endpoint_exit_after`: the cluster is gone.
    NoEndpoint,
    /// On EC2: no endpoint instance of the worker's cluster is running any more.
    Orphaned,
    /// The cluster forgot this managed worker, so its budget slot is gone (it may already
    /// have launched a replacement).
    SlotGone,
}

impl ExitReason {
    /// A short name for logs and exit messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Idle => "idle",
            ExitReason::Shutdown => "shutdown",
            ExitReason::NoEndpoint => "no_endpoint",
            ExitReason::Orphaned => "orphaned",
            ExitReason::SlotGone => "slot_gone",
        }
    }
}

impl ExitReason {
    /// Whether the worker ended because its cluster is gone (it then
    /// terminates itself).
    pub fn is_orphaned(self) -> bool {
        matches!(self, ExitReason::NoEndpoint | ExitReason::Orphaned)
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What stops a worker that retrying cannot help.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration breaks a rule of
    /// [`WorkerConfig::validate`](crate::config::WorkerConfig::validate).
    #[error("invalid worker configuration: {0}")]
    Config(String),
    /// The cluster refused the worker (a wrong token, an incompatible version) or answered
    /// something it cannot understand.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A worker task panicked: a bug.
    #[error("internal worker error: {0}")]
    Internal(String),
}
