//! Payload sections and packs: how payloads travel with a snapshot and where a node that
//! installed one keeps them.
//!
//! A snapshot file holds the state machine's records only; an item's payload stays in the
//! log entry that carried it ([`PayloadRef`]). When a leader sends a snapshot, the payloads
//! the snapshot still references follow the file on the wire as a *payload section*, read
//! from the leader's log segments (held open for the length of the transfer) and packs:
//!
//! ```text
//! "HQPAYLD1"
//! { u64 index, u32 ordinal, u64 term, u32 len, u32 crc32c(payload), payload }*
//!                                      in the order of the snapshot's `p` records
//! u64 0xffff_ffff_ffff_ffff            end marker
//! u64 count
//! u32 crc32c of every byte of the section before it
//! ```
//! (integers little-endian). The receiver checks that the section holds exactly the payloads
//! the snapshot's `p` records name, in order, before anything is installed. On install the
//! received file becomes a *pack*: the receiver appends a table of where each payload is,
//!
//! ```text
//! { u64 index, u32 ordinal, u64 term, u64 offset, u32 len, u32 crc32c(payload) }*   sorted
//! u64 table_offset, u64 count, u32 crc32c(table), "HQPACK1\n"
//! ```
//! syncs it and renames it into `packs/`. A pack is looked up through a sparse index of its
//! table (one key in [`SPARSE_EVERY`]), so its memory does not grow with the payloads it
//! holds; every payload read is checked against its CRC. A pack is deleted once no payload in
//! it is referenced by the state machine or the current snapshot.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use hashq_raft::types::PayloadRef;

use crate::fsio::{self, invalid, ReadAt};

const SECTION_MAGIC: &[u8; 8] = b"HQPAYLD1";
const PACK_MAGIC: &[u8; 8] = b"HQPACK1\n";
const SECTION_END: u64 = u64::MAX;
/// Bytes of one entry header in a section: index, ordinal, term, len, crc.
const ENTRY_HEAD: usize = 8 + 4 + 8 + 4 + 4;
/// Bytes of one row of a pack's table.
const ROW: usize = 8 + 4 + 8 + 8 + 4 + 4;
/// Bytes after a pack's table.
const TRAILER: u64 = 8 + 8 + 4 + 8;
/// One table row in this many is kept in memory.
pub const SPARSE_EVERY: usize = 64;
/// Largest payload accepted when reading a section (a corrupt length must not allocate
/// gigabytes).
const MAX_PAYLOAD: u32 = 512 << 20;

/// A running digest of a sequence of payload references: the snapshot's `p` records and
/// the section's entries must give the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefDigest {
    pub count: u64,
    crc: u32,
}

impl RefDigest {
    pub fn add(&mut self, r: &PayloadRef) {
        self.count += 1;
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&r.index.to_le_bytes());
        b[8..12].copy_from_slice(&r.ordinal.to_le_bytes());
        b[12..].copy_from_slice(&r.term.to_le_bytes());
        self.crc = fsio::crc_append(self.crc, &b);
    }
}

/// Writes a payload section to `out`.
pub struct SectionWriter<W: Write> {
    out: W,
    crc: u32,
    count: u64,
}

