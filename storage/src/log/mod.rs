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
//! - **Recent entries are served from memory** to replication and apply, within a byte
//!   budget; older ones are read back from their segment.
//! - **Payloads stay where they were written.** The state machine keeps only references to
//!   the entries that carried them ([`hashq_raft::types::PayloadRef`]), so a segment is
//!   deleted only once it is both purged (in a snapshot) and older than every payload still
//!   needed ([`LogStore::set_payload_floor`]); purged entries are no longer part of the Raft
//!   log, but their payloads are still read from them ([`LogStore::read_payloads`]).

mod segment;
pub mod state;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use hashq_raft::command::Request;
use hashq_raft::types::PayloadRef;
use hashq_raft::{Entry, LogId, NodeId, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};

use crate::fsio::{self, fatal, Fatal};
use segment::{Damage, RecordAt};
use state::{StateError, StateFile};

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

/// Where an entry is.
#[derive(Clone, Copy, Debug)]
struct Loc {
    log_id: LogId,
    segment: u64,
    at: RecordAt,
}

pub(crate) struct SegmentFile {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
}

/// A segment and the last index written to it.
struct Segment {
    file: Arc<SegmentFile>,
    last: Option<u64>,
}

/// What readers look up: the entries' places and the recent ones in memory.
struct Index {
    segments: BTreeMap<u64, Segment>,
    /// Consecutive entries, the first at `entries[0].log_id.index`.
    entries: VecDeque<Loc>,
    /// Entries purged from the Raft log whose segments are kept for their payloads, by
    /// index (not always consecutive: a snapshot install can leave a gap).
    retained: VecDeque<Loc>,
    purged: Option<LogId>,
    cache: VecDeque<Entry>,
    cache_bytes: usize,
}

impl Index {
    fn last_log_id(&self) -> Option<LogId> {
        self.entries.back().map(|l| l.log_id).max(self.purged)
    }

    fn position(&self, index: u64) -> Option<usize> {
        let first = self.entries.front()?.log_id.index;
        let pos = index.checked_sub(first)? as usize;
        (pos < self.entries.len()).then_some(pos)
    }

    /// Where entry `index` is, in the log or among the retained entries.
    fn locate(&self, index: u64) -> Option<Loc> {
        if let Some(pos) = self.position(index) {
            return Some(self.entries[pos]);
        }
        self.retained
            .binary_search_by_key(&index, |l| l.log_id.index)
            .ok()
            .map(|pos| self.retained[pos])
    }

    fn note_written(&mut self, loc: &Loc) {
        if let Some(seg) = self.segments.get_mut(&loc.segment) {
            seg.last = Some(
                seg.last
                    .map_or(loc.log_id.index, |l| l.max(loc.log_id.index)),
            );
        }
    }

    /// Moves the entries up to `upto` from the log to the retained ones.
    fn retire(&mut self, upto: u64) {
        while self.entries.front().is_some_and(|l| l.log_id.index <= upto) {
            if let Some(loc) = self.entries.pop_front() {
                self.push_retained(loc);
            }
        }
    }

    fn push_retained(&mut self, loc: Loc) {
        // Kept sorted: anything at or after this index is stale (an install's gap).
        while self
            .retained
            .back()
            .is_some_and(|l| l.log_id.index >= loc.log_id.index)
        {
            self.retained.pop_back();
        }
        self.retained.push_back(loc);
    }

    fn cached(&self, index: u64) -> Option<&Entry> {
        let first = self.cache.front()?.log_id.index;
        self.cache.get(index.checked_sub(first)? as usize)
    }

    fn cache_push(&mut self, entry: Entry, limit: usize) {
        if self
            .cache
            .back()
            .is_some_and(|e| e.log_id.index + 1 != entry.log_id.index)
        {
            self.cache.clear();
            self.cache_bytes = 0;
        }
        self.cache_bytes += entry_bytes(&entry);
        self.cache.push_back(entry);
        while self.cache_bytes > limit && self.cache.len() > 1 {
            if let Some(old) = self.cache.pop_front() {
                self.cache_bytes -= entry_bytes(&old);
            }
        }
    }

