//! `iom ask`, `iom chat`, `iom conversations`, `iom agent`, `iom sandbox`.

use std::io::{BufRead, Write};

use anyhow::Context;
use futures::StreamExt;
use iom_node::api::client::{ApiClient, SseEvents};
use serde_json::{Value, json};

use super::Global;
use crate::Failure;
use crate::args::{AgentCommand, ConversationsCommand, SandboxCommand};
use crate::output;

/// `iom ask`.
pub async fn ask(
    g: &Global,
    prompt: &str,
    conversation: Option<String>,
    no_wait: bool,
) -> Result<(), Failure> {
    let c = g.client()?;
    let (asked, outcome) = ask_once(g, &c, prompt, conversation.as_deref(), no_wait).await?;
    if g.json {
        let mut v = asked;
        if let Some(o) = outcome {
            v["result"] = o;
        }
        output::json(&v);
    }
    Ok(())
}

/// Sends one request and (unless `no_wait`) follows it to the end. Returns the `ask` answer
/// and the final event.
async fn ask_once(
    g: &Global,
    c: &ApiClient,
    prompt: &str,
    conversation: Option<&str>,
    no_wait: bool,
) -> Result<(Value, Option<Value>), Failure> {
    let asked = c
        .post(
            "/v1/ask",
            &json!({ "prompt": prompt, "conversation": conversation, "interface": "cli" }),
        )
        .await?;
    let conv = output::s(&asked, "conversation").to_string();
    let rid = output::s(&asked, "request_id").to_string();
    if !g.json {
        if asked["queued"].as_bool() == Some(true) {
            eprintln!("queued: {}", output::s(&asked, "note"));
        }
        if no_wait {
            println!("conversation {conv} request {rid}");
        }
    }
    if no_wait {
        return Ok((asked, None));
    }
    let resp = c
        .get_raw(&format!("/v1/conversations/{conv}/requests/{rid}/events"))
        .await?;
    let mut stream = resp.bytes_stream();
    let mut sse = SseEvents::default();
    let mut last: Option<Value> = None;
    let mut out = std::io::stdout();
    'outer: while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the event stream broke off")?;
        sse.push(&chunk);
        while let Some(data) = sse.next_data() {
            let Ok(ev) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            let kind = output::s(&ev, "type").to_string();
            if !g.json {
                match kind.as_str() {
                    "status" => eprintln!("[{}]", output::s(&ev, "status")),
                    "text" => {
                        print!("{}", output::s(&ev, "delta"));
                        let _ = out.flush();
                    }
                    "tool_started" => eprintln!(
                        "\n[tool {} {}]",
                        output::s(&ev, "name"),
                        output::s(&ev, "input")
                    ),
                    "tool_finished" => {
                        let o = output::s(&ev, "output");
                        let short: String = o.chars().take(400).collect();
                        eprintln!(
                            "[tool {} {}] {}",
                            output::s(&ev, "name"),
                            if ev["is_error"].as_bool() == Some(true) {
                                "failed"
                            } else {
                                "ok"
                            },
                            short.trim_end()
                        );
                    }
                    "retry" => eprintln!("[{}]", output::s(&ev, "message")),
                    "done" => {
                        println!();
                        eprintln!(
                            "[done: {} tokens in, {} out{}]",
                            ev["input_tokens"],
                            ev["output_tokens"],
                            ev["note"]
                                .as_str()
                                .map(|n| format!("; {n}"))
                                .unwrap_or_default()
                        );
                    }
                    "failed" => {}
                    _ => {}
                }
            }
            let end = matches!(kind.as_str(), "done" | "failed");
            last = Some(ev);
            if end {
                break 'outer;
            }
        }
    }
    match &last {
        Some(ev) if output::s(ev, "type") == "failed" => {
            if g.json {
                return Ok((asked, last));
            }
            Err(anyhow::anyhow!("the request failed: {}", output::s(ev, "error")).into())
        }
        Some(_) => Ok((asked, last)),
        None => Err(anyhow::anyhow!("the node closed the event stream before the answer").into()),
    }
}

/// `iom chat`.
pub async fn chat(g: &Global, conversation: Option<String>) -> Result<(), Failure> {
    let c = g.client()?;
    let mut conv = conversation;
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
        match ask_once(g, &c, line, conv.as_deref(), false).await {
            Ok((asked, _)) => conv = Some(output::s(&asked, "conversation").to_string()),
            Err(Failure::Failed(e)) => eprintln!("error: {e}"),
            Err(e) => return Err(e),
        }
    }
    if let Some(c) = conv {
        eprintln!("conversation {c}");
    }
    Ok(())
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
                    println!(
                        "    ({} tokens in, {} out)",
                        u["input_tokens"], u["output_tokens"]
                    );
                }
                println!();
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
        SandboxCommand::Build { rootfs } => {
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
