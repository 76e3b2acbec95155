//! Reachability benchmarks (issue 5) with real `iom` nodes in the NAT lab
//! (`iom_tests::natlab`: network namespaces, iptables MASQUERADE routers; run as root):
//!
//! - `punch`: the time from B's relayed connection to A to its direct one (DCUtR), p50 over
//!   `RUNS` (10) runs. Each run SIGKILLs B and starts it again; B redials A through the relay
//!   and the two punch through their NATs. Measured from B's log timestamps (the relayed
//!   `connection established` line and the `direct connection to a relayed peer` line), so
//!   the number is the node's own, without any polling delay.
//! - `throughput`: a `BLOB_MIB` (16) MiB blob each way (median of `REPS` (3) blobs per
//!   direction), A to B and B to A, over the direct
//!   (hole-punched) connection and through the relay (port-randomising NATs, the relay allows
//!   the person), from `iom blob add` on one side to the blob listed on the other; prints MB/s
//!   and the relayed/direct ratio.
//!
//! Run (after `cargo build --release -p iom-cli -p iom-tests --bins`), as root:
//! `target/release/bench-nat [punch] [throughput]` (no argument: both). The relay's memory with
//! 1,000 reservations is measured by `target/release/relay-bench`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use iom_tests::harness::{random_file, wait_until};
use iom_tests::natlab::{self, LabNode, NAT_A_IP, NAT_B_IP, NatKind};
use iom_tests::natlab_mesh::{Allow, Mesh, direct_socket, paired};

mod bench_common;
use bench_common::{param, percentile, print_machine, use_release_bin, wants};

/// The nodes' log filter: the event loop's debug lines carry the connection events timed here.
const LOG: &str = "info,iom_node::net::event_loop=debug";

