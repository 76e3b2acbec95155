//! The web chat page in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`) driven over WebDriver with plain HTTP JSON calls. The page loads, takes
//! a token, sends a message and shows the answer as it streams; screenshots (phone-sized and
//! desktop-sized) are saved to `target/screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig};
use iom_tests::harness::{AgentHttpNode, agent_http_node, free_port, runtime, scenario};
use serde_json::{Value, json};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    async fn start(width: u32, height: u32) -> Result<Browser> {
        Browser::start_with(width, height, &[]).await
    }

    /// [`Browser::start`] with extra Chromium flags.
    async fn start_with(width: u32, height: u32, extra: &[String]) -> Result<Browser> {
        let port = free_port()?;
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start chromedriver (install chromium and chromium-driver: scripts/install-deps.sh)")?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/status")).send().await.is_err() {
            if Instant::now() > deadline {
                bail!("chromedriver did not come up");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
            http,
        };
        let mut options = json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", format!("--window-size={width},{height}")],
        });
        if let Some(args) = options["args"].as_array_mut() {
            args.extend(extra.iter().map(|a| json!(a)));
        }
        if width < 500 {
            // Headless windows are at least 500 px wide: emulate the phone's screen instead.
            options["mobileEmulation"] = json!({ "deviceMetrics": {
                "width": width, "height": height, "pixelRatio": 2, "touch": true,
            }});
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": options,
        }}});
        let v = b.call("POST", "/session", caps).await?;
        b.session = v["sessionId"]
            .as_str()
            .context("no session id")?
            .to_string();
        Ok(b)
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Result<Value> {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let resp = req.send().await?;
        let status = resp.status();
        let v: Value = resp.json().await?;
        if !status.is_success() {
            bail!("webdriver {method} {path}: {status}: {v}");
        }
        Ok(v["value"].clone())
    }

    async fn goto(&self, url: &str) -> Result<()> {
        self.call("POST", "/url", json!({ "url": url })).await?;
        Ok(())
    }

    async fn find(&self, css: &str) -> Result<String> {
        let v = self
            .call(
                "POST",
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await?;
        Ok(v[ELEMENT]
            .as_str()
            .ok_or_else(|| anyhow!("no element {css}: {v}"))?
            .to_string())
    }

    async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let e = self.find(css).await?;
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        )
        .await?;
        Ok(())
    }

    async fn click(&self, css: &str) -> Result<()> {
        let e = self.find(css).await?;
        self.call("POST", &format!("/element/{e}/click"), json!({}))
            .await?;
        Ok(())
    }

    async fn js(&self, script: &str) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    /// Runs an async script; it ends by calling `arguments[arguments.length - 1]` with the
    /// result.
    async fn js_async(&self, script: &str, args: Value) -> Result<Value> {
        self.call(
            "POST",
            "/execute/async",
            json!({ "script": script, "args": args }),
        )
        .await
    }

    async fn wait_js(&self, what: &str, script: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.js(script).await?;
            if !v.is_null() && v != Value::Bool(false) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let v = self.call("GET", "/screenshot", Value::Null).await?;
        let b64 = v.as_str().context("no screenshot data")?;
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(name);
        std::fs::write(&path, decode_base64(b64)?)?;
        Ok(path)
    }

    async fn close(&self) -> Result<()> {
        self.call("DELETE", "", Value::Null).await?;
        Ok(())
    }
}

fn screenshots_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("screenshots")
}

