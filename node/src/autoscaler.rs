//! Growing the worker pool with the load, within the one cluster-wide budget.
//!
//! Two halves, both on every node:
//! - **deciding** (the leader only): when the oldest queued item has waited longer than
//!   `--scale-up-wait`, or the backlog would take longer than `--drain-target` to drain at the
//!   measured per-worker rate, it reserves one slot through Raft for the live endpoint with the
//!   fewest workers, at most once per `--scale-up-interval`. The state machine grants a slot
//!   only while launching + running < `max_workers`, so the budget holds whatever the races
//!   between nodes or leaders.
//! - **launching** (each node): a node starts the workers of the slots reserved for it and
//!   records their handles; a failed launch gives the slot back. A slot names the process it
//!   is for (the node's random incarnation, from its health answer), so a node that crashed
//!   mid-launch and came back is another process and never launches
//!   the same slot twice (a slot nobody launched is freed after `--launch-timeout`).
//!
//! Scaling down is the workers' own idle exit; a worker that stops heartbeating is declared
//! lost by the leader's tick, which kills it ([`crate::housekeeping`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashq_raft::command::{Request, Response};
use hashq_raft::types::{Counts, WorkerRecord, WorkerState};
use hashq_raft::{machine, NodeId, WorkerId};
use openraft::ServerState;

use crate::config::Scaling;
use crate::launcher::{LaunchSpec, Launcher};
use crate::node::Node;

/// The measured hashing rate of one busy worker, smoothed.
struct RateEstimate {
    rate: f64,
    last: Option<(Instant, u64)>,
}

impl RateEstimate {
    fn update(&mut self, completed_iterations: u64, busy_workers: usize) {
        let now = Instant::now();
        match self.last {
            Some((at, before)) if now.duration_since(at) >= Duration::from_secs(1) => {
                let done = completed_iterations.saturating_sub(before);
                if busy_workers > 0 && done > 0 {
                    let sample =
                        done as f64 / now.duration_since(at).as_secs_f64() / busy_workers as f64;
                    self.rate = 0.7 * self.rate + 0.3 * sample;
                }
                self.last = Some((now, completed_iterations));
            }
            Some(_) => {}
            None => self.last = Some((now, completed_iterations)),
        }
    }
}

pub async fn run(node: Node) {
    let launcher = node.launcher().clone();
    let mut attempted: HashSet<WorkerId> = HashSet::new();
    let mut rate = RateEstimate {
        rate: node.config().scaling.assumed_rate,
        last: None,
    };
    let mut last_reserve: Option<Instant> = None;
    let mut ticker = tokio::time::interval(node.config().scaling.tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let view = node.reader().view();
        let (meta, workers) = match (machine::read_meta(&view), machine::workers(&view)) {
            (Ok(m), Ok(w)) => (m, w),
            _ => continue,
        };
        launch_reserved(&node, &launcher, &workers, &mut attempted);
        // A witness leads only to hand over (`watch::hand_over`): it scales nothing.
        if node.raft().metrics().borrow().state != ServerState::Leader || node.is_witness() {
            rate.last = None;
            continue;
        }
        let busy = workers.iter().filter(|w| w.leased > 0).count();
        rate.update(meta.counts.completed_iterations_total, busy);
        let live = live_endpoints(&node);
        if last_reserve.is_some_and(|t| t.elapsed() < node.config().scaling.scale_up_interval) {
            continue;
        }
        let Some(parent) = wanted(&node, &meta, &workers, rate.rate, &live) else {
            continue;
        };
        last_reserve = Some(Instant::now());
        let Some(incarnation) = incarnation_of(&node, parent) else {
            continue;
        };
        match node
            .proposer()
            .submit(Request::Reserve {
                parent,
                incarnation,
            })
            .await
        {
            Ok(reply) => match reply.response {
                Response::Reserved {
                    worker: Some(worker),
                } => {
                    tracing::info!(%worker, parent, queued = meta.counts.queued, "scaling up: slot reserved")
                }
                Response::Reserved { worker: None } => {
                    tracing::debug!("scaling up refused: the budget is full")
                }
                other => tracing::warn!(?other, "unexpected answer to a reservation"),
            },
            Err(e) => tracing::debug!(error = %e, "reservation deferred"),
        }
    }
}

/// Whether to launch one more worker now, and for which parent.
fn wanted(
    node: &Node,
    meta: &machine::Meta,
    workers: &[WorkerRecord],
    rate: f64,
    live: &[NodeId],
) -> Option<NodeId> {
    let now = node.sm_now(meta);
    let oldest_wait = machine::oldest_queued(&node.reader().view(), 64)
        .ok()
        .flatten()
        .map_or(Duration::ZERO, |t| {
            Duration::from_millis(now.saturating_sub(t))
        });
    let load = Load {
        counts: &meta.counts,
        max_workers: meta.max_workers.unwrap_or(0),
        workers,
        oldest_wait,
        rate,
    };
    decide(&load, &node.config().scaling, live)
}

