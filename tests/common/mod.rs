//! A harness for end-to-end tests: real `hashq` processes on loopback, free ports, logs in a
//! temporary directory (printed when a test fails), every process killed on drop.

#![allow(dead_code)]

pub mod proxy;

use std::collections::HashMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha512};

/// The peer credential (`--cluster-token`): only nodes hold it.
pub const TOKEN: &str = "e2e-cluster-token";
/// The workers' credential (`--worker-token`).
pub const WORKER_TOKEN: &str = "e2e-worker-token-0";
/// The admin credential (`--admin-token`).
pub const ADMIN_TOKEN: &str = "e2e-admin-token-00";

/// The `hashq` binary under test: this build's, or `HASHQ_TEST_BIN` (to show a test fails on
/// an older build).
pub fn binary() -> PathBuf {
    std::env::var_os("HASHQ_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_hashq")))
}

/// A process's resident memory in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The reference work function, written from the spec with the `sha2` crate, independent of
/// the product's hashing code.
pub fn reference(payload: &[u8], iterations: u32) -> String {
    let mut value = Sha512::digest(payload);
    for _ in 1..iterations {
        value = Sha512::digest(value);
    }
    hex::encode(value)
}

/// Waits for `check` to return `Some`, polling, up to `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Proc {
    child: Child,
    log: PathBuf,
}

/// Options for the nodes of a test cluster.
#[derive(Clone)]
pub struct Options {
    pub nodes: usize,
    /// Extra `hashq node` flags for every node.
    pub node_args: Vec<String>,
    /// Let nodes launch workers (`--launcher local`); otherwise tests start workers by hand.
    pub launch_workers: bool,
    /// Put a fault-injecting proxy between the nodes ([`proxy::Proxy`]).
    pub proxied: bool,
    /// Where the nodes' data dirs go (`<root>/node-<id>`), e.g. a power-cut file system;
    /// default: the cluster's temporary dir.
    pub data_root: Option<PathBuf>,
    /// The nodes' ports, when they must be these (data dirs whose membership names them);
    /// default: free ports.
    pub ports: Option<Vec<u16>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 3,
            node_args: Vec::new(),
            launch_workers: false,
            proxied: false,
            data_root: None,
            ports: None,
        }
    }
}

/// A cluster of real `hashq node` processes and the workers a test starts.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// The ports nodes listen on (clients in the tests talk to these).
    pub ports: Vec<u16>,
    /// The ports in `--peers` (the proxy's when proxied): peers and workers use these.
    pub advertised: Vec<u16>,
    pub proxy: Option<proxy::Proxy>,
    options: Options,
    nodes: HashMap<u64, Proc>,
    workers: Vec<Proc>,
    /// Environment and flags given to particular nodes (see [`Cluster::start_with`]).
    node_env: Vec<(String, String)>,
    node_extra: HashMap<u64, Vec<String>>,
    pub http: reqwest::Client,
}

impl Cluster {
    /// Starts the nodes and waits until they agree on a leader.
    pub async fn start(options: Options) -> Cluster {
        Cluster::start_with(options, Vec::new(), HashMap::new()).await
    }

