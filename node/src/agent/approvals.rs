//! Approvals of risky tool calls.
//!
//! The mesh's policy (`iom approvals policy …`, kept in the settings document: see
//! [`iom_crdt::approvals`]) marks tools, MCP server prefixes (`mcp__SERVER__*`) or argument
//! patterns `allow`, `ask` or `deny`. Every tool call of a run goes through [`Gated`], the
//! runner's executor:
//!
//! - `allow`: the call runs;
//! - `deny`: it does not; the model is told the policy forbids it;
//! - `ask`: the run pauses. An approval request with the exact call (tool, arguments, what it
//!   will touch) is written into the conversation, where every device sees it
//!   (`iom approvals`, `iom ask`, `iom chat`, the web page). An admin device answers
//!   ([`answer`]: `iom approve ID`, `iom deny ID`), signing its answer with its device key.
//!   The agent accepts only answers whose signature verifies over this exact call and whose
//!   device holds an admin certificate now; one accepted `deny` wins. A yes runs the call; a
//!   no, or no answer within the policy's timeout (default 10 minutes), fails the request with
//!   the reason, and the call never runs.
//!
//! Waiting uses `tokio::time`, so unit tests expire approvals with paused time.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use iom_crdt::approvals::{
    self as policy, Action, AnswerView, ApprovalError, ApprovalView, Decision, NewApproval, Policy,
    State,
};
use iom_crdt::{Approvals as DocApprovals, DocId, DocKind, Settings};
use iom_protocol::keys::DeviceId;
use serde_json::Value;
use tokio::sync::Notify;

use super::claude::{ClaudeError, ToolExecutor, ToolResult};
use super::conversations::{Conversations, next_change};
use crate::docs::{Docs, DocsError, Origin};
use crate::identity::SharedIdentity;
use crate::trust::TrustBook;

/// How often a waiting approval looks at the document without a change (a safety net).
const POLL: Duration = Duration::from_secs(2);
/// Approvals changed within this long are listed by default (older ones with `all`).
pub const RECENT_SECS: u64 = 86_400;

/// What the gate decided about one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateOutcome {
    /// Run it.
    Run,
    /// Do not run it; tell the model why (the run goes on).
    Refuse(String),
    /// Do not run it; the request fails with this reason.
    Halt(String),
}

/// The approval gate of the agent: reads the policy, asks, waits and decides.
#[derive(Debug, Clone)]
pub struct Gate {
    conversations: Conversations,
    trust: Arc<TrustBook>,
}

impl Gate {
    /// A gate over the conversations (and the settings document beside them) and the
    /// certificates (who may answer).
    pub fn new(conversations: Conversations, trust: Arc<TrustBook>) -> Gate {
        Gate {
            conversations,
            trust,
        }
    }

    /// The mesh's policy now (the default when there is no settings document).
    pub async fn policy(&self) -> Policy {
        read_policy(self.conversations.docs()).await
    }

    /// Decides call `tool` with `input` in request `rid` of conversation `doc`, asking an admin
    /// device (and waiting) when the policy says `ask`. `agent` is this device's id.
    pub async fn check(
        &self,
        doc: DocId,
        rid: &str,
        agent: &str,
        tool: &str,
        input: &Value,
    ) -> GateOutcome {
        let policy = self.policy().await;
        let verdict = policy.decide(tool, input);
        match verdict.action {
            Action::Allow => GateOutcome::Run,
            Action::Deny => GateOutcome::Refuse(format!(
                "not run: the mesh's tool policy denies this call ({}); do not try to reach \
                 the same effect another way, tell the person what you wanted to do",
                verdict.rule.as_deref().unwrap_or("deny")
            )),
            Action::Ask => {
                let ask = Ask {
                    doc,
                    rid,
                    agent,
                    tool,
                    input,
                    rule: verdict.rule.as_deref(),
                    timeout: Duration::from_secs(policy.timeout_secs),
                };
                self.ask(ask).await
            }
        }
    }

