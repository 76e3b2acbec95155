//! The schedules document, at [`crate::DocId::SCHEDULES`].
//!
//! Layout: root `entries` is a map from schedule id to
//! `{cron, prompt, conversation?, enabled, enabled_at?, created_at, last_fired_slot?,
//! last_fired_epoch?, to?}` (`to`: `email` delivers results by mail too). `enabled_at` is written when a schedule is enabled again: slots before
//! it (while it was off) are neither fired nor counted as missed.
//! Cron syntax is checked by the scheduler in `node/`, not here.
//!
//! `last_fired_slot` (the scheduled time, unix seconds, of the last run) makes firing
//! idempotent: [`Schedules::mark_fired`] only moves it forward.

use std::borrow::{Borrow, BorrowMut};

use automerge::transaction::Transactable;
use automerge::{AutomergeError, ObjId, ObjType, ROOT, ReadDoc};
use serde::{Deserialize, Serialize};

use crate::document::{Document, DocumentError};
use crate::fields;
use crate::kind::DocKind;

/// Root field: the map of schedules.
pub const FIELD_ENTRIES: &str = "entries";

/// Errors of schedule operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// A schedule with this id exists already.
    #[error("schedule {0:?} already exists")]
    AlreadyExists(String),
    /// No schedule with this id.
    #[error("no schedule {0:?}")]
    NotFound(String),
    /// The id is empty.
    #[error("schedule id must not be empty")]
    EmptyId,
    /// The document is not a schedules document.
    #[error(transparent)]
    Document(#[from] DocumentError),
    /// An Automerge operation failed.
    #[error("automerge: {0}")]
    Automerge(Box<AutomergeError>),
}

impl From<AutomergeError> for ScheduleError {
    fn from(e: AutomergeError) -> Self {
        ScheduleError::Automerge(Box::new(e))
    }
}

/// A schedule, as read from the document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleView {
    /// Schedule id.
    pub id: String,
    /// Cron expression.
    pub cron: String,
    /// Prompt sent to the agent when it fires.
    pub prompt: String,
    /// Conversation (document id hex) to post into; `None` means a new one each time.
    pub conversation: Option<String>,
    /// Whether it fires.
    pub enabled: bool,
    /// Scheduled time (unix seconds) of the last firing.
    pub last_fired_slot: Option<i64>,
    /// Agent-role epoch of the last firing.
    pub last_fired_epoch: Option<u64>,
    /// Unix seconds.
    pub created_at: Option<i64>,
    /// Unix seconds of the last time it was enabled again after being disabled.
    #[serde(default)]
    pub enabled_at: Option<i64>,
    /// Where results are delivered besides the conversation: `email` (by the email channel,
    /// to the owner's address).
    #[serde(default)]
    pub to: Option<String>,
    /// The model its requests ask for (`NAME` or `NAME/MODEL`); `None`: the mesh default.
    #[serde(default)]
    pub model: Option<String>,
}

/// Typed access to the schedules document. Wraps `&Document` (read) or `&mut Document`.
#[derive(Debug)]
pub struct Schedules<D>(D);

impl<D: Borrow<Document>> Schedules<D> {
    /// Wraps a document, checking that it is a schedules document.
    pub fn open(doc: D) -> Result<Self, DocumentError> {
        doc.borrow().expect_kind(DocKind::Schedules)?;
        Ok(Schedules(doc))
    }

    /// The underlying document.
    pub fn document(&self) -> &Document {
        self.0.borrow()
    }

    /// All readable schedules, sorted by id. Entries missing `cron` or `prompt` are skipped.
    pub fn list(&self) -> Vec<ScheduleView> {
        let doc = self.document().automerge();
        let Some(entries) = fields::object(doc, &ROOT, FIELD_ENTRIES, ObjType::Map) else {
            return Vec::new();
        };
        doc.keys(&entries)
            .filter_map(|id| read_entry(doc, &entries, &id))
            .collect()
    }

