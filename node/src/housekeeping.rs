//! The leader's periodic duties: set the worker budget at bootstrap, and propose a `Tick`
//! whenever one is due (an expired lease, a silent worker, records past their retention).
//! Followers run the same loop but do nothing until they lead.

use std::time::Duration;

use hashq_raft::command::{Request, Response, TickParams};
use hashq_raft::machine;
use openraft::ServerState;

use crate::launcher::WorkerTable;
use crate::node::Node;

pub fn tick_params(node: &Node) -> TickParams {
    let t = &node.config().timing;
    TickParams {
        max_attempts: node.config().limits.max_attempts,
        worker_lost_ms: t.worker_lost_after.as_millis() as u64,
        launch_timeout_ms: t.launch_timeout.as_millis() as u64,
        pulled_retention_ms: t.pulled_retention.as_millis() as u64,
        completed_retention_ms: node.config().limits.completed_retention.as_millis() as u64,
        dead_retention_ms: node.config().limits.dead_retention.as_millis() as u64,
        limit: node.config().limits.tick_limit,
    }
}

pub async fn run(node: Node) {
    let mut interval = tokio::time::interval(node.config().timing.reaper_period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconciled = std::time::Instant::now();
    loop {
        interval.tick().await;
        // A witness leads only to hand over (`watch::hand_over`): no housekeeping meanwhile.
        if node.raft().metrics().borrow().state != ServerState::Leader || node.is_witness() {
            continue;
        }
        if let Err(e) = duties(&node).await {
            tracing::debug!(error = %e, "housekeeping deferred");
        }
        if reconciled.elapsed() >= node.config().timing.reconcile_period {
            reconciled = std::time::Instant::now();
            if let Err(e) = reconcile(&node).await {
                tracing::warn!(error = %e, "reconciliation deferred");
            }
        }
    }
}

/// Frees the slots of workers whose machines the launcher's provider no longer runs.
async fn reconcile(node: &Node) -> Result<(), crate::error::ApiError> {
    let view = node.reader().view();
    let meta = machine::read_meta(&view)?;
    let table = WorkerTable {
        workers: machine::workers(&view)?,
        next_worker: meta.next_worker,
        now: node.sm_now(&meta),
    };
    let gone = node
        .launcher()
        .reconcile(table)
        .await
        .map_err(|e| crate::error::ApiError::Unavailable(e.to_string()))?;
    for worker in gone {
        tracing::warn!(%worker, "worker's machine is gone; freeing its slot");
        node.proposer()
            .submit(Request::Forget {
                worker,
                max_attempts: node.config().limits.max_attempts,
            })
            .await?;
    }
    Ok(())
}

/// Raises the cluster version to the latest that every member (voters and learners) offers
/// in its last `/health` answer; a member that has not answered keeps it where it is.
async fn raise_cluster_version(node: &Node) -> Result<(), crate::error::ApiError> {
    let current = machine::cluster_version(&node.reader().view())?;
    let mut offered = node.config().cluster_version_max;
    if offered <= current {
        return Ok(());
    }
    let membership = node.raft().metrics().borrow().membership_config.clone();
    for (id, _) in membership.membership().nodes() {
        if *id == node.id() {
            continue;
        }
        match node.peer_health().get(*id) {
            Some(health) => offered = offered.min(health.cluster_version),
            None => return Ok(()),
        }
    }
    if offered > current {
        tracing::info!(
            from = current,
            to = offered,
            "every member runs a later cluster version: raising it"
        );
        node.proposer()
            .submit(Request::SetClusterVersion { version: offered })
            .await?;
    }
    Ok(())
}

async fn duties(node: &Node) -> Result<(), crate::error::ApiError> {
    if node.proposer().idle_for() >= Duration::from_millis(machine::IDLE_ENTRY_MS) {
        // Keep state-machine time moving in small steps on an idle cluster.
        node.proposer().submit(Request::Noop).await?;
    }
    let meta = machine::read_meta(&node.reader().view())?;
    if meta.max_workers.is_none() {
        node.proposer()
            .submit(Request::SetMaxWorkers {
                max: node.config().scaling.max_workers,
                only_if_unset: true,
            })
            .await?;
    }
    raise_cluster_version(node).await?;
    let params = tick_params(node);
    let now = node.sm_now(&machine::read_meta(&node.reader().view())?);
    if machine::tick_due(&node.reader().view(), now, &params)? {
        let reply = node.proposer().submit(Request::Tick(params)).await?;
        if let Response::Ticked(report) = reply.response {
            if report.expired > 0 || report.dead > 0 || !report.lost_workers.is_empty() {
                tracing::info!(
                    expired = report.expired,
                    dead = report.dead,
                    lost_workers = ?report.lost_workers,
                    "leases reclaimed"
                );
            }
            // A lost worker may still run (paused, cut off): make sure it is gone, so the slot
            // just freed is not held twice.
            for (worker, handle) in report.lost_workers {
                if !handle.is_empty() {
                    if let Err(e) = node.launcher().terminate(worker, handle.clone()).await {
                        tracing::warn!(%worker, %handle, error = %e, "could not stop a lost worker");
                    }
                }
            }
        }
    }
    Ok(())
}
