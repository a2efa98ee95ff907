//! What goes through the Raft log and what comes back.
//!
//! A [`Command`] is one log entry: a batch of [`Request`]s proposed together, with the one
//! timestamp the leader stamped on it. Batching is how hashq reaches its throughput: one log
//! entry, one replication round and one flush carry many client requests.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use hashq_proto::worker::Completion;

use crate::codec;
use crate::types::{Digest, Millis, NodeId, Status, WorkId, WorkerId, WorkerSecret};

/// One Raft log entry's application data.
///
/// Encoded with a version tag first (see [`CommandWire`]), in the log and on the wire alike,
/// so a later release can add fields and still read every entry written before it.
#[derive(Clone, PartialEq, Eq)]
pub struct Command {
    /// The leader's wall clock when it proposed this entry: where state-machine time starts,
    /// and what the nodes compare their own clocks with (the skew metric).
    pub now: Millis,
    /// The leader's monotonic clock (milliseconds since it started): within a term,
    /// state-machine time advances by its difference between entries
    /// ([`crate::machine::advance`]).
    pub mono: u64,
    /// The leader's bounds on what the queue may hold: checked at apply, so concurrent
    /// enqueues cannot overshoot them and every replica decides the same.
    pub limits: StoreLimits,
    pub requests: Vec<Request>,
}

/// Bounds on the state the queue keeps, stamped by the leader into every command.
///
/// Items are everything that holds a payload or an unpulled result (queued, running,
/// completed, dead); bytes are their payloads plus [`RESULT_BYTES`] per unpulled result.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct StoreLimits {
    pub max_items: u64,
    pub max_bytes: u64,
}

impl StoreLimits {
    /// No bounds (tests, and commands that add nothing).
    pub const UNLIMITED: StoreLimits = StoreLimits {
        max_items: u64::MAX,
        max_bytes: u64::MAX,
    };
}

/// What one unpulled result counts against [`StoreLimits::max_bytes`]: its digest and its
/// share of the item record.
pub const RESULT_BYTES: u64 = 128;

/// The versions of [`Command`]'s encoding: postcard writes the variant index first. A new
/// field means a new variant here; decoding keeps converting the old ones.
#[derive(Serialize)]
enum CommandWire<'a> {
    V1(CommandV1Ref<'a>),
}

#[derive(Serialize)]
struct CommandV1Ref<'a> {
    now: Millis,
    mono: u64,
    limits: StoreLimits,
    requests: &'a [Request],
}

#[derive(Deserialize)]
enum CommandWireIn {
    V1(CommandV1),
}

#[derive(Deserialize)]
struct CommandV1 {
    now: Millis,
    mono: u64,
    limits: StoreLimits,
    requests: Vec<Request>,
}

impl Serialize for Command {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        CommandWire::V1(CommandV1Ref {
            now: self.now,
            mono: self.mono,
            limits: self.limits,
            requests: &self.requests,
        })
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match CommandWireIn::deserialize(deserializer)? {
            CommandWireIn::V1(c) => Ok(Command {
                now: c.now,
                mono: c.mono,
                limits: c.limits,
                requests: c.requests,
            }),
        }
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Command")
            .field("now", &self.now)
            .field("requests", &self.requests)
            .finish()
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Command(now={}, {} requests)",
            self.now,
            self.requests.len()
        )
    }
}

/// The responses to a [`Command`], one per request, in order.
pub type CommandResponse = Vec<Response>;

