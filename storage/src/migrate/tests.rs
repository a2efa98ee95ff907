//! Migration from formats 1 and 2: data dirs as older builds left them, converted and reopened.

use hashq_raft::kv::KvRead;
use hashq_raft::machine;
use hashq_raft::types::WorkerId;
use openraft::{CommittedLeaderId, Membership};

use super::*;

fn item(status: Status, lease: Option<Lease>, value: Option<Digest>) -> v1::Item {
    v1::Item {
        iterations: 10,
        attempts: u32::from(lease.is_some()),
        status,
        enqueued_at: 5,
        queued_at: 5,
        payload_len: 3,
        lease,
        completed_at: value.map(|_| 7),
        value,
        pulled_at: (status == Status::Pulled).then_some(8),
        dead_reason: (status == Status::Dead).then(|| "all attempts".to_string()),
    }
}

#[test]
fn a_format_2_item_is_written_as_the_flat_record() {
    let dead_at = Some(9);
    let flat = [
        codec::encode(&item(Status::Dead, None, None)),
        codec::encode(&dead_at),
    ]
    .concat();
    let nested = v2::Item {
        v1: item(Status::Dead, None, None),
        dead_at,
    };
    assert_eq!(codec::encode(&nested), flat);
}

/// `f`'s result once sled has let go of a database this process dropped a moment before:
/// sled releases its file lock from a background thread, so an open right after a drop in
/// the same process may find it still held (a separate `hashq migrate` process never does).
fn released<T>(mut f: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match f() {
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other,
        }
    }
}

/// Checks what every conversion shares: the old dir is refused (`refused` says how), then
/// converted, then opens clean with the old vote; the checks of what it holds are the
/// caller's. A second conversion is refused by [`converted_once`].
fn refused_then_converted(
    dir: &Path,
    refused: fn(&StoreError) -> bool,
) -> (Migrated, crate::Opened) {
    match crate::open(dir, &crate::StoreOptions::default()) {
        Err(e) => assert!(refused(&e), "refused for another reason: {e}"),
        Ok(_) => panic!("an old data dir opened without conversion"),
    }
    let done = released(|| migrate(dir, false)).unwrap();
    let opened = released(|| crate::open(dir, &crate::StoreOptions::default())).unwrap();
    assert!(opened.recovery.sm.restored_from.is_some());
    assert!(opened.recovery.damage.is_none());
    assert_eq!(opened.log.vote(), Some(Vote::new(4, 2)));
    (done, opened)
}

fn converted_once(dir: &Path) {
    assert!(
        released(|| migrate(dir, false)).is_err(),
        "already converted"
    );
}

/// Checks that a dir whose state machine is behind its log is left alone unless told, and
/// then drops exactly one entry.
fn unapplied_need_the_flag(dir: &Path, left_in_place: &str) {
    let err = released(|| migrate(dir, false)).unwrap_err().to_string();
    assert!(err.contains("--discard-unapplied"), "{err}");
    assert!(dir.join(left_in_place).exists(), "nothing moved");
    let done = released(|| migrate(dir, true)).unwrap();
    assert_eq!(done.discarded_entries, 1);
}

