//! The Raft RPC client: openraft's network over HTTP with postcard bodies.
//!
//! Each RPC is `POST http://<node addr>/raft/{append,vote,snapshot}` with the cluster token.
//! The answer is a postcard `Result<response, RaftError>`. Connection failures are reported as
//! `Unreachable`, so openraft backs off instead of hammering a dead peer; snapshots travel in
//! chunks read from the snapshot file (openraft's chunked transport), never as one buffer.

use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{codec, wire, NodeId, TypeConfig};

/// Raft RPC paths.
pub mod routes {
    pub const APPEND: &str = "/raft/append";
    pub const VOTE: &str = "/raft/vote";
    pub const SNAPSHOT: &str = "/raft/snapshot";
}

/// Builds connections to peers; shared by all of openraft's replication tasks.
#[derive(Clone)]
pub struct Network {
    client: reqwest::Client,
    token: Option<Arc<str>>,
}

impl Network {
    pub fn new(client: reqwest::Client, token: Option<Arc<str>>) -> Self {
        Network { client, token }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Connection {
        Connection {
            target,
            base: format!("http://{}", node.addr),
            client: self.client.clone(),
            token: self.token.clone(),
        }
    }
}

/// A connection to one peer (HTTP keep-alive underneath).
pub struct Connection {
    target: NodeId,
    base: String,
    client: reqwest::Client,
    token: Option<Arc<str>>,
}

/// Why an RPC did not get an answer from the peer's Raft.
enum CallError {
    Unreachable(reqwest::Error),
    Network(String),
}

impl Connection {
    async fn call<Req, Resp>(
        &self,
        path: &str,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let mut builder = self
            .client
            .post(format!("{}{}", self.base, path))
            .header(reqwest::header::CONTENT_TYPE, wire::POSTCARD)
            .timeout(option.hard_ttl())
            .body(codec::encode(request));
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        let response = builder.send().await.map_err(|e| {
            if e.is_connect() {
                CallError::Unreachable(e)
            } else {
                CallError::Network(e.to_string())
            }
        })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| CallError::Network(e.to_string()))?;
        if !status.is_success() {
            return Err(CallError::Network(format!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            )));
        }
        codec::decode("raft rpc answer", &body).map_err(|e| CallError::Network(e.to_string()))
    }

    async fn rpc<Req, Resp, E>(
        &self,
        path: &str,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        match self
            .call::<Req, Result<Resp, RaftError<NodeId, E>>>(path, request, option)
            .await
        {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            Err(CallError::Unreachable(e)) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(CallError::Network(message)) => Err(RPCError::Network(NetworkError::new(
                &std::io::Error::other(message),
            ))),
        }
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc(routes::APPEND, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc(routes::SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc(routes::VOTE, &rpc, &option).await
    }
}
