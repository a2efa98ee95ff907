//! HTTP routes, split by audience, each behind its own credential ([`Audience`]):
//! [`client`] (the exercise's API) and the `/status` and `/metrics` of [`observability`]
//! (the client token when one is set), [`worker`] (leases and results) and the binary
//! download in [`internal`] (the worker credential), [`admin`] (the worker budget; the admin
//! credential), [`raft`] (consensus RPC) and the forwarding route in [`internal`] (the peer
//! credential). Public: `/health` ([`observability`]) and the static [`assets`] (the
//! dashboard page, the OpenAPI document). [`client_router`] is the client API alone, for a
//! listener that faces clients (`--client-listen`).

pub mod admin;
pub mod assets;
pub mod batch;
pub mod client;
pub mod internal;
pub mod members;
pub mod observability;
pub mod raft;
pub mod work;
pub mod worker;

use std::any::Any;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hashq_proto::codec::{self, POSTCARD};
use hashq_tls::PeerCertified;
use serde::de::DeserializeOwned;
use serde::Serialize;
use subtle::ConstantTimeEq;
use tower::util::MapResponseLayer;
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::{error_response, ApiError};
use crate::http::{self, BodyBudget, BodyRules};
use crate::node::{Node, Stats};

/// Bodies of Raft and node-to-node routes may be this large (a few batches of log entries).
pub const PEER_BODY_LIMIT: usize = 64 << 20;
/// Bodies of worker routes (results, heartbeats) are small.
pub const WORKER_BODY_LIMIT: usize = 4 << 20;
/// Bodies of admin routes are small JSON documents.
const ADMIN_BODY_LIMIT: usize = 64 << 10;

/// The whole HTTP surface of a node.
pub fn router(node: Node) -> Router {
    let gates = &node.gates();
    let peer = gated(
        raft::router().merge(internal::peer_router()),
        &node,
        Audience::Peer,
        PEER_BODY_LIMIT,
        None,
    );
    // Snapshots stream to a file as they arrive: credential and slots, no body buffering.
    let snapshots = raft::snapshot_router()
        .route_layer(middleware::from_fn_with_state(
            node.gates().peer.clone(),
            http::limit,
        ))
        .route_layer(middleware::from_fn_with_state(
            (node.clone(), Audience::Peer),
            require,
        ))
        .layer(DefaultBodyLimit::disable());
    let worker = gated(
        worker::router().merge(internal::worker_router()),
        &node,
        Audience::Worker,
        WORKER_BODY_LIMIT,
        Some(gates.bodies.clone()),
    );
    let admin = gated(
        admin::router().merge(members::router()),
        &node,
        Audience::Admin,
        ADMIN_BODY_LIMIT,
        Some(gates.bodies.clone()),
    );
    finish(
        client_routes(&node)
            .merge(peer)
            .merge(snapshots)
            .merge(worker)
            .merge(admin),
        node,
    )
}

/// The client API alone: no Raft, worker, admin or internal route answers here.
pub fn client_router(node: Node) -> Router {
    finish(client_routes(&node), node)
}

fn client_routes(node: &Node) -> Router<Node> {
    let api = gated(
        client::router().merge(observability::router()),
        node,
        Audience::Client,
        node.config().limits.max_body_bytes,
        Some(node.gates().bodies.clone()),
    );
    // Batches have a body limit of their own (`--max-batch-bytes`).
    let batch = gated(
        batch::router(),
        node,
        Audience::Client,
        batch::body_limit(&node.config().limits),
        Some(node.gates().bodies.clone()),
    );
    let public = observability::public_router()
        .merge(assets::router())
        .route_layer(middleware::from_fn_with_state(
            node.gates().public.clone(),
            http::limit,
        ));
    api.merge(batch).merge(public)
}