/// Standard base64 (the WebDriver screenshot encoding).
fn decode_base64(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => bail!("bad base64 byte {c}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// Records every length the answer text goes through, so the test can tell it streamed.
const WATCH: &str = r#"
window.__lengths = [];
new MutationObserver(() => {
  const t = document.querySelector('.msg.assistant:last-child .text');
  if (t) window.__lengths.push(t.textContent.length);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
return true;
"#;

/// Notes whether a tool call was ever seen in the `running` state.
const WATCH_TOOLS: &str = r#"
window.__toolRunning = false;
new MutationObserver(() => {
  if (document.querySelector('.msg.assistant:last-child .tool[data-state="running"]'))
    window.__toolRunning = true;
}).observe(document.getElementById('messages'), {subtree: true, childList: true, attributes: true});
return true;
"#;

/// Panics unless Docker is reachable; builds the sandbox image if it is missing. (The tool
/// call is part of what this test shows: `IOM_SKIP_DOCKER=1 scripts/test.sh` leaves the whole
/// test out, reported as skipped.)
fn require_docker(data_dir: &std::path::Path) {
    let engine = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        engine,
        "Docker is not reachable: this test runs a tool call in the sandbox \
         (`IOM_SKIP_DOCKER=1 scripts/test.sh` leaves it out)"
    );
    let have = Command::new("docker")
        .args(["image", "inspect", "iom-sandbox:1"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        let out = Command::new(iom_tests::harness::iom_bin())
            .arg("--data-dir")
            .arg(data_dir)
            .args(["sandbox", "build"])
            .output();
        assert!(
            out.as_ref().is_ok_and(|o| o.status.success()),
            "`iom sandbox build` failed: {out:?}"
        );
    }
}

/// Removes the sandbox containers of a node.
fn remove_containers(device: &str) {
    let ids = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=iom.node={device}")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for id in ids.split_whitespace() {
        let _ = Command::new("docker").args(["rm", "-f", id]).output();
    }
}

#[test]
fn web_page_sends_and_streams() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let AgentHttpNode {
            mut node,
            port,
            token,
            ..
        } = agent_http_node("phone", &fake.node_env())?;
        let me = node.device_id()?;
        // A long prompt makes a long echo, streamed over a second or two.
        let prompt = format!(
            "Write me a short note about the mesh. {}",
            "Every device syncs its documents. ".repeat(30)
        );
        let page = format!("http://127.0.0.1:{port}/");
        rt.block_on(async {
            let b = Browser::start(390, 844).await?;
            b.goto(&page).await?;
            // No token yet: the page asks for one.
            b.wait_js(
                "the token form",
                "return !document.getElementById('login').hidden",
                Duration::from_secs(10),
            )
            .await?;
            b.screenshot("web-login-phone.png").await?;
            // A wrong token is refused with a message.
            b.type_into("#token-input", "iom_wrong").await?;
            b.click("#token-save").await?;
            b.wait_js(
                "the refusal",
                "return document.getElementById('login-error').textContent",
                Duration::from_secs(10),
            )
            .await?;
            b.js("document.getElementById('token-input').value = ''; return true").await?;
            b.type_into("#token-input", &token).await?;
            b.click("#token-save").await?;
            b.wait_js(
                "the chat",
                "return !document.getElementById('app').hidden && \
                 document.getElementById('agent').textContent.startsWith('agent:')",
                Duration::from_secs(10),
            )
            .await?;
            b.js(WATCH).await?;
            b.type_into("#prompt", &prompt).await?;
            b.click("#send").await?;
            let text = b
                .wait_js(
                    "the streamed answer",
                    "const m = document.querySelector('.msg.assistant:last-child'); \
                     return m && m.dataset.state === 'done' && m.querySelector('.text').textContent",
                    Duration::from_secs(60),
                )
                .await?;
            let text = text.as_str().unwrap_or("").to_string();
            assert!(text.starts_with("echo: Write me a short note"), "{text:.200}");
            let lengths: Vec<u64> = b
                .js("return window.__lengths")
                .await?
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter_map(Value::as_u64)
                .collect();
            let partial: std::collections::BTreeSet<u64> = lengths
                .iter()
                .copied()
                .filter(|l| *l > 0 && (*l as usize) < text.chars().count())
                .collect();
            assert!(
                partial.len() >= 2,
                "the answer did not stream (lengths seen: {lengths:?})"
            );
            // Usage is shown per message and for the conversation; the list shows it too.
            let meta = b
                .wait_js(
                    "usage",
                    "const u = document.getElementById('conv-usage').textContent; \
                     const m = document.querySelector('.msg.assistant:last-child .meta').textContent; \
                     return u.includes('tokens') && m.includes('tokens') && [m, u]",
                    Duration::from_secs(10),
                )
                .await?;
            assert!(meta.to_string().contains(" in · "), "{meta}");
            b.wait_js(
                "the conversation in the list",
                "return document.querySelectorAll('#conversations li').length === 1",
                Duration::from_secs(10),
            )
            .await?;
            require_docker(&node.dir);
            // A tool call (run in the Docker sandbox) shows up while it runs, with its output.
            b.js(WATCH_TOOLS).await?;
            let directive = format!(
                "[[tool bash {}]]",
                json!({ "command": "sleep 1; echo hello from the sandbox" })
            );
            b.type_into("#prompt", &format!("List it. {directive}")).await?;
            b.click("#send").await?;
            b.wait_js(
                "the answer after the tool call",
                "const all = document.querySelectorAll('.msg.assistant'); \
                 return all.length === 2 && all[1].dataset.state === 'done'",
                Duration::from_secs(120),
            )
            .await?;
            let tool = b
                .js("const t = document.querySelector('.msg.assistant:last-child .tool'); \
                     return t && [t.dataset.state, t.querySelector('summary').textContent, \
                                  t.querySelector('.output').textContent, window.__toolRunning]")
                .await?;
            assert_eq!(tool[0], "done", "{tool}");
            assert!(tool[1].as_str().unwrap_or("").contains("bash"), "{tool}");
            assert!(
                tool[2].as_str().unwrap_or("").contains("hello from the sandbox"),
                "{tool}"
            );
            assert_eq!(tool[3], true, "the tool call was not shown while it ran: {tool}");
            b.js("document.querySelector('.msg.assistant:last-child details').open = true; \
                  return true")
                .await?;
            let shot = b.screenshot("web-chat-phone.png").await?;
            assert!(std::fs::metadata(&shot)?.len() > 5_000, "tiny screenshot");
            // No horizontal overflow on a phone-sized screen.
            let overflow = b
                .js("return document.documentElement.scrollWidth > window.innerWidth + 1")
                .await?;
            assert_eq!(overflow, Value::Bool(false), "the page scrolls sideways on a phone");
            b.close().await?;

            // Desktop: the token is remembered; the list and the conversation reload.
            let d = Browser::start(1280, 800).await?;
            d.goto(&page).await?;
            d.js(&format!(
                "localStorage.setItem('iom.token', {}); location.reload(); return true",
                serde_json::to_string(&token)?
            ))
            .await?;
            d.wait_js(
                "the list",
                "return document.querySelectorAll('#conversations li').length === 1",
                Duration::from_secs(10),
            )
            .await?;
            d.click("#conversations li").await?;
            d.wait_js(
                "the old answer",
                "const m = document.querySelector('.msg.assistant .text'); \
                 return m && m.textContent.startsWith('echo:')",
                Duration::from_secs(10),
            )
            .await?;
            d.screenshot("web-chat-desktop.png").await?;
            d.close().await?;
            anyhow::Ok(())
        })?;
        // The page's request went through the web interface.
        let convs = node.json(&["conversations", "list"])?;
        let id = convs["conversations"][0]["id"]
            .as_str()
            .context("no conversation")?
            .to_string();
        let c = node.json(&["conversations", "show", &id])?;
        assert_eq!(c["messages"][0]["interface"], "web", "{c}");
        node.stop()?;
        remove_containers(&me);
        node.assert_no_panic()
    });
}

