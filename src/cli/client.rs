//! The client commands: enqueue, pull, status, work, cluster.
//!
//! Every write carries an `Idempotency-Key`, so the CLI retries through failovers (on the next
//! endpoint when one is down) without enqueueing twice or losing a pulled result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hashq_proto::api::{AddMember, Enqueued, EnqueuedBatch, MaxWorkers, WorkList};
use hashq_proto::headers::IDEMPOTENCY_KEY;
use hashq_proto::routes::{admin, client as api, observability};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::Semaphore;

use super::{
    ClusterArgs, ClusterCommand, EnqueueArgs, PullArgs, StatusArgs, Target, WorkArgs, WorkCommand,
};

/// An HTTP client that fails over between endpoints and retries what is safe to retry.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    target: Arc<Target>,
}

impl Client {
    fn new(target: Target) -> anyhow::Result<Self> {
        if target.endpoints.is_empty() {
            bail!("no endpoints given");
        }
        let mut http = reqwest::Client::builder();
        if let Some(ca) = &target.tls_ca {
            http = hashq_tls::trust(http, ca, None)?;
        }
        Ok(Client {
            http: http.build()?,
            target: Arc::new(target),
        })
    }

    /// Sends a request, retrying on unreachable endpoints, 503 and 429 until the timeout.
    /// Returns the first answer that is not worth retrying.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        self.send_within(method, path, body, idempotency_key, Duration::ZERO)
            .await
    }

    /// [`Client::send`] of a body of its own media type.
    async fn send_typed(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
        idempotency_key: &str,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let request = Send {
            body: Some(body),
            content_type: Some(content_type),
            idempotency_key: Some(idempotency_key),
            extra: Duration::ZERO,
        };
        self.send_request(method, path, request).await
    }

    /// [`Client::send`] for a request the node may hold `extra` longer (a long poll).
    async fn send_within(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        idempotency_key: Option<&str>,
        extra: Duration,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let request = Send {
            body,
            content_type: None,
            idempotency_key,
            extra,
        };
        self.send_request(method, path, request).await
    }

    async fn send_request(
        &self,
        method: Method,
        path: &str,
        Send {
            body,
            content_type,
            idempotency_key,
            extra,
        }: Send<'_>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let deadline = Instant::now() + self.target.timeout + extra;
        let mut delay = Duration::from_millis(100);
        let mut last_error = anyhow!("no endpoint tried");
        for attempt in 0usize.. {
            let base =
                self.target.endpoints[attempt % self.target.endpoints.len()].trim_end_matches('/');
            let base = if base.contains("://") {
                base.to_string()
            } else {
                format!("http://{base}")
            };
            let mut request = self
                .http
                .request(method.clone(), format!("{base}{path}"))
                .timeout(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(100)),
                );
            if let Some(body) = &body {
                request = request.body(body.clone());
            }
            if let Some(content_type) = content_type {
                request = request.header(reqwest::header::CONTENT_TYPE, content_type);
            }
            if let Some(key) = idempotency_key {
                request = request.header(IDEMPOTENCY_KEY, key);
            }
            if let Some(token) = &self.target.client_token {
                request = request.bearer_auth(token);
            }
            match request.send().await {
                Ok(answer) => {
                    let status = answer.status();
                    let text = answer.text().await.unwrap_or_default();
                    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
                    let retry = status == StatusCode::SERVICE_UNAVAILABLE
                        || status == StatusCode::TOO_MANY_REQUESTS;
                    if !retry {
                        return Ok((status, value));
                    }
                    last_error = anyhow!("{base} answered {status}: {value}");
                }
                Err(e) => last_error = anyhow!("{base}: {e}"),
            }
            if Instant::now() + delay >= deadline {
                break;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        Err(last_error.context("gave up after the timeout"))
    }
}

