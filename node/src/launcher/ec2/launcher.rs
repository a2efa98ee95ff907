//! The EC2 launcher proper: [`Ec2Launcher`] starts worker instances (`RunInstances`),
//! terminates them, and reconciles them with the worker table (see [`super::reconcile`]);
//! AWS errors become [`LaunchError`]s here, capacity and limit codes as `Capacity`.

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_ec2::types::{
    HttpTokensState, IamInstanceProfileSpecification, InstanceMetadataOptionsRequest, InstanceType,
    ResourceType, ShutdownBehavior, Tag, TagSpecification,
};
use base64::Engine as _;
use futures::future::BoxFuture;
use hashq_aws::{is_instance_id, Patience};
use hashq_proto::ec2::{
    ROLE_WORKER, TAG_CLUSTER, TAG_PARENT, TAG_PARENT_NODE, TAG_ROLE, TAG_WORKER_ID,
};
use hashq_proto::routes::internal::BINARY;
use hashq_raft::WorkerId;

use super::reconcile::{plan, worker_instances, ABSENT_GRACE};
use super::user_data::{worker_user_data, WorkerBoot};
use super::Ec2Error;
use crate::config::is_plain_word;
use crate::config::Ec2Args;
use crate::launcher::{LaunchError, LaunchSpec, Launcher, WorkerTable};

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

/// Longest error message kept from AWS (authorization failures carry long encoded blobs).
const MESSAGE_LIMIT: usize = 300;

/// Starts and stops worker instances for one node.
pub struct Ec2Launcher {
    client: aws_sdk_ec2::Client,
    args: Ec2Args,
    cluster: String,
    token: String,
    /// This node's URL (`http(s)://addr`): workers fetch the binary here first.
    node_url: Option<String>,
    /// The cluster CA (PEM) of a TLS cluster, for the workers' user data.
    ca_pem: Option<String>,
    /// This node's own instance id: the workers' `hashq:parent`.
    instance_id: String,
    /// The region and endpoint the SDK resolved: the workers use the same.
    region: String,
    endpoint_url: Option<String>,
}

impl Ec2Launcher {
    /// Builds the EC2 client and learns this node's instance id (flag, else IMDS). `args` are
    /// the flags as [`Ec2Args::validate`] accepted them; workers of `cluster` get
    /// `worker_token` (the worker credential only: it opens the worker routes and the binary
    /// download, never Raft) and fetch the binary from `node_url` first.
    pub async fn new(
        args: &Ec2Args,
        cluster: &str,
        worker_token: Option<&str>,
        node_url: Option<String>,
        ca_pem: Option<String>,
    ) -> Result<Self, Ec2Error> {
        let args = args.clone();
        let token = worker_token
            .map(str::to_owned)
            .ok_or_else(|| Ec2Error::Config("--worker-token is required".into()))?;
        let sdk = hashq_aws::sdk_config(
            args.region.as_deref(),
            args.endpoint_url.as_deref(),
            Patience::LAUNCHER,
        )
        .await;
        let region = sdk.region().ok_or(Ec2Error::NoRegion)?.to_string();
        if !is_plain_word(&region) {
            return Err(Ec2Error::Config(format!(
                "region `{region}` is not a region name"
            )));
        }
        let endpoint_url = sdk.endpoint_url().map(str::to_string);
        let instance_id = match &args.instance_id {
            Some(id) => id.clone(),
            None => hashq_aws::own_instance_id()
                .await
                .map_err(Ec2Error::InstanceId)?,
        };
        tracing::info!(
            %region,
            endpoint = endpoint_url.as_deref().unwrap_or("aws"),
            instance = %instance_id,
            "ec2 launcher ready"
        );
        Ok(Ec2Launcher {
            client: aws_sdk_ec2::Client::new(&sdk),
            node_url,
            ca_pem,
            cluster: cluster.to_owned(),
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
            .map(|u| format!("{}{BINARY}", u.trim_end_matches('/')))
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
            ca_pem: self.ca_pem.as_deref(),
            endpoint_url: self.endpoint_url.as_deref(),
        })?;
        let tags = vec![
            Self::tag(
                "Name",
                format!("hashq-{}-worker-{}", self.cluster, spec.worker.0),
            ),
            Self::tag(TAG_CLUSTER, &self.cluster),
            Self::tag(TAG_ROLE, ROLE_WORKER),
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
            let seen = worker_instances(&self.client, &self.cluster).await?;
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

/// An AWS error as a [`LaunchError`]: capacity and limit codes become `Capacity`; the
/// message names the operation and the code, and is cut short (never a request body).
pub(super) fn launch_error<E, R>(
    operation: &str,
    e: &aws_sdk_ec2::error::SdkError<E, R>,
) -> LaunchError
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use aws_sdk_ec2::config::Credentials;
    use axum::http::StatusCode;

    use super::*;
    use crate::config::ec2_test_args as args;

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
        let patience = Patience {
            initial_backoff: Duration::from_millis(1),
            ..Patience::LAUNCHER
        };
        let sdk = hashq_aws::sdk_config(Some("us-east-1"), Some(url), patience).await;
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
            ca_pem: None,
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
