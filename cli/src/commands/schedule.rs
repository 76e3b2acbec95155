//! `iom schedule add|list|remove|enable|disable`: prompts the agent runs on a cron schedule.

use serde_json::{Value, json};

use super::Global;
use super::token::encode;
use crate::Failure;
use crate::args::ScheduleCommand;
use crate::output;

/// Runs a `schedule` subcommand.
pub async fn run(g: &Global, cmd: ScheduleCommand) -> Result<(), Failure> {
    let c = g.client()?;
    match cmd {
        ScheduleCommand::Add {
            cron,
            prompt,
            conversation,
            to,
            model,
        } => {
            let r = c
                .post(
                    "/v1/schedules",
                    &json!({ "cron": cron, "prompt": prompt, "conversation": conversation,
                             "to": to, "model": model }),
                )
                .await?;
            if g.json {
                output::json(&r);
            } else {
                let mail = if r["to"] == "email" {
                    " and by email"
                } else {
                    ""
                };
                println!(
                    "schedule {} added; answers go to conversation {}{mail}",
                    output::s(&r, "id"),
                    output::s(&r, "conversation")
                );
                print_next(&r);
            }
        }
        ScheduleCommand::List => {
            let r = c.get("/v1/schedules").await?;
            if g.json {
                output::json(&r);
            } else {
                let items = r["schedules"].as_array().cloned().unwrap_or_default();
                if items.is_empty() {
                    println!(
                        "no schedules (add one with `iom schedule add \"0 9 * * *\" \"PROMPT\"`)"
                    );
                }
                for s in items {
                    let state = if s["enabled"].as_bool().unwrap_or(true) {
                        ""
                    } else {
                        " (disabled)"
                    };
                    println!(
                        "{}  {:<16} {}{state}",
                        output::s(&s, "id"),
                        output::s(&s, "cron"),
                        output::s(&s, "prompt")
                    );
                    print_next(&s);
                }
            }
        }
        ScheduleCommand::Remove { id } => {
            let r = c.delete(&format!("/v1/schedules/{}", encode(&id))).await?;
            if g.json {
                output::json(&r);
            } else {
                println!("removed schedule {}", output::s(&r, "id"));
            }
        }
        ScheduleCommand::Enable { id } => toggle(g, &c, &id, true).await?,
        ScheduleCommand::Disable { id } => toggle(g, &c, &id, false).await?,
    }
    Ok(())
}

async fn toggle(
    g: &Global,
    c: &iom_node::api::client::ApiClient,
    id: &str,
    enabled: bool,
) -> Result<(), Failure> {
    let r = c
        .put(
            &format!("/v1/schedules/{}/enabled", encode(id)),
            &json!({ "enabled": enabled }),
        )
        .await?;
    if g.json {
        output::json(&r);
    } else {
        let verb = if enabled { "enabled" } else { "disabled" };
        println!("schedule {} {verb}", output::s(&r, "id"));
        if enabled {
            print_next(&r);
        }
    }
    Ok(())
}

fn print_next(s: &Value) {
    let next = s["next_slot"]
        .as_i64()
        .map(output::time)
        .unwrap_or_else(|| "never".into());
    let last = s["last_fired_slot"]
        .as_i64()
        .map(output::time)
        .unwrap_or_else(|| "never".into());
    let missed = s["missed_slots"].as_u64().unwrap_or(0);
    let missed = if missed > 0 {
        format!(", {missed} missed slot(s) skipped")
    } else {
        String::new()
    };
    println!("    next {next}, last fired {last}{missed}");
}
