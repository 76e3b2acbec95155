//! The agent runner, active on the device that holds the agent role.
//!
//! It watches conversation documents (local changes, changes arriving by sync, and
//! `/iom/agent/1` notifications) for `pending` requests, claims each one under its device and
//! epoch, runs the model's tool-use loop with tools from the [`ToolHost`], streams progress
//! into the document, and records the answer, tool calls and usage, then `done` or `failed`
//! with a reason. A request is claimed at most once per epoch, so nothing runs twice; requests
//! this device was running when it stopped are marked `failed: interrupted` at start-up (or
//! retried once, by policy).
//!
//! The runner is built from explicit parts ([`Deps`]): the model ([`ModelFactory`]), the tools
//! ([`ToolHost`]) and the time ([`Clock`](super::clock::Clock)) are traits, so all of this is
//! unit-tested with fakes and paused time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use iom_crdt::{
    AttachmentView, ClaimOutcome, DocId, Memory, MessageView, Role as MsgRole, Status,
    ToolCallView, UsageView,
};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::claude::{
    self, Limits, Message, Progress, TokenBudget, ToolExecutor, ToolResult, fit_history,
    run_with_budget,
};
use super::clock::SharedClock;
use super::conversations::Conversations;
use super::host::ToolHost;
use super::model::ModelFactory;
use super::progress::{RunProgress, ToolProgress};
use super::role::AgentRole;
use crate::config::AgentConfig;
use crate::docs::Docs;
use crate::identity::SharedIdentity;
use crate::store::Store;
use crate::trust::TrustBook;

/// Requests run at once (across conversations; one at a time per conversation).
pub const MAX_CONCURRENT: usize = 4;
/// How often progress is written into the document while a request runs.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(150);
/// The window of the per-device rate limit.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Most conversations queued for a look.
const SCAN_QUEUE: usize = 1024;
/// How a failure for a used-up daily token budget starts (clients classify failures by it:
/// [`FailReason`](super::ask::FailReason)).
pub const BUDGET_EXHAUSTED: &str = "the daily token budget";
/// How a failure for the per-device rate limit starts.
pub const RATE_LIMITED: &str = "rate limit:";
/// How a failure for a run the agent's stop interrupted starts.
pub const INTERRUPTED: &str = "interrupted";

/// How long a request waits for an attached blob to arrive by sync.
pub const ATTACHMENT_WAIT: Duration = Duration::from_secs(60);

/// Why a request's attachments could not be put into the workspace.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// The recorded hash is not a hash.
    #[error("attachment {0:?} has a bad blob hash")]
    BadHash(String),
    /// The blob did not arrive in time.
    #[error(
        "attachment {0:?} did not arrive from the asking device within a minute; ask again \
         when both devices are connected"
    )]
    NotArrived(String),
    /// The store failed.
    #[error("attachment: {0}")]
    Store(crate::store::StoreError),
    /// The blocking read was cancelled.
    #[error("attachment: internal error: {0}")]
    Join(tokio::task::JoinError),
    /// The workspace could not take it.
    #[error("attachment {0:?}: {1}")]
    Tools(String, super::host::ToolHostError),
}

/// What happens to a request this device was running when it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInterrupted {
    /// Mark it `failed: interrupted`.
    Fail,
    /// Return it to `pending` once (a second interruption fails it).
    Retry,
}

/// The runner's limits and settings.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Model calls per request.
    pub max_turns: u32,
    /// `max_tokens` per model call.
    pub max_tokens: u32,
    /// Tokens per UTC day; 0: unlimited.
    pub daily_token_budget: u64,
    /// Requests per asking device per minute; 0: unlimited.
    pub per_device_rate_per_min: u32,
    /// Characters of history sent per request.
    pub history_chars: usize,
    /// Interrupted runs policy.
    pub on_interrupted: OnInterrupted,
    /// Requests run at once.
    pub max_concurrent: usize,
    /// Pause between progress writes.
    pub progress_every: Duration,
}

impl RunnerConfig {
    /// The settings of the `[agent]` config section.
    pub fn from_config(agent: &AgentConfig) -> RunnerConfig {
        RunnerConfig {
            max_turns: agent.max_turns,
            max_tokens: agent.max_tokens,
            daily_token_budget: agent.daily_token_budget,
            per_device_rate_per_min: agent.per_device_rate_per_min,
            history_chars: agent.history_chars,
            on_interrupted: if agent.on_interrupted == "retry" {
                OnInterrupted::Retry
            } else {
                OnInterrupted::Fail
            },
            max_concurrent: MAX_CONCURRENT,
            progress_every: PROGRESS_EVERY,
        }
    }
}

