//! Real `iom` processes in temporary data dirs: start, stop (SIGTERM or SIGKILL), restart,
//! and run CLI commands against them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// Path of the `iom` binary, built once per test process if missing.
pub fn iom_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        let bin = target.join("debug/iom");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "iom-cli"])
            .current_dir(&root)
            .status();
        match status {
            Ok(s) if s.success() => {}
            other => panic!("building the iom binary failed: {other:?}"),
        }
        bin
    })
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
    /// A node with a fresh data dir, listening on loopback TCP, mDNS off.
    pub fn new(name: &str) -> Result<Node> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("iom-{name}-"))
            .tempdir()?;
        let dir = tmp.path().to_path_buf();
        Ok(Node {
            name: name.into(),
            log: dir.join("node.log"),
            dir,
            _tmp: Some(tmp),
            child: None,
            args: vec![
                "--listen".into(),
                "/ip4/127.0.0.1/tcp/0".into(),
                "--no-mdns".into(),
                "--name".into(),
                name.into(),
            ],
            env: Vec::new(),
        })
    }

    /// Starts `iom node run` and waits until its API answers.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("{} already running", self.name);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(iom_bin());
        cmd.arg("--data-dir")
            .arg(&self.dir)
            .args(["node", "run"])
            .args(&self.args)
            .env(
                "IOM_LOG",
                std::env::var("IOM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("ANTHROPIC_API_KEY")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
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
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    bail!("{} ignored SIGTERM for 15 s", self.name);
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
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log_text());
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) with a pid we spawned; no memory is touched.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
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

/// Starts `n` nodes; the first creates the mesh and the others join it with invites.
pub fn mesh(names: &[&str]) -> Result<Vec<Node>> {
    let mut nodes = Vec::new();
    for name in names {
        let mut n = Node::new(name)?;
        n.start()?;
        nodes.push(n);
    }
    for i in 1..nodes.len() {
        let code = nodes[0].invite(false)?;
        nodes[i].cli(&["join", &code])?;
    }
    Ok(nodes)
}
