//! The node's configuration: command-line flags (each also read from an `HASHQ_*` variable),
//! and the timing and limits derived from them, validated together.
//!
//! Every tunable has its default written once, in the `Default` of its group ([`Timing`],
//! [`Limits`], [`Scaling`], [`HttpLimits`], [`Storage`], [`Batching`]); the flags take their
//! defaults from there, and the constants the background loops use live there too.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use hashq_raft::NodeId;

mod ec2;
mod resolve;

pub use crate::http::HttpLimits;
#[cfg(feature = "ec2")]
pub(crate) use ec2::is_plain_word;
#[cfg(all(test, feature = "ec2"))]
pub(crate) use ec2::tests::args as ec2_test_args;
pub use ec2::Ec2Args;

/// Why a node's flags were refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--id {0} is not one of --peers")]
    NotAPeer(NodeId),
    #[error("--launcher ec2 with --join needs --advertise HOST:PORT (the address its workers reach it at)")]
    JoinEc2,
    /// A flag outside its range, or two flags that do not fit together.
    #[error("{0}")]
    Invalid(&'static str),
    #[error("{flag} is required; pass --insecure to run without credentials on a trusted network")]
    MissingCredential { flag: &'static str },
    #[error("{flag} must be at least {MIN_TOKEN_LEN} visible ASCII characters")]
    WeakCredential { flag: &'static str },
    #[error("{0} and {1} must differ: one credential per audience")]
    SharedCredential(&'static str, &'static str),
    #[error("cannot find this binary: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// `--launcher ec2` on a build without the EC2 launcher.
    #[error("--launcher ec2: this hashq was built without the EC2 launcher; build one with `cargo build --release --features ec2` (scripts/deploy-ec2.sh does)")]
    NoEc2Build,
    /// A flag `--launcher ec2` needs is missing or malformed.
    #[error("--launcher ec2: {0}")]
    Ec2(&'static str),
}

/// Why a `--peers` list was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeersError {
    #[error("peer `{0}` is not id=host:port")]
    NotIdAddr(String),
    #[error("peer id `{0}` is not a positive integer")]
    BadId(String),
    #[error("peer ids start at 1")]
    ZeroId,
    #[error("peer address `{0}` is not host:port")]
    BadAddr(String),
    #[error("peer id {0} appears twice")]
    Duplicate(NodeId),
    #[error("no peers given")]
    Empty,
}

/// A timing setting in the whole milliseconds that openraft's config and the worker wire
/// protocol take. Never 0: a sub-millisecond period rounds up to 1 ms, because a zero
/// heartbeat or election timeout is refused by openraft and a zero lease or heartbeat would
/// make a worker spin. At overflow (a duration beyond `u64::MAX` ms, some 584 million years)
/// it saturates at `u64::MAX` instead of wrapping to a short period.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// What a node is for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A voter that serves the client and worker APIs.
    Endpoint,
    /// A voter that serves no client or worker API: it only keeps a majority alive.
    Witness,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Endpoint => "endpoint",
            Role::Witness => "witness",
        }
    }
}

/// How the cluster starts workers.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LauncherKind {
    /// Worker processes on this machine.
    Local,
    /// EC2 instances.
    Ec2,
    /// None: workers are started by hand.
    None,
}

/// Log line format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The voters of the cluster: `1=127.0.0.1:7101,2=127.0.0.1:7102,...`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peers(pub Vec<(NodeId, String)>);

impl Peers {
    /// Checks one member by the rules of an entry of `--peers` (`hashq cluster add`,
    /// `--advertise`).
    pub fn check_member(id: NodeId, addr: &str) -> Result<(), PeersError> {
        format!("{id}={addr}").parse::<Peers>().map(drop)
    }
}

