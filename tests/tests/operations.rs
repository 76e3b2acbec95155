//! Running iom on a home server and a relay VM (issue 18, operations) against real `iom`
//! processes: `/metrics` of the node and of the relay scraped over HTTP while real work happens
//! (an ask against the fake Messages API, a sync between two nodes), `iom doctor` reporting the
//! problems each test makes (Docker unreachable, a missing sandbox image, the relay down, a
//! nearly full disk on a loop-mounted filesystem), shell completions that bash can source, man
//! pages, and the systemd unit checked by `systemd-analyze verify`.
//!
//! Needs root (a loop mount) for the disk test, `systemd-analyze` (Debian package `systemd`),
//! `mkfs.ext4` (`e2fsprogs`), `script` (`bsdutils`) and Docker for the image test:
//! `scripts/install-deps.sh` installs the packages. A missing one fails the test; no test skips
//! itself (`IOM_SKIP_DOCKER=1` / `IOM_SKIP_NETNS=1` make `scripts/test.sh` leave the Docker and
//! root tests out with a filter).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig, Scripted};
use iom_tests::harness::{Node, free_port, iom_bin, runtime, scenario, wait_mesh, wait_until};
use serde_json::Value;

/// Fails the test when a prerequisite is missing: no test skips itself (`scripts/test.sh`
/// leaves tests out with a filter for `IOM_SKIP_DOCKER=1` / `IOM_SKIP_NETNS=1`).
fn require(ok: bool, what: &str) {
    assert!(
        ok,
        "{what} is missing: run scripts/install-deps.sh as root (or leave this test out, as \
         scripts/test.sh does with IOM_SKIP_DOCKER=1 / IOM_SKIP_NETNS=1)"
    );
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `iom ARGS` without a data dir of a node.
fn iom(args: &[&str]) -> Result<std::process::Output> {
    Command::new(iom_bin())
        .args(args)
        .env_remove("IOM_DATA_DIR")
        .output()
        .context("running iom")
}

// ---------------------------------------------------------------------------------------------
// Completions and man pages
// ---------------------------------------------------------------------------------------------

#[test]
fn completions_for_bash_zsh_and_fish_and_man_pages_are_generated() {
    scenario(|| {
        let tmp = tempfile::tempdir()?;
        for shell in ["bash", "zsh", "fish"] {
            let out = iom(&["completions", shell])?;
            ensure!(out.status.success(), "completions {shell}: {out:?}");
            let text = String::from_utf8(out.stdout)?;
            ensure!(
                text.contains("iom") && text.contains("doctor") && text.contains("service"),
                "{shell} completions name the commands: {}",
                &text[..text.len().min(300)]
            );
        }
        // bash parses the script, and sourcing it registers a completion for `iom`.
        let script = tmp.path().join("iom.bash");
        std::fs::write(&script, iom(&["completions", "bash"])?.stdout)?;
        let syntax = Command::new("bash").arg("-n").arg(&script).output()?;
        ensure!(syntax.status.success(), "bash -n: {syntax:?}");
        let sourced = Command::new("bash")
            .arg("-c")
            .arg(format!("source {} && complete -p iom", script.display()))
            .output()?;
        let line = String::from_utf8_lossy(&sourced.stdout);
        ensure!(
            sourced.status.success() && line.contains("iom"),
            "complete -p iom: {sourced:?}"
        );
        // The completion function offers the subcommands.
        let offered = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=(iom doc); COMP_CWORD=1; COMP_LINE='iom doc'; \
                 COMP_POINT=7; _iom iom doc iom; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                script.display()
            ))
            .output()?;
        let words = String::from_utf8_lossy(&offered.stdout);
        ensure!(
            words.lines().any(|w| w == "doctor") && words.lines().any(|w| w == "doc"),
            "completing `iom doc` offers doc and doctor: {offered:?}"
        );
        // Refused: an unknown shell (clap's usage error, exit 2).
        let bad = iom(&["completions", "tcsh"])?;
        assert_eq!(bad.status.code(), Some(2), "{bad:?}");

        // The man page: roff on stdout, and one page per command in a directory.
        let man = iom(&["man"])?;
        ensure!(man.status.success(), "{man:?}");
        let roff = String::from_utf8(man.stdout)?;
        ensure!(
            roff.starts_with(".ie") || roff.contains(".TH iom"),
            "{}",
            &roff[..200]
        );
        ensure!(roff.contains("doctor"), "the page lists the commands");
        let dir = tmp.path().join("man1");
        let out = iom(&["man", "--out-dir", dir.to_str().context("path")?])?;
        ensure!(out.status.success(), "{out:?}");
        for page in [
            "iom.1",
            "iom-node-run.1",
            "iom-service-install.1",
            "iom-doctor.1",
        ] {
            ensure!(dir.join(page).exists(), "{page} written");
        }
        if have("man") {
            let rendered = Command::new("man")
                .arg("-l")
                .arg(dir.join("iom-doctor.1"))
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "100")
                .output()?;
            ensure!(
                String::from_utf8_lossy(&rendered.stdout).contains("doctor"),
                "man -l renders the page: {rendered:?}"
            );
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// `GET url` with an optional bearer token: `(status, content type, body)`.
fn scrape(url: &str, token: Option<&str>) -> Result<(u16, String, String)> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut req = reqwest::Client::new().get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Ok((status, ct, resp.text().await?))
    })
}

