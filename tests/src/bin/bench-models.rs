//! Model-provider benchmark (issue 14): a real local model (llama.cpp's `llama-server` with
//! SmolLM2-135M, `scripts/install-llama.sh`) answering through iom's OpenAI-compatible
//! client, beside the same prompt sent straight to the server with `curl`.
//!
//! For each of N rounds: ask through one node's API (`POST /v1/ask`, then its event stream):
//! the time to the first `text` event and to `done`; then `curl -N` of the same chat
//! completion (`stream: true`, the same `max_tokens`, temperature 0): `time_starttransfer`
//! (the first byte, which llama-server sends with the first token) and `time_total`. The
//! ratio of the medians is iom's overhead (document writes, sync to the follower, the runner).
//!
//! ```text
//! scripts/install-llama.sh
//! cargo build --release -p iom-cli -p iom-tests --bin bench-models
//! target/release/bench-models [--rounds N]
//! ```
//!
//! Uses `target/release/iom` (or `IOM_BIN`).

mod bench_common;

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use iom_node::api::client::ApiClient;
use iom_tests::harness::{Node, wait_until};
use iom_tests::llama::{LlamaServer, MODEL_NAME};
use serde_json::json;

const PROMPT: &str = "Name three colours.";
const MAX_TOKENS: u32 = 32;

/// Ask through the API: (time to the first text, time to done).
async fn ask(api: &ApiClient) -> Result<(Duration, Duration)> {
    let t = Instant::now();
    let asked = api
        .post("/v1/ask", &json!({ "prompt": PROMPT }))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let conv = asked["conversation"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let rid = asked["request_id"].as_str().unwrap_or_default().to_string();
    let mut resp = api
        .get_raw(&format!("/v1/conversations/{conv}/requests/{rid}/events"))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let mut buf = String::new();
    let mut first = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .map_err(|_| anyhow!("no answer within 120 s"))??
            .ok_or_else(|| anyhow!("the event stream ended early: {buf}"))?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
        if first.is_none() && buf.contains("event: text") {
            first = Some(t.elapsed());
        }
        if buf.contains("event: done") {
            let total = t.elapsed();
            return Ok((first.unwrap_or(total), total));
        }
        if buf.contains("event: failed") {
            bail!("the request failed: {buf}");
        }
    }
}

/// The same prompt straight to the server: (time to the first byte, total).
fn curl(url: &str) -> Result<(Duration, Duration)> {
    let body = json!({
        "model": MODEL_NAME, "max_tokens": MAX_TOKENS, "stream": true,
        "messages": [{"role": "user", "content": PROMPT}],
    });
    let out = Command::new("curl")
        .args([
            "-sS",
            "-N",
            "-o",
            "/dev/null",
            "-w",
            "%{time_starttransfer} %{time_total}",
        ])
        .args(["-H", "content-type: application/json", "-d"])
        .arg(body.to_string())
        .arg(format!("{url}/v1/chat/completions"))
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Ok((Duration::from_secs_f64(a), Duration::from_secs_f64(b))),
        _ => bail!("unexpected curl output {text:?}"),
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn run() -> Result<()> {
    let mut rounds = 10usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => {
                rounds = args
                    .next()
                    .ok_or_else(|| anyhow!("--rounds needs a value"))?
                    .parse()?;
            }
            other => bail!("unknown argument {other:?}; usage: bench-models [--rounds N]"),
        }
    }
    let bin = bench_common::use_release_bin()?;
    bench_common::print_machine(&bin);
    let llama = LlamaServer::start()?;
    let mut node = Node::new("home")?;
    node.start()?;
    node.cli(&["agent", "assign", "home"])?;
    node.cli(&[
        "models",
        "add",
        "local",
        "--kind",
        "openai",
        "--base-url",
        &llama.url(),
        "--model",
        MODEL_NAME,
        "--local",
        "--max-tokens",
        &MAX_TOKENS.to_string(),
    ])?;
    node.cli(&["models", "default", "local"])?;
    wait_until("the default model", Duration::from_secs(10), || {
        Ok(node.json(&["models", "list"])?["default"] == "local")
    })?;
    let rt = bench_common::runtime()?;
    let api = node.api()?;
    // Warm both paths once (the model's first prompt fills caches).
    rt.block_on(ask(&api))?;
    curl(&llama.url())?;
    let (mut first, mut total, mut c_first, mut c_total) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let (f, t) = rt.block_on(ask(&api))?;
        first.push(f);
        total.push(t);
        let (f, t) = curl(&llama.url())?;
        c_first.push(f);
        c_total.push(t);
    }
    let (f, t, cf, ct) = (
        median(&mut first),
        median(&mut total),
        median(&mut c_first),
        median(&mut c_total),
    );
    let ms = bench_common::ms;
    println!("rounds: {rounds}, prompt {PROMPT:?}, max_tokens {MAX_TOKENS}, model {MODEL_NAME}");
    println!(
        "ask to first token: iom p50 {:.1} ms, curl p50 {:.1} ms, ratio {:.2}",
        ms(f),
        ms(cf),
        ms(f) / ms(cf).max(0.001)
    );
    println!(
        "ask to answer:      iom p50 {:.1} ms, curl p50 {:.1} ms, ratio {:.2}",
        ms(t),
        ms(ct),
        ms(t) / ms(ct).max(0.001)
    );
    node.stop()?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-models: {e:#}");
            ExitCode::FAILURE
        }
    }
}
