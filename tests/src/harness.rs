//! Real `iom` processes in temporary data dirs: start, stop (SIGTERM or SIGKILL), restart,
//! and run CLI commands against them; plus a raw libp2p client ([`raw`]) for talking to a
//! node's protocols directly, as a misbehaving or foreign peer would.
//!
//! Set `IOM_TEST_LOG` (default [`DEFAULT_NODE_LOG`]) to change the nodes' log filter; a node's
//! log is printed when a test panics while the node is alive.

pub mod raw;

/// The nodes' log filter unless `IOM_TEST_LOG` says otherwise: everything at `info`, except
/// Automerge, whose `#[instrument]`ed load functions open an info span per document load
/// (about a tenth of a cold sync's CPU when formatted).
pub const DEFAULT_NODE_LOG: &str = "info,automerge=warn";

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// Path of the `iom` binary: built (if out of date) once per test process, then pinned. When the `IOM_BIN`
/// environment variable is set (benchmarks point it at `target/release/iom`), that binary is
/// used as is and nothing is built.
pub fn iom_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("IOM_BIN") {
            return PathBuf::from(bin);
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        let bin = target.join("debug/iom");
        // The same selection as `cargo nextest run --workspace` (dev-dependencies on, so the
        // same feature set), so the binary shares every compiled dependency with the test
        // build instead of adding a second copy of the tree to the target dir. The test hooks
        // (`IOM_FAULT`, `IOM_CLOCK_OFFSET_SECS`) come through iom-tests' dependency on iom-node.
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "--workspace", "--bins", "--tests"])
            .current_dir(&root)
            .status();
        match status {
            Ok(s) if s.success() => {}
            other => panic!("building the iom binary failed: {other:?}"),
        }
        pin_binary(&target, &bin).unwrap_or(bin)
    })
}

/// Other builds in the same target dir may replace `target/debug/iom` while tests run; a
/// hard link keeps this test process on the binary it built. Links of finished test
/// processes are removed.
fn pin_binary(target: &Path, bin: &Path) -> Option<PathBuf> {
    let dir = target.join("debug/iom-test-pins");
    std::fs::create_dir_all(&dir).ok()?;
    for entry in std::fs::read_dir(&dir).ok()?.flatten() {
        let alive = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("iom-"))
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let pinned = dir.join(format!("iom-{}", std::process::id()));
    let _ = std::fs::remove_file(&pinned);
    std::fs::hard_link(bin, &pinned).ok()?;
    Some(pinned)
}

/// One node: a data dir and, while running, its process.
pub struct Node {
    /// Name used in logs and as the device name.
    pub name: String,
    /// The data dir (deleted on drop unless `keep`).
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
    /// Extra `node run` arguments.
    pub args: Vec<String>,
    /// Extra environment for `node run`.
    pub env: Vec<(String, String)>,
    /// Where the node's stderr goes.
    pub log: PathBuf,
}

