//! Backups and losing a device, with real `iom` processes over loopback: the home server's
//! data dir destroyed while the laptop and a relay (on loopback, both nodes reserved on it)
//! keep running, and restored from its backup (as the same device, and as a new device with
//! the old one revoked everywhere), after which it reserves on the relay again; the recovery
//! kit moving the right to invite and revoke, a second admin device doing both without the
//! person key, bad archives refused without changing anything, and incremental and scheduled
//! backups. (Relayed sync itself, behind NATs, is the NAT tests' subject.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig};
use iom_tests::harness::{
    Node, free_port, random_file, runtime, scenario, sha256_file, wait_converged, wait_mesh,
    wait_until,
};
use iom_tests::natlab::LabRelay;
use serde_json::Value;

fn s(v: &Value, key: &str) -> Result<String> {
    v[key]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no {key} in {v}"))
}

fn new_doc(n: &Node, content: &str) -> Result<String> {
    s(&n.json(&["doc", "new", "--content", content])?, "id")
}

/// A directory for archives and passphrase files that outlives the nodes' data dirs.
fn scratch() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix("backups-").tempdir()?)
}

fn passphrase_file(dir: &Path, name: &str, pass: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, format!("{pass}\n"))?;
    Ok(p)
}

/// The status of request `rid` in `conv`, as `n` sees it.
fn request_status(n: &Node, conv: &str, rid: &str) -> Result<String> {
    let c = n.json(&["conversations", "show", conv])?;
    Ok(c["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["request_id"] == rid)
        .and_then(|m| m["status"].as_str())
        .unwrap_or("")
        .to_string())
}

fn wait_done(n: &Node, conv: &str, rid: &str) -> Result<()> {
    wait_until(
        &format!("request {rid} done on {}", n.name),
        Duration::from_secs(40),
        || Ok(request_status(n, conv, rid)? == "done"),
    )
}

/// The failing `iom` call's stderr, checked to be exit 1 and to contain `needle`.
fn fails_with(n: &Node, args: &[&str], needle: &str) -> Result<()> {
    let (code, err) = n.fail(args)?;
    if code != 1 || !err.contains(needle) {
        bail!(
            "`iom {}` gave exit {code}, wanted 1 with {needle:?}: {err}",
            args.join(" ")
        );
    }
    Ok(())
}

/// A node on a fresh (empty, not yet created) data dir that listens where `old` listened and
/// has its environment, so its peers find it where they knew it.
fn replacement_for(old: &Node, name: &str) -> Result<Node> {
    let mut n = Node::new(name)?;
    n.args.clone_from(&old.args);
    n.env.clone_from(&old.env);
    std::fs::remove_dir(&n.dir).context("the fresh data dir is empty")?;
    Ok(n)
}

/// Whether `n` holds a reservation on `relay`: its circuit address through the relay is among
/// its listen addresses, and the relay accepted a reservation from device `id`.
fn reserved_on(n: &Node, relay: &LabRelay, id: &str) -> Result<bool> {
    let circuit = n
        .listen_addrs()?
        .iter()
        .any(|a| a.contains("/p2p-circuit") && a.contains(&relay.peer_id));
    let accepted = relay
        .log()
        .lines()
        .any(|l| l.contains("reservation accepted") && l.contains(id));
    Ok(circuit && accepted)
}

fn wait_reserved(n: &Node, relay: &LabRelay, id: &str) -> Result<()> {
    wait_until(
        &format!("{} reserved on the relay", n.name),
        Duration::from_secs(30),
        || reserved_on(n, relay, id),
    )
}

/// The home server (mesh creator, agent, schedule) and a laptop, both reserved on a relay; a
/// backup of the home server; more work after it on both; the home server's data dir
/// destroyed while the laptop and the relay run. Returns the pieces the two restore tests
/// check.
struct Lost {
    _fake: FakeAnthropic,
    relay: LabRelay,
    _rt: tokio::runtime::Runtime,
    _scratch: tempfile::TempDir,
    home: Node,
    laptop: Node,
    home_id: String,
    archive: PathBuf,
    pass: PathBuf,
    docs: Vec<String>,
    blob: String,
    queued: (String, String),
    schedule: String,
    /// The schedule's last fired slot as the laptop saw it when home was lost (0: none).
    fired_before: i64,
}

fn last_fired(n: &Node, schedule: &str) -> Result<i64> {
    let list = n.json(&["schedule", "list"])?;
    Ok(list["schedules"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["id"] == schedule)
        .and_then(|s| s["last_fired_slot"].as_i64())
        .unwrap_or(0))
}

fn lose_the_home_server() -> Result<Lost> {
    let rt = runtime()?;
    let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
    let scratch = scratch()?;
    let mut relay = LabRelay::loopback(free_port()?, &scratch.path().join("relay"), &[])?;
    relay.start()?;
    let mut home = Node::with_env("home", &fake.node_env())?;
    let mut laptop = Node::new("laptop")?;
    for n in [&mut home, &mut laptop] {
        n.args.extend(["--relay".to_string(), relay.addr()]);
    }
    home.start()?;
    laptop.start()?;
    laptop.cli(&["join", &home.invite(false)?])?;
    wait_mesh(&[&home, &laptop], Duration::from_secs(20))?;
    let home_id = home.device_id()?;
    wait_reserved(&home, &relay, &home_id)?;
    wait_reserved(&laptop, &relay, &laptop.device_id()?)?;
    home.cli(&["agent", "assign", &home_id])?;
    let schedule = s(
        &laptop.json(&["schedule", "add", "* * * * *", "minute report"])?,
        "id",
    )?;
    let v = laptop.json(&["ask", "before the backup"])?;
    let _ = v;

    // Work that is in the backup.
    let mut docs = vec![new_doc(&home, r#"{"when":"before the backup, on home"}"#)?];
    docs.push(new_doc(
        &laptop,
        r#"{"when":"before the backup, on the laptop"}"#,
    )?);
    let file = scratch.path().join("photo.bin");
    random_file(&file, 3 << 20, 7)?;
    let blob = s(
        &home.json(&["blob", "add", file.to_str().context("path")?])?,
        "hash",
    )?;
    wait_converged(&[&home, &laptop], &docs, Duration::from_secs(20))?;

    let pass = passphrase_file(scratch.path(), "pass", "correct horse battery staple")?;
    let dir = scratch.path().join("home-backups");
    let created = home.json(&[
        "backup",
        "create",
        "--to",
        dir.to_str().context("path")?,
        "--blobs",
        "--passphrase-file",
        pass.to_str().context("path")?,
    ])?;
    assert_eq!(created["blobs"], 1, "{created}");
    assert_eq!(created["holds_person_key"], true, "{created}");
    let archive = PathBuf::from(s(&created, "archive")?);
    let verified = home.json(&[
        "backup",
        "verify",
        archive.to_str().context("path")?,
        "--passphrase-file",
        pass.to_str().context("path")?,
    ])?;
    assert_eq!(verified["ok"], true, "{verified}");

    // Work after the backup: acknowledged by the home server and synced to the laptop.
    docs.push(new_doc(&home, r#"{"when":"after the backup, on home"}"#)?);
    wait_converged(&[&home, &laptop], &docs, Duration::from_secs(20))?;

    // The disk dies: no clean shutdown, the data dir is gone.
    home.kill();
    std::fs::remove_dir_all(&home.dir)?;
    wait_until(
        "the laptop to see home gone",
        Duration::from_secs(15),
        || Ok(!laptop.connected_to(&home_id)?),
    )?;
    assert!(relay.is_running(), "the relay keeps running");
    let fired_before = last_fired(&laptop, &schedule)?;
    // The laptop keeps working while home is gone: a document and a queued request.
    docs.push(new_doc(&laptop, r#"{"when":"while home is gone"}"#)?);
    let q = laptop.ask_no_wait("while you were gone", &[])?;
    assert_eq!(q["queued"], true, "{q}");
    let queued = (s(&q, "conversation")?, s(&q, "request_id")?);
    Ok(Lost {
        _fake: fake,
        relay,
        _rt: rt,
        _scratch: scratch,
        home,
        laptop,
        home_id,
        archive,
        pass,
        docs,
        blob,
        queued,
        schedule,
        fired_before,
    })
}

/// Destroy the home server's data dir, restore it from its backup on a fresh data dir: it is
/// the same device, the laptop syncs with it both ways, the agent answers the request queued
/// while it was gone, its schedule fires, and nothing acknowledged is lost.
#[test]
fn home_server_restored_from_backup_continues_as_the_same_device() {
    scenario(|| {
        let lost = lose_the_home_server()?;
        let mut home = replacement_for(&lost.home, "home-restored")?;
        // The schedule's next slot is a minute away: move the restored node's clock forward so
        // the most recent missed slot fires now.
        home.env
            .push(("IOM_CLOCK_OFFSET_SECS".into(), "120".into()));
        let archive = lost.archive.to_str().context("path")?;
        let pass = lost.pass.to_str().context("path")?;
        let restored = home.json(&["backup", "restore", archive, "--passphrase-file", pass])?;
        assert_eq!(restored["device"], lost.home_id.as_str(), "{restored}");
        assert_eq!(restored["replaced"], Value::Null);
        home.start()?;
        assert_eq!(home.device_id()?, lost.home_id);
        assert_eq!(home.status()?["holds_person_key"], true);
        wait_mesh(&[&home, &lost.laptop], Duration::from_secs(30))?;
        // The restored server reserves on the relay again, as the same device; the laptop is
        // reserved too (its reservation may be renewed as it re-proves its certificates to the
        // relay when the restored server's trust changes reach it, so wait for it rather than
        // look once).
        wait_reserved(&home, &lost.relay, &lost.home_id)?;
        wait_reserved(&lost.laptop, &lost.relay, &lost.laptop.device_id()?)?;

        // Everything acknowledged anywhere is on both: what the backup held, what only the
        // laptop had (made after the backup on home, and while home was gone).
        wait_converged(&[&home, &lost.laptop], &lost.docs, Duration::from_secs(30))?;
        let out = home.dir.join("../photo-back.bin");
        home.cli(&[
            "blob",
            "get",
            &lost.blob,
            "-o",
            out.to_str().context("path")?,
        ])?;
        assert_eq!(sha256_file(&out)?, lost.blob);
        let _ = std::fs::remove_file(&out);
        // And new work flows both ways.
        let fresh = vec![
            new_doc(&home, r#"{"when":"after the restore, on home"}"#)?,
            new_doc(
                &lost.laptop,
                r#"{"when":"after the restore, on the laptop"}"#,
            )?,
        ];
        wait_converged(&[&home, &lost.laptop], &fresh, Duration::from_secs(20))?;

        // The agent role resumes: the queued request is answered, the schedule fires.
        let agent = home.json(&["agent", "status"])?;
        assert_eq!(agent["agent"], lost.home_id.as_str(), "{agent}");
        wait_done(&lost.laptop, &lost.queued.0, &lost.queued.1)?;
        wait_until(
            "the schedule to fire on the restored agent",
            Duration::from_secs(40),
            || Ok(last_fired(&lost.laptop, &lost.schedule)? > lost.fired_before),
        )?;
        home.assert_no_panic()?;
        lost.laptop.assert_no_panic()?;
        Ok(())
    });
}

/// The same loss, but the old key may be compromised: the restored server is a new device, the
/// old one is revoked on every device (a node started from the old key is refused), and the
/// new one holds the agent role and syncs.
#[test]
fn restored_as_a_new_device_the_old_one_is_revoked_everywhere() {
    scenario(|| {
        let lost = lose_the_home_server()?;
        let mut home = replacement_for(&lost.home, "home-new")?;
        let archive = lost.archive.to_str().context("path")?;
        let pass = lost.pass.to_str().context("path")?;
        let restored = home.json(&[
            "backup",
            "restore",
            archive,
            "--new-device",
            "--passphrase-file",
            pass,
        ])?;
        assert_eq!(restored["replaced"], lost.home_id.as_str(), "{restored}");
        assert_eq!(restored["revoked_here"], true, "{restored}");
        assert_eq!(restored["needs_invite"], false, "{restored}");
        let new_id = s(&restored, "device")?;
        assert_ne!(new_id, lost.home_id);
        home.start()?;
        assert_eq!(home.device_id()?, new_id);
        wait_mesh(&[&home, &lost.laptop], Duration::from_secs(30))?;
        // The new device reserves on the relay under its new id.
        wait_reserved(&home, &lost.relay, &new_id)?;
        wait_until(
            "the laptop to see the old home revoked",
            Duration::from_secs(20),
            || {
                Ok(lost
                    .laptop
                    .device_entry(&lost.home_id)?
                    .is_some_and(|d| d["revoked"] == true))
            },
        )?;
        let row = home
            .device_entry(&lost.home_id)?
            .context("the new home lists the old one")?;
        assert_eq!(row["revoked"], true, "{row}");
        wait_converged(&[&home, &lost.laptop], &lost.docs, Duration::from_secs(30))?;

        // The agent role moved to the new device with a higher epoch.
        wait_until(
            "the laptop to see the new agent",
            Duration::from_secs(20),
            || Ok(lost.laptop.json(&["agent", "status"])?["agent"] == new_id.as_str()),
        )?;
        wait_done(&lost.laptop, &lost.queued.0, &lost.queued.1)?;

        // Whoever has the old key (a copy of the archive, restored as the old device) is refused.
        let mut thief = Node::new("thief")?;
        std::fs::remove_dir(&thief.dir)?;
        thief.cli(&["backup", "restore", archive, "--passphrase-file", pass])?;
        thief.start()?;
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            !lost.laptop.trusts(&lost.home_id)?,
            "the old key is not trusted"
        );
        let before = lost.laptop.doc_ids()?.len();
        new_doc(&thief, r#"{"from":"the thief"}"#)?;
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(
            lost.laptop.doc_ids()?.len(),
            before,
            "nothing from the old key arrives"
        );
        home.assert_no_panic()?;
        Ok(())
    });
}

/// A recovery kit exported on the first device and imported on a plain device lets it invite
/// and revoke; a wrong passphrase, a damaged kit and mistyped words are refused clearly. An
/// admin device (invited with `--admin`) invites and revokes without the person key.
#[test]
fn recovery_kit_moves_invite_and_revoke_and_an_admin_device_needs_no_kit() {
    scenario(|| {
        let scratch = scratch()?;
        let mut a = Node::new("first")?;
        a.start()?;
        let mut b = Node::new("plain")?;
        b.start()?;
        b.cli(&["join", &a.invite(false)?])?;
        let mut admin = Node::new("admin")?;
        admin.start()?;
        admin.cli(&["join", &a.invite(true)?])?;
        wait_mesh(&[&a, &b, &admin], Duration::from_secs(40))?;

        let pass = passphrase_file(scratch.path(), "kit-pass", "a long kit passphrase")?;
        let wrong = passphrase_file(scratch.path(), "wrong-pass", "not it")?;
        let kit = scratch.path().join("kit.age");
        let (kit_s, pass_s, wrong_s) = (
            kit.to_str().context("path")?,
            pass.to_str().context("path")?,
            wrong.to_str().context("path")?,
        );
        // Only the holder can export.
        fails_with(
            &b,
            &[
                "person",
                "export",
                "--out",
                kit_s,
                "--passphrase-file",
                pass_s,
            ],
            "does not hold the person key",
        )?;
        let exported = a.json(&[
            "person",
            "export",
            "--out",
            kit_s,
            "--passphrase-file",
            pass_s,
            "--words",
        ])?;
        let words = s(&exported, "words")?;
        assert!(std::fs::read_to_string(&kit)?.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
        let qr = a.cli(&["person", "export", "--qr", "--passphrase-file", pass_s])?;
        assert!(qr.contains('█') || qr.contains('▀'), "a QR code is printed");

        // B is not an admin and holds no key: it cannot invite.
        fails_with(&b, &["invite"], "not an admin")?;
        fails_with(
            &b,
            &["person", "import", kit_s, "--passphrase-file", wrong_s],
            "wrong passphrase",
        )?;
        let damaged = scratch.path().join("damaged.age");
        let mut text = std::fs::read(&kit)?;
        let at = text.len() / 2;
        text[at] = if text[at] == b'A' { b'B' } else { b'A' };
        std::fs::write(&damaged, text)?;
        fails_with(
            &b,
            &[
                "person",
                "import",
                damaged.to_str().context("path")?,
                "--passphrase-file",
                pass_s,
            ],
            "damaged",
        )?;
        let typo = {
            let mut w = words.clone();
            let last = w.pop().context("words")?;
            w.push(if last == '2' { '3' } else { '2' });
            w.replacen("iomk1-", "iomk1-0", 1)
        };
        let (code, err) = b.fail(&["person", "import", "--words", &typo])?;
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("mistyped") || err.contains("characters"),
            "{err}"
        );
        // Another mesh's kit is refused by the other mesh's devices.
        let stranger = Node::new("stranger")?;
        stranger.cli(&["init"])?;
        fails_with(
            &stranger,
            &["person", "import", "--words", &words],
            "belongs to",
        )?;
        assert_eq!(
            b.status()?["holds_person_key"],
            false,
            "nothing changed on B"
        );

        // The right kit: B can invite and revoke.
        b.cli(&["person", "import", kit_s, "--passphrase-file", pass_s])?;
        assert_eq!(b.status()?["holds_person_key"], true);
        let mut c = Node::new("c")?;
        c.start()?;
        c.cli(&["join", &b.invite(false)?])?;
        wait_mesh(&[&a, &b, &c], Duration::from_secs(20))?;
        let c_id = c.device_id()?;
        b.cli(&["devices", "revoke", &c_id])?;
        wait_until("A to see C revoked by B", Duration::from_secs(20), || {
            Ok(a.device_entry(&c_id)?.is_some_and(|d| d["revoked"] == true))
        })?;
        // The words work as well as the file (on a stopped node, written to its key file).
        admin.stop()?;
        admin.cli(&["person", "import", "--words", &words])?;
        admin.start()?;
        assert_eq!(admin.status()?["holds_person_key"], true);

        // A second admin device without the person key invites and revokes.
        let mut admin2 = Node::new("admin2")?;
        admin2.start()?;
        admin2.cli(&["join", &a.invite(true)?])?;
        assert_eq!(admin2.status()?["holds_person_key"], false);
        let mut d = Node::new("d")?;
        d.start()?;
        d.cli(&["join", &admin2.invite(false)?])?;
        wait_mesh(&[&admin2, &d], Duration::from_secs(30))?;
        let d_id = d.device_id()?;
        admin2.cli(&["devices", "revoke", &d_id])?;
        wait_until(
            "A to see D revoked by the admin device",
            Duration::from_secs(20),
            || Ok(a.device_entry(&d_id)?.is_some_and(|r| r["revoked"] == true)),
        )?;
        Ok(())
    });
}

/// Rewrites a passphrase archive with another format version in its plaintext header.
fn with_format_version(archive: &Path, pass: &str, out: &Path, version: u16) -> Result<()> {
    use iom_node::backup::crypt::{Seal, Unlock};
    use std::io::{Read, Write};
    let secret = || age::secrecy::SecretString::from(pass.to_string());
    let mut plain = Vec::new();
    Unlock::Passphrase(secret())
        .open(std::fs::File::open(archive)?)?
        .read_to_end(&mut plain)?;
    plain[9..11].copy_from_slice(&version.to_be_bytes());
    let mut w = Seal::Passphrase(secret()).wrap(std::fs::File::create(out)?)?;
    w.write_all(&plain)?;
    w.finish()?;
    Ok(())
}

/// Truncated, tampered, wrong-passphrase and newer-format archives, and a non-empty target,
/// are refused with a clear error; the target stays as it was and nothing is left beside it;
/// the good archive then restores into the same target.
#[test]
fn bad_archives_are_refused_and_change_nothing() {
    scenario(|| {
        let scratch = scratch()?;
        let mut n = Node::new("solo")?;
        n.start()?;
        let doc = new_doc(&n, r#"{"keep":"me"}"#)?;
        let pass = passphrase_file(scratch.path(), "pass", "the right one")?;
        let wrong = passphrase_file(scratch.path(), "wrong", "the wrong one")?;
        let archive = scratch.path().join("solo.age");
        let (a, p, w) = (
            archive.to_str().context("path")?,
            pass.to_str().context("path")?,
            wrong.to_str().context("path")?,
        );
        n.cli(&["backup", "create", "--to", a, "--passphrase-file", p])?;
        n.stop()?;

        let bytes = std::fs::read(&archive)?;
        let truncated = scratch.path().join("truncated.age");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
        let tampered = scratch.path().join("tampered.age");
        let mut t = bytes.clone();
        let at = t.len() * 2 / 3;
        t[at] ^= 0x40;
        std::fs::write(&tampered, t)?;
        let newer = scratch.path().join("newer.age");
        with_format_version(&archive, "the right one", &newer, 2)?;
        let not_age = scratch.path().join("notes.age");
        std::fs::write(&not_age, "just some text\n")?;

        let target_parent = scratch.path().join("targets");
        std::fs::create_dir(&target_parent)?;
        let target = target_parent.join("data");
        let mut at_target = Node::new("target")?;
        at_target.dir = target.clone();
        let cases: [(&Path, &str, &str); 5] = [
            (&archive, w, "wrong passphrase"),
            (&truncated, p, "damaged or truncated"),
            (&tampered, p, "damaged or truncated"),
            (
                &newer,
                p,
                "format version 2 is newer than this iom reads (1)",
            ),
            (&not_age, p, "not an encrypted iom file"),
        ];
        for (file, pf, needle) in cases {
            let f = file.to_str().context("path")?;
            fails_with(
                &n,
                &["backup", "verify", f, "--passphrase-file", pf],
                needle,
            )?;
            fails_with(
                &at_target,
                &["backup", "restore", f, "--passphrase-file", pf],
                needle,
            )?;
            assert!(
                !target.exists(),
                "a failed restore of {f} created the target"
            );
            let left: Vec<_> = std::fs::read_dir(&target_parent)?.collect();
            assert!(left.is_empty(), "a failed restore of {f} left {left:?}");
        }
        // A non-empty target is refused, and its file is untouched.
        std::fs::create_dir(&target)?;
        std::fs::write(target.join("precious"), "mine")?;
        fails_with(
            &at_target,
            &["backup", "restore", a, "--passphrase-file", p],
            "is not empty",
        )?;
        assert_eq!(std::fs::read_to_string(target.join("precious"))?, "mine");
        std::fs::remove_file(target.join("precious"))?;
        // The good archive restores into the (now empty) target: the same device, its document.
        at_target.cli(&["backup", "restore", a, "--passphrase-file", p])?;
        at_target.start()?;
        assert!(at_target.doc_ids()?.contains(&doc));
        at_target.stop()?;
        Ok(())
    });
}

/// Two backups into one directory: the second (taken from the stopped node's data dir) copies
/// only the new blob and names the first for the other; a restore of the second brings both
/// back; without the first it is refused. A node with `[backup] every` backs itself up (to a
/// recipient key) and the archive verifies with the identity.
#[test]
fn incremental_and_scheduled_backups() {
    scenario(|| {
        let scratch = scratch()?;
        let dir = scratch.path().join("dir");
        let d = dir.to_str().context("path")?;
        let pass = passphrase_file(scratch.path(), "pass", "incremental")?;
        let p = pass.to_str().context("path")?;
        let mut n = Node::new("inc")?;
        n.start()?;
        let f1 = scratch.path().join("one.bin");
        let f2 = scratch.path().join("two.bin");
        random_file(&f1, 600_000, 1)?;
        random_file(&f2, 700_000, 2)?;
        let b1 = s(
            &n.json(&["blob", "add", f1.to_str().context("path")?])?,
            "hash",
        )?;
        let first = n.json(&[
            "backup",
            "create",
            "--to",
            d,
            "--blobs",
            "--passphrase-file",
            p,
        ])?;
        assert_eq!(first["blobs"], 1, "{first}");
        let b2 = s(
            &n.json(&["blob", "add", f2.to_str().context("path")?])?,
            "hash",
        )?;
        n.stop()?;
        let second = n.json(&[
            "backup",
            "create",
            "--to",
            d,
            "--blobs",
            "--passphrase-file",
            p,
        ])?;
        assert_eq!(second["blobs"], 1, "only the new blob: {second}");
        assert_eq!(second["blobs_elsewhere"], 1, "{second}");
        let listed = n.json(&["backup", "list", d])?;
        let archives = listed["archives"].as_array().context("archives")?;
        assert_eq!(archives.len(), 2, "{listed}");
        assert_eq!(archives[1]["needs"][0], archives[0]["archive"], "{listed}");
        // The catalog does not name the blobs.
        for e in std::fs::read_dir(&dir)? {
            let text = std::fs::read(e?.path())?;
            let text = String::from_utf8_lossy(&text);
            assert!(
                !text.contains(&b1) && !text.contains(&b2),
                "a blob hash in plain text"
            );
        }

        let second_path = s(&second, "archive")?;
        let mut back = Node::new("inc-back")?;
        std::fs::remove_dir(&back.dir)?;
        back.cli(&["backup", "restore", &second_path, "--passphrase-file", p])?;
        back.start()?;
        for (b, f) in [(&b1, &f1), (&b2, &f2)] {
            let out = scratch.path().join(format!("{b}.out"));
            back.cli(&["blob", "get", b, "-o", out.to_str().context("path")?])?;
            assert_eq!(sha256_file(&out)?, sha256_file(f)?);
        }
        back.stop()?;
        // Without the first archive the chain is broken: verify and restore say so.
        let first_path = s(&first, "archive")?;
        std::fs::rename(&first_path, scratch.path().join("moved.age"))?;
        fails_with(
            &n,
            &["backup", "verify", &second_path, "--passphrase-file", p],
            "not beside it",
        )?;
        let target = scratch.path().join("broken");
        let mut at_target = Node::new("broken")?;
        at_target.dir = target.clone();
        fails_with(
            &at_target,
            &["backup", "restore", &second_path, "--passphrase-file", p],
            "is incremental",
        )?;
        assert!(!target.exists());

        // Scheduled, to a recipient key.
        let identity = age::x25519::Identity::generate();
        let id_file = scratch.path().join("identity.txt");
        {
            use age::secrecy::ExposeSecret;
            std::fs::write(
                &id_file,
                format!("{}\n", identity.to_string().expose_secret()),
            )?;
        }
        let sched_dir = scratch.path().join("scheduled");
        let mut auto = Node::new("auto")?;
        std::fs::write(
            auto.dir.join("config.toml"),
            format!(
                "[backup]\ndir = {:?}\nevery = \"1h\"\nblobs = true\nrecipient = \"{}\"\n",
                sched_dir.to_str().context("path")?,
                identity.to_public()
            ),
        )?;
        auto.start()?;
        new_doc(&auto, r#"{"scheduled":true}"#)?;
        wait_until("a scheduled backup", Duration::from_secs(30), || {
            Ok(auto.status()?["backup"]["last"].as_u64().is_some())
        })?;
        let listed = auto.json(&["backup", "list", sched_dir.to_str().context("path")?])?;
        let archive = s(&listed["archives"][0], "archive")?;
        let v = auto.json(&[
            "backup",
            "verify",
            sched_dir.join(&archive).to_str().context("path")?,
            "--identity",
            id_file.to_str().context("path")?,
        ])?;
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["device"], auto.device_id()?.as_str());
        fails_with(
            &auto,
            &[
                "backup",
                "verify",
                sched_dir.join(&archive).to_str().context("path")?,
                "--passphrase-file",
                p,
            ],
            "wrong passphrase",
        )?;
        Ok(())
    });
}
