//! Reading the log: ranges of entries for openraft (from memory when they are recent), the
//! payloads the state machine refers to, and a snapshot's entries pinned open.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use hashq_raft::types::PayloadRef;
use hashq_raft::Entry;

use super::index::{Loc, SegmentFile};
use super::segment;
use super::{decode_entry, io_err, lock, LogStore};

/// A range of entries as the cache has them: each entry, or where to read it from disk.
pub(super) struct Planned {
    out: Vec<Option<Entry>>,
    misses: Vec<(usize, Loc, Arc<SegmentFile>)>,
}

impl Planned {
    /// The entries, if the cache had them all (nothing to read from disk).
    pub(super) fn cached(self) -> Result<Vec<Entry>, Planned> {
        if self.misses.is_empty() {
            Ok(self.out.into_iter().flatten().collect())
        } else {
            Err(self)
        }
    }

    /// Reads the entries the cache did not have (blocking file reads).
    pub(super) fn read(mut self) -> Result<Vec<Entry>, io::Error> {
        for (slot, loc, file) in std::mem::take(&mut self.misses) {
            self.out[slot] = Some(read_entry(&file, &loc)?);
        }
        Ok(self.out.into_iter().map_while(|e| e).collect())
    }
}

impl LogStore {
    /// The entries `start..end` this log holds (up to the first it does not), from the cache
    /// where it has them; the rest are left for [`Planned::read`]. No I/O.
    pub(super) fn plan_read(&self, start: u64, end: u64) -> Result<Planned, io::Error> {
        let mut out = Vec::new();
        let mut misses = Vec::new();
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
        Ok(Planned { out, misses })
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
                if let Some(payload) = command.payload(r.ordinal) {
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
