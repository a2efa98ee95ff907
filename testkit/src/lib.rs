//! Real `hashq` processes on loopback: the cluster harness `hashq bench` runs and the
//! end-to-end tests (`tests/common`) build on.
//!
//! A [`Cluster`] starts `hashq node` processes on ports of the caller's choosing (usually
//! [`free_port`]s), each with its data dir and its log in one directory, and `hashq worker`
//! processes pointed at every node. It finds the leader the way a client would, from the
//! nodes' `/health`, and polls for it with a deadline instead of sleeping.
//!
//! Guarantees: every process a [`Cluster`] started is killed when it is dropped (even a
//! SIGSTOPped one). Workers that the nodes launched themselves (`--launcher local`) are the
//! nodes' and outlive them by design: the caller deals with those.
//!
//! Caveats: Linux only (signals go through `kill`, memory is read from `/proc`); a free port
//! is free when it is picked, not necessarily when a node binds it.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::future::Future;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How often [`poll_until`] checks its condition.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How long one `/health` or JSON read of [`Cluster::get_json`] may take.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// What can go wrong starting a cluster or waiting for it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A process (or its log file) could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn { what: String, source: io::Error },
    /// The running nodes did not agree on a live leader in time.
    #[error("no leader after {timeout:?} (logs in {})", logs.display())]
    NoLeader { timeout: Duration, logs: PathBuf },
}

/// The credentials every node of a cluster is started with.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// `--cluster-token`: only nodes hold it.
    pub cluster: String,
    /// `--worker-token`: the workers' credential.
    pub worker: String,
    /// `--admin-token`; `None` leaves the admin routes closed.
    pub admin: Option<String>,
}

impl Credentials {
    /// Fresh random cluster and worker tokens (32 hex digits each), no admin token.
    pub fn random() -> Credentials {
        Credentials {
            cluster: format!("{:032x}", rand::random::<u128>()),
            worker: format!("{:032x}", rand::random::<u128>()),
            admin: None,
        }
    }
}

/// Everything a [`Cluster`] needs to know before it starts a process.
pub struct Spec {
    /// The `hashq` binary to run.
    pub binary: PathBuf,
    /// Holds the logs (`node-<id>.log`, `worker-<k>.log`) and, unless `data_root` is set,
    /// the data dirs; deleted with the cluster.
    pub dir: tempfile::TempDir,
    /// Where the data dirs go (`<root>/node-<id>`); default: `dir`.
    pub data_root: Option<PathBuf>,
    /// The port node `i + 1` listens on.
    pub ports: Vec<u16>,
    /// The port of node `i + 1` in `--peers` and in the workers' endpoints (a proxy's, say);
    /// default: `ports`.
    pub advertised: Option<Vec<u16>>,
    pub credentials: Credentials,
    /// `RUST_LOG` of the nodes.
    pub node_log: String,
    /// `RUST_LOG` of the workers.
    pub worker_log: String,
    /// The client every request of the harness goes through.
    pub http: reqwest::Client,
    /// TLS: the cluster CA's directory ([`hashq_tls::Ca`]); each node gets a certificate
    /// issued there when it starts, and every URL is `https`.
    pub tls: Option<PathBuf>,
}

/// `hashq node` and `hashq worker` processes on loopback, killed on drop.
pub struct Cluster {
    pub binary: PathBuf,
    pub dir: tempfile::TempDir,
    data_root: Option<PathBuf>,
    /// The ports nodes listen on (clients talk to these).
    pub ports: Vec<u16>,
    /// The ports in `--peers`: peers and workers use these.
    pub advertised: Vec<u16>,
    pub credentials: Credentials,
    node_log: String,
    worker_log: String,
    pub http: reqwest::Client,
    tls: Option<PathBuf>,
    nodes: BTreeMap<u64, Child>,
    workers: Vec<Child>,
}

impl Cluster {
    /// A cluster with no process running yet: start nodes with [`Cluster::spawn_node`].
    pub fn new(spec: Spec) -> Cluster {
        Cluster {
            binary: spec.binary,
            dir: spec.dir,
            data_root: spec.data_root,
            advertised: spec.advertised.unwrap_or_else(|| spec.ports.clone()),
            ports: spec.ports,
            credentials: spec.credentials,
            node_log: spec.node_log,
            worker_log: spec.worker_log,
            http: spec.http,
            tls: spec.tls,
            nodes: BTreeMap::new(),
            workers: Vec::new(),
        }
    }

