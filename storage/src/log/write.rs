//! Writing the log: the single writer and its active segment, appends (one write, one
//! fdatasync), rolling to a new segment, truncation, the purge point, and deleting segments
//! that are neither in the log nor holding a payload still needed. A failed write or sync
//! poisons the writer.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hashq_raft::{Entry, LogId};

use super::index::{entry_bytes, Index, Loc, Segment, SegmentFile};
use super::segment::{self, RecordAt, BLOCK};
use super::state::StateFile;
use super::{encode_entry_onto, io_err, lock, try_lock, Inner, LogStore};
use crate::fsio::{self, fatal, Fatal};

/// The writer's state: only one write runs at a time.
pub(super) struct Writer {
    pub(super) state: StateFile,
    pub(super) active: Option<Active>,
    /// Set by a failed sync: nothing is written any more.
    pub(super) poisoned: Option<String>,
    pub(super) mode: IoMode,
}

pub(super) struct Active {
    pub(super) first: u64,
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) len: u64,
    /// The index the next entry must have to go into this segment (a jump, after a
    /// snapshot install, starts a new segment so each segment stays consecutive).
    pub(super) next: u64,
    /// The segment opened for direct I/O, once the first append needs it.
    pub(super) direct: Option<Direct>,
}

impl Active {
    /// Opens an existing segment to append to it after its last record, at `len` (the file
    /// may go on with the zeros that padded its last block).
    pub(super) fn open(first: u64, path: PathBuf, next: u64, len: u64) -> Result<Active, Fatal> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(fatal("open", &path))?;
        Ok(Active::new(first, path, file, len, next))
    }

    fn new(first: u64, path: PathBuf, file: File, len: u64, next: u64) -> Active {
        Active {
            first,
            path,
            file,
            len,
            next,
            direct: None,
        }
    }

    /// Writes `buf` at the end of the segment: by direct I/O when the file system takes it,
    /// else through the page cache. `Err` leaves `len` as it was.
    fn write_end(&mut self, buf: &[u8], mode: &mut IoMode) -> io::Result<()> {
        if *mode == IoMode::Direct {
            // EINVAL: the file system refuses O_DIRECT, at the open or at a write (an
            // alignment it wants beyond a block). Nothing reached the file (a short write,
            // under a full disk, is cut back and written again whole below).
            match self.write_direct(buf) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "no direct I/O here: log appends go through the page cache");
                    *mode = IoMode::Buffered;
                    self.direct = None;
                }
                other => return other,
            }
        }
        self.file.write_all_at(buf, self.len)
    }

    /// Writes `buf` at the end of the segment by direct I/O, opening it for that first.
    fn write_direct(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.direct.is_none() {
            self.direct = Some(Direct::open(&self.path, &self.file, self.len)?);
        }
        self.direct
            .as_mut()
            .expect("opened above")
            .write_end(buf, self.len)
    }
}

/// How the writer appends to segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IoMode {
    /// `O_DIRECT`, whole blocks: the default.
    Direct,
    /// Through the page cache, where the file system refuses `O_DIRECT` (tmpfs before
    /// Linux 6.6) or the alignment it wants (see [`Active::write_end`]).
    Buffered,
}

/// The active segment opened with `O_DIRECT`. Appends go to the disk from a buffer this
/// process reuses, never through new page-cache pages: on this project's 2-core VM, copying
/// into fresh page-cache pages was 30 % of the machine at 16 KiB payloads (BENCHMARKS.md).
/// A write covers whole blocks, from the block boundary at or before the end of the last
/// record: it rewrites the bytes of that partial block (kept in `tail`) and pads the new
/// last block with zeros, which the next write overwrites. Opening reads those zeros as the
/// end of the segment ([`super::segment::scan_with`]).
pub(super) struct Direct {
    file: File,
    /// The segment's bytes from its last block boundary to the end of its last record.
    tail: Vec<u8>,
    /// The reused write buffer, with room to align its start to [`BLOCK`].
    scratch: Vec<u8>,
}

impl Direct {
    fn open(path: &std::path::Path, file: &File, len: u64) -> io::Result<Direct> {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        let start = len / BLOCK * BLOCK;
        let mut tail = vec![0; (len - start) as usize];
        file.read_exact_at(&mut tail, start)?;
        Ok(Direct {
            file: direct,
            tail,
            scratch: Vec::new(),
        })
    }

    /// Writes `buf` at `len`, the end of the last record.
    fn write_end(&mut self, buf: &[u8], len: u64) -> io::Result<()> {
        let start = len / BLOCK * BLOCK;
        let data = self.tail.len() + buf.len();
        let padded = (data as u64).div_ceil(BLOCK) * BLOCK;
        self.scratch.resize(padded as usize + BLOCK as usize, 0);
        let at = self.scratch.as_ptr().align_offset(BLOCK as usize);
        let blocks = &mut self.scratch[at..at + padded as usize];
        blocks[..self.tail.len()].copy_from_slice(&self.tail);
        blocks[self.tail.len()..data].copy_from_slice(buf);
        blocks[data..].fill(0);
        self.file.write_all_at(blocks, start)?;
        let end = len + buf.len() as u64;
        let last = (end / BLOCK * BLOCK - start) as usize;
        self.tail.clear();
        self.tail.extend_from_slice(&blocks[last..data]);
        Ok(())
    }
}

