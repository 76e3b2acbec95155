//! `iom tools add|list|remove|enable|disable`: the agent's MCP servers, declared in the mesh.

use serde_json::{Value, json};

use super::Global;
use super::token::encode;
use crate::Failure;
use crate::args::ToolsCommand;
use crate::output;

/// Runs a `tools` subcommand.
pub async fn run(g: &Global, cmd: ToolsCommand) -> Result<(), Failure> {
    let c = g.client()?;
    match cmd {
        ToolsCommand::Add {
            name,
            command,
            image,
            env,
            mounts,
            timeout,
            disabled,
            replace,
            allow_hosts,
            secret_headers,
            secret_env,
        } => {
            if !env.is_empty() && !g.json {
                eprintln!(
                    "note: --env values sync to every device of the mesh; never put a secret \
                     in one"
                );
            }
            if !secret_env.is_empty() {
                // Printed with --json too: it is a warning, not output.
                eprintln!(
                    "warning: --secret-env puts the secret's value into the server's \
                     environment on the agent node: the server (and anyone who can inspect its \
                     container) can read it, and send it to any host its egress allows. Prefer \
                     --secret-header, which the proxy adds without the server seeing it."
                );
            }
            let r = c
                .post(
                    "/v1/tools",
                    &json!({
                        "name": name, "command": command, "image": image, "env": env,
                        "mounts": mounts, "timeout_secs": timeout, "disabled": disabled,
                        "replace": replace, "allow_hosts": allow_hosts,
                        "secret_headers": secret_headers, "secret_env": secret_env,
                    }),
                )
                .await?;
            if g.json {
                output::json(&r);
            } else {
                println!(
                    "MCP server {} declared; the agent node starts it (see `iom tools list`)",
                    output::s(&r, "name")
                );
            }
        }
        ToolsCommand::List => {
            let r = c.get("/v1/tools").await?;
            if g.json {
                output::json(&r);
            } else {
                let servers = r["servers"].as_array().cloned().unwrap_or_default();
                if servers.is_empty() {
                    println!(
                        "no MCP servers (add one with `iom tools add NAME -- COMMAND...`, see \
                         docs/mcp.md)"
                    );
                }
                for s in servers {
                    print_server(&s);
                }
            }
        }
        ToolsCommand::Remove { name } => {
            let r = c.delete(&format!("/v1/tools/{}", encode(&name))).await?;
            if g.json {
                output::json(&r);
            } else {
                println!("removed MCP server {}", output::s(&r, "name"));
            }
        }
        ToolsCommand::Enable { name } => toggle(g, &c, &name, true).await?,
        ToolsCommand::Disable { name } => toggle(g, &c, &name, false).await?,
    }
    Ok(())
}

async fn toggle(
    g: &Global,
    c: &iom_node::api::client::ApiClient,
    name: &str,
    enabled: bool,
) -> Result<(), Failure> {
    let r = c
        .put(
            &format!("/v1/tools/{}/enabled", encode(name)),
            &json!({ "enabled": enabled }),
        )
        .await?;
    if g.json {
        output::json(&r);
    } else {
        let verb = if enabled { "enabled" } else { "disabled" };
        println!("MCP server {} {verb}", output::s(&r, "name"));
    }
    Ok(())
}

fn print_server(s: &Value) {
    let command: Vec<String> = s["spec"]["command"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let restarts = s["restarts"].as_u64().unwrap_or(0);
    let restarts = if restarts > 0 {
        format!(", {restarts} restart(s)")
    } else {
        String::new()
    };
    println!(
        "{:<16} {:<9} {}{restarts}",
        output::s(s, "name"),
        output::s(s, "state"),
        command.join(" ")
    );
    let hosts: Vec<&str> = s["spec"]["allow_hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if hosts.is_empty() {
        println!("    network: none");
    } else {
        println!("    egress: {}", hosts.join(", "));
    }
    for h in s["spec"]["secret_headers"].as_array().into_iter().flatten() {
        println!(
            "    secret header for {}: {}: {}",
            output::s(h, "host"),
            output::s(h, "header"),
            output::s(h, "value")
        );
    }
    for (k, v) in s["spec"]["secret_env"].as_object().into_iter().flatten() {
        println!(
            "    secret in its environment: {k}={}",
            v.as_str().unwrap_or("")
        );
    }
    if let Some(why) = s["refused"].as_str() {
        println!("    refused: {why}");
    }
    if let Some(e) = s["error"].as_str() {
        println!("    last error: {e}");
    }
    for t in s["tools"].as_array().into_iter().flatten() {
        println!(
            "    {:<40} {}",
            output::s(t, "name"),
            output::s(t, "description")
        );
    }
}
