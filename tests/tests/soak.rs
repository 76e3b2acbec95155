//! The soak with faults (issue 15): five real `iom` nodes, each in its own network namespace
//! on one switch (`iom_tests::soaklab`), one of them the agent (its model is the fake Messages
//! API in this process, reached over a link of its own), run for `IOM_SOAK_SECS` (600 in CI)
//! under a seeded random schedule of faults and work:
//!
//! - faults: partitions and heals (iptables `DROP` between two groups, or around one node),
//!   SIGKILLs and restarts (at most two nodes down at once, the agent included), clock skew of
//!   up to ±5 minutes (each start of a node gets a new offset of its whole wall clock, through
//!   libfaketime), and a full disk for a while on one node (its data dir is a small tmpfs,
//!   filled by another program to below the node's `[storage] reserve_mb`);
//! - work: document creations and edits (each edit writes a key of its own, so every
//!   acknowledged write has one value to look for), blob adds, and asks (a few with a bash tool
//!   call, run in the Docker sandbox) from any node.
//!
//! At the end every fault is healed and, within a generous bound, every pair of nodes must
//! hold equal inventory roots and equal blob lists; then every acknowledged write is read back
//! on every node (documents by content, blobs byte for byte), every ask is answered exactly once
//! (one reply, one model call per turn) or failed with a reason and never answered, and no
//! node's log shows a panic. The figures (rounds, partitions, kills, writes, asks, convergence
//! time) are printed; docs/benchmarks.md has a 10-minute run's.
//!
//! `IOM_SOAK_SEED` replays a schedule (the seed is printed first); `IOM_SOAK_SECS=60` is a
//! short run for development, `IOM_SOAK_SECS=3600` the documented long one. Needs root
//! (namespaces, iptables, tmpfs), libfaketime and Docker; see `natlab::require_netns`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig};
use iom_tests::harness::{random_file, scenario, wait_mesh, wait_until};
use iom_tests::natlab::{self, LabNode};
use iom_tests::soaklab::{ROOT_LINK_IP, StarLab};
use iom_tests::tmpfs::{Tmpfs, fill};
use serde_json::{Value, json};

/// Nodes in the soak.
const NODES: usize = 5;
/// The node that holds the agent role (and created the mesh).
const AGENT: usize = 0;
/// The node whose disk fills now and then.
const DISK_NODE: usize = 4;
/// Largest clock offset, either way.
const MAX_SKEW_SECS: i64 = 300;
/// At most this many documents are created; later writes edit them.
const MAX_DOCS: usize = 40;
/// The full-disk node's tmpfs and its reserve; a fill leaves less than the reserve free.
const TMPFS_MB: u64 = 320;
const RESERVE_MB: u64 = 64;
const FILL_LEAVES_MB: u64 = 24;

#[test]
fn soak_with_partitions_kills_skew_and_a_full_disk_converges_and_loses_nothing() {
    natlab::require_netns("soak");
    scenario(body);
}

/// A small seeded generator (SplitMix64): the same seed, the same schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    fn secs(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo * 1000, hi * 1000))
    }
}

/// What the soak did, printed at the end (and recorded in docs/benchmarks.md).
#[derive(Debug, Default)]
struct Figures {
    rounds: u64,
    partitions: u64,
    heals: u64,
    kills: u64,
    restarts: u64,
    skewed_starts: u64,
    disk_full_periods: u64,
    doc_creates: u64,
    doc_edits: u64,
    blobs: u64,
    blob_bytes: u64,
    asks: u64,
    asks_with_tools: u64,
    asks_done: u64,
    asks_failed: u64,
    refused: BTreeMap<String, u64>,
    ask_failures: BTreeMap<String, u64>,
    convergence: Duration,
}

/// A document and the writes to it that were acknowledged.
struct DocRec {
    id: String,
    /// Key and value of every acknowledged write (creation included).
    fields: Vec<(String, u64)>,
}

/// An acknowledged blob add.
struct BlobRec {
    hash: String,
    /// The file that was added (kept, to compare what every node serves byte for byte).
    src: PathBuf,
}