/// Roughly the bytes of the records of `entries` that go into `room` bytes of a segment
/// (at least the first entry's, as [`Inner::append`] takes at least one).
pub(super) fn records_hint(entries: &[Entry], room: u64) -> usize {
    let mut total = 0;
    for entry in entries {
        total += entry_bytes(entry) + segment::RECORD_OVERHEAD as usize;
        if total as u64 >= room {
            break;
        }
    }
    total
}

impl LogStore {
    /// Runs `f` on the writer on a blocking thread.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut Writer) -> Result<T, Fatal> + Send + 'static,
    ) -> Result<T, Fatal> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.with_writer(&mut lock(&inner.writer), f))
            .await
            .unwrap_or_else(|e| Err(fatal("log writer", &self.inner.dir)(io_err(e))))
    }

    /// Runs `f`, which neither syncs nor blocks for long, on the writer: here when the
    /// writer is free, on a blocking thread as [`LogStore::write`] does when it is busy (an
    /// append may be syncing). A trip to a blocking thread costs two context switches, more
    /// than a write to the page cache.
    pub(super) async fn write_quick<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut Writer) -> Result<T, Fatal> + Send + 'static,
    ) -> Result<T, Fatal> {
        if let Some(mut writer) = try_lock(&self.inner.writer) {
            return self.inner.with_writer(&mut writer, f);
        }
        self.write(f).await
    }

    /// Appends `entries` durably (one write, one fdatasync) and indexes them: openraft's
    /// `append`, and `hashq recover`'s membership entry.
    pub async fn append_entries(&self, entries: Vec<Entry>) -> Result<(), Fatal> {
        self.write(move |inner, w| {
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
        .await
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
}

impl Inner {
    /// Runs `f` on the locked writer unless it is poisoned; a failure poisons it.
    fn with_writer<T>(
        &self,
        writer: &mut Writer,
        f: impl FnOnce(&Inner, &mut Writer) -> Result<T, Fatal>,
    ) -> Result<T, Fatal> {
        if let Some(why) = &writer.poisoned {
            return Err(fatal("write to a poisoned log", &self.dir)(io_err(why)));
        }
        let result = f(self, writer);
        if let Err(e) = &result {
            tracing::error!(error = %e, "the Raft log cannot be written; no further writes");
            writer.poisoned = Some(e.to_string());
        }
        result
    }

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
    pub(super) fn append(&self, w: &mut Writer, entries: &[Entry]) -> Result<Vec<Loc>, Fatal> {
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
            // Records are encoded in place, in a buffer sized once for those that go into
            // this segment.
            let mut buf = Vec::with_capacity(records_hint(
                rest,
                self.options.segment_bytes.saturating_sub(active.len),
            ));
            let mut taken = 0;
            for entry in rest {
                if taken > 0 && active.len + buf.len() as u64 >= self.options.segment_bytes {
                    break;
                }
                let offset = active.len + buf.len() as u64;
                let body_len = segment::push_record_with(&mut buf, segment::KIND_ENTRY, |buf| {
                    encode_entry_onto(buf, entry)
                });
                locs.push(Loc {
                    log_id: entry.log_id,
                    segment: active.first,
                    at: RecordAt {
                        offset,
                        body: offset + segment::RECORD_OVERHEAD,
                        body_len,
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
            match active.write_end(buf, &mut w.mode) {
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
        w.active = Some(Active::new(first, path, file, segment::HEADER_LEN, first));
        Ok(())
    }

    /// Removes entries from `from` on: whole segments after it, the tail of its own.
    pub(super) fn truncate(&self, w: &mut Writer, from: u64) -> Result<(), Fatal> {
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
                let last = lock(&self.index)
                    .entries
                    .back()
                    .filter(|l| l.segment == first)
                    .copied();
                let next = last.map_or(u64::MAX, |l| l.log_id.index + 1);
                // After its last record, not at the end of the file (zeros may pad it). With
                // no entry of it left in the log (all purged), `next` is u64::MAX and the
                // next append starts a new segment, so this end is never written at.
                let end = last.map_or(segment::HEADER_LEN, |l| l.at.end());
                w.active = Some(Active::open(first, path, next, end)?);
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
        w.active = Some(Active::new(cut.segment, path, file, cut.at.offset, from));
        Ok(())
    }

    /// Records the purge point durably, then deletes the segments it fully covers that hold
    /// no payload still needed (never the active one).
    pub(super) fn purge(&self, w: &mut Writer, upto: LogId) -> Result<(), Fatal> {
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
