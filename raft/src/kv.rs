//! The ordered key-value view the state machine runs on.
//!
//! The state machine is written against [`Kv`] so that the same code runs on a `BTreeMap` in
//! unit tests and on sled in production. [`Overlay`] buffers the writes of one apply call on top
//! of a read-only base, so the whole call lands as one atomic batch (with `last_applied`).

use std::collections::BTreeMap;
use std::iter::Peekable;

/// A storage failure under the state machine. Apply stops and the node stops serving: the
/// state machine must never continue from a partial view.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KvError {
    #[error("storage I/O: {0}")]
    Io(String),
    #[error("corrupt record under key {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// A key-value pair from a scan.
pub type Pair = (Vec<u8>, Vec<u8>);

/// A lazy, ordered iterator over pairs.
pub type ScanIter<'a> = Box<dyn Iterator<Item = Result<Pair, KvError>> + 'a>;

/// Read access to an ordered key-value store.
pub trait KvRead {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Pairs with `start <= key < end`, ascending, or descending when `reverse`.
    fn scan<'a>(&'a self, start: &[u8], end: &[u8], reverse: bool) -> ScanIter<'a>;
}

/// Read-write access. Writes are infallible here: they are buffered, and failures surface
/// when the buffer is committed.
pub trait Kv: KvRead {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>);
    fn delete(&mut self, key: Vec<u8>);
}

/// An in-memory store for tests and for the determinism check.
pub type MemKv = BTreeMap<Vec<u8>, Vec<u8>>;

impl KvRead for MemKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(BTreeMap::get(self, key).cloned())
    }

    fn scan<'a>(&'a self, start: &[u8], end: &[u8], reverse: bool) -> ScanIter<'a> {
        if start >= end {
            return Box::new(std::iter::empty());
        }
        let range = self
            .range::<[u8], _>((
                std::ops::Bound::Included(start),
                std::ops::Bound::Excluded(end),
            ))
            .map(|(k, v)| Ok((k.clone(), v.clone())));
        if reverse {
            Box::new(range.rev())
        } else {
            Box::new(range)
        }
    }
}

impl Kv for MemKv {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.insert(key, value);
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.remove(&key);
    }
}

/// Buffered writes over a read-only base: reads see the buffer first.
pub struct Overlay<'b, B: KvRead> {
    base: &'b B,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'b, B: KvRead> Overlay<'b, B> {
    pub fn new(base: &'b B) -> Self {
        Overlay {
            base,
            writes: BTreeMap::new(),
        }
    }

    /// The buffered writes, in key order: `Some` is a put, `None` a delete.
    pub fn into_writes(self) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        self.writes
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

impl<B: KvRead> KvRead for Overlay<'_, B> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }

    fn scan<'a>(&'a self, start: &[u8], end: &[u8], reverse: bool) -> ScanIter<'a> {
        if start >= end {
            return Box::new(std::iter::empty());
        }
        let base = self.base.scan(start, end, reverse);
        let range = self
            .writes
            .range::<[u8], _>((
                std::ops::Bound::Included(start),
                std::ops::Bound::Excluded(end),
            ))
            .map(|(k, v)| (k.clone(), v.clone()));
        let writes: WriteIter<'a> = if reverse {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        merge(base, writes, reverse)
    }
}

impl<B: KvRead> Kv for Overlay<'_, B> {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }
}

/// Buffered writes in scan order: `Some` is a put, `None` a delete.
pub type WriteIter<'a> = Box<dyn Iterator<Item = (Vec<u8>, Option<Vec<u8>>)> + 'a>;

/// Merges a base scan with buffered writes over the same range, both in the scan's order;
/// on equal keys the write wins, and a buffered delete hides the base pair.
pub fn merge<'a>(base: ScanIter<'a>, writes: WriteIter<'a>, reverse: bool) -> ScanIter<'a> {
    Box::new(Merge {
        base: base.peekable(),
        writes: writes.peekable(),
        reverse,
    })
}

struct Merge<'a> {
    base: Peekable<ScanIter<'a>>,
    writes: Peekable<WriteIter<'a>>,
    reverse: bool,
}

impl Iterator for Merge<'_> {
    type Item = Result<Pair, KvError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let take_write = match (self.base.peek(), self.writes.peek()) {
                (None, None) => return None,
                (Some(Err(_)), _) => return self.base.next(),
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (Some(Ok((bk, _))), Some((wk, _))) => {
                    if bk.as_slice() == wk.as_slice() {
                        // The write shadows the base pair.
                        self.base.next();
                        true
                    } else {
                        (wk.as_slice() < bk.as_slice()) != self.reverse
                    }
                }
            };
            if take_write {
                let (k, v) = self.writes.next()?;
                match v {
                    Some(v) => return Some(Ok((k, v))),
                    None => continue,
                }
            }
            return self.base.next();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(it: ScanIter<'_>) -> Vec<Vec<u8>> {
        it.map(|r| r.unwrap().0).collect()
    }

    #[test]
    fn overlay_merges_puts_and_hides_deletes_in_both_directions() {
        let mut base = MemKv::new();
        for k in [b"a1", b"a3", b"a5", b"b1"] {
            base.insert(k.to_vec(), b"base".to_vec());
        }
        let mut o = Overlay::new(&base);
        o.put(b"a2".to_vec(), b"new".to_vec());
        o.delete(b"a3".to_vec());
        o.put(b"a5".to_vec(), b"over".to_vec());
        o.put(b"a9".to_vec(), b"new".to_vec());

        let fwd = keys(o.scan(b"a", b"b", false));
        assert_eq!(
            fwd,
            vec![
                b"a1".to_vec(),
                b"a2".to_vec(),
                b"a5".to_vec(),
                b"a9".to_vec()
            ]
        );
        let rev = keys(o.scan(b"a", b"b", true));
        assert_eq!(
            rev,
            vec![
                b"a9".to_vec(),
                b"a5".to_vec(),
                b"a2".to_vec(),
                b"a1".to_vec()
            ]
        );
        assert_eq!(o.get(b"a5").unwrap(), Some(b"over".to_vec()));
        assert_eq!(o.get(b"a3").unwrap(), None);
        assert_eq!(o.get(b"b1").unwrap(), Some(b"base".to_vec()));
        // The base is untouched until the writes are committed.
        assert_eq!(KvRead::get(&base, b"a3").unwrap(), Some(b"base".to_vec()));
    }

    #[test]
    fn overlay_applied_equals_direct_writes() {
        let mut base = MemKv::new();
        base.insert(b"k1".to_vec(), b"v".to_vec());
        let mut direct = base.clone();
        let mut o = Overlay::new(&base);
        o.put(b"k2".to_vec(), b"w".to_vec());
        o.delete(b"k1".to_vec());
        direct.put(b"k2".to_vec(), b"w".to_vec());
        direct.delete(b"k1".to_vec());
        let writes = o.into_writes();
        for (k, v) in writes {
            match v {
                Some(v) => base.put(k, v),
                None => base.delete(k),
            }
        }
        assert_eq!(base, direct);
    }
}
