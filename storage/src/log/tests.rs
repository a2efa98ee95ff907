//! The segment log on its own: reopen, roll, truncate, purge, torn tails and corruption.

use std::fs::OpenOptions;
use std::path::Path;

use hashq_raft::command::{Command, Request, StoreLimits};
use hashq_raft::types::PayloadRef;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader};

use super::write::IoMode;
use super::*;

fn id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(term: u64, index: u64, len: usize) -> Entry {
    Entry {
        log_id: id(term, index),
        payload: EntryPayload::Normal(Command {
            now: index,
            mono: index,
            limits: StoreLimits::UNLIMITED,
            requests: vec![Request::Enqueue {
                iterations: 1,
                payload: bytes::Bytes::from(vec![index as u8; len]),
                dedup: None,
            }],
        }),
    }
}

fn small() -> LogOptions {
    LogOptions {
        segment_bytes: 4096,
        cache_bytes: 0,
    }
}

fn open_in(dir: &Path) -> (LogStore, LogOpened) {
    LogStore::open(&dir.join("log"), &dir.join("vote"), small()).unwrap()
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("log")).unwrap();
    dir
}

async fn all(log: &mut LogStore) -> Vec<u64> {
    let state = log.get_log_state().await.unwrap();
    let start = state.last_purged_log_id.map_or(0, |p| p.index + 1);
    let end = state.last_log_id.map_or(0, |l| l.index + 1);
    log.try_get_log_entries(start..end)
        .await
        .unwrap()
        .iter()
        .map(|e| e.log_id.index)
        .collect()
}

#[tokio::test]
async fn entries_votes_and_purges_survive_a_reopen_across_segments() {
    let dir = setup();
    {
        let (mut log, opened) = open_in(dir.path());
        assert!(opened.damage.is_none() && opened.torn_tail.is_none());
        log.blocking_append((1..=40).map(|i| entry(1, i, 300)))
            .await
            .unwrap();
        log.save_vote(&Vote::new(2, 1)).await.unwrap();
        // No payload is needed: purged segments can go.
        log.set_payload_floor(u64::MAX);
        log.purge(id(1, 25)).await.unwrap();
    }
    let segments = segment::list(&dir.path().join("log")).unwrap();
    assert!(segments.len() > 1, "small segments roll: {segments:?}");
    assert!(
        segments[0].0 > 1,
        "segments wholly below the purge point are gone"
    );
    let (mut log, opened) = open_in(dir.path());
    assert!(opened.damage.is_none(), "{opened:?}");
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(2, 1)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(id(1, 25)));
    assert_eq!(state.last_log_id, Some(id(1, 40)));
    assert_eq!(all(&mut log).await, (26..=40).collect::<Vec<_>>());
    let back = log.try_get_log_entries(30..31).await.unwrap();
    assert_eq!(back, vec![entry(1, 30, 300)]);
}

#[tokio::test]
async fn truncation_removes_the_tail_in_and_across_segments() {
    let dir = setup();
    {
        let (mut log, _) = open_in(dir.path());
        log.blocking_append((1..=30).map(|i| entry(1, i, 300)))
            .await
            .unwrap();
        log.truncate(id(1, 25)).await.unwrap();
        // A new leader's entries from 25 on.
        log.blocking_append((25..=27).map(|i| entry(2, i, 100)))
            .await
            .unwrap();
        log.truncate(id(2, 12)).await.unwrap();
        log.blocking_append((12..=14).map(|i| entry(3, i, 100)))
            .await
            .unwrap();
    }
    let (mut log, opened) = open_in(dir.path());
    assert!(opened.damage.is_none(), "{opened:?}");
    assert_eq!(all(&mut log).await, (1..=14).collect::<Vec<_>>());
    let last = log.try_get_log_entries(11..15).await.unwrap();
    let terms: Vec<u64> = last.iter().map(|e| e.log_id.leader_id.term).collect();
    assert_eq!(terms, vec![1, 3, 3, 3]);
}

#[tokio::test]
async fn after_a_snapshot_jump_the_log_goes_on_in_a_new_segment() {
    let dir = setup();
    {
        let (mut log, _) = open_in(dir.path());
        log.blocking_append((1..=5).map(|i| entry(1, i, 10)))
            .await
            .unwrap();
        // A snapshot at 100 was installed: the log is purged past its end, then goes on.
        log.purge(id(1, 100)).await.unwrap();
        log.blocking_append((101..=103).map(|i| entry(1, i, 10)))
            .await
            .unwrap();
    }
    let (mut log, opened) = open_in(dir.path());
    assert!(opened.damage.is_none(), "{opened:?}");
    assert_eq!(all(&mut log).await, vec![101, 102, 103]);
}

