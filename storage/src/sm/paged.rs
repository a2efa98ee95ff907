//! How the state-machine tree lays out the keyspace: item records paged, every other record
//! under its own key.
//!
//! Nearly every apply inserts item records (`i` + id), with consecutive ids, and sled 0.34
//! pays for each insert: it clones the leaf the key lands in and applies the insert to the
//! copy (`PageCache::link`), and as the ids only grow it splits the rightmost leaf every few
//! inserts, cloning its parent too. At 64 x 1 KiB those were 35 % and 27 % of the flusher
//! threads' samples, which took 31 µs of node CPU per request (BENCHMARKS.md, "Ceilings"). So
//! the tree keeps item records [`PER_PAGE`] to a sled record, under `I` + (id / 64)
//! big-endian: a flush reads each page its writes touch once and writes it once ([`Writer`]).
//!
//! The keyspace readers see does not change: [`get`] of an item key reads its page and picks
//! the slot, [`range`] expands the pages of the item table in key order (and never shows the
//! `I` records themselves). Snapshots are dumps of that keyspace, so their files are what
//! they were. A tree of data format 3 or 4 (each item under its own key) is paged when the
//! store opens it ([`page_items`]); the data dir is marked format 5 first, which the builds before
//! this one refuse rather than find no items.
//!
//! A page's value is its records by slot ascending, each `slot: u8`, `len: u32`
//! little-endian, then the record.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::ops::Bound;

use hashq_raft::keys;
use hashq_raft::kv::{KvError, Pair, ScanIter};
use hashq_raft::types::WorkId;

use super::kv::{cut, in_order, tag, Bounds};

/// The tag of the page records, which no record of the keyspace has.
pub(crate) const PAGE: u8 = b'I';
/// Item records per page.
pub(crate) const PER_PAGE: u64 = 64;

/// A page record's header: the slot, then the record's length.
const HEADER: usize = 5;

/// The page and the slot of an item record's key; `None` for any other key.
fn slot_of(key: &[u8]) -> Option<(u64, u8)> {
    let (&tag, id) = key.split_first()?;
    let id: [u8; 8] = id.try_into().ok().filter(|_| tag == keys::ITEM)?;
    let id = u64::from_be_bytes(id);
    Some((id / PER_PAGE, (id % PER_PAGE) as u8))
}

fn page_key(page: u64) -> [u8; 9] {
    let mut key = [PAGE; 9];
    key[1..].copy_from_slice(&page.to_be_bytes());
    key
}

fn page_of_key(key: &[u8]) -> Option<u64> {
    let (&tag, page) = key.split_first()?;
    let page: [u8; 8] = page.try_into().ok().filter(|_| tag == PAGE)?;
    Some(u64::from_be_bytes(page))
}

fn item_key(page: u64, slot: u8) -> Vec<u8> {
    keys::item(WorkId(page * PER_PAGE + u64::from(slot)))
}

/// The records of a page: `(slot, record)` in slot order, or why the page cannot be read.
struct Records<'a> {
    page: &'a [u8],
    at: usize,
    last: Option<u8>,
}

fn records(page: &[u8]) -> Records<'_> {
    Records {
        page,
        at: 0,
        last: None,
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<(u8, &'a [u8]), &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at == self.page.len() {
            return None;
        }
        let read = || {
            let head = self
                .page
                .get(self.at..self.at + HEADER)
                .ok_or("the page ends inside a record's header")?;
            let slot = head[0];
            let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes")) as usize;
            if u64::from(slot) >= PER_PAGE || self.last.is_some_and(|last| last >= slot) {
                return Err("the page's slots are out of order");
            }
            let start = self.at + HEADER;
            let record = start
                .checked_add(len)
                .and_then(|end| self.page.get(start..end))
                .ok_or("the page ends inside a record")?;
            Ok((slot, record))
        };
        match read() {
            Ok((slot, record)) => {
                self.at += HEADER + record.len();
                self.last = Some(slot);
                Some(Ok((slot, record)))
            }
            Err(e) => {
                // Nothing after a bad header can be found.
                self.at = self.page.len();
                Some(Err(e))
            }
        }
    }
}

fn corrupt(page: u64) -> impl Fn(&str) -> KvError {
    move |reason| KvError::Corrupt {
        key: format!("item page {page} (items {} on)", page * PER_PAGE),
        reason: reason.into(),
    }
}

fn io(e: sled::Error) -> KvError {
    KvError::Io(e.to_string())
}

