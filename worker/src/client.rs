//! The worker's side of the worker wire protocol ([`hashq_proto::worker`]): postcard over HTTP to
//! whichever endpoint answers, failing over to the next one when an endpoint is down or has no
//! leader.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hashq_proto::api::Health;
use hashq_proto::codec::{self, POSTCARD};
use hashq_proto::error::{codes, ErrorBody};
use hashq_proto::headers::AUTHORIZATION;
use hashq_proto::routes;
use hashq_proto::worker::{
    CompleteRequest, CompleteResponse, ExitRequest, HeartbeatRequest, HeartbeatResponse,
    LeaseRequest, LeaseResponse, RegisterRequest, RegisterResponse,
};
use reqwest::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::Url;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::{debug, warn};

use crate::config::WorkerConfig;

/// First retry delay; doubled per failed attempt up to [`BACKOFF_MAX`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(20);

/// Longest pause between two attempts of one call, whatever `Retry-After` says: a worker
/// waiting longer than this would add that much latency to every item once the cluster heals.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A dead host on a real network swallows SYNs; without this a connect would use the whole
/// request timeout before the worker fails over.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest error text kept from a body that is not the JSON error shape.
const MAX_ERROR_TEXT: usize = 200;

/// Why a call to the cluster did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The cluster does not know this worker (declared lost after a pause, or exited).
    #[error("the cluster does not know this worker: {message}")]
    UnknownWorker { message: String },
    /// The budget slot this worker claims is not reserved (any more).
    #[error("the worker's slot is not reserved: {message}")]
    UnknownSlot { message: String },
    /// The endpoint answered but cannot serve now (no leader, overloaded, 5xx).
    #[error("{endpoint} is unavailable ({status} {code}): {message}")]
    Unavailable {
        endpoint: String,
        status: u16,
        code: String,
        message: String,
        retry_after: Option<Duration>,
    },
    /// No answer: connection refused or reset, or a timeout. The request may still have
    /// reached the node.
    #[error("{endpoint} is unreachable: {reason}")]
    Unreachable { endpoint: String, reason: String },
    /// The endpoint refused the request for a reason retrying will not fix (4xx).
    #[error("{endpoint} rejected the request ({status} {code}): {message}")]
    Rejected {
        endpoint: String,
        status: u16,
        code: String,
        message: String,
    },
    /// A 2xx answer whose body is not what this worker understands.
    #[error("undecodable answer from {endpoint}: {reason}")]
    Protocol { endpoint: String, reason: String },
    /// No endpoint of the cluster has answered for this long: the cluster is gone.
    #[error("no endpoint answered for {silent_for:?}")]
    NoEndpoint { silent_for: Duration },
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
}

impl ClientError {
    /// Whether another endpoint, or the same one a little later, may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClientError::Unavailable { .. } | ClientError::Unreachable { .. }
        )
    }

    /// The pause the endpoint asked for, if it asked.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Turns `host:port` or `http://host:port/` into the base URL form routes are appended to:
/// a scheme, no trailing slash.
pub fn normalize_endpoint(raw: &str) -> Result<String, String> {
    let trimmed = raw.trim();
    if trimmed.trim_end_matches('/').is_empty() {
        return Err("an endpoint URL is empty".into());
    }
    // Strip the trailing slash only after the scheme is settled: "http://" must stay a URL
    // without a host, not become the host "http:".
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("http://{trimmed}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!("{raw:?}: an endpoint URL is http:// or https://"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{raw:?} has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{raw:?}: a base URL has no query or fragment"));
    }
    Ok(with_scheme.trim_end_matches('/').to_string())
}

/// The endpoints a worker knows, in the order it tries them, and the one in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    urls: Vec<String>,
    current: usize,
}

impl Endpoints {
    /// Normalizes and deduplicates `urls`, keeping their order; the first is used first.
    pub fn new<S: AsRef<str>>(urls: impl IntoIterator<Item = S>) -> Result<Self, String> {
        let mut endpoints = Endpoints {
            urls: Vec::new(),
            current: 0,
        };
        for url in urls {
            endpoints.add(normalize_endpoint(url.as_ref())?);
        }
        if endpoints.urls.is_empty() {
            return Err("no endpoint given".into());
        }
        Ok(endpoints)
    }