/// A data dir as hashq 0.1 left it: one sled database with the log, the vote and the
/// state machine (one item in each state).
fn legacy_dir(extra_entry: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("sled")).unwrap();
    let raft = db.open_tree("raft").unwrap();
    raft.insert(b"vote", codec::encode(&Vote::<NodeId>::new(4, 2)))
        .unwrap();
    db.open_tree("sm_meta")
        .unwrap()
        .insert(b"current", b"sm-3".as_slice())
        .unwrap();
    let sm = db.open_tree("sm-3").unwrap();
    let applied = LogId::new(CommittedLeaderId::new(4, 2), 40);
    let membership = StoredMembership::new(
        Some(LogId::new(CommittedLeaderId::new(0, 0), 0)),
        Membership::new(vec![[1u64, 2, 3].into_iter().collect()], None),
    );
    sm.insert(keys::LAST_APPLIED, codec::encode(&applied))
        .unwrap();
    sm.insert(keys::MEMBERSHIP, codec::encode(&membership))
        .unwrap();
    let lease = Lease {
        worker: WorkerId(1),
        attempt: 1,
        deadline: 99,
    };
    let digest = Digest::new([7; 64]);
    let put = |id: u64, i: v1::Item| {
        sm.insert(keys::item(WorkId(id)), codec::encode(&i))
            .unwrap();
    };
    put(0, item(Status::Queued, None, None));
    sm.insert(keys::queue(WorkId(0)), b"".as_slice()).unwrap();
    put(1, item(Status::Running, Some(lease), None));
    sm.insert(keys::lease(99, WorkId(1)), b"".as_slice())
        .unwrap();
    sm.insert(
        keys::owner(WorkerId(1), WorkId(1)),
        1u32.to_be_bytes().as_slice(),
    )
    .unwrap();
    put(2, item(Status::Completed, None, Some(digest)));
    sm.insert(keys::completed(0), 2u64.to_be_bytes().as_slice())
        .unwrap();
    put(3, item(Status::Pulled, None, Some(digest)));
    sm.insert(keys::pulled(8, WorkId(3)), b"".as_slice())
        .unwrap();
    put(4, item(Status::Dead, None, None));
    // hashq 0.1 keyed dead items by id alone.
    sm.insert(
        [keys::DEAD]
            .iter()
            .chain(&4u64.to_be_bytes())
            .copied()
            .collect::<Vec<u8>>(),
        b"".as_slice(),
    )
    .unwrap();
    for id in [0u64, 1, 4] {
        // hashq 0.1's payload table: `p` + work id.
        let key = [&[keys::PAYLOAD][..], &id.to_be_bytes()].concat();
        sm.insert(key, b"abc".as_slice()).unwrap();
    }
    sm.insert(
        keys::worker(WorkerId(1)),
        b"an old worker record".as_slice(),
    )
    .unwrap();
    let meta = v1::Meta {
        now: 1_000,
        next_id: 5,
        next_completion: 1,
        next_worker: 2,
        max_workers: Some(4),
        counts: v1::Counts {
            queued: 1,
            running: 1,
            completed: 1,
            pulled: 1,
            dead: 1,
            queued_iterations: 10,
            payload_bytes: 9,
            enqueued_total: 5,
            completed_total: 2,
            pulled_total: 1,
            expired_total: 1,
            completed_iterations_total: 20,
        },
    };
    sm.insert(keys::META, codec::encode(&meta)).unwrap();
    let log = db.open_tree("log").unwrap();
    log.insert(40u64.to_be_bytes(), b"an applied entry".as_slice())
        .unwrap();
    if extra_entry {
        log.insert(41u64.to_be_bytes(), b"not applied".as_slice())
            .unwrap();
    }
    db.flush().unwrap();
    dir
}

#[tokio::test]
async fn a_legacy_dir_is_refused_then_converted_and_opens_with_its_items() {
    let dir = legacy_dir(false);
    let (done, opened) =
        refused_then_converted(dir.path(), |e| matches!(e, StoreError::Legacy { .. }));
    assert_eq!(done.items, 5);
    assert_eq!((done.requeued, done.workers_dropped), (1, 1));
    assert!(dir.path().join("legacy-v1/sled").exists());
    let view = opened.sm.reader().view();
    let status = |id: u64| machine::item(&view, WorkId(id)).unwrap().unwrap().status;
    assert_eq!(status(0), Status::Queued);
    assert_eq!(status(1), Status::Queued, "running went back to the queue");
    assert_eq!(status(2), Status::Completed);
    assert_eq!(status(3), Status::Pulled);
    assert_eq!(status(4), Status::Dead);
    assert!(view.get(&keys::queue(WorkId(1))).unwrap().is_some());
    assert!(view.get(&keys::dead(1_000, WorkId(4))).unwrap().is_some());
    assert!(machine::workers(&view).unwrap().is_empty());
    let meta = machine::read_meta(&view).unwrap();
    assert_eq!((meta.counts.queued, meta.counts.running), (2, 0));
    assert_eq!(meta.counts.queued_iterations, 20);
    assert_eq!(meta.next_id, 5);
    let at = machine::item(&view, WorkId(1)).unwrap().unwrap().payload;
    let payloads = opened.sm.reader().payloads();
    assert_eq!(
        payloads.read(&[at]).unwrap(),
        vec![Some(bytes::Bytes::from_static(b"abc"))]
    );
    assert_eq!(machine::payload_floor(&view).unwrap(), Some(0));
    converted_once(dir.path());
}

#[test]
fn unapplied_entries_are_not_dropped_without_being_told() {
    unapplied_need_the_flag(legacy_dir(true).path(), "sled");
}