    /// A slot for one more node, listening on `port` and reached by its peers at
    /// `advertised` (a proxy's port, say): its id. Start it with `--join` (it then gets no
    /// `--peers`) and add it to the cluster.
    pub fn add_slot(&mut self, port: u16, advertised: u16) -> u64 {
        self.ports.push(port);
        self.advertised.push(advertised);
        self.ports.len() as u64
    }

    /// The address node `id`'s peers reach it at (`127.0.0.1:<advertised port>`).
    pub fn peer_addr(&self, id: u64) -> String {
        format!("127.0.0.1:{}", self.advertised[id as usize - 1])
    }

    /// The node ids, `1..=n`.
    pub fn ids(&self) -> Vec<u64> {
        (1..=self.ports.len() as u64).collect()
    }

    /// The `--peers` list: `1=127.0.0.1:<port>,...` with the advertised ports.
    pub fn peers(&self) -> String {
        self.advertised
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `https` for a TLS cluster, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The cluster CA's certificate, for a TLS cluster.
    pub fn tls_ca(&self) -> Option<PathBuf> {
        self.tls.as_deref().map(hashq_tls::Ca::cert_path)
    }

    /// The base URL of node `id` (its own port, not the advertised one).
    pub fn url(&self, id: u64) -> String {
        format!(
            "{}://127.0.0.1:{}",
            self.scheme(),
            self.ports[id as usize - 1]
        )
    }

    /// The endpoint list workers get (the advertised ports).
    pub fn endpoints(&self) -> String {
        self.advertised
            .iter()
            .map(|p| format!("{}://127.0.0.1:{p}", self.scheme()))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.data_root
            .as_deref()
            .unwrap_or(self.dir.path())
            .join(format!("node-{id}"))
    }

    /// Node `id`'s log; a restarted node appends to it.
    pub fn node_log(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}.log"))
    }

    /// The log of the `k`-th worker this cluster started.
    pub fn worker_log(&self, k: usize) -> PathBuf {
        self.dir.path().join(format!("worker-{k}.log"))
    }

    /// Starts (or restarts) node `id` with its data dir and the cluster's credentials, then
    /// `args` (`--launcher`, say) and the environment `env`. Panics if it is running.
    pub fn spawn_node(
        &mut self,
        id: u64,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<(), Error> {
        assert!(!self.nodes.contains_key(&id), "node {id} is running");
        let what = format!("node {id}");
        let mut cmd = Command::new(&self.binary);
        cmd.arg("node")
            .args(["--id", &id.to_string()])
            .args([
                "--listen",
                &format!("127.0.0.1:{}", self.ports[id as usize - 1]),
            ])
            .args(if args.iter().any(|a| a == "--join") {
                Vec::new()
            } else {
                vec!["--peers".to_string(), self.peers()]
            })
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .args(["--cluster-token", &self.credentials.cluster])
            .args(["--worker-token", &self.credentials.worker]);
        if let Some(admin) = &self.credentials.admin {
            cmd.args(["--admin-token", admin]);
        }
        if let Some(dir) = &self.tls {
            let files = hashq_tls::Ca::open_or_create(dir)
                .and_then(|ca| ca.issue(&format!("node-{id}"), &["127.0.0.1".into()]))
                .map_err(|e| Error::Spawn {
                    what: what.clone(),
                    source: io::Error::other(e.to_string()),
                })?;
            cmd.arg("--tls-cert")
                .arg(files.cert)
                .arg("--tls-key")
                .arg(files.key)
                .arg("--tls-ca")
                .arg(files.ca);
        }
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", &self.node_log);
        let child = spawn_logged(cmd, &self.node_log(id), &what)?;
        self.nodes.insert(id, child);
        Ok(())
    }

    /// Starts a worker pointed at every node (idle timeout an hour), then `args`; returns its
    /// index.
    pub fn spawn_worker(&mut self, args: &[String]) -> Result<usize, Error> {
        let k = self.workers.len();
        let mut cmd = Command::new(&self.binary);
        cmd.arg("worker")
            .args(["--endpoints", &self.endpoints()])
            .args(["--worker-token", &self.credentials.worker])
            .args(["--idle-timeout", "1h"])
            .args(
                self.tls_ca()
                    .iter()
                    .flat_map(|ca| [OsStr::new("--tls-ca"), ca.as_os_str()]),
            )
            .args(args)
            .env("RUST_LOG", &self.worker_log);
        let child = spawn_logged(cmd, &self.worker_log(k), &format!("worker {k}"))?;
        self.workers.push(child);
        Ok(k)
    }

    /// SIGKILLs node `id`.
    pub fn kill_node(&mut self, id: u64) {
        if let Some(mut child) = self.nodes.remove(&id) {
            kill(&mut child);
        }
    }

    /// SIGTERMs node `id` and waits for it to exit; SIGKILLs it after `timeout`.
    pub fn stop_node(&mut self, id: u64, timeout: Duration) {
        if let Some(mut child) = self.nodes.remove(&id) {
            signal(child.id(), "TERM");
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            kill(&mut child);
        }
    }

    /// SIGSTOPs node `id` (it keeps its sockets but answers nothing).
    pub fn pause_node(&self, id: u64) {
        if let Some(pid) = self.node_pid(id) {
            signal(pid, "STOP");
        }
    }

    /// SIGCONTs node `id` after [`Cluster::pause_node`].
    pub fn resume_node(&self, id: u64) {
        if let Some(pid) = self.node_pid(id) {
            signal(pid, "CONT");
        }
    }

    /// Whether node `id` was started and not killed or stopped since.
    pub fn node_running(&self, id: u64) -> bool {
        self.nodes.contains_key(&id)
    }

    /// Whether node `id`'s process is still alive (it was started and has not exited).
    pub fn node_alive(&mut self, id: u64) -> bool {
        self.nodes
            .get_mut(&id)
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// The pid of node `id`'s process.
    pub fn node_pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id).map(Child::id)
    }

