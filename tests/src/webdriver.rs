//! A small WebDriver client for headless Chromium (Debian's `chromium` and `chromium-driver`),
//! driven with plain HTTP JSON calls, plus helpers for the web chat page's tests.
//!
//! chromedriver runs here, on a free loopback port, or inside a lab network namespace
//! ([`Options::in_netns`]), where the test reaches it through a [`NetnsForward`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::harness::{Node, free_port};
use crate::natlab::{self, NetnsForward, Proc};

/// The key of a WebDriver element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// chromedriver's port inside a namespace (fresh, so nothing else holds it).
const NETNS_DRIVER_PORT: u16 = 9515;
/// Narrower than this, the screen is a phone's: headless windows are at least 500 px wide, so
/// the phone's screen is emulated instead.
const PHONE_MAX_WIDTH: u32 = 500;

/// How [`Browser::launch`] starts chromedriver and Chromium.
#[derive(Debug, Clone)]
pub struct Options {
    /// The window's (or the emulated phone screen's) width, in CSS pixels.
    pub width: u32,
    /// The window's (or the emulated phone screen's) height, in CSS pixels.
    pub height: u32,
    /// Chromium flags after the default ones (headless, no sandbox, no GPU, the window size).
    pub args: Vec<String>,
    /// The network namespace chromedriver (and so Chromium) runs in (`ip netns exec NS
    /// chromedriver`), reached through a [`NetnsForward`]; `None`: this one.
    pub netns: Option<String>,
}

impl Options {
    /// A `width`×`height` window in this namespace, with no extra flags.
    pub fn new(width: u32, height: u32) -> Options {
        Options {
            width,
            height,
            args: Vec::new(),
            netns: None,
        }
    }

    /// Adds a Chromium flag.
    pub fn arg(mut self, arg: impl Into<String>) -> Options {
        self.args.push(arg.into());
        self
    }

    /// Runs chromedriver (and so Chromium) in network namespace `ns`.
    pub fn in_netns(mut self, ns: impl Into<String>) -> Options {
        self.netns = Some(ns.into());
        self
    }
}

/// A chromedriver process and one browser session. The driver (and its browser) is killed on
/// drop.
pub struct Browser {
    base: String,
    session: String,
    http: reqwest::Client,
    // Drop order: the forwarder's connections, then the driver.
    _forward: Option<NetnsForward>,
    _driver: Proc,
}

impl Browser {
    /// A `width`×`height` Chromium in this namespace (a phone's screen, with touch, below
    /// 500 px wide).
    pub async fn start(width: u32, height: u32) -> Result<Browser> {
        Browser::launch(Options::new(width, height)).await
    }

