//! The vote, the purge point and the committed hint, in one small file of two slots.
//!
//! Each write goes to the slot that does not hold the newest durable record, with a sequence
//! number one above the newest, and carries the whole state; a reader takes the valid slot
//! (magic, length and CRC-32C check) with the highest sequence number. A vote or a purge
//! point is fdatasynced before it is reported saved, so a power cut leaves either the old or
//! the new durable record. The committed index is only a hint for a faster restart (openraft
//! re-applies up to it): it is written without a sync, and only ever into the slot that is
//! not the newest durable one, so an unsynced write can never tear the record the vote lives
//! in. It is also never ahead of the log's durable end.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use hashq_raft::{LogId, NodeId};
use openraft::Vote;
use serde::{Deserialize, Serialize};

use crate::fsio::{self, fatal, Fatal};

const SLOT: usize = 4096;
const MAGIC: u32 = 0x4851_5653; // "HQVS"
const HEADER: usize = 4 + 2 + 2 + 8;

/// What the file keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftState {
    pub vote: Option<Vote<NodeId>>,
    pub purged: Option<LogId>,
    pub committed: Option<LogId>,
}

/// The open state file.
pub struct StateFile {
    file: File,
    path: PathBuf,
    state: RaftState,
    seq: u64,
    /// The slot holding the newest durable record (unsynced hints go to the other one).
    durable_slot: usize,
    /// Where each record is encoded: the committed hint is written on every commit, a few
    /// hundred times a second, where a slot allocated each time showed in the allocator.
    buf: Box<[u8; SLOT]>,
}

/// Why the file could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Fatal(#[from] Fatal),
    /// Neither slot holds a valid record although the file has content: corruption.
    #[error("{path}: neither slot holds a valid record")]
    Corrupt { path: PathBuf },
}

