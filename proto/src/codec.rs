//! The compact binary encoding used on the Raft wire, the worker wire and in sled: postcard
//! (varint integers, no field names), through serde.

use std::cell::RefCell;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserializer, Serialize};

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
    let out = Vec::with_capacity(encoded_len(value));
    postcard::to_extend(value, out).expect(SIZED)
}

/// Appends `value` encoded to `out`, making room for its length first.
pub fn encode_onto<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    out.reserve(encoded_len(value));
    *out = postcard::to_extend(value, std::mem::take(out)).expect(SIZED);
}

const SIZED: &str = "postcard encodes every sized serde value";

/// The length of `value` encoded, counted by a walk that copies nothing (postcard's `Size`
/// flavor). Encoding into a buffer of that room copies a large value (an entry of 16 KiB
/// payloads) once, where a growing buffer copies it again at each doubling.
fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default()).expect(SIZED)
}

/// Decodes a value whose byte strings marked `#[serde(deserialize_with =
/// "codec::shared_bytes")]` become slices of `bytes`, sharing its buffer, instead of copies
/// (the payloads of a forwarded batch or of replicated entries: each would otherwise be one
/// more allocation and copy per node). The slices keep all of `bytes` alive, so this is for
/// bodies whose parts live about as long as each other, not for picking one payload out of
/// a large read.
pub fn decode_shared<T: DeserializeOwned>(
    what: &'static str,
    bytes: &Bytes,
) -> Result<T, DecodeError> {
    let _lent = Lent::lend(bytes.clone());
    decode(what, bytes)
}

/// The body lent to [`shared_bytes`] for one decode; whatever was lent before comes back
/// when it drops, even if the decode panicked.
struct Lent(Option<Bytes>);

impl Lent {
    fn lend(bytes: Bytes) -> Lent {
        Lent(SOURCE.with(|s| s.replace(Some(bytes))))
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let previous = self.0.take();
        SOURCE.with(|s| s.replace(previous));
    }
}

thread_local! {
    /// The buffer [`decode_shared`] is decoding on this thread.
    static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Deserializes a byte string as a slice of the buffer [`decode_shared`] decodes, when it
/// lies in it, and as a copy otherwise (any other decoder, or a format that does not lend
/// its input).
pub fn shared_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
    d.deserialize_bytes(SharedBytes)
}

struct SharedBytes;

impl<'de> Visitor<'de> for SharedBytes {
    type Value = Bytes;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Bytes, E> {
        let shared = SOURCE.with(|s| {
            let source = s.borrow();
            let source = source.as_ref()?;
            let within = source.as_ptr_range();
            let part = v.as_ptr_range();
            (!v.is_empty() && within.start <= part.start && part.end <= within.end)
                .then(|| source.slice_ref(v))
        });
        Ok(shared.unwrap_or_else(|| Bytes::copy_from_slice(v)))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
        Ok(Bytes::copy_from_slice(v))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Bytes, E> {
        Ok(Bytes::copy_from_slice(v.as_bytes()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(Bytes::from(out))
    }
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

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Carrier {
        id: u32,
        #[serde(deserialize_with = "shared_bytes")]
        payload: Bytes,
        #[serde(deserialize_with = "shared_bytes")]
        empty: Bytes,
    }

    fn carrier(id: u32, len: usize) -> Carrier {
        Carrier {
            id,
            payload: Bytes::from(vec![id as u8; len]),
            empty: Bytes::new(),
        }
    }

    fn lies_within(part: &Bytes, whole: &Bytes) -> bool {
        let (part, whole) = (part.as_ptr_range(), whole.as_ptr_range());
        whole.start <= part.start && part.end <= whole.end
    }

    #[test]
    fn shared_decoding_slices_payloads_out_of_the_body_and_plain_decoding_copies_them() {
        let sent = vec![carrier(1, 5_000), carrier(2, 1)];
        let body = Bytes::from(encode(&sent));
        let shared: Vec<Carrier> = decode_shared("carriers", &body).unwrap();
        assert_eq!(shared, sent);
        assert!(
            shared.iter().all(|c| lies_within(&c.payload, &body)),
            "no copy"
        );
        let copied: Vec<Carrier> = decode("carriers", &body).unwrap();
        assert_eq!(copied, sent);
        assert!(copied.iter().all(|c| !lies_within(&c.payload, &body)));
        // A slice outlives the decode and the caller's handle on the body.
        drop(body);
        assert_eq!(shared[0].payload, Bytes::from(vec![1u8; 5_000]));
    }

    #[test]
    fn a_shared_decode_inside_another_gives_the_outer_one_its_body_back() {
        let inner = Bytes::from(encode(&carrier(3, 100)));
        let outer = Bytes::from(encode(&carrier(4, 100)));
        // As inside the outer decode (a Deserialize impl decoding an embedded body).
        SOURCE.with(|s| s.replace(Some(outer.clone())));
        let nested: Carrier = decode_shared("inner", &inner).unwrap();
        assert!(lies_within(&nested.payload, &inner));
        let back = SOURCE.with(|s| s.replace(None));
        assert_eq!(back.map(|b| b.as_ptr()), Some(outer.as_ptr()));
    }

    #[test]
    fn formats_that_do_not_lend_their_input_still_decode_byte_strings() {
        let sent = carrier(5, 3);
        let json = serde_json::to_string(&sent).unwrap();
        let back: Carrier = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sent);
    }

    /// Panics when decoded, as a bug in a decoder would.
    struct Bomb;

    impl<'de> serde::Deserialize<'de> for Bomb {
        fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Bomb, D::Error> {
            panic!("a decoder bug")
        }
    }

    #[test]
    fn a_decode_that_panics_takes_back_the_body_it_was_lent() {
        let body = Bytes::from(encode(&carrier(6, 100)));
        let panicked =
            std::panic::catch_unwind(|| decode_shared::<Bomb>("a bomb", &body).is_ok()).is_err();
        assert!(panicked);
        assert!(SOURCE.with(|s| s.borrow().is_none()), "nothing stays lent");
        // A later plain decode of a sub-slice of that body copies.
        let copied: Carrier = decode("carrier", &body).unwrap();
        assert!(!lies_within(&copied.payload, &body));
    }
}
