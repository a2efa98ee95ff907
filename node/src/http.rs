//! The HTTP server under the routes, built so that no audience can starve another and no
//! client can hold a node's resources for long.
//!
//! - **Our own accept loop on hyper's HTTP/1.1** ([`serve`]): a cap on open connections per
//!   listener (beyond it a connection is closed at once), a header timeout that also closes
//!   idle keep-alive connections (hyper starts it whenever a connection waits for a request
//!   head), a bound on header bytes. HTTP/2 is not spoken: nothing here needs it, and h2c
//!   would be one more parser facing clients.
//! - **Bodies are read before a request takes a slot** ([`buffered`]): a declared length
//!   over the route's limit is answered 413 at once (before any `100 Continue`); a body must
//!   keep arriving at a minimum rate after a grace period, else 408 and the connection is
//!   closed; the bytes of bodies in flight share one budget per node, and a body that does
//!   not fit is answered 503 at once. A request with both `Content-Length` and
//!   `Transfer-Encoding: chunked` is read as chunked and its connection closed after the
//!   answer (hyper follows RFC 9112 section 6.3), so nothing can be smuggled behind it; any
//!   other `Transfer-Encoding` is refused.
//! - **Each audience has its own slots** ([`Capacity`]): a request waits for one at most
//!   `queue_timeout`, with a bounded number waiting, else 503 with `Retry-After`. Raft RPCs
//!   have slots of their own, so a request waiting for its commit never holds what the
//!   commit needs, and client load cannot delay a heartbeat into an election.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use hashq_tls::TlsAcceptor;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use crate::error::ApiError;

/// How the server treats connections and bodies.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpLimits {
    /// Longest a connection may take to send a request head, and stay idle between requests.
    pub header_timeout: Duration,
    /// A body must have arrived at `body_min_rate` bytes/s since this long after it started.
    pub body_grace: Duration,
    /// Bytes per second a body must average after `body_grace`.
    pub body_min_rate: u64,
    /// Longest pause between two pieces of a body.
    pub body_idle_timeout: Duration,
    /// Open connections per listener; more are closed at once.
    pub max_open_connections: usize,
    /// Bytes of client and worker request bodies held at once on this node.
    pub max_body_bytes_in_flight: usize,
    /// Longest a request waits for a free slot of its audience.
    pub queue_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            body_grace: Duration::from_secs(2),
            body_min_rate: 64 * 1024,
            body_idle_timeout: Duration::from_secs(5),
            max_open_connections: 8192,
            max_body_bytes_in_flight: 256 << 20,
            queue_timeout: Duration::from_secs(1),
        }
    }
}

/// Longest request head (request line and headers) accepted, in bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serves `app` on `listener` until `shutdown` completes, then lets requests in progress
/// finish (for at most `drain`). With `tls`, every connection must complete a TLS handshake
/// within the header timeout (plaintext is dropped), and each request carries whether its
/// connection presented a certificate of the cluster CA ([`hashq_tls::PeerCertified`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &HttpLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let open = Arc::new(Semaphore::new(limits.max_open_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut refused = RateLimitedLog::new(Duration::from_secs(10));
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    refused.warn(|n| tracing::warn!(error = %e, suppressed = n, "accept failed"));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refused.warn(|n| {
                tracing::warn!(
                    suppressed = n,
                    "too many open connections; closing new ones"
                )
            });
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Some(tls) = tls.clone() else {
            let service = TowerToHyperService::new(app.clone());
            let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                let _ = conn.await;
                drop(permit);
            });
            continue;
        };
        let (app, builder) = (app.clone(), builder.clone());
        let watcher = graceful.watcher();
        let handshake_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let accepted = hashq_tls::accept(&tls, stream);
            let (stream, certified) = match tokio::time::timeout(handshake_timeout, accepted).await
            {
                Ok(Ok(accepted)) => accepted,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let app = app.map_request(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(certified);
                request
            });
            let service = TowerToHyperService::new(app);
            let conn = watcher.watch(builder.serve_connection(TokioIo::new(stream), service));
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    // Requests in progress finish; idle connections close at once.
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    Ok(())
}

/// Logs at most once per period, counting what it held back.
pub struct RateLimitedLog {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(period: Duration) -> Self {
        RateLimitedLog {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// Calls `log` with the number of messages held back since the last one, or holds this
    /// one back.
    pub fn warn(&mut self, log: impl FnOnce(u64)) {
        if self.last.is_some_and(|t| t.elapsed() < self.period) {
            self.suppressed += 1;
            return;
        }
        log(self.suppressed);
        self.suppressed = 0;
        self.last = Some(Instant::now());
    }
}

/// The request slots of one audience.
pub struct Capacity {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    queue_timeout: Duration,
}

impl Capacity {
    /// `slots` requests served at once, up to `4 * slots` more waiting `queue_timeout`.
    pub fn new(slots: usize, queue_timeout: Duration) -> Arc<Capacity> {
        let slots = slots.max(1);
        Arc::new(Capacity {
            slots: Arc::new(Semaphore::new(slots)),
            waiting: AtomicUsize::new(0),
            max_waiting: slots.saturating_mul(4),
            queue_timeout,
        })
    }

