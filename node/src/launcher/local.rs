//! The `local` launcher: worker processes on this machine.
//!
//! Each worker is `hashq worker --worker-id <slot> --parent <node> ...` in its own process
//! group, with its log in `<data-dir>/workers/worker-<slot>.log` and the worker credential in
//! its environment (never on a command line; the peer credential is never passed on). A worker outlives a node that is SIGKILLed (it
//! re-parents to a live node); a node that stops gracefully stops its workers, which give
//! their leases back.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use hashq_raft::WorkerId;

use super::{LaunchError, LaunchSpec, Launcher};

pub struct LocalLauncher {
    binary: PathBuf,
    log_dir: PathBuf,
    token: Option<String>,
    /// The cluster CA the workers trust (`--tls-ca`), in a TLS cluster.
    tls_ca: Option<PathBuf>,
    /// Live children by pid, so a graceful shutdown can stop them.
    children: Arc<Mutex<HashMap<u32, WorkerId>>>,
}

impl LocalLauncher {
    pub fn new(
        binary: PathBuf,
        log_dir: PathBuf,
        token: Option<String>,
        tls_ca: Option<PathBuf>,
    ) -> Self {
        LocalLauncher {
            binary,
            log_dir,
            token,
            tls_ca,
            children: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn children(&self) -> std::sync::MutexGuard<'_, HashMap<u32, WorkerId>> {
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether `pid` is still the `hashq worker` of `worker` (pids get reused).
fn is_our_worker(pid: u32, worker: WorkerId) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let id = worker.0.to_string();
    args.iter().any(|a| *a == b"worker")
        && args
            .windows(2)
            .any(|w| w[0] == b"--worker-id" && w[1] == id.as_bytes())
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) takes plain integers and has no memory effects; a stale pid only
    // yields ESRCH, and callers check the pid still belongs to the worker first.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

impl Launcher for LocalLauncher {
    fn name(&self) -> &'static str {
        "local"
    }

    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<String, LaunchError>> {
        Box::pin(async move {
            std::fs::create_dir_all(&self.log_dir)
                .map_err(|e| LaunchError::Failed(format!("{}: {e}", self.log_dir.display())))?;
            let log_path = self.log_dir.join(format!("worker-{}.log", spec.worker.0));
            let log = std::fs::File::options()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| LaunchError::Failed(format!("{}: {e}", log_path.display())))?;
            let err = log
                .try_clone()
                .map_err(|e| LaunchError::Failed(format!("{}: {e}", log_path.display())))?;
            let mut cmd = tokio::process::Command::new(&self.binary);
            cmd.arg("worker")
                .args(["--endpoints", &spec.endpoints.join(",")])
                .args(["--worker-id", &spec.worker.0.to_string()])
                .args(["--parent", &spec.parent.to_string()])
                .args([
                    "--idle-timeout",
                    &humantime::format_duration(spec.idle_timeout).to_string(),
                ])
                .args([
                    "--no-endpoint-exit-after",
                    &humantime::format_duration(spec.orphan_timeout).to_string(),
                ])
                .args(["--threads", &spec.threads.to_string()])
                .args(
                    self.tls_ca
                        .iter()
                        .flat_map(|ca| [OsStr::new("--tls-ca"), ca.as_os_str()]),
                )
                .env_remove("HASHQ_CLUSTER_TOKEN")
                .env_remove("HASHQ_TLS_CERT")
                .env_remove("HASHQ_TLS_KEY")
                .env_remove("HASHQ_ADMIN_TOKEN")
                .env_remove("HASHQ_WORKER_TOKEN")
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err)
                .process_group(0)
                .kill_on_drop(false);
            if let Some(token) = &self.token {
                cmd.env("HASHQ_WORKER_TOKEN", token);
            }
            let mut child = cmd.spawn().map_err(|e| {
                LaunchError::Failed(format!("cannot start {}: {e}", self.binary.display()))
            })?;
            let pid = child
                .id()
                .ok_or_else(|| LaunchError::Failed("the worker exited at once".into()))?;
            self.children().insert(pid, spec.worker);
            let children = self.children.clone();
            let worker = spec.worker;
            // Reap it when it exits, so it leaves no zombie.
            tokio::spawn(async move {
                let status = child.wait().await;
                children
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&pid);
                tracing::info!(%worker, pid, status = ?status.ok(), "local worker exited");
            });
            tracing::info!(%worker, pid, parent = spec.parent, "local worker started");
            Ok(format!("pid:{pid}"))
        })
    }

    fn terminate(
        &self,
        worker: WorkerId,
        handle: String,
    ) -> BoxFuture<'_, Result<(), LaunchError>> {
        Box::pin(async move {
            let Some(pid) = handle
                .strip_prefix("pid:")
                .and_then(|p| p.parse::<u32>().ok())
            else {
                return Ok(());
            };
            if is_our_worker(pid, worker) {
                tracing::warn!(%worker, pid, "killing a lost worker");
                signal(pid, libc::SIGKILL);
            }
            Ok(())
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let children: Vec<(u32, WorkerId)> =
                self.children().iter().map(|(p, w)| (*p, *w)).collect();
            for (pid, worker) in &children {
                if is_our_worker(*pid, *worker) {
                    signal(*pid, libc::SIGTERM);
                }
            }
            // They give their leases back and exit; wait a little for that.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while !self.children().is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }
}