#[tokio::test]
async fn a_torn_last_record_is_cut_off_and_the_rest_kept() {
    let dir = setup();
    {
        let (mut log, _) = open_in(dir.path());
        log.blocking_append((1..=3).map(|i| entry(1, i, 1000)))
            .await
            .unwrap();
    }
    let (_, path) = segment::list(&dir.path().join("log"))
        .unwrap()
        .pop()
        .unwrap();
    // The end of the last record (zeros may pad the file to a block boundary).
    let end = segment::scan(&path).unwrap().end;
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(end - 500).unwrap();
    drop(file);
    let (mut log, opened) = open_in(dir.path());
    assert!(opened.damage.is_none(), "{opened:?}");
    assert!(opened.torn_tail.is_some());
    assert_eq!(all(&mut log).await, vec![1, 2]);
    // It appends where the good records end.
    log.blocking_append([entry(1, 3, 10)]).await.unwrap();
    drop(log);
    let (mut log, opened) = open_in(dir.path());
    assert!(opened.torn_tail.is_none() && opened.damage.is_none());
    assert_eq!(all(&mut log).await, vec![1, 2, 3]);
}

#[tokio::test]
async fn a_flipped_bit_in_the_middle_is_reported_as_damage() {
    let dir = setup();
    {
        let (mut log, _) = open_in(dir.path());
        log.blocking_append((1..=30).map(|i| entry(1, i, 300)))
            .await
            .unwrap();
    }
    let segments = segment::list(&dir.path().join("log")).unwrap();
    let (_, second) = &segments[1];
    let mut bytes = std::fs::read(second).unwrap();
    let at = segment::HEADER_LEN as usize + 40;
    bytes[at] ^= 0x08;
    std::fs::write(second, &bytes).unwrap();
    let (_, opened) = open_in(dir.path());
    let damage = opened.damage.expect("damage found");
    assert_eq!(&damage.path, second);
    // What comes before the damaged segment is still readable.
    assert_eq!(damage.readable_up_to, Some(segments[1].0 - 1));
}

/// The payload of entry `index` as `entry` writes it.
fn payload_of(index: u64) -> PayloadRef {
    PayloadRef {
        term: 1,
        index,
        ordinal: 0,
    }
}

#[tokio::test]
async fn purged_segments_stay_while_their_payloads_are_needed() {
    let dir = setup();
    let (mut log, _) = open_in(dir.path());
    log.blocking_append((1..=40).map(|i| entry(1, i, 300)))
        .await
        .unwrap();
    // The state machine still needs the payload of entry 20.
    log.set_payload_floor(20);
    log.purge(id(1, 25)).await.unwrap();
    assert_eq!(all(&mut log).await, (26..=40).collect::<Vec<_>>());
    let first = segment::list(&dir.path().join("log")).unwrap()[0].0;
    assert!(
        first > 1 && first <= 20,
        "segments before 20 went, 20's stayed: {first}"
    );
    let wanted = [payload_of(20), payload_of(30), payload_of(5)];
    let read = |log: &LogStore| log.read_payloads(&wanted).unwrap();
    let got = read(&log);
    assert_eq!(got[0].as_deref(), Some(&vec![20u8; 300][..]));
    assert_eq!(got[1].as_deref(), Some(&vec![30u8; 300][..]));
    assert_eq!(got[2], None, "entry 5's segment is gone");
    // Another term's entry at the same index is not this payload.
    let other = PayloadRef {
        term: 2,
        ..payload_of(20)
    };
    assert_eq!(log.read_payloads(&[other]).unwrap(), vec![None]);

    // A restart finds the retained segments again.
    drop(log);
    let (log, opened) = open_in(dir.path());
    assert!(opened.damage.is_none(), "{opened:?}");
    assert_eq!(read(&log)[0].as_deref(), Some(&vec![20u8; 300][..]));

    // Once the payload is no longer needed, its segment goes.
    log.set_payload_floor(26);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while segment::list(&dir.path().join("log")).unwrap()[0].0 <= 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "segment never deleted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(read(&log)[0], None);
    assert!(read(&log)[1].is_some());
}

