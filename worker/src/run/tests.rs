//! The session loop's pure parts: lease retries, heartbeat and idle-check periods, error stops.

use super::*;

fn registered(lease_ms: u64, heartbeat_ms: u64, worker_lost_ms: u64) -> RegisterResponse {
    RegisterResponse {
        worker: WorkerId(1),
        secret: WorkerSecret(1),
        node: 1,
        endpoints: Vec::new(),
        lease_ms,
        heartbeat_ms,
        worker_lost_ms,
    }
}

fn ask(worker: u64, max: u32) -> LeaseRequest {
    LeaseRequest {
        worker: WorkerId(worker),
        secret: WorkerSecret(worker),
        max,
        min: max,
        max_iterations: u64::MAX,
        wait_ms: 5000,
        request_id: 0,
    }
}

#[test]
fn a_retry_reuses_the_request_until_an_answer_settles_it() {
    let mut retry = LeaseRetry::default();
    let mut ids = [7, 8, 9].into_iter();
    let first = retry.request(ask(1, 2), || ids.next().unwrap());
    assert_eq!(first.request_id, 7);
    // No answer came back: the same request, even if more capacity is free now.
    let again = retry.request(ask(1, 5), || ids.next().unwrap());
    assert_eq!((again.request_id, again.max), (7, 2));
    retry.settle();
    let next = retry.request(ask(1, 5), || ids.next().unwrap());
    assert_eq!((next.request_id, next.max), (8, 5));
}

#[test]
fn a_new_registration_gets_a_fresh_request() {
    let mut retry = LeaseRetry::default();
    let mut ids = [7, 8].into_iter();
    retry.request(ask(1, 2), || ids.next().unwrap());
    let other = retry.request(ask(2, 2), || ids.next().unwrap());
    assert_eq!((other.worker, other.request_id), (WorkerId(2), 8));
}

#[test]
fn heartbeat_period_follows_the_cluster_within_safe_bounds() {
    let ms = Duration::from_millis;
    assert_eq!(
        heartbeat_period(&registered(10_000, 2_000, 15_000)),
        ms(2_000)
    );
    // Missing: a third of the lease.
    assert_eq!(heartbeat_period(&registered(9_000, 0, 30_000)), ms(3_000));
    // Too slow to keep the lease or the worker alive: half of the tighter limit.
    assert_eq!(
        heartbeat_period(&registered(4_000, 5_000, 30_000)),
        ms(2_000)
    );
    assert_eq!(
        heartbeat_period(&registered(30_000, 20_000, 6_000)),
        ms(3_000)
    );
    // Absurdly fast or absent values.
    assert_eq!(
        heartbeat_period(&registered(10_000, 1, 15_000)),
        MIN_HEARTBEAT
    );
    assert_eq!(heartbeat_period(&registered(0, 0, 0)), ms(1_000));
}

#[test]
fn idle_checks_are_frequent_but_not_busy() {
    let ms = Duration::from_millis;
    assert_eq!(idle_check_period(Duration::from_secs(60)), ms(1_000));
    assert_eq!(idle_check_period(ms(400)), ms(100));
    assert_eq!(idle_check_period(ms(1)), ms(10));
}

#[test]
fn client_errors_map_to_stops() {
    let forgotten = ClientError::UnknownWorker {
        message: String::new(),
    };
    assert!(matches!(Stop::from(forgotten), Stop::Forgotten(_)));
    let slot = ClientError::UnknownSlot {
        message: String::new(),
    };
    assert!(matches!(Stop::from(slot), Stop::Forgotten(_)));
    let gone = ClientError::NoEndpoint {
        silent_for: Duration::from_secs(30),
    };
    assert!(matches!(Stop::from(gone), Stop::NoEndpoint));
    let rejected = ClientError::Rejected {
        endpoint: "http://a:1".into(),
        status: 401,
        code: "unauthorized".into(),
        message: String::new(),
    };
    assert!(matches!(Stop::from(rejected), Stop::Failed(_)));
}
