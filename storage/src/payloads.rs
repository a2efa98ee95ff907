//! Where payloads are read from, and how long they are kept.
//!
//! A payload is written once per node, in the Raft log entry that carried its enqueue; the
//! state machine holds a [`PayloadRef`] to it. A node that installed a snapshot from its
//! leader holds the payloads that came with it in a pack ([`crate::pack`]). Reads try the log
//! first, then the packs.
//!
//! Retention: the log keeps every segment from the oldest entry whose payloads are still
//! referenced, by the state machine or by the current snapshot (a follower may still need
//! that snapshot with its payloads), whichever is older; a pack goes when nothing references
//! its newest entry any more.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hashq_raft::types::PayloadRef;
use hashq_raft::{machine, Entry, PayloadSection};

use crate::format::Layout;
use crate::fsio::{self, Fatal};
use crate::log::{LogStore, PinnedLog};
use crate::pack::{Pack, RefDigest, SectionWriter};
use crate::snapshot;

/// "Nothing referenced" as a floor.
const NONE: u64 = u64::MAX;

pub(crate) struct Payloads {
    log: LogStore,
    dir: PathBuf,
    packs: Mutex<Vec<Arc<Pack>>>,
    /// The oldest log index the state machine references ([`NONE`]: none); 0 until known.
    sm_floor: AtomicU64,
    /// The same for the current snapshot.
    snapshot_floor: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads payloads for the node's routes. Cheap to clone.
#[derive(Clone)]
pub struct PayloadReader(pub(crate) Arc<Payloads>);

impl PayloadReader {
    /// The payloads at `refs`, in order: `None` for one this node does not hold.
    pub fn read(&self, refs: &[PayloadRef]) -> io::Result<Vec<Option<Bytes>>> {
        self.0.read(refs)
    }