/// A data dir as the format-2 builds left it: the segment log (purged to 40), the vote
/// file, and the state machine in sled with payloads by work id.
fn format_2_dir(applied_index: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    std::fs::create_dir_all(layout.log_dir()).unwrap();
    std::fs::write(layout.format_file(), "hashq-data 2\n").unwrap();
    let (mut log, _) = crate::LogStore::open(
        &layout.log_dir(),
        &layout.vote_file(),
        crate::LogOptions::default(),
    )
    .unwrap();
    log.keep_vote(Vote::new(4, 2)).unwrap();
    log.purge_to(LogId::new(CommittedLeaderId::new(4, 2), 40))
        .unwrap();
    drop(log);
    let db = crate::sm::open_sled(&layout.sm_dir(), 1 << 20).unwrap();
    let sm = db.open_tree("sm-0").unwrap();
    let applied = LogId::new(CommittedLeaderId::new(4, 2), applied_index);
    sm.insert(keys::LAST_APPLIED, codec::encode(&applied))
        .unwrap();
    let membership = StoredMembership::new(
        Some(LogId::new(CommittedLeaderId::new(0, 0), 0)),
        Membership::new(vec![[1u64, 2, 3].into_iter().collect()], None),
    );
    sm.insert(keys::MEMBERSHIP, codec::encode(&membership))
        .unwrap();
    let lease = Lease {
        worker: WorkerId(1),
        attempt: 1,
        deadline: 99,
    };
    let item = |status, lease, value: Option<Digest>| v2::Item {
        v1: v1::Item {
            iterations: 10,
            attempts: 1,
            status,
            enqueued_at: 5,
            queued_at: 5,
            payload_len: 3,
            lease,
            completed_at: value.map(|_| 7),
            value,
            pulled_at: None,
            dead_reason: None,
        },
        dead_at: None,
    };
    let items = [
        item(Status::Queued, None, None),
        item(Status::Running, Some(lease), None),
        item(Status::Completed, None, Some(Digest::new([7; 64]))),
    ];
    for (id, i) in items.iter().enumerate() {
        sm.insert(keys::item(WorkId(id as u64)), codec::encode(i))
            .unwrap();
    }
    sm.insert(keys::queue(WorkId(0)), b"".as_slice()).unwrap();
    sm.insert(keys::lease(99, WorkId(1)), b"".as_slice())
        .unwrap();
    for (id, payload) in [(0u64, b"abc"), (1, b"def")] {
        let key = [&[keys::PAYLOAD][..], &id.to_be_bytes()].concat();
        sm.insert(key, payload.as_slice()).unwrap();
    }
    let mut meta = machine::Meta {
        now: 1_000,
        next_id: 3,
        ..machine::Meta::default()
    };
    meta.counts.queued = 1;
    meta.counts.running = 1;
    meta.counts.completed = 1;
    sm.insert(keys::META, codec::encode(&meta)).unwrap();
    db.flush().unwrap();
    dir
}

#[tokio::test]
async fn a_format_2_dir_is_refused_then_converted_with_its_leases_and_payloads() {
    let dir = format_2_dir(40);
    let (done, opened) =
        refused_then_converted(dir.path(), |e| matches!(e, StoreError::Format2 { .. }));
    assert_eq!(done.items, 3);
    assert_eq!((done.requeued, done.workers_dropped), (0, 0));
    assert!(dir.path().join("legacy-v2/sm").exists());
    assert!(dir.path().join("legacy-v2/raft/vote").exists());
    let view = opened.sm.reader().view();
    let item = |id: u64| machine::item(&view, WorkId(id)).unwrap().unwrap();
    assert_eq!(item(0).status, Status::Queued);
    assert_eq!(
        item(1).status,
        Status::Running,
        "a lease survives the migration"
    );
    assert_eq!(item(1).lease.map(|l| l.worker), Some(WorkerId(1)));
    assert!(view.get(&keys::lease(99, WorkId(1))).unwrap().is_some());
    assert_eq!(item(2).status, Status::Completed);
    let payloads = opened.sm.reader().payloads();
    assert_eq!(
        payloads.read(&[item(0).payload, item(1).payload]).unwrap(),
        vec![
            Some(bytes::Bytes::from_static(b"abc")),
            Some(bytes::Bytes::from_static(b"def"))
        ]
    );
    assert_eq!(machine::payload_floor(&view).unwrap(), Some(0));
    assert_eq!(machine::read_meta(&view).unwrap().next_id, 3);
    converted_once(dir.path());
}

#[test]
fn a_format_2_state_machine_behind_its_log_is_not_converted_without_being_told() {
    unapplied_need_the_flag(format_2_dir(39).path(), "sm");
}