/// The record under `key` in `tree`.
pub(crate) fn get(tree: &sled::Tree, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
    let Some((page, slot)) = slot_of(key) else {
        if let Some(PAGE | keys::ITEM) = key.first().copied() {
            // No record is kept there ([`Writer::write`]); the pages are not records.
            return Ok(None);
        }
        return tree.get(key).map(|v| v.map(|v| v.to_vec())).map_err(io);
    };
    let Some(bytes) = tree.get(page_key(page)).map_err(io)? else {
        return Ok(None);
    };
    for record in records(&bytes) {
        match record.map_err(corrupt(page))? {
            (s, record) if s == slot => return Ok(Some(record.to_vec())),
            (s, _) if s > slot => break,
            _ => {}
        }
    }
    Ok(None)
}

/// The records of `tree` within `bounds`, in key order (descending when `reverse`).
pub(crate) fn range(tree: &sled::Tree, bounds: Bounds, reverse: bool) -> ScanIter<'static> {
    // Where the pages begin and end, and the item table (the next tag ends each).
    let cuts: [&[u8]; 4] = [&[PAGE], &[PAGE + 1], &[keys::ITEM], &[keys::ITEM + 1]];
    let mut parts: Vec<ScanIter<'static>> = Vec::new();
    for (start, end) in cut(bounds.0, bounds.1, &cuts) {
        match tag(&start) {
            // The pages are seen through the item table, never as themselves.
            Some(PAGE) => {}
            Some(keys::ITEM) => parts.push(Box::new(Items::new(tree, (start, end), reverse))),
            _ => {
                let raw = tree
                    .range((start, end))
                    .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(io));
                parts.push(in_order(raw, reverse));
            }
        }
    }
    if parts.len() == 1 {
        return parts.pop().expect("one part");
    }
    Box::new(in_order(parts.into_iter(), reverse).flatten())
}

/// The item records within some bounds of the item table, a page at a time.
struct Items {
    pages: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>>,
    bounds: Bounds,
    reverse: bool,
    /// The current page's records within the bounds, in scan order.
    ready: std::vec::IntoIter<Pair>,
    failed: bool,
}

impl Items {
    fn new(tree: &sled::Tree, bounds: Bounds, reverse: bool) -> Items {
        // The pages of the ids the bounds allow: from the lowest id the start allows (its
        // bytes after the tag, as a number padded with zeros) to the highest the end does
        // (padded with ones; an end past the table allows every id).
        let id = |key: &[u8], pad: u8| {
            let mut id = [pad; 8];
            let digits = &key[1.min(key.len())..];
            let n = digits.len().min(8);
            id[..n].copy_from_slice(&digits[..n]);
            u64::from_be_bytes(id)
        };
        let first = match &bounds.0 {
            Bound::Included(k) | Bound::Excluded(k) => id(k, 0) / PER_PAGE,
            Bound::Unbounded => 0,
        };
        let last = match &bounds.1 {
            Bound::Included(k) | Bound::Excluded(k) if k.first() == Some(&keys::ITEM) => {
                Bound::Included(page_key(id(k, 0xff) / PER_PAGE).to_vec())
            }
            _ => Bound::Excluded(vec![PAGE + 1]),
        };
        let pages = tree.range((Bound::Included(page_key(first).to_vec()), last));
        Items {
            pages: in_order(pages, reverse),
            bounds,
            reverse,
            ready: Vec::new().into_iter(),
            failed: false,
        }
    }

    /// The next page's records within the bounds, in scan order.
    fn read_page(&mut self, key: &[u8], bytes: &[u8]) -> Result<Vec<Pair>, KvError> {
        let page = page_of_key(key).ok_or_else(|| KvError::Corrupt {
            key: format!("{key:?}"),
            reason: "a record among the item pages that is not one".into(),
        })?;
        let mut pairs = Vec::with_capacity(PER_PAGE as usize);
        for record in records(bytes) {
            let (slot, record) = record.map_err(corrupt(page))?;
            let key = item_key(page, slot);
            if std::ops::RangeBounds::contains(&self.bounds, &key) {
                pairs.push((key, record.to_vec()));
            }
        }
        if self.reverse {
            pairs.reverse();
        }
        Ok(pairs)
    }
}

