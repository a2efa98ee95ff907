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
//! errors are retried by the SDK with exponential backoff ([`sdk_config`]); capacity and
//! limit errors become [`LaunchError::Capacity`]. An error never panics the node: it frees
//! the slot and shows in `/status` `workers.launch_errors`.
//!
//! Caveat: the worker credential travels in user data, which anyone on the worker instance
//! can read (IMDS) and anyone with `ec2:DescribeInstanceAttribute` in the account can read
//! too. It opens only the worker routes and the binary download: never Raft, the
//! node-to-node routes or the admin routes, and a worker acts only for itself (each
//! registration gets its own secret).

use std::fmt::Write as _;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, InstanceMetadataOptionsRequest,
    InstanceStateName, InstanceType, ResourceType, ShutdownBehavior, Tag, TagSpecification,
};
use base64::Engine as _;
use futures::future::BoxFuture;
use hashq_raft::types::Millis;
use hashq_raft::{NodeId, WorkerId};

use super::{LaunchError, LaunchSpec, Launcher, WorkerTable};
use crate::config::{duration, NodeConfig};

/// Tag naming the cluster an instance belongs to (endpoints and workers).
pub const TAG_CLUSTER: &str = "hashq:cluster";
/// Tag naming what an instance is: `endpoint`, `witness` or `worker`.
pub const TAG_ROLE: &str = "hashq:role";
/// Tag with a worker instance's slot (the worker id, a decimal number).
pub const TAG_WORKER_ID: &str = "hashq:worker-id";
/// Tag with the instance id of the endpoint that launched a worker.
pub const TAG_PARENT: &str = "hashq:parent";
/// Tag with the node id of the endpoint that launched a worker.
pub const TAG_PARENT_NODE: &str = "hashq:parent-node";
/// Tag with an endpoint instance's Raft node id (set by `scripts/deploy-ec2.sh`); workers
/// re-parent by it.
pub const TAG_NODE_ID: &str = "hashq:node-id";

/// EC2 error codes that mean "no capacity or a limit right now", not "misconfigured".
const CAPACITY_CODES: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "InsufficientFreeAddressesInSubnet",
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    "MaxSpotInstanceCountExceeded",
    "ResourceLimitExceeded",
];

/// Raw user data may be at most this large (an EC2 limit, before base64).
const USER_DATA_LIMIT: usize = 16 * 1024;
/// A worker instance missing from `DescribeInstances` is given up only after this long since
/// its slot was reserved: the API is eventually consistent right after `RunInstances`.
const ABSENT_GRACE: Duration = Duration::from_secs(120);
/// Longest error message kept from AWS (authorization failures carry long encoded blobs).
const MESSAGE_LIMIT: usize = 300;

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

/// Whether `s` looks like an EC2 instance id (`i-` and hex digits).
pub fn is_instance_id(s: &str) -> bool {
    s.strip_prefix("i-").is_some_and(|hex| {
        !hex.is_empty() && hex.len() <= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// Whether `s` may be a cluster name: it goes into tags, client tokens and user data.
fn is_cluster_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A value that goes into user data as one word: no quoting can break out of it.
fn is_plain_word(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'=' | b',')
        })
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

/// The SDK configuration hashq uses for EC2, on nodes and workers alike: the default
/// credential chain, `region` (else the SDK's chain), `endpoint_url` (else
/// `AWS_ENDPOINT_URL`), standard retries with exponential backoff (throttling included) and
/// bounded timeouts, so a slow API never blocks a caller for long.
pub async fn sdk_config(region: Option<&str>, endpoint_url: Option<&str>) -> SdkConfig {
    sdk_config_with(region, endpoint_url, Duration::from_millis(500)).await
}

async fn sdk_config_with(
    region: Option<&str>,
    endpoint_url: Option<&str>,
    initial_backoff: Duration,
) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(5)
                .with_initial_backoff(initial_backoff)
                .with_max_backoff(Duration::from_secs(20)),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(20))
                .operation_timeout(Duration::from_secs(90))
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

