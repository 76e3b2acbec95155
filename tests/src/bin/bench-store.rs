//! Benchmarks of one node's store (issue 2), each printed beside a reference measured in the
//! same run:
//!
//! - `writes`: document writes per second through the node's API with durable acks
//!   (`WRITERS` concurrent writers, `WRITES` writes in all), beside raw in-process Automerge
//!   (`Document::put_json` + `save_incremental`, no disk) and beside the durable reference:
//!   the same in process, plus a sled insert of the chunk and a sled flush per write, by
//!   `WRITERS` threads at once;
//! - `blob`: `iom blob add` and `iom blob get` of a `BLOB_MIB` MiB file in MB/s, beside
//!   `sha256sum` of the same file;
//! - `startup`: start-up time (spawn until the API answers) and idle RSS with `DOCS` documents
//!   stored, median of `RESTARTS` restarts.
//!
//! Run (after `cargo build --release -p iom-cli -p iom-tests --bins`):
//! `target/release/bench-store [writes] [blob] [startup]` (no argument: all).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use iom_crdt::{DocKind, Document};
use iom_node::api::client::ApiClient;
use iom_tests::harness::{Node, iom_bin};
use serde_json::json;

mod bench_common;
use bench_common::*;

fn main() -> Result<()> {
    let bin = use_release_bin()?;
    print_machine(&bin);
    let rt = runtime()?;
    if wants("writes") {
        writes(&rt)?;
    }
    if wants("blob") {
        blob()?;
    }
    if wants("startup") {
        startup(&rt)?;
    }
    Ok(())
}

