//! Real `iom` nodes behind simulated NATs (issue 5): a relay on the "public" segment, device
//! A behind NAT A and device B behind NAT B, in network namespaces with iptables MASQUERADE
//! routers (see `iom_tests::natlab`). mDNS is off and could not cross the routers anyway.
//!
//! - `pairing_sync_and_hole_punch_across_two_nats`: B joins with an invite code from A that
//!   carries A's relay circuit address; pairing and sync work through the relay; DCUtR then
//!   brings up a direct NAT-to-NAT connection (asserted from `iom status` and from the
//!   kernel's sockets), and a blob larger than the relay's default circuit limit moves over it.
//! - `port_randomizing_nat_stays_relayed_and_allowed_person_syncs_through_relay_restart`:
//!   with `MASQUERADE --random-fully` the punch fails and the connection stays relayed; the
//!   relay allows A's person, so a 1 MiB blob moves through it; then the relay is killed and
//!   started again, both nodes re-reserve and sync resumes without restarting them.
//! - `port_randomizing_nat_for_a_person_not_allowed_gets_only_default_limits`: the same, but
//!   the relay allows someone else: the blob does not get through and the relay's log shows
//!   the circuit cut at the default limit.
//!
//! Needs root (namespaces, iptables); see `natlab::require_netns`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use iom_tests::harness::{random_file, scenario, sha256_file, wait_until};
use iom_tests::natlab::{self, LabNode, NAT_A_IP, NAT_B_IP, NatKind, RELAY_IP};
use iom_tests::natlab_mesh::{Allow, Mesh, direct_socket, paired};

/// More than the relay's default circuit limit (128 KiB).
const BIG: u64 = 1024 * 1024;

fn new_doc(n: &LabNode, content: &str) -> Result<String> {
    n.json(&["doc", "new", "--content", content])?["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no id"))
}