impl FromStr for Peers {
    type Err = PeersError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut peers = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, addr) = part
                .split_once('=')
                .ok_or_else(|| PeersError::NotIdAddr(part.into()))?;
            let id: NodeId = id
                .trim()
                .parse()
                .map_err(|_| PeersError::BadId(id.into()))?;
            let addr = addr.trim();
            if id == 0 {
                return Err(PeersError::ZeroId);
            }
            if addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(PeersError::BadAddr(addr.into()));
            }
            if peers.iter().any(|(other, _)| *other == id) {
                return Err(PeersError::Duplicate(id));
            }
            peers.push((id, addr.to_string()));
        }
        if peers.is_empty() {
            return Err(PeersError::Empty);
        }
        peers.sort();
        Ok(Peers(peers))
    }
}

pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))
}

/// A duration as the flags write it (`30s`, `10m`, `7days`): how a default shows in `--help`.
fn show_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A size as the flags write it (`64KiB`, `4GiB`): how a default shows in `--help`.
fn show_bytes(bytes: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

/// A size in bytes: a plain number, or with a unit (`64KiB`, `4GiB`, `1MB`).
pub(crate) fn byte_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("`{s}` is not a size: {e}"))
}

/// `hashq node` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct NodeArgs {
    /// This node's Raft id: one of the ids in --peers.
    #[arg(long, env = "HASHQ_ID")]
    pub id: NodeId,
    /// Address to bind the HTTP server (client API, worker API, Raft RPC).
    #[arg(long, env = "HASHQ_LISTEN", default_value = "127.0.0.1:7101")]
    pub listen: SocketAddr,
    /// An extra address that serves the client API only (no Raft, worker, admin or internal
    /// route), so a firewall can open it to clients and keep --listen inside the cluster.
    #[arg(long, env = "HASHQ_CLIENT_LISTEN")]
    pub client_listen: Option<SocketAddr>,
    /// Every founding voter as id=host:port, comma-separated: the addresses peers and
    /// workers use. A node that joins an existing cluster gives --join instead.
    #[arg(
        long,
        env = "HASHQ_PEERS",
        required_unless_present = "join",
        conflicts_with = "join"
    )]
    pub peers: Option<Peers>,
    /// Join the existing cluster at this URL (any member) instead of forming one: the node
    /// starts empty and waits until an operator adds it (`hashq cluster add --id ID --addr
    /// HOST:PORT`), which brings it up to date as a learner before it votes.
    #[arg(long, env = "HASHQ_JOIN", value_parser = join_url)]
    pub join: Option<String>,
    /// HOST:PORT that peers and workers reach this node at, for a node that joins (with
    /// --peers it is this node's entry there). `--launcher ec2` needs it: workers on other
    /// machines are told this address.
    #[arg(long, env = "HASHQ_ADVERTISE", requires = "join")]
    pub advertise: Option<String>,
    /// Source address for this node's connections to its peers (a multi-homed host; the
    /// chaos tests use it to tell nodes apart).
    #[arg(long, env = "HASHQ_OUTBOUND_ADDR")]
    pub outbound_addr: Option<std::net::IpAddr>,
    /// Where this node keeps its Raft log, state machine and snapshots.
    #[arg(long, env = "HASHQ_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The peer credential: guards Raft RPC and node-to-node routes. Only nodes hold it.
    #[arg(long, env = "HASHQ_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,
    /// The worker credential: guards the worker routes and the binary download. Workers (and
    /// EC2 worker instances' user data) hold this one, never the peer credential.
    #[arg(long, env = "HASHQ_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    /// The admin credential: guards the admin routes (`hashq cluster set-max-workers`,
    /// `hashq cluster workers`). Without it they are refused.
    #[arg(long, env = "HASHQ_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Optional client credential: guards the client API and then also /status, /metrics
    /// and the dashboard's data.
    #[arg(long, env = "HASHQ_CLIENT_TOKEN", hide_env_values = true)]
    pub client_token: Option<String>,
    /// Run without the peer and worker credentials: every route they guard is open to anyone
    /// who can reach the port. Only for a trusted, private network.
    #[arg(long, env = "HASHQ_INSECURE")]
    pub insecure: bool,
    /// This node's TLS certificate chain (PEM). With --tls-key and --tls-ca, every listener
    /// speaks TLS only, and this node presents the certificate to its peers.
    #[arg(long, env = "HASHQ_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "HASHQ_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): the only issuer this node trusts, for its peers' certificates
    /// (a peer must present one as well as the cluster token) and when it calls them.
    #[arg(long, env = "HASHQ_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// The cluster's name (EC2 tag `hashq:cluster`); workers never mix clusters.
    #[arg(long, env = "HASHQ_CLUSTER_NAME", default_value = "hashq")]
    pub cluster_name: String,
    #[arg(long, env = "HASHQ_ROLE", value_enum, default_value = "endpoint")]
    pub role: Role,
    /// The latest cluster version this node offers (default: the latest its build runs).
    /// The cluster moves to a version once every member offers it, and never back: pin it
    /// lower while an upgrade may still be rolled back to the previous build.
    #[arg(long, env = "HASHQ_CLUSTER_VERSION_MAX", default_value_t = hashq_raft::version::SUPPORTED)]
    pub cluster_version_max: u32,
    /// How this node starts workers when the autoscaler asks it to.
    #[arg(long, env = "HASHQ_LAUNCHER", value_enum, default_value = "local")]
    pub launcher: LauncherKind,
    /// The cluster-wide worker budget, set when the cluster is first bootstrapped (change it
    /// later with `hashq cluster set-max-workers`).
    #[arg(long, env = "HASHQ_MAX_WORKERS", default_value_t = Scaling::default().max_workers)]
    pub max_workers: u32,
    /// Scale up when the oldest queued item has waited this long.
    #[arg(long, env = "HASHQ_SCALE_UP_WAIT", default_value = show_duration(Scaling::default().scale_up_wait), value_parser = duration)]
    pub scale_up_wait: Duration,
    /// ...or when the backlog would take longer than this to drain at the measured rate.
    #[arg(long, env = "HASHQ_DRAIN_TARGET", default_value = show_duration(Scaling::default().drain_target), value_parser = duration)]
    pub drain_target: Duration,
    /// At most one launch per this interval, cluster-wide.
    #[arg(long, env = "HASHQ_SCALE_UP_INTERVAL", default_value = show_duration(Scaling::default().scale_up_interval), value_parser = duration)]
    pub scale_up_interval: Duration,
    /// Launched workers exit after this long without work, freeing their slot.
    #[arg(long, env = "HASHQ_WORKER_IDLE_TIMEOUT", default_value = show_duration(Scaling::default().worker_idle_timeout), value_parser = duration)]
    pub worker_idle_timeout: Duration,
    /// Launched workers exit when no endpoint of the cluster has answered for this long.
    #[arg(long, env = "HASHQ_WORKER_ORPHAN_TIMEOUT", default_value = show_duration(Scaling::default().worker_orphan_timeout), value_parser = duration)]
    pub worker_orphan_timeout: Duration,
    /// Hashing threads per launched worker.
    #[arg(long, env = "HASHQ_WORKER_THREADS", default_value_t = Scaling::default().worker_threads)]
    pub worker_threads: usize,
    /// The `hashq` binary launched workers run (default: this node's own binary).
    #[arg(long, env = "HASHQ_WORKER_BINARY")]
    pub worker_binary: Option<PathBuf>,
    /// How often the leader compares the worker table with what the launcher's provider runs
    /// (EC2: terminates strays, frees the slots of vanished instances).
    #[arg(long, env = "HASHQ_RECONCILE_EVERY", default_value = show_duration(Timing::default().reconcile_period), value_parser = duration)]
    pub reconcile_every: Duration,
    #[command(flatten)]
    pub ec2: Ec2Args,

    /// Largest request body, in bytes (413 above).
    #[arg(long, env = "HASHQ_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Most items one `POST /enqueue/batch` holds (at most 65,536).
    #[arg(long, env = "HASHQ_MAX_BATCH_ITEMS", default_value_t = Limits::default().max_batch_items)]
    pub max_batch_items: usize,
    /// Most payload bytes one `POST /enqueue/batch` holds, all parts together (at most
    /// 48 MiB, so that a leader can forward it and replicate it in one message). Accepts
    /// KiB, MiB.
    #[arg(long, env = "HASHQ_MAX_BATCH_BYTES", default_value = show_bytes(Limits::default().max_batch_bytes as u64), value_parser = byte_size)]
    pub max_batch_bytes: u64,
    /// Largest `iterations` accepted.
    #[arg(long, env = "HASHQ_MAX_ITERATIONS", default_value_t = Limits::default().max_iterations)]
    pub max_iterations: u32,
    /// Largest `top` accepted by pullCompleted.
    #[arg(long, env = "HASHQ_MAX_TOP", default_value_t = Limits::default().max_top)]
    pub max_top: u32,
    /// Longest long poll (`GET /work/{id}?wait=30s`); longer waits are cut to it. A waiting
    /// request holds one client slot and no CPU.
    #[arg(long, env = "HASHQ_MAX_WAIT", default_value = show_duration(Limits::default().max_wait), value_parser = duration)]
    pub max_wait: Duration,
    /// Items stored (queued, running, completed but not pulled, dead) beyond which enqueue
    /// answers 429; enforced at apply, so concurrent enqueues never overshoot.
    #[arg(long, env = "HASHQ_MAX_BACKLOG", default_value_t = Limits::default().max_backlog)]
    pub max_backlog: u64,
    /// Bytes stored (payloads of queued, running and dead items, plus 128 per unpulled
    /// result) beyond which enqueue answers 429; enforced at apply. Accepts KiB, MiB, GiB.
    #[arg(long, env = "HASHQ_MAX_BACKLOG_BYTES", default_value = show_bytes(Limits::default().max_backlog_bytes), value_parser = byte_size)]
    pub max_backlog_bytes: u64,
    /// Dead items (and their payloads) are dropped this long after they died.
    #[arg(long, env = "HASHQ_DEAD_RETENTION", default_value = show_duration(Limits::default().dead_retention), value_parser = duration)]
    pub dead_retention: Duration,
    /// Free space the data dir's file system must keep: below it the node raises the disk
    /// alarm and the cluster refuses enqueues until space returns.
    #[arg(long, env = "HASHQ_DISK_FREE_LIMIT", default_value = show_bytes(Limits::default().disk_free_limit), value_parser = byte_size)]
    pub disk_free_limit: u64,
    /// Tests only: shift this node's wall clock by the number of milliseconds in this file
    /// (re-read every 100 ms).
    #[arg(long, env = "HASHQ_CLOCK_OFFSET_FILE", hide = true)]
    pub clock_offset_file: Option<PathBuf>,
    /// Completed results nobody pulled are dropped this long after they completed.
    #[arg(long, env = "HASHQ_COMPLETED_RETENTION", default_value = show_duration(Limits::default().completed_retention), value_parser = duration)]
    pub completed_retention: Duration,
    /// Leases an item may lose before it is dead.
    #[arg(long, env = "HASHQ_MAX_ATTEMPTS", default_value_t = Limits::default().max_attempts)]
    pub max_attempts: u32,
    /// Client requests served at once; more wait up to --queue-timeout, then get 503.
    #[arg(long, env = "HASHQ_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    pub max_connections: usize,
    /// Worker requests served at once (their own slots: workers never wait behind clients).
    #[arg(long, env = "HASHQ_MAX_WORKER_REQUESTS", default_value_t = Limits::default().max_worker_requests)]
    pub max_worker_requests: usize,
    /// Raft and node-to-node requests served at once (their own slots: Raft never waits
    /// behind clients or workers).
    #[arg(long, env = "HASHQ_MAX_PEER_REQUESTS", default_value_t = Limits::default().max_peer_requests)]
    pub max_peer_requests: usize,
    /// Longest a request waits for a free slot of its kind before it gets 503.
    #[arg(long, env = "HASHQ_QUEUE_TIMEOUT", default_value = show_duration(HttpLimits::default().queue_timeout), value_parser = duration)]
    pub queue_timeout: Duration,
    /// Open connections per listener; more are closed at once.
    #[arg(long, env = "HASHQ_MAX_OPEN_CONNECTIONS", default_value_t = HttpLimits::default().max_open_connections)]
    pub max_open_connections: usize,
    /// Longest a connection may take to send a request's headers, and stay idle between
    /// requests.
    #[arg(long, env = "HASHQ_HEADER_TIMEOUT", default_value = show_duration(HttpLimits::default().header_timeout), value_parser = duration)]
    pub header_timeout: Duration,
    /// Bytes per second a request body must average (after a 2s grace), else 408.
    #[arg(long, env = "HASHQ_BODY_MIN_RATE", default_value = show_bytes(HttpLimits::default().body_min_rate), value_parser = byte_size)]
    pub body_min_rate: u64,
    /// Bytes of client and worker request bodies in flight at once; beyond, 503.
    #[arg(long, env = "HASHQ_MAX_BODY_BYTES_IN_FLIGHT", default_value = show_bytes(HttpLimits::default().max_body_bytes_in_flight as u64), value_parser = byte_size)]
    pub max_body_bytes_in_flight: u64,

    /// Raft heartbeat interval.
    #[arg(long, env = "HASHQ_RAFT_HEARTBEAT", default_value = show_duration(Timing::default().raft_heartbeat), value_parser = duration)]
    pub raft_heartbeat: Duration,
    /// Minimum election timeout (the maximum is twice this).
    #[arg(long, env = "HASHQ_ELECTION_TIMEOUT", default_value = show_duration(Timing::default().election_timeout), value_parser = duration)]
    pub election_timeout: Duration,
    /// Lease length granted to workers; they heartbeat every third of it.
    #[arg(long, env = "HASHQ_LEASE", default_value = show_duration(Timing::default().lease), value_parser = duration)]
    pub lease: Duration,
    /// A worker not heard from for this long is lost: leases reclaimed, slot freed.
    #[arg(long, env = "HASHQ_WORKER_LOST_AFTER", default_value = show_duration(Timing::default().worker_lost_after), value_parser = duration)]
    pub worker_lost_after: Duration,
    /// A reserved slot whose worker has not registered after this long is freed.
    #[arg(long, env = "HASHQ_LAUNCH_TIMEOUT", default_value = show_duration(Timing::default().launch_timeout), value_parser = duration)]
    pub launch_timeout: Duration,
    /// How long pulled items stay visible in GET /work/{id}.
    #[arg(long, env = "HASHQ_PULLED_RETENTION", default_value = show_duration(Timing::default().pulled_retention), value_parser = duration)]
    pub pulled_retention: Duration,
    /// How long an Idempotency-Key is remembered.
    #[arg(long, env = "HASHQ_IDEMPOTENCY_RETENTION", default_value = show_duration(Timing::default().idempotency_retention), value_parser = duration)]
    pub idempotency_retention: Duration,
    /// How long a request may take before it fails with 503 (includes waiting for a leader).
    #[arg(long, env = "HASHQ_REQUEST_TIMEOUT", default_value = show_duration(Timing::default().request_timeout), value_parser = duration)]
    pub request_timeout: Duration,
    /// Take a snapshot (and purge the log) every this many log entries.
    #[arg(long, env = "HASHQ_SNAPSHOT_EVERY", default_value_t = Storage::default().snapshot_every)]
    pub snapshot_every: u64,
    /// Batches of requests proposed at once (a tuning knob: fewer means bigger batches).
    #[arg(long, env = "HASHQ_PROPOSALS_IN_FLIGHT", default_value_t = Batching::default().in_flight)]
    pub proposals_in_flight: usize,
    /// The Raft log's segment files are this large (a new one starts beyond it; a whole
    /// segment is deleted once a snapshot covers it and no payload in it is still needed).
    #[arg(long, env = "HASHQ_LOG_SEGMENT_BYTES", default_value = show_bytes(Storage::default().log_segment_bytes), value_parser = byte_size)]
    pub log_segment_bytes: u64,
    /// sled page cache, in MiB: the bound on the state machine's memory (which holds items'
    /// metadata only; payloads stay in the log).
    #[arg(long, env = "HASHQ_CACHE_MB", default_value_t = Storage::default().cache_bytes >> 20)]
    pub cache_mb: u64,
    #[arg(long, env = "HASHQ_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Every timing constant of a node in one place.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    pub raft_heartbeat: Duration,
    pub election_timeout: Duration,
    pub lease: Duration,
    pub worker_heartbeat: Duration,
    pub worker_lost_after: Duration,
    pub launch_timeout: Duration,
    /// How often the leader looks for expired leases, lost workers and expired records.
    pub reaper_period: Duration,
    pub pulled_retention: Duration,
    pub idempotency_retention: Duration,
    /// How long a node remembers the keys it gives its own proposals, for safe retries.
    pub internal_key_ttl: Duration,
    pub request_timeout: Duration,
    /// Longest a lease request may wait for work.
    pub lease_wait_max: Duration,
    /// How often the leader reconciles the worker table with the launcher's provider.
    pub reconcile_period: Duration,
    /// How often a node probes its peers' health while all answer...
    pub peer_probe_every: Duration,
    /// ...and while one does not.
    pub peer_probe_eager: Duration,
    /// How often a node that is not yet part of a cluster probes its peers to form one.
    pub bootstrap_probe_every: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            raft_heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_millis(300),
            lease: Duration::from_secs(30),
            worker_heartbeat: Duration::from_secs(10),
            worker_lost_after: Duration::from_secs(30),
            launch_timeout: Duration::from_secs(120),
            reaper_period: Duration::from_millis(100),
            pulled_retention: Duration::from_secs(600),
            idempotency_retention: Duration::from_secs(600),
            internal_key_ttl: Duration::from_secs(120),
            request_timeout: Duration::from_secs(10),
            lease_wait_max: Duration::from_secs(20),
            reconcile_period: Duration::from_secs(15),
            peer_probe_every: Duration::from_secs(1),
            peer_probe_eager: Duration::from_millis(200),
            bootstrap_probe_every: Duration::from_millis(200),
        }
    }
}

