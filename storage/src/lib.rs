//! sled persistence for hashq: openraft's [`RaftLogStorage`](openraft::storage::RaftLogStorage)
//! ([`LogStore`]) and [`RaftStateMachine`](openraft::storage::RaftStateMachine)
//! ([`StateMachineStore`]) on one sled database per node.
//!
//! Guarantees:
//! - a log append or a vote is reported done to openraft only after `flush` returned: appends
//!   are group-committed by one flusher task, so many appends share one fsync;
//! - an apply call writes its state changes and `last_applied` in one atomic sled batch, so a
//!   crash leaves the state machine at some `last_applied` and openraft re-applies from there;
//! - payloads live in sled, not in memory; the sled page cache is bounded by `cache_bytes`;
//! - snapshots are files: built by streaming the keyspace to disk and installed by streaming a
//!   received file into a fresh tree that replaces the old one with one pointer write, so a
//!   backlog of any size snapshots and installs with flat memory, and a crash mid-install
//!   leaves the previous state intact.
//!
//! Caveats: sled has no MVCC snapshots, so building a snapshot holds up apply while the
//! keyspace is copied to the file (apply waits, reads and Raft heartbeats do not).

// openraft's traits dictate `StorageError` as the error type, and it is large; boxing it
// at every internal helper would only add noise.
#![allow(clippy::result_large_err)]

mod log;
mod sm;
mod snapshot;

use std::path::{Path, PathBuf};

pub use log::LogStore;
pub use sm::{AppliedState, SledKv, SmReader, StateMachineStore};

/// A storage failure outside openraft's calls (opening the store).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How to open a node's store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// sled's page cache, the bound on the store's memory.
    pub cache_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_bytes: 128 * 1024 * 1024,
        }
    }
}

/// Opens (or creates) the store under `dir`: the sled database in `dir/sled`, snapshots in
/// `dir/snapshots`. Must be called from within a tokio runtime (it starts the flusher task).
pub fn open(
    dir: &Path,
    options: &StoreOptions,
) -> Result<(LogStore, StateMachineStore), StoreError> {
    let snapshots = dir.join("snapshots");
    std::fs::create_dir_all(&snapshots).map_err(|source| StoreError::Io {
        path: snapshots.clone(),
        source,
    })?;
    let db = sled::Config::new()
        .path(dir.join("sled"))
        .cache_capacity(options.cache_bytes)
        .open()?;
    let log = LogStore::open(db.clone())?;
    let sm = StateMachineStore::open(db, snapshots)?;
    Ok((log, sm))
}

#[cfg(test)]
mod tests;
