//! Fitting a long conversation into a size budget (pure).

use super::types::{Content, ContentBlock, Message, Role};

/// Whether a conversation may start at this message: a user message that holds no tool
/// results (a `tool_result` needs the assistant `tool_use` before it).
fn can_start(m: &Message) -> bool {
    m.role == Role::User && !m.content.has_tool_results()
}

/// Keeps the newest messages whose total size (characters of text, tool inputs and tool
/// results) fits `budget_chars`, and marks the cut with a note.
///
/// - The result always starts with a user message that holds no tool results, so the API
///   accepts it. If the newest messages that fit do not start that way, more messages are
///   dropped; if no such start exists inside the budget at all, the newest valid start is
///   kept even though it exceeds the budget (the latest request must be sent).
/// - When messages are dropped, the text block `"[N earlier messages omitted]"` is put in
///   front of the first kept message's content. The note is not counted in the budget.
/// - A history with no valid start (no plain user message) is returned unchanged.
pub fn fit_history(messages: Vec<Message>, budget_chars: usize) -> Vec<Message> {
    let sizes: Vec<usize> = messages.iter().map(|m| m.content.char_len()).collect();
    // Smallest start index whose suffix fits the budget.
    let mut total = 0usize;
    let mut fit_start = messages.len();
    for (i, size) in sizes.iter().enumerate().rev() {
        total = total.saturating_add(*size);
        if total > budget_chars {
            break;
        }
        fit_start = i;
    }
    let start = (fit_start..messages.len())
        .find(|&i| can_start(&messages[i]))
        .or_else(|| (0..fit_start).rev().find(|&i| can_start(&messages[i])));
    let Some(start) = start else {
        return messages;
    };
    if start == 0 {
        return messages;
    }
    let mut kept: Vec<Message> = messages.into_iter().skip(start).collect();
    if let Some(first) = kept.first_mut() {
        let note = ContentBlock::text(format!("[{start} earlier messages omitted]"));
        let mut blocks = vec![note];
        blocks.extend(first.content.to_blocks());
        first.content = Content::Blocks(blocks);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool_use(id: &str) -> Message {
        Message::blocks(
            Role::Assistant,
            vec![ContentBlock::ToolUse {
                id: id.into(),
                name: "bash".into(),
                input: serde_json::json!({}),
            }],
        )
    }

    fn tool_result(id: &str, content: &str) -> Message {
        Message::blocks(
            Role::User,
            vec![ContentBlock::ToolResult {
                tool_use_id: id.into(),
                content: content.into(),
                is_error: false,
            }],
        )
    }

    fn note_of(m: &Message) -> Option<String> {
        match &m.content {
            Content::Blocks(b) => match b.first() {
                Some(ContentBlock::Text { text }) if text.starts_with('[') => Some(text.clone()),
                _ => None,
            },
            Content::Text(_) => None,
        }
    }

    #[test]
    fn everything_fits_is_unchanged() {
        let h = vec![
            Message::user("hi"),
            Message::assistant("hello"),
            Message::user("q"),
        ];
        assert_eq!(fit_history(h.clone(), 1000), h);
        assert_eq!(fit_history(Vec::new(), 10), Vec::<Message>::new());
    }

    #[test]
    fn keeps_newest_within_budget_with_note() {
        let h = vec![
            Message::user("aaaaaaaaaa"),
            Message::assistant("bbbbbbbbbb"),
            Message::user("cccccccccc"),
            Message::assistant("dddddddddd"),
            Message::user("eeeee"),
        ];
        // 25 chars fit the last three messages.
        let out = fit_history(h, 25);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].role, Role::User);
        assert_eq!(
            note_of(&out[0]).as_deref(),
            Some("[2 earlier messages omitted]")
        );
        assert_eq!(
            out[0].content.text(),
            "[2 earlier messages omitted]cccccccccc"
        );
        assert_eq!(out[2], Message::user("eeeee"));
    }

    #[test]
    fn never_starts_with_assistant_or_tool_result() {
        let h = vec![
            Message::user("first question"),
            tool_use("t1"),
            tool_result("t1", "a long tool output ....................."),
            Message::assistant("answer"),
            Message::user("next"),
        ];
        // The budget fits the tool result onward, but it cannot start there.
        let out = fit_history(h.clone(), 60);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].content.text(), "[4 earlier messages omitted]next");

        // Only a tool result is at the end and the budget is tiny: go back to a valid start.
        let h2 = vec![
            Message::user("old"),
            Message::assistant("x"),
            Message::user("do it"),
            tool_use("t2"),
            tool_result("t2", "out"),
        ];
        let out = fit_history(h2, 3);
        assert_eq!(out.len(), 3);
        assert!(can_start(&out[0]));
        assert_eq!(
            note_of(&out[0]).as_deref(),
            Some("[2 earlier messages omitted]")
        );
    }

    #[test]
    fn newest_message_is_kept_even_over_budget() {
        let h = vec![
            Message::user("aaa"),
            Message::assistant("b"),
            Message::user("x".repeat(100)),
        ];
        let out = fit_history(h, 10);
        assert_eq!(out.len(), 1);
        assert!(out[0].content.text().ends_with(&"x".repeat(100)));
    }

    #[test]
    fn history_without_plain_user_message_is_unchanged() {
        let h = vec![tool_use("t"), tool_result("t", "r")];
        assert_eq!(fit_history(h.clone(), 1), h);
    }
}
