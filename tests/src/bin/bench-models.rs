//! Model-provider benchmark (issue 14): a real local model (llama.cpp's `llama-server` with
//! SmolLM2-135M, `scripts/install-llama.sh`) answering through iom's OpenAI-compatible
//! client, beside the same prompt sent straight to the server with `curl`.
//!
//! For each of N rounds: ask through one node's API (`POST /v1/ask`, then its event stream):
//! the time to the first `text` event and to `done`; then `curl -N` of **the same request
//! body iom sent** (recorded by a pass-through TCP hop between iom and the server: the system
//! prompt, the tools and `max_tokens` included), `time_starttransfer` (the first byte, which
//! llama-server sends with the first token) and `time_total`. The ratio of the medians is
//! iom's overhead (the request and its progress in the conversation document, the runner).
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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use iom_node::api::client::ApiClient;
use iom_tests::harness::{Node, wait_until};
use iom_tests::llama::{LlamaServer, MODEL_NAME};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// A pass-through TCP hop in front of the model server that keeps the bytes clients send, so
/// the reference can send the server exactly what iom sent.
struct Recorder {
    port: u16,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    async fn start(upstream: std::net::SocketAddr) -> Result<Recorder> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let keep = sent.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let keep = keep.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let back = tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        keep.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend_from_slice(&buf[..n]);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    back.abort();
                });
            }
        });
        Ok(Recorder { port, sent })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The body of the last request sent through the hop.
    fn last_body(&self) -> Result<Vec<u8>> {
        let sent = self.sent.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let start = sent
            .windows(5)
            .rposition(|w| w == b"POST ")
            .context("no request went through the recorder")?;
        let req = &sent[start..];
        let head_end = req
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no end of headers")?;
        let head = String::from_utf8_lossy(&req[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .context("no content-length (a chunked body?)")?
            .trim()
            .parse()?;
        let body = &req[head_end + 4..];
        if body.len() < len {
            bail!(
                "the recorded body is cut short ({} of {len} bytes)",
                body.len()
            );
        }
        Ok(body[..len].to_vec())
    }
}

/// `body` straight to the server: (time to the first byte, total).
fn curl(url: &str, body: &[u8]) -> Result<(Duration, Duration)> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), body)?;
    let out = Command::new("curl")
        .args([
            "-sS",
            "-N",
            "-o",
            "/dev/null",
            "-w",
            "%{time_starttransfer} %{time_total}",
        ])
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(format!("@{}", file.path().display()))
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
    let rt = bench_common::runtime()?;
    let upstream = llama
        .url()
        .trim_start_matches("http://")
        .parse()
        .context("the server's address")?;
    let recorder = rt.block_on(Recorder::start(upstream))?;
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
        &recorder.url(),
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
    let api = node.api()?;
    // Warm both paths once (the model's first prompt fills caches).
    rt.block_on(ask(&api))?;
    let body = recorder.last_body()?;
    curl(&llama.url(), &body)?;
    let (mut first, mut total, mut c_first, mut c_total) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let (f, t) = rt.block_on(ask(&api))?;
        first.push(f);
        total.push(t);
        let (f, t) = curl(&llama.url(), &body)?;
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
    println!(
        "rounds: {rounds}, prompt {PROMPT:?}, max_tokens {MAX_TOKENS}, model {MODEL_NAME}; \
         the reference sends iom's recorded request ({} bytes: system prompt, tools, max_tokens {})",
        body.len(),
        serde_json::from_slice::<serde_json::Value>(&body)
            .map(|v| v["max_tokens"].to_string())
            .unwrap_or_else(|_| "?".into())
    );
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
