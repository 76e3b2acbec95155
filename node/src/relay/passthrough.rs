//! The relay's TLS passthrough (`--domain`, `--tls-listen`): on each TCP connection it reads
//! the ClientHello (at most [`iom_protocol::sni::MAX_PEEK`] bytes, within
//! [`WebConfig::hello_timeout`]), takes the server name, opens `/iom/tls-forward/1` to the
//! device registered under that name and copies the raw bytes both ways — the ClientHello
//! first. TLS ends on the device; the relay never holds a key for these names and never sees
//! plaintext.
//!
//! No server name, garbage, a name outside the domain or one nobody registered: the relay
//! answers a TLS alert, closes, and logs it; nothing else happens.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use iom_protocol::sni::{self, Peek};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::compat::FuturesAsyncReadCompatExt;

use super::web::{TLS_FORWARD_PROTOCOL, WebConfig, WebNames};

/// Why a connection was not forwarded (logged, and the alert it gets).
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("{0}")]
    Hello(#[from] sni::SniError),
    #[error("no ClientHello within {0:?}")]
    Timeout(std::time::Duration),
    #[error("the connection closed before a whole ClientHello")]
    Closed,
    #[error("the ClientHello has no server name")]
    NoName,
    #[error("{0:?} is not a name under this relay's domain")]
    OtherDomain(String),
    #[error("{0}")]
    Lookup(#[from] super::web::LookupRefusal),
    #[error("cannot reach the device: {0}")]
    Open(libp2p_stream::OpenStreamError),
    #[error("reading failed: {0}")]
    Io(#[from] std::io::Error),
}

impl Refused {
    fn alert(&self) -> Option<u8> {
        match self {
            Refused::Hello(_) => Some(sni::ALERT_DECODE_ERROR),
            Refused::NoName | Refused::OtherDomain(_) | Refused::Lookup(_) => {
                Some(sni::ALERT_UNRECOGNIZED_NAME)
            }
            Refused::Open(_) => Some(sni::ALERT_HANDSHAKE_FAILURE),
            Refused::Timeout(_) | Refused::Closed | Refused::Io(_) => None,
        }
    }
}

/// Accepts TLS connections on `listener` until the task is aborted.
pub async fn serve_tls(
    listener: TcpListener,
    names: WebNames,
    control: libp2p_stream::Control,
    config: Arc<WebConfig>,
) {
    let pending = Arc::new(tokio::sync::Semaphore::new(config.max_pending.max(1)));
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "TLS passthrough accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            tracing::warn!(%from, "too many connections in their ClientHello; closing one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (names, control, config) = (names.clone(), control.clone(), config.clone());
        tokio::spawn(async move {
            handle(tcp, from, names, control, config, permit).await;
        });
    }
}

async fn handle(
    mut tcp: TcpStream,
    from: SocketAddr,
    names: WebNames,
    mut control: libp2p_stream::Control,
    config: Arc<WebConfig>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let routed = route(&mut tcp, &names, &mut control, &config).await;
    drop(permit);
    let (hello, slot, stream) = match routed {
        Ok(r) => r,
        Err(refused) => {
            crate::metrics::relay().tls_refused.inc();
            tracing::info!(%from, "TLS passthrough refused: {refused}");
            if let Some(alert) = refused.alert() {
                let _ = tcp.write_all(&sni::alert(alert)).await;
            }
            let _ = tcp.shutdown().await;
            return;
        }
    };
    crate::metrics::relay().tls_forwarded.inc();
    tracing::debug!(%from, device = %slot.peer, "TLS passthrough forwarding");
    let limit = match config.max_bytes_per_connection {
        0 => i64::MAX,
        n => i64::try_from(n).unwrap_or(i64::MAX),
    };
    let mut stream = stream.compat();
    let budget = AtomicI64::new(limit);
    let result = async {
        take(&budget, hello.len())?;
        stream.write_all(&hello).await?;
        stream.flush().await?;
        let (tr, tw) = tcp.split();
        let (sr, sw) = tokio::io::split(stream);
        pipe_both(tr, tw, sr, sw, &budget).await
    }
    .await;
    let carried = limit.saturating_sub(budget.load(Ordering::Relaxed).max(0));
    match result {
        Ok(()) => {
            tracing::debug!(%from, device = %slot.peer, bytes = carried, "TLS passthrough done")
        }
        Err(e) => {
            tracing::info!(%from, device = %slot.peer, bytes = carried, "TLS passthrough ended: {e}")
        }
    }
    drop(slot);
}

/// Reads the ClientHello, finds the device and opens the stream to it.
async fn route(
    tcp: &mut TcpStream,
    names: &WebNames,
    control: &mut libp2p_stream::Control,
    config: &WebConfig,
) -> Result<(Vec<u8>, super::web::ConnectionSlot, libp2p::Stream), Refused> {
    let (hello, name) = tokio::time::timeout(config.hello_timeout, read_hello(tcp))
        .await
        .map_err(|_| Refused::Timeout(config.hello_timeout))??;
    let name = name.ok_or(Refused::NoName)?;
    let label = sni::label_under(&name, &config.domain)
        .ok_or_else(|| Refused::OtherDomain(name.clone()))?;
    let slot = names.connect(label, config.max_connections_per_device)?;
    let open = control.open_stream(slot.peer, TLS_FORWARD_PROTOCOL);
    let stream = tokio::time::timeout(config.hello_timeout, open)
        .await
        .map_err(|_| Refused::Timeout(config.hello_timeout))?
        .map_err(Refused::Open)?;
    Ok((hello, slot, stream))
}

/// Reads until the bytes hold a whole ClientHello; returns them and its server name.
async fn read_hello<R: AsyncRead + Unpin>(r: &mut R) -> Result<(Vec<u8>, Option<String>), Refused> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        match sni::parse_client_hello(&buf)? {
            Peek::ServerName(name) => return Ok((buf, name)),
            Peek::NeedMore if buf.len() >= sni::MAX_PEEK => {
                return Err(Refused::Hello(sni::SniError::TooLarge));
            }
            Peek::NeedMore => {}
        }
        let room = (sni::MAX_PEEK - buf.len()).min(chunk.len());
        let n = r.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(Refused::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Takes `n` bytes from `budget`; an error once it is spent.
fn take(budget: &AtomicI64, n: usize) -> std::io::Result<()> {
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    if budget.fetch_sub(n, Ordering::Relaxed) - n < 0 {
        return Err(std::io::Error::other(
            "the connection carried its byte limit",
        ));
    }
    Ok(())
}

/// Copies `from` to `to` until end of stream (then shuts `to` down), counting against `budget`.
async fn pipe<R, W>(mut from: R, mut to: W, budget: &AtomicI64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        take(budget, n)?;
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
    }
}

/// Both directions; each half-closes on its own end of stream, an error ends both.
async fn pipe_both<R1, W1, R2, W2>(
    tr: R1,
    tw: W1,
    sr: R2,
    sw: W2,
    budget: &AtomicI64,
) -> std::io::Result<()>
where
    R1: AsyncRead + Unpin,
    W1: AsyncWrite + Unpin,
    R2: AsyncRead + Unpin,
    W2: AsyncWrite + Unpin,
{
    let up = pipe(tr, sw, budget);
    let down = pipe(sr, tw, budget);
    tokio::pin!(up, down);
    tokio::select! {
        r = &mut up => { r?; down.await }
        r = &mut down => { r?; up.await }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_hello_is_read_in_pieces_and_kept_whole() {
        // A minimal ClientHello with SNI "a.b", sent one byte at a time.
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        let sni_ext = [0u8, 0, 0, 8, 0, 6, 0, 0, 3, b'a', b'.', b'b'];
        body.extend_from_slice(&(sni_ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&sni_ext);
        let mut msg = vec![1, 0];
        msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
        msg.extend_from_slice(&body);
        let mut wire = vec![22, 3, 1];
        wire.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        wire.extend_from_slice(&msg);
        let (mut a, mut b) = tokio::io::duplex(1);
        let sent = wire.clone();
        tokio::spawn(async move {
            let _ = a.write_all(&sent).await;
            let _ = a.write_all(b"rest").await;
        });
        let (hello, name) = read_hello(&mut b).await.unwrap();
        assert_eq!(name.as_deref(), Some("a.b"));
        assert_eq!(hello, wire, "exactly the ClientHello, forwarded first");
    }

    #[tokio::test]
    async fn a_cut_hello_and_garbage_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[22, 3, 1, 0, 50]).await.unwrap();
        drop(a);
        assert!(matches!(read_hello(&mut b).await, Err(Refused::Closed)));
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let e = read_hello(&mut b).await.unwrap_err();
        assert_eq!(e.alert(), Some(sni::ALERT_DECODE_ERROR));
    }

    #[tokio::test]
    async fn the_byte_limit_ends_a_connection() {
        let budget = AtomicI64::new(10);
        let (mut client, relay_side) = tokio::io::duplex(64);
        let (device_side, mut device) = tokio::io::duplex(64);
        let (tr, tw) = tokio::io::split(relay_side);
        let (sr, sw) = tokio::io::split(device_side);
        client.write_all(b"0123456789abcdef").await.unwrap();
        let e = pipe_both(tr, tw, sr, sw, &budget).await.unwrap_err();
        assert!(e.to_string().contains("byte limit"), "{e}");
        let mut got = Vec::new();
        let _ = device.read_to_end(&mut got).await;
        assert!(got.len() < 16, "not everything went through: {got:?}");
    }
}
