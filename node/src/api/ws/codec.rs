//! The messages of the WebSocket API (`GET /v1/ws`, subprotocol `iom.v1`): JSON text frames
//! with a `type` field, described in `docs/asyncapi.yaml`. Pure: parsing and encoding only.
//!
//! A client may send `ask` and `ping`; every message it sends may carry an `id` of its own
//! choosing, which the answers to it repeat. A frame that does not parse is answered with an
//! `error` (naming the `id` when one could be read), never by closing the socket.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::agent::ask::{Asked, Attach, RequestEvent};

/// The subprotocol the server speaks (offered by the client in `Sec-WebSocket-Protocol`).
pub const PROTOCOL: &str = "iom.v1";
/// Prefix of the subprotocol entry that carries a bearer token (for browsers, which cannot
/// set `Authorization` on a WebSocket): `iom.bearer.iom_…`.
pub const BEARER_PROTOCOL_PREFIX: &str = "iom.bearer.";
/// Largest frame or message a client may send (a prompt is at most 256 KiB).
pub const MAX_CLIENT_MESSAGE: usize = 1 << 20;
/// Longest client-chosen id.
pub const MAX_ID_LEN: usize = 128;

/// Close codes the server uses (besides the standard 1000, 1001, 1009, 1011).
pub mod close {
    /// The token (or session) this socket authenticated with was revoked.
    pub const REVOKED: u16 = 4001;
    /// The client did not read fast enough: its send queue was full.
    pub const TOO_SLOW: u16 = 4002;
}

/// A message from the client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    /// Put a request into a conversation (a new one unless `conversation` is given).
    Ask {
        /// Client-chosen id, repeated in `asked` and in the request's events.
        #[serde(default)]
        id: Option<String>,
        /// The prompt.
        prompt: String,
        /// An existing conversation.
        #[serde(default)]
        conversation: Option<String>,
        /// A request id for deduplication of retries (else the node picks one).
        #[serde(default)]
        request_id: Option<String>,
        /// Files to attach: blobs already stored here, with their names (as in
        /// `POST /v1/ask`).
        #[serde(default)]
        attachments: Vec<Attach>,
    },
    /// Answered by `pong` with the same id.
    Ping {
        /// Client-chosen id.
        #[serde(default)]
        id: Option<String>,
    },
}

impl ClientMsg {
    /// The client-chosen id.
    pub fn id(&self) -> Option<&str> {
        match self {
            ClientMsg::Ask { id, .. } | ClientMsg::Ping { id } => id.as_deref(),
        }
    }
}

/// Where a document change came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOrigin {
    /// Made on this node (by the API, the agent runner, the scheduler).
    Local,
    /// Received by sync from another device.
    Peer,
}

/// A message from the server. Clients must ignore types they do not know: new kinds of
/// events (approvals, for example) are added as new types.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// The first message on every socket.
    Hello {
        /// [`PROTOCOL`].
        protocol: &'static str,
        /// This node's device id.
        device: String,
        /// Largest message the client may send, in bytes.
        max_message_bytes: usize,
        /// Messages the server queues for a client before it closes the socket with
        /// [`close::TOO_SLOW`].
        send_queue: usize,
    },
    /// The answer to `ask`: the request is in the conversation.
    Asked {
        /// The client's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// What `POST /v1/ask` answers.
        #[serde(flatten)]
        asked: Asked,
    },
    /// Progress or the end of a request (any request of the mesh, not only this socket's).
    Request {
        /// The client's id, when the request was asked on this socket.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The conversation.
        conversation: String,
        /// The request.
        request_id: String,
        /// What happened, as in the SSE stream (`status`, `text`, `tool_started`,
        /// `tool_finished`, `retry`, `done`, `failed`).
        event: RequestEvent,
    },
    /// A document changed here (durably), locally or by sync.
    DocChanged {
        /// The document.
        doc: String,
        /// Its kind (`conversation`, `memory`, …).
        kind: String,
        /// Its heads after the change (hex).
        heads: Vec<String>,
        /// Local or by sync.
        origin: ChangeOrigin,
        /// The device it came from, for a change by sync.
        #[serde(skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
    },
    /// The server fell behind on document changes: `missed` changes were not reported one by
    /// one. Requests this socket follows are looked at again; re-read documents you mirror.
    Lagged {
        /// How many changes were skipped.
        missed: u64,
    },
    /// The answer to `ping`.
    Pong {
        /// The client's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// A message could not be handled; the socket stays open.
    Error {
        /// The client's id, when the message had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// Stable code: `bad_frame`, `bad_message`, `bad_request`, `not_found`, …
        code: String,
        /// What went wrong.
        message: String,
    },
}

impl ServerMsg {
    /// An `error` message.
    pub fn error(id: Option<String>, code: &str, message: impl Into<String>) -> ServerMsg {
        ServerMsg::Error {
            id,
            code: code.to_string(),
            message: message.into(),
        }
    }

    /// The JSON text of the message.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            // Only a bug can get here (every field serializes); say so rather than panic.
            format!(r#"{{"type":"error","code":"internal","message":"cannot encode: {e}"}}"#)
        })
    }
}

/// Why a client frame was refused: the `error` message to send back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The id, when one could be read from the frame.
    pub id: Option<String>,
    /// `bad_frame` (not JSON text) or `bad_message` (JSON, but not a valid message).
    pub code: &'static str,
    /// Why.
    pub message: String,
}

impl From<Refused> for ServerMsg {
    fn from(r: Refused) -> ServerMsg {
        ServerMsg::error(r.id, r.code, r.message)
    }
}

