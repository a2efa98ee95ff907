//! The replicated model of hashq.
//!
//! - [`command`]: what goes through the Raft log (a batch of requests with the leader's time)
//!   and what comes back;
//! - [`machine`]: the pure, deterministic queue state machine over an ordered key-value view
//!   ([`kv`]), with its key layout in [`keys`];
//! - [`TypeConfig`]: the openraft type configuration (snapshots are files, so a snapshot of a
//!   large backlog streams from disk with flat memory);
//! - [`network`]: the Raft RPC client (HTTP + postcard, guarded by the cluster token);
//! - [`version`]: the cluster version, which gates what a rolling upgrade may write.
//!
//! The ids, the codec and everything else a worker or client also sees are `hashq-proto`'s,
//! re-exported here where the model uses them ([`types`], [`codec`]).
//!
//! Nothing here reads a clock or does disk I/O; the `storage` crate persists what `machine`
//! computes, and the `node` crate decides when to propose what.

pub mod command;
pub mod keys;
pub mod kv;
pub mod machine;
pub mod network;
pub mod types;
pub mod version;

/// The codec is the wire's (`hashq-proto`): the Raft log and the state machine's records
/// use the same postcard encoding.
pub use hashq_proto::codec;

pub use command::{Command, CommandResponse, Request, Response};
pub use types::{NodeId, WorkId, WorkerId};

/// A snapshot as openraft passes it around: a complete, checksummed snapshot file on this
/// node's disk (the state machine's records), and what writes the payloads it references
/// after it when it is sent. Snapshots travel between nodes as an HTTP stream (the node's
/// Raft network), verified before they are installed, never through openraft's chunks.
#[derive(Clone)]
pub struct SnapshotFile {
    pub path: std::path::PathBuf,
    pub payloads: Option<std::sync::Arc<dyn PayloadSection>>,
}

impl SnapshotFile {
    /// A file with nothing to send after it.
    pub fn new(path: std::path::PathBuf) -> SnapshotFile {
        SnapshotFile {
            path,
            payloads: None,
        }
    }
}

impl std::fmt::Debug for SnapshotFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotFile")
            .field("path", &self.path)
            .field("payloads", &self.payloads.is_some())
            .finish()
    }
}

/// Writes the payload section that follows a snapshot file on the wire (the payloads the
/// snapshot references, read from the sender's log and packs; format in `hashq_storage`'s
/// `pack` module). Called on a blocking thread; an error aborts the transfer.
pub trait PayloadSection: Send + Sync {
    fn write_to(&self, out: &mut dyn std::io::Write) -> std::io::Result<()>;
    /// At least as many bytes as the section will have (for the transfer's timeout).
    fn size_hint(&self) -> u64;
}

openraft::declare_raft_types!(
    /// The openraft type configuration of hashq.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The openraft handle, typed.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry, typed.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id, typed.
pub type LogId = openraft::LogId<NodeId>;
/// A membership as stored with its log id, typed.
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
/// Snapshot metadata, typed.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
