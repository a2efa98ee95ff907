//! The openraft conformance suite on the store, plus restarts, snapshots, and recovery from
//! what a power cut or a bad disk leaves behind.

use bytes::Bytes;
use hashq_raft::command::{Command, Request, Response, StoreLimits};
use hashq_raft::kv::KvRead;
use hashq_raft::{machine, Entry, LogId, NodeId, TypeConfig, WorkId};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader, RaftSnapshotBuilder, StorageError};
use tempfile::TempDir;

use super::*;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let opened = open(dir.path(), &StoreOptions::default()).expect("open store");
        Ok((dir, opened.log, opened.sm))
    }
}

#[test]
fn openraft_storage_conformance_suite() {
    Suite::test_all(Builder).expect("suite");
}

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

fn enqueue_entry(index: u64, payload_len: usize) -> Entry {
    entry_of(
        index,
        Request::Enqueue {
            iterations: index as u32,
            payload: Bytes::from(vec![index as u8; payload_len]),
            dedup: Some(hashq_raft::command::Dedup {
                key: format!("key-{index}"),
                ttl_ms: 60_000,
            }),
        },
    )
}

/// Entry `index`, of one request.
fn entry_of(index: u64, request: Request) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command {
            now: 1_000 + index,
            mono: index,
            limits: StoreLimits::UNLIMITED,
            requests: vec![request],
        }),
    }
}

/// A digest of the whole keyspace: (pairs, crc of all keys and values), so a mismatch does
/// not print megabytes.
fn dump(sm: &StateMachineStore) -> (usize, u32) {
    let view = sm.reader().view();
    let mut crc = 0u32;
    let mut n = 0;
    for pair in view.scan(&[0u8], &[0xffu8; 4], false) {
        let (k, v) = pair.unwrap();
        crc = fsio::crc_append(crc, &(k.len() as u32).to_le_bytes());
        crc = fsio::crc_append(crc, &k);
        crc = fsio::crc_append(crc, &(v.len() as u32).to_le_bytes());
        crc = fsio::crc_append(crc, &v);
        n += 1;
    }
    (n, crc)
}

/// Opens a store whose previous instance is still letting go of sled's lock.
async fn reopen(dir: &std::path::Path) -> Opened {
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
        let Opened {
            mut log, mut sm, ..
        } = open(dir.path(), &StoreOptions::default()).unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        let answers = sm.apply(entries[..15].to_vec()).await.unwrap();
        assert!(matches!(answers[0][0], Response::Enqueued { .. }));
        log.save_vote(&openraft::Vote::new(3, 2)).await.unwrap();
    }
    let Opened {
        mut log,
        mut sm,
        recovery,
    } = reopen(dir.path()).await;
    assert!(recovery.damage.is_none(), "{recovery:?}");
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
        let payload = sm.reader().payloads().read(&[item.payload]).unwrap();
        assert_eq!(payload, vec![Some(Bytes::from(vec![i as u8 + 1; 2048]))]);
    }
    assert_eq!(machine::read_meta(&view).unwrap().counts.queued, 15);
}

/// A store whose log holds entries `range` (one enqueue of `len` bytes each), all applied.
async fn filled(
    dir: &std::path::Path,
    range: std::ops::RangeInclusive<u64>,
    len: usize,
) -> (LogStore, StateMachineStore) {
    let Opened {
        mut log, mut sm, ..
    } = open(dir, &StoreOptions::default()).unwrap();
    let entries: Vec<Entry> = range.map(|i| enqueue_entry(i, len)).collect();
    log.blocking_append(entries.clone()).await.unwrap();
    sm.apply(entries).await.unwrap();
    (log, sm)
}

/// Writes `snapshot` to `to` as the network sends it: the file, then its payload section.
fn ship(snapshot: &openraft::storage::Snapshot<TypeConfig>, to: &std::path::Path) {
    let mut out = std::fs::read(&snapshot.snapshot.path).unwrap();
    snapshot
        .snapshot
        .payloads
        .as_ref()
        .expect("a payload section")
        .write_to(&mut out)
        .unwrap();
    std::fs::write(to, out).unwrap();
}

/// Every one of the `n` queued items' payload reads back (`len` bytes of its index).
fn assert_payloads(sm: &StateMachineStore, n: u64, len: usize) {
    let view = sm.reader().view();
    let refs: Vec<_> = (0..n)
        .map(|i| machine::item(&view, WorkId(i)).unwrap().unwrap().payload)
        .collect();
    let got = sm.reader().payloads().read(&refs).unwrap();
    for (i, p) in got.into_iter().enumerate() {
        assert_eq!(p, Some(Bytes::from(vec![i as u8 + 1; len])), "item {i}");
    }
}

/// Builds a snapshot of `sm` and returns the file it wrote.
async fn build(sm: &mut StateMachineStore) -> openraft::storage::Snapshot<TypeConfig> {
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_snapshot_installs_into_another_store_byte_for_byte() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let (_a_log, mut a) = filled(a_dir.path(), 1..=50, 10_000).await;
    let mut b = open(b_dir.path(), &StoreOptions::default()).unwrap().sm;
    // b has some older, different state that the install must replace entirely, in its
    // tree (and so among its resident records: `last_applied` is 1).
    b.apply(vec![enqueue_entry(1, 5)]).await.unwrap();
    b.shared.flush().unwrap();
    assert_eq!(b.applied_state().await.unwrap().0, Some(log_id(1)));

    let snapshot = build(&mut a).await;
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(50)));
    let current = a.get_current_snapshot().await.unwrap().expect("current");
    assert_eq!(current.meta, snapshot.meta);
    // The snapshot file holds no payload: 50 x 10 KB stayed in the log.
    let file_len = std::fs::metadata(&snapshot.snapshot.path).unwrap().len();
    assert!(file_len < 50_000, "snapshot of {file_len} bytes");

    // Ship it the way the node does: the file and its payload section land in b's snapshot
    // dir, then it installs.
    let target = b.begin_receiving_snapshot().await.unwrap();
    ship(&current, &target.path);
    snapshot::verify(&target.path).expect("what was shipped verifies");
    b.install_snapshot(&snapshot.meta, target).await.unwrap();

    assert_eq!(dump(&a), dump(&b));
    assert_payloads(&b, 50, 10_000);
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
    let mut b = reopen(b_dir.path()).await.sm;
    assert_eq!(dump(&a), dump(&b));
    assert_payloads(&b, 50, 10_000);

    // b's own snapshot carries the payloads from its pack on to a third store.
    let c_dir = tempfile::tempdir().unwrap();
    let mut c = open(c_dir.path(), &StoreOptions::default()).unwrap().sm;
    let from_b = build(&mut b).await;
    let target = c.begin_receiving_snapshot().await.unwrap();
    ship(&from_b, &target.path);
    c.install_snapshot(&from_b.meta, target).await.unwrap();
    assert_payloads(&c, 50, 10_000);
    assert_eq!(c.reader().payloads().packs().0, 1);

    // Once nothing references them, the pack goes.
    c.shared.payloads.set_sm_floor(None);
    c.shared.payloads.set_snapshot_floor(None);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_dir(Layout::new(c_dir.path()).pack_dir())
        .unwrap()
        .count()
        > 0
    {
        assert!(std::time::Instant::now() < deadline, "the pack stayed");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    b.apply(vec![enqueue_entry(51, 1)]).await.unwrap();
    assert_eq!(
        machine::read_meta(&b.reader().view())
            .unwrap()
            .counts
            .queued,
        51
    );
}

