//! In-process tests: real nodes (storage, Raft, the proposer, the loops, the routes) on
//! `127.0.0.1:0` in the test's own runtime, each with its own data dir. Nothing of hashq's is
//! mocked; a test waits for conditions with a deadline and shuts down what it started.

mod housekeeping;
mod proposer;
mod shutdown;

use std::future::Future;
use std::time::{Duration, Instant};

use hashq_raft::command::Request;
use hashq_raft::machine::{self, Meta};
use hashq_raft::NodeId;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::NodeArgs;
use crate::node::Node;
use crate::server::{serve, Server, Surface};

/// How long a test waits for a condition before it fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// Waits until `check` answers `Some`, polling; panics with `what` after [`DEADLINE`].
async fn wait_for<T, F: Future<Output = Option<T>>>(what: &str, mut check: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(t) = check().await {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One node started and served in-process.
struct TestNode {
    node: Node,
    server: Server,
    stop_serving: oneshot::Sender<()>,
    serving: JoinHandle<std::io::Result<()>>,
}

impl TestNode {
    /// Stops serving, then ends the node's loops and its Raft; returns its state handle.
    async fn shut_down(self) -> Node {
        let _ = self.stop_serving.send(());
        self.serving
            .await
            .expect("the server task")
            .expect("serving");
        self.server.shutdown().await;
        self.node
    }
}

/// A cluster of in-process nodes; the data dirs go with it.
struct Cluster {
    nodes: Vec<Option<TestNode>>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` voters on free loopback ports, with `flags` added to each one's, and waits
    /// until they agree on a leader.
    async fn start(n: usize, flags: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
        }
        let peers: Vec<String> = listeners
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{}={}", i + 1, l.local_addr().expect("addr")))
            .collect();
        let peers = peers.join(",");
        let starts = listeners.iter().enumerate().map(|(i, l)| {
            let id = (i + 1).to_string();
            let listen = l.local_addr().expect("addr").to_string();
            let data = dir.path().join(format!("node-{id}"));
            let mut args = vec![
                "hashq".to_string(),
                "--id".into(),
                id,
                "--listen".into(),
                listen,
                "--peers".into(),
                peers.clone(),
                "--data-dir".into(),
                data.display().to_string(),
                "--insecure".into(),
                "--launcher".into(),
                "none".into(),
                "--max-workers".into(),
                "0".into(),
                "--disk-free-limit".into(),
                "0".into(),
            ];
            args.extend(flags.iter().map(|f| f.to_string()));
            async move { Server::start(config(args)).await.expect("start") }
        });
        let servers = futures::future::join_all(starts).await;
        let nodes = servers
            .into_iter()
            .zip(listeners)
            .map(|(server, listener)| {
                let node = server.node().clone();
                let (stop_serving, stopped) = oneshot::channel::<()>();
                let serving =
                    tokio::spawn(serve(listener, node.clone(), Surface::Whole, async move {
                        let _ = stopped.await;
                    }));
                Some(TestNode {
                    node,
                    server,
                    stop_serving,
                    serving,
                })
            })
            .collect();
        let cluster = Cluster { nodes, _dir: dir };
        cluster.leader().await;
        cluster
    }

    /// The running node with id `id`.
    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize - 1]
            .as_ref()
            .expect("a running node")
            .node
    }

    fn running(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().flatten().map(|n| &n.node)
    }

    /// The leader every running node agrees on, once there is one.
    async fn leader(&self) -> NodeId {
        wait_for("a leader all running nodes agree on", || async {
            let mut seen = self
                .running()
                .map(|n| n.raft().metrics().borrow().current_leader);
            let first = seen.next().flatten()?;
            let all_agree = seen.all(|l| l == Some(first));
            let leads = self.nodes[first as usize - 1].is_some();
            (all_agree && leads).then_some(first)
        })
        .await
    }

    /// A running node other than the leader.
    async fn follower(&self) -> NodeId {
        let leader = self.leader().await;
        self.running()
            .map(Node::id)
            .find(|id| *id != leader)
            .expect("a follower")
    }

    /// Stops node `id` (its loops, its Raft, its listener).
    async fn stop(&mut self, id: NodeId) {
        let node = self.nodes[id as usize - 1].take().expect("a running node");
        node.shut_down().await;
    }

    /// Stops every node left.
    async fn shut_down(mut self) {
        for node in self.nodes.iter_mut().filter_map(Option::take) {
            node.shut_down().await;
        }
    }
}

fn config(args: Vec<String>) -> crate::config::NodeConfig {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        node: NodeArgs,
    }
    let args = <Cli as clap::Parser>::try_parse_from(args)
        .expect("flags")
        .node;
    args.into_config().expect("config")
}

/// The state machine's meta record as `node` has applied it.
fn meta(node: &Node) -> Meta {
    machine::read_meta(&node.reader().view()).expect("meta")
}

/// The index of the last entry `node` applied.
fn applied(node: &Node) -> u64 {
    node.reader().subscribe().borrow().index
}

/// Waits until the leader's housekeeping has made its bootstrap entries (the worker budget,
/// the cluster version raised to this build's: every node here runs it) and `node` has
/// applied its whole log: from then on an idle cluster appends nothing for a while (the next
/// no-op comes after `machine::IDLE_ENTRY_MS`).
async fn settled(node: &Node) {
    wait_for("the cluster to settle", || async {
        let last = node.raft().metrics().borrow().last_log_index.unwrap_or(0);
        let version = hashq_raft::machine::cluster_version(&node.reader().view()).ok()?;
        (meta(node).max_workers.is_some()
            && version == hashq_raft::version::SUPPORTED
            && applied(node) == last)
            .then_some(())
    })
    .await
}

fn enqueue(payload: &'static [u8], key: Option<&str>) -> Request {
    Request::Enqueue {
        iterations: 1,
        payload: bytes::Bytes::from_static(payload),
        dedup: key.map(|k| hashq_raft::command::Dedup {
            key: k.into(),
            ttl_ms: 600_000,
        }),
    }
}