/// A document created on each side appears on the other with the same content.
fn sync_both_ways(m: &Mesh, label: &str, timeout: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    let from_a = new_doc(&m.a, &format!(r#"{{"from":"a","label":"{label}"}}"#))?;
    let from_b = new_doc(&m.b, &format!(r#"{{"from":"b","label":"{label}"}}"#))?;
    for (node, id, from) in [(&m.b, &from_a, "a"), (&m.a, &from_b, "b")] {
        wait_until(
            &format!("{}'s document on {} ({label})", from, node.name),
            timeout,
            || {
                Ok(node
                    .doc_view(id)?
                    .is_some_and(|(_, c)| c["from"] == from && c["label"] == label))
            },
        )?;
    }
    Ok(t0.elapsed())
}

/// Adds a `len`-byte random blob on `from`; returns its hash and the source file's SHA-256.
fn add_blob(from: &LabNode, dir: &Path, len: u64, seed: u64) -> Result<(String, String)> {
    let src = dir.join(format!("blob-{seed}"));
    random_file(&src, len, seed)?;
    let added = from.json(&["blob", "add", src.to_str().unwrap_or_default()])?;
    let hash = added["hash"]
        .as_str()
        .ok_or_else(|| anyhow!("no hash in {added}"))?
        .to_string();
    Ok((hash, sha256_file(&src)?))
}

/// Waits until `to` lists the blob, then reads it back and checks it is intact.
fn blob_arrives(to: &LabNode, dir: &Path, hash: &str, sha: &str, timeout: Duration) -> Result<()> {
    wait_until(&format!("the blob on {}", to.name), timeout, || {
        Ok(to.blob_hashes()?.iter().any(|h| h == hash))
    })?;
    let out = dir.join(format!("out-{}-{hash}", to.name));
    to.cli(&["blob", "get", hash, "-o", out.to_str().unwrap_or_default()])?;
    ensure!(sha256_file(&out)? == sha, "the blob arrived intact");
    Ok(())
}

/// A TCP connection between the two hosts' NAT addresses in `node`'s namespace: local end
/// the node's own listen port (port reuse), remote end the other NAT's public address.
fn relay_socket(node: &LabNode) -> Result<bool> {
    Ok(node
        .tcp_conns()?
        .iter()
        .any(|c| c.remote.ip() == RELAY_IP && c.remote.port() == natlab::RELAY_PORT))
}

#[test]
fn pairing_sync_and_hole_punch_across_two_nats() {
    natlab::require_netns("pairing_sync_and_hole_punch_across_two_nats");
    scenario(|| {
        let m = paired("mesh-hp", NatKind::Masquerade, Allow::Nobody, None)?;
        let took = sync_both_ways(&m, "first", Duration::from_secs(30))?;
        eprintln!("documents synced both ways in {took:?}");

        // DCUtR: the relayed connection is upgraded to a direct one, on both sides.
        let t0 = Instant::now();
        for (node, other) in [(&m.a, &m.b_id), (&m.b, &m.a_id)] {
            wait_until(
                &format!("{}'s direct connection", node.name),
                Duration::from_secs(45),
                || Ok(node.peer_link(other)?.is_some_and(|(c, _)| c == "direct")),
            )?;
        }
        eprintln!("direct within {:?} of pairing", t0.elapsed());
        // From the connection itself: a TCP socket between the two NATs' public addresses
        // (A sees B's NAT, B sees A's NAT), not via the relay.
        let a_sock = direct_socket(&m.a, NAT_B_IP)?
            .ok_or_else(|| anyhow!("A has no socket to B's NAT: {:?}", m.a.tcp_conns()))?;
        let b_sock = direct_socket(&m.b, NAT_A_IP)?
            .ok_or_else(|| anyhow!("B has no socket to A's NAT: {:?}", m.b.tcp_conns()))?;
        eprintln!("direct sockets: A {a_sock}, B {b_sock}");
        ensure!(
            m.a.log_text().contains("hole punch succeeded")
                || m.b.log_text().contains("hole punch succeeded"),
            "DCUtR reported the punch"
        );
        // The relayed connection is retired once the direct one is up (streams would otherwise
        // pick either connection at random), so both sides end with only direct links.
        wait_until(
            "the relayed connection to be closed",
            Duration::from_secs(20),
            || {
                Ok([&m.a, &m.b].iter().any(|n| {
                    n.log_text()
                        .contains("direct connection is up; closing the relayed one")
                }) && m.relay.log().contains("circuit closed"))
            },
        )?;
        for (node, other) in [(&m.a, &m.b_id), (&m.b, &m.a_id)] {
            let link = node.peer_link(other)?;
            ensure!(
                link.as_ref().is_some_and(|(c, _)| c == "direct"),
                "{} still direct after the relayed connection closed: {link:?}",
                node.name
            );
        }
        // The relay itself stays connected (for the reservation).
        ensure!(relay_socket(&m.a)? && relay_socket(&m.b)?, "still reserved");

        // Sync goes on over the direct connection, including more than a relayed circuit
        // would carry for anyone (nobody is allowed on this relay).
        sync_both_ways(&m, "direct", Duration::from_secs(30))?;
        let (hash, sha) = add_blob(&m.a, m.tmp.path(), BIG, 1)?;
        let t0 = Instant::now();
        blob_arrives(&m.b, m.tmp.path(), &hash, &sha, Duration::from_secs(60))?;
        eprintln!(
            "1 MiB A -> B over the direct connection in {:?}",
            t0.elapsed()
        );
        ensure!(
            !m.relay.log().contains("Max circuit bytes reached"),
            "no circuit hit its limit: the data went direct"
        );
        m.a.assert_no_panic()?;
        m.b.assert_no_panic()?;
        Ok(())
    });
}

#[test]
fn port_randomizing_nat_stays_relayed_and_allowed_person_syncs_through_relay_restart() {
    natlab::require_netns(
        "port_randomizing_nat_stays_relayed_and_allowed_person_syncs_through_relay_restart",
    );
    scenario(|| {
        // `paired` waits for B to prove its new certificate to the relay: B gets the large
        // limits too (whichever side dials the circuit, its limits are the dialer's).
        let mut m = paired("mesh-sym", NatKind::PortRandomizing, Allow::APerson, None)?;
        let took = sync_both_ways(&m, "first", Duration::from_secs(30))?;
        eprintln!("documents synced both ways in {took:?}");

        // More than the default circuit limit, each way, through the relay.
        let (hash, sha) = add_blob(&m.a, m.tmp.path(), BIG, 2)?;
        let t0 = Instant::now();
        blob_arrives(&m.b, m.tmp.path(), &hash, &sha, Duration::from_secs(60))?;
        eprintln!("1 MiB A -> B through the relay in {:?}", t0.elapsed());
        let (hash, sha) = add_blob(&m.b, m.tmp.path(), BIG, 3)?;
        let t0 = Instant::now();
        blob_arrives(&m.a, m.tmp.path(), &hash, &sha, Duration::from_secs(60))?;
        eprintln!("1 MiB B -> A through the relay in {:?}", t0.elapsed());

        // The punch fails (random public ports); the node gives up on its own timer and the
        // link stays relayed on both sides.
        wait_until(
            "a node to give up on the hole punch",
            Duration::from_secs(90),
            || {
                Ok([&m.a, &m.b]
                    .iter()
                    .any(|n| n.log_text().contains("staying relayed")))
            },
        )?;
        for (node, other, other_nat) in [(&m.a, &m.b_id, NAT_B_IP), (&m.b, &m.a_id, NAT_A_IP)] {
            let link = node.peer_link(other)?;
            ensure!(
                link.as_ref().is_some_and(|(c, _)| c == "relayed"),
                "{} is relayed to the other: {link:?}",
                node.name
            );
            ensure!(
                direct_socket(node, other_nat)?.is_none(),
                "{} has no socket to the other NAT",
                node.name
            );
        }

        // The relay crashes and comes back with the same PeerId: both nodes re-reserve and
        // sync resumes, without restarting either node.
        let (pid_a, pid_b) = (m.a.pid(), m.b.pid());
        m.relay.kill();
        for n in [&m.a, &m.b] {
            wait_until(
                &format!("{} to lose its reservation", n.name),
                Duration::from_secs(30),
                || Ok(n.circuit_addrs()?.is_empty()),
            )?;
        }
        std::thread::sleep(Duration::from_secs(2));
        m.relay.start()?;
        let t0 = Instant::now();
        for n in [&m.a, &m.b] {
            wait_until(
                &format!("{} to re-reserve", n.name),
                Duration::from_secs(60),
                || Ok(!n.circuit_addrs()?.is_empty()),
            )?;
        }
        eprintln!(
            "both re-reserved {:?} after the relay restart",
            t0.elapsed()
        );
        let took = sync_both_ways(&m, "after-restart", Duration::from_secs(60))?;
        eprintln!("sync resumed: documents both ways in {took:?}");
        ensure!(
            m.a.pid() == pid_a && m.b.pid() == pid_b,
            "the nodes were not restarted"
        );
        let (hash, sha) = add_blob(&m.a, m.tmp.path(), BIG, 4)?;
        blob_arrives(&m.b, m.tmp.path(), &hash, &sha, Duration::from_secs(60))?;
        m.a.assert_no_panic()?;
        m.b.assert_no_panic()?;
        Ok(())
    });
}

#[test]
fn port_randomizing_nat_for_a_person_not_allowed_gets_only_default_limits() {
    natlab::require_netns("port_randomizing_nat_for_a_person_not_allowed_gets_only_default_limits");
    scenario(|| {
        let m = paired(
            "mesh-deny",
            NatKind::PortRandomizing,
            Allow::SomeoneElse,
            None,
        )?;
        // Small documents fit in the default circuit.
        let took = sync_both_ways(&m, "first", Duration::from_secs(30))?;
        eprintln!("documents synced both ways in {took:?}");
        ensure!(
            m.a.log_text()
                .contains("relay gives this device the default (small) circuits only"),
            "the relay refused A's person"
        );
        // A 1 MiB blob does not get through in 30 s (the allowed case needs well under 1 s).
        let (hash, _) = add_blob(&m.a, m.tmp.path(), BIG, 5)?;
        let deadline = Duration::from_secs(30);
        let arrived = wait_until("the blob on B", deadline, || {
            Ok(m.b.blob_hashes()?.contains(&hash))
        });
        ensure!(
            arrived.is_err(),
            "a 1 MiB blob went through a relay that does not serve this person"
        );
        let log = m.relay.log();
        ensure!(
            log.contains("Max circuit bytes reached"),
            "the relay cut the circuit at the default limit; relay log:\n{log}"
        );
        let link = m.b.peer_link(&m.a_id)?;
        ensure!(
            link.as_ref().is_none_or(|(c, _)| c != "direct"),
            "never direct: {link:?}"
        );
        // Small documents still sync: the nodes redial each other through the relay.
        sync_both_ways(&m, "after-cut", Duration::from_secs(60))?;
        m.a.assert_no_panic()?;
        m.b.assert_no_panic()?;
        Ok(())
    });
}
