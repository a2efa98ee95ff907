//! A build without the `tls` feature: the same entry points, each answering
//! [`TlsError::NotBuilt`]; the types of a TLS connection cannot be made at all.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{NodeTls, PeerCertified, TlsError};

/// No acceptor exists in this build.
#[derive(Clone, Debug)]
pub enum TlsAcceptor {}

/// No TLS connection exists in this build.
#[derive(Debug)]
pub enum TlsStream {}

/// No cluster CA can be opened in this build.
pub enum Ca {}

impl Ca {
    pub fn cert_path(dir: &Path) -> PathBuf {
        dir.join("ca.pem")
    }

    pub fn open_or_create(_dir: &Path) -> Result<Ca, TlsError> {
        Err(TlsError::NotBuilt)
    }

    pub fn issue(&self, _name: &str, _hosts: &[String]) -> Result<NodeTls, TlsError> {
        match *self {}
    }
}

pub fn acceptor(_tls: &NodeTls) -> Result<TlsAcceptor, TlsError> {
    Err(TlsError::NotBuilt)
}

pub fn trust(
    _builder: reqwest::ClientBuilder,
    _ca: &Path,
    _identity: Option<(&Path, &Path)>,
) -> Result<reqwest::ClientBuilder, TlsError> {
    Err(TlsError::NotBuilt)
}

pub async fn accept(
    acceptor: &TlsAcceptor,
    _tcp: tokio::net::TcpStream,
) -> io::Result<(TlsStream, PeerCertified)> {
    match *acceptor {}
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match *self.get_mut() {}
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match *self.get_mut() {}
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match *self.get_mut() {}
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match *self.get_mut() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_says_how_to_get_a_build_with_tls() {
        let tls = NodeTls {
            cert: "node.pem".into(),
            key: "node-key.pem".into(),
            ca: "ca.pem".into(),
        };
        let errors = [
            acceptor(&tls).err(),
            trust(reqwest::Client::builder(), &tls.ca, None).err(),
            Ca::open_or_create(Path::new("ca")).err(),
        ];
        for error in errors {
            let message = error.expect("refused").to_string();
            assert!(message.contains("--features tls"), "{message}");
        }
    }
}
