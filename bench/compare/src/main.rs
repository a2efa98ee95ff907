//! `hashq-compare`: the durable-enqueue workload of `hashq bench`, run against RabbitMQ
//! (quorum queue, publisher confirms) or NATS JetStream (R3 file stream, PubAck).
//!
//! N closed-loop clients, spread round-robin over the nodes' URLs, each with its own
//! connection: a client publishes one message, waits until the broker says it is durable
//! (confirm / PubAck) and only then sends the next. After a warm-up, the operations completed
//! in the measured window give the throughput and the latency percentiles, printed as one JSON
//! line shaped like an entry of `hashq bench`'s `enqueue` list.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::json;

/// The machine's CPU shares, as `hashq bench` reports them.
#[path = "../../../src/cli/machine.rs"]
mod machine;

#[derive(Parser)]
#[command(name = "hashq-compare", about, version)]
struct Cli {
    #[command(subcommand)]
    system: System,
}

#[derive(Subcommand)]
enum System {
    /// A RabbitMQ quorum queue, persistent messages, publisher confirms.
    Rabbitmq(RabbitArgs),
    /// A NATS JetStream stream (file storage), each publish awaits its PubAck.
    Nats(NatsArgs),
}

#[derive(Args)]
struct Load {
    /// One URL per node, comma-separated (amqp://... or nats://...).
    #[arg(long, value_delimiter = ',', required = true)]
    urls: Vec<String>,
    /// Concurrent closed-loop clients, spread round-robin over the URLs.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Bytes per message.
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seconds run before measuring (not counted).
    #[arg(long, default_value_t = 2.0)]
    warmup_seconds: f64,
    /// Declare the queue / create the stream (as every run does), report it on stderr, exit.
    #[arg(long)]
    setup_only: bool,
}

#[derive(Args)]
struct RabbitArgs {
    #[command(flatten)]
    load: Load,
    /// The quorum queue (declared durable, x-queue-type=quorum, if missing).
    #[arg(long, default_value = "hashq-compare")]
    queue: String,
    /// Replicas of the quorum queue (x-quorum-initial-group-size).
    #[arg(long, default_value_t = 3)]
    replicas: i64,
}

#[derive(Args)]
struct NatsArgs {
    #[command(flatten)]
    load: Load,
    /// The stream (created with file storage if missing).
    #[arg(long, default_value = "HASHQ_COMPARE")]
    stream: String,
    /// The subject published to (the stream's only subject).
    #[arg(long, default_value = "hashq.compare")]
    subject: String,
    /// Replicas of the stream.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
}

/// How long setup retries while a freshly started cluster settles.
const SETUP_DEADLINE: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().system {
        System::Rabbitmq(args) => rabbitmq(args).await,
        System::Nats(args) => nats(args).await,
    }
}

/// Retries `f` until it succeeds or `SETUP_DEADLINE` passes.
async fn retry<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + SETUP_DEADLINE;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() < deadline => {
                eprintln!("hashq-compare: {what}: {e:#}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.context(format!("{what}: gave up after {SETUP_DEADLINE:?}"))),
        }
    }
}

async fn rabbitmq(args: RabbitArgs) -> anyhow::Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let load = &args.load;
    let mut queue_args = FieldTable::default();
    queue_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    queue_args.insert(
        "x-quorum-initial-group-size".into(),
        AMQPValue::LongLongInt(args.replicas),
    );

    let declared = retry("declaring the quorum queue", || async {
        let conn = Connection::connect(&load.urls[0], ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        let queue = channel
            .queue_declare(
                args.queue.as_str().into(),
                QueueDeclareOptions::durable(),
                queue_args.clone(),
            )
            .await?;
        let _ = conn.close(200, "OK".into()).await;
        Ok(queue.message_count())
    })
    .await?;
    eprintln!(
        "hashq-compare: quorum queue {:?} declared ({declared} messages reported)",
        args.queue
    );
    if load.setup_only {
        return Ok(());
    }

    let mut channels = Vec::with_capacity(load.clients);
    for c in 0..load.clients {
        let url = &load.urls[c % load.urls.len()];
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .with_context(|| format!("client {c}: connecting to {url}"))?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        // The connection closes when its handle is dropped: keep it with the channel.
        channels.push((Arc::new(conn), channel));
    }
    let queue: lapin::types::ShortString = args.queue.as_str().into();
    let report = closed_loop(load, channels, move |(_conn, channel), payload| {
        let queue = queue.clone();
        async move {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue,
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?
                .await?;
            if !confirm.is_ack() {
                bail!("nacked");
            }
            Ok(())
        }
    })
    .await;
    print_report("rabbitmq-quorum", load, report)
}

