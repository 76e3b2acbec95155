//! Approvals of risky tool calls: the mesh's policy (in the settings document) and the
//! approval requests (in the conversation document of the run that asked).
//!
//! **Policy** (settings keys, one per rule, so devices adding different rules at the same time
//! merge):
//!
//! | key | value |
//! |---|---|
//! | `approvals.rule.TOOL` or `approvals.rule.TOOL ARGS` | a [`Rule`] as a JSON object |
//! | `approvals.timeout_secs` | seconds an approval waits for an answer (default 600) |
//!
//! A rule's `tool` is a glob (`*`, `?`): `bash`, `mcp__git__*`, `*`. Its optional `args` is a
//! glob matched against every string value of the call's arguments and against the arguments
//! as compact JSON. Of the rules that match a call, the most specific decides (a rule with
//! `args` before one without, an exact tool name before a glob, a longer glob before a shorter
//! one); among equally specific rules the strictest (`deny`, then `ask`, then `allow`). No
//! rule: `allow`.
//!
//! **Approval requests** live under the conversation's root field `approvals`, a map from the
//! approval id to a map:
//!
//! | field | type | notes |
//! |---|---|---|
//! | `request_id` | str | the request whose run asked |
//! | `tool`, `input` | str | the exact call (`input` as JSON text) |
//! | `touches` | list of str | what the call will touch, in words |
//! | `rule` | str? | the policy key that asked |
//! | `asked_by` | str | the agent device |
//! | `created_at`, `expires_at` | int | unix seconds |
//! | `state` | str | `pending`, `approved`, `denied`, `expired`: written by the agent only |
//! | `decided_by`, `reason`, `decided_at` | | the decision |
//! | `answers` | map | device id → `{decision, reason?, at, signature}` |
//!
//! Answers are written by the answering device under its own key, so answers from two devices
//! merge. Each is signed by that device's key over [`answer_payload`], which binds the
//! conversation, the approval id, the [`call_digest`] of the exact call shown, the decision and
//! the time. The agent accepts only answers whose signature verifies and whose device is an
//! admin; any accepted `deny` wins over an `approve`.

use std::borrow::{Borrow, BorrowMut};
use std::fmt;

use automerge::transaction::Transactable;
use automerge::{AutomergeError, ObjId, ObjType, ROOT, ReadDoc};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::DocId;
use crate::conversation::ConversationError;
use crate::document::{Document, DocumentError};
use crate::fields::{self, MapFields};
use crate::kind::DocKind;
use crate::settings::{Settings, SettingsError};

/// Settings key prefix of a policy rule.
pub const RULE_PREFIX: &str = "approvals.rule.";
/// Settings key of the approval timeout in seconds.
pub const KEY_TIMEOUT: &str = "approvals.timeout_secs";
/// How long an approval waits when no timeout is set: 10 minutes.
pub const DEFAULT_TIMEOUT_SECS: u64 = 600;
/// Root field of a conversation: the approval requests.
pub const FIELD_APPROVALS: &str = "approvals";
/// Longest tool glob or argument glob of a rule.
pub const MAX_PATTERN: usize = 256;

/// What the policy says about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Run it.
    Allow,
    /// Pause the run and ask an admin device.
    Ask,
    /// Never run it (the model is told so).
    Deny,
}

impl Action {
    /// The name used in settings and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Ask => "ask",
            Action::Deny => "deny",
        }
    }

    /// Parses `allow`, `ask` or `deny`.
    pub fn parse(s: &str) -> Option<Action> {
        [Action::Allow, Action::Ask, Action::Deny]
            .into_iter()
            .find(|a| a.name() == s)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One policy rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Tool name glob: `bash`, `mcp__git__*`, `*`.
    pub tool: String,
    /// Argument glob (see the module docs); absent: any arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<String>,
    /// What to do with a matching call.
    pub action: Action,
}

