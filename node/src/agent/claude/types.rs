//! Wire types of the Messages API: messages, content blocks, requests, turns and usage.

use std::ops::AddAssign;

use serde::{Deserialize, Serialize};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The person (or tool results sent back on their behalf).
    User,
    /// The model.
    Assistant,
}

/// One block of message content, as the API encodes it (`{"type": "...", ...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock {
    /// Plain text.
    Text {
        /// The text.
        text: String,
    },
    /// The model asks for a tool call.
    ToolUse {
        /// Id the matching `tool_result` must quote (`toolu_...`).
        id: String,
        /// Tool name.
        name: String,
        /// Tool input (a JSON object).
        input: serde_json::Value,
    },
    /// The result of a tool call, sent back in a user message.
    ToolResult {
        /// Id of the `tool_use` block this answers.
        tool_use_id: String,
        /// Tool output as text.
        content: String,
        /// Whether the tool failed.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        is_error: bool,
    },
    /// A picture in the prompt (JPEG, PNG, GIF or WebP).
    Image {
        /// The picture's bytes.
        source: MediaSource,
    },
    /// A PDF document in the prompt.
    Document {
        /// The document's bytes.
        source: MediaSource,
        /// Its name, shown to the model.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
    },
}

/// The bytes of an image or document block, inline (`{"type": "base64", ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaSource {
    /// Always `base64`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `image/png`, `application/pdf`, ...
    pub media_type: String,
    /// The bytes, base64.
    pub data: String,
}

impl MediaSource {
    /// Inline base64 bytes of `media_type`.
    pub fn base64(media_type: &str, data: String) -> MediaSource {
        MediaSource {
            kind: "base64".into(),
            media_type: media_type.into(),
            data,
        }
    }
}

/// What an image counts for in a history budget (about the 1,600 tokens of a full-size one, at
/// four characters a token), rather than its base64 length.
const IMAGE_CHARS: usize = 6_400;

impl ContentBlock {
    /// A text block.
    pub fn text(text: impl Into<String>) -> Self {
        Self::Text { text: text.into() }
    }

    /// Number of characters this block contributes to a request (used for history budgets).
    pub fn char_len(&self) -> usize {
        match self {
            Self::Text { text } => text.chars().count(),
            Self::ToolUse { id, name, input } => {
                id.len() + name.len() + input.to_string().chars().count()
            }
            Self::ToolResult {
                tool_use_id,
                content,
                ..
            } => tool_use_id.len() + content.chars().count(),
            Self::Image { .. } => IMAGE_CHARS,
            // A PDF's text and page images: about its size in base64 / 3 as characters.
            Self::Document { source, .. } => source.data.len() / 3,
        }
    }
}

/// Message content: a bare string or a list of blocks (both are valid on the wire).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Shorthand for a single text block.
    Text(String),
    /// A list of content blocks.
    Blocks(Vec<ContentBlock>),
}

impl Content {
    /// The content as a list of blocks (a bare string becomes one text block).
    pub fn to_blocks(&self) -> Vec<ContentBlock> {
        match self {
            Self::Text(text) => vec![ContentBlock::text(text.clone())],
            Self::Blocks(blocks) => blocks.clone(),
        }
    }

    /// Iterates over the blocks without cloning them (a bare string yields nothing here;
    /// use [`Content::text`] for text).
    fn blocks(&self) -> &[ContentBlock] {
        match self {
            Self::Text(_) => &[],
            Self::Blocks(blocks) => blocks,
        }
    }

    /// All text of this content, text blocks joined without separator.
    pub fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Blocks(blocks) => blocks
                .iter()
                .filter_map(|b| match b {
                    ContentBlock::Text { text } => Some(text.as_str()),
                    _ => None,
                })
                .collect(),
        }
    }

    /// Whether any block is a `tool_result`.
    pub fn has_tool_results(&self) -> bool {
        self.blocks()
            .iter()
            .any(|b| matches!(b, ContentBlock::ToolResult { .. }))
    }

    /// Number of characters this content contributes to a request.
    pub fn char_len(&self) -> usize {
        match self {
            Self::Text(text) => text.chars().count(),
            Self::Blocks(blocks) => blocks.iter().map(ContentBlock::char_len).sum(),
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Author.
    pub role: Role,
    /// Content.
    pub content: Content,
}

impl Message {
    /// A user message with plain text.
    pub fn user(text: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: Content::Text(text.into()),
        }
    }

    /// An assistant message with plain text.
    pub fn assistant(text: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: Content::Text(text.into()),
        }
    }

    /// A message made of blocks.
    pub fn blocks(role: Role, blocks: Vec<ContentBlock>) -> Self {
        Self {
            role,
            content: Content::Blocks(blocks),
        }
    }
}

/// A request to the Messages API. The client adds `model` and `max_tokens` from its config
/// unless overridden here, and always sets `stream: true`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessagesRequest {
    /// System prompt.
    pub system: Option<String>,
    /// The conversation so far; must start with a user message.
    pub messages: Vec<Message>,
    /// Tool definitions (a JSON array of `{name, description, input_schema}`); `None` or an
    /// empty array sends no tools.
    pub tools: Option<serde_json::Value>,
    /// Overrides the configured model.
    pub model: Option<String>,
    /// Overrides the configured `max_tokens`.
    pub max_tokens: Option<u32>,
}

