//! The nouns of the replicated queue: items, leases, workers, counts, and the ids (which
//! are the wire's, from `hashq-proto`).

use serde::{Deserialize, Serialize};

pub use hashq_proto::ids::{Digest, Millis, NodeId, WorkId, WorkerId, WorkerSecret};

/// Where an item is in its life.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Status {
    /// Waiting in the FIFO queue for a worker.
    Queued,
    /// Leased to a worker until the lease deadline.
    Running,
    /// Has its result, waiting to be pulled.
    Completed,
    /// Its result was handed out by a pullCompleted; kept for a retention window.
    Pulled,
    /// Its leases expired `max_attempts` times; kept, never silently dropped.
    Dead,
    /// A client cancelled it while it was queued or running (cluster version 3): kept with
    /// its payload, like a dead item, until a retry or the end of the dead retention.
    /// New variants go last: postcard encodes a variant by its index.
    Cancelled,
}

impl Status {
    /// The lowercase name used by the client API.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Pulled => "pulled",
            Status::Dead => "dead",
            Status::Cancelled => "cancelled",
        }
    }

    /// Parses [`Status::as_str`]'s names back.
    pub fn parse(name: &str) -> Option<Status> {
        [
            Status::Queued,
            Status::Running,
            Status::Completed,
            Status::Pulled,
            Status::Dead,
            Status::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// Whether the item has stopped for good unless someone acts: its result is there
    /// (`completed`, `pulled`) or it was given up (`dead`, `cancelled`).
    pub fn is_final(self) -> bool {
        !matches!(self, Status::Queued | Status::Running)
    }
}

/// A worker's claim on one item, fenced by `attempt`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Lease {
    pub worker: WorkerId,
    /// The fencing number: the item's `attempts` at the time the lease was granted.
    pub attempt: u32,
    pub deadline: Millis,
}

/// Where an item's payload is: the Raft log entry that carried its enqueue (that entry's term
/// and index) and the request's position in the entry. A payload is written once per node,
/// in the log (or, on a node that installed a snapshot, in the pack that came with it); the
/// state machine holds only this reference. The term tells a committed entry from an
/// uncommitted one that once had the same index in a node's log.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct PayloadRef {
    pub term: u64,
    pub index: u64,
    /// The request's position in the entry (low 16 bits) and the payload's position in the
    /// request (high 16 bits: a batch's part, [`PayloadRef::ordinal`]).
    pub ordinal: u32,
}

impl PayloadRef {
    /// Most requests one log entry holds, and most parts one batch holds: what the halves of
    /// an ordinal can name.
    pub const MAX_PARTS: usize = 1 << 16;

    /// The ordinal of part `part` of request `request` of an entry. Every payload of the
    /// builds before batches is part 0, whose ordinal is the request's position as it always
    /// was; `None` beyond [`PayloadRef::MAX_PARTS`].
    pub fn ordinal(request: usize, part: usize) -> Option<u32> {
        if request < Self::MAX_PARTS && part < Self::MAX_PARTS {
            Some((part as u32) << 16 | request as u32)
        } else {
            None
        }
    }

    /// The request's position and the part's, from an ordinal.
    pub fn split(ordinal: u32) -> (usize, usize) {
        ((ordinal & 0xffff) as usize, (ordinal >> 16) as usize)
    }
}

/// The priority of an item enqueued without one (cluster version 4): 0 to
/// [`MAX_PRIORITY`], higher first, FIFO within a priority.
pub const DEFAULT_PRIORITY: u8 = 5;
pub const MAX_PRIORITY: u8 = 9;

/// How many queued items each priority holds, by priority (index 0 to 9); the default
/// priority's entry stays 0 (its count is the rest of [`Counts::queued`]). Its own record
/// (`k`, cluster version 4), absent until an item of another priority is queued.
#[derive(Clone, Default, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct QueuedByPriority {
    pub queued: Vec<u64>,
}

/// Everything the state machine knows about one item; its payload is elsewhere
/// ([`PayloadRef`]).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Item {
    pub iterations: u32,
    /// Number of leases granted so far (each lease is one attempt).
    pub attempts: u32,
    pub status: Status,
    pub enqueued_at: Millis,
    /// When it last entered the queue (enqueue or requeue).
    pub queued_at: Millis,
    pub payload_len: u32,
    /// Held while the item is queued, running, dead or cancelled; a completed item's payload
    /// is gone.
    pub payload: PayloadRef,
    pub lease: Option<Lease>,
    pub completed_at: Option<Millis>,
    pub value: Option<Digest>,
    pub pulled_at: Option<Millis>,
    /// Why it is dead or cancelled, when it is.
    pub dead_reason: Option<String>,
    /// When it died or was cancelled: its retention counts from then, and its key in the
    /// dead index (which holds the cancelled items too) is made of it.
    pub dead_at: Option<Millis>,
}

/// A worker in the replicated worker table.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: WorkerId,
    /// The node that launched it (managed) or that it registered through (external).
    pub parent: NodeId,
    pub state: WorkerState,
    /// Managed workers hold a slot of the cluster-wide budget; external ones (started by
    /// hand) do not.
    pub managed: bool,
    /// When the slot was reserved or the worker registered.
    pub since: Millis,
    pub last_seen: Millis,
    /// Items currently leased to it.
    pub leased: u32,
    pub completed: u64,
    /// The launcher's handle: a pid for `local`, an instance id for `ec2`.
    pub handle: String,
    pub host: String,
    /// The last lease request and what it granted, so a retried request gets the same items.
    pub last_lease: Option<(u64, Vec<(WorkId, u32)>)>,
    /// What the worker must send with every request (see [`WorkerSecret`]).
    pub secret: WorkerSecret,
    /// For a reserved slot: the parent process the slot is for (see `Request::Reserve`).
    pub incarnation: u64,
}

/// The life of a worker slot.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum WorkerState {
    /// A slot is reserved and the launcher is starting the worker.
    Launching,
    /// The worker registered and is heartbeating.
    Running,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Launching => "launching",
            WorkerState::Running => "running",
        }
    }
}

/// The counts that cluster version 3 added, in a record of their own
/// ([`crate::keys::TALLIES`]): the [`Counts`] in the meta record keep the encoding every
/// earlier build reads. Absent means all zero.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Tallies {
    /// Cancelled items still kept (they count in [`Counts::payload_bytes`] too).
    pub cancelled: u64,
    pub cancelled_total: u64,
    /// Dead or cancelled items put back in the queue.
    pub retried_total: u64,
}

/// Running totals kept by the state machine so `/status` costs one read.
#[derive(Clone, Default, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Counts {
    pub queued: u64,
    pub running: u64,
    pub completed: u64,
    pub pulled: u64,
    pub dead: u64,
    /// Sum of `iterations` over queued items: the backlog's size in hashing work.
    pub queued_iterations: u64,
    /// Sum of payload bytes of items not yet completed.
    pub payload_bytes: u64,
    pub enqueued_total: u64,
    pub completed_total: u64,
    pub pulled_total: u64,
    pub expired_total: u64,
    pub completed_iterations_total: u64,
    /// Dead items and unpulled results dropped at the end of their retention.
    pub dropped_total: u64,
}
