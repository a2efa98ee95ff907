//! Cancel and retry (cluster version 3): a client stops an item, or puts a dead or
//! cancelled one back in the queue.
//!
//! A cancelled item keeps its payload and sits in the dead index, so it is kept for the
//! dead retention and a retry can run it again; its count is in the [`Tallies`] record, not
//! in the meta record's [`Counts`] (whose encoding every earlier build reads).

use super::*;
use crate::types::Tallies;

impl<K: Kv> Machine<'_, K> {
    pub(super) fn cancel(&mut self, id: WorkId) -> Result<Response, KvError> {
        let Some(mut item) = self.maybe_item(id)? else {
            return Ok(Response::ItemStatus(None));
        };
        match item.status {
            Status::Queued => {
                let priority = self.priority_of(id)?;
                self.pop_queue(id, priority)?;
                let c = &mut self.meta.counts;
                c.queued -= 1;
                c.queued_iterations -= u64::from(item.iterations);
            }
            Status::Running => {
                // Fenced: the lease is gone, so the worker's heartbeat hears it is lost and
                // its completion names no lease.
                let Some(lease) = item.lease.take() else {
                    return Err(corrupt(&keys::item(id), "running item without lease"));
                };
                self.drop_lease(id, &lease, false)?;
                self.meta.counts.running -= 1;
            }
            other => return Ok(Response::ItemStatus(Some(other))),
        }
        item.status = Status::Cancelled;
        item.dead_reason = Some("cancelled by a client".to_string());
        item.dead_at = Some(self.now);
        self.kv.put(keys::dead(self.now, id), Vec::new());
        put_t(self.kv, keys::item(id), &item);
        self.tally(|t| {
            t.cancelled += 1;
            t.cancelled_total += 1;
        })?;
        Ok(Response::ItemStatus(Some(Status::Cancelled)))
    }

    pub(super) fn retry(&mut self, id: WorkId) -> Result<Response, KvError> {
        let Some(mut item) = self.maybe_item(id)? else {
            return Ok(Response::ItemStatus(None));
        };
        let given_up = matches!(item.status, Status::Dead | Status::Cancelled);
        let Some(died) = item.dead_at.filter(|_| given_up) else {
            // Queued or running already (a retry applied twice, or another client's), or
            // done: nothing to do.
            return Ok(Response::ItemStatus(Some(item.status)));
        };
        self.kv.delete(keys::dead(died, id));
        let was_cancelled = item.status == Status::Cancelled;
        if !was_cancelled {
            self.meta.counts.dead -= 1;
        }
        self.tally(|t| {
            t.cancelled -= u64::from(was_cancelled);
            t.retried_total += 1;
        })?;
        // Attempts start again from zero. The fencing stays sound: a lease names its worker
        // as well as its attempt, every earlier lease was dropped when the item died or was
        // cancelled, and a worker that still computes a stale attempt of it computes the same
        // digest of the same payload.
        item.attempts = 0;
        item.status = Status::Queued;
        item.queued_at = self.now;
        item.dead_reason = None;
        item.dead_at = None;
        put_t(self.kv, keys::item(id), &item);
        let priority = self.priority_of(id)?;
        self.push_queue(id, priority)?;
        let c = &mut self.meta.counts;
        c.queued += 1;
        c.queued_iterations += u64::from(item.iterations);
        Ok(Response::ItemStatus(Some(Status::Queued)))
    }

    /// Drops a cancelled item past the dead retention from the tallies (the caller removes
    /// its records).
    pub(super) fn forget_cancelled(&mut self) -> Result<(), KvError> {
        self.tally(|t| t.cancelled -= 1)
    }

    /// Changes the [`Tallies`] record: its one writer.
    fn tally(&mut self, change: impl FnOnce(&mut Tallies)) -> Result<(), KvError> {
        let mut t = queries::tallies(self.kv)?;
        change(&mut t);
        put_t(self.kv, keys::TALLIES.to_vec(), &t);
        Ok(())
    }
}