/// What a [`Runner`] is built from.
pub struct Deps {
    /// The document service.
    pub docs: Docs,
    /// The store (for the token ledger).
    pub store: Store,
    /// This device's keys.
    pub identity: SharedIdentity,
    /// Certificates (who holds the role).
    pub trust: Arc<TrustBook>,
    /// Makes a model client per request.
    pub model: Arc<dyn ModelFactory>,
    /// Runs the model's tools.
    pub tools: Arc<dyn ToolHost>,
    /// Timestamps and the budget's day.
    pub clock: SharedClock,
}

/// A handle to poke the runner (what the asking side and the `/iom/agent/1` server need).
pub trait Poke: Send + Sync {
    /// Asks the runner to look at a conversation soon.
    fn poke(&self, doc: DocId);
    /// Requests running now.
    fn running(&self) -> usize;
}

/// The tokens used per UTC day, in the store (`budget/{day}`), shared by every run. Each
/// finished turn is added at once with a compare-and-swap, so concurrent runs never lose
/// each other's use and all stop once the day's budget is used up (a run can overshoot by at
/// most the turn it is in).
#[derive(Debug)]
pub struct TokenLedger {
    store: Store,
    clock: SharedClock,
    daily_budget: u64,
}

impl TokenLedger {
    /// A ledger over `store` with `daily_budget` tokens a day (0: unlimited).
    pub fn new(store: Store, clock: SharedClock, daily_budget: u64) -> TokenLedger {
        TokenLedger {
            store,
            clock,
            daily_budget,
        }
    }

    fn key(&self) -> Vec<u8> {
        let day = self.clock.now_secs().max(0) / 86_400;
        format!("budget/{day}").into_bytes()
    }

    fn decode(bytes: Option<&[u8]>) -> u64 {
        bytes
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0)
    }

    /// Tokens used today (UTC).
    pub fn used_today(&self) -> u64 {
        let v = self.store.state_get(&self.key()).ok().flatten();
        Self::decode(v.as_deref())
    }

    /// Whether today's budget is used up.
    pub fn exhausted(&self) -> bool {
        self.daily_budget > 0 && self.used_today() >= self.daily_budget
    }

    /// Adds `tokens` to today's use; returns the new total.
    pub fn add(&self, tokens: u64) -> u64 {
        let key = self.key();
        loop {
            let old = match self.store.state_get(&key) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the token ledger");
                    return 0;
                }
            };
            let total = Self::decode(old.as_deref()).saturating_add(tokens);
            match self
                .store
                .state_cas(&key, old.as_deref(), Some(total.to_be_bytes().to_vec()))
            {
                Ok(true) => return total,
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record token use");
                    return total;
                }
            }
        }
    }
}

impl TokenBudget for TokenLedger {
    fn charge(&self, tokens: u64) -> bool {
        let total = self.add(tokens);
        self.daily_budget == 0 || total < self.daily_budget
    }
}

/// Requests per device in a sliding window (tokio time, so tests pause it).
#[derive(Debug)]
pub struct RateLimiter {
    per_window: u32,
    window: Duration,
    seen: Mutex<HashMap<String, VecDeque<tokio::time::Instant>>>,
}

impl RateLimiter {
    /// At most `per_window` requests per device per `window`; 0: unlimited.
    pub fn new(per_window: u32, window: Duration) -> RateLimiter {
        RateLimiter {
            per_window,
            window,
            seen: Mutex::default(),
        }
    }

    /// Counts a request from `device`; `false` when it is over the limit (and not counted).
    pub fn allow(&self, device: &str) -> bool {
        if self.per_window == 0 {
            return true;
        }
        let mut seen = lock(&self.seen);
        let q = seen.entry(device.to_string()).or_default();
        while q.front().is_some_and(|t| t.elapsed() > self.window) {
            q.pop_front();
        }
        if q.len() >= self.per_window as usize {
            return false;
        }
        q.push_back(tokio::time::Instant::now());
        true
    }
}

