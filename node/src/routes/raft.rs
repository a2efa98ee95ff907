//! Raft RPC (peer credential): append, vote, chunked snapshot install, and the init probe
//! that self-initialization uses.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use hashq_raft::network::routes;
use hashq_raft::TypeConfig;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::Postcard;
use crate::error::ApiError;
use crate::node::Node;

/// Path of the init probe.
pub const INIT_STATE: &str = "/raft/init";

type NodeId = hashq_raft::NodeId;

pub fn router() -> Router<Node> {
    Router::new()
        .route(routes::APPEND, post(append))
        .route(routes::VOTE, post(vote))
        .route(routes::SNAPSHOT, post(snapshot))
        .route(INIT_STATE, get(init_state))
}

// Every RPC passes the gate first: a message no correct peer sends is refused with a 400
// and never reaches openraft (see `raft_gate`).

async fn append(
    State(node): State<Node>,
    Postcard(req): Postcard<AppendEntriesRequest<TypeConfig>>,
) -> Result<Postcard<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>>, ApiError> {
    let answer = node.raft_gate.append(&node.raft, node.id(), req).await?;
    Ok(Postcard(answer))
}

async fn vote(
    State(node): State<Node>,
    Postcard(req): Postcard<VoteRequest<NodeId>>,
) -> Result<Postcard<Result<VoteResponse<NodeId>, RaftError<NodeId>>>, ApiError> {
    let answer = node.raft_gate.vote(&node.raft, node.id(), req).await?;
    Ok(Postcard(answer))
}

type SnapshotAnswer =
    Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>;

async fn snapshot(
    State(node): State<Node>,
    Postcard(req): Postcard<InstallSnapshotRequest<TypeConfig>>,
) -> Result<Postcard<SnapshotAnswer>, ApiError> {
    let answer = node.raft_gate.snapshot(&node.raft, node.id(), req).await?;
    Ok(Postcard(answer))
}

/// Whether a node has Raft state already (a log, a vote): then it must never be initialized.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct InitState {
    pub node: NodeId,
    pub initialized: bool,
    /// A witness votes but never stands for election, so it never initializes the cluster.
    #[serde(default)]
    pub witness: bool,
}

async fn init_state(State(node): State<Node>) -> Json<InitState> {
    Json(InitState {
        node: node.id(),
        initialized: crate::bootstrap::is_initialized(&node).await,
        witness: node.config.role == crate::config::Role::Witness,
    })
}
