//! Names under the relay's domain (`--domain`) for devices that serve the web app, and the
//! `/iom/web-name/1` protocol a device registers its name with.
//!
//! # Wire format
//!
//! Over one raw stream (libp2p-stream), opened by the device *after* `/iom/relay-auth/1`
//! accepted it:
//!
//! 1. device → relay: one frame (4-byte big-endian length) holding the CBOR map `{}` (reserved
//!    for options);
//! 2. relay → device: one frame holding [`WebNameReply`].
//!
//! The name is not chosen by the device: it is [`iom_protocol::sni::web_name`] of the device's
//! key (the connection's Noise-authenticated PeerId), so it is stable, unique per device and
//! cannot be claimed by another device. The relay only names devices in its [`AllowList`]
//! (those that proved, with their certificate chain, that they belong to an allowed person).
//! A device registers again every [`REGISTER_EVERY`] (the relay forgets names when it
//! restarts).
//!
//! [`super::passthrough`] forwards TLS connections for a name over `/iom/tls-forward/1`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt, StreamExt};
use iom_protocol::keys::DeviceId;
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};

use super::AllowList;
use super::auth::{read_frame, write_frame};

/// The registration protocol.
pub const WEB_NAME_PROTOCOL: StreamProtocol = StreamProtocol::new("/iom/web-name/1");
/// The protocol the relay opens to a device to hand it one TLS connection's raw bytes.
pub const TLS_FORWARD_PROTOCOL: StreamProtocol = StreamProtocol::new("/iom/tls-forward/1");
/// The largest request or reply frame.
pub const MAX_WEB_NAME_FRAME: usize = 4 * 1024;
/// How long one registration may take.
pub const WEB_NAME_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a device registers again.
pub const REGISTER_EVERY: Duration = Duration::from_secs(30);
/// Names the relay serves at most.
pub const MAX_WEB_NAMES: usize = 65_536;

/// What the relay's TLS passthrough serves and how much it lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebConfig {
    /// The domain devices get names under (`relay.example.com`; lower case, no trailing dot).
    pub domain: String,
    /// Where TLS connections come in (`0.0.0.0:443`).
    pub tls_listen: std::net::SocketAddr,
    /// The port browsers use, for the URLs (default: the bound port of `tls_listen`).
    pub public_port: Option<u16>,
    /// Where plain HTTP comes in for ACME HTTP-01 challenges (`0.0.0.0:80`), if at all.
    pub http_listen: Option<std::net::SocketAddr>,
    /// Forwarded connections one device may have open at once.
    pub max_connections_per_device: usize,
    /// Bytes one forwarded connection may carry, both directions together (0 = unlimited).
    pub max_bytes_per_connection: u64,
    /// Connections still in their ClientHello, all clients together.
    pub max_pending: usize,
    /// Time a client has to send its whole ClientHello.
    pub hello_timeout: Duration,
}

impl WebConfig {
    /// The defaults for `domain` on `tls_listen`.
    pub fn new(domain: String, tls_listen: std::net::SocketAddr) -> WebConfig {
        WebConfig {
            domain,
            tls_listen,
            public_port: None,
            http_listen: None,
            max_connections_per_device: 64,
            max_bytes_per_connection: 1024 * 1024 * 1024,
            max_pending: 256,
            hello_timeout: Duration::from_secs(5),
        }
    }
}

/// The relay's answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebNameReply {
    /// Whether the relay now forwards TLS connections for `host` to this device.
    pub ok: bool,
    /// The device's host name (`LABEL.DOMAIN`).
    #[serde(default)]
    pub host: Option<String>,
    /// The URL browsers open (`https://LABEL.DOMAIN[:PORT]/`).
    #[serde(default)]
    pub url: Option<String>,
    /// Why not, when `ok` is false.
    #[serde(default)]
    pub reason: String,
}

/// The registration request (no fields yet).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct WebNameRequest {}

