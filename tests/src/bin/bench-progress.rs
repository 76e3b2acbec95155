//! What a long request adds to its conversation (issue 15): a real node as agent with the
//! fake Messages API streaming slowly (its 5 ms pauses), the real Docker sandbox, and one
//! request that makes `--tools` tool calls (`head -c 49152 /dev/urandom | base64 -w0`, 64 KiB
//! of output each) and then streams text for about `--seconds`.
//!
//! It prints the conversation's saved size (all of its history, as `Document::save` writes it)
//! before and after the request, the final message's size, and their ratio. For reference it
//! replays the same run the way builds before append-only progress wrote it: every progress
//! change of the run becomes a whole JSON snapshot written into a copy of the document as it
//! was before the request, followed by the same answer.
//!
//! ```text
//! cargo build --release -p iom-cli -p iom-tests --bin bench-progress
//! target/release/bench-progress [--seconds 60] [--tools 10]
//! ```
//!
//! Uses `target/release/iom` (or `IOM_BIN`) and the `iom-sandbox:1` image.

mod bench_common;

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use iom_crdt::{Conversation, DocId, Document, MessageView};
use iom_node::api::client::ApiClient;
use iom_node::store::Store;
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig, Scripted};
use iom_tests::harness::{Node, containers_of};
use serde_json::json;

const IMAGE: &str = "iom-sandbox:1";
/// Characters the fake server streams per second (8 per delta, two 5 ms pauses each).
const CHARS_PER_SEC: usize = 800;
/// The actor the benchmark's in-process copies write as.
const BENCH_ACTOR: [u8; 40] = [9; 40];

struct Opts {
    seconds: usize,
    tools: usize,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        seconds: 60,
        tools: 10,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || -> Result<usize> {
            args.next()
                .ok_or_else(|| anyhow!("{a} needs a value"))?
                .parse()
                .with_context(|| a.clone())
        };
        match a.as_str() {
            "--seconds" => o.seconds = num()?,
            "--tools" => o.tools = num()?,
            other => {
                bail!("unknown argument {other:?}; usage: bench-progress [--seconds N] [--tools N]")
            }
        }
    }
    Ok(o)
}

/// The conversation as stored in the node's data dir (the node must be stopped).
fn stored_doc(node: &Node, id: DocId) -> Result<Document> {
    let store = Store::open(&node.dir.join("db"), 16 << 20)?;
    let stored = store.load_doc(id.as_bytes())?;
    let mut chunks = stored.chunks.iter();
    let first = chunks
        .next()
        .ok_or_else(|| anyhow!("document {id} has no chunks"))?;
    let mut doc = Document::load(first, &BENCH_ACTOR)?;
    for c in chunks {
        doc.load_incremental(c)?;
    }
    Ok(doc)
}

/// Bytes of a reply's content: its text and each tool call's id, name, input and output.
fn message_bytes(m: &MessageView) -> usize {
    m.text.len()
        + m.tool_calls
            .iter()
            .map(|c| c.id.len() + c.name.len() + c.input.len() + c.output.len())
            .sum::<usize>()
}

/// The run replayed in the older form: each progress change of `after` since `before` becomes
/// a whole snapshot of the progress (as JSON, in the request's `progress` string) written into
/// a copy of `before`, then the same answer is appended. Returns the copy and the number of
/// snapshots.
fn replay_as_snapshots(
    before: &Document,
    after: &Document,
    rid: &str,
) -> Result<(Document, usize)> {
    let mut replica = Document::load(&before.snapshot(), &BENCH_ACTOR)?;
    let mut old = Document::load(&before.snapshot(), &BENCH_ACTOR)?;
    let mut snapshots = 0;
    for change in after.automerge().get_changes(&before.heads()) {
        let is_progress = change.message().is_some_and(|m| m.ends_with(" progress"));
        replica.load_incremental(change.raw_bytes())?;
        if !is_progress {
            // The request and its claim come before any progress and are the same in both
            // forms; what follows the progress (the answer) is written again below.
            if snapshots == 0 {
                old.load_incremental(change.raw_bytes())?;
            }
            continue;
        }
        let Some(request) = Conversation::open(&replica)?.find_request(rid) else {
            continue;
        };
        let Some(p) = request.progress else { continue };
        old.put_json(
            &format!("messages.{}.progress", request.index),
            json!(p.to_json()),
            &format!("{rid} progress"),
            change.timestamp(),
        )?;
        snapshots += 1;
    }
    let conv = Conversation::open(after)?;
    let reply = conv
        .replies_to(rid)
        .pop()
        .ok_or_else(|| anyhow!("no reply to {rid}"))?;
    let usage = reply.usage.unwrap_or_default();
    let mut c = Conversation::open(&mut old)?;
    c.append_assistant(rid, &reply.text, &reply.tool_calls, usage, "agent", 0)?;
    c.add_usage(usage.input_tokens, usage.output_tokens, 0)?;
    c.set_status(rid, iom_crdt::Status::Done, None, 0)?;
    Ok((old, snapshots))
}

