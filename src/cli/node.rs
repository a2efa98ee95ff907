//! `hashq node`.

use anyhow::Context;
use hashq_node::{serve, NodeArgs, Server, Surface};
use tokio::net::TcpListener;

/// Resolves when the process is asked to stop (SIGTERM or Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    if config.credentials.insecure {
        tracing::warn!(
            "running with --insecure: routes without a credential are open to anyone who can reach this port"
        );
    }
    hashq_node::server::raise_open_file_limit();
    let listen = config.listen;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let client_listener = match config.client_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?,
        ),
        None => None,
    };
    let server = Server::start(config).await.context("starting the node")?;
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
    serve(listener, node.clone(), Surface::Whole, async move {
        shutdown_signal().await;
        let _ = stop.send(());
    })
    .await?;
    if let Some(client) = client {
        client.await.context("client listener")??;
    }
    tracing::info!("stopping");
    server.shutdown().await;
    Ok(())
}