/// Asks IMDS (IMDSv2) for the id of the instance this process runs on.
async fn own_instance_id() -> Result<String, Ec2Error> {
    let imds = aws_config::imds::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(2))
        .build();
    let id = imds
        .get("/latest/meta-data/instance-id")
        .await
        .map_err(|e| Ec2Error::InstanceId(DisplayErrorContext(&e).to_string()))?;
    let id: String = id.into();
    if is_instance_id(&id) {
        Ok(id)
    } else {
        Err(Ec2Error::InstanceId(format!("it answered `{id}`")))
    }
}

/// Starts and stops worker instances for one node.
pub struct Ec2Launcher {
    client: aws_sdk_ec2::Client,
    args: Ec2Args,
    cluster: String,
    token: String,
    /// This node's URL (`http://addr`): workers fetch the binary here first.
    node_url: Option<String>,
    /// This node's own instance id: the workers' `hashq:parent`.
    instance_id: String,
    /// The region and endpoint the SDK resolved: the workers use the same.
    region: String,
    endpoint_url: Option<String>,
}

impl Ec2Launcher {
    /// Builds the EC2 client and learns this node's instance id (flag, else IMDS).
    pub async fn new(config: &NodeConfig) -> Result<Self, Ec2Error> {
        let args = config.ec2.clone();
        args.validate(&config.cluster_name, config.credentials.worker.is_some())?;
        // Workers get the worker credential only: it opens the worker routes and the binary
        // download, never Raft.
        let token = config
            .credentials
            .worker
            .clone()
            .ok_or_else(|| Ec2Error::Config("--worker-token is required".into()))?;
        let sdk = sdk_config(args.region.as_deref(), args.endpoint_url.as_deref()).await;
        let region = sdk.region().ok_or(Ec2Error::NoRegion)?.to_string();
        if !is_plain_word(&region) {
            return Err(Ec2Error::Config(format!(
                "region `{region}` is not a region name"
            )));
        }
        let endpoint_url = sdk.endpoint_url().map(str::to_string);
        let instance_id = match &args.instance_id {
            Some(id) => id.clone(),
            None => own_instance_id().await?,
        };
        tracing::info!(
            %region,
            endpoint = endpoint_url.as_deref().unwrap_or("aws"),
            instance = %instance_id,
            "ec2 launcher ready"
        );
        Ok(Ec2Launcher {
            client: aws_sdk_ec2::Client::new(&sdk),
            node_url: config.peer_addr(config.id).map(|a| format!("http://{a}")),
            cluster: config.cluster_name.clone(),
            token,
            instance_id,
            region,
            endpoint_url,
            args,
        })
    }

    fn tag(key: &str, value: impl Into<String>) -> Tag {
        Tag::builder().key(key).value(value).build()
    }

