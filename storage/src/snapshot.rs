//! Snapshots as files.
//!
//! Format (all integers little-endian):
//! ```text
//! "HQSNAP1\n"
//! u32 meta_len, meta (postcard SnapshotMeta)
//! { u32 key_len, key, u32 value_len, value }*     every pair of the state-machine keyspace
//! u32 0xffff_ffff                                 end marker
//! u32 crc32 of every byte before it
//! ```
//! A snapshot is written to `<id>.tmp`, fsynced and renamed to `<id>.snap`; one received from a
//! leader is written by openraft to `recv-<n>.part` and renamed once installed. Only the latest
//! `.snap` is kept.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hashq_raft::{codec, NodeId, SnapshotMeta, TypeConfig};
use openraft::storage::Snapshot;
use openraft::{StorageError, StorageIOError};

use crate::sm::{read_last_applied, read_membership, Shared, SledKv};

const MAGIC: &[u8; 8] = b"HQSNAP1\n";
const END: u32 = u32::MAX;
/// Install writes the new tree in batches of about this many bytes.
const INSTALL_BATCH_BYTES: usize = 4 << 20;

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{}", UNIQUE.fetch_add(1, Ordering::Relaxed))
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_snapshot(None, &e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, &e).into()
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Writes through while computing the CRC of everything written.
struct CrcWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads through while computing the CRC of everything read.
struct CrcReader<R: Read> {
    inner: R,
    crc: crc32fast::Hasher,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_bytes(r: &mut impl Read, len: u32) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn read_header(r: &mut impl Read) -> io::Result<SnapshotMeta> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(invalid("not a hashq snapshot".into()));
    }
    let len = read_u32(r)?;
    if len > 64 << 20 {
        return Err(invalid(format!("snapshot metadata of {len} bytes")));
    }
    let meta = read_bytes(r, len)?;
    codec::decode("snapshot metadata", &meta).map_err(|e| invalid(e.to_string()))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads the metadata of a snapshot file.
fn read_meta(path: &Path) -> io::Result<SnapshotMeta> {
    read_header(&mut BufReader::new(File::open(path)?))
}

/// The latest complete snapshot in `dir`, if any.
pub(crate) fn find_latest(dir: &Path) -> Option<(PathBuf, SnapshotMeta)> {
    let mut best: Option<(PathBuf, SnapshotMeta)> = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "snap") {
            match read_meta(&path) {
                Ok(meta) => {
                    if best
                        .as_ref()
                        .is_none_or(|(_, b)| meta.last_log_id > b.last_log_id)
                    {
                        best = Some((path, meta));
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable snapshot ignored")
                }
            }
        }
    }
    best
}

/// Removes files of snapshots that were being written or received when the node stopped.
pub(crate) fn remove_partial_files(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "tmp" || e == "part") {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Makes `path` the current snapshot and deletes every other one.
fn make_current(shared: &Shared, path: PathBuf, meta: SnapshotMeta) {
    if let Ok(entries) = fs::read_dir(&shared.snapshot_dir) {
        for entry in entries.flatten() {
            let p = entry.path();
            if p != path && p.extension().is_some_and(|e| e == "snap") {
                let _ = fs::remove_file(&p);
            }
        }
    }
    *shared
        .current_snapshot
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some((path, meta));
}

async fn open_snapshot(
    path: &Path,
    meta: SnapshotMeta,
) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
    let file = tokio::fs::File::open(path).await.map_err(read_err)?;
    Ok(Snapshot {
        meta,
        snapshot: Box::new(file),
    })
}

/// Builds a snapshot: the dump happens in [`Builder::dump`], [`Builder::finish`] hands it over.
pub struct Builder {
    shared: Arc<Shared>,
    dumped: Option<Result<(PathBuf, SnapshotMeta), StorageError<NodeId>>>,
}

impl Builder {
    /// Copies the keyspace to a snapshot file. The caller holds up apply until this returns.
    pub(crate) async fn dump(shared: Arc<Shared>) -> Builder {
        let s = shared.clone();
        let dumped = tokio::task::spawn_blocking(move || write_snapshot(&s))
            .await
            .unwrap_or_else(|e| Err(write_err(io::Error::other(e.to_string()))));
        Builder {
            shared,
            dumped: Some(dumped),
        }
    }

    pub(crate) async fn finish(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (path, meta) = self
            .dumped
            .take()
            .unwrap_or_else(|| Err(write_err(io::Error::other("snapshot already handed over"))))?;
        make_current(&self.shared, path.clone(), meta.clone());
        tracing::info!(snapshot = %meta.snapshot_id, "snapshot built");
        open_snapshot(&path, meta).await
    }
}

