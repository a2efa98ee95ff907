//! The JSON error body of every route, and the error codes a caller acts on.

use serde::{Deserialize, Serialize};

/// The JSON error body of every route: `{"error":{"code":..,"message":..}}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// Error codes a worker acts on (in [`ErrorDetail::code`]).
pub mod codes {
    /// The cluster does not know this worker (declared lost, or exited): register again, or
    /// for a managed worker whose slot is gone, exit.
    pub const UNKNOWN_WORKER: &str = "unknown_worker";
    /// The slot is not reserved: a managed worker must exit.
    pub const UNKNOWN_SLOT: &str = "unknown_slot";
    /// No leader right now: retry after `Retry-After`.
    pub const NO_LEADER: &str = "no_leader";
}
