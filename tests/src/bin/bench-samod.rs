//! Side-by-side benchmark against samod, the Rust automerge-repo (issue 16): the same
//! workloads between two processes on loopback, once with two `iom` nodes and once with two
//! samod repos, printed next to each other in one run.
//!
//! - `cold`: cold sync of `DOCS` (10,000) documents × 10 changes to an empty peer;
//!   then `catchup`: the peer stops, `CATCHUP` (1,000) of them change, the peer starts and
//!   syncs (with the in-process reference of `bench-sync`);
//! - `live`: propagation of one small change, p50 and p99 over `CHANGES` (200) changes: for
//!   iom a durable `PUT` on A until B's WebSocket reports the new heads, for samod a change on
//!   A until B's change stream shows it (both watched, not polled);
//! - `many`: `MANY` (100,000) small documents (2 changes each), cold, and for iom the
//!   start-up and idle RSS of the node holding them; samod gets `SAMOD_MANY` (10,000) of
//!   them (see `scale`: at 100,000 it would run for hours), compared per document, and iom
//!   to the in-process reference of the same documents (`SAMOD_MANY=0` leaves samod out);
//! - `scale`: cold sync of `SCALE` (1000,2000,4000) documents × 10 changes on both sides, the
//!   time per document at each size (samod 0.16's hub walks every live document on every
//!   event, so its time per document grows with the count; iom's should not).
//!
//! The documents are the same bytes on both sides (built with `iom_crdt` the way
//! `POST /v1/docs` builds them); each samod document is loaded from those bytes and handed to
//! `Repo::create`.
//!
//! What each side does:
//! - iom: two `iom node run` processes; libp2p over TCP with noise (encrypted, mutually
//!   authenticated) and yamux; sled storage; a local write is acknowledged after sled's flush (fsync), and sent to
//!   peers while that flush runs; received changes are written without a flush of their own. B learns of A's documents by itself
//!   (inventory digests), after `iom join`.
//! - samod 0.16 (`tokio` feature): two processes of this binary (`--samod-peer DIR`), each a
//!   `Repo` on a multi-thread tokio runtime with samod's `tokio::FilesystemStorage` (one file
//!   per chunk, `tokio::fs::write`, no fsync) and samod's TCP transport (`TcpDialer` /
//!   `accept_tokio_io`: length-delimited frames, plain text, no authentication). A keeps every
//!   document's handle (so it announces all of them on connect); B is told the document ids
//!   and their heads and `find`s them `SAMOD_FINDS` (1,024) at a time; converged is when every
//!   handle has the wanted heads (watched with `DocHandle::changes`, not polled).
//!
//! Run (release build of this binary and of `iom`, see docs/benchmarks.md):
//! `target/release/bench-samod [cold] [live] [many] [scale]` (no argument: all).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use iom_node::api::client::ApiClient;
use iom_tests::harness::{Node, mesh};

mod bench_common;
use bench_common::iom_sync::*;
use bench_common::*;

/// One workload's result on both sides, for the summary table.
struct Row {
    what: String,
    iom: String,
    samod: String,
    ratio: f64,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--samod-peer") {
        let dir = args.get(2).context("--samod-peer DIR")?;
        return peer::run(Path::new(dir));
    }
    let bin = use_release_bin()?;
    print_machine(&bin);
    let rt = runtime()?;
    let scratch = tempfile::tempdir()?;
    let mut rows = Vec::new();
    if wants("cold") || wants("catchup") {
        cold_and_catchup(&rt, scratch.path(), &mut rows)?;
    }
    if wants("live") {
        live(&rt, scratch.path(), &mut rows)?;
    }
    if wants("many") {
        many(&rt, scratch.path(), &mut rows)?;
    }
    if wants("scale") {
        scale(&rt, scratch.path(), &mut rows)?;
    }
    println!();
    println!("| workload | iom | samod | samod / iom |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2}{} |",
            r.what,
            r.iom,
            r.samod,
            r.ratio,
            if r.ratio >= 1.0 {
                " (iom faster)"
            } else {
                " (samod faster)"
            }
        );
    }
    Ok(())
}