/// A snapshot of a store of five items, and another store `b` of one item, to offer it to.
async fn a_snapshot_and_another_store() -> (
    [TempDir; 2],
    openraft::storage::Snapshot<TypeConfig>,
    StateMachineStore,
) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut a = open(dirs[0].path(), &StoreOptions::default()).unwrap().sm;
    let mut b = open(dirs[1].path(), &StoreOptions::default()).unwrap().sm;
    a.apply((1..=5).map(|i| enqueue_entry(i, 100)).collect::<Vec<_>>())
        .await
        .unwrap();
    b.apply(vec![enqueue_entry(1, 7)]).await.unwrap();
    (dirs, build(&mut a).await, b)
}

/// Offers `bytes` to `b` as the snapshot `meta` names: it is refused, and `b` is as it was.
async fn refused_and_kept(
    b: &mut StateMachineStore,
    meta: &hashq_raft::SnapshotMeta,
    bytes: &[u8],
) {
    let before = (dump(b), queue_keys(b));
    let target = b.begin_receiving_snapshot().await.unwrap();
    std::fs::write(&target.path, bytes).unwrap();
    assert!(b.install_snapshot(meta, target).await.is_err());
    assert_eq!((dump(b), queue_keys(b)), before);
}

#[tokio::test]
async fn a_corrupt_snapshot_is_refused_and_the_state_is_kept() {
    let (_dirs, snapshot, mut b) = a_snapshot_and_another_store().await;
    let mut bytes = std::fs::read(&snapshot.snapshot.path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    let damaged = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(damaged.path(), &bytes).unwrap();
    assert!(snapshot::verify(damaged.path()).is_err());
    refused_and_kept(&mut b, &snapshot.meta, &bytes).await;
}

#[tokio::test]
async fn a_snapshot_with_a_malformed_queue_record_is_refused_and_the_state_is_kept() {
    let (_dirs, snapshot, mut b) = a_snapshot_and_another_store().await;
    // The same records, one queue record given a value, written as a well-formed file.
    let mut pairs = Vec::new();
    let info = snapshot::read(&snapshot.snapshot.path, |k, v| {
        pairs.push((k, v));
        Ok(())
    })
    .unwrap();
    let queued = pairs
        .iter_mut()
        .find(|(k, _)| k.first() == Some(&hashq_raft::keys::QUEUE))
        .expect("a queue record in the snapshot");
    queued.1 = b"x".to_vec();
    let elsewhere = tempfile::tempdir().unwrap();
    let path = snapshot::write(
        elsewhere.path(),
        &snapshot.meta,
        info.payload_floor,
        pairs.into_iter().map(Ok),
    )
    .unwrap();
    refused_and_kept(&mut b, &snapshot.meta, &std::fs::read(path).unwrap()).await;
}

#[tokio::test]
async fn a_snapshot_whose_payloads_are_damaged_or_missing_is_refused() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let (_log, mut a) = filled(a_dir.path(), 1..=5, 1000).await;
    let mut b = open(b_dir.path(), &StoreOptions::default()).unwrap().sm;
    b.apply(vec![enqueue_entry(1, 7)]).await.unwrap();
    let before = dump(&b);
    let snapshot = build(&mut a).await;
    let file_len = std::fs::metadata(&snapshot.snapshot.path).unwrap().len() as usize;
    let target = b.begin_receiving_snapshot().await.unwrap();
    ship(&snapshot, &target.path);
    let good = std::fs::read(&target.path).unwrap();
    // A flipped payload byte; a section cut short; a section of another snapshot's
    // payloads (one missing).
    let mut flipped = good.clone();
    flipped[file_len + 100] ^= 0x20;
    let mut short_section = SectionWriterForTest::new();
    for i in 1..=4u64 {
        short_section.push(i, 1000);
    }
    let missing = [&good[..file_len], &short_section.finish()].concat();
    for bad in [flipped, good[..good.len() - 10].to_vec(), missing] {
        std::fs::write(&target.path, &bad).unwrap();
        assert!(snapshot::verify(&target.path).is_err());
        let target = b.begin_receiving_snapshot().await.unwrap();
        std::fs::write(&target.path, &bad).unwrap();
        assert!(b.install_snapshot(&snapshot.meta, target).await.is_err());
        assert_eq!(dump(&b), before);
    }
}

/// Writes a payload section of entries as [`enqueue_entry`] makes them.
struct SectionWriterForTest(pack::SectionWriter<Vec<u8>>);

impl SectionWriterForTest {
    fn new() -> Self {
        SectionWriterForTest(pack::SectionWriter::new(Vec::new()).unwrap())
    }
    fn push(&mut self, index: u64, len: usize) {
        let at = hashq_raft::types::PayloadRef {
            term: 1,
            index,
            ordinal: 0,
        };
        self.0.push(&at, &vec![index as u8; len]).unwrap();
    }
    fn finish(self) -> Vec<u8> {
        self.0.finish().unwrap()
    }
}

#[tokio::test]
async fn a_corrupt_current_snapshot_is_never_served_a_new_one_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(dir.path(), &StoreOptions::default()).unwrap().sm;
    sm.apply((1..=5).map(|i| enqueue_entry(i, 100)).collect::<Vec<_>>())
        .await
        .unwrap();
    let first = build(&mut sm).await;
    let mut bytes = std::fs::read(&first.snapshot.path).unwrap();
    let at = bytes.len() - 20;
    bytes[at] ^= 0x01;
    std::fs::write(&first.snapshot.path, &bytes).unwrap();
    let served = sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("a snapshot");
    assert_ne!(served.meta.snapshot_id, first.meta.snapshot_id);
    assert_eq!(served.meta.last_log_id, first.meta.last_log_id);
    snapshot::verify(&served.snapshot.path).expect("the new one verifies");
    assert!(
        std::fs::read_dir(Layout::new(dir.path()).quarantine_dir())
            .unwrap()
            .count()
            > 0,
        "the corrupt one was set aside"
    );
}

#[tokio::test]
async fn a_state_machine_behind_the_purge_point_is_rebuilt_from_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<Entry> = (1..=30).map(|i| enqueue_entry(i, 100)).collect();
    let want;
    {
        let Opened {
            mut log, mut sm, ..
        } = open(dir.path(), &StoreOptions::default()).unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        sm.apply(entries[..20].to_vec()).await.unwrap();
        build(&mut sm).await;
        want = dump(&sm);
        log.purge(log_id(18)).await.unwrap();
    }
    // sled comes back empty (its config file was never synced, say).
    let layout = Layout::new(dir.path());
    std::fs::remove_dir_all(layout.sm_dir()).unwrap();
    std::fs::create_dir(layout.sm_dir()).unwrap();
    let Opened {
        mut log,
        mut sm,
        recovery,
    } = reopen(dir.path()).await;
    assert!(recovery.sm.restored_from.is_some(), "{recovery:?}");
    assert!(recovery.damage.is_none());
    assert_eq!(dump(&sm), want);
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(20)));
    // openraft then applies the rest from the log.
    let rest = log.try_get_log_entries(21..=30).await.unwrap();
    assert_eq!(rest.len(), 10);
    sm.apply(rest).await.unwrap();
    assert_eq!(
        machine::read_meta(&sm.reader().view())
            .unwrap()
            .counts
            .queued,
        30
    );
}