impl Timing {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |why| Err(ConfigError::Invalid(why));
        if self.raft_heartbeat.is_zero() || self.raft_heartbeat * 3 > self.election_timeout {
            return bad(
                "--raft-heartbeat must be positive and at most a third of --election-timeout",
            );
        }
        if self.lease < Duration::from_millis(300) {
            return bad("--lease must be at least 300ms");
        }
        if self.worker_heartbeat * 2 > self.lease {
            return bad("worker heartbeats must fit twice in a lease");
        }
        if self.worker_lost_after < self.worker_heartbeat * 2 {
            return bad("--worker-lost-after must be at least two worker heartbeats");
        }
        if self.reconcile_period < Duration::from_millis(100) {
            return bad("--reconcile-every must be at least 100ms");
        }
        if self.request_timeout < self.election_timeout * 2 {
            return bad("--request-timeout must outlast an election (twice --election-timeout)");
        }
        Ok(())
    }
}

/// Request limits.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Most items, and payload bytes, of one batch enqueue.
    pub max_batch_items: usize,
    pub max_batch_bytes: usize,
    pub max_iterations: u32,
    pub max_top: u32,
    /// Longest long-poll (`wait=`) accepted.
    pub max_wait: Duration,
    pub max_backlog: u64,
    pub max_backlog_bytes: u64,
    pub max_attempts: u32,
    pub max_connections: usize,
    pub max_worker_requests: usize,
    pub max_peer_requests: usize,
    pub dead_retention: Duration,
    pub completed_retention: Duration,
    pub disk_free_limit: u64,
    /// Most records one housekeeping tick expires (more wait for the next tick).
    pub tick_limit: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_batch_items: 1000,
            max_batch_bytes: 16 << 20,
            max_iterations: 10_000_000,
            max_top: 1000,
            max_wait: Duration::from_secs(30),
            max_backlog: 1_000_000,
            max_backlog_bytes: 4 << 30,
            max_attempts: 5,
            max_connections: 4096,
            max_worker_requests: 1024,
            max_peer_requests: 256,
            dead_retention: Duration::from_secs(7 * 24 * 3600),
            completed_retention: Duration::from_secs(7 * 24 * 3600),
            disk_free_limit: 1 << 30,
            tick_limit: 2000,
        }
    }
}

