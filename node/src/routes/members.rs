//! Membership changes (admin credential): add a node (as a learner until it has caught up,
//! then as a voter) and remove one. Any node takes the request and hands it to the leader,
//! which alone may change the membership.
//!
//! A removal is refused when the voters left would hold no endpoint that answers, or no
//! majority of them answers: the cluster must keep serving after the change. A leader asked
//! to remove itself first hands leadership to an endpoint that has the whole log (it asks
//! that node to stand, `POST /internal/elect`, and votes for it: openraft 0.9 has no
//! leadership transfer), then the new leader removes it. If no heir wins within a few
//! election timeouts, it removes itself as leader: it keeps leading until the change is
//! committed, then steps down (openraft), and the others elect a new leader.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use hashq_proto::api::{AddMember, Members};
use hashq_proto::routes::admin::{MEMBER, MEMBERS};
use hashq_raft::NodeId;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};

use crate::config::{Peers, Role};
use crate::error::ApiError;
use crate::node::Node;

/// Longest a new node may take to catch up as a learner (a snapshot install included).
const CATCH_UP: Duration = Duration::from_secs(120);
/// Marks a request one node handed to the leader: it is never handed on again.
const FORWARDED: &str = "x-hashq-forwarded";

pub fn router() -> Router<Node> {
    Router::new()
        .route(MEMBERS, post(add))
        .route(MEMBER, delete(remove))
}

/// `POST /admin/members`.
async fn add(
    State(node): State<Node>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: AddMember = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            "invalid_body",
            format!("expected {{\"id\": N, \"addr\": \"HOST:PORT\"}}: {e}"),
        )
    })?;
    Peers::check_member(req.id, &req.addr)
        .map_err(|e| ApiError::invalid("invalid_member", e.to_string()))?;
    if let Some(answer) = on_leader(&node, &headers, Method::POST, MEMBERS, body).await? {
        return Ok(answer);
    }
    let membership = node.raft().metrics().borrow().membership_config.clone();
    let membership = membership.membership();
    if let Some(known) = membership.get_node(&req.id) {
        if known.addr != req.addr {
            return Err(ApiError::Conflict(format!(
                "node {} is a member at {}: remove it first, or add the new node with a new id",
                req.id, known.addr
            )));
        }
        if membership.voter_ids().any(|v| v == req.id) {
            return Ok(Json(members(&node)).into_response());
        }
    }
    // The new node must be up and be who it says: a typo must not add a stranger (or an
    // absent node, which would count against the majority).
    match node.probe_health(&req.addr).await {
        Some(h) if h.node == req.id => {
            let running = hashq_raft::machine::cluster_version(&node.reader().view())?;
            if h.cluster_version < running {
                return Err(ApiError::Conflict(format!(
                    "node {} runs cluster versions up to {}, and the cluster runs {running}: start it with a build that supports {running}",
                    req.id, h.cluster_version
                )));
            }
        }
        Some(h) => {
            return Err(ApiError::invalid(
                "invalid_member",
                format!("{} answers as node {}, not {}", req.addr, h.node, req.id),
            ))
        }
        None => {
            return Err(ApiError::Unavailable(format!(
                "node {} does not answer at {}: start it first (hashq node --id {} --join ...)",
                req.id, req.addr, req.id
            )))
        }
    }
    tracing::info!(id = req.id, addr = %req.addr, "adding a node: as a learner until it has caught up");
    let added = tokio::time::timeout(
        CATCH_UP,
        node.raft()
            .add_learner(req.id, BasicNode::new(req.addr.clone()), true),
    )
    .await
    .map_err(|_| {
        ApiError::Unavailable(format!(
            "node {} did not catch up within {CATCH_UP:?}; it stays a learner: retry to promote it",
            req.id
        ))
    })?;
    added.map_err(change_error)?;
    let voters = BTreeSet::from([req.id]);
    node.raft()
        .change_membership(ChangeMembers::AddVoterIds(voters), false)
        .await
        .map_err(change_error)?;
    tracing::info!(id = req.id, "node added as a voter");
    Ok(Json(members(&node)).into_response())
}

/// `DELETE /admin/members/{id}`.
async fn remove(
    State(node): State<Node>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: NodeId = id
        .parse()
        .map_err(|_| ApiError::invalid("invalid_node_id", format!("{id:?} is not a node id")))?;
    let path = MEMBER.replace("{id}", &id.to_string());
    if let Some(answer) = on_leader(&node, &headers, Method::DELETE, &path, Bytes::new()).await? {
        return Ok(answer);
    }
    let membership = node.raft().metrics().borrow().membership_config.clone();
    let membership = membership.membership();
    if membership.get_node(&id).is_none() {
        return Err(ApiError::NotFound(format!("node {id} is not a member")));
    }
    let ids = BTreeSet::from([id]);
    let change = if membership.voter_ids().any(|v| v == id) {
        let left: Vec<NodeId> = membership.voter_ids().filter(|v| *v != id).collect();
        refuse_unless_serving(&node, &left)?;
        if id == node.id() && step_down(&node).await {
            tracing::info!(id, "handed leadership over before being removed");
            if let Some(answer) =
                on_leader(&node, &headers, Method::DELETE, &path, Bytes::new()).await?
            {
                return Ok(answer);
            }
        }
        ChangeMembers::RemoveVoters(ids)
    } else {
        ChangeMembers::RemoveNodes(ids)
    };
    tracing::info!(id, "removing a node");
    node.raft()
        .change_membership(change, false)
        .await
        .map_err(change_error)?;
    Ok(Json(members(&node)).into_response())
}