/// Why registering a name failed (a refusal is not an error: see [`WebNameReply::ok`]).
#[derive(Debug, thiserror::Error)]
pub enum WebNameError {
    /// The relay's stream could not be opened (not connected, or it has no `--domain`).
    #[error("cannot open {WEB_NAME_PROTOCOL} to the relay: {0}")]
    Open(#[source] libp2p_stream::OpenStreamError),
    /// Reading or writing the stream failed.
    #[error("web name stream failed: {0}")]
    Io(#[from] std::io::Error),
    /// The relay's reply was not a valid reply.
    #[error("malformed web name reply: {0}")]
    Malformed(#[source] serde_cbor::Error),
    /// The relay did not answer in time.
    #[error("the relay did not answer within {WEB_NAME_TIMEOUT:?}")]
    Timeout,
}

/// Asks `relay` to forward TLS connections for this device's name to it. Call it after
/// `/iom/relay-auth/1` accepted the device.
pub async fn register_web_name(
    control: &mut libp2p_stream::Control,
    relay: PeerId,
) -> Result<WebNameReply, WebNameError> {
    let exchange = async {
        let mut stream = control
            .open_stream(relay, WEB_NAME_PROTOCOL)
            .await
            .map_err(WebNameError::Open)?;
        let request = serde_cbor::to_vec(&WebNameRequest {}).map_err(WebNameError::Malformed)?;
        write_frame(&mut stream, &request).await?;
        let reply = read_frame(&mut stream, MAX_WEB_NAME_FRAME).await?;
        let _ = stream.close().await;
        serde_cbor::from_slice::<WebNameReply>(&reply).map_err(WebNameError::Malformed)
    };
    tokio::time::timeout(WEB_NAME_TIMEOUT, exchange)
        .await
        .map_err(|_| WebNameError::Timeout)?
}

/// The names the relay serves: label → device, with each device's open connections.
#[derive(Debug, Clone, Default)]
pub struct WebNames {
    inner: Arc<Mutex<HashMap<String, NameEntry>>>,
}

#[derive(Debug)]
struct NameEntry {
    peer: PeerId,
    open: usize,
}

/// Why a name was not registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameRefusal {
    /// The device has not proved it belongs to an allowed person.
    #[error(
        "this device has not proved it belongs to a person this relay serves (authenticate with /iom/relay-auth/1 first)"
    )]
    NotAllowed,
    /// The PeerId is not an ed25519 device id.
    #[error("{0}")]
    NotADevice(iom_protocol::keys::KeyError),
    /// Another device has this name (80-bit collision: practically never).
    #[error("the name {0} belongs to another device")]
    Taken(String),
    /// The relay serves [`MAX_WEB_NAMES`] names already.
    #[error("the relay's list of names is full")]
    Full,
}

/// Why a connection for a name is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupRefusal {
    /// No device registered this name.
    #[error("no device has the name {0:?}")]
    Unknown(String),
    /// The device has its maximum of connections open.
    #[error("device {0} has {1} connections open (the limit)")]
    Busy(PeerId, usize),
}

/// One forwarded connection of a device, counted until dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    names: WebNames,
    label: String,
    /// The device the connection goes to.
    pub peer: PeerId,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut map = self.names.lock();
        if let Some(e) = map.get_mut(&self.label) {
            e.open = e.open.saturating_sub(1);
        }
    }
}

impl WebNames {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NameEntry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `peer` under its [`iom_protocol::sni::web_name`] if `allow` has it; returns
    /// the label.
    pub fn register(&self, peer: PeerId, allow: &AllowList) -> Result<String, NameRefusal> {
        if !allow.contains(&peer) {
            return Err(NameRefusal::NotAllowed);
        }
        let device = DeviceId::from_peer_id(&peer).map_err(NameRefusal::NotADevice)?;
        let label = iom_protocol::sni::web_name(&device);
        let mut map = self.lock();
        match map.get(&label) {
            Some(e) if e.peer == peer => {}
            Some(_) => return Err(NameRefusal::Taken(label)),
            None if map.len() >= MAX_WEB_NAMES => return Err(NameRefusal::Full),
            None => {
                map.insert(label.clone(), NameEntry { peer, open: 0 });
            }
        }
        Ok(label)
    }

    /// The device for `label`, with a slot counted against its `max_open` connections.
    pub fn connect(&self, label: &str, max_open: usize) -> Result<ConnectionSlot, LookupRefusal> {
        let mut map = self.lock();
        let Some(e) = map.get_mut(label) else {
            return Err(LookupRefusal::Unknown(label.to_string()));
        };
        if e.open >= max_open {
            return Err(LookupRefusal::Busy(e.peer, e.open));
        }
        e.open += 1;
        Ok(ConnectionSlot {
            names: self.clone(),
            label: label.to_string(),
            peer: e.peer,
        })
    }

    /// The device registered under `label`, if any.
    pub fn peer(&self, label: &str) -> Option<PeerId> {
        self.lock().get(label).map(|e| e.peer)
    }

