//! `iom webhook callbacks|retry|drop`: answers to webhook requests on their way to a callback
//! URL, and the ones given up after every attempt failed.

use super::Global;
use super::token::encode;
use crate::Failure;
use crate::args::WebhookCommand;
use crate::output;

/// Runs a `webhook` subcommand.
pub async fn run(g: &Global, cmd: WebhookCommand) -> Result<(), Failure> {
    let c = g.client()?;
    let r = match &cmd {
        WebhookCommand::Callbacks => c.get("/v1/webhook/callbacks").await?,
        WebhookCommand::Retry { request_id } => {
            c.post(
                &format!("/v1/webhook/callbacks/{}/retry", encode(request_id)),
                &serde_json::json!({}),
            )
            .await?
        }
        WebhookCommand::Drop { request_id } => {
            c.delete(&format!("/v1/webhook/callbacks/{}", encode(request_id)))
                .await?
        }
    };
    if g.json {
        output::json(&r);
        return Ok(());
    }
    match cmd {
        WebhookCommand::Callbacks => {
            let items = r["callbacks"].as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                println!("no webhook callbacks pending or given up");
            }
            for cb in items {
                let since = cb["gave_up_at"]
                    .as_i64()
                    .map(|t| format!(" since {}", output::time(t)))
                    .unwrap_or_default();
                println!(
                    "{}  {}{since} after {} attempt(s)  {}",
                    output::s(&cb, "request_id"),
                    output::s(&cb, "state"),
                    cb["attempts"].as_u64().unwrap_or(0),
                    output::s(&cb, "url"),
                );
                if let Some(e) = cb["last_error"].as_str() {
                    println!("    last error: {e}");
                }
            }
        }
        WebhookCommand::Retry { request_id } => {
            println!("delivering the answer to {request_id} again");
        }
        WebhookCommand::Drop { request_id } => {
            println!("dropped the callback for {request_id}");
        }
    }
    Ok(())
}
