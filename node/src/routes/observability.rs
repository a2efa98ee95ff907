//! Observability: `/health` (public: liveness, the leader, the cluster id, for peers,
//! workers and load balancers), and behind the client credential `/status` (the cluster as
//! this node sees it, typed as [`StatusView`]; the dashboard and `hashq status` read it) and
//! `/metrics` (Prometheus text).

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hashq_proto::api::Health;
use hashq_proto::routes::observability::{HEALTH, METRICS, STATUS};
use hashq_raft::machine;
use hashq_raft::types::{Counts, Tallies, WorkerRecord, WorkerState};
use hashq_raft::NodeId;
use openraft::ServerState;
use serde::Serialize;

use crate::error::ApiError;
use crate::node::Node;

/// `/status` and `/metrics`: behind the client credential when one is set.
pub fn router() -> Router<Node> {
    Router::new()
        .route(STATUS, get(status))
        .route(METRICS, get(metrics))
}

/// `/health`: open to anyone.
pub fn public_router() -> Router<Node> {
    Router::new().route(HEALTH, get(health))
}

fn state_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// `GET /health`: who this node is and whom it follows.
async fn health(State(node): State<Node>) -> Json<Health> {
    let m = node.raft().metrics().borrow().clone();
    Json(Health {
        node: node.id(),
        role: node.config().role.as_str().to_string(),
        leader: m.current_leader,
        term: m.current_term,
        cluster: node.config().cluster_name.clone(),
        launcher: node.launcher().name().to_string(),
        incarnation: node.incarnation(),
        cluster_version: node.config().cluster_version_max,
    })
}

/// `GET /status`: the cluster as this node sees it. Field names and shapes are an interface
/// (the dashboard, `hashq status` and the tests read them); an absent value is `null`.
#[derive(Serialize)]
pub struct StatusView {
    pub node: NodeId,
    pub role: &'static str,
    /// This node's Raft state: `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub state: &'static str,
    pub leader: Option<NodeId>,
    pub term: u64,
    /// The last applied log index.
    pub commit_index: Option<u64>,
    pub last_log_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub cluster: String,
    /// The version the cluster runs, as applied here, and the latest this node offers
    /// (`hashq_raft::version`): they differ in the middle of a rolling upgrade.
    pub cluster_version: u32,
    pub cluster_version_offered: u32,
    pub uptime_s: u64,
    /// Set while damaged durable state is being repaired from the peers (no voting).
    pub repairing: Option<RepairingView>,
    pub disk: DiskView,
    pub counts: CountsView,
    pub queued_iterations: u64,
    pub oldest_queued_age_ms: Option<u64>,
    pub totals: TotalsView,
    pub workers: WorkersView,
    pub members: Vec<MemberView>,
}

/// A repair under way: the log index to reach again, and what was damaged.
#[derive(Serialize)]
pub struct RepairingView {
    pub until: u64,
    pub damage: Option<String>,
}

/// This node's disk and the cluster's disk alarms.
#[derive(Serialize)]
pub struct DiskView {
    pub free_bytes: u64,
    /// Below `--disk-free-limit`.
    pub low: bool,
    pub limit_bytes: u64,
    /// Nodes whose disk alarm is up (enqueues are refused while any is).
    pub alarms: Vec<NodeId>,
}

/// Items by status, now.
#[derive(Serialize)]
pub struct CountsView {
    pub queued: u64,
    pub running: u64,
    pub completed: u64,
    pub pulled: u64,
    pub dead: u64,
    pub cancelled: u64,
    /// The queued items by priority ("0" to "9"), for the priorities that have any.
    pub queued_by_priority: std::collections::BTreeMap<String, u64>,
}

impl CountsView {
    fn new(c: &Counts, t: &Tallies, by_priority: &[(u8, u64)]) -> Self {
        CountsView {
            queued: c.queued,
            running: c.running,
            completed: c.completed,
            pulled: c.pulled,
            dead: c.dead,
            cancelled: t.cancelled,
            queued_by_priority: by_priority
                .iter()
                .map(|(p, n)| (p.to_string(), *n))
                .collect(),
        }
    }
}

