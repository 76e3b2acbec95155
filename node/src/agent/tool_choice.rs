//! Forcing a tool call (pure): a provider's `tool_choice` setting on one model call, and the
//! schema way of forcing it for servers that ignore `tool_choice`.
//!
//! Settings: `auto` (absent), `required`, `none`, `tool:NAME`, and for OpenAI-compatible
//! servers `schema` and `schema:NAME`. The first call of a request (no tool results yet) is
//! forced; a call after tool results may only answer.
//!
//! `schema` is for servers whose chat template applies no grammar to `tool_choice` (llama.cpp's
//! `llama-server` with small models, which then answer in prose): the call is sent **without**
//! tools and with a JSON schema on the reply (`response_format`), so the server's grammar makes
//! the model write `{"name": TOOL, "arguments": {...}}`, which [`call_from_reply`] turns back
//! into a tool call. The tools' names and descriptions go in the system prompt, since the
//! model no longer sees them as tools.

use serde_json::{Value, json};

use crate::agent::claude::{ContentBlock, Message, StopReason, Turn};
use crate::agent::openai::stream::parse_arguments;

/// How one call is forced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A tool must be called (`tool_choice: required`, or the named tool).
    Required,
    /// No tool may be called: the model answers.
    None,
    /// A tool call is forced by a JSON schema on the reply, without tools in the request.
    Schema,
}

/// The forcing of one call: the tool to offer alone (for `tool:NAME` and `schema:NAME`) and
/// the mode. `None` when the setting leaves the model free.
pub fn forced<'a>(
    setting: Option<&'a str>,
    messages: &[Message],
) -> Option<(Option<&'a str>, Mode)> {
    let setting = setting?;
    let after_tools = messages
        .last()
        .is_some_and(|m| m.content.has_tool_results());
    if setting == "none" || after_tools {
        return Some((None, Mode::None));
    }
    match setting {
        "required" => Some((None, Mode::Required)),
        "schema" => Some((None, Mode::Schema)),
        _ => {
            if let Some(name) = setting.strip_prefix("tool:") {
                Some((Some(name), Mode::Required))
            } else {
                setting
                    .strip_prefix("schema:")
                    .map(|name| (Some(name), Mode::Schema))
            }
        }
    }
}

/// The tool definitions (`[{name, description, input_schema}]`) with only tool `name`.
pub fn only_tool(tools: &Value, name: &str) -> Value {
    let kept: Vec<Value> = tools
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    Value::Array(kept)
}

/// The JSON schema of a reply that calls one of `tools`: `{"name": TOOL, "arguments": ...}`
/// with the tool's own input schema for the arguments.
pub fn call_schema(tools: &Value) -> Value {
    let one = |t: &Value| {
        let name = t.get("name").and_then(Value::as_str).unwrap_or_default();
        let args = t
            .get("input_schema")
            .filter(|s| s.is_object())
            .cloned()
            .unwrap_or_else(|| json!({"type": "object"}));
        json!({
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": args},
            "required": ["name", "arguments"],
        })
    };
    let all: Vec<Value> = tools
        .as_array()
        .map(|a| a.iter().map(one).collect())
        .unwrap_or_default();
    match <[Value; 1]>::try_from(all) {
        Ok([single]) => single,
        Err(all) => json!({"anyOf": all}),
    }
}

/// What the system prompt says of the tools when they are forced by schema.
pub fn call_prompt(tools: &Value) -> String {
    let mut out = String::from(
        "Call exactly one tool now. Reply with only a JSON object \
         {\"name\": TOOL, \"arguments\": {...}}. The tools:",
    );
    for t in tools.as_array().into_iter().flatten() {
        let name = t.get("name").and_then(Value::as_str).unwrap_or_default();
        let what = t.get("description").and_then(Value::as_str).unwrap_or("");
        out.push_str(&format!("\n- {name}: {what}"));
    }
    out
}

/// Why a reply forced by schema is not a tool call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the reply was forced to be a tool call but is not one ({reason}): {text:?}")]
pub struct NotACall {
    /// What is wrong with it.
    pub reason: &'static str,
    /// The start of the reply.
    pub text: String,
}

