//! A node's background tasks and the one signal that stops them all.
//!
//! Every loop a node runs (the proposer's batchers, the watchers, bootstrap, housekeeping,
//! the autoscaler) is spawned through [`Tasks::spawn`]: it runs until it returns or the
//! shutdown signal comes, whichever is first, and [`Tasks::stop`] sends the signal and waits
//! until every one of them has ended. A loop is stopped at its next `await`: each one keeps
//! nothing between two steps that stopping there could lose (a proposal it was waiting for
//! commits or not, and carries an idempotency key either way).

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Background tasks that end together.
#[derive(Default)]
pub struct Tasks {
    shutdown: CancellationToken,
    running: Vec<(&'static str, JoinHandle<()>)>,
}

impl Tasks {
    /// Runs `task` in the background until it ends or [`Tasks::stop`] is called.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let shutdown = self.shutdown.clone();
        let handle = tokio::spawn(async move {
            shutdown.run_until_cancelled(task).await;
        });
        self.running.push((name, handle));
    }

    /// How many tasks were spawned and have not ended yet.
    pub fn running(&self) -> usize {
        self.running
            .iter()
            .filter(|(_, h)| !h.is_finished())
            .count()
    }

    /// Sends the shutdown signal and waits until every task has ended.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for (name, handle) in self.running {
            if let Err(e) = handle.await {
                tracing::error!(task = name, error = %e, "a background task failed");
            }
        }
    }
}
