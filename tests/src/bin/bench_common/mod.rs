//! Helpers shared by the `bench-*` binaries: the release `iom` binary, the machine line,
//! percentiles, precise node start-up, RSS, and bulk document creation through the API.
//!
//! This directory has no `main.rs`, so cargo does not build it as a binary of its own; each
//! benchmark includes it with `mod bench_common;`.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use iom_node::api::client::ApiClient;
use iom_tests::harness::{Node, iom_bin};
use serde_json::{Value, json};

pub mod iom_sync;

/// Points the harness at `target/release/iom` unless `IOM_BIN` is set, and checks it exists.
pub fn use_release_bin() -> Result<PathBuf> {
    if std::env::var_os("IOM_BIN").is_none() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        #[allow(unsafe_code)]
        // SAFETY: called at the very start of main, before any other thread exists.
        unsafe {
            std::env::set_var("IOM_BIN", target.join("release/iom"));
        }
    }
    let bin = iom_bin().to_path_buf();
    if !bin.exists() {
        bail!(
            "{} is missing; build it first with `cargo build --release -p iom-cli`",
            bin.display()
        );
    }
    Ok(bin)
}

/// Prints what the numbers were measured on.
pub fn print_machine(bin: &Path) {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("# machine: {cpus} cpus ({model}), loadavg {}", load.trim());
    println!("# iom binary: {}", bin.display());
}

/// The `p`-th percentile (0..=100, nearest rank) of `v` (sorted in place).
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A multi-threaded tokio runtime for the API clients.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// A node process started by hand (not through [`Node::start`]) so that start-up can be timed
/// precisely. Sends SIGTERM and waits on drop.
pub struct Spawned {
    /// The process.
    pub child: Child,
}

impl Spawned {
    /// SIGTERM and wait for the exit.
    pub fn stop(mut self) -> Result<()> {
        term_and_wait(&mut self.child)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = term_and_wait(&mut self.child);
    }
}

fn term_and_wait(child: &mut Child) -> Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on a pid we spawned; no memory is touched.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("node ignored SIGTERM for 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Spawns `iom node run` on `node`'s data dir (the node must be stopped) and returns the
/// process and the time from spawn until `GET /v1/status` answers (polled every 2 ms).
pub fn spawn_timed(rt: &tokio::runtime::Runtime, node: &Node) -> Result<(Spawned, Duration)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&node.log)?;
    let client = ApiClient::new(&node.dir)?;
    let mut cmd = Command::new(iom_bin());
    cmd.arg("--data-dir")
        .arg(&node.dir)
        .args(["node", "run"])
        .args(&node.args)
        .env("IOM_LOG", "warn")
        .env_remove("ANTHROPIC_API_KEY")
        .stdout(Stdio::null())
        .stderr(log);
    let t0 = Instant::now();
    let mut spawned = Spawned {
        child: cmd.spawn().context("spawning iom node run")?,
    };
    loop {
        if rt.block_on(client.get("/v1/status")).is_ok() {
            return Ok((spawned, t0.elapsed()));
        }
        if let Some(status) = spawned.child.try_wait()? {
            bail!("node exited at start ({status}):\n{}", node.log_text());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("node did not answer within 60 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// CPU time (user + system) a process has used so far: `pid`, or this process for `None`.
pub fn cpu_time(pid: Option<u32>) -> Result<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(&path)?;
    // The command name (field 2) may hold spaces: count the fields after its closing paren.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("no command name in {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no field {} in {path}", i + 3))
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the paren; 100 ticks a second.
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_millis(total * 10))
}

/// The node's `iom_docs_loaded_total` (documents loaded from its store: cache misses).
pub fn docs_loaded(rt: &tokio::runtime::Runtime, client: &ApiClient) -> Result<u64> {
    let text = rt.block_on(async {
        client
            .get_raw("/metrics")
            .await?
            .text()
            .await
            .map_err(anyhow::Error::from)
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("iom_docs_loaded_total "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("no iom_docs_loaded_total in /metrics"))
}

/// The content of bulk document `i`: `fields` fields, each written as its own change by
/// `POST /v1/docs`, so a document has `1 + fields` changes.
pub fn bulk_content(i: usize, fields: usize) -> Value {
    let mut m = serde_json::Map::new();
    for f in 0..fields {
        m.insert(format!("f{f}"), json!(format!("document {i} field {f}")));
    }
    Value::Object(m)
}

/// Creates `count` documents with `fields` content fields each through `POST /v1/docs`,
/// `concurrency` requests at a time. Returns the ids.
pub fn create_docs(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    count: usize,
    fields: usize,
    concurrency: usize,
) -> Result<Vec<String>> {
    let client = Arc::new(ApiClient::new(dir)?);
    rt.block_on(async move {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let client = client.clone();
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        return Ok::<_, anyhow::Error>(ids);
                    }
                    let body = json!({ "content": bulk_content(i, fields) });
                    let r = client.post("/v1/docs", &body).await?;
                    ids.push(
                        r["id"]
                            .as_str()
                            .ok_or_else(|| anyhow!("no id in {r}"))?
                            .to_string(),
                    );
                }
            }));
        }
        let mut ids = Vec::with_capacity(count);
        for t in tasks {
            ids.extend(t.await??);
        }
        Ok(ids)
    })
}

/// Every document on a node as `id → heads`, from `GET /v1/docs`.
pub fn doc_heads(
    rt: &tokio::runtime::Runtime,
    client: &ApiClient,
) -> Result<std::collections::BTreeMap<String, Vec<String>>> {
    Ok(iom_tests::harness::heads_by_doc(
        &rt.block_on(client.get("/v1/docs"))?,
    ))
}

/// Writes `mib` MiB of pseudo-random bytes (xorshift; not compressible) to `path`.
pub fn random_file(path: &Path, mib: usize) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for c in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    f.get_ref().sync_all()?;
    Ok(())
}

/// Runs a command and returns its wall time; fails if it fails.
pub fn time_cmd(cmd: &mut Command) -> Result<(Duration, String)> {
    let t0 = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// An env/arg-configurable number.
pub fn param(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether section `name` was asked for (no arguments = every section).
pub fn wants(name: &str) -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    args.is_empty() || args.iter().any(|a| a == name)
}
