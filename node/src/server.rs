//! Starting and stopping a node: open the store, start Raft and the proposer, spawn the
//! background loops, serve the routes; and on shutdown end every loop before Raft stops.
//!
//! This is the wiring: it imports the routes and every loop, and none of them imports it.
//! Tests start a node in-process on `127.0.0.1:0` the way `hashq node` does: bind, [`Server::start`],
//! [`serve`] with a shutdown future, then [`Server::shutdown`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use hashq_raft::command::StoreLimits;
use hashq_raft::network::{Network, Peers};
use hashq_raft::{NodeId, Raft};
use hashq_storage::StoreOptions;
use openraft::SnapshotPolicy;
use tokio::net::TcpListener;

use crate::config::{millis, NodeConfig, Role};
use crate::launcher;
use crate::metrics::{NodeMetrics, StoreTimings};
use crate::node::{Node, Parts, Repair};
use crate::proposer::{Links, Proposer, ProposerOptions};
use crate::tasks::Tasks;
use crate::{autoscaler, bootstrap, disk, housekeeping, routes, watch};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage: {0}")]
    Store(#[from] hashq_storage::StoreError),
    #[error("raft configuration: {0}")]
    RaftConfig(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("http client: {0}")]
    Http(String),
    #[error("launcher: {0}")]
    Launcher(String),
    #[error("TLS: {0}")]
    Tls(#[from] hashq_tls::TlsError),
}

/// Why a node process (`hashq node`, [`run`]) ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("starting the node: {0}")]
    Start(#[from] StartError),
    #[error("serving: {0}")]
    Serve(#[from] std::io::Error),
    #[error("client listener: {0}")]
    ClientListener(#[from] tokio::task::JoinError),
}

/// Runs a node as `hashq node` does: binds its listeners, starts it, serves until
/// `shutdown`, then stops it.
///
/// A plain function returning a boxed future, taking one: rustc compiles an `async fn`'s body
/// (and every generic it reaches) again in each crate that polls it, and this one reaches all
/// of openraft. Behind the box, the binary crate compiles none of it, and a fresh release
/// build (the first `scripts/cluster.sh up`) no longer ends in a second, serial compile of
/// the node (README, "Design", the root crate).
#[inline(never)]
pub fn run(
    config: NodeConfig,
    shutdown: BoxFuture<'static, ()>,
) -> BoxFuture<'static, Result<(), RunError>> {
    run_until(config, shutdown).boxed()
}

async fn run_until(config: NodeConfig, shutdown: BoxFuture<'static, ()>) -> Result<(), RunError> {
    if config.credentials.insecure {
        tracing::warn!(
            "running with --insecure: routes without a credential are open to anyone who can reach this port"
        );
    }
    raise_open_file_limit();
    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Bind { addr, source })
    };
    let listen = config.listen;
    let listener = bind(listen).await?;
    let client_listener = match config.client_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let server = Server::start(config).await?;
    let node = server.node().clone();
    tracing::info!(%listen, "serving");
    // One signal stops both listeners.
    let (stop, stopped) = tokio::sync::watch::channel(());
    let client = client_listener.map(|listener| {
        let mut stopped = stopped.clone();
        let node = node.clone();
        tokio::spawn(async move {
            serve(listener, node, Surface::Client, async move {
                let _ = stopped.changed().await;
            })
            .await
        })
    });
    drop(stopped);
    serve(listener, node, Surface::Whole, async move {
        shutdown.await;
        let _ = stop.send(());
    })
    .await?;
    if let Some(client) = client {
        client.await??;
    }
    tracing::info!("stopping");
    server.shutdown().await;
    Ok(())
}

/// A started node with its background loops.
pub struct Server {
    node: Node,
    tasks: Tasks,
}

