//! Compaction: when a conversation outgrows the model's window, its older turns are folded
//! into a summary that a model call writes (pure planning; the runner makes the call and
//! stores the summary in the conversation document, so every device sees what the model
//! now knows).
//!
//! A request is sent as: the latest summary (if any) in front of the first user message, then
//! every answered request after the summary with its answer, then the request itself. When
//! the estimate of that, plus the system prompt, the tools and `max_tokens` of room for the
//! answer, passes the window, [`plan`] picks the oldest turns to fold so that the newest
//! turns left take at most half of the room; the summary call gets the earlier summary and
//! those turns as a transcript (its oldest part cut if even that would not fit).

use iom_crdt::{MessageView, Role as MsgRole, Status, SummaryView};

use super::claude::{ContentBlock, Message, MessagesRequest, Role};

/// The system prompt of a summary call.
pub const SYSTEM: &str = "You summarize the conversation so far between a person and their \
assistant, so the assistant can go on without the full transcript. Keep every fact, decision, \
name, number, file and open question that later turns may need; leave out pleasantries. Write \
plain prose or short bullet points, in the conversation's language, and nothing else.";

/// What is put in front of the summary in the first user message.
pub const SUMMARY_HEADING: &str = "[Summary of the earlier conversation]";

/// Tokens kept free in the window for what the estimate misses (the request's framing).
pub const MARGIN: u64 = 64;

/// An answered request and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// The request id.
    pub rid: String,
    /// The request text.
    pub user: String,
    /// The answer text.
    pub assistant: String,
}

/// What the model is sent for a request, before compaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Context {
    /// The latest summary.
    pub summary: Option<SummaryView>,
    /// The answered requests after the summary, oldest first.
    pub pairs: Vec<Pair>,
    /// The request being answered (`None` if it is not in the conversation).
    pub current: Option<String>,
}

/// A generous token estimate of `text` (3 bytes a token, and a few for framing).
pub fn estimate(text: &str) -> u64 {
    (text.len() as u64).div_ceil(3) + 4
}

impl Context {
    /// The context of request `rid`: each earlier request that was answered (after `summary`'s
    /// `through` request, if given) with its answer, found by `reply_to`, so requests queued
    /// together pair up right. Requests without an answer are left out, so user and assistant
    /// messages alternate.
    pub fn of(messages: &[MessageView], summary: Option<SummaryView>, rid: &str) -> Context {
        let mut ctx = Context::default();
        let mut after_summary = summary.is_none();
        for m in messages.iter().filter(|m| m.role == MsgRole::User) {
            if m.request_id.as_deref() == Some(rid) {
                ctx.current = Some(m.text.clone());
                break;
            }
            if !after_summary {
                after_summary = summary
                    .as_ref()
                    .is_some_and(|s| m.request_id.as_deref() == Some(s.through.as_str()));
                continue;
            }
            if m.status != Some(Status::Done) {
                continue;
            }
            let answer = messages.iter().rev().find(|a| {
                a.role == MsgRole::Assistant && a.reply_to.is_some() && a.reply_to == m.request_id
            });
            if let (Some(a), Some(rid)) = (answer, &m.request_id) {
                ctx.pairs.push(Pair {
                    rid: rid.clone(),
                    user: m.text.clone(),
                    assistant: a.text.clone(),
                });
            }
        }
        ctx.summary = summary;
        ctx
    }

    /// The estimated tokens of the messages.
    pub fn tokens(&self) -> u64 {
        let summary = self
            .summary
            .as_ref()
            .map_or(0, |s| estimate(SUMMARY_HEADING) + estimate(&s.text));
        let pairs: u64 = self
            .pairs
            .iter()
            .map(|p| estimate(&p.user) + estimate(&p.assistant))
            .sum();
        summary + pairs + self.current.as_deref().map_or(0, estimate)
    }

