//! The compact binary encoding used on the Raft wire, the worker wire and in sled: postcard
//! (varint integers, no field names), through serde.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Content type of postcard bodies.
pub const POSTCARD: &str = "application/x-postcard";

/// Content type of a snapshot stream (`POST /raft/snapshot`): a length-prefixed postcard
/// header, then the snapshot file.
pub const SNAPSHOT_STREAM: &str = "application/x-hashq-snapshot";

/// A value could not be decoded: the bytes are not what the reader expected.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot decode {what}: {reason}")]
pub struct DecodeError {
    pub what: &'static str,
    pub reason: String,
}

/// Encodes a value. Every type hashq encodes has a known length, the only thing postcard
/// cannot serialize, so this cannot fail.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("postcard encodes every sized serde value")
}

/// Decodes a value, naming `what` in the error.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    postcard::from_bytes(bytes).map_err(|e| DecodeError {
        what,
        reason: e.to_string(),
    })
}
