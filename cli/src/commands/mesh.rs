//! `iom invite`, `iom join`, `iom devices [revoke]`.

use std::io::IsTerminal;

use serde_json::json;

use super::Global;
use crate::Failure;
use crate::args::DevicesCommand;
use crate::output;

/// `iom invite`; `web`: `Some(base URL or None)` for a browser invite.
pub async fn invite(
    g: &Global,
    ttl: std::time::Duration,
    admin: bool,
    web: Option<Option<String>>,
) -> Result<(), Failure> {
    let r = g
        .client()?
        .post(
            "/v1/invites",
            &json!({
                "ttl_secs": ttl.as_secs(),
                "admin": admin,
                "web": web.is_some(),
                "web_base": web.clone().flatten(),
            }),
        )
        .await?;
    if g.json {
        if web.is_some() {
            output::json(&json!({
                "code": r["code"],
                "url": r["url"],
                "lan_url": r["lan_url"],
                "expires": r["expires"],
            }));
        } else {
            output::json(&r);
        }
        return Ok(());
    }
    let code = output::s(&r, "code");
    let expires = output::time(r["expires_at"].as_i64().unwrap_or(0));
    if web.is_some() {
        let url = output::s(&r, "url");
        println!("Browser invite (single use, expires {expires}): open on the phone or scan\n");
        println!("  {url}\n");
        output::qr(url);
        if let Some(lan) = r["lan_url"].as_str() {
            println!("\nOn the same network the node is also at:\n\n  {lan}");
        }
        return Ok(());
    }
    println!("Invite code (single use, expires {expires}):\n");
    println!("  {code}\n");
    println!("On the new device run:  iom join {code}\n");
    output::qr(code);
    Ok(())
}

/// Whether `iom join` waits for the first sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinWait {
    /// At a terminal without `--json`: wait, with a bar.
    IfTerminal,
    /// `--wait`: always wait (a bar only at a terminal).
    Always,
    /// `--no-wait`.
    Never,
}

impl JoinWait {
    /// From the `--wait` and `--no-wait` flags (clap keeps them exclusive).
    pub fn from_flags(wait: bool, no_wait: bool) -> JoinWait {
        match (wait, no_wait) {
            (true, _) => JoinWait::Always,
            (_, true) => JoinWait::Never,
            _ => JoinWait::IfTerminal,
        }
    }
}

/// `iom join`.
pub async fn join(
    g: &Global,
    code: String,
    name: Option<String>,
    wait: JoinWait,
) -> Result<(), Failure> {
    let client = g.client()?;
    let r = client
        .post("/v1/join", &json!({ "code": code, "name": name }))
        .await?;
    if !g.json {
        println!(
            "joined: this device is now trusted by person {} ({} devices)",
            output::s(&r, "person"),
            r["devices"]
        );
    }
    let terminal = crate::progress::wanted(g.json, std::io::stderr().is_terminal(), None);
    let waiting = match wait {
        JoinWait::Always => true,
        JoinWait::IfTerminal => terminal,
        JoinWait::Never => false,
    };
    if !waiting {
        if g.json {
            output::json(&r);
        }
        return Ok(());
    }
    let tally = super::first_sync::wait(&client, terminal)
        .await
        .map_err(|e| Failure::Failed(e.into()))?;
    if g.json {
        let mut r = r;
        r["first_sync"] = json!({
            "documents": tally.received(),
            "documents_here": tally.last().documents,
        });
        output::json(&r);
    } else {
        println!(
            "first sync done: {} documents received ({} here)",
            tally.received(),
            tally.last().documents
        );
    }
    Ok(())
}

/// `iom devices [revoke DEVICE]`.
pub async fn devices(g: &Global, cmd: Option<DevicesCommand>) -> Result<(), Failure> {
    let c = g.client()?;
    if let Some(DevicesCommand::Revoke { device }) = cmd {
        let r = c
            .post(
                &format!("/v1/devices/{}/revoke", super::doc::urlencode(&device)),
                &json!({}),
            )
            .await?;
        if g.json {
            output::json(&r);
        } else {
            println!("revoked {}", output::s(&r, "device"));
            for d in r["also_untrusted"].as_array().into_iter().flatten() {
                println!(
                    "  also no longer trusted (it was certified only by the revoked device): {}",
                    d.as_str().unwrap_or_default()
                );
            }
        }
        return Ok(());
    }
    let r = c.get("/v1/devices").await?;
    if g.json {
        output::json(&r);
        return Ok(());
    }
    println!(
        "{:<20} {:<54} {:<8} {:<6} {:<9} {:<9} LAST SEEN",
        "NAME", "DEVICE", "KIND", "ADMIN", "STATUS", "LINK"
    );
    for d in r["devices"].as_array().into_iter().flatten() {
        let status = if d["revoked"].as_bool() == Some(true) {
            "revoked"
        } else {
            "trusted"
        };
        let last = d["last_seen"]
            .as_i64()
            .map(output::time)
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:<54} {:<8} {:<6} {:<9} {:<9} {}",
            output::s(d, "name"),
            output::s(d, "device"),
            output::s(d, "kind"),
            if d["admin"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            status,
            output::s(d, "connection"),
            last
        );
    }
    Ok(())
}
