//! Raft RPC (peer credential): append, vote, the snapshot stream, and the init probe that
//! self-initialization uses.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use hashq_proto::api::InitState;
use hashq_proto::routes::raft as routes;
use hashq_raft::network::{SnapshotAnswer, SnapshotHeader};
use hashq_raft::{codec, SnapshotFile, TypeConfig};
use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::Snapshot;
use tokio::io::AsyncWriteExt;

use super::Postcard;
use crate::error::ApiError;
use crate::node::Node;

type NodeId = hashq_raft::NodeId;

/// Append, vote and the init probe: small bodies, read whole.
pub fn router() -> Router<Node> {
    Router::new()
        .route(routes::APPEND, post(append))
        .route(routes::VOTE, post(vote))
        .route(routes::INIT, get(init_state))
}

/// The snapshot stream: its body goes to a file as it arrives, never into memory.
pub fn snapshot_router() -> Router<Node> {
    Router::new().route(routes::SNAPSHOT, post(snapshot))
}

// Every RPC passes the gate first: a message no correct peer sends is refused with a 400
// and never reaches openraft (see `raft_gate`).

async fn append(
    State(node): State<Node>,
    Postcard(req): Postcard<AppendEntriesRequest<TypeConfig>>,
) -> Result<Postcard<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>>, ApiError> {
    if !req.entries.is_empty() {
        let m = &node.metrics();
        m.append_rpcs.fetch_add(1, Ordering::Relaxed);
        m.append_entries
            .fetch_add(req.entries.len() as u64, Ordering::Relaxed);
    }
    let answer = node.raft_gate().append(node.raft(), node.id(), req).await?;
    Ok(Postcard(answer))
}

async fn vote(
    State(node): State<Node>,
    Postcard(req): Postcard<VoteRequest<NodeId>>,
) -> Result<Postcard<Result<VoteResponse<NodeId>, RaftError<NodeId>>>, ApiError> {
    if let Some(until) = node.repair().until() {
        // Damaged durable state is being repaired: this node may lack entries it once
        // acknowledged, so its vote could elect a leader without them. It answers "not
        // granted" with its own vote and log, and changes nothing.
        crate::raft_gate::check_vote(&req, node.id())?;
        let m = node.raft().metrics().borrow().clone();
        tracing::info!(candidate = %req.vote, until, "vote refused while repairing");
        let last = m.last_applied;
        return Ok(Postcard(Ok(VoteResponse::new(m.vote, last, false))));
    }
    let answer = node.raft_gate().vote(node.raft(), node.id(), req).await?;
    Ok(Postcard(answer))
}

/// Longest pause in a snapshot stream before it is given up.
const SNAPSHOT_IDLE: Duration = Duration::from_secs(30);
/// Largest snapshot header (the metadata holds the membership).
const SNAPSHOT_HEADER_MAX: usize = 16 << 20;

/// Receives a snapshot: header, then the file, written to disk as it comes, synced, verified
/// (checksum, and the metadata it announces), and only then installed. A corrupt or
/// truncated stream is refused with a 400 and the current state is kept; the leader sends
/// again (and rebuilds its snapshot first if its own copy fails its checksum).
async fn snapshot(
    State(node): State<Node>,
    body: Body,
) -> Result<Postcard<SnapshotAnswer>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut head: Vec<u8> = Vec::new();
    let rest;
    let header: SnapshotHeader = loop {
        if head.len() >= 4 {
            let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
            if len > SNAPSHOT_HEADER_MAX {
                return Err(ApiError::invalid(
                    "invalid_snapshot",
                    "snapshot header too large",
                ));
            }
            if head.len() >= 4 + len {
                let header = codec::decode("snapshot header", &head[4..4 + len])
                    .map_err(|e| ApiError::invalid("invalid_snapshot", e.to_string()))?;
                rest = bytes::Bytes::copy_from_slice(&head[4 + len..]);
                break header;
            }
        }
        match next_chunk(&mut stream).await? {
            Some(chunk) => head.extend_from_slice(&chunk),
            None => {
                return Err(ApiError::invalid(
                    "invalid_snapshot",
                    "the stream ended early",
                ))
            }
        }
    };
    crate::raft_gate::check_snapshot(&header.vote, &header.meta, node.id())?;
    let path = node.reader().receive_path();
    let received = receive(&mut stream, rest, &path).await;
    let verified = match received {
        Ok(()) => {
            let p = path.clone();
            tokio::task::spawn_blocking(move || hashq_storage::snapshot::verify(&p))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))
                .and_then(|r| r.map_err(|e| ApiError::invalid("invalid_snapshot", e.to_string())))
        }
        Err(e) => Err(e),
    };
    match verified {
        Ok(meta) if meta == header.meta => {}
        Ok(_) => {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(ApiError::invalid(
                "invalid_snapshot",
                "the file is not the snapshot its header announced",
            ));
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&path).await;
            tracing::warn!(error = %e, "refused a snapshot from the leader");
            return Err(e);
        }
    }
    let snapshot = Snapshot::<TypeConfig> {
        meta: header.meta,
        snapshot: Box::new(SnapshotFile::new(path.clone())),
    };
    let answer = node
        .raft_gate()
        .install(node.raft(), header.vote, snapshot)
        .await;
    if path.exists() {
        // Not installed (refused, or a newer one won): do not leave it behind.
        let _ = tokio::fs::remove_file(&path).await;
    }
    Ok(Postcard(answer?))
}

async fn next_chunk(
    stream: &mut (impl futures::Stream<Item = Result<bytes::Bytes, axum::Error>> + Unpin),
) -> Result<Option<bytes::Bytes>, ApiError> {
    match tokio::time::timeout(SNAPSHOT_IDLE, stream.next()).await {
        Err(_) => Err(ApiError::BodyTimeout("the snapshot stream stalled".into())),
        Ok(None) => Ok(None),
        Ok(Some(Err(e))) => Err(ApiError::invalid("invalid_snapshot", e.to_string())),
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
    }
}

/// Writes the rest of the stream to `path` and fdatasyncs it.
async fn receive(
    stream: &mut (impl futures::Stream<Item = Result<bytes::Bytes, axum::Error>> + Unpin),
    first: bytes::Bytes,
    path: &std::path::Path,
) -> Result<(), ApiError> {
    let io = |e: std::io::Error| ApiError::Internal(format!("{}: {e}", path.display()));
    let mut file = tokio::fs::File::create(path).await.map_err(io)?;
    file.write_all(&first).await.map_err(io)?;
    while let Some(chunk) = next_chunk(stream).await? {
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    let file = file.into_std().await;
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || hashq_storage::fsio::sync_data(&file, &p))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))
}

async fn init_state(State(node): State<Node>) -> Json<InitState> {
    Json(InitState {
        node: node.id(),
        initialized: node.is_initialized().await,
        witness: node.is_witness(),
    })
}