    fn cache_truncate(&mut self, from: u64) {
        while self.cache.back().is_some_and(|e| e.log_id.index >= from) {
            if let Some(e) = self.cache.pop_back() {
                self.cache_bytes -= entry_bytes(&e);
            }
        }
    }
}

fn entry_bytes(entry: &Entry) -> usize {
    64 + match &entry.payload {
        openraft::EntryPayload::Normal(c) => c
            .requests
            .iter()
            .map(|r| r.payload().map_or(64, |p| p.len() + 64))
            .sum(),
        _ => 256,
    }
}

/// The writer's state: only one write runs at a time.
struct Writer {
    state: StateFile,
    active: Option<Active>,
    /// Set by a failed sync: nothing is written any more.
    poisoned: Option<String>,
}

struct Active {
    first: u64,
    path: PathBuf,
    file: File,
    len: u64,
    /// The index the next entry must have to go into this segment (a jump, after a
    /// snapshot install, starts a new segment so each segment stays consecutive).
    next: u64,
}

impl Active {
    /// Opens an existing segment to append to it at its end.
    fn open(first: u64, path: PathBuf, next: u64) -> Result<Active, Fatal> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(fatal("open", &path))?;
        let len = file.metadata().map_err(fatal("stat", &path))?.len();
        Ok(Active {
            first,
            path,
            file,
            len,
            next,
        })
    }
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

