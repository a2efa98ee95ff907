//! Read-only queries, for the node's routes and its leader-side loops.

use super::*;

/// The meta record (zeroes before the first command).
pub fn read_meta(kv: &impl KvRead) -> Result<Meta, KvError> {
    Ok(get_t(kv, keys::META)?.unwrap_or_default())
}

/// The version the cluster runs ([`crate::version`]).
pub fn cluster_version(kv: &impl KvRead) -> Result<u32, KvError> {
    match kv.get(keys::CLUSTER_VERSION)? {
        None => Ok(crate::version::BASE),
        Some(bytes) => <[u8; 4]>::try_from(bytes.as_ref())
            .map(u32::from_be_bytes)
            .map_err(|_| corrupt(keys::CLUSTER_VERSION, "expected a 4-byte version")),
    }
}

/// Whether a take was applied under idempotency key `key` (still remembered).
pub fn take_key_used(kv: &impl KvRead, key: &str) -> Result<bool, KvError> {
    Ok(kv.get(&keys::idempotency(keys::TAKE_KEY, key))?.is_some())
}

/// One item's metadata.
pub fn item(kv: &impl KvRead, id: WorkId) -> Result<Option<Item>, KvError> {
    get_t(kv, &keys::item(id))
}

/// The value of an item's `p` record: the entry's term and the item's id.
pub(super) fn payload_record(at: &PayloadRef, id: WorkId) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&at.term.to_be_bytes());
    v.extend_from_slice(&id.0.to_be_bytes());
    v
}

