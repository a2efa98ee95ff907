//! Reconciliation of the worker instances EC2 runs with the replicated worker table: the
//! listing ([`worker_instances`], by `DescribeInstances`) and the pure planning ([`plan`])
//! of which instances are strays to terminate and which workers lost their instance.

use std::time::Duration;

use aws_sdk_ec2::types::{Filter, InstanceStateName};
use hashq_aws::is_instance_id;
use hashq_proto::ec2::{ROLE_WORKER, TAG_CLUSTER, TAG_ROLE, TAG_WORKER_ID};
use hashq_raft::types::Millis;
use hashq_raft::WorkerId;

use super::launcher::launch_error;
use crate::launcher::{LaunchError, WorkerTable};

/// A worker instance missing from `DescribeInstances` is given up only after this long since
/// its slot was reserved: the API is eventually consistent right after `RunInstances`.
pub(super) const ABSENT_GRACE: Duration = Duration::from_secs(120);

/// One worker instance as `DescribeInstances` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SeenInstance {
    id: String,
    /// Pending, running, stopping or stopped (not shutting down or terminated).
    live: bool,
    /// Its `hashq:worker-id` tag, when it has a valid one.
    worker: Option<u64>,
}

/// What a reconciliation does.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// Live instances that no slot accounts for: to terminate.
    pub(super) strays: Vec<String>,
    /// Workers whose instance is gone: their slots are to be freed.
    pub(super) gone: Vec<WorkerId>,
}

/// Compares the instances with the worker table.
///
/// A live instance is a stray when it has no valid worker id tag, when its slot is not in the
/// table (freed: the worker exited, was declared lost, or its launch timed out), or when its
/// slot names another instance (a duplicate launch). A slot id at or above `next_worker` is a
/// reservation this view does not show yet, and a slot with no handle is being launched: both
/// are left alone. A managed worker whose instance is shutting down or terminated is gone; one
/// whose instance is missing altogether is gone only after [`ABSENT_GRACE`], because
/// `DescribeInstances` may not show an instance right after it started.
pub(super) fn plan(seen: &[SeenInstance], table: &WorkerTable, absent_grace: Duration) -> Plan {
    let mut plan = Plan::default();
    for instance in seen.iter().filter(|i| i.live) {
        let stray = match instance.worker {
            None => true,
            Some(id) if id >= table.next_worker => false,
            Some(id) => match table.workers.iter().find(|w| w.id.0 == id) {
                None => true,
                Some(w) => !w.handle.is_empty() && w.handle != instance.id,
            },
        };
        if stray {
            plan.strays.push(instance.id.clone());
        }
    }
    let grace = absent_grace.as_millis() as Millis;
    for w in table
        .workers
        .iter()
        .filter(|w| w.managed && is_instance_id(&w.handle))
    {
        let gone = match seen.iter().find(|i| i.id == w.handle) {
            Some(instance) => !instance.live,
            None => table.now.saturating_sub(w.since) >= grace,
        };
        if gone {
            plan.gone.push(w.id);
        }
    }
    plan
}

/// Every instance of this cluster tagged as a worker, in any state.
pub(super) async fn worker_instances(
    client: &aws_sdk_ec2::Client,
    cluster: &str,
) -> Result<Vec<SeenInstance>, LaunchError> {
    let filter = |name: &str, value: &str| Filter::builder().name(name).values(value).build();
    let mut pages = client
        .describe_instances()
        .filters(filter(&format!("tag:{TAG_CLUSTER}"), cluster))
        .filters(filter(&format!("tag:{TAG_ROLE}"), ROLE_WORKER))
        .into_paginator()
        .send();
    let mut seen = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| launch_error("DescribeInstances", &e))?;
        for instance in page.reservations().iter().flat_map(|r| r.instances()) {
            let Some(id) = instance.instance_id().filter(|id| is_instance_id(id)) else {
                continue;
            };
            let worker = instance
                .tags()
                .iter()
                .find(|t| t.key() == Some(TAG_WORKER_ID))
                .and_then(|t| t.value())
                .and_then(|v| v.parse::<u64>().ok());
            seen.push(SeenInstance {
                id: id.to_string(),
                live: instance.state().and_then(|s| s.name()).is_none_or(is_live),
                worker,
            });
        }
    }
    Ok(seen)
}

/// Whether an instance in this state may still run a worker (or soon will, or may again).
fn is_live(state: &InstanceStateName) -> bool {
    matches!(
        state,
        InstanceStateName::Pending
            | InstanceStateName::Running
            | InstanceStateName::Stopping
            | InstanceStateName::Stopped
    )
}

#[cfg(test)]
mod tests {
    use hashq_raft::types::{WorkerRecord, WorkerState};

    use super::*;

    fn record(id: u64, handle: &str, since: Millis) -> WorkerRecord {
        WorkerRecord {
            id: WorkerId(id),
            parent: 1,
            state: WorkerState::Running,
            managed: true,
            since,
            last_seen: since,
            leased: 0,
            completed: 0,
            handle: handle.to_string(),
            host: String::new(),
            last_lease: None,
            secret: Default::default(),
            incarnation: 0,
        }
    }

    fn seen(id: &str, live: bool, worker: Option<u64>) -> SeenInstance {
        SeenInstance {
            id: id.to_string(),
            live,
            worker,
        }
    }

    #[test]
    fn reconciliation_terminates_strays_and_frees_vanished_workers() {
        let now = 1_000_000;
        let table = WorkerTable {
            workers: vec![
                record(1, "i-0000000000000001", now - 5_000),
                record(2, "i-0000000000000002", now - 5_000),
                // Launching, no handle yet: its instance is not a stray.
                WorkerRecord {
                    state: WorkerState::Launching,
                    ..record(3, "", now - 1_000)
                },
                // Just launched, not visible yet: not gone before the grace.
                record(4, "i-0000000000000004", now - 1_000),
                // Long missing: gone.
                record(5, "i-0000000000000005", now - 600_000),
                // A worker started by hand: never the launcher's business.
                WorkerRecord {
                    managed: false,
                    ..record(6, "pid:77", now - 600_000)
                },
            ],
            next_worker: 10,
            now,
        };
        let instances = [
            seen("i-0000000000000001", true, Some(1)),
            // Terminated behind the cluster's back.
            seen("i-0000000000000002", false, Some(2)),
            seen("i-0000000000000003", true, Some(3)),
            // Tagged for a slot that is not in the table any more.
            seen("i-00000000000000a7", true, Some(7)),
            // A second instance for slot 1.
            seen("i-00000000000000a1", true, Some(1)),
            // No worker id at all.
            seen("i-00000000000000ff", true, None),
            // A reservation newer than this view.
            seen("i-00000000000000aa", true, Some(12)),
            // Already terminated strays are left alone.
            seen("i-00000000000000bb", false, Some(8)),
        ];
        let plan = plan(&instances, &table, ABSENT_GRACE);
        assert_eq!(
            plan.strays,
            [
                "i-00000000000000a7",
                "i-00000000000000a1",
                "i-00000000000000ff"
            ]
        );
        assert_eq!(plan.gone, [WorkerId(2), WorkerId(5)]);
    }
}
