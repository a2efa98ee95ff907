//! The node's watchers of itself and its peers: peer health, terms and clocks, the repair of
//! damaged state, and Raft stopping on a fatal error. Each runs until the server's shutdown
//! signal ([`crate::server`]) or, for the repair, until it is done.

use std::sync::atomic::Ordering;
use std::time::Duration;

use hashq_raft::{NodeId, Raft};

type RaftMetrics = openraft::RaftMetrics<NodeId, openraft::BasicNode>;

use crate::node::Node;
use hashq_proto::api::Handover;
use hashq_proto::codec::POSTCARD;
use hashq_proto::routes::internal::ELECT;
use openraft::ServerState;

/// Probes every peer's `/health` once a second (more often while one does not answer), for
/// [`Node::peer_health`].
pub async fn probe_peers(node: Node) {
    loop {
        let membership = node.raft().metrics().borrow().membership_config.clone();
        let probes = membership
            .membership()
            .nodes()
            .filter(|(id, _)| **id != node.id())
            .map(|(id, n)| {
                let (id, addr) = (*id, n.addr.clone());
                let node = node.clone();
                async move {
                    let health = node.probe_health(&addr).await;
                    let answered = health.is_some();
                    node.peer_health().set(id, health);
                    answered
                }
            });
        let answers = futures::future::join_all(probes).await;
        let all_up = !answers.is_empty() && answers.iter().all(|a| *a);
        let timing = &node.config().timing;
        tokio::time::sleep(if all_up {
            timing.peer_probe_every
        } else {
            timing.peer_probe_eager
        })
        .await;
    }
}

/// While repairing, proposes a no-op now and then (so an idle cluster's log still grows
/// past what this node had), and ends the repair once this node has applied up to where its
/// log was and follows a leader: then it votes and stands for election again.
pub async fn watch_repair(node: Node) {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while let Some(until) = node.repair().until() {
        ticker.tick().await;
        let (applied, follows) = {
            let m = node.raft().metrics().borrow().clone();
            (
                m.last_applied.map_or(0, |l| l.index),
                m.current_leader.is_some_and(|l| l != node.id()),
            )
        };
        if !follows {
            continue;
        }
        if applied < until {
            let _ = node
                .proposer()
                .submit(hashq_raft::command::Request::Noop)
                .await;
            continue;
        }
        if let Err(e) = hashq_storage::repaired(&node.config().data_dir) {
            tracing::error!(error = %e, "cannot record the end of the repair");
            continue;
        }
        *node
            .repair()
            .until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        node.raft().runtime_config().elect(true);
        tracing::warn!(
            applied,
            until,
            "REPAIRED: this node holds everything it had again; it votes and stands for election"
        );
    }
}

/// A witness that leads hands leadership to an endpoint as soon as one has the whole log: it
/// asks that endpoint to stand for election (`POST /internal/elect`), and votes for it, as
/// its log is as complete. Until then it serves no proposal (`/internal/propose` answers a
/// retryable 503). The witness asks only once its own leader lease has run out (its longest
/// election timeout, three endpoint timeouts, since it was elected): within it, it would
/// refuse its vote, the endpoint's campaign would fail, and the witness would win the next
/// election again. Then it asks once per election timeout until an endpoint leads.
pub async fn hand_over(node: Node) {
    let period = node.config().timing.election_timeout;
    let lease = period * 3;
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading: Option<(u64, std::time::Instant)> = None;
    loop {
        ticker.tick().await;
        let m = node.raft().metrics().borrow().clone();
        if m.state != ServerState::Leader {
            leading = None;
            continue;
        }
        let since = match leading {
            Some((term, since)) if term == m.current_term => since,
            _ => {
                tracing::warn!(
                    term = m.current_term,
                    "this witness leads (no endpoint could win an election): it hands over once an endpoint has the whole log"
                );
                leading = Some((m.current_term, std::time::Instant::now()));
                continue;
            }
        };
        if since.elapsed() < lease {
            continue;
        }
        let Some(heir) = heir(&node, &m, &[]) else {
            tracing::debug!(term = m.current_term, "no endpoint has the whole log yet");
            continue;
        };
        if ask_to_stand(&node, heir, m.current_term).await {
            tracing::info!(heir, term = m.current_term, "witness hands leadership over");
        }
    }
}

