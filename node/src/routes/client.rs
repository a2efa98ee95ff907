//! The client API: the exercise's two routes, item status, cluster status, metrics, health.

use std::fmt::Write as _;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hashq_raft::command::{Dedup, Request, Response as SmResponse};
use hashq_raft::machine;
use hashq_raft::types::{Item, Status, WorkerState};
use hashq_raft::wire::Health;
use hashq_raft::WorkId;
use openraft::ServerState;
use serde::Serialize;
use serde_json::json;

use super::{count_param, query_pairs, serves_clients};
use crate::error::ApiError;
use crate::node::{Node, Stats};

/// Header set on a follower's forwarded read, so it is never forwarded twice.
const FORWARDED: &str = "x-hashq-forwarded";
/// Longest idempotency key accepted from a client.
const MAX_KEY_LEN: usize = 200;
/// The client API proper: enqueue, pull, item status, and the observability routes that
/// show the queue (`/status`, `/metrics`). Behind the client token when one is set.
pub fn api_router() -> Router<Node> {
    Router::new()
        .route("/enqueue", put(enqueue))
        .route("/pullCompleted", post(pull_completed))
        .route("/work/{id}", get(work))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
}

/// Routes open to anyone: liveness, the dashboard page (which fetches `/status` with the
/// client token the user gives it) and the OpenAPI document.
pub fn public_router() -> Router<Node> {
    Router::new()
        .route("/health", get(health))
        .route("/", get(dashboard))
        .route("/openapi.json", get(openapi))
}

/// The `Idempotency-Key` header, checked.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| {
            !k.is_empty() && k.len() <= MAX_KEY_LEN && k.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            ApiError::invalid(
                "invalid_idempotency_key",
                format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters"),
            )
        })?;
    Ok(Some(key.to_string()))
}

/// The dedup record for a proposal: the client's key, or one of our own so retries are safe.
fn dedup(node: &Node, client_key: Option<String>, kind: &str) -> Dedup {
    match client_key {
        Some(k) => Dedup {
            key: format!("c:{kind}:{k}"),
            ttl_ms: node.config.timing.idempotency_retention.as_millis() as u64,
        },
        None => Dedup {
            key: format!("n{}:{:032x}", node.id(), rand::random::<u128>()),
            ttl_ms: node.config.timing.internal_key_ttl.as_millis() as u64,
        },
    }
}

#[derive(Serialize)]
struct Enqueued {
    work_id: String,
}

async fn enqueue(
    State(node): State<Node>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    payload: Bytes,
) -> Result<Response, ApiError> {
    serves_clients(&node)?;
    let limits = &node.config.limits;
    let iterations = count_param(
        &query_pairs(query.as_deref()),
        "iterations",
        limits.max_iterations,
    )?;
    let key = idempotency_key(&headers)?;
    // A fast answer when the backlog is clearly full; the state machine decides exactly, at
    // apply, so concurrent enqueues never overshoot.
    let meta = machine::read_meta(&node.reader.view())?;
    if !meta.disk_alarms.is_empty() {
        return Err(ApiError::DiskFull {
            nodes: meta.disk_alarms,
        });
    }
    let (items, bytes) = machine::stored(&meta.counts);
    if items >= limits.max_backlog || bytes >= limits.max_backlog_bytes {
        return Err(ApiError::BacklogFull { items, bytes });
    }
    let request = Request::Enqueue {
        iterations,
        payload,
        // Without a client key the proposer gives the request a slot in its batch's key.
        dedup: key.map(|k| dedup(&node, Some(k), "enqueue")),
    };
    match node.proposer.submit(request).await?.response {
        SmResponse::Enqueued { id, duplicate } => {
            Stats::add(&node.stats.enqueued, u64::from(!duplicate));
            let mut response = Json(Enqueued {
                work_id: id.to_string(),
            })
            .into_response();
            if duplicate {
                response
                    .headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
            }
            Ok(response)
        }
        other => Err(ApiError::unexpected(other)),
    }
}

#[derive(Serialize)]
struct Pulled {
    work_id: String,
    value: String,
}

