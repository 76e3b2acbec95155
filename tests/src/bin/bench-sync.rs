//! Benchmarks of sync between two nodes on loopback (issue 4), each beside a reference measured
//! in the same run:
//!
//! - `live`: propagation of one small change from A to B, p50 and p99 over `CHANGES` changes
//!   (a durable write on A through the API until B's WebSocket reports its heads; raw,
//!   nothing subtracted);
//! - `cold`: cold sync of `DOCS` documents × 10 changes to an empty peer that joins A's mesh,
//!   until B's document list (ids and heads) equals A's, beside in-process Automerge sync of the
//!   same documents (`iom_crdt::sync` between two in-memory replicas);
//!   then `reconnect`: B stops, one document changes on A, B starts: bytes (B's `status`
//!   `sync[].bytes_in + bytes_out`) and time until B has the change;
//!   then `catch-up`: B stops, `CATCHUP` documents (default 1,000) change on A, B starts: time
//!   from B's API up until its document list equals A's, beside in-process Automerge sync of
//!   one new change per document between replicas that restore their persisted sync states
//!   (once with both in memory, once loading both from their saved bytes first);
//! - `blob`: a `BLOB_MIB` MiB blob transfer from A to B in MB/s, beside a raw libp2p stream
//!   (TCP + noise + yamux, the node's transport) pushing the same number of bytes in-process.
//!
//! Run (after `cargo build --release -p iom-cli -p iom-tests --bins`):
//! `target/release/bench-sync [live] [cold] [blob] [raw]` (no argument: all). Knobs: `DOCS`,
//! `CHANGES`, `BLOB_MIB`, `LOADED_DOCS` (the nodes' `storage.loaded_docs`), `EDITS` (`cold`:
//! that many more changes per document on A before B joins, so A stores chains of chunks; the
//! in-process references do not have them), `IOM_TEST_LOG`
//! (the nodes' log filter, default `info,automerge=warn`), `CATCHUP_TRACE` (set: B's
//! `status.sync` at every poll of the catch-up, on stderr, to see how it progresses),
//! `CATCHUP_PAUSE` (seconds to wait, after saying so on stderr with A's pid, before B starts
//! for the catch-up: time to attach a profiler).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use iom_node::api::client::ApiClient;
use iom_tests::harness::{Node, iom_bin, mesh};
use serde_json::{Value, json};

mod bench_common;
use bench_common::iom_sync::*;
use bench_common::*;

fn main() -> Result<()> {
    let bin = use_release_bin()?;
    print_machine(&bin);
    let rt = runtime()?;
    let mut blob_rate = None;
    if wants("live") || wants("blob") {
        let nodes = mesh(&["a", "b"])?;
        wait_session(&rt, &nodes[0], &nodes[1])?;
        if wants("live") {
            live(&rt, &nodes[0], &nodes[1])?;
        }
        if wants("blob") {
            blob_rate = Some(blob(&rt, &nodes[0], &nodes[1])?);
        }
    }
    if wants("blob") || wants("raw") {
        let raw = raw_libp2p(&rt)?;
        if let Some(node) = blob_rate {
            println!(
                "blob: node transfer / raw libp2p stream = {:.2} (target >= 0.8)",
                node / raw
            );
        }
    }
    if wants("cold") {
        cold_and_reconnect(&rt)?;
    }
    Ok(())
}

fn live(rt: &tokio::runtime::Runtime, a: &Node, b: &Node) -> Result<()> {
    let changes = param("CHANGES", 200);
    let (mut total, mut put) = live_changes(rt, a, b, changes)?;
    let early = total.iter().zip(&put).filter(|(t, p)| t < p).count();
    println!(
        "live: {early} of {changes} changes reached B's WebSocket before the PUT's answer reached the client"
    );
    println!(
        "live: {changes} changes A→B: propagation (PUT on A until B's WebSocket reports its heads) p50 {:.2} ms, p99 {:.2} ms (target p50 < 5 ms)",
        percentile(&mut total, 50.0),
        percentile(&mut total, 99.0)
    );
    println!(
        "live: reference, the durable PUT on A alone: p50 {:.2} ms, p99 {:.2} ms",
        percentile(&mut put, 50.0),
        percentile(&mut put, 99.0)
    );
    Ok(())
}