    /// The endpoint in use and its position, which [`Endpoints::advance_from`] needs.
    pub fn current(&self) -> (usize, &str) {
        (self.current, &self.urls[self.current])
    }

    /// All known endpoints, in trying order.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Moves to the endpoint after `failed`, unless another caller already moved away from
    /// it: concurrent calls that fail on the same endpoint must move one step, not skip a
    /// healthy endpoint. Returns whether this call moved.
    pub fn advance_from(&mut self, failed: usize) -> bool {
        if self.current != failed || self.urls.len() < 2 {
            return false;
        }
        self.current = (failed + 1) % self.urls.len();
        true
    }

    /// Adds the endpoints the cluster reported. Known ones keep their place and the one in
    /// use stays in use; malformed ones are skipped (the cluster's list is advice, and the
    /// worker can still reach the endpoints it has). Returns how many were added.
    pub fn merge<S: AsRef<str>>(&mut self, urls: impl IntoIterator<Item = S>) -> usize {
        let before = self.urls.len();
        for url in urls {
            match normalize_endpoint(url.as_ref()) {
                Ok(url) => self.add(url),
                Err(e) => warn!(error = %e, "ignoring an endpoint the cluster reported"),
            }
        }
        self.urls.len() - before
    }

    fn add(&mut self, url: String) {
        if !self.urls.contains(&url) {
            self.urls.push(url);
        }
    }
}

/// The upper bound of the pause before retry number `attempt` (0-based): exponential from
/// [`BACKOFF_BASE`], capped at [`BACKOFF_MAX`].
pub fn backoff_ceiling(attempt: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX)
}

/// The pause before retry number `attempt` of a call to a cluster of `endpoints` endpoints.
///
/// `jitter` in `[0, 1]` spreads the pause over the upper half of the ceiling, so workers
/// that lost the same endpoint do not all come back in the same millisecond. `Retry-After`
/// is honoured (up to [`BACKOFF_MAX`]) only once every endpoint has been tried in this round:
/// one node without a leader says nothing about the others, but when all of them say it,
/// hammering them does not help.
pub fn retry_delay(
    attempt: u32,
    endpoints: usize,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let ceiling = backoff_ceiling(attempt);
    // NaN would make `mul_f64` panic; treat it like no jitter.
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    let delay = ceiling.mul_f64(0.5 + 0.5 * jitter);
    let round_done = (attempt as usize + 1).is_multiple_of(endpoints.max(1));
    match retry_after {
        Some(asked) if round_done => delay.max(asked.min(BACKOFF_MAX)),
        _ => delay,
    }
}

/// Parses `Retry-After` given in seconds (the only form hashq nodes send).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Maps a non-2xx answer to the error the worker acts on: the JSON `code` decides where it
/// names a worker condition, the status decides otherwise.
pub fn classify(
    endpoint: &str,
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> ClientError {
    let (code, message) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text: String = text.trim().chars().take(MAX_ERROR_TEXT).collect();
            (format!("http_{status}"), text)
        }
    };
    let endpoint = endpoint.to_string();
    match code.as_str() {
        codes::UNKNOWN_WORKER => return ClientError::UnknownWorker { message },
        codes::UNKNOWN_SLOT => return ClientError::UnknownSlot { message },
        _ => {}
    }
    // 5xx other than 503 (a crashed handler, a proxy in front of a dead node) is as
    // endpoint-specific as a 503, so it fails over too; so does 421, a witness node that
    // serves no worker API.
    if code == codes::NO_LEADER || status == 429 || status == 421 || status >= 500 {
        ClientError::Unavailable {
            endpoint,
            status,
            code,
            message,
            retry_after,
        }
    } else {
        ClientError::Rejected {
            endpoint,
            status,
            code,
            message,
        }
    }
}

