//! Benchmark of the relay's TLS passthrough (issue 12), through `iom relay run --domain` vs
//! straight to the node's HTTPS listener, both on loopback, p50 and p90 over `RUNS` each
//! (interleaved):
//! - first page load: a fresh TCP connection and TLS handshake, `GET /`, then every `/…`
//!   script and stylesheet the page names, on that connection;
//! - cached load: the same on a connection kept open, as a browser's second visit with the
//!   shell in its HTTP cache revalidates (`GET /` and the files, no new handshake);
//! - ask to first streamed token: `POST /v1/ask` with a bearer token, then the request's
//!   event stream until its first `text` event (the fake Messages API answers at once, so
//!   this is iom's path: the conversation document, the runner, the stream); `ASKS` rounds
//!   (default 12, at most 14: a device may send 30 asks a minute).
//!
//! Run (after `cargo build --release -p iom-cli -p iom-tests --bins`):
//! `target/release/bench-relay-web`.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig};
use iom_tests::harness::{Node, free_port, iom_bin, wait_until};

mod bench_common;
use bench_common::*;

/// The same-origin `src="/…"` and `href="/…"` of a page.
fn subresources(page: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"/", "href=\"/"] {
        let mut rest = page;
        while let Some(i) = rest.find(attr) {
            rest = &rest[i + attr.len() - 1..];
            let Some(end) = rest.find('"') else { break };
            let path = &rest[..end];
            if !path.starts_with("//") && !out.iter().any(|p| p == path) {
                out.push(path.to_string());
            }
            rest = &rest[end..];
        }
    }
    out
}

/// A client for `host` resolved to `addr` (the node's certificate is self-signed).
fn client(host: &str, addr: std::net::SocketAddr) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .resolve(host, addr)
        .timeout(Duration::from_secs(20))
        .build()?)
}

/// `GET /` and every file it names, on `client`: the time and the bytes.
async fn page_load(client: &reqwest::Client, origin: &str) -> Result<(Duration, usize)> {
    let t0 = Instant::now();
    let page = client.get(format!("{origin}/")).send().await?;
    if !page.status().is_success() {
        bail!("GET / answered {}", page.status());
    }
    let page = page.text().await?;
    let mut bytes = page.len();
    for path in subresources(&page) {
        let r = client.get(format!("{origin}{path}")).send().await?;
        bytes += r.bytes().await?.len();
    }
    Ok((t0.elapsed(), bytes))
}

/// One first page load from `origin`, `host` resolved to `addr`: a new client, so a new
/// TCP connection and TLS handshake.
async fn load(origin: &str, host: &str, addr: std::net::SocketAddr) -> Result<(Duration, usize)> {
    page_load(&client(host, addr)?, origin).await
}

/// A page load on `client`'s open connection.
async fn cached_load(client: &reqwest::Client, origin: &str) -> Result<Duration> {
    Ok(page_load(client, origin).await?.0)
}

