//! The progress of a running request as stored in the conversation document (the request's
//! `progress` field holds this as JSON), so that every device can stream it.

use serde::{Deserialize, Serialize};

/// One tool call as shown while a request runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolProgress {
    /// Tool-use id.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Input (JSON text).
    pub input: String,
    /// Output, once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Whether it failed.
    #[serde(default)]
    pub is_error: bool,
}

/// What a running request has produced so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunProgress {
    /// Model text so far.
    pub text: String,
    /// Tool calls so far.
    pub tools: Vec<ToolProgress>,
    /// The latest retry notice, if the model API is being retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<String>,
    /// Model calls finished.
    pub turns: u32,
}

impl RunProgress {
    /// Parses the stored JSON (an unreadable value reads as empty).
    pub fn parse(text: Option<&str>) -> RunProgress {
        text.and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default()
    }

    /// The stored JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}
