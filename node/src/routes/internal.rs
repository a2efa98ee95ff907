//! Internal routes: a follower's batch of requests for the leader (the peer credential), and
//! the node's own binary for new worker instances (the worker credential: no S3, workers
//! fetch `hashq` from their endpoint).

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hashq_proto::api::Handover;
use hashq_proto::routes::internal::{BINARY, ELECT, PROPOSE};
use hashq_raft::command::Request;
use tokio_util::io::ReaderStream;

use super::Postcard;
use crate::error::ApiError;
use crate::node::Node;
use crate::proposer::Reply;

/// Node-to-node forwarding (peer credential).
pub fn peer_router() -> Router<Node> {
    Router::new()
        .route(PROPOSE, post(propose))
        .route(ELECT, post(elect))
}

/// The binary download (worker credential).
pub fn worker_router() -> Router<Node> {
    Router::new().route(BINARY, get(binary))
}

/// Streams this node's own executable (`GET /internal/binary`), so a worker instance runs
/// exactly the version of its endpoint. `/proc/self/exe` is the running program even when
/// the file on disk was replaced by an upgrade since it started.
async fn binary() -> Result<Response, ApiError> {
    let path = match std::path::Path::new("/proc/self/exe") {
        p if p.exists() => p.to_path_buf(),
        _ => std::env::current_exe()
            .map_err(|e| ApiError::Internal(format!("cannot find this binary: {e}")))?,
    };
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("cannot open this binary: {e}")))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::Internal(format!("cannot read this binary: {e}")))?
        .len();
    // The length lets the downloader (curl) notice a transfer cut short.
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"hashq\"".to_string(),
            ),
        ],
        Body::from_stream(ReaderStream::with_capacity(file, 256 << 10)),
    )
        .into_response())
}

/// Proposes a forwarded batch here, which must be the leader; a follower that forwarded to a
/// stale leader gets `NotLeader` per request and retries.
async fn propose(
    State(node): State<Node>,
    Postcard(requests): Postcard<Vec<Request>>,
) -> Postcard<Vec<Result<Reply, ApiError>>> {
    if node.is_witness() {
        // A witness leads only to hand over to an endpoint (`watch::hand_over`): the
        // forwarder retries until an endpoint leads.
        let handing_over = || {
            Err(ApiError::Unavailable(
                "the leader is a witness handing over to an endpoint; retry".into(),
            ))
        };
        return Postcard(requests.iter().map(|_| handing_over()).collect());
    }
    Postcard(node.proposer().submit_local(requests).await)
}

/// Stands for election at the request of the witness that leads (`POST /internal/elect`),
/// once it has this node's log up to date. Refused by a witness, by a node still repairing
/// its state, and unless this node follows `from` in `term` (a stale request).
async fn elect(
    State(node): State<Node>,
    Postcard(handover): Postcard<Handover>,
) -> Result<StatusCode, ApiError> {
    if node.is_witness() {
        return Err(ApiError::Witness);
    }
    if node.repair().until().is_some() {
        return Err(ApiError::Unavailable(
            "this node is repairing its state and stands for nothing".into(),
        ));
    }
    let (leader, term) = {
        let m = node.raft().metrics().borrow().clone();
        (m.current_leader, m.current_term)
    };
    if leader != Some(handover.from) || term != handover.term || leader == Some(node.id()) {
        return Err(ApiError::Conflict(format!(
            "no handover: this node sees leader {leader:?} in term {term}, not node {} in term {}",
            handover.from, handover.term
        )));
    }
    node.raft()
        .trigger()
        .elect()
        .await
        .map_err(|e| ApiError::Unavailable(format!("raft stopped: {e}")))?;
    tracing::info!(
        from = handover.from,
        term,
        "standing for election: the leading witness hands over"
    );
    Ok(StatusCode::ACCEPTED)
}
