//! `iom status`.

use super::Global;
use crate::Failure;
use crate::output;

/// `iom status [--json]`.
pub async fn status(g: &Global) -> Result<(), Failure> {
    let st = g.client()?.get("/v1/status").await?;
    if g.json {
        output::json(&st);
        return Ok(());
    }
    println!(
        "device:    {} ({})",
        output::s(&st, "device"),
        output::s(&st, "name")
    );
    println!("person:    {}", output::s(&st, "person"));
    println!("data dir:  {}", output::s(&st, "data_dir"));
    println!(
        "documents: {} (inventory {:.12}: equal on devices that are in sync)",
        st["documents"],
        output::s(&st, "inventory_root")
    );
    if let Some(addrs) = st.get("listen").and_then(|v| v.as_array()) {
        println!("listening:");
        for a in addrs {
            println!("  {}", a.as_str().unwrap_or_default());
        }
    }
    let web = &st["web"];
    if let Some(https) = web["https"].as_str() {
        println!(
            "web:       {https} (certificate sha256 {})",
            output::s(web, "fingerprint")
        );
    }
    if let Some(url) = web["relay_url"].as_str() {
        println!("from anywhere: {url} (through the relay)");
    }
    if let Some(peers) = st.get("peers").and_then(|v| v.as_array()) {
        println!("connections: {}", peers.len());
        for p in peers {
            println!(
                "  {} {} {}",
                output::s(p, "name"),
                output::s(p, "device"),
                output::s(p, "connection")
            );
        }
    }
    Ok(())
}