fn cold_and_catchup(
    rt: &tokio::runtime::Runtime,
    scratch: &Path,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let count = param("DOCS", 10_000);
    let changed = param("CATCHUP", 1000).min(count);
    let fields = 9; // 1 + 9 = 10 changes per document

    // iom: A gets the documents through its API, a fresh B joins.
    let mut a = Node::new("cold-a")?;
    a.start()?;
    let ids = create_docs(rt, &a.dir, count, fields, 8)?;
    let mut b = Node::new("cold-b")?;
    b.start()?;
    let (iom_cold, _) = cold_join(rt, &a, &b)?;
    println!(
        "cold: iom: {count} documents × 10 changes to an empty peer: {:.0} ms from `iom join` until B's document list equals A's",
        ms(iom_cold)
    );
    std::thread::sleep(Duration::from_secs(2));
    b.stop()?;
    let (ca, cb) = (ApiClient::new(&a.dir)?, ApiClient::new(&b.dir)?);
    change_docs(rt, &ca, &ids[..changed])?;
    let want = catch_up_target(rt, &ca)?;
    let (proc_b, _) = spawn_timed(rt, &b)?;
    let iom_catchup = wait_caught_up(rt, &cb, &want, Instant::now())?;
    println!(
        "catch-up: iom: {changed} of {count} documents changed while B was away: B equal to A {:.0} ms after its API was up",
        ms(iom_catchup)
    );
    proc_b.stop()?;
    a.stop()?;
    drop((a, b));

    // samod: the same documents, the same steps.
    let mut sa = SamodPeer::start(&scratch.join("cold-samod-a"))?;
    let created = sa.call(&format!("create {count} {fields}"))?;
    println!("cold: samod: created {count} documents on A in {created} ms");
    let port = sa.call("listen")?;
    let heads = scratch.join("cold-heads");
    sa.call(&format!("heads {}", heads.display()))?;
    let b_dir = scratch.join("cold-samod-b");
    let mut sb = SamodPeer::start(&b_dir)?;
    let t0 = Instant::now();
    let reply = sb.call(&format!("sync {port} {}", heads.display()))?;
    let samod_cold = t0.elapsed();
    println!(
        "cold: samod: {count} documents × 10 changes to an empty peer: {:.0} ms from dialing until B has every document at A's heads (B: {reply})",
        ms(samod_cold)
    );
    sb.call("stop")?;
    sa.call(&format!("change-first {changed}"))?;
    sa.call(&format!("heads {}", heads.display()))?;
    let mut sb = SamodPeer::start(&b_dir)?;
    let t0 = Instant::now();
    let reply = sb.call(&format!("sync {port} {}", heads.display()))?;
    let samod_catchup = t0.elapsed();
    println!(
        "catch-up: samod: {changed} of {count} documents changed while B was away: B has every document at A's heads {:.0} ms after its repo was loaded (B: {reply})",
        ms(samod_catchup)
    );
    sb.call("stop")?;
    sa.call("stop")?;

    let (reference, loading) = in_process_catchup(changed, fields)?;
    println!(
        "catch-up: reference in-process sync of one change per document from persisted states: {:.0} ms; iom {:.1}x, samod {:.1}x of it; loading both replicas from their saved bytes first: {:.0} ms; iom {:.1}x, samod {:.1}x of it",
        ms(reference),
        iom_catchup.as_secs_f64() / reference.as_secs_f64(),
        samod_catchup.as_secs_f64() / reference.as_secs_f64(),
        ms(loading),
        iom_catchup.as_secs_f64() / loading.as_secs_f64(),
        samod_catchup.as_secs_f64() / loading.as_secs_f64()
    );
    rows.push(row(
        format!("cold sync, {count} docs × 10 changes"),
        iom_cold,
        samod_cold,
    ));
    rows.push(row(
        format!("catch-up, {changed} of {count} changed"),
        iom_catchup,
        samod_catchup,
    ));
    Ok(())
}