    /// The model messages: the summary in front of the first user message, the pairs, the
    /// request.
    pub fn messages(&self) -> Vec<Message> {
        let mut out = Vec::with_capacity(self.pairs.len() * 2 + 1);
        for p in &self.pairs {
            out.push(Message::user(p.user.clone()));
            out.push(Message::assistant(p.assistant.clone()));
        }
        if let Some(current) = &self.current {
            out.push(Message::user(current.clone()));
        }
        if let (Some(s), Some(first)) = (&self.summary, out.first_mut()) {
            let text = first.content.text();
            first.content = super::claude::Content::Blocks(vec![
                ContentBlock::text(format!("{SUMMARY_HEADING}\n{}\n[End of summary]", s.text)),
                ContentBlock::text(text),
            ]);
        }
        out
    }
}

/// What a request may spend on messages: the window less the answer's room, the system
/// prompt, the tools and a [`MARGIN`].
pub fn room(window: u64, max_tokens: u64, system: Option<&str>, tools: &serde_json::Value) -> u64 {
    let fixed = MessagesRequest {
        system: system.map(str::to_string),
        tools: Some(tools.clone()),
        ..MessagesRequest::default()
    }
    .estimated_input_tokens();
    window
        .saturating_sub(max_tokens)
        .saturating_sub(fixed)
        .saturating_sub(MARGIN)
}

/// How many of the oldest pairs to fold into a new summary so the context fits `room`: 0 if
/// it fits already (or there is nothing to fold). The newest pairs kept take at most half of
/// the room, leaving the rest for the new summary and the request.
pub fn plan(ctx: &Context, room: u64) -> usize {
    if ctx.tokens() <= room || ctx.pairs.is_empty() {
        return 0;
    }
    let mut kept = 0u64;
    let mut keep = 0usize;
    for p in ctx.pairs.iter().rev() {
        let t = estimate(&p.user) + estimate(&p.assistant);
        if kept + t > room / 2 {
            break;
        }
        kept += t;
        keep += 1;
    }
    ctx.pairs.len() - keep
}

/// The summary call for folding `fold` pairs of `ctx`: the earlier summary and those turns as
/// a transcript, cut from the front to fit `window` with `max_tokens` for the summary.
pub fn summary_request(
    ctx: &Context,
    fold: usize,
    window: u64,
    max_tokens: u32,
) -> MessagesRequest {
    let mut transcript = String::new();
    if let Some(s) = &ctx.summary {
        transcript.push_str("Summary of the conversation before these turns:\n");
        transcript.push_str(&s.text);
        transcript.push_str("\n\n");
    }
    for p in ctx.pairs.iter().take(fold) {
        transcript.push_str("Person: ");
        transcript.push_str(&p.user);
        transcript.push_str("\nAssistant: ");
        transcript.push_str(&p.assistant);
        transcript.push_str("\n\n");
    }
    let fixed = estimate(SYSTEM) + MARGIN + u64::from(max_tokens) + 32;
    let max_bytes =
        usize::try_from(window.saturating_sub(fixed).saturating_mul(3)).unwrap_or(usize::MAX);
    if transcript.len() > max_bytes {
        let mut cut = transcript.len() - max_bytes;
        while !transcript.is_char_boundary(cut) {
            cut += 1;
        }
        transcript = format!("[…]{}", &transcript[cut..]);
    }
    MessagesRequest {
        system: Some(SYSTEM.to_string()),
        messages: vec![Message::user(format!(
            "Summarize the conversation so far:\n\n{transcript}"
        ))],
        tools: None,
        model: None,
        max_tokens: Some(max_tokens),
    }
}