#[tokio::test]
async fn damage_in_the_log_sets_it_aside_keeps_the_vote_and_asks_for_repair() {
    let dir = tempfile::tempdir().unwrap();
    {
        let Opened {
            mut log, mut sm, ..
        } = open(
            dir.path(),
            &StoreOptions {
                log: LogOptions {
                    segment_bytes: 4096,
                    cache_bytes: 0,
                },
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let entries: Vec<Entry> = (1..=40).map(|i| enqueue_entry(i, 300)).collect();
        log.blocking_append(entries.clone()).await.unwrap();
        sm.apply(entries).await.unwrap();
        log.save_vote(&openraft::Vote::new(7, 3)).await.unwrap();
        log.save_committed(Some(log_id(40))).await.unwrap();
    }
    let layout = Layout::new(dir.path());
    let mut segments: Vec<_> = std::fs::read_dir(layout.log_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    let mut bytes = std::fs::read(&segments[1]).unwrap();
    bytes[60] ^= 0x10;
    std::fs::write(&segments[1], &bytes).unwrap();

    let Opened {
        mut log,
        mut sm,
        recovery,
    } = reopen(dir.path()).await;
    assert!(recovery.damage.is_some(), "{recovery:?}");
    assert_eq!(recovery.repair_until, Some(40));
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(openraft::Vote::new(7, 3))
    );
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, None);
    assert_eq!(sm.applied_state().await.unwrap().0, None);
    let quarantined = std::fs::read_dir(layout.quarantine_dir()).unwrap().count();
    assert!(quarantined >= 2, "log and state machine set aside");
    // A restart before the repair is done still knows it is not done; once the node says
    // it is, it is over.
    drop((log, sm));
    let again = reopen(dir.path()).await;
    assert!(again.recovery.damage.is_none());
    assert_eq!(again.recovery.repair_until, Some(40));
    repaired(dir.path()).unwrap();
    drop(again);
    let after = reopen(dir.path()).await;
    assert_eq!(after.recovery.repair_until, None);
}

/// An entry holding a no-op and then a batch of `parts` items, part `k` of `len + k` bytes
/// of `k`.
fn batch_entry(index: u64, parts: usize, len: usize) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command {
            now: 1_000 + index,
            mono: index,
            limits: StoreLimits::UNLIMITED,
            requests: vec![
                Request::Noop,
                Request::EnqueueBatch {
                    items: (0..parts)
                        .map(|k| hashq_raft::command::BatchItem {
                            iterations: 1,
                            // Every priority: their queues and records travel too.
                            priority: (k % 10) as u8,
                            payload: Bytes::from(vec![k as u8; len + k]),
                        })
                        .collect(),
                    dedup: hashq_raft::command::Dedup {
                        key: format!("batch-{index}"),
                        ttl_ms: 60_000,
                    },
                },
            ],
        }),
    }
}

/// Every payload of the batch `batch_entry(_, parts, len)` made reads back from `sm`.
fn assert_batch_payloads(sm: &StateMachineStore, parts: usize, len: usize) {
    let view = sm.reader().view();
    let refs: Vec<_> = (0..parts)
        .map(|k| {
            machine::item(&view, WorkId(k as u64))
                .unwrap()
                .unwrap()
                .payload
        })
        .collect();
    let got = sm.reader().payloads().read(&refs).unwrap();
    for (k, p) in got.into_iter().enumerate() {
        assert_eq!(p, Some(Bytes::from(vec![k as u8; len + k])), "part {k}");
    }
}

#[tokio::test]
async fn a_batch_s_payloads_read_back_from_the_log_and_travel_in_snapshots() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let Opened {
        mut log, mut sm, ..
    } = open(a_dir.path(), &StoreOptions::default()).unwrap();
    let entries = vec![batch_entry(1, 300, 10)];
    log.blocking_append(entries.clone()).await.unwrap();
    sm.apply(entries).await.unwrap();
    // From the log entry that carried them: part k sits at its own ordinal.
    assert_batch_payloads(&sm, 300, 10);
    // And from the pack a snapshot brings to another store.
    let snapshot = build(&mut sm).await;
    let mut b = open(b_dir.path(), &StoreOptions::default()).unwrap().sm;
    let target = b.begin_receiving_snapshot().await.unwrap();
    ship(&snapshot, &target.path);
    let before_install = b.reader().view();
    b.install_snapshot(&snapshot.meta, target).await.unwrap();
    assert_eq!(dump(&sm), dump(&b));
    assert_batch_payloads(&b, 300, 10);
    // The queues came with it (items of every priority); a view taken before the install
    // still reads the state it was taken of, queues included.
    assert_eq!(queue_keys(&b), queue_keys(&sm));
    assert_eq!(queue_keys(&b).len(), 300);
    assert!(queue_keys_in(&before_install).is_empty());
    drop(before_install);
    drop(b);
    let b = reopen(b_dir.path()).await.sm;
    assert_batch_payloads(&b, 300, 10);
}

/// The keys of both queue tables, as the store's readers see them.
fn queue_keys(sm: &StateMachineStore) -> Vec<Vec<u8>> {
    queue_keys_in(&sm.reader().view())
}

