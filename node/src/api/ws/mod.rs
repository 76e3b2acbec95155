//! The WebSocket API: `GET /v1/ws` upgrades to one socket that sends asks and hears every
//! event of the mesh (see [`codec`] for the messages and `docs/asyncapi.yaml`).
//!
//! Auth is the HTTP listener's: a bearer token in `Authorization`, or (for browsers) in the
//! subprotocol list as `iom.bearer.TOKEN` next to `iom.v1`. On the unix socket no token is
//! needed (the socket is the owner's, mode 0600). A socket opened with a token is closed
//! with [`close::REVOKED`] as soon as that token is revoked.
//!
//! Backpressure: the server queues at most [`SEND_QUEUE`] messages for a client; a client
//! that falls that far behind is closed with [`close::TOO_SLOW`], so a slow reader never
//! grows the node's memory. Streamed text is coalesced by the feed (one `text` event per
//! look at the document), so a fast model does not by itself fill the queue.
//!
//! # Layout
//! - [`codec`]: the messages (pure).
//! - [`feed`]: what a socket hears of the mesh.

pub mod codec;
pub mod feed;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, State};
use axum::http::HeaderValue;
use axum::response::Response;
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use tokio::sync::{broadcast, mpsc, watch};

use self::codec::{ClientMsg, ServerMsg, close};
use self::feed::MeshFeed;
use super::ApiError;
use super::routes::parse_doc_id;
use crate::http::tokens::{self, TokenRecord};
use crate::node::NodeCtx;

/// Messages queued for one client before it is closed as too slow.
pub const SEND_QUEUE: usize = 256;
/// How often the requests a socket follows are looked at without a change (a safety net).
const LOOK_AGAIN: Duration = Duration::from_secs(2);
/// How long the close frame may take to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Who opened a socket: a token (HTTP listener), or the owner (unix socket).
#[derive(Debug, Clone)]
pub enum Principal {
    /// The unix socket.
    Owner,
    /// A bearer token (its record as verified at upgrade).
    Token(TokenRecord),
    /// A browser device's session.
    Browser(iom_protocol::keys::DeviceId),
}

/// The route.
pub fn routes() -> axum::Router<Arc<NodeCtx>> {
    axum::Router::new().route("/v1/ws", get(upgrade))
}

async fn upgrade(
    State(ctx): State<Arc<NodeCtx>>,
    token: Option<Extension<TokenRecord>>,
    session: Option<Extension<crate::http::SessionDevice>>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let principal = match (token, session) {
        (Some(Extension(t)), _) => Principal::Token(t),
        (None, Some(Extension(s))) => Principal::Browser(s.0),
        (None, None) => Principal::Owner,
    };
    let mut ws = ws
        .max_message_size(codec::MAX_CLIENT_MESSAGE)
        .max_frame_size(codec::MAX_CLIENT_MESSAGE);
    // Answer with `iom.v1` when it was offered (browsers require one of theirs back); a
    // client that offers only other protocols gets none, as RFC 6455 allows.
    if ws
        .requested_protocols()
        .any(|p| p.as_bytes() == codec::PROTOCOL.as_bytes())
    {
        ws.set_selected_protocol(HeaderValue::from_static(codec::PROTOCOL));
    }
    Ok(ws.on_upgrade(move |socket| serve(ctx, socket, principal)))
}

/// Why the server closes a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Closing {
    code: u16,
    reason: String,
}

impl Closing {
    fn new(code: u16, reason: impl Into<String>) -> Closing {
        Closing {
            code,
            reason: reason.into(),
        }
    }
}

/// The outgoing side: a bounded queue to the writer task, and the close signal that jumps
/// the queue.
struct Outbox {
    queue: mpsc::Sender<String>,
    close: watch::Sender<Option<Closing>>,
}

