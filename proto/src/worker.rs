//! The worker API's shapes: postcard bodies ([`crate::codec`]) on the `POST` routes of
//! [`crate::routes::worker`], behind the worker credential. An error answer is the JSON
//! [`crate::error::ErrorBody`], whatever the route.

use bytes::Bytes;
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
    /// `Bytes` so a node hands out the payload it read without copying it; on the wire it is
    /// a length-prefixed byte string, as `serde_bytes` writes a `Vec<u8>`.
    pub payload: Bytes,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The grant as releases before `Bytes` wrote it: a worker of either release reads the
    /// other's grants.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct GrantWithVec {
        id: WorkId,
        attempt: u32,
        iterations: u32,
        deadline: Millis,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    }

    #[test]
    fn a_grant_is_on_the_wire_as_with_a_byte_vector() {
        let grant = WorkGrant {
            id: WorkId(7),
            attempt: 2,
            iterations: 1000,
            deadline: 123_456,
            payload: Bytes::from_static(b"some payload"),
        };
        let old = GrantWithVec {
            id: WorkId(7),
            attempt: 2,
            iterations: 1000,
            deadline: 123_456,
            payload: b"some payload".to_vec(),
        };
        let wire = crate::codec::encode(&grant);
        assert_eq!(wire, crate::codec::encode(&old));
        let back: WorkGrant = crate::codec::decode("grant", &wire).unwrap();
        assert_eq!(back.payload, grant.payload);
        assert_eq!(
            crate::codec::decode::<GrantWithVec>("grant", &wire).unwrap(),
            old
        );
    }
}
