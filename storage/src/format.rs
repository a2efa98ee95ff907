//! The data directory's layout and its format version.
//!
//! ```text
//! <data-dir>/
//!   FORMAT          "hashq-data <version>\n", written atomically when the dir is created
//!   raft/vote       the vote, the purge point and the committed hint (two checksummed slots)
//!   raft/repair     present while damaged state is being repaired from peers (no voting)
//!   raft/log/       the Raft log: segment files named by their first index
//!   sm/             sled: the state machine
//!   snapshots/      snapshot files (the state machine's records; payloads stay in the log)
//!   packs/          payloads that came with a snapshot installed from the leader
//!   quarantine/     damaged files moved aside (never read again; kept for a post-mortem)
//! ```
//!
//! A node refuses a data dir whose format it does not know, with a message that says what to
//! do. Version 1 (hashq 0.1: the Raft log and the state machine both in one sled database,
//! `sled/`) is converted by `hashq migrate`, offline.

use std::path::{Path, PathBuf};

use crate::fsio::{self, Fatal};
use crate::StoreError;

/// The format this build writes and reads.
pub const CURRENT: u32 = 5;

/// The formats this build upgrades in place when it opens the dir: it marks the dir current
/// first, so the builds that would look for records where these formats kept them refuse it
/// from then on, then moves them. Format 3 kept the queue tables in sled (format 4 on keeps
/// them in memory, rebuilt from the item records when the store opens); formats 3 and 4 kept
/// each item record under its own key (format 5 keeps them in pages of 64, `sm/paged.rs`).
const UPGRADED_IN_PLACE: [u32; 2] = [3, 4];

/// Format 2 kept payloads in the state machine (the builds with the segment log, before
/// payloads were written once); `hashq migrate` converts it.
const FORMAT_2: u32 = 2;

const MAGIC: &str = "hashq-data";

/// Where everything lives under a data dir.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Layout {
        Layout {
            root: root.to_path_buf(),
        }
    }
    pub fn format_file(&self) -> PathBuf {
        self.root.join("FORMAT")
    }
    pub fn raft(&self) -> PathBuf {
        self.root.join("raft")
    }
    pub fn vote_file(&self) -> PathBuf {
        self.raft().join("vote")
    }
    /// Present while the node is being repaired from its peers: the index it must reach.
    pub fn repair_file(&self) -> PathBuf {
        self.raft().join("repair")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.raft().join("log")
    }
    pub fn sm_dir(&self) -> PathBuf {
        self.root.join("sm")
    }
    pub fn snapshot_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    pub fn pack_dir(&self) -> PathBuf {
        self.root.join("packs")
    }
    /// The directories of the node's replicated state (log, state machine, snapshots,
    /// packs): what a repair quarantines and a migration replaces.
    pub fn state_dirs(&self) -> [PathBuf; 4] {
        [
            self.log_dir(),
            self.sm_dir(),
            self.snapshot_dir(),
            self.pack_dir(),
        ]
    }
    pub fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }
    /// Where hashq 0.1 kept everything.
    pub fn legacy_sled(&self) -> PathBuf {
        self.root.join("sled")
    }
}

/// What the data dir holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing of hashq's: a new node.
    Empty,
    /// The current format.
    Current,
    /// hashq 0.1's sled-only layout.
    Legacy,
    /// Format 2: this layout, with payloads in the state machine.
    Format2,
    /// Format 3 or 4 (this one): this layout with the queue tables in sled (3) and the item
    /// records under their own keys (both), upgraded in place on open.
    Upgradable(u32),
}

/// Reads the data dir's format.
pub fn detect(layout: &Layout) -> Result<Found, StoreError> {
    let path = layout.format_file();
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let version = parse(&text).ok_or_else(|| StoreError::Format {
                path: path.clone(),
                found: text.chars().take(80).collect(),
            })?;
            if version == CURRENT {
                Ok(Found::Current)
            } else if UPGRADED_IN_PLACE.contains(&version) {
                Ok(Found::Upgradable(version))
            } else if version == FORMAT_2 {
                Ok(Found::Format2)
            } else {
                Err(StoreError::Format {
                    path,
                    found: format!("format {version} (this build reads format {CURRENT})"),
                })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // `legacy-v1/` without FORMAT: a migration that has not finished.
            if layout.legacy_sled().exists() || layout.root.join("legacy-v1").join("sled").exists()
            {
                Ok(Found::Legacy)
            } else if layout.log_dir().exists() || layout.sm_dir().exists() {
                // Our directories without their FORMAT file: never written by this code in
                // that order (FORMAT comes first), so something else happened to this dir.
                Err(StoreError::Format {
                    path,
                    found: "no FORMAT file beside a Raft log".into(),
                })
            } else {
                Ok(Found::Empty)
            }
        }
        Err(e) => Err(StoreError::Io { path, source: e }),
    }
}

fn parse(text: &str) -> Option<u32> {
    let rest = text.trim().strip_prefix(MAGIC)?;
    rest.trim().parse().ok()
}

/// Creates the layout of a new data dir, `FORMAT` first and durably.
pub fn create(layout: &Layout) -> Result<(), Fatal> {
    fsio::create_dir_durable(&layout.root)?;
    mark_current(layout)?;
    ensure_dirs(layout)
}

/// Writes FORMAT saying the current format (durably: the file, then its directory).
pub fn mark_current(layout: &Layout) -> Result<(), Fatal> {
    fsio::write_atomic(
        &layout.format_file(),
        format!("{MAGIC} {CURRENT}\n").as_bytes(),
    )
}

/// Makes sure every directory of the layout exists (a dir of the current format may predate
/// one of them).
pub fn ensure_dirs(layout: &Layout) -> Result<(), Fatal> {
    for dir in layout
        .state_dirs()
        .into_iter()
        .chain([layout.quarantine_dir()])
    {
        fsio::create_dir_durable(&dir)?;
    }
    Ok(())
}

/// Moves `path` into the quarantine dir (durably), under a name that says when and what.
pub fn quarantine(layout: &Layout, path: &Path, why: &str) -> Result<PathBuf, Fatal> {
    fsio::create_dir_durable(&layout.quarantine_dir())?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unnamed".into());
    let to = layout.quarantine_dir().join(format!("{stamp}-{name}"));
    fsio::rename_durable(path, &to)?;
    tracing::error!(from = %path.display(), to = %to.display(), why, "moved a damaged file aside");
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_dir_is_created_with_its_format_and_recognized() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(&dir.path().join("node"));
        assert_eq!(detect(&layout).unwrap(), Found::Empty);
        create(&layout).unwrap();
        assert_eq!(detect(&layout).unwrap(), Found::Current);
        assert!(layout.log_dir().is_dir() && layout.sm_dir().is_dir());
    }

    #[test]
    fn legacy_and_unknown_formats_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir(layout.legacy_sled()).unwrap();
        assert_eq!(detect(&layout).unwrap(), Found::Legacy);
        std::fs::write(layout.format_file(), "hashq-data 99\n").unwrap();
        let err = detect(&layout).unwrap_err().to_string();
        assert!(err.contains("format 99"), "{err}");
        std::fs::write(layout.format_file(), "something else").unwrap();
        assert!(detect(&layout).is_err());
    }
}
