//! Static assets, public like `/health`: the dashboard page (plain HTML and JS that polls
//! `/status` with the client token the user gives it; no build step) and the OpenAPI
//! document of the client and admin routes, both compiled into the binary.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hashq_proto::routes::assets::{DASHBOARD, OPENAPI};
use serde_json::json;

use crate::node::Node;

/// `/` (the dashboard) and `/openapi.json`.
pub fn router() -> Router<Node> {
    Router::new()
        .route(DASHBOARD, get(dashboard))
        .route(OPENAPI, get(openapi))
}

/// The live dashboard: plain HTML and JS that polls `/status` (no build step).
async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

/// The OpenAPI document of the client and admin routes, with this node's limits in it
/// (`--max-iterations`, `--max-top`, `--max-body-bytes`, `--max-wait`,
/// `--max-batch-items`), so a client or a fuzzer reading it
/// knows exactly what is accepted.
async fn openapi(State(node): State<Node>) -> Response {
    let limits = &node.config().limits;
    let mut doc: serde_json::Value =
        serde_json::from_str(include_str!("openapi.json")).unwrap_or_default();
    let mut set = |pointer: &str, value: serde_json::Value| {
        if let Some(slot) = doc.pointer_mut(pointer) {
            *slot = value;
        }
    };
    set(
        "/paths/~1enqueue/put/parameters/0/schema/maximum",
        json!(limits.max_iterations),
    );
    set(
        "/paths/~1enqueue/put/requestBody/content/application~1octet-stream/schema/maxLength",
        json!(limits.max_body_bytes),
    );
    set(
        "/paths/~1enqueue~1batch/post/parameters/0/schema/maximum",
        json!(limits.max_iterations),
    );
    set(
        "/paths/~1enqueue~1batch/post/requestBody/content/multipart~1form-data/schema/properties/f/x-max-items",
        json!(limits.max_batch_items),
    );
    set(
        "/paths/~1pullCompleted/post/parameters/0/schema/maximum",
        json!(limits.max_top),
    );
    for pointer in [
        "/paths/~1work~1{id}/get/parameters/1/schema/x-max-wait-ms",
        "/paths/~1pullCompleted/post/parameters/2/schema/x-max-wait-ms",
    ] {
        set(pointer, json!(limits.max_wait.as_millis() as u64));
    }
    ([(header::CONTENT_TYPE, "application/json")], Json(doc)).into_response()
}
