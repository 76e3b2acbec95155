//! ACME HTTP-01 through the relay (`--http-listen`, port 80 on a real relay): a request for
//! `http://DEVICE.DOMAIN/.well-known/acme-challenge/TOKEN` is answered by asking that device
//! for the token over `/iom/acme-http/1`; everything else gets `404`. The device answers from
//! its webroot (`DATA/tls/webroot/.well-known/acme-challenge/TOKEN`, where an ACME client
//! such as `lego --http.webroot` or `certbot --webroot` puts it).
//!
//! # Wire format
//!
//! Over one raw stream opened by the relay: relay → device one frame (4-byte big-endian
//! length) holding the CBOR map [`AcmeQuery`]; device → relay one frame holding
//! [`AcmeAnswer`]. Frames are at most [`MAX_ACME_FRAME`] bytes.

use std::sync::Arc;
use std::time::Duration;

use futures::AsyncWriteExt as _;
use iom_protocol::http_head::{self, HeadPeek};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::auth::{read_frame, write_frame};
use super::web::WebNames;

/// The protocol the relay asks a device for a challenge's key authorization with.
pub const ACME_HTTP_PROTOCOL: StreamProtocol = StreamProtocol::new("/iom/acme-http/1");
/// The largest frame either way.
pub const MAX_ACME_FRAME: usize = 2 * 1024;
/// Time a client has to send its request head, and a device to answer.
pub const ACME_TIMEOUT: Duration = Duration::from_secs(5);

/// The relay's question: the challenge token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeQuery {
    /// The token (base64url characters, see [`http_head::acme_token`]).
    pub token: String,
}

/// The device's answer: the key authorization, if it has one for the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeAnswer {
    /// The response body (`TOKEN.THUMBPRINT`), or `None` for "not found".
    pub key_authorization: Option<String>,
}

/// Serves HTTP on `listener` for names under `domain` until aborted.
pub async fn serve_http(
    listener: TcpListener,
    names: WebNames,
    control: libp2p_stream::Control,
    domain: Arc<str>,
) {
    let pending = Arc::new(tokio::sync::Semaphore::new(256));
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            continue;
        };
        let (names, control, domain) = (names.clone(), control.clone(), domain.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let answer =
                tokio::time::timeout(2 * ACME_TIMEOUT, handle(tcp, &names, control, &domain)).await;
            match answer {
                Ok(Ok(what)) => tracing::info!(%from, "relay HTTP: {what}"),
                Ok(Err(e)) => tracing::debug!(%from, "relay HTTP failed: {e}"),
                Err(_) => tracing::debug!(%from, "relay HTTP timed out"),
            }
        });
    }
}

