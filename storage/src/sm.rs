//! The state machine in sled: one tree holds the keyspace of `hashq_raft::keys`, all but the
//! queue tables, which are kept in memory ([`queues`]).
//!
//! sled is not trusted for durability (its flush is not an fsync, and it never syncs its
//! configuration file): the state machine is rebuilt from what is durable (the latest
//! snapshot plus the Raft log) whenever sled comes back behind the log's purge point, empty,
//! or unreadable. Writes made after the last snapshot are simply applied again from the log;
//! they are the same on every replica, so applying them twice is harmless only because sled
//! then holds none of them or all of them: applied writes wait in memory and go into sled in
//! atomic batches of whole apply calls, each with its `last_applied` ([`FLUSH_EVERY`]).

pub(crate) mod kv;
pub(crate) mod paged;
pub(crate) mod queues;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use hashq_raft::codec;
use hashq_raft::keys;
use hashq_raft::kv::{KvError, Overlay};
use hashq_raft::machine;
use hashq_raft::types::WorkId;
use hashq_raft::{
    CommandResponse, Entry, LogId, NodeId, SnapshotFile, SnapshotMeta, StoredMembership, TypeConfig,
};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageError, StorageIOError};
use tokio::sync::watch;

use crate::format::{self, Layout};
use crate::fsio::{self, Fatal};
use crate::payloads::{PayloadReader, Payloads};
use crate::snapshot;
use kv::current_tree;
pub use kv::SledKv;
pub(crate) use kv::{open_sled, read_last_applied, read_membership, QueueIndex, Unflushed};
use queues::Queues;

/// The `sm_meta` tree's record naming the current state-machine tree.
const CURRENT_TREE: &[u8] = b"current";

/// What the node learns after each apply: enough to wake long-polling lease requests and to
/// measure clocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppliedState {
    pub index: u64,
    pub queued: u64,
    /// The wall clock the leader stamped on the last applied command (0 before any).
    pub leader_wall: u64,
    /// When this node applied it (on its own monotonic clock).
    pub at: Option<Instant>,
}

/// Timings of snapshot work, for the node's metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct SnapshotStats {
    pub built: u64,
    pub installed: u64,
    pub last_build_seconds: f64,
    pub last_install_seconds: f64,
    pub last_bytes: u64,
}

pub(crate) struct Shared {
    pub(crate) db: sled::Db,
    pub(crate) layout: Layout,
    /// Names the current state-machine tree; swapped by a snapshot install.
    meta: sled::Tree,
    /// The current tree with the applied writes not in it yet.
    pub(crate) layered: Arc<Layered>,
    applied: watch::Sender<AppliedState>,
    /// The latest complete snapshot file and its metadata.
    pub(crate) current_snapshot: Mutex<Option<(PathBuf, SnapshotMeta)>>,
    pub(crate) stats: Mutex<SnapshotStats>,
    /// Files handed out by `begin_receiving_snapshot`, so install can tell them apart.
    receiving: Mutex<HashMap<PathBuf, ()>>,
    pub(crate) payloads: Arc<Payloads>,
    /// Where the search for the payload floor starts: every item below it is one that never
    /// needs its payload again, so each is looked at once, not after every apply. Back to 0
    /// whenever the tree is replaced.
    floor_from: Mutex<WorkId>,
    flusher: Flusher,
}

/// The state-machine tree and the applied writes not in it yet ([`FLUSH_EVERY`]), shared
/// with the thread that puts them there.
pub(crate) struct Layered {
    /// The tree and the queue tables, which never go into sled ([`queues`]): replaced
    /// together by an install, so a view taken before it reads the old state's queues.
    current: RwLock<(sled::Tree, QueueIndex)>,
    pub(crate) unflushed: Unflushed,
    /// Held by whoever puts them into the tree, and while the tree is replaced.
    flush_lock: Mutex<()>,
    /// The last flush failed: apply tries it itself, and stops on a second failure.
    flush_failed: std::sync::atomic::AtomicBool,
}

