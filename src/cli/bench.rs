//! `hashq bench`: starts a cluster on loopback, runs a fixed workload, prints one JSON document.
//!
//! Measured: durable enqueue throughput and latency at several concurrencies (1 KiB and
//! 16 KiB payloads), pullCompleted throughput, the end-to-end overhead a warm worker adds
//! beyond hashing, failover time after a leader SIGKILL, and the worker's iterated SHA-512
//! rate beside OpenSSL's single-core rate, and the nodes' resident memory with and without a
//! backlog. The cluster is `hashq-testkit`'s, the harness the end-to-end tests use: every
//! process it starts is killed when it ends.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hashq_testkit::{Cluster, Credentials, Spec};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use super::{machine, BenchArgs};

/// Starts the bench's cluster (killed on drop): `nodes` nodes on free loopback ports with
/// fresh tokens, no launcher, and room for any backlog the runs build.
fn start_cluster(nodes: usize, http: reqwest::Client) -> anyhow::Result<Cluster> {
    let ports = (0..nodes)
        .map(|_| hashq_testkit::free_port())
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut cluster = Cluster::new(Spec {
        binary: std::env::current_exe()?,
        dir: tempfile::Builder::new().prefix("hashq-bench-").tempdir()?,
        data_root: None,
        ports,
        advertised: None,
        credentials: Credentials::random(),
        node_log: "warn".into(),
        worker_log: "warn".into(),
        http,
        tls: None,
    });
    let args = ["--launcher", "none", "--max-backlog", "10000000"].map(String::from);
    for id in cluster.ids() {
        cluster.spawn_node(id, &args, &[])?;
    }
    Ok(cluster)
}

/// Each node's resident memory in MiB (`None` for a killed one), to show it stays flat as
/// the backlog grows: payloads live in sled on disk, RAM holds a bounded cache.
fn rss_mib(cluster: &Cluster) -> Vec<Option<f64>> {
    cluster
        .ids()
        .into_iter()
        .map(|id| Some(proc_rss_mib(cluster.node_pid(id)?)?.round()))
        .collect()
}

/// How long the bench waits for a leader.
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// What a node has done so far, read from its /metrics and from /proc.
#[derive(Clone, Default)]
struct NodeSample {
    last_log_index: f64,
    fsyncs: f64,
    /// Time spent in them, in seconds.
    fsync_seconds: f64,
    /// Batches the node proposed as leader and answered, and their time from proposal to
    /// answer, in seconds.
    commits: f64,
    commit_seconds: f64,
    /// Apply calls of the state machine, and their time.
    applies: f64,
    apply_seconds: f64,
    append_rpcs: f64,
    append_entries: f64,
    /// Bytes this process caused to be written to the block layer (`/proc/PID/io`).
    write_bytes: f64,
    /// User plus system CPU, in clock ticks (`/proc/PID/stat`).
    cpu_ticks: f64,
    rss_mib: f64,
}

/// Clock ticks per second of `/proc/PID/stat` (USER_HZ: 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