/// An acknowledged ask.
struct AskRec {
    node: usize,
    conversation: String,
    request_id: String,
    marker: String,
    tool: bool,
}

/// The fake Messages API on its own runtime.
struct Fake {
    server: Option<FakeAnthropic>,
    rt: tokio::runtime::Runtime,
}

impl Fake {
    fn server(&self) -> Result<&FakeAnthropic> {
        self.server
            .as_ref()
            .ok_or_else(|| anyhow!("the fake Messages API is gone"))
    }

    /// Model calls whose messages mention `marker`.
    fn calls_with(&self, marker: &str) -> Result<usize> {
        Ok(self
            .server()?
            .requests()
            .iter()
            .filter(|r| r.body.to_string().contains(marker))
            .count())
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _guard = self.rt.enter();
        drop(self.server.take());
    }
}

/// The running soak. Field order is drop order: nodes go before their tmpfs and namespaces.
struct Soak {
    nodes: Vec<LabNode>,
    _disk: Tmpfs,
    lab: StarLab,
    fake: Fake,
    tmp: tempfile::TempDir,
    faketime: PathBuf,
    filler: PathBuf,
    rng: Rng,
    seed: u64,
    t0: Instant,
    skew: Vec<i64>,
    down_until: Vec<Option<Instant>>,
    partition_until: Option<Instant>,
    disk_until: Option<Instant>,
    /// When the last full-disk period ended (none yet: the first may come after 20 s).
    last_disk_end: Option<Instant>,
    seq: u64,
    docs: Vec<DocRec>,
    blobs: Vec<BlobRec>,
    asks: Vec<AskRec>,
    fig: Figures,
}

fn env_u64(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(None),
    }
}

/// libfaketime's preload library (the multi-threaded build), or a clear error.
fn find_faketime() -> Result<PathBuf> {
    for dir in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ] {
        let p = Path::new(dir).join("faketime/libfaketimeMT.so.1");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("the soak skews clocks with libfaketime; install it (scripts/install-deps.sh: faketime)")
}

