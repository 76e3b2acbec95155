//! Benchmark of pairing (issue 3): the time from `iom join` to trusted on loopback, p50 and
//! p99 over `RUNS` runs, each with a fresh joiner node.
//!
//! Two times per run, both from the moment `iom join CODE` is spawned:
//! - `join`: until the `iom join` command exits (the joiner holds its certificate);
//! - `trusted`: until the inviter's `GET /v1/devices` lists the joiner as trusted (polled
//!   every 1 ms over the unix socket while the join runs).
//!
//! Run (after `cargo build --release -p iom-cli -p iom-tests --bins`):
//! `target/release/bench-pairing`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use iom_node::api::client::ApiClient;
use iom_tests::harness::{Node, iom_bin};

mod bench_common;
use bench_common::*;

fn main() -> Result<()> {
    let bin = use_release_bin()?;
    print_machine(&bin);
    let rt = runtime()?;
    let runs = param("RUNS", 20);
    let mut inviter = Node::new("inviter")?;
    inviter.start()?;
    let client = ApiClient::new(&inviter.dir)?;
    let mut join_ms = Vec::new();
    let mut trusted_ms = Vec::new();
    for run in 0..runs {
        let mut joiner = Node::new(&format!("joiner{run}"))?;
        joiner.start()?;
        let device = joiner.device_id()?;
        let code = inviter.invite(false)?;
        let t0 = Instant::now();
        let mut child = Command::new(iom_bin())
            .arg("--data-dir")
            .arg(&joiner.dir)
            .args(["join", &code])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut trusted = None;
        let mut joined = None;
        while trusted.is_none() || joined.is_none() {
            if joined.is_none()
                && let Some(status) = child.try_wait()?
            {
                if !status.success() {
                    bail!("iom join failed in run {run} ({status})");
                }
                joined = Some(t0.elapsed());
            }
            if trusted.is_none() {
                let devices = rt.block_on(client.get("/v1/devices"))?;
                let listed = devices["devices"].as_array().is_some_and(|rows| {
                    rows.iter().any(|d| {
                        d["device"].as_str() == Some(device.as_str()) && d["revoked"] == false
                    })
                });
                if listed {
                    trusted = Some(t0.elapsed());
                }
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("run {run} did not finish in 30 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (j, t) = (
            ms(joined.unwrap_or_default()),
            ms(trusted.unwrap_or_default()),
        );
        println!(
            "pairing: run {run}: iom join {j:.1} ms, inviter lists joiner as trusted at {t:.1} ms"
        );
        join_ms.push(j);
        trusted_ms.push(t);
        joiner.stop()?;
    }
    println!(
        "pairing: {runs} runs: iom join wall time p50 {:.1} ms, p99 {:.1} ms (target p50 < 300 ms)",
        percentile(&mut join_ms, 50.0),
        percentile(&mut join_ms, 99.0)
    );
    println!(
        "pairing: {runs} runs: trusted on the inviter p50 {:.1} ms, p99 {:.1} ms",
        percentile(&mut trusted_ms, 50.0),
        percentile(&mut trusted_ms, 99.0)
    );
    inviter.stop()?;
    Ok(())
}
