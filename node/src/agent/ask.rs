//! The asking side, on any device: put a request into a conversation document, tell the agent
//! over `/iom/agent/1` when it is reachable, and follow the request's progress as the
//! document changes (locally or by sync).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use iom_crdt::{Conversation, DocId, DocKind, Interface, MessageView, Status};
use iom_protocol::keys::DeviceId;
use iom_protocol::wire::{AgentRequest, AgentResponse, MAX_AGENT_FRAME};
use libp2p::PeerId;
use serde::Serialize;
use serde_json::{Value, json};

use super::progress::RunProgress;
use super::role;
use crate::api::ApiError;
use crate::docs::{DocsError, Origin};
use crate::net::framed::{read_msg, write_msg};
use crate::net::{AGENT_PROTOCOL, Link};
use crate::node::NodeCtx;
use crate::sync::gate::Verdict;

/// Longest prompt accepted.
pub const MAX_PROMPT_BYTES: usize = 256 * 1024;

/// What `ask` reports back at once.
#[derive(Debug, Clone, Serialize)]
pub struct Asked {
    /// The conversation (new or given).
    pub conversation: String,
    /// The request id.
    pub request_id: String,
    /// The agent device, if the mesh has one.
    pub agent: Option<String>,
    /// True when the agent can't be reached now: the request waits in the document.
    pub queued: bool,
    /// A sentence for the user about where the request stands.
    pub note: String,
}

/// Puts a request into a conversation (a new one if `conversation` is `None`).
pub async fn ask(
    ctx: &Arc<NodeCtx>,
    prompt: &str,
    conversation: Option<DocId>,
    interface: Interface,
    request_id: Option<String>,
) -> Result<Asked, ApiError> {
    let prompt = prompt.trim();
    if prompt.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err(ApiError::bad_request(format!(
            "the prompt is {} bytes; at most {MAX_PROMPT_BYTES}",
            prompt.len()
        )));
    }
    let doc = match conversation {
        Some(id) => existing_conversation(ctx, id)?,
        None => new_conversation(ctx, prompt).await?,
    };
    let rid = request_id.unwrap_or_else(|| hex::encode(crate::time::random_bytes::<12>()));
    if rid.is_empty() || rid.len() > 128 {
        return Err(ApiError::bad_request("a request id is 1 to 128 characters"));
    }
    let me = ctx.device_id();
    let (p, r) = (prompt.to_string(), rid.clone());
    let now = crate::time::now_secs() as i64;
    ctx.docs
        .modify(doc, Origin::Local, false, move |d| {
            Conversation::open(&mut *d)
                .map_err(DocsError::from)?
                .append_request(&r, &p, interface, &me, now)
                .map_err(DocsError::from)
        })
        .await?;
    let holder = role::holder(ctx);
    let (agent, queued, note) = match holder {
        None => (
            None,
            true,
            "no device holds the agent role yet; the request is queued until one does \
             (`iom agent assign DEVICE`)"
                .to_string(),
        ),
        Some((device, _)) if device == ctx.identity().device.id() => {
            ctx.agent.poke(doc);
            (
                Some(device.to_string()),
                false,
                "the agent is this device".into(),
            )
        }
        Some((device, _)) => {
            let peer = device.to_peer_id();
            let name = ctx
                .trust
                .state()
                .devices
                .get(&device)
                .map(|d| d.name.clone())
                .unwrap_or_default();
            if ctx.net.link(&peer) == Link::Offline {
                (
                    Some(device.to_string()),
                    true,
                    format!(
                        "the agent ({name}) is offline; the request is queued and runs when it is back"
                    ),
                )
            } else {
                notify(ctx, peer, doc, &rid).await;
                (
                    Some(device.to_string()),
                    false,
                    format!("sent to the agent ({name})"),
                )
            }
        }
    };
    Ok(Asked {
        conversation: doc.to_string(),
        request_id: rid,
        agent,
        queued,
        note,
    })
}

/// Checks that `id` is a conversation stored on this device.
pub fn existing_conversation(ctx: &NodeCtx, id: DocId) -> Result<DocId, ApiError> {
    let meta = ctx.docs.meta(id)?.ok_or_else(|| {
        ApiError::not_found(format!(
            "no conversation {id} on this device (see `iom conversations list`)"
        ))
    })?;
    if meta.kind != DocKind::Conversation.name() {
        return Err(ApiError::bad_request(format!(
            "{id} is a {} document, not a conversation",
            meta.kind
        )));
    }
    Ok(id)
}

