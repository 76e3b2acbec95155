//! Sync workloads between two `iom` nodes, shared by `bench-sync` and `bench-samod`: building
//! the bulk documents in process, the in-process references, a cold join, live propagation and
//! a catch-up after being away.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use iom_crdt::sync::{PeerDocState, generate, receive};
use iom_crdt::{DocKind, Document};
use iom_node::api::client::ApiClient;
use iom_tests::harness::{Node, sorted_heads, wait_until};
use serde_json::{Value, json};

use super::{bulk_content, doc_heads, ms};

/// The `n`-th bulk document built in process the way `POST /v1/docs` builds it: a generic
/// document plus one change per content field.
pub fn build_doc(actor: &[u8], i: usize, fields: usize) -> Result<Document> {
    let mut d = Document::new(DocKind::Generic, actor, 1_700_000_000)?;
    if let Value::Object(m) = bulk_content(i, fields) {
        for (k, v) in m {
            d.put_json(&k, v, "initial content", 1_700_000_000)?;
        }
    }
    Ok(d)
}

/// Runs Automerge's sync protocol between two replicas until neither has anything to say.
pub fn sync_pair(
    a: &mut Document,
    sa: &mut PeerDocState,
    b: &mut Document,
    sb: &mut PeerDocState,
) -> Result<()> {
    loop {
        let ab = generate(a, sa);
        if let Some(m) = &ab {
            receive(b, sb, m)?;
        }
        let ba = generate(b, sb);
        if let Some(m) = &ba {
            receive(a, sa, m)?;
        }
        if ab.is_none() && ba.is_none() {
            return Ok(());
        }
    }
}

/// In-process reference: syncs every document to an empty replica with `iom_crdt::sync`.
/// Returns (pure sync time, sync + save of the receiver's bytes).
pub fn in_process_sync(count: usize, fields: usize) -> Result<(Duration, Duration)> {
    let actor_a = iom_crdt::actor_for(&[1; 32], [1; 8]);
    let actor_b = iom_crdt::actor_for(&[2; 32], [2; 8]);
    let docs: Vec<Document> = (0..count)
        .map(|i| build_doc(&actor_a, i, fields))
        .collect::<Result<_>>()?;
    let run = |save: bool| -> Result<Duration> {
        let t0 = Instant::now();
        for a in &docs {
            let mut b = Document::empty(&actor_b)?;
            let (mut sa, mut sb) = (PeerDocState::new(), PeerDocState::new());
            let mut a_side = Document::load(&a.snapshot(), &actor_a)?;
            sync_pair(&mut a_side, &mut sa, &mut b, &mut sb)?;
            if b.heads() != a.heads() {
                bail!("in-process sync did not converge");
            }
            if save {
                std::hint::black_box(b.save_incremental());
            }
        }
        Ok(t0.elapsed())
    };
    // The snapshot/load of A's side is part of both runs (the node loads from disk too).
    let pure = run(false)?;
    let saved = run(true)?;
    Ok((pure, saved))
}

