//! The agent runner, active on the device that holds the agent role.
//!
//! It watches conversation documents (local changes, changes arriving by sync, and
//! `/iom/agent/1` notifications) for `pending` requests, claims each one under its device and
//! epoch, runs the Claude tool-use loop with tools in the conversation's container, streams
//! progress into the document, and records the answer, tool calls and usage, then `done` or
//! `failed` with a reason. A request is claimed at most once per epoch, so nothing runs twice;
//! requests this device was running when it stopped are marked `failed: interrupted` at start-up
//! (or retried once, by policy).

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Future;
use iom_crdt::{
    ClaimOutcome, Conversation, DocId, DocKind, Memory, MessageView, Role as MsgRole, Status,
    ToolCallView, UsageView,
};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};

use super::claude::{
    ApiKey, ClaudeClient, ClaudeConfig, Limits, Message, Progress, ToolExecutor, ToolResult,
    fit_history, run_conversation,
};
use super::progress::{RunProgress, ToolProgress};
use super::role;
use super::sandbox::Sandbox;
use crate::docs::{DocsError, Origin};
use crate::node::NodeCtx;

/// Requests run at once (across conversations; one at a time per conversation).
const MAX_CONCURRENT: usize = 4;
/// How often progress is written into the document while a request runs.
const PROGRESS_EVERY: Duration = Duration::from_millis(150);

/// The agent service (present on every node; active only while it holds the role).
pub struct Agent {
    running: Mutex<HashSet<(DocId, String)>>,
    busy_conversations: Mutex<HashSet<DocId>>,
    rate: Mutex<HashMap<String, VecDeque<Instant>>>,
    slots: Semaphore,
    /// Connected on first use; a failed connection is not kept, so the next tool call tries
    /// again (Docker may have been started, or the error is shown again, fresh).
    sandbox: tokio::sync::Mutex<Option<Arc<Sandbox>>>,
    /// Stops the sandbox's idle reaper and removes its containers.
    reaper_stop: tokio_util::sync::CancellationToken,
    scan_tx: mpsc::Sender<DocId>,
    scan_rx: Mutex<Option<mpsc::Receiver<DocId>>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").finish_non_exhaustive()
    }
}

