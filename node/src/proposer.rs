//! Getting requests into the Raft log: batching, leader forwarding and safe retries.
//!
//! Every request a node accepts goes through [`Proposer::submit`]. On the leader, concurrent
//! requests are gathered into one [`Command`] (one log entry, one replication round, one flush)
//! while earlier batches are still in flight; on a follower they are gathered the same way and
//! sent to the leader's `/internal/propose` in one call. Requests that change the queue carry
//! an idempotency key (the client's, or one the node makes up), so a request whose outcome is
//! unknown (leader change, timeout) is retried until the deadline without ever applying twice.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hashq_proto::codec::POSTCARD;
use hashq_proto::routes::internal::PROPOSE;
use hashq_raft::command::{BatchSlot, Command, Request, Response, StoreLimits};
use hashq_raft::kv::KvRead;
use hashq_raft::network::Peers;
use hashq_raft::{codec, machine, NodeId, Raft};
use hashq_storage::SmReader;
use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::config::Batching;
use crate::error::ApiError;
use crate::tasks::Tasks;

/// The answer to one request, with what the leader attaches after apply: the payloads of
/// leased items, in the order of `Response::Leased::items`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub response: Response,
    pub payloads: Vec<Bytes>,
}

/// A test-only shift of this process's wall clock, in milliseconds (see
/// [`follow_clock_offset_file`]).
static CLOCK_OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// The current time in milliseconds since the Unix epoch: the `now` a leader stamps.
pub fn now_ms() -> u64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    wall.saturating_add(CLOCK_OFFSET_MS.load(Ordering::Relaxed))
        .max(0) as u64
}

