//! Files the agent sent to the asking device: blobs saved from a conversation's workspace
//! (the `send_file` tool), listed under the conversation's root field `files` so that every
//! device sees what was sent, to whom, and by which request.
//!
//! A list entry: `{request_id, name, hash (blob SHA-256, hex), len, to (device id),
//! created_at}`.

use std::borrow::{Borrow, BorrowMut};

use automerge::transaction::Transactable;
use automerge::{AutomergeError, ObjType, ROOT, ReadDoc};
use serde::{Deserialize, Serialize};

use crate::document::{Document, DocumentError};
use crate::fields::{self, MapFields};
use crate::kind::DocKind;

/// Root field of a conversation: the files sent.
pub const FIELD_FILES: &str = "files";

/// A file the agent sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentFile {
    /// The request whose run sent it.
    pub request_id: String,
    /// File name (no directories).
    pub name: String,
    /// The blob's SHA-256, hex.
    pub hash: String,
    /// Size in bytes.
    pub len: u64,
    /// The device it is for (the asking device).
    pub to: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// The sent files of a conversation document.
#[derive(Debug)]
pub struct Outbox<D>(D);

impl<D: Borrow<Document>> Outbox<D> {
    /// Wraps a document, checking that it is a conversation.
    pub fn open(doc: D) -> Result<Self, DocumentError> {
        doc.borrow().expect_kind(DocKind::Conversation)?;
        Ok(Outbox(doc))
    }

    /// Every readable entry, in order.
    pub fn list(&self) -> Vec<SentFile> {
        let doc = self.0.borrow().automerge();
        let Some(list) = fields::object(doc, &ROOT, FIELD_FILES, ObjType::List) else {
            return Vec::new();
        };
        fields::maps_in(doc, &list, ..)
            .into_iter()
            .filter_map(|(_, obj)| {
                let f = MapFields::read(doc, &obj);
                Some(SentFile {
                    request_id: f.string(doc, "request_id")?,
                    name: f.string(doc, "name")?,
                    hash: f.string(doc, "hash")?,
                    len: f.uint("len").unwrap_or(0),
                    to: f.string(doc, "to").unwrap_or_default(),
                    created_at: f.int("created_at").unwrap_or(0),
                })
            })
            .collect()
    }

    /// The files sent by the run of `request_id`.
    pub fn of_request(&self, request_id: &str) -> Vec<SentFile> {
        self.list()
            .into_iter()
            .filter(|f| f.request_id == request_id)
            .collect()
    }
}

impl<D: BorrowMut<Document>> Outbox<D> {
    /// Appends an entry (`created_at` is set to `now`).
    pub fn push(&mut self, file: &SentFile, now: i64) -> Result<(), AutomergeError> {
        let message = format!("{} sent {}", file.request_id, file.name);
        self.0.borrow_mut().change(&message, now, |tx| {
            let list = match fields::object(tx, &ROOT, FIELD_FILES, ObjType::List) {
                Some(l) => l,
                None => tx.put_object(ROOT, FIELD_FILES, ObjType::List)?,
            };
            let at = tx.length(&list);
            let m = tx.insert_object(&list, at, ObjType::Map)?;
            tx.put(&m, "request_id", file.request_id.as_str())?;
            tx.put(&m, "name", file.name.as_str())?;
            tx.put(&m, "hash", file.hash.as_str())?;
            tx.put(&m, "len", file.len)?;
            tx.put(&m, "to", file.to.as_str())?;
            tx.put(&m, "created_at", now)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actor::actor_for;

    #[test]
    fn sent_files_are_listed_by_request() {
        let mut d =
            Document::new(DocKind::Conversation, &actor_for(&[2; 32], [1; 8]), 1).expect("new");
        let mut o = Outbox::open(&mut d).expect("open");
        assert!(o.list().is_empty());
        let f = SentFile {
            request_id: "r1".into(),
            name: "report.txt".into(),
            hash: "ab".repeat(32),
            len: 5,
            to: "laptop".into(),
            created_at: 7,
        };
        o.push(&f, 7).expect("push");
        assert_eq!(o.of_request("r1"), vec![f]);
        assert!(o.of_request("r2").is_empty());
        let mut settings =
            Document::new(DocKind::Settings, &actor_for(&[2; 32], [1; 8]), 1).expect("new");
        assert!(Outbox::open(&mut settings).is_err());
    }
}