/// In-process references for the catch-up: replicas in sync with persisted states, one new
/// change per document on A, then each state is restored (a new session) and synced, and the
/// receiver saves its new bytes. Returns (with both replicas in memory, with both first
/// loaded from their saved bytes as a restarted device and an evicted document must be).
pub fn in_process_catchup(count: usize, fields: usize) -> Result<(Duration, Duration)> {
    let actor_a = iom_crdt::actor_for(&[1; 32], [1; 8]);
    let actor_b = iom_crdt::actor_for(&[2; 32], [2; 8]);
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let mut a = build_doc(&actor_a, i, fields)?;
        let mut b = Document::load(&a.snapshot(), &actor_b)?;
        let (mut sa, mut sb) = (PeerDocState::new(), PeerDocState::new());
        sync_pair(&mut a, &mut sa, &mut b, &mut sb)?;
        a.put_json(
            "f1",
            json!("changed during catch-up"),
            "edit",
            1_700_000_100,
        )?;
        pairs.push((a, sa.encode(), b, sb.encode()));
    }
    let saved: Vec<(Vec<u8>, Vec<u8>)> = pairs
        .iter()
        .map(|(a, _, b, _)| (a.snapshot(), b.snapshot()))
        .collect();
    let sync = |a: &mut Document, sa: &[u8], b: &mut Document, sb: &[u8]| -> Result<()> {
        let (mut sa, mut sb) = (PeerDocState::decode(sa)?, PeerDocState::decode(sb)?);
        sync_pair(a, &mut sa, b, &mut sb)?;
        std::hint::black_box(b.save_incremental());
        Ok(())
    };
    let t0 = Instant::now();
    for (a, sa, b, sb) in &mut pairs {
        sync(a, sa, b, sb)?;
    }
    let in_memory = t0.elapsed();
    let t0 = Instant::now();
    for ((_, sa, _, sb), (a_bytes, b_bytes)) in pairs.iter().zip(&saved) {
        let mut a = Document::load(a_bytes, &actor_a)?;
        let mut b = Document::load(b_bytes, &actor_b)?;
        sync(&mut a, sa, &mut b, sb)?;
    }
    Ok((in_memory, t0.elapsed()))
}

/// Waits until both nodes report a sync session with each other.
pub fn wait_session(rt: &tokio::runtime::Runtime, a: &Node, b: &Node) -> Result<()> {
    let (ca, cb) = (ApiClient::new(&a.dir)?, ApiClient::new(&b.dir)?);
    wait_until("sync session", Duration::from_secs(30), || {
        let sa = rt.block_on(ca.get("/v1/status"))?;
        let sb = rt.block_on(cb.get("/v1/status"))?;
        Ok(sa["sync"].as_array().is_some_and(|s| !s.is_empty())
            && sb["sync"].as_array().is_some_and(|s| !s.is_empty()))
    })
}

/// Live propagation of `changes` changes (after ten of warm-up) from `a` to `b`: each is a
/// durable `PUT` on A, timed until B's WebSocket (`/v1/ws` over its unix socket, opened
/// before the first change) reports the document at the heads the PUT returned. Returns (the
/// times until B has it, the PUTs alone), in ms.
pub fn live_changes(
    rt: &tokio::runtime::Runtime,
    a: &Node,
    b: &Node,
    changes: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (ca, cb) = (ApiClient::new(&a.dir)?, ApiClient::new(&b.dir)?);
    let id = rt.block_on(ca.post("/v1/docs", &json!({ "content": { "n": -1 } })))?["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no id"))?
        .to_string();
    let path = format!("/v1/docs/{id}?path=n");
    wait_until("the document on B", Duration::from_secs(30), || {
        Ok(rt.block_on(cb.get(&path)).is_ok())
    })?;
    let mut arrivals = rt.block_on(follow_changes(&b.dir, id.clone()))?;
    let mut total = Vec::new();
    let mut put = Vec::new();
    for i in 0..changes + 10 {
        let t0 = Instant::now();
        let reply = rt.block_on(ca.put(
            &format!("/v1/docs/{id}"),
            &json!({ "path": "n", "value": i }),
        ))?;
        let acked = t0.elapsed();
        let want = sorted_heads(&reply["heads"]);
        let reached = rt.block_on(async {
            loop {
                let next =
                    tokio::time::timeout_at((t0 + Duration::from_secs(10)).into(), arrivals.recv());
                match next.await {
                    Ok(Some((heads, at))) if heads == want => break Ok(at),
                    Ok(Some(_)) => continue, // an earlier change of the same document
                    Ok(None) => break Err(anyhow!("B's WebSocket ended")),
                    Err(_) => break Err(anyhow!("change {i} did not reach B in 10 s")),
                }
            }
        })?;
        // The first ten are warm-up.
        if i >= 10 {
            total.push(ms(reached.saturating_duration_since(t0)));
            put.push(ms(acked));
        }
    }
    Ok((total, put))
}

