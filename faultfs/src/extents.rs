//! Dirty (unsynced) byte ranges of one file, kept in memory.
//!
//! A file's current content is its durable prefix (read from the backing file) overlaid with
//! these extents. Extents never overlap; touching extents are merged so that a sequential
//! writer keeps appending to one `Vec` (amortised O(1) per byte instead of re-copying).

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included};

/// Non-overlapping byte ranges keyed by their start offset.
#[derive(Debug, Default, Clone)]
pub struct Extents {
    map: BTreeMap<u64, Vec<u8>>,
    bytes: u64,
}

impl Extents {
    /// Total number of bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// True when no byte is dirty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Drops every extent.
    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    /// Iterates over `(offset, bytes)` in offset order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.map.iter().map(|(&o, v)| (o, v.as_slice()))
    }

    /// Records `data` at `off`, replacing whatever was dirty there.
    pub fn write(&mut self, off: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = off + data.len() as u64;
        let mut start = off;
        let mut new_end = end;
        // The extent starting at or before `off` joins if it reaches `off` (overlap or touch).
        let mut head = None;
        if let Some((&s, v)) = self.map.range(..=off).next_back() {
            if s + v.len() as u64 >= off {
                head = Some(s);
                start = s;
                new_end = new_end.max(s + v.len() as u64);
            }
        }
        // Every extent starting inside (off, end] joins as well.
        let tail: Vec<u64> = self
            .map
            .range((Excluded(off), Included(end)))
            .map(|(&s, v)| {
                new_end = new_end.max(s + v.len() as u64);
                s
            })
            .collect();
        let mut buf = match head {
            Some(s) => self.map.remove(&s).unwrap_or_default(),
            None => Vec::new(),
        };
        self.bytes -= buf.len() as u64;
        buf.resize((new_end - start) as usize, 0);
        for s in tail {
            if let Some(v) = self.map.remove(&s) {
                self.bytes -= v.len() as u64;
                let at = (s - start) as usize;
                buf[at..at + v.len()].copy_from_slice(&v);
            }
        }
        let at = (off - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.bytes += buf.len() as u64;
        self.map.insert(start, buf);
    }

    /// Forgets every dirty byte at or beyond `len`.
    pub fn truncate(&mut self, len: u64) {
        let beyond = self.map.split_off(&len);
        self.bytes -= beyond.values().map(|v| v.len() as u64).sum::<u64>();
        if let Some((&s, v)) = self.map.range_mut(..len).next_back() {
            let keep = (len - s) as usize;
            if v.len() > keep {
                self.bytes -= (v.len() - keep) as u64;
                v.truncate(keep);
            }
        }
    }

    /// Copies the dirty bytes that fall inside `[off, off + buf.len())` into `buf`.
    pub fn overlay(&self, off: u64, buf: &mut [u8]) {
        let end = off + buf.len() as u64;
        let first = self
            .map
            .range(..off)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(off);
        for (&s, v) in self.map.range(first..end) {
            let e = s + v.len() as u64;
            let lo = s.max(off);
            let hi = e.min(end);
            if lo < hi {
                buf[(lo - off) as usize..(hi - off) as usize]
                    .copy_from_slice(&v[(lo - s) as usize..(hi - s) as usize]);
            }
        }
    }

    /// The dirty byte at `off`, if any.
    pub fn get(&self, off: u64) -> Option<u8> {
        let (&s, v) = self.map.range(..=off).next_back()?;
        v.get((off - s) as usize).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(e: &Extents, len: usize) -> Vec<Option<u8>> {
        (0..len as u64).map(|o| e.get(o)).collect()
    }

    #[test]
    fn merges_and_overlays() {
        let mut e = Extents::default();
        e.write(10, b"abc");
        e.write(13, b"de"); // touching: merged
        e.write(20, b"xy");
        e.write(12, b"ZZZZZZZZZ"); // covers the tail of the first and reaches the second
        assert_eq!(e.iter().count(), 1);
        assert_eq!(e.bytes(), 12);
        let mut buf = [0u8; 16];
        e.overlay(8, &mut buf);
        assert_eq!(&buf, b"\0\0abZZZZZZZZZy\0\0");
        e.truncate(15);
        assert_eq!(e.bytes(), 5);
        assert_eq!(e.get(14), Some(b'Z'));
        assert_eq!(e.get(15), None);
    }

    #[test]
    fn random_against_flat_model() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut e = Extents::default();
        let mut m: Vec<Option<u8>> = vec![None; 300];
        for i in 0..2000 {
            let off = next() % 250;
            if next() % 10 == 0 {
                e.truncate(off);
                for x in &mut m[off as usize..] {
                    *x = None;
                }
            } else {
                let len = (next() % 40) as usize;
                let data: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
                e.write(off, &data);
                for (j, b) in data.iter().enumerate() {
                    m[off as usize + j] = Some(*b);
                }
            }
            assert_eq!(flat(&e, 300), m);
            assert_eq!(e.bytes(), m.iter().filter(|x| x.is_some()).count() as u64);
        }
    }
}
