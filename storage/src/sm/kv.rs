//! The sled side of the state machine: the read view of a tree ([`SledKv`]), opening sled,
//! finding the current tree, and reading what a tree has applied.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, RwLock};

use hashq_raft::codec;
use hashq_raft::keys::{self, NodeKey, NODE_KEY_PREFIXES};
use hashq_raft::kv::{KvError, KvRead, Pair, ScanIter};
use hashq_raft::machine;
use hashq_raft::{LogId, StoredMembership};

use super::paged;
use super::queues::{self, Queues};
use super::CURRENT_TREE;

/// Applied writes in key order: `Some` is a put, `None` a delete.
pub(crate) type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Writes applied to the state machine that are not in its sled tree yet (see
/// [`super::FLUSH_EVERY`]): those applied since the last flush began, and those a flush is
/// putting into the tree, which readers consult until the tree has them.
#[derive(Default)]
pub(crate) struct Layers {
    pub(crate) active: Writes,
    pub(crate) flushing: Arc<Writes>,
    /// What the tree holds under each of [`RESIDENT`]'s keys, once known (read when the
    /// tree is opened or replaced, [`Layers::over`], and kept by every flush that writes
    /// them).
    resident: [Option<Option<Vec<u8>>>; RESIDENT.len()],
    /// The node-drawn idempotency keys the tree holds ([`NodeKey`]), once known (read with
    /// the resident values, and kept by every flush). Nearly every lookup of one is of a key
    /// just drawn, which nothing holds: only a walk down sled's pages said so (1.6 % of the
    /// machine's samples at 64 x 1 KiB, for the proposer batches' keys). One key per keyless
    /// request batch or keyless pull, kept `internal_key_ttl` (120 s): packed, 26 bytes a
    /// bucket, about 7 MB for 180,000 keys (1,500 batches a second).
    node_keys: Option<HashSet<PackedKey>>,
}

/// A node key and its table, as the index holds it: the table tag, then the node and the
/// nonce big-endian (byte-aligned, so a bucket is 26 bytes where the tuple took 49).
type PackedKey = [u8; 25];

/// The index's form of an idempotency record's key, if it is a node key's.
fn packed(record_key: &[u8]) -> Option<PackedKey> {
    let (table, key) = NodeKey::of_record(record_key)?;
    let mut out = [0; 25];
    out[0] = table;
    out[1..9].copy_from_slice(&key.node.to_be_bytes());
    out[9..].copy_from_slice(&key.nonce.to_be_bytes());
    Some(out)
}

/// The answer for a node key that neither the layers nor the tree hold.
const ABSENT: &Option<Vec<u8>> = &None;

/// Keys read by every apply, or every client request: the machine's counters, what was
/// applied, the membership and the cluster version (written about once in a cluster's
/// life, so never in the layers). A `get` of one answers from memory, never from the tree,
/// where each was a walk down sled's pages (1.6 % of the machine's samples at 64 x 1 KiB,
/// for the cluster version alone).
const RESIDENT: [&[u8]; 4] = [
    keys::META,
    keys::LAST_APPLIED,
    keys::MEMBERSHIP,
    keys::CLUSTER_VERSION,
];

impl Layers {
    /// No writes over `tree`, with its [`RESIDENT`] values and the node keys it holds (each
    /// left to the tree's reads if it cannot be read now).
    pub(crate) fn over(tree: &sled::Tree) -> Layers {
        let mut layers = Layers::default();
        for (slot, key) in layers.resident.iter_mut().zip(RESIDENT) {
            *slot = tree.get(key).ok().map(|v| v.map(|v| v.to_vec()));
        }
        layers.node_keys = node_keys(tree).ok();
        layers
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.active.is_empty() && self.flushing.is_empty()
    }

    /// What the layers say of `key`: a write over the tree, or else the tree's value when it
    /// is a known [`RESIDENT`] one, or a node key the tree is known not to hold. `None`: ask
    /// the tree.
    fn get(&self, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.active
            .get(key)
            .or_else(|| self.flushing.get(key))
            .or_else(|| {
                let at = RESIDENT.iter().position(|k| *k == key)?;
                self.resident[at].as_ref()
            })
            .or_else(|| {
                let held = self.node_keys.as_ref()?.contains(&packed(key)?);
                (!held).then_some(ABSENT)
            })
    }

    /// The layer being flushed is in the tree now: it goes, and its [`RESIDENT`] writes are
    /// the tree's values, its node keys the tree's.
    pub(crate) fn flushed(&mut self) {
        let layer = std::mem::take(&mut self.flushing);
        for (slot, key) in self.resident.iter_mut().zip(RESIDENT) {
            if let Some(value) = layer.get(key) {
                *slot = Some(value.clone());
            }
        }
        if let Some(held) = &mut self.node_keys {
            let writes = NODE_KEY_PREFIXES.iter().flat_map(|p| under(&layer, p));
            for (key, value) in writes {
                let Some(node_key) = packed(key) else {
                    continue;
                };
                if value.is_some() {
                    held.insert(node_key);
                } else {
                    held.remove(&node_key);
                }
            }
            // A burst's keys expire; their buckets need not stay.
            if held.capacity() > 4096 && held.len() < held.capacity() / 4 {
                held.shrink_to(held.len() * 2);
            }
        }
    }

    /// Up to `n` writes of each layer within `bounds`, from the scan's start.
    fn chunk(&self, bounds: &Bounds, reverse: bool, n: usize) -> [Chunk; 2] {
        [
            take(self.flushing.range(bounds.clone()), reverse, n),
            take(self.active.range(bounds.clone()), reverse, n),
        ]
    }
}

/// The writes of `layer` whose keys start with `prefix`.
fn under<'a>(
    layer: &'a Writes,
    prefix: &'a [u8],
) -> impl Iterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)> + 'a {
    layer
        .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

