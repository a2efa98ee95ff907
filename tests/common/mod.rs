//! The end-to-end tests' harness: the shared process harness (`hashq-testkit`, which
//! `hashq bench` runs too) with the tests' credentials and binary, panicking helpers, the
//! client calls the tests repeat, and logs printed and kept when a test fails; [`proxy`]
//! injects network faults between nodes; [`workload`] enqueues items that share a few
//! payloads and pulls them all back checked.

#![allow(dead_code)]

pub mod proxy;
pub mod workload;

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;
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
    hashq_testkit::rss_kib(pid)
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    hashq_testkit::free_port().expect("a free port")
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

/// Waits for `check` to return `Some`, polling, up to `timeout`; panics naming `what` then.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    hashq_testkit::poll_until(timeout, check)
        .await
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Runs `command` to its end, with its output; kills it and panics if it has not ended
/// within `limit` (a command that would run forever fails the test instead of hanging it).
pub fn output_within(mut command: std::process::Command, limit: Duration) -> std::process::Output {
    use std::process::Stdio;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the command");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().expect("poll the command").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap the command");
            panic!(
                "{command:?} still ran after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("the command's output")
}

/// The answer of a `hashq` client command that must succeed: one JSON document, or the
/// array of its JSON lines.
pub fn json_answer(out: std::process::Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).expect("JSON lines"))
            .collect::<Vec<Value>>()
            .into()
    })
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
    /// TLS on every link: a cluster CA, a certificate per node, `https` everywhere.
    pub tls: bool,
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
            tls: false,
        }
    }
}

/// A cluster of real `hashq node` processes and the workers a test starts: the shared
/// harness ([`hashq_testkit::Cluster`], reached through `Deref`) with the tests' credentials,
/// an optional fault-injecting proxy, methods that panic instead of returning errors, and
/// the logs printed and kept when a test fails.
pub struct Cluster {
    processes: hashq_testkit::Cluster,
    pub proxy: Option<proxy::Proxy>,
    options: Options,
    /// Environment and flags given to particular nodes (see [`Cluster::start_with`]).
    node_env: Vec<(String, String)>,
    node_extra: HashMap<u64, Vec<String>>,
    /// Nodes removed from the membership: never started again.
    retired: std::collections::BTreeSet<u64>,
}

impl Deref for Cluster {
    type Target = hashq_testkit::Cluster;

    fn deref(&self) -> &hashq_testkit::Cluster {
        &self.processes
    }
}

