//! The lease table of a session: the items it holds from lease to acknowledged completion,
//! each with its fencing attempt, its cancel flag and, once hashed, its result. Every
//! method leaves the table consistent before it can panic, so a poisoned lock still guards a
//! usable table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashq_proto::worker::Completion;
use hashq_proto::{Digest, WorkId};

/// The items a session holds: leased and not yet acknowledged as completed.
#[derive(Debug)]
pub(super) struct Held {
    items: HashMap<WorkId, HeldItem>,
    /// When the table last became empty; `None` while it holds something.
    idle_since: Option<Instant>,
}

#[derive(Debug)]
struct HeldItem {
    /// The fencing number of the lease.
    attempt: u32,
    /// Set when the lease is lost: the hashing stops at its next check.
    cancel: Arc<AtomicBool>,
    /// The result, once hashed, until the cluster acknowledges it.
    value: Option<Digest>,
}

impl Held {
    pub(super) fn new(now: Instant) -> Self {
        Held {
            items: HashMap::new(),
            idle_since: Some(now),
        }
    }

    /// Items leased and not hashed yet: what counts against the capacity.
    pub(super) fn unfinished(&self) -> usize {
        self.items.values().filter(|i| i.value.is_none()).count()
    }

    /// Records a new lease and returns its cancel flag.
    pub(super) fn grant(&mut self, id: WorkId, attempt: u32) -> Arc<AtomicBool> {
        let cancel = Arc::new(AtomicBool::new(false));
        let previous = self.items.insert(
            id,
            HeldItem {
                attempt,
                cancel: Arc::clone(&cancel),
                value: None,
            },
        );
        // The same item leased again means the older lease is gone: stop its hashing.
        if let Some(previous) = previous {
            if previous.attempt != attempt {
                previous.cancel.store(true, Ordering::Relaxed);
            }
        }
        self.idle_since = None;
        cancel
    }

    /// Stores the outcome of hashing. Returns whether a result is now ready to send; a result
    /// for a lease no longer held is dropped, and so is an item that produced none.
    pub(super) fn finish(
        &mut self,
        id: WorkId,
        attempt: u32,
        value: Option<Digest>,
        now: Instant,
    ) -> bool {
        let Some(item) = self.items.get_mut(&id) else {
            return false;
        };
        if item.attempt != attempt || item.cancel.load(Ordering::Relaxed) {
            return false;
        }
        match value {
            Some(value) => {
                item.value = Some(value);
                true
            }
            None => {
                self.remove(id, now);
                false
            }
        }
    }

    /// Up to `limit` results ready to send, in id order.
    pub(super) fn ready(&self, limit: usize) -> Vec<Completion> {
        let mut ready: Vec<Completion> = self
            .items
            .iter()
            .filter_map(|(&id, item)| {
                item.value.map(|value| Completion {
                    id,
                    attempt: item.attempt,
                    value,
                })
            })
            .collect();
        ready.sort_by_key(|c| c.id);
        ready.truncate(limit);
        ready
    }

    /// Forgets the results the cluster acknowledged (accepted or ignored: either way it has
    /// the one result it will keep).
    pub(super) fn acknowledge(&mut self, done: &[Completion], now: Instant) {
        for completion in done {
            if self
                .items
                .get(&completion.id)
                .is_some_and(|i| i.attempt == completion.attempt)
            {
                self.remove(completion.id, now);
            }
        }
    }

    /// Every held lease, for a heartbeat, in id order.
    pub(super) fn leases(&self) -> Vec<(WorkId, u32)> {
        let mut leases: Vec<(WorkId, u32)> =
            self.items.iter().map(|(&id, i)| (id, i.attempt)).collect();
        leases.sort_unstable();
        leases
    }

    /// Cancels and forgets the items of a heartbeat (`sent`) that the cluster says are
    /// `lost`. `lost` names ids only, so the attempt that was sent decides: an item leased
    /// again since the heartbeat left is a different lease and is kept. Returns how many
    /// were cancelled.
    pub(super) fn lost(&mut self, sent: &[(WorkId, u32)], lost: &[WorkId], now: Instant) -> usize {
        let mut cancelled = 0;
        for id in lost {
            let Some(&(_, attempt)) = sent.iter().find(|(sent_id, _)| sent_id == id) else {
                continue;
            };
            if let Some(item) = self.items.get(id).filter(|i| i.attempt == attempt) {
                item.cancel.store(true, Ordering::Relaxed);
                self.remove(*id, now);
                cancelled += 1;
            }
        }
        cancelled
    }

    /// Cancels and forgets the items not hashed yet; returns their leases, to release.
    pub(super) fn cancel_unfinished(&mut self, now: Instant) -> Vec<(WorkId, u32)> {
        let mut released: Vec<(WorkId, u32)> = self
            .items
            .iter()
            .filter(|(_, i)| i.value.is_none())
            .map(|(&id, i)| {
                i.cancel.store(true, Ordering::Relaxed);
                (id, i.attempt)
            })
            .collect();
        released.sort_unstable();
        for (id, _) in &released {
            self.remove(*id, now);
        }
        released
    }