    /// Starts chromedriver as `opts` says and opens a session.
    pub async fn launch(opts: Options) -> Result<Browser> {
        let (mut cmd, port, place) = match &opts.netns {
            Some(ns) => (
                natlab::netns_command(ns, "chromedriver"),
                NETNS_DRIVER_PORT,
                format!(" in {ns}"),
            ),
            None => (Command::new("chromedriver"), free_port()?, String::new()),
        };
        cmd.arg(format!("--port={port}"));
        let driver = Proc::spawn("chromedriver", cmd).context(
            "cannot start chromedriver (install chromium and chromium-driver: \
             scripts/install-deps.sh)",
        )?;
        let target = SocketAddr::from(([127, 0, 0, 1], port));
        let forward = match &opts.netns {
            Some(ns) => Some(NetnsForward::start(ns, target)?),
            None => None,
        };
        let base = match &forward {
            Some(f) => format!("http://127.0.0.1:{}", f.port()),
            None => format!("http://{target}"),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/status")).send().await.is_err() {
            if Instant::now() > deadline {
                bail!("chromedriver did not come up{place}\n{}", driver.dump());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut b = Browser {
            base,
            session: String::new(),
            http,
            _forward: forward,
            _driver: driver,
        };
        let (width, height) = (opts.width, opts.height);
        let mut args = vec![
            json!("--headless=new"),
            json!("--no-sandbox"),
            json!("--disable-gpu"),
            json!("--disable-dev-shm-usage"),
            json!(format!("--window-size={width},{height}")),
        ];
        args.extend(opts.args.iter().map(|a| json!(a)));
        let mut options = json!({ "binary": "/usr/bin/chromium", "args": args });
        if width < PHONE_MAX_WIDTH {
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

    /// One WebDriver command: `method` (`GET`, `DELETE`, else `POST` with `body`) on `path`
    /// of the session (`/session` itself for a new one); returns the reply's `value`.
    pub async fn call(&self, method: &str, path: &str, body: Value) -> Result<Value> {
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

    /// Navigates to `url`.
    pub async fn goto(&self, url: &str) -> Result<()> {
        self.call("POST", "/url", json!({ "url": url })).await?;
        Ok(())
    }

    /// The element reference of the first element matching the CSS selector `css`.
    pub async fn find(&self, css: &str) -> Result<String> {
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

    /// Types `text` into the element matching `css` (as keystrokes, after what it holds).
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let e = self.find(css).await?;
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        )
        .await?;
        Ok(())
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) -> Result<()> {
        let e = self.find(css).await?;
        self.call("POST", &format!("/element/{e}/click"), json!({}))
            .await?;
        Ok(())
    }

    /// Runs a script in the page and returns what it returns.
    pub async fn js(&self, script: &str) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    /// Runs an async script; it ends by calling `arguments[arguments.length - 1]` with the
    /// result.
    pub async fn js_async(&self, script: &str, args: Value) -> Result<Value> {
        self.call(
            "POST",
            "/execute/async",
            json!({ "script": script, "args": args }),
        )
        .await
    }

    /// Runs `script` every 100 ms until it returns neither `null` nor `false` (that value is
    /// returned), failing after `timeout` with `what` in the message.
    pub async fn wait_js(&self, what: &str, script: &str, timeout: Duration) -> Result<Value> {
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

    /// Saves a PNG screenshot of the page as `name` in [`screenshots_dir`]; returns its path.
    pub async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let v = self.call("GET", "/screenshot", Value::Null).await?;
        let b64 = v.as_str().context("no screenshot data")?;
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(name);
        std::fs::write(
            &path,
            base64::engine::general_purpose::STANDARD.decode(b64)?,
        )?;
        Ok(path)
    }

    /// A Chrome DevTools command through chromedriver (`goog/cdp/execute`).
    pub async fn cdp(&self, cmd: &str, params: Value) -> Result<Value> {
        self.call(
            "POST",
            "/goog/cdp/execute",
            json!({ "cmd": cmd, "params": params }),
        )
        .await
    }

    /// Ends the session (the browser closes; chromedriver stays until drop).
    pub async fn close(&self) -> Result<()> {
        self.call("DELETE", "", Value::Null).await?;
        Ok(())
    }

    // ---- The iom web chat page.

    /// Opens the page signed in with `token` (kept in localStorage, as the login form does).
    pub async fn open_with_token(&self, page: &str, token: &str) -> Result<()> {
        self.goto(page).await?;
        self.js(&format!(
            "localStorage.setItem('iom.token', {}); location.reload(); return true",
            serde_json::to_string(token)?
        ))
        .await?;
        self.wait_chat(Duration::from_secs(15)).await
    }

    /// Waits up to `timeout` for the chat view: signed in, with the agent named.
    pub async fn wait_chat(&self, timeout: Duration) -> Result<()> {
        self.wait_js(
            "the chat",
            "return !document.getElementById('app').hidden && \
             document.getElementById('agent').textContent.startsWith('agent:')",
            timeout,
        )
        .await?;
        Ok(())
    }

    /// Opens the pairing page `url` (an invite URL) and waits up to `timeout` for its form.
    pub async fn open_pairing(&self, url: &str, timeout: Duration) -> Result<()> {
        self.goto(url).await?;
        self.wait_js(
            "the pairing form",
            "return document.body.dataset.state === 'ready'",
            timeout,
        )
        .await?;
        Ok(())
    }

    /// On the pairing page (its form ready): names the device `name`, saves the screenshot
    /// `shot` of the filled form, pairs and waits up to `timeout` for it to succeed; returns
    /// the browser's new device id.
    pub async fn pair_as(&self, name: &str, shot: &str, timeout: Duration) -> Result<String> {
        let field = self.find("#device-name").await?;
        self.call("POST", &format!("/element/{field}/clear"), json!({}))
            .await?;
        self.type_into("#device-name", name).await?;
        self.screenshot(shot).await?;
        self.click("#pair").await?;
        let state = self
            .wait_js(
                "pairing",
                "const s = document.body.dataset.state; \
                 return s === 'paired' || s === 'failed' ? s + ' ' + \
                 document.getElementById('pair-error').textContent : null",
                timeout,
            )
            .await?;
        ensure!(state == json!("paired "), "pairing: {state}");
        Ok(self
            .js("return document.body.dataset.device")
            .await?
            .as_str()
            .context("no device id")?
            .to_string())
    }

    /// Picks the files at `paths` in the page's file input, `#file` (WebDriver types their
    /// paths, one a line).
    pub async fn pick_files(&self, paths: &[&Path]) -> Result<()> {
        let input = self.find("#file").await?;
        let text: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        self.call(
            "POST",
            &format!("/element/{input}/value"),
            json!({ "text": text.join("\n") }),
        )
        .await?;
        Ok(())
    }

    /// Checks that the last answer, `text` when done, streamed in: [`WATCH`] (run before the
    /// ask) saw at least two partial lengths of it.
    pub async fn ensure_streamed(&self, text: &str) -> Result<()> {
        let lengths: Vec<u64> = self
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
        ensure!(
            partial.len() >= 2,
            "the answer did not stream (lengths seen: {lengths:?})"
        );
        Ok(())
    }

    /// Waits up to `timeout` for an ask sent while offline to wait in the outbox (one queued
    /// ask, its answer `queued`).
    pub async fn wait_queued(&self, timeout: Duration) -> Result<()> {
        self.wait_js(
            "the queued ask",
            "return document.body.dataset.outbox === '1' && \
             document.querySelector('.msg.user[data-queued=true]') && \
             document.querySelector('.msg.assistant:last-child').dataset.state === 'queued'",
            timeout,
        )
        .await?;
        Ok(())
    }

    /// After its device is revoked: polls `/v1/status` every 50 ms until the page's session
    /// is refused (401), failing after 1 s (naming the browser `who`); returns how long it took.
    pub async fn wait_cut_off(&self, who: &str) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            if self.page_status("/v1/status").await? == 401 {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(1) {
                bail!("the revoked {who} still has a session after 1 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Types a prompt (line breaks included: set as the textarea's value) and sends it.
    pub async fn ask(&self, prompt: &str) -> Result<()> {
        self.js(&format!(
            "document.getElementById('prompt').value = {}; \
             document.getElementById('send').click(); return true",
            serde_json::to_string(prompt)?
        ))
        .await?;
        Ok(())
    }

    /// Waits until the last answer is done and returns its text.
    pub async fn last_answer(&self, timeout: Duration) -> Result<String> {
        let v = self
            .wait_js(
                "the answer",
                "const m = document.querySelector('.msg.assistant:last-child'); \
                 return m && m.dataset.state === 'done' && m.querySelector('.text').textContent",
                timeout,
            )
            .await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Waits until `n` answers are shown and the last is done; returns its text.
    pub async fn answer_n(&self, n: usize, timeout: Duration) -> Result<String> {
        let v = self
            .wait_js(
                &format!("answer {n}"),
                &format!(
                    "const all = document.querySelectorAll('.msg.assistant'); \
                     const m = all[all.length - 1]; \
                     return all.length === {n} && m.dataset.state === 'done' && \
                        m.querySelector('.text').textContent"
                ),
                timeout,
            )
            .await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Signs in with the browser's device key (the page's `iomKey.login()`); returns what it
    /// gives: `true` or `false`, or the error's text.
    pub async fn key_login(&self) -> Result<Value> {
        self.js_async(
            "const done = arguments[0]; iomKey.login().then(done, e => done(String(e)));",
            json!([]),
        )
        .await
    }

    /// Fetches `path` from the page (with its session cookie): the HTTP status.
    pub async fn page_status(&self, path: &str) -> Result<u16> {
        let v = self
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
}

/// Where screenshots go: `screenshots/` in the target dir (`CARGO_TARGET_DIR`, else the
/// workspace's `target/`).
pub fn screenshots_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("screenshots")
}

/// A script that records every length the last answer's text goes through (in
/// `window.__lengths`), so a test can tell it streamed.
pub const WATCH: &str = r#"
window.__lengths = [];
new MutationObserver(() => {
  const t = document.querySelector('.msg.assistant:last-child .text');
  if (t) window.__lengths.push(t.textContent.length);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
return true;
"#;

/// The first conversation in `list` (what `iom conversations list` printed), as `node`'s
/// `iom conversations show` prints it.
pub fn first_conversation(node: &Node, list: &Value) -> Result<Value> {
    let id = list["conversations"][0]["id"]
        .as_str()
        .context("no conversation")?;
    node.json(&["conversations", "show", id])
}

/// The user's asks (their texts, in order) in a conversation as `iom conversations show`
/// prints it.
pub fn user_asks(conversation: &Value) -> Vec<&str> {
    conversation["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter(|m| m["role"] == "user")
                .filter_map(|m| m["text"].as_str())
                .collect()
        })
        .unwrap_or_default()
}

/// The base64 SHA-256 of a PEM certificate's public key (what Chromium's
/// `--ignore-certificate-errors-spki-list` pins), by `openssl`.
pub fn spki_pin(pem: &Path) -> Result<String> {
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