/// Creates a conversation titled after (the start of) `title`.
pub async fn new_conversation(ctx: &NodeCtx, title: &str) -> Result<DocId, DocsError> {
    let id = ctx.docs.create(DocKind::Conversation).await?;
    let title: String = title.chars().take(60).collect();
    let now = crate::time::now_secs() as i64;
    ctx.docs
        .modify(id, Origin::Local, false, move |d| {
            Conversation::open(&mut *d)
                .map_err(DocsError::from)?
                .set_title(&title, now)
                .map_err(DocsError::from)
        })
        .await?;
    Ok(id)
}

/// Tells the agent about a request (best effort: sync delivers it anyway).
async fn notify(ctx: &Arc<NodeCtx>, peer: PeerId, doc: DocId, rid: &str) {
    let ctx = ctx.clone();
    let rid = rid.to_string();
    tokio::spawn(async move {
        let r = async {
            let mut s = ctx
                .net
                .open(peer, AGENT_PROTOCOL)
                .await
                .map_err(|e| e.to_string())?;
            write_msg(
                &mut s,
                &AgentRequest::Notify {
                    doc: *doc.as_bytes(),
                    request_id: rid,
                },
                MAX_AGENT_FRAME,
            )
            .await
            .map_err(|e| e.to_string())?;
            tokio::time::timeout(
                Duration::from_secs(5),
                read_msg::<AgentResponse, _>(&mut s, MAX_AGENT_FRAME),
            )
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())
        }
        .await;
        tracing::debug!(%peer, result = ?r, "notified the agent");
    });
}

/// Serves `/iom/agent/1`.
pub fn spawn_server(ctx: Arc<NodeCtx>) {
    let mut control = ctx.net.control();
    let Ok(mut incoming) = control.accept(AGENT_PROTOCOL) else {
        return;
    };
    tokio::spawn(async move {
        while let Some((peer, mut stream)) = incoming.next().await {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let req: Option<AgentRequest> = match read_msg(&mut stream, 4096).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "bad agent request");
                        return;
                    }
                };
                let trusted =
                    DeviceId::from_peer_id(&peer).is_ok_and(|d| ctx.trust.state().is_trusted(&d));
                let resp = if !trusted {
                    let reason =
                        "not trusted: /iom/agent/1 is only for devices of this person".to_string();
                    if ctx.sync.gate.refuse(peer, "/iom/agent/1", &reason) == Verdict::Disconnect {
                        ctx.net.disconnect(peer).await;
                    }
                    AgentResponse::Refused { reason }
                } else if role::my_epoch(&ctx).is_none() {
                    AgentResponse::NotAgent
                } else {
                    if let Some(AgentRequest::Notify { doc, .. }) = req {
                        ctx.agent.poke(DocId::from_bytes(doc));
                    }
                    AgentResponse::Accepted {
                        queued: ctx.agent.running() as u32,
                    }
                };
                let _ = write_msg(&mut stream, &resp, MAX_AGENT_FRAME).await;
                let _ = futures::AsyncWriteExt::close(&mut stream).await;
            });
        }
    });
}

/// One event of a request, as streamed to clients.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RequestEvent {
    /// The status changed.
    Status {
        /// New status.
        status: String,
        /// Agent device running it.
        #[serde(skip_serializing_if = "Option::is_none")]
        agent: Option<String>,
    },
    /// More answer text.
    Text {
        /// The new text.
        delta: String,
    },
    /// A tool call started.
    ToolStarted {
        /// Tool name.
        name: String,
        /// Input JSON.
        input: String,
    },
    /// A tool call finished.
    ToolFinished {
        /// Tool name.
        name: String,
        /// Output (cut).
        output: String,
        /// Failed?
        is_error: bool,
    },
    /// A retry notice.
    Retry {
        /// The notice.
        message: String,
    },
    /// The answer is complete.
    Done {
        /// Full text.
        text: String,
        /// Tokens in.
        input_tokens: u64,
        /// Tokens out.
        output_tokens: u64,
        /// A note (e.g. a limit stopped it).
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    /// The request failed.
    Failed {
        /// Why.
        error: String,
    },
}

#[derive(Default)]
struct Seen {
    status: Option<Status>,
    text_len: usize,
    tools_started: usize,
    tools_finished: usize,
    retry: Option<String>,
}

