//! The queue tables, kept in memory only.
//!
//! The queue tables (`q`, the default priority's FIFO, and `u`, the other priorities') say
//! nothing the item records do not: an item is queued exactly when its status is `Queued`,
//! at the place its priority and id give (the state machine's invariant). Written to sled,
//! they cost every enqueue an insert and every lease a delete, for records whose keys alone
//! matter (their values are empty). So the store keeps them here instead:
//!
//! - as runs of consecutive ids per queue: a backlog enqueued in order at one priority is one
//!   run however long it is; ids are shared by all priorities, so interleaved priorities and
//!   items back from an expired lease take an entry each;
//! - rebuilt from the item records ([`hashq_raft::machine::queue_keys`]) when the store opens and when a
//!   snapshot is installed (the file's queue records are checked against them), and dumped
//!   into every snapshot like any other record, so snapshot files are what they were;
//! - written by apply while it holds the lock of the other applied writes, and read by
//!   [`super::SledKv`] in gets and scans, which never look for these tables in sled. The
//!   tree and its queues are replaced together by an install.
//!
//! sled keeps none of their keys (those a format-3 store left there are removed at open), so
//! a data dir with queues in memory is of format 4 or later: a build that would read its
//! queues from sled refuses it instead of finding them empty.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::ops::Bound;

use hashq_raft::keys;
use hashq_raft::kv::KvError;

/// Whether `key` belongs to a queue table, kept here and never in sled.
pub(crate) fn is_queue_key(key: &[u8]) -> bool {
    matches!(key.first(), Some(&(keys::QUEUE | keys::PRIORITY_QUEUE)))
}

/// The queue tables as ranges of keys: a scan of a range that crosses them is cut there.
const TABLES: [u8; 2] = [keys::QUEUE, keys::PRIORITY_QUEUE];

/// A part of a scan's range: `(in a queue table, start, end)`.
pub(crate) type Part = (bool, Bound<Vec<u8>>, Bound<Vec<u8>>);

/// Cuts the range `(start, end)` where the queue tables begin and end: ascending parts, each
/// wholly inside a queue table or wholly outside them.
pub(crate) fn parts(start: Bound<Vec<u8>>, end: Bound<Vec<u8>>) -> Vec<Part> {
    // Where each table begins and where it ends (the next tag), ascending.
    let cuts: [&[u8]; 4] = [
        &[TABLES[0]],
        &[TABLES[0] + 1],
        &[TABLES[1]],
        &[TABLES[1] + 1],
    ];
    super::kv::cut(start, end, &cuts)
        .into_iter()
        .map(|(s, e)| {
            // A part lies wholly inside or outside the tables: its first key says which.
            let inside = super::kv::tag(&s).is_some_and(|t| TABLES.contains(&t));
            (inside, s, e)
        })
        .collect()
}

/// The queued items of every queue, by key prefix (`[q]`, or `[u, rank]`).
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub(crate) struct Queues {
    queues: BTreeMap<Vec<u8>, Runs>,
}

/// How long a queue key's prefix is, by its table.
fn prefix_len(tag: u8) -> usize {
    if tag == keys::QUEUE {
        1
    } else {
        2
    }
}

/// A queue key's prefix and id; `Err` for a key of a queue table that is not one.
fn split(key: &[u8]) -> Result<(&[u8], u64), KvError> {
    let n = key.first().map_or(0, |&t| prefix_len(t));
    match key.split_at_checked(n) {
        Some((prefix, id)) if is_queue_key(key) && id.len() == 8 => {
            Ok((prefix, u64::from_be_bytes(id.try_into().expect("8 bytes"))))
        }
        _ => Err(KvError::Corrupt {
            key: hex::encode(key),
            reason: "malformed queue key".into(),
        }),
    }
}

/// The prefix and id of a write to a queue table; `Err` for one that is not a queue
/// record's (a malformed key, or a value: queue records have none).
pub(crate) fn check<'k>(key: &'k [u8], value: Option<&[u8]>) -> Result<(&'k [u8], u64), KvError> {
    if value.is_some_and(|v| !v.is_empty()) {
        return Err(KvError::Corrupt {
            key: hex::encode(key),
            reason: "a queue record with a value".into(),
        });
    }
    split(key)
}

