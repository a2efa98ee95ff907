//! Chaos: a real cluster under client load while a seeded schedule kills, pauses, partitions,
//! rewinds and replaces nodes, changes the membership and kills workers; then a checker
//! proves nothing acknowledged was lost, duplicated or wrong.
//!
//! The nodes' data dirs live on `hashq-faultfs`, so the schedule also cuts the power: of every
//! node at once (`power_cut_all`: whatever was not synced is gone), or of one node
//! (`power_cut_minority`).
//!
//! The bounded profile runs in `scripts/test.sh`; `scripts/chaos.sh` runs longer ones through
//! the same test with `HASHQ_CHAOS_*` variables: DURATION (e.g. `30m`), NODES (3 or 5), SEED,
//! MIN_FAULTS, POWER (`0`: data dirs on the plain disk, no power cuts). A second profile runs
//! two endpoints and a witness (`chaos_with_a_witness_...`, `HASHQ_CHAOS_WITNESS_DURATION`
//! and `..._MIN_FAULTS`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{copy_dir, payload, reference, wait_for, worker_processes, Cluster, Options};
use hashq_faultfs::Mounted;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

struct Profile {
    nodes: usize,
    duration: Duration,
    min_faults: usize,
    seed: u64,
    clients: usize,
    max_workers: u32,
    /// Data dirs on the power-cut file system, and power cuts in the schedule.
    power: bool,
    /// The last node is a witness (`--role witness`): two endpoints and a witness with 3
    /// nodes. Clients talk to the endpoints only.
    witness: bool,
}

fn profile() -> Profile {
    let var = |name: &str| std::env::var(format!("HASHQ_CHAOS_{name}")).ok();
    Profile {
        nodes: var("NODES").and_then(|v| v.parse().ok()).unwrap_or(3),
        duration: var("DURATION")
            .and_then(|v| humantime::parse_duration(&v).ok())
            .unwrap_or(Duration::from_secs(120)),
        min_faults: var("MIN_FAULTS").and_then(|v| v.parse().ok()).unwrap_or(20),
        seed: var("SEED")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(rand::random),
        clients: var("CLIENTS").and_then(|v| v.parse().ok()).unwrap_or(3),
        max_workers: 3,
        power: var("POWER").is_none_or(|v| v != "0"),
        witness: false,
    }
}

/// The profile with a witness: shorter by default (60 s, 12 faults), as it runs beside the
/// main one in `scripts/test.sh`; `HASHQ_CHAOS_WITNESS_DURATION` and `..._MIN_FAULTS` set it.
fn witness_profile() -> Profile {
    let var = |name: &str| std::env::var(format!("HASHQ_CHAOS_WITNESS_{name}")).ok();
    Profile {
        duration: var("DURATION")
            .and_then(|v| humantime::parse_duration(&v).ok())
            .unwrap_or(Duration::from_secs(60)),
        min_faults: var("MIN_FAULTS").and_then(|v| v.parse().ok()).unwrap_or(12),
        witness: true,
        ..profile()
    }
}

/// The fate of one enqueue as the client saw it.
#[derive(Clone, Debug)]
enum Outcome {
    Acked(String),
    /// No answer came back (timeouts, resets, 503s until the end).
    Unknown,
}

#[derive(Clone, Debug)]
struct Enqueue {
    key: String,
    seed: u64,
    len: usize,
    iterations: u32,
    outcome: Outcome,
    /// Sent straight to a node cut off from its majority.
    minority: bool,
}

/// The fate of one cancel (`DELETE /work/{id}`) as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cancel {
    /// 200: the item is cancelled, so it must never be pulled.
    Done,
    /// 409 `not_cancellable`: it had its result already, so it must be pulled.
    Refused,
    /// No answer came back: either fate is allowed.
    Unknown,
}

#[derive(Default)]
struct History {
    enqueues: Vec<Enqueue>,
    /// Cancels the clients sent, by work id.
    cancels: HashMap<String, Cancel>,
    pulled: HashMap<String, String>,
    duplicates: Vec<String>,
    minority_acks: Vec<String>,
    requests: u64,
    retries: u64,
    faults: BTreeMap<&'static str, u32>,
}