pub(crate) fn encode_entry(entry: &Entry) -> Vec<u8> {
    let mut body = vec![ENTRY_V1];
    body.extend_from_slice(&postcard::to_allocvec(entry).expect("entries always encode"));
    body
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
    /// Opens the log in `dir` with its vote file at `vote_path`, verifying every record.
    /// A torn tail is cut off; corruption is reported in [`LogOpened::damage`] and the log
    /// is opened as far as it could be read (the caller decides what to do with it).
    pub fn open(
        dir: &Path,
        vote_path: &Path,
        options: LogOptions,
    ) -> Result<(LogStore, LogOpened), Fatal> {
        let mut opened = LogOpened::default();
        let state = match StateFile::open(vote_path) {
            Ok(s) => s,
            Err(StateError::Fatal(e)) => return Err(e),
            Err(StateError::Corrupt { path }) => {
                opened.vote_lost = true;
                let aside = path.with_extension("corrupt");
                fsio::rename_durable(&path, &aside)?;
                match StateFile::open(&path) {
                    Ok(s) => s,
                    Err(StateError::Fatal(e)) => return Err(e),
                    Err(StateError::Corrupt { path }) => {
                        return Err(fatal("create", &path)(io_err(
                            "a fresh vote file is corrupt",
                        )))
                    }
                }
            }
        };
        let purged = state.state().purged;
        let mut index = Index {
            segments: BTreeMap::new(),
            entries: VecDeque::new(),
            retained: VecDeque::new(),
            purged,
            cache: VecDeque::new(),
            cache_bytes: 0,
        };
        let found = segment::list(dir).map_err(fatal("list", dir))?;
        let count = found.len();
        let mut active = None;
        for (n, (first, path)) in found.into_iter().enumerate() {
            let last_segment = n + 1 == count;
            if opened.damage.is_some() {
                break;
            }
            let scanned = segment::scan_with(&path, |_, body| decode_log_id(body))
                .map_err(fatal("read", &path))?;
            let mut expected = index.entries.back().map(|l| l.log_id.index + 1);
            let resume = purged.map_or(0, |p| p.index + 1);
            if expected.is_some_and(|e| e != first && e <= resume && first <= resume) {
                // Everything before is purged, and the log went on from a snapshot: what
                // came before this segment is no longer part of the log (its payloads may
                // still be needed).
                let before = index.entries.back().map_or(0, |l| l.log_id.index);
                index.retire(before);
                expected = None;
            }
            let mut damage = match scanned.damage.clone() {
                Some(Damage::TornTail { at }) if last_segment => {
                    opened.torn_tail = Some((path.clone(), at));
                    None
                }
                Some(Damage::TornTail { at }) => Some(format!(
                    "a segment that is not the last ends inside a record at {at}"
                )),
                Some(Damage::Corrupt { at, reason }) => Some(format!("at offset {at}: {reason}")),
                None => None,
            };
            if damage.is_none() && expected.is_some_and(|e| e != first) {
                damage = Some(format!(
                    "starts at index {first}, the log expects {expected:?}"
                ));
            }
            let mut next = first;
            let mut locs = Vec::with_capacity(scanned.records.len());
            for (at, kind, log_id) in &scanned.records {
                if damage.is_some() {
                    break;
                }
                if *kind != segment::KIND_ENTRY {
                    damage = Some(format!("record of unknown kind {kind} at {}", at.offset));
                    break;
                }
                match log_id {
                    Ok(log_id) if log_id.index == next => {
                        locs.push(Loc {
                            log_id: *log_id,
                            segment: first,
                            at: *at,
                        });
                        next += 1;
                    }
                    Ok(log_id) => {
                        damage = Some(format!("entry {log_id} where index {next} belongs"));
                    }
                    Err(e) => damage = Some(format!("undecodable entry at {}: {e}", at.offset)),
                }
            }
            if let Some(reason) = damage {
                opened.damage = Some(LogDamage {
                    path: path.clone(),
                    reason,
                    readable_up_to: index
                        .entries
                        .back()
                        .map(|l| l.log_id.index)
                        .or(locs.last().map(|l| l.log_id.index)),
                });
                index.entries.extend(locs);
                break;
            }
            if let Some((_, at)) = &opened.torn_tail {
                if last_segment {
                    let file = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(fatal("open", &path))?;
                    file.set_len(*at).map_err(fatal("truncate", &path))?;
                    fsio::sync_data(&file, &path)?;
                    tracing::warn!(path = %path.display(), at, "cut off a torn last record");
                }
            }
            if last_segment && scanned.records.is_empty() && scanned.end == 0 {
                // Cut while being created: nothing was ever in it.
                fsio::remove_durable(&path)?;
                continue;
            }
            let last = locs.last().map(|l| l.log_id.index);
            index.entries.extend(locs);
            let read = File::open(&path).map_err(fatal("open", &path))?;
            index.segments.insert(
                first,
                Segment {
                    file: Arc::new(SegmentFile {
                        path: path.clone(),
                        file: read,
                    }),
                    last,
                },
            );
            if last_segment {
                let next = index.entries.back().map_or(first, |l| l.log_id.index + 1);
                active = Some(Active::open(first, path, next)?);
            }
        }
        // Entries at or below the purge point are not part of the log any more.
        if let Some(p) = purged {
            index.retire(p.index);
        }
        let store = LogStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                options,
                payload_floor: std::sync::atomic::AtomicU64::new(0),
                committed_floor: Mutex::new(None),
                writer: Mutex::new(Writer {
                    state,
                    active,
                    poisoned: None,
                }),
                index: Mutex::new(index),
            }),
        };
        Ok((store, opened))
    }

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

    /// Runs `f` on the writer on a blocking thread.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut Writer) -> Result<T, Fatal> + Send + 'static,
    ) -> Result<T, Fatal> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut writer = lock(&inner.writer);
            if let Some(why) = &writer.poisoned {
                return Err(fatal("write to a poisoned log", &inner.dir)(io_err(why)));
            }
            let result = f(&inner, &mut writer);
            if let Err(e) = &result {
                tracing::error!(error = %e, "the Raft log cannot be written; no further writes");
                writer.poisoned = Some(e.to_string());
            }
            result
        })
        .await
        .unwrap_or_else(|e| Err(fatal("log writer", &self.inner.dir)(io_err(e))))
    }

    fn read_entries(&self, start: u64, end: u64) -> Result<Vec<Entry>, io::Error> {
        let mut out = Vec::new();
        let mut misses = Vec::new();
        {
            let index = lock(&self.inner.index);
            let first = index.entries.front().map_or(end, |l| l.log_id.index);
            for i in start.max(first)..end {
                if let Some(e) = index.cached(i) {
                    out.push(Some(e.clone()));
                    continue;
                }
                let Some(pos) = index.position(i) else {
                    break;
                };
                let loc = index.entries[pos];
                let Some(file) = index.segments.get(&loc.segment).map(|s| s.file.clone()) else {
                    return Err(io_err(format!(
                        "segment {} of entry {i} is gone",
                        loc.segment
                    )));
                };
                misses.push((out.len(), loc, file));
                out.push(None);
            }
        }
        for (slot, loc, file) in misses {
            out[slot] = Some(read_entry(&file, &loc)?);
        }
        Ok(out.into_iter().map_while(|e| e).collect())
    }

    /// Tells the log the oldest index whose payloads are still needed; segments wholly
    /// before it (and purged) are deleted, on a blocking thread.
    pub fn set_payload_floor(&self, floor: u64) {
        use std::sync::atomic::Ordering;
        let old = self.inner.payload_floor.swap(floor, Ordering::Relaxed);
        if floor <= old || !self.has_garbage() {
            return;
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut writer = lock(&inner.writer);
            if writer.poisoned.is_none() {
                if let Err(e) = inner.collect_garbage(&writer) {
                    tracing::error!(error = %e, "the Raft log cannot delete old segments; no further writes");
                    writer.poisoned = Some(e.to_string());
                }
            }
        });
    }

    /// Whether a segment could be deleted now.
    fn has_garbage(&self) -> bool {
        let index = lock(&self.inner.index);
        let bound = self.inner.keep_from(&index);
        let mut segments = index.segments.values();
        // Never the last segment (the active one).
        let (Some(first), Some(_)) = (segments.next(), segments.next()) else {
            return false;
        };
        first.last.is_none_or(|l| l < bound)
    }

    /// The payloads at `refs`, read from the entries that carried them: `None` where this
    /// log does not hold that entry (it is gone, or another term's entry has its index).
    /// Each entry is read once however many of its payloads are asked for.
    pub fn read_payloads(&self, refs: &[PayloadRef]) -> io::Result<Vec<Option<Bytes>>> {
        let mut out = vec![None; refs.len()];
        let mut wanted: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, r) in refs.iter().enumerate() {
            wanted.entry(r.index).or_default().push(i);
        }
        for (index, slots) in wanted {
            let term = refs[slots[0]].term;
            let found = {
                let idx = lock(&self.inner.index);
                match idx.locate(index) {
                    Some(loc) if loc.log_id.leader_id.term == term => {
                        match idx.cached(index).filter(|e| e.log_id == loc.log_id) {
                            Some(e) => Some(Ok(e.clone())),
                            None => idx
                                .segments
                                .get(&loc.segment)
                                .map(|s| Err((s.file.clone(), loc))),
                        }
                    }
                    _ => None,
                }
            };
            let entry = match found {
                None => continue,
                Some(Ok(entry)) => entry,
                Some(Err((file, loc))) => read_entry(&file, &loc)?,
            };
            let openraft::EntryPayload::Normal(command) = &entry.payload else {
                continue;
            };
            for slot in slots {
                let r = &refs[slot];
                if r.term != term {
                    continue;
                }
                if let Some(payload) = command
                    .requests
                    .get(r.ordinal as usize)
                    .and_then(Request::payload)
                {
                    out[slot] = Some(payload.clone());
                }
            }
        }
        Ok(out)
    }

    /// Open handles on the segments that hold entries from `from` to `to` (a snapshot's
    /// payloads): they stay readable however the log moves on meanwhile.
    pub(crate) fn pin(&self, from: u64, to: u64) -> PinnedLog {
        let index = lock(&self.inner.index);
        let locs: Vec<Loc> = index
            .retained
            .iter()
            .chain(index.entries.iter())
            .filter(|l| (from..=to).contains(&l.log_id.index))
            .copied()
            .collect();
        let files = locs
            .iter()
            .filter_map(|l| {
                index
                    .segments
                    .get(&l.segment)
                    .map(|s| (l.segment, s.file.clone()))
            })
            .collect();
        PinnedLog { locs, files }
    }
}

