//! Sync between 3–4 real `iom` processes over loopback: live convergence, catching up after a
//! restart, multi-hop through a middle node, partitions that heal, large blobs that resume
//! with flat memory, and peers that send garbage.
//!
//! Slow ones (tens of seconds each): `partition_and_heal_with_restarts_converges_every_round`,
//! `large_blob_arrives_intact_resumes_and_memory_stays_flat`.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use iom_tests::harness::{
    Node, mesh, random_file, scenario, sha256_file, wait_converged, wait_mesh, wait_until,
};
use serde_json::Value;

/// A tiny deterministic PRNG (xorshift), so a failing round can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn new_doc(n: &Node, content: &str) -> Result<String> {
    n.json(&["doc", "new", "--content", content])?["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no id"))
}

fn refs(nodes: &[Node]) -> Vec<&Node> {
    nodes.iter().collect()
}

/// Every node edits the same documents at once; all end with identical heads and content.
#[test]
fn concurrent_edits_converge() {
    scenario(concurrent_edits_converge_body);
}

fn concurrent_edits_converge_body() -> Result<()> {
    let nodes = mesh(&["a", "b", "c", "d"])?;
    let docs = vec![
        new_doc(&nodes[0], r#"{"title":"shared"}"#)?,
        new_doc(&nodes[1], r#"{"title":"second"}"#)?,
    ];
    wait_converged(&refs(&nodes), &docs, Duration::from_secs(20))?;
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let docs = &docs;
                s.spawn(move || -> Result<()> {
                    for k in 0..8 {
                        let doc = &docs[k % 2];
                        n.cli(&[
                            "doc",
                            "put",
                            doc,
                            &format!("by_{}.n{k}", n.name),
                            &k.to_string(),
                        ])?;
                        // Everyone also fights over the same key.
                        n.cli(&["doc", "put", doc, "winner", &format!("\"{}-{i}\"", n.name)])?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow!("writer panicked"))??;
        }
        Ok(())
    })?;
    wait_converged(&refs(&nodes), &docs, Duration::from_secs(30))?;
    eprintln!(
        "converged {} ms after the last write started",
        t0.elapsed().as_millis()
    );
    let (_, content) = nodes[2]
        .doc_view(&docs[0])?
        .ok_or_else(|| anyhow!("c lost the doc"))?;
    for n in &nodes {
        assert_eq!(
            content[format!("by_{}", n.name)]["n0"],
            Value::from(0),
            "{}'s edit is in: {content}",
            n.name
        );
    }
    // The status of a converged node shows no document behind for any peer.
    wait_until("sync progress to settle", Duration::from_secs(10), || {
        let st = nodes[0].status()?;
        let sync = st["sync"].as_array().cloned().unwrap_or_default();
        Ok(sync.len() == 3 && sync.iter().all(|p| p["docs_behind"] == 0))
    })?;
    for n in &nodes {
        n.assert_no_panic()?;
    }
    Ok(())
}

/// Edits made while a node was stopped (on the others, and on it right after it restarts)
/// converge.
#[test]
fn edits_while_stopped_converge_after_restart() {
    scenario(edits_while_stopped_converge_after_restart_body);
}

fn edits_while_stopped_converge_after_restart_body() -> Result<()> {
    let mut nodes = mesh(&["a", "b", "c"])?;
    let mut docs = vec![new_doc(&nodes[0], r#"{"v":0}"#)?];
    wait_converged(&refs(&nodes), &docs, Duration::from_secs(20))?;
    nodes[2].stop()?;
    for i in 0..5 {
        nodes[0].cli(&["doc", "put", &docs[0], &format!("a{i}"), "1"])?;
        nodes[1].cli(&["doc", "put", &docs[0], &format!("b{i}"), "2"])?;
    }
    docs.push(new_doc(&nodes[1], r#"{"made":"while c was down"}"#)?);
    nodes[2].start()?;
    // C edits at once, possibly before it has reconnected.
    nodes[2].cli(&["doc", "put", &docs[0], "c", "3"])?;
    docs.push(new_doc(&nodes[2], r#"{"made":"by c after restart"}"#)?);
    wait_converged(&refs(&nodes), &docs, Duration::from_secs(30))?;
    let (_, content) = nodes[0]
        .doc_view(&docs[0])?
        .ok_or_else(|| anyhow!("missing"))?;
    assert!(
        content["a4"] == 1 && content["b4"] == 2 && content["c"] == 3,
        "{content}"
    );
    Ok(())
}

/// A–B–C: A and C never connect (no address sharing), yet both directions converge.
#[test]
fn chain_converges_through_the_middle_node() {
    scenario(chain_converges_through_the_middle_node_body);
}

fn chain_converges_through_the_middle_node_body() -> Result<()> {
    let env = [("IOM_FAULT", "no-addr-sharing")];
    let mut a = Node::with_env("a", &env)?;
    let mut b = Node::with_env("b", &env)?;
    let mut c = Node::with_env("c", &env)?;
    for n in [&mut a, &mut b, &mut c] {
        n.start()?;
    }
    b.cli(&["join", &a.invite(true)?])?;
    c.cli(&["join", &b.invite(false)?])?;
    wait_mesh(&[&a, &b], Duration::from_secs(20))?;
    wait_mesh(&[&b, &c], Duration::from_secs(20))?;
    let (ida, idc) = (a.device_id()?, c.device_id()?);
    wait_until(
        "A and C to trust each other",
        Duration::from_secs(10),
        || Ok(a.trusts(&idc)? && c.trusts(&ida)?),
    )?;

    let from_a = new_doc(&a, r#"{"from":"a"}"#)?;
    let from_c = new_doc(&c, r#"{"from":"c"}"#)?;
    // C's document reaches A through B; then A edits it.
    wait_until("C's document to reach A", Duration::from_secs(20), || {
        Ok(a.doc_view(&from_c)?.is_some())
    })?;
    a.cli(&["doc", "put", &from_c, "a_was_here", "true"])?;
    let docs = vec![from_a.clone(), from_c.clone()];
    wait_converged(&[&a, &b, &c], &docs, Duration::from_secs(30))?;
    c.cli(&["doc", "put", &from_a, "c_was_here", "true"])?;
    wait_until(
        "C's edit to reach A through B",
        Duration::from_secs(20),
        || {
            Ok(a.doc_view(&from_a)?
                .is_some_and(|(_, v)| v["c_was_here"] == true))
        },
    )?;
    wait_converged(&[&a, &b, &c], &docs, Duration::from_secs(20))?;
    assert!(
        !a.connected_to(&idc)? && !c.connected_to(&ida)?,
        "A and C connected directly; the chain test proves nothing"
    );
    Ok(())
}

/// Five rounds: split the nodes in two, edit both sides while the other is down (with random
/// kills and restarts), heal, and check convergence every round.
#[test]
fn partition_and_heal_with_restarts_converges_every_round() {
    scenario(partition_and_heal_with_restarts_converges_every_round_body);
}

fn partition_and_heal_with_restarts_converges_every_round_body() -> Result<()> {
    let mut nodes = mesh(&["a", "b", "c", "d"])?;
    let mut docs = vec![new_doc(&nodes[0], r#"{"round":0}"#)?];
    wait_converged(&refs(&nodes), &docs, Duration::from_secs(20))?;
    let seed = std::env::var("IOM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    eprintln!("partition loop seed {seed} (set IOM_TEST_SEED to replay)");
    let mut rng = Rng(seed);
    for round in 1..=5 {
        let t0 = Instant::now();
        // Two non-empty sides.
        let mut side: Vec<bool> = (0..nodes.len()).map(|_| rng.below(2) == 0).collect();
        if side.iter().all(|s| *s) || side.iter().all(|s| !*s) {
            side[0] = !side[0];
        }
        for half in [true, false] {
            for (i, n) in nodes.iter_mut().enumerate() {
                if side[i] != half {
                    n.stop()?;
                } else if !n.is_running() {
                    n.start()?;
                }
            }
            let live: Vec<usize> = (0..nodes.len()).filter(|i| side[*i] == half).collect();
            for _ in 0..4 {
                let i = live[rng.below(live.len())];
                if rng.below(5) == 0 {
                    docs.push(new_doc(&nodes[i], &format!(r#"{{"round":{round}}}"#))?);
                } else {
                    let doc = docs[rng.below(docs.len())].clone();
                    let key = format!("r{round}_{}_{}", nodes[i].name, rng.below(1000));
                    nodes[i].cli(&["doc", "put", &doc, &key, &rng.below(100).to_string()])?;
                }
            }
            // Sometimes a live node crashes and comes back.
            if rng.below(2) == 0 {
                let i = live[rng.below(live.len())];
                nodes[i].kill();
                nodes[i].start()?;
            }
        }
        for n in nodes.iter_mut() {
            if !n.is_running() {
                n.start()?;
            }
        }
        wait_converged(&refs(&nodes), &docs, Duration::from_secs(40))
            .map_err(|e| anyhow!("round {round} (sides {side:?}): {e}"))?;
        // Nobody has a document the others lack.
        let first = nodes[0].doc_ids()?;
        for n in &nodes[1..] {
            assert_eq!(n.doc_ids()?, first, "{}'s document list differs", n.name);
        }
        eprintln!(
            "round {round}: sides {side:?}, {} docs, converged in {:.1} s",
            docs.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    for n in &nodes {
        n.assert_no_panic()?;
    }
    Ok(())
}

/// 100 MiB from A reaches B and C intact; C is killed mid-transfer and resumes where it
/// stopped; the receivers' peak RSS does not grow by anything like the blob's size.
#[test]
fn large_blob_arrives_intact_resumes_and_memory_stays_flat() {
    scenario(large_blob_arrives_intact_resumes_and_memory_stays_flat_body);
}

/// Waits until `node` has received at least `chunks` chunks of a blob transfer (polled over
/// the API, in-process, to be quick); returns `(chunks done, chunks total)` then.
fn transfer_under_way(node: &Node, chunks: u64) -> Result<(u64, u64)> {
    let api = node.api()?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut at = (0, 0);
    wait_until(
        &format!("{}'s transfer to get going", node.name),
        Duration::from_secs(60),
        || {
            let st = rt
                .block_on(api.get("/v1/status"))
                .map_err(|e| anyhow!("{e}"))?;
            if let Some(t) = st["blob_transfers"].as_array().and_then(|t| t.first()) {
                at = (
                    t["chunks_done"].as_u64().unwrap_or(0),
                    t["chunks_total"].as_u64().unwrap_or(0),
                );
                return Ok(at.1 > 0 && at.0 >= chunks);
            }
            if st["blobs"].as_u64().unwrap_or(0) > 0 {
                bail!(
                    "{} received the whole blob before it could be cut",
                    node.name
                );
            }
            Ok(false)
        },
    )?;
    Ok(at)
}

fn large_blob_arrives_intact_resumes_and_memory_stays_flat_body() -> Result<()> {
    const SIZE: u64 = 100 * 1024 * 1024;
    let t_setup = Instant::now();
    let mut nodes = mesh(&["a", "b", "c"])?;
    eprintln!("mesh up in {:.1} s", t_setup.elapsed().as_secs_f64());
    let src = nodes[0].dir.join("big.bin");
    random_file(&src, SIZE, 42)?;
    let hash = sha256_file(&src)?;
    eprintln!(
        "source file ready in {:.1} s",
        t_setup.elapsed().as_secs_f64()
    );
    let hwm_before: Vec<u64> = nodes
        .iter()
        .map(|n| n.proc_kib("VmHWM").unwrap_or(0))
        .collect();
    eprintln!("VmHWM before (KiB): {hwm_before:?}");
    let t0 = Instant::now();
    nodes[0].cli(&["blob", "add", src.to_str().unwrap_or_default()])?;
    eprintln!("added in {:.1} s", t0.elapsed().as_secs_f64());

    // C: wait until the transfer is under way, then kill it mid-transfer.
    let cut_at = transfer_under_way(&nodes[2], 20)?;
    // B's status shows the bytes it still expects from A.
    let ida = nodes[0].device_id()?;
    let st = nodes[1].status()?;
    let from_a = st["sync"]
        .as_array()
        .and_then(|s| s.iter().find(|p| p["device"] == ida.as_str()).cloned())
        .ok_or_else(|| anyhow!("B's status has no sync entry for A: {st}"))?;
    let b_has = nodes[1].blob_hashes()?.contains(&hash);
    assert!(
        b_has || from_a["bytes_pending"] == SIZE,
        "B's sync progress for A mid-transfer: {from_a}"
    );
    nodes[2].kill();
    eprintln!("killed C at chunk {}/{}", cut_at.0, cut_at.1);
    if cut_at.0 >= cut_at.1 {
        bail!("C finished before it could be cut: {cut_at:?}");
    }
    nodes[2].start()?;
    let hwm_c_restart = nodes[2].proc_kib("VmHWM").unwrap_or(0);

    for (i, n) in nodes.iter().enumerate().skip(1) {
        wait_until(
            &format!("{} to hold the blob", n.name),
            Duration::from_secs(90),
            || Ok(n.blob_hashes()?.contains(&hash)),
        )?;
        eprintln!(
            "{} has it after {:.1} s",
            n.name,
            t0.elapsed().as_secs_f64()
        );
        let hwm = n.proc_kib("VmHWM").unwrap_or(0);
        let base = if i == 2 { hwm_c_restart } else { hwm_before[i] };
        eprintln!("{}: VmHWM {base} -> {hwm} KiB", n.name);
        wait_until("bytes_pending to drop to 0", Duration::from_secs(5), || {
            let st = n.status()?;
            Ok(st["sync"]
                .as_array()
                .is_some_and(|s| s.iter().all(|p| p["bytes_pending"] == 0)))
        })?;
        assert!(
            hwm.saturating_sub(base) < SIZE / 1024 / 3,
            "{}'s peak RSS grew by {} KiB receiving a {} KiB blob",
            n.name,
            hwm.saturating_sub(base),
            SIZE / 1024
        );
    }
    // C resumed rather than starting over.
    let log = nodes[2].log_text();
    let resumed = log
        .lines()
        .find(|l| l.contains("resuming blob transfer"))
        .ok_or_else(|| anyhow!("C did not resume; log:\n{log}"))?;
    let from: u64 = resumed
        .split("from_chunk=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // The transfer record is durable before the first chunk; the chunks in the file are
    // verified again on resume. What matters is that the transfer did not start over.
    assert!(from > 0, "{resumed} (cut at {cut_at:?})");
    eprintln!("C resumed from chunk {from} (cut at {cut_at:?})");
    // The bytes are right, on the receiver that was cut.
    let out = nodes[2].dir.join("out.bin");
    nodes[2].cli(&["blob", "get", &hash, "-o", out.to_str().unwrap_or_default()])?;
    assert_eq!(sha256_file(&out)?, hash);
    std::fs::remove_file(&out)?;
    eprintln!("verified after {:.1} s", t_setup.elapsed().as_secs_f64());
    for n in &nodes {
        n.assert_no_panic()?;
    }
    Ok(())
}

/// The sender of a large blob goes away mid-transfer and comes back: the receiver, which keeps
/// running, picks the transfer up again by itself, from where it stopped.
#[test]
fn blob_transfer_resumes_when_the_sender_returns() {
    scenario(blob_transfer_resumes_when_the_sender_returns_body);
}

fn blob_transfer_resumes_when_the_sender_returns_body() -> Result<()> {
    const SIZE: u64 = 64 * 1024 * 1024;
    let mut nodes = mesh(&["a", "b"])?;
    let src = nodes[0].dir.join("big.bin");
    random_file(&src, SIZE, 7)?;
    let hash = sha256_file(&src)?;
    nodes[0].cli(&["blob", "add", src.to_str().unwrap_or_default()])?;
    let pid_b = nodes[1].pid();
    let cut_at = transfer_under_way(&nodes[1], 8)?;
    nodes[0].kill();
    eprintln!("killed the sender at chunk {}/{}", cut_at.0, cut_at.1);
    if nodes[1].blob_hashes()?.contains(&hash) {
        bail!("B finished before the sender could be cut: {cut_at:?}");
    }
    std::thread::sleep(Duration::from_secs(2)); // B notices and gives up on this attempt
    nodes[0].start()?;
    wait_until("B to hold the blob", Duration::from_secs(90), || {
        Ok(nodes[1].blob_hashes()?.contains(&hash))
    })?;
    assert_eq!(nodes[1].pid(), pid_b, "B was restarted");
    let log = nodes[1].log_text();
    let resumed = log
        .lines()
        .find(|l| l.contains("resuming blob transfer"))
        .ok_or_else(|| anyhow!("B did not resume; log:\n{log}"))?;
    assert!(!resumed.contains("from_chunk=0 "), "{resumed}");
    let out = nodes[1].dir.join("out.bin");
    nodes[1].cli(&["blob", "get", &hash, "-o", out.to_str().unwrap_or_default()])?;
    assert_eq!(sha256_file(&out)?, hash);
    for n in &nodes {
        n.assert_no_panic()?;
    }
    Ok(())
}

/// A device that joins a mesh with many documents receives them whole (snapshots, not the
/// Automerge sync rounds per document), and afterwards edits on either side travel live, also
/// after a restart (the state both sides recorded for the snapshot is right).
#[test]
fn a_new_device_receives_documents_whole_and_then_syncs_live() {
    scenario(a_new_device_receives_documents_whole_body);
}

fn a_new_device_receives_documents_whole_body() -> Result<()> {
    const DOCS: usize = 150;
    let mut a = Node::new("a")?;
    a.start()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let api = a.api()?;
    let mut ids = Vec::new();
    for i in 0..DOCS {
        let content = serde_json::json!({ "n": i, "title": format!("doc {i}"), "body": "x" });
        let r = rt.block_on(api.post("/v1/docs", &serde_json::json!({ "content": content })))?;
        ids.push(
            r["id"]
                .as_str()
                .ok_or_else(|| anyhow!("no id in {r}"))?
                .to_string(),
        );
    }
    let mut b = Node::new("b")?;
    b.start()?;
    b.cli(&["join", &a.invite(false)?])?;
    wait_until("B to hold A's documents", Duration::from_secs(60), || {
        let (ha, hb) = (a.doc_heads()?, b.doc_heads()?);
        Ok(ids
            .iter()
            .all(|id| ha.contains_key(id) && ha.get(id) == hb.get(id)))
    })?;
    let a_id = a.device_id()?;
    let sync = b.status()?["sync"].clone();
    let with_a = sync
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["device"] == a_id.as_str())
        .cloned()
        .ok_or_else(|| anyhow!("no sync session with A in B's status: {sync}"))?;
    let whole = with_a["snapshots_received"].as_u64().unwrap_or(0);
    let rounds = with_a["docs_received"].as_u64().unwrap_or(u64::MAX);
    assert!(
        whole >= DOCS as u64,
        "only {whole} documents arrived whole: {with_a}"
    );
    // Only the documents both had (memory, settings) went through Automerge sync rounds.
    assert!(
        rounds < 20,
        "{rounds} Automerge sync messages for a cold sync: {with_a}"
    );

    // Live both ways, on documents that arrived whole.
    a.cli(&["doc", "put", &ids[0], "from_a", "1"])?;
    b.cli(&["doc", "put", &ids[1], "from_b", "2"])?;
    wait_converged(&[&a, &b], &ids[..2], Duration::from_secs(20))?;
    assert_eq!(
        b.doc_view(&ids[0])?.map(|v| v.1["from_a"].clone()),
        Some(1.into())
    );
    assert_eq!(
        a.doc_view(&ids[1])?.map(|v| v.1["from_b"].clone()),
        Some(2.into())
    );

    // After a restart (the recorded sync state is what was persisted).
    b.stop()?;
    a.cli(&["doc", "put", &ids[2], "while_b_was_away", "3"])?;
    b.start()?;
    wait_converged(&[&a, &b], &ids[..3], Duration::from_secs(30))?;
    assert_eq!(
        b.doc_view(&ids[2])?
            .map(|v| v.1["while_b_was_away"].clone()),
        Some(3.into())
    );
    a.assert_no_panic()?;
    b.assert_no_panic()
}

/// A peer that sends a garbage sync message is disconnected; nothing is corrupted.
#[test]
fn garbage_sync_peer_is_disconnected_and_corrupts_nothing() {
    scenario(|| garbage_peer_is_disconnected("garbage-sync", "bad sync message"));
}

/// A peer that sends a "whole document" that is not one is disconnected; the document does
/// not appear, and nothing is corrupted.
#[test]
fn garbage_snapshot_peer_is_disconnected_and_corrupts_nothing() {
    scenario(|| garbage_peer_is_disconnected("garbage-snapshot", "bad snapshot of"));
}

fn garbage_peer_is_disconnected(fault: &str, reason: &str) -> Result<()> {
    let mut a = Node::new("a")?;
    a.start()?;
    let mut g = Node::new("g")?;
    g.start()?;
    let doc = new_doc(&a, r#"{"precious":"data"}"#)?;
    a.cli(&["doc", "put", &doc, "more", "1"])?;
    g.cli(&["join", &a.invite(false)?])?;
    wait_converged(
        &[&a, &g],
        std::slice::from_ref(&doc),
        Duration::from_secs(20),
    )?;
    let before = a.doc_view(&doc)?;
    let list_before = a.doc_ids()?;
    // From its restart on, G sends garbage on every session.
    g.env.push(("IOM_FAULT".into(), fault.into()));
    g.restart()?;
    wait_until(
        "A to disconnect G for garbage",
        Duration::from_secs(20),
        || Ok(a.log_text().contains("disconnecting misbehaving peer")),
    )?;
    let log = a.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("disconnecting misbehaving peer"))
        .unwrap_or_default();
    assert!(line.contains(reason), "{line}");
    assert_eq!(a.doc_view(&doc)?, before, "the document changed");
    assert_eq!(a.doc_ids()?, list_before, "the document list changed");
    a.cli(&["doc", "put", &doc, "still", "writable"])?;
    assert!(a.is_running());
    a.assert_no_panic()?;
    g.assert_no_panic()
}

/// A peer that serves blob chunks that don't match their hashes is disconnected; the blob
/// never becomes visible on the victim.
#[test]
fn corrupt_blob_peer_is_disconnected_and_blob_stays_invisible() {
    scenario(corrupt_blob_peer_is_disconnected_and_blob_stays_invisible_body);
}

fn corrupt_blob_peer_is_disconnected_and_blob_stays_invisible_body() -> Result<()> {
    let mut bad = Node::with_env("bad", &[("IOM_FAULT", "corrupt-blob-chunks")])?;
    bad.start()?;
    let mut v = Node::new("victim")?;
    v.start()?;
    v.cli(&["join", &bad.invite(false)?])?;
    wait_mesh(&[&bad, &v], Duration::from_secs(20))?;
    let small = bad.dir.join("small.bin");
    random_file(&small, 200_000, 5)?;
    let hash = bad.json(&["blob", "add", small.to_str().unwrap_or_default()])?["hash"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    wait_until(
        "the victim to reject the chunks",
        Duration::from_secs(20),
        || Ok(v.log_text().contains("peer sent bad blob data")),
    )?;
    let log = v.log_text();
    assert!(log.contains("does not match its hash"), "{log}");
    assert!(
        !v.blob_hashes()?.contains(&hash),
        "a corrupt blob is visible"
    );
    // Asking for it explicitly fails clearly and still stores nothing.
    let out = v.dir.join("x.bin");
    let (code, err) = v.fail(&["blob", "get", &hash, "-o", out.to_str().unwrap_or_default()])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&hash), "{err}");
    assert!(!v.blob_hashes()?.contains(&hash));
    assert!(!out.exists() || std::fs::metadata(&out)?.len() == 0);
    v.assert_no_panic()?;
    bad.assert_no_panic()
}
