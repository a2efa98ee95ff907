//! The subcommands of the `hashq` binary besides the node itself.

pub mod bench;
pub mod client;
mod machine;
pub mod node;
pub mod worker;

use std::time::Duration;

use hashq_node::config::LogFormat;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))
}

/// `hashq worker` flags.
#[derive(clap::Args)]
pub struct WorkerArgs {
    /// Endpoints to start from, comma-separated (the cluster tells the worker the rest).
    #[arg(long, env = "HASHQ_ENDPOINTS", value_delimiter = ',', required = true)]
    pub endpoints: Vec<String>,
    /// The cluster CA (PEM) of a TLS cluster (`https://` endpoints).
    #[arg(long, env = "HASHQ_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The worker credential (the nodes' --worker-token).
    #[arg(long, env = "HASHQ_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    /// The budget slot this worker fills (set by the launcher).
    #[arg(long, env = "HASHQ_WORKER_ID")]
    pub worker_id: Option<u64>,
    /// The node that launched this worker (set by the launcher).
    #[arg(long, env = "HASHQ_PARENT")]
    pub parent: Option<u64>,
    /// The launcher's handle for this worker (an instance id on EC2); default `pid:<pid>`.
    #[arg(long, env = "HASHQ_HANDLE")]
    pub handle: Option<String>,
    /// Exit after this long without work, freeing the budget slot.
    #[arg(long, env = "HASHQ_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub idle_timeout: Duration,
    /// Items hashed at once, one thread each.
    #[arg(long, env = "HASHQ_THREADS", default_value_t = 1)]
    pub threads: usize,
    /// Items leased ahead of the threads, so the next one is ready when one finishes.
    #[arg(long, env = "HASHQ_PREFETCH", default_value_t = 1)]
    pub prefetch: u32,
    /// Also lease ahead about this much work, judged by how long recent items took (quick
    /// items come many per lease, at most 256 more); 0 turns it off.
    #[arg(long, env = "HASHQ_PREFETCH_WINDOW", default_value = "50ms", value_parser = duration)]
    pub prefetch_window: Duration,
    /// Exit when no endpoint of the cluster has answered for this long.
    #[arg(long, env = "HASHQ_NO_ENDPOINT_EXIT_AFTER", default_value = "30s", value_parser = duration)]
    pub no_endpoint_exit_after: Duration,
    /// How often to check that the parent endpoint is alive (default: 2s by /health, 15s on
    /// EC2).
    #[arg(long, env = "HASHQ_PARENT_CHECK_EVERY", value_parser = duration)]
    pub parent_check_every: Option<Duration>,
    /// On EC2: the parent endpoint's instance id. Turns on the EC2 parent check
    /// (DescribeInstanceStatus) instead of the parent's /health.
    #[arg(long, env = "HASHQ_EC2_PARENT_INSTANCE")]
    pub ec2_parent_instance: Option<String>,
    /// On EC2: the region (default: the SDK's chain).
    #[arg(long, env = "HASHQ_EC2_REGION")]
    pub ec2_region: Option<String>,
    /// On EC2: an EC2-compatible API endpoint (default: AWS, or AWS_ENDPOINT_URL).
    #[arg(long, env = "HASHQ_EC2_ENDPOINT_URL")]
    pub ec2_endpoint_url: Option<String>,
    /// The cluster's name (the `hashq:cluster` tag of its instances).
    #[arg(long, env = "HASHQ_CLUSTER_NAME", default_value = "hashq")]
    pub cluster_name: String,
    /// When the cluster is gone (no endpoint instance runs, or no endpoint answers), power
    /// the machine off after exiting: an EC2 worker instance then terminates itself.
    #[arg(long, env = "HASHQ_SHUTDOWN_ON_ORPHAN")]
    pub shutdown_on_orphan: bool,
    /// The command --shutdown-on-orphan runs (with `sh -c`).
    #[arg(
        long,
        env = "HASHQ_ORPHAN_SHUTDOWN_COMMAND",
        default_value = "shutdown -h now"
    )]
    pub orphan_shutdown_command: String,
    #[arg(long, env = "HASHQ_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Where the client commands send their requests.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// Endpoints to use, comma-separated; the next one is tried when one is down.
    #[arg(
        long,
        env = "HASHQ_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7101"
    )]
    pub endpoints: Vec<String>,
    /// The client token, if the cluster requires one.
    #[arg(long, env = "HASHQ_CLIENT_TOKEN", hide_env_values = true)]
    pub client_token: Option<String>,
    /// The cluster CA (PEM) of a TLS cluster (`https://` endpoints): the only issuer trusted.
    #[arg(long, env = "HASHQ_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Give up after this long (retries included).
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub timeout: Duration,
}

