//! `scripts/cluster.sh rolling-restart` under client load: the nodes restart one at a time,
//! followers first, each once it has rejoined and caught up, and no client request fails
//! (the client retries refused connections and 503s, as the CLI does). The same with
//! `--bin`, from the previous release's binary (`HASHQ_PREVIOUS_BIN`, which
//! `scripts/test.sh` builds from its git tag) to this one: the cluster version rises once
//! every node runs the new binary, and the new commands work then.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{enqueue_once, payload, Attempt};
use serde_json::Value;

/// A cluster started by `scripts/cluster.sh` in its own directory and ports; `down` on drop.
struct Scripted {
    dir: tempfile::TempDir,
    base_port: u16,
    /// The binary `up` starts (`HASHQ_BIN`).
    bin: PathBuf,
}

impl Scripted {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh"))
            .args(args)
            .env("HASHQ_BIN", &self.bin)
            .env("HASHQ_CLUSTER_DIR", self.dir.path())
            .env("HASHQ_BASE_PORT", self.base_port.to_string())
            .env("HASHQ_MAX_WORKERS", "0")
            .output()
            .expect("run scripts/cluster.sh")
    }

    fn url(&self, id: u16) -> String {
        format!("http://127.0.0.1:{}", self.base_port + id - 1)
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

/// A base port with the two after it free, all three handed out to this test alone
/// (`free_port` counts up, so three calls in a row are usually consecutive).
fn free_base() -> u16 {
    loop {
        let base = common::free_port();
        if (1..3).all(|i| common::free_port() == base + i) {
            return base;
        }
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "cluster.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Scripted {
    fn up(bin: PathBuf) -> Scripted {
        let cluster = Scripted {
            dir: tempfile::tempdir().unwrap(),
            base_port: free_base(),
            bin,
        };
        ok(&cluster.run(&["up"]));
        cluster
    }

    /// `rolling-restart ARGS` while a client enqueues, retrying refused connections and 503s
    /// on the next node; every request must end acknowledged, and every acknowledged item
    /// must be there afterwards. Returns how many were acknowledged.
    async fn restart_under_load(&self, args: &[&str]) -> usize {
        let urls: Vec<String> = (1..=3).map(|id| self.url(id)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::<String>::new()));
        let bad = Arc::new(Mutex::new(Vec::<String>::new()));
        let client = {
            let (stop, acked, bad) = (stop.clone(), acked.clone(), bad.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut n = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let key = format!("rr-{n}");
                    let deadline = Instant::now() + Duration::from_secs(30);
                    for attempt in 0.. {
                        // A node restarting refuses connections: retry elsewhere.
                        let url = &urls[(n + attempt) % 3];
                        match enqueue_once(&http, url, &key, &payload(n as u64, 100)).await {
                            Attempt::Acked(id) => {
                                acked.lock().unwrap().push(id);
                                break;
                            }
                            Attempt::Retry => {}
                            Attempt::Failed(why) => bad.lock().unwrap().push(why),
                        }
                        assert!(Instant::now() < deadline, "{key} never acknowledged");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        };
        let mut command = vec!["rolling-restart"];
        command.extend_from_slice(args);
        let out = ok(&self.run(&command));
        assert_eq!(out.matches("restarted").count(), 3, "{out}");
        stop.store(true, Ordering::SeqCst);
        client.await.unwrap();
        assert!(bad.lock().unwrap().is_empty(), "{:?}", bad.lock().unwrap());
        let acked = acked.lock().unwrap().clone();
        assert!(acked.len() > 10, "too little load: {}", acked.len());
        let http = reqwest::Client::new();
        for id in &acked {
            let w: Value = http
                .get(format!("{}/work/{id}", self.url(1)))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(w["status"], "queued", "{w}");
        }
        acked.len()
    }

    /// Waits (30 s at most) until node 1's `/status` shows `cluster_version` = `want`.
    async fn wait_for_version(&self, want: u64) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Ok(a) = http.get(format!("{}/status", self.url(1))).send().await {
                let status: Value = a.json().await.unwrap_or(Value::Null);
                last = status["cluster_version"].clone();
                if last == want {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cluster version stayed {last}, wanted {want}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_under_load_fails_no_request() {
    let cluster = Scripted::up(common::binary());
    let acked = cluster.restart_under_load(&[]).await;
    eprintln!("rolling restart: {acked} enqueues acknowledged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_upgrade_from_the_previous_release_fails_no_request() {
    let previous = std::env::var_os("HASHQ_PREVIOUS_BIN")
        .map(PathBuf::from)
        .expect(
            "HASHQ_PREVIOUS_BIN: the previous release's hashq binary (scripts/test.sh builds it)",
        );
    let cluster = Scripted::up(previous);
    // The previous release speaks cluster version 3: no batch enqueue yet.
    cluster.wait_for_version(3).await;
    let http = reqwest::Client::new();
    let before = post_two_file_batch(&http, &cluster.url(1)).await;
    assert!(before.status().is_client_error(), "{}", before.status());

    let new = common::binary();
    let acked = cluster
        .restart_under_load(&["--bin", new.to_str().unwrap()])
        .await;
    eprintln!("rolling upgrade: {acked} enqueues acknowledged");
    // Every member runs this build now: the version rises to this build's (5: batch enqueue
    // from 4; from 5 no payload-reference records, which the raise deletes while the items
    // enqueued under load, still queued, keep their payloads).
    cluster.wait_for_version(5).await;
    let after = post_two_file_batch(&http, &cluster.url(2)).await;
    assert_eq!(after.status(), 200);
    let ids: Value = after.json().await.unwrap();
    assert_eq!(ids["work_ids"].as_array().map(Vec::len), Some(2), "{ids}");
    // The next start uses the binary the upgrade moved to.
    let bin = std::fs::read_to_string(cluster.dir.path().join("bin")).unwrap();
    assert_eq!(bin.trim(), new.to_str().unwrap());
}

/// `POST /enqueue/batch` of two small files to `url`.
async fn post_two_file_batch(http: &reqwest::Client, url: &str) -> reqwest::Response {
    let part = |bytes: &[u8], name: &str| {
        reqwest::multipart::Part::bytes(bytes.to_vec()).file_name(name.to_string())
    };
    let form = reqwest::multipart::Form::new()
        .part("f", part(b"one", "a"))
        .part("f", part(b"two", "b"));
    http.post(format!("{url}/enqueue/batch?iterations=1"))
        .multipart(form)
        .send()
        .await
        .unwrap()
}
