//! Runner unit tests: fakes for the model and the tools, a real store in a temp dir, and
//! tokio's paused clock.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};

use iom_crdt::{ClaimView, Interface, Role as MsgRole};
use serde_json::json;

use super::*;
use crate::agent::budget::{Amount, Budgets, Ledger};
use crate::agent::claude::{
    ClaudeError, ConfigError, ContentBlock, MessagesRequest, StopReason, StreamEvent, Turn, Usage,
};
use crate::agent::host::ToolHostError;
use crate::agent::model::{ModelClient, ModelSetupError};
use crate::agent::progress::RunProgress;
use crate::agent::testkit::Mesh;

/// One scripted model reply.
#[derive(Clone, Default)]
struct Step {
    /// Text deltas, each after `delay`.
    deltas: Vec<String>,
    delay: Duration,
    /// A tool call the reply asks for.
    tool: Option<(String, Value)>,
    /// Input and output tokens.
    usage: (u64, u64),
    /// Report a retry before the reply.
    retry: bool,
    /// Fail instead of replying.
    error: Option<ClaudeError>,
    /// Wait here (at most 10 s) until as many calls are in flight as the barrier counts.
    gate: Option<Arc<tokio::sync::Barrier>>,
}

fn text(t: &str) -> Step {
    Step {
        deltas: vec![t.to_string()],
        usage: (10, 5),
        ..Step::default()
    }
}

type ReplyFn = Box<dyn Fn(usize, &MessagesRequest) -> Step + Send + Sync>;

/// A model that replies from a script and records what it was sent.
struct FakeModel {
    reply: ReplyFn,
    calls: AtomicUsize,
    requests: Mutex<Vec<MessagesRequest>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl FakeModel {
    fn new(reply: impl Fn(usize, &MessagesRequest) -> Step + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(FakeModel {
            reply: Box::new(reply),
            calls: AtomicUsize::new(0),
            requests: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        })
    }

    fn requests(&self) -> Vec<MessagesRequest> {
        lock(&self.requests).clone()
    }
}

impl ModelClient for FakeModel {
    fn stream<'a>(
        &'a self,
        req: &'a MessagesRequest,
        on: &'a mut (dyn FnMut(StreamEvent) + Send),
    ) -> BoxFuture<'a, Result<Turn, ClaudeError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            lock(&self.requests).push(req.clone());
            let step = (self.reply)(n, req);
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            if let Some(gate) = &step.gate {
                let _ = tokio::time::timeout(Duration::from_secs(10), gate.wait()).await;
            }
            if step.retry {
                on(StreamEvent::Retrying {
                    attempt: 1,
                    wait: Duration::from_millis(500),
                    reason: "529 overloaded_error".into(),
                });
            }
            if step.deltas.is_empty() {
                tokio::time::sleep(step.delay).await;
            }
            for d in &step.deltas {
                tokio::time::sleep(step.delay).await;
                on(StreamEvent::TextDelta(d.clone()));
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if let Some(e) = step.error {
                return Err(e);
            }
            let mut content = vec![ContentBlock::text(step.deltas.concat())];
            let stop_reason = match step.tool {
                Some((name, input)) => {
                    content.push(ContentBlock::ToolUse {
                        id: format!("toolu_{n}"),
                        name,
                        input,
                    });
                    StopReason::ToolUse
                }
                None => StopReason::EndTurn,
            };
            Ok(Turn {
                id: format!("msg_{n}"),
                content,
                stop_reason,
                usage: Usage::new(step.usage.0, step.usage.1),
            })
        })
    }
}

struct Factory {
    model: Arc<FakeModel>,
    broken: bool,
}

impl ModelFactory for Factory {
    fn client(&self) -> Result<Arc<dyn ModelClient>, ModelSetupError> {
        if self.broken {
            return Err(ModelSetupError::Config(ConfigError::Invalid(
                "max_tokens must be at least 1",
            )));
        }
        Ok(self.model.clone())
    }
}

/// Tools that record their calls.
#[derive(Default)]
struct FakeTools {
    calls: Mutex<Vec<(String, String, Value)>>,
    /// What every call prints, if set (else `ran NAME`).
    output: Mutex<Option<String>>,
    attached: Mutex<Vec<(String, String, Vec<u8>)>>,
    prepared: AtomicUsize,
    shut_down: AtomicUsize,
}

impl ToolHost for FakeTools {
    fn definitions(&self) -> Value {
        json!([{"name": "bash"}])
    }

    fn run<'a>(
        &'a self,
        conversation: &'a str,
        name: &'a str,
        input: &'a Value,
    ) -> BoxFuture<'a, ToolResult> {
        lock(&self.calls).push((conversation.into(), name.into(), input.clone()));
        let output = lock(&self.output)
            .clone()
            .unwrap_or_else(|| format!("ran {name}"));
        Box::pin(async move { ToolResult::ok(output) })
    }

    fn put_attachment<'a>(
        &'a self,
        conversation: &'a str,
        name: &'a str,
        bytes: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), ToolHostError>> {
        lock(&self.attached).push((conversation.into(), name.into(), bytes));
        Box::pin(async { Ok(()) })
    }

    fn prepare(&self) -> BoxFuture<'_, Result<(), ToolHostError>> {
        self.prepared.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        self.shut_down.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {})
    }
}

fn config() -> RunnerConfig {
    RunnerConfig {
        max_turns: 8,
        max_tokens: 1000,
        budgets: Budgets::default(),
        prices: PriceTable::default(),
        model: "claude-haiku-4-5".into(),
        context_window: DEFAULT_CONTEXT_WINDOW,
        per_device_rate_per_min: 0,
        history_chars: 100_000,
        on_interrupted: OnInterrupted::Fail,
        max_concurrent: MAX_CONCURRENT,
        progress_every: PROGRESS_EVERY,
    }
}

struct Rig {
    mesh: Mesh,
    runner: Arc<Runner>,
    model: Arc<FakeModel>,
    tools: Arc<FakeTools>,
    cancel: CancellationToken,
}

impl Rig {
    /// A runner on the mesh's admin device; not started.
    async fn new(
        cfg: RunnerConfig,
        reply: impl Fn(usize, &MessagesRequest) -> Step + Send + Sync + 'static,
    ) -> Rig {
        Self::with_factory(cfg, FakeModel::new(reply), false).await
    }

