//! The request: our provider-neutral [`MessagesRequest`] (Anthropic-shaped) as an
//! OpenAI-compatible chat completion request (pure).
//!
//! - the system prompt becomes a `system` message;
//! - a user message's `tool_result` blocks become `tool` messages (one per result, in order),
//!   its text a `user` message; with image blocks that message's content is a list of parts,
//!   the text then each image as an `image_url` with a `data:` URL (PDF blocks are not sent:
//!   the client does not accept them, so they stay in the workspace);
//! - an assistant message's `tool_use` blocks become `tool_calls` (arguments as a JSON string),
//!   its text the `content`;
//! - tools `{name, description, input_schema}` become `{type: function, function: {name,
//!   description, parameters}}`.
//!
//! No tool id is ever null or empty (llama-server answers 500 to that): a missing one is
//! replaced by `call_N`.

use serde_json::{Value, json};

use crate::agent::claude::client::reply_cap;
use crate::agent::claude::{Content, ContentBlock, Message, MessagesRequest, Role};
use crate::agent::tool_choice::{self, Mode};

/// What the client adds to every request.
#[derive(Debug, Clone, Copy)]
pub struct WireOptions<'a> {
    /// Model name.
    pub model: &'a str,
    /// `max_tokens` when the request does not set it.
    pub max_tokens: u32,
    /// The provider's `tool_choice` setting.
    pub tool_choice: Option<&'a str>,
}

fn tool_id(id: &str, n: usize) -> String {
    if id.trim().is_empty() {
        format!("call_{n}")
    } else {
        id.to_owned()
    }
}

/// The messages, translated.
pub fn messages(system: Option<&str>, history: &[Message]) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(s) = system.filter(|s| !s.is_empty()) {
        out.push(json!({"role": "system", "content": s}));
    }
    let mut n = 0usize;
    for m in history {
        let blocks = match &m.content {
            Content::Text(t) => vec![ContentBlock::text(t.clone())],
            Content::Blocks(b) => b.clone(),
        };
        match m.role {
            Role::User => {
                let mut text = String::new();
                let mut images = Vec::new();
                for b in blocks {
                    match b {
                        ContentBlock::Text { text: t } => text.push_str(&t),
                        ContentBlock::Image { source } => images.push(json!({
                            "type": "image_url",
                            "image_url": {
                                "url": format!("data:{};base64,{}", source.media_type, source.data)
                            },
                        })),
                        ContentBlock::ToolResult {
                            tool_use_id,
                            content,
                            is_error,
                        } => {
                            n += 1;
                            let content = if is_error {
                                format!("error: {content}")
                            } else {
                                content
                            };
                            out.push(json!({
                                "role": "tool",
                                "tool_call_id": tool_id(&tool_use_id, n),
                                "content": content,
                            }));
                        }
                        ContentBlock::ToolUse { .. } | ContentBlock::Document { .. } => {}
                    }
                }
                if !images.is_empty() {
                    let mut parts = Vec::with_capacity(images.len() + 1);
                    if !text.is_empty() {
                        parts.push(json!({"type": "text", "text": text}));
                    }
                    parts.extend(images);
                    out.push(json!({"role": "user", "content": parts}));
                } else if !text.is_empty() {
                    out.push(json!({"role": "user", "content": text}));
                }
            }
            Role::Assistant => {
                let mut text = String::new();
                let mut calls = Vec::new();
                for b in blocks {
                    match b {
                        ContentBlock::Text { text: t } => text.push_str(&t),
                        ContentBlock::ToolUse { id, name, input } => {
                            n += 1;
                            calls.push(json!({
                                "id": tool_id(&id, n),
                                "type": "function",
                                "function": {"name": name, "arguments": arguments(&input)},
                            }));
                        }
                        ContentBlock::ToolResult { .. }
                        | ContentBlock::Image { .. }
                        | ContentBlock::Document { .. } => {}
                    }
                }
                let mut msg = json!({"role": "assistant", "content": text});
                if !calls.is_empty() {
                    msg["tool_calls"] = Value::Array(calls);
                }
                out.push(msg);
            }
        }
    }
    out
}

/// A tool input as the `arguments` string. Input that was not valid JSON when it arrived is
/// kept as the raw string it was.
fn arguments(input: &Value) -> String {
    match input {
        Value::String(raw) => raw.clone(),
        other => other.to_string(),
    }
}