/// The reply of a call forced by schema as a tool call to one of `offered` (tool names).
pub fn call_from_reply(turn: Turn, offered: &[String]) -> Result<Turn, NotACall> {
    let text = turn.text();
    let not_a_call = |reason| NotACall {
        reason,
        text: text.chars().take(200).collect(),
    };
    let value = parse_arguments(text.trim());
    let name = value
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| not_a_call("no tool name"))?;
    if !offered.iter().any(|o| o == name) {
        return Err(not_a_call("not an offered tool"));
    }
    let input = match value.get("arguments") {
        Some(Value::Object(args)) => Value::Object(args.clone()),
        // Some models write the arguments as a JSON string.
        Some(Value::String(raw)) => match parse_arguments(raw) {
            v @ Value::Object(_) => v,
            _ => return Err(not_a_call("arguments are not an object")),
        },
        None => json!({}),
        Some(_) => return Err(not_a_call("arguments are not an object")),
    };
    let id = if turn.id.is_empty() {
        "call_schema".to_owned()
    } else {
        format!("call_{}", turn.id)
    };
    Ok(Turn {
        content: vec![ContentBlock::ToolUse {
            id,
            name: name.to_owned(),
            input,
        }],
        stop_reason: StopReason::ToolUse,
        ..turn
    })
}

/// The names of the tools in `tools`.
pub fn names(tools: &Value) -> Vec<String> {
    tools
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("name").and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::claude::{Role, Usage};

    fn tools() -> Value {
        json!([
            {"name": "bash", "description": "run a command",
             "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                              "required": ["command"]}},
            {"name": "read_file", "description": "read a file", "input_schema": {"type": "object"}},
        ])
    }

    fn turn(text: &str) -> Turn {
        Turn {
            id: "x1".into(),
            content: vec![ContentBlock::text(text)],
            stop_reason: StopReason::EndTurn,
            usage: Usage::default(),
        }
    }

    #[test]
    fn settings_force_the_first_call_and_free_the_answer() {
        let first = [Message::user("hi")];
        let after = [
            Message::user("hi"),
            Message::blocks(
                Role::User,
                vec![ContentBlock::ToolResult {
                    tool_use_id: "c".into(),
                    content: "ok".into(),
                    is_error: false,
                }],
            ),
        ];
        assert_eq!(forced(None, &first), None);
        assert_eq!(
            forced(Some("required"), &first),
            Some((None, Mode::Required))
        );
        assert_eq!(
            forced(Some("tool:bash"), &first),
            Some((Some("bash"), Mode::Required))
        );
        assert_eq!(forced(Some("schema"), &first), Some((None, Mode::Schema)));
        assert_eq!(
            forced(Some("schema:bash"), &first),
            Some((Some("bash"), Mode::Schema))
        );
        assert_eq!(
            forced(Some("schema:bash"), &after),
            Some((None, Mode::None))
        );
        assert_eq!(forced(Some("none"), &first), Some((None, Mode::None)));
        assert_eq!(forced(Some("whatever"), &first), None);
    }

    #[test]
    fn the_schema_names_the_tool_and_takes_its_input_schema() {
        let one = call_schema(&only_tool(&tools(), "bash"));
        assert_eq!(one["properties"]["name"]["const"], "bash");
        assert_eq!(one["properties"]["arguments"]["required"][0], "command");
        let both = call_schema(&tools());
        assert_eq!(both["anyOf"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            both["anyOf"][1]["properties"]["arguments"],
            json!({"type": "object"})
        );
        assert!(call_prompt(&tools()).contains("- read_file: read a file"));
    }

    #[test]
    fn a_reply_becomes_the_call_or_a_clear_error() -> Result<(), NotACall> {
        let offered = ["bash".to_owned(), "read_file".to_owned()];
        let t = call_from_reply(
            turn(r#" {"name": "bash", "arguments": {"command": "ls"}} "#),
            &offered,
        )?;
        assert_eq!(t.stop_reason, StopReason::ToolUse);
        assert_eq!(
            t.content,
            vec![ContentBlock::ToolUse {
                id: "call_x1".into(),
                name: "bash".into(),
                input: json!({"command": "ls"}),
            }]
        );
        let t = call_from_reply(
            turn(r#"{"name": "read_file", "arguments": "{\"path\": \"a\"}"}"#),
            &offered,
        )?;
        assert!(
            matches!(&t.content[0], ContentBlock::ToolUse { input, .. } if input["path"] == "a")
        );
        for (bad, why) in [
            ("I would run ls", "no tool name"),
            (
                r#"{"name": "rm_rf", "arguments": {}}"#,
                "not an offered tool",
            ),
            (
                r#"{"name": "bash", "arguments": [1]}"#,
                "arguments are not an object",
            ),
        ] {
            let e = call_from_reply(turn(bad), &offered).err();
            assert_eq!(e.map(|e| e.reason), Some(why), "{bad}");
        }
        Ok(())
    }
}