/// Milliseconds on this process's monotonic clock: the `mono` a leader stamps, from which
/// state-machine time advances within its term.
pub fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// For tests of clock skew: keeps this process's wall clock shifted by the number of
/// milliseconds written in `path` (re-read every 100 ms; a missing file means no shift).
pub async fn follow_clock_offset_file(path: std::path::PathBuf) {
    loop {
        let offset = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .unwrap_or(0);
        if CLOCK_OFFSET_MS.swap(offset, Ordering::Relaxed) != offset {
            tracing::warn!(offset_ms = offset, "test clock offset changed");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Pending {
    request: Request,
    /// The answer, with the slot the request was given in its batch if the batcher stamped
    /// one: a retry must carry it.
    reply: oneshot::Sender<(Result<Reply, ApiError>, Option<BatchSlot>)>,
}

/// Where a batch goes.
#[derive(Clone, Copy)]
enum Sink {
    /// This node is the leader: propose.
    Local,
    /// Send to the leader.
    Forward,
}

struct Shared {
    links: Links,
    options: ProposerOptions,
    /// `mono_ms()` when this node last proposed an entry as leader.
    last_proposed: std::sync::atomic::AtomicU64,
}

/// What the proposer proposes through: this node's Raft, its state machine (to read the
/// outcomes) and the HTTP client and credential it forwards to the leader with.
pub struct Links {
    pub id: NodeId,
    pub raft: Raft,
    pub reader: SmReader,
    pub peers: Peers,
}

/// How the proposer batches and what it stamps on the commands it proposes as leader.
#[derive(Clone)]
pub struct ProposerOptions {
    /// Where commit latencies go.
    pub metrics: Option<Arc<crate::metrics::NodeMetrics>>,
    /// How long a request may take, retries through leader changes included.
    pub request_timeout: Duration,
    /// How long the state machine remembers a batch's key (see [`BatchSlot`]): longer than
    /// any retry of a request in it may take.
    pub batch_key_ttl: Duration,
    /// How requests are gathered into log entries.
    pub batching: Batching,
    /// The bounds on stored state every command carries.
    pub limits: StoreLimits,
}

/// Submits requests to the replicated log. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    shared: Arc<Shared>,
    local: mpsc::UnboundedSender<Pending>,
    forward: mpsc::UnboundedSender<Pending>,
}

impl Proposer {
    /// Starts the batchers among `tasks`: they run until `tasks` stop.
    pub fn start(links: Links, options: ProposerOptions, tasks: &mut Tasks) -> Proposer {
        let shared = Arc::new(Shared {
            links,
            options,
            last_proposed: std::sync::atomic::AtomicU64::new(0),
        });
        let (local, local_rx) = mpsc::unbounded_channel();
        let (forward, forward_rx) = mpsc::unbounded_channel();
        tasks.spawn(
            "local batcher",
            batcher(shared.clone(), local_rx, Sink::Local),
        );
        tasks.spawn(
            "forward batcher",
            batcher(shared.clone(), forward_rx, Sink::Forward),
        );
        Proposer {
            shared,
            local,
            forward,
        }
    }

    /// How long since this node last proposed an entry as leader.
    pub fn idle_for(&self) -> Duration {
        let last = self.shared.last_proposed.load(Ordering::Relaxed);
        Duration::from_millis(mono_ms().saturating_sub(last))
    }

    /// The leader as this node sees it, with its address.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        leader(&self.shared.links.raft)
    }

    /// Proposes `request`, through the leader wherever it is, retrying transient failures
    /// until the request timeout.
    pub async fn submit(&self, mut request: Request) -> Result<Reply, ApiError> {
        let deadline = Instant::now() + self.shared.options.request_timeout;
        let mut delay = Duration::from_millis(10);
        loop {
            // An attempt can hang (a leader cut off from its majority cannot commit): bound it
            // by the deadline. Retrying after that is safe, the request carries its key.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let result = match tokio::time::timeout(remaining, self.submit_once(request.clone())).await {
                Ok((result, stamp)) => {
                    if let Some(slot) = stamp {
                        request = stamped(request, slot);
                    }
                    result
                }
                Err(_) => {
                    return Err(ApiError::Unavailable(
                        "no majority confirmed the request in time; retry (with the same idempotency key)".into(),
                    ))
                }
            };
            match result {
                Err(e) if e.is_transient() && Instant::now() + delay < deadline => {
                    tracing::debug!(error = %e, "retrying a proposal");
                    let mut metrics = self.shared.links.raft.metrics();
                    // Wake early when the leader changes, else after the backoff.
                    let _ = tokio::time::timeout(delay, metrics.changed()).await;
                    delay = (delay * 2).min(Duration::from_millis(200));
                }
                Err(ApiError::NotLeader { .. }) => {
                    return Err(ApiError::NoLeader {
                        reason: "leadership kept changing until the request timed out".into(),
                    })
                }
                other => return other,
            }
        }
    }

    async fn submit_once(&self, request: Request) -> (Result<Reply, ApiError>, Option<BatchSlot>) {
        let queue = match self.leader() {
            Some((leader, _)) if leader == self.shared.links.id => &self.local,
            Some(_) => &self.forward,
            None => {
                let reason = "an election is under way or a majority is unreachable".into();
                return (Err(ApiError::NoLeader { reason }), None);
            }
        };
        let (tx, rx) = oneshot::channel();
        if queue.send(Pending { request, reply: tx }).is_err() {
            return (Err(shutting_down()), None);
        }
        rx.await.unwrap_or_else(|_| (Err(shutting_down()), None))
    }

    /// Proposes on this node only, which must be the leader (the leader's side of
    /// `/internal/propose`): no forwarding, no retries; each request is batched with others.
    pub async fn submit_local(&self, requests: Vec<Request>) -> Vec<Result<Reply, ApiError>> {
        let mut waiting = Vec::with_capacity(requests.len());
        for request in requests {
            let (tx, rx) = oneshot::channel();
            if self.local.send(Pending { request, reply: tx }).is_err() {
                waiting.push(None);
            } else {
                waiting.push(Some(rx));
            }
        }
        let mut out = Vec::with_capacity(waiting.len());
        for rx in waiting {
            out.push(match rx {
                Some(rx) => rx.await.map_or_else(|_| Err(shutting_down()), |(r, _)| r),
                None => Err(shutting_down()),
            });
        }
        out
    }
}

/// The leader id and address from this node's Raft metrics.
pub fn leader(raft: &Raft) -> Option<(NodeId, String)> {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let id = m.current_leader?;
    let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
    Some((id, addr))
}

fn shutting_down() -> ApiError {
    ApiError::Unavailable("node is shutting down".into())
}

/// A fresh idempotency key of this node's, for requests that came without one.
pub(crate) fn draw_key(node: hashq_raft::NodeId) -> String {
    hashq_raft::keys::NodeKey {
        node,
        nonce: rand::random(),
    }
    .to_string()
}

/// An enqueue without a key becomes slot `slot` of the batch keyed `key`; anything else is
/// left as it is. Returns the slot it was given.
fn stamp(request: &mut Request, key: &str, slot: u32, ttl: Duration) -> Option<BatchSlot> {
    let Request::Enqueue { dedup: None, .. } = request else {
        return None;
    };
    let batch = BatchSlot {
        key: key.to_owned(),
        slot,
        ttl_ms: crate::config::millis(ttl),
    };
    *request = stamped(std::mem::replace(request, Request::Noop), batch.clone());
    Some(batch)
}

