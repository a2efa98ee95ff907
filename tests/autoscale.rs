//! Autoscaling with the `local` launcher: one cluster-wide budget, enforced through Raft,
//! whatever the load, the races and the crashes.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::workload::{workers, SharedPayloads};
use common::{wait_for, Cluster, Options};
use serde_json::Value;

const ITERATIONS: u32 = 200_000;

fn options(max_workers: u32, extra: &[&str]) -> Options {
    let mut node_args: Vec<String> = [
        "--max-workers",
        &max_workers.to_string(),
        "--scale-up-wait",
        "300ms",
        "--scale-up-interval",
        "200ms",
        "--worker-idle-timeout",
        "2s",
        "--worker-orphan-timeout",
        "4s",
        "--lease",
        "3s",
        "--worker-lost-after",
        "3s",
    ]
    .map(String::from)
    .to_vec();
    node_args.extend(extra.iter().map(|s| s.to_string()));
    Options {
        nodes: 3,
        node_args,
        launch_workers: true,
        proxied: false,
        data_root: None,
        ports: None,
        tls: false,
    }
}

/// Samples the number of worker processes and of managed slots every 100 ms, remembering
/// the largest of each, until dropped.
struct Sampler {
    stop: Arc<AtomicBool>,
    max_processes: Arc<AtomicUsize>,
    max_slots: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(cluster: &Cluster) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max_processes = Arc::new(AtomicUsize::new(0));
        let max_slots = Arc::new(AtomicUsize::new(0));
        let endpoints = cluster.endpoints();
        let urls: Vec<String> = cluster.ids().iter().map(|id| cluster.url(*id)).collect();

