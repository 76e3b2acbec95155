//! Prompt-caching breakpoints for a Messages API request (pure).
//!
//! The API caches the request prefix up to a block marked with `cache_control`, in the fixed
//! order tools, system, messages; a later request with the same prefix reads it at a tenth of
//! the input price. The agent sends its parts in a stable order (the tool definitions, then the
//! system prompt with the memory, then the conversation), and [`add_breakpoints`] marks three
//! places:
//!
//! 1. the last tool definition (the tools rarely change),
//! 2. the last system block (the memory changes now and then),
//! 3. the last content block of the last message (the conversation so far: the next turn of
//!    the tool loop, or the next request, reads everything up to here).
//!
//! That is at most [`MAX_BREAKPOINTS`] (the API's limit is 4), and only on the block kinds
//! the API accepts: tool definitions, non-empty system text blocks, and message blocks of the
//! types `text`, `image`, `document`, `tool_use` and `tool_result`.

use serde_json::{Value, json};

/// Most `cache_control` markers the API accepts in one request.
pub const MAX_BREAKPOINTS: usize = 4;

/// Message block types that may carry `cache_control`.
pub const CACHEABLE_BLOCKS: &[&str] = &["text", "image", "document", "tool_use", "tool_result"];

fn marker() -> Value {
    json!({"type": "ephemeral"})
}

/// Marks the breakpoints (see the module docs) in `wire`, a Messages API request body. A
/// string `system` or message `content` becomes a one-block list so it can carry the marker.
/// Markers already present are left alone and counted, so the total never exceeds
/// [`MAX_BREAKPOINTS`].
pub fn add_breakpoints(wire: &mut Value) {
    let mut budget = MAX_BREAKPOINTS.saturating_sub(count_breakpoints(wire));
    let mut mark = |block: &mut Value| {
        if budget > 0 && block.get("cache_control").is_none() && block.is_object() {
            block["cache_control"] = marker();
            budget -= 1;
        }
    };
    if let Some(last) = wire
        .get_mut("tools")
        .and_then(Value::as_array_mut)
        .and_then(|t| t.last_mut())
    {
        mark(last);
    }
    if let Some(system) = wire.get_mut("system") {
        if let Some(text) = system.as_str().filter(|t| !t.is_empty()) {
            *system = json!([{"type": "text", "text": text}]);
        }
        if let Some(last) = system
            .as_array_mut()
            .and_then(|b| b.last_mut())
            .filter(|b| cacheable(b))
        {
            mark(last);
        }
    }
    if let Some(message) = wire
        .get_mut("messages")
        .and_then(Value::as_array_mut)
        .and_then(|m| m.last_mut())
    {
        let content = &mut message["content"];
        if let Some(text) = content.as_str().filter(|t| !t.is_empty()) {
            *content = json!([{"type": "text", "text": text}]);
        }
        if let Some(last) = content
            .as_array_mut()
            .and_then(|b| b.last_mut())
            .filter(|b| cacheable(b))
        {
            mark(last);
        }
    }
}

/// Whether a system or message block may carry `cache_control`.
pub fn cacheable(block: &Value) -> bool {
    let kind = block["type"].as_str().unwrap_or_default();
    if !CACHEABLE_BLOCKS.contains(&kind) {
        return false;
    }
    // The API refuses markers on empty text blocks.
    kind != "text" || block["text"].as_str().is_some_and(|t| !t.is_empty())
}

/// The `cache_control` markers in a request body (tools, system blocks, message blocks).
pub fn count_breakpoints(wire: &Value) -> usize {
    let has = |b: &Value| b.get("cache_control").is_some();
    let tools = wire["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| has(b));
    let system = wire["system"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| has(b));
    let messages = wire["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|b| has(b));
    tools.count() + system.count() + messages.count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_tools_system_and_the_last_message() {
        let mut wire = json!({
            "tools": [{"name": "a", "input_schema": {}}, {"name": "b", "input_schema": {}}],
            "system": "memory",
            "messages": [
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"},
            ],
        });
        add_breakpoints(&mut wire);
        assert_eq!(count_breakpoints(&wire), 3);
        assert!(wire["tools"][0].get("cache_control").is_none());
        assert_eq!(wire["tools"][1]["cache_control"], marker());
        assert_eq!(
            wire["system"],
            json!([{"type": "text", "text": "memory", "cache_control": marker()}])
        );
        assert_eq!(wire["messages"][0]["content"], "q1");
        assert_eq!(
            wire["messages"][2]["content"],
            json!([{"type": "text", "text": "q2", "cache_control": marker()}])
        );
        // A second pass adds nothing more than the limit allows.
        add_breakpoints(&mut wire);
        assert_eq!(count_breakpoints(&wire), 3);
    }

    #[test]
    fn never_more_than_four_and_only_on_allowed_blocks() {
        let mut wire = json!({
            "system": [{"type": "text", "text": "s", "cache_control": marker()}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "a", "cache_control": marker()},
                    {"type": "text", "text": "b", "cache_control": marker()},
                    {"type": "text", "text": "c", "cache_control": marker()},
                ]},
            ],
            "tools": [{"name": "t", "input_schema": {}}],
        });
        add_breakpoints(&mut wire);
        assert_eq!(count_breakpoints(&wire), 4);
        assert!(wire["tools"][0].get("cache_control").is_none());

        // An empty system string, a thinking block and an empty text get no marker.
        let mut wire = json!({
            "system": "",
            "messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "x"}]}],
        });
        add_breakpoints(&mut wire);
        assert_eq!(count_breakpoints(&wire), 0);
        assert_eq!(wire["system"], "");
        assert!(!cacheable(&json!({"type": "text", "text": ""})));
        assert!(cacheable(
            &json!({"type": "tool_result", "tool_use_id": "x"})
        ));
    }
}
