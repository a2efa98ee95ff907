//! The AWS plumbing the node's `ec2` launcher and the worker's EC2 parent check share
//! (README, "Running on AWS"): the SDK configuration ([`sdk_config`], with a [`Patience`] for each
//! caller), this instance's own id from IMDS ([`own_instance_id`]), and the shape of an
//! instance id ([`is_instance_id`], from `hashq-proto`). The tag names by which hashq's instances find each other
//! are part of the protocol: `hashq-proto`'s `ec2` module.
//!
//! Credentials come only from the SDK's default chain (the instance profile on EC2); nothing
//! here reads, writes or logs a key. Throttling and transient errors are retried by the SDK
//! with exponential backoff, within timeouts that keep a slow API from blocking a caller for
//! long. Nothing here panics: an API or IMDS that does not answer is an error for the caller
//! to judge.
//!
//! All of hashq's AWS code is this crate and the two modules that use it (`hashq-node`'s
//! `launcher::ec2` and `hashq-worker`'s `ec2`), and the `ec2` cargo feature of those crates
//! and of `hashq` leaves them out of a build together: a local cluster's first build skips the
//! SDK, by far the largest dependency.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::error::DisplayErrorContext;

pub use hashq_proto::ec2::is_instance_id;

/// How long the SDK keeps at one operation: standard retries with exponential backoff
/// (throttling included) and timeouts. Connecting is always given 3 seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Patience {
    /// Tries of one operation, the first included.
    pub max_attempts: u32,
    /// The first backoff; it grows exponentially up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// The limit of one try.
    pub attempt_timeout: Duration,
    /// The limit of all tries of one operation together.
    pub operation_timeout: Duration,
}

impl Patience {
    /// The node's launcher: a launch or a termination is worth waiting for.
    pub const LAUNCHER: Patience = Patience {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(20),
        attempt_timeout: Duration::from_secs(20),
        operation_timeout: Duration::from_secs(90),
    };

    /// The worker's parent check: it runs again soon, and an unanswered check changes
    /// nothing, so it gives up sooner.
    pub const PARENT_CHECK: Patience = Patience {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(10),
        attempt_timeout: Duration::from_secs(10),
        operation_timeout: Duration::from_secs(30),
    };
}

/// The SDK configuration hashq uses for EC2, on nodes and workers alike: the default
/// credential chain, `region` (else the SDK's chain), `endpoint_url` (else
/// `AWS_ENDPOINT_URL`), and the retries and timeouts of `patience`.
pub async fn sdk_config(
    region: Option<&str>,
    endpoint_url: Option<&str>,
    patience: Patience,
) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(patience.max_attempts)
                .with_initial_backoff(patience.initial_backoff)
                .with_max_backoff(patience.max_backoff),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(patience.attempt_timeout)
                .operation_timeout(patience.operation_timeout)
                .build(),
        );
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_string()));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// Asks IMDS (IMDSv2) for the id of the instance this process runs on; the error says why
/// there is none (IMDS did not answer, or answered something that is no instance id).
pub async fn own_instance_id() -> Result<String, String> {
    let imds = aws_config::imds::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(2))
        .build();
    let id = imds
        .get("/latest/meta-data/instance-id")
        .await
        .map_err(|e| DisplayErrorContext(&e).to_string())?;
    let id: String = id.into();
    if is_instance_id(&id) {
        Ok(id)
    } else {
        Err(format!("it answered `{id}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_recognised() {
        assert!(is_instance_id("i-0123456789abcdef0"));
        assert!(is_instance_id("i-8bc7d67831628b22d"));
        for bad in ["", "i-", "pid:42", "i-xyz", "i-0123 45", "j-0123"] {
            assert!(!is_instance_id(bad), "{bad}");
        }
    }
}
