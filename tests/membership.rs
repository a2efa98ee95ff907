//! Membership changes end to end, through the CLI, under client load: grow 3 -> 5 (the new
//! nodes join after the log was purged, so they catch up from a snapshot as learners before
//! they vote), shrink 5 -> 3 removing the leader among others, then replace a SIGKILLed node
//! with a new id and address. Nothing acknowledged is lost, and the clients see no error but
//! retryable 503s (and refused connections from the nodes that were stopped).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{enqueue_once, payload, wait_for, Attempt, Cluster, Options};
use serde_json::Value;

/// What the load client saw.
#[derive(Default)]
struct Seen {
    /// key, payload length, work id.
    acked: Vec<(String, usize, String)>,
    /// Answers that were neither 200 nor 503.
    bad: Vec<String>,
    retries: u64,
}

/// Enqueues keyed items one after another on the nodes in `urls` (round robin), each
/// retried with its key until acknowledged.
async fn load(urls: Arc<Mutex<Vec<String>>>, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>) {
    let http = reqwest::Client::new();
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let key = format!("m-{n}");
        let body = payload(n as u64, 200 + n % 800);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut attempt = 0usize;
        loop {
            let url = {
                let urls = urls.lock().unwrap();
                urls[(n + attempt) % urls.len()].clone()
            };
            attempt += 1;
            // A node stopped by the test refuses connections (its address leaves `urls`
            // right after): a retry like a 503.
            match enqueue_once(&http, &url, &key, &body).await {
                Attempt::Acked(id) => {
                    seen.lock().unwrap().acked.push((key, body.len(), id));
                    break;
                }
                Attempt::Retry => {}
                Attempt::Failed(why) => seen.lock().unwrap().bad.push(why),
            }
            assert!(Instant::now() < deadline, "{key} never acknowledged");
            seen.lock().unwrap().retries += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The voters as the leader sees them, once every running node agrees on a leader.
async fn voters(cluster: &Cluster) -> BTreeSet<u64> {
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let status = cluster.get_json(leader, "/status").await.unwrap();
    status["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["voter"] == true)
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

/// The URLs of every node but `gone`.
fn remaining(cluster: &Cluster, gone: &[u64]) -> Vec<String> {
    cluster
        .ids()
        .into_iter()
        .filter(|id| !gone.contains(id))
        .map(|id| cluster.url(id))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn grow_shrink_and_replace_under_load_lose_nothing() {
    let options = Options {
        node_args: ["--snapshot-every", "40"].map(String::from).to_vec(),
        ..Options::default()
    };
    let mut cluster = Cluster::start(options).await;
    let urls = Arc::new(Mutex::new(
        cluster.ids().iter().map(|id| cluster.url(*id)).collect(),
    ));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = tokio::spawn(load(urls.clone(), seen.clone(), stop.clone()));
    // Enough entries that the log is purged behind a snapshot before anyone joins.
    wait_for(
        "200 acknowledged enqueues",
        Duration::from_secs(60),
        || async { (seen.lock().unwrap().acked.len() >= 200).then_some(()) },
    )
    .await;

    // Grow 3 -> 5: each newcomer catches up from a snapshot as a learner, then votes.
    let four = cluster.join_node().await;
    let five = cluster.join_node().await;
    assert_eq!(
        voters(&cluster).await,
        BTreeSet::from([1, 2, 3, four, five])
    );
    for id in [four, five] {
        // Its log says so (the line may land just after the leader counted it caught up).
        let what = format!("node {id} to have installed a snapshot (was the log not purged?)");
        wait_for(&what, Duration::from_secs(10), || async {
            let log = std::fs::read_to_string(cluster.node_log(id)).ok()?;
            log.contains("snapshot installed").then_some(())
        })
        .await;
    }
    urls.lock()
        .unwrap()
        .extend([four, five].map(|id| cluster.url(id)));

    // Shrink 5 -> 3: the leader first, then a founding follower.
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    *urls.lock().unwrap() = remaining(&cluster, &[leader]);
    cluster.remove_node(leader);
    // It handed leadership to a caught-up endpoint first, and the new leader removed it.
    let log = std::fs::read_to_string(cluster.node_log(leader)).unwrap_or_default();
    assert!(
        log.contains("handed leadership over before being removed"),
        "the removed leader {leader} did not hand over first"
    );
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    *urls.lock().unwrap() = remaining(&cluster, &[leader, follower]);
    cluster.remove_node(follower);
    let three: BTreeSet<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| ![leader, follower].contains(id))
        .collect();
    assert_eq!(voters(&cluster).await, three);

    // Refused: removing a voter when the others would not be a live majority.
    let now_leading = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let dead = *three.iter().find(|id| **id != now_leading).unwrap();
    cluster.kill_node(dead);
    *urls.lock().unwrap() = remaining(&cluster, &[leader, follower, dead]);
    let survivor = *three
        .iter()
        .find(|id| **id != dead && cluster.node_running(**id))
        .unwrap();
    let other = *three
        .iter()
        .find(|id| **id != dead && **id != survivor)
        .unwrap();
    wait_for(
        "the leader to see the killed node down",
        Duration::from_secs(20),
        || async {
            let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
            let status = cluster.get_json(leader, "/status").await?;
            let down = status["members"]
                .as_array()?
                .iter()
                .any(|m| m["id"].as_u64() == Some(dead) && m["state"] == "unreachable");
            down.then_some(())
        },
    )
    .await;
    let refused = cluster.admin_cli(&["remove", &other.to_string()]);
    assert!(
        !refused.status.success(),
        "a change leaving no live majority was accepted"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("majority"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Replace the SIGKILLed node with a new id and address.
    let six = cluster.replace_node(dead).await;
    let expected: BTreeSet<u64> = three
        .iter()
        .copied()
        .filter(|id| *id != dead)
        .chain([six])
        .collect();
    assert_eq!(voters(&cluster).await, expected);
    urls.lock().unwrap().push(cluster.url(six));

    // A little more load on the final membership, then check everything acknowledged.
    let before = seen.lock().unwrap().acked.len();
    wait_for(
        "more acknowledged enqueues",
        Duration::from_secs(30),
        || async { (seen.lock().unwrap().acked.len() >= before + 50).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    client.await.unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(
        seen.bad.is_empty(),
        "answers other than 200 and 503: {:?}",
        seen.bad
    );
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let mut ids_seen = BTreeSet::new();
    for (key, len, id) in &seen.acked {
        assert!(ids_seen.insert(id.clone()), "{id} acknowledged twice");
        let w = cluster
            .get_json(leader, &format!("/work/{id}"))
            .await
            .unwrap();
        assert_eq!(w["status"], "queued", "{key}: {w}");
        assert_eq!(w["payload_bytes"].as_u64(), Some(*len as u64), "{key}: {w}");
    }
    eprintln!(
        "membership: {} enqueues acknowledged, {} retried attempts",
        seen.acked.len(),
        seen.retries
    );
}

/// When a majority is lost for good, `hashq recover --force-new-cluster` makes the most
/// complete survivor (here the leader) a one-voter cluster with everything it had, which then
/// grows again with `hashq cluster add`.
#[tokio::test(flavor = "multi_thread")]
async fn a_survivor_of_a_lost_majority_is_recovered_into_a_new_cluster() {
    let mut cluster = Cluster::start(Options::default()).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let mut acked = Vec::new();
    for n in 0..20u64 {
        let key = format!("r-{n}");
        acked.push(cluster.enqueue(leader, payload(n, 300), 1, &key).await);
    }
    for id in cluster.ids() {
        cluster.kill_node(id);
    }
    for id in cluster.ids().into_iter().filter(|id| *id != leader) {
        std::fs::remove_dir_all(cluster.data_dir(id)).unwrap();
    }
    let recover = |confirm: bool| {
        let mut cmd = std::process::Command::new(common::binary());
        cmd.arg("recover")
            .arg("--data-dir")
            .arg(cluster.data_dir(leader))
            .args([
                "--id",
                &leader.to_string(),
                "--addr",
                &cluster.peer_addr(leader),
            ]);
        if confirm {
            cmd.arg("--force-new-cluster");
        }
        cmd.output().expect("run hashq recover")
    };
    assert!(
        !recover(false).status.success(),
        "recovered without --force-new-cluster"
    );
    let out = recover(true);
    assert!(
        out.status.success(),
        "hashq recover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["previous_members"],
        serde_json::json!([1, 2, 3]),
        "{report}"
    );

    cluster.start_node(leader);
    assert_eq!(
        cluster.wait_for_leader(Duration::from_secs(30)).await,
        leader
    );
    assert_eq!(voters(&cluster).await, BTreeSet::from([leader]));
    for id in &acked {
        let w = cluster
            .get_json(leader, &format!("/work/{id}"))
            .await
            .unwrap();
        assert_eq!(w["status"], "queued", "{w}");
    }
    cluster
        .enqueue(leader, b"after".to_vec(), 1, "r-after")
        .await;
    let a = cluster.join_node().await;
    let b = cluster.join_node().await;
    assert_eq!(voters(&cluster).await, BTreeSet::from([leader, a, b]));
}

/// Every member's `/status` `cluster_version`, by node.
async fn cluster_versions(cluster: &Cluster) -> Vec<(u64, Option<u64>)> {
    let mut seen = Vec::new();
    for id in cluster.members() {
        let status = cluster.get_json(id, "/status").await;
        seen.push((id, status.and_then(|s| s["cluster_version"].as_u64())));
    }
    seen
}

/// The cluster version (what a rolling upgrade may start writing) rises only once every
/// member offers it: node 3 pinned to version 1 holds the cluster there while the others
/// offer this build's latest (and the requests of version 3, cancel and retry, are refused);
/// restarted without the pin, the cluster moves to the latest on every node; from then on a
/// node that offers only 1 is refused as a new member.
#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_version_rises_once_every_member_offers_it_and_never_admits_an_older_node() {
    let pin = || vec!["--cluster-version-max".to_string(), "1".to_string()];
    let options = Options {
        launch_workers: false,
        ..Options::default()
    };
    let mut cluster =
        Cluster::start_with(options, Vec::new(), [(3, pin())].into_iter().collect()).await;
    // Every node has answered a probe of every other (the leader's status shows them all
    // up) and a few housekeeping rounds have passed: still version 1 everywhere.
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    wait_for("every member seen up", Duration::from_secs(20), || async {
        let status = cluster.get_json(leader, "/status").await?;
        let members = status["members"].as_array()?;
        members
            .iter()
            .all(|m| m["state"] != "unreachable" && m["cluster_version"].is_u64())
            .then_some(())
    })
    .await;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for (id, version) in cluster_versions(&cluster).await {
            assert!(
                version.is_none() || version == Some(1),
                "node {id} runs {version:?} while node 3 offers only 1"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let status = cluster.get_json(leader, "/status").await.unwrap();
    let latest = status["cluster_version_offered"].as_u64().unwrap();
    assert!(latest >= 3, "this build offers {latest}");
    let offers: Vec<(u64, u64)> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["cluster_version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        offers,
        [(1, latest), (2, latest), (3, 1)],
        "the members' offers, as the leader sees them"
    );
    // What versions 3 and 4 brought is refused meanwhile: node 3 could not apply it.
    let id = cluster.enqueue(1, b"kept".to_vec(), 1, "v-kept").await;
    for (method, path) in [
        (reqwest::Method::DELETE, format!("/work/{id}")),
        (reqwest::Method::POST, format!("/work/{id}/retry")),
    ] {
        let answer = cluster
            .http
            .request(method, format!("{}{path}", cluster.url(2)))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 409, "{path}");
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(body["error"]["code"], "cluster_version_too_old", "{body}");
    }
    // So is a batch (version 4).
    let (http, batch_url) = (
        cluster.http.clone(),
        format!("{}/enqueue/batch?iterations=1", cluster.url(2)),
    );
    let batch = || {
        let form = reqwest::multipart::Form::new()
            .part("f", reqwest::multipart::Part::bytes(b"one".to_vec()))
            .part("f", reqwest::multipart::Part::bytes(b"two".to_vec()));
        http.post(&batch_url).multipart(form).send()
    };
    let answer = batch().await.unwrap();
    assert_eq!(answer.status(), 409);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "cluster_version_too_old", "{body}");

    cluster.set_node_extra(3, Vec::new());
    cluster.stop_node(3);
    cluster.start_node(3);
    wait_for(
        "every member to run the latest cluster version",
        Duration::from_secs(30),
        || async {
            cluster_versions(&cluster)
                .await
                .iter()
                .all(|(_, v)| *v == Some(latest))
                .then_some(())
        },
    )
    .await;
    let answer = cluster
        .http
        .delete(format!("{}/work/{id}", cluster.url(2)))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "cancel once the cluster runs 3");
    let answer = batch().await.unwrap();
    assert_eq!(answer.status(), 200, "a batch once the cluster runs 4");

    let (id, addr) = cluster
        .start_joining_with(0, &["--cluster-version-max", "1"])
        .await;
    let out = cluster.admin_cli(&["add", "--id", &id.to_string(), "--addr", &addr]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "an older node was admitted: {text}");
    assert!(
        text.contains(&format!("the cluster runs {latest}")),
        "the refusal says why: {text}"
    );
    let status = cluster
        .get_json(leader_now(&cluster).await, "/status")
        .await
        .unwrap();
    let members: Vec<u64> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        members,
        [1, 2, 3],
        "node {id} is no member, not even a learner"
    );
}

/// The leader among the founding nodes (a refused joiner never follows one).
async fn leader_now(cluster: &Cluster) -> u64 {
    wait_for("a leader", Duration::from_secs(30), || async {
        cluster.get_json(1, "/status").await?["leader"].as_u64()
    })
    .await
}
