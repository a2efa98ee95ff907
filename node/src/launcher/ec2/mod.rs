//! The `ec2` launcher: one EC2 instance per worker (README, "Running on AWS").
//!
//! - **launch**: `RunInstances` of one instance tagged `hashq:cluster`, `hashq:role=worker`,
//!   `hashq:worker-id`, `hashq:parent` (this node's instance id) and `hashq:parent-node`,
//!   with the worker instance profile, IMDSv2 only, `InstanceInitiatedShutdownBehavior=
//!   terminate`, and user data ([`worker_user_data`]) that fetches the `hashq` binary from
//!   the endpoints (`GET /internal/binary`, worker credential) and runs `hashq worker` as a
//!   systemd service that powers the instance off when the worker ends. The instance id is
//!   the worker's handle.
//! - **terminate**: `TerminateInstances` (an instance already gone is fine).
//! - **reconcile** (the leader, every `--reconcile-every`): `DescribeInstances` by cluster
//!   tag and `role=worker`; instances the worker table does not account for are terminated
//!   (strays), and the workers whose instance is terminated or absent are returned so the
//!   caller frees their slots.
//! - **shutdown**: nothing. Worker instances are machines of their own: when this endpoint
//!   stops they re-parent to another one (or, with no endpoint instance left, stop
//!   themselves), so stopping an endpoint for an upgrade costs no work in flight.
//!
//! Credentials come only from the SDK's default chain (the instance profile on EC2); no key
//! is read, written, logged or put in user data by this module. Throttling and transient
//! errors are retried by the SDK with exponential backoff ([`hashq_aws::sdk_config`]); capacity and
//! limit errors become [`LaunchError::Capacity`]. An error never panics the node: it frees
//! the slot and shows in `/status` `workers.launch_errors`.
//!
//! Caveat: the worker credential travels in user data, which anyone on the worker instance
//! can read (IMDS) and anyone with `ec2:DescribeInstanceAttribute` in the account can read
//! too. It opens only the worker routes and the binary download: never Raft, the
//! node-to-node routes or the admin routes, and a worker acts only for itself (each
//! registration gets its own secret).
//!
//! The module's parts: the launcher ([`launcher`]: run,
//! terminate, AWS errors), the reconciliation ([`reconcile`]: listing and planning), and the
//! user data ([`user_data`]: the worker's boot script). The SDK configuration and IMDS are
//! `hashq-aws`'s and the instance tags `hashq-proto`'s, shared with the worker's parent check.

mod launcher;
mod reconcile;
mod user_data;

pub use launcher::Ec2Launcher;
pub use user_data::{worker_user_data, WorkerBoot};

/// What can keep the `ec2` launcher from starting.
#[derive(Debug, thiserror::Error)]
pub enum Ec2Error {
    /// A setting is missing or malformed.
    #[error("--launcher ec2: {0}")]
    Config(String),
    /// Neither `--ec2-region` nor the SDK's chain names a region.
    #[error("--launcher ec2: no AWS region: pass --ec2-region (or set AWS_REGION)")]
    NoRegion,
    /// This node's instance id is not given and IMDS did not answer.
    #[error("--launcher ec2: cannot learn this node's instance id from IMDS ({0}); pass --ec2-instance-id")]
    InstanceId(String),
}