/// The autoscaler's knobs.
#[derive(Clone, Debug, PartialEq)]
pub struct Scaling {
    pub scale_up_wait: Duration,
    pub drain_target: Duration,
    pub scale_up_interval: Duration,
    pub worker_idle_timeout: Duration,
    pub worker_orphan_timeout: Duration,
    pub worker_threads: usize,
    /// The cluster-wide worker budget a new cluster starts with.
    pub max_workers: u32,
    /// How often the autoscaler looks at the queue.
    pub tick: Duration,
    /// Assumed hashing rate of one worker (iterations/s) until one is measured.
    pub assumed_rate: f64,
}

impl Default for Scaling {
    fn default() -> Self {
        Scaling {
            scale_up_wait: Duration::from_secs(2),
            drain_target: Duration::from_secs(30),
            scale_up_interval: Duration::from_secs(1),
            worker_idle_timeout: Duration::from_secs(60),
            worker_orphan_timeout: Duration::from_secs(30),
            worker_threads: 1,
            max_workers: 8,
            tick: Duration::from_millis(200),
            assumed_rate: 2_000_000.0,
        }
    }
}

/// Where and how the node stores its state.
#[derive(Clone, Debug, PartialEq)]
pub struct Storage {
    /// Take a snapshot (and purge the log) every this many log entries.
    pub snapshot_every: u64,
    /// sled's page cache: the bound on the state machine's memory.
    pub cache_bytes: u64,
    /// Size of the Raft log's segment files.
    pub log_segment_bytes: u64,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            snapshot_every: 5000,
            cache_bytes: 64 << 20,
            log_segment_bytes: 64 << 20,
        }
    }
}