#[derive(Debug, Default)]
struct Active {
    /// `(conversation, request)` being run.
    running: HashSet<(DocId, String)>,
    /// Conversations with a request running (one at a time per conversation).
    busy: HashSet<DocId>,
}

/// The agent runner service (on every node; active only while it holds the role).
pub struct Runner {
    conversations: Conversations,
    role: AgentRole,
    config: RunnerConfig,
    model: Arc<dyn ModelFactory>,
    tools: Arc<dyn ToolHost>,
    ledger: Arc<TokenLedger>,
    rate: RateLimiter,
    active: Mutex<Active>,
    slots: Semaphore,
    scan_tx: mpsc::Sender<DocId>,
    scan_rx: Mutex<Option<mpsc::Receiver<DocId>>>,
    tasks: Mutex<JoinSet<()>>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Poke for Runner {
    fn poke(&self, doc: DocId) {
        let _ = self.scan_tx.try_send(doc);
    }

    fn running(&self) -> usize {
        lock(&self.active).running.len()
    }
}

impl Runner {
    /// A runner over `deps` with `config`. Nothing runs until [`Runner::start`].
    pub fn new(deps: Deps, config: RunnerConfig) -> Arc<Runner> {
        let (scan_tx, scan_rx) = mpsc::channel(SCAN_QUEUE);
        Arc::new(Runner {
            conversations: Conversations::new(deps.docs, deps.clock.clone()),
            role: AgentRole::new(deps.identity, deps.trust),
            ledger: Arc::new(TokenLedger::new(
                deps.store,
                deps.clock,
                config.daily_token_budget,
            )),
            rate: RateLimiter::new(config.per_device_rate_per_min, RATE_WINDOW),
            slots: Semaphore::new(config.max_concurrent.max(1)),
            model: deps.model,
            tools: deps.tools,
            config,
            active: Mutex::default(),
            scan_tx,
            scan_rx: Mutex::new(Some(scan_rx)),
            tasks: Mutex::new(JoinSet::new()),
        })
    }

    /// Tokens used today (UTC) by this agent.
    pub fn tokens_used_today(&self) -> u64 {
        self.ledger.used_today()
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = lock(&self.tasks);
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done
                && e.is_panic()
            {
                tracing::error!(error = %e, "an agent task panicked");
            }
        }
        tasks.spawn(task.instrument(tracing::Span::current()));
    }