fn body() -> Result<()> {
    let secs = env_u64("IOM_SOAK_SECS")?.unwrap_or(600);
    let converge_bound = Duration::from_secs(env_u64("IOM_SOAK_CONVERGE_SECS")?.unwrap_or(300));
    let seed = match env_u64("IOM_SOAK_SEED")? {
        Some(s) => s,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    eprintln!("soak: seed {seed} (replay with IOM_SOAK_SEED={seed}), {secs} s of faults and work");
    let mut soak = Soak::up(seed)?;
    soak.run(Duration::from_secs(secs))?;
    soak.heal_everything()?;
    soak.converge(converge_bound)?;
    soak.check()?;
    soak.print_figures();
    for n in &mut soak.nodes {
        n.kill();
    }
    Ok(())
}

impl Soak {
    fn up(seed: u64) -> Result<Soak> {
        let faketime = find_faketime()?;
        let lab = StarLab::up("soak", NODES).map_err(|e| anyhow!("{e}"))?;
        lab.link_to_root(AGENT).map_err(|e| anyhow!("{e}"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let key = format!("sk-ant-soak-{seed:x}");
        let server = rt.block_on(FakeAnthropic::start(FakeConfig {
            api_key: key.clone(),
            instant: false,
            addr: (ROOT_LINK_IP, 0).into(),
        }))?;
        let url = server.url().to_string();
        let fake = Fake {
            server: Some(server),
            rt,
        };
        let disk = Tmpfs::mount(TMPFS_MB)?;
        let tmp = tempfile::tempdir()?;
        let mut soak = Soak {
            nodes: Vec::new(),
            filler: disk.dir.join("filler"),
            _disk: disk,
            lab,
            fake,
            tmp,
            faketime,
            rng: Rng(seed),
            seed,
            t0: Instant::now(),
            skew: vec![0; NODES],
            down_until: vec![None; NODES],
            partition_until: None,
            disk_until: None,
            last_disk_end: None,
            seq: 0,
            docs: Vec::new(),
            blobs: Vec::new(),
            asks: Vec::new(),
            fig: Figures::default(),
        };
        for i in 0..NODES {
            let mut n = LabNode::new(&format!("s{i}"), &soak.lab.ns(i), StarLab::ip(i), &[])?;
            if i == AGENT {
                n.set_env("ANTHROPIC_API_KEY", &key);
                n.set_env("ANTHROPIC_BASE_URL", &url);
            }
            if i == DISK_NODE {
                let dir = soak._disk.dir.join("data");
                std::fs::create_dir_all(&dir)?;
                std::fs::write(
                    dir.join("config.toml"),
                    format!("[storage]\nreserve_mb = {RESERVE_MB}\n"),
                )?;
                n.set_data_dir(&dir);
            }
            soak.nodes.push(n);
        }
        // Pairing happens with the clocks already apart.
        for i in 0..NODES {
            let skew = soak.new_skew();
            soak.start(i, skew)?;
        }
        for i in 1..NODES {
            let code = soak.nodes[AGENT].invite(false)?;
            soak.nodes[i].cli(&["join", &code])?;
        }
        let refs: Vec<&iom_tests::harness::Node> = soak.nodes.iter().map(|n| &**n).collect();
        wait_mesh(&refs, Duration::from_secs(120))?;
        let agent_name = soak.nodes[AGENT].name.clone();
        soak.nodes[AGENT].json(&["agent", "assign", &agent_name])?;
        let agent_id = soak.nodes[AGENT].device_id()?;
        wait_until(
            "every node to see the agent",
            Duration::from_secs(60),
            || {
                for n in &soak.nodes {
                    if n.json(&["agent", "status"])?["agent"].as_str() != Some(agent_id.as_str()) {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?;
        soak.log(&format!(
            "mesh of {NODES} up (skews {:?} s); agent {agent_name}",
            soak.skew
        ));
        soak.t0 = Instant::now();
        Ok(soak)
    }

    fn log(&self, what: &str) {
        eprintln!("[{:7.1} s] {what}", self.t0.elapsed().as_secs_f64());
    }

    /// A new clock offset: none a quarter of the time, else up to ±5 minutes.
    fn new_skew(&mut self) -> i64 {
        if self.rng.chance(0.25) {
            0
        } else {
            self.rng.range(0, 2 * MAX_SKEW_SECS as u64) as i64 - MAX_SKEW_SECS
        }
    }

    /// Starts node `i` with its wall clock moved by `skew` seconds (libfaketime; monotonic
    /// time is left alone, as a real skewed clock leaves it).
    fn start(&mut self, i: usize, skew: i64) -> Result<()> {
        let lib = self.faketime.display().to_string();
        let n = &mut self.nodes[i];
        n.set_env("LD_PRELOAD", &lib);
        n.set_env("FAKETIME", &format!("{skew:+}"));
        n.set_env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        n.start()
            .with_context(|| format!("starting s{i} (skew {skew:+} s)"))?;
        self.skew[i] = skew;
        if skew != 0 {
            self.fig.skewed_starts += 1;
        }
        Ok(())
    }

    fn running(&self) -> Vec<usize> {
        (0..NODES)
            .filter(|&i| self.down_until[i].is_none())
            .collect()
    }

    fn pick_running(&mut self) -> Option<usize> {
        let up = self.running();
        if up.is_empty() {
            return None;
        }
        Some(up[self.rng.below(up.len() as u64) as usize])
    }

    fn run(&mut self, length: Duration) -> Result<()> {
        let end = Instant::now() + length;
        while Instant::now() < end {
            self.fig.rounds += 1;
            self.end_faults(false)?;
            self.start_faults(length)?;
            self.check_alive()?;
            match self.rng.below(10) {
                0..=4 => self.doc_write()?,
                5..=7 => self.blob_add()?,
                _ => self.ask()?,
            }
            std::thread::sleep(Duration::from_millis(self.rng.range(100, 600)));
        }
        self.log(&format!("{} rounds done", self.fig.rounds));
        Ok(())
    }

    /// A node that should run but exited by itself is a failure (a crash, not a fault).
    fn check_alive(&mut self) -> Result<()> {
        for i in self.running() {
            if self.nodes[i].has_exited() {
                bail!("s{i} exited by itself; log:\n{}", self.nodes[i].log_text());
            }
        }
        Ok(())
    }

    /// Ends the faults that are due (all of them with `all`).
    fn end_faults(&mut self, all: bool) -> Result<()> {
        let now = Instant::now();
        let due = |t: Option<Instant>| t.is_some_and(|t| all || t <= now);
        for i in 0..NODES {
            if due(self.down_until[i]) {
                let skew = self.new_skew();
                self.start(i, skew)?;
                self.down_until[i] = None;
                self.fig.restarts += 1;
                self.log(&format!("restart s{i} (skew {skew:+} s)"));
            }
        }
        if due(self.partition_until) {
            self.lab.heal().map_err(|e| anyhow!("{e}"))?;
            self.partition_until = None;
            self.fig.heals += 1;
            self.log("heal");
        }
        if due(self.disk_until) {
            std::fs::remove_file(&self.filler)?;
            self.disk_until = None;
            self.last_disk_end = Some(now);
            self.log(&format!("disk of s{DISK_NODE} freed"));
        }
        Ok(())
    }

    fn start_faults(&mut self, length: Duration) -> Result<()> {
        let now = Instant::now();
        if self.partition_until.is_none() && self.rng.chance(0.05) {
            let mut side = vec![false; NODES];
            let what = if self.rng.chance(0.5) {
                let lone = self.rng.below(NODES as u64) as usize;
                side[lone] = true;
                format!("s{lone} cut off")
            } else {
                while side.iter().all(|&s| s) || side.iter().all(|&s| !s) {
                    for s in side.iter_mut() {
                        *s = self.rng.chance(0.5);
                    }
                }
                let group = |v: bool| -> Vec<String> {
                    (0..NODES)
                        .filter(|&i| side[i] == v)
                        .map(|i| format!("s{i}"))
                        .collect()
                };
                format!("{:?} | {:?}", group(true), group(false))
            };
            let lasts = self.rng.secs(5, 45);
            self.lab.partition(&side).map_err(|e| anyhow!("{e}"))?;
            self.partition_until = Some(now + lasts);
            self.fig.partitions += 1;
            self.log(&format!("partition {what} for {lasts:.0?}"));
        }
        if self.running().len() > NODES - 2
            && self.rng.chance(0.035)
            && let Some(i) = self.pick_running()
        {
            self.nodes[i].kill();
            let down = self.rng.secs(2, 20);
            self.down_until[i] = Some(now + down);
            self.fig.kills += 1;
            self.log(&format!("SIGKILL s{i}, down for {down:.0?}"));
        }
        let elapsed = self.t0.elapsed();
        let due_first = self.fig.disk_full_periods == 0 && elapsed > length / 3;
        if self.disk_until.is_none()
            && elapsed > Duration::from_secs(20)
            && self
                .last_disk_end
                .is_none_or(|t| now.duration_since(t) > Duration::from_secs(60))
            && (due_first || self.rng.chance(0.02))
        {
            fill(&self.filler, FILL_LEAVES_MB)?;
            let lasts = self.rng.secs(20, 60);
            self.disk_until = Some(now + lasts);
            self.fig.disk_full_periods += 1;
            self.log(&format!("disk of s{DISK_NODE} full for {lasts:.0?}"));
        }
        Ok(())
    }

    fn refused(&mut self, i: usize, what: &str, stderr: &[u8]) {
        let err = String::from_utf8_lossy(stderr);
        let why = if err.contains("below the reserve") {
            "disk full".to_string()
        } else if err.contains("no document") {
            "document not on that node yet".to_string()
        } else {
            let line = err.lines().last().unwrap_or_default();
            format!("other: {}", line.chars().take(160).collect::<String>())
        };
        if why.starts_with("other") {
            self.log(&format!("s{i} refused {what}: {err}"));
        }
        *self
            .fig
            .refused
            .entry(format!("{what}: {why}"))
            .or_default() += 1;
    }

    fn doc_write(&mut self) -> Result<()> {
        let Some(i) = self.pick_running() else {
            return Ok(());
        };
        self.seq += 1;
        let seq = self.seq;
        if self.docs.len() < MAX_DOCS && (self.docs.is_empty() || self.rng.chance(0.15)) {
            let content = json!({ "created": seq }).to_string();
            let out = self.nodes[i].try_cli(&["doc", "new", "--content", &content, "--json"])?;
            if !out.status.success() {
                self.refused(i, "doc new", &out.stderr);
                return Ok(());
            }
            let v: Value = serde_json::from_slice(&out.stdout)?;
            let id = v["id"]
                .as_str()
                .ok_or_else(|| anyhow!("doc new printed no id: {v}"))?;
            self.docs.push(DocRec {
                id: id.to_string(),
                fields: vec![("created".into(), seq)],
            });
            self.fig.doc_creates += 1;
        } else {
            let d = self.rng.below(self.docs.len() as u64) as usize;
            let key = format!("k{seq}");
            let id = self.docs[d].id.clone();
            let out = self.nodes[i].try_cli(&["doc", "put", &id, &key, &seq.to_string()])?;
            if !out.status.success() {
                self.refused(i, "doc put", &out.stderr);
                return Ok(());
            }
            self.docs[d].fields.push((key, seq));
            self.fig.doc_edits += 1;
        }
        Ok(())
    }

    fn blob_add(&mut self) -> Result<()> {
        let Some(i) = self.pick_running() else {
            return Ok(());
        };
        self.seq += 1;
        let len = if self.rng.chance(0.1) {
            self.rng.range(256 << 10, 1 << 20)
        } else {
            self.rng.range(1 << 10, 64 << 10)
        };
        let src = self.tmp.path().join(format!("blob-{}", self.seq));
        random_file(
            &src,
            len,
            self.seed ^ self.seq.wrapping_mul(0x2545_F491_4F6C_DD1D),
        )?;
        let out = self.nodes[i].try_cli(&["blob", "add", &src.display().to_string(), "--json"])?;
        if !out.status.success() {
            std::fs::remove_file(&src)?;
            self.refused(i, "blob add", &out.stderr);
            return Ok(());
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let hash = v["hash"]
            .as_str()
            .ok_or_else(|| anyhow!("blob add printed no hash: {v}"))?;
        self.blobs.push(BlobRec {
            hash: hash.to_string(),
            src,
        });
        self.fig.blobs += 1;
        self.fig.blob_bytes += len;
        Ok(())
    }

    fn ask(&mut self) -> Result<()> {
        let Some(i) = self.pick_running() else {
            return Ok(());
        };
        self.seq += 1;
        let marker = format!("<soak-{:x}-{}>", self.seed, self.seq);
        let tool = self.rng.chance(0.08);
        let prompt = if tool {
            // The reply echoes the prompt, so the check looks for what only running it prints.
            let cmd = json!({ "command": "echo ran-$((40+2))" });
            format!("{marker} [[tool bash {cmd}]]")
        } else {
            format!("{marker} how are things")
        };
        let out = self.nodes[i].try_cli(&["ask", &prompt, "--no-wait", "--json"])?;
        if out.status.code() != Some(4) {
            self.refused(i, "ask", &out.stderr);
            return Ok(());
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let field = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("ask printed no {k}: {v}"))
        };
        self.asks.push(AskRec {
            node: i,
            conversation: field("conversation")?,
            request_id: field("request_id")?,
            marker,
            tool,
        });
        self.fig.asks += 1;
        if tool {
            self.fig.asks_with_tools += 1;
        }
        Ok(())
    }

    /// Heals the partition, frees the disk and starts every node that is down.
    fn heal_everything(&mut self) -> Result<()> {
        self.end_faults(true)?;
        self.lab.heal().map_err(|e| anyhow!("{e}"))?;
        self.log("everything healed; waiting for convergence");
        Ok(())
    }

    /// `GET path` on node `i`'s local API, from this process (the checks read thousands of
    /// things; a CLI process for each would take minutes).
    fn get(&self, i: usize, path: &str) -> Result<Value> {
        let api = self.nodes[i].api()?;
        self.fake
            .rt
            .block_on(api.get(path))
            .map_err(|e| anyhow!("s{i}: GET {path}: {e}"))
    }

    /// `GET path` on node `i`'s local API as bytes.
    fn get_bytes(&self, i: usize, path: &str) -> Result<Vec<u8>> {
        let api = self.nodes[i].api()?;
        self.fake.rt.block_on(async {
            let resp = api
                .get_raw(path)
                .await
                .map_err(|e| anyhow!("s{i}: GET {path}: {e}"))?;
            Ok(resp.bytes().await?.to_vec())
        })
    }

    /// The inventory root of every node (`inventory_root` of `iom status`).
    fn roots(&self) -> Result<Vec<String>> {
        (0..NODES)
            .map(|i| {
                self.get(i, "/v1/status")?["inventory_root"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("s{i} has no inventory_root in its status"))
            })
            .collect()
    }

    fn blob_set(&self, i: usize) -> Result<std::collections::BTreeSet<String>> {
        Ok(self.get(i, "/v1/blobs")?["blobs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["hash"].as_str().map(str::to_string))
            .collect())
    }

    /// The request message of an ask and the replies to it, as node `i` sees them.
    fn ask_state(&self, i: usize, a: &AskRec) -> Result<(Value, Vec<Value>)> {
        let c = self.get(i, &format!("/v1/conversations/{}", a.conversation))?;
        let msgs = c["messages"].as_array().cloned().unwrap_or_default();
        let req = msgs
            .iter()
            .find(|m| m["request_id"] == a.request_id.as_str())
            .cloned()
            .ok_or_else(|| anyhow!("s{i} has no request {} in {c}", a.request_id))?;
        let replies = msgs
            .into_iter()
            .filter(|m| m["role"] == "assistant" && m["reply_to"] == a.request_id.as_str())
            .collect();
        Ok((req, replies))
    }

    /// Waits until every pair of nodes has equal inventory roots and blob lists holding every
    /// acknowledged blob, and every ask has ended (done or failed).
    fn converge(&mut self, bound: Duration) -> Result<()> {
        let t0 = Instant::now();
        let acked: std::collections::BTreeSet<String> =
            self.blobs.iter().map(|b| b.hash.clone()).collect();
        let mut last = String::new();
        let r = wait_until("the nodes to converge", bound, || {
            let roots = self.roots()?;
            if roots.iter().any(|r| *r != roots[0]) {
                last = format!("inventory roots differ: {roots:?}");
                return Ok(false);
            }
            let first = self.blob_set(0)?;
            if let Some(missing) = acked.difference(&first).next() {
                last = format!("s0 lacks acknowledged blob {missing}");
                return Ok(false);
            }
            for i in 1..NODES {
                if self.blob_set(i)? != first {
                    last = format!("s{i}'s blob list differs from s0's");
                    return Ok(false);
                }
            }
            for a in &self.asks {
                let (req, _) = self.ask_state(AGENT, a)?;
                if !matches!(req["status"].as_str(), Some("done" | "failed")) {
                    last = format!("ask {} from s{} is {}", a.request_id, a.node, req["status"]);
                    return Ok(false);
                }
            }
            // Answers written meanwhile change the roots: look again once all asks ended.
            Ok(self.roots()? == roots)
        });
        r.map_err(|e| anyhow!("{e}; last difference: {last}"))?;
        self.fig.convergence = t0.elapsed();
        self.log(&format!("converged in {:.1?}", self.fig.convergence));
        Ok(())
    }

    /// Every invariant, after convergence.
    fn check(&mut self) -> Result<()> {
        let (mut done, mut failed) = (0, 0);
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        for i in 0..NODES {
            ensure!(!self.nodes[i].has_exited(), "s{i} exited by itself");
            for d in &self.docs {
                let content = self
                    .get(i, &format!("/v1/docs/{}", d.id))
                    .with_context(|| format!("s{i} lost document {}", d.id))?["content"]
                    .clone();
                for (k, v) in &d.fields {
                    ensure!(
                        content[k] == *v,
                        "s{i} lost an acknowledged write: {}.{k} should be {v}, content {content}",
                        d.id
                    );
                }
            }
        }
        for b in &self.blobs {
            let want = std::fs::read(&b.src)?;
            for i in 0..NODES {
                let got = self.get_bytes(i, &format!("/v1/blobs/{}", b.hash))?;
                ensure!(
                    got == want,
                    "s{i} serves blob {} with other bytes ({} of {} bytes)",
                    b.hash,
                    got.len(),
                    want.len()
                );
            }
        }
        for a in &self.asks {
            let mut outcome = None;
            for i in [a.node, AGENT] {
                let (req, replies) = self.ask_state(i, a)?;
                let status = req["status"].as_str().unwrap_or_default().to_string();
                let calls = self.fake.calls_with(&a.marker)?;
                let turns = if a.tool { 2 } else { 1 };
                match status.as_str() {
                    "done" => {
                        ensure!(
                            replies.len() == 1,
                            "ask {} from s{} done with {} replies on s{i}: {replies:?}",
                            a.request_id,
                            a.node,
                            replies.len()
                        );
                        let text = replies[0]["text"].as_str().unwrap_or_default();
                        ensure!(
                            text.starts_with("echo: ") && text.contains(&a.marker),
                            "ask {} answered with {text:?}",
                            a.request_id
                        );
                        if a.tool {
                            ensure!(
                                text.contains("tool results: ") && text.contains("ran-42"),
                                "ask {}'s tool did not run: {text:?}",
                                a.request_id
                            );
                        }
                        ensure!(
                            calls == turns,
                            "ask {} made {calls} model calls, not {turns}",
                            a.request_id
                        );
                    }
                    "failed" => {
                        let why = req["error"].as_str().unwrap_or_default();
                        ensure!(
                            !why.is_empty(),
                            "ask {} failed without a reason: {req}",
                            a.request_id
                        );
                        ensure!(
                            replies.is_empty(),
                            "ask {} failed ({why}) but has replies: {replies:?}",
                            a.request_id
                        );
                        ensure!(
                            calls <= turns,
                            "ask {} made {calls} model calls (at most {turns})",
                            a.request_id
                        );
                    }
                    other => bail!("ask {} is still {other:?} on s{i}", a.request_id),
                }
                match &outcome {
                    None => outcome = Some((status, req["error"].clone())),
                    Some(o) => ensure!(
                        *o == (status.clone(), req["error"].clone()),
                        "ask {}: s{} and s{AGENT} disagree",
                        a.request_id,
                        a.node
                    ),
                }
            }
            match outcome {
                Some((s, _)) if s == "done" => done += 1,
                Some((_, why)) => {
                    failed += 1;
                    *failures
                        .entry(why.as_str().unwrap_or_default().to_string())
                        .or_default() += 1;
                }
                None => {}
            }
        }
        self.fig.asks_done = done;
        self.fig.asks_failed = failed;
        self.fig.ask_failures = failures;
        for (i, n) in self.nodes.iter().enumerate() {
            let log = n.log_text();
            if let Some(line) = log.lines().find(|l| l.contains("panicked")) {
                bail!("s{i} panicked: {line}");
            }
        }
        Ok(())
    }

    fn print_figures(&self) {
        let f = &self.fig;
        let mut text = format!(
            "soak figures (seed {}, {} nodes):\n\
             rounds {}\npartitions {}\nheals {}\nkills (SIGKILL) {}\nrestarts {}\n\
             starts with a skewed clock {}\ndisk-full periods {}\n\
             documents created {}\ndocument edits acknowledged {}\nblobs added {} ({} KiB)\n\
             asks {} ({} with a tool call): answered {}, failed {}\nconvergence after heal {:.1} s\n",
            self.seed,
            NODES,
            f.rounds,
            f.partitions,
            f.heals,
            f.kills,
            f.restarts,
            f.skewed_starts,
            f.disk_full_periods,
            f.doc_creates,
            f.doc_edits,
            f.blobs,
            f.blob_bytes >> 10,
            f.asks,
            f.asks_with_tools,
            f.asks_done,
            f.asks_failed,
            f.convergence.as_secs_f64(),
        );
        for (why, n) in &f.ask_failures {
            text.push_str(&format!("ask failed: {why}: {n}\n"));
        }
        for (why, n) in &f.refused {
            text.push_str(&format!("refused {why}: {n}\n"));
        }
        eprintln!("{text}");
    }
}