impl<W: Write> SectionWriter<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(SECTION_MAGIC)?;
        Ok(SectionWriter {
            out,
            crc: fsio::crc(SECTION_MAGIC),
            count: 0,
        })
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc = fsio::crc_append(self.crc, bytes);
        self.out.write_all(bytes)
    }

    pub fn push(&mut self, at: &PayloadRef, payload: &[u8]) -> io::Result<()> {
        let mut head = [0u8; ENTRY_HEAD];
        head[..8].copy_from_slice(&at.index.to_le_bytes());
        head[8..12].copy_from_slice(&at.ordinal.to_le_bytes());
        head[12..20].copy_from_slice(&at.term.to_le_bytes());
        let len = u32::try_from(payload.len()).map_err(|_| invalid("payload over 4 GiB"))?;
        head[20..24].copy_from_slice(&len.to_le_bytes());
        head[24..28].copy_from_slice(&fsio::crc(payload).to_le_bytes());
        self.put(&head)?;
        self.put(payload)?;
        self.count += 1;
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.put(&SECTION_END.to_le_bytes())?;
        let count = self.count;
        self.put(&count.to_le_bytes())?;
        let crc = self.crc;
        self.out.write_all(&crc.to_le_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One entry of a section as read back: its reference, and where its payload is.
struct SectionEntry {
    at: PayloadRef,
    offset: u64,
    len: u32,
    crc: u32,
}

/// Reads a section from `r` (positioned at its start, `offset` bytes into the file), checking
/// its structure and CRC; hands each entry to `each`. Returns the digest of its references
/// and the offset just past it.
fn read_section(
    r: &mut impl Read,
    offset: u64,
    mut each: impl FnMut(&SectionEntry) -> io::Result<()>,
) -> io::Result<(RefDigest, u64)> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != SECTION_MAGIC {
        return Err(invalid("not a payload section"));
    }
    let mut crc = fsio::crc(&magic);
    let mut pos = offset + 8;
    let mut digest = RefDigest::default();
    let mut payload = Vec::new();
    let mut last: Option<(u64, u32)> = None;
    loop {
        let mut index = [0u8; 8];
        r.read_exact(&mut index)?;
        crc = fsio::crc_append(crc, &index);
        let index = u64::from_le_bytes(index);
        if index == SECTION_END {
            let mut count = [0u8; 8];
            r.read_exact(&mut count)?;
            crc = fsio::crc_append(crc, &count);
            let mut stored = [0u8; 4];
            r.read_exact(&mut stored)?;
            if u64::from_le_bytes(count) != digest.count {
                return Err(invalid("the payload section's count is wrong"));
            }
            if u32::from_le_bytes(stored) != crc {
                return Err(invalid("the payload section fails its checksum"));
            }
            return Ok((digest, pos + 8 + 8 + 4));
        }
        let mut rest = [0u8; ENTRY_HEAD - 8];
        r.read_exact(&mut rest)?;
        crc = fsio::crc_append(crc, &rest);
        let ordinal = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
        let term = u64::from_le_bytes(rest[4..12].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(rest[12..16].try_into().expect("4 bytes"));
        let payload_crc = u32::from_le_bytes(rest[16..20].try_into().expect("4 bytes"));
        if len > MAX_PAYLOAD {
            return Err(invalid(format!("a payload of {len} bytes")));
        }
        if last.is_some_and(|l| l >= (index, ordinal)) {
            return Err(invalid("the payload section is out of order"));
        }
        last = Some((index, ordinal));
        payload.resize(len as usize, 0);
        r.read_exact(&mut payload)?;
        crc = fsio::crc_append(crc, &payload);
        if fsio::crc(&payload) != payload_crc {
            return Err(invalid("a payload fails its checksum"));
        }
        let at = PayloadRef {
            term,
            index,
            ordinal,
        };
        digest.add(&at);
        let entry = SectionEntry {
            at,
            offset: pos + ENTRY_HEAD as u64,
            len,
            crc: payload_crc,
        };
        each(&entry)?;
        pos += ENTRY_HEAD as u64 + u64::from(len);
    }
}

/// Checks the section that starts at `offset` of `path` and ends the file; returns the
/// digest of the references it holds.
pub fn verify_section(path: &Path, offset: u64) -> io::Result<RefDigest> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(offset))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let (digest, end) = read_section(&mut r, offset, |_| Ok(()))?;
    if end != len {
        return Err(invalid("bytes after the payload section"));
    }
    Ok(digest)
}

