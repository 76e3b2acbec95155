//! `iom ask`, `iom chat`, `iom conversations`, `iom agent`, `iom sandbox`.

use std::io::{BufRead, Write};

use anyhow::Context;
use serde_json::json;

use super::Global;
use crate::Failure;
use crate::args::{AgentCommand, ConversationsCommand, OutputFormat, SandboxCommand};
use crate::output;

/// `iom chat`.
pub async fn chat(g: &Global, conversation: Option<String>) -> Result<(), Failure> {
    let c = g.client()?;
    let mut conv = conversation;
    let mut summaries = 0usize;
    let stdin = std::io::stdin();
    eprintln!("chatting with the assistant; an empty line or Ctrl-D ends");
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).context("reading stdin")? == 0 {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            break;
        }
        let format = if g.json {
            OutputFormat::Json
        } else {
            OutputFormat::Text
        };
        match super::ask::ask_once(&c, line, conv.as_deref(), &[], None, false, format).await {
            Ok(o) => {
                conv = Some(output::s(&o.asked, "conversation").to_string());
                if let Some(id) = &conv
                    && !g.json
                {
                    summaries = print_new_summaries(&c, id, summaries).await;
                }
                if g.json {
                    let _ = super::ask::finish(&o, format);
                } else {
                    match super::ask::exit_for(&o, false) {
                        Ok(()) => {}
                        Err(Failure::Queued(note)) => eprintln!("queued: {note}"),
                        Err(Failure::Failed(e) | Failure::Budget(e) | Failure::Usage(e)) => {
                            eprintln!("error: {e}")
                        }
                        Err(Failure::Quiet) => {}
                    }
                }
            }
            Err(Failure::Failed(e)) => eprintln!("error: {e}"),
            Err(e) => return Err(e),
        }
    }
    if let Some(c) = conv {
        eprintln!("conversation {c}");
    }
    Ok(())
}

/// `12 tokens in, 5 out, 300 from cache, $0.0004, claude-haiku-4-5`.
fn usage_line(u: &serde_json::Value, model: Option<&str>) -> String {
    let n = |k: &str| u[k].as_u64().unwrap_or(0);
    let mut parts = vec![format!(
        "{} tokens in, {} out",
        n("input_tokens"),
        n("output_tokens")
    )];
    if n("cache_creation_input_tokens") > 0 {
        parts.push(format!("{} to cache", n("cache_creation_input_tokens")));
    }
    if n("cache_read_input_tokens") > 0 {
        parts.push(format!("{} from cache", n("cache_read_input_tokens")));
    }
    if n("cost_nanos") > 0 {
        parts.push(format!("${:.4}", n("cost_nanos") as f64 / 1e9));
    }
    if let Some(m) = model {
        parts.push(m.to_string());
    }
    parts.join(", ")
}

/// A summary entry: `[summary of 3 earlier requests] …`.
fn summary_line(s: &serde_json::Value) -> String {
    let n = s["requests"].as_u64().unwrap_or(0);
    format!(
        "[summary of {n} earlier request{}] {}",
        if n == 1 { "" } else { "s" },
        output::s(s, "text")
    )
}

/// Prints the summaries of conversation `conv` after the first `seen` (for `iom chat`);
/// returns how many there are now.
async fn print_new_summaries(
    c: &iom_node::api::client::ApiClient,
    conv: &str,
    seen: usize,
) -> usize {
    let Ok(r) = c
        .get(&format!(
            "/v1/conversations/{}",
            super::doc::urlencode(conv)
        ))
        .await
    else {
        return seen;
    };
    let all = r["summaries"].as_array().cloned().unwrap_or_default();
    for s in all.iter().skip(seen) {
        eprintln!("{}", summary_line(s));
    }
    all.len().max(seen)
}

/// `iom conversations`.
pub async fn conversations(g: &Global, cmd: ConversationsCommand) -> Result<(), Failure> {
    let c = g.client()?;
    match cmd {
        ConversationsCommand::List => {
            let r = c.get("/v1/conversations").await?;
            if g.json {
                output::json(&r);
                return Ok(());
            }
            for conv in r["conversations"].as_array().into_iter().flatten() {
                println!(
                    "{}  {}  {:>3} msgs  {:>7} tokens  {}",
                    output::s(conv, "id"),
                    output::time(conv["updated_at"].as_i64().unwrap_or(0)),
                    conv["messages"],
                    conv["usage"]["input_tokens"].as_u64().unwrap_or(0)
                        + conv["usage"]["output_tokens"].as_u64().unwrap_or(0),
                    output::s(conv, "title")
                );
            }
        }
        ConversationsCommand::Show { id } => {
            let r = c
                .get(&format!("/v1/conversations/{}", super::doc::urlencode(&id)))
                .await?;
            if g.json {
                output::json(&r);
                return Ok(());
            }
            println!("# {}\n", output::s(&r, "title"));
            for m in r["messages"].as_array().into_iter().flatten() {
                let role = output::s(m, "role");
                let status = m["status"]
                    .as_str()
                    .map(|s| format!(" [{s}]"))
                    .unwrap_or_default();
                let err = m["error"]
                    .as_str()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                println!("{role}{status}{err}: {}", output::s(m, "text"));
                for t in m["tool_calls"].as_array().into_iter().flatten() {
                    println!(
                        "    tool {} {}",
                        output::s(t, "name"),
                        output::s(t, "input")
                    );
                }
                if let Some(u) = m.get("usage").filter(|u| !u.is_null()) {
                    println!("    ({})", usage_line(u, m["model"].as_str()));
                }
                println!();
                let through = m["reply_to"].as_str().filter(|_| role == "assistant");
                for s in r["summaries"].as_array().into_iter().flatten() {
                    if through.is_some() && s["through"].as_str() == through {
                        println!("{}\n", summary_line(s));
                    }
                }
            }
            println!(
                "total: {} tokens in, {} out",
                r["usage"]["input_tokens"], r["usage"]["output_tokens"]
            );
        }
    }
    Ok(())
}