impl Queues {
    /// Whether `key` (of a queue table) is queued.
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        split(key).is_ok_and(|(prefix, id)| self.queues.get(prefix).is_some_and(|r| r.has(id)))
    }

    /// Puts `key` (of a queue table) into its queue, or takes it out. Queue records have
    /// empty values; anything else is not one.
    pub(crate) fn write(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), KvError> {
        let (prefix, id) = check(key, value)?;
        match value {
            Some(_) => self.queues.entry(prefix.to_vec()).or_default().insert(id),
            None => {
                if let Some(runs) = self.queues.get_mut(prefix) {
                    runs.remove(id);
                    if runs.0.is_empty() {
                        self.queues.remove(prefix);
                    }
                }
            }
        }
        Ok(())
    }

    /// How many keys one holds that the other does not.
    pub(crate) fn differences(&self, other: &Queues) -> u64 {
        let unbounded = (Bound::Unbounded, Bound::Unbounded);
        let all = |q: &Queues| -> std::collections::BTreeSet<Vec<u8>> {
            q.take(&unbounded.0, &unbounded.1, false, usize::MAX)
                .into_iter()
                .collect()
        };
        let (a, b) = (all(self), all(other));
        a.symmetric_difference(&b).count() as u64
    }

    /// How many items are queued, in all queues.
    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.queues.values().map(Runs::len).sum()
    }

    /// How many runs of consecutive ids hold them (what the memory follows).
    #[cfg(test)]
    pub(crate) fn runs(&self) -> usize {
        self.queues.values().map(|r| r.0.len()).sum()
    }

    /// Up to `n` queued keys within `(start, end)`, in scan order.
    pub(crate) fn take(
        &self,
        start: &Bound<Vec<u8>>,
        end: &Bound<Vec<u8>>,
        reverse: bool,
        n: usize,
    ) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let queues: Box<dyn Iterator<Item = (&Vec<u8>, &Runs)>> = if reverse {
            Box::new(self.queues.iter().rev())
        } else {
            Box::new(self.queues.iter())
        };
        for (prefix, runs) in queues {
            if out.len() == n {
                break;
            }
            let lo = match start {
                Bound::Included(b) => first_id(prefix, b),
                Bound::Excluded(b) => first_id(prefix, &successor(b)),
                Bound::Unbounded => 0,
            };
            let hi = match end {
                Bound::Included(b) => first_id(prefix, &successor(b)),
                Bound::Excluded(b) => first_id(prefix, b),
                Bound::Unbounded => BEYOND,
            };
            for id in runs.take(lo, hi, reverse, n - out.len()) {
                let mut key = prefix.clone();
                key.extend_from_slice(&id.to_be_bytes());
                out.push(key);
            }
        }
        out
    }
}

/// Past every id.
const BEYOND: u128 = 1 << 64;

/// The smallest byte string greater than `b`.
fn successor(b: &[u8]) -> Vec<u8> {
    let mut s = b.to_vec();
    s.push(0);
    s
}

/// The first id whose key (`prefix` then the id's 8 bytes) is at least `bound`, or
/// [`BEYOND`] when none is.
fn first_id(prefix: &[u8], bound: &[u8]) -> u128 {
    let n = prefix.len().min(bound.len());
    match bound[..n].cmp(&prefix[..n]) {
        Ordering::Less => return 0,
        Ordering::Greater => return BEYOND,
        Ordering::Equal if bound.len() <= prefix.len() => return 0,
        Ordering::Equal => {}
    }
    // Every key is as long as the prefix and 8 bytes: a shorter rest compares as if padded
    // with zeros, a longer one puts its first 8 bytes' id below the bound.
    let rest = &bound[prefix.len()..];
    let mut id = [0u8; 8];
    let k = rest.len().min(8);
    id[..k].copy_from_slice(&rest[..k]);
    u128::from(u64::from_be_bytes(id)) + u128::from(rest.len() > 8)
}

/// A set of ids as runs of consecutive ids: first -> last (inclusive), neither overlapping
/// nor touching.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
struct Runs(BTreeMap<u64, u64>);

