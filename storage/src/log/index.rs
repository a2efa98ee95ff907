//! Where the log's entries are: their records in the segments, the entries purged but kept
//! for their payloads, and the recent entries decoded in memory.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use hashq_raft::{Entry, LogId};

use super::segment::RecordAt;

/// Where an entry is.
#[derive(Clone, Copy, Debug)]
pub(super) struct Loc {
    pub(super) log_id: LogId,
    pub(super) segment: u64,
    pub(super) at: RecordAt,
}

pub(crate) struct SegmentFile {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
}

/// A segment and the last index written to it.
pub(super) struct Segment {
    pub(super) file: Arc<SegmentFile>,
    pub(super) last: Option<u64>,
}

/// What readers look up: the entries' places and the recent ones in memory.
pub(super) struct Index {
    pub(super) segments: BTreeMap<u64, Segment>,
    /// Consecutive entries, the first at `entries[0].log_id.index`.
    pub(super) entries: VecDeque<Loc>,
    /// Entries purged from the Raft log whose segments are kept for their payloads, by
    /// index (not always consecutive: a snapshot install can leave a gap).
    pub(super) retained: VecDeque<Loc>,
    pub(super) purged: Option<LogId>,
    pub(super) cache: VecDeque<Entry>,
    pub(super) cache_bytes: usize,
}

impl Index {
    pub(super) fn last_log_id(&self) -> Option<LogId> {
        self.entries.back().map(|l| l.log_id).max(self.purged)
    }

    pub(super) fn position(&self, index: u64) -> Option<usize> {
        let first = self.entries.front()?.log_id.index;
        let pos = index.checked_sub(first)? as usize;
        (pos < self.entries.len()).then_some(pos)
    }

    /// Where entry `index` is, in the log or among the retained entries.
    pub(super) fn locate(&self, index: u64) -> Option<Loc> {
        if let Some(pos) = self.position(index) {
            return Some(self.entries[pos]);
        }
        self.retained
            .binary_search_by_key(&index, |l| l.log_id.index)
            .ok()
            .map(|pos| self.retained[pos])
    }

    pub(super) fn note_written(&mut self, loc: &Loc) {
        if let Some(seg) = self.segments.get_mut(&loc.segment) {
            seg.last = Some(
                seg.last
                    .map_or(loc.log_id.index, |l| l.max(loc.log_id.index)),
            );
        }
    }

    /// Moves the entries up to `upto` from the log to the retained ones.
    pub(super) fn retire(&mut self, upto: u64) {
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

    pub(super) fn cached(&self, index: u64) -> Option<&Entry> {
        let first = self.cache.front()?.log_id.index;
        self.cache.get(index.checked_sub(first)? as usize)
    }

    pub(super) fn cache_push(&mut self, entry: Entry, limit: usize) {
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

    pub(super) fn cache_truncate(&mut self, from: u64) {
        while self.cache.back().is_some_and(|e| e.log_id.index >= from) {
            if let Some(e) = self.cache.pop_back() {
                self.cache_bytes -= entry_bytes(&e);
            }
        }
    }
}

pub(super) fn entry_bytes(entry: &Entry) -> usize {
    64 + match &entry.payload {
        openraft::EntryPayload::Normal(c) => c.size_hint(),
        _ => 256,
    }
}
