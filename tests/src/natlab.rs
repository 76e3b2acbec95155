//! A NAT lab on one Linux machine: network namespaces, veth pairs, a bridge and iptables
//! MASQUERADE (TECH-NOTES §3.1).
//!
//! ```text
//! {p}-a (192.168.10.2) ── {p}-nat-a (192.168.10.1 | 10.99.0.2) ──┐
//!                                                               br0 in {p}-wan ── {p}-relay (10.99.0.1)
//! {p}-b (192.168.20.2) ── {p}-nat-b (192.168.20.1 | 10.99.0.3) ──┘
//! ```
//!
//! Each router masquerades its LAN behind its WAN address, forwards only replies inbound
//! (`ESTABLISHED,RELATED`), and *drops* (never rejects) unsolicited packets, like a home router;
//! there is no hairpinning. [`NatKind::PortRandomizing`] adds `--random-fully`, so the public
//! port of a mapping differs from the private one (a "symmetric" NAT): hole punching fails.
//!
//! Namespace names are `iomlab-<tag>-<pid>-<role>`, unique per test and process. [`NatLab`]
//! deletes its namespaces on drop, and [`NatLab::up`] first deletes leftovers of the same tag
//! whose process is gone (a crashed run).
//!
//! [`LabRelay`] runs `iom relay run` in the relay's namespace (its key is made before it starts,
//! so its address is known up front, and it can be killed and started again with the same
//! PeerId); [`LabNode`] runs `iom node run` in a host's namespace while the CLI talks to it from
//! the host (its API is a unix socket in the data dir); [`established_tcp`] reads the kernel's
//! TCP connections in a namespace, to check what a node claims against its sockets.
//!
//! Needs root, `ip` (iproute2) and `iptables`. Tests call [`require_netns`] first: it panics
//! with a clear message when they are missing (`IOM_SKIP_NETNS=1 scripts/test.sh` leaves these
//! tests out, and nextest reports them as skipped).

use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The relay's address on the "internet" segment.
pub const RELAY_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// NAT A's public address.
pub const NAT_A_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// NAT B's public address.
pub const NAT_B_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
/// Host A's private address.
pub const HOST_A_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 10, 2);
/// Host B's private address.
pub const HOST_B_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 20, 2);

/// The environment variable with which `scripts/test.sh` leaves the NAT lab tests out.
pub const SKIP_ENV: &str = "IOM_SKIP_NETNS";

/// Why the lab could not be built.
#[derive(Debug)]
pub enum NatLabError {
    /// Not running as root.
    NotRoot,
    /// A required program is not installed.
    MissingTool(&'static str),
    /// A command failed.
    Command {
        /// The command line.
        cmd: String,
        /// Its stderr.
        stderr: String,
    },
    /// A command could not be started.
    Io(String, std::io::Error),
}

impl std::fmt::Display for NatLabError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatLabError::NotRoot => write!(
                f,
                "the NAT lab needs root (network namespaces, iptables); run the tests as root \
                 (e.g. `sudo -E cargo test -p iom-tests --test relay_nat`) or run `{SKIP_ENV}=1 scripts/test.sh` to leave them out"
            ),
            NatLabError::MissingTool(tool) => write!(
                f,
                "the NAT lab needs `{tool}`; run scripts/install-deps.sh (iproute2, iptables) or set \
                 `{SKIP_ENV}=1 scripts/test.sh` to leave them out"
            ),
            NatLabError::Command { cmd, stderr } => write!(f, "`{cmd}` failed: {}", stderr.trim()),
            NatLabError::Io(cmd, e) => write!(f, "cannot run `{cmd}`: {e}"),
        }
    }
}

impl std::error::Error for NatLabError {}

/// What kind of NAT the two routers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Plain MASQUERADE: keeps source ports when it can (endpoint-independent mapping in
    /// practice), so hole punching works.
    Masquerade,
    /// MASQUERADE `--random-fully`: random public ports per mapping, so hole punching fails.
    PortRandomizing,
}

