//! Raft RPC (cluster token): append, vote, chunked snapshot install, and the init probe that
//! self-initialization uses.

use axum::extract::{DefaultBodyLimit, State};
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

use super::{Postcard, INTERNAL_BODY_LIMIT};
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
        .layer(DefaultBodyLimit::max(INTERNAL_BODY_LIMIT))
}

async fn append(
    State(node): State<Node>,
    Postcard(req): Postcard<AppendEntriesRequest<TypeConfig>>,
) -> Postcard<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> {
    Postcard(node.raft.append_entries(req).await)
}

async fn vote(
    State(node): State<Node>,
    Postcard(req): Postcard<VoteRequest<NodeId>>,
) -> Postcard<Result<VoteResponse<NodeId>, RaftError<NodeId>>> {
    Postcard(node.raft.vote(req).await)
}

async fn snapshot(
    State(node): State<Node>,
    Postcard(req): Postcard<InstallSnapshotRequest<TypeConfig>>,
) -> Postcard<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>> {
    Postcard(node.raft.install_snapshot(req).await)
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
