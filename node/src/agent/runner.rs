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
    Answer, AttachmentView, ClaimOutcome, DocId, Memory, MessageView, Status, ToolCallView,
    UsageView,
};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::budget::{Budgets, Exceeded, Ledger, RunBudget};
use super::claude::{
    self, Limits, Message, Progress, ToolExecutor, ToolResult, Usage, fit_history, run_with_budget,
};
use super::clock::SharedClock;
use super::compact::{self, Context};
use super::conversations::Conversations;
use super::cost::PriceTable;
use super::host::ToolHost;
use super::model::{ModelFactory, model_name};
use super::progress::ProgressLog;
pub use super::progress::apply_progress;
use super::prompt_files;
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
/// How a failure for a used-up budget starts (clients classify failures by it:
/// [`FailReason`](super::ask::FailReason)).
pub const BUDGET_EXHAUSTED: &str = super::budget::BUDGET_EXCEEDED;
/// The context window assumed when none is configured (the Claude models').
pub const DEFAULT_CONTEXT_WINDOW: u64 = 200_000;
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
    /// The budgets (tokens and money, per day and month, mesh and device).
    pub budgets: Budgets,
    /// Prices per model.
    pub prices: PriceTable,
    /// The model name answers are recorded (and priced) under.
    pub model: String,
    /// The model's context window in tokens (compaction keeps requests within it).
    pub context_window: u64,
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
            budgets: Budgets::from_config(agent),
            prices: PriceTable::with_overrides(&agent.prices),
            model: agent.model.clone(),
            context_window: if agent.context_window == 0 {
                DEFAULT_CONTEXT_WINDOW
            } else {
                agent.context_window
            },
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
    gate: super::approvals::Gate,
    conversations: Conversations,
    role: AgentRole,
    config: RunnerConfig,
    model: Arc<dyn ModelFactory>,
    tools: Arc<dyn ToolHost>,
    ledger: Arc<Ledger>,
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
            gate: super::approvals::Gate::new(
                Conversations::new(deps.docs.clone(), deps.clock.clone()),
                deps.trust.clone(),
            ),
            conversations: Conversations::new(deps.docs, deps.clock.clone()),
            role: AgentRole::new(deps.identity, deps.trust),
            ledger: Ledger::new(deps.store, deps.clock, config.budgets.clone()),
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

    /// Tokens used today (UTC) by this agent, for the whole mesh.
    pub fn tokens_used_today(&self) -> u64 {
        self.ledger.tokens_today()
    }

    /// The usage ledger and budgets.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// The price table.
    pub fn prices(&self) -> &PriceTable {
        &self.config.prices
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
        let device_name = self.role.device_name(&device);
        if let Some(e) = self.ledger.exhausted(&device, device_name.as_deref()) {
            return self.refuse(doc, &rid, e).await;
        }
        let files = match self.put_attachments(doc, &req.attachments).await {
            Ok(files) => files,
            Err(e) => {
                return self
                    .set_status(doc, &rid, Status::Failed, Some(e.to_string()))
                    .await;
            }
        };
        let client = match self.model.client_for(req.model.as_deref()).await {
            Ok(c) => c,
            Err(e) => {
                return self
                    .set_status(doc, &rid, Status::Failed, Some(e.to_string()))
                    .await;
            }
        };
        let tools = self.tools.definitions();
        let priced = client
            .primary()
            .unwrap_or_else(|| self.config.model.clone());
        let price = self.config.prices.price(model_name(&priced));
        let budget = match self
            .ledger
            .reserve(&device, device_name.as_deref(), Default::default())
        {
            Ok(r) => RunBudget::new(r, price),
            Err(e) => return self.refuse(doc, &rid, e).await,
        };
        let (system, ctx) = self.context_for(doc, &rid).await;
        let compacted = self
            .compact(
                doc,
                &device,
                client.as_ref(),
                &budget,
                ctx,
                system.as_deref(),
                &tools,
            )
            .await;
        let ctx = match compacted {
            Ok(ctx) => ctx,
            Err(e) => return self.refuse(doc, &rid, e).await,
        };
        let mut history = fit_history(ctx.messages(), self.config.history_chars);
        let accepts = client.accepts();
        let placed = tokio::task::spawn_blocking(move || {
            prompt_files::place(&files, accepts, &prompt_files::Limits::default())
        })
        .await
        .unwrap_or_else(|e| prompt_files::Placement {
            notes: vec![format!("attachments were not put into the prompt: {e}")],
            ..Default::default()
        });
        prompt_files::into_last_user_message(&mut history, placed.blocks);
        let file_notes = placed.notes;
        // The first turn's room is held now: a request the budgets cannot hold is refused
        // before the model is called.
        let first = claude::MessagesRequest {
            system: system.clone(),
            messages: history.clone(),
            tools: Some(tools.clone()),
            ..Default::default()
        };
        if let Err(e) = budget.try_reserve(
            first.estimated_input_tokens(),
            u64::from(self.config.max_tokens),
        ) {
            return self.refuse(doc, &rid, e).await;
        }

        // Progress: collected by the callback, appended to the document by the writer.
        let progress = Arc::new(Mutex::new(ProgressLog::default()));
        let (tick_tx, tick_rx) = mpsc::channel::<()>(1);
        let writer = self.write_progress(doc, &rid, progress.clone(), tick_rx);
        // Every call passes the approval gate; a denied one ends the run (`guard` below).
        let host = HostTools {
            host: self.tools.as_ref(),
            conversation: doc.to_string(),
        };
        let executor = super::approvals::Gated::new(&self.gate, host, doc, &rid, &me);
        let limits = Limits {
            max_turns: self.config.max_turns,
            max_tokens: Some(self.config.max_tokens),
            token_budget: None,
        };
        let reporter = client.clone();
        let run = {
            let progress = progress.clone();
            let (budget, executor) = (&budget, &executor);
            async move {
                let mut on = move |p: Progress| {
                    lock(&progress).push(p);
                    let _ = tick_tx.try_send(());
                };
                // `on` (and with it the tick sender) is dropped when the run ends, which
                // stops the writer.
                run_with_budget(
                    client.as_ref(),
                    system,
                    history,
                    tools,
                    executor,
                    limits,
                    budget,
                    &mut on,
                )
                .await
            }
        };
        let (result, ()) = tokio::join!(executor.guard(run), writer);
        let report = reporter.report();
        match result {
            Ok(outcome) => {
                let streamed = lock(&progress).shown().text.clone();
                let text = if streamed.trim().is_empty() {
                    outcome.final_text.clone()
                } else {
                    streamed
                };
                let usage = usage_view(&outcome.usage, budget.cost_nanos(&outcome.usage));
                count_usage(&outcome, usage.cost_nanos);
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
                let stop_note = match outcome.stopped_by {
                    claude::StoppedBy::EndTurn => None,
                    other => Some(other.to_string()),
                };
                let note = stop_note
                    .into_iter()
                    .chain(file_notes)
                    .chain(report.notices.iter().cloned())
                    .reduce(|a, b| format!("{a}; {b}"));
                let (rid2, me2) = (rid.clone(), me.clone());
                let model = report.model.clone();
                let r = self
                    .conversations
                    .modify(doc, move |c, now| {
                        let answer = Answer {
                            text: &text,
                            tool_calls: &calls,
                            usage,
                            model: Some(model.as_deref().unwrap_or(&priced)),
                        };
                        c.append_answer(&rid2, &answer, &me2, now)?;
                        c.add_usage_view(&usage, now)?;
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
    /// Returns the attachments that may go into the prompt (images and PDFs), with their bytes.
    async fn put_attachments(
        &self,
        doc: DocId,
        attachments: &[AttachmentView],
    ) -> Result<Vec<(String, Vec<u8>)>, AttachError> {
        let store = self.conversations.docs().store().clone();
        let mut for_prompt = Vec::new();
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
                let count = meta2.chunk_hashes.len() as u32;
                let reader = store2.chunk_reader(id, std::sync::Arc::new(meta2))?;
                let mut buf = Vec::new();
                for i in 0..count {
                    reader.read(i, &mut buf)?;
                    out.extend_from_slice(&buf);
                }
                Ok::<_, crate::store::StoreError>(out)
            })
            .await
            .map_err(AttachError::Join)?
            .map_err(AttachError::Store)?;
            if prompt_files::may_go_in_prompt(&bytes) {
                for_prompt.push((a.name.clone(), bytes.clone()));
            }
            self.tools
                .put_attachment(&doc.to_string(), &a.name, bytes)
                .await
                .map_err(|e| AttachError::Tools(a.name.clone(), e))?;
        }
        Ok(for_prompt)
    }

    /// Appends what is new of the progress to the request when ticked, at most once per
    /// `progress_every`; ends when the tick sender is dropped. Only new text and tool-call
    /// steps are written, so the run adds each byte it shows to the document once.
    async fn write_progress(
        &self,
        doc: DocId,
        rid: &str,
        progress: Arc<Mutex<ProgressLog>>,
        mut tick_rx: mpsc::Receiver<()>,
    ) {
        // A tick that arrived while throttling: write once more when the pause ends.
        let mut pending = false;
        loop {
            if !pending && tick_rx.recv().await.is_none() {
                return;
            }
            pending = false;
            let updates = lock(&progress).take_pending();
            if !updates.is_empty() {
                let (rid, batch) = (rid.to_string(), updates.clone());
                let r = self
                    .conversations
                    .modify(doc, move |c, now| c.append_progress(&rid, &batch, now))
                    .await;
                if let Err(e) = r {
                    tracing::debug!(conversation = %doc, error = %e, "cannot write progress");
                    // Kept for the next write: appends must not leave a gap.
                    lock(&progress).put_back(updates);
                }
            }
            // Throttle, but stop at once when the run ends (the answer follows the
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

    /// Fails request `rid` because a budget is used up.
    async fn refuse(&self, doc: DocId, rid: &str, e: Exceeded) {
        tracing::info!(conversation = %doc, request = %rid, reason = %e, "request refused");
        self.set_status(doc, rid, Status::Failed, Some(e.to_string()))
            .await;
    }

    /// Folds older turns of `ctx` into a summary when the request would not fit the model's
    /// window ([`compact`]), stores the summary in the conversation (for every device to
    /// see) and returns the context to send. The summary call is charged to `budget` (and
    /// refused, failing the request, if the budgets cannot hold it). If the call fails the
    /// context is sent as it is, and the history limit drops the oldest turns.
    #[allow(clippy::too_many_arguments)]
    async fn compact(
        &self,
        doc: DocId,
        device: &str,
        client: &dyn super::model::ModelClient,
        budget: &RunBudget,
        mut ctx: Context,
        system: Option<&str>,
        tools: &Value,
    ) -> Result<Context, Exceeded> {
        let window = self.config.context_window;
        let room = compact::room(window, u64::from(self.config.max_tokens), system, tools);
        let fold = compact::plan(&ctx, room);
        if fold == 0 {
            return Ok(ctx);
        }
        let summary_max = u32::try_from((room / 4).clamp(64, 4096))
            .unwrap_or(4096)
            .min(self.config.max_tokens);
        let req = compact::summary_request(&ctx, fold, window, summary_max);
        budget.try_reserve(req.estimated_input_tokens(), u64::from(summary_max))?;
        let mut ignore = |_: claude::StreamEvent| {};
        let turn = match client.stream(&req, &mut ignore).await {
            Ok(turn) => turn,
            Err(e) => {
                tracing::warn!(conversation = %doc, error = %e, "cannot summarize older turns");
                return Ok(ctx);
            }
        };
        let cost = budget.cost_nanos(&turn.usage);
        let usage = usage_view(&turn.usage, cost);
        let _ = claude::TokenBudget::charge(budget, &turn.usage);
        count_tokens(&turn.usage, cost);
        let text = turn.text();
        if text.trim().is_empty() {
            return Ok(ctx);
        }
        let Some(through) = ctx.pairs.get(fold - 1).map(|p| p.rid.clone()) else {
            return Ok(ctx);
        };
        let requests = ctx.summary.as_ref().map_or(0, |s| s.requests) + fold as u64;
        let (text2, through2, device2, model) = (
            text.clone(),
            through.clone(),
            device.to_string(),
            self.config.model.clone(),
        );
        let written = self
            .conversations
            .modify(doc, move |c, now| {
                c.append_summary(
                    &text2,
                    &through2,
                    requests,
                    Some(&model),
                    &usage,
                    &device2,
                    now,
                )
            })
            .await;
        match written {
            Ok(index) => {
                tracing::info!(conversation = %doc, through = %through, folded = fold, "compacted older turns");
                ctx.summary = Some(iom_crdt::SummaryView {
                    index,
                    text,
                    through,
                    requests,
                    model: Some(self.config.model.clone()),
                    device: Some(device.to_string()),
                    created_at: None,
                    usage,
                });
                ctx.pairs.drain(..fold);
            }
            Err(e) => tracing::warn!(conversation = %doc, error = %e, "cannot store the summary"),
        }
        Ok(ctx)
    }

    /// The system prompt (the memory document) and the conversation so far (after its latest
    /// summary), ending with the request `rid`.
    async fn context_for(&self, doc: DocId, rid: &str) -> (Option<String>, Context) {
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
            .read(doc, move |c| {
                Context::of(&c.messages(), c.latest_summary(), &rid)
            })
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

/// A run's usage as the conversation records it.
fn usage_view(u: &Usage, cost_nanos: u64) -> UsageView {
    UsageView {
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        cache_creation_input_tokens: u.cache_creation_input_tokens,
        cache_read_input_tokens: u.cache_read_input_tokens,
        cost_nanos,
    }
}

/// Adds tokens and their cost to the metrics.
fn count_tokens(u: &Usage, cost_nanos: u64) {
    let m = crate::metrics::node();
    m.tokens_input.add(u.input_tokens);
    m.tokens_output.add(u.output_tokens);
    m.tokens_cache_creation.add(u.cache_creation_input_tokens);
    m.tokens_cache_read.add(u.cache_read_input_tokens);
    m.cost_nanos.add(cost_nanos);
}

/// Adds a finished run's tokens, cost and tool calls to the metrics.
fn count_usage(outcome: &claude::Outcome, cost_nanos: u64) {
    count_tokens(&outcome.usage, cost_nanos);
    let m = crate::metrics::node();
    m.tool_calls.add(outcome.tool_calls.len() as u64);
    m.tool_call_errors
        .add(outcome.tool_calls.iter().filter(|t| t.is_error).count() as u64);
}

/// The model messages for request `rid`: each earlier request that was answered, followed by
/// its answer (found by `reply_to`, so requests queued together pair up right), then `rid`
/// itself. Requests without an answer are left out, so user and assistant messages
/// alternate.
pub fn history_for(messages: &[MessageView], rid: &str) -> Vec<Message> {
    Context::of(messages, None, rid).messages()
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