/// Turns a received snapshot file whose section starts at `offset` and ends the file into a
/// pack: appends the table (streamed: one pass over the section, bounded memory) and syncs
/// the file.
/// Returns the digest of the references the section holds.
pub fn finish_pack(path: &Path, offset: u64) -> Result<RefDigest, fsio::Fatal> {
    let build = || -> io::Result<(File, RefDigest)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(path)?;
        let len = file.metadata()?.len();
        let mut w = BufWriter::with_capacity(1 << 20, &file);
        let mut crc = 0;
        let mut count = 0u64;
        let mut r = BufReader::with_capacity(
            1 << 20,
            ReadAt {
                file: &file,
                pos: offset,
            },
        );
        let (digest, end) = read_section(&mut r, offset, |e| {
            let mut row = [0u8; ROW];
            row[..8].copy_from_slice(&e.at.index.to_le_bytes());
            row[8..12].copy_from_slice(&e.at.ordinal.to_le_bytes());
            row[12..20].copy_from_slice(&e.at.term.to_le_bytes());
            row[20..28].copy_from_slice(&e.offset.to_le_bytes());
            row[28..32].copy_from_slice(&e.len.to_le_bytes());
            row[32..36].copy_from_slice(&e.crc.to_le_bytes());
            crc = fsio::crc_append(crc, &row);
            count += 1;
            w.write_all(&row)
        })?;
        if end != len {
            return Err(invalid("bytes after the payload section"));
        }
        w.write_all(&end.to_le_bytes())?;
        w.write_all(&count.to_le_bytes())?;
        w.write_all(&crc.to_le_bytes())?;
        w.write_all(PACK_MAGIC)?;
        w.flush()?;
        drop(w);
        Ok((file, digest))
    };
    let (file, digest) = build().map_err(fsio::fatal("write pack", path))?;
    fsio::sync_data(&file, path)?;
    Ok(digest)
}

/// A pack: payloads that came with an installed snapshot.
pub struct Pack {
    pub path: PathBuf,
    file: File,
    table_offset: u64,
    count: u64,
    /// Every [`SPARSE_EVERY`]th row's key, with the row's number.
    sparse: Vec<((u64, u32), u64)>,
    pub min_index: u64,
    pub max_index: u64,
    /// The file's size.
    pub len: u64,
}

fn row_key(row: &[u8]) -> (u64, u32) {
    (
        u64::from_le_bytes(row[..8].try_into().expect("8 bytes")),
        u32::from_le_bytes(row[8..12].try_into().expect("4 bytes")),
    )
}