    async fn with_factory(cfg: RunnerConfig, model: Arc<FakeModel>, broken: bool) -> Rig {
        let mesh = Mesh::new().await;
        let tools = Arc::new(FakeTools::default());
        let runner = Runner::new(
            Deps {
                docs: mesh.docs.clone(),
                store: mesh.store.clone(),
                identity: mesh.admin.clone(),
                trust: mesh.trust.clone(),
                model: Arc::new(Factory {
                    model: model.clone(),
                    broken,
                }),
                tools: tools.clone(),
                clock: mesh.clock.clone(),
            },
            cfg,
        );
        Rig {
            mesh,
            runner,
            model,
            tools,
            cancel: CancellationToken::new(),
        }
    }

    fn start(&self) {
        self.runner.start(&self.cancel);
    }

    /// Makes this runner's device the agent, then starts it.
    async fn start_as_agent(&self) -> u64 {
        let epoch = self.mesh.make_agent(&self.mesh.admin).await;
        self.start();
        epoch
    }

    /// A new conversation with one pending request `rid` from `device`.
    async fn ask(&self, rid: &str, device: &str, prompt: &str) -> DocId {
        let doc = self.mesh.conversations().create("test").await.unwrap();
        self.ask_in(doc, rid, device, prompt).await;
        doc
    }

    async fn ask_in(&self, doc: DocId, rid: &str, device: &str, prompt: &str) {
        let (rid, device, prompt) = (rid.to_string(), device.to_string(), prompt.to_string());
        self.mesh
            .conversations()
            .modify(doc, move |c, now| {
                c.append_request(&rid, &prompt, Interface::Cli, &device, now)
            })
            .await
            .unwrap();
    }

    async fn request(&self, doc: DocId, rid: &str) -> MessageView {
        let rid = rid.to_string();
        self.mesh
            .conversations()
            .read(doc, move |c| c.find_request(&rid))
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }

    async fn reply(&self, doc: DocId, rid: &str) -> Option<MessageView> {
        let rid = rid.to_string();
        self.mesh
            .conversations()
            .read(doc, move |c| c.replies_to(&rid).into_iter().last())
            .await
            .unwrap()
            .unwrap()
    }

