//! `iom ask`: the assistant as a Unix filter. The prompt comes from the argument, from stdin
//! (`iom ask -`), or both (`cat log.txt | iom ask "what failed?"`: the argument, then the
//! piped text between delimiter lines); files given with `--file` go up as blobs and the agent
//! finds them in its tool workspace. The exit code says how it ended (see [`crate::exit`]).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{Context, anyhow};
use futures::StreamExt;
use iom_node::agent::ask::MAX_PROMPT_BYTES;
use iom_node::api::client::{ApiClient, SseEvents};
use serde_json::{Value, json};

use super::Global;
use crate::Failure;
use crate::args::{AskArgs, OutputFormat};
use crate::output;

/// The line before piped input in a prompt.
pub const STDIN_START: &str = "----- begin stdin -----";
/// The line after it.
pub const STDIN_END: &str = "----- end stdin -----";

/// Why the prompt could not be put together (bad usage: exit 2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PromptError {
    /// `-` but nothing on stdin.
    #[error("`iom ask -` reads the prompt from stdin, but stdin was empty")]
    EmptyStdin,
    /// Too much input.
    #[error(
        "the prompt with its input is {0} bytes; at most {MAX_PROMPT_BYTES} (256 KiB) fit: attach \
         big input with --file PATH instead"
    )]
    TooLong(usize),
    /// Not text.
    #[error("stdin is not UTF-8 text; attach binary input with --file PATH instead")]
    NotText,
}

/// The prompt from the argument and what was read from stdin (`None`: stdin not read).
pub fn compose_prompt(arg: &str, stdin: Option<&[u8]>) -> Result<String, PromptError> {
    let piped = match stdin {
        Some(bytes) => Some(std::str::from_utf8(bytes).map_err(|_| PromptError::NotText)?),
        None => None,
    };
    let prompt = match (arg, piped) {
        ("-", None) => return Err(PromptError::EmptyStdin),
        ("-", Some(text)) if text.trim().is_empty() => return Err(PromptError::EmptyStdin),
        ("-", Some(text)) => text.to_string(),
        (arg, Some(text)) if !text.trim().is_empty() => {
            let nl = if text.ends_with('\n') { "" } else { "\n" };
            format!("{arg}\n\n{STDIN_START}\n{text}{nl}{STDIN_END}")
        }
        (arg, _) => arg.to_string(),
    };
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err(PromptError::TooLong(prompt.len()));
    }
    Ok(prompt)
}

/// Reads stdin to the end, at most one byte over the prompt limit (so too much is noticed
/// without reading all of it).
fn read_stdin() -> Result<Vec<u8>, Failure> {
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_PROMPT_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .context("reading stdin")?;
    if buf.len() > MAX_PROMPT_BYTES {
        return Err(Failure::Usage(PromptError::TooLong(buf.len()).into()));
    }
    Ok(buf)
}

/// `iom ask`.
pub async fn ask(g: &Global, a: AskArgs) -> Result<(), Failure> {
    let format = match (a.output, g.json) {
        (Some(f), _) => f,
        (None, true) => OutputFormat::Json,
        (None, false) => OutputFormat::Text,
    };
    let stdin = if a.prompt == "-" || (!a.no_stdin && !std::io::stdin().is_terminal()) {
        Some(read_stdin()?)
    } else {
        None
    };
    let prompt =
        compose_prompt(&a.prompt, stdin.as_deref()).map_err(|e| Failure::Usage(e.into()))?;
    let c = g.client()?;
    let attachments = upload(&c, &a.files).await?;
    let outcome = ask_once(
        &c,
        &prompt,
        a.conversation.as_deref(),
        &attachments,
        a.model.as_deref(),
        a.no_wait,
        format,
    )
    .await?;
    finish(&outcome, format)
}

/// Stores each file as a blob; returns the `attachments` of the ask body.
async fn upload(c: &ApiClient, files: &[PathBuf]) -> Result<Vec<Value>, Failure> {
    let mut out = Vec::new();
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Failure::Usage(anyhow!("{} has no usable file name", path.display())))?
            .to_string();
        let meta = std::fs::metadata(path)
            .map_err(|e| Failure::Usage(anyhow!("cannot attach {}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(Failure::Usage(anyhow!(
                "cannot attach {}: not a regular file",
                path.display()
            )));
        }
        let f = tokio::fs::File::open(path)
            .await
            .map_err(|e| Failure::Usage(anyhow!("cannot attach {}: {e}", path.display())))?;
        let r = c.post_file("/v1/blobs", f).await?;
        out.push(json!({ "name": name, "hash": output::s(&r, "hash") }));
    }
    Ok(out)
}

