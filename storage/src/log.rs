//! The Raft log and vote in sled, with group commit.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use hashq_raft::codec;
use hashq_raft::{Entry, LogId, NodeId, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use tokio::sync::{mpsc, oneshot};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// Something waiting for the next flush.
enum FlushWaiter {
    Append(LogFlushed<TypeConfig>),
    Sync(oneshot::Sender<io::Result<()>>),
}

/// The log store: entries in the `log` tree keyed by big-endian index, vote and pointers in the
/// `raft` tree. Cloning is cheap; clones share the trees and the flusher.
#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    raft: sled::Tree,
    flusher: mpsc::UnboundedSender<FlushWaiter>,
}

impl LogStore {
    pub(crate) fn open(db: sled::Db) -> Result<Self, sled::Error> {
        let log = db.open_tree("log")?;
        let raft = db.open_tree("raft")?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(flusher(db, rx));
        Ok(LogStore {
            log,
            raft,
            flusher: tx,
        })
    }

    /// Waits until everything written so far is on disk.
    async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.flusher
            .send(FlushWaiter::Sync(tx))
            .map_err(|_| io::Error::other("flusher stopped"))?;
        rx.await.map_err(|_| io::Error::other("flusher stopped"))?
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError<NodeId>> {
        let bytes = self.raft.get(key).map_err(|e| StorageIOError::read(&e))?;
        match bytes {
            None => Ok(None),
            Some(b) => codec::decode("raft metadata", &b)
                .map(Some)
                .map_err(|e| StorageIOError::read(&e).into()),
        }
    }

    fn last_purged(&self) -> Result<Option<LogId>, StorageError<NodeId>> {
        self.get_meta(LAST_PURGED)
    }
}

/// One flush for every waiter that queued up meanwhile: group commit.
async fn flusher(db: sled::Db, mut rx: mpsc::UnboundedReceiver<FlushWaiter>) {
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiters.push(more);
        }
        let result = db.flush_async().await.map(|_| ()).map_err(io::Error::other);
        for waiter in waiters {
            let result = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            match waiter {
                FlushWaiter::Append(callback) => callback.log_io_completed(result),
                FlushWaiter::Sync(tx) => {
                    let _ = tx.send(result);
                }
            }
        }
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode_entry(bytes: &[u8]) -> Result<Entry, StorageError<NodeId>> {
    codec::decode("log entry", bytes).map_err(|e| StorageIOError::read_logs(&e).into())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut entries = Vec::new();
        for pair in self.log.range((start, end)) {
            let (_, value) = pair.map_err(|e| StorageIOError::read_logs(&e))?;
            entries.push(decode_entry(&value)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id = self.last_purged()?;
        let last = self.log.last().map_err(|e| StorageIOError::read_logs(&e))?;
        let last_in_log = match last {
            Some((_, value)) => Some(decode_entry(&value)?.log_id),
            None => None,
        };
        // Entries at or below the purge point may linger after a crash mid-purge.
        let last_log_id = last_in_log.max(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.raft
            .insert(VOTE, codec::encode(vote))
            .map_err(|e| StorageIOError::write_vote(&e))?;
        self.sync()
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get_meta(VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId>,
    ) -> Result<(), StorageError<NodeId>> {
        self.raft
            .insert(COMMITTED, codec::encode(&committed))
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError<NodeId>> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(&index_key(entry.log_id.index), codec::encode(&entry));
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        // The entries are readable now; the callback fires once they are durable.
        self.flusher
            .send(FlushWaiter::Append(callback))
            .map_err(|_| StorageIOError::write_logs(&io::Error::other("flusher stopped")))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        let mut batch = sled::Batch::default();
        for key in self.log.range(index_key(log_id.index)..).keys() {
            batch.remove(key.map_err(|e| StorageIOError::write_logs(&e))?);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        // The state machine covering these entries must be durable before they go; one flush
        // per purge (rare) is the price.
        self.sync()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.raft
            .insert(LAST_PURGED, codec::encode(&log_id))
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let mut batch = sled::Batch::default();
        for key in self.log.range(..=index_key(log_id.index)).keys() {
            batch.remove(key.map_err(|e| StorageIOError::write_logs(&e))?);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
