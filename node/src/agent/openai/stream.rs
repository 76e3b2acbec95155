//! Chat completion chunks to a [`Turn`] (pure, no I/O), lenient with what servers send.
//!
//! Every field may be missing (`#[serde(default)]` throughout); an empty or `null`
//! `finish_reason` means "not yet"; an unknown one is kept as [`StopReason::Other`]; tool-call
//! deltas are accumulated by their `index` (the id and name usually come once, the arguments
//! in pieces); a call without an id gets `call_N`. A stream that ends after a finish reason but
//! without `[DONE]` is complete; one that ends before any finish reason is truncated.
//! Arguments that are not valid JSON (small local models write raw newlines into strings) are
//! repaired when only control characters are wrong; otherwise the raw text is kept as a JSON
//! string, which the tools refuse with an error the model sees.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::agent::claude::{ContentBlock, StopReason, Turn, Usage};

/// Largest total of text and tool-argument bytes accepted in one turn.
const MAX_TURN_BYTES: usize = 32 * 1024 * 1024;

/// One `data:` chunk.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Chunk {
    id: Option<String>,
    #[serde(deserialize_with = "nullable")]
    choices: Vec<Choice>,
    usage: Option<WireUsage>,
    error: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Choice {
    delta: Option<Delta>,
    /// Servers that ignore `stream: true` send whole messages.
    message: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Delta {
    content: Option<String>,
    #[serde(deserialize_with = "nullable")]
    tool_calls: Vec<ToolCallDelta>,
}

/// `null` reads as the default (servers send `"tool_calls": null`).
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ToolCallDelta {
    index: Option<u64>,
    id: Option<String>,
    function: Option<FunctionDelta>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FunctionDelta {
    name: Option<String>,
    arguments: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WireUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

/// What one chunk means for the caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Text arrived.
    Text(String),
    /// A tool call started.
    ToolUseStart {
        /// Call id.
        id: String,
        /// Tool name.
        name: String,
    },
}

/// Why the chunks cannot be assembled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Not a chat completion chunk.
    #[error("{0}")]
    Protocol(String),
    /// The server reported an error in the stream (or in a 200 body).
    #[error("{message}")]
    Api {
        /// Its `type` or `code`, if any.
        kind: String,
        /// Its message.
        message: String,
    },
    /// The stream ended before the reply was complete.
    #[error("the stream ended before the reply was complete")]
    Truncated,
}

#[derive(Debug, Default)]
struct Call {
    id: String,
    name: String,
    arguments: String,
    announced: bool,
}

/// Assembly state of one reply.
#[derive(Debug, Default)]
pub struct Assembler {
    id: Option<String>,
    text: String,
    calls: BTreeMap<u64, Call>,
    finish: Option<String>,
    usage: Usage,
    bytes: usize,
    done: bool,
}

impl Assembler {
    /// Applies the data of one SSE event (`[DONE]` marks the end). Returns what to report.
    pub fn apply(&mut self, data: &str) -> Result<Vec<Step>, StreamError> {
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(Vec::new());
        }
        if data.is_empty() {
            return Ok(Vec::new());
        }
        let bad = |e: serde_json::Error| {
            StreamError::Protocol(format!(
                "a chunk is not a chat completion chunk ({e}): {}",
                truncate(data, 200)
            ))
        };
        let value: Value = serde_json::from_str(data).map_err(bad)?;
        if value.is_null() {
            return Ok(Vec::new());
        }
        let chunk: Chunk = serde_json::from_value(value).map_err(bad)?;
        if let Some(err) = chunk.error {
            return Err(api_error(&err));
        }
        if self.id.is_none() {
            self.id = chunk.id.filter(|i| !i.is_empty());
        }
        if let Some(u) = chunk.usage {
            if let Some(n) = u.prompt_tokens {
                self.usage.input_tokens = n;
            }
            if let Some(n) = u.completion_tokens {
                self.usage.output_tokens = n;
            }
        }
        let mut steps = Vec::new();
        // Only the first choice is used (we never ask for more).
        if let Some(choice) = chunk.choices.into_iter().next() {
            for delta in [choice.delta, choice.message].into_iter().flatten() {
                if let Some(t) = delta.content.filter(|t| !t.is_empty()) {
                    self.add_bytes(t.len())?;
                    self.text.push_str(&t);
                    steps.push(Step::Text(t));
                }
                for (pos, tc) in delta.tool_calls.into_iter().enumerate() {
                    let index = tc.index.unwrap_or(pos as u64);
                    let n = self.calls.len() + 1;
                    let call = self.calls.entry(index).or_default();
                    if let Some(id) = tc.id.filter(|i| !i.trim().is_empty())
                        && call.id.is_empty()
                    {
                        call.id = id;
                    }
                    if call.id.is_empty() {
                        call.id = format!("call_{n}");
                    }
                    if let Some(f) = tc.function {
                        if let Some(name) = f.name.filter(|n| !n.is_empty()) {
                            call.name.push_str(&name);
                        }
                        let piece = match f.arguments {
                            Some(Value::String(s)) => s,
                            // Some servers send the arguments as an object.
                            Some(Value::Null) | None => String::new(),
                            Some(other) => other.to_string(),
                        };
                        self.bytes = self.bytes.saturating_add(piece.len());
                        call.arguments.push_str(&piece);
                    }
                    if !call.announced && !call.name.is_empty() {
                        call.announced = true;
                        steps.push(Step::ToolUseStart {
                            id: call.id.clone(),
                            name: call.name.clone(),
                        });
                    }
                }
            }
            if self.bytes > MAX_TURN_BYTES {
                return Err(StreamError::Protocol(format!(
                    "reply larger than {MAX_TURN_BYTES} bytes"
                )));
            }
            if let Some(f) = choice.finish_reason.filter(|f| !f.trim().is_empty()) {
                self.finish = Some(f);
            }
        }
        Ok(steps)
    }

    fn add_bytes(&mut self, n: usize) -> Result<(), StreamError> {
        self.bytes = self.bytes.saturating_add(n);
        if self.bytes > MAX_TURN_BYTES {
            return Err(StreamError::Protocol(format!(
                "reply larger than {MAX_TURN_BYTES} bytes"
            )));
        }
        Ok(())
    }

    /// Whether `[DONE]` arrived.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Whether a finish reason arrived.
    pub fn has_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// The reply, once the stream ended (with `[DONE]`, or closed after a finish reason).
    pub fn finish(self) -> Result<Turn, StreamError> {
        if !self.done && self.finish.is_none() {
            return Err(StreamError::Truncated);
        }
        let mut content = Vec::new();
        if !self.text.is_empty() {
            content.push(ContentBlock::Text { text: self.text });
        }
        let has_calls = self.calls.values().any(|c| !c.name.is_empty());
        for call in self.calls.into_values().filter(|c| !c.name.is_empty()) {
            content.push(ContentBlock::ToolUse {
                id: call.id,
                name: call.name,
                input: parse_arguments(&call.arguments),
            });
        }
        let stop_reason = match self.finish.as_deref() {
            // Servers say `stop` (or nothing) with tool calls too.
            _ if has_calls => StopReason::ToolUse,
            Some("stop") | None => StopReason::EndTurn,
            Some("length") => StopReason::MaxTokens,
            Some("content_filter") => StopReason::Refusal,
            Some(other) => StopReason::Other(other.to_owned()),
        };
        Ok(Turn {
            id: self.id.unwrap_or_default(),
            content,
            stop_reason,
            usage: self.usage,
        })
    }
}