    async fn run_instance(&self, spec: &LaunchSpec) -> Result<String, LaunchError> {
        let mut binary_urls: Vec<String> = self.node_url.iter().cloned().collect();
        for url in &spec.endpoints {
            if !binary_urls.contains(url) {
                binary_urls.push(url.clone());
            }
        }
        let binary_urls: Vec<String> = binary_urls
            .iter()
            .map(|u| format!("{}{BINARY_ROUTE}", u.trim_end_matches('/')))
            .collect();
        let user_data = worker_user_data(&WorkerBoot {
            worker: spec.worker,
            parent: spec.parent,
            parent_instance: &self.instance_id,
            cluster: &self.cluster,
            token: &self.token,
            endpoints: &spec.endpoints,
            binary_urls: &binary_urls,
            idle_timeout: spec.idle_timeout,
            orphan_timeout: spec.orphan_timeout,
            parent_check_every: self.args.parent_check_every,
            region: &self.region,
            endpoint_url: self.endpoint_url.as_deref(),
        })?;
        let tags = vec![
            Self::tag(
                "Name",
                format!("hashq-{}-worker-{}", self.cluster, spec.worker.0),
            ),
            Self::tag(TAG_CLUSTER, &self.cluster),
            Self::tag(TAG_ROLE, "worker"),
            Self::tag(TAG_WORKER_ID, spec.worker.0.to_string()),
            Self::tag(TAG_PARENT, &self.instance_id),
            Self::tag(TAG_PARENT_NODE, spec.parent.to_string()),
        ];
        let tag_specs = [ResourceType::Instance, ResourceType::Volume]
            .into_iter()
            .map(|kind| {
                TagSpecification::builder()
                    .resource_type(kind)
                    .set_tags(Some(tags.clone()))
                    .build()
            })
            .collect();
        let profile = self.args.instance_profile.clone().unwrap_or_default();
        let profile = if profile.starts_with("arn:") {
            IamInstanceProfileSpecification::builder().arn(profile)
        } else {
            IamInstanceProfileSpecification::builder().name(profile)
        }
        .build();
        // The SDK retries the very same request, so one token per launch makes a retried
        // RunInstances (a timeout after AWS acted) return the instance it already started.
        let client_token = format!(
            "hashq-{}-{}-{:016x}",
            self.cluster,
            spec.worker.0,
            rand::random::<u64>()
        );
        let answer = self
            .client
            .run_instances()
            .image_id(self.args.ami.clone().unwrap_or_default())
            .instance_type(InstanceType::from(self.args.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .set_subnet_id(self.args.subnet.clone())
            .set_security_group_ids(
                (!self.args.security_groups.is_empty()).then(|| self.args.security_groups.clone()),
            )
            .iam_instance_profile(profile)
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .build(),
            )
            .user_data(base64::engine::general_purpose::STANDARD.encode(user_data))
            .set_tag_specifications(Some(tag_specs))
            .client_token(client_token)
            .send()
            .await
            .map_err(|e| launch_error("RunInstances", &e))?;
        answer
            .instances()
            .iter()
            .find_map(|i| i.instance_id())
            .filter(|id| is_instance_id(id))
            .map(str::to_string)
            .ok_or_else(|| {
                LaunchError::Failed("RunInstances answered without an instance id".into())
            })
    }

    async fn terminate_instances(&self, ids: &[String]) -> Result<(), LaunchError> {
        // TerminateInstances takes at most 1000 ids; stay well below.
        for chunk in ids.chunks(100) {
            let sent = self
                .client
                .terminate_instances()
                .set_instance_ids(Some(chunk.to_vec()))
                .send()
                .await;
            match sent {
                Ok(_) => {}
                // Already gone is what we wanted.
                Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => {}
                Err(e) => return Err(launch_error("TerminateInstances", &e)),
            }
        }
        Ok(())
    }

    /// Every instance of this cluster tagged as a worker, in any state.
    async fn worker_instances(&self) -> Result<Vec<SeenInstance>, LaunchError> {
        let filter = |name: &str, value: &str| Filter::builder().name(name).values(value).build();
        let mut pages = self
            .client
            .describe_instances()
            .filters(filter(&format!("tag:{TAG_CLUSTER}"), &self.cluster))
            .filters(filter(&format!("tag:{TAG_ROLE}"), "worker"))
            .into_paginator()
            .send();
        let mut seen = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| launch_error("DescribeInstances", &e))?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                let Some(id) = instance.instance_id().filter(|id| is_instance_id(id)) else {
                    continue;
                };
                let worker = instance
                    .tags()
                    .iter()
                    .find(|t| t.key() == Some(TAG_WORKER_ID))
                    .and_then(|t| t.value())
                    .and_then(|v| v.parse::<u64>().ok());
                seen.push(SeenInstance {
                    id: id.to_string(),
                    live: instance.state().and_then(|s| s.name()).is_none_or(is_live),
                    worker,
                });
            }
        }
        Ok(seen)
    }
}

/// Whether an instance in this state may still run a worker (or soon will, or may again).
fn is_live(state: &InstanceStateName) -> bool {
    matches!(
        state,
        InstanceStateName::Pending
            | InstanceStateName::Running
            | InstanceStateName::Stopping
            | InstanceStateName::Stopped
    )
}

/// The route that serves the node's own binary.
pub const BINARY_ROUTE: &str = "/internal/binary";

