//! Housekeeping at a stamped time: expired leases, lost workers, and records past their
//! retention.

use super::*;

impl<K: Kv> Machine<'_, K> {
    pub(super) fn tick(&mut self, p: &TickParams) -> Result<Response, KvError> {
        let mut report = TickReport::default();
        let limit = p.limit.max(1) as usize;
        let max_attempts = p.max_attempts.max(1);

        // Expired leases go back to the queue, or die after max_attempts.
        let (start, end) = keys::up_to(keys::LEASE, self.now);
        let expired: Vec<(Vec<u8>, Vec<u8>)> = self
            .kv
            .scan(&start, &end, false)
            .take(limit)
            .collect::<Result<_, _>>()?;
        for (lkey, _) in expired {
            let id = key_id(&lkey)?;
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
        let cutoff = self.now.saturating_sub(p.pulled_retention_ms);
        let (start, end) = keys::up_to(keys::PULLED, cutoff);
        let old: Vec<(Vec<u8>, Vec<u8>)> = self
            .kv
            .scan(&start, &end, false)
            .take(limit)
            .collect::<Result<_, _>>()?;
        for (rkey, _) in old {
            let id = key_id(&rkey)?;
            self.kv.delete(rkey);
            self.forget_item(id);
            self.meta.counts.pulled -= 1;
            report.forgotten += 1;
        }
        report.forgotten += self.drop_expired_results(p, limit)?;
        report.forgotten += self.drop_expired_dead(p, limit)?;
        let (start, end) = keys::up_to(keys::KEY_EXPIRY, self.now);
        let old: Vec<(Vec<u8>, Vec<u8>)> = self
            .kv
            .scan(&start, &end, false)
            .take(limit)
            .collect::<Result<_, _>>()?;
        for (xkey, _) in old {
            let Some(Key::KeyExpiry { table, key, .. }) = Key::decode(&xkey) else {
                return Err(corrupt(&xkey, "malformed key-expiry key"));
            };
            self.kv.delete(keys::idempotency(table, &key));
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
            self.forget_item(id);
            self.meta.counts.completed -= 1;
            self.meta.counts.dropped_total += 1;
            dropped += 1;
        }
        Ok(dropped)
    }

    /// Drops dead and cancelled items (and their payloads) past their retention, oldest
    /// first.
    fn drop_expired_dead(&mut self, p: &TickParams, limit: usize) -> Result<u32, KvError> {
        let (start, _) = keys::table(keys::DEAD);
        let end = keys::dead(self.now.saturating_sub(p.dead_retention_ms) + 1, WorkId(0));
        let old: Vec<(Vec<u8>, Vec<u8>)> = self
            .kv
            .scan(&start, &end, false)
            .take(limit)
            .collect::<Result<_, _>>()?;
        for (dkey, _) in &old {
            let id = key_id(dkey)?;
            let item = self.item(id)?;
            self.kv.delete(dkey.clone());
            self.forget_item(id);
            if self.payload_records {
                self.kv.delete(keys::payload(&item.payload));
            }
            if item.status == Status::Cancelled {
                self.forget_cancelled()?;
            } else {
                self.meta.counts.dead -= 1;
            }
            let c = &mut self.meta.counts;
            c.payload_bytes -= u64::from(item.payload_len);
            c.dropped_total += 1;
        }
        Ok(old.len() as u32)
    }
}

/// Whether a [`Request::Tick`] at `now` would do anything: the leader proposes one only then.
pub fn tick_due(kv: &impl KvRead, now: Millis, p: &TickParams) -> Result<bool, KvError> {
    let first_before = |tag: u8, bound: Millis| -> Result<bool, KvError> {
        let (start, end) = keys::up_to(tag, bound);
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