/// The voter to hand leadership to: an endpoint other than this node and `besides` that
/// answered its last probe and holds the whole log (as replicated from this leader).
pub fn heir(node: &Node, m: &RaftMetrics, besides: &[NodeId]) -> Option<NodeId> {
    let last = m.last_log_index?;
    let membership = m.membership_config.membership();
    let replication = m.replication.as_ref()?;
    membership.voter_ids().find(|id| {
        *id != node.id()
            && !besides.contains(id)
            && replication
                .get(id)
                .is_some_and(|matched| matched.is_some_and(|l| l.index >= last))
            && node
                .peer_health()
                .get(*id)
                .is_some_and(|h| h.role == "endpoint")
    })
}

/// Asks `heir` to stand for election now (`POST /internal/elect`): this node leads in
/// `term` and will vote for it, its log being as complete. Whether it took the request.
pub async fn ask_to_stand(node: &Node, heir: NodeId, term: u64) -> bool {
    let membership = node.raft().metrics().borrow().membership_config.clone();
    let Some(addr) = membership
        .membership()
        .get_node(&heir)
        .map(|n| n.addr.clone())
    else {
        return false;
    };
    let handover = Handover {
        from: node.id(),
        term,
    };
    let request = node
        .peers()
        .request(reqwest::Method::POST, &addr, ELECT)
        .header(reqwest::header::CONTENT_TYPE, POSTCARD)
        .timeout(node.config().timing.election_timeout)
        .body(hashq_proto::codec::encode(&handover));
    match request.send().await {
        Ok(answer) if answer.status().is_success() => true,
        Ok(answer) => {
            tracing::debug!(heir, status = %answer.status(), "handover refused");
            false
        }
        Err(e) => {
            tracing::debug!(heir, error = %e, "handover not delivered");
            false
        }
    }
}

/// Counts the terms this node sees begin, and measures the leader's clock against this
/// node's at every apply.
pub async fn watch_terms_and_clocks(node: Node) {
    let mut metrics = node.raft().metrics();
    let mut applied = node.reader().subscribe();
    let mut term = metrics.borrow().current_term;
    loop {
        tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = metrics.borrow().current_term;
                if now > term {
                    node.metrics().elections.fetch_add(now - term, Ordering::Relaxed);
                    term = now;
                }
            }
            changed = applied.changed() => {
                if changed.is_err() {
                    return;
                }
                let leader_wall = applied.borrow().leader_wall;
                if leader_wall > 0 {
                    let skew = leader_wall as i64 - crate::proposer::now_ms() as i64;
                    node.metrics().leader_clock_skew_ms.store(skew, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A node whose Raft stopped on a fatal error (a storage failure, a bug) exits, so that its
/// supervisor restarts it from its durable state instead of leaving it answering 503s. The
/// server ends this watch before it stops Raft on purpose.
pub async fn exit_on_fatal(raft: Raft) {
    let mut metrics = raft.metrics();
    loop {
        let fatal = match &metrics.borrow().running_state {
            Err(openraft::error::Fatal::Stopped) => return,
            Err(fatal) => Some(fatal.to_string()),
            Ok(()) => None,
        };
        if let Some(fatal) = fatal {
            tracing::error!(error = %fatal, "raft stopped on a fatal error; exiting");
            std::process::exit(70);
        }
        if metrics.changed().await.is_err() {
            // The Raft core is gone without saying why (a panic drops its channels).
            tracing::error!("raft core stopped unexpectedly; exiting");
            std::process::exit(70);
        }
    }
}