/// What the autoscaler looks at.
struct Load<'a> {
    counts: &'a Counts,
    /// The cluster-wide budget (0 while unset).
    max_workers: u32,
    workers: &'a [WorkerRecord],
    /// How long the oldest queued item has waited.
    oldest_wait: Duration,
    /// The measured hashing rate of one busy worker, iterations/s.
    rate: f64,
}

/// The decision itself, pure: one more worker when there is queued work that the workers up
/// or coming will not take, the budget has room, and the oldest item has waited
/// `scale_up_wait` or the backlog would take longer than `drain_target` to drain; its parent
/// is the live endpoint with the fewest managed workers (the lowest id on a tie).
fn decide(load: &Load<'_>, scaling: &Scaling, live: &[NodeId]) -> Option<NodeId> {
    let (counts, workers) = (load.counts, load.workers);
    let managed = workers.iter().filter(|w| w.managed).count() as u64;
    if counts.queued == 0 || managed >= u64::from(load.max_workers) {
        return None;
    }
    // Workers that are up but hold nothing will take the queued work themselves.
    let idle = workers
        .iter()
        .filter(|w| w.state == WorkerState::Running && w.leased == 0)
        .count() as u64;
    let launching = workers
        .iter()
        .filter(|w| w.state == WorkerState::Launching)
        .count() as u64;
    if idle + launching >= counts.queued {
        return None;
    }
    let workers_up = workers
        .iter()
        .filter(|w| w.state == WorkerState::Running)
        .count()
        .max(1);
    let drain = Duration::from_secs_f64(
        counts.queued_iterations as f64 / (load.rate * workers_up as f64).max(1.0),
    );
    if load.oldest_wait < scaling.scale_up_wait && drain <= scaling.drain_target {
        return None;
    }
    let mut per_parent: BTreeMap<NodeId, usize> = live.iter().map(|id| (*id, 0)).collect();
    for w in workers.iter().filter(|w| w.managed) {
        if let Some(n) = per_parent.get_mut(&w.parent) {
            *n += 1;
        }
    }
    per_parent
        .into_iter()
        .min_by_key(|(id, n)| (*n, *id))
        .map(|(id, _)| id)
}

/// Endpoints (not witnesses) that can launch workers and answered their last `/health`
/// probe, this node included.
fn live_endpoints(node: &Node) -> Vec<NodeId> {
    let membership = node.raft().metrics().borrow().membership_config.clone();
    membership
        .membership()
        .nodes()
        .map(|(id, _)| *id)
        .filter(|&id| {
            if id == node.id() {
                node.config().role == crate::config::Role::Endpoint
                    && node.launcher().name() != "none"
            } else {
                node.peer_health()
                    .get(id)
                    .is_some_and(|h| h.role == "endpoint" && h.launcher != "none")
            }
        })
        .collect()
}

/// The process of node `id` that a slot is reserved for: this one's, or the one its last
/// health probe answered with.
fn incarnation_of(node: &Node, id: NodeId) -> Option<u64> {
    if id == node.id() {
        Some(node.incarnation())
    } else {
        node.peer_health().get(id).map(|h| h.incarnation)
    }
}

