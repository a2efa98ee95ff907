//! The worker table and the cluster-wide budget: reservations, launches, registration,
//! exits, and reclaiming the items of a worker that is gone.

use super::*;

impl<K: Kv> Machine<'_, K> {
    pub(super) fn register(
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
                self.new_worker(id, parent, WorkerState::Running, 0)
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

    /// A worker record as it starts: `Launching` for a slot this cluster reserved (managed,
    /// its secret set when it registers), `Running` for a process that registered on its own.
    fn new_worker(
        &self,
        id: WorkerId,
        parent: NodeId,
        state: WorkerState,
        incarnation: u64,
    ) -> WorkerRecord {
        WorkerRecord {
            id,
            parent,
            state,
            managed: state == WorkerState::Launching,
            since: self.now,
            last_seen: self.now,
            leased: 0,
            completed: 0,
            handle: String::new(),
            host: String::new(),
            last_lease: None,
            secret: WorkerSecret::default(),
            incarnation,
        }
    }

    pub(super) fn exit(
        &mut self,
        worker: WorkerId,
        secret: WorkerSecret,
    ) -> Result<Response, KvError> {
        if self.authentic_worker(worker, secret)?.is_none() {
            return Ok(Response::Done);
        }
        self.reclaim(worker, Requeue::Released)?;
        self.kv.delete(keys::worker(worker));
        Ok(Response::Done)
    }

    pub(super) fn reserve(
        &mut self,
        parent: NodeId,
        incarnation: u64,
    ) -> Result<Response, KvError> {
        let max = self.meta.max_workers.unwrap_or(0);
        let managed = workers(self.kv)?.iter().filter(|w| w.managed).count();
        if managed as u64 >= u64::from(max) {
            return Ok(Response::Reserved { worker: None });
        }
        let id = WorkerId(self.meta.next_worker);
        self.meta.next_worker += 1;
        let record = self.new_worker(id, parent, WorkerState::Launching, incarnation);
        self.put_worker(&record);
        Ok(Response::Reserved { worker: Some(id) })
    }

    pub(super) fn launched(&mut self, worker: WorkerId, handle: &str) -> Result<Response, KvError> {
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

    pub(super) fn launch_failed(&mut self, worker: WorkerId) -> Result<Response, KvError> {
        if let Some(record) = self.worker(worker)? {
            if record.state == WorkerState::Launching {
                self.kv.delete(keys::worker(worker));
            }
        }
        Ok(Response::Done)
    }

    /// Requeues every item leased to `worker`; returns how many died.
    pub(super) fn reclaim(&mut self, worker: WorkerId, how: Requeue) -> Result<u32, KvError> {
        let (start, end) = keys::prefix_range(&keys::owner_prefix(worker));
        let owned: Vec<(Vec<u8>, Vec<u8>)> = self
            .kv
            .scan(&start, &end, false)
            .collect::<Result<_, _>>()?;
        let mut dead = 0;
        for (okey, _) in owned {
            let id = key_id(&okey)?;
            let mut item = self.item(id)?;
            if self.requeue(id, &mut item, how)? {
                dead += 1;
            }
        }
        Ok(dead)
    }
}

/// Whether a process with `handle` may register for the slot `w`.
fn claims(w: &WorkerRecord, handle: &str) -> bool {
    let same = !handle.is_empty() && w.handle == handle;
    match w.state {
        WorkerState::Launching => w.handle.is_empty() || handle.is_empty() || same,
        WorkerState::Running => same,
    }
}
