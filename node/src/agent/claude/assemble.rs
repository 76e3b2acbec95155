//! Turns a sequence of Messages API stream events into a [`Turn`] (pure, no I/O).
//!
//! The assembler follows the documented event flow: `message_start`, then per content block
//! `content_block_start` / `content_block_delta`* / `content_block_stop`, then `message_delta`
//! (stop reason, output tokens) and `message_stop`. `ping` and unknown event or block types are
//! ignored, as the API's versioning policy asks. Tool inputs arrive as `input_json_delta`
//! fragments; they are concatenated and parsed when the block stops.

use std::collections::BTreeMap;

use serde_json::Value;

use super::sse::SseEvent;
use super::types::{ContentBlock, StopReason, Turn, Usage};

/// Largest total of text and tool-input bytes accepted in one turn.
const MAX_TURN_BYTES: usize = 32 * 1024 * 1024;

/// What one stream event means for the caller.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// Nothing to report.
    Nothing,
    /// A piece of text arrived.
    Text(String),
    /// A tool-use block started.
    ToolUseStart {
        /// Block id.
        id: String,
        /// Tool name.
        name: String,
    },
    /// `message_stop` arrived: the turn is complete.
    Done(Turn),
}

/// Why the stream cannot be assembled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum AssembleError {
    /// The server sent something that breaks the protocol.
    #[error("{0}")]
    Protocol(String),
    /// The server sent an `error` event.
    #[error("{error_type}: {message}")]
    Api {
        /// e.g. `overloaded_error`.
        error_type: String,
        /// The server's message.
        message: String,
    },
    /// The reply hit `max_tokens` in the middle of a tool call's input.
    #[error("reply cut off at max_tokens inside the input of tool {name}")]
    TruncatedToolInput {
        /// Tool name.
        name: String,
    },
}

#[derive(Debug)]
enum Block {
    Text(String),
    ToolUse {
        id: String,
        name: String,
        json: String,
        input: Option<Value>,
    },
    /// A block type this client does not use (e.g. `thinking`); dropped from the turn.
    Ignored,
}

/// Assembly state for one turn.
#[derive(Debug, Default)]
pub(crate) struct Assembler {
    id: Option<String>,
    blocks: BTreeMap<u64, Block>,
    usage: Usage,
    stop_reason: Option<StopReason>,
    bytes: usize,
}

fn protocol(msg: impl Into<String>) -> AssembleError {
    AssembleError::Protocol(msg.into())
}

fn field<'a>(v: &'a Value, name: &str, event: &str) -> Result<&'a Value, AssembleError> {
    v.get(name)
        .ok_or_else(|| protocol(format!("{event} event without `{name}`")))
}

fn str_field<'a>(v: &'a Value, name: &str, event: &str) -> Result<&'a str, AssembleError> {
    field(v, name, event)?
        .as_str()
        .ok_or_else(|| protocol(format!("{event} event: `{name}` is not a string")))
}

fn index(v: &Value, event: &str) -> Result<u64, AssembleError> {
    field(v, "index", event)?
        .as_u64()
        .ok_or_else(|| protocol(format!("{event} event: `index` is not a number")))
}

impl Assembler {
    /// Whether a `message_start` was seen.
    pub(crate) fn started(&self) -> bool {
        self.id.is_some()
    }

    fn add_bytes(&mut self, n: usize) -> Result<(), AssembleError> {
        self.bytes = self.bytes.saturating_add(n);
        if self.bytes > MAX_TURN_BYTES {
            return Err(protocol(format!(
                "reply larger than {MAX_TURN_BYTES} bytes"
            )));
        }
        Ok(())
    }

