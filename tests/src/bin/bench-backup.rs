//! Benchmark of backups (issue 18): `iom backup create`, `verify` and `restore` of a node
//! holding `DOCS` documents and `BLOB_MIB` MiB of blobs (in `BLOBS` files), in MB/s of the
//! archive's content, beside `tar` of the same data dir (create and extract) in the same run.
//!
//! `create` is measured twice: from the running node (the snapshot streamed over the socket,
//! encrypted by the CLI) and from the stopped node's data dir. `tar` runs on the stopped
//! node's data dir. Each `iom` run includes one scrypt passphrase derivation (about 1 s, by
//! age's own calibration).
//!
//! Run (after `cargo build --release -p iom-cli -p iom-tests --bins`):
//! `DOCS=10000 BLOB_MIB=1024 target/release/bench-backup`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use iom_tests::harness::{Node, iom_bin};

mod bench_common;
use bench_common::*;

fn du_bytes(path: &Path) -> Result<u64> {
    let out = Command::new("du").arg("-sb").arg(path).output()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("du of {}", path.display()))
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn iom(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(iom_bin());
    c.arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("IOM_DATA_DIR");
    c
}

fn main() -> Result<()> {
    let bin = use_release_bin()?;
    print_machine(&bin);
    let docs = param("DOCS", 10_000);
    let blob_mib = param("BLOB_MIB", 1024);
    let blobs = param("BLOBS", 4).max(1);
    let rt = runtime()?;
    let scratch = tempfile::Builder::new().prefix("bench-backup-").tempdir()?;
    let pass = scratch.path().join("pass");
    std::fs::write(&pass, "benchmark passphrase\n")?;
    let p = pass.to_str().context("path")?;

    let mut node = Node::new("bench-backup")?;
    node.start()?;
    let t = std::time::Instant::now();
    create_docs(&rt, &node.dir, docs, 4, 8)?;
    for i in 0..blobs {
        let f = scratch.path().join(format!("blob{i}.bin"));
        random_file(&f, blob_mib / blobs)?;
        // Different content per file: xorshift from the same seed, so mix in the index.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&f)
            .and_then(|mut h| std::io::Write::write_all(&mut h, &[i as u8; 1]))?;
        node.cli(&["blob", "add", f.to_str().context("path")?])?;
        std::fs::remove_file(&f)?;
    }
    println!(
        "# set-up: {docs} documents, {blobs} blobs of {} MiB in {:.1} s",
        blob_mib / blobs,
        t.elapsed().as_secs_f64()
    );

    let online = scratch.path().join("online.age");
    let (d_online, out) = time_cmd(&mut iom(
        &node.dir,
        &[
            "backup",
            "create",
            "--to",
            online.to_str().context("path")?,
            "--blobs",
            "--passphrase-file",
            p,
            "--json",
        ],
    ))?;
    let created: serde_json::Value = serde_json::from_str(&out)?;
    node.stop()?;
    let data_bytes = du_bytes(&node.dir)?;
    let archive_bytes = std::fs::metadata(&online)?.len();

    let offline = scratch.path().join("offline.age");
    let (d_offline, _) = time_cmd(&mut iom(
        &node.dir,
        &[
            "backup",
            "create",
            "--to",
            offline.to_str().context("path")?,
            "--blobs",
            "--passphrase-file",
            p,
        ],
    ))?;
    let (d_verify, _) = time_cmd(&mut iom(
        &node.dir,
        &[
            "backup",
            "verify",
            online.to_str().context("path")?,
            "--passphrase-file",
            p,
        ],
    ))?;
    let restored = scratch.path().join("restored");
    let (d_restore, _) = time_cmd(&mut iom(
        &restored,
        &[
            "backup",
            "restore",
            online.to_str().context("path")?,
            "--passphrase-file",
            p,
        ],
    ))?;

    let tar = scratch.path().join("data.tar");
    let (d_tar, _) = time_cmd(
        Command::new("tar")
            .arg("cf")
            .arg(&tar)
            .arg("-C")
            .arg(&node.dir)
            .arg("."),
    )?;
    let untarred = scratch.path().join("untarred");
    std::fs::create_dir(&untarred)?;
    let (d_untar, _) = time_cmd(
        Command::new("tar")
            .arg("xf")
            .arg(&tar)
            .arg("-C")
            .arg(&untarred),
    )?;

    println!(
        "# data dir {:.1} MB, archive {:.1} MB ({} entries: {} documents, {} blobs)",
        data_bytes as f64 / 1e6,
        archive_bytes as f64 / 1e6,
        created["entries"],
        created["documents"],
        created["blobs"],
    );
    println!("| step | time (s) | MB/s of the data dir |");
    println!("|---|---|---|");
    for (name, d) in [
        ("iom backup create (node running)", d_online),
        ("iom backup create (node stopped)", d_offline),
        ("iom backup verify", d_verify),
        ("iom backup restore", d_restore),
        ("tar cf (node stopped)", d_tar),
        ("tar xf", d_untar),
    ] {
        println!(
            "| {name} | {:.2} | {:.0} |",
            d.as_secs_f64(),
            mbps(data_bytes, d)
        );
    }
    Ok(())
}
