//! Segment files of the Raft log.
//!
//! ```text
//! header (32 bytes): "HQLOGSEG" | format u32 | reserved u32 | first index u64 | crc u32 | 0 u32
//! record:            len u32 | crc32c(kind, body) u32 | kind u8 | body (len - 1 bytes)
//! ```
//! A segment is named by the index of its first entry (`00000000000000000042.seg`). Records
//! are only appended; the tail is cut back when a leader overwrites entries that were never
//! committed. Every record is verified when the log is opened ([`scan`]). Appends are direct
//! writes of whole [`BLOCK`]s, so a segment may end with fewer than a block of zeros after
//! its last record; they are padding, not damage.

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::fsio;

pub const MAGIC: &[u8; 8] = b"HQLOGSEG";
/// The segment format this build writes.
pub const FORMAT: u32 = 1;
pub const HEADER_LEN: u64 = 32;
/// Bytes before a record's body: length, checksum, kind.
pub const RECORD_OVERHEAD: u64 = 9;
/// Direct writes cover whole blocks of this many bytes, aligned in memory and in the file:
/// a page, which covers the logical block size of any disk this runs on.
pub const BLOCK: u64 = 4096;
/// Largest record accepted when reading (a corrupt length must not allocate gigabytes).
pub const MAX_RECORD: u64 = 512 << 20;

/// A record of one log entry; its body is `[encoding version][postcard Entry]`.
pub const KIND_ENTRY: u8 = 1;

/// The name of the segment whose first entry is `first`.
pub fn file_name(first: u64) -> String {
    format!("{first:020}.seg")
}

/// The first index a segment file name stands for.
pub fn parse_name(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".seg")?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}

pub fn header(first: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    h[16..24].copy_from_slice(&first.to_le_bytes());
    let crc = fsio::crc(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Appends a record to `buf` (tests build segments with it).
#[cfg(test)]
pub fn push_record(buf: &mut Vec<u8>, kind: u8, body: &[u8]) {
    push_record_with(buf, kind, |buf| buf.extend_from_slice(body));
}

/// Appends a record to `buf` whose body is what `write_body` appends, in place (no copy of
/// its own); returns the body's length.
pub fn push_record_with(buf: &mut Vec<u8>, kind: u8, write_body: impl FnOnce(&mut Vec<u8>)) -> u32 {
    // The length and the CRC come first and are filled in once the body is there.
    const LEN_CRC: usize = RECORD_OVERHEAD as usize - 1;
    let start = buf.len();
    buf.extend_from_slice(&[0; LEN_CRC]);
    buf.push(kind);
    write_body(buf);
    let kind_and_body = &buf[start + LEN_CRC..];
    let len = kind_and_body.len() as u32;
    let crc = fsio::crc(kind_and_body);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + LEN_CRC].copy_from_slice(&crc.to_le_bytes());
    len - 1
}

/// Where a record's body is in its segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordAt {
    /// Offset of the record (its length field).
    pub offset: u64,
    /// Offset and length of its body (after the kind byte).
    pub body: u64,
    pub body_len: u32,
}

impl RecordAt {
    pub fn end(&self) -> u64 {
        self.body + u64::from(self.body_len)
    }
}

/// What went wrong in a segment, found by [`scan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damage {
    /// The file ends inside a record, or a bad record is followed only by zeros: the last
    /// write never completed (its fdatasync never returned, so nothing in it was
    /// acknowledged). Safe to cut off at `at`.
    TornTail { at: u64 },
    /// A bad record with data after it, or a bad header: not a torn write.
    Corrupt { at: u64, reason: String },
}

/// A segment read from disk: each record's place, kind and what the caller made of its body.
#[derive(Debug)]
pub struct Scanned<T> {
    pub records: Vec<(RecordAt, u8, T)>,
    /// Offset just after the last good record.
    pub end: u64,
    pub damage: Option<Damage>,
}

/// Reads every record of a segment (the bodies for this test).
#[cfg(test)]
pub fn scan(path: &Path) -> std::io::Result<Scanned<Vec<u8>>> {
    scan_with(path, |_, body| body.to_vec())
}