/// An AWS error as a [`LaunchError`]: capacity and limit codes become `Capacity`; the
/// message names the operation and the code, and is cut short (never a request body).
fn launch_error<E, R>(operation: &str, e: &aws_sdk_ec2::error::SdkError<E, R>) -> LaunchError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match e.code() {
        Some(code) => classify(operation, code, e.message().unwrap_or("")),
        None => LaunchError::Failed(truncate(format!("{operation}: {}", DisplayErrorContext(e)))),
    }
}

/// Maps an EC2 error code to a [`LaunchError`].
fn classify(operation: &str, code: &str, message: &str) -> LaunchError {
    let text = truncate(format!("{operation}: {code}: {message}"));
    if CAPACITY_CODES.contains(&code) {
        LaunchError::Capacity(text)
    } else {
        LaunchError::Failed(text)
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MESSAGE_LIMIT {
        let mut cut = MESSAGE_LIMIT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// One worker instance as `DescribeInstances` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SeenInstance {
    id: String,
    /// Pending, running, stopping or stopped (not shutting down or terminated).
    live: bool,
    /// Its `hashq:worker-id` tag, when it has a valid one.
    worker: Option<u64>,
}

/// What a reconciliation does.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// Live instances that no slot accounts for: to terminate.
    strays: Vec<String>,
    /// Workers whose instance is gone: their slots are to be freed.
    gone: Vec<WorkerId>,
}

/// Compares the instances with the worker table.
///
/// A live instance is a stray when it has no valid worker id tag, when its slot is not in the
/// table (freed: the worker exited, was declared lost, or its launch timed out), or when its
/// slot names another instance (a duplicate launch). A slot id at or above `next_worker` is a
/// reservation this view does not show yet, and a slot with no handle is being launched: both
/// are left alone. A managed worker whose instance is shutting down or terminated is gone; one
/// whose instance is missing altogether is gone only after [`ABSENT_GRACE`], because
/// `DescribeInstances` may not show an instance right after it started.
fn plan(seen: &[SeenInstance], table: &WorkerTable, absent_grace: Duration) -> Plan {
    let mut plan = Plan::default();
    for instance in seen.iter().filter(|i| i.live) {
        let stray = match instance.worker {
            None => true,
            Some(id) if id >= table.next_worker => false,
            Some(id) => match table.workers.iter().find(|w| w.id.0 == id) {
                None => true,
                Some(w) => !w.handle.is_empty() && w.handle != instance.id,
            },
        };
        if stray {
            plan.strays.push(instance.id.clone());
        }
    }
    let grace = absent_grace.as_millis() as Millis;
    for w in table
        .workers
        .iter()
        .filter(|w| w.managed && is_instance_id(&w.handle))
    {
        let gone = match seen.iter().find(|i| i.id == w.handle) {
            Some(instance) => !instance.live,
            None => table.now.saturating_sub(w.since) >= grace,
        };
        if gone {
            plan.gone.push(w.id);
        }
    }
    plan
}

impl Launcher for Ec2Launcher {
    fn name(&self) -> &'static str {
        "ec2"
    }

    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<String, LaunchError>> {
        Box::pin(async move {
            let instance = self.run_instance(&spec).await?;
            tracing::info!(
                worker = %spec.worker,
                %instance,
                parent = spec.parent,
                "worker instance started"
            );
            Ok(instance)
        })
    }

    fn terminate(
        &self,
        worker: WorkerId,
        handle: String,
    ) -> BoxFuture<'_, Result<(), LaunchError>> {
        Box::pin(async move {
            // Not an instance (a worker started by hand, or by another launcher): not ours.
            if !is_instance_id(&handle) {
                return Ok(());
            }
            tracing::warn!(%worker, instance = %handle, "terminating a worker instance");
            self.terminate_instances(&[handle]).await
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        // See the module doc: worker instances outlive an endpoint that stops.
        Box::pin(async {})
    }

    fn reconcile(&self, table: WorkerTable) -> BoxFuture<'_, Result<Vec<WorkerId>, LaunchError>> {
        Box::pin(async move {
            let seen = self.worker_instances().await?;
            let plan = plan(&seen, &table, ABSENT_GRACE);
            if !plan.strays.is_empty() {
                tracing::warn!(
                    instances = ?plan.strays,
                    "terminating worker instances the worker table does not account for"
                );
                self.terminate_instances(&plan.strays).await?;
            }
            Ok(plan.gone)
        })
    }
}

