//! The web chat page in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`) driven over WebDriver with plain HTTP JSON calls. The page loads, takes
//! a token, sends a message and shows the answer as it streams; screenshots (phone-sized and
//! desktop-sized) are saved to `target/screenshots/`.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig};
use iom_tests::harness::{AgentHttpNode, agent_http_node, free_port, runtime, scenario};
use iom_tests::webdriver::{Browser, Options, WATCH, first_conversation, spki_pin, user_asks};
use serde_json::{Value, json};

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
            b.wait_chat(Duration::from_secs(10)).await?;
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
            b.ensure_streamed(&text).await?;
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
        let c = first_conversation(&node, &convs)?;
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
    Browser::launch(
        Options::new(390, 844).arg(format!("--ignore-certificate-errors-spki-list={pin}")),
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
            b.open_pairing(&format!("{origin}/pair#{secret}"), Duration::from_secs(10))
                .await?;
            assert_eq!(
                b.js("return location.hash").await?,
                json!(""),
                "the secret stays in the address bar"
            );
            let device = b
                .pair_as("Anna's phone", "pair-phone.png", Duration::from_secs(15))
                .await?;
            b.screenshot("pair-done-phone.png").await?;
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
            assert_eq!(b.page_status("/v1/status").await?, 200);
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
            b.open_pairing(&format!("{origin}/pair#{secret}"), Duration::from_secs(10))
                .await?;
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
            b.wait_cut_off("browser").await?;
            // And it cannot sign in again.
            let ok = b.key_login().await?;
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

// ---- The page as a PWA (issue 12): Markdown, attachments, offline, phone layout and views.

/// Markdown an answer may hold, with every kind of injection a model could be tricked into.
const MARKDOWN_ANSWER: &str = "# Plan\n\nUse **strong** words, *emphasis* and `inline <code>`.\n\n\
```rust\nfn main() {\n    println!(\"<b>not bold</b>\");\n}\n```\n\n\
- first item\n- second with [the docs](https://example.com/docs?a=1&b=2)\n  - nested item\n\n\
1. one\n2. two\n\n\
<script>window.__pwned = 'script'</script>\n\
<img src=x onerror=\"window.__pwned = 'img'\">\n\
[click me](javascript:window.__pwned='link') and [data](data:text/html,<script>alert(1)</script>)\n\n\
See https://example.org/page.";

/// What the rendered answer looks like, as JSON, for the checks below.
const MARKDOWN_PROBE: &str = r#"
const t = document.querySelector('.msg.assistant:last-child .text');
if (!t || t.closest('.msg').dataset.state !== 'done') return null;
const q = (s) => t.querySelectorAll(s).length;
return {
  pwned: window.__pwned === undefined ? null : String(window.__pwned),
  scripts: q('script'), imgs: q('img'), iframes: q('iframe'),
  bad_links: [...t.querySelectorAll('a')].filter(a => !/^https?:/.test(a.href)).length,
  links: [...t.querySelectorAll('a')].map(a => [a.href, a.rel, a.textContent]),
  h: t.querySelector('h3') && t.querySelector('h3').textContent,
  strong: q('strong'), em: q('em'),
  inline_code: [...t.querySelectorAll('p code')].map(c => c.textContent),
  block: t.querySelector('pre.code code') && t.querySelector('pre.code code').textContent,
  lang: t.querySelector('pre.code code') && t.querySelector('pre.code code').dataset.lang,
  ul: q(':scope > ul > li'), nested: q('ul ul li'), ol: q('ol > li'),
  text: t.textContent,
};
"#;

fn check_markdown(v: &Value) {
    assert_eq!(v["pwned"], Value::Null, "model output ran code: {v}");
    assert_eq!(v["scripts"], 0, "{v}");
    assert_eq!(v["imgs"], 0, "{v}");
    assert_eq!(v["iframes"], 0, "{v}");
    assert_eq!(v["bad_links"], 0, "a non-http(s) link was made: {v}");
    let links = v["links"].as_array().cloned().unwrap_or_default();
    assert_eq!(links.len(), 2, "{v}");
    assert_eq!(links[0][0], "https://example.com/docs?a=1&b=2", "{v}");
    assert_eq!(links[0][2], "the docs", "{v}");
    assert_eq!(links[1][0], "https://example.org/page", "{v}");
    for l in &links {
        assert!(l[1].as_str().unwrap_or("").contains("noopener"), "{v}");
    }
    assert_eq!(v["h"], "Plan", "{v}");
    assert_eq!(v["strong"], 1, "{v}");
    assert_eq!(v["em"], 1, "{v}");
    assert_eq!(v["inline_code"], json!(["inline <code>"]), "{v}");
    assert_eq!(
        v["block"], "fn main() {\n    println!(\"<b>not bold</b>\");\n}",
        "{v}"
    );
    assert_eq!(v["lang"], "rust", "{v}");
    assert_eq!(v["ul"], 2, "{v}");
    assert_eq!(v["nested"], 1, "{v}");
    assert_eq!(v["ol"], 2, "{v}");
    // The injections are shown as the text they are.
    let text = v["text"].as_str().unwrap_or("");
    for shown in [
        "<script>window.__pwned = 'script'</script>",
        "<img src=x onerror=\"window.__pwned = 'img'\">",
        "[click me](javascript:window.__pwned='link')",
        "[data](data:text/html,<script>alert(1)</script>)",
    ] {
        assert!(text.contains(shown), "{shown:?} not shown as text: {text}");
    }
}

#[test]
fn web_page_renders_markdown_answers_safely() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let AgentHttpNode {
            node, port, token, ..
        } = agent_http_node("markdown", &fake.node_env())?;
        fake.push_script(iom_tests::fake_anthropic::Scripted::Text(
            MARKDOWN_ANSWER.to_string(),
        ));
        let page = format!("http://127.0.0.1:{port}/");
        rt.block_on(async {
            let b = Browser::start(390, 844).await?;
            b.open_with_token(&page, &token).await?;
            b.ask("Show me some Markdown.").await?;
            // Streamed, then rendered: checked live and again from the stored conversation.
            let live = b
                .wait_js(
                    "the rendered answer",
                    MARKDOWN_PROBE,
                    Duration::from_secs(30),
                )
                .await?;
            check_markdown(&live);
            b.screenshot("web-markdown-phone.png").await?;
            b.goto(&page).await?;
            b.wait_js(
                "the list",
                "return document.querySelectorAll('#conversations li').length === 1",
                Duration::from_secs(10),
            )
            .await?;
            b.js("document.querySelector('#conversations li').click(); return true")
                .await?;
            let stored = b
                .wait_js("the stored answer", MARKDOWN_PROBE, Duration::from_secs(10))
                .await?;
            check_markdown(&stored);
            b.close().await
        })?;
        node.assert_no_panic()
    });
}