/// Tool definitions, translated (entries without a name are dropped).
pub fn tools(defs: &Value) -> Vec<Value> {
    defs.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    let name = t.get("name")?.as_str()?;
                    let params = t
                        .get("input_schema")
                        .cloned()
                        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                    let mut f = json!({"name": name, "parameters": params});
                    if let Some(d) = t.get("description") {
                        f["description"] = d.clone();
                    }
                    Some(json!({"type": "function", "function": f}))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The whole request body (`stream: true`, usage in the last chunk), and the tools a call
/// forced by schema must name (`None` for every other call; see [`tool_choice`]).
pub fn request(req: &MessagesRequest, opts: WireOptions<'_>) -> (Value, Option<Vec<String>>) {
    let defs = req
        .tools
        .as_ref()
        .filter(|t| t.as_array().is_some_and(|a| !a.is_empty()));
    let forced = defs.and_then(|_| tool_choice::forced(opts.tool_choice, &req.messages));
    let defs = match (defs, forced) {
        (Some(defs), Some((Some(name), _))) => Some(tool_choice::only_tool(defs, name)),
        (defs, _) => defs.cloned(),
    };
    let by_schema = matches!(forced, Some((_, Mode::Schema)));
    let system = match (&defs, by_schema) {
        (Some(defs), true) => {
            let prompt = tool_choice::call_prompt(defs);
            Some(match req.system.as_deref().filter(|s| !s.is_empty()) {
                Some(system) => format!("{system}\n\n{prompt}"),
                None => prompt,
            })
        }
        _ => req.system.clone(),
    };
    let mut body = json!({
        "model": req.model.as_deref().unwrap_or(opts.model),
        "max_tokens": reply_cap(req.max_tokens, opts.max_tokens),
        "messages": messages(system.as_deref(), &req.messages),
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let Some(defs) = defs else {
        return (body, None);
    };
    if by_schema {
        body["response_format"] = json!({
            "type": "json_schema",
            "json_schema": {"name": "tool_call", "schema": tool_choice::call_schema(&defs)},
        });
        return (body, Some(tool_choice::names(&defs)));
    }
    body["tools"] = Value::Array(tools(&defs));
    match forced {
        Some((_, Mode::Required)) => body["tool_choice"] = json!("required"),
        Some((_, Mode::None)) => body["tool_choice"] = json!("none"),
        _ => {}
    }
    (body, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> WireOptions<'static> {
        WireOptions {
            model: "m",
            max_tokens: 100,
            tool_choice: None,
        }
    }

    #[test]
    fn an_image_block_becomes_an_image_url_part_after_the_text() {
        use crate::agent::claude::MediaSource;
        let history = vec![Message::blocks(
            Role::User,
            vec![
                ContentBlock::text("what is this?"),
                ContentBlock::Image {
                    source: MediaSource::base64("image/png", "AAAA".into()),
                },
                ContentBlock::Document {
                    source: MediaSource::base64("application/pdf", "BBBB".into()),
                    title: None,
                },
            ],
        )];
        let msgs = messages(None, &history);
        assert_eq!(
            msgs,
            vec![json!({"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ]})]
        );
    }

    #[test]
    fn translates_a_tool_round_trip() {
        let history = vec![
            Message::user("list files"),
            Message::blocks(
                Role::Assistant,
                vec![
                    ContentBlock::text("Let me look."),
                    ContentBlock::ToolUse {
                        id: String::new(),
                        name: "bash".into(),
                        input: json!({"command": "ls"}),
                    },
                ],
            ),
            Message::blocks(
                Role::User,
                vec![ContentBlock::ToolResult {
                    tool_use_id: String::new(),
                    content: "a.txt".into(),
                    is_error: false,
                }],
            ),
        ];
        let req = MessagesRequest {
            system: Some("be brief".into()),
            messages: history,
            tools: Some(
                json!([{"name": "bash", "description": "run", "input_schema":
                {"type": "object", "properties": {"command": {"type": "string"}}}}]),
            ),
            ..MessagesRequest::default()
        };
        let (body, by_schema) = request(&req, opts());
        assert_eq!(by_schema, None);
        let msgs = body["messages"].as_array().cloned().unwrap_or_default();
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(msgs[1], json!({"role": "user", "content": "list files"}));
        assert_eq!(msgs[2]["tool_calls"][0]["id"], "call_1");
        assert_eq!(
            msgs[2]["tool_calls"][0]["function"]["arguments"],
            "{\"command\":\"ls\"}"
        );
        assert_eq!(msgs[3]["role"], "tool");
        assert_eq!(msgs[3]["tool_call_id"], "call_2");
        assert_eq!(body["tools"][0]["function"]["name"], "bash");
        assert_eq!(body["tools"][0]["function"]["parameters"]["type"], "object");
        assert_eq!(body["stream"], true);
        assert!(body.get("tool_choice").is_none());
    }

    #[test]
    fn a_named_tool_choice_offers_that_tool_then_asks_for_an_answer() {
        let tools = json!([{"name": "bash", "input_schema": {}}, {"name": "read_file"}]);
        let mut req = MessagesRequest {
            messages: vec![Message::user("go")],
            tools: Some(tools),
            ..MessagesRequest::default()
        };
        let o = WireOptions {
            tool_choice: Some("tool:bash"),
            ..opts()
        };
        let (body, _) = request(&req, o);
        assert_eq!(body["tool_choice"], "required");
        assert_eq!(body["tools"].as_array().map(Vec::len), Some(1));
        req.messages.push(Message::blocks(
            Role::User,
            vec![ContentBlock::ToolResult {
                tool_use_id: "c".into(),
                content: "ok".into(),
                is_error: true,
            }],
        ));
        let (body, _) = request(&req, o);
        assert_eq!(body["tool_choice"], "none");
        assert_eq!(body["tools"].as_array().map(Vec::len), Some(2));
        assert_eq!(body["messages"][1]["content"], "error: ok");
    }

    #[test]
    fn the_providers_max_tokens_caps_the_request() {
        let mut req = MessagesRequest {
            messages: vec![Message::user("go")],
            max_tokens: Some(4096),
            ..MessagesRequest::default()
        };
        let small = WireOptions {
            max_tokens: 32,
            ..opts()
        };
        assert_eq!(request(&req, small).0["max_tokens"], 32);
        req.max_tokens = Some(20);
        assert_eq!(request(&req, small).0["max_tokens"], 20);
        req.max_tokens = None;
        assert_eq!(request(&req, small).0["max_tokens"], 32);
    }

    #[test]
    fn a_call_forced_by_schema_sends_no_tools_but_a_reply_schema_and_the_tools_in_the_prompt() {
        let tools = json!([
            {"name": "bash", "description": "run a command", "input_schema": {"type": "object"}},
            {"name": "read_file", "description": "read a file"},
        ]);
        let mut req = MessagesRequest {
            system: Some("be brief".into()),
            messages: vec![Message::user("go")],
            tools: Some(tools),
            ..MessagesRequest::default()
        };
        let o = WireOptions {
            tool_choice: Some("schema:bash"),
            ..opts()
        };
        let (body, by_schema) = request(&req, o);
        assert_eq!(by_schema, Some(vec!["bash".to_owned()]));
        assert!(body.get("tools").is_none() && body.get("tool_choice").is_none());
        let schema = &body["response_format"]["json_schema"]["schema"];
        assert_eq!(schema["properties"]["name"]["const"], "bash");
        let system = body["messages"][0]["content"].as_str().unwrap_or_default();
        assert!(system.starts_with("be brief\n\n") && system.contains("- bash: run a command"));
        assert!(!system.contains("read_file"), "{system}");

        let any = WireOptions {
            tool_choice: Some("schema"),
            ..opts()
        };
        let (body, by_schema) = request(&req, any);
        assert_eq!(by_schema.map(|n| n.len()), Some(2));
        assert!(body["response_format"]["json_schema"]["schema"]["anyOf"].is_array());

        // After the tool's result the model answers, with the tools as context and none allowed.
        req.messages.push(Message::blocks(
            Role::User,
            vec![ContentBlock::ToolResult {
                tool_use_id: "c".into(),
                content: "ok".into(),
                is_error: false,
            }],
        ));
        let (body, by_schema) = request(&req, o);
        assert_eq!(by_schema, None);
        assert!(body.get("response_format").is_none());
        assert_eq!(body["tool_choice"], "none");
        assert_eq!(body["messages"][0]["content"], "be brief");
    }
}