/// `routes` behind the audience's credential (checked first, before any body byte is read),
/// then its body rules, then its request slots.
fn gated(
    routes: Router<Node>,
    node: &Node,
    audience: Audience,
    body_limit: usize,
    budget: Option<BodyBudget>,
) -> Router<Node> {
    let capacity = match audience {
        Audience::Peer => node.gates().peer.clone(),
        Audience::Worker => node.gates().worker.clone(),
        Audience::Admin => node.gates().admin.clone(),
        Audience::Client => node.gates().client.clone(),
    };
    let gate = Arc::new(Gate {
        node: node.clone(),
        audience,
        rules: BodyRules {
            limit: body_limit,
            budget,
            limits: node.config().http.clone(),
        },
        capacity,
    });
    routes
        .route_layer(middleware::from_fn_with_state(gate, gated_request))
        // Bodies are read and bounded by `http::buffered`; extractors take them as they are.
        .layer(DefaultBodyLimit::disable())
}

/// What a request to a [`gated`] route passes, in order.
struct Gate {
    node: Node,
    audience: Audience,
    rules: BodyRules,
    capacity: Arc<http::Capacity>,
}

/// Middleware of [`gated`] routes: the credential, then the body, then a slot. One layer,
/// not three, because each layer costs every request a boxed future and a clone of the route.
async fn gated_request(State(gate): State<Arc<Gate>>, request: Request, next: Next) -> Response {
    if let Err(e) = credential(&gate.node, gate.audience, &request) {
        return e.into_response();
    }
    let (request, budget) = match http::buffered(request, &gate.rules).await {
        Ok(buffered) => buffered,
        Err(refused) => return refused,
    };
    let slot = match gate.capacity.slot().await {
        Ok(slot) => slot,
        Err(busy) => return busy,
    };
    let response = next.run(request).await;
    drop((slot, budget));
    response
}

/// The layers every listener shares.
fn finish(routes: Router<Node>, node: Node) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(MapResponseLayer::new(count_requests(node.clone())))
        .layer(CatchPanicLayer::custom(panic_response))
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

/// Counts every answer by its status: a plain response map, which, unlike a `from_fn`
/// layer, neither boxes a future nor clones the route for every request.
fn count_requests(node: Node) -> impl Fn(Response) -> Response + Clone + Send + Sync {
    move |response: Response| {
        let stats = node.stats();
        Stats::add(&stats.requests, 1);
        let status = response.status();
        if status.is_client_error() {
            stats.client_errors.fetch_add(1, Ordering::Relaxed);
        } else if status.is_server_error() {
            stats.server_errors.fetch_add(1, Ordering::Relaxed);
        }
        response
    }
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

/// Who a route is for; each audience has its own credential (see the README's Security section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// Other nodes: Raft RPC and forwarding (`--cluster-token`).
    Peer,
    /// Workers: the worker routes and the binary download (`--worker-token`).
    Worker,
    /// Operators: the admin routes (`--admin-token`).
    Admin,
    /// Clients: the client API, `/status` and `/metrics` (`--client-token`, optional).
    Client,
}

/// Whether a request carries the credential `audience` needs on this node (and, for a peer
/// of a TLS cluster, came over a connection that presented a certificate of the cluster CA).
pub fn authorized(
    node: &Node,
    audience: Audience,
    headers: &HeaderMap,
    certified: Option<&PeerCertified>,
) -> Result<(), ApiError> {
    if audience == Audience::Peer
        && node.config().tls.is_some()
        && certified != Some(&PeerCertified(true))
    {
        return Err(ApiError::NoPeerCertificate);
    }
    let credentials = &node.config().credentials;
    let expected = match audience {
        Audience::Peer => &credentials.peer,
        Audience::Worker => &credentials.worker,
        Audience::Admin => &credentials.admin,
        Audience::Client => &credentials.client,
    };
    match expected {
        Some(expected) if token_matches(headers, expected) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized),
        // Without an admin credential the admin routes are closed, unless the operator
        // chose --insecure.
        None if audience == Audience::Admin && !credentials.insecure => {
            Err(ApiError::AdminDisabled)
        }
        None => Ok(()),
    }
}

