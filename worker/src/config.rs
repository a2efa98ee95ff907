//! The worker's knobs, with their defaults and the rules that relate them.

use std::time::Duration;

use hashq_proto::{NodeId, WorkerId};
use reqwest::header::HeaderValue;

use crate::client::normalize_endpoint;

/// How much longer than the long-poll a request may take: the node answers a long-poll only
/// after `lease_wait` and then still has to commit the (empty or not) grant through Raft.
pub const MIN_REQUEST_MARGIN: Duration = Duration::from_secs(1);

/// Upper bound on `threads + prefetch`: a guard against a typo that would lease the whole
/// queue into one process.
pub const MAX_CAPACITY: usize = 4096;

/// Most items the adaptive prefetch adds beyond `threads + prefetch` (see
/// [`WorkerConfig::prefetch_window`]).
pub const MAX_ADAPTIVE_PREFETCH: usize = 256;

/// How a worker tells that its parent endpoint is alive (README, "Workers and the budget").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ParentCheck {
    /// The parent node's `/health` answers (workers on the nodes' own machines).
    #[default]
    Health,
    /// The parent's EC2 instance runs (`DescribeInstanceStatus`); see [`crate::ec2`].
    Ec2(Ec2Parent),
}

/// Where a worker on EC2 finds its parent's instance and its cluster's endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ec2Parent {
    /// The AWS region (default: the SDK's chain).
    pub region: Option<String>,
    /// An EC2-compatible API endpoint (an emulator); default: AWS.
    pub endpoint_url: Option<String>,
    /// The instance of the node that launched the worker.
    pub parent_instance: String,
    /// The `hashq:cluster` tag of the cluster's instances.
    pub cluster: String,
}

/// Everything a worker needs to know before it meets the cluster. The cluster tells it the
/// rest (lease length, heartbeat period, the full endpoint list) when it registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Base URLs of endpoints to start from, e.g. `http://127.0.0.1:7101`. A bare
    /// `host:port` means `http://host:port`; a TLS cluster's are `https://`.
    pub endpoints: Vec<String>,
    /// The cluster CA (PEM) to verify `https` endpoints with, and the only issuer trusted.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Sent as `Authorization: Bearer <token>` on every worker route.
    pub worker_token: Option<String>,
    /// The budget slot the launcher reserved (`--worker-id`); `None` for a worker started by
    /// hand, which holds no slot.
    pub slot: Option<WorkerId>,
    /// The node that launched this worker; `None` lets the answering node adopt it.
    pub parent: Option<NodeId>,
    /// The launcher's handle of this process: `pid:<n>` locally, the instance id on EC2.
    pub handle: String,
    /// Exit (releasing the slot) after holding no item for this long.
    pub idle_timeout: Duration,
    /// Items hashed at once, each on its own blocking thread.
    pub threads: usize,
    /// Items leased beyond `threads`, so the next item is already here when one finishes.
    pub prefetch: u32,
    /// Lease ahead about this much work, judged by how long recent items took: quick items
    /// come many per lease (one Raft write), slow ones one at a time. Zero turns it off; at
    /// most [`MAX_ADAPTIVE_PREFETCH`] items are added.
    pub prefetch_window: Duration,
    /// How long a lease request may wait on the node for work to arrive (long-poll).
    pub lease_wait: Duration,
    /// Timeout of one HTTP request; must exceed `lease_wait` by [`MIN_REQUEST_MARGIN`].
    pub request_timeout: Duration,
    /// Exit when no endpoint of the cluster has answered for this long.
    pub no_endpoint_exit_after: Duration,
    /// How the parent is checked.
    pub parent_check: ParentCheck,
    /// How often the parent is checked.
    pub parent_check_every: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            endpoints: Vec::new(),
            tls_ca: None,
            worker_token: None,
            slot: None,
            parent: None,
            handle: format!("pid:{}", std::process::id()),
            idle_timeout: Duration::from_secs(60),
            threads: 1,
            prefetch: 1,
            prefetch_window: Duration::from_millis(50),
            lease_wait: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            no_endpoint_exit_after: Duration::from_secs(30),
            parent_check: ParentCheck::Health,
            parent_check_every: Duration::from_secs(2),
        }
    }
}

/// Why an EC2 parent check is refused by a build without the `ec2` feature.
pub const NO_EC2: &str = "parent_check: this hashq was built without EC2 support; build one \
                          with `cargo build --release --features ec2`";

