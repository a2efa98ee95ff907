//! A fault-injecting TCP proxy in front of every node, for network partitions.
//!
//! Peers reach node `b` only through its proxy port (that is the address in `--peers`), and
//! every node connects from its own loopback address (`--outbound-addr 127.0.0.<10+id>`), so
//! the proxy knows who is talking to whom. A partition refuses new connections between the
//! two sides and cuts the ones that exist. Clients and workers (any other source address) are
//! never blocked: the partition is between the nodes.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// The loopback address node `id` connects from.
pub fn node_addr(id: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + id as u8))
}

fn source_node(ip: IpAddr) -> Option<u64> {
    match ip {
        IpAddr::V4(v4) if v4.octets()[..3] == [127, 0, 0] && v4.octets()[3] > 10 => {
            Some(u64::from(v4.octets()[3] - 10))
        }
        _ => None,
    }
}

#[derive(Default)]
struct State {
    /// (from, to) node pairs that may not talk.
    blocked: HashSet<(u64, u64)>,
    /// Open connections: (from node, to node, the relay task).
    open: Vec<(u64, u64, AbortHandle)>,
    /// Byte strings to look for in everything relayed ([`Proxy::watch_for`]), and those seen.
    watched: Arc<Watched>,
}

#[derive(Default)]
struct Watched {
    needles: Mutex<Vec<Vec<u8>>>,
    seen: Mutex<HashSet<Vec<u8>>>,
}

impl Watched {
    fn active(&self) -> bool {
        !self.needles.lock().unwrap().is_empty()
    }

    /// Notes every needle in `window` (a relayed chunk after the tail of the previous one).
    fn scan(&self, window: &[u8]) {
        for needle in self.needles.lock().unwrap().iter() {
            if window.windows(needle.len()).any(|w| w == needle.as_slice()) {
                self.seen.lock().unwrap().insert(needle.clone());
            }
        }
    }
}

/// Copies `from` to `to`, scanning the bytes (across chunk boundaries) for the needles.
async fn copy_watching(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    watched: Arc<Watched>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let keep = watched
        .needles
        .lock()
        .unwrap()
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(1);
    let mut window: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        window.extend_from_slice(&buf[..n]);
        watched.scan(&window);
        let cut = window.len().saturating_sub(keep);
        window.drain(..cut);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

pub struct Proxy {
    state: Arc<Mutex<State>>,
    listeners: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Starts one listener per `(node, proxy port, node's real port)`.
    pub async fn start(routes: &[(u64, u16, u16)]) -> Proxy {
        let mut proxy = Proxy {
            state: Arc::new(Mutex::new(State::default())),
            listeners: Vec::new(),
        };
        for &(to, port, target) in routes {
            proxy.add(to, port, target).await;
        }
        proxy
    }

    /// Puts node `to` (listening on `target`) behind the proxy port `port`.
    pub async fn add(&mut self, to: u64, port: u16, target: u16) {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind proxy port");
        let state = self.state.clone();
        self.listeners.push(tokio::spawn(async move {
            loop {
                let Ok((inbound, peer)) = listener.accept().await else {
                    continue;
                };
                let from = source_node(peer.ip());
                if from.is_some_and(|f| state.lock().unwrap().blocked.contains(&(f, to))) {
                    drop(inbound);
                    continue;
                }
                let watched = state.lock().unwrap().watched.clone();
                let relay = tokio::spawn(async move {
                    let _ = inbound.set_nodelay(true);
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = outbound.set_nodelay(true);
                        let mut inbound = inbound;
                        if watched.active() {
                            let (in_read, in_write) = inbound.split();
                            let (out_read, out_write) = outbound.split();
                            tokio::join!(
                                copy_watching(in_read, out_write, watched.clone()),
                                copy_watching(out_read, in_write, watched),
                            );
                        } else {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    }
                });
                if let Some(from) = from {
                    let mut s = state.lock().unwrap();
                    s.open.retain(|(_, _, h)| !h.is_finished());
                    s.open.push((from, to, relay.abort_handle()));
                }
            }
        }));
    }

    /// Cuts every link between `side` and the other nodes, both ways.
    pub fn isolate(&self, side: &[u64], all: &[u64]) {
        let mut s = self.state.lock().unwrap();
        for a in side {
            for b in all.iter().filter(|b| !side.contains(b)) {
                s.blocked.insert((*a, *b));
                s.blocked.insert((*b, *a));
            }
        }
        let blocked = s.blocked.clone();
        s.open.retain(|(from, to, relay)| {
            if blocked.contains(&(*from, *to)) {
                relay.abort();
                false
            } else {
                true
            }
        });
    }

    /// From now on, looks for each of `needles` in every byte relayed either way (on new
    /// connections); [`Proxy::seen`] tells which appeared in clear.
    pub fn watch_for(&self, needles: &[&[u8]]) {
        let s = self.state.lock().unwrap();
        *s.watched.needles.lock().unwrap() = needles.iter().map(|n| n.to_vec()).collect();
    }

    /// The watched byte strings that crossed the proxy in clear, as text.
    pub fn seen(&self) -> Vec<String> {
        let s = self.state.lock().unwrap();
        let seen = s.watched.seen.lock().unwrap();
        seen.iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect()
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.state.lock().unwrap().blocked.clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for l in &self.listeners {
            l.abort();
        }
        for (_, _, relay) in self.state.lock().unwrap().open.drain(..) {
            relay.abort();
        }
    }
}