/// A client's or worker's intent, without a time: the leader adds the time.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Add an item to the queue.
    Enqueue {
        iterations: u32,
        /// Written once, in the log entry; the state machine keeps only a
        /// [`crate::types::PayloadRef`] to it.
        #[serde(deserialize_with = "codec::shared_bytes")]
        payload: Bytes,
        /// A retry with the same key returns the first call's work id and adds nothing.
        dedup: Option<Dedup>,
    },
    /// Take up to `top` completed items, most recently completed first, marking them pulled.
    Take {
        top: u32,
        /// A retry with the same key returns the first call's items.
        dedup: Option<Dedup>,
    },
    /// A worker introduces itself. With `slot`, it claims the budget slot the cluster
    /// reserved for it; without, it is an external worker that holds no slot.
    Register {
        slot: Option<WorkerId>,
        parent: NodeId,
        host: String,
        handle: String,
        /// Drawn by the proposing node; every later request of the worker must carry it.
        secret: WorkerSecret,
    },
    /// Lease up to `max` queued items, FIFO, until `now + lease_ms`. The first `min` are
    /// granted whatever their size; beyond them, only while the grant's iterations stay
    /// within `max_iterations` (a worker's prefetch of quick items never takes slow ones).
    /// At most [`crate::machine::MAX_LEASE_BYTES`] of payload, but always one item.
    Lease {
        worker: WorkerId,
        secret: WorkerSecret,
        max: u32,
        min: u32,
        max_iterations: u64,
        lease_ms: u64,
        /// Grows with every new request of a worker. Retrying the same id returns the same
        /// grant; an id older than the last one gets nothing.
        request_id: u64,
    },
    /// Extend the leases the worker still holds; answers which ones it lost. A worker whose
    /// parent node died names its new parent here.
    Heartbeat {
        worker: WorkerId,
        secret: WorkerSecret,
        items: Vec<(WorkId, u32)>,
        lease_ms: u64,
        parent: Option<NodeId>,
    },
    /// Deliver results. The first completion of the current attempt by the worker holding its
    /// lease wins; any other (stale, duplicate, another worker's, a wrong secret) is
    /// acknowledged and ignored.
    Complete {
        worker: WorkerId,
        secret: WorkerSecret,
        results: Vec<Completion>,
    },
    /// Give leases back to the queue (a worker shutting down).
    Release {
        worker: WorkerId,
        secret: WorkerSecret,
        items: Vec<(WorkId, u32)>,
    },
    /// A worker leaves: its leases go back to the queue and its slot is freed.
    Exit {
        worker: WorkerId,
        secret: WorkerSecret,
    },
    /// Reserve a budget slot for a worker that `parent` is about to launch. `incarnation`
    /// names the parent's current process: a parent that restarts gets another and never
    /// launches a slot reserved for its earlier self (which may have launched it already).
    Reserve { parent: NodeId, incarnation: u64 },
    /// The launcher started the worker of a reserved slot.
    Launched { worker: WorkerId, handle: String },
    /// The launch failed; the slot is freed.
    LaunchFailed { worker: WorkerId, reason: String },
    /// The worker is gone (its machine vanished, found by a launcher's reconciliation): its
    /// leases go back to the queue as failed attempts and its slot is freed.
    Forget { worker: WorkerId, max_attempts: u32 },
    /// Set the cluster-wide worker budget. `only_if_unset` makes it a bootstrap default.
    SetMaxWorkers { max: u32, only_if_unset: bool },
    /// Housekeeping at the stamped time: expire leases, declare silent workers lost, forget
    /// pulled items past their retention and idempotency keys past their ttl.
    Tick(TickParams),
    /// A node's disk went below (or back above) its free-space limit. While any node is low,
    /// enqueues are refused; pulls, completions and reads go on.
    DiskAlarm { node: NodeId, low: bool },
    /// Does nothing. A node repairing lost log entries proposes it now and then, so that an
    /// idle cluster's log still grows past what that node had before.
    Noop,
    /// Add an item to the queue, as one of a batch that a node proposed without client keys.
    /// A retry names the batch and its place in it ([`BatchSlot`]), so one record per batch,
    /// not one key per request, keeps it from applying twice.
    ///
    /// New variants go last: postcard encodes a variant by its index, and the log holds
    /// entries written by every earlier release.
    EnqueueInBatch {
        iterations: u32,
        #[serde(deserialize_with = "codec::shared_bytes")]
        payload: Bytes,
        batch: BatchSlot,
    },
    /// Raise the cluster version ([`crate::version`]) to `version`; a lower one changes
    /// nothing. Proposed only once every member supports `version`.
    SetClusterVersion { version: u32 },
    /// Cancel an item (cluster version 3, [`crate::version::CANCEL`]): a queued or running
    /// one becomes cancelled, its lease fenced (its worker hears it on its next heartbeat
    /// and no result is stored for it). Answers [`Response::ItemStatus`]: `cancelled`, or
    /// the status that kept it from being cancelled (completed, pulled, dead).
    Cancel { id: WorkId },
    /// Put a dead or cancelled item back in the queue with its attempts reset (cluster
    /// version 3); a queued or running item is left as it is, so the request is idempotent.
    /// Answers [`Response::ItemStatus`] with the item's status afterwards: `queued` or
    /// `running`, or `completed`/`pulled` for an item that has its result.
    Retry { id: WorkId },
    /// Add many items at once, each with its priority (cluster version 4,
    /// [`crate::version::BATCH`]; also how one item of a priority other than the default is
    /// enqueued): all of them or,
    /// when one is invalid or the store cannot hold them all, none. Their payloads stay in
    /// this entry, part `k` at ordinal [`crate::types::PayloadRef::ordinal`]`(request, k)`.
    /// The key (the client's, or one the node drew) makes a retry answer the first call's
    /// ids; the ids are consecutive, in part order.
    EnqueueBatch { items: Vec<BatchItem>, dedup: Dedup },
}

