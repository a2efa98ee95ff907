//! The meaning of the queue, in one place.
//!
//! [`apply`] takes a [`Command`] and a [`Kv`] and returns one [`Response`] per request. It is
//! pure: no clock (time comes from the command), no randomness, no I/O beyond the `Kv`, no
//! hash-map iteration order. The same log applied to the same state gives byte-identical state
//! on every replica, which is what makes Raft replication of it correct.
//!
//! Invariants it keeps (checked by the tests below):
//! - an item is in exactly one of: the queue, the lease index, the completed index, the pulled
//!   index, the dead index (dead and cancelled items); its `status` says which;
//! - every lease has a fencing `attempt` that only grows; a completion counts only if it names
//!   the current attempt of a running item, so there is exactly one result per work id;
//! - the number of managed workers (launching + running) never exceeds `max_workers` through a
//!   reservation;
//! - [`Counts`] equal what a full scan would count.
//!
//! Layout: this module holds the types, [`apply`] and the dispatch of each request; the
//! requests themselves are in `items` (enqueue, take, idempotency records), `leases`,
//! `workers` (budget and registration), `redrive` (cancel and retry) and `tick`
//! (housekeeping); `queries` holds the
//! read-only functions the node uses. Keys are typed by [`crate::keys::Key`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::command::{
    BatchItem, BatchSlot, Command, CommandResponse, Completion, Dedup, LeasedItem, Rejection,
    Request, Response, StoreLimits, TickParams, TickReport, RESULT_BYTES,
};
use crate::keys::{self, Key};
use crate::kv::{Kv, KvError, KvRead, Overlay};
use crate::types::{
    Counts, Item, Lease, Millis, NodeId, PayloadRef, Status, WorkId, WorkerId, WorkerRecord,
    WorkerSecret, WorkerState,
};

/// Most items one lease request may take.
pub const MAX_LEASE_BATCH: u32 = 1000;
/// Most payload bytes one lease grants (at least one item is always granted): the answer
/// carries the payloads, so it stays a few MiB however many small items a worker asks for.
pub const MAX_LEASE_BYTES: u64 = 8 << 20;
/// How much one lease request may take (see [`Request::Lease`]).
#[derive(Clone, Copy, Debug)]
struct Grant {
    max: u32,
    min: u32,
    max_iterations: u64,
}

/// Most items one take may return.
pub const MAX_TAKE: u32 = 100_000;
/// Longest lease a worker may ask for (one day).
pub const MAX_LEASE_MS: u64 = 24 * 3600 * 1000;
/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// The most one entry may move state-machine time (a monotonic clock that jumped, a leader
/// stamping nonsense): beyond it, time simply advances this much. Leaders propose an entry
/// at least every [`IDLE_ENTRY_MS`], so real steps stay far below it.
pub const MAX_TIME_STEP_MS: Millis = 600_000;

/// A leader with nothing else to propose proposes a [`Request::Noop`] this often, so state
/// machine time keeps moving in small steps.
pub const IDLE_ENTRY_MS: Millis = 30_000;

/// Where state-machine time was last advanced from: the leader's term and its monotonic
/// clock then.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Clock {
    pub term: u64,
    pub mono: u64,
}

/// The state machine's small, always-present record: counters, time and budget.
#[derive(Clone, Default, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Meta {
    /// State-machine time. It starts from the first leader's wall clock and then advances
    /// only by the leaders' monotonic clocks, entry by entry ([`advance`]): a leader whose
    /// wall clock jumps can neither expire leases early nor freeze time for its successors.
    pub now: Millis,
    pub clock: Clock,
    /// Nodes whose disk is below its free-space limit: while any is, enqueues are refused.
    pub disk_alarms: Vec<NodeId>,
    pub next_id: u64,
    pub next_completion: u64,
    pub next_worker: u64,
    /// The cluster-wide worker budget; `None` until the first leader sets its default.
    pub max_workers: Option<u32>,
    pub counts: Counts,
}

