//! The replicated core end to end: 3 nodes and workers as real processes, crashes included.
//! Every item is checked against an independent reference computed here.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{payload, reference, wait_for, Cluster, Options};
use futures::StreamExt;

const ITEMS: u64 = 300;

/// Item `i`'s payload (16 to 256 KiB) and iterations (1 to 5000).
fn item(i: u64) -> (Vec<u8>, u32) {
    let len = 16 * 1024 + ((i * 7919) % (240 * 1024)) as usize;
    let iterations = 1 + ((i * 104_729) % 5000) as u32;
    (payload(i, len), iterations)
}

/// Pulls from every node at once until `expected` items are in; fails on any duplicate.
async fn pull_everything(
    cluster: &Cluster,
    expected: usize,
    timeout: Duration,
) -> HashMap<String, String> {
    let results = Mutex::new(HashMap::<String, String>::new());
    let done = AtomicBool::new(false);
    let deadline = Instant::now() + timeout;
    let pullers = cluster.ids().into_iter().map(|id| {
        let results = &results;
        let done = &done;
        async move {
            let mut round = 0;
            while !done.load(Ordering::SeqCst) {
                assert!(
                    Instant::now() < deadline,
                    "not every item came back in {timeout:?}"
                );
                round += 1;
                let key = format!("pull-{id}-{round}");
                let got = cluster.pull(id, 25, &key).await;
                {
                    let mut all = results.lock().unwrap();
                    for (work_id, value) in got {
                        assert!(
                            all.insert(work_id.clone(), value).is_none(),
                            "work id {work_id} was pulled twice"
                        );
                    }
                    if all.len() >= expected {
                        done.store(true, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
    });
    futures::future::join_all(pullers).await;
    results.into_inner().unwrap()
}

/// Enqueues every item round-robin over the nodes, a few at a time; returns work id -> item.
async fn enqueue_all(cluster: &Cluster, range: std::ops::Range<u64>) -> HashMap<String, u64> {
    let n = cluster.ids().len() as u64;
    futures::stream::iter(range)
        .map(|i| async move {
            let (data, iterations) = item(i);
            let id = cluster
                .enqueue(1 + i % n, data, iterations, &format!("item-{i}"))
                .await;
            (id, i)
        })
        .buffer_unordered(8)
        .collect()
        .await
}

fn check(results: &HashMap<String, String>, ids: &HashMap<String, u64>) {
    assert_eq!(
        results.len(),
        ids.len(),
        "pulled {} of {} items",
        results.len(),
        ids.len()
    );
    for (work_id, i) in ids {
        let (data, iterations) = item(*i);
        let value = results
            .get(work_id)
            .unwrap_or_else(|| panic!("item {i} (work id {work_id}) was lost"));
        assert_eq!(
            *value,
            reference(&data, iterations),
            "item {i} has a wrong value"
        );
    }
    let distinct: HashSet<&String> = ids.keys().collect();
    assert_eq!(distinct.len(), ITEMS as usize, "two items share a work id");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_item_comes_back_exactly_once_with_the_right_value() {
    let mut cluster = Cluster::start(Options::default()).await;
    cluster.start_worker(&[]);
    cluster.start_worker(&[]);
    let ids = enqueue_all(&cluster, 0..ITEMS).await;
    let results = pull_everything(&cluster, ITEMS as usize, Duration::from_secs(120)).await;
    check(&results, &ids);
    // Nothing is left, and every node's applied state agrees.
    for id in cluster.ids() {
        wait_for(
            "every node to apply the last pull",
            Duration::from_secs(10),
            || async {
                let s = cluster.get_json(id, "/status").await?;
                (s["totals"]["pulled"] == ITEMS
                    && s["counts"]["queued"] == 0
                    && s["counts"]["completed"] == 0)
                    .then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_killed_mid_run_loses_nothing() {
    let mut cluster = Cluster::start(Options::default()).await;
    cluster.start_worker(&[]);
    cluster.start_worker(&[]);
    let mut ids = enqueue_all(&cluster, 0..ITEMS / 2).await;
    // Pull some while the first half is being worked on, then kill the leader mid-run.
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let early = cluster.pull(leader, 40, "early-pull").await;
    cluster.kill_node(leader);
    let started = Instant::now();
    ids.extend(enqueue_all(&cluster, ITEMS / 2..ITEMS).await);
    let new_leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    assert_ne!(new_leader, leader);
    eprintln!(
        "second half acknowledged {:?} after the leader was killed",
        started.elapsed()
    );
    cluster.start_node(leader);
    let mut results: HashMap<String, String> = early.into_iter().collect();
    let rest = pull_everything(
        &cluster,
        ITEMS as usize - results.len(),
        Duration::from_secs(120),
    )
    .await;
    for (id, value) in rest {
        assert!(
            results.insert(id.clone(), value).is_none(),
            "work id {id} was pulled twice"
        );
    }
    check(&results, &ids);
    // The restarted node caught up with everything.
    wait_for(
        "the old leader to catch up",
        Duration::from_secs(30),
        || async {
            let s = cluster.get_json(leader, "/status").await?;
            (s["totals"]["pulled"] == ITEMS).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_holding_a_lease_has_its_item_done_by_another() {
    let mut cluster = Cluster::start(Options {
        node_args: ["--lease", "2s", "--worker-lost-after", "3s"]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    })
    .await;
    let doomed = cluster.start_worker(&[]);
    // Long enough to still be hashing when it is killed (several seconds).
    let data = payload(42, 64 * 1024);
    let iterations = 9_000_000;
    let id = cluster
        .enqueue(1, data.clone(), iterations, "long-one")
        .await;
    wait_for(
        "the worker to lease the item",
        Duration::from_secs(20),
        || async {
            let w = cluster.get_json(2, &format!("/work/{id}")).await?;
            (w["status"] == "running").then_some(())
        },
    )
    .await;
    cluster.kill_worker(doomed);
    cluster.start_worker(&[]);
    let work = wait_for(
        "the item to complete on the other worker",
        Duration::from_secs(90),
        || async {
            let w = cluster.get_json(3, &format!("/work/{id}")).await?;
            (w["status"] == "completed").then_some(w)
        },
    )
    .await;
    assert_eq!(work["attempts"], 2, "{work}");
    assert_eq!(work["value"], reference(&data, iterations));
    let status = cluster.get_json(1, "/status").await.unwrap();
    assert_eq!(status["totals"]["expired_leases"], 1, "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_restart_keeps_every_committed_item() {
    let mut cluster = Cluster::start(Options::default()).await;
    let ids = enqueue_all(&cluster, 0..40).await;
    let worker = cluster.start_worker(&[]);
    wait_for("all 40 to complete", Duration::from_secs(60), || async {
        let s = cluster.get_json(1, "/status").await?;
        (s["totals"]["completed"] == 40).then_some(())
    })
    .await;
    let pulled = cluster.pull(2, 15, "before-restart").await;
    cluster.kill_worker(worker);
    let more = enqueue_all(&cluster, 40..50).await;
    // Every node dies at once, then comes back with its data.
    for id in cluster.ids() {
        cluster.kill_node(id);
    }
    for id in cluster.ids() {
        cluster.start_node(id);
    }
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    // Only a node without any Raft state (a replacement, say) sits out the elections under
    // way before it may vote: each node did at its first start, none on this restart.
    for id in cluster.ids() {
        let log = std::fs::read_to_string(cluster.dir.path().join(format!("node-{id}.log")))
            .expect("node log");
        assert_eq!(log.matches("sitting out").count(), 1, "node {id}");
    }
    for (work_id, i) in ids.iter().chain(more.iter()) {
        let w = cluster
            .get_json(1, &format!("/work/{work_id}"))
            .await
            .expect("work status");
        let expected = if pulled.iter().any(|(p, _)| p == work_id) {
            "pulled"
        } else if *i < 40 {
            "completed"
        } else {
            "queued"
        };
        assert_eq!(w["status"], expected, "item {i}: {w}");
    }
    // The pull's key survived too: the same answer on a retry.
    assert_eq!(cluster.pull(3, 15, "before-restart").await, pulled);
    cluster.start_worker(&[]);
    let rest = pull_everything(&cluster, 50 - pulled.len(), Duration::from_secs(60)).await;
    assert_eq!(rest.len() + pulled.len(), 50);
    for (work_id, value) in rest.iter().chain(pulled.iter().map(|(a, b)| (a, b))) {
        let i = ids
            .get(work_id)
            .or_else(|| more.get(work_id))
            .expect("known id");
        let (data, iterations) = item(*i);
        assert_eq!(*value, reference(&data, iterations));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_was_down_catches_up_from_a_snapshot() {
    let mut cluster = Cluster::start(Options {
        node_args: ["--snapshot-every", "20"].map(String::from).to_vec(),
        ..Options::default()
    })
    .await;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let behind = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    cluster.kill_node(behind);
    // One at a time, so the log grows well past a few snapshots.
    for i in 0..120u64 {
        cluster
            .enqueue(leader, payload(i, 4096), 3, &format!("s-{i}"))
            .await;
    }
    let status = wait_for(
        "a snapshot on the leader",
        Duration::from_secs(20),
        || async {
            let s = cluster.get_json(leader, "/status").await?;
            (s["snapshot_index"].as_u64()? > 60).then_some(s)
        },
    )
    .await;
    assert!(
        status["last_log_index"].as_u64().unwrap() >= 120,
        "{status}"
    );
    cluster.start_node(behind);
    wait_for(
        "the restarted node to have all 120 items",
        Duration::from_secs(60),
        || async {
            let s = cluster.get_json(behind, "/status").await?;
            (s["counts"]["queued"] == 120).then_some(())
        },
    )
    .await;
    let log =
        std::fs::read_to_string(cluster.dir.path().join(format!("node-{behind}.log"))).unwrap();
    assert!(
        log.contains("snapshot installed"),
        "node {behind} caught up without a snapshot"
    );
    // And it can take over: with the old leader gone, everything is still there.
    cluster.kill_node(leader);
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    cluster.start_worker(&[]);
    let results = pull_everything(&cluster, 120, Duration::from_secs(60)).await;
    for i in 0..120u64 {
        assert!(
            results
                .values()
                .any(|v| *v == reference(&payload(i, 4096), 3)),
            "item {i} missing"
        );
    }
}

/// Regression (found by the chaos suite): a follower restarted from an older copy of its data
/// (a restored backup) made the leader panic on the follower's log going backwards. The
/// leader now resets that follower's progress and re-replicates.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_restored_from_an_old_backup_rejoins_without_harm() {
    let mut cluster = Cluster::start(Options::default()).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    for i in 0..20u64 {
        cluster
            .enqueue(leader, payload(i, 1000), 1, &format!("before-{i}"))
            .await;
    }
    cluster.kill_node(follower);
    let data = cluster.data_dir(follower);
    let backup = cluster.dir.path().join("backup");
    assert!(std::process::Command::new("cp")
        .arg("-a")
        .arg(&data)
        .arg(&backup)
        .status()
        .unwrap()
        .success());
    cluster.start_node(follower);
    for i in 20..60u64 {
        cluster
            .enqueue(leader, payload(i, 1000), 1, &format!("between-{i}"))
            .await;
    }
    wait_for(
        "the follower to catch up",
        Duration::from_secs(30),
        || async {
            let s = cluster.get_json(follower, "/status").await?;
            (s["counts"]["queued"] == 60).then_some(())
        },
    )
    .await;
    // Back to the old copy: its log now ends 40 entries earlier than the leader knew.
    cluster.kill_node(follower);
    std::fs::remove_dir_all(&data).unwrap();
    assert!(std::process::Command::new("cp")
        .arg("-a")
        .arg(&backup)
        .arg(&data)
        .status()
        .unwrap()
        .success());
    // A patient follower: it waits for the leader instead of calling an election, so the
    // leader (not a newly elected one) meets the reverted log.
    cluster.start_node_with(
        follower,
        &["--election-timeout", "5s", "--request-timeout", "20s"],
    );
    // Writes go through the same leader, directly (no failing over to another node).
    for i in 60..80u64 {
        let answer = cluster
            .http
            .put(format!("{}/enqueue?iterations=1", cluster.url(leader)))
            .body(payload(i, 1000))
            .send()
            .await
            .expect("the leader answers");
        assert_eq!(answer.status(), 200, "write {i} on the leader");
    }
    wait_for(
        "the restored follower to catch up again",
        Duration::from_secs(30),
        || async {
            let s = cluster.get_json(follower, "/status").await?;
            (s["counts"]["queued"] == 80).then_some(())
        },
    )
    .await;
    // The leader is still the leader and serving: it did not stop on the reverted log.
    let s = cluster
        .get_json(leader, "/status")
        .await
        .expect("the leader answers");
    assert_eq!(s["state"], "leader", "{s}");
    assert_eq!(s["counts"]["queued"], 80);
}