#[tokio::test]
async fn a_range_read_partly_from_the_cache_and_partly_from_disk_comes_back_whole_and_in_order() {
    let dir = setup();
    // Room in the cache for the last few entries only.
    let options = LogOptions {
        segment_bytes: 4096,
        cache_bytes: 4 * index::entry_bytes(&entry(1, 1, 300)),
    };
    let (mut log, _) =
        LogStore::open(&dir.path().join("log"), &dir.path().join("vote"), options).unwrap();
    log.blocking_append((1..=20).map(|i| entry(1, i, 300)))
        .await
        .unwrap();
    let cached = log.plan_read(18, 21).unwrap().cached();
    assert!(cached.is_ok(), "the newest entries are served from memory");
    assert!(
        log.plan_read(1, 21).unwrap().cached().is_err(),
        "the oldest are not in the cache"
    );
    let want: Vec<Entry> = (1..=20).map(|i| entry(1, i, 300)).collect();
    assert_eq!(log.try_get_log_entries(1..21).await.unwrap(), want);
    assert_eq!(log.try_get_log_entries(18..=20).await.unwrap(), want[17..]);
    assert!(cached.is_ok_and(|c| c == want[17..]));
    // Past the end: what the log holds, nothing more.
    assert_eq!(log.try_get_log_entries(19..40).await.unwrap(), want[18..]);
    // A new leader's entries replace the tail: the cache serves them, not the old term's.
    log.truncate(id(1, 19)).await.unwrap();
    log.blocking_append((19..=20).map(|i| entry(2, i, 300)))
        .await
        .unwrap();
    let terms = |entries: Vec<Entry>| -> Vec<u64> {
        entries.iter().map(|e| e.log_id.leader_id.term).collect()
    };
    assert!(log.plan_read(18, 21).unwrap().cached().is_ok());
    assert_eq!(
        terms(log.try_get_log_entries(18..21).await.unwrap()),
        [1, 2, 2]
    );
    assert_eq!(log.try_get_log_entries(1..21).await.unwrap().len(), 20);
    // A long range (a follower catching up) is read on a blocking thread, whole and in order.
    log.blocking_append((21..=100).map(|i| entry(2, i, 300)))
        .await
        .unwrap();
    let long = log.try_get_log_entries(1..101).await.unwrap();
    assert_eq!(
        long.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        (1..=100).collect::<Vec<_>>()
    );
    assert_eq!(long[..18], want[..18]);
    assert_eq!(long[99], entry(2, 100, 300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_hint_is_written_on_the_calling_thread_unless_the_writer_is_busy() {
    let dir = setup();
    let (mut log, _) = open_in(dir.path());
    log.blocking_append((1..=3).map(|i| entry(1, i, 10)))
        .await
        .unwrap();
    // Whether a quick write ran on the thread that asked for it.
    async fn here(log: &LogStore) -> bool {
        let caller = std::thread::current().id();
        let ran_on = log
            .write_quick(|_, _| Ok(std::thread::current().id()))
            .await
            .unwrap();
        ran_on == caller
    }
    // A free writer: no trip to a blocking thread (openraft awaits this before each apply).
    assert!(here(&log).await);
    log.save_committed(Some(id(1, 2))).await.unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(id(1, 2)));

    // A busy writer (an append syncing; here a held lock): the write waits for it on a
    // blocking thread rather than block a runtime thread.
    let (held, release) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
    let (held, release) = (std::sync::Arc::new(held), std::sync::Arc::new(release));
    let holder = std::thread::spawn({
        let (log, held, release) = (log.clone(), held.clone(), release.clone());
        move || {
            let _busy = log.inner.writer.lock().unwrap();
            held.wait();
            release.wait();
        }
    });
    held.wait();
    let waiting = tokio::spawn({
        let mut log = log.clone();
        async move {
            let inline = here(&log).await;
            log.save_committed(Some(id(1, 3))).await.unwrap();
            inline
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "it waits for the writer");
    release.wait();
    holder.join().unwrap();
    assert!(!waiting.await.unwrap(), "it waited on a blocking thread");
    assert_eq!(log.read_committed().await.unwrap(), Some(id(1, 3)));
    drop(log);
    let (mut log, _) = open_in(dir.path());
    assert_eq!(log.read_committed().await.unwrap(), Some(id(1, 3)));
}

/// Whether `dir`'s file system takes `O_DIRECT` (a disk does; tmpfs before Linux 6.6 not).
fn takes_direct_io(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("direct-probe");
    let opened = OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe);
    std::fs::remove_file(&probe).ok();
    opened.is_ok()
}

/// Segments of a few blocks: an append after a reopen lands in the same segment.
fn open_mid(dir: &Path, mode: IoMode) -> (LogStore, LogOpened) {
    let options = LogOptions {
        segment_bytes: 20_000,
        cache_bytes: 0,
    };
    let (log, opened) = LogStore::open(&dir.join("log"), &dir.join("vote"), options).unwrap();
    lock(&log.inner.writer).mode = mode;
    (log, opened)
}

fn sized(i: u64) -> Entry {
    entry(1, i, [1, 300, 4096, 5000, 17][i as usize % 5])
}

/// Appends 1 to 30 (one at a time, then in a run, so segments end at every offset within a
/// block), reopens twice appending three more each time, then truncates back to the first
/// entry of the second segment, so the first is active again, and appends after it. Every
/// open must find the log whole and undamaged. Returns the segment files' lengths after the
/// first 30.
async fn appends_reopens_and_truncation(dir: &Path, mode: IoMode) -> Vec<u64> {
    {
        let (mut log, _) = open_mid(dir, mode);
        for i in 1..=20 {
            log.blocking_append([sized(i)]).await.unwrap();
        }
        log.blocking_append((21..=30).map(sized)).await.unwrap();
    }
    let segments = segment::list(&dir.join("log")).unwrap();
    assert!(segments.len() >= 3, "{segments:?}");
    let lengths = segments
        .iter()
        .map(|(_, path)| std::fs::metadata(path).unwrap().len())
        .collect();
    let whole = |opened: &LogOpened| opened.damage.is_none() && opened.torn_tail.is_none();
    for round in 0..2 {
        let (mut log, opened) = open_mid(dir, mode);
        assert!(whole(&opened), "{opened:?}");
        let last = 30 + round * 3;
        assert_eq!(all(&mut log).await, (1..=last).collect::<Vec<_>>());
        let back = log.try_get_log_entries(1..last + 1).await.unwrap();
        assert_eq!(back, (1..=last).map(sized).collect::<Vec<_>>());
        // It goes on after the last record, over the padding.
        log.blocking_append((last + 1..=last + 3).map(sized))
            .await
            .unwrap();
    }
    // Back to the first entry of the second segment: that segment goes, the first is
    // active again, and appends go on after its last record, not after its padding.
    let second = segments[1].0;
    let (mut log, _) = open_mid(dir, mode);
    log.truncate(id(1, second)).await.unwrap();
    assert_eq!(segment::list(&dir.join("log")).unwrap().len(), 1);
    log.blocking_append((second..second + 3).map(|i| entry(2, i, 10)))
        .await
        .unwrap();
    drop(log);
    let (mut log, opened) = open_mid(dir, mode);
    assert!(whole(&opened), "{opened:?}");
    assert_eq!(all(&mut log).await, (1..second + 3).collect::<Vec<_>>());
    lengths
}

#[tokio::test]
async fn appends_write_whole_blocks_and_reopen_cleanly_after_the_padding() {
    let dir = setup();
    let lengths = appends_reopens_and_truncation(dir.path(), IoMode::Direct).await;
    if takes_direct_io(dir.path()) {
        assert!(
            lengths.iter().all(|l| l.is_multiple_of(segment::BLOCK)),
            "direct writes are whole blocks: {lengths:?}"
        );
    }
}

#[tokio::test]
async fn without_direct_io_appends_go_through_the_page_cache_the_same_way() {
    let dir = setup();
    let lengths = appends_reopens_and_truncation(dir.path(), IoMode::Buffered).await;
    assert!(
        lengths.iter().any(|l| !l.is_multiple_of(segment::BLOCK)),
        "no padding: {lengths:?}"
    );
}

#[test]
fn an_append_buffer_is_sized_for_the_records_that_go_into_the_segment() {
    let entries: Vec<Entry> = (1..=10).map(|i| entry(1, i, 1_000)).collect();
    let each = super::index::entry_bytes(&entries[0]) + segment::RECORD_OVERHEAD as usize;
    // Every record is no larger than its hint, so the hint covers what is encoded.
    let encoded = {
        let mut buf = Vec::new();
        segment::push_record_with(&mut buf, segment::KIND_ENTRY, |b| {
            encode_entry_onto(b, &entries[0])
        });
        buf.len()
    };
    assert!(encoded <= each, "{encoded} bytes against a hint of {each}");
    // Room for two and a half: three are taken (the third crosses the segment's end).
    let room = (each * 5 / 2) as u64;
    assert_eq!(super::write::records_hint(&entries, room), 3 * each);
    // A full segment still takes one; a large one takes them all.
    assert_eq!(super::write::records_hint(&entries, 0), each);
    assert_eq!(super::write::records_hint(&entries, u64::MAX), 10 * each);
}
