//! What crosses the wire between hashq's node, worker and CLI, kept apart from the code that
//! serves or calls it (as mini-redis keeps its frames and commands apart from its server):
//!
//! - [`ids`]: the ids every side names ([`NodeId`], [`WorkId`], [`WorkerId`], the
//!   [`WorkerSecret`]) and the result type ([`Digest`]);
//! - [`codec`]: postcard encoding (what the worker routes, the Raft RPCs, the forwarding
//!   between nodes and the Raft log use) and the content types of the binary bodies;
//! - [`routes`]: every route path the node serves, grouped by audience, and [`headers`]: the
//!   header names beyond the standard ones;
//! - [`worker`]: the worker API's request and response shapes (postcard);
//! - [`api`]: the JSON shapes of the client, admin and probe routes (`/enqueue`,
//!   `/pullCompleted`, `/work/{id}`, `/admin/max-workers`, `/health`, `/raft/init`);
//! - [`error`]: the JSON error body of every route and the error codes a caller acts on;
//! - [`ec2`]: the tag names by which hashq's EC2 instances find each other.
//!
//! Openraft's own RPC payloads (append, vote, the snapshot header) are typed by openraft and
//! stay with the Raft network in `hashq-raft`; only their paths are here. This crate depends
//! on serde, serde_bytes, bytes, postcard and thiserror and nothing else, so a client of the cluster
//! (the worker) builds without openraft.
//!
//! # Compatibility
//!
//! Nodes and workers of different releases talk to each other during a rolling upgrade, and
//! [`worker::Completion`] and the ids are also written into the Raft log, which every later
//! release reads. So wire shapes change only additively: nothing is renamed, reordered or
//! removed. Postcard is positional (no field names; an enum variant is its index), so a new
//! enum variant goes after the last one, and a new field goes at the end of the outermost
//! struct of a message: an older reader ignores the bytes it does not expect, but a newer
//! reader of an older message finds none, so a message that must be read both ways gets a
//! version instead (as `hashq-raft`'s `Command` does). JSON shapes keep their field names,
//! and a field added to one is `#[serde(default)]` so that older senders still parse.

pub mod api;
pub mod codec;
pub mod ec2;
pub mod error;
pub mod headers;
pub mod ids;
pub mod routes;
pub mod worker;

pub use ids::{Digest, Millis, NodeId, WorkId, WorkerId, WorkerSecret};
