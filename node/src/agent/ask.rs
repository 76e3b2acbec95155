//! The asking side, on any device: put a request into a conversation document, tell the agent
//! over `/iom/agent/1` when it is reachable, and follow the request's progress as the
//! document changes (locally or by sync). [`Asking`] is the service; it also serves
//! `/iom/agent/1` (the agent's end of the notification).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use iom_crdt::{AttachmentView, DocId, DocumentError, Interface, MessageView, Status};
use iom_protocol::keys::DeviceId;
use iom_protocol::wire::{AgentRequest, AgentResponse, MAX_AGENT_FRAME};
use libp2p::PeerId;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::conversations::{Conversations, EditError, ExistingError, title_from};
use super::role::AgentRole;
use super::runner::Poke;
use crate::docs::DocsError;
use crate::identity::SharedIdentity;
use crate::net::framed::{FramedError, read_msg, write_msg};
use crate::net::{AGENT_PROTOCOL, Link, Net, NetError};
use crate::sync::gate::{Gate, Verdict};
use crate::trust::TrustBook;

/// Longest prompt accepted.
pub const MAX_PROMPT_BYTES: usize = 256 * 1024;
/// How long the agent's answer to a notification is awaited.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request read on `/iom/agent/1`.
const MAX_REQUEST_FRAME: usize = 4096;
/// A follower looks again after this long without a change (a safety net).
const FOLLOW_POLL: Duration = Duration::from_secs(2);

/// What `ask` reports back at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

/// Why a request could not be put into a conversation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AskError {
    /// The prompt is empty (or only white space).
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt is longer than [`MAX_PROMPT_BYTES`].
    #[error("the prompt is {0} bytes; at most {MAX_PROMPT_BYTES}")]
    PromptTooLong(usize),
    /// The request id is empty or too long.
    #[error("a request id is 1 to 128 characters")]
    BadRequestId,
    /// The given conversation is not usable.
    #[error(transparent)]
    Conversation(#[from] ExistingError),
    /// The conversation could not be created or changed.
    #[error(transparent)]
    Edit(#[from] EditError),
    /// An attachment's name or hash is unusable, or there are too many.
    #[error("bad attachment: {0}")]
    BadAttachment(String),
    /// An attached blob is not stored on this device.
    #[error(
        "attachment {name:?}: blob {hash} is not stored on this device (add it first: POST /v1/blobs or `iom blob add`)"
    )]
    AttachmentMissing {
        /// The file name.
        name: String,
        /// The blob hash.
        hash: String,
    },
    /// The attachments are bigger than [`MAX_ATTACHMENT_BYTES`] together.
    #[error("the attachments are {0} bytes together; at most {MAX_ATTACHMENT_BYTES}")]
    AttachmentsTooBig(u64),
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The model choice is not `NAME` or `NAME/MODEL`.
    #[error("bad model choice: {0}")]
    BadModel(String),
}

/// A file to attach to a request: a blob already stored on this device, and its name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attach {
    /// File name (no directories; it becomes `/workspace/attachments/NAME`).
    pub name: String,
    /// The blob's SHA-256 (64 hex characters).
    pub hash: String,
}

/// Most files attached to one request.
pub const MAX_ATTACHMENTS: usize = 16;
/// Largest size of one request's attachments together.
pub const MAX_ATTACHMENT_BYTES: u64 = 32 << 20;
/// Where the agent's tools find a request's attachments.
pub const ATTACHMENTS_DIR: &str = "/workspace/attachments";

/// Checks a file name for an attachment: one path component, printable, not `.` or `..`.
pub fn check_attachment_name(name: &str) -> Result<(), AskError> {
    let bad = name.is_empty()
        || name.len() > 255
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\\')
        || name.chars().any(char::is_control);
    if bad {
        return Err(AskError::BadAttachment(format!(
            "{name:?} is not a usable file name (one path component, 1 to 255 bytes, no control \
             characters)"
        )));
    }
    Ok(())
}

