//! The ids every side of the wire names, and the result type.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteArray;

/// A Raft voter's id (the `--id` of `hashq node`).
pub type NodeId = u64;

/// Milliseconds since the Unix epoch, always stamped by the leader into a command.
pub type Millis = u64;

/// A SHA-512 digest, the result of a work item.
pub type Digest = ByteArray<64>;

/// The id of one work item, assigned by the state machine in log order.
///
/// Rendered as a plain decimal string in the client API (`"work_id":"42"`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct WorkId(pub u64);

impl fmt::Display for WorkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for WorkId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(WorkId)
    }
}

/// The id of one worker (a budget slot while the worker is managed by the cluster).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// The secret a worker proves itself with on every request after it registered: drawn at
/// random by the node that proposed its registration, kept in the replicated worker table and
/// told only to that worker. Worker ids are small counters anyone could guess; holding the
/// worker credential is not enough to act for another worker (complete its items, release or
/// heartbeat its leases) without this.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct WorkerSecret(pub u64);

impl fmt::Debug for WorkerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never in a log line.
        f.write_str("WorkerSecret(..)")
    }
}
