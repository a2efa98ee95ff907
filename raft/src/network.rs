//! The Raft RPC client: openraft's network over HTTP with postcard bodies.
//!
//! Each RPC is `POST http(s)://<node addr>/raft/{append,vote}` with the peer credential; the
//! answer is a postcard `Result<response, RaftError>`. A snapshot is one streaming `POST
//! /raft/snapshot`: a [`SnapshotHeader`] (the leader's vote and the snapshot's metadata),
//! then the snapshot file as it is on disk, never held in memory; the receiver verifies the
//! whole file before it installs it. Connection failures and refusals (any answer that is not
//! a 2xx: a peer whose gate refuses the message, a wrong credential, a node that is not the
//! one the leader thinks it is) are reported as `Unreachable`, so openraft backs off (500 ms)
//! instead of resending at once: a refusal comes back within a millisecond, and openraft
//! resends on a `NetworkError` without a pause, which once made a leader send some 60,000
//! refused appends a minute and starve the machine. Nothing here is ever reported to
//! openraft as a storage error (that would stop the leader).

use std::sync::Arc;

use std::future::Future;
use std::time::Duration;

use openraft::error::{
    Fatal, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, Snapshot, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

use hashq_proto::codec::{POSTCARD, SNAPSHOT_STREAM};
use hashq_proto::routes::raft as routes;

use crate::{codec, NodeId, SnapshotMeta, TypeConfig};

/// What precedes a snapshot file on the wire: `u32` length (little-endian), then this in
/// postcard.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct SnapshotHeader {
    pub vote: Vote<NodeId>,
    pub meta: SnapshotMeta,
}

/// The receiver's answer to a snapshot: installed (with its vote), or why not.
pub type SnapshotAnswer = Result<SnapshotResponse<NodeId>, String>;

/// How a node reaches its peers: one HTTP client (which presents this node's certificate
/// when the cluster runs TLS), the scheme, and the peer credential. Every node-to-node call
/// goes through it, so none can forget the scheme or the credential.
#[derive(Clone)]
pub struct Peers {
    client: reqwest::Client,
    scheme: &'static str,
    token: Option<Arc<str>>,
}

/// The URL scheme of a cluster with (`https`) or without TLS.
pub fn scheme(tls: bool) -> &'static str {
    if tls {
        "https"
    } else {
        "http"
    }
}

impl Peers {
    pub fn new(client: reqwest::Client, tls: bool, token: Option<Arc<str>>) -> Self {
        Peers {
            client,
            scheme: scheme(tls),
            token,
        }
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// `path` on the node at `addr` (`host:port`).
    pub fn url(&self, addr: &str, path: &str) -> String {
        format!("{}://{addr}{path}", self.scheme)
    }

    /// A call to a node-to-node route of the node at `addr`, with the peer credential.
    pub fn request(
        &self,
        method: reqwest::Method,
        addr: &str,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let request = self.client.request(method, self.url(addr, path));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }
}

/// Builds connections to peers; shared by all of openraft's replication tasks.
#[derive(Clone)]
pub struct Network {
    peers: Peers,
}

impl Network {
    pub fn new(peers: Peers) -> Self {
        Network { peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Connection {
        Connection {
            target,
            addr: node.addr.clone(),
            peers: self.peers.clone(),
        }
    }
}

/// A connection to one peer (HTTP keep-alive underneath).
pub struct Connection {
    target: NodeId,
    addr: String,
    peers: Peers,
}

/// Why an RPC did not get an answer from the peer's Raft.
enum CallError {
    Unreachable(reqwest::Error),
    /// The peer answered, but not with a 2xx: resending at once would get the same answer.
    Refused(String),
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
        let response = self
            .peers
            .request(reqwest::Method::POST, &self.addr, path)
            .header(reqwest::header::CONTENT_TYPE, POSTCARD)
            .timeout(option.hard_ttl())
            .body(codec::encode(request))
            .send()
            .await
            .map_err(|e| {
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
            return Err(CallError::Refused(refusal(path, status, &body)));
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
            Err(CallError::Refused(message)) => Err(RPCError::Unreachable(unreachable(message))),
            Err(CallError::Network(message)) => Err(RPCError::Network(network_error(message))),
        }
    }
}

/// What a peer's non-2xx answer to `path` says, its body cut to 300 bytes.
fn refusal(path: &str, status: reqwest::StatusCode, body: &[u8]) -> String {
    format!(
        "{path} answered {status}: {}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    )
}

/// A refusal as openraft's `Unreachable`, which it backs off from (see the module doc).
fn unreachable(message: String) -> Unreachable {
    Unreachable::new(&std::io::Error::other(message))
}

fn network_error(message: impl Into<String>) -> NetworkError {
    NetworkError::new(&std::io::Error::other(message.into()))
}

impl Connection {
    async fn send_snapshot(
        &self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let path = &snapshot.snapshot.path;
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| network_error(format!("{}: {e}", path.display())))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| network_error(format!("{}: {e}", path.display())))?
            .len();
        let header = codec::encode(&SnapshotHeader {
            vote,
            meta: snapshot.meta.clone(),
        });
        let mut prefix = (header.len() as u32).to_le_bytes().to_vec();
        prefix.extend_from_slice(&header);
        let prefix = futures::stream::once(async move { Ok(bytes::Bytes::from(prefix)) });
        let body = futures::StreamExt::chain(
            prefix,
            tokio_util::io::ReaderStream::with_capacity(file, 1 << 20),
        );
        let payloads = snapshot.snapshot.payloads.clone();
        // Time for the whole transfer at a modest 10 MB/s, beyond openraft's per-RPC timeout.
        let size = size + payloads.as_ref().map_or(0, |p| p.size_hint());
        let body = futures::StreamExt::chain(body, payload_stream(payloads));
        let timeout = option.hard_ttl() + Duration::from_secs(size / (10 << 20) + 30);
        let response = self
            .peers
            .request(reqwest::Method::POST, &self.addr, routes::SNAPSHOT)
            .header(reqwest::header::CONTENT_TYPE, SNAPSHOT_STREAM)
            .timeout(timeout)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    StreamingError::Unreachable(Unreachable::new(&e))
                } else {
                    StreamingError::Network(network_error(e.to_string()))
                }
            })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| network_error(e.to_string()))?;
        if !status.is_success() {
            return Err(StreamingError::Unreachable(unreachable(refusal(
                routes::SNAPSHOT,
                status,
                &body,
            ))));
        }
        let answer: SnapshotAnswer =
            codec::decode("snapshot answer", &body).map_err(|e| network_error(e.to_string()))?;
        answer.map_err(|e| {
            StreamingError::Network(network_error(format!("snapshot not installed: {e}")))
        })
    }
}

