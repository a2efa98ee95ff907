//! `scripts/cluster.sh rolling-restart` under client load: the nodes restart one at a time,
//! followers first, each once it has rejoined and caught up, and no client request fails
//! (the client retries refused connections and 503s, as the CLI does).

mod common;

use std::path::Path;
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
}

impl Scripted {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh"))
            .args(args)
            .env("HASHQ_BIN", common::binary())
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

/// A base port with the three after it free.
fn free_base() -> u16 {
    loop {
        let base = common::free_port();
        if base < 60000
            && (0..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
        {
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

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_under_load_fails_no_request() {
    let cluster = Scripted {
        dir: tempfile::tempdir().unwrap(),
        base_port: free_base(),
    };
    ok(&cluster.run(&["up"]));
    let urls: Vec<String> = (1..=3).map(|id| cluster.url(id)).collect();
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
    let out = ok(&cluster.run(&["rolling-restart"]));
    assert_eq!(out.matches("restarted").count(), 3, "{out}");
    stop.store(true, Ordering::SeqCst);
    client.await.unwrap();
    assert!(bad.lock().unwrap().is_empty(), "{:?}", bad.lock().unwrap());
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 10, "too little load: {}", acked.len());
    let http = reqwest::Client::new();
    for id in &acked {
        let w: Value = http
            .get(format!("{}/work/{id}", cluster.url(1)))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(w["status"], "queued", "{w}");
    }
    eprintln!("rolling restart: {} enqueues acknowledged", acked.len());
}
