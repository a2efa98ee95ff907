//! The state machine in sled: one tree holds the whole keyspace of `hashq_raft::keys`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use hashq_raft::codec;
use hashq_raft::keys;
use hashq_raft::kv::{KvError, KvRead, Overlay, ScanIter};
use hashq_raft::machine;
use hashq_raft::{
    CommandResponse, Entry, LogId, NodeId, SnapshotMeta, StoredMembership, TypeConfig,
};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageError, StorageIOError};
use tokio::sync::watch;

use crate::snapshot;

/// The `sm_meta` tree's record naming the current state-machine tree.
const CURRENT_TREE: &[u8] = b"current";

/// A read-only view of one state-machine tree.
#[derive(Clone)]
pub struct SledKv(pub(crate) sled::Tree);

fn io(e: sled::Error) -> KvError {
    KvError::Io(e.to_string())
}

impl KvRead for SledKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.0.get(key).map(|v| v.map(|v| v.to_vec())).map_err(io)
    }

    fn scan<'a>(&'a self, start: &[u8], end: &[u8], reverse: bool) -> ScanIter<'a> {
        if start >= end {
            return Box::new(std::iter::empty());
        }
        let range = self
            .0
            .range(start.to_vec()..end.to_vec())
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(io));
        if reverse {
            Box::new(range.rev())
        } else {
            Box::new(range)
        }
    }
}

/// What the node learns after each apply: enough to wake long-polling lease requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppliedState {
    pub index: u64,
    pub queued: u64,
}

pub(crate) struct Shared {
    pub(crate) db: sled::Db,
    /// Names the current state-machine tree; swapped by a snapshot install.
    meta: sled::Tree,
    pub(crate) current: RwLock<sled::Tree>,
    pub(crate) snapshot_dir: PathBuf,
    applied: watch::Sender<AppliedState>,
    /// Files being received from a leader, by inode, so install can find the path.
    pub(crate) receiving: Mutex<HashMap<u64, PathBuf>>,
    /// The latest complete snapshot file and its metadata.
    pub(crate) current_snapshot: Mutex<Option<(PathBuf, SnapshotMeta)>>,
}

impl Shared {
    pub(crate) fn tree(&self) -> sled::Tree {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Makes `tree` the state machine: one durable pointer write, then the old tree goes.
    pub(crate) async fn switch_to(&self, tree: sled::Tree) -> Result<(), sled::Error> {
        self.db.flush_async().await?;
        self.meta.insert(CURRENT_TREE, &*tree.name())?;
        self.db.flush_async().await?;
        let old = {
            let mut current = self
                .current
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            std::mem::replace(&mut *current, tree)
        };
        self.db.drop_tree(old.name())?;
        self.publish();
        Ok(())
    }

    /// Tells subscribers what was applied. A read failure here is reported by the next apply
    /// or route that reads the same record, so it is only logged.
    fn publish(&self) {
        let kv = SledKv(self.tree());
        let state = machine::read_meta(&kv).and_then(|meta| {
            Ok(AppliedState {
                index: read_last_applied(&kv)?.map_or(0, |l| l.index),
                queued: meta.counts.queued,
            })
        });
        match state {
            Ok(state) => {
                self.applied.send_replace(state);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the applied state"),
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
    /// A view of the current tree. After a snapshot install, older views read a dropped tree;
    /// take a fresh view per request.
    pub fn view(&self) -> SledKv {
        SledKv(self.shared.tree())
    }

    /// Changes after every apply and install.
    pub fn subscribe(&self) -> watch::Receiver<AppliedState> {
        self.shared.applied.subscribe()
    }

    /// Bytes on disk used by the sled database (approximate).
    pub fn disk_bytes(&self) -> u64 {
        self.shared.db.size_on_disk().unwrap_or(0)
    }
}

pub(crate) fn read_last_applied(kv: &SledKv) -> Result<Option<LogId>, KvError> {
    match kv.get(keys::LAST_APPLIED)? {
        None => Ok(None),
        Some(b) => codec::decode("last applied", &b)
            .map(Some)
            .map_err(|e| KvError::Corrupt {
                key: "last_applied".into(),
                reason: e.to_string(),
            }),
    }
}

pub(crate) fn read_membership(kv: &SledKv) -> Result<StoredMembership, KvError> {
    match kv.get(keys::MEMBERSHIP)? {
        None => Ok(StoredMembership::default()),
        Some(b) => codec::decode("membership", &b).map_err(|e| KvError::Corrupt {
            key: "membership".into(),
            reason: e.to_string(),
        }),
    }
}

impl StateMachineStore {
    pub(crate) fn open(db: sled::Db, snapshot_dir: PathBuf) -> Result<Self, crate::StoreError> {
        let meta = db.open_tree("sm_meta")?;
        let name = match meta.get(CURRENT_TREE)? {
            Some(name) => name.to_vec(),
            None => {
                meta.insert(CURRENT_TREE, b"sm-0")?;
                b"sm-0".to_vec()
            }
        };
        // Trees left behind by an install that crashed before its switch.
        for stale in db.tree_names() {
            if stale.starts_with(b"sm-") && stale.as_ref() != name.as_slice() {
                db.drop_tree(stale)?;
            }
        }
        snapshot::remove_partial_files(&snapshot_dir).map_err(|source| crate::StoreError::Io {
            path: snapshot_dir.clone(),
            source,
        })?;
        let current = db.open_tree(&name)?;
        let (applied, _) = watch::channel(AppliedState::default());
        let shared = Arc::new(Shared {
            db,
            meta,
            current: RwLock::new(current),
            snapshot_dir,
            applied,
            receiving: Mutex::new(HashMap::new()),
            current_snapshot: Mutex::new(None),
        });
        shared.publish();
        *shared
            .current_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = snapshot::find_latest(&shared.snapshot_dir);
        Ok(StateMachineStore { shared })
    }

    /// A reader for the node's routes and loops.
    pub fn reader(&self) -> SmReader {
        SmReader {
            shared: self.shared.clone(),
        }
    }
}

fn sm_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = snapshot::Builder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), StorageError<NodeId>> {
        let kv = SledKv(self.shared.tree());
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
        let tree = self.shared.tree();
        let base = SledKv(tree.clone());
        let mut overlay = Overlay::new(&base);
        let mut responses = Vec::new();
        let mut last = None;
        for entry in entries {
            last = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Vec::new()),
                EntryPayload::Normal(ref command) => {
                    let answers = machine::apply(&mut overlay, command)
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
        let mut batch = sled::Batch::default();
        for (key, value) in overlay.into_writes() {
            match value {
                Some(v) => batch.insert(key, v),
                None => batch.remove(key),
            }
        }
        tree.apply_batch(batch).map_err(sm_error)?;
        self.shared.publish();
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Dump now, while apply waits for us: sled has no point-in-time view, and this is the
        // only moment the keyspace is guaranteed not to change under the dump.
        snapshot::Builder::dump(self.shared.clone()).await
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        snapshot::begin_receiving(&self.shared).await
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        snapshot::install(&self.shared, meta, *snapshot).await
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        snapshot::current(&self.shared).await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for snapshot::Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        self.finish().await
    }
}