async fn pull_completed(
    State(node): State<Node>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<Vec<Pulled>>, ApiError> {
    serves_clients(&node)?;
    let top = count_param(
        &query_pairs(query.as_deref()),
        "top",
        node.config.limits.max_top,
    )?;
    let key = idempotency_key(&headers)?;
    let request = Request::Take {
        top,
        dedup: Some(dedup(&node, key, "pull")),
    };
    match node.proposer.submit(request).await?.response {
        SmResponse::Taken { items, replay } => {
            if !replay {
                Stats::add(&node.stats.pulled, items.len() as u64);
            }
            Ok(Json(
                items
                    .into_iter()
                    .map(|(id, value)| Pulled {
                        work_id: id.to_string(),
                        value: hex::encode(value.as_slice()),
                    })
                    .collect(),
            ))
        }
        other => Err(ApiError::unexpected(other)),
    }
}

/// `GET /work/{id}` as the API shows it.
#[derive(Serialize)]
struct WorkView {
    work_id: String,
    status: &'static str,
    iterations: u32,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    payload_bytes: u32,
    enqueued_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    completed_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pulled_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_deadline_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_reason: Option<String>,
}

impl WorkView {
    fn new(id: WorkId, item: Item) -> Self {
        WorkView {
            work_id: id.to_string(),
            status: item.status.as_str(),
            iterations: item.iterations,
            attempts: item.attempts,
            value: item.value.map(|v| hex::encode(v.as_slice())),
            payload_bytes: item.payload_len,
            enqueued_at_ms: item.enqueued_at,
            completed_at_ms: item.completed_at,
            pulled_at_ms: item.pulled_at,
            lease_deadline_ms: item
                .lease
                .filter(|_| item.status == Status::Running)
                .map(|l| l.deadline),
            dead_reason: item.dead_reason,
        }
    }
}

async fn work(
    State(node): State<Node>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serves_clients(&node)?;
    let work_id = parse_work_id(id)?;
    // A linearizable read: on the leader after confirming leadership, else at the leader.
    let confirmed = tokio::time::timeout(
        node.config.timing.request_timeout,
        node.raft.ensure_linearizable(),
    )
    .await
    .map_err(|_| ApiError::NoLeader {
        reason: "leadership could not be confirmed by a majority in time".into(),
    })?;
    match confirmed {
        Ok(_) => {
            let item = machine::item(&node.reader.view(), work_id)?
                .ok_or_else(|| ApiError::NotFound(format!("no work item {work_id}")))?;
            Ok(Json(WorkView::new(work_id, item)).into_response())
        }
        Err(_) if headers.contains_key(FORWARDED) => Err(ApiError::NoLeader {
            reason: "leadership moved while the read was forwarded".into(),
        }),
        Err(_) => forward_read(&node, &format!("/work/{work_id}"), &headers).await,
    }
}

/// A work id from the path: a decimal number. A path that is not even UTF-8 (`/work/%FF`)
/// gets the same JSON error as any other bad id.
fn parse_work_id(id: Result<Path<String>, PathRejection>) -> Result<WorkId, ApiError> {
    let bad = |shown: &str| {
        ApiError::invalid(
            "invalid_work_id",
            format!("`{shown}` is not a work id (a whole number)"),
        )
    };
    let Path(id) = id.map_err(|_| bad("the path"))?;
    if id.is_empty() || id.len() > 20 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(&id.chars().take(40).collect::<String>()));
    }
    id.parse().map_err(|_| bad(&id))
}

/// Relays a read to the leader and its answer back.
async fn forward_read(node: &Node, path: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    let (leader, addr) = node.proposer.leader().ok_or_else(|| ApiError::NoLeader {
        reason: "no leader to read from".into(),
    })?;
    Stats::add(&node.stats.forwarded_reads, 1);
    let mut request = node
        .http
        .get(format!("http://{addr}{path}"))
        .header(FORWARDED, node.id().to_string())
        .timeout(node.config.timing.request_timeout);
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        request = request.header(header::AUTHORIZATION, auth.clone());
    }
    let answer = request
        .send()
        .await
        .map_err(|e| ApiError::Unavailable(format!("leader {leader} did not answer: {e}")))?;
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let retry_after = answer.headers().get(header::RETRY_AFTER).cloned();
    let body = answer
        .bytes()
        .await
        .map_err(|e| ApiError::Unavailable(format!("leader {leader} did not answer: {e}")))?;
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(v) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Ok(response)
}

/// The live dashboard: plain HTML and JS that polls `/status` (no build step).
async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