/// The value of the sample `series` (`name` or `name{labels}`) in a text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

fn metric(text: &str, series: &str) -> Result<f64> {
    sample(text, series).ok_or_else(|| anyhow!("no {series} in\n{text}"))
}

/// Every sample line is `name{labels} value` with a `# TYPE` line before it.
fn check_exposition(text: &str) -> Result<()> {
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').context("TYPE line")?;
            ensure!(kind == "counter" || kind == "gauge", "{line}");
            typed.insert(name.to_string());
        } else if !line.starts_with('#') {
            let (series, value) = line.rsplit_once(' ').context("sample line")?;
            value
                .parse::<f64>()
                .with_context(|| format!("value of {line}"))?;
            let name = series.split('{').next().unwrap_or(series);
            ensure!(typed.contains(name), "{name} has no TYPE line");
        }
    }
    Ok(())
}

#[test]
fn node_metrics_move_after_an_ask_and_a_sync() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig {
            instant: true,
            ..FakeConfig::default()
        }))?;
        // No Docker for this agent: its tool calls fail (and are counted as errors), so the
        // test needs no sandbox image.
        let mut env = fake.node_env().to_vec();
        env.push(("DOCKER_HOST", "unix:///nonexistent/docker.sock"));
        let mut home = Node::with_env("home", &env)?;
        let port = free_port()?;
        home.args
            .extend(["--http".to_string(), format!("127.0.0.1:{port}")]);
        home.start()?;
        let mut laptop = Node::new("laptop")?;
        laptop.start()?;
        laptop.cli(&["join", &home.invite(false)?])?;
        wait_mesh(&[&home, &laptop], Duration::from_secs(30))?;
        let me = home.device_id()?;
        home.cli(&["agent", "assign", &me])?;
        let token = home.json(&["token", "create", "--name", "prometheus"])?["token"]
            .as_str()
            .context("token")?
            .to_string();
        let url = format!("http://127.0.0.1:{port}/metrics");

        // Token-protected like every API route.
        let (status, _, _) = scrape(&url, None)?;
        assert_eq!(status, 401, "no token");
        let (status, _, _) = scrape(
            &url,
            Some("iom_000000000000000000000000000000000000000000000000"),
        )?;
        assert_eq!(status, 401, "a wrong token");
        let (status, ct, before) = scrape(&url, Some(&token))?;
        assert_eq!(status, 200, "{before}");
        ensure!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        check_exposition(&before)?;
        assert_eq!(metric(&before, "iom_peers{link=\"direct\"}")?, 1.0);
        assert_eq!(metric(&before, "iom_asks_total")?, 0.0);

        // An ask from the laptop, answered by the home server's agent (the fake echoes).
        let answer = laptop.cli(&["ask", "hello from the metrics test"])?;
        ensure!(!answer.trim().is_empty(), "an answer");
        let (_, _, after_ask) = scrape(&url, Some(&token))?;
        assert_eq!(metric(&after_ask, "iom_asks_total")?, 1.0, "{after_ask}");
        assert_eq!(metric(&after_ask, "iom_asks_failed_total")?, 0.0);
        ensure!(
            metric(&after_ask, "iom_tokens_total{direction=\"input\"}")? > 0.0
                && metric(&after_ask, "iom_tokens_total{direction=\"output\"}")? > 0.0,
            "tokens counted: {after_ask}"
        );
        ensure!(metric(&after_ask, "iom_agent_tokens_today")? > 0.0);
        assert_eq!(metric(&after_ask, "iom_tool_calls_total")?, 0.0);

        // A tool call (it fails: no Docker here), then the answer.
        fake.push_scripts([
            Scripted::ToolUse {
                name: "bash".into(),
                input: serde_json::json!({ "command": "echo hi" }),
            },
            Scripted::Text("no sandbox today".into()),
        ]);
        laptop.cli(&["ask", "run a tool"])?;
        let (_, _, after_ask) = scrape(&url, Some(&token))?;
        assert_eq!(metric(&after_ask, "iom_asks_total")?, 2.0, "{after_ask}");
        assert_eq!(metric(&after_ask, "iom_tool_calls_total")?, 1.0);
        assert_eq!(metric(&after_ask, "iom_tool_call_errors_total")?, 1.0);
        ensure!(
            metric(&after_ask, "iom_errors_total{level=\"warn\"}")? > 0.0,
            "the unreachable Docker was logged as a warning"
        );

        // A sync: a document made on the laptop arrives at the home server; bytes move.
        let received = metric(&after_ask, "iom_bytes_received_total")?;
        let docs = metric(&after_ask, "iom_documents")?;
        let id = laptop.json(&["doc", "new", "--content", "{\"note\":\"metrics\"}"])?["id"]
            .as_str()
            .context("doc id")?
            .to_string();
        wait_until(
            "the document to reach home",
            Duration::from_secs(20),
            || Ok(home.doc_ids()?.contains(&id)),
        )?;
        let (_, _, after_sync) = scrape(&url, Some(&token))?;
        ensure!(
            metric(&after_sync, "iom_bytes_received_total")? > received,
            "bytes received grew with the sync"
        );
        ensure!(metric(&after_sync, "iom_bytes_sent_total")? > 0.0);
        assert_eq!(metric(&after_sync, "iom_documents")?, docs + 1.0);
        ensure!(sample(&after_sync, "iom_sync_docs_behind").is_some());
        home.stop()?;
        laptop.stop()?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// The relay: its metrics, and doctor's relay check
