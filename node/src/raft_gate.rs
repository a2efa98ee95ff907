//! Raft RPCs are checked here before openraft sees them.
//!
//! openraft 0.9.25 trusts its peers: a well-formed but impossible message (one that no correct
//! leader or candidate ever sends) can make it panic or exit on a fatal error. Found by
//! fuzzing and by reading its source: an append whose log ids have a higher leader at a lower
//! index than this node's committed entry makes the committed index move back, and applying
//! the reversed range indexes an empty vector (`core/raft_core.rs:761`); entries with gaps or
//! decreasing indexes, a term of `u64::MAX`, a committed vote in a vote request, a vote that
//! names this node, a snapshot id with a path in it, and commit points inconsistent with what
//! the same leader sent before each crash it, corrupt it or make it a leader without an
//! election. The peer credential keeps strangers out; these checks keep a bad peer message
//! (a bug, a replay, a holder of the credential) from doing any of that.
//!
//! Every rule holds for every message a correct openraft 0.9.25 node sends (the reasoning is
//! beside each rule), so refusing the others never stalls a healthy cluster:
//! - **shape** ([`check_append`], [`check_vote`], [`check_snapshot`]): a leader's vote is
//!   committed and a candidate's is not; neither names this node; terms and indexes stay
//!   below 2^48; entries are consecutive from `prev_log_id`; along `prev_log_id`, the entries
//!   and `leader_commit`, a lower index never has a higher leader; no log id has a leader
//!   above the vote's; the log id at index 0 is the one `initialize` writes.
//! - **consistency with what this node knows** ([`Gate`]): its committed log id is in every
//!   valid leader's log (leader completeness), so every log id of a message must be
//!   consistent with it; and the log ids a leader sends are all from one log, so its
//!   `leader_commit` must be consistent with what it had this node accept before. Appends and
//!   snapshots are serialized, so the committed log id cannot move between the check and the
//!   delivery; a leader or candidate that receives a higher vote is first stepped down with a
//!   vote-only append, then the message is checked against its state after that.
//!
//! What stays reachable: a holder of the peer credential can still forge a consistent
//! leader (a copy of the current leader's vote) and rewrite entries that are not committed.
//! Binding a vote to the sender needs per-node credentials (mutual TLS).

use std::cmp::Ordering;

use hashq_raft::{LogId, NodeId, TypeConfig};
use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::{CommittedLeaderId, LeaderId, ServerState, Vote};

use crate::error::ApiError;

/// Terms and indexes at or above this are refused: terms grow by one per election and
/// indexes by one per entry, so a correct cluster never gets near it, while `u64::MAX` makes
/// openraft's `term + 1` overflow.
pub const MAX_TERM_OR_INDEX: u64 = 1 << 48;

fn refuse(message: impl Into<String>) -> ApiError {
    ApiError::invalid("invalid_raft_request", message)
}

/// Whether two log ids can both be in one valid log: along a log, a higher index never has a
/// lower leader, and one index holds one log id.
pub fn consistent(a: &LogId, b: &LogId) -> bool {
    match a.index.cmp(&b.index) {
        Ordering::Less => a.leader_id <= b.leader_id,
        Ordering::Equal => a == b,
        Ordering::Greater => a.leader_id >= b.leader_id,
    }
}

fn check_log_id(what: &str, id: &LogId, vote: &Vote<NodeId>) -> Result<(), ApiError> {
    if id.leader_id.term >= MAX_TERM_OR_INDEX || id.index >= MAX_TERM_OR_INDEX {
        return Err(refuse(format!("{what} {id} is out of range")));
    }
    if id.index == 0 && *id != LogId::new(CommittedLeaderId::new(0, 0), 0) {
        return Err(refuse(format!(
            "{what} {id}: index 0 holds the entry `initialize` writes"
        )));
    }
    if id.leader_id > vote.leader_id {
        return Err(refuse(format!(
            "{what} {id} has a leader above the vote {}",
            vote.leader_id
        )));
    }
    Ok(())
}

fn check_vote_itself(vote: &Vote<NodeId>, me: NodeId) -> Result<(), ApiError> {
    if vote.leader_id.term >= MAX_TERM_OR_INDEX {
        return Err(refuse("the vote's term is out of range"));
    }
    if vote.leader_id.node_id == me {
        return Err(refuse("a vote naming this node comes only from this node"));
    }
    Ok(())
}

