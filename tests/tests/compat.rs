//! Data dirs written by an older build open and sync with this one.
//!
//! `tests/fixtures/datadirs-19d953e.tar.gz` holds two data dirs made by the build of commit
//! 19d953e (before the services refactor): `fixture-a`, the first device of a mesh (person key,
//! four documents of its own: a generic one, memory, schedules and a schedule's conversation;
//! one 300,000-byte blob), and `fixture-b` ("laptop"), which joined it with an invite and
//! created a fifth document. Both were stopped with SIGINT after syncing, so they hold each
//! other's certificates, stored addresses and per-peer sync states. `fixture-a` listened on
//! 127.0.0.1:33745, the address `fixture-b` stored; a restarted A listens there again so B
//! redials it as it would after an upgrade.

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use iom_tests::harness::{Node, scenario, wait_converged, wait_mesh, wait_until};

const ARCHIVE: &str = "datadirs-19d953e.tar.gz";
const FIXTURE_A_PORT: u16 = 33745;
const GROCERIES: &str = "5e2b738a83d829c71d5f1071df4cda4e";
const LAPTOP_DOC: &str = "20acab61b9f81819d00b449bdbb80379";
const BLOB: &str = "e64a33bd23987c949961d7ab6a3114532a46d1c5a99a518fd47c5f16ae9a059e";

#[test]
fn a_data_dir_from_the_previous_build_opens_and_syncs() {
    scenario(body);
}

fn body() -> Result<()> {
    let mut a = Node::from_fixture("a", ARCHIVE, "fixture-a", FIXTURE_A_PORT)?;
    ensure!(
        !a.dir.join("FORMAT").exists(),
        "the fixture predates the format marker"
    );
    a.start()?;
    let status = a.status()?;
    // B redials A at the address it stored: A must really listen there.
    ensure!(
        status["listen"].as_array().is_some_and(|l| l
            .iter()
            .any(|a| a.as_str().is_some_and(|a| a.contains("/tcp/33745")))),
        "fixture A does not listen on its stored port 33745: {}",
        status["listen"]
    );
    // The unmarked dir is format 1 and was migrated to the current format.
    ensure!(
        status["data_format"] == 3,
        "data_format: {}",
        status["data_format"]
    );
    let marker: serde_json::Value = serde_json::from_slice(&std::fs::read(a.dir.join("FORMAT"))?)?;
    ensure!(marker["format"] == 3, "FORMAT: {marker}");
    ensure!(
        a.log_text().contains("data dir migrated"),
        "no migration logged"
    );
    ensure!(
        status["documents"] == 5,
        "documents: {}",
        status["documents"]
    );
    ensure!(status["blobs"] == 1, "blobs: {}", status["blobs"]);
    ensure!(status["holds_person_key"] == true);
    let (_, groceries) = a
        .doc_view(GROCERIES)?
        .ok_or_else(|| anyhow!("groceries document missing"))?;
    ensure!(
        groceries["items"] == serde_json::json!(["tea", "rice"]),
        "{groceries}"
    );
    ensure!(
        a.cli(&["memory", "show"])?
            .contains("I prefer short answers.")
    );
    ensure!(
        a.cli(&["schedule", "list"])?
            .contains("What is on my calendar today?")
    );
    let laptop = a
        .devices()?
        .into_iter()
        .find(|d| d["name"] == "laptop")
        .ok_or_else(|| anyhow!("the laptop's certificate is gone"))?;
    ensure!(laptop["revoked"] == false);

    // The old laptop redials A at its stored address and both are in sync.
    let mut b = Node::from_fixture("b", ARCHIVE, "fixture-b", 0)?;
    b.start()?;
    wait_mesh(&[&a, &b], Duration::from_secs(30))?;
    let fresh = a.cli(&[
        "doc",
        "new",
        "--content",
        r#"{"title":"after the upgrade"}"#,
    ])?;
    let fresh = fresh.trim().to_string();
    wait_converged(
        &[&a, &b],
        &[GROCERIES.into(), LAPTOP_DOC.into(), fresh.clone()],
        Duration::from_secs(30),
    )?;

    // A new device joins the upgraded mesh and receives everything, the blob included.
    let mut c = Node::new("c")?;
    c.start()?;
    c.cli(&["join", &a.invite(false)?])?;
    wait_mesh(&[&a, &b, &c], Duration::from_secs(30))?;
    wait_converged(
        &[&a, &b, &c],
        &[GROCERIES.into(), LAPTOP_DOC.into(), fresh],
        Duration::from_secs(30),
    )?;
    wait_until(
        "the blob to reach the new device",
        Duration::from_secs(30),
        || Ok(c.blob_hashes()?.iter().any(|h| h == BLOB)),
    )?;
    for n in [&a, &b, &c] {
        n.assert_no_panic()?;
    }
    Ok(())
}

/// A data dir written by a newer iom (a higher format in `FORMAT`) is refused by `node run`
/// with an error naming that version, and nothing in it changes.
#[test]
fn a_data_dir_from_a_newer_build_is_refused_untouched() {
    scenario(newer_body);
}

fn newer_body() -> Result<()> {
    let mut a = Node::from_fixture("a", ARCHIVE, "fixture-a", 0)?;
    let newer = br#"{"format": 99, "written_by": "9.0.0"}"#;
    std::fs::write(a.dir.join("FORMAT"), newer)?;
    let before = tree_listing(&a.dir)?;
    let err = a
        .start()
        .err()
        .ok_or_else(|| anyhow!("a newer data dir was opened"))?;
    let text = format!("{err:#}");
    ensure!(text.contains("data format 99"), "{text}");
    ensure!(text.contains("iom 9.0.0"), "{text}");
    ensure!(!text.contains("panicked"), "{text}");
    ensure!(
        std::fs::read(a.dir.join("FORMAT"))? == newer,
        "FORMAT was rewritten"
    );
    // `node.log` is the harness's own file; every other file is as it was.
    ensure!(tree_listing(&a.dir)? == before, "the data dir changed");
    // The CLI's own commands on the dir refuse it the same way.
    let out = a.try_cli(&["init"])?;
    ensure!(!out.status.success(), "init accepted a newer dir");
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("data format 99"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Every file under `dir` (but the harness's log) with its size and modification time.
fn tree_listing(dir: &std::path::Path) -> Result<Vec<(String, u64, std::time::SystemTime)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if entry.file_name() != "node.log" {
                out.push((
                    entry.path().display().to_string(),
                    meta.len(),
                    meta.modified()?,
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}