/// The payload section of a snapshot as a stream: written on a blocking thread into a bounded
/// channel, 1 MiB at a time (empty when there is none).
fn payload_stream(
    section: Option<std::sync::Arc<dyn crate::PayloadSection>>,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    if let Some(section) = section {
        tokio::task::spawn_blocking(move || {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, ChannelWriter(tx.clone()));
            let result = section
                .write_to(&mut out)
                .and_then(|()| std::io::Write::flush(&mut out));
            if let Err(e) = result {
                if !tx.is_closed() {
                    tracing::error!(error = %e, "cannot send a snapshot's payloads");
                    let _ = tx.blocking_send(Err(e));
                }
            }
        });
    }
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// Sends what is written to it down a channel, as one chunk per write.
struct ChannelWriter(tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(bytes::Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::other("the snapshot transfer ended"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        if let Some(fit) = entries_that_fit(&rpc.entries, MAX_APPEND_BYTES) {
            // openraft sends fewer entries at once (a batch enqueue's entry can be tens of
            // MiB, and up to 8 of them could outgrow the peer routes' body limit).
            return Err(PayloadTooLarge::new_entries_hint(fit).into());
        }
        self.rpc(routes::APPEND, &rpc, &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            sent = self.send_snapshot(vote, snapshot, option) => sent,
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc(routes::VOTE, &rpc, &option).await
    }
}

/// Most bytes of entries one append sends when it has more than one (a single entry goes
/// alone whatever its size).
pub const MAX_APPEND_BYTES: usize = 8 << 20;

/// How many of `entries` fit in `max` bytes (at least one), when not all of them do.
fn entries_that_fit(entries: &[crate::Entry], max: usize) -> Option<u64> {
    let mut total = 0;
    for (n, entry) in entries.iter().enumerate() {
        total += match &entry.payload {
            openraft::EntryPayload::Normal(c) => c.size_hint(),
            _ => 256,
        };
        if total > max && entries.len() > 1 {
            return Some(n.max(1) as u64);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, Request, StoreLimits};

    fn entry(index: u64, payload_len: usize) -> crate::Entry {
        crate::Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: openraft::EntryPayload::Normal(Command {
                now: 0,
                mono: 0,
                limits: StoreLimits::UNLIMITED,
                requests: vec![Request::Enqueue {
                    iterations: 1,
                    payload: bytes::Bytes::from(vec![0u8; payload_len]),
                    dedup: None,
                }],
            }),
        }
    }

    /// A peer that answers 400 to every RPC, the way a node answers a message its gate
    /// refuses: its address.
    async fn refusing_peer() -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    // Read the whole request (head and body) before answering, so that
                    // closing the connection does not reset it.
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length = text
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            if request.len() >= end + 4 + length {
                                break;
                            }
                        }
                    }
                    let body = r#"{"error":{"code":"invalid_raft_request","message":"no"}}"#;
                    let answer = format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\n\
                         connection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_refused_rpc_is_reported_unreachable_so_openraft_backs_off() {
        let addr = refusing_peer().await;
        let mut connection = Connection {
            target: 2,
            addr,
            peers: Peers::new(reqwest::Client::new(), false, Some("secret".into())),
        };
        let option = RPCOption::new(Duration::from_secs(5));
        let vote = VoteRequest::new(Vote::new(3, 1), None);
        let err = connection.vote(vote, option.clone()).await.unwrap_err();
        assert!(
            matches!(&err, RPCError::Unreachable(u) if u.to_string().contains("400")),
            "a refused vote: {err}"
        );
        let append = AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        };
        let err = connection.append_entries(append, option).await.unwrap_err();
        assert!(
            matches!(&err, RPCError::Unreachable(u) if u.to_string().contains("400")),
            "a refused append: {err}"
        );
    }

    #[test]
    fn an_append_of_large_entries_is_cut_to_what_fits_and_one_entry_goes_alone() {
        let mib = 1 << 20;
        let small: Vec<_> = (1..=8).map(|i| entry(i, mib / 2)).collect();
        assert_eq!(entries_that_fit(&small, 8 * mib), None);
        let large: Vec<_> = (1..=8).map(|i| entry(i, 3 * mib)).collect();
        assert_eq!(entries_that_fit(&large, 8 * mib), Some(2));
        let huge = vec![entry(1, 40 * mib), entry(2, 1)];
        assert_eq!(entries_that_fit(&huge, 8 * mib), Some(1));
        assert_eq!(entries_that_fit(&huge[..1], 8 * mib), None);
    }
}