    /// A slot to serve one request in, or the answer when none frees up in time.
    pub async fn slot(&self) -> Result<OwnedSemaphorePermit, Response> {
        self.acquire().await.ok_or_else(|| {
            ApiError::Busy("this node is serving as many requests as it may; retry".into())
                .into_response()
        })
    }

    async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Some(permit);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let permit = tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        permit
    }
}

/// Middleware: a request of this audience runs only with a free slot.
pub async fn limit(
    State(capacity): State<Arc<Capacity>>,
    request: Request,
    next: Next,
) -> Response {
    match capacity.slot().await {
        Ok(permit) => {
            let response = next.run(request).await;
            drop(permit);
            response
        }
        Err(busy) => busy,
    }
}

/// The budget of body bytes in flight on a node, in KiB permits.
#[derive(Clone)]
pub struct BodyBudget {
    kib: Arc<Semaphore>,
}

impl BodyBudget {
    pub fn new(bytes: usize) -> Self {
        BodyBudget {
            kib: Arc::new(Semaphore::new((bytes / 1024).max(1))),
        }
    }

    /// Reserves room for `bytes`, now or never.
    fn reserve(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let kib = u32::try_from(bytes.div_ceil(1024)).ok()?;
        if kib == 0 {
            return self.kib.clone().try_acquire_many_owned(0).ok();
        }
        self.kib.clone().try_acquire_many_owned(kib).ok()
    }
}

/// How a route's bodies are read.
#[derive(Clone)]
pub struct BodyRules {
    /// Largest body, in bytes (413 above).
    pub limit: usize,
    /// Bodies count against this budget while their request runs; `None` for Raft traffic.
    pub budget: Option<BodyBudget>,
    pub limits: HttpLimits,
}

/// `request` with its body read whole under `rules` (the permit holds its room in the
/// budget), or the answer that refuses it: read before the request takes a slot, so that
/// slow bodies never hold one, and handed on as a buffered body.
pub async fn buffered(
    request: Request,
    rules: &BodyRules,
) -> Result<(Request, Option<OwnedSemaphorePermit>), Response> {
    let (parts, body) = request.into_parts();
    match read_body(&parts.headers, body, rules).await {
        Ok((bytes, budget)) => Ok((Request::from_parts(parts, Body::from(bytes)), budget)),
        Err(e) => {
            let mut response = e.into_response();
            // The rest of the body may still be on its way: end the connection rather than
            // read it.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(response)
        }
    }
}

/// Reads a body under `rules`; the permit holds its room in the budget.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    rules: &BodyRules,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), ApiError> {
    let declared = match headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::invalid("invalid_content_length", "Content-Length is not a number")
                })?,
        ),
    };
    let limit = rules.limit as u64;
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::PayloadTooLarge { limit: rules.limit });
    }
    // Room for the declared length, or for the limit when the length is not declared.
    let permit = match &rules.budget {
        Some(budget) => Some(budget.reserve(declared.unwrap_or(limit)).ok_or_else(|| {
            ApiError::Busy("this node holds as many request bodies as it may; retry".into())
        })?),
        None => None,
    };
    let l = &rules.limits;
    let started = Instant::now();
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(limit) as usize);
    loop {
        let next = tokio::time::timeout(l.body_idle_timeout, stream.next())
            .await
            .map_err(|_| ApiError::BodyTimeout("no part of the body arrived in time".into()))?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| {
            ApiError::invalid("invalid_body", format!("could not read the body: {e}"))
        })?;
        if buf.len() as u64 + chunk.len() as u64 > limit {
            return Err(ApiError::PayloadTooLarge { limit: rules.limit });
        }
        buf.extend_from_slice(&chunk);
        let elapsed = started.elapsed();
        if let Some(late) = elapsed.checked_sub(l.body_grace) {
            let due = (late.as_secs_f64() * l.body_min_rate as f64) as u64;
            if (buf.len() as u64) < due {
                return Err(ApiError::BodyTimeout(format!(
                    "the body arrived slower than {} bytes/s",
                    l.body_min_rate
                )));
            }
        }
    }
    if declared.is_some_and(|d| d != buf.len() as u64) {
        return Err(ApiError::invalid(
            "invalid_body",
            "the body is shorter than its Content-Length",
        ));
    }
    Ok((buf.freeze(), permit))
}
