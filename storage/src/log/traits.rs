//! openraft's [`RaftLogReader`] and [`RaftLogStorage`] on [`LogStore`]: each call that does
//! I/O runs on a blocking thread (reads of cached entries do not), and a fatal error maps to
//! openraft's.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use hashq_raft::{Entry, LogId, NodeId, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};

use super::{io_err, lock, LogStore};
use crate::fsio::Fatal;

/// Most entries a read copies from the cache on the calling task.
const INLINE_READ_MAX: u64 = 64;

fn storage_err(e: Fatal) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i + 1,
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        let end = end.min(
            lock(&self.inner.index)
                .last_log_id()
                .map_or(0, |l| l.index + 1),
        );
        if start >= end {
            return Ok(Vec::new());
        }
        let read_err = |e: std::io::Error| StorageIOError::read_logs(&e).into();
        // A few recent entries (what apply and replication ask for in steady state) come from
        // the cache at once. Entries read from disk, and long ranges (a follower catching up,
        // copied entry by entry), take a trip to a blocking thread instead.
        let planned = if end - start <= INLINE_READ_MAX {
            match self.plan_read(start, end).map_err(read_err)?.cached() {
                Ok(entries) => return Ok(entries),
                Err(planned) => Some(planned),
            }
        } else {
            None
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || match planned {
            Some(planned) => planned.read(),
            None => this.plan_read(start, end)?.read(),
        })
        .await
        .map_err(io_err)
        .and_then(|r| r)
        .map_err(read_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let index = lock(&self.inner.index);
        Ok(LogState {
            last_purged_log_id: index.purged,
            last_log_id: index.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = *vote;
        self.write(move |_, w| w.state.save_vote(vote))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.vote())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId>,
    ) -> Result<(), StorageError<NodeId>> {
        // Never ahead of the durable log (openraft refuses to start from such a state).
        // A write to the page cache, no sync: openraft awaits it before every apply, so it
        // stays on this task unless the writer is busy.
        let committed = committed.min(self.last_log_id());
        self.write_quick(move |_, w| w.state.note_committed(committed))
            .await
            .map_err(storage_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError<NodeId>> {
        let hint = lock(&self.inner.writer).state.state().committed;
        let floor = *lock(&self.inner.committed_floor);
        Ok(hint.max(floor).min(self.last_log_id()))
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
        let result = self.append_entries(entries.into_iter().collect()).await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io_err(&e)));
                Err(storage_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        self.write(move |inner, w| inner.truncate(w, log_id.index))
            .await
            .map_err(storage_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        self.write(move |inner, w| inner.purge(w, log_id))
            .await
            .map_err(storage_err)
    }
}
