//! The client API end to end: bad input answered with JSON errors, idempotency across
//! nodes, an item's status through its life.

mod common;

use std::time::{Duration, Instant};

use common::{payload, reference, wait_for, Cluster, Options, ADMIN_TOKEN, WORKER_TOKEN};
use reqwest::Method;
use serde_json::{json, Value};

fn options() -> Options {
    Options {
        nodes: 3,
        launch_workers: false,
        proxied: false,
        data_root: None,
        ports: None,
        tls: false,
        node_args: [
            "--max-iterations",
            "100000",
            "--max-body-bytes",
            "65536",
            "--max-top",
            "1000",
            "--max-batch-items",
            "4",
            "--max-batch-bytes",
            "1024",
        ]
        .map(String::from)
        .to_vec(),
    }
}

struct Case {
    method: Method,
    path: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
    status: u16,
    code: &'static str,
}

fn case(method: Method, path: &'static str, status: u16, code: &'static str) -> Case {
    Case {
        method,
        path,
        body: Vec::new(),
        headers: Vec::new(),
        status,
        code,
    }
}

const BOUNDARY: &str = "hashq-test-boundary";

/// A `multipart/form-data` body of `parts` (name, file name, bytes), as curl -F sends it.
fn multipart_body(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, file_name, bytes) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let file = file_name.map_or(String::new(), |f| format!("; filename=\"{f}\""));
        body.extend_from_slice(
            format!("Content-Disposition: form-data; name=\"{name}\"{file}\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_json_error_and_the_node_keeps_serving() {
    let cluster = Cluster::start(options()).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    // Cancel and retry answer 404 for a missing item once the cluster runs version 3, and
    // batches are taken from version 4 (409 before); the cluster goes to 5, this build's.
    for id in cluster.ids() {
        cluster
            .wait_for_status(id, "/cluster_version", json!(5))
            .await;
    }
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();

    let mut cases = vec![
        case(Method::PUT, "/enqueue", 400, "missing_parameter"),
        case(
            Method::PUT,
            "/enqueue?iterations=",
            400,
            "invalid_parameter",
        ),
        case(
            Method::PUT,
            "/enqueue?iterations=abc",
            400,
            "invalid_parameter",
        ),
        case(
            Method::PUT,
            "/enqueue?iterations=1.5",
            400,
            "invalid_parameter",
        ),
        case(Method::PUT, "/enqueue?iterations=0", 400, "out_of_range"),
        case(Method::PUT, "/enqueue?iterations=-3", 400, "out_of_range"),
        case(
            Method::PUT,
            "/enqueue?iterations=100001",
            400,
            "out_of_range",
        ),
        case(
            Method::PUT,
            "/enqueue?iterations=99999999999999999999999",
            400,
            "out_of_range",
        ),
        case(
            Method::PUT,
            "/enqueue?iterations=999999999999999999999999999999999999999999",
            400,
            "invalid_parameter",
        ),
        case(
            Method::PUT,
            "/enqueue?iterations=1&iterations=2",
            400,
            "invalid_parameter",
        ),
        case(
            Method::PUT,
            "/enqueue?iterations=1&priority=10",
            400,
            "out_of_range",
        ),
        case(
            Method::PUT,
            "/enqueue?iterations=1&priority=high",
            400,
            "invalid_parameter",
        ),
        case(
            Method::PUT,
            "/enqueue?iterations=1&priority=1&priority=2",
            400,
            "invalid_parameter",
        ),
        case(Method::POST, "/pullCompleted", 400, "missing_parameter"),
        case(Method::POST, "/pullCompleted?top=0", 400, "out_of_range"),
        case(Method::POST, "/pullCompleted?top=-1", 400, "out_of_range"),
        case(
            Method::POST,
            "/pullCompleted?top=ten",
            400,
            "invalid_parameter",
        ),
        case(Method::POST, "/pullCompleted?top=1001", 400, "out_of_range"),
        case(Method::GET, "/no/such/route", 404, "not_found"),
        case(
            Method::DELETE,
            "/enqueue?iterations=1",
            405,
            "method_not_allowed",
        ),
        case(Method::GET, "/enqueue", 405, "method_not_allowed"),
        case(
            Method::GET,
            "/pullCompleted?top=1",
            405,
            "method_not_allowed",
        ),
        case(Method::GET, "/work/abc", 400, "invalid_work_id"),
        case(Method::GET, "/work/-1", 400, "invalid_work_id"),
        case(Method::GET, "/work/987654321", 404, "not_found"),
        case(Method::GET, "/work/987654321?wait=1", 404, "not_found"),
        case(Method::GET, "/work/1?wait=soon", 400, "invalid_wait"),
        case(Method::GET, "/work/1?wait=-1", 400, "invalid_wait"),
        case(Method::GET, "/work/1?wait=1.5s", 400, "invalid_wait"),
        case(Method::GET, "/work/987654321?wait=99s", 404, "not_found"),
        case(Method::GET, "/work/1?wait=1&wait=2", 400, "invalid_wait"),
        case(
            Method::POST,
            "/pullCompleted?top=1&wait=1",
            400,
            "idempotency_key_required",
        ),
        case(
            Method::POST,
            "/pullCompleted?top=1&wait=soon",
            400,
            "invalid_wait",
        ),
        case(
            Method::POST,
            "/pullCompleted?top=1&wait=-5",
            400,
            "invalid_wait",
        ),
        case(Method::DELETE, "/work/abc", 400, "invalid_work_id"),
        case(Method::DELETE, "/work/987654321", 404, "not_found"),
        case(Method::POST, "/work/abc/retry", 400, "invalid_work_id"),
        case(Method::POST, "/work/987654321/retry", 404, "not_found"),
        case(Method::GET, "/work/1/retry", 405, "method_not_allowed"),
        case(Method::PUT, "/work/1", 405, "method_not_allowed"),
        case(Method::GET, "/work", 400, "missing_parameter"),
        case(Method::GET, "/work?status=lost", 400, "invalid_status"),
        case(
            Method::GET,
            "/work?status=dead&status=queued",
            400,
            "invalid_parameter",
        ),
        case(
            Method::GET,
            "/work?status=dead&after=x",
            400,
            "invalid_parameter",
        ),
        case(
            Method::GET,
            "/work?status=dead&after=-1",
            400,
            "invalid_parameter",
        ),
        case(
            Method::GET,
            "/work?status=dead&limit=0",
            400,
            "out_of_range",
        ),
        case(
            Method::GET,
            "/work?status=dead&limit=1001",
            400,
            "out_of_range",
        ),
        case(Method::POST, "/work", 405, "method_not_allowed"),
        case(Method::POST, "/worker/lease", 401, "unauthorized"),
        case(Method::POST, "/raft/vote", 401, "unauthorized"),
        case(Method::POST, "/internal/propose", 401, "unauthorized"),
        case(Method::POST, "/internal/elect", 401, "unauthorized"),
    ];
    cases.push(Case {
        body: vec![7u8; 65537],
        ..case(
            Method::PUT,
            "/enqueue?iterations=5",
            413,
            "payload_too_large",
        )
    });
    cases.push(Case {
        headers: vec![("idempotency-key", "k".repeat(300))],
        ..case(
            Method::PUT,
            "/enqueue?iterations=5",
            400,
            "invalid_idempotency_key",
        )
    });
    cases.push(Case {
        headers: vec![("idempotency-key", "with space".into())],
        ..case(
            Method::POST,
            "/pullCompleted?top=5",
            400,
            "invalid_idempotency_key",
        )
    });
    cases.push(Case {
        headers: vec![("authorization", "Bearer wrong".into())],
        ..case(Method::POST, "/raft/append", 401, "unauthorized")
    });
    cases.push(Case {
        headers: vec![("authorization", format!("Bearer {WORKER_TOKEN}"))],
        // A truncated varint: not a lease request.
        body: vec![0xff],
        ..case(Method::POST, "/worker/lease", 400, "invalid_body")
    });

    // Batches: the body must be multipart, each part needs iterations, within the limits
    // (4 items, 1 KiB of payloads here).
    let form = |parts: &[(&str, Option<&str>, &[u8])]| Case {
        headers: vec![(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )],
        body: multipart_body(parts),
        ..case(Method::POST, "/enqueue/batch", 0, "")
    };
    let file = |bytes: &'static [u8]| ("f", Some("a.bin"), bytes);
    for (query, parts, status, code) in [
        ("", vec![file(b"x")], 400, "missing_parameter"),
        ("?iterations=0", vec![file(b"x")], 400, "out_of_range"),
        ("?iterations=x", vec![file(b"x")], 400, "invalid_parameter"),
        ("?iterations=1", vec![], 400, "empty_batch"),
        (
            "?iterations=1",
            vec![("iterations", None, &b"lots"[..]), file(b"x")],
            400,
            "invalid_parameter",
        ),
        (
            "",
            vec![("iterations", None, &b"100001"[..]), file(b"x")],
            400,
            "out_of_range",
        ),
        ("?iterations=1", vec![file(b"x"); 5], 413, "batch_too_large"),
        (
            "?iterations=1&priority=-1",
            vec![file(b"x")],
            400,
            "out_of_range",
        ),
        (
            "?iterations=1",
            vec![("priority", None, &b"urgent"[..]), file(b"x")],
            400,
            "invalid_parameter",
        ),
        (
            "?iterations=1",
            vec![("iteration", None, &b"5"[..]), file(b"x")],
            400,
            "unknown_part",
        ),
        (
            "?iterations=1",
            vec![file(&[1u8; 600]), file(&[2u8; 600])],
            413,
            "batch_too_large",
        ),
    ] {
        let path: &'static str = format!("/enqueue/batch{query}").leak();
        cases.push(Case {
            path,
            status,
            code,
            ..form(&parts)
        });
    }
    cases.push(case(
        Method::POST,
        "/enqueue/batch?iterations=1",
        415,
        "unsupported_media_type",
    ));
    cases.push(Case {
        headers: vec![("content-type", "text/plain".into())],
        body: b"hello".to_vec(),
        ..case(
            Method::POST,
            "/enqueue/batch?iterations=1",
            415,
            "unsupported_media_type",
        )
    });
    cases.push(Case {
        body: b"--nope\r\nthis is not a part".to_vec(),
        path: "/enqueue/batch?iterations=1",
        status: 400,
        code: "invalid_multipart",
        ..form(&[])
    });
    cases.push(Case {
        body: vec![7u8; 100 << 10],
        path: "/enqueue/batch?iterations=1",
        status: 413,
        code: "payload_too_large",
        ..form(&[])
    });
    let mut keyed = form(&[file(b"x")]);
    keyed.path = "/enqueue/batch?iterations=1";
    keyed.headers.push(("idempotency-key", "k".repeat(300)));
    keyed.status = 400;
    keyed.code = "invalid_idempotency_key";
    cases.push(keyed);
    cases.push(case(
        Method::GET,
        "/enqueue/batch",
        405,
        "method_not_allowed",
    ));

    // Membership changes: bad bodies and ids, unknown members, a node that is not up.
    let admin = || vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))];
    cases.push(case(Method::POST, "/admin/members", 401, "unauthorized"));
    for (body, status, code) in [
        (&b"{}"[..], 400, "invalid_body"),
        (&b"not json"[..], 400, "invalid_body"),
        (
            &br#"{"id": 0, "addr": "127.0.0.1:1"}"#[..],
            400,
            "invalid_member",
        ),
        (
            &br#"{"id": 9, "addr": "no-port"}"#[..],
            400,
            "invalid_member",
        ),
        (
            &br#"{"id": 9, "addr": "127.0.0.1:99999"}"#[..],
            400,
            "invalid_member",
        ),
        (
            &br#"{"id": 9, "addr": "127.0.0.1:1"}"#[..],
            503,
            "unavailable",
        ),
    ] {
        cases.push(Case {
            headers: admin(),
            body: body.to_vec(),
            ..case(Method::POST, "/admin/members", status, code)
        });
    }
    for (path, status, code) in [
        ("/admin/members/abc", 400, "invalid_node_id"),
        ("/admin/members/-1", 400, "invalid_node_id"),
        ("/admin/members/99", 404, "not_found"),
    ] {
        cases.push(Case {
            headers: admin(),
            ..case(Method::DELETE, path, status, code)
        });
    }

    let counted_before = [
        answers_counted(&cluster, leader).await,
        answers_counted(&cluster, follower).await,
    ];
    for node in [leader, follower] {
        for c in &cases {
            let mut request = cluster
                .http
                .request(c.method.clone(), format!("{}{}", cluster.url(node), c.path))
                .body(c.body.clone());
            for (name, value) in &c.headers {
                request = request.header(*name, value);
            }
            let answer = request
                .send()
                .await
                .unwrap_or_else(|e| panic!("{} {}: {e}", c.method, c.path));
            let status = answer.status().as_u16();
            let content_type = answer
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let body: Value = answer.json().await.unwrap_or(Value::Null);
            assert_eq!(
                status, c.status,
                "{} {} on node {node}: {body}",
                c.method, c.path
            );
            assert!(
                content_type.starts_with("application/json"),
                "{} {}: {content_type}",
                c.method,
                c.path
            );
            assert_eq!(
                body["error"]["code"], c.code,
                "{} {}: {body}",
                c.method, c.path
            );
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{} {}: no message in {body}",
                c.method,
                c.path
            );
        }
    }

    // Each node counted every answer it gave, by class (`/metrics`). Peers' calls and the
    // metrics reads add to the totals, so they are at least the cases'.
    let errors = |class: u16| cases.iter().filter(|c| c.status / 100 == class).count() as u64;
    for (node, before) in [leader, follower].into_iter().zip(counted_before) {
        let after = answers_counted(&cluster, node).await;
        let counted = [0, 1, 2].map(|i| after[i] - before[i]);
        assert!(counted[0] >= cases.len() as u64, "node {node}: {counted:?}");
        assert!(counted[1] >= errors(4), "node {node}: {counted:?}");
        assert!(
            counted[2] >= errors(5) && errors(5) > 0,
            "node {node}: {counted:?}"
        );
    }

    // Nothing was enqueued by all that, and every node still serves.
    for id in cluster.ids() {
        let status = cluster
            .get_json(id, "/status")
            .await
            .expect("status answers");
        assert_eq!(status["totals"]["enqueued"], 0, "{status}");
    }
    let id = cluster
        .enqueue(follower, b"hello".to_vec(), 2, "after-bad-input")
        .await;
    let work = cluster
        .get_json(leader, &format!("/work/{id}"))
        .await
        .unwrap();
    assert_eq!(work["status"], "queued");
}