/// A call marked `ask` shows as a card with the exact call and what it touches; the page's
/// Approve button answers it and the answer streams in (no Docker: a mesh tool).
#[test]
fn web_page_answers_an_approval() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let AgentHttpNode {
            node, port, token, ..
        } = agent_http_node("approver", &fake.node_env())?;
        node.cli(&["approvals", "policy", "set", "memory_update", "ask"])?;
        let page = format!("http://127.0.0.1:{port}/");
        let directive = format!(
            "[[tool memory_update {}]]",
            json!({ "text": "prefers the page" })
        );
        rt.block_on(async {
            let b = Browser::start(390, 844).await?;
            b.goto(&page).await?;
            b.js(&format!(
                "localStorage.setItem('iom.token', {}); location.reload(); return true",
                serde_json::to_string(&token)?
            ))
            .await?;
            b.wait_js(
                "the chat",
                "return !document.getElementById('app').hidden",
                Duration::from_secs(10),
            )
            .await?;
            b.type_into("#prompt", &format!("Remember this. {directive}"))
                .await?;
            b.click("#send").await?;
            let card = b
                .wait_js(
                    "the approval card",
                    "const c = document.querySelector('.msg.assistant .approval .card'); \
                     return c && c.dataset.state === 'pending' && c.textContent",
                    Duration::from_secs(30),
                )
                .await?;
            let card = card.as_str().unwrap_or("").to_string();
            assert!(card.contains("memory_update"), "{card}");
            assert!(card.contains("prefers the page"), "{card}");
            assert!(card.contains("appends to the memory document"), "{card}");
            b.screenshot("web-approval-phone.png").await?;
            b.click(".msg.assistant .approval .card button.primary")
                .await?;
            b.wait_js(
                "the answer after the approval",
                "const m = document.querySelector('.msg.assistant:last-child'); \
                 return m && m.dataset.state === 'done'",
                Duration::from_secs(30),
            )
            .await?;
            b.close().await?;
            anyhow::Ok(())
        })?;
        let memory = node.json(&["memory", "show"])?;
        assert_eq!(memory["text"], "prefers the page", "{memory}");
        let all = node.json(&["approvals", "--all"])?;
        assert_eq!(all["approvals"][0]["state"], "approved", "{all}");
        node.assert_no_panic()
    });
}