fn live(rt: &tokio::runtime::Runtime, scratch: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let changes = param("CHANGES", 200);
    let nodes = mesh(&["live-a", "live-b"])?;
    wait_session(rt, &nodes[0], &nodes[1])?;
    let (mut iom, mut put) = live_changes(rt, &nodes[0], &nodes[1], changes)?;
    drop(nodes);
    let (iom50, iom99) = (percentile(&mut iom, 50.0), percentile(&mut iom, 99.0));
    println!(
        "live: iom: {changes} changes A→B: PUT on A until B's WebSocket reports its heads: p50 {iom50:.2} ms, p99 {iom99:.2} ms (the durable PUT alone: p50 {:.2} ms)",
        percentile(&mut put, 50.0)
    );

    let mut sa = SamodPeer::start(&scratch.join("live-samod-a"))?;
    let mut sb = SamodPeer::start(&scratch.join("live-samod-b"))?;
    let port = sa.call("listen")?;
    let id = sa.call("create-live")?;
    sb.call(&format!("dial {port}"))?;
    sb.call(&format!("find {id}"))?;
    let mut samod = Vec::new();
    let mut local = Vec::new();
    for i in 0..changes + 10 {
        sb.send(&format!("wait {id} {i}"))?;
        sb.expect("armed")?;
        let t0 = Instant::now();
        sa.call(&format!("change {id} {i}"))?;
        let acked = t0.elapsed();
        sb.expect("ok")?;
        if i >= 10 {
            samod.push(ms(t0.elapsed()));
            local.push(ms(acked));
        }
    }
    sb.call("stop")?;
    sa.call("stop")?;
    let (s50, s99) = (percentile(&mut samod, 50.0), percentile(&mut samod, 99.0));
    println!(
        "live: samod: {changes} changes A→B: change on A until B's change stream shows it: p50 {s50:.2} ms, p99 {s99:.2} ms (the change on A alone: p50 {:.2} ms)",
        percentile(&mut local, 50.0)
    );
    rows.push(Row {
        what: "live propagation p50".into(),
        iom: format!("{iom50:.2} ms"),
        samod: format!("{s50:.2} ms"),
        ratio: s50 / iom50,
    });
    rows.push(Row {
        what: "live propagation p99".into(),
        iom: format!("{iom99:.2} ms"),
        samod: format!("{s99:.2} ms"),
        ratio: s99 / iom99,
    });
    Ok(())
}