/// Why a request could not be followed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FollowError {
    /// The document could not be read.
    #[error(transparent)]
    Docs(#[from] DocsError),
    /// The document is not a conversation.
    #[error(transparent)]
    NotAConversation(#[from] DocumentError),
    /// No such request in the conversation.
    #[error("no request {0} in this conversation")]
    NoRequest(String),
}

/// Why the agent could not be told about a request (it learns by sync anyway).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotifyError {
    /// No stream to the agent.
    #[error(transparent)]
    Open(#[from] NetError),
    /// The stream failed.
    #[error(transparent)]
    Frame(#[from] FramedError),
    /// The agent did not answer in time.
    #[error("timed out")]
    Timeout,
}

/// How the asking side reaches the agent device.
pub trait AgentLink: Send + Sync {
    /// Whether there is no connection to `peer` now.
    fn is_offline(&self, peer: &PeerId) -> bool;
    /// Tells `peer` (the agent) that request `request_id` waits in `doc`; returns its answer.
    fn notify(
        &self,
        peer: PeerId,
        doc: DocId,
        request_id: String,
    ) -> BoxFuture<'static, Result<Option<AgentResponse>, NotifyError>>;
}

/// [`AgentLink`] over libp2p: `/iom/agent/1` streams.
#[derive(Debug, Clone)]
pub struct NetLink(pub Net);

impl AgentLink for NetLink {
    fn is_offline(&self, peer: &PeerId) -> bool {
        self.0.link(peer) == Link::Offline
    }

    fn notify(
        &self,
        peer: PeerId,
        doc: DocId,
        request_id: String,
    ) -> BoxFuture<'static, Result<Option<AgentResponse>, NotifyError>> {
        let net = self.0.clone();
        Box::pin(async move {
            let mut s = net.open(peer, AGENT_PROTOCOL).await?;
            let req = AgentRequest::Notify {
                doc: *doc.as_bytes(),
                request_id,
            };
            write_msg(&mut s, &req, MAX_AGENT_FRAME).await?;
            tokio::time::timeout(
                NOTIFY_TIMEOUT,
                read_msg::<AgentResponse, _>(&mut s, MAX_AGENT_FRAME),
            )
            .await
            .map_err(|_| NotifyError::Timeout)?
            .map_err(NotifyError::from)
        })
    }
}

/// What [`Asking`] is built from.
pub struct Deps {
    /// Conversation documents.
    pub conversations: Conversations,
    /// This device's keys.
    pub identity: SharedIdentity,
    /// Certificates (who may ask, who holds the role).
    pub trust: Arc<TrustBook>,
    /// The way to the agent device.
    pub link: Arc<dyn AgentLink>,
    /// This device's runner (poked when this device is the agent).
    pub runner: Arc<dyn Poke>,
    /// Refusal accounting for untrusted peers.
    pub gate: Arc<Gate>,
}

/// The asking service.
pub struct Asking {
    conversations: Conversations,
    role: AgentRole,
    trust: Arc<TrustBook>,
    link: Arc<dyn AgentLink>,
    runner: Arc<dyn Poke>,
    gate: Arc<Gate>,
    tasks: Mutex<JoinSet<()>>,
}

impl std::fmt::Debug for Asking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Asking").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Asking {
    /// The service over `deps`.
    pub fn new(deps: Deps) -> Arc<Asking> {
        Arc::new(Asking {
            conversations: deps.conversations,
            role: AgentRole::new(deps.identity, deps.trust.clone()),
            trust: deps.trust,
            link: deps.link,
            runner: deps.runner,
            gate: deps.gate,
            tasks: Mutex::new(JoinSet::new()),
        })
    }

    /// The conversation documents.
    pub fn conversations(&self) -> &Conversations {
        &self.conversations
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = lock(&self.tasks);
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task.instrument(tracing::Span::current()));
    }

    /// Stops the service's tasks (notifications in flight, the `/iom/agent/1` server).
    pub async fn stop(&self) {
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        tasks.shutdown().await;
    }

    /// Creates a conversation titled after (the start of) `prompt`.
    pub async fn new_conversation(&self, prompt: &str) -> Result<DocId, EditError> {
        self.conversations.create(&title_from(prompt)).await
    }

    /// Puts a request into a conversation (a new one if `conversation` is `None`) and tells
    /// the agent (or this device's runner) about it.
    pub async fn ask(
        &self,
        prompt: &str,
        conversation: Option<DocId>,
        interface: Interface,
        request_id: Option<String>,
    ) -> Result<Asked, AskError> {
        self.ask_with(prompt, conversation, interface, request_id, &[])
            .await
    }

    /// The attachments as recorded, checked: good names, no duplicates, blobs stored here,
    /// within the limits.
    fn attachments(&self, files: &[Attach]) -> Result<Vec<AttachmentView>, AskError> {
        if files.len() > MAX_ATTACHMENTS {
            return Err(AskError::BadAttachment(format!(
                "{} files; at most {MAX_ATTACHMENTS}",
                files.len()
            )));
        }
        let store = self.conversations.docs().store();
        let mut out: Vec<AttachmentView> = Vec::new();
        let mut total = 0u64;
        for f in files {
            check_attachment_name(&f.name)?;
            if out.iter().any(|a| a.name == f.name) {
                return Err(AskError::BadAttachment(format!(
                    "two files are named {:?}",
                    f.name
                )));
            }
            let id = hex::decode(&f.hash)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .ok_or_else(|| {
                    AskError::BadAttachment(format!(
                        "{:?} is not a blob hash (64 hex characters)",
                        f.hash
                    ))
                })?;
            let meta = store
                .blob_meta(&id)?
                .ok_or_else(|| AskError::AttachmentMissing {
                    name: f.name.clone(),
                    hash: f.hash.clone(),
                })?;
            total += meta.len;
            out.push(AttachmentView {
                name: f.name.clone(),
                hash: hex::encode(id),
                len: meta.len,
            });
        }
        if total > MAX_ATTACHMENT_BYTES {
            return Err(AskError::AttachmentsTooBig(total));
        }
        Ok(out)
    }

    /// [`Asking::ask`] with files attached: blobs stored on this device, which the agent
    /// copies into the conversation's tool workspace ([`ATTACHMENTS_DIR`]) before it runs the
    /// request; the prompt names them.
    pub async fn ask_with(
        &self,
        prompt: &str,
        conversation: Option<DocId>,
        interface: Interface,
        request_id: Option<String>,
        files: &[Attach],
    ) -> Result<Asked, AskError> {
        self.ask_model(prompt, conversation, interface, request_id, files, None)
            .await
    }

    /// [`Asking::ask_with`] for a chosen model (`NAME` or `NAME/MODEL`, a provider of
    /// `iom models list`); `None`: the mesh's default. The answer records which model
    /// produced it.
    pub async fn ask_model(
        &self,
        prompt: &str,
        conversation: Option<DocId>,
        interface: Interface,
        request_id: Option<String>,
        files: &[Attach],
        model: Option<&str>,
    ) -> Result<Asked, AskError> {
        let model = model
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(|m| {
                iom_crdt::ModelChoice::parse(m)
                    .map(|c| c.to_string())
                    .map_err(|e| AskError::BadModel(e.to_string()))
            })
            .transpose()?;
        let prompt = prompt.trim();
        if prompt.is_empty() {
            return Err(AskError::EmptyPrompt);
        }
        if prompt.len() > MAX_PROMPT_BYTES {
            return Err(AskError::PromptTooLong(prompt.len()));
        }
        let attachments = self.attachments(files)?;
        let prompt = &with_attachment_note(prompt, &attachments);
        let doc = match conversation {
            Some(id) => self.conversations.existing(id)?,
            None => self.new_conversation(prompt).await?,
        };
        let rid = request_id.unwrap_or_else(|| hex::encode(crate::time::random_bytes::<12>()));
        if rid.is_empty() || rid.chars().count() > 128 {
            return Err(AskError::BadRequestId);
        }
        let me = self.role.me().to_string();
        let (p, r) = (prompt.to_string(), rid.clone());
        self.conversations
            .modify(doc, move |c, now| {
                let out = c.append_request_with(&r, &p, interface, &me, &attachments, now)?;
                if let Some(m) = &model
                    && out.created
                {
                    c.set_request_model(&r, m, now)?;
                }
                Ok(out)
            })
            .await?;
        let (agent, queued, note) = match self.role.holder() {
            None => (
                None,
                true,
                "no device holds the agent role yet; the request is queued until one does                  (`iom agent assign DEVICE`)"
                    .to_string(),
            ),
            Some((device, _)) if device == self.role.me() => {
                self.runner.poke(doc);
                (
                    Some(device.to_string()),
                    false,
                    "the agent is this device".into(),
                )
            }
            Some((device, _)) => {
                let peer = device.to_peer_id();
                let name = self
                    .trust
                    .state()
                    .devices
                    .get(&device)
                    .map(|d| d.name.clone())
                    .unwrap_or_default();
                if self.link.is_offline(&peer) {
                    (
                        Some(device.to_string()),
                        true,
                        format!(
                            "the agent ({name}) is offline; the request is queued and runs when it is back"
                        ),
                    )
                } else {
                    let notify = self.link.notify(peer, doc, rid.clone());
                    self.spawn(async move {
                        let r = notify.await;
                        tracing::debug!(%peer, result = ?r, "notified the agent");
                    });
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

    /// The answer to a request on `/iom/agent/1` from `peer`, and whether to keep the peer.
    pub fn answer(&self, peer: PeerId, req: Option<AgentRequest>) -> (AgentResponse, Verdict) {
        let trusted =
            DeviceId::from_peer_id(&peer).is_ok_and(|d| self.trust.state().is_trusted(&d));
        if !trusted {
            let reason = "not trusted: /iom/agent/1 is only for devices of this person".to_string();
            let verdict = self.gate.refuse(peer, "/iom/agent/1", &reason);
            return (AgentResponse::Refused { reason }, verdict);
        }
        if self.role.my_epoch().is_none() {
            return (AgentResponse::NotAgent, Verdict::Keep);
        }
        if let Some(AgentRequest::Notify { doc, .. }) = req {
            self.runner.poke(DocId::from_bytes(doc));
        }
        let queued = u32::try_from(self.runner.running()).unwrap_or(u32::MAX);
        (AgentResponse::Accepted { queued }, Verdict::Keep)
    }

    /// Serves `/iom/agent/1` until `shutdown` is cancelled (or [`Asking::stop`]).
    pub fn start_server(self: &Arc<Self>, net: &Net, shutdown: &CancellationToken) {
        let mut control = net.control();
        let Ok(mut incoming) = control.accept(AGENT_PROTOCOL) else {
            return;
        };
        let (this, net, stop) = (self.clone(), net.clone(), shutdown.clone());
        self.spawn(async move {
            loop {
                let (peer, mut stream) = tokio::select! {
                    () = stop.cancelled() => return,
                    next = incoming.next() => match next {
                        Some(s) => s,
                        None => return,
                    },
                };
                let (me, net) = (this.clone(), net.clone());
                this.spawn(async move {
                    let req: Option<AgentRequest> =
                        match read_msg(&mut stream, MAX_REQUEST_FRAME).await {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::debug!(%peer, error = %e, "bad agent request");
                                return;
                            }
                        };
                    let (resp, verdict) = me.answer(peer, req);
                    if verdict == Verdict::Disconnect {
                        net.disconnect(peer).await;
                    }
                    let _ = write_msg(&mut stream, &resp, MAX_AGENT_FRAME).await;
                    let _ = futures::AsyncWriteExt::close(&mut stream).await;
                });
            }
        });
    }

    /// Follows a request until it is done or failed, as a stream of events (it ends after
    /// the `done` or `failed` event, or after an error, reported as `failed`).
    pub fn follow(
        &self,
        doc: DocId,
        rid: String,
    ) -> impl futures::Stream<Item = RequestEvent> + Send + 'static + use<> {
        follow(self.conversations.clone(), doc, rid)
    }
}

/// The prompt followed by a note naming the attached files and where the tools find them.
pub fn with_attachment_note(prompt: &str, attachments: &[AttachmentView]) -> String {
    if attachments.is_empty() {
        return prompt.to_string();
    }
    let mut out = format!("{prompt}\n\n[Attached files, readable with your tools:");
    for a in attachments {
        out.push_str(&format!(
            "\n- {ATTACHMENTS_DIR}/{} ({} bytes, sha256 {})",
            a.name, a.len, a.hash
        ));
    }
    out.push(']');
    out
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
    /// An approval the run asked for, when it appears and each time its state changes.
    Approval {
        /// Approval id (`iom approve ID`).
        id: String,
        /// The tool.
        tool: String,
        /// Its arguments (JSON text).
        input: String,
        /// What the call will touch.
        touches: Vec<String>,
        /// `pending`, `approved`, `denied` or `expired`.
        state: String,
        /// Unix seconds when an unanswered request is denied.
        expires_at: i64,
        /// Why it was decided so.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A file the agent sent to the asking device (a blob).
    File {
        /// File name.
        name: String,
        /// The blob's SHA-256 (`iom blob get HASH`).
        hash: String,
        /// Size in bytes.
        len: u64,
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
        /// A note (e.g. a limit stopped it, or another model answered).
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        /// The `provider/model` that produced the answer.
        #[serde(skip_serializing_if = "Option::is_none")]
        model: Option<String>,
    },
    /// The request failed.
    Failed {
        /// Why.
        error: String,
        /// What kind of failure, for programs (the CLI's exit code).
        reason: FailReason,
    },
}

/// The kind of a failure, for programs ([`RequestEvent::Failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailReason {
    /// A budget of the agent (tokens or money, per day or month, mesh or device) is used up.
    BudgetExceeded,
    /// The asking device sent too many requests in the last minute.
    RateLimited,
    /// The agent stopped (a crash or a restart) while it ran the request.
    Interrupted,
    /// Anything else (the model API, the key, the request itself).
    Error,
}

impl FailReason {
    /// Classifies a failure message as the runner writes it.
    pub fn of(error: &str) -> FailReason {
        use super::runner::{BUDGET_EXHAUSTED, INTERRUPTED, RATE_LIMITED};
        // "the daily token budget": how failures read before budgets per month and device.
        if error.starts_with(BUDGET_EXHAUSTED) || error.starts_with("the daily token budget") {
            FailReason::BudgetExceeded
        } else if error.starts_with(RATE_LIMITED) {
            FailReason::RateLimited
        } else if error.starts_with(INTERRUPTED) {
            FailReason::Interrupted
        } else {
            FailReason::Error
        }
    }
}

impl RequestEvent {
    /// A failure with `error`, classified.
    pub fn failed(error: impl Into<String>) -> RequestEvent {
        let error = error.into();
        RequestEvent::Failed {
            reason: FailReason::of(&error),
            error,
        }
    }

    /// Whether this is the last event of a request (`done` or `failed`).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            RequestEvent::Done { .. } | RequestEvent::Failed { .. }
        )
    }
}