        let (s, p, m) = (stop.clone(), max_processes.clone(), max_slots.clone());
        let http = cluster.http.clone();
        let task = tokio::spawn(async move {
            while !s.load(Ordering::SeqCst) {
                p.fetch_max(common::worker_processes(&endpoints).len(), Ordering::SeqCst);
                for url in &urls {
                    let status = http
                        .get(format!("{url}/status"))
                        .timeout(Duration::from_millis(300))
                        .send()
                        .await;
                    if let Ok(answer) = status {
                        if let Ok(v) = answer.json::<Value>().await {
                            m.fetch_max(managed_slots(&v), Ordering::SeqCst);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Sampler {
            stop,
            max_processes,
            max_slots,
            task,
        }
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        (
            self.max_processes.load(Ordering::SeqCst),
            self.max_slots.load(Ordering::SeqCst),
        )
    }
}

fn managed_slots(status: &Value) -> usize {
    workers(status)
        .iter()
        .filter(|w| w["managed"] == true)
        .count()
}

/// Items share eight 1 KiB payloads.
const ITEMS: SharedPayloads = SharedPayloads {
    distinct: 8,
    len: 1024,
};

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_on_one_node_uses_the_whole_budget_then_scales_to_zero() {
    let cluster = Cluster::start(options(3, &[])).await;
    let sampler = Sampler::start(&cluster);
    let ids = ITEMS.enqueue(&cluster, &[2], 0..200, ITERATIONS).await;
    wait_for("three workers running", Duration::from_secs(30), || async {
        let s = cluster.get_json(1, "/status").await?;
        (s["workers"]["running"] == 3).then_some(())
    })
    .await;
    ITEMS
        .pull_all(&cluster, &ids, ITERATIONS, Duration::from_secs(120))
        .await;
    // Idle workers exit and give their slots back.
    wait_for("every worker to exit", Duration::from_secs(30), || async {
        let s = cluster.get_json(3, "/status").await?;
        (workers(&s).is_empty() && cluster.worker_processes().is_empty()).then_some(())
    })
    .await;
    let (max_processes, max_slots) = sampler.finish().await;
    assert_eq!(
        max_processes, 3,
        "the budget is 3 and there was backlog for more"
    );
    assert_eq!(max_slots, 3);
    // The workers were spread over the nodes, not only the one the load arrived at.
    let parents: HashSet<u64> = (1..=3)
        .flat_map(|id| {
            let log = cluster.data_dir(id).join("workers");
            std::fs::read_dir(log)
                .into_iter()
                .flatten()
                .flatten()
                .map(move |_| id)
        })
        .collect();
    assert!(
        parents.len() >= 2,
        "all workers were launched by one node: {parents:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_holds_when_the_leader_dies_during_scale_up() {
    let mut cluster = Cluster::start(options(4, &[])).await;
    let sampler = Sampler::start(&cluster);
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let all = cluster.ids();
    let (first, ()) = tokio::join!(ITEMS.enqueue(&cluster, &all, 0..90, ITERATIONS), async {
        wait_for(
            "the first launched worker",
            Duration::from_secs(30),
            || async {
                let s = cluster.get_json(leader, "/status").await?;
                (managed_slots(&s) >= 1).then_some(())
            },
        )
        .await;
    });
    cluster.kill_node(leader);
    let survivors: Vec<u64> = all.iter().copied().filter(|id| *id != leader).collect();
    let more = ITEMS
        .enqueue(&cluster, &survivors, 90..150, ITERATIONS)
        .await;
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    cluster.start_node(leader);
    let ids: Vec<(String, u64)> = first.into_iter().chain(more).collect();
    ITEMS
        .pull_all(&cluster, &ids, ITERATIONS, Duration::from_secs(180))
        .await;
    let (max_processes, max_slots) = sampler.finish().await;
    assert!(
        max_processes <= 4,
        "{max_processes} worker processes with a budget of 4"
    );
    assert!(max_slots <= 4, "{max_slots} slots with a budget of 4");
    assert!(max_processes >= 2, "the cluster never scaled up");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_lease_is_replaced_and_its_item_completes() {
    let cluster = Cluster::start(options(1, &[])).await;
    let ids = ITEMS.enqueue(&cluster, &[1], 0..6, 1_500_000).await;
    let victim = wait_for(
        "a worker holding a lease",
        Duration::from_secs(30),
        || async {
            let s = cluster.get_json(1, "/status").await?;
            workers(&s)
                .into_iter()
                .find(|w| w["state"] == "running" && w["leased"].as_u64() > Some(0))
        },
    )
    .await;
    let pid: u32 = victim["handle"]
        .as_str()
        .unwrap()
        .strip_prefix("pid:")
        .unwrap()
        .parse()
        .unwrap();
    let victim_id = victim["id"].as_str().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    // Declared lost, slot released, a replacement launched while there is backlog.
    let replacement = wait_for("a replacement worker", Duration::from_secs(30), || async {
        let s = cluster.get_json(2, "/status").await?;
        let list = workers(&s);
        (!list.iter().any(|w| w["id"] == victim_id.as_str()))
            .then(|| list.into_iter().find(|w| w["managed"] == true))
            .flatten()
    })
    .await;
    assert_ne!(replacement["id"], victim_id.as_str());
    ITEMS
        .pull_all(&cluster, &ids, 1_500_000, Duration::from_secs(120))
        .await;
    let status = cluster.get_json(3, "/status").await.unwrap();
    assert!(
        status["totals"]["expired_leases"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert_eq!(status["counts"]["dead"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn orphaned_workers_keep_working_under_a_new_parent_and_nothing_launches_twice() {
    let mut cluster = Cluster::start(options(2, &[])).await;
    let first = ITEMS.enqueue(&cluster, &[1, 2, 3], 0..30, 600_000).await;
    let (parent, worker_ids) =
        wait_for("two launched workers", Duration::from_secs(30), || async {
            let s = cluster.get_json(1, "/status").await?;
            let list = workers(&s);
            let running: Vec<&Value> = list.iter().filter(|w| w["state"] == "running").collect();
            (running.len() == 2).then(|| {
                (
                    running[0]["parent"].as_u64().unwrap(),
                    running
                        .iter()
                        .map(|w| w["id"].as_str().unwrap().to_string())
                        .collect::<HashSet<_>>(),
                )
            })
        })
        .await;
    cluster.kill_node(parent);
    let survivor = cluster.ids().into_iter().find(|id| *id != parent).unwrap();
    // The orphans re-parent, stay counted once, and keep working.
    wait_for(
        "the orphans to re-parent",
        Duration::from_secs(30),
        || async {
            let s = cluster.get_json(survivor, "/status").await?;
            let list = workers(&s);
            let ids: HashSet<String> = list
                .iter()
                .map(|w| w["id"].as_str().unwrap().to_string())
                .collect();
            let reparented = list.iter().all(|w| w["parent"].as_u64() != Some(parent));
            (ids == worker_ids && reparented).then_some(())
        },
    )
    .await;
    let more = ITEMS.enqueue(&cluster, &[survivor], 30..45, 600_000).await;
    cluster.start_node(parent);
    let ids: Vec<(String, u64)> = first.into_iter().chain(more).collect();
    ITEMS
        .pull_all(&cluster, &ids, 600_000, Duration::from_secs(120))
        .await;
    // No slot was launched twice: still the same two workers, and never more than two.
    let s = cluster.get_json(parent, "/status").await.unwrap();
    let ids_now: HashSet<String> = workers(&s)
        .iter()
        .map(|w| w["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        ids_now.is_subset(&worker_ids),
        "new workers appeared: {ids_now:?} vs {worker_ids:?}"
    );
    assert!(cluster.worker_processes().len() <= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_every_node_gone_workers_exit_by_themselves() {
    let mut cluster = Cluster::start(options(2, &[])).await;
    ITEMS.enqueue(&cluster, &[1], 0..20, 2_000_000).await;
    wait_for("two worker processes", Duration::from_secs(30), || async {
        (cluster.worker_processes().len() == 2).then_some(())
    })
    .await;
    for id in cluster.ids() {
        cluster.kill_node(id);
    }
    // --worker-orphan-timeout is 4s: they must be gone well before this deadline.
    wait_for(
        "the orphaned workers to exit",
        Duration::from_secs(15),
        || async { cluster.worker_processes().is_empty().then_some(()) },
    )
    .await;
}
