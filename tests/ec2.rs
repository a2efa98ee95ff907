//! The `ec2` launcher, the workers' EC2 parent check and `scripts/deploy-ec2.sh`, end to end
//! against `moto_server` (a real EC2 API on loopback; `scripts/test.sh` installs it).
//!
//! Nodes are real `hashq node --launcher ec2` processes pointed at moto. A [`Hypervisor`]
//! plays EC2 for the worker instances they start: for each new instance it reads the user
//! data, fetches the binary the way the script does (`GET /internal/binary` with the token
//! from the user data), and runs the script's `ExecStart` with the instance's id as the
//! handle; it kills the worker when the instance is terminated, and terminates the instance
//! when the worker exits (the unit's `SuccessAction=poweroff` with
//! `InstanceInitiatedShutdownBehavior=terminate`). The endpoints' own instances are fake
//! instances registered in moto and tagged as endpoints.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2::config::Credentials;
use aws_sdk_ec2::types::{Filter, InstanceStateName, ResourceType, Tag, TagSpecification};
use base64::Engine as _;
use common::workload::{workers, SharedPayloads};
use common::{free_port, wait_for, Cluster, Options, ADMIN_TOKEN, TOKEN, WORKER_TOKEN};
use serde_json::Value;

/// Dummy credentials for the emulator (it accepts any); the product reads none of its own.
const ACCESS_KEY: &str = "moto-test-access-key";
const SECRET_KEY: &str = "moto-test-secret-key";
const REGION: &str = "us-east-1";

/// A `moto_server` on a free loopback port, killed on drop.
struct Moto {
    child: Child,
    url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    async fn start() -> Moto {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        let port = free_port();
        let out = File::create(&log).unwrap();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect(
                "moto_server is not installed: pip install 'moto[server]' (scripts/test.sh does)",
            );
        let moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        wait_for("moto_server to answer", Duration::from_secs(30), || async {
            let answer = http
                .get(format!("{}/moto-api/", moto.url))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .ok()?;
            answer.status().is_success().then_some(())
        })
        .await;
        moto
    }

    fn client(&self) -> aws_sdk_ec2::Client {
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new(REGION))
            .endpoint_url(&self.url)
            .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
            .build();
        aws_sdk_ec2::Client::from_conf(config)
    }

    /// Runs the AWS CLI against moto and parses its JSON answer.
    fn aws(&self, args: &[&str]) -> Value {
        let out = Command::new("aws")
            .args(["--endpoint-url", &self.url, "--output", "json"])
            .args(args)
            .envs(aws_env())
            .output()
            .expect("the AWS CLI is not installed: pip install awscli (scripts/test.sh does)");
        assert!(
            out.status.success(),
            "aws {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("JSON from the AWS CLI")
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- moto_server (last lines) ---");
            for line in &lines[lines.len().saturating_sub(20)..] {
                eprintln!("{line}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment every AWS client of these tests gets: dummy keys, a region, and no IMDS
/// (nothing here may try the link-local metadata address).
fn aws_env() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_DEFAULT_REGION", REGION),
        ("AWS_REGION", REGION),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec()
}

fn filter(name: &str, values: &[&str]) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.iter().map(|v| v.to_string()).collect()))
        .build()
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

fn tag_value<'a>(tags: &'a [Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// One instance as the tests look at it.
#[derive(Clone, Debug)]
struct Seen {
    id: String,
    state: InstanceStateName,
    tags: BTreeMap<String, String>,
}

impl Seen {
    fn live(&self) -> bool {
        matches!(
            self.state,
            InstanceStateName::Pending | InstanceStateName::Running
        )
    }
}

/// Every instance with these tags, in any state.
async fn instances(ec2: &aws_sdk_ec2::Client, tags: &[(&str, &str)]) -> Vec<Seen> {
    try_instances(ec2, tags).await.expect("DescribeInstances")
}

async fn try_instances(
    ec2: &aws_sdk_ec2::Client,
    tags: &[(&str, &str)],
) -> Result<Vec<Seen>, String> {
    let mut request = ec2.describe_instances();
    for (k, v) in tags {
        request = request.filters(filter(&format!("tag:{k}"), &[v]));
    }
    let mut pages = request.into_paginator().send();
    let mut seen = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| format!("DescribeInstances: {e:?}"))?;
        for i in page.reservations().iter().flat_map(|r| r.instances()) {
            seen.push(Seen {
                id: i.instance_id().unwrap_or_default().to_string(),
                state: i
                    .state()
                    .and_then(|s| s.name())
                    .cloned()
                    .unwrap_or(InstanceStateName::Pending),
                tags: i
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                    .collect(),
            });
        }
    }
    Ok(seen)
}

/// Starts one instance with these tags (an endpoint's stand-in, or a stray).
async fn run_instance(ec2: &aws_sdk_ec2::Client, tags: &[(&str, &str)]) -> String {
    let tags: Vec<Tag> = tags.iter().map(|(k, v)| tag(k, v)).collect();
    let out = ec2
        .run_instances()
        .image_id("ami-12345678")
        .min_count(1)
        .max_count(1)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .set_tags(Some(tags))
                .build(),
        )
        .send()
        .await
        .expect("RunInstances");
    out.instances()[0].instance_id().unwrap().to_string()
}

async fn terminate(ec2: &aws_sdk_ec2::Client, id: &str) {
    ec2.terminate_instances()
        .instance_ids(id)
        .send()
        .await
        .expect("TerminateInstances");
}

async fn user_data(ec2: &aws_sdk_ec2::Client, id: &str) -> String {
    let out = ec2
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .expect("DescribeInstanceAttribute");
    let encoded = out
        .user_data()
        .and_then(|u| u.value())
        .unwrap_or_default()
        .to_string();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64 user data"),
    )
    .expect("UTF-8 user data")
}

/// What a worker instance's user data says to run.
#[derive(Debug)]
struct BootPlan {
    env: Vec<(String, String)>,
    binary_urls: Vec<String>,
    args: Vec<String>,
}

