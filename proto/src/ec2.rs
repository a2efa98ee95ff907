//! The tags by which hashq's EC2 instances find each other: the node's `ec2` launcher writes
//! them on the worker instances it starts and lists workers by them; a worker finds the
//! endpoints to re-parent to by them; `scripts/deploy-ec2.sh` writes the endpoints' (the
//! shell script spells them out again: keep it in step).

/// Tag naming the cluster an instance belongs to (endpoints and workers).
pub const TAG_CLUSTER: &str = "hashq:cluster";
/// Tag naming what an instance is: [`ROLE_ENDPOINT`], `witness` or [`ROLE_WORKER`].
pub const TAG_ROLE: &str = "hashq:role";
/// Tag with a worker instance's slot (the worker id, a decimal number).
pub const TAG_WORKER_ID: &str = "hashq:worker-id";
/// Tag with the instance id of the endpoint that launched a worker.
pub const TAG_PARENT: &str = "hashq:parent";
/// Tag with the node id of the endpoint that launched a worker.
pub const TAG_PARENT_NODE: &str = "hashq:parent-node";
/// Tag with an endpoint instance's Raft node id (set by `scripts/deploy-ec2.sh`); workers
/// re-parent by it.
pub const TAG_NODE_ID: &str = "hashq:node-id";

/// Whether `s` looks like an EC2 instance id (`i-` and hex digits).
pub fn is_instance_id(s: &str) -> bool {
    s.strip_prefix("i-").is_some_and(|hex| {
        !hex.is_empty() && hex.len() <= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// [`TAG_ROLE`] of a worker instance.
pub const ROLE_WORKER: &str = "worker";
/// [`TAG_ROLE`] of an endpoint (a node that serves clients and workers).
pub const ROLE_ENDPOINT: &str = "endpoint";