/// What a follower has already reported of one request; [`Seen::diff`] gives the events for
/// what is new since.
#[derive(Debug, Default)]
pub struct Seen {
    status: Option<Status>,
    text_len: usize,
    tools_started: usize,
    tools_finished: usize,
    retry: Option<String>,
    approvals: std::collections::HashMap<String, iom_crdt::approvals::State>,
    files: usize,
}

impl Seen {
    /// The events for approvals and sent files of the request that are new since the last
    /// call.
    pub fn extras(
        &mut self,
        approvals: &[iom_crdt::ApprovalView],
        files: &[iom_crdt::SentFile],
    ) -> Vec<RequestEvent> {
        let mut out = Vec::new();
        for a in approvals {
            if self.approvals.get(&a.id) == Some(&a.state) {
                continue;
            }
            self.approvals.insert(a.id.clone(), a.state);
            out.push(RequestEvent::Approval {
                id: a.id.clone(),
                tool: a.tool.clone(),
                input: a.input.clone(),
                touches: a.touches.clone(),
                state: a.state.name().to_string(),
                expires_at: a.expires_at,
                reason: a.reason.clone(),
            });
        }
        for f in files.iter().skip(self.files) {
            out.push(RequestEvent::File {
                name: f.name.clone(),
                hash: f.hash.clone(),
                len: f.len,
            });
        }
        self.files = self.files.max(files.len());
        out
    }

