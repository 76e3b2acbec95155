//! Crash safety: the node is killed with SIGKILL in the middle of a write load, again and
//! again. Every write it acknowledged is there after the restart, the store always opens, and
//! an interrupted blob upload never shows up as a blob.
//!
//! Slow-ish: about 30 s (20+ kill/restart cycles).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use iom_tests::harness::{Node, random_file, scenario, sha256_file};
use serde_json::{Value, json};

const CYCLES: usize = 22;
const WRITERS: usize = 6;

#[derive(Default)]
struct Acked {
    /// `(doc, key, value)` writes acknowledged.
    puts: Vec<(String, String, u64)>,
    /// Documents whose creation was acknowledged.
    created: Vec<String>,
    /// Blobs whose upload was acknowledged.
    blobs: Vec<String>,
}

/// SIGKILL during concurrent document writes, 22 times; every acknowledged write survives.
#[test]
fn acknowledged_writes_survive_sigkill() {
    scenario(acknowledged_writes_survive_sigkill_body);
}

fn acknowledged_writes_survive_sigkill_body() -> Result<()> {
    let mut node = Node::new("crashy")?;
    node.start()?;
    let doc = node.json(&["doc", "new"])?["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no id"))?
        .to_string();
    let big = node.dir.join("big.bin");
    // Big enough that an upload is still running when the plug is pulled (uploads run at a few
    // hundred MB/s).
    const BIG: u64 = 96 * 1024 * 1024;
    random_file(&big, BIG, 99)?;
    let big_hash = sha256_file(&big)?;
    let rt = tokio::runtime::Runtime::new()?;
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut total_puts = 0usize;
    let mut kills_during_blob = 0usize;

    for cycle in 0..CYCLES {
        let api = Arc::new(node.api()?);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let (api, acked, stop, doc) = (api.clone(), acked.clone(), stop.clone(), doc.clone());
            tasks.push(rt.spawn(async move {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("c{cycle}_w{w}_{i}");
                    let r = if i % 5 == 4 {
                        // Every fifth write creates a document.
                        api.post("/v1/docs", &json!({ "content": { "key": key } }))
                            .await
                            .map(|v| {
                                if let Some(id) = v["id"].as_str() {
                                    acked
                                        .lock()
                                        .map(|mut a| a.created.push(id.to_string()))
                                        .ok();
                                }
                            })
                    } else {
                        api.put(
                            &format!("/v1/docs/{doc}"),
                            &json!({ "path": key, "value": i }),
                        )
                        .await
                        .map(|_| {
                            acked
                                .lock()
                                .map(|mut a| a.puts.push((doc.clone(), key.clone(), i)))
                                .ok();
                        })
                    };
                    if r.is_err() {
                        break; // the node died under us
                    }
                    i += 1;
                }
            }));
        }
        // Every third cycle an upload of the big blob is under way too.
        let blob_task = (cycle % 3 == 1).then(|| {
            let (api, acked, big) = (api.clone(), acked.clone(), big.clone());
            rt.spawn(async move {
                let Ok(file) = tokio::fs::File::open(&big).await else {
                    return false;
                };
                match api.post_file("/v1/blobs", file).await {
                    Ok(v) => {
                        if let Some(h) = v["hash"].as_str() {
                            acked.lock().map(|mut a| a.blobs.push(h.to_string())).ok();
                        }
                        true
                    }
                    Err(_) => false,
                }
            })
        });
        // Let the load run a varying while, then pull the plug.
        std::thread::sleep(Duration::from_millis(150 + (cycle as u64 * 37) % 300));
        node.kill();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            let _ = rt.block_on(t);
        }
        if let Some(t) = blob_task
            && !rt.block_on(t).unwrap_or(false)
        {
            kills_during_blob += 1;
        }

        // The store opens, and every acknowledged write is there.
        let t0 = Instant::now();
        node.start()
            .map_err(|e| anyhow!("cycle {cycle}: restart after SIGKILL failed: {e}"))?;
        let restart_ms = t0.elapsed().as_millis();
        let a = acked.lock().map_err(|_| anyhow!("poisoned"))?;
        let api = node.api()?;
        let get = |path: String| {
            rt.block_on(api.get(&path))
                .map_err(|e| anyhow!("{path}: {e}"))
        };
        let content = get(format!("/v1/docs/{doc}"))?["content"].clone();
        let mut missing = Vec::new();
        for (_, key, value) in &a.puts {
            if content.get(key) != Some(&Value::from(*value)) {
                missing.push(key.clone());
            }
        }
        if !missing.is_empty() {
            bail!(
                "cycle {cycle}: {} of {} acknowledged writes lost, e.g. {:?}",
                missing.len(),
                a.puts.len(),
                &missing[..missing.len().min(5)]
            );
        }
        let listed: BTreeSet<String> = get("/v1/docs".into())?["documents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["id"].as_str().map(str::to_string))
            .collect();
        for id in &a.created {
            if !listed.contains(id) {
                bail!("cycle {cycle}: acknowledged document {id} is gone");
            }
        }
        // Only whole, verified blobs are visible.
        let blobs = get("/v1/blobs".into())?["blobs"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for b in &blobs {
            if b["hash"] != big_hash.as_str() || b["len"] != BIG {
                bail!("cycle {cycle}: a partial or unknown blob is visible: {b}");
            }
        }
        for h in &a.blobs {
            if !blobs.iter().any(|b| b["hash"] == h.as_str()) {
                bail!("cycle {cycle}: acknowledged blob {h} is gone");
            }
        }
        eprintln!(
            "cycle {cycle}: {} writes acknowledged so far, restart {restart_ms} ms",
            a.puts.len() + a.created.len()
        );
        total_puts = a.puts.len();
    }
    assert!(
        total_puts > CYCLES * WRITERS,
        "the load was too light to mean anything: {total_puts} writes"
    );
    assert!(kills_during_blob > 0, "no blob upload was ever interrupted");
    // The blob, when it did arrive whole, reads back intact.
    if node.blob_hashes()?.contains(&big_hash) {
        let out = node.dir.join("out.bin");
        node.cli(&[
            "blob",
            "get",
            &big_hash,
            "-o",
            out.to_str().unwrap_or_default(),
        ])?;
        assert_eq!(sha256_file(&out)?, big_hash);
    }
    node.assert_no_panic()
}
