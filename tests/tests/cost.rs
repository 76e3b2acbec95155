//! Cost, budgets, prompt caching and compaction (issue 14) end to end: real `iom` processes
//! and the fake Messages API (real HTTP and SSE), checked through `iom ask`, `iom usage`,
//! `iom conversations show`, `/metrics` and what the fake received.
//!
//! No Docker: the agents here never run a tool (`DOCKER_HOST` points nowhere).

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig, Scripted};
use iom_tests::harness::{
    Node, agent_http_node, iom_bin, runtime, scenario, wait_mesh, wait_until,
};
use serde_json::Value;

const NO_DOCKER: (&str, &str) = ("DOCKER_HOST", "unix:///nonexistent/docker.sock");

/// An agent node (`home`, holding the role) and a second device (`laptop`) in one mesh.
fn mesh_with_agent(fake: &FakeAnthropic, config: &str) -> Result<(Node, Node)> {
    let mut env = fake.node_env().to_vec();
    env.push(NO_DOCKER);
    let mut home = Node::with_env("home", &env)?;
    std::fs::write(home.dir.join("config.toml"), config)?;
    home.start()?;
    let mut laptop = Node::new("laptop")?;
    laptop.start()?;
    laptop.cli(&["join", &home.invite(false)?])?;
    wait_mesh(&[&home, &laptop], Duration::from_secs(30))?;
    let me = home.device_id()?;
    home.cli(&["agent", "assign", &me])?;
    wait_until(
        "the laptop to see the agent",
        Duration::from_secs(20),
        || Ok(laptop.json(&["agent", "status"])?["agent"].as_str() == Some(me.as_str())),
    )?;
    Ok((home, laptop))
}

/// `iom --json ask ARGS...` on `node`, as a child process (not waited for).
fn spawn_ask(node: &Node, args: &[&str]) -> Result<std::process::Child> {
    let mut cmd = Command::new(iom_bin());
    cmd.arg("--data-dir")
        .arg(&node.dir)
        .arg("--json")
        .arg("ask")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(cmd.spawn()?)
}

fn ask_json(node: &Node, args: &[&str]) -> Result<(Option<i32>, Value)> {
    let o: Output = spawn_ask(node, args)?.wait_with_output()?;
    let v = serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "`iom ask` printed no JSON: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    })?;
    Ok((o.status.code(), v))
}

#[test]
fn twenty_concurrent_asks_against_a_budget_for_five_run_five() {
    scenario(budget_body);
}

fn budget_body() -> Result<()> {
    let rt = runtime()?;
    let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
    // Every answer reports 20,000 output tokens (and no input): a run uses 20,000 tokens and
    // reserves its input estimate (the tool definitions and the prompt, under 3,000 tokens)
    // plus max_tokens = 20,000. 111,000 tokens hold five such runs and not a sixth, however
    // they interleave (four at a time run at once).
    for _ in 0..20 {
        fake.push_script(Scripted::TextWithUsage {
            text: "ok".into(),
            input_tokens: 0,
            output_tokens: 20_000,
        });
    }
    let (home, laptop) = mesh_with_agent(
        &fake,
        "[agent]\nmax_tokens = 20000\ndaily_token_budget = 111000\nper_device_rate_per_min = 0\n",
    )?;
    let children = (0..20)
        .map(|i| spawn_ask(&laptop, &[&format!("budget ask {i:02}"), "--no-stdin"]))
        .collect::<Result<Vec<_>>>()?;
    let (mut done, mut refused) = (0, 0);
    for child in children {
        let o = child.wait_with_output()?;
        let v: Value = serde_json::from_slice(&o.stdout).with_context(|| {
            format!(
                "no JSON from `iom ask`: {}",
                String::from_utf8_lossy(&o.stderr)
            )
        })?;
        match (o.status.code(), v["result"]["type"].as_str()) {
            (Some(0), Some("done")) => done += 1,
            (Some(3), Some("failed")) => {
                let e = v["result"]["error"].as_str().unwrap_or_default();
                ensure!(
                    e.starts_with("budget exceeded: the mesh's daily token budget (111000 tokens)"),
                    "{e}"
                );
                assert_eq!(v["result"]["reason"], "budget_exceeded", "{v}");
                refused += 1;
            }
            other => return Err(anyhow!("unexpected {other:?}: {v}")),
        }
    }
    assert_eq!((done, refused), (5, 15), "five ran, fifteen were refused");
    let asked = fake
        .requests()
        .iter()
        .filter(|r| r.body.to_string().contains("budget ask"))
        .count();
    assert_eq!(asked, 5, "the refused asks never reached the model");
    // `iom usage` on the laptop (from the synced conversations) and on the agent agree.
    let usage = |n: &Node| -> Result<Value> { n.json(&["usage", "--days", "1"]) };
    wait_until(
        "the answers to reach the laptop",
        Duration::from_secs(20),
        || Ok(usage(&laptop)?["total"]["answers"] == 5),
    )?;
    let here = usage(&home)?;
    assert_eq!(here["total"]["output_tokens"], 100_000, "{here}");
    ensure!(
        here["total"]["tokens"]
            .as_u64()
            .is_some_and(|t| t <= 111_000),
        "{here}"
    );
    let budget = &here["budgets"][0];
    assert_eq!(budget["scope"], "mesh", "{here}");
    assert_eq!(budget["limit"]["tokens"], 111_000);
    assert_eq!(budget["used"]["tokens"], 100_000);
    assert_eq!(budget["reserved"]["tokens"], 0);
    let by_device = &usage(&laptop)?["by_device"];
    assert_eq!(by_device[0]["name"], "laptop", "{by_device}");
    assert_eq!(by_device[0]["answers"], 5);
    home.assert_no_panic()?;
    laptop.assert_no_panic()
}

