//! `iom usage`: tokens and cost per day, device, model and conversation (`GET /v1/usage`).

use serde_json::Value;

use super::Global;
use crate::Failure;
use crate::output;

/// `iom usage [--days N]`.
pub async fn run(g: &Global, days: u32) -> Result<(), Failure> {
    let r = g.client()?.get(&format!("/v1/usage?days={days}")).await?;
    if g.json {
        output::json(&r);
        return Ok(());
    }
    println!(
        "last {} days (since {} UTC): {}",
        r["days"],
        output::s(&r, "since"),
        line(&r["total"])
    );
    println!("today: {}", line(&r["today"]));
    for b in r["budgets"].as_array().into_iter().flatten() {
        println!("budget: {}", budget(b));
    }
    for (title, key) in [
        ("per day", "by_day"),
        ("per device", "by_device"),
        ("per model", "by_model"),
        ("per conversation", "by_conversation"),
    ] {
        let rows = r[key].as_array().cloned().unwrap_or_default();
        if rows.is_empty() {
            continue;
        }
        println!("\n{title}:");
        for row in rows {
            let name = row["name"]
                .as_str()
                .map(|n| format!("  {n}"))
                .unwrap_or_default();
            println!("  {}{name}: {}", output::s(&row, "key"), line(&row));
        }
    }
    Ok(())
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// `$0.0123, 4567 tokens (in 100, out 200, cache write 3000, cache read 1267), 3 answers`.
fn line(t: &Value) -> String {
    format!(
        "${:.4}, {} tokens (in {}, out {}, cache write {}, cache read {}), {} answers",
        t["cost_usd"].as_f64().unwrap_or(0.0),
        n(t, "tokens"),
        n(t, "input_tokens"),
        n(t, "output_tokens"),
        n(t, "cache_creation_input_tokens"),
        n(t, "cache_read_input_tokens"),
        n(t, "answers"),
    )
}

fn budget(b: &Value) -> String {
    let whose = match b["device"].as_str() {
        Some(d) => format!("device {d}"),
        None => "mesh".into(),
    };
    let (limit, used, held) = (&b["limit"], &b["used"], &b["reserved"]);
    let mut parts = Vec::new();
    if n(limit, "tokens") > 0 {
        parts.push(format!(
            "{} of {} tokens ({} reserved)",
            n(used, "tokens"),
            n(limit, "tokens"),
            n(held, "tokens")
        ));
    }
    if n(limit, "nanos") > 0 {
        let usd = |v: &Value| n(v, "nanos") as f64 / 1e9;
        parts.push(format!(
            "${:.2} of ${:.2} (${:.2} reserved)",
            usd(used),
            usd(limit),
            usd(held)
        ));
    }
    format!(
        "{whose}, this {}: {}",
        output::s(b, "period"),
        parts.join(", ")
    )
}