fn writes(rt: &tokio::runtime::Runtime) -> Result<()> {
    let writers = param("WRITERS", 8);
    let total = param("WRITES", 2000);
    let per = total / writers;
    let mut node = Node::new("store")?;
    node.start()?;
    let client = Arc::new(ApiClient::new(&node.dir)?);
    // One document per writer, created before the clock starts.
    let mut ids = Vec::new();
    for _ in 0..writers {
        let r = rt.block_on(client.post("/v1/docs", &json!({})))?;
        ids.push(
            r["id"]
                .as_str()
                .ok_or_else(|| anyhow!("no id"))?
                .to_string(),
        );
    }
    let t0 = Instant::now();
    let lat: Vec<f64> = rt.block_on(async {
        let mut tasks = Vec::new();
        for id in ids.clone() {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    let t = Instant::now();
                    client
                        .put(
                            &format!("/v1/docs/{id}"),
                            &json!({ "path": format!("k{}", i % 16), "value": i }),
                        )
                        .await?;
                    lat.push(ms(t.elapsed()));
                }
                Ok::<_, anyhow::Error>(lat)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let took = t0.elapsed();
    let done = lat.len();
    let node_rate = done as f64 / took.as_secs_f64();
    let mut lat = lat;
    let p50 = percentile(&mut lat, 50.0);
    let p99 = percentile(&mut lat, 99.0);
    // Check that the writes landed.
    for id in &ids {
        let v = rt.block_on(client.get(&format!("/v1/docs/{id}?path=k{}", (per - 1) % 16)))?;
        if v["content"] != json!(per - 1) {
            bail!("last write missing on {id}: {v}");
        }
    }
    node.stop()?;

    // Reference: the same writes in process, one document per writer, no disk.
    let actor = iom_crdt::actor_for(&[7; 32], [7; 8]);
    let mut docs: Vec<Document> = (0..writers)
        .map(|_| Document::new(DocKind::Generic, &actor, 1))
        .collect::<Result<_, _>>()?;
    for d in &mut docs {
        let _ = d.save();
    }
    let t0 = Instant::now();
    let mut bytes = 0usize;
    for i in 0..per {
        for d in &mut docs {
            d.put_json(
                &format!("k{}", i % 16),
                json!(i),
                &format!("set k{}", i % 16),
                2,
            )?;
            bytes += d.save_incremental().len();
        }
    }
    let raw_took = t0.elapsed();
    let raw_rate = (per * writers) as f64 / raw_took.as_secs_f64();
    println!(
        "writes: node {done} durable writes by {writers} concurrent writers in {:.0} ms = {node_rate:.0} writes/s (latency p50 {p50:.2} ms, p99 {p99:.2} ms)",
        ms(took)
    );
    println!(
        "writes: raw in-process Automerge put_json+save_incremental {} writes in {:.1} ms = {raw_rate:.0} writes/s ({bytes} bytes of chunks)",
        per * writers,
        ms(raw_took)
    );
    println!(
        "writes: ratio node/raw = {:.4} ({:.1}x slower)",
        node_rate / raw_rate,
        raw_rate / node_rate
    );
    let durable = durable_reference(writers, per, false)?;
    println!(
        "writes: durable reference, in-process Automerge + sled insert + sled flush per write, {writers} threads: {durable:.0} writes/s; ratio node/durable = {:.2} (target >= 0.5)",
        node_rate / durable
    );
    let atomic = durable_reference(writers, per, true)?;
    println!(
        "writes: the same with the chunk and a metadata record in one sled transaction over two trees (as the node keeps them): {atomic:.0} writes/s ({:.2} of the plain insert); ratio node/this = {:.2}",
        atomic / durable,
        node_rate / atomic
    );
    Ok(())
}

/// `writers` threads, each writing `per` changes to its own in-memory document, inserting the
/// incremental chunk into one shared sled database and flushing it before the next write.
/// With `transactional`, the chunk and a small metadata record go in one transaction over two
/// trees instead (sled 0.34 rolls its I/O buffer before and after a transaction's batch
/// manifest, so a flush then writes and syncs more than one buffer). Returns writes per second.
fn durable_reference(writers: usize, per: usize, transactional: bool) -> Result<f64> {
    use sled::Transactional;
    let dir = tempfile::tempdir()?;
    let db = sled::Config::new().path(dir.path()).open()?;
    let tree = db.open_tree("chunks")?;
    let metas = db.open_tree("metas")?;
    let actor = iom_crdt::actor_for(&[8; 32], [8; 8]);
    let start = Arc::new(std::sync::Barrier::new(writers + 1));
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (db, tree, metas, actor, start) = (
                db.clone(),
                tree.clone(),
                metas.clone(),
                actor.clone(),
                start.clone(),
            );
            std::thread::spawn(move || -> Result<()> {
                let mut d = Document::new(DocKind::Generic, &actor, 1)?;
                let _ = d.save();
                start.wait();
                for i in 0..per {
                    d.put_json(&format!("k{}", i % 16), json!(i), "set", 2)?;
                    let key = format!("{w:04}/{i:08}");
                    let chunk = d.save_incremental();
                    if transactional {
                        let meta = format!("{w:04}").into_bytes();
                        (&tree, &metas)
                            .transaction(|(t, m)| {
                                t.insert(key.as_bytes(), chunk.as_slice())?;
                                m.insert(meta.as_slice(), &i.to_le_bytes()[..])?;
                                Ok(())
                            })
                            .map_err(|e: sled::transaction::TransactionError| anyhow!("{e}"))?;
                    } else {
                        tree.insert(key.as_bytes(), chunk)?;
                    }
                    db.flush()?;
                }
                Ok(())
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    for t in threads {
        t.join()
            .map_err(|_| anyhow!("a reference writer panicked"))??;
    }
    let took = t0.elapsed();
    Ok((writers * per) as f64 / took.as_secs_f64())
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn blob() -> Result<()> {
    let mib = param("BLOB_MIB", 256);
    let bytes = (mib as u64) << 20;
    let mut node = Node::new("blob")?;
    node.start()?;
    let file = node.dir.join("input.bin");
    random_file(&file, mib)?;
    // Reference first and last, to see whether the page cache changed in between.
    let (sha_took, sha_out) = time_cmd(Command::new("sha256sum").arg(&file))?;
    let expected = sha_out
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("no sha256sum output"))?
        .to_string();
    let (add_took, add_out) = time_cmd(
        Command::new(iom_bin())
            .arg("--data-dir")
            .arg(&node.dir)
            .args(["--json", "blob", "add"])
            .arg(&file),
    )?;
    let added: serde_json::Value = serde_json::from_str(&add_out)?;
    let hash = added["hash"]
        .as_str()
        .ok_or_else(|| anyhow!("no hash: {add_out}"))?
        .to_string();
    if hash != expected {
        bail!("blob hash {hash} != sha256sum {expected}");
    }
    let out = node.dir.join("output.bin");
    let (get_took, _) = time_cmd(
        Command::new(iom_bin())
            .arg("--data-dir")
            .arg(&node.dir)
            .args(["blob", "get", &hash, "-o"])
            .arg(&out),
    )?;
    let (sha2_took, sha2_out) = time_cmd(Command::new("sha256sum").arg(&out))?;
    if !sha2_out.starts_with(&expected) {
        bail!("blob get wrote different bytes");
    }
    node.stop()?;
    let sha = mbps(bytes, sha_took);
    let sha2 = mbps(bytes, sha2_took);
    let add = mbps(bytes, add_took);
    let get = mbps(bytes, get_took);
    println!(
        "blob: sha256sum of {mib} MiB: {:.0} ms = {sha:.0} MB/s (again on the output: {sha2:.0} MB/s)",
        ms(sha_took)
    );
    println!(
        "blob: iom blob add {mib} MiB: {:.0} ms = {add:.0} MB/s, ratio to sha256sum {:.2}",
        ms(add_took),
        add / sha
    );
    println!(
        "blob: iom blob get {mib} MiB: {:.0} ms = {get:.0} MB/s, ratio to sha256sum {:.2}",
        ms(get_took),
        get / sha
    );
    Ok(())
}

fn startup(rt: &tokio::runtime::Runtime) -> Result<()> {
    let count = param("DOCS", 10_000);
    let restarts = param("RESTARTS", 5);
    let mut node = Node::new("startup")?;
    node.start()?;
    let t0 = Instant::now();
    create_docs(rt, &node.dir, count, 3, 8)?;
    println!(
        "startup: created {count} documents (4 changes each) through the API in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    node.stop()?;
    let mut times = Vec::new();
    let mut rss = Vec::new();
    for run in 0..restarts {
        let (proc_, took) = spawn_timed(rt, &node)?;
        let client = ApiClient::new(&node.dir)?;
        let docs = rt.block_on(client.get("/v1/status"))?["documents"]
            .as_u64()
            .unwrap_or(0);
        std::thread::sleep(Duration::from_secs(3));
        let kib = rss_kib(proc_.child.id())?;
        println!(
            "startup: run {run}: {docs} documents, start-up {:.1} ms, idle VmRSS {:.1} MiB",
            ms(took),
            kib as f64 / 1024.0
        );
        times.push(ms(took));
        rss.push(kib as f64 / 1024.0);
        proc_.stop()?;
    }
    println!(
        "startup: median start-up {:.1} ms (target < 500 ms), median idle RSS {:.1} MiB (target < 50 MB)",
        percentile(&mut times, 50.0),
        percentile(&mut rss, 50.0)
    );
    Ok(())
}