impl Outbox {
    /// Queues `msg`; false when the socket is closing (too slow, or the writer is gone).
    fn push(&self, msg: &ServerMsg) -> bool {
        match self.queue.try_send(msg.encode()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(Closing::new(
                    close::TOO_SLOW,
                    format!("too slow: {SEND_QUEUE} messages were waiting to be read"),
                ));
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn push_all(&self, msgs: impl IntoIterator<Item = ServerMsg>) -> bool {
        msgs.into_iter().all(|m| self.push(&m))
    }

    fn close(&self, why: Closing) {
        self.close.send_if_modified(|c| {
            if c.is_none() {
                tracing::info!(code = why.code, reason = %why.reason, "closing a websocket");
                *c = Some(why);
                true
            } else {
                false
            }
        });
    }
}

/// Resolves once a close was asked for (the guard is dropped before it returns).
async fn closing(rx: &mut watch::Receiver<Option<Closing>>) {
    if rx.wait_for(Option::is_some).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves once the node is shutting down.
async fn stopping(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Sends queued messages until the queue ends or a close is asked for; then sends the close
/// frame (bounded in time: a client that reads nothing does not get to hold the task).
async fn write(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<String>,
    mut close_rx: watch::Receiver<Option<Closing>>,
) {
    loop {
        let next = tokio::select! {
            biased;
            () = closing(&mut close_rx) => break,
            next = queue.recv() => next,
        };
        let Some(text) = next else { break };
        tokio::select! {
            biased;
            () = closing(&mut close_rx) => break,
            r = sink.send(Message::Text(Utf8Bytes::from(text))) => if r.is_err() { return },
        }
    }
    let why = close_rx.borrow().clone();
    let frame = why.map(|c| CloseFrame {
        code: c.code,
        reason: Utf8Bytes::from(c.reason),
    });
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = sink.send(Message::Close(frame)).await;
        let _ = sink.close().await;
    })
    .await;
}

/// Runs one socket until the client leaves, the server closes it, or the node stops.
async fn serve(ctx: Arc<NodeCtx>, socket: WebSocket, principal: Principal) {
    let (sink, mut stream) = socket.split();
    let (queue_tx, queue_rx) = mpsc::channel(SEND_QUEUE);
    let (close_tx, mut close_rx) = watch::channel(None);
    let writer = tokio::spawn(write(sink, queue_rx, close_tx.subscribe()));
    let out = Outbox {
        queue: queue_tx,
        close: close_tx,
    };
    let mut changes = ctx.docs.subscribe();
    let mut revoked = ctx.token_revoked.subscribe();
    let mut trust = ctx.trust.subscribe();
    let mut shutdown = ctx.shutdown.clone();
    let mut feed = MeshFeed::new(ctx.asking.conversations().clone());
    let mut tick = tokio::time::interval(LOOK_AGAIN);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    out.push(&ServerMsg::Hello {
        protocol: codec::PROTOCOL,
        device: ctx.device_id(),
        max_message_bytes: codec::MAX_CLIENT_MESSAGE,
        send_queue: SEND_QUEUE,
    });
    tracing::debug!(?principal, "websocket open");
    loop {
        tokio::select! {
            biased;
            () = closing(&mut close_rx) => break,
            () = stopping(&mut shutdown) => {
                out.close(Closing::new(1001, "the node is shutting down"));
            }
            r = revoked.recv() => {
                // Any revocation (or a lag) makes the socket check its own token again.
                if r != Err(broadcast::error::RecvError::Closed) && !still_valid(&ctx, &principal) {
                    out.close(Closing::new(close::REVOKED, "the token was revoked"));
                }
            }
            Ok(()) = trust.changed() => {
                if !still_valid(&ctx, &principal) {
                    out.close(Closing::new(close::REVOKED, "the device was revoked"));
                }
            }
            frame = stream.next() => match frame {
                None => break,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "websocket read failed");
                    out.close(read_error(&e));
                }
                Some(Ok(Message::Text(text))) => {
                    handle(&ctx, &out, &mut feed, text.as_str()).await;
                }
                Some(Ok(Message::Binary(b))) => { out.push(&codec::binary_refused(b.len())); }
                Some(Ok(Message::Close(_))) => break,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            },
            change = changes.recv() => match change {
                Ok(change) => { out.push_all(feed.on_change(&change).await); }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    out.push(&ServerMsg::Lagged { missed });
                    out.push_all(feed.look_again().await);
                }
                Err(broadcast::error::RecvError::Closed) => {
                    out.close(Closing::new(1001, "the node is shutting down"));
                }
            },
            _ = tick.tick() => {
                if feed.following() > 0 {
                    out.push_all(feed.look_again().await);
                }
            }
        }
    }
    let server_closed = close_rx.borrow().is_some();
    drop(out); // ends the writer's queue; a close asked for above is sent first
    let _ = writer.await;
    if server_closed {
        // Keep the connection a moment so the client reads the close frame: dropping it with
        // unread input (a message over the limit) would reset it and lose the frame.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            loop {
                match stream.next().await {
                    None | Some(Ok(Message::Close(_))) => return,
                    Some(Err(_)) => std::future::pending::<()>().await,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
    }
    tracing::debug!(?principal, "websocket closed");
}

