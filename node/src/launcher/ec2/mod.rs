//! The `ec2` launcher: one EC2 instance per worker (SPEC section 7).
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
//! The module's parts: the flags and their checks (here), the launcher ([`launcher`]: run,
//! terminate, AWS errors), the reconciliation ([`reconcile`]: listing and planning), and the
//! user data ([`user_data`]: the worker's boot script). The SDK configuration, IMDS and the
//! instance tags are `hashq-aws`'s, shared with the worker's parent check.

mod launcher;
mod reconcile;
mod user_data;

use std::time::Duration;

use hashq_aws::is_instance_id;

pub use launcher::Ec2Launcher;
pub use user_data::{worker_user_data, WorkerBoot};

use crate::config::duration;
use user_data::is_plain_word;

/// The route that serves the node's own binary.
pub const BINARY_ROUTE: &str = "/internal/binary";

/// `hashq node` flags of the `ec2` launcher (SPEC section 7).
#[derive(clap::Args, Clone, Debug)]
pub struct Ec2Args {
    /// AWS region of the worker instances (default: the SDK's chain: AWS_REGION, the
    /// profile, IMDS).
    #[arg(long = "ec2-region", env = "HASHQ_EC2_REGION")]
    pub region: Option<String>,
    /// AMI of the worker instances (any Linux with systemd and curl).
    #[arg(long = "ec2-ami", env = "HASHQ_EC2_AMI")]
    pub ami: Option<String>,
    /// Instance type of the worker instances.
    #[arg(
        long = "ec2-instance-type",
        env = "HASHQ_EC2_INSTANCE_TYPE",
        default_value = "t3.micro"
    )]
    pub instance_type: String,
    /// Subnet of the worker instances (default: the default VPC's choice).
    #[arg(long = "ec2-subnet", env = "HASHQ_EC2_SUBNET")]
    pub subnet: Option<String>,
    /// Security group ids of the worker instances (repeatable, or comma-separated).
    #[arg(
        long = "ec2-security-group",
        env = "HASHQ_EC2_SECURITY_GROUP",
        value_delimiter = ','
    )]
    pub security_groups: Vec<String>,
    /// IAM instance profile (name or ARN) of the worker instances: it needs
    /// ec2:DescribeInstanceStatus and ec2:DescribeInstances for the parent check.
    #[arg(long = "ec2-instance-profile", env = "HASHQ_EC2_INSTANCE_PROFILE")]
    pub instance_profile: Option<String>,
    /// EC2 API endpoint (an emulator; AWS_ENDPOINT_URL works too). Workers use it as well.
    #[arg(long = "ec2-endpoint-url", env = "HASHQ_EC2_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// This node's own instance id, the workers' `hashq:parent` (default: asked from IMDS).
    #[arg(long = "ec2-instance-id", env = "HASHQ_EC2_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// How often worker instances check their parent with DescribeInstanceStatus.
    #[arg(
        long = "ec2-parent-check-every",
        env = "HASHQ_EC2_PARENT_CHECK_EVERY",
        default_value = "15s",
        value_parser = duration
    )]
    pub parent_check_every: Duration,
}

/// What can keep the `ec2` launcher from starting.
#[derive(Debug, thiserror::Error)]
pub enum Ec2Error {
    /// A flag is missing or malformed.
    #[error("--launcher ec2: {0}")]
    Config(String),
    /// Neither `--ec2-region` nor the SDK's chain names a region.
    #[error("--launcher ec2: no AWS region: pass --ec2-region (or set AWS_REGION)")]
    NoRegion,
    /// This node's instance id is not given and IMDS did not answer.
    #[error("--launcher ec2: cannot learn this node's instance id from IMDS ({0}); pass --ec2-instance-id")]
    InstanceId(String),
}

/// Whether `s` may be a cluster name: it goes into tags, client tokens and user data.
fn is_cluster_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl Ec2Args {
    /// Checks the flags `--launcher ec2` needs; `cluster` is `--cluster-name`.
    pub fn validate(&self, cluster: &str, has_token: bool) -> Result<(), Ec2Error> {
        let bad = |m: &str| Err(Ec2Error::Config(m.to_string()));
        if !has_token {
            return bad("--worker-token is required: workers fetch the binary and join with it");
        }
        if !is_cluster_name(cluster) {
            return bad("--cluster-name must be 1-40 letters, digits, '-', '_' or '.'");
        }
        match &self.ami {
            Some(ami) if is_plain_word(ami) => {}
            _ => return bad("--ec2-ami is required"),
        }
        match &self.instance_profile {
            Some(p) if is_plain_word(p) => {}
            _ => {
                return bad(
                    "--ec2-instance-profile is required (workers check their parent with it)",
                )
            }
        }
        if !is_plain_word(&self.instance_type) {
            return bad("--ec2-instance-type is not an instance type");
        }
        if self.subnet.as_deref().is_some_and(|s| !is_plain_word(s)) {
            return bad("--ec2-subnet is not a subnet id");
        }
        if self.security_groups.iter().any(|g| !is_plain_word(g)) {
            return bad("--ec2-security-group is not a security group id");
        }
        if self.region.as_deref().is_some_and(|r| !is_plain_word(r)) {
            return bad("--ec2-region is not a region name");
        }
        if let Some(url) = &self.endpoint_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) || !is_plain_word(url) {
                return bad("--ec2-endpoint-url must be an http(s) URL");
            }
        }
        if self
            .instance_id
            .as_deref()
            .is_some_and(|i| !is_instance_id(i))
        {
            return bad("--ec2-instance-id must look like i-0123456789abcdef0");
        }
        if self.parent_check_every < Duration::from_millis(100) {
            return bad("--ec2-parent-check-every must be at least 100ms");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags that pass [`Ec2Args::validate`].
    pub(super) fn args() -> Ec2Args {
        Ec2Args {
            region: Some("us-east-1".into()),
            ami: Some("ami-123".into()),
            instance_type: "t3.micro".into(),
            subnet: None,
            security_groups: vec!["sg-1".into()],
            instance_profile: Some("hashq-worker".into()),
            endpoint_url: None,
            instance_id: Some("i-0123456789abcdef0".into()),
            parent_check_every: Duration::from_secs(15),
        }
    }

    #[test]
    fn flags_are_checked_together() {
        assert!(args().validate("prod", true).is_ok());
        assert!(
            args().validate("prod", false).is_err(),
            "a token is required"
        );
        assert!(args().validate("no spaces", true).is_err());
        let missing = [
            Ec2Args {
                ami: None,
                ..args()
            },
            Ec2Args {
                instance_profile: None,
                ..args()
            },
            Ec2Args {
                instance_id: Some("pid:3".into()),
                ..args()
            },
            Ec2Args {
                endpoint_url: Some("ftp://x".into()),
                ..args()
            },
        ];
        for a in missing {
            assert!(a.validate("prod", true).is_err(), "{a:?}");
        }
    }
}