fn many(rt: &tokio::runtime::Runtime, scratch: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let count = param("MANY", 100_000);
    let fields = 1; // 2 changes per document
    let mut a = Node::new("many-a")?;
    a.start()?;
    let t0 = Instant::now();
    create_docs(rt, &a.dir, count, fields, 8)?;
    println!(
        "many: iom: created {count} documents on A through the API in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let mut b = Node::new("many-b")?;
    b.start()?;
    let (iom_cold, _) = cold_join(rt, &a, &b)?;
    println!(
        "many: iom: {count} small documents to an empty peer: {:.0} ms from `iom join` until B's document list equals A's",
        ms(iom_cold)
    );
    let (pure, saved) = in_process_sync(count, fields)?;
    println!(
        "many: reference in-process iom_crdt::sync of the same documents: {:.0} ms (with the receiver's save_incremental: {:.0} ms); iom {:.2}x of it (target <= 2x)",
        ms(pure),
        ms(saved),
        iom_cold.as_secs_f64() / pure.as_secs_f64()
    );
    b.stop()?;
    a.stop()?;
    let mut starts = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..3 {
        let (proc_a, up) = spawn_timed(rt, &a)?;
        std::thread::sleep(Duration::from_secs(3));
        rss.push(rss_kib(proc_a.child.id())? as f64 / 1024.0);
        starts.push(ms(up));
        proc_a.stop()?;
    }
    println!(
        "many: iom: node with {count} documents: start-up median {:.1} ms (target < 500 ms), idle VmRSS median {:.1} MiB (target < 100 MB)",
        percentile(&mut starts, 50.0),
        percentile(&mut rss, 50.0)
    );
    drop((a, b));

    let iom_count = count;
    let count = param("SAMOD_MANY", 10_000).min(count);
    if count == 0 {
        return Ok(());
    }
    let mut sa = SamodPeer::start(&scratch.join("many-samod-a"))?;
    let created = sa.call(&format!("create {count} {fields}"))?;
    println!("many: samod: created {count} documents on A in {created} ms");
    let port = sa.call("listen")?;
    let heads = scratch.join("many-heads");
    sa.call(&format!("heads {}", heads.display()))?;
    let mut sb = SamodPeer::start(&scratch.join("many-samod-b"))?;
    let t0 = Instant::now();
    let reply = sb.call(&format!("sync {port} {}", heads.display()))?;
    let samod_cold = t0.elapsed();
    println!(
        "many: samod: {count} small documents to an empty peer: {:.0} ms from dialing until B has every document at A's heads (B: {reply})",
        ms(samod_cold)
    );
    let samod_rss = rss_kib(sa.child.id())? as f64 / 1024.0;
    println!("many: samod: A's VmRSS holding {count} open documents: {samod_rss:.1} MiB");
    sb.call("stop")?;
    sa.call("stop")?;
    rows.push(per_doc_row(
        format!("cold sync, small docs (iom {iom_count}, samod {count}), per document"),
        (iom_cold, iom_count),
        (samod_cold, count),
    ));
    Ok(())
}

/// Cold sync at several sizes on both sides: the time per document at each.
fn scale(rt: &tokio::runtime::Runtime, scratch: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let sizes: Vec<usize> = std::env::var("SCALE")
        .unwrap_or_else(|_| "1000,2000,4000".into())
        .split(',')
        .map(|n| n.trim().parse().context("SCALE: comma-separated counts"))
        .collect::<Result<_>>()?;
    let fields = 9;
    for count in sizes {
        let mut a = Node::new(&format!("scale-a-{count}"))?;
        a.start()?;
        create_docs(rt, &a.dir, count, fields, 8)?;
        let mut b = Node::new(&format!("scale-b-{count}"))?;
        b.start()?;
        let (iom_cold, _) = cold_join(rt, &a, &b)?;
        b.stop()?;
        a.stop()?;
        drop((a, b));

        let mut sa = SamodPeer::start(&scratch.join(format!("scale-samod-a-{count}")))?;
        sa.call(&format!("create {count} {fields}"))?;
        let port = sa.call("listen")?;
        let heads = scratch.join(format!("scale-heads-{count}"));
        sa.call(&format!("heads {}", heads.display()))?;
        let mut sb = SamodPeer::start(&scratch.join(format!("scale-samod-b-{count}")))?;
        let t0 = Instant::now();
        sb.call(&format!("sync {port} {}", heads.display()))?;
        let samod_cold = t0.elapsed();
        sb.call("stop")?;
        sa.call("stop")?;
        println!(
            "scale: {count} documents × 10 changes, cold: iom {:.0} ms ({:.3} ms per document), samod {:.0} ms ({:.3} ms per document)",
            ms(iom_cold),
            ms(iom_cold) / count as f64,
            ms(samod_cold),
            ms(samod_cold) / count as f64
        );
        rows.push(row(
            format!("cold sync, {count} docs × 10 changes"),
            iom_cold,
            samod_cold,
        ));
    }
    Ok(())
}

/// A row of two runs of different sizes, compared per document.
fn per_doc_row(what: String, iom: (Duration, usize), samod: (Duration, usize)) -> Row {
    let per = |(d, n): (Duration, usize)| ms(d) / n.max(1) as f64;
    Row {
        what,
        iom: format!("{:.0} ms ({:.3} ms/doc)", ms(iom.0), per(iom)),
        samod: format!("{:.0} ms ({:.3} ms/doc)", ms(samod.0), per(samod)),
        ratio: per(samod) / per(iom),
    }
}

fn row(what: String, iom: Duration, samod: Duration) -> Row {
    Row {
        what,
        iom: format!("{:.0} ms", ms(iom)),
        samod: format!("{:.0} ms", ms(samod)),
        ratio: samod.as_secs_f64() / iom.as_secs_f64(),
    }
}

/// A samod peer process (this binary with `--samod-peer DIR`), driven over its stdin and
/// stdout one line at a time.
struct SamodPeer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    dir: PathBuf,
}