impl DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut hashq_testkit::Cluster {
        &mut self.processes
    }
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
            (Some(advertised), Some(proxy::Proxy::start(&routes).await))
        } else {
            (None, None)
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let tls = options.tls.then(|| dir.path().join("tls"));
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(tls) = &tls {
            hashq_tls::Ca::open_or_create(tls).expect("cluster CA");
            http = hashq_tls::trust(http, &hashq_tls::Ca::cert_path(tls), None).unwrap();
        }
        let processes = hashq_testkit::Cluster::new(hashq_testkit::Spec {
            binary: binary(),
            dir,
            data_root: options.data_root.clone(),
            ports,
            advertised,
            credentials: hashq_testkit::Credentials {
                cluster: TOKEN.into(),
                worker: WORKER_TOKEN.into(),
                admin: Some(ADMIN_TOKEN.into()),
            },
            node_log: "info,openraft=warn".into(),
            worker_log: "info".into(),
            http: http.build().unwrap(),
            tls,
        });
        let mut cluster = Cluster {
            processes,
            proxy,
            options,
            node_env,
            node_extra,
            retired: Default::default(),
        };
        for id in 1..=cluster.options.nodes as u64 {
            cluster.start_node(id);
        }
        cluster.wait_for_leader(Duration::from_secs(30)).await;
        cluster
    }

    /// The nodes still in the membership (every id but the retired ones).
    pub fn members(&self) -> Vec<u64> {
        self.ids()
            .into_iter()
            .filter(|id| !self.retired.contains(id))
            .collect()
    }

    /// Replaces the extra flags node `id` gets at its next start.
    pub fn set_node_extra(&mut self, id: u64, flags: Vec<String>) {
        self.node_extra.insert(id, flags);
    }

    /// Whether node `id` was started with `--role witness`.
    pub fn is_witness(&self, id: u64) -> bool {
        self.node_extra
            .get(&id)
            .is_some_and(|flags| flags.iter().any(|f| f == "witness"))
    }

    /// Replaces member `old` with a new node through `hashq cluster replace`: kills `old`
    /// (if it still runs), starts the new node with `--join`, and retires `old`. Returns the
    /// new node's id.
    pub async fn replace_node(&mut self, old: u64) -> u64 {
        self.kill_node(old);
        let (id, addr) = self.start_joining(old).await;
        let id_arg = id.to_string();
        self.admin_ok(&[
            "replace",
            &old.to_string(),
            "--id",
            &id_arg,
            "--addr",
            &addr,
        ]);
        self.retired.insert(old);
        id
    }

    /// Starts a new node with `--join` and adds it through `hashq cluster add`: its id.
    pub async fn join_node(&mut self) -> u64 {
        let (id, addr) = self.start_joining(0).await;
        self.admin_ok(&["add", "--id", &id.to_string(), "--addr", &addr]);
        id
    }

    /// Removes member `id` through `hashq cluster remove`, then stops and retires it.
    pub fn remove_node(&mut self, id: u64) {
        self.admin_ok(&["remove", &id.to_string()]);
        self.stop_node(id);
        self.retired.insert(id);
    }

    /// Starts a node in a new slot with `--join` (through any member but `not_via`) and
    /// waits until it answers: its id and peer address.
    async fn start_joining(&mut self, not_via: u64) -> (u64, String) {
        self.start_joining_with(not_via, &[]).await
    }

    /// [`Cluster::start_joining`] with `extra` flags for the new node.
    pub async fn start_joining_with(&mut self, not_via: u64, extra: &[&str]) -> (u64, String) {
        let port = free_port();
        let id = match self.proxy.as_mut() {
            // Behind the fault proxy like the others, so partitions cut it off too.
            Some(proxy) => {
                let advertised = free_port();
                let id = self.processes.ids().len() as u64 + 1;
                proxy.add(id, advertised, port).await;
                self.processes.add_slot(port, advertised)
            }
            None => self.processes.add_slot(port, port),
        };
        let via = self
            .members()
            .into_iter()
            .find(|m| *m != not_via && *m != id && self.node_running(*m))
            .expect("a running member");
        let url = self.url(via);
        let mut args = vec!["--join", url.as_str()];
        args.extend_from_slice(extra);
        self.start_node_with(id, &args);
        wait_for(
            "the new node to answer",
            Duration::from_secs(20),
            || async { self.get_json(id, "/health").await.map(|_| ()) },
        )
        .await;
        (id, self.peer_addr(id))
    }

    /// [`Cluster::admin_cli`], which must succeed.
    fn admin_ok(&self, args: &[&str]) -> Value {
        json_answer(self.admin_cli(args), &format!("hashq cluster {args:?}"))
    }

    /// Runs `hashq cluster ARGS` against the members with the admin credential.
    pub fn admin_cli(&self, args: &[&str]) -> std::process::Output {
        let endpoints: Vec<String> = self.members().iter().map(|id| self.url(*id)).collect();
        std::process::Command::new(binary())
            .args(["cluster", "--endpoints", &endpoints.join(",")])
            .args(["--admin-token", ADMIN_TOKEN, "--timeout", "150s"])
            .args(self.tls_args())
            .args(args)
            .output()
            .expect("run hashq cluster")
    }

    /// `--tls-ca <the cluster CA>` for the CLI of a TLS cluster; nothing otherwise.
    pub fn tls_args(&self) -> Vec<std::ffi::OsString> {
        self.tls_ca()
            .map(|ca| vec!["--tls-ca".into(), ca.into_os_string()])
            .unwrap_or_default()
    }

    /// Starts (or restarts) node `id` with its data directory.
    pub fn start_node(&mut self, id: u64) {
        self.start_node_with(id, &[]);
    }

    /// Starts (or restarts) node `id` with `extra` flags after the cluster's and its own.
    pub fn start_node_with(&mut self, id: u64, extra: &[&str]) {
        let per_node = self.node_extra.get(&id).cloned().unwrap_or_default();
        let own_launcher = self
            .options
            .node_args
            .iter()
            .chain(&per_node)
            .any(|a| a == "--launcher")
            || extra.contains(&"--launcher");
        let mut args: Vec<String> = Vec::new();
        if !own_launcher {
            let launcher = if self.options.launch_workers {
                "local"
            } else {
                "none"
            };
            args.extend(["--launcher".into(), launcher.into()]);
        }
        if self.options.proxied {
            args.extend(["--outbound-addr".into(), proxy::node_addr(id).to_string()]);
        }
        args.extend(self.options.node_args.iter().cloned());
        args.extend(per_node);
        args.extend(extra.iter().map(|a| a.to_string()));
        let env = self.node_env.clone();
        self.processes
            .spawn_node(id, &args, &env)
            .expect("spawn hashq node");
    }

    /// SIGTERMs node `id` and waits for it to exit.
    pub fn stop_node(&mut self, id: u64) {
        self.processes.stop_node(id, Duration::from_secs(10));
    }

    /// Node `id`'s resident memory in KiB, from /proc.
    pub fn node_rss_kib(&self, id: u64) -> Option<u64> {
        rss_kib(self.node_pid(id)?)
    }

    /// Starts a worker pointed at every node; returns its index.
    pub fn start_worker(&mut self, extra: &[&str]) -> usize {
        let args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        self.processes
            .spawn_worker(&args)
            .expect("spawn hashq worker")
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

    /// Waits for the running nodes to agree on a running leader (panics after `timeout`).
    pub async fn wait_for_leader(&self, timeout: Duration) -> u64 {
        self.processes
            .wait_for_leader(timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits (30 s at most) until work item `work_id`, read on node `id`, is completed: its
    /// view then.
    pub async fn wait_for_completed(&self, id: u64, work_id: &str) -> Value {
        wait_for(
            &format!("work item {work_id} to complete"),
            Duration::from_secs(30),
            || async {
                let w = self.get_json(id, &format!("/work/{work_id}")).await?;
                (w["status"] == "completed").then_some(w)
            },
        )
        .await
    }

    /// Waits (30 s at most) until node `id`'s own `/status` holds `want` at JSON pointer `at`
    /// (each node's status is its applied view: a follower catches up within moments).
    pub async fn wait_for_status(&self, id: u64, at: &str, want: Value) {
        wait_for(
            &format!("{at} = {want} in node {id}'s status"),
            Duration::from_secs(30),
            || async {
                let status = self.get_json(id, "/status").await?;
                (status.pointer(at)? == &want).then_some(())
            },
        )
        .await
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
                    return pulled_items(&a.json().await.unwrap());
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
        let mut logs: Vec<PathBuf> = self
            .ids()
            .into_iter()
            .filter(|id| self.node_running(*id))
            .map(|id| self.node_log(id))
            .collect();
        logs.extend((0..self.workers_started()).map(|k| self.worker_log(k)));
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") && !logs.contains(&p) {
                    eprintln!("--- {} (stopped) ---", p.display());
                    tail(&p);
                }
            }
        }
        for log in logs {
            eprintln!("--- {} ---", log.display());
            tail(&log);
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
        self.processes.kill_all();
        // Workers the nodes launched outlive a SIGKILLed node by design; not a test's.
        for pid in self.worker_processes() {
            hashq_testkit::signal(pid, "KILL");
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
        .body(hashq_proto::codec::encode(request))
        .send()
        .await
        .expect("worker route answers");
    assert!(answer.status().is_success(), "{path}: {}", answer.status());
    let bytes = answer.bytes().await.unwrap();
    hashq_proto::codec::decode("answer", &bytes).expect("postcard answer")
}

/// What one keyed `PUT /enqueue?iterations=1` attempt came to, for load clients that retry.
pub enum Attempt {
    Acked(String),
    /// A 503, or no answer (a node stopped or restarting): retry with the same key.
    Retry,
    /// Any other answer: a failure the test reports.
    Failed(String),
}

/// One keyed enqueue attempt on `url`.
pub async fn enqueue_once(http: &reqwest::Client, url: &str, key: &str, body: &[u8]) -> Attempt {
    let answer = http
        .put(format!("{url}/enqueue?iterations=1"))
        .header("idempotency-key", key)
        .body(body.to_vec())
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    match answer {
        Ok(a) if a.status() == 200 => match a.json::<Value>().await {
            Ok(v) => match v["work_id"].as_str() {
                Some(id) => Attempt::Acked(id.to_string()),
                None => Attempt::Failed(format!("{key}: no work_id in {v}")),
            },
            Err(_) => Attempt::Retry,
        },
        Ok(a) if a.status() == 503 => Attempt::Retry,
        Ok(a) => {
            let status = a.status();
            let text = a.text().await.unwrap_or_default();
            Attempt::Failed(format!("{key}: {status} {text}"))
        }
        Err(_) => Attempt::Retry,
    }
}

/// `cp -a FROM TO` after removing TO: a restore from a backup, as an operator does it (nothing
/// synced).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let _ = std::fs::remove_dir_all(to);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

/// The (work id, value) pairs of a `pullCompleted` answer.
pub fn pulled_items(answer: &Value) -> Vec<(String, String)> {
    answer
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|i| {
            (
                i["work_id"].as_str().unwrap().to_string(),
                i["value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}
