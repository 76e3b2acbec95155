//! The agent (issue 6) end to end: real `iom` processes, the real Docker engine, and the fake
//! Messages API server (real HTTP and SSE) reached through `ANTHROPIC_BASE_URL`, which only the
//! agent node is given. Every check goes through `iom ask` and what the conversation document
//! records (tool calls with their output, usage, status, `claimed_by`), as a user would see it.
//!
//! Docker is required: without a reachable engine these tests fail (`IOM_SKIP_DOCKER=1
//! scripts/test.sh` leaves this binary out, and nextest reports it as skipped). The sandbox
//! image is built with `iom sandbox build` when it is missing.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use iom_node::api::client::SseEvents;
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig, RecordedRequest, Scripted};
use iom_tests::harness::{
    Node, containers_of, iom_bin, mounts_under, scenario, wait_mesh, wait_until,
};
use serde_json::{Value, json};

const IMAGE: &str = "iom-sandbox:1";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Panics unless Docker is usable and the sandbox image present (building it if needed).
fn require_docker() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let r = READY.get_or_init(|| {
        let version = Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .output();
        match version {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Err(format!(
                    "the Docker engine is not reachable: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            Err(e) => return Err(format!("cannot run `docker`: {e}")),
        }
        let have = Command::new("docker")
            .args(["image", "inspect", IMAGE])
            .output()
            .is_ok_and(|o| o.status.success());
        if !have {
            let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
            let out = Command::new(iom_bin())
                .arg("--data-dir")
                .arg(tmp.path())
                .args(["sandbox", "build"])
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!(
                    "`iom sandbox build` failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        Ok(())
    });
    if let Err(e) = r {
        panic!(
            "{e}\nThese tests need Docker (see scripts/install-deps.sh); \
             `IOM_SKIP_DOCKER=1 scripts/test.sh` leaves them out, reported as skipped."
        );
    }
}

/// The fake Messages API server on its own runtime (the tests themselves are synchronous).
struct Fake {
    server: Option<FakeAnthropic>,
    rt: tokio::runtime::Runtime,
    key: String,
}

impl Fake {
    fn start() -> Result<Fake> {
        Self::start_on(FakeConfig::default().addr)
    }

    fn start_on(addr: std::net::SocketAddr) -> Result<Fake> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let key = format!("sk-ant-iomtest-{}", hex::encode(rand_bytes()));
        let server = rt.block_on(FakeAnthropic::start(FakeConfig {
            api_key: key.clone(),
            instant: false,
            addr,
        }))?;
        Ok(Fake {
            server: Some(server),
            rt,
            key,
        })
    }

    fn server(&self) -> &FakeAnthropic {
        self.server.as_ref().expect("server present until drop")
    }

    /// The URL the agent uses (loopback, whatever address the server listens on).
    fn url(&self) -> String {
        let url = self.server().url().to_string();
        url.replace("0.0.0.0", "127.0.0.1")
    }

    fn port(&self) -> u16 {
        self.server()
            .url()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    fn requests(&self) -> Vec<RecordedRequest> {
        self.server().requests()
    }

    /// Requests whose messages mention `marker`.
    fn requests_with(&self, marker: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.body.to_string().contains(marker))
            .count()
    }

    fn push(&self, item: Scripted) {
        self.server().push_script(item);
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _guard = self.rt.enter();
        drop(self.server.take());
    }
}

fn rand_bytes() -> [u8; 8] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut x = (nanos as u64) ^ (u64::from(std::process::id()) << 32) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x.to_le_bytes()
}

/// Removes the sandbox containers of the listed node ids when dropped (a killed node leaves
/// its containers behind; a real agent reaps them at its next start).
#[derive(Default)]
struct Reap(Vec<String>);

impl Drop for Reap {
    fn drop(&mut self) {
        for id in &self.0 {
            for c in containers_of(id) {
                let _ = Command::new("docker").args(["rm", "-f", &c]).output();
            }
        }
    }
}

/// A node that will hold the agent role: the fake's key and URL in its environment (and only
/// in its environment), `config` as its `config.toml`.
fn agent_node(name: &str, fake: Option<&Fake>, config: &str) -> Result<Node> {
    let mut n = Node::new(name)?;
    if let Some(f) = fake {
        n.env.push(("ANTHROPIC_API_KEY".into(), f.key.clone()));
        n.env.push(("ANTHROPIC_BASE_URL".into(), f.url()));
    }
    std::fs::write(n.dir.join("config.toml"), config)?;
    Ok(n)
}

/// Starts the nodes; the first creates the mesh and the others join it.
fn start_mesh(nodes: &mut [&mut Node]) -> Result<()> {
    for n in nodes.iter_mut() {
        n.start()?;
    }
    for i in 1..nodes.len() {
        let code = nodes[0].invite(false)?;
        nodes[i].cli(&["join", &code])?;
    }
    let refs: Vec<&Node> = nodes.iter().map(|n| &**n).collect();
    wait_mesh(&refs, Duration::from_secs(30))
}

/// `iom agent assign NAME` on `admin`, then waits until every node sees `name` as the agent.
fn assign(admin: &Node, agent: &Node, all: &[&Node]) -> Result<u64> {
    let r = admin.json(&["agent", "assign", &agent.name])?;
    let epoch = r["epoch"]
        .as_u64()
        .ok_or_else(|| anyhow!("no epoch in {r}"))?;
    let id = agent.device_id()?;
    wait_until(
        "every node to see the new agent",
        Duration::from_secs(15),
        || {
            for n in all {
                let s = n.json(&["agent", "status"])?;
                if s["agent"].as_str() != Some(id.as_str()) || s["epoch"].as_u64() != Some(epoch) {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    Ok(epoch)
}

/// `iom ask PROMPT [--conversation ID] --json` (waits for the end); returns the JSON, whose
/// `result` is the final event (`done` or `failed`). The exit code must match it: 0 for
/// `done`, 3 for a used-up budget, 1 for another failure.
fn ask(node: &Node, prompt: &str, conversation: Option<&str>) -> Result<Value> {
    let mut args = vec!["ask", prompt];
    if let Some(c) = conversation {
        args.extend(["--conversation", c]);
    }
    args.push("--json");
    let o = node.try_cli(&args)?;
    let v: Value = serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "`iom ask` printed no JSON: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    })?;
    let want = match (v["result"]["type"].as_str(), v["result"]["reason"].as_str()) {
        (None, _) => bail!("ask gave no final event: {v}"),
        (Some("done"), _) => 0,
        (Some(_), Some("budget_exceeded")) => 3,
        (Some(_), _) => 1,
    };
    if o.status.code() != Some(want) {
        bail!(
            "`iom ask` exited {:?}, not {want}, for {v}",
            o.status.code()
        );
    }
    Ok(v)
}

/// `ask` that must end `done`; returns `(conversation, request id, final event)`.
fn ask_done(node: &Node, prompt: &str, conversation: Option<&str>) -> Result<(String, String)> {
    let v = ask(node, prompt, conversation)?;
    if v["result"]["type"] != "done" {
        bail!("the request did not end done: {v}");
    }
    Ok((s(&v, "conversation")?, s(&v, "request_id")?))
}

fn s(v: &Value, key: &str) -> Result<String> {
    v[key]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no {key} in {v}"))
}

/// `conversations show ID --json`.
fn show(node: &Node, conversation: &str) -> Result<Value> {
    node.json(&["conversations", "show", conversation])
}

/// The request message and (if any) its assistant reply, as `node` sees them.
fn request_and_reply(node: &Node, conversation: &str, rid: &str) -> Result<(Value, Option<Value>)> {
    let c = show(node, conversation)?;
    let msgs = c["messages"].as_array().cloned().unwrap_or_default();
    let req = msgs
        .iter()
        .find(|m| m["request_id"] == rid)
        .cloned()
        .ok_or_else(|| anyhow!("no request {rid} on {}: {c}", node.name))?;
    let reply = msgs
        .iter()
        .find(|m| m["role"] == "assistant" && m["reply_to"] == rid)
        .cloned();
    Ok((req, reply))
}

/// The reply's tool calls; fails if there is no reply.
fn tool_calls(node: &Node, conversation: &str, rid: &str) -> Result<Vec<Value>> {
    let (req, reply) = request_and_reply(node, conversation, rid)?;
    let reply = reply.ok_or_else(|| anyhow!("no reply to {rid}; request: {req}"))?;
    Ok(reply["tool_calls"].as_array().cloned().unwrap_or_default())
}

/// The first tool call of the reply to `rid` printed `want` (trimmed).
fn assert_first_output(node: &Node, conversation: &str, rid: &str, want: &str) -> Result<()> {
    let calls = tool_calls(node, conversation, rid)?;
    let first = calls
        .first()
        .and_then(|c| c["output"].as_str())
        .map(str::trim);
    if first != Some(want) {
        bail!("the first tool call printed {first:?}, not {want:?}: {calls:?}");
    }
    Ok(())
}

/// Waits until `node` sees the request with `status`; returns the request message.
fn wait_status(
    node: &Node,
    conversation: &str,
    rid: &str,
    status: &str,
    timeout: Duration,
) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(
        &format!("{} to see request {rid} {status}", node.name),
        timeout,
        || {
            let (req, _) = request_and_reply(node, conversation, rid)?;
            let ok = req["status"] == status;
            last = req;
            Ok(ok)
        },
    )
    .map_err(|e| anyhow!("{e}; last seen: {last}"))?;
    Ok(last)
}

/// A bash tool directive for the fake model.
fn bash(command: &str) -> String {
    format!("[[tool bash {}]]", json!({ "command": command }))
}

/// Follows a request's event stream (the SSE endpoint `iom ask` uses) to its end.
fn events(node: &Node, conversation: &str, rid: &str) -> Result<Vec<Value>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let api = node.api()?;
    rt.block_on(async move {
        let mut resp = api
            .get_raw(&format!(
                "/v1/conversations/{conversation}/requests/{rid}/events"
            ))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let mut sse = SseEvents::default();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let chunk = tokio::time::timeout_at(deadline.into(), resp.chunk())
                .await
                .context("event stream timed out")?
                .context("event stream broke")?;
            let Some(chunk) = chunk else {
                bail!("event stream ended before done/failed: {out:?}");
            };
            sse.push(&chunk);
            while let Some(data) = sse.next_data() {
                let Ok(ev) = serde_json::from_str::<Value>(&data) else {
                    continue;
                };
                let end = matches!(ev["type"].as_str(), Some("done" | "failed"));
                out.push(ev);
                if end {
                    return Ok(out);
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The laptop asks, the home server answers, the phone sees it; the next turn reads the file.
// ---------------------------------------------------------------------------------------------

#[test]
fn laptop_asks_home_answers_phone_sees_it_and_next_turn_reads_the_file() {
    require_docker();
    scenario(laptop_asks_home_answers_phone_sees_it_body);
}

fn laptop_asks_home_answers_phone_sees_it_body() -> Result<()> {
    let mut reap = Reap::default();
    let fake = Fake::start()?;
    let mut home = agent_node("home", Some(&fake), "")?;
    let mut laptop = Node::new("laptop")?;
    let mut phone = Node::new("phone")?;
    start_mesh(&mut [&mut home, &mut laptop, &mut phone])?;
    reap.0.push(home.device_id()?);
    let home_id = home.device_id()?;
    assign(&home, &home, &[&home, &laptop, &phone])?;

    // Turn 1, from the laptop: a tool call writes a file in /workspace.
    let content = "written on turn one";
    let write = format!(
        "[[tool write_file {}]]",
        json!({ "path": "/workspace/notes/a.txt", "content": content })
    );
    let v = ask(&laptop, &format!("keep this {write}"), None)?;
    assert_eq!(v["queued"], false, "{v}");
    assert_eq!(v["agent"], home_id.as_str(), "{v}");
    assert_eq!(v["result"]["type"], "done", "{v}");
    let text = v["result"]["text"].as_str().unwrap_or_default();
    assert!(text.starts_with("echo: keep this"), "{v}");
    assert!(
        text.contains("wrote 19 bytes to /workspace/notes/a.txt"),
        "{v}"
    );
    let conv = s(&v, "conversation")?;
    let rid1 = s(&v, "request_id")?;

    // The phone, which took no part, gets the whole answer: text, tool calls, usage.
    let mut seen = Value::Null;
    wait_until(
        "the phone to have the answer",
        Duration::from_secs(20),
        || {
            let (req, reply) = request_and_reply(&phone, &conv, &rid1)?;
            seen = json!({ "req": req, "reply": reply });
            Ok(req["status"] == "done" && reply.is_some())
        },
    )
    .map_err(|e| anyhow!("{e}; phone saw {seen}"))?;
    let (req, reply) = request_and_reply(&phone, &conv, &rid1)?;
    let reply = reply.ok_or_else(|| anyhow!("no reply"))?;
    assert_eq!(req["claimed_by"]["device"], home_id.as_str(), "{req}");
    assert_eq!(req["device"], laptop.device_id()?.as_str(), "{req}");
    assert_eq!(reply["device"], home_id.as_str(), "{reply}");
    assert_eq!(reply["text"], text, "{reply}");
    let calls = reply["tool_calls"].as_array().cloned().unwrap_or_default();
    assert_eq!(calls.len(), 1, "{reply}");
    assert_eq!(calls[0]["name"], "write_file");
    assert_eq!(calls[0]["is_error"], false, "{reply}");
    let usage_in = reply["usage"]["input_tokens"].as_u64().unwrap_or(0);
    let usage_out = reply["usage"]["output_tokens"].as_u64().unwrap_or(0);
    assert!(usage_in > 0 && usage_out > 0, "usage recorded: {reply}");
    let total = show(&phone, &conv)?["usage"].clone();
    assert_eq!(total["input_tokens"].as_u64(), Some(usage_in), "{total}");
    // The file really is in the conversation's workspace on the agent.
    let on_disk =
        std::fs::read_to_string(home.dir.join("workspaces").join(&conv).join("notes/a.txt"))?;
    assert_eq!(on_disk, content);

    // Turn 2, from the phone, same conversation: the next turn reads the file back.
    let read = r#"[[tool read_file {"path":"/workspace/notes/a.txt"}]]"#;
    let v2 = ask(&phone, &format!("what did I keep? {read}"), Some(&conv))?;
    assert_eq!(v2["result"]["type"], "done", "{v2}");
    assert_eq!(v2["conversation"], conv.as_str());
    let rid2 = s(&v2, "request_id")?;
    let calls = tool_calls(&phone, &conv, &rid2)?;
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["output"], content, "{calls:?}");
    assert!(
        v2["result"]["text"]
            .as_str()
            .is_some_and(|t| t.ends_with(&format!("tool results: {content}"))),
        "{v2}"
    );
    // The model was sent the history: turn one's question and answer precede turn two.
    let last = fake
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.body.to_string().contains("what did I keep?"))
        .ok_or_else(|| anyhow!("the fake saw no turn-two request"))?;
    let msgs = last.body["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        msgs.first()
            .is_some_and(|m| m.to_string().contains("keep this")),
        "history sent: {msgs:?}"
    );
    // Both turns are listed on the laptop too.
    wait_until(
        "the laptop to list two answers",
        Duration::from_secs(15),
        || {
            let c = show(&laptop, &conv)?;
            Ok(c["messages"]
                .as_array()
                .is_some_and(|m| m.iter().filter(|m| m["role"] == "assistant").count() == 2))
        },
    )?;
    let list = laptop.json(&["conversations", "list"])?;
    assert!(
        list["conversations"]
            .as_array()
            .is_some_and(|l| l.iter().any(|c| c["id"] == conv.as_str())),
        "{list}"
    );
    home.assert_no_panic()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Inside the container: no network, no API key, no writes outside /workspace and /tmp.
// ---------------------------------------------------------------------------------------------

#[test]
fn container_has_no_network_no_api_key_and_a_read_only_root() {
    require_docker();
    scenario(container_isolation_body);
}

/// A non-loopback IPv4 address of this host (where a container on a bridge network could
/// reach the fake server).
fn host_ip() -> String {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .ok()
        .map(|a| a.ip().to_string())
        .filter(|ip| !ip.starts_with("127.") && ip != "0.0.0.0")
        .unwrap_or_else(|| "172.17.0.1".into())
}

fn container_isolation_body() -> Result<()> {
    let mut reap = Reap::default();
    // The fake listens on every interface, so only the sandbox's lack of a network stops a
    // tool from reaching it through the host's address.
    let fake = Fake::start_on(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))?;
    let mut home = agent_node("home", Some(&fake), "")?;
    home.start()?;
    reap.0.push(home.device_id()?);
    assign(&home, &home, &[&home])?;
    let host = host_ip();
    let port = fake.port();
    // Prove the address is reachable from the host itself.
    std::net::TcpStream::connect_timeout(
        &format!("{host}:{port}").parse()?,
        Duration::from_secs(2),
    )
    .with_context(|| format!("the fake should be reachable at {host}:{port} from the host"))?;

    // The key, searched for in pieces so the command line never holds it.
    let key = fake.key.clone();
    let (k1, k2) = key.split_at(key.len() / 2);
    let network = format!(
        "ip link; ip route; nc -w 2 {host} {port} </dev/null && echo CONNECTED-HOST; \
         nc -w 2 127.0.0.1 {port} </dev/null && echo CONNECTED-LO; echo NETDONE"
    );
    let secrets = format!(
        "A='{k1}'; B='{k2}'; K=\"$A$B\"; env; \
         env P=\"$A-PLANT\" sleep 5 & sleep 1; \
         for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do \
           tr '\\0' '\\n' < $f 2>/dev/null; done > /tmp/procs.txt; \
         echo PROC-KEY $(grep -c \"$K\" /tmp/procs.txt) PROC-PLANT $(grep -c \"$A-PLANT\" /tmp/procs.txt); \
         F() {{ find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -type f \
           -exec grep -l \"$1\" {{}} + 2>/dev/null; }}; \
         F \"$K\" | sed 's/^/FOUND-FILE /'; \
         echo \"$A-PLANT\" > /tmp/plant.txt; F \"$A-PLANT\" | sed 's/^/PLANTED /'; \
         cat /proc/mounts; echo SECRETSDONE"
    );
    let writes = "for p in / /etc /bin /usr /root /home /var /opt /mnt; do \
                    touch $p/x 2>/dev/null && echo WROTE $p; done; \
                  mkdir /newdir 2>/dev/null && echo WROTE /newdir; \
                  touch /workspace/ok && echo WS-OK; touch /tmp/ok && echo TMP-OK; \
                  id -u; echo WRITESDONE";
    let prompt = format!(
        "probe {} {} {}",
        bash(&network),
        bash(&secrets),
        bash(writes)
    );
    let (conv, rid) = ask_done(&home, &prompt, None)?;
    let calls = tool_calls(&home, &conv, &rid)?;
    assert_eq!(calls.len(), 3, "{calls:#?}");
    let out = |i: usize| calls[i]["output"].as_str().unwrap_or_default().to_string();

    let net = out(0);
    assert!(net.contains("NETDONE"), "the probe ran to the end: {net}");
    assert!(net.contains("1: lo:"), "loopback exists: {net}");
    assert!(
        !net.contains("eth0") && !net.contains("2: "),
        "only the loopback interface: {net}"
    );
    assert!(!net.contains("CONNECTED"), "no connection: {net}");
    assert!(
        net.contains("Network is unreachable"),
        "the host is unreachable, not just closed: {net}"
    );

    let sec = out(1);
    assert!(sec.contains("SECRETSDONE"), "the search ran: {sec}");
    assert!(sec.contains("PATH="), "env was listed: {sec}");
    assert!(
        sec.contains("PLANTED /tmp/plant.txt"),
        "the file search finds what is there: {sec}"
    );
    assert!(
        sec.contains("PROC-KEY 0 PROC-PLANT 1"),
        "process environments were read, and hold no key: {sec}"
    );
    assert!(!sec.contains(&key), "the key is visible: {sec}");
    assert!(!sec.contains("FOUND"), "the key was found: {sec}");
    assert!(!sec.contains("ANTHROPIC"), "no ANTHROPIC_* variable: {sec}");
    // The only host directory mounted is the conversation's workspace.
    let data_dir = home.dir.canonicalize()?;
    for line in sec
        .lines()
        .filter(|l| l.contains(&*data_dir.to_string_lossy()))
    {
        assert!(line.contains("/workspace"), "unexpected mount: {line}");
    }
    assert!(
        !sec.contains("docker.sock"),
        "the Docker socket is not mounted: {sec}"
    );

    let w = out(2);
    assert!(w.contains("WRITESDONE"), "{w}");
    assert!(
        !w.contains("WROTE"),
        "wrote outside /workspace and /tmp: {w}"
    );
    assert!(w.contains("WS-OK") && w.contains("TMP-OK"), "{w}");
    assert!(!w.lines().any(|l| l.trim() == "0"), "runs as non-root: {w}");
    assert!(home.dir.join("workspaces").join(&conv).join("ok").exists());
    home.assert_no_panic()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mount policy: a blocked mount and a symlink escape are refused with a clear error.
// ---------------------------------------------------------------------------------------------

#[test]
fn blocked_mount_and_symlink_escape_are_refused() {
    require_docker();
    scenario(mount_policy_body);
}

/// `iom sandbox check` on a node's data dir (with the node's HOME); must fail.
fn sandbox_check_fails(node: &Node, home: &Path) -> Result<String> {
    let out = Command::new(iom_bin())
        .arg("--data-dir")
        .arg(&node.dir)
        .args(["sandbox", "check"])
        .env("HOME", home)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        bail!("`iom sandbox check` passed but should fail: {text}");
    }
    Ok(text)
}

/// Writes the node's `[sandbox]` config: one allowed root and one mount at `/data`.
fn mount_config(node: &Node, root: &str, host: &str) -> Result<()> {
    std::fs::write(
        node.dir.join("config.toml"),
        format!(
            "[sandbox]\nallowed_roots = [{}]\nmounts = [{{ host = {}, container = \"/data\" }}]\n",
            json!(root),
            json!(host)
        ),
    )?;
    Ok(())
}

fn mount_policy_body() -> Result<()> {
    let mut reap = Reap::default();
    let fake = Fake::start()?;
    let mut home = agent_node("home", Some(&fake), "")?;
    // The node user's home directory, holding a secret.
    let user_home = tempfile::tempdir()?;
    let ssh = user_home.path().join(".ssh");
    std::fs::create_dir_all(&ssh)?;
    std::fs::write(ssh.join("id_ed25519"), "PRIVATE KEY")?;
    home.env
        .push(("HOME".into(), user_home.path().display().to_string()));
    mount_config(&home, "~", "~/.ssh")?;
    home.start()?;
    reap.0.push(home.device_id()?);
    assign(&home, &home, &[&home])?;

    // `iom sandbox check` fails and names the mount and the rule.
    let check = sandbox_check_fails(&home, user_home.path())?;
    let ssh_path = ssh.display().to_string();
    assert!(
        check.contains("FAIL") && check.contains(&ssh_path) && check.contains("blocked pattern"),
        "{check}"
    );
    // A request's tool call fails with the same error; the request itself completes.
    let (conv, rid) = ask_done(&home, &format!("look {}", bash("ls /data")), None)?;
    let calls = tool_calls(&home, &conv, &rid)?;
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["is_error"], true, "{calls:?}");
    let err = calls[0]["output"].as_str().unwrap_or_default();
    assert!(
        err.contains(&ssh_path) && err.contains("blocked pattern") && err.contains("sandbox check"),
        "{err}"
    );
    assert!(!err.contains("PRIVATE KEY"), "{err}");

    // A symlink inside the allowed root that points outside it is refused.
    home.stop()?;
    let share = tempfile::tempdir()?;
    let outside = tempfile::tempdir()?;
    std::fs::write(outside.path().join("data.txt"), "CONTENT-FROM-OUTSIDE")?;
    let link = share.path().join("escape");
    std::os::unix::fs::symlink(outside.path(), &link)?;
    mount_config(
        &home,
        &share.path().display().to_string(),
        &link.display().to_string(),
    )?;
    home.start()?;
    let check = sandbox_check_fails(&home, user_home.path())?;
    assert!(
        check.contains("symlink") && check.contains(&link.display().to_string()),
        "{check}"
    );
    let (conv, rid) = ask_done(&home, &format!("read {}", bash("cat /data/data.txt")), None)?;
    let calls = tool_calls(&home, &conv, &rid)?;
    assert_eq!(calls[0]["is_error"], true, "{calls:?}");
    let err = calls[0]["output"].as_str().unwrap_or_default();
    assert!(
        err.contains("symlink") && !err.contains("CONTENT-FROM-OUTSIDE"),
        "{err}"
    );
    // Nothing was started with the refused mounts.
    assert!(
        containers_of(&home.device_id()?).is_empty(),
        "no container ran"
    );

    // A file mounted directly from the allowed root works, read-only.
    home.stop()?;
    let ok = share.path().join("ok.txt");
    std::fs::write(&ok, "SHARED-CONTENT")?;
    mount_config(
        &home,
        &share.path().display().to_string(),
        &ok.display().to_string(),
    )?;
    home.start()?;
    let (conv, rid) = ask_done(
        &home,
        &format!(
            "read {}",
            bash("cat /data; echo; echo x >> /data 2>/dev/null && echo WROTE; echo END")
        ),
        None,
    )?;
    let calls = tool_calls(&home, &conv, &rid)?;
    let out = calls[0]["output"].as_str().unwrap_or_default();
    assert!(
        out.contains("SHARED-CONTENT") && out.contains("END") && !out.contains("WROTE"),
        "{calls:?}"
    );
    assert_eq!(std::fs::read_to_string(&ok)?, "SHARED-CONTENT");
    home.assert_no_panic()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Resource bombs are contained and the node stays healthy.
// ---------------------------------------------------------------------------------------------

#[test]
fn fork_bomb_memory_bomb_and_endless_loop_are_contained() {
    require_docker();
    scenario(bombs_body);
}

/// A following call in the same conversation works, and the node answers.
fn healthy(home: &Node, conv: &str, what: &str) -> Result<()> {
    let (_, rid) = ask_done(
        home,
        &format!("after {what} {}", bash("echo alive")),
        Some(conv),
    )?;
    let calls = tool_calls(home, conv, &rid)?;
    assert_eq!(
        calls[0]["output"].as_str().map(str::trim),
        Some("alive"),
        "after {what}: {calls:?}"
    );
    home.status()?;
    Ok(())
}

fn bombs_body() -> Result<()> {
    let mut reap = Reap::default();
    let fake = Fake::start()?;
    let mut home = agent_node(
        "home",
        Some(&fake),
        "[sandbox]\ntool_timeout_secs = 4\nmemory_mb = 64\npids_limit = 32\n",
    )?;
    home.start()?;
    reap.0.push(home.device_id()?);
    assign(&home, &home, &[&home])?;
    // One conversation, so every bomb hits the same warm container and each following call
    // shows the sandbox recovered.
    let (conv, _) = ask_done(&home, &format!("warm up {}", bash("echo warm")), None)?;
    let bombs = [
        ("fork bomb", "b(){ b|b& }; b; sleep 30"),
        (
            "memory bomb",
            "awk 'BEGIN{s=\"xxxxxxxxxxxxxxxx\"; while(1){s=s s}}'",
        ),
        ("endless loop", "while :; do :; done"),
    ];
    for (what, cmd) in bombs {
        let started = Instant::now();
        let (_, rid) = ask_done(&home, &format!("{what} {}", bash(cmd)), Some(&conv))?;
        let took = started.elapsed();
        let calls = tool_calls(&home, &conv, &rid)?;
        assert_eq!(calls.len(), 1, "{what}");
        assert_eq!(calls[0]["is_error"], true, "{what} failed: {calls:?}");
        let out = calls[0]["output"].as_str().unwrap_or_default();
        eprintln!(
            "{what}: {:.1} s: {}",
            took.as_secs_f64(),
            out.chars().take(300).collect::<String>()
        );
        assert!(
            took < Duration::from_secs(20),
            "{what} took {took:?} (timeout 4 s)"
        );
        match what {
            "endless loop" => assert!(out.contains("timed out"), "{what}: {out}"),
            "fork bomb" => assert!(
                out.contains("timed out") || out.contains("process limit"),
                "{what}: {out}"
            ),
            _ => {}
        }
        assert!(home.is_running(), "the node survived the {what}");
        healthy(&home, &conv, what)?;
    }
    home.assert_no_panic()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The workspace disk quota: a 3 GiB dd stops at the quota (root: loop-mounted images).
// ---------------------------------------------------------------------------------------------

#[test]
fn a_3_gib_dd_stops_at_the_workspace_quota_and_the_node_is_fine() {
    require_docker();
    scenario(quota_body);
}

fn quota_body() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        bail!(
            "this test loop-mounts the workspace image and needs root (`IOM_SKIP_NETNS=1 \
             scripts/test.sh` leaves the root-only tests out, reported as skipped)"
        );
    }
    let mut reap = Reap::default();
    let fake = Fake::start()?;
    // The default quota (1 GiB per workspace), and no tool runs without it.
    let mut home = agent_node(
        "home",
        Some(&fake),
        "[sandbox]\nquota = \"required\"\ntool_timeout_secs = 120\n",
    )?;
    home.start()?;
    reap.0.push(home.device_id()?);
    assign(&home, &home, &[&home])?;
    let dd = "dd if=/dev/zero of=/workspace/fill bs=1M count=3072; stat -c %s /workspace/fill";
    let started = Instant::now();
    let (conv, rid) = ask_done(&home, &format!("fill the disk {}", bash(dd)), None)?;
    let calls = tool_calls(&home, &conv, &rid)?;
    let out = calls[0]["output"].as_str().unwrap_or_default().to_string();
    eprintln!("dd ({:.1} s): {out}", started.elapsed().as_secs_f64());
    assert!(out.contains("No space left on device"), "{out}");
    let size: u64 = out
        .lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .ok_or_else(|| anyhow!("no file size in {out}"))?;
    assert!(size <= 1 << 30, "the file grew to {size} bytes");
    // On the host: the image holds at most the quota, and it is mounted.
    let img = home.dir.join(format!("workspace-images/{conv}.img"));
    let taken = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&img)?) * 512;
    assert!(
        taken <= (1 << 30) + (8 << 20),
        "the image takes {taken} bytes"
    );
    assert_eq!(mounts_under(&home.dir).len(), 1);
    // The node and its store are fine: status answers, the conversation reads back, and a
    // further ask (with a tool call in the full workspace, then freeing it) works.
    let st = home.status()?;
    assert!(st.is_object(), "{st}");
    assert!(home.is_running());
    healthy(&home, &conv, "the full workspace")?;
    let (_, rid) = ask_done(
        &home,
        &format!(
            "free it {}",
            bash("rm /workspace/fill && echo 1 > /workspace/ok && cat /workspace/ok")
        ),
        Some(&conv),
    )?;
    assert_first_output(&home, &conv, &rid, "1")?;
    home.assert_no_panic()?;
    // A crash leaves the workspace mounted; the next start unmounts it (before anything can
    // use it), and the next tool call mounts it again with its files.
    home.kill();
    assert_eq!(
        mounts_under(&home.dir).len(),
        1,
        "a SIGKILL leaves it mounted"
    );
    home.start()?;
    assert!(
        mounts_under(&home.dir).is_empty(),
        "stale mounts left after a restart: {:?}",
        mounts_under(&home.dir)
    );
    let (_, rid) = ask_done(
        &home,
        &format!("after the crash {}", bash("cat /workspace/ok")),
        Some(&conv),
    )?;
    assert_first_output(&home, &conv, &rid, "1")?;
    assert_eq!(mounts_under(&home.dir).len(), 1);
    // A graceful stop unmounts the workspace (the loop device goes with it).
    home.stop()?;
    assert!(
        mounts_under(&home.dir).is_empty(),
        "{:?}",
        mounts_under(&home.dir)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Lifecycle: queued while the agent is away; interrupted by a crash; role reassignment.
// ---------------------------------------------------------------------------------------------

#[test]
fn request_is_queued_while_the_agent_is_offline_and_runs_when_it_is_back() {
    require_docker();
    scenario(queued_body);
}

fn queued_body() -> Result<()> {
    let mut reap = Reap::default();
    let fake = Fake::start()?;
    let mut home = agent_node("home", Some(&fake), "")?;
    let mut laptop = Node::new("laptop")?;
    start_mesh(&mut [&mut home, &mut laptop])?;
    reap.0.push(home.device_id()?);
    let home_id = home.device_id()?;
    assign(&home, &home, &[&home, &laptop])?;
    home.stop()?;
    wait_until(
        "the laptop to see the agent offline",
        Duration::from_secs(15),
        || Ok(!laptop.connected_to(&home_id)?),
    )?;
    let status = laptop.json(&["agent", "status"])?;
    assert_eq!(status["connection"], "offline", "{status}");

    let v = laptop.ask_no_wait("while you were out", &[])?;
    assert_eq!(v["queued"], true, "{v}");
    assert!(
        v["note"]
            .as_str()
            .is_some_and(|n| n.contains("offline") && n.contains("queued")),
        "{v}"
    );
    let conv = s(&v, "conversation")?;
    let rid = s(&v, "request_id")?;
    // The human form says so too.
    let human = laptop.try_cli(&["ask", "second while out", "--no-wait"])?;
    assert_eq!(human.status.code(), Some(4));
    let err = String::from_utf8_lossy(&human.stderr);
    assert!(err.contains("queued"), "{err}");
    std::thread::sleep(Duration::from_millis(500));
    let (req, _) = request_and_reply(&laptop, &conv, &rid)?;
    assert_eq!(req["status"], "pending", "{req}");
    assert_eq!(fake.requests().len(), 0);

    home.start()?;
    wait_status(&laptop, &conv, &rid, "done", Duration::from_secs(30))?;
    let (req, reply) = request_and_reply(&laptop, &conv, &rid)?;
    assert_eq!(req["claimed_by"]["device"], home_id.as_str(), "{req}");
    assert_eq!(
        reply.map(|r| r["text"].clone()),
        Some(json!("echo: while you were out"))
    );
    Ok(())
}

#[test]
fn killed_agent_marks_the_run_interrupted_and_never_runs_it_twice() {
    require_docker();
    scenario(interrupted_body);
}

fn interrupted_body() -> Result<()> {
    let mut reap = Reap::default();
    let fake = Fake::start()?;
    let mut home = agent_node("home", Some(&fake), "")?;
    let mut laptop = Node::new("laptop")?;
    start_mesh(&mut [&mut home, &mut laptop])?;
    let home_id = home.device_id()?;
    reap.0.push(home_id.clone());
    assign(&home, &home, &[&home, &laptop])?;

    let marker = "slow-job-7d1";
    let v = laptop.ask_no_wait(
        &format!("{marker} {}", bash("sleep 20; echo finished")),
        &[],
    )?;
    assert_eq!(v["queued"], false, "{v}");
    let conv = s(&v, "conversation")?;
    let rid = s(&v, "request_id")?;
    // Wait until the tool is running in its container.
    wait_until("the tool call to start", Duration::from_secs(30), || {
        let (req, _) = request_and_reply(&home, &conv, &rid)?;
        let p = req["progress"].as_str().unwrap_or_default();
        Ok(req["status"] == "running"
            && p.contains("sleep 20")
            && !containers_of(&home_id).is_empty())
    })?;
    assert_eq!(fake.requests_with(marker), 1);
    home.kill();
    assert!(
        !containers_of(&home_id).is_empty(),
        "the orphan is left behind"
    );

    home.start()?;
    let req = wait_status(&home, &conv, &rid, "failed", Duration::from_secs(15))?;
    assert_eq!(req["error"], "interrupted", "{req}");
    // The laptop sees the same, and `ask` there would report it.
    let req = wait_status(&laptop, &conv, &rid, "failed", Duration::from_secs(15))?;
    assert_eq!(req["error"], "interrupted", "{req}");
    // The orphaned container is reaped at start-up.
    wait_until(
        "the orphaned container to be removed",
        Duration::from_secs(20),
        || Ok(containers_of(&home_id).is_empty()),
    )?;
    // Not run again: no second model call, no answer, however long we wait.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fake.requests_with(marker), 1, "the request ran twice");
    let (req, reply) = request_and_reply(&home, &conv, &rid)?;
    assert_eq!(req["status"], "failed");
    assert!(reply.is_none(), "{reply:?}");
    // The agent still works.
    let (_, rid2) = ask_done(&laptop, "still there?", Some(&conv))?;
    assert_ne!(rid2, rid);
    home.assert_no_panic()?;
    Ok(())
}

#[test]
fn reassigning_the_role_makes_the_old_agent_stop_claiming() {
    require_docker();
    scenario(reassign_body);
}

fn reassign_body() -> Result<()> {
    let mut reap = Reap::default();
    let fake = Fake::start()?;
    let mut home = agent_node("home", Some(&fake), "")?;
    let mut server = agent_node("server", Some(&fake), "")?;
    let mut laptop = Node::new("laptop")?;
    start_mesh(&mut [&mut home, &mut server, &mut laptop])?;
    let (home_id, server_id) = (home.device_id()?, server.device_id()?);
    reap.0.extend([home_id.clone(), server_id.clone()]);
    let all = [&home, &server, &laptop];

    let e1 = assign(&home, &home, &all)?;
    let (conv, rid) = ask_done(&laptop, "first", None)?;
    let (req, _) = request_and_reply(&laptop, &conv, &rid)?;
    assert_eq!(req["claimed_by"], json!({ "device": home_id, "epoch": e1 }));

    let e2 = assign(&home, &server, &all)?;
    assert!(e2 > e1, "epoch {e2} after {e1}");
    let st = home.json(&["agent", "status"])?;
    assert_eq!(st["this_device"], false, "{st}");
    // With the new agent away, the old one must leave the request alone.
    server.stop()?;
    wait_until(
        "the laptop to see the new agent offline",
        Duration::from_secs(15),
        || Ok(!laptop.connected_to(&server_id)?),
    )?;
    let v = laptop.ask_no_wait("second", &["--conversation", &conv])?;
    assert_eq!(v["queued"], true, "{v}");
    let rid2 = s(&v, "request_id")?;
    wait_until(
        "the old agent to receive the request",
        Duration::from_secs(15),
        || Ok(request_and_reply(&home, &conv, &rid2).is_ok()),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let (req, _) = request_and_reply(&home, &conv, &rid2)?;
    assert_eq!(req["status"], "pending", "the old agent claimed it: {req}");
    assert!(req["claimed_by"].is_null(), "{req}");
    assert_eq!(fake.requests_with("second"), 0);

    server.start()?;
    wait_status(&laptop, &conv, &rid2, "done", Duration::from_secs(30))?;
    let (req, reply) = request_and_reply(&laptop, &conv, &rid2)?;
    assert_eq!(
        req["claimed_by"],
        json!({ "device": server_id, "epoch": e2 })
    );
    assert_eq!(reply.map(|r| r["device"].clone()), Some(json!(server_id)));
    // A third request, with both online, also goes to the new agent only.
    let (_, rid3) = ask_done(&laptop, "third", Some(&conv))?;
    let (req, _) = request_and_reply(&laptop, &conv, &rid3)?;
    assert_eq!(req["claimed_by"]["device"], server_id.as_str(), "{req}");
    assert_eq!(fake.requests_with("third"), 1);
    assert!(
        home.log_text().contains("no longer holds the agent role"),
        "the old agent noticed"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The model API: no key, 429 then success, the daily budget.
// ---------------------------------------------------------------------------------------------

#[test]
fn no_api_key_gives_a_clear_message_in_the_conversation() {
    require_docker();
    scenario(no_key_body);
}

fn no_key_body() -> Result<()> {
    let mut home = agent_node("home", None, "")?;
    let mut laptop = Node::new("laptop")?;
    start_mesh(&mut [&mut home, &mut laptop])?;
    assign(&home, &home, &[&home, &laptop])?;
    let st = home.json(&["agent", "status"])?;
    assert!(
        st["api_key"]
            .as_str()
            .is_some_and(|k| k.contains("ANTHROPIC_API_KEY")),
        "{st}"
    );
    let v = ask(&laptop, "hello?", None)?;
    assert_eq!(v["result"]["type"], "failed", "{v}");
    let err = v["result"]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("no usable Anthropic API key")
            && err.contains("ANTHROPIC_API_KEY")
            && err.contains("home"),
        "{err}"
    );
    let (req, _) = request_and_reply(&laptop, &s(&v, "conversation")?, &s(&v, "request_id")?)?;
    assert_eq!(req["status"], "failed");
    assert_eq!(req["error"].as_str(), Some(err));
    // Without --json the command fails with that message.
    let (code, stderr) = laptop.fail(&["ask", "hello again?"])?;
    assert_ne!(code, 0);
    assert!(stderr.contains("ANTHROPIC_API_KEY"), "{stderr}");
    Ok(())
}

#[test]
fn rate_limited_model_call_is_retried_and_the_retry_is_shown() {
    require_docker();
    scenario(retry_body);
}

fn retry_body() -> Result<()> {
    let fake = Fake::start()?;
    let mut home = agent_node("home", Some(&fake), "")?;
    home.start()?;
    assign(&home, &home, &[&home])?;
    fake.push(Scripted::Status {
        code: 429,
        retry_after: Some(1),
    });
    let v = home.ask_no_wait("busy day", &[])?;
    let (conv, rid) = (s(&v, "conversation")?, s(&v, "request_id")?);
    let started = Instant::now();
    let evs = events(&home, &conv, &rid)?;
    let took = started.elapsed();
    let retry = evs
        .iter()
        .find(|e| e["type"] == "retry")
        .ok_or_else(|| anyhow!("no retry event in {evs:?}"))?;
    let msg = retry["message"].as_str().unwrap_or_default();
    assert!(msg.contains("429") && msg.contains("retry 1"), "{msg}");
    let last = evs.last().cloned().unwrap_or_default();
    assert_eq!(last["type"], "done", "{evs:?}");
    assert_eq!(last["text"], "echo: busy day");
    assert!(
        took >= Duration::from_millis(900),
        "retry-after honoured: {took:?}"
    );
    assert_eq!(fake.requests_with("busy day"), 2, "one 429, one success");
    Ok(())
}

#[test]
fn exceeded_daily_budget_is_refused_clearly() {
    require_docker();
    scenario(budget_body);
}

fn budget_body() -> Result<()> {
    let fake = Fake::start()?;
    // A request reserves its input estimate (the twelve tool definitions and the prompt,
    // about 1,300 tokens) and max_tokens: 2,500 tokens hold the first, and what it used leaves
    // too little for the second.
    let mut home = agent_node(
        "home",
        Some(&fake),
        "[agent]\nmax_tokens = 500\ndaily_token_budget = 2500\n",
    )?;
    let mut laptop = Node::new("laptop")?;
    start_mesh(&mut [&mut home, &mut laptop])?;
    assign(&home, &home, &[&home, &laptop])?;
    let v = ask(&laptop, "first of the day", None)?;
    assert_eq!(v["result"]["type"], "done", "{v}");
    let st = home.json(&["agent", "status"])?;
    assert!(st["tokens_today"].as_u64().is_some_and(|t| t > 0), "{st}");
    // The next is refused before any model call, with a message that says what to do.
    let v = ask(&laptop, "second of the day", None)?;
    assert_eq!(v["result"]["type"], "failed", "{v}");
    let err = v["result"]["error"].as_str().unwrap_or_default();
    assert!(
        err.starts_with("budget exceeded: the mesh's daily token budget (2500 tokens)")
            && err.contains("daily_token_budget"),
        "{err}"
    );
    assert_eq!(fake.requests_with("second of the day"), 0);
    Ok(())
}

#[test]
fn files_attached_on_the_laptop_are_read_by_the_agents_tools() {
    require_docker();
    scenario(attachments_body);
}

/// A home server holding the agent role (with the fake model) and a laptop in its mesh; the
/// home server's containers are reaped when the first value drops.
fn home_agent_and_laptop() -> Result<(Reap, Fake, Node, Node)> {
    let mut reap = Reap::default();
    let fake = Fake::start()?;
    let mut home = agent_node("home", Some(&fake), "")?;
    let mut laptop = Node::new("laptop")?;
    start_mesh(&mut [&mut home, &mut laptop])?;
    reap.0.push(home.device_id()?);
    assign(&home, &home, &[&home, &laptop])?;
    Ok((reap, fake, home, laptop))
}

fn attachments_body() -> Result<()> {
    let (_reap, fake, _home, laptop) = home_agent_and_laptop()?;
    // Two files on the laptop; the blobs travel to the agent by sync.
    let dir = tempfile::tempdir()?;
    let notes = dir.path().join("notes.txt");
    let log = dir.path().join("build.log");
    std::fs::write(&notes, "attached on the laptop\nsecond line\n")?;
    std::fs::write(&log, "E: linker failed\n")?;
    let read = format!(
        "[[tool read_file {}]] [[tool bash {}]]",
        json!({ "path": "/workspace/attachments/notes.txt" }),
        json!({ "command": "cat attachments/build.log; ls attachments | wc -l" })
    );
    let notes_arg = notes.display().to_string();
    let log_arg = log.display().to_string();
    let o = laptop.try_cli(&[
        "ask", &read, "--file", &notes_arg, "--file", &log_arg, "--json",
    ])?;
    let v: Value = serde_json::from_slice(&o.stdout)
        .with_context(|| String::from_utf8_lossy(&o.stderr).into_owned())?;
    assert_eq!(o.status.code(), Some(0), "{v}");
    assert_eq!(v["result"]["type"], "done", "{v}");
    let text = v["result"]["text"].as_str().unwrap_or_default();
    // bash saw both files and read one; read_file read the other (its result went to the
    // model on the turn before).
    assert!(
        text.ends_with("tool results: E: linker failed\n2\n"),
        "bash did not read the attachments: {text:?}"
    );
    let read_back = fake
        .requests()
        .iter()
        .flat_map(RecordedRequest::tool_results)
        .any(|(_, content, is_error)| {
            !is_error && content.contains("attached on the laptop\nsecond line")
        });
    assert!(read_back, "read_file did not read the attachment");
    // The prompt named them, with their size and hash.
    let hash = iom_tests::harness::sha256_file(&notes)?;
    assert!(
        fake.requests_with(&format!(
            "/workspace/attachments/notes.txt (35 bytes, sha256 {hash})"
        )) > 0,
        "the prompt does not name the attachment"
    );
    // The request records them.
    let conv = s(&v, "conversation")?;
    let (req, _) = request_and_reply(&laptop, &conv, &s(&v, "request_id")?)?;
    let names: Vec<&str> = req["attachments"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["notes.txt", "build.log"], "{req}");
    Ok(())
}

/// A photo attached on the laptop reaches the model as an image block: the blob syncs to the
/// agent, is scaled to the provider's 1568-pixel edge (the fake Messages API checks the block
/// as the real one does: base64 of the type it claims, at most 5 MB), and the answer tells the
/// user it was resized. The original is in the workspace too.
#[test]
fn a_photo_attached_on_the_laptop_reaches_the_model_as_an_image_block() {
    require_docker();
    scenario(|| {
        use base64::Engine as _;
        let (_reap, fake, _home, laptop) = home_agent_and_laptop()?;
        let dir = tempfile::tempdir()?;
        let photo = dir.path().join("photo.png");
        image::RgbImage::from_fn(3000, 2000, |x, y| {
            image::Rgb([(x / 12) as u8, (y / 8) as u8, ((x + y) / 20) as u8])
        })
        .save(&photo)?;
        let photo_arg = photo.display().to_string();
        let o = laptop.try_cli(&[
            "ask",
            "what is in the photo?",
            "--file",
            &photo_arg,
            "--json",
        ])?;
        let v: Value = serde_json::from_slice(&o.stdout)
            .with_context(|| String::from_utf8_lossy(&o.stderr).into_owned())?;
        assert_eq!(o.status.code(), Some(0), "{v}");
        assert_eq!(v["result"]["type"], "done", "{v}");
        let note = v["result"]["note"].as_str().unwrap_or_default();
        assert!(
            note.contains("photo.png: sent to the model at 1568×1045 (from 3000×2000)"),
            "the user is told: {v}"
        );
        // The request the model got: an image block before the question.
        let requests = fake.requests();
        let last = requests.last().context("a request")?;
        let content = &last.body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .context("messages")?["content"];
        let blocks = content.as_array().context("blocks")?;
        assert_eq!(blocks[0]["type"], "image", "{content}");
        let data = base64::engine::general_purpose::STANDARD
            .decode(blocks[0]["source"]["data"].as_str().unwrap_or_default())?;
        let seen = image::load_from_memory(&data)?;
        assert_eq!((seen.width(), seen.height()), (1568, 1045));
        let text = blocks[1]["text"].as_str().unwrap_or_default();
        assert!(text.starts_with("what is in the photo?"), "{text}");
        Ok(())
    });
}

#[test]
fn a_file_the_agent_sends_arrives_on_the_asking_device() {
    require_docker();
    scenario(|| {
        let (_reap, _fake, _home, laptop) = home_agent_and_laptop()?;
        let content = "made in the sandbox\n";
        let prompt = format!(
            "[[tool write_file {}]] [[tool send_file {}]]",
            json!({ "path": "out/report.txt", "content": content }),
            json!({ "path": "out/report.txt" })
        );
        let o = laptop.try_cli(&["ask", &prompt])?;
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(0), "{err}");
        let line = format!(
            "[file report.txt ({} bytes) sent to this device: iom blob get ",
            content.len()
        );
        let at = err
            .find(&line)
            .with_context(|| format!("no file line: {err}"))?;
        let hash: String = err[at + line.len()..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        assert_eq!(hash.len(), 64, "{err}");
        wait_until("the blob on the laptop", Duration::from_secs(30), || {
            Ok(laptop.blob_hashes()?.contains(&hash))
        })?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("report.txt");
        laptop.cli(&["blob", "get", &hash, "-o", &path.display().to_string()])?;
        assert_eq!(std::fs::read_to_string(&path)?, content);
        Ok(())
    });
}
