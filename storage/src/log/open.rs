//! Opening the log: every record of every segment read and checked, a torn tail cut off,
//! corruption reported (the log is opened as far as it could be read).

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::index::{Index, Loc, Segment, SegmentFile};
use super::segment::{self, Damage};
use super::state::{StateError, StateFile};
use super::write::{Active, IoMode, Writer};
use super::{decode_log_id, io_err, Inner, LogDamage, LogOpened, LogOptions, LogStore};
use crate::fsio::{self, fatal, Fatal};

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
                active = Some(Active::open(first, path, next, scanned.end)?);
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
                    mode: IoMode::Direct,
                }),
                index: Mutex::new(index),
            }),
        };
        Ok((store, opened))
    }
}