/// Starts the workers of slots reserved for this node's current process.
fn launch_reserved(
    node: &Node,
    launcher: &Arc<dyn Launcher>,
    workers: &[WorkerRecord],
    attempted: &mut HashSet<WorkerId>,
) {
    attempted.retain(|id| workers.iter().any(|w| w.id == *id));
    for w in workers {
        let mine = w.managed
            && w.state == WorkerState::Launching
            && w.parent == node.id()
            && w.handle.is_empty()
            && w.incarnation == node.incarnation();
        if !mine || !attempted.insert(w.id) {
            continue;
        }
        let membership = node.raft().metrics().borrow().membership_config.clone();
        let spec = LaunchSpec {
            worker: w.id,
            parent: node.id(),
            endpoints: membership
                .membership()
                .nodes()
                .map(|(_, n)| node.peers().url(&n.addr, ""))
                .collect(),
            idle_timeout: node.config().scaling.worker_idle_timeout,
            orphan_timeout: node.config().scaling.worker_orphan_timeout,
            threads: node.config().scaling.worker_threads,
        };
        let node = node.clone();
        let launcher = launcher.clone();
        tokio::spawn(async move {
            let worker = spec.worker;
            let request = match launcher.launch(spec).await {
                Ok(handle) => Request::Launched { worker, handle },
                Err(e) => {
                    tracing::warn!(%worker, error = %e, "launch failed; releasing the slot");
                    node.note_launch_error(&e);
                    Request::LaunchFailed {
                        worker,
                        reason: e.to_string(),
                    }
                }
            };
            if let Err(e) = node.proposer().submit(request).await {
                tracing::warn!(%worker, error = %e, "could not record the launch");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hashq_raft::types::WorkerSecret;

    fn worker(id: u64, parent: NodeId, state: WorkerState, leased: u32) -> WorkerRecord {
        WorkerRecord {
            id: WorkerId(id),
            parent,
            state,
            managed: true,
            since: 0,
            last_seen: 0,
            leased,
            completed: 0,
            handle: String::new(),
            host: String::new(),
            last_lease: None,
            secret: WorkerSecret::default(),
            incarnation: 0,
        }
    }

    fn queued(items: u64, iterations_each: u64) -> Counts {
        Counts {
            queued: items,
            queued_iterations: items * iterations_each,
            ..Counts::default()
        }
    }

    fn decide_with(counts: &Counts, workers: &[WorkerRecord], wait_ms: u64) -> Option<NodeId> {
        let load = Load {
            counts,
            max_workers: 5,
            workers,
            oldest_wait: Duration::from_millis(wait_ms),
            rate: 1_000_000.0,
        };
        decide(&load, &Scaling::default(), &[1, 2, 3])
    }

    #[test]
    fn scales_up_only_for_work_that_waited_or_would_take_too_long() {
        let busy = [worker(1, 1, WorkerState::Running, 1)];
        // Nothing queued, or a small young backlog: no launch.
        assert_eq!(decide_with(&Counts::default(), &[], 60_000), None);
        assert_eq!(decide_with(&queued(10, 1000), &busy, 100), None);
        // The oldest item waited past --scale-up-wait: launch.
        assert!(decide_with(&queued(10, 1000), &busy, 2_000).is_some());
        // Young, but 10 x 10^9 iterations at 10^6/s is far beyond --drain-target: launch.
        assert!(decide_with(&queued(10, 1_000_000_000), &busy, 0).is_some());
    }

    #[test]
    fn idle_and_launching_workers_and_the_budget_hold_launches_back() {
        let idle = [
            worker(1, 1, WorkerState::Running, 0),
            worker(2, 2, WorkerState::Launching, 0),
        ];
        assert_eq!(decide_with(&queued(2, 1000), &idle, 60_000), None);
        assert!(decide_with(&queued(3, 1000), &idle, 60_000).is_some());
        let full: Vec<_> = (1..=5)
            .map(|i| worker(i, 1, WorkerState::Running, 1))
            .collect();
        assert_eq!(decide_with(&queued(100, 1000), &full, 60_000), None);
        // External workers (started by hand) hold no slot of the budget.
        let external: Vec<_> = full
            .iter()
            .cloned()
            .map(|w| WorkerRecord {
                managed: false,
                ..w
            })
            .collect();
        assert!(decide_with(&queued(100, 1000), &external, 60_000).is_some());
    }

    #[test]
    fn the_parent_is_the_live_endpoint_with_the_fewest_managed_workers() {
        let workers = [
            worker(1, 1, WorkerState::Running, 1),
            worker(2, 1, WorkerState::Running, 1),
            worker(3, 2, WorkerState::Running, 1),
            // A worker of a node that is not live does not count for anyone.
            worker(4, 9, WorkerState::Running, 1),
        ];
        assert_eq!(decide_with(&queued(50, 1000), &workers, 60_000), Some(3));
        let balanced = [
            worker(1, 1, WorkerState::Running, 1),
            worker(2, 2, WorkerState::Running, 1),
            worker(3, 3, WorkerState::Running, 1),
        ];
        assert_eq!(decide_with(&queued(50, 1000), &balanced, 60_000), Some(1));
        let load = Load {
            counts: &queued(50, 1000),
            max_workers: 4,
            workers: &balanced,
            oldest_wait: Duration::from_secs(60),
            rate: 1_000_000.0,
        };
        assert_eq!(
            decide(&load, &Scaling::default(), &[]),
            None,
            "no live endpoint"
        );
    }

    #[test]
    fn the_rate_estimate_follows_measured_work_per_busy_worker() {
        let mut rate = RateEstimate {
            rate: 2_000_000.0,
            last: None,
        };
        rate.update(0, 1);
        // Fake a sample one second ago: 3 * 10^6 iterations by 1 busy worker.
        let then = Instant::now() - Duration::from_secs(1);
        rate.last = Some((then, 0));
        rate.update(3_000_000, 1);
        assert!(
            rate.rate > 2_000_000.0 && rate.rate < 3_000_000.0,
            "{}",
            rate.rate
        );
        // No busy worker: no sample, the estimate stays.
        let before = rate.rate;
        rate.last = Some((Instant::now() - Duration::from_secs(1), 3_000_000));
        rate.update(4_000_000, 0);
        assert_eq!(rate.rate, before);
    }
}
