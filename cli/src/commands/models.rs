//! `iom models add|list|remove|default`: the mesh's model providers, default model and
//! fallback chain (a synced setting; keys stay on the agent device).

use serde_json::{Value, json};

use super::Global;
use crate::Failure;
use crate::args::{ModelsAddArgs, ModelsCommand};
use crate::output;

/// Runs a `models` subcommand.
pub async fn run(g: &Global, cmd: ModelsCommand) -> Result<(), Failure> {
    let c = g.client()?;
    match cmd {
        ModelsCommand::Add(a) => {
            let r = c.post("/v1/models", &add_body(&a)).await?;
            if g.json {
                output::json(&r);
            } else {
                let p = &r["provider"];
                println!(
                    "provider {} added: {} {} at {}",
                    output::s(p, "name"),
                    output::s(p, "kind"),
                    output::s(p, "model"),
                    p["base_url"].as_str().unwrap_or("the hosted API")
                );
            }
        }
        ModelsCommand::List => {
            let r = c.get("/v1/models").await?;
            if g.json {
                output::json(&r);
            } else {
                print_list(&r);
            }
        }
        ModelsCommand::Remove { name } => {
            let r = c.delete(&format!("/v1/models/{name}")).await?;
            if g.json {
                output::json(&r);
            } else {
                println!("provider {name} removed");
            }
        }
        ModelsCommand::Default { model, fallback } => {
            let mut body = json!({ "model": model });
            if let Some(f) = fallback {
                body["fallback"] = json!(f);
            }
            let r = c.put("/v1/models/default", &body).await?;
            if g.json {
                output::json(&r);
            } else {
                print_list(&r);
            }
        }
    }
    Ok(())
}

/// The `POST /v1/models` body (only the fields given).
fn add_body(a: &ModelsAddArgs) -> Value {
    let mut b = json!({ "name": a.name, "kind": a.kind, "model": a.model });
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            b[k] = v;
        }
    };
    put("base_url", a.base_url.clone().map(Value::from));
    put("key_env", a.key_env.clone().map(Value::from));
    put("key_file", a.key_file.clone().map(Value::from));
    put("max_tokens", a.max_tokens.map(Value::from));
    put("tool_choice", a.tool_choice.clone().map(Value::from));
    put("retries", a.retries.map(Value::from));
    put("timeout_secs", a.timeout_secs.map(Value::from));
    if a.local {
        b["local"] = json!(true);
    }
    b
}

fn print_list(r: &Value) {
    let b = &r["builtin"];
    println!(
        "{} (built in): anthropic {} (the agent's [agent] settings)",
        output::s(b, "name"),
        output::s(b, "model")
    );
    for p in r["providers"].as_array().into_iter().flatten() {
        let key = match (p["key_env"].as_str(), p["key_file"].as_str()) {
            (Some(e), _) => format!(", key in ${e}"),
            (None, Some(f)) => format!(", key in {f}"),
            _ => String::new(),
        };
        println!(
            "{}: {} {} at {}{}{key}",
            output::s(p, "name"),
            output::s(p, "kind"),
            output::s(p, "model"),
            p["base_url"].as_str().unwrap_or("the hosted API"),
            if p["local"].as_bool() == Some(true) {
                " (local)"
            } else {
                ""
            },
        );
    }
    println!("default: {}", output::s(r, "default"));
    let chain: Vec<&str> = r["fallback"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if chain.is_empty() {
        println!("fallback: local providers only");
    } else {
        println!("fallback: {} (then local providers)", chain.join(", "));
    }
    for u in r["unreadable"].as_array().into_iter().flatten() {
        println!(
            "warning: {} is unreadable: {}",
            output::s(u, "key"),
            output::s(u, "reason")
        );
    }
}
