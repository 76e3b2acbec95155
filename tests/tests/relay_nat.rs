//! `iom relay run` end to end: hole punching through the relay in the NAT lab (network
//! namespaces + iptables, root), per-device circuit limits with `/iom/relay-auth/1`, and a
//! stable relay identity across restarts (loopback, no root).
//!
//! Clients are `relay-probe` processes (a minimal libp2p client in this crate) that print one
//! JSON line per event.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use iom_protocol::cert::{CertBody, Certificate};
use iom_protocol::keys::{DeviceKey, PersonKey};
use iom_tests::natlab::{self, NatKind, NatLab, Proc};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_relay-probe");

/// The `iom` binary the harness uses (`IOM_BIN`, or built once with the test build's features).
fn iom_binary() -> PathBuf {
    iom_tests::harness::iom_bin().to_path_buf()
}

/// A command running the relay with `data_dir` and `flags` (`iom relay run` flags), printing
/// its JSON address line. Uses `iom relay run` when the CLI has it; until the command is wired
/// into the CLI, falls back (loudly) to `relay-probe relay`, which runs the same library code.
fn relay_command(ns: Option<&str>, data_dir: &Path, flags: &[&str]) -> Command {
    let iom = iom_binary();
    let has_relay = Command::new(&iom)
        .args(["relay", "run", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    let (program, mut args): (PathBuf, Vec<String>) = if has_relay {
        (
            iom,
            vec![
                "--json".into(),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "relay".into(),
                "run".into(),
            ],
        )
    } else {
        eprintln!(
            "NOTE: {} has no `relay run` command yet; using `relay-probe relay` (same library code)",
            iom.display()
        );
        (
            PROBE.into(),
            vec!["relay".into(), data_dir.display().to_string()],
        )
    };
    args.extend(flags.iter().map(|s| s.to_string()));
    let mut cmd = match ns {
        Some(ns) => natlab::netns_command(ns, &program),
        None => Command::new(&program),
    };
    cmd.args(args).env("IOM_LOG", "info,libp2p_relay=debug");
    cmd
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or(Value::Null)
}

/// Starts a relay, waits for its address line, returns (process, peer id, addrs).
fn start_relay(ns: Option<&str>, data_dir: &Path, flags: &[&str]) -> (Proc, String, Vec<String>) {
    let relay = Proc::spawn("relay", relay_command(ns, data_dir, flags)).expect("spawn relay");
    let line = relay
        .wait_line(Duration::from_secs(60), |l| json(l)["peer_id"].is_string())
        .unwrap_or_else(|| panic!("relay printed no address line\n{}", relay.dump()));
    let v = json(&line);
    let peer_id = v["peer_id"].as_str().unwrap_or_default().to_string();
    let addrs = v["addrs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    (relay, peer_id, addrs)
}

/// A probe (device `seed`, optionally proving `chain` to the relay) that dials `remote`
/// through the relay without hole punching and pushes `push` bytes over the circuit.
fn push_probe(
    name: &str,
    relay_addr: &str,
    remote: &str,
    seed: u8,
    chain: Option<&str>,
    push: &str,
) -> Proc {
    let seed = seed_hex(seed);
    let mut args = vec![
        "dial", "--relay", relay_addr, "--remote", remote, "--seed", &seed,
    ];
    if let Some(chain) = chain {
        args.extend(["--chain", chain]);
    }
    args.extend(["--push", push, "--no-dcutr"]);
    probe(None, name, &args)
}

fn probe(ns: Option<&str>, name: &str, args: &[&str]) -> Proc {
    let cmd = match ns {
        Some(ns) => {
            let mut c = natlab::netns_command(ns, PROBE);
            c.args(args);
            c
        }
        None => {
            let mut c = Command::new(PROBE);
            c.args(args);
            c
        }
    };
    Proc::spawn(name, cmd).expect("spawn relay-probe")
}

fn seed_hex(n: u8) -> String {
    hex::encode([n; 32])
}

fn peer_of(n: u8) -> String {
    DeviceKey::from_seed([n; 32]).id().to_peer_id().to_string()
}

fn await_line(
    p: &Proc,
    secs: u64,
    what: &str,
    pred: impl Fn(&Value) -> bool,
    others: &[&Proc],
) -> Value {
    match p.wait_line(Duration::from_secs(secs), |l| pred(&json(l))) {
        Some(line) => json(&line),
        None => {
            let mut dump = p.dump();
            for o in others {
                dump.push('\n');
                dump.push_str(&o.dump());
            }
            panic!("timed out waiting for {what}\n{dump}")
        }
    }
}

/// Relay in the public namespace, A and B behind their NATs; A reserves, B dials A through
/// the relay. Returns the processes.
fn lab_run(lab: &NatLab, data: &Path, quic: bool) -> (Proc, Proc, Proc) {
    let relay_ns = lab.relay_ns();
    let (relay, relay_id, addrs) = start_relay(
        Some(&relay_ns),
        data,
        &[
            "--listen",
            "/ip4/10.99.0.1/tcp/4001",
            "--listen",
            "/ip4/10.99.0.1/udp/4001/quic-v1",
        ],
    );
    assert!(
        addrs
            .iter()
            .any(|a| a.starts_with("/ip4/10.99.0.1/tcp/4001/p2p/")),
        "relay advertises its listen address when there is no --external-addr: {addrs:?}"
    );
    let relay_addr = if quic {
        format!("/ip4/10.99.0.1/udp/4001/quic-v1/p2p/{relay_id}")
    } else {
        format!("/ip4/10.99.0.1/tcp/4001/p2p/{relay_id}")
    };
    let a = probe(
        Some(&lab.a_ns()),
        "A",
        &["listen", "--relay", &relay_addr, "--seed", &seed_hex(2)],
    );
    let reservation = await_line(
        &a,
        30,
        "A's reservation",
        |v| v["event"] == "reservation",
        &[&relay],
    );
    assert!(
        reservation["limit"]
            .as_str()
            .unwrap_or_default()
            .contains("131072"),
        "strangers get the tiny default limit: {reservation}"
    );
    let observed = await_line(
        &a,
        5,
        "A's observed address",
        |v| v["event"] == "observed_addr",
        &[],
    );
    assert!(
        observed["addr"]
            .as_str()
            .unwrap_or_default()
            .starts_with("/ip4/10.99.0.2/"),
        "the relay sees A behind NAT A: {observed}"
    );
    let b = probe(
        Some(&lab.b_ns()),
        "B",
        &[
            "dial",
            "--relay",
            &relay_addr,
            "--remote",
            &peer_of(2),
            "--seed",
            &seed_hex(3),
        ],
    );
    let a_id = peer_of(2);
    await_line(
        &b,
        30,
        "B's relayed connection to A",
        |v| v["event"] == "connected" && v["peer"] == a_id.as_str() && v["relayed"] == true,
        &[&a, &relay],
    );
    (relay, a, b)
}

/// Hole punch through the relay with plain MASQUERADE: DCUtR succeeds and A and B get a
/// direct NAT-to-NAT connection.
fn hole_punch_direct(test: &str, tag: &str, quic: bool) {
    natlab::require_netns(test);
    let lab = NatLab::up(tag, NatKind::Masquerade).expect("NAT lab");
    let data = tempfile::tempdir().expect("tempdir");
    let (relay, a, b) = lab_run(&lab, data.path(), quic);
    let (a_id, b_id) = (peer_of(2), peer_of(3));
    // The reservation holder drives DCUtR; either side may report success.
    let ok = a
        .wait_line(Duration::from_secs(30), |l| {
            let v = json(l);
            v["event"] == "dcutr" && v["ok"] == true
        })
        .or_else(|| {
            b.wait_line(Duration::from_secs(5), |l| {
                let v = json(l);
                v["event"] == "dcutr" && v["ok"] == true
            })
        });
    assert!(
        ok.is_some(),
        "no successful DCUtR event\n{}\n{}\n{}",
        a.dump(),
        b.dump(),
        relay.dump()
    );
    let direct_a = await_line(
        &a,
        10,
        "A's direct connection to B",
        |v| v["event"] == "connected" && v["peer"] == b_id.as_str() && v["relayed"] == false,
        &[&b],
    );
    let direct_b = await_line(
        &b,
        10,
        "B's direct connection to A",
        |v| v["event"] == "connected" && v["peer"] == a_id.as_str() && v["relayed"] == false,
        &[&a],
    );
    // Direct means NAT-to-NAT addresses, not the relay.
    for (v, nat) in [(&direct_a, "10.99.0.3"), (&direct_b, "10.99.0.2")] {
        let addr = v["addr"].as_str().unwrap_or_default();
        assert!(addr.contains(nat) && !addr.contains("p2p-circuit"), "{v}");
        assert_eq!(addr.contains("quic-v1"), quic, "{v}");
    }
}

#[test]
fn hole_punch_upgrades_to_direct_behind_masquerade() {
    hole_punch_direct(
        "hole_punch_upgrades_to_direct_behind_masquerade",
        "hp",
        false,
    );
}

#[test]
fn hole_punch_over_quic_upgrades_to_direct_behind_masquerade() {
    hole_punch_direct(
        "hole_punch_over_quic_upgrades_to_direct_behind_masquerade",
        "hpq",
        true,
    );
}

#[test]
fn hole_punch_fails_behind_port_randomizing_nat_and_stays_relayed() {
    natlab::require_netns("hole_punch_fails_behind_port_randomizing_nat_and_stays_relayed");
    let lab = NatLab::up("sym", NatKind::PortRandomizing).expect("NAT lab");
    let data = tempfile::tempdir().expect("tempdir");
    let (relay, a, b) = lab_run(&lab, data.path(), false);
    let (a_id, b_id) = (peer_of(2), peer_of(3));
    // DCUtR reports failure on the reservation holder's side only, after 3 attempts.
    let failed = await_line(
        &a,
        90,
        "A's failed DCUtR",
        |v| v["event"] == "dcutr" && v["ok"] == false,
        &[&b, &relay],
    );
    assert_eq!(failed["peer"], b_id.as_str());
    let direct = |p: &Proc, other: &str| {
        p.lines().iter().any(|l| {
            let v = json(l);
            v["event"] == "connected" && v["peer"] == other && v["relayed"] == false
        })
    };
    assert!(
        !direct(&a, &b_id) && !direct(&b, &a_id),
        "no direct connection\n{}\n{}",
        a.dump(),
        b.dump()
    );
    let relayed_closed = b.lines().iter().any(|l| {
        let v = json(l);
        v["event"] == "closed" && v["peer"] == a_id.as_str() && v["relayed"] == true
    });
    assert!(
        !relayed_closed,
        "the relayed connection stays up\n{}",
        b.dump()
    );
}

/// Writes `certs` as a chain file (hex, one per line).
fn chain_file(dir: &Path, name: &str, certs: &[Vec<u8>]) -> PathBuf {
    let path = dir.join(name);
    let text: Vec<String> = certs.iter().map(hex::encode).collect();
    std::fs::write(&path, text.join("\n")).expect("write chain");
    path
}

fn device_cert(person: &PersonKey, device: u8) -> Vec<u8> {
    let body = CertBody::Device {
        kind: None,
        person: person.id(),
        device: DeviceKey::from_seed([device; 32]).id(),
        name: format!("device-{device}"),
        admin: false,
        issued_at: 1_700_000_000,
    };
    Certificate::issue_by_person(body, person)
        .expect("issue certificate")
        .to_bytes()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn allowed_devices_get_large_circuits_and_others_are_cut_at_the_default_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let person = PersonKey::from_seed([7; 32]);
    let stranger_person = PersonKey::from_seed([8; 32]);
    let port = free_port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let person_hex = person.id().to_string();
    let (relay, relay_id, _) = start_relay(
        None,
        &dir.path().join("relay"),
        &[
            "--listen",
            &listen,
            "--external-addr",
            &listen,
            "--allow-person",
            &person_hex,
        ],
    );
    let relay_addr = format!("{listen}/p2p/{relay_id}");
    // A (device 2 of the allowed person) authenticates, then reserves.
    let a_chain = chain_file(dir.path(), "a.chain", &[device_cert(&person, 2)]);
    let a_chain = a_chain.display().to_string();
    let a = probe(
        None,
        "A",
        &[
            "listen",
            "--relay",
            &relay_addr,
            "--seed",
            &seed_hex(2),
            "--chain",
            &a_chain,
            "--no-dcutr",
        ],
    );
    let auth = await_line(&a, 30, "A's auth", |v| v["event"] == "auth", &[&relay]);
    assert_eq!(auth["ok"], true, "{auth}");
    let reservation = await_line(
        &a,
        30,
        "A's reservation",
        |v| v["event"] == "reservation",
        &[&relay],
    );
    assert!(
        reservation["limit"]
            .as_str()
            .unwrap_or_default()
            .contains("86400"),
        "an allowed device is told the long limit: {reservation}"
    );

    let push = 1024 * 1024;
    let push_arg = push.to_string();
    let a_id = peer_of(2);
    // B: device 3 of the same person pushes 1 MiB through the circuit.
    let b_chain = chain_file(dir.path(), "b.chain", &[device_cert(&person, 3)]);
    let b_chain = b_chain.display().to_string();
    let b = push_probe("B", &relay_addr, &a_id, 3, Some(&b_chain), &push_arg);
    let auth = await_line(&b, 30, "B's auth", |v| v["event"] == "auth", &[&relay]);
    assert_eq!(auth["ok"], true, "{auth}");
    let pushed = await_line(&b, 60, "B's push", |v| v["event"] == "push", &[&a, &relay]);
    assert_eq!(
        pushed["ok"],
        true,
        "allowed device pushes 1 MiB: {pushed}\n{}",
        a.dump()
    );
    assert_eq!(pushed["acked"], push);

    // C: a device of a person the relay does not serve; its auth is refused and its circuit
    // keeps the default 128 KiB limit.
    let c_chain = chain_file(dir.path(), "c.chain", &[device_cert(&stranger_person, 4)]);
    let c_chain = c_chain.display().to_string();
    let c = push_probe("C", &relay_addr, &a_id, 4, Some(&c_chain), &push_arg);
    let auth = await_line(&c, 30, "C's auth", |v| v["event"] == "auth", &[&relay]);
    assert_eq!(auth["ok"], false, "{auth}");
    let pushed = await_line(&c, 60, "C's push", |v| v["event"] == "push", &[&a, &relay]);
    assert_eq!(pushed["ok"], false, "a stranger's circuit is cut: {pushed}");
    let received = await_line(
        &a,
        30,
        "A's count of C's push",
        |v| v["event"] == "push_received" && v["peer"] == peer_of(4).as_str(),
        &[&c],
    );
    let got = received["bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        got <= 160 * 1024,
        "cut at about 128 KiB, got {got}: {received}"
    );

    // D: no auth at all, same result.
    let d = push_probe("D", &relay_addr, &a_id, 5, None, &push_arg);
    let pushed = await_line(&d, 60, "D's push", |v| v["event"] == "push", &[&a, &relay]);
    assert_eq!(
        pushed["ok"], false,
        "an unauthenticated circuit is cut: {pushed}"
    );
}

#[test]
fn relay_keeps_its_peer_id_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("relay");
    let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let (mut first, id1, addrs) = start_relay(None, &data, &["--listen", &listen]);
    assert!(
        addrs.iter().all(|a| a.ends_with(&format!("/p2p/{id1}"))),
        "printed addresses end in /p2p/<id>: {addrs:?}"
    );
    first.kill();
    let key = data.join("relay.key");
    let mode = std::fs::metadata(&key).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.ok(), Some(0o600), "relay.key is private");
    let (_second, id2, _) = start_relay(None, &data, &["--listen", &listen]);
    assert_eq!(id1, id2, "same data dir, same PeerId");
}
