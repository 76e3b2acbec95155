//! The conversation document: requests to the agent, its replies and token usage.
//!
//! Layout (root): `title` (str), `messages` (list of maps), `usage` (map of counters
//! `input_tokens`, `output_tokens`, `cache_creation_input_tokens`, `cache_read_input_tokens`,
//! `cost_nanos`), `summaries` (list of maps, see [`SummaryView`]: what the model was given in
//! place of older turns once the conversation outgrew its window). A message map:
//!
//! | field | type | notes |
//! |---|---|---|
//! | `id` | str | a request's id is its `request_id`; a reply's is `REQUEST/replyN` |
//! | `role` | str | `user` or `assistant` |
//! | `text` | str | |
//! | `status` | str | requests only: `pending`, `running`, `done`, `failed` |
//! | `error` | str? | reason of a failure |
//! | `interface` | str | requests only: `cli`, `web`, `webhook`, `schedule`, `email` |
//! | `device` | str | device that wrote the message |
//! | `created_at` | int | unix seconds |
//! | `request_id` | str | requests only; the dedup key |
//! | `claimed_by` | map? | `{device, epoch}` of the agent running the request |
//! | `reply_to` | str? | replies only: the request id |
//! | `tool_calls` | list | replies only: `{id, name, input (JSON string), output, is_error}` |
//! | `usage` | map | replies only: `{input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens, cost_nanos}` (cost in 10⁻⁹ USD) |
//! | `progress` | map? | requests only: what a running request has streamed so far, appended to (see [`crate::progress`]; older builds wrote a JSON string) |
//! | `attachments` | list? | requests only: `{name, hash (blob SHA-256, hex), len}` of attached files |
//! | `model` | str? | a request: the model asked for (`NAME` or `NAME/MODEL`); a reply: the `provider/model` that produced it |
//!
//! **Claiming** is fenced by the agent-role epoch: a request is claimed only when it is pending,
//! or running under a claim with a strictly lower epoch (a demoted or restarted agent). Two
//! agents that claim concurrently on different devices both write `claimed_by`; Automerge keeps
//! one. After a sync the agent must re-read [`MessageView::claimed_by`] and only run the request
//! if the claim is still its own.

use std::borrow::{Borrow, BorrowMut};
use std::fmt;
use std::str::FromStr;

use automerge::transaction::{Transactable, Transaction};
use automerge::{AutomergeError, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use serde::{Deserialize, Serialize};

use crate::document::{Document, DocumentError};
use crate::fields::{self, MapFields};
use crate::kind::DocKind;
use crate::progress::{self, ProgressUpdate, ProgressView};

/// Root field: the conversation title.
pub const FIELD_TITLE: &str = "title";
/// Root field: the list of messages.
pub const FIELD_MESSAGES: &str = "messages";
/// Root field: token usage totals (counters).
pub const FIELD_USAGE: &str = "usage";

const INPUT_TOKENS: &str = "input_tokens";
const OUTPUT_TOKENS: &str = "output_tokens";
const CACHE_CREATION: &str = "cache_creation_input_tokens";
const CACHE_READ: &str = "cache_read_input_tokens";
const COST_NANOS: &str = "cost_nanos";
/// Root field: the summaries of older turns (a list of maps).
pub const FIELD_SUMMARIES: &str = "summaries";

/// Errors of conversation operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConversationError {
    /// No request with this id.
    #[error("no request {0:?} in this conversation")]
    RequestNotFound(String),
    /// The document is not a conversation or does not match the schema.
    #[error(transparent)]
    Document(#[from] DocumentError),
    /// An Automerge operation failed.
    #[error("automerge: {0}")]
    Automerge(Box<AutomergeError>),
}

impl From<AutomergeError> for ConversationError {
    fn from(e: AutomergeError) -> Self {
        ConversationError::Automerge(Box::new(e))
    }
}

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($(#[$vm])* $v),+ }

        impl $name {
            /// The name stored in the document.
            pub const fn name(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($s => Ok($name::$v),)+
                    _ => Err(UnknownValue(s.to_owned())),
                }
            }
        }
    };
}

/// A string that is not one of the known names of an enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value {0:?}")]
pub struct UnknownValue(pub String);

string_enum! {
    /// Who wrote a message.
    Role { /// The person.
        User = "user", /// The agent.
        Assistant = "assistant" }
}

string_enum! {
    /// Where a request stands.
    Status {
        /// Waiting for the agent.
        Pending = "pending",
        /// Claimed and running on the agent.
        Running = "running",
        /// Answered.
        Done = "done",
        /// Gave up; see the `error` field.
        Failed = "failed",
    }
}

string_enum! {
    /// Which interface a request came from.
    Interface {
        /// The `iom` command line.
        Cli = "cli",
        /// The local web page.
        Web = "web",
        /// A webhook.
        Webhook = "webhook",
        /// The scheduler.
        Schedule = "schedule",
        /// The email channel.
        Email = "email",
    }
}

/// Which agent runs a request: the device and its agent-role epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimView {
    /// The agent device.
    pub device: String,
    /// The agent-role epoch under which it claimed.
    pub epoch: u64,
}

/// One tool call of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallView {
    /// Tool-use id from the model.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Input as a JSON string.
    pub input: String,
    /// Output text.
    pub output: String,
    /// Whether the tool failed.
    pub is_error: bool,
}

/// A file attached to a request: a blob the agent copies into its tool workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentView {
    /// File name (no directories).
    pub name: String,
    /// The blob's SHA-256, hex.
    pub hash: String,
    /// Size in bytes.
    pub len: u64,
}

