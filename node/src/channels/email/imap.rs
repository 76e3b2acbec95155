//! The IMAP side: connect (TLS or STARTTLS), log in, select the mailbox, fetch the mails
//! after a UID, mark them seen, and IDLE until the server reports a change.

use std::time::Duration;

use async_imap::extensions::idle::IdleResponse;
use futures::TryStreamExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::config::{EmailConfig, Security};

/// A logged-in session.
pub type Session = async_imap::Session<TlsStream<TcpStream>>;

/// Time limit of connecting, logging in and each command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The selected mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selected {
    /// UIDVALIDITY.
    pub uid_validity: u32,
    /// UIDNEXT (the UID the next mail will get).
    pub uid_next: u32,
}

/// One fetched mail.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Its UID.
    pub uid: u32,
    /// Its size (RFC822.SIZE).
    pub size: u64,
    /// The whole mail, unless it is bigger than the limit.
    pub raw: Option<Vec<u8>>,
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {COMMAND_TIMEOUT:?}")),
    }
}

/// Connects, logs in and selects the mailbox.
pub async fn connect(cfg: &EmailConfig, password: &str) -> Result<(Session, Selected), String> {
    let tls = super::tls::connector(cfg)?;
    let server = format!("{}:{}", cfg.imap.host, cfg.imap.port);
    let tcp = timed(&format!("connect to {server}"), TcpStream::connect(&server)).await?;
    let _ = tcp.set_nodelay(true);
    let client = match cfg.imap.security {
        Security::Tls => {
            let stream = super::tls::wrap(&tls, &cfg.imap.host, tcp).await?;
            let mut client = async_imap::Client::new(stream);
            timed("IMAP greeting", client.read_response()).await?;
            client
        }
        Security::Starttls => {
            let mut plain = async_imap::Client::new(tcp);
            timed("IMAP greeting", plain.read_response()).await?;
            timed(
                "STARTTLS (does the server offer it?)",
                plain.run_command_and_check_ok("STARTTLS", None),
            )
            .await?;
            let stream = super::tls::wrap(&tls, &cfg.imap.host, plain.into_inner()).await?;
            async_imap::Client::new(stream)
        }
    };
    let mut session = timed("IMAP login", async {
        client
            .login(&cfg.username, password)
            .await
            .map_err(|(e, _)| e)
    })
    .await?;
    let mb = timed(
        &format!("select {:?}", cfg.mailbox),
        session.select(&cfg.mailbox),
    )
    .await?;
    let uid_validity = mb
        .uid_validity
        .ok_or_else(|| format!("the server sent no UIDVALIDITY for {:?}", cfg.mailbox))?;
    Ok((
        session,
        Selected {
            uid_validity,
            uid_next: mb.uid_next.unwrap_or(1),
        },
    ))
}

/// The UIDs after `last`, in order.
pub async fn uids_after(session: &mut Session, last: u32) -> Result<Vec<u32>, String> {
    let next = last.saturating_add(1);
    let set = timed("UID SEARCH", session.uid_search(format!("UID {next}:*"))).await?;
    // `n:*` also matches the newest mail when it is below n.
    let mut uids: Vec<u32> = set.into_iter().filter(|u| *u > last).collect();
    uids.sort_unstable();
    Ok(uids)
}

/// Fetches one mail (its size first; the body only up to `max_bytes`).
pub async fn fetch(session: &mut Session, uid: u32, max_bytes: u64) -> Result<Fetched, String> {
    let sizes: Vec<_> = timed("UID FETCH size", async {
        session
            .uid_fetch(uid.to_string(), "(UID RFC822.SIZE)")
            .await?
            .try_collect::<Vec<_>>()
            .await
    })
    .await?;
    let size = sizes
        .iter()
        .find(|f| f.uid == Some(uid))
        .and_then(|f| f.size)
        .map_or(0, u64::from);
    if sizes.iter().all(|f| f.uid != Some(uid)) {
        return Ok(Fetched {
            uid,
            size: 0,
            raw: None,
        });
    }
    if size > max_bytes {
        return Ok(Fetched {
            uid,
            size,
            raw: None,
        });
    }
    let bodies: Vec<_> = tokio::time::timeout(COMMAND_TIMEOUT * 4, async {
        session
            .uid_fetch(uid.to_string(), "(UID BODY.PEEK[])")
            .await?
            .try_collect::<Vec<_>>()
            .await
    })
    .await
    .map_err(|_| "UID FETCH body: too slow".to_string())?
    .map_err(|e| format!("UID FETCH body: {e}"))?;
    let raw = bodies
        .iter()
        .find(|f| f.uid == Some(uid))
        .and_then(|f| f.body())
        .map(<[u8]>::to_vec);
    Ok(Fetched { uid, size, raw })
}

/// Marks a mail seen (best effort: a read-only mailbox is no reason to stop).
pub async fn mark_seen(session: &mut Session, uid: u32) {
    let r = timed("UID STORE", async {
        session
            .uid_store(uid.to_string(), "+FLAGS (\\Seen)")
            .await?
            .try_collect::<Vec<_>>()
            .await
    })
    .await;
    if let Err(e) = r {
        tracing::debug!(uid, error = %e, "cannot mark a mail seen");
    }
}

/// IDLEs until the server reports something, `renew` passes, or `stop` resolves; returns
/// the session (or an error when the connection broke).
pub async fn idle(
    session: Session,
    renew: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(Session, bool), String> {
    let mut handle = session.idle();
    timed("IDLE", handle.init()).await?;
    let stopped = {
        let (wait, _interrupt) = handle.wait_with_timeout(renew + Duration::from_secs(60));
        tokio::select! {
            r = tokio::time::timeout(renew, wait) => {
                match r {
                    Ok(Ok(IdleResponse::NewData(_) | IdleResponse::Timeout)) | Err(_) => false,
                    // The stream ended: the server went away; DONE below reports it.
                    Ok(Ok(IdleResponse::ManualInterrupt)) => false,
                    Ok(Err(e)) => return Err(format!("IDLE: {e}")),
                }
            }
            () = stop => true,
        }
    };
    let session = timed("IDLE done", handle.done()).await?;
    while session.unsolicited_responses.try_recv().is_ok() {}
    Ok((session, stopped))
}
