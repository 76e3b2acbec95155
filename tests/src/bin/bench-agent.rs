//! Agent benchmarks (issue 6), with the fake Messages API in instant mode and the real Docker
//! engine:
//!
//! 1. ask-to-answer overhead from a non-agent device over loopback (`POST /v1/ask` on the
//!    laptop's API, then its event stream until `done`), p50/p99; the same on the agent device
//!    itself, and the whole `iom ask --json` command for reference;
//! 2. the overhead of one tool call in a warm container (`bash true`): an ask with the tool
//!    minus an ask without it, in the same conversation;
//! 3. the first tool call with a cold container (a new conversation each time), beside
//!    `docker run --rm IMAGE true` measured in the same run.
//!
//! ```text
//! cargo build --release -p iom-cli -p iom-tests --bin bench-agent
//! target/release/bench-agent [--asks N] [--tools N] [--cold N]
//! ```
//!
//! Uses `target/release/iom` (or `IOM_BIN`).

mod bench_common;

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use iom_node::api::client::ApiClient;
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig};
use iom_tests::harness::{Node, containers_of, wait_mesh, wait_until};
use serde_json::json;

const IMAGE: &str = "iom-sandbox:1";

struct Opts {
    asks: usize,
    tools: usize,
    cold: usize,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        asks: 300,
        tools: 60,
        cold: 10,
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
            "--asks" => o.asks = num()?,
            "--tools" => o.tools = num()?,
            "--cold" => o.cold = num()?,
            other => bail!(
                "unknown argument {other:?}; usage: bench-agent [--asks N] [--tools N] [--cold N]"
            ),
        }
    }
    if o.asks == 0 || o.tools == 0 || o.cold == 0 {
        bail!("counts must be at least 1");
    }
    Ok(o)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// p50 / p99 / max of a sample, as one line.
fn summary(samples: &mut [Duration]) -> (Duration, Duration, String) {
    samples.sort();
    let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
    let max = samples.last().copied().unwrap_or_default();
    (
        p50,
        p99,
        format!(
            "n={} p50 {} p99 {} max {}",
            samples.len(),
            ms(p50),
            ms(p99),
            ms(max)
        ),
    )
}

/// How long an ask may take before it is counted as stalled.
const STALL: Duration = Duration::from_secs(15);