/// Reads and checks the entry at `loc`.
fn read_entry(file: &SegmentFile, loc: &Loc) -> io::Result<Entry> {
    let mut buf = vec![0u8; loc.at.body_len as usize + 1];
    file.file.read_exact_at(&mut buf, loc.at.body - 1)?;
    let kind = buf[0];
    let body = &buf[1..];
    let entry = decode_entry(body).map_err(|e| {
        io_err(format!(
            "{}: entry {}: {e}",
            file.path.display(),
            loc.log_id
        ))
    })?;
    if kind != segment::KIND_ENTRY || entry.log_id != loc.log_id {
        return Err(io_err(format!(
            "{}: expected entry {} at {}",
            file.path.display(),
            loc.log_id,
            loc.at.offset
        )));
    }
    Ok(entry)
}

/// Entries of a snapshot's range, with their segments held open (see [`LogStore::pin`]).
pub(crate) struct PinnedLog {
    locs: Vec<Loc>,
    files: BTreeMap<u64, Arc<SegmentFile>>,
}

impl PinnedLog {
    /// Bytes of the segments held.
    pub(crate) fn bytes(&self) -> u64 {
        self.files
            .values()
            .map(|f| f.file.metadata().map_or(0, |m| m.len()))
            .sum()
    }

    /// The entry at `index` if it is `term`'s.
    pub(crate) fn entry(&self, index: u64, term: u64) -> io::Result<Option<Entry>> {
        let Ok(pos) = self.locs.binary_search_by_key(&index, |l| l.log_id.index) else {
            return Ok(None);
        };
        let loc = self.locs[pos];
        if loc.log_id.leader_id.term != term {
            return Ok(None);
        }
        match self.files.get(&loc.segment) {
            Some(file) => read_entry(file, &loc).map(Some),
            None => Ok(None),
        }
    }
}

