//! The mesh's own tools, built in (no container): [`MeshTools`] is a [`ToolHost`] that offers
//! them beside the tools of the host it wraps (the Docker sandbox, MCP servers) and runs them
//! on the agent node's documents and store.
//!
//! | tool | does |
//! |---|---|
//! | `memory_read {}` | the memory document's text |
//! | `memory_update { text, mode? }` | appends to (default) or replaces the memory |
//! | `schedule_list {}` | the schedules, with their next slots and the time now (UTC) |
//! | `schedule_add { cron, prompt, conversation? }` | a schedule; `conversation`: `this` (default) or `new` |
//! | `schedule_remove { id }` | removes a schedule |
//! | `conversations_search { query, limit? }` | messages of past conversations that hold every word |
//! | `send_file { path, name? }` | saves a workspace file as a blob and sends it to the asking device |
//!
//! The request a call belongs to is the conversation's running request (the runner runs one
//! request per conversation at a time), and the asking device is that request's device.
//! Every call passes the approval gate first like any other tool
//! ([`approvals`](super::approvals)).

use std::sync::Arc;

use futures::future::BoxFuture;
use iom_crdt::{DocId, DocKind, Memory, Outbox, ScheduleError, Schedules, SentFile, Status};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ask::{MAX_ATTACHMENT_BYTES, check_attachment_name};
use super::claude::ToolResult;
use super::conversations::{Conversations, title_from};
use super::host::{ToolHost, ToolHostError};
use crate::docs::Origin;
use crate::store::Store;

/// Tells the peers that this node holds a new blob (`(hash, len)`).
pub type Announce = Arc<dyn Fn([u8; 32], u64) + Send + Sync>;

/// Most conversations `conversations_search` reads (the most recently changed).
pub const SEARCH_MAX_CONVERSATIONS: usize = 500;
/// Longest memory text accepted from the model in one call.
const MAX_MEMORY_TEXT: usize = 64 * 1024;
/// Longest scheduled prompt.
const MAX_PROMPT: usize = 64 * 1024;

/// The names of the mesh's tools, in the order they are offered.
pub const NAMES: [&str; 7] = [
    "memory_read",
    "memory_update",
    "schedule_list",
    "schedule_add",
    "schedule_remove",
    "conversations_search",
    "send_file",
];

/// The Anthropic `tools` array entries of the mesh's tools.
pub fn definitions() -> Value {
    json!([
        {
            "name": "memory_read",
            "description": "Read the person's memory document: their notes for you, shared by \
                all their devices (it is also in your system prompt).",
            "input_schema": {"type": "object", "properties": {}}
        },
        {
            "name": "memory_update",
            "description": "Change the person's memory document (synced to all their \
                devices). Append a short note by default; replace only when asked to rewrite it.",
            "input_schema": {
                "type": "object",
                "properties": {
                    "text": {"type": "string", "description": "Text to append, or the whole new text."},
                    "mode": {"type": "string", "enum": ["append", "replace"], "description": "append (default) or replace."}
                },
                "required": ["text"]
            }
        },
        {
            "name": "schedule_list",
            "description": "List the scheduled prompts (cron in UTC) with their ids and next \
                slots, and the current UTC time.",
            "input_schema": {"type": "object", "properties": {}}
        },
        {
            "name": "schedule_add",
            "description": "Schedule a prompt that is sent to you at every slot of a cron \
                expression (five fields, MIN HOUR DAY MONTH WEEKDAY, in UTC; \"0 9 * * Mon\" \
                is every Monday at 09:00 UTC). Use it for reminders and recurring tasks; write \
                the prompt as the instruction you will get then (\"Remind the person to ...\").",
            "input_schema": {
                "type": "object",
                "properties": {
                    "cron": {"type": "string", "description": "Cron expression, UTC."},
                    "prompt": {"type": "string", "description": "The prompt sent at each slot."},
                    "conversation": {"type": "string", "enum": ["this", "new"], "description": "Where it posts: this conversation (default) or a new one."}
                },
                "required": ["cron", "prompt"]
            }
        },
        {
            "name": "schedule_remove",
            "description": "Remove a scheduled prompt by its id (see schedule_list).",
            "input_schema": {
                "type": "object",
                "properties": {"id": {"type": "string", "description": "Schedule id."}},
                "required": ["id"]
            }
        },
        {
            "name": "conversations_search",
            "description": "Search the person's past conversations with you: messages that \
                contain every word of the query (case-insensitive), newest conversations first.",
            "input_schema": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "Words to look for."},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 20, "description": "Most results (default 5)."}
                },
                "required": ["query"]
            }
        },
        {
            "name": "send_file",
            "description": "Send a file from the sandbox workspace to the person's device that \
                asked (it is stored as a blob and appears there as a file of this answer). At \
                most 32 MiB.",
            "input_schema": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Path in /workspace."},
                    "name": {"type": "string", "description": "File name to give it (default: the path's last part)."}
                },
                "required": ["path"]
            }
        }
    ])
}