/// Cluster-wide totals since the cluster began.
#[derive(Serialize)]
pub struct TotalsView {
    pub enqueued: u64,
    pub completed: u64,
    pub pulled: u64,
    pub expired_leases: u64,
    pub completed_iterations: u64,
    pub cancelled: u64,
    /// Dead or cancelled items put back in the queue.
    pub retried: u64,
}

impl TotalsView {
    fn new(c: &Counts, t: &Tallies) -> Self {
        TotalsView {
            enqueued: c.enqueued_total,
            completed: c.completed_total,
            pulled: c.pulled_total,
            expired_leases: c.expired_total,
            completed_iterations: c.completed_iterations_total,
            cancelled: t.cancelled_total,
            retried: t.retried_total,
        }
    }
}

/// The worker pool and its budget.
#[derive(Serialize)]
pub struct WorkersView {
    /// Managed workers that registered.
    pub running: usize,
    /// Slots reserved whose worker has not registered yet.
    pub launching: usize,
    /// Workers started by hand (no slot of the budget).
    pub external: usize,
    /// The cluster-wide budget; `null` until the first leader sets it.
    pub max: Option<u32>,
    /// This node's launcher: `local`, `ec2` or `none`.
    pub launcher: &'static str,
    /// This node's recent launch failures.
    pub launch_errors: Vec<String>,
    pub list: Vec<WorkerView>,
}

/// One worker slot.
#[derive(Serialize)]
pub struct WorkerView {
    pub id: String,
    pub parent: NodeId,
    pub state: &'static str,
    pub managed: bool,
    pub leased: u32,
    pub completed: u64,
    pub handle: String,
    pub host: String,
    pub last_seen_ms_ago: u64,
}

impl WorkerView {
    fn new(w: &WorkerRecord, now: u64) -> Self {
        WorkerView {
            id: w.id.to_string(),
            parent: w.parent,
            state: w.state.as_str(),
            managed: w.managed,
            leased: w.leased,
            completed: w.completed,
            handle: w.handle.clone(),
            host: w.host.clone(),
            last_seen_ms_ago: now.saturating_sub(w.last_seen),
        }
    }
}

/// One member of the Raft membership, as this node sees it.
#[derive(Serialize)]
pub struct MemberView {
    pub id: NodeId,
    pub addr: String,
    pub voter: bool,
    /// This node's own Raft state; for a peer `leader`, `up` or `unreachable`, from its last
    /// health probe.
    pub state: String,
    /// `endpoint` or `witness`; `unknown` for a peer that did not answer its probe.
    pub role: String,
    /// The last log index the leader knows the member has (on the leader only).
    pub matched_index: Option<u64>,
    /// Entries the member is behind the leader's log (on the leader only): a learner being
    /// added is promoted once it has caught up.
    pub lag: Option<u64>,
    /// The latest cluster version the member offers (from its last health probe): in a
    /// rolling upgrade, the members that hold the cluster at an older version.
    pub cluster_version: Option<u32>,
}