/// How often applied writes go into sled, by default ([`crate::StoreOptions::flush_every`]):
/// one `apply_batch` for everything applied since the last one, with `last_applied`, instead
/// of one per apply call. sled rolls and writes its
/// I/O buffer (a `pwrite` and a `sync_file_range` on its own threads) for every batch
/// (`PageCache::pin_log`), whatever its size, so that cost is paid a few times a second
/// rather than for each log entry, and a record written and deleted in between (a queue
/// entry, a lease) never reaches sled. Readers see the writes from the moment they are
/// applied ([`SledKv`]). sled is not the durable copy: after a crash, what was applied and
/// not flushed is applied again from the log, as it always was for what sled had not synced.
///
/// The flush runs on a thread of its own, so apply never waits for sled unless the flusher
/// falls [`FLUSH_BEHIND_RECORDS`] behind or failed: while a layer of writes goes into the
/// tree, readers consult it, and apply writes the next one.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(50);
/// Or as soon as this many records wait.
const FLUSH_AT_RECORDS: usize = 20_000;
/// When this many wait (in both layers), apply flushes them itself: memory stays bounded
/// when sled is slower than apply.
const FLUSH_BEHIND_RECORDS: usize = 4 * FLUSH_AT_RECORDS;

impl Drop for Shared {
    /// A node that stops cleanly leaves sled with everything it applied (a crash leaves it
    /// to the log). The flusher thread is stopped and joined after this (`Flusher`'s drop),
    /// so sled is closed when the store is.
    fn drop(&mut self) {
        if let Err(e) = self.layered.flush() {
            tracing::warn!(error = %e, "the last applied writes did not reach sled; the log has them");
        }
    }
}