impl Iterator for Items {
    type Item = Result<Pair, KvError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(pair) = self.ready.next() {
                return Some(Ok(pair));
            }
            if self.failed {
                return None;
            }
            let read = match self.pages.next()? {
                Ok((key, bytes)) => self.read_page(&key, &bytes),
                Err(e) => Err(io(e)),
            };
            match read {
                Ok(pairs) => self.ready = pairs.into_iter(),
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Writes of the keyspace made into one atomic sled batch: each item record goes into its
/// page, read from the tree once, whatever the number of writes to it.
pub(crate) struct Writer<'a> {
    tree: &'a sled::Tree,
    batch: sled::Batch,
    pages: BTreeMap<u64, BTreeMap<u8, Vec<u8>>>,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(tree: &'a sled::Tree) -> Writer<'a> {
        Writer {
            tree,
            batch: sled::Batch::default(),
            pages: BTreeMap::new(),
        }
    }

    /// Puts `value` under `key` (`None`: removes it). Refused: a key tagged [`PAGE`] (no
    /// record of the keyspace has that tag) and a key of the item table that is not an id.
    pub(crate) fn write(&mut self, key: &[u8], value: Option<&[u8]>) -> sled::Result<()> {
        let Some((page, slot)) = slot_of(key) else {
            // An `I` key would be read as a page, and an item key of another length never
            // found (gets and scans of the item table read the pages).
            if let Some(tag @ (PAGE | keys::ITEM)) = key.first().copied() {
                return Err(sled::Error::Unsupported(format!(
                    "no record goes under {key:?}: keys tagged `{}` are {}",
                    tag as char,
                    if tag == PAGE {
                        "the item pages'"
                    } else {
                        "item ids, 8 bytes"
                    }
                )));
            }
            match value {
                Some(v) => self.batch.insert(key, v),
                None => self.batch.remove(key),
            }
            return Ok(());
        };
        let records = match self.pages.entry(page) {
            Entry::Occupied(held) => held.into_mut(),
            Entry::Vacant(new) => new.insert(read_page(self.tree, page)?),
        };
        match value {
            Some(v) => records.insert(slot, v.to_vec()),
            None => records.remove(&slot),
        };
        Ok(())
    }

    /// Puts the writes so far into the tree in one atomic batch (the other records' writes,
    /// then each page touched, whole), and starts over.
    pub(crate) fn apply(&mut self) -> sled::Result<()> {
        let mut batch = std::mem::take(&mut self.batch);
        for (page, records) in std::mem::take(&mut self.pages) {
            if records.is_empty() {
                batch.remove(&page_key(page));
                continue;
            }
            let size = records.values().map(|r| HEADER + r.len()).sum();
            let mut bytes = Vec::with_capacity(size);
            for (slot, record) in records {
                bytes.push(slot);
                let len = u32::try_from(record.len()).expect("an item record under 4 GiB");
                bytes.extend_from_slice(&len.to_le_bytes());
                bytes.extend_from_slice(&record);
            }
            batch.insert(&page_key(page), bytes);
        }
        self.tree.apply_batch(batch)
    }
}

/// The records of page `page` as the tree holds it.
fn read_page(tree: &sled::Tree, page: u64) -> sled::Result<BTreeMap<u8, Vec<u8>>> {
    let Some(bytes) = tree.get(page_key(page))? else {
        return Ok(BTreeMap::new());
    };
    records(&bytes)
        .map(|r| r.map(|(slot, record)| (slot, record.to_vec())))
        .collect::<Result<_, _>>()
        .map_err(|reason| {
            sled::Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                corrupt(page)(reason).to_string(),
            ))
        })
}

