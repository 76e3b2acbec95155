//! TLS for the IMAP connection (rustls): the system's roots plus `email.ca_file`.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;

use super::config::EmailConfig;

/// The PEM certificates of `email.ca_file` (empty without one).
pub fn extra_roots(cfg: &EmailConfig) -> Result<Vec<CertificateDer<'static>>, String> {
    let Some(path) = &cfg.ca_file else {
        return Ok(Vec::new());
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read email.ca_file {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("email.ca_file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "email.ca_file {} holds no certificate",
            path.display()
        ));
    }
    Ok(certs)
}

/// A connector trusting the system's roots and `email.ca_file`.
pub fn connector(cfg: &EmailConfig) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    for c in extra_roots(cfg)? {
        roots
            .add(c)
            .map_err(|e| format!("email.ca_file: unusable certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no trusted CA certificates (system store empty, no email.ca_file)".into());
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// TLS over `tcp` to `host` (certificate checked against `host`).
pub async fn wrap(
    connector: &TlsConnector,
    host: &str,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>, String> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))?;
    connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {host}: {e}"))
}