async fn nats(args: NatsArgs) -> anyhow::Result<()> {
    use async_nats::jetstream::{self, stream};

    let load = &args.load;
    let info = retry("creating the stream", || async {
        let client = async_nats::connect(&load.urls[0]).await?;
        let js = jetstream::new(client);
        let mut stream = js
            .get_or_create_stream(stream::Config {
                name: args.stream.clone(),
                subjects: vec![args.subject.clone()],
                storage: stream::StorageType::File,
                num_replicas: args.replicas,
                ..Default::default()
            })
            .await?;
        let info = stream.info().await?.clone();
        let replicas = info.cluster.as_ref().map_or(0, |c| c.replicas.len()) + 1;
        if replicas < args.replicas {
            bail!("stream has {replicas} of {} replicas so far", args.replicas);
        }
        Ok(info)
    })
    .await?;
    let cluster = info.cluster.as_ref();
    eprintln!(
        "hashq-compare: stream {:?} (R{}, {:?} storage) holds {} messages; leader {:?}, followers {:?}",
        info.config.name,
        info.config.num_replicas,
        info.config.storage,
        info.state.messages,
        cluster.and_then(|c| c.leader.clone()),
        cluster.map(|c| c.replicas.iter().map(|r| r.name.clone()).collect::<Vec<_>>()),
    );
    if load.setup_only {
        return Ok(());
    }

    let mut contexts = Vec::with_capacity(load.clients);
    for c in 0..load.clients {
        let url = &load.urls[c % load.urls.len()];
        let client = async_nats::connect(url)
            .await
            .with_context(|| format!("client {c}: connecting to {url}"))?;
        contexts.push(jetstream::new(client));
    }
    let subject = args.subject.clone();
    let report = closed_loop(load, contexts, move |js, payload| {
        let subject = subject.clone();
        async move {
            js.publish(subject, payload).await?.await?;
            Ok(())
        }
    })
    .await;
    print_report("nats-jetstream-r3", load, report)
}

struct Report {
    acknowledged: u64,
    errors: u64,
    measured: Duration,
    /// The machine's idle, I/O-wait and stolen CPU shares in the measured window.
    machine: serde_json::Value,
    /// Microseconds.
    latency: Histogram<u64>,
}

/// Runs one closed loop per client state: `op` sends one message and resolves once the broker
/// has acknowledged it. Only operations that complete inside the measured window (after the
/// warm-up) count; errors are counted over the whole run.
async fn closed_loop<C, F, Fut>(load: &Load, clients: Vec<C>, op: F) -> Report
where
    C: Clone + Send + 'static,
    F: Fn(C, Bytes) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let payload = Bytes::from(vec![0x5au8; load.payload_bytes]);
    let started = Instant::now();
    let measure_from = started + Duration::from_secs_f64(load.warmup_seconds);
    let measured = Duration::from_secs_f64(load.seconds);
    let stop_at = measure_from + measured;
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(AtomicBool::new(false));
    let window = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let before = machine::sample();
        tokio::time::sleep_until(stop_at.into()).await;
        machine::shares(before, machine::sample())
    });
    let mut tasks = Vec::with_capacity(clients.len());
    for client in clients {
        let (op, payload, errors, first_error) = (
            op.clone(),
            payload.clone(),
            errors.clone(),
            first_error.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latency = new_histogram();
            loop {
                let sent = Instant::now();
                if sent >= stop_at {
                    break;
                }
                match op(client.clone(), payload.clone()).await {
                    Ok(()) => {
                        let done = Instant::now();
                        if done >= measure_from && done <= stop_at {
                            let micros = (done - sent).as_micros() as u64;
                            latency.saturating_record(micros.max(1));
                        }
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if !first_error.swap(true, Ordering::Relaxed) {
                            eprintln!("hashq-compare: first error: {e:#}");
                        }
                        // A broken connection fails at once: do not spin on it.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            latency
        }));
    }
    let mut latency = new_histogram();
    for task in tasks {
        match task.await {
            Ok(h) => latency.add(&h).expect("same histogram bounds"),
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Report {
        acknowledged: latency.len(),
        errors: errors.load(Ordering::Relaxed),
        measured,
        machine: window.await.unwrap_or_default(),
        latency,
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn print_report(system: &str, load: &Load, r: Report) -> anyhow::Result<()> {
    let ms = |q: f64| {
        if r.latency.is_empty() {
            0.0
        } else {
            r.latency.value_at_quantile(q) as f64 / 1000.0
        }
    };
    let line = json!({
        "system": system,
        "clients": load.clients,
        "payload_bytes": load.payload_bytes,
        "acknowledged": r.acknowledged,
        "per_second": (r.acknowledged as f64 / r.measured.as_secs_f64()).round(),
        "latency_ms": { "p50": ms(0.50), "p90": ms(0.90), "p99": ms(0.99) },
        "errors": r.errors,
        "machine_cpu_percent": r.machine,
    });
    println!("{}", serde_json::to_string(&line)?);
    Ok(())
}