/// State-machine time after an entry of leader term `term`: the first entry ever takes the
/// leader's wall clock; then, within a term, time moves by the leader's monotonic clock
/// (at most [`MAX_TIME_STEP_MS`] per entry, never back); across terms it does not move on
/// the first entry (no two leaders' monotonic clocks compare), so the time of an election
/// is not counted: leases last a little longer, never shorter.
pub fn advance(meta: &Meta, cmd: &Command, term: u64) -> (Millis, Clock) {
    if meta.clock.term == 0 {
        // The first command (normal entries come from terms >= 1).
        return (
            meta.now.max(cmd.now),
            Clock {
                term,
                mono: cmd.mono,
            },
        );
    }
    if term == meta.clock.term {
        let step = cmd
            .mono
            .saturating_sub(meta.clock.mono)
            .min(MAX_TIME_STEP_MS);
        (
            meta.now + step,
            Clock {
                term,
                mono: meta.clock.mono.max(cmd.mono),
            },
        )
    } else {
        (
            meta.now,
            Clock {
                term,
                mono: cmd.mono,
            },
        )
    }
}

/// Which log entry a command is: payload references name it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct At {
    pub term: u64,
    pub index: u64,
}

/// Applies the command of log entry `at`. Each request applies in full or not at all: a
/// request that finds the state broken (a missing or undecodable record: the same on every
/// replica, since they hold the same state) is answered [`Rejection::Internal`] with nothing
/// of it written, so one bad entry never stops the cluster in a loop of replays. Only an I/O
/// error of the store is returned as `Err`; the caller then discards every write of the call.
pub fn apply<K: Kv>(kv: &mut K, cmd: &Command, at: At) -> Result<CommandResponse, KvError> {
    let mut meta = read_meta(kv)?;
    let (now, clock) = advance(&meta, cmd, at.term);
    meta.now = now;
    meta.clock = clock;
    let mut out = Vec::with_capacity(cmd.requests.len());
    let mut batches = items::BatchRecords::default();
    let mut payload_records = cluster_version(kv)? < crate::version::ITEM_PAYLOADS;
    for (ordinal, request) in cmd.requests.iter().enumerate() {
        if !matches!(request, Request::EnqueueInBatch { .. }) {
            // Anything else may read or expire a batch record: it sees them as written.
            batches.write(kv);
        }
        // An ordinal names a request in 16 bits (`PayloadRef::ordinal`); proposers send
        // entries of at most 1,024 requests.
        let Some(ordinal) = PayloadRef::ordinal(ordinal, 0) else {
            out.push(invalid("a log entry holds at most 65,536 requests"));
            continue;
        };
        let mut child = Overlay::new(&*kv);
        let mut m = Machine {
            kv: &mut child,
            now,
            meta: meta.clone(),
            limits: cmd.limits,
            here: PayloadRef {
                term: at.term,
                index: at.index,
                ordinal,
            },
            batches: &mut batches,
            batch_slot: None,
            payload_records,
        };
        match m.apply_one(request) {
            Ok(response) => {
                meta = m.meta;
                payload_records = m.payload_records;
                if let Some((key, slot, id)) = m.batch_slot.take() {
                    batches.add(key, slot, id);
                }
                for (key, value) in child.into_writes() {
                    match value {
                        Some(v) => kv.put(key, v),
                        None => kv.delete(key),
                    }
                }
                out.push(response);
            }
            Err(KvError::Corrupt { key, reason }) => {
                tracing::error!(%key, %reason, ?request, "a request found the state broken; refused on every replica");
                out.push(Response::Rejected(Rejection::Internal(format!(
                    "the state machine could not apply this request ({reason} under {key}); nothing of it was written"
                ))));
            }
            Err(e) => return Err(e),
        }
    }
    batches.write(kv);
    put_t(kv, keys::META.to_vec(), &meta);
    Ok(out)
}

