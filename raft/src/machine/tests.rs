//! Scenario tests of the queue state machine: no network, no disk, no clock.

use super::*;
use crate::command::{BatchItem, Dedup};
use crate::kv::{MemKv, Overlay};
use crate::types::Digest;
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};

const LEASE_MS: u64 = 1_000;
const KEY_TTL_MS: u64 = 120_000;
/// Every test worker registers with this secret.
const SECRET: WorkerSecret = WorkerSecret(0x5ec7e7);
/// The leader term every test command comes from.
const TERM: u64 = 1;

/// Log indexes for commands applied one by one: unique within the test process, which is all
/// payload references need.
static NEXT_INDEX: AtomicU64 = AtomicU64::new(1);

fn next_at() -> At {
    At {
        term: TERM,
        index: NEXT_INDEX.fetch_add(1, Ordering::Relaxed),
    }
}

/// The command at position `i` of a test log.
fn at(i: usize) -> At {
    At {
        term: TERM,
        index: i as u64 + 1,
    }
}

fn dedup(key: Option<&str>) -> Option<Dedup> {
    key.map(|k| Dedup {
        key: k.to_string(),
        ttl_ms: KEY_TTL_MS,
    })
}

fn params() -> TickParams {
    TickParams {
        max_attempts: 3,
        worker_lost_ms: 10_000,
        launch_timeout_ms: 5_000,
        pulled_retention_ms: 60_000,
        completed_retention_ms: 3_600_000,
        dead_retention_ms: 3_600_000,
        limit: 1_000,
    }
}

fn run(kv: &mut MemKv, now: Millis, request: Request) -> Response {
    let mut out = apply(
        kv,
        &Command {
            now,
            mono: now,
            limits: StoreLimits::UNLIMITED,
            requests: vec![request],
        },
        next_at(),
    )
    .expect("apply");
    out.pop().expect("one response")
}

fn enqueue(kv: &mut MemKv, now: Millis, iterations: u32, key: Option<&str>) -> WorkId {
    match run(
        kv,
        now,
        Request::Enqueue {
            iterations,
            payload: Bytes::from(format!("payload-{now}-{iterations}").into_bytes()),
            dedup: dedup(key),
        },
    ) {
        Response::Enqueued { id, .. } => id,
        other => panic!("enqueue answered {other:?}"),
    }
}

fn register(kv: &mut MemKv, now: Millis) -> WorkerId {
    match run(
        kv,
        now,
        Request::Register {
            slot: None,
            parent: 1,
            host: "test".into(),
            handle: String::new(),
            secret: SECRET,
        },
    ) {
        Response::Registered { worker } => worker,
        other => panic!("register answered {other:?}"),
    }
}

fn lease(
    kv: &mut MemKv,
    now: Millis,
    worker: WorkerId,
    max: u32,
    request_id: u64,
) -> Vec<LeasedItem> {
    match run(
        kv,
        now,
        Request::Lease {
            worker,
            secret: SECRET,
            max,
            min: max,
            max_iterations: u64::MAX,
            lease_ms: LEASE_MS,
            request_id,
        },
    ) {
        Response::Leased { items } => items,
        other => panic!("lease answered {other:?}"),
    }
}

fn digest(byte: u8) -> Digest {
    Digest::new([byte; 64])
}

fn complete(
    kv: &mut MemKv,
    now: Millis,
    worker: WorkerId,
    id: WorkId,
    attempt: u32,
    byte: u8,
) -> (u32, u32) {
    match run(
        kv,
        now,
        Request::Complete {
            worker,
            secret: SECRET,
            results: vec![Completion {
                id,
                attempt,
                value: digest(byte),
            }],
        },
    ) {
        Response::CompleteAck { accepted, ignored } => (accepted, ignored),
        other => panic!("complete answered {other:?}"),
    }
}

fn take(kv: &mut MemKv, now: Millis, top: u32, key: Option<&str>) -> Vec<(WorkId, Digest)> {
    match run(
        kv,
        now,
        Request::Take {
            top,
            dedup: dedup(key),
        },
    ) {
        Response::Taken { items, .. } => items,
        other => panic!("take answered {other:?}"),
    }
}

fn tick(kv: &mut MemKv, now: Millis) -> TickReport {
    tick_with(kv, now, params())
}

fn tick_with(kv: &mut MemKv, now: Millis, p: TickParams) -> TickReport {
    match run(kv, now, Request::Tick(p)) {
        Response::Ticked(report) => report,
        other => panic!("tick answered {other:?}"),
    }
}

fn status(kv: &MemKv, id: WorkId) -> Status {
    item(kv, id).unwrap().expect("item exists").status
}

/// Recounts everything by scanning and compares with the incremental counters, and checks
/// that every item sits in exactly the index its status names.
fn check_invariants(kv: &MemKv) {
    let meta = read_meta(kv).unwrap();
    let mut counts = Counts {
        enqueued_total: meta.counts.enqueued_total,
        completed_total: meta.counts.completed_total,
        pulled_total: meta.counts.pulled_total,
        expired_total: meta.counts.expired_total,
        completed_iterations_total: meta.counts.completed_iterations_total,
        dropped_total: meta.counts.dropped_total,
        ..Counts::default()
    };
    let (start, end) = keys::table(keys::ITEM);
    let items: Vec<(WorkId, Item)> = kv
        .scan(&start, &end, false)
        .map(|r| {
            let (k, v) = r.unwrap();
            (
                WorkId(keys::u64_at(&k, 1).unwrap()),
                codec::decode("item", &v).unwrap(),
            )
        })
        .collect();
    let (mut completed_index, mut cancelled) = (0, 0);
    let mut by_priority = [0u64; 10];
    let with_records = cluster_version(kv).unwrap() < crate::version::ITEM_PAYLOADS;
    // The payloads read off the items are those the records name (none from version 5), in
    // the records' order: log order.
    let records = payload_records(kv);
    let live = live_payloads(kv).unwrap();
    if with_records {
        assert_eq!(records, live, "payload records against the items");
    } else {
        assert!(
            records.is_empty(),
            "payload records at version 5: {records:?}"
        );
    }
    assert_eq!(payload_floor(kv).unwrap(), live.first().map(|at| at.index));
    for (id, it) in &items {
        let priority = match KvRead::get(kv, &keys::priority(*id)).unwrap() {
            Some(p) => {
                assert_ne!(p[0], crate::types::DEFAULT_PRIORITY, "{id}: default kept");
                p[0]
            }
            None => crate::types::DEFAULT_PRIORITY,
        };
        let in_queue = kv.contains_key(&keys::queue_of(priority, *id));
        if it.status == Status::Queued {
            by_priority[usize::from(priority)] += 1;
        }
        let in_dead = it
            .dead_at
            .is_some_and(|at| kv.contains_key(&keys::dead(at, *id)));
        // Before version 5 a live item has its payload record; from it, none does.
        let has_payload = kv.contains_key(&keys::payload(&it.payload)) == with_records;
        match it.status {
            Status::Queued => {
                counts.queued += 1;
                counts.queued_iterations += u64::from(it.iterations);
                assert!(in_queue && it.lease.is_none(), "queued {id} not in queue");
            }
            Status::Running => {
                counts.running += 1;
                let l = it.lease.expect("running has lease");
                assert!(
                    kv.contains_key(&keys::lease(l.deadline, *id)),
                    "lease index of {id}"
                );
                assert!(
                    kv.contains_key(&keys::owner(l.worker, *id)),
                    "owner index of {id}"
                );
                assert!(!in_queue);
            }
            Status::Completed => {
                counts.completed += 1;
                completed_index += 1;
                assert!(it.value.is_some() && (!with_records || !has_payload) && !in_queue);
            }
            Status::Pulled => {
                counts.pulled += 1;
                assert!(kv.contains_key(&keys::pulled(it.pulled_at.unwrap(), *id)));
            }
            Status::Dead => {
                counts.dead += 1;
                assert!(in_dead && !in_queue && it.lease.is_none());
            }
            Status::Cancelled => {
                cancelled += 1;
                assert!(in_dead && !in_queue && it.lease.is_none());
            }
        }
        if matches!(
            it.status,
            Status::Queued | Status::Running | Status::Dead | Status::Cancelled
        ) {
            assert!(has_payload, "payload of {id} kept until completion");
            counts.payload_bytes += u64::from(it.payload_len);
        }
    }
    // Every queued item is in exactly its priority's queue, and each queue counts right.
    let queues: u64 = [keys::QUEUE, keys::PRIORITY_QUEUE]
        .iter()
        .map(|t| {
            let (s, e) = keys::table(*t);
            kv.scan(&s, &e, false).count() as u64
        })
        .sum();
    assert_eq!(queues, counts.queued, "queue entries");
    let (s, e) = keys::table(keys::PRIORITY);
    assert!(kv.scan(&s, &e, false).count() <= items.len());
    let want: Vec<(u8, u64)> = (0..10u8)
        .rev()
        .map(|p| (p, by_priority[usize::from(p)]))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(queued_by_priority(kv).unwrap(), want);
    let (s, e) = keys::table(keys::COMPLETED);
    assert_eq!(kv.scan(&s, &e, false).count(), completed_index);
    let (s, e) = keys::table(keys::DEAD);
    assert_eq!(
        kv.scan(&s, &e, false).count() as u64,
        counts.dead + cancelled
    );
    assert_eq!(tallies(kv).unwrap().cancelled, cancelled);
    let (s, e) = keys::table(keys::LEASE);
    assert_eq!(kv.scan(&s, &e, false).count() as u64, counts.running);
    let (s, e) = keys::table(keys::OWNER);
    assert_eq!(kv.scan(&s, &e, false).count() as u64, counts.running);
    let leased: u64 = workers(kv)
        .unwrap()
        .iter()
        .map(|w| u64::from(w.leased))
        .sum();
    assert!(leased <= counts.running);
    assert_eq!(meta.counts, counts);
}

