//! Self-initialization: a cluster of `--peers` forms itself exactly once.
//!
//! Each node, while it has no Raft state, asks its peers whether they have any. Once a
//! majority (itself included) answers and none of them is initialized, the reachable node with
//! the lowest id calls `initialize` with every peer as a voter. openraft refuses `initialize`
//! on a node with a log or a vote, so restarts never initialize again; and a node that finds
//! an initialized peer waits for the leader to replicate to it instead.

use std::collections::BTreeMap;
use std::time::Duration;

use hashq_proto::api::InitState;
use hashq_proto::routes::raft::INIT;
use openraft::BasicNode;

use crate::node::Node;

async fn probe(node: &Node, addr: &str) -> Option<InitState> {
    let answer = node
        .peers()
        .request(reqwest::Method::GET, addr, INIT)
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .ok()?;
    if !answer.status().is_success() {
        tracing::warn!(%addr, status = %answer.status(), "peer refused the init probe (cluster token?)");
        return None;
    }
    answer.json().await.ok()
}

pub async fn run(node: Node) {
    let peers = node.config().peers.0.clone();
    let majority = peers.len() / 2 + 1;
    let members: BTreeMap<_, _> = peers
        .iter()
        .map(|(id, addr)| (*id, BasicNode::new(addr.clone())))
        .collect();
    let mut waiting_logged = false;
    while !node.is_initialized().await {
        let probes = peers
            .iter()
            .filter(|(id, _)| *id != node.id())
            .map(|(_, addr)| probe(&node, addr));
        let answers: Vec<InitState> = futures::future::join_all(probes)
            .await
            .into_iter()
            .flatten()
            .collect();
        if answers.iter().any(|a| a.initialized) {
            if !waiting_logged {
                tracing::info!(
                    "peers already form a cluster; waiting for the leader to reach this node"
                );
                waiting_logged = true;
            }
        } else if answers.len() + 1 >= majority {
            // `initialize` makes the caller stand for election at once, and a witness leads
            // only when no endpoint can: the reachable endpoint with the lowest id does it.
            let me = (!node.is_witness()).then_some(node.id());
            let lowest = answers
                .iter()
                .filter(|a| !a.witness)
                .map(|a| a.node)
                .chain(me)
                .min();
            if me.is_some() && lowest == me {
                match node.raft().initialize(members.clone()).await {
                    Ok(()) => tracing::info!(voters = peers.len(), "cluster initialized"),
                    Err(e) => {
                        tracing::info!(error = %e, "initialize refused (already initialized)")
                    }
                }
            }
        }
        tokio::time::sleep(node.config().timing.bootstrap_probe_every).await;
    }
}

/// A node started with `--join` forms nothing: it says once how to add it, then waits until
/// the leader's replication reaches it (as a learner, then a voter).
pub async fn wait_to_be_added(node: Node, url: String) {
    if node.is_initialized().await {
        return;
    }
    tracing::warn!(
        join = %url,
        "waiting to be added to the cluster: hashq cluster add --endpoints {url} --id {} --addr <this node's host:port>",
        node.id()
    );
    let mut metrics = node.raft().metrics();
    while metrics
        .borrow()
        .membership_config
        .membership()
        .nodes()
        .next()
        .is_none()
    {
        if metrics.changed().await.is_err() {
            return;
        }
    }
    tracing::info!("added to the cluster: replication reached this node");
}
