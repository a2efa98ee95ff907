//! The `ec2` launcher's flags and their checks (the launcher itself is
//! [`crate::launcher::ec2`], which takes them as checked here).

use std::time::Duration;

use hashq_proto::ec2::is_instance_id;

use super::{duration, ConfigError};

/// `hashq node` flags of the `ec2` launcher (README, "Running on AWS").
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

/// A value that goes into user data as one word: no quoting can break out of it.
pub(crate) fn is_plain_word(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'=' | b',')
        })
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
    pub fn validate(&self, cluster: &str, has_token: bool) -> Result<(), ConfigError> {
        let bad = |why| Err(ConfigError::Ec2(why));
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
pub(crate) mod tests {
    use super::*;

    /// Flags that pass [`Ec2Args::validate`].
    pub(crate) fn args() -> Ec2Args {
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