/// The OpenAPI document of the client and admin routes.
/// The OpenAPI document, with this node's limits in it (`--max-iterations`, `--max-top`,
/// `--max-body-bytes`), so a client or a fuzzer reading it knows exactly what is accepted.
async fn openapi(State(node): State<Node>) -> Response {
    let limits = &node.config.limits;
    let mut doc: serde_json::Value =
        serde_json::from_str(include_str!("openapi.json")).unwrap_or_default();
    let mut set = |pointer: &str, value: serde_json::Value| {
        if let Some(slot) = doc.pointer_mut(pointer) {
            *slot = value;
        }
    };
    set(
        "/paths/~1enqueue/put/parameters/0/schema/maximum",
        json!(limits.max_iterations),
    );
    set(
        "/paths/~1enqueue/put/requestBody/content/application~1octet-stream/schema/maxLength",
        json!(limits.max_body_bytes),
    );
    set(
        "/paths/~1pullCompleted/post/parameters/0/schema/maximum",
        json!(limits.max_top),
    );
    ([(header::CONTENT_TYPE, "application/json")], Json(doc)).into_response()
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

async fn health(State(node): State<Node>) -> Json<Health> {
    let m = node.raft.metrics().borrow().clone();
    Json(Health {
        node: node.id(),
        role: node.config.role.as_str().to_string(),
        leader: m.current_leader,
        term: m.current_term,
        cluster: node.config.cluster_name.clone(),
        launcher: node.launcher.name().to_string(),
        incarnation: node.incarnation,
    })
}

async fn status(State(node): State<Node>) -> Result<Json<serde_json::Value>, ApiError> {
    let m = node.raft.metrics().borrow().clone();
    let view = node.reader.view();
    let meta = machine::read_meta(&view)?;
    let now = node.sm_now(&meta);
    let oldest = machine::oldest_queued(&view, 64)?;
    let workers = machine::workers(&view)?;
    let mut members = Vec::new();
    let membership = m.membership_config.membership().clone();
    for (&id, n) in membership.nodes() {
        let addr = n.addr.clone();
        let health = (id != node.id())
            .then(|| node.peer_health.get(id))
            .flatten();
        let voter = membership.voter_ids().any(|v| v == id);
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
        members.push(json!({
            "id": id,
            "addr": addr,
            "voter": voter,
            "state": state,
            "role": health.as_ref().map(|h| h.role.clone()).unwrap_or_else(|| if id == node.id() { node.config.role.as_str().to_string() } else { "unknown".into() }),
            "matched_index": matched,
        }));
    }
    let worker_list: Vec<_> = workers
        .iter()
        .map(|w| {
            json!({
                "id": w.id.to_string(),
                "parent": w.parent,
                "state": w.state.as_str(),
                "managed": w.managed,
                "leased": w.leased,
                "completed": w.completed,
                "handle": w.handle,
                "host": w.host,
                "last_seen_ms_ago": now.saturating_sub(w.last_seen),
            })
        })
        .collect();
    let c = &meta.counts;
    Ok(Json(json!({
        "node": node.id(),
        "role": node.config.role.as_str(),
        "state": state_name(m.state),
        "leader": m.current_leader,
        "term": m.current_term,
        "commit_index": m.last_applied.map(|l| l.index),
        "last_log_index": m.last_log_index,
        "snapshot_index": m.snapshot.map(|l| l.index),
        "purged_index": m.purged.map(|l| l.index),
        "cluster": node.config.cluster_name,
        "uptime_s": node.started.elapsed().as_secs(),
        // Set while damaged durable state is being repaired from the peers (no voting).
        "repairing": node.repair.until().map(|until| json!({
            "until": until,
            "damage": node.repair.damage,
        })),
        "disk": {
            "free_bytes": node.disk.free_bytes.load(std::sync::atomic::Ordering::Relaxed),
            "low": node.disk.low.load(std::sync::atomic::Ordering::Relaxed),
            "limit_bytes": node.config.limits.disk_free_limit,
            "alarms": meta.disk_alarms,
        },
        "counts": {
            "queued": c.queued,
            "running": c.running,
            "completed": c.completed,
            "pulled": c.pulled,
            "dead": c.dead,
        },
        "queued_iterations": c.queued_iterations,
        "oldest_queued_age_ms": oldest.map(|t| now.saturating_sub(t)),
        "totals": {
            "enqueued": c.enqueued_total,
            "completed": c.completed_total,
            "pulled": c.pulled_total,
            "expired_leases": c.expired_total,
            "completed_iterations": c.completed_iterations_total,
        },
        "workers": {
            "running": workers.iter().filter(|w| w.managed && w.state == WorkerState::Running).count(),
            "launching": workers.iter().filter(|w| w.state == WorkerState::Launching).count(),
            "external": workers.iter().filter(|w| !w.managed).count(),
            "max": meta.max_workers,
            "launcher": node.launcher.name(),
            "launch_errors": *node.launch_errors.lock().unwrap_or_else(|p| p.into_inner()),
            "list": worker_list,
        },
        "members": members,
    })))
}

async fn metrics(State(node): State<Node>) -> Result<Response, ApiError> {
    use std::sync::atomic::Ordering::Relaxed;
    let m = node.raft.metrics().borrow().clone();
    let view = node.reader.view();
    let meta = machine::read_meta(&view)?;
    let workers = machine::workers(&view)?;
    let c = &meta.counts;
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
        ],
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
    let s = &node.stats;
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
        &[("", node.reader.disk_bytes())],
    );
    metric(
        "hashq_disk_free_bytes",
        "gauge",
        "Free space on the data dir's file system.",
        &[("", node.disk.free_bytes.load(Relaxed))],
    );
    metric(
        "hashq_disk_alarm",
        "gauge",
        "1 while this node's disk is below --disk-free-limit; the cluster's alarms by node.",
        &[("", u64::from(node.disk.low.load(Relaxed)))],
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
        &[("", u64::from(node.repair.until().is_some()))],
    );
    metric(
        "hashq_elections_total",
        "counter",
        "Raft terms this node has seen begin.",
        &[("", node.metrics.elections.load(Relaxed))],
    );
    metric(
        "hashq_raft_append_rpcs_received_total",
        "counter",
        "Raft append RPCs this node received with entries (heartbeats not counted).",
        &[("", node.metrics.append_rpcs.load(Relaxed))],
    );
    metric(
        "hashq_raft_append_entries_received_total",
        "counter",
        "Log entries those append RPCs carried.",
        &[("", node.metrics.append_entries.load(Relaxed))],
    );
    let snapshots = node.reader.snapshot_stats();
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
        node.metrics.leader_clock_skew_ms.load(Relaxed) as f64,
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
    let nm = &node.metrics;
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
