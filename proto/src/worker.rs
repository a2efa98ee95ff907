//! The worker API's shapes: postcard bodies ([`crate::codec`]) on the `POST` routes of
//! [`crate::routes::worker`], behind the worker credential. An error answer is the JSON
//! [`crate::error::ErrorBody`], whatever the route.

use serde::{Deserialize, Serialize};

use crate::ids::{Digest, Millis, NodeId, WorkId, WorkerId, WorkerSecret};

/// `POST /worker/register`: a worker starts (or starts over after being forgotten).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The budget slot the launcher reserved for this worker (`--worker-id`); `None` for a
    /// worker started by hand.
    pub slot: Option<WorkerId>,
    /// The node that launched this worker; `None` lets the answering node adopt it.
    pub parent: Option<NodeId>,
    pub host: String,
    /// The launcher's handle of this worker: `pid:<n>` locally, the instance id on EC2.
    pub handle: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub worker: WorkerId,
    /// Send it with every later request: it proves this worker is the one that registered.
    pub secret: WorkerSecret,
    /// The node that answered (the worker's parent if it had none).
    pub node: NodeId,
    /// The client-API base URL of every member, so a worker can fail over beyond the
    /// endpoints it was started with.
    pub endpoints: Vec<(NodeId, String)>,
    /// The lease length the cluster grants; heartbeat well within it.
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
    /// A running worker not heard from for this long is declared lost by the cluster.
    pub worker_lost_ms: u64,
}

/// `POST /worker/lease`: take up to `max` items, waiting up to `wait_ms` for one to arrive.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub worker: WorkerId,
    pub secret: WorkerSecret,
    pub max: u32,
    /// Granted whatever their iterations; items beyond these only within `max_iterations`.
    pub min: u32,
    pub max_iterations: u64,
    /// Long-poll: how long the node may hold the request while the queue is empty.
    pub wait_ms: u64,
    /// Grows with every new request; a retry with the same id returns the same grant, and an
    /// id below the last one seen gets nothing (a late duplicate).
    pub request_id: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseResponse {
    pub items: Vec<WorkGrant>,
}

/// One leased item with its payload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkGrant {
    pub id: WorkId,
    /// The fencing number: name it when completing or heartbeating.
    pub attempt: u32,
    pub iterations: u32,
    pub deadline: Millis,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// `POST /worker/heartbeat`: extend the leases still held.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub worker: WorkerId,
    pub secret: WorkerSecret,
    pub items: Vec<(WorkId, u32)>,
    /// The worker's parent; it changes when the worker re-parents after its parent died.
    pub parent: Option<NodeId>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub valid: Vec<WorkId>,
    /// Leases the worker no longer holds: abandon that work.
    pub lost: Vec<WorkId>,
}

/// `POST /worker/complete`: deliver results (idempotent).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompleteRequest {
    pub worker: WorkerId,
    pub secret: WorkerSecret,
    pub results: Vec<Completion>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompleteResponse {
    pub accepted: u32,
    pub ignored: u32,
}

/// `POST /worker/exit`: leave the cluster, giving back unfinished leases and the slot. The
/// answer is an empty postcard body (`()`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExitRequest {
    pub worker: WorkerId,
    pub secret: WorkerSecret,
    pub release: Vec<(WorkId, u32)>,
}

/// One result delivered by a worker. Also part of the Raft log (`hashq-raft`'s
/// `Request::Complete`), so it changes only as the crate doc says.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Completion {
    pub id: WorkId,
    pub attempt: u32,
    pub value: Digest,
}