    async fn ask(&self, a: Ask<'_>) -> GateOutcome {
        let id = format!("ap{}", hex::encode(crate::time::random_bytes::<5>()));
        let asking_device = self
            .conversations
            .read(a.doc, {
                let rid = a.rid.to_string();
                move |c| c.find_request(&rid).and_then(|m| m.device)
            })
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .unwrap_or_default();
        let name = asking_device
            .parse::<DeviceId>()
            .ok()
            .and_then(|d| self.trust.state().devices.get(&d).map(|t| t.name.clone()))
            .unwrap_or(asking_device);
        let touches = touches(a.tool, a.input, &name);
        let input = a.input.to_string();
        // Subscribed before the request is written, so no answer is missed.
        let mut changes = self.conversations.docs().subscribe();
        let started = tokio::time::Instant::now();
        let deadline = started + a.timeout;
        let now = self.conversations.now();
        let expires_at = now.saturating_add(a.timeout.as_secs() as i64);
        let written = {
            let (id, rid, tool, agent) = (
                id.clone(),
                a.rid.to_string(),
                a.tool.to_string(),
                a.agent.to_string(),
            );
            let (input, touches, rule) =
                (input.clone(), touches.clone(), a.rule.map(str::to_owned));
            self.edit(a.doc, move |ap, now| {
                ap.open_request(
                    &NewApproval {
                        id: &id,
                        request_id: &rid,
                        tool: &tool,
                        input: &input,
                        touches: &touches,
                        rule: rule.as_deref(),
                        asked_by: &agent,
                        expires_at,
                    },
                    now,
                )
            })
            .await
        };
        if let Err(e) = written {
            return GateOutcome::Halt(format!(
                "approval needed for {}, but the request could not be recorded: {e}",
                a.tool
            ));
        }
        tracing::info!(conversation = %a.doc, request = %a.rid, approval = %id, tool = %a.tool, "waiting for approval");
        loop {
            let view = self.approval(a.doc, &id).await;
            if let Some(v) = &view
                && let Some((decision, device, reason)) = self.accepted(a.doc, v)
            {
                let who = self.device_label(&device);
                let (state, outcome) = match decision {
                    Decision::Approve => (State::Approved, GateOutcome::Run),
                    Decision::Deny => (
                        State::Denied,
                        GateOutcome::Halt(format!(
                            "approval {id} denied by {who}: {} ({} was not run)",
                            reason.as_deref().unwrap_or("no reason given"),
                            a.tool
                        )),
                    ),
                };
                tracing::info!(approval = %id, state = state.name(), by = %who, "approval decided");
                self.decide(a.doc, &id, state, Some(device), reason).await;
                return outcome;
            }
            let woke = tokio::select! {
                () = tokio::time::sleep_until(deadline) => false,
                () = next_change(&mut changes, a.doc, POLL) => true,
            };
            if !woke {
                let secs = a.timeout.as_secs();
                let reason = format!("no answer within {secs} s: denied");
                tracing::info!(approval = %id, "approval expired");
                self.decide(a.doc, &id, State::Expired, None, Some(reason.clone()))
                    .await;
                return GateOutcome::Halt(format!(
                    "approval {id} for {} expired: {reason} ({} was not run)",
                    a.tool, a.tool
                ));
            }
        }
    }

    /// The accepted decision of an approval's answers, if any: `(decision, device, reason)`.
    /// An answer counts when its device is an admin now (not revoked) and its signature
    /// verifies over this call; a deny wins over an approve.
    fn accepted(&self, doc: DocId, v: &ApprovalView) -> Option<(Decision, String, Option<String>)> {
        let trust = self.trust.state();
        let digest = v.digest();
        let valid: Vec<&AnswerView> = v
            .answers
            .iter()
            .filter(|a| {
                let ok = verify_answer(doc, &v.id, &digest, a)
                    .is_some_and(|d| trust.is_admin(&d) && !trust.is_revoked(&d));
                if !ok {
                    tracing::warn!(approval = %v.id, device = %a.device, "ignored an approval answer: not a valid answer of an admin device");
                }
                ok
            })
            .collect();
        valid
            .iter()
            .find(|a| a.decision == Decision::Deny)
            .or_else(|| valid.first())
            .map(|a| (a.decision, a.device.clone(), a.reason.clone()))
    }

