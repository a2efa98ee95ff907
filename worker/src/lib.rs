//! The hashq worker: leases work items from any endpoint of a hashq cluster, computes them
//! (the chain of SHA-512 iterations, in [`hash`]), and hands the results back.
//!
//! [`run()`] is the whole worker; [`WorkerConfig`] is everything it needs; [`EndpointClient`]
//! is its failover client of the worker routes ([`hashq_proto::worker`]).
//!
//! # Guarantees
//!
//! - **No result is dropped while any endpoint may answer.** A computed result is retried,
//!   endpoint after endpoint, until the cluster acknowledges it; completion is idempotent and
//!   fenced by the lease's attempt number, so a retried or stale result never makes a second
//!   value.
//! - **Leases are kept alive** by a heartbeat every `heartbeat_ms` (as the cluster says at
//!   registration) for every item held until its result is acknowledged. Work whose lease the
//!   cluster reports lost is cancelled mid-hash and its result is never sent.
//! - **A retried lease request names the same `request_id`** until an answer is read, so a
//!   request that reached the cluster before a timeout returns the grant already made instead
//!   of leasing items nobody would hash.
//! - **Bounded holding:** at most `threads + prefetch` unfinished items are leased, and at
//!   most `threads` are hashed at once, each on a blocking thread.
//! - **The budget is never exceeded by this worker:** a worker launched into a slot that the
//!   cluster forgets (declared lost after a pause) exits with [`ExitReason::SlotGone`]
//!   instead of registering again, because the cluster may already have launched its
//!   replacement. A worker started by hand registers again instead.
//! - **Latency:** lease requests long-poll, the next item is leased while the current one
//!   hashes, and each result is sent the moment it is ready (batched only with results
//!   that are ready at the same moment), so a warm worker adds a network round trip and a
//!   commit to the hashing time, not a timer.
//!
//! # How it ends
//!
//! [`run()`] returns an [`ExitReason`]: `Idle` (nothing held for `idle_timeout`: it exits and
//! frees its slot), `Shutdown` (the shutdown future fired: it delivers finished results,
//! releases the rest and exits), `NoEndpoint` (no endpoint answered for
//! `no_endpoint_exit_after`), `Orphaned` (EC2: no endpoint instance of the cluster runs), or
//! `SlotGone`. It returns a [`WorkerError`] for what retrying
//! cannot fix: an invalid configuration, a request the cluster rejects (a wrong token, an
//! incompatible version), an answer it cannot decode, or a bug.
//!
//! # Caveats
//!
//! - Without TLS (`https://` endpoints and `tls_ca`) the worker credential crosses the
//!   network in clear: run a cluster that is not on a private network with TLS.
//! - Results computed for leases the cluster has already reclaimed (the worker was declared
//!   lost) are dropped; the items are recomputed by whoever leases them next.
//! - The parent check has two flavours: locally the parent's `/health`, on EC2
//!   the parent's instance state (the `ec2` module, in builds with the `ec2` feature). Either way a worker whose parent is gone names a
//!   new parent in its heartbeats; on EC2 it stops ([`ExitReason::Orphaned`]) when no
//!   endpoint instance of its cluster runs.
//! - Only the local monotonic clock is used; lease deadlines in grants are the leader's
//!   clock and are not compared to it. The worker relies on heartbeating instead.

pub mod client;
pub mod config;
#[cfg(feature = "ec2")]
pub mod ec2;
pub mod hash;
pub mod run;

pub use client::{ClientError, EndpointClient, Endpoints};
pub use config::{Ec2Parent, ParentCheck, WorkerConfig};
pub use run::{run, ExitReason, WorkerError};
