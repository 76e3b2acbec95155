//! The tool sandbox against the real Docker engine.
//!
//! Needs a running Docker engine and `/bin/busybox` from `busybox-static`
//! (`scripts/install-deps.sh`). Fails loudly without them: there is no skipping inside a test (`IOM_SKIP_DOCKER=1
//! scripts/test.sh` leaves the binary out, and nextest reports it as skipped).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iom_node::agent::sandbox::check::check;
use iom_node::agent::sandbox::container::connect_docker;
use iom_node::agent::sandbox::image::{DEFAULT_IMAGE, build_default_image, build_image};
use iom_node::agent::sandbox::policy::{MountError, MountSpec, SandboxConfig};
use iom_node::agent::sandbox::{Sandbox, SandboxError, ToolOutcome};
use serde_json::json;
use tempfile::TempDir;
use tokio::sync::Mutex;

/// Serialises environment changes with everything that reads the environment (Docker connect).
static ENV_LOCK: Mutex<()> = Mutex::const_new(());
static IMAGE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
const CANARY: &str = "sk-test-secret-canary";

async fn docker() -> bollard::Docker {
    let res = {
        let _env = ENV_LOCK.lock().await;
        connect_docker().await
    };
    res.unwrap_or_else(|e| {
        panic!(
            "these tests need the Docker engine and it is unavailable: {e}\n\
             (`IOM_SKIP_DOCKER=1 scripts/test.sh` leaves this test binary out, reported as skipped)"
        )
    })
}

async fn ensure_image() {
    IMAGE
        .get_or_init(|| async {
            let d = docker().await;
            let image = build_default_image(&d, None).await.unwrap_or_else(|e| {
                panic!("building {DEFAULT_IMAGE} failed (run scripts/install-deps.sh?): {e}")
            });
            assert_eq!(image, DEFAULT_IMAGE);
        })
        .await;
}

struct Env {
    sandbox: Sandbox,
    _mounts: MountGuard,
    data: TempDir,
    _guard: NodeGuard,
}

/// Removes a node's containers on drop, even when the test panicked before `shutdown`.
struct NodeGuard(String);

impl Drop for NodeGuard {
    fn drop(&mut self) {
        remove_node_containers(&self.0);
    }
}

fn remove_node_containers(node: &str) {
    let ids = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=iom.node={node}")])
        .output();
    if let Ok(out) = ids {
        let ids = String::from_utf8_lossy(&out.stdout);
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .output();
        }
    }
}

/// Unmounts the workspace images below a directory on drop (declare it after the directory).
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        unmount_under(&self.0);
    }
}

/// Unmounts (lazily) every mount below `dir`: workspace images a test left mounted.
fn unmount_under(dir: &Path) {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    for m in iom_node::agent::sandbox::quota::mount_points().unwrap_or_default() {
        if m.starts_with(&dir) && m != dir {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&m)
                .output();
        }
    }
}

/// Mounts below `dir`, and loop devices backed by files below it.
fn mounts_and_loops_under(dir: &Path) -> (Vec<PathBuf>, Vec<String>) {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounts = iom_node::agent::sandbox::quota::mount_points()
        .unwrap()
        .into_iter()
        .filter(|m| m.starts_with(&dir) && m != &dir)
        .collect();
    let out = std::process::Command::new("losetup")
        .args(["-n", "-O", "NAME,BACK-FILE", "-l"])
        .output()
        .unwrap();
    let loops = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .map(str::to_string)
        .collect();
    (mounts, loops)
}

/// Panics unless this process is root (the workspace quota loop-mounts images).
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test loop-mounts workspace images and needs root (`IOM_SKIP_NETNS=1 \
         scripts/test.sh` leaves the root-only tests out, reported as skipped)"
    );
}

impl Env {
    async fn bash(&self, conv: &str, command: &str) -> ToolOutcome {
        self.sandbox
            .run_tool(conv, "bash", &json!({ "command": command }))
            .await
    }
}

