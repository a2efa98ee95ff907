//! The key layout of the state machine's one ordered keyspace.
//!
//! Every key starts with a one-byte table tag; numbers are big-endian so that byte order is
//! numeric order. Keeping all tables in one keyspace lets one atomic batch carry an apply call
//! together with `last_applied`, and lets a snapshot be a plain dump of the keyspace.

use crate::types::{Millis, PayloadRef, WorkId, WorkerId};

/// `m`: the [`crate::machine::Meta`] record (counters, time, budget).
pub const META: &[u8] = b"m";
/// `s`: storage-owned records (last applied log id, membership), written by the store.
pub const LAST_APPLIED: &[u8] = b"s:last_applied";
pub const MEMBERSHIP: &[u8] = b"s:membership";

/// Item metadata, by id.
pub const ITEM: u8 = b'i';
/// Live payloads, by where they are: (log index, ordinal) -> (term, id), present while the
/// item holds its payload (queued, running, dead). The first key is the oldest log entry
/// whose payloads are still needed: the log keeps its segments from there on.
pub const PAYLOAD: u8 = b'p';
/// The FIFO queue: queued item ids.
pub const QUEUE: u8 = b'q';
/// Lease deadlines: (deadline, id), for the reaper.
pub const LEASE: u8 = b'l';
/// Lease owners: (worker, id) -> attempt, for heartbeats and reclaiming a lost worker.
pub const OWNER: u8 = b'o';
/// Completed, not yet pulled: completion sequence -> id (newest last).
pub const COMPLETED: u8 = b'c';
/// Pulled items kept for the retention window: (pulled_at, id).
pub const PULLED: u8 = b'r';
/// Dead items: (died_at, id), oldest first, for their retention.
pub const DEAD: u8 = b'd';
/// Enqueue idempotency keys.
pub const ENQUEUE_KEY: u8 = b'e';
/// Take (pullCompleted) idempotency keys.
pub const TAKE_KEY: u8 = b't';
/// Idempotency key expiry index: (expires_at, table tag, key).
pub const KEY_EXPIRY: u8 = b'x';
/// The worker table, by worker id.
pub const WORKER: u8 = b'w';

fn tagged(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(tag);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

pub fn item(id: WorkId) -> Vec<u8> {
    tagged(ITEM, &[&id.0.to_be_bytes()])
}
pub fn payload(at: &PayloadRef) -> Vec<u8> {
    tagged(
        PAYLOAD,
        &[&at.index.to_be_bytes(), &at.ordinal.to_be_bytes()],
    )
}
pub fn queue(id: WorkId) -> Vec<u8> {
    tagged(QUEUE, &[&id.0.to_be_bytes()])
}
pub fn lease(deadline: Millis, id: WorkId) -> Vec<u8> {
    tagged(LEASE, &[&deadline.to_be_bytes(), &id.0.to_be_bytes()])
}
pub fn owner(worker: WorkerId, id: WorkId) -> Vec<u8> {
    tagged(OWNER, &[&worker.0.to_be_bytes(), &id.0.to_be_bytes()])
}
pub fn owner_prefix(worker: WorkerId) -> Vec<u8> {
    tagged(OWNER, &[&worker.0.to_be_bytes()])
}
pub fn completed(seq: u64) -> Vec<u8> {
    tagged(COMPLETED, &[&seq.to_be_bytes()])
}
pub fn pulled(at: Millis, id: WorkId) -> Vec<u8> {
    tagged(PULLED, &[&at.to_be_bytes(), &id.0.to_be_bytes()])
}
pub fn dead(at: Millis, id: WorkId) -> Vec<u8> {
    tagged(DEAD, &[&at.to_be_bytes(), &id.0.to_be_bytes()])
}
pub fn idempotency(table: u8, key: &str) -> Vec<u8> {
    tagged(table, &[key.as_bytes()])
}
pub fn key_expiry(expires_at: Millis, table: u8, key: &str) -> Vec<u8> {
    tagged(
        KEY_EXPIRY,
        &[&expires_at.to_be_bytes(), &[table], key.as_bytes()],
    )
}
pub fn worker(id: WorkerId) -> Vec<u8> {
    tagged(WORKER, &[&id.0.to_be_bytes()])
}

/// The half-open range of all keys of one table.
pub fn table(tag: u8) -> (Vec<u8>, Vec<u8>) {
    (vec![tag], vec![tag + 1])
}

/// The half-open range of keys that start with `prefix`.
pub fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut end = prefix.to_vec();
    // Every prefix here ends in a fixed-width number, never 0xff..ff in practice; walk back
    // over 0xff bytes to stay correct anyway.
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return (prefix.to_vec(), end);
        }
    }
    (prefix.to_vec(), vec![0xff; prefix.len() + 1])
}

/// Reads a big-endian u64 at `at` in a key.
pub fn u64_at(key: &[u8], at: usize) -> Option<u64> {
    key.get(at..at + 8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("slice of 8")))
}