    /// The events for what changed in request `req` (and its `reply`, once there) since the
    /// last call.
    pub fn diff(&mut self, req: &MessageView, reply: Option<&MessageView>) -> Vec<RequestEvent> {
        diff(self, req, reply)
    }
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
    let p = req.progress.clone().unwrap_or_default();
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
                    model: reply.model.clone(),
                });
            }
        }
        Some(Status::Failed) => out.push(RequestEvent::failed(
            req.error.clone().unwrap_or_else(|| "failed".into()),
        )),
        _ => {}
    }
    out
}

/// A request, its last reply, and its approvals and sent files.
type Snapshot = (
    MessageView,
    Option<MessageView>,
    Vec<iom_crdt::ApprovalView>,
    Vec<iom_crdt::SentFile>,
);

async fn snapshot(
    conversations: &Conversations,
    doc: DocId,
    rid: &str,
) -> Result<Snapshot, FollowError> {
    let rid = rid.to_string();
    conversations
        .read(doc, move |c| {
            let req = c
                .find_request(&rid)
                .ok_or_else(|| FollowError::NoRequest(rid.clone()))?;
            let reply = c.replies_to(&rid).into_iter().last();
            let approvals = iom_crdt::Approvals::open(c.document())
                .map(|a| a.of_request(&rid))
                .unwrap_or_default();
            let files = iom_crdt::Outbox::open(c.document())
                .map(|o| o.of_request(&rid))
                .unwrap_or_default();
            Ok((req, reply, approvals, files))
        })
        .await??
}

