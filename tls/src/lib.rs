//! TLS for every hashq link, with rustls and AWS-LC (no OpenSSL), in builds with the `tls`
//! cargo feature (`hashq`'s `tls`, which `ec2` includes). Without it, every entry point
//! answers [`TlsError::NotBuilt`], which says how to get a build that has it: the local
//! cluster's first build (`scripts/cluster.sh up`) skips rustls and rcgen.
//!
//! One model: a **cluster CA**. Each node has a certificate issued by it (for its listeners,
//! and presented as a client certificate when it calls a peer); every node, worker and CLI
//! trusts that CA alone, never the system's roots.
//!
//! - [`acceptor`]: a listener's. A client *may* present a certificate, and if it does the
//!   certificate must chain to the cluster CA, or the handshake fails. Whether one was
//!   presented is what [`accept`] reports ([`PeerCertified`]) and the node's peer routes
//!   check, together with the peer credential: a peer is a peer by its certificate as well
//!   as its token. Workers and the CLI present none: they prove themselves with their
//!   credential.
//! - [`trust`]: a reqwest client builder with the cluster CA as the only root, and for nodes
//!   their own certificate.
//! - [`Ca`]: creates the CA and issues node certificates (rcgen), for `hashq tls`,
//!   `scripts/cluster.sh up --tls` and `scripts/deploy-ec2.sh`.

use std::io;
use std::path::PathBuf;

#[cfg(not(feature = "tls"))]
mod off;
#[cfg(feature = "tls")]
mod on;

#[cfg(not(feature = "tls"))]
pub use off::{accept, acceptor, trust, Ca, TlsAcceptor, TlsStream};
#[cfg(feature = "tls")]
pub use on::{accept, acceptor, trust, Ca, TlsAcceptor, TlsStream};

/// Why a TLS file or config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[cfg(feature = "tls")]
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[cfg(feature = "tls")]
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("this hashq was built without TLS: build it with `cargo build --release --features tls` (`scripts/cluster.sh up --tls` does; the `ec2` feature includes it)")]
    NotBuilt,
}

/// A node's TLS files: its certificate chain and key, and the cluster CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Whether the TLS connection under a request presented a client certificate. The server
/// config verified it against the cluster CA during the handshake, so presence is proof.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCertified(pub bool);