/// One ask through a node's API, followed to `done`; returns the conversation id and the
/// time, or `None` for the time when no answer arrived within [`STALL`].
async fn ask_api(
    api: &ApiClient,
    prompt: &str,
    conversation: Option<&str>,
) -> Result<(String, Option<Duration>)> {
    let t = Instant::now();
    let asked = api
        .post(
            "/v1/ask",
            &json!({ "prompt": prompt, "conversation": conversation }),
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let conv = asked["conversation"]
        .as_str()
        .ok_or_else(|| anyhow!("no conversation in {asked}"))?
        .to_string();
    let rid = asked["request_id"]
        .as_str()
        .ok_or_else(|| anyhow!("no request id in {asked}"))?;
    let mut resp = api
        .get_raw(&format!("/v1/conversations/{conv}/requests/{rid}/events"))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let mut buf = String::new();
    let deadline = tokio::time::Instant::now() + STALL;
    loop {
        let Ok(chunk) = tokio::time::timeout_at(deadline, resp.chunk()).await else {
            eprintln!("stalled: conversation {conv} request {rid} ({prompt:?})");
            return Ok((conv, None));
        };
        let chunk = chunk?.ok_or_else(|| anyhow!("the event stream ended early: {buf}"))?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
        if buf.contains("event: done") {
            return Ok((conv, Some(t.elapsed())));
        }
        if buf.contains("event: failed") {
            bail!("the request failed: {buf}");
        }
    }
}

/// Collects times, counting stalls apart.
#[derive(Default)]
struct Sample {
    times: Vec<Duration>,
    stalls: usize,
}

impl Sample {
    fn add(&mut self, r: (String, Option<Duration>)) -> String {
        match r.1 {
            Some(t) => self.times.push(t),
            None => self.stalls += 1,
        }
        r.0
    }

    fn summary(&mut self) -> (Duration, Duration, String) {
        let (p50, p99, mut line) = summary(&mut self.times);
        if self.stalls > 0 {
            line.push_str(&format!(
                " STALLED {} (no answer in {STALL:?})",
                self.stalls
            ));
        }
        (p50, p99, line)
    }
}

fn docker_run_true() -> Result<Duration> {
    let t = Instant::now();
    let out = Command::new("docker")
        .args(["run", "--rm", "--network", "none", IMAGE, "true"])
        .output()?;
    if !out.status.success() {
        bail!(
            "docker run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(t.elapsed())
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let fake = rt.block_on(FakeAnthropic::start(FakeConfig {
        api_key: "sk-ant-bench".into(),
        instant: true,
        ..FakeConfig::default()
    }))?;

    let mut home = Node::new("home")?;
    home.env = vec![
        ("ANTHROPIC_API_KEY".into(), "sk-ant-bench".into()),
        ("ANTHROPIC_BASE_URL".into(), fake.url().to_string()),
        ("IOM_LOG".into(), "warn".into()),
    ];
    // No rate limit and no budget: the benchmark sends hundreds of requests.
    std::fs::write(
        home.dir.join("config.toml"),
        "[agent]\nper_device_rate_per_min = 0\ndaily_token_budget = 0\n",
    )?;
    let mut laptop = Node::new("laptop")?;
    laptop.env = vec![("IOM_LOG".into(), "warn".into())];
    home.start()?;
    laptop.start()?;
    let code = home.invite(false)?;
    laptop.cli(&["join", &code])?;
    wait_mesh(&[&home, &laptop], Duration::from_secs(30))?;
    home.cli(&["agent", "assign", "home"])?;
    let home_id = home.device_id()?;
    wait_until(
        "the laptop to see the agent",
        Duration::from_secs(15),
        || Ok(laptop.json(&["agent", "status"])?["agent"] == home_id.as_str()),
    )?;

    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let docker_version = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "bench-agent: {} ({cpus} CPUs, load {}), Docker {docker_version}, fake model instant",
        bin.display(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    let laptop_api = laptop.api()?;
    let home_api = home.api()?;
    let result = rt.block_on(async {
        // 1. Ask-to-answer overhead, no tools.
        let mut warm = Sample::default();
        for i in 0..20 {
            warm.add(ask_api(&laptop_api, &format!("warm-up {i}"), None).await?);
        }
        let mut remote = Sample::default();
        for i in 0..opts.asks {
            remote.add(ask_api(&laptop_api, &format!("ping {i}"), None).await?);
        }
        let mut local = Sample::default();
        for i in 0..opts.asks {
            local.add(ask_api(&home_api, &format!("local ping {i}"), None).await?);
        }
        // 2. Warm tool call: pairs in one conversation (container warmed first).
        let tool = r#"[[tool bash {"command":"true"}]]"#;
        let conv = Sample::default().add(ask_api(&home_api, &format!("warm {tool}"), None).await?);
        let mut with_tool = Sample::default();
        let mut without = Sample::default();
        for i in 0..opts.tools {
            with_tool.add(ask_api(&home_api, &format!("t{i} {tool}"), Some(&conv)).await?);
            without.add(ask_api(&home_api, &format!("n{i}"), Some(&conv)).await?);
        }
        // 3. Cold container: a new conversation each time.
        let mut cold = Sample::default();
        let mut cold_base = Sample::default();
        for i in 0..opts.cold {
            cold_base.add(ask_api(&home_api, &format!("c{i}"), None).await?);
            cold.add(ask_api(&home_api, &format!("c{i} {tool}"), None).await?);
        }
        anyhow::Ok((remote, local, with_tool, without, cold, cold_base))
    });
    let (mut remote, mut local, mut with_tool, mut without, mut cold, mut cold_base) = result?;
    let mut docker_true = Vec::new();
    for _ in 0..opts.cold {
        docker_true.push(docker_run_true()?);
    }
    // The whole CLI command, for reference (process start included).
    let mut cli = Vec::new();
    for i in 0..30 {
        let t = Instant::now();
        laptop.json(&["ask", &format!("cli {i}")])?;
        cli.push(t.elapsed());
    }

    let (r50, _, r_line) = remote.summary();
    let (_, _, l_line) = local.summary();
    let (_, _, c_line) = summary(&mut cli);
    let (w50, w99, w_line) = with_tool.summary();
    let (n50, n99, n_line) = without.summary();
    let (k50, _, k_line) = cold.summary();
    let (b50, _, b_line) = cold_base.summary();
    let (d50, _, d_line) = summary(&mut docker_true);
    println!();
    println!("ask-to-answer, laptop -> agent over loopback: {r_line}  (target p50 < 50 ms)");
    println!("ask-to-answer, on the agent itself:           {l_line}");
    println!("`iom ask --json` command on the laptop:       {c_line}");
    println!();
    println!("warm conversation, ask with `bash true`:      {w_line}");
    println!("warm conversation, ask without a tool:        {n_line}");
    println!(
        "=> warm tool call overhead: p50 {} p99 {} (target < 100 ms)",
        ms(w50.saturating_sub(n50)),
        ms(w99.saturating_sub(n99))
    );
    println!();
    println!("new conversation, ask with `bash true`:       {k_line}");
    println!("new conversation, ask without a tool:         {b_line}");
    println!(
        "=> cold first tool call: p50 {} (target < 1.5 s)",
        ms(k50.saturating_sub(b50))
    );
    println!("`docker run --rm {IMAGE} true`:          {d_line}");
    println!(
        "\nresult: ask p50 {} {}; warm tool {} {}; cold tool {} {} (docker run {})",
        ms(r50),
        if r50 < Duration::from_millis(50) {
            "ok"
        } else {
            "MISSED"
        },
        ms(w50.saturating_sub(n50)),
        if w50.saturating_sub(n50) < Duration::from_millis(100) {
            "ok"
        } else {
            "MISSED"
        },
        ms(k50.saturating_sub(b50)),
        if k50.saturating_sub(b50) < Duration::from_millis(1500) {
            "ok"
        } else {
            "MISSED"
        },
        ms(d50)
    );

    for id in [&home_id] {
        for c in containers_of(id) {
            let _ = Command::new("docker").args(["rm", "-f", &c]).output();
        }
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
            eprintln!("bench-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