    /// Starts the runner's tasks (owned by the runner; they end when `shutdown` is cancelled
    /// or at [`Runner::stop`]): recover interrupted runs, then watch for requests. Starting a
    /// second time does nothing.
    pub fn start(self: &Arc<Self>, shutdown: &CancellationToken) {
        let Some(mut scan_rx) = lock(&self.scan_rx).take() else {
            return;
        };
        // Changes to conversations.
        let (this, stop) = (self.clone(), shutdown.clone());
        let mut changes = self.conversations.docs().subscribe();
        self.spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    ch = changes.recv() => match ch {
                        Ok(ch) => this.poke(ch.id),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => this.scan_all(),
                        Err(_) => return,
                    },
                }
            }
        });
        // Role changes: a new holder scans everything.
        let (this, stop) = (self.clone(), shutdown.clone());
        let mut trust = self.role.subscribe();
        self.spawn(async move {
            let mut was = this.role.my_epoch();
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    r = trust.changed() => if r.is_err() { return },
                }
                let now = this.role.my_epoch();
                if now == was {
                    continue;
                }
                match now {
                    Some(epoch) => {
                        tracing::info!(epoch, "this device now holds the agent role");
                        this.scan_all();
                        // Get the tools ready now rather than on the first tool call.
                        let tools = this.tools.clone();
                        this.spawn(async move {
                            if let Err(e) = tools.prepare().await {
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
        });
        // Recovery first (our own runs that a crash interrupted), then the scan loop.
        let (this, stop) = (self.clone(), shutdown.clone());
        self.spawn(async move {
            this.recover().await;
            if this.role.my_epoch().is_some() {
                // Orphaned containers of a previous run, at start-up.
                if let Err(e) = this.tools.prepare().await {
                    tracing::warn!(error = %e, "sandbox not ready");
                }
                this.scan_all();
            }
            loop {
                let doc = tokio::select! {
                    () = stop.cancelled() => return,
                    doc = scan_rx.recv() => match doc {
                        Some(doc) => doc,
                        None => return,
                    },
                };
                if this.role.my_epoch().is_some() {
                    this.scan(doc).await;
                }
            }
        });
    }

    /// Stops every task of the runner (running requests are left `running`; the next start
    /// marks them interrupted) and releases the tools (containers).
    pub async fn stop(&self) {
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        tasks.shutdown().await;
        self.tools.shutdown().await;
    }

    fn scan_all(&self) {
        match self.conversations.list() {
            Ok(list) => list.into_iter().for_each(|id| self.poke(id)),
            Err(e) => tracing::warn!(error = %e, "cannot list conversations"),
        }
    }

    async fn scan(self: &Arc<Self>, doc: DocId) {
        if !self.conversations.is_conversation(doc) || lock(&self.active).busy.contains(&doc) {
            return; // a running request re-scans its conversation when it finishes
        }
        let first = self
            .conversations
            .read(doc, |c| c.pending_requests().into_iter().next())
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        let Some(first) = first else { return };
        let Some(rid) = first.request_id.clone() else {
            return;
        };
        {
            let mut active = lock(&self.active);
            if active.busy.contains(&doc) || !active.running.insert((doc, rid.clone())) {
                return;
            }
            active.busy.insert(doc);
        }
        let this = self.clone();
        self.spawn(async move {
            if let Ok(_permit) = this.slots.acquire().await {
                this.run_request(doc, first).await;
            }
            {
                let mut active = lock(&this.active);
                active.running.remove(&(doc, rid));
                active.busy.remove(&doc);
            }
            this.poke(doc); // the next request of this conversation
        });
    }

    /// Marks this device's interrupted runs `failed: interrupted` (or, with
    /// [`OnInterrupted::Retry`], returns them to `pending` once).
    async fn recover(&self) {
        let me = self.role.me().to_string();
        let retry = self.config.on_interrupted == OnInterrupted::Retry;
        let Ok(list) = self.conversations.list() else {
            return;
        };
        for doc in list {
            let me = me.clone();
            let result = self
                .conversations
                .modify(doc, move |c, now| {
                    let mut n = 0;
                    for m in c.running_claimed_by(&me) {
                        let Some(rid) = m.request_id else { continue };
                        let already_retried = m.error.as_deref() == Some("interrupted; retried");
                        let r = if retry && !already_retried {
                            c.set_status(&rid, Status::Pending, Some("interrupted; retried"), now)
                        } else {
                            c.set_status(&rid, Status::Failed, Some(INTERRUPTED), now)
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

    async fn set_status(&self, doc: DocId, rid: &str, status: Status, error: Option<String>) {
        if status == Status::Failed {
            crate::metrics::node().asks_failed.inc();
        }
        let rid = rid.to_string();
        let r = self
            .conversations
            .modify(doc, move |c, now| {
                c.set_status(&rid, status, error.as_deref(), now)
            })
            .await;
        if let Err(e) = r {
            tracing::error!(conversation = %doc, error = %e, "cannot record request status");
        }
    }

    async fn run_request(&self, doc: DocId, req: MessageView) {
        let Some(rid) = req.request_id.clone() else {
            return;
        };
        let Some(epoch) = self.role.my_epoch() else {
            return;
        };
        let me = self.role.me().to_string();
        // Claim: durable before anything runs; fenced by the epoch.
        let (rid2, me2) = (rid.clone(), me.clone());
        let claim = self
            .conversations
            .modify(doc, move |c, now| c.claim(&rid2, &me2, epoch, now))
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
        crate::metrics::node().asks.inc();
        let device = req.device.clone().unwrap_or_default();
        if !self.rate.allow(&device) {
            let msg = format!(
                "{RATE_LIMITED} this device sent more than {} requests in the last minute; wait and ask \
                 again",
                self.config.per_device_rate_per_min
            );
            return self.set_status(doc, &rid, Status::Failed, Some(msg)).await;
        }
        let budget = self.config.daily_token_budget;
        if self.ledger.exhausted() {
            let msg = format!(
                "{BUDGET_EXHAUSTED} ({budget} tokens) is used up; it resets at 00:00 UTC, or \
                 raise agent.daily_token_budget on the agent device"
            );
            return self.set_status(doc, &rid, Status::Failed, Some(msg)).await;
        }
        if let Err(e) = self.put_attachments(doc, &req.attachments).await {
            return self
                .set_status(doc, &rid, Status::Failed, Some(e.to_string()))
                .await;
        }
        let client = match self.model.client_for(req.model.as_deref()).await {
            Ok(c) => c,
            Err(e) => {
                return self
                    .set_status(doc, &rid, Status::Failed, Some(e.to_string()))
                    .await;
            }
        };
        let (system, history) = self.context_for(doc, &rid).await;
        let history = fit_history(history, self.config.history_chars);

        // Progress: collected by the callback, written to the document by the writer.
        let progress = Arc::new(Mutex::new(RunProgress::default()));
        let (tick_tx, tick_rx) = mpsc::channel::<()>(1);
        let writer = self.write_progress(doc, &rid, progress.clone(), tick_rx);
        let executor = HostTools {
            host: self.tools.as_ref(),
            conversation: doc.to_string(),
        };
        let limits = Limits {
            max_turns: self.config.max_turns,
            max_tokens: Some(self.config.max_tokens),
            token_budget: None,
        };
        let tools = self.tools.definitions();
        let reporter = client.clone();
        let run = {
            let progress = progress.clone();
            let ledger = self.ledger.clone();
            async move {
                let mut on = move |p: Progress| {
                    apply_progress(&mut lock(&progress), p);
                    let _ = tick_tx.try_send(());
                };
                // `on` (and with it the tick sender) is dropped when the run ends, which
                // stops the writer.
                run_with_budget(
                    client.as_ref(),
                    system,
                    history,
                    tools,
                    &executor,
                    limits,
                    ledger.as_ref(),
                    &mut on,
                )
                .await
            }
        };
        let (result, ()) = tokio::join!(run, writer);
        let report = reporter.report();
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
                count_usage(&outcome);
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
                    claude::StoppedBy::EndTurn => None,
                    other => Some(other.to_string()),
                };
                let note = with_notices(note, &report.notices);
                let (rid2, me2) = (rid.clone(), me.clone());
                let model = report.model.clone();
                let r = self
                    .conversations
                    .modify(doc, move |c, now| {
                        let reply = c.append_assistant(&rid2, &text, &calls, usage, &me2, now)?;
                        if let Some(m) = &model {
                            c.set_reply_model(&reply.id, m, now)?;
                        }
                        c.add_usage(usage.input_tokens, usage.output_tokens, now)?;
                        c.set_status(&rid2, Status::Done, note.as_deref(), now)
                    })
                    .await;
                if let Err(e) = r {
                    tracing::error!(request = %rid, error = %e, "cannot record the answer");
                }
                tracing::info!(request = %rid, turns = outcome.turns, "request done");
            }
            Err(e) => {
                tracing::warn!(request = %rid, error = %e, "request failed");
                self.set_status(doc, &rid, Status::Failed, Some(e.to_string()))
                    .await;
            }
        }
    }

    /// Copies a request's attachments (blobs) into the conversation's tool workspace. A blob
    /// that has not arrived yet (it syncs from the asking device) is waited for, up to
    /// [`ATTACHMENT_WAIT`].
    async fn put_attachments(
        &self,
        doc: DocId,
        attachments: &[AttachmentView],
    ) -> Result<(), AttachError> {
        let store = self.conversations.docs().store().clone();
        for a in attachments {
            let id = hex::decode(&a.hash)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .ok_or_else(|| AttachError::BadHash(a.name.clone()))?;
            let waited = tokio::time::timeout(ATTACHMENT_WAIT, async {
                loop {
                    match store.blob_meta(&id) {
                        Ok(Some(meta)) => return Ok(meta),
                        Ok(None) => tokio::time::sleep(Duration::from_millis(200)).await,
                        Err(e) => return Err(e),
                    }
                }
            })
            .await;
            let meta = match waited {
                Ok(r) => r.map_err(AttachError::Store)?,
                Err(_) => return Err(AttachError::NotArrived(a.name.clone())),
            };
            let (store2, meta2) = (store.clone(), meta.clone());
            let bytes = tokio::task::spawn_blocking(move || {
                let mut out = Vec::with_capacity(usize::try_from(meta2.len).unwrap_or(0));
                for i in 0..meta2.chunk_hashes.len() as u32 {
                    out.extend(store2.blob_chunk(&id, &meta2, i)?);
                }
                Ok::<_, crate::store::StoreError>(out)
            })
            .await
            .map_err(AttachError::Join)?
            .map_err(AttachError::Store)?;
            self.tools
                .put_attachment(&doc.to_string(), &a.name, bytes)
                .await
                .map_err(|e| AttachError::Tools(a.name.clone(), e))?;
        }
        Ok(())
    }

    /// Writes the progress into the request when ticked, at most once per
    /// `progress_every`; ends when the tick sender is dropped.
    async fn write_progress(
        &self,
        doc: DocId,
        rid: &str,
        progress: Arc<Mutex<RunProgress>>,
        mut tick_rx: mpsc::Receiver<()>,
    ) {
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
                let (rid, j) = (rid.to_string(), json.clone());
                let r = self
                    .conversations
                    .modify(doc, move |c, now| c.set_progress(&rid, &j, now))
                    .await;
                if let Err(e) = r {
                    tracing::debug!(conversation = %doc, error = %e, "cannot write progress");
                }
                last = json;
            }
            // Throttle, but stop at once when the run ends (the answer replaces the
            // progress, so waiting out the pause would only delay it).
            let pause = tokio::time::sleep(self.config.progress_every);
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
    }

    /// The system prompt (the memory document) and the conversation so far, ending with the
    /// request `rid`.
    async fn context_for(&self, doc: DocId, rid: &str) -> (Option<String>, Vec<Message>) {
        let docs = self.conversations.docs();
        let memory = docs
            .read(DocId::MEMORY, |d| Memory::open(d).map(|m| m.text()).ok())
            .await
            .ok()
            .flatten()
            .filter(|t| !t.trim().is_empty());
        let rid = rid.to_string();
        let history = self
            .conversations
            .read(doc, move |c| history_for(&c.messages(), &rid))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        (
            memory.map(|m| format!("The person's memory (their notes for you):\n\n{m}")),
            history,
        )
    }
}

/// A request's note with the model notices (a fallback) after it.
fn with_notices(note: Option<String>, notices: &[String]) -> Option<String> {
    let mut parts: Vec<String> = note.into_iter().collect();
    parts.extend(notices.iter().cloned());
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// Adds a finished run's tokens and tool calls to the metrics.
fn count_usage(outcome: &claude::Outcome) {
    let m = crate::metrics::node();
    m.tokens_input.add(outcome.usage.input_tokens);
    m.tokens_output.add(outcome.usage.output_tokens);
    m.tool_calls.add(outcome.tool_calls.len() as u64);
    m.tool_call_errors
        .add(outcome.tool_calls.iter().filter(|t| t.is_error).count() as u64);
}

/// The model messages for request `rid`: each earlier request that was answered, followed by
/// its answer (found by `reply_to`, so requests queued together pair up right), then `rid`
/// itself. Requests without an answer are left out, so user and assistant messages
/// alternate.
pub fn history_for(messages: &[MessageView], rid: &str) -> Vec<Message> {
    let mut out = Vec::new();
    for m in messages.iter().filter(|m| m.role == MsgRole::User) {
        if m.request_id.as_deref() == Some(rid) {
            out.push(Message::user(m.text.clone()));
            break;
        }
        if m.status != Some(Status::Done) {
            continue;
        }
        let answer = messages.iter().rev().find(|a| {
            a.role == MsgRole::Assistant && a.reply_to.is_some() && a.reply_to == m.request_id
        });
        if let Some(a) = answer {
            out.push(Message::user(m.text.clone()));
            out.push(Message::assistant(a.text.clone()));
        }
    }
    out
}

/// Folds one progress event into what the document shows.
pub fn apply_progress(g: &mut RunProgress, p: Progress) {
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

/// `s` cut to at most `max` bytes (at a character boundary), saying how much was cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} bytes cut]", &s[..end], s.len() - end)
}

/// Runs the model's tool calls with the tool host, for one conversation.
struct HostTools<'a> {
    host: &'a dyn ToolHost,
    conversation: String,
}

impl ToolExecutor for HostTools<'_> {
    fn run<'a>(&'a self, name: &'a str, input: &'a Value) -> BoxFuture<'a, ToolResult> {
        self.host.run(&self.conversation, name, input)
    }
}

#[cfg(test)]
mod tests;