struct Following {
    conversations: Conversations,
    doc: DocId,
    rid: String,
    changes: tokio::sync::broadcast::Receiver<crate::docs::DocChanged>,
    seen: Seen,
    queue: VecDeque<RequestEvent>,
    finished: bool,
    looked: bool,
}

impl Following {
    /// Waits for the next change to this document (or polls slowly as a safety net).
    async fn wait_for_change(&mut self) {
        super::conversations::next_change(&mut self.changes, self.doc, FOLLOW_POLL).await;
    }

    async fn look(&mut self) {
        match snapshot(&self.conversations, self.doc, &self.rid).await {
            Ok((req, reply, approvals, files)) => {
                let mut events = self.seen.extras(&approvals, &files);
                events.extend(diff(&mut self.seen, &req, reply.as_ref()));
                self.finished = events.iter().any(RequestEvent::is_final);
                self.queue.extend(events);
            }
            Err(e) => {
                self.queue.push_back(RequestEvent::failed(e.to_string()));
                self.finished = true;
            }
        }
    }
}

/// Follows request `rid` of conversation `doc` (see [`Asking::follow`]).
pub fn follow(
    conversations: Conversations,
    doc: DocId,
    rid: String,
) -> impl futures::Stream<Item = RequestEvent> + Send + 'static {
    let changes = conversations.docs().subscribe();
    let state = Following {
        conversations,
        doc,
        rid,
        changes,
        seen: Seen::default(),
        queue: VecDeque::new(),
        finished: false,
        looked: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Some((e, st));
            }
            if st.finished {
                return None;
            }
            if st.looked {
                st.wait_for_change().await;
            }
            st.looked = true;
            st.look().await;
        }
    })
}

#[cfg(test)]
mod tests;