/// Writes the record into `slot` (a whole slot, zeros after the record, so each write covers
/// its page and the kernel never reads one in to merge a partial write).
fn encode_slot(seq: u64, state: &RaftState, slot: &mut [u8; SLOT]) {
    let len = postcard::to_slice(state, &mut slot[HEADER..SLOT - 4])
        .expect("the raft state always encodes into a slot")
        .len();
    slot[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    slot[4..6].copy_from_slice(&1u16.to_le_bytes());
    slot[6..8].copy_from_slice(&(len as u16).to_le_bytes());
    slot[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = fsio::crc(&slot[..HEADER + len]);
    slot[HEADER + len..HEADER + len + 4].copy_from_slice(&crc.to_le_bytes());
    slot[HEADER + len + 4..].fill(0);
}

fn decode_slot(slot: &[u8]) -> Option<(u64, RaftState)> {
    let magic = u32::from_le_bytes(slot.get(0..4)?.try_into().ok()?);
    let len = u16::from_le_bytes(slot.get(6..8)?.try_into().ok()?) as usize;
    if magic != MAGIC || HEADER + len + 4 > SLOT {
        return None;
    }
    let crc = u32::from_le_bytes(slot.get(HEADER + len..HEADER + len + 4)?.try_into().ok()?);
    if fsio::crc(&slot[..HEADER + len]) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(slot.get(8..16)?.try_into().ok()?);
    let state = postcard::from_bytes(&slot[HEADER..HEADER + len]).ok()?;
    Some((seq, state))
}

impl StateFile {
    /// A file with no record yet gets an empty one, synced.
    fn fresh(file: File, path: &Path) -> Result<StateFile, StateError> {
        let mut s = StateFile {
            file,
            path: path.to_path_buf(),
            state: RaftState::default(),
            seq: 0,
            durable_slot: 1,
            buf: Box::new([0; SLOT]),
        };
        s.write(true)?;
        Ok(s)
    }

    /// Opens the file, creating it (durably) when it does not exist.
    pub fn open(path: &Path) -> Result<StateFile, StateError> {
        if !path.exists() {
            return Self::fresh(fsio::create_new_durable(path)?, path);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(fatal("open", path))?;
        let mut bytes = vec![0u8; 2 * SLOT];
        let n = read_up_to(&file, &mut bytes).map_err(fatal("read", path))?;
        let slots = [decode_slot(&bytes[..SLOT]), decode_slot(&bytes[SLOT..])];
        let best = match (&slots[0], &slots[1]) {
            (Some(a), Some(b)) => Some(if a.0 >= b.0 { 0 } else { 1 }),
            (Some(_), None) => Some(0),
            (None, Some(_)) => Some(1),
            (None, None) => None,
        };
        let Some(best) = best else {
            if n == 0 {
                // Created, then cut before its first record was durable: nothing was ever
                // voted through it.
                return Self::fresh(file, path);
            }
            return Err(StateError::Corrupt {
                path: path.to_path_buf(),
            });
        };
        let (seq, state) = slots[best].clone().expect("the best slot is valid");
        let mut s = StateFile {
            file,
            path: path.to_path_buf(),
            state,
            seq,
            durable_slot: best,
            buf: Box::new([0; SLOT]),
        };
        // The newest valid record may be an unsynced hint: write it again, synced, into the
        // other slot, so that the slot later hints stay away from is really durable.
        s.write(true)?;
        Ok(s)
    }

    pub fn state(&self) -> &RaftState {
        &self.state
    }

    /// Saves the vote (durably).
    pub fn save_vote(&mut self, vote: Vote<NodeId>) -> Result<(), Fatal> {
        self.state.vote = Some(vote);
        self.write(true)
    }

    /// Saves the purge point (durably): the log may drop entries up to it afterwards.
    pub fn save_purged(&mut self, purged: LogId) -> Result<(), Fatal> {
        self.state.purged = Some(purged);
        self.write(true)
    }

    /// Notes the committed log id (no sync: a hint for restarts).
    pub fn note_committed(&mut self, committed: Option<LogId>) -> Result<(), Fatal> {
        if self.state.committed == committed {
            return Ok(());
        }
        self.state.committed = committed;
        self.write(false)
    }

    fn write(&mut self, durable: bool) -> Result<(), Fatal> {
        let slot = 1 - self.durable_slot;
        self.seq += 1;
        encode_slot(self.seq, &self.state, &mut self.buf);
        self.file
            .write_all_at(&self.buf[..], (slot * SLOT) as u64)
            .map_err(fatal("write", &self.path))?;
        if durable {
            fsio::sync_data(&self.file, &self.path)?;
            self.durable_slot = slot;
        }
        Ok(())
    }
}

fn read_up_to(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;

    fn id(i: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 1), i)
    }

    /// A record as the file has always held it: header, postcard body, CRC-32C, zeros.
    fn slot_as_written_before(seq: u64, state: &RaftState) -> Vec<u8> {
        let body = postcard::to_allocvec(state).unwrap();
        let mut slot = Vec::new();
        slot.extend_from_slice(&MAGIC.to_le_bytes());
        slot.extend_from_slice(&1u16.to_le_bytes());
        slot.extend_from_slice(&(body.len() as u16).to_le_bytes());
        slot.extend_from_slice(&seq.to_le_bytes());
        slot.extend_from_slice(&body);
        let crc = fsio::crc(&slot);
        slot.extend_from_slice(&crc.to_le_bytes());
        slot.resize(SLOT, 0);
        slot
    }

    #[test]
    fn a_slot_encoded_in_place_over_a_longer_record_is_the_same_bytes() {
        let long = RaftState {
            vote: Some(Vote::new(u64::MAX, u64::MAX)),
            purged: Some(LogId::new(CommittedLeaderId::new(u64::MAX, 9), u64::MAX)),
            committed: Some(id(u64::MAX)),
        };
        let mut buf = Box::new([0xa5; SLOT]);
        for (seq, state) in [(u64::MAX, long), (2, RaftState::default())] {
            encode_slot(seq, &state, &mut buf);
            assert_eq!(buf[..], slot_as_written_before(seq, &state)[..]);
            assert_eq!(decode_slot(&buf[..]), Some((seq, state)));
        }
    }

    #[test]
    fn the_newest_record_wins_and_a_torn_slot_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vote");
        let mut f = StateFile::open(&path).unwrap();
        f.save_vote(Vote::new(3, 1)).unwrap();
        f.note_committed(Some(id(7))).unwrap();
        f.save_purged(id(5)).unwrap();
        drop(f);
        let f = StateFile::open(&path).unwrap();
        assert_eq!(f.state().vote, Some(Vote::new(3, 1)));
        assert_eq!(f.state().purged, Some(id(5)));
        assert_eq!(f.state().committed, Some(id(7)));

        // Tear whichever slot holds the newest record: the other one still has the vote.
        let bytes = std::fs::read(&path).unwrap();
        let newest =
            if decode_slot(&bytes[..SLOT]).unwrap().0 > decode_slot(&bytes[SLOT..]).unwrap().0 {
                0
            } else {
                1
            };
        let mut torn = bytes.clone();
        torn[newest * SLOT + 20] ^= 0xff;
        std::fs::write(&path, &torn).unwrap();
        let f = StateFile::open(&path).unwrap();
        assert_eq!(f.state().vote, Some(Vote::new(3, 1)));

        // Both slots bad: refused, never read as "no vote".
        let mut both = bytes;
        both[20] ^= 0xff;
        both[SLOT + 20] ^= 0xff;
        std::fs::write(&path, &both).unwrap();
        assert!(matches!(
            StateFile::open(&path),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn hints_never_overwrite_the_newest_durable_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vote");
        let mut f = StateFile::open(&path).unwrap();
        f.save_vote(Vote::new(4, 2)).unwrap();
        let durable = f.durable_slot;
        for i in 0..5 {
            f.note_committed(Some(id(i))).unwrap();
            assert_eq!(f.durable_slot, durable);
        }
        let bytes = std::fs::read(&path).unwrap();
        let (_, kept) = decode_slot(&bytes[durable * SLOT..(durable + 1) * SLOT]).unwrap();
        assert_eq!(kept.vote, Some(Vote::new(4, 2)));
    }
}
