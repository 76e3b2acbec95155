//! `iom doctor`: the node's findings (`GET /v1/doctor`), or, with the node down, the checks
//! the CLI can make itself. Exit 1 when any finding is an error.

use anyhow::anyhow;
use iom_node::api::client::ClientError;
use iom_node::doctor::{Finding, Severity, worst};
use serde_json::json;

use super::Global;
use crate::Failure;

/// `iom doctor`.
pub async fn run(g: &Global) -> Result<(), Failure> {
    let findings: Vec<Finding> = match g.client()?.get("/v1/doctor").await {
        Ok(v) => serde_json::from_value(v["findings"].clone())
            .map_err(|e| anyhow!("the node's doctor answer is not understood: {e}"))?,
        Err(ClientError::NotRunning { .. }) => match super::node::default_config(g) {
            Ok(config) => iom_node::doctor::probe::offline(&config).await,
            // The node would not start with this configuration: that is the finding.
            Err(Failure::Usage(e) | Failure::Failed(e)) => vec![Finding::new(
                "config",
                Severity::Error,
                format!("the configuration is invalid: {e:#}"),
                format!(
                    "fix {} (see docs/cli.md, Configuration)",
                    g.data_dir.join("config.toml").display()
                ),
            )],
            Err(other) => return Err(other),
        },
        Err(e) => return Err(e.into()),
    };
    let worst = worst(&findings);
    if g.json {
        crate::output::json(&json!({ "worst": worst, "findings": findings }));
    } else {
        for f in &findings {
            println!("[{:<7}] {}: {}", f.severity.to_string(), f.check, f.detail);
            if !f.fix.is_empty() && f.severity != Severity::Ok {
                println!("          fix: {}", f.fix);
            }
        }
        let problems = findings
            .iter()
            .filter(|f| f.severity >= Severity::Warning)
            .count();
        println!(
            "{}",
            match worst {
                Severity::Error => format!("something is wrong ({problems} problem(s))"),
                Severity::Warning => format!("working, with {problems} warning(s)"),
                _ => "all good".to_string(),
            }
        );
    }
    if worst == Severity::Error {
        // The findings are printed; exit 1 without another message.
        return Err(Failure::Quiet);
    }
    Ok(())
}