impl Pack {
    /// Opens a pack, checking its table.
    pub fn open(path: &Path) -> io::Result<Pack> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len < TRAILER {
            return Err(invalid("too short for a pack"));
        }
        let mut trailer = [0u8; TRAILER as usize];
        file.read_exact_at(&mut trailer, len - TRAILER)?;
        if &trailer[20..28] != PACK_MAGIC {
            return Err(invalid("not a pack (no table)"));
        }
        let table_offset = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
        let count = u64::from_le_bytes(trailer[8..16].try_into().expect("8 bytes"));
        let stored = u32::from_le_bytes(trailer[16..20].try_into().expect("4 bytes"));
        if table_offset
            .checked_add(count.saturating_mul(ROW as u64))
            .is_none_or(|end| end != len - TRAILER)
        {
            return Err(invalid("a pack's table is out of bounds"));
        }
        let mut r = BufReader::with_capacity(1 << 20, &file);
        r.seek(SeekFrom::Start(table_offset))?;
        let mut crc = 0;
        let mut sparse = Vec::new();
        let (mut min_index, mut max_index) = (u64::MAX, 0);
        let mut row = [0u8; ROW];
        for n in 0..count {
            r.read_exact(&mut row)?;
            crc = fsio::crc_append(crc, &row);
            let key = row_key(&row);
            if (n as usize).is_multiple_of(SPARSE_EVERY) {
                sparse.push((key, n));
            }
            min_index = min_index.min(key.0);
            max_index = max_index.max(key.0);
        }
        if crc != stored {
            return Err(invalid("a pack's table fails its checksum"));
        }
        Ok(Pack {
            path: path.to_path_buf(),
            file,
            table_offset,
            count,
            sparse,
            min_index,
            max_index,
            len,
        })
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// The payload at `at`, if this pack holds it.
    pub fn get(&self, at: &PayloadRef) -> io::Result<Option<Bytes>> {
        if self.count == 0 || at.index < self.min_index || at.index > self.max_index {
            return Ok(None);
        }
        let key = (at.index, at.ordinal);
        let block = match self.sparse.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => i,
            Err(0) => return Ok(None),
            Err(i) => i - 1,
        };
        let first = self.sparse[block].1;
        let rows = (self.count - first).min(SPARSE_EVERY as u64) as usize;
        let mut buf = vec![0u8; rows * ROW];
        self.file
            .read_exact_at(&mut buf, self.table_offset + first * ROW as u64)?;
        let Some(row) = buf.chunks_exact(ROW).find(|r| row_key(r) == key) else {
            return Ok(None);
        };
        let term = u64::from_le_bytes(row[12..20].try_into().expect("8 bytes"));
        if term != at.term {
            return Ok(None);
        }
        let offset = u64::from_le_bytes(row[20..28].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(row[28..32].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(row[32..36].try_into().expect("4 bytes"));
        let mut payload = vec![0u8; len as usize];
        self.file.read_exact_at(&mut payload, offset)?;
        if fsio::crc(&payload) != crc {
            return Err(invalid(format!(
                "{}: the payload at {}:{} fails its checksum",
                self.path.display(),
                at.index,
                at.ordinal
            )));
        }
        Ok(Some(Bytes::from(payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(index: u64, ordinal: u32) -> PayloadRef {
        PayloadRef {
            term: 2,
            index,
            ordinal,
        }
    }

    #[test]
    fn a_section_becomes_a_pack_that_finds_every_payload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pack");
        let prefix = b"snapshot part".to_vec();
        let mut file = File::create(&path).unwrap();
        file.write_all(&prefix).unwrap();
        let mut w = SectionWriter::new(BufWriter::new(file)).unwrap();
        let mut expected = RefDigest::default();
        let refs: Vec<PayloadRef> = (0..300).map(|i| at(10 + i / 3, (i % 3) as u32)).collect();
        for r in &refs {
            w.push(r, format!("payload {}:{}", r.index, r.ordinal).as_bytes())
                .unwrap();
            expected.add(r);
        }
        drop(w.finish().unwrap());
        assert_eq!(
            verify_section(&path, prefix.len() as u64).unwrap(),
            expected
        );
        finish_pack(&path, prefix.len() as u64).unwrap();
        let pack = Pack::open(&path).unwrap();
        assert_eq!((pack.min_index, pack.max_index), (10, 109));
        for r in &refs {
            let got = pack.get(r).unwrap().unwrap();
            assert_eq!(got, format!("payload {}:{}", r.index, r.ordinal).as_bytes());
        }
        assert!(pack.get(&at(10, 7)).unwrap().is_none());
        assert!(pack.get(&at(5, 0)).unwrap().is_none());
        // Another term's entry at the same place is not this payload.
        let other_term = PayloadRef { term: 3, ..refs[0] };
        assert!(pack.get(&other_term).unwrap().is_none());
    }

    #[test]
    fn a_damaged_section_or_payload_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.part");
        let mut w = SectionWriter::new(Vec::new()).unwrap();
        w.push(&at(1, 0), b"hello").unwrap();
        w.push(&at(2, 0), b"world").unwrap();
        let good = w.finish().unwrap();
        // A flipped payload byte, a truncated section, trailing garbage.
        let mut flipped = good.clone();
        flipped[8 + ENTRY_HEAD] ^= 1;
        for bad in [
            flipped,
            good[..good.len() - 3].to_vec(),
            [&good[..], b"x"].concat(),
        ] {
            std::fs::write(&path, &bad).unwrap();
            assert!(verify_section(&path, 0).is_err());
        }
        // Out of order.
        let mut w = SectionWriter::new(Vec::new()).unwrap();
        w.push(&at(2, 0), b"a").unwrap();
        w.push(&at(1, 0), b"b").unwrap();
        std::fs::write(&path, w.finish().unwrap()).unwrap();
        assert!(verify_section(&path, 0).is_err());
        // A pack whose payload rots later fails that read, not silently.
        std::fs::write(&path, &good).unwrap();
        finish_pack(&path, 0).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8 + ENTRY_HEAD + 1] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let pack = Pack::open(&path).unwrap();
        assert!(pack.get(&at(1, 0)).is_err());
        assert_eq!(pack.get(&at(2, 0)).unwrap().unwrap(), &b"world"[..]);
    }
}
