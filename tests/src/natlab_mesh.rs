//! Two paired devices behind simulated NATs with a relay between them (the setup the NAT
//! tests and `bench-nat` share): the lab, the relay, A, then B joined with A's invite through
//! the relay.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use iom_protocol::invite::Invite;

use crate::harness::{wait_mesh, wait_until};
use crate::natlab::{
    HOST_A_IP, HOST_B_IP, LabNode, LabRelay, NODE_PORT, NatKind, NatLab, RELAY_IP,
};

/// Whose devices the relay serves with long, large circuits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allow {
    /// Nobody: every circuit gets the relay's small default limits.
    Nobody,
    /// A's (and so B's) person.
    APerson,
    /// Another person.
    SomeoneElse,
}

/// The lab, the relay and two paired nodes.
pub struct Mesh {
    // Field order is drop order: nodes and relay die before their namespaces go.
    /// Device A (behind NAT A).
    pub a: LabNode,
    /// Device B (behind NAT B), joined to A's mesh.
    pub b: LabNode,
    /// The relay on the public segment.
    pub relay: LabRelay,
    /// A's device id.
    pub a_id: String,
    /// B's device id.
    pub b_id: String,
    /// Scratch space (the relay's data dir, files to add).
    pub tmp: tempfile::TempDir,
    _lab: NatLab,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Builds the lab, starts the relay and A, checks A's invite carries its circuit address,
/// starts B, joins B with the invite and waits until both trust and reach each other. With
/// `Allow::APerson` it also waits until B has proved its new certificate to the relay (and so
/// gets the large limits too). `log` overrides the nodes' log filter.
pub fn paired(tag: &str, kind: NatKind, allow: Allow, log: Option<&str>) -> Result<Mesh> {
    let lab = NatLab::up(tag, kind).map_err(|e| anyhow!("{e}"))?;
    let tmp = tempfile::tempdir()?;
    let mut relay = LabRelay::new(&lab.relay_ns(), &tmp.path().join("relay"), &[])?;
    let relay_addr = relay.addr();
    let mut a = LabNode::new(
        "a",
        &lab.a_ns(),
        HOST_A_IP,
        std::slice::from_ref(&relay_addr),
    )?;
    if let Some(log) = log {
        a.set_env("IOM_LOG", log);
    }
    a.start()?;
    let person = a.status()?["person"]
        .as_str()
        .ok_or_else(|| anyhow!("no person in status"))?
        .to_string();
    match allow {
        Allow::Nobody => {}
        Allow::APerson => relay.push_flags(&["--allow-person", &person]),
        Allow::SomeoneElse => {
            let other = iom_protocol::keys::PersonKey::from_seed([42; 32]).id();
            ensure!(other.to_string() != person);
            relay.push_flags(&["--allow-person", &other.to_string()]);
        }
    }
    relay.start()?;

    // A reserves a slot: its circuit address shows in `listen`, and the invite carries it.
    wait_until("A's relay circuit address", Duration::from_secs(30), || {
        Ok(!a.circuit_addrs()?.is_empty())
    })?;
    let code = a.invite(false)?;
    let invite = Invite::parse(&code, now_secs()).map_err(|e| anyhow!("{e}"))?;
    ensure!(
        invite.addrs.iter().any(|x| x.contains("/p2p-circuit")
            && x.starts_with(&format!("/ip4/{RELAY_IP}/tcp/"))
            && x.contains(&relay.peer_id)),
        "the invite carries A's circuit address through the relay: {:?}",
        invite.addrs
    );

    let mut b = LabNode::new("b", &lab.b_ns(), HOST_B_IP, &[relay_addr])?;
    if let Some(log) = log {
        b.set_env("IOM_LOG", log);
    }
    b.start()?;
    wait_until("B's relay circuit address", Duration::from_secs(30), || {
        Ok(!b.circuit_addrs()?.is_empty())
    })?;
    let t0 = Instant::now();
    b.cli(&["join", &code])?;
    wait_mesh(&[&a, &b], Duration::from_secs(60))?;
    eprintln!("[{tag}] joined through the relay in {:?}", t0.elapsed());
    if allow == Allow::APerson {
        // B had no certificate of A's person when it first proved itself to the relay; once
        // it has joined, it reconnects to the relay to prove the new one.
        wait_until(
            "B's proof of its new certificate",
            Duration::from_secs(30),
            || {
                Ok(b.log_text()
                    .contains("relay grants this device long, large circuits"))
            },
        )?;
        wait_mesh(&[&a, &b], Duration::from_secs(60))?;
    }
    let (a_id, b_id) = (a.device_id()?, b.device_id()?);
    Ok(Mesh {
        a,
        b,
        relay,
        a_id,
        b_id,
        tmp,
        _lab: lab,
    })
}

/// The direct (hole-punched) TCP connection of `node` to the other NAT's public address, as
/// `local -> remote`, if there is one.
pub fn direct_socket(node: &LabNode, other_nat: Ipv4Addr) -> Result<Option<String>> {
    Ok(node
        .tcp_conns()?
        .into_iter()
        .find(|c| c.remote.ip() == other_nat && c.local.port() == NODE_PORT)
        .map(|c| format!("{} -> {}", c.local, c.remote)))
}
