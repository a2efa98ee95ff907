//! The worker's life: register, then lease, hash, heartbeat and complete, until it is idle,
//! told to shut down, forgotten by the cluster, or alone.
//!
//! One registration is a *session*: three loops (lease, heartbeat, complete) share the
//! session's table of held items, and every hashing task writes its result into that table.
//! When the cluster forgets the worker, the session and its table are dropped whole, so a
//! result computed for an old registration cannot reach the completer of a new one.
//!
//! The session loop is here; the table of held items is [`held`], the parent checks are
//! [`parent`], the ways a worker ends are [`exit`].

mod exit;
mod held;
mod parent;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt};
use hashq_proto::worker::{
    CompleteRequest, ExitRequest, HeartbeatRequest, LeaseRequest, RegisterRequest,
    RegisterResponse, WorkGrant,
};
use hashq_proto::{Digest, NodeId, WorkerId, WorkerSecret};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::client::{backoff_ceiling, ClientError, EndpointClient};
use crate::config::{ParentCheck, WorkerConfig};
use crate::hash;
pub use exit::{ExitReason, WorkerError};
use held::Held;
#[cfg(feature = "ec2")]
use parent::ec2_parent_loop;
use parent::parent_loop;

/// The EC2 parent check of a worker that has one; a build without the `ec2` feature has none
/// (its config is refused by [`WorkerConfig::validate`]).
#[cfg(feature = "ec2")]
type Ec2Check = Arc<crate::ec2::Ec2ParentCheck>;
#[cfg(not(feature = "ec2"))]
type Ec2Check = std::convert::Infallible;

/// Most results sent in one `/worker/complete`: keeps one request, and the log entry it
/// becomes, small when a burst of tiny items finishes at once.
pub const MAX_COMPLETE_BATCH: usize = 256;

/// How long a leaving worker spends handing back results and leases. Past it the cluster
/// reclaims them anyway, when the leases expire or the worker is declared lost.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Shortest heartbeat period the worker accepts, whatever the cluster says: each heartbeat
/// is a Raft write.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(50);

/// A registration forgotten sooner than this after it was made counts as a flap, and the
/// next registration waits a backoff.
const FLAP_WINDOW: Duration = Duration::from_secs(5);

/// Pause after a lease answer that came back empty well before its long-poll ended (a node
/// that does not long-poll, a leader change), so such answers cannot make the worker spin.
const EARLY_EMPTY_PAUSE: Duration = Duration::from_millis(50);

/// [`run`] as a boxed future from a plain function, for the binary: an `async fn` (or a
/// generic) is compiled again in every crate that polls it, behind the box only here
/// (`hashq_node::run` says more).
#[inline(never)]
pub fn run_boxed(
    config: WorkerConfig,
    shutdown: BoxFuture<'static, ()>,
) -> BoxFuture<'static, Result<ExitReason, WorkerError>> {
    run(config, shutdown).boxed()
}

/// Runs a worker until it has a reason to stop; see [`ExitReason`] for the ways it ends
/// well. `shutdown` is typically SIGTERM, wired by the binary.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<ExitReason, WorkerError> {
    let outcome = run_until_done(config, shutdown).await;
    match &outcome {
        Ok(reason) => info!(%reason, "worker exiting"),
        Err(e) => error!(error = %e, "worker failed"),
    }
    outcome
}