    /// One schedule.
    pub fn get(&self, id: &str) -> Option<ScheduleView> {
        let doc = self.document().automerge();
        let entries = fields::object(doc, &ROOT, FIELD_ENTRIES, ObjType::Map)?;
        read_entry(doc, &entries, id)
    }
}

impl<D: BorrowMut<Document>> Schedules<D> {
    /// Adds an enabled schedule.
    pub fn add(
        &mut self,
        id: &str,
        cron: &str,
        prompt: &str,
        conversation: Option<&str>,
        now: i64,
    ) -> Result<(), ScheduleError> {
        if id.is_empty() {
            return Err(ScheduleError::EmptyId);
        }
        if self.get(id).is_some() {
            return Err(ScheduleError::AlreadyExists(id.to_owned()));
        }
        self.0
            .borrow_mut()
            .change(&format!("add schedule {id}"), now, |tx| {
                let entries = match fields::object(tx, &ROOT, FIELD_ENTRIES, ObjType::Map) {
                    Some(e) => e,
                    None => tx.put_object(ROOT, FIELD_ENTRIES, ObjType::Map)?,
                };
                let e = tx.put_object(&entries, id, ObjType::Map)?;
                tx.put(&e, "cron", cron)?;
                tx.put(&e, "prompt", prompt)?;
                if let Some(c) = conversation {
                    tx.put(&e, "conversation", c)?;
                }
                tx.put(&e, "enabled", true)?;
                tx.put(&e, "created_at", now)?;
                Ok(())
            })
    }

    /// Removes a schedule. Returns `false` if it did not exist.
    pub fn remove(&mut self, id: &str, now: i64) -> Result<bool, ScheduleError> {
        let Some(entries) = self.entries_of(id) else {
            return Ok(false);
        };
        self.0
            .borrow_mut()
            .change(&format!("remove schedule {id}"), now, |tx| {
                tx.delete(&entries, id)?;
                Ok(true)
            })
    }

    /// Enables or disables a schedule.
    pub fn set_enabled(&mut self, id: &str, enabled: bool, now: i64) -> Result<(), ScheduleError> {
        let entry = self.entry(id)?;
        let verb = if enabled { "enable" } else { "disable" };
        self.0
            .borrow_mut()
            .change(&format!("{verb} schedule {id}"), now, |tx| {
                tx.put(&entry, "enabled", enabled)?;
                if enabled {
                    tx.put(&entry, "enabled_at", now)?;
                }
                Ok(())
            })
    }

    /// Sets where results are delivered besides the conversation (`email`).
    pub fn set_to(&mut self, id: &str, to: &str, now: i64) -> Result<(), ScheduleError> {
        let entry = self.entry(id)?;
        self.0
            .borrow_mut()
            .change(&format!("schedule {id}: deliver to {to}"), now, |tx| {
                tx.put(&entry, "to", to)?;
                Ok(())
            })
    }

    /// Sets the model the schedule's requests ask for.
    pub fn set_model(&mut self, id: &str, model: &str, now: i64) -> Result<(), ScheduleError> {
        let entry = self.entry(id)?;
        self.0
            .borrow_mut()
            .change(&format!("schedule {id}: model {model}"), now, |tx| {
                tx.put(&entry, "model", model)?;
                Ok(())
            })
    }

    /// Records that the schedule fired for `slot` under agent-role `epoch`. Returns `false` and
    /// writes nothing if a slot at or after `slot` was already recorded.
    pub fn mark_fired(
        &mut self,
        id: &str,
        slot: i64,
        epoch: u64,
        now: i64,
    ) -> Result<bool, ScheduleError> {
        let entry = self.entry(id)?;
        if self
            .get(id)
            .and_then(|s| s.last_fired_slot)
            .is_some_and(|last| last >= slot)
        {
            return Ok(false);
        }
        self.0
            .borrow_mut()
            .change(&format!("fired schedule {id} slot {slot}"), now, |tx| {
                tx.put(&entry, "last_fired_slot", slot)?;
                tx.put(&entry, "last_fired_epoch", epoch)?;
                Ok(true)
            })
    }