/// One item of a [`Request::EnqueueBatch`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItem {
    pub iterations: u32,
    /// 0 to [`crate::types::MAX_PRIORITY`], higher first
    /// ([`crate::types::DEFAULT_PRIORITY`] for an item without one).
    pub priority: u8,
    #[serde(deserialize_with = "codec::shared_bytes")]
    pub payload: Bytes,
}

impl Request {
    /// Payload `part` of an enqueue (its only one is part 0) or of a batch: written once, in
    /// the log entry, and read back from there by its ordinal ([`Command::payload`]).
    pub fn payload(&self, part: usize) -> Option<&Bytes> {
        match self {
            Request::Enqueue { payload, .. } | Request::EnqueueInBatch { payload, .. } => {
                (part == 0).then_some(payload)
            }
            Request::EnqueueBatch { items, .. } => items.get(part).map(|i| &i.payload),
            _ => None,
        }
    }

    /// Roughly what the request takes in a log entry, in memory and on the wire: its
    /// payloads plus a little for the rest.
    pub fn size_hint(&self) -> usize {
        match self {
            Request::Enqueue { payload, .. } | Request::EnqueueInBatch { payload, .. } => {
                payload.len() + 64
            }
            Request::EnqueueBatch { items, .. } => {
                items.iter().map(|i| i.payload.len() + 16).sum::<usize>() + 64
            }
            _ => 64,
        }
    }
}

impl Command {
    /// Roughly what the entry takes in memory and on the wire: its requests' size hints.
    pub fn size_hint(&self) -> usize {
        self.requests.iter().map(Request::size_hint).sum()
    }