struct State {
    endpoints: Endpoints,
    /// When any endpoint last answered anything, even an error: a node that answers is alive.
    last_answer: Instant,
}

/// A client of the worker routes of a whole cluster, not of one node: each call goes to the
/// endpoint in use and moves on to the next while endpoints are down or leaderless.
///
/// One `reqwest::Client` is shared by all calls, so connections are kept alive and reused.
pub struct EndpointClient {
    http: reqwest::Client,
    authorization: Option<HeaderValue>,
    request_timeout: Duration,
    give_up_after: Duration,
    state: Mutex<State>,
}

impl EndpointClient {
    /// A client for the endpoints, token and timeouts of `config` (which should be valid).
    pub fn new(config: &WorkerConfig) -> Result<Self, ClientError> {
        let endpoints = Endpoints::new(&config.endpoints).map_err(ClientError::Setup)?;
        let authorization = match &config.worker_token {
            Some(token) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| ClientError::Setup("the worker token is not ASCII".into()))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let mut http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT.min(config.request_timeout))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .no_proxy();
        if let Some(ca) = &config.tls_ca {
            // The cluster CA is the only issuer trusted; a worker presents no certificate
            // (its credential is the worker token).
            http =
                hashq_tls::trust(http, ca, None).map_err(|e| ClientError::Setup(e.to_string()))?;
        }
        let http = http
            .build()
            .map_err(|e| ClientError::Setup(error_chain(&e)))?;
        Ok(EndpointClient {
            http,
            authorization,
            request_timeout: config.request_timeout,
            give_up_after: config.no_endpoint_exit_after,
            state: Mutex::new(State {
                endpoints,
                last_answer: Instant::now(),
            }),
        })
    }

    /// The endpoints known so far, in trying order.
    pub fn endpoints(&self) -> Vec<String> {
        self.state().endpoints.urls().to_vec()
    }

    /// The endpoint calls go to now.
    pub fn current_endpoint(&self) -> String {
        self.state().endpoints.current().1.to_string()
    }

    /// Adds endpoints the cluster reported; returns how many were new.
    pub fn merge_endpoints<S: AsRef<str>>(&self, urls: impl IntoIterator<Item = S>) -> usize {
        self.state().endpoints.merge(urls)
    }

    /// Whether the node at `base` answers its `GET /health` as an endpoint of this cluster,
    /// within `timeout`. Used by the parent check; it does not count as an answer for the
    /// no-endpoint rule.
    pub async fn healthy(&self, base: &str, timeout: Duration) -> bool {
        let answer = self
            .http
            .get(format!(
                "{}{}",
                base.trim_end_matches('/'),
                routes::observability::HEALTH
            ))
            .timeout(timeout)
            .send()
            .await;
        match answer {
            Ok(a) if a.status().is_success() => {
                a.json::<Health>().await.is_ok_and(|h| h.role == "endpoint")
            }
            _ => false,
        }
    }

    /// How long since any endpoint answered (since creation if none has yet).
    pub fn silent_for(&self) -> Duration {
        self.state().last_answer.elapsed()
    }

    /// `POST /worker/register`.
    pub async fn register(
        &self,
        request: &RegisterRequest,
        deadline: Option<Instant>,
    ) -> Result<RegisterResponse, ClientError> {
        self.call(routes::worker::REGISTER, request, deadline).await
    }

    /// `POST /worker/lease`. A retry inside this call resends the same bytes, so the same
    /// `request_id`.
    pub async fn lease(
        &self,
        request: &LeaseRequest,
        deadline: Option<Instant>,
    ) -> Result<LeaseResponse, ClientError> {
        self.call(routes::worker::LEASE, request, deadline).await
    }

    /// `POST /worker/heartbeat`.
    pub async fn heartbeat(
        &self,
        request: &HeartbeatRequest,
        deadline: Option<Instant>,
    ) -> Result<HeartbeatResponse, ClientError> {
        self.call(routes::worker::HEARTBEAT, request, deadline)
            .await
    }

    /// `POST /worker/complete`.
    pub async fn complete(
        &self,
        request: &CompleteRequest,
        deadline: Option<Instant>,
    ) -> Result<CompleteResponse, ClientError> {
        self.call(routes::worker::COMPLETE, request, deadline).await
    }

    /// `POST /worker/exit`. The answer has no content the worker needs, so its body is not
    /// decoded.
    pub async fn exit(
        &self,
        request: &ExitRequest,
        deadline: Option<Instant>,
    ) -> Result<(), ClientError> {
        self.call_raw(routes::worker::EXIT, codec::encode(request), deadline)
            .await
            .map(|_| ())
    }

    /// Sends `request` to `route` with failover and decodes the postcard answer.
    ///
    /// Retries on [`ClientError::is_retryable`] errors, moving to the next endpoint each
    /// time, until it succeeds, `deadline` would pass, or no endpoint has answered for
    /// `no_endpoint_exit_after` ([`ClientError::NoEndpoint`]). Other errors return at once.
    pub async fn call<Q: Serialize, R: DeserializeOwned>(
        &self,
        route: &'static str,
        request: &Q,
        deadline: Option<Instant>,
    ) -> Result<R, ClientError> {
        let (endpoint, body) = self
            .call_raw(route, codec::encode(request), deadline)
            .await?;
        codec::decode(route, &body).map_err(|e| ClientError::Protocol {
            endpoint,
            reason: e.to_string(),
        })
    }

    async fn call_raw(
        &self,
        route: &'static str,
        body: Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<(String, Vec<u8>), ClientError> {
        let mut attempt: u32 = 0;
        loop {
            let (index, endpoint, known) = {
                let state = self.state();
                let (index, url) = state.endpoints.current();
                (index, url.to_string(), state.endpoints.urls().len())
            };
            let error = match self.send_once(&endpoint, route, body.clone()).await {
                Ok(answer) => return Ok((endpoint, answer)),
                Err(e) if e.is_retryable() => e,
                Err(e) => return Err(e),
            };
            let silent_for = self.silent_for();
            if silent_for >= self.give_up_after {
                return Err(ClientError::NoEndpoint { silent_for });
            }
            let moved = self.state().endpoints.advance_from(index);
            if moved {
                let next = self.current_endpoint();
                // The first failure of a call is news; the rest of an outage is not.
                if attempt == 0 {
                    warn!(route, from = %endpoint, to = %next, error = %error, "failing over");
                } else {
                    debug!(
                        route, from = %endpoint, to = %next, error = %error, attempt,
                        "failing over"
                    );
                }
            }
            // Never sleep past the moment the cluster counts as gone: the worker should exit
            // then, not a backoff later.
            let delay = retry_delay(attempt, known, error.retry_after(), rand::random())
                .min(self.give_up_after.saturating_sub(silent_for));
            if deadline.is_some_and(|d| Instant::now() + delay >= d) {
                return Err(error);
            }
            tokio::time::sleep(delay).await;
            attempt = attempt.saturating_add(1);
        }
    }

    async fn send_once(
        &self,
        endpoint: &str,
        route: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, ClientError> {
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            endpoint: endpoint.to_string(),
            reason: error_chain(&e),
        };
        let mut request = self
            .http
            .post(format!("{endpoint}{route}"))
            .header(CONTENT_TYPE, POSTCARD)
            .timeout(self.request_timeout)
            .body(body);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        let response = request.send().await.map_err(unreachable)?;
        self.state().last_answer = Instant::now();
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        // A connection lost mid-body is as unreachable as one never made; the retry is safe
        // because every worker route is idempotent or keyed by request_id.
        let body = response.bytes().await.map_err(unreachable)?;
        if status.is_success() {
            Ok(body.to_vec())
        } else {
            Err(classify(endpoint, status.as_u16(), retry_after, &body))
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a list and a timestamp, each updated in one step: a panic elsewhere
        // cannot leave it half-written, so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An error with its causes: reqwest's own message ("error sending request") hides the one
/// that matters ("connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests;
