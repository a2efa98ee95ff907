//! The OpenAPI document against the real thing: schemathesis (installed from PyPI by
//! `scripts/test.sh`) generates requests from `/openapi.json`, valid and invalid, and checks
//! every answer: no 5xx, statuses, content types, headers and bodies as documented, invalid
//! input refused, valid input accepted. Bounded: a few hundred examples per route.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Cluster, Options, ADMIN_TOKEN};

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_and_no_schema_mismatch() {
    let found = Command::new("schemathesis").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "schemathesis is not installed: `python3 -m pip install schemathesis` (scripts/test.sh does it)"
    );
    let cluster = Cluster::start(Options {
        // Long polls (`GET /work/{id}?wait=`) last at most a second here.
        node_args: [
            "--max-iterations",
            "1000",
            "--max-body-bytes",
            "65536",
            "--max-wait",
            "1s",
        ]
        .map(String::from)
        .to_vec(),
        ..Options::default()
    })
    .await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    // A follower: every write it takes is forwarded to the leader.
    let node = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let report = cluster.dir.path().join("schemathesis");
    let url = format!("{}/openapi.json", cluster.url(node));
    let output = tokio::task::spawn_blocking(move || {
        Command::new("schemathesis")
            .arg("--config-file")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/schemathesis.toml"
            ))
            .args(["run", &url, "--checks", "all", "--max-examples", "200"])
            // `DELETE /work/{id}` cancels an item, it is not a REST delete: the item stays
            // readable, as `cancelled`, so its client can see what became of it and retry it
            // (as job queues do). The check that a deleted resource answers 404 is not ours.
            .args(["--exclude-checks", "use_after_free"])
            .args(["--generation-database", "none", "--no-color"])
            .args(["--request-timeout", "15", "--workers", "2"])
            // The admin credential opens the admin route; the client routes are open (no
            // client token on this cluster).
            .args(["--header", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
            // Membership changes would reshape the cluster under test (and an added address
            // is probed): their bad inputs are in tests/api.rs's table instead.
            .args(["--exclude-path-regex", "^/admin/members"])
            .arg("--report-dir")
            .arg(&report)
            .env("NO_COLOR", "1")
            .output()
            .expect("run schemathesis")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let tail: Vec<&str> = stdout.lines().rev().take(60).collect();
    eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
