//! The meaning of the queue, in one place.
//!
//! [`apply`] takes a [`Command`] and a [`Kv`] and returns one [`Response`] per request. It is
//! pure: no clock (time comes from the command), no randomness, no I/O beyond the `Kv`, no
//! hash-map iteration order. The same log applied to the same state gives byte-identical state
//! on every replica, which is what makes Raft replication of it correct.
//!
//! Invariants it keeps (checked by the tests below):
//! - an item is in exactly one of: the queue, the lease index, the completed index, the pulled
//!   index, the dead index; its `status` says which;
//! - every lease has a fencing `attempt` that only grows; a completion counts only if it names
//!   the current attempt of a running item, so there is exactly one result per work id;
//! - the number of managed workers (launching + running) never exceeds `max_workers` through a
//!   reservation;
//! - [`Counts`] equal what a full scan would count.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::command::{
    BatchSlot, Command, CommandResponse, Completion, Dedup, LeasedItem, Rejection, Request,
    Response, StoreLimits, TickParams, TickReport, RESULT_BYTES,
};
use crate::keys;
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

#[derive(Clone, Debug, Serialize, Deserialize)]
struct EnqueueKey {
    id: WorkId,
}

/// What a [`BatchSlot`] key remembers: the work id of each slot of the batch applied so far.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct BatchRecord {
    slots: Vec<(u32, WorkId)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct TakeKey {
    items: Vec<(WorkId, crate::types::Digest)>,
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
    for (ordinal, request) in cmd.requests.iter().enumerate() {
        let mut child = Overlay::new(&*kv);
        let mut m = Machine {
            kv: &mut child,
            now,
            meta: meta.clone(),
            limits: cmd.limits,
            here: PayloadRef {
                term: at.term,
                index: at.index,
                ordinal: ordinal as u32,
            },
        };
        match m.apply_one(request) {
            Ok(response) => {
                meta = m.meta;
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
}

#[derive(Clone, Copy)]
enum Requeue {
    /// The lease ran out or its worker was lost: counts toward `max_attempts`.
    Failed { max_attempts: u32 },
    /// The worker gave the item back.
    Released,
}

impl<K: Kv> Machine<'_, K> {
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

    fn enqueue(
        &mut self,
        iterations: u32,
        payload_len: usize,
        dedup: Option<&Dedup>,
    ) -> Result<Response, KvError> {
        match self.remembered::<EnqueueKey>(keys::ENQUEUE_KEY, dedup)? {
            Remembered::Invalid(r) => return Ok(r),
            Remembered::Seen(prev) => {
                return Ok(Response::Enqueued {
                    id: prev.id,
                    duplicate: true,
                })
            }
            Remembered::New => {}
        }
        let response = self.add_item(iterations, payload_len)?;
        if let (Some(dedup), Response::Enqueued { id, .. }) = (dedup, &response) {
            self.remember_key(keys::ENQUEUE_KEY, dedup, &EnqueueKey { id: *id });
        }
        Ok(response)
    }

    /// An enqueue without a client key, by its place in the batch its node first proposed it
    /// in: the batch's record says whether that slot was applied already (in this entry or
    /// an earlier one) and with which id.
    fn enqueue_in_batch(
        &mut self,
        iterations: u32,
        payload_len: usize,
        batch: &BatchSlot,
    ) -> Result<Response, KvError> {
        if batch.key.len() > MAX_IDEMPOTENCY_KEY {
            return Ok(invalid("idempotency key too long"));
        }
        let key = keys::idempotency(keys::ENQUEUE_KEY, &batch.key);
        let known: Option<BatchRecord> = get_t(self.kv, &key)?;
        if let Some(&(_, id)) = known
            .as_ref()
            .and_then(|r| r.slots.iter().find(|(slot, _)| *slot == batch.slot))
        {
            return Ok(Response::Enqueued {
                id,
                duplicate: true,
            });
        }
        let response = self.add_item(iterations, payload_len)?;
        if let Response::Enqueued { id, .. } = response {
            let is_new = known.is_none();
            let mut record = known.unwrap_or_default();
            record.slots.push((batch.slot, id));
            // Within one entry the overlay folds the record's rewrites into one write.
            put_t(self.kv, key, &record);
            if is_new {
                self.expire_key(keys::ENQUEUE_KEY, &batch.key, batch.ttl_ms);
            }
        }
        Ok(response)
    }

    /// A new queued item whose payload is the request being applied, within the store's
    /// bounds.
    fn add_item(&mut self, iterations: u32, payload_len: usize) -> Result<Response, KvError> {
        if iterations == 0 {
            return Ok(invalid("iterations must be at least 1"));
        }
        let Ok(payload_len) = u32::try_from(payload_len) else {
            return Ok(invalid("payload too large"));
        };
        if !self.meta.disk_alarms.is_empty() {
            return Ok(Response::Rejected(Rejection::DiskFull {
                nodes: self.meta.disk_alarms.clone(),
            }));
        }
        let (items, bytes) = stored(&self.meta.counts);
        if items >= self.limits.max_items
            || bytes.saturating_add(u64::from(payload_len)) > self.limits.max_bytes
        {
            return Ok(Response::Rejected(Rejection::BacklogFull { items, bytes }));
        }
        let id = WorkId(self.meta.next_id);
        self.meta.next_id += 1;
        let item = Item {
            iterations,
            attempts: 0,
            status: Status::Queued,
            enqueued_at: self.now,
            queued_at: self.now,
            payload_len,
            payload: self.here,
            lease: None,
            completed_at: None,
            value: None,
            pulled_at: None,
            dead_reason: None,
            dead_at: None,
        };
        put_t(self.kv, keys::item(id), &item);
        self.kv
            .put(keys::payload(&self.here), payload_record(&self.here, id));
        self.kv.put(keys::queue(id), Vec::new());
        let c = &mut self.meta.counts;
        c.queued += 1;
        c.queued_iterations += u64::from(iterations);
        c.payload_bytes += u64::from(payload_len);
        c.enqueued_total += 1;
        Ok(Response::Enqueued {
            id,
            duplicate: false,
        })
    }

    fn take(&mut self, top: u32, dedup: Option<&Dedup>) -> Result<Response, KvError> {
        match self.remembered::<TakeKey>(keys::TAKE_KEY, dedup)? {
            Remembered::Invalid(r) => return Ok(r),
            Remembered::Seen(prev) => {
                return Ok(Response::Taken {
                    items: prev.items,
                    replay: true,
                })
            }
            Remembered::New => {}
        }
        let top = top.min(MAX_TAKE) as usize;
        let (start, end) = keys::table(keys::COMPLETED);
        let newest: Vec<(Vec<u8>, Vec<u8>)> = self
            .kv
            .scan(&start, &end, true)
            .take(top)
            .collect::<Result<_, _>>()?;
        let mut items = Vec::with_capacity(newest.len());
        for (ckey, id_bytes) in newest {
            let id = WorkId(decode_u64(&ckey, &id_bytes)?);
            self.kv.delete(ckey);
            let mut item = self.item(id)?;
            let value = item
                .value
                .ok_or_else(|| corrupt(&keys::item(id), "completed item without value"))?;
            item.status = Status::Pulled;
            item.pulled_at = Some(self.now);
            put_t(self.kv, keys::item(id), &item);
            self.kv.put(keys::pulled(self.now, id), Vec::new());
            let c = &mut self.meta.counts;
            c.completed -= 1;
            c.pulled += 1;
            c.pulled_total += 1;
            items.push((id, value));
        }
        if let Some(dedup) = dedup {
            self.remember_key(
                keys::TAKE_KEY,
                dedup,
                &TakeKey {
                    items: items.clone(),
                },
            );
        }
        Ok(Response::Taken {
            items,
            replay: false,
        })
    }

    fn register(
        &mut self,
        slot: Option<WorkerId>,
        parent: NodeId,
        host: &str,
        handle: &str,
        secret: WorkerSecret,
    ) -> Result<Response, KvError> {
        let mut record = match slot {
            // A slot is claimed once: by the first process to register for it, or again by
            // the same process (same handle) retrying. A second process launched for the same
            // slot (a launcher that crashed and relaunched) is refused and exits.
            Some(slot) => match self.worker(slot)? {
                Some(w) if w.managed && claims(&w, handle) => w,
                _ => return Ok(Response::Rejected(Rejection::UnknownSlot(slot))),
            },
            None => {
                let id = WorkerId(self.meta.next_worker);
                self.meta.next_worker += 1;
                WorkerRecord {
                    id,
                    parent,
                    state: WorkerState::Running,
                    managed: false,
                    since: self.now,
                    last_seen: self.now,
                    leased: 0,
                    completed: 0,
                    handle: String::new(),
                    host: String::new(),
                    last_lease: None,
                    secret,
                    incarnation: 0,
                }
            }
        };
        // A process registering again (a retry) proves itself with the newest secret.
        record.secret = secret;
        record.state = WorkerState::Running;
        record.last_seen = self.now;
        record.host = host.to_string();
        if !handle.is_empty() {
            record.handle = handle.to_string();
        }
        let worker = record.id;
        self.put_worker(&record);
        Ok(Response::Registered { worker })
    }

    fn lease(
        &mut self,
        worker: WorkerId,
        secret: WorkerSecret,
        grant: Grant,
        lease_ms: u64,
        request_id: u64,
    ) -> Result<Response, KvError> {
        let Some(mut record) = self.authentic_worker(worker, secret)? else {
            return Ok(Response::Rejected(Rejection::UnknownWorker(worker)));
        };
        if lease_ms == 0 || lease_ms > MAX_LEASE_MS {
            return Ok(invalid("lease_ms out of range"));
        }
        record.last_seen = self.now;
        if let Some((last_request, granted)) = &record.last_lease {
            if request_id < *last_request {
                // A late duplicate of a request the worker has moved past: grant nothing,
                // or its items would sit leased to nobody until the lease ran out.
                self.put_worker(&record);
                return Ok(Response::Leased { items: Vec::new() });
            }
            if *last_request == request_id {
                // A retried request: hand back what the first one granted and still holds.
                let mut items = Vec::new();
                for &(id, attempt) in granted {
                    let item = self.item(id)?;
                    if let Some(lease) = held(&item, worker, attempt) {
                        items.push(LeasedItem {
                            id,
                            attempt,
                            iterations: item.iterations,
                            deadline: lease.deadline,
                        });
                    }
                }
                self.put_worker(&record);
                return Ok(Response::Leased { items });
            }
        }
        let (start, end) = keys::table(keys::QUEUE);
        let head: Vec<(Vec<u8>, Vec<u8>)> = self
            .kv
            .scan(&start, &end, false)
            .take(grant.max.min(MAX_LEASE_BATCH) as usize)
            .collect::<Result<_, _>>()?;
        let deadline = self.now + lease_ms;
        let mut items = Vec::with_capacity(head.len());
        let (mut bytes, mut iterations) = (0u64, 0u64);
        for (qkey, _) in head {
            let id = WorkId(decode_u64(&qkey, &qkey[1..])?);
            let mut item = self.item(id)?;
            bytes += u64::from(item.payload_len);
            iterations += u64::from(item.iterations);
            let beyond_min = items.len() >= grant.min as usize;
            if (bytes > MAX_LEASE_BYTES && !items.is_empty())
                || (beyond_min && iterations > grant.max_iterations)
            {
                break;
            }
            item.attempts += 1;
            item.status = Status::Running;
            item.lease = Some(Lease {
                worker,
                attempt: item.attempts,
                deadline,
            });
            self.kv.delete(qkey);
            self.kv.put(keys::lease(deadline, id), Vec::new());
            self.kv.put(
                keys::owner(worker, id),
                item.attempts.to_be_bytes().to_vec(),
            );
            put_t(self.kv, keys::item(id), &item);
            let c = &mut self.meta.counts;
            c.queued -= 1;
            c.running += 1;
            c.queued_iterations -= u64::from(item.iterations);
            items.push(LeasedItem {
                id,
                attempt: item.attempts,
                iterations: item.iterations,
                deadline,
            });
        }
        record.leased += items.len() as u32;
        record.last_lease = Some((
            request_id,
            items.iter().map(|i| (i.id, i.attempt)).collect(),
        ));
        self.put_worker(&record);
        Ok(Response::Leased { items })
    }

    fn heartbeat(
        &mut self,
        worker: WorkerId,
        secret: WorkerSecret,
        held_items: &[(WorkId, u32)],
        lease_ms: u64,
        parent: Option<NodeId>,
    ) -> Result<Response, KvError> {
        let Some(mut record) = self.authentic_worker(worker, secret)? else {
            return Ok(Response::Rejected(Rejection::UnknownWorker(worker)));
        };
        if lease_ms == 0 || lease_ms > MAX_LEASE_MS {
            return Ok(invalid("lease_ms out of range"));
        }
        record.last_seen = self.now;
        if let Some(parent) = parent {
            record.parent = parent;
        }
        self.put_worker(&record);
        let deadline = self.now + lease_ms;
        let (mut valid, mut lost) = (Vec::new(), Vec::new());
        for &(id, attempt) in held_items {
            let Some(mut item) = self.maybe_item(id)? else {
                lost.push(id);
                continue;
            };
            match held(&item, worker, attempt) {
                Some(lease) => {
                    if lease.deadline < deadline {
                        self.kv.delete(keys::lease(lease.deadline, id));
                        self.kv.put(keys::lease(deadline, id), Vec::new());
                        item.lease = Some(Lease { deadline, ..lease });
                        put_t(self.kv, keys::item(id), &item);
                    }
                    valid.push(id);
                }
                None => lost.push(id),
            }
        }
        Ok(Response::HeartbeatAck { valid, lost })
    }

    fn complete(
        &mut self,
        worker: WorkerId,
        secret: WorkerSecret,
        results: &[Completion],
    ) -> Result<Response, KvError> {
        // Only the worker holding a lease completes it: without its secret, a request that
        // names a worker is acknowledged and ignored, like a stale one.
        let Some(mut record) = self.authentic_worker(worker, secret)? else {
            return Ok(Response::CompleteAck {
                accepted: 0,
                ignored: results.len() as u32,
            });
        };
        record.last_seen = self.now;
        self.put_worker(&record);
        let (mut accepted, mut ignored) = (0, 0);
        for result in results {
            let Some(mut item) = self.maybe_item(result.id)? else {
                ignored += 1;
                continue;
            };
            let Some(lease) = held(&item, worker, result.attempt) else {
                ignored += 1;
                continue;
            };
            let id = result.id;
            self.drop_lease(id, &lease, true)?;
            self.kv.delete(keys::payload(&item.payload));
            item.status = Status::Completed;
            item.lease = None;
            item.value = Some(result.value);
            item.completed_at = Some(self.now);
            put_t(self.kv, keys::item(id), &item);
            let seq = self.meta.next_completion;
            self.meta.next_completion += 1;
            self.kv
                .put(keys::completed(seq), id.0.to_be_bytes().to_vec());
            let c = &mut self.meta.counts;
            c.running -= 1;
            c.completed += 1;
            c.completed_total += 1;
            c.completed_iterations_total += u64::from(item.iterations);
            c.payload_bytes -= u64::from(item.payload_len);
            accepted += 1;
        }
        Ok(Response::CompleteAck { accepted, ignored })
    }

    fn release(
        &mut self,
        worker: WorkerId,
        secret: WorkerSecret,
        items: &[(WorkId, u32)],
    ) -> Result<Response, KvError> {
        if self.authentic_worker(worker, secret)?.is_none() {
            return Ok(Response::Released { count: 0 });
        }
        let mut count = 0;
        for &(id, attempt) in items {
            let Some(mut item) = self.maybe_item(id)? else {
                continue;
            };
            if held(&item, worker, attempt).is_some() {
                self.requeue(id, &mut item, Requeue::Released)?;
                count += 1;
            }
        }
        Ok(Response::Released { count })
    }

    fn exit(&mut self, worker: WorkerId, secret: WorkerSecret) -> Result<Response, KvError> {
        if self.authentic_worker(worker, secret)?.is_none() {
            return Ok(Response::Done);
        }
        self.reclaim(worker, Requeue::Released)?;
        self.kv.delete(keys::worker(worker));
        Ok(Response::Done)
    }

    fn reserve(&mut self, parent: NodeId, incarnation: u64) -> Result<Response, KvError> {
        let max = self.meta.max_workers.unwrap_or(0);
        let managed = workers(self.kv)?.iter().filter(|w| w.managed).count();
        if managed as u64 >= u64::from(max) {
            return Ok(Response::Reserved { worker: None });
        }
        let id = WorkerId(self.meta.next_worker);
        self.meta.next_worker += 1;
        self.put_worker(&WorkerRecord {
            id,
            parent,
            state: WorkerState::Launching,
            managed: true,
            since: self.now,
            last_seen: self.now,
            leased: 0,
            completed: 0,
            handle: String::new(),
            host: String::new(),
            last_lease: None,
            secret: WorkerSecret::default(),
            incarnation,
        });
        Ok(Response::Reserved { worker: Some(id) })
    }

    fn launched(&mut self, worker: WorkerId, handle: &str) -> Result<Response, KvError> {
        match self.worker(worker)? {
            // The worker may have registered first and named its own handle already.
            Some(mut record) if record.handle.is_empty() => {
                record.handle = handle.to_string();
                self.put_worker(&record);
                Ok(Response::Done)
            }
            Some(_) => Ok(Response::Done),
            None => Ok(Response::Rejected(Rejection::UnknownSlot(worker))),
        }
    }

    fn launch_failed(&mut self, worker: WorkerId) -> Result<Response, KvError> {
        if let Some(record) = self.worker(worker)? {
            if record.state == WorkerState::Launching {
                self.kv.delete(keys::worker(worker));
            }
        }
        Ok(Response::Done)
    }

    fn tick(&mut self, p: &TickParams) -> Result<Response, KvError> {
        let mut report = TickReport::default();
        let limit = p.limit.max(1) as usize;
        let max_attempts = p.max_attempts.max(1);

        // Expired leases go back to the queue, or die after max_attempts.
        let (start, _) = keys::table(keys::LEASE);
        let end = keys::lease(self.now + 1, WorkId(0));
        let expired: Vec<(Vec<u8>, Vec<u8>)> = self
            .kv
            .scan(&start, &end, false)
            .take(limit)
            .collect::<Result<_, _>>()?;
        for (lkey, _) in expired {
            let id =
                WorkId(keys::u64_at(&lkey, 9).ok_or_else(|| corrupt(&lkey, "short lease key"))?);
            let mut item = self.item(id)?;
            if self.requeue(id, &mut item, Requeue::Failed { max_attempts })? {
                report.dead += 1;
            }
            report.expired += 1;
        }

        // Workers that went silent are lost; slots whose worker never came up are freed.
        for record in workers(self.kv)? {
            let lost = match record.state {
                WorkerState::Running => record.last_seen + p.worker_lost_ms <= self.now,
                WorkerState::Launching => record.since + p.launch_timeout_ms <= self.now,
            };
            if lost {
                report.dead += self.reclaim(record.id, Requeue::Failed { max_attempts })?;
                self.kv.delete(keys::worker(record.id));
                report.lost_workers.push((record.id, record.handle.clone()));
            }
        }

        // Forget pulled items and idempotency keys past their retention.
        let (start, _) = keys::table(keys::PULLED);
        let end = keys::pulled(
            self.now.saturating_sub(p.pulled_retention_ms) + 1,
            WorkId(0),
        );
        let old: Vec<(Vec<u8>, Vec<u8>)> = self
            .kv
            .scan(&start, &end, false)
            .take(limit)
            .collect::<Result<_, _>>()?;
        for (rkey, _) in old {
            let id =
                WorkId(keys::u64_at(&rkey, 9).ok_or_else(|| corrupt(&rkey, "short pulled key"))?);
            self.kv.delete(rkey);
            self.kv.delete(keys::item(id));
            self.meta.counts.pulled -= 1;
            report.forgotten += 1;
        }
        report.forgotten += self.drop_expired_results(p, limit)?;
        report.forgotten += self.drop_expired_dead(p, limit)?;
        let (start, _) = keys::table(keys::KEY_EXPIRY);
        let mut end = vec![keys::KEY_EXPIRY];
        end.extend_from_slice(&(self.now + 1).to_be_bytes());
        let old: Vec<(Vec<u8>, Vec<u8>)> = self
            .kv
            .scan(&start, &end, false)
            .take(limit)
            .collect::<Result<_, _>>()?;
        for (xkey, _) in old {
            if xkey.len() < 10 {
                return Err(corrupt(&xkey, "short key-expiry key"));
            }
            let mut key = vec![xkey[9]];
            key.extend_from_slice(&xkey[10..]);
            self.kv.delete(key);
            self.kv.delete(xkey);
            report.forgotten += 1;
        }
        Ok(Response::Ticked(report))
    }

    /// Drops completed results nobody pulled within their retention, oldest first.
    fn drop_expired_results(&mut self, p: &TickParams, limit: usize) -> Result<u32, KvError> {
        let cutoff = self.now.saturating_sub(p.completed_retention_ms);
        let (start, end) = keys::table(keys::COMPLETED);
        let oldest: Vec<(Vec<u8>, Vec<u8>)> = self
            .kv
            .scan(&start, &end, false)
            .take(limit)
            .collect::<Result<_, _>>()?;
        let mut dropped = 0;
        for (ckey, id_bytes) in oldest {
            let id = WorkId(decode_u64(&ckey, &id_bytes)?);
            let item = self.item(id)?;
            // Completion order is time order: the first one young enough ends the scan.
            if item.completed_at.is_none_or(|at| at > cutoff) {
                break;
            }
            self.kv.delete(ckey);
            self.kv.delete(keys::item(id));
            self.meta.counts.completed -= 1;
            self.meta.counts.dropped_total += 1;
            dropped += 1;
        }
        Ok(dropped)
    }

    /// Drops dead items (and their payloads) past their retention, oldest first.
    fn drop_expired_dead(&mut self, p: &TickParams, limit: usize) -> Result<u32, KvError> {
        let (start, _) = keys::table(keys::DEAD);
        let end = keys::dead(self.now.saturating_sub(p.dead_retention_ms) + 1, WorkId(0));
        let old: Vec<(Vec<u8>, Vec<u8>)> = self
            .kv
            .scan(&start, &end, false)
            .take(limit)
            .collect::<Result<_, _>>()?;
        for (dkey, _) in &old {
            let id = WorkId(keys::u64_at(dkey, 9).ok_or_else(|| corrupt(dkey, "short dead key"))?);
            let item = self.item(id)?;
            self.kv.delete(dkey.clone());
            self.kv.delete(keys::item(id));
            self.kv.delete(keys::payload(&item.payload));
            let c = &mut self.meta.counts;
            c.dead -= 1;
            c.payload_bytes -= u64::from(item.payload_len);
            c.dropped_total += 1;
        }
        Ok(old.len() as u32)
    }

    /// Requeues every item leased to `worker`; returns how many died.
    fn reclaim(&mut self, worker: WorkerId, how: Requeue) -> Result<u32, KvError> {
        let (start, end) = keys::prefix_range(&keys::owner_prefix(worker));
        let owned: Vec<(Vec<u8>, Vec<u8>)> = self
            .kv
            .scan(&start, &end, false)
            .collect::<Result<_, _>>()?;
        let mut dead = 0;
        for (okey, _) in owned {
            let id =
                WorkId(keys::u64_at(&okey, 9).ok_or_else(|| corrupt(&okey, "short owner key"))?);
            let mut item = self.item(id)?;
            if self.requeue(id, &mut item, how)? {
                dead += 1;
            }
        }
        Ok(dead)
    }

    /// Takes a running item out of its lease and back into the queue (or to dead). Returns
    /// whether it died.
    fn requeue(&mut self, id: WorkId, item: &mut Item, how: Requeue) -> Result<bool, KvError> {
        let Some(lease) = item.lease.take() else {
            return Err(corrupt(&keys::item(id), "running item without lease"));
        };
        self.drop_lease(id, &lease, false)?;
        self.meta.counts.running -= 1;
        let dies = match how {
            Requeue::Failed { max_attempts } => {
                self.meta.counts.expired_total += 1;
                item.attempts >= max_attempts
            }
            Requeue::Released => false,
        };
        if dies {
            item.status = Status::Dead;
            item.dead_reason = Some(format!(
                "lease expired or worker lost on all {} attempts",
                item.attempts
            ));
            item.dead_at = Some(self.now);
            self.kv.put(keys::dead(self.now, id), Vec::new());
            self.meta.counts.dead += 1;
        } else {
            item.status = Status::Queued;
            item.queued_at = self.now;
            self.kv.put(keys::queue(id), Vec::new());
            self.meta.counts.queued += 1;
            self.meta.counts.queued_iterations += u64::from(item.iterations);
        }
        put_t(self.kv, keys::item(id), item);
        Ok(dies)
    }

    /// Removes a lease from the indexes and from its worker's count.
    fn drop_lease(&mut self, id: WorkId, lease: &Lease, completed: bool) -> Result<(), KvError> {
        self.kv.delete(keys::lease(lease.deadline, id));
        self.kv.delete(keys::owner(lease.worker, id));
        if let Some(mut record) = self.worker(lease.worker)? {
            record.leased = record.leased.saturating_sub(1);
            if completed {
                record.completed += 1;
            }
            self.put_worker(&record);
        }
        Ok(())
    }

    /// What an idempotency key says about a request: seen before (with its answer), new, or
    /// not a valid key.
    fn remembered<T: DeserializeOwned>(
        &self,
        table: u8,
        dedup: Option<&Dedup>,
    ) -> Result<Remembered<T>, KvError> {
        let Some(dedup) = dedup else {
            return Ok(Remembered::New);
        };
        if dedup.key.len() > MAX_IDEMPOTENCY_KEY {
            return Ok(Remembered::Invalid(invalid("idempotency key too long")));
        }
        Ok(
            match get_t::<T>(self.kv, &keys::idempotency(table, &dedup.key))? {
                Some(prev) => Remembered::Seen(prev),
                None => Remembered::New,
            },
        )
    }

    fn remember_key<T: Serialize>(&mut self, table: u8, dedup: &Dedup, value: &T) {
        put_t(self.kv, keys::idempotency(table, &dedup.key), value);
        self.expire_key(table, &dedup.key, dedup.ttl_ms);
    }

    /// Indexes an idempotency key for the tick that forgets it `ttl_ms` from now.
    fn expire_key(&mut self, table: u8, key: &str, ttl_ms: u64) {
        let expires_at = self.now.saturating_add(ttl_ms);
        self.kv
            .put(keys::key_expiry(expires_at, table, key), Vec::new());
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

enum Remembered<T> {
    New,
    Seen(T),
    Invalid(Response),
}

/// Whether a process with `handle` may register for the slot `w`.
fn claims(w: &WorkerRecord, handle: &str) -> bool {
    let same = !handle.is_empty() && w.handle == handle;
    match w.state {
        WorkerState::Launching => w.handle.is_empty() || handle.is_empty() || same,
        WorkerState::Running => same,
    }
}

/// The lease of `item` if it is running under `worker` at `attempt`.
fn held(item: &Item, worker: WorkerId, attempt: u32) -> Option<Lease> {
    item.lease
        .filter(|l| item.status == Status::Running && l.worker == worker && l.attempt == attempt)
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

// ---------------------------------------------------------------------------------------------
// Read-only queries, for the node's routes and its leader-side loops.

/// The meta record (zeroes before the first command).
pub fn read_meta(kv: &impl KvRead) -> Result<Meta, KvError> {
    Ok(get_t(kv, keys::META)?.unwrap_or_default())
}

/// One item's metadata.
pub fn item(kv: &impl KvRead, id: WorkId) -> Result<Option<Item>, KvError> {
    get_t(kv, &keys::item(id))
}

/// The value of an item's `p` record: the entry's term and the item's id.
fn payload_record(at: &PayloadRef, id: WorkId) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&at.term.to_be_bytes());
    v.extend_from_slice(&id.0.to_be_bytes());
    v
}

/// Reads a `p` record back: the payload's place and the item's id.
pub fn decode_payload_record(key: &[u8], value: &[u8]) -> Result<(PayloadRef, WorkId), KvError> {
    let index = keys::u64_at(key, 1);
    let ordinal = key
        .get(9..13)
        .filter(|_| key.len() == 13)
        .map(|b| u32::from_be_bytes(b.try_into().expect("slice of 4")));
    let term = keys::u64_at(value, 0);
    let id = keys::u64_at(value, 8).filter(|_| value.len() == 16);
    match (index, ordinal, term, id) {
        (Some(index), Some(ordinal), Some(term), Some(id)) => Ok((
            PayloadRef {
                term,
                index,
                ordinal,
            },
            WorkId(id),
        )),
        _ => Err(corrupt(key, "malformed payload record")),
    }
}

/// The payloads the state machine still needs, oldest first.
pub fn live_payloads(kv: &impl KvRead) -> impl Iterator<Item = Result<PayloadRef, KvError>> + '_ {
    let (start, end) = keys::table(keys::PAYLOAD);
    kv.scan(&start, &end, false).map(|r| {
        let (k, v) = r?;
        decode_payload_record(&k, &v).map(|(at, _)| at)
    })
}

/// The oldest log index whose payloads the state machine still needs (`None`: none).
pub fn payload_floor(kv: &impl KvRead) -> Result<Option<u64>, KvError> {
    live_payloads(kv)
        .next()
        .transpose()
        .map(|r| r.map(|at| at.index))
}

/// The worker table, by id.
pub fn workers(kv: &impl KvRead) -> Result<Vec<WorkerRecord>, KvError> {
    let (start, end) = keys::table(keys::WORKER);
    kv.scan(&start, &end, false)
        .map(|r| {
            let (k, v) = r?;
            codec::decode("worker record", &v).map_err(|e| corrupt(&k, &e.to_string()))
        })
        .collect()
}

/// The oldest `queued_at` among the first `look` items of the queue.
pub fn oldest_queued(kv: &impl KvRead, look: usize) -> Result<Option<Millis>, KvError> {
    let (start, end) = keys::table(keys::QUEUE);
    let mut oldest = None;
    for pair in kv.scan(&start, &end, false).take(look) {
        let (k, _) = pair?;
        let id = WorkId(decode_u64(&k, &k[1..])?);
        if let Some(item) = item(kv, id)? {
            oldest = Some(oldest.map_or(item.queued_at, |o: Millis| o.min(item.queued_at)));
        }
    }
    Ok(oldest)
}

/// The ids of dead items, oldest first.
pub fn dead_items(kv: &impl KvRead, limit: usize) -> Result<Vec<WorkId>, KvError> {
    let (start, end) = keys::table(keys::DEAD);
    kv.scan(&start, &end, false)
        .take(limit)
        .map(|r| {
            let (k, _) = r?;
            Ok(WorkId(
                keys::u64_at(&k, 9).ok_or_else(|| corrupt(&k, "short dead key"))?,
            ))
        })
        .collect()
}

/// What the queue stores, as [`StoreLimits`] counts it: (items, bytes).
pub fn stored(c: &Counts) -> (u64, u64) {
    let items = c.queued + c.running + c.completed + c.dead;
    let bytes = c.payload_bytes + c.completed * RESULT_BYTES;
    (items, bytes)
}

/// Whether a [`Request::Tick`] at `now` would do anything: the leader proposes one only then.
pub fn tick_due(kv: &impl KvRead, now: Millis, p: &TickParams) -> Result<bool, KvError> {
    let first_before = |tag: u8, bound: Millis| -> Result<bool, KvError> {
        let (start, _) = keys::table(tag);
        let mut end = vec![tag];
        end.extend_from_slice(&(bound + 1).to_be_bytes());
        Ok(kv.scan(&start, &end, false).next().transpose()?.is_some())
    };
    if first_before(keys::LEASE, now)?
        || first_before(keys::PULLED, now.saturating_sub(p.pulled_retention_ms))?
        || first_before(keys::DEAD, now.saturating_sub(p.dead_retention_ms))?
        || first_before(keys::KEY_EXPIRY, now)?
    {
        return Ok(true);
    }
    let (start, end) = keys::table(keys::COMPLETED);
    if let Some(pair) = kv.scan(&start, &end, false).next() {
        let (k, v) = pair?;
        let id = WorkId(decode_u64(&k, &v)?);
        let cutoff = now.saturating_sub(p.completed_retention_ms);
        if item(kv, id)?
            .and_then(|i| i.completed_at)
            .is_some_and(|at| at <= cutoff)
        {
            return Ok(true);
        }
    }
    Ok(workers(kv)?.iter().any(|w| match w.state {
        WorkerState::Running => w.last_seen + p.worker_lost_ms <= now,
        WorkerState::Launching => w.since + p.launch_timeout_ms <= now,
    }))
}

#[cfg(test)]
mod tests;
