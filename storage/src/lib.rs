//! Persistence for hashq: openraft's [`RaftLogStorage`](openraft::storage::RaftLogStorage)
//! ([`LogStore`], a segment log of our own) and
//! [`RaftStateMachine`](openraft::storage::RaftStateMachine) ([`StateMachineStore`], on sled),
//! with snapshots as files.
//!
//! # What "durable" means here
//!
//! A log append, a vote and the purge point are on stable storage (`fdatasync` of the file,
//! and `fsync` of its directory when a file is created, renamed or deleted) before openraft
//! is told so; a snapshot is fdatasynced, renamed into place and its directory fsynced before
//! it becomes current. The committed index is written as a hint only and never ahead of the
//! durable log. A failed sync is fatal for the writes it covered: the log stops taking writes,
//! openraft stops, the node exits and restarts from what is durable ([`fsio`]). Nothing
//! relies on sled's `flush`, which on Linux is `sync_file_range` (no device cache flush, no
//! metadata) and never covers sled's configuration file: the state machine is rebuilt from
//! the latest snapshot and the log whenever sled comes back behind the log's purge point,
//! empty or unreadable.
//!
//! What a node reads when it starts, it reports to its peers as held, so [`open`] first
//! syncs the whole data dir and its name in the parent: a dir restored from a backup (`cp`
//! syncs nothing), or a record written by a process that died before its fdatasync, is page
//! cache only until then, and a power cut would take back entries the node had acknowledged.
//!
//! # Why a log of our own and not the log in sled
//!
//! Measured on this machine: an fdatasync of a small append takes about 0.06 ms (p50), and
//! an append is one `pwrite` and one `fdatasync` of one file; sled offers no fsync of its
//! own, so keeping the log in it would mean syncing every file sled touches (its segment
//! files, blobs and configuration) on every append. The segment log also checks every record
//! (CRC-32C) and can tell a torn tail from corruption, which sled cannot tell us.
//!
//! # Payloads written once
//!
//! An enqueue's payload is stored in its log entry and nowhere else on the enqueue path; the
//! state machine keeps a reference (`PayloadRef`: term, index, place in the batch). The log
//! keeps a segment past the purge point while the state machine's *payload floor* (the lowest
//! index a queued or running item refers to) is inside it. A snapshot file holds the state
//! machine's metadata; when it is sent, a *payload section* follows it on the wire, streamed
//! from the log and from packs ([`pack`]), each payload with a CRC-32C and the whole checked
//! against a digest of the references in the metadata. A follower keeps that section as a
//! pack. Payloads are read with `pread` when a worker leases them ([`PayloadReader`]), never
//! cached, so memory does not follow the backlog.
//!
//! # Corruption
//!
//! Every log record, both slots of the vote file and every snapshot carry a CRC-32C,
//! verified when the node starts; snapshots also before they are sent and before they are
//! installed. A torn record at the very end of the log (never acknowledged: its fdatasync
//! never returned) is cut off. Anything else, a bad record with data after it, a bad header,
//! both vote slots bad, or a state machine that can be rebuilt from nothing durable, is
//! corruption: the damaged files are moved to `quarantine/`, the node starts with an empty
//! log and state machine (keeping its vote when that is intact), and [`Recovery`] tells the
//! node to refuse to vote until its peers have brought it back to where it was
//! (Protocol-Aware Recovery, FAST '18: a node that lost acknowledged entries must not help
//! elect a leader that lacks them). A corrupt snapshot is never served: the node builds a new
//! one instead.
//!
//! # openraft 0.9, not 0.10
//!
//! openraft 0.10 is still an alpha (0.10.0-alpha.37 on crates.io); its storage and network
//! traits change from one alpha to the next. hashq stays on 0.9.25 and gets what 0.10 would
//! bring by other means: batching in the node's proposer (many requests per entry, one sync
//! per entry), a cheap sync, entries served from memory to replication, and its own snapshot
//! transport (`generic-snapshot-data`: a snapshot is a file, streamed and verified, never
//! chunked through openraft). Leadership transfer, which 0.9 lacks, is done by triggering an
//! election on the chosen node.
//!
//! # Format
//!
//! The data dir carries its format version ([`format`]); log records and snapshots carry
//! theirs, and commands are encoded with a version tag, so a later release can add fields and
//! still read what this one wrote. The format of hashq 0.1 (log and state machine in one
//! sled database) is converted by [`migrate`].