/// Reads the parts of the user data script a worker instance acts on: the environment
/// file, the binary's URLs and the unit's `ExecStart`.
fn parse_user_data(script: &str, instance: &str) -> Result<BootPlan, String> {
    let mut lines = script.lines();
    let mut env = Vec::new();
    if lines.by_ref().any(|l| l.ends_with("<<'HASHQ_ENV'")) {
        for line in lines.by_ref().take_while(|l| *l != "HASHQ_ENV") {
            let (k, v) = line.split_once('=').ok_or(format!("bad env line {line}"))?;
            env.push((k.to_string(), v.to_string()));
        }
    } else {
        return Err("no environment file in the user data".into());
    }
    let binary_urls = script
        .lines()
        .find_map(|l| l.strip_prefix("binary_urls='"))
        .and_then(|l| l.strip_suffix('\''))
        .ok_or("no binary_urls in the user data")?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let exec = script
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .ok_or("no ExecStart in the user data")?;
    let args = exec
        .split_whitespace()
        .skip(1)
        .map(|a| a.replace("${HASHQ_HANDLE}", instance))
        .collect();
    Ok(BootPlan {
        env,
        binary_urls,
        args,
    })
}

/// A worker instance the hypervisor booted.
struct Booted {
    child: Option<Child>,
    log: PathBuf,
}

#[derive(Default)]
struct HypervisorState {
    booted: HashMap<String, Booted>,
    /// Instances whose worker exited, so the hypervisor terminated them.
    powered_off: HashSet<String>,
    errors: Vec<String>,
}

/// Plays EC2 for the worker instances of one cluster (see the file's doc).
struct Hypervisor {
    state: Arc<Mutex<HypervisorState>>,
    stop: Arc<AtomicBool>,
    /// The most worker instances pending or running at once.
    max_live: Arc<AtomicUsize>,
    task: Option<tokio::task::JoinHandle<()>>,
    dir: tempfile::TempDir,
    /// Where a worker's orphan shutdown command writes its instance id.
    marker: PathBuf,
}