/// Parses a text frame from the client.
pub fn parse(text: &str) -> Result<ClientMsg, Refused> {
    let value: Value = serde_json::from_str(text).map_err(|e| Refused {
        id: None,
        code: "bad_frame",
        message: format!("not JSON: {e}"),
    })?;
    let id = match value.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_LEN => Some(s.clone()),
        Some(_) => {
            return Err(Refused {
                id: None,
                code: "bad_message",
                message: format!("`id` must be a string of 1 to {MAX_ID_LEN} characters"),
            });
        }
    };
    let Some(kind) = value
        .get("type")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return Err(Refused {
            id,
            code: "bad_message",
            message: "a message is a JSON object with a string `type` (`ask` or `ping`)".into(),
        });
    };
    serde_json::from_value(value).map_err(|e| Refused {
        id,
        code: "bad_message",
        message: match kind.as_str() {
            "ask" | "ping" => format!("bad `{kind}` message: {e}"),
            _ => format!("unknown message type {kind:?}: expected `ask` or `ping`"),
        },
    })
}

/// The message for a binary frame (the API is JSON text only).
pub fn binary_refused(len: usize) -> ServerMsg {
    ServerMsg::error(
        None,
        "bad_frame",
        format!("binary frames are not part of the API ({len} bytes ignored); send JSON text"),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::agent::ask::FailReason;

    #[test]
    fn parses_ask_and_ping() {
        assert_eq!(
            parse(r#"{"type":"ask","id":"c1","prompt":"hi"}"#).unwrap(),
            ClientMsg::Ask {
                id: Some("c1".into()),
                prompt: "hi".into(),
                conversation: None,
                request_id: None,
                attachments: Vec::new(),
            }
        );
        let m =
            parse(r#"{"type":"ask","prompt":"hi","conversation":"ab","request_id":"r"}"#).unwrap();
        assert_eq!(m.id(), None);
        assert!(matches!(m, ClientMsg::Ask { conversation: Some(c), .. } if c == "ab"));
        assert_eq!(
            parse(r#"{"type":"ping","id":"p"}"#).unwrap(),
            ClientMsg::Ping {
                id: Some("p".into())
            }
        );
    }

    #[test]
    fn refuses_bad_frames_with_the_id_when_it_can() {
        let r = parse("{not json").unwrap_err();
        assert_eq!((r.code, r.id.as_deref()), ("bad_frame", None));
        let r = parse(r#"["ask"]"#).unwrap_err();
        assert_eq!(r.code, "bad_message");
        let r = parse(r#"{"id":"x"}"#).unwrap_err();
        assert_eq!((r.code, r.id.as_deref()), ("bad_message", Some("x")));
        let r = parse(r#"{"type":"fly","id":"x"}"#).unwrap_err();
        assert!(r.message.contains("unknown message type \"fly\""), "{r:?}");
        let r = parse(r#"{"type":"ask","id":"y"}"#).unwrap_err();
        assert_eq!(r.id.as_deref(), Some("y"));
        assert!(r.message.contains("prompt"), "{r:?}");
        let r = parse(r#"{"type":"ask","prompt":"p","promt":"typo"}"#).unwrap_err();
        assert!(r.message.contains("promt"), "{r:?}");
        let r = parse(r#"{"type":"ping","id":7}"#).unwrap_err();
        assert!(r.message.contains("`id`"), "{r:?}");
        let long = format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(MAX_ID_LEN + 1));
        assert_eq!(parse(&long).unwrap_err().code, "bad_message");
        assert_eq!(parse("").unwrap_err().code, "bad_frame");
        let e: Value =
            serde_json::from_str(&ServerMsg::from(parse("[").unwrap_err()).encode()).unwrap();
        assert_eq!(e["type"], "error");
        assert_eq!(e["code"], "bad_frame");
    }

    #[test]
    fn encodes_server_messages_with_their_type() {
        let m = ServerMsg::Request {
            id: Some("c1".into()),
            conversation: "conv".into(),
            request_id: "r".into(),
            event: RequestEvent::Text { delta: "ab".into() },
        };
        let v: Value = serde_json::from_str(&m.encode()).unwrap();
        assert_eq!(
            v,
            json!({ "type": "request", "id": "c1", "conversation": "conv", "request_id": "r",
                    "event": { "type": "text", "delta": "ab" } })
        );
        let m = ServerMsg::Request {
            id: None,
            conversation: "c".into(),
            request_id: "r".into(),
            event: RequestEvent::failed("the daily token budget (10 tokens) is used up"),
        };
        let v: Value = serde_json::from_str(&m.encode()).unwrap();
        assert!(v.get("id").is_none());
        assert_eq!(v["event"]["reason"], "budget_exceeded");
        assert_eq!(FailReason::of("boom"), FailReason::Error);
        let m = ServerMsg::Asked {
            id: Some("a".into()),
            asked: Asked {
                conversation: "c".into(),
                request_id: "r".into(),
                agent: None,
                queued: true,
                note: "n".into(),
            },
        };
        let v: Value = serde_json::from_str(&m.encode()).unwrap();
        assert_eq!(v["type"], "asked");
        assert_eq!(v["queued"], true);
        assert_eq!(v["request_id"], "r");
        let v: Value = serde_json::from_str(
            &ServerMsg::DocChanged {
                doc: "d".into(),
                kind: "memory".into(),
                heads: vec!["00".into()],
                origin: ChangeOrigin::Peer,
                peer: Some("p".into()),
            }
            .encode(),
        )
        .unwrap();
        assert_eq!(v["type"], "doc_changed");
        assert_eq!(v["origin"], "peer");
        let v: Value = serde_json::from_str(&binary_refused(3).encode()).unwrap();
        assert_eq!(v["code"], "bad_frame");
    }
}