/// The node keys `tree` holds.
fn node_keys(tree: &sled::Tree) -> sled::Result<HashSet<PackedKey>> {
    let mut held = HashSet::new();
    for prefix in NODE_KEY_PREFIXES {
        for pair in tree.scan_prefix(prefix) {
            held.extend(packed(&pair?.0));
        }
    }
    Ok(held)
}

/// The part of a scan's range still to go.
pub(crate) type Bounds = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// Cuts the range `(start, end)` at each of `cuts` (ascending) that falls inside it:
/// ascending parts, none of which crosses a cut.
pub(crate) fn cut(start: Bound<Vec<u8>>, end: Bound<Vec<u8>>, cuts: &[&[u8]]) -> Vec<Bounds> {
    let after_start = |cut: &&[u8]| match &start {
        Bound::Included(s) | Bound::Excluded(s) => *cut > s.as_slice(),
        Bound::Unbounded => true,
    };
    let before_end = |cut: &&[u8]| match &end {
        Bound::Included(e) => *cut <= e.as_slice(),
        Bound::Excluded(e) => *cut < e.as_slice(),
        Bound::Unbounded => true,
    };
    let mut out = Vec::new();
    let mut from = start.clone();
    for cut in cuts.iter().filter(|c| after_start(c) && before_end(c)) {
        out.push((from, Bound::Excluded(cut.to_vec())));
        from = Bound::Included(cut.to_vec());
    }
    out.push((from, end));
    out
}

/// The table tag a part of [`cut`] starts in (the first byte of its start key; `None` for a
/// part that starts before every key), which is the part's table when the cuts are tables'.
pub(crate) fn tag(start: &Bound<Vec<u8>>) -> Option<u8> {
    match start {
        Bound::Included(k) | Bound::Excluded(k) => k.first().copied(),
        Bound::Unbounded => None,
    }
}

type Chunk = Vec<(Vec<u8>, Option<Vec<u8>>)>;

fn take<'a>(
    range: impl DoubleEndedIterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)> + 'a,
    reverse: bool,
    n: usize,
) -> Chunk {
    in_order(range, reverse)
        .take(n)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `items` in scan order: as they come, or from the end.
pub(crate) fn in_order<'a, T>(
    items: impl DoubleEndedIterator<Item = T> + 'a,
    reverse: bool,
) -> Box<dyn Iterator<Item = T> + 'a> {
    if reverse {
        Box::new(items.rev())
    } else {
        Box::new(items)
    }
}

pub(crate) type Unflushed = Arc<RwLock<Layers>>;

/// The queue tables ([`super::queues`]), shared by apply and every reader.
pub(crate) type QueueIndex = Arc<RwLock<Queues>>;

/// A read-only view of the state machine: its sled tree with the applied writes not yet
/// flushed into it on top, and the queue tables, which are kept in memory only.
#[derive(Clone)]
pub struct SledKv {
    pub(crate) tree: sled::Tree,
    pub(crate) unflushed: Unflushed,
    pub(crate) queues: QueueIndex,
}