impl Hypervisor {
    fn start(ec2: aws_sdk_ec2::Client, cluster: &str) -> Hypervisor {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("shutdowns");
        let state = Arc::new(Mutex::new(HypervisorState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let max_live = Arc::new(AtomicUsize::new(0));
        let cluster = cluster.to_string();
        let (s, st, m, d, mk) = (
            state.clone(),
            stop.clone(),
            max_live.clone(),
            dir.path().to_path_buf(),
            marker.clone(),
        );
        let task = tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !st.load(Ordering::SeqCst) {
                let seen = match try_instances(
                    &ec2,
                    &[("hashq:cluster", &cluster), ("hashq:role", "worker")],
                )
                .await
                {
                    Ok(seen) => seen,
                    Err(e) => {
                        s.lock().unwrap().errors.push(e);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                m.fetch_max(seen.iter().filter(|i| i.live()).count(), Ordering::SeqCst);
                for instance in &seen {
                    let known = s.lock().unwrap().booted.contains_key(&instance.id);
                    if instance.live() && !known {
                        let booted = boot(&ec2, &http, &instance.id, &d, &mk).await;
                        let mut state = s.lock().unwrap();
                        match booted {
                            Ok(b) => {
                                state.booted.insert(instance.id.clone(), b);
                            }
                            Err(e) => {
                                state.errors.push(format!("{}: {e}", instance.id));
                                state.booted.insert(
                                    instance.id.clone(),
                                    Booted {
                                        child: None,
                                        log: PathBuf::new(),
                                    },
                                );
                            }
                        }
                    }
                    if !instance.live() {
                        // Terminated (by the cluster or the test): the machine is gone. A
                        // worker that had already exited powered off by itself, even if the
                        // cluster's reconciler terminated the instance first.
                        let mut state = s.lock().unwrap();
                        let child = state
                            .booted
                            .get_mut(&instance.id)
                            .and_then(|b| b.child.take());
                        if let Some(mut child) = child {
                            if matches!(child.try_wait(), Ok(Some(_))) {
                                state.powered_off.insert(instance.id.clone());
                            } else {
                                let _ = child.kill();
                                let _ = child.wait();
                            }
                        }
                    }
                }
                // A worker that exited powers its instance off, which terminates it.
                let exited: Vec<String> = {
                    let mut state = s.lock().unwrap();
                    let mut exited = Vec::new();
                    for (id, b) in state.booted.iter_mut() {
                        if let Some(child) = b.child.as_mut() {
                            if matches!(child.try_wait(), Ok(Some(_))) {
                                b.child = None;
                                exited.push(id.clone());
                            }
                        }
                    }
                    state.powered_off.extend(exited.iter().cloned());
                    exited
                };
                for id in exited {
                    if let Err(e) = ec2.terminate_instances().instance_ids(&id).send().await {
                        s.lock()
                            .unwrap()
                            .errors
                            .push(format!("terminating {id}: {e:?}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Hypervisor {
            state,
            stop,
            max_live,
            task: Some(task),
            dir,
            marker,
        }
    }

    /// Instances whose worker process runs.
    fn running(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .booted
            .iter()
            .filter(|(_, b)| b.child.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn booted(&self) -> usize {
        self.state.lock().unwrap().booted.len()
    }

    fn powered_off(&self) -> HashSet<String> {
        self.state.lock().unwrap().powered_off.clone()
    }

    fn errors(&self) -> Vec<String> {
        self.state.lock().unwrap().errors.clone()
    }

    /// How each booted worker ended, from its log (`worker exiting reason=...`).
    fn exit_reasons(&self) -> HashMap<String, String> {
        let state = self.state.lock().unwrap();
        state
            .booted
            .iter()
            .filter_map(|(id, b)| {
                let log = std::fs::read_to_string(&b.log).ok()?;
                let reason = log
                    .lines()
                    .find_map(|l| l.split_once("worker exiting reason=").map(|(_, r)| r))?;
                Some((id.clone(), reason.trim().to_string()))
            })
            .collect()
    }

    /// Instance ids the workers' orphan shutdown command recorded.
    fn shutdowns(&self) -> HashSet<String> {
        std::fs::read_to_string(&self.marker)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let panicking = std::thread::panicking();
        for (id, b) in state.booted.iter_mut() {
            if let Some(mut child) = b.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if panicking && b.log.exists() {
                let text = std::fs::read_to_string(&b.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- worker instance {id} ---");
                for line in &lines[lines.len().saturating_sub(25)..] {
                    eprintln!("{line}");
                }
            }
        }
        if panicking {
            eprintln!(
                "hypervisor errors: {:?} ({})",
                state.errors,
                self.dir.path().display()
            );
        }
    }
}

/// Boots one worker instance: user data, binary, `ExecStart`.
async fn boot(
    ec2: &aws_sdk_ec2::Client,
    http: &reqwest::Client,
    instance: &str,
    dir: &Path,
    marker: &Path,
) -> Result<Booted, String> {
    let script = user_data(ec2, instance).await;
    let plan = parse_user_data(&script, instance)?;
    let token = plan
        .env
        .iter()
        .find(|(k, _)| k == "HASHQ_WORKER_TOKEN")
        .map(|(_, v)| v.clone())
        .ok_or("no token in the user data")?;
    // The script tries each URL in turn; so does the hypervisor.
    let mut binary = None;
    for url in &plan.binary_urls {
        let answer = http.get(url).bearer_auth(&token).send().await;
        if let Ok(a) = answer {
            if a.status().is_success() {
                if let Ok(bytes) = a.bytes().await {
                    binary = Some(bytes);
                    break;
                }
            }
        }
    }
    let binary = binary.ok_or("no endpoint served the binary")?;
    let path = dir.join(format!("hashq-{instance}"));
    std::fs::write(&path, &binary).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let log = dir.join(format!("{instance}.log"));
    let out = File::create(&log).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&path);
    // systemd starts the unit with a clean environment plus its EnvironmentFile; the
    // script adds the handle and the thread count. The orphan shutdown records the instance
    // instead of powering this machine off.
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .env("HASHQ_HANDLE", instance)
        .env("HASHQ_THREADS", "1")
        .env("HASHQ_LOG_FORMAT", "text")
        .env(
            "HASHQ_ORPHAN_SHUTDOWN_COMMAND",
            format!("echo {instance} >> {}", marker.display()),
        )
        .envs(aws_env())
        .env("RUST_LOG", "info")
        .args(&plan.args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out);
    // A file just written may still be open for writing in a child forked meanwhile
    // (ETXTBSY): try again shortly.
    let mut tries = 0;
    let child = loop {
        match cmd.spawn() {
            Ok(child) => break child,
            Err(e) if e.raw_os_error() == Some(ETXTBSY) && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(format!("cannot start the worker: {e}")),
        }
    };
    // The running process keeps its copy; the file is not needed any more.
    let _ = std::fs::remove_file(&path);
    Ok(Booted {
        child: Some(child),
        log,
    })
}

/// Linux's "text file busy".
const ETXTBSY: i32 = 26;

/// The emulated account: a subnet, a security group, the worker instance profile, and one
/// fake endpoint instance per node.
struct Account {
    subnet: String,
    group: String,
    profile: String,
    endpoints: BTreeMap<u64, String>,
}

async fn account(moto: &Moto, ec2: &aws_sdk_ec2::Client, cluster: &str, nodes: u64) -> Account {
    let subnets = ec2
        .describe_subnets()
        .send()
        .await
        .expect("DescribeSubnets");
    let subnet = subnets.subnets()[0].subnet_id().unwrap().to_string();
    let vpc = subnets.subnets()[0].vpc_id().unwrap().to_string();
    let group = ec2
        .create_security_group()
        .group_name(format!("{cluster}-workers"))
        .description("hashq test workers")
        .vpc_id(vpc)
        .send()
        .await
        .expect("CreateSecurityGroup")
        .group_id()
        .unwrap()
        .to_string();
    let profile = format!("{cluster}-worker");
    moto.aws(&[
        "iam",
        "create-instance-profile",
        "--instance-profile-name",
        &profile,
    ]);
    let mut endpoints = BTreeMap::new();
    for id in 1..=nodes {
        let node = id.to_string();
        let instance = run_instance(
            ec2,
            &[
                ("hashq:cluster", cluster),
                ("hashq:role", "endpoint"),
                ("hashq:node-id", &node),
            ],
        )
        .await;
        endpoints.insert(id, instance);
    }
    Account {
        subnet,
        group,
        profile,
        endpoints,
    }
}

/// Flags of `hashq node --launcher ec2` against moto.
fn ec2_node_args(moto: &Moto, account: &Account, cluster: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--launcher",
        "ec2",
        "--cluster-name",
        cluster,
        "--ec2-region",
        REGION,
        "--ec2-endpoint-url",
        &moto.url,
        "--ec2-ami",
        "ami-12345678",
        "--ec2-instance-type",
        "t3.small",
        "--ec2-subnet",
        &account.subnet,
        "--ec2-security-group",
        &account.group,
        "--ec2-instance-profile",
        &account.profile,
        "--ec2-parent-check-every",
        "1s",
        "--reconcile-every",
        "1s",
        "--scale-up-wait",
        "300ms",
        "--scale-up-interval",
        "200ms",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

async fn ec2_cluster(
    moto: &Moto,
    account: &Account,
    cluster: &str,
    nodes: usize,
    extra: &[&str],
) -> Cluster {
    let per_node: HashMap<u64, Vec<String>> = account
        .endpoints
        .iter()
        .map(|(id, instance)| (*id, vec!["--ec2-instance-id".to_string(), instance.clone()]))
        .collect();
    Cluster::start_with(
        Options {
            nodes,
            node_args: ec2_node_args(moto, account, cluster, extra),
            launch_workers: false,
            ..Options::default()
        },
        aws_env(),
        per_node,
    )
    .await
}

/// Items share four 2 KiB payloads.
const ITEMS: SharedPayloads = SharedPayloads {
    distinct: 4,
    len: 2048,
};

/// Enqueues items `range` spread over every node.
async fn enqueue_items(
    cluster: &Cluster,
    range: std::ops::Range<u64>,
    iterations: u32,
) -> Vec<(String, u64)> {
    ITEMS
        .enqueue(cluster, &cluster.ids(), range, iterations)
        .await
}

async fn set_max_workers(cluster: &Cluster, max: u32) {
    let answer = cluster
        .http
        .post(format!("{}/admin/max-workers", cluster.url(1)))
        .bearer_auth(ADMIN_TOKEN)
        .body(format!("{{\"max\":{max}}}"))
        .send()
        .await
        .expect("set max workers");
    assert!(answer.status().is_success(), "{}", answer.status());
}

#[tokio::test(flavor = "multi_thread")]
async fn backlog_launches_tagged_worker_instances_within_the_budget_and_idle_ones_terminate() {
    let moto = Moto::start().await;
    let ec2 = moto.client();
    let name = "e2e-launch";
    let account = account(&moto, &ec2, name, 3).await;
    let cluster = ec2_cluster(
        &moto,
        &account,
        name,
        3,
        &[
            "--max-workers",
            "2",
            "--worker-idle-timeout",
            "3s",
            "--worker-orphan-timeout",
            "20s",
            "--lease",
            "3s",
            "--worker-lost-after",
            "3s",
        ],
    )
    .await;

    // The binary route is the cluster's: no token, no binary.
    let anonymous = cluster
        .http
        .get(format!("{}/internal/binary", cluster.url(2)))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);

    let hypervisor = Hypervisor::start(ec2.clone(), name);
    const ITERATIONS: u32 = 400_000;
    let ids = enqueue_items(&cluster, 0..40, ITERATIONS).await;
    wait_for(
        "two worker instances booted",
        Duration::from_secs(40),
        || async { (hypervisor.booted() >= 2).then_some(()) },
    )
    .await;
    ITEMS
        .pull_all(&cluster, &ids, ITERATIONS, Duration::from_secs(90))
        .await;
    assert!(hypervisor.errors().is_empty(), "{:?}", hypervisor.errors());

    // Every worker instance is tagged and configured as the launcher promises.
    let launched = instances(&ec2, &[("hashq:cluster", name), ("hashq:role", "worker")]).await;
    assert!(!launched.is_empty());
    let endpoint_instances: HashSet<&String> = account.endpoints.values().collect();
    for instance in &launched {
        let worker_id = instance.tags.get("hashq:worker-id").expect("worker-id tag");
        assert!(worker_id.parse::<u64>().is_ok(), "{worker_id}");
        let parent = instance.tags.get("hashq:parent").expect("parent tag");
        assert!(endpoint_instances.contains(parent), "{parent}");
        let parent_node: u64 = instance.tags["hashq:parent-node"].parse().unwrap();
        assert_eq!(&account.endpoints[&parent_node], parent);
        let described = ec2
            .describe_instances()
            .instance_ids(&instance.id)
            .send()
            .await
            .unwrap();
        let i = &described.reservations()[0].instances()[0];
        assert_eq!(i.image_id(), Some("ami-12345678"));
        assert_eq!(i.instance_type().map(|t| t.as_str()), Some("t3.small"));
        assert_eq!(i.subnet_id(), Some(account.subnet.as_str()));
        assert!(i
            .security_groups()
            .iter()
            .any(|g| g.group_id() == Some(account.group.as_str())));
        assert!(i
            .iam_instance_profile()
            .and_then(|p| p.arn())
            .is_some_and(|arn| arn.ends_with(&format!("/{}", account.profile))));
        assert_eq!(tag_value(i.tags(), "hashq:role"), Some("worker"));
        let behaviour = ec2
            .describe_instance_attribute()
            .instance_id(&instance.id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::InstanceInitiatedShutdownBehavior)
            .send()
            .await
            .unwrap();
        assert_eq!(
            behaviour
                .instance_initiated_shutdown_behavior()
                .and_then(|b| b.value()),
            Some("terminate")
        );
        let script = user_data(&ec2, &instance.id).await;
        // Workers hold the worker credential, never the peer or admin one.
        assert!(script.contains(&format!("HASHQ_WORKER_TOKEN={WORKER_TOKEN}")));
        assert!(!script.contains(TOKEN) && !script.contains(ADMIN_TOKEN));
        assert!(script.contains(&format!("--worker-id {worker_id} --parent {parent_node}")));
        assert!(script.contains("--shutdown-on-orphan"));
        for secret in [ACCESS_KEY, SECRET_KEY, "AWS_ACCESS_KEY", "AWS_SECRET"] {
            assert!(!script.contains(secret), "user data carries {secret}");
        }
    }

    // Idle workers exit, their instances power off and terminate, their slots are free.
    wait_for(
        "idle worker instances to terminate",
        Duration::from_secs(40),
        || async {
            let all = instances(&ec2, &[("hashq:cluster", name), ("hashq:role", "worker")]).await;
            let status = cluster.get_json(2, "/status").await?;
            (all.iter().all(|i| i.state == InstanceStateName::Terminated)
                && workers(&status).is_empty()
                && hypervisor.running().is_empty())
            .then_some(())
        },
    )
    .await;
    // Each worker ended by itself, idle (its instance may have been terminated by the
    // reconciler a moment before its own power-off: a freed slot's instance is a stray).
    let launched = instances(&ec2, &[("hashq:cluster", name), ("hashq:role", "worker")]).await;
    let reasons = hypervisor.exit_reasons();
    for instance in &launched {
        assert_eq!(
            reasons.get(&instance.id).map(String::as_str),
            Some("idle"),
            "{}: {reasons:?}",
            instance.id
        );
    }
    assert_eq!(
        hypervisor.max_live.load(Ordering::SeqCst),
        2,
        "the budget is 2 and the backlog wanted more"
    );
    // The endpoints' own instances are none of the launcher's business.
    for endpoint in instances(&ec2, &[("hashq:cluster", name), ("hashq:role", "endpoint")]).await {
        assert_eq!(
            endpoint.state,
            InstanceStateName::Running,
            "{}",
            endpoint.id
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_follow_the_endpoint_instances_reparent_and_stop_when_none_is_left() {
    let moto = Moto::start().await;
    let ec2 = moto.client();
    let name = "e2e-parent";
    let account = account(&moto, &ec2, name, 3).await;
    let cluster = ec2_cluster(
        &moto,
        &account,
        name,
        3,
        &[
            "--max-workers",
            "2",
            "--worker-idle-timeout",
            "60s",
            "--worker-orphan-timeout",
            "60s",
        ],
    )
    .await;
    let hypervisor = Hypervisor::start(ec2.clone(), name);
    // Enough work to keep both workers busy through the test.
    enqueue_items(&cluster, 0..16, 10_000_000).await;
    let running: Vec<Value> = wait_for("two running workers", Duration::from_secs(40), || async {
        let list = workers(&cluster.get_json(1, "/status").await?);
        let running: Vec<Value> = list
            .into_iter()
            .filter(|w| {
                w["state"] == "running" && w["handle"].as_str().is_some_and(|h| h.starts_with("i-"))
            })
            .collect();
        (running.len() == 2).then_some(running)
    })
    .await;
    let parent = running[0]["parent"].as_u64().unwrap();
    let orphans: HashSet<String> = running
        .iter()
        .filter(|w| w["parent"].as_u64() == Some(parent))
        .map(|w| w["id"].as_str().unwrap().to_string())
        .collect();

    // The parent's instance goes away (its node process still answers: only EC2 says so).
    terminate(&ec2, &account.endpoints[&parent]).await;
    wait_for(
        "the orphans to re-parent",
        Duration::from_secs(30),
        || async {
            let list = workers(&cluster.get_json(2, "/status").await?);
            let moved = orphans.iter().all(|id| {
                list.iter().any(|w| {
                    w["id"] == id.as_str() && w["parent"].as_u64().is_some_and(|p| p != parent)
                })
            });
            moved.then_some(())
        },
    )
    .await;
    assert_eq!(
        hypervisor.running().len(),
        2,
        "re-parenting stops no worker"
    );
    assert!(hypervisor.shutdowns().is_empty());

    // No endpoint instance left: the workers stop and shut their machines down. The budget
    // goes to zero first, so the nodes (still up as processes) launch no replacements.
    set_max_workers(&cluster, 0).await;
    let booted: HashSet<String> = hypervisor.running().into_iter().collect();
    for instance in account.endpoints.values() {
        terminate(&ec2, instance).await;
    }
    wait_for("the workers to stop", Duration::from_secs(30), || async {
        hypervisor.running().is_empty().then_some(())
    })
    .await;
    assert_eq!(
        hypervisor.shutdowns(),
        booted,
        "each worker ran its orphan shutdown"
    );
    let reasons = hypervisor.exit_reasons();
    for instance in &booted {
        assert_eq!(
            reasons.get(instance).map(String::as_str),
            Some("orphaned"),
            "{reasons:?}"
        );
    }
    // Their exits powered the instances off (the hypervisor, not the cluster, ended them).
    assert_eq!(hypervisor.powered_off(), booted);
    wait_for(
        "their instances to terminate",
        Duration::from_secs(15),
        || async {
            let all = instances(&ec2, &[("hashq:cluster", name), ("hashq:role", "worker")]).await;
            all.iter()
                .all(|i| i.state == InstanceStateName::Terminated)
                .then_some(())
        },
    )
    .await;
    assert!(hypervisor.errors().is_empty(), "{:?}", hypervisor.errors());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reconciler_terminates_strays_and_frees_slots_of_vanished_instances() {
    let moto = Moto::start().await;
    let ec2 = moto.client();
    let name = "e2e-reconcile";
    let account = account(&moto, &ec2, name, 1).await;
    // Slow loss detection, so only the reconciler can free a slot within the deadlines below.
    let cluster = ec2_cluster(
        &moto,
        &account,
        name,
        1,
        &[
            "--max-workers",
            "1",
            "--worker-idle-timeout",
            "60s",
            "--lease",
            "60s",
            "--worker-lost-after",
            "90s",
        ],
    )
    .await;
    let stray = run_instance(&ec2, &[("hashq:cluster", name), ("hashq:role", "worker")]).await;
    let other_cluster = run_instance(
        &ec2,
        &[("hashq:cluster", "someone-else"), ("hashq:role", "worker")],
    )
    .await;
    wait_for(
        "the stray to be terminated",
        Duration::from_secs(20),
        || async {
            let all = instances(&ec2, &[("hashq:cluster", name)]).await;
            all.iter()
                .any(|i| i.id == stray && i.state == InstanceStateName::Terminated)
                .then_some(())
        },
    )
    .await;

    let hypervisor = Hypervisor::start(ec2.clone(), name);
    enqueue_items(&cluster, 0..6, 10_000_000).await;
    let (first, instance) = wait_for("a running worker", Duration::from_secs(30), || async {
        let list = workers(&cluster.get_json(1, "/status").await?);
        list.iter().find_map(|w| {
            let handle = w["handle"].as_str()?;
            (w["state"] == "running" && handle.starts_with("i-"))
                .then(|| (w["id"].as_str().unwrap().to_string(), handle.to_string()))
        })
    })
    .await;
    // Its instance is terminated behind the cluster's back: no goodbye, no heartbeat
    // silence long enough to be declared lost yet.
    terminate(&ec2, &instance).await;
    let replacement = wait_for(
        "the slot to be freed and a replacement launched",
        Duration::from_secs(30),
        || async {
            let list = workers(&cluster.get_json(1, "/status").await?);
            (!list.iter().any(|w| w["id"] == first.as_str()))
                .then(|| {
                    list.into_iter().find(|w| {
                        w["state"] == "running"
                            && w["handle"]
                                .as_str()
                                .is_some_and(|h| h.starts_with("i-") && h != instance)
                    })
                })
                .flatten()
        },
    )
    .await;
    assert_ne!(replacement["id"], first.as_str());
    let status = cluster.get_json(1, "/status").await.unwrap();
    assert!(
        workers(&status).len() <= 1,
        "the budget of 1 holds: {status}"
    );

    // Other clusters' instances are never touched.
    let others = instances(&ec2, &[("hashq:cluster", "someone-else")]).await;
    assert!(others.iter().any(|i| i.id == other_cluster && i.live()));
    set_max_workers(&cluster, 0).await;
    assert!(hypervisor.errors().is_empty(), "{:?}", hypervisor.errors());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_launch_frees_its_slot_and_shows_in_status() {
    let moto = Moto::start().await;
    let ec2 = moto.client();
    let name = "e2e-refused";
    let mut account = account(&moto, &ec2, name, 1).await;
    // The emulator, like EC2, refuses an instance profile that does not exist.
    account.profile = "no-such-profile".into();
    let cluster = ec2_cluster(&moto, &account, name, 1, &["--max-workers", "1"]).await;
    enqueue_items(&cluster, 0..2, 1000).await;
    let status = wait_for(
        "a launch error in /status",
        Duration::from_secs(30),
        || async {
            let status = cluster.get_json(1, "/status").await?;
            let errors = status["workers"]["launch_errors"].as_array()?;
            (!errors.is_empty()).then_some(status)
        },
    )
    .await;
    let error = status["workers"]["launch_errors"][0].as_str().unwrap();
    assert!(error.contains("RunInstances"), "{error}");
    assert!(
        !error.contains(SECRET_KEY) && !error.contains(TOKEN),
        "{error}"
    );
    // The slot was given back, and the node keeps serving.
    wait_for("the slot to be free", Duration::from_secs(10), || async {
        let status = cluster.get_json(1, "/status").await?;
        workers(&status).is_empty().then_some(())
    })
    .await;
    let launched = instances(&ec2, &[("hashq:cluster", name), ("hashq:role", "worker")]).await;
    assert!(launched.is_empty(), "{launched:?}");
}

/// Runs `scripts/deploy-ec2.sh` against moto.
fn deploy_output(moto: &Moto, args: &[&str]) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deploy-ec2.sh");
    Command::new("bash")
        .arg(script)
        .args(["--endpoint-url", &moto.url, "--region", REGION])
        .args(args)
        .envs(aws_env())
        .output()
        .expect("run deploy-ec2.sh")
}

/// Runs `scripts/deploy-ec2.sh` against moto, which must succeed: its standard output.
fn deploy(moto: &Moto, args: &[&str]) -> String {
    let out = deploy_output(moto, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "deploy-ec2.sh {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Deploys cluster `name` against moto: two endpoints and a witness, state in `state_dir`,
/// no wait for a leader, then `extra` flags.
fn deploy_three_voters(moto: &Moto, name: &str, state_dir: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "--name",
        name,
        "--ami",
        "ami-12345678",
        "--binary-url",
        "https://downloads.example.com/hashq-x86_64",
        "--client-cidr",
        "198.51.100.0/24",
        "--endpoints",
        "2",
        "--witness",
        "1",
        "--state-dir",
        state_dir,
        "--no-wait",
    ];
    args.extend(extra);
    deploy(moto, &args)
}

/// The `HASHQ_*` variables a node's user data sets.
fn user_data_env(script: &str) -> HashMap<&str, &str> {
    script
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("HASHQ_"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_deploy_script_creates_the_cluster_and_destroy_removes_all_of_it() {
    let moto = Moto::start().await;
    let ec2 = moto.client();
    let name = "deploytest";
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_string();
    let output = deploy_three_voters(&moto, name, &state_dir, &["--max-workers", "5"]);

    // Two groups: clients reach the client port from the chosen CIDR only; the cluster port
    // is open only to members of the cluster's own group.
    let groups = ec2
        .describe_security_groups()
        .filters(filter("tag:hashq:cluster", &[name]))
        .send()
        .await
        .unwrap();
    let by_role: HashMap<&str, &aws_sdk_ec2::types::SecurityGroup> = groups
        .security_groups()
        .iter()
        .map(|g| (tag_value(g.tags(), "hashq:role").unwrap_or(""), g))
        .collect();
    assert_eq!(by_role.len(), 2, "{groups:?}");
    let cluster_group = by_role["cluster"];
    let cluster_group_id = cluster_group.group_id().unwrap();
    let rule = &cluster_group.ip_permissions()[0];
    assert_eq!(rule.from_port(), Some(7101));
    assert!(
        rule.ip_ranges().is_empty(),
        "the cluster port is not open to any CIDR"
    );
    assert_eq!(
        rule.user_id_group_pairs()[0].group_id(),
        Some(cluster_group_id)
    );
    let client_group = by_role["client"];
    let rule = &client_group.ip_permissions()[0];
    assert_eq!(rule.from_port(), Some(8080));
    assert_eq!(rule.ip_ranges()[0].cidr_ip(), Some("198.51.100.0/24"));

    // Roles and profiles, with least-privilege policies.
    let node_role = moto.aws(&[
        "iam",
        "get-role",
        "--role-name",
        &format!("hashq-{name}-node"),
    ]);
    assert!(node_role["Role"]["AssumeRolePolicyDocument"]
        .to_string()
        .contains("ec2.amazonaws.com"));
    let policy = moto.aws(&[
        "iam",
        "get-role-policy",
        "--role-name",
        &format!("hashq-{name}-node"),
        "--policy-name",
        "hashq-node",
    ]);
    let policy = policy["PolicyDocument"].to_string();
    for action in [
        "ec2:RunInstances",
        "ec2:TerminateInstances",
        "ec2:DescribeInstances",
        "iam:PassRole",
    ] {
        assert!(policy.contains(action), "{action} missing from {policy}");
    }
    assert!(
        !policy.contains("\"ec2:*\""),
        "no wildcard EC2 access: {policy}"
    );
    let worker_policy = moto.aws(&[
        "iam",
        "get-role-policy",
        "--role-name",
        &format!("hashq-{name}-worker"),
        "--policy-name",
        "hashq-worker",
    ]);
    let worker_policy = worker_policy["PolicyDocument"].to_string();
    assert!(worker_policy.contains("ec2:DescribeInstanceStatus"));
    assert!(!worker_policy.contains("RunInstances") && !worker_policy.contains("Terminate"));
    for profile in ["node", "worker"] {
        let p = moto.aws(&[
            "iam",
            "get-instance-profile",
            "--instance-profile-name",
            &format!("hashq-{name}-{profile}"),
        ]);
        assert_eq!(
            p["InstanceProfile"]["Roles"][0]["RoleName"],
            format!("hashq-{name}-{profile}").as_str()
        );
    }

    // Three voters: two endpoints and a witness, with the peers list and one token.
    let members = instances(&ec2, &[("hashq:cluster", name)]).await;
    assert_eq!(members.len(), 3, "{members:?}");
    let mut tokens = HashSet::new();
    let mut peers = HashSet::new();
    for m in &members {
        let node_id = &m.tags["hashq:node-id"];
        let role = &m.tags["hashq:role"];
        assert_eq!(
            role,
            if node_id == "3" {
                "witness"
            } else {
                "endpoint"
            }
        );
        let script = user_data(&ec2, &m.id).await;
        let env = user_data_env(&script);
        assert_eq!(env["HASHQ_ID"], node_id);
        assert_eq!(env["HASHQ_ROLE"], role);
        assert_eq!(env["HASHQ_LAUNCHER"], "ec2");
        assert_eq!(env["HASHQ_CLUSTER_NAME"], name);
        assert_eq!(env["HASHQ_MAX_WORKERS"], "5");
        assert_eq!(
            env["HASHQ_EC2_INSTANCE_PROFILE"],
            format!("hashq-{name}-worker")
        );
        assert_eq!(env["HASHQ_EC2_SECURITY_GROUP"], cluster_group_id);
        assert_eq!(env["HASHQ_EC2_AMI"], "ami-12345678");
        assert!(script.contains("https://downloads.example.com/hashq-x86_64"));
        assert!(script.contains("ExecStart=/usr/local/bin/hashq node"));
        assert!(!script.contains(SECRET_KEY) && !script.contains("AWS_SECRET"));
        let token = env["HASHQ_CLUSTER_TOKEN"];
        assert!(
            token.len() >= 32 && token.bytes().all(|b| b.is_ascii_hexdigit()),
            "{token}"
        );
        tokens.insert(token.to_string());
        // One credential per audience: three different ones on every node.
        let (worker, admin) = (env["HASHQ_WORKER_TOKEN"], env["HASHQ_ADMIN_TOKEN"]);
        assert!(worker.len() >= 32 && admin.len() >= 32);
        assert!(worker != token && admin != token && worker != admin);
        peers.insert(env["HASHQ_PEERS"].to_string());
        assert_eq!(env.contains_key("HASHQ_CLIENT_LISTEN"), role == "endpoint");
    }
    assert_eq!(tokens.len(), 1, "one cluster token");
    assert_eq!(peers.len(), 1, "one peers list");
    let peer_list = peers.into_iter().next().unwrap();
    assert_eq!(peer_list.split(',').count(), 3, "{peer_list}");
    assert!(
        output.contains("http://"),
        "endpoint URLs printed: {output}"
    );
    let token_file = state.path().join(format!("{name}.token"));
    assert_eq!(
        std::fs::read_to_string(&token_file).unwrap().trim(),
        tokens.iter().next().unwrap()
    );

    // A worker the cluster launched meanwhile goes with the rest.
    let worker = run_instance(&ec2, &[("hashq:cluster", name), ("hashq:role", "worker")]).await;
    deploy(
        &moto,
        &["--name", name, "--state-dir", &state_dir, "--destroy"],
    );
    let left = instances(&ec2, &[("hashq:cluster", name)]).await;
    assert!(
        left.iter()
            .all(|i| i.state == InstanceStateName::Terminated),
        "{left:?}"
    );
    assert!(left.iter().any(|i| i.id == worker));
    let groups = ec2
        .describe_security_groups()
        .filters(filter("tag:hashq:cluster", &[name]))
        .send()
        .await
        .unwrap();
    assert!(groups.security_groups().is_empty(), "{groups:?}");
    // IAM is found by path (matched exactly: moto ignores --path-prefix for profiles).
    let path = format!("/hashq/{name}/");
    let ours = |list: &Value, key: &str| -> usize {
        list[key].as_array().map_or(0, |l| {
            l.iter().filter(|r| r["Path"] == path.as_str()).count()
        })
    };
    assert_eq!(ours(&moto.aws(&["iam", "list-roles"]), "Roles"), 0);
    assert_eq!(
        ours(
            &moto.aws(&["iam", "list-instance-profiles"]),
            "InstanceProfiles"
        ),
        0
    );
    assert!(!token_file.exists(), "the token file goes with the cluster");
    for kind in ["worker-token", "admin-token"] {
        assert!(!state.path().join(format!("{name}.{kind}")).exists());
    }
}

/// `deploy-ec2.sh --tls`: a cluster CA in the state dir, each node's certificate (for its
/// private IP and its name) and the CA in its user data, https URLs, all gone on destroy.
#[tokio::test(flavor = "multi_thread")]
async fn the_deploy_script_gives_every_node_a_certificate_of_one_cluster_ca() {
    let moto = Moto::start().await;
    let ec2 = moto.client();
    let name = "tlsdeploy";
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_string();
    let hashq = common::binary();
    let output = deploy_three_voters(
        &moto,
        name,
        &state_dir,
        &["--tls", "--hashq", hashq.to_str().unwrap()],
    );
    let tls_dir = state.path().join(format!("{name}.tls"));
    let ca = std::fs::read_to_string(tls_dir.join("ca.pem")).expect("the cluster CA");
    let ca_key = tls_dir.join("ca-key.pem");
    assert_eq!(
        std::fs::metadata(&ca_key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        output.contains(&format!("https://node-1.{name}.hashq:8080")),
        "{output}"
    );
    assert!(!output.contains("http://"), "{output}");
    let members = instances(&ec2, &[("hashq:cluster", name)]).await;
    assert_eq!(members.len(), 3, "{members:?}");
    for m in &members {
        let id = &m.tags["hashq:node-id"];
        let script = user_data(&ec2, &m.id).await;
        let env = user_data_env(&script);
        assert_eq!(env["HASHQ_TLS_CERT"], "/etc/hashq-tls/node.pem");
        assert_eq!(env["HASHQ_TLS_KEY"], "/etc/hashq-tls/node-key.pem");
        assert_eq!(env["HASHQ_TLS_CA"], "/etc/hashq-tls/ca.pem");
        let cert = std::fs::read_to_string(tls_dir.join(format!("node-{id}.pem"))).unwrap();
        let key = std::fs::read_to_string(tls_dir.join(format!("node-{id}-key.pem"))).unwrap();
        for (file, pem) in [("ca", &ca), ("node", &cert), ("node-key", &key)] {
            let block = format!(
                "cat > /etc/hashq-tls/{file}.pem <<'HASHQ_PEM'\n{}\nHASHQ_PEM\n",
                pem.trim_end()
            );
            assert!(script.contains(&block), "node {id}: {file}.pem missing");
        }
        // Its own key only, and never the CA's.
        assert!(!script.contains(std::fs::read_to_string(&ca_key).unwrap().trim()));
        // The certificate is the CA's and names the node's address: a TLS server with it
        // answers a client that trusts the CA only.
        let files = hashq_tls::NodeTls {
            cert: tls_dir.join(format!("node-{id}.pem")),
            key: tls_dir.join(format!("node-{id}-key.pem")),
            ca: tls_dir.join("ca.pem"),
        };
        hashq_tls::acceptor(&files).expect("a usable node certificate");
    }
    deploy(
        &moto,
        &["--name", name, "--state-dir", &state_dir, "--destroy"],
    );
    assert!(!tls_dir.exists(), "the CA goes with the cluster");
}

/// `deploy-ec2.sh --replace-endpoint ID`: node ID's instance is terminated, and a new
/// endpoint instance with the next unused node id joins through a surviving endpoint (over
/// TLS, with a certificate of the cluster's CA) and swaps itself in with `hashq cluster
/// replace`, with the cluster's credentials. A witness or an unknown node is refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_deploy_script_replaces_an_endpoint_by_a_new_node_that_swaps_itself_in() {
    let moto = Moto::start().await;
    let ec2 = moto.client();
    let name = "replacetest";
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_string();
    let hashq = common::binary();
    let hashq = hashq.to_str().unwrap();
    deploy_three_voters(&moto, name, &state_dir, &["--tls", "--hashq", hashq]);
    let live = |seen: &[Seen], id: &str| {
        seen.iter()
            .find(|m| m.live() && m.tags.get("hashq:node-id").map(String::as_str) == Some(id))
            .cloned()
    };
    let before = instances(&ec2, &[("hashq:cluster", name)]).await;
    let one = live(&before, "1").expect("node 1");
    let old = live(&before, "2").expect("node 2");
    let one_script = user_data(&ec2, &one.id).await;
    let one_env = user_data_env(&one_script);
    let one_addr = one_env["HASHQ_PEERS"]
        .split(',')
        .find_map(|p| p.strip_prefix("1="))
        .expect("node 1's address")
        .to_string();
    let replace = |node: &'static str| {
        [
            "--name",
            name,
            "--state-dir",
            &state_dir,
            "--binary-url",
            "https://downloads.example.com/hashq-x86_64",
            "--hashq",
            hashq,
            "--no-wait",
            "--replace-endpoint",
            node,
        ]
        .map(String::from)
    };
    for (node, why) in [("3", "is a witness"), ("9", "has no node 9")] {
        let args = replace(node);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = deploy_output(&moto, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(why),
            "{node}: {stderr}"
        );
    }

    let args = replace("2");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = deploy(&moto, &args);
    assert!(output.contains("replaced by node 4"), "{output}");
    let after = instances(&ec2, &[("hashq:cluster", name)]).await;
    assert!(
        !after.iter().any(|m| m.id == old.id && m.live()),
        "node 2's instance is terminated"
    );
    let new = live(&after, "4").expect("node 4");
    assert_eq!(new.tags["hashq:role"], "endpoint");
    let script = user_data(&ec2, &new.id).await;
    let env = user_data_env(&script);
    assert_eq!(env["HASHQ_ID"], "4");
    assert!(
        !env.contains_key("HASHQ_PEERS"),
        "a newcomer joins: {script}"
    );
    let join = format!("https://{one_addr}");
    assert_eq!(env["HASHQ_JOIN"], join);
    let advertise = env["HASHQ_ADVERTISE"];
    assert!(!one_env["HASHQ_PEERS"].contains(advertise), "a new address");
    for same in [
        "HASHQ_CLUSTER_TOKEN",
        "HASHQ_WORKER_TOKEN",
        "HASHQ_ADMIN_TOKEN",
        "HASHQ_LAUNCHER",
        "HASHQ_EC2_SECURITY_GROUP",
        "HASHQ_TLS_CA",
    ] {
        assert_eq!(env[same], one_env[same], "{same}");
    }
    let swap = format!(
        "hashq cluster --endpoints {join} --tls-ca /etc/hashq-tls/ca.pem replace 2 --id 4 --addr {advertise}"
    );
    assert!(script.contains(&swap), "{script}");
    let tls_dir = state.path().join(format!("{name}.tls"));
    let cert = std::fs::read_to_string(tls_dir.join("node-4.pem")).expect("node 4's certificate");
    assert!(script.contains(cert.trim_end()));

    // Ids are never reused: the next replacement is node 5, whatever instances still show.
    let args = replace("4");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(deploy(&moto, &args).contains("replaced by node 5"));
    deploy(
        &moto,
        &["--name", name, "--state-dir", &state_dir, "--destroy"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_port_serves_the_client_api_and_nothing_else() {
    // The deploy script opens only this port to clients; the cluster's routes must not
    // answer there, token or not.
    let client_port = free_port();
    let listen = format!("127.0.0.1:{client_port}");
    let cluster = Cluster::start(Options {
        nodes: 1,
        node_args: vec!["--client-listen".into(), listen],
        launch_workers: false,
        ..Options::default()
    })
    .await;
    let client = format!("http://127.0.0.1:{client_port}");
    let http = &cluster.http;
    let status = http.get(format!("{client}/status")).send().await.unwrap();
    assert!(status.status().is_success(), "{}", status.status());
    let enqueued = http
        .put(format!("{client}/enqueue?iterations=1"))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert!(enqueued.status().is_success(), "{}", enqueued.status());
    for (method, path) in [
        ("GET", "/internal/binary"),
        ("POST", "/admin/max-workers"),
        ("POST", "/worker/register"),
        ("POST", "/raft/append"),
    ] {
        let answer = http
            .request(method.parse().unwrap(), format!("{client}{path}"))
            .bearer_auth(TOKEN)
            .body("{\"max\":3}")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 404, "{method} {path}");
        // The same route on the cluster port exists (it may refuse the body, not the path).
        let inside = http
            .request(method.parse().unwrap(), format!("{}{path}", cluster.url(1)))
            .bearer_auth(TOKEN)
            .body("{\"max\":3}")
            .send()
            .await
            .unwrap();
        assert_ne!(
            inside.status().as_u16(),
            404,
            "{method} {path} on the cluster port"
        );
    }
}
