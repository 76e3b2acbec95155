//! The email channel: mail to the assistant's address becomes a request, and the answer goes
//! back as a reply in the same thread.
//!
//! In: IMAP IDLE on the configured mailbox ([`imap`]), renewed before the server's limit and
//! reconnected with back-off. Each new mail is parsed ([`parse`]) and judged ([`policy`]): only
//! allowlisted senders, no automatic mail, a rate limit per thread. A mail thread is a
//! conversation: `Message-ID`s map to conversations in the node's state ([`state`]), so a reply
//! to an answer continues the conversation. The request goes through [`Asking`] like the
//! webhook's, so it shows on every device.
//!
//! Out: when the request is done, [`smtp`] sends the answer (plain text and HTML, the files the
//! agent wrote in the conversation's workspace attached up to a size cap) with `In-Reply-To`
//! and `References` set and a Message-ID derived from the request.
//!
//! Schedules marked `--to email` have each result mailed to `email.owner` (`schedules`).
//!
//! Exactly once: the request id comes from the mail's Message-ID (or UIDVALIDITY and UID), the
//! answer to send is recorded before the request is asked, and the mailbox position
//! (UIDVALIDITY, last UID) after; a mail seen again after a crash is recognised, and an answer
//! recorded but not sent is sent after a restart.

pub mod config;
pub mod imap;
pub mod parse;
pub mod policy;
mod schedules;
pub mod smtp;
pub mod state;
pub mod tls;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use iom_crdt::{DocId, Interface};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::agent::ask::{Asking, RequestEvent};
use config::EmailConfig;
use state::{EmailState, Job, Position};

/// Failures kept for `iom email status`.
const MAX_FAILURES: usize = 10;
/// First pause before reconnecting; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause before reconnecting.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// SMTP attempts per answer.
const MAX_SEND_ATTEMPTS: u32 = 8;

/// The last mail seen.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Seen {
    /// Its UID.
    pub uid: u32,
    /// Sender.
    pub from: Option<String>,
    /// Subject.
    pub subject: String,
    /// Message-ID.
    pub message_id: Option<String>,
    /// Unix seconds.
    pub at: u64,
    /// What was done with it.
    pub outcome: String,
}

/// A failure, for `iom email status`.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// Unix seconds.
    pub at: u64,
    /// What failed.
    pub error: String,
}

#[derive(Debug, Default, Serialize)]
struct Status {
    state: String,
    since: u64,
    uid_validity: Option<u32>,
    last_uid: Option<u32>,
    last_message: Option<Seen>,
    received: u64,
    asked: u64,
    ignored: u64,
    answered: u64,
    failures: VecDeque<Failure>,
}

/// The channel.
pub struct EmailChannel {
    cfg: EmailConfig,
    state: EmailState,
    asking: Arc<Asking>,
    workspaces: PathBuf,
    status: Mutex<Status>,
}

impl std::fmt::Debug for EmailChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailChannel")
            .field("address", &self.cfg.address)
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    crate::time::now_secs()
}

