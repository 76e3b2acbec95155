//! `relay-bench [N]`: the relay's memory while it holds N reservations (default 1,000).
//!
//! Starts the relay as a separate process on loopback (`iom relay run` if the `iom` next to
//! this binary has it, otherwise `relay-probe relay`, which runs the same library code), then
//! opens N relay clients in this process, each with its own key and connection, each holding
//! one reservation. Prints the relay's VmRSS (from `/proc/PID/status`) before and while the
//! reservations are held.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, identity, noise, relay, tcp, yamux};
use tokio::io::AsyncBufReadExt;

#[derive(NetworkBehaviour)]
struct Client {
    relay_client: relay::client::Behaviour,
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    line.split_whitespace()
        .nth(1)
        .context("bad VmRSS line")?
        .parse()
        .context("bad VmRSS value")
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("no exe dir")?.join(name))
}

/// One client: connect, reserve, then hold the reservation until the task is dropped.
async fn client(relay_addr: Multiaddr, done: tokio::sync::mpsc::Sender<Result<(), String>>) {
    let result: Result<libp2p::Swarm<Client>> = async {
        let mut swarm =
            libp2p::SwarmBuilder::with_existing_identity(identity::Keypair::generate_ed25519())
                .with_tokio()
                .with_tcp(
                    tcp::Config::default().nodelay(true),
                    noise::Config::new,
                    yamux::Config::default,
                )?
                .with_relay_client(noise::Config::new, yamux::Config::default)?
                .with_behaviour(|_, relay_client| Client { relay_client })?
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
                .build();
        swarm.listen_on(relay_addr.with(Protocol::P2pCircuit))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match tokio::time::timeout_at(deadline, swarm.next()).await {
                Ok(Some(SwarmEvent::Behaviour(ClientEvent::RelayClient(
                    relay::client::Event::ReservationReqAccepted { .. },
                )))) => return Ok(swarm),
                Ok(Some(SwarmEvent::ListenerClosed { reason, .. })) => {
                    bail!("reservation failed: {reason:?}")
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("swarm ended"),
                Err(_) => bail!("no reservation within 60 s"),
            }
        }
    }
    .await;
    match result {
        Ok(mut swarm) => {
            let _ = done.send(Ok(())).await;
            // Keep the connection (and reservation renewals) alive.
            while swarm.next().await.is_some() {}
        }
        Err(e) => {
            let _ = done.send(Err(e.to_string())).await;
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1000);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let data = tempfile::tempdir()?;
    let iom = sibling("iom")?;
    let has_relay = Command::new(&iom)
        .args(["relay", "run", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    let max = (n + 100).to_string();
    let flags = [
        "--listen",
        &listen,
        "--external-addr",
        &listen,
        "--no-rate-limits",
        "--max-reservations",
        &max,
    ];
    let mut cmd = if has_relay {
        let mut c = tokio::process::Command::new(&iom);
        c.arg("--json")
            .arg("--data-dir")
            .arg(data.path())
            .args(["relay", "run"]);
        c
    } else {
        eprintln!(
            "note: {} has no `relay run` yet; using `relay-probe relay`",
            iom.display()
        );
        let mut c = tokio::process::Command::new(sibling("relay-probe")?);
        c.arg("relay").arg(data.path());
        c
    };
    let mut relay = cmd
        .args(flags)
        .env("IOM_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let pid = relay.id().context("relay pid")?;
    let stdout = relay.stdout.take().context("relay stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("relay did not start")??
        .context("relay exited")?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    let peer_id = v["peer_id"].as_str().context("no peer_id")?;
    let relay_addr: Multiaddr = format!("{listen}/p2p/{peer_id}").parse()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = rss_kib(pid)?;
    println!("relay pid {pid}, RSS with no reservations: {baseline} KiB");

    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let mut tasks = Vec::with_capacity(n);
    let started = Instant::now();
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut next_report = n / 4;
    const BATCH: usize = 50;
    for batch_start in (0..n).step_by(BATCH) {
        let batch = BATCH.min(n - batch_start);
        for _ in 0..batch {
            tasks.push(tokio::spawn(client(relay_addr.clone(), tx.clone())));
        }
        for _ in 0..batch {
            match rx.recv().await {
                Some(Ok(())) => ok += 1,
                Some(Err(e)) => {
                    failed += 1;
                    if failed <= 5 {
                        eprintln!("client failed: {e}");
                    }
                }
                None => bail!("result channel closed"),
            }
        }
        if ok + failed >= next_report {
            println!(
                "{ok:>5} reservations held ({failed} failed), relay RSS {} KiB, {:.1} s",
                rss_kib(pid)?,
                started.elapsed().as_secs_f64()
            );
            next_report += n / 4;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = rss_kib(pid)?;
    let per = held.saturating_sub(baseline) as f64 / ok.max(1) as f64;
    println!(
        "RESULT reservations={ok} failed={failed} baseline_rss_kib={baseline} rss_kib={held} per_reservation_kib={per:.1}"
    );
    for t in tasks {
        t.abort();
    }
    let _ = relay.kill().await;
    Ok(())
}
