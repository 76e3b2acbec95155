//! A sync session between two nodes that hold many blobs (issue 15): both stores are filled
//! with the same `BLOBS` small blobs (default 300,000, written in-process through the store
//! into the stopped nodes' data dirs), then both `iom` processes start and the benchmark
//! prints the time until the session is up on both sides, the time until a document created
//! on A afterwards is on B, the bytes the session exchanged, and the RSS of both nodes (now
//! and peak). The same is measured first with no blobs, as the same-run reference.
//!
//! ```text
//! cargo build --release -p iom-cli -p iom-tests --bin bench-blobs-session
//! BLOBS=300000 target/release/bench-blobs-session
//! ```
//!
//! Uses `target/release/iom` (or `IOM_BIN`). With `BLOBS_DIR=DIR`, the filled pair is kept in
//! `DIR/a` and `DIR/b` and reused by the next run with the same `BLOBS` (filling 300,000 blobs
//! takes minutes); the reference pair is always fresh.

mod bench_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use iom_node::api::client::ApiClient;
use iom_node::store::Store;
use iom_tests::harness::{Node, join_mesh, mesh, wait_until};
use serde_json::{Value, json};

use bench_common::{ms, param, print_machine, runtime, use_release_bin};

/// What one start of the pair measured.
struct Round {
    session_up: Duration,
    doc_synced: Duration,
    bytes: (u64, u64),
    rss_kib: [(u64, u64); 2],
}

