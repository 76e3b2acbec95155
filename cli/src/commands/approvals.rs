//! `iom approvals [--all]`, `iom approve ID`, `iom deny ID`, `iom approvals policy ...`:
//! approval requests of risky tool calls and the mesh's policy.

use serde_json::{Value, json};

use super::Global;
use super::token::encode;
use crate::Failure;
use crate::args::{ApprovalsCommand, PolicyCommand};
use crate::output;

/// `iom approvals [--all]` and `iom approvals policy ...`.
pub async fn run(g: &Global, all: bool, cmd: Option<ApprovalsCommand>) -> Result<(), Failure> {
    let c = g.client()?;
    let Some(ApprovalsCommand::Policy(cmd)) = cmd else {
        let r = c
            .get(if all {
                "/v1/approvals?all=true"
            } else {
                "/v1/approvals"
            })
            .await?;
        if g.json {
            output::json(&r);
            return Ok(());
        }
        let items = r["approvals"].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            println!("no {}approvals", if all { "" } else { "pending " });
        }
        let now = r["now"].as_i64().unwrap_or(0);
        for a in &items {
            print!("{}", describe(a, now));
        }
        return Ok(());
    };
    let r = match cmd {
        PolicyCommand::List => c.get("/v1/approvals/policy").await?,
        PolicyCommand::Set { tool, action, args } => {
            c.put(
                "/v1/approvals/policy/rules",
                &json!({ "tool": tool, "action": action, "args": args }),
            )
            .await?
        }
        PolicyCommand::Remove { tool, args } => {
            let mut path = format!("/v1/approvals/policy/rules?tool={}", encode(&tool));
            if let Some(a) = args {
                path.push_str(&format!("&args={}", encode(&a)));
            }
            c.delete(&path).await?
        }
        PolicyCommand::Timeout { duration } => {
            c.put(
                "/v1/approvals/policy/timeout",
                &json!({ "secs": duration.as_secs() }),
            )
            .await?
        }
    };
    if g.json {
        output::json(&r);
    } else {
        print_policy(&r);
    }
    Ok(())
}

/// `iom approve ID` / `iom deny ID`.
pub async fn answer(
    g: &Global,
    id: &str,
    approve: bool,
    reason: Option<String>,
) -> Result<(), Failure> {
    let c = g.client()?;
    let verb = if approve { "approve" } else { "deny" };
    let r = c
        .post(
            &format!("/v1/approvals/{}/{verb}", encode(id)),
            &json!({ "reason": reason }),
        )
        .await?;
    if g.json {
        output::json(&r);
    } else {
        let a = &r["approval"];
        println!(
            "{} {} ({} {}); {}",
            if approve { "approved" } else { "denied" },
            id,
            output::s(a, "tool"),
            output::s(a, "input"),
            output::s(&r, "note")
        );
    }
    Ok(())
}

/// One approval as a few lines of text.
pub fn describe(a: &Value, now: i64) -> String {
    let state = output::s(a, "effective_state");
    let mut out = format!(
        "{}  {}  {} {}\n",
        output::s(a, "id"),
        state,
        output::s(a, "tool"),
        output::s(a, "input")
    );
    for t in a["touches"].as_array().into_iter().flatten() {
        out.push_str(&format!("    touches: {}\n", t.as_str().unwrap_or("")));
    }
    if state == "pending" {
        let left = a["expires_at"].as_i64().unwrap_or(0) - now;
        out.push_str(&format!(
            "    answer within {left} s: iom approve {id} | iom deny {id} --reason ...\n",
            id = output::s(a, "id")
        ));
    } else if let Some(r) = a["reason"].as_str() {
        out.push_str(&format!("    {r}\n"));
    }
    out.push_str(&format!(
        "    conversation {} request {}\n",
        output::s(a, "conversation"),
        output::s(a, "request_id")
    ));
    out
}

fn print_policy(r: &Value) {
    let rules = r["rules"].as_array().cloned().unwrap_or_default();
    if rules.is_empty() {
        println!("no rules: every tool call runs (add one: iom approvals policy set bash ask)");
    }
    for rule in rules {
        let args = rule["args"]
            .as_str()
            .map(|a| format!(" --args {a:?}"))
            .unwrap_or_default();
        println!(
            "{:<6} {}{args}",
            output::s(&rule, "action"),
            output::s(&rule, "tool")
        );
    }
    println!(
        "approvals wait {} s for an answer, then count as denied",
        r["timeout_secs"]
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_approval_says_how_to_answer() {
        let a = json!({"id": "ap1", "effective_state": "pending", "tool": "bash",
            "input": "{\"command\":\"ls\"}", "touches": ["runs ls"], "expires_at": 160,
            "conversation": "c", "request_id": "r"});
        let text = describe(&a, 100);
        assert!(
            text.starts_with("ap1  pending  bash {\"command\":\"ls\"}\n"),
            "{text}"
        );
        assert!(text.contains("touches: runs ls"));
        assert!(text.contains("answer within 60 s: iom approve ap1 | iom deny ap1"));
        let done = json!({"id": "ap1", "effective_state": "denied", "reason": "no"});
        assert!(describe(&done, 0).contains("    no\n"));
    }
}