async fn status(State(node): State<Node>) -> Result<Json<StatusView>, ApiError> {
    let m = node.raft().metrics().borrow().clone();
    let view = node.reader().view();
    let meta = machine::read_meta(&view)?;
    let now = node.sm_now(&meta);
    let oldest = machine::oldest_queued(&view, 64)?;
    let workers = machine::workers(&view)?;
    let mut members = Vec::new();
    let membership = m.membership_config.membership().clone();
    for (&id, n) in membership.nodes() {
        let health = (id != node.id())
            .then(|| node.peer_health().get(id))
            .flatten();
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&id).cloned().flatten())
            .map(|l| l.index);
        let state = if id == node.id() {
            state_name(m.state).to_string()
        } else {
            match &health {
                Some(h) if h.leader == Some(id) => "leader".into(),
                Some(_) => "up".into(),
                None => "unreachable".into(),
            }
        };
        let role = match &health {
            Some(h) => h.role.clone(),
            None if id == node.id() => node.config().role.as_str().to_string(),
            None => "unknown".into(),
        };
        members.push(MemberView {
            id,
            addr: n.addr.clone(),
            voter: membership.voter_ids().any(|v| v == id),
            state,
            role,
            matched_index: matched,
            lag: matched.and_then(|at| m.last_log_index.map(|last| last.saturating_sub(at))),
            cluster_version: match &health {
                Some(h) => Some(h.cluster_version),
                None if id == node.id() => Some(node.config().cluster_version_max),
                None => None,
            },
        });
    }
    let c = &meta.counts;
    let t = machine::tallies(&view)?;
    let count = |keep: &dyn Fn(&WorkerRecord) -> bool| workers.iter().filter(|w| keep(w)).count();
    Ok(Json(StatusView {
        node: node.id(),
        role: node.config().role.as_str(),
        state: state_name(m.state),
        leader: m.current_leader,
        term: m.current_term,
        commit_index: m.last_applied.map(|l| l.index),
        last_log_index: m.last_log_index,
        snapshot_index: m.snapshot.map(|l| l.index),
        purged_index: m.purged.map(|l| l.index),
        cluster: node.config().cluster_name.clone(),
        cluster_version: machine::cluster_version(&view)?,
        cluster_version_offered: node.config().cluster_version_max,
        uptime_s: node.started().elapsed().as_secs(),
        repairing: node.repair().until().map(|until| RepairingView {
            until,
            damage: node.repair().damage.clone(),
        }),
        disk: DiskView {
            free_bytes: node.disk().free_bytes.load(Relaxed),
            low: node.disk().low.load(Relaxed),
            limit_bytes: node.config().limits.disk_free_limit,
            alarms: meta.disk_alarms.clone(),
        },
        counts: CountsView::new(c, &t, &machine::queued_by_priority(&view)?),
        queued_iterations: c.queued_iterations,
        oldest_queued_age_ms: oldest.map(|t| now.saturating_sub(t)),
        totals: TotalsView::new(c, &t),
        workers: WorkersView {
            running: count(&|w| w.managed && w.state == WorkerState::Running),
            launching: count(&|w| w.state == WorkerState::Launching),
            external: count(&|w| !w.managed),
            max: meta.max_workers,
            launcher: node.launcher().name(),
            launch_errors: node.launch_errors().clone(),
            list: workers.iter().map(|w| WorkerView::new(w, now)).collect(),
        },
        members,
    }))
}