#[test]
fn enqueue_lease_complete_take_in_order() {
    let mut kv = MemKv::new();
    let w = register(&mut kv, 10);
    let ids: Vec<WorkId> = (0..4).map(|i| enqueue(&mut kv, 100 + i, 5, None)).collect();
    // FIFO: the first two leased are the first two enqueued.
    let got = lease(&mut kv, 200, w, 2, 1);
    assert_eq!(got.iter().map(|l| l.id).collect::<Vec<_>>(), ids[..2]);
    assert!(got
        .iter()
        .all(|l| l.attempt == 1 && l.deadline == 200 + LEASE_MS && l.iterations == 5));
    let got2 = lease(&mut kv, 201, w, 10, 2);
    assert_eq!(got2.iter().map(|l| l.id).collect::<Vec<_>>(), ids[2..]);
    assert!(lease(&mut kv, 202, w, 10, 3).is_empty(), "queue is empty");
    check_invariants(&kv);

    // Complete in the order 2, 0, 3, 1: take returns the most recently completed first.
    for (n, idx) in [2usize, 0, 3, 1].iter().enumerate() {
        assert_eq!(
            complete(&mut kv, 300 + n as u64, w, ids[*idx], 1, *idx as u8),
            (1, 0)
        );
    }
    assert_eq!(status(&kv, ids[0]), Status::Completed);
    check_invariants(&kv);
    let first = take(&mut kv, 400, 3, None);
    assert_eq!(
        first.iter().map(|t| t.0).collect::<Vec<_>>(),
        vec![ids[1], ids[3], ids[0]]
    );
    assert_eq!(first[0].1, digest(1));
    // Taken items are removed: the next take gets only the rest.
    let second = take(&mut kv, 401, 3, None);
    assert_eq!(second.iter().map(|t| t.0).collect::<Vec<_>>(), vec![ids[2]]);
    assert!(take(&mut kv, 402, 3, None).is_empty());
    assert_eq!(status(&kv, ids[2]), Status::Pulled);
    check_invariants(&kv);
}

#[test]
fn expired_lease_requeues_with_another_attempt_in_original_order() {
    let mut kv = MemKv::new();
    let w = register(&mut kv, 0);
    let a = enqueue(&mut kv, 1, 1, None);
    let b = enqueue(&mut kv, 2, 1, None);
    assert_eq!(lease(&mut kv, 10, w, 1, 1)[0].id, a);
    // Not yet expired at the deadline minus one.
    assert_eq!(tick(&mut kv, 10 + LEASE_MS - 1).expired, 0);
    assert_eq!(status(&kv, a), Status::Running);
    let report = tick(&mut kv, 10 + LEASE_MS);
    assert_eq!((report.expired, report.dead), (1, 0));
    assert_eq!(status(&kv, a), Status::Queued);
    check_invariants(&kv);
    // `a` is back at the head of the queue, ahead of `b`, with attempt 2.
    let again = lease(&mut kv, 2000, w, 1, 2);
    assert_eq!((again[0].id, again[0].attempt), (a, 2));
    assert_eq!(item(&kv, a).unwrap().unwrap().attempts, 2);
    assert_eq!(lease(&mut kv, 2001, w, 1, 3)[0].id, b);
    check_invariants(&kv);
}

#[test]
fn heartbeat_extends_lease_and_reports_lost_items() {
    let mut kv = MemKv::new();
    let w = register(&mut kv, 0);
    let a = enqueue(&mut kv, 1, 1, None);
    let b = enqueue(&mut kv, 1, 1, None);
    lease(&mut kv, 10, w, 2, 1);
    let hb = run(
        &mut kv,
        900,
        Request::Heartbeat {
            worker: w,
            secret: SECRET,
            items: vec![(a, 1), (b, 7), (WorkId(999), 1)],
            lease_ms: LEASE_MS,
            parent: Some(3),
        },
    );
    assert_eq!(
        hb,
        Response::HeartbeatAck {
            valid: vec![a],
            lost: vec![b, WorkId(999)]
        }
    );
    // The worker re-parented itself with that heartbeat.
    assert_eq!(workers(&kv).unwrap()[0].parent, 3);
    // b's lease ran out at 1010, a's was extended to 1900.
    let report = tick(&mut kv, 1500);
    assert_eq!(report.expired, 1);
    assert_eq!(status(&kv, a), Status::Running);
    assert_eq!(status(&kv, b), Status::Queued);
    check_invariants(&kv);
}

#[test]
fn stale_completion_after_release_is_fenced_off() {
    let mut kv = MemKv::new();
    let slow = register(&mut kv, 0);
    let fast = register(&mut kv, 0);
    let id = enqueue(&mut kv, 1, 1, None);
    assert_eq!(lease(&mut kv, 10, slow, 1, 1)[0].attempt, 1);
    tick(&mut kv, 10 + LEASE_MS);
    assert_eq!(lease(&mut kv, 2000, fast, 1, 1)[0].attempt, 2);
    // The first worker finally finishes: its attempt is stale and is ignored.
    assert_eq!(complete(&mut kv, 2001, slow, id, 1, 0xaa), (0, 1));
    assert_eq!(status(&kv, id), Status::Running);
    assert_eq!(complete(&mut kv, 2002, fast, id, 2, 0xbb), (1, 0));
    assert_eq!(item(&kv, id).unwrap().unwrap().value, Some(digest(0xbb)));
    check_invariants(&kv);
}

#[test]
fn stale_completion_while_requeued_is_ignored() {
    let mut kv = MemKv::new();
    let w = register(&mut kv, 0);
    let id = enqueue(&mut kv, 1, 1, None);
    lease(&mut kv, 10, w, 1, 1);
    tick(&mut kv, 10 + LEASE_MS);
    assert_eq!(complete(&mut kv, 2000, w, id, 1, 1), (0, 1));
    assert_eq!(status(&kv, id), Status::Queued);
    check_invariants(&kv);
}

#[test]
fn duplicate_completion_keeps_the_first_result() {
    let mut kv = MemKv::new();
    let w = register(&mut kv, 0);
    let id = enqueue(&mut kv, 1, 1, None);
    lease(&mut kv, 10, w, 1, 1);
    assert_eq!(complete(&mut kv, 20, w, id, 1, 1), (1, 0));
    assert_eq!(complete(&mut kv, 21, w, id, 1, 2), (0, 1));
    assert_eq!(
        complete(&mut kv, 22, w, WorkId(77), 1, 2),
        (0, 1),
        "unknown id"
    );
    let taken = take(&mut kv, 30, 10, None);
    assert_eq!(taken, vec![(id, digest(1))]);
    // A completion after the pull changes nothing either.
    assert_eq!(complete(&mut kv, 31, w, id, 1, 3), (0, 1));
    assert!(take(&mut kv, 32, 10, None).is_empty());
    assert_eq!(read_meta(&kv).unwrap().counts.completed_total, 1);
    check_invariants(&kv);
}

#[test]
fn item_dies_after_max_attempts_and_stays_visible() {
    let mut kv = MemKv::new();
    let w = register(&mut kv, 0);
    let id = enqueue(&mut kv, 1, 1, None);
    let mut now = 10;
    for attempt in 1..=3 {
        let got = lease(&mut kv, now, w, 1, attempt.into());
        assert_eq!(got[0].attempt, attempt);
        now += LEASE_MS;
        let report = tick(&mut kv, now);
        assert_eq!(report.dead, u32::from(attempt == 3));
        // keep the worker alive
        run(
            &mut kv,
            now,
            Request::Heartbeat {
                worker: w,
                secret: SECRET,
                items: vec![],
                lease_ms: LEASE_MS,
                parent: None,
            },
        );
    }
    let it = item(&kv, id).unwrap().unwrap();
    assert_eq!((it.status, it.attempts), (Status::Dead, 3));
    assert!(it.dead_reason.is_some());
    let dead = list_items(&kv, Status::Dead, None, 10, 100).unwrap();
    assert_eq!(
        dead.items.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![id]
    );
    assert!(
        lease(&mut kv, now, w, 1, 9).is_empty(),
        "dead items are not leased"
    );
    assert_eq!(read_meta(&kv).unwrap().counts.dead, 1);
    check_invariants(&kv);
}

#[test]
fn idempotent_enqueue_returns_the_same_id_until_the_key_expires() {
    let mut kv = MemKv::new();
    let a = enqueue(&mut kv, 1, 5, Some("k1"));
    let again = run(
        &mut kv,
        2,
        Request::Enqueue {
            iterations: 9,
            payload: Bytes::from(b"other".to_vec()),
            dedup: dedup(Some("k1")),
        },
    );
    assert_eq!(
        again,
        Response::Enqueued {
            id: a,
            duplicate: true
        }
    );
    assert_eq!(read_meta(&kv).unwrap().counts.enqueued_total, 1);
    let b = enqueue(&mut kv, 3, 5, Some("k2"));
    assert_ne!(a, b);
    // After the retention window the key is forgotten; the same key then enqueues anew.
    assert_eq!(tick(&mut kv, KEY_TTL_MS).forgotten, 0);
    let report = tick(&mut kv, 1 + KEY_TTL_MS);
    assert_eq!(report.forgotten, 1);
    let c = enqueue(&mut kv, 2 + KEY_TTL_MS, 5, Some("k1"));
    assert_ne!(c, a);
    check_invariants(&kv);
}

fn in_batch(key: &str, slot: u32, iterations: u32) -> Request {
    Request::EnqueueInBatch {
        iterations,
        payload: Bytes::from(format!("{key}-{slot}").into_bytes()),
        batch: BatchSlot {
            key: key.to_string(),
            slot,
            ttl_ms: KEY_TTL_MS,
        },
    }
}

fn run_all(kv: &mut MemKv, now: Millis, requests: Vec<Request>) -> Vec<Response> {
    let command = Command {
        now,
        mono: now,
        limits: StoreLimits::UNLIMITED,
        requests,
    };
    apply(kv, &command, next_at()).expect("apply")
}

fn table_len(kv: &MemKv, tag: u8) -> usize {
    let (start, end) = keys::table(tag);
    kv.scan(&start, &end, false).count()
}