    fn device_label(&self, device: &str) -> String {
        device
            .parse::<DeviceId>()
            .ok()
            .and_then(|d| self.trust.state().devices.get(&d).map(|t| t.name.clone()))
            .unwrap_or_else(|| device.to_string())
    }

    async fn approval(&self, doc: DocId, id: &str) -> Option<ApprovalView> {
        let id = id.to_string();
        self.conversations
            .docs()
            .read(doc, move |d| {
                DocApprovals::open(d).ok().and_then(|a| a.get(&id))
            })
            .await
            .ok()
            .flatten()
    }

    async fn decide(
        &self,
        doc: DocId,
        id: &str,
        state: State,
        by: Option<String>,
        reason: Option<String>,
    ) {
        let id2 = id.to_string();
        let r = self
            .edit(doc, move |ap, now| {
                ap.decide(&id2, state, by.as_deref(), reason.as_deref(), now)
            })
            .await;
        if let Err(e) = r {
            tracing::error!(approval = %id, error = %e, "cannot record the approval's decision");
        }
    }

    async fn edit<F>(&self, doc: DocId, f: F) -> Result<(), EditApprovalError>
    where
        F: FnOnce(&mut DocApprovals<&mut iom_crdt::Document>, i64) -> Result<(), ApprovalError>
            + Send
            + 'static,
    {
        edit(self.conversations.docs(), doc, self.conversations.now(), f).await
    }
}

struct Ask<'a> {
    doc: DocId,
    rid: &'a str,
    agent: &'a str,
    tool: &'a str,
    input: &'a Value,
    rule: Option<&'a str>,
    timeout: Duration,
}

/// The device whose valid signature an answer carries, if it verifies.
fn verify_answer(doc: DocId, id: &str, digest: &[u8; 32], a: &AnswerView) -> Option<DeviceId> {
    let device = a.device.parse::<DeviceId>().ok()?;
    let sig: [u8; 64] = hex::decode(&a.signature).ok()?.try_into().ok()?;
    let payload = policy::answer_payload(doc, id, digest, a.decision, a.at);
    device.verify(&payload, &sig).ok().map(|()| device)
}

