//! The cluster version: which requests and records every member can apply.
//!
//! A build supports the versions up to [`SUPPORTED`]. The cluster runs one version, in the
//! replicated state (the [`crate::keys::CLUSTER_VERSION`] record; absent means [`BASE`], what
//! the builds before versioning speak). The leader raises it with
//! [`Request::SetClusterVersion`](crate::command::Request::SetClusterVersion) once every
//! member (voters and learners) reports in `/health` that it supports more; it never goes
//! down. A request variant, state record or field that a version introduces is proposed or
//! written only once the cluster runs that version, so in the middle of a rolling upgrade a
//! node of the previous build never meets a log entry or a snapshot it cannot read, and a
//! node of the new build speaks the old version until the last member is upgraded.
//!
//! A node can offer less than its build supports (`--cluster-version-max`): an operator pins
//! the version while an upgrade may still be rolled back.

/// The version of a cluster whose state holds none: every build can run it.
pub const BASE: u32 = hashq_proto::api::BASE_CLUSTER_VERSION;

/// The latest version this build can run.
///
/// - 1: everything before versioning.
/// - 2: the cluster version itself (`SetClusterVersion` and its record).
/// - 3: cancel and retry (`Request::Cancel`, `Request::Retry`, the `cancelled` status, the
///   tallies record).
/// - 4: batch enqueue and priorities (`Request::EnqueueBatch`, `Response::EnqueuedBatch`,
///   payloads at ordinals past 65,535, the priority queues and records `u`, `y`, `k`).
/// - 5: no payload-reference records (`p`): the payloads still needed are read off the item
///   records themselves, one write fewer per enqueue and per completion. The upgrade's
///   `SetClusterVersion` deletes the records the cluster held.
pub const SUPPORTED: u32 = 5;

/// The version that brought cancel and retry.
pub const CANCEL: u32 = 3;

/// The version that brought batch enqueue and priorities.
pub const BATCH: u32 = 4;

/// The version that dropped the payload-reference records.
pub const ITEM_PAYLOADS: u32 = 5;
