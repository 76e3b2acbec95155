//! MCP servers (issue 13) end to end: real `iom` processes, the real Docker engine, real MCP
//! servers from PyPI (`mcp-server-time`, `mcp-server-git`, `mcp-server-fetch`) installed offline into the python
//! image (`iom sandbox build --python`), and the fake Messages API, which calls their tools
//! like a model would. A tiny misbehaving server (`tests/mcp/misbehaving_server.py`, mounted
//! read-only) crashes, hangs, prints garbage and floods stdout on request.
//!
//! Needs Docker and root (debootstrap, the first time; the rootfs is cached under
//! `$IOM_TEST_CACHE`, default `/var/tmp/iom-test-cache`) and PyPI for `pip download` once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig};
use iom_tests::harness::{Node, containers_of, iom_bin, scenario, wait_mesh, wait_until};
use serde_json::{Value, json};

const IMAGE: &str = "iom-sandbox-python:1";
const PINS: &[&str] = &[
    "mcp-server-time==2026.10.19",
    "mcp-server-git==2026.10.19",
    "mcp-server-fetch==2026.10.24",
];

fn cache_dir() -> PathBuf {
    std::env::var_os("IOM_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/iom-test-cache"))
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The python image with the two PyPI servers: built with `iom sandbox build --python
/// --wheels DIR` unless it is there already. Panics (loudly) without Docker.
fn require_python_image() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let r = READY.get_or_init(|| build_image_once().map_err(|e| format!("{e:#}")));
    if let Err(e) = r {
        panic!("{e}\nThese tests need Docker, root and (once) PyPI: see scripts/install-deps.sh");
    }
}

fn build_image_once() -> Result<()> {
    run(Command::new("docker").args(["version", "--format", "{{.Server.Version}}"]))
        .context("the Docker engine is not reachable")?;
    let has_servers = Command::new("docker")
        .args(["run", "--rm", "--network", "none", IMAGE, "python3", "-c"])
        .arg("import mcp_server_time, mcp_server_git, mcp_server_fetch")
        .output()
        .is_ok_and(|o| o.status.success());
    if has_servers {
        return Ok(());
    }
    let wheels = cache_dir().join("wheels");
    let have_wheels = std::fs::read_dir(&wheels)
        .map(|d| {
            let names: Vec<String> = d
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            ["mcp_server_git", "mcp_server_fetch"]
                .iter()
                .all(|w| names.iter().any(|n| n.starts_with(w)))
        })
        .unwrap_or(false);
    if !have_wheels {
        // Wheels for trixie's python3.13 on x86_64, whatever python runs pip here.
        run(Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--only-binary=:all:"])
            .args([
                "--python-version",
                "3.13",
                "--platform",
                "manylinux_2_17_x86_64",
            ])
            .args([
                "--platform",
                "manylinux2014_x86_64",
                "--platform",
                "manylinux_2_28_x86_64",
            ])
            .args(["--platform", "any", "--dest"])
            .arg(&wheels)
            .args(PINS))
        .context("pip download of the MCP servers")?;
    }
    let data = tempfile::tempdir()?;
    run(Command::new(iom_bin())
        .env("IOM_CACHE_DIR", cache_dir())
        .arg("--data-dir")
        .arg(data.path())
        .args(["sandbox", "build", "--python", "--wheels"])
        .arg(&wheels))
    .context("iom sandbox build --python")?;
    Ok(())
}

/// The fake Messages API on its own runtime.
struct Fake {
    server: Option<FakeAnthropic>,
    rt: tokio::runtime::Runtime,
}