/// An ask until its first streamed `text` event.
async fn ask_first_token(client: &reqwest::Client, origin: &str, token: &str) -> Result<Duration> {
    let t0 = Instant::now();
    let asked: serde_json::Value = client
        .post(format!("{origin}/v1/ask"))
        .bearer_auth(token)
        .json(&serde_json::json!({ "prompt": "Say hello." }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let (Some(conv), Some(rid)) = (asked["conversation"].as_str(), asked["request_id"].as_str())
    else {
        bail!("no conversation or request id in {asked}");
    };
    let mut events = client
        .get(format!(
            "{origin}/v1/conversations/{conv}/requests/{rid}/events"
        ))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?;
    let mut seen = String::new();
    while let Some(chunk) = events.chunk().await? {
        seen.push_str(&String::from_utf8_lossy(&chunk));
        if seen.contains("event: text") {
            return Ok(t0.elapsed());
        }
        if seen.contains("event: failed") || seen.contains("event: done") {
            bail!("no text event before the end: {seen}");
        }
    }
    bail!("the event stream ended without text: {seen}")
}

fn main() -> Result<()> {
    let bin = use_release_bin()?;
    print_machine(&bin);
    let rt = runtime()?;
    let runs = param("RUNS", 30);

    let fake = rt.block_on(FakeAnthropic::start(FakeConfig {
        instant: true,
        ..FakeConfig::default()
    }))?;
    let mut home = Node::with_env("bench-web", &fake.node_env())?;
    let https_port = free_port()?;
    home.args
        .extend(["--https".to_string(), format!("127.0.0.1:{https_port}")]);
    home.start()?;
    let person = home.status()?["person"]
        .as_str()
        .context("no person")?
        .to_string();
    let me = home.device_id()?;
    home.cli(&["agent", "assign", &me])?;
    let token = home.json(&["token", "create", "--name", "bench"])?["token"]
        .as_str()
        .context("no token")?
        .to_string();
    home.stop()?;

    let relay_dir = tempfile::tempdir()?;
    let key = iom_node::relay::load_or_create_relay_key(relay_dir.path())
        .map_err(|e| anyhow::anyhow!("relay key: {e}"))?;
    let (p2p_port, tls_port) = (free_port()?, free_port()?);
    let mut relay = Command::new(iom_bin())
        .arg("--data-dir")
        .arg(relay_dir.path())
        .args([
            "relay",
            "run",
            "--no-rate-limits",
            "--allow-person",
            &person,
        ])
        .arg("--listen")
        .arg(format!("/ip4/127.0.0.1/tcp/{p2p_port}"))
        .args(["--domain", "relay.test", "--tls-listen"])
        .arg(format!("127.0.0.1:{tls_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> Result<()> {
        wait_until("the relay", Duration::from_secs(20), || {
            Ok(TcpStream::connect(("127.0.0.1", tls_port)).is_ok())
        })?;
        home.args.extend([
            "--relay".to_string(),
            format!(
                "/ip4/127.0.0.1/tcp/{p2p_port}/p2p/{}",
                key.public().to_peer_id()
            ),
        ]);
        home.start()?;
        wait_until("the relay name", Duration::from_secs(30), || {
            Ok(home.status()?["web"]["relay_url"].is_string())
        })?;
        let url = home.status()?["web"]["relay_url"]
            .as_str()
            .context("no relay url")?
            .trim_end_matches('/')
            .to_string();
        let host = url
            .trim_start_matches("https://")
            .split(':')
            .next()
            .context("no host")?
            .to_string();
        let direct_origin = format!("https://127.0.0.1:{https_port}");
        let direct_addr: std::net::SocketAddr = format!("127.0.0.1:{https_port}").parse()?;
        let relay_addr: std::net::SocketAddr = format!("127.0.0.1:{tls_port}").parse()?;
        // Warm both paths once.
        rt.block_on(load(&direct_origin, "127.0.0.1", direct_addr))?;
        let (_, bytes) = rt.block_on(load(&url, &host, relay_addr))?;
        let (mut direct, mut relayed) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            direct.push(ms(rt
                .block_on(load(&direct_origin, "127.0.0.1", direct_addr))?
                .0));
            relayed.push(ms(rt.block_on(load(&url, &host, relay_addr))?.0));
        }
        report(
            &format!("first page load ({bytes} bytes, new TLS connection)"),
            runs,
            &mut direct,
            &mut relayed,
        );

        let (direct_client, relay_client) = (
            client("127.0.0.1", direct_addr)?,
            client(&host, relay_addr)?,
        );
        rt.block_on(cached_load(&direct_client, &direct_origin))?;
        rt.block_on(cached_load(&relay_client, &url))?;
        let (mut direct, mut relayed) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            direct.push(ms(rt.block_on(cached_load(&direct_client, &direct_origin))?));
            relayed.push(ms(rt.block_on(cached_load(&relay_client, &url))?));
        }
        report(
            "cached load (open connection)",
            runs,
            &mut direct,
            &mut relayed,
        );

        rt.block_on(ask_first_token(&direct_client, &direct_origin, &token))?;
        rt.block_on(ask_first_token(&relay_client, &url, &token))?;
        // A device may send 30 asks a minute: ASKS rounds of each (default 12) stay under it.
        let asks = param("ASKS", 12).min(14);
        let (mut direct, mut relayed) = (Vec::new(), Vec::new());
        for _ in 0..asks {
            direct.push(ms(rt.block_on(ask_first_token(
                &direct_client,
                &direct_origin,
                &token,
            ))?));
            relayed.push(ms(rt.block_on(ask_first_token(
                &relay_client,
                &url,
                &token,
            ))?));
        }
        report(
            "ask to first streamed token",
            asks,
            &mut direct,
            &mut relayed,
        );
        Ok(())
    })();
    let _ = relay.kill();
    let _ = relay.wait();
    let _ = home.stop();
    result
}

/// One line: direct and relayed p50/p90 and the ratio of the p50s.
fn report(what: &str, runs: usize, direct: &mut [f64], relayed: &mut [f64]) {
    let (d50, d90) = (percentile(direct, 50.0), percentile(direct, 90.0));
    let (r50, r90) = (percentile(relayed, 50.0), percentile(relayed, 90.0));
    println!(
        "{what}, {runs} runs: direct p50 {d50:.1} ms p90 {d90:.1} ms; through the relay \
         p50 {r50:.1} ms p90 {r90:.1} ms; ratio p50 {:.2}x",
        r50 / d50
    );
}