/// How one request ended, as the CLI saw it.
#[derive(Debug, Default)]
pub struct Outcome {
    /// What `POST /v1/ask` answered.
    pub asked: Value,
    /// The final event (`done` or `failed`), unless not waited for.
    pub result: Option<Value>,
    /// Tool calls seen (`tool_started` events, with `output` from `tool_finished`).
    pub tools: Vec<Value>,
}

/// Sends one request and (unless `no_wait` or queued) follows it to the end, printing as it
/// goes in [`OutputFormat::Text`].
pub async fn ask_once(
    c: &ApiClient,
    prompt: &str,
    conversation: Option<&str>,
    attachments: &[Value],
    model: Option<&str>,
    no_wait: bool,
    format: OutputFormat,
) -> Result<Outcome, Failure> {
    let mut body = json!({ "prompt": prompt, "conversation": conversation, "interface": "cli" });
    if !attachments.is_empty() {
        body["attachments"] = json!(attachments);
    }
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    let asked = c.post("/v1/ask", &body).await?;
    let mut outcome = Outcome {
        asked,
        ..Outcome::default()
    };
    let queued = outcome.asked["queued"].as_bool() == Some(true);
    if no_wait || queued {
        return Ok(outcome);
    }
    let conv = output::s(&outcome.asked, "conversation").to_string();
    let rid = output::s(&outcome.asked, "request_id").to_string();
    let resp = c
        .get_raw(&format!("/v1/conversations/{conv}/requests/{rid}/events"))
        .await?;
    let mut stream = resp.bytes_stream();
    let mut sse = SseEvents::default();
    let text = format == OutputFormat::Text;
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the event stream broke off")?;
        sse.push(&chunk);
        while let Some(data) = sse.next_data() {
            let Ok(ev) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            let kind = output::s(&ev, "type").to_string();
            match kind.as_str() {
                "tool_started" => outcome.tools.push(ev.clone()),
                "tool_finished" => {
                    if let Some(t) = outcome
                        .tools
                        .iter_mut()
                        .find(|t| t["output"].is_null() && t["name"] == ev["name"])
                    {
                        t["output"] = ev["output"].clone();
                        t["is_error"] = ev["is_error"].clone();
                    }
                }
                _ => {}
            }
            // Approvals need a person: shown on stderr whatever the output format.
            if text || kind == "approval" {
                print_progress(&ev, &kind, &mut out);
            }
            if matches!(kind.as_str(), "done" | "failed") {
                outcome.result = Some(ev);
                return Ok(outcome);
            }
        }
    }
    Err(anyhow!("the node closed the event stream before the answer").into())
}

/// Streams one event in text form: the answer on stdout, the rest on stderr.
fn print_progress(ev: &Value, kind: &str, out: &mut std::io::Stdout) {
    match kind {
        "status" => eprintln!("[{}]", output::s(ev, "status")),
        "text" => {
            print!("{}", output::s(ev, "delta"));
            let _ = out.flush();
        }
        "tool_started" => eprintln!(
            "\n[tool {} {}]",
            output::s(ev, "name"),
            output::s(ev, "input")
        ),
        "tool_finished" => {
            let o = output::s(ev, "output");
            let short: String = o.chars().take(400).collect();
            eprintln!(
                "[tool {} {}] {}",
                output::s(ev, "name"),
                if ev["is_error"].as_bool() == Some(true) {
                    "failed"
                } else {
                    "ok"
                },
                short.trim_end()
            );
        }
        "retry" => eprintln!("[{}]", output::s(ev, "message")),
        "approval" => eprint!("{}", approval_line(ev)),
        "file" => eprintln!(
            "[file {} ({} bytes) sent to this device: iom blob get {} -o {}]",
            output::s(ev, "name"),
            ev["len"],
            output::s(ev, "hash"),
            output::s(ev, "name")
        ),
        "done" => {
            println!();
            eprintln!(
                "[done: {} tokens in, {} out{}{}]",
                ev["input_tokens"],
                ev["output_tokens"],
                ev["model"]
                    .as_str()
                    .map(|m| format!(", by {m}"))
                    .unwrap_or_default(),
                ev["note"]
                    .as_str()
                    .map(|n| format!("; {n}"))
                    .unwrap_or_default()
            );
        }
        _ => {}
    }
}