/// Everything a worker instance's user data says.
#[derive(Clone, Debug)]
pub struct WorkerBoot<'a> {
    /// The reserved slot the worker fills.
    pub worker: WorkerId,
    /// The launching node.
    pub parent: NodeId,
    /// The launching endpoint's instance id, for the parent check.
    pub parent_instance: &'a str,
    /// `--cluster-name`: the `hashq:cluster` tag.
    pub cluster: &'a str,
    /// The worker credential (written to a root-only file on the instance).
    pub token: &'a str,
    /// Client-API base URLs of the members.
    pub endpoints: &'a [String],
    /// Where to fetch the binary, in order of preference.
    pub binary_urls: &'a [String],
    /// The worker's `--idle-timeout`.
    pub idle_timeout: Duration,
    /// The worker's `--no-endpoint-exit-after`.
    pub orphan_timeout: Duration,
    /// The worker's `--parent-check-every`.
    pub parent_check_every: Duration,
    /// The region the worker's EC2 client uses.
    pub region: &'a str,
    /// An EC2 API endpoint other than AWS's (an emulator).
    pub endpoint_url: Option<&'a str>,
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

/// The user data (a shell script) of a worker instance: it writes the token to a root-only
/// environment file, learns the instance id from IMDSv2, fetches `hashq` from the endpoints
/// (`GET /internal/binary` with the token), and runs `hashq worker` as a systemd service
/// whose end (idle, orphaned, or failing for good) powers the instance off, which terminates
/// it. The token never appears on a command line or in the boot log.
pub fn worker_user_data(boot: &WorkerBoot<'_>) -> Result<String, LaunchError> {
    let words = [boot.parent_instance, boot.cluster, boot.region]
        .into_iter()
        .chain(boot.endpoint_url)
        .chain(boot.endpoints.iter().map(String::as_str))
        .chain(boot.binary_urls.iter().map(String::as_str));
    for word in words {
        if !is_plain_word(word) {
            return Err(LaunchError::Failed(format!(
                "`{word}` cannot go into worker user data"
            )));
        }
    }
    if boot.token.is_empty() || !boot.token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(LaunchError::Failed(
            "the worker credential must be visible ASCII".into(),
        ));
    }
    let mut args = format!(
        "worker --worker-id {} --parent {} --handle ${{HASHQ_HANDLE}} --endpoints {} \
         --idle-timeout {} --no-endpoint-exit-after {} --cluster-name {} \
         --ec2-parent-instance {} --ec2-region {} --parent-check-every {} --shutdown-on-orphan",
        boot.worker.0,
        boot.parent,
        boot.endpoints.join(","),
        human(boot.idle_timeout),
        human(boot.orphan_timeout),
        boot.cluster,
        boot.parent_instance,
        boot.region,
        human(boot.parent_check_every),
    );
    if let Some(url) = boot.endpoint_url {
        let _ = write!(args, " --ec2-endpoint-url {url}");
    }
    let script = format!(
        r#"#!/bin/bash
# hashq worker {worker} of cluster {cluster}, launched by node {parent} ({parent_instance}).
# Fetches the hashq binary from the cluster's endpoints and runs `hashq worker` as a systemd
# service; when the worker ends (idle, orphaned, or failing for good) the instance powers
# off, and its shutdown behaviour terminates it. No AWS key is here: the worker uses the
# instance profile.
set -euo pipefail
umask 077
install -d -m 0700 /etc/hashq
cat > /etc/hashq/worker.env <<'HASHQ_ENV'
HASHQ_WORKER_TOKEN={token}
HASHQ_LOG_FORMAT=json
HASHQ_ENV

# The worker's handle is this instance's id (IMDSv2).
imds_token=$(curl -fsS --retry 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://169.254.169.254/latest/api/token)
instance_id=$(curl -fsS --retry 5 -H "X-aws-ec2-metadata-token: $imds_token" http://169.254.169.254/latest/meta-data/instance-id)
echo "HASHQ_HANDLE=$instance_id" >> /etc/hashq/worker.env
echo "HASHQ_THREADS=$(nproc)" >> /etc/hashq/worker.env

# The binary, from the parent endpoint first (GET /internal/binary needs the token; curl
# reads the header from a root-only file so the token is never on a command line).
binary_urls='{binary_urls}'
sed -n 's/^HASHQ_WORKER_TOKEN=\(.*\)$/Authorization: Bearer \1/p' /etc/hashq/worker.env > /etc/hashq/auth.header
fetched=
for round in 1 2 3 4 5 6 7 8 9 10; do
  for url in $binary_urls; do
    if curl -fsS --connect-timeout 5 --max-time 600 -H @/etc/hashq/auth.header -o /usr/local/bin/hashq.part "$url"; then
      fetched=yes
      break 2
    fi
  done
  sleep $((round * 3))
done
rm -f /etc/hashq/auth.header
if [ -z "$fetched" ]; then
  echo "hashq: no endpoint served the binary; powering off" >&2
  shutdown -h now
  exit 1
fi
chmod 0755 /usr/local/bin/hashq.part
mv /usr/local/bin/hashq.part /usr/local/bin/hashq

cat > /etc/systemd/system/hashq-worker.service <<'HASHQ_UNIT'
[Unit]
Description=hashq worker {worker} of cluster {cluster}
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=600
StartLimitBurst=5
SuccessAction=poweroff
FailureAction=poweroff

[Service]
EnvironmentFile=/etc/hashq/worker.env
ExecStart=/usr/local/bin/hashq {args}
Restart=on-failure
RestartSec=5
ProtectHome=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
HASHQ_UNIT
systemctl daemon-reload
systemctl enable --now hashq-worker.service
"#,
        worker = boot.worker,
        cluster = boot.cluster,
        parent = boot.parent,
        parent_instance = boot.parent_instance,
        token = boot.token,
        binary_urls = boot.binary_urls.join(" "),
        args = args,
    );
    if script.len() > USER_DATA_LIMIT {
        return Err(LaunchError::Failed(format!(
            "worker user data is {} bytes, over the EC2 limit of {USER_DATA_LIMIT}",
            script.len()
        )));
    }
    Ok(script)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use aws_sdk_ec2::config::Credentials;
    use axum::http::StatusCode;
    use hashq_raft::types::{WorkerRecord, WorkerState};

    use super::*;

    fn record(id: u64, handle: &str, since: Millis) -> WorkerRecord {
        WorkerRecord {
            id: WorkerId(id),
            parent: 1,
            state: WorkerState::Running,
            managed: true,
            since,
            last_seen: since,
            leased: 0,
            completed: 0,
            handle: handle.to_string(),
            host: String::new(),
            last_lease: None,
            secret: Default::default(),
            incarnation: 0,
        }
    }

    fn seen(id: &str, live: bool, worker: Option<u64>) -> SeenInstance {
        SeenInstance {
            id: id.to_string(),
            live,
            worker,
        }
    }

    #[test]
    fn instance_ids_are_recognised() {
        assert!(is_instance_id("i-0123456789abcdef0"));
        assert!(is_instance_id("i-8bc7d67831628b22d"));
        for bad in ["", "i-", "pid:42", "i-xyz", "i-0123 45", "j-0123"] {
            assert!(!is_instance_id(bad), "{bad}");
        }
    }

    #[test]
    fn capacity_and_limit_errors_are_capacity_and_messages_stay_short() {
        for code in [
            "InsufficientInstanceCapacity",
            "InstanceLimitExceeded",
            "VcpuLimitExceeded",
        ] {
            assert!(
                matches!(
                    classify("RunInstances", code, "no"),
                    LaunchError::Capacity(_)
                ),
                "{code}"
            );
        }
        match classify("RunInstances", "UnauthorizedOperation", &"x".repeat(5000)) {
            LaunchError::Failed(m) => {
                assert!(m.starts_with("RunInstances: UnauthorizedOperation: x"));
                assert!(m.chars().count() <= MESSAGE_LIMIT + 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reconciliation_terminates_strays_and_frees_vanished_workers() {
        let now = 1_000_000;
        let table = WorkerTable {
            workers: vec![
                record(1, "i-0000000000000001", now - 5_000),
                record(2, "i-0000000000000002", now - 5_000),
                // Launching, no handle yet: its instance is not a stray.
                WorkerRecord {
                    state: WorkerState::Launching,
                    ..record(3, "", now - 1_000)
                },
                // Just launched, not visible yet: not gone before the grace.
                record(4, "i-0000000000000004", now - 1_000),
                // Long missing: gone.
                record(5, "i-0000000000000005", now - 600_000),
                // A worker started by hand: never the launcher's business.
                WorkerRecord {
                    managed: false,
                    ..record(6, "pid:77", now - 600_000)
                },
            ],
            next_worker: 10,
            now,
        };
        let instances = [
            seen("i-0000000000000001", true, Some(1)),
            // Terminated behind the cluster's back.
            seen("i-0000000000000002", false, Some(2)),
            seen("i-0000000000000003", true, Some(3)),
            // Tagged for a slot that is not in the table any more.
            seen("i-00000000000000a7", true, Some(7)),
            // A second instance for slot 1.
            seen("i-00000000000000a1", true, Some(1)),
            // No worker id at all.
            seen("i-00000000000000ff", true, None),
            // A reservation newer than this view.
            seen("i-00000000000000aa", true, Some(12)),
            // Already terminated strays are left alone.
            seen("i-00000000000000bb", false, Some(8)),
        ];
        let plan = plan(&instances, &table, ABSENT_GRACE);
        assert_eq!(
            plan.strays,
            [
                "i-00000000000000a7",
                "i-00000000000000a1",
                "i-00000000000000ff"
            ]
        );
        assert_eq!(plan.gone, [WorkerId(2), WorkerId(5)]);
    }

    fn boot<'a>(endpoints: &'a [String], urls: &'a [String]) -> WorkerBoot<'a> {
        WorkerBoot {
            worker: WorkerId(7),
            parent: 2,
            parent_instance: "i-0123456789abcdef0",
            cluster: "prod",
            token: "s3cret-token",
            endpoints,
            binary_urls: urls,
            idle_timeout: Duration::from_secs(600),
            orphan_timeout: Duration::from_secs(30),
            parent_check_every: Duration::from_secs(15),
            region: "eu-west-1",
            endpoint_url: None,
        }
    }

    #[test]
    fn user_data_runs_the_worker_with_its_slot_parent_and_handle() {
        let endpoints = vec![
            "http://10.0.0.1:7101".to_string(),
            "http://10.0.0.2:7101".to_string(),
        ];
        let urls = vec!["http://10.0.0.2:7101/internal/binary".to_string()];
        let script = worker_user_data(&boot(&endpoints, &urls)).unwrap();
        assert!(script.starts_with("#!/bin/bash\n"));
        let exec = script
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart=/usr/local/bin/hashq "))
            .unwrap();
        for part in [
            "worker --worker-id 7 --parent 2 --handle ${HASHQ_HANDLE}",
            "--endpoints http://10.0.0.1:7101,http://10.0.0.2:7101",
            "--idle-timeout 10m",
            "--ec2-parent-instance i-0123456789abcdef0",
            "--ec2-region eu-west-1",
            "--cluster-name prod",
            "--shutdown-on-orphan",
        ] {
            assert!(exec.contains(part), "{part} missing from {exec}");
        }
        // The token is in the root-only environment file, never on a command line.
        assert_eq!(script.matches("s3cret-token").count(), 1);
        assert!(script.contains("HASHQ_WORKER_TOKEN=s3cret-token\n"));
        assert!(!exec.contains("token"));
        assert!(script.contains("binary_urls='http://10.0.0.2:7101/internal/binary'"));
        assert!(script.contains("SuccessAction=poweroff"));
        for secret in ["AWS_ACCESS_KEY", "AWS_SECRET", "aws_access_key"] {
            assert!(!script.contains(secret));
        }
    }

    #[test]
    fn user_data_refuses_values_that_could_break_out_of_it() {
        let endpoints = vec!["http://10.0.0.1:7101".to_string()];
        let urls = vec!["http://10.0.0.1:7101/internal/binary".to_string()];
        let mut b = boot(&endpoints, &urls);
        b.token = "a\nb";
        assert!(worker_user_data(&b).is_err());
        let mut b = boot(&endpoints, &urls);
        b.cluster = "x'; rm -rf /";
        assert!(worker_user_data(&b).is_err());
    }

    fn args() -> Ec2Args {
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

    /// A stand-in EC2 endpoint on loopback: throttles the first `throttle` TerminateInstances
    /// calls and has no capacity for RunInstances.
    async fn fake_ec2(throttle: usize) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let terminates = Arc::new(AtomicUsize::new(0));
        let runs = Arc::new(AtomicUsize::new(0));
        let (t, r) = (terminates.clone(), runs.clone());
        let app = axum::Router::new().fallback(move |body: String| {
            let (t, r) = (t.clone(), r.clone());
            async move {
                let error = |status: StatusCode, code: &str| {
                    (
                        status,
                        format!(
                            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error>\
                             <Code>{code}</Code><Message>test</Message></Error></Errors>\
                             <RequestID>r1</RequestID></Response>"
                        ),
                    )
                };
                if body.contains("Action=TerminateInstances") {
                    if t.fetch_add(1, Ordering::SeqCst) < throttle {
                        return error(StatusCode::SERVICE_UNAVAILABLE, "RequestLimitExceeded");
                    }
                    return (
                        StatusCode::OK,
                        "<TerminateInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
                         <requestId>r2</requestId><instancesSet><item>\
                         <instanceId>i-0123456789abcdef0</instanceId>\
                         <currentState><code>32</code><name>shutting-down</name></currentState>\
                         <previousState><code>16</code><name>running</name></previousState>\
                         </item></instancesSet></TerminateInstancesResponse>"
                            .to_string(),
                    );
                }
                if body.contains("Action=RunInstances") {
                    r.fetch_add(1, Ordering::SeqCst);
                    return error(StatusCode::INTERNAL_SERVER_ERROR, "InsufficientInstanceCapacity");
                }
                error(StatusCode::BAD_REQUEST, "InvalidAction")
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, terminates, runs)
    }

    async fn launcher(url: &str) -> Ec2Launcher {
        let sdk = sdk_config_with(Some("us-east-1"), Some(url), Duration::from_millis(1)).await;
        // Test credentials for a loopback stand-in; real nodes use the default chain.
        let config = aws_sdk_ec2::config::Builder::from(&sdk)
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .build();
        Ec2Launcher {
            client: aws_sdk_ec2::Client::from_conf(config),
            args: args(),
            cluster: "prod".into(),
            token: "s3cret-token".into(),
            node_url: Some("http://127.0.0.1:7101".into()),
            instance_id: "i-0123456789abcdef0".into(),
            region: "us-east-1".into(),
            endpoint_url: Some(url.to_string()),
        }
    }

    #[tokio::test]
    async fn throttling_is_retried_with_backoff() {
        let (url, terminates, _) = fake_ec2(2).await;
        let launcher = launcher(&url).await;
        launcher
            .terminate(WorkerId(1), "i-0123456789abcdef0".into())
            .await
            .unwrap();
        assert_eq!(
            terminates.load(Ordering::SeqCst),
            3,
            "two throttled tries, then success"
        );
        // A handle that is no instance is not sent to EC2 at all.
        launcher
            .terminate(WorkerId(2), "pid:4".into())
            .await
            .unwrap();
        assert_eq!(terminates.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn no_capacity_is_a_capacity_error_after_the_retries() {
        let (url, _, runs) = fake_ec2(0).await;
        let launcher = launcher(&url).await;
        let spec = LaunchSpec {
            worker: WorkerId(3),
            parent: 1,
            endpoints: vec!["http://127.0.0.1:7101".into()],
            idle_timeout: Duration::from_secs(60),
            orphan_timeout: Duration::from_secs(30),
            threads: 1,
        };
        match launcher.launch(spec).await {
            Err(LaunchError::Capacity(m)) => {
                assert!(m.contains("InsufficientInstanceCapacity"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(runs.load(Ordering::SeqCst), 5, "the SDK's five attempts");
    }
}
