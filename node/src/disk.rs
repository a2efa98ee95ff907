//! The disk-free alarm, like RabbitMQ's `disk_free_limit` or etcd's `NOSPACE`.
//!
//! Every node checks the free space of its data dir's file system once a second. Below
//! `--disk-free-limit` it raises its alarm through Raft (`Request::DiskAlarm`), and while any
//! node's alarm is up the state machine refuses enqueues (507, `disk_full`); pulls,
//! completions, leases and reads go on, so the backlog drains and frees space. The alarm is
//! cleared the same way once the node has 10 % more than the limit free again. Deciding in
//! the state machine means every node refuses the same enqueues, whichever node they
//! arrive at, and a full follower is protected from writes it would have to store.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hashq_raft::command::Request;
use hashq_raft::machine;

use crate::http::RateLimitedLog;
use crate::node::Node;

/// Free bytes (for an unprivileged user) on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `stat` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

pub async fn watch(node: Node) {
    let limit = node.config().limits.disk_free_limit;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed = RateLimitedLog::new(Duration::from_secs(30));
    loop {
        ticker.tick().await;
        let Some(free) = free_bytes(&node.config().data_dir) else {
            continue;
        };
        node.disk().free_bytes.store(free, Ordering::Relaxed);
        let was_low = node.disk().low.load(Ordering::Relaxed);
        let low = if was_low {
            free < limit.saturating_add(limit / 10)
        } else {
            free < limit
        };
        node.disk().low.store(low, Ordering::Relaxed);
        let raised = match machine::read_meta(&node.reader().view()) {
            Ok(meta) => meta.disk_alarms.contains(&node.id()),
            Err(_) => continue,
        };
        if low == raised {
            continue;
        }
        if low {
            tracing::error!(
                free,
                limit,
                "disk below its free-space limit: raising the alarm (the cluster refuses enqueues)"
            );
        } else {
            tracing::warn!(free, limit, "disk space is back: clearing the alarm");
        }
        let request = Request::DiskAlarm {
            node: node.id(),
            low,
        };
        if let Err(e) = node.proposer().submit(request).await {
            failed.warn(|n| tracing::warn!(error = %e, suppressed = n, "could not change the disk alarm yet"));
        }
    }
}
