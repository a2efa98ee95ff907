//! The Raft log: append-only segment files of checksummed records, and the vote file.
//!
//! - **Durable before acknowledged.** An append is written and fdatasynced before openraft's
//!   callback says it is done; a new segment is synced with its directory before anything is
//!   written to it; the vote and the purge point are synced before they are reported saved;
//!   segments are deleted only after the purge point that covers them is durable. A failed
//!   sync poisons the store: every later write fails, openraft stops and the node exits, and
//!   it restarts from what is durable. A sync is never retried as if it had succeeded. A full
//!   disk is different: the write (not the sync) is cut back and retried once a second.
//! - **Verified when opened.** Every record carries a CRC-32C; opening the log reads them all.
//!   A torn last record (the file ends inside it, or only zeros follow it) was never
//!   acknowledged and is cut off. Anything else (a bad record with data after it, a bad
//!   header, a gap in the indexes) is corruption, reported to the caller, which does not
//!   trust this log (see [`crate::Recovery`]).
//! - **Appends bypass the page cache.** They are `O_DIRECT` writes of whole blocks
//!   ([`write::Direct`]): a segment may end with less than a block of zeros after its last
//!   record, which opening reads as its end. Where the file system refuses `O_DIRECT`
//!   (tmpfs before Linux 6.6), they go through the page cache.
//! - **Recent entries are served from memory** to replication and apply, within a byte
//!   budget; older ones are read back from their segment.
//! - **Payloads stay where they were written.** The state machine keeps only references to
//!   the entries that carried them ([`hashq_raft::types::PayloadRef`]), so a segment is
//!   deleted only once it is both purged (in a snapshot) and older than every payload still
//!   needed ([`LogStore::set_payload_floor`]); purged entries are no longer part of the Raft
//!   log, but their payloads are still read from them ([`LogStore::read_payloads`]).
//!
//! Opening and checking the log is [`open`], writing it [`write`], reading it [`read`],
//! the places of entries [`index`], openraft's traits [`traits`]; the record format is
//! [`segment`], the vote file [`state`].

mod index;
mod open;
mod read;
mod segment;
pub mod state;
mod traits;
mod write;

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use hashq_raft::{codec, Entry, LogId, NodeId};
use openraft::Vote;

use crate::fsio::Fatal;
use index::Index;
pub(crate) use read::PinnedLog;
use write::Writer;

/// The encoding version of an entry record's body.
const ENTRY_V1: u8 = 1;

/// How the log is sized.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// A segment is closed and a new one started beyond this size.
    pub segment_bytes: u64,
    /// Recent entries kept decoded in memory, in bytes of payload.
    pub cache_bytes: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: 64 << 20,
            cache_bytes: 32 << 20,
        }
    }
}

/// Corruption found when the log was opened.
#[derive(Clone, Debug)]
pub struct LogDamage {
    pub path: PathBuf,
    pub reason: String,
    /// The last index of the log that could still be read before the damage (the node must
    /// not vote until it holds at least this much again).
    pub readable_up_to: Option<u64>,
}

/// What opening the log found and did.
#[derive(Clone, Debug, Default)]
pub struct LogOpened {
    /// A torn tail was cut off (at this offset of this segment).
    pub torn_tail: Option<(PathBuf, u64)>,
    pub damage: Option<LogDamage>,
    /// The vote file had no valid slot.
    pub vote_lost: bool,
}

struct Inner {
    dir: PathBuf,
    options: LogOptions,
    /// The oldest log index whose payloads are still needed (0 until the state machine says).
    payload_floor: std::sync::atomic::AtomicU64,
    /// What is known committed from the state machine's side (its last applied entry, its
    /// latest snapshot): `read_committed` never answers less.
    committed_floor: Mutex<Option<LogId>>,
    writer: Mutex<Writer>,
    index: Mutex<Index>,
}

/// openraft's log store. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// [`lock`] if nobody holds `m` now, else `None`.
fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Appends the record body of `entry` to `buf`.
pub(crate) fn encode_entry_onto(buf: &mut Vec<u8>, entry: &Entry) {
    buf.push(ENTRY_V1);
    codec::encode_onto(buf, entry);
}

pub(crate) fn decode_entry(body: &[u8]) -> Result<Entry, String> {
    match body.split_first() {
        Some((&ENTRY_V1, rest)) => postcard::from_bytes(rest).map_err(|e| e.to_string()),
        Some((v, _)) => Err(format!("entry encoding {v} is unknown to this build")),
        None => Err("empty entry record".into()),
    }
}

/// The id of the entry in a record body, without decoding the rest (postcard writes the
/// entry's `log_id` first).
fn decode_log_id(body: &[u8]) -> Result<LogId, String> {
    match body.split_first() {
        Some((&ENTRY_V1, rest)) => postcard::take_from_bytes::<LogId>(rest)
            .map(|(id, _)| id)
            .map_err(|e| e.to_string()),
        Some((v, _)) => Err(format!("entry encoding {v} is unknown to this build")),
        None => Err("empty entry record".into()),
    }
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl LogStore {
    /// The last log id (or the purge point), for recovery decisions before Raft starts.
    pub fn last_log_id(&self) -> Option<LogId> {
        lock(&self.inner.index).last_log_id()
    }

    /// The purge point.
    pub fn purged(&self) -> Option<LogId> {
        lock(&self.inner.index).purged
    }

    /// The saved vote, without going through openraft.
    pub fn vote(&self) -> Option<Vote<NodeId>> {
        lock(&self.inner.writer).state.state().vote
    }

    /// Tells the log what the state machine has applied or snapshotted: all of it was
    /// committed, and openraft refuses to start with a committed index below its snapshot.
    pub fn set_committed_floor(&self, floor: Option<LogId>) {
        *lock(&self.inner.committed_floor) = floor;
    }

    /// Starts an empty log at `at` (durably): what comes before is in a snapshot.
    pub fn purge_to(&mut self, at: LogId) -> Result<(), Fatal> {
        let mut writer = lock(&self.inner.writer);
        writer.state.save_purged(at)?;
        writer.state.note_committed(Some(at))?;
        lock(&self.inner.index).purged = Some(at);
        Ok(())
    }

    /// The vote file's content.
    pub fn state(&self) -> state::RaftState {
        lock(&self.inner.writer).state.state().clone()
    }

    /// Saves `vote` (durably) outside openraft: a log set aside keeps the vote it had.
    pub fn keep_vote(&mut self, vote: Vote<NodeId>) -> Result<(), Fatal> {
        lock(&self.inner.writer).state.save_vote(vote)
    }
}

#[cfg(test)]
mod tests;