/// The keys of both queue tables in `view`.
fn queue_keys_in(view: &SledKv) -> Vec<Vec<u8>> {
    [hashq_raft::keys::QUEUE, hashq_raft::keys::PRIORITY_QUEUE]
        .into_iter()
        .flat_map(|table| {
            let (start, end) = hashq_raft::keys::table(table);
            view.scan(&start, &end, false)
                .map(|pair| pair.unwrap().0)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// How many queue records sled itself holds.
fn queue_records_in_sled(sm: &StateMachineStore) -> usize {
    [hashq_raft::keys::QUEUE, hashq_raft::keys::PRIORITY_QUEUE]
        .into_iter()
        .map(|t| records_in_sled(sm, t))
        .sum()
}

#[tokio::test]
async fn the_queues_live_in_memory_and_come_back_from_the_item_records() {
    let dir = tempfile::tempdir().unwrap();
    let expected = {
        let Opened {
            mut log, mut sm, ..
        } = open(dir.path(), &StoreOptions::default()).unwrap();
        // 30 items of every priority, then three of them cancelled (out of their queues).
        let mut cancel = batch_entry(2, 0, 0);
        if let EntryPayload::Normal(command) = &mut cancel.payload {
            command.requests = [3, 4, 12]
                .map(|id| Request::Cancel { id: WorkId(id) })
                .to_vec();
        }
        let entries = vec![batch_entry(1, 30, 10), cancel];
        log.blocking_append(entries.clone()).await.unwrap();
        sm.apply(entries).await.unwrap();
        sm.shared.flush().unwrap();
        let keys = queue_keys(&sm);
        assert_eq!(keys.len(), 27, "30 enqueued, 3 cancelled");
        assert_eq!(
            queue_records_in_sled(&sm),
            0,
            "queue records went into sled"
        );
        let view = sm.reader().view();
        assert_eq!(view.get(&keys[0]).unwrap(), Some(Vec::new()));
        assert_eq!(
            view.get(&hashq_raft::keys::queue_of(3, WorkId(3))).unwrap(),
            None
        );
        (keys, dump(&sm))
    };
    // Rebuilt from the item records at open: the same queues, the same keyspace.
    let sm = reopen(dir.path()).await.sm;
    assert_eq!((queue_keys(&sm), dump(&sm)), expected);
    // A format-3 store kept its queue records in sled. Put one there that says something the
    // items do not (item 3 is cancelled) and one that agrees, and mark the dir format 3.
    let tree = sm.shared.tree();
    tree.insert(hashq_raft::keys::queue_of(3, WorkId(3)), Vec::new())
        .unwrap();
    tree.insert(expected.0[0].clone(), Vec::new()).unwrap();
    drop(tree);
    drop(sm);
    let layout = format::Layout::new(dir.path());
    std::fs::write(layout.format_file(), "hashq-data 3\n").unwrap();
    let sm = reopen(dir.path()).await.sm;
    assert_eq!(format::detect(&layout).unwrap(), format::Found::Current);
    assert_eq!(
        queue_records_in_sled(&sm),
        0,
        "format 3's queue records stay in sled"
    );
    assert_eq!((queue_keys(&sm), dump(&sm)), expected);
}

/// How many records sled itself holds under `tag`.
fn records_in_sled(sm: &StateMachineStore, tag: u8) -> usize {
    sm.shared.tree().range(vec![tag]..vec![tag + 1]).count()
}

#[tokio::test]
async fn item_records_reach_sled_in_pages_and_a_format_4_dir_is_paged_at_open() {
    use hashq_raft::keys::ITEM;
    let (dir, mut sm, entries) = unflushing_with_enqueues(300).await;
    sm.apply(entries).await.unwrap();
    sm.shared.flush().unwrap();
    // Items 0 to 299: five pages, not 300 records.
    assert_eq!(records_in_sled(&sm, ITEM), 0, "an item under its own key");
    assert_eq!(records_in_sled(&sm, sm::paged::PAGE), 5);
    let view = sm.reader().view();
    let (start, end) = hashq_raft::keys::table(ITEM);
    let items: Vec<_> = view.scan(&start, &end, false).map(|r| r.unwrap()).collect();
    assert_eq!(items.len(), 300);
    assert_eq!(items[299].0, hashq_raft::keys::item(WorkId(299)));
    let expected = dump(&sm);

    // The same state as format 4 kept it: each item under its own key.
    let tree = sm.shared.tree();
    for (key, record) in &items {
        tree.insert(key, record.as_slice()).unwrap();
    }
    for page in tree
        .range(vec![sm::paged::PAGE]..vec![sm::paged::PAGE + 1])
        .keys()
    {
        tree.remove(page.unwrap()).unwrap();
    }
    assert_eq!(records_in_sled(&sm, ITEM), 300);
    assert_eq!(records_in_sled(&sm, sm::paged::PAGE), 0);
    drop((tree, view, sm));
    let layout = format::Layout::new(dir.path());
    std::fs::write(layout.format_file(), "hashq-data 4\n").unwrap();
    let sm = reopen(dir.path()).await.sm;
    assert_eq!(format::detect(&layout).unwrap(), format::Found::Current);
    assert_eq!(
        std::fs::read_to_string(layout.format_file()).unwrap(),
        "hashq-data 5\n"
    );
    assert_eq!(
        records_in_sled(&sm, ITEM),
        0,
        "format 4's items stay where they were"
    );
    assert_eq!(records_in_sled(&sm, sm::paged::PAGE), 5);
    assert_eq!(dump(&sm), expected);
}

/// A store whose flusher never runs on its own (its interval is an hour), with `n` enqueues
/// of 64 bytes logged (entries 1 to `n`) and not applied.
async fn unflushing_with_enqueues(n: u64) -> (TempDir, StateMachineStore, Vec<Entry>) {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        flush_every: std::time::Duration::from_secs(3600),
        ..StoreOptions::default()
    };
    let Opened { mut log, sm, .. } = open(dir.path(), &options).unwrap();
    let entries: Vec<Entry> = (1..=n).map(|i| enqueue_entry(i, 64)).collect();
    log.blocking_append(entries.clone()).await.unwrap();
    (dir, sm, entries)
}

#[tokio::test]
async fn applied_writes_are_read_at_once_and_reach_sled_in_one_batch_later() {
    let (_dir, mut sm, entries) = unflushing_with_enqueues(5).await;
    // No flush is due for an hour: the writes wait above the tree.
    sm.apply(entries[..3].to_vec()).await.unwrap();
    sm.apply(entries[3..].to_vec()).await.unwrap();
    let tree = SledKv::bare(sm.shared.tree());
    let view = sm.reader().view();
    assert_eq!(machine::item(&tree, WorkId(0)).unwrap(), None);
    assert_eq!(sm::read_last_applied(&tree).unwrap(), None);
    assert_eq!(sm::read_last_applied(&view).unwrap(), Some(log_id(5)));
    assert_eq!(machine::read_meta(&view).unwrap().counts.queued, 5);
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(5)));
    // Scans merge both, in either direction.
    let (start, end) = hashq_raft::keys::table(hashq_raft::keys::ITEM);
    let ids = |reverse| -> Vec<Vec<u8>> {
        view.scan(&start, &end, reverse)
            .map(|r| r.unwrap().0)
            .collect()
    };
    assert_eq!(ids(false).len(), 5);
    assert_eq!(ids(true), ids(false).into_iter().rev().collect::<Vec<_>>());
    let before = dump(&sm);

    // A snapshot dumps the tree, so everything applied goes into it first.
    build(&mut sm).await;
    assert_eq!(sm::read_last_applied(&tree).unwrap(), Some(log_id(5)));
    assert!(machine::item(&tree, WorkId(4)).unwrap().is_some());
    assert_eq!(dump(&sm), before, "the flush changes nothing a reader sees");
}