impl SledKv {
    /// A view of `tree` alone (a tree being loaded or checked, with nothing applied on top
    /// and no queues).
    pub(crate) fn bare(tree: sled::Tree) -> SledKv {
        SledKv {
            tree,
            unflushed: Unflushed::default(),
            queues: QueueIndex::default(),
        }
    }

    /// Every record in key order, the queue tables included (a snapshot dump).
    pub(crate) fn all(&self) -> ScanIter<'_> {
        self.scan_bounds(Bound::Unbounded, Bound::Unbounded, false)
    }

    /// Pairs within `(start, end)`: the parts in the queue tables from memory, the others
    /// from sled and the unflushed writes.
    fn scan_bounds(
        &self,
        start: Bound<Vec<u8>>,
        end: Bound<Vec<u8>>,
        reverse: bool,
    ) -> ScanIter<'_> {
        let part = |(queued, start, end): queues::Part| -> ScanIter<'_> {
            if queued {
                Box::new(Chunked::new(self.queues.clone(), (start, end), reverse))
            } else {
                self.stored((start, end), reverse)
            }
        };
        let mut parts = queues::parts(start, end);
        if parts.len() == 1 {
            // Most scans stay within one table.
            return part(parts.pop().expect("one part"));
        }
        let parts: Vec<ScanIter<'_>> = parts.into_iter().map(part).collect();
        Box::new(in_order(parts.into_iter(), reverse).flatten())
    }

    /// Pairs within `bounds` outside the queue tables: sled's, with the unflushed writes
    /// over them.
    fn stored(&self, bounds: Bounds, reverse: bool) -> ScanIter<'_> {
        if read(&self.unflushed).is_empty() {
            // Nothing on top, and nothing can come during an apply (only apply adds writes,
            // and no flush runs with both layers empty).
            return paged::range(&self.tree, bounds, reverse);
        }
        Box::new(Chunked::new(self.clone(), bounds, reverse))
    }
}

/// The queue tables read a chunk at a time, each under the queues' lock. During an apply
/// nothing else writes them, so its scans see exactly the state it applies to.
impl Source for QueueIndex {
    fn read_chunk(&self, bounds: &Bounds, reverse: bool, n: usize) -> Result<Read, KvError> {
        let keys = queues_read(self).take(&bounds.0, &bounds.1, reverse, n);
        let complete_to = keys.last().filter(|_| keys.len() == n).cloned();
        Ok((
            keys.into_iter().map(|k| (k, Vec::new())).collect(),
            complete_to,
        ))
    }
}

impl KvRead for SledKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        if queues::is_queue_key(key) {
            return Ok(queues_read(&self.queues).contains(key).then(Vec::new));
        }
        if let Some(write) = read(&self.unflushed).get(key) {
            return Ok(write.clone());
        }
        paged::get(&self.tree, key)
    }

    fn scan<'a>(&'a self, start: &[u8], end: &[u8], reverse: bool) -> ScanIter<'a> {
        if start >= end {
            return Box::new(std::iter::empty());
        }
        self.scan_bounds(
            Bound::Included(start.to_vec()),
            Bound::Excluded(end.to_vec()),
            reverse,
        )
    }
}

/// What a chunk read: its pairs, and the key it is complete up to (`None`: the range is
/// done).
type Read = (Vec<Pair>, Option<Vec<u8>>);

/// Where a chunked scan reads from.
trait Source {
    /// Up to about `n` pairs of `bounds` from the scan's start.
    fn read_chunk(&self, bounds: &Bounds, reverse: bool, n: usize) -> Result<Read, KvError>;
}

/// A scan read a chunk at a time: [`FIRST_CHUNK`] keys first (most scans stop after a
/// few), then four times as many each time, up to [`LAST_CHUNK`]. At most a chunk is copied
/// past what the caller reads, however many records there are.
struct Chunked<S> {
    source: S,
    bounds: Bounds,
    reverse: bool,
    chunk: usize,
    ready: std::vec::IntoIter<Pair>,
    done: bool,
}

impl<S: Source> Chunked<S> {
    fn new(source: S, bounds: Bounds, reverse: bool) -> Self {
        Chunked {
            source,
            bounds,
            reverse,
            chunk: FIRST_CHUNK,
            ready: Vec::new().into_iter(),
            done: false,
        }
    }