/// The log ids an append carries, in index order: `prev_log_id`, then the entries'.
fn carried(req: &AppendEntriesRequest<TypeConfig>) -> Vec<LogId> {
    req.prev_log_id
        .iter()
        .copied()
        .chain(req.entries.iter().map(|e| e.log_id))
        .collect()
}

/// Whether `x` is consistent with every log id of `ids`, a run of consecutive, consistent
/// log ids: only its neighbour (or the same index) needs a look.
fn consistent_with_run(ids: &[LogId], x: &LogId) -> bool {
    let (Some(first), Some(last)) = (ids.first(), ids.last()) else {
        return true;
    };
    if x.index < first.index {
        consistent(x, first)
    } else if x.index > last.index {
        consistent(x, last)
    } else {
        ids[(x.index - first.index) as usize] == *x
    }
}

/// The stateless checks of an append (see the module doc).
pub fn check_append(req: &AppendEntriesRequest<TypeConfig>, me: NodeId) -> Result<(), ApiError> {
    let vote = &req.vote;
    check_vote_itself(vote, me)?;
    if !vote.committed {
        return Err(refuse("a leader's vote is committed"));
    }
    let ids = carried(req);
    for id in &ids {
        check_log_id("log id", id, vote)?;
    }
    let first = req.prev_log_id.map_or(0, |p| p.index + 1);
    for (i, entry) in req.entries.iter().enumerate() {
        if entry.log_id.index != first + i as u64 {
            return Err(refuse(format!(
                "entry {} is not consecutive from prev_log_id (expected index {})",
                entry.log_id,
                first + i as u64
            )));
        }
    }
    if let Some(pair) = ids.windows(2).find(|w| w[0].leader_id > w[1].leader_id) {
        return Err(refuse(format!(
            "log id {} follows {}, whose leader is higher",
            pair[1], pair[0]
        )));
    }
    if let Some(commit) = &req.leader_commit {
        check_log_id("leader_commit", commit, vote)?;
        if !consistent_with_run(&ids, commit) {
            return Err(refuse(format!(
                "leader_commit {commit} is not in the log the entries come from"
            )));
        }
    }
    Ok(())
}

/// The stateless checks of a vote request.
pub fn check_vote(req: &VoteRequest<NodeId>, me: NodeId) -> Result<(), ApiError> {
    check_vote_itself(&req.vote, me)?;
    if req.vote.committed {
        return Err(refuse("a candidate's vote is not committed"));
    }
    if let Some(last) = &req.last_log_id {
        check_log_id("last_log_id", last, &req.vote)?;
    }
    Ok(())
}

/// Whether `id` is a snapshot id this code base makes: `<term>-<index>-<hex>-<n>`, with the
/// term and index of `last`. It names files, so nothing else may pass.
pub fn snapshot_id_ok(id: &str, last: Option<&LogId>) -> bool {
    let parts: Vec<&str> = id.split('-').collect();
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    let hex = |s: &str| !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let [term, index, unique, n] = parts.as_slice() else {
        return false;
    };
    if !(digits(term) && digits(index) && hex(unique) && digits(n)) {
        return false;
    }
    let (t, i) = last.map_or((0, 0), |l| (l.leader_id.term, l.index));
    term.parse() == Ok(t) && index.parse() == Ok(i)
}

/// The stateless checks of a snapshot's header.
pub fn check_snapshot(
    vote: &Vote<NodeId>,
    meta: &hashq_raft::SnapshotMeta,
    me: NodeId,
) -> Result<(), ApiError> {
    check_vote_itself(vote, me)?;
    if !vote.committed {
        return Err(refuse("a leader's vote is committed"));
    }
    let Some(last) = &meta.last_log_id else {
        return Err(refuse(
            "a leader sends a snapshot only of something it purged",
        ));
    };
    check_log_id("snapshot last_log_id", last, vote)?;
    if !snapshot_id_ok(&meta.snapshot_id, Some(last)) {
        return Err(refuse("malformed snapshot id"));
    }
    Ok(())
}

/// What the gate remembers between messages.
#[derive(Default)]
struct Memory {
    /// The leader of the last accepted append and the highest log id it had accepted.
    accepted: Option<(LeaderId<NodeId>, LogId)>,
}

/// The stateful half of the checks, and the serialization of appends and snapshots.
#[derive(Default)]
pub struct Gate {
    memory: tokio::sync::Mutex<Memory>,
}