#[test]
fn a_batch_slot_applies_once_whichever_entry_carries_it_and_one_record_serves_the_batch() {
    let mut kv = MemKv::new();
    let first = run_all(
        &mut kv,
        1,
        vec![
            in_batch("b", 0, 1),
            in_batch("b", 1, 2),
            in_batch("b", 3, 3),
        ],
    );
    let ids: Vec<WorkId> = first
        .iter()
        .map(|r| match r {
            Response::Enqueued {
                id,
                duplicate: false,
            } => *id,
            other => panic!("enqueue answered {other:?}"),
        })
        .collect();
    // The whole batch is one record and one expiry entry, not two keys per request.
    assert_eq!(table_len(&kv, keys::ENQUEUE_KEY), 1);
    assert_eq!(table_len(&kv, keys::KEY_EXPIRY), 1);
    // Slot 1 retried in a later entry, next to requests of another batch: the first id.
    let retried = run_all(&mut kv, 2, vec![in_batch("c", 0, 1), in_batch("b", 1, 9)]);
    assert_eq!(
        retried[1],
        Response::Enqueued {
            id: ids[1],
            duplicate: true
        }
    );
    // Slot 2 of "b" was never applied: its retry, even after the batch's record exists,
    // adds its item; the original entry arriving late then finds it.
    let late = run(&mut kv, 3, in_batch("b", 2, 4));
    let Response::Enqueued {
        id: slot2,
        duplicate: false,
    } = late
    else {
        panic!("retry of an unapplied slot answered {late:?}");
    };
    assert_eq!(
        run(&mut kv, 4, in_batch("b", 2, 4)),
        Response::Enqueued {
            id: slot2,
            duplicate: true
        }
    );
    // The same slot twice in one entry is still one item.
    let twice = run_all(&mut kv, 5, vec![in_batch("d", 0, 1), in_batch("d", 0, 1)]);
    let Response::Enqueued { id: d0, .. } = twice[0] else {
        panic!("enqueue answered {:?}", twice[0]);
    };
    assert_eq!(
        twice[1],
        Response::Enqueued {
            id: d0,
            duplicate: true
        }
    );
    let meta = read_meta(&kv).unwrap();
    assert_eq!(meta.counts.enqueued_total, 6, "b0 b1 b3 c0 b2 d0");
    assert_eq!(table_len(&kv, keys::ENQUEUE_KEY), 3);
    check_invariants(&kv);
    // The records are forgotten with their ttl, like client keys.
    let report = tick(&mut kv, 6 + KEY_TTL_MS);
    assert_eq!(report.forgotten, 3);
    assert_eq!(table_len(&kv, keys::ENQUEUE_KEY), 0);
    assert_eq!(table_len(&kv, keys::KEY_EXPIRY), 0);
    check_invariants(&kv);
}

#[test]
fn a_tick_between_slots_of_one_entry_sees_the_batch_record_as_written() {
    let mut kv = MemKv::new();
    run_all(&mut kv, 1, vec![in_batch("e", 0, 1)]);
    // One entry, past the record's ttl: a slot joins the record, the tick forgets it, and
    // the next slot starts a record of its own, which expires in its turn (no record is
    // left without its expiry, which would keep it forever).
    let later = 2 + KEY_TTL_MS;
    let answers = run_all(
        &mut kv,
        later,
        vec![
            in_batch("e", 1, 1),
            Request::Tick(params()),
            in_batch("e", 2, 1),
        ],
    );
    let Response::Ticked(report) = &answers[1] else {
        panic!("tick answered {:?}", answers[1]);
    };
    assert_eq!(report.forgotten, 1);
    assert_eq!(table_len(&kv, keys::ENQUEUE_KEY), 1);
    assert_eq!(table_len(&kv, keys::KEY_EXPIRY), 1);
    assert_eq!(tick(&mut kv, later + KEY_TTL_MS).forgotten, 1);
    assert_eq!(table_len(&kv, keys::ENQUEUE_KEY), 0);
    check_invariants(&kv);
}

#[test]
fn a_large_batch_in_one_entry_is_one_record_with_every_slot() {
    let mut kv = MemKv::new();
    let n = 5_000;
    let first = run_all(&mut kv, 1, (0..n).map(|s| in_batch("big", s, 1)).collect());
    assert!(first.iter().all(|r| matches!(
        r,
        Response::Enqueued {
            duplicate: false,
            ..
        }
    )));
    // The whole batch retried in one later entry: every slot finds its first id.
    let again = run_all(&mut kv, 2, (0..n).map(|s| in_batch("big", s, 1)).collect());
    for (a, b) in first.iter().zip(&again) {
        let (Response::Enqueued { id: a, .. }, Response::Enqueued { id: b, duplicate }) = (a, b)
        else {
            panic!("enqueue answered {a:?} then {b:?}");
        };
        assert_eq!((a, *duplicate), (b, true));
    }
    assert_eq!(table_len(&kv, keys::ENQUEUE_KEY), 1);
    assert_eq!(read_meta(&kv).unwrap().counts.enqueued_total, u64::from(n));
}

#[test]
fn idempotent_take_replays_the_same_items() {
    let mut kv = MemKv::new();
    let w = register(&mut kv, 0);
    let ids: Vec<WorkId> = (0..3).map(|i| enqueue(&mut kv, i, 1, None)).collect();
    lease(&mut kv, 10, w, 3, 1);
    for (n, id) in ids.iter().enumerate() {
        complete(&mut kv, 20 + n as u64, w, *id, 1, n as u8);
    }
    let first = take(&mut kv, 30, 2, Some("pull-1"));
    assert_eq!(first.len(), 2);
    let replay = run(
        &mut kv,
        31,
        Request::Take {
            top: 2,
            dedup: dedup(Some("pull-1")),
        },
    );
    assert_eq!(
        replay,
        Response::Taken {
            items: first.clone(),
            replay: true
        }
    );
    // Another call without the key gets only what is left.
    let rest = take(&mut kv, 32, 10, None);
    assert_eq!(rest.len(), 1);
    assert!(!first.iter().any(|t| t.0 == rest[0].0));
    check_invariants(&kv);
}

#[test]
fn pulled_items_are_forgotten_after_retention() {
    let mut kv = MemKv::new();
    let w = register(&mut kv, 0);
    let id = enqueue(&mut kv, 0, 1, None);
    lease(&mut kv, 1, w, 1, 1);
    complete(&mut kv, 2, w, id, 1, 1);
    take(&mut kv, 3, 1, None);
    assert!(!tick_due(&kv, 4, &params()).unwrap() || tick(&mut kv, 4).forgotten == 0);
    let later = 3 + params().pulled_retention_ms;
    assert!(tick_due(&kv, later, &params()).unwrap());
    assert_eq!(tick(&mut kv, later).forgotten, 1);
    assert!(item(&kv, id).unwrap().is_none());
    check_invariants(&kv);
}

#[test]
fn retried_lease_request_gets_the_same_grant() {
    let mut kv = MemKv::new();
    let w = register(&mut kv, 0);
    for i in 0..4 {
        enqueue(&mut kv, i, 1, None);
    }
    let first = lease(&mut kv, 10, w, 2, 42);
    let retry = lease(&mut kv, 11, w, 2, 42);
    assert_eq!(first, retry);
    let next = lease(&mut kv, 12, w, 2, 43);
    assert!(next.iter().all(|n| !first.contains(n)));
    // A late duplicate of the first request (the worker has moved on) gets nothing.
    let before = read_meta(&kv).unwrap().counts;
    assert!(lease(&mut kv, 13, w, 2, 42).is_empty());
    assert_eq!(read_meta(&kv).unwrap().counts, before);
    assert_eq!(read_meta(&kv).unwrap().counts.running, 4);
    check_invariants(&kv);
}

#[test]
fn a_lease_grants_a_bounded_number_of_payload_bytes_but_at_least_one_item() {
    let mut kv = MemKv::new();
    let w = register(&mut kv, 0);
    let big = (MAX_LEASE_BYTES / 3 + 1) as usize;
    for i in 0..4 {
        run(
            &mut kv,
            i,
            Request::Enqueue {
                iterations: 1,
                payload: Bytes::from(vec![b'x'; big]),
                dedup: None,
            },
        );
    }
    // Two fit in the byte budget, a third would not.
    assert_eq!(lease(&mut kv, 10, w, 100, 1).len(), 2);
    assert_eq!(lease(&mut kv, 11, w, 1, 2).len(), 1);
    // An item bigger than the budget on its own is still granted, alone.
    run(
        &mut kv,
        12,
        Request::Enqueue {
            iterations: 1,
            payload: Bytes::from(vec![b'y'; MAX_LEASE_BYTES as usize + 1]),
            dedup: None,
        },
    );
    assert_eq!(lease(&mut kv, 13, w, 100, 3).len(), 1);
    assert_eq!(lease(&mut kv, 14, w, 100, 4).len(), 1);
    assert_eq!(read_meta(&kv).unwrap().counts.queued, 0);
    check_invariants(&kv);
}

#[test]
fn beyond_its_minimum_a_lease_takes_items_only_within_its_iteration_budget() {
    let mut kv = MemKv::new();
    let w = register(&mut kv, 0);
    let quick: Vec<WorkId> = (0..3).map(|i| enqueue(&mut kv, i, 1, None)).collect();
    let slow = enqueue(&mut kv, 3, 1_000_000, None);
    let later = enqueue(&mut kv, 4, 1, None);
    let ask = |kv: &mut MemKv, now, min, max_iterations, request_id| match run(
        kv,
        now,
        Request::Lease {
            worker: w,
            secret: SECRET,
            max: 10,
            min,
            max_iterations,
            lease_ms: LEASE_MS,
            request_id,
        },
    ) {
        Response::Leased { items } => items.iter().map(|i| i.id).collect::<Vec<_>>(),
        other => panic!("lease answered {other:?}"),
    };
    // The quick items fit the budget; the slow one stops the grant (FIFO: nothing skips it).
    assert_eq!(ask(&mut kv, 10, 0, 100, 1), quick);
    // With no minimum, a head item over the budget is not granted at all.
    assert!(ask(&mut kv, 11, 0, 100, 2).is_empty());
    // Within the minimum it is, whatever its size; the rest still counts against the budget.
    assert_eq!(ask(&mut kv, 12, 1, 100, 3), vec![slow]);
    assert_eq!(ask(&mut kv, 13, 0, 100, 4), vec![later]);
    check_invariants(&kv);
}

#[test]
fn unknown_workers_are_rejected() {
    let mut kv = MemKv::new();
    enqueue(&mut kv, 0, 1, None);
    let ghost = WorkerId(99);
    assert_eq!(
        run(
            &mut kv,
            1,
            Request::Lease {
                worker: ghost,
                secret: SECRET,
                max: 1,
                min: 1,
                max_iterations: u64::MAX,
                lease_ms: 10,
                request_id: 1
            }
        ),
        Response::Rejected(Rejection::UnknownWorker(ghost))
    );
    assert_eq!(
        run(
            &mut kv,
            1,
            Request::Register {
                slot: Some(ghost),
                parent: 1,
                host: String::new(),
                handle: String::new(),
                secret: SECRET,
            }
        ),
        Response::Rejected(Rejection::UnknownSlot(ghost))
    );
    assert_eq!(read_meta(&kv).unwrap().counts.queued, 1);
}

