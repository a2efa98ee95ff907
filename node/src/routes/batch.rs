//! `POST /enqueue/batch` (cluster version 4): many items in one request, one Raft proposal
//! and one log entry, added all together or not at all.
//!
//! The body is `multipart/form-data`, what `curl -F f=@a.bin -F f=@b.bin` sends: every file
//! part (whatever its name) and every part named `f` is one item, its bytes the payload, in
//! order. A text part named `iterations` sets the iterations of the parts after it
//! (`-F iterations=5 -F f=@a.bin`), one named `priority` their priority; the query's
//! `iterations` and `priority` (default 5) are the defaults before any. Any
//! other part is refused (`unknown_part`): a mistyped setting is never taken for an item. The answer lists the work ids in part order; an
//! `Idempotency-Key` covers the whole batch, so a retry after a lost answer gets the same
//! ids and adds nothing. Bounded by `--max-batch-items` and `--max-batch-bytes` (payloads
//! of all parts together); the body may carry a little more for the parts' headers.

use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{RawQuery, State};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use hashq_proto::api::EnqueuedBatch;
use hashq_proto::routes::client::ENQUEUE_BATCH;
use hashq_raft::command::{BatchItem, Request, Response as SmResponse};
use hashq_raft::types::DEFAULT_PRIORITY;
use hashq_raft::version;

use super::client::{dedup, refuse_when_full, replayable, IdempotencyKey};
use super::work::require_version;
use super::{count_param, priority_param, priority_value, query_pairs, ranged, serves_clients};
use crate::config::Limits;
use crate::error::ApiError;
use crate::node::{Node, Stats};

/// The name of a text part that sets the iterations of the parts after it.
const ITERATIONS_FIELD: &str = "iterations";
/// The name of a text part that sets the priority of the parts after it.
const PRIORITY_FIELD: &str = "priority";
/// The name of an item's part when it is not a file (a file's part may have any name).
const ITEM_FIELD: &str = "f";

pub fn router() -> Router<Node> {
    Router::new().route(ENQUEUE_BATCH, post(enqueue_batch))
}

/// The body limit of the batch route: its payloads, plus room for each part's headers.
pub fn body_limit(limits: &Limits) -> usize {
    limits.max_batch_bytes + limits.max_batch_items * 1024 + (64 << 10)
}

async fn enqueue_batch(
    State(node): State<Node>,
    RawQuery(query): RawQuery,
    IdempotencyKey(key): IdempotencyKey,
    body: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    serves_clients(&node)?;
    let limits = &node.config().limits;
    let pairs = query_pairs(query.as_deref());
    let default = match pairs.iter().any(|(k, _)| k == ITERATIONS_FIELD) {
        true => Some(count_param(
            &pairs,
            ITERATIONS_FIELD,
            limits.max_iterations,
        )?),
        false => None,
    };
    let priority = priority_param(&pairs)?.unwrap_or(DEFAULT_PRIORITY);
    let key = key?;
    let body = body.map_err(|e| {
        ApiError::UnsupportedMediaType(format!(
            "the body must be multipart/form-data with a boundary (curl -F f=@FILE ...): {e}"
        ))
    })?;
    let items = parts(body, default, priority, limits).await?;
    require_version(&node, "batch enqueue", version::BATCH)?;
    refuse_when_full(&node)?;
    let count = items.len();
    let request = Request::EnqueueBatch {
        items,
        dedup: dedup(&node, key, "batch"),
    };
    match node.proposer().submit(request).await?.response {
        SmResponse::EnqueuedBatch { ids, duplicate } => {
            if !duplicate {
                Stats::add(&node.stats().enqueued, count as u64);
            }
            let answer = EnqueuedBatch {
                work_ids: ids.iter().map(ToString::to_string).collect(),
            };
            Ok(replayable(answer, duplicate))
        }
        other => Err(ApiError::unexpected(other)),
    }
}

/// The items of a multipart body, checked against the limits as they are read.
async fn parts(
    mut body: Multipart,
    mut iterations: Option<u32>,
    mut priority: u8,
    limits: &Limits,
) -> Result<Vec<BatchItem>, ApiError> {
    let bad = |why: String| ApiError::invalid("invalid_multipart", why);
    let mut items = Vec::new();
    let mut bytes = 0usize;
    while let Some(field) = body
        .next_field()
        .await
        .map_err(|e| bad(format!("the multipart body is malformed: {e}")))?
    {
        let name = field.name().unwrap_or("").to_string();
        let file = field.file_name().is_some();
        let setting = (name == ITERATIONS_FIELD || name == PRIORITY_FIELD) && !file;
        if !setting && !file && name != ITEM_FIELD {
            return Err(ApiError::invalid(
                "unknown_part",
                format!(
                    "part `{}` is neither a file, nor `{ITEM_FIELD}`, `{ITERATIONS_FIELD}` or `{PRIORITY_FIELD}`: send items as files (-F f=@FILE) or as parts named `{ITEM_FIELD}`",
                    name.chars().take(40).collect::<String>()
                ),
            ));
        }
        let data = field
            .bytes()
            .await
            .map_err(|e| bad(format!("the multipart body is malformed: {e}")))?;
        if setting {
            let value = std::str::from_utf8(&data).unwrap_or("").trim();
            if name == PRIORITY_FIELD {
                priority = priority_value(value)?;
            } else {
                iterations = Some(ranged(ITERATIONS_FIELD, value, 1, limits.max_iterations)?);
            }
            continue;
        }
        let Some(iterations) = iterations else {
            return Err(ApiError::invalid(
                "missing_parameter",
                format!(
                    "part {} has no iterations: give the query parameter `iterations`, or a text part named `iterations` before it",
                    items.len() + 1
                ),
            ));
        };
        bytes += data.len();
        if items.len() == limits.max_batch_items || bytes > limits.max_batch_bytes {
            return Err(ApiError::TooLarge {
                code: "batch_too_large".into(),
                message: format!(
                    "a batch holds at most {} items and {} payload bytes (--max-batch-items, --max-batch-bytes); split it",
                    limits.max_batch_items, limits.max_batch_bytes
                ),
            });
        }
        items.push(BatchItem {
            iterations,
            priority,
            payload: data,
        });
    }
    if items.is_empty() {
        return Err(ApiError::invalid(
            "empty_batch",
            "the batch has no item: send one part per item (curl -F f=@FILE ...)",
        ));
    }
    Ok(items)
}