async fn run_until_done(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<ExitReason, WorkerError> {
    config.validate().map_err(WorkerError::Config)?;
    let client = Arc::new(EndpointClient::new(&config)?);
    // Shared by every session, because a cancelled task of an old session still occupies its
    // thread until it notices the cancel flag.
    let threads = Arc::new(Semaphore::new(config.threads));
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    tokio::pin!(shutdown);
    let mut parent = config.parent;
    let ec2_check: Option<Ec2Check> = match &config.parent_check {
        #[cfg(feature = "ec2")]
        ParentCheck::Ec2(ec2) => Some(crate::ec2::Ec2ParentCheck::new(ec2, config.parent).await),
        #[cfg(not(feature = "ec2"))]
        ParentCheck::Ec2(_) => return Err(WorkerError::Config(crate::config::NO_EC2.into())),
        ParentCheck::Health => None,
    };
    let mut flaps: u32 = 0;
    loop {
        let request = RegisterRequest {
            slot: config.slot,
            parent,
            host: host.clone(),
            handle: config.handle.clone(),
        };
        let registered = tokio::select! {
            () = shutdown.as_mut() => return Ok(ExitReason::Shutdown),
            registered = client.register(&request, None) => registered,
        };
        let registered = match registered.map_err(Stop::from) {
            Ok(registered) => registered,
            Err(Stop::Forgotten(_)) if config.slot.is_some() => {
                warn!(slot = ?config.slot, "the cluster no longer reserves this worker's slot");
                return Ok(ExitReason::SlotGone);
            }
            Err(Stop::Forgotten(e) | Stop::Failed(e)) => return Err(e.into()),
            Err(Stop::NoEndpoint) => return Ok(ExitReason::NoEndpoint),
            Err(Stop::Orphaned) => return Ok(ExitReason::Orphaned),
        };
        let added = client.merge_endpoints(registered.endpoints.iter().map(|(_, url)| url));
        let worker = registered.worker;
        info!(
            %worker,
            node = registered.node,
            slot = ?config.slot,
            lease_ms = registered.lease_ms,
            heartbeat_ms = registered.heartbeat_ms,
            endpoints = client.endpoints().len(),
            new_endpoints = added,
            "registered"
        );
        let started = Instant::now();
        let session = Arc::new(Session::new(worker, registered.secret));
        session.set_parent(parent.unwrap_or(registered.node));
        let span = info_span!("worker", id = %worker);
        let end = serve(
            &client,
            &session,
            &threads,
            &config,
            &registered,
            ec2_check.as_ref(),
            shutdown.as_mut(),
        )
        .instrument(span.clone())
        .await;
        match end {
            SessionEnd::Idle => {
                leave(&client, &session).instrument(span).await;
                return Ok(ExitReason::Idle);
            }
            SessionEnd::Shutdown => {
                leave(&client, &session).instrument(span).await;
                return Ok(ExitReason::Shutdown);
            }
            SessionEnd::Stop(Stop::NoEndpoint) => {
                session.held().cancel_all(Instant::now());
                return Ok(ExitReason::NoEndpoint);
            }
            SessionEnd::Stop(Stop::Orphaned) => {
                // The endpoints may still answer (only their instances are going): hand back
                // what can be handed back, within the leave timeout.
                leave(&client, &session).instrument(span).await;
                return Ok(ExitReason::Orphaned);
            }
            SessionEnd::Stop(Stop::Forgotten(e)) => {
                // Its leases were reclaimed with it, so nothing it holds can still complete.
                let dropped = session.held().cancel_all(Instant::now());
                if config.slot.is_some() {
                    warn!(%worker, error = %e, dropped, "the cluster forgot this worker's slot");
                    return Ok(ExitReason::SlotGone);
                }
                warn!(
                    %worker, error = %e, dropped,
                    "the cluster forgot this worker; registering again"
                );
                // Let whichever endpoint answers adopt it: the old parent may be the reason
                // the worker was lost.
                parent = None;
                // A cluster that forgets the worker right after registering it (a bug, a
                // split view) must not get a registration storm.
                if started.elapsed() < FLAP_WINDOW {
                    let pause = backoff_ceiling(flaps);
                    flaps = flaps.saturating_add(1);
                    tokio::select! {
                        () = shutdown.as_mut() => return Ok(ExitReason::Shutdown),
                        () = tokio::time::sleep(pause) => {}
                    }
                } else {
                    flaps = 0;
                }
            }
            SessionEnd::Stop(Stop::Failed(e)) => {
                leave(&client, &session).instrument(span).await;
                return Err(e.into());
            }
            SessionEnd::Internal(message) => {
                leave(&client, &session).instrument(span).await;
                return Err(WorkerError::Internal(message));
            }
        }
    }
}

/// Why a session's loop stopped.
#[derive(Debug)]
enum Stop {
    /// `unknown_worker` or `unknown_slot`: the cluster has no record of this registration.
    Forgotten(ClientError),
    NoEndpoint,
    /// EC2: no endpoint instance of the cluster runs.
    #[cfg_attr(not(feature = "ec2"), allow(dead_code))]
    Orphaned,
    Failed(ClientError),
}

impl From<ClientError> for Stop {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::UnknownWorker { .. } | ClientError::UnknownSlot { .. } => {
                Stop::Forgotten(e)
            }
            ClientError::NoEndpoint { .. } => Stop::NoEndpoint,
            e => Stop::Failed(e),
        }
    }
}