/// Returns the transfer rate in MB/s.
fn blob(rt: &tokio::runtime::Runtime, a: &Node, b: &Node) -> Result<f64> {
    let mib = param("BLOB_MIB", 1024);
    let bytes = (mib as u64) << 20;
    let file = a.dir.join("big.bin");
    random_file(&file, mib)?;
    let (add_took, out) = time_cmd(
        Command::new(iom_bin())
            .arg("--data-dir")
            .arg(&a.dir)
            .args(["--json", "blob", "add"])
            .arg(&file),
    )?;
    let t_added = Instant::now();
    let cpu = |n: &Node| cpu_time(Some(n.pid().context("a node is not running")?));
    let (cpu_a, cpu_b) = (cpu(a)?, cpu(b)?);
    let hash = serde_json::from_str::<Value>(&out)?["hash"]
        .as_str()
        .ok_or_else(|| anyhow!("no hash: {out}"))?
        .to_string();
    // B fetches announced large blobs in the background; wait until it is stored there.
    let cb = ApiClient::new(&b.dir)?;
    let mut first_progress = None;
    loop {
        let list = rt.block_on(cb.get("/v1/blobs"))?;
        if list["blobs"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["hash"].as_str() == Some(hash.as_str())))
        {
            break;
        }
        if first_progress.is_none() {
            let st = rt.block_on(cb.get("/v1/status"))?;
            if st["blob_transfers"]
                .as_array()
                .is_some_and(|t| !t.is_empty())
            {
                first_progress = Some(t_added.elapsed());
            }
        }
        if t_added.elapsed() > Duration::from_secs(600) {
            bail!("blob did not arrive on B in 600 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = t_added.elapsed();
    let (cpu_a, cpu_b) = (cpu(a)? - cpu_a, cpu(b)? - cpu_b);
    // Only now: deleting a 1 GiB file takes the disk a while, and the transfer runs meanwhile.
    std::fs::remove_file(&file)?;
    let rate = bytes as f64 / 1e6 / took.as_secs_f64();
    println!(
        "blob: iom blob add {mib} MiB on A: {:.0} ms ({:.0} MB/s)",
        ms(add_took),
        bytes as f64 / 1e6 / add_took.as_secs_f64()
    );
    println!(
        "blob: A→B transfer of {mib} MiB (add finished on A until B lists it): {:.0} ms = {rate:.0} MB/s (B showed progress after {:.0} ms)",
        ms(took),
        ms(first_progress.unwrap_or_default())
    );
    println!(
        "blob: CPU during the transfer: A (sender) {:.2} s, B (receiver) {:.2} s, together {:.2} s",
        cpu_a.as_secs_f64(),
        cpu_b.as_secs_f64(),
        (cpu_a + cpu_b).as_secs_f64()
    );
    Ok(rate)
}

/// Two in-process libp2p swarms on loopback with the node's transport (TCP + noise + yamux,
/// default configs, nodelay) and `libp2p-stream`; pushes `BLOB_MIB` MiB over one stream.
/// Returns the rate in MB/s.
fn raw_libp2p(rt: &tokio::runtime::Runtime) -> Result<f64> {
    use libp2p::swarm::SwarmEvent;
    use libp2p::{Multiaddr, StreamProtocol, noise, tcp, yamux};
    let mib = param("BLOB_MIB", 1024);
    let total = (mib as u64) << 20;
    let proto = StreamProtocol::new("/iom-bench/raw/1");
    let cpu_before = cpu_time(None)?;
    let (took, got) = rt.block_on(async move {
        let build = || -> Result<libp2p::Swarm<libp2p_stream::Behaviour>> {
            Ok(libp2p::SwarmBuilder::with_new_identity()
                .with_tokio()
                .with_tcp(
                    tcp::Config::default().nodelay(true),
                    noise::Config::new,
                    yamux::Config::default,
                )?
                .with_behaviour(|_| libp2p_stream::Behaviour::new())?
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
                .build())
        };
        let mut sink = build()?;
        let mut source = build()?;
        let sink_id = *sink.local_peer_id();
        sink.listen_on("/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>()?)?;
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = sink.select_next_some().await {
                break address;
            }
        };
        let mut incoming = sink
            .behaviour()
            .new_control()
            .accept(proto.clone())
            .map_err(|e| anyhow!("{e}"))?;
        let mut control = source.behaviour().new_control();
        source.dial(addr.with(libp2p::multiaddr::Protocol::P2p(sink_id)))?;
        let drive_sink = tokio::spawn(async move {
            loop {
                sink.select_next_some().await;
            }
        });
        let drive_source = tokio::spawn(async move {
            loop {
                source.select_next_some().await;
            }
        });
        let reader = tokio::spawn(async move {
            let (_, mut stream) = incoming.next().await.ok_or_else(|| anyhow!("no stream"))?;
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            Ok::<_, anyhow::Error>((got, Instant::now()))
        });
        let mut stream = control
            .open_stream(sink_id, proto)
            .await
            .map_err(|e| anyhow!("open stream: {e}"))?;
        let chunk = vec![0x5au8; 256 * 1024];
        let t0 = Instant::now();
        let mut sent = 0u64;
        while sent < total {
            stream.write_all(&chunk).await?;
            sent += chunk.len() as u64;
        }
        stream.close().await?;
        let (got, end) = reader.await??;
        drive_sink.abort();
        drive_source.abort();
        Ok::<_, anyhow::Error>((end - t0, got))
    })?;
    if got != total {
        bail!("raw stream delivered {got} of {total} bytes");
    }
    let cpu = cpu_time(None)? - cpu_before;
    let rate = total as f64 / 1e6 / took.as_secs_f64();
    println!(
        "raw: libp2p stream (TCP+noise+yamux, loopback, in-process) push of {mib} MiB: {:.0} ms = {rate:.0} MB/s; CPU of both ends {:.2} s",
        ms(took),
        cpu.as_secs_f64()
    );
    Ok(rate)
}

fn cold_and_reconnect(rt: &tokio::runtime::Runtime) -> Result<()> {
    let count = param("DOCS", 10_000);
    let fields = 9; // 1 + 9 = 10 changes per document
    let mut a = Node::new("cold-a")?;
    configure(&a)?;
    a.start()?;
    let t0 = Instant::now();
    let ids = create_docs(rt, &a.dir, count, fields, 8)?;
    println!(
        "cold: created {count} documents × 10 changes on A through the API in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let ca = ApiClient::new(&a.dir)?;
    let edits = param("EDITS", 0);
    if edits > 0 {
        let t0 = Instant::now();
        for e in 0..edits {
            put_all(rt, &ca, &ids, &format!("e{e}"), json!(e))?;
        }
        println!(
            "cold: EDITS={edits}: each document got {edits} more changes through the API, stored as as many incremental chunks, in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    // The reference runs before and after the node measurement (the machine is shared).
    let before = in_process_sync(count, fields)?;

    let mut b = Node::new("cold-b")?;
    configure(&b)?;
    b.start()?;
    let cb = ApiClient::new(&b.dir)?;
    let (cold, joined) = cold_join(rt, &a, &b)?;
    let after = in_process_sync(count, fields)?;
    let pure = before.0.min(after.0);
    let saved = before.1.min(after.1);
    println!(
        "cold: {count} documents × 10 changes to an empty peer: converged {:.0} ms after `iom join` started (join itself {:.0} ms)",
        ms(cold),
        ms(joined)
    );
    println!(
        "cold: reference in-process iom_crdt::sync of the same documents: {:.0} ms before, {:.0} ms after the node run (with the receiver's save_incremental: {:.0} / {:.0} ms); the faster is used",
        ms(before.0),
        ms(after.0),
        ms(before.1),
        ms(after.1)
    );
    println!(
        "cold: ratio node/in-process = {:.1}x (target <= 2x); against sync+save {:.1}x",
        cold.as_secs_f64() / pure.as_secs_f64(),
        cold.as_secs_f64() / saved.as_secs_f64()
    );

    // Reconnect: everything is in sync; B stops, one document changes on A, B starts.
    std::thread::sleep(Duration::from_secs(3));
    b.stop()?;
    std::thread::sleep(Duration::from_secs(1));
    let changed = ids.first().context("no documents")?;
    rt.block_on(ca.put(
        &format!("/v1/docs/{changed}"),
        &json!({ "path": "f0", "value": "changed while B was away" }),
    ))?;
    let (proc_b, up) = spawn_timed(rt, &b)?;
    let t_up = Instant::now();
    let path = format!("/v1/docs/{changed}?path=f0");
    let mut session_up = None;
    loop {
        if session_up.is_none() {
            let st = rt.block_on(cb.get("/v1/status"))?;
            if st["sync"].as_array().is_some_and(|s| !s.is_empty()) {
                session_up = Some(t_up.elapsed());
            }
        }
        if let Ok(v) = rt.block_on(cb.get(&path))
            && v["content"] == json!("changed while B was away")
        {
            break;
        }
        if t_up.elapsed() > Duration::from_secs(60) {
            bail!("the change did not reach B within 60 s of its restart");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let converged = t_up.elapsed();
    let bytes_at = sync_bytes(rt, &cb)?;
    std::thread::sleep(Duration::from_secs(2));
    let bytes_later = sync_bytes(rt, &cb)?;
    let session_up = session_up.unwrap_or(converged);
    println!(
        "reconnect: B start-up {:.0} ms; from B's API up: sync session seen at {:.0} ms, change on B at {:.0} ms, i.e. {:.0} ms after the session was seen (target < 50 ms)",
        ms(up),
        ms(session_up),
        ms(converged),
        ms(converged.saturating_sub(session_up))
    );
    println!(
        "reconnect: bytes on B's session (in + out): {} at convergence, {} two seconds later (target < 65536)",
        bytes_at, bytes_later
    );

    // Catch-up: B was away while A changed many documents.
    proc_b.stop()?;
    let n = param("CATCHUP", 1000).min(ids.len());
    change_docs(rt, &ca, &ids[..n])?;
    let want = catch_up_target(rt, &ca)?;
    let pause = param("CATCHUP_PAUSE", 0);
    if pause > 0 {
        eprintln!(
            "catch-up: pausing {pause} s before B starts; A's pid {}",
            a.pid().context("A is not running")?
        );
        std::thread::sleep(Duration::from_secs(pause as u64));
    }
    let (proc_b, _) = spawn_timed(rt, &b)?;
    let (pid_a, pid_b) = (a.pid().context("A is not running")?, proc_b.child.id());
    let cpu_before = (cpu_time(Some(pid_a))?, cpu_time(Some(pid_b))?);
    let (loaded_a, loaded_b) = (docs_loaded(rt, &ca)?, docs_loaded(rt, &cb)?);
    let caught_up = wait_caught_up(rt, &cb, &want, Instant::now())?;
    let (cpu_a, cpu_b) = (
        cpu_time(Some(pid_a))? - cpu_before.0,
        cpu_time(Some(pid_b))? - cpu_before.1,
    );
    let (reference, loading) = in_process_catchup(n, fields)?;
    println!(
        "catch-up: {n} documents changed while B was away: B equal to A {:.0} ms after its API was up; reference in-process sync of one change per document from persisted states: {:.0} ms; ratio {:.1}x; the same loading both replicas from their saved bytes first: {:.0} ms; ratio {:.1}x",
        ms(caught_up),
        ms(reference),
        caught_up.as_secs_f64() / reference.as_secs_f64(),
        ms(loading),
        caught_up.as_secs_f64() / loading.as_secs_f64()
    );
    println!(
        "catch-up: CPU from B's API up until caught up: A {:.0} ms, B {:.0} ms (10 ms ticks); documents loaded from the store meanwhile: A {}, B {}",
        ms(cpu_a),
        ms(cpu_b),
        docs_loaded(rt, &ca)? - loaded_a,
        docs_loaded(rt, &cb)? - loaded_b
    );
    proc_b.stop()?;
    a.stop()?;
    Ok(())
}

/// With `LOADED_DOCS` set, writes `[storage] loaded_docs` (documents kept in memory, default
/// 128) to the node's `config.toml`, to see what the document cache costs.
fn configure(node: &Node) -> Result<()> {
    if let Ok(n) = std::env::var("LOADED_DOCS") {
        let n: usize = n.parse().context("LOADED_DOCS must be a number")?;
        std::fs::write(
            node.dir.join("config.toml"),
            format!("[storage]\nloaded_docs = {n}\n"),
        )?;
        println!("cold: {}: storage.loaded_docs = {n}", node.name);
    }
    Ok(())
}

fn sync_bytes(rt: &tokio::runtime::Runtime, c: &ApiClient) -> Result<u64> {
    let st = rt.block_on(c.get("/v1/status"))?;
    Ok(st["sync"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s["bytes_in"].as_u64().unwrap_or(0) + s["bytes_out"].as_u64().unwrap_or(0))
        .sum())
}