/// Answers one request; returns what happened, for the log.
async fn handle(
    mut tcp: TcpStream,
    names: &WebNames,
    mut control: libp2p_stream::Control,
    domain: &str,
) -> std::io::Result<String> {
    let head = match tokio::time::timeout(ACME_TIMEOUT, read_head(&mut tcp)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => {
            respond(&mut tcp, 400, "bad request\n").await?;
            return Ok("not an HTTP request".into());
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok("no request head in time".into()),
    };
    let host = head.host.clone().unwrap_or_default();
    let label = iom_protocol::sni::label_under(&host, domain);
    let token = http_head::acme_token(&head.path);
    let (Some(label), Some(token), "GET" | "HEAD") = (label, token, head.method.as_str()) else {
        respond(&mut tcp, 404, "not found\n").await?;
        return Ok(format!("404 for {host:?} {:?}", head.path));
    };
    let Some(peer) = names.peer(label) else {
        respond(&mut tcp, 404, "not found\n").await?;
        return Ok(format!("404: no device named {label:?}"));
    };
    let asked = tokio::time::timeout(ACME_TIMEOUT, ask(&mut control, peer, token)).await;
    match asked {
        Ok(Ok(Some(body))) => {
            respond(&mut tcp, 200, &body).await?;
            Ok(format!("challenge {token} answered by {peer}"))
        }
        Ok(Ok(None)) => {
            respond(&mut tcp, 404, "not found\n").await?;
            Ok(format!("device {peer} has no challenge {token}"))
        }
        Ok(Err(e)) => {
            respond(&mut tcp, 502, "the device did not answer\n").await?;
            Ok(format!("device {peer} failed: {e}"))
        }
        Err(_) => {
            respond(&mut tcp, 504, "the device did not answer\n").await?;
            Ok(format!("device {peer} timed out"))
        }
    }
}

/// Reads a request head; `None` if the bytes are not one.
async fn read_head(tcp: &mut TcpStream) -> std::io::Result<Option<http_head::RequestHead>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        match http_head::parse_request_head(&buf) {
            Ok(HeadPeek::Head(head)) => return Ok(Some(head)),
            Ok(HeadPeek::NeedMore) => {}
            Err(_) => return Ok(None),
        }
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn ask(
    control: &mut libp2p_stream::Control,
    peer: libp2p::PeerId,
    token: &str,
) -> std::io::Result<Option<String>> {
    let mut stream = control
        .open_stream(peer, ACME_HTTP_PROTOCOL)
        .await
        .map_err(std::io::Error::other)?;
    let query = serde_cbor::to_vec(&AcmeQuery {
        token: token.to_string(),
    })
    .map_err(std::io::Error::other)?;
    write_frame(&mut stream, &query).await?;
    let reply = read_frame(&mut stream, MAX_ACME_FRAME).await?;
    let _ = stream.close().await;
    let answer: AcmeAnswer = serde_cbor::from_slice(&reply)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(answer.key_authorization)
}

async fn respond(tcp: &mut TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        502 => "Bad Gateway",
        _ => "Gateway Timeout",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body.as_bytes()).await?;
    tcp.shutdown().await
}

/// The device side: answers `/iom/acme-http/1` from `webroot`
/// (`webroot/.well-known/acme-challenge/TOKEN`, at most 1 KiB).
pub async fn answer_query<S>(mut stream: S, webroot: &std::path::Path) -> std::io::Result<()>
where
    S: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    let query = read_frame(&mut stream, MAX_ACME_FRAME).await?;
    let query: AcmeQuery = serde_cbor::from_slice(&query)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let path = format!("{}{}", http_head::ACME_PREFIX, query.token);
    let key_authorization = match http_head::acme_token(&path) {
        Some(token) => read_challenge(webroot, token),
        None => None,
    };
    let reply =
        serde_cbor::to_vec(&AcmeAnswer { key_authorization }).map_err(std::io::Error::other)?;
    write_frame(&mut stream, &reply).await?;
    let _ = stream.close().await;
    Ok(())
}

fn read_challenge(webroot: &std::path::Path, token: &str) -> Option<String> {
    let file = webroot.join(".well-known/acme-challenge").join(token);
    let meta = std::fs::metadata(&file).ok()?;
    if !meta.is_file() || meta.len() > 1024 {
        return None;
    }
    let text = std::fs::read_to_string(&file).ok()?;
    Some(text.trim().to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_read_from_the_webroot_only() {
        let dir = tempfile::tempdir().unwrap();
        let challenges = dir.path().join(".well-known/acme-challenge");
        std::fs::create_dir_all(&challenges).unwrap();
        std::fs::write(challenges.join("tok"), "tok.thumb\n").unwrap();
        std::fs::write(challenges.join("big"), vec![b'a'; 2000]).unwrap();
        std::fs::write(dir.path().join("secret"), "no").unwrap();
        assert_eq!(
            read_challenge(dir.path(), "tok").as_deref(),
            Some("tok.thumb")
        );
        assert_eq!(read_challenge(dir.path(), "big"), None);
        assert_eq!(read_challenge(dir.path(), "missing"), None);
        assert_eq!(read_challenge(dir.path(), "."), None, "a directory");
    }
}
