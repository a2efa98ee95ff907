//! Snapshots as files.
//!
//! Format (all integers little-endian):
//! ```text
//! "HQSNAP3\n"
//! u32 meta_len, meta (postcard SnapshotMeta)
//! u64 payload floor                               the oldest log index whose payloads the
//!                                                 snapshot references (u64::MAX: none)
//! { u32 key_len, key, u32 value_len, value }*     every pair of the state-machine keyspace
//! u32 0xffff_ffff                                 end marker
//! u32 crc32c of every byte before it
//! ```
//! The state machine's records only: payloads stay in the log. A snapshot sent to a follower
//! is followed on the wire by the payloads it references ([`crate::pack`]).
//! A snapshot is written to `<id>.tmp`, fdatasynced, renamed to `<id>.snap`, and the
//! directory fsynced; one received from a leader is written to `recv-<n>.part`, synced,
//! verified, and renamed once installed. Only the latest `.snap` is kept. Every snapshot is
//! verified (its checksum) when the node starts, before it is sent, and before it is
//! installed; a corrupt one is moved to the quarantine dir and never served.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hashq_raft::{codec, machine, SnapshotMeta};

use crate::fsio::{self, invalid, Fatal};

const MAGIC: &[u8; 8] = b"HQSNAP3\n";
const END: u32 = u32::MAX;

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A name part no other snapshot or received file of this process has.
pub fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{}", UNIQUE.fetch_add(1, Ordering::Relaxed))
}

/// The id of a snapshot at `meta.last_log_id`: `<term>-<index>-<unique>` (the node's Raft gate
/// accepts nothing else, since the id names a file).
pub fn new_id(last: Option<&hashq_raft::LogId>) -> String {
    match last {
        Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, unique()),
        None => format!("0-0-{}", unique()),
    }
}

/// Whether `id` may name a file: digits, lowercase hex and dashes only.
pub fn id_is_safe(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 80
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-')
}

/// Writes through while computing the CRC of everything written.
pub(crate) struct CrcWriter<W: Write> {
    pub inner: W,
    pub crc: u32,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = fsio::crc_append(self.crc, &buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads through while computing the CRC of everything read.
pub(crate) struct CrcReader<R: Read> {
    pub inner: R,
    pub crc: u32,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = fsio::crc_append(self.crc, &buf[..n]);
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

/// Reads a snapshot's header: its metadata, its payload floor and the header's length.
pub(crate) fn read_header(r: &mut impl Read) -> io::Result<(SnapshotMeta, Option<u64>, u64)> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(invalid("not a hashq snapshot (format 3)"));
    }
    let len = read_u32(r)?;
    if len > 64 << 20 {
        return Err(invalid(format!("snapshot metadata of {len} bytes")));
    }
    let meta = read_bytes(r, len)?;
    let meta = codec::decode("snapshot metadata", &meta).map_err(|e| invalid(e.to_string()))?;
    let mut floor = [0u8; 8];
    r.read_exact(&mut floor)?;
    let floor = u64::from_le_bytes(floor);
    Ok((
        meta,
        (floor != u64::MAX).then_some(floor),
        8 + 4 + u64::from(len) + 8,
    ))
}

/// What reading a snapshot found.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    pub meta: SnapshotMeta,
    /// The oldest log index whose payloads it references.
    pub payload_floor: Option<u64>,
    /// Where its checksum ends (a payload section may follow).
    pub len: u64,
    /// The payloads its `p` records name, in order.
    pub refs: crate::pack::RefDigest,
}

/// Writes a snapshot of `meta` and every pair of `pairs` to `dir/<id>.snap`, durably.
pub(crate) fn write(
    dir: &Path,
    meta: &SnapshotMeta,
    payload_floor: Option<u64>,
    pairs: impl Iterator<Item = io::Result<(Vec<u8>, Vec<u8>)>>,
) -> Result<PathBuf, Fatal> {
    let tmp = dir.join(format!("{}.tmp", meta.snapshot_id));
    let path = dir.join(format!("{}.snap", meta.snapshot_id));
    let write = || -> io::Result<File> {
        let file = File::create(&tmp)?;
        let mut w = CrcWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            crc: 0,
        };
        w.write_all(MAGIC)?;
        let meta_bytes = codec::encode(meta);
        w.write_all(&(meta_bytes.len() as u32).to_le_bytes())?;
        w.write_all(&meta_bytes)?;
        w.write_all(&payload_floor.unwrap_or(u64::MAX).to_le_bytes())?;
        for pair in pairs {
            let (k, v) = pair?;
            w.write_all(&(k.len() as u32).to_le_bytes())?;
            w.write_all(&k)?;
            w.write_all(&(v.len() as u32).to_le_bytes())?;
            w.write_all(&v)?;
        }
        w.write_all(&END.to_le_bytes())?;
        let crc = w.crc;
        let mut inner = w.inner.into_inner().map_err(|e| e.into_error())?;
        inner.write_all(&crc.to_le_bytes())?;
        Ok(inner)
    };
    let file = write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        fsio::fatal("write snapshot", &tmp)(e)
    })?;
    fsio::sync_data(&file, &tmp)?;
    drop(file);
    fsio::rename_durable(&tmp, &path)?;
    Ok(path)
}