/// A rule that cannot be stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// The tool glob is empty, too long or has control characters.
    #[error("the tool pattern must be 1 to {MAX_PATTERN} printable characters")]
    BadTool,
    /// The argument glob is empty, too long or has control characters.
    #[error("the argument pattern must be 1 to {MAX_PATTERN} printable characters")]
    BadArgs,
    /// The timeout is zero or more than a day.
    #[error("the approval timeout must be 1 to 86400 seconds")]
    BadTimeout,
    /// The settings document refused the change.
    #[error(transparent)]
    Settings(#[from] SettingsError),
}

impl Rule {
    /// The settings key of this rule (setting a rule with the same tool and args replaces it).
    pub fn key(&self) -> String {
        rule_key(&self.tool, self.args.as_deref())
    }

    /// Checks the patterns.
    pub fn check(&self) -> Result<(), RuleError> {
        if !pattern_ok(&self.tool) {
            return Err(RuleError::BadTool);
        }
        if self.args.as_deref().is_some_and(|a| !pattern_ok(a)) {
            return Err(RuleError::BadArgs);
        }
        Ok(())
    }

    /// Whether the rule matches a call.
    pub fn matches(&self, tool: &str, input: &Json) -> bool {
        glob(&self.tool, tool) && self.args.as_deref().is_none_or(|p| args_match(p, input))
    }

    /// Higher is more specific.
    fn specificity(&self) -> (bool, bool, usize) {
        let exact = !self.tool.contains(['*', '?']);
        (self.args.is_some(), exact, self.tool.len())
    }
}

/// The settings key of the rule for `tool` (and `args`).
pub fn rule_key(tool: &str, args: Option<&str>) -> String {
    match args {
        Some(a) => format!("{RULE_PREFIX}{tool} {a}"),
        None => format!("{RULE_PREFIX}{tool}"),
    }
}

fn pattern_ok(p: &str) -> bool {
    !p.is_empty() && p.len() <= MAX_PATTERN && !p.chars().any(char::is_control)
}

/// The policy's answer for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// What to do.
    pub action: Action,
    /// The key of the rule that decided; `None`: no rule matched (allowed).
    pub rule: Option<String>,
}

/// The mesh's approval policy, as read from the settings document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Rules by settings key, sorted by key. Entries that do not parse are left out.
    pub rules: Vec<(String, Rule)>,
    /// Seconds an approval waits.
    pub timeout_secs: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            rules: Vec::new(),
            timeout_secs: DEFAULT_TIMEOUT_SECS,
        }
    }
}

impl Policy {
    /// The policy in a settings document.
    pub fn read<D: Borrow<Document>>(settings: &Settings<D>) -> Policy {
        let all = settings.list();
        let rules = all
            .iter()
            .filter(|(k, _)| k.starts_with(RULE_PREFIX))
            .filter_map(|(k, v)| {
                let r: Rule = serde_json::from_value(v.clone()).ok()?;
                r.check().ok()?;
                Some((k.clone(), r))
            })
            .collect();
        let timeout_secs = all
            .get(KEY_TIMEOUT)
            .and_then(Json::as_u64)
            .filter(|t| (1..=86_400).contains(t))
            .unwrap_or(DEFAULT_TIMEOUT_SECS);
        Policy {
            rules,
            timeout_secs,
        }
    }

    /// What to do with a call of `tool` with `input`.
    pub fn decide(&self, tool: &str, input: &Json) -> Verdict {
        self.rules
            .iter()
            .filter(|(_, r)| r.matches(tool, input))
            .max_by_key(|(_, r)| (r.specificity(), r.action))
            .map(|(k, r)| Verdict {
                action: r.action,
                rule: Some(k.clone()),
            })
            .unwrap_or(Verdict {
                action: Action::Allow,
                rule: None,
            })
    }
}