/// A node's answers so far, from its `/metrics`: all, 4xx and 5xx.
async fn answers_counted(cluster: &Cluster, node: u64) -> [u64; 3] {
    let metrics = cluster.metrics(node).await;
    [
        format!("hashq_http_requests_total{{node=\"{node}\"}} "),
        format!("hashq_http_errors_total{{node=\"{node}\",class=\"4xx\"}} "),
        format!("hashq_http_errors_total{{node=\"{node}\",class=\"5xx\"}} "),
    ]
    .map(|series| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series}in /metrics:\n{metrics}"))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_hold_across_nodes_and_an_item_shows_its_whole_life() {
    let mut cluster = Cluster::start(options()).await;
    let data = payload(1, 20_000);
    let id = cluster.enqueue(1, data.clone(), 1000, "same-key").await;
    // The same key on other nodes: the same work id, nothing new.
    assert_eq!(cluster.enqueue(2, data.clone(), 1000, "same-key").await, id);
    assert_eq!(
        cluster.enqueue(3, b"other".to_vec(), 7, "same-key").await,
        id
    );
    let other = cluster.enqueue(3, data.clone(), 3, "another-key").await;
    assert_ne!(other, id);
    cluster
        .wait_for_status(2, "/totals/enqueued", json!(2))
        .await;

    // Any node answers GET /work linearizably, right after the enqueue.
    for node in cluster.ids() {
        let work = cluster
            .get_json(node, &format!("/work/{id}"))
            .await
            .unwrap();
        assert_eq!(work["status"], "queued", "{work}");
        assert_eq!(work["iterations"], 1000);
        assert_eq!(work["attempts"], 0);
        assert!(work.get("value").is_none());
    }

    // A long poll on an item nothing works on answers with its state when the wait ends.
    let asked = std::time::Instant::now();
    let work = cluster
        .get_json(2, &format!("/work/{id}?wait=700ms"))
        .await
        .unwrap();
    let waited = asked.elapsed();
    assert_eq!(work["status"], "queued", "{work}");
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // Long polls on a follower (relayed to the leader) and on the leader answer once the
    // item completes, within moments of it: woken by the apply, not by polling.
    let long_poll = |node: u64| {
        let http = cluster.http.clone();
        let url = format!("{}/work/{id}?wait=25s", cluster.url(node));
        tokio::spawn(async move {
            let answer: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            (answer, std::time::Instant::now())
        })
    };
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let follower = cluster.ids().into_iter().find(|n| *n != leader).unwrap();
    let polls = [long_poll(follower), long_poll(leader)];
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        polls.iter().all(|p| !p.is_finished()),
        "a long poll answered early"
    );
    cluster.start_worker(&[]);
    let work = cluster.wait_for_completed(3, &id).await;
    let seen_completed = std::time::Instant::now();
    for poll in polls {
        let (answer, at) = poll.await.unwrap();
        assert_eq!(answer["status"], "completed", "{answer}");
        assert_eq!(answer["value"], reference(&data, 1000));
        assert!(
            at <= seen_completed + Duration::from_millis(200),
            "the long poll answered {:?} after a plain read saw the completion",
            at.saturating_duration_since(seen_completed)
        );
    }
    assert_eq!(work["attempts"], 1);
    assert_eq!(work["value"], reference(&data, 1000));
    cluster.wait_for_completed(1, &other).await;

    // A pull with a key, retried on other nodes, returns the same items; they are taken once.
    let first = cluster.pull(2, 10, "pull-key").await;
    let mut ids: Vec<&str> = first.iter().map(|(w, _)| w.as_str()).collect();
    ids.sort();
    let mut expected = vec![id.as_str(), other.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(cluster.pull(3, 10, "pull-key").await, first);
    assert_eq!(cluster.pull(1, 10, "pull-key").await, first);
    assert!(cluster.pull(1, 10, "fresh-key").await.is_empty());
    let work = cluster.get_json(1, &format!("/work/{id}")).await.unwrap();
    assert_eq!(work["status"], "pulled", "{work}");
    assert_eq!(work["value"], reference(&data, 1000));

    // What the node measured of all that, for Prometheus.
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let metrics = cluster.metrics(leader).await;
    for series in [
        "hashq_fsync_seconds_bucket",
        "hashq_commit_seconds_count",
        "hashq_apply_seconds_sum",
        "hashq_follower_lag_entries",
        "hashq_elections_total",
        "hashq_disk_free_bytes",
        "hashq_leader_clock_skew_ms",
        "hashq_snapshot_build_seconds",
        "hashq_repairing",
    ] {
        assert!(
            metrics.contains(series),
            "no {series} in /metrics:\n{metrics}"
        );
    }
    let fsyncs: u64 = metrics
        .lines()
        .find(|l| l.starts_with("hashq_fsync_seconds_count"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(fsyncs > 0, "the leader synced nothing?");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_budget_changes_at_run_time_through_the_cli() {
    let cluster = Cluster::start(options()).await;
    let budget = |node: u64| {
        let cluster = &cluster;
        async move { cluster.get_json(node, "/status").await?["workers"]["max"].as_u64() }
    };
    wait_for("the bootstrap budget", Duration::from_secs(10), || async {
        (budget(1).await == Some(8)).then_some(())
    })
    .await;
    let cli = |args: &[&str]| {
        std::process::Command::new(common::binary())
            .args(["cluster", "--endpoints", &cluster.endpoints()])
            .args(args)
            .output()
            .expect("run hashq cluster")
    };
    let out = cli(&["set-max-workers", "3", "--admin-token", ADMIN_TOKEN]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for node in cluster.ids() {
        wait_for(
            "every node to see the new budget",
            Duration::from_secs(10),
            || async { (budget(node).await == Some(3)).then_some(()) },
        )
        .await;
    }
    // Without the token, or out of range: refused, budget unchanged.
    let out = cli(&["set-max-workers", "5"]);
    assert!(!out.status.success());
    let out = cli(&[
        "set-max-workers",
        "5",
        "--admin-token",
        "wrong-but-long-enough",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["set-max-workers", "20000", "--admin-token", ADMIN_TOKEN]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("out_of_range")
            || String::from_utf8_lossy(&out.stderr).contains("from 0 to")
    );
    assert_eq!(budget(2).await, Some(3));
    // The members listing works too.
    let out = cli(&["members"]);
    let members: Value = serde_json::from_slice(&out.stdout).expect("members JSON");
    assert_eq!(members.as_array().map(Vec::len), Some(3));
}

/// Two endpoints and a witness: the exercise's "exactly two endpoints", with a majority that
/// survives the loss of either endpoint.
#[tokio::test(flavor = "multi_thread")]
async fn two_endpoints_and_a_witness_keep_serving_when_an_endpoint_dies() {
    let mut cluster = Cluster::start(options()).await;
    cluster.stop_node(3);
    cluster.start_node_with(3, &["--role", "witness"]);
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    // The witness serves no client or worker API, with a clear error.
    for (method, path) in [
        (Method::PUT, "/enqueue?iterations=1"),
        (Method::POST, "/pullCompleted?top=1"),
    ] {
        let answer = cluster
            .http
            .request(method, format!("{}{path}", cluster.url(3)))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 421);
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["error"]["code"], "witness", "{body}");
    }
    let health = cluster.get_json(3, "/health").await.unwrap();
    assert_eq!(health["role"], "witness");
    let id = cluster.enqueue(1, b"abc".to_vec(), 3, "w-1").await;
    // Lose an endpoint: the other endpoint and the witness are a majority.
    let leader = wait_for("an endpoint to lead", Duration::from_secs(10), || async {
        cluster.leader().await.filter(|l| *l != 3)
    })
    .await;
    let doomed = leader;
    let survivor = if doomed == 1 { 2 } else { 1 };
    cluster.kill_node(doomed);
    let later = cluster.enqueue(survivor, b"def".to_vec(), 3, "w-2").await;
    assert_ne!(id, later);
    let w = cluster
        .get_json(survivor, &format!("/work/{id}"))
        .await
        .unwrap();
    assert_eq!(w["status"], "queued", "{w}");
    wait_for(
        "the surviving endpoint to lead",
        Duration::from_secs(10),
        || async { cluster.leader().await.filter(|l| *l == survivor) },
    )
    .await;
}

/// The witness never blocks: the two endpoints are cut apart, the leader commits an entry
/// with the witness alone, then dies. The other endpoint is behind the witness, so the
/// witness refuses it its vote: the witness stands itself, brings the endpoint up to date,
/// and hands leadership over. The entry is kept and the endpoint leads.
#[tokio::test(flavor = "multi_thread")]
async fn a_witness_ahead_of_the_last_endpoint_leads_then_hands_over() {
    let witness = std::collections::HashMap::from([(3, vec!["--role".into(), "witness".into()])]);
    let proxied = Options {
        proxied: true,
        ..options()
    };
    let mut cluster = Cluster::start_with(proxied, Vec::new(), witness).await;
    let leader = wait_for("an endpoint to lead", Duration::from_secs(30), || async {
        cluster.leader().await.filter(|l| *l != 3)
    })
    .await;
    let other = if leader == 1 { 2 } else { 1 };
    let before = cluster
        .enqueue(other, b"everyone has this".to_vec(), 3, "h-0")
        .await;
    // Cut the endpoints apart: the leader commits with the witness alone.
    let proxy = cluster.proxy.as_ref().expect("proxied cluster");
    proxy.isolate(&[other], &[leader, other]);
    let only_witness = cluster
        .enqueue(leader, b"only the witness has this".to_vec(), 3, "h-1")
        .await;
    let on_other = cluster
        .get_json(other, &format!("/work/{only_witness}"))
        .await
        .unwrap();
    assert!(
        on_other.get("status").is_none(),
        "the other endpoint has no such item yet: {on_other}"
    );
    cluster.kill_node(leader);
    cluster.proxy.as_ref().unwrap().heal();
    let started = std::time::Instant::now();
    // Election timeouts here are 300 ms; measured here: 3.0-3.3 s (the witness waits out
    // the dead leader's lease, its own timeout, then its own lease before it hands over).
    wait_for("the endpoint to lead", Duration::from_secs(8), || async {
        cluster.leader().await.filter(|l| *l == other)
    })
    .await;
    eprintln!(
        "the endpoint leads {:?} after the leader died",
        started.elapsed()
    );
    for (id, key) in [(&before, "h-0"), (&only_witness, "h-1")] {
        let w = cluster
            .get_json(other, &format!("/work/{id}"))
            .await
            .unwrap();
        assert_eq!(w["status"], "queued", "{key}: {w}");
    }
    // A late or repeated handover unseats no one: the endpoint that leads refuses it, and a
    // witness never stands on request.
    let stale = hashq_proto::codec::encode(&hashq_proto::api::Handover { from: 3, term: 1 });
    for (id, status, code) in [(other, 409, "conflict"), (3, 421, "witness")] {
        let answer = cluster
            .http
            .post(format!("{}/internal/elect", cluster.url(id)))
            .bearer_auth(common::TOKEN)
            .header("content-type", "application/x-postcard")
            .body(stale.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), status);
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
    }
    let after = cluster.enqueue(other, b"new work".to_vec(), 3, "h-2").await;
    assert!(![before, only_witness].contains(&after));
    // The witness still serves no client.
    let answer = cluster
        .http
        .put(format!("{}/enqueue?iterations=1", cluster.url(3)))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 421);
}

/// A witness with the lowest id leaves forming the cluster to an endpoint (`initialize` would
/// make it stand for election at once), and an endpoint leads afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn a_witness_with_the_lowest_id_leaves_forming_and_leading_the_cluster_to_an_endpoint() {
    let witness = std::collections::HashMap::from([(1, vec!["--role".into(), "witness".into()])]);
    let mut cluster = Cluster::start_with(options(), Vec::new(), witness).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    assert_ne!(leader, 1, "an endpoint forms the cluster and leads it");
    let id = cluster.enqueue(2, b"abc".to_vec(), 3, "w-1").await;
    // Kill the leader: the other endpoint takes over with the witness's vote.
    cluster.kill_node(leader);
    let survivor = if leader == 2 { 3 } else { 2 };
    let later = cluster.enqueue(survivor, b"def".to_vec(), 3, "w-2").await;
    assert_ne!(id, later);
    wait_for(
        "the surviving endpoint to lead",
        Duration::from_secs(10),
        || async { cluster.leader().await.filter(|l| *l == survivor) },
    )
    .await;
}