/// What one request of [`Client`] carries besides its method and path.
struct Send<'a> {
    body: Option<Vec<u8>>,
    content_type: Option<&'a str>,
    idempotency_key: Option<&'a str>,
    /// How much longer than usual the node may hold it (a long poll).
    extra: Duration,
}

fn fail(status: StatusCode, body: &Value) -> anyhow::Error {
    let message = body
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| body.to_string());
    anyhow!("{status}: {message}")
}

fn new_key() -> String {
    format!("cli-{:032x}", rand::random::<u128>())
}

pub async fn enqueue(args: EnqueueArgs) -> anyhow::Result<()> {
    let client = Client::new(args.target)?;
    let bar = indicatif::ProgressBar::new(args.files.len() as u64);
    if args.files.len() < 2 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let template = if args.wait {
        "{bar:40} {pos}/{len} done, {msg} ({per_sec}, eta {eta})"
    } else {
        "{bar:40} {pos}/{len} enqueued ({per_sec}, eta {eta})"
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    // Waits for results (long polls) have their own permits, so that enqueueing goes on.
    let waits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let enqueued = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for files in batches(args.files, args.batch as usize) {
        let permit = permits.clone().acquire_owned().await?;
        let (client, bar) = (client.clone(), bar.clone());
        let query = match args.priority {
            Some(p) => format!("iterations={}&priority={p}", args.iterations),
            None => format!("iterations={}", args.iterations),
        };
        let (wait, waits, enqueued) = (args.wait, waits.clone(), enqueued.clone());
        tasks.push(tokio::spawn(async move {
            let ids = enqueue_files(&client, &query, &files).await;
            drop(permit);
            let ids = match ids {
                Ok(ids) => ids,
                Err(e) => {
                    bar.inc(files.len() as u64);
                    eprintln!("error: {e:#}");
                    return files.len();
                }
            };
            let mut waiting = Vec::new();
            for (file, id) in files.into_iter().zip(ids) {
                let file = file.display().to_string();
                if !wait {
                    bar.inc(1);
                    bar.suspend(|| {
                        println!("{}", serde_json::json!({"file": file, "work_id": id}))
                    });
                    continue;
                }
                let n = enqueued.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                bar.set_message(format!("{n} enqueued"));
                let (client, bar, waits) = (client.clone(), bar.clone(), waits.clone());
                waiting.push(tokio::spawn(async move {
                    let _wait = waits.acquire_owned().await?;
                    let work = wait_until_final(&client, &id).await?;
                    bar.inc(1);
                    bar.suspend(|| {
                        println!(
                            "{}",
                            serde_json::json!({
                                "file": file,
                                "work_id": id,
                                "status": work["status"],
                                "value": work["value"],
                            })
                        );
                    });
                    match work["status"].as_str() {
                        Some("completed" | "pulled") => Ok(()),
                        other => Err(anyhow!(
                            "{file} (work {id}) ended {}",
                            other.unwrap_or("unknown")
                        )),
                    }
                }));
            }
            let mut failed = 0;
            for w in waiting {
                if let Err(e) = w.await.map_err(anyhow::Error::from).and_then(|r| r) {
                    eprintln!("error: {e:#}");
                    failed += 1;
                }
            }
            failed
        }));
    }
    let mut failed = 0;
    for task in tasks {
        failed += task.await?;
    }
    bar.finish_and_clear();
    if failed > 0 {
        bail!("{failed} file(s) were not enqueued or did not complete");
    }
    Ok(())
}

/// Most bytes of files [`batches`] puts in one request.
const BATCH_BYTES: u64 = 4 << 20;

/// `files` in runs of at most `size` files and [`BATCH_BYTES`] (a larger file goes alone).
fn batches(files: Vec<std::path::PathBuf>, size: usize) -> Vec<Vec<std::path::PathBuf>> {
    let mut out: Vec<Vec<std::path::PathBuf>> = Vec::new();
    let mut bytes = 0;
    for file in files {
        let len = std::fs::metadata(&file).map_or(0, |m| m.len());
        match out.last_mut() {
            Some(run) if run.len() < size && bytes + len <= BATCH_BYTES => {
                bytes += len;
                run.push(file);
            }
            _ => {
                bytes = len;
                out.push(vec![file]);
            }
        }
    }
    out
}

/// Enqueues `files`, one item each (`query`: their iterations and priority), in one batch
/// when there are several: their work ids in order. A cluster that takes no batch (its
/// version predates them, or the batch is over its limits) gets them one by one.
async fn enqueue_files(
    client: &Client,
    query: &str,
    files: &[std::path::PathBuf],
) -> anyhow::Result<Vec<String>> {
    let mut payloads = Vec::with_capacity(files.len());
    for file in files {
        payloads.push(
            tokio::fs::read(file)
                .await
                .with_context(|| format!("reading {}", file.display()))?,
        );
    }
    if files.len() > 1 {
        let boundary = format!("hashq-{:032x}", rand::random::<u128>());
        let mut body = Vec::new();
        for (file, payload) in files.iter().zip(&payloads) {
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().replace(['"', '\r', '\n'], "_"))
                .unwrap_or_default();
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"f\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            );
            body.extend_from_slice(payload);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        let path = format!("{}?{query}", api::ENQUEUE_BATCH);
        let content_type = format!("multipart/form-data; boundary={boundary}");
        let (status, answer) = client
            .send_typed(Method::POST, &path, body, &content_type, &new_key())
            .await?;
        if status.is_success() {
            let ids = serde_json::from_value::<EnqueuedBatch>(answer)
                .map_err(|e| anyhow!("an unexpected answer to a batch: {e}"))?
                .work_ids;
            if ids.len() != files.len() {
                bail!(
                    "{} work ids for a batch of {} files",
                    ids.len(),
                    files.len()
                );
            }
            return Ok(ids);
        }
        let code = answer.pointer("/error/code").and_then(Value::as_str);
        let one_by_one = matches!(
            (status.as_u16(), code),
            (409, Some("cluster_version_too_old"))
                | (404 | 405, _)
                | (413, Some("batch_too_large" | "payload_too_large"))
        );
        if !one_by_one {
            return Err(fail(status, &answer).context(format!(
                "enqueueing {} files from {}",
                files.len(),
                files[0].display()
            )));
        }
    }
    let mut ids = Vec::with_capacity(files.len());
    for (file, payload) in files.iter().zip(payloads) {
        let path = format!("{}?{query}", api::ENQUEUE);
        let (status, body) = client
            .send(Method::PUT, &path, Some(payload), Some(&new_key()))
            .await?;
        if !status.is_success() {
            return Err(fail(status, &body).context(format!("enqueueing {}", file.display())));
        }
        ids.push(
            serde_json::from_value::<Enqueued>(body)
                .map(|e| e.work_id)
                .unwrap_or_default(),
        );
    }
    Ok(ids)
}

/// How long one long poll of [`wait_until_final`] asks the node to hold it.
const LONG_POLL: Duration = Duration::from_secs(30);

/// Item `id` once it is final (completed, pulled, dead, cancelled): long polls, one after
/// another, for as long as it takes.
async fn wait_until_final(client: &Client, id: &str) -> anyhow::Result<Value> {
    let path = format!(
        "{}?wait={}ms",
        api::work(hashq_proto::WorkId(id.parse()?)),
        LONG_POLL.as_millis()
    );
    loop {
        let (status, work) = client
            .send_within(Method::GET, &path, None, None, LONG_POLL)
            .await?;
        if !status.is_success() {
            return Err(fail(status, &work).context(format!("waiting for work {id}")));
        }
        if !matches!(work["status"].as_str(), Some("queued" | "running")) {
            return Ok(work);
        }
    }
}

pub async fn pull(args: PullArgs) -> anyhow::Result<()> {
    if args.follow {
        return follow(args).await;
    }
    let mut target = args.target;
    let mut path = format!("{}?top={}", api::PULL_COMPLETED, args.top);
    if let Some(wait) = args.wait {
        // The answer may take the whole wait: on top of the usual deadline.
        target.timeout += wait;
        path = format!("{path}&wait={}ms", wait.as_millis());
    }
    let client = Client::new(target)?;
    // One key for every retry: a retried pull returns the same items, so none is lost (and
    // a waiting pull needs one).
    let key = new_key();
    let (status, body) = client.send(Method::POST, &path, None, Some(&key)).await?;
    if !status.is_success() {
        return Err(fail(status, &body));
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

/// `hashq pull --follow`: waiting pulls, one after another, each result printed (and, with
/// `--out`, written to its file) as it is taken.
async fn follow(args: PullArgs) -> anyhow::Result<()> {
    let client = Client::new(args.target)?;
    let pending = args.out.as_ref().map(|dir| dir.join(".pull-key"));
    if let Some(dir) = &args.out {
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut taken = 0u64;
    while args.count.is_none_or(|n| taken < n) {
        let top = args.count.map_or(u64::from(args.top), |n| {
            (n - taken).min(u64::from(args.top))
        });
        let path = format!(
            "{}?top={top}&wait={}ms",
            api::PULL_COMPLETED,
            LONG_POLL.as_millis()
        );
        // A take left unwritten by an earlier run is taken again under its key first: the
        // cluster answers a retried key with the same items.
        let key = match &pending {
            Some(file) => match tokio::fs::read_to_string(file).await {
                Ok(key) if !key.trim().is_empty() => key.trim().to_string(),
                _ => {
                    let key = new_key();
                    write_durably(file, key.as_bytes()).await?;
                    key
                }
            },
            None => new_key(),
        };
        let (status, body) = client
            .send_within(Method::POST, &path, None, Some(&key), LONG_POLL)
            .await?;
        if !status.is_success() {
            return Err(fail(status, &body));
        }
        let items: Vec<hashq_proto::api::Pulled> = serde_json::from_value(body)?;
        for item in &items {
            if let Some(dir) = &args.out {
                let file = dir.join(format!("{}.sha512", item.work_id));
                write_durably(&file, format!("{}\n", item.value).as_bytes()).await?;
            }
            println!("{}", serde_json::to_string(item)?);
        }
        taken += items.len() as u64;
        if let Some(file) = &pending {
            tokio::fs::remove_file(file)
                .await
                .with_context(|| format!("removing {}", file.display()))?;
        }
    }
    Ok(())
}

/// Writes `path` through a temporary file, synced and renamed into place, and syncs its
/// directory: after a crash it holds either nothing or all of `data`.
async fn write_durably(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    let (path, data) = (path.to_path_buf(), data.to_vec());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use std::io::Write;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(&data)?;
        tmp.as_file().sync_data()?;
        tmp.persist(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })
    .await?
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let client = Client::new(args.target)?;
    let (status, body) = client
        .send(Method::GET, observability::STATUS, None, None)
        .await?;
    if !status.is_success() {
        return Err(fail(status, &body));
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

pub async fn work(args: WorkArgs) -> anyhow::Result<()> {
    let mut target = args.target;
    let (method, path) = match args.command {
        WorkCommand::Get { id, wait } => {
            let path = api::work(hashq_proto::WorkId(id));
            match wait {
                Some(wait) => {
                    // The answer may take the whole wait: on top of the usual deadline.
                    target.timeout += wait;
                    (Method::GET, format!("{path}?wait={}ms", wait.as_millis()))
                }
                None => (Method::GET, path),
            }
        }
        // Both are idempotent, so the client's retries are safe.
        WorkCommand::Cancel { id } => (Method::DELETE, api::work(hashq_proto::WorkId(id))),
        WorkCommand::Retry { id } => (Method::POST, api::work_retry(hashq_proto::WorkId(id))),
        WorkCommand::List {
            status,
            after,
            limit,
        } => return list_work(Client::new(target)?, &status, after, limit).await,
    };
    let client = Client::new(target)?;
    let (status, body) = client.send(method, &path, None, None).await?;
    if !status.is_success() {
        return Err(fail(status, &body));
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

/// Prints the items with `status` as JSON lines, page after page, until `limit` or the end.
async fn list_work(
    client: Client,
    status: &str,
    mut after: Option<u64>,
    limit: Option<u64>,
) -> anyhow::Result<()> {
    if status.is_empty() || !status.bytes().all(|b| b.is_ascii_lowercase()) {
        bail!("--status is one of queued, running, completed, pulled, dead, cancelled");
    }
    let mut left = limit.unwrap_or(u64::MAX);
    while left > 0 {
        let mut path = format!(
            "{}?status={status}&limit={}",
            api::WORK_LIST,
            left.min(1000)
        );
        if let Some(after) = after {
            path.push_str(&format!("&after={after}"));
        }
        let (code, body) = client.send(Method::GET, &path, None, None).await?;
        if !code.is_success() {
            return Err(fail(code, &body));
        }
        let page: WorkList = serde_json::from_value(body)?;
        for item in &page.items {
            println!("{}", serde_json::to_string(item)?);
        }
        left = left.saturating_sub(page.items.len() as u64);
        match page.next_after {
            Some(next) => after = Some(next.parse()?),
            None => break,
        }
    }
    Ok(())
}

pub async fn cluster(args: ClusterArgs) -> anyhow::Result<()> {
    let mut target = args.target;
    if !matches!(
        args.command,
        ClusterCommand::Members | ClusterCommand::Workers
    ) {
        // Admin routes take the admin credential where client routes take the client token.
        target.client_token = args.admin_token.clone();
        if target.client_token.is_none() {
            bail!("this command needs --admin-token (or HASHQ_ADMIN_TOKEN)");
        }
    }
    let client = Client::new(target)?;
    match args.command {
        ClusterCommand::Members | ClusterCommand::Workers => {
            let (status, body) = client
                .send(Method::GET, observability::STATUS, None, None)
                .await?;
            if !status.is_success() {
                return Err(fail(status, &body));
            }
            let part = if matches!(args.command, ClusterCommand::Members) {
                &body["members"]
            } else {
                &body["workers"]
            };
            println!("{}", serde_json::to_string_pretty(part)?);
        }
        ClusterCommand::Add { id, addr } => println!("{}", add_member(&client, id, addr).await?),
        ClusterCommand::Remove { id } => println!("{}", remove_member(&client, id).await?),
        ClusterCommand::Replace { old, id, addr } => {
            add_member(&client, id, addr).await?;
            println!("{}", remove_member(&client, old).await?);
        }
        ClusterCommand::SetMaxWorkers { max } => {
            let body = serde_json::to_vec(&MaxWorkers { max })?;
            let (status, answer) = client
                .send(Method::POST, admin::MAX_WORKERS, Some(body), None)
                .await?;
            if !status.is_success() {
                return Err(fail(status, &answer));
            }
            println!("{answer}");
        }
    }
    Ok(())
}

async fn add_member(client: &Client, id: u64, addr: String) -> anyhow::Result<Value> {
    let body = serde_json::to_vec(&AddMember { id, addr })?;
    let (status, answer) = client
        .send(Method::POST, admin::MEMBERS, Some(body), None)
        .await?;
    if !status.is_success() {
        return Err(fail(status, &answer));
    }
    Ok(answer)
}

async fn remove_member(client: &Client, id: u64) -> anyhow::Result<Value> {
    let path = admin::MEMBER.replace("{id}", &id.to_string());
    let (status, answer) = client.send(Method::DELETE, &path, None, None).await?;
    if !status.is_success() {
        return Err(fail(status, &answer));
    }
    Ok(answer)
}