struct Machine<'k, K: Kv> {
    kv: &'k mut K,
    now: Millis,
    meta: Meta,
    limits: StoreLimits,
    /// Where the request being applied is in the log: an enqueue's payload stays there.
    here: PayloadRef,
    /// The batch records of the run of batch enqueues being applied (see `items`).
    batches: &'k mut items::BatchRecords,
    /// The slot the request being applied took in its batch record, added to `batches`
    /// only if the request applies.
    batch_slot: Option<(Vec<u8>, u32, WorkId)>,
    /// Whether items keep a payload-reference record (`p`): before cluster version
    /// [`crate::version::ITEM_PAYLOADS`], whose builds find live payloads by them.
    payload_records: bool,
}

#[derive(Clone, Copy)]
enum Requeue {
    /// The lease ran out or its worker was lost: counts toward `max_attempts`.
    Failed { max_attempts: u32 },
    /// The worker gave the item back.
    Released,
}

impl<K: Kv> Machine<'_, K> {
    /// Raises the cluster version (never lowers it). Reaching
    /// [`crate::version::ITEM_PAYLOADS`] deletes every payload-reference record: one pass
    /// over the live items, once in the cluster's life.
    fn set_cluster_version(&mut self, version: u32) -> Result<Response, KvError> {
        if version <= queries::cluster_version(self.kv)? {
            return Ok(Response::Done);
        }
        self.kv.put(
            keys::CLUSTER_VERSION.to_vec(),
            version.to_be_bytes().to_vec(),
        );
        if version >= crate::version::ITEM_PAYLOADS && self.payload_records {
            let (start, end) = keys::table(keys::PAYLOAD);
            let records: Vec<Vec<u8>> = self
                .kv
                .scan(&start, &end, false)
                .map(|pair| pair.map(|(k, _)| k))
                .collect::<Result<_, _>>()?;
            for key in records {
                self.kv.delete(key);
            }
            self.payload_records = false;
        }
        Ok(Response::Done)
    }

    fn apply_one(&mut self, request: &Request) -> Result<Response, KvError> {
        match request {
            Request::Enqueue {
                iterations,
                payload,
                dedup,
            } => self.enqueue(*iterations, payload.len(), dedup.as_ref()),
            Request::EnqueueInBatch {
                iterations,
                payload,
                batch,
            } => self.enqueue_in_batch(*iterations, payload.len(), batch),
            Request::EnqueueBatch { items, dedup } => self.enqueue_batch(items, dedup),
            Request::Take { top, dedup } => self.take(*top, dedup.as_ref()),
            Request::Register {
                slot,
                parent,
                host,
                handle,
                secret,
            } => self.register(*slot, *parent, host, handle, *secret),
            Request::Lease {
                worker,
                secret,
                max,
                min,
                max_iterations,
                lease_ms,
                request_id,
            } => self.lease(
                *worker,
                *secret,
                Grant {
                    max: *max,
                    min: *min,
                    max_iterations: *max_iterations,
                },
                *lease_ms,
                *request_id,
            ),
            Request::Heartbeat {
                worker,
                secret,
                items,
                lease_ms,
                parent,
            } => self.heartbeat(*worker, *secret, items, *lease_ms, *parent),
            Request::Complete {
                worker,
                secret,
                results,
            } => self.complete(*worker, *secret, results),
            Request::Release {
                worker,
                secret,
                items,
            } => self.release(*worker, *secret, items),
            Request::Exit { worker, secret } => self.exit(*worker, *secret),
            Request::Forget {
                worker,
                max_attempts,
            } => {
                if self.worker(*worker)?.is_some() {
                    let max_attempts = (*max_attempts).max(1);
                    self.reclaim(*worker, Requeue::Failed { max_attempts })?;
                    self.kv.delete(keys::worker(*worker));
                }
                Ok(Response::Done)
            }
            Request::Reserve {
                parent,
                incarnation,
            } => self.reserve(*parent, *incarnation),
            Request::Launched { worker, handle } => self.launched(*worker, handle),
            Request::LaunchFailed { worker, .. } => self.launch_failed(*worker),
            Request::SetMaxWorkers { max, only_if_unset } => {
                if !(*only_if_unset && self.meta.max_workers.is_some()) {
                    self.meta.max_workers = Some(*max);
                }
                Ok(Response::Done)
            }
            Request::Tick(params) => self.tick(params),
            Request::Noop => Ok(Response::Done),
            Request::SetClusterVersion { version } => self.set_cluster_version(*version),
            Request::Cancel { id } => self.cancel(*id),
            Request::Retry { id } => self.retry(*id),
            Request::DiskAlarm { node, low } => {
                let alarms = &mut self.meta.disk_alarms;
                alarms.retain(|n| n != node);
                if *low {
                    alarms.push(*node);
                    alarms.sort_unstable();
                }
                Ok(Response::Done)
            }
        }
    }

    fn item(&self, id: WorkId) -> Result<Item, KvError> {
        self.maybe_item(id)?
            .ok_or_else(|| corrupt(&keys::item(id), "indexed item is missing"))
    }

    fn maybe_item(&self, id: WorkId) -> Result<Option<Item>, KvError> {
        get_t(self.kv, &keys::item(id))
    }

    fn worker(&self, id: WorkerId) -> Result<Option<WorkerRecord>, KvError> {
        get_t(self.kv, &keys::worker(id))
    }

    /// The worker record, if `secret` is the one it registered with. A slot reserved but not
    /// yet claimed has no secret anyone knows (registration sets it), so it never matches.
    fn authentic_worker(
        &self,
        id: WorkerId,
        secret: WorkerSecret,
    ) -> Result<Option<WorkerRecord>, KvError> {
        Ok(self
            .worker(id)?
            .filter(|w| w.state == WorkerState::Running && w.secret == secret))
    }

    fn put_worker(&mut self, record: &WorkerRecord) {
        put_t(self.kv, keys::worker(record.id), record);
    }
}