impl EmailChannel {
    /// The channel for `cfg`, keeping its state in `store` and reading the agent's files
    /// from `data_dir/workspaces`.
    pub fn new(
        cfg: EmailConfig,
        store: crate::store::Store,
        asking: Arc<Asking>,
        data_dir: &Path,
    ) -> Arc<EmailChannel> {
        Arc::new(EmailChannel {
            cfg,
            state: EmailState::new(store),
            asking,
            workspaces: data_dir.join("workspaces"),
            status: Mutex::new(Status {
                state: "starting".into(),
                since: now(),
                ..Status::default()
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EmailConfig {
        &self.cfg
    }

    fn with_status<R>(&self, f: impl FnOnce(&mut Status) -> R) -> R {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn set_state(&self, s: impl Into<String>) {
        let s = s.into();
        self.with_status(|st| {
            if st.state != s {
                st.state = s;
                st.since = now();
            }
        });
    }

    fn fail(&self, error: impl Into<String>) {
        let error = error.into();
        tracing::warn!(%error, "email");
        self.with_status(|st| {
            st.failures.push_back(Failure { at: now(), error });
            while st.failures.len() > MAX_FAILURES {
                st.failures.pop_front();
            }
        });
    }

    /// `iom email status`.
    pub fn status_json(&self) -> Value {
        let pending = self.state.jobs().map(|j| j.len()).unwrap_or(0);
        let st = self.with_status(|st| serde_json::to_value(&*st).unwrap_or(Value::Null));
        json!({
            "configured": true,
            "address": self.cfg.address,
            "imap": self.cfg.imap.to_string(),
            "smtp": self.cfg.smtp.to_string(),
            "mailbox": self.cfg.mailbox,
            "allow": self.cfg.allow,
            "pending_answers": pending,
            "status": st,
        })
    }

    /// Starts the watcher and resumes answers recorded but not sent.
    pub fn start(
        self: &Arc<Self>,
        tasks: &mut tokio::task::JoinSet<()>,
        cancel: CancellationToken,
    ) {
        let password = match self.cfg.password(std::env::var(config::PASSWORD_ENV).ok()) {
            Ok(p) => p,
            Err(e) => {
                self.set_state(format!("not running: {e}"));
                self.fail(e);
                return;
            }
        };
        let sender = match smtp::Sender::new(&self.cfg, &password) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                self.set_state(format!("not running: {e}"));
                self.fail(e);
                return;
            }
        };
        match self.state.jobs() {
            Ok(jobs) => {
                for job in jobs {
                    tracing::info!(request = %job.rid, "resuming an email answer");
                    self.spawn_answer(job, sender.clone(), cancel.clone());
                }
            }
            Err(e) => self.fail(format!("cannot read pending answers: {e}")),
        }
        tasks.spawn(schedules::watch(
            self.clone(),
            sender.clone(),
            cancel.clone(),
        ));
        let this = self.clone();
        tasks.spawn(async move { this.watch(password, sender, cancel).await });
    }

    fn spawn_answer(
        self: &Arc<Self>,
        job: Job,
        sender: Arc<smtp::Sender>,
        cancel: CancellationToken,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = this.answer(job, &sender) => {}
                () = cancel.cancelled() => {}
            }
        });
    }

    /// Connects and watches the mailbox until `cancel`, reconnecting with back-off.
    async fn watch(
        self: Arc<Self>,
        password: String,
        sender: Arc<smtp::Sender>,
        cancel: CancellationToken,
    ) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            self.set_state("connecting");
            let r = tokio::select! {
                r = self.session(&password, &sender, &cancel, &mut backoff) => r,
                () = cancel.cancelled() => Ok(()),
            };
            match r {
                Ok(()) => {
                    self.set_state("stopped");
                    return;
                }
                Err(e) => {
                    self.fail(format!("IMAP {}: {e}", self.cfg.imap));
                    self.set_state(format!("reconnecting in {}s", backoff.as_secs()));
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = cancel.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One connection: catch up on new mail, then IDLE, until an error or `cancel`.
    async fn session(
        self: &Arc<Self>,
        password: &str,
        sender: &Arc<smtp::Sender>,
        cancel: &CancellationToken,
        backoff: &mut Duration,
    ) -> Result<(), String> {
        let (mut session, sel) = imap::connect(&self.cfg, password).await?;
        *backoff = FIRST_BACKOFF;
        let mut last = self.start_position(sel)?;
        tracing::info!(server = %self.cfg.imap, mailbox = %self.cfg.mailbox, uid_validity = sel.uid_validity, last_uid = last, "email: watching the mailbox");
        loop {
            self.set_state("fetching");
            for uid in imap::uids_after(&mut session, last).await? {
                let fetched = imap::fetch(&mut session, uid, self.cfg.max_message_bytes).await?;
                self.handle(sel.uid_validity, fetched, sender, cancel)
                    .await?;
                imap::mark_seen(&mut session, uid).await;
                last = uid;
                self.record_position(sel.uid_validity, last).await?;
            }
            self.set_state("idle");
            let (s, stopped) = imap::idle(session, self.cfg.idle, cancel.cancelled()).await?;
            session = s;
            if stopped {
                let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
                return Ok(());
            }
        }
    }

    /// Where to continue: the recorded UID if the mailbox is the same; otherwise (first
    /// start, or the mailbox was recreated) only mail that arrives from now on.
    fn start_position(&self, sel: imap::Selected) -> Result<u32, String> {
        let recorded = self.state.position().map_err(|e| e.to_string())?;
        let last = match recorded {
            Some(p) if p.uid_validity == sel.uid_validity => p.last_uid,
            Some(p) => {
                tracing::warn!(
                    old = p.uid_validity,
                    new = sel.uid_validity,
                    "email: UIDVALIDITY changed; continuing with new mail (mails already answered are recognised by their Message-ID)"
                );
                sel.uid_next.saturating_sub(1)
            }
            None => sel.uid_next.saturating_sub(1),
        };
        self.state
            .set_position(Position {
                uid_validity: sel.uid_validity,
                last_uid: last,
            })
            .map_err(|e| e.to_string())?;
        self.with_status(|st| {
            st.uid_validity = Some(sel.uid_validity);
            st.last_uid = Some(last);
        });
        Ok(last)
    }

    async fn record_position(&self, uid_validity: u32, last_uid: u32) -> Result<(), String> {
        self.state
            .set_position(Position {
                uid_validity,
                last_uid,
            })
            .map_err(|e| e.to_string())?;
        self.state.flush().await.map_err(|e| e.to_string())?;
        self.with_status(|st| st.last_uid = Some(last_uid));
        Ok(())
    }

    fn seen(&self, seen: Seen) {
        self.with_status(|st| st.last_message = Some(seen));
    }

    /// Handles one mail: ignore it, or record the answer to send and ask. Errors are store
    /// errors (the mail is then fetched again after reconnecting).
    async fn handle(
        self: &Arc<Self>,
        uid_validity: u32,
        f: imap::Fetched,
        sender: &Arc<smtp::Sender>,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        self.with_status(|st| st.received += 1);
        let Some(raw) = f.raw else {
            let outcome = format!("ignored: {} bytes, more than email.max_message_mb", f.size);
            tracing::info!(uid = f.uid, size = f.size, "email: mail too big, ignored");
            self.with_status(|st| st.ignored += 1);
            self.seen(Seen {
                uid: f.uid,
                at: now(),
                outcome,
                ..Seen::default()
            });
            return Ok(());
        };
        let m = parse::parse(&raw);
        let mut seen = Seen {
            uid: f.uid,
            from: m.from.clone(),
            subject: m.subject.clone(),
            message_id: m.message_id.clone(),
            at: now(),
            outcome: String::new(),
        };
        let ignore = |this: &Self, mut seen: Seen, why: String| {
            tracing::info!(uid = seen.uid, from = ?seen.from, subject = %seen.subject, reason = %why, "email: not answered");
            this.with_status(|st| st.ignored += 1);
            seen.outcome = format!("ignored: {why}");
            this.seen(seen);
        };
        if let Err(r) = policy::judge(&self.cfg, &m) {
            ignore(self, seen, r.to_string());
            return Ok(());
        }
        let from = m.from.clone().unwrap_or_default();
        let rid = state::request_id(m.message_id.as_deref(), uid_validity, f.uid);
        let err = |e: crate::store::StoreError| e.to_string();
        if self.state.was_sent(&rid).map_err(err)? || self.state.job(&rid).map_err(err)?.is_some() {
            ignore(self, seen, format!("already handled as request {rid}"));
            return Ok(());
        }
        let conversation = match self.thread_of(&m).await {
            Ok(c) => c,
            Err(e) => {
                self.fail(format!("cannot create a conversation for a mail: {e}"));
                return Err(e);
            }
        };
        let limit = self.cfg.replies_per_thread_per_hour;
        let recent = self
            .state
            .recent_answers(&conversation.to_string(), now())
            .map_err(err)?;
        if recent >= limit {
            // Still part of the thread: later mails that answer this one stay in it (and
            // under its limit).
            if let Some(id) = &m.message_id {
                self.state
                    .set_thread(id, &conversation.to_string())
                    .map_err(err)?;
                self.state.flush().await.map_err(err)?;
            }
            ignore(self, seen, policy::Refusal::RateLimited(recent).to_string());
            return Ok(());
        }
        let mut references = m.references.clone();
        if references.is_empty() {
            references.extend(m.in_reply_to.iter().cloned());
        }
        if let Some(id) = &m.message_id
            && !references.contains(id)
        {
            references.push(id.clone());
        }
        let job = Job {
            rid: rid.clone(),
            conversation: conversation.to_string(),
            prompt: m.prompt(),
            to: from,
            subject: smtp::reply_subject(&m.subject),
            in_reply_to: m.message_id.clone(),
            references,
            answer_id: state::answer_id(&rid, self.cfg.domain()),
            received_at: now(),
            attempts: 0,
            last_error: None,
        };
        self.state.put_job(&job).map_err(err)?;
        if let Some(id) = &m.message_id {
            self.state.set_thread(id, &job.conversation).map_err(err)?;
        }
        self.state.flush().await.map_err(err)?;
        tracing::info!(uid = f.uid, request = %rid, conversation = %conversation, "email: asking");
        self.with_status(|st| st.asked += 1);
        seen.outcome = format!("asked as request {rid}");
        self.seen(seen);
        self.spawn_answer(job, sender.clone(), cancel.clone());
        Ok(())
    }

    /// The conversation of a mail's thread, or a new one.
    async fn thread_of(&self, m: &parse::Incoming) -> Result<DocId, String> {
        let parents = m.parents();
        if let Some(c) = self
            .state
            .find_thread(&parents)
            .map_err(|e| e.to_string())?
            && let Ok(id) = c.parse::<DocId>()
            && self.asking.conversations().is_conversation(id)
        {
            return Ok(id);
        }
        let subject = if m.subject.is_empty() {
            "(no subject)"
        } else {
            &m.subject
        };
        self.asking
            .conversations()
            .create(&format!("email: {subject}"))
            .await
            .map_err(|e| e.to_string())
    }

    /// Makes sure the request is in its conversation (asks it again after a crash between
    /// recording and asking; the id is the same, so it is asked once).
    async fn ensure_asked(&self, job: &Job, doc: DocId) -> Result<(), String> {
        let rid = job.rid.clone();
        let present = self
            .asking
            .conversations()
            .read(doc, move |c| c.find_request(&rid).is_some())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if !present {
            self.asking
                .ask(
                    &job.prompt,
                    Some(doc),
                    Interface::Email,
                    Some(job.rid.clone()),
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Waits for the answer to `job` and mails it.
    async fn answer(self: Arc<Self>, mut job: Job, sender: &smtp::Sender) {
        let doc = match job.conversation.parse::<DocId>() {
            Ok(d) => d,
            Err(e) => {
                self.fail(format!("answer {}: bad conversation id: {e}", job.rid));
                return;
            }
        };
        let mut tries = 0u32;
        while let Err(e) = self.ensure_asked(&job, doc).await {
            tries += 1;
            self.fail(format!("cannot ask request {}: {e}", job.rid));
            tokio::time::sleep(FIRST_BACKOFF.saturating_mul(1 << tries.min(6))).await;
        }
        let mut events = std::pin::pin!(self.asking.follow(doc, job.rid.clone()));
        let mut text = None;
        while let Some(ev) = events.next().await {
            match ev {
                RequestEvent::Done { text: t, note, .. } => {
                    text = Some(match note {
                        Some(n) if !n.is_empty() => format!("{t}\n\n({n})"),
                        _ => t,
                    });
                    break;
                }
                RequestEvent::Failed { error, .. } => {
                    text = Some(format!("Sorry, I could not answer this mail: {error}"));
                    break;
                }
                _ => {}
            }
        }
        let Some(text) = text else { return };
        let (attachments, skipped) = collect_files(
            &self.workspaces.join(&job.conversation),
            job.received_at,
            self.cfg.max_attachment_bytes,
        );
        let mut text = text;
        if !skipped.is_empty() {
            text.push_str(&format!(
                "\n\n(not attached, over the size limit: {})",
                skipped.join(", ")
            ));
        }
        let answer = smtp::Answer {
            from: self.cfg.address.clone(),
            to: job.to.clone(),
            subject: job.subject.clone(),
            message_id: job.answer_id.clone(),
            in_reply_to: job.in_reply_to.clone(),
            references: job.references.clone(),
            text,
            attachments,
        };
        let msg = match smtp::build(&answer) {
            Ok(m) => m,
            Err(e) => {
                self.fail(format!("answer {}: {e}", job.rid));
                let _ = self.state.sent(&job, now()).await;
                return;
            }
        };
        loop {
            match sender.send(msg.clone()).await {
                Ok(()) => {
                    if let Err(e) = self.state.sent(&job, now()).await {
                        self.fail(format!("answer {} sent but not recorded: {e}", job.rid));
                    }
                    tracing::info!(request = %job.rid, to = %job.to, message_id = %job.answer_id, "email: answer sent");
                    self.with_status(|st| st.answered += 1);
                    return;
                }
                Err(e) => {
                    job.attempts += 1;
                    job.last_error = Some(e.message.clone());
                    self.fail(format!(
                        "SMTP {} (answer {}, attempt {}): {}",
                        self.cfg.smtp, job.rid, job.attempts, e.message
                    ));
                    if e.permanent || job.attempts >= MAX_SEND_ATTEMPTS {
                        // Given up: recorded as handled so no restart sends it later.
                        let _ = self.state.sent(&job, now()).await;
                        return;
                    }
                    let _ = self.state.put_job(&job);
                    let _ = self.state.flush().await;
                    tokio::time::sleep(FIRST_BACKOFF.saturating_mul(1 << job.attempts.min(6)))
                        .await;
                }
            }
        }
    }
}

/// The files in `dir` changed at or after `since` (unix seconds), biggest total `cap`
/// bytes; also the names of the files left out for size.
pub fn collect_files(dir: &Path, since: u64, cap: u64) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            let path = e.path();
            if meta.is_dir() {
                if found.len() < 1000 {
                    stack.push(path);
                }
                continue;
            }
            if !meta.is_file() {
                continue;
            }
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            if modified < since {
                continue;
            }
            let name = path
                .strip_prefix(dir)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            found.push((name, path, meta.len()));
        }
    }
    found.sort();
    let (mut files, mut skipped, mut total) = (Vec::new(), Vec::new(), 0u64);
    for (name, path, len) in found {
        if total + len > cap {
            skipped.push(name);
            continue;
        }
        match std::fs::read(&path) {
            Ok(bytes) => {
                total += bytes.len() as u64;
                files.push((name, bytes));
            }
            Err(_) => skipped.push(name),
        }
    }
    (files, skipped)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn files_since_the_mail_are_attached_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        std::fs::write(dir.path().join("a.txt"), b"aaaa").unwrap();
        std::fs::write(dir.path().join("out/b.txt"), b"bb").unwrap();
        std::fs::write(dir.path().join("big.bin"), vec![0u8; 100]).unwrap();
        let (files, skipped) = collect_files(dir.path(), 0, 10);
        let names: Vec<_> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["a.txt", "out/b.txt"]);
        assert_eq!(skipped, vec!["big.bin"]);
        let (files, _) = collect_files(dir.path(), u64::MAX, 10);
        assert!(files.is_empty(), "older files are not the answer's");
        let (files, skipped) = collect_files(&dir.path().join("missing"), 0, 10);
        assert!(files.is_empty() && skipped.is_empty());
    }
}
