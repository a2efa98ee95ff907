//! The hashq endpoint: a Raft voter with the HTTP API.
//!
//! - [`node`]: a node's shared state ([`Node`], its stats, peer health, disk and repair
//!   state, the admission gates), a leaf that the routes and the loops read;
//! - [`server`]: the wiring: opening the store, starting Raft, spawning the background loops
//!   among the node's [`tasks`] (all of which end on its shutdown signal), serving;
//! - [`proposer`]: every write goes through it: batched into log entries, forwarded to the
//!   leader from followers, retried through leader changes under idempotency keys;
//! - [`routes`]: HTTP by audience (client, worker, Raft, internal), with the one error
//!   mapping in [`error`];
//! - the background loops: [`bootstrap`] (forming the cluster exactly once),
//!   [`housekeeping`] (the leader's ticks), [`autoscaler`] (growing the worker pool within
//!   the replicated budget, through a [`launcher`]), [`disk`] (the free-space alarm) and
//!   [`watch`] (peer health, terms and clocks, repair, fatal stops).
//!
//! Imports run one way: `server` -> routes and loops -> `node` -> `proposer`, `launcher`,
//! `config`, `http`; nothing below imports what is above it.
//!
//! Failure behaviour: a node that loses its majority answers writes with 503 and
//! `Retry-After` after its request timeout; a follower whose leader dies re-routes pending
//! requests to the next leader; a storage error stops Raft on that node (it never serves from
//! a state it could not persist).

pub mod autoscaler;
pub mod bootstrap;
pub mod config;
pub mod disk;
pub mod error;
pub mod housekeeping;
pub mod http;
pub mod launcher;
pub mod metrics;
pub mod node;
pub mod proposer;
pub mod raft_gate;
pub mod routes;
pub mod server;
pub mod tasks;
pub mod watch;

#[cfg(test)]
mod tests;

pub use config::{NodeArgs, NodeConfig};
pub use node::Node;
pub use server::{run, serve, RunError, Server, StartError, Surface};