/// Reads a `p` record back: the payload's place and the item's id.
pub fn decode_payload_record(key: &[u8], value: &[u8]) -> Result<(PayloadRef, WorkId), KvError> {
    let term = keys::u64_at(value, 0);
    let id = keys::u64_at(value, 8).filter(|_| value.len() == 16);
    match (Key::decode(key), term, id) {
        (Some(Key::Payload { index, ordinal }), Some(term), Some(id)) => Ok((
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

/// Whether an item in `status` still needs its payload: until it completes, and while it is
/// dead or cancelled (a retry puts it back in the queue).
pub fn holds_payload(status: Status) -> bool {
    !matches!(status, Status::Completed | Status::Pulled)
}

/// The payload a record of the keyspace still needs: `Some` for an item record whose item
/// [holds its payload](holds_payload), `None` for anything else.
pub fn live_payload_of(key: &[u8], value: &[u8]) -> Result<Option<PayloadRef>, KvError> {
    if key.first() != Some(&keys::ITEM) {
        return Ok(None);
    }
    let item: Item = codec::decode("item", value).map_err(|e| corrupt(key, &e.to_string()))?;
    Ok(holds_payload(item.status).then_some(item.payload))
}

/// Puts payload references that come in work-id order into log order, (index, ordinal),
/// the order of payload sections and packs. Ids follow the log from one entry to the next,
/// but not within an entry: a batch's parts have ordinals past the entry's other requests
/// ([`PayloadRef::ordinal`]). So the references of one entry are held and sorted, and handed
/// on when the next entry's begin.
#[derive(Default)]
pub struct LogOrder {
    entry: Vec<PayloadRef>,
}

impl LogOrder {
    /// Takes the next reference in id order; hands on those it completes.
    pub fn push<E>(
        &mut self,
        at: PayloadRef,
        out: &mut impl FnMut(PayloadRef) -> Result<(), E>,
    ) -> Result<(), E> {
        if self
            .entry
            .first()
            .is_some_and(|first| first.index != at.index)
        {
            self.flush(out)?;
        }
        self.entry.push(at);
        Ok(())
    }

    /// Hands on what is held, once the references have all been pushed.
    pub fn flush<E>(&mut self, out: &mut impl FnMut(PayloadRef) -> Result<(), E>) -> Result<(), E> {
        self.entry.sort_unstable_by_key(|at| at.ordinal);
        self.entry.drain(..).try_for_each(out)
    }
}

/// The payloads the state machine still needs, in log order.
pub fn live_payloads(kv: &impl KvRead) -> Result<Vec<PayloadRef>, KvError> {
    let (start, end) = keys::table(keys::ITEM);
    let (mut order, mut out) = (LogOrder::default(), Vec::new());
    let mut emit = |at| {
        out.push(at);
        Ok::<(), KvError>(())
    };
    for pair in kv.scan(&start, &end, false) {
        let (k, v) = pair?;
        if let Some(at) = live_payload_of(&k, &v)? {
            order.push(at, &mut emit)?;
        }
    }
    order.flush(&mut emit)?;
    Ok(out)
}

/// The oldest log index whose payloads the state machine still needs (`None`: none), looking
/// at items from id `from` on; every item below `from` must be one that will never need its
/// payload again (completed, pulled, or gone). Returns the floor and where the next call may
/// start: the first item that still needs its payload, or past the last item.
pub fn payload_floor_from(
    kv: &impl KvRead,
    from: WorkId,
) -> Result<(Option<u64>, WorkId), KvError> {
    // The usual case, every apply: the item found last time still needs its payload. One
    // read answers it, where a scan would copy a chunk of items.
    let first = keys::item(from);
    if let Some(value) = kv.get(&first)? {
        if let Some(at) = live_payload_of(&first, &value)? {
            return Ok((Some(at.index), from));
        }
    }
    let (_, end) = keys::table(keys::ITEM);
    let mut next = from;
    for pair in kv.scan(&first, &end, false) {
        let (k, v) = pair?;
        let id = key_id(&k)?;
        if let Some(at) = live_payload_of(&k, &v)? {
            return Ok((Some(at.index), id));
        }
        next = WorkId(id.0.saturating_add(1));
    }
    Ok((None, next))
}

/// The oldest log index whose payloads the state machine still needs (`None`: none). Ids
/// follow the log, so it is the first such item's.
pub fn payload_floor(kv: &impl KvRead) -> Result<Option<u64>, KvError> {
    payload_floor_from(kv, WorkId(0)).map(|(floor, _)| floor)
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

/// The oldest `queued_at` among the first `look` items of each priority's queue: how long
/// the longest waiting item has waited, whatever its priority (the autoscaler's signal, so
/// that low priorities are never starved of workers).
pub fn oldest_queued(kv: &impl KvRead, look: usize) -> Result<Option<Millis>, KvError> {
    let mut oldest = None;
    for priority in 0..=crate::types::MAX_PRIORITY {
        let (start, end) = keys::queue_range(priority);
        for pair in kv.scan(&start, &end, false).take(look) {
            let (k, _) = pair?;
            let id = key_id(&k)?;
            if let Some(item) = item(kv, id)? {
                oldest = Some(oldest.map_or(item.queued_at, |o: Millis| o.min(item.queued_at)));
            }
        }
    }
    Ok(oldest)
}

/// The counts of cluster version 3 (zero before the first cancel or retry).
pub fn tallies(kv: &impl KvRead) -> Result<crate::types::Tallies, KvError> {
    Ok(get_t(kv, keys::TALLIES)?.unwrap_or_default())
}

/// One page of [`list_items`].
#[derive(Debug)]
pub struct ItemPage {
    pub items: Vec<(WorkId, Item)>,
    /// Where the next page starts (pass it as `after`); `None` once the listing is done.
    pub next_after: Option<WorkId>,
}

/// Items with `status`, by id, after `after`: at most `limit` of them, looking at no more
/// than `budget` records (a page may then hold fewer, and says where to go on), from the
/// item table, which holds them all (the queued ones too: they are in as many queues as
/// there are priorities).
pub fn list_items(
    kv: &impl KvRead,
    status: Status,
    after: Option<WorkId>,
    limit: usize,
    budget: usize,
) -> Result<ItemPage, KvError> {
    let key_of = |id: u64| keys::item(WorkId(id));
    let end = keys::table(keys::ITEM).1;
    let start = key_of(after.map_or(0, |id| id.0.saturating_add(1)));
    let (mut items, mut last) = (Vec::new(), None);
    for pair in kv.scan(&start, &end, false).take(budget.max(1)) {
        let (k, v) = pair?;
        let id = key_id(&k)?;
        last = Some(id);
        let found: Item = codec::decode("item", &v).map_err(|e| corrupt(&k, &e.to_string()))?;
        if found.status == status {
            items.push((id, found));
            if items.len() >= limit {
                break;
            }
        }
    }
    // A next page only if anything is left past the last record looked at.
    let next_after = match last {
        Some(id) if id.0 < u64::MAX => kv
            .scan(&key_of(id.0 + 1), &end, false)
            .next()
            .transpose()?
            .map(|_| id),
        _ => None,
    };
    Ok(ItemPage { items, next_after })
}

/// What the queue stores, as [`StoreLimits`] counts it: (items, bytes).
pub fn stored(c: &Counts) -> (u64, u64) {
    // Cancelled items (in the tallies) count against the byte bound through their payloads.
    let items = c.queued + c.running + c.completed + c.dead;
    let bytes = c.payload_bytes + c.completed * RESULT_BYTES;
    (items, bytes)
}
