//! HTTP routes, split by audience: [`client`] (the exercise's API and status), [`worker`]
//! (leases and results), [`admin`] (the worker budget), [`raft`] (consensus RPC),
//! [`internal`] (forwarding between nodes, the binary for worker instances).
//! Everything that is not the client API needs the cluster token. [`client_router`] is the
//! client API alone, for a listener that faces clients (`--client-listen`).

pub mod admin;
pub mod client;
pub mod internal;
pub mod raft;
pub mod worker;

use std::any::Any;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hashq_raft::{codec, wire};
use serde::de::DeserializeOwned;
use serde::Serialize;
use subtle::ConstantTimeEq;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::catch_panic::CatchPanicLayer;

use crate::config::Role;
use crate::error::{error_response, ApiError};
use crate::node::{Node, Stats};

/// Bodies of Raft and internal routes may be this large (a batch of log entries).
pub const INTERNAL_BODY_LIMIT: usize = 256 << 20;

/// The whole HTTP surface of a node.
pub fn router(node: Node) -> Router {
    let guarded = Router::new()
        .merge(admin::router())
        .merge(worker::router())
        .merge(raft::router())
        .merge(internal::router())
        .route_layer(middleware::from_fn_with_state(
            node.clone(),
            require_cluster_token,
        ));
    finish(client::router(&node).merge(guarded), node)
}

/// The client API alone: no Raft, worker, admin or internal route answers here.
pub fn client_router(node: Node) -> Router {
    finish(client::router(&node), node)
}

/// The layers every listener shares.
fn finish(routes: Router<Node>, node: Node) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(node.clone(), count_requests))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(GlobalConcurrencyLimitLayer::new(
            node.config.limits.max_connections,
        ))
        .with_state(node)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route {} {}",
        request.method(),
        request.uri().path()
    ))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

fn panic_response(_: Box<dyn Any + Send + 'static>) -> Response {
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the node hit a bug while answering; nothing was lost, retry".into(),
        None,
    )
}

async fn count_requests(State(node): State<Node>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    Stats::add(&node.stats.requests, 1);
    let status = response.status();
    if status.is_client_error() {
        node.stats.client_errors.fetch_add(1, Ordering::Relaxed);
    } else if status.is_server_error() {
        node.stats.server_errors.fetch_add(1, Ordering::Relaxed);
    }
    response
}

/// Compares a bearer token in constant time.
pub fn token_matches(headers: &HeaderMap, expected: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(given) = value.strip_prefix("Bearer ") else {
        return false;
    };
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

async fn require_cluster_token(State(node): State<Node>, request: Request, next: Next) -> Response {
    match &node.config.cluster_token {
        Some(expected) if !token_matches(request.headers(), expected) => {
            ApiError::Unauthorized.into_response()
        }
        _ => next.run(request).await,
    }
}

/// Checks the client token (when configured) and that this node serves clients at all.
pub fn check_client(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    if node.config.role == Role::Witness {
        return Err(ApiError::Witness);
    }
    match &node.config.client_token {
        Some(expected) if !token_matches(headers, expected) => Err(ApiError::Unauthorized),
        _ => Ok(()),
    }
}

/// A postcard request body.
pub struct Postcard<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Postcard<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::invalid("invalid_body", e.body_text()))?;
        codec::decode("request body", &bytes)
            .map(Postcard)
            .map_err(|e| ApiError::invalid("invalid_body", e.to_string()))
    }
}

impl<T: Serialize> IntoResponse for Postcard<T> {
    fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, wire::POSTCARD)],
            codec::encode(&self.0),
        )
            .into_response()
    }
}

/// The query string as name/value pairs.
pub fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    raw.map(|q| {
        form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    })
    .unwrap_or_default()
}

/// A required whole-number query parameter in `1..=max`, with a clear error for each way it
/// can be wrong.
pub fn count_param(pairs: &[(String, String)], name: &str, max: u32) -> Result<u32, ApiError> {
    let mut values = pairs
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str());
    let Some(raw) = values.next() else {
        return Err(ApiError::invalid(
            "missing_parameter",
            format!("query parameter `{name}` is required (a whole number from 1 to {max})"),
        ));
    };
    if values.next().is_some() {
        return Err(ApiError::invalid(
            "invalid_parameter",
            format!("query parameter `{name}` is given more than once"),
        ));
    }
    let trimmed = raw.trim();
    let value: i128 = trimmed.parse().map_err(|_| {
        ApiError::invalid(
            "invalid_parameter",
            format!("`{name}` must be a whole number from 1 to {max}, got `{raw}`"),
        )
    })?;
    if value < 1 || value > i128::from(max) {
        return Err(ApiError::invalid(
            "out_of_range",
            format!("`{name}` must be from 1 to {max}, got {value}"),
        ));
    }
    Ok(value as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &str) -> Vec<(String, String)> {
        query_pairs(Some(q))
    }

    #[test]
    fn count_param_explains_every_kind_of_bad_value() {
        let code = |q: &str| match count_param(&pairs(q), "n", 10) {
            Ok(v) => format!("ok {v}"),
            Err(ApiError::InvalidInput { code, .. }) => code,
            Err(other) => format!("{other:?}"),
        };
        assert_eq!(code("n=3"), "ok 3");
        assert_eq!(code("n=10"), "ok 10");
        assert_eq!(code(""), "missing_parameter");
        assert_eq!(code("x=1"), "missing_parameter");
        assert_eq!(code("n=abc"), "invalid_parameter");
        assert_eq!(code("n=1.5"), "invalid_parameter");
        assert_eq!(code("n="), "invalid_parameter");
        assert_eq!(code("n=1&n=2"), "invalid_parameter");
        assert_eq!(code("n=0"), "out_of_range");
        assert_eq!(code("n=-4"), "out_of_range");
        assert_eq!(code("n=11"), "out_of_range");
        assert_eq!(code("n=99999999999999999999999"), "out_of_range");
        assert_eq!(
            code("n=999999999999999999999999999999999999999999"),
            "invalid_parameter"
        );
    }

    #[test]
    fn tokens_compare_exactly() {
        let mut h = HeaderMap::new();
        assert!(!token_matches(&h, "s3cret"));
        h.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(token_matches(&h, "s3cret"));
        assert!(!token_matches(&h, "s3cre"));
        h.insert(header::AUTHORIZATION, "Basic s3cret".parse().unwrap());
        assert!(!token_matches(&h, "s3cret"));
    }
}