fn proc_cpu_ticks(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command (which may hold spaces) start after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    Some(fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
}

fn proc_write_bytes(pid: u32) -> Option<f64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

fn proc_rss_mib(pid: u32) -> Option<f64> {
    Some(hashq_testkit::rss_kib(pid)? as f64 / 1024.0)
}

/// One value of a Prometheus text exposition, by series name (labels ignored).
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Each node's figures so far, and the machine's.
struct Sample {
    nodes: Vec<Option<NodeSample>>,
    machine: Option<machine::MachineCpu>,
}

async fn sample(cluster: &Cluster) -> Sample {
    Sample {
        nodes: sample_nodes(cluster).await,
        machine: machine::sample(),
    }
}

async fn sample_nodes(cluster: &Cluster) -> Vec<Option<NodeSample>> {
    let mut out = Vec::new();
    for id in cluster.ids() {
        let Some(pid) = cluster.node_pid(id) else {
            out.push(None);
            continue;
        };
        let text = match cluster
            .http
            .get(format!("{}/metrics", cluster.url(id)))
            .send()
            .await
        {
            Ok(a) => a.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        out.push(Some(NodeSample {
            last_log_index: series(&text, "hashq_raft_last_log_index"),
            fsyncs: series(&text, "hashq_fsync_seconds_count"),
            fsync_seconds: series(&text, "hashq_fsync_seconds_sum"),
            commits: series(&text, "hashq_commit_seconds_count"),
            commit_seconds: series(&text, "hashq_commit_seconds_sum"),
            applies: series(&text, "hashq_apply_seconds_count"),
            apply_seconds: series(&text, "hashq_apply_seconds_sum"),
            append_rpcs: series(&text, "hashq_raft_append_rpcs_received_total"),
            append_entries: series(&text, "hashq_raft_append_entries_received_total"),
            write_bytes: proc_write_bytes(pid).unwrap_or(0.0),
            cpu_ticks: proc_cpu_ticks(pid).unwrap_or(0.0),
            rss_mib: proc_rss_mib(pid).unwrap_or(0.0),
        }));
    }
    out
}

/// The mean of `count` durations summing to `seconds`, in milliseconds (0 for none).
fn mean_ms(seconds: f64, count: f64) -> f64 {
    if count > 0.0 {
        seconds * 1000.0 / count
    } else {
        0.0
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// What a run cost: log entries, batching, fsyncs, disk bytes, CPU and memory per node, and
/// where the machine's CPU time went ([`machine::shares`]: what tells a slow hour from a
/// slower build).
fn resources(
    before: &Sample,
    after: &Sample,
    seconds: f64,
    acknowledged: u64,
    payload_bytes: u64,
) -> Value {
    let pairs: Vec<(&NodeSample, &NodeSample)> = before
        .nodes
        .iter()
        .zip(&after.nodes)
        .filter_map(|(b, a)| Some((b.as_ref()?, a.as_ref()?)))
        .collect();
    let entries = pairs
        .iter()
        .map(|(b, a)| a.last_log_index - b.last_log_index)
        .fold(0.0, f64::max);
    let (rpcs, carried) = pairs.iter().fold((0.0, 0.0), |(r, e), (b, a)| {
        (
            r + a.append_rpcs - b.append_rpcs,
            e + a.append_entries - b.append_entries,
        )
    });
    let payload = (acknowledged * payload_bytes) as f64;
    let per_node = |f: &dyn Fn(&NodeSample, &NodeSample) -> f64| -> Vec<f64> {
        pairs.iter().map(|(b, a)| round2(f(b, a))).collect()
    };
    let means = |f: &dyn Fn(&NodeSample, &NodeSample) -> f64| -> Vec<f64> {
        pairs.iter().map(|(b, a)| round3(f(b, a))).collect()
    };
    let own_cpu = proc_cpu_ticks(std::process::id()).unwrap_or(0.0);
    json!({
        "log_entries_per_second": (entries / seconds).round(),
        "requests_per_entry": round2(acknowledged as f64 / entries.max(1.0)),
        "entries_per_append_rpc": round2(carried / rpcs.max(1.0)),
        "fsyncs_per_second_by_node": per_node(&|b, a| (a.fsyncs - b.fsyncs) / seconds),
        // To the microsecond the nodes measure them in.
        "fsync_ms_mean_by_node": means(&|b, a| {
            mean_ms(a.fsync_seconds - b.fsync_seconds, a.fsyncs - b.fsyncs)
        }),
        // Only a leader proposes: 0 for the others.
        "commit_ms_mean_by_node": means(&|b, a| {
            mean_ms(a.commit_seconds - b.commit_seconds, a.commits - b.commits)
        }),
        "apply_ms_mean_by_node": means(&|b, a| {
            mean_ms(a.apply_seconds - b.apply_seconds, a.applies - b.applies)
        }),
        "disk_bytes_per_payload_byte_by_node":
            per_node(&|b, a| (a.write_bytes - b.write_bytes) / payload.max(1.0)),
        "cpu_percent_by_node":
            per_node(&|b, a| (a.cpu_ticks - b.cpu_ticks) / TICKS_PER_SECOND / seconds * 100.0),
        "rss_mib_by_node": per_node(&|_, a| a.rss_mib),
        "bench_client_cpu_seconds_so_far": round2(own_cpu / TICKS_PER_SECOND),
        "machine_cpu_percent": machine::shares(before.machine, after.machine),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One closed-loop client's HTTP/1.1 connections, one per node, straight over hyper: the
/// load generator shares this machine's two cores with the nodes, and reqwest's pool, URL
/// parsing and per-request allocations took about 40 us of CPU per enqueue, an eighth of the
/// machine at 6,000/s. A connection that fails is opened again for the next request.
struct Connections {
    /// `host:port` of each node.
    authorities: Vec<String>,
    senders: Vec<Option<SendRequest<Full<bytes::Bytes>>>>,
}

impl Connections {
    fn new(urls: &[String]) -> Connections {
        let authorities = urls
            .iter()
            .map(|u| u.trim_start_matches("http://").to_owned())
            .collect::<Vec<_>>();
        Connections {
            senders: authorities.iter().map(|_| None).collect(),
            authorities,
        }
    }

    /// `PUT /enqueue?iterations=1` with `payload` on node `node`: whether it was acknowledged.
    async fn enqueue(&mut self, node: usize, payload: bytes::Bytes) -> bool {
        let result = self.try_enqueue(node, payload).await;
        if result.is_err() {
            self.senders[node] = None;
        }
        matches!(result, Ok(true))
    }

    async fn try_enqueue(&mut self, node: usize, payload: bytes::Bytes) -> anyhow::Result<bool> {
        let authority = &self.authorities[node];
        let sender = match &mut self.senders[node] {
            Some(sender) => sender,
            empty => {
                let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
                stream.set_nodelay(true)?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(connection);
                empty.insert(sender)
            }
        };
        sender.ready().await?;
        let request = hyper::Request::put("/enqueue?iterations=1")
            .header(hyper::header::HOST, authority.as_str())
            .body(Full::new(payload))?;
        let response = sender.send_request(request).await?;
        let ok = response.status().is_success();
        response.into_body().collect().await?;
        Ok(ok)
    }
}

/// `clients` loops enqueueing `size`-byte payloads round-robin over the nodes for `duration`.
async fn enqueue_load(cluster: &Cluster, clients: usize, size: usize, duration: Duration) -> Value {
    let urls = cluster
        .ids()
        .into_iter()
        .map(|id| cluster.url(id))
        .collect::<Vec<_>>();
    let payload = bytes::Bytes::from(vec![0x5au8; size]);
    let before = sample(cluster).await;
    let started = Instant::now();
    let stop_at = started + duration;
    let errors = Arc::new(AtomicU64::new(0));
    let nodes = urls.len();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (mut connections, payload, errors) =
            (Connections::new(&urls), payload.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = c;
            while Instant::now() < stop_at {
                n += 1;
                let started = Instant::now();
                if connections.enqueue(n % nodes, payload.clone()).await {
                    latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = sample(cluster).await;
    all.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    json!({
        "clients": clients,
        "payload_bytes": size,
        "acknowledged": all.len(),
        "errors": errors.load(Ordering::Relaxed),
        "per_second": (all.len() as f64 / elapsed).round(),
        "latency_ms": {
            "p50": percentile(&all, 0.50),
            "p90": percentile(&all, 0.90),
            "p99": percentile(&all, 0.99),
        },
        "resources": resources(&before, &after, elapsed, all.len() as u64, size as u64),
    })
}

/// Takes everything completed, `top` at a time, and reports items/s.
async fn pull_rate(cluster: &Cluster) -> anyhow::Result<Value> {
    let started = Instant::now();
    let (mut items, mut calls) = (0u64, 0u64);
    loop {
        let answer: Value = cluster
            .http
            .post(format!(
                "{}/pullCompleted?top=1000",
                cluster.url(1 + calls % cluster.ids().len() as u64)
            ))
            .send()
            .await?
            .json()
            .await?;
        calls += 1;
        let n = answer.as_array().map_or(0, Vec::len) as u64;
        if n == 0 {
            break;
        }
        items += n;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(json!({ "items": items, "calls": calls, "items_per_second": (items as f64 / secs).round() }))
}

async fn status(cluster: &Cluster, id: u64) -> anyhow::Result<Value> {
    Ok(cluster
        .http
        .get(format!("{}/status", cluster.url(id)))
        .send()
        .await?
        .json()
        .await?)
}

/// The end-to-end cost a warm worker adds beyond hashing, from the leader-stamped enqueue and
/// completion times (1 ms resolution), one job at a time.
async fn worker_overhead(cluster: &mut Cluster, rate: f64, jobs: usize) -> anyhow::Result<Value> {
    cluster.spawn_worker(&[])?;
    let http = &cluster.http;
    let iterations = 10_000u32;
    let hashing_ms = f64::from(iterations) / rate * 1000.0;
    let mut overheads = Vec::new();
    let started = Instant::now();
    for j in 0..jobs + 5 {
        let answer: Value = http
            .put(format!(
                "{}/enqueue?iterations={iterations}",
                cluster.url(1 + j as u64 % 3)
            ))
            .body(vec![7u8; 1024])
            .send()
            .await?
            .json()
            .await?;
        let id = answer["work_id"].as_str().context("work_id")?.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        let work = loop {
            let w: Value = http
                .get(format!("{}/work/{id}", cluster.url(1)))
                .send()
                .await?
                .json()
                .await?;
            if w["status"] == "completed" {
                break w;
            }
            if Instant::now() > deadline {
                bail!("job {id} did not complete in 10s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        // The first few warm the worker up (connections, caches).
        if j >= 5 {
            let total = work["completed_at_ms"].as_f64().unwrap_or(0.0)
                - work["enqueued_at_ms"].as_f64().unwrap_or(0.0);
            overheads.push((total - hashing_ms).max(0.0));
        }
    }
    let jobs_per_second = (jobs + 5) as f64 / started.elapsed().as_secs_f64();
    overheads.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    // Drain what the pull phase should not count.
    let _ = pull_rate(cluster).await?;
    Ok(json!({
        "jobs": jobs,
        "iterations": iterations,
        "hashing_ms": (hashing_ms * 100.0).round() / 100.0,
        "overhead_ms": { "p50": percentile(&overheads, 0.5), "p90": percentile(&overheads, 0.9) },
        "sequential_jobs_per_second": (jobs_per_second * 10.0).round() / 10.0,
    }))
}

/// Time from a leader SIGKILL until a write is acknowledged again.
async fn failover(cluster: &mut Cluster) -> anyhow::Result<Value> {
    let leader = cluster.wait_for_leader(LEADER_TIMEOUT).await?;
    let survivors: Vec<String> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .map(|id| cluster.url(id))
        .collect();
    cluster.kill_node(leader);
    let killed = Instant::now();
    let mut attempts = 0u64;
    let acknowledged = loop {
        let url = &survivors[attempts as usize % survivors.len()];
        attempts += 1;
        let answer = cluster
            .http
            .put(format!("{url}/enqueue?iterations=1"))
            .body(vec![1u8; 64])
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if answer.is_ok_and(|a| a.status().is_success()) {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("no write accepted 30s after the leader was killed");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    Ok(json!({ "writes_accepted_after_ms": acknowledged.as_millis(), "attempts": attempts }))
}

/// `openssl speed` single-core SHA-512 on 64-byte blocks, in hashes per second.
fn openssl_sha512_rate() -> Option<f64> {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "2", "-bytes", "64", "sha512"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "sha512  12345.67k" (thousands of bytes per second) on the line for sha512.
    let line = text.lines().rev().find(|l| l.starts_with("sha512"))?;
    let kbytes: f64 = line
        .split_whitespace()
        .nth(1)?
        .trim_end_matches('k')
        .parse()
        .ok()?;
    Some(kbytes * 1000.0 / 64.0)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .no_proxy()
        .build()?;
    let seconds = Duration::from_secs(args.seconds);
    eprintln!("hashq bench: hashing rate");
    let chain_rate =
        tokio::task::spawn_blocking(|| hashq_worker::hash::measure_rate(Duration::from_secs(2)))
            .await?;
    let openssl = openssl_sha512_rate();

    eprintln!("hashq bench: starting a {}-node cluster", args.nodes);
    let mut cluster = start_cluster(args.nodes, http)?;
    cluster.wait_for_leader(LEADER_TIMEOUT).await?;

    let rss_empty = rss_mib(&cluster);
    let mut enqueue = Vec::new();
    for &(clients, size) in &args.runs.0 {
        eprintln!(
            "hashq bench: enqueue, {clients} clients, {size} B payloads, {}s",
            args.seconds
        );
        enqueue.push(enqueue_load(&cluster, clients, size, seconds).await);
    }
    // The leader has applied every enqueue it acknowledged; a follower may not have yet.
    let leader = cluster.wait_for_leader(LEADER_TIMEOUT).await?;
    let queued = status(&cluster, leader).await?["counts"]["queued"]
        .as_u64()
        .unwrap_or(0);
    let backlog_bytes: u64 = enqueue
        .iter()
        .map(|e| e["acknowledged"].as_u64().unwrap_or(0) * e["payload_bytes"].as_u64().unwrap_or(0))
        .sum();
    let memory = json!({
        "backlog_items": queued,
        "backlog_mib": backlog_bytes >> 20,
        "node_rss_mib_empty": rss_empty,
        "node_rss_mib_with_backlog": rss_mib(&cluster),
    });

    if args.enqueue_only {
        let report = json!({ "nodes": args.nodes, "enqueue": enqueue, "memory": memory });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    eprintln!("hashq bench: workers draining {queued} one-iteration items");
    for _ in 0..2 {
        cluster.spawn_worker(&[])?;
    }
    let drain_started = Instant::now();
    loop {
        let s = status(&cluster, 1).await?;
        if s["counts"]["queued"] == 0 && s["counts"]["running"] == 0 {
            break;
        }
        if drain_started.elapsed() > Duration::from_secs(600) {
            bail!("workers did not drain the queue in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain_secs = drain_started.elapsed().as_secs_f64();
    eprintln!("hashq bench: pulling");
    let pull = pull_rate(&cluster).await?;
    cluster.kill_workers();
    eprintln!("hashq bench: warm worker overhead");
    let overhead = worker_overhead(&mut cluster, chain_rate, args.jobs).await?;
    eprintln!("hashq bench: failover");
    let failover = failover(&mut cluster).await?;

    let machine = json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())),
    });
    let report = json!({
        "machine": machine,
        "nodes": args.nodes,
        "enqueue": enqueue,
        "end_to_end": {
            "drained_items": queued,
            "drain_seconds": (drain_secs * 10.0).round() / 10.0,
            "jobs_per_second_two_workers": (queued as f64 / drain_secs).round(),
            "warm_worker": overhead,
        },
        "pull": pull,
        "failover": failover,
        "memory": memory,
        "hashing": {
            "worker_iterations_per_second": chain_rate.round(),
            "openssl_sha512_64_byte_hashes_per_second": openssl.map(f64::round),
            "ratio": openssl.map(|o| ((chain_rate / o) * 1000.0).round() / 1000.0),
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
