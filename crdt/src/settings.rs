//! The settings document, at [`crate::DocId::SETTINGS`]: key → JSON value.
//!
//! Layout: root `values` is a map from key to the value (JSON objects and arrays are stored as
//! nested Automerge maps and lists). Keys are free-form non-empty strings (dots included; they
//! are keys, not paths). Concurrent writes of one key keep one of the values.

use std::borrow::{Borrow, BorrowMut};
use std::collections::BTreeMap;

use automerge::transaction::Transactable;
use automerge::{AutomergeError, ObjType, ROOT, ReadDoc};
use serde_json::Value as Json;

use crate::document::{Document, DocumentError};
use crate::fields;
use crate::json::{At, PathError, value_to_json, write_json};
use crate::kind::DocKind;

/// Root field: the map of settings.
pub const FIELD_VALUES: &str = "values";

/// Errors of settings operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The key is empty.
    #[error("setting key must not be empty")]
    EmptyKey,
    /// The value could not be written (e.g. nested too deep).
    #[error(transparent)]
    Value(#[from] PathError),
    /// The document is not a settings document.
    #[error(transparent)]
    Document(#[from] DocumentError),
    /// An Automerge operation failed.
    #[error("automerge: {0}")]
    Automerge(Box<AutomergeError>),
}

impl From<AutomergeError> for SettingsError {
    fn from(e: AutomergeError) -> Self {
        SettingsError::Automerge(Box::new(e))
    }
}

/// Typed access to the settings document. Wraps `&Document` (read) or `&mut Document`.
#[derive(Debug)]
pub struct Settings<D>(D);

impl<D: Borrow<Document>> Settings<D> {
    /// Wraps a document, checking that it is a settings document.
    pub fn open(doc: D) -> Result<Self, DocumentError> {
        doc.borrow().expect_kind(DocKind::Settings)?;
        Ok(Settings(doc))
    }

    /// The underlying document.
    pub fn document(&self) -> &Document {
        self.0.borrow()
    }

    /// One setting.
    pub fn get(&self, key: &str) -> Option<Json> {
        let doc = self.document().automerge();
        let values = fields::object(doc, &ROOT, FIELD_VALUES, ObjType::Map)?;
        let (v, id) = doc.get(&values, key).ok().flatten()?;
        Some(value_to_json(doc, v, &id, 0))
    }

    /// Every setting, sorted by key.
    pub fn list(&self) -> BTreeMap<String, Json> {
        let doc = self.document().automerge();
        let Some(values) = fields::object(doc, &ROOT, FIELD_VALUES, ObjType::Map) else {
            return BTreeMap::new();
        };
        doc.keys(&values)
            .filter_map(|k| {
                let (v, id) = doc.get(&values, k.as_str()).ok().flatten()?;
                let j = value_to_json(doc, v, &id, 0);
                Some((k, j))
            })
            .collect()
    }
}

impl<D: Borrow<Document>> Settings<D> {
    /// Every setting whose key starts with `prefix` and whose value is a string, sorted by key,
    /// with the device that wrote the value (from the actor id of the write; `None` when the
    /// actor id is not an iom one). A value written as one string has one author, which lets
    /// a reader accept only values that a device it trusts for them wrote.
    pub fn strings_with_author(&self, prefix: &str) -> Vec<AuthoredString> {
        let doc = self.document().automerge();
        let Some(values) = fields::object(doc, &ROOT, FIELD_VALUES, ObjType::Map) else {
            return Vec::new();
        };
        doc.keys(&values)
            .filter(|k| k.starts_with(prefix))
            .filter_map(|key| {
                let (v, id) = doc.get(&values, key.as_str()).ok().flatten()?;
                let text = v.as_str()?.to_string();
                let author = match &id {
                    automerge::ObjId::Id(_, actor, _) => crate::actor::author_of(actor.to_bytes()),
                    automerge::ObjId::Root => None,
                };
                Some(AuthoredString { key, text, author })
            })
            .collect()
    }
}

/// A string setting and who wrote it ([`Settings::strings_with_author`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthoredString {
    /// The key.
    pub key: String,
    /// The value.
    pub text: String,
    /// The device id of the writer, if the actor id has the iom shape.
    pub author: Option<[u8; crate::actor::DEVICE_ID_LEN]>,
}

impl<D: BorrowMut<Document>> Settings<D> {
    /// Sets a key.
    pub fn set(&mut self, key: &str, value: &Json, now: i64) -> Result<(), SettingsError> {
        if key.is_empty() {
            return Err(SettingsError::EmptyKey);
        }
        self.0
            .borrow_mut()
            .change(&format!("set {key}"), now, |tx| {
                let values = match fields::object(tx, &ROOT, FIELD_VALUES, ObjType::Map) {
                    Some(v) => v,
                    None => tx.put_object(ROOT, FIELD_VALUES, ObjType::Map)?,
                };
                write_json(tx, &values, At::Key(key), value, 0)?;
                Ok(())
            })
    }

    /// Removes a key. Returns `false` if it was not set.
    pub fn remove(&mut self, key: &str, now: i64) -> Result<bool, SettingsError> {
        let doc = self.document().automerge();
        let Some(values) = fields::object(doc, &ROOT, FIELD_VALUES, ObjType::Map) else {
            return Ok(false);
        };
        if doc.get(&values, key)?.is_none() {
            return Ok(false);
        }
        self.0
            .borrow_mut()
            .change(&format!("unset {key}"), now, |tx| {
                tx.delete(&values, key)?;
                Ok(true)
            })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::actor::actor_for;

    #[test]
    fn set_get_list_remove() {
        let mut d = Document::new(DocKind::Settings, &actor_for(&[1; 32], [1; 8]), 1).expect("new");
        let mut s = Settings::open(&mut d).expect("open");
        s.set("agent.model", &json!("claude-x"), 2).expect("set");
        s.set(
            "limits",
            &json!({"daily_tokens": 100000, "hosts": ["a", "b"]}),
            2,
        )
        .expect("set");
        assert_eq!(s.get("agent.model"), Some(json!("claude-x")));
        assert_eq!(
            s.get("limits"),
            Some(json!({"daily_tokens": 100000, "hosts": ["a", "b"]}))
        );
        assert_eq!(s.list().len(), 2);
        assert!(matches!(
            s.set("", &json!(1), 3),
            Err(SettingsError::EmptyKey)
        ));
        assert!(s.remove("limits", 4).expect("rm"));
        assert!(!s.remove("limits", 4).expect("rm again"));
        assert_eq!(s.get("limits"), None);
    }

    #[test]
    fn string_settings_carry_their_author() {
        let mut d = Document::new(DocKind::Settings, &actor_for(&[1; 32], [1; 8]), 1).expect("new");
        Settings::open(&mut d)
            .expect("open")
            .set("mcp.server.time", &json!("{}"), 2)
            .expect("set");
        let mut other = Document::load(&d.save(), &actor_for(&[2; 32], [2; 8])).expect("load");
        Settings::open(&mut other)
            .expect("open")
            .set("mcp.server.git", &json!("{\"a\":1}"), 3)
            .expect("set");
        Settings::open(&mut other)
            .expect("open")
            .set("mcp.other", &json!({"not": "a string"}), 3)
            .expect("set");
        let got = Settings::open(&other)
            .expect("open")
            .strings_with_author("mcp.server.");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].key, "mcp.server.git");
        assert_eq!(got[0].author, Some([2; 32]));
        assert_eq!(got[1].text, "{}");
        assert_eq!(got[1].author, Some([1; 32]));
    }
}