/// How the proposer gathers requests into log entries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Batching {
    /// Batches in flight at once; requests arriving meanwhile form the next batch. Few in
    /// flight means big batches (one log entry, one apply for many requests); enough to keep
    /// the pipeline to the followers busy.
    pub in_flight: usize,
    /// Most requests in one log entry.
    pub max_requests: usize,
    /// Most payload bytes in one log entry (a single larger request still goes alone).
    pub max_bytes: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            in_flight: 2,
            max_requests: 1024,
            max_bytes: 1 << 20,
        }
    }
}

/// Shortest credential accepted (they are random strings; scripts make 48 hex digits).
pub const MIN_TOKEN_LEN: usize = 16;

/// One credential per audience. `None` means the audience's routes are open (peer, worker,
/// client: only with `--insecure` for the first two) or refused (admin).
#[derive(Clone, Default)]
pub struct Credentials {
    /// Raft RPC and node-to-node routes.
    pub peer: Option<String>,
    /// Worker routes and the binary download.
    pub worker: Option<String>,
    /// Admin routes.
    pub admin: Option<String>,
    /// The client API, `/status`, `/metrics` (when set).
    pub client: Option<String>,
    /// Started with `--insecure`: missing peer, worker and admin credentials open their routes.
    pub insecure: bool,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret, even in a debug dump of the config.
        let set = |t: &Option<String>| if t.is_some() { "set" } else { "unset" };
        f.debug_struct("Credentials")
            .field("peer", &set(&self.peer))
            .field("worker", &set(&self.worker))
            .field("admin", &set(&self.admin))
            .field("client", &set(&self.client))
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl Credentials {
    /// Checks the credentials together: the peer and worker ones are required unless
    /// `insecure`, each is long enough and visible ASCII, and no two audiences share one (a
    /// worker must never hold what opens Raft).
    pub fn check(
        peer: Option<String>,
        worker: Option<String>,
        admin: Option<String>,
        client: Option<String>,
        insecure: bool,
    ) -> Result<Credentials, ConfigError> {
        let clean = |t: Option<String>| t.filter(|t| !t.is_empty());
        let c = Credentials {
            peer: clean(peer),
            worker: clean(worker),
            admin: clean(admin),
            client: clean(client),
            insecure,
        };
        if !insecure {
            if c.peer.is_none() {
                let flag = "--cluster-token (the peer credential)";
                return Err(ConfigError::MissingCredential { flag });
            }
            if c.worker.is_none() {
                let flag = "--worker-token (the workers' credential)";
                return Err(ConfigError::MissingCredential { flag });
            }
        }
        let named = [
            ("--cluster-token", &c.peer),
            ("--worker-token", &c.worker),
            ("--admin-token", &c.admin),
            ("--client-token", &c.client),
        ];
        for (flag, token) in named {
            let Some(token) = token else { continue };
            if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::WeakCredential { flag });
            }
        }
        for (i, (a, ta)) in named.iter().enumerate() {
            for (b, tb) in &named[i + 1..] {
                if ta.is_some() && ta == tb {
                    return Err(ConfigError::SharedCredential(a, b));
                }
            }
        }
        Ok(c)
    }
}

