//! The client API: the exercise's two routes (`PUT /enqueue`, `POST /pullCompleted`) and
//! an item's status (`GET /work/{id}`), read at the leader. Cluster status, metrics and
//! health are in [`super::observability`], the dashboard page and the OpenAPI document in
//! [`super::assets`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hashq_proto::api::{Enqueued, Pulled, WorkView};
use hashq_proto::headers::{FORWARDED, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
use hashq_proto::routes::client::{
    self as routes, ENQUEUE, PULL_COMPLETED, WORK, WORK_LIST, WORK_RETRY,
};
use hashq_raft::command::{BatchItem, Dedup, Request, Response as SmResponse};
use hashq_raft::machine;
use hashq_raft::types::{Item, Status, DEFAULT_PRIORITY};
use hashq_raft::version;
use hashq_raft::WorkId;

use super::{count_param, priority_param, query_pairs, serves_clients, wait_param};
use crate::error::ApiError;
use crate::node::{Node, Stats};

/// Longest idempotency key accepted from a client.
const MAX_KEY_LEN: usize = 200;
/// The client API proper: enqueue, pull, item status. Behind the client token when one is
/// set.
pub fn router() -> Router<Node> {
    Router::new()
        .route(ENQUEUE, put(enqueue))
        .route(PULL_COMPLETED, post(pull_completed))
        .route(WORK, get(work).delete(super::work::cancel))
        .route(WORK_RETRY, post(super::work::retry))
        .route(WORK_LIST, get(super::work::list))
}

/// The `Idempotency-Key` header, checked.
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
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

/// The `Idempotency-Key` header as an extractor, checked ([`idempotency_key`]), without the
/// copy of every header that taking the whole `HeaderMap` makes. The handler reports a bad
/// key where it always did, after the checks that come first.
pub(super) struct IdempotencyKey(pub Result<Option<String>, ApiError>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(IdempotencyKey(idempotency_key(&parts.headers)))
    }
}

/// A fast answer when the backlog is clearly full or a disk is short; the state machine
/// decides exactly, at apply, so concurrent enqueues never overshoot.
pub(super) fn refuse_when_full(node: &Node) -> Result<(), ApiError> {
    let limits = &node.config().limits;
    let meta = machine::read_meta(&node.reader().view())?;
    if !meta.disk_alarms.is_empty() {
        return Err(ApiError::DiskFull {
            nodes: meta.disk_alarms,
        });
    }
    let (items, bytes) = machine::stored(&meta.counts);
    if items >= limits.max_backlog || bytes >= limits.max_backlog_bytes {
        return Err(ApiError::BacklogFull { items, bytes });
    }
    Ok(())
}

/// The dedup record for a proposal: the client's key, or one of our own so retries are safe.
pub(super) fn dedup(node: &Node, client_key: Option<String>, kind: &str) -> Dedup {
    match client_key {
        Some(k) => Dedup {
            key: format!("c:{kind}:{k}"),
            ttl_ms: node.config().timing.idempotency_retention.as_millis() as u64,
        },
        None => Dedup {
            key: crate::proposer::draw_key(node.id()),
            ttl_ms: node.config().timing.internal_key_ttl.as_millis() as u64,
        },
    }
}

