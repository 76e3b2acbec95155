//! HTTPS for the node's own listener (`--https IP:PORT`): rustls with the user's certificate
//! (`--tls-cert`/`--tls-key`, PEM) or a self-signed one made on first use and kept in
//! `DATA/tls/`, so neither a bearer token nor a session cookie ever crosses a network in clear.
//!
//! A self-signed certificate is only as good as its fingerprint: the node prints the SHA-256
//! of the certificate when it is ready, for the user to compare with what the browser shows.
//!
//! Besides TCP connections, the listener takes TLS connections the relay forwards by server
//! name ([`TlsListener::relayed`]): raw libp2p streams carrying the browser's TLS bytes, so
//! TLS ends here and the relay never sees plaintext.
//!
//! Handshakes run in their own tasks, at most [`MAX_HANDSHAKES`] at a time and each within
//! [`HANDSHAKE_TIMEOUT`], so a client that opens a connection and says nothing holds neither
//! the accept loop nor a slot for long.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

/// Handshakes in progress at once; more connections wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 64;
/// Time a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The self-signed certificate's file in the data dir.
pub const SELF_SIGNED_CERT: &str = "tls/self-signed.pem";
/// Its private key (mode 0600).
pub const SELF_SIGNED_KEY: &str = "tls/self-signed.key";

/// Why HTTPS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path} holds no {what} in PEM form")]
    NoPem {
        /// The file.
        path: PathBuf,
        /// `certificate` or `private key`.
        what: &'static str,
    },
    /// rustls refused the certificate and key (e.g. they do not belong together).
    #[error("the HTTPS certificate and key are not usable together: {0}")]
    Rustls(#[from] rustls::Error),
    /// The self-signed certificate could not be made.
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The self-signed certificate could not be stored.
    #[error("cannot store the self-signed certificate in {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// What the HTTPS listener serves with.
#[derive(Clone)]
pub struct TlsMaterial {
    /// The rustls configuration (HTTP/1.1 only, as the router speaks it).
    pub config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the leaf certificate (DER), as colon-separated upper-case hex, the form
    /// browsers show.
    pub fingerprint: String,
    /// Whether the certificate is the node's own self-signed one.
    pub self_signed: bool,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("fingerprint", &self.fingerprint)
            .field("self_signed", &self.self_signed)
            .finish_non_exhaustive()
    }
}

/// Loads the user's certificate and key, or (`None`) the self-signed pair in `data_dir`,
/// making it first if there is none. `names` go into a new self-signed certificate's
/// subject alternative names (besides `localhost` and the loopback addresses).
pub fn load(
    data_dir: &Path,
    provided: Option<&(PathBuf, PathBuf)>,
    names: &[String],
) -> Result<TlsMaterial, TlsError> {
    let (cert_path, key_path, self_signed) = match provided {
        Some((c, k)) => (c.clone(), k.clone(), false),
        None => {
            let c = data_dir.join(SELF_SIGNED_CERT);
            let k = data_dir.join(SELF_SIGNED_KEY);
            if !c.exists() || !k.exists() {
                make_self_signed(&c, &k, names)?;
            }
            (c, k, true)
        }
    };
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(&cert_path)?;
    let key_pem = read(&key_path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoPem {
            path: cert_path,
            what: "certificate",
        });
    };
    let fingerprint = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoPem {
        path: key_path.clone(),
        what: "private key",
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsMaterial {
        config: Arc::new(config),
        fingerprint,
        self_signed,
    })
}

/// SHA-256 of a certificate, `AB:CD:…`.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest: [u8; 32] = Sha256::digest(cert.as_ref()).into();
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn make_self_signed(cert: &Path, key: &Path, names: &[String]) -> Result<(), TlsError> {
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for n in names {
        if !n.is_empty() && !sans.contains(n) {
            sans.push(n.clone());
        }
    }
    let made = rcgen::generate_simple_self_signed(sans)?;
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    // The key first: a certificate without its key would be remade anyway.
    crate::secret_file::write_secret(key, made.key_pair.serialize_pem().as_bytes()).map_err(
        |source| TlsError::Write {
            path: key.to_path_buf(),
            source,
        },
    )?;
    crate::secret_file::write_secret(cert, made.cert.pem().as_bytes()).map_err(|source| {
        TlsError::Write {
            path: cert.to_path_buf(),
            source,
        }
    })
}

/// The transport under one HTTPS connection: a TCP connection, or a stream the relay
/// forwards (`/iom/tls-forward/1`).
pub enum HttpsIo {
    /// A direct TCP connection.
    Tcp(TcpStream),
    /// A TLS connection forwarded by the relay.
    Relayed(Compat<libp2p::Stream>),
}