#[test]
fn the_second_turn_reads_the_cache_and_metrics_count_cost() {
    scenario(cache_body);
}

fn cache_body() -> Result<()> {
    let rt = runtime()?;
    let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
    let mut env = fake.node_env().to_vec();
    env.push(NO_DOCKER);
    let n = agent_http_node("cache", &env)?;
    let node = &n.node;
    let (code, first) = ask_json(node, &["what is in the cache?", "--no-stdin"])?;
    assert_eq!(code, Some(0), "{first}");
    let conv = first["conversation"]
        .as_str()
        .context("no conversation")?
        .to_string();
    let (code, second) = ask_json(node, &["and now?", "--conversation", &conv, "--no-stdin"])?;
    assert_eq!(code, Some(0), "{second}");
    // Both requests carried breakpoints on the tools, and the conversation's last block.
    let sent = fake.requests();
    assert_eq!(sent.len(), 2);
    for r in &sent {
        let body = &r.body;
        let tools = body["tools"].as_array().context("tools")?;
        ensure!(
            tools
                .last()
                .is_some_and(|t| t["cache_control"]["type"] == "ephemeral"),
            "{body}"
        );
        let last = &body["messages"]
            .as_array()
            .context("messages")?
            .last()
            .cloned();
        ensure!(
            last.as_ref()
                .and_then(|m| m["content"].as_array())
                .and_then(|b| b.last())
                .is_some_and(|b| b["cache_control"]["type"] == "ephemeral"),
            "{body}"
        );
    }
    // The answers record the split: the first wrote the cache, the second read it.
    let shown = node.json(&["conversations", "show", &conv])?;
    let replies: Vec<&Value> = shown["messages"]
        .as_array()
        .context("messages")?
        .iter()
        .filter(|m| m["role"] == "assistant")
        .collect();
    assert_eq!(replies.len(), 2, "{shown}");
    ensure!(
        replies[0]["usage"]["cache_creation_input_tokens"].as_u64() > Some(0),
        "{shown}"
    );
    ensure!(
        replies[1]["usage"]["cache_read_input_tokens"].as_u64() > Some(0),
        "{shown}"
    );
    assert_eq!(replies[1]["model"], "anthropic/claude-sonnet-4-5");
    ensure!(
        replies[1]["usage"]["cost_nanos"].as_u64() > Some(0),
        "{shown}"
    );
    // `iom usage` shows the cache reads and the cost, by model.
    let u = node.json(&["usage"])?;
    let total = &u["total"];
    ensure!(total["cache_read_input_tokens"].as_u64() > Some(0), "{u}");
    ensure!(total["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{u}");
    assert_eq!(
        u["by_model"][0]["key"], "anthropic/claude-sonnet-4-5",
        "{u}"
    );
    assert_eq!(u["by_conversation"][0]["key"], conv.as_str());
    let text = node.cli(&["usage"])?;
    ensure!(
        text.contains("cache read") && text.contains("per model"),
        "{text}"
    );
    // Prometheus: tokens by kind and the cost.
    let metrics = rt.block_on(async {
        reqwest::Client::new()
            .get(format!("{}/metrics", n.base))
            .bearer_auth(&n.token)
            .send()
            .await?
            .text()
            .await
    })?;
    let sample = |series: &str| -> Option<f64> {
        metrics.lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
    };
    for kind in ["input", "output", "cache_creation", "cache_read"] {
        let series = format!("iom_agent_tokens_total{{kind=\"{kind}\"}}");
        ensure!(
            sample(&series).is_some_and(|v| v > 0.0),
            "{series}: {metrics}"
        );
    }
    let cost = sample("iom_agent_cost_usd_total").context("no cost metric")?;
    let reported = total["cost_usd"].as_f64().unwrap_or(0.0);
    ensure!(
        (cost - reported).abs() < 1e-9,
        "metric {cost} vs usage {reported}"
    );
    node.assert_no_panic()
}

#[test]
fn a_long_conversation_is_compacted_and_every_device_sees_the_summary() {
    scenario(compaction_body);
}

fn compaction_body() -> Result<()> {
    let rt = runtime()?;
    let fake = rt.block_on(FakeAnthropic::start(FakeConfig {
        instant: true,
        ..FakeConfig::default()
    }))?;
    let window = 3000u64;
    let max_tokens = 400u64;
    let (home, laptop) = mesh_with_agent(
        &fake,
        &format!(
            "[agent]\ncontext_window = {window}\nmax_tokens = {max_tokens}\n\
             per_device_rate_per_min = 0\n"
        ),
    )?;
    // Eight long requests from the laptop in one conversation: the echo answers repeat them,
    // so the history outgrows the window after a few.
    let mut conv: Option<String> = None;
    for i in 0..8 {
        let prompt = format!("turn {i}: {}", "words and more words ".repeat(40));
        let mut args = vec![prompt.as_str(), "--no-stdin"];
        if let Some(c) = &conv {
            args.extend(["--conversation", c.as_str()]);
        }
        let (code, v) = ask_json(&laptop, &args)?;
        assert_eq!(code, Some(0), "turn {i}: {v}");
        conv = v["conversation"].as_str().map(str::to_string);
    }
    let conv = conv.context("no conversation")?;
    // Every request the model got fits the window, with max_tokens of room for the answer.
    let sent = fake.requests();
    for r in &sent {
        let input = (r.bytes / 4) as u64;
        ensure!(
            input + max_tokens <= window,
            "a request of {input} input tokens (+{max_tokens}) does not fit {window}"
        );
    }
    let summaries_sent = sent
        .iter()
        .filter(|r| {
            r.body
                .to_string()
                .contains("summarize the conversation so far")
        })
        .count();
    ensure!(summaries_sent >= 1, "no summary call");
    let last = sent.last().context("no request")?;
    ensure!(
        last.body
            .to_string()
            .contains("[Summary of the earlier conversation]"),
        "the last request carries the summary: {}",
        last.body
    );
    // Eight turns whole would be fifteen messages; the older ones went into the summary.
    let messages = last.body["messages"].as_array().map_or(0, Vec::len);
    ensure!(messages < 15, "{messages} messages sent");
    // The summary is in the conversation on both devices.
    for n in [&home, &laptop] {
        wait_until(
            "the summary on every device",
            Duration::from_secs(20),
            || {
                let shown = n.json(&["conversations", "show", &conv])?;
                Ok(shown["summaries"].as_array().is_some_and(|s| !s.is_empty())
                    && shown["messages"].as_array().map(Vec::len) == Some(16))
            },
        )?;
        let shown = n.json(&["conversations", "show", &conv])?;
        let s = &shown["summaries"][0];
        ensure!(
            s["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("summary: ")),
            "{shown}"
        );
        ensure!(s["requests"].as_u64() > Some(0), "{shown}");
        let text = n.cli(&["conversations", "show", &conv])?;
        ensure!(text.contains("[summary of "), "{text}");
    }
    home.assert_no_panic()?;
    laptop.assert_no_panic()
}