    fn entries_of(&self, id: &str) -> Option<ObjId> {
        let doc = self.document().automerge();
        let entries = fields::object(doc, &ROOT, FIELD_ENTRIES, ObjType::Map)?;
        doc.get(&entries, id).ok().flatten().map(|_| entries)
    }

    fn entry(&self, id: &str) -> Result<ObjId, ScheduleError> {
        let doc = self.document().automerge();
        fields::object(doc, &ROOT, FIELD_ENTRIES, ObjType::Map)
            .and_then(|entries| fields::object(doc, &entries, id, ObjType::Map))
            .ok_or_else(|| ScheduleError::NotFound(id.to_owned()))
    }
}

fn read_entry<R: ReadDoc>(doc: &R, entries: &ObjId, id: &str) -> Option<ScheduleView> {
    let e = fields::object(doc, entries, id, ObjType::Map)?;
    Some(ScheduleView {
        id: id.to_owned(),
        cron: fields::string(doc, &e, "cron")?,
        prompt: fields::string(doc, &e, "prompt")?,
        conversation: fields::string(doc, &e, "conversation"),
        enabled: fields::boolean(doc, &e, "enabled").unwrap_or(true),
        last_fired_slot: fields::int(doc, &e, "last_fired_slot"),
        last_fired_epoch: fields::uint(doc, &e, "last_fired_epoch"),
        created_at: fields::int(doc, &e, "created_at"),
        enabled_at: fields::int(doc, &e, "enabled_at"),
        to: fields::string(doc, &e, "to"),
        model: fields::string(doc, &e, "model"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actor::actor_for;

    #[test]
    fn add_list_fire_remove() {
        let mut d =
            Document::new(DocKind::Schedules, &actor_for(&[1; 32], [1; 8]), 1).expect("new");
        let mut s = Schedules::open(&mut d).expect("open");
        s.add("daily", "0 9 * * *", "Plan my day", None, 10)
            .expect("add");
        s.add(
            "weekly",
            "0 9 * * MON",
            "Review",
            Some("ab".repeat(16).as_str()),
            10,
        )
        .expect("add");
        assert!(matches!(
            s.add("daily", "x", "y", None, 11),
            Err(ScheduleError::AlreadyExists(_))
        ));
        assert!(matches!(
            s.add("", "x", "y", None, 11),
            Err(ScheduleError::EmptyId)
        ));
        let list = s.list();
        assert_eq!(
            list.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
            ["daily", "weekly"]
        );
        assert!(list[0].enabled);
        assert_eq!(list[0].model, None);
        s.set_model("daily", "local", 11).expect("model");
        assert_eq!(
            s.get("daily").and_then(|v| v.model).as_deref(),
            Some("local")
        );
        assert!(s.set_model("nope", "local", 11).is_err());
        assert_eq!(
            list[1].conversation.as_deref(),
            Some("ab".repeat(16).as_str())
        );

        assert!(s.mark_fired("daily", 1000, 2, 12).expect("fire"));
        assert!(!s.mark_fired("daily", 1000, 2, 13).expect("same slot again"));
        assert!(!s.mark_fired("daily", 900, 2, 13).expect("older slot"));
        let daily = s.get("daily").expect("daily");
        assert_eq!(
            (daily.last_fired_slot, daily.last_fired_epoch),
            (Some(1000), Some(2))
        );

        s.set_enabled("weekly", false, 14).expect("disable");
        assert!(!s.get("weekly").expect("weekly").enabled);
        s.set_enabled("weekly", true, 15).expect("enable");
        let w = s.get("weekly").expect("weekly");
        assert!(w.enabled);
        assert_eq!(w.enabled_at, Some(15));
        assert!(s.remove("weekly", 15).expect("remove"));
        assert!(!s.remove("weekly", 15).expect("remove again"));
        assert!(matches!(
            s.mark_fired("weekly", 1, 1, 1),
            Err(ScheduleError::NotFound(_))
        ));
        assert_eq!(s.list().len(), 1);
    }
}