    /// Packs held, and their bytes on disk.
    pub fn packs(&self) -> (usize, u64) {
        let packs = lock(&self.0.packs);
        let bytes = packs
            .iter()
            .map(|p| std::fs::metadata(&p.path).map_or(0, |m| m.len()))
            .sum();
        (packs.len(), bytes)
    }
}

impl Payloads {
    /// Opens the packs of a data dir; a pack that fails its checks is an error (its payloads
    /// are gone: the caller treats it as damage to repair from the peers).
    pub(crate) fn open(layout: &Layout, log: LogStore) -> Result<Payloads, Result<Fatal, String>> {
        let dir = layout.pack_dir();
        let mut packs = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| Ok(fsio::fatal("list", &dir)(e)))?;
        for entry in entries.flatten() {
            let path = entry.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("pack") => match Pack::open(&path) {
                    Ok(pack) => packs.push(Arc::new(pack)),
                    Err(e) => return Err(Err(format!("pack {}: {e}", path.display()))),
                },
                Some("part") => {
                    std::fs::remove_file(&path).map_err(|e| Ok(fsio::fatal("unlink", &path)(e)))?
                }
                _ => {}
            }
        }
        Ok(Payloads {
            log,
            dir,
            packs: Mutex::new(packs),
            sm_floor: AtomicU64::new(0),
            snapshot_floor: AtomicU64::new(0),
        })
    }

    pub(crate) fn read(&self, refs: &[PayloadRef]) -> io::Result<Vec<Option<Bytes>>> {
        let mut out = self.log.read_payloads(refs)?;
        let missing: Vec<usize> = (0..refs.len()).filter(|i| out[*i].is_none()).collect();
        if missing.is_empty() {
            return Ok(out);
        }
        let packs = lock(&self.packs).clone();
        for i in missing {
            for pack in &packs {
                if let Some(p) = pack.get(&refs[i])? {
                    out[i] = Some(p);
                    break;
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn set_sm_floor(&self, floor: Option<u64>) {
        self.sm_floor
            .store(floor.unwrap_or(NONE), Ordering::Relaxed);
        self.release();
    }

    pub(crate) fn set_snapshot_floor(&self, floor: Option<u64>) {
        self.snapshot_floor
            .store(floor.unwrap_or(NONE), Ordering::Relaxed);
        self.release();
    }

    /// Lets the log and the packs drop what nothing references any more.
    fn release(&self) {
        let bound = self
            .sm_floor
            .load(Ordering::Relaxed)
            .min(self.snapshot_floor.load(Ordering::Relaxed));
        self.log.set_payload_floor(bound);
        let doomed: Vec<Arc<Pack>> = {
            let mut packs = lock(&self.packs);
            let (doomed, kept) = packs.drain(..).partition(|p| p.max_index < bound);
            *packs = kept;
            doomed
        };
        if doomed.is_empty() {
            return;
        }
        let remove = move || {
            for pack in doomed {
                if let Err(e) = fsio::remove_durable(&pack.path) {
                    tracing::warn!(error = %e, "cannot delete a pack no longer needed");
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }

    /// Makes the received file at `path` (a snapshot whose payload section starts at `offset`
    /// and must hold the payloads `expected` names) a pack of this node, durably; returns
    /// where it went.
    pub(crate) fn add_pack(
        &self,
        path: &Path,
        offset: u64,
        id: &str,
        expected: &RefDigest,
    ) -> io::Result<PathBuf> {
        let found = crate::pack::finish_pack(path, offset).map_err(io::Error::other)?;
        if found != *expected {
            return Err(fsio::invalid(format!(
                "the payload section holds {} payloads, not the {} the snapshot references",
                found.count, expected.count
            )));
        }
        let to = self.dir.join(format!("{id}.pack"));
        fsio::rename_durable(path, &to).map_err(io::Error::other)?;
        let pack = Pack::open(&to)?;
        lock(&self.packs).push(Arc::new(pack));
        Ok(to)
    }

    /// What writes the payload section of the snapshot at `snap` (which references payloads
    /// from `floor` to `last`): the log's segments and the packs it needs are held open now,
    /// so they stay readable whatever is deleted meanwhile.
    pub(crate) fn section(
        &self,
        snap: &Path,
        floor: Option<u64>,
        last: u64,
    ) -> io::Result<Arc<Section>> {
        let file = std::fs::File::open(snap)?;
        let log = match floor {
            Some(floor) => self.log.pin(floor, last),
            None => self.log.pin(1, 0),
        };
        let packs = lock(&self.packs).clone();
        let size = log.bytes() + packs.iter().map(|p| p.bytes()).sum::<u64>();
        Ok(Arc::new(Section {
            snap: file,
            log,
            packs,
            size,
        }))
    }
}

/// The payload section of one snapshot, ready to be written.
pub(crate) struct Section {
    /// The snapshot file, held open: a newer snapshot may replace it meanwhile.
    snap: std::fs::File,
    log: PinnedLog,
    packs: Vec<Arc<Pack>>,
    size: u64,
}

impl Section {
    fn find(&self, at: &PayloadRef, last: &mut Option<Entry>) -> io::Result<Bytes> {
        if last.as_ref().is_none_or(|e| e.log_id.index != at.index) {
            *last = self.log.entry(at.index, at.term)?;
        }
        if let Some(entry) = last.as_ref().filter(|e| e.log_id.leader_id.term == at.term) {
            if let openraft::EntryPayload::Normal(c) = &entry.payload {
                if let Some(payload) = c.payload(at.ordinal) {
                    return Ok(payload.clone());
                }
            }
        }
        for pack in &self.packs {
            if let Some(p) = pack.get(at)? {
                return Ok(p);
            }
        }
        Err(io::Error::other(format!(
            "the payload at {}:{} (term {}) that the snapshot references is neither in the log nor in a pack",
            at.index, at.ordinal, at.term
        )))
    }
}

impl PayloadSection for Section {
    fn write_to(&self, out: &mut dyn io::Write) -> io::Result<()> {
        let mut w = SectionWriter::new(out)?;
        let mut last = None;
        let file = fsio::ReadAt {
            file: &self.snap,
            pos: 0,
        };
        let mut order = machine::LogOrder::default();
        let mut send = |at: PayloadRef| {
            let payload = self.find(&at, &mut last)?;
            w.push(&at, &payload)
        };
        snapshot::read_from(file, |key, value| {
            match machine::live_payload_of(&key, &value)
                .map_err(|e| fsio::invalid(e.to_string()))?
            {
                Some(at) => order.push(at, &mut send),
                None => Ok(()),
            }
        })?;
        order.flush(&mut send)?;
        w.finish().map(|_| ())
    }

    fn size_hint(&self) -> u64 {
        self.size
    }
}