impl Default for Agent {
    fn default() -> Self {
        let (scan_tx, scan_rx) = mpsc::channel(1024);
        Agent {
            running: Mutex::default(),
            busy_conversations: Mutex::default(),
            rate: Mutex::default(),
            slots: Semaphore::new(MAX_CONCURRENT),
            sandbox: tokio::sync::Mutex::new(None),
            reaper_stop: tokio_util::sync::CancellationToken::new(),
            scan_tx,
            scan_rx: Mutex::new(Some(scan_rx)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    /// Asks the runner to look at a conversation soon.
    pub fn poke(&self, doc: DocId) {
        let _ = self.scan_tx.try_send(doc);
    }

    /// Requests running now.
    pub fn running(&self) -> usize {
        lock(&self.running).len()
    }

    /// The sandbox, connected on first use (then orphans of an earlier run are reaped and the
    /// idle reaper starts).
    async fn sandbox(&self, ctx: &NodeCtx) -> Result<Arc<Sandbox>, String> {
        let mut slot = self.sandbox.lock().await;
        if let Some(sb) = slot.as_ref() {
            return Ok(sb.clone());
        }
        let sb = Sandbox::connect(
            ctx.config.sandbox.clone(),
            ctx.config.data_dir.clone(),
            ctx.device_id(),
        )
        .await
        .map_err(|e| format!("the tool sandbox is unavailable: {e} (run `iom sandbox check`)"))?;
        let sb = Arc::new(sb);
        if let Err(e) = sb.reap_orphans().await {
            tracing::warn!(error = %e, "could not reap orphaned containers");
        }
        // Idle containers are removed after `idle_timeout_secs`; all of them when the node
        // shuts down.
        let stop = self.reaper_stop.clone();
        let mut shutdown = ctx.shutdown.clone();
        tokio::spawn(async move {
            let _ = shutdown.wait_for(|s| *s).await;
            stop.cancel();
        });
        drop(sb.clone().spawn_reaper(self.reaper_stop.clone()));
        *slot = Some(sb.clone());
        Ok(sb)
    }

    /// Removes every sandbox container of this node (for a clean shutdown; the next start
    /// reaps whatever is left anyway).
    pub async fn stop(&self) {
        self.reaper_stop.cancel();
        let sb = self.sandbox.lock().await.clone();
        if let Some(sb) = sb {
            sb.shutdown().await;
        }
    }
}

/// Starts the runner: reaps orphans, recovers interrupted runs, and watches for requests.
pub fn spawn(ctx: Arc<NodeCtx>) {
    let Some(mut scan_rx) = lock(&ctx.agent.scan_rx).take() else {
        return;
    };
    // Recovery first: our own runs that a crash interrupted.
    let c = ctx.clone();
    tokio::spawn(async move {
        recover(&c).await;
        if role::my_epoch(&c).is_some() {
            // Orphaned containers from a previous run, at start-up.
            let _ = c.agent.sandbox(&c).await;
            scan_all(&c);
        }
    });
    // Changes to conversations.
    let c = ctx.clone();
    let mut changes = ctx.docs.subscribe();
    tokio::spawn(async move {
        loop {
            match changes.recv().await {
                Ok(ch) => c.agent.poke(ch.id),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => scan_all(&c),
                Err(_) => break,
            }
        }
    });
    // Role changes: a new holder scans everything.
    let c = ctx.clone();
    let mut trust = ctx.trust.subscribe();
    tokio::spawn(async move {
        let mut was = role::my_epoch(&c);
        while trust.changed().await.is_ok() {
            let now = role::my_epoch(&c);
            if now != was {
                match now {
                    Some(epoch) => {
                        tracing::info!(epoch, "this device now holds the agent role");
                        scan_all(&c);
                        // Connect to Docker now rather than on the first tool call.
                        let c2 = c.clone();
                        tokio::spawn(async move {
                            if let Err(e) = c2.agent.sandbox(&c2).await {
                                tracing::warn!(error = %e, "sandbox not ready");
                            }
                        });
                    }
                    None => {
                        tracing::info!("this device no longer holds the agent role; not claiming")
                    }
                }
                was = now;
            }
        }
    });
    // The scan loop.
    let c = ctx.clone();
    tokio::spawn(async move {
        while let Some(doc) = scan_rx.recv().await {
            if role::my_epoch(&c).is_none() {
                continue;
            }
            scan(&c, doc).await;
        }
    });
}

fn scan_all(ctx: &Arc<NodeCtx>) {
    let Ok(list) = ctx.docs.list() else { return };
    for (id, meta) in list {
        if meta.kind == DocKind::Conversation.name() {
            ctx.agent.poke(id);
        }
    }
}

async fn pending_in(ctx: &NodeCtx, doc: DocId) -> Vec<MessageView> {
    ctx.docs
        .read(doc, |d| {
            Conversation::open(d)
                .map(|c| c.pending_requests())
                .unwrap_or_default()
        })
        .await
        .unwrap_or_default()
}

async fn scan(ctx: &Arc<NodeCtx>, doc: DocId) {
    if ctx
        .docs
        .meta(doc)
        .ok()
        .flatten()
        .is_none_or(|m| m.kind != DocKind::Conversation.name())
    {
        return;
    }
    if lock(&ctx.agent.busy_conversations).contains(&doc) {
        return; // the running request re-scans when it finishes
    }
    let pending = pending_in(ctx, doc).await;
    let Some(first) = pending.into_iter().next() else {
        return;
    };
    let Some(request_id) = first.request_id.clone() else {
        return;
    };
    if !lock(&ctx.agent.running).insert((doc, request_id.clone())) {
        return;
    }
    lock(&ctx.agent.busy_conversations).insert(doc);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let _permit = ctx.agent.slots.acquire().await;
        run_request(&ctx, doc, first).await;
        lock(&ctx.agent.running).remove(&(doc, request_id));
        lock(&ctx.agent.busy_conversations).remove(&doc);
        ctx.agent.poke(doc); // the next request of this conversation
    });
}

/// Marks this device's interrupted runs `failed: interrupted` (or, with
/// `on_interrupted = "retry"`, returns them to `pending` once).
async fn recover(ctx: &Arc<NodeCtx>) {
    let me = ctx.device_id();
    let retry = ctx.config.agent.on_interrupted == "retry";
    let Ok(list) = ctx.docs.list() else { return };
    for (doc, meta) in list {
        if meta.kind != DocKind::Conversation.name() {
            continue;
        }
        let me2 = me.clone();
        let now = crate::time::now_secs() as i64;
        let result = ctx
            .docs
            .modify(doc, Origin::Local, false, move |d| {
                let mut c = match Conversation::open(&mut *d) {
                    Ok(c) => c,
                    Err(_) => return Ok(0),
                };
                let mut n = 0;
                for m in c.running_claimed_by(&me2) {
                    let Some(rid) = m.request_id else { continue };
                    let already_retried = m.error.as_deref() == Some("interrupted; retried");
                    let r = if retry && !already_retried {
                        c.set_status(&rid, Status::Pending, Some("interrupted; retried"), now)
                    } else {
                        c.set_status(&rid, Status::Failed, Some("interrupted"), now)
                    };
                    if r.is_ok() {
                        n += 1;
                    }
                }
                Ok(n)
            })
            .await;
        if let Ok(n) = result
            && n > 0
        {
            tracing::warn!(conversation = %doc, n, retry, "marked interrupted runs");
        }
    }
}

fn claude_client(ctx: &NodeCtx) -> Result<ClaudeClient, String> {
    let key = ApiKey::from_env_or_file(
        ctx.config.api_key.clone(),
        ctx.config.agent.key_file.as_deref(),
    )
    .map_err(|e| {
        format!(
            "the agent device ({}) has no usable Anthropic API key: {e}",
            ctx.config.name
        )
    })?;
    let mut cfg = ClaudeConfig::new(key)
        .with_model(ctx.config.agent.model.clone())
        .with_max_tokens(ctx.config.agent.max_tokens);
    if let Some(url) = &ctx.config.agent.base_url {
        cfg = cfg.with_base_url(url.clone());
    }
    ClaudeClient::new(cfg).map_err(|e| format!("invalid agent configuration: {e}"))
}

fn budget_key() -> Vec<u8> {
    let day = crate::time::now_secs() / 86_400;
    format!("budget/{day}").into_bytes()
}

fn budget_used(ctx: &NodeCtx) -> u64 {
    ctx.store
        .state_get(&budget_key())
        .ok()
        .flatten()
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn add_budget(ctx: &NodeCtx, tokens: u64) {
    let used = budget_used(ctx).saturating_add(tokens);
    let _ = ctx.store.state_put(&budget_key(), &used.to_be_bytes());
}

/// Tokens used today (UTC) by this agent.
pub fn tokens_used_today(ctx: &NodeCtx) -> u64 {
    budget_used(ctx)
}

fn rate_limited(ctx: &NodeCtx, device: &str) -> bool {
    let limit = ctx.config.agent.per_device_rate_per_min;
    if limit == 0 {
        return false;
    }
    let mut rate = lock(&ctx.agent.rate);
    let q = rate.entry(device.to_string()).or_default();
    while q
        .front()
        .is_some_and(|t| t.elapsed() > Duration::from_secs(60))
    {
        q.pop_front();
    }
    if q.len() >= limit as usize {
        return true;
    }
    q.push_back(Instant::now());
    false
}

async fn set_status(ctx: &NodeCtx, doc: DocId, rid: &str, status: Status, error: Option<String>) {
    let rid = rid.to_string();
    let now = crate::time::now_secs() as i64;
    let r = ctx
        .docs
        .modify(doc, Origin::Local, false, move |d| {
            Conversation::open(&mut *d)
                .map_err(DocsError::from)?
                .set_status(&rid, status, error.as_deref(), now)
                .map_err(DocsError::from)
        })
        .await;
    if let Err(e) = r {
        tracing::error!(conversation = %doc, error = %e, "cannot record request status");
    }
}

async fn run_request(ctx: &Arc<NodeCtx>, doc: DocId, req: MessageView) {
    let Some(rid) = req.request_id.clone() else {
        return;
    };
    let Some(epoch) = role::my_epoch(ctx) else {
        return;
    };
    let me = ctx.device_id();
    // Claim: durable before anything runs; fenced by the epoch.
    let now = crate::time::now_secs() as i64;
    let (rid2, me2) = (rid.clone(), me.clone());
    let claim = ctx
        .docs
        .modify(doc, Origin::Local, false, move |d| {
            Conversation::open(&mut *d)
                .map_err(DocsError::from)?
                .claim(&rid2, &me2, epoch, now)
                .map_err(DocsError::from)
        })
        .await;
    match claim {
        Ok(ClaimOutcome::Claimed) => {}
        Ok(other) => {
            tracing::debug!(request = %rid, outcome = ?other, "not claimed");
            return;
        }
        Err(e) => {
            tracing::warn!(request = %rid, error = %e, "claim failed");
            return;
        }
    }
    tracing::info!(conversation = %doc, request = %rid, epoch, "running request");
    let device = req.device.clone().unwrap_or_default();
    if rate_limited(ctx, &device) {
        let msg = format!(
            "rate limit: this device sent more than {} requests in the last minute; wait and ask again",
            ctx.config.agent.per_device_rate_per_min
        );
        return set_status(ctx, doc, &rid, Status::Failed, Some(msg)).await;
    }
    let budget = ctx.config.agent.daily_token_budget;
    if budget > 0 && budget_used(ctx) >= budget {
        let msg = format!(
            "the daily token budget ({budget} tokens) is used up; it resets at 00:00 UTC, or raise \
             agent.daily_token_budget on the agent device"
        );
        return set_status(ctx, doc, &rid, Status::Failed, Some(msg)).await;
    }
    let client = match claude_client(ctx) {
        Ok(c) => c,
        Err(msg) => return set_status(ctx, doc, &rid, Status::Failed, Some(msg)).await,
    };
    let (system, history) = context_for(ctx, doc, &rid).await;
    let history = fit_history(history, ctx.config.agent.history_chars);

    // Progress: collected by the callback, written to the document by a writer task.
    let progress = Arc::new(Mutex::new(RunProgress::default()));
    let (tick_tx, mut tick_rx) = mpsc::channel::<()>(1);
    let writer = {
        let ctx = ctx.clone();
        let progress = progress.clone();
        let rid = rid.clone();
        tokio::spawn(async move {
            let mut last = String::new();
            // A tick that arrived while throttling: write once more when the pause ends.
            let mut pending = false;
            loop {
                if !pending && tick_rx.recv().await.is_none() {
                    return;
                }
                pending = false;
                let json = lock(&progress).to_json();
                if json != last {
                    let (rid, j) = (rid.clone(), json.clone());
                    let now = crate::time::now_secs() as i64;
                    let _ = ctx
                        .docs
                        .modify(doc, Origin::Local, false, move |d| {
                            Conversation::open(&mut *d)
                                .map_err(DocsError::from)?
                                .set_progress(&rid, &j, now)
                                .map_err(DocsError::from)
                        })
                        .await;
                    last = json;
                }
                // Throttle, but stop at once when the run ends (the answer replaces the
                // progress, so waiting out the pause would only delay it).
                let pause = tokio::time::sleep(PROGRESS_EVERY);
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        () = &mut pause => break,
                        tick = tick_rx.recv() => match tick {
                            Some(()) => pending = true,
                            None => return,
                        },
                    }
                }
            }
        })
    };
    let executor = SandboxTools {
        ctx: ctx.clone(),
        conversation: doc.to_string(),
    };
    let limits = Limits {
        max_turns: ctx.config.agent.max_turns,
        max_tokens: Some(ctx.config.agent.max_tokens),
        token_budget: (budget > 0).then(|| budget.saturating_sub(budget_used(ctx))),
    };
    let tools = super::sandbox::tools::tool_definitions();
    let mut on = {
        let progress = progress.clone();
        let tick = tick_tx.clone();
        move |p: Progress| {
            {
                let mut g = lock(&progress);
                match p {
                    Progress::TextDelta(t) => g.text.push_str(&t),
                    Progress::ToolCallStarted { id, name, input } => g.tools.push(ToolProgress {
                        id,
                        name,
                        input: input.to_string(),
                        output: None,
                        is_error: false,
                    }),
                    Progress::ToolCallFinished {
                        id,
                        output,
                        is_error,
                        ..
                    } => {
                        if let Some(t) = g.tools.iter_mut().find(|t| t.id == id) {
                            t.output = Some(truncate(&output, 4096));
                            t.is_error = is_error;
                        }
                    }
                    Progress::Retrying {
                        attempt,
                        wait,
                        reason,
                    } => {
                        g.retry = Some(format!(
                            "model API busy ({reason}); retry {attempt} in {:.1} s",
                            wait.as_secs_f64()
                        ));
                    }
                    Progress::TurnFinished { turn, .. } => {
                        g.turns = turn;
                        g.retry = None;
                    }
                }
            }
            let _ = tick.try_send(());
        }
    };
    let result =
        run_conversation(&client, system, history, tools, &executor, limits, &mut on).await;
    drop(on);
    drop(tick_tx);
    let _ = writer.await;
    match result {
        Ok(outcome) => {
            let streamed = lock(&progress).text.clone();
            let text = if streamed.trim().is_empty() {
                outcome.final_text.clone()
            } else {
                streamed
            };
            let usage = UsageView {
                input_tokens: outcome.usage.input_tokens,
                output_tokens: outcome.usage.output_tokens,
            };
            add_budget(ctx, usage.input_tokens + usage.output_tokens);
            let calls: Vec<ToolCallView> = outcome
                .tool_calls
                .iter()
                .map(|t| ToolCallView {
                    id: t.id.clone(),
                    name: t.name.clone(),
                    input: t.input.to_string(),
                    output: truncate(&t.output, 16 * 1024),
                    is_error: t.is_error,
                })
                .collect();
            let note = match outcome.stopped_by {
                super::claude::StoppedBy::EndTurn => None,
                other => Some(other.to_string()),
            };
            let (rid2, me2) = (rid.clone(), me.clone());
            let now = crate::time::now_secs() as i64;
            let r = ctx
                .docs
                .modify(doc, Origin::Local, false, move |d| {
                    let mut c = Conversation::open(&mut *d).map_err(DocsError::from)?;
                    let e = <DocsError as From<iom_crdt::ConversationError>>::from;
                    c.append_assistant(&rid2, &text, &calls, usage, &me2, now)
                        .map_err(e)?;
                    c.add_usage(usage.input_tokens, usage.output_tokens, now)
                        .map_err(e)?;
                    c.set_status(&rid2, Status::Done, note.as_deref(), now)
                        .map_err(e)?;
                    Ok(())
                })
                .await;
            if let Err(e) = r {
                tracing::error!(request = %rid, error = %e, "cannot record the answer");
            }
            tracing::info!(request = %rid, turns = outcome.turns, "request done");
        }
        Err(e) => {
            tracing::warn!(request = %rid, error = %e, "request failed");
            set_status(ctx, doc, &rid, Status::Failed, Some(e.to_string())).await;
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} bytes cut]", &s[..end], s.len() - end)
}