#[test]
fn budget_is_never_exceeded_and_slots_come_back() {
    let mut kv = MemKv::new();
    run(
        &mut kv,
        0,
        Request::SetMaxWorkers {
            max: 2,
            only_if_unset: true,
        },
    );
    // A later bootstrap default does not override the first.
    run(
        &mut kv,
        0,
        Request::SetMaxWorkers {
            max: 9,
            only_if_unset: true,
        },
    );
    let reserve = |kv: &mut MemKv, now| match run(
        kv,
        now,
        Request::Reserve {
            parent: 1,
            incarnation: 7,
        },
    ) {
        Response::Reserved { worker } => worker,
        other => panic!("{other:?}"),
    };
    let a = reserve(&mut kv, 1).expect("slot 1");
    let b = reserve(&mut kv, 2).expect("slot 2");
    assert_eq!(reserve(&mut kv, 3), None, "budget of 2 is full");
    // An external worker does not take a slot.
    register(&mut kv, 3);
    assert_eq!(reserve(&mut kv, 3), None);

    // a registers and works; b never comes up and its slot times out.
    assert_eq!(
        run(
            &mut kv,
            4,
            Request::Register {
                slot: Some(a),
                parent: 1,
                host: "h".into(),
                handle: "pid:1".into(),
                secret: SECRET,
            }
        ),
        Response::Registered { worker: a }
    );
    let id = enqueue(&mut kv, 5, 1, None);
    lease(&mut kv, 6, a, 1, 1);
    let report = tick(&mut kv, 2 + params().launch_timeout_ms);
    assert_eq!(report.lost_workers, vec![(b, String::new())]);
    let c = reserve(&mut kv, 5_010).expect("b's slot came back");

    // a goes silent: declared lost, its lease reclaimed at once, its slot freed.
    let t = 6 + params().worker_lost_ms;
    let report = tick(&mut kv, t);
    assert!(report
        .lost_workers
        .iter()
        .any(|(w, h)| *w == a && h == "pid:1"));
    assert_eq!(status(&kv, id), Status::Queued);
    let d = reserve(&mut kv, t + 1).expect("a's slot came back");
    assert_eq!(reserve(&mut kv, t + 1), None);
    // A lost worker that comes back cannot reclaim its old slot.
    assert_eq!(
        run(
            &mut kv,
            t + 2,
            Request::Register {
                slot: Some(a),
                parent: 1,
                host: String::new(),
                handle: String::new(),
                secret: SECRET,
            }
        ),
        Response::Rejected(Rejection::UnknownSlot(a))
    );
    // Exit and launch failure free slots too.
    run(
        &mut kv,
        t + 3,
        Request::LaunchFailed {
            worker: c,
            reason: "no capacity".into(),
        },
    );
    run(
        &mut kv,
        t + 3,
        Request::Register {
            slot: Some(d),
            parent: 2,
            host: String::new(),
            handle: String::new(),
            secret: SECRET,
        },
    );
    run(
        &mut kv,
        t + 4,
        Request::Exit {
            worker: d,
            secret: SECRET,
        },
    );
    let managed = workers(&kv).unwrap().iter().filter(|w| w.managed).count();
    assert_eq!(managed, 0);
    check_invariants(&kv);
}

#[test]
fn a_slot_is_claimed_by_one_process_only() {
    let mut kv = MemKv::new();
    run(
        &mut kv,
        0,
        Request::SetMaxWorkers {
            max: 1,
            only_if_unset: false,
        },
    );
    let Response::Reserved { worker: Some(slot) } = run(
        &mut kv,
        1,
        Request::Reserve {
            parent: 1,
            incarnation: 7,
        },
    ) else {
        panic!("no slot")
    };
    let register = |kv: &mut MemKv, handle: &str| {
        run(
            kv,
            2,
            Request::Register {
                slot: Some(slot),
                parent: 1,
                host: "h".into(),
                handle: handle.into(),
                secret: SECRET,
            },
        )
    };
    run(
        &mut kv,
        1,
        Request::Launched {
            worker: slot,
            handle: "pid:10".into(),
        },
    );
    // Another process for the same slot (a relaunch after a crash) is refused...
    assert_eq!(
        register(&mut kv, "pid:11"),
        Response::Rejected(Rejection::UnknownSlot(slot))
    );
    // ...the launched one gets it, and may retry its registration.
    assert_eq!(
        register(&mut kv, "pid:10"),
        Response::Registered { worker: slot }
    );
    assert_eq!(
        register(&mut kv, "pid:10"),
        Response::Registered { worker: slot }
    );
    assert_eq!(
        register(&mut kv, "pid:11"),
        Response::Rejected(Rejection::UnknownSlot(slot))
    );
    // A late `Launched` does not overwrite the handle of the process that registered.
    run(
        &mut kv,
        3,
        Request::Launched {
            worker: slot,
            handle: "pid:12".into(),
        },
    );
    assert_eq!(workers(&kv).unwrap()[0].handle, "pid:10");
}

#[test]
fn a_forgotten_worker_frees_its_slot_and_its_items_count_an_attempt() {
    let mut kv = MemKv::new();
    let w = register(&mut kv, 0);
    let id = enqueue(&mut kv, 0, 1, None);
    lease(&mut kv, 1, w, 1, 1);
    run(
        &mut kv,
        2,
        Request::Forget {
            worker: w,
            max_attempts: 3,
        },
    );
    let it = item(&kv, id).unwrap().unwrap();
    assert_eq!((it.status, it.attempts), (Status::Queued, 1));
    assert_eq!(read_meta(&kv).unwrap().counts.expired_total, 1);
    assert!(workers(&kv).unwrap().is_empty());
    check_invariants(&kv);
}

#[test]
fn exit_returns_leases_to_the_queue_without_killing_items() {
    let mut kv = MemKv::new();
    let w = register(&mut kv, 0);
    let id = enqueue(&mut kv, 0, 1, None);
    lease(&mut kv, 1, w, 1, 1);
    run(
        &mut kv,
        2,
        Request::Exit {
            worker: w,
            secret: SECRET,
        },
    );
    assert_eq!(status(&kv, id), Status::Queued);
    assert!(workers(&kv).unwrap().is_empty());
    check_invariants(&kv);
}

#[test]
fn time_never_runs_backwards() {
    let mut kv = MemKv::new();
    enqueue(&mut kv, 1_000, 1, None);
    // A new leader with a slower clock proposes an earlier time.
    let id = enqueue(&mut kv, 500, 1, None);
    assert_eq!(item(&kv, id).unwrap().unwrap().enqueued_at, 1_000);
    assert_eq!(read_meta(&kv).unwrap().now, 1_000);
}

#[test]
fn invalid_requests_change_nothing() {
    let mut kv = MemKv::new();
    let before = kv.clone();
    let r = run(
        &mut kv,
        1,
        Request::Enqueue {
            iterations: 0,
            payload: Bytes::new(),
            dedup: None,
        },
    );
    assert!(matches!(r, Response::Rejected(Rejection::Invalid(_))));
    let meta = read_meta(&kv).unwrap();
    assert_eq!(meta.counts, Counts::default());
    assert_eq!(
        kv.len(),
        before.len() + 1,
        "only the meta record (time) is written"
    );
}

/// A tiny deterministic generator, so the test needs no randomness source.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn random_log(seed: u64, len: usize) -> Vec<Command> {
    let mut rng = Lcg(seed);
    let mut log = Vec::new();
    let mut now = 0;
    let mut leased: Vec<(WorkerId, WorkId, u32)> = Vec::new();
    // Dead and cancelled items, for retries that apply.
    let mut given_up: Vec<WorkId> = Vec::new();
    for i in 0..len {
        now += rng.next() % 400;
        let mut requests = Vec::new();
        for _ in 0..1 + rng.next() % 4 {
            let worker = WorkerId(rng.next() % 3);
            let r = match rng.next() % 10 {
                0 if rng.next().is_multiple_of(2) => Request::EnqueueInBatch {
                    iterations: 1 + (rng.next() % 100) as u32,
                    payload: Bytes::from(vec![(i % 251) as u8; (rng.next() % 64) as usize]),
                    batch: BatchSlot {
                        key: format!("b{}", rng.next() % 20),
                        slot: (rng.next() % 4) as u32,
                        ttl_ms: 4_000,
                    },
                },
                1 if rng.next().is_multiple_of(3) => Request::EnqueueBatch {
                    items: (0..1 + rng.next() % 5)
                        .map(|_| BatchItem {
                            iterations: 1 + (rng.next() % 100) as u32,
                            priority: (rng.next() % 10) as u8,
                            payload: Bytes::from(vec![(i % 251) as u8; (rng.next() % 64) as usize]),
                        })
                        .collect(),
                    dedup: Dedup {
                        key: format!("bk{}", rng.next() % 30),
                        ttl_ms: 4_000,
                    },
                },
                0..=2 => Request::Enqueue {
                    iterations: 1 + (rng.next() % 100) as u32,
                    payload: Bytes::from(vec![(i % 251) as u8; (rng.next() % 64) as usize]),
                    dedup: rng.next().is_multiple_of(3).then(|| Dedup {
                        key: format!("k{}", rng.next() % 50),
                        ttl_ms: 4_000,
                    }),
                },
                3 => Request::Register {
                    slot: None,
                    parent: 1,
                    host: String::new(),
                    handle: String::new(),
                    secret: SECRET,
                },
                4 => Request::Lease {
                    worker,
                    secret: SECRET,
                    max: 1 + (rng.next() % 3) as u32,
                    min: (rng.next() % 3) as u32,
                    max_iterations: [0, 5, u64::MAX][(rng.next() % 3) as usize],
                    lease_ms: 500,
                    request_id: rng.next(),
                },
                5 => {
                    let (w, id, attempt) = leased
                        .get((rng.next() as usize) % leased.len().max(1))
                        .copied()
                        .unwrap_or((worker, WorkId(rng.next() % 20), 1));
                    Request::Complete {
                        worker: w,
                        secret: SECRET,
                        results: vec![Completion {
                            id,
                            attempt,
                            value: Digest::new([rng.next() as u8; 64]),
                        }],
                    }
                }
                6 => Request::Take {
                    top: (rng.next() % 4) as u32,
                    dedup: rng.next().is_multiple_of(2).then(|| Dedup {
                        key: format!("t{}", rng.next() % 10),
                        ttl_ms: 4_000,
                    }),
                },
                7 => Request::Tick(TickParams {
                    max_attempts: 2,
                    worker_lost_ms: 3_000,
                    launch_timeout_ms: 1_000,
                    pulled_retention_ms: 2_000,
                    completed_retention_ms: 60_000,
                    dead_retention_ms: 60_000,
                    limit: 5,
                }),
                8 => Request::Heartbeat {
                    worker,
                    secret: SECRET,
                    items: leased
                        .iter()
                        .filter(|l| l.0 == worker)
                        .map(|l| (l.1, l.2))
                        .collect(),
                    lease_ms: 500,
                    parent: Some(1 + rng.next() % 3),
                },
                _ => match rng.next() % 5 {
                    3 => Request::Cancel {
                        id: WorkId(rng.next() % 20),
                    },
                    4 => Request::Retry {
                        id: given_up
                            .get((rng.next() as usize) % given_up.len().max(1))
                            .copied()
                            .unwrap_or(WorkId(rng.next() % 20)),
                    },
                    0 => Request::SetMaxWorkers {
                        max: (rng.next() % 3) as u32,
                        only_if_unset: false,
                    },
                    1 => Request::Reserve {
                        parent: 2,
                        incarnation: 7,
                    },
                    _ => Request::Exit {
                        worker,
                        secret: SECRET,
                    },
                },
            };
            requests.push(r);
        }
        // Learn what was leased by replaying into a scratch state, so completions and
        // heartbeats name real (worker, item, attempt) triples often.
        log.push(Command {
            now,
            mono: now,
            limits: StoreLimits::UNLIMITED,
            requests,
        });
        let mut scratch = MemKv::new();
        for (i, c) in log.iter().enumerate() {
            for (req, resp) in c
                .requests
                .iter()
                .zip(apply(&mut scratch, c, at(i)).unwrap())
            {
                if let (Request::Lease { worker, .. }, Response::Leased { items }) = (req, resp) {
                    leased.extend(items.iter().map(|l| (*worker, l.id, l.attempt)));
                }
            }
        }
        leased.truncate(64);
        let (start, end) = keys::table(keys::DEAD);
        given_up = scratch
            .scan(&start, &end, false)
            .filter_map(|r| match Key::decode(&r.unwrap().0) {
                Some(Key::Dead { id, .. }) => Some(id),
                _ => None,
            })
            .collect();
    }
    log
}