/// Stores a rule (replacing one with the same tool and args).
pub fn set_rule<D: BorrowMut<Document>>(
    settings: &mut Settings<D>,
    rule: &Rule,
    now: i64,
) -> Result<String, RuleError> {
    rule.check()?;
    let key = rule.key();
    let value = serde_json::to_value(rule).unwrap_or(Json::Null);
    settings.set(&key, &value, now)?;
    Ok(key)
}

/// Sets the approval timeout.
pub fn set_timeout<D: BorrowMut<Document>>(
    settings: &mut Settings<D>,
    secs: u64,
    now: i64,
) -> Result<(), RuleError> {
    if !(1..=86_400).contains(&secs) {
        return Err(RuleError::BadTimeout);
    }
    settings.set(KEY_TIMEOUT, &Json::from(secs), now)?;
    Ok(())
}

/// `*` matches any run of characters, `?` one character; everything else itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matching with backtracking to the last `*` (linear in practice, no recursion).
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

fn args_match(pattern: &str, input: &Json) -> bool {
    fn strings<'a>(v: &'a Json, out: &mut Vec<&'a str>) {
        match v {
            Json::String(s) => out.push(s),
            Json::Array(a) => a.iter().for_each(|v| strings(v, out)),
            Json::Object(o) => o.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    strings(input, &mut all);
    all.iter().any(|s| glob(pattern, s)) || glob(pattern, &input.to_string())
}

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for an answer.
    Pending,
    /// An admin device said yes: the call ran.
    Approved,
    /// An admin device said no: the call did not run and the run failed.
    Denied,
    /// Nobody answered in time: treated as denied.
    Expired,
}

impl State {
    /// The name stored in the document.
    pub const fn name(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Denied => "denied",
            State::Expired => "expired",
        }
    }

    fn parse(s: &str) -> Option<State> {
        [
            State::Pending,
            State::Approved,
            State::Denied,
            State::Expired,
        ]
        .into_iter()
        .find(|x| x.name() == s)
    }
}

/// An answering device's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Run the call.
    Approve,
    /// Do not.
    Deny,
}

impl Decision {
    /// The name stored in the document and signed.
    pub const fn name(self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Deny => "deny",
        }
    }

    fn parse(s: &str) -> Option<Decision> {
        match s {
            "approve" => Some(Decision::Approve),
            "deny" => Some(Decision::Deny),
            _ => None,
        }
    }
}

/// One device's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerView {
    /// The answering device (its id).
    pub device: String,
    /// Yes or no.
    pub decision: Decision,
    /// Why (for a denial, shown to the asker).
    pub reason: Option<String>,
    /// Unix seconds.
    pub at: i64,
    /// The device's ed25519 signature over [`answer_payload`], hex.
    pub signature: String,
}

/// A new approval request ([`Approvals::open_request`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApproval<'a> {
    /// Approval id.
    pub id: &'a str,
    /// The request whose run asks.
    pub request_id: &'a str,
    /// Tool name.
    pub tool: &'a str,
    /// Arguments, as JSON text.
    pub input: &'a str,
    /// What the call will touch.
    pub touches: &'a [String],
    /// The rule that asked.
    pub rule: Option<&'a str>,
    /// The agent device.
    pub asked_by: &'a str,
    /// Unix seconds when it expires.
    pub expires_at: i64,
}

/// An approval request, as read from the document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalView {
    /// Approval id.
    pub id: String,
    /// The request whose run asked.
    pub request_id: String,
    /// Tool name.
    pub tool: String,
    /// Arguments, as JSON text.
    pub input: String,
    /// What the call will touch.
    pub touches: Vec<String>,
    /// The rule that asked.
    pub rule: Option<String>,
    /// The agent device.
    pub asked_by: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Where it stands (as the agent wrote it).
    pub state: State,
    /// Who decided (a device id; absent for an expiry).
    pub decided_by: Option<String>,
    /// Why (a denial's reason, or the expiry).
    pub reason: Option<String>,
    /// Unix seconds.
    pub decided_at: Option<i64>,
    /// Answers written so far, by device.
    pub answers: Vec<AnswerView>,
}