async fn require(
    State((node, audience)): State<(Node, Audience)>,
    request: Request,
    next: Next,
) -> Response {
    match credential(&node, audience, &request) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// Whether `request` carries the audience's credential (a token, or a peer certificate).
fn credential(node: &Node, audience: Audience, request: &Request) -> Result<(), ApiError> {
    let certified = request.extensions().get::<PeerCertified>();
    authorized(node, audience, request.headers(), certified)
}

/// Checks that this node serves the client API at all (a witness does not).
pub fn serves_clients(node: &Node) -> Result<(), ApiError> {
    if node.is_witness() {
        return Err(ApiError::Witness);
    }
    Ok(())
}

/// A postcard request body.
pub struct Postcard<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Postcard<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::invalid("invalid_body", e.body_text()))?;
        // Payloads in the body (a forwarded batch, replicated entries) share its buffer.
        codec::decode_shared("request body", &bytes)
            .map(Postcard)
            .map_err(|e| ApiError::invalid("invalid_body", e.to_string()))
    }
}

impl<T: Serialize> IntoResponse for Postcard<T> {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, POSTCARD)], codec::encode(&self.0)).into_response()
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

/// An optional `priority` query parameter: 0 to 9 (higher first).
pub fn priority_param(pairs: &[(String, String)]) -> Result<Option<u8>, ApiError> {
    let mut values = pairs
        .iter()
        .filter(|(k, _)| k == "priority")
        .map(|(_, v)| v.as_str());
    let Some(raw) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::invalid(
            "invalid_parameter",
            "query parameter `priority` is given more than once",
        ));
    }
    priority_value(raw).map(Some)
}

/// A priority as a client wrote it: 0 to 9 (higher first).
pub fn priority_value(raw: &str) -> Result<u8, ApiError> {
    let max = u32::from(hashq_raft::types::MAX_PRIORITY);
    ranged("priority", raw, 0, max).map(|p| p as u8)
}

/// An optional `wait` query parameter: whole seconds (`10`, `10s`) or milliseconds
/// (`500ms`), cut to `max` (`--max-wait`); absent means no wait.
pub fn wait_param(pairs: &[(String, String)], max: Duration) -> Result<Duration, ApiError> {
    let mut values = pairs.iter().filter(|(k, _)| k == "wait").map(|(_, v)| v);
    let Some(raw) = values.next() else {
        return Ok(Duration::ZERO);
    };
    let bad = |why: String| ApiError::invalid("invalid_wait", why);
    if values.next().is_some() {
        return Err(bad("query parameter `wait` is given more than once".into()));
    }
    let (digits, unit_ms) = if let Some(ms) = raw.strip_suffix("ms") {
        (ms, 1)
    } else {
        (raw.strip_suffix('s').unwrap_or(raw), 1000)
    };
    let wait =
        (!digits.is_empty() && digits.len() <= 9 && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse::<u64>().ok())
            .flatten()
            .map(|n| Duration::from_millis(n * unit_ms))
            .ok_or_else(|| {
                bad(format!(
                    "`wait` is whole seconds (`10`, `10s`) or milliseconds (`500ms`), got `{}`",
                    raw.chars().take(40).collect::<String>()
                ))
            })?;
    Ok(wait.min(max))
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
    ranged(name, raw, 1, max)
}

/// The value `raw` of `name` as a whole number in `min..=max`, with a clear error for each
/// way it can be wrong.
pub fn ranged(name: &str, raw: &str, min: u32, max: u32) -> Result<u32, ApiError> {
    let value: i128 = raw.trim().parse().map_err(|_| {
        ApiError::invalid(
            "invalid_parameter",
            format!("`{name}` must be a whole number from {min} to {max}, got `{raw}`"),
        )
    })?;
    if value < i128::from(min) || value > i128::from(max) {
        return Err(ApiError::invalid(
            "out_of_range",
            format!("`{name}` must be from {min} to {max}, got {value}"),
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