    /// Like [`Cluster::start`], with environment variables for every node and extra flags for
    /// some (by node id; kept for restarts). A `--launcher` among the flags replaces the one
    /// `launch_workers` picks.
    pub async fn start_with(
        options: Options,
        node_env: Vec<(String, String)>,
        node_extra: HashMap<u64, Vec<String>>,
    ) -> Cluster {
        let ports: Vec<u16> = match &options.ports {
            Some(ports) => ports.clone(),
            None => (0..options.nodes).map(|_| free_port()).collect(),
        };
        let (advertised, proxy) = if options.proxied {
            let advertised: Vec<u16> = (0..options.nodes).map(|_| free_port()).collect();
            let routes: Vec<(u64, u16, u16)> = (0..options.nodes)
                .map(|i| (i as u64 + 1, advertised[i], ports[i]))
                .collect();
            (advertised, Some(proxy::Proxy::start(&routes).await))
        } else {
            (ports.clone(), None)
        };
        let mut cluster = Cluster {
            dir: tempfile::tempdir().expect("temp dir"),
            ports,
            advertised,
            proxy,
            options,
            nodes: HashMap::new(),
            workers: Vec::new(),
            node_env,
            node_extra,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        for id in 1..=cluster.options.nodes as u64 {
            cluster.start_node(id);
        }
        cluster.wait_for_leader(Duration::from_secs(30)).await;
        cluster
    }

    pub fn ids(&self) -> Vec<u64> {
        (1..=self.options.nodes as u64).collect()
    }

    pub fn peers(&self) -> String {
        self.advertised
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, id: u64) -> String {
        format!("http://127.0.0.1:{}", self.ports[id as usize - 1])
    }

    /// The endpoint list workers get (through the proxy when there is one).
    pub fn endpoints(&self) -> String {
        self.advertised
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.options
            .data_root
            .as_deref()
            .unwrap_or(self.dir.path())
            .join(format!("node-{id}"))
    }

    /// Starts (or restarts) node `id` with its data directory.
    pub fn start_node(&mut self, id: u64) {
        self.start_node_with(id, &[]);
    }

    pub fn start_node_with(&mut self, id: u64, extra: &[&str]) {
        assert!(!self.nodes.contains_key(&id), "node {id} is running");
        let log = self.dir.path().join(format!("node-{id}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let per_node = self.node_extra.get(&id).cloned().unwrap_or_default();
        let own_launcher = self
            .options
            .node_args
            .iter()
            .chain(&per_node)
            .any(|a| a == "--launcher")
            || extra.contains(&"--launcher");
        let mut cmd = Command::new(binary());
        cmd.arg("node")
            .args(["--id", &id.to_string()])
            .args([
                "--listen",
                &format!("127.0.0.1:{}", self.ports[id as usize - 1]),
            ])
            .args(["--peers", &self.peers()])
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .args(["--cluster-token", TOKEN])
            .args(["--worker-token", WORKER_TOKEN])
            .args(["--admin-token", ADMIN_TOKEN]);
        if !own_launcher {
            cmd.args([
                "--launcher",
                if self.options.launch_workers {
                    "local"
                } else {
                    "none"
                },
            ]);
        }
        if self.options.proxied {
            cmd.args(["--outbound-addr", &proxy::node_addr(id).to_string()]);
        }
        cmd.args(&self.options.node_args)
            .args(&per_node)
            .args(extra)
            .envs(self.node_env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd.spawn().expect("spawn hashq node");
        self.nodes.insert(id, Proc { child, log });
    }

    /// SIGKILLs node `id`.
    pub fn kill_node(&mut self, id: u64) {
        if let Some(mut p) = self.nodes.remove(&id) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// SIGTERMs node `id` and waits for it to exit.
    pub fn stop_node(&mut self, id: u64) {
        if let Some(mut p) = self.nodes.remove(&id) {
            signal(&p.child, "TERM");
            wait_exit(&mut p.child, Duration::from_secs(10));
        }
    }

    /// SIGSTOPs node `id` (it keeps its sockets but answers nothing).
    pub fn pause_node(&self, id: u64) {
        if let Some(p) = self.nodes.get(&id) {
            signal(&p.child, "STOP");
        }
    }

    pub fn resume_node(&self, id: u64) {
        if let Some(p) = self.nodes.get(&id) {
            signal(&p.child, "CONT");
        }
    }

    pub fn node_running(&self, id: u64) -> bool {
        self.nodes.contains_key(&id)
    }

    /// Whether node `id`'s process is still alive (it was started and has not exited).
    pub fn node_alive(&mut self, id: u64) -> bool {
        self.nodes
            .get_mut(&id)
            .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// The pid of node `id`'s process.
    pub fn node_pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id).map(|p| p.child.id())
    }

    /// Node `id`'s resident memory in KiB, from /proc.
    pub fn node_rss_kib(&self, id: u64) -> Option<u64> {
        rss_kib(self.node_pid(id)?)
    }

    /// Starts a worker pointed at every node; returns its index.
    pub fn start_worker(&mut self, extra: &[&str]) -> usize {
        let k = self.workers.len();
        let log = self.dir.path().join(format!("worker-{k}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(binary())
            .arg("worker")
            .args(["--endpoints", &self.endpoints()])
            .args(["--worker-token", WORKER_TOKEN])
            .args(["--idle-timeout", "1h"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn hashq worker");
        self.workers.push(Proc { child, log });
        k
    }

    pub fn worker_pid(&self, k: usize) -> u32 {
        self.workers[k].child.id()
    }

    pub fn kill_worker(&mut self, k: usize) {
        let _ = self.workers[k].child.kill();
        let _ = self.workers[k].child.wait();
    }

    /// Whether worker `k` has exited (and reaps it).
    pub fn worker_exited(&mut self, k: usize) -> bool {
        matches!(self.workers[k].child.try_wait(), Ok(Some(_)))
    }

    pub async fn get_json(&self, id: u64, path: &str) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}{}", self.url(id), path))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// A node's Prometheus metrics (panics when the node does not answer).
    pub async fn metrics(&self, id: u64) -> String {
        self.http
            .get(format!("{}/metrics", self.url(id)))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics text")
    }

    /// The leader as some running node reports it, once the running nodes agree.
    pub async fn leader(&self) -> Option<u64> {
        let mut seen = None;
        for id in self.ids() {
            if !self.node_running(id) {
                continue;
            }
            let leader = self.get_json(id, "/health").await?["leader"].as_u64()?;
            if seen.is_some_and(|s| s != leader) {
                return None;
            }
            seen = Some(leader);
        }
        seen.filter(|l| self.node_running(*l))
    }

    pub async fn wait_for_leader(&self, timeout: Duration) -> u64 {
        wait_for("a leader", timeout, || self.leader()).await
    }

    /// `PUT /enqueue` on node `id`, retried (same key) until it is acknowledged.
    pub async fn enqueue(&self, id: u64, payload: Vec<u8>, iterations: u32, key: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut node = id;
        loop {
            let answer = self
                .http
                .put(format!(
                    "{}/enqueue?iterations={iterations}",
                    self.url(node)
                ))
                .header("idempotency-key", key)
                .body(payload.clone())
                .send()
                .await;
            if let Ok(a) = answer {
                if a.status().is_success() {
                    let v: Value = a.json().await.unwrap();
                    return v["work_id"].as_str().unwrap().to_string();
                }
                assert!(
                    a.status().as_u16() == 503,
                    "enqueue answered {}",
                    a.status()
                );
            }
            assert!(
                Instant::now() < deadline,
                "enqueue of {key} never acknowledged"
            );
            node = node % self.options.nodes as u64 + 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `POST /pullCompleted` on node `id` with a key, retried with the same key on failure
    /// (possibly on other nodes) until it answers.
    pub async fn pull(&self, id: u64, top: u32, key: &str) -> Vec<(String, String)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut node = id;
        loop {
            let answer = self
                .http
                .post(format!("{}/pullCompleted?top={top}", self.url(node)))
                .header("idempotency-key", key)
                .send()
                .await;
            if let Ok(a) = answer {
                if a.status().is_success() {
                    let v: Value = a.json().await.unwrap();
                    return v
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|i| {
                            (
                                i["work_id"].as_str().unwrap().to_string(),
                                i["value"].as_str().unwrap().to_string(),
                            )
                        })
                        .collect();
                }
            }
            assert!(Instant::now() < deadline, "pull {key} never answered");
            node = node % self.options.nodes as u64 + 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Pids of every `hashq worker` process of this cluster: started by the test or launched
    /// by a node.
    pub fn worker_processes(&self) -> Vec<u32> {
        worker_processes(&self.endpoints())
    }

    fn dump_logs(&self) {
        let mut logs: Vec<&Path> = self.nodes.values().map(|p| p.log.as_path()).collect();
        logs.extend(self.workers.iter().map(|p| p.log.as_path()));
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") && !logs.contains(&p.as_path()) {
                    eprintln!("--- {} (stopped) ---", p.display());
                    tail(&p);
                }
            }
        }
        for log in logs {
            eprintln!("--- {} ---", log.display());
            tail(log);
        }
        for id in self.ids() {
            let dir = self.data_dir(id).join("workers");
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                eprintln!("--- {} ---", e.path().display());
                tail(&e.path());
            }
        }
    }
}

/// Pids of every live `hashq worker` process whose `--endpoints` is exactly `endpoints`.
pub fn worker_processes(endpoints: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_worker = args.get(1).is_some_and(|a| a == "worker");
        if is_worker && args.iter().any(|a| a == endpoints) && !is_zombie(pid) {
            pids.push(pid);
        }
    }
    pids
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}

fn tail(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[lines.len().saturating_sub(40)..] {
        eprintln!("{line}");
    }
}

fn signal(child: &Child, sig: &str) {
    // The process may be gone already: that is fine, and not worth a line in the test output.
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .stderr(Stdio::null())
        .status();
}

fn wait_exit(child: &mut Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
            // Keep every log of a failed test for a closer look.
            let keep = std::env::temp_dir().join(format!("hashq-failed-{}", std::process::id()));
            let copied = Command::new("sh")
                .arg("-c")
                .arg("mkdir -p \"$2\" && cd \"$1\" && find . -name '*.log' -exec cp --parents {} \"$2\" \\;")
                .arg("sh")
                .arg(self.dir.path())
                .arg(&keep)
                .status();
            if copied.is_ok_and(|s| s.success()) {
                eprintln!("logs of the failed test kept in {}", keep.display());
            }
        }
        for p in self.workers.iter_mut().chain(self.nodes.values_mut()) {
            signal(&p.child, "CONT");
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        // Workers the nodes launched outlive a SIGKILLed node by design; not a test's.
        for pid in self.worker_processes() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A payload of `len` pseudo-random bytes from `seed`.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A worker route called with the worker credential, postcard both ways.
pub async fn worker_call<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
    cluster: &Cluster,
    node: u64,
    path: &str,
    request: &Req,
) -> Resp {
    let answer = cluster
        .http
        .post(format!("{}{path}", cluster.url(node)))
        .bearer_auth(WORKER_TOKEN)
        .header("content-type", "application/x-postcard")
        .body(hashq_raft::codec::encode(request))
        .send()
        .await
        .expect("worker route answers");
    assert!(answer.status().is_success(), "{path}: {}", answer.status());
    let bytes = answer.bytes().await.unwrap();
    hashq_raft::codec::decode("answer", &bytes).expect("postcard answer")
}
