//! Data dirs written by hashq 0.1 (`tests/fixtures/v0.1-cluster.tar.xz`, made by the 0.1
//! binary with `tests/fixtures/make-v0.1-cluster.sh`): refused by a node with a message that
//! names the fix, converted by `hashq migrate`, and served again with every item as it was
//! (running ones back in the queue).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{wait_for, Cluster, Options};
use serde_json::Value;

fn hashq(args: &[&str]) -> std::process::Output {
    Command::new(common::binary())
        .args(args)
        .output()
        .expect("run hashq")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_written_by_hashq_0_1_is_migrated_and_serves_every_item() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v0.1-cluster.tar.xz");
    let unpacked = Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .arg("-xJf")
        .arg(&fixture)
        .status()
        .expect("tar");
    assert!(unpacked.success(), "cannot unpack {}", fixture.display());
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("manifest.json")).unwrap())
            .unwrap();
    let ports: Vec<u16> = manifest["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    // The fixture's ports are in the kernel's ephemeral range, so a test's outgoing
    // connection (one that ran before this one) may hold one for a while: wait it out.
    for &port in &ports {
        wait_for(
            &format!("port {port} (in the fixture's membership) to be free"),
            Duration::from_secs(90),
            || async move { std::net::TcpListener::bind(("127.0.0.1", port)).ok() },
        )
        .await;
    }
    let data = |id: u64| dir.path().join(format!("node-{id}"));

    // A node refuses the old format and says how to convert it.
    let refused = hashq(&[
        "node",
        "--id",
        "1",
        "--peers",
        &format!("1=127.0.0.1:{}", ports[0]),
        "--listen",
        &format!("127.0.0.1:{}", ports[0]),
        "--data-dir",
        data(1).to_str().unwrap(),
        "--insecure",
        "--launcher",
        "none",
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("hashq migrate"), "{stderr}");

    for id in 1..=3u64 {
        let out = hashq(&["migrate", "--data-dir", data(id).to_str().unwrap()]);
        assert!(
            out.status.success(),
            "migrate node {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["running_requeued"], 1, "{summary}");
    }

    let mut cluster = Cluster::start(Options {
        data_root: Some(dir.path().to_path_buf()),
        ports: Some(ports),
        tls: false,
        // The fixture's items were written on 2026-11-30: with the default retentions the
        // reaper forgets its pulled items (10 minutes) and later its completed and dead ones (7
        // days) as soon as the cluster leads, racing the reads below.
        node_args: [
            "--max-iterations",
            "200000000",
            "--pulled-retention",
            "36500days",
            "--completed-retention",
            "36500days",
            "--dead-retention",
            "36500days",
        ]
        .map(String::from)
        .to_vec(),
        ..Options::default()
    })
    .await;
    let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
    let pulled: Vec<String> = manifest["pulled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["work_id"].as_str().unwrap().to_string())
        .collect();
    let items = manifest["items"].as_array().unwrap();
    assert!(items.len() >= 11, "{manifest}");
    for before in items {
        let id = before["work_id"].as_str().unwrap();
        let now = wait_for("the item", Duration::from_secs(30), || async {
            cluster.get_json(leader, &format!("/work/{id}")).await
        })
        .await;
        let expected = match before["status"].as_str().unwrap() {
            "running" => "queued",
            s => s,
        };
        assert_eq!(now["status"], expected, "{id}: was {before}, is {now}");
        assert_eq!(now["iterations"], before["iterations"]);
        assert_eq!(now["value"], before["value"], "{id}");
    }
    // The cluster works on: workers complete what waits (the slow item keeps one thread busy
    // for a minute), and nothing is handed out twice.
    cluster.start_worker(&["--threads", "2"]);
    let waiting: Vec<&str> = items
        .iter()
        .filter(|i| i["status"] != "pulled" && i["iterations"].as_u64() < Some(10_000_000))
        .map(|i| i["work_id"].as_str().unwrap())
        .collect();
    let mut got = std::collections::BTreeSet::new();
    for n in 0..200 {
        for (id, value) in cluster.pull(leader, 100, &format!("after-{n}")).await {
            assert!(
                !pulled.contains(&id),
                "{id} was pulled before the migration"
            );
            assert!(got.insert(id.clone()), "{id} twice");
            let before = items.iter().find(|i| i["work_id"] == id.as_str());
            if let Some(v) = before.and_then(|b| b["value"].as_str()) {
                assert_eq!(v, value);
            }
        }
        if waiting.iter().all(|id| got.contains(*id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        waiting.iter().all(|id| got.contains(*id)),
        "not every item came back: {waiting:?} vs {got:?}"
    );
}
