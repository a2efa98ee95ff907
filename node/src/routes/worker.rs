//! The worker API (postcard bodies, worker credential): register, lease, heartbeat, complete,
//! exit. Every request after registration carries the worker's secret, which the state
//! machine checks: a holder of the worker credential acts only for itself.

use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use hashq_proto::routes::worker as routes;
use hashq_proto::worker::{
    CompleteRequest, CompleteResponse, ExitRequest, HeartbeatRequest, HeartbeatResponse,
    LeaseRequest, LeaseResponse, RegisterRequest, RegisterResponse, WorkGrant,
};
use hashq_proto::WorkerSecret;
use hashq_raft::command::{Request, Response as SmResponse};

use super::Postcard;
use crate::config::millis;
use crate::error::ApiError;
use crate::node::Node;

pub fn router() -> Router<Node> {
    Router::new()
        .route(routes::REGISTER, post(register))
        .route(routes::LEASE, post(lease))
        .route(routes::HEARTBEAT, post(heartbeat))
        .route(routes::COMPLETE, post(complete))
        .route(routes::EXIT, post(exit))
}

fn serves_workers(node: &Node) -> Result<(), ApiError> {
    if node.is_witness() {
        return Err(ApiError::Witness);
    }
    Ok(())
}

async fn register(
    State(node): State<Node>,
    _headers: HeaderMap,
    Postcard(req): Postcard<RegisterRequest>,
) -> Result<Postcard<RegisterResponse>, ApiError> {
    serves_workers(&node)?;
    let secret = WorkerSecret(rand::random());
    let request = Request::Register {
        slot: req.slot,
        parent: req.parent.unwrap_or(node.id()),
        host: req.host,
        handle: req.handle,
        secret,
    };
    let worker = match node.proposer().submit(request).await?.response {
        SmResponse::Registered { worker } => worker,
        other => return Err(ApiError::unexpected(other)),
    };
    let membership = node.raft().metrics().borrow().membership_config.clone();
    let endpoints = membership
        .membership()
        .nodes()
        .map(|(id, n)| (*id, node.peers().url(&n.addr, "")))
        .collect();
    let timing = &node.config().timing;
    tracing::info!(%worker, "worker registered");
    Ok(Postcard(RegisterResponse {
        worker,
        secret,
        node: node.id(),
        endpoints,
        lease_ms: millis(timing.lease),
        heartbeat_ms: millis(timing.worker_heartbeat),
        worker_lost_ms: millis(timing.worker_lost_after),
    }))
}

/// Waits, up to `wait`, until this node's applied state shows queued work.
async fn wait_for_work(node: &Node, wait: Duration) {
    let mut applied = node.reader().subscribe();
    let _ = tokio::time::timeout(wait, applied.wait_for(|s| s.queued > 0)).await;
}

async fn lease(
    State(node): State<Node>,
    Postcard(req): Postcard<LeaseRequest>,
) -> Result<Postcard<LeaseResponse>, ApiError> {
    serves_workers(&node)?;
    let timing = &node.config().timing;
    // Long-poll here, on whichever node the worker asked: every replica learns of new work
    // when it applies the enqueue, so no leader round trip is spent on an empty queue.
    let wait = Duration::from_millis(req.wait_ms)
        .min(timing.lease_wait_max)
        .min(timing.request_timeout / 2);
    wait_for_work(&node, wait).await;
    let request = Request::Lease {
        worker: req.worker,
        secret: req.secret,
        max: req.max.max(1),
        min: req.min.min(req.max),
        max_iterations: req.max_iterations,
        lease_ms: millis(timing.lease),
        request_id: req.request_id,
    };
    let reply = node.proposer().submit(request).await?;
    match reply.response {
        SmResponse::Leased { items } => Ok(Postcard(LeaseResponse {
            items: items
                .into_iter()
                .zip(reply.payloads)
                .map(|(item, payload)| WorkGrant {
                    id: item.id,
                    attempt: item.attempt,
                    iterations: item.iterations,
                    deadline: item.deadline,
                    payload,
                })
                .collect(),
        })),
        other => Err(ApiError::unexpected(other)),
    }
}

async fn heartbeat(
    State(node): State<Node>,
    Postcard(req): Postcard<HeartbeatRequest>,
) -> Result<Postcard<HeartbeatResponse>, ApiError> {
    serves_workers(&node)?;
    let request = Request::Heartbeat {
        worker: req.worker,
        secret: req.secret,
        items: req.items,
        lease_ms: millis(node.config().timing.lease),
        parent: req.parent,
    };
    match node.proposer().submit(request).await?.response {
        SmResponse::HeartbeatAck { valid, lost } => Ok(Postcard(HeartbeatResponse { valid, lost })),
        other => Err(ApiError::unexpected(other)),
    }
}

async fn complete(
    State(node): State<Node>,
    Postcard(req): Postcard<CompleteRequest>,
) -> Result<Postcard<CompleteResponse>, ApiError> {
    serves_workers(&node)?;
    let request = Request::Complete {
        worker: req.worker,
        secret: req.secret,
        results: req.results,
    };
    match node.proposer().submit(request).await?.response {
        SmResponse::CompleteAck { accepted, ignored } => {
            Ok(Postcard(CompleteResponse { accepted, ignored }))
        }
        other => Err(ApiError::unexpected(other)),
    }
}

async fn exit(
    State(node): State<Node>,
    Postcard(req): Postcard<ExitRequest>,
) -> Result<Postcard<()>, ApiError> {
    serves_workers(&node)?;
    // Exit gives back every lease the worker holds, whatever `release` lists.
    match node
        .proposer()
        .submit(Request::Exit {
            worker: req.worker,
            secret: req.secret,
        })
        .await?
        .response
    {
        SmResponse::Done => {
            tracing::info!(worker = %req.worker, "worker exited");
            Ok(Postcard(()))
        }
        other => Err(ApiError::unexpected(other)),
    }
}
