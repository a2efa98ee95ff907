//! A running node: storage, Raft, the proposer, the leader's loops and the HTTP server.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashq_proto::api::Health;
use hashq_raft::network::Network;
use hashq_raft::{NodeId, Raft};
use hashq_storage::{SmReader, StoreOptions};
use openraft::SnapshotPolicy;
use tokio::net::TcpListener;

use crate::config::{millis, NodeConfig, Role};
use crate::launcher::{self, Launcher};
use crate::metrics::{NodeMetrics, StoreTimings};
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
            node.config.timing.peer_probe_every
        } else {
            node.config.timing.peer_probe_eager
        })
        .await;
    }
}

pub struct Inner {
    pub config: NodeConfig,
    /// Random per start of this process (see `Request::Reserve`).
    pub incarnation: u64,
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
    /// Latency histograms and counters for `/metrics`.
    pub metrics: Arc<NodeMetrics>,
    /// Set while damaged durable state is being repaired from the peers.
    pub repair: Repair,
    /// This node's free disk space and its alarm.
    pub disk: DiskState,
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

/// Damaged durable state being repaired from the peers (see `hashq_storage::Recovery`).
pub struct Repair {
    /// The log index this node must reach again before it may vote; `None` once repaired.
    pub until: std::sync::Mutex<Option<u64>>,
    /// What was damaged, in words.
    pub damage: Option<String>,
}

impl Repair {
    pub fn until(&self) -> Option<u64> {
        *self.until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// This node's disk, as the disk watcher last saw it.
#[derive(Default)]
pub struct DiskState {
    pub free_bytes: AtomicU64,
    /// Below `--disk-free-limit`.
    pub low: AtomicBool,
}

fn report_recovery(recovery: &hashq_storage::Recovery) {
    if let Some((path, at)) = &recovery.log.torn_tail {
        tracing::warn!(path = %path.display(), at, "the log ended in a torn record (never acknowledged); cut it off");
    }
    if let Some(why) = &recovery.sm.sled_reset {
        tracing::warn!(error = %why, "the state machine store was unreadable and was rebuilt");
    }
    if let Some(snapshot) = &recovery.sm.restored_from {
        tracing::warn!(%snapshot, "the state machine was behind the log's purge point; restored from the latest snapshot");
    }
    if let (Some(until), damage) = (recovery.repair_until, &recovery.damage) {
        tracing::error!(
            until,
            damage = damage.as_deref().unwrap_or("an earlier start found damage"),
            "REPAIRING: this node neither votes nor stands for election until its peers bring its log back to index {until}"
        );
    }
}

/// While repairing, proposes a no-op now and then (so an idle cluster's log still grows
/// past what this node had), and ends the repair once this node has applied up to where its
/// log was and follows a leader: then it votes and stands for election again.
async fn watch_repair(node: Node) {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while let Some(until) = node.repair.until() {
        ticker.tick().await;
        let (applied, follows) = {
            let m = node.raft.metrics().borrow().clone();
            (
                m.last_applied.map_or(0, |l| l.index),
                m.current_leader.is_some_and(|l| l != node.id()),
            )
        };
        if !follows {
            continue;
        }
        if applied < until {
            let _ = node
                .proposer
                .submit(hashq_raft::command::Request::Noop)
                .await;
            continue;
        }
        if let Err(e) = hashq_storage::repaired(&node.config.data_dir) {
            tracing::error!(error = %e, "cannot record the end of the repair");
            continue;
        }
        *node.repair.until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        node.raft
            .runtime_config()
            .elect(node.config.role != Role::Witness);
        tracing::warn!(
            applied,
            until,
            "REPAIRED: this node holds everything it had again; it votes and stands for election"
        );
    }
}

/// Counts the terms this node sees begin, and measures the leader's clock against this
/// node's at every apply.
async fn watch_terms_and_clocks(node: Node) {
    let mut metrics = node.raft.metrics();
    let mut applied = node.reader.subscribe();
    let mut term = metrics.borrow().current_term;
    loop {
        tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = metrics.borrow().current_term;
                if now > term {
                    node.metrics.elections.fetch_add(now - term, Ordering::Relaxed);
                    term = now;
                }
            }
            changed = applied.changed() => {
                if changed.is_err() {
                    return;
                }
                let leader_wall = applied.borrow().leader_wall;
                if leader_wall > 0 {
                    let skew = leader_wall as i64 - crate::proposer::now_ms() as i64;
                    node.metrics.leader_clock_skew_ms.store(skew, Ordering::Relaxed);
                }
            }
        }
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

impl Node {
    /// Opens the store, starts Raft and the background loops. Serve it with [`serve`].
    pub async fn start(config: NodeConfig) -> Result<Node, StartError> {
        let launcher = launcher::from_config(&config)
            .await
            .map_err(StartError::Launcher)?;
        let metrics = Arc::new(NodeMetrics::default());
        hashq_storage::fsio::observe_store(Box::new(StoreTimings(metrics.clone())));
        let hashq_storage::Opened { log, sm, recovery } = hashq_storage::open(
            &config.data_dir,
            &StoreOptions {
                cache_bytes: config.storage.cache_bytes,
                log: hashq_storage::LogOptions {
                    segment_bytes: config.storage.log_segment_bytes,
                    ..hashq_storage::LogOptions::default()
                },
            },
        )?;
        report_recovery(&recovery);
        let reader = sm.reader();
        let timing = &config.timing;
        sit_out_an_election_if_fresh(&log, timing.election_timeout).await?;
        let repairing = recovery.repair_until.is_some();
        let raft_config = openraft::Config {
            cluster_name: config.cluster_name.clone(),
            heartbeat_interval: millis(timing.raft_heartbeat),
            election_timeout_min: millis(timing.election_timeout),
            election_timeout_max: millis(timing.election_timeout) * 2,
            install_snapshot_timeout: 10_000,
            // An append RPC must finish within a heartbeat interval (openraft's timeout for
            // it): keep them to a few MiB.
            max_payload_entries: 8,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.storage.snapshot_every),
            snapshot_max_chunk_size: 4 << 20,
            max_in_snapshot_log_to_keep: (config.storage.snapshot_every / 2).min(1000),
            purge_batch_size: 64,
            // A witness votes and keeps the log but never stands for election: a leader must
            // serve clients and workers, which a witness does not. A node repairing damaged
            // state stands for nothing until it is whole again.
            enable_elect: config.role != Role::Witness && !repairing,
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
                metrics: Some(metrics.clone()),
                request_timeout: timing.request_timeout,
                batch_key_ttl: timing.internal_key_ttl,
                batching: config.batching,
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
                incarnation: rand::random::<u64>() | 1,
                peer_health: PeerHealth::default(),
                raft_gate: crate::raft_gate::Gate::default(),
                raft,
                launcher: launcher.clone(),
                launch_errors: std::sync::Mutex::new(Vec::new()),
                reader,
                proposer,
                http,
                stats: Stats::default(),
                metrics,
                repair: Repair {
                    until: std::sync::Mutex::new(recovery.repair_until),
                    damage: recovery.damage.clone(),
                },
                disk: DiskState::default(),
                started: Instant::now(),
                stopping: Arc::new(AtomicBool::new(false)),
            }),
        };
        tokio::spawn(exit_on_fatal(node.raft.clone(), node.stopping.clone()));
        tokio::spawn(watch_terms_and_clocks(node.clone()));
        tokio::spawn(crate::disk::watch(node.clone()));
        if repairing {
            tokio::spawn(watch_repair(node.clone()));
        }
        if let Some(path) = node.config.clock_offset_file.clone() {
            tokio::spawn(crate::proposer::follow_clock_offset_file(path));
        }
        tokio::spawn(bootstrap::run(node.clone()));
        tokio::spawn(probe_peers(node.clone()));
        tokio::spawn(housekeeping::run(node.clone()));
        tokio::spawn(autoscaler::run(node.clone(), launcher));
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// This node's estimate of state-machine time now: the last applied time plus what has
    /// passed since (state-machine time never reads a clock; this is only for deciding when
    /// to propose and for showing ages).
    pub fn sm_now(&self, meta: &hashq_raft::machine::Meta) -> u64 {
        let applied = *self.reader.subscribe().borrow();
        let since = applied.at.map_or(0, |at| at.elapsed().as_millis() as u64);
        meta.now.saturating_add(since)
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