impl ApprovalView {
    /// The digest of the exact call, as signed by answers.
    pub fn digest(&self) -> [u8; 32] {
        call_digest(&self.tool, &self.input, &self.touches)
    }

    /// The state as a reader should see it at `now`: a pending approval past its expiry (its
    /// agent stopped waiting) reads as expired.
    pub fn state_at(&self, now: i64) -> State {
        if self.state == State::Pending && now >= self.expires_at {
            State::Expired
        } else {
            self.state
        }
    }
}

/// SHA-256 of the exact call: tool, arguments and what it touches, each length-prefixed.
pub fn call_digest(tool: &str, input: &str, touches: &[String]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [tool, input]
        .into_iter()
        .chain(touches.iter().map(String::as_str))
    {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

/// The bytes an answering device signs.
pub fn answer_payload(
    conversation: DocId,
    approval: &str,
    digest: &[u8; 32],
    decision: Decision,
    at: i64,
) -> Vec<u8> {
    let mut out = b"iom-approval-answer-v1\0".to_vec();
    out.extend_from_slice(conversation.as_bytes());
    out.extend_from_slice(&(approval.len() as u64).to_be_bytes());
    out.extend_from_slice(approval.as_bytes());
    out.extend_from_slice(digest);
    out.extend_from_slice(decision.name().as_bytes());
    out.extend_from_slice(&at.to_be_bytes());
    out
}

/// Why an approval could not be changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApprovalError {
    /// No approval with this id in the conversation.
    #[error("no approval {0:?} in this conversation")]
    NotFound(String),
    /// The approval was already decided.
    #[error("approval {id:?} is already {state}")]
    Decided {
        /// The approval.
        id: String,
        /// Its state.
        state: &'static str,
    },
    /// An approval with this id exists.
    #[error("approval {0:?} exists already")]
    Exists(String),
    /// The document is not a conversation.
    #[error(transparent)]
    Document(#[from] DocumentError),
    /// An Automerge operation failed.
    #[error("automerge: {0}")]
    Automerge(Box<AutomergeError>),
}

impl From<AutomergeError> for ApprovalError {
    fn from(e: AutomergeError) -> Self {
        ApprovalError::Automerge(Box::new(e))
    }
}

impl From<ApprovalError> for ConversationError {
    fn from(e: ApprovalError) -> Self {
        match e {
            ApprovalError::Document(d) => ConversationError::Document(d),
            ApprovalError::Automerge(a) => ConversationError::Automerge(a),
            other => ConversationError::Document(DocumentError::Schema(other.to_string())),
        }
    }
}

/// The approvals of a conversation document. Wraps `&Document` (read) or `&mut Document`.
#[derive(Debug)]
pub struct Approvals<D>(D);

impl<D: Borrow<Document>> Approvals<D> {
    /// Wraps a document, checking that it is a conversation.
    pub fn open(doc: D) -> Result<Self, DocumentError> {
        doc.borrow().expect_kind(DocKind::Conversation)?;
        Ok(Approvals(doc))
    }

    /// Every readable approval, oldest first.
    pub fn list(&self) -> Vec<ApprovalView> {
        let doc = self.0.borrow().automerge();
        let Some(map) = fields::object(doc, &ROOT, FIELD_APPROVALS, ObjType::Map) else {
            return Vec::new();
        };
        let mut out: Vec<ApprovalView> = doc
            .keys(&map)
            .filter_map(|id| {
                let obj = fields::object(doc, &map, &id, ObjType::Map)?;
                read(doc, &obj, &id)
            })
            .collect();
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        out
    }

    /// One approval.
    pub fn get(&self, id: &str) -> Option<ApprovalView> {
        let doc = self.0.borrow().automerge();
        let map = fields::object(doc, &ROOT, FIELD_APPROVALS, ObjType::Map)?;
        let obj = fields::object(doc, &map, id, ObjType::Map)?;
        read(doc, &obj, id)
    }

    /// The approvals asked by the run of `request_id`.
    pub fn of_request(&self, request_id: &str) -> Vec<ApprovalView> {
        self.list()
            .into_iter()
            .filter(|a| a.request_id == request_id)
            .collect()
    }

    fn entry(&self, id: &str) -> Result<ObjId, ApprovalError> {
        let doc = self.0.borrow().automerge();
        fields::object(doc, &ROOT, FIELD_APPROVALS, ObjType::Map)
            .and_then(|m| fields::object(doc, &m, id, ObjType::Map))
            .ok_or_else(|| ApprovalError::NotFound(id.to_owned()))
    }
}

impl<D: BorrowMut<Document>> Approvals<D> {
    /// Records a new pending approval request.
    pub fn open_request(&mut self, a: &NewApproval<'_>, now: i64) -> Result<(), ApprovalError> {
        if self.get(a.id).is_some() {
            return Err(ApprovalError::Exists(a.id.to_owned()));
        }
        let message = format!("approval {} for {}", a.id, a.tool);
        self.0.borrow_mut().change(&message, now, |tx| {
            let map = match fields::object(tx, &ROOT, FIELD_APPROVALS, ObjType::Map) {
                Some(m) => m,
                None => tx.put_object(ROOT, FIELD_APPROVALS, ObjType::Map)?,
            };
            let e = tx.put_object(&map, a.id, ObjType::Map)?;
            tx.put(&e, "request_id", a.request_id)?;
            tx.put(&e, "tool", a.tool)?;
            tx.put(&e, "input", a.input)?;
            let list = tx.put_object(&e, "touches", ObjType::List)?;
            for (i, t) in a.touches.iter().enumerate() {
                tx.insert(&list, i, t.as_str())?;
            }
            if let Some(r) = a.rule {
                tx.put(&e, "rule", r)?;
            }
            tx.put(&e, "asked_by", a.asked_by)?;
            tx.put(&e, "created_at", now)?;
            tx.put(&e, "expires_at", a.expires_at)?;
            tx.put(&e, "state", State::Pending.name())?;
            tx.put_object(&e, "answers", ObjType::Map)?;
            Ok::<_, ApprovalError>(())
        })
    }

    /// Writes a device's (signed) answer. Refused once the approval is decided.
    pub fn answer(&mut self, id: &str, a: &AnswerView, now: i64) -> Result<(), ApprovalError> {
        let current = self
            .get(id)
            .ok_or_else(|| ApprovalError::NotFound(id.to_owned()))?;
        if current.state != State::Pending {
            return Err(ApprovalError::Decided {
                id: id.to_owned(),
                state: current.state.name(),
            });
        }
        let entry = self.entry(id)?;
        let message = format!("approval {id}: {}", a.decision.name());
        self.0.borrow_mut().change(&message, now, |tx| {
            let answers = match fields::object(tx, &entry, "answers", ObjType::Map) {
                Some(m) => m,
                None => tx.put_object(&entry, "answers", ObjType::Map)?,
            };
            let o = tx.put_object(&answers, a.device.as_str(), ObjType::Map)?;
            tx.put(&o, "decision", a.decision.name())?;
            if let Some(r) = &a.reason {
                tx.put(&o, "reason", r.as_str())?;
            }
            tx.put(&o, "at", a.at)?;
            tx.put(&o, "signature", a.signature.as_str())?;
            Ok::<_, ApprovalError>(())
        })
    }

    /// Records the decision (the agent does this, once).
    pub fn decide(
        &mut self,
        id: &str,
        state: State,
        decided_by: Option<&str>,
        reason: Option<&str>,
        now: i64,
    ) -> Result<(), ApprovalError> {
        let entry = self.entry(id)?;
        let message = format!("approval {id} {}", state.name());
        self.0.borrow_mut().change(&message, now, |tx| {
            tx.put(&entry, "state", state.name())?;
            if let Some(d) = decided_by {
                tx.put(&entry, "decided_by", d)?;
            }
            if let Some(r) = reason {
                tx.put(&entry, "reason", r)?;
            }
            tx.put(&entry, "decided_at", now)?;
            Ok::<_, ApprovalError>(())
        })
    }
}

fn read<R: ReadDoc>(doc: &R, obj: &ObjId, id: &str) -> Option<ApprovalView> {
    let f = MapFields::read(doc, obj);
    let touches = f
        .object("touches", ObjType::List)
        .map(|l| {
            (0..doc.length(&l))
                .filter_map(|i| match doc.get(&l, i).ok()?? {
                    (automerge::Value::Scalar(s), _) => s.as_str().map(str::to_owned),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let answers = f
        .object("answers", ObjType::Map)
        .map(|m| {
            doc.keys(&m)
                .filter_map(|device| {
                    let o = fields::object(doc, &m, &device, ObjType::Map)?;
                    let a = MapFields::read(doc, &o);
                    Some(AnswerView {
                        decision: Decision::parse(&a.string(doc, "decision")?)?,
                        reason: a.string(doc, "reason"),
                        at: a.int("at")?,
                        signature: a.string(doc, "signature")?,
                        device,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(ApprovalView {
        id: id.to_owned(),
        request_id: f.string(doc, "request_id")?,
        tool: f.string(doc, "tool")?,
        input: f.string(doc, "input").unwrap_or_default(),
        touches,
        rule: f.string(doc, "rule"),
        asked_by: f.string(doc, "asked_by").unwrap_or_default(),
        created_at: f.int("created_at").unwrap_or(0),
        expires_at: f.int("expires_at").unwrap_or(0),
        state: State::parse(&f.string(doc, "state")?)?,
        decided_by: f.string(doc, "decided_by"),
        reason: f.string(doc, "reason"),
        decided_at: f.int("decided_at"),
        answers,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::actor::actor_for;

    fn rule(tool: &str, args: Option<&str>, action: Action) -> (String, Rule) {
        let r = Rule {
            tool: tool.into(),
            args: args.map(Into::into),
            action,
        };
        (r.key(), r)
    }

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob("bash", "bash"));
        assert!(!glob("bash", "bash2"));
        assert!(glob("mcp__git__*", "mcp__git__status"));
        assert!(!glob("mcp__git__*", "mcp__time__now"));
        assert!(glob("*", ""));
        assert!(glob("a?c", "abc"));
        assert!(glob("*rm -rf*", "cd / && rm -rf tmp"));
        assert!(!glob("*rm -rf*", "rm -r"));
        assert!(glob("**a**", "xxaxx"));
    }

    #[test]
    fn the_most_specific_then_strictest_rule_decides() {
        let policy = Policy {
            rules: vec![
                rule("*", None, Action::Allow),
                rule("bash", None, Action::Ask),
                rule("bash", Some("*rm *"), Action::Deny),
                rule("mcp__git__*", None, Action::Ask),
                rule("mcp__git__status", None, Action::Allow),
            ],
            timeout_secs: 5,
        };
        let d = |t: &str, i: Json| policy.decide(t, &i).action;
        assert_eq!(d("bash", json!({"command": "ls"})), Action::Ask);
        assert_eq!(d("bash", json!({"command": "rm x"})), Action::Deny);
        assert_eq!(d("read_file", json!({"path": "a"})), Action::Allow);
        assert_eq!(d("mcp__git__commit", json!({})), Action::Ask);
        assert_eq!(d("mcp__git__status", json!({})), Action::Allow);
        let v = policy.decide("bash", &json!({"command": "rm x"}));
        assert_eq!(v.rule.as_deref(), Some("approvals.rule.bash *rm *"));
        // Equally specific: the strictest wins.
        let tie = Policy {
            rules: vec![
                rule("b*", None, Action::Allow),
                rule("a*", None, Action::Ask),
            ],
            timeout_secs: 5,
        };
        assert_eq!(tie.decide("x", &json!({})).action, Action::Allow);
        assert_eq!(Policy::default().decide("bash", &json!({})).rule, None);
        // Arguments match any string value, nested, or the JSON text.
        let r = rule("*", Some("secret*"), Action::Deny).1;
        assert!(r.matches("t", &json!({"a": [{"b": "secret.txt"}]})));
        assert!(!r.matches("t", &json!({"n": 1, "secret_key": 2})));
        assert!(
            rule("*", Some("*\"n\":1*"), Action::Deny)
                .1
                .matches("t", &json!({"n": 1}))
        );
    }

    #[test]
    fn policy_round_trips_through_settings() {
        let mut d = Document::new(DocKind::Settings, &actor_for(&[1; 32], [1; 8]), 1).expect("new");
        let mut s = Settings::open(&mut d).expect("open");
        assert_eq!(Policy::read(&s), Policy::default());
        let (_, r) = rule("bash", Some("*curl*"), Action::Ask);
        let key = set_rule(&mut s, &r, 2).expect("set");
        set_timeout(&mut s, 30, 2).expect("timeout");
        assert!(set_timeout(&mut s, 0, 2).is_err());
        assert!(set_rule(&mut s, &rule("", None, Action::Ask).1, 2).is_err());
        s.set(
            "approvals.rule.junk",
            &json!({"tool": "x", "action": "maybe"}),
            3,
        )
        .expect("junk");
        let p = Policy::read(&s);
        assert_eq!(p.rules, vec![(key, r)]);
        assert_eq!(p.timeout_secs, 30);
    }

    #[test]
    fn approvals_are_requested_answered_and_decided() {
        let mut d =
            Document::new(DocKind::Conversation, &actor_for(&[2; 32], [1; 8]), 1).expect("new");
        let mut a = Approvals::open(&mut d).expect("open");
        let touches = vec!["the memory document".to_string()];
        let new = NewApproval {
            id: "ap1",
            request_id: "r1",
            tool: "memory_update",
            input: r#"{"text":"x"}"#,
            touches: &touches,
            rule: Some("approvals.rule.memory_update"),
            asked_by: "agent",
            expires_at: 70,
        };
        a.open_request(&new, 10).expect("open");
        assert!(matches!(
            a.open_request(&new, 10),
            Err(ApprovalError::Exists(_))
        ));
        let answer = AnswerView {
            device: "laptop".into(),
            decision: Decision::Deny,
            reason: Some("no".into()),
            at: 11,
            signature: "00".into(),
        };
        a.answer("ap1", &answer, 11).expect("answer");
        let v = a.get("ap1").expect("get");
        assert_eq!(v.state, State::Pending);
        assert_eq!(v.answers, vec![answer.clone()]);
        assert_eq!(v.state_at(69), State::Pending);
        assert_eq!(v.state_at(70), State::Expired);
        assert_eq!(
            v.digest(),
            call_digest("memory_update", r#"{"text":"x"}"#, &touches)
        );
        a.decide("ap1", State::Denied, Some("laptop"), Some("no"), 12)
            .expect("decide");
        assert!(matches!(
            a.answer("ap1", &answer, 13),
            Err(ApprovalError::Decided { .. })
        ));
        assert_eq!(a.of_request("r1").len(), 1);
        assert!(a.of_request("r2").is_empty());
        assert!(a.get("nope").is_none());
        // The payload binds every part.
        let c = DocId::from_bytes([1; 16]);
        let p = answer_payload(c, "ap1", &v.digest(), Decision::Approve, 5);
        assert_ne!(p, answer_payload(c, "ap1", &v.digest(), Decision::Deny, 5));
        assert_ne!(
            p,
            answer_payload(c, "ap2", &v.digest(), Decision::Approve, 5)
        );
        assert_ne!(p, answer_payload(c, "ap1", &[0; 32], Decision::Approve, 5));
    }
}