fn diff(seen: &mut Seen, req: &MessageView, reply: Option<&MessageView>) -> Vec<RequestEvent> {
    let mut out = Vec::new();
    if seen.status != req.status {
        seen.status = req.status;
        if let Some(s) = req.status
            && !matches!(s, Status::Done | Status::Failed)
        {
            out.push(RequestEvent::Status {
                status: s.name().to_string(),
                agent: req.claimed_by.as_ref().map(|c| c.device.clone()),
            });
        }
    }
    let p = RunProgress::parse(req.progress.as_deref());
    if p.text.len() > seen.text_len && p.text.is_char_boundary(seen.text_len) {
        out.push(RequestEvent::Text {
            delta: p.text[seen.text_len..].to_string(),
        });
        seen.text_len = p.text.len();
    }
    for t in p.tools.iter().skip(seen.tools_started) {
        out.push(RequestEvent::ToolStarted {
            name: t.name.clone(),
            input: t.input.clone(),
        });
    }
    seen.tools_started = seen.tools_started.max(p.tools.len());
    let finished: Vec<_> = p.tools.iter().filter(|t| t.output.is_some()).collect();
    for t in finished.iter().skip(seen.tools_finished) {
        out.push(RequestEvent::ToolFinished {
            name: t.name.clone(),
            output: t.output.clone().unwrap_or_default(),
            is_error: t.is_error,
        });
    }
    seen.tools_finished = seen.tools_finished.max(finished.len());
    if p.retry != seen.retry {
        if let Some(r) = &p.retry {
            out.push(RequestEvent::Retry { message: r.clone() });
        }
        seen.retry = p.retry;
    }
    match req.status {
        Some(Status::Done) => {
            if let Some(reply) = reply {
                if reply.text.len() > seen.text_len
                    && reply.text.is_char_boundary(seen.text_len)
                    && reply.text.starts_with(&p.text)
                {
                    out.push(RequestEvent::Text {
                        delta: reply.text[seen.text_len..].to_string(),
                    });
                }
                let usage = reply.usage.unwrap_or_default();
                out.push(RequestEvent::Done {
                    text: reply.text.clone(),
                    input_tokens: usage.input_tokens,
                    output_tokens: usage.output_tokens,
                    note: req.error.clone(),
                });
            }
        }
        Some(Status::Failed) => out.push(RequestEvent::Failed {
            error: req.error.clone().unwrap_or_else(|| "failed".into()),
        }),
        _ => {}
    }
    out
}

async fn snapshot(
    ctx: &NodeCtx,
    doc: DocId,
    rid: &str,
) -> Result<(MessageView, Option<MessageView>), ApiError> {
    let rid = rid.to_string();
    ctx.docs
        .read(doc, move |d| {
            let c = Conversation::open(d).map_err(|e| ApiError::bad_request(e.to_string()))?;
            let req = c.find_request(&rid).ok_or_else(|| {
                ApiError::not_found(format!("no request {rid} in this conversation"))
            })?;
            let reply = c.replies_to(&rid).into_iter().last();
            Ok((req, reply))
        })
        .await?
}

/// Follows a request until it is done or failed, as a stream of events.
pub fn follow(
    ctx: Arc<NodeCtx>,
    doc: DocId,
    rid: String,
) -> impl futures::Stream<Item = RequestEvent> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut changes = ctx.docs.subscribe();
        let mut seen = Seen::default();
        loop {
            let finished = match snapshot(&ctx, doc, &rid).await {
                Ok((req, reply)) => {
                    let events = diff(&mut seen, &req, reply.as_ref());
                    let done = events.iter().any(|e| {
                        matches!(e, RequestEvent::Done { .. } | RequestEvent::Failed { .. })
                    });
                    for e in events {
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                    done
                }
                Err(e) => {
                    let _ = tx.send(RequestEvent::Failed { error: e.message }).await;
                    true
                }
            };
            if finished {
                return;
            }
            // Wait for the next change to this document (or poll slowly as a safety net).
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    match changes.recv().await {
                        Ok(ch) if ch.id == doc => return,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                        Err(_) => {
                            std::future::pending::<()>().await;
                        }
                    }
                }
            })
            .await;
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A conversation as JSON for `iom conversations show`.
pub async fn conversation_json(ctx: &NodeCtx, doc: DocId) -> Result<Value, ApiError> {
    ctx.docs
        .read(doc, move |d| {
            let c = Conversation::open(d)
                .map_err(|e| ApiError::bad_request(format!("{doc} is not a conversation: {e}")))?;
            Ok(json!({
                "id": doc.to_string(),
                "title": c.title(),
                "messages": c.messages(),
                "usage": c.usage_totals(),
            }))
        })
        .await?
}