async fn sandbox(test: &str, tune: impl FnOnce(&mut SandboxConfig)) -> Env {
    ensure_image().await;
    let data = tempfile::tempdir().unwrap();
    let mut cfg = SandboxConfig::default();
    tune(&mut cfg);
    let node = format!("t{}{}", std::process::id(), test.replace('_', ""));
    let sandbox = connect(cfg, data.path(), &node)
        .await
        .unwrap_or_else(|e| panic!("Sandbox::connect failed: {e}"));
    Env {
        sandbox,
        _mounts: MountGuard(data.path().to_path_buf()),
        data,
        _guard: NodeGuard(node),
    }
}

/// `Sandbox::connect` while holding [`ENV_LOCK`] (it reads `DOCKER_HOST`).
async fn connect(cfg: SandboxConfig, data: &Path, node: &str) -> Result<Sandbox, SandboxError> {
    let _env = ENV_LOCK.lock().await;
    Sandbox::connect(cfg, data.to_path_buf(), node.to_string()).await
}

fn ok(out: &ToolOutcome) -> &str {
    assert!(!out.is_error, "tool failed: {}", out.output);
    &out.output
}

#[tokio::test(flavor = "multi_thread")]
async fn files_persist_across_calls_in_one_warm_container() {
    let env = sandbox("files", |_| {}).await;
    let s = &env.sandbox;
    let first = s.ensure_container("c1").await.unwrap();

    let w = s
        .run_tool(
            "c1",
            "write_file",
            &json!({"path": "notes/a.txt", "content": "hello\nworld\n"}),
        )
        .await;
    assert!(ok(&w).contains("wrote 12 bytes"));
    let r = s
        .run_tool("c1", "read_file", &json!({"path": "notes/a.txt"}))
        .await;
    assert_eq!(ok(&r), "hello\nworld\n");
    assert_eq!(
        s.ensure_container("c1").await.unwrap(),
        first,
        "same warm container"
    );

    let e = s
        .run_tool(
            "c1",
            "edit_file",
            &json!({"path": "notes/a.txt", "old": "world", "new": "sandbox"}),
        )
        .await;
    assert!(ok(&e).contains("line 2"), "{}", e.output);
    let e = s
        .run_tool(
            "c1",
            "edit_file",
            &json!({"path": "notes/a.txt", "old": "nope", "new": "x"}),
        )
        .await;
    assert!(e.is_error && e.output.contains("not found"), "{}", e.output);
    let l = s
        .run_tool("c1", "list_files", &json!({"path": "notes"}))
        .await;
    assert!(ok(&l).contains("a.txt"));
    let b = env
        .bash("c1", "cat /workspace/notes/a.txt; pwd; id -u")
        .await;
    assert_eq!(ok(&b), "hello\nsandbox\n/workspace\n1000\n");

    // The workspace is the host directory DATA/workspaces/<conversation>.
    let host = env.data.path().join("workspaces/c1/notes/a.txt");
    assert_eq!(std::fs::read_to_string(host).unwrap(), "hello\nsandbox\n");

    // Content larger than pipe buffers and the output cap goes through exec stdin intact.
    let big: String = (0..200_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let w = s
        .run_tool(
            "c1",
            "write_file",
            &json!({"path": "big.txt", "content": big}),
        )
        .await;
    assert!(ok(&w).contains("wrote 200000 bytes"));
    let b = env
        .bash("c1", "wc -c < big.txt; md5sum < big.txt | cut -c1-32")
        .await;
    let host_big = std::fs::read(env.data.path().join("workspaces/c1/big.txt")).unwrap();
    assert_eq!(host_big, big.as_bytes());
    assert!(ok(&b).starts_with("200000\n"), "{}", b.output);
    let r = s
        .run_tool("c1", "read_file", &json!({"path": "big.txt"}))
        .await;
    assert!(ok(&r).contains("output truncated"));
    assert!(r.output.starts_with(&big[..65536]));

    // Missing files are errors, not panics.
    let r = s
        .run_tool("c1", "read_file", &json!({"path": "nope.txt"}))
        .await;
    assert!(r.is_error && r.output.contains("nope.txt"), "{}", r.output);
    // A second conversation gets its own container and workspace.
    let r = s
        .run_tool("c2", "read_file", &json!({"path": "notes/a.txt"}))
        .await;
    assert!(r.is_error);
    assert_ne!(s.ensure_container("c2").await.unwrap(), first);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tools_and_inputs_are_errors_not_panics() {
    let env = sandbox("badinput", |_| {}).await;
    let s = &env.sandbox;
    let o = s.run_tool("c1", "rm_rf", &json!({})).await;
    assert!(
        o.is_error && o.output.contains("unknown tool"),
        "{}",
        o.output
    );
    let o = s.run_tool("c1", "bash", &json!({"cmd": "ls"})).await;
    assert!(
        o.is_error && o.output.contains("invalid input"),
        "{}",
        o.output
    );
    let o = s
        .run_tool("c1", "write_file", &json!("just a string"))
        .await;
    assert!(o.is_error);
    let o = s
        .run_tool("../../etc", "bash", &json!({"command": "true"}))
        .await;
    assert!(
        o.is_error && o.output.contains("conversation id"),
        "{}",
        o.output
    );
    let o = env.bash("c1", "exit 3").await;
    assert!(
        o.is_error && o.output.contains("exit code 3"),
        "{}",
        o.output
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn there_is_no_network() {
    let env = sandbox("net", |_| {}).await;
    let o = env.bash("c1", "ls /sys/class/net").await;
    assert_eq!(ok(&o).split_whitespace().collect::<Vec<_>>(), ["lo"]);
    let o = env.bash("c1", "ip -o link | cut -d: -f2").await;
    assert_eq!(ok(&o).split_whitespace().collect::<Vec<_>>(), ["lo"]);
    // (busybox-static's wget crashes in static glibc's resolver, so nc is the probe.)
    for target in ["10.0.0.1", "172.17.0.1", "1.1.1.1"] {
        let o = env
            .bash("c1", &format!("echo hi | nc -w 2 {target} 80"))
            .await;
        assert!(o.is_error, "{target} reachable: {}", o.output);
        assert!(
            o.output.contains("Network is unreachable"),
            "{target}: {}",
            o.output
        );
    }
    // Loopback exists but nothing of the host listens there (the Docker API port included).
    for port in [80, 2375] {
        let o = env
            .bash("c1", &format!("echo hi | nc -w 2 127.0.0.1 {port}"))
            .await;
        assert!(o.is_error, "127.0.0.1:{port} reachable: {}", o.output);
        assert!(o.output.contains("Connection refused"), "{}", o.output);
    }
    env.sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_key_is_nowhere_in_the_container() {
    {
        let _env = ENV_LOCK.lock().await;
        // SAFETY: every test reads the environment (Docker connect) only while holding
        // ENV_LOCK, and no other thread of this test binary touches the environment.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("ANTHROPIC_API_KEY", CANARY);
        }
    }
    // The whole-filesystem grep takes ~10 s on a quiet machine and over 30 s (the default tool
    // timeout) on a loaded one: give it room, this test is about what it finds.
    let env = sandbox("key", |c| c.tool_timeout_secs = 180).await;
    assert_eq!(std::env::var("ANTHROPIC_API_KEY").as_deref(), Ok(CANARY));
    let probes = [
        "env",
        "cat /proc/1/cmdline | tr '\\0' ' '",
        "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'",
        "grep -rl sk-test-secret $(ls -d /* | grep -v -e '^/proc$' -e '^/sys$' -e '^/dev$') \
         /dev/shm 2>/dev/null; echo scanned",
    ];
    for probe in probes {
        let o = env.bash("c1", probe).await;
        assert!(
            !o.output.contains(CANARY),
            "{probe} found the key: {}",
            o.output
        );
        assert!(!o.output.contains("ANTHROPIC"), "{probe}: {}", o.output);
        assert!(!o.output.is_empty(), "{probe} printed nothing");
    }
    let o = env
        .bash("c1", "grep -rl sk-test $(ls -d /* | grep -v -e '^/proc$' -e '^/sys$' -e '^/dev$') 2>/dev/null | wc -l")
        .await;
    assert_eq!(
        ok(&o).trim(),
        "0",
        "a file in the container holds the canary"
    );
    let o = env.bash("c1", "env | sort").await;
    let vars: Vec<&str> = ok(&o)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    for v in &vars {
        assert!(
            ["HOME", "PATH", "PWD", "SHLVL", "HOSTNAME", "_", "OLDPWD"].contains(v),
            "unexpected variable {v} in {vars:?}"
        );
    }
    env.sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_root_is_read_only_and_workspace_and_tmp_are_writable() {
    let env = sandbox("ro", |_| {}).await;
    for path in ["/x", "/bin/x", "/etc/x", "/etc/passwd"] {
        let o = env.bash("c1", &format!("echo pwned > {path}")).await;
        assert!(o.is_error, "{path} writable: {}", o.output);
        let w = env
            .sandbox
            .run_tool("c1", "write_file", &json!({"path": path, "content": "x"}))
            .await;
        assert!(w.is_error, "{path} writable via write_file");
    }
    let o = env
        .bash(
            "c1",
            "echo a > /workspace/a && echo b > /tmp/b && cat /workspace/a /tmp/b",
        )
        .await;
    assert_eq!(ok(&o), "a\nb\n");
    // /tmp is noexec; the user is not root and has no capabilities.
    let o = env
        .bash("c1", "cp /bin/busybox /tmp/bb && /tmp/bb true")
        .await;
    assert!(o.is_error, "{}", o.output);
    let o = env.bash("c1", "grep CapEff /proc/self/status").await;
    assert!(ok(&o).contains("0000000000000000"), "{}", o.output);
    let o = env
        .bash("c1", "id -u; grep NoNewPrivs /proc/self/status")
        .await;
    assert!(ok(&o).starts_with("1000\n") && o.output.contains("NoNewPrivs:\t1"));
    env.sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runaway_processes_are_contained() {
    let env = sandbox("runaway", |c| {
        c.tool_timeout_secs = 3;
        c.memory_mb = 64;
        c.pids_limit = 32;
    })
    .await;
    let s = &env.sandbox;
    let before = s.ensure_container("c1").await.unwrap();

    // An endless loop hits the wall-clock limit; the container is replaced.
    let t = Instant::now();
    let o = env.bash("c1", "while :; do :; done").await;
    assert!(o.is_error && o.output.contains("timed out"), "{}", o.output);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(ok(&env.bash("c1", "echo alive").await), "alive\n");
    assert_ne!(s.ensure_container("c1").await.unwrap(), before);

    // A classic fork bomb runs into pids_limit and burns out; the container stays usable.
    let t = Instant::now();
    let o = env.bash("c1", "bomb() { bomb | bomb & }; bomb").await;
    assert!(
        o.is_error || o.output.contains("can't fork"),
        "{}",
        o.output
    );
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(ok(&env.bash("c1", "echo alive").await), "alive\n");
    // A spawner that leaves the process table full gets the container reset.
    let o = env.bash("c1", "while :; do sleep 60 & done").await;
    assert!(o.is_error && o.output.contains("reset"), "{}", o.output);
    assert_eq!(ok(&env.bash("c1", "echo alive | cat").await), "alive\n");
    let o = env.bash("c1", "ps -o args | grep -c '^sleep 60'").await;
    assert!(
        o.output.starts_with("0\n"),
        "leftover processes: {}",
        o.output
    );

    // Memory bombs are OOM-killed inside the cgroup.
    let o = env.bash("c1", "head -c 1073741824 /dev/zero | tail").await;
    assert!(o.is_error, "{}", o.output);
    assert!(
        o.output.contains("137") || o.output.contains("timed out"),
        "{}",
        o.output
    );
    let o = env
        .bash("c1", "s=xxxxxxxx; while :; do s=\"$s$s\"; done")
        .await;
    assert!(o.is_error, "{}", o.output);
    assert_eq!(ok(&env.bash("c1", "echo alive").await), "alive\n");

    // Endless output is cut at the cap and the call returns promptly.
    let t = Instant::now();
    let o = env.bash("c1", "yes").await;
    assert!(
        o.output.contains("output truncated"),
        "{}",
        &o.output[..200]
    );
    assert!(o.output.len() < 64 * 1024 + 200);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let o = env.bash("c1", "ps -o args | grep -c '^yes'").await;
    assert!(
        o.output.starts_with("0\n"),
        "yes still running: {}",
        o.output
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn orphans_of_this_node_are_reaped_and_others_are_not() {
    let crashed = sandbox("orphan", |_| {}).await;
    let orphan = crashed.sandbox.ensure_container("c1").await.unwrap();
    let other = sandbox("bystander", |_| {}).await;
    let bystander = other.sandbox.ensure_container("c1").await.unwrap();
    // "Crash": forget the runtime without shutting it down.
    let data = crashed.data;
    drop(crashed.sandbox);

    let node = format!("t{}{}", std::process::id(), "orphan");
    let _guard = NodeGuard(node.clone());
    let restarted = connect(SandboxConfig::default(), data.path(), &node)
        .await
        .unwrap();
    assert_eq!(restarted.reap_orphans().await.unwrap(), 1);
    let d = restarted.docker();
    assert!(
        d.inspect_container(&orphan, None).await.is_err(),
        "orphan still there"
    );
    assert!(
        d.inspect_container(&bystander, None).await.is_ok(),
        "bystander reaped"
    );
    // The restarted node recreates the conversation's container on demand.
    assert_eq!(
        ok(&restarted
            .run_tool("c1", "bash", &json!({"command": "echo back"}))
            .await),
        "back\n"
    );
    restarted.shutdown().await;
    other.sandbox.shutdown().await;
    assert!(d.inspect_container(&bystander, None).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_containers_are_reaped() {
    let env = sandbox("idle", |c| c.idle_timeout_secs = 1).await;
    let id = env.sandbox.ensure_container("c1").await.unwrap();
    assert_eq!(env.sandbox.reap_idle().await, 0, "fresh container reaped");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(env.sandbox.reap_idle().await, 1);
    let d = env.sandbox.docker();
    assert!(d.inspect_container(&id, None).await.is_err());
    assert_eq!(ok(&env.bash("c1", "echo again").await), "again\n");
    env.sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_background_reaper_removes_idle_containers_and_cleans_up_on_shutdown() {
    let Env {
        sandbox,
        data: _data,
        _guard,
        _mounts,
    } = sandbox("reaper", |c| c.idle_timeout_secs = 1).await;
    let sandbox = std::sync::Arc::new(sandbox);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = std::sync::Arc::clone(&sandbox).spawn_reaper(stop.clone());
    let idle = sandbox.ensure_container("idle").await.unwrap();
    let d = sandbox.docker().clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.inspect_container(&idle, None).await.is_ok() {
        assert!(Instant::now() < deadline, "idle container not reaped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let busy = sandbox.ensure_container("busy").await.unwrap();
    stop.cancel();
    task.await.unwrap();
    assert!(
        d.inspect_container(&busy, None).await.is_err(),
        "not removed at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_engine_gives_an_actionable_error() {
    let data = tempfile::tempdir().unwrap();
    let _env = ENV_LOCK.lock().await;
    let saved = std::env::var_os("DOCKER_HOST");
    // SAFETY: the environment is only read or changed while holding ENV_LOCK.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("DOCKER_HOST", "unix:///nonexistent/docker.sock");
    }
    let res = Sandbox::connect(
        SandboxConfig::default(),
        data.path().to_path_buf(),
        "x".into(),
    )
    .await;
    let items = check(&SandboxConfig::default(), data.path()).await;
    #[allow(unsafe_code)]
    unsafe {
        match saved {
            Some(v) => std::env::set_var("DOCKER_HOST", v),
            None => std::env::remove_var("DOCKER_HOST"),
        }
    }
    match res {
        Err(e @ SandboxError::DockerUnreachable { .. }) => {
            assert!(e.to_string().contains("systemctl start docker"), "{e}")
        }
        other => panic!("expected DockerUnreachable, got {other:?}"),
    }
    let socket = &items[0];
    assert!(
        !socket.ok && socket.detail.contains("systemctl start docker"),
        "{socket:?}"
    );
    assert!(items.iter().any(|i| i.name == "configured mounts" && i.ok));
}

fn mount_fixture() -> (TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::write(root.join("docs/readme.txt"), "shared text\n").unwrap();
    std::fs::create_dir_all(root.join(".ssh")).unwrap();
    std::fs::create_dir_all(tmp.path().join("private")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("private"), root.join("escape")).unwrap();
    (tmp, root)
}

async fn connect_with_mount(
    root: &Path,
    data: &Path,
    host: PathBuf,
) -> Result<Sandbox, SandboxError> {
    ensure_image().await;
    let cfg = SandboxConfig {
        allowed_roots: vec![root.to_path_buf()],
        mounts: vec![MountSpec {
            host,
            container: "/data".into(),
            writable: false,
        }],
        ..SandboxConfig::default()
    };
    connect(cfg, data, &mount_node()).await
}

fn mount_node() -> String {
    format!("t{}mount", std::process::id())
}

#[tokio::test(flavor = "multi_thread")]
async fn mounts_are_policed() {
    let _guard = NodeGuard(mount_node());
    let (tmp, root) = mount_fixture();
    let data = tmp.path().join("data");
    match connect_with_mount(&root, &data, root.join(".ssh")).await {
        Err(SandboxError::Mount(MountError::Blocked { pattern, .. })) => {
            assert_eq!(pattern, ".ssh")
        }
        other => panic!("expected Blocked, got {other:?}"),
    }
    match connect_with_mount(&root, &data, root.join("escape")).await {
        Err(SandboxError::Mount(MountError::SymlinkEscape { .. })) => {}
        other => panic!("expected SymlinkEscape, got {other:?}"),
    }
    // A clean directory is mounted read-only.
    let s = connect_with_mount(&root, &data, root.join("docs"))
        .await
        .unwrap();
    let o = s
        .run_tool("c1", "read_file", &json!({"path": "/data/readme.txt"}))
        .await;
    assert_eq!(ok(&o), "shared text\n");
    let o = s
        .run_tool("c1", "bash", &json!({"command": "echo x > /data/new"}))
        .await;
    assert!(o.is_error, "{}", o.output);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn check_passes_on_this_machine() {
    ensure_image().await;
    let data = tempfile::tempdir().unwrap();
    let items = {
        let _env = ENV_LOCK.lock().await;
        check(&SandboxConfig::default(), data.path()).await
    };
    for i in &items {
        assert!(i.ok, "check {:?} failed: {}", i.name, i.detail);
    }
    let names: Vec<&str> = items.iter().map(|i| i.name.as_str()).collect();
    for n in [
        "Docker socket",
        "sandbox image",
        "non-root user",
        "no network",
    ] {
        assert!(names.contains(&n), "{names:?}");
    }
    // A missing image is reported with the command that fixes it.
    let cfg = SandboxConfig {
        image: "iom-sandbox:does-not-exist".into(),
        ..SandboxConfig::default()
    };
    let items = {
        let _env = ENV_LOCK.lock().await;
        check(&cfg, data.path()).await
    };
    let img = items.iter().find(|i| i.name == "sandbox image").unwrap();
    assert!(
        !img.ok && img.detail.contains("iom sandbox build"),
        "{img:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rootfs_directory_can_be_imported() {
    let d = docker().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for a in ["sh", "echo", "cat", "sleep", "id"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/motd"), "custom rootfs\n").unwrap();
    let tag = format!("iom-sandbox-test:dir{}", std::process::id());
    let image = build_image(&d, Some(root), &tag).await.unwrap();
    assert_eq!(image, tag);

    // The same rootfs as a tarball (streamed from disk).
    let tarball = dir
        .path()
        .join("..")
        .join(format!("rootfs{}.tar", std::process::id()));
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(root)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let tar_tag = format!("iom-sandbox-test:tar{}", std::process::id());
    let res = build_image(&d, Some(&tarball), &tar_tag).await;
    let _ = std::fs::remove_file(&tarball);
    assert_eq!(res.unwrap(), tar_tag);
    let _ = d
        .remove_image(
            &tar_tag,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await;

    ensure_image().await;
    let data = tempfile::tempdir().unwrap();
    let cfg = SandboxConfig {
        image: tag.clone(),
        ..SandboxConfig::default()
    };
    let node = format!("t{}rootfs", std::process::id());
    let _guard = NodeGuard(node.clone());
    let s = connect(cfg, data.path(), &node).await.unwrap();
    let o = s
        .run_tool("c1", "bash", &json!({"command": "cat /etc/motd; id -u"}))
        .await;
    assert_eq!(ok(&o), "custom rootfs\n1000\n");
    s.shutdown().await;
    let _ = d
        .remove_image(
            &tag,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await;
}

// ---------------------------------------------------------------------------------------------
// The workspace disk quota (root: loop-mounted ext4 images).
// ---------------------------------------------------------------------------------------------

/// `bash` in conversation `c1`.
async fn bash(s: &Sandbox, command: &str) -> ToolOutcome {
    s.run_tool("c1", "bash", &json!({ "command": command }))
        .await
}

/// Bytes a file really occupies on its disk.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workspace_stops_at_its_quota_and_keeps_its_files_across_restarts() {
    require_root();
    ensure_image().await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().to_path_buf();
    let _mounts = MountGuard(data.clone());
    let guard = NodeGuard(format!("t{}quotadd", std::process::id()));
    let cfg = SandboxConfig {
        workspace_quota_mb: 64,
        quota: iom_node::agent::sandbox::quota::QuotaMode::Required,
        tool_timeout_secs: 60,
        ..SandboxConfig::default()
    };
    let s1 = connect(cfg.clone(), &data, &guard.0).await.unwrap();
    // A workspace from before the quota: its files move into the new image.
    let old = data.join("workspaces/c1");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("old.txt"), "from before\n").unwrap();
    let o = bash(&s1, "cat /workspace/old.txt; df -m /workspace | tail -1").await;
    let out = ok(&o).to_string();
    assert!(out.starts_with("from before"), "{out}");
    let img = data.join("workspace-images/c1.img");
    assert!(img.is_file());
    // 3 GiB of zeros: stopped at the quota, by the filesystem, while dd runs.
    let o = bash(
        &s1,
        "dd if=/dev/zero of=/workspace/fill bs=1M count=3072; echo rc=$?; \
         stat -c %s /workspace/fill",
    )
    .await;
    eprintln!("dd: {}", o.output);
    assert!(o.output.contains("No space left on device"), "{}", o.output);
    let size: u64 = o
        .output
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no size in {}", o.output));
    assert!(size <= 64 << 20, "the file is {size} bytes");
    assert!(
        allocated(&img) <= 65 << 20,
        "image takes {}",
        allocated(&img)
    );
    // An attachment written by the node goes into the image too: no space for it now.
    let e = s1
        .write_workspace_file("c1", "attachments", "a.bin", vec![7u8; 16 << 20])
        .await;
    assert!(
        e.is_err(),
        "an attachment was written into a full workspace"
    );
    ok(&bash(&s1, "rm /workspace/fill").await);
    s1.write_workspace_file("c1", "attachments", "a.bin", vec![7u8; 1 << 20])
        .await
        .unwrap();
    let o = bash(&s1, "wc -c < /workspace/attachments/a.bin").await;
    assert_eq!(ok(&o).trim(), "1048576");
    // Deleted files give their blocks back to the host disk (mounted with discard).
    // (ext4 discards them when the journal commits, within about 5 s.)
    ok(&bash(&s1, "rm /workspace/attachments/a.bin; sync").await);
    let deadline = Instant::now() + Duration::from_secs(30);
    while allocated(&img) >= 16 << 20 {
        assert!(
            Instant::now() < deadline,
            "image still takes {}",
            allocated(&img)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A crash: the sandbox goes without shutdown; its mount stays behind.
    drop(s1);
    let (mounts, _) = mounts_and_loops_under(&data);
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    // The next run unmounts the orphan and mounts the same image again: files kept.
    let s2 = connect(cfg, &data, &guard.0).await.unwrap();
    s2.reap_orphans().await.unwrap();
    assert!(mounts_and_loops_under(&data).0.is_empty());
    let o = bash(&s2, "cat /workspace/old.txt").await;
    assert_eq!(ok(&o), "from before\n");
    s2.shutdown().await;
    // Nothing left behind: no mount, no loop device.
    let (mounts, loops) = mounts_and_loops_under(&data);
    assert!(
        mounts.is_empty() && loops.is_empty(),
        "{mounts:?} {loops:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_total_quota_evicts_idle_workspaces_and_refuses_when_all_are_busy() {
    require_root();
    // 32 MiB each, 80 MiB in total: two mounted workspaces fit, a third only after an
    // idle one is unmounted.
    let env = sandbox("quota_total", |c| {
        c.workspace_quota_mb = 32;
        c.workspaces_total_mb = 80;
    })
    .await;
    let data = env.data.path().to_path_buf();
    ok(&env.bash("a", "echo a > /workspace/f").await);
    ok(&env.bash("b", "echo b > /workspace/f").await);
    let (mounts, _) = mounts_and_loops_under(&data);
    assert_eq!(mounts.len(), 2, "{mounts:?}");
    // c: a is the least recently used idle workspace, so it is unmounted (files kept).
    ok(&env.bash("c", "echo c > /workspace/f").await);
    let names: Vec<String> = mounts_and_loops_under(&data)
        .0
        .iter()
        .filter_map(|m| m.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    assert!(
        names.contains(&"b".to_string()) && names.contains(&"c".to_string()),
        "{names:?}"
    );
    assert!(!names.contains(&"a".to_string()), "{names:?}");
    // a comes back (b is evicted now) with its file.
    assert_eq!(ok(&env.bash("a", "cat /workspace/f").await), "a\n");
    // While a and c are both busy, d cannot be mounted: a clear tool error, nothing evicted.
    let (x, y, d) = tokio::join!(
        env.bash("a", "sleep 4; echo done"),
        env.bash("c", "sleep 4; echo done"),
        async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            env.bash("d", "echo d").await
        }
    );
    assert_eq!(ok(&x).trim(), "done");
    assert_eq!(ok(&y).trim(), "done");
    assert!(d.is_error, "{}", d.output);
    assert!(
        d.output.contains("workspaces_total_mb") && d.output.contains("no space"),
        "{}",
        d.output
    );
    // Once they are idle again, d gets its workspace.
    ok(&env.bash("d", "echo d").await);
    env.sandbox.shutdown().await;
    let (mounts, loops) = mounts_and_loops_under(&data);
    assert!(
        mounts.is_empty() && loops.is_empty(),
        "{mounts:?} {loops:?}"
    );
}
