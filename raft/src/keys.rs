//! The key layout of the state machine's one ordered keyspace.
//!
//! Every key starts with a one-byte table tag; numbers are big-endian so that byte order is
//! numeric order. Keeping all tables in one keyspace lets one atomic batch carry an apply call
//! together with `last_applied`, and lets a snapshot be a plain dump of the keyspace.

use crate::types::{Millis, PayloadRef, WorkId, WorkerId};

/// `m`: the [`crate::machine::Meta`] record (counters, time, budget).
pub const META: &[u8] = b"m";
/// `s`: storage-owned records (last applied log id, membership), written by the store.
pub const LAST_APPLIED: &[u8] = b"s:last_applied";
pub const MEMBERSHIP: &[u8] = b"s:membership";
/// `v`: the cluster version ([`crate::version`]), a big-endian `u32`; absent means
/// [`crate::version::BASE`]. A key of its own, not a field of the meta record, so that the
/// builds before it read the state (and snapshots) it is in.
pub const CLUSTER_VERSION: &[u8] = b"v";
/// `n`: the [`crate::types::Tallies`] of cluster version 3 (cancelled and retried items),
/// absent until the first cancel or retry.
pub const TALLIES: &[u8] = b"n";

/// `k`: the [`crate::types::QueuedByPriority`] record of cluster version 4 (how many
/// queued items each priority other than the default holds), absent until the first one.
pub const QUEUED_BY_PRIORITY: &[u8] = b"k";

/// Item metadata, by id.
pub const ITEM: u8 = b'i';
/// Live payloads, by where they are: (log index, ordinal) -> (term, id), present while the
/// item holds its payload (queued, running, dead, cancelled), before cluster version 5
/// ([`crate::version::ITEM_PAYLOADS`]) only: builds before it find the payloads they must
/// keep and send by these records. From version 5 the item records alone say it
/// ([`crate::machine::live_payload_of`]).
pub const PAYLOAD: u8 = b'p';
/// The FIFO queue of the default priority: queued item ids.
pub const QUEUE: u8 = b'q';
/// The FIFO queues of the other priorities (cluster version 4): (rank, id), rank being
/// `9 - priority`, so higher priorities come first.
pub const PRIORITY_QUEUE: u8 = b'u';
/// An item's priority, when it is not the default (cluster version 4): id -> priority byte.
pub const PRIORITY: u8 = b'y';
/// Lease deadlines: (deadline, id), for the reaper.
pub const LEASE: u8 = b'l';
/// Lease owners: (worker, id) -> attempt, for heartbeats and reclaiming a lost worker.
pub const OWNER: u8 = b'o';
/// Completed, not yet pulled: completion sequence -> id (newest last).
pub const COMPLETED: u8 = b'c';
/// Pulled items kept for the retention window: (pulled_at, id).
pub const PULLED: u8 = b'r';
/// Dead and cancelled items: (died_at, id), oldest first, for their retention.
pub const DEAD: u8 = b'd';
/// Enqueue idempotency keys.
pub const ENQUEUE_KEY: u8 = b'e';
/// Take (pullCompleted) idempotency keys.
pub const TAKE_KEY: u8 = b't';
/// Idempotency key expiry index: (expires_at, table tag, key).
pub const KEY_EXPIRY: u8 = b'x';
/// The worker table, by worker id.
pub const WORKER: u8 = b'w';

/// One key of the keyspace, typed: [`Key::encode`] writes it and [`Key::decode`] reads it
/// back, so no other code slices key bytes. (The storage-owned `s:` records and the meta
/// record are fixed byte strings, above.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Item(WorkId),
    /// A live payload, by where the log holds it.
    Payload {
        index: u64,
        ordinal: u32,
    },
    Queue(WorkId),
    PriorityQueue {
        rank: u8,
        id: WorkId,
    },
    Priority(WorkId),
    Lease {
        deadline: Millis,
        id: WorkId,
    },
    Owner {
        worker: WorkerId,
        id: WorkId,
    },
    /// An unpulled result by completion sequence; its value is the item's id.
    Completed(u64),
    Pulled {
        at: Millis,
        id: WorkId,
    },
    Dead {
        at: Millis,
        id: WorkId,
    },
    /// An idempotency key of table [`ENQUEUE_KEY`] or [`TAKE_KEY`].
    Idempotency {
        table: u8,
        key: String,
    },
    /// When an idempotency key is forgotten.
    KeyExpiry {
        expires_at: Millis,
        table: u8,
        key: String,
    },
    Worker(WorkerId),
}