#[test]
fn the_same_log_gives_byte_identical_state_and_answers() {
    let mut totals = Counts::default();
    let mut redriven = crate::types::Tallies::default();
    for seed in 1..=5 {
        let log = random_log(seed, 120);
        let mut a = MemKv::new();
        let mut b = MemKv::new();
        let mut answers_a = Vec::new();
        let mut answers_b = Vec::new();
        for (i, cmd) in log.iter().enumerate() {
            answers_a.push(apply(&mut a, cmd, at(i)).unwrap());
        }
        // The second replica applies through an overlay, committed after each command, as
        // the sled store does.
        for (i, cmd) in log.iter().enumerate() {
            let mut overlay = Overlay::new(&b);
            answers_b.push(apply(&mut overlay, cmd, at(i)).unwrap());
            for (k, v) in overlay.into_writes() {
                match v {
                    Some(v) => b.insert(k, v),
                    None => b.remove(&k),
                };
            }
        }
        assert_eq!(a, b, "seed {seed}: replicas diverged");
        assert_eq!(answers_a, answers_b);
        check_invariants(&a);
        let meta = read_meta(&a).unwrap();
        assert!(
            meta.counts.enqueued_total > 0,
            "seed {seed} exercised nothing"
        );
        totals.completed_total += meta.counts.completed_total;
        totals.pulled_total += meta.counts.pulled_total;
        totals.expired_total += meta.counts.expired_total;
        let t = tallies(&a).unwrap();
        redriven.cancelled_total += t.cancelled_total;
        redriven.retried_total += t.retried_total;
    }
    // The generated logs reach every part of the life cycle.
    eprintln!("random logs: {totals:?} {redriven:?}");
    assert!(totals.completed_total > 0 && totals.pulled_total > 0 && totals.expired_total > 0);
    assert!(redriven.cancelled_total > 0 && redriven.retried_total > 0);
}

#[test]
fn batched_commands_equal_one_request_per_command() {
    let log = random_log(7, 80);
    let mut batched = MemKv::new();
    let mut single = MemKv::new();
    for (i, cmd) in log.iter().enumerate() {
        let a = apply(&mut batched, cmd, at(i)).unwrap();
        let mut b = Vec::new();
        for r in &cmd.requests {
            b.extend(
                apply(
                    &mut single,
                    &Command {
                        now: cmd.now,
                        mono: cmd.mono,
                        limits: cmd.limits,
                        requests: vec![r.clone()],
                    },
                    next_at(),
                )
                .unwrap(),
            );
        }
        assert_eq!(a, b);
    }
    // Payloads are referenced where they are in the log, which differs; nothing else does.
    assert_eq!(
        without_payload_refs(&batched),
        without_payload_refs(&single)
    );
}

