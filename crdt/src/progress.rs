//! The progress of a running request: what the agent has streamed so far, stored in the
//! request's `progress` field so that every device can follow it.
//!
//! Progress is written as **appends**, never as snapshots, so that the bytes a run adds to the
//! document's history grow with the answer and not with how often progress is written:
//!
//! | field | type | written |
//! |---|---|---|
//! | `text` | Text | each new piece of model text spliced at the end |
//! | `tools` | list of maps | a map `{id, name, input}` when a tool call starts; `output` and `is_error` put into it once when it finishes |
//! | `retry` | str? | the latest retry notice; deleted when a model call finishes |
//! | `turns` | uint | model calls finished |
//!
//! Builds before this one wrote `progress` as a string holding the whole [`ProgressView`] as
//! JSON, rewritten on every update; `read` still reads that form.

use automerge::transaction::{Transactable, Transaction};
use automerge::{AutomergeError, ObjId, ObjType, ReadDoc, Value};
use serde::{Deserialize, Serialize};

use crate::fields::{self, MapFields};

/// The request field that holds the progress.
pub const FIELD_PROGRESS: &str = "progress";

/// One tool call as shown while a request runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolProgressView {
    /// Tool-use id.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Input (JSON text).
    pub input: String,
    /// Output, once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Whether it failed.
    #[serde(default)]
    pub is_error: bool,
}

/// What a running request has produced so far. Its JSON form is the one the local API shows
/// (and the one builds before append-only progress stored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressView {
    /// Model text so far.
    pub text: String,
    /// Tool calls so far.
    pub tools: Vec<ToolProgressView>,
    /// The latest retry notice, if the model API is being retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<String>,
    /// Model calls finished.
    #[serde(default)]
    pub turns: u32,
}

/// One step of progress, as the agent appends it ([`crate::Conversation::append_progress`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProgressUpdate {
    /// More model text (appended).
    Text(String),
    /// A tool call started.
    ToolStarted {
        /// Tool-use id.
        id: String,
        /// Tool name.
        name: String,
        /// Input (JSON text).
        input: String,
    },
    /// The tool call `id` finished (its output as the agent chose to show it, e.g. capped).
    ToolFinished {
        /// Tool-use id.
        id: String,
        /// Output.
        output: String,
        /// Whether it failed.
        is_error: bool,
    },
    /// The model API is being retried; this is the notice.
    Retry(String),
    /// A model call finished (the count so far); clears the retry notice.
    TurnFinished(u32),
}

impl ProgressView {
    /// Parses the JSON form (an unreadable value reads as empty).
    pub fn parse(text: Option<&str>) -> ProgressView {
        text.and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default()
    }

    /// The JSON form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Folds one update in, the way the document does.
    pub fn apply(&mut self, update: &ProgressUpdate) {
        match update {
            ProgressUpdate::Text(t) => self.text.push_str(t),
            ProgressUpdate::ToolStarted { id, name, input } => {
                self.tools.push(ToolProgressView {
                    id: id.clone(),
                    name: name.clone(),
                    input: input.clone(),
                    output: None,
                    is_error: false,
                });
            }
            ProgressUpdate::ToolFinished {
                id,
                output,
                is_error,
            } => {
                if let Some(t) = self.tools.iter_mut().rev().find(|t| t.id == *id) {
                    t.output = Some(output.clone());
                    t.is_error = *is_error;
                }
            }
            ProgressUpdate::Retry(r) => self.retry = Some(r.clone()),
            ProgressUpdate::TurnFinished(n) => {
                self.turns = *n;
                self.retry = None;
            }
        }
    }
}

/// Reads the progress of the request map `request` (either form), if it has any.
pub(crate) fn read<R: ReadDoc>(doc: &R, request: &ObjId) -> Option<ProgressView> {
    match doc.get(request, FIELD_PROGRESS).ok().flatten()? {
        // The older form: the whole view as JSON, rewritten on every update.
        (Value::Scalar(s), _) => Some(ProgressView::parse(s.as_str())),
        (Value::Object(ObjType::Map), p) => Some(read_map(doc, &p)),
        _ => None,
    }
}