#[test]
fn the_unflushed_writes_shadow_the_tree_in_gets_and_scans() {
    let dir = tempfile::tempdir().unwrap();
    let db = sm::open_sled(dir.path(), 1 << 20).unwrap();
    let tree = db.open_tree("t").unwrap();
    for k in [b"a1", b"a3", b"a5", b"b1"] {
        tree.insert(k, b"tree").unwrap();
    }
    let kv = SledKv::bare(tree);
    {
        let w = &mut kv.unflushed.write().unwrap().active;
        w.insert(b"a2".to_vec(), Some(b"new".to_vec()));
        w.insert(b"a3".to_vec(), None);
        w.insert(b"a5".to_vec(), Some(b"over".to_vec()));
    }
    let pairs = |reverse| -> Vec<(Vec<u8>, Vec<u8>)> {
        kv.scan(b"a", b"b", reverse).map(|r| r.unwrap()).collect()
    };
    let forward = vec![
        (b"a1".to_vec(), b"tree".to_vec()),
        (b"a2".to_vec(), b"new".to_vec()),
        (b"a5".to_vec(), b"over".to_vec()),
    ];
    assert_eq!(pairs(false), forward);
    assert_eq!(pairs(true), forward.into_iter().rev().collect::<Vec<_>>());
    assert_eq!(kv.get(b"a3").unwrap(), None);
    assert_eq!(kv.get(b"a5").unwrap(), Some(b"over".to_vec()));
    assert_eq!(kv.get(b"b1").unwrap(), Some(b"tree".to_vec()));
}

#[test]
fn the_keys_every_apply_reads_are_answered_from_memory_as_the_tree_holds_them() {
    use hashq_raft::keys::{CLUSTER_VERSION, LAST_APPLIED, MEMBERSHIP, META};
    let dir = tempfile::tempdir().unwrap();
    let db = sm::open_sled(dir.path(), 1 << 20).unwrap();
    let tree = db.open_tree("t").unwrap();
    tree.insert(CLUSTER_VERSION, &5u32.to_be_bytes()).unwrap();
    let layered = sm::Layered::new(tree.clone(), Default::default());
    let view = layered.view();
    let get = |key: &[u8]| view.get(key).unwrap();

    // Known from the open, present or absent: a change made behind the layers' back (only
    // a flush or a replaced tree writes the tree) shows that the read never reaches it,
    // where any other key's read does.
    tree.insert(CLUSTER_VERSION, &6u32.to_be_bytes()).unwrap();
    tree.insert(META, b"behind").unwrap();
    tree.insert(b"other", b"tree").unwrap();
    assert_eq!(get(CLUSTER_VERSION), Some(5u32.to_be_bytes().to_vec()));
    assert_eq!(get(META), None);
    assert_eq!(get(b"other"), Some(b"tree".to_vec()));
    // A view of the tree alone reads it.
    assert_eq!(
        SledKv::bare(tree.clone()).get(CLUSTER_VERSION).unwrap(),
        Some(6u32.to_be_bytes().to_vec())
    );

    // The tree as the layers know it again.
    tree.insert(CLUSTER_VERSION, &5u32.to_be_bytes()).unwrap();
    tree.remove(META).unwrap();

    // A flush keeps what it writes, puts and deletes. Each round, every resident key reads
    // as the tree holds it.
    let mut seed = 3;
    for round in 0..40u64 {
        let mut writes = sm::kv::Writes::new();
        for key in [META, LAST_APPLIED, MEMBERSHIP, CLUSTER_VERSION] {
            match lcg(&mut seed) % 3 {
                0 => {}
                1 => {
                    writes.insert(key.to_vec(), None);
                }
                _ => {
                    writes.insert(key.to_vec(), Some(round.to_be_bytes().to_vec()));
                }
            }
        }
        layered.unflushed.write().unwrap().active = writes.clone();
        // Before the flush the layer answers.
        for (key, value) in &writes {
            assert_eq!(&get(key), value, "round {round}, before the flush");
        }
        layered.flush().unwrap();
        for key in [META, LAST_APPLIED, MEMBERSHIP, CLUSTER_VERSION] {
            assert_eq!(
                get(key),
                tree.get(key).unwrap().map(|v| v.to_vec()),
                "round {round}: {key:02x?}"
            );
        }
    }
    // A tree opened again is read again.
    tree.insert(META, b"reopened").unwrap();
    let again = sm::Layered::new(tree.clone(), Default::default());
    assert_eq!(again.view().get(META).unwrap(), Some(b"reopened".to_vec()));
}

/// The enqueue of slot `slot` of the proposer batch keyed `key`, as entry `index`.
fn batch_slot_entry(index: u64, key: &str, slot: u32) -> Entry {
    entry_of(
        index,
        Request::EnqueueInBatch {
            iterations: 3,
            payload: Bytes::from(vec![index as u8; 100]),
            batch: hashq_raft::command::BatchSlot {
                key: key.to_owned(),
                slot,
                ttl_ms: 60_000,
            },
        },
    )
}

/// Appends and applies `entry`; the id it enqueued and whether it was a retry's.
async fn apply_logged(
    log: &mut LogStore,
    sm: &mut StateMachineStore,
    entry: Entry,
) -> (WorkId, bool) {
    log.blocking_append(vec![entry.clone()]).await.unwrap();
    enqueued(sm, entry).await
}

async fn enqueued(sm: &mut StateMachineStore, entry: Entry) -> (WorkId, bool) {
    match &sm.apply(vec![entry]).await.unwrap()[0][0] {
        Response::Enqueued { id, duplicate } => (*id, *duplicate),
        other => panic!("not an enqueue's answer: {other:?}"),
    }
}

/// The node keys' index (`kv::Layers`) answers that a key is new only while the tree does
/// not hold it: a retried slot of a proposer batch is known whether its record is in the
/// layers, flushed into the tree, read again by a restart, or came with a snapshot.
#[tokio::test]
async fn a_retried_batch_slot_is_known_after_flushes_restarts_and_installs() {
    let key = |nonce| hashq_raft::keys::NodeKey { node: 2, nonce }.to_string();
    let (first, second) = (key(0x5eed), key(7));
    let a_dir = tempfile::tempdir().unwrap();
    let Opened {
        mut log, mut sm, ..
    } = open(a_dir.path(), &StoreOptions::default()).unwrap();
    let (one, new) = apply_logged(&mut log, &mut sm, batch_slot_entry(1, &first, 0)).await;
    assert!(!new);
    // In the layers.
    let retry = apply_logged(&mut log, &mut sm, batch_slot_entry(2, &first, 0)).await;
    assert_eq!(retry, (one, true));
    let (two, _) = apply_logged(&mut log, &mut sm, batch_slot_entry(3, &first, 1)).await;
    assert_ne!(one, two);
    // In the tree, known by the flush that put it there.
    sm.shared.flush().unwrap();
    let retry = apply_logged(&mut log, &mut sm, batch_slot_entry(4, &first, 0)).await;
    assert_eq!(retry, (one, true));
    let (three, new) = apply_logged(&mut log, &mut sm, batch_slot_entry(5, &second, 0)).await;
    assert!(!new && three != two);
    sm.shared.flush().unwrap();
    drop((log, sm));

    // Read from the tree by the next open.
    let Opened {
        mut log, mut sm, ..
    } = reopen(a_dir.path()).await;
    let retry = apply_logged(&mut log, &mut sm, batch_slot_entry(6, &first, 1)).await;
    assert_eq!(retry, (two, true));
    let retry = apply_logged(&mut log, &mut sm, batch_slot_entry(7, &second, 0)).await;
    assert_eq!(retry, (three, true));

    // Into a store that held other node keys: the install's tree is the one asked.
    let snapshot = build(&mut sm).await;
    let current = sm.get_current_snapshot().await.unwrap().expect("current");
    let b_dir = tempfile::tempdir().unwrap();
    let mut b = open(b_dir.path(), &StoreOptions::default()).unwrap().sm;
    let theirs = key(0xb);
    enqueued(&mut b, batch_slot_entry(1, &theirs, 0)).await;
    b.shared.flush().unwrap();
    let target = b.begin_receiving_snapshot().await.unwrap();
    ship(&current, &target.path);
    b.install_snapshot(&snapshot.meta, target).await.unwrap();
    assert_eq!(
        enqueued(&mut b, batch_slot_entry(8, &first, 0)).await,
        (one, true)
    );
    assert_eq!(
        enqueued(&mut b, batch_slot_entry(9, &second, 0)).await,
        (three, true)
    );
    let (_, new) = enqueued(&mut b, batch_slot_entry(10, &theirs, 0)).await;
    assert!(!new, "a key of b's old state is not in the installed one");
}