/// `request` as slot `batch` of its batch, if it is an enqueue without a key.
fn stamped(request: Request, batch: BatchSlot) -> Request {
    match request {
        Request::Enqueue {
            iterations,
            payload,
            dedup: None,
        } => Request::EnqueueInBatch {
            iterations,
            payload,
            batch,
        },
        other => other,
    }
}

fn request_bytes(r: &Request) -> usize {
    r.size_hint()
}

/// Gathers whatever requests are waiting into one batch, up to the limits, and sends it off;
/// at most `in_flight` batches are under way, so under load batches grow by themselves.
async fn batcher(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Pending>, sink: Sink) {
    let batching = shared.options.batching;
    let in_flight = Arc::new(Semaphore::new(batching.in_flight.max(1)));
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = request_bytes(&first.request);
        // Sized for what is waiting, so the batch does not grow by doublings as it fills.
        let mut batch = Vec::with_capacity((rx.len() + 1).min(batching.max_requests.max(1)));
        batch.push(first);
        while batch.len() < batching.max_requests {
            match rx.try_recv() {
                Ok(p) => {
                    let b = request_bytes(&p.request);
                    if bytes + b > batching.max_bytes {
                        carry = Some(p);
                        break;
                    }
                    bytes += b;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        // Keyless enqueues get one key for the whole batch and a slot each in it, so that a
        // retry never applies twice at the cost of one record per batch.
        let keyless = |p: &Pending| matches!(p.request, Request::Enqueue { dedup: None, .. });
        let key = if batch.iter().any(keyless) {
            draw_key(shared.links.id)
        } else {
            String::new()
        };
        let ttl = shared.options.batch_key_ttl;
        let (requests, replies): (Vec<Request>, Vec<_>) = batch
            .into_iter()
            .enumerate()
            .map(|(slot, mut p)| {
                let stamp = stamp(&mut p.request, &key, slot as u32, ttl);
                (p.request, (p.reply, stamp))
            })
            .unzip();
        let shared = shared.clone();
        tokio::spawn(async move {
            let n = requests.len();
            let results = match sink {
                Sink::Local => propose(&shared, requests).await,
                Sink::Forward => forward(&shared, requests).await,
            };
            match results {
                Ok(results) if results.len() == n => {
                    for ((reply, stamp), result) in replies.into_iter().zip(results) {
                        let _ = reply.send((result, stamp));
                    }
                }
                Ok(results) => {
                    let e =
                        ApiError::Internal(format!("{} answers to {n} requests", results.len()));
                    for (reply, stamp) in replies {
                        let _ = reply.send((Err(e.clone()), stamp));
                    }
                }
                Err(e) => {
                    for (reply, stamp) in replies {
                        let _ = reply.send((Err(e.clone()), stamp));
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Appends one command to the log (this node is the leader) and waits until it is applied.
async fn propose(
    shared: &Shared,
    requests: Vec<Request>,
) -> Result<Vec<Result<Reply, ApiError>>, ApiError> {
    let command = Command {
        now: now_ms(),
        mono: mono_ms(),
        limits: shared.options.limits,
        requests,
    };
    let started = Instant::now();
    shared.last_proposed.store(command.mono, Ordering::Relaxed);
    let written = shared
        .links
        .raft
        .client_write(command)
        .await
        .map_err(|e| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ApiError::NotLeader {
                leader: f.leader_id,
            },
            RaftError::APIError(other) => ApiError::Internal(other.to_string()),
            RaftError::Fatal(f) => ApiError::Unavailable(format!("raft stopped: {f}")),
        })?;
    if let Some(metrics) = &shared.options.metrics {
        metrics.commit.observe(started.elapsed().as_secs_f64());
    }
    let needs_payloads = written
        .data
        .iter()
        .any(|r| matches!(r, Response::Leased { items } if !items.is_empty()));
    if !needs_payloads {
        let none: Option<(&hashq_storage::SledKv, &hashq_storage::PayloadReader)> = None;
        return Ok(written.data.into_iter().map(|r| attach(r, none)).collect());
    }
    // Payloads are read from this node's log (and packs), off the async threads.
    let reader = shared.links.reader.clone();
    tokio::task::spawn_blocking(move || {
        let view = reader.view();
        let payloads = reader.payloads();
        written
            .data
            .into_iter()
            .map(|response| attach(response, Some((&view, &payloads))))
            .collect()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("reading payloads: {e}")))
}

/// Turns a state-machine response into a reply, reading leased items' payloads from where
/// this leader keeps them. An item that is no longer running completed meanwhile (a
/// duplicate worker won the race); it is left out, and its lease simply lapses.
fn attach(
    response: Response,
    source: Option<(&impl KvRead, &hashq_storage::PayloadReader)>,
) -> Result<Reply, ApiError> {
    match (response, source) {
        (Response::Rejected(r), _) => Err(ApiError::from(r)),
        (Response::Leased { items }, Some((view, reader))) => {
            let mut kept = Vec::with_capacity(items.len());
            let mut refs = Vec::with_capacity(items.len());
            for item in items {
                match machine::item(view, item.id)? {
                    Some(it) if it.status == hashq_raft::types::Status::Running => {
                        refs.push(it.payload);
                        kept.push(item);
                    }
                    _ => {}
                }
            }
            let read = reader
                .read(&refs)
                .map_err(|e| ApiError::Internal(format!("reading payloads: {e}")))?;
            let mut items = Vec::with_capacity(kept.len());
            let mut payloads = Vec::with_capacity(kept.len());
            for (item, payload) in kept.into_iter().zip(read) {
                match payload {
                    Some(p) => {
                        items.push(item);
                        payloads.push(p);
                    }
                    None => {
                        tracing::error!(id = %item.id, "a leased item's payload is missing on the leader")
                    }
                }
            }
            Ok(Reply {
                response: Response::Leased { items },
                payloads,
            })
        }
        (response, _) => Ok(Reply {
            response,
            payloads: Vec::new(),
        }),
    }
}

/// Sends a batch to the leader's `/internal/propose`.
async fn forward(
    shared: &Shared,
    requests: Vec<Request>,
) -> Result<Vec<Result<Reply, ApiError>>, ApiError> {
    let Some((leader, addr)) = leader(&shared.links.raft) else {
        return Err(ApiError::NoLeader {
            reason: "no leader to forward to".into(),
        });
    };
    if leader == shared.links.id {
        // Became leader since the batch was queued.
        return propose(shared, requests).await;
    }
    let response = shared
        .links
        .peers
        .request(reqwest::Method::POST, &addr, PROPOSE)
        .header(reqwest::header::CONTENT_TYPE, POSTCARD)
        .timeout(shared.options.request_timeout)
        .body(codec::encode(&requests))
        .send()
        .await
        .map_err(|e| ApiError::Unavailable(format!("leader {leader} at {addr}: {e}")))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| ApiError::Unavailable(format!("leader {leader} at {addr}: {e}")))?;
    if !status.is_success() {
        let message = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        return Err(if status.is_server_error() {
            ApiError::Unavailable(format!("leader {leader} answered {status}: {message}"))
        } else {
            ApiError::Internal(format!(
                "leader {leader} refused a forwarded batch: {status} {message}"
            ))
        });
    }
    codec::decode("forwarded replies", &body).map_err(|e| ApiError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hashq_raft::command::Dedup;

    fn enqueue(dedup: Option<Dedup>) -> Request {
        Request::Enqueue {
            iterations: 3,
            payload: Bytes::from_static(b"abc"),
            dedup,
        }
    }

    #[test]
    fn a_keyless_enqueue_gets_a_slot_and_keeps_its_first_one_through_retries() {
        let ttl = Duration::from_secs(120);
        let mut first = enqueue(None);
        let slot = stamp(&mut first, "n1:aa", 7, ttl).expect("a keyless enqueue is stamped");
        assert_eq!(
            slot,
            BatchSlot {
                key: "n1:aa".into(),
                slot: 7,
                ttl_ms: 120_000
            }
        );
        let Request::EnqueueInBatch {
            iterations,
            ref payload,
            ref batch,
        } = first
        else {
            panic!("stamped into {first:?}");
        };
        assert_eq!((iterations, &payload[..], batch), (3, &b"abc"[..], &slot));
        // The retry goes into another batch: it keeps the slot of its first one.
        let mut retry = stamped(enqueue(None), slot.clone());
        assert_eq!(retry, first);
        assert_eq!(stamp(&mut retry, "n1:bb", 0, ttl), None);
        assert_eq!(retry, first);
    }

    #[test]
    fn requests_with_a_key_of_their_own_are_left_alone() {
        let keyed = enqueue(Some(Dedup {
            key: "c:enqueue:k".into(),
            ttl_ms: 600_000,
        }));
        let mut r = keyed.clone();
        assert_eq!(stamp(&mut r, "n1:aa", 0, Duration::from_secs(1)), None);
        assert_eq!(r, keyed);
        let mut take = Request::Take {
            top: 1,
            dedup: None,
        };
        assert_eq!(stamp(&mut take, "n1:aa", 0, Duration::from_secs(1)), None);
        assert!(matches!(take, Request::Take { dedup: None, .. }));
    }
}