fn read_map<R: ReadDoc>(doc: &R, p: &ObjId) -> ProgressView {
    let f = MapFields::read(doc, p);
    let tools = f
        .object("tools", ObjType::List)
        .map(|list| {
            fields::maps_in(doc, &list, ..)
                .into_iter()
                .map(|(_, t)| {
                    let t = MapFields::read(doc, &t);
                    ToolProgressView {
                        id: t.string(doc, "id").unwrap_or_default(),
                        name: t.string(doc, "name").unwrap_or_default(),
                        input: t.string(doc, "input").unwrap_or_default(),
                        output: t.string(doc, "output"),
                        is_error: t.boolean("is_error").unwrap_or(false),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    ProgressView {
        text: f.string(doc, "text").unwrap_or_default(),
        tools,
        retry: f.string(doc, "retry"),
        turns: f
            .uint("turns")
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
    }
}

/// Appends `updates` to the progress of the request map `request`, creating the progress map
/// (in place of an older JSON string) if there is none.
pub(crate) fn append(
    tx: &mut Transaction<'_>,
    request: &ObjId,
    updates: &[ProgressUpdate],
) -> Result<(), AutomergeError> {
    let p = match fields::object(tx, request, FIELD_PROGRESS, ObjType::Map) {
        Some(p) => p,
        None => tx.put_object(request, FIELD_PROGRESS, ObjType::Map)?,
    };
    for u in updates {
        match u {
            ProgressUpdate::Text(t) => {
                let text = child(tx, &p, "text", ObjType::Text)?;
                let end = tx.length(&text);
                tx.splice_text(&text, end, 0, t)?;
            }
            ProgressUpdate::ToolStarted { id, name, input } => {
                let tools = child(tx, &p, "tools", ObjType::List)?;
                let end = tx.length(&tools);
                let t = tx.insert_object(&tools, end, ObjType::Map)?;
                tx.put(&t, "id", id.as_str())?;
                tx.put(&t, "name", name.as_str())?;
                tx.put(&t, "input", input.as_str())?;
            }
            ProgressUpdate::ToolFinished {
                id,
                output,
                is_error,
            } => {
                let Some(tools) = fields::object(tx, &p, "tools", ObjType::List) else {
                    continue;
                };
                // Searched from the end: the call that finishes is nearly always the last.
                let found = fields::maps_in(tx, &tools, ..)
                    .into_iter()
                    .rev()
                    .map(|(_, t)| t)
                    .find(|t| fields::string(tx, t, "id").as_deref() == Some(id.as_str()));
                if let Some(t) = found {
                    tx.put(&t, "output", output.as_str())?;
                    tx.put(&t, "is_error", *is_error)?;
                }
            }
            ProgressUpdate::Retry(r) => tx.put(&p, "retry", r.as_str())?,
            ProgressUpdate::TurnFinished(n) => {
                tx.put(&p, "turns", u64::from(*n))?;
                if tx.get(&p, "retry")?.is_some() {
                    tx.delete(&p, "retry")?;
                }
            }
        }
    }
    Ok(())
}

/// The object at `key` of map `p`, created if missing (or of another type).
fn child(
    tx: &mut Transaction<'_>,
    p: &ObjId,
    key: &str,
    want: ObjType,
) -> Result<ObjId, AutomergeError> {
    match fields::object(tx, p, key, want) {
        Some(o) => Ok(o),
        None => tx.put_object(p, key, want),
    }
}

/// Serde for [`crate::MessageView::progress`]: the JSON form inside a string, the shape the
/// local API has always shown.
pub(crate) mod as_json_string {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::ProgressView;

    pub(crate) fn serialize<S: Serializer>(
        p: &Option<ProgressView>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.serialize_some(&p.to_json()),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<ProgressView>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        Ok(s.map(|s| ProgressView::parse(Some(&s))))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::actor::actor_for;
    use crate::conversation::{Conversation, Interface, ToolCallView, UsageView};
    use crate::document::Document;
    use crate::kind::DocKind;

    fn running() -> Document {
        let mut d =
            Document::new(DocKind::Conversation, &actor_for(&[1; 32], [1; 8]), 100).expect("new");
        let mut c = Conversation::open(&mut d).expect("open");
        c.append_request("r", "q", Interface::Cli, "laptop", 101)
            .expect("ask");
        c.claim("r", "agent", 1, 102).expect("claim");
        d
    }

    fn progress_of(d: &Document) -> Option<ProgressView> {
        Conversation::open(d)
            .expect("open")
            .find_request("r")
            .and_then(|m| m.progress)
    }

    fn started(id: &str) -> ProgressUpdate {
        ProgressUpdate::ToolStarted {
            id: id.into(),
            name: "bash".into(),
            input: r#"{"command":"ls"}"#.into(),
        }
    }

    fn finished(id: &str, output: &str) -> ProgressUpdate {
        ProgressUpdate::ToolFinished {
            id: id.into(),
            output: output.into(),
            is_error: false,
        }
    }

    #[test]
    fn appended_progress_reads_back_as_the_fold_of_its_updates() {
        let mut d = running();
        let batches = [
            vec![ProgressUpdate::Text("Let me ".into())],
            vec![ProgressUpdate::Text("look.".into()), started("t1")],
            vec![
                ProgressUpdate::Retry("model API busy; retry 1".into()),
                finished("t1", "a\nb"),
            ],
            vec![ProgressUpdate::TurnFinished(1), started("t2")],
            vec![
                ProgressUpdate::ToolFinished {
                    id: "t2".into(),
                    output: "no such file".into(),
                    is_error: true,
                },
                // A finish for a call never started is ignored, on both sides.
                finished("nope", "x"),
                ProgressUpdate::Text(" Done: é ✓".into()),
                ProgressUpdate::TurnFinished(2),
            ],
        ];
        let mut want = ProgressView::default();
        for (i, batch) in batches.iter().enumerate() {
            Conversation::open(&mut d)
                .expect("open")
                .append_progress("r", batch, 103 + i as i64)
                .expect("append");
            for u in batch {
                want.apply(u);
            }
            assert_eq!(progress_of(&d).as_ref(), Some(&want), "after batch {i}");
        }
        assert_eq!(want.text, "Let me look. Done: é ✓");
        assert_eq!(want.tools.len(), 2);
        assert_eq!(want.tools[0].output.as_deref(), Some("a\nb"));
        assert!(want.tools[1].is_error);
        assert_eq!((want.turns, want.retry.as_deref()), (2, None));
        // No updates, no change.
        let heads = d.heads();
        Conversation::open(&mut d)
            .expect("open")
            .append_progress("r", &[], 200)
            .expect("nothing");
        assert_eq!(d.heads(), heads);
        // The local API shows it as the JSON form inside a string, as before.
        let m = Conversation::open(&d)
            .expect("open")
            .find_request("r")
            .expect("request");
        let j = serde_json::to_value(&m).expect("json");
        let shown: ProgressView =
            serde_json::from_str(j["progress"].as_str().expect("a string")).expect("json form");
        assert_eq!(shown, want);
        let back: crate::MessageView = serde_json::from_value(j).expect("round trip");
        assert_eq!(back.progress, Some(want));
    }

    #[test]
    fn the_older_json_string_form_still_reads_and_is_replaced_by_appends() {
        let mut d = running();
        let old = json!({
            "text": "partial",
            "tools": [{"id": "t1", "name": "bash", "input": "{}", "is_error": false}],
            "turns": 1,
            "retry": "busy"
        });
        d.put_json(
            "messages.0.progress",
            json!(old.to_string()),
            "older build",
            103,
        )
        .expect("put");
        let p = progress_of(&d).expect("progress");
        assert_eq!(p.text, "partial");
        assert_eq!(p.tools[0].output, None);
        assert_eq!((p.turns, p.retry.as_deref()), (1, Some("busy")));
        // Garbage from a foreign build reads as empty, not as an error.
        d.put_json("messages.0.progress", json!("not json"), "foreign", 104)
            .expect("put");
        assert_eq!(progress_of(&d), Some(ProgressView::default()));
        // A newer agent appends over an older string: the map replaces it.
        Conversation::open(&mut d)
            .expect("open")
            .append_progress("r", &[ProgressUpdate::Text("new".into())], 105)
            .expect("append");
        assert_eq!(progress_of(&d).map(|p| p.text).as_deref(), Some("new"));
    }

    #[test]
    fn progress_syncs_to_another_device_incrementally() {
        let mut a = running();
        let mut b = Document::load(&a.save(), &actor_for(&[2; 32], [2; 8])).expect("copy");
        for i in 0..20 {
            Conversation::open(&mut a)
                .expect("open")
                .append_progress("r", &[ProgressUpdate::Text(format!("{i} "))], 110 + i)
                .expect("append");
            b.load_incremental(&a.save_incremental()).expect("merge");
            let p = progress_of(&b).expect("progress");
            assert!(p.text.ends_with(&format!("{i} ")), "{:?}", p.text);
        }
        assert_eq!(progress_of(&a), progress_of(&b));
    }

    /// Pseudo-random base64-ish text (not compressible), like a tool printing random data.
    fn noise(len: usize, seed: u64) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ALPHABET[(x % 64) as usize] as char
            })
            .collect()
    }

    /// The size test of issue 15: a run of 10 tool calls of 64 KiB output each, with text
    /// streamed between them and progress written after every piece, adds at most 3x the final
    /// message's size to the saved document. The same run written as whole snapshots (the older
    /// form) is measured beside it.
    #[test]
    fn a_long_run_adds_a_small_multiple_of_the_answer() {
        // What the node caps tool output at: in progress, and in the stored reply.
        const PROGRESS_OUTPUT: usize = 4096;
        const REPLY_OUTPUT: usize = 16 * 1024;
        let mut new = running();
        let mut old = running();
        let before = new.save().len();
        let (mut shown, mut calls, mut now) = (ProgressView::default(), Vec::new(), 103);
        let mut write = |new: &mut Document, old: &mut Document, batch: Vec<ProgressUpdate>| {
            now += 1;
            Conversation::open(&mut *new)
                .expect("open")
                .append_progress("r", &batch, now)
                .expect("append");
            for u in &batch {
                shown.apply(u);
            }
            old.put_json(
                "messages.0.progress",
                json!(shown.to_json()),
                "r progress",
                now,
            )
            .expect("snapshot");
        };
        for call in 0..10 {
            // Text streamed in small pieces (one write each, as every 150 ms).
            for piece in 0..40 {
                let words = format!("Step {call}.{piece}: looking at the output so far. ");
                write(&mut new, &mut old, vec![ProgressUpdate::Text(words)]);
            }
            let id = format!("toolu_{call}");
            write(&mut new, &mut old, vec![started(&id)]);
            let output = noise(64 * 1024, call + 1);
            write(
                &mut new,
                &mut old,
                vec![finished(&id, &output[..PROGRESS_OUTPUT])],
            );
            calls.push(ToolCallView {
                id,
                name: "bash".into(),
                input: r#"{"command":"ls"}"#.into(),
                output: output[..REPLY_OUTPUT].to_string(),
                is_error: false,
            });
        }
        let text = shown.text.clone();
        for d in [&mut new, &mut old] {
            Conversation::open(&mut *d)
                .expect("open")
                .append_assistant("r", &text, &calls, UsageView::default(), "agent", 999)
                .expect("reply");
        }
        let message: usize = text.len()
            + calls
                .iter()
                .map(|c| c.id.len() + c.name.len() + c.input.len() + c.output.len())
                .sum::<usize>();
        let added = new.save().len() - before;
        let added_old = old.save().len() - before;
        println!(
            "final message {message} B; added {added} B ({:.2}x); snapshots would add {added_old} B ({:.1}x)",
            added as f64 / message as f64,
            added_old as f64 / message as f64
        );
        assert!(added <= 3 * message, "{added} > 3 x {message}");
        assert!(
            added_old > 3 * added,
            "the snapshot reference should be far bigger"
        );
        assert_eq!(progress_of(&new).map(|p| p.text), Some(text));
    }
}
