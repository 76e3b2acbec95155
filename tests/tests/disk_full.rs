//! A full disk: the node's data dir on a small tmpfs (mounted by the test; needs root, as the
//! NAT lab does), filled by another program until it is below the node's reserve. Writes are
//! refused with a clear error and `iom status` says why, nothing acknowledged is lost, the node
//! keeps running, and writes resume by themselves once the space is freed.

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use iom_tests::harness::{Node, scenario, wait_until};
use iom_tests::tmpfs::{Tmpfs, fill};

#[test]
fn a_full_disk_refuses_writes_loses_nothing_and_recovers() {
    scenario(body);
}

fn body() -> Result<()> {
    let fs = Tmpfs::mount(160)?;
    let mut node = Node::new("full")?;
    node.dir = fs.dir.join("data");
    node.log = node.dir.join("node.log");
    std::fs::create_dir_all(&node.dir)?;
    std::fs::write(node.dir.join("config.toml"), "[storage]\nreserve_mb = 48\n")?;
    node.start()?;
    let mut kept = Vec::new();
    for i in 0..5 {
        let id = node.cli(&["doc", "new", "--content", &format!(r#"{{"n":{i}}}"#)])?;
        kept.push(id.trim().to_string());
    }
    let status = node.status()?;
    ensure!(status["disk"]["writable"] == true, "{}", status["disk"]);
    let documents = status["documents"].as_u64().unwrap_or_default();

    // Another program fills the disk to below the reserve.
    let filler = fs.dir.join("filler");
    fill(&filler, 24)?;
    wait_until(
        "the node to see the full disk",
        Duration::from_secs(10),
        || Ok(node.status()?["disk"]["writable"] == false),
    )?;
    let status = node.status()?;
    let why = status["disk"]["why"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        why.contains("below the reserve"),
        "status: {}",
        status["disk"]
    );

    let out = node.try_cli(&["doc", "new", "--content", r#"{"n":99}"#])?;
    ensure!(
        !out.status.success(),
        "a document was created on a full disk"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("below the reserve"), "{err}");
    ensure!(!err.contains("panicked"), "{err}");
    let edit = node.try_cli(&["doc", "put", &kept[0], "n", "100"])?;
    ensure!(
        !edit.status.success(),
        "a change was accepted on a full disk"
    );
    let big = node.dir.join("..").join("blob.bin");
    std::fs::write(&big, vec![5u8; 3 << 20]).ok();
    if big.exists() {
        let add = node.try_cli(&["blob", "add", &big.display().to_string()])?;
        ensure!(!add.status.success(), "a blob was stored on a full disk");
        std::fs::remove_file(&big)?;
    }
    ensure!(node.is_running(), "the node stopped");

    // Space is freed: writes resume by themselves.
    std::fs::remove_file(&filler)?;
    wait_until("writes to resume", Duration::from_secs(10), || {
        Ok(node.status()?["disk"]["writable"] == true)
    })?;
    let id = node.cli(&["doc", "new", "--content", r#"{"n":5}"#])?;
    kept.push(id.trim().to_string());

    // Every acknowledged write is there after a restart, and the failed edit is not.
    node.stop()?;
    node.start()?;
    for (i, id) in kept.iter().enumerate() {
        let (_, view) = node
            .doc_view(id)?
            .ok_or_else(|| anyhow!("document {id} lost"))?;
        ensure!(view["n"] == i, "document {id}: {view}");
    }
    ensure!(
        node.status()?["documents"] == documents + 1,
        "documents: {} (before the disk filled: {documents}, one added after)",
        node.status()?["documents"]
    );
    node.assert_no_panic()?;
    node.stop()?;
    Ok(())
}