/// The thread that puts applied writes into sled every [`FLUSH_EVERY`], or when woken.
struct Flusher {
    wake: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn start(tree: Arc<Layered>, every: std::time::Duration) -> std::io::Result<Flusher> {
        // A zero interval would spin; a millisecond is as good as after every apply.
        let every = every.max(std::time::Duration::from_millis(1));
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("sm-flusher".into())
            .spawn(move || loop {
                if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                    woken.recv_timeout(every)
                {
                    return;
                }
                if kv::read(&tree.unflushed).is_empty() {
                    continue;
                }
                // Readers still see the writes; the next apply tries again itself, and stops
                // the node if that fails too.
                if let Err(e) = tree.flush() {
                    tracing::error!(error = %e, "applied writes could not go into sled");
                }
            })?;
        Ok(Flusher {
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    fn wake(&self) {
        if let Some(wake) = &self.wake {
            // Full means it is woken already.
            let _ = wake.try_send(());
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.wake.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where a flush is, for tests' hook (`AT_FLUSH`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlushStage {
    /// The layer is taken, the batch not yet in the tree.
    Writing,
    /// The batch is in the tree, the layer not yet dropped.
    Written,
}

/// What a test runs at each [`FlushStage`] ([`AT_FLUSH`]).
#[cfg(test)]
pub(crate) type FlushHook = Box<dyn FnMut(FlushStage) -> Result<(), sled::Error>>;

#[cfg(test)]
thread_local! {
    /// Runs at each [`FlushStage`] of a flush on this thread (tests of failed flushes and of
    /// readers in between): an error at `Writing` stands for sled's, with nothing written;
    /// at `Written` the hook only looks.
    pub(crate) static AT_FLUSH: std::cell::RefCell<Option<FlushHook>> =
        const { std::cell::RefCell::new(None) };
}

/// The test hook (`AT_FLUSH`); nothing outside tests.
fn at_flush(stage: FlushStage) -> Result<(), sled::Error> {
    #[cfg(test)]
    {
        AT_FLUSH.with(|hook| {
            hook.borrow_mut()
                .as_mut()
                .map_or(Ok(()), |hook| hook(stage))
        })
    }
    #[cfg(not(test))]
    {
        let _ = stage;
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Layered {
    pub(crate) fn new(tree: sled::Tree, queues: Queues) -> Layered {
        Layered {
            unflushed: Arc::new(RwLock::new(kv::Layers::over(&tree))),
            current: RwLock::new((tree, Arc::new(RwLock::new(queues)))),
            flush_lock: Mutex::new(()),
            flush_failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The state machine as applied: the tree with the unflushed writes on top.
    pub(crate) fn view(&self) -> SledKv {
        let (tree, queues) = self.current();
        SledKv {
            tree,
            unflushed: self.unflushed.clone(),
            queues,
        }
    }

    /// Puts the unflushed writes into the tree, in one atomic batch (they end with the
    /// `last_applied` of the last apply call). Readers see the same values before, during
    /// and after; apply goes on meanwhile, into a new layer.
    pub(crate) fn flush(&self) -> Result<(), sled::Error> {
        let _alone = lock(&self.flush_lock);
        let layer = {
            let mut layers = kv::write(&self.unflushed);
            if layers.is_empty() {
                return Ok(());
            }
            // A layer is left behind only by a failed flush; it goes again, under the newer.
            let mut layer = std::mem::take(&mut layers.flushing);
            let active = std::mem::take(&mut layers.active);
            if layer.is_empty() {
                layer = Arc::new(active);
            } else {
                Arc::make_mut(&mut layer).extend(active);
            }
            layers.flushing = layer.clone();
            layer
        };
        let tree = self.tree();
        let written = at_flush(FlushStage::Writing).and_then(|()| {
            // Only this flush writes the tree: the pages it reads stay as read.
            let mut writer = paged::Writer::new(&tree);
            for (key, value) in layer.iter() {
                writer.write(key, value.as_deref())?;
            }
            writer.apply()
        });
        self.flush_failed
            .store(written.is_err(), std::sync::atomic::Ordering::Relaxed);
        written?;
        // Until the layer goes, readers find its writes in it and in the tree alike.
        at_flush(FlushStage::Written).expect("a flush hook fails only before the write");
        kv::write(&self.unflushed).flushed();
        Ok(())
    }

    fn tree(&self) -> sled::Tree {
        self.current().0
    }

    /// The current tree and queues.
    pub(crate) fn current(&self) -> (sled::Tree, QueueIndex) {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl Shared {
    /// The state machine as applied: the tree with the unflushed writes on top.
    pub(crate) fn view(&self) -> SledKv {
        self.layered.view()
    }

    pub(crate) fn flush(&self) -> Result<(), sled::Error> {
        self.layered.flush()
    }

    #[cfg(test)]
    pub(crate) fn tree(&self) -> sled::Tree {
        self.layered.tree()
    }

    fn snapshot_dir(&self) -> PathBuf {
        self.layout.snapshot_dir()
    }

    /// Makes `tree` the state machine: one pointer write, then the old tree goes. (A crash
    /// before sled persists the pointer leaves the old tree, which recovery handles like any
    /// state that is behind.)
    pub(crate) fn switch_to(&self, tree: sled::Tree, queues: Queues) -> Result<(), sled::Error> {
        // No flush may go into the old tree once the new one is current.
        let _alone = lock(&self.layered.flush_lock);
        self.meta.insert(CURRENT_TREE, &*tree.name())?;
        self.db.flush()?;
        // Read before the locks below, which every new view waits for.
        let fresh = kv::Layers::over(&tree);
        let old = {
            let mut current = self
                .layered
                .current
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *lock(&self.floor_from) = WorkId(0);
            // Writes applied to the old state are no part of the new one.
            *kv::write(&self.layered.unflushed) = fresh;
            std::mem::replace(&mut *current, (tree, Arc::new(RwLock::new(queues)))).0
        };
        self.db.drop_tree(old.name())?;
        self.publish(0);
        Ok(())
    }

    /// Tells subscribers what was applied. A read failure here is reported by the next apply
    /// or route that reads the same record, so it is only logged.
    fn publish(&self, leader_wall: u64) {
        let kv = self.view();
        let mut from = lock(&self.floor_from);
        match machine::payload_floor_from(&kv, *from) {
            Ok((floor, next)) => {
                *from = next;
                self.payloads.set_sm_floor(floor);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the payload floor"),
        }
        drop(from);
        let state = machine::read_meta(&kv).and_then(|meta| {
            Ok(AppliedState {
                index: read_last_applied(&kv)?.map_or(0, |l| l.index),
                queued: meta.counts.queued,
                leader_wall,
                at: Some(Instant::now()),
            })
        });
        match state {
            Ok(state) => {
                self.applied.send_replace(state);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the applied state"),
        }
    }

    /// Streams a snapshot file into a new tree (checking its checksum and that it is the
    /// snapshot `expected` names); the new tree is dropped on any error so the current state
    /// stays untouched.
    fn load_tree(
        &self,
        path: &Path,
        expected: Option<&SnapshotMeta>,
    ) -> std::io::Result<(sled::Tree, Queues)> {
        let name = format!("sm-{}", snapshot::unique());
        let tree = self.db.open_tree(&name).map_err(std::io::Error::other)?;
        // The file's queue records are checked, and compared with the queues its items
        // give: the queues are those, as after a restart.
        let mut in_file = Queues::default();
        let mut batch = paged::Writer::new(&tree);
        let mut batch_bytes = 0;
        let loaded = snapshot::read(path, |key, value| {
            if queues::is_queue_key(&key) {
                return in_file
                    .write(&key, Some(&value))
                    .map_err(|e| fsio::invalid(e.to_string()));
            }
            batch_bytes += key.len() + value.len();
            batch
                .write(&key, Some(&value))
                .map_err(std::io::Error::other)?;
            if batch_bytes >= 4 << 20 {
                batch.apply().map_err(std::io::Error::other)?;
                batch_bytes = 0;
            }
            Ok(())
        })
        .and_then(|info| {
            if expected.is_some_and(|e| *e != info.meta) {
                return Err(fsio::invalid(
                    "the snapshot file is not the snapshot it was announced as",
                ));
            }
            batch.apply().map_err(std::io::Error::other)?;
            let queues = kv::queues_from_items(&tree).map_err(std::io::Error::other)?;
            if queues != in_file {
                tracing::warn!(
                    snapshot = %info.meta.snapshot_id,
                    differ = queues.differences(&in_file),
                    "the snapshot's queue records disagree with its item records; the items win"
                );
            }
            Ok(queues)
        });
        match loaded {
            Ok(queues) => Ok((tree, queues)),
            Err(e) => {
                drop(tree);
                let _ = self.db.drop_tree(name.as_bytes());
                Err(e)
            }
        }
    }
}

/// openraft's state machine over sled. Cloning is cheap.
#[derive(Clone)]
pub struct StateMachineStore {
    pub(crate) shared: Arc<Shared>,
}

/// A cheap, cloneable handle for reading the state machine outside openraft (routes, the
/// leader's loops). Reads see applied state, which on a follower may lag the leader.
#[derive(Clone)]
pub struct SmReader {
    shared: Arc<Shared>,
}

impl SmReader {
    /// A view of the current tree. After a snapshot install, older views read a dropped tree
    /// under the new state's unflushed writes, resident records (the counters,
    /// `last_applied`: see `kv::RESIDENT`) and index of node keys (which may call a key the
    /// old tree holds absent); take a fresh view per request. Apply takes its own.
    pub fn view(&self) -> SledKv {
        self.shared.view()
    }

    /// Changes after every apply and install.
    pub fn subscribe(&self) -> watch::Receiver<AppliedState> {
        self.shared.applied.subscribe()
    }

    /// Bytes on disk used by the sled database (approximate).
    pub fn disk_bytes(&self) -> u64 {
        self.shared.db.size_on_disk().unwrap_or(0)
    }

    /// Reads items' payloads.
    pub fn payloads(&self) -> PayloadReader {
        PayloadReader(self.shared.payloads.clone())
    }

    /// Snapshot timings and sizes.
    pub fn snapshot_stats(&self) -> SnapshotStats {
        *lock(&self.shared.stats)
    }

    /// A fresh path in the snapshot dir for a snapshot being received from a leader.
    pub fn receive_path(&self) -> PathBuf {
        self.shared
            .snapshot_dir()
            .join(format!("recv-{}.part", snapshot::unique()))
    }
}

/// What opening the state machine found.
#[derive(Clone, Debug, Default)]
pub struct SmOpened {
    /// sled could not be opened or read, and was set aside.
    pub sled_reset: Option<String>,
    /// The state was rebuilt from this snapshot (sled was behind the log's purge point).
    pub restored_from: Option<String>,
    /// The state needed is neither in sled nor in a snapshot: the node must be repaired from
    /// its peers.
    pub unrecoverable: Option<String>,
}

impl StateMachineStore {
    /// Opens the state machine, making sure it is not behind `purged` (the log's purge
    /// point): otherwise it is rebuilt from the latest snapshot, or reported unrecoverable.
    pub(crate) fn open(
        layout: &Layout,
        options: &crate::StoreOptions,
        purged: Option<LogId>,
        payloads: Arc<Payloads>,
    ) -> Result<(StateMachineStore, SmOpened), crate::StoreError> {
        let mut opened = SmOpened::default();
        snapshot::remove_partial_files(&layout.snapshot_dir())?;
        let latest = snapshot::find_latest(&layout.snapshot_dir(), layout)?;
        payloads.set_snapshot_floor(latest.as_ref().and_then(|(_, i)| i.payload_floor));
        let latest = latest.map(|(path, info)| (path, info.meta));
        let dir = layout.sm_dir();
        let attempt = open_sled(&dir, options.cache_bytes)
            .map_err(|e| e.to_string())
            .and_then(|db| current_tree(&db).map(|t| (db, t)));
        let (db, (meta, tree, applied, queues)) = match attempt {
            Ok(ok) => ok,
            Err(why) => {
                tracing::error!(error = %why, "the state machine store cannot be read; rebuilding it");
                format::quarantine(layout, &dir, "sled could not be opened or read")?;
                fsio::create_dir_durable(&dir)?;
                opened.sled_reset = Some(why);
                let db = open_sled(&dir, options.cache_bytes)?;
                let t = current_tree(&db)
                    .map_err(|e| crate::StoreError::Sled(sled::Error::Unsupported(e)))?;
                (db, t)
            }
        };
        let (applied_tx, _) = watch::channel(AppliedState::default());
        let layered = Arc::new(Layered::new(tree, queues));
        let flusher = Flusher::start(layered.clone(), options.flush_every)
            .map_err(fsio::fatal("start the state machine's flusher", &dir))?;
        let shared = Arc::new(Shared {
            db,
            layout: layout.clone(),
            meta,
            layered,
            applied: applied_tx,
            current_snapshot: Mutex::new(latest.clone()),
            stats: Mutex::new(SnapshotStats::default()),
            receiving: Mutex::new(HashMap::new()),
            payloads,
            floor_from: Mutex::new(WorkId(0)),
            flusher,
        });
        if applied < purged {
            match latest {
                Some((path, meta)) if meta.last_log_id >= purged => {
                    tracing::warn!(
                        applied = ?applied,
                        purged = ?purged,
                        snapshot = %meta.snapshot_id,
                        "the state machine is behind the log's purge point; restoring the latest snapshot"
                    );
                    let (tree, queues) = shared
                        .load_tree(&path, Some(&meta))
                        .map_err(|e| fsio::fatal("load snapshot", &path)(e))?;
                    shared.switch_to(tree, queues)?;
                    opened.restored_from = Some(meta.snapshot_id.clone());
                }
                other => {
                    opened.unrecoverable = Some(format!(
                        "applied {applied:?} is behind the purge point {purged:?} and the newest snapshot is {:?}",
                        other.map(|(_, m)| m.last_log_id)
                    ));
                }
            }
        }
        shared.publish(0);
        Ok((StateMachineStore { shared }, opened))
    }

    /// The newest log id known applied here: the state machine's last applied entry or its
    /// latest snapshot, whichever is further. Everything up to it was committed.
    pub fn applied_floor(&self) -> Option<LogId> {
        let applied = read_last_applied(&self.shared.view()).ok().flatten();
        let snapshot = lock(&self.shared.current_snapshot)
            .as_ref()
            .and_then(|(_, m)| m.last_log_id);
        applied.max(snapshot)
    }

    /// A reader for the node's routes and loops.
    pub fn reader(&self) -> SmReader {
        SmReader {
            shared: self.shared.clone(),
        }
    }

    /// Writes a snapshot of the current state now (apply waits: sled has no point-in-time
    /// view; the state machine holds no payloads, so this is a copy of metadata only).
    /// Returns its file and metadata, with what sends its payloads.
    fn dump(&self) -> Result<SnapshotFileAndMeta, Fatal> {
        let started = Instant::now();
        let dir = self.shared.snapshot_dir();
        let read = |e: KvError| fsio::fatal("read state", &dir)(std::io::Error::other(e));
        // Everything applied goes into the tree first: the dump reads the tree and the
        // queues alone.
        self.shared
            .flush()
            .map_err(|e| read(KvError::Io(e.to_string())))?;
        let kv = self.shared.view();
        let last_log_id = read_last_applied(&kv).map_err(read)?;
        let last_membership = read_membership(&kv).map_err(read)?;
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id: snapshot::new_id(last_log_id.as_ref()),
        };
        let floor = machine::payload_floor(&kv).map_err(read)?;
        let pairs = kv.all().map(|r| r.map_err(std::io::Error::other));
        let path = snapshot::write(&dir, &meta, floor, pairs)?;
        let file = self.with_section(path.clone(), &meta, floor)?;
        {
            let mut current = lock(&self.shared.current_snapshot);
            *current = Some((path.clone(), meta.clone()));
            self.shared.payloads.set_snapshot_floor(floor);
        }
        snapshot::remove_others(&dir, &path)?;
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        {
            let mut stats = lock(&self.shared.stats);
            stats.built += 1;
            stats.last_build_seconds = started.elapsed().as_secs_f64();
            stats.last_bytes = bytes;
        }
        tracing::info!(snapshot = %meta.snapshot_id, bytes, "snapshot built");
        Ok((file, meta))
    }

    /// The snapshot at `path` with what writes its payload section.
    fn with_section(
        &self,
        path: PathBuf,
        meta: &SnapshotMeta,
        floor: Option<u64>,
    ) -> Result<SnapshotFile, Fatal> {
        let last = meta.last_log_id.map_or(0, |l| l.index);
        let section = self
            .shared
            .payloads
            .section(&path, floor, last)
            .map_err(fsio::fatal("open snapshot", &path))?;
        Ok(SnapshotFile {
            path,
            payloads: Some(section),
        })
    }
}

/// A snapshot ready to be handed to openraft.
type SnapshotFileAndMeta = (SnapshotFile, SnapshotMeta);

fn sm_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

fn snapshot_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, &e).into()
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Builder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), StorageError<NodeId>> {
        let kv = self.shared.view();
        let last = read_last_applied(&kv).map_err(|e| StorageIOError::read_state_machine(&e))?;
        let membership =
            read_membership(&kv).map_err(|e| StorageIOError::read_state_machine(&e))?;
        Ok((last, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let started = Instant::now();
        let base = self.shared.view();
        let mut overlay = Overlay::new(&base);
        let mut responses = Vec::new();
        let mut last = None;
        let mut leader_wall = 0;
        for entry in entries {
            last = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Vec::new()),
                EntryPayload::Normal(ref command) => {
                    leader_wall = command.now;
                    let at = machine::At {
                        term: entry.log_id.leader_id.term,
                        index: entry.log_id.index,
                    };
                    let answers = machine::apply(&mut overlay, command, at)
                        .map_err(|e| StorageError::from(StorageIOError::apply(entry.log_id, &e)))?;
                    responses.push(answers);
                }
                EntryPayload::Membership(ref membership) => {
                    let stored = StoredMembership::new(Some(entry.log_id), membership.clone());
                    hashq_raft::kv::Kv::put(
                        &mut overlay,
                        keys::MEMBERSHIP.to_vec(),
                        codec::encode(&stored),
                    );
                    responses.push(Vec::new());
                }
            }
        }
        if let Some(last) = last {
            hashq_raft::kv::Kv::put(
                &mut overlay,
                keys::LAST_APPLIED.to_vec(),
                codec::encode(&last),
            );
        }
        let writes = overlay.into_writes();
        // Queue records are checked before anything is written, so a refusal leaves the
        // state as it was (and the writes below cannot fail).
        for (key, value) in writes.iter().filter(|(key, _)| queues::is_queue_key(key)) {
            queues::check(key, value.as_deref()).map_err(sm_error)?;
        }
        let waiting = {
            let layered = &self.shared.layered;
            let (_, queues) = layered.current();
            let mut layers = kv::write(&layered.unflushed);
            let mut queues = kv::queues_write(&queues);
            for (key, value) in writes {
                if queues::is_queue_key(&key) {
                    queues.write(&key, value.as_deref()).map_err(sm_error)?;
                } else {
                    layers.active.insert(key, value);
                }
            }
            layers.active.len() + layers.flushing.len()
        };
        let failed = self
            .shared
            .layered
            .flush_failed
            .load(std::sync::atomic::Ordering::Relaxed);
        if waiting >= FLUSH_BEHIND_RECORDS || failed {
            self.shared.flush().map_err(sm_error)?;
        } else if waiting >= FLUSH_AT_RECORDS {
            self.shared.flusher.wake();
        }
        self.shared.publish(leader_wall);
        if let Some(o) = fsio::observer() {
            o.applied(started.elapsed().as_secs_f64());
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Dump now, while apply waits for us: sled has no point-in-time view, and this is the
        // only moment the keyspace is guaranteed not to change under the dump.
        let this = self.clone();
        let dumped = tokio::task::spawn_blocking(move || this.dump())
            .await
            .unwrap_or_else(|e| {
                Err(fsio::fatal("snapshot", Path::new("snapshots"))(
                    std::io::Error::other(e.to_string()),
                ))
            });
        Builder {
            dumped: Some(dumped),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<SnapshotFile>, StorageError<NodeId>> {
        let path = self.reader().receive_path();
        lock(&self.shared.receiving).insert(path.clone(), ());
        Ok(Box::new(SnapshotFile::new(path)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError<NodeId>> {
        let started = Instant::now();
        let this = self.clone();
        let meta = meta.clone();
        let source = snapshot.path.clone();
        tokio::task::spawn_blocking(move || this.install(&meta, &source).map_err(snapshot_error))
            .await
            .unwrap_or_else(|e| Err(snapshot_error(std::io::Error::other(e.to_string()))))?;
        let mut stats = lock(&self.shared.stats);
        stats.installed += 1;
        stats.last_install_seconds = started.elapsed().as_secs_f64();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let current = lock(&self.shared.current_snapshot).clone();
        let Some((path, meta)) = current else {
            return Ok(None);
        };
        let this = self.clone();
        // Verified before it is handed out (to a follower, usually). A corrupt one is set
        // aside and a new one built on the spot, so a follower never gets it and the leader
        // never reports "no snapshot" (openraft would stop on that).
        let snapshot = tokio::task::spawn_blocking(move || -> Result<_, Fatal> {
            match snapshot::verify_info(&path) {
                Ok(found) if found.meta == meta => {
                    let file = this.with_section(path, &meta, found.payload_floor)?;
                    Ok((file, meta))
                }
                Ok(_) | Err(_) => {
                    tracing::error!(path = %path.display(), "the current snapshot fails its checksum; building a new one");
                    if path.exists() {
                        format::quarantine(&this.shared.layout, &path, "snapshot fails its checksum")?;
                    }
                    this.dump()
                }
            }
        })
        .await
        .unwrap_or_else(|e| {
            Err(fsio::fatal("snapshot", Path::new("snapshots"))(
                std::io::Error::other(e.to_string()),
            ))
        })
        .map_err(snapshot_error)?;
        let (file, meta) = snapshot;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(file),
        }))
    }
}

impl StateMachineStore {
    /// Installs the snapshot file at `source` (verified by the receiver, checked again
    /// here): its payloads become a pack, its records a new state-machine tree, and its
    /// records alone the current snapshot. Each step is durable before the next; a crash
    /// anywhere leaves either the old state or the new one.
    fn install(&self, meta: &SnapshotMeta, source: &Path) -> std::io::Result<()> {
        if !snapshot::id_is_safe(&meta.snapshot_id) {
            return Err(fsio::invalid("unsafe snapshot id"));
        }
        // The records part (small); the payload section is checked as it becomes a pack.
        let info = snapshot::read(source, |_, _| Ok(()))?;
        if info.meta != *meta {
            return Err(fsio::invalid(
                "the snapshot file is not the snapshot it was announced as",
            ));
        }
        let dir = self.shared.snapshot_dir();
        let path = dir.join(format!("{}.snap", meta.snapshot_id));
        let tmp = path.with_extension("tmp");
        // The records part alone becomes the current snapshot (a copy of metadata only).
        {
            let mut from = std::fs::File::open(source)?;
            let mut to = std::fs::File::create(&tmp)?;
            std::io::copy(&mut std::io::Read::take(&mut from, info.len), &mut to)?;
            fsio::sync_data(&to, &tmp).map_err(std::io::Error::other)?;
        }
        let ours = source.parent() == Some(dir.as_path());
        if snapshot::has_section(source, &info)? {
            if !ours {
                return Err(fsio::invalid("a snapshot with payloads not received here"));
            }
            self.shared
                .payloads
                .add_pack(source, info.len, &meta.snapshot_id, &info.refs)?;
        } else if info.refs.count > 0 {
            // Handed over without its payloads (a snapshot of this very store): they must
            // be here already.
            tracing::warn!(snapshot = %meta.snapshot_id, "installing a snapshot without its payload section");
        }
        let (tree, queues) = self.shared.load_tree(&tmp, Some(meta))?;
        self.shared
            .switch_to(tree, queues)
            .map_err(std::io::Error::other)?;
        fsio::rename_durable(&tmp, &path).map_err(std::io::Error::other)?;
        if ours && source.exists() {
            fsio::remove_durable(source).map_err(std::io::Error::other)?;
        }
        lock(&self.shared.receiving).remove(source);
        {
            let mut current = lock(&self.shared.current_snapshot);
            *current = Some((path.clone(), meta.clone()));
            self.shared.payloads.set_snapshot_floor(info.payload_floor);
        }
        snapshot::remove_others(&dir, &path).map_err(std::io::Error::other)?;
        tracing::info!(snapshot = %meta.snapshot_id, payloads = info.refs.count, "snapshot installed");
        Ok(())
    }
}

/// Builds a snapshot: the dump happens in `get_snapshot_builder`, `build_snapshot` hands it
/// over.
pub struct Builder {
    dumped: Option<Result<SnapshotFileAndMeta, Fatal>>,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (file, meta) = self
            .dumped
            .take()
            .unwrap_or_else(|| {
                Err(fsio::fatal("snapshot", Path::new("snapshots"))(
                    std::io::Error::other("snapshot already handed over"),
                ))
            })
            .map_err(snapshot_error)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}