/// Reads and verifies every record of a segment, one at a time: `summarize` makes of each
/// verified body what the caller needs to keep (a log entry's id), so a segment is never
/// held in memory whole.
pub fn scan_with<T>(
    path: &Path,
    mut summarize: impl FnMut(u8, &[u8]) -> T,
) -> std::io::Result<Scanned<T>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, &file);
    let mut head = [0u8; HEADER_LEN as usize];
    let named = parse_name(path).unwrap_or(0);
    let corrupt = |at: u64, reason: &str| Scanned {
        records: Vec::new(),
        end: 0,
        damage: Some(Damage::Corrupt {
            at,
            reason: reason.to_string(),
        }),
    };
    if len < HEADER_LEN || r.read_exact(&mut head).is_err() {
        // A segment is created and synced with its header before anything is written to
        // it; a short one was cut while being created.
        return Ok(Scanned {
            records: Vec::new(),
            end: 0,
            damage: Some(Damage::TornTail { at: 0 }),
        });
    }
    let crc = u32::from_le_bytes(head[24..28].try_into().expect("4 bytes"));
    if &head[..8] != MAGIC || fsio::crc(&head[..24]) != crc {
        return Ok(corrupt(0, "bad segment header"));
    }
    let format = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if format != FORMAT {
        return Ok(corrupt(0, &format!("segment format {format} is unknown")));
    }
    let first = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
    if first != named {
        return Ok(corrupt(0, "the header's first index differs from the name"));
    }
    let mut records = Vec::new();
    let mut at = HEADER_LEN;
    let mut damage = None;
    let mut body = Vec::new();
    while at < len {
        let mut fixed = [0u8; RECORD_OVERHEAD as usize];
        if at + RECORD_OVERHEAD > len {
            damage = Some(tail_or_corrupt(&file, at, len, len)?);
            break;
        }
        r.read_exact(&mut fixed)?;
        let rec_len = u64::from(u32::from_le_bytes(fixed[..4].try_into().expect("4 bytes")));
        let crc = u32::from_le_bytes(fixed[4..8].try_into().expect("4 bytes"));
        let kind = fixed[8];
        if rec_len == 0 && crc == 0 && kind == 0 {
            // Zeros where a record would start: the file was extended and never written.
            damage = Some(tail_or_corrupt(&file, at, len, at + RECORD_OVERHEAD)?);
            break;
        }
        if rec_len == 0 || rec_len > MAX_RECORD || at + 8 + rec_len > len {
            damage = Some(tail_or_corrupt(&file, at, len, len)?);
            break;
        }
        let body_len = rec_len - 1;
        body.resize(body_len as usize, 0);
        r.read_exact(&mut body)?;
        if fsio::crc_append(fsio::crc(&[kind]), &body) != crc {
            damage = Some(tail_or_corrupt(&file, at, len, at + 8 + rec_len)?);
            break;
        }
        let record = RecordAt {
            offset: at,
            body: at + RECORD_OVERHEAD,
            body_len: body_len as u32,
        };
        at = record.end();
        records.push((record, kind, summarize(kind, &body)));
    }
    if let Some(Damage::TornTail { at }) = damage {
        if is_padding(&file, at, len)? {
            damage = None;
        }
    }
    let end = records.last().map_or(HEADER_LEN, |(r, _, _)| r.end());
    Ok(Scanned {
        records,
        end,
        damage,
    })
}

/// Whether the segment's bytes from `at` to its end `len` are the zeros that pad a direct
/// write's last block: fewer than a block, up to a block boundary. Nothing was ever written
/// there, so the segment ends cleanly at `at`. (Zeros left by an append that never reached
/// the disk look the same, and mean the same: its fdatasync never returned.)
fn is_padding(file: &File, at: u64, len: u64) -> std::io::Result<bool> {
    if !len.is_multiple_of(BLOCK) || len - at >= BLOCK {
        return Ok(false);
    }
    let mut rest = vec![0u8; (len - at) as usize];
    file.read_exact_at(&mut rest, at)?;
    Ok(rest.iter().all(|b| *b == 0))
}

/// A bad record at `at`: a torn tail if nothing but zeros follows the bad record's extent
/// (`bad_end`), corruption otherwise.
fn tail_or_corrupt(file: &File, at: u64, len: u64, bad_end: u64) -> std::io::Result<Damage> {
    let mut pos = bad_end.min(len);
    let mut buf = vec![0u8; 64 * 1024];
    while pos < len {
        let n = file.read_at(&mut buf, pos)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(Damage::Corrupt {
                at,
                reason: "a record fails its checksum and data follows it".into(),
            });
        }
        pos += n as u64;
    }
    Ok(Damage::TornTail { at })
}