impl Key {
    pub fn encode(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(32);
        k.push(self.tag());
        let mut n = |v: u64| k.extend_from_slice(&v.to_be_bytes());
        match self {
            Key::Item(id) => n(id.0),
            Key::Payload { index, .. } => n(*index),
            Key::Queue(id) | Key::Priority(id) => n(id.0),
            Key::PriorityQueue { .. } => {}
            Key::Lease { deadline, id } => {
                n(*deadline);
                n(id.0);
            }
            Key::Owner { worker, id } => {
                n(worker.0);
                n(id.0);
            }
            Key::Completed(seq) => n(*seq),
            Key::Pulled { at, id } | Key::Dead { at, id } => {
                n(*at);
                n(id.0);
            }
            Key::Idempotency { .. } => {}
            Key::KeyExpiry { expires_at, .. } => n(*expires_at),
            Key::Worker(id) => n(id.0),
        }
        match self {
            Key::Payload { ordinal, .. } => k.extend_from_slice(&ordinal.to_be_bytes()),
            Key::PriorityQueue { rank, id } => {
                k.push(*rank);
                k.extend_from_slice(&id.0.to_be_bytes());
            }
            Key::Idempotency { key, .. } => k.extend_from_slice(key.as_bytes()),
            Key::KeyExpiry { table, key, .. } => {
                k.push(*table);
                k.extend_from_slice(key.as_bytes());
            }
            _ => {}
        }
        k
    }

    /// The table tag a key starts with.
    pub fn tag(&self) -> u8 {
        match self {
            Key::Item(_) => ITEM,
            Key::Payload { .. } => PAYLOAD,
            Key::Queue(_) => QUEUE,
            Key::PriorityQueue { .. } => PRIORITY_QUEUE,
            Key::Priority(_) => PRIORITY,
            Key::Lease { .. } => LEASE,
            Key::Owner { .. } => OWNER,
            Key::Completed(_) => COMPLETED,
            Key::Pulled { .. } => PULLED,
            Key::Dead { .. } => DEAD,
            Key::Idempotency { table, .. } => *table,
            Key::KeyExpiry { .. } => KEY_EXPIRY,
            Key::Worker(_) => WORKER,
        }
    }

    /// Reads a key of any table; `None` for bytes that are not one (a corrupt store, or one
    /// of the fixed records).
    pub fn decode(bytes: &[u8]) -> Option<Key> {
        let (&tag, rest) = bytes.split_first()?;
        let mut r = Reader(rest);
        let key = match tag {
            ITEM => Key::Item(WorkId(r.u64()?)),
            PAYLOAD => Key::Payload {
                index: r.u64()?,
                ordinal: r.u32()?,
            },
            QUEUE => Key::Queue(WorkId(r.u64()?)),
            PRIORITY_QUEUE => Key::PriorityQueue {
                rank: r.u8()?,
                id: WorkId(r.u64()?),
            },
            PRIORITY => Key::Priority(WorkId(r.u64()?)),
            LEASE => Key::Lease {
                deadline: r.u64()?,
                id: WorkId(r.u64()?),
            },
            OWNER => Key::Owner {
                worker: WorkerId(r.u64()?),
                id: WorkId(r.u64()?),
            },
            COMPLETED => Key::Completed(r.u64()?),
            PULLED => Key::Pulled {
                at: r.u64()?,
                id: WorkId(r.u64()?),
            },
            DEAD => Key::Dead {
                at: r.u64()?,
                id: WorkId(r.u64()?),
            },
            ENQUEUE_KEY | TAKE_KEY => Key::Idempotency {
                table: tag,
                key: r.rest_str()?,
            },
            KEY_EXPIRY => Key::KeyExpiry {
                expires_at: r.u64()?,
                table: r.u8().filter(|t| matches!(*t, ENQUEUE_KEY | TAKE_KEY))?,
                key: r.rest_str()?,
            },
            WORKER => Key::Worker(WorkerId(r.u64()?)),
            _ => return None,
        };
        r.0.is_empty().then_some(key)
    }