/// `--join`: an http(s) URL of a member.
fn join_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or("--join must be a member's http(s) URL, e.g. http://10.0.0.1:7101")?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') || host.chars().any(char::is_whitespace) {
        return Err("--join must be a member's base URL, e.g. http://10.0.0.1:7101".into());
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// A node's resolved configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    pub listen: SocketAddr,
    pub client_listen: Option<SocketAddr>,
    /// The founding voters; empty for a node started with `--join`.
    pub peers: Peers,
    /// The cluster this node joins (`--join`): it never forms one.
    pub join: Option<String>,
    /// The address a joining node is reached at (`--advertise`).
    pub advertise: Option<String>,
    pub outbound_addr: Option<std::net::IpAddr>,
    pub data_dir: PathBuf,
    pub credentials: Credentials,
    /// TLS on every listener and link (`--tls-cert`, `--tls-key`, `--tls-ca`).
    pub tls: Option<hashq_tls::NodeTls>,
    pub cluster_name: String,
    pub role: Role,
    /// The latest cluster version this node offers ([`hashq_raft::version`]).
    pub cluster_version_max: u32,
    pub launcher: LauncherKind,
    pub scaling: Scaling,
    pub worker_binary: PathBuf,
    /// The `ec2` launcher's settings (checked only with `--launcher ec2`).
    pub ec2: Ec2Args,
    pub limits: Limits,
    /// Tests only: a file holding a shift of this node's wall clock.
    pub clock_offset_file: Option<PathBuf>,
    pub http: HttpLimits,
    pub timing: Timing,
    pub storage: Storage,
    pub batching: Batching,
}

impl NodeConfig {
    /// The address peers and workers use for `id`.
    pub fn peer_addr(&self, id: NodeId) -> Option<&str> {
        self.peers
            .0
            .iter()
            .find(|(peer, _)| *peer == id)
            .map(|(_, addr)| addr.as_str())
    }

    /// The address peers and workers reach this node at: `--advertise`, else its entry in
    /// `--peers`.
    pub fn own_addr(&self) -> Option<&str> {
        self.advertise
            .as_deref()
            .or_else(|| self.peer_addr(self.id))
    }
}

#[cfg(test)]
mod tests;