#[test]
fn node_keys_the_tree_does_not_hold_are_answered_without_reading_it() {
    use hashq_raft::keys::{idempotency, NodeKey, ENQUEUE_KEY, TAKE_KEY};
    let key = |table, nonce| idempotency(table, &NodeKey { node: 3, nonce }.to_string());
    let dir = tempfile::tempdir().unwrap();
    let db = sm::open_sled(dir.path(), 1 << 20).unwrap();
    let tree = db.open_tree("t").unwrap();
    tree.insert(key(ENQUEUE_KEY, 1), b"held".as_slice())
        .unwrap();
    let layered = sm::Layered::new(tree.clone(), Default::default());
    let view = layered.view();
    let get = |key: &[u8]| view.get(key).unwrap();
    assert_eq!(get(&key(ENQUEUE_KEY, 1)), Some(b"held".to_vec()));
    assert_eq!(get(&key(TAKE_KEY, 1)), None);

    // A node key put behind the layers' back (only a flush or a replaced tree writes the
    // tree) is not read: the index says the tree does not hold it. Client keys and other
    // spellings of a node key are read from the tree.
    let behind = key(TAKE_KEY, 2);
    let client = idempotency(ENQUEUE_KEY, "c:enqueue:n3");
    let spelled = idempotency(ENQUEUE_KEY, &format!("n03:{:032x}", 2));
    for k in [&behind, &client, &spelled] {
        tree.insert(k, b"tree".as_slice()).unwrap();
    }
    assert_eq!(get(&behind), None);
    assert_eq!(get(&client), Some(b"tree".to_vec()));
    assert_eq!(get(&spelled), Some(b"tree".to_vec()));
    // A view of the tree alone reads it.
    assert_eq!(
        SledKv::bare(tree.clone()).get(&behind).unwrap(),
        Some(b"tree".to_vec())
    );
    tree.remove(&behind).unwrap();

    // Puts and deletes, each round flushed: before the flush the layer answers, after it
    // every node key reads as the tree holds it.
    let all: Vec<Vec<u8>> = (0..12)
        .flat_map(|n| [key(ENQUEUE_KEY, n), key(TAKE_KEY, n)])
        .collect();
    let mut seed = 11;
    for round in 0..60u64 {
        let mut writes = sm::kv::Writes::new();
        for k in &all {
            match lcg(&mut seed) % 4 {
                0 => {
                    writes.insert(k.clone(), None);
                }
                1 => {
                    writes.insert(k.clone(), Some(round.to_be_bytes().to_vec()));
                }
                _ => {}
            }
        }
        layered.unflushed.write().unwrap().active = writes.clone();
        for (k, value) in &writes {
            assert_eq!(&get(k), value, "round {round}, before the flush");
        }
        layered.flush().unwrap();
        for k in &all {
            assert_eq!(
                get(k),
                tree.get(k).unwrap().map(|v| v.to_vec()),
                "round {round}: {}",
                String::from_utf8_lossy(k)
            );
        }
    }
    // A key a flush deleted is known absent again: put behind the layers' back, it is not
    // read.
    let deleted: Vec<&Vec<u8>> = all
        .iter()
        .filter(|k| tree.get(k).unwrap().is_none())
        .collect();
    assert!(deleted.len() > 4, "{} deleted", deleted.len());
    for k in deleted {
        tree.insert(k, b"behind".as_slice()).unwrap();
        assert_eq!(get(k), None, "{}", String::from_utf8_lossy(k));
    }
    // A tree opened again is read again.
    tree.insert(key(TAKE_KEY, 99), b"reopened".as_slice())
        .unwrap();
    let again = sm::Layered::new(tree.clone(), Default::default());
    assert_eq!(
        again.view().get(&key(TAKE_KEY, 99)).unwrap(),
        Some(b"reopened".to_vec())
    );
}

/// A deterministic stream of numbers for the scan tests (no RNG crate needed).
fn lcg(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

type Model = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;

/// Random puts and deletes over `keys` keys, applied to `model` as they are made.
/// One of `keys` item records (kept in pages of 64 by the tree) or one of `keys` records of
/// a table stored key by key (`k`): the two tables [`SCANNED`] covers.
fn random_key(seed: &mut u64, keys: u64) -> Vec<u8> {
    let n = lcg(seed) % keys;
    if lcg(seed).is_multiple_of(2) {
        hashq_raft::keys::item(WorkId(n))
    } else {
        format!("k{n:04}").into_bytes()
    }
}

/// The range of [`random_key`]'s keys: the item table to the `k` table.
const SCANNED: (&[u8], &[u8]) = (b"i", b"l");

fn random_writes(seed: &mut u64, keys: u64, count: usize, model: &mut Model) -> sm::kv::Writes {
    let mut writes = sm::kv::Writes::new();
    for _ in 0..count {
        let key = random_key(seed, keys);
        if lcg(seed).is_multiple_of(3) {
            model.remove(&key);
            writes.insert(key, None);
        } else {
            let value = format!("v{}", lcg(seed)).into_bytes();
            model.insert(key.clone(), value.clone());
            writes.insert(key, Some(value));
        }
    }
    writes
}

/// Asserts that a scan read what the model holds (without printing thousands of pairs).
fn assert_scan(got: &[(Vec<u8>, Vec<u8>)], expected: &[(Vec<u8>, Vec<u8>)], what: &str) {
    let first_difference = got.iter().zip(expected).position(|(a, b)| a != b);
    assert!(
        got == expected,
        "{what}: read {} pairs, expected {}, first difference at {first_difference:?}",
        got.len(),
        expected.len()
    );
}

fn expect_range(model: &Model, start: &[u8], end: &[u8], reverse: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let pairs = model
        .range::<[u8], _>((
            std::ops::Bound::Included(start),
            std::ops::Bound::Excluded(end),
        ))
        .map(|(k, v)| (k.clone(), v.clone()));
    if reverse {
        pairs.rev().collect()
    } else {
        pairs.collect()
    }
}

#[test]
fn scans_over_many_unflushed_writes_merge_every_chunk_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let db = sm::open_sled(dir.path(), 1 << 20).unwrap();
    let mut seed = 7;
    for round in 0..20 {
        let tree = db.open_tree(format!("t{round}")).unwrap();
        let mut model = Model::new();
        let keys = 50 + lcg(&mut seed) % 2_000;
        let mut writer = sm::paged::Writer::new(&tree);
        for (k, v) in random_writes(&mut seed, keys, 3_000, &mut model) {
            writer.write(&k, v.as_deref()).unwrap();
        }
        writer.apply().unwrap();
        let flushing = random_writes(&mut seed, keys, 1_500, &mut model);
        let active = random_writes(&mut seed, keys, 1_500, &mut model);
        let kv = SledKv::bare(tree);
        {
            let mut layers = kv.unflushed.write().unwrap();
            layers.flushing = std::sync::Arc::new(flushing);
            layers.active = active;
        }
        for _ in 0..10 {
            let a = random_key(&mut seed, keys + 10);
            let b = random_key(&mut seed, keys + 10);
            let (start, end) = if a < b { (a, b) } else { (b, a) };
            for reverse in [false, true] {
                let got: Vec<_> = kv.scan(&start, &end, reverse).map(|r| r.unwrap()).collect();
                assert_scan(
                    &got,
                    &expect_range(&model, &start, &end, reverse),
                    &format!("round {round}"),
                );
            }
        }
        let all = |reverse| {
            kv.scan(SCANNED.0, SCANNED.1, reverse)
                .map(|r| r.unwrap())
                .collect::<Vec<_>>()
        };
        assert_scan(
            &all(false),
            &expect_range(&model, SCANNED.0, SCANNED.1, false),
            "forward",
        );
        assert_scan(
            &all(true),
            &expect_range(&model, SCANNED.0, SCANNED.1, true),
            "reverse",
        );
    }
}

