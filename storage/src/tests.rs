//! The openraft conformance suite on the sled store, plus restart and snapshot round trips.

use hashq_raft::command::{Command, Request, Response};
use hashq_raft::kv::KvRead;
use hashq_raft::{machine, Entry, LogId, NodeId, TypeConfig, WorkId};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader, RaftSnapshotBuilder, StorageError};
use serde_bytes::ByteBuf;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = open(dir.path(), &StoreOptions::default()).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_conformance_suite() {
    Suite::test_all(SledBuilder).expect("suite");
}

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

fn enqueue_entry(index: u64, payload_len: usize) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command {
            now: 1_000 + index,
            limits: hashq_raft::command::StoreLimits::UNLIMITED,
            requests: vec![Request::Enqueue {
                iterations: index as u32,
                payload: ByteBuf::from(vec![index as u8; payload_len]),
                dedup: Some(hashq_raft::command::Dedup {
                    key: format!("key-{index}"),
                    ttl_ms: 60_000,
                }),
            }],
        }),
    }
}

/// A digest of the whole keyspace: (pairs, crc of all keys and values), so a mismatch does
/// not print megabytes.
fn dump(sm: &StateMachineStore) -> (usize, u32) {
    let view = sm.reader().view();
    let mut crc = crc32fast::Hasher::new();
    let mut n = 0;
    for pair in view.scan(&[0u8], &[0xffu8; 4], false) {
        let (k, v) = pair.unwrap();
        crc.update(&(k.len() as u32).to_le_bytes());
        crc.update(&k);
        crc.update(&(v.len() as u32).to_le_bytes());
        crc.update(&v);
        n += 1;
    }
    (n, crc.finalize())
}

/// Opens a store whose previous instance is shutting down: its flusher task lets go of the
/// database lock once it sees its channel closed.
async fn reopen(dir: &std::path::Path) -> (LogStore, StateMachineStore) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match open(dir, &StoreOptions::default()) {
            Ok(stores) => return stores,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("store did not reopen: {e}"),
        }
    }
}

#[tokio::test]
async fn a_restarted_store_has_every_appended_entry_and_applied_item() {
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<Entry> = (1..=20).map(|i| enqueue_entry(i, 2048)).collect();
    {
        let (mut log, mut sm) = open(dir.path(), &StoreOptions::default()).unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        let answers = sm.apply(entries[..15].to_vec()).await.unwrap();
        assert!(matches!(answers[0][0], Response::Enqueued { .. }));
        log.save_vote(&openraft::Vote::new(3, 2)).await.unwrap();
    }
    let (mut log, mut sm) = reopen(dir.path()).await;
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(20)));
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(openraft::Vote::new(3, 2))
    );
    let back = log.try_get_log_entries(1..=20).await.unwrap();
    assert_eq!(back, entries);
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(15)));
    let view = sm.reader().view();
    for i in 0..15 {
        let item = machine::item(&view, WorkId(i))
            .unwrap()
            .expect("applied item survives");
        assert_eq!(u64::from(item.iterations), i + 1);
        assert_eq!(
            machine::payload(&view, WorkId(i)).unwrap().unwrap().len(),
            2048
        );
    }
    assert_eq!(machine::read_meta(&view).unwrap().counts.queued, 15);
}

#[tokio::test]
async fn a_snapshot_installs_into_another_store_byte_for_byte() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let (_, mut a) = open(a_dir.path(), &StoreOptions::default()).unwrap();
    let (_, mut b) = open(b_dir.path(), &StoreOptions::default()).unwrap();
    a.apply(
        (1..=50)
            .map(|i| enqueue_entry(i, 10_000))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    // b has some older, different state that the install must replace entirely.
    b.apply(vec![enqueue_entry(1, 5)]).await.unwrap();

    let mut builder = a.get_snapshot_builder().await;
    let snapshot = builder.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(50)));

    // Ship it the way openraft does: stream the file into a file b hands out.
    let mut source = a
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("current snapshot");
    assert_eq!(source.meta, snapshot.meta);
    let mut target = b.begin_receiving_snapshot().await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = source.snapshot.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        target.write_all(&buf[..n]).await.unwrap();
    }
    target.flush().await.unwrap();
    b.install_snapshot(&snapshot.meta, target).await.unwrap();

    assert_eq!(dump(&a), dump(&b));
    let (applied, _) = b.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(50)));
    let installed = b
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("b keeps the snapshot");
    assert_eq!(installed.meta, snapshot.meta);

    // The installed state survives a restart, and later applies build on it.
    drop(b);
    let (_, mut b) = reopen(b_dir.path()).await;
    assert_eq!(dump(&a), dump(&b));
    b.apply(vec![enqueue_entry(51, 1)]).await.unwrap();
    assert_eq!(
        machine::read_meta(&b.reader().view())
            .unwrap()
            .counts
            .queued,
        51
    );
}

#[tokio::test]
async fn a_corrupt_snapshot_is_refused_and_the_state_is_kept() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let (_, mut a) = open(a_dir.path(), &StoreOptions::default()).unwrap();
    let (_, mut b) = open(b_dir.path(), &StoreOptions::default()).unwrap();
    a.apply((1..=5).map(|i| enqueue_entry(i, 100)).collect::<Vec<_>>())
        .await
        .unwrap();
    b.apply(vec![enqueue_entry(1, 7)]).await.unwrap();
    let before = dump(&b);
    let snapshot = a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let mut bytes = Vec::new();
    a.get_current_snapshot()
        .await
        .unwrap()
        .unwrap()
        .snapshot
        .read_to_end(&mut bytes)
        .await
        .unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    let mut target = b.begin_receiving_snapshot().await.unwrap();
    target.write_all(&bytes).await.unwrap();
    target.flush().await.unwrap();
    assert!(b.install_snapshot(&snapshot.meta, target).await.is_err());
    assert_eq!(dump(&b), before);
}