// openraft's traits dictate `StorageError` as the error type, and it is large; boxing it
// at every internal helper would only add noise.
#![allow(clippy::result_large_err)]

pub mod format;
pub mod fsio;
mod log;
pub mod migrate;
pub mod pack;
mod payloads;
pub mod recover;
mod sm;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use format::Layout;
pub use log::state::RaftState;
pub use log::{LogDamage, LogOpened, LogOptions, LogStore};
pub use payloads::PayloadReader;
use payloads::Payloads;
pub use sm::{
    AppliedState, SledKv, SmOpened, SmReader, SnapshotStats, StateMachineStore, FLUSH_EVERY,
};

/// A storage failure outside openraft's calls (opening the store).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Fatal(#[from] fsio::Fatal),
    /// A data dir of a format this build does not read.
    #[error(
        "{path}: unknown data dir format ({found}); this build reads formats 3 to {} (and converts 1 and 2 with `hashq migrate`)",
        format::CURRENT
    )]
    Format { path: PathBuf, found: String },
    /// A data dir written by hashq 0.1.
    #[error("{dir} was written by hashq 0.1 (Raft log and state machine in sled): convert it with `hashq migrate --data-dir {dir}` while the node is stopped, or move it away and let the node catch up from its peers (see the README)")]
    Legacy { dir: PathBuf },
    /// A data dir of format 2 (payloads in the state machine).
    #[error("{dir} is in data format 2 (payloads in the state machine): convert it with `hashq migrate --data-dir {dir}` while the node is stopped (see the README)")]
    Format2 { dir: PathBuf },
}

/// How to open a node's store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// sled's page cache, the bound on the state machine's memory.
    pub cache_bytes: u64,
    pub log: LogOptions,
    /// How long applied writes may wait above sled before they go into it in one batch
    /// ([`sm::FLUSH_EVERY`]).
    pub flush_every: std::time::Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_bytes: 128 * 1024 * 1024,
            log: LogOptions::default(),
            flush_every: sm::FLUSH_EVERY,
        }
    }
}

/// What opening the store found and did, for the node's logs, `/status` and its vote.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    pub log: LogOpened,
    pub sm: SmOpened,
    /// Set when something durable was damaged and set aside: the node must not vote (nor
    /// stand for election) until its log reaches this index again, copied from its peers.
    pub repair_until: Option<u64>,
    /// Why, in words.
    pub damage: Option<String>,
}

/// The opened store.
pub struct Opened {
    pub log: LogStore,
    pub sm: StateMachineStore,
    pub recovery: Recovery,
}