struct Shared {
    history: Mutex<History>,
    stop: AtomicBool,
    /// A node cut off from the others right now (0 = none).
    isolated: AtomicU64,
    max_processes: AtomicUsize,
}

/// What the clients need of the cluster: the endpoints that are members and their own URLs
/// (membership faults change them).
struct Nodes {
    urls: Mutex<BTreeMap<u64, String>>,
}

impl Nodes {
    /// The member endpoints of `cluster` (witnesses take no client request).
    fn of(cluster: &Cluster) -> Nodes {
        let nodes = Nodes {
            urls: Mutex::default(),
        };
        nodes.follow(cluster);
        nodes
    }

    /// Takes the membership as it is now.
    fn follow(&self, cluster: &Cluster) {
        *self.urls.lock().unwrap() = cluster
            .members()
            .into_iter()
            .filter(|id| !cluster.is_witness(*id))
            .map(|id| (id, cluster.url(id)))
            .collect();
    }

    fn ids(&self) -> Vec<u64> {
        self.urls.lock().unwrap().keys().copied().collect()
    }

    /// Node `id`'s URL; `None` once it left the membership (or for a witness).
    fn url(&self, id: u64) -> Option<String> {
        self.urls.lock().unwrap().get(&id).cloned()
    }
}

/// One HTTP attempt against node `id`'s own port.
async fn attempt(
    cluster: &Nodes,
    http: &reqwest::Client,
    id: u64,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Vec<u8>,
) -> Option<(u16, Value)> {
    let answer = http
        .request(method, format!("{}{}", cluster.url(id)?, path))
        .header("idempotency-key", key)
        .body(body)
        .timeout(Duration::from_secs(4))
        .send()
        .await
        .ok()?;
    let status = answer.status().as_u16();
    let value = answer.json().await.unwrap_or(Value::Null);
    Some((status, value))
}

/// A client of the cluster as the tests' users see it: keyed requests to random nodes.
struct Requester<'a> {
    nodes: &'a Nodes,
    http: reqwest::Client,
    shared: &'a Shared,
}

/// One keyed request.
struct Call<'a> {
    method: reqwest::Method,
    path: &'a str,
    key: &'a str,
    body: &'a [u8],
}

impl Requester<'_> {
    /// Sends `call` to random nodes until one answers 200 or `give_up` says stop.
    async fn until_answered(
        &self,
        rng: &mut StdRng,
        call: Call<'_>,
        give_up: impl Fn() -> bool,
    ) -> Option<Value> {
        let ids = self.nodes.ids();
        loop {
            let id = ids[rng.random_range(0..ids.len())];
            self.shared.history.lock().unwrap().requests += 1;
            let answer = attempt(
                self.nodes,
                &self.http,
                id,
                call.method.clone(),
                call.path,
                call.key,
                call.body.to_vec(),
            )
            .await;
            if let Some((status, value)) = answer {
                match status {
                    200 => return Some(value),
                    503 | 429 => {}
                    other => panic!("{} {} answered {other}: {value}", call.method, call.path),
                }
            }
            if give_up() {
                return None;
            }
            self.shared.history.lock().unwrap().retries += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A random item: payload seed, payload length, iterations.
fn item_of(seed: u64) -> (u64, usize, u32) {
    let mut r = StdRng::seed_from_u64(seed);
    (
        r.random(),
        r.random_range(512..16 * 1024),
        r.random_range(1..20_000),
    )
}

async fn client(cluster: &Nodes, shared: &Shared, n: usize, seed: u64) {
    let requester = Requester {
        nodes: cluster,
        http: reqwest::Client::new(),
        shared,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut count = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        count += 1;
        if rng.random_range(0..4) < 3 {
            let key = format!("c{n}-{count}");
            let (item_seed, len, iterations) = item_of(rng.random());
            let data = payload(item_seed, len);
            let answer = requester
                .until_answered(
                    &mut rng,
                    Call {
                        method: reqwest::Method::PUT,
                        path: &format!("/enqueue?iterations={iterations}"),
                        key: &key,
                        body: &data,
                    },
                    || shared.stop.load(Ordering::SeqCst),
                )
                .await;
            let outcome = match answer {
                Some(v) => Outcome::Acked(v["work_id"].as_str().expect("work_id").to_string()),
                None => Outcome::Unknown,
            };
            // Now and then the client changes its mind: a cancel, at once or a little later
            // (the item may be queued, running or done by then).
            if let (Outcome::Acked(id), 0) = (&outcome, rng.random_range(0..20)) {
                if rng.random_bool(0.5) {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(10..300))).await;
                }
                let fate = cancel(&requester, &mut rng, id).await;
                shared
                    .history
                    .lock()
                    .unwrap()
                    .cancels
                    .insert(id.clone(), fate);
            }
            shared.history.lock().unwrap().enqueues.push(Enqueue {
                key,
                seed: item_seed,
                len,
                iterations,
                outcome,
                minority: false,
            });
        } else {
            let key = format!("p{n}-{count}");
            let top = rng.random_range(1..40);
            // A pull whose answer was lost is retried with its key until it is answered, so
            // no result taken by the cluster is lost by the client.
            let answer = requester
                .until_answered(
                    &mut rng,
                    Call {
                        method: reqwest::Method::POST,
                        path: &format!("/pullCompleted?top={top}"),
                        key: &key,
                        body: &[],
                    },
                    || false,
                )
                .await;
            record_pull(shared, answer.expect("pull answered"));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(10..60))).await;
    }
}