    /// How many names are registered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no name is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The host and URL of `label` under the relay's `domain`, served on `port`.
pub fn host_and_url(label: &str, domain: &str, port: u16) -> (String, String) {
    let host = format!("{label}.{domain}");
    let url = if port == 443 {
        format!("https://{host}/")
    } else {
        format!("https://{host}:{port}/")
    };
    (host, url)
}

/// Serves `/iom/web-name/1` on `incoming` until it ends.
pub async fn serve_web_names(
    mut incoming: libp2p_stream::IncomingStreams,
    names: WebNames,
    allow: AllowList,
    domain: Arc<str>,
    port: u16,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    while let Some((peer, stream)) = incoming.next().await {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many web name registrations at once; dropping a stream");
            continue;
        };
        let (names, allow, domain) = (names.clone(), allow.clone(), domain.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let exchange = answer(peer, stream, &names, &allow, &domain, port);
            match tokio::time::timeout(WEB_NAME_TIMEOUT, exchange).await {
                Ok(Ok(reply)) if reply.ok => {
                    tracing::debug!(%peer, host = ?reply.host, "web name registered")
                }
                Ok(Ok(reply)) => {
                    tracing::info!(%peer, reason = %reply.reason, "web name refused")
                }
                Ok(Err(e)) => tracing::debug!(%peer, "web name stream failed: {e}"),
                Err(_) => tracing::debug!(%peer, "web name registration timed out"),
            }
        });
    }
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    peer: PeerId,
    mut stream: S,
    names: &WebNames,
    allow: &AllowList,
    domain: &str,
    port: u16,
) -> std::io::Result<WebNameReply> {
    let request = read_frame(&mut stream, MAX_WEB_NAME_FRAME).await;
    let reply = match request.map(|r| serde_cbor::from_slice::<WebNameRequest>(&r)) {
        Ok(Ok(_)) => match names.register(peer, allow) {
            Ok(label) => {
                let (host, url) = host_and_url(&label, domain, port);
                WebNameReply {
                    ok: true,
                    host: Some(host),
                    url: Some(url),
                    reason: String::new(),
                }
            }
            Err(e) => refusal(e.to_string()),
        },
        Ok(Err(e)) => refusal(format!("not a web name request: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => refusal(e.to_string()),
        Err(e) => return Err(e),
    };
    let bytes = serde_cbor::to_vec(&reply).map_err(std::io::Error::other)?;
    write_frame(&mut stream, &bytes).await?;
    let _ = stream.close().await;
    Ok(reply)
}

fn refusal(reason: String) -> WebNameReply {
    WebNameReply {
        ok: false,
        host: None,
        url: None,
        reason,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use iom_protocol::keys::{DeviceKey, PersonKey};

    use super::*;

    fn peer(seed: u8) -> PeerId {
        DeviceKey::from_seed([seed; 32]).id().to_peer_id()
    }

    #[test]
    fn only_allowed_devices_get_their_own_name() {
        let names = WebNames::default();
        let allow = AllowList::new();
        let (a, b) = (peer(1), peer(2));
        assert_eq!(names.register(a, &allow), Err(NameRefusal::NotAllowed));
        allow.insert(a, PersonKey::from_seed([9; 32]).id());
        let label = names.register(a, &allow).unwrap();
        let device = DeviceId::from_peer_id(&a).unwrap();
        assert_eq!(label, iom_protocol::sni::web_name(&device));
        assert_eq!(
            names.register(a, &allow).unwrap(),
            label,
            "again: same name"
        );
        assert_eq!(names.register(b, &allow), Err(NameRefusal::NotAllowed));
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn connections_are_counted_per_device_and_released() {
        let names = WebNames::default();
        let allow = AllowList::new();
        let a = peer(1);
        allow.insert(a, PersonKey::from_seed([9; 32]).id());
        let label = names.register(a, &allow).unwrap();
        let one = names.connect(&label, 2).unwrap();
        assert_eq!(one.peer, a);
        let two = names.connect(&label, 2).unwrap();
        assert_eq!(
            names.connect(&label, 2).unwrap_err(),
            LookupRefusal::Busy(a, 2)
        );
        drop(one);
        let three = names.connect(&label, 2).unwrap();
        drop((two, three));
        assert!(matches!(
            names.connect("nobody", 2),
            Err(LookupRefusal::Unknown(_))
        ));
    }

    #[test]
    fn urls_leave_out_the_default_port() {
        assert_eq!(
            host_and_url("abc", "relay.test", 443),
            ("abc.relay.test".into(), "https://abc.relay.test/".into())
        );
        assert_eq!(
            host_and_url("abc", "relay.test", 8443).1,
            "https://abc.relay.test:8443/"
        );
    }
}