impl Runs {
    /// The run holding `id`.
    fn run_of(&self, id: u64) -> Option<(u64, u64)> {
        self.0
            .range(..=id)
            .next_back()
            .filter(|(_, &last)| last >= id)
            .map(|(&first, &last)| (first, last))
    }

    fn has(&self, id: u64) -> bool {
        self.run_of(id).is_some()
    }

    #[cfg(test)]
    fn len(&self) -> u64 {
        self.0.iter().map(|(f, l)| l - f + 1).sum()
    }

    fn insert(&mut self, id: u64) {
        if self.has(id) {
            return;
        }
        let before = self
            .0
            .range(..id)
            .next_back()
            .filter(|(_, &last)| last.checked_add(1) == Some(id))
            .map(|(&first, _)| first);
        let after = id.checked_add(1).and_then(|next| self.0.remove(&next));
        self.0.insert(before.unwrap_or(id), after.unwrap_or(id));
    }

    fn remove(&mut self, id: u64) {
        let Some((first, last)) = self.run_of(id) else {
            return;
        };
        self.0.remove(&first);
        if first < id {
            self.0.insert(first, id - 1);
        }
        if id < last {
            self.0.insert(id + 1, last);
        }
    }

    /// Up to `n` ids in `[lo, hi)`, ascending, or descending when `reverse`.
    fn take(&self, lo: u128, hi: u128, reverse: bool, n: usize) -> Vec<u64> {
        if lo >= hi || n == 0 {
            return Vec::new();
        }
        // lo < hi <= BEYOND: both fit.
        let (lo, last) = (lo as u64, (hi - 1) as u64);
        let from = self.run_of(lo).map_or(lo, |(first, _)| first);
        let runs = self
            .0
            .range(from..=last)
            .map(|(&f, &l)| (f.max(lo), l.min(last)));
        let mut out = Vec::with_capacity(n.min(64));
        if reverse {
            for (a, b) in runs.rev() {
                out.extend((a..=b).rev().take(n - out.len()));
                if out.len() == n {
                    break;
                }
            }
        } else {
            for (a, b) in runs {
                out.extend((a..=b).take(n - out.len()));
                if out.len() == n {
                    break;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn key(prefix: &[u8], id: u64) -> Vec<u8> {
        let mut k = prefix.to_vec();
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    /// A deterministic pseudo-random sequence (xorshift), so a failure is repeatable.
    fn rng(mut s: u64) -> impl FnMut() -> u64 {
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    #[test]
    fn queues_answer_every_get_and_scan_as_a_sorted_set_of_their_keys_would() {
        let prefixes: [&[u8]; 4] = [b"q", b"u\x00", b"u\x04", b"u\x09"];
        let mut next = rng(0x9e37_79b9_7f4a_7c15);
        let mut queues = Queues::default();
        let mut model = BTreeSet::new();
        for round in 0..3000 {
            let prefix = prefixes[(next() % 4) as usize];
            // Ids near each other (runs that grow, split and merge), and some at the ends.
            let id = match next() % 10 {
                0 => u64::MAX - next() % 3,
                1 => next() % 3,
                _ => 1000 + next() % 200,
            };
            let k = key(prefix, id);
            if next().is_multiple_of(3) {
                queues.write(&k, None).unwrap();
                model.remove(&k);
            } else {
                queues.write(&k, Some(&[])).unwrap();
                model.insert(k.clone());
            }
            assert_eq!(queues.contains(&k), model.contains(&k), "round {round}");
            if round % 300 != 0 {
                continue;
            }
            assert_eq!(queues.len(), model.len() as u64);
            // Bounds of every shape: table edges, prefixes, whole keys, keys cut short and
            // grown, the first and last ids, 0xff bytes, neighbouring tables.
            let mut bounds: Vec<Vec<u8>> = vec![
                vec![],
                b"p".to_vec(),
                b"q".to_vec(),
                b"q\xff".to_vec(),
                b"r".to_vec(),
                b"u".to_vec(),
                b"u\x04".to_vec(),
                b"u\xff\xff".to_vec(),
                b"v".to_vec(),
                key(b"q", 0),
                key(b"u\x09", u64::MAX),
            ];
            for _ in 0..5 {
                let k = key(prefixes[(next() % 4) as usize], 1000 + next() % 200);
                bounds.push(k[..k.len() - (next() % 3) as usize].to_vec());
                let mut grown = k.clone();
                grown.push(0);
                bounds.push(grown);
                bounds.push(k);
            }
            let shapes = |b: &Vec<u8>| {
                [
                    Bound::Included(b.clone()),
                    Bound::Excluded(b.clone()),
                    Bound::Unbounded,
                ]
            };
            for s in &bounds {
                for e in &bounds {
                    for start in shapes(s) {
                        for end in shapes(e) {
                            // What BTreeMap::range refuses: an empty or inverted range.
                            let inverted = match (&start, &end) {
                                (Bound::Excluded(a), Bound::Excluded(b)) => a >= b,
                                (
                                    Bound::Included(a) | Bound::Excluded(a),
                                    Bound::Included(b) | Bound::Excluded(b),
                                ) => a > b,
                                _ => false,
                            };
                            if inverted {
                                continue;
                            }
                            let want: Vec<Vec<u8>> =
                                model.range((start.clone(), end.clone())).cloned().collect();
                            for (reverse, n) in [(false, 7), (true, 7), (true, 10_000)] {
                                let got = queues.take(&start, &end, reverse, n);
                                let mut w: Vec<_> = want.clone();
                                if reverse {
                                    w.reverse();
                                }
                                w.truncate(n);
                                assert_eq!(
                                    got, w,
                                    "round {round} {start:?}..{end:?} rev {reverse}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_backlog_enqueued_in_order_is_one_run_however_long() {
        let mut queues = Queues::default();
        for id in 0..100_000u64 {
            queues.write(&key(b"q", id), Some(&[])).unwrap();
        }
        assert_eq!((queues.len(), queues.runs()), (100_000, 1));
        // Leasing from the head keeps it one run; a lease that comes back splits nothing
        // it does not have to.
        for id in 0..10 {
            queues.write(&key(b"q", id), None).unwrap();
        }
        assert_eq!((queues.len(), queues.runs()), (99_990, 1));
        queues.write(&key(b"q", 3), Some(&[])).unwrap();
        assert_eq!(queues.runs(), 2);
        queues.write(&key(b"q", 3), None).unwrap();
        assert_eq!(queues.runs(), 1);
    }

    #[test]
    fn what_is_not_a_queue_record_is_refused() {
        let mut queues = Queues::default();
        assert!(queues.write(b"q\x00\x01", Some(&[])).is_err());
        assert!(queues.write(&key(b"u\x01", 5)[..9], Some(&[])).is_err());
        assert!(queues.write(&key(b"q", 5), Some(b"x")).is_err());
        assert!(queues.write(&key(b"i", 5), Some(&[])).is_err());
        assert_eq!(queues, Queues::default());
    }

    #[test]
    fn a_scan_is_cut_where_the_queue_tables_begin_and_end() {
        let inside = |s: &[u8], e: &[u8]| -> Vec<Part> {
            parts(Bound::Included(s.to_vec()), Bound::Excluded(e.to_vec()))
        };
        use Bound::{Excluded as X, Included as I};
        assert_eq!(
            inside(b"a", b"z"),
            vec![
                (false, I(b"a".to_vec()), X(b"q".to_vec())),
                (true, I(b"q".to_vec()), X(b"r".to_vec())),
                (false, I(b"r".to_vec()), X(b"u".to_vec())),
                (true, I(b"u".to_vec()), X(b"v".to_vec())),
                (false, I(b"v".to_vec()), X(b"z".to_vec())),
            ]
        );
        assert_eq!(
            inside(b"q", b"r"),
            vec![(true, I(b"q".to_vec()), X(b"r".to_vec()))]
        );
        assert_eq!(
            inside(b"q\x05", b"q\x07"),
            vec![(true, I(b"q\x05".to_vec()), X(b"q\x07".to_vec()))]
        );
        assert_eq!(
            inside(b"i", b"j"),
            vec![(false, I(b"i".to_vec()), X(b"j".to_vec()))]
        );
        let all = parts(Bound::Unbounded, Bound::Unbounded);
        assert_eq!(all.len(), 5);
        assert!(!all[0].0 && all[1].0 && !all[2].0 && all[3].0 && !all[4].0);
    }
}
