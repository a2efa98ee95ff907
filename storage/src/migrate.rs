//! Converting a data dir of hashq 0.1 (format 1: the Raft log and the state machine in one
//! sled database, `sled/`) to the current format, offline (`hashq migrate`).
//!
//! The state machine is converted at its last applied entry and written as a snapshot
//! there; the new log starts right after it (empty), and the node rebuilds its state machine
//! from that snapshot when it starts. What changes in the conversion:
//! - items that were running go back to the queue (their attempt count is kept): workers of
//!   hashq 0.1 do not speak the new worker protocol, so every worker record is dropped, its
//!   budget slot freed, and the workers are launched again;
//! - dead items start their retention at the migration.
//!
//! Entries after the last applied one are not converted: every node of a cluster must be
//! migrated at a point where one of them has applied everything committed. The procedure
//! (README): let the cluster go idle so every node applies everything (`commit_index` equal
//! on all of them), stop every node with SIGTERM, run `hashq migrate` on each data dir,
//! start them all. The node with the most applied entries leads, and the others install
//! its snapshot. `migrate` refuses a data dir whose log holds entries it has not applied,
//! unless told `--discard-unapplied` (safe when another node has applied them).
//!
//! The old `sled/` and `snapshots/` are kept in `legacy-v1/` (delete them once the cluster
//! runs); a migration that stopped half-way is resumed by running it again.
//!
//! Format 2 (the segment log with payloads still in the state machine) is converted the same
//! way, with less to change: its state machine, at its last applied entry (which must be the
//! log's last entry, the same idle-cluster procedure), becomes a snapshot whose payloads move
//! to a pack; leases, workers and everything else are kept as they are (the worker protocol
//! did not change). The old `sm/`, `raft/` and `snapshots/` are kept in `legacy-v2/`.

use std::path::{Path, PathBuf};

use hashq_raft::machine::{Clock, Meta};
use hashq_raft::types::{Counts, Digest, Item, Lease, Millis, PayloadRef, Status, WorkId};
use hashq_raft::{codec, keys, LogId, NodeId, SnapshotMeta, StoredMembership};
use openraft::Vote;
use serde::Deserialize;

use crate::format::{self, Layout};
use crate::fsio;
use crate::snapshot;
use crate::StoreError;

/// The state-machine records of format 1, as hashq 0.1 encoded them.
mod v1 {
    use super::*;

    #[derive(Deserialize, serde::Serialize)]
    pub struct Counts {
        pub queued: u64,
        pub running: u64,
        pub completed: u64,
        pub pulled: u64,
        pub dead: u64,
        pub queued_iterations: u64,
        pub payload_bytes: u64,
        pub enqueued_total: u64,
        pub completed_total: u64,
        pub pulled_total: u64,
        pub expired_total: u64,
        pub completed_iterations_total: u64,
    }

    #[derive(Deserialize, serde::Serialize)]
    pub struct Meta {
        pub now: Millis,
        pub next_id: u64,
        pub next_completion: u64,
        pub next_worker: u64,
        pub max_workers: Option<u32>,
        pub counts: Counts,
    }

    #[derive(Deserialize, serde::Serialize)]
    pub struct Item {
        pub iterations: u32,
        pub attempts: u32,
        pub status: Status,
        pub enqueued_at: Millis,
        pub queued_at: Millis,
        pub payload_len: u32,
        pub lease: Option<Lease>,
        pub completed_at: Option<Millis>,
        pub value: Option<Digest>,
        pub pulled_at: Option<Millis>,
        pub dead_reason: Option<String>,
    }
}

/// The item record of format 2: the current one without its payload reference. (Frozen
/// record layouts: postcard has no optional trailing fields, so each format that changed a
/// record keeps its own definition here.)
mod v2 {
    use super::*;

    /// Format 1's item with `dead_at` after it. postcard writes a nested struct's fields in
    /// place, with nothing around them, so this is the flat record format 2 wrote.
    #[derive(Deserialize, serde::Serialize)]
    pub struct Item {
        pub v1: v1::Item,
        pub dead_at: Option<Millis>,
    }

    impl Item {
        pub fn with_payload(self, payload: PayloadRef) -> super::Item {
            super::Item {
                iterations: self.v1.iterations,
                attempts: self.v1.attempts,
                status: self.v1.status,
                enqueued_at: self.v1.enqueued_at,
                queued_at: self.v1.queued_at,
                payload_len: self.v1.payload_len,
                payload,
                lease: self.v1.lease,
                completed_at: self.v1.completed_at,
                value: self.v1.value,
                pulled_at: self.v1.pulled_at,
                dead_reason: self.v1.dead_reason,
                dead_at: self.dead_at,
            }
        }
    }
}