/// `POST /pullCompleted?top=N&wait=W` with `key` on node `id`, within `timeout`: the items
/// it answered, or `None` when the client gave up first.
async fn waiting_pull(
    cluster: &Cluster,
    id: u64,
    wait: &str,
    key: &str,
    timeout: Duration,
) -> Option<Vec<(String, String)>> {
    let answer = cluster
        .http
        .post(format!(
            "{}/pullCompleted?top=100&wait={wait}",
            cluster.url(id)
        ))
        .header("idempotency-key", key)
        .timeout(timeout)
        .send()
        .await
        .ok()?;
    assert_eq!(answer.status(), 200, "waiting pull on node {id}");
    Some(common::pulled_items(&answer.json().await.ok()?))
}

/// Wall-clock milliseconds, as state-machine times are stamped on this machine.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Pulls waiting on the nodes, from their `hashq_pulls_waiting` gauges.
async fn pulls_waiting(cluster: &Cluster) -> u64 {
    let mut waiting = 0;
    for id in cluster.ids() {
        let metrics = cluster.metrics(id).await;
        waiting += metrics
            .lines()
            .find(|l| l.starts_with("hashq_pulls_waiting{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    waiting
}

/// Long polling a pull: a wait that ends takes nothing; pullers waiting on three nodes get
/// each result once, as soon as it lands; a retry under the same key gets the same items
/// even after newer results; a client that gives up takes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn waiting_pulls_answer_when_results_land_take_each_once_and_replay_under_their_key() {
    let mut cluster = Cluster::start(options()).await;
    let started = Instant::now();
    let empty = waiting_pull(&cluster, 2, "400ms", "quiet", Duration::from_secs(10)).await;
    assert_eq!(empty, Some(Vec::new()));
    assert!(started.elapsed() >= Duration::from_millis(350));

    // Three pullers, one per node, all waiting before anything is enqueued.
    let pullers: Vec<_> = cluster
        .ids()
        .into_iter()
        .map(|id| {
            let http = cluster.http.clone();
            let url = cluster.url(id);
            tokio::spawn(async move {
                let answer = http
                    .post(format!("{url}/pullCompleted?top=100&wait=20s"))
                    .header("idempotency-key", format!("waiter-{id}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status(), 200);
                let items: Value = answer.json().await.unwrap();
                let at = now_ms();
                (id, items, at)
            })
        })
        .collect();
    wait_for("three waiting pulls", Duration::from_secs(10), || async {
        (pulls_waiting(&cluster).await == 3).then_some(())
    })
    .await;
    let mut enqueued = Vec::new();
    for k in 0..3u64 {
        let data = payload(k, 300);
        let id = cluster
            .enqueue(1, data.clone(), 5, &format!("lp-{k}"))
            .await;
        enqueued.push((id, reference(&data, 5)));
    }
    cluster.start_worker(&[]);
    let mut taken: Vec<(String, String)> = Vec::new();
    let mut first_answer = u64::MAX;
    for puller in pullers {
        let (id, items, at) = tokio::time::timeout(Duration::from_secs(30), puller)
            .await
            .expect("every waiting pull answers")
            .unwrap();
        first_answer = first_answer.min(at);
        taken.extend(common::pulled_items(&items));
        eprintln!("node {id}'s waiting pull took {items}");
    }
    // Anything a raced puller did not get is still there for a plain pull, once completed
    // (the waiters answer as soon as the first results land).
    cluster.wait_for_status(1, "/counts/queued", json!(0)).await;
    cluster
        .wait_for_status(1, "/counts/running", json!(0))
        .await;
    taken.extend(cluster.pull(1, 100, "after-waiters").await);
    taken.sort();
    let mut expected = enqueued.clone();
    expected.sort();
    assert_eq!(taken, expected, "each result once, with its value");
    // The first answer came as soon as the first result landed, not at the end of a wait.
    let mut completed_at = u64::MAX;
    for (id, _) in &enqueued {
        let work = cluster.get_json(1, &format!("/work/{id}")).await.unwrap();
        completed_at = completed_at.min(work["completed_at_ms"].as_u64().unwrap());
    }
    eprintln!(
        "first waiting answer {} ms after the first completion",
        first_answer as i64 - completed_at as i64
    );
    assert!(
        first_answer < completed_at + 1_000,
        "answered {} ms after the first completion",
        first_answer as i64 - completed_at as i64
    );

    // A retry under a key that took items gets the same items, even with a newer result.
    let data = payload(10, 300);
    let newer = cluster.enqueue(2, data.clone(), 5, "lp-newer").await;
    let first = waiting_pull(&cluster, 3, "10s", "retried", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0], (newer.clone(), reference(&data, 5)));
    let newest = cluster.enqueue(2, payload(11, 300), 5, "lp-newest").await;
    cluster.wait_for_completed(1, &newest).await;
    let again = waiting_pull(&cluster, 1, "10s", "retried", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(again, first, "the same items under the same key");

    // A client that gives up while waiting takes nothing: its request ends with it.
    assert_eq!(
        cluster.pull(3, 100, "drain").await.len(),
        1,
        "the newest result"
    );
    // Node 2 has applied the drain (else it would see a result and take at once).
    cluster
        .wait_for_status(2, "/counts/completed", json!(0))
        .await;
    let given_up = waiting_pull(&cluster, 2, "20s", "gone", Duration::from_millis(300)).await;
    assert_eq!(given_up, None);
    wait_for(
        "the abandoned pull to end",
        Duration::from_secs(10),
        || async { (pulls_waiting(&cluster).await == 0).then_some(()) },
    )
    .await;
    let data = payload(12, 300);
    let last = cluster.enqueue(2, data.clone(), 5, "lp-last").await;
    cluster.wait_for_completed(1, &last).await;
    assert_eq!(
        cluster.pull(3, 100, "last").await,
        [(last, reference(&data, 5))],
        "the result is there for the next pull"
    );

    // The CLI waits too: `[]` when nothing comes, the result when one does.
    let cli_pull = |wait: &str| {
        std::process::Command::new(common::binary())
            .args(["pull", "--endpoints", &cluster.url(2), "--top", "5"])
            .args(["--wait", wait])
            .output()
            .expect("run hashq pull")
    };
    assert_eq!(
        common::json_answer(cli_pull("1s"), "hashq pull --wait"),
        json!([])
    );
    let data = payload(13, 300);
    let cli_item = cluster.enqueue(1, data.clone(), 5, "lp-cli").await;
    let answer = common::json_answer(cli_pull("30s"), "hashq pull --wait");
    assert_eq!(answer[0]["work_id"], cli_item.as_str());
    assert_eq!(answer[0]["value"], reference(&data, 5).as_str());
}

/// `GET path` on node `node`, `DELETE` or `POST` it: the status and the JSON body.
async fn call(cluster: &Cluster, method: Method, node: u64, path: &str) -> (u16, Value) {
    let answer = cluster
        .http
        .request(method, format!("{}{path}", cluster.url(node)))
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap())
}

/// Item `id` once it is final (a long poll of up to 20 s on node `node`).
async fn final_state(cluster: &Cluster, node: u64, id: &str) -> Value {
    let (status, work) = call(cluster, Method::GET, node, &format!("/work/{id}?wait=20s")).await;
    assert_eq!(status, 200, "{work}");
    work
}

/// The JSON lines a `hashq` command that must succeed printed.
fn json_lines(out: std::process::Output) -> Vec<Value> {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until item `id` has `status` (read at the leader through node 1).
async fn wait_for_item(cluster: &Cluster, id: &str, status: &str) {
    wait_for(
        &format!("item {id} to be {status}"),
        Duration::from_secs(20),
        || async {
            let w = cluster.get_json(1, &format!("/work/{id}")).await?;
            (w["status"] == status).then_some(())
        },
    )
    .await;
}

/// Cancel, retry and the listing by status, end to end with real workers. Leases of 3 s make
/// workers heartbeat every second; one attempt per item makes a lease that runs out kill it.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_the_worker_at_its_next_heartbeat_and_retry_runs_dead_and_cancelled_items_again(
) {
    let mut base = options();
    base.node_args = [
        "--lease",
        "3s",
        "--max-attempts",
        "1",
        "--max-iterations",
        "2000000000",
    ]
    .map(String::from)
    .to_vec();
    let mut cluster = Cluster::start(base).await;
    for id in cluster.ids() {
        cluster
            .wait_for_status(id, "/cluster_version", json!(5))
            .await;
    }
    // One item at a time, nothing leased ahead: a worker busy hashing takes nothing else.
    let one_at_a_time = [
        "--threads",
        "1",
        "--prefetch",
        "0",
        "--prefetch-window",
        "0s",
    ];

    // An item dies: its worker is frozen while it hashes, and its one lease runs out.
    let data = payload(21, 4096);
    let doomed = cluster.enqueue(1, data.clone(), 3_000_000, "doomed").await;
    let frozen = cluster.start_worker(&one_at_a_time);
    wait_for_item(&cluster, &doomed, "running").await;
    hashq_testkit::signal(cluster.worker_pid(frozen), "STOP");
    let work = final_state(&cluster, 2, &doomed).await;
    assert_eq!(work["status"], "dead", "{work}");
    assert_eq!(work["attempts"], 1);
    cluster.kill_worker(frozen);
    let (status, body) = call(&cluster, Method::DELETE, 3, &format!("/work/{doomed}")).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("not_cancellable")),
        "{body}"
    );
    let (status, dead) = call(&cluster, Method::GET, 3, "/work?status=dead").await;
    assert_eq!(status, 200, "{dead}");
    assert_eq!(dead["items"][0]["work_id"], doomed.as_str(), "{dead}");
    assert_eq!(dead["items"].as_array().unwrap().len(), 1, "{dead}");

    // A running item is cancelled: its worker hears it on its next heartbeat (every second)
    // and is free again, which the next item shows; no result is ever stored for it.
    let long = cluster
        .enqueue(2, payload(22, 100), 2_000_000_000, "long")
        .await;
    cluster.start_worker(&one_at_a_time);
    wait_for_item(&cluster, &long, "running").await;
    let cancelled_at = Instant::now();
    let (status, body) = call(&cluster, Method::DELETE, 3, &format!("/work/{long}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"work_id": long, "status": "cancelled"}));
    let quick_data = payload(23, 50);
    let quick = cluster.enqueue(1, quick_data.clone(), 10, "quick").await;
    let work = final_state(&cluster, 2, &quick).await;
    let freed_after = cancelled_at.elapsed();
    assert_eq!(work["status"], "completed", "{work}");
    assert_eq!(work["value"], reference(&quick_data, 10));
    println!("the worker took the next item {freed_after:?} after the cancel");
    assert!(
        freed_after < Duration::from_secs(3),
        "the worker went on hashing the cancelled item for {freed_after:?} (heartbeats every 1 s)"
    );
    // Idempotent; and still cancelled, with no value, after the worker moved on.
    let (status, body) = call(&cluster, Method::DELETE, 1, &format!("/work/{long}")).await;
    assert_eq!((status, &body["status"]), (200, &json!("cancelled")));
    let work = cluster.get_json(1, &format!("/work/{long}")).await.unwrap();
    assert_eq!(work["status"], "cancelled", "{work}");
    assert!(work.get("value").is_none(), "{work}");
    let (_, listed) = call(&cluster, Method::GET, 2, "/work?status=cancelled&limit=5").await;
    assert_eq!(listed["items"][0]["work_id"], long.as_str(), "{listed}");
    let (status, body) = call(&cluster, Method::DELETE, 1, &format!("/work/{quick}")).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("not_cancellable")),
        "{body}"
    );

    // The dead item is retried through the CLI and completes with the right value.
    let out = std::process::Command::new(common::binary())
        .args(["work", "--endpoints", &cluster.url(3), "retry", &doomed])
        .output()
        .expect("run hashq work retry");
    let answer = common::json_answer(out, "hashq work retry");
    assert!(
        answer["status"] == "queued" || answer["status"] == "running",
        "{answer}"
    );
    let work = final_state(&cluster, 2, &doomed).await;
    assert_eq!(work["status"], "completed", "{work}");
    assert_eq!(work["value"], reference(&data, 3_000_000));
    assert_eq!(work["attempts"], 1, "attempts start again from 0");
    let (status, body) = call(&cluster, Method::POST, 2, &format!("/work/{doomed}/retry")).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("not_retryable")),
        "{body}"
    );

    // The cancelled one runs again too; cancelled once more, it lists through the CLI.
    let (status, body) = call(&cluster, Method::POST, 1, &format!("/work/{long}/retry")).await;
    assert_eq!(status, 200, "{body}");
    wait_for_item(&cluster, &long, "running").await;
    let (status, _) = call(&cluster, Method::DELETE, 2, &format!("/work/{long}")).await;
    assert_eq!(status, 200);
    let out = std::process::Command::new(common::binary())
        .args([
            "work",
            "--endpoints",
            &cluster.url(1),
            "list",
            "--status",
            "cancelled",
        ])
        .output()
        .expect("run hashq work list");
    let lines = json_lines(out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["work_id"], long.as_str());
    assert_eq!(lines[0]["attempts"], 1);

    cluster
        .wait_for_status(3, "/counts/cancelled", json!(1))
        .await;
    let status = cluster.get_json(3, "/status").await.unwrap();
    assert_eq!(status["counts"]["dead"], 0, "{status}");
    assert_eq!(status["totals"]["cancelled"], 2, "{status}");
    assert_eq!(status["totals"]["retried"], 2, "{status}");
    let metrics = cluster.metrics(3).await;
    assert!(metrics.contains("status=\"cancelled\"} 1"), "{metrics}");
    assert!(metrics.contains("hashq_retried_total"), "{metrics}");
}

