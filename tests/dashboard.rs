//! The dashboard in a real headless Chromium, and the OpenAPI document.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{payload, Cluster, Options};
use serde_json::Value;

/// The Chromium binary: `HASHQ_CHROMIUM`, or the first of the usual names on PATH.
fn chromium() -> String {
    if let Ok(path) = std::env::var("HASHQ_CHROMIUM") {
        return path;
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {name}"))
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return name.to_string();
        }
    }
    panic!("no Chromium found: scripts/test.sh installs Debian's chromium; or set HASHQ_CHROMIUM");
}

/// Loads `url` in headless Chromium, lets its scripts run for a few (virtual) seconds, and
/// returns the DOM as it is then.
fn rendered_dom(url: &str) -> String {
    let output = headless(url, &["--dump-dom"]);
    String::from_utf8(output.stdout).expect("utf-8 DOM")
}

/// Loads `url` the same way and saves what a 1280x1600 window shows as a PNG at `path`.
fn screenshot(url: &str, path: &std::path::Path) {
    let to = format!("--screenshot={}", path.display());
    headless(url, &["--window-size=1280,1600", "--hide-scrollbars", &to]);
}

/// Runs headless Chromium on `url` with `extra` flags, which must succeed.
fn headless(url: &str, extra: &[&str]) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .args(extra)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The width and height of a PNG file, from its header.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

/// The text content of the element with `id` in a dumped DOM.
fn text_of(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\"");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let open_end = start + dom[start..].find('>').unwrap() + 1;
    let close = open_end + dom[open_end..].find('<').unwrap();
    dom[open_end..close].trim().to_string()
}