/// A photo and a text file attached on the phone become blobs and attachments of the ask (the
/// agent sees them in its workspace); the file the agent sends back gets a download link
/// that yields its bytes, live and after a reload.
#[test]
fn web_page_attaches_files_and_downloads_what_the_agent_sent() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let AgentHttpNode {
            mut node,
            port,
            token,
            ..
        } = agent_http_node("attacher", &fake.node_env())?;
        let me = node.device_id()?;
        require_docker(&node.dir);
        let photo = node.dir.join("photo.png");
        std::fs::write(
            &photo,
            include_bytes!("../../node/src/http/web/icon-192.png"),
        )?;
        let note = node.dir.join("note.txt");
        let note_text = "groceries: milk, eggs, bread\n";
        std::fs::write(&note, note_text)?;
        let note_hash = iom_tests::harness::sha256_file(&note)?;
        let photo_hash = iom_tests::harness::sha256_file(&photo)?;
        let page = format!("http://127.0.0.1:{port}/");
        let directive = format!(
            "[[tool send_file {}]]",
            json!({ "path": "/workspace/attachments/note.txt", "name": "copy.txt" })
        );
        rt.block_on(async {
            let b = Browser::start(390, 844).await?;
            b.open_with_token(&page, &token).await?;
            // The file input takes paths (WebDriver's way of choosing files).
            b.pick_files(&[&photo, &note]).await?;
            let picked = b
                .wait_js(
                    "the picked files",
                    "const p = document.querySelectorAll('#picked li'); \
                     return p.length === 2 && [...p].map(l => l.textContent)",
                    Duration::from_secs(10),
                )
                .await?;
            assert!(picked.to_string().contains("photo.png"), "{picked}");
            b.screenshot("web-attach-picked-phone.png").await?;
            b.ask(&format!("What is on my list? {directive}")).await?;
            let answer = b.last_answer(Duration::from_secs(120)).await?;
            // The agent got both files in its workspace (the echo repeats the node's note).
            assert!(
                answer.contains("/workspace/attachments/note.txt")
                    && answer.contains(&note_hash)
                    && answer.contains("/workspace/attachments/photo.png"),
                "{answer}"
            );
            // The request shows its files, the photo with a preview.
            let chips = b
                .wait_js(
                    "the request's files",
                    "const u = [...document.querySelectorAll('.msg.user')].pop(); \
                     const img = u && u.querySelector('img.preview'); \
                     return img && img.complete && img.naturalWidth > 0 && \
                        [...u.querySelectorAll('a.download')].map(a => a.dataset.hash)",
                    Duration::from_secs(10),
                )
                .await?;
            assert_eq!(chips, json!([photo_hash, note_hash]));
            check_download(&b, "copy.txt", note_text).await?;
            b.screenshot("web-attach-phone.png").await?;
            // After a reload the files come from the stored conversation.
            b.goto(&page).await?;
            b.wait_js(
                "the list",
                "return document.querySelectorAll('#conversations li').length === 1",
                Duration::from_secs(10),
            )
            .await?;
            b.js("document.querySelector('#conversations li').click(); return true")
                .await?;
            let stored = b
                .wait_js(
                    "the stored files",
                    "const a = [...document.querySelectorAll('.msg a.download')]; \
                     return a.length === 3 && a.map(x => x.textContent)",
                    Duration::from_secs(10),
                )
                .await?;
            assert_eq!(
                stored,
                json!(["↓ photo.png", "↓ note.txt", "↓ copy.txt"]),
                "{stored}"
            );
            let shown = b
                .js("return document.querySelector('.msg.user .text').textContent")
                .await?;
            assert_eq!(shown, json!(format!("What is on my list? {directive}")));
            check_download(&b, "copy.txt", note_text).await?;
            b.close().await
        })?;
        // The ask carried the blobs as attachments; the model got the note and the photo.
        let convs = node.json(&["conversations", "list"])?;
        let c = first_conversation(&node, &convs)?;
        let names: Vec<&str> = c["messages"][0]["attachments"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(names, ["photo.png", "note.txt"], "{c}");
        let images = fake
            .requests()
            .iter()
            .filter(|r| r.body.to_string().contains("\"type\":\"image\""))
            .count();
        assert!(images >= 1, "the photo never reached the model as an image");
        node.stop()?;
        remove_containers(&me);
        node.assert_no_panic()
    });
}

