//! [`Conversations`]: conversation documents as the agent, the asking side, the scheduler and
//! webhooks use them. The one place that creates a titled conversation, checks that an id is a
//! conversation, and runs "open the conversation, change it, store it" with typed errors.

use iom_crdt::{Conversation, ConversationError, DocId, DocKind, Document, DocumentError};
use serde_json::{Value, json};

use super::clock::SharedClock;
use crate::docs::{Docs, DocsError, Origin};

/// Characters of a prompt kept as a conversation's title.
pub const TITLE_CHARS: usize = 60;

/// Why an edit of a conversation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EditError {
    /// The document could not be loaded or stored.
    #[error(transparent)]
    Docs(#[from] DocsError),
    /// The document is not a conversation, or the change was refused.
    #[error(transparent)]
    Conversation(#[from] ConversationError),
}

/// Why an id does not name a conversation here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExistingError {
    /// The store could not be read.
    #[error(transparent)]
    Docs(#[from] DocsError),
    /// No document with this id on this device.
    #[error("no conversation {0} on this device (see `iom conversations list`)")]
    NotFound(DocId),
    /// The document is of another kind.
    #[error("{id} is a {kind} document, not a conversation")]
    WrongKind {
        /// The document.
        id: DocId,
        /// Its kind.
        kind: String,
    },
}

/// Why a conversation could not be shown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShowError {
    /// The document could not be loaded.
    #[error(transparent)]
    Docs(#[from] DocsError),
    /// The document is not a conversation.
    #[error("{id} is not a conversation: {source}")]
    NotAConversation {
        /// The document.
        id: DocId,
        /// Why.
        source: DocumentError,
    },
}

/// The title of a conversation started by `prompt`: its first [`TITLE_CHARS`] characters.
pub fn title_from(prompt: &str) -> String {
    prompt.chars().take(TITLE_CHARS).collect()
}

/// Every conversation in `docs` with the unix seconds of its last change here, the most
/// recently changed first.
pub fn newest_first(docs: &Docs) -> Result<Vec<(DocId, u64)>, DocsError> {
    let mut convs: Vec<(DocId, u64)> = docs
        .list_kind(DocKind::Conversation)?
        .into_iter()
        .map(|(id, m)| (id, m.updated_at))
        .collect();
    convs.sort_by_key(|c| std::cmp::Reverse(c.1));
    Ok(convs)
}

/// Waits until `changes` reports a change of `doc` (or a lag, which may have hidden one), or
/// `poll` passes (a safety net for followers).
pub async fn next_change(
    changes: &mut tokio::sync::broadcast::Receiver<crate::docs::DocChanged>,
    doc: DocId,
    poll: std::time::Duration,
) {
    let _ = tokio::time::timeout(poll, async {
        loop {
            match changes.recv().await {
                Ok(ch) if ch.id == doc => return,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                Err(_) => std::future::pending::<()>().await,
            }
        }
    })
    .await;
}

/// Conversation documents over the document service; cheap to clone.
#[derive(Debug, Clone)]
pub struct Conversations {
    docs: Docs,
    clock: SharedClock,
}

impl Conversations {
    /// Conversations in `docs`, with edit times from `clock`.
    pub fn new(docs: Docs, clock: SharedClock) -> Conversations {
        Conversations { docs, clock }
    }

    /// The document service underneath.
    pub fn docs(&self) -> &Docs {
        &self.docs
    }

    /// Unix seconds now, as written into edits.
    pub fn now(&self) -> i64 {
        self.clock.now_secs()
    }

    /// Creates a conversation titled `title` (as given; see [`title_from`]).
    pub async fn create(&self, title: &str) -> Result<DocId, EditError> {
        let id = self.docs.create(DocKind::Conversation).await?;
        let title = title.to_string();
        self.modify(id, move |c, now| c.set_title(&title, now))
            .await?;
        Ok(id)
    }

    /// Checks that `id` is a conversation stored on this device.
    pub fn existing(&self, id: DocId) -> Result<DocId, ExistingError> {
        let meta = self.docs.meta(id)?.ok_or(ExistingError::NotFound(id))?;
        if meta.kind != DocKind::Conversation.name() {
            return Err(ExistingError::WrongKind {
                id,
                kind: meta.kind,
            });
        }
        Ok(id)
    }

    /// Whether `id` is a conversation stored here (a store error reads as "no").
    pub fn is_conversation(&self, id: DocId) -> bool {
        self.docs
            .meta(id)
            .ok()
            .flatten()
            .is_some_and(|m| m.kind == DocKind::Conversation.name())
    }

    /// Every conversation stored here.
    pub fn list(&self) -> Result<Vec<DocId>, DocsError> {
        Ok(self
            .docs
            .list_kind(DocKind::Conversation)?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// Every conversation stored here with the unix seconds of its last change here, the most
    /// recently changed first.
    pub fn newest_first(&self) -> Result<Vec<(DocId, u64)>, DocsError> {
        newest_first(&self.docs)
    }

    /// Opens conversation `doc`, runs `f` on it with the time now, and stores the change
    /// (flushed before this returns) as a local edit.
    pub async fn modify<R, F>(&self, doc: DocId, f: F) -> Result<R, EditError>
    where
        F: FnOnce(&mut Conversation<&mut Document>, i64) -> Result<R, ConversationError>
            + Send
            + 'static,
        R: Send + 'static,
    {
        let now = self.now();
        self.docs
            .modify(doc, Origin::Local, false, move |d| {
                Ok(Conversation::open(&mut *d)
                    .map_err(ConversationError::from)
                    .and_then(|mut c| f(&mut c, now)))
            })
            .await?
            .map_err(EditError::from)
    }

    /// Opens conversation `doc` for reading and runs `f` on it.
    pub async fn read<R, F>(&self, doc: DocId, f: F) -> Result<Result<R, DocumentError>, DocsError>
    where
        F: FnOnce(&Conversation<&Document>) -> R + Send + 'static,
        R: Send + 'static,
    {
        self.docs
            .read(doc, move |d| Conversation::open(d).map(|c| f(&c)))
            .await
    }

    /// A conversation as JSON for `iom conversations show`.
    pub async fn to_json(&self, doc: DocId) -> Result<Value, ShowError> {
        self.read(doc, move |c| {
            json!({
                "id": doc.to_string(),
                "title": c.title(),
                "messages": c.messages(),
                "summaries": c.summaries(),
                "usage": c.usage_totals(),
            })
        })
        .await?
        .map_err(|source| ShowError::NotAConversation { id: doc, source })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use std::sync::Arc;

    use iom_crdt::{Interface, Status};

    use super::*;
    use crate::agent::clock::ManualClock;
    use crate::store::Store;

    /// Documents over a real sled store in a temp dir.
    pub(crate) fn docs() -> (tempfile::TempDir, Docs) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), 1 << 20).unwrap();
        let docs = Docs::new(store, vec![7; 16], 64).unwrap();
        (dir, docs)
    }

    pub(crate) fn conversations() -> (tempfile::TempDir, Conversations, Arc<ManualClock>) {
        let (dir, docs) = docs();
        let clock = ManualClock::new(1_700_000_000);
        (dir, Conversations::new(docs, clock.clone()), clock)
    }

    #[test]
    fn titles_keep_sixty_characters() {
        assert_eq!(title_from("short"), "short");
        let long: String = "é".repeat(100);
        assert_eq!(title_from(&long).chars().count(), TITLE_CHARS);
    }

    #[tokio::test]
    async fn create_titles_the_conversation_as_given() {
        let (_dir, convs, _) = conversations();
        let id = convs.create("webhook: alice").await.unwrap();
        let title = convs.read(id, |c| c.title()).await.unwrap().unwrap();
        assert_eq!(title, "webhook: alice");
        assert_eq!(convs.existing(id).unwrap(), id);
        assert!(convs.is_conversation(id));
        assert_eq!(convs.list().unwrap(), vec![id]);
    }

    #[tokio::test]
    async fn existing_refuses_missing_and_other_kinds() {
        let (_dir, convs, _) = conversations();
        let missing = DocId::from_bytes([9; 16]);
        let e = convs.existing(missing).unwrap_err();
        assert!(matches!(e, ExistingError::NotFound(_)));
        assert!(e.to_string().contains("iom conversations list"), "{e}");
        let memory = convs.docs().create(DocKind::Memory).await.unwrap();
        let e = convs.existing(memory).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{memory} is a memory document, not a conversation")
        );
        assert!(!convs.is_conversation(memory));
        assert!(convs.list().unwrap().is_empty());
    }

    #[tokio::test]
    async fn modify_uses_the_clock_and_maps_errors() {
        let (_dir, convs, clock) = conversations();
        let id = convs.create("t").await.unwrap();
        clock.set(1_234);
        convs
            .modify(id, |c, now| {
                assert_eq!(now, 1_234);
                c.append_request("r1", "hello", Interface::Cli, "dev", now)
            })
            .await
            .unwrap();
        let req = convs
            .read(id, |c| c.find_request("r1"))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(req.status, Some(Status::Pending));
        // A refused change is a conversation error, not a store error.
        let e = convs
            .modify(id, |c, now| c.set_status("nope", Status::Done, None, now))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                EditError::Conversation(ConversationError::RequestNotFound(_))
            ),
            "{e:?}"
        );
        // A document of another kind does not open as a conversation.
        let memory = convs.docs().create(DocKind::Memory).await.unwrap();
        let e = convs.modify(memory, |c, now| c.set_title("x", now)).await;
        assert!(matches!(
            e,
            Err(EditError::Conversation(ConversationError::Document(_)))
        ));
        let e = convs.to_json(memory).await.unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{memory} is not a conversation"))
        );
        let missing = DocId::from_bytes([3; 16]);
        assert!(matches!(
            convs.modify(missing, |c, now| c.set_title("x", now)).await,
            Err(EditError::Docs(DocsError::NotFound(_)))
        ));
    }

    #[tokio::test]
    async fn to_json_shows_title_and_messages() {
        let (_dir, convs, _) = conversations();
        let id = convs.create("about cats").await.unwrap();
        convs
            .modify(id, |c, now| {
                c.append_request("r1", "meow?", Interface::Web, "dev", now)
            })
            .await
            .unwrap();
        let j = convs.to_json(id).await.unwrap();
        assert_eq!(j["id"], id.to_string());
        assert_eq!(j["title"], "about cats");
        assert_eq!(j["messages"][0]["text"], "meow?");
    }
}