    /// Applies one SSE event.
    pub(crate) fn apply(&mut self, ev: &SseEvent) -> Result<Step, AssembleError> {
        let data: Value = serde_json::from_str(&ev.data)
            .map_err(|e| protocol(format!("`{}` event data is not valid JSON: {e}", ev.event)))?;
        let kind = data
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(ev.event.as_str())
            .to_owned();
        let kind = kind.as_str();
        if kind != "message_start" && kind != "error" && kind != "ping" && !self.started() {
            return Err(protocol(format!("`{kind}` event before message_start")));
        }
        match kind {
            "message_start" => {
                let msg = field(&data, "message", kind)?;
                self.id = Some(str_field(msg, "id", kind)?.to_owned());
                if let Some(u) = msg.get("usage") {
                    self.apply_usage(u);
                }
                Ok(Step::Nothing)
            }
            "content_block_start" => {
                let idx = index(&data, kind)?;
                if self.blocks.contains_key(&idx) {
                    return Err(protocol(format!("content block {idx} started twice")));
                }
                let cb = field(&data, "content_block", kind)?;
                let (block, step) = match str_field(cb, "type", kind)? {
                    "text" => {
                        let text = cb.get("text").and_then(Value::as_str).unwrap_or_default();
                        self.add_bytes(text.len())?;
                        let step = if text.is_empty() {
                            Step::Nothing
                        } else {
                            Step::Text(text.to_owned())
                        };
                        (Block::Text(text.to_owned()), step)
                    }
                    "tool_use" => {
                        let id = str_field(cb, "id", kind)?.to_owned();
                        let name = str_field(cb, "name", kind)?.to_owned();
                        let step = Step::ToolUseStart {
                            id: id.clone(),
                            name: name.clone(),
                        };
                        (
                            Block::ToolUse {
                                id,
                                name,
                                json: String::new(),
                                input: None,
                            },
                            step,
                        )
                    }
                    _ => (Block::Ignored, Step::Nothing),
                };
                self.blocks.insert(idx, block);
                Ok(step)
            }
            "content_block_delta" => {
                let idx = index(&data, kind)?;
                let delta = field(&data, "delta", kind)?;
                let delta_type = str_field(delta, "type", kind)?;
                let piece = match delta_type {
                    "text_delta" => str_field(delta, "text", kind)?,
                    "input_json_delta" => str_field(delta, "partial_json", kind)?,
                    _ => "",
                };
                self.add_bytes(piece.len())?;
                let block = self
                    .blocks
                    .get_mut(&idx)
                    .ok_or_else(|| protocol(format!("delta for unknown content block {idx}")))?;
                match (block, delta_type) {
                    (Block::Text(text), "text_delta") => {
                        text.push_str(piece);
                        Ok(Step::Text(piece.to_owned()))
                    }
                    (Block::ToolUse { json, .. }, "input_json_delta") => {
                        json.push_str(piece);
                        Ok(Step::Nothing)
                    }
                    (_, "text_delta" | "input_json_delta") => Err(protocol(format!(
                        "{delta_type} does not match content block {idx}"
                    ))),
                    _ => Ok(Step::Nothing),
                }
            }
            "content_block_stop" => {
                let idx = index(&data, kind)?;
                let block = self
                    .blocks
                    .get_mut(&idx)
                    .ok_or_else(|| protocol(format!("stop for unknown content block {idx}")))?;
                if let Block::ToolUse {
                    name, json, input, ..
                } = block
                {
                    *input = Some(parse_tool_input(name, json)?);
                }
                Ok(Step::Nothing)
            }
            "message_delta" => {
                if let Some(reason) = data
                    .get("delta")
                    .and_then(|d| d.get("stop_reason"))
                    .and_then(Value::as_str)
                {
                    self.stop_reason = Some(StopReason::from_wire(reason));
                }
                if let Some(u) = data.get("usage") {
                    self.apply_usage(u);
                }
                Ok(Step::Nothing)
            }
            "message_stop" => self.finish().map(Step::Done),
            "error" => {
                let err = data.get("error").unwrap_or(&Value::Null);
                Err(AssembleError::Api {
                    error_type: err
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown_error")
                        .to_owned(),
                    message: err
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("(no message)")
                        .to_owned(),
                })
            }
            // `ping` and event types added in later API versions.
            _ => Ok(Step::Nothing),
        }
    }

    fn apply_usage(&mut self, u: &Value) {
        // Counts in the stream are cumulative, so later values replace earlier ones.
        if let Some(n) = u.get("input_tokens").and_then(Value::as_u64) {
            self.usage.input_tokens = n;
        }
        if let Some(n) = u.get("output_tokens").and_then(Value::as_u64) {
            self.usage.output_tokens = n;
        }
        if let Some(n) = u.get("cache_creation_input_tokens").and_then(Value::as_u64) {
            self.usage.cache_creation_input_tokens = n;
        }
        if let Some(n) = u.get("cache_read_input_tokens").and_then(Value::as_u64) {
            self.usage.cache_read_input_tokens = n;
        }
    }

    fn finish(&mut self) -> Result<Turn, AssembleError> {
        let stop_reason = self
            .stop_reason
            .take()
            .ok_or_else(|| protocol("message_stop without a stop_reason in message_delta"))?;
        let mut content = Vec::new();
        for block in std::mem::take(&mut self.blocks).into_values() {
            match block {
                Block::Text(text) => content.push(ContentBlock::Text { text }),
                Block::ToolUse {
                    id,
                    name,
                    json,
                    input,
                } => {
                    let input = match input {
                        Some(input) => input,
                        None if stop_reason == StopReason::MaxTokens => {
                            return Err(AssembleError::TruncatedToolInput { name });
                        }
                        None => parse_tool_input(&name, &json)?,
                    };
                    content.push(ContentBlock::ToolUse { id, name, input });
                }
                Block::Ignored => {}
            }
        }
        Ok(Turn {
            id: self.id.take().unwrap_or_default(),
            content,
            stop_reason,
            usage: self.usage,
        })
    }
}