    /// Waits (in paused time) until request `rid` is done or failed.
    async fn finished(&self, doc: DocId, rid: &str) -> MessageView {
        for _ in 0..2_000 {
            let req = self.request(doc, rid).await;
            if matches!(req.status, Some(Status::Done | Status::Failed)) {
                return req;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("request {rid} did not finish");
    }

    /// Lets the runner work for a while (paused time), then returns the request.
    async fn after_a_while(&self, doc: DocId, rid: &str) -> MessageView {
        tokio::time::sleep(Duration::from_secs(5)).await;
        self.request(doc, rid).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_runs_to_done_with_answer_usage_and_claim() {
    let rig = Rig::new(config(), |_, _| text("hello there")).await;
    let epoch = rig.start_as_agent().await;
    let doc = rig.ask("r1", "laptop", "hi").await;
    let req = rig.finished(doc, "r1").await;
    assert_eq!(req.status, Some(Status::Done));
    assert_eq!(req.error, None);
    assert_eq!(
        req.claimed_by,
        Some(ClaimView {
            device: rig.mesh.admin.device_id().to_string(),
            epoch,
        })
    );
    let reply = rig.reply(doc, "r1").await.unwrap();
    assert_eq!(reply.text, "hello there");
    assert_eq!(
        reply.usage,
        Some(UsageView {
            // Haiku 4.5: 10 × $1 and 5 × $5 per million tokens.
            cost_nanos: 10 * 1_000 + 5 * 5_000,
            ..UsageView::new(10, 5)
        })
    );
    assert_eq!(reply.model.as_deref(), Some("claude-haiku-4-5"));
    assert_eq!(rig.runner.tokens_used_today(), 15);
    // The model saw the prompt and the host's tool definitions.
    let sent = rig.model.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].messages, vec![Message::user("hi")]);
    assert_eq!(sent[0].tools, Some(json!([{"name": "bash"}])));
    assert_eq!(sent[0].max_tokens, Some(1000));
    // The run's bookkeeping ends just after the answer is recorded (wait in real time: the
    // store's flush runs on the blocking pool).
    for _ in 0..400 {
        if rig.runner.running() == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        tokio::task::yield_now().await;
    }
    assert_eq!(rig.runner.running(), 0);
}

#[tokio::test(start_paused = true)]
async fn tool_calls_run_in_the_conversations_host_and_are_recorded() {
    let rig = Rig::new(config(), |n, _| match n {
        0 => Step {
            tool: Some(("bash".into(), json!({"command": "ls"}))),
            usage: (10, 10),
            ..Step::default()
        },
        _ => text("listed"),
    })
    .await;
    rig.start_as_agent().await;
    let doc = rig.ask("r1", "laptop", "list files").await;
    assert_eq!(rig.finished(doc, "r1").await.status, Some(Status::Done));
    let calls = lock(&rig.tools.calls).clone();
    assert_eq!(
        calls,
        vec![(
            doc.to_string(),
            "bash".to_string(),
            json!({"command": "ls"})
        )]
    );
    let reply = rig.reply(doc, "r1").await.unwrap();
    assert_eq!(reply.tool_calls.len(), 1);
    assert_eq!(reply.tool_calls[0].name, "bash");
    assert_eq!(reply.tool_calls[0].output, "ran bash");
    assert_eq!(reply.tool_calls[0].input, r#"{"command":"ls"}"#);
    assert_eq!(rig.runner.tokens_used_today(), 35);
    // The second model call carried the tool result.
    let sent = rig.model.requests();
    assert_eq!(sent.len(), 2);
    assert!(
        serde_json::to_string(&sent[1].messages)
            .unwrap()
            .contains("ran bash")
    );
}

#[tokio::test(start_paused = true)]
async fn nothing_is_claimed_without_the_role_and_gaining_it_runs_what_waits() {
    let rig = Rig::new(config(), |_, _| text("ok")).await;
    rig.start();
    let doc = rig.ask("r1", "laptop", "hi").await;
    rig.runner.poke(doc);
    let req = rig.after_a_while(doc, "r1").await;
    assert_eq!(req.status, Some(Status::Pending));
    assert_eq!(req.claimed_by, None);
    assert_eq!(rig.model.calls.load(Ordering::SeqCst), 0);
    // Gaining the role: everything is scanned and the tools are made ready.
    rig.mesh.make_agent(&rig.mesh.admin).await;
    assert_eq!(rig.finished(doc, "r1").await.status, Some(Status::Done));
    assert_eq!(rig.tools.prepared.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_newer_epoch_elsewhere_stops_claiming() {
    let rig = Rig::new(config(), |_, _| text("ok")).await;
    rig.start_as_agent().await;
    let other = rig.mesh.add_device(false).await;
    rig.mesh.make_agent(&other).await;
    let doc = rig.ask("r1", "laptop", "hi").await;
    let req = rig.after_a_while(doc, "r1").await;
    assert_eq!(req.status, Some(Status::Pending));
    assert_eq!(rig.model.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_counts_per_device_per_minute() {
    let mut cfg = config();
    cfg.per_device_rate_per_min = 2;
    let rig = Rig::new(cfg, |_, _| text("ok")).await;
    rig.start_as_agent().await;
    let doc = rig.ask("r1", "phone", "one").await;
    assert_eq!(rig.finished(doc, "r1").await.status, Some(Status::Done));
    rig.ask_in(doc, "r2", "phone", "two").await;
    assert_eq!(rig.finished(doc, "r2").await.status, Some(Status::Done));
    rig.ask_in(doc, "r3", "phone", "three").await;
    let third = rig.finished(doc, "r3").await;
    assert_eq!(third.status, Some(Status::Failed));
    assert_eq!(
        third.error.as_deref(),
        Some(
            "rate limit: this device sent more than 2 requests in the last minute; wait and ask again"
        )
    );
    // Another device is not limited by the phone's requests.
    rig.ask_in(doc, "r4", "laptop", "four").await;
    assert_eq!(rig.finished(doc, "r4").await.status, Some(Status::Done));
    // A minute later the phone may ask again.
    tokio::time::sleep(RATE_WINDOW + Duration::from_secs(1)).await;
    rig.ask_in(doc, "r5", "phone", "five").await;
    assert_eq!(rig.finished(doc, "r5").await.status, Some(Status::Done));
    assert_eq!(rig.model.calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn rate_limiter_window_slides() {
    let limiter = RateLimiter::new(2, Duration::from_secs(60));
    assert!(limiter.allow("a"));
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(limiter.allow("a"));
    assert!(!limiter.allow("a"), "third in a minute");
    assert!(limiter.allow("b"), "per device");
    // The first request leaves the window after 60 s; the second is still in it.
    tokio::time::advance(Duration::from_secs(31)).await;
    assert!(limiter.allow("a"));
    assert!(!limiter.allow("a"));
    let unlimited = RateLimiter::new(0, Duration::from_secs(60));
    assert!((0..1000).all(|_| unlimited.allow("a")));
}

#[tokio::test(start_paused = true)]
async fn a_used_up_budget_fails_the_request_before_the_model_is_called() {
    let mut cfg = config();
    cfg.budgets = Budgets::daily_tokens(100);
    // Small enough that a fresh day's budget holds a request's reservation.
    cfg.max_tokens = 40;
    let rig = Rig::new(cfg, |_, _| text("ok")).await;
    let ledger = Ledger::new(
        rig.mesh.store.clone(),
        rig.mesh.clock.clone(),
        Budgets::daily_tokens(100),
    );
    ledger.record(
        "laptop",
        None,
        Amount {
            tokens: 100,
            nanos: 0,
        },
    );
    rig.start_as_agent().await;
    let doc = rig.ask("r1", "laptop", "hi").await;
    let req = rig.finished(doc, "r1").await;
    assert_eq!(req.status, Some(Status::Failed));
    assert_eq!(
        req.error.as_deref(),
        Some(
            "budget exceeded: the mesh's daily token budget (100 tokens) is used up; it resets \
             at 00:00 UTC, or raise agent.daily_token_budget on the agent device"
        )
    );
    assert_eq!(
        crate::agent::ask::FailReason::of(req.error.as_deref().unwrap_or_default()),
        crate::agent::ask::FailReason::BudgetExceeded
    );
    assert_eq!(rig.model.calls.load(Ordering::SeqCst), 0);
    // The next UTC day has a fresh budget.
    rig.mesh.clock.advance(86_400);
    assert_eq!(rig.runner.tokens_used_today(), 0);
    rig.ask_in(doc, "r2", "laptop", "again").await;
    assert_eq!(rig.finished(doc, "r2").await.status, Some(Status::Done));
}

/// A model that always wants another tool call, one turn per second, 100 tokens a turn.
fn endless_tools(_: usize, _: &MessagesRequest) -> Step {
    Step {
        deltas: vec!["working ".into()],
        delay: Duration::from_secs(1),
        tool: Some(("bash".into(), json!({"command": "true"}))),
        usage: (60, 40),
        ..Step::default()
    }
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_a_run_before_a_turn_it_cannot_hold() {
    let mut cfg = config();
    cfg.budgets = Budgets::daily_tokens(250);
    cfg.max_tokens = 40;
    let rig = Rig::new(cfg, endless_tools).await;
    rig.start_as_agent().await;
    let doc = rig.ask("r1", "laptop", "go").await;
    let req = rig.finished(doc, "r1").await;
    assert_eq!(req.status, Some(Status::Done));
    assert_eq!(
        req.error.as_deref(),
        Some("stopped: the token budget was used up")
    );
    // 100, 200: a third turn (its input estimate and 40 tokens of answer) would not fit.
    assert_eq!(rig.model.calls.load(Ordering::SeqCst), 2);
    assert_eq!(rig.runner.tokens_used_today(), 200);
}

/// A reply whose usage is what the budget reserved for it: the request's input estimate and
/// `max_tokens` of output (so a run uses exactly what it held).
fn uses_its_reservation(max_tokens: u64) -> impl Fn(usize, &MessagesRequest) -> Step {
    move |_, req| Step {
        deltas: vec!["ok".into()],
        delay: Duration::from_millis(100),
        usage: (req.estimated_input_tokens(), max_tokens),
        ..Step::default()
    }
}

#[tokio::test(start_paused = true)]
async fn twenty_concurrent_asks_against_a_budget_for_five_run_five() {
    let max_tokens = 500u64;
    let mut cfg = config();
    cfg.max_tokens = max_tokens as u32;
    cfg.max_concurrent = 20;
    // What one request uses (and reserves): the same prompt length for all twenty.
    let one = {
        let probe = MessagesRequest {
            messages: vec![Message::user("ask 00")],
            tools: Some(json!([{"name": "bash"}])),
            ..MessagesRequest::default()
        };
        probe.estimated_input_tokens() + max_tokens
    };
    let limit = 5 * one + one / 2;
    cfg.budgets = Budgets::daily_tokens(limit);
    // The first five model calls wait for each other: all five run at once.
    let five = Arc::new(tokio::sync::Barrier::new(5));
    let reply = uses_its_reservation(max_tokens);
    let rig = Rig::new(cfg, move |n, req| Step {
        gate: (n < 5).then(|| five.clone()),
        ..reply(n, req)
    })
    .await;
    rig.start_as_agent().await;
    let mut asked = Vec::new();
    for i in 0..20 {
        let rid = format!("r{i:02}");
        let doc = rig
            .ask(&rid, &format!("device{}", i % 3), &format!("ask {i:02}"))
            .await;
        asked.push((doc, rid));
    }
    let (mut done, mut refused) = (0, 0);
    for (doc, rid) in &asked {
        let req = rig.finished(*doc, rid).await;
        match req.status {
            Some(Status::Done) => {
                assert_eq!(req.error, None);
                done += 1;
            }
            Some(Status::Failed) => {
                let e = req.error.unwrap_or_default();
                assert!(
                    e.starts_with("budget exceeded: the mesh's daily token budget"),
                    "{e}"
                );
                refused += 1;
            }
            other => panic!("{rid}: {other:?}"),
        }
    }
    assert_eq!((done, refused), (5, 15));
    assert_eq!(rig.model.calls.load(Ordering::SeqCst), 5);
    assert_eq!(
        rig.model.max_in_flight.load(Ordering::SeqCst),
        5,
        "they ran at once"
    );
    let used = rig.runner.tokens_used_today();
    assert_eq!(used, 5 * one);
    assert!(used <= limit);
    // Nothing is left reserved once the runs are over.
    let states = rig.runner.ledger().states(None);
    assert_eq!(states[0].reserved, Amount::default());
}

#[tokio::test(start_paused = true)]
async fn concurrent_runs_share_one_budget() {
    let mut cfg = config();
    cfg.budgets = Budgets::daily_tokens(2_000);
    cfg.max_turns = 50;
    cfg.max_tokens = 40;
    // Both first turns meet, so both runs are under way before the budget can run out.
    let both = Arc::new(tokio::sync::Barrier::new(2));
    let rig = Rig::new(cfg, move |n, req| Step {
        gate: (n < 2).then(|| both.clone()),
        tool: Some(("bash".into(), json!({"command": "true"}))),
        delay: Duration::from_secs(1),
        ..uses_its_reservation(40)(n, req)
    })
    .await;
    rig.start_as_agent().await;
    let a = rig.ask("a", "laptop", "go").await;
    let b = rig.ask("b", "phone", "go").await;
    let (ra, rb) = (rig.finished(a, "a").await, rig.finished(b, "b").await);
    for r in [&ra, &rb] {
        assert_eq!(r.status, Some(Status::Done));
        assert_eq!(
            r.error.as_deref(),
            Some("stopped: the token budget was used up")
        );
    }
    assert_eq!(
        rig.model.max_in_flight.load(Ordering::SeqCst),
        2,
        "they ran at once"
    );
    // Each turn used what it reserved, so the two runs together never passed the budget,
    // and every turn was counted (none lost to a concurrent update).
    let used = rig.runner.tokens_used_today();
    assert!(used <= 2_000 && used > 1_500, "{used}");
    let sent: u64 = rig
        .model
        .requests()
        .iter()
        .map(|r| r.estimated_input_tokens() + 40)
        .sum();
    assert_eq!(used, sent);
}

#[tokio::test(start_paused = true)]
async fn a_device_budget_refuses_only_that_device() {
    let mut cfg = config();
    cfg.budgets = Budgets {
        device_day: crate::agent::budget::Limit {
            tokens: 0,
            nanos: crate::agent::cost::nanos(0.05),
        },
        ..Budgets::default()
    };
    // Haiku 4.5: $0.05 of output in one call, the whole daily budget of the device.
    let rig = Rig::new(cfg, |_, _| Step {
        usage: (0, 10_000),
        ..text("ok")
    })
    .await;
    rig.start_as_agent().await;
    let a = rig.ask("a1", "laptop", "one").await;
    assert_eq!(rig.finished(a, "a1").await.status, Some(Status::Done));
    rig.ask_in(a, "a2", "laptop", "two").await;
    let second = rig.finished(a, "a2").await;
    assert_eq!(second.status, Some(Status::Failed));
    let e = second.error.unwrap_or_default();
    assert!(
        e.starts_with("budget exceeded: device laptop's daily spending budget ($0.05)"),
        "{e}"
    );
    assert!(e.contains("agent.budget.device_daily_usd"), "{e}");
    // Another device still has its own budget.
    let b = rig.ask("b1", "phone", "three").await;
    assert_eq!(rig.finished(b, "b1").await.status, Some(Status::Done));
}

#[test]
fn the_ledger_loses_no_update_under_contention() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db"), 1 << 20).unwrap();
    let clock = crate::agent::clock::ManualClock::new(86_400 * 3 + 5);
    let ledger = Ledger::new(store.clone(), clock.clone(), Budgets::default());
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    let mut r = ledger.reserve("d", None, Amount::default()).unwrap();
                    r.settle(Amount {
                        tokens: 3,
                        nanos: 1,
                    });
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(ledger.tokens_today(), 8 * 200 * 3);
    let raw = store.state_get(b"usage/d/3/mesh").unwrap().unwrap();
    assert_eq!(raw.len(), 16);
    assert_eq!(u64::from_be_bytes(raw[..8].try_into().unwrap()), 4_800);
    assert_eq!(u64::from_be_bytes(raw[8..].try_into().unwrap()), 1_600);
}

#[tokio::test(start_paused = true)]
async fn a_model_that_cannot_be_set_up_fails_the_request() {
    let rig = Rig::with_factory(config(), FakeModel::new(|_, _| text("x")), true).await;
    rig.start_as_agent().await;
    let doc = rig.ask("r1", "laptop", "hi").await;
    let req = rig.finished(doc, "r1").await;
    assert_eq!(req.status, Some(Status::Failed));
    assert_eq!(
        req.error.as_deref(),
        Some(
            "invalid agent configuration: invalid Claude client setting: max_tokens must be at least 1"
        )
    );
}

#[tokio::test(start_paused = true)]
async fn a_model_error_fails_the_request_with_its_reason_and_the_next_one_runs() {
    let rig = Rig::new(config(), |n, _| match n {
        0 => Step {
            error: Some(ClaudeError::Overloaded { attempts: 3 }),
            ..Step::default()
        },
        _ => text("fine now"),
    })
    .await;
    rig.start_as_agent().await;
    let doc = rig.ask("r1", "laptop", "hi").await;
    let req = rig.finished(doc, "r1").await;
    assert_eq!(req.status, Some(Status::Failed));
    assert_eq!(
        req.error.as_deref(),
        Some("the Anthropic API is overloaded; gave up after 3 attempts")
    );
    assert!(rig.reply(doc, "r1").await.is_none());
    rig.ask_in(doc, "r2", "laptop", "again").await;
    assert_eq!(rig.finished(doc, "r2").await.status, Some(Status::Done));
    // The failed request is left out of the history of the next one.
    let sent = rig.model.requests();
    assert_eq!(sent[1].messages, vec![Message::user("again")]);
}

#[tokio::test(start_paused = true)]
async fn the_turn_limit_ends_a_run_with_a_note() {
    let mut cfg = config();
    cfg.max_turns = 2;
    let rig = Rig::new(cfg, endless_tools).await;
    rig.start_as_agent().await;
    let doc = rig.ask("r1", "laptop", "go").await;
    let req = rig.finished(doc, "r1").await;
    assert_eq!(req.status, Some(Status::Done));
    assert_eq!(
        req.error.as_deref(),
        Some("stopped: the turn limit was reached")
    );
    assert_eq!(rig.model.calls.load(Ordering::SeqCst), 2);
    // Only the first turn's tool call ran; the second was answered "not run".
    assert_eq!(lock(&rig.tools.calls).len(), 1);
}

/// Puts request `rid` into `running` under this device's claim, as a crash would leave it.
async fn leave_running(rig: &Rig, doc: DocId, rid: &str, epoch: u64, error: Option<&str>) {
    let me = rig.mesh.admin.device_id().to_string();
    let (rid, error) = (rid.to_string(), error.map(str::to_string));
    rig.mesh
        .conversations()
        .modify(doc, move |c, now| {
            c.claim(&rid, &me, epoch, now)?;
            if let Some(e) = error {
                c.set_status(&rid, Status::Running, Some(&e), now)?;
            }
            Ok(())
        })
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn interrupted_runs_fail_at_start_up() {
    let rig = Rig::new(config(), |_, _| text("ok")).await;
    let epoch = rig.mesh.make_agent(&rig.mesh.admin).await;
    let doc = rig.ask("r1", "laptop", "hi").await;
    leave_running(&rig, doc, "r1", epoch, None).await;
    // Someone else's run is not ours to recover.
    let other = rig.ask("r2", "laptop", "hi").await;
    let stranger = "12D3KooWstranger".to_string();
    rig.mesh
        .conversations()
        .modify(other, move |c, now| c.claim("r2", &stranger, epoch, now))
        .await
        .unwrap();
    rig.start();
    let req = rig.finished(doc, "r1").await;
    assert_eq!(req.status, Some(Status::Failed));
    assert_eq!(req.error.as_deref(), Some("interrupted"));
    assert_eq!(rig.model.calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        rig.after_a_while(other, "r2").await.status,
        Some(Status::Running)
    );
}

#[tokio::test(start_paused = true)]
async fn interrupted_runs_are_retried_once_by_policy() {
    let mut cfg = config();
    cfg.on_interrupted = OnInterrupted::Retry;
    let rig = Rig::new(cfg, |_, _| text("second time lucky")).await;
    let epoch = rig.mesh.make_agent(&rig.mesh.admin).await;
    let doc = rig.ask("r1", "laptop", "hi").await;
    leave_running(&rig, doc, "r1", epoch, None).await;
    // One that was already retried once fails instead.
    rig.ask_in(doc, "r0", "laptop", "older").await;
    leave_running(&rig, doc, "r0", epoch, Some("interrupted; retried")).await;
    rig.start();
    let req = rig.finished(doc, "r1").await;
    assert_eq!(req.status, Some(Status::Done));
    assert_eq!(
        rig.reply(doc, "r1").await.unwrap().text,
        "second time lucky"
    );
    let again = rig.request(doc, "r0").await;
    assert_eq!(again.status, Some(Status::Failed));
    assert_eq!(again.error.as_deref(), Some("interrupted"));
    assert_eq!(rig.model.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn progress_is_written_at_most_every_150_ms_and_the_answer_is_whole() {
    let deltas: Vec<String> = (0..40).map(|i| format!("w{i} ")).collect();
    let expected = deltas.concat();
    let rig = Rig::new(config(), move |_, _| Step {
        deltas: deltas.clone(),
        delay: Duration::from_millis(20),
        usage: (1, 1),
        ..Step::default()
    })
    .await;
    rig.start_as_agent().await;
    let doc = rig.mesh.conversations().create("t").await.unwrap();
    let mut changes = rig.mesh.docs.subscribe();
    let started = tokio::time::Instant::now();
    rig.ask_in(doc, "r1", "laptop", "stream please").await;
    let req = rig.finished(doc, "r1").await;
    let elapsed = started.elapsed();
    assert_eq!(req.status, Some(Status::Done));
    assert_eq!(rig.reply(doc, "r1").await.unwrap().text, expected);
    // Every change of the conversation: the request, the claim, progress writes, the answer.
    let mut n = 0u32;
    while let Ok(ch) = changes.try_recv() {
        if ch.id == doc {
            n += 1;
        }
    }
    let progress_writes = n.saturating_sub(3);
    let bound = (elapsed.as_millis() / PROGRESS_EVERY.as_millis()) as u32 + 2;
    assert!(progress_writes >= 1, "{progress_writes} progress writes");
    assert!(
        progress_writes <= bound,
        "{progress_writes} progress writes in {elapsed:?} (bound {bound})"
    );
    // Far fewer writes than deltas.
    assert!(progress_writes < 40 / 2, "{progress_writes}");
    // The last progress written holds most of the text (the writer stops at once when the
    // run ends: the answer replaces the progress).
    let p = req.progress.clone().unwrap_or_default();
    assert!(!p.text.is_empty() && expected.starts_with(&p.text), "{p:?}");
}

/// Issue 15: a run of 10 tool calls of 64 KiB output each, with text streamed between them,
/// adds at most 3x its final message to the saved conversation, and every device saw the
/// progress as it ran (text, each tool call with its capped output).
#[tokio::test(start_paused = true)]
async fn a_long_run_with_big_tool_outputs_adds_a_small_multiple_of_its_answer() {
    let mut cfg = config();
    cfg.max_turns = 16;
    let piece = |n: usize, i: usize| format!("turn {n} piece {i}: looking at the output. ");
    let rig = Rig::new(cfg, move |n, _| Step {
        deltas: (0..40).map(|i| piece(n, i)).collect(),
        delay: Duration::from_millis(30),
        tool: (n < 10).then(|| ("bash".into(), json!({"command": format!("step {n}")}))),
        usage: (10, 10),
        ..Step::default()
    })
    .await;
    // 64 KiB of base64-like output, not compressible.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let output: String = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                    [(x % 64) as usize],
            )
        })
        .collect();
    *lock(&rig.tools.output) = Some(output);
    rig.start_as_agent().await;
    let doc = rig.mesh.conversations().create("t").await.unwrap();
    let r = &rig;
    let saved =
        |doc: DocId| async move { r.mesh.docs.read(doc, |d| d.snapshot().len()).await.unwrap() };
    rig.ask_in(doc, "r1", "laptop", "a long one").await;
    let before = saved(doc).await;
    // Progress is seen while the run goes: text, then tool calls with capped outputs.
    let mut seen_tools = 0;
    for _ in 0..2_000 {
        let req = rig.request(doc, "r1").await;
        let p = req.progress.clone().unwrap_or_default();
        assert!(
            p.tools
                .iter()
                .all(|t| t.output.as_ref().is_none_or(|o| o.len() < 4096 + 40))
        );
        seen_tools = seen_tools.max(p.tools.iter().filter(|t| t.output.is_some()).count());
        if req.status == Some(Status::Done) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen_tools >= 5,
        "saw {seen_tools} finished tool calls in progress"
    );
    let reply = rig.reply(doc, "r1").await.unwrap();
    assert_eq!(reply.tool_calls.len(), 10);
    let expected: String = (0..11)
        .flat_map(|n| (0..40).map(move |i| piece(n, i)))
        .collect();
    assert_eq!(reply.text, expected);
    let message = reply.text.len()
        + reply
            .tool_calls
            .iter()
            .map(|c| c.id.len() + c.name.len() + c.input.len() + c.output.len())
            .sum::<usize>();
    let added = saved(doc).await - before;
    assert!(
        added <= 3 * message,
        "the run added {added} bytes for a final message of {message}"
    );
    let progress = rig.request(doc, "r1").await.progress.unwrap_or_default();
    assert!(expected.starts_with(&progress.text), "{:?}", progress.text);
    assert_eq!(progress.tools.len(), 10);
}

#[tokio::test(start_paused = true)]
async fn requests_of_one_conversation_run_in_order_with_their_history() {
    let rig = Rig::new(config(), |n, _| text(&format!("answer {n}"))).await;
    let doc = rig.ask("r1", "laptop", "first").await;
    rig.ask_in(doc, "r2", "laptop", "second").await;
    rig.start_as_agent().await;
    assert_eq!(rig.finished(doc, "r1").await.status, Some(Status::Done));
    assert_eq!(rig.finished(doc, "r2").await.status, Some(Status::Done));
    assert_eq!(rig.model.max_in_flight.load(Ordering::SeqCst), 1);
    rig.ask_in(doc, "r3", "laptop", "third").await;
    assert_eq!(rig.finished(doc, "r3").await.status, Some(Status::Done));
    let sent = rig.model.requests();
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[0].messages, vec![Message::user("first")]);
    // The second was queued before the first was answered; its history has the first with
    // its answer all the same.
    let first = [Message::user("first"), Message::assistant("answer 0")];
    assert_eq!(
        sent[1].messages,
        [&first[..], &[Message::user("second")]].concat()
    );
    // Answers pair with their requests even though they were appended out of order.
    assert_eq!(
        sent[2].messages,
        [
            &first[..],
            &[
                Message::user("second"),
                Message::assistant("answer 1"),
                Message::user("third")
            ]
        ]
        .concat()
    );
}

#[tokio::test(start_paused = true)]
async fn at_most_max_concurrent_requests_run_at_once() {
    let mut cfg = config();
    cfg.max_concurrent = 2;
    // The first calls wait for a third to join them, which the limit never lets happen.
    let three = Arc::new(tokio::sync::Barrier::new(3));
    let rig = Rig::new(cfg, move |n, _| Step {
        deltas: vec!["slow".into()],
        delay: Duration::from_secs(3),
        usage: (1, 1),
        gate: (n < 2).then(|| three.clone()),
        ..Step::default()
    })
    .await;
    let mut docs = Vec::new();
    for i in 0..5 {
        docs.push(rig.ask(&format!("r{i}"), "laptop", "go").await);
    }
    rig.start_as_agent().await;
    for (i, doc) in docs.iter().enumerate() {
        let req = rig.finished(*doc, &format!("r{i}")).await;
        assert_eq!(req.status, Some(Status::Done));
    }
    assert_eq!(rig.model.max_in_flight.load(Ordering::SeqCst), 2);
    assert_eq!(rig.model.calls.load(Ordering::SeqCst), 5);
}

#[tokio::test(start_paused = true)]
async fn stop_ends_the_tasks_and_shuts_the_tools_down() {
    let rig = Rig::new(config(), |_, _| text("ok")).await;
    rig.start_as_agent().await;
    rig.runner.stop().await;
    assert_eq!(rig.tools.shut_down.load(Ordering::SeqCst), 1);
    let doc = rig.ask("r1", "laptop", "hi").await;
    rig.runner.poke(doc);
    assert_eq!(
        rig.after_a_while(doc, "r1").await.status,
        Some(Status::Pending)
    );
    // Starting again after a stop does nothing (the scan queue is gone).
    rig.start();
    assert_eq!(
        rig.after_a_while(doc, "r1").await.status,
        Some(Status::Pending)
    );
    rig.cancel.cancel();
}

#[test]
fn progress_events_fold_into_what_the_document_shows() {
    let mut p = RunProgress::default();
    apply_progress(&mut p, Progress::TextDelta("Hel".into()));
    apply_progress(&mut p, Progress::TextDelta("lo".into()));
    apply_progress(
        &mut p,
        Progress::Retrying {
            attempt: 2,
            wait: Duration::from_millis(1500),
            reason: "429 rate_limit_error".into(),
        },
    );
    assert_eq!(
        p.retry.as_deref(),
        Some("model API busy (429 rate_limit_error); retry 2 in 1.5 s")
    );
    apply_progress(
        &mut p,
        Progress::ToolCallStarted {
            id: "t1".into(),
            name: "bash".into(),
            input: json!({"command": "ls"}),
        },
    );
    assert_eq!(p.tools[0].output, None);
    apply_progress(
        &mut p,
        Progress::ToolCallFinished {
            id: "t1".into(),
            name: "bash".into(),
            output: "x".repeat(5000),
            is_error: true,
        },
    );
    apply_progress(
        &mut p,
        Progress::TurnFinished {
            turn: 1,
            usage: Usage::default(),
        },
    );
    assert_eq!(p.text, "Hello");
    assert_eq!(p.turns, 1);
    assert_eq!(p.retry, None, "a finished turn clears the retry notice");
    let t = &p.tools[0];
    assert_eq!(t.input, r#"{"command":"ls"}"#);
    assert!(t.is_error);
    assert!(t.output.as_deref().unwrap().ends_with("… [904 bytes cut]"));
    // Unknown ids are ignored.
    apply_progress(
        &mut p,
        Progress::ToolCallFinished {
            id: "nope".into(),
            name: "bash".into(),
            output: String::new(),
            is_error: false,
        },
    );
    assert_eq!(p.tools.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_retry_notice_shows_in_the_progress_while_the_model_is_retried() {
    let rig = Rig::new(config(), |_, _| Step {
        deltas: vec!["done".into()],
        delay: Duration::from_secs(1),
        usage: (1, 1),
        retry: true,
        ..Step::default()
    })
    .await;
    rig.start_as_agent().await;
    let doc = rig.ask("r1", "laptop", "hi").await;
    let mut seen_retry = None;
    for _ in 0..100 {
        let req = rig.request(doc, "r1").await;
        if let Some(r) = req.progress.clone().unwrap_or_default().retry {
            seen_retry = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        seen_retry.as_deref(),
        Some("model API busy (529 overloaded_error); retry 1 in 0.5 s")
    );
    assert_eq!(rig.finished(doc, "r1").await.status, Some(Status::Done));
}

fn msg(role: MsgRole, text: &str, rid: Option<&str>, status: Option<Status>) -> MessageView {
    let (request_id, reply_to) = match role {
        MsgRole::User => (rid.map(str::to_string), None),
        MsgRole::Assistant => (None, rid.map(str::to_string)),
    };
    MessageView {
        index: 0,
        id: String::new(),
        role,
        text: text.into(),
        status,
        error: None,
        interface: None,
        device: None,
        created_at: None,
        request_id,
        claimed_by: None,
        reply_to,
        tool_calls: Vec::new(),
        usage: None,
        model: None,
        progress: None,
        attachments: Vec::new(),
    }
}

#[test]
fn history_pairs_answered_requests_and_stops_at_the_current_one() {
    let messages = vec![
        msg(MsgRole::User, "q1", Some("r1"), Some(Status::Done)),
        msg(MsgRole::User, "q2 failed", Some("r2"), Some(Status::Failed)),
        msg(MsgRole::User, "q3", Some("r3"), Some(Status::Done)),
        msg(MsgRole::Assistant, "a3", Some("r3"), None),
        msg(MsgRole::Assistant, "a1", Some("r1"), None),
        msg(MsgRole::User, "q4", Some("r4"), Some(Status::Pending)),
        msg(MsgRole::User, "q5 later", Some("r5"), Some(Status::Pending)),
    ];
    assert_eq!(
        history_for(&messages, "r4"),
        vec![
            Message::user("q1"),
            Message::assistant("a1"),
            Message::user("q3"),
            Message::assistant("a3"),
            Message::user("q4")
        ]
    );
    assert_eq!(history_for(&messages, "r1"), vec![Message::user("q1")]);
    // A done request whose answer has not arrived (yet) is left out.
    let gap = vec![
        msg(MsgRole::User, "q1", Some("r1"), Some(Status::Done)),
        msg(MsgRole::User, "q2", Some("r2"), Some(Status::Running)),
    ];
    assert_eq!(history_for(&gap, "r2"), vec![Message::user("q2")]);
    // An assistant message that answers nothing is left out.
    let orphan = vec![
        msg(MsgRole::Assistant, "hello?", None, None),
        msg(MsgRole::User, "q", Some("r"), Some(Status::Pending)),
    ];
    assert_eq!(history_for(&orphan, "r"), vec![Message::user("q")]);
}

#[test]
fn truncate_cuts_at_a_character_boundary() {
    assert_eq!(truncate("short", 10), "short");
    assert_eq!(truncate("abcdef", 3), "abc… [3 bytes cut]");
    // 'é' is two bytes: a cut in its middle moves back before it.
    assert_eq!(truncate("aé", 2), "a… [2 bytes cut]");
}

#[tokio::test(start_paused = true)]
async fn the_memory_document_is_the_system_prompt() {
    let rig = Rig::new(config(), |_, _| text("noted")).await;
    rig.start_as_agent().await;
    let doc = rig.ask("r1", "laptop", "hi").await;
    assert_eq!(rig.finished(doc, "r1").await.status, Some(Status::Done));
    assert_eq!(rig.model.requests()[0].system, None, "no memory yet");
    rig.mesh
        .docs
        .create(iom_crdt::DocKind::Memory)
        .await
        .unwrap();
    rig.mesh
        .docs
        .modify(DocId::MEMORY, crate::docs::Origin::Local, false, |d| {
            Memory::open(&mut *d)?.replace("I like tea.", "memory edit", 1)?;
            Ok(())
        })
        .await
        .unwrap();
    rig.ask_in(doc, "r2", "laptop", "what do I like?").await;
    assert_eq!(rig.finished(doc, "r2").await.status, Some(Status::Done));
    assert_eq!(
        rig.model.requests()[1].system.as_deref(),
        Some("The person's memory (their notes for you):\n\nI like tea.")
    );
}

#[tokio::test(start_paused = true)]
async fn attachments_go_into_the_workspace_before_the_model_runs() {
    let rig = Rig::new(config(), |_, _| text("read it")).await;
    rig.start_as_agent().await;
    let mut w = rig.mesh.store.blob_writer(None).unwrap();
    w.write(b"the attached bytes").unwrap();
    let (id, meta) = w.finish().await.unwrap();
    let doc = rig.mesh.conversations().create("t").await.unwrap();
    let files = vec![
        iom_crdt::AttachmentView {
            name: "notes.txt".into(),
            hash: hex::encode(id),
            len: meta.len,
        },
        iom_crdt::AttachmentView {
            name: "missing.bin".into(),
            hash: hex::encode([9u8; 32]),
            len: 1,
        },
    ];
    let one = vec![files[0].clone()];
    rig.mesh
        .conversations()
        .modify(doc, move |c, now| {
            c.append_request_with("r1", "look", Interface::Cli, "laptop", &one, now)
        })
        .await
        .unwrap();
    assert_eq!(rig.finished(doc, "r1").await.status, Some(Status::Done));
    assert_eq!(
        lock(&rig.tools.attached).clone(),
        vec![(
            doc.to_string(),
            "notes.txt".to_string(),
            b"the attached bytes".to_vec()
        )]
    );
    // A blob that never arrives fails the request after the wait, before any model call.
    let calls = rig.model.calls.load(Ordering::SeqCst);
    rig.mesh
        .conversations()
        .modify(doc, move |c, now| {
            c.append_request_with("r2", "again", Interface::Cli, "laptop", &files, now)
        })
        .await
        .unwrap();
    let req = rig.finished(doc, "r2").await;
    assert_eq!(req.status, Some(Status::Failed));
    assert!(
        req.error
            .as_deref()
            .is_some_and(|e| e.contains("\"missing.bin\" did not arrive")),
        "{req:?}"
    );
    assert_eq!(rig.model.calls.load(Ordering::SeqCst), calls);
}

/// A rig whose model asks for `bash` once and then answers, with `bash` marked `ask`
/// (waiting `timeout` s), started as the agent, and request `r1` asked.
async fn approval_rig(timeout: u64) -> (Rig, DocId) {
    let rig = Rig::new(config(), |n, _| {
        if n == 0 {
            Step {
                tool: Some(("bash".into(), json!({"command": "rm -rf /workspace/old"}))),
                ..text("cleaning up")
            }
        } else {
            text("done")
        }
    })
    .await;
    crate::agent::approvals::edit_policy(&rig.mesh.docs, 1, move |s, now| {
        let rule = iom_crdt::approvals::Rule {
            tool: "bash".into(),
            args: None,
            action: iom_crdt::approvals::Action::Ask,
        };
        iom_crdt::approvals::set_rule(s, &rule, now)?;
        iom_crdt::approvals::set_timeout(s, timeout, now)
    })
    .await
    .unwrap();
    rig.start_as_agent().await;
    let doc = rig.ask("r1", "laptop", "clean up").await;
    (rig, doc)
}

/// The id of the first pending approval, once it appears (paused time).
async fn pending_approval(rig: &Rig) -> String {
    for _ in 0..500 {
        let now = crate::agent::clock::Clock::now_secs(rig.mesh.clock.as_ref());
        let found = crate::agent::approvals::list(&rig.mesh.docs, now, false)
            .await
            .unwrap();
        if let Some(f) = found.first() {
            return f.approval.id.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no approval appeared");
}

async fn answer_approval(rig: &Rig, by: &SharedIdentity, id: &str, approve: bool) {
    let d = if approve {
        iom_crdt::approvals::Decision::Approve
    } else {
        iom_crdt::approvals::Decision::Deny
    };
    let now = crate::agent::clock::Clock::now_secs(rig.mesh.clock.as_ref());
    crate::agent::approvals::answer(&rig.mesh.docs, by, &rig.mesh.trust, now, id, d, None)
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_approved_call_runs_and_the_request_finishes() {
    let (rig, doc) = approval_rig(600).await;
    let laptop = rig.mesh.add_device(true).await;
    let id = pending_approval(&rig).await;
    assert_eq!(rig.request(doc, "r1").await.status, Some(Status::Running));
    assert!(lock(&rig.tools.calls).is_empty(), "ran before the answer");
    answer_approval(&rig, &laptop, &id, true).await;
    let req = rig.finished(doc, "r1").await;
    assert_eq!(req.status, Some(Status::Done), "{req:?}");
    assert_eq!(lock(&rig.tools.calls).len(), 1);
    assert_eq!(rig.reply(doc, "r1").await.unwrap().tool_calls.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_denied_call_fails_the_request_without_running() {
    let (rig, doc) = approval_rig(600).await;
    let laptop = rig.mesh.add_device(true).await;
    let id = pending_approval(&rig).await;
    answer_approval(&rig, &laptop, &id, false).await;
    let req = rig.finished(doc, "r1").await;
    assert_eq!(req.status, Some(Status::Failed));
    let e = req.error.unwrap_or_default();
    assert!(
        e.contains(&format!("approval {id} denied by device2")),
        "{e}"
    );
    assert!(lock(&rig.tools.calls).is_empty());
    // The model was not called again after the denial.
    assert_eq!(rig.model.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_call_expires_and_fails_the_request() {
    let (rig, doc) = approval_rig(60).await;
    let started = tokio::time::Instant::now();
    let req = rig.finished(doc, "r1").await;
    assert_eq!(req.status, Some(Status::Failed));
    assert!(
        req.error
            .unwrap_or_default()
            .contains("no answer within 60 s: denied")
    );
    assert!(started.elapsed() >= Duration::from_secs(60));
    assert!(lock(&rig.tools.calls).is_empty());
}
