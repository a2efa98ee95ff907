//! Checking the flags together and resolving them into a [`NodeConfig`]: the rules that
//! span more than one flag, and the floors some limits are raised to.

use super::{
    Batching, ConfigError, Credentials, HttpLimits, LauncherKind, Limits, NodeArgs, NodeConfig,
    Scaling, Storage, Timing,
};

/// Largest `--max-batch-bytes`: a batch is one log entry, forwarded to the leader and
/// replicated in one message each, under the peer routes' body limit (64 MiB).
const MAX_BATCH_BYTES: u64 = 48 << 20;

impl NodeArgs {
    /// Checks the flags together and resolves them.
    pub fn into_config(self) -> Result<NodeConfig, ConfigError> {
        let bad = |why| Err(ConfigError::Invalid(why));
        let peers = self.peers.unwrap_or_default();
        if self.join.is_none() && !peers.0.iter().any(|(id, _)| *id == self.id) {
            return Err(ConfigError::NotAPeer(self.id));
        }
        if self.join.is_some() && self.launcher == LauncherKind::Ec2 && self.advertise.is_none() {
            return Err(ConfigError::JoinEc2);
        }
        if let Some(addr) = &self.advertise {
            if super::Peers::check_member(self.id, addr).is_err() {
                return bad("--advertise must be HOST:PORT");
            }
        }
        let tls = match (self.tls_cert, self.tls_key, self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(hashq_tls::NodeTls { cert, key, ca }),
            (None, None, None) => None,
            _ => return bad("--tls-cert, --tls-key and --tls-ca go together"),
        };
        if let Some(join) = &self.join {
            if tls.is_some() != join.starts_with("https://") {
                return bad("--join must be an https:// URL with TLS, and an http:// one without");
            }
        }
        if self.max_body_bytes == 0 || self.max_iterations == 0 || self.max_top == 0 {
            return bad("--max-body-bytes, --max-iterations and --max-top must be positive");
        }
        if !(1..=hashq_raft::types::PayloadRef::MAX_PARTS).contains(&self.max_batch_items) {
            return bad("--max-batch-items must be 1 to 65536");
        }
        if !(1..=MAX_BATCH_BYTES).contains(&self.max_batch_bytes) {
            return bad("--max-batch-bytes must be positive and at most 48MiB");
        }
        let supported = hashq_raft::version::SUPPORTED;
        if !(hashq_raft::version::BASE..=supported).contains(&self.cluster_version_max) {
            return bad(if self.cluster_version_max > supported {
                "--cluster-version-max is beyond what this build runs"
            } else {
                "--cluster-version-max must be at least 1"
            });
        }
        if self.max_attempts == 0 {
            return bad("--max-attempts must be at least 1");
        }
        if self.snapshot_every < 10 {
            return bad("--snapshot-every must be at least 10");
        }
        if self.worker_threads == 0 {
            return bad("--worker-threads must be at least 1");
        }
        let worker_binary = match self.worker_binary {
            Some(b) => b,
            None => std::env::current_exe().map_err(ConfigError::CurrentExe)?,
        };
        let timing = Timing {
            raft_heartbeat: self.raft_heartbeat,
            election_timeout: self.election_timeout,
            lease: self.lease,
            worker_heartbeat: self.lease / 3,
            worker_lost_after: self.worker_lost_after,
            launch_timeout: self.launch_timeout,
            pulled_retention: self.pulled_retention,
            idempotency_retention: self.idempotency_retention,
            request_timeout: self.request_timeout,
            reconcile_period: self.reconcile_every,
            ..Timing::default()
        };
        timing.validate()?;
        let credentials = Credentials::check(
            self.cluster_token,
            self.worker_token,
            self.admin_token,
            self.client_token,
            self.insecure,
        )?;
        if self.launcher == LauncherKind::Ec2 {
            if !cfg!(feature = "ec2") {
                return Err(ConfigError::NoEc2Build);
            }
            self.ec2
                .validate(&self.cluster_name, credentials.worker.is_some())?;
        }
        Ok(NodeConfig {
            id: self.id,
            listen: self.listen,
            client_listen: self.client_listen,
            peers,
            join: self.join,
            advertise: self.advertise,
            outbound_addr: self.outbound_addr,
            data_dir: self.data_dir,
            credentials,
            tls,
            cluster_name: self.cluster_name,
            role: self.role,
            cluster_version_max: self.cluster_version_max,
            launcher: self.launcher,
            scaling: Scaling {
                scale_up_wait: self.scale_up_wait,
                drain_target: self.drain_target,
                scale_up_interval: self.scale_up_interval,
                worker_idle_timeout: self.worker_idle_timeout,
                worker_orphan_timeout: self.worker_orphan_timeout,
                worker_threads: self.worker_threads,
                max_workers: self.max_workers,
                ..Scaling::default()
            },
            worker_binary,
            ec2: self.ec2,
            limits: Limits {
                max_body_bytes: self.max_body_bytes,
                max_batch_items: self.max_batch_items,
                max_batch_bytes: self.max_batch_bytes as usize,
                max_iterations: self.max_iterations,
                max_top: self.max_top,
                max_wait: self.max_wait,
                max_backlog: self.max_backlog,
                max_backlog_bytes: self.max_backlog_bytes,
                max_attempts: self.max_attempts,
                max_connections: self.max_connections.max(1),
                max_worker_requests: self.max_worker_requests.max(1),
                max_peer_requests: self.max_peer_requests.max(1),
                dead_retention: self.dead_retention,
                completed_retention: self.completed_retention,
                disk_free_limit: self.disk_free_limit,
                ..Limits::default()
            },
            clock_offset_file: self.clock_offset_file,
            http: HttpLimits {
                header_timeout: self.header_timeout,
                body_min_rate: self.body_min_rate,
                max_open_connections: self.max_open_connections.max(16),
                max_body_bytes_in_flight: usize::try_from(self.max_body_bytes_in_flight)
                    .unwrap_or(usize::MAX)
                    .max(self.max_body_bytes)
                    .max(self.max_batch_bytes as usize),
                queue_timeout: self.queue_timeout,
                ..HttpLimits::default()
            },
            timing,
            storage: Storage {
                snapshot_every: self.snapshot_every,
                cache_bytes: self.cache_mb.max(8) << 20,
                log_segment_bytes: self.log_segment_bytes.max(64 * 1024),
            },
            batching: Batching {
                in_flight: self.proposals_in_flight.max(1),
                ..Batching::default()
            },
        })
    }
}
