//! The memory document: one text (CLAUDE.md-style), at [`crate::DocId::MEMORY`].
//!
//! Edits use Automerge text operations, so appends made concurrently on two devices both survive.

use std::borrow::{Borrow, BorrowMut};

use automerge::transaction::Transactable;
use automerge::{ObjType, ROOT, ReadDoc};

use crate::document::{Document, DocumentError};
use crate::fields;
use crate::kind::DocKind;

/// Root field holding the memory text (an Automerge text object).
pub const FIELD_TEXT: &str = "text";

/// Typed access to a memory document. Wraps `&Document` (read) or `&mut Document` (write).
#[derive(Debug)]
pub struct Memory<D>(D);

impl<D: Borrow<Document>> Memory<D> {
    /// Wraps a document, checking that it is a memory document.
    pub fn open(doc: D) -> Result<Self, DocumentError> {
        doc.borrow().expect_kind(DocKind::Memory)?;
        Ok(Memory(doc))
    }

    /// The underlying document.
    pub fn document(&self) -> &Document {
        self.0.borrow()
    }

    /// The memory text (empty if missing).
    pub fn text(&self) -> String {
        fields::string(self.document().automerge(), &ROOT, FIELD_TEXT).unwrap_or_default()
    }
}

impl<D: BorrowMut<Document>> Memory<D> {
    /// Appends `text` at the end, as one change.
    pub fn append(&mut self, text: &str, message: &str, now: i64) -> Result<(), DocumentError> {
        self.0.borrow_mut().change(message, now, |tx| {
            let obj = match fields::object(tx, &ROOT, FIELD_TEXT, ObjType::Text) {
                Some(obj) => obj,
                None => tx.put_object(ROOT, FIELD_TEXT, ObjType::Text)?,
            };
            let end = tx.length(&obj);
            tx.splice_text(&obj, end, 0, text)?;
            Ok(())
        })
    }

    /// Replaces the whole text with `text`, as one change. The edit is a diff against the
    /// current text, so concurrent edits elsewhere in the text survive.
    pub fn replace(&mut self, text: &str, message: &str, now: i64) -> Result<(), DocumentError> {
        self.0.borrow_mut().change(message, now, |tx| {
            let obj = match fields::object(tx, &ROOT, FIELD_TEXT, ObjType::Text) {
                Some(obj) => obj,
                None => tx.put_object(ROOT, FIELD_TEXT, ObjType::Text)?,
            };
            tx.update_text(&obj, text)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actor::actor_for;

    #[test]
    fn append_and_replace() {
        let mut d = Document::new(DocKind::Memory, &actor_for(&[1; 32], [1; 8]), 1).expect("new");
        let mut m = Memory::open(&mut d).expect("open");
        m.append("I like tea.\n", "note", 2).expect("append");
        m.append("Ünïcode ✓\n", "note", 3).expect("append");
        assert_eq!(m.text(), "I like tea.\nÜnïcode ✓\n");
        m.replace("I like coffee.\n", "edit", 4).expect("replace");
        assert_eq!(m.text(), "I like coffee.\n");
        assert_eq!(
            d.history()
                .last()
                .and_then(|c| c.message.clone())
                .as_deref(),
            Some("edit")
        );
        assert_eq!(Memory::open(&d).expect("read").text(), "I like coffee.\n");
    }

    #[test]
    fn wrong_kind_is_refused() {
        let d = Document::new(DocKind::Settings, &actor_for(&[1; 32], [1; 8]), 1).expect("new");
        assert!(matches!(
            Memory::open(&d),
            Err(DocumentError::WrongKind { .. })
        ));
    }
}