/// What a migration did.
#[derive(Clone, Debug)]
pub struct Migrated {
    /// The snapshot the new state machine starts from (the last applied entry).
    pub at: Option<LogId>,
    pub items: u64,
    /// Running items put back in the queue.
    pub requeued: u64,
    /// Worker records dropped.
    pub workers_dropped: u64,
    /// Log entries after the last applied one that were not converted.
    pub discarded_entries: u64,
    /// Where the old files are kept.
    pub kept_in: PathBuf,
}

fn bad(path: &Path, what: impl Into<String>) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what.into()),
    }
}

fn get<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    key: &[u8],
    path: &Path,
) -> Result<Option<T>, StoreError> {
    match tree.get(key)? {
        None => Ok(None),
        Some(bytes) => codec::decode("legacy record", &bytes)
            .map(Some)
            .map_err(|e| bad(path, e.to_string())),
    }
}

/// Converts the data dir `dir` (format 1 or 2) in place (see the module doc).
pub fn migrate(dir: &Path, discard_unapplied: bool) -> Result<Migrated, StoreError> {
    let layout = Layout::new(dir);
    match format::detect(&layout)? {
        format::Found::Legacy => migrate_v1(dir, &layout, discard_unapplied),
        format::Found::Format2 => migrate_v2(dir, &layout, discard_unapplied),
        format::Found::Current | format::Found::Upgradable(_) => Err(bad(
            dir,
            "this data dir needs no migration (the node upgrades formats 3 and 4 itself)",
        )),
        format::Found::Empty => Err(bad(dir, "nothing of hashq's is in this dir")),
    }
}

/// Payloads taken out of a state machine into a pack (as if they had come with a snapshot),
/// each referenced as entry 0 of term 0 (no log entry has that term) with the item's id as
/// the ordinal. Written beside the data dir's files first, then moved into `packs/`.
struct PackWriter {
    tmp: PathBuf,
    section: crate::pack::SectionWriter<std::io::BufWriter<std::fs::File>>,
    /// The payload floor of the converted state: 0 once any payload is in the pack.
    floor: Option<u64>,
}

impl PackWriter {
    fn create(dir: &Path) -> Result<PackWriter, StoreError> {
        let tmp = dir.join("migrated-payloads.part");
        let file = std::fs::File::create(&tmp).map_err(fsio::fatal("create", &tmp))?;
        let section = crate::pack::SectionWriter::new(std::io::BufWriter::new(file))
            .map_err(fsio::fatal("write", &tmp))?;
        Ok(PackWriter {
            tmp,
            section,
            floor: None,
        })
    }

    /// Where item `id`'s payload is after the migration.
    fn at(id: WorkId) -> Option<PayloadRef> {
        u32::try_from(id.0).ok().map(|ordinal| PayloadRef {
            term: 0,
            index: 0,
            ordinal,
        })
    }

