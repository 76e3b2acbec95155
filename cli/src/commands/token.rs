//! `iom token create|list|revoke`: bearer tokens for the HTTP API.

use serde_json::json;

use super::Global;
use crate::Failure;
use crate::args::TokenCommand;
use crate::output;

/// Runs a `token` subcommand.
pub async fn run(g: &Global, cmd: TokenCommand) -> Result<(), Failure> {
    let c = g.client()?;
    match cmd {
        TokenCommand::Create { name } => {
            let r = c.post("/v1/tokens", &json!({ "name": name })).await?;
            if g.json {
                output::json(&r);
            } else {
                println!("{}", output::s(&r, "token"));
                eprintln!(
                    "token {} ({}) created; it is shown only this once. Use it as \
                     `Authorization: Bearer TOKEN`.",
                    output::s(&r, "id"),
                    output::s(&r, "name")
                );
            }
        }
        TokenCommand::List => {
            let r = c.get("/v1/tokens").await?;
            if g.json {
                output::json(&r);
            } else {
                let items = r["tokens"].as_array().cloned().unwrap_or_default();
                if items.is_empty() {
                    println!("no tokens (create one with `iom token create`)");
                }
                for t in items {
                    println!(
                        "{}  {}  created {}",
                        output::s(&t, "id"),
                        output::s(&t, "name"),
                        output::time(t["created_at"].as_i64().unwrap_or(0))
                    );
                }
            }
        }
        TokenCommand::Revoke { id } => {
            let r = c.delete(&format!("/v1/tokens/{}", encode(&id))).await?;
            if g.json {
                output::json(&r);
            } else {
                println!(
                    "revoked token {} ({})",
                    output::s(&r, "id"),
                    output::s(&r, "name")
                );
            }
        }
    }
    Ok(())
}

/// Percent-encodes a path segment.
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