/// Clicks the download link named `name` in the last answer and checks the bytes it holds.
async fn check_download(b: &Browser, name: &str, want: &str) -> Result<()> {
    let sel = format!(
        "[...document.querySelectorAll('.msg.assistant a.download')].find(a => a.download === {})",
        serde_json::to_string(name)?
    );
    b.wait_js(
        "the download link",
        &format!("return !!{sel}"),
        Duration::from_secs(20),
    )
    .await?;
    b.js(&format!("{sel}.click(); return true")).await?;
    let got = b
        .js_async(
            &format!(
                "const done = arguments[arguments.length - 1]; \
                 const wait = () => {{ const a = {sel}; \
                   if (a.dataset.fetched === 'true') a.iomBlob.text().then(done, e => done(String(e))); \
                   else setTimeout(wait, 50); }}; wait();"
            ),
            json!([]),
        )
        .await?;
    assert_eq!(got, json!(want), "the download of {name}");
    let href = b.js(&format!("return {sel}.href")).await?;
    assert!(
        href.as_str().is_some_and(|h| h.starts_with("blob:")),
        "{href}"
    );
    Ok(())
}

/// The installable PWA: manifest and icons; the service worker serves the app shell and the
/// recent conversation while the node is down, an ask typed meanwhile waits in IndexedDB and
/// goes out (once) when the node is back on the same port.
#[test]
fn web_page_works_offline_and_sends_the_queued_ask_on_reconnect() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let AgentHttpNode {
            mut node,
            port,
            token,
            ..
        } = agent_http_node("offline", &fake.node_env())?;
        let page = format!("http://127.0.0.1:{port}/");
        let b = rt.block_on(async {
            let b = Browser::start(390, 844).await?;
            b.open_with_token(&page, &token).await?;
            // Installable: the manifest names the app and its icons, each served.
            let manifest = b
                .js_async(
                    "const done = arguments[arguments.length - 1]; \
                     const href = document.querySelector('link[rel=manifest]').href; \
                     fetch(href).then(r => r.json()).then(async m => { \
                       const icons = []; \
                       for (const i of m.icons) { const r = await fetch(i.src); \
                         icons.push([i.src, i.sizes, r.status, r.headers.get('content-type'), \
                                     (await r.arrayBuffer()).byteLength]); } \
                       done({name: m.name, short: m.short_name, display: m.display, \
                             start: m.start_url, icons}); }, e => done(String(e)));",
                    json!([]),
                )
                .await?;
            assert_eq!(manifest["short"], "iom", "{manifest}");
            assert_eq!(manifest["display"], "standalone", "{manifest}");
            assert_eq!(manifest["start"], "/", "{manifest}");
            let icons = manifest["icons"].as_array().cloned().unwrap_or_default();
            assert_eq!(icons.len(), 3, "{manifest}");
            for i in &icons {
                assert_eq!(i[2], 200, "{i}");
                assert!(i[4].as_u64().is_some_and(|n| n > 200), "{i}");
            }
            assert!(
                icons
                    .iter()
                    .any(|i| i[1] == "512x512" && i[3] == "image/png"),
                "{manifest}"
            );
            // The service worker takes over the page.
            b.wait_js(
                "the service worker",
                "return !!navigator.serviceWorker.controller",
                Duration::from_secs(15),
            )
            .await?;
            b.ask("Remember the milk.").await?;
            let first = b.last_answer(Duration::from_secs(30)).await?;
            assert!(first.starts_with("echo: Remember the milk."), "{first}");
            // Read once online, so the worker keeps the conversation.
            b.goto(&page).await?;
            b.wait_js(
                "the list",
                "return document.querySelectorAll('#conversations li').length === 1",
                Duration::from_secs(10),
            )
            .await?;
            b.js("document.querySelector('#conversations li').click(); return true")
                .await?;
            b.last_answer(Duration::from_secs(10)).await?;
            anyhow::Ok(b)
        })?;
        // The node goes away.
        node.stop()?;
        rt.block_on(async {
            b.goto(&page).await?;
            b.wait_js(
                "the cached list offline",
                "return document.querySelectorAll('#conversations li').length === 1 && \
                 !document.getElementById('net').hidden",
                Duration::from_secs(15),
            )
            .await?;
            b.js("document.querySelector('#conversations li').click(); return true")
                .await?;
            let cached = b.last_answer(Duration::from_secs(10)).await?;
            assert!(cached.starts_with("echo: Remember the milk."), "{cached}");
            b.screenshot("web-offline-phone.png").await?;
            b.ask("And the eggs, sent later.").await?;
            b.wait_queued(Duration::from_secs(10)).await?;
            // It is in IndexedDB, so it survives a reload.
            b.goto(&page).await?;
            b.wait_js(
                "the outbox after a reload",
                "return document.body.dataset.outbox === '1'",
                Duration::from_secs(15),
            )
            .await?;
            b.js("document.querySelector('#conversations li').click(); return true")
                .await?;
            b.wait_js(
                "the queued ask shown",
                "return document.querySelector('.msg.user[data-queued=true]')",
                Duration::from_secs(10),
            )
            .await?;
            b.screenshot("web-queued-phone.png").await?;
            anyhow::Ok(())
        })?;
        // Back on the same port: the outbox goes out by itself.
        node.start()?;
        rt.block_on(async {
            let answer = b
                .wait_js(
                    "the queued ask answered",
                    "const m = document.querySelector('.msg.assistant:last-child'); \
                     return document.body.dataset.outbox === '0' && m && m.dataset.state === 'done' \
                        && m.querySelector('.text').textContent",
                    Duration::from_secs(60),
                )
                .await?;
            assert!(
                answer.as_str().is_some_and(|a| a.starts_with("echo: And the eggs, sent later.")),
                "{answer}"
            );
            b.wait_js(
                "the badge gone",
                "return document.getElementById('net').hidden",
                Duration::from_secs(10),
            )
            .await?;
            b.screenshot("web-reconnected-phone.png").await?;
            b.close().await
        })?;
        // Sent once, into the same conversation.
        let convs = node.json(&["conversations", "list"])?;
        assert_eq!(
            convs["conversations"].as_array().map(Vec::len),
            Some(1),
            "{convs}"
        );
        let c = first_conversation(&node, &convs)?;
        let asks = user_asks(&c);
        assert_eq!(
            asks,
            ["Remember the milk.", "And the eggs, sent later."],
            "{c}"
        );
        node.assert_no_panic()
    });
}