/// Cancels item `id` on random nodes until one answers for it or the run stops.
async fn cancel(requester: &Requester<'_>, rng: &mut StdRng, id: &str) -> Cancel {
    let ids = requester.nodes.ids();
    loop {
        let node = ids[rng.random_range(0..ids.len())];
        requester.shared.history.lock().unwrap().requests += 1;
        let answer = attempt(
            requester.nodes,
            &requester.http,
            node,
            reqwest::Method::DELETE,
            &format!("/work/{id}"),
            &format!("cancel-{id}"),
            Vec::new(),
        )
        .await;
        match answer {
            Some((200, _)) => return Cancel::Done,
            Some((409, v)) if v["error"]["code"] == "not_cancellable" => return Cancel::Refused,
            // Unanswered, busy, or the cluster's version not raised yet (a fresh cluster's
            // first moments): try again.
            None | Some((503 | 429 | 409, _)) => {}
            Some((other, v)) => panic!("DELETE /work/{id} answered {other}: {v}"),
        }
        if requester.shared.stop.load(Ordering::SeqCst) {
            return Cancel::Unknown;
        }
        requester.shared.history.lock().unwrap().retries += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn record_pull(shared: &Shared, items: Value) {
    let mut h = shared.history.lock().unwrap();
    for item in items.as_array().expect("array") {
        let id = item["work_id"].as_str().unwrap().to_string();
        let value = item["value"].as_str().unwrap().to_string();
        if h.pulled.insert(id.clone(), value).is_some() {
            h.duplicates.push(id);
        }
    }
}

/// While a node is cut off, sends it writes directly: none may be acknowledged.
async fn minority_writer(cluster: &Nodes, shared: &Shared) {
    let http = reqwest::Client::new();
    let requester = Requester {
        nodes: cluster,
        http: http.clone(),
        shared,
    };
    let mut rng = StdRng::seed_from_u64(0x3170);
    let mut pending: Vec<usize> = Vec::new();
    let mut n = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        let isolated = shared.isolated.load(Ordering::SeqCst);
        // A cut-off witness takes no client request at all: nothing to send it.
        let target = cluster.url(isolated);
        let isolated = if target.is_none() { 0 } else { isolated };
        if isolated == 0 {
            // The partition healed: settle what was sent into it now, by key, while the key is
            // still remembered (a long run outlives the idempotency retention).
            if let Some(i) = pending.pop() {
                let (key, seed, len, iterations) = {
                    let h = shared.history.lock().unwrap();
                    let e = &h.enqueues[i];
                    (e.key.clone(), e.seed, e.len, e.iterations)
                };
                let path = format!("/enqueue?iterations={iterations}");
                let body = payload(seed, len);
                let call = Call {
                    method: reqwest::Method::PUT,
                    path: &path,
                    key: &key,
                    body: &body,
                };
                match requester
                    .until_answered(&mut rng, call, || shared.stop.load(Ordering::SeqCst))
                    .await
                {
                    Some(v) => {
                        let id = v["work_id"].as_str().expect("work_id").to_string();
                        shared.history.lock().unwrap().enqueues[i].outcome = Outcome::Acked(id);
                    }
                    None => pending.push(i),
                }
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            continue;
        }
        n += 1;
        let key = format!("m-{n}");
        let (item_seed, len, iterations) = item_of(n);
        let answer = http
            .put(format!(
                "{}/enqueue?iterations={iterations}",
                target.unwrap_or_default()
            ))
            .header("idempotency-key", &key)
            .body(payload(item_seed, len))
            .timeout(Duration::from_millis(1500))
            .send()
            .await;
        let still_isolated = shared.isolated.load(Ordering::SeqCst) == isolated;
        let mut h = shared.history.lock().unwrap();
        h.requests += 1;
        if let Ok(a) = answer {
            if a.status().is_success() && still_isolated {
                h.minority_acks.push(key.clone());
            }
        }
        // Whatever happened, the node may still apply it after the partition heals.
        pending.push(h.enqueues.len());
        h.enqueues.push(Enqueue {
            key,
            seed: item_seed,
            len,
            iterations,
            outcome: Outcome::Unknown,
            minority: true,
        });
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    KillLeader,
    KillFollower,
    KillWorkers,
    PauseLeader,
    PauseFollower,
    CrashAll,
    IsolateLeader,
    IsolateFollower,
    SplitMinority,
    StaleRestart,
    PowerCutAll,
    PowerCutMinority,
    /// A SIGKILLed endpoint replaced by a new node (`hashq cluster replace`).
    Replace,
    /// A new node added, then a member (the leader, at times) removed.
    AddRemove,
}

impl Fault {
    /// Whether a fault that hits one node hits the leader (else a random follower).
    fn hits_leader(self) -> bool {
        matches!(
            self,
            Fault::KillLeader | Fault::PauseLeader | Fault::IsolateLeader
        )
    }

    fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill_leader",
            Fault::KillFollower => "kill_follower",
            Fault::KillWorkers => "kill_workers",
            Fault::PauseLeader => "pause_leader",
            Fault::PauseFollower => "pause_follower",
            Fault::CrashAll => "crash_all",
            Fault::IsolateLeader => "isolate_leader",
            Fault::IsolateFollower => "isolate_follower",
            Fault::SplitMinority => "split_minority",
            Fault::StaleRestart => "stale_restart",
            Fault::PowerCutAll => "power_cut_all",
            Fault::PowerCutMinority => "power_cut_minority",
            Fault::Replace => "replace",
            Fault::AddRemove => "add_remove",
        }
    }
}

const FAULTS: [Fault; 12] = [
    Fault::KillLeader,
    Fault::KillFollower,
    Fault::KillWorkers,
    Fault::PauseLeader,
    Fault::PauseFollower,
    Fault::CrashAll,
    Fault::IsolateLeader,
    Fault::IsolateFollower,
    Fault::SplitMinority,
    Fault::StaleRestart,
    Fault::PowerCutAll,
    Fault::PowerCutMinority,
];

/// Membership faults, every sixth fault (from the third): the bounded profile's 20 faults
/// hold at least 3. Nodes added join the cluster directly, not through the fault proxy.
const MEMBERSHIP_FAULTS: [Fault; 2] = [Fault::Replace, Fault::AddRemove];

/// Cuts `side` off from the rest of `all` for a while, then heals the network. A lone
/// cut-off node is recorded: the clients check it acknowledges no write meanwhile.
async fn cut_off(cluster: &Cluster, shared: &Shared, rng: &mut StdRng, side: &[u64], all: &[u64]) {
    let proxy = cluster.proxy.as_ref().expect("proxied cluster");
    proxy.isolate(side, all);
    if let [alone] = side {
        shared.isolated.store(*alone, Ordering::SeqCst);
    }
    tokio::time::sleep(hold(rng, 2000, 4000)).await;
    shared.isolated.store(0, Ordering::SeqCst);
    proxy.heal();
}

/// The node a single-node fault hits.
async fn victim(cluster: &Cluster, rng: &mut StdRng, fault: Fault) -> u64 {
    let (leader, follower) = leader_and_follower(cluster, rng).await;
    if fault.hits_leader() {
        leader
    } else {
        follower
    }
}

async fn leader_and_follower(cluster: &Cluster, rng: &mut StdRng) -> (u64, u64) {
    let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
    let followers: Vec<u64> = cluster
        .members()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    (leader, followers[rng.random_range(0..followers.len())])
}

fn hold(rng: &mut StdRng, min_ms: u64, max_ms: u64) -> Duration {
    Duration::from_millis(rng.random_range(min_ms..max_ms))
}

async fn inject(
    cluster: &mut Cluster,
    fs: Option<&mut Mounted>,
    shared: &Shared,
    fault: Fault,
    rng: &mut StdRng,
) {
    let all = cluster.members();
    match fault {
        Fault::Replace => {
            let (leader, _) = leader_and_follower(cluster, rng).await;
            let endpoints: Vec<u64> = all
                .iter()
                .copied()
                .filter(|id| *id != leader && !cluster.is_witness(*id))
                .collect();
            let old = endpoints[rng.random_range(0..endpoints.len())];
            let new = cluster.replace_node(old).await;
            eprintln!("           node {old} replaced by node {new}");
        }
        Fault::AddRemove => {
            let new = cluster.join_node().await;
            let endpoints: Vec<u64> = all
                .iter()
                .copied()
                .filter(|id| !cluster.is_witness(*id))
                .collect();
            let gone = endpoints[rng.random_range(0..endpoints.len())];
            cluster.remove_node(gone);
            eprintln!("           node {new} added, node {gone} removed");
        }
        Fault::PowerCutAll | Fault::PowerCutMinority => {
            let fs = fs.expect("power cuts need the power-cut file system");
            let victims = if fault == Fault::PowerCutAll {
                all.clone()
            } else {
                // The leader or a follower, at random.
                let (leader, follower) = leader_and_follower(cluster, rng).await;
                vec![if rng.random_bool(0.5) {
                    leader
                } else {
                    follower
                }]
            };
            // The power goes: what was not synced is gone, the processes with it.
            if fault == Fault::PowerCutAll {
                fs.control().cut("").expect("cut");
            } else {
                fs.control()
                    .cut(&format!("node-{}", victims[0]))
                    .expect("cut");
            }
            for id in &victims {
                cluster.kill_node(*id);
            }
            let scope = if fault == Fault::PowerCutAll {
                String::new()
            } else {
                format!("node-{}", victims[0])
            };
            fs.control().revive(&scope).expect("revive");
            tokio::time::sleep(hold(rng, 200, 1500)).await;
            for id in &victims {
                cluster.start_node(*id);
            }
        }
        Fault::KillLeader | Fault::KillFollower => {
            let victim = victim(cluster, rng, fault).await;
            cluster.kill_node(victim);
            tokio::time::sleep(hold(rng, 500, 3000)).await;
            cluster.start_node(victim);
        }
        Fault::KillWorkers => {
            let pids = worker_processes(&cluster.endpoints());
            for pid in pids.iter().take(rng.random_range(1..3)) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        Fault::PauseLeader | Fault::PauseFollower => {
            let victim = victim(cluster, rng, fault).await;
            cluster.pause_node(victim);
            tokio::time::sleep(hold(rng, 1000, 3000)).await;
            cluster.resume_node(victim);
        }
        Fault::CrashAll => {
            for id in &all {
                cluster.kill_node(*id);
            }
            tokio::time::sleep(hold(rng, 200, 1500)).await;
            for id in &all {
                cluster.start_node(*id);
            }
        }
        Fault::IsolateLeader | Fault::IsolateFollower => {
            let victim = victim(cluster, rng, fault).await;
            cut_off(cluster, shared, rng, &[victim], &all).await;
        }
        Fault::SplitMinority => {
            // A minority side (the leader and, with 5 nodes, one more) against the rest.
            let (leader, follower) = leader_and_follower(cluster, rng).await;
            let minority: Vec<u64> = if all.len() >= 5 {
                vec![leader, follower]
            } else {
                vec![leader]
            };
            cut_off(cluster, shared, rng, &minority, &all).await;
        }
        Fault::StaleRestart => {
            // A follower comes back with an older copy of its data (a restored backup).
            let (_, victim) = leader_and_follower(cluster, rng).await;
            cluster.kill_node(victim);
            let data = cluster.data_dir(victim);
            let backup = cluster.dir.path().join(format!("stale-{victim}"));
            copy_dir(&data, &backup);
            cluster.start_node(victim);
            tokio::time::sleep(hold(rng, 1500, 3000)).await;
            cluster.kill_node(victim);
            copy_dir(&backup, &data);
            cluster.start_node(victim);
        }
    }
}

/// Waits until every node is up, agrees on a leader and has applied what the leader had.
async fn wait_healthy(cluster: &Cluster, timeout: Duration) {
    let leader = cluster.wait_for_leader(timeout).await;
    let target = wait_for("the leader's status", timeout, || async {
        cluster.get_json(leader, "/status").await?["commit_index"].as_u64()
    })
    .await;
    for id in cluster.members() {
        wait_for(
            &format!("node {id} to catch up to {target}"),
            timeout,
            || async {
                let s = cluster.get_json(id, "/status").await?;
                (s["commit_index"].as_u64()? >= target).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_nothing_acknowledged_is_lost_duplicated_or_wrong() {
    run(profile()).await;
}

/// Two endpoints and a witness under the same faults: the witness never blocks the cluster
/// (it leads only when no endpoint can, then hands over), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_with_a_witness_nothing_acknowledged_is_lost_duplicated_or_wrong() {
    run(witness_profile()).await;
}

async fn run(p: Profile) {
    eprintln!(
        "chaos: {} nodes{}, {:?}, at least {} faults, seed {}",
        p.nodes,
        if p.witness {
            " (the last a witness)"
        } else {
            ""
        },
        p.duration,
        p.min_faults,
        p.seed
    );
    let node_args: Vec<String> = [
        "--max-workers",
        &p.max_workers.to_string(),
        "--scale-up-wait",
        "300ms",
        "--scale-up-interval",
        "300ms",
        "--worker-idle-timeout",
        "10s",
        "--worker-orphan-timeout",
        "30s",
        "--lease",
        "3s",
        "--worker-lost-after",
        "4s",
        "--snapshot-every",
        "300",
        "--request-timeout",
        "8s",
    ]
    .map(String::from)
    .to_vec();
    let mut fs = p.power.then(|| {
        let bin = common::binary().with_file_name("hashq-faultfs");
        assert!(
            bin.exists(),
            "{} is missing: cargo build -p hashq-faultfs (or HASHQ_CHAOS_POWER=0)",
            bin.display()
        );
        Mounted::spawn(&bin).expect("mount hashq-faultfs (FUSE)")
    });
    let witness: HashMap<u64, Vec<String>> = if p.witness {
        let flags = ["--role", "witness", "--launcher", "none"];
        HashMap::from([(p.nodes as u64, flags.map(String::from).to_vec())])
    } else {
        HashMap::new()
    };
    let mut cluster = Cluster::start_with(
        Options {
            nodes: p.nodes,
            node_args,
            launch_workers: true,
            proxied: true,
            data_root: fs.as_ref().map(|f| f.mountpoint().to_path_buf()),
            ports: None,
            tls: false,
        },
        Vec::new(),
        witness,
    )
    .await;
    let shared = Arc::new(Shared {
        history: Mutex::new(History::default()),
        stop: AtomicBool::new(false),
        isolated: AtomicU64::new(0),
        max_processes: AtomicUsize::new(0),
    });
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(p.seed);
    let nodes = Nodes::of(&cluster);
    let endpoints = cluster.endpoints();
    let budget = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while !shared.stop.load(Ordering::SeqCst) {
                shared
                    .max_processes
                    .fetch_max(worker_processes(&endpoints).len(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let seeds: Vec<u64> = (0..p.clients).map(|_| rng.random()).collect();
    let load = async {
        let clients = seeds
            .iter()
            .enumerate()
            .map(|(n, s)| client(&nodes, &shared, n, *s));
        tokio::join!(
            futures::future::join_all(clients),
            minority_writer(&nodes, &shared)
        );
    };
    let faults = async {
        let mut injected = 0;
        while injected < p.min_faults || started.elapsed() < p.duration {
            let choices = if p.power {
                &FAULTS[..]
            } else {
                &FAULTS[..FAULTS.len() - 2]
            };
            let fault = if injected % 6 == 2 {
                MEMBERSHIP_FAULTS[rng.random_range(0..MEMBERSHIP_FAULTS.len())]
            } else {
                choices[rng.random_range(0..choices.len())]
            };
            eprintln!(
                "[{:>6.1}s] fault {}: {}",
                started.elapsed().as_secs_f64(),
                injected + 1,
                fault.name()
            );
            inject(&mut cluster, fs.as_mut(), &shared, fault, &mut rng).await;
            nodes.follow(&cluster);
            *shared
                .history
                .lock()
                .unwrap()
                .faults
                .entry(fault.name())
                .or_default() += 1;
            injected += 1;
            wait_healthy(&cluster, Duration::from_secs(60)).await;
            tokio::time::sleep(hold(&mut rng, 500, 2500)).await;
        }
        shared.stop.store(true, Ordering::SeqCst);
    };
    tokio::join!(load, faults);
    let _ = budget.await;
    check(&cluster, &nodes, &shared, &p, started).await;
}

/// After the faults: resolve every unknown enqueue (same key, healthy cluster), let the
/// workers drain the queue, pull everything, and compare with the history.
async fn check(cluster: &Cluster, nodes: &Nodes, shared: &Shared, p: &Profile, started: Instant) {
    wait_healthy(cluster, Duration::from_secs(60)).await;
    let requester = Requester {
        nodes,
        http: reqwest::Client::new(),
        shared,
    };
    let mut rng = StdRng::seed_from_u64(p.seed ^ 0x5eed);
    let unknown: Vec<usize> = {
        let h = shared.history.lock().unwrap();
        h.enqueues
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.outcome, Outcome::Unknown))
            .map(|(i, _)| i)
            .collect()
    };
    let unknown_count = unknown.len();
    for i in unknown {
        let (key, seed, len, iterations) = {
            let h = shared.history.lock().unwrap();
            let e = &h.enqueues[i];
            (e.key.clone(), e.seed, e.len, e.iterations)
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let answer = requester
            .until_answered(
                &mut rng,
                Call {
                    method: reqwest::Method::PUT,
                    path: &format!("/enqueue?iterations={iterations}"),
                    key: &key,
                    body: &payload(seed, len),
                },
                || Instant::now() > deadline,
            )
            .await
            .unwrap_or_else(|| panic!("unknown enqueue {key} could not be resolved"));
        let id = answer["work_id"].as_str().unwrap().to_string();
        shared.history.lock().unwrap().enqueues[i].outcome = Outcome::Acked(id);
    }

    // Drain: workers finish everything; then pull what is left.
    wait_for("the queue to drain", Duration::from_secs(180), || async {
        let s = cluster
            .get_json(
                cluster.wait_for_leader(Duration::from_secs(30)).await,
                "/status",
            )
            .await?;
        (s["counts"]["queued"] == 0 && s["counts"]["running"] == 0).then_some(())
    })
    .await;
    let mut round = 0;
    loop {
        round += 1;
        let answer = requester
            .until_answered(
                &mut rng,
                Call {
                    method: reqwest::Method::POST,
                    path: "/pullCompleted?top=1000",
                    key: &format!("final-{round}"),
                    body: &[],
                },
                || false,
            )
            .await
            .unwrap();
        let empty = answer.as_array().is_none_or(|a| a.is_empty());
        record_pull(shared, answer);
        if empty {
            break;
        }
    }

    let (enqueues, pulled, mut duplicated, cancels) = {
        let h = shared.history.lock().unwrap();
        (
            h.enqueues.clone(),
            h.pulled.clone(),
            h.duplicates.clone(),
            h.cancels.clone(),
        )
    };
    let mut expected: HashMap<String, &Enqueue> = HashMap::new();
    for e in &enqueues {
        if let Outcome::Acked(id) = &e.outcome {
            if let Some(other) = expected.insert(id.clone(), e) {
                if other.key != e.key {
                    duplicated.push(format!(
                        "work id {id} acknowledged for keys {} and {}",
                        other.key, e.key
                    ));
                }
            }
        }
    }
    let (mut ok, mut lost, mut wrong, mut dead) = (0, Vec::new(), Vec::new(), 0);
    // A cancel answered 200 means no result is ever handed out.
    let mut cancelled_but_pulled = Vec::new();
    for (id, e) in &expected {
        match pulled.get(id) {
            Some(_) if cancels.get(id) == Some(&Cancel::Done) => {
                cancelled_but_pulled.push(id.clone());
            }
            Some(value) => {
                if *value == reference(&payload(e.seed, e.len), e.iterations) {
                    ok += 1;
                } else {
                    wrong.push(id.clone());
                }
            }
            None => lost.push(id.clone()),
        }
    }
    // Items the cluster reports dead are accounted for, with their attempts; cancelled ones
    // only if a client cancelled them (and was not told they had their result).
    let (mut really_lost, mut cancelled) = (Vec::new(), 0);
    for id in lost {
        let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
        let w = cluster.get_json(leader, &format!("/work/{id}")).await;
        match w {
            Some(w) if w["status"] == "dead" => dead += 1,
            Some(w)
                if w["status"] == "cancelled"
                    && matches!(cancels.get(&id), Some(Cancel::Done | Cancel::Unknown)) =>
            {
                cancelled += 1
            }
            other => really_lost.push(format!("{id}: {other:?}")),
        }
    }
    let h = shared.history.lock().unwrap();
    let unexpected: Vec<&String> = pulled
        .keys()
        .filter(|id| !expected.contains_key(*id))
        .collect();
    let max_processes = shared.max_processes.load(Ordering::SeqCst);
    let summary = json!({
        "seed": p.seed,
        "nodes": p.nodes,
        "witness": p.witness,
        "seconds": started.elapsed().as_secs(),
        "faults": h.faults.values().sum::<u32>(),
        "faults_by_kind": h.faults,
        "requests": h.requests,
        "retried_attempts": h.retries,
        "enqueues": h.enqueues.len(),
        "minority_writes": h.enqueues.iter().filter(|e| e.minority).count(),
        "unknown_then_resolved": unknown_count,
        "ok": ok,
        "dead": dead,
        "cancels": cancels.len(),
        "cancelled": cancelled,
        "cancel_refused": cancels.values().filter(|c| **c == Cancel::Refused).count(),
        "lost": really_lost.len(),
        "duplicated": duplicated.len(),
        "wrong": wrong.len(),
        "unexpected": unexpected.len(),
        "minority_acks": h.minority_acks.len(),
        "max_worker_processes": max_processes,
        "max_workers": p.max_workers,
    });
    println!("CHAOS SUMMARY {summary}");
    assert!(really_lost.is_empty(), "lost: {really_lost:?}");
    assert!(
        cancelled_but_pulled.is_empty(),
        "cancelled (200) but pulled: {cancelled_but_pulled:?}"
    );
    assert!(duplicated.is_empty(), "duplicated: {duplicated:?}");
    assert!(wrong.is_empty(), "wrong values: {wrong:?}");
    assert!(
        unexpected.is_empty(),
        "pulled but never enqueued: {unexpected:?}"
    );
    assert!(
        h.minority_acks.is_empty(),
        "a cut-off node acknowledged writes: {:?}",
        h.minority_acks
    );
    assert!(
        max_processes <= p.max_workers as usize,
        "{max_processes} workers for a budget of {}",
        p.max_workers
    );
    let faults: u32 = h.faults.values().sum();
    assert!(faults as usize >= p.min_faults);
    assert!(ok > 0, "nothing got through");
}
