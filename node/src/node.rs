//! A running node: storage, Raft, the proposer, the leader's loops and the HTTP server.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashq_raft::network::Network;
use hashq_raft::wire::Health;
use hashq_raft::{NodeId, Raft};
use hashq_storage::{SmReader, StoreOptions};
use openraft::SnapshotPolicy;
use tokio::net::TcpListener;

use crate::config::{NodeConfig, Role};
use crate::launcher::{self, Launcher};
use crate::proposer::{Proposer, ProposerOptions};
use crate::{autoscaler, bootstrap, housekeeping, routes};
use hashq_raft::command::StoreLimits;

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

/// The last answer each peer gave to a `/health` probe, refreshed in the background once a
/// second, so neither `/status` calls nor the autoscaler fan requests out to every peer.
#[derive(Default)]
pub struct PeerHealth {
    seen: std::sync::Mutex<std::collections::HashMap<NodeId, Health>>,
}

impl PeerHealth {
    /// The peer's last answer, `None` if its last probe failed (or none was made yet).
    pub fn get(&self, id: NodeId) -> Option<Health> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn set(&self, id: NodeId, health: Option<Health>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match health {
            Some(h) => seen.insert(id, h),
            None => seen.remove(&id),
        };
    }
}

/// How often peers' health is probed once every peer has answered.
const PEER_PROBE_EVERY: Duration = Duration::from_secs(1);
/// ... and while some peer has not answered yet (a node that just started, or a peer down).
const PEER_PROBE_EAGER: Duration = Duration::from_millis(200);

async fn probe_peers(node: Node) {
    loop {
        let membership = node.raft.metrics().borrow().membership_config.clone();
        let probes = membership
            .membership()
            .nodes()
            .filter(|(id, _)| **id != node.id())
            .map(|(id, n)| {
                let (id, addr) = (*id, n.addr.clone());
                let node = node.clone();
                async move {
                    let health = node.probe_health(&addr).await;
                    let answered = health.is_some();
                    node.peer_health.set(id, health);
                    answered
                }
            });
        let answers = futures::future::join_all(probes).await;
        let all_up = !answers.is_empty() && answers.iter().all(|a| *a);
        tokio::time::sleep(if all_up {
            PEER_PROBE_EVERY
        } else {
            PEER_PROBE_EAGER
        })
        .await;
    }
}

pub struct Inner {
    pub config: NodeConfig,
    pub peer_health: PeerHealth,
    /// Request slots per audience and the body budget, shared by every listener.
    pub gates: crate::routes::Gates,
    /// Checks Raft RPCs before openraft sees them.
    pub raft_gate: crate::raft_gate::Gate,
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
        let token: Option<Arc<str>> = config.credentials.peer.as_deref().map(Arc::from);
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
            ProposerOptions {
                request_timeout: timing.request_timeout,
                in_flight: config.proposals_in_flight,
                limits: StoreLimits {
                    max_items: config.limits.max_backlog,
                    max_bytes: config.limits.max_backlog_bytes,
                },
            },
        );
        let node = Node {
            inner: Arc::new(Inner {
                gates: crate::routes::Gates::new(&config),
                config,
                peer_health: PeerHealth::default(),
                raft_gate: crate::raft_gate::Gate::default(),
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
        tokio::spawn(probe_peers(node.clone()));
        tokio::spawn(housekeeping::run(node.clone()));
        tokio::spawn(autoscaler::run(node.clone(), launcher));
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// Asks a peer's `/health`, briefly; `None` if it does not answer.
    pub async fn probe_health(&self, addr: &str) -> Option<Health> {
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
    let limits = node.config.http.clone();
    crate::http::serve(listener, routes::client_router(node), &limits, shutdown).await
}

/// Serves `node` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    node: Node,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = node.config.http.clone();
    crate::http::serve(listener, routes::router(node), &limits, shutdown).await
}

/// Raises this process's open-file limit to its hard limit: every connection is a file, and
/// running out of them would refuse peers along with clients.
pub fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!("could not raise the open-file limit");
            }
        }
    }
}