/// The phone layout: tabs and composer in thumb reach, touch-sized targets, no sideways
/// scrolling; the usage, memory, schedules and devices views against the real node; dark
/// mode when the system asks for it.
#[test]
fn web_page_phone_layout_views_and_dark_mode() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let AgentHttpNode {
            node, port, token, ..
        } = agent_http_node("thumb", &fake.node_env())?;
        let me = node.device_id()?;
        let page = format!("http://127.0.0.1:{port}/");
        rt.block_on(async {
            let b = Browser::start(390, 844).await?;
            b.open_with_token(&page, &token).await?;
            b.ask("How much did this cost?").await?;
            b.last_answer(Duration::from_secs(30)).await?;
            // One thumb: the tab bar is at the bottom edge and the composer just above it.
            let layout = b
                .js("const h = window.innerHeight, w = window.innerWidth; \
                     const tabs = document.getElementById('tabs').getBoundingClientRect(); \
                     const send = document.getElementById('send').getBoundingClientRect(); \
                     const small = [...document.querySelectorAll('#tabs button, #send, .composer .attach')] \
                        .map(e => e.getBoundingClientRect()).filter(r => r.height < 40 || r.width < 40).length; \
                     return {w, h, tabs_top: tabs.top, tabs_bottom: tabs.bottom, send_top: send.top, small, \
                             overflow: document.documentElement.scrollWidth > w + 1}")
                .await?;
            let num = |k: &str| layout[k].as_f64().unwrap_or(-1.0);
            assert_eq!(num("w"), 390.0, "{layout}");
            assert!((num("tabs_bottom") - num("h")).abs() < 2.0, "tabs not at the bottom: {layout}");
            assert!(num("tabs_top") > num("h") * 0.85, "{layout}");
            assert!(num("send_top") > num("h") * 0.7, "send out of thumb reach: {layout}");
            assert_eq!(layout["small"], 0, "touch targets under 40 px: {layout}");
            assert_eq!(layout["overflow"], false, "{layout}");
            b.screenshot("web-chat-md-phone.png").await?;

            // Usage: today's cost and the budget, cost per conversation.
            b.click("#tabs [data-tab=usage]").await?;
            let usage = b
                .wait_js(
                    "the usage view",
                    "const v = document.getElementById('view-usage'); \
                     return !v.hidden && v.querySelector('.bar') && v.textContent",
                    Duration::from_secs(10),
                )
                .await?;
            let usage = usage.as_str().unwrap_or("");
            assert!(usage.contains("Today") && usage.contains("budget per day"), "{usage}");
            // The default daily token budget of the mesh.
            assert!(usage.contains("of 2,000,000 tokens"), "{usage}");
            assert!(usage.contains("How much did this cost?"), "no conversation row: {usage}");
            b.screenshot("web-usage-phone.png").await?;

            // Memory: shown and edited.
            node.cli(&["memory", "append", "likes tea"])?;
            b.click("#tabs [data-tab=memory]").await?;
            b.wait_js(
                "the memory",
                "return document.getElementById('memory-text').value === 'likes tea'",
                Duration::from_secs(10),
            )
            .await?;
            b.js("document.getElementById('memory-text').value = 'likes tea\\nlives in Lyon'; return true")
                .await?;
            b.click("#memory-save").await?;
            b.wait_js(
                "saved",
                "return document.getElementById('memory-note').textContent === 'saved'",
                Duration::from_secs(10),
            )
            .await?;
            b.screenshot("web-memory-phone.png").await?;

            // Schedules: added, then disabled.
            b.click("#tabs [data-tab=schedules]").await?;
            b.wait_js("the schedule form", "return !!document.getElementById('schedule-cron')", Duration::from_secs(10)).await?;
            b.type_into("#schedule-cron", "0 7 * * *").await?;
            b.type_into("#schedule-prompt", "Morning news").await?;
            b.click(".add-schedule button[type=submit]").await?;
            b.wait_js(
                "the new schedule",
                "return document.querySelector('#schedule-list .schedule[data-enabled=true]')",
                Duration::from_secs(10),
            )
            .await?;
            b.click("#schedule-list .schedule .toggle").await?;
            b.wait_js(
                "the schedule disabled",
                "return document.querySelector('#schedule-list .schedule[data-enabled=false]')",
                Duration::from_secs(10),
            )
            .await?;
            b.screenshot("web-schedules-phone.png").await?;

            // Devices: this node, with its kind and agent role.
            b.click("#tabs [data-tab=devices]").await?;
            let dev = b
                .wait_js(
                    "the device list",
                    &format!(
                        "const d = document.querySelector('#device-list [data-device=\"{me}\"]'); \
                         return d && d.textContent"
                    ),
                    Duration::from_secs(10),
                )
                .await?;
            let dev = dev.as_str().unwrap_or("");
            assert!(dev.contains("this node") && dev.contains("agent"), "{dev}");
            b.screenshot("web-devices-phone.png").await?;

            // Tools: a declared MCP server with its egress and secret header (by reference),
            // then disabled from the page.
            node.cli(&[
                "tools",
                "add",
                "fetcher",
                "--allow-host",
                "api.example.com",
                "--secret-header",
                "api.example.com=Authorization: Bearer {env:EXAMPLE_TOKEN}",
                "--",
                "python3",
                "-m",
                "mcp_server_fetch",
            ])?;
            b.click("#tabs [data-tab=tools]").await?;
            let card = b
                .wait_js(
                    "the server card",
                    "const c = document.querySelector('#server-list .server[data-name=fetcher]'); \
                     return c && c.textContent",
                    Duration::from_secs(10),
                )
                .await?;
            let card = card.as_str().unwrap_or("");
            assert!(card.contains("egress: api.example.com"), "{card}");
            assert!(card.contains("Bearer {env:EXAMPLE_TOKEN}"), "{card}");
            assert!(card.contains("python3 -m mcp_server_fetch"), "{card}");
            b.screenshot("web-tools-phone.png").await?;
            b.click("#server-list .server[data-name=fetcher] .toggle").await?;
            b.wait_js(
                "the server disabled",
                "const t = document.querySelector('#server-list .server[data-name=fetcher] .toggle'); \
                 return t && t.textContent === 'Enable'",
                Duration::from_secs(10),
            )
            .await?;

            // Dark mode follows the system's setting.
            let light = b
                .js("return getComputedStyle(document.body).backgroundColor")
                .await?;
            b.cdp(
                "Emulation.setEmulatedMedia",
                json!({ "features": [{ "name": "prefers-color-scheme", "value": "dark" }] }),
            )
            .await?;
            b.click("#tabs [data-tab=chat]").await?;
            let dark = b
                .js("return getComputedStyle(document.body).backgroundColor")
                .await?;
            assert_eq!(light, json!("rgb(246, 247, 249)"));
            assert_eq!(dark, json!("rgb(17, 20, 24)"));
            b.screenshot("web-dark-phone.png").await?;
            b.close().await
        })?;
        assert_eq!(
            node.json(&["memory", "show"])?["text"],
            json!("likes tea\nlives in Lyon")
        );
        let s = node.json(&["schedule", "list"])?;
        assert_eq!(s["schedules"][0]["cron"], "0 7 * * *", "{s}");
        assert_eq!(s["schedules"][0]["prompt"], "Morning news", "{s}");
        assert_eq!(s["schedules"][0]["enabled"], false, "{s}");
        let t = node.json(&["tools", "list"])?;
        let fetcher = t["servers"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "fetcher"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(fetcher["spec"]["enabled"], false, "{t}");
        node.assert_no_panic()
    });
}