/// The mesh's tools beside the tools of `inner`.
pub struct MeshTools {
    inner: Arc<dyn ToolHost>,
    conversations: Conversations,
    store: Store,
    announce: Announce,
}

impl std::fmt::Debug for MeshTools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTools").finish_non_exhaustive()
    }
}

impl MeshTools {
    /// The mesh's tools over `conversations` (their documents, and the memory and schedules
    /// beside them) and `store` (blobs), announcing new blobs with `announce`, beside `inner`.
    pub fn new(
        inner: Arc<dyn ToolHost>,
        conversations: Conversations,
        store: Store,
        announce: Announce,
    ) -> MeshTools {
        MeshTools {
            inner,
            conversations,
            store,
            announce,
        }
    }

    async fn call(&self, conversation: &str, name: &str, input: &Value) -> Result<String, String> {
        match name {
            "memory_read" => self.memory_read().await,
            "memory_update" => self.memory_update(parse(name, input)?).await,
            "schedule_list" => self.schedule_list().await,
            "schedule_add" => self.schedule_add(conversation, parse(name, input)?).await,
            "schedule_remove" => self.schedule_remove(parse(name, input)?).await,
            "conversations_search" => self.search(conversation, parse(name, input)?).await,
            "send_file" => self.send_file(conversation, parse(name, input)?).await,
            other => Err(format!("unknown tool {other:?}")),
        }
    }

    fn docs(&self) -> &crate::docs::Docs {
        self.conversations.docs()
    }

    async fn memory_read(&self) -> Result<String, String> {
        if self.docs().meta(DocId::MEMORY).map_err(err)?.is_none() {
            return Ok("(the memory is empty)".into());
        }
        let text = self
            .docs()
            .read(DocId::MEMORY, |d| Memory::open(d).map(|m| m.text()))
            .await
            .map_err(err)?
            .map_err(err)?;
        Ok(if text.trim().is_empty() {
            "(the memory is empty)".into()
        } else {
            text
        })
    }

    async fn memory_update(&self, i: MemoryInput) -> Result<String, String> {
        if i.text.len() > MAX_MEMORY_TEXT {
            return Err(format!("the text is at most {MAX_MEMORY_TEXT} bytes"));
        }
        let replace = match i.mode.as_deref() {
            None | Some("append") => false,
            Some("replace") => true,
            Some(other) => return Err(format!("mode {other:?}: expected append or replace")),
        };
        self.docs().create(DocKind::Memory).await.map_err(err)?;
        let now = self.conversations.now();
        let len = self
            .docs()
            .modify(DocId::MEMORY, Origin::Local, false, move |d| {
                Ok(Memory::open(&mut *d).and_then(|mut m| {
                    if replace {
                        m.replace(&i.text, "memory edit by the agent", now)?;
                    } else {
                        let sep = if m.text().is_empty() || m.text().ends_with('\n') {
                            ""
                        } else {
                            "\n"
                        };
                        m.append(
                            &format!("{sep}{}", i.text),
                            "memory append by the agent",
                            now,
                        )?;
                    }
                    Ok(m.text().chars().count())
                }))
            })
            .await
            .map_err(err)?
            .map_err(err)?;
        Ok(format!(
            "memory {}; it is now {len} characters",
            if replace { "replaced" } else { "appended to" }
        ))
    }

    async fn schedules(&self) -> Result<Vec<iom_crdt::ScheduleView>, String> {
        if self.docs().meta(DocId::SCHEDULES).map_err(err)?.is_none() {
            return Ok(Vec::new());
        }
        self.docs()
            .read(DocId::SCHEDULES, |d| Schedules::open(d).map(|s| s.list()))
            .await
            .map_err(err)?
            .map_err(err)
    }

    async fn schedule_list(&self) -> Result<String, String> {
        let now = self.conversations.now();
        let list: Vec<Value> = self
            .schedules()
            .await?
            .into_iter()
            .map(|s| {
                let next = crate::schedule::parse_cron(&s.cron)
                    .ok()
                    .and_then(|c| crate::schedule::next_slot(&c, now));
                json!({
                    "id": s.id, "cron": s.cron, "prompt": s.prompt, "enabled": s.enabled,
                    "conversation": s.conversation, "next_slot_utc": next.map(utc),
                })
            })
            .collect();
        Ok(json!({ "now_utc": utc(now), "schedules": list }).to_string())
    }

