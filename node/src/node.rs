//! A node's shared state: what the routes and the background loops read and change.
//!
//! A leaf: it knows nothing of the routes or of the loops that use it, nor of how a node is
//! started and stopped ([`crate::server`]). [`Node`] is a cheap handle; every clone sees the
//! same state through its accessors.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashq_proto::api::Health;
use hashq_proto::routes::observability::HEALTH;
use hashq_raft::network::Peers;
use hashq_raft::{NodeId, Raft};
use hashq_storage::SmReader;

use crate::config::{NodeConfig, Role};
use crate::http::{BodyBudget, Capacity};
use crate::launcher::{LaunchError, Launcher};
use crate::metrics::NodeMetrics;
use crate::proposer::{now_ms, Proposer};
use crate::raft_gate;

/// Local counters for `/metrics` (the replicated counts live in the state machine).
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub client_errors: AtomicU64,
    pub server_errors: AtomicU64,
    pub enqueued: AtomicU64,
    pub pulled: AtomicU64,
    pub forwarded_reads: AtomicU64,
    /// Pulls waiting here for a result (`wait=`), now.
    pub pulls_waiting: AtomicU64,
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

    /// Records a peer's answer, or forgets it (`None`: the probe failed).
    pub fn set(&self, id: NodeId, health: Option<Health>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match health {
            Some(h) => seen.insert(id, h),
            None => seen.remove(&id),
        };
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

/// Per-node admission control shared by every listener: request slots per audience and the
/// budget of request-body bytes in flight ([`crate::http`]).
pub struct Gates {
    pub client: Arc<Capacity>,
    pub worker: Arc<Capacity>,
    pub admin: Arc<Capacity>,
    pub peer: Arc<Capacity>,
    /// `/health`, `/`, `/openapi.json`: public and cheap, kept apart so that neither a client
    /// flood nor a worker flood hides a node's health from its peers.
    pub public: Arc<Capacity>,
    pub bodies: BodyBudget,
}

impl Gates {
    pub fn new(config: &NodeConfig) -> Gates {
        let l = &config.limits;
        let wait = config.http.queue_timeout;
        Gates {
            client: Capacity::new(l.max_connections, wait),
            worker: Capacity::new(l.max_worker_requests, wait),
            admin: Capacity::new(16, wait),
            peer: Capacity::new(l.max_peer_requests, wait),
            public: Capacity::new(256, wait),
            bodies: BodyBudget::new(config.http.max_body_bytes_in_flight),
        }
    }
}

/// What a node is made of once its store is open and its Raft started; [`Node::new`] adds
/// the state that starts empty.
pub struct Parts {
    pub config: NodeConfig,
    pub raft: Raft,
    pub reader: SmReader,
    pub proposer: Proposer,
    pub peers: Peers,
    /// The listeners' TLS (`--tls-cert`): every connection handshakes first.
    pub tls: Option<hashq_tls::TlsAcceptor>,
    pub launcher: Arc<dyn Launcher>,
    pub metrics: Arc<NodeMetrics>,
    /// What the store found damaged at open, and the log index to repair up to.
    pub repair: Repair,
}

struct State {
    parts: Parts,
    /// Random per start of this process (see `Request::Reserve`).
    incarnation: u64,
    peer_health: PeerHealth,
    gates: Gates,
    raft_gate: raft_gate::Gate,
    /// The last few launch failures, for `/status`.
    launch_errors: std::sync::Mutex<Vec<String>>,
    stats: Stats,
    disk: DiskState,
    started: Instant,
}

/// A node. Cheap to clone: clones share everything.
#[derive(Clone)]
pub struct Node {
    state: Arc<State>,
}

impl Node {
    pub fn new(parts: Parts) -> Node {
        Node {
            state: Arc::new(State {
                gates: Gates::new(&parts.config),
                parts,
                incarnation: rand::random::<u64>() | 1,
                peer_health: PeerHealth::default(),
                raft_gate: raft_gate::Gate::default(),
                launch_errors: std::sync::Mutex::new(Vec::new()),
                stats: Stats::default(),
                disk: DiskState::default(),
                started: Instant::now(),
            }),
        }
    }

    pub fn id(&self) -> NodeId {
        self.state.parts.config.id
    }

    pub fn config(&self) -> &NodeConfig {
        &self.state.parts.config
    }

    pub fn raft(&self) -> &Raft {
        &self.state.parts.raft
    }

    /// Reads of this node's applied state machine.
    pub fn reader(&self) -> &SmReader {
        &self.state.parts.reader
    }

    /// Where every write goes (see [`crate::proposer`]).
    pub fn proposer(&self) -> &Proposer {
        &self.state.parts.proposer
    }

    /// The client this node calls its peers with.
    pub fn http(&self) -> &reqwest::Client {
        self.state.parts.peers.client()
    }

    /// Node-to-node calls: the scheme and the peer credential.
    pub fn peers(&self) -> &Peers {
        &self.state.parts.peers
    }

    pub fn tls_acceptor(&self) -> Option<&hashq_tls::TlsAcceptor> {
        self.state.parts.tls.as_ref()
    }

    pub fn is_witness(&self) -> bool {
        self.config().role == Role::Witness
    }

    pub fn launcher(&self) -> &Arc<dyn Launcher> {
        &self.state.parts.launcher
    }

    /// Random per start of this process (see `Request::Reserve`).
    pub fn incarnation(&self) -> u64 {
        self.state.incarnation
    }

    pub fn peer_health(&self) -> &PeerHealth {
        &self.state.peer_health
    }

    /// Request slots per audience and the body budget, shared by every listener.
    pub fn gates(&self) -> &Gates {
        &self.state.gates
    }

    /// Checks Raft RPCs before openraft sees them.
    pub fn raft_gate(&self) -> &raft_gate::Gate {
        &self.state.raft_gate
    }

    pub fn stats(&self) -> &Stats {
        &self.state.stats
    }

    /// Latency histograms and counters for `/metrics`.
    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.state.parts.metrics
    }

    /// Set while damaged durable state is being repaired from the peers.
    pub fn repair(&self) -> &Repair {
        &self.state.parts.repair
    }

    /// This node's free disk space and its alarm.
    pub fn disk(&self) -> &DiskState {
        &self.state.disk
    }

    /// When this node started.
    pub fn started(&self) -> Instant {
        self.state.started
    }

    /// Whether this node has Raft state (and so must never be initialized).
    pub async fn is_initialized(&self) -> bool {
        // A stopped Raft counts as initialized: nothing may initialize it.
        self.state.parts.raft.is_initialized().await.unwrap_or(true)
    }

    /// This node's estimate of state-machine time now: the last applied time plus what has
    /// passed since (state-machine time never reads a clock; this is only for deciding when
    /// to propose and for showing ages).
    pub fn sm_now(&self, meta: &hashq_raft::machine::Meta) -> u64 {
        let applied = *self.state.parts.reader.subscribe().borrow();
        let since = applied.at.map_or(0, |at| at.elapsed().as_millis() as u64);
        meta.now.saturating_add(since)
    }

    /// Asks a peer's `/health`, briefly; `None` if it does not answer.
    pub async fn probe_health(&self, addr: &str) -> Option<Health> {
        let answer = self
            .http()
            .get(self.peers().url(addr, HEALTH))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?;
        answer.json().await.ok()
    }

    /// Keeps the last few launch errors for `/status`.
    pub fn note_launch_error(&self, e: &LaunchError) {
        let mut errors = self.launch_errors();
        if errors.len() >= 5 {
            errors.remove(0);
        }
        errors.push(format!("{} {e}", now_ms()));
    }

    /// The last few launch errors, oldest first.
    pub fn launch_errors(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.state
            .launch_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any handle to this node's state is left but this one (tests check that a
    /// node shut down leaves none behind).
    #[cfg(test)]
    pub(crate) fn is_last_handle(&self) -> bool {
        Arc::strong_count(&self.state) == 1
    }
}