/// Seconds since midnight of a log line's RFC 3339 timestamp (`2026-11-21T13:47:24.191453Z`),
/// after stripping terminal colour codes.
fn log_time(line: &str) -> Option<f64> {
    let clean = strip_ansi(line);
    let ts = clean.split_whitespace().next()?;
    let time = ts.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// In `log` (a run's part of B's log): seconds from the first relayed connection to `peer` to
/// the first direct connection to it.
fn relayed_to_direct(log: &str, peer: &str) -> Option<f64> {
    let mut relayed_at = None;
    for line in log.lines() {
        let clean = strip_ansi(line);
        if !clean.contains(peer) {
            continue;
        }
        if relayed_at.is_none()
            && clean.contains("connection established")
            && clean.contains("relayed=true")
        {
            relayed_at = log_time(line);
        } else if relayed_at.is_some() && clean.contains("direct connection to a relayed peer") {
            let direct_at = log_time(line)?;
            let mut d = direct_at - relayed_at?;
            if d < 0.0 {
                d += 86_400.0;
            }
            return Some(d);
        }
    }
    None
}

fn punch(runs: usize) -> Result<()> {
    println!("## punch: relayed -> direct (DCUtR), {runs} runs");
    let mut m = paired("bn-punch", NatKind::Masquerade, Allow::Nobody, Some(LOG))?;
    let mut times = Vec::new();
    for run in 0..runs {
        let before = m.b.log_text().len();
        m.b.kill();
        // A notices B is gone before B comes back.
        let b_id = m.b_id.clone();
        wait_until("A to lose B", Duration::from_secs(30), || {
            Ok(m.a.peer_link(&b_id)?.is_none())
        })?;
        m.b.start()?;
        let a_id = m.a_id.clone();
        wait_until(
            "B's direct connection to A",
            Duration::from_secs(60),
            || Ok(m.b.peer_link(&a_id)?.is_some_and(|(c, _)| c == "direct")),
        )?;
        let log = m.b.log_text();
        let part = log.get(before..).unwrap_or_default();
        let Some(secs) = relayed_to_direct(part, &m.a_id) else {
            bail!("run {run}: no relayed-then-direct pair in B's log:\n{part}");
        };
        let sock = direct_socket(&m.b, NAT_A_IP)?;
        println!(
            "run {run}: {:.1} ms (B's socket {})",
            secs * 1000.0,
            sock.unwrap_or_else(|| "?".into())
        );
        times.push(secs * 1000.0);
    }
    let mut sorted = times.clone();
    let p50 = percentile(&mut sorted, 50.0);
    let max = sorted.last().copied().unwrap_or(f64::NAN);
    let min = sorted.first().copied().unwrap_or(f64::NAN);
    println!("punch: p50 {p50:.1} ms, min {min:.1} ms, max {max:.1} ms over {runs} runs");
    Ok(())
}

/// Seconds from `blob add` on `from` to the blob listed on `to`.
fn blob_time(from: &LabNode, to: &LabNode, dir: &Path, mib: usize, seed: u64) -> Result<f64> {
    let src = dir.join(format!("bench-{seed}"));
    random_file(&src, (mib as u64) << 20, seed)?;
    let t0 = Instant::now();
    let added = from.json(&["blob", "add", src.to_str().unwrap_or_default()])?;
    let hash = added["hash"]
        .as_str()
        .ok_or_else(|| anyhow!("no hash"))?
        .to_string();
    wait_until("the blob to arrive", Duration::from_secs(600), || {
        Ok(to.blob_hashes()?.contains(&hash))
    })?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Median MB/s of `reps` transfers A to B and `reps` B to A (a new blob each time).
fn both_ways(m: &Mesh, mib: usize, reps: usize, seed: u64) -> Result<(f64, f64)> {
    let mb = (mib as f64) * 1.048_576;
    let (mut ab, mut ba) = (Vec::new(), Vec::new());
    for i in 0..reps as u64 {
        ab.push(mb / blob_time(&m.a, &m.b, m.tmp.path(), mib, seed + 2 * i)?);
        ba.push(mb / blob_time(&m.b, &m.a, m.tmp.path(), mib, seed + 2 * i + 1)?);
    }
    println!(
        "  runs A->B {:?} MB/s, B->A {:?} MB/s",
        ab.iter()
            .map(|x| (x * 10.0).round() / 10.0)
            .collect::<Vec<_>>(),
        ba.iter()
            .map(|x| (x * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    Ok((percentile(&mut ab, 50.0), percentile(&mut ba, 50.0)))
}

fn throughput(mib: usize, reps: usize) -> Result<()> {
    println!("## throughput: {mib} MiB blob each way, median of {reps}");
    let direct = {
        let m = paired("bn-direct", NatKind::Masquerade, Allow::Nobody, Some(LOG))?;
        wait_until(
            "the relayed connection to retire",
            Duration::from_secs(30),
            || {
                Ok(m.a.peer_link(&m.b_id)?.is_some_and(|(c, _)| c == "direct")
                    && m.relay.log().contains("circuit closed"))
            },
        )?;
        let (ab, ba) = both_ways(&m, mib, reps, 100)?;
        let sock = direct_socket(&m.a, NAT_B_IP)?;
        println!(
            "direct (A {}): A->B {ab:.1} MB/s, B->A {ba:.1} MB/s",
            sock.unwrap_or_else(|| "?".into())
        );
        (ab + ba) / 2.0
    };
    let relayed = {
        let m = paired(
            "bn-relayed",
            NatKind::PortRandomizing,
            Allow::APerson,
            Some(LOG),
        )?;
        let (ab, ba) = both_ways(&m, mib, reps, 200)?;
        let link = m.a.peer_link(&m.b_id)?;
        if link.as_ref().is_none_or(|(c, _)| c != "relayed") {
            bail!("expected a relayed link, got {link:?}");
        }
        println!("relayed: A->B {ab:.1} MB/s, B->A {ba:.1} MB/s");
        (ab + ba) / 2.0
    };
    println!(
        "throughput: direct {direct:.1} MB/s, relayed {relayed:.1} MB/s, relayed/direct {:.2}",
        relayed / direct
    );
    Ok(())
}

fn main() -> Result<()> {
    let bin = use_release_bin()?;
    natlab::check_prerequisites().map_err(|e| anyhow!("{e}"))?;
    print_machine(&bin);
    if wants("punch") {
        punch(param("RUNS", 10))?;
    }
    if wants("throughput") {
        throughput(param("BLOB_MIB", 16), param("REPS", 3).max(1))?;
    }
    Ok(())
}