/// Panics with the reason unless the lab's prerequisites are here. There is no skipping
/// inside a test: `IOM_SKIP_NETNS=1 scripts/test.sh` leaves the lab's test binaries out, and
/// nextest reports them as skipped.
pub fn require_netns(test: &str) {
    if let Err(e) = check_prerequisites() {
        panic!("{test}: {e} (`{SKIP_ENV}=1 scripts/test.sh` leaves the NAT lab tests out)");
    }
}

/// Root, `ip` and `iptables` present.
pub fn check_prerequisites() -> Result<(), NatLabError> {
    if effective_uid() != Some(0) {
        return Err(NatLabError::NotRoot);
    }
    for tool in ["ip", "iptables"] {
        if find_program(tool).is_none() {
            return Err(NatLabError::MissingTool(tool));
        }
    }
    Ok(())
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Finds `name` on `PATH` (and in /usr/sbin, /sbin, where `ip` and `iptables` live).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Runs a command and returns its output, failing on a non-zero exit.
pub fn run(program: &str, args: &[&str]) -> Result<Output, NatLabError> {
    let cmd = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NatLabError::Io(cmd.clone(), e))?;
    if !out.status.success() {
        return Err(NatLabError::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out)
}

/// A running lab. Dropping it deletes its namespaces (and with them every veth, bridge,
/// iptables rule and process-visible network state).
#[derive(Debug)]
pub struct NatLab {
    prefix: String,
    kind: NatKind,
    up: bool,
}

const ROLES: [&str; 6] = ["wan", "relay", "nat-a", "nat-b", "a", "b"];

impl NatLab {
    /// Builds the lab for test `tag` (a short name, letters, digits and `-`).
    pub fn up(tag: &str, kind: NatKind) -> Result<NatLab, NatLabError> {
        check_prerequisites()?;
        remove_stale(tag);
        let mut lab = NatLab {
            prefix: format!("iomlab-{tag}-{}", std::process::id()),
            kind,
            up: false,
        };
        lab.teardown();
        lab.up = true;
        lab.build()?;
        Ok(lab)
    }

    /// The full name of namespace `role` (`wan`, `relay`, `nat-a`, `nat-b`, `a`, `b`).
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// The relay's namespace.
    pub fn relay_ns(&self) -> String {
        self.ns("relay")
    }

    /// Host A's namespace (behind NAT A).
    pub fn a_ns(&self) -> String {
        self.ns("a")
    }

    /// Host B's namespace (behind NAT B).
    pub fn b_ns(&self) -> String {
        self.ns("b")
    }

    /// The NAT kind the lab was built with.
    pub fn kind(&self) -> NatKind {
        self.kind
    }

    fn ip(&self, args: &[&str]) -> Result<(), NatLabError> {
        run("ip", args).map(|_| ())
    }

    fn in_ns(&self, role: &str, program: &str, args: &[&str]) -> Result<Output, NatLabError> {
        let ns = self.ns(role);
        let mut full = vec!["netns", "exec", ns.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    fn build(&self) -> Result<(), NatLabError> {
        for role in ROLES {
            let ns = self.ns(role);
            self.ip(&["netns", "add", &ns])?;
            self.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let wan = self.ns("wan");
        self.ip(&["-n", &wan, "link", "add", "br0", "type", "bridge"])?;
        self.ip(&["-n", &wan, "link", "set", "br0", "up"])?;
        self.wire("relay", "eth0", "10.99.0.1/24")?;
        self.wire("nat-a", "wan0", "10.99.0.2/24")?;
        self.wire("nat-b", "wan0", "10.99.0.3/24")?;
        self.lan("a", "nat-a", "192.168.10")?;
        self.lan("b", "nat-b", "192.168.20")?;
        Ok(())
    }

    /// A veth from namespace `role` (interface `ifname`, address `cidr`) to the wan bridge.
    fn wire(&self, role: &str, ifname: &str, cidr: &str) -> Result<(), NatLabError> {
        let ns = self.ns(role);
        let wan = self.ns("wan");
        let port = format!("{role}-port");
        self.ip(&[
            "link", "add", ifname, "netns", &ns, "type", "veth", "peer", "name", &port, "netns",
            &wan,
        ])?;
        self.ip(&["-n", &wan, "link", "set", &port, "master", "br0", "up"])?;
        self.ip(&["-n", &ns, "addr", "add", cidr, "dev", ifname])?;
        self.ip(&["-n", &ns, "link", "set", ifname, "up"])?;
        Ok(())
    }

    /// Host `host` on a LAN behind router `router`, subnet `net`.0/24 (router .1, host .2).
    fn lan(&self, host: &str, router: &str, net: &str) -> Result<(), NatLabError> {
        let h = self.ns(host);
        let r = self.ns(router);
        self.ip(&[
            "link", "add", "lan0", "netns", &r, "type", "veth", "peer", "name", "eth0", "netns", &h,
        ])?;
        self.ip(&[
            "-n",
            &r,
            "addr",
            "add",
            &format!("{net}.1/24"),
            "dev",
            "lan0",
        ])?;
        self.ip(&["-n", &r, "link", "set", "lan0", "up"])?;
        self.ip(&[
            "-n",
            &h,
            "addr",
            "add",
            &format!("{net}.2/24"),
            "dev",
            "eth0",
        ])?;
        self.ip(&["-n", &h, "link", "set", "eth0", "up"])?;
        self.ip(&[
            "-n",
            &h,
            "route",
            "add",
            "default",
            "via",
            &format!("{net}.1"),
        ])?;
        self.in_ns(router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let mut masquerade = vec![
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "wan0",
            "-j",
            "MASQUERADE",
        ];
        if self.kind == NatKind::PortRandomizing {
            masquerade.push("--random-fully");
        }
        self.in_ns(router, "iptables", &masquerade)?;
        let rules: [&[&str]; 4] = [
            &["-A", "FORWARD", "-i", "lan0", "-o", "wan0", "-j", "ACCEPT"],
            &[
                "-A",
                "FORWARD",
                "-i",
                "wan0",
                "-o",
                "lan0",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ],
            &["-A", "FORWARD", "-i", "wan0", "-o", "lan0", "-j", "DROP"],
            &[
                "-A",
                "INPUT",
                "-i",
                "wan0",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-j",
                "DROP",
            ],
        ];
        for rule in rules {
            self.in_ns(router, "iptables", rule)?;
        }
        Ok(())
    }

    /// A command that runs `program` inside namespace `ns` (`ip netns exec NS program`).
    pub fn command(&self, ns: &str, program: impl AsRef<Path>) -> Command {
        netns_command(ns, program)
    }

    /// Runs `program args` in namespace `ns` and captures its output (any exit status).
    pub fn exec(&self, ns: &str, program: &str, args: &[&str]) -> std::io::Result<Output> {
        self.command(ns, program)
            .args(args)
            .stdin(Stdio::null())
            .output()
    }

    fn teardown(&mut self) {
        for role in ROLES.iter().rev() {
            delete_netns(&self.ns(role));
        }
    }
}

/// Deletes namespace `ns` (and with it its interfaces, iptables rules and sockets), if it
/// exists.
pub fn delete_netns(ns: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

impl Drop for NatLab {
    fn drop(&mut self) {
        if self.up {
            self.teardown();
        }
    }
}

/// `ip netns exec NS program` (the program replaces `ip`, so the child's pid is the program's).
pub fn netns_command(ns: &str, program: impl AsRef<Path>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.arg("netns").arg("exec").arg(ns).arg(program.as_ref());
    cmd
}

/// Deletes namespaces `iomlab-<tag>-<pid>-*` whose process no longer exists (a crashed run's).
pub fn remove_stale(tag: &str) {
    let Ok(out) = run("ip", &["netns", "list"]) else {
        return;
    };
    let prefix = format!("iomlab-{tag}-");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

/// A child process whose stdout and stderr lines are collected as they arrive. Killed on drop.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    stdout: Arc<(Mutex<Vec<String>>, Condvar)>,
    stderr: Arc<Mutex<String>>,
}

/// Most stderr kept per process.
const MAX_STDERR: usize = 1 << 20;

impl Proc {
    /// Spawns `cmd` (its stdio is replaced by pipes) under the name `name` (for messages).
    pub fn spawn(name: &str, mut cmd: Command) -> std::io::Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let stderr: Arc<Mutex<String>> = Arc::default();
        if let Some(out) = child.stdout.take() {
            let sink = stdout.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let (lines, cv) = &*sink;
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                    cv.notify_all();
                }
            });
        }
        if let Some(mut err) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                    if s.len() < MAX_STDERR {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        Ok(Proc {
            name: name.to_string(),
            child,
            stdout,
            stderr,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for a stdout line matching `pred` (earlier lines count too).
    pub fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lines, cv) = &*self.stdout;
        let mut guard = lines.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(line) = guard.iter().find(|l| pred(l)) {
                return Some(line.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            guard = cv
                .wait_timeout(guard, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// All stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stdout and the tail of stderr, for assertion messages.
    pub fn dump(&self) -> String {
        let err = self.stderr();
        let tail = err
            .char_indices()
            .rev()
            .nth(8000)
            .map_or(err.as_str(), |(i, _)| &err[i..]);
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr (tail) ---\n{}",
            self.name,
            self.lines().join("\n"),
            self.name,
            tail
        )
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Kills the process and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP connection seen by the kernel in a namespace (`ss`): local and remote `IP:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConn {
    /// Local address.
    pub local: std::net::SocketAddr,
    /// Remote address.
    pub remote: std::net::SocketAddr,
}

/// The established TCP connections in namespace `ns`, as the kernel sees them
/// (`ip netns exec NS ss -Htn state established`). This asserts what a node's status claims
/// against the sockets themselves.
pub fn established_tcp(ns: &str) -> Result<Vec<TcpConn>, NatLabError> {
    let out = run(
        "ip",
        &["netns", "exec", ns, "ss", "-Htn", "state", "established"],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // Recv-Q Send-Q Local Peer (with `state established`, no State column).
            let n = cols.len();
            if n < 4 {
                return None;
            }
            Some(TcpConn {
                local: cols[n - 2].parse().ok()?,
                remote: cols[n - 1].parse().ok()?,
            })
        })
        .collect())
}

/// `iom relay run` in a lab namespace (or on loopback), with a stable data dir so that it can
/// be killed and started again with the same PeerId.
#[derive(Debug)]
pub struct LabRelay {
    /// The namespace; `None`: on the host (loopback).
    ns: Option<String>,
    ip: Ipv4Addr,
    port: u16,
    data_dir: PathBuf,
    flags: Vec<String>,
    proc: Option<Proc>,
    /// Logs of earlier runs (stderr), kept across restarts.
    old_logs: String,
    /// The relay's PeerId.
    pub peer_id: String,
}

/// The relay's TCP port in the lab.
pub const RELAY_PORT: u16 = 4001;

impl LabRelay {
    /// Prepares a relay in namespace `ns` with data dir `data_dir`, listening on TCP
    /// [`RELAY_IP`]:[`RELAY_PORT`] with rate limits off plus `extra` flags (e.g.
    /// `--allow-person P`). The key is created now, so the PeerId is known before the relay
    /// runs ([`addr`](Self::addr) can go into nodes' `--relay` first).
    pub fn new(ns: &str, data_dir: &Path, extra: &[&str]) -> anyhow::Result<LabRelay> {
        LabRelay::at(Some(ns), RELAY_IP, RELAY_PORT, data_dir, extra)
    }

    /// A relay on the host's loopback at `127.0.0.1:port` (for tests of nodes on loopback).
    pub fn loopback(port: u16, data_dir: &Path, extra: &[&str]) -> anyhow::Result<LabRelay> {
        LabRelay::at(None, Ipv4Addr::LOCALHOST, port, data_dir, extra)
    }

    fn at(
        ns: Option<&str>,
        ip: Ipv4Addr,
        port: u16,
        data_dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<LabRelay> {
        std::fs::create_dir_all(data_dir)?;
        let key = iom_node::relay::load_or_create_relay_key(data_dir)
            .map_err(|e| anyhow::anyhow!("relay key: {e}"))?;
        let mut flags: Vec<String> = vec![
            "--listen".into(),
            format!("/ip4/{ip}/tcp/{port}"),
            "--no-rate-limits".into(),
        ];
        flags.extend(extra.iter().map(|s| (*s).to_string()));
        Ok(LabRelay {
            ns: ns.map(str::to_string),
            ip,
            port,
            data_dir: data_dir.to_path_buf(),
            flags,
            proc: None,
            old_logs: String::new(),
            peer_id: key.public().to_peer_id().to_string(),
        })
    }

    /// Adds `iom relay run` flags for the next [`start`](Self::start).
    pub fn push_flags(&mut self, extra: &[&str]) {
        self.flags.extend(extra.iter().map(|s| (*s).to_string()));
    }

    /// The address nodes pass to `--relay`.
    pub fn addr(&self) -> String {
        format!("/ip4/{}/tcp/{}/p2p/{}", self.ip, self.port, self.peer_id)
    }

    /// Starts the relay and waits for its address line; checks the PeerId is the stable one.
    pub fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.proc.is_none(), "relay already running");
        let mut cmd = match &self.ns {
            Some(ns) => netns_command(ns, crate::harness::iom_bin()),
            None => Command::new(crate::harness::iom_bin()),
        };
        cmd.arg("--json")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["relay", "run"])
            .args(&self.flags)
            .env(
                "IOM_LOG",
                std::env::var("IOM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1");
        let proc = Proc::spawn("relay", cmd)?;
        let line = proc.wait_line(Duration::from_secs(30), |l| l.contains("\"peer_id\""));
        let Some(line) = line else {
            let dump = proc.dump();
            anyhow::bail!("the relay printed no address line\n{dump}");
        };
        let v: serde_json::Value = serde_json::from_str(&line)?;
        anyhow::ensure!(
            v["peer_id"].as_str() == Some(self.peer_id.as_str()),
            "relay came up as {} but its key says {}",
            v["peer_id"],
            self.peer_id
        );
        self.proc = Some(proc);
        Ok(())
    }

    /// SIGKILLs the relay (a crash: no goodbye to anyone).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
            self.old_logs.push_str(&p.stderr());
        }
    }

    /// The relay's log (stderr) over all its runs.
    pub fn log(&self) -> String {
        let mut log = self.old_logs.clone();
        if let Some(p) = &self.proc {
            log.push_str(&p.stderr());
        }
        log
    }

    /// Whether the relay process is running.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| !p.exited())
    }
}

impl Drop for LabRelay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let all: Vec<&str> = log.lines().collect();
            eprintln!(
                "---- log of relay (last lines) ----\n{}",
                all[all.len().saturating_sub(200)..].join("\n")
            );
        }
    }
}

/// The TCP port nodes listen on inside their namespaces.
pub const NODE_PORT: u16 = 4100;

/// An `iom node run` inside a lab namespace. The CLI runs on the host against the node's data
/// dir (the local API is a unix socket in the data dir, which network namespaces do not
/// separate), so every [`Node`](crate::harness::Node) helper works through `Deref`.
pub struct LabNode {
    node: crate::harness::Node,
    ns: String,
    child: Option<Child>,
}

impl std::fmt::Debug for LabNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabNode")
            .field("name", &self.node.name)
            .field("ns", &self.ns)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for LabNode {
    type Target = crate::harness::Node;
    fn deref(&self) -> &crate::harness::Node {
        &self.node
    }
}

impl LabNode {
    /// A node named `name` in namespace `ns`, listening on TCP `ip`:[`NODE_PORT`], mDNS off,
    /// reserving on each relay in `relays`. Not started.
    pub fn new(name: &str, ns: &str, ip: Ipv4Addr, relays: &[String]) -> anyhow::Result<LabNode> {
        let mut node = crate::harness::Node::new(name)?;
        let mut args: Vec<String> = vec![
            "--listen".into(),
            format!("/ip4/{ip}/tcp/{NODE_PORT}"),
            "--no-mdns".into(),
            "--name".into(),
            name.into(),
        ];
        for r in relays {
            args.push("--relay".into());
            args.push(r.clone());
        }
        node.args = args;
        Ok(LabNode {
            node,
            ns: ns.to_string(),
            child: None,
        })
    }

    /// Sets an environment variable for the next [`start`](Self::start) (e.g. `IOM_LOG`).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.node.env.retain(|(k, _)| k != key);
        self.node.env.push((key.to_string(), value.to_string()));
    }

    /// Moves the node's data dir to `dir` (e.g. onto a small tmpfs) before its first start;
    /// the log stays where it was.
    pub fn set_data_dir(&mut self, dir: &Path) {
        self.node.dir = dir.to_path_buf();
    }

    /// Adds `iom node run` arguments for the next [`start`](Self::start) (e.g. `--https ADDR`).
    pub fn push_args(&mut self, args: &[&str]) {
        self.node.args.extend(args.iter().map(|s| (*s).to_string()));
    }

    /// The namespace the node runs in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Starts `iom node run` in the namespace and waits until its API answers.
    pub fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} already running", self.node.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.node.log)?;
        let mut cmd = netns_command(&self.ns, crate::harness::iom_bin());
        self.node.configure_run(&mut cmd, log);
        let mut child = cmd.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "{} exited at start ({status}); log:\n{}",
                    self.node.name,
                    self.node.log_text()
                );
            }
            if self
                .node
                .try_cli(&["status", "--json"])
                .is_ok_and(|o| o.status.success())
            {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!(
                    "{} did not come up; log:\n{}",
                    self.node.name,
                    self.node.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the node was started and has exited since by itself ([`kill`](Self::kill)
    /// forgets the process, so a killed node does not count).
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// SIGKILLs the node.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The addresses in `iom status --json` `listen`.
    pub fn listen(&self) -> anyhow::Result<Vec<String>> {
        self.node.listen_addrs()
    }

    /// The node's relay circuit addresses (`.../p2p-circuit`) in `status`.
    pub fn circuit_addrs(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .listen()?
            .into_iter()
            .filter(|a| a.contains("/p2p-circuit"))
            .collect())
    }

    /// `peers[]` of `iom status --json` for `device`: (`connection`, `connections`).
    pub fn peer_link(&self, device: &str) -> anyhow::Result<Option<(String, u64)>> {
        let status = self.node.status()?;
        Ok(status["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["device"].as_str() == Some(device))
            .map(|p| {
                (
                    p["connection"].as_str().unwrap_or_default().to_string(),
                    p["connections"].as_u64().unwrap_or(0),
                )
            }))
    }

    /// The kernel's established TCP connections in the node's namespace.
    pub fn tcp_conns(&self) -> anyhow::Result<Vec<TcpConn>> {
        established_tcp(&self.ns).map_err(|e| anyhow::anyhow!("{e}"))
    }
}

impl Drop for LabNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns a thread that enters namespace `ns` (setns(2), network only) and then runs `f`.
/// Sockets the thread creates belong to the namespace, and stay there when other threads of
/// this process use them: this is how the test process (in the root namespace) serves or
/// dials inside a lab namespace. Fails if the thread cannot enter the namespace.
pub fn spawn_in_netns<T, F>(ns: &str, f: F) -> anyhow::Result<std::thread::JoinHandle<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    use std::os::fd::AsRawFd;
    let path = Path::new("/run/netns").join(ns);
    let file = std::fs::File::open(&path)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let handle = std::thread::spawn(move || {
        // SAFETY: `file` is an open namespace file for the call's whole duration;
        // CLONE_NEWNET only changes this thread's network namespace.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        drop(file);
        if rc != 0 {
            let _ = tx.send(Err(std::io::Error::last_os_error().to_string()));
            // The caller gets the error; `f` never runs outside the namespace.
            return None;
        }
        let _ = tx.send(Ok(()));
        Some(f())
    });
    match rx.recv() {
        Ok(Ok(())) => Ok(std::thread::spawn(move || {
            handle
                .join()
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("the thread in the namespace panicked"))
        })),
        Ok(Err(e)) => anyhow::bail!("setns into {ns}: {e}"),
        Err(_) => anyhow::bail!("the thread entering {ns} died"),
    }
}

/// Runs `f` on a thread inside namespace `ns` and returns its result (see
/// [`spawn_in_netns`]).
pub fn in_netns<T, F>(ns: &str, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    spawn_in_netns(ns, f)?
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in {ns} panicked"))
}

/// A TCP forwarder from `127.0.0.1:PORT` in the root namespace to `target` inside a lab
/// namespace (each connection is dialled from a thread in the namespace), e.g. to drive a
/// chromedriver that runs, with its browser, behind a lab NAT. Stops and closes every
/// connection on drop.
#[derive(Debug)]
pub struct NetnsForward {
    port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

type DialReply = std::sync::mpsc::Sender<std::io::Result<std::net::TcpStream>>;

impl NetnsForward {
    /// Listens on a fresh loopback port and forwards to `target` in namespace `ns`.
    pub fn start(ns: &str, target: std::net::SocketAddr) -> anyhow::Result<NetnsForward> {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (dial_tx, dial_rx) = std::sync::mpsc::channel::<DialReply>();
        spawn_in_netns(ns, move || {
            for reply in dial_rx {
                let _ = reply.send(std::net::TcpStream::connect_timeout(
                    &target,
                    Duration::from_secs(10),
                ));
            }
        })?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (stop2, conns2) = (stop.clone(), conns.clone());
        let accept = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(_) => break,
                };
                let (reply_tx, reply_rx) = std::sync::mpsc::channel();
                if dial_tx.send(reply_tx).is_err() {
                    break;
                }
                let Ok(Ok(upstream)) = reply_rx.recv() else {
                    continue;
                };
                if client.set_nonblocking(false).is_err() {
                    continue;
                }
                let pipes = (|| {
                    let mut list = conns2.lock().unwrap_or_else(|e| e.into_inner());
                    list.push(client.try_clone()?);
                    list.push(upstream.try_clone()?);
                    Ok::<_, std::io::Error>([
                        (client.try_clone()?, upstream.try_clone()?),
                        (upstream, client),
                    ])
                })();
                let Ok(pipes) = pipes else { continue };
                for (mut from, mut to) in pipes {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Ok(NetnsForward {
            port,
            stop,
            conns,
            accept: Some(accept),
        })
    }

    /// The loopback port in the root namespace.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for NetnsForward {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Kills (SIGKILL) every process still running in namespace `ns` (`ip netns pids`), e.g. the
/// browser a killed chromedriver leaves behind. Only for namespaces the test made itself.
pub fn kill_netns_pids(ns: &str) {
    let Ok(out) = run("ip", &["netns", "pids", ns]) else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if pid.parse::<u32>().is_ok_and(|p| p != std::process::id()) {
            let _ = Command::new("kill")
                .args(["-KILL", pid])
                .stderr(Stdio::null())
                .status();
        }
    }
}
