//! The sled side of the state machine: the read view of a tree ([`SledKv`]), opening sled,
//! finding the current tree, and reading what a tree has applied.

use std::path::Path;

use hashq_raft::codec;
use hashq_raft::keys;
use hashq_raft::kv::{KvError, KvRead, ScanIter};
use hashq_raft::machine;
use hashq_raft::{LogId, StoredMembership};

use super::CURRENT_TREE;

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
    let kv = SledKv(tree.clone());
    let applied = read_last_applied(&kv).map_err(|e| e.to_string())?;
    machine::read_meta(&kv).map_err(|e| e.to_string())?;
    read_membership(&kv).map_err(|e| e.to_string())?;
    Ok((meta, tree, applied))
}