    fn refill(&mut self) -> Result<(), KvError> {
        let n = self.chunk;
        self.chunk = (n * 4).min(LAST_CHUNK);
        let (pairs, complete_to) = self.source.read_chunk(&self.bounds, self.reverse, n)?;
        match complete_to {
            None => self.done = true,
            Some(last) if self.reverse => self.bounds.1 = Bound::Excluded(last),
            Some(last) => self.bounds.0 = Bound::Excluded(last),
        }
        self.ready = pairs.into_iter();
        Ok(())
    }
}

impl<S: Source> Iterator for Chunked<S> {
    type Item = Result<Pair, KvError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(pair) = self.ready.next() {
                return Some(Ok(pair));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.refill() {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Runs in each chunk between its read of the layers and of the tree (tests of a flush
    /// landing there).
    pub(crate) static BETWEEN_READS: std::cell::RefCell<Option<Box<dyn FnMut()>>> =
        const { std::cell::RefCell::new(None) };
}

/// Keys read from each source by a scan's first chunk, then four times as many each time,
/// up to [`LAST_CHUNK`] ([`Chunked`]).
const FIRST_CHUNK: usize = 8;
const LAST_CHUNK: usize = 512;

/// The tree and both layers, each chunk the layers first and then the tree: a flush that
/// runs meanwhile (it puts a layer into the tree, then drops the layer) only makes the tree
/// hold what the layers read already said. During an apply nothing else changes, so its
/// scans see exactly the state it applies to (a route's scan may also see what later applies
/// wrote, as before).
impl Source for SledKv {
    fn read_chunk(&self, bounds: &Bounds, reverse: bool, n: usize) -> Result<Read, KvError> {
        let [flushing, active] = read(&self.unflushed).chunk(bounds, reverse, n);
        #[cfg(test)]
        BETWEEN_READS.with(|hook| {
            if let Some(hook) = hook.borrow_mut().as_mut() {
                hook()
            }
        });
        let tree: Chunk = paged::range(&self.tree, bounds.clone(), reverse)
            .take(n)
            .map(|r| r.map(|(k, v)| (k, Some(v))))
            .collect::<Result<_, _>>()?;
        // Each source is complete up to its last key if it ran out of room; the chunk is
        // complete up to the first such key.
        let before = |a: &[u8], b: &[u8]| if reverse { a > b } else { a < b };
        let mut complete_to: Option<Vec<u8>> = None;
        for source in [&tree, &flushing, &active] {
            if source.len() == n {
                let last = &source[n - 1].0;
                if complete_to.as_ref().is_none_or(|c| before(last, c)) {
                    complete_to = Some(last.clone());
                }
            }
        }
        // The newer source wins: the tree, then the layer being flushed, then the newest.
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for source in [tree, flushing, active] {
            merged.extend(source);
        }
        let within = |k: &[u8]| {
            complete_to
                .as_deref()
                .is_none_or(|c| k == c || before(k, c))
        };
        let keep = |(k, v): (Vec<u8>, Option<Vec<u8>>)| v.map(|v| (k, v));
        let pairs: Vec<Pair> = in_order(merged.into_iter(), reverse)
            .take_while(|(k, _)| within(k))
            .filter_map(keep)
            .collect();
        Ok((pairs, complete_to))
    }
}

/// Reads `unflushed`, whatever a panicking writer left (its writes are whole entries).
pub(crate) fn read(unflushed: &Unflushed) -> std::sync::RwLockReadGuard<'_, Layers> {
    unflushed.read().unwrap_or_else(|p| p.into_inner())
}

/// Reads the queues, whatever a panicking writer left (its writes are whole keys).
pub(crate) fn queues_read(queues: &QueueIndex) -> std::sync::RwLockReadGuard<'_, Queues> {
    queues.read().unwrap_or_else(|p| p.into_inner())
}

/// Writes the queues, likewise.
pub(crate) fn queues_write(queues: &QueueIndex) -> std::sync::RwLockWriteGuard<'_, Queues> {
    queues.write().unwrap_or_else(|p| p.into_inner())
}

/// Writes `unflushed`, likewise.
pub(crate) fn write(unflushed: &Unflushed) -> std::sync::RwLockWriteGuard<'_, Layers> {
    unflushed.write().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn read_last_applied(kv: &SledKv) -> Result<Option<LogId>, KvError> {
    match kv.get(keys::LAST_APPLIED)? {
        None => Ok(None),
        Some(b) => codec::decode("last applied", &b)
            .map(Some)
            .map_err(|e| KvError::Corrupt {
                key: "last_applied".into(),
                reason: e.to_string(),
            }),
    }
}

