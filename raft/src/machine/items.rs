//! Enqueue and take, and the idempotency records that make their retries safe.

use super::*;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct EnqueueKey {
    id: WorkId,
}

/// What a [`BatchSlot`] key remembers: the work id of each slot of the batch applied so far.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct BatchRecord {
    slots: Vec<(u32, WorkId)>,
}

/// The batch records a run of [`Request::EnqueueInBatch`] of one entry reads and extends:
/// each is decoded once and written once when the run ends, not once per slot (which was
/// quadratic in the batch size).
#[derive(Default)]
pub(super) struct BatchRecords {
    /// Each record read so far (`None`: the store has none), and whether it changed.
    records: std::collections::BTreeMap<Vec<u8>, (Option<BatchRecord>, bool)>,
}

impl BatchRecords {
    /// The record under `key`, read from the store the first time.
    fn load(&mut self, kv: &impl KvRead, key: &[u8]) -> Result<Option<&BatchRecord>, KvError> {
        if !self.records.contains_key(key) {
            let stored = get_t(kv, key)?;
            self.records.insert(key.to_vec(), (stored, false));
        }
        Ok(self.records.get(key).and_then(|(r, _)| r.as_ref()))
    }

    /// Records that `slot` of the batch under `key` (loaded already) applied as `id`.
    pub(super) fn add(&mut self, key: Vec<u8>, slot: u32, id: WorkId) {
        let (record, changed) = self.records.entry(key).or_default();
        record
            .get_or_insert_with(Default::default)
            .slots
            .push((slot, id));
        *changed = true;
    }

    /// Writes the records changed since the last write, and forgets them all.
    pub(super) fn write(&mut self, kv: &mut impl Kv) {
        for (key, (record, changed)) in std::mem::take(&mut self.records) {
            if let (Some(record), true) = (record, changed) {
                put_t(kv, key, &record);
            }
        }
    }
}