/// Moves the item records a tree of data format 4 keeps under their own keys into their
/// pages, a chunk at a time, each chunk one atomic batch (a crash midway leaves each record
/// in one place, and the next open goes on). Returns how many moved (a malformed key, which
/// no build writes, is dropped, not counted).
pub(crate) fn page_items(tree: &sled::Tree) -> sled::Result<u64> {
    const CHUNK: usize = 10_000;
    let mut moved = 0;
    loop {
        let chunk: Vec<(sled::IVec, sled::IVec)> = tree
            .range(vec![keys::ITEM]..vec![keys::ITEM + 1])
            .take(CHUNK)
            .collect::<Result<_, _>>()?;
        if chunk.is_empty() {
            return Ok(moved);
        }
        let mut writer = Writer::new(tree);
        for (key, record) in &chunk {
            // The record's own key goes; its page (another key) gets it.
            writer.batch.remove(key);
            match slot_of(key) {
                Some(_) => {
                    writer.write(key, Some(record))?;
                    moved += 1;
                }
                // Never written by any build: nothing to keep it for.
                None => tracing::warn!(key = ?key, "a malformed item key dropped"),
            }
        }
        writer.apply()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Model = BTreeMap<Vec<u8>, Vec<u8>>;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    /// A key of the item table (ids over a few pages, and a few at the top of the range) or
    /// of the tables on either side of it and of the pages' tag.
    fn random_key(seed: &mut u64) -> Vec<u8> {
        let id = match lcg(seed) % 10 {
            0 => u64::MAX - lcg(seed) % 70,
            _ => lcg(seed) % 400,
        };
        match lcg(seed) % 5 {
            0..=2 => keys::item(WorkId(id)),
            3 => [&[b'h'][..], &id.to_be_bytes()].concat(),
            _ => [&[b'j'][..], &(id % 50).to_be_bytes()].concat(),
        }
    }

    /// Bounds a scan might be given: keys of the tables, the tables' edges, and keys between
    /// ids (shorter or longer than an id).
    fn random_bound(seed: &mut u64) -> Bound<Vec<u8>> {
        let key = match lcg(seed) % 8 {
            0 => vec![keys::ITEM],
            1 => vec![keys::ITEM + 1],
            2 => vec![PAGE],
            3 => vec![b'i', 0, 0, 0, 0, 0, 0, 0x01],
            4 => [keys::item(WorkId(lcg(seed) % 400)), vec![0]].concat(),
            _ => random_key(seed),
        };
        match lcg(seed) % 5 {
            0 => Bound::Unbounded,
            1 | 2 => Bound::Included(key),
            _ => Bound::Excluded(key),
        }
    }

    /// The two bounds as a range, start first; `None` if they make none.
    fn ordered(a: Bound<Vec<u8>>, b: Bound<Vec<u8>>) -> Option<Bounds> {
        let key = |b: &Bound<Vec<u8>>| match b {
            Bound::Included(k) | Bound::Excluded(k) => Some(k.clone()),
            Bound::Unbounded => None,
        };
        let (a, b) = match (key(&a), key(&b)) {
            (Some(x), Some(y)) if x > y => (b, a),
            (Some(x), Some(y)) if x == y => {
                return matches!((&a, &b), (Bound::Included(_), Bound::Included(_)))
                    .then_some((a, b))
            }
            _ => (a, b),
        };
        Some((a, b))
    }

    /// An empty tree of a sled database in a directory of its own (gone with the directory).
    fn scratch() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open_sled(dir.path(), 1 << 20).unwrap();
        let tree = db.open_tree("t").unwrap();
        (dir, tree)
    }

    fn scan(tree: &sled::Tree, bounds: Bounds, reverse: bool) -> Vec<Pair> {
        range(tree, bounds, reverse).map(|r| r.unwrap()).collect()
    }

    #[test]
    fn the_tree_reads_as_the_keyspace_it_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open_sled(dir.path(), 1 << 20).unwrap();
        let mut seed = 5;
        for round in 0..6 {
            let tree = db.open_tree(format!("t{round}")).unwrap();
            let mut model = Model::new();
            for _ in 0..30 {
                // A batch of writes, some to the same page, some to the same record.
                let mut writer = Writer::new(&tree);
                for _ in 0..lcg(&mut seed) % 200 {
                    let key = random_key(&mut seed);
                    if lcg(&mut seed).is_multiple_of(4) {
                        writer.write(&key, None).unwrap();
                        model.remove(&key);
                    } else {
                        let value =
                            format!("v{}", lcg(&mut seed)).repeat(1 + lcg(&mut seed) as usize % 9);
                        writer.write(&key, Some(value.as_bytes())).unwrap();
                        model.insert(key, value.into_bytes());
                    }
                }
                writer.apply().unwrap();
                for _ in 0..20 {
                    let key = random_key(&mut seed);
                    assert_eq!(get(&tree, &key).unwrap(), model.get(&key).cloned());
                }
                for _ in 0..10 {
                    let Some(bounds) = ordered(random_bound(&mut seed), random_bound(&mut seed))
                    else {
                        continue;
                    };
                    let expect: Vec<Pair> = model
                        .range(bounds.clone())
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    for reverse in [false, true] {
                        let mut want = expect.clone();
                        if reverse {
                            want.reverse();
                        }
                        assert_eq!(scan(&tree, bounds.clone(), reverse), want, "{bounds:?}");
                    }
                }
            }
            let all: Vec<Pair> = model.into_iter().collect();
            assert_eq!(
                scan(&tree, (Bound::Unbounded, Bound::Unbounded), false),
                all
            );
            // Pages only in the tree, each no more than its 64 items.
            for pair in tree.iter() {
                let (key, bytes) = pair.unwrap();
                assert_ne!(key[0], keys::ITEM, "an item under its own key");
                if key[0] == PAGE {
                    let n = records(&bytes).count();
                    assert!((1..=64).contains(&n), "{n} records in a page");
                }
            }
        }
    }

    #[test]
    fn consecutive_items_take_one_sled_record_per_64() {
        let (_dir, tree) = scratch();
        for first in (0..1000).step_by(100) {
            let mut writer = Writer::new(&tree);
            for id in first..first + 100 {
                writer
                    .write(&keys::item(WorkId(id)), Some(b"item"))
                    .unwrap();
            }
            writer.apply().unwrap();
        }
        assert_eq!(tree.len(), 16, "1,000 items in 16 pages");
        assert_eq!(
            range(&tree, (Bound::Unbounded, Bound::Unbounded), true).count(),
            1000
        );
        // A page whose last item goes goes too; the pages are never records of their own.
        let mut writer = Writer::new(&tree);
        for id in 64..128 {
            writer.write(&keys::item(WorkId(id)), None).unwrap();
        }
        writer.apply().unwrap();
        assert_eq!(tree.len(), 15);
        assert_eq!(tree.get(page_key(1)).unwrap(), None);
        assert!(tree.get(page_key(2)).unwrap().is_some());
        assert_eq!(get(&tree, &page_key(2)).unwrap(), None);
        assert_eq!(get(&tree, &keys::item(WorkId(64))).unwrap(), None);
        assert_eq!(
            get(&tree, &keys::item(WorkId(128))).unwrap(),
            Some(b"item".to_vec())
        );
    }

    #[test]
    fn keys_the_pages_cannot_hold_are_refused() {
        let (_dir, tree) = scratch();
        let mut writer = Writer::new(&tree);
        for key in [&b"I"[..], &page_key(3), b"i", b"i1234567", b"i123456789"] {
            let e = writer.write(key, Some(b"x")).unwrap_err();
            assert!(e.to_string().contains("no record goes under"), "{e}");
        }
        writer.write(b"h", Some(b"x")).unwrap();
        writer.apply().unwrap();
        assert_eq!(tree.len(), 1);
    }

    #[test]
    fn a_damaged_page_is_an_error_to_its_readers_and_writers() {
        let (_dir, tree) = scratch();
        let mut writer = Writer::new(&tree);
        for id in 0..3 {
            writer
                .write(&keys::item(WorkId(id)), Some(b"item"))
                .unwrap();
        }
        writer.apply().unwrap();
        let bytes = tree.get(page_key(0)).unwrap().unwrap();
        // Cut inside the second record; then a length past the end; then slots out of order.
        let mut swapped = bytes.to_vec();
        swapped[0] = 1;
        for damaged in [
            bytes[..HEADER + 4 + 2].to_vec(),
            [&bytes[..1], &[0xff; 4], &bytes[5..]].concat(),
            swapped,
        ] {
            tree.insert(page_key(0), damaged).unwrap();
            let read = get(&tree, &keys::item(WorkId(2)));
            assert!(matches!(read, Err(KvError::Corrupt { .. })), "{read:?}");
            let scanned: Vec<_> =
                range(&tree, (Bound::Unbounded, Bound::Unbounded), false).collect();
            assert!(scanned.iter().any(|r| r.is_err()), "{scanned:?}");
            let mut writer = Writer::new(&tree);
            assert!(writer.write(&keys::item(WorkId(5)), Some(b"x")).is_err());
        }
    }

    #[test]
    fn a_format_4_tree_is_paged_once_and_reads_the_same() {
        let (_dir, tree) = scratch();
        let mut model = Model::new();
        for id in (0..25_000).chain([u64::MAX]) {
            let (key, value) = (keys::item(WorkId(id)), format!("item {id}").into_bytes());
            tree.insert(&key, value.clone()).unwrap();
            model.insert(key, value);
        }
        for key in [&b"h1"[..], b"j1", b"m"] {
            tree.insert(key, b"other").unwrap();
            model.insert(key.to_vec(), b"other".to_vec());
        }
        // Not an item's key (no build writes one): dropped, not moved.
        tree.insert(b"i123", b"malformed").unwrap();
        // A page a crash left beside records still under their own keys: merged with them.
        let mut writer = Writer::new(&tree);
        writer
            .write(&keys::item(WorkId(25_001)), Some(b"paged"))
            .unwrap();
        writer.apply().unwrap();
        model.insert(keys::item(WorkId(25_001)), b"paged".to_vec());

        assert_eq!(page_items(&tree).unwrap(), 25_001);
        assert_eq!(page_items(&tree).unwrap(), 0, "nothing left to move");
        let all: Vec<Pair> = model.into_iter().collect();
        assert_eq!(
            scan(&tree, (Bound::Unbounded, Bound::Unbounded), false),
            all
        );
        assert_eq!(tree.len(), 3 + 25_002usize.div_ceil(64) + 1);
    }
}
