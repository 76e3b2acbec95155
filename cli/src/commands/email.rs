//! `iom email status`: the email channel's connection, the last mail seen and failures.

use super::Global;
use crate::Failure;
use crate::args::EmailCommand;
use crate::output;

/// Runs an `email` subcommand.
pub async fn run(g: &Global, cmd: EmailCommand) -> Result<(), Failure> {
    let c = g.client()?;
    let EmailCommand::Status = cmd;
    let r = c.get("/v1/email/status").await?;
    if g.json {
        output::json(&r);
        return Ok(());
    }
    if r["configured"] != true {
        println!("email: not configured ({})", output::s(&r, "note"));
        return Ok(());
    }
    let st = &r["status"];
    println!(
        "email {}: {} since {}",
        output::s(&r, "address"),
        output::s(st, "state"),
        output::time(st["since"].as_i64().unwrap_or(0)),
    );
    println!(
        "  imap {}  mailbox {}",
        output::s(&r, "imap"),
        output::s(&r, "mailbox")
    );
    println!("  smtp {}", output::s(&r, "smtp"));
    println!(
        "  received {}, asked {}, answered {}, ignored {}, answers pending {}",
        st["received"], st["asked"], st["answered"], st["ignored"], r["pending_answers"]
    );
    if let Some(m) = st["last_message"].as_object() {
        let m = serde_json::Value::Object(m.clone());
        println!(
            "  last mail: uid {} from {} {:?} at {}: {}",
            m["uid"],
            output::s(&m, "from"),
            output::s(&m, "subject"),
            output::time(m["at"].as_i64().unwrap_or(0)),
            output::s(&m, "outcome"),
        );
    }
    for f in st["failures"].as_array().into_iter().flatten() {
        println!(
            "  failure at {}: {}",
            output::time(f["at"].as_i64().unwrap_or(0)),
            output::s(f, "error")
        );
    }
    Ok(())
}
