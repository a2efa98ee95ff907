//! The node's own measurements for `/metrics`: latency histograms and counters.
//!
//! A histogram here is a fixed set of buckets of atomic counters, rendered in the Prometheus
//! text format by [`Histogram::render`]: `/metrics` is already written by hand, and each node
//! keeps its numbers in its own state (no process-wide recorder to install).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the buckets, in seconds: 50 µs to 10 s.
const BOUNDS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// A latency histogram.
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len()],
    count: AtomicU64,
    /// Sum in microseconds (an integer, so it can be atomic).
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        if let Some(i) = BOUNDS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// How many observations it holds.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The Prometheus text of this histogram as `name`, with `labels` (`node="1"`).
    pub fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in BOUNDS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Everything the node measures about itself beyond the replicated counts.
#[derive(Default)]
pub struct NodeMetrics {
    /// fdatasync/fsync of the store's files.
    pub fsync: Histogram,
    /// From a batch's proposal to its answer on the leader: replication, the followers'
    /// syncs, apply.
    pub commit: Histogram,
    /// One apply call of the state machine.
    pub apply: Histogram,
    /// Terms this node has seen begin (each is an election somewhere).
    pub elections: AtomicU64,
    /// Raft append RPCs received that carried entries (heartbeats are not counted).
    pub append_rpcs: AtomicU64,
    /// Log entries those RPCs carried: divided by `append_rpcs`, the replication batch.
    pub append_entries: AtomicU64,
    /// The leader's wall clock minus this node's, at the last applied command (ms).
    pub leader_clock_skew_ms: std::sync::atomic::AtomicI64,
}

/// Routes the store's timings into a node's histograms.
pub struct StoreTimings(pub std::sync::Arc<NodeMetrics>);

impl hashq_storage::fsio::StoreObserver for StoreTimings {
    fn synced(&self, seconds: f64) {
        self.0.fsync.observe(seconds);
    }
    fn applied(&self, seconds: f64) {
        self.0.apply.observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_count_everything() {
        let h = Histogram::default();
        h.observe(0.00003);
        h.observe(0.002);
        h.observe(0.002);
        h.observe(20.0);
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "test", "node=\"1\"");
        assert!(
            out.contains("x_seconds_bucket{node=\"1\",le=\"0.00005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{node=\"1\",le=\"0.0025\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{node=\"1\",le=\"10\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{node=\"1\",le=\"+Inf\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{node=\"1\"} 4\n"), "{out}");
    }
}