/// What a call will touch, in words, for the approval request.
pub fn touches(tool: &str, input: &Value, asking_device: &str) -> Vec<String> {
    let s = |k: &str| {
        input
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let sandbox = "the conversation's sandbox container (no network)";
    match tool {
        "bash" => vec![
            format!("runs a shell command in {sandbox}: {}", s("command")),
            "can read and change every file in /workspace".into(),
        ],
        "write_file" | "edit_file" => vec![format!("writes {} in {sandbox}", s("path"))],
        "read_file" => vec![format!("reads {} in {sandbox}", s("path"))],
        "list_files" => vec![format!("lists {} in {sandbox}", s("path"))],
        "memory_read" => vec!["reads the memory document".into()],
        "memory_update" => vec![format!(
            "{} the memory document ({} characters), on every device",
            if s("mode") == "replace" {
                "replaces"
            } else {
                "appends to"
            },
            s("text").chars().count()
        )],
        "schedule_add" => vec![format!(
            "adds a schedule {:?} (UTC) that asks {:?} on its own, on every device",
            s("cron"),
            s("prompt")
        )],
        "schedule_remove" => vec![format!("removes schedule {}", s("id"))],
        "schedule_list" => vec!["reads the schedules".into()],
        "conversations_search" => vec![format!("searches every conversation for {:?}", s("query"))],
        "send_file" => vec![format!(
            "sends /workspace/{} to device {asking_device} (stored as a blob on every device)",
            s("path").trim_start_matches("/workspace/")
        )],
        other => match other.strip_prefix("mcp__").and_then(|r| r.split_once("__")) {
            Some((server, t)) => vec![format!(
                "calls tool {t} of MCP server {server} (in its own container)"
            )],
            None => vec![format!("runs tool {other}")],
        },
    }
}

/// Why an approval could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EditApprovalError {
    /// The document could not be loaded or stored.
    #[error(transparent)]
    Docs(#[from] DocsError),
    /// The change was refused.
    #[error(transparent)]
    Approval(#[from] ApprovalError),
}

async fn edit<F>(docs: &Docs, doc: DocId, now: i64, f: F) -> Result<(), EditApprovalError>
where
    F: FnOnce(&mut DocApprovals<&mut iom_crdt::Document>, i64) -> Result<(), ApprovalError>
        + Send
        + 'static,
{
    docs.modify(doc, Origin::Local, false, move |d| {
        Ok(DocApprovals::open(&mut *d)
            .map_err(ApprovalError::from)
            .and_then(|mut a| f(&mut a, now)))
    })
    .await?
    .map_err(EditApprovalError::from)
}

/// The mesh's approval policy in `docs` (the default without a settings document).
pub async fn read_policy(docs: &Docs) -> Policy {
    if !matches!(docs.meta(DocId::SETTINGS), Ok(Some(_))) {
        return Policy::default();
    }
    docs.read(DocId::SETTINGS, |d| {
        Settings::open(d)
            .map(|s| Policy::read(&s))
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default()
}

/// Edits the policy (creating the settings document if needed).
pub async fn edit_policy<R, F>(docs: &Docs, now: i64, f: F) -> Result<R, PolicyEditError>
where
    F: FnOnce(&mut Settings<&mut iom_crdt::Document>, i64) -> Result<R, policy::RuleError>
        + Send
        + 'static,
    R: Send + 'static,
{
    docs.create(DocKind::Settings).await?;
    docs.modify(DocId::SETTINGS, Origin::Local, false, move |d| {
        Ok(Settings::open(&mut *d)
            .map_err(|e| policy::RuleError::Settings(e.into()))
            .and_then(|mut s| f(&mut s, now)))
    })
    .await?
    .map_err(PolicyEditError::from)
}

/// Why the policy could not be changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyEditError {
    /// The settings document could not be loaded or stored.
    #[error(transparent)]
    Docs(#[from] DocsError),
    /// The rule or timeout is not valid.
    #[error(transparent)]
    Rule(#[from] policy::RuleError),
}

/// An approval found on this device, with its conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Found {
    /// The conversation.
    pub conversation: String,
    /// The approval.
    #[serde(flatten)]
    pub approval: ApprovalView,
    /// Its state as seen now (a pending one past its expiry reads `expired`).
    pub effective_state: State,
}

/// Approvals in the conversations on this device, newest first: pending ones only unless
/// `all`; conversations changed in the last [`RECENT_SECS`] unless `all`.
pub async fn list(docs: &Docs, now: i64, all: bool) -> Result<Vec<Found>, DocsError> {
    let since = (now.max(0) as u64).saturating_sub(RECENT_SECS);
    let mut out = Vec::new();
    for (id, updated) in super::conversations::newest_first(docs)? {
        if !all && updated < since {
            break;
        }
        let found = docs
            .read(id, |d| {
                DocApprovals::open(d).map(|a| a.list()).unwrap_or_default()
            })
            .await?;
        out.extend(found.into_iter().filter_map(|a| {
            let effective_state = a.state_at(now);
            (all || effective_state == State::Pending).then(|| Found {
                conversation: id.to_string(),
                approval: a,
                effective_state,
            })
        }));
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.approval.created_at));
    Ok(out)
}

/// Why an answer was not recorded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnswerError {
    /// No such approval here.
    #[error("no approval {0:?} on this device (see `iom approvals`)")]
    NotFound(String),
    /// This device may not answer.
    #[error(
        "this device is not an admin device: only admin devices may answer approvals (see \
         `iom devices`)"
    )]
    NotAdmin,
    /// It was decided (or expired) already.
    #[error("approval {id} is already {state}")]
    Decided {
        /// The approval.
        id: String,
        /// Its state.
        state: &'static str,
    },
    /// The reason is too long.
    #[error("the reason is at most 1000 characters")]
    ReasonTooLong,
    /// The store failed.
    #[error(transparent)]
    Docs(#[from] DocsError),
    /// The document refused the answer.
    #[error(transparent)]
    Edit(#[from] EditApprovalError),
}

/// Answers approval `id` from this device: checks that this device is an admin, signs the
/// answer over the exact call with the device key and writes it into the conversation (the
/// agent reads it there, locally or after sync).
pub async fn answer(
    docs: &Docs,
    identity: &SharedIdentity,
    trust: &TrustBook,
    now: i64,
    id: &str,
    decision: Decision,
    reason: Option<String>,
) -> Result<Found, AnswerError> {
    if reason.as_ref().is_some_and(|r| r.chars().count() > 1000) {
        return Err(AnswerError::ReasonTooLong);
    }
    let me = identity.device_id();
    if !trust.state().is_admin(&me) {
        return Err(AnswerError::NotAdmin);
    }
    // Pending approvals are in recently changed conversations (the timeout is at most a day);
    // only an id not found there is looked for everywhere, for a precise error.
    let mut found = list(docs, now, false)
        .await?
        .into_iter()
        .find(|f| f.approval.id == id);
    if found.is_none() {
        found = list(docs, now, true)
            .await?
            .into_iter()
            .find(|f| f.approval.id == id);
    }
    let found = found.ok_or_else(|| AnswerError::NotFound(id.to_string()))?;
    if found.effective_state != State::Pending {
        return Err(AnswerError::Decided {
            id: id.to_string(),
            state: found.effective_state.name(),
        });
    }
    let doc: DocId = found
        .conversation
        .parse()
        .map_err(|_| AnswerError::NotFound(id.to_string()))?;
    let payload = policy::answer_payload(doc, id, &found.approval.digest(), decision, now);
    let signature = hex::encode(identity.read().device.sign(&payload));
    let a = AnswerView {
        device: me.to_string(),
        decision,
        reason,
        at: now,
        signature,
    };
    let id2 = id.to_string();
    let written = a.clone();
    edit(docs, doc, now, move |ap, now| {
        ap.answer(&id2, &written, now)
    })
    .await?;
    let mut found = found;
    found.approval.answers.retain(|x| x.device != a.device);
    found.approval.answers.push(a);
    Ok(found)
}

/// Why a guarded run ended without an outcome.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The model call failed.
    #[error(transparent)]
    Model(#[from] ClaudeError),
    /// A call was denied or expired.
    #[error("{0}")]
    Halted(String),
}

/// The runner's tool executor: every call passes the [`Gate`] first. Build one per run;
/// [`Gated::guard`] ends the run when a call is denied.
pub struct Gated<'a, E> {
    gate: &'a Gate,
    inner: E,
    doc: DocId,
    rid: String,
    agent: String,
    halt: Mutex<Option<String>>,
    halted: Notify,
}

impl<'a, E: ToolExecutor> Gated<'a, E> {
    /// Gates `inner` for request `rid` of `doc`, run by agent device `agent`.
    pub fn new(gate: &'a Gate, inner: E, doc: DocId, rid: &str, agent: &str) -> Self {
        Gated {
            gate,
            inner,
            doc,
            rid: rid.to_string(),
            agent: agent.to_string(),
            halt: Mutex::new(None),
            halted: Notify::new(),
        }
    }

    /// Runs `run` (the model's tool-use loop over this executor) until it ends, or until a
    /// call is denied or expires: then the run is dropped and the reason returned.
    pub async fn guard<T>(
        &self,
        run: impl Future<Output = Result<T, ClaudeError>>,
    ) -> Result<T, RunError> {
        let halted = async {
            loop {
                let notified = self.halted.notified();
                if let Some(r) = self.halt.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                    return r;
                }
                notified.await;
            }
        };
        tokio::select! {
            r = run => r.map_err(RunError::from),
            why = halted => Err(RunError::Halted(why)),
        }
    }
}

impl<E: ToolExecutor> ToolExecutor for Gated<'_, E> {
    fn run<'a>(&'a self, name: &'a str, input: &'a Value) -> BoxFuture<'a, ToolResult> {
        Box::pin(async move {
            match self
                .gate
                .check(self.doc, &self.rid, &self.agent, name, input)
                .await
            {
                GateOutcome::Run => self.inner.run(name, input).await,
                GateOutcome::Refuse(why) => ToolResult::error(why),
                GateOutcome::Halt(why) => {
                    *self.halt.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                    self.halted.notify_waiters();
                    // The guard drops this run now.
                    std::future::pending().await
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