    async fn schedule_add(&self, conversation: &str, i: ScheduleInput) -> Result<String, String> {
        let cron = crate::schedule::parse_cron(&i.cron).map_err(|e| e.to_string())?;
        let prompt = i.prompt.trim().to_string();
        if prompt.is_empty() || prompt.len() > MAX_PROMPT {
            return Err(format!("the prompt is 1 to {MAX_PROMPT} bytes"));
        }
        let target = match i.conversation.as_deref() {
            None | Some("this") => conversation.parse::<DocId>().map_err(err)?,
            Some("new") => self
                .conversations
                .create(&title_from(&prompt))
                .await
                .map_err(err)?,
            Some(other) => return Err(format!("conversation {other:?}: expected this or new")),
        };
        self.docs().create(DocKind::Schedules).await.map_err(err)?;
        let id = format!("s{}", hex::encode(crate::time::random_bytes::<4>()));
        let now = self.conversations.now();
        let (sid, expr, text) = (id.clone(), i.cron.trim().to_string(), prompt.clone());
        self.docs()
            .modify(DocId::SCHEDULES, Origin::Local, false, move |d| {
                Ok(Schedules::open(&mut *d)
                    .map_err(ScheduleError::from)
                    .and_then(|mut s| s.add(&sid, &expr, &text, Some(&target.to_string()), now)))
            })
            .await
            .map_err(err)?
            .map_err(err)?;
        let next = crate::schedule::next_slot(&cron, now);
        Ok(json!({
            "id": id, "cron": i.cron.trim(), "prompt": prompt, "conversation": target.to_string(),
            "next_slot_utc": next.map(utc), "now_utc": utc(now),
        })
        .to_string())
    }

    async fn schedule_remove(&self, i: IdInput) -> Result<String, String> {
        if self.docs().meta(DocId::SCHEDULES).map_err(err)?.is_none() {
            return Err(format!("no schedule {:?}", i.id));
        }
        let now = self.conversations.now();
        let id = i.id.clone();
        let removed = self
            .docs()
            .modify(DocId::SCHEDULES, Origin::Local, false, move |d| {
                Ok(Schedules::open(&mut *d)
                    .map_err(ScheduleError::from)
                    .and_then(|mut s| s.remove(&id, now)))
            })
            .await
            .map_err(err)?
            .map_err(err)?;
        if removed {
            Ok(format!("removed schedule {}", i.id))
        } else {
            Err(format!("no schedule {:?} (see schedule_list)", i.id))
        }
    }

    async fn search(&self, current: &str, i: SearchInput) -> Result<String, String> {
        let words: Vec<String> = i.query.split_whitespace().map(str::to_lowercase).collect();
        if words.is_empty() {
            return Err("the query is empty".into());
        }
        let limit = i.limit.unwrap_or(5).clamp(1, 20) as usize;
        let convs = self.conversations.newest_first().map_err(err)?;
        let mut hits = Vec::new();
        for (id, _) in convs.into_iter().take(SEARCH_MAX_CONVERSATIONS) {
            let ws = words.clone();
            let found = self
                .conversations
                .read(id, move |c| {
                    let title = c.title();
                    c.messages()
                        .into_iter()
                        .filter(|m| {
                            let hay = format!("{title}\n{}", m.text).to_lowercase();
                            ws.iter().all(|w| hay.contains(w.as_str()))
                        })
                        .map(|m| (title.clone(), m))
                        .collect::<Vec<_>>()
                })
                .await
                .map_err(err)?
                .unwrap_or_default();
            for (title, m) in found.into_iter().rev() {
                hits.push(json!({
                    "conversation": id.to_string(),
                    "this_conversation": id.to_string() == current,
                    "title": title,
                    "role": m.role.name(),
                    "created_at_utc": m.created_at.map(utc),
                    "text": snippet(&m.text, &words[0]),
                }));
                if hits.len() >= limit {
                    break;
                }
            }
            if hits.len() >= limit {
                break;
            }
        }
        Ok(json!({ "query": i.query, "results": hits }).to_string())
    }

