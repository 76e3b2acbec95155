//! Document kinds and their current schema versions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a document is. Stored as a string in the document's root field `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocKind {
    /// A conversation with the agent: requests, replies, token usage.
    Conversation,
    /// The person's memory text (sent as the system prompt). Singleton: [`crate::DocId::MEMORY`].
    Memory,
    /// Scheduled prompts. Singleton: [`crate::DocId::SCHEDULES`].
    Schedules,
    /// Key → JSON settings. Singleton: [`crate::DocId::SETTINGS`].
    Settings,
    /// Any other document a user creates; free-form JSON.
    Generic,
}

/// The string is not a known [`DocKind`] name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown document kind {0:?}")]
pub struct UnknownKind(pub String);

impl DocKind {
    /// Every kind, in a fixed order.
    pub const ALL: [DocKind; 5] = [
        DocKind::Conversation,
        DocKind::Memory,
        DocKind::Schedules,
        DocKind::Settings,
        DocKind::Generic,
    ];

    /// The name stored in documents and shown to users.
    pub const fn name(self) -> &'static str {
        match self {
            DocKind::Conversation => "conversation",
            DocKind::Memory => "memory",
            DocKind::Schedules => "schedules",
            DocKind::Settings => "settings",
            DocKind::Generic => "generic",
        }
    }

    /// The schema version this build writes for this kind.
    pub const fn current_schema_version(self) -> u64 {
        match self {
            DocKind::Conversation => 2,
            DocKind::Memory | DocKind::Schedules | DocKind::Settings | DocKind::Generic => 1,
        }
    }

    /// Singleton kinds live at a well-known [`crate::DocId`] and get a deterministic first change.
    pub const fn is_singleton(self) -> bool {
        matches!(
            self,
            DocKind::Memory | DocKind::Schedules | DocKind::Settings
        )
    }
}

impl fmt::Display for DocKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DocKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DocKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in DocKind::ALL {
            assert_eq!(k.name().parse::<DocKind>(), Ok(k));
            assert_eq!(serde_json::to_value(k).expect("json"), k.name());
        }
        assert!("Memory".parse::<DocKind>().is_err());
    }
}
