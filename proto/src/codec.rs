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
    let mut out = Vec::new();
    encode_onto(&mut out, value);
    out
}

/// Appends `value` encoded to `out`, making room for exactly its length first: the length
/// is counted by a walk that copies nothing, so a large value (an entry of 16 KiB payloads)
/// is copied once, not once more at each doubling of a growing buffer.
pub fn encode_onto<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    const SIZED: &str = "postcard encodes every sized serde value";
    let len = postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default())
        .expect(SIZED);
    out.reserve(len);
    *out = postcard::to_extend(value, std::mem::take(out)).expect(SIZED);
}

/// Decodes a value, naming `what` in the error.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    postcard::from_bytes(bytes).map_err(|e| DecodeError {
        what,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoding_is_postcards_in_a_buffer_of_its_exact_length() {
        let payload = vec![7u8; 100_000];
        let value = (3u64, "key", &payload[..], Some(-1i32));
        let plain = postcard::to_allocvec(&value).unwrap();
        let out = encode(&value);
        assert_eq!(out, plain);
        assert_eq!(
            out.capacity(),
            out.len(),
            "allocated once, at the exact length"
        );
        let mut prefixed = vec![1, 2];
        prefixed.reserve_exact(out.len());
        let room = prefixed.capacity();
        encode_onto(&mut prefixed, &value);
        assert_eq!(prefixed[..2], [1, 2]);
        assert_eq!(prefixed[2..], plain[..]);
        assert_eq!(prefixed.capacity(), room, "appended where there was room");
        let back: (u64, String, Vec<u8>, Option<i32>) = decode("a tuple", &out).unwrap();
        assert_eq!(back.2, payload);
    }
}