/// Follows `doc`'s changes on the node in `dir` through its WebSocket: each `doc_changed`
/// comes out as (its sorted heads, when it arrived).
async fn follow_changes(
    dir: &std::path::Path,
    doc: String,
) -> Result<tokio::sync::mpsc::Receiver<(Vec<String>, Instant)>> {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let stream = tokio::net::UnixStream::connect(dir.join("iom.sock")).await?;
    let (mut ws, _) = tokio_tungstenite::client_async("ws://localhost/v1/ws", stream).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            let at = Instant::now();
            let Message::Text(text) = msg else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                continue;
            };
            if v["type"] == "doc_changed"
                && v["doc"] == doc.as_str()
                && tx.send((sorted_heads(&v["heads"]), at)).await.is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}

/// A fresh `b` joins `a`'s mesh with `iom join`; waits until B's document list (ids and
/// heads) equals A's. Returns (time from the start of `iom join` to convergence, the join).
pub fn cold_join(rt: &tokio::runtime::Runtime, a: &Node, b: &Node) -> Result<(Duration, Duration)> {
    let (ca, cb) = (ApiClient::new(&a.dir)?, ApiClient::new(&b.dir)?);
    let want = doc_heads(rt, &ca)?;
    let code = a.invite(false)?;
    let t0 = Instant::now();
    b.cli(&["join", &code])?;
    let joined = t0.elapsed();
    loop {
        let n = rt.block_on(cb.get("/v1/status"))?["documents"]
            .as_u64()
            .unwrap_or(0) as usize;
        if n >= want.len() && doc_heads(rt, &cb)? == want {
            return Ok((t0.elapsed(), joined));
        }
        if t0.elapsed() > Duration::from_secs(3600) {
            bail!("cold sync did not converge in an hour");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sets field `f1` of each document in `ids` through A's API, 8 requests at a time.
pub fn change_docs(rt: &tokio::runtime::Runtime, ca: &ApiClient, ids: &[String]) -> Result<()> {
    put_all(rt, ca, ids, "f1", json!("changed during catch-up"))
}

/// `PUT`s `value` at `path` in every document of `ids`, eight at a time: one change, and one
/// stored incremental chunk, each.
pub fn put_all(
    rt: &tokio::runtime::Runtime,
    ca: &ApiClient,
    ids: &[String],
    path: &str,
    value: Value,
) -> Result<()> {
    let body = json!({ "path": path, "value": value });
    rt.block_on(async {
        for batch in ids.chunks(8) {
            let paths: Vec<String> = batch.iter().map(|id| format!("/v1/docs/{id}")).collect();
            let puts = paths.iter().map(|p| ca.put(p, &body));
            for r in futures::future::join_all(puts).await {
                r?;
            }
        }
        anyhow::Ok(())
    })
}

/// What B must reach to have caught up with A: A's document list and inventory root.
pub struct CatchUpTarget {
    heads: std::collections::BTreeMap<String, Vec<String>>,
    root: Value,
}

/// Reads A's [`CatchUpTarget`] (before B starts, outside any timed window).
pub fn catch_up_target(rt: &tokio::runtime::Runtime, ca: &ApiClient) -> Result<CatchUpTarget> {
    Ok(CatchUpTarget {
        heads: doc_heads(rt, ca)?,
        root: rt.block_on(ca.get("/v1/status"))?["inventory_root"].clone(),
    })
}

/// Waits until B's inventory root equals the target's (cheap to poll, every 5 ms), then
/// checks the full document list once. Returns the time since `since`.
pub fn wait_caught_up(
    rt: &tokio::runtime::Runtime,
    cb: &ApiClient,
    want: &CatchUpTarget,
    since: Instant,
) -> Result<Duration> {
    let trace = std::env::var_os("CATCHUP_TRACE").is_some();
    loop {
        let st = rt.block_on(cb.get("/v1/status"))?;
        if trace {
            eprintln!("{:>6.1} ms {}", ms(since.elapsed()), st["sync"]);
        }
        if st["inventory_root"] == want.root {
            break;
        }
        if since.elapsed() > Duration::from_secs(600) {
            bail!("B did not catch up within 600 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let caught_up = since.elapsed();
    if doc_heads(rt, cb)? != want.heads {
        bail!("B's inventory root matches A's but its documents do not");
    }
    Ok(caught_up)
}