impl AsyncRead for HttpsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            HttpsIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            HttpsIo::Relayed(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HttpsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            HttpsIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            HttpsIo::Relayed(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            HttpsIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            HttpsIo::Relayed(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            HttpsIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            HttpsIo::Relayed(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Hands relayed TLS connections to a [`TlsListener`].
#[derive(Clone)]
pub struct RelayedSender {
    tx: mpsc::Sender<libp2p::Stream>,
}

impl RelayedSender {
    /// Queues `stream` for its handshake; `false` if too many are waiting (the stream is
    /// dropped) or the listener is gone.
    pub fn offer(&self, stream: libp2p::Stream) -> bool {
        self.tx.try_send(stream).is_ok()
    }
}

/// The address relayed connections report (they have no socket address of their own).
pub const RELAYED_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// A TLS listener for `axum::serve`: accepts TCP connections (and relayed streams), completes
/// their handshakes in the background, and hands out the connections whose handshake
/// succeeded.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<HttpsIo>, SocketAddr)>,
    local: SocketAddr,
    relayed: RelayedSender,
    accept_task: tokio::task::JoinHandle<()>,
    relayed_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Serves TLS with `material` on `listener`.
    pub fn new(listener: TcpListener, material: &TlsMaterial) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(material.config.clone());
        let (tx, ready) = mpsc::channel(MAX_HANDSHAKES);
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let (relayed_tx, relayed_rx) = mpsc::channel(MAX_HANDSHAKES);
        let relayed_task = tokio::spawn(relayed_loop(
            relayed_rx,
            acceptor.clone(),
            tx.clone(),
            slots.clone(),
        ));
        let accept_task = tokio::spawn(accept_loop(listener, acceptor, tx, slots));
        Ok(TlsListener {
            ready,
            local,
            relayed: RelayedSender { tx: relayed_tx },
            accept_task,
            relayed_task,
        })
    }

    /// Where relayed TLS connections go in.
    pub fn relayed(&self) -> RelayedSender {
        self.relayed.clone()
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.relayed_task.abort();
    }
}

/// Completes one handshake (bounded in time) and hands the connection on.
fn spawn_handshake(
    io: HttpsIo,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<HttpsIo>, SocketAddr)>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    tokio::spawn(async move {
        let _permit = permit;
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
            Ok(Ok(tls)) => {
                let _ = tx.send((tls, peer)).await;
            }
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        }
    });
}

async fn relayed_loop(
    mut incoming: mpsc::Receiver<libp2p::Stream>,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<HttpsIo>, SocketAddr)>,
    slots: Arc<Semaphore>,
) {
    while let Some(stream) = incoming.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        if tx.is_closed() {
            return;
        }
        let io = HttpsIo::Relayed(stream.compat());
        spawn_handshake(io, RELAYED_ADDR, acceptor.clone(), tx.clone(), permit);
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<HttpsIo>, SocketAddr)>,
    slots: Arc<Semaphore>,
) {
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "HTTPS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        if tx.is_closed() {
            return;
        }
        spawn_handshake(
            HttpsIo::Tcp(tcp),
            peer,
            acceptor.clone(),
            tx.clone(),
            permit,
        );
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<HttpsIo>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop only ends when this listener is dropped; wait for shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_certificate_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = load(dir.path(), None, &["home.example".into()]).unwrap();
        assert!(a.self_signed);
        assert_eq!(a.fingerprint.len(), 32 * 3 - 1);
        let b = load(dir.path(), None, &[]).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint, "the same certificate again");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(SELF_SIGNED_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is private");
    }

    #[test]
    fn provided_files_are_checked_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let made = load(dir.path(), None, &[]).unwrap();
        let cert = dir.path().join(SELF_SIGNED_CERT);
        let key = dir.path().join(SELF_SIGNED_KEY);
        let m = load(dir.path(), Some(&(cert.clone(), key.clone())), &[]).unwrap();
        assert!(!m.self_signed);
        assert_eq!(m.fingerprint, made.fingerprint);
        let missing = dir.path().join("nope.pem");
        let e = load(dir.path(), Some(&(missing, key.clone())), &[]).unwrap_err();
        assert!(e.to_string().starts_with("cannot read "), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let e = load(dir.path(), Some(&(junk.clone(), key)), &[]).unwrap_err();
        assert!(e.to_string().contains("no certificate"), "{e}");
        let e = load(dir.path(), Some(&(cert, junk)), &[]).unwrap_err();
        assert!(e.to_string().contains("no private key"), "{e}");
    }
}
