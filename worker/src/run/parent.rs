//! The parent checks of a session: locally the parent's `/health`
//! ([`parent_loop`]), on EC2 the parent's instance (`ec2_parent_loop`, by the `ec2`
//! module, in builds with the `ec2` feature). Either names a new parent in the session when the old one is gone; only
//! the EC2 check ends a session, when no endpoint instance of the cluster runs.

use std::sync::Arc;
use std::time::Duration;

use hashq_proto::NodeId;
use tracing::warn;

use super::{Session, Stop};
use crate::client::EndpointClient;
#[cfg(feature = "ec2")]
use crate::ec2::{self, Ec2ParentCheck, Verdict};

/// Failed checks in a row before the worker re-parents.
const PARENT_FAILURES: u32 = 2;

/// The parent check (local flavour): the parent's `/health` must answer. When
/// it has not for [`PARENT_FAILURES`] checks, the worker adopts the first live endpoint as its
/// parent and says so with its next heartbeat; the cluster keeps counting it once, under its
/// new parent. (A worker with no endpoint alive at all exits by the no-endpoint rule.)
pub(super) async fn parent_loop(
    client: Arc<EndpointClient>,
    session: Arc<Session>,
    members: Vec<(NodeId, String)>,
    every: Duration,
) -> Stop {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = (every / 2).min(Duration::from_secs(5));
    let mut failures = 0;
    loop {
        ticker.tick().await;
        let Some(parent) = session.parent() else {
            continue;
        };
        let Some((_, url)) = members.iter().find(|(id, _)| *id == parent) else {
            continue;
        };
        if client.healthy(url, timeout).await {
            failures = 0;
            continue;
        }
        failures += 1;
        if failures < PARENT_FAILURES {
            continue;
        }
        for (id, url) in members.iter().filter(|(id, _)| *id != parent) {
            if client.healthy(url, timeout).await {
                warn!(old = parent, new = id, "parent node is gone; re-parenting");
                session.set_parent(*id);
                failures = 0;
                break;
            }
        }
    }
}

#[cfg(feature = "ec2")]
/// The parent check on EC2 ([`crate::ec2`]): the parent's instance must be running. When it
/// is gone the worker names a running endpoint instance's node as its parent in its next
/// heartbeat; when no endpoint instance of the cluster runs, the session stops with
/// [`Stop::Orphaned`].
pub(super) async fn ec2_parent_loop(
    check: Arc<Ec2ParentCheck>,
    session: Arc<Session>,
    members: Vec<NodeId>,
    every: Duration,
) -> Stop {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(parent) = session.parent() else {
            continue;
        };
        let verdict = check.check(parent, &members, session.worker.0).await;
        ec2::log_verdict(parent, &verdict);
        match verdict {
            Verdict::Keep => {}
            Verdict::Reparent { node, .. } => session.set_parent(node),
            Verdict::Orphaned => return Stop::Orphaned,
        }
    }
}
