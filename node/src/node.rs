//! A running node: storage, Raft, the proposer, the leader's loops and the HTTP server.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashq_raft::network::Network;
use hashq_raft::{NodeId, Raft};
use hashq_storage::{SmReader, StoreOptions};
use openraft::SnapshotPolicy;
use tokio::net::TcpListener;

use crate::config::{NodeConfig, Role};
use crate::launcher::{self, Launcher};
use crate::proposer::Proposer;
use crate::{autoscaler, bootstrap, housekeeping, routes};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage: {0}")]
    Store(#[from] hashq_storage::StoreError),
    #[error("raft configuration: {0}")]
    RaftConfig(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("http client: {0}")]
    Http(String),
    #[error("launcher: {0}")]
    Launcher(String),
}

/// Local counters for `/metrics` (the replicated counts live in the state machine).
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub client_errors: AtomicU64,
    pub server_errors: AtomicU64,
    pub enqueued: AtomicU64,
    pub pulled: AtomicU64,
    pub forwarded_reads: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

pub struct Inner {
    pub config: NodeConfig,
    pub raft: Raft,
    pub launcher: Arc<dyn Launcher>,
    /// The last few launch failures, for `/status`.
    pub launch_errors: std::sync::Mutex<Vec<String>>,
    pub reader: SmReader,
    pub proposer: Proposer,
    pub http: reqwest::Client,
    pub stats: Stats,
    pub started: Instant,
    /// Set when the node stops on purpose, so Raft stopping is not taken for a crash.
    pub stopping: Arc<AtomicBool>,
}

/// A node. Cheap to clone: clones share everything.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

impl std::ops::Deref for Node {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// A node with no Raft state at all may replace one that died after voting in the current
/// term (same id, new disk). Voting again in that term could elect a second leader in it, so
/// a fresh node waits out every election under way (twice the longest election timeout)
/// before its Raft starts: by then each candidate of that term has won or moved on.
async fn sit_out_an_election_if_fresh(
    log: &hashq_storage::LogStore,
    election_timeout: Duration,
) -> Result<(), StartError> {
    use openraft::storage::RaftLogStorage;
    let mut log = log.clone();
    let raft_err = |e: openraft::StorageError<NodeId>| StartError::Raft(e.to_string());
    let voted = log.read_vote().await.map_err(raft_err)?.is_some();
    let logged = log
        .get_log_state()
        .await
        .map_err(raft_err)?
        .last_log_id
        .is_some();
    if !voted && !logged {
        let wait = election_timeout * 4;
        tracing::info!(
            ?wait,
            "fresh data dir: sitting out any election under way before voting"
        );
        tokio::time::sleep(wait).await;
    }
    Ok(())
}

fn millis(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

impl Node {
    /// Opens the store, starts Raft and the background loops. Serve it with [`serve`].
    pub async fn start(config: NodeConfig) -> Result<Node, StartError> {
        let launcher = launcher::from_config(&config)
            .await
            .map_err(StartError::Launcher)?;
        let (log, sm) = hashq_storage::open(
            &config.data_dir,
            &StoreOptions {
                cache_bytes: config.cache_bytes,
            },
        )?;
        let reader = sm.reader();
        let timing = &config.timing;
        sit_out_an_election_if_fresh(&log, timing.election_timeout).await?;
        let raft_config = openraft::Config {
            cluster_name: config.cluster_name.clone(),
            heartbeat_interval: millis(timing.raft_heartbeat),
            election_timeout_min: millis(timing.election_timeout),
            election_timeout_max: millis(timing.election_timeout) * 2,
            install_snapshot_timeout: 10_000,
            // An append RPC must finish within a heartbeat interval (openraft's timeout for
            // it): keep them to a few MiB.
            max_payload_entries: 8,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            snapshot_max_chunk_size: 4 << 20,
            max_in_snapshot_log_to_keep: (config.snapshot_every / 2).min(1000),
            purge_batch_size: 64,
            // A witness votes and keeps the log but never stands for election: a leader must
            // serve clients and workers, which a witness does not.
            enable_elect: config.role != Role::Witness,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::RaftConfig(e.to_string()))?;

        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .no_proxy()
            .local_address(config.outbound_addr)
            .build()
            .map_err(|e| StartError::Http(e.to_string()))?;
        let token: Option<Arc<str>> = config.cluster_token.as_deref().map(Arc::from);
        let network = Network::new(http.clone(), token.clone());
        let raft = Raft::new(config.id, Arc::new(raft_config), network, log, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let proposer = Proposer::start(
            config.id,
            raft.clone(),
            reader.clone(),
            http.clone(),
            token,
            timing.request_timeout,
            config.proposals_in_flight,
        );
        let node = Node {
            inner: Arc::new(Inner {
                config,
                raft,
                launcher: launcher.clone(),
                launch_errors: std::sync::Mutex::new(Vec::new()),
                reader,
                proposer,
                http,
                stats: Stats::default(),
                started: Instant::now(),
                stopping: Arc::new(AtomicBool::new(false)),
            }),
        };
        tokio::spawn(exit_on_fatal(node.raft.clone(), node.stopping.clone()));
        tokio::spawn(bootstrap::run(node.clone()));
        tokio::spawn(housekeeping::run(node.clone()));
        tokio::spawn(autoscaler::run(node.clone(), launcher));
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// Asks a peer's `/health`, briefly; `None` if it does not answer.
    pub async fn probe_health(&self, addr: &str) -> Option<hashq_raft::wire::Health> {
        let answer = self
            .http
            .get(format!("http://{addr}/health"))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?;
        answer.json().await.ok()
    }

    /// Stops the workers this node launched (they give their leases back), then Raft. The
    /// HTTP server is stopped by its shutdown future.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.launcher.shutdown().await;
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
    }
}

/// A node whose Raft stopped on a fatal error (a storage failure, a bug) exits, so that its
/// supervisor restarts it from its durable state instead of leaving it answering 503s.
async fn exit_on_fatal(raft: Raft, stopping: Arc<AtomicBool>) {
    let mut metrics = raft.metrics();
    loop {
        let fatal = match &metrics.borrow().running_state {
            Err(openraft::error::Fatal::Stopped) => return,
            Err(fatal) => Some(fatal.to_string()),
            Ok(()) => None,
        };
        if let Some(fatal) = fatal {
            tracing::error!(error = %fatal, "raft stopped on a fatal error; exiting");
            std::process::exit(70);
        }
        if metrics.changed().await.is_err() {
            // The Raft core is gone without saying why (a panic drops its channels).
            if !stopping.load(Ordering::SeqCst) {
                tracing::error!("raft core stopped unexpectedly; exiting");
                std::process::exit(70);
            }
            return;
        }
    }
}

/// Serves the client API alone (`--client-listen`) on `listener` until `shutdown` completes.
pub async fn serve_client(
    listener: TcpListener,
    node: Node,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, routes::client_router(node))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves `node` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    node: Node,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = routes::router(node);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