/// The close for a failed read: 1009 for a message over the limit, else a protocol error.
fn read_error(e: &axum::Error) -> Closing {
    let text = e.to_string();
    if text.contains("Space limit exceeded") || text.contains("too long") || text.contains("size") {
        Closing::new(
            1009,
            format!("a message is at most {} bytes", codec::MAX_CLIENT_MESSAGE),
        )
    } else {
        let mut reason = format!("bad WebSocket frame: {text}");
        reason.truncate(120); // a close reason is at most 123 bytes
        Closing::new(1002, reason)
    }
}

fn still_valid(ctx: &NodeCtx, principal: &Principal) -> bool {
    match principal {
        Principal::Owner => true,
        Principal::Browser(d) => ctx.trust.state().is_trusted(d),
        Principal::Token(t) => match tokens::list(&ctx.store) {
            Ok(all) => all.iter().any(|r| r.id == t.id && r.hash == t.hash),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the tokens; closing the socket");
                false
            }
        },
    }
}

/// Handles one text frame.
async fn handle(ctx: &NodeCtx, out: &Outbox, feed: &mut MeshFeed, text: &str) {
    let msg = match codec::parse(text) {
        Ok(m) => m,
        Err(refused) => {
            out.push(&refused.into());
            return;
        }
    };
    match msg {
        ClientMsg::Ping { id } => {
            out.push(&ServerMsg::Pong { id });
        }
        ClientMsg::Ask {
            id,
            prompt,
            conversation,
            request_id,
            attachments,
        } => {
            let conversation = match conversation.as_deref().map(parse_doc_id).transpose() {
                Ok(c) => c,
                Err(e) => {
                    out.push(&ServerMsg::error(id, e.code, e.message));
                    return;
                }
            };
            let asked = ctx
                .asking
                .ask_with(
                    &prompt,
                    conversation,
                    iom_crdt::Interface::Web,
                    request_id,
                    &attachments,
                )
                .await;
            match asked {
                Ok(asked) => {
                    if let Ok(doc) = parse_doc_id(&asked.conversation) {
                        feed.asked(doc, &asked.request_id, id.clone());
                    }
                    out.push(&ServerMsg::Asked { id, asked });
                }
                Err(e) => {
                    let e = ApiError::from(e);
                    out.push(&ServerMsg::error(id, e.code, e.message));
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_closes_as_too_slow_and_the_close_jumps_the_queue() {
        let (queue, mut rx) = mpsc::channel(2);
        let (close, mut close_rx) = watch::channel(None);
        let out = Outbox { queue, close };
        let ping = ServerMsg::Pong { id: None };
        assert!(out.push(&ping));
        assert!(out.push(&ping));
        assert!(close_rx.borrow().is_none());
        // The third does not fit: the client is closed, nothing more is queued.
        assert!(!out.push(&ping));
        closing(&mut close_rx).await;
        let why = close_rx.borrow().clone().unwrap();
        assert_eq!(why.code, close::TOO_SLOW);
        assert!(why.reason.contains("too slow"), "{why:?}");
        // A later close does not replace the first reason.
        out.close(Closing::new(close::REVOKED, "the token was revoked"));
        assert_eq!(close_rx.borrow().clone().unwrap().code, close::TOO_SLOW);
        assert_eq!(rx.recv().await.unwrap(), ping.encode());
    }

    #[test]
    fn read_errors_map_to_close_codes_with_short_reasons() {
        let e = axum::Error::new(std::io::Error::other(
            "Space limit exceeded: Message too long",
        ));
        assert_eq!(read_error(&e).code, 1009);
        let e = axum::Error::new(std::io::Error::other("x".repeat(500)));
        let c = read_error(&e);
        assert_eq!(c.code, 1002);
        assert!(c.reason.len() <= 123);
    }
}
