//! Schema versions and migrations.
//!
//! Every document stores `schema_version`. [`Document::migrate`] brings an older layout up to
//! [`DocKind::current_schema_version`], one step at a time, in one change. It never downgrades:
//! a document written by a newer build keeps its version and its unknown fields, and stays
//! readable and writable through the fields this build knows
//! ([`Document::is_newer_than_supported`] tells the caller).
//!
//! Steps:
//!
//! | kind | from → to | what |
//! |---|---|---|
//! | conversation | 1 → 2 | add the `usage` totals map (counters) if missing |
//!
//! Note: two devices migrating the same old document concurrently each create their own `usage`
//! map; Automerge keeps one. Increments made on the losing map before the devices sync are lost.
//! Migrate before counting usage (the agent node does it when it opens a conversation).

use automerge::transaction::Transactable;
use automerge::{ROOT, ReadDoc};

use crate::conversation::{FIELD_USAGE, put_usage_totals};
use crate::document::{Document, DocumentError, FIELD_SCHEMA_VERSION};
use crate::kind::DocKind;

impl Document {
    /// True if the document's schema version is newer than this build writes for its kind.
    pub fn is_newer_than_supported(&self) -> bool {
        match (self.kind(), self.schema_version()) {
            (Some(k), Some(v)) => v > k.current_schema_version(),
            // An unknown kind comes from a newer build.
            (None, _) => self.kind_name().is_some(),
            (Some(_), None) => false,
        }
    }

    /// Migrates the document to the current schema of its kind. Returns `true` if a change was
    /// made. Documents of unknown kind or a newer version are left untouched.
    pub fn migrate(&mut self, now: i64) -> Result<bool, DocumentError> {
        let Some(kind) = self.kind() else {
            return Ok(false);
        };
        let target = kind.current_schema_version();
        // A missing version is the first version.
        let from = self.schema_version().unwrap_or(1);
        if from >= target {
            return Ok(false);
        }
        let message = format!("migrate {kind} schema v{from} to v{target}");
        self.change(&message, now, |tx| {
            for version in from..target {
                if let (DocKind::Conversation, 1) = (kind, version)
                    && tx.get(ROOT, FIELD_USAGE)?.is_none()
                {
                    put_usage_totals(tx)?;
                }
            }
            tx.put(ROOT, FIELD_SCHEMA_VERSION, target)?;
            Ok::<_, DocumentError>(())
        })?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::actor::actor_for;

    /// A conversation as a v1 build would have written it.
    fn v1_conversation() -> Document {
        let mut d =
            Document::new(DocKind::Conversation, &actor_for(&[1; 32], [1; 8]), 1).expect("new");
        d.change("downgrade to v1 layout", 1, |tx| {
            tx.delete(ROOT, FIELD_USAGE)?;
            tx.put(ROOT, FIELD_SCHEMA_VERSION, 1_u64)
        })
        .expect("v1");
        d
    }

    #[test]
    fn conversation_v1_to_v2_adds_usage() {
        let mut d = v1_conversation();
        d.put_json("future_field", json!({"keep": true}), "peer", 2)
            .expect("put");
        assert_eq!(d.schema_version(), Some(1));
        assert!(d.to_json().get("usage").is_none());
        assert!(d.migrate(3).expect("migrate"));
        assert_eq!(d.schema_version(), Some(2));
        assert_eq!(
            d.to_json()["usage"],
            json!({"input_tokens": 0, "output_tokens": 0})
        );
        assert_eq!(d.to_json()["future_field"], json!({"keep": true}));
        let last = d.history().pop().expect("change");
        assert_eq!(
            last.message.as_deref(),
            Some("migrate conversation schema v1 to v2")
        );
        assert_eq!(last.time, 3);
        // Idempotent.
        assert!(!d.migrate(4).expect("again"));
    }

    #[test]
    fn newer_versions_are_never_downgraded() {
        let mut d =
            Document::new(DocKind::Conversation, &actor_for(&[1; 32], [1; 8]), 1).expect("new");
        d.change("from the future", 2, |tx| {
            tx.put(ROOT, FIELD_SCHEMA_VERSION, 9_u64)
        })
        .expect("bump");
        assert!(d.is_newer_than_supported());
        assert!(!d.migrate(3).expect("migrate"));
        assert_eq!(d.schema_version(), Some(9));
        // Known fields stay writable.
        d.put_json("title", json!("still works"), "t", 4)
            .expect("put");
        assert_eq!(d.to_json()["title"], "still works");
    }

    #[test]
    fn unknown_kind_is_newer() {
        let mut d = Document::new(DocKind::Generic, &actor_for(&[1; 32], [1; 8]), 1).expect("new");
        assert!(!d.is_newer_than_supported());
        d.change("future kind", 2, |tx| tx.put(ROOT, "kind", "hologram"))
            .expect("kind");
        assert!(d.is_newer_than_supported());
        assert_eq!(d.kind(), None);
        assert!(!d.migrate(3).expect("migrate"));
    }
}