/// Opens (or creates) the store under `dir`, checking everything durable in it (see the
/// crate doc). Damage that cannot be repaired locally is set aside and reported in
/// [`Recovery`]; only I/O failures and data dirs of another format are errors.
pub fn open(dir: &Path, options: &StoreOptions) -> Result<Opened, StoreError> {
    let layout = Layout::new(dir);
    match format::detect(&layout)? {
        format::Found::Empty => format::create(&layout)?,
        format::Found::Current => format::ensure_dirs(&layout)?,
        format::Found::Upgradable(from) => {
            // Durably current before the state machine drops format 3's queue records from
            // sled and moves the item records into pages: the builds that would look for
            // them where they were refuse the dir from then on.
            format::mark_current(&layout)?;
            format::ensure_dirs(&layout)?;
            tracing::info!(
                dir = %dir.display(),
                from,
                "data dir upgraded to format 5 (queues in memory, item records paged)"
            );
        }
        format::Found::Legacy => {
            return Err(StoreError::Legacy {
                dir: dir.to_path_buf(),
            })
        }
        format::Found::Format2 => {
            return Err(StoreError::Format2 {
                dir: dir.to_path_buf(),
            })
        }
    }
    // What is read next is relied on (reported to peers as held), so it must be durable
    // first: a dir restored from a backup, or a log written by a process that died before its
    // fsync, is page cache only until now.
    fsio::sync_tree(dir)?;
    fsio::sync_dir(fsio::parent(dir))?;
    let (log, log_opened) =
        LogStore::open(&layout.log_dir(), &layout.vote_file(), options.log.clone())?;
    let mut recovery = Recovery {
        log: log_opened,
        ..Recovery::default()
    };
    let mut damage = Vec::new();
    if let Some(d) = &recovery.log.damage {
        damage.push(format!("Raft log {}: {}", d.path.display(), d.reason));
    }
    if recovery.log.vote_lost {
        damage.push("both slots of the vote file are corrupt".to_string());
    }
    let payloads = match Payloads::open(&layout, log.clone()) {
        Ok(p) => Some(Arc::new(p)),
        Err(Ok(fatal)) => return Err(fatal.into()),
        Err(Err(why)) => {
            damage.push(why);
            None
        }
    };
    let (sm, sm_opened) = if recovery.log.damage.is_some() || payloads.is_none() {
        // The log (or payloads it depends on) is set aside below; the state machine goes
        // with it (it may hold what the damaged entries did).
        (None, SmOpened::default())
    } else {
        let payloads = payloads.clone().expect("opened");
        let (sm, opened) = StateMachineStore::open(&layout, options, log.purged(), payloads)?;
        if let Some(why) = &opened.unrecoverable {
            damage.push(format!("state machine: {why}"));
        }
        (Some(sm), opened)
    };
    recovery.sm = sm_opened;
    if damage.is_empty() {
        let sm = sm.expect("opened when nothing is damaged");
        log.set_committed_floor(sm.applied_floor());
        recovery.repair_until = read_repair(&layout)?;
        return Ok(Opened { log, sm, recovery });
    }
    // Set aside everything the node cannot trust and start empty, keeping the vote.
    let state = log.state();
    let reached = [
        log.last_log_id().map(|l| l.index),
        recovery.log.damage.as_ref().and_then(|d| d.readable_up_to),
        state.committed.map(|c| c.index),
        state.purged.map(|p| p.index),
    ]
    .into_iter()
    .flatten()
    .max();
    let vote = state.vote;
    drop(log);
    drop(sm);
    let reason = damage.join("; ");
    tracing::error!(%reason, repair_until = ?reached, "damaged durable state set aside; this node will not vote until its peers have repaired it");
    drop(payloads);
    for path in layout.state_dirs() {
        if path.exists() {
            format::quarantine(&layout, &path, &reason)?;
        }
    }
    let keep_vote = !recovery.log.vote_lost;
    if layout.vote_file().exists() {
        format::quarantine(&layout, &layout.vote_file(), &reason)?;
    }
    format::ensure_dirs(&layout)?;
    let (mut log, _) = LogStore::open(&layout.log_dir(), &layout.vote_file(), options.log.clone())?;
    if let (true, Some(vote)) = (keep_vote, vote) {
        log.keep_vote(vote)?;
    }
    let payloads = match Payloads::open(&layout, log.clone()) {
        Ok(p) => Arc::new(p),
        Err(Ok(fatal)) => return Err(fatal.into()),
        Err(Err(why)) => {
            return Err(fsio::fatal("open", &layout.pack_dir())(std::io::Error::other(why)).into())
        }
    };
    let (sm, _) = StateMachineStore::open(&layout, options, None, payloads)?;
    let until = reached.unwrap_or(0);
    // Durable before anything else happens: a restart in the middle of the repair must
    // still not vote.
    fsio::write_atomic(&layout.repair_file(), until.to_string().as_bytes())?;
    recovery.repair_until = Some(until);
    recovery.damage = Some(reason);
    Ok(Opened { log, sm, recovery })
}

fn read_repair(layout: &Layout) -> Result<Option<u64>, StoreError> {
    let path = layout.repair_file();
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text.trim().parse().unwrap_or(u64::MAX))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io { path, source: e }),
    }
}

/// Ends a repair (the node's log reached where it was before the damage): it may vote again.
pub fn repaired(dir: &Path) -> Result<(), fsio::Fatal> {
    fsio::remove_durable(&Layout::new(dir).repair_file())
}

#[cfg(test)]
mod tests;