/// Token counts and their cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageView {
    /// Input (prompt) tokens not read from or written to the prompt cache.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Input tokens written to the prompt cache.
    #[serde(default)]
    pub cache_creation_input_tokens: u64,
    /// Input tokens read from the prompt cache.
    #[serde(default)]
    pub cache_read_input_tokens: u64,
    /// What these tokens cost, in nano-dollars (10⁻⁹ USD); 0 for a model without a price.
    #[serde(default)]
    pub cost_nanos: u64,
}

impl UsageView {
    /// Plain input and output tokens, no cache figures, no cost.
    pub fn new(input_tokens: u64, output_tokens: u64) -> UsageView {
        UsageView {
            input_tokens,
            output_tokens,
            ..UsageView::default()
        }
    }

    /// Every token: input (plain, cache writes, cache reads) and output.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(self.cache_read_input_tokens)
    }

    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &UsageView) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cache_creation_input_tokens = self
            .cache_creation_input_tokens
            .saturating_add(other.cache_creation_input_tokens);
        self.cache_read_input_tokens = self
            .cache_read_input_tokens
            .saturating_add(other.cache_read_input_tokens);
        self.cost_nanos = self.cost_nanos.saturating_add(other.cost_nanos);
    }
}

/// A summary of older turns, written when the conversation outgrew the model's window: the
/// model is sent this summary in place of every turn up to and including request `through`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryView {
    /// Position in the `summaries` list.
    pub index: usize,
    /// The summary text.
    pub text: String,
    /// The last request it covers (its answer included).
    pub through: String,
    /// Requests it covers (earlier summaries' included).
    pub requests: u64,
    /// The model that wrote it.
    pub model: Option<String>,
    /// The agent device that wrote it.
    pub device: Option<String>,
    /// Unix seconds.
    pub created_at: Option<i64>,
    /// What writing it cost.
    pub usage: UsageView,
}

/// A new answer for [`Conversation::append_answer`].
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    /// The reply text.
    pub text: &'a str,
    /// Tool calls it made.
    pub tool_calls: &'a [ToolCallView],
    /// Its tokens and cost.
    pub usage: UsageView,
    /// The model that wrote it.
    pub model: Option<&'a str>,
}

/// A message, as read from the document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    /// Position in the `messages` list.
    pub index: usize,
    /// Message id.
    pub id: String,
    /// Author role.
    pub role: Role,
    /// Message text.
    pub text: String,
    /// Request status (requests only).
    pub status: Option<Status>,
    /// Failure reason.
    pub error: Option<String>,
    /// Interface of a request.
    pub interface: Option<Interface>,
    /// Writing device.
    pub device: Option<String>,
    /// Unix seconds.
    pub created_at: Option<i64>,
    /// Request id (requests only).
    pub request_id: Option<String>,
    /// Current claim (requests only).
    pub claimed_by: Option<ClaimView>,
    /// The request a reply answers.
    pub reply_to: Option<String>,
    /// Tool calls of a reply.
    pub tool_calls: Vec<ToolCallView>,
    /// Token usage of a reply.
    pub usage: Option<UsageView>,
    /// What the request has streamed so far (requests only). Shown by the local API as the
    /// JSON form inside a string.
    #[serde(with = "crate::progress::as_json_string")]
    pub progress: Option<ProgressView>,
    /// Files attached to a request.
    #[serde(default)]
    pub attachments: Vec<AttachmentView>,
    /// A request: the model asked for; a reply: the `provider/model` that produced it.
    #[serde(default)]
    pub model: Option<String>,
}

/// Result of [`Conversation::append_request`] / [`Conversation::append_assistant`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppendOutcome {
    /// Position in the `messages` list.
    pub index: usize,
    /// Message id.
    pub id: String,
    /// False if the request already existed (deduplicated) and nothing was written.
    pub created: bool,
}

/// Result of [`Conversation::claim`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum ClaimOutcome {
    /// The request was pending and is now running under our claim.
    Claimed,
    /// The request was running under a stale claim (lower epoch); it is now ours.
    TookOver {
        /// The stale claim, if it was readable.
        previous: Option<ClaimView>,
    },
    /// We already hold this exact claim; nothing was written.
    AlreadyOurs,
    /// Another claim with a higher or equal epoch holds it (or ours is stale); nothing written.
    Refused {
        /// The claim in force.
        claimed_by: Option<ClaimView>,
    },
    /// The request is finished (`done` or `failed`); nothing was written.
    Finished(Status),
}

/// Typed access to a conversation document. Wraps `&Document` (read) or `&mut Document`.
#[derive(Debug)]
pub struct Conversation<D>(D);

impl<D: Borrow<Document>> Conversation<D> {
    /// Wraps a document, checking that it is a conversation.
    pub fn open(doc: D) -> Result<Self, DocumentError> {
        doc.borrow().expect_kind(DocKind::Conversation)?;
        Ok(Conversation(doc))
    }

    /// The underlying document.
    pub fn document(&self) -> &Document {
        self.0.borrow()
    }

    /// The title (empty if unset).
    pub fn title(&self) -> String {
        fields::string(self.document().automerge(), &ROOT, FIELD_TITLE).unwrap_or_default()
    }