/// What a batch's key remembers: its ids, in part order. Under the enqueue table like the
/// others; a node prefixes batch keys (`c:batch:`, or a key of its own) so that no key is
/// both an [`EnqueueKey`] and a [`BatchKey`].
#[derive(Clone, Debug, Serialize, Deserialize)]
struct BatchKey {
    ids: Vec<WorkId>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct TakeKey {
    items: Vec<(WorkId, crate::types::Digest)>,
}

impl<K: Kv> Machine<'_, K> {
    pub(super) fn enqueue(
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
    pub(super) fn enqueue_in_batch(
        &mut self,
        iterations: u32,
        payload_len: usize,
        batch: &BatchSlot,
    ) -> Result<Response, KvError> {
        if let Some(refused) = key_too_long(&batch.key) {
            return Ok(refused);
        }
        let key = keys::idempotency(keys::ENQUEUE_KEY, &batch.key);
        let known = self.batches.load(self.kv, &key)?;
        let is_new = known.is_none();
        if let Some(&(_, id)) =
            known.and_then(|r| r.slots.iter().find(|(slot, _)| *slot == batch.slot))
        {
            return Ok(Response::Enqueued {
                id,
                duplicate: true,
            });
        }
        let response = self.add_item(iterations, payload_len)?;
        if let Response::Enqueued { id, .. } = response {
            // Written to the record once the request has applied (see `BatchRecords`).
            self.batch_slot = Some((key, batch.slot, id));
            if is_new {
                self.expire_key(keys::ENQUEUE_KEY, &batch.key, batch.ttl_ms);
            }
        }
        Ok(response)
    }

    /// A batch: every item added, with consecutive ids, or none (the first refusal is the
    /// answer). Its key answers a retry with the first call's ids.
    pub(super) fn enqueue_batch(
        &mut self,
        batch: &[BatchItem],
        dedup: &Dedup,
    ) -> Result<Response, KvError> {
        match self.remembered::<BatchKey>(keys::ENQUEUE_KEY, Some(dedup))? {
            Remembered::Invalid(r) => return Ok(r),
            Remembered::Seen(prev) => {
                return Ok(Response::EnqueuedBatch {
                    ids: prev.ids,
                    duplicate: true,
                })
            }
            Remembered::New => {}
        }
        if batch.is_empty() {
            return Ok(invalid("a batch needs at least one item"));
        }
        let (request, _) = PayloadRef::split(self.here.ordinal);
        let mut refs = Vec::with_capacity(batch.len());
        for part in 0..batch.len() {
            match PayloadRef::ordinal(request, part) {
                Some(ordinal) => refs.push(PayloadRef {
                    ordinal,
                    ..self.here
                }),
                None => {
                    return Ok(invalid(&format!(
                        "a batch holds at most {} items",
                        PayloadRef::MAX_PARTS
                    )))
                }
            }
        }
        let mut bytes = 0u64;
        for item in batch {
            if let Some(refused) = check_item(item.iterations, item.payload.len()) {
                return Ok(refused);
            }
            if item.priority > crate::types::MAX_PRIORITY {
                return Ok(invalid("priority must be 0 to 9"));
            }
            bytes += item.payload.len() as u64;
        }
        if let Some(refused) = self.admit(batch.len() as u64, bytes) {
            return Ok(refused);
        }
        let ids: Vec<WorkId> = batch
            .iter()
            .zip(refs)
            .map(|(item, at)| {
                let len = item.payload.len() as u32;
                self.insert_item(item.iterations, len, at, item.priority)
            })
            .collect::<Result<_, _>>()?;
        self.remember_key(keys::ENQUEUE_KEY, dedup, &BatchKey { ids: ids.clone() });
        Ok(Response::EnqueuedBatch {
            ids,
            duplicate: false,
        })
    }

    /// A new queued item whose payload is the request being applied, within the store's
    /// bounds.
    fn add_item(&mut self, iterations: u32, payload_len: usize) -> Result<Response, KvError> {
        if let Some(refused) = check_item(iterations, payload_len) {
            return Ok(refused);
        }
        if let Some(refused) = self.admit(1, payload_len as u64) {
            return Ok(refused);
        }
        let id = self.insert_item(
            iterations,
            payload_len as u32,
            self.here,
            crate::types::DEFAULT_PRIORITY,
        )?;
        Ok(Response::Enqueued {
            id,
            duplicate: false,
        })
    }

    /// Why `count` more items of `bytes` payload in all cannot be stored now, if they cannot:
    /// a disk alarm, or the store's bounds.
    fn admit(&self, count: u64, bytes: u64) -> Option<Response> {
        if !self.meta.disk_alarms.is_empty() {
            return Some(Response::Rejected(Rejection::DiskFull {
                nodes: self.meta.disk_alarms.clone(),
            }));
        }
        let (items, stored_bytes) = stored(&self.meta.counts);
        (items.saturating_add(count) > self.limits.max_items
            || stored_bytes.saturating_add(bytes) > self.limits.max_bytes)
            .then_some(Response::Rejected(Rejection::BacklogFull {
                items,
                bytes: stored_bytes,
            }))
    }

    /// Stores a new queued item whose payload is at `at`; the caller checked it and the
    /// store's bounds.
    fn insert_item(
        &mut self,
        iterations: u32,
        payload_len: u32,
        at: PayloadRef,
        priority: u8,
    ) -> Result<WorkId, KvError> {
        let id = WorkId(self.meta.next_id);
        self.meta.next_id += 1;
        let item = Item {
            iterations,
            attempts: 0,
            status: Status::Queued,
            enqueued_at: self.now,
            queued_at: self.now,
            payload_len,
            payload: at,
            lease: None,
            completed_at: None,
            value: None,
            pulled_at: None,
            dead_reason: None,
            dead_at: None,
        };
        put_t(self.kv, keys::item(id), &item);
        if self.payload_records {
            self.kv
                .put(keys::payload(&at), queries::payload_record(&at, id));
        }
        self.set_priority(id, priority);
        self.push_queue(id, priority)?;
        let c = &mut self.meta.counts;
        c.queued += 1;
        c.queued_iterations += u64::from(iterations);
        c.payload_bytes += u64::from(payload_len);
        c.enqueued_total += 1;
        Ok(id)
    }

    pub(super) fn take(&mut self, top: u32, dedup: Option<&Dedup>) -> Result<Response, KvError> {
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
        if let Some(refused) = key_too_long(&dedup.key) {
            return Ok(Remembered::Invalid(refused));
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
}

/// Why one item cannot be enqueued whatever the store holds, if it cannot.
fn check_item(iterations: u32, payload_len: usize) -> Option<Response> {
    if iterations == 0 {
        return Some(invalid("iterations must be at least 1"));
    }
    u32::try_from(payload_len)
        .is_err()
        .then(|| invalid("payload too large"))
}

/// The answer to a request whose idempotency key is longer than [`MAX_IDEMPOTENCY_KEY`].
fn key_too_long(key: &str) -> Option<Response> {
    (key.len() > MAX_IDEMPOTENCY_KEY).then(|| invalid("idempotency key too long"))
}

enum Remembered<T> {
    New,
    Seen(T),
    Invalid(Response),
}
