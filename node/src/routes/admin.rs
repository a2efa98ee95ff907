//! Cluster administration (admin credential): the worker budget. Membership changes are
//! in [`super::members`].

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use hashq_proto::api::MaxWorkers;
use hashq_proto::routes::admin::MAX_WORKERS;
use hashq_raft::command::Request;

use crate::error::ApiError;
use crate::node::Node;

/// Largest budget accepted (a typo guard, not a capacity claim).
const MAX_BUDGET: u32 = 10_000;

pub fn router() -> Router<Node> {
    Router::new().route(MAX_WORKERS, post(set_max_workers))
}

/// Sets the cluster-wide worker budget. Lowering it stops no running worker: the pool shrinks
/// as workers go idle and exit, and no new one starts above the new budget.
async fn set_max_workers(
    State(node): State<Node>,
    body: Bytes,
) -> Result<Json<MaxWorkers>, ApiError> {
    // Any content type: the body must just be the JSON object.
    let req: MaxWorkers = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("invalid_body", format!("expected {{\"max\": N}}: {e}")))?;
    if req.max > MAX_BUDGET {
        return Err(ApiError::invalid(
            "out_of_range",
            format!("max must be from 0 to {MAX_BUDGET}, got {}", req.max),
        ));
    }
    node.proposer()
        .submit(Request::SetMaxWorkers {
            max: req.max,
            only_if_unset: false,
        })
        .await?;
    tracing::info!(max = req.max, "worker budget set");
    Ok(Json(req))
}