/// `hashq enqueue` flags.
#[derive(clap::Args)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub target: Target,
    /// SHA-512 iterations for every file.
    #[arg(long)]
    pub iterations: u32,
    /// Files to enqueue, one work item each.
    #[arg(required = true)]
    pub files: Vec<std::path::PathBuf>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Priority of every file's item, 0 to 9: workers take the highest first (FIFO within
    /// one). Default 5.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
    pub priority: Option<u8>,
    /// Files per request: up to this many go in one `POST /enqueue/batch` (all of them
    /// stored or none; 4 MiB of files at most per request). 1 sends each on its own
    /// (`PUT /enqueue`), as does a cluster whose version predates batches.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub batch: u32,
    /// Then wait for each item's result and print it as it comes (one JSON line per item:
    /// file, work id, status, value). The results stay for pullCompleted, as ever. Fails
    /// when an item ends dead or cancelled.
    #[arg(long)]
    pub wait: bool,
}

/// `hashq pull` flags.
#[derive(clap::Args)]
pub struct PullArgs {
    #[command(flatten)]
    pub target: Target,
    /// Most results to take.
    #[arg(long, default_value_t = 10)]
    pub top: u32,
    /// When no result is ready, wait up to this long for one (a long poll; the nodes cut it
    /// to their --max-wait, 30s by default); `[]` if none came.
    #[arg(long, value_parser = duration)]
    pub wait: Option<Duration>,
    /// Keep pulling, with waiting pulls, and print each result as a JSON line as it is taken
    /// (until interrupted, or `--count` results).
    #[arg(long, conflicts_with = "wait")]
    pub follow: bool,
    /// With --follow: also write each result to `DIR/<work_id>.sha512` (its hex digest). A
    /// take's key is kept in `DIR/.pull-key` until its results are written, so a `pull`
    /// killed in between gets the same results again when it is started again on `DIR`.
    #[arg(long, requires = "follow")]
    pub out: Option<std::path::PathBuf>,
    /// With --follow: stop after this many results.
    #[arg(long, requires = "follow")]
    pub count: Option<u64>,
}

/// `hashq status` flags.
#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
}

/// `hashq work` flags.
#[derive(clap::Args)]
pub struct WorkArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(subcommand)]
    pub command: WorkCommand,
}

#[derive(clap::Subcommand)]
pub enum WorkCommand {
    /// Show one item: status, iterations, attempts, and its value once completed.
    Get {
        /// The work id `hashq enqueue` printed.
        id: u64,
        /// Wait up to this long for the item to be completed, pulled, dead or cancelled (a
        /// long poll; the nodes cut it to their --max-wait, 30s by default).
        #[arg(long, value_parser = duration)]
        wait: Option<Duration>,
    },
    /// Cancel a queued or running item (its worker stops at its next heartbeat; no result
    /// is ever stored for it). Cancelling a cancelled item succeeds again.
    Cancel { id: u64 },
    /// Put a dead or cancelled item back in the queue, its attempts reset.
    Retry { id: u64 },
    /// List items with one status, by id, as JSON lines.
    List {
        /// queued, running, completed, pulled, dead or cancelled.
        #[arg(long)]
        status: String,
        /// Start after this work id.
        #[arg(long)]
        after: Option<u64>,
        /// At most this many items (all of them when absent).
        #[arg(long)]
        limit: Option<u64>,
    },
}

/// `hashq cluster` subcommands.
#[derive(clap::Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub target: Target,
    /// The admin credential (the nodes' --admin-token): admin commands need it.
    #[arg(long, env = "HASHQ_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub admin_token: Option<String>,
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(clap::Subcommand)]
pub enum ClusterCommand {
    /// List the members and their health.
    Members,
    /// List the workers, their parents, leases and the budget.
    Workers,
    /// Set the cluster-wide worker budget.
    SetMaxWorkers {
        /// The new budget (0 stops launching; running workers finish and idle out).
        max: u32,
    },
    /// Add a node (started with `hashq node --join URL`): a learner until it has caught up,
    /// then a voter.
    Add {
        /// Its Raft id, unused by any member.
        #[arg(long)]
        id: u64,
        /// HOST:PORT its peers reach it at (its --listen address, as peers see it).
        #[arg(long)]
        addr: String,
    },
    /// Remove a node from the membership (refused if it would leave no live endpoint or no
    /// live majority).
    Remove {
        /// Its Raft id.
        id: u64,
    },
    /// Replace a dead node: add the new one (a learner until caught up, then a voter), then
    /// remove the old one.
    Replace {
        /// The Raft id of the node to replace.
        old: u64,
        /// The new node's Raft id.
        #[arg(long)]
        id: u64,
        /// HOST:PORT its peers reach it at.
        #[arg(long)]
        addr: String,
    },
}

/// `hashq bench` flags.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Nodes in the benchmark cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Seconds of each enqueue phase.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Jobs in the warm-worker latency phase.
    #[arg(long, default_value_t = 200)]
    pub jobs: usize,
    /// The enqueue runs, as CLIENTS:BYTES pairs separated by commas.
    #[arg(long, default_value = "1:1024,16:1024,64:1024,64:16384", value_parser = enqueue_runs)]
    pub runs: EnqueueRuns,
    /// Only the enqueue runs (no draining, pulling, worker or failover phases).
    #[arg(long)]
    pub enqueue_only: bool,
}

