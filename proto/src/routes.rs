//! Every route path a node serves, grouped by audience as the node's routers are. Each
//! module says which credential its routes take.

/// The client API (client token): the exercise's two routes and an item's status.
pub mod client {
    /// `PUT /enqueue?iterations=N`, the payload as the body: answers
    /// [`crate::api::Enqueued`].
    pub const ENQUEUE: &str = "/enqueue";
    /// `POST /enqueue/batch?iterations=N`, a `multipart/form-data` body of one item per part:
    /// answers [`crate::api::EnqueuedBatch`].
    pub const ENQUEUE_BATCH: &str = "/enqueue/batch";
    /// `POST /pullCompleted?top=N`: answers a list of [`crate::api::Pulled`].
    pub const PULL_COMPLETED: &str = "/pullCompleted";
    /// `GET /work/{id}` (the router's pattern): answers [`crate::api::WorkView`]. A concrete
    /// path is [`work`]. `DELETE` cancels the item, answering [`crate::api::WorkStatus`].
    pub const WORK: &str = "/work/{id}";
    /// `POST /work/{id}/retry`: puts a dead or cancelled item back in the queue, answering
    /// [`crate::api::WorkStatus`].
    pub const WORK_RETRY: &str = "/work/{id}/retry";
    /// `GET /work?status=S&after=ID&limit=N`: items by status, [`crate::api::WorkList`].
    pub const WORK_LIST: &str = "/work";

    /// The path of one item's status.
    pub fn work(id: crate::WorkId) -> String {
        format!("/work/{id}")
    }

    /// The path that retries one item.
    pub fn work_retry(id: crate::WorkId) -> String {
        format!("/work/{id}/retry")
    }
}

/// Cluster status, metrics and liveness.
pub mod observability {
    /// `GET /status` (client token): the cluster as the answering node sees it (JSON).
    pub const STATUS: &str = "/status";
    /// `GET /metrics` (client token): Prometheus text.
    pub const METRICS: &str = "/metrics";
    /// `GET /health`, no token: a node's liveness and its view of the cluster,
    /// [`crate::api::Health`].
    pub const HEALTH: &str = "/health";
}

/// The dashboard page and the API's description (client token).
pub mod assets {
    pub const DASHBOARD: &str = "/";
    pub const OPENAPI: &str = "/openapi.json";
}

/// Cluster administration (admin credential).
pub mod admin {
    /// `POST /admin/max-workers` with [`crate::api::MaxWorkers`]: sets the worker budget.
    pub const MAX_WORKERS: &str = "/admin/max-workers";
    /// `POST` with [`crate::api::AddMember`]: adds a node, as a learner until it has caught
    /// up, then as a voter. Answers the new [`crate::api::Members`].
    pub const MEMBERS: &str = "/admin/members";
    /// `DELETE`: removes node `{id}` from the membership. Answers the new
    /// [`crate::api::Members`].
    pub const MEMBER: &str = "/admin/members/{id}";
}

/// The worker API: all `POST`, postcard bodies ([`crate::worker`]), the worker credential.
pub mod worker {
    pub const REGISTER: &str = "/worker/register";
    pub const LEASE: &str = "/worker/lease";
    pub const HEARTBEAT: &str = "/worker/heartbeat";
    pub const COMPLETE: &str = "/worker/complete";
    pub const EXIT: &str = "/worker/exit";
}

/// Between nodes and for worker instances.
pub mod internal {
    /// `POST`, peer credential: a follower's batch of requests for the leader (postcard).
    pub const PROPOSE: &str = "/internal/propose";
    /// `GET`, worker credential: the node's own binary, for new worker instances.
    pub const BINARY: &str = "/internal/binary";
    /// `POST`, peer credential: a witness that leads asks a caught-up endpoint to stand for
    /// election ([`crate::api::Handover`], postcard).
    pub const ELECT: &str = "/internal/elect";
}

/// Raft RPC (peer credential). The bodies are openraft's types, in `hashq-raft`'s network.
pub mod raft {
    pub const APPEND: &str = "/raft/append";
    pub const VOTE: &str = "/raft/vote";
    /// The snapshot stream ([`crate::codec::SNAPSHOT_STREAM`]).
    pub const SNAPSHOT: &str = "/raft/snapshot";
    /// `GET`: the init probe self-initialization uses, [`crate::api::InitState`] (JSON).
    pub const INIT: &str = "/raft/init";
}
