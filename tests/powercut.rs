//! Power cuts, for real: the nodes' data dirs live on `hashq-faultfs`, a FUSE file system that
//! keeps every write in memory until it is fsynced and drops what is unsynced on command.
//! After a cut every node is SIGKILLed, the file system keeps only what was synced, and the
//! nodes restart from that: every acknowledged enqueue and pull must still be there.
//!
//! `HASHQ_UNSAFE_SKIP_SYNC=1` (the store then syncs nothing) makes these tests fail: that is
//! how we know they can.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{copy_dir, payload, reference, wait_for, Cluster, Options};
use hashq_faultfs::{Mounted, Op};
use serde_json::Value;

/// The faultfs binary, built beside `hashq` (`cargo build -p hashq-faultfs`; scripts/test.sh
/// does it).
fn faultfs_binary() -> PathBuf {
    let path = common::binary().with_file_name("hashq-faultfs");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p hashq-faultfs` (scripts/test.sh does)",
        path.display()
    );
    path
}

fn mount() -> Mounted {
    Mounted::spawn(faultfs_binary()).expect(
        "mount hashq-faultfs (needs /dev/fuse and root or fusermount3: apt-get install fuse3)",
    )
}

/// Entries between two snapshots of every cut test's nodes.
const SNAPSHOT_EVERY: &str = "60";

/// Node flags for every cut test: snapshots and segment files small, so cuts land in
/// snapshot builds, installs and purges.
fn node_args(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--snapshot-every",
        SNAPSHOT_EVERY,
        "--log-segment-bytes",
        "262144",
        "--pulled-retention",
        "1h",
        "--lease",
        "3s",
        "--worker-lost-after",
        "3s",
        "--request-timeout",
        "5s",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

async fn start_on(fs: &Mounted, extra: &[&str]) -> Cluster {
    Cluster::start(Options {
        data_root: Some(fs.mountpoint().to_path_buf()),
        node_args: node_args(extra),
        ..Options::default()
    })
    .await
}

/// What the clients were told, to be checked after every cut.
#[derive(Clone, Default)]
struct Acked {
    /// work id -> (payload seed, length, iterations)
    enqueued: BTreeMap<String, (u64, usize, u32)>,
    /// pull key -> items it returned
    pulled: BTreeMap<String, Vec<(String, String)>>,
}

/// A copy of what was acknowledged so far.
fn seen(acked: &Arc<Mutex<Acked>>) -> Acked {
    acked.lock().unwrap().clone()
}

struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

static KEY: AtomicU64 = AtomicU64::new(0);

/// Clients that enqueue `size`-byte items and pull, through every node, recording only what
/// was acknowledged (an answer lost to a cut is not a promise).
fn load(cluster: &Cluster, acked: Arc<Mutex<Acked>>, size: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    for client in 0..6u64 {
        let urls: Vec<String> = cluster.ids().iter().map(|id| cluster.url(*id)).collect();
        let (stop, acked, http) = (stop.clone(), acked.clone(), http.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let url = &urls[(client as usize + n) % urls.len()];
                let key = KEY.fetch_add(1, Ordering::Relaxed);
                if client == 0 && n.is_multiple_of(3) {
                    let name = format!("pull-{key}");
                    let answer = http
                        .post(format!("{url}/pullCompleted?top=20"))
                        .header("idempotency-key", &name)
                        .send()
                        .await;
                    if let Ok(a) = answer {
                        if a.status().is_success() {
                            if let Ok(v) = a.json::<Value>().await {
                                let items = v
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .map(|i| {
                                        (
                                            i["work_id"].as_str().unwrap_or("").to_string(),
                                            i["value"].as_str().unwrap_or("").to_string(),
                                        )
                                    })
                                    .collect();
                                acked.lock().unwrap().pulled.insert(name, items);
                            }
                        }
                    }
                } else {
                    let iterations = 1 + (key % 3) as u32;
                    let answer = http
                        .put(format!("{url}/enqueue?iterations={iterations}"))
                        .header("idempotency-key", format!("enq-{key}"))
                        .body(payload(key, size))
                        .send()
                        .await;
                    if let Ok(a) = answer {
                        if a.status().is_success() {
                            if let Ok(v) = a.json::<Value>().await {
                                if let Some(id) = v["work_id"].as_str() {
                                    acked
                                        .lock()
                                        .unwrap()
                                        .enqueued
                                        .insert(id.to_string(), (key, size, iterations));
                                }
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    Load { stop, tasks }
}

impl Load {
    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Cuts the power of every node at once: the file system drops everything unsynced, every
/// node dies (SIGKILL), then everything comes back from what was durable.
async fn power_cycle(cluster: &mut Cluster, fs: &mut Mounted, cut_now: bool) {
    if cut_now {
        fs.control().cut("").unwrap();
    }
    for id in cluster.ids() {
        cluster.kill_node(id);
    }
    fs.control().revive("").unwrap();
    for id in cluster.ids() {
        cluster.start_node(id);
    }
    cluster.wait_for_leader(Duration::from_secs(60)).await;
}

/// Every acknowledged enqueue exists (with the right value once completed), and every
/// acknowledged pull's items are pulled, on the node that answers.
async fn check_nothing_lost(cluster: &Cluster, acked: &Acked, round: &str) {
    let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
    let mut missing = Vec::new();
    for (id, (seed, size, iterations)) in &acked.enqueued {
        let item = wait_for("a work item answer", Duration::from_secs(30), || async {
            let r = cluster
                .http
                .get(format!("{}/work/{id}", cluster.url(leader)))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?;
            match r.status().as_u16() {
                200 => r.json::<Value>().await.ok(),
                404 => Some(Value::Null),
                _ => None,
            }
        })
        .await;
        if item.is_null() {
            missing.push(id.clone());
            continue;
        }
        if let Some(value) = item["value"].as_str() {
            assert_eq!(
                value,
                reference(&payload(*seed, *size), *iterations),
                "{round}: wrong value for {id}"
            );
        }
    }
    assert!(
        missing.is_empty(),
        "{round}: {} of {} acknowledged enqueues are gone, such as {:?}",
        missing.len(),
        acked.enqueued.len(),
        &missing[..missing.len().min(10)]
    );
    for (key, items) in &acked.pulled {
        for (id, _) in items {
            let item = cluster
                .get_json(leader, &format!("/work/{id}"))
                .await
                .unwrap_or(Value::Null);
            assert_eq!(
                item["status"], "pulled",
                "{round}: {id}, pulled under {key}, is {item}"
            );
        }
    }
}

/// Waits (20 s at most) for the armed trigger `id` to fire.
async fn wait_fired(fs: &mut Mounted, id: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if fs.control().fired().unwrap().iter().any(|f| f.id == id) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Arms a cut on the next `op` under `prefix` (scope: the whole cluster), runs the load until
/// it fires (or `max`), then power-cycles.
async fn cut_on(
    cluster: &mut Cluster,
    fs: &mut Mounted,
    acked: &Arc<Mutex<Acked>>,
    size: usize,
    op: Op,
    prefix: &str,
    after: bool,
) -> bool {
    let id = if after {
        fs.control().arm_cut_after(op, prefix, None).unwrap()
    } else {
        fs.control().arm_cut(op, prefix, None).unwrap()
    };
    let running = load(cluster, acked.clone(), size);
    let fired = wait_fired(fs, id).await;
    // The cut happened (or, if the operation never came, happens now).
    power_cycle(cluster, fs, !fired).await;
    running.stop().await;
    fs.control().clear().unwrap();
    fired
}

/// A lagging follower: node `id` misses enough entries that it needs a snapshot (the others
/// purge their logs), then the cut lands while it installs one.
async fn cut_during_snapshot_install(
    cluster: &mut Cluster,
    fs: &mut Mounted,
    acked: &Arc<Mutex<Acked>>,
    size: usize,
) -> bool {
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let lagging = cluster.ids().into_iter().find(|i| *i != leader).unwrap();
    cluster.kill_node(lagging);
    let running = load(cluster, acked.clone(), size);
    // More entries than --snapshot-every: the others snapshot and purge.
    let start = cluster.get_json(leader, "/status").await.unwrap()["commit_index"]
        .as_u64()
        .unwrap_or(0);
    wait_for(
        "the log to move past a snapshot",
        Duration::from_secs(30),
        || async {
            let s = cluster.get_json(leader, "/status").await?;
            let purged = s["snapshot_index"].as_u64().unwrap_or(0);
            (purged > start + 10).then_some(())
        },
    )
    .await;
    let id = fs
        .control()
        .arm_cut(Op::Rename, &format!("node-{lagging}/snapshots/"), None)
        .unwrap();
    cluster.start_node(lagging);
    let fired = wait_fired(fs, id).await;
    power_cycle(cluster, fs, !fired).await;
    running.stop().await;
    fs.control().clear().unwrap();
    fired
}

async fn whole_cluster_power_cuts(size: usize) {
    let mut fs = mount();
    let mut cluster = start_on(&fs, &[]).await;
    let _workers: Vec<usize> = (0..2).map(|_| cluster.start_worker(&[])).collect();
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut report = Vec::new();
    // Plain cuts at a random moment under load.
    for round in 0..3 {
        let running = load(&cluster, acked.clone(), size);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        power_cycle(&mut cluster, &mut fs, true).await;
        running.stop().await;
        check_nothing_lost(&cluster, &seen(&acked), &format!("cut {round}")).await;
        report.push("now".to_string());
    }
    // Cuts on chosen operations: in the middle of a log append, right after one was
    // acknowledged, while a snapshot is built (its file synced, its rename), while the log
    // is purged (a segment deleted), while the vote file is written.
    let targets: [(Op, &str, bool); 6] = [
        (Op::Fsync, "node-1/raft/log/", false),
        (Op::Fsync, "node-2/raft/log/", true),
        (Op::Fsync, "node-1/snapshots/", false),
        (Op::Rename, "node-2/snapshots/", false),
        (Op::Unlink, "node-3/raft/log/", false),
        (Op::Fsync, "node-3/raft/vote", true),
    ];
    for (op, prefix, after) in targets {
        let fired = cut_on(&mut cluster, &mut fs, &acked, size, op, prefix, after).await;
        let round = format!("{op:?} {prefix} after={after} fired={fired}");
        check_nothing_lost(&cluster, &seen(&acked), &round).await;
        report.push(round);
    }
    let fired = cut_during_snapshot_install(&mut cluster, &mut fs, &acked, size).await;
    check_nothing_lost(&cluster, &seen(&acked), "cut during a snapshot install").await;
    report.push(format!("snapshot install fired={fired}"));
    let acked = acked.lock().unwrap();
    eprintln!(
        "POWER CUTS ({size} B items): {} cuts {report:?}; {} acknowledged enqueues and {} pulls, none lost",
        report.len(),
        acked.enqueued.len(),
        acked.pulled.len()
    );
    assert!(report.len() >= 10);
    for id in cluster.ids() {
        assert!(cluster.node_alive(id), "node {id} did not stay up");
    }
    assert!(acked.enqueued.len() > 50, "the load barely ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_power_cuts_lose_nothing_acknowledged_1k() {
    whole_cluster_power_cuts(1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_power_cuts_lose_nothing_acknowledged_200k() {
    whole_cluster_power_cuts(200 * 1024).await;
}

/// Every node's own claim to lead, by term: two claimants in one term is a split brain.
type Claims = Arc<Mutex<BTreeMap<u64, std::collections::BTreeSet<u64>>>>;

fn watch_leaders(
    cluster: &Cluster,
    stop: Arc<AtomicBool>,
) -> (Claims, tokio::task::JoinHandle<()>) {
    let claims: Claims = Arc::default();
    let urls: Vec<(u64, String)> = cluster
        .ids()
        .iter()
        .map(|id| (*id, cluster.url(*id)))
        .collect();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let c = claims.clone();
    let task = tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            for (id, url) in &urls {
                let Ok(answer) = http.get(format!("{url}/health")).send().await else {
                    continue;
                };
                let Ok(h) = answer.json::<Value>().await else {
                    continue;
                };
                if h["leader"].as_u64() == Some(*id) {
                    let term = h["term"].as_u64().unwrap_or(0);
                    c.lock().unwrap().entry(term).or_default().insert(*id);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    (claims, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minority_power_cuts_while_leadership_moves_never_split_the_brain_or_lose_anything() {
    let mut fs = mount();
    let mut cluster = start_on(&fs, &[]).await;
    let _worker = cluster.start_worker(&[]);
    let acked = Arc::new(Mutex::new(Acked::default()));
    let running = load(&cluster, acked.clone(), 2048);
    let stop = Arc::new(AtomicBool::new(false));
    let (claims, watcher) = watch_leaders(&cluster, stop.clone());
    for round in 0..6u64 {
        let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
        // Leadership moves: the leader stops answering for longer than an election.
        cluster.pause_node(leader);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.resume_node(leader);
        // One node loses power (the old leader, then a follower, in turn).
        let victim = if round % 2 == 0 {
            leader
        } else {
            cluster.ids().into_iter().find(|i| *i != leader).unwrap()
        };
        let scope = format!("node-{victim}");
        fs.control().cut(&scope).unwrap();
        cluster.kill_node(victim);
        fs.control().revive(&scope).unwrap();
        cluster.start_node(victim);
        cluster.wait_for_leader(Duration::from_secs(60)).await;
    }
    running.stop().await;
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.await;
    check_nothing_lost(&cluster, &seen(&acked), "minority cuts").await;
    let claims = claims.lock().unwrap().clone();
    let split: Vec<_> = claims.iter().filter(|(_, l)| l.len() > 1).collect();
    eprintln!(
        "MINORITY CUTS: 6 cuts, terms seen {:?}, {} acknowledged enqueues, none lost",
        claims.keys().collect::<Vec<_>>(),
        acked.lock().unwrap().enqueued.len()
    );
    assert!(split.is_empty(), "two leaders in one term: {split:?}");
    assert!(claims.len() >= 4, "leadership did not move: {claims:?}");
}

/// The node's `/status`.
async fn status(cluster: &Cluster, id: u64) -> Value {
    wait_for("a status answer", Duration::from_secs(30), || async {
        cluster.get_json(id, "/status").await
    })
    .await
}

/// Waits until node `id` has applied as far as the leader.
async fn caught_up(cluster: &Cluster, id: u64) {
    wait_for("the node to catch up", Duration::from_secs(60), || async {
        let leader = cluster.leader().await?;
        let want = cluster.get_json(leader, "/status").await?["commit_index"].as_u64()?;
        let have = cluster.get_json(id, "/status").await?["commit_index"].as_u64()?;
        (have >= want).then_some(())
    })
    .await;
}

/// A node trusts what it reads when it starts, so it must make that durable first: a data
/// dir restored from a backup (`cp -a`, nothing synced) or left by a process that died
/// between a write and its fsync is, until then, page cache only. Here a follower is restored
/// from an older copy and catches up; anything that syncs the parent directory (a sibling
/// node's data dir being created, say) then makes the restored directory's *name* durable,
/// while its contents are not, unless the node synced them. After a power cut the follower
/// must still hold every entry it reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restored_data_dir_is_made_durable_before_the_node_relies_on_it() {
    let mut fs = mount();
    let mut cluster = start_on(&fs, &[]).await;
    let mut acked = Acked::default();
    let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
    enqueue_range(&cluster, leader, 0..10, &mut acked).await;
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    caught_up(&cluster, follower).await;
    cluster.kill_node(follower);
    let backup = cluster.dir.path().join("backup");
    copy_dir(&cluster.data_dir(follower), &backup);
    enqueue_range(&cluster, leader, 10..20, &mut acked).await;
    copy_dir(&backup, &cluster.data_dir(follower));
    cluster.start_node(follower);
    enqueue_range(&cluster, leader, 20..30, &mut acked).await;
    caught_up(&cluster, follower).await;
    let reported = status(&cluster, follower).await["last_log_index"]
        .as_u64()
        .unwrap();
    std::fs::File::open(fs.mountpoint())
        .and_then(|root| root.sync_all())
        .unwrap();

    fs.control().cut("").unwrap();
    cluster.kill_all();
    fs.control().revive("").unwrap();
    // The follower alone first: what it holds is its own, not copied back from its peers.
    cluster.start_node(follower);
    // Its Raft reports what it holds once it has read its log (nothing, if it lost it all).
    let after = hashq_testkit::poll_until(Duration::from_secs(10), || async {
        cluster.get_json(follower, "/status").await?["last_log_index"].as_u64()
    })
    .await;
    assert!(
        after >= Some(reported),
        "node {follower} reported its log up to {reported} before the power cut, and holds {after:?} after it"
    );
    for id in cluster.ids() {
        if id != follower {
            cluster.start_node(id);
        }
    }
    check_nothing_lost(&cluster, &acked, "after the cut").await;
}

/// Enqueues 512-byte items `keys` through node `id`, recording them in `acked`.
async fn enqueue_range(cluster: &Cluster, id: u64, keys: std::ops::Range<u64>, acked: &mut Acked) {
    for k in keys {
        let work_id = cluster
            .enqueue(id, payload(k, 512), 1, &format!("r{k}"))
            .await;
        acked.enqueued.insert(work_id, (k, 512, 1));
    }
}

/// The files under `dir` (relative to the mount), sorted.
fn files(fs: &Mounted, dir: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(fs.path(dir))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    found.sort();
    found
}

/// The files under `dir` whose names end in `.ext`.
fn files_ending(fs: &Mounted, dir: &str, ext: &str) -> Vec<PathBuf> {
    files(fs, dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect()
}

fn relative(fs: &Mounted, path: &std::path::Path) -> String {
    path.strip_prefix(fs.mountpoint())
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corruption_is_detected_never_served_and_repaired_from_peers() {
    let mut fs = mount();
    let mut cluster = start_on(&fs, &[]).await;
    let acked = Arc::new(Mutex::new(Acked::default()));
    let running = load(&cluster, acked.clone(), 4096);
    tokio::time::sleep(Duration::from_secs(3)).await;
    running.stop().await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let others: Vec<u64> = cluster.ids().into_iter().filter(|i| *i != leader).collect();
    let (a, b) = (others[0], others[1]);

    // 1. A torn last record (the power went mid-append): cut off at start; the node boots
    // and catches up.
    let segments = files(&fs, &format!("node-{a}/raft/log"));
    let last = relative(&fs, segments.last().unwrap());
    fs.control().torn(&last).unwrap();
    let running = load(&cluster, acked.clone(), 4096);
    tokio::time::sleep(Duration::from_millis(500)).await;
    fs.control().cut(&format!("node-{a}")).unwrap();
    cluster.kill_node(a);
    running.stop().await;
    fs.control().revive(&format!("node-{a}")).unwrap();
    cluster.start_node(a);
    caught_up(&cluster, a).await;
    assert_eq!(status(&cluster, a).await["repairing"], Value::Null);

    // 2. A flipped bit in the middle of a follower's log, found at start: the node sets its
    // state aside and must not vote until its peers repaired it. Shown by pausing the leader
    // while it repairs: the one healthy follower left cannot win an election with it.
    cluster.kill_node(b);
    let segments = files(&fs, &format!("node-{b}/raft/log"));
    let first = &segments[0];
    let len = std::fs::metadata(first).unwrap().len();
    let target = relative(&fs, first);
    fs.control().flip(&target, len / 2, 3).unwrap();
    cluster.pause_node(leader);
    cluster.start_node(b);
    let repairing = status(&cluster, b).await;
    assert!(
        repairing["repairing"]["until"].as_u64().is_some(),
        "{repairing}"
    );
    // Four election timeouts and more: nobody but the paused leader may lead.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in [a, b] {
        let h = cluster.get_json(id, "/health").await.unwrap();
        assert!(
            h["leader"].as_u64() != Some(a) && h["leader"].as_u64() != Some(b),
            "a leader was elected with the vote of a node under repair: {h}"
        );
    }
    cluster.resume_node(leader);
    wait_for("the repair to end", Duration::from_secs(60), || async {
        let s = cluster.get_json(b, "/status").await?;
        s["repairing"].is_null().then_some(())
    })
    .await;
    caught_up(&cluster, b).await;
    assert!(!files(&fs, &format!("node-{b}/quarantine")).is_empty());

    // 3. A flipped bit in the leader's snapshot: never sent; the leader builds another, and
    // a follower that needs one gets a good one.
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let lagging = cluster.ids().into_iter().find(|i| *i != leader).unwrap();
    cluster.kill_node(lagging);
    let running = load(&cluster, acked.clone(), 4096);
    // Until every live node purged past everything the lagging node has (openraft delays a
    // purge while the log is in flight to the dead follower), so it needs a snapshot.
    let start = status(&cluster, leader).await["last_log_index"]
        .as_u64()
        .unwrap_or(0);
    wait_for(
        "the live nodes to purge past the lagging node's log",
        Duration::from_secs(60),
        || async {
            for id in cluster.ids().into_iter().filter(|i| *i != lagging) {
                let s = cluster.get_json(id, "/status").await?;
                if s["purged_index"].as_u64().unwrap_or(0) <= start {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    running.stop().await;
    let live: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|i| *i != lagging)
        .collect();
    // The last entries may still be applying, and a snapshot still being built: damaging the
    // files before it lands would damage one the node is about to replace with a good one.
    // Settled means everything applied, too few entries since the last snapshot for another
    // (`SNAPSHOT_EVERY`), and no snapshot half written.
    for &id in &live {
        wait_for(
            "the node to settle: applied, snapshotted",
            Duration::from_secs(30),
            || async {
                let s = cluster.get_json(id, "/status").await?;
                let applied = s["commit_index"].as_u64()?;
                let every: u64 = SNAPSHOT_EVERY.parse().unwrap();
                let settled = applied == s["last_log_index"].as_u64()?
                    && applied < s["snapshot_index"].as_u64()? + every
                    && files_ending(&fs, &format!("node-{id}/snapshots"), "tmp").is_empty();
                settled.then_some(())
            },
        )
        .await;
    }
    // Every live node's snapshots are damaged: leadership may have moved under the load, and
    // whichever node serves the lagging one must not send a corrupt snapshot.
    for &id in &live {
        let snaps = files_ending(&fs, &format!("node-{id}/snapshots"), "snap");
        assert!(!snaps.is_empty(), "node {id} has no snapshot");
        for snap in &snaps {
            let len = std::fs::metadata(snap).unwrap().len();
            let target = relative(&fs, snap);
            fs.control().flip(&target, len / 2, 0).unwrap();
        }
    }
    cluster.start_node(lagging);
    caught_up(&cluster, lagging).await;
    let quarantined_snapshot = |id: u64| {
        files(&fs, &format!("node-{id}/quarantine"))
            .iter()
            .any(|p| p.to_string_lossy().contains(".snap"))
    };
    let metrics = cluster.metrics(lagging).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hashq_snapshots_installed_total") && !l.ends_with(" 0")),
        "the lagging node caught up from a snapshot"
    );
    // The node that served the snapshot set its corrupt one aside: leadership may have
    // moved since, so look at every live node rather than at today's leader.
    assert!(
        live.iter().any(|&id| quarantined_snapshot(id)),
        "no live node set its corrupt snapshot aside (quarantines: {:?})",
        live.iter()
            .map(|&id| (id, files(&fs, &format!("node-{id}/quarantine"))))
            .collect::<Vec<_>>()
    );
    check_nothing_lost(&cluster, &seen(&acked), "corruption").await;
    for id in cluster.ids() {
        assert!(cluster.node_alive(id), "node {id} died");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_stops_enqueues_not_pulls_and_write_errors_leave_nodes_consistent() {
    let mut fs = mount();
    let mut cluster = start_on(&fs, &["--disk-free-limit", "64MiB"]).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let mut ids = Vec::new();
    for i in 0..20u64 {
        ids.push(
            cluster
                .enqueue(leader, payload(i, 512), 1, &format!("before-{i}"))
                .await,
        );
    }
    // The disk fills up: every node raises its alarm; enqueues are refused (507, JSON), while
    // workers still complete and clients still pull.
    fs.control().space(Some(16 << 20)).unwrap();
    let refused = wait_for("the disk alarm", Duration::from_secs(20), || async {
        let a = cluster
            .http
            .put(format!("{}/enqueue?iterations=1", cluster.url(leader)))
            .body("x")
            .send()
            .await
            .ok()?;
        (a.status().as_u16() == 507).then_some(a)
    })
    .await;
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "disk_full", "{body}");
    let status = status(&cluster, leader).await;
    assert!(
        !status["disk"]["alarms"].as_array().unwrap().is_empty(),
        "{status}"
    );
    let _worker = cluster.start_worker(&[]);
    let mut pulled = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while !ids.iter().all(|id| pulled.contains(id)) && Instant::now() < deadline {
        n += 1;
        for (id, _) in cluster.pull(leader, 100, &format!("full-pull-{n}")).await {
            pulled.insert(id);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        ids.iter().all(|id| pulled.contains(id)),
        "pulls and completions went on under the alarm: {pulled:?}"
    );
    // Space returns: the alarm clears by itself.
    fs.control().space(None).unwrap();
    wait_for("the alarm to clear", Duration::from_secs(30), || async {
        let a = cluster
            .http
            .put(format!("{}/enqueue?iterations=1", cluster.url(leader)))
            .body("after")
            .send()
            .await
            .ok()?;
        a.status().is_success().then_some(())
    })
    .await;

    // A write that fails with ENOSPC on a follower's log: the append is cut back and retried,
    // the node stays up and consistent. An fsync that fails with EIO: the node stops (the data
    // may be gone), restarts from what is durable, and catches up.
    let others: Vec<u64> = cluster.ids().into_iter().filter(|i| *i != leader).collect();
    fs.control()
        .fail(
            Op::Write,
            &format!("node-{}/raft/log/", others[0]),
            libc_enospc(),
            Some(3),
        )
        .unwrap();
    fs.control()
        .fail(
            Op::Fsync,
            &format!("node-{}/raft/log/", others[1]),
            libc_eio(),
            Some(1),
        )
        .unwrap();
    let acked = Arc::new(Mutex::new(Acked::default()));
    let running = load(&cluster, acked.clone(), 1024);
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.node_alive(others[1]) {
        assert!(
            Instant::now() < deadline,
            "a node whose log fsync failed kept running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;
    cluster.kill_node(others[1]);
    cluster.start_node(others[1]);
    for id in &others {
        caught_up(&cluster, *id).await;
    }
    assert!(cluster.node_alive(others[0]), "ENOSPC must not stop a node");
    check_nothing_lost(&cluster, &seen(&acked), "write errors").await;
}

fn libc_enospc() -> i32 {
    28
}

fn libc_eio() -> i32 {
    5
}
