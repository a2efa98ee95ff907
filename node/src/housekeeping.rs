//! The leader's periodic duties: set the worker budget at bootstrap, and propose a `Tick`
//! whenever one is due (an expired lease, a silent worker, records past their retention).
//! Followers run the same loop but do nothing until they lead.

use hashq_raft::command::{Request, Response, TickParams};
use hashq_raft::machine;
use openraft::ServerState;

use crate::node::Node;
use crate::proposer::now_ms;

/// The most expiries and deletions one tick does, so one log entry stays small.
const TICK_LIMIT: u32 = 2000;

pub fn tick_params(node: &Node) -> TickParams {
    let t = &node.config.timing;
    TickParams {
        max_attempts: node.config.limits.max_attempts,
        worker_lost_ms: t.worker_lost_after.as_millis() as u64,
        launch_timeout_ms: t.launch_timeout.as_millis() as u64,
        pulled_retention_ms: t.pulled_retention.as_millis() as u64,
        limit: TICK_LIMIT,
    }
}

pub async fn run(node: Node) {
    let mut interval = tokio::time::interval(node.config.timing.reaper_period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if node.raft.metrics().borrow().state != ServerState::Leader {
            continue;
        }
        if let Err(e) = duties(&node).await {
            tracing::debug!(error = %e, "housekeeping deferred");
        }
    }
}

async fn duties(node: &Node) -> Result<(), crate::error::ApiError> {
    let meta = machine::read_meta(&node.reader.view())?;
    if meta.max_workers.is_none() {
        node.proposer
            .submit(Request::SetMaxWorkers {
                max: node.config.max_workers,
                only_if_unset: true,
            })
            .await?;
    }
    let params = tick_params(node);
    if machine::tick_due(&node.reader.view(), now_ms(), &params)? {
        let reply = node.proposer.submit(Request::Tick(params)).await?;
        if let Response::Ticked(report) = reply.response {
            if report.expired > 0 || report.dead > 0 || !report.lost_workers.is_empty() {
                tracing::info!(
                    expired = report.expired,
                    dead = report.dead,
                    lost_workers = ?report.lost_workers,
                    "leases reclaimed"
                );
            }
        }
    }
    Ok(())
}