/// Records of the tables on either side of the queue tables (`p`, `r`, `t`, `v`), made
/// into writes and into the model.
fn writes_around_the_queues(seed: &mut u64, model: &mut Model, n: usize) -> sm::kv::Writes {
    let mut writes = sm::kv::Writes::new();
    for _ in 0..n {
        let mut key = vec![[b'p', b'r', b't', b'v'][(lcg(seed) % 4) as usize]];
        key.extend_from_slice(&(lcg(seed) % 500).to_be_bytes());
        let value = format!("v{}", lcg(seed)).into_bytes();
        model.insert(key.clone(), value.clone());
        writes.insert(key, Some(value));
    }
    writes
}

#[test]
fn scans_across_the_queue_tables_read_every_source_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let db = sm::open_sled(dir.path(), 1 << 20).unwrap();
    let mut seed = 11;
    let mut model = Model::new();
    let tree = db.open_tree("t").unwrap();
    for (k, v) in writes_around_the_queues(&mut seed, &mut model, 800) {
        tree.insert(k, v.unwrap()).unwrap();
    }
    let kv = SledKv::bare(tree);
    {
        let mut layers = kv.unflushed.write().unwrap();
        layers.flushing = std::sync::Arc::new(writes_around_the_queues(&mut seed, &mut model, 300));
        layers.active = writes_around_the_queues(&mut seed, &mut model, 300);
    }
    // 3,000 writes of queued keys over three queues: runs and gaps, more than a chunk.
    {
        let mut queues = kv.queues.write().unwrap();
        for _ in 0..3_000 {
            let mut key = [&b"q"[..], b"u\x02", b"u\x07"][(lcg(&mut seed) % 3) as usize].to_vec();
            key.extend_from_slice(&(lcg(&mut seed) % 5_000).to_be_bytes());
            queues.write(&key, Some(&[])).unwrap();
            model.insert(key, Vec::new());
        }
    }
    let mut mid_q = b"q".to_vec();
    mid_q.extend_from_slice(&2_500u64.to_be_bytes());
    for (start, end) in [
        (&b""[..], &b"\xff"[..]),
        (b"p", b"w"),
        (b"q", b"r"),
        (&mid_q, b"u\x07"),
        (b"r", b"u"),
        (b"t", b"u\x03"),
    ] {
        for reverse in [false, true] {
            let got: Vec<_> = kv.scan(start, end, reverse).map(|r| r.unwrap()).collect();
            assert_scan(
                &got,
                &expect_range(&model, start, end, reverse),
                &format!("{start:02x?}..{end:02x?} reverse {reverse}"),
            );
        }
    }
    for (k, v) in model.iter().step_by(37) {
        assert_eq!(kv.get(k).unwrap().as_ref(), Some(v), "{k:02x?}");
    }
}

/// A state-machine tree holding `flushed` rounds of random writes over `keys` keys, with one
/// more round waiting above it, and the model of what it holds.
fn layered_with_writes(
    db: &sled::Db,
    name: String,
    seed: &mut u64,
    keys: u64,
    flushed: usize,
) -> (sm::Layered, Model) {
    let layered = sm::Layered::new(db.open_tree(name).unwrap(), Default::default());
    let mut model = Model::new();
    for round in 0..=flushed {
        let writes = random_writes(seed, keys, 2_000, &mut model);
        layered.unflushed.write().unwrap().active = writes;
        if round < flushed {
            layered.flush().unwrap();
        }
    }
    (layered, model)
}

#[test]
fn a_flush_in_the_middle_of_a_scan_changes_nothing_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let db = sm::open_sled(dir.path(), 1 << 20).unwrap();
    let mut seed = 11;
    for round in 0..10 {
        let (layered, model) = layered_with_writes(&db, format!("t{round}"), &mut seed, 3_000, 2);
        let view = layered.view();
        let reverse = round % 2 == 1;
        let mut scan = view.scan(SCANNED.0, SCANNED.1, reverse);
        let mut got = Vec::new();
        let stop_at = (lcg(&mut seed) % 1_000) as usize;
        for pair in scan.by_ref().take(stop_at) {
            got.push(pair.unwrap());
        }
        // Everything goes into the tree between two chunks of the scan.
        layered.flush().unwrap();
        assert!(layered.unflushed.read().unwrap().is_empty());
        got.extend(scan.map(|r| r.unwrap()));
        assert_scan(
            &got,
            &expect_range(&model, SCANNED.0, SCANNED.1, reverse),
            &format!("round {round}"),
        );
    }
}

#[test]
fn a_flush_between_a_chunks_layer_read_and_its_tree_read_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = sm::open_sled(dir.path(), 1 << 20).unwrap();
    let mut seed = 5;
    for round in 0..12 {
        let (layered, model) = layered_with_writes(&db, format!("t{round}"), &mut seed, 1_500, 1);
        let layered = std::sync::Arc::new(layered);
        // The flush lands in the chunk `at`, between its read of the layers and of the tree.
        let at = round % 4;
        let mut chunks = 0;
        let flusher = layered.clone();
        sm::kv::BETWEEN_READS.with(|hook| {
            *hook.borrow_mut() = Some(Box::new(move || {
                if chunks == at {
                    flusher.flush().unwrap();
                }
                chunks += 1;
            }))
        });
        let reverse = round % 2 == 1;
        let got: Vec<_> = layered
            .view()
            .scan(SCANNED.0, SCANNED.1, reverse)
            .map(|r| r.unwrap())
            .collect();
        sm::kv::BETWEEN_READS.with(|hook| hook.borrow_mut().take());
        assert!(
            layered.unflushed.read().unwrap().is_empty(),
            "round {round}: no flush ran"
        );
        let expected = expect_range(&model, SCANNED.0, SCANNED.1, reverse);
        assert_scan(&got, &expected, &format!("round {round}"));
    }
}