/// The base64 SHA-256 of a PEM certificate's public key (what Chromium's
/// `--ignore-certificate-errors-spki-list` pins), by `openssl`.
fn spki_pin(pem: &std::path::Path) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(
            "openssl x509 -in \"$0\" -pubkey -noout | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | openssl base64 -A",
        )
        .arg(pem)
        .output()?;
    if !out.status.success() {
        bail!("openssl: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Fetches `path` from the page (with its cookie) and returns the HTTP status.
async fn page_status(b: &Browser, path: &str) -> Result<u16> {
    let v = b
        .js_async(
            "const done = arguments[arguments.length - 1]; \
             fetch(arguments[0]).then(r => done(r.status), e => done(String(e)));",
            json!([path]),
        )
        .await?;
    v.as_u64()
        .map(|s| s as u16)
        .ok_or_else(|| anyhow!("fetch {path} failed in the page: {v}"))
}

/// A node serving HTTPS with its self-signed certificate on a fresh loopback port; returns
/// it, the port and the certificate's SPKI pin.
fn https_node() -> Result<(iom_tests::harness::Node, u16, String)> {
    let mut node = iom_tests::harness::Node::new("home")?;
    let port = free_port()?;
    node.args
        .extend(["--https".to_string(), format!("127.0.0.1:{port}")]);
    node.start()?;
    let pin = spki_pin(&node.dir.join("tls/self-signed.pem"))?;
    Ok((node, port, pin))
}

/// A phone-sized browser that trusts the certificate with this SPKI pin.
async fn phone_trusting(pin: &str) -> Result<Browser> {
    Browser::start_with(
        390,
        844,
        &[format!("--ignore-certificate-errors-spki-list={pin}")],
    )
    .await
}

/// The invite URL's parts: `(origin, secret fragment)`.
fn web_invite(node: &iom_tests::harness::Node, ttl: &str) -> Result<(String, String)> {
    let v = node.json(&["invite", "--web", "--ttl", ttl])?;
    let url = v["url"].as_str().context("no url")?.to_string();
    assert!(
        v["code"].as_str().is_some_and(|c| c.starts_with("iom1")),
        "{v}"
    );
    assert!(v["expires"].as_u64().is_some(), "{v}");
    let (origin, secret) = url
        .split_once("/pair#")
        .ok_or_else(|| anyhow!("not a pairing URL: {url}"))?;
    Ok((origin.to_string(), secret.to_string()))
}

#[test]
fn a_browser_pairs_with_an_invite_url_signs_in_and_is_cut_off_when_revoked() {
    scenario(|| {
        let rt = runtime()?;
        let (node, port, pin) = https_node()?;
        let (origin, secret) = web_invite(&node, "15m")?;
        assert_eq!(origin, format!("https://127.0.0.1:{port}"));
        rt.block_on(async {
            let b = phone_trusting(&pin).await?;
            // Headless Chromium makes a non-extractable Ed25519 key with WebCrypto.
            b.goto(&format!("{origin}/pair#{secret}")).await?;
            b.wait_js(
                "the pairing form",
                "return document.body.dataset.state === 'ready'",
                Duration::from_secs(10),
            )
            .await?;
            assert_eq!(
                b.js("return location.hash").await?,
                json!(""),
                "the secret stays in the address bar"
            );
            let name = b.find("#device-name").await?;
            b.call("POST", &format!("/element/{name}/clear"), json!({}))
                .await?;
            b.type_into("#device-name", "Anna's phone").await?;
            b.screenshot("pair-phone.png").await?;
            b.click("#pair").await?;
            let state = b
                .wait_js(
                    "pairing",
                    "const s = document.body.dataset.state; \
                     return s === 'paired' || s === 'failed' ? s + ' ' + \
                     document.getElementById('pair-error').textContent : null",
                    Duration::from_secs(15),
                )
                .await?;
            assert_eq!(state, json!("paired "), "{state}");
            b.screenshot("pair-done-phone.png").await?;
            let device = b
                .js("return document.body.dataset.device")
                .await?
                .as_str()
                .context("no device id")?
                .to_string();
            // The browser is a device of the mesh, with its name and kind, never an admin.
            let entry = node
                .device_entry(&device)?
                .ok_or_else(|| anyhow!("{device} not in iom devices"))?;
            assert_eq!(entry["name"], json!("Anna's phone"), "{entry}");
            assert_eq!(entry["kind"], json!("browser"), "{entry}");
            assert_eq!(entry["admin"], json!(false), "{entry}");
            let table = node.cli(&["devices"])?;
            assert!(table.contains("Anna's phone") && table.contains("browser"), "{table}");
            // Its key is not extractable.
            let extractable = b
                .js_async(
                    "const done = arguments[0]; \
                        iomKey.load().then(k => done([k.privateKey.extractable, \
                        k.privateKey.algorithm.name]), e => done(String(e)));",
                    json!([]),
                )
                .await?;
            assert_eq!(extractable, json!([false, "Ed25519"]));
            // The session (an HttpOnly cookie, invisible to scripts) opens the API.
            assert_eq!(page_status(&b, "/v1/status").await?, 200);
            assert_eq!(b.js("return document.cookie").await?, json!(""));
            // The chat page signs in by itself with the key.
            b.goto(&format!("{origin}/")).await?;
            b.wait_js(
                "the chat after a signed session",
                "return !document.getElementById('app').hidden",
                Duration::from_secs(10),
            )
            .await?;
            b.screenshot("chat-paired-phone.png").await?;
            // A browser may not administer.
            let v = b
                .js_async(
                    "const done = arguments[0]; \
                        fetch('/v1/invites', {method: 'POST'}).then(r => done(r.status));",
                    json!([]),
                )
                .await?;
            assert_eq!(v, json!(403));
            // The used invite URL, opened again, says so.
            b.goto(&format!("{origin}/pair#{secret}")).await?;
            b.wait_js("the form", "return document.body.dataset.state === 'ready'", Duration::from_secs(10)).await?;
            b.click("#pair").await?;
            let e = b
                .wait_js(
                    "the used-invite page",
                    "return document.body.dataset.state === 'failed' && document.body.dataset.error",
                    Duration::from_secs(10),
                )
                .await?;
            assert_eq!(e, json!("invite_used"));
            b.screenshot("pair-used-phone.png").await?;
            // Revoked: its sessions stop within a second.
            node.cli(&["devices", "revoke", &device])?;
            let t0 = Instant::now();
            loop {
                if page_status(&b, "/v1/status").await? == 401 {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(1) {
                    bail!("the revoked browser still has a session after 1 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // And it cannot sign in again.
            let ok = b
                .js_async(
                    "const done = arguments[0]; \
                        iomKey.login().then(done, e => done(String(e)));",
                    json!([]),
                )
                .await?;
            assert_eq!(ok, json!(false));
            b.close().await
        })?;
        node.assert_no_panic()
    });
}

#[test]
fn bad_invite_urls_get_a_clear_page_and_change_nothing() {
    scenario(|| {
        let rt = runtime()?;
        let (node, _port, pin) = https_node()?;
        let (origin, secret) = web_invite(&node, "2s")?;
        let (_, good) = web_invite(&node, "15m")?;
        let devices = node.devices()?.len();
        // Tampered: one character of the secret changed.
        let mut chars: Vec<char> = good.chars().collect();
        chars[5] = if chars[5] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        std::thread::sleep(Duration::from_secs(3));
        rt.block_on(async {
            let b = phone_trusting(&pin).await?;
            for (fragment, want, shot) in [
                (secret.as_str(), "invite_expired", "pair-expired-phone.png"),
                (tampered.as_str(), "unknown_invite", "pair-tampered-phone.png"),
                ("short", "no_invite", "pair-no-invite-phone.png"),
            ] {
                b.goto("about:blank").await?;
                b.goto(&format!("{origin}/pair#{fragment}")).await?;
                let _ = b
                    .wait_js(
                        "the form",
                        "const s = document.body.dataset.state; return s === 'ready' || s === 'failed'",
                        Duration::from_secs(10),
                    )
                    .await?;
                if b.js("return document.body.dataset.state").await? == json!("ready") {
                    b.click("#pair").await?;
                }
                let e = b
                    .wait_js(
                        "the failure page",
                        "return document.body.dataset.state === 'failed' && document.body.dataset.error",
                        Duration::from_secs(10),
                    )
                    .await?;
                assert_eq!(e, json!(want), "{fragment}");
                let text = b.js("return document.getElementById('pair-error').textContent").await?;
                assert!(text.as_str().is_some_and(|t| t.len() > 20), "{text}");
                b.screenshot(shot).await?;
            }
            b.close().await
        })?;
        assert_eq!(
            node.devices()?.len(),
            devices,
            "a failed pairing added a device"
        );
        node.assert_no_panic()
    });
}