/// `--runs`: (clients, payload bytes) pairs.
#[derive(Clone, Debug)]
pub struct EnqueueRuns(pub Vec<(usize, usize)>);

fn enqueue_runs(s: &str) -> Result<EnqueueRuns, String> {
    s.split(',')
        .map(|pair| {
            let (c, b) = pair
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("{pair:?} is not CLIENTS:BYTES"))?;
            let c: usize = c.parse().map_err(|_| format!("bad client count {c:?}"))?;
            let b: usize = b.parse().map_err(|_| format!("bad payload size {b:?}"))?;
            if c == 0 || b == 0 {
                return Err("clients and bytes must be at least 1".into());
            }
            Ok((c, b))
        })
        .collect::<Result<_, _>>()
        .map(EnqueueRuns)
}

/// `hashq migrate` flags.
#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The node's data dir (the node must be stopped).
    #[arg(long, env = "HASHQ_DATA_DIR")]
    pub data_dir: std::path::PathBuf,
    /// Drop log entries the node has not applied (safe when another node of the cluster has
    /// applied them: it will lead, and this node installs its snapshot).
    #[arg(long)]
    pub discard_unapplied: bool,
}

/// Converts a data dir of hashq 0.1 in place and says what it did.
pub fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let done = hashq_storage::migrate::migrate(&args.data_dir, args.discard_unapplied)?;
    println!(
        "{}",
        serde_json::json!({
            "data_dir": args.data_dir,
            "snapshot_at": done.at.map(|l| l.index),
            "items": done.items,
            "running_requeued": done.requeued,
            "workers_dropped": done.workers_dropped,
            "discarded_entries": done.discarded_entries,
            "old_files_kept_in": done.kept_in,
        })
    );
    Ok(())
}

/// `hashq tls` flags.
#[derive(clap::Args)]
pub struct TlsArgs {
    /// The CA's directory: `ca.pem` and `ca-key.pem` are created here once, then reused;
    /// certificates are written beside them as `<name>.pem` and `<name>-key.pem`.
    #[arg(long)]
    pub dir: std::path::PathBuf,
    /// The certificate's name (its file names and common name), e.g. `node-1`.
    #[arg(long)]
    pub name: String,
    /// An IP address or DNS name the node is reached at; repeat for several.
    #[arg(long = "host", required = true)]
    pub hosts: Vec<String>,
}

/// `hashq tls`: prints the paths of the node's certificate, key and the CA as JSON.
pub fn tls(args: TlsArgs) -> anyhow::Result<()> {
    if args.name.is_empty()
        || !args
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        anyhow::bail!("--name must be letters, digits, '-' or '_' (it names files)");
    }
    let ca = hashq_tls::Ca::open_or_create(&args.dir)?;
    let files = ca.issue(&args.name, &args.hosts)?;
    println!(
        "{}",
        serde_json::json!({
            "cert": files.cert,
            "key": files.key,
            "ca": files.ca,
        })
    );
    Ok(())
}

/// `hashq recover` flags.
#[derive(clap::Args)]
pub struct RecoverArgs {
    /// The surviving node's data dir (the node must be stopped). Pick the survivor with the
    /// most complete log: its log is all the new cluster will have.
    #[arg(long, env = "HASHQ_DATA_DIR")]
    pub data_dir: std::path::PathBuf,
    /// The node's Raft id (its --id).
    #[arg(long)]
    pub id: u64,
    /// HOST:PORT its peers will reach it at (its --listen address, as peers see it).
    #[arg(long)]
    pub addr: String,
    /// Required: this cannot be undone, and the other old members must never run again with
    /// their data.
    #[arg(long)]
    pub force_new_cluster: bool,
}

/// Makes a stopped node the only voter of its cluster (etcd's `--force-new-cluster`) and
/// says what it did.
pub async fn recover(args: RecoverArgs) -> anyhow::Result<()> {
    if !args.force_new_cluster {
        anyhow::bail!(
            "hashq recover rewrites the membership of {}: pass --force-new-cluster to confirm \
             (the node must be stopped, and the other old members must never run again)",
            args.data_dir.display()
        );
    }
    format!("{}={}", args.id, args.addr)
        .parse::<hashq_node::config::Peers>()
        .map_err(|e| anyhow::anyhow!("--id and --addr: {e}"))?;
    let done =
        hashq_storage::recover::force_new_cluster(&args.data_dir, args.id, &args.addr).await?;
    println!(
        "{}",
        serde_json::json!({
            "data_dir": args.data_dir,
            "only_voter": args.id,
            "addr": args.addr,
            "membership_entry": {"index": done.at.index, "term": done.at.leader_id.term},
            "previous_members": done.previous,
            "next": "start the node as before, then grow the cluster with `hashq cluster add`",
        })
    );
    Ok(())
}
