//! The leader's housekeeping on a real node.

use hashq_raft::command::{Request, Response};
use hashq_raft::types::{Status, WorkerSecret};

use super::{enqueue, settled, wait_for, Cluster};

#[tokio::test]
async fn an_expired_lease_goes_back_to_the_queue_at_the_leaders_tick() {
    let cluster = Cluster::start(1, &["--lease", "300ms"]).await;
    let node = cluster.node(1).clone();
    settled(&node).await;
    let submit = |request| async {
        let reply = node.proposer().submit(request).await;
        reply.expect("the proposal is accepted").response
    };
    let Response::Enqueued { id, .. } = submit(enqueue(b"h", None)).await else {
        panic!("not enqueued");
    };
    let secret = WorkerSecret(7);
    let register = Request::Register {
        slot: None,
        parent: node.id(),
        host: "test".into(),
        handle: String::new(),
        secret,
    };
    let Response::Registered { worker } = submit(register).await else {
        panic!("not registered");
    };
    let lease = Request::Lease {
        worker,
        secret,
        max: 1,
        min: 1,
        max_iterations: u64::MAX,
        lease_ms: 300,
        request_id: 1,
    };
    let Response::Leased { items } = submit(lease).await else {
        panic!("not leased");
    };
    assert_eq!(items.len(), 1);
    let item = || hashq_raft::machine::item(&node.reader().view(), id).expect("read");
    assert_eq!(item().map(|i| i.status), Some(Status::Running));

    // Nobody heartbeats: the leader's tick takes the lease back.
    let requeued = wait_for("the expired lease to go back to the queue", || async {
        item().filter(|i| i.status == Status::Queued)
    })
    .await;
    assert_eq!((requeued.attempts, requeued.lease), (1, None));
    cluster.shut_down().await;
}