enum SessionEnd {
    Stop(Stop),
    Idle,
    Shutdown,
    Internal(String),
}

/// One registration's state, shared by its loops and its hashing tasks.
struct Session {
    worker: WorkerId,
    /// Proves to the cluster that requests naming `worker` come from this registration.
    secret: WorkerSecret,
    /// The node responsible for this worker; changed by the parent check when it dies.
    parent: AtomicU64,
    held: Mutex<Held>,
    /// A result was stored: the completer has something to send.
    results_ready: Notify,
    /// An item finished or was dropped: the leaser may ask for more.
    capacity_freed: Notify,
    /// How long an item takes to hash, in nanoseconds, and one iteration, in picoseconds:
    /// moving averages over recent items (0 until the first one), for the adaptive prefetch.
    item_nanos: AtomicU64,
    iteration_picos: AtomicU64,
}

impl Session {
    fn new(worker: WorkerId, secret: WorkerSecret) -> Self {
        Session {
            worker,
            secret,
            parent: AtomicU64::new(0),
            held: Mutex::new(Held::new(Instant::now())),
            results_ready: Notify::new(),
            capacity_freed: Notify::new(),
            item_nanos: AtomicU64::new(0),
            iteration_picos: AtomicU64::new(0),
        }
    }

    /// Folds one item's hashing time into the moving averages.
    fn record_item_time(&self, took: Duration, iterations: u32) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        moving_average(&self.item_nanos, nanos);
        let picos = nanos.saturating_mul(1000) / u64::from(iterations.max(1));
        moving_average(&self.iteration_picos, picos);
    }

    fn item_time(&self) -> Option<Duration> {
        Some(self.item_nanos.load(Ordering::Relaxed))
            .filter(|n| *n != 0)
            .map(Duration::from_nanos)
    }

    fn iteration_picos(&self) -> Option<u64> {
        Some(self.iteration_picos.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    /// The parent node (0 before registration sets it; node ids start at 1).
    fn parent(&self) -> Option<NodeId> {
        Some(self.parent.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    fn set_parent(&self, parent: NodeId) {
        self.parent.store(parent, Ordering::Relaxed);
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        // Every `Held` method leaves the table consistent before it can panic, so a poisoned
        // lock still guards a usable table.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Moves `avg` an eighth of the way to `sample` (the first sample sets it; never 0 after).
fn moving_average(avg: &AtomicU64, sample: u64) {
    let sample = sample.max(1);
    let _ = avg.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
        Some(if a == 0 {
            sample
        } else {
            a - a / 8 + sample / 8
        })
    });
}

/// Runs the session's loops until one of them stops, the worker is idle, or `shutdown`
/// fires; on return no loop is running any more.
async fn serve<F: Future<Output = ()>>(
    client: &Arc<EndpointClient>,
    session: &Arc<Session>,
    threads: &Arc<Semaphore>,
    config: &WorkerConfig,
    registered: &RegisterResponse,
    ec2_check: Option<&Ec2Check>,
    mut shutdown: Pin<&mut F>,
) -> SessionEnd {
    let mut tasks = JoinSet::new();
    tasks.spawn(
        lease_loop(
            Arc::clone(client),
            Arc::clone(session),
            Arc::clone(threads),
            config.clone(),
        )
        .in_current_span(),
    );
    tasks.spawn(
        heartbeat_loop(
            Arc::clone(client),
            Arc::clone(session),
            heartbeat_period(registered),
        )
        .in_current_span(),
    );
    tasks.spawn(complete_loop(Arc::clone(client), Arc::clone(session)).in_current_span());
    match ec2_check {
        #[cfg(not(feature = "ec2"))]
        Some(never) => match *never {},
        #[cfg(feature = "ec2")]
        Some(check) => tasks.spawn(
            ec2_parent_loop(
                Arc::clone(check),
                Arc::clone(session),
                registered.endpoints.iter().map(|(id, _)| *id).collect(),
                config.parent_check_every,
            )
            .in_current_span(),
        ),
        None => tasks.spawn(
            parent_loop(
                Arc::clone(client),
                Arc::clone(session),
                registered.endpoints.clone(),
                config.parent_check_every,
            )
            .in_current_span(),
        ),
    };
    let mut idle_check = tokio::time::interval(idle_check_period(config.idle_timeout));
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = loop {
        tokio::select! {
            () = shutdown.as_mut() => break SessionEnd::Shutdown,
            joined = tasks.join_next() => break match joined {
                Some(Ok(stop)) => SessionEnd::Stop(stop),
                Some(Err(e)) => SessionEnd::Internal(format!("a worker loop failed: {e}")),
                None => SessionEnd::Internal("the worker loops are gone".into()),
            },
            _ = idle_check.tick() => {
                if session.held().idle_for(Instant::now()) >= config.idle_timeout {
                    break SessionEnd::Idle;
                }
            }
        }
    };
    // Wait for the loops to be gone, not just told to go: nothing of this session may be in
    // flight while the worker hands back its leases.
    tasks.shutdown().await;
    end
}

/// Keeps the adaptive capacity ([`WorkerConfig::adaptive_capacity`]) leased and unfinished:
/// asks for the free capacity, long-polling, and starts hashing each grant as it arrives.
async fn lease_loop(
    client: Arc<EndpointClient>,
    session: Arc<Session>,
    threads: Arc<Semaphore>,
    config: WorkerConfig,
) -> Stop {
    let wait = config.lease_wait;
    let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
    let mut retry = LeaseRetry::default();
    let base = config.capacity();
    loop {
        let target = config.adaptive_capacity(session.item_time());
        let unfinished = session.held().unfinished();
        // Items the worker must have to keep its threads and prefetch busy: granted whatever
        // their size. The adaptive rest is asked for once half of it is used up.
        let min = base.saturating_sub(unfinished);
        let free = target.saturating_sub(unfinished);
        if free == 0 || (min == 0 && unfinished > base + (target - base) / 2) {
            // `notify_one` stores a permit, so a wake-up between the check and here is kept.
            session.capacity_freed.notified().await;
            continue;
        }
        let ask = LeaseRequest {
            worker: session.worker,
            secret: session.secret,
            max: u32::try_from(free).unwrap_or(u32::MAX),
            min: u32::try_from(min).unwrap_or(u32::MAX),
            max_iterations: config.iteration_budget(session.iteration_picos()),
            wait_ms,
            request_id: 0,
        };
        let request = retry.request(ask, next_request_id);
        let asked = Instant::now();
        match client.lease(&request, None).await {
            Ok(response) => {
                retry.settle();
                if response.items.is_empty() {
                    if request.min == 0 {
                        // Only prefetch was asked for and none fit (or the queue is empty):
                        // ask again when an item finishes, not in a loop of Raft writes.
                        session.capacity_freed.notified().await;
                        continue;
                    }
                    if asked.elapsed() < (wait / 2).max(EARLY_EMPTY_PAUSE) {
                        tokio::time::sleep(EARLY_EMPTY_PAUSE).await;
                    }
                    continue;
                }
                debug!(
                    granted = response.items.len(),
                    asked = request.max,
                    request_id = request.request_id,
                    "leased"
                );
                for grant in response.items {
                    start_hashing(&session, &threads, grant);
                }
            }
            // Only reachable with a deadline; the unsettled request is resent as it was.
            Err(e) if e.is_retryable() => continue,
            Err(e) => return e.into(),
        }
    }
}

/// Hashes one grant on a blocking thread once one of the `threads` permits is free, and
/// stores its result in the session (unless the lease was lost meanwhile).
fn start_hashing(session: &Arc<Session>, threads: &Arc<Semaphore>, grant: WorkGrant) {
    let WorkGrant {
        id,
        attempt,
        iterations,
        payload,
        ..
    } = grant;
    let cancel = session.held().grant(id, attempt);
    let session = Arc::clone(session);
    let threads = Arc::clone(threads);
    tokio::spawn(
        async move {
            let value = match threads.acquire_owned().await {
                Ok(permit) if !cancel.load(Ordering::Relaxed) => {
                    let flag = Arc::clone(&cancel);
                    let hashed = tokio::task::spawn_blocking(move || {
                        // The permit lives as long as the hashing, even if nobody awaits it.
                        let _permit = permit;
                        let started = Instant::now();
                        let value = hash::sha512_chain_cancellable(&payload, iterations, &flag);
                        (value, started.elapsed())
                    })
                    .await;
                    match hashed {
                        Ok((value, took)) => {
                            if value.is_some() {
                                session.record_item_time(took, iterations);
                            }
                            value
                        }
                        Err(e) => {
                            // The lease is dropped below and expires; another attempt retries.
                            error!(%id, attempt, error = %e, "hashing failed");
                            None
                        }
                    }
                }
                _ => None,
            };
            let ready = session
                .held()
                .finish(id, attempt, value.map(Digest::new), Instant::now());
            if ready {
                session.results_ready.notify_one();
            }
            session.capacity_freed.notify_one();
        }
        .in_current_span(),
    );
}

/// Extends every held lease each period, and cancels the work the cluster says is lost.
async fn heartbeat_loop(
    client: Arc<EndpointClient>,
    session: Arc<Session>,
    period: Duration,
) -> Stop {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Registering just told the cluster the worker is alive.
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let items = session.held().leases();
        let request = HeartbeatRequest {
            worker: session.worker,
            secret: session.secret,
            items,
            parent: session.parent(),
        };
        // Give up on this beat after one period: the next beat carries a fresher list.
        let deadline = Instant::now() + period;
        match client.heartbeat(&request, Some(deadline)).await {
            Ok(response) => {
                let cancelled = session
                    .held()
                    .lost(&request.items, &response.lost, Instant::now());
                if cancelled > 0 {
                    warn!(
                        cancelled,
                        "the cluster took back leases this worker held; their work is abandoned"
                    );
                    session.capacity_freed.notify_one();
                }
            }
            Err(e) if e.is_retryable() => debug!(error = %e, "heartbeat not delivered"),
            Err(e) => return e.into(),
        }
    }
}

/// Sends results as soon as they are ready, batching whatever is ready together, and keeps
/// retrying a batch until the cluster acknowledges it.
async fn complete_loop(client: Arc<EndpointClient>, session: Arc<Session>) -> Stop {
    loop {
        session.results_ready.notified().await;
        loop {
            let results = session.held().ready(MAX_COMPLETE_BATCH);
            if results.is_empty() {
                break;
            }
            let request = CompleteRequest {
                worker: session.worker,
                secret: session.secret,
                results,
            };
            match client.complete(&request, None).await {
                Ok(ack) => {
                    session.held().acknowledge(&request.results, Instant::now());
                    debug!(
                        sent = request.results.len(),
                        accepted = ack.accepted,
                        ignored = ack.ignored,
                        "completed"
                    );
                }
                // Only reachable with a deadline; the results stay held and go again.
                Err(e) if e.is_retryable() => continue,
                Err(e) => return e.into(),
            }
        }
    }
}

/// Hands back what the session holds: delivers finished results, releases the rest, and
/// exits, all within [`LEAVE_TIMEOUT`].
async fn leave(client: &EndpointClient, session: &Session) {
    let deadline = Instant::now() + LEAVE_TIMEOUT;
    let mut release = session.held().cancel_unfinished(Instant::now());
    let results = session.held().ready(usize::MAX);
    for chunk in results.chunks(MAX_COMPLETE_BATCH) {
        let request = CompleteRequest {
            worker: session.worker,
            secret: session.secret,
            results: chunk.to_vec(),
        };
        let sent =
            tokio::time::timeout_at(deadline.into(), client.complete(&request, Some(deadline)))
                .await;
        match sent {
            Ok(Ok(_)) => session.held().acknowledge(chunk, Instant::now()),
            Ok(Err(_)) | Err(_) => {
                warn!(
                    results = chunk.len(),
                    "results not delivered before leaving; releasing their leases"
                );
                release.extend(chunk.iter().map(|c| (c.id, c.attempt)));
            }
        }
    }
    let released = release.len();
    let request = ExitRequest {
        worker: session.worker,
        secret: session.secret,
        release,
    };
    let exited =
        tokio::time::timeout_at(deadline.into(), client.exit(&request, Some(deadline))).await;
    match exited {
        Ok(Ok(())) => info!(released, "left the cluster"),
        Ok(Err(e)) => warn!(error = %e, "could not leave the cluster; it will reclaim the leases"),
        Err(_) => warn!("leaving timed out; the cluster will reclaim the leases"),
    }
}

/// How often the worker heartbeats: what the cluster asks, but never so rarely that one
/// late beat loses a lease or the worker, nor so often that beats flood the Raft log.
fn heartbeat_period(registered: &RegisterResponse) -> Duration {
    let mut ms = registered.heartbeat_ms;
    if ms == 0 {
        ms = registered.lease_ms / 3;
    }
    for limit in [registered.lease_ms, registered.worker_lost_ms] {
        if limit > 0 {
            ms = ms.min(limit / 2);
        }
    }
    if ms == 0 {
        ms = 1000;
    }
    Duration::from_millis(ms).max(MIN_HEARTBEAT)
}

/// A quarter of the idle timeout keeps the overshoot small, and a check at most every
/// second costs nothing.
fn idle_check_period(idle_timeout: Duration) -> Duration {
    (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Lease request ids only grow in a process: the cluster grants nothing to a request older
/// than the last one it saw from this worker, so a stale retry that arrives late leases no
/// items that nobody would hash.
fn next_request_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The lease request to send next.
///
/// While the last request's fate is unknown (no answer read: a timeout, a reset, a 503 after
/// the node may have proposed it), the next request is that same one, `request_id`
/// included, so the cluster answers with the grant it may already have made instead of
/// leasing more items that nobody would hash. Only an answer settles it.
#[derive(Debug, Default)]
struct LeaseRetry {
    unsettled: Option<LeaseRequest>,
}

impl LeaseRetry {
    /// `ask` with a fresh id, or the unsettled request of the same worker.
    fn request(&mut self, ask: LeaseRequest, fresh_id: impl FnOnce() -> u64) -> LeaseRequest {
        if let Some(pending) = &self.unsettled {
            // A new registration is a new worker: its first request is new too.
            if pending.worker == ask.worker && pending.secret == ask.secret {
                return pending.clone();
            }
        }
        let request = LeaseRequest {
            request_id: fresh_id(),
            ..ask
        };
        self.unsettled = Some(request.clone());
        request
    }

    fn settle(&mut self) {
        self.unsettled = None;
    }
}

#[cfg(test)]
mod tests;