    /// The payload at `ordinal` ([`crate::types::PayloadRef::ordinal`]) of this entry.
    pub fn payload(&self, ordinal: u32) -> Option<&Bytes> {
        let (request, part) = crate::types::PayloadRef::split(ordinal);
        self.requests.get(request)?.payload(part)
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Enqueue {
                iterations,
                payload,
                dedup,
            } => f
                .debug_struct("Enqueue")
                .field("iterations", iterations)
                .field("payload_len", &payload.len())
                .field("dedup", dedup)
                .finish(),
            Request::EnqueueInBatch {
                iterations,
                payload,
                batch,
            } => f
                .debug_struct("EnqueueInBatch")
                .field("iterations", iterations)
                .field("payload_len", &payload.len())
                .field("batch", batch)
                .finish(),
            Request::Take { top, dedup } => f
                .debug_struct("Take")
                .field("top", top)
                .field("dedup", dedup)
                .finish(),
            Request::Register { slot, parent, .. } => f
                .debug_struct("Register")
                .field("slot", slot)
                .field("parent", parent)
                .finish(),
            Request::Lease { worker, max, .. } => f
                .debug_struct("Lease")
                .field("worker", worker)
                .field("max", max)
                .finish(),
            Request::Heartbeat { worker, items, .. } => f
                .debug_struct("Heartbeat")
                .field("worker", worker)
                .field("items", &items.len())
                .finish(),
            Request::Complete {
                worker, results, ..
            } => f
                .debug_struct("Complete")
                .field("worker", worker)
                .field("results", &results.len())
                .finish(),
            Request::Release { worker, items, .. } => f
                .debug_struct("Release")
                .field("worker", worker)
                .field("items", &items.len())
                .finish(),
            Request::Exit { worker, .. } => f.debug_struct("Exit").field("worker", worker).finish(),
            Request::Forget { worker, .. } => {
                f.debug_struct("Forget").field("worker", worker).finish()
            }
            Request::Reserve { parent, .. } => {
                f.debug_struct("Reserve").field("parent", parent).finish()
            }
            Request::Launched { worker, handle } => f
                .debug_struct("Launched")
                .field("worker", worker)
                .field("handle", handle)
                .finish(),
            Request::LaunchFailed { worker, reason } => f
                .debug_struct("LaunchFailed")
                .field("worker", worker)
                .field("reason", reason)
                .finish(),
            Request::SetMaxWorkers { max, only_if_unset } => f
                .debug_struct("SetMaxWorkers")
                .field("max", max)
                .field("only_if_unset", only_if_unset)
                .finish(),
            Request::Tick(p) => f.debug_tuple("Tick").field(p).finish(),
            Request::Noop => f.write_str("Noop"),
            Request::SetClusterVersion { version } => f
                .debug_struct("SetClusterVersion")
                .field("version", version)
                .finish(),
            Request::Cancel { id } => f.debug_struct("Cancel").field("id", id).finish(),
            Request::Retry { id } => f.debug_struct("Retry").field("id", id).finish(),
            Request::EnqueueBatch { items, dedup } => f
                .debug_struct("EnqueueBatch")
                .field("items", &items.len())
                .field(
                    "payload_bytes",
                    &items.iter().map(|i| i.payload.len()).sum::<usize>(),
                )
                .field("dedup", dedup)
                .finish(),
            Request::DiskAlarm { node, low } => f
                .debug_struct("DiskAlarm")
                .field("node", node)
                .field("low", low)
                .finish(),
        }
    }
}

/// An idempotency key and how long the state machine remembers it.
///
/// Clients' `Idempotency-Key`s are kept for the configured retention; a node also gives every
/// enqueue and take it proposes a key of its own, kept briefly, so that it can retry through a
/// leader change without ever applying a request twice.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Dedup {
    pub key: String,
    pub ttl_ms: u64,
}

/// Where a request sits in the batch its node first proposed it in: the batch's key (drawn
/// by the node, kept `ttl_ms` like a [`Dedup`] key) and the request's slot in it. The state
/// machine keeps one record per batch key with the work id of every slot applied, whatever
/// entry each slot was applied in: a batch that failed with an unknown outcome is retried
/// request by request, in other batches, and still applies each request once.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct BatchSlot {
    pub key: String,
    pub slot: u32,
    pub ttl_ms: u64,
}

