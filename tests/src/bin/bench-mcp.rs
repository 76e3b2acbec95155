//! Benchmark (issue 13): an MCP tool call into a warm, hardened server container, beside a
//! direct `docker exec` of the same work in the tool sandbox's warm container, and a server's
//! cold start (container created → MCP handshake → tools listed).
//!
//! Needs Docker and the python image with `mcp-server-time` (`iom sandbox build --python
//! --wheels DIR`, see docs/mcp.md). `RUNS` (default 50) calls each.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use iom_node::agent::mcp::McpHub;
use iom_node::agent::mcp::spec::{Declarations, Phase, ServerSpec};
use iom_node::agent::sandbox::debian_image::PYTHON_IMAGE;
use iom_node::agent::sandbox::{Sandbox, SandboxConfig};
use serde_json::json;

const SNIPPET: &str = "import datetime, zoneinfo; \
    print(datetime.datetime.now(zoneinfo.ZoneInfo('Europe/Paris')).isoformat())";

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p50 = ms(v[v.len() / 2]);
    let p95 = ms(v[(v.len() * 95 / 100).min(v.len() - 1)]);
    (p50, p95)
}

async fn wait_ready(hub: &McpHub, since: Instant) -> Result<Duration> {
    loop {
        let s = hub
            .statuses()
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no server"))?;
        match s.phase {
            Phase::Ready => return Ok(since.elapsed()),
            Phase::Failed => bail!("the server failed: {:?}", s.error),
            _ => {}
        }
        if since.elapsed() > Duration::from_secs(120) {
            bail!("not ready after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(50);
    let data = tempfile::tempdir()?;
    let cfg = SandboxConfig {
        image: PYTHON_IMAGE.to_string(),
        quota: iom_node::agent::sandbox::quota::QuotaMode::Off,
        ..SandboxConfig::default()
    };
    let spec = ServerSpec {
        name: "time".into(),
        command: vec![
            "python3".into(),
            "-m".into(),
            "mcp_server_time".into(),
            "--local-timezone".into(),
            "UTC".into(),
        ],
        image: None,
        enabled: true,
        env: Default::default(),
        mounts: Vec::new(),
        timeout_secs: None,
        allow_hosts: Vec::new(),
        secret_headers: Vec::new(),
        secret_env: Default::default(),
    };

    // Cold starts: a fresh hub and container each time.
    let mut cold = Vec::new();
    for _ in 0..5 {
        let hub = McpHub::new(cfg.clone(), data.path().into(), "bench-mcp-node".into());
        let t = Instant::now();
        hub.apply(Declarations {
            servers: vec![spec.clone()],
            refused: Vec::new(),
        })
        .await
        .map_err(|e| anyhow!(e))?;
        cold.push(wait_ready(&hub, t).await?);
        hub.stop_all();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let hub = McpHub::new(cfg.clone(), data.path().into(), "bench-mcp-node".into());
    hub.apply(Declarations {
        servers: vec![spec],
        refused: Vec::new(),
    })
    .await
    .map_err(|e| anyhow!(e))?;
    wait_ready(&hub, Instant::now()).await?;
    let input = json!({ "timezone": "Europe/Paris" });
    let mut mcp = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let r = hub.call("mcp__time__get_current_time", &input).await;
        mcp.push(t.elapsed());
        if r.is_error || !r.content.contains("Europe/Paris") {
            bail!("bad MCP answer: {}", r.content);
        }
    }

    // The reference: the same work by `docker exec` in the sandbox's warm container.
    let sandbox = Sandbox::connect(cfg, data.path().into(), "bench-mcp-node".into()).await?;
    let cmd = json!({ "command": format!("python3 -c \"{SNIPPET}\"") });
    sandbox.run_tool("bench", "bash", &cmd).await; // warm the container
    let mut exec = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let out = sandbox.run_tool("bench", "bash", &cmd).await;
        exec.push(t.elapsed());
        if out.is_error {
            bail!("exec failed: {}", out.output);
        }
    }
    let trivial = json!({ "command": "true" });
    let mut exec_true = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        sandbox.run_tool("bench", "bash", &trivial).await;
        exec_true.push(t.elapsed());
    }
    hub.stop_all();
    sandbox.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (c50, c95) = stats(cold);
    let (m50, m95) = stats(mcp);
    let (e50, e95) = stats(exec);
    let (t50, t95) = stats(exec_true);
    println!(
        "cold start (create container, handshake, tools/list), 5 runs: p50 {c50:.0} ms, p95 {c95:.0} ms"
    );
    println!(
        "warm MCP call mcp__time__get_current_time, {runs} runs: p50 {m50:.1} ms, p95 {m95:.1} ms"
    );
    println!(
        "reference: docker exec python3 -c <same work>, {runs} runs: p50 {e50:.1} ms, p95 {e95:.1} ms"
    );
    println!("reference: docker exec `true`, {runs} runs: p50 {t50:.1} ms, p95 {t95:.1} ms");
    println!(
        "MCP call minus docker exec of the same work: p50 {:+.1} ms (target: under +50 ms)",
        m50 - e50
    );
    Ok(())
}
