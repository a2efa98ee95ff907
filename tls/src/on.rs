//! The TLS of a build with the `tls` feature: rustls with the AWS-LC provider, and rcgen.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{NodeTls, PeerCertified, TlsError};

pub use tokio_rustls::TlsAcceptor;

/// An accepted TLS connection.
pub type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn pem_error(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

/// The one crypto provider every config uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(io_error(path))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(io_error(path))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| pem_error(path, format!("private key: {e}")))
}

/// A root store holding the certificates of `ca` and nothing else.
pub fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| pem_error(ca, e))?;
    }
    Ok(roots)
}

/// A listener's config: this node's certificate; client certificates optional, but verified
/// against the cluster CA when presented; HTTP/1.1 only.
pub fn server_config(tls: &NodeTls) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&tls.ca)?), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&tls.cert)?, load_key(&tls.key)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client's config: trusts the cluster CA `ca` only; presents `identity` (a node's
/// certificate and key) when given.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?);
    let mut config = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// What [`peer_certified`] reads from an accepted connection.
pub fn peer_certified<IO>(stream: &tokio_rustls::server::TlsStream<IO>) -> PeerCertified {
    PeerCertified(
        stream
            .get_ref()
            .1
            .peer_certificates()
            .is_some_and(|c| !c.is_empty()),
    )
}

/// A cluster CA in a directory: `ca.pem` (give it to every node, worker and client) and
/// `ca-key.pem` (keep it private: it issues node certificates).
pub struct Ca {
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// The CA's parameters, derived from its key alone so that a reopened CA issues exactly
/// as the one that signed `ca.pem`. Its name carries the key's identifier: two clusters'
/// CAs never share a name, so a certificate of the other one is an unknown issuer.
fn ca_params(key: &rcgen::KeyPair) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    let id: String = params.key_identifier(key)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("hashq cluster CA {id}"));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Validity of what [`Ca`] creates: from a day ago (clock skew) for ten years.
fn validity(params: &mut rcgen::CertificateParams) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let year = 1970 + (now / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
}

/// Writes `contents` to `path` (mode 0600 when `secret`), durably: it is the only copy.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io_error(path))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_error(path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(dir))?;
    }
    Ok(())
}

impl Ca {
    pub fn cert_path(dir: &Path) -> PathBuf {
        dir.join("ca.pem")
    }

    fn key_path(dir: &Path) -> PathBuf {
        dir.join("ca-key.pem")
    }

    /// Opens the CA in `dir`, creating it when the directory holds none.
    pub fn open_or_create(dir: &Path) -> Result<Ca, TlsError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let key_path = Self::key_path(dir);
        let key = if key_path.exists() {
            let pem = std::fs::read_to_string(&key_path).map_err(io_error(&key_path))?;
            rcgen::KeyPair::from_pem(&pem).map_err(|e| pem_error(&key_path, e))?
        } else {
            let key = rcgen::KeyPair::generate()?;
            let mut params = ca_params(&key);
            validity(&mut params);
            let cert = params.self_signed(&key)?;
            write_file(&key_path, &key.serialize_pem(), true)?;
            write_file(&Self::cert_path(dir), &cert.pem(), false)?;
            key
        };
        Ok(Ca {
            dir: dir.to_path_buf(),
            issuer: rcgen::Issuer::new(ca_params(&key), key),
        })
    }

    /// Issues a certificate for `name` valid for `hosts` (IP addresses or DNS names), for
    /// both server and client use: `<name>.pem` and `<name>-key.pem` in the CA's directory.
    /// An existing pair is kept as it is.
    pub fn issue(&self, name: &str, hosts: &[String]) -> Result<NodeTls, TlsError> {
        let files = NodeTls {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
            ca: Self::cert_path(&self.dir),
        };
        if files.cert.exists() && files.key.exists() {
            return Ok(files);
        }
        let mut params = rcgen::CertificateParams::new(hosts.to_vec())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        write_file(&files.key, &key.serialize_pem(), true)?;
        write_file(&files.cert, &cert.pem(), false)?;
        Ok(files)
    }
}

/// A listener's acceptor.
pub fn acceptor(tls: &NodeTls) -> Result<TlsAcceptor, TlsError> {
    Ok(TlsAcceptor::from(server_config(tls)?))
}

/// `builder` trusting the cluster CA `ca` only, presenting `identity` when given.
pub fn trust(
    builder: reqwest::ClientBuilder,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<reqwest::ClientBuilder, TlsError> {
    Ok(builder.tls_backend_preconfigured(client_config(ca, identity)?))
}

/// Accepts a connection: the TLS stream and what the client proved.
pub async fn accept(
    acceptor: &TlsAcceptor,
    tcp: tokio::net::TcpStream,
) -> std::io::Result<(TlsStream, PeerCertified)> {
    let stream = acceptor.accept(tcp).await?;
    let certified = peer_certified(&stream);
    Ok((stream, certified))
}

#[cfg(test)]
mod tests;