    /// The work id a key names, for the tables keyed by item.
    pub fn work_id(&self) -> Option<WorkId> {
        match self {
            Key::Item(id) | Key::Queue(id) | Key::Priority(id) => Some(*id),
            Key::PriorityQueue { id, .. } => Some(*id),
            Key::Lease { id, .. }
            | Key::Owner { id, .. }
            | Key::Pulled { id, .. }
            | Key::Dead { id, .. } => Some(*id),
            _ => None,
        }
    }
}

/// Reads fixed-width big-endian fields off the front of a key.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_be_bytes)
    }
    fn rest_str(&mut self) -> Option<String> {
        let s = std::str::from_utf8(self.0).ok()?.to_owned();
        self.0 = &[];
        Some(s)
    }
}

pub fn item(id: WorkId) -> Vec<u8> {
    Key::Item(id).encode()
}
pub fn payload(at: &PayloadRef) -> Vec<u8> {
    Key::Payload {
        index: at.index,
        ordinal: at.ordinal,
    }
    .encode()
}
pub fn queue(id: WorkId) -> Vec<u8> {
    Key::Queue(id).encode()
}
/// Where a queued item of `priority` waits: the default priority's queue or another's.
pub fn queue_of(priority: u8, id: WorkId) -> Vec<u8> {
    if priority == crate::types::DEFAULT_PRIORITY {
        queue(id)
    } else {
        Key::PriorityQueue {
            rank: crate::types::MAX_PRIORITY - priority.min(crate::types::MAX_PRIORITY),
            id,
        }
        .encode()
    }
}
/// The range of one priority's queue.
pub fn queue_range(priority: u8) -> (Vec<u8>, Vec<u8>) {
    if priority == crate::types::DEFAULT_PRIORITY {
        table(QUEUE)
    } else {
        prefix_range(&[
            PRIORITY_QUEUE,
            crate::types::MAX_PRIORITY - priority.min(crate::types::MAX_PRIORITY),
        ])
    }
}
pub fn priority(id: WorkId) -> Vec<u8> {
    Key::Priority(id).encode()
}
pub fn lease(deadline: Millis, id: WorkId) -> Vec<u8> {
    Key::Lease { deadline, id }.encode()
}
pub fn owner(worker: WorkerId, id: WorkId) -> Vec<u8> {
    Key::Owner { worker, id }.encode()
}
/// The prefix of every [`Key::Owner`] of one worker.
pub fn owner_prefix(worker: WorkerId) -> Vec<u8> {
    let mut k = vec![OWNER];
    k.extend_from_slice(&worker.0.to_be_bytes());
    k
}
pub fn completed(seq: u64) -> Vec<u8> {
    Key::Completed(seq).encode()
}
pub fn pulled(at: Millis, id: WorkId) -> Vec<u8> {
    Key::Pulled { at, id }.encode()
}
pub fn dead(at: Millis, id: WorkId) -> Vec<u8> {
    Key::Dead { at, id }.encode()
}
pub fn idempotency(table: u8, key: &str) -> Vec<u8> {
    Key::Idempotency {
        table,
        key: key.to_owned(),
    }
    .encode()
}
/// An idempotency key a node draws for requests that came without one (a proposer batch's,
/// or one request's): `n{node}:{nonce}`, the nonce as 32 lowercase hex digits. (Nodes store
/// client keys as `c:{kind}:{key}`.) Only the text [`fmt::Display`] writes parses
/// ([`NodeKey::parse`]), so a key and its value stand for each other, whoever wrote the
/// record: a store can index the node keys it holds by value ([`NodeKey::of_record`]).
///
/// [`fmt::Display`]: std::fmt::Display
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeKey {
    pub node: u64,
    pub nonce: u128,
}

impl NodeKey {
    /// `key` as a node key, if it is one as [`fmt::Display`](std::fmt::Display) writes it.
    pub fn parse(key: &str) -> Option<NodeKey> {
        let (node, nonce) = key.strip_prefix('n')?.split_once(':')?;
        let parsed = NodeKey {
            node: node.parse().ok()?,
            nonce: u128::from_str_radix(nonce, 16).ok()?,
        };
        // Any other spelling of the same numbers ("+1", "01", upper case, fewer digits) is
        // another key.
        let canonical = node.len() == decimal_digits(parsed.node)
            && nonce.len() == 32
            && !nonce.bytes().any(|b| b.is_ascii_uppercase() || b == b'+');
        canonical.then_some(parsed)
    }