    /// Cancels and forgets everything, results included; returns how many items it held.
    pub(super) fn cancel_all(&mut self, now: Instant) -> usize {
        let count = self.items.len();
        for item in self.items.values() {
            item.cancel.store(true, Ordering::Relaxed);
        }
        self.items.clear();
        self.idle_since.get_or_insert(now);
        count
    }

    /// How long the table has been empty; zero while it holds anything.
    pub(super) fn idle_for(&self, now: Instant) -> Duration {
        self.idle_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }

    fn remove(&mut self, id: WorkId, now: Instant) {
        self.items.remove(&id);
        if self.items.is_empty() {
            self.idle_since.get_or_insert(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(byte: u8) -> Digest {
        Digest::new([byte; 64])
    }

    #[test]
    fn held_items_flow_from_grant_to_acknowledgement() {
        let start = Instant::now();
        let mut held = Held::new(start);
        assert!(held.idle_for(start + Duration::from_secs(3)) >= Duration::from_secs(3));
        held.grant(WorkId(2), 1);
        held.grant(WorkId(1), 4);
        assert_eq!(held.unfinished(), 2);
        assert_eq!(
            held.idle_for(start + Duration::from_secs(9)),
            Duration::ZERO
        );
        assert_eq!(held.leases(), [(WorkId(1), 4), (WorkId(2), 1)]);

        assert!(held.finish(WorkId(2), 1, Some(digest(2)), start));
        assert_eq!(held.unfinished(), 1);
        let ready = held.ready(10);
        assert_eq!(ready.len(), 1);
        assert_eq!((ready[0].id, ready[0].attempt), (WorkId(2), 1));
        // Still heartbeated until the cluster acknowledges it.
        assert_eq!(held.leases().len(), 2);

        held.acknowledge(&ready, start);
        assert_eq!(held.leases(), [(WorkId(1), 4)]);
        assert!(held.finish(WorkId(1), 4, Some(digest(1)), start));
        let later = start + Duration::from_secs(1);
        held.acknowledge(&held.ready(10), later);
        assert!(held.leases().is_empty());
        assert_eq!(
            held.idle_for(later + Duration::from_secs(2)),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn ready_is_bounded_and_ordered() {
        let now = Instant::now();
        let mut held = Held::new(now);
        for id in (0..10).rev() {
            held.grant(WorkId(id), 1);
            held.finish(WorkId(id), 1, Some(digest(id as u8)), now);
        }
        let ids: Vec<u64> = held.ready(3).iter().map(|c| c.id.0).collect();
        assert_eq!(ids, [0, 1, 2]);
    }

    #[test]
    fn lost_leases_are_cancelled_and_their_results_never_sent() {
        let now = Instant::now();
        let mut held = Held::new(now);
        let cancel = held.grant(WorkId(1), 1);
        held.grant(WorkId(2), 1);
        let sent = held.leases();
        assert_eq!(held.lost(&sent, &[WorkId(1), WorkId(99)], now), 1);
        assert!(cancel.load(Ordering::Relaxed));
        assert!(!held.finish(WorkId(1), 1, Some(digest(1)), now));
        assert!(held.ready(10).is_empty());
        assert_eq!(held.leases(), [(WorkId(2), 1)]);
    }

    #[test]
    fn a_lost_report_for_an_older_attempt_keeps_the_new_lease() {
        let now = Instant::now();
        let mut held = Held::new(now);
        let old = held.grant(WorkId(1), 1);
        let sent = held.leases();
        // The item came back to this worker with a new attempt before the answer arrived.
        let new = held.grant(WorkId(1), 2);
        assert!(old.load(Ordering::Relaxed));
        assert_eq!(held.lost(&sent, &[WorkId(1)], now), 0);
        assert!(!new.load(Ordering::Relaxed));
        // The old attempt's result is not taken for the new one.
        assert!(!held.finish(WorkId(1), 1, Some(digest(1)), now));
        assert!(held.finish(WorkId(1), 2, Some(digest(2)), now));
    }

    #[test]
    fn an_item_without_a_result_frees_its_place() {
        let now = Instant::now();
        let mut held = Held::new(now);
        held.grant(WorkId(1), 1);
        assert!(!held.finish(WorkId(1), 1, None, now));
        assert_eq!(held.unfinished(), 0);
        assert!(held.leases().is_empty());
    }

    #[test]
    fn leaving_releases_unfinished_and_keeps_results_to_deliver() {
        let now = Instant::now();
        let mut held = Held::new(now);
        let running = held.grant(WorkId(3), 1);
        held.grant(WorkId(1), 2);
        held.grant(WorkId(2), 1);
        held.finish(WorkId(2), 1, Some(digest(2)), now);
        assert_eq!(
            held.cancel_unfinished(now),
            [(WorkId(1), 2), (WorkId(3), 1)]
        );
        assert!(running.load(Ordering::Relaxed));
        let ready = held.ready(10);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].id, WorkId(2));
        assert_eq!(held.cancel_all(now), 1);
        assert!(held.leases().is_empty());
    }
}
