//! Flat memory: a node's resident memory does not follow the backlog. Payloads are written
//! once, to the Raft log (or to a pack a snapshot brought), and read from disk when a worker
//! leases them; RAM holds bounded caches and the requests in flight.
//!
//! 500 MiB of 256 KiB items, no workers, a snapshot every 100 entries; a follower is wiped
//! and restarted so it must install a snapshot (whose payload section is all 500 MiB); then
//! every node restarts; then workers drain the backlog and every value is checked. Every
//! node's RSS is sampled all along and must stay under [`RSS_BOUND_MIB`]: hashq 0.1 (payloads
//! in sled) took every node to about 1.5 times the backlog.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{payload, reference, rss_kib, wait_for, Cluster, Options};

const ITEMS: u64 = 2000;
const ITEM_BYTES: usize = 256 * 1024;
/// Under half the backlog (500 MiB): what a node may hold whatever the backlog.
const RSS_BOUND_MIB: u64 = 200;

/// Samples every running node's RSS every 100 ms until dropped; keeps each node's peak.
struct Sampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<HashMap<u64, u64>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Sampler {
    fn start(pids: Arc<Mutex<HashMap<u64, u32>>>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new(Mutex::new(HashMap::new()));
        let task = tokio::spawn({
            let (stop, peaks) = (stop.clone(), peaks.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let now: Vec<(u64, u32)> =
                        pids.lock().unwrap().iter().map(|(k, v)| (*k, *v)).collect();
                    for (id, pid) in now {
                        if let Some(kib) = rss_kib(pid) {
                            let mut peaks = peaks.lock().unwrap();
                            let peak = peaks.entry(id).or_insert(0);
                            *peak = (*peak).max(kib >> 10);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        Sampler {
            stop,
            peaks,
            task: Some(task),
        }
    }

    /// The peaks so far (MiB by node), failing when one is over the bound.
    fn check(&self, phase: &str) {
        let peaks = self.peaks.lock().unwrap().clone();
        eprintln!("memory: peak RSS by node after {phase}: {peaks:?} MiB");
        for (id, mib) in peaks {
            assert!(
                mib < RSS_BOUND_MIB,
                "node {id} reached {mib} MiB RSS ({phase}); the bound is {RSS_BOUND_MIB} MiB"
            );
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn track(cluster: &Cluster, pids: &Mutex<HashMap<u64, u32>>) {
    let mut pids = pids.lock().unwrap();
    pids.clear();
    for id in cluster.ids() {
        if let Some(pid) = cluster.node_pid(id) {
            pids.insert(id, pid);
        }
    }
}

/// Enqueues items `range` with 8 clients over all nodes; returns (work id, item) pairs.
async fn enqueue(cluster: &Cluster, range: std::ops::Range<u64>) -> Vec<(String, u64)> {
    let next = Arc::new(Mutex::new(range));
    let done = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..8u64 {
        let (next, done) = (next.clone(), done.clone());
        let cluster: &Cluster = cluster;
        tasks.push(async move {
            loop {
                let Some(i) = next.lock().unwrap().next() else {
                    return;
                };
                let node = 1 + (c + i) % 3;
                let id = cluster
                    .enqueue(node, payload(i, ITEM_BYTES), 1, &format!("mem-{i}"))
                    .await;
                done.lock().unwrap().push((id, i));
            }
        });
    }
    futures::future::join_all(tasks).await;
    let done = done.lock().unwrap().clone();
    done
}

async fn queued_everywhere(cluster: &Cluster, n: u64) {
    wait_for(
        "every node to hold the whole backlog",
        Duration::from_secs(120),
        || async {
            for id in cluster.ids() {
                let s = cluster.get_json(id, "/status").await?;
                if s["counts"]["queued"].as_u64()? != n {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_stays_flat_with_a_500_mib_backlog_through_snapshots_installs_and_restarts() {
    let mut cluster = Cluster::start(Options {
        node_args: [
            "--snapshot-every",
            "100",
            "--log-segment-bytes",
            "16MiB",
            "--disk-free-limit",
            "1MiB",
            "--request-timeout",
            "20s",
        ]
        .map(String::from)
        .to_vec(),
        ..Options::default()
    })
    .await;
    let pids = Arc::new(Mutex::new(HashMap::new()));
    track(&cluster, &pids);
    let sampler = Sampler::start(pids.clone());

    // Half the backlog, then a follower loses its data dir and comes back empty.
    let mut items = enqueue(&cluster, 0..ITEMS / 2).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let wiped = cluster.ids().into_iter().find(|i| *i != leader).unwrap();
    cluster.kill_node(wiped);
    std::fs::remove_dir_all(cluster.data_dir(wiped)).unwrap();
    items.extend(enqueue(&cluster, ITEMS / 2..ITEMS).await);
    sampler.check("enqueueing 500 MiB");

    cluster.start_node(wiped);
    track(&cluster, &pids);
    queued_everywhere(&cluster, ITEMS).await;
    let metrics = cluster.metrics(wiped).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hashq_snapshots_installed_total") && !l.ends_with(" 0")),
        "the wiped node caught up by installing a snapshot"
    );
    for id in cluster.ids() {
        let s = cluster.get_json(id, "/status").await.unwrap();
        assert!(
            s["snapshot_index"].as_u64().unwrap_or(0) > 0,
            "node {id} took snapshots: {s}"
        );
    }
    sampler.check("a snapshot install of the whole backlog");

    // Every node restarts (one at a time, so the cluster keeps a majority).
    for id in cluster.ids() {
        cluster.stop_node(id);
        cluster.start_node(id);
        track(&cluster, &pids);
        cluster.wait_for_leader(Duration::from_secs(60)).await;
    }
    queued_everywhere(&cluster, ITEMS).await;
    sampler.check("restarts");

    // Workers take every payload from disk (the log, or the wiped node's pack) and every
    // value is the one computed here.
    for _ in 0..2 {
        cluster.start_worker(&[]);
    }
    let by_id: HashMap<String, u64> = items.into_iter().collect();
    let mut results = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    for round in 0.. {
        for (id, value) in cluster
            .pull(1 + round % 3, 500, &format!("pull-{round}"))
            .await
        {
            assert!(
                results.insert(id.clone(), value).is_none(),
                "{id} pulled twice"
            );
        }
        if results.len() as u64 == ITEMS {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {ITEMS} results after 300 s",
            results.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (id, value) in &results {
        let i = by_id[id];
        assert_eq!(
            value,
            &reference(&payload(i, ITEM_BYTES), 1),
            "the value of item {i}"
        );
    }
    sampler.check("draining");
}