/// The CLI that waits: `hashq enqueue --wait` prints each result as it completes, and
/// `hashq pull --follow --out DIR` writes each result it takes to a file, taking a take that
/// an earlier run left unwritten again under its key.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_waits_for_results_and_follows_pulls_into_a_directory() {
    let mut cluster = Cluster::start(options()).await;
    cluster.start_worker(&[]);
    let files = tempfile::tempdir().unwrap();
    let mut expected = std::collections::BTreeMap::new();
    let mut paths = Vec::new();
    for i in 0..3u64 {
        let data = payload(40 + i, 700);
        let path = files.path().join(format!("f{i}.bin"));
        std::fs::write(&path, &data).unwrap();
        expected.insert(path.display().to_string(), reference(&data, 1000));
        paths.push(path);
    }
    let out = std::process::Command::new(common::binary())
        .args([
            "enqueue",
            "--endpoints",
            &cluster.url(2),
            "--iterations",
            "1000",
        ])
        .arg("--wait")
        .args(&paths)
        .output()
        .expect("run hashq enqueue --wait");
    let lines = json_lines(out);
    assert_eq!(lines.len(), 3, "{lines:?}");
    let mut ids = Vec::new();
    for line in &lines {
        assert_eq!(line["status"], "completed", "{line}");
        assert_eq!(
            line["value"].as_str(),
            expected
                .get(line["file"].as_str().unwrap())
                .map(String::as_str),
            "{line}"
        );
        ids.push(line["work_id"].as_str().unwrap().to_string());
    }

    // Follow until three results are taken, each written to its file.
    let dir = tempfile::tempdir().unwrap();
    let follow = |count: &str| {
        let mut command = std::process::Command::new(common::binary());
        command
            .args(["pull", "--endpoints", &cluster.url(3), "--top", "2"])
            .args(["--follow", "--count", count, "--out"])
            .arg(dir.path());
        common::output_within(command, Duration::from_secs(20))
    };
    let out = follow("3");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    for (id, line) in ids.iter().zip(&lines) {
        let written = std::fs::read_to_string(dir.path().join(format!("{id}.sha512"))).unwrap();
        assert_eq!(written.trim_end(), line["value"].as_str().unwrap());
    }
    assert!(!dir.path().join(".pull-key").exists());

    // A run that took results and died before writing them left its key behind: the next
    // run takes them again under it.
    let data = payload(50, 300);
    let id = cluster.enqueue(1, data.clone(), 5, "crashed").await;
    cluster.wait_for_completed(1, &id).await;
    std::fs::write(dir.path().join(".pull-key"), "cli-crashed-take").unwrap();
    let taken = cluster.pull(2, 10, "cli-crashed-take").await;
    assert_eq!(taken, [(id.clone(), reference(&data, 5))]);
    let out = follow("1");
    assert!(out.status.success(), "{out:?}");
    let written = std::fs::read_to_string(dir.path().join(format!("{id}.sha512"))).unwrap();
    assert_eq!(written.trim_end(), reference(&data, 5));
    assert!(!dir.path().join(".pull-key").exists());

    // Many files go in batches once the cluster takes them (version 4): ids in file order,
    // each item with its own file's payload. (The three files above, 2,100 bytes, are over
    // this cluster's --max-batch-bytes: they went one by one.)
    cluster
        .wait_for_status(2, "/cluster_version", json!(5))
        .await;
    let mut small = Vec::new();
    for i in 0..6u64 {
        let path = files.path().join(format!("small-{i}.bin"));
        std::fs::write(&path, payload(60 + i, 100)).unwrap();
        small.push(path);
    }
    let out = std::process::Command::new(common::binary())
        .args(["enqueue", "--endpoints", &cluster.url(2)])
        .args(["--iterations", "3", "--batch", "4", "--priority", "7"])
        .args(&small)
        .output()
        .expect("run hashq enqueue");
    let lines = json_lines(out);
    assert_eq!(lines.len(), 6, "{lines:?}");
    for (i, path) in small.iter().enumerate() {
        let line = lines
            .iter()
            .find(|l| l["file"] == path.display().to_string())
            .unwrap_or_else(|| panic!("no line for {}", path.display()));
        let id = line["work_id"].as_str().unwrap();
        let work = cluster.wait_for_completed(2, id).await;
        assert_eq!(
            work["value"],
            json!(reference(&payload(60 + i as u64, 100), 3))
        );
        assert_eq!(work["priority"], 7, "{work}");
    }
}

