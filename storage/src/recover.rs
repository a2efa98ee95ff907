//! Offline recovery when a majority is lost for good (`hashq recover`, like etcd's
//! `--force-new-cluster`): one surviving node's data dir becomes a one-voter cluster.
//!
//! The node must be stopped. Its log gets one more entry, in a term above any it has seen,
//! naming this node the only voter; the vote file moves to that term. When the node starts it
//! is the only voter of the latest membership, elects itself at once and commits that entry
//! with everything before it, entries the old cluster never committed included (choose the
//! most complete survivor: its log is all there will be). Then grow the cluster again with
//! `hashq cluster add`. The other old members must never run again with their old data.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use hashq_raft::{Entry, LogId, NodeId};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, Membership, Vote};

use crate::StoreError;

/// What [`force_new_cluster`] did.
#[derive(Debug)]
pub struct Recovered {
    /// The membership entry that makes this node the only voter.
    pub at: LogId,
    /// The members the node had before.
    pub previous: Vec<NodeId>,
}

/// Makes the (stopped) node `id` of `dir`, reached at `addr`, the only voter of its cluster.
pub async fn force_new_cluster(
    dir: &Path,
    id: NodeId,
    addr: &str,
) -> Result<Recovered, StoreError> {
    let opened = crate::open(dir, &crate::StoreOptions::default())?;
    let log = opened.log;
    let last = log.last_log_id();
    let view = opened.sm.reader().view();
    let unreadable = |e: hashq_raft::kv::KvError| StoreError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(format!("the state machine: {e}")),
    };
    let applied = crate::sm::read_last_applied(&view).map_err(unreadable)?;
    let previous = crate::sm::read_membership(&view)
        .map_err(unreadable)?
        .membership()
        .nodes()
        .map(|(n, _)| *n)
        .collect();
    let seen = [
        log.vote().map(|v| v.leader_id().term),
        last.map(|l| l.leader_id.term),
        applied.map(|l| l.leader_id.term),
    ];
    let term = seen.into_iter().flatten().max().unwrap_or(0) + 1;
    let index = last.max(applied).map_or(1, |l| l.index + 1);
    let at = LogId::new(CommittedLeaderId::new(term, id), index);
    let membership = Membership::new(
        vec![BTreeSet::from([id])],
        BTreeMap::from([(id, BasicNode::new(addr))]),
    );
    let mut log = log;
    // The vote first: a log entry of a term above the vote would not be readable.
    log.keep_vote(Vote::new(term, id))?;
    log.append_entries(vec![Entry {
        log_id: at,
        payload: EntryPayload::Membership(membership),
    }])
    .await?;
    Ok(Recovered { at, previous })
}