// ---------------------------------------------------------------------------------------------

struct Relay {
    child: Child,
    addr: String,
    metrics: String,
    log: PathBuf,
}

impl Relay {
    fn start(dir: &Path, token_file: &Path) -> Result<Relay> {
        let key = iom_node::relay::load_or_create_relay_key(dir)
            .map_err(|e| anyhow!("relay key: {e}"))?;
        let port = free_port()?;
        let mport = free_port()?;
        let log = dir.join("relay.log");
        let child = Command::new(iom_bin())
            .arg("--data-dir")
            .arg(dir)
            .args(["relay", "run", "--no-rate-limits", "--listen"])
            .arg(format!("/ip4/127.0.0.1/tcp/{port}"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{mport}"))
            .arg("--metrics-token-file")
            .arg(token_file)
            .env("IOM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawning iom relay run")?;
        let relay = Relay {
            child,
            addr: format!(
                "/ip4/127.0.0.1/tcp/{port}/p2p/{}",
                key.public().to_peer_id()
            ),
            metrics: format!("http://127.0.0.1:{mport}/metrics"),
            log,
        };
        wait_until(
            "the relay's metrics to answer",
            Duration::from_secs(20),
            || Ok(scrape(&relay.metrics, None).is_ok()),
        )
        .with_context(|| std::fs::read_to_string(&relay.log).unwrap_or_default())?;
        Ok(relay)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `iom doctor --json` on `node`: `(exit code, findings)`.
fn doctor(node: &Node, env: &[(&str, &str)]) -> Result<(i32, Vec<Value>)> {
    let mut cmd = Command::new(iom_bin());
    cmd.arg("--data-dir")
        .arg(&node.dir)
        .args(["doctor", "--json"])
        .env_remove("IOM_DATA_DIR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output()?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "doctor printed no JSON: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let findings = v["findings"].as_array().cloned().context("findings")?;
    ensure!(
        findings.iter().all(|f| f["check"].is_string()
            && f["severity"].is_string()
            && f["detail"].is_string()),
        "every finding has a check, a severity and a detail: {v}"
    );
    Ok((out.status.code().unwrap_or(-1), findings))
}

/// The findings of `check`.
fn findings_of<'a>(findings: &'a [Value], check: &str) -> Vec<&'a Value> {
    findings.iter().filter(|f| f["check"] == check).collect()
}

fn severity_of(findings: &[Value], check: &str) -> Result<String> {
    let f = findings_of(findings, check);
    let first = f
        .first()
        .ok_or_else(|| anyhow!("no {check} finding in {findings:?}"))?;
    Ok(first["severity"].as_str().unwrap_or("").to_string())
}

#[test]
fn relay_metrics_and_doctor_see_the_relay_reserve_and_go_down() {
    scenario(|| {
        let tmp = tempfile::tempdir()?;
        let token_file = tmp.path().join("metrics.token");
        std::fs::write(&token_file, "relay-scrape-secret\n")?;
        let relay_dir = tmp.path().join("relay");
        std::fs::create_dir_all(&relay_dir)?;
        let mut relay = Relay::start(&relay_dir, &token_file)?;
        let (status, _, _) = scrape(&relay.metrics, None)?;
        assert_eq!(status, 401, "the relay's metrics need the token");
        let (status, _, text) = scrape(&relay.metrics, Some("relay-scrape-secret"))?;
        assert_eq!(status, 200);
        check_exposition(&text)?;
        assert_eq!(metric(&text, "iom_relay_reservations_accepted_total")?, 0.0);

        let mut home = Node::new("home")?;
        home.args
            .extend(["--relay".to_string(), relay.addr.clone()]);
        home.start()?;
        wait_until(
            "doctor to see the reservation",
            Duration::from_secs(30),
            || {
                let (_, f) = doctor(&home, &[])?;
                Ok(severity_of(&f, "relay")? == "ok")
            },
        )?;
        let (_, text) = (0, scrape(&relay.metrics, Some("relay-scrape-secret"))?.2);
        ensure!(
            metric(&text, "iom_relay_reservations_accepted_total")? >= 1.0,
            "{text}"
        );
        ensure!(metric(&text, "iom_relay_connected_peers")? >= 1.0);
        ensure!(metric(&text, "iom_relay_connections_total")? >= 1.0);
        let (_, f) = doctor(&home, &[])?;
        for check in ["hole_punching", "clock", "certificates", "disk"] {
            ensure!(
                !findings_of(&f, check).is_empty(),
                "a {check} finding: {f:?}"
            );
        }
        assert_eq!(severity_of(&f, "certificates")?, "ok");

        // The relay goes down: doctor says so, with what to do, and exits 1.
        relay.kill();
        wait_until(
            "doctor to see the relay down",
            Duration::from_secs(30),
            || {
                let (_, f) = doctor(&home, &[])?;
                Ok(severity_of(&f, "relay")? == "error")
            },
        )?;
        let (code, f) = doctor(&home, &[])?;
        assert_eq!(code, 1, "an error finding makes doctor exit 1: {f:?}");
        let relay_finding = findings_of(&f, "relay")[0];
        ensure!(
            relay_finding["fix"]
                .as_str()
                .unwrap_or("")
                .contains("iom relay run"),
            "{relay_finding}"
        );
        let human = home.try_cli(&["doctor"])?;
        let text = String::from_utf8_lossy(&human.stdout);
        ensure!(
            text.contains("[error  ] relay:") && text.contains("fix:"),
            "the human output: {text}"
        );

        // A non-loopback metrics listener without a token is refused at start.
        let out = Command::new(iom_bin())
            .arg("--data-dir")
            .arg(&relay_dir)
            .args(["relay", "run", "--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(["--metrics-listen", "0.0.0.0:0"])
            .output()?;
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        ensure!(
            String::from_utf8_lossy(&out.stderr).contains("--metrics-token-file"),
            "{out:?}"
        );
        home.stop()?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Doctor: Docker, the image, the disk, no node
// ---------------------------------------------------------------------------------------------

/// A started node that holds the agent role, with `config` in its config file.
fn agent_node(name: &str, env: &[(&str, &str)], config: &str) -> Result<Node> {
    let mut n = Node::with_env(name, env)?;
    std::fs::write(n.dir.join("config.toml"), config)?;
    n.start()?;
    let me = n.device_id()?;
    n.cli(&["agent", "assign", &me])?;
    Ok(n)
}

#[test]
fn doctor_reports_docker_unreachable_on_the_agent() {
    scenario(|| {
        let env = [
            ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
            ("ANTHROPIC_API_KEY", "sk-ant-fake-test-key"),
        ];
        let mut n = agent_node("nodocker", &env, "")?;
        let (code, f) = doctor(&n, &[])?;
        assert_eq!(severity_of(&f, "docker")?, "error", "{f:?}");
        let d = findings_of(&f, "docker")[0];
        ensure!(
            d["detail"].as_str().unwrap_or("").contains("agent role")
                && d["fix"]
                    .as_str()
                    .unwrap_or("")
                    .contains("systemctl start docker"),
            "{d}"
        );
        assert_eq!(
            severity_of(&f, "api_key")?,
            "ok",
            "the key is in the node's env"
        );
        assert_eq!(code, 1);

        // The CLI reaches its node on a machine without CA certificates (a minimal container:
        // found under a real systemd by scripts/systemd-container-check.sh).
        let empty = tempfile::tempdir()?;
        let out = Command::new(iom_bin())
            .arg("--data-dir")
            .arg(&n.dir)
            .args(["status", "--json"])
            .env("SSL_CERT_FILE", empty.path().join("none.pem"))
            .env("SSL_CERT_DIR", empty.path())
            .output()?;
        ensure!(
            out.status.success(),
            "status without CA certificates: {out:?}"
        );
        n.stop()?;
        Ok(())
    })
}

#[test]
fn doctor_reports_a_missing_sandbox_image_and_a_missing_api_key() {
    scenario(|| {
        let docker = Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .output();
        require(
            docker.is_ok_and(|o| o.status.success()),
            "a reachable Docker engine",
        );
        let mut n = agent_node(
            "noimage",
            &[],
            "[sandbox]\nimage = \"iom-sandbox:no-such-tag\"\n",
        )?;
        let (code, f) = doctor(&n, &[])?;
        assert_eq!(severity_of(&f, "docker")?, "ok", "{f:?}");
        assert_eq!(severity_of(&f, "sandbox_image")?, "error");
        let img = findings_of(&f, "sandbox_image")[0];
        ensure!(
            img["detail"]
                .as_str()
                .unwrap_or("")
                .contains("iom-sandbox:no-such-tag")
                && img["fix"]
                    .as_str()
                    .unwrap_or("")
                    .contains("iom sandbox build"),
            "{img}"
        );
        assert_eq!(severity_of(&f, "api_key")?, "error", "no key anywhere");
        assert_eq!(code, 1);
        n.stop()?;
        Ok(())
    })
}

/// A loop-mounted ext4 filesystem of `mib` MiB (no reserved blocks) at `mountpoint`,
/// unmounted on drop.
struct LoopFs {
    mountpoint: PathBuf,
    image: PathBuf,
}

impl LoopFs {
    fn mount(image: &Path, mountpoint: &Path, mib: u64) -> Result<LoopFs> {
        let f = std::fs::File::create(image)?;
        f.set_len(mib << 20)?;
        let run = |cmd: &mut Command| -> Result<()> {
            let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
            ensure!(out.status.success(), "{cmd:?}: {out:?}");
            Ok(())
        };
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(image))?;
        std::fs::create_dir_all(mountpoint)?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(mountpoint))?;
        Ok(LoopFs {
            mountpoint: mountpoint.to_path_buf(),
            image: image.to_path_buf(),
        })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mountpoint).output();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Free bytes for an unprivileged writer on the filesystem of `path`.
fn avail(path: &Path) -> Result<u64> {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .context("df output")?
        .trim()
        .parse()
        .context("df avail")
}

#[test]
fn doctor_reports_a_nearly_full_disk() {
    scenario(|| {
        require(is_root(), "root (to mount a loop filesystem)");
        require(have("mkfs.ext4"), "mkfs.ext4 (e2fsprogs)");
        let tmp = tempfile::tempdir()?;
        let mut n = Node::new("full")?;
        // The node's whole data dir lives on a 3 GiB filesystem (a sparse image: it costs only
        // the blocks written).
        let fs = LoopFs::mount(&tmp.path().join("disk.img"), &n.dir, 3 * 1024)?;
        n.log = tmp.path().join("full.log");
        n.start()?;
        let (_, f) = doctor(&n, &[])?;
        assert_eq!(severity_of(&f, "disk")?, "ok", "{f:?}");

        // Fill it up to 64 MiB (fallocate reserves blocks without writing them).
        let fill = avail(&n.dir)?.saturating_sub(64 << 20);
        let out = Command::new("fallocate")
            .args(["-l", &fill.to_string()])
            .arg(n.dir.join("filler"))
            .output()?;
        ensure!(out.status.success(), "fallocate: {out:?}");
        let (code, f) = doctor(&n, &[])?;
        assert_eq!(severity_of(&f, "disk")?, "error", "{f:?}");
        let d = findings_of(&f, "disk")[0];
        ensure!(
            d["detail"].as_str().unwrap_or("").contains("MiB free of")
                && d["fix"].as_str().unwrap_or("").contains("free space"),
            "{d}"
        );
        assert_eq!(code, 1);
        n.stop()?;
        std::fs::remove_file(n.dir.join("filler"))?;
        drop(fs);
        Ok(())
    })
}

#[test]
fn doctor_without_a_running_node_checks_what_it_can_and_says_what_it_skipped() {
    scenario(|| {
        let n = Node::new("offline")?;
        n.cli(&["init"])?;
        let (code, f) = doctor(&n, &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")])?;
        assert_eq!(severity_of(&f, "node")?, "warning", "{f:?}");
        ensure!(
            findings_of(&f, "node")[0]["fix"]
                .as_str()
                .unwrap_or("")
                .contains("iom node run")
        );
        // Whether this device is the agent is unknown: Docker is a warning, not an error.
        assert_eq!(severity_of(&f, "docker")?, "warning");
        ensure!(!findings_of(&f, "disk").is_empty());
        ensure!(
            findings_of(&f, "relay").is_empty(),
            "no relay check without a node"
        );
        assert_eq!(code, 0, "warnings only: {f:?}");

        // A configuration the node would refuse is a finding too.
        std::fs::write(
            n.dir.join("config.toml"),
            "[network]\nlisten = [\"not an address\"]\n",
        )?;
        let (code, f) = doctor(&n, &[])?;
        assert_eq!(severity_of(&f, "config")?, "error", "{f:?}");
        assert_eq!(code, 1);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// The systemd unit
// ---------------------------------------------------------------------------------------------

#[test]
fn service_units_verify_with_systemd_analyze_and_install_into_a_unit_dir() {
    scenario(|| {
        require(
            have("systemd-analyze"),
            "systemd-analyze (Debian package systemd)",
        );
        let tmp = tempfile::tempdir()?;
        let data = tmp.path().join("data");
        let relay_data = tmp.path().join("relay");
        for (what, extra) in [
            ("node", vec!["--", "--http", "127.0.0.1:8080"]),
            ("relay", vec!["--relay"]),
            ("user", vec!["--user"]),
        ] {
            let dir = if what == "relay" { &relay_data } else { &data };
            let mut args = vec![
                "--data-dir",
                dir.to_str().context("path")?,
                "service",
                "show",
            ];
            let (flags, run_args): (Vec<&str>, Vec<&str>) =
                match extra.iter().position(|a| *a == "--") {
                    Some(i) => (extra[..i].to_vec(), extra[i..].to_vec()),
                    None => (extra.clone(), Vec::new()),
                };
            args.extend(flags);
            args.extend(run_args);
            let out = iom(&args)?;
            ensure!(out.status.success(), "service show {what}: {out:?}");
            let text = String::from_utf8(out.stdout)?;
            ensure!(text.contains("NoNewPrivileges=yes") && text.contains("ProtectSystem=strict"));
            ensure!(
                text.contains(&format!("ReadWritePaths={}\n", dir.display())),
                "{text}"
            );
            if what == "relay" {
                ensure!(!text.contains("SupplementaryGroups"), "{text}");
                ensure!(text.contains(" relay run"), "{text}");
            }
            if what == "node" {
                ensure!(text.contains("node run --http 127.0.0.1:8080\n"), "{text}");
            }
            let unit = tmp.path().join(format!("{what}/iom.service"));
            std::fs::create_dir_all(unit.parent().context("parent")?)?;
            std::fs::write(&unit, &text)?;
            let mut verify = Command::new("systemd-analyze");
            if what == "user" {
                // A user manager needs a runtime dir (none exists without a login session).
                let runtime_dir = tmp.path().join("xdg-runtime");
                std::fs::create_dir_all(&runtime_dir)?;
                verify.arg("--user").env("XDG_RUNTIME_DIR", &runtime_dir);
            }
            let v = verify.args(["verify", "--man=no"]).arg(&unit).output()?;
            let stderr = String::from_utf8_lossy(&v.stderr);
            // Only lines about our unit count (a container's own units may be noisy).
            let ours: Vec<&str> = stderr
                .lines()
                .filter(|l| l.contains("iom.service"))
                .collect();
            ensure!(
                v.status.success() && ours.is_empty(),
                "systemd-analyze verify {what}: {v:?}\n{text}"
            );
        }

        // install / status / uninstall into a unit dir (no systemctl).
        let units = tmp.path().join("units");
        let unit_dir = units.to_str().context("path")?;
        let data_s = data.to_str().context("path")?;
        let base = ["--data-dir", data_s, "--json", "service"];
        let run = |verb: &str| -> Result<Value> {
            let mut a = base.to_vec();
            a.extend([verb, "--user", "--unit-dir", unit_dir]);
            let out = iom(&a)?;
            ensure!(out.status.success(), "service {verb}: {out:?}");
            Ok(serde_json::from_slice(&out.stdout)?)
        };
        let installed = run("install")?;
        assert_eq!(installed["enabled"], false, "{installed}");
        let unit_text = std::fs::read_to_string(units.join("iom.service"))?;
        ensure!(unit_text.contains("WantedBy=default.target"), "{unit_text}");
        ensure!(
            data.is_dir(),
            "install creates the data dir (ReadWritePaths needs it)"
        );
        let status = run("status")?;
        assert_eq!(status["installed"], true, "{status}");
        let removed = run("uninstall")?;
        assert_eq!(removed["removed"], true);
        assert_eq!(run("status")?["installed"], false);

        // Without systemd as init (this container, CI), a real install writes the unit and says
        // clearly why it cannot enable it.
        if !Path::new("/run/systemd/system").exists() {
            let home = tmp.path().join("home");
            std::fs::create_dir_all(&home)?;
            let out = Command::new(iom_bin())
                .args(["--data-dir", data_s, "service", "install", "--user"])
                .env("HOME", &home)
                .env_remove("XDG_CONFIG_HOME")
                .env_remove("IOM_SERVICE_UNIT_DIR")
                .output()?;
            assert_eq!(out.status.code(), Some(1), "{out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            ensure!(err.contains("systemd is not running"), "{err}");
            ensure!(home.join(".config/systemd/user/iom.service").exists());
            let st = Command::new(iom_bin())
                .args(["--data-dir", data_s, "service", "status", "--user"])
                .env("HOME", &home)
                .output()?;
            let text = String::from_utf8_lossy(&st.stdout);
            ensure!(
                text.contains("iom.service: installed") && text.contains("systemd is not running"),
                "{text}"
            );
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Progress bars
// ---------------------------------------------------------------------------------------------

#[test]
fn progress_is_drawn_on_a_terminal_and_off_in_pipes_and_with_json() {
    scenario(|| {
        let mut n = Node::new("bars")?;
        n.start()?;
        let file = n.dir.join("big.bin");
        iom_tests::harness::random_file(&file, 24 << 20, 7)?;
        let file_s = file.to_str().context("path")?;

        // stderr is a pipe here: no bar, stdout is just the hash.
        let out = n.try_cli(&["blob", "add", file_s])?;
        ensure!(out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !stderr.contains('\r') && !stderr.contains('%'),
            "no progress in a pipe: {stderr:?}"
        );
        let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(hash.len() == 64, "{hash}");
        let got = n.dir.join("got.bin");
        let out = n.try_cli(&["blob", "get", &hash, "-o", got.to_str().context("path")?])?;
        ensure!(out.status.success() && !String::from_utf8_lossy(&out.stderr).contains('%'));

        require(have("script"), "script (bsdutils)");
        // On a terminal (script(1) gives the command a pty): a bar that reaches 100%.
        let run_on_pty = |args: &str| -> Result<String> {
            let cmd = format!(
                "{} --data-dir {} {args}",
                iom_bin().display(),
                n.dir.display()
            );
            let out = Command::new("script")
                .args(["-qefc", &cmd, "/dev/null"])
                .stdin(Stdio::null())
                .output()?;
            ensure!(out.status.success(), "script {cmd}: {out:?}");
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let screen = run_on_pty(&format!("blob add {file_s}"))?;
        ensure!(
            screen.contains("adding") && screen.contains("100%") && screen.contains("24.0 MiB"),
            "a bar on the terminal: {screen:?}"
        );
        let again = n.dir.join("again.bin");
        let screen = run_on_pty(&format!("blob get {hash} -o {}", again.display()))?;
        ensure!(
            screen.contains("getting") && screen.contains("100%"),
            "{screen:?}"
        );
        // --json turns it off even on a terminal.
        let screen = run_on_pty(&format!("--json blob add {file_s}"))?;
        ensure!(
            !screen.contains('%') && screen.contains(&hash),
            "{screen:?}"
        );
        n.stop()?;
        Ok(())
    })
}

/// `iom join` waits for the first sync: with `--wait` (scripts) it returns once every document
/// the inviter holds is here and says how many arrived; on a terminal it draws a bar over the
/// documents that reaches 100%; `--no-wait` returns at once.
#[test]
fn join_waits_for_the_first_sync_with_a_bar_on_a_terminal() {
    scenario(|| {
        let mut home = Node::new("home")?;
        home.start()?;
        let mut ids = Vec::new();
        for i in 0..60 {
            let v = home.json(&["doc", "new", "--content", &format!(r#"{{"n":{i}}}"#)])?;
            ids.push(v["id"].as_str().context("id")?.to_string());
        }
        let here = home.doc_ids()?.len();

        // --wait: the first sync is over when join returns.
        let mut laptop = Node::new("laptop")?;
        laptop.start()?;
        let v = laptop.json(&["join", &home.invite(false)?, "--wait"])?;
        ensure!(
            v["first_sync"]["documents_here"].as_u64() >= Some(here as u64),
            "{v}"
        );
        let present = laptop.doc_ids()?;
        ensure!(
            ids.iter().all(|id| present.contains(id)),
            "every document is here when join --wait returns ({} of {})",
            present.len(),
            ids.len()
        );

        // On a terminal: a bar over the documents.
        require(have("script"), "script (bsdutils)");
        let mut phone = Node::new("phone")?;
        phone.start()?;
        let code = home.invite(false)?;
        let cmd = format!(
            "{} --data-dir {} join {code}",
            iom_bin().display(),
            phone.dir.display()
        );
        let out = Command::new("script")
            .args(["-qefc", &cmd, "/dev/null"])
            .stdin(Stdio::null())
            .output()?;
        ensure!(out.status.success(), "script {cmd}: {out:?}");
        let screen = String::from_utf8_lossy(&out.stdout);
        ensure!(
            screen.contains("first sync [") && screen.contains("100%"),
            "a first-sync bar on the terminal: {screen:?}"
        );
        ensure!(screen.contains("first sync done"), "{screen:?}");
        ensure!(phone.doc_ids()?.len() >= ids.len());

        // --no-wait: trusted, and back at once (no first-sync line).
        let mut tablet = Node::new("tablet")?;
        tablet.start()?;
        let out = tablet.cli(&["join", &home.invite(false)?, "--no-wait"])?;
        ensure!(
            out.contains("joined") && !out.contains("first sync"),
            "{out}"
        );
        for n in [&home, &laptop, &phone, &tablet] {
            n.assert_no_panic()?;
        }
        Ok(())
    })
}