/// The iterations of item `i` of the batch test: they change every 100 parts, through a
/// text part `iterations` (the query gives the first 100 theirs).
fn batch_iterations(i: usize) -> u32 {
    (i / 100 % 3 + 1) as u32
}

/// `POST /enqueue/batch` of 500 items under `key` on `node`: the answer's status, body and
/// whether it was a replay; `None` when no answer came (the node died meanwhile).
async fn send_batch(http: &reqwest::Client, url: &str, key: &str) -> Option<(u16, Value, bool)> {
    let mut form = reqwest::multipart::Form::new();
    for i in 0..500usize {
        if i % 100 == 0 && i > 0 {
            form = form.text("iterations", batch_iterations(i).to_string());
        }
        form = form.part(
            "f",
            reqwest::multipart::Part::bytes(payload(i as u64, 40)).file_name(format!("{i}.bin")),
        );
    }
    let answer = http
        .post(format!(
            "{url}/enqueue/batch?iterations={}",
            batch_iterations(0)
        ))
        .header("idempotency-key", key)
        .multipart(form)
        .send()
        .await
        .ok()?;
    let status = answer.status().as_u16();
    let replayed = answer.headers().contains_key("idempotent-replayed");
    Some((status, answer.json().await.unwrap_or(Value::Null), replayed))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_500_is_all_or_nothing_when_its_leader_is_killed_and_its_key_replays_its_ids() {
    let mut cluster = Cluster::start(Options {
        node_args: Vec::new(),
        ..options()
    })
    .await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    for id in cluster.ids() {
        cluster
            .wait_for_status(id, "/cluster_version", json!(5))
            .await;
    }
    // The batch goes to the leader, which is SIGKILLed a moment later: before, during or
    // after its proposal, whichever it is, a retry under the key must find every item of
    // the batch or none.
    let http = cluster.http.clone();
    let url = cluster.url(leader);
    let first = tokio::spawn(async move { send_batch(&http, &url, "batch-of-500").await });
    tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 120)).await;
    cluster.kill_node(leader);
    let first = first.await.unwrap();
    eprintln!(
        "the batch's first answer, from the killed leader: {:?}",
        first.as_ref().map(|(status, _, _)| status)
    );
    let others: Vec<u64> = cluster.ids().into_iter().filter(|i| *i != leader).collect();
    let (ids, replayed) = wait_for(
        "the batch to be acknowledged under its key",
        Duration::from_secs(60),
        || async {
            for &node in &others {
                if let Some((200, body, replayed)) =
                    send_batch(&cluster.http, &cluster.url(node), "batch-of-500").await
                {
                    return Some((body["work_ids"].clone(), replayed));
                }
            }
            None
        },
    )
    .await;
    let ids: Vec<u64> = ids
        .as_array()
        .expect("work_ids")
        .iter()
        .map(|v| v.as_str().unwrap().parse().unwrap())
        .collect();
    eprintln!("the retry under the key was a replay (the first call was committed): {replayed}");
    assert_eq!(ids.len(), 500, "first answer: {first:?}");
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "the ids are consecutive, in part order"
    );
    if let Some((200, body, _)) = &first {
        assert_eq!(
            body["work_ids"][0].as_str(),
            Some(ids[0].to_string().as_str())
        );
    }
    // Exactly the batch is stored: not a part of it, not twice.
    let now_leading = cluster.wait_for_leader(Duration::from_secs(30)).await;
    cluster
        .wait_for_status(now_leading, "/counts/queued", json!(500))
        .await;
    let replay = send_batch(&cluster.http, &cluster.url(now_leading), "batch-of-500")
        .await
        .expect("an answer");
    assert_eq!(replay.0, 200);
    assert!(replay.2, "a retry under the key is a replay");
    assert_eq!(replay.1["work_ids"][499], json!(ids[499].to_string()));

    // Every item runs with its own payload and iterations.
    cluster.start_node(leader);
    cluster.start_worker(&[]);
    let mut results = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for attempt in 0.. {
        if results.len() == 500 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of 500 results pulled",
            results.len()
        );
        // A key of its own per take: a key that took nothing replays nothing.
        let key = format!("batch-pull-{attempt}");
        results.extend(cluster.pull(others[0], 1000, &key).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            results[&id.to_string()],
            reference(&payload(i as u64, 40), batch_iterations(i)),
            "item {i} (work {id})"
        );
    }
    cluster
        .wait_for_status(others[0], "/counts/queued", json!(0))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_worker_runs_high_priority_items_before_the_low_ones_queued_before_them() {
    let mut cluster = Cluster::start(Options {
        node_args: Vec::new(),
        ..options()
    })
    .await;
    for id in cluster.ids() {
        cluster
            .wait_for_status(id, "/cluster_version", json!(5))
            .await;
    }
    // 100 low (0) in one batch, then 10 high (9) one by one, before any worker runs.
    let mut form = reqwest::multipart::Form::new();
    for i in 0..100u64 {
        form = form.part(
            "f",
            reqwest::multipart::Part::bytes(payload(i, 32)).file_name(format!("{i}")),
        );
    }
    let answer: Value = cluster
        .http
        .post(format!(
            "{}/enqueue/batch?iterations=20000&priority=0",
            cluster.url(1)
        ))
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let low: Vec<String> = answer["work_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mut high = Vec::new();
    for i in 0..10u64 {
        let answer: Value = cluster
            .http
            .put(format!(
                "{}/enqueue?iterations=20000&priority=9",
                cluster.url(2)
            ))
            .body(payload(1000 + i, 32))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        high.push(answer["work_id"].as_str().unwrap().to_string());
    }
    cluster
        .wait_for_status(3, "/counts/queued_by_priority", json!({"9": 10, "0": 100}))
        .await;
    let metrics = cluster.metrics(3).await;
    assert!(
        metrics.contains("hashq_queued_by_priority{node=\"3\",priority=\"9\"} 10"),
        "{metrics}"
    );

    // One worker, with its prefetch: the high ones first.
    cluster.start_worker(&[]);
    cluster
        .wait_for_status(1, "/counts/completed", json!(110))
        .await;
    let completed_at = |ids: &[String]| {
        let cluster = &cluster;
        let ids = ids.to_vec();
        async move {
            let mut at = Vec::new();
            for id in ids {
                let w = cluster.wait_for_completed(1, &id).await;
                at.push(w["completed_at_ms"].as_u64().unwrap());
            }
            at
        }
    };
    let high_done = completed_at(&high).await;
    let last_low = completed_at(&low[50..]).await;
    let (latest_high, earliest_low) = (
        *high_done.iter().max().unwrap(),
        *last_low.iter().min().unwrap(),
    );
    assert!(
        latest_high <= earliest_low,
        "the last high item completed at {latest_high}, one of the last 50 low ones at {earliest_low}"
    );
    assert!(
        cluster.get_json(1, "/status").await.unwrap()["counts"]["queued_by_priority"]
            .as_object()
            .unwrap()
            .is_empty()
    );
}

/// `hashq bench`'s own load generator, whose figures BENCHMARKS.md reports: every enqueue
/// it counts as acknowledged is in the queue, and none failed.
#[tokio::test(flavor = "multi_thread")]
async fn the_bench_counts_exactly_the_enqueues_the_cluster_acknowledged() {
    let output = tokio::process::Command::new(common::binary())
        .args(["bench", "--enqueue-only", "--seconds", "2"])
        .args(["--runs", "1:1024,8:4096"])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("the bench ends within 2 minutes")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let runs = report["enqueue"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{report}");
    let mut acknowledged = 0;
    for run in runs {
        assert_eq!(run["errors"], 0, "{run}");
        let acks = run["acknowledged"].as_u64().unwrap();
        assert!(
            acks > 0 && run["per_second"].as_f64().unwrap() > 0.0,
            "{run}"
        );
        assert!(run["latency_ms"]["p50"].as_f64().unwrap() > 0.0, "{run}");
        // Every node synced its log and applied, each apply taking some time (a sync may not
        // on a RAM disk); the machine's shares are shares.
        let resources = &run["resources"];
        for (name, least) in [
            ("fsyncs_per_second_by_node", f64::MIN_POSITIVE),
            ("fsync_ms_mean_by_node", 0.0),
            ("apply_ms_mean_by_node", f64::MIN_POSITIVE),
        ] {
            let by_node = resources[name].as_array().unwrap();
            assert_eq!(by_node.len(), 3, "{run}");
            assert!(
                by_node.iter().all(|v| v.as_f64().unwrap() >= least),
                "{name}: {run}"
            );
        }
        // The leader's batches took time from proposal to answer (a follower proposes none,
        // but a leader may change in a run).
        let commits = resources["commit_ms_mean_by_node"].as_array().unwrap();
        assert!(commits.iter().any(|ms| ms.as_f64().unwrap() > 0.0), "{run}");
        let machine = &resources["machine_cpu_percent"];
        let shares = ["idle", "iowait", "steal"].map(|k| machine[k].as_f64().unwrap());
        assert!(shares.iter().all(|s| (0.0..=100.0).contains(s)), "{run}");
        assert!(shares.iter().sum::<f64>() <= 100.0, "{run}");
        acknowledged += acks;
    }
    assert_eq!(report["memory"]["backlog_items"], acknowledged, "{report}");
}
