//! `iom doc new|list|get|put|log`.

use serde_json::{Value, json};

use super::Global;
use crate::Failure;
use crate::args::DocCommand;
use crate::output;

/// Runs a `doc` subcommand.
pub async fn run(g: &Global, cmd: DocCommand) -> Result<(), Failure> {
    let c = g.client()?;
    match cmd {
        DocCommand::New { kind, content } => {
            let content: Option<Value> = content
                .map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| Failure::Usage(anyhow::anyhow!("--content is not JSON: {e}")))?;
            if content.as_ref().is_some_and(|c| !c.is_object()) {
                return Err(Failure::Usage(anyhow::anyhow!(
                    "--content must be a JSON object"
                )));
            }
            let r = c
                .post("/v1/docs", &json!({ "kind": kind, "content": content }))
                .await?;
            if g.json {
                output::json(&r);
            } else {
                println!("{}", output::s(&r, "id"));
            }
        }
        DocCommand::List => {
            let r = c.get("/v1/docs").await?;
            if g.json {
                output::json(&r);
            } else {
                for d in r["documents"].as_array().into_iter().flatten() {
                    println!(
                        "{}  {:<12}  updated {}",
                        output::s(d, "id"),
                        output::s(d, "kind"),
                        output::time(d["updated_at"].as_i64().unwrap_or(0))
                    );
                }
            }
        }
        DocCommand::Get { id, path, at } => {
            let mut url = format!("/v1/docs/{}", urlencode(&id));
            let mut q = Vec::new();
            if let Some(at) = at {
                q.push(format!("at={}", urlencode(&at)));
            }
            if let Some(p) = path {
                q.push(format!("path={}", urlencode(&p)));
            }
            if !q.is_empty() {
                url = format!("{url}?{}", q.join("&"));
            }
            let r = c.get(&url).await?;
            if g.json {
                output::json(&r);
            } else {
                output::json(&r["content"]);
            }
        }
        DocCommand::Put {
            id,
            path,
            value,
            delete,
            message,
        } => {
            let value = match (&value, delete) {
                (_, true) => Value::Null,
                (Some(v), false) => serde_json::from_str(v).unwrap_or(Value::String(v.clone())),
                (None, false) => {
                    return Err(Failure::Usage(anyhow::anyhow!(
                        "give a VALUE (JSON or text), or --delete"
                    )));
                }
            };
            let r = c
                .put(
                    &format!("/v1/docs/{}", urlencode(&id)),
                    &json!({ "path": path, "value": value, "delete": delete, "message": message }),
                )
                .await?;
            if g.json {
                output::json(&r);
            } else {
                let heads: Vec<&str> = r["heads"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                println!("ok, heads {}", heads.join(","));
            }
        }
        DocCommand::Log { id } => {
            let r = c.get(&format!("/v1/docs/{}/log", urlencode(&id))).await?;
            if g.json {
                output::json(&r);
            } else {
                for ch in r["changes"].as_array().into_iter().flatten() {
                    let author = ch["author"].as_str().unwrap_or("-");
                    println!(
                        "{}  {}  {}  {}",
                        output::s(ch, "hash"),
                        output::time(ch["time"].as_i64().unwrap_or(0)),
                        &author[..author.len().min(16)],
                        output::s(ch, "message")
                    );
                }
            }
        }
    }
    Ok(())
}

/// Percent-encodes a path segment or query value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