    /// How many workers this cluster has started (running or not).
    pub fn workers_started(&self) -> usize {
        self.workers.len()
    }

    pub fn worker_pid(&self, k: usize) -> u32 {
        self.workers[k].id()
    }

    pub fn kill_worker(&mut self, k: usize) {
        kill(&mut self.workers[k]);
    }

    /// SIGKILLs every worker this cluster started.
    pub fn kill_workers(&mut self) {
        self.workers.iter_mut().for_each(kill);
    }

    /// Whether worker `k` has exited (and reaps it).
    pub fn worker_exited(&mut self, k: usize) -> bool {
        matches!(self.workers[k].try_wait(), Ok(Some(_)))
    }

    /// `GET path` on node `id` as JSON; `None` when it does not answer in time or not JSON.
    pub async fn get_json(&self, id: u64, path: &str) -> Option<Value> {
        let answer = self
            .http
            .get(format!("{}{}", self.url(id), path))
            .timeout(READ_TIMEOUT)
            .send()
            .await
            .ok()?;
        answer.json().await.ok()
    }

    /// The leader, once every running node answers `/health` and they agree on one that is
    /// running.
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

    /// Polls [`Cluster::leader`] until there is one, up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64, Error> {
        poll_until(timeout, || self.leader())
            .await
            .ok_or_else(|| Error::NoLeader {
                timeout,
                logs: self.dir.path().to_path_buf(),
            })
    }

    /// SIGKILLs every process this cluster started (resuming paused ones first, so none is
    /// left stopped).
    pub fn kill_all(&mut self) {
        for child in self.workers.iter_mut().chain(self.nodes.values_mut()) {
            // Only a process not yet reaped: a reaped one's pid may be someone else's now.
            if matches!(child.try_wait(), Ok(None)) {
                signal(child.id(), "CONT");
            }
            kill(child);
        }
        self.nodes.clear();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Spawns `cmd` with stdin closed and stdout and stderr appended to `log`.
fn spawn_logged(mut cmd: Command, log: &Path, what: &str) -> Result<Child, Error> {
    let mut spawn = || -> io::Result<Child> {
        let out = File::options().create(true).append(true).open(log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
    };
    spawn().map_err(|source| Error::Spawn {
        what: what.to_string(),
        source,
    })
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `sig` (`TERM`, `STOP`, ...) to `pid`. The process may be gone already: that is
/// fine, and not worth a line of output.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// A loopback port nobody listens on right now, and that no other call in this process has
/// handed out.
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`, 32768+ by
/// default), never from `bind(0)`: a port the kernel picks for `bind(0)` is one it picks for
/// outgoing connections and for the next `bind(0)` too, so between this call and the node's
/// own bind, another test's node (tests of one binary run in parallel) or any connection
/// could take it. CI saw exactly that: a node of another test's cluster took a port, and
/// the first cluster's leader spent the test talking to it. Each process starts at its own
/// offset (from its pid) and counts up, so parallel tests never share a port and test
/// binaries run one after another rarely reuse one.
pub fn free_port() -> io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let high = ephemeral_low().unwrap_or(32_768).clamp(LOW + 1_000, 65_536);
    let span = high - LOW;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let port = (LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The lowest port of the kernel's ephemeral range, from `/proc`.
fn ephemeral_low() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A process's resident memory in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Calls `check` every 50 ms until it returns `Some`, up to `timeout` (it is called at least
/// once, and once more after the deadline passes); `None` when it never did.
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