/// The state with every payload reference replaced by the item's id.
fn without_payload_refs(kv: &MemKv) -> MemKv {
    let mut out = MemKv::new();
    for (k, v) in kv {
        match k[0] {
            keys::ITEM => {
                let mut item: Item = codec::decode("item", v).unwrap();
                item.payload = PayloadRef {
                    term: 0,
                    index: 0,
                    ordinal: 0,
                };
                out.insert(k.clone(), codec::encode(&item));
            }
            keys::PAYLOAD => {
                let (_, id) = decode_payload_record(k, v).unwrap();
                out.insert(
                    [&[keys::PAYLOAD][..], &id.0.to_be_bytes()].concat(),
                    Vec::new(),
                );
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

fn register_with(kv: &mut MemKv, now: Millis, secret: WorkerSecret) -> WorkerId {
    match run(
        kv,
        now,
        Request::Register {
            slot: None,
            parent: 1,
            host: "test".into(),
            handle: String::new(),
            secret,
        },
    ) {
        Response::Registered { worker } => worker,
        other => panic!("register answered {other:?}"),
    }
}

#[test]
fn only_the_lease_holder_with_its_secret_completes_an_item() {
    let mut kv = MemKv::new();
    let id = enqueue(&mut kv, 1, 5, None);
    let holder = register(&mut kv, 1);
    let other = register_with(&mut kv, 1, WorkerSecret(42));
    let granted = lease(&mut kv, 2, holder, 1, 1);
    assert_eq!(granted.len(), 1);
    let attempt = granted[0].attempt;

    // Another worker guesses the id and the attempt: acknowledged, ignored.
    let guess = |kv: &mut MemKv, worker, secret| {
        run(
            kv,
            3,
            Request::Complete {
                worker,
                secret,
                results: vec![Completion {
                    id,
                    attempt,
                    value: digest(0xee),
                }],
            },
        )
    };
    assert_eq!(
        guess(&mut kv, other, WorkerSecret(42)),
        Response::CompleteAck {
            accepted: 0,
            ignored: 1
        }
    );
    // Naming the holder without its secret: ignored too.
    assert_eq!(
        guess(&mut kv, holder, WorkerSecret(7)),
        Response::CompleteAck {
            accepted: 0,
            ignored: 1
        }
    );
    // Nor can a guesser heartbeat, release or end the holder's leases.
    let wrong = WorkerSecret(7);
    assert_eq!(
        run(
            &mut kv,
            3,
            Request::Heartbeat {
                worker: holder,
                secret: wrong,
                items: vec![(id, attempt)],
                lease_ms: LEASE_MS,
                parent: None,
            }
        ),
        Response::Rejected(Rejection::UnknownWorker(holder))
    );
    assert_eq!(
        run(
            &mut kv,
            3,
            Request::Release {
                worker: holder,
                secret: wrong,
                items: vec![(id, attempt)],
            }
        ),
        Response::Released { count: 0 }
    );
    run(
        &mut kv,
        3,
        Request::Exit {
            worker: holder,
            secret: wrong,
        },
    );
    assert_eq!(status(&kv, id), Status::Running);
    check_invariants(&kv);

    // The holder's result wins.
    assert_eq!(complete(&mut kv, 4, holder, id, attempt, 0x11), (1, 0));
    assert_eq!(item(&kv, id).unwrap().unwrap().value, Some(digest(0x11)));
    check_invariants(&kv);
}

fn run_limited(
    kv: &mut MemKv,
    now: Millis,
    limits: StoreLimits,
    requests: Vec<Request>,
) -> Vec<Response> {
    apply(
        kv,
        &Command {
            now,
            mono: now,
            limits,
            requests,
        },
        next_at(),
    )
    .expect("apply")
}

fn enqueued(answers: &[Response]) -> usize {
    answers
        .iter()
        .filter(|a| matches!(a, Response::Enqueued { .. }))
        .count()
}

fn enqueue_request(len: usize) -> Request {
    Request::Enqueue {
        iterations: 1,
        payload: Bytes::from(vec![7u8; len]),
        dedup: None,
    }
}

#[test]
fn backlog_limits_on_items_and_bytes_hold_within_one_batch() {
    let mut kv = MemKv::new();
    let by_items = StoreLimits {
        max_items: 3,
        max_bytes: u64::MAX,
    };
    let answers = run_limited(
        &mut kv,
        1,
        by_items,
        (0..5).map(|_| enqueue_request(10)).collect(),
    );
    let accepted = enqueued(&answers);
    assert_eq!(accepted, 3);
    assert_eq!(
        answers[4],
        Response::Rejected(Rejection::BacklogFull {
            items: 3,
            bytes: 30
        })
    );
    check_invariants(&kv);

    // Bytes: 30 stored; a limit of 100 takes seven more 10-byte items, not eight.
    let by_bytes = StoreLimits {
        max_items: u64::MAX,
        max_bytes: 100,
    };
    let answers = run_limited(
        &mut kv,
        2,
        by_bytes,
        (0..9).map(|_| enqueue_request(10)).collect(),
    );
    let accepted = enqueued(&answers);
    assert_eq!(accepted, 7);

    // Completed results count until they are pulled; pulled ones free their room.
    let w = register(&mut kv, 3);
    let granted = lease(&mut kv, 4, w, 10, 1);
    for g in &granted {
        complete(&mut kv, 5, w, g.id, g.attempt, 1);
    }
    let (items, bytes) = stored(&read_meta(&kv).unwrap().counts);
    assert_eq!(items, 10);
    assert_eq!(bytes, 10 * RESULT_BYTES);
    let answers = run_limited(&mut kv, 6, by_items, vec![enqueue_request(1)]);
    assert!(matches!(
        answers[0],
        Response::Rejected(Rejection::BacklogFull { .. })
    ));
    take(&mut kv, 7, 100, None);
    let answers = run_limited(&mut kv, 8, by_items, vec![enqueue_request(1)]);
    assert!(matches!(answers[0], Response::Enqueued { .. }));
    check_invariants(&kv);
}

#[test]
fn dead_items_and_unpulled_results_are_dropped_after_their_retention() {
    let mut kv = MemKv::new();
    let p = TickParams {
        completed_retention_ms: 300_000,
        dead_retention_ms: 200_000,
        ..params()
    };
    let done = enqueue(&mut kv, 1, 1, None);
    let doomed = enqueue(&mut kv, 1, 1, None);
    let w = register(&mut kv, 1);
    let granted = lease(&mut kv, 2, w, 1, 1);
    assert_eq!(granted[0].id, done);
    complete(&mut kv, 3, w, done, granted[0].attempt, 9);
    // `doomed` loses its lease max_attempts times.
    let mut now = 10;
    for request_id in 2..2 + u64::from(p.max_attempts) {
        lease(&mut kv, now, w, 1, request_id);
        now += LEASE_MS + 1;
        tick_with(&mut kv, now, p);
    }
    assert_eq!(status(&kv, doomed), Status::Dead);
    check_invariants(&kv);

    // Not yet: both are kept within their retention.
    tick_with(&mut kv, now + 1, p);
    assert!(item(&kv, done).unwrap().is_some() && item(&kv, doomed).unwrap().is_some());

    let later = now + p.completed_retention_ms.max(p.dead_retention_ms) + 1;
    assert!(tick_due(&kv, later, &p).unwrap());
    let report = tick_with(&mut kv, later, p);
    assert_eq!(report.forgotten, 2);
    assert_eq!(item(&kv, done).unwrap(), None);
    assert_eq!(item(&kv, doomed).unwrap(), None);
    assert_eq!(
        payload_floor(&kv).unwrap(),
        None,
        "no payload is needed any more"
    );
    let c = read_meta(&kv).unwrap().counts;
    assert_eq!(
        (c.completed, c.dead, c.payload_bytes, c.dropped_total),
        (0, 0, 0, 2)
    );
    check_invariants(&kv);
}

#[test]
fn a_leader_clock_jump_neither_expires_leases_early_nor_freezes_time() {
    let mut kv = MemKv::new();
    // (wall, mono, term) per command: state-machine time follows `mono` within a term.
    let at = |kv: &mut MemKv, wall: Millis, mono: u64, term: u64, request: Request| {
        let mut out = apply(
            kv,
            &Command {
                now: wall,
                mono,
                limits: StoreLimits::UNLIMITED,
                requests: vec![request],
            },
            At {
                term,
                index: NEXT_INDEX.fetch_add(1, Ordering::Relaxed),
            },
        )
        .unwrap();
        out.pop().unwrap()
    };
    let t0 = 1_700_000_000_000;
    let enq = Request::Enqueue {
        iterations: 1,
        payload: Bytes::from(b"x".to_vec()),
        dedup: None,
    };
    let Response::Enqueued { id, .. } = at(&mut kv, t0, 10, 1, enq) else {
        panic!()
    };
    let w = match at(
        &mut kv,
        t0,
        10,
        1,
        Request::Register {
            slot: None,
            parent: 1,
            host: String::new(),
            handle: String::new(),
            secret: SECRET,
        },
    ) {
        Response::Registered { worker } => worker,
        other => panic!("{other:?}"),
    };
    let lease_request = Request::Lease {
        worker: w,
        secret: SECRET,
        max: 1,
        min: 1,
        max_iterations: u64::MAX,
        lease_ms: LEASE_MS,
        request_id: 1,
    };
    at(&mut kv, t0, 20, 1, lease_request);
    assert_eq!(status(&kv, id), Status::Running);
    // The leader's wall clock jumps an hour ahead; 100 ms pass on its monotonic clock.
    let hour = 3_600_000;
    at(&mut kv, t0 + hour, 120, 1, Request::Tick(params()));
    assert_eq!(status(&kv, id), Status::Running, "expired early");
    assert_eq!(read_meta(&kv).unwrap().now, t0 + 110);
    // A new leader (term 2), whose wall clock is right and whose monotonic clock has its
    // own origin: time goes on from where it was and the lease runs out after its length.
    at(&mut kv, t0 + 200, 5_000, 2, Request::Noop);
    at(&mut kv, t0 + 500, 5_300, 2, Request::Tick(params()));
    assert_eq!(status(&kv, id), Status::Running);
    at(&mut kv, t0 + 1_200, 6_000, 2, Request::Tick(params()));
    assert_eq!(status(&kv, id), Status::Queued, "time froze");
    assert_eq!(read_meta(&kv).unwrap().now, t0 + 110 + 1_000);
    check_invariants(&kv);
}

#[test]
fn a_request_that_finds_the_state_broken_is_rejected_alone_and_nothing_of_it_is_written() {
    let mut kv = MemKv::new();
    let id = enqueue(&mut kv, 1, 5, None);
    let w = register(&mut kv, 1);
    let granted = lease(&mut kv, 2, w, 1, 1);
    // The item record becomes unreadable (the same on every replica: they hold the same
    // state).
    kv.insert(keys::item(id), b"\xff\xff not an item".to_vec());
    let before = kv.clone();
    let answers = apply(
        &mut kv,
        &Command {
            now: 3,
            mono: 3,
            limits: StoreLimits::UNLIMITED,
            requests: vec![
                Request::Complete {
                    worker: w,
                    secret: SECRET,
                    results: vec![Completion {
                        id,
                        attempt: granted[0].attempt,
                        value: digest(1),
                    }],
                },
                Request::Enqueue {
                    iterations: 1,
                    payload: Bytes::from(b"next".to_vec()),
                    dedup: None,
                },
            ],
        },
        next_at(),
    )
    .expect("not an I/O error: the command applies");
    assert!(
        matches!(answers[0], Response::Rejected(Rejection::Internal(_))),
        "{answers:?}"
    );
    assert!(
        matches!(answers[1], Response::Enqueued { .. }),
        "{answers:?}"
    );
    // The rejected request changed nothing; the next one did its part.
    assert_eq!(kv.get(&keys::item(id)), before.get(&keys::item(id)));
    assert_eq!(read_meta(&kv).unwrap().counts.enqueued_total, 2);
}

#[test]
fn payloads_are_referenced_where_the_log_holds_them_and_the_floor_follows_the_oldest() {
    let mut kv = MemKv::new();
    let enqueue_req = |n: u8| Request::Enqueue {
        iterations: 1,
        payload: Bytes::from(vec![n; 10]),
        dedup: None,
    };
    let cmd = Command {
        now: 1,
        mono: 1,
        limits: StoreLimits::UNLIMITED,
        // The ordinal is the request's position in the entry, whatever the request.
        requests: vec![enqueue_req(1), Request::Noop, enqueue_req(2)],
    };
    let at = At { term: 3, index: 40 };
    let answers = apply(&mut kv, &cmd, at).unwrap();
    let ids: Vec<WorkId> = answers
        .iter()
        .filter_map(|r| match r {
            Response::Enqueued { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    let refs: Vec<PayloadRef> = ids
        .iter()
        .map(|id| item(&kv, *id).unwrap().unwrap().payload)
        .collect();
    assert_eq!(
        refs,
        vec![
            PayloadRef {
                term: 3,
                index: 40,
                ordinal: 0
            },
            PayloadRef {
                term: 3,
                index: 40,
                ordinal: 2
            },
        ]
    );
    assert_eq!(live_payloads(&kv).unwrap(), refs);
    assert_eq!(payload_floor(&kv).unwrap(), Some(40));
    // The next entry's index is set here: the shared counter of `enqueue` is below 40 when
    // this test runs first.
    let later_cmd = Command {
        requests: vec![enqueue_req(3)],
        ..cmd
    };
    let later = match apply(&mut kv, &later_cmd, At { term: 3, index: 41 }).unwrap()[..] {
        [Response::Enqueued { id, .. }] => id,
        ref other => panic!("enqueue answered {other:?}"),
    };
    let later_at = item(&kv, later).unwrap().unwrap().payload;
    assert_eq!(later_at.index, 41);
    // Completing both items of entry 40 moves the floor to the later entry.
    let w = register(&mut kv, 3);
    let granted = lease(&mut kv, 4, w, 2, 1);
    for g in &granted {
        complete(&mut kv, 5, w, g.id, g.attempt, 1);
    }
    assert_eq!(payload_floor(&kv).unwrap(), Some(later_at.index));
    check_invariants(&kv);
}

#[test]
fn the_cluster_version_is_absent_until_raised_and_never_goes_down() {
    let mut kv = MemKv::new();
    enqueue(&mut kv, 1_000, 1, None);
    assert_eq!(cluster_version(&kv).unwrap(), crate::version::BASE);
    // A build that supports more writes nothing the previous one cannot read until then.
    assert!(KvRead::get(&kv, keys::CLUSTER_VERSION).unwrap().is_none());
    assert_eq!(
        run(&mut kv, 1_001, Request::SetClusterVersion { version: 2 }),
        Response::Done
    );
    assert_eq!(cluster_version(&kv).unwrap(), 2);
    run(&mut kv, 1_002, Request::SetClusterVersion { version: 1 });
    assert_eq!(cluster_version(&kv).unwrap(), 2);
    check_invariants(&kv);
}

#[test]
fn a_used_take_key_is_known_until_it_expires() {
    let mut kv = MemKv::new();
    assert!(!take_key_used(&kv, "k").unwrap());
    take(&mut kv, 1_000, 10, Some("k"));
    assert!(take_key_used(&kv, "k").unwrap());
    assert!(!take_key_used(&kv, "other").unwrap());
    tick(&mut kv, 1_000 + KEY_TTL_MS + 1);
    assert!(!take_key_used(&kv, "k").unwrap());
}

fn item_status(kv: &mut MemKv, now: Millis, request: Request) -> Option<Status> {
    match run(kv, now, request) {
        Response::ItemStatus(status) => status,
        other => panic!("answered {other:?}"),
    }
}

fn cancel(kv: &mut MemKv, now: Millis, id: WorkId) -> Option<Status> {
    item_status(kv, now, Request::Cancel { id })
}

fn retry(kv: &mut MemKv, now: Millis, id: WorkId) -> Option<Status> {
    item_status(kv, now, Request::Retry { id })
}

#[test]
fn cancel_stops_queued_and_running_items_fences_their_lease_and_keeps_them_for_a_retry() {
    let mut kv = MemKv::new();
    let queued = enqueue(&mut kv, 1, 10, None);
    let running = enqueue(&mut kv, 1, 20, None);
    let done = enqueue(&mut kv, 1, 30, None);
    let w = register(&mut kv, 1);
    // `queued` goes back to the queue, so the lease takes `running` and `done` in order.
    let granted = lease(&mut kv, 2, w, 3, 1);
    assert_eq!(granted.len(), 3);
    assert_eq!(
        run(
            &mut kv,
            2,
            Request::Release {
                worker: w,
                secret: SECRET,
                items: vec![(queued, granted[0].attempt)],
            }
        ),
        Response::Released { count: 1 }
    );
    complete(&mut kv, 3, w, done, granted[2].attempt, 3);
    check_invariants(&kv);

    assert_eq!(cancel(&mut kv, 4, queued), Some(Status::Cancelled));
    assert_eq!(cancel(&mut kv, 4, running), Some(Status::Cancelled));
    assert_eq!(
        cancel(&mut kv, 5, running),
        Some(Status::Cancelled),
        "idempotent"
    );
    assert_eq!(
        cancel(&mut kv, 5, done),
        Some(Status::Completed),
        "a result stays"
    );
    assert_eq!(cancel(&mut kv, 5, WorkId(99)), None);
    check_invariants(&kv);
    assert_eq!(status(&kv, done), Status::Completed);
    let c = read_meta(&kv).unwrap().counts;
    assert_eq!((c.queued, c.running, c.completed), (0, 0, 1));
    assert_eq!(tallies(&kv).unwrap().cancelled, 2);

    // The worker hears on its heartbeat that it lost the cancelled item, and its result
    // is never stored.
    match run(
        &mut kv,
        6,
        Request::Heartbeat {
            worker: w,
            secret: SECRET,
            items: vec![(running, granted[1].attempt)],
            lease_ms: LEASE_MS,
            parent: None,
        },
    ) {
        Response::HeartbeatAck { valid, lost } => {
            assert!(valid.is_empty());
            assert_eq!(lost, vec![running]);
        }
        other => panic!("heartbeat answered {other:?}"),
    }
    assert_eq!(
        complete(&mut kv, 7, w, running, granted[1].attempt, 2),
        (0, 1)
    );
    assert_eq!(status(&kv, running), Status::Cancelled);
    assert_eq!(item(&kv, running).unwrap().unwrap().value, None);
    assert_eq!(workers(&kv).unwrap()[0].leased, 0);
    // Cancelled items are not in the queue: a lease finds nothing.
    assert!(lease(&mut kv, 8, w, 5, 2).is_empty());
    check_invariants(&kv);

    // A retry puts one back with its attempts reset; it completes like any other item.
    assert_eq!(retry(&mut kv, 9, running), Some(Status::Queued));
    let it = item(&kv, running).unwrap().unwrap();
    assert_eq!((it.attempts, it.dead_at, it.dead_reason), (0, None, None));
    check_invariants(&kv);
    let again = lease(&mut kv, 10, w, 5, 3);
    assert_eq!(
        again.iter().map(|l| l.id).collect::<Vec<_>>(),
        vec![running]
    );
    assert_eq!(again[0].attempt, 1);
    assert_eq!(complete(&mut kv, 11, w, running, 1, 2), (1, 0));
    assert_eq!(status(&kv, running), Status::Completed);
    let t = tallies(&kv).unwrap();
    assert_eq!((t.cancelled, t.cancelled_total, t.retried_total), (1, 2, 1));
    check_invariants(&kv);
}

#[test]
fn a_retry_revives_a_dead_item_once_and_leaves_a_live_one_alone() {
    let mut kv = MemKv::new();
    let p = params();
    let doomed = enqueue(&mut kv, 1, 1, None);
    let w = register(&mut kv, 1);
    let mut now = 10;
    for request_id in 1..=u64::from(p.max_attempts) {
        lease(&mut kv, now, w, 1, request_id);
        now += LEASE_MS + 1;
        tick_with(&mut kv, now, p);
    }
    assert_eq!(status(&kv, doomed), Status::Dead);
    assert_eq!(retry(&mut kv, now, WorkId(77)), None);
    assert_eq!(
        cancel(&mut kv, now, doomed),
        Some(Status::Dead),
        "dead is not cancelled"
    );

    assert_eq!(retry(&mut kv, now + 1, doomed), Some(Status::Queued));
    let c = read_meta(&kv).unwrap().counts;
    assert_eq!((c.dead, c.queued), (0, 1));
    // The same proposal applied again (a retry after a lost answer) changes nothing, even
    // once the item is running again.
    let granted = lease(&mut kv, now + 2, w, 1, 100);
    assert_eq!(granted[0].attempt, 1, "attempts start again");
    assert_eq!(retry(&mut kv, now + 3, doomed), Some(Status::Running));
    assert_eq!(tallies(&kv).unwrap().retried_total, 1);
    check_invariants(&kv);
    assert_eq!(complete(&mut kv, now + 4, w, doomed, 1, 5), (1, 0));
    assert_eq!(take(&mut kv, now + 5, 10, None), vec![(doomed, digest(5))]);
    check_invariants(&kv);
}

#[test]
fn cancelled_items_are_dropped_with_the_dead_retention_and_listed_by_status() {
    let mut kv = MemKv::new();
    // Within one entry's largest time step (MAX_TIME_STEP_MS).
    let p = TickParams {
        dead_retention_ms: 200_000,
        ..params()
    };
    let ids: Vec<WorkId> = (0..6).map(|_| enqueue(&mut kv, 1, 1, None)).collect();
    for id in &ids[..4] {
        cancel(&mut kv, 2, *id);
    }
    // Listing by status pages through the ids in order, within the budget of records.
    let page = list_items(&kv, Status::Cancelled, None, 3, 100).unwrap();
    let got: Vec<WorkId> = page.items.iter().map(|(id, _)| *id).collect();
    assert_eq!(got, ids[..3]);
    assert_eq!(page.next_after, Some(ids[2]));
    let page = list_items(&kv, Status::Cancelled, page.next_after, 3, 100).unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].0, ids[3]);
    assert_eq!(page.next_after, None, "every record was looked at");
    // A small budget ends a page early and says where to go on.
    let page = list_items(&kv, Status::Queued, None, 10, 1).unwrap();
    assert!(page.items.is_empty());
    assert_eq!(page.next_after, Some(ids[0]));
    let page = list_items(&kv, Status::Queued, Some(ids[3]), 10, 1).unwrap();
    assert_eq!(page.items[0].0, ids[4]);
    assert_eq!(page.next_after, Some(ids[4]));

    let later = 2 + p.dead_retention_ms + 1;
    assert!(tick_due(&kv, later, &p).unwrap());
    assert_eq!(tick_with(&mut kv, later, p).forgotten, 4);
    assert_eq!(tallies(&kv).unwrap().cancelled, 0);
    let c = read_meta(&kv).unwrap().counts;
    assert_eq!(
        (c.queued, c.payload_bytes > 0, c.dropped_total),
        (2, true, 4)
    );
    check_invariants(&kv);
}

fn batch_request(key: &str, sizes: &[usize], iterations: u32) -> Request {
    Request::EnqueueBatch {
        items: sizes
            .iter()
            .enumerate()
            .map(|(k, len)| BatchItem {
                iterations,
                priority: crate::types::DEFAULT_PRIORITY,
                payload: Bytes::from(vec![k as u8; *len]),
            })
            .collect(),
        dedup: Dedup {
            key: key.to_string(),
            ttl_ms: KEY_TTL_MS,
        },
    }
}

#[test]
fn a_batch_adds_all_its_items_or_none_and_its_key_replays_its_ids() {
    let mut kv = MemKv::new();
    // Its items are consecutive, in part order; each payload is found at its own ordinal
    // of the entry, after the requests before the batch.
    let cmd = Command {
        now: 1,
        mono: 1,
        limits: StoreLimits::UNLIMITED,
        requests: vec![Request::Noop, batch_request("b1", &[3, 4, 5], 2)],
    };
    let answers = apply(&mut kv, &cmd, At { term: 2, index: 7 }).unwrap();
    let Response::EnqueuedBatch { ids, duplicate } = answers[1].clone() else {
        panic!("the batch answered {:?}", answers[1]);
    };
    assert!(!duplicate);
    assert_eq!(ids, vec![WorkId(0), WorkId(1), WorkId(2)]);
    for (k, id) in ids.iter().enumerate() {
        let it = item(&kv, *id).unwrap().unwrap();
        assert_eq!((it.iterations, it.payload_len), (2, 3 + k as u32));
        assert_eq!(
            it.payload,
            PayloadRef {
                term: 2,
                index: 7,
                ordinal: PayloadRef::ordinal(1, k).unwrap()
            }
        );
        assert_eq!(
            cmd.payload(it.payload.ordinal).unwrap(),
            &Bytes::from(vec![k as u8; 3 + k])
        );
    }
    // An ordinary enqueue's ordinal is its request's position, as before batches.
    assert_eq!(PayloadRef::ordinal(5, 0), Some(5));
    assert_eq!(
        PayloadRef::split(PayloadRef::ordinal(5, 9).unwrap()),
        (5, 9)
    );
    assert_eq!(PayloadRef::ordinal(PayloadRef::MAX_PARTS, 0), None);
    check_invariants(&kv);

    // A retry under the same key answers the same ids and adds nothing.
    let before = read_meta(&kv).unwrap();
    assert_eq!(
        run(&mut kv, 2, batch_request("b1", &[9, 9], 1)),
        Response::EnqueuedBatch {
            ids: ids.clone(),
            duplicate: true
        }
    );
    assert_eq!(read_meta(&kv).unwrap().counts, before.counts);

    // One bad item, an empty batch, or a batch the store cannot hold whole: nothing added.
    let mut bad = batch_request("b2", &[1, 1, 1], 1);
    if let Request::EnqueueBatch { items, .. } = &mut bad {
        items[2].iterations = 0;
    }
    assert!(matches!(
        run(&mut kv, 3, bad),
        Response::Rejected(Rejection::Invalid(_))
    ));
    assert!(matches!(
        run(&mut kv, 3, batch_request("b3", &[], 1)),
        Response::Rejected(Rejection::Invalid(_))
    ));
    let room_for_two = StoreLimits {
        max_items: 5,
        max_bytes: u64::MAX,
    };
    let answers = run_limited(
        &mut kv,
        4,
        room_for_two,
        vec![batch_request("b4", &[1, 1, 1], 1)],
    );
    assert_eq!(
        answers[0],
        Response::Rejected(Rejection::BacklogFull {
            items: 3,
            bytes: 12
        })
    );
    let little_room = StoreLimits {
        max_items: u64::MAX,
        max_bytes: 20,
    };
    let answers = run_limited(
        &mut kv,
        4,
        little_room,
        vec![batch_request("b5", &[4, 5], 1)],
    );
    assert!(matches!(
        answers[0],
        Response::Rejected(Rejection::BacklogFull { .. })
    ));
    let after = read_meta(&kv).unwrap();
    assert_eq!(after.counts, before.counts);
    assert_eq!(after.next_id, before.next_id);
    // A refused batch's key is not used: the same key goes through once there is room.
    let answers = run_limited(
        &mut kv,
        5,
        StoreLimits::UNLIMITED,
        vec![batch_request("b4", &[1, 1, 1], 1)],
    );
    assert!(matches!(
        &answers[0],
        Response::EnqueuedBatch { ids, duplicate: false } if ids.len() == 3
    ));

    // Batch items lease, complete and pull like any other.
    let w = register(&mut kv, 6);
    let granted = lease(&mut kv, 7, w, 10, 1);
    assert_eq!(granted.len(), 6);
    assert_eq!(granted[0].id, ids[0]);
    for g in &granted {
        complete(&mut kv, 8, w, g.id, g.attempt, 1);
    }
    assert_eq!(take(&mut kv, 9, 100, None).len(), 6);
    check_invariants(&kv);
}

fn with_priorities(key: &str, priorities: &[u8]) -> Request {
    Request::EnqueueBatch {
        items: priorities
            .iter()
            .map(|p| BatchItem {
                iterations: 1,
                priority: *p,
                payload: Bytes::from(vec![*p; 4]),
            })
            .collect(),
        dedup: Dedup {
            key: key.to_string(),
            ttl_ms: KEY_TTL_MS,
        },
    }
}

fn batch_ids(response: Response) -> Vec<WorkId> {
    match response {
        Response::EnqueuedBatch { ids, .. } => ids,
        other => panic!("the batch answered {other:?}"),
    }
}

#[test]
fn workers_lease_the_highest_priority_first_fifo_within_one_and_an_item_keeps_its_priority() {
    let mut kv = MemKv::new();
    let low = batch_ids(run(&mut kv, 1, with_priorities("low", &[1, 1, 1])));
    let default = enqueue(&mut kv, 2, 1, None);
    let high = batch_ids(run(&mut kv, 3, with_priorities("high", &[9, 7, 9])));
    check_invariants(&kv);
    assert_eq!(
        queued_by_priority(&kv).unwrap(),
        vec![(9, 2), (7, 1), (5, 1), (1, 3)]
    );
    assert!(matches!(
        run(&mut kv, 3, with_priorities("bad", &[10])),
        Response::Rejected(Rejection::Invalid(_))
    ));

    // One lease of four: the two 9s in FIFO order, the 7, then the default one.
    let w = register(&mut kv, 4);
    let first: Vec<WorkId> = lease(&mut kv, 5, w, 4, 1).iter().map(|l| l.id).collect();
    assert_eq!(first, vec![high[0], high[2], high[1], default]);
    check_invariants(&kv);

    // The 9s' leases run out: they go back ahead of the low ones, in their FIFO place.
    tick(&mut kv, 5 + LEASE_MS + 1);
    check_invariants(&kv);
    let w2 = register(&mut kv, 5 + LEASE_MS + 2);
    let again: Vec<WorkId> = lease(&mut kv, 5 + LEASE_MS + 3, w2, 2, 1)
        .iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(again, vec![high[0], high[2]]);

    // A cancelled low item, retried, goes back to its own priority's queue, in its FIFO
    // place.
    assert_eq!(cancel(&mut kv, 10_000, low[0]), Some(Status::Cancelled));
    check_invariants(&kv);
    assert_eq!(retry(&mut kv, 10_001, low[0]), Some(Status::Queued));
    check_invariants(&kv);
    assert_eq!(
        queued_by_priority(&kv).unwrap(),
        vec![(7, 1), (5, 1), (1, 3)]
    );
    // The autoscaler's signal is the longest wait of any priority: the low items, queued
    // first (at 1), not the high ones.
    assert_eq!(oldest_queued(&kv, 10).unwrap(), Some(1));
    let rest: Vec<WorkId> = lease(&mut kv, 10_002, w2, 10, 2)
        .iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(rest, vec![high[1], default, low[0], low[1], low[2]]);
    assert!(queued_by_priority(&kv).unwrap().is_empty());
    check_invariants(&kv);
}

/// The `p` records, in key order.
fn payload_records(kv: &MemKv) -> Vec<PayloadRef> {
    let (s, e) = keys::table(keys::PAYLOAD);
    kv.scan(&s, &e, false)
        .map(|r| {
            let (k, v) = r.unwrap();
            decode_payload_record(&k, &v).unwrap().0
        })
        .collect()
}

#[test]
fn live_payloads_come_in_log_order_when_a_batch_precedes_another_request() {
    let mut kv = MemKv::new();
    // Ids 0 to 2 are the batch's parts (ordinals part << 16), id 3 the enqueue after it
    // (ordinal 1): in id order the references are not in log order.
    let cmd = Command {
        now: 1,
        mono: 1,
        limits: StoreLimits::UNLIMITED,
        requests: vec![batch_request("b", &[1, 2, 3], 1), enqueue_request(1)],
    };
    apply(&mut kv, &cmd, At { term: 1, index: 9 }).unwrap();
    assert_eq!(item(&kv, WorkId(3)).unwrap().unwrap().payload.ordinal, 1);
    let ordinals: Vec<u32> = live_payloads(&kv)
        .unwrap()
        .iter()
        .map(|at| at.ordinal)
        .collect();
    assert_eq!(ordinals, vec![0, 1, 1 << 16, 2 << 16]);
    assert_eq!(payload_records(&kv), live_payloads(&kv).unwrap());
    check_invariants(&kv);
}

#[test]
fn version_5_drops_the_payload_records_and_reads_live_payloads_off_the_items() {
    let mut kv = MemKv::new();
    run(&mut kv, 1, Request::SetClusterVersion { version: 4 });
    let done = enqueue(&mut kv, 2, 1, None);
    let waiting = [enqueue(&mut kv, 2, 1, None), enqueue(&mut kv, 2, 1, None)];
    let w = register(&mut kv, 3);
    let granted = lease(&mut kv, 4, w, 1, 1);
    assert_eq!(granted[0].id, done);
    complete(&mut kv, 5, w, done, granted[0].attempt, 1);
    let before = live_payloads(&kv).unwrap();
    assert_eq!(before.len(), 2);
    assert_eq!(payload_records(&kv), before);

    // One entry: an enqueue that still writes its record, the upgrade, an enqueue after it.
    let cmd = Command {
        now: 6,
        mono: 6,
        limits: StoreLimits::UNLIMITED,
        requests: vec![
            enqueue_request(4),
            Request::SetClusterVersion {
                version: crate::version::ITEM_PAYLOADS,
            },
            enqueue_request(4),
        ],
    };
    apply(&mut kv, &cmd, next_at()).unwrap();
    assert_eq!(cluster_version(&kv).unwrap(), crate::version::ITEM_PAYLOADS);
    assert_eq!(payload_records(&kv), vec![], "every record went");
    let after = live_payloads(&kv).unwrap();
    assert_eq!(after.len(), 4);
    assert_eq!(after[..2], before[..]);
    check_invariants(&kv);

    // Completions and the dead retention delete no record, and the floor follows the items.
    enqueue(&mut kv, 7, 1, None);
    let granted = lease(&mut kv, 8, w, 4, 2);
    assert_eq!(granted[0].id, waiting[0]);
    for g in &granted {
        complete(&mut kv, 9, w, g.id, g.attempt, 2);
    }
    let last = live_payloads(&kv).unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(payload_floor(&kv).unwrap(), Some(last[0].index));
    check_invariants(&kv);
}

/// A store that counts the scans made through it.
struct ScanCounter<'a> {
    kv: &'a MemKv,
    scans: std::cell::Cell<usize>,
}

impl<'a> ScanCounter<'a> {
    fn new(kv: &'a MemKv) -> Self {
        ScanCounter {
            kv,
            scans: std::cell::Cell::new(0),
        }
    }
}

impl KvRead for ScanCounter<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        KvRead::get(self.kv, key)
    }

    fn scan<'b>(&'b self, start: &[u8], end: &[u8], reverse: bool) -> crate::kv::ScanIter<'b> {
        self.scans.set(self.scans.get() + 1);
        self.kv.scan(start, end, reverse)
    }
}