impl MessagesRequest {
    /// A generous estimate of the input tokens of this request: its system prompt, messages
    /// and tools as JSON, at 3 bytes a token (English text averages about 4), rounded up.
    /// Budgets reserve this before a call; the real count comes back in the [`Usage`].
    pub fn estimated_input_tokens(&self) -> u64 {
        fn json_len<T: Serialize + ?Sized>(v: &T) -> usize {
            serde_json::to_vec(v).map_or(0, |v| v.len())
        }
        // An image costs about its pixels / 750 tokens (at most ~1,600 once scaled), not its
        // base64 length: count it as that many tokens' worth of bytes instead.
        let (images, image_bytes) = self
            .messages
            .iter()
            .flat_map(|m| m.content.blocks())
            .filter_map(|b| match b {
                ContentBlock::Image { source } => Some(source.data.len()),
                _ => None,
            })
            .fold((0, 0), |(n, len), l| (n + 1, len + l));
        let bytes = self.system.as_ref().map_or(0, String::len)
            + json_len(&self.messages).saturating_sub(image_bytes)
            + images * IMAGE_CHARS
            + self.tools.as_ref().map_or(0, json_len);
        (bytes as u64).div_ceil(3)
    }
}

/// Why the model stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The model finished its answer.
    EndTurn,
    /// The model wants tool results.
    ToolUse,
    /// The reply hit `max_tokens`.
    MaxTokens,
    /// A stop sequence matched.
    StopSequence,
    /// A long-running turn was paused; send it back to continue.
    PauseTurn,
    /// The model declined to answer.
    Refusal,
    /// A reason this client does not know.
    Other(String),
}

impl StopReason {
    /// Parses the wire value (`"end_turn"`, ...).
    pub fn from_wire(s: &str) -> Self {
        match s {
            "end_turn" => Self::EndTurn,
            "tool_use" => Self::ToolUse,
            "max_tokens" => Self::MaxTokens,
            "stop_sequence" => Self::StopSequence,
            "pause_turn" => Self::PauseTurn,
            "refusal" => Self::Refusal,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// Token usage of one or more turns. With prompt caching the API splits the input three
/// ways: `input_tokens` (not cached), `cache_creation_input_tokens` (written to the cache) and
/// `cache_read_input_tokens` (read from it); each is priced differently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Input (prompt) tokens that were neither written to nor read from the cache.
    pub input_tokens: u64,
    /// Output (generated) tokens.
    pub output_tokens: u64,
    /// Input tokens written to the prompt cache.
    #[serde(default)]
    pub cache_creation_input_tokens: u64,
    /// Input tokens read from the prompt cache.
    #[serde(default)]
    pub cache_read_input_tokens: u64,
}

impl Usage {
    /// Plain input and output tokens (no cache figures).
    pub fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            input_tokens,
            output_tokens,
            ..Self::default()
        }
    }

    /// All input tokens: plain, cache writes and cache reads.
    pub fn all_input(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(self.cache_read_input_tokens)
    }

    /// Every token of the turn: all input plus output.
    pub fn total(&self) -> u64 {
        self.all_input().saturating_add(self.output_tokens)
    }
}

impl AddAssign for Usage {
    fn add_assign(&mut self, rhs: Self) {
        self.input_tokens = self.input_tokens.saturating_add(rhs.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(rhs.output_tokens);
        self.cache_creation_input_tokens = self
            .cache_creation_input_tokens
            .saturating_add(rhs.cache_creation_input_tokens);
        self.cache_read_input_tokens = self
            .cache_read_input_tokens
            .saturating_add(rhs.cache_read_input_tokens);
    }
}

/// One complete model reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// Message id (`msg_...`).
    pub id: String,
    /// Content blocks in order.
    pub content: Vec<ContentBlock>,
    /// Why the model stopped.
    pub stop_reason: StopReason,
    /// Tokens used by this turn.
    pub usage: Usage,
}

impl Turn {
    /// All text of the reply.
    pub fn text(&self) -> String {
        Content::Blocks(self.content.clone()).text()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_serialize_as_on_the_wire() -> Result<(), serde_json::Error> {
        let msg = Message::blocks(
            Role::User,
            vec![
                ContentBlock::ToolResult {
                    tool_use_id: "toolu_1".into(),
                    content: "ok".into(),
                    is_error: false,
                },
                ContentBlock::ToolResult {
                    tool_use_id: "toolu_2".into(),
                    content: "boom".into(),
                    is_error: true,
                },
            ],
        );
        let v = serde_json::to_value(&msg)?;
        assert_eq!(
            v,
            serde_json::json!({"role":"user","content":[
                {"type":"tool_result","tool_use_id":"toolu_1","content":"ok"},
                {"type":"tool_result","tool_use_id":"toolu_2","content":"boom","is_error":true}
            ]})
        );
        let text = serde_json::to_value(Message::user("hi"))?;
        assert_eq!(text, serde_json::json!({"role":"user","content":"hi"}));
        let back: Message = serde_json::from_value(v)?;
        assert_eq!(back, msg);
        Ok(())
    }
}
