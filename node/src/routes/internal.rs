//! Node-to-node routes (cluster token): a follower's batch of requests for the leader.

use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use axum::Router;
use hashq_raft::command::Request;

use super::{Postcard, INTERNAL_BODY_LIMIT};
use crate::error::ApiError;
use crate::node::Node;
use crate::proposer::{Reply, PROPOSE_ROUTE};

pub fn router() -> Router<Node> {
    Router::new()
        .route(PROPOSE_ROUTE, post(propose))
        .layer(DefaultBodyLimit::max(INTERNAL_BODY_LIMIT))
}

/// Proposes a forwarded batch here, which must be the leader; a follower that forwarded to a
/// stale leader gets `NotLeader` per request and retries.
async fn propose(
    State(node): State<Node>,
    Postcard(requests): Postcard<Vec<Request>>,
) -> Postcard<Vec<Result<Reply, ApiError>>> {
    Postcard(node.proposer.submit_local(requests).await)
}