/// `iom agent`.
pub async fn agent(g: &Global, cmd: AgentCommand) -> Result<(), Failure> {
    let c = g.client()?;
    let r = match cmd {
        AgentCommand::Assign { device } => {
            c.post("/v1/agent/assign", &json!({ "device": device }))
                .await?
        }
        AgentCommand::Status => c.get("/v1/agent").await?,
    };
    if g.json {
        output::json(&r);
        return Ok(());
    }
    if let Some(epoch) = r.get("epoch").filter(|_| r.get("this_device").is_none()) {
        println!(
            "agent role given to {} (epoch {epoch})",
            output::s(&r, "agent")
        );
        return Ok(());
    }
    match r["agent"].as_str() {
        None => {
            println!("no device holds the agent role; assign one with `iom agent assign DEVICE`")
        }
        Some(a) => {
            println!(
                "agent:   {} ({}) epoch {}",
                output::s(&r, "name"),
                a,
                r["epoch"]
            );
            println!("link:    {}", output::s(&r, "connection"));
            println!("running: {}", r["running"]);
            if r["this_device"].as_bool() == Some(true) {
                println!("api key: {}", output::s(&r, "api_key"));
                println!("model:   {}", output::s(&r, "model"));
                println!(
                    "tokens today: {} of {}",
                    r["tokens_today"], r["daily_token_budget"]
                );
            }
        }
    }
    Ok(())
}

/// `iom sandbox build|check` (talks to Docker directly; no node needed).
pub async fn sandbox(g: &Global, cmd: SandboxCommand) -> Result<(), Failure> {
    use iom_node::agent::sandbox::{check, container, image};
    let raw =
        iom_node::config::RawConfig::load(&g.data_dir).map_err(|e| Failure::Usage(e.into()))?;
    match cmd {
        SandboxCommand::Build {
            python: true,
            wheels,
            pip,
            apt,
            suite,
            mirror,
            tag,
            ..
        } => {
            let docker = container::connect_docker().await?;
            let mut spec = iom_node::agent::sandbox::debian_image::PythonImageSpec::new(
                iom_node::agent::sandbox::debian_image::cache_dir(),
            );
            spec.wheels = wheels;
            spec.requirements = pip;
            spec.extra_packages = apt;
            spec.mirror = mirror;
            if let Some(s) = suite {
                spec.suite = s;
            }
            if let Some(t) = tag {
                spec.image = t;
            }
            let quiet = g.json;
            let step = move |what: &str| {
                if !quiet {
                    eprintln!("{what}…");
                }
            };
            let built =
                iom_node::agent::sandbox::debian_image::build_python_image(&docker, &spec, &step)
                    .await?;
            if g.json {
                output::json(&serde_json::to_value(&built).context("encoding")?);
            } else {
                let from = if built.cached {
                    "cached rootfs"
                } else {
                    "new rootfs"
                };
                println!(
                    "built sandbox image {} ({from} {}; {} package(s) installed offline)",
                    built.image,
                    built.rootfs.display(),
                    built.installed
                );
            }
        }
        SandboxCommand::Build { rootfs, .. } => {
            let docker = container::connect_docker().await?;
            let bar = crate::progress::Progress::new(
                &format!("building {}", raw.sandbox.image),
                None,
                g.json,
            );
            let build = image::build_image(&docker, rootfs.as_deref(), &raw.sandbox.image);
            tokio::pin!(build);
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
            let image = loop {
                tokio::select! {
                    r = &mut build => break r,
                    _ = tick.tick(), if bar.is_on() => bar.tick(),
                }
            };
            bar.finish();
            let image = image?;
            if g.json {
                output::json(&json!({ "image": image }));
            } else {
                println!("built sandbox image {image}");
            }
        }
        SandboxCommand::Check => {
            let items = check::check(&raw.sandbox, &g.data_dir).await;
            let ok = items.iter().all(|i| i.ok);
            if g.json {
                output::json(&serde_json::to_value(&items).context("encoding")?);
            } else {
                for i in &items {
                    println!(
                        "{} {:<22} {}",
                        if i.ok { "ok  " } else { "FAIL" },
                        i.name,
                        i.detail
                    );
                }
            }
            if !ok {
                return Err(
                    anyhow::anyhow!("the sandbox is not ready; fix the FAIL lines above").into(),
                );
            }
        }
    }
    Ok(())
}