async fn enqueue(
    State(node): State<Node>,
    RawQuery(query): RawQuery,
    IdempotencyKey(key): IdempotencyKey,
    payload: Bytes,
) -> Result<Response, ApiError> {
    serves_clients(&node)?;
    let limits = &node.config().limits;
    let pairs = query_pairs(query.as_deref());
    let iterations = count_param(&pairs, "iterations", limits.max_iterations)?;
    let key = key?;
    let priority = priority_param(&pairs)?;
    refuse_when_full(&node)?;
    if let Some(priority) = priority.filter(|p| *p != DEFAULT_PRIORITY) {
        // An item of another priority is a batch of one (cluster version 4).
        super::work::require_version(&node, "priority", version::BATCH)?;
        let request = Request::EnqueueBatch {
            items: vec![BatchItem {
                iterations,
                priority,
                payload,
            }],
            dedup: dedup(&node, key, "batch"),
        };
        return match node.proposer().submit(request).await?.response {
            SmResponse::EnqueuedBatch { ids, duplicate } if ids.len() == 1 => {
                Stats::add(&node.stats().enqueued, u64::from(!duplicate));
                let answer = Enqueued {
                    work_id: ids[0].to_string(),
                };
                Ok(replayable(answer, duplicate))
            }
            other => Err(ApiError::unexpected(other)),
        };
    }
    let request = Request::Enqueue {
        iterations,
        payload,
        // Without a client key the proposer gives the request a slot in its batch's key.
        dedup: key.map(|k| dedup(&node, Some(k), "enqueue")),
    };
    match node.proposer().submit(request).await?.response {
        SmResponse::Enqueued { id, duplicate } => {
            Stats::add(&node.stats().enqueued, u64::from(!duplicate));
            let answer = Enqueued {
                work_id: id.to_string(),
            };
            Ok(replayable(answer, duplicate))
        }
        other => Err(ApiError::unexpected(other)),
    }
}

