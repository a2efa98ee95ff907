//! Durable file operations, spelled out once.
//!
//! Data is on stable storage only after `fdatasync` (or `fsync`) of the file returned 0; a
//! file created, renamed or deleted is durable only after an `fsync` of its directory. A
//! failed sync is fatal for the writes it covered: the kernel may have dropped the dirty
//! pages, so retrying it could report success for data that is gone ("fsyncgate"). Every
//! sync error is therefore returned as [`Fatal`], and callers never retry it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A file whose bytes are not what its format says (a bad magic, length or checksum).
pub(crate) fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// A failed sync or a failed write on the way to one: the data it covered may be lost, and
/// the store stops accepting writes (the node exits and restarts from what is durable).
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct Fatal {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

pub(crate) fn fatal<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> Fatal + 'a {
    move |source| Fatal {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Observes the store's timings (the node's metrics hook in here).
pub trait StoreObserver: Send + Sync {
    /// An fsync or fdatasync took this long.
    fn synced(&self, seconds: f64);
    /// One apply call of the state machine took this long.
    fn applied(&self, _seconds: f64) {}
}

static OBSERVER: std::sync::OnceLock<Box<dyn StoreObserver>> = std::sync::OnceLock::new();

/// Sets the process-wide observer (once; later calls are ignored).
pub fn observe_store(observer: Box<dyn StoreObserver>) {
    let _ = OBSERVER.set(observer);
}

/// The observer, if one was set.
pub(crate) fn observer() -> Option<&'static dyn StoreObserver> {
    OBSERVER.get().map(|o| o.as_ref())
}

/// `HASHQ_UNSAFE_SKIP_SYNC=1` turns every sync into nothing. It exists for one purpose: to
/// show that the power-cut tests fail when the syncs are missing (a test that cannot fail
/// proves nothing). Never set it anywhere else: a node then loses acknowledged writes in a
/// power cut.
fn syncs_skipped() -> bool {
    static SKIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SKIP.get_or_init(|| {
        let skip = std::env::var("HASHQ_UNSAFE_SKIP_SYNC").is_ok_and(|v| v == "1");
        if skip {
            tracing::error!("HASHQ_UNSAFE_SKIP_SYNC=1: nothing is synced; a power cut will lose acknowledged writes");
        }
        skip
    })
}

fn observed<T: Default>(f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    if syncs_skipped() {
        return Ok(T::default());
    }
    let started = Instant::now();
    let result = f();
    if let Some(o) = observer() {
        o.synced(started.elapsed().as_secs_f64());
    }
    result
}

/// `fdatasync` of `file`: its data and the metadata needed to read it back (its length).
pub fn sync_data(file: &File, path: &Path) -> Result<(), Fatal> {
    observed(|| file.sync_data()).map_err(fatal("fdatasync", path))
}

/// `fsync` of a directory: its entries (files created, renamed or deleted in it).
pub fn sync_dir(dir: &Path) -> Result<(), Fatal> {
    observed(|| File::open(dir)?.sync_all()).map_err(fatal("fsync of directory", dir))
}

/// Creates `dir` and its parents, each made durable in its own parent.
pub fn create_dir_durable(dir: &Path) -> Result<(), Fatal> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            create_dir_durable(parent)?;
        }
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(fatal("mkdir", dir)(e)),
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically and durably: a temporary file, fdatasync, rename,
/// fsync of the directory. A crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Fatal> {
    let dir = parent(path);
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(fatal("create", &tmp))?;
    file.write_all(bytes).map_err(fatal("write", &tmp))?;
    sync_data(&file, &tmp)?;
    drop(file);
    fs::rename(&tmp, path).map_err(fatal("rename", path))?;
    sync_dir(dir)
}

/// Creates `path` (it must not exist) for writing and reading, and makes its name durable.
pub fn create_new_durable(path: &Path) -> Result<File, Fatal> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(fatal("create", path))?;
    sync_dir(parent(path))?;
    Ok(file)
}

/// Removes `path` and makes the removal durable.
pub fn remove_durable(path: &Path) -> Result<(), Fatal> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(fatal("unlink", path)(e)),
    }
}

/// Renames `from` to `to` and makes both directories durable.
pub fn rename_durable(from: &Path, to: &Path) -> Result<(), Fatal> {
    fs::rename(from, to).map_err(fatal("rename", from))?;
    sync_dir(parent(to))?;
    if parent(from) != parent(to) {
        sync_dir(parent(from))?;
    }
    Ok(())
}

/// Every regular file below `dir`, then `dir` and its subdirectories, fsynced: what a
/// library that does not sync its own files (sled) needs before its state may be relied on.
pub fn sync_tree(dir: &Path) -> Result<(), Fatal> {
    for entry in fs::read_dir(dir).map_err(fatal("read directory", dir))? {
        let entry = entry.map_err(fatal("read directory", dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(fatal("stat", &path))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            let file = File::open(&path).map_err(fatal("open", &path))?;
            observed(|| file.sync_all()).map_err(fatal("fsync", &path))?;
        }
    }
    sync_dir(dir)
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// CRC-32C (Castagnoli) of `bytes`, the checksum of every record and snapshot.
pub fn crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Continues a CRC-32C over more bytes.
pub fn crc_append(crc: u32, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, bytes)
}

/// Reads a file from a position on, without moving any shared cursor (several readers can
/// share one handle).
pub(crate) struct ReadAt<'f> {
    pub file: &'f File,
    pub pos: u64,
}

impl std::io::Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}