/// Whether `m` is a plain user message (the API wants a conversation to start with one).
pub fn is_plain_user(m: &Message) -> bool {
    m.role == Role::User && !m.content.has_tool_results()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, role: MsgRole, text: &str, reply_to: Option<&str>) -> MessageView {
        MessageView {
            index: 0,
            id: id.into(),
            role,
            text: text.into(),
            status: (role == MsgRole::User).then_some(Status::Done),
            error: None,
            interface: None,
            device: None,
            created_at: None,
            request_id: (role == MsgRole::User).then(|| id.to_string()),
            claimed_by: None,
            reply_to: reply_to.map(str::to_string),
            tool_calls: Vec::new(),
            usage: None,
            model: None,
            progress: None,
            attachments: Vec::new(),
        }
    }

    fn conversation(n: usize, size: usize) -> Vec<MessageView> {
        let mut out = Vec::new();
        for i in 0..n {
            let rid = format!("r{i}");
            out.push(msg(
                &rid,
                MsgRole::User,
                &format!("q{i} {}", "x".repeat(size)),
                None,
            ));
            out.push(msg(
                &format!("{rid}/reply0"),
                MsgRole::Assistant,
                &format!("a{i} {}", "y".repeat(size)),
                Some(&rid),
            ));
        }
        let mut last = msg("now", MsgRole::User, "the question", None);
        last.status = Some(Status::Running);
        out.push(last);
        out
    }

    fn summary(through: &str, text: &str) -> SummaryView {
        SummaryView {
            index: 0,
            text: text.into(),
            through: through.into(),
            requests: 1,
            model: None,
            device: None,
            created_at: None,
            usage: Default::default(),
        }
    }

    #[test]
    fn a_small_conversation_is_sent_whole() {
        let m = conversation(3, 10);
        let ctx = Context::of(&m, None, "now");
        assert_eq!(ctx.pairs.len(), 3);
        assert_eq!(plan(&ctx, 10_000), 0);
        let msgs = ctx.messages();
        assert_eq!(msgs.len(), 7);
        assert_eq!(msgs[6], Message::user("the question"));
        assert!(msgs.first().is_some_and(is_plain_user));
    }

    #[test]
    fn folds_the_oldest_turns_and_keeps_the_newest_within_half_the_room() {
        let m = conversation(10, 300);
        let ctx = Context::of(&m, None, "now");
        let room = 1000;
        assert!(ctx.tokens() > room);
        let fold = plan(&ctx, room);
        assert!(fold > 0 && fold < 10, "{fold}");
        let kept: u64 = ctx.pairs[fold..]
            .iter()
            .map(|p| estimate(&p.user) + estimate(&p.assistant))
            .sum();
        assert!(kept <= room / 2);
        // The summary call carries the folded turns, and fits its window.
        let req = summary_request(&ctx, fold, 10_000, 200);
        let text = req.messages[0].content.text();
        assert!(
            text.contains("q0 ") && !text.contains(&format!("q{fold} ")),
            "{fold}"
        );
        assert!(!text.contains("[…]"));
        assert!(req.estimated_input_tokens() + 200 <= 10_000);
        // A tiny window cuts the transcript from the front.
        let req = summary_request(&ctx, fold, 600, 100);
        assert!(
            req.estimated_input_tokens() + 100 <= 600,
            "{}",
            req.estimated_input_tokens()
        );
        assert!(req.messages[0].content.text().contains("[…]"));
    }

    #[test]
    fn a_summary_replaces_the_turns_it_covers() {
        let m = conversation(4, 10);
        let ctx = Context::of(&m, Some(summary("r1", "they talked about x")), "now");
        assert_eq!(
            ctx.pairs.iter().map(|p| p.rid.as_str()).collect::<Vec<_>>(),
            ["r2", "r3"]
        );
        let msgs = ctx.messages();
        assert_eq!(msgs.len(), 5);
        let first = msgs[0].content.text();
        assert!(first.starts_with(SUMMARY_HEADING) && first.contains("they talked about x"));
        assert!(first.ends_with(&format!("q2 {}", "x".repeat(10))));
        // With only the request left, the summary goes in front of it.
        let ctx = Context::of(&m, Some(summary("r3", "all of it")), "now");
        assert!(ctx.pairs.is_empty());
        let msgs = ctx.messages();
        assert_eq!(msgs.len(), 1);
        assert!(msgs[0].content.text().ends_with("the question"));
        // Nothing to fold: the plan is empty even over the room.
        assert_eq!(plan(&ctx, 1), 0);
    }
}