fn parse_tool_input(name: &str, json: &str) -> Result<Value, AssembleError> {
    if json.trim().is_empty() {
        return Ok(Value::Object(serde_json::Map::new()));
    }
    serde_json::from_str(json).map_err(|e| {
        protocol(format!(
            "input of tool call {name} is not valid JSON ({e}): {}",
            truncate(json, 200)
        ))
    })
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

    fn ev(event: &str, data: Value) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.to_string(),
        }
    }

    fn start() -> SseEvent {
        ev(
            "message_start",
            serde_json::json!({"type":"message_start","message":{"id":"msg_1","type":"message",
                "role":"assistant","model":"m","content":[],"stop_reason":null,
                "usage":{"input_tokens":10,"output_tokens":1,
                "cache_creation_input_tokens":20,"cache_read_input_tokens":30}}}),
        )
    }

    fn run(events: Vec<SseEvent>) -> Result<(Vec<Step>, Option<Turn>), AssembleError> {
        let mut a = Assembler::default();
        let mut steps = Vec::new();
        for e in &events {
            match a.apply(e)? {
                Step::Done(t) => return Ok((steps, Some(t))),
                s => steps.push(s),
            }
        }
        Ok((steps, None))
    }

    #[test]
    fn assembles_text_and_tool_use() -> Result<(), AssembleError> {
        use serde_json::json;
        let events = vec![
            start(),
            ev("ping", json!({"type":"ping"})),
            ev(
                "content_block_start",
                json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
            ),
            ev(
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}),
            ),
            ev(
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"lo"}}),
            ),
            ev(
                "content_block_stop",
                json!({"type":"content_block_stop","index":0}),
            ),
            ev(
                "content_block_start",
                json!({"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"bash","input":{}}}),
            ),
            ev(
                "content_block_delta",
                json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"cmd\": \"l"}}),
            ),
            ev(
                "content_block_delta",
                json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"s\"}"}}),
            ),
            ev(
                "content_block_stop",
                json!({"type":"content_block_stop","index":1}),
            ),
            ev(
                "message_delta",
                json!({"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":7}}),
            ),
            ev("message_stop", json!({"type":"message_stop"})),
        ];
        let (steps, turn) = run(events)?;
        assert_eq!(
            steps,
            vec![
                Step::Nothing,
                Step::Nothing,
                Step::Nothing,
                Step::Text("Hel".into()),
                Step::Text("lo".into()),
                Step::Nothing,
                Step::ToolUseStart {
                    id: "toolu_1".into(),
                    name: "bash".into()
                },
                Step::Nothing,
                Step::Nothing,
                Step::Nothing,
                Step::Nothing,
            ]
        );
        let turn = turn.ok_or_else(|| protocol("no turn"))?;
        assert_eq!(turn.stop_reason, StopReason::ToolUse);
        assert_eq!(
            turn.usage,
            Usage {
                input_tokens: 10,
                output_tokens: 7,
                cache_creation_input_tokens: 20,
                cache_read_input_tokens: 30,
            }
        );
        assert_eq!(
            turn.content,
            vec![
                ContentBlock::text("Hello"),
                ContentBlock::ToolUse {
                    id: "toolu_1".into(),
                    name: "bash".into(),
                    input: json!({"cmd":"ls"})
                }
            ]
        );
        Ok(())
    }

    #[test]
    fn invalid_tool_json_is_a_protocol_error() {
        use serde_json::json;
        let events = vec![
            start(),
            ev(
                "content_block_start",
                json!({"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t","name":"bash","input":{}}}),
            ),
            ev(
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"cmd\": "}}),
            ),
            ev(
                "content_block_stop",
                json!({"type":"content_block_stop","index":0}),
            ),
        ];
        let err = run(events).err();
        assert!(
            matches!(&err, Some(AssembleError::Protocol(m)) if m.contains("bash") && m.contains("not valid JSON")),
            "{err:?}"
        );
    }

    #[test]
    fn error_event_and_garbage() {
        use serde_json::json;
        let err = run(vec![ev(
            "error",
            json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}),
        )])
        .err();
        assert_eq!(
            err,
            Some(AssembleError::Api {
                error_type: "overloaded_error".into(),
                message: "Overloaded".into()
            })
        );
        let garbage = SseEvent {
            event: "content_block_delta".into(),
            data: "{not json".into(),
        };
        assert!(matches!(
            run(vec![start(), garbage]),
            Err(AssembleError::Protocol(_))
        ));
        assert!(matches!(
            run(vec![ev("message_stop", json!({"type":"message_stop"}))]),
            Err(AssembleError::Protocol(_))
        ));
    }

    #[test]
    fn tool_input_cut_by_max_tokens_is_reported() {
        use serde_json::json;
        let events = vec![
            start(),
            ev(
                "content_block_start",
                json!({"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t","name":"write_file","input":{}}}),
            ),
            ev(
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"path\": "}}),
            ),
            ev(
                "message_delta",
                json!({"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":7}}),
            ),
            ev("message_stop", json!({"type":"message_stop"})),
        ];
        assert_eq!(
            run(events).err(),
            Some(AssembleError::TruncatedToolInput {
                name: "write_file".into()
            })
        );
    }
}