    /// Every readable message, in list order. Entries missing `id` or with an unknown `role`
    /// (from a newer build) are skipped here but kept in the document.
    pub fn messages(&self) -> Vec<MessageView> {
        let doc = self.document().automerge();
        let Some(list) = fields::object(doc, &ROOT, FIELD_MESSAGES, ObjType::List) else {
            return Vec::new();
        };
        fields::maps_in(doc, &list, ..)
            .into_iter()
            .filter_map(|(i, obj)| read_message(doc, &obj, i))
            .collect()
    }

    /// The user requests, in order.
    pub fn requests(&self) -> Vec<MessageView> {
        self.messages()
            .into_iter()
            .filter(|m| m.role == Role::User)
            .collect()
    }

    /// The request with this id.
    pub fn find_request(&self, request_id: &str) -> Option<MessageView> {
        let doc = self.document().automerge();
        let (obj, index) = find_request_obj(doc, request_id)?;
        read_message(doc, &obj, index)
    }

    /// Requests waiting for the agent.
    pub fn pending_requests(&self) -> Vec<MessageView> {
        self.requests()
            .into_iter()
            .filter(|m| m.status == Some(Status::Pending))
            .collect()
    }

    /// Requests running under a claim by `device` (e.g. to mark them interrupted on restart).
    pub fn running_claimed_by(&self, device: &str) -> Vec<MessageView> {
        self.requests()
            .into_iter()
            .filter(|m| {
                m.status == Some(Status::Running)
                    && m.claimed_by.as_ref().is_some_and(|c| c.device == device)
            })
            .collect()
    }

    /// The replies to a request, in order. Only the messages after the request are read: a
    /// reply is always inserted after its request, and list order keeps that in every merge.
    pub fn replies_to(&self, request_id: &str) -> Vec<MessageView> {
        let doc = self.document().automerge();
        let (Some(list), Some((_, at))) = (
            fields::object(doc, &ROOT, FIELD_MESSAGES, ObjType::List),
            find_request_obj(doc, request_id),
        ) else {
            return Vec::new();
        };
        fields::maps_in(doc, &list, at + 1..)
            .into_iter()
            .filter_map(|(i, obj)| {
                // One field decides; only replies are read whole.
                if fields::string(doc, &obj, "reply_to").as_deref() != Some(request_id) {
                    return None;
                }
                read_message(doc, &obj, i)
            })
            .filter(|m| m.role == Role::Assistant)
            .collect()
    }