/// `answer` as JSON, marked `Idempotent-Replayed: true` when its key matched an earlier
/// request (`duplicate`).
pub(super) fn replayable(answer: impl serde::Serialize, duplicate: bool) -> Response {
    let mut response = Json(answer).into_response();
    if duplicate {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

async fn pull_completed(
    State(node): State<Node>,
    RawQuery(query): RawQuery,
    IdempotencyKey(key): IdempotencyKey,
) -> Result<Json<Vec<Pulled>>, ApiError> {
    serves_clients(&node)?;
    let pairs = query_pairs(query.as_deref());
    let top = count_param(&pairs, "top", node.config().limits.max_top)?;
    let wait = wait_param(&pairs, node.config().limits.max_wait)?;
    let key = key?;
    if wait > Duration::ZERO && key.is_none() {
        return Err(ApiError::invalid(
            "idempotency_key_required",
            "a waiting pull (wait=...) needs an Idempotency-Key: a take whose answer is lost is recovered by retrying under its key",
        ));
    }
    let dedup = dedup(&node, key, "pull");
    if wait > Duration::ZERO && !ready_to_take(&node, &dedup.key, wait).await? {
        // Nothing was taken: the wait ended first.
        return Ok(Json(Vec::new()));
    }
    let request = Request::Take {
        top,
        dedup: Some(dedup),
    };
    match node.proposer().submit(request).await?.response {
        SmResponse::Taken { items, replay } => {
            if !replay {
                Stats::add(&node.stats().pulled, items.len() as u64);
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

/// Whether a waiting pull should take now: results are ready (as this node has applied), or
/// its key was used already (a retry after a lost answer takes nothing new: it gets what the
/// first call took). Otherwise it waits for an apply that makes it so, woken by applies
/// only, and answers `false` when `wait` ends. If the client goes away meanwhile, the
/// connection drops this request and nothing is proposed: a take happens only for a client
/// still there to get its answer.
async fn ready_to_take(node: &Node, dedup_key: &str, wait: Duration) -> Result<bool, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut applied = node.reader().subscribe();
    let _waiting = Waiting::new(node);
    loop {
        {
            let view = node.reader().view();
            if machine::read_meta(&view)?.counts.completed > 0
                || machine::take_key_used(&view, dedup_key)?
            {
                return Ok(true);
            }
        }
        if !next_apply(&mut applied, deadline).await {
            return Ok(false);
        }
    }
}

/// Waits for this node's next apply: `false` if `deadline` comes first (or the node stops).
/// What a waiting request waits on: it costs no CPU until then.
async fn next_apply(
    applied: &mut tokio::sync::watch::Receiver<hashq_storage::AppliedState>,
    deadline: tokio::time::Instant,
) -> bool {
    tokio::select! {
        changed = applied.changed() => changed.is_ok(),
        () = tokio::time::sleep_until(deadline) => false,
    }
}

/// Counts a waiting pull in [`Stats::pulls_waiting`] while it lives.
struct Waiting<'n>(&'n Node);

impl<'n> Waiting<'n> {
    fn new(node: &'n Node) -> Self {
        node.stats().pulls_waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(node)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.stats().pulls_waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /work/{id}` as the API shows it.
pub(super) fn work_view(
    view: &impl hashq_raft::kv::KvRead,
    id: WorkId,
    item: Item,
) -> Result<WorkView, ApiError> {
    Ok(WorkView {
        work_id: id.to_string(),
        status: item.status.as_str().to_string(),
        iterations: item.iterations,
        priority: machine::priority(view, id)?,
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
    })
}

async fn work(
    State(node): State<Node>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serves_clients(&node)?;
    let work_id = parse_work_id(id)?;
    let wait = wait_param(
        &query_pairs(query.as_deref()),
        node.config().limits.max_wait,
    )?;
    let path = match query.as_deref() {
        Some(q) if wait > Duration::ZERO => format!("{}?{q}", routes::work(work_id)),
        _ => routes::work(work_id),
    };
    if let Some(relayed) = at_leader(&node, &headers, &path, wait).await? {
        return Ok(relayed);
    }
    let item = wait_for_final(&node, work_id, wait).await?;
    Ok(Json(work_view(&node.reader().view(), work_id, item)?).into_response())
}

/// Where a linearizable read is served: here once this node has confirmed it leads
/// (`None`: read the local state now), else at the leader, whose answer to `path` is relayed
/// (`wait`: how long the leader may hold it).
pub(super) async fn at_leader(
    node: &Node,
    headers: &HeaderMap,
    path: &str,
    wait: Duration,
) -> Result<Option<Response>, ApiError> {
    let confirmed = tokio::time::timeout(
        node.config().timing.request_timeout,
        node.raft().ensure_linearizable(),
    )
    .await
    .map_err(|_| ApiError::NoLeader {
        reason: "leadership could not be confirmed by a majority in time".into(),
    })?;
    match confirmed {
        Ok(_) => Ok(None),
        Err(_) if headers.contains_key(FORWARDED) => Err(ApiError::NoLeader {
            reason: "leadership moved while the read was forwarded".into(),
        }),
        Err(_) => forward_read(node, path, headers, wait).await.map(Some),
    }
}

/// The item as of now, or, when it is not final yet (`queued`, `running`), as soon as an
/// apply makes it final or `wait` ends, whichever comes first. Woken by applies only: a
/// waiting request costs no CPU between them. Once leadership was confirmed at the start,
/// each later state this node applies is a committed one, so the answer stays a valid
/// read of the item (at worst, after a leader change, one that is `wait` old).
async fn wait_for_final(node: &Node, work_id: WorkId, wait: Duration) -> Result<Item, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut applied = node.reader().subscribe();
    loop {
        let item = machine::item(&node.reader().view(), work_id)?
            .ok_or_else(|| ApiError::NotFound(format!("no work item {work_id}")))?;
        if item.status.is_final() {
            return Ok(item);
        }
        if !next_apply(&mut applied, deadline).await {
            return Ok(item);
        }
    }
}

/// A work id from the path: a decimal number. A path that is not even UTF-8 (`/work/%FF`)
/// gets the same JSON error as any other bad id.
pub(super) fn parse_work_id(id: Result<Path<String>, PathRejection>) -> Result<WorkId, ApiError> {
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

/// Relays a read to the leader and its answer back; `wait` is how long the leader may hold
/// it (a long poll) before its usual time.
async fn forward_read(
    node: &Node,
    path: &str,
    headers: &HeaderMap,
    wait: Duration,
) -> Result<Response, ApiError> {
    let (leader, addr) = node.proposer().leader().ok_or_else(|| ApiError::NoLeader {
        reason: "no leader to read from".into(),
    })?;
    Stats::add(&node.stats().forwarded_reads, 1);
    let mut request = node
        .http()
        .get(node.peers().url(&addr, path))
        .header(FORWARDED, node.id().to_string())
        .timeout(node.config().timing.request_timeout + wait);
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
