//! The sled side of the state machine: the read view of a tree ([`SledKv`]), opening sled,
//! finding the current tree, and reading what a tree has applied.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, RwLock};

use hashq_raft::codec;
use hashq_raft::keys;
use hashq_raft::kv::{merge, KvError, KvRead, ScanIter};
use hashq_raft::machine;
use hashq_raft::{LogId, StoredMembership};

use super::CURRENT_TREE;

/// Writes applied to the state machine that are not in its sled tree yet, in key order:
/// `Some` is a put, `None` a delete. See [`super::FLUSH_EVERY`].
pub(crate) type Unflushed = Arc<RwLock<BTreeMap<Vec<u8>, Option<Vec<u8>>>>>;

/// A read-only view of the state machine: its sled tree with the applied writes not yet
/// flushed into it on top.
#[derive(Clone)]
pub struct SledKv {
    pub(crate) tree: sled::Tree,
    pub(crate) unflushed: Unflushed,
}

impl SledKv {
    /// A view of `tree` alone (a tree being loaded or checked, with nothing applied on top).
    pub(crate) fn bare(tree: sled::Tree) -> SledKv {
        SledKv {
            tree,
            unflushed: Unflushed::default(),
        }
    }
}

fn io(e: sled::Error) -> KvError {
    KvError::Io(e.to_string())
}

impl KvRead for SledKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        if let Some(write) = read(&self.unflushed).get(key) {
            return Ok(write.clone());
        }
        self.tree
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(io)
    }

    fn scan<'a>(&'a self, start: &[u8], end: &[u8], reverse: bool) -> ScanIter<'a> {
        if start >= end {
            return Box::new(std::iter::empty());
        }
        // The unflushed writes of the range are copied out (they are few: a flush interval's),
        // so the lock is not held while the caller iterates.
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = read(&self.unflushed)
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let range = self
            .tree
            .range(start.to_vec()..end.to_vec())
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(io));
        let base: ScanIter<'a> = if reverse {
            writes.reverse();
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        if writes.is_empty() {
            return base;
        }
        merge(base, Box::new(writes.into_iter()), reverse)
    }
}

/// Reads `unflushed`, whatever a panicking writer left (its writes are whole entries).
pub(crate) fn read(
    unflushed: &Unflushed,
) -> std::sync::RwLockReadGuard<'_, BTreeMap<Vec<u8>, Option<Vec<u8>>>> {
    unflushed.read().unwrap_or_else(|p| p.into_inner())
}

/// Writes `unflushed`, likewise.
pub(crate) fn write(
    unflushed: &Unflushed,
) -> std::sync::RwLockWriteGuard<'_, BTreeMap<Vec<u8>, Option<Vec<u8>>>> {
    unflushed.write().unwrap_or_else(|p| p.into_inner())
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

pub(crate) fn open_sled(dir: &Path, cache_bytes: u64) -> Result<sled::Db, sled::Error> {
    sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        // Values up to a quarter of a segment stay inline: sled's separate blob files are
        // never synced, so none are wanted (payloads are not in sled; results, lists of pulled
        // items and worker records are).
        .segment_size(8 << 20)
        .open()
}

/// Reads the current tree and what it has applied; `Err` means sled cannot be trusted.
pub(super) fn current_tree(
    db: &sled::Db,
) -> Result<(sled::Tree, sled::Tree, Option<LogId>), String> {
    let meta = db.open_tree("sm_meta").map_err(|e| e.to_string())?;
    let name = match meta.get(CURRENT_TREE).map_err(|e| e.to_string())? {
        Some(name) => name.to_vec(),
        None => {
            meta.insert(CURRENT_TREE, b"sm-0")
                .map_err(|e| e.to_string())?;
            b"sm-0".to_vec()
        }
    };
    // Trees left behind by an install that crashed before its switch.
    for stale in db.tree_names() {
        if stale.starts_with(b"sm-") && stale.as_ref() != name.as_slice() {
            db.drop_tree(stale).map_err(|e| e.to_string())?;
        }
    }
    let tree = db.open_tree(&name).map_err(|e| e.to_string())?;
    let kv = SledKv::bare(tree.clone());
    let applied = read_last_applied(&kv).map_err(|e| e.to_string())?;
    machine::read_meta(&kv).map_err(|e| e.to_string())?;
    read_membership(&kv).map_err(|e| e.to_string())?;
    Ok((meta, tree, applied))
}