impl SamodPeer {
    /// Starts the peer on `dir` (its storage) and waits until its repo is loaded.
    fn start(dir: &Path) -> Result<SamodPeer> {
        std::fs::create_dir_all(dir)?;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--samod-peer")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning the samod peer")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut peer = SamodPeer {
            child,
            stdin,
            stdout,
            dir: dir.to_path_buf(),
        };
        peer.expect("ready")?;
        Ok(peer)
    }

    fn send(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Reads one reply; fails unless it starts with `word`. Returns the rest.
    fn expect(&mut self, word: &str) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("samod peer on {} exited", self.dir.display());
        }
        let line = line.trim_end();
        match line.split_once(' ') {
            Some((w, rest)) if w == word => Ok(rest.to_string()),
            None if line == word => Ok(String::new()),
            _ => bail!(
                "samod peer on {}: expected {word}, got {line}",
                self.dir.display()
            ),
        }
    }

    /// Sends a command and returns the rest of its `ok` reply.
    fn call(&mut self, line: &str) -> Result<String> {
        self.send(line)?;
        self.expect("ok").with_context(|| format!("`{line}`"))
    }
}

impl Drop for SamodPeer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The samod side: a repo on a directory, commands on stdin, replies on stdout.
mod peer {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ReadDoc};
    use futures::{StreamExt, TryStreamExt};
    use samod::storage::TokioFilesystemStorage;
    use samod::{BackoffConfig, DocHandle, DocumentId, Repo};
    use tokio::io::AsyncBufReadExt;

    /// The samod peer's state.
    struct Peer {
        repo: Repo,
        handles: HashMap<String, DocHandle>,
        order: Vec<String>,
    }

    /// Runs the peer until `stop` or the end of stdin.
    pub(super) fn run(dir: &Path) -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let repo = Repo::build_tokio()
                .with_storage(TokioFilesystemStorage::new(dir))
                .load()
                .await;
            let mut peer = Peer {
                repo,
                handles: HashMap::new(),
                order: Vec::new(),
            };
            reply("ready", "");
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Some(line) = lines.next_line().await? {
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.first() == Some(&"stop") {
                    peer.repo.stop().await;
                    reply("ok", "");
                    return Ok(());
                }
                match peer.command(&words).await {
                    Ok(rest) => reply("ok", &rest),
                    Err(e) => reply("err", &format!("{e:#}")),
                }
            }
            anyhow::Ok(())
        })
    }

    fn reply(word: &str, rest: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{word} {rest}");
        let _ = out.flush();
    }

    /// Sets one field of the root map in one change.
    fn set(d: &mut Automerge, key: &str, value: impl Into<automerge::ScalarValue>) -> Result<()> {
        let mut tx = d.transaction();
        tx.put(automerge::ROOT, key, value.into())?;
        tx.commit();
        Ok(())
    }

    fn heads_of(h: &DocHandle) -> Vec<String> {
        let mut heads: Vec<String> =
            h.with_document(|d| d.get_heads().iter().map(|c| c.to_string()).collect());
        heads.sort();
        heads
    }

    /// Waits until the document has exactly `want` as heads: once from the document, then
    /// from the heads each change carries (reading the document again per change would cost
    /// samod's hub one more event each time).
    async fn wait_heads(h: &DocHandle, want: &[String]) -> Result<()> {
        let mut changes = h.changes();
        if heads_of(h) == want {
            return Ok(());
        }
        while let Some(change) = changes.next().await {
            let mut heads: Vec<String> = change.new_heads.iter().map(|c| c.to_string()).collect();
            heads.sort();
            if heads == want {
                return Ok(());
            }
        }
        Err(anyhow!("change stream of {} ended", h.document_id()))
    }

    fn arg<'a>(words: &[&'a str], i: usize) -> Result<&'a str> {
        words
            .get(i)
            .copied()
            .ok_or_else(|| anyhow!("missing argument {i} of {words:?}"))
    }

    impl Peer {
        async fn command(&mut self, words: &[&str]) -> Result<String> {
            match arg(words, 0)? {
                "create" => {
                    let count: usize = arg(words, 1)?.parse()?;
                    let fields: usize = arg(words, 2)?.parse()?;
                    let actor = iom_crdt::actor_for(&[1; 32], [1; 8]);
                    let docs = (0..count)
                        .map(|i| Ok(Automerge::load(&build_doc(&actor, i, fields)?.snapshot())?))
                        .collect::<Result<Vec<_>>>()?;
                    let t0 = Instant::now();
                    let repo = self.repo.clone();
                    let handles: Vec<DocHandle> = futures::stream::iter(docs)
                        .map(|d| repo.create(d))
                        .buffered(256)
                        .try_collect()
                        .await
                        .map_err(|e| anyhow!("{e:?}"))?;
                    for h in handles {
                        self.add(h);
                    }
                    Ok(format!("{:.0}", ms(t0.elapsed())))
                }
                "create-live" => {
                    let mut d = Automerge::new();
                    set(&mut d, "n", -1)?;
                    let h = self.repo.create(d).await.map_err(|e| anyhow!("{e:?}"))?;
                    let id = h.document_id().to_string();
                    self.add(h);
                    Ok(id)
                }
                "listen" => {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let port = listener.local_addr()?.port();
                    let acceptor = self
                        .repo
                        .make_acceptor(samod::Url::parse(&format!("tcp://127.0.0.1:{port}"))?)
                        .map_err(|e| anyhow!("{e:?}"))?;
                    tokio::spawn(async move {
                        while let Ok((io, _)) = listener.accept().await {
                            let _ = io.set_nodelay(true);
                            if acceptor.accept_tokio_io(io).is_err() {
                                return;
                            }
                        }
                    });
                    Ok(port.to_string())
                }
                "dial" => {
                    self.dial(arg(words, 1)?).await?;
                    Ok(String::new())
                }
                "heads" => {
                    let mut out = String::new();
                    for id in &self.order {
                        out.push_str(id);
                        for h in heads_of(&self.handles[id]) {
                            out.push(' ');
                            out.push_str(&h);
                        }
                        out.push('\n');
                    }
                    std::fs::write(arg(words, 1)?, out)?;
                    Ok(String::new())
                }
                "sync" => {
                    let t0 = Instant::now();
                    self.dial(arg(words, 1)?).await?;
                    let dialed = t0.elapsed();
                    let want = std::fs::read_to_string(arg(words, 2)?)?;
                    let mut wanted = Vec::new();
                    for line in want.lines() {
                        let mut w = line.split_whitespace();
                        let id = w.next().context("empty heads line")?;
                        let heads: Vec<String> = w.map(str::to_string).collect();
                        wanted.push((
                            id.parse::<DocumentId>().map_err(|e| anyhow!("{e:?}"))?,
                            heads,
                        ));
                    }
                    let repo = self.repo.clone();
                    let finds = param("SAMOD_FINDS", 1024);
                    let found: Vec<DocHandle> = futures::stream::iter(wanted)
                        .map(|(id, heads)| {
                            let find = repo.find(id.clone());
                            async move {
                                let h = find
                                    .await
                                    .map_err(|e| anyhow!("{e:?}"))?
                                    .ok_or_else(|| anyhow!("{id} not found"))?;
                                wait_heads(&h, &heads).await?;
                                anyhow::Ok(h)
                            }
                        })
                        .buffer_unordered(finds)
                        .try_collect()
                        .await?;
                    let n = found.len();
                    for h in found {
                        self.add(h);
                    }
                    Ok(format!(
                        "{n} documents in {:.0} ms, dial {:.1} ms",
                        ms(t0.elapsed()),
                        ms(dialed)
                    ))
                }
                "find" => {
                    let id: DocumentId = arg(words, 1)?.parse().map_err(|e| anyhow!("{e:?}"))?;
                    let h = self
                        .repo
                        .find(id)
                        .await
                        .map_err(|e| anyhow!("{e:?}"))?
                        .context("not found")?;
                    self.add(h);
                    Ok(String::new())
                }
                "change" => {
                    let h = self.handle(arg(words, 1)?)?;
                    let v: i64 = arg(words, 2)?.parse()?;
                    h.with_document(|d| set(d, "n", v))?;
                    Ok(String::new())
                }
                "change-first" => {
                    let n: usize = arg(words, 1)?.parse()?;
                    for id in self.order.iter().take(n) {
                        self.handles[id]
                            .with_document(|d| set(d, "f1", "changed during catch-up"))?;
                    }
                    Ok(String::new())
                }
                "wait" => {
                    let h = self.handle(arg(words, 1)?)?;
                    let v: i64 = arg(words, 2)?.parse()?;
                    let mut changes = h.changes();
                    reply("armed", "");
                    let is = |h: &DocHandle| {
                        h.with_document(|d| {
                            matches!(d.get(automerge::ROOT, "n"), Ok(Some((automerge::Value::Scalar(s), _))) if s.as_i64() == Some(v))
                        })
                    };
                    while !is(&h) {
                        changes.next().await.context("change stream ended")?;
                    }
                    Ok(String::new())
                }
                other => bail!("unknown command {other}"),
            }
        }

        fn add(&mut self, h: DocHandle) {
            let id = h.document_id().to_string();
            if self.handles.insert(id.clone(), h).is_none() {
                self.order.push(id);
            }
        }

        fn handle(&self, id: &str) -> Result<DocHandle> {
            self.handles
                .get(id)
                .cloned()
                .ok_or_else(|| anyhow!("no handle for {id}"))
        }

        async fn dial(&mut self, port: &str) -> Result<()> {
            let port: u16 = port.parse()?;
            let dialer = self
                .repo
                .dial(
                    BackoffConfig::default(),
                    std::sync::Arc::new(NoDelayDialer { port }),
                )
                .map_err(|e| anyhow!("{e:?}"))?;
            dialer.established().await.map_err(|e| anyhow!("{e:?}"))?;
            Ok(())
        }
    }

    /// samod's `TcpDialer` with `TCP_NODELAY` set (its own leaves Nagle on, which delays small
    /// messages on loopback): the best transport samod offers for two processes.
    struct NoDelayDialer {
        port: u16,
    }

    impl samod::Dialer for NoDelayDialer {
        type Error = std::io::Error;

        fn url(&self) -> samod::Url {
            let url = format!("tcp://127.0.0.1:{}", self.port);
            samod::Url::parse(&url).unwrap_or_else(|_| unreachable!("a valid tcp url"))
        }

        fn connect(
            &self,
        ) -> futures::future::BoxFuture<
            'static,
            Result<samod::Transport, samod::DialError<Self::Error>>,
        > {
            let port = self.port;
            Box::pin(async move {
                let io = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map_err(samod::DialError::transient)?;
                io.set_nodelay(true).map_err(samod::DialError::transient)?;
                Ok(samod::Transport::from_tokio_io(io))
            })
        }
    }
}
