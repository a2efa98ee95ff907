//! Header names hashq reads or writes beyond the standard ones (names in lowercase, as HTTP/2
//! and the `http` crate spell them).

/// The header that carries a credential: `Authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// A client's key for a write it may retry: a retry with the same key returns the first
/// call's answer and applies nothing again.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Set to `true` on an answer that replays an earlier call with the same idempotency key.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Set on a follower's forwarded read (to the sending node's id), so it is never forwarded
/// twice.
pub const FORWARDED: &str = "x-hashq-forwarded";