/// The session entries of a node's status.
fn sessions(rt: &tokio::runtime::Runtime, c: &ApiClient) -> Result<Vec<Value>> {
    Ok(rt.block_on(c.get("/v1/status"))?["sync"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Starts both (stopped) nodes and measures a round.
fn round(rt: &tokio::runtime::Runtime, a: &mut Node, b: &mut Node) -> Result<Round> {
    let t0 = Instant::now();
    a.start()?;
    b.start()?;
    let (ca, cb) = (ApiClient::new(&a.dir)?, ApiClient::new(&b.dir)?);
    wait_until("a sync session on both", Duration::from_secs(300), || {
        Ok(!sessions(rt, &ca)?.is_empty() && !sessions(rt, &cb)?.is_empty())
    })?;
    let session_up = t0.elapsed();
    let t1 = Instant::now();
    let id = rt.block_on(ca.post("/v1/docs", &json!({ "content": { "new": true } })))?["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no id"))?
        .to_string();
    let path = format!("/v1/docs/{id}?path=new");
    wait_until("the new document on B", Duration::from_secs(300), || {
        Ok(rt.block_on(cb.get(&path)).is_ok())
    })?;
    let doc_synced = t1.elapsed();
    // Let the set-up traffic finish before reading the totals.
    std::thread::sleep(Duration::from_secs(2));
    let s = sessions(rt, &ca)?;
    let total = |k: &str| s.iter().filter_map(|e| e[k].as_u64()).sum::<u64>();
    let bytes = (total("bytes_out"), total("bytes_in"));
    let rss = |n: &Node| {
        (
            n.proc_kib("VmRSS").unwrap_or(0),
            n.proc_kib("VmHWM").unwrap_or(0),
        )
    };
    let rss_kib = [rss(a), rss(b)];
    a.stop()?;
    b.stop()?;
    Ok(Round {
        session_up,
        doc_synced,
        bytes,
        rss_kib,
    })
}

fn print(label: &str, r: &Round) {
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "{label}: session up {:.0} ms, new document on B {:.0} ms, A sent {:.1} KiB / got {:.1} \
         KiB, RSS A {:.1} MiB (peak {:.1}), B {:.1} MiB (peak {:.1})",
        ms(r.session_up),
        ms(r.doc_synced),
        r.bytes.0 as f64 / 1024.0,
        r.bytes.1 as f64 / 1024.0,
        mib(r.rss_kib[0].0),
        mib(r.rss_kib[0].1),
        mib(r.rss_kib[1].0),
        mib(r.rss_kib[1].1),
    );
}

/// Blob `i`: about 100 bytes, unique.
fn blob(i: usize) -> Vec<u8> {
    format!("bench blob {i:08}: a small file as a phone or a notes app would store it, x")
        .into_bytes()
}

fn fill(rt: &tokio::runtime::Runtime, node: &Node, count: usize) -> Result<usize> {
    let store = Store::open(&node.dir.join("db"), 64 << 20)?;
    Ok(rt.block_on(store.add_small_blobs_unsynced((0..count).map(blob)))?)
}

/// The filled pair: kept in `dir` (and reused from there) if given, else `fresh` filled now.
fn filled_pair(
    rt: &tokio::runtime::Runtime,
    count: usize,
    dir: Option<&Path>,
    fresh: (Node, Node),
) -> Result<(Node, Node)> {
    let (mut a, mut b) = match dir {
        Some(dir) => {
            let marker = dir.join("filled");
            if let Ok(text) = std::fs::read_to_string(&marker) {
                if text.trim() != count.to_string() {
                    bail!("{} holds {} blobs, not {count}", dir.display(), text.trim());
                }
                println!(
                    "# reusing the pair filled with {count} blobs in {}",
                    dir.display()
                );
                return Ok((
                    Node::persistent("a", &dir.join("a"))?,
                    Node::persistent("b", &dir.join("b"))?,
                ));
            }
            // A run that stopped before filling: start over.
            if dir.exists() {
                std::fs::remove_dir_all(dir)?;
            }
            let nodes = vec![
                Node::persistent("a", &dir.join("a"))?,
                Node::persistent("b", &dir.join("b"))?,
            ];
            let mut nodes = join_mesh(nodes)?;
            let b = nodes.pop().ok_or_else(|| anyhow!("no node b"))?;
            let a = nodes.pop().ok_or_else(|| anyhow!("no node a"))?;
            (a, b)
        }
        None => fresh,
    };
    a.stop()?;
    b.stop()?;
    let t = Instant::now();
    let added = (fill(rt, &a, count)?, fill(rt, &b, count)?);
    println!(
        "# filled both stores with {count} blobs of ~100 bytes ({} + {} new) in {:.1} s",
        added.0,
        added.1,
        t.elapsed().as_secs_f64()
    );
    if let Some(dir) = dir {
        std::fs::write(dir.join("filled"), count.to_string())?;
    }
    Ok((a, b))
}

fn main() -> Result<()> {
    let bin = use_release_bin()?;
    print_machine(&bin);
    let count = param("BLOBS", 300_000);
    let keep = std::env::var_os("BLOBS_DIR").map(PathBuf::from);
    let rt = runtime()?;
    let mut nodes = mesh(&["a", "b"])?;
    let (mut a, mut b) = {
        let b = nodes.pop().ok_or_else(|| anyhow!("no node b"))?;
        let a = nodes.pop().ok_or_else(|| anyhow!("no node a"))?;
        (a, b)
    };
    a.stop()?;
    b.stop()?;
    let reference = round(&rt, &mut a, &mut b)?;
    print("0 blobs (reference)", &reference);

    let (mut a, mut b) = filled_pair(&rt, count, keep.as_deref(), (a, b))?;
    let loaded = round(&rt, &mut a, &mut b)?;
    print(&format!("{count} blobs on both"), &loaded);
    let again = round(&rt, &mut a, &mut b)?;
    print(&format!("{count} blobs, second start"), &again);
    println!(
        "=> with {count} blobs / without: session up {:.2}x, new document {:.2}x, RSS A {:.2}x",
        ms(loaded.session_up) / ms(reference.session_up),
        ms(loaded.doc_synced) / ms(reference.doc_synced).max(0.001),
        loaded.rss_kib[0].0 as f64 / reference.rss_kib[0].0.max(1) as f64,
    );
    Ok(())
}