#[test]
fn the_floor_search_goes_on_from_where_it_stopped() {
    let mut kv = MemKv::new();
    let ids: Vec<WorkId> = (0..3).map(|_| enqueue(&mut kv, 1, 1, None)).collect();
    let w = register(&mut kv, 2);
    for g in lease(&mut kv, 3, w, 2, 1) {
        complete(&mut kv, 4, w, g.id, g.attempt, 1);
    }
    let third = item(&kv, ids[2]).unwrap().unwrap().payload.index;
    // It stops at the first item that still needs its payload, and starts there next time.
    assert_eq!(
        payload_floor_from(&kv, WorkId(0)).unwrap(),
        (Some(third), ids[2])
    );
    // While that item waits, each search is one read and no scan.
    let counted = ScanCounter::new(&kv);
    for _ in 0..3 {
        assert_eq!(
            payload_floor_from(&counted, ids[2]).unwrap(),
            (Some(third), ids[2])
        );
    }
    assert_eq!(
        counted.scans.get(),
        0,
        "the waiting item is read, not scanned for"
    );
    let g = lease(&mut kv, 5, w, 1, 2);
    complete(&mut kv, 6, w, g[0].id, g[0].attempt, 1);
    let (floor, next) = payload_floor_from(&kv, ids[2]).unwrap();
    assert_eq!((floor, next), (None, WorkId(3)));
    // An item enqueued later is found from there.
    let later = enqueue(&mut kv, 7, 1, None);
    let at = item(&kv, later).unwrap().unwrap().payload.index;
    assert_eq!(payload_floor_from(&kv, next).unwrap(), (Some(at), later));
}