/// The knobs of a [`Request::Tick`], chosen by the leader's config and carried in the log so
/// that every replica applies the same rules.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TickParams {
    /// An item whose lease expires with `attempts >= max_attempts` becomes dead.
    pub max_attempts: u32,
    /// A running worker not seen for this long is lost: its leases are reclaimed, its slot freed.
    pub worker_lost_ms: u64,
    /// A reserved slot whose worker has not registered after this long is freed.
    pub launch_timeout_ms: u64,
    /// Pulled items are forgotten after this long.
    pub pulled_retention_ms: u64,
    /// Completed results nobody pulled are dropped after this long.
    pub completed_retention_ms: u64,
    /// Dead items (and their payloads) are dropped after this long.
    pub dead_retention_ms: u64,
    /// At most this many expiries and deletions per tick, to keep entries small.
    pub limit: u32,
}

/// The answer to one [`Request`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Response {
    Enqueued {
        id: WorkId,
        /// True when an idempotency key matched an earlier enqueue.
        duplicate: bool,
    },
    Taken {
        items: Vec<(WorkId, Digest)>,
        /// True when an idempotency key matched an earlier take.
        replay: bool,
    },
    Registered {
        worker: WorkerId,
    },
    Leased {
        items: Vec<LeasedItem>,
    },
    HeartbeatAck {
        /// Items whose leases were extended.
        valid: Vec<WorkId>,
        /// Items the worker no longer holds (expired, re-leased or completed): stop them.
        lost: Vec<WorkId>,
    },
    CompleteAck {
        accepted: u32,
        ignored: u32,
    },
    Released {
        count: u32,
    },
    Reserved {
        worker: Option<WorkerId>,
    },
    Ticked(TickReport),
    /// The request was applied and has nothing to report.
    Done,
    /// The request was not applied; nothing changed.
    Rejected(Rejection),
    /// An item's status after the request (`None`: there is no such item).
    ItemStatus(Option<Status>),
    /// A batch's work ids, in part order (cluster version 4).
    EnqueuedBatch {
        ids: Vec<WorkId>,
        /// True when the key matched an earlier batch: these are its ids, nothing was added.
        duplicate: bool,
    },
}

/// Why a request was refused by the state machine.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Rejection {
    /// The worker is not in the worker table (never registered, exited, or declared lost).
    UnknownWorker(WorkerId),
    /// The slot a worker tried to claim is not reserved (released, or never existed).
    UnknownSlot(WorkerId),
    /// The request's parameters are out of range.
    Invalid(String),
    /// The queue holds as many items or bytes as [`StoreLimits`] allow.
    BacklogFull { items: u64, bytes: u64 },
    /// These nodes' disks are below their free-space limit: no enqueue until they recover.
    DiskFull { nodes: Vec<NodeId> },
    /// The request found the state machine's records broken; nothing of it was applied.
    Internal(String),
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::UnknownWorker(w) => write!(f, "unknown worker {w}"),
            Rejection::UnknownSlot(w) => write!(f, "slot {w} is not reserved"),
            Rejection::Invalid(m) => write!(f, "{m}"),
            Rejection::BacklogFull { items, bytes } => write!(
                f,
                "the backlog is full ({items} items, {bytes} bytes stored); retry later"
            ),
            Rejection::DiskFull { nodes } => write!(
                f,
                "nodes {nodes:?} are short of disk space: enqueues are refused until they recover"
            ),
            Rejection::Internal(m) => write!(f, "{m}"),
        }
    }
}

/// One item granted by a lease. The payload is not part of the state machine's answer: the
/// leader reads it from its store after apply and attaches it on the way out.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct LeasedItem {
    pub id: WorkId,
    pub attempt: u32,
    pub iterations: u32,
    pub deadline: Millis,
}

/// What a tick did, so the leader can act on it (kill lost workers' processes).
#[derive(Clone, Default, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TickReport {
    pub expired: u32,
    pub dead: u32,
    /// Workers declared lost (or slots that never launched), with their launcher handles.
    pub lost_workers: Vec<(WorkerId, String)>,
    pub forgotten: u32,
}