/// An `approval` event as text: a pending one says how to answer it.
pub fn approval_line(ev: &Value) -> String {
    let id = output::s(ev, "id");
    let head = format!(
        "[approval {id} {}: {} {}]\n",
        output::s(ev, "state"),
        output::s(ev, "tool"),
        output::s(ev, "input")
    );
    let touches: String = ev["touches"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| format!("  touches: {}\n", t.as_str().unwrap_or("")))
        .collect();
    let tail = match output::s(ev, "state") {
        "pending" => format!(
            "  waiting for an admin device: iom approve {id} | iom deny {id} (denied at {})\n",
            output::time(ev["expires_at"].as_i64().unwrap_or(0))
        ),
        _ => ev["reason"]
            .as_str()
            .map(|r| format!("  {r}\n"))
            .unwrap_or_default(),
    };
    format!("{head}{touches}{tail}")
}

/// Prints what is left to print for `format` and turns the outcome into the exit code.
pub fn finish(o: &Outcome, format: OutputFormat) -> Result<(), Failure> {
    match format {
        OutputFormat::Json => {
            let mut v = o.asked.clone();
            if let Some(r) = &o.result {
                v["result"] = r.clone();
            }
            output::json(&v);
        }
        OutputFormat::Markdown => {
            if let Some(r) = &o.result {
                print!("{}", markdown(o, r));
            }
        }
        OutputFormat::Text => {}
    }
    exit_for(o, format == OutputFormat::Text)
}

/// The exit code of an outcome (as a [`Failure`] for anything but an answer).
pub fn exit_for(o: &Outcome, say_ids: bool) -> Result<(), Failure> {
    let Some(r) = &o.result else {
        let conv = output::s(&o.asked, "conversation");
        let rid = output::s(&o.asked, "request_id");
        if say_ids {
            println!("conversation {conv} request {rid}");
        }
        let note = output::s(&o.asked, "note");
        return Err(Failure::Queued(if note.is_empty() {
            format!("conversation {conv} request {rid}")
        } else {
            note.to_string()
        }));
    };
    match output::s(r, "type") {
        "failed" => {
            let e = anyhow!("the request failed: {}", output::s(r, "error"));
            Err(if output::s(r, "reason") == "budget_exceeded" {
                Failure::Budget(e)
            } else {
                Failure::Failed(e)
            })
        }
        _ if output::s(r, "note").contains("token budget") => Err(Failure::Budget(anyhow!(
            "the answer was cut short: {}",
            output::s(r, "note")
        ))),
        _ => Ok(()),
    }
}

