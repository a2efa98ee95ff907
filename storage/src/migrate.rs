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
        pub dead_at: Option<Millis>,
    }

    impl Item {
        pub fn with_payload(self, payload: PayloadRef) -> super::Item {
            super::Item {
                iterations: self.iterations,
                attempts: self.attempts,
                status: self.status,
                enqueued_at: self.enqueued_at,
                queued_at: self.queued_at,
                payload_len: self.payload_len,
                payload,
                lease: self.lease,
                completed_at: self.completed_at,
                value: self.value,
                pulled_at: self.pulled_at,
                dead_reason: self.dead_reason,
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
        format::Found::Current => Err(bad(dir, "this data dir is already in the current format")),
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
    for d in [
        layout.log_dir(),
        layout.sm_dir(),
        layout.snapshot_dir(),
        layout.pack_dir(),
    ] {
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
mod tests {
    use hashq_raft::kv::KvRead;
    use hashq_raft::machine;
    use hashq_raft::types::WorkerId;
    use openraft::{CommittedLeaderId, Membership};

    use super::*;

    fn item(status: Status, lease: Option<Lease>, value: Option<Digest>) -> v1::Item {
        v1::Item {
            iterations: 10,
            attempts: u32::from(lease.is_some()),
            status,
            enqueued_at: 5,
            queued_at: 5,
            payload_len: 3,
            lease,
            completed_at: value.map(|_| 7),
            value,
            pulled_at: (status == Status::Pulled).then_some(8),
            dead_reason: (status == Status::Dead).then(|| "all attempts".to_string()),
        }
    }

    /// A data dir as hashq 0.1 left it: one sled database with the log, the vote and the
    /// state machine (one item in each state).
    fn legacy_dir(extra_entry: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("sled")).unwrap();
        let raft = db.open_tree("raft").unwrap();
        raft.insert(b"vote", codec::encode(&Vote::<NodeId>::new(4, 2)))
            .unwrap();
        db.open_tree("sm_meta")
            .unwrap()
            .insert(b"current", b"sm-3".as_slice())
            .unwrap();
        let sm = db.open_tree("sm-3").unwrap();
        let applied = LogId::new(CommittedLeaderId::new(4, 2), 40);
        let membership = StoredMembership::new(
            Some(LogId::new(CommittedLeaderId::new(0, 0), 0)),
            Membership::new(vec![[1u64, 2, 3].into_iter().collect()], None),
        );
        sm.insert(keys::LAST_APPLIED, codec::encode(&applied))
            .unwrap();
        sm.insert(keys::MEMBERSHIP, codec::encode(&membership))
            .unwrap();
        let lease = Lease {
            worker: WorkerId(1),
            attempt: 1,
            deadline: 99,
        };
        let digest = Digest::new([7; 64]);
        let put = |id: u64, i: v1::Item| {
            sm.insert(keys::item(WorkId(id)), codec::encode(&i))
                .unwrap();
        };
        put(0, item(Status::Queued, None, None));
        sm.insert(keys::queue(WorkId(0)), b"".as_slice()).unwrap();
        put(1, item(Status::Running, Some(lease), None));
        sm.insert(keys::lease(99, WorkId(1)), b"".as_slice())
            .unwrap();
        sm.insert(
            keys::owner(WorkerId(1), WorkId(1)),
            1u32.to_be_bytes().as_slice(),
        )
        .unwrap();
        put(2, item(Status::Completed, None, Some(digest)));
        sm.insert(keys::completed(0), 2u64.to_be_bytes().as_slice())
            .unwrap();
        put(3, item(Status::Pulled, None, Some(digest)));
        sm.insert(keys::pulled(8, WorkId(3)), b"".as_slice())
            .unwrap();
        put(4, item(Status::Dead, None, None));
        // hashq 0.1 keyed dead items by id alone.
        sm.insert(
            [keys::DEAD]
                .iter()
                .chain(&4u64.to_be_bytes())
                .copied()
                .collect::<Vec<u8>>(),
            b"".as_slice(),
        )
        .unwrap();
        for id in [0u64, 1, 4] {
            // hashq 0.1's payload table: `p` + work id.
            let key = [&[keys::PAYLOAD][..], &id.to_be_bytes()].concat();
            sm.insert(key, b"abc".as_slice()).unwrap();
        }
        sm.insert(
            keys::worker(WorkerId(1)),
            b"an old worker record".as_slice(),
        )
        .unwrap();
        let meta = v1::Meta {
            now: 1_000,
            next_id: 5,
            next_completion: 1,
            next_worker: 2,
            max_workers: Some(4),
            counts: v1::Counts {
                queued: 1,
                running: 1,
                completed: 1,
                pulled: 1,
                dead: 1,
                queued_iterations: 10,
                payload_bytes: 9,
                enqueued_total: 5,
                completed_total: 2,
                pulled_total: 1,
                expired_total: 1,
                completed_iterations_total: 20,
            },
        };
        sm.insert(keys::META, codec::encode(&meta)).unwrap();
        let log = db.open_tree("log").unwrap();
        log.insert(40u64.to_be_bytes(), b"an applied entry".as_slice())
            .unwrap();
        if extra_entry {
            log.insert(41u64.to_be_bytes(), b"not applied".as_slice())
                .unwrap();
        }
        db.flush().unwrap();
        dir
    }

    #[tokio::test]
    async fn a_legacy_dir_is_refused_then_converted_and_opens_with_its_items() {
        let dir = legacy_dir(false);
        assert!(matches!(
            crate::open(dir.path(), &crate::StoreOptions::default()),
            Err(StoreError::Legacy { .. })
        ));
        let done = migrate(dir.path(), false).unwrap();
        assert_eq!(done.items, 5);
        assert_eq!((done.requeued, done.workers_dropped), (1, 1));
        assert!(dir.path().join("legacy-v1/sled").exists());

        let opened = crate::open(dir.path(), &crate::StoreOptions::default()).unwrap();
        assert!(opened.recovery.sm.restored_from.is_some());
        assert!(opened.recovery.damage.is_none());
        assert_eq!(opened.log.vote(), Some(Vote::new(4, 2)));
        let view = opened.sm.reader().view();
        let status = |id: u64| machine::item(&view, WorkId(id)).unwrap().unwrap().status;
        assert_eq!(status(0), Status::Queued);
        assert_eq!(status(1), Status::Queued, "running went back to the queue");
        assert_eq!(status(2), Status::Completed);
        assert_eq!(status(3), Status::Pulled);
        assert_eq!(status(4), Status::Dead);
        assert!(view.get(&keys::queue(WorkId(1))).unwrap().is_some());
        assert!(view.get(&keys::dead(1_000, WorkId(4))).unwrap().is_some());
        assert!(machine::workers(&view).unwrap().is_empty());
        let meta = machine::read_meta(&view).unwrap();
        assert_eq!((meta.counts.queued, meta.counts.running), (2, 0));
        assert_eq!(meta.counts.queued_iterations, 20);
        assert_eq!(meta.next_id, 5);
        let at = machine::item(&view, WorkId(1)).unwrap().unwrap().payload;
        let payloads = opened.sm.reader().payloads();
        assert_eq!(
            payloads.read(&[at]).unwrap(),
            vec![Some(bytes::Bytes::from_static(b"abc"))]
        );
        assert_eq!(machine::payload_floor(&view).unwrap(), Some(0));
        assert!(migrate(dir.path(), false).is_err(), "already converted");
    }

    #[test]
    fn unapplied_entries_are_not_dropped_without_being_told() {
        let dir = legacy_dir(true);
        let err = migrate(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("--discard-unapplied"), "{err}");
        assert!(dir.path().join("sled").exists(), "nothing moved");
        let done = migrate(dir.path(), true).unwrap();
        assert_eq!(done.discarded_entries, 1);
    }

    /// A data dir as the format-2 builds left it: the segment log (purged to 40), the vote
    /// file, and the state machine in sled with payloads by work id.
    fn format_2_dir(applied_index: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.log_dir()).unwrap();
        std::fs::write(layout.format_file(), "hashq-data 2\n").unwrap();
        let (mut log, _) = crate::LogStore::open(
            &layout.log_dir(),
            &layout.vote_file(),
            crate::LogOptions::default(),
        )
        .unwrap();
        log.keep_vote(Vote::new(4, 2)).unwrap();
        log.purge_to(LogId::new(CommittedLeaderId::new(4, 2), 40))
            .unwrap();
        drop(log);
        let db = crate::sm::open_sled(&layout.sm_dir(), 1 << 20).unwrap();
        let sm = db.open_tree("sm-0").unwrap();
        let applied = LogId::new(CommittedLeaderId::new(4, 2), applied_index);
        sm.insert(keys::LAST_APPLIED, codec::encode(&applied))
            .unwrap();
        let membership = StoredMembership::new(
            Some(LogId::new(CommittedLeaderId::new(0, 0), 0)),
            Membership::new(vec![[1u64, 2, 3].into_iter().collect()], None),
        );
        sm.insert(keys::MEMBERSHIP, codec::encode(&membership))
            .unwrap();
        let lease = Lease {
            worker: WorkerId(1),
            attempt: 1,
            deadline: 99,
        };
        let item = |status, lease, value: Option<Digest>| v2::Item {
            iterations: 10,
            attempts: 1,
            status,
            enqueued_at: 5,
            queued_at: 5,
            payload_len: 3,
            lease,
            completed_at: value.map(|_| 7),
            value,
            pulled_at: None,
            dead_reason: None,
            dead_at: None,
        };
        let items = [
            item(Status::Queued, None, None),
            item(Status::Running, Some(lease), None),
            item(Status::Completed, None, Some(Digest::new([7; 64]))),
        ];
        for (id, i) in items.iter().enumerate() {
            sm.insert(keys::item(WorkId(id as u64)), codec::encode(i))
                .unwrap();
        }
        sm.insert(keys::queue(WorkId(0)), b"".as_slice()).unwrap();
        sm.insert(keys::lease(99, WorkId(1)), b"".as_slice())
            .unwrap();
        for (id, payload) in [(0u64, b"abc"), (1, b"def")] {
            let key = [&[keys::PAYLOAD][..], &id.to_be_bytes()].concat();
            sm.insert(key, payload.as_slice()).unwrap();
        }
        let mut meta = machine::Meta {
            now: 1_000,
            next_id: 3,
            ..machine::Meta::default()
        };
        meta.counts.queued = 1;
        meta.counts.running = 1;
        meta.counts.completed = 1;
        sm.insert(keys::META, codec::encode(&meta)).unwrap();
        db.flush().unwrap();
        dir
    }

    #[tokio::test]
    async fn a_format_2_dir_is_refused_then_converted_with_its_leases_and_payloads() {
        let dir = format_2_dir(40);
        assert!(matches!(
            crate::open(dir.path(), &crate::StoreOptions::default()),
            Err(StoreError::Format2 { .. })
        ));
        let done = migrate(dir.path(), false).unwrap();
        assert_eq!(done.items, 3);
        assert_eq!((done.requeued, done.workers_dropped), (0, 0));
        assert!(dir.path().join("legacy-v2/sm").exists());
        assert!(dir.path().join("legacy-v2/raft/vote").exists());

        let opened = crate::open(dir.path(), &crate::StoreOptions::default()).unwrap();
        assert!(opened.recovery.sm.restored_from.is_some());
        assert!(opened.recovery.damage.is_none());
        assert_eq!(opened.log.vote(), Some(Vote::new(4, 2)));
        let view = opened.sm.reader().view();
        let item = |id: u64| machine::item(&view, WorkId(id)).unwrap().unwrap();
        assert_eq!(item(0).status, Status::Queued);
        assert_eq!(
            item(1).status,
            Status::Running,
            "a lease survives the migration"
        );
        assert_eq!(item(1).lease.map(|l| l.worker), Some(WorkerId(1)));
        assert!(view.get(&keys::lease(99, WorkId(1))).unwrap().is_some());
        assert_eq!(item(2).status, Status::Completed);
        let payloads = opened.sm.reader().payloads();
        assert_eq!(
            payloads.read(&[item(0).payload, item(1).payload]).unwrap(),
            vec![
                Some(bytes::Bytes::from_static(b"abc")),
                Some(bytes::Bytes::from_static(b"def"))
            ]
        );
        assert_eq!(machine::payload_floor(&view).unwrap(), Some(0));
        assert_eq!(machine::read_meta(&view).unwrap().next_id, 3);
        assert!(migrate(dir.path(), false).is_err(), "already converted");
    }

    #[test]
    fn a_format_2_state_machine_behind_its_log_is_not_converted_without_being_told() {
        let dir = format_2_dir(39);
        let err = migrate(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("--discard-unapplied"), "{err}");
        assert!(dir.path().join("sm").exists(), "nothing moved");
        let done = migrate(dir.path(), true).unwrap();
        assert_eq!(done.discarded_entries, 1);
    }
}