/// The system prompt (the memory document) and the conversation so far, ending with the
/// request `rid`.
async fn context_for(ctx: &NodeCtx, doc: DocId, rid: &str) -> (Option<String>, Vec<Message>) {
    let memory = ctx
        .docs
        .read(DocId::MEMORY, |d| Memory::open(d).map(|m| m.text()).ok())
        .await
        .ok()
        .flatten()
        .filter(|t| !t.trim().is_empty());
    let rid = rid.to_string();
    let history = ctx
        .docs
        .read(doc, move |d| {
            let Ok(c) = Conversation::open(d) else {
                return Vec::new();
            };
            let mut out = Vec::new();
            for m in c.messages() {
                match m.role {
                    MsgRole::User => {
                        let this = m.request_id.as_deref() == Some(rid.as_str());
                        // Earlier requests that got no answer are skipped.
                        if this || m.status == Some(Status::Done) {
                            out.push(Message::user(m.text.clone()));
                        }
                        if this {
                            break;
                        }
                    }
                    MsgRole::Assistant => {
                        if matches!(
                            out.last(),
                            Some(Message {
                                role: super::claude::Role::User,
                                ..
                            })
                        ) {
                            out.push(Message::assistant(m.text.clone()));
                        }
                    }
                }
            }
            // Drop a user message left without its answer before the current one.
            let mut cleaned: Vec<Message> = Vec::new();
            for m in out {
                if let (Some(last), super::claude::Role::User) = (cleaned.last(), &m.role)
                    && last.role == super::claude::Role::User
                {
                    cleaned.pop();
                }
                cleaned.push(m);
            }
            cleaned
        })
        .await
        .unwrap_or_default();
    (
        memory.map(|m| format!("The person's memory (their notes for you):\n\n{m}")),
        history,
    )
}

/// Runs the model's tool calls in the conversation's container.
struct SandboxTools {
    ctx: Arc<NodeCtx>,
    conversation: String,
}

impl ToolExecutor for SandboxTools {
    fn run<'a>(
        &'a self,
        name: &'a str,
        input: &'a Value,
    ) -> Pin<Box<dyn Future<Output = ToolResult> + Send + 'a>> {
        Box::pin(async move {
            match self.ctx.agent.sandbox(&self.ctx).await {
                Ok(sb) => {
                    let out = sb.run_tool(&self.conversation, name, input).await;
                    ToolResult {
                        content: out.output,
                        is_error: out.is_error,
                    }
                }
                Err(e) => ToolResult::error(e),
            }
        })
    }
}
