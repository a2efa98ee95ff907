//! Priorities (cluster version 4): one FIFO queue per priority, leased from the highest.
//!
//! The default priority's queue is the queue of every earlier build (`q`, keyed by id), so
//! nothing of it moves; the other priorities' queues share one table (`u`, keyed by rank
//! then id, rank = 9 - priority) and an item of such a priority keeps it in a record of its
//! own (`y`), read when it goes back to the queue (an expired lease, a retry). Their queued
//! counts are one more record (`k`, [`QueuedByPriority`]); the default's is the rest.

use super::*;
use crate::types::{QueuedByPriority, DEFAULT_PRIORITY, MAX_PRIORITY};

impl<K: Kv> Machine<'_, K> {
    /// Item `id`'s priority: its record, or the default.
    pub(super) fn priority_of(&self, id: WorkId) -> Result<u8, KvError> {
        priority(self.kv, id)
    }

    /// Remembers a new item's priority (nothing for the default).
    pub(super) fn set_priority(&mut self, id: WorkId, priority: u8) {
        if priority != DEFAULT_PRIORITY {
            self.kv.put(keys::priority(id), vec![priority]);
        }
    }

    /// Deletes item `id`'s record and its priority's.
    pub(super) fn forget_item(&mut self, id: WorkId) {
        self.kv.delete(keys::item(id));
        self.kv.delete(keys::priority(id));
    }

    /// Puts `id` at its place (by id) in its priority's queue. The caller counts it in
    /// [`Counts::queued`].
    pub(super) fn push_queue(&mut self, id: WorkId, priority: u8) -> Result<(), KvError> {
        self.kv.put(keys::queue_of(priority, id), Vec::new());
        self.count_queued(priority, true)
    }

    /// Takes `id` out of its priority's queue.
    pub(super) fn pop_queue(&mut self, id: WorkId, priority: u8) -> Result<(), KvError> {
        self.kv.delete(keys::queue_of(priority, id));
        self.count_queued(priority, false)
    }

    fn count_queued(&mut self, priority: u8, up: bool) -> Result<(), KvError> {
        if priority == DEFAULT_PRIORITY {
            return Ok(());
        }
        let mut q = queued_by_priority_record(self.kv)?;
        q.queued.resize(usize::from(MAX_PRIORITY) + 1, 0);
        let n = &mut q.queued[usize::from(priority.min(MAX_PRIORITY))];
        *n = if up { *n + 1 } else { n.saturating_sub(1) };
        put_t(self.kv, keys::QUEUED_BY_PRIORITY.to_vec(), &q);
        Ok(())
    }
}

fn queued_by_priority_record(kv: &impl KvRead) -> Result<QueuedByPriority, KvError> {
    Ok(get_t(kv, keys::QUEUED_BY_PRIORITY)?.unwrap_or_default())
}

/// Item `id`'s priority (the default for an item without a record, or no item).
pub fn priority(kv: &impl KvRead, id: WorkId) -> Result<u8, KvError> {
    Ok(match kv.get(&keys::priority(id))? {
        Some(v) => *v
            .first()
            .ok_or_else(|| corrupt(&keys::priority(id), "empty priority"))?,
        None => DEFAULT_PRIORITY,
    })
}

/// How many items each priority has queued, highest first: `(priority, count)` for every
/// priority that has any.
pub fn queued_by_priority(kv: &impl KvRead) -> Result<Vec<(u8, u64)>, KvError> {
    let others = queued_by_priority_record(kv)?;
    let total = read_meta(kv)?.counts.queued;
    let mut out = Vec::new();
    for priority in (0..=MAX_PRIORITY).rev() {
        let n = if priority == DEFAULT_PRIORITY {
            total.saturating_sub(others.queued.iter().sum())
        } else {
            others
                .queued
                .get(usize::from(priority))
                .copied()
                .unwrap_or(0)
        };
        if n > 0 {
            out.push((priority, n));
        }
    }
    Ok(out)
}

/// The queued items in the order workers lease them: highest priority first, by id (FIFO)
/// within one; each with its queue key and its priority.
pub(super) fn in_lease_order(
    kv: &impl KvRead,
) -> impl Iterator<Item = Result<(Vec<u8>, WorkId, u8), KvError>> + '_ {
    // The other priorities' table is in (rank, id) order already: the priorities above the
    // default come first in it, those below last. Three scans, whatever the priorities.
    let default_rank = MAX_PRIORITY - DEFAULT_PRIORITY;
    let above = [keys::PRIORITY_QUEUE, default_rank];
    let below = [keys::PRIORITY_QUEUE, default_rank + 1];
    let (queue, queue_end) = keys::table(keys::QUEUE);
    let (_, others_end) = keys::table(keys::PRIORITY_QUEUE);
    kv.scan(&[keys::PRIORITY_QUEUE], &above, false)
        .chain(kv.scan(&queue, &queue_end, false))
        .chain(kv.scan(&below, &others_end, false))
        .map(|pair| {
            let (k, _) = pair?;
            match Key::decode(&k) {
                Some(Key::Queue(id)) => Ok((k, id, DEFAULT_PRIORITY)),
                Some(Key::PriorityQueue { rank, id }) if rank <= MAX_PRIORITY => {
                    Ok((k, id, MAX_PRIORITY - rank))
                }
                _ => Err(corrupt(&k, "malformed queue key")),
            }
        })
}

/// The queue key of every queued item, in item order, from the item records alone: an item
/// is queued exactly when its status is [`Status::Queued`], at the place its priority and
/// its id give. A store that keeps the queue tables out of its durable copy rebuilds them
/// from this.
pub fn queue_keys(kv: &impl KvRead) -> impl Iterator<Item = Result<Vec<u8>, KvError>> + '_ {
    let (start, end) = keys::table(keys::ITEM);
    kv.scan(&start, &end, false).filter_map(move |pair| {
        let queued = |(k, v): (Vec<u8>, Vec<u8>)| -> Result<Option<Vec<u8>>, KvError> {
            let id = key_id(&k)?;
            let item: Item = codec::decode("item", &v).map_err(|e| corrupt(&k, &e.to_string()))?;
            if item.status != Status::Queued {
                return Ok(None);
            }
            Ok(Some(keys::queue_of(priority(kv, id)?, id)))
        };
        pair.and_then(queued).transpose()
    })
}