impl WorkerConfig {
    /// Checks every field and the rules between them; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("endpoints: at least one endpoint URL is needed".into());
        }
        for endpoint in &self.endpoints {
            let url = normalize_endpoint(endpoint).map_err(|e| format!("endpoints: {e}"))?;
            if url.starts_with("https://") != self.tls_ca.is_some() {
                return Err(format!(
                    "endpoints: {url}: https:// endpoints go with a cluster CA (--tls-ca), http:// ones without"
                ));
            }
        }
        if let Some(token) = &self.worker_token {
            if token.is_empty() {
                return Err("worker_token: must not be empty when set".into());
            }
            HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| "worker_token: must be visible ASCII".to_string())?;
        }
        if self.handle.is_empty() {
            return Err("handle: must not be empty".into());
        }
        if self.threads == 0 {
            return Err("threads: must be at least 1".into());
        }
        if self.capacity() > MAX_CAPACITY {
            return Err(format!(
                "threads + prefetch: {} exceeds {MAX_CAPACITY}",
                self.capacity()
            ));
        }
        for (name, value) in [
            ("idle_timeout", self.idle_timeout),
            ("request_timeout", self.request_timeout),
            ("no_endpoint_exit_after", self.no_endpoint_exit_after),
        ] {
            if value.is_zero() {
                return Err(format!("{name}: must be positive"));
            }
        }
        if self.prefetch_window > Duration::from_secs(10) {
            return Err(
                "prefetch_window: at most 10s (items wait that long before hashing)".into(),
            );
        }
        if self.parent_check_every < Duration::from_millis(100) {
            return Err("parent_check_every: must be at least 100ms".into());
        }
        if let ParentCheck::Ec2(ec2) = &self.parent_check {
            if !cfg!(feature = "ec2") {
                return Err(NO_EC2.into());
            }
            if ec2.parent_instance.is_empty() || ec2.cluster.is_empty() {
                return Err(
                    "parent_check: the EC2 check needs the parent instance and the cluster name"
                        .into(),
                );
            }
        }
        if self.request_timeout < self.lease_wait + MIN_REQUEST_MARGIN {
            return Err(format!(
                "request_timeout ({:?}) must exceed lease_wait ({:?}) by at least {:?}",
                self.request_timeout, self.lease_wait, MIN_REQUEST_MARGIN
            ));
        }
        Ok(())
    }

    /// How many unfinished items the worker holds at most: one per thread plus the prefetch.
    pub fn capacity(&self) -> usize {
        self.threads.saturating_add(self.prefetch as usize)
    }

    /// How many unfinished items to hold now: [`Self::capacity`], plus enough items for
    /// `prefetch_window` of work at `item_time` per item (unknown before the first one).
    pub fn adaptive_capacity(&self, item_time: Option<Duration>) -> usize {
        let extra = match item_time {
            Some(t) if !self.prefetch_window.is_zero() => {
                let per_thread = self.prefetch_window.as_nanos() / t.as_nanos().max(1);
                usize::try_from(per_thread.saturating_mul(self.threads as u128))
                    .unwrap_or(usize::MAX)
                    .min(MAX_ADAPTIVE_PREFETCH)
            }
            _ => 0,
        };
        self.capacity().saturating_add(extra).min(MAX_CAPACITY)
    }

    /// How many iterations the prefetch beyond [`Self::capacity`] may take in one lease:
    /// `prefetch_window` of work on every thread, at `picos_per_iteration` (no limit before
    /// anything was measured, when nothing beyond the capacity is asked for anyway).
    pub fn iteration_budget(&self, picos_per_iteration: Option<u64>) -> u64 {
        match picos_per_iteration {
            Some(p) => {
                let window_picos = self.prefetch_window.as_nanos().saturating_mul(1000);
                let per_thread = window_picos / u128::from(p.max(1));
                u64::try_from(per_thread.saturating_mul(self.threads as u128)).unwrap_or(u64::MAX)
            }
            None => u64::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> WorkerConfig {
        WorkerConfig {
            endpoints: vec!["http://127.0.0.1:7101".into()],
            ..WorkerConfig::default()
        }
    }

    #[test]
    fn defaults_are_valid_once_an_endpoint_is_given() {
        assert_eq!(valid().validate(), Ok(()));
        let d = WorkerConfig::default();
        assert_eq!(d.threads, 1);
        assert_eq!(d.prefetch, 1);
        assert_eq!(d.capacity(), 2);
        assert_eq!(d.handle, format!("pid:{}", std::process::id()));
        assert_eq!(d.idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn https_endpoints_go_with_a_cluster_ca_and_http_ones_without() {
        let tls = |endpoint: &str, ca: Option<&str>| WorkerConfig {
            endpoints: vec![endpoint.into()],
            tls_ca: ca.map(Into::into),
            ..valid()
        };
        assert_eq!(
            tls("https://10.0.0.1:7101", Some("/ca.pem")).validate(),
            Ok(())
        );
        for refused in [
            tls("https://10.0.0.1:7101", None),
            tls("http://10.0.0.1:7101", Some("/ca.pem")),
            tls("10.0.0.1:7101", Some("/ca.pem")),
        ] {
            let e = refused.validate().unwrap_err();
            assert!(e.contains("--tls-ca"), "{e}");
        }
    }

    #[test]
    fn quick_items_are_leased_many_at_a_time_slow_ones_one_by_one() {
        let c = WorkerConfig {
            threads: 2,
            ..valid()
        };
        // Nothing measured yet: just the threads and the fixed prefetch.
        assert_eq!(c.adaptive_capacity(None), 3);
        // 50 ms of 10 ms items on two threads: ten more.
        assert_eq!(c.adaptive_capacity(Some(Duration::from_millis(10))), 13);
        // Items slower than the window add nothing.
        assert_eq!(c.adaptive_capacity(Some(Duration::from_secs(1))), 3);
        // Tiny items are capped.
        assert_eq!(
            c.adaptive_capacity(Some(Duration::from_nanos(1))),
            3 + MAX_ADAPTIVE_PREFETCH
        );
        assert_eq!(
            c.adaptive_capacity(Some(Duration::ZERO)),
            3 + MAX_ADAPTIVE_PREFETCH
        );
        // Turned off.
        let off = WorkerConfig {
            prefetch_window: Duration::ZERO,
            ..c.clone()
        };
        assert_eq!(off.adaptive_capacity(Some(Duration::from_nanos(1))), 3);
        // 50 ms on two threads at 500 ns per iteration: 200 000 iterations.
        assert_eq!(c.iteration_budget(Some(500_000)), 200_000);
        assert_eq!(c.iteration_budget(None), u64::MAX);
    }

    #[test]
    fn each_rule_names_its_field() {
        type Breaker = fn(&mut WorkerConfig);
        let cases: [(&str, Breaker); 14] = [
            ("endpoints", |c| c.endpoints.clear()),
            ("prefetch_window", |c| {
                c.prefetch_window = Duration::from_secs(11)
            }),
            ("endpoints", |c| c.endpoints.push("ftp://example".into())),
            ("worker_token", |c| c.worker_token = Some(String::new())),
            ("worker_token", |c| c.worker_token = Some("a\nb".into())),
            ("handle", |c| c.handle.clear()),
            ("threads", |c| c.threads = 0),
            ("prefetch", |c| c.prefetch = u32::MAX),
            ("idle_timeout", |c| c.idle_timeout = Duration::ZERO),
            ("no_endpoint_exit_after", |c| {
                c.no_endpoint_exit_after = Duration::ZERO
            }),
            ("request_timeout", |c| c.request_timeout = Duration::ZERO),
            ("parent_check_every", |c| {
                c.parent_check_every = Duration::ZERO
            }),
            ("parent_check", |c| {
                c.parent_check = ParentCheck::Ec2(Ec2Parent {
                    region: None,
                    endpoint_url: None,
                    parent_instance: String::new(),
                    cluster: "hashq".into(),
                })
            }),
            ("request_timeout", |c| {
                c.request_timeout = c.lease_wait + Duration::from_millis(500)
            }),
        ];
        for (field, break_it) in cases {
            let mut config = valid();
            break_it(&mut config);
            let err = config.validate().expect_err(field);
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn an_ec2_parent_check_needs_a_build_with_the_ec2_feature() {
        let config = WorkerConfig {
            parent_check: ParentCheck::Ec2(Ec2Parent {
                region: None,
                endpoint_url: None,
                parent_instance: "i-0123456789abcdef0".into(),
                cluster: "hashq".into(),
            }),
            ..valid()
        };
        let checked = config.validate();
        if cfg!(feature = "ec2") {
            checked.expect("a build with EC2 support takes an EC2 parent check");
        } else {
            assert_eq!(checked, Err(NO_EC2.to_string()));
        }
    }

    #[test]
    fn bare_host_port_and_a_token_are_accepted() {
        let config = WorkerConfig {
            endpoints: vec!["127.0.0.1:7101".into(), "http://10.0.0.2:7101/".into()],
            worker_token: Some("s3cret-token".into()),
            request_timeout: Duration::from_secs(6),
            ..WorkerConfig::default()
        };
        assert_eq!(config.validate(), Ok(()));
    }
}