/// What this node's Raft state says, for the checks.
struct Local {
    vote: Vote<NodeId>,
    committed: Option<LogId>,
    state: ServerState,
}

async fn read_local(raft: &hashq_raft::Raft) -> Result<Local, ApiError> {
    raft.with_raft_state(|s| Local {
        vote: *s.vote_ref(),
        committed: s.committed,
        state: s.server_state,
    })
    .await
    .map_err(|e| ApiError::Unavailable(format!("raft stopped: {e}")))
}

/// Steps a leader or candidate down to a higher vote before the message itself is checked:
/// that is the one change to this node's state a higher vote may make before the log ids are
/// compared with its committed entry.
async fn step_down_first(
    raft: &hashq_raft::Raft,
    vote: Vote<NodeId>,
    local: Local,
) -> Result<Local, ApiError> {
    if local.state == ServerState::Follower || local.state == ServerState::Learner {
        return Ok(local);
    }
    if vote.partial_cmp(&local.vote) != Some(Ordering::Greater) {
        return Ok(local);
    }
    let vote_only = AppendEntriesRequest {
        vote,
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    let _ = raft.append_entries(vote_only).await;
    read_local(raft).await
}

impl Gate {
    /// Checks and delivers an append.
    pub async fn append(
        &self,
        raft: &hashq_raft::Raft,
        me: NodeId,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> Result<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>, ApiError> {
        check_append(&req, me)?;
        let mut memory = self.memory.lock().await;
        let local = step_down_first(raft, req.vote, read_local(raft).await?).await?;
        let ids = carried(&req);
        if let Some(k) = &local.committed {
            if !consistent_with_run(&ids, k)
                || req.leader_commit.is_some_and(|c| !consistent(&c, k))
            {
                return Err(refuse(format!(
                    "the message contradicts this node's committed entry {k}"
                )));
            }
        }
        if let (Some((leader, point)), Some(commit)) = (&memory.accepted, &req.leader_commit) {
            if *leader == req.vote.leader_id && !consistent(commit, point) {
                return Err(refuse(format!(
                    "leader_commit {commit} contradicts {point}, which the same leader sent before"
                )));
            }
        }
        let answer = raft.append_entries(req.clone()).await;
        if let Ok(AppendEntriesResponse::Success) = &answer {
            let reached = ids.last().copied();
            if let Some(reached) = reached {
                let newer = match &memory.accepted {
                    Some((leader, point)) if *leader == req.vote.leader_id => reached > *point,
                    _ => true,
                };
                if newer {
                    memory.accepted = Some((req.vote.leader_id, reached));
                }
            }
        }
        Ok(answer)
    }

    /// Checks and delivers a vote request (not serialized: votes do not move the log).
    pub async fn vote(
        &self,
        raft: &hashq_raft::Raft,
        me: NodeId,
        req: VoteRequest<NodeId>,
    ) -> Result<Result<VoteResponse<NodeId>, RaftError<NodeId>>, ApiError> {
        check_vote(&req, me)?;
        Ok(raft.vote(req).await)
    }

    /// Delivers a received and verified snapshot, once its last log id agrees with this
    /// node's committed entry.
    pub async fn install(
        &self,
        raft: &hashq_raft::Raft,
        vote: Vote<NodeId>,
        snapshot: openraft::Snapshot<TypeConfig>,
    ) -> Result<hashq_raft::network::SnapshotAnswer, ApiError> {
        let _memory = self.memory.lock().await;
        let local = step_down_first(raft, vote, read_local(raft).await?).await?;
        if let (Some(k), Some(last)) = (&local.committed, &snapshot.meta.last_log_id) {
            if !consistent(last, k) {
                return Err(refuse(format!(
                    "the snapshot's last log id {last} contradicts this node's committed entry {k}"
                )));
            }
        }
        Ok(raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use hashq_raft::command::{Command, StoreLimits};
    use hashq_raft::Entry;
    use openraft::EntryPayload;

    use super::*;

    fn id(term: u64, node: NodeId, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, node), index)
    }

    fn vote(term: u64, node: NodeId, committed: bool) -> Vote<NodeId> {
        let mut v = Vote::new(term, node);
        v.committed = committed;
        v
    }

    fn entry(log_id: LogId) -> Entry {
        Entry {
            log_id,
            payload: EntryPayload::Normal(Command {
                now: 0,
                mono: 0,
                limits: StoreLimits::UNLIMITED,
                requests: Vec::new(),
            }),
        }
    }

    fn append(
        v: Vote<NodeId>,
        prev: Option<LogId>,
        entries: &[LogId],
        commit: Option<LogId>,
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: v,
            prev_log_id: prev,
            entries: entries.iter().copied().map(entry).collect(),
            leader_commit: commit,
        }
    }

    #[test]
    fn what_a_correct_leader_sends_passes() {
        let v = vote(5, 2, true);
        // Heartbeat with a commit point far beyond what it carries (a lagging follower).
        check_append(&append(v, Some(id(3, 1, 40)), &[], Some(id(5, 2, 90))), 1).unwrap();
        // Replication from the very start.
        check_append(
            &append(
                v,
                None,
                &[id(0, 0, 0), id(1, 1, 1), id(1, 1, 2)],
                Some(id(1, 1, 2)),
            ),
            1,
        )
        .unwrap();
        // Entries of older leaders followed by the leader's own.
        check_append(
            &append(v, Some(id(1, 1, 9)), &[id(3, 3, 10), id(5, 2, 11)], None),
            1,
        )
        .unwrap();
        let candidate = VoteRequest::new(vote(6, 3, false), Some(id(5, 2, 11)));
        check_vote(&candidate, 1).unwrap();
    }

    #[test]
    fn impossible_appends_are_refused() {
        let v = vote(5, 2, true);
        let bad = [
            // The probe that crashed every node: a higher leader at index 0.
            append(v, Some(id(5, 2, 0)), &[], Some(id(5, 2, 0))),
            // An uncommitted vote, a vote naming this node, a term about to overflow.
            append(vote(5, 2, false), None, &[], None),
            append(vote(5, 1, true), None, &[], None),
            append(vote(u64::MAX, 2, true), None, &[], None),
            // Gaps, a start that is not prev + 1, decreasing indexes.
            append(v, Some(id(5, 2, 3)), &[id(5, 2, 4), id(5, 2, 6)], None),
            append(v, None, &[id(5, 2, 7)], Some(id(5, 2, 7))),
            append(v, Some(id(5, 2, 3)), &[id(5, 2, 4), id(5, 2, 2)], None),
            // A lower leader after a higher one, a leader above the vote.
            append(v, Some(id(5, 2, 3)), &[id(4, 1, 4)], None),
            append(v, Some(id(9, 9, 3)), &[], None),
            // A commit point that cannot be in the log the entries come from.
            append(v, Some(id(5, 2, 3)), &[id(5, 2, 4)], Some(id(5, 1, 4))),
            append(v, Some(id(5, 2, 3)), &[id(5, 2, 4)], Some(id(4, 1, 9))),
        ];
        for req in bad {
            assert!(check_append(&req, 1).is_err(), "{req:?}");
        }
        for req in [
            VoteRequest::new(vote(6, 3, true), None),
            VoteRequest::new(vote(6, 1, false), None),
            VoteRequest::new(vote(u64::MAX, 3, false), None),
            VoteRequest::new(vote(6, 3, false), Some(id(7, 3, 4))),
        ] {
            assert!(check_vote(&req, 1).is_err(), "{req:?}");
        }
    }

    #[test]
    fn consistency_is_what_one_log_allows() {
        let k = id(3, 1, 50);
        assert!(consistent(&id(2, 2, 10), &k));
        assert!(consistent(&id(3, 1, 50), &k));
        assert!(consistent(&id(5, 2, 60), &k));
        assert!(!consistent(&id(5, 2, 0), &k), "the known crash");
        assert!(!consistent(&id(3, 2, 50), &k));
        assert!(!consistent(&id(2, 2, 60), &k));
        let run = [id(3, 1, 49), id(3, 1, 50), id(4, 2, 51)];
        assert!(consistent_with_run(&run, &k));
        assert!(!consistent_with_run(&run, &id(4, 2, 50)));
        assert!(consistent_with_run(&[], &k));
    }

    #[test]
    fn snapshot_ids_name_no_path() {
        let last = id(3, 1, 50);
        assert!(snapshot_id_ok("3-50-18b2c9f0a1-7", Some(&last)));
        assert!(!snapshot_id_ok("3-51-18b2c9f0a1-7", Some(&last)));
        assert!(!snapshot_id_ok("../../x", Some(&last)));
        assert!(!snapshot_id_ok("3-50-../x-7", Some(&last)));
        assert!(!snapshot_id_ok("3-50-abc", Some(&last)));
    }
}