    /// The summaries of older turns, oldest first.
    pub fn summaries(&self) -> Vec<SummaryView> {
        let doc = self.document().automerge();
        let Some(list) = fields::object(doc, &ROOT, FIELD_SUMMARIES, ObjType::List) else {
            return Vec::new();
        };
        fields::maps_in(doc, &list, ..)
            .into_iter()
            .filter_map(|(i, obj)| {
                let f = MapFields::read(doc, &obj);
                Some(SummaryView {
                    index: i,
                    text: f.string(doc, "text")?,
                    through: f.string(doc, "through")?,
                    requests: f.uint("requests").unwrap_or(0),
                    model: f.string(doc, "model"),
                    device: f.string(doc, "device"),
                    created_at: f.int("created_at"),
                    usage: f
                        .object("usage", ObjType::Map)
                        .map(|u| read_usage(doc, &u))
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// The newest summary whose `through` request is in this conversation.
    pub fn latest_summary(&self) -> Option<SummaryView> {
        let requests = self.requests();
        self.summaries()
            .into_iter()
            .filter_map(|s| {
                let at = requests
                    .iter()
                    .position(|r| r.request_id.as_deref() == Some(&s.through))?;
                Some((at, s))
            })
            .max_by_key(|(at, s)| (*at, s.index))
            .map(|(_, s)| s)
    }

    /// Conversation token totals.
    pub fn usage_totals(&self) -> UsageView {
        let doc = self.document().automerge();
        match fields::object(doc, &ROOT, FIELD_USAGE, ObjType::Map) {
            Some(u) => read_usage(doc, &u),
            None => UsageView::default(),
        }
    }
}

impl<D: BorrowMut<Document>> Conversation<D> {
    fn doc_mut(&mut self) -> &mut Document {
        self.0.borrow_mut()
    }

    /// Sets the title.
    pub fn set_title(&mut self, title: &str, now: i64) -> Result<(), ConversationError> {
        self.doc_mut().change("set title", now, |tx| {
            tx.put(ROOT, FIELD_TITLE, title)?;
            Ok(())
        })
    }

    /// Appends a pending user request. If a request with `request_id` exists already, returns
    /// it with `created: false` and writes nothing (requests are deduplicated by id).
    pub fn append_request(
        &mut self,
        request_id: &str,
        text: &str,
        interface: Interface,
        device: &str,
        now: i64,
    ) -> Result<AppendOutcome, ConversationError> {
        self.append_request_with(request_id, text, interface, device, &[], now)
    }

    /// [`Conversation::append_request`] with files attached (in the same change, so the agent
    /// never sees the request without them).
    pub fn append_request_with(
        &mut self,
        request_id: &str,
        text: &str,
        interface: Interface,
        device: &str,
        attachments: &[AttachmentView],
        now: i64,
    ) -> Result<AppendOutcome, ConversationError> {
        if let Some((_, index)) = find_request_obj(self.document().automerge(), request_id) {
            return Ok(AppendOutcome {
                index,
                id: request_id.to_owned(),
                created: false,
            });
        }
        let message = format!("request {request_id} via {interface}");
        self.doc_mut().change(&message, now, |tx| {
            let list = messages_list(tx)?;
            let index = tx.length(&list);
            let m = tx.insert_object(&list, index, ObjType::Map)?;
            tx.put(&m, "id", request_id)?;
            tx.put(&m, "role", Role::User.name())?;
            tx.put(&m, "text", text)?;
            tx.put(&m, "status", Status::Pending.name())?;
            tx.put(&m, "interface", interface.name())?;
            tx.put(&m, "device", device)?;
            tx.put(&m, "created_at", now)?;
            tx.put(&m, "request_id", request_id)?;
            if !attachments.is_empty() {
                let list = tx.put_object(&m, "attachments", ObjType::List)?;
                for (i, a) in attachments.iter().enumerate() {
                    let o = tx.insert_object(&list, i, ObjType::Map)?;
                    tx.put(&o, "name", a.name.as_str())?;
                    tx.put(&o, "hash", a.hash.as_str())?;
                    tx.put(&o, "len", a.len)?;
                }
            }
            Ok(AppendOutcome {
                index,
                id: request_id.to_owned(),
                created: true,
            })
        })
    }

    /// Claims a request for the agent `device` under agent-role `epoch` (see the module docs).
    pub fn claim(
        &mut self,
        request_id: &str,
        device: &str,
        epoch: u64,
        now: i64,
    ) -> Result<ClaimOutcome, ConversationError> {
        let current = self
            .find_request(request_id)
            .ok_or_else(|| ConversationError::RequestNotFound(request_id.to_owned()))?;
        let outcome = match (current.status, &current.claimed_by) {
            (Some(s @ (Status::Done | Status::Failed)), _) => return Ok(ClaimOutcome::Finished(s)),
            (Some(Status::Running), Some(c)) if c.device == device && c.epoch == epoch => {
                return Ok(ClaimOutcome::AlreadyOurs);
            }
            (Some(Status::Running), Some(c)) if c.epoch >= epoch => {
                return Ok(ClaimOutcome::Refused {
                    claimed_by: Some(c.clone()),
                });
            }
            (Some(Status::Running), previous) => ClaimOutcome::TookOver {
                previous: previous.clone(),
            },
            // Pending, or a status this build does not know (treated as pending).
            _ => ClaimOutcome::Claimed,
        };
        let message = format!("claim {request_id} epoch {epoch}");
        self.with_request(request_id, &message, now, |tx, m| {
            tx.put(m, "status", Status::Running.name())?;
            let c = tx.put_object(m, "claimed_by", ObjType::Map)?;
            tx.put(&c, "device", device)?;
            tx.put(&c, "epoch", epoch)?;
            Ok(())
        })?;
        Ok(outcome)
    }

    /// Sets a request's status; `error` is written when given (e.g. `interrupted`).
    pub fn set_status(
        &mut self,
        request_id: &str,
        status: Status,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), ConversationError> {
        let message = format!("{request_id} {status}");
        self.with_request(request_id, &message, now, |tx, m| {
            tx.put(m, "status", status.name())?;
            if let Some(e) = error {
                tx.put(m, "error", e)?;
            }
            Ok(())
        })
    }

    /// Records the model a request asks for (`NAME` or `NAME/MODEL`). Call it in the same
    /// [`Document`] edit as the append, so the agent never sees the request without it.
    pub fn set_request_model(
        &mut self,
        request_id: &str,
        model: &str,
        now: i64,
    ) -> Result<(), ConversationError> {
        let message = format!("{request_id} model");
        self.with_request(request_id, &message, now, |tx, m| {
            tx.put(m, "model", model)?;
            Ok(())
        })
    }

    /// Appends `updates` to the progress of a running request, in one change (nothing is
    /// written for no updates). Text is spliced at the end and each tool call written when it
    /// starts and when it finishes, so a run adds each byte it shows once to the history.
    pub fn append_progress(
        &mut self,
        request_id: &str,
        updates: &[ProgressUpdate],
        now: i64,
    ) -> Result<(), ConversationError> {
        if updates.is_empty() {
            return Ok(());
        }
        let message = format!("{request_id} progress");
        self.with_request(request_id, &message, now, |tx, m| {
            progress::append(tx, m, updates)
        })
    }

    /// Appends an assistant reply to `request_id`. Does **not** add `usage` to the
    /// conversation totals: call [`Conversation::add_usage`] for that.
    pub fn append_assistant(
        &mut self,
        request_id: &str,
        text: &str,
        tool_calls: &[ToolCallView],
        usage: UsageView,
        device: &str,
        now: i64,
    ) -> Result<AppendOutcome, ConversationError> {
        let answer = Answer {
            text,
            tool_calls,
            usage,
            model: None,
        };
        self.append_answer(request_id, &answer, device, now)
    }

    /// [`Conversation::append_assistant`] with the model that wrote it.
    pub fn append_answer(
        &mut self,
        request_id: &str,
        answer: &Answer<'_>,
        device: &str,
        now: i64,
    ) -> Result<AppendOutcome, ConversationError> {
        let Answer {
            text,
            tool_calls,
            usage,
            model,
        } = *answer;
        if self.find_request(request_id).is_none() {
            return Err(ConversationError::RequestNotFound(request_id.to_owned()));
        }
        let id = format!("{request_id}/reply{}", self.replies_to(request_id).len());
        let message = format!("reply to {request_id}");
        self.doc_mut().change(&message, now, |tx| {
            let list = messages_list(tx)?;
            let index = tx.length(&list);
            let m = tx.insert_object(&list, index, ObjType::Map)?;
            tx.put(&m, "id", id.as_str())?;
            tx.put(&m, "role", Role::Assistant.name())?;
            tx.put(&m, "text", text)?;
            tx.put(&m, "device", device)?;
            tx.put(&m, "created_at", now)?;
            tx.put(&m, "reply_to", request_id)?;
            let calls = tx.put_object(&m, "tool_calls", ObjType::List)?;
            for (i, call) in tool_calls.iter().enumerate() {
                let c = tx.insert_object(&calls, i, ObjType::Map)?;
                tx.put(&c, "id", call.id.as_str())?;
                tx.put(&c, "name", call.name.as_str())?;
                tx.put(&c, "input", call.input.as_str())?;
                tx.put(&c, "output", call.output.as_str())?;
                tx.put(&c, "is_error", call.is_error)?;
            }
            if let Some(model) = model {
                tx.put(&m, "model", model)?;
            }
            put_usage(tx, &m, &usage)?;
            Ok(AppendOutcome {
                index,
                id: id.clone(),
                created: true,
            })
        })
    }

    /// Adds to the conversation totals. Totals are counters, so concurrent additions on two
    /// devices add up.
    pub fn add_usage(
        &mut self,
        input: u64,
        output: u64,
        now: i64,
    ) -> Result<(), ConversationError> {
        self.add_usage_view(&UsageView::new(input, output), now)
    }

    /// Adds every count of `usage` (cache figures and cost too) to the conversation totals.
    pub fn add_usage_view(&mut self, usage: &UsageView, now: i64) -> Result<(), ConversationError> {
        self.doc_mut().change("add usage", now, |tx| {
            let totals = match fields::object(tx, &ROOT, FIELD_USAGE, ObjType::Map) {
                Some(u) => u,
                None => put_usage_totals(tx)?,
            };
            for (key, by) in usage_fields(usage) {
                if by > 0 || key == INPUT_TOKENS || key == OUTPUT_TOKENS {
                    add_to_counter(tx, &totals, key, by)?;
                }
            }
            Ok(())
        })
    }

    /// Records a summary of the turns up to and including request `through` (see
    /// [`SummaryView`]); its cost is added to the totals in the same change.
    #[allow(clippy::too_many_arguments)]
    pub fn append_summary(
        &mut self,
        text: &str,
        through: &str,
        requests: u64,
        model: Option<&str>,
        usage: &UsageView,
        device: &str,
        now: i64,
    ) -> Result<usize, ConversationError> {
        if self.find_request(through).is_none() {
            return Err(ConversationError::RequestNotFound(through.to_owned()));
        }
        self.doc_mut().change("summary", now, |tx| {
            let list = match fields::object(tx, &ROOT, FIELD_SUMMARIES, ObjType::List) {
                Some(l) => l,
                None => tx.put_object(ROOT, FIELD_SUMMARIES, ObjType::List)?,
            };
            let index = tx.length(&list);
            let m = tx.insert_object(&list, index, ObjType::Map)?;
            tx.put(&m, "text", text)?;
            tx.put(&m, "through", through)?;
            tx.put(&m, "requests", requests)?;
            if let Some(model) = model {
                tx.put(&m, "model", model)?;
            }
            tx.put(&m, "device", device)?;
            tx.put(&m, "created_at", now)?;
            put_usage(tx, &m, usage)?;
            let totals = match fields::object(tx, &ROOT, FIELD_USAGE, ObjType::Map) {
                Some(u) => u,
                None => put_usage_totals(tx)?,
            };
            for (key, by) in usage_fields(usage) {
                if by > 0 {
                    add_to_counter(tx, &totals, key, by)?;
                }
            }
            Ok(index)
        })
    }

    /// Runs `f` on the map of request `request_id` in one change.
    fn with_request(
        &mut self,
        request_id: &str,
        message: &str,
        now: i64,
        f: impl FnOnce(&mut Transaction<'_>, &ObjId) -> Result<(), AutomergeError>,
    ) -> Result<(), ConversationError> {
        let (obj, _) = find_request_obj(self.document().automerge(), request_id)
            .ok_or_else(|| ConversationError::RequestNotFound(request_id.to_owned()))?;
        self.doc_mut().change(message, now, |tx| {
            f(tx, &obj).map_err(ConversationError::from)
        })
    }
}

/// Creates the `usage` totals map with zero counters. Returns its id.
pub(crate) fn put_usage_totals(tx: &mut Transaction<'_>) -> Result<ObjId, AutomergeError> {
    let u = tx.put_object(ROOT, FIELD_USAGE, ObjType::Map)?;
    tx.put(&u, INPUT_TOKENS, ScalarValue::counter(0))?;
    tx.put(&u, OUTPUT_TOKENS, ScalarValue::counter(0))?;
    Ok(u)
}

fn usage_fields(u: &UsageView) -> [(&'static str, u64); 5] {
    [
        (INPUT_TOKENS, u.input_tokens),
        (OUTPUT_TOKENS, u.output_tokens),
        (CACHE_CREATION, u.cache_creation_input_tokens),
        (CACHE_READ, u.cache_read_input_tokens),
        (COST_NANOS, u.cost_nanos),
    ]
}

/// Writes `usage` as a map under `key` `usage` of `obj` (plain numbers; zero cache and cost
/// fields are left out).
fn put_usage(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    usage: &UsageView,
) -> Result<(), AutomergeError> {
    let u = tx.put_object(obj, "usage", ObjType::Map)?;
    for (key, value) in usage_fields(usage) {
        if value > 0 || key == INPUT_TOKENS || key == OUTPUT_TOKENS {
            tx.put(&u, key, value)?;
        }
    }
    Ok(())
}

fn add_to_counter(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    key: &str,
    by: u64,
) -> Result<(), AutomergeError> {
    let by = i64::try_from(by).unwrap_or(i64::MAX);
    match tx.get(obj, key)? {
        Some((Value::Scalar(s), _)) if s.is_counter() => tx.increment(obj, key, by),
        // Missing or not a counter (written by a foreign build): restart as a counter.
        other => {
            let base = match other {
                Some((Value::Scalar(s), _)) => s.as_i64().unwrap_or(0),
                _ => 0,
            };
            tx.put(obj, key, ScalarValue::counter(base.saturating_add(by)))
        }
    }
}

/// The `messages` list, created if missing.
fn messages_list(tx: &mut Transaction<'_>) -> Result<ObjId, AutomergeError> {
    match fields::object(tx, &ROOT, FIELD_MESSAGES, ObjType::List) {
        Some(list) => Ok(list),
        None => tx.put_object(ROOT, FIELD_MESSAGES, ObjType::List),
    }
}

/// The map and index of request `request_id`. Searched from the end: the request being worked
/// on is nearly always one of the last messages, so this does not grow with the conversation.
fn find_request_obj<R: ReadDoc>(doc: &R, request_id: &str) -> Option<(ObjId, usize)> {
    let list = fields::object(doc, &ROOT, FIELD_MESSAGES, ObjType::List)?;
    fields::maps_in(doc, &list, ..)
        .into_iter()
        .rev()
        .find_map(|(i, obj)| {
            let is_request = fields::string(doc, &obj, "role").as_deref()
                == Some(Role::User.name())
                && fields::string(doc, &obj, "request_id").as_deref() == Some(request_id);
            is_request.then_some((obj, i))
        })
}

fn read_usage<R: ReadDoc>(doc: &R, obj: &ObjId) -> UsageView {
    let n = |key: &str| fields::uint(doc, obj, key).unwrap_or(0);
    UsageView {
        input_tokens: n(INPUT_TOKENS),
        output_tokens: n(OUTPUT_TOKENS),
        cache_creation_input_tokens: n(CACHE_CREATION),
        cache_read_input_tokens: n(CACHE_READ),
        cost_nanos: n(COST_NANOS),
    }
}

fn read_message<R: ReadDoc>(doc: &R, obj: &ObjId, index: usize) -> Option<MessageView> {
    let f = MapFields::read(doc, obj);
    let parse = |k: &str| f.string(doc, k);
    let claimed_by = f.object("claimed_by", ObjType::Map).and_then(|c| {
        let c = MapFields::read(doc, &c);
        Some(ClaimView {
            device: c.string(doc, "device")?,
            epoch: c.uint("epoch")?,
        })
    });
    let tool_calls = f
        .object("tool_calls", ObjType::List)
        .map(|list| {
            (0..doc.length(&list))
                .filter_map(|i| fields::object_at(doc, &list, i, ObjType::Map))
                .map(|c| {
                    let c = MapFields::read(doc, &c);
                    ToolCallView {
                        id: c.string(doc, "id").unwrap_or_default(),
                        name: c.string(doc, "name").unwrap_or_default(),
                        input: c.string(doc, "input").unwrap_or_default(),
                        output: c.string(doc, "output").unwrap_or_default(),
                        is_error: c.boolean("is_error").unwrap_or(false),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    Some(MessageView {
        index,
        id: parse("id")?,
        role: parse("role")?.parse().ok()?,
        text: parse("text").unwrap_or_default(),
        status: parse("status").and_then(|s| s.parse().ok()),
        error: parse("error"),
        interface: parse("interface").and_then(|s| s.parse().ok()),
        device: parse("device"),
        created_at: f.int("created_at"),
        request_id: parse("request_id"),
        claimed_by,
        reply_to: parse("reply_to"),
        tool_calls,
        usage: f.object("usage", ObjType::Map).map(|u| read_usage(doc, &u)),
        progress: progress::read(doc, obj),
        attachments: read_attachments(doc, &f),
        model: parse("model"),
    })
}

fn read_attachments<R: ReadDoc>(doc: &R, f: &MapFields) -> Vec<AttachmentView> {
    let Some(list) = f.object("attachments", ObjType::List) else {
        return Vec::new();
    };
    (0..doc.length(&list))
        .filter_map(|i| fields::object_at(doc, &list, i, ObjType::Map))
        .filter_map(|o| {
            let a = MapFields::read(doc, &o);
            Some(AttachmentView {
                name: a.string(doc, "name")?,
                hash: a.string(doc, "hash")?,
                len: a.uint("len").unwrap_or(0),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::actor::actor_for;

    fn conv() -> Document {
        Document::new(DocKind::Conversation, &actor_for(&[1; 32], [1; 8]), 100).expect("new")
    }

    #[test]
    fn request_lifecycle() {
        let mut d = conv();
        let mut c = Conversation::open(&mut d).expect("open");
        c.set_title("Trip", 100).expect("title");
        let out = c
            .append_request("r1", "hello?", Interface::Cli, "laptop", 101)
            .expect("append");
        assert_eq!(
            out,
            AppendOutcome {
                index: 0,
                id: "r1".into(),
                created: true
            }
        );
        let again = c
            .append_request("r1", "dup", Interface::Web, "phone", 102)
            .expect("dedup");
        assert!(!again.created);
        assert_eq!(c.requests().len(), 1);
        assert_eq!(c.pending_requests().len(), 1);

        assert_eq!(
            c.claim("r1", "server", 3, 103).expect("claim"),
            ClaimOutcome::Claimed
        );
        assert_eq!(
            c.claim("r1", "server", 3, 103).expect("again"),
            ClaimOutcome::AlreadyOurs
        );
        assert!(c.pending_requests().is_empty());
        assert_eq!(c.running_claimed_by("server").len(), 1);
        let step = ProgressUpdate::Text("calling tool".into());
        c.append_progress("r1", std::slice::from_ref(&step), 104)
            .expect("progress");

        let calls = vec![ToolCallView {
            id: "t1".into(),
            name: "bash".into(),
            input: r#"{"cmd":"ls"}"#.into(),
            output: "a\nb".into(),
            is_error: false,
        }];
        let usage = UsageView::new(10, 5);
        let r = c
            .append_assistant("r1", "Here.", &calls, usage, "server", 105)
            .expect("reply");
        assert_eq!(r.id, "r1/reply0");
        c.add_usage(10, 5, 105).expect("usage");
        c.set_status("r1", Status::Done, None, 106).expect("done");

        let req = c.find_request("r1").expect("found");
        assert_eq!(req.status, Some(Status::Done));
        assert_eq!(
            req.claimed_by,
            Some(ClaimView {
                device: "server".into(),
                epoch: 3
            })
        );
        assert_eq!(req.interface, Some(Interface::Cli));
        assert_eq!(req.device.as_deref(), Some("laptop"));
        assert_eq!(
            req.progress.map(|p| p.text).as_deref(),
            Some("calling tool")
        );
        assert_eq!(req.created_at, Some(101));
        let replies = c.replies_to("r1");
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].tool_calls, calls);
        assert_eq!(replies[0].usage, Some(usage));
        assert_eq!(c.usage_totals(), usage);
        assert_eq!(c.title(), "Trip");
        assert_eq!(
            c.claim("r1", "server", 4, 107).expect("fin"),
            ClaimOutcome::Finished(Status::Done)
        );
        assert!(matches!(
            c.claim("nope", "server", 1, 1),
            Err(ConversationError::RequestNotFound(_))
        ));
        assert!(matches!(
            c.append_assistant("nope", "x", &[], UsageView::default(), "s", 1),
            Err(ConversationError::RequestNotFound(_))
        ));
        // Views serialize for the local API.
        let j = serde_json::to_value(c.requests()).expect("json");
        assert_eq!(j[0]["status"], "done");
    }

    #[test]
    fn replies_are_found_for_old_and_new_requests_also_after_a_merge() {
        let mut a = conv();
        let mut c = Conversation::open(&mut a).expect("open");
        for i in 0..5 {
            let rid = format!("r{i}");
            c.append_request(&rid, "q", Interface::Cli, "laptop", 100 + i)
                .expect("ask");
            c.append_assistant(&rid, "a", &[], UsageView::default(), "server", 100 + i)
                .expect("reply");
        }
        // A second device appends a reply to an old request and a new request, concurrently
        // with a reply to r4 here.
        let mut b = Document::load(&a.save(), &actor_for(&[2; 32], [2; 8])).expect("copy");
        let mut cb = Conversation::open(&mut b).expect("open");
        cb.append_assistant("r1", "late", &[], UsageView::default(), "other", 200)
            .expect("late reply");
        cb.append_request("r5", "q", Interface::Web, "phone", 201)
            .expect("new request");
        let mut ca = Conversation::open(&mut a).expect("open");
        ca.append_assistant("r4", "second", &[], UsageView::default(), "server", 202)
            .expect("reply");
        a.load_incremental(&b.save()).expect("merge");
        let c = Conversation::open(&a).expect("open");
        let texts =
            |rid: &str| -> Vec<String> { c.replies_to(rid).into_iter().map(|m| m.text).collect() };
        assert_eq!(texts("r0"), ["a"]);
        assert_eq!(texts("r1"), ["a", "late"]);
        assert_eq!(texts("r4"), ["a", "second"]);
        assert!(texts("r5").is_empty());
        assert!(texts("nope").is_empty());
        assert_eq!(c.find_request("r0").map(|m| m.index), Some(0));
        assert!(c.find_request("r5").is_some());
        assert_eq!(c.requests().len(), 6);
    }

    #[test]
    fn claims_are_fenced_by_epoch() {
        let mut d = conv();
        let mut c = Conversation::open(&mut d).expect("open");
        c.append_request("r", "q", Interface::Web, "phone", 1)
            .expect("append");
        assert_eq!(
            c.claim("r", "old-agent", 1, 2).expect("claim"),
            ClaimOutcome::Claimed
        );
        // Another device with the same epoch is refused.
        assert_eq!(
            c.claim("r", "other", 1, 3).expect("refused"),
            ClaimOutcome::Refused {
                claimed_by: Some(ClaimView {
                    device: "old-agent".into(),
                    epoch: 1
                })
            }
        );
        // A newer epoch takes over a stale claim.
        assert_eq!(
            c.claim("r", "new-agent", 2, 4).expect("take over"),
            ClaimOutcome::TookOver {
                previous: Some(ClaimView {
                    device: "old-agent".into(),
                    epoch: 1
                })
            }
        );
        // The old holder (lower epoch) can no longer claim it back.
        assert!(matches!(
            c.claim("r", "old-agent", 1, 5).expect("stale"),
            ClaimOutcome::Refused { .. }
        ));
        assert_eq!(
            c.find_request("r").and_then(|m| m.claimed_by),
            Some(ClaimView {
                device: "new-agent".into(),
                epoch: 2
            })
        );
    }

    #[test]
    fn interrupted_runs_can_be_failed() {
        let mut d = conv();
        let mut c = Conversation::open(&mut d).expect("open");
        c.append_request("a", "q", Interface::Schedule, "srv", 1)
            .expect("a");
        c.append_request("b", "q", Interface::Webhook, "srv", 1)
            .expect("b");
        c.claim("a", "srv", 1, 2).expect("claim");
        for m in c.running_claimed_by("srv") {
            let id = m.request_id.expect("id");
            c.set_status(&id, Status::Failed, Some("interrupted"), 3)
                .expect("fail");
        }
        let a = c.find_request("a").expect("a");
        assert_eq!(
            (a.status, a.error.as_deref()),
            (Some(Status::Failed), Some("interrupted"))
        );
        assert_eq!(c.pending_requests().len(), 1);
    }

    #[test]
    fn unknown_fields_survive_typed_edits_and_odd_entries_are_skipped() {
        let mut d = conv();
        Conversation::open(&mut d)
            .expect("open")
            .append_request("r", "q", Interface::Cli, "dev", 1)
            .expect("append");
        d.put_json("messages.0.future", json!({"x": [1, 2]}), "peer v3", 2)
            .expect("put");
        d.put_json("future_root", json!("kept"), "peer v3", 2)
            .expect("put");
        d.put_json(
            "messages.1",
            json!({"id": "z", "role": "system-v9"}),
            "peer v3",
            2,
        )
        .expect("odd message");
        d.put_json("messages.2", json!("not a map"), "peer v3", 2)
            .expect("odd entry");
        let mut c = Conversation::open(&mut d).expect("open");
        c.claim("r", "srv", 1, 3).expect("claim");
        c.set_status("r", Status::Done, None, 4).expect("done");
        assert_eq!(c.messages().len(), 1);
        let bytes = d.save();
        let back = Document::load(&bytes, &actor_for(&[2; 32], [2; 8])).expect("load");
        let j = back.to_json();
        assert_eq!(j["messages"][0]["future"], json!({"x": [1, 2]}));
        assert_eq!(j["messages"][0]["status"], "done");
        assert_eq!(j["future_root"], "kept");
        assert_eq!(j["messages"][1]["role"], "system-v9");
    }

    #[test]
    fn enum_names() {
        assert_eq!("running".parse::<Status>(), Ok(Status::Running));
        assert!("Running".parse::<Status>().is_err());
        assert_eq!(Interface::Webhook.to_string(), "webhook");
        assert_eq!(
            serde_json::to_value(Role::Assistant).expect("json"),
            "assistant"
        );
    }

    #[test]
    fn a_request_records_the_model_it_asks_for() {
        let mut d = conv();
        let mut c = Conversation::open(&mut d).expect("open");
        c.append_request("r1", "hi", Interface::Cli, "laptop", 101)
            .expect("append");
        c.set_request_model("r1", "local", 101).expect("model");
        assert!(c.set_request_model("nope", "x", 102).is_err());
        assert_eq!(c.messages()[0].model.as_deref(), Some("local"));
    }

    #[test]
    fn answers_record_model_cache_cost_and_summaries() {
        let mut d = conv();
        let mut c = Conversation::open(&mut d).expect("open");
        for rid in ["r1", "r2", "r3"] {
            c.append_request(rid, "q", Interface::Cli, "laptop", 1)
                .expect("ask");
        }
        let usage = UsageView {
            input_tokens: 10,
            output_tokens: 5,
            cache_creation_input_tokens: 100,
            cache_read_input_tokens: 200,
            cost_nanos: 42,
        };
        let answer = Answer {
            text: "a",
            tool_calls: &[],
            usage,
            model: Some("claude-haiku-4-5"),
        };
        c.append_answer("r1", &answer, "server", 2).expect("answer");
        c.add_usage_view(&usage, 2).expect("totals");
        let reply = &c.replies_to("r1")[0];
        assert_eq!(reply.usage, Some(usage));
        assert_eq!(reply.model.as_deref(), Some("claude-haiku-4-5"));
        assert_eq!(usage.total_tokens(), 315);
        assert!(c.latest_summary().is_none());
        let cost = UsageView::new(50, 7);
        c.append_summary("s1", "r1", 1, Some("m"), &cost, "server", 3)
            .expect("summary");
        c.append_summary("s2", "r2", 2, Some("m"), &cost, "server", 4)
            .expect("summary");
        assert!(
            c.append_summary("x", "nope", 1, None, &cost, "server", 5)
                .is_err()
        );
        let latest = c.latest_summary().expect("latest");
        assert_eq!(
            (latest.text.as_str(), latest.through.as_str()),
            ("s2", "r2")
        );
        assert_eq!(latest.usage, cost);
        assert_eq!(c.summaries().len(), 2);
        // Totals: the answer, then both summaries.
        let mut want = usage;
        want.add(&cost);
        want.add(&cost);
        assert_eq!(c.usage_totals(), want);
        // An old reply without the new fields reads as zero.
        let j = serde_json::to_value(UsageView::new(1, 2)).expect("json");
        let back: UsageView =
            serde_json::from_value(json!({"input_tokens": 1, "output_tokens": 2})).expect("old");
        assert_eq!(serde_json::to_value(back).expect("json"), j);
    }
}
