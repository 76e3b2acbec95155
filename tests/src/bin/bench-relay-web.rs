//! Benchmark of the relay's TLS passthrough (issue 12): the first page load of the web app —
//! a fresh TCP connection and TLS handshake, `GET /`, then every `/…` script and stylesheet
//! the page names, on that connection — through `iom relay run --domain` vs straight to the
//! node's HTTPS listener, both on loopback, p50 and p90 over `RUNS` loads each (interleaved).
//!
//! Run (after `cargo build --release -p iom-cli -p iom-tests --bins`):
//! `target/release/bench-relay-web`.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
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

/// One first page load from `origin`, `host` resolved to `addr`.
async fn load(origin: &str, host: &str, addr: std::net::SocketAddr) -> Result<(Duration, usize)> {
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .resolve(host, addr)
        .timeout(Duration::from_secs(20))
        .build()?;
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

fn main() -> Result<()> {
    let bin = use_release_bin()?;
    print_machine(&bin);
    let rt = runtime()?;
    let runs = param("RUNS", 30);

    let mut home = Node::new("bench-web")?;
    let https_port = free_port()?;
    home.args
        .extend(["--https".to_string(), format!("127.0.0.1:{https_port}")]);
    home.start()?;
    let person = home.status()?["person"]
        .as_str()
        .context("no person")?
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
        let (d50, d90) = (percentile(&mut direct, 50.0), percentile(&mut direct, 90.0));
        let (r50, r90) = (
            percentile(&mut relayed, 50.0),
            percentile(&mut relayed, 90.0),
        );
        println!(
            "first page load ({bytes} bytes, new TLS connection), {runs} runs: \
             direct p50 {d50:.1} ms p90 {d90:.1} ms; through the relay p50 {r50:.1} ms \
             p90 {r90:.1} ms; ratio p50 {:.2}x",
            r50 / d50
        );
        Ok(())
    })();
    let _ = relay.kill();
    let _ = relay.wait();
    let _ = home.stop();
    result
}