/// Asserts that `view` reads what `model` holds: the item and `k` keys by a scan, and each of
/// `node_keys` by a get (answered by the node-key index where the tree lacks it).
fn assert_reads(view: &SledKv, model: &Model, node_keys: &[Vec<u8>], what: &str) {
    let got: Vec<_> = view
        .scan(SCANNED.0, SCANNED.1, false)
        .map(|r| r.unwrap())
        .collect();
    assert_scan(
        &got,
        &expect_range(model, SCANNED.0, SCANNED.1, false),
        what,
    );
    for k in node_keys {
        assert_eq!(
            view.get(k).unwrap().as_ref(),
            model.get(k),
            "{what}: {}",
            String::from_utf8_lossy(k)
        );
    }
}

fn injected() -> sled::Error {
    sled::Error::Io(std::io::Error::other(
        "injected: the disk refused the batch",
    ))
}

/// A hook for [`sm::AT_FLUSH`] under which every flush fails before writing.
fn failing_flushes() -> Option<sm::FlushHook> {
    Some(Box::new(|stage| match stage {
        sm::FlushStage::Writing => Err(injected()),
        sm::FlushStage::Written => Ok(()),
    }))
}

/// Every record `tree` holds, as its readers see them (item records out of their pages).
fn everything_in(tree: &sled::Tree) -> Model {
    let all = (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded);
    sm::paged::range(tree, all, false)
        .map(|r| r.unwrap())
        .collect()
}

/// Writes `value` under `key` in the active layer, and in the model.
fn put(layers: &mut sm::kv::Layers, model: &mut Model, key: &[u8], value: Option<&[u8]>) {
    layers
        .active
        .insert(key.to_vec(), value.map(<[u8]>::to_vec));
    match value {
        Some(v) => model.insert(key.to_vec(), v.to_vec()),
        None => model.remove(key),
    };
}

/// A flush that fails leaves its layer (and the node-key index) as they were: readers see
/// every write, and the next flush puts in the latest value of each, the failed layer's
/// and the newer writes over it together. Readers see the same while the batch goes into
/// the tree and after, until the layer is dropped.
#[test]
fn a_failed_flush_keeps_its_writes_readable_and_the_next_one_puts_in_their_latest_values() {
    use hashq_raft::keys::{idempotency, NodeKey, ENQUEUE_KEY};
    let node_keys: Vec<Vec<u8>> = (0..6)
        .map(|nonce| idempotency(ENQUEUE_KEY, &NodeKey { node: 1, nonce }.to_string()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let db = sm::open_sled(dir.path(), 1 << 20).unwrap();
    let mut seed = 23;
    let (layered, mut model) = layered_with_writes(&db, "t".into(), &mut seed, 1_500, 1);
    let tree = layered.current().0;
    {
        let mut layers = layered.unflushed.write().unwrap();
        for k in &node_keys[..3] {
            put(&mut layers, &mut model, k, Some(b"first"));
        }
    }

    let before = everything_in(&tree);
    sm::AT_FLUSH.with(|hook| *hook.borrow_mut() = failing_flushes());
    assert!(layered.flush().is_err());
    assert!(
        layered.flush().is_err(),
        "a retry with nothing new fails too"
    );
    assert_eq!(
        everything_in(&tree),
        before,
        "a failed flush writes nothing"
    );
    assert_reads(&layered.view(), &model, &node_keys, "after failed flushes");

    // Newer writes over the failed layer's keys: overwritten, deleted, or left.
    {
        let mut layers = layered.unflushed.write().unwrap();
        layers.active = random_writes(&mut seed, 1_500, 2_000, &mut model);
        put(&mut layers, &mut model, &node_keys[0], None);
        put(&mut layers, &mut model, &node_keys[1], Some(b"second"));
        put(&mut layers, &mut model, &node_keys[3], Some(b"second"));
    }
    assert_reads(&layered.view(), &model, &node_keys, "over a failed layer");

    // The next flush works; a reader looks before the batch is in the tree and after.
    let stages = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let (view, seen, keys, log) = (
        layered.view(),
        model.clone(),
        node_keys.clone(),
        stages.clone(),
    );
    sm::AT_FLUSH.with(|hook| {
        *hook.borrow_mut() = Some(Box::new(move |stage| {
            assert_reads(&view, &seen, &keys, &format!("{stage:?}"));
            log.borrow_mut().push(stage);
            Ok(())
        }))
    });
    layered.flush().unwrap();
    sm::AT_FLUSH.with(|hook| hook.borrow_mut().take());
    assert_eq!(
        *stages.borrow(),
        [sm::FlushStage::Writing, sm::FlushStage::Written]
    );
    assert!(layered.unflushed.read().unwrap().is_empty());
    assert_eq!(
        everything_in(&tree),
        model,
        "the tree holds every latest value"
    );
    // The node keys the tree holds now are known to the index: none reads as absent.
    assert_reads(&layered.view(), &model, &node_keys, "after the flush");
}

/// A flush that failed is tried again by the next apply, which stops the node (an error to
/// openraft) if it fails too. Nothing applied is lost meanwhile: readers see it all, and the
/// flush that works puts it all into the tree.
#[tokio::test]
async fn apply_retries_a_failed_flush_and_stops_when_it_fails_again_losing_nothing() {
    let (_dir, mut sm, entries) = unflushing_with_enqueues(5).await;
    sm.apply(entries[..2].to_vec()).await.unwrap();
    let tree = SledKv::bare(sm.shared.tree());

    // The flusher's flush fails (this test's thread stands for it): the node goes on.
    sm::AT_FLUSH.with(|hook| *hook.borrow_mut() = failing_flushes());
    assert!(sm.shared.flush().is_err());
    // The next apply flushes itself, fails again, and says so.
    let stopped = sm.apply(entries[2..3].to_vec()).await;
    assert!(stopped.is_err(), "{stopped:?}");
    let view = sm.reader().view();
    assert_eq!(machine::read_meta(&view).unwrap().counts.queued, 3);
    assert_eq!(sm::read_last_applied(&view).unwrap(), Some(log_id(3)));
    assert_eq!(sm::read_last_applied(&tree).unwrap(), None);

    // Once sled takes writes again, the next apply puts everything in.
    sm::AT_FLUSH.with(|hook| hook.borrow_mut().take());
    sm.apply(entries[3..4].to_vec()).await.unwrap();
    assert_eq!(sm::read_last_applied(&tree).unwrap(), Some(log_id(4)));
    for id in 0..4 {
        assert!(machine::item(&tree, WorkId(id)).unwrap().is_some(), "{id}");
    }
    // And the failure is over: the apply after it leaves its writes to the flusher again.
    sm.apply(entries[4..].to_vec()).await.unwrap();
    assert_eq!(sm::read_last_applied(&tree).unwrap(), Some(log_id(4)));
}
