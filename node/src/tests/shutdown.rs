//! Stopping a node in-process ends everything it started.

use super::{settled, wait_for, Cluster};

// One runtime thread, so that the runtime's task count is this test's alone.
#[tokio::test]
async fn a_node_shut_down_ends_every_task_it_started() {
    let alive = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = alive();
    let cluster = Cluster::start(1, &[]).await;
    let node = cluster.node(1).clone();
    settled(&node).await;
    let server = &cluster.nodes[0].as_ref().expect("running").server;
    // Two batchers, four watchers (fatal stops, terms, disk, peers), housekeeping and the
    // autoscaler, once bootstrap has ended.
    wait_for("the eight background loops, bootstrap ended", || async {
        (server.running_tasks() == 8).then_some(())
    })
    .await;
    // A client connection is open when the node stops.
    let client = reqwest::Client::new();
    let health = client
        .get(format!("http://{}/health", node.config().listen))
        .send()
        .await
        .expect("health");
    assert!(health.status().is_success());

    cluster.shut_down().await;
    drop(client);

    wait_for("every task the node started to end", || async {
        (alive() == before).then_some(())
    })
    .await;
    assert!(node.is_last_handle(), "something still holds the node");
}