/// Hands leadership to an endpoint that has the whole log, and waits (ten election timeouts
/// at most) until another node leads: whether one does.
async fn step_down(node: &Node) -> bool {
    let period = node.config().timing.election_timeout;
    let deadline = tokio::time::Instant::now() + period * 10;
    let mut metrics = node.raft().metrics();
    while tokio::time::Instant::now() < deadline {
        let m = metrics.borrow().clone();
        match (m.state, m.current_leader) {
            (ServerState::Leader, _) => {
                // Asked again each election timeout: the first asks may come while this
                // node's own leader lease still refuses the heir its vote.
                if let Some(heir) = crate::watch::heir(node, &m, &[]) {
                    crate::watch::ask_to_stand(node, heir, m.current_term).await;
                }
            }
            (_, Some(leader)) if leader != node.id() => return true,
            // An election is under way.
            _ => {}
        }
        let _ = tokio::time::timeout(period, metrics.changed()).await;
    }
    false
}

/// Refuses a change that would leave `voters` without an endpoint that answers, or without
/// a majority that answers.
fn refuse_unless_serving(node: &Node, voters: &[NodeId]) -> Result<(), ApiError> {
    // The voters that answer, with the role each says it has.
    let up: Vec<(NodeId, String)> = voters
        .iter()
        .filter_map(|&id| {
            let role = if id == node.id() {
                Some(node.config().role.as_str().to_string())
            } else {
                node.peer_health().get(id).map(|h| h.role)
            };
            role.map(|role| (id, role))
        })
        .collect();
    if !up.iter().any(|(_, role)| role == Role::Endpoint.as_str()) {
        return Err(ApiError::Conflict(format!(
            "refused: no endpoint that answers would be left among the voters {voters:?}"
        )));
    }
    if up.len() * 2 <= voters.len() {
        let up: Vec<NodeId> = up.iter().map(|(id, _)| *id).collect();
        return Err(ApiError::Conflict(format!(
            "refused: of the voters left {voters:?} only {up:?} answer, not a majority"
        )));
    }
    Ok(())
}

/// `None` on the leader; elsewhere the leader's answer to the same request.
async fn on_leader(
    node: &Node,
    headers: &HeaderMap,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<Option<Response>, ApiError> {
    let m = node.raft().metrics().borrow().clone();
    if m.state == ServerState::Leader {
        if node.is_witness() {
            return Err(ApiError::Unavailable(
                "the leader is a witness handing over to an endpoint; retry".into(),
            ));
        }
        return Ok(None);
    }
    let no_leader = |reason: &str| ApiError::NoLeader {
        reason: reason.into(),
    };
    if headers.contains_key(FORWARDED) {
        return Err(no_leader(
            "leadership moved while the request was handed on",
        ));
    }
    let Some((leader, addr)) = node.proposer().leader() else {
        return Err(no_leader(
            "an election is under way or a majority is unreachable",
        ));
    };
    let mut request = node
        .http()
        .request(method, node.peers().url(&addr, path))
        .header(FORWARDED, "1")
        .header(header::CONTENT_TYPE, "application/json")
        .timeout(CATCH_UP + Duration::from_secs(10))
        .body(body);
    if let Some(token) = node.config().credentials.admin.as_deref() {
        request = request.bearer_auth(token);
    }
    let answer = request.send().await.map_err(|e| {
        ApiError::Unavailable(format!("cannot reach the leader (node {leader}): {e}"))
    })?;
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let bytes = answer
        .bytes()
        .await
        .map_err(|e| ApiError::Unavailable(format!("the leader's answer was cut: {e}")))?;
    Ok(Some(
        (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
    ))
}

fn members(node: &Node) -> Members {
    let m = node.raft().metrics().borrow().membership_config.clone();
    let membership = m.membership();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    Members {
        learners: membership
            .learner_ids()
            .filter(|l| !voters.contains(l))
            .collect(),
        voters,
    }
}

fn change_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ApiError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => ApiError::NoLeader {
            reason: "leadership moved during the change; retry".into(),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ApiError::Conflict(format!("membership change refused: {e}"))
        }
        RaftError::Fatal(e) => ApiError::Unavailable(format!("raft stopped: {e}")),
    }
}