    /// The table and node key of an encoded idempotency record's key, if its key is one.
    pub fn of_record(key: &[u8]) -> Option<(u8, NodeKey)> {
        let prefix = NODE_KEY_PREFIXES.iter().find(|p| key.starts_with(&p[..]))?;
        let text = std::str::from_utf8(&key[1..]).ok()?;
        Some((prefix[0], NodeKey::parse(text)?))
    }
}

/// Where the records of [`NodeKey`]s are: each idempotency table's keys that start with `n`.
pub const NODE_KEY_PREFIXES: [[u8; 2]; 2] = [[ENQUEUE_KEY, b'n'], [TAKE_KEY, b'n']];

fn decimal_digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

impl std::fmt::Display for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "n{}:{:032x}", self.node, self.nonce)
    }
}

pub fn key_expiry(expires_at: Millis, table: u8, key: &str) -> Vec<u8> {
    Key::KeyExpiry {
        expires_at,
        table,
        key: key.to_owned(),
    }
    .encode()
}
pub fn worker(id: WorkerId) -> Vec<u8> {
    Key::Worker(id).encode()
}

/// The range of a time-ordered table (leases, pulled, dead, key expiry) whose keys' leading
/// time is at most `bound`.
pub fn up_to(tag: u8, bound: Millis) -> (Vec<u8>, Vec<u8>) {
    let mut end = vec![tag];
    end.extend_from_slice(&bound.saturating_add(1).to_be_bytes());
    (vec![tag], end)
}

/// The half-open range of all keys of one table.
pub fn table(tag: u8) -> (Vec<u8>, Vec<u8>) {
    (vec![tag], vec![tag + 1])
}

/// The half-open range of keys that start with `prefix`.
pub fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut end = prefix.to_vec();
    // Every prefix here ends in a fixed-width number, never 0xff..ff in practice; walk back
    // over 0xff bytes to stay correct anyway.
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return (prefix.to_vec(), end);
        }
    }
    (prefix.to_vec(), vec![0xff; prefix.len() + 1])
}

