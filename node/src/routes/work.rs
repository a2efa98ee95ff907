//! The work API beyond the exercise (cluster version 3): cancel an item
//! (`DELETE /work/{id}`), put a dead or cancelled one back in the queue
//! (`POST /work/{id}/retry`), and list items by status (`GET /work?status=`).
//!
//! Cancel and retry go through Raft like every change and are idempotent: a second cancel
//! finds the item cancelled, a second retry finds it queued or running, and both answer
//! 200. The listing is a linearizable read, served by the leader like `GET /work/{id}`.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hashq_proto::api::{WorkList, WorkStatus};
use hashq_proto::routes::client::WORK_LIST;
use hashq_raft::command::{Request, Response as SmResponse};
use hashq_raft::machine;
use hashq_raft::types::Status;
use hashq_raft::{version, WorkId};
use std::time::Duration;

use super::client::{at_leader, parse_work_id, work_view};
use super::{count_param, query_pairs, serves_clients};
use crate::error::ApiError;
use crate::node::Node;

/// Most items one page of `GET /work` holds, and its default.
pub const MAX_LIST: u32 = 1000;
const DEFAULT_LIST: u32 = 100;
/// Most item records one page looks at: a page of a rare status in a large backlog comes
/// back short (even empty) with `next_after`, instead of scanning everything at once.
const LIST_BUDGET: usize = 10_000;

/// `DELETE /work/{id}`: a queued or running item becomes cancelled (a running one's worker
/// stops at its next heartbeat, and no result is ever stored for it).
pub async fn cancel(
    State(node): State<Node>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<WorkStatus>, ApiError> {
    change(
        &node,
        "cancel",
        id,
        |id| Request::Cancel { id },
        |s| {
            (s == Status::Cancelled).then_some(()).ok_or((
                "not_cancellable",
                "only queued or running work can be cancelled",
            ))
        },
    )
    .await
}

/// `POST /work/{id}/retry`: a dead or cancelled item goes back in the queue with its
/// attempts reset; a queued or running one is left as it is.
pub async fn retry(
    State(node): State<Node>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<WorkStatus>, ApiError> {
    change(
        &node,
        "retry",
        id,
        |id| Request::Retry { id },
        |s| {
            matches!(s, Status::Queued | Status::Running)
                .then_some(())
                .ok_or((
                    "not_retryable",
                    "it has its result, there is nothing to retry",
                ))
        },
    )
    .await
}

/// Proposes the request `what` that `request` makes for the item in the path, and answers
/// with the item's status after it, or with 409 `(code, why)` when `accept` refuses that
/// status.
async fn change(
    node: &Node,
    what: &str,
    id: Result<Path<String>, PathRejection>,
    request: impl FnOnce(WorkId) -> Request,
    accept: impl Fn(Status) -> Result<(), (&'static str, &'static str)>,
) -> Result<Json<WorkStatus>, ApiError> {
    serves_clients(node)?;
    let id = parse_work_id(id)?;
    require_version(node, what, version::CANCEL)?;
    match node.proposer().submit(request(id)).await?.response {
        SmResponse::ItemStatus(Some(status)) => match accept(status) {
            Ok(()) => Ok(answer(id, status)),
            Err((code, why)) => Err(ApiError::refused(
                code,
                format!("work {id} is {}: {why}", status.as_str()),
            )),
        },
        SmResponse::ItemStatus(None) => Err(missing(id)),
        other => Err(ApiError::unexpected(other)),
    }
}

/// `GET /work?status=S&after=ID&limit=N`: items with status S, by id, after ID.
pub async fn list(
    State(node): State<Node>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serves_clients(&node)?;
    let pairs = query_pairs(query.as_deref());
    let status = one(&pairs, "status")?
        .map(|s| {
            Status::parse(s).ok_or_else(|| {
                ApiError::invalid(
                    "invalid_status",
                    format!(
                        "`status` is one of queued, running, completed, pulled, dead, cancelled; got `{}`",
                        s.chars().take(40).collect::<String>()
                    ),
                )
            })
        })
        .transpose()?
        .ok_or_else(|| {
            ApiError::invalid(
                "missing_parameter",
                "query parameter `status` is required (queued, running, completed, pulled, dead or cancelled)",
            )
        })?;
    let after = one(&pairs, "after")?
        .map(|a| {
            a.parse::<u64>().map(WorkId).map_err(|_| {
                ApiError::invalid(
                    "invalid_parameter",
                    format!(
                        "`after` is a work id (a whole number), got `{}`",
                        a.chars().take(40).collect::<String>()
                    ),
                )
            })
        })
        .transpose()?;
    let limit = match one(&pairs, "limit")? {
        Some(_) => count_param(&pairs, "limit", MAX_LIST)?,
        None => DEFAULT_LIST,
    };
    let path = match query.as_deref() {
        Some(q) => format!("{WORK_LIST}?{q}"),
        None => WORK_LIST.to_string(),
    };
    if let Some(relayed) = at_leader(&node, &headers, &path, Duration::ZERO).await? {
        return Ok(relayed);
    }
    let view = node.reader().view();
    let page = machine::list_items(&view, status, after, limit as usize, LIST_BUDGET)?;
    Ok(Json(WorkList {
        items: page
            .items
            .into_iter()
            .map(|(id, item)| work_view(&view, id, item))
            .collect::<Result<_, _>>()?,
        next_after: page.next_after.map(|id| id.to_string()),
    })
    .into_response())
}

/// The value of an optional query parameter given at most once.
fn one<'p>(pairs: &'p [(String, String)], name: &str) -> Result<Option<&'p str>, ApiError> {
    let mut values = pairs.iter().filter(|(k, _)| k == name);
    let first = values.next().map(|(_, v)| v.as_str());
    if values.next().is_some() {
        return Err(ApiError::invalid(
            "invalid_parameter",
            format!("query parameter `{name}` is given more than once"),
        ));
    }
    Ok(first)
}

/// Refuses `what` until the cluster runs the version that brought it: a node of an older
/// build could not apply it.
/// 409 `cluster_version_too_old` unless the cluster runs version `needed` or later: what
/// it brought would reach a member that cannot apply it.
pub(super) fn require_version(node: &Node, what: &str, needed: u32) -> Result<(), ApiError> {
    let runs = machine::cluster_version(&node.reader().view())?;
    if runs < needed {
        return Err(ApiError::refused(
            "cluster_version_too_old",
            format!(
                "{what} needs cluster version {needed}; the cluster runs {runs} until every member runs a build that supports it (see members[].cluster_version in /status)"
            ),
        ));
    }
    Ok(())
}

fn answer(id: WorkId, status: Status) -> Json<WorkStatus> {
    Json(WorkStatus {
        work_id: id.to_string(),
        status: status.as_str().to_string(),
    })
}

fn missing(id: WorkId) -> ApiError {
    ApiError::NotFound(format!("no work item {id}"))
}
