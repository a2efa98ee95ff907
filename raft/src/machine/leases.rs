//! Leases: granting queued items to a worker, heartbeats, completions and releases, and
//! taking an item back out of its lease.

use super::*;

impl<K: Kv> Machine<'_, K> {
    /// The prologue of a lease or a heartbeat: the worker must prove itself and ask for a
    /// lease length in range; its record, seen now, is returned for the caller to store.
    fn seen_worker(
        &self,
        worker: WorkerId,
        secret: WorkerSecret,
        lease_ms: u64,
    ) -> Result<Result<WorkerRecord, Response>, KvError> {
        let Some(mut record) = self.authentic_worker(worker, secret)? else {
            return Ok(Err(Response::Rejected(Rejection::UnknownWorker(worker))));
        };
        if lease_ms == 0 || lease_ms > MAX_LEASE_MS {
            return Ok(Err(invalid("lease_ms out of range")));
        }
        record.last_seen = self.now;
        Ok(Ok(record))
    }

    pub(super) fn lease(
        &mut self,
        worker: WorkerId,
        secret: WorkerSecret,
        grant: Grant,
        lease_ms: u64,
        request_id: u64,
    ) -> Result<Response, KvError> {
        let mut record = match self.seen_worker(worker, secret, lease_ms)? {
            Ok(record) => record,
            Err(refused) => return Ok(refused),
        };
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
        let head: Vec<(Vec<u8>, WorkId, u8)> = priority::in_lease_order(self.kv)
            .take(grant.max.min(MAX_LEASE_BATCH) as usize)
            .collect::<Result<_, _>>()?;
        let deadline = self.now + lease_ms;
        let mut items = Vec::with_capacity(head.len());
        let (mut bytes, mut iterations) = (0u64, 0u64);
        for (_, id, priority) in head {
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
            self.pop_queue(id, priority)?;
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

    pub(super) fn heartbeat(
        &mut self,
        worker: WorkerId,
        secret: WorkerSecret,
        held_items: &[(WorkId, u32)],
        lease_ms: u64,
        parent: Option<NodeId>,
    ) -> Result<Response, KvError> {
        let mut record = match self.seen_worker(worker, secret, lease_ms)? {
            Ok(record) => record,
            Err(refused) => return Ok(refused),
        };
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

    pub(super) fn complete(
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
            if self.payload_records {
                self.kv.delete(keys::payload(&item.payload));
            }
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

    pub(super) fn release(
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

    /// Takes a running item out of its lease and back into the queue (or to dead). Returns
    /// whether it died.
    pub(super) fn requeue(
        &mut self,
        id: WorkId,
        item: &mut Item,
        how: Requeue,
    ) -> Result<bool, KvError> {
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
            let priority = self.priority_of(id)?;
            self.push_queue(id, priority)?;
            self.meta.counts.queued += 1;
            self.meta.counts.queued_iterations += u64::from(item.iterations);
        }
        put_t(self.kv, keys::item(id), item);
        Ok(dies)
    }

    /// Removes a lease from the indexes and from its worker's count.
    pub(super) fn drop_lease(
        &mut self,
        id: WorkId,
        lease: &Lease,
        completed: bool,
    ) -> Result<(), KvError> {
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
}

/// The lease of `item` if it is running under `worker` at `attempt`.
fn held(item: &Item, worker: WorkerId, attempt: u32) -> Option<Lease> {
    item.lease
        .filter(|l| item.status == Status::Running && l.worker == worker && l.attempt == attempt)
}