/// Reads a big-endian u64 at `at` in a key.
pub fn u64_at(key: &[u8], at: usize) -> Option<u64> {
    key.get(at..at + 8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("slice of 8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Key> {
        vec![
            Key::Item(WorkId(7)),
            Key::Payload {
                index: 9,
                ordinal: 3,
            },
            Key::Queue(WorkId(u64::MAX)),
            Key::PriorityQueue {
                rank: 2,
                id: WorkId(6),
            },
            Key::Priority(WorkId(8)),
            Key::Lease {
                deadline: 1_000,
                id: WorkId(2),
            },
            Key::Owner {
                worker: WorkerId(4),
                id: WorkId(5),
            },
            Key::Completed(11),
            Key::Pulled {
                at: 3,
                id: WorkId(1),
            },
            Key::Dead {
                at: 0,
                id: WorkId(0),
            },
            Key::Idempotency {
                table: ENQUEUE_KEY,
                key: "c:enqueue:k-1".into(),
            },
            Key::Idempotency {
                table: TAKE_KEY,
                key: String::new(),
            },
            Key::KeyExpiry {
                expires_at: 120_000,
                table: TAKE_KEY,
                key: "n1:ab".into(),
            },
            Key::Worker(WorkerId(3)),
        ]
    }

    #[test]
    fn every_key_decodes_to_itself_and_nothing_else_decodes() {
        for key in samples() {
            let bytes = key.encode();
            assert_eq!(bytes[0], key.tag());
            assert_eq!(Key::decode(&bytes), Some(key.clone()), "{bytes:02x?}");
            // A fixed-width key cut short or grown is not a key.
            if !matches!(key, Key::Idempotency { .. } | Key::KeyExpiry { .. }) {
                assert_eq!(Key::decode(&bytes[..bytes.len() - 1]), None, "{key:?} cut");
                let mut longer = bytes.clone();
                longer.push(0);
                assert_eq!(Key::decode(&longer), None, "{key:?} grown");
            }
        }
        for fixed in [
            META,
            LAST_APPLIED,
            MEMBERSHIP,
            CLUSTER_VERSION,
            &[][..],
            &[KEY_EXPIRY, 0][..],
        ] {
            assert_eq!(Key::decode(fixed), None, "{fixed:02x?}");
        }
        // An expiry must name an idempotency table.
        let mut bad = Key::KeyExpiry {
            expires_at: 1,
            table: ENQUEUE_KEY,
            key: "k".into(),
        }
        .encode();
        bad[9] = ITEM;
        assert_eq!(Key::decode(&bad), None);
    }

    #[test]
    fn byte_order_is_numeric_order_within_a_table() {
        let times = [0u64, 1, 255, 256, 65_535, 1 << 40, u64::MAX];
        for w in times.windows(2) {
            let a = Key::Lease {
                deadline: w[0],
                id: WorkId(u64::MAX),
            };
            let b = Key::Lease {
                deadline: w[1],
                id: WorkId(0),
            };
            assert!(a.encode() < b.encode(), "{a:?} < {b:?}");
            assert!(Key::Queue(WorkId(w[0])).encode() < Key::Queue(WorkId(w[1])).encode());
        }
        // `up_to` takes exactly the keys whose leading time is at most the bound.
        let (start, end) = up_to(DEAD, 10);
        let inside = |at| {
            let k = Key::Dead {
                at,
                id: WorkId(u64::MAX),
            }
            .encode();
            start <= k && k < end
        };
        assert!(inside(0) && inside(10) && !inside(11));
    }

    #[test]
    fn a_node_key_has_one_spelling() {
        let keys = [
            NodeKey { node: 0, nonce: 0 },
            NodeKey {
                node: 1,
                nonce: 0xab,
            },
            NodeKey {
                node: 10,
                nonce: 1 << 64,
            },
            NodeKey {
                node: u64::MAX,
                nonce: u128::MAX,
            },
        ];
        for key in keys {
            let text = key.to_string();
            assert_eq!(NodeKey::parse(&text), Some(key), "{text}");
            let record = idempotency(ENQUEUE_KEY, &text);
            assert_eq!(NodeKey::of_record(&record), Some((ENQUEUE_KEY, key)));
            assert_eq!(
                NodeKey::of_record(&idempotency(TAKE_KEY, &text)),
                Some((TAKE_KEY, key))
            );
            // Its expiry record and other tables are not idempotency records.
            assert_eq!(NodeKey::of_record(&key_expiry(5, ENQUEUE_KEY, &text)), None);
            let mut other = record.clone();
            other[0] = ITEM;
            assert_eq!(NodeKey::of_record(&other), None);
        }
        let nonce = "0".repeat(31) + "a";
        for other in [
            format!("n01:{nonce}"),
            format!("n+1:{nonce}"),
            format!("n:{nonce}"),
            format!("n1:+{}", &nonce[1..]),
            format!("n1:{}", nonce.to_uppercase()),
            format!("n1:{}", &nonce[1..]),
            format!("n1:0{nonce}"),
            format!("n1:{nonce}:"),
            format!("c1:{nonce}"),
            format!("n18446744073709551616:{nonce}"),
            "c:enqueue:n1".to_string(),
            String::new(),
        ] {
            assert_eq!(NodeKey::parse(&other), None, "{other}");
            assert_eq!(
                NodeKey::of_record(&idempotency(ENQUEUE_KEY, &other)),
                None,
                "{other}"
            );
        }
        assert_eq!(NodeKey::of_record(&[ENQUEUE_KEY, b'n', 0xff]), None);
    }

    /// Whatever one byte changed, inserted or dropped does to a node key's text, what parses
    /// is the text of what it parses to.
    #[test]
    fn only_a_node_keys_own_text_parses() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"0123456789abcdefABCDEF+-:n ";
        let mut parsed = 0;
        for _ in 0..20_000 {
            let key = NodeKey {
                node: next() % [10, 1_000, u64::MAX][(next() % 3) as usize],
                nonce: (u128::from(next()) << 64 | u128::from(next())) >> (next() % 128),
            };
            let mut text = key.to_string().into_bytes();
            let at = (next() as usize) % (text.len() + 1);
            let byte = alphabet[(next() as usize) % alphabet.len()];
            match next() % 3 {
                0 if at < text.len() => text[at] = byte,
                1 if at < text.len() => {
                    text.remove(at);
                }
                _ => text.insert(at, byte),
            }
            let text = String::from_utf8(text).unwrap();
            if let Some(other) = NodeKey::parse(&text) {
                assert_eq!(other.to_string(), text);
                parsed += 1;
            }
        }
        // Some changes give another key's text (a digit for a digit): those parse.
        assert!(parsed > 1_000, "{parsed}");
    }
}