impl Fake {
    fn start() -> Result<Fake> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let server = rt.block_on(FakeAnthropic::start(FakeConfig {
            api_key: "sk-ant-iomtest-mcp".into(),
            instant: true,
            ..FakeConfig::default()
        }))?;
        Ok(Fake {
            server: Some(server),
            rt,
        })
    }

    fn fake(&self) -> &FakeAnthropic {
        self.server.as_ref().expect("present until drop")
    }

    /// The tool names of the last request the fake saw.
    fn last_tools(&self) -> Vec<String> {
        self.fake()
            .requests()
            .last()
            .and_then(|r| r.body["tools"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _guard = self.rt.enter();
        drop(self.server.take());
    }
}

/// Removes the node's containers when dropped.
struct Reap(String);

impl Drop for Reap {
    fn drop(&mut self) {
        for c in containers_of(&self.0) {
            let _ = Command::new("docker").args(["rm", "-f", &c]).output();
        }
    }
}

/// An agent node that may mount paths under `root` into MCP containers.
fn agent_node(fake: &Fake, root: &Path) -> Result<Node> {
    let mut n = Node::new("home")?;
    n.env
        .push(("ANTHROPIC_API_KEY".into(), fake.fake().api_key().into()));
    n.env.push((
        "ANTHROPIC_BASE_URL".into(),
        fake.fake().url().replace("0.0.0.0", "127.0.0.1"),
    ));
    std::fs::write(
        n.dir.join("config.toml"),
        format!(
            "[sandbox]\nallowed_roots = [{:?}]\n",
            root.display().to_string()
        ),
    )?;
    Ok(n)
}

fn assign_self(n: &Node) -> Result<()> {
    n.json(&["agent", "assign", &n.name])?;
    let id = n.device_id()?;
    wait_until("the agent role", Duration::from_secs(15), || {
        Ok(n.json(&["agent", "status"])?["agent"] == id.as_str())
    })
}

/// `iom ask PROMPT --json` that must end `done`; returns (conversation, request id, text).
fn ask(node: &Node, prompt: &str) -> Result<(String, String, String)> {
    let v = node.json(&["ask", prompt])?;
    if v["result"]["type"] != "done" {
        bail!("the request did not end done: {v}");
    }
    let s = |k: &str| {
        v[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no {k} in {v}"))
    };
    Ok((
        s("conversation")?,
        s("request_id")?,
        v["result"]["text"].as_str().unwrap_or_default().to_string(),
    ))
}

/// The tool calls of the reply to `rid`, as `node` sees them (waiting for the reply).
fn tool_calls(node: &Node, conversation: &str, rid: &str) -> Result<Vec<Value>> {
    let mut calls = Vec::new();
    wait_until(
        &format!("{} to have the reply to {rid}", node.name),
        Duration::from_secs(20),
        || {
            let c = node.json(&["conversations", "show", conversation])?;
            let reply = c["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["role"] == "assistant" && m["reply_to"] == rid)
                .cloned();
            match reply {
                Some(r) => {
                    calls = r["tool_calls"].as_array().cloned().unwrap_or_default();
                    Ok(true)
                }
                None => Ok(false),
            }
        },
    )?;
    Ok(calls)
}

/// `iom tools list --json` on `node`, the server `name`.
fn server(node: &Node, name: &str) -> Result<Value> {
    let list = node.json(&["tools", "list"])?;
    Ok(list["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or(Value::Null))
}

/// Waits until `node` lists server `name` in `state` (and, if given, with more than
/// `restarts` restarts).
fn wait_state(node: &Node, name: &str, state: &str, restarts: Option<u64>) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(
        &format!("{} to list MCP server {name} {state}", node.name),
        Duration::from_secs(180),
        || {
            last = server(node, name)?;
            Ok(last["state"] == state
                && restarts.is_none_or(|r| last["restarts"].as_u64().unwrap_or(0) > r))
        },
    )
    .map_err(|e| anyhow!("{e}; last: {last}"))?;
    Ok(last)
}

fn mcp_containers(device: &str) -> Vec<String> {
    containers_of(device)
        .into_iter()
        .filter(|c| {
            run(Command::new("docker").args([
                "inspect",
                "-f",
                "{{index .Config.Labels \"iom.mcp\"}}",
                c,
            ]))
            .is_ok_and(|l| !l.trim().is_empty())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn real_pypi_servers_answer_the_model_for_a_non_agent_device() {
    require_python_image();
    scenario(real_servers_body);
}

fn real_servers_body() -> Result<()> {
    let fake = Fake::start()?;
    let root = tempfile::tempdir()?;
    let repo = root.path().join("repo");
    std::fs::create_dir(&repo)?;
    std::fs::write(repo.join("README"), "hello\n")?;
    let git = |args: &[&str]| {
        run(Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["-c", "user.name=Test", "-c", "user.email=t@example.org"])
            .args(args))
    };
    git(&["init", "-q"])?;
    git(&["add", "README"])?;
    git(&["commit", "-q", "-m", "first commit from the mcp test"])?;
    // The container user (uid 1000) owns it, so git trusts it.
    run(Command::new("chown").args(["-R", "1000:1000"]).arg(&repo))?;

    let mut home = agent_node(&fake, root.path())?;
    let mut laptop = Node::new("laptop")?;
    let mut phone = Node::new("phone")?;
    home.start()?;
    laptop.start()?;
    phone.start()?;
    let _reap = Reap(home.device_id()?);
    let code = home.invite(true)?;
    laptop.cli(&["join", &code])?;
    let code = home.invite(false)?;
    phone.cli(&["join", &code])?;
    wait_mesh(&[&home, &laptop, &phone], Duration::from_secs(30))?;
    assign_self(&home)?;

    // Only admin devices declare servers (a server runs code on the agent node).
    let (_, err) = phone.fail(&[
        "tools",
        "add",
        "time",
        "--",
        "python3",
        "-m",
        "mcp_server_time",
    ])?;
    assert!(err.contains("admin"), "{err}");

    // The laptop (an admin, not the agent) declares both; the agent starts them, no restart.
    laptop.cli(&[
        "tools",
        "add",
        "time",
        "--",
        "python3",
        "-m",
        "mcp_server_time",
        "--local-timezone",
        "UTC",
    ])?;
    let mount = format!("{}:/repo", repo.display());
    laptop.cli(&[
        "tools",
        "add",
        "git",
        "--mount",
        &mount,
        "--",
        "python3",
        "-m",
        "mcp_server_git",
        "--repository",
        "/repo",
    ])?;
    let time = wait_state(&laptop, "time", "ready", None)?;
    let git_server = wait_state(&laptop, "git", "ready", None)?;
    let names = |s: &Value| -> Vec<String> {
        s["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .collect()
    };
    assert!(
        names(&time).contains(&"mcp__time__get_current_time".to_string()),
        "{time}"
    );
    assert!(
        names(&git_server).contains(&"mcp__git__git_log".to_string()),
        "{git_server}"
    );
    let text = laptop.cli(&["tools", "list"])?;
    assert!(
        text.contains("mcp__git__git_status") && text.contains("ready"),
        "{text}"
    );

    // Their containers are as locked down as the tool sandbox.
    let ids = mcp_containers(&home.device_id()?);
    assert_eq!(ids.len(), 2, "{ids:?}");
    for c in &ids {
        let h = run(Command::new("docker").args([
            "inspect", "-f",
            "{{.HostConfig.NetworkMode}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.Config.User}} {{.HostConfig.PidsLimit}} {{.HostConfig.Memory}}",
            c,
        ]))?;
        assert_eq!(h.trim(), "none true [ALL] 1000:1000 64 268435456", "{c}");
    }

    // The laptop asks; the model calls one tool of each server.
    let prompt = format!(
        "what time is it in Paris, and what was committed? [[tool mcp__time__get_current_time {}]] \
         [[tool mcp__git__git_log {}]]",
        json!({"timezone": "Europe/Paris"}),
        json!({"repo_path": "/repo", "max_count": 3}),
    );
    let (conv, rid, answer) = ask(&laptop, &prompt)?;
    assert!(answer.contains("Europe/Paris"), "{answer}");
    assert!(
        answer.contains("first commit from the mcp test"),
        "{answer}"
    );
    // The model was offered the servers' tools with their input schemas, in a stable order.
    let first = fake
        .fake()
        .requests()
        .into_iter()
        .find(|r| r.body.to_string().contains("what time is it in Paris"))
        .ok_or_else(|| anyhow!("the fake saw no request"))?;
    let tools = first.body["tools"].as_array().cloned().unwrap_or_default();
    let t = tools
        .iter()
        .find(|t| t["name"] == "mcp__time__get_current_time")
        .ok_or_else(|| anyhow!("not offered: {tools:?}"))?;
    assert!(
        t["input_schema"]["properties"]["timezone"].is_object(),
        "{t}"
    );
    let mcp_names: Vec<&str> = tools
        .iter()
        .filter_map(|t| t["name"].as_str())
        .filter(|n| n.starts_with("mcp__"))
        .collect();
    let mut sorted = mcp_names.clone();
    sorted.sort_unstable();
    assert_eq!(mcp_names, sorted);
    // The results are in the conversation, on the phone too.
    let calls = tool_calls(&phone, &conv, &rid)?;
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0]["name"], "mcp__time__get_current_time");
    assert_eq!(calls[0]["is_error"], false, "{calls:?}");
    assert!(
        calls[0]["output"]
            .as_str()
            .is_some_and(|o| o.contains("Europe/Paris")),
        "{calls:?}"
    );
    assert_eq!(calls[1]["is_error"], false, "{calls:?}");
    assert!(
        calls[1]["output"]
            .as_str()
            .is_some_and(|o| o.contains("first commit from the mcp test")),
        "{calls:?}"
    );

    // Disabled from the laptop: its container goes, its tools are no longer offered.
    laptop.cli(&["tools", "disable", "time"])?;
    wait_state(&laptop, "time", "disabled", None)?;
    wait_until("the time container to go", Duration::from_secs(20), || {
        Ok(mcp_containers(&home.device_id()?).len() == 1)
    })?;
    ask(&laptop, "anything new?")?;
    let offered = fake.last_tools();
    assert!(
        !offered.iter().any(|n| n.starts_with("mcp__time__")),
        "{offered:?}"
    );
    assert!(
        offered.iter().any(|n| n == "mcp__git__git_log"),
        "{offered:?}"
    );
    laptop.cli(&["tools", "remove", "git"])?;
    wait_until("git to be removed", Duration::from_secs(20), || {
        Ok(server(&laptop, "git")?.is_null() && mcp_containers(&home.device_id()?).is_empty())
    })?;
    home.assert_no_panic()?;
    Ok(())
}

#[test]
fn a_server_that_crashes_hangs_floods_or_prints_garbage_is_restarted() {
    require_python_image();
    scenario(misbehaving_body);
}

fn misbehaving_body() -> Result<()> {
    let fake = Fake::start()?;
    let root = tempfile::tempdir()?;
    let dir = root.path().join("bad");
    std::fs::create_dir(&dir)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp/misbehaving_server.py");
    std::fs::copy(&script, dir.join("server.py"))?;
    let mut home = agent_node(&fake, root.path())?;
    home.start()?;
    let _reap = Reap(home.device_id()?);
    assign_self(&home)?;
    let mount = format!("{}:/srv/bad", dir.display());
    home.cli(&[
        "tools",
        "add",
        "bad",
        "--timeout",
        "3",
        "--mount",
        &mount,
        "--",
        "python3",
        "/srv/bad/server.py",
    ])?;
    wait_state(&home, "bad", "ready", None)?;

    let call = |tool: &str| -> Result<Value> {
        let (conv, rid, _) = ask(&home, &format!("please [[tool mcp__bad__{tool} {{}}]]"))?;
        let calls = tool_calls(&home, &conv, &rid)?;
        calls
            .first()
            .cloned()
            .ok_or_else(|| anyhow!("no tool call for {tool}"))
    };
    let ok = call("ok")?;
    assert_eq!(ok["is_error"], false, "{ok}");
    let first = ok["output"].as_str().unwrap_or_default().to_string();
    assert!(first.starts_with("fine from instance"), "{ok}");

    let mut restarts = 0;
    for (tool, says) in [
        ("crash", "failed during the call"),
        ("hang", "did not answer within 3s"),
        ("garbage", "not JSON-RPC"),
        ("flood", "flooded stdout"),
    ] {
        let started = std::time::Instant::now();
        let r = call(tool)?;
        assert_eq!(r["is_error"], true, "{tool}: {r}");
        let out = r["output"].as_str().unwrap_or_default();
        assert!(out.contains(says), "{tool}: {out}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{tool} took {:?}",
            started.elapsed()
        );
        // Reported, restarted after a back-off, and working again.
        let s = wait_state(&home, "bad", "ready", Some(restarts))?;
        restarts = s["restarts"].as_u64().unwrap_or(0);
        let again = call("ok")?;
        assert_eq!(again["is_error"], false, "after {tool}: {again}");
        assert_ne!(
            again["output"].as_str(),
            Some(first.as_str()),
            "a new instance after {tool}"
        );
    }
    assert!(restarts >= 4, "{restarts}");
    let listed = server(&home, "bad")?;
    assert!(
        listed["error"]
            .as_str()
            .is_some_and(|e| e.contains("flooded")),
        "{listed}"
    );
    // The node is fine: its status answers and nothing panicked.
    home.json(&["status"])?;
    home.assert_no_panic()?;
    Ok(())
}

/// A plain HTTP server on the host that records the request heads it gets.
struct Recorder {
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Recorder {
    fn start(bind: &str, body: &'static str) -> Result<Recorder> {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind(format!("{bind}:0"))?;
        let port = l.local_addr()?.port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                if let Ok(mut v) = s.lock() {
                    v.push(String::from_utf8_lossy(&buf).into_owned());
                }
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Ok(Recorder { port, seen })
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// From inside `container`, tries a TCP connection to each `host:port`; returns each one's
/// outcome (`open`, or `closed` with the error).
fn probe(container: &str, targets: &[String]) -> Result<Vec<(String, String)>> {
    let script = "import socket, sys\n\
        for a in sys.argv[1:]:\n\
        \x20   h, p = a.rsplit(':', 1)\n\
        \x20   s = socket.socket(); s.settimeout(3)\n\
        \x20   try:\n\
        \x20       s.connect((h, int(p))); print(a, 'open')\n\
        \x20   except Exception as e:\n\
        \x20       print(a, 'closed', type(e).__name__, e)\n\
        \x20   finally:\n\
        \x20       s.close()\n";
    let out = run(Command::new("docker")
        .args(["exec", container, "python3", "-c", script])
        .args(targets))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, r)| (a.to_string(), r.to_string()))
        .collect())
}

fn container_of(device: &str, server: &str) -> Result<String> {
    mcp_containers(device)
        .into_iter()
        .find(|c| {
            run(Command::new("docker").args([
                "inspect",
                "-f",
                "{{index .Config.Labels \"iom.mcp\"}}",
                c,
            ]))
            .is_ok_and(|l| l.trim() == server)
        })
        .ok_or_else(|| anyhow!("no container for MCP server {server}"))
}

#[test]
fn egress_reaches_only_allowlisted_hosts_and_the_proxy_adds_the_secret() {
    require_python_image();
    scenario(egress_body);
}

fn egress_body() -> Result<()> {
    let fake = Fake::start()?;
    let root = tempfile::tempdir()?;
    let allowed = Recorder::start("127.0.0.1", "hello from the allowed host")?;
    let other = Recorder::start("127.0.0.1", "you should not see this")?;
    // Listens on every address of the host: what a container with a network could reach.
    let sentinel = Recorder::start("0.0.0.0", "sentinel")?;
    let secret = format!("s3cret-of-the-agent-node-{}", std::process::id());
    let env_secret = format!("env-secret-{}", std::process::id());
    let mut home = agent_node(&fake, root.path())?;
    home.env
        .push(("IOM_TEST_EGRESS_TOKEN".into(), secret.clone()));
    home.env
        .push(("IOM_TEST_EGRESS_ENV_TOKEN".into(), env_secret.clone()));
    home.start()?;
    let device = home.device_id()?;
    let _reap = Reap(device.clone());
    assign_self(&home)?;

    let host = format!("127.0.0.1:{}", allowed.port);
    let header = format!("{host}=Authorization: Bearer {{env:IOM_TEST_EGRESS_TOKEN}}");
    let fetch = [
        "--",
        "python3",
        "-m",
        "mcp_server_fetch",
        "--ignore-robots-txt",
        "--allow-private-ips",
    ];
    let mut add_web = vec![
        "tools",
        "add",
        "web",
        "--allow-host",
        &host,
        "--secret-header",
        &header,
    ];
    add_web.extend(fetch);
    home.cli(&add_web)?;
    // No egress; a secret in its environment only with the flag, and a warning.
    let mut add_offline = vec![
        "tools",
        "add",
        "offline",
        "--secret-env",
        "FETCH_TOKEN={env:IOM_TEST_EGRESS_ENV_TOKEN}",
    ];
    add_offline.extend(fetch);
    let out = home.try_cli(&add_offline)?;
    assert!(out.status.success(), "{out:?}");
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(
        warned.contains("warning: --secret-env") && warned.contains("Prefer"),
        "{warned}"
    );
    wait_state(&home, "web", "ready", None)?;
    wait_state(&home, "offline", "ready", None)?;
    let listed = home.cli(&["tools", "list"])?;
    assert!(listed.contains(&format!("egress: {host}")), "{listed}");
    assert!(listed.contains("network: none"), "{listed}");
    // The declaration that synced holds where the secret is, never its value.
    assert!(!listed.contains(&secret), "{listed}");

    let url = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");
    let prompt = format!(
        "fetch these [[tool mcp__web__fetch {}]] [[tool mcp__web__fetch {}]] \
         [[tool mcp__offline__fetch {}]]",
        json!({"url": url(allowed.port, "/page"), "raw": true}),
        json!({"url": url(other.port, "/"), "raw": true}),
        json!({"url": url(allowed.port, "/offline"), "raw": true}),
    );
    let (conv, rid, _) = ask(&home, &prompt)?;
    let calls = tool_calls(&home, &conv, &rid)?;
    assert_eq!(calls.len(), 3, "{calls:?}");
    let output = |i: usize| calls[i]["output"].as_str().unwrap_or_default().to_string();
    // 1. The allowlisted host answers, and got the secret from the proxy.
    assert_eq!(calls[0]["is_error"], false, "{calls:?}");
    assert!(
        output(0).contains("hello from the allowed host"),
        "{calls:?}"
    );
    let seen = allowed.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].starts_with("GET /page HTTP/1.1\r\n"), "{seen:?}");
    assert!(
        seen[0].to_ascii_lowercase().contains(&format!(
            "authorization: bearer {}",
            secret.to_ascii_lowercase()
        )),
        "{seen:?}"
    );
    // 2. Another port of the same address is refused by the proxy with a 403 and a log line.
    assert_eq!(calls[1]["is_error"], true, "{calls:?}");
    assert!(output(1).contains("403"), "{calls:?}");
    assert!(other.seen().is_empty(), "{:?}", other.seen());
    let log = home.log_text();
    assert!(
        log.contains("egress refused") && log.contains(&format!("127.0.0.1:{}", other.port)),
        "no refusal in the log:\n{log}"
    );
    // 3. The server without egress reaches nothing.
    assert_eq!(calls[2]["is_error"], true, "{calls:?}");
    assert_eq!(allowed.seen().len(), 1, "{:?}", allowed.seen());

    // Raw TCP from inside: the web server's only way out is the proxy on its own loopback;
    // no address of the host answers, nor anything beyond it.
    // Every IPv4 address of the host, docker0's among them.
    let host_addrs: Vec<String> = run(Command::new("hostname").arg("-I"))?
        .split_whitespace()
        .filter(|a| !a.contains(':'))
        .map(str::to_string)
        .collect();
    assert!(!host_addrs.is_empty(), "the host has no IPv4 address");
    let mut targets: Vec<String> = host_addrs
        .iter()
        .map(|a| format!("{a}:{}", sentinel.port))
        .collect();
    targets.push(format!("127.0.0.1:{}", allowed.port));
    targets.push("1.1.1.1:80".into());
    targets.push("127.0.0.1:3128".into());
    let web = container_of(&device, "web")?;
    let offline = container_of(&device, "offline")?;
    for (c, proxy_open) in [(&web, true), (&offline, false)] {
        let got = probe(c, &targets)?;
        assert_eq!(got.len(), targets.len(), "{got:?}");
        for (a, r) in &got {
            let want_open = proxy_open && a == "127.0.0.1:3128";
            assert_eq!(r.starts_with("open"), want_open, "{c}: {a} {r}");
        }
        let mode =
            run(Command::new("docker").args(["inspect", "-f", "{{.HostConfig.NetworkMode}}", c]))?;
        assert_eq!(mode.trim(), "none", "{c}");
    }
    assert!(sentinel.seen().is_empty(), "{:?}", sentinel.seen());

    // The proxy's secret is in no container, environment or image; the one given with
    // --secret-env is in that server's environment (as the warning said).
    let inspect_web = run(Command::new("docker").args(["inspect", &web]))?;
    assert!(
        inspect_web.contains("HTTP_PROXY=http://127.0.0.1:3128"),
        "{inspect_web}"
    );
    let env_web = run(Command::new("docker").args(["exec", &web, "env"]))?;
    let inspect_offline = run(Command::new("docker").args(["inspect", &offline]))?;
    let image = run(Command::new("docker").args(["image", "inspect", IMAGE]))?;
    for (what, text) in [
        ("web's container", &inspect_web),
        ("web's environment", &env_web),
        ("offline's container", &inspect_offline),
        ("the image", &image),
    ] {
        assert!(!text.contains(&secret), "the secret is in {what}");
    }
    assert!(!inspect_offline.contains("HTTP_PROXY"), "{inspect_offline}");
    assert!(
        inspect_offline.contains(&format!("FETCH_TOKEN={env_secret}")),
        "{inspect_offline}"
    );
    home.assert_no_panic()?;
    Ok(())
}