impl Server {
    /// Opens the store, starts Raft, the proposer and the background loops. Serve the node
    /// with [`serve`], stop it with [`Server::shutdown`].
    pub async fn start(config: NodeConfig) -> Result<Server, StartError> {
        let launcher = launcher::from_config(&config)
            .await
            .map_err(StartError::Launcher)?;
        let metrics = Arc::new(NodeMetrics::default());
        hashq_storage::fsio::observe_store(Box::new(StoreTimings(metrics.clone())));
        let hashq_storage::Opened { log, sm, recovery } = hashq_storage::open(
            &config.data_dir,
            &StoreOptions {
                cache_bytes: config.storage.cache_bytes,
                log: hashq_storage::LogOptions {
                    segment_bytes: config.storage.log_segment_bytes,
                    ..hashq_storage::LogOptions::default()
                },
                ..StoreOptions::default()
            },
        )?;
        report_recovery(&recovery);
        let reader = sm.reader();
        let timing = &config.timing;
        sit_out_an_election_if_fresh(&log, timing.election_timeout).await?;
        let repairing = recovery.repair_until.is_some();
        // `watch::hand_over` knows the witness's longest timeout (its leader lease) is three
        // endpoint timeouts.
        let election_factor = if config.role == Role::Witness { 2 } else { 1 };
        let raft_config = openraft::Config {
            cluster_name: config.cluster_name.clone(),
            heartbeat_interval: millis(timing.raft_heartbeat),
            // A witness waits longer than an endpoint before it stands, so an endpoint that
            // can win does; a witness wins only when no endpoint can (its log is behind).
            election_timeout_min: millis(timing.election_timeout) * election_factor,
            election_timeout_max: millis(timing.election_timeout) * (election_factor + 1),
            install_snapshot_timeout: 10_000,
            // An append RPC must finish within a heartbeat interval (openraft's timeout for
            // it): keep them to a few MiB.
            max_payload_entries: 8,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.storage.snapshot_every),
            snapshot_max_chunk_size: 4 << 20,
            max_in_snapshot_log_to_keep: (config.storage.snapshot_every / 2).min(1000),
            purge_batch_size: 64,
            // A witness stands too, so that a majority always elects a leader whatever the
            // logs hold: when the only endpoint left is behind the witness, the witness leads
            // just long enough to bring it up to date and hand over (`watch::hand_over`),
            // serving no client meanwhile. A node repairing damaged state stands for nothing
            // until it is whole again.
            enable_elect: !repairing,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::RaftConfig(e.to_string()))?;

