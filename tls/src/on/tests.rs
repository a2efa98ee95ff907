use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Runs one handshake over an in-memory pipe and one byte each way; returns what the
/// server saw of the client, or the first side's error.
async fn handshake(server: &NodeTls, client: ClientConfig) -> Result<PeerCertified, String> {
    let acceptor = TlsAcceptor::from(server_config(server).unwrap());
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let (a, b) = tokio::io::duplex(64 * 1024);
    let serving = tokio::spawn(async move {
        let mut stream = acceptor.accept(a).await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(&byte).await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer_certified(&stream))
    });
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let client = async {
        let mut stream = connector
            .connect(name, b)
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(b"x").await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let client = client.await;
    let served = serving.await.unwrap();
    client.and(served)
}

fn hosts() -> Vec<String> {
    vec!["127.0.0.1".into(), "localhost".into()]
}

#[tokio::test]
async fn peers_present_certificates_clients_trust_only_the_cluster_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::open_or_create(&dir.path().join("ca")).unwrap();
    let node1 = ca.issue("node-1", &hosts()).unwrap();
    let node2 = ca.issue("node-2", &hosts()).unwrap();
    let other = Ca::open_or_create(&dir.path().join("other")).unwrap();
    let stranger = other.issue("node-9", &hosts()).unwrap();

    // A peer presents its certificate, and the server sees it.
    let peer = client_config(&node2.ca, Some((&node2.cert, &node2.key))).unwrap();
    assert_eq!(handshake(&node1, peer).await, Ok(PeerCertified(true)));
    // A worker or the CLI presents none: allowed, and not a peer.
    let anonymous = client_config(&node1.ca, None).unwrap();
    assert_eq!(handshake(&node1, anonymous).await, Ok(PeerCertified(false)));
    // A client that trusts another CA refuses the node's certificate.
    let wrong_ca = client_config(&stranger.ca, None).unwrap();
    let refused = handshake(&node1, wrong_ca).await.unwrap_err();
    assert!(
        refused.contains("UnknownIssuer") || refused.contains("unknown"),
        "{refused}"
    );
    // A client certificate from another CA is refused by the server.
    let impostor = client_config(&node1.ca, Some((&stranger.cert, &stranger.key))).unwrap();
    assert!(handshake(&node1, impostor).await.is_err());
}

#[test]
fn the_ca_is_kept_and_issued_pairs_are_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::open_or_create(dir.path()).unwrap();
    let first = ca.issue("node-1", &hosts()).unwrap();
    let cert = std::fs::read(&first.cert).unwrap();
    let ca_cert = std::fs::read(&first.ca).unwrap();
    let again = Ca::open_or_create(dir.path()).unwrap();
    let second = again.issue("node-1", &hosts()).unwrap();
    assert_eq!(first, second);
    assert_eq!(std::fs::read(&second.cert).unwrap(), cert);
    assert_eq!(std::fs::read(&second.ca).unwrap(), ca_cert);
    // A certificate issued after a reopen chains to the same CA.
    let later = again.issue("node-2", &hosts()).unwrap();
    assert!(server_config(&later).is_ok());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&later.key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn bad_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    assert!(matches!(load_certs(&missing), Err(TlsError::Io { .. })));
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not pem").unwrap();
    let e = load_certs(&empty).unwrap_err().to_string();
    assert!(e.contains("no CERTIFICATE"), "{e}");
    assert!(load_key(&empty).is_err());
}