impl Inner {
    /// The first index whose segment must be kept: neither purged nor older than a payload
    /// still needed.
    fn keep_from(&self, index: &Index) -> u64 {
        let purged = index.purged.map_or(0, |p| p.index + 1);
        purged.min(
            self.payload_floor
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Deletes the segments wholly before [`Inner::keep_from`] (never the active one).
    fn collect_garbage(&self, w: &Writer) -> Result<(), Fatal> {
        let active = w.active.as_ref().map(|a| a.first);
        let doomed: Vec<Arc<SegmentFile>> = {
            let mut index = lock(&self.index);
            let bound = self.keep_from(&index);
            let mut doomed = Vec::new();
            let firsts: Vec<u64> = index.segments.keys().copied().collect();
            for first in firsts {
                if Some(first) == active {
                    break;
                }
                let seg = &index.segments[&first];
                if seg.last.is_some_and(|l| l >= bound) {
                    break;
                }
                if let Some(seg) = index.segments.remove(&first) {
                    doomed.push(seg.file);
                }
                index.retained.retain(|l| l.segment != first);
            }
            doomed
        };
        for seg in doomed {
            fsio::remove_durable(&seg.path)?;
        }
        Ok(())
    }

    /// Appends encoded records (one write, one fdatasync), rolling to a new segment first if
    /// the active one is full. A full disk is waited out: the partial write is cut back and
    /// retried.
    fn append(&self, w: &mut Writer, entries: &[Entry]) -> Result<Vec<Loc>, Fatal> {
        let Some(first) = entries.first() else {
            return Ok(Vec::new());
        };
        let needs_new = match &w.active {
            None => true,
            Some(a) => a.len >= self.options.segment_bytes || a.next != first.log_id.index,
        };
        if needs_new {
            self.roll(w, first.log_id.index)?;
        }
        let mut locs = Vec::with_capacity(entries.len());
        let mut rest = entries;
        while !rest.is_empty() {
            // As many entries as fit in the active segment (at least one), then a new one.
            let active = w.active.as_ref().expect("an active segment after roll");
            let mut buf = Vec::new();
            let mut taken = 0;
            for entry in rest {
                if taken > 0 && active.len + buf.len() as u64 >= self.options.segment_bytes {
                    break;
                }
                let body = encode_entry(entry);
                let offset = active.len + buf.len() as u64;
                segment::push_record(&mut buf, segment::KIND_ENTRY, &body);
                locs.push(Loc {
                    log_id: entry.log_id,
                    segment: active.first,
                    at: RecordAt {
                        offset,
                        body: offset + segment::RECORD_OVERHEAD,
                        body_len: body.len() as u32,
                    },
                });
                taken += 1;
            }
            self.write_synced(w, &buf, locs.last().map(|l| l.log_id.index + 1))?;
            rest = &rest[taken..];
            if let Some(next) = rest.first() {
                self.roll(w, next.log_id.index)?;
            }
        }
        Ok(locs)
    }

    /// Writes `buf` at the end of the active segment and fdatasyncs it.
    fn write_synced(&self, w: &mut Writer, buf: &[u8], next: Option<u64>) -> Result<(), Fatal> {
        let active = w.active.as_mut().expect("an active segment");
        let mut warned = false;
        loop {
            match active.file.write_all_at(buf, active.len) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::StorageFull => {
                    // Nothing of it counts: cut back what did get written and wait for room.
                    active
                        .file
                        .set_len(active.len)
                        .map_err(fatal("truncate", &active.path))?;
                    if !warned {
                        tracing::error!(path = %active.path.display(), "disk full: the log waits for space");
                        warned = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(fatal("write", &active.path)(e)),
            }
        }
        fsio::sync_data(&active.file, &active.path)?;
        active.len += buf.len() as u64;
        active.next = next.unwrap_or(active.next);
        Ok(())
    }

    /// Starts a new segment whose first entry will be `first`: created, header written,
    /// synced, its name made durable.
    fn roll(&self, w: &mut Writer, first: u64) -> Result<(), Fatal> {
        let path = self.dir.join(segment::file_name(first));
        if path.exists() {
            // Left by a truncation that emptied it: start it again.
            fsio::remove_durable(&path)?;
        }
        let file = fsio::create_new_durable(&path)?;
        file.write_all_at(&segment::header(first), 0)
            .map_err(fatal("write", &path))?;
        fsio::sync_data(&file, &path)?;
        let read = File::open(&path).map_err(fatal("open", &path))?;
        lock(&self.index).segments.insert(
            first,
            Segment {
                file: Arc::new(SegmentFile {
                    path: path.clone(),
                    file: read,
                }),
                last: None,
            },
        );
        w.active = Some(Active {
            first,
            path,
            file,
            len: segment::HEADER_LEN,
            next: first,
        });
        Ok(())
    }

    /// Removes entries from `from` on: whole segments after it, the tail of its own.
    fn truncate(&self, w: &mut Writer, from: u64) -> Result<(), Fatal> {
        let (cut, doomed): (Option<Loc>, Vec<Arc<SegmentFile>>) = {
            let mut index = lock(&self.index);
            let cut = index.position(from).map(|p| index.entries[p]);
            if let Some(p) = index.position(from) {
                index.entries.truncate(p);
            }
            index.cache_truncate(from);
            let keep_up_to = cut.map_or(u64::MAX, |c| c.segment);
            let later: Vec<u64> = index
                .segments
                .range((Bound::Excluded(keep_up_to), Bound::Unbounded))
                .map(|(f, _)| *f)
                .collect();
            let doomed = later
                .iter()
                .filter_map(|f| index.segments.remove(f).map(|s| s.file))
                .collect();
            if let Some(c) = cut {
                if let Some(seg) = index.segments.get_mut(&c.segment) {
                    seg.last = from
                        .checked_sub(1)
                        .filter(|_| c.at.offset > segment::HEADER_LEN);
                }
            }
            (cut, doomed)
        };
        let Some(cut) = cut else {
            return Ok(());
        };
        for seg in doomed {
            fsio::remove_durable(&seg.path)?;
        }
        if cut.at.offset == segment::HEADER_LEN {
            // The segment held nothing before `from`: remove it too.
            let path = self.dir.join(segment::file_name(cut.segment));
            lock(&self.index).segments.remove(&cut.segment);
            fsio::remove_durable(&path)?;
            w.active = None;
            // The segment before it (if any) becomes the active one again.
            let before = lock(&self.index)
                .segments
                .range(..cut.segment)
                .next_back()
                .map(|(f, s)| (*f, s.file.path.clone()));
            if let Some((first, path)) = before {
                // Its last entry need not be `from - 1` (a snapshot may sit between them):
                // anything else than its own next index starts a new segment.
                let next = lock(&self.index)
                    .entries
                    .back()
                    .filter(|l| l.segment == first)
                    .map_or(u64::MAX, |l| l.log_id.index + 1);
                w.active = Some(Active::open(first, path, next)?);
            }
            return Ok(());
        }
        let path = self.dir.join(segment::file_name(cut.segment));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(fatal("open", &path))?;
        file.set_len(cut.at.offset)
            .map_err(fatal("truncate", &path))?;
        fsio::sync_data(&file, &path)?;
        w.active = Some(Active {
            first: cut.segment,
            path,
            file,
            len: cut.at.offset,
            next: from,
        });
        Ok(())
    }

    /// Records the purge point durably, then deletes the segments it fully covers that hold
    /// no payload still needed (never the active one).
    fn purge(&self, w: &mut Writer, upto: LogId) -> Result<(), Fatal> {
        w.state.save_purged(upto)?;
        {
            let mut index = lock(&self.index);
            index.purged = Some(upto);
            index.retire(upto.index);
            while index
                .cache
                .front()
                .is_some_and(|e| e.log_id.index <= upto.index)
            {
                if let Some(e) = index.cache.pop_front() {
                    index.cache_bytes -= entry_bytes(&e);
                }
            }
        }
        self.collect_garbage(w)
    }
}

fn storage_err(e: Fatal) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i + 1,
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        let end = end.min(
            lock(&self.inner.index)
                .last_log_id()
                .map_or(0, |l| l.index + 1),
        );
        if start >= end {
            return Ok(Vec::new());
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.read_entries(start, end))
            .await
            .map_err(io_err)
            .and_then(|r| r)
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let index = lock(&self.inner.index);
        Ok(LogState {
            last_purged_log_id: index.purged,
            last_log_id: index.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = *vote;
        self.write(move |_, w| w.state.save_vote(vote))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.vote())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId>,
    ) -> Result<(), StorageError<NodeId>> {
        // Never ahead of the durable log (openraft refuses to start from such a state).
        let committed = committed.min(self.last_log_id());
        self.write(move |_, w| w.state.note_committed(committed))
            .await
            .map_err(storage_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError<NodeId>> {
        let hint = lock(&self.inner.writer).state.state().committed;
        let floor = *lock(&self.inner.committed_floor);
        Ok(hint.max(floor).min(self.last_log_id()))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let result = self
            .write(move |inner, w| {
                let locs = inner.append(w, &entries)?;
                let mut index = lock(&inner.index);
                for loc in &locs {
                    index.note_written(loc);
                }
                index.entries.extend(locs);
                let limit = inner.options.cache_bytes;
                for entry in entries {
                    index.cache_push(entry, limit);
                }
                Ok(())
            })
            .await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io_err(&e)));
                Err(storage_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        self.write(move |inner, w| inner.truncate(w, log_id.index))
            .await
            .map_err(storage_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        self.write(move |inner, w| inner.purge(w, log_id))
            .await
            .map_err(storage_err)
    }
}

#[cfg(test)]
mod tests;
