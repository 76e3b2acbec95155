//! What one WebSocket client hears of the mesh: every durable document change, and the
//! progress and end of every request (of any device and interface) that is running or starts
//! while the socket is open.
//!
//! The feed reads the conversation again on each change and reports what is new since its
//! last look ([`Seen::diff`], the same diff the SSE stream uses), so a burst of progress
//! writes is coalesced into one `text` event with the whole new text.

use std::collections::{HashMap, HashSet};

use iom_crdt::{DocId, MessageView, Status};

use super::codec::{ChangeOrigin, ServerMsg};
use crate::agent::ask::Seen;
use crate::agent::conversations::Conversations;
use crate::docs::{DocChanged, Origin};

/// One request the feed knows of.
#[derive(Debug, Default)]
struct Tracked {
    seen: Seen,
    /// The client's id, when the request was asked on this socket.
    id: Option<String>,
    finished: bool,
}

/// The feed of one socket.
#[derive(Debug)]
pub struct MeshFeed {
    conversations: Conversations,
    /// Unix seconds when the socket opened: requests that had finished before are not
    /// reported.
    since: i64,
    requests: HashMap<(DocId, String), Tracked>,
}

impl MeshFeed {
    /// A feed from now on.
    pub fn new(conversations: Conversations) -> MeshFeed {
        let since = conversations.now();
        MeshFeed {
            conversations,
            since,
            requests: HashMap::new(),
        }
    }

    /// Records that the client asked `rid` in `doc` with its `id`: the request's events
    /// carry that id, and the request is looked at again after a lag.
    pub fn asked(&mut self, doc: DocId, rid: &str, id: Option<String>) {
        self.requests.entry((doc, rid.to_string())).or_default().id = id;
    }

    /// The messages for a document change: `doc_changed`, then the request events it
    /// brought.
    pub async fn on_change(&mut self, change: &DocChanged) -> Vec<ServerMsg> {
        let meta = self.conversations.docs().meta(change.id).ok().flatten();
        let kind = meta.map(|m| m.kind).unwrap_or_default();
        let (origin, peer) = match change.origin {
            Origin::Local => (ChangeOrigin::Local, None),
            Origin::Peer(p) => (ChangeOrigin::Peer, Some(p.to_string())),
        };
        let mut out = vec![ServerMsg::DocChanged {
            doc: change.id.to_string(),
            kind: kind.clone(),
            heads: change.heads.iter().map(|h| hex::encode(h.0)).collect(),
            origin,
            peer,
        }];
        if kind == iom_crdt::DocKind::Conversation.name() {
            out.extend(self.look(change.id).await);
        }
        out
    }

    /// Looks again at every conversation with a request that has not finished (after a lag,
    /// and now and then as a safety net).
    pub async fn look_again(&mut self) -> Vec<ServerMsg> {
        let docs: HashSet<DocId> = self
            .requests
            .iter()
            .filter(|(_, t)| !t.finished)
            .map(|((d, _), _)| *d)
            .collect();
        let mut out = Vec::new();
        for doc in docs {
            out.extend(self.look(doc).await);
        }
        out
    }

    /// Requests the feed follows that have not finished.
    pub fn following(&self) -> usize {
        self.requests.values().filter(|t| !t.finished).count()
    }

    async fn look(&mut self, doc: DocId) -> Vec<ServerMsg> {
        let finished: HashSet<String> = self
            .requests
            .iter()
            .filter(|((d, _), t)| *d == doc && t.finished)
            .map(|((_, r), _)| r.clone())
            .collect();
        let read = self
            .conversations
            .read(doc, move |c| {
                c.requests()
                    .into_iter()
                    .filter(|m| m.request_id.as_ref().is_some_and(|r| !finished.contains(r)))
                    .map(|m| {
                        let reply = m
                            .request_id
                            .as_deref()
                            .and_then(|r| c.replies_to(r).into_iter().last());
                        (m, reply)
                    })
                    .collect::<Vec<_>>()
            })
            .await;
        let Ok(Ok(requests)) = read else {
            return Vec::new(); // gone or not a conversation: its doc_changed said enough
        };
        let mut out = Vec::new();
        for (req, reply) in requests {
            out.extend(self.request_events(doc, &req, reply.as_ref()));
        }
        out
    }

    fn request_events(
        &mut self,
        doc: DocId,
        req: &MessageView,
        reply: Option<&MessageView>,
    ) -> Vec<ServerMsg> {
        let Some(rid) = req.request_id.clone() else {
            return Vec::new();
        };
        let since = self.since;
        let t = self.requests.entry((doc, rid.clone())).or_insert_with(|| {
            // First sight of a request that finished before the socket opened: old news.
            let old = matches!(req.status, Some(Status::Done | Status::Failed))
                && req.created_at.is_some_and(|c| c < since);
            Tracked {
                finished: old,
                ..Tracked::default()
            }
        });
        if t.finished {
            return Vec::new();
        }
        let events = t.seen.diff(req, reply);
        t.finished = events.iter().any(|e| e.is_final());
        let conversation = doc.to_string();
        events
            .into_iter()
            .map(|event| ServerMsg::Request {
                id: t.id.clone(),
                conversation: conversation.clone(),
                request_id: rid.clone(),
                event,
            })
            .collect()
    }
}