    async fn send_file(&self, conversation: &str, i: SendInput) -> Result<String, String> {
        let doc: DocId = conversation.parse().map_err(err)?;
        let name = match &i.name {
            Some(n) => n.clone(),
            None => i
                .path
                .rsplit('/')
                .find(|p| !p.is_empty())
                .unwrap_or("")
                .to_string(),
        };
        check_attachment_name(&name).map_err(err)?;
        let (rid, to) = self
            .conversations
            .read(doc, |c| {
                c.requests()
                    .into_iter()
                    .rev()
                    .find(|m| m.status == Some(Status::Running))
                    .map(|m| {
                        (
                            m.request_id.unwrap_or_default(),
                            m.device.unwrap_or_default(),
                        )
                    })
            })
            .await
            .map_err(err)?
            .map_err(err)?
            .ok_or("no running request in this conversation to send the file for")?;
        let max = usize::try_from(MAX_ATTACHMENT_BYTES).unwrap_or(usize::MAX);
        let bytes = self
            .inner
            .read_workspace_file(conversation, &i.path, max)
            .await
            .map_err(|e: ToolHostError| e.to_string())?;
        let store = self.store.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut w = store.blob_writer(None)?;
            w.write(&bytes)?;
            Ok::<_, crate::store::StoreError>(w)
        })
        .await
        .map_err(err)?
        .map_err(err)?;
        let (hash, meta) = writer.finish().await.map_err(err)?;
        (self.announce)(hash, meta.len);
        let file = SentFile {
            request_id: rid,
            name: name.clone(),
            hash: hex::encode(hash),
            len: meta.len,
            to,
            created_at: 0,
        };
        let (entry, now) = (file.clone(), self.conversations.now());
        self.docs()
            .modify(doc, Origin::Local, false, move |d| {
                Ok(Outbox::open(&mut *d)
                    .map_err(|e| e.to_string())
                    .and_then(|mut o| o.push(&entry, now).map_err(|e| e.to_string())))
            })
            .await
            .map_err(err)??;
        Ok(format!(
            "sent {name} ({} bytes, sha256 {}) to the asking device",
            file.len, file.hash
        ))
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn parse<T: for<'de> Deserialize<'de>>(tool: &str, input: &Value) -> Result<T, String> {
    T::deserialize(input).map_err(|e| format!("invalid input: {e}; see the input_schema of {tool}"))
}

/// Unix seconds as `YYYY-MM-DD HH:MM UTC (Weekday)`.
fn utc(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC (%A)").to_string())
        .unwrap_or_default()
}

/// Up to 300 characters of `text` around the first `word`.
fn snippet(text: &str, word: &str) -> String {
    let lower = text.to_lowercase();
    let at = lower.find(word).unwrap_or(0);
    let chars: Vec<char> = text.chars().collect();
    // `at` is a byte offset in the lowercased text: count characters up to it instead.
    let start_char = lower[..at.min(lower.len())]
        .chars()
        .count()
        .saturating_sub(100);
    let s: String = chars.iter().skip(start_char).take(300).collect();
    let mut out = if start_char > 0 { format!("…{s}") } else { s };
    if chars.len() > start_char + 300 {
        out.push('…');
    }
    out
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryInput {
    text: String,
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleInput {
    cron: String,
    prompt: String,
    #[serde(default)]
    conversation: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdInput {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchInput {
    query: String,
    #[serde(default)]
    limit: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendInput {
    path: String,
    #[serde(default)]
    name: Option<String>,
}

impl ToolHost for MeshTools {
    fn definitions(&self) -> Value {
        let mut all = match self.inner.definitions() {
            Value::Array(a) => a,
            _ => Vec::new(),
        };
        if let Value::Array(mine) = definitions() {
            all.extend(mine);
        }
        Value::Array(all)
    }

    fn run<'a>(
        &'a self,
        conversation: &'a str,
        name: &'a str,
        input: &'a Value,
    ) -> BoxFuture<'a, ToolResult> {
        if !NAMES.contains(&name) {
            return self.inner.run(conversation, name, input);
        }
        Box::pin(async move {
            match self.call(conversation, name, input).await {
                Ok(out) => ToolResult::ok(out),
                Err(e) => ToolResult::error(format!("{name}: {e}")),
            }
        })
    }

    fn put_attachment<'a>(
        &'a self,
        conversation: &'a str,
        name: &'a str,
        bytes: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), ToolHostError>> {
        self.inner.put_attachment(conversation, name, bytes)
    }

    fn read_workspace_file<'a>(
        &'a self,
        conversation: &'a str,
        path: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<u8>, ToolHostError>> {
        self.inner.read_workspace_file(conversation, path, max)
    }

    fn prepare(&self) -> BoxFuture<'_, Result<(), ToolHostError>> {
        self.inner.prepare()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        self.inner.shutdown()
    }
}

#[cfg(test)]
mod tests;