pub(crate) fn read_membership(kv: &SledKv) -> Result<StoredMembership, KvError> {
    match kv.get(keys::MEMBERSHIP)? {
        None => Ok(StoredMembership::default()),
        Some(b) => codec::decode("membership", &b).map_err(|e| KvError::Corrupt {
            key: "membership".into(),
            reason: e.to_string(),
        }),
    }
}

pub(crate) fn open_sled(dir: &Path, cache_bytes: u64) -> Result<sled::Db, sled::Error> {
    sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        // Values up to a quarter of a segment stay inline: sled's separate blob files are
        // never synced, so none are wanted (payloads are not in sled; results, lists of pulled
        // items and worker records are).
        .segment_size(8 << 20)
        .open()
}

/// Reads the current tree, what it has applied and its queues; `Err` means sled cannot be
/// trusted.
pub(super) fn current_tree(
    db: &sled::Db,
) -> Result<(sled::Tree, sled::Tree, Option<LogId>, Queues), String> {
    let meta = db.open_tree("sm_meta").map_err(|e| e.to_string())?;
    let name = match meta.get(CURRENT_TREE).map_err(|e| e.to_string())? {
        Some(name) => name.to_vec(),
        None => {
            meta.insert(CURRENT_TREE, b"sm-0")
                .map_err(|e| e.to_string())?;
            b"sm-0".to_vec()
        }
    };
    // Trees left behind by an install that crashed before its switch.
    for stale in db.tree_names() {
        if stale.starts_with(b"sm-") && stale.as_ref() != name.as_slice() {
            db.drop_tree(stale).map_err(|e| e.to_string())?;
        }
    }
    let tree = db.open_tree(&name).map_err(|e| e.to_string())?;
    let paged = paged::page_items(&tree).map_err(|e| e.to_string())?;
    if paged > 0 {
        tracing::info!(
            items = paged,
            "item records of format 3 or 4 moved into pages (format 5)"
        );
    }
    let kv = SledKv::bare(tree.clone());
    let applied = read_last_applied(&kv).map_err(|e| e.to_string())?;
    machine::read_meta(&kv).map_err(|e| e.to_string())?;
    read_membership(&kv).map_err(|e| e.to_string())?;
    let queues = queues_from_items(&tree).map_err(|e| e.to_string())?;
    remove_queue_records(&tree, &queues)?;
    Ok((meta, tree, applied, queues))
}

/// The queues of `tree`, from its item records ([`machine::queue_keys`]). An item record
/// that cannot be read makes the whole tree untrusted, as any other unreadable record at
/// open: the state machine is rebuilt from the snapshot and the log.
pub(super) fn queues_from_items(tree: &sled::Tree) -> Result<Queues, KvError> {
    let kv = SledKv::bare(tree.clone());
    let mut queues = Queues::default();
    for key in machine::queue_keys(&kv) {
        queues.write(&key?, Some(&[]))?;
    }
    Ok(queues)
}

/// Removes the queue records a format-3 store kept in `tree` (nothing reads them there any
/// more), a chunk at a time, and says how many disagreed with `rebuilt` (the queues rebuilt
/// from the items), which the invariant says is none.
fn remove_queue_records(tree: &sled::Tree, rebuilt: &Queues) -> Result<(), String> {
    const CHUNK: usize = 10_000;
    let (mut removed, mut stored) = (0usize, Queues::default());
    for table in [keys::QUEUE, keys::PRIORITY_QUEUE] {
        loop {
            let chunk: Vec<sled::IVec> = tree
                .range(vec![table]..vec![table + 1])
                .keys()
                .take(CHUNK)
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            if chunk.is_empty() {
                break;
            }
            let mut batch = sled::Batch::default();
            for key in &chunk {
                // A malformed one is removed all the same.
                let _ = stored.write(key, Some(&[]));
                batch.remove(key);
            }
            removed += chunk.len();
            tree.apply_batch(batch).map_err(|e| e.to_string())?;
        }
    }
    if removed > 0 {
        let differ = if stored == *rebuilt {
            0
        } else {
            stored.differences(rebuilt)
        };
        if differ > 0 {
            tracing::warn!(
                removed,
                differ,
                "queue records left by format 3 disagreed with the item records; the items win"
            );
        } else {
            tracing::info!(
                removed,
                "queue records left by format 3 removed from sled (the queues are in memory)"
            );
        }
    }
    Ok(())
}