fn api_error(err: &Value) -> StreamError {
    let kind = err
        .get("type")
        .or_else(|| err.get("code"))
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_default();
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| err.as_str().map(str::to_owned))
        .unwrap_or_else(|| truncate(&err.to_string(), 300).to_owned());
    StreamError::Api { kind, message }
}

/// Parses a 200 response that is not a stream: a whole completion, or an error object.
pub fn whole(body: &[u8]) -> Result<(Vec<Step>, Turn), StreamError> {
    let text = String::from_utf8_lossy(body);
    let mut a = Assembler::default();
    let steps = a.apply(&text)?;
    if a.finish.is_none() {
        a.finish = Some("stop".into());
    }
    Ok((steps, a.finish()?))
}

/// Tool arguments as JSON: as sent, or with raw control characters inside strings escaped,
/// or (still not JSON) the raw text as a JSON string.
pub fn parse_arguments(raw: &str) -> Value {
    if raw.trim().is_empty() {
        return Value::Object(serde_json::Map::new());
    }
    if let Ok(v) = serde_json::from_str::<Value>(raw) {
        return v;
    }
    let mut fixed = String::with_capacity(raw.len() + 8);
    let mut in_string = false;
    let mut escaped = false;
    for c in raw.chars() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            } else if c.is_control() {
                fixed.push_str(&format!("\\u{:04x}", c as u32));
                continue;
            }
        } else if c == '"' {
            in_string = true;
        }
        fixed.push(c);
    }
    serde_json::from_str(&fixed).unwrap_or_else(|_| Value::String(raw.to_owned()))
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(chunks: &[&str]) -> Result<(Vec<Step>, Turn), StreamError> {
        let mut a = Assembler::default();
        let mut steps = Vec::new();
        for c in chunks {
            steps.extend(a.apply(c)?);
        }
        Ok((steps, a.finish()?))
    }

    #[test]
    fn text_and_usage() -> Result<(), StreamError> {
        let (steps, turn) = run(&[
            r#"{"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#,
            r#"{"choices":[{"delta":{"content":"lo"},"finish_reason":""}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#,
            "[DONE]",
        ])?;
        assert_eq!(
            steps,
            vec![Step::Text("Hel".into()), Step::Text("lo".into())]
        );
        assert_eq!(turn.text(), "Hello");
        assert_eq!(turn.id, "c1");
        assert_eq!(turn.stop_reason, StopReason::EndTurn);
        assert_eq!(turn.usage.input_tokens, 12);
        assert_eq!(turn.usage.output_tokens, 3);
        Ok(())
    }

    #[test]
    fn tool_call_deltas_split_by_index_and_arguments_split_across_chunks() -> Result<(), StreamError>
    {
        let (steps, turn) = run(&[
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"id":"b","function":{"name":"read_file","arguments":""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"bash"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"comm"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{\"path\":\"a\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"and\": \"ls\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
        ])?;
        assert_eq!(steps.len(), 2);
        assert_eq!(turn.stop_reason, StopReason::ToolUse);
        let calls: Vec<(String, String, Value)> = turn
            .content
            .iter()
            .filter_map(|b| match b {
                ContentBlock::ToolUse { id, name, input } => {
                    Some((id.clone(), name.clone(), input.clone()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(calls[0].1, "bash");
        assert!(calls[0].0.starts_with("call_"), "a missing id is made up");
        assert_eq!(calls[0].2, json!({"command": "ls"}));
        assert_eq!(
            calls[1],
            ("b".into(), "read_file".into(), json!({"path": "a"}))
        );
        Ok(())
    }

    #[test]
    fn tool_calls_with_stop_or_no_finish_reason_still_want_tools() -> Result<(), StreamError> {
        let (_, turn) = run(&[
            r#"{"choices":[{"delta":{"tool_calls":[{"id":"x","function":{"name":"bash","arguments":{"command":"ls"}}}]},"finish_reason":"stop"}]}"#,
        ])?;
        assert_eq!(turn.stop_reason, StopReason::ToolUse);
        let input = turn.content.iter().find_map(|b| match b {
            ContentBlock::ToolUse { input, .. } => Some(input.clone()),
            _ => None,
        });
        assert_eq!(input, Some(json!({"command": "ls"})));
        Ok(())
    }

    #[test]
    fn unknown_finish_reason_is_kept_and_missing_done_is_fine() -> Result<(), StreamError> {
        let (_, turn) =
            run(&[r#"{"choices":[{"delta":{"content":"x"},"finish_reason":"eos_token"}]}"#])?;
        assert_eq!(turn.stop_reason, StopReason::Other("eos_token".into()));
        let (_, turn) =
            run(&[r#"{"choices":[{"delta":{"content":"x"},"finish_reason":"length"}]}"#])?;
        assert_eq!(turn.stop_reason, StopReason::MaxTokens);
        Ok(())
    }

    #[test]
    fn truncated_streams_errors_and_garbage_fail_clearly() {
        assert_eq!(
            run(&[r#"{"choices":[{"delta":{"content":"x"}}]}"#]).err(),
            Some(StreamError::Truncated)
        );
        assert!(matches!(
            run(&[r#"{"choices":[{"delta":{"content":"x""#]),
            Err(StreamError::Protocol(_))
        ));
        let err = run(&[r#"{"error":{"message":"model is loading","type":"unavailable_error"}}"#]);
        assert_eq!(
            err.err(),
            Some(StreamError::Api {
                kind: "unavailable_error".into(),
                message: "model is loading".into()
            })
        );
        // Odd but valid JSON in unexpected places does not panic.
        assert!(run(&["[1,2]"]).is_err());
        assert!(run(&["null", "[DONE]"]).is_ok());
        assert!(
            run(&[
                r#"{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#,
                "[DONE]"
            ])
            .is_ok()
        );
    }

    #[test]
    fn invalid_arguments_are_repaired_or_kept_as_text() {
        assert_eq!(
            parse_arguments("{\"command\": \"echo a\necho b\"}"),
            json!({"command": "echo a\necho b"})
        );
        assert_eq!(parse_arguments("{\"command\": "), json!("{\"command\": "));
        assert_eq!(parse_arguments(""), json!({}));
    }

    #[test]
    fn a_whole_completion_or_an_error_body() -> Result<(), StreamError> {
        let (steps, turn) = whole(
            br#"{"id":"x","choices":[{"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
        )?;
        assert_eq!(steps, vec![Step::Text("hi".into())]);
        assert_eq!(turn.text(), "hi");
        assert!(matches!(
            whole(br#"{"error":{"code":503,"message":"Loading model"}}"#),
            Err(StreamError::Api { .. })
        ));
        Ok(())
    }
}