        let mut http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .no_proxy()
            .local_address(config.outbound_addr);
        let mut acceptor = None;
        if let Some(tls) = &config.tls {
            // Peers see this node's certificate; this node trusts the cluster CA only.
            http = hashq_tls::trust(http, &tls.ca, Some((&tls.cert, &tls.key)))?;
            acceptor = Some(hashq_tls::acceptor(tls)?);
        }
        let http = http.build().map_err(|e| StartError::Http(e.to_string()))?;
        let token: Option<Arc<str>> = config.credentials.peer.as_deref().map(Arc::from);
        let peers = Peers::new(http, config.tls.is_some(), token);
        let network = Network::new(peers.clone());
        let raft = Raft::new(config.id, Arc::new(raft_config), network, log, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let mut tasks = Tasks::default();
        let proposer = Proposer::start(
            Links {
                id: config.id,
                raft: raft.clone(),
                reader: reader.clone(),
                peers: peers.clone(),
            },
            ProposerOptions {
                metrics: Some(metrics.clone()),
                request_timeout: timing.request_timeout,
                batch_key_ttl: timing.internal_key_ttl,
                batching: config.batching,
                limits: StoreLimits {
                    max_items: config.limits.max_backlog,
                    max_bytes: config.limits.max_backlog_bytes,
                },
            },
            &mut tasks,
        );
        let node = Node::new(Parts {
            config,
            raft,
            reader,
            proposer,
            peers,
            tls: acceptor,
            launcher,
            metrics,
            repair: Repair {
                until: std::sync::Mutex::new(recovery.repair_until),
                damage: recovery.damage.clone(),
            },
        });
        tasks.spawn("exit on fatal", watch::exit_on_fatal(node.raft().clone()));
        tasks.spawn(
            "terms and clocks",
            watch::watch_terms_and_clocks(node.clone()),
        );
        tasks.spawn("disk", disk::watch(node.clone()));
        if repairing {
            tasks.spawn("repair", watch::watch_repair(node.clone()));
        }
        if let Some(path) = node.config().clock_offset_file.clone() {
            tasks.spawn(
                "clock offset",
                crate::proposer::follow_clock_offset_file(path),
            );
        }
        if node.is_witness() {
            tasks.spawn("handover", watch::hand_over(node.clone()));
        }
        match node.config().join.clone() {
            None => tasks.spawn("bootstrap", bootstrap::run(node.clone())),
            Some(url) => tasks.spawn("join", bootstrap::wait_to_be_added(node.clone(), url)),
        }
        tasks.spawn("peer probes", watch::probe_peers(node.clone()));
        tasks.spawn("housekeeping", housekeeping::run(node.clone()));
        tasks.spawn("autoscaler", autoscaler::run(node.clone()));
        Ok(Server { node, tasks })
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// How many of the background loops are still running.
    pub fn running_tasks(&self) -> usize {
        self.tasks.running()
    }

    /// Ends every background loop, stops the workers this node launched (they give their
    /// leases back), then Raft. The HTTP server is stopped by its shutdown future.
    pub async fn shutdown(self) {
        let Server { node, tasks } = self;
        tasks.stop().await;
        node.launcher().shutdown().await;
        if let Err(e) = node.raft().shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
    }
}

fn report_recovery(recovery: &hashq_storage::Recovery) {
    if let Some((path, at)) = &recovery.log.torn_tail {
        tracing::warn!(path = %path.display(), at, "the log ended in a torn record (never acknowledged); cut it off");
    }
    if let Some(why) = &recovery.sm.sled_reset {
        tracing::warn!(error = %why, "the state machine store was unreadable and was rebuilt");
    }
    if let Some(snapshot) = &recovery.sm.restored_from {
        tracing::warn!(%snapshot, "the state machine was behind the log's purge point; restored from the latest snapshot");
    }
    if let (Some(until), damage) = (recovery.repair_until, &recovery.damage) {
        tracing::error!(
            until,
            damage = damage.as_deref().unwrap_or("an earlier start found damage"),
            "REPAIRING: this node neither votes nor stands for election until its peers bring its log back to index {until}"
        );
    }
}

/// A node with no Raft state at all may replace one that died after voting in the current
/// term (same id, new disk). Voting again in that term could elect a second leader in it, so
/// a fresh node waits out every election under way (twice the longest election timeout)
/// before its Raft starts: by then each candidate of that term has won or moved on.
async fn sit_out_an_election_if_fresh(
    log: &hashq_storage::LogStore,
    election_timeout: Duration,
) -> Result<(), StartError> {
    use openraft::storage::RaftLogStorage;
    let mut log = log.clone();
    let raft_err = |e: openraft::StorageError<NodeId>| StartError::Raft(e.to_string());
    let voted = log.read_vote().await.map_err(raft_err)?.is_some();
    let logged = log
        .get_log_state()
        .await
        .map_err(raft_err)?
        .last_log_id
        .is_some();
    if !voted && !logged {
        let wait = election_timeout * 4;
        tracing::info!(
            ?wait,
            "fresh data dir: sitting out any election under way before voting"
        );
        tokio::time::sleep(wait).await;
    }
    Ok(())
}

/// Which routes a listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Everything: client API, Raft, workers, admin and internal routes (`--listen`).
    Whole,
    /// The client API alone (`--client-listen`).
    Client,
}

/// Serves `surface` of `node` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    node: Node,
    surface: Surface,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = node.config().http.clone();
    let tls = node.tls_acceptor().cloned();
    let router = match surface {
        Surface::Whole => routes::router(node),
        Surface::Client => routes::client_router(node),
    };
    crate::http::serve(listener, router, &limits, tls, shutdown).await
}

/// Raises this process's open-file limit to its hard limit: every connection is a file, and
/// running out of them would refuse peers along with clients.
pub fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!("could not raise the open-file limit");
            }
        }
    }
}
