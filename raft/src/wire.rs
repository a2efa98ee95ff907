//! Shapes of the internal HTTP routes (worker, Raft, forwarding), shared by the node that
//! serves them and the clients that call them. Bodies are postcard ([`crate::codec`]) with
//! content type [`POSTCARD`]; errors are the JSON error body of the client API, whatever the
//! route.

use serde::{Deserialize, Serialize};

use crate::command::Completion;
use crate::types::{Millis, NodeId, WorkId, WorkerId, WorkerSecret};

/// Content type of postcard bodies.
pub const POSTCARD: &str = "application/x-postcard";

/// The header that carries a credential: `Authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// Worker routes, all `POST`, all need the worker credential.
pub mod routes {
    pub const REGISTER: &str = "/worker/register";
    pub const LEASE: &str = "/worker/lease";
    pub const HEARTBEAT: &str = "/worker/heartbeat";
    pub const COMPLETE: &str = "/worker/complete";
    pub const EXIT: &str = "/worker/exit";
    /// `GET`, no token: a node's liveness and its view of the cluster (JSON).
    pub const HEALTH: &str = "/health";
}

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
    pub payload: bytes::Bytes,
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

/// Error codes a worker acts on (in the JSON error body's `code`).
pub mod codes {
    /// The cluster does not know this worker (declared lost, or exited): register again, or
    /// for a managed worker whose slot is gone, exit.
    pub const UNKNOWN_WORKER: &str = "unknown_worker";
    /// The slot is not reserved: a managed worker must exit.
    pub const UNKNOWN_SLOT: &str = "unknown_slot";
    /// No leader right now: retry after `Retry-After`.
    pub const NO_LEADER: &str = "no_leader";
}

/// The JSON error body of every route: `{"error":{"code":..,"message":..}}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// `GET /health`: a node's liveness and view (JSON; no token, no secrets).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Health {
    pub node: NodeId,
    pub role: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    /// The cluster id fixed at bootstrap, so a worker never mixes clusters.
    pub cluster: String,
    /// How the node starts workers (`local`, `ec2`, `none`): the autoscaler asks only nodes
    /// that can launch.
    #[serde(default)]
    pub launcher: String,
    /// Random per process start: a node that restarted has another one.
    #[serde(default)]
    pub incarnation: u64,
}
