//! Load that must not starve Raft or the clients that behave: thousands of slow, idle and
//! header-trickling connections against two nodes while a normal client works through the
//! third, and a burst of concurrent enqueues against few request slots. Bounded in time and
//! in connections; every connection is closed when the test ends.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cluster, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Headers sent at once, then a 1 MB body at one byte per second.
    SlowBody,
    /// Connected, sends nothing.
    Idle,
    /// A request line, then one header byte per second.
    TrickleHeaders,
}

/// How long the server let each attacking connection live, by kind.
type Lifetimes = Arc<Mutex<Vec<(Kind, Duration)>>>;

/// Opens connection after connection of `kind` to `port` until `stop`, recording how long
/// the server kept each one open.
async fn attacker(port: u16, kind: Kind, stop: Arc<AtomicBool>, lifetimes: Lifetimes) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let opened = Instant::now();
        let head: &[u8] = match kind {
            Kind::SlowBody => {
                b"PUT /enqueue?iterations=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
            }
            Kind::Idle => b"",
            Kind::TrickleHeaders => b"PUT /enqueue?iterations=1 HTTP/1.1\r\nHost: x\r\n",
        };
        if stream.write_all(head).await.is_err() {
            continue;
        }
        let mut buf = [0u8; 4096];
        let closed = loop {
            if stop.load(Ordering::Relaxed) {
                break false;
            }
            // One byte a second (nothing for an idle connection); watch for the close.
            match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                // An answer (408, 503): the server closes after it.
                Ok(Ok(_)) => continue,
                Err(_) => {}
            }
            let byte: &[u8] = match kind {
                Kind::SlowBody => b"x",
                Kind::Idle => b"",
                Kind::TrickleHeaders => b"a",
            };
            if !byte.is_empty() && stream.write_all(byte).await.is_err() {
                break true;
            }
        };
        if closed {
            lifetimes.lock().unwrap().push((kind, opened.elapsed()));
            // Come back after a moment, as a persistent attacker would.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn term(cluster: &Cluster, node: u64) -> u64 {
    cluster.get_json(node, "/health").await.expect("health")["term"]
        .as_u64()
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_idle_and_trickling_connections_neither_start_elections_nor_starve_clients() {
    let mut cluster = Cluster::start(Options::default()).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let ids = cluster.ids();
    let follower = *ids.iter().find(|id| **id != leader).unwrap();
    let third = *ids
        .iter()
        .find(|id| **id != leader && **id != follower)
        .unwrap();
    let term_before = term(&cluster, third).await;

    let stop = Arc::new(AtomicBool::new(false));
    let lifetimes: Lifetimes = Arc::default();
    let mut attackers = Vec::new();
    for node in [leader, follower] {
        let port = cluster.ports[node as usize - 1];
        for (kind, n) in [
            (Kind::SlowBody, 1000),
            (Kind::Idle, 100),
            (Kind::TrickleHeaders, 100),
        ] {
            for _ in 0..n {
                attackers.push(tokio::spawn(attacker(
                    port,
                    kind,
                    stop.clone(),
                    lifetimes.clone(),
                )));
            }
        }
    }

    // The normal client: enqueues and pulls through the third node for 30 s.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let url = cluster.url(third);
    let started = Instant::now();
    let mut latencies = Vec::new();
    let (mut ok, mut failed) = (0usize, Vec::new());
    let mut max_rss_kib = 0;
    let mut last_rss = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(30) {
        i += 1;
        let sent = Instant::now();
        let answer = if i.is_multiple_of(10) {
            http.post(format!("{url}/pullCompleted?top=10"))
                .send()
                .await
        } else {
            http.put(format!("{url}/enqueue?iterations=1"))
                .header("idempotency-key", format!("normal-{i}"))
                .body(vec![7u8; 1024])
                .send()
                .await
        };
        let took = sent.elapsed();
        latencies.push(took);
        match answer {
            Ok(a) if a.status().is_success() => ok += 1,
            Ok(a) => failed.push(format!("{} after {took:?}", a.status())),
            Err(e) => failed.push(format!("{e} after {took:?}")),
        }
        if last_rss.elapsed() >= Duration::from_secs(1) {
            last_rss = Instant::now();
            for node in [leader, follower] {
                max_rss_kib = max_rss_kib.max(cluster.node_rss_kib(node).unwrap_or(0));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        let _ = a.await;
    }
    let term_after = term(&cluster, third).await;

    latencies.sort();
    let total = ok + failed.len();
    let (p50, p99, max) = (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        *latencies.last().unwrap(),
    );
    let lifetimes = lifetimes.lock().unwrap().clone();
    let longest = |kind| {
        lifetimes
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default()
    };
    let count = |kind| lifetimes.iter().filter(|(k, _)| *k == kind).count();
    eprintln!(
        "OVERLOAD normal client: {ok}/{total} ok, p50 {p50:?}, p99 {p99:?}, max {max:?}; \
         node RSS max {} MiB; term {term_before} -> {term_after}; closed by the server: \
         slow bodies {} (longest {:?}), idle {} ({:?}), trickling headers {} ({:?})",
        max_rss_kib / 1024,
        count(Kind::SlowBody),
        longest(Kind::SlowBody),
        count(Kind::Idle),
        longest(Kind::Idle),
        count(Kind::TrickleHeaders),
        longest(Kind::TrickleHeaders),
    );
    assert_eq!(term_before, term_after, "an election happened under load");
    assert!(
        ok * 100 >= total * 99,
        "only {ok} of {total} normal requests succeeded: {failed:?}"
    );
    assert!(
        max < Duration::from_secs(2),
        "a normal request took {max:?}"
    );
    assert!(max_rss_kib < 300 * 1024, "a node reached {max_rss_kib} KiB");
    // Each kind was closed by the server, within its timeout (plus a second of slack for the
    // attacker's own one-second steps): slow bodies by the minimum rate after the 2 s grace
    // (or at once when the body budget was full), idle and trickling ones by the 10 s header
    // timeout.
    for (kind, bound) in [
        (Kind::SlowBody, Duration::from_secs(5)),
        (Kind::Idle, Duration::from_secs(12)),
        (Kind::TrickleHeaders, Duration::from_secs(12)),
    ] {
        assert!(
            count(kind) > 0,
            "the server never closed a {kind:?} connection"
        );
        assert!(
            longest(kind) <= bound,
            "a {kind:?} connection lived {:?}",
            longest(kind)
        );
    }
    for node in cluster.ids() {
        assert!(cluster.node_alive(node), "node {node} exited");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_against_few_request_slots_gets_fast_answers_and_no_election() {
    let cluster = Cluster::start(Options {
        node_args: vec!["--max-connections".into(), "64".into()],
        ..Options::default()
    })
    .await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let term_before = term(&cluster, leader).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..2000u64 {
        let url = cluster.url(1 + i % 3);
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let status = http
                .put(format!("{url}/enqueue?iterations=1"))
                .body(vec![1u8; 256])
                .send()
                .await
                .map(|a| a.status().as_u16())
                .unwrap_or(0);
            (status, sent.elapsed())
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let slowest = answers.iter().map(|(_, d)| *d).max().unwrap();
    let odd: Vec<_> = answers
        .iter()
        .filter(|(s, _)| ![200, 429, 503].contains(s))
        .collect();
    eprintln!("BURST 2000 enqueues: {ok} ok, slowest answer {slowest:?}");
    assert!(odd.is_empty(), "answers other than 200/429/503: {odd:?}");
    assert!(
        slowest < Duration::from_secs(2),
        "an answer took {slowest:?}"
    );
    assert!(ok >= 1000, "only {ok} of 2000 succeeded");
    assert_eq!(
        term(&cluster, leader).await,
        term_before,
        "an election happened"
    );
}