/// The answer as a Markdown document: the text, the tool calls, a line of usage.
pub fn markdown(o: &Outcome, r: &Value) -> String {
    let mut md = String::new();
    if output::s(r, "type") == "failed" {
        md.push_str(&format!("> **Failed:** {}\n", output::s(r, "error")));
    } else {
        let text = output::s(r, "text").trim_end();
        md.push_str(text);
        md.push('\n');
    }
    if !o.tools.is_empty() {
        md.push_str("\n## Tool calls\n");
        for t in &o.tools {
            let state = if t["is_error"].as_bool() == Some(true) {
                " (failed)"
            } else {
                ""
            };
            md.push_str(&format!(
                "\n**{}**{state}\n\n```json\n{}\n```\n",
                output::s(t, "name"),
                output::s(t, "input")
            ));
            let out = output::s(t, "output");
            if !out.is_empty() {
                let fence = if out.contains("```") { "````" } else { "```" };
                md.push_str(&format!("\n{fence}\n{}\n{fence}\n", out.trim_end()));
            }
        }
    }
    if output::s(r, "type") == "done" {
        md.push_str(&format!(
            "\n---\n*{} tokens in, {} out{}*\n",
            r["input_tokens"],
            r["output_tokens"],
            r["note"]
                .as_str()
                .map(|n| format!(" · {n}"))
                .unwrap_or_default()
        ));
    }
    md
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn composes_the_prompt_from_the_argument_and_stdin() {
        assert_eq!(compose_prompt("hi", None).unwrap(), "hi");
        assert_eq!(
            compose_prompt("-", Some(b"line1\nline2\n")).unwrap(),
            "line1\nline2\n"
        );
        assert_eq!(
            compose_prompt("what failed?", Some(b"E: boom\n")).unwrap(),
            format!("what failed?\n\n{STDIN_START}\nE: boom\n{STDIN_END}")
        );
        assert_eq!(
            compose_prompt("q", Some(b"no newline")).unwrap(),
            format!("q\n\n{STDIN_START}\nno newline\n{STDIN_END}")
        );
        // Nothing piped (stdin was /dev/null): the argument alone.
        assert_eq!(compose_prompt("q", Some(b"")).unwrap(), "q");
        assert_eq!(
            compose_prompt("-", Some(b" \n")),
            Err(PromptError::EmptyStdin)
        );
        assert_eq!(compose_prompt("-", None), Err(PromptError::EmptyStdin));
        assert_eq!(
            compose_prompt("q", Some(&[0xff, 0xfe])),
            Err(PromptError::NotText)
        );
        let big = vec![b'x'; MAX_PROMPT_BYTES];
        assert!(matches!(
            compose_prompt("q", Some(&big)),
            Err(PromptError::TooLong(n)) if n > MAX_PROMPT_BYTES
        ));
        assert!(compose_prompt("-", Some(&big)).is_ok());
    }

    fn outcome(result: Option<Value>) -> Outcome {
        Outcome {
            asked: json!({ "conversation": "c", "request_id": "r", "queued": false, "note": "n" }),
            result,
            tools: Vec::new(),
        }
    }

    #[test]
    fn exit_codes_follow_the_outcome() {
        let code = |r: Result<(), Failure>| match r {
            Ok(()) => 0,
            Err(Failure::Failed(_)) => crate::exit::FAILED,
            Err(Failure::Usage(_)) => crate::exit::USAGE,
            Err(Failure::Budget(_)) => crate::exit::BUDGET,
            Err(Failure::Queued(_)) => crate::exit::QUEUED,
            Err(Failure::Quiet) => crate::exit::FAILED,
        };
        assert_eq!(code(exit_for(&outcome(None), false)), 4);
        let done = json!({ "type": "done", "text": "t", "input_tokens": 1, "output_tokens": 2 });
        assert_eq!(code(exit_for(&outcome(Some(done)), false)), 0);
        let failed = json!({ "type": "failed", "error": "boom", "reason": "error" });
        assert_eq!(code(exit_for(&outcome(Some(failed)), false)), 1);
        let budget = json!({ "type": "failed", "error": "x", "reason": "budget_exceeded" });
        assert_eq!(code(exit_for(&outcome(Some(budget)), false)), 3);
        let cut = json!({ "type": "done", "text": "t",
                          "note": "stopped: the token budget was used up" });
        assert_eq!(code(exit_for(&outcome(Some(cut)), false)), 3);
    }

    #[test]
    fn approvals_say_how_to_answer_them() {
        let ev = json!({"type": "approval", "id": "ap1", "state": "pending", "tool": "bash",
            "input": "{}", "touches": ["runs a shell command"], "expires_at": 0});
        let text = approval_line(&ev);
        assert!(text.starts_with("[approval ap1 pending: bash {}]\n  touches: runs a shell"));
        assert!(text.contains("iom approve ap1 | iom deny ap1"), "{text}");
        let ev = json!({"id": "ap1", "state": "denied", "tool": "bash", "input": "{}",
            "reason": "not now"});
        assert!(approval_line(&ev).ends_with("  not now\n"));
    }

    #[test]
    fn markdown_has_the_answer_the_tools_and_the_usage() {
        let mut o = outcome(None);
        o.tools
            .push(json!({ "name": "bash", "input": "{\"command\":\"ls\"}",
                             "output": "a\nb", "is_error": false }));
        let r = json!({ "type": "done", "text": "# Title\nbody\n", "input_tokens": 3,
                        "output_tokens": 4 });
        let md = markdown(&o, &r);
        assert!(md.starts_with("# Title\nbody\n"), "{md}");
        assert!(md.contains("## Tool calls\n\n**bash**\n\n```json\n{\"command\":\"ls\"}\n```"));
        assert!(md.contains("```\na\nb\n```"), "{md}");
        assert!(md.ends_with("*3 tokens in, 4 out*\n"), "{md}");
        let failed = markdown(
            &outcome(None),
            &json!({ "type": "failed", "error": "boom" }),
        );
        assert_eq!(failed, "> **Failed:** boom\n");
    }
}
