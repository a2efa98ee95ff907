//! A leader whose wall clock jumps an hour ahead: leases it granted do not expire early, and
//! once it steps down, time goes on for its successor (hashq 0.1 kept the largest wall clock
//! ever stamped, so such a leader expired every lease at once and froze time afterwards).
//! Each node reads a shift of its wall clock from a file (`--clock-offset-file`, for tests).

mod common;

use std::time::{Duration, Instant};

use common::{payload, reference, wait_for, worker_call, Cluster, Options};
use hashq_proto::worker::{LeaseRequest, LeaseResponse, RegisterRequest, RegisterResponse};
use serde_json::Value;

async fn work(cluster: &Cluster, node: u64, id: &str) -> Value {
    wait_for("the item", Duration::from_secs(20), || async {
        cluster.get_json(node, &format!("/work/{id}")).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_clock_an_hour_ahead_neither_expires_leases_early_nor_freezes_time() {
    let dir = tempfile::tempdir().unwrap();
    let clock = |id: u64| dir.path().join(format!("clock-{id}"));
    let mut extra = std::collections::HashMap::new();
    for id in 1..=3u64 {
        extra.insert(
            id,
            vec![
                "--clock-offset-file".to_string(),
                clock(id).display().to_string(),
            ],
        );
    }
    let mut cluster = Cluster::start_with(
        Options {
            node_args: [
                "--lease",
                "3s",
                "--worker-lost-after",
                "3s",
                "--max-iterations",
                "100000000",
            ]
            .map(String::from)
            .to_vec(),
            ..Options::default()
        },
        Vec::new(),
        extra,
    )
    .await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;

    // 1. An item that takes several seconds to hash, under a 3 s lease the worker renews.
    let iterations = 8_000_000;
    let slow = cluster
        .enqueue(leader, payload(1, 64), iterations, "slow")
        .await;
    let _worker = cluster.start_worker(&[]);
    wait_for("the slow item to run", Duration::from_secs(20), || async {
        let w = cluster.get_json(leader, &format!("/work/{slow}")).await?;
        (w["status"] == "running").then_some(())
    })
    .await;
    // The leader's wall clock jumps an hour ahead while the worker holds the lease.
    std::fs::write(clock(leader), "3600000").unwrap();
    let done = wait_for(
        "the slow item to complete",
        Duration::from_secs(60),
        || async {
            let w = cluster.get_json(leader, &format!("/work/{slow}")).await?;
            (w["status"] == "completed").then_some(w)
        },
    )
    .await;
    assert_eq!(
        done["attempts"], 1,
        "the lease expired early and the item ran again: {done}"
    );
    assert_eq!(done["value"], reference(&payload(1, 64), iterations));

    // 2. The skewed leader steps down (paused past an election); under the next leader a
    // lease that nobody renews runs out after its length, not an hour later.
    cluster.kill_worker(0);
    cluster.pause_node(leader);
    let next = wait_for("another leader", Duration::from_secs(30), || async {
        let other = cluster.ids().into_iter().find(|i| *i != leader)?;
        let h = cluster.get_json(other, "/health").await?;
        h["leader"].as_u64().filter(|l| *l != leader)
    })
    .await;
    let item = cluster
        .enqueue(next, b"abandoned".to_vec(), 1, "abandoned")
        .await;
    let registered: RegisterResponse = worker_call(
        &cluster,
        next,
        "/worker/register",
        &RegisterRequest {
            slot: None,
            parent: None,
            host: "test".into(),
            handle: "test".into(),
        },
    )
    .await;
    let granted: LeaseResponse = worker_call(
        &cluster,
        next,
        "/worker/lease",
        &LeaseRequest {
            worker: registered.worker,
            secret: registered.secret,
            max: 10,
            min: 10,
            max_iterations: u64::MAX,
            wait_ms: 1000,
            request_id: 1,
        },
    )
    .await;
    assert!(granted.items.iter().any(|g| g.id.to_string() == item));
    let leased_at = Instant::now();
    // Never renewed: back in the queue once the 3 s lease is over.
    wait_for(
        "the abandoned lease to expire",
        Duration::from_secs(20),
        || async {
            let w = cluster.get_json(next, &format!("/work/{item}")).await?;
            (w["status"] == "queued" && w["attempts"] == 1).then_some(())
        },
    )
    .await;
    let took = leased_at.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "expired after {took:?}, before its 3 s"
    );
    let status = work(&cluster, next, &item).await;
    assert_eq!(status["status"], "queued");
    cluster.resume_node(leader);
}