impl Node {
    /// A node with a fresh data dir, listening on loopback TCP, mDNS off. The port is chosen
    /// now and kept across restarts, as a real device's port is, so peers can redial it.
    pub fn new(name: &str) -> Result<Node> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(test_data_root()?)?;
        let dir = tmp.path().to_path_buf();
        Ok(Node {
            name: name.into(),
            log: dir.join("node.log"),
            dir,
            _tmp: Some(tmp),
            child: None,
            args: Node::default_args(name)?,
            env: Vec::new(),
        })
    }

    /// A node whose data dir is `dir`, kept after the node is dropped (benchmarks that reuse a
    /// store that takes minutes to fill). A dir made by an earlier run is used as it is: its
    /// `node.args` file (written on the first run) restores its name and its port, which its
    /// peers know it by.
    pub fn persistent(name: &str, dir: &Path) -> Result<Node> {
        let args_file = dir.join("node.args");
        let args = match std::fs::read_to_string(&args_file) {
            Ok(text) => text.lines().map(str::to_string).collect(),
            Err(_) => {
                std::fs::create_dir_all(dir)?;
                let args = Node::default_args(name)?;
                std::fs::write(&args_file, args.join("\n"))?;
                args
            }
        };
        Ok(Node {
            name: name.into(),
            log: dir.join("node.log"),
            dir: dir.to_path_buf(),
            _tmp: None,
            child: None,
            args,
            env: Vec::new(),
        })
    }

    /// `node run` arguments of a fresh node: loopback TCP on a free port, mDNS off, its name.
    fn default_args(name: &str) -> Result<Vec<String>> {
        Ok(vec![
            "--listen".into(),
            format!("/ip4/127.0.0.1/tcp/{}", free_port()?),
            "--no-mdns".into(),
            "--name".into(),
            name.into(),
        ])
    }

    /// A node on a copy of a data dir from a `.tar.gz` fixture in `tests/fixtures/` (made by an
    /// older build; tar keeps the keys' 0600 modes), the member `dir` of the archive. It listens
    /// on `port` (0: a free one).
    pub fn from_fixture(name: &str, archive: &str, dir: &str, port: u16) -> Result<Node> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(test_data_root()?)?;
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(archive);
        let out = Command::new("tar")
            .arg("xzf")
            .arg(&path)
            .arg("-C")
            .arg(tmp.path())
            .arg(dir)
            .output()
            .context("running tar")?;
        if !out.status.success() {
            bail!(
                "cannot unpack {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let data = tmp.path().join(dir);
        let port = if port == 0 { free_port()? } else { port };
        Ok(Node {
            name: name.into(),
            log: tmp.path().join(format!("{dir}.log")),
            dir: data,
            _tmp: Some(tmp),
            child: None,
            args: vec![
                "--listen".into(),
                format!("/ip4/127.0.0.1/tcp/{port}"),
                "--no-mdns".into(),
            ],
            env: Vec::new(),
        })
    }

    /// A fresh node whose `node run` gets extra environment (e.g. `IOM_FAULT`).
    pub fn with_env(name: &str, env: &[(&str, &str)]) -> Result<Node> {
        let mut n = Node::new(name)?;
        n.env = env
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        Ok(n)
    }

    /// Stops (SIGTERM) and starts again.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start()
    }

    /// `iom status --json`.
    pub fn status(&self) -> Result<Value> {
        self.json(&["status"])
    }

    /// The node's TCP listen addresses (from `status`).
    pub fn listen_addrs(&self) -> Result<Vec<String>> {
        Ok(self.status()?["listen"]
            .as_array()
            .ok_or_else(|| anyhow!("no listen addresses in status"))?
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect())
    }

    /// `iom devices --json` as a list of device objects.
    pub fn devices(&self) -> Result<Vec<Value>> {
        self.json(&["devices"])?["devices"]
            .as_array()
            .cloned()
            .ok_or_else(|| anyhow!("no devices array"))
    }

    /// The `devices` entry for a device id, if listed.
    pub fn device_entry(&self, device: &str) -> Result<Option<Value>> {
        Ok(self
            .devices()?
            .into_iter()
            .find(|d| d["device"].as_str() == Some(device)))
    }

    /// Whether `devices` shows `device` as trusted (listed, not revoked).
    pub fn trusts(&self, device: &str) -> Result<bool> {
        Ok(self
            .device_entry(device)?
            .is_some_and(|d| d["revoked"] == Value::Bool(false)))
    }

    /// Whether `devices` shows a live connection to `device`.
    pub fn connected_to(&self, device: &str) -> Result<bool> {
        Ok(self.device_entry(device)?.is_some_and(
            |d| matches!(d["connection"].as_str(), Some(c) if c != "offline" && c != "self"),
        ))
    }

    /// Runs a CLI command that must fail; returns `(exit code, stderr)`.
    pub fn fail(&self, args: &[&str]) -> Result<(i32, String)> {
        let out = self.try_cli(args)?;
        if out.status.success() {
            bail!(
                "`iom {}` on {} succeeded but should have failed: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// A document's `(sorted heads, content)`, or `None` if the node does not have it.
    pub fn doc_view(&self, id: &str) -> Result<Option<(Vec<String>, Value)>> {
        let out = self.try_cli(&["doc", "get", id, "--json"])?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("no document") {
                return Ok(None);
            }
            bail!("`doc get {id}` on {} failed: {err}", self.name);
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok(Some((sorted_heads(&v["heads"]), v["content"].clone())))
    }

    /// Ids of the documents this node has.
    pub fn doc_ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self.json(&["doc", "list"])?["documents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["id"].as_str().map(str::to_string))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every document this node has, with its sorted heads (`iom doc list`).
    pub fn doc_heads(&self) -> Result<BTreeMap<String, Vec<String>>> {
        Ok(heads_by_doc(&self.json(&["doc", "list"])?))
    }

    /// Hashes of the blobs this node lists.
    pub fn blob_hashes(&self) -> Result<Vec<String>> {
        Ok(self.json(&["blob", "list"])?["blobs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["hash"].as_str().map(str::to_string))
            .collect())
    }

    /// A client for the node's local API (HTTP over its unix socket).
    pub fn api(&self) -> Result<iom_node::api::client::ApiClient> {
        iom_node::api::client::ApiClient::new(&self.dir).map_err(|e| anyhow!("{e}"))
    }

    /// A field of `/proc/PID/status` in KiB (`VmHWM`, `VmRSS`), while running.
    pub fn proc_kib(&self, field: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Fails if the node's log shows a panic.
    pub fn assert_no_panic(&self) -> Result<()> {
        let log = self.log_text();
        if log.contains("panicked") {
            bail!("{} panicked; log:\n{log}", self.name);
        }
        Ok(())
    }

    /// Adds `--data-dir DIR node run ARGS`, the node's environment and its log to `cmd` (the
    /// `iom` binary, possibly wrapped, e.g. in `ip netns exec`).
    pub fn configure_run(&self, cmd: &mut Command, log: std::fs::File) {
        cmd.arg("--data-dir")
            .arg(&self.dir)
            .args(["node", "run"])
            .args(&self.args)
            .env(
                "IOM_LOG",
                std::env::var("IOM_TEST_LOG").unwrap_or_else(|_| DEFAULT_NODE_LOG.into()),
            )
            .env("NO_COLOR", "1")
            .env_remove("IOM_FAULT")
            .env_remove("ANTHROPIC_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
    }

    /// Starts `iom node run` and waits until its API answers.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("{} already running", self.name);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new(iom_bin());
        self.configure_run(&mut cmd, log);
        self.child = Some(cmd.spawn().context("spawning iom node run")?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                bail!(
                    "{} exited at start ({status}); log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if self
                .try_cli(&["status", "--json"])
                .is_ok_and(|o| o.status.success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not come up; log:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM and wait (graceful).
    pub fn stop(&mut self) -> Result<()> {
        self.stop_within(Duration::from_secs(15))
    }

    /// SIGTERM and wait up to `grace`; then SIGKILL, reap, and fail.
    fn stop_within(&mut self, grace: Duration) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    bail!("{} ignored SIGTERM for {grace:?}", self.name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `iom --data-dir DIR ARGS...` and returns its output.
    pub fn try_cli(&self, args: &[&str]) -> Result<Output> {
        Command::new(iom_bin())
            .arg("--data-dir")
            .arg(&self.dir)
            .args(args)
            .env_remove("IOM_DATA_DIR")
            .output()
            .context("running iom")
    }

    /// Runs a CLI command that must succeed; returns stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = self.try_cli(args)?;
        if !out.status.success() {
            bail!(
                "`iom {}` on {} failed ({}): {}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a CLI command with `--json` that must succeed; returns the JSON.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a: Vec<&str> = args.to_vec();
        a.push("--json");
        let text = self.cli(&a)?;
        serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
    }

    /// This node's device id.
    pub fn device_id(&self) -> Result<String> {
        Ok(self.json(&["status"])?["device"]
            .as_str()
            .ok_or_else(|| anyhow!("no device in status"))?
            .to_string())
    }

    /// `iom ask PROMPT --no-wait --json EXTRA...`, which must exit 4 (queued); returns its JSON.
    pub fn ask_no_wait(&self, prompt: &str, extra: &[&str]) -> Result<Value> {
        let mut args = vec!["ask", prompt, "--no-wait", "--json"];
        args.extend(extra);
        let o = self.try_cli(&args)?;
        if o.status.code() != Some(4) {
            bail!(
                "`iom ask --no-wait` on {} exited {:?}, not 4: {}",
                self.name,
                o.status.code(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        serde_json::from_slice(&o.stdout).context("`iom ask --no-wait --json` printed no JSON")
    }

    /// Creates an invite code.
    pub fn invite(&self, admin: bool) -> Result<String> {
        let mut args = vec!["invite"];
        if admin {
            args.push("--admin");
        }
        Ok(self.json(&args)?["code"]
            .as_str()
            .ok_or_else(|| anyhow!("no code"))?
            .to_string())
    }
}

impl Drop for Node {
    /// Stops the node gracefully (SIGTERM, then SIGKILL after 10 s), so that it unmounts its
    /// workspace images and releases their loop devices; whatever is still mounted below the
    /// data dir then (a node that was SIGKILLed, or ignored SIGTERM) is unmounted here, before
    /// the data dir is deleted.
    fn drop(&mut self) {
        if let Err(e) = self.stop_within(Duration::from_secs(10)) {
            eprintln!("{e:#}");
        }
        for m in mounts_under(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&m).output();
        }
        let tail = log_tail(&self.log_text(), 300);
        if std::thread::panicking() {
            eprintln!("---- log of {} (last lines) ----\n{tail}", self.name);
        } else {
            DROPPED_LOGS.with(|l| l.borrow_mut().push((self.name.clone(), tail)));
        }
    }
}

thread_local! {
    /// Logs of nodes dropped in the current [`scenario`], shown if it fails.
    static DROPPED_LOGS: std::cell::RefCell<Vec<(String, String)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn log_tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a test body; if it returns an error, prints the logs of the nodes it used and panics
/// with the error (so a failing test shows what the nodes were doing).
pub fn scenario(body: impl FnOnce() -> Result<()>) {
    DROPPED_LOGS.with(|l| l.borrow_mut().clear());
    let started = Instant::now();
    let result = body();
    let logs = DROPPED_LOGS.with(|l| std::mem::take(&mut *l.borrow_mut()));
    eprintln!("scenario took {:.1} s", started.elapsed().as_secs_f64());
    if let Err(e) = result {
        for (name, log) in logs {
            eprintln!("---- log of {name} (last lines) ----\n{log}");
        }
        panic!("{e:#}");
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) with a pid we spawned; no memory is touched.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Mount points strictly below `dir` (workspace images a node mounted there).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    iom_node::agent::sandbox::quota::mount_points()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.starts_with(&dir) && m != &dir)
        .collect()
}

/// Polls `f` until it returns `Ok(true)` or the timeout passes.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    while Instant::now() < deadline {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(anyhow!(
        "timed out after {timeout:?} waiting for {what} (last error: {last_err:?})"
    ))
}

/// Where nodes' data dirs are made: under the target dir, not the shared `/tmp` (which other
/// tools on a shared machine may clean under our feet), as a canonical path.
fn test_data_root() -> Result<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let dir = target.join("iom-test-data");
    std::fs::create_dir_all(&dir)?;
    // Canonical, so no path built from it carries a `tests/..` (Chromium's file input refuses
    // paths that are not canonical).
    Ok(dir.canonicalize()?)
}

/// A TCP port that is free on loopback right now, and that this process has not handed out
/// before: the kernel may offer a port again as soon as the probing listener closes, and a lab
/// that takes several ports at once (the mail lab takes seven) must get seven different ones.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !RESERVED_PORTS.contains(&port) && !handed.contains(&port) {
            handed.push(port);
            return Ok(port);
        }
    }
}

/// A node started with `--http` on a fresh loopback port, holding the agent role, with an API
/// token: what the HTTP, WebSocket, browser and API-contract tests start from.
pub struct AgentHttpNode {
    /// The node (stopped on drop).
    pub node: Node,
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// A bearer token.
    pub token: String,
    /// The token's id (for `iom token revoke`).
    pub token_id: String,
}

/// A node serving HTTP on a fresh loopback port with `env` (no agent role); returns it with
/// its port.
pub fn http_node(name: &str, env: &[(&str, &str)]) -> Result<(Node, u16)> {
    let mut n = Node::with_env(name, env)?;
    let port = free_port()?;
    n.args
        .extend(["--http".to_string(), format!("127.0.0.1:{port}")]);
    n.start()?;
    Ok((n, port))
}

/// [`http_node`] that also takes the agent role (`env`: the fake Messages API's, usually) and
/// creates a token named after the node.
pub fn agent_http_node(name: &str, env: &[(&str, &str)]) -> Result<AgentHttpNode> {
    let (node, port) = http_node(name, env)?;
    let me = node.device_id()?;
    node.cli(&["agent", "assign", &me])?;
    let t = node.json(&["token", "create", "--name", name])?;
    let field = |k: &str| {
        t[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("`iom token create` printed no {k}: {t}"))
    };
    Ok(AgentHttpNode {
        token: field("token")?,
        token_id: field("id")?,
        base: format!("http://127.0.0.1:{port}"),
        node,
        port,
    })
}

/// Ports that fixtures stored in their data dirs (`tests/tests/compat.rs`: fixture A listens on
/// 33745, the address fixture B redials), so no other test's node may take them meanwhile.
pub const RESERVED_PORTS: &[u16] = &[33745];

/// A self-signed P-256 certificate and its key, made by `openssl req -x509` (the tests'
/// certificates come from a real TLS tool, not from our own code): `subject` as `/CN=...`,
/// `san` as openssl's `subjectAltName` value, `extra` more arguments (e.g. `-addext ...`).
pub fn self_signed_p256(
    cert: &Path,
    key: &Path,
    days: u32,
    subject: &str,
    san: &str,
    extra: &[&str],
) -> Result<()> {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", &days.to_string(), "-subj", subject])
        .args(["-addext", &format!("subjectAltName={san}")])
        .args(extra)
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()?;
    if !out.status.success() {
        bail!(
            "openssl req -x509 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// SHA-256 of a file, hex (by `sha256sum`, so the test does not trust our own hashing).
pub fn sha256_file(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    if !out.status.success() {
        bail!("sha256sum {} failed", path.display());
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no output from sha256sum"))
}

/// Writes `len` pseudo-random bytes (a fast xorshift stream, seeded) to `path`, streaming.
pub fn random_file(path: &Path, len: u64, seed: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x = seed | 1;
    let mut left = len;
    let mut buf = [0u8; 8192];
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// Ids of the containers (running or not) labelled as belonging to node `device`.
pub fn containers_of(device: &str) -> Vec<String> {
    Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=iom.node={device}")])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A JSON array of hex heads, sorted (heads are a set; the API gives them in its own order).
pub fn sorted_heads(v: &Value) -> Vec<String> {
    let mut heads: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h.as_str().map(str::to_string))
        .collect();
    heads.sort();
    heads
}

/// The documents of a document list (`iom doc list --json`, `GET /v1/docs`) with their
/// sorted heads.
pub fn heads_by_doc(list: &Value) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for d in list["documents"].as_array().into_iter().flatten() {
        let id = d["id"].as_str().unwrap_or_default().to_string();
        out.insert(id, sorted_heads(&d["heads"]));
    }
    out
}

/// A two-thread runtime for a test's in-process servers (the fake Messages API, receivers).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Waits until every node holds every document in `ids` with identical heads and content.
pub fn wait_converged(nodes: &[&Node], ids: &[String], timeout: Duration) -> Result<()> {
    let mut last = String::new();
    let r = wait_until("documents to converge", timeout, || {
        for id in ids {
            let mut first: Option<(Vec<String>, Value)> = None;
            for n in nodes {
                let Some(v) = n.doc_view(id)? else {
                    last = format!("{} does not have {id} yet", n.name);
                    return Ok(false);
                };
                match &first {
                    None => first = Some(v),
                    Some(f) if *f != v => {
                        last = format!(
                            "{id}: {} has heads {:?}, {} has {:?} (content {} vs {})",
                            nodes[0].name, f.0, n.name, v.0, f.1, v.1
                        );
                        return Ok(false);
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(true)
    });
    r.map_err(|e| anyhow!("{e}; last difference: {last}"))
}

/// Starts `n` nodes; the first creates the mesh and the others join it with invites.
pub fn mesh(names: &[&str]) -> Result<Vec<Node>> {
    let mut nodes = Vec::new();
    for name in names {
        nodes.push(Node::new(name)?);
    }
    join_mesh(nodes)
}

/// Starts the (new, stopped) `nodes`; the first creates the mesh and the others join it.
pub fn join_mesh(mut nodes: Vec<Node>) -> Result<Vec<Node>> {
    for n in &mut nodes {
        n.start()?;
    }
    for i in 1..nodes.len() {
        let code = nodes[0].invite(false)?;
        nodes[i].cli(&["join", &code])?;
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    // A third device meets the second through the first: the first tells the others where a
    // device is as soon as it trusts it (see docs/architecture.md, "Sessions").
    let started = Instant::now();
    wait_mesh(&refs, Duration::from_secs(30))?;
    eprintln!(
        "mesh of {} formed {:?} after the last join",
        nodes.len(),
        started.elapsed()
    );
    Ok(nodes)
}

/// Waits until every node trusts and is connected to every other node.
pub fn wait_mesh(nodes: &[&Node], timeout: Duration) -> Result<()> {
    let ids: Vec<String> = nodes.iter().map(|n| n.device_id()).collect::<Result<_>>()?;
    let mut missing = String::new();
    wait_until("every node to trust and reach every other", timeout, || {
        for n in nodes {
            for id in &ids {
                if n.device_id()? == *id {
                    continue;
                }
                if !n.trusts(id)? || !n.connected_to(id)? {
                    missing = format!("{} does not trust or reach {id}", n.name);
                    return Ok(false);
                }
            }
        }
        Ok(true)
    })
    .map_err(|e| anyhow!("{e}: {missing}"))
}