async fn metrics(State(node): State<Node>) -> Result<Response, ApiError> {
    let m = node.raft().metrics().borrow().clone();
    let view = node.reader().view();
    let meta = machine::read_meta(&view)?;
    let workers = machine::workers(&view)?;
    let c = &meta.counts;
    let t = machine::tallies(&view)?;
    let id = node.id();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let sep = if labels.is_empty() { "" } else { "," };
            let _ = writeln!(out, "{name}{{node=\"{id}\"{sep}{labels}}} {value}");
        }
    };
    metric("hashq_up", "gauge", "The node is serving.", &[("", 1)]);
    metric(
        "hashq_raft_is_leader",
        "gauge",
        "1 on the leader.",
        &[("", u64::from(m.state == ServerState::Leader))],
    );
    metric(
        "hashq_raft_term",
        "gauge",
        "Current Raft term.",
        &[("", m.current_term)],
    );
    metric(
        "hashq_raft_last_log_index",
        "gauge",
        "Last log index on this node.",
        &[("", m.last_log_index.unwrap_or(0))],
    );
    metric(
        "hashq_raft_applied_index",
        "gauge",
        "Last applied log index.",
        &[("", m.last_applied.map_or(0, |l| l.index))],
    );
    metric(
        "hashq_items",
        "gauge",
        "Items by status.",
        &[
            ("status=\"queued\"", c.queued),
            ("status=\"running\"", c.running),
            ("status=\"completed\"", c.completed),
            ("status=\"pulled\"", c.pulled),
            ("status=\"dead\"", c.dead),
            ("status=\"cancelled\"", t.cancelled),
        ],
    );
    let by_priority = machine::queued_by_priority(&view)?;
    let labels: Vec<String> = by_priority
        .iter()
        .map(|(p, _)| format!("priority=\"{p}\""))
        .collect();
    let samples: Vec<(&str, u64)> = labels
        .iter()
        .zip(&by_priority)
        .map(|(l, (_, n))| (l.as_str(), *n))
        .collect();
    metric(
        "hashq_queued_by_priority",
        "gauge",
        "Queued items by priority (0 to 9, higher first; the priorities that have any).",
        &samples,
    );
    metric(
        "hashq_queued_iterations",
        "gauge",
        "Hashing work waiting in the queue.",
        &[("", c.queued_iterations)],
    );
    metric(
        "hashq_payload_bytes",
        "gauge",
        "Payload bytes of unfinished items.",
        &[("", c.payload_bytes)],
    );
    metric(
        "hashq_pulls_waiting",
        "gauge",
        "Long-polling pulls (wait=) waiting on this node for a result, now.",
        &[("", node.stats().pulls_waiting.load(Relaxed))],
    );
    metric(
        "hashq_enqueued_total",
        "counter",
        "Items ever enqueued (cluster-wide).",
        &[("", c.enqueued_total)],
    );
    metric(
        "hashq_completed_total",
        "counter",
        "Items ever completed (cluster-wide).",
        &[("", c.completed_total)],
    );
    metric(
        "hashq_pulled_total",
        "counter",
        "Items ever pulled (cluster-wide).",
        &[("", c.pulled_total)],
    );
    metric(
        "hashq_expired_leases_total",
        "counter",
        "Leases that ran out or whose worker was lost.",
        &[("", c.expired_total)],
    );
    metric(
        "hashq_cancelled_total",
        "counter",
        "Items ever cancelled (cluster-wide).",
        &[("", t.cancelled_total)],
    );
    metric(
        "hashq_retried_total",
        "counter",
        "Dead or cancelled items ever put back in the queue (cluster-wide).",
        &[("", t.retried_total)],
    );
    metric(
        "hashq_completed_iterations_total",
        "counter",
        "SHA-512 iterations completed (cluster-wide).",
        &[("", c.completed_iterations_total)],
    );
    metric(
        "hashq_workers",
        "gauge",
        "Workers by state.",
        &[
            (
                "state=\"launching\"",
                workers
                    .iter()
                    .filter(|w| w.state == WorkerState::Launching)
                    .count() as u64,
            ),
            (
                "state=\"running\"",
                workers
                    .iter()
                    .filter(|w| w.state == WorkerState::Running)
                    .count() as u64,
            ),
        ],
    );
    metric(
        "hashq_max_workers",
        "gauge",
        "The cluster-wide worker budget.",
        &[("", u64::from(meta.max_workers.unwrap_or(0)))],
    );
    let s = &node.stats();
    metric(
        "hashq_http_requests_total",
        "counter",
        "Requests served by this node.",
        &[("", s.requests.load(Relaxed))],
    );
    metric(
        "hashq_http_errors_total",
        "counter",
        "Error answers by this node.",
        &[
            ("class=\"4xx\"", s.client_errors.load(Relaxed)),
            ("class=\"5xx\"", s.server_errors.load(Relaxed)),
        ],
    );
    metric(
        "hashq_node_enqueued_total",
        "counter",
        "Items enqueued through this node.",
        &[("", s.enqueued.load(Relaxed))],
    );
    metric(
        "hashq_node_pulled_total",
        "counter",
        "Items pulled through this node.",
        &[("", s.pulled.load(Relaxed))],
    );
    metric(
        "hashq_store_disk_bytes",
        "gauge",
        "Size of this node's store on disk.",
        &[("", node.reader().disk_bytes())],
    );
    metric(
        "hashq_disk_free_bytes",
        "gauge",
        "Free space on the data dir's file system.",
        &[("", node.disk().free_bytes.load(Relaxed))],
    );
    metric(
        "hashq_disk_alarm",
        "gauge",
        "1 while this node's disk is below --disk-free-limit; the cluster's alarms by node.",
        &[("", u64::from(node.disk().low.load(Relaxed)))],
    );
    metric(
        "hashq_cluster_disk_alarms",
        "gauge",
        "Nodes whose disk alarm is up (enqueues are refused while any is).",
        &[("", meta.disk_alarms.len() as u64)],
    );
    metric(
        "hashq_repairing",
        "gauge",
        "1 while this node repairs damaged durable state from its peers (it does not vote).",
        &[("", u64::from(node.repair().until().is_some()))],
    );
    metric(
        "hashq_elections_total",
        "counter",
        "Raft terms this node has seen begin.",
        &[("", node.metrics().elections.load(Relaxed))],
    );
    metric(
        "hashq_raft_append_rpcs_received_total",
        "counter",
        "Raft append RPCs this node received with entries (heartbeats not counted).",
        &[("", node.metrics().append_rpcs.load(Relaxed))],
    );
    metric(
        "hashq_raft_append_entries_received_total",
        "counter",
        "Log entries those append RPCs carried.",
        &[("", node.metrics().append_entries.load(Relaxed))],
    );
    let snapshots = node.reader().snapshot_stats();
    metric(
        "hashq_snapshots_built_total",
        "counter",
        "Snapshots this node built.",
        &[("", snapshots.built)],
    );
    metric(
        "hashq_snapshots_installed_total",
        "counter",
        "Snapshots this node installed from a leader.",
        &[("", snapshots.installed)],
    );
    metric(
        "hashq_snapshot_bytes",
        "gauge",
        "Size of the last snapshot this node built.",
        &[("", snapshots.last_bytes)],
    );
    let mut float = |name: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{node=\"{id}\"}} {value}"
        );
    };
    float(
        "hashq_snapshot_build_seconds",
        "How long the last snapshot build took.",
        snapshots.last_build_seconds,
    );
    float(
        "hashq_snapshot_install_seconds",
        "How long the last snapshot install took.",
        snapshots.last_install_seconds,
    );
    float(
        "hashq_leader_clock_skew_ms",
        "The leader's wall clock minus this node's, at the last applied command.",
        node.metrics().leader_clock_skew_ms.load(Relaxed) as f64,
    );
    if let Some(replication) = &m.replication {
        let last = m.last_log_index.unwrap_or(0);
        let _ = writeln!(
            out,
            "# HELP hashq_follower_lag_entries Entries the leader has that a follower has not acknowledged.\n# TYPE hashq_follower_lag_entries gauge"
        );
        for (follower, matched) in replication {
            let lag = last.saturating_sub(matched.map_or(0, |l| l.index));
            let _ = writeln!(
                out,
                "hashq_follower_lag_entries{{node=\"{id}\",follower=\"{follower}\"}} {lag}"
            );
        }
    }
    let labels = format!("node=\"{id}\"");
    let nm = &node.metrics();
    nm.fsync.render(
        &mut out,
        "hashq_fsync_seconds",
        "fdatasync/fsync of the store's files.",
        &labels,
    );
    nm.commit.render(
        &mut out,
        "hashq_commit_seconds",
        "From proposing a batch to its answer, on the leader.",
        &labels,
    );
    nm.apply.render(
        &mut out,
        "hashq_apply_seconds",
        "One apply call of the state machine.",
        &labels,
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
