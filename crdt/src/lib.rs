//! `iom-crdt`: iom's object model on Automerge. Pure: no I/O, no clocks, no OS randomness
//! (times, actor ids and random bytes are arguments).
//!
//! - [`Document`] wraps an Automerge document with iom's root fields (`kind`, `schema_version`,
//!   `created_at`), commits every local write as one change with a message and a time, and gives
//!   history ([`Document::history`]), past versions ([`Document::view_at`]), JSON views and
//!   path edits ([`Document::to_json`], [`Document::put_json`]) and migrations
//!   ([`Document::migrate`]).
//! - Typed accessors over a document: [`Conversation`], [`Memory`], [`Schedules`],
//!   [`Settings`]. They wrap `&Document` for reads or `&mut Document` for writes, and leave
//!   fields they do not know alone, so fields written by newer builds survive.
//! - [`inventory`] digests many documents' heads so two nodes find what differs cheaply.
//! - [`sync`] is the per-peer, per-document Automerge sync state machine.
//!
//! Singleton documents ([`DocId::MEMORY`], [`DocId::SCHEDULES`], [`DocId::SETTINGS`]) start with
//! a deterministic first change, so devices that create them independently merge cleanly.
//!
//! # Layout
//!
//! - [`doc_id`]: [`DocId`], 16 bytes, 32 hex characters, well-known ids.
//! - [`kind`]: [`DocKind`] and current schema versions.
//! - [`actor`]: actor ids `device (32) || random (8)`; [`actor_for`], [`author_of`].
//! - [`document`]: [`Document`], [`ChangeInfo`], heads parsing.
//! - [`json`]: JSON view and path edits ([`PathError`]).
//! - [`schema`]: schema versions and migrations.
//! - [`conversation`], [`memory`], [`schedules`], [`settings`]: typed accessors;
//!   [`models`]: the model providers, kept in the settings document.
//! - [`progress`]: a running request's progress, appended to (never rewritten).
//! - [`approvals`]: the approval policy (settings) and approval requests (conversations).
//! - [`outbox`]: files the agent sent to the asking device (conversations).
//! - [`inventory`]: hierarchical digest for reconnects.
//! - [`sync`]: [`sync::PeerDocState`], [`sync::generate`], [`sync::receive`].
//! - [`session`]: one sync session with one peer, a sans-I/O state machine.
//! - `test_utils` (feature `test-utils`): in-memory sync loops and convergence asserts.
//!
//! ```
//! use iom_crdt::{actor_for, Conversation, DocKind, Document, Interface};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let actor = actor_for(&[7; 32], [1; 8]); // 8 random bytes from the caller
//! let mut doc = Document::new(DocKind::Conversation, &actor, 1_700_000_000)?;
//! let mut conv = Conversation::open(&mut doc)?;
//! conv.append_request("req-1", "What's the weather?", Interface::Cli, "laptop", 1_700_000_001)?;
//! assert_eq!(conv.pending_requests().len(), 1);
//! assert_eq!(doc.history().len(), 2);
//! # Ok(()) }
//! ```

#![deny(missing_docs, rustdoc::broken_intra_doc_links, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod actor;
pub mod approvals;
pub mod conversation;
pub mod doc_id;
pub mod document;
mod fields;
pub mod inventory;
pub mod json;
pub mod kind;
pub mod memory;
pub mod models;
pub mod outbox;
pub mod progress;
pub mod schedules;
pub mod schema;
pub mod session;
pub mod settings;
pub mod sync;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use actor::{actor_for, author_of};
pub use approvals::{ApprovalView, Approvals};
pub use automerge::ChangeHash;
pub use conversation::{
    Answer, AppendOutcome, AttachmentView, ClaimOutcome, ClaimView, Conversation,
    ConversationError, Interface, MessageView, Role, Status, SummaryView, ToolCallView, UsageView,
};
pub use doc_id::{DocId, ParseDocIdError};
pub use document::{
    ChangeInfo, Document, DocumentError, HeadsError, heads_to_hex, parse_head, parse_heads,
};
pub use inventory::Inventory;
pub use json::PathError;
pub use kind::DocKind;
pub use memory::Memory;
pub use models::{ModelChoice, ModelSettings, Models, ModelsError, ProviderEntry, ProviderKind};
pub use outbox::{Outbox, SentFile};
pub use progress::{ProgressUpdate, ProgressView, ToolProgressView};
pub use schedules::{ScheduleError, ScheduleView, Schedules};
pub use settings::{AuthoredString, Settings, SettingsError};