/// Asks `prompt` through the API and follows the request's event stream to `done`.
async fn ask(
    api: &ApiClient,
    prompt: &str,
    conversation: Option<&str>,
) -> Result<(String, String)> {
    let asked = api
        .post(
            "/v1/ask",
            &json!({ "prompt": prompt, "conversation": conversation }),
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let field = |k: &str| {
        asked[k]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no {k} in {asked}"))
    };
    let (conv, rid) = (field("conversation")?, field("request_id")?);
    let mut resp = api
        .get_raw(&format!("/v1/conversations/{conv}/requests/{rid}/events"))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    // Only the tail is kept: the stream carries the whole answer.
    let mut tail = String::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(600), resp.chunk())
            .await
            .map_err(|_| anyhow!("no event for 600 s"))??
            .ok_or_else(|| anyhow!("the event stream ended early: {tail}"))?;
        tail.push_str(&String::from_utf8_lossy(&chunk));
        if tail.contains("event: done") {
            return Ok((conv, rid));
        }
        if tail.contains("event: failed") {
            bail!("the request failed: {tail}");
        }
        if tail.len() > 4096 {
            let cut = tail.len() - 64;
            let cut = (0..=cut)
                .rev()
                .find(|&i| tail.is_char_boundary(i))
                .unwrap_or(0);
            tail.drain(..cut);
        }
    }
}

fn kib(bytes: usize) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

fn run() -> Result<()> {
    let opts = parse_args()?;
    let bin = bench_common::use_release_bin()?;
    let check = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .context("running docker")?;
    if !check.status.success() {
        bail!("no {IMAGE} image: run `iom sandbox build` first");
    }
    let rt = bench_common::runtime()?;
    let fake = rt.block_on(FakeAnthropic::start(FakeConfig {
        api_key: "sk-ant-bench".into(),
        instant: false,
        ..FakeConfig::default()
    }))?;
    let mut node = Node::new("agent")?;
    node.env = vec![
        ("ANTHROPIC_API_KEY".into(), "sk-ant-bench".into()),
        ("ANTHROPIC_BASE_URL".into(), fake.url().to_string()),
        ("IOM_LOG".into(), "warn".into()),
    ];
    // Room for the whole streamed text (the fake model stops at `max_tokens`, 4 bytes each).
    std::fs::write(
        node.dir.join("config.toml"),
        format!(
            "[agent]\nmax_tokens = {}\n",
            (opts.seconds * CHARS_PER_SEC / 4 + 1024).max(4096)
        ),
    )?;
    node.start()?;
    let me = node.device_id()?;
    node.cli(&["agent", "assign", &me])?;
    bench_common::print_machine(&bin);

    // A conversation with one short exchange; its saved size is the "before".
    let (conv, _) = rt.block_on(ask(&node.api()?, "hello", None))?;
    let id: DocId = conv.parse().map_err(|e| anyhow!("{conv}: {e}"))?;
    node.stop()?;
    let mut before = stored_doc(&node, id)?;
    let before_len = before.save().len();
    node.start()?;

    let command = "head -c 49152 /dev/urandom | base64 -w0";
    fake.push_scripts((0..opts.tools).map(|_| Scripted::ToolUse {
        name: "bash".into(),
        input: json!({ "command": command }),
    }));
    let words = "streaming the answer slowly, as a long run does. ";
    let text: String = words
        .chars()
        .cycle()
        .take(opts.seconds * CHARS_PER_SEC)
        .collect();
    fake.push_script(Scripted::Text(text));
    let t0 = Instant::now();
    let (_, rid) = rt.block_on(ask(&node.api()?, "the long one", Some(&conv)))?;
    let took = t0.elapsed();
    node.stop()?;
    let mut after = stored_doc(&node, id)?;
    let after_len = after.save().len();
    let reply = Conversation::open(&after)?
        .replies_to(&rid)
        .pop()
        .ok_or_else(|| anyhow!("no reply to {rid}"))?;
    let message = message_bytes(&reply);
    let outputs: usize = reply.tool_calls.iter().map(|c| c.output.len()).sum();
    let progress_changes = after
        .automerge()
        .get_changes(&before.heads())
        .iter()
        .filter(|c| c.message().is_some_and(|m| m.ends_with(" progress")))
        .count();
    let (mut old, snapshots) = replay_as_snapshots(&before, &after, &rid)?;
    let old_len = old.save().len();

    let added = after_len - before_len;
    let added_old = old_len.saturating_sub(before_len);
    println!(
        "# request: {} tool calls, {} of text, ran {:.1} s, {progress_changes} progress writes",
        reply.tool_calls.len(),
        kib(reply.text.len()),
        took.as_secs_f64()
    );
    println!(
        "final message: {} (text {}, tool calls {} of which output {})",
        kib(message),
        kib(reply.text.len()),
        kib(message - reply.text.len()),
        kib(outputs)
    );
    println!(
        "conversation saved: {} before, {} after => added {} = {:.2}x the final message \
         (target <= 3x)",
        kib(before_len),
        kib(after_len),
        kib(added),
        added as f64 / message as f64
    );
    println!(
        "reference, the same run as {snapshots} whole progress snapshots (older builds): added {} \
         = {:.1}x the final message; append-only is {:.1}x smaller",
        kib(added_old),
        added_old as f64 / message as f64,
        added_old as f64 / added.max(1) as f64
    );
    for c in containers_of(&me) {
        let _ = Command::new("docker").args(["rm", "-f", &c]).output();
    }
    {
        let _guard = rt.enter();
        drop(fake);
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-progress: {e:#}");
            ExitCode::FAILURE
        }
    }
}