/// Reads a snapshot file up to its checksum, checking its structure and its checksum,
/// handing every pair to `each`. What follows the checksum (a payload section) is not read.
pub(crate) fn read(
    path: &Path,
    each: impl FnMut(Vec<u8>, Vec<u8>) -> io::Result<()>,
) -> io::Result<SnapshotInfo> {
    read_from(File::open(path)?, each)
}

/// [`read`] from an open file (or any reader positioned at the snapshot's start).
pub(crate) fn read_from(
    source: impl Read,
    mut each: impl FnMut(Vec<u8>, Vec<u8>) -> io::Result<()>,
) -> io::Result<SnapshotInfo> {
    let mut r = CrcReader {
        inner: BufReader::with_capacity(1 << 20, source),
        crc: 0,
    };
    let (meta, payload_floor, mut len) = read_header(&mut r)?;
    // The digest of the live payloads' references, in log order (as the section sends them).
    let mut refs = crate::pack::RefDigest::default();
    let mut order = machine::LogOrder::default();
    let mut add = |at| {
        refs.add(&at);
        Ok::<(), io::Error>(())
    };
    loop {
        let klen = read_u32(&mut r)?;
        len += 4;
        if klen == END {
            break;
        }
        if klen > 1 << 20 {
            return Err(invalid(format!("a key of {klen} bytes")));
        }
        let key = read_bytes(&mut r, klen)?;
        let vlen = read_u32(&mut r)?;
        if vlen > 512 << 20 {
            return Err(invalid(format!("a value of {vlen} bytes")));
        }
        let value = read_bytes(&mut r, vlen)?;
        len += u64::from(klen) + 4 + u64::from(vlen);
        if let Some(at) =
            machine::live_payload_of(&key, &value).map_err(|e| invalid(e.to_string()))?
        {
            order.push(at, &mut add)?;
        }
        each(key, value)?;
    }
    order.flush(&mut add)?;
    let computed = r.crc;
    let stored = read_u32(&mut r.inner)?;
    if computed != stored {
        return Err(invalid(format!(
            "snapshot checksum mismatch: stored {stored:08x}, computed {computed:08x}"
        )));
    }
    Ok(SnapshotInfo {
        meta,
        payload_floor,
        len: len + 4,
        refs,
    })
}

/// Checks a snapshot file end to end, with the payload section that follows it when it came
/// from a leader (which must hold exactly the payloads the snapshot references); returns its
/// metadata. Nothing else may follow.
pub fn verify(path: &Path) -> io::Result<SnapshotMeta> {
    verify_info(path).map(|i| i.meta)
}

/// [`verify`], with what was found.
pub(crate) fn verify_info(path: &Path) -> io::Result<SnapshotInfo> {
    let info = read(path, |_, _| Ok(()))?;
    let file_len = fs::metadata(path)?.len();
    if file_len > info.len {
        let section = crate::pack::verify_section(path, info.len)?;
        if section != info.refs {
            return Err(invalid(format!(
                "the payload section holds {} payloads, not the {} the snapshot references",
                section.count, info.refs.count
            )));
        }
    }
    Ok(info)
}

/// Whether a verified snapshot file carries a payload section.
pub(crate) fn has_section(path: &Path, info: &SnapshotInfo) -> io::Result<bool> {
    Ok(fs::metadata(path)?.len() > info.len)
}

/// The newest snapshot in `dir` that verifies; corrupt ones are moved to `quarantine`.
pub(crate) fn find_latest(
    dir: &Path,
    layout: &crate::format::Layout,
) -> Result<Option<(PathBuf, SnapshotInfo)>, Fatal> {
    let mut candidates = Vec::new();
    let entries = fs::read_dir(dir).map_err(fsio::fatal("list", dir))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "snap") {
            candidates.push(path);
        }
    }
    let mut best: Option<(PathBuf, SnapshotInfo)> = None;
    for path in candidates {
        match verify_info(&path) {
            Ok(info) => {
                if best
                    .as_ref()
                    .is_none_or(|(_, b)| info.meta.last_log_id > b.meta.last_log_id)
                {
                    best = Some((path, info));
                }
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "corrupt snapshot");
                crate::format::quarantine(layout, &path, "snapshot fails its checksum")?;
            }
        }
    }
    Ok(best)
}

/// Removes files of snapshots that were being written or received when the node stopped.
pub(crate) fn remove_partial_files(dir: &Path) -> Result<(), Fatal> {
    let entries = fs::read_dir(dir).map_err(fsio::fatal("list", dir))?;
    let mut removed = false;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "tmp" || e == "part") {
            fs::remove_file(&path).map_err(fsio::fatal("unlink", &path))?;
            removed = true;
        }
    }
    if removed {
        fsio::sync_dir(dir)?;
    }
    Ok(())
}

/// Deletes every `.snap` in `dir` but `keep`.
pub(crate) fn remove_others(dir: &Path, keep: &Path) -> Result<(), Fatal> {
    let entries = fs::read_dir(dir).map_err(fsio::fatal("list", dir))?;
    let mut removed = false;
    for entry in entries.flatten() {
        let p = entry.path();
        if p != keep && p.extension().is_some_and(|e| e == "snap") {
            fs::remove_file(&p).map_err(fsio::fatal("unlink", &p))?;
            removed = true;
        }
    }
    if removed {
        fsio::sync_dir(dir)?;
    }
    Ok(())
}