/// The points of the polyline with `id` in a dumped DOM.
fn points_of(dom: &str, id: &str) -> Vec<(f64, f64)> {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let element = &dom[start..start + dom[start..].find('>').unwrap()];
    let Some(at) = element.find("points=\"") else {
        return Vec::new();
    };
    let points = &element[at + 8..];
    let points = &points[..points.find('"').unwrap()];
    points
        .split_whitespace()
        .map(|p| {
            let (x, y) = p.split_once(',').expect("x,y");
            (x.parse().unwrap(), y.parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_the_live_cluster_in_a_real_browser() {
    let mut cluster = Cluster::start(Options::default()).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    for i in 0..5u64 {
        cluster
            .enqueue(1, payload(i, 2048), 10, &format!("d-{i}"))
            .await;
    }
    cluster.start_worker(&[]);
    cluster
        .wait_for_status(2, "/counts/completed", serde_json::json!(5))
        .await;
    cluster
        .enqueue(3, payload(9, 100), 10_000_000, "long-one")
        .await;
    // A cancelled item: listed with the command that retries it.
    let cancelled = cluster
        .enqueue(3, payload(10, 100), 10_000_000, "cancel-me")
        .await;
    cluster
        .wait_for_status(leader, "/cluster_version", serde_json::json!(5))
        .await;
    let answer = cluster
        .http
        .delete(format!("{}/work/{cancelled}", cluster.url(leader)))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let dom = rendered_dom(&format!("{}/", cluster.url(follower)));
    assert_eq!(
        text_of(&dom, "leader"),
        format!("node {leader}"),
        "leader shown"
    );
    assert!(
        text_of(&dom, "conn").starts_with("live"),
        "the page says it is live"
    );
    assert_eq!(text_of(&dom, "completed"), "5");
    assert_eq!(text_of(&dom, "dead"), "0");
    assert_eq!(text_of(&dom, "cancelled"), "1");
    let given_up = &dom[dom.find("id=\"given_up\"").unwrap()..];
    let given_up = &given_up[..given_up.find("</tbody>").unwrap()];
    assert_eq!(given_up.matches("<tr>").count(), 1, "{given_up}");
    assert!(
        given_up.contains(&format!("hashq work retry {cancelled}")),
        "{given_up}"
    );
    assert_eq!(
        text_of(&dom, "workers"),
        "0",
        "a hand-started worker holds no budget slot"
    );
    assert_eq!(text_of(&dom, "external"), "1");
    assert_eq!(text_of(&dom, "budget"), "8");
    assert!(text_of(&dom, "self").contains(&format!("node {follower}")));
    // Three members, one row each, the leader marked as such.
    let members = &dom[dom.find("id=\"members\"").unwrap()..];
    let members = &members[..members.find("</tbody>").unwrap()];
    assert_eq!(members.matches("<tr>").count(), 3, "{members}");
    assert!(members.contains("leader"));
    // The charts carry points: one per poll (rates from the second poll on).
    for (line, at_least) in [
        ("line_queued", 3),
        ("line_workers", 3),
        ("line_budget", 3),
        ("line_enq", 2),
        ("line_done", 2),
    ] {
        let points = points_of(&dom, line);
        assert!(
            points.len() >= at_least,
            "chart {line} has {} points: {points:?}",
            points.len()
        );
        for (x, y) in &points {
            assert!(
                (0.0..=600.0).contains(x) && (0.0..=100.0).contains(y),
                "{line}: ({x}, {y})"
            );
        }
        // A page just opened spans what it has polled, not ten empty minutes.
        let first = points.iter().map(|(x, _)| *x).fold(600.0, f64::min);
        assert!(first < 450.0, "{line} starts at x = {first}: {points:?}");
    }
    // The budget line sits at the top of its chart (the largest value shown is 8).
    assert_eq!(text_of(&dom, "max_workers"), "8");
    assert!(points_of(&dom, "line_budget")
        .iter()
        .all(|(_, y)| *y < 10.0));
    // The worker list shows the hand-started worker.
    let workers = &dom[dom.find("id=\"worker_list\"").unwrap()..];
    let workers = &workers[..workers.find("</tbody>").unwrap()];
    assert_eq!(workers.matches("<tr>").count(), 1, "{workers}");

    // What a reader sees: a screenshot, kept for humans (its path is printed). A blank or
    // unstyled page compresses to a few KiB; the tables, charts and text take far more.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    screenshot(&format!("{}/", cluster.url(follower)), &shot);
    let png = std::fs::read(&shot).expect("the screenshot");
    assert_eq!(png_size(&png), (1280, 1600));
    assert!(png.len() > 40_000, "a {} byte screenshot", png.len());
    println!("dashboard screenshot: {}", shot.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_describes_every_client_route() {
    let cluster = Cluster::start(Options {
        nodes: 1,
        ..Options::default()
    })
    .await;
    let doc: Value = cluster
        .get_json(1, "/openapi.json")
        .await
        .expect("openapi.json");
    assert_eq!(doc["openapi"], "3.0.3");
    for (path, method) in [
        ("/enqueue", "put"),
        ("/enqueue/batch", "post"),
        ("/pullCompleted", "post"),
        ("/work/{id}", "delete"),
        ("/work/{id}/retry", "post"),
        ("/work", "get"),
        ("/work/{id}", "get"),
        ("/status", "get"),
        ("/metrics", "get"),
        ("/health", "get"),
        ("/admin/max-workers", "post"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not documented"
        );
    }
    let enqueue = &doc["paths"]["/enqueue"]["put"]["responses"];
    for status in ["200", "400", "413", "429", "503"] {
        assert!(
            enqueue[status].is_object(),
            "enqueue's {status} is not documented"
        );
    }
    let batch = &doc["paths"]["/enqueue/batch"]["post"];
    for status in ["200", "400", "409", "413", "415", "429", "503"] {
        assert!(
            batch["responses"][status].is_object(),
            "the batch's {status} is not documented"
        );
    }
    assert_eq!(
        batch["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["f"]
            ["x-max-items"],
        1000,
        "the batch's limit is this node's --max-batch-items"
    );
    // The routes it documents answer as documented.
    let metrics = cluster.metrics(1).await;
    assert!(
        metrics.contains("hashq_items{node=\"1\",status=\"queued\"} 0"),
        "{metrics}"
    );
}