fn write_snapshot(shared: &Shared) -> Result<(PathBuf, SnapshotMeta), StorageError<NodeId>> {
    let tree = shared.tree();
    let kv = SledKv(tree.clone());
    let last_log_id = read_last_applied(&kv).map_err(read_err)?;
    let last_membership = read_membership(&kv).map_err(read_err)?;
    let snapshot_id = match last_log_id {
        Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, unique()),
        None => format!("0-0-{}", unique()),
    };
    let meta = SnapshotMeta {
        last_log_id,
        last_membership,
        snapshot_id: snapshot_id.clone(),
    };
    let tmp = shared.snapshot_dir.join(format!("{snapshot_id}.tmp"));
    let path = shared.snapshot_dir.join(format!("{snapshot_id}.snap"));
    let write = || -> io::Result<()> {
        let file = File::create(&tmp)?;
        let mut w = CrcWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
        };
        w.write_all(MAGIC)?;
        let meta_bytes = codec::encode(&meta);
        w.write_all(&(meta_bytes.len() as u32).to_le_bytes())?;
        w.write_all(&meta_bytes)?;
        for pair in tree.iter() {
            let (k, v) = pair.map_err(io::Error::other)?;
            w.write_all(&(k.len() as u32).to_le_bytes())?;
            w.write_all(&k)?;
            w.write_all(&(v.len() as u32).to_le_bytes())?;
            w.write_all(&v)?;
        }
        w.write_all(&END.to_le_bytes())?;
        let crc = w.crc.clone().finalize();
        let mut inner = w.inner.into_inner().map_err(|e| e.into_error())?;
        inner.write_all(&crc.to_le_bytes())?;
        inner.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(&shared.snapshot_dir)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        write_err(e)
    })?;
    Ok((path, meta))
}

/// A fresh file for openraft to write a snapshot from the leader into.
pub(crate) async fn begin_receiving(
    shared: &Shared,
) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
    let path = shared.snapshot_dir.join(format!("recv-{}.part", unique()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(write_err)?;
    let ino = file.metadata().map_err(write_err)?.ino();
    let mut receiving = shared.receiving.lock().unwrap_or_else(|p| p.into_inner());
    // openraft receives one snapshot at a time: an earlier unfinished one was abandoned.
    for (_, abandoned) in receiving.drain() {
        let _ = fs::remove_file(abandoned);
    }
    receiving.insert(ino, path);
    Ok(Box::new(tokio::fs::File::from_std(file)))
}

/// Replaces the state machine with a received snapshot.
pub(crate) async fn install(
    shared: &Arc<Shared>,
    meta: &SnapshotMeta,
    file: tokio::fs::File,
) -> Result<(), StorageError<NodeId>> {
    let mut file = file.into_std().await;
    file.sync_all().map_err(write_err)?;
    let ino = file.metadata().map_err(write_err)?.ino();
    let received = shared
        .receiving
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&ino);
    let s = shared.clone();
    let m = meta.clone();
    let received_path = received.clone();
    let (tree, file_path) = tokio::task::spawn_blocking(
        move || -> Result<(sled::Tree, Option<PathBuf>), StorageError<NodeId>> {
            file.seek(SeekFrom::Start(0)).map_err(read_err)?;
            let tree = load_tree(&s, file.try_clone().map_err(read_err)?)?;
            if received.is_none() {
                // Not a file we handed out (openraft's own tests do this): keep a copy of it as
                // the current snapshot.
                file.seek(SeekFrom::Start(0)).map_err(read_err)?;
                let tmp = s.snapshot_dir.join(format!("{}.tmp", m.snapshot_id));
                io::copy(&mut file, &mut File::create(&tmp).map_err(write_err)?)
                    .map_err(write_err)?;
                File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(write_err)?;
                Ok((tree, Some(tmp)))
            } else {
                Ok((tree, received_path))
            }
        },
    )
    .await
    .unwrap_or_else(|e| Err(write_err(io::Error::other(e.to_string()))))?;
    shared.switch_to(tree).await.map_err(write_err)?;

    let path = shared
        .snapshot_dir
        .join(format!("{}.snap", meta.snapshot_id));
    if let Some(file_path) = file_path {
        fs::rename(&file_path, &path).map_err(write_err)?;
        sync_dir(&shared.snapshot_dir).map_err(write_err)?;
        make_current(shared, path, meta.clone());
    }
    tracing::info!(snapshot = %meta.snapshot_id, "snapshot installed");
    Ok(())
}

/// Streams a snapshot file into a new tree and checks its CRC; the new tree is dropped on any
/// error so the current state stays untouched.
fn load_tree(shared: &Shared, file: File) -> Result<sled::Tree, StorageError<NodeId>> {
    let name = format!("sm-{}", unique());
    let tree = shared.db.open_tree(&name).map_err(write_err)?;
    let load = || -> io::Result<()> {
        let mut r = CrcReader {
            inner: BufReader::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
        };
        read_header(&mut r)?;
        let mut batch = sled::Batch::default();
        let mut batch_bytes = 0;
        loop {
            let klen = read_u32(&mut r)?;
            if klen == END {
                break;
            }
            let key = read_bytes(&mut r, klen)?;
            let vlen = read_u32(&mut r)?;
            let value = read_bytes(&mut r, vlen)?;
            batch_bytes += key.len() + value.len();
            batch.insert(key, value);
            if batch_bytes >= INSTALL_BATCH_BYTES {
                tree.apply_batch(std::mem::take(&mut batch))
                    .map_err(io::Error::other)?;
                batch_bytes = 0;
            }
        }
        let computed = r.crc.clone().finalize();
        let stored = read_u32(&mut r.inner)?;
        if computed != stored {
            return Err(invalid(format!(
                "snapshot checksum mismatch: stored {stored:08x}, computed {computed:08x}"
            )));
        }
        tree.apply_batch(batch).map_err(io::Error::other)
    };
    match load() {
        Ok(()) => Ok(tree),
        Err(e) => {
            drop(tree);
            let _ = shared.db.drop_tree(name.as_bytes());
            Err(write_err(e))
        }
    }
}

/// The current snapshot, opened for reading.
pub(crate) async fn current(
    shared: &Shared,
) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
    let current = shared
        .current_snapshot
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    match current {
        None => Ok(None),
        Some((path, meta)) => open_snapshot(&path, meta).await.map(Some),
    }
}