fn invalid(message: &str) -> Response {
    Response::Rejected(Rejection::Invalid(message.to_string()))
}

fn corrupt(key: &[u8], reason: &str) -> KvError {
    KvError::Corrupt {
        key: hex::encode(key),
        reason: reason.to_string(),
    }
}

/// The work id in a key of a table keyed by item.
fn key_id(key: &[u8]) -> Result<WorkId, KvError> {
    Key::decode(key)
        .and_then(|k| k.work_id())
        .ok_or_else(|| corrupt(key, "malformed key"))
}

fn decode_u64(key: &[u8], bytes: &[u8]) -> Result<u64, KvError> {
    let arr: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt(key, "expected an 8-byte id"))?;
    Ok(u64::from_be_bytes(arr))
}

fn get_t<T: DeserializeOwned>(kv: &impl KvRead, key: &[u8]) -> Result<Option<T>, KvError> {
    match kv.get(key)? {
        None => Ok(None),
        Some(bytes) => codec::decode("state record", &bytes)
            .map(Some)
            .map_err(|e| corrupt(key, &e.to_string())),
    }
}

fn put_t<T: Serialize>(kv: &mut impl Kv, key: Vec<u8>, value: &T) {
    kv.put(key, codec::encode(value));
}

mod items;
mod leases;
mod priority;
mod queries;
mod redrive;
mod tick;
mod workers;

pub use priority::{priority, queue_keys, queued_by_priority};
pub use queries::{
    cluster_version, decode_payload_record, holds_payload, item, list_items, live_payload_of,
    live_payloads, oldest_queued, payload_floor, payload_floor_from, read_meta, stored,
    take_key_used, tallies, workers, ItemPage, LogOrder,
};
pub use tick::tick_due;

#[cfg(test)]
mod tests;
