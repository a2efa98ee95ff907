//! Items that share a few payloads, so a test computes few reference values (hashing in a
//! test is as slow as the product's is fast): enqueued concurrently over some nodes, then
//! pulled until every one came back once with the right value. Also reads of the worker
//! list in `/status`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

use super::{payload, reference, Cluster};

/// Item `i` carries payload `i % distinct`, of `len` bytes.
#[derive(Clone, Copy)]
pub struct SharedPayloads {
    pub distinct: u64,
    pub len: usize,
}

impl SharedPayloads {
    /// The payload of item `i`.
    pub fn payload(&self, i: u64) -> Vec<u8> {
        payload(i % self.distinct, self.len)
    }

    /// Enqueues items `range` (16 at a time, item `i` on `nodes[i % nodes.len()]`, key
    /// `item-<i>`); returns their work ids with their numbers.
    pub async fn enqueue(
        &self,
        cluster: &Cluster,
        nodes: &[u64],
        range: std::ops::Range<u64>,
        iterations: u32,
    ) -> Vec<(String, u64)> {
        futures::stream::iter(range)
            .map(|i| async move {
                let node = nodes[i as usize % nodes.len()];
                let id = cluster
                    .enqueue(node, self.payload(i), iterations, &format!("item-{i}"))
                    .await;
                (id, i)
            })
            .buffer_unordered(16)
            .collect()
            .await
    }

    /// Pulls from the nodes in turn until every id is back, checking values and that nothing
    /// comes twice; panics after `timeout`, showing every node's status and a few missing
    /// items.
    pub async fn pull_all(
        &self,
        cluster: &Cluster,
        ids: &[(String, u64)],
        iterations: u32,
        timeout: Duration,
    ) {
        // Only the payloads in use, computed before the clock starts: on a loaded machine
        // the test's own hashing is the slow part.
        let used: HashSet<u64> = ids.iter().map(|(_, i)| i % self.distinct).collect();
        let references: HashMap<u64, String> = used
            .into_iter()
            .map(|k| (k, reference(&self.payload(k), iterations)))
            .collect();
        let deadline = Instant::now() + timeout;
        let mut seen = HashSet::new();
        let mut round = 0;
        while seen.len() < ids.len() {
            if Instant::now() > deadline {
                for node in cluster.ids() {
                    eprintln!("node {node}: {:?}", cluster.get_json(node, "/status").await);
                }
                let missing = ids.iter().map(|(w, _)| w).filter(|w| !seen.contains(*w));
                for w in missing.take(5) {
                    eprintln!(
                        "{w}: {:?}",
                        cluster.get_json(1, &format!("/work/{w}")).await
                    );
                }
                panic!(
                    "only {} of {} items came back in {timeout:?}",
                    seen.len(),
                    ids.len()
                );
            }
            round += 1;
            let node = 1 + round % cluster.ids().len() as u64;
            for (work_id, value) in cluster.pull(node, 100, &format!("pull-{round}")).await {
                let i = ids
                    .iter()
                    .find(|(w, _)| *w == work_id)
                    .map(|(_, i)| *i)
                    .expect("a known work id");
                assert_eq!(value, references[&(i % self.distinct)], "item {i}");
                assert!(seen.insert(work_id.clone()), "{work_id} pulled twice");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The worker list of a `/status` document.
pub fn workers(status: &Value) -> Vec<Value> {
    status["workers"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}
