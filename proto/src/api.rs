//! The JSON shapes of the client API, the admin route and the probes nodes and workers send
//! each other. Field names are the interface; an absent optional value is left out.

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

/// The answer to `PUT /enqueue`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Enqueued {
    /// The item's [`crate::WorkId`] as a decimal string.
    pub work_id: String,
}

fn default_priority() -> u8 {
    5
}

/// The answer to `POST /enqueue/batch`: the items' ids, in part order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnqueuedBatch {
    pub work_ids: Vec<String>,
}

/// One result in the answer to `POST /pullCompleted`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pulled {
    pub work_id: String,
    /// The digest in lowercase hex.
    pub value: String,
}

/// The answer to `GET /work/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkView {
    pub work_id: String,
    /// `queued`, `running`, `completed`, `pulled`, `dead` or `cancelled`.
    pub status: String,
    pub iterations: u32,
    /// 0 to 9, higher first (5 unless it was enqueued with another).
    #[serde(default = "default_priority")]
    pub priority: u8,
    pub attempts: u32,
    /// The digest in lowercase hex, once completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub payload_bytes: u32,
    pub enqueued_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pulled_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_deadline_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_reason: Option<String>,
}

/// The answer to a cancel (`DELETE /work/{id}`) or a retry (`POST /work/{id}/retry`): the
/// item's status afterwards.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkStatus {
    pub work_id: String,
    pub status: String,
}

/// The answer to `GET /work?status=...`: one page of items, by id.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkList {
    pub items: Vec<WorkView>,
    /// Pass as `after` for the next page; absent once there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

/// `POST /internal/elect`: the leading witness `from` hands leadership over. The endpoint
/// stands for election only while it follows `from` in `term`, so a late or repeated
/// request never unseats a leader elected since.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Handover {
    pub from: NodeId,
    pub term: u64,
}

/// `POST /admin/members`: the node to add, by its Raft id and the address peers reach it at.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddMember {
    pub id: NodeId,
    pub addr: String,
}

/// The membership after a change: voters, and learners still catching up.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Members {
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
}

/// `POST /admin/max-workers`: the request and its answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MaxWorkers {
    pub max: u32,
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
    /// The latest cluster version this node can run (`hashq_raft::version`); builds before
    /// versioning do not say, and run [`BASE_CLUSTER_VERSION`].
    #[serde(default = "base_cluster_version")]
    pub cluster_version: u32,
}

/// The cluster version of the builds before versioning (`hashq_raft::version::BASE`).
pub const BASE_CLUSTER_VERSION: u32 = 1;

fn base_cluster_version() -> u32 {
    BASE_CLUSTER_VERSION
}

/// `GET /raft/init` (peer credential), for self-initialization: whether a node has Raft state
/// already (a log, a vote), in which case it must never be initialized.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InitState {
    pub node: NodeId,
    pub initialized: bool,
    /// A witness leads only when no endpoint can (and then hands over), so it never
    /// initializes the cluster.
    #[serde(default)]
    pub witness: bool,
}
