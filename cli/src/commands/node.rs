//! `iom init` and `iom node run`.

use anyhow::Context;
use iom_node::config::{Overrides, RawConfig};

use super::Global;
use crate::Failure;
use crate::args::{NodeCommand, NodeRunArgs};

/// `iom init`.
pub fn init(g: &Global, name: Option<String>) -> Result<(), Failure> {
    let created = iom_node::node::init_data_dir(&g.data_dir)?;
    if let Some(name) = name {
        write_name(g, &name)?;
    }
    if created {
        println!(
            "initialised {}: new device and person keys (start the node with `iom node run`)",
            g.data_dir.display()
        );
    } else {
        println!(
            "{} is already initialised; nothing changed",
            g.data_dir.display()
        );
    }
    Ok(())
}

fn write_name(g: &Global, name: &str) -> Result<(), Failure> {
    let path = g.data_dir.join("config.toml");
    let existing = std::fs::read_to_string(&path).unwrap_or_default();
    if existing.lines().any(|l| l.trim_start().starts_with("name")) {
        return Ok(());
    }
    let quoted = serde_json::to_string(name).context("encoding the name")?;
    std::fs::write(&path, format!("name = {quoted}\n{existing}"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// `iom node run`.
pub async fn run(g: &Global, cmd: NodeCommand) -> Result<(), Failure> {
    let NodeCommand::Run(args) = cmd;
    let config = load_config(g, args)?;
    iom_node::node::run(config, iom_node::node::shutdown_signal()).await?;
    Ok(())
}

/// The node's configuration as `iom node run` without flags would load it (for checks made
/// while the node is down).
pub fn default_config(g: &Global) -> Result<iom_node::config::Config, Failure> {
    load_config(
        g,
        NodeRunArgs {
            listen: Vec::new(),
            relays: Vec::new(),
            http: None,
            insecure_http: false,
            https: None,
            tls_cert: None,
            tls_key: None,
            no_mdns: false,
            name: None,
        },
    )
}

fn load_config(g: &Global, a: NodeRunArgs) -> Result<iom_node::config::Config, Failure> {
    let raw = RawConfig::load(&g.data_dir).map_err(|e| Failure::Usage(e.into()))?;
    let (clock_offset_secs, faults) = test_hooks_from_env()?;
    let overrides = Overrides {
        name: a.name,
        listen: a.listen,
        relays: a.relays,
        http: a.http,
        insecure_http: a.insecure_http,
        https: a.https,
        tls_cert: a.tls_cert,
        tls_key: a.tls_key,
        no_mdns: a.no_mdns,
        api_key: std::env::var("ANTHROPIC_API_KEY").ok(),
        base_url: std::env::var("ANTHROPIC_BASE_URL").ok(),
        clock_offset_secs,
        faults,
    };
    raw.validate(g.data_dir.clone(), overrides)
        .map_err(|e| Failure::Usage(e.into()))
}

/// `IOM_CLOCK_OFFSET_SECS` and `IOM_FAULT`, read only when the node library is built with its
/// `test-hooks` feature (`--features iom-cli/test-hooks`); the shipped binary warns and
/// ignores them.
fn test_hooks_from_env() -> Result<(Option<i64>, Vec<String>), Failure> {
    let offset = std::env::var("IOM_CLOCK_OFFSET_SECS").ok();
    let fault = std::env::var("IOM_FAULT").ok();
    if !iom_node::config::TEST_HOOKS {
        if offset.is_some() || fault.is_some() {
            tracing::warn!(
                "IOM_FAULT and IOM_CLOCK_OFFSET_SECS are test hooks; this build ignores them \
                 (build with --features iom-cli/test-hooks)"
            );
        }
        return Ok((None, Vec::new()));
    }
    let offset = offset
        .map(|v| v.parse::<i64>())
        .transpose()
        .map_err(|e| Failure::Usage(anyhow::anyhow!("IOM_CLOCK_OFFSET_SECS: {e}")))?;
    let faults = fault
        .map(|v| v.split(',').map(|f| f.trim().to_string()).collect())
        .unwrap_or_default();
    Ok((offset, faults))
}