    /// Adds item `id`'s payload; returns the state machine's record of it.
    fn push(&mut self, id: WorkId, payload: &[u8]) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
        let at = Self::at(id)
            .ok_or_else(|| std::io::Error::other("a payload of a work id beyond 2^32"))?;
        self.section.push(&at, payload)?;
        self.floor = Some(0);
        let mut record = at.term.to_be_bytes().to_vec();
        record.extend_from_slice(&id.0.to_be_bytes());
        Ok((keys::payload(&at), record))
    }

    /// Writes the section's end and syncs it; on failure the file is removed.
    fn finish(self) -> std::io::Result<(PathBuf, Option<u64>)> {
        let tmp = self.tmp;
        let written = self.section.finish().and_then(|w| {
            w.into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_data())
        });
        match written {
            Ok(()) => Ok((tmp, self.floor)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

/// The converted state, written as the current format: the pack and a snapshot at `at`, an
/// empty log after it keeping `vote`, and FORMAT last (a migration that stops before it is
/// run again). The old files must be out of the way already.
fn write_current(
    layout: &Layout,
    at: Option<LogId>,
    membership: StoredMembership,
    vote: Option<Vote<NodeId>>,
    pack: (PathBuf, Option<u64>),
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
) -> Result<(), StoreError> {
    for d in layout.state_dirs() {
        if d.exists() {
            std::fs::remove_dir_all(&d).map_err(fsio::fatal("remove", &d))?;
        }
    }
    format::ensure_dirs(layout)?;
    let snap_meta = SnapshotMeta {
        last_log_id: at,
        last_membership: membership,
        snapshot_id: snapshot::new_id(at.as_ref()),
    };
    let (pack_tmp, payload_floor) = pack;
    crate::pack::finish_pack(&pack_tmp, 0)?;
    fsio::rename_durable(
        &pack_tmp,
        &layout
            .pack_dir()
            .join(format!("{}.pack", snap_meta.snapshot_id)),
    )?;
    snapshot::write(
        &layout.snapshot_dir(),
        &snap_meta,
        payload_floor,
        pairs.into_iter().map(Ok),
    )?;
    let (mut log, _) = crate::LogStore::open(
        &layout.log_dir(),
        &layout.vote_file(),
        crate::LogOptions::default(),
    )?;
    if let Some(vote) = vote {
        log.keep_vote(vote)?;
    }
    if let Some(at) = at {
        log.purge_to(at)?;
    }
    drop(log);
    format::mark_current(layout)?;
    Ok(())
}

/// Format 1 (hashq 0.1): one sled database with the log and the state machine.
fn migrate_v1(
    dir: &Path,
    layout: &Layout,
    discard_unapplied: bool,
) -> Result<Migrated, StoreError> {
    let kept_in = dir.join("legacy-v1");
    let legacy_sled = kept_in.join("sled");
    // Read the old database where it is, so a refusal leaves everything as it was.
    let source = if layout.legacy_sled().exists() {
        layout.legacy_sled()
    } else {
        legacy_sled.clone()
    };
    let db = sled::Config::new()
        .path(&source)
        .cache_capacity(32 << 20)
        .open()?;
    let raft = db.open_tree("raft")?;
    let vote: Option<Vote<NodeId>> = get(&raft, b"vote", &source)?;
    let sm_meta = db.open_tree("sm_meta")?;
    let name = sm_meta
        .get(b"current")?
        .map(|n| n.to_vec())
        .unwrap_or_else(|| b"sm-0".to_vec());
    let sm = db.open_tree(&name)?;
    let last_applied: Option<LogId> = get(&sm, keys::LAST_APPLIED, &source)?;
    let membership: StoredMembership = get(&sm, keys::MEMBERSHIP, &source)?.unwrap_or_default();
    let log = db.open_tree("log")?;
    let after = last_applied.map_or(0, |l| l.index + 1);
    let discarded = log.range(after.to_be_bytes()..).count() as u64;
    if discarded > 0 && !discard_unapplied {
        return Err(bad(
            dir,
            format!(
                "the log holds {discarded} entries after the last applied one ({last_applied:?}): \
                 start this node with hashq 0.1 until it has applied them (let the cluster go idle, \
                 then stop it with SIGTERM), or pass --discard-unapplied if another node of the \
                 cluster has applied them"
            ),
        ));
    }
    let old: v1::Meta = get(&sm, keys::META, &source)?.unwrap_or(v1::Meta {
        now: 0,
        next_id: 0,
        next_completion: 0,
        next_worker: 0,
        max_workers: None,
        counts: v1::Counts {
            queued: 0,
            running: 0,
            completed: 0,
            pulled: 0,
            dead: 0,
            queued_iterations: 0,
            payload_bytes: 0,
            enqueued_total: 0,
            completed_total: 0,
            pulled_total: 0,
            expired_total: 0,
            completed_iterations_total: 0,
        },
    });
    let now = old.now;
    let c = &old.counts;
    let mut meta = Meta {
        now,
        // Term 0: the first entry of the new log starts state-machine time again from
        // `max(now, the leader's wall clock)`.
        clock: Clock::default(),
        disk_alarms: Vec::new(),
        next_id: old.next_id,
        next_completion: old.next_completion,
        next_worker: old.next_worker,
        max_workers: old.max_workers,
        counts: Counts {
            queued: c.queued,
            running: c.running,
            completed: c.completed,
            pulled: c.pulled,
            dead: c.dead,
            queued_iterations: c.queued_iterations,
            payload_bytes: c.payload_bytes,
            enqueued_total: c.enqueued_total,
            completed_total: c.completed_total,
            pulled_total: c.pulled_total,
            expired_total: c.expired_total,
            completed_iterations_total: c.completed_iterations_total,
            dropped_total: 0,
        },
    };

    let mut pack = PackWriter::create(dir)?;

    // Convert every pair; what cannot be decided pair by pair (queue keys of requeued items,
    // the meta record) comes at the end.
    let (mut items, mut requeued, mut workers_dropped) = (0u64, 0u64, 0u64);
    let mut extra: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut failure: Option<StoreError> = None;
    let pairs = sm.iter().filter_map(|pair| {
        let (k, v) = match pair {
            Ok(p) => p,
            Err(e) => return Some(Err(std::io::Error::other(e))),
        };
        let (k, v) = (k.to_vec(), v.to_vec());
        match k.first().copied() {
            Some(keys::ITEM) => {
                let Some(id) = keys::u64_at(&k, 1).map(WorkId) else {
                    failure = Some(bad(&source, "a short item key"));
                    return None;
                };
                let item: v1::Item = match codec::decode("legacy item", &v) {
                    Ok(i) => i,
                    Err(e) => {
                        failure = Some(bad(&source, e.to_string()));
                        return None;
                    }
                };
                items += 1;
                let Some(payload) = PackWriter::at(id) else {
                    failure = Some(bad(&source, "a work id beyond 2^32"));
                    return None;
                };
                let mut new = Item {
                    iterations: item.iterations,
                    attempts: item.attempts,
                    status: item.status,
                    enqueued_at: item.enqueued_at,
                    queued_at: item.queued_at,
                    payload_len: item.payload_len,
                    payload,
                    lease: item.lease,
                    completed_at: item.completed_at,
                    value: item.value,
                    pulled_at: item.pulled_at,
                    dead_reason: item.dead_reason,
                    dead_at: None,
                };
                match new.status {
                    Status::Running => {
                        new.status = Status::Queued;
                        new.lease = None;
                        new.queued_at = now;
                        extra.push((keys::queue(id), Vec::new()));
                        meta.counts.running -= 1;
                        meta.counts.queued += 1;
                        meta.counts.queued_iterations += u64::from(new.iterations);
                        requeued += 1;
                    }
                    Status::Dead => new.dead_at = Some(now),
                    _ => {}
                }
                Some(Ok((k, codec::encode(&new))))
            }
            Some(keys::DEAD) => {
                let Some(id) = keys::u64_at(&k, 1).map(WorkId) else {
                    failure = Some(bad(&source, "a short dead-item key"));
                    return None;
                };
                Some(Ok((keys::dead(now, id), v)))
            }
            Some(keys::PAYLOAD) => {
                let Some(id) = keys::u64_at(&k, 1).map(WorkId) else {
                    failure = Some(bad(&source, "a payload key that names no work id"));
                    return None;
                };
                Some(pack.push(id, &v))
            }
            // Leases and their owners go with the workers.
            Some(keys::LEASE) | Some(keys::OWNER) => None,
            Some(keys::WORKER) => {
                workers_dropped += 1;
                None
            }
            Some(_) if k == keys::META => None,
            _ => Some(Ok((k, v))),
        }
    });
    // Collected before anything is written: a broken record refuses the whole migration.
    let converted = pairs.collect::<Result<Vec<(Vec<u8>, Vec<u8>)>, std::io::Error>>();
    let written = pack.finish();
    let (converted, pack) = match (converted, written, failure) {
        (Ok(c), Ok(pack), None) => (c, pack),
        (converted, written, failure) => {
            if let Ok((tmp, _)) = &written {
                let _ = std::fs::remove_file(tmp);
            }
            if let Some(e) = failure {
                return Err(e);
            }
            let e = converted.err().or(written.err()).expect("one failed");
            return Err(bad(&source, e.to_string()));
        }
    };

    // Move the old files aside, then write the new layout, FORMAT last: a migration that
    // stops before it is resumed by running it again.
    drop((raft, sm_meta, sm, log));
    drop(db);
    fsio::create_dir_durable(&kept_in)?;
    if layout.legacy_sled().exists() {
        fsio::rename_durable(&layout.legacy_sled(), &legacy_sled)?;
    }
    let old_snapshots = kept_in.join("snapshots");
    if layout.snapshot_dir().exists() && !old_snapshots.exists() {
        fsio::rename_durable(&layout.snapshot_dir(), &old_snapshots)?;
    }
    let pairs = converted
        .into_iter()
        .chain(extra)
        .chain(std::iter::once((keys::META.to_vec(), codec::encode(&meta))))
        .collect();
    write_current(layout, last_applied, membership, vote, pack, pairs)?;
    Ok(Migrated {
        at: last_applied,
        items,
        requeued,
        workers_dropped,
        discarded_entries: discarded,
        kept_in,
    })
}

/// Format 2 (the segment log, payloads in the state machine by work id): the state machine in
/// sled at its last applied entry, which must be the log's last entry.
fn migrate_v2(
    dir: &Path,
    layout: &Layout,
    discard_unapplied: bool,
) -> Result<Migrated, StoreError> {
    let kept_in = dir.join("legacy-v2");
    // Read where the files are: in place, or already moved aside by a migration that stopped.
    let old = if kept_in.join("sm").exists() {
        Layout::new(&kept_in)
    } else {
        layout.clone()
    };
    if old.repair_file().exists() {
        return Err(bad(
            dir,
            "this node was being repaired from its peers: start it with the build that wrote it \
             until /status no longer shows `repairing`, or move the data dir away and let it \
             catch up from its peers",
        ));
    }
    let (log, opened) = crate::LogStore::open(
        &old.log_dir(),
        &old.vote_file(),
        crate::LogOptions::default(),
    )?;
    if let Some(d) = opened.damage {
        return Err(bad(
            &d.path,
            format!("the Raft log is damaged: {}", d.reason),
        ));
    }
    let vote = log.vote();
    let last_log = log.last_log_id();
    drop(log);
    // With the configuration format 2 used (sled refuses another segment size).
    let db = crate::sm::open_sled(&old.sm_dir(), 32 << 20)?;
    let sm_meta = db.open_tree("sm_meta")?;
    let name = sm_meta
        .get(b"current")?
        .map(|n| n.to_vec())
        .unwrap_or_else(|| b"sm-0".to_vec());
    let sm = db.open_tree(&name)?;
    let source = old.sm_dir();
    let last_applied: Option<LogId> = get(&sm, keys::LAST_APPLIED, &source)?;
    let membership: StoredMembership = get(&sm, keys::MEMBERSHIP, &source)?.unwrap_or_default();
    let discarded = last_log
        .map_or(0, |l| l.index)
        .saturating_sub(last_applied.map_or(0, |l| l.index));
    if discarded > 0 && !discard_unapplied {
        return Err(bad(
            dir,
            format!(
                "the state machine is at {last_applied:?} and the log goes on to {last_log:?}: \
                 start this node with the build that wrote it until it has applied everything \
                 (let the cluster go idle, then stop it with SIGTERM), or pass \
                 --discard-unapplied if another node of the cluster has applied them"
            ),
        ));
    }
    let mut pack = PackWriter::create(dir)?;
    let mut items = 0u64;
    let pairs = sm
        .iter()
        .map(|pair| {
            let (k, v) = pair.map_err(std::io::Error::other)?;
            let (k, v) = (k.to_vec(), v.to_vec());
            match k.first().copied() {
                Some(keys::ITEM) => {
                    let id = keys::u64_at(&k, 1)
                        .map(WorkId)
                        .ok_or_else(|| std::io::Error::other("a short item key"))?;
                    let item: v2::Item = codec::decode("format-2 item", &v)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    let payload = PackWriter::at(id)
                        .ok_or_else(|| std::io::Error::other("a work id beyond 2^32"))?;
                    items += 1;
                    Ok((k, codec::encode(&item.with_payload(payload))))
                }
                Some(keys::PAYLOAD) => {
                    let id = keys::u64_at(&k, 1)
                        .filter(|_| k.len() == 9)
                        .map(WorkId)
                        .ok_or_else(|| {
                            std::io::Error::other("a payload key that names no work id")
                        })?;
                    pack.push(id, &v)
                }
                // Everything else (queue, leases, workers, results, keys, meta) is the same
                // in both formats.
                _ => Ok((k, v)),
            }
        })
        .collect::<std::io::Result<Vec<_>>>();
    let written = pack.finish();
    let (pairs, pack) = match (pairs, written) {
        (Ok(p), Ok(pack)) => (p, pack),
        (pairs, written) => {
            if let Ok((tmp, _)) = &written {
                let _ = std::fs::remove_file(tmp);
            }
            let e = pairs.err().or(written.err()).expect("one failed");
            return Err(bad(&source, e.to_string()));
        }
    };
    drop((sm_meta, sm));
    drop(db);
    // Move the old files aside (once), then write the new layout.
    if old.root != kept_in {
        fsio::create_dir_durable(&kept_in)?;
        for (from, to) in [
            (layout.sm_dir(), kept_in.join("sm")),
            (layout.raft(), kept_in.join("raft")),
            (layout.snapshot_dir(), kept_in.join("snapshots")),
        ] {
            if from.exists() {
                fsio::rename_durable(&from, &to)?;
            }
        }
    }
    write_current(layout, last_applied, membership, vote, pack, pairs)?;
    Ok(Migrated {
        at: last_applied,
        items,
        requeued: 0,
        workers_dropped: 0,
        discarded_entries: discarded,
        kept_in,
    })
}

#[cfg(test)]
mod tests;
