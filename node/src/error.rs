//! The node's errors and the one place that maps them to HTTP.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hashq_proto::error::{codes, ErrorBody, ErrorDetail};
use hashq_raft::command::{Rejection, Response as SmResponse};
use hashq_raft::{NodeId, WorkerId};
use serde::{Deserialize, Serialize};

/// Everything a route can answer besides success.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum ApiError {
    /// A parameter is missing or out of range.
    #[error("{message}")]
    InvalidInput { code: String, message: String },
    #[error("missing or wrong credential for this route")]
    Unauthorized,
    #[error("admin routes are disabled: start the nodes with --admin-token")]
    AdminDisabled,
    #[error("node-to-node routes need a client certificate from the cluster CA as well as the cluster token")]
    NoPeerCertificate,
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The body is within bounds but what it holds is not (a batch's items or bytes): 413
    /// with its own code.
    #[error("{message}")]
    TooLarge { code: String, message: String },
    /// The body is not of the media type the route takes.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The body did not arrive in time (too slow, or stalled).
    #[error("{0}")]
    BodyTimeout(String),
    /// This node is at capacity for the request's audience; retry shortly.
    #[error("{0}")]
    Busy(String),
    #[error("the backlog is full ({items} items, {bytes} bytes stored); retry later")]
    BacklogFull { items: u64, bytes: u64 },
    /// Some node's disk is below its free-space limit: no enqueue until it recovers.
    #[error("nodes {nodes:?} are short of disk space: enqueues are refused until space returns (pulls and completions go on)")]
    DiskFull { nodes: Vec<NodeId> },
    /// No leader is known right now (election, no quorum).
    #[error("no leader right now: {reason}")]
    NoLeader { reason: String },
    /// The request could not be completed in time; with an idempotency key it is safe to
    /// retry on any node.
    #[error("{0}")]
    Unavailable(String),
    #[error("this node is a witness and serves no client or worker API")]
    Witness,
    #[error("unknown worker {0}")]
    UnknownWorker(WorkerId),
    #[error("slot {0} is not reserved")]
    UnknownSlot(WorkerId),
    /// This node is not the leader (internal routes only; clients never see it).
    #[error("node {leader:?} is the leader")]
    NotLeader { leader: Option<NodeId> },
    /// A fault of this node (storage): never caused by the request.
    #[error("internal error: {0}")]
    Internal(String),
    /// The request no longer fits the state it was meant for (a stale handover).
    #[error("{0}")]
    Conflict(String),
    /// The target is in a state that refuses the request (cancelling a completed item), or
    /// the cluster does not run the version the request needs yet: 409 with its own code.
    #[error("{message}")]
    Refused { code: String, message: String },
}

impl ApiError {
    pub fn invalid(code: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidInput {
            code: code.to_string(),
            message: message.into(),
        }
    }

    pub fn refused(code: &str, message: impl Into<String>) -> Self {
        ApiError::Refused {
            code: code.to_string(),
            message: message.into(),
        }
    }

    /// The state machine answered a request with a response of another kind: a bug, never
    /// the caller's fault.
    pub fn unexpected(response: SmResponse) -> Self {
        ApiError::Internal(format!(
            "unexpected answer from the state machine: {response:?}"
        ))
    }

    /// Whether trying again (on this node or another) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::NoLeader { .. }
                | ApiError::NotLeader { .. }
                | ApiError::Unavailable(_)
                | ApiError::Busy(_)
        )
    }

    fn parts(&self) -> (StatusCode, &str, Option<Duration>) {
        match self {
            ApiError::InvalidInput { code, .. } => (StatusCode::BAD_REQUEST, code.as_str(), None),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", None),
            ApiError::AdminDisabled => (StatusCode::FORBIDDEN, "admin_disabled", None),
            ApiError::NoPeerCertificate => {
                (StatusCode::UNAUTHORIZED, "peer_certificate_required", None)
            }
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", None),
            ApiError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None)
            }
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None)
            }
            ApiError::TooLarge { code, .. } => (StatusCode::PAYLOAD_TOO_LARGE, code.as_str(), None),
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                None,
            ),
            ApiError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "body_timeout", None),
            ApiError::Busy(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                Some(Duration::from_secs(1)),
            ),
            ApiError::BacklogFull { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "backlog_full",
                Some(Duration::from_secs(1)),
            ),
            ApiError::DiskFull { .. } => (
                StatusCode::INSUFFICIENT_STORAGE,
                "disk_full",
                Some(Duration::from_secs(5)),
            ),
            ApiError::NoLeader { .. } | ApiError::NotLeader { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                codes::NO_LEADER,
                Some(Duration::from_secs(1)),
            ),
            ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                Some(Duration::from_secs(1)),
            ),
            ApiError::Witness => (StatusCode::MISDIRECTED_REQUEST, "witness", None),
            ApiError::UnknownWorker(_) => (StatusCode::GONE, codes::UNKNOWN_WORKER, None),
            ApiError::UnknownSlot(_) => (StatusCode::GONE, codes::UNKNOWN_SLOT, None),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", None),
            ApiError::Refused { code, .. } => (StatusCode::CONFLICT, code.as_str(), None),
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::UnknownWorker(w) => ApiError::UnknownWorker(w),
            Rejection::UnknownSlot(w) => ApiError::UnknownSlot(w),
            Rejection::Invalid(m) => ApiError::invalid("invalid_request", m),
            Rejection::BacklogFull { items, bytes } => ApiError::BacklogFull { items, bytes },
            Rejection::DiskFull { nodes } => ApiError::DiskFull { nodes },
            Rejection::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<hashq_raft::kv::KvError> for ApiError {
    fn from(e: hashq_raft::kv::KvError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

/// The JSON error body with the right status (and `Retry-After` where retrying helps).
pub fn error_response(
    status: StatusCode,
    code: &str,
    message: String,
    retry_after: Option<Duration>,
) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.to_string(),
            message,
        },
    };
    let mut response = (status, axum::Json(body)).into_response();
    if let Some(after) = retry_after {
        let secs = after.as_secs().max(1);
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, retry_after) = self.parts();
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %self, "request failed");
        }
        error_response(status, code, self.to_string(), retry_after)
    }
}
