//! The proposer on real nodes: batching, forwarding from followers, retries through a leader
//! change.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hashq_raft::command::Response;
use hashq_raft::types::Status;
use hashq_raft::WorkId;

use super::{applied, enqueue, meta, settled, wait_for, Cluster};
use crate::node::Node;

fn enqueued(reply: Result<crate::proposer::Reply, crate::error::ApiError>) -> (WorkId, bool) {
    match reply.expect("the proposal is accepted").response {
        Response::Enqueued { id, duplicate } => (id, duplicate),
        other => panic!("answered {other:?}"),
    }
}

fn holds(node: &Node, id: WorkId) -> bool {
    machine_item(node, id).is_some_and(|item| item.status == Status::Queued)
}

fn machine_item(node: &Node, id: WorkId) -> Option<hashq_raft::types::Item> {
    hashq_raft::machine::item(&node.reader().view(), id).expect("read")
}

// One runtime thread: every proposal below is queued before the batcher first runs.
#[tokio::test]
async fn concurrent_proposals_land_in_one_log_entry() {
    let cluster = Cluster::start(1, &[]).await;
    let node = cluster.node(1).clone();
    settled(&node).await;
    let before = applied(&node);

    let proposals = (0..16).map(|_| node.proposer().submit(enqueue(b"x", None)));
    let replies = futures::future::join_all(proposals).await;

    let ids: Vec<WorkId> = replies.into_iter().map(|r| enqueued(r).0).collect();
    assert!(ids.iter().all(|id| holds(&node, *id)));
    assert_eq!(
        applied(&node),
        before + 1,
        "16 concurrent proposals should take one log entry"
    );
    assert_eq!(meta(&node).counts.queued, 16);
    cluster.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_on_a_follower_is_committed_through_the_leader() {
    let cluster = Cluster::start(3, &[]).await;
    let (leader, follower) = (cluster.leader().await, cluster.follower().await);
    let (leader, follower) = (cluster.node(leader).clone(), cluster.node(follower).clone());
    let proposed = |n: &Node| n.metrics().commit.count();
    let (by_leader, by_follower) = (proposed(&leader), proposed(&follower));

    let (id, duplicate) = enqueued(follower.proposer().submit(enqueue(b"f", None)).await);

    assert!(!duplicate);
    // The leader proposed it (and applied it before answering); the follower proposed
    // nothing itself: it cannot append to the log.
    assert!(holds(&leader, id), "the leader holds the item");
    assert!(proposed(&leader) > by_leader);
    assert_eq!(proposed(&follower), by_follower);
    wait_for("the follower to apply the item", || async {
        holds(&follower, id).then_some(())
    })
    .await;
    cluster.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_pending_when_the_leader_stops_lands_once_under_its_key() {
    let mut cluster = Cluster::start(3, &[]).await;
    let (leader, follower) = (cluster.leader().await, cluster.follower().await);
    let on_follower = cluster.node(follower).clone();

    // The follower proposes keyed enqueues one after another, so one is always under way:
    // forwarded to the leader, or waiting for it to answer, when the leader stops.
    let done = Arc::new(AtomicUsize::new(0));
    let stopped = Arc::new(AtomicUsize::new(usize::MAX));
    let proposing = tokio::spawn({
        let (node, done, stopped) = (on_follower.clone(), done.clone(), stopped.clone());
        async move {
            let mut ids = Vec::new();
            for k in 0.. {
                if k > stopped.load(Ordering::SeqCst).saturating_add(2) {
                    break;
                }
                let key = format!("retry-test-{k}");
                let reply = node.proposer().submit(enqueue(b"r", Some(&key))).await;
                ids.push((key, reply));
                done.fetch_add(1, Ordering::SeqCst);
            }
            ids
        }
    });
    wait_for("a few proposals through the first leader", || async {
        (done.load(Ordering::SeqCst) >= 3).then_some(())
    })
    .await;
    stopped.store(done.load(Ordering::SeqCst), Ordering::SeqCst);
    cluster.stop(leader).await;

    let replies = proposing.await.expect("the proposing task");
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader);
    let new_leader = cluster.node(new_leader).clone();
    // A retry of a proposal that had landed is answered as a duplicate of it: the same id.
    let first: Vec<(String, WorkId)> = replies
        .into_iter()
        .map(|(key, reply)| (key, enqueued(reply).0))
        .collect();
    let distinct: std::collections::HashSet<_> = first.iter().map(|(_, id)| *id).collect();
    assert_eq!(distinct.len(), first.len(), "two keys got one item");
    // Exactly once: one item per key, and each key names the item it first made.
    wait_for("the new leader to apply every proposal", || async {
        first
            .iter()
            .all(|(_, id)| holds(&new_leader, *id))
            .then_some(())
    })
    .await;
    assert_eq!(meta(&new_leader).counts.queued, first.len() as u64);
    for (key, id) in &first {
        let again = on_follower
            .proposer()
            .submit(enqueue(b"r", Some(key)))
            .await;
        assert_eq!(enqueued(again), (*id, true), "{key} again");
    }
    assert_eq!(meta(&new_leader).counts.queued, first.len() as u64);
    cluster.shut_down().await;
}