/// The segment files in `dir`, by first index.
pub fn list(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some(first) = parse_name(&path) {
            found.push((first, path));
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn segment(dir: &Path, first: u64, bodies: &[&[u8]]) -> PathBuf {
        let path = dir.join(file_name(first));
        let mut buf = header(first).to_vec();
        for b in bodies {
            push_record(&mut buf, KIND_ENTRY, b);
        }
        std::fs::write(&path, &buf).unwrap();
        path
    }

    #[test]
    fn records_read_back_and_names_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment(dir.path(), 42, &[b"one", b"two", b""]);
        assert_eq!(parse_name(&path), Some(42));
        let s = scan(&path).unwrap();
        assert_eq!(s.damage, None);
        let bodies: Vec<&[u8]> = s.records.iter().map(|(_, _, b)| b.as_slice()).collect();
        assert_eq!(bodies, vec![&b"one"[..], b"two", b""]);
        assert_eq!(s.end, std::fs::metadata(&path).unwrap().len());
    }

    #[test]
    fn zeros_up_to_a_block_boundary_are_padding_and_anything_else_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment(dir.path(), 1, &[b"first record", b"second record"]);
        let records = std::fs::read(&path).unwrap();
        let end = records.len() as u64;
        let with = |tail: &[u8]| {
            let mut bytes = records.clone();
            bytes.extend_from_slice(tail);
            std::fs::write(&path, &bytes).unwrap();
            scan(&path).unwrap()
        };
        // A direct write's last block: zeros to the boundary. A clean end.
        let pad = BLOCK as usize - records.len();
        let s = with(&vec![0; pad]);
        assert_eq!((s.damage, s.records.len(), s.end), (None, 2, end));
        // Fewer than the 9 bytes of a record's start, to the boundary: padding too.
        let body = vec![7u8; (BLOCK - 5 - HEADER_LEN - RECORD_OVERHEAD) as usize];
        let near = segment(dir.path(), 2, &[&body]);
        let mut bytes = std::fs::read(&near).unwrap();
        bytes.extend_from_slice(&[0; 5]);
        std::fs::write(&near, &bytes).unwrap();
        let s = scan(&near).unwrap();
        assert_eq!((s.damage, s.records.len(), s.end), (None, 1, BLOCK - 5));
        // A byte that is not zero in the padding: not padding.
        let mut dirty = vec![0; pad];
        dirty[pad - 1] = 1;
        assert!(matches!(with(&dirty).damage, Some(Damage::Corrupt { .. })));
        // Zeros past the boundary (a block and more): what a torn extending write leaves.
        let s = with(&vec![0; pad + BLOCK as usize]);
        assert_eq!(s.damage, Some(Damage::TornTail { at: end }));
        // Zeros that stop short of a boundary: not a direct write's, a torn tail.
        let s = with(&vec![0; pad - 1]);
        assert_eq!(s.damage, Some(Damage::TornTail { at: end }));
    }

    #[test]
    fn a_torn_last_record_is_a_tail_a_bad_middle_one_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment(dir.path(), 1, &[b"first record", b"second record"]);
        let full = std::fs::read(&path).unwrap();
        let second = scan(&path).unwrap().records[1].0;

        // Cut in the middle of the second record.
        std::fs::write(&path, &full[..full.len() - 5]).unwrap();
        let s = scan(&path).unwrap();
        assert_eq!(s.damage, Some(Damage::TornTail { at: second.offset }));
        assert_eq!(s.records.len(), 1);

        // The second record's bytes wrong and zeros after it (a page that never made it).
        let mut zeroed = full.clone();
        zeroed[second.body as usize + 2] ^= 0x40;
        zeroed.extend_from_slice(&[0u8; 4096]);
        std::fs::write(&path, &zeroed).unwrap();
        assert_eq!(
            scan(&path).unwrap().damage,
            Some(Damage::TornTail { at: second.offset })
        );

        // A flipped bit in the first record, with a good record after it: corruption.
        let mut flipped = full.clone();
        flipped[HEADER_LEN as usize + 12] ^= 0x01;
        std::fs::write(&path, &flipped).unwrap();
        assert!(matches!(
            scan(&path).unwrap().damage,
            Some(Damage::Corrupt { .. })
        ));

        // A bad header is corruption too.
        let mut header_flip = full;
        header_flip[17] ^= 0x01;
        let mut f = File::create(&path).unwrap();
        f.write_all(&header_flip).unwrap();
        assert!(matches!(
            scan(&path).unwrap().damage,
            Some(Damage::Corrupt { .. })
        ));
    }
}
