//! The HTTP listener against real `iom` processes: bearer tokens, JSON errors, body limits, the
//! loopback-only rule for plain HTTP, HTTPS with self-signed and provided certificates, and webhooks with a real callback receiver that fails
//! twice before it accepts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use axum::http::StatusCode;
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig};
use iom_tests::harness::{self, Node, free_port, runtime, scenario, wait_until};
use serde_json::{Value, json};

/// A node serving HTTP on a fresh loopback port; returns it with the base URL.
fn http_node(name: &str, env: &[(&str, &str)]) -> Result<(Node, String)> {
    let (n, port) = harness::http_node(name, env)?;
    Ok((n, format!("http://127.0.0.1:{port}")))
}

/// An HTTP node that holds the agent role, talking to `fake`; returns it with the base URL
/// and a token.
fn agent_http_node(fake: &FakeAnthropic, name: &str) -> Result<(Node, String, String)> {
    let n = harness::agent_http_node(name, &fake.node_env())?;
    Ok((n.node, n.base, n.token))
}

fn token(n: &Node, name: &str) -> Result<(String, String)> {
    let t = n.json(&["token", "create", "--name", name])?;
    Ok((
        t["token"].as_str().context("no token")?.to_string(),
        t["id"].as_str().context("no id")?.to_string(),
    ))
}

/// Sends a request and returns `(status, JSON body)`; the body must be JSON.
async fn call(req: reqwest::RequestBuilder) -> Result<(StatusCode, Value)> {
    let resp = req.send().await?;
    let status = StatusCode::from_u16(resp.status().as_u16())?;
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = resp.text().await?;
    if !ct.starts_with("application/json") {
        bail!("{status}: content-type {ct:?}, body {text:?}");
    }
    Ok((status, serde_json::from_str(&text)?))
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn auth_and_clear_json_errors() {
    scenario(|| {
        let rt = runtime()?;
        let (node, base) = http_node("web", &[])?;
        let (good, id) = token(&node, "tests")?;
        let http = reqwest::Client::new();
        rt.block_on(async {
            let url = |p: &str| format!("{base}{p}");
            // No token, a made-up token, a good token.
            let (s, v) = call(http.get(url("/v1/status"))).await?;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
            assert_eq!(code(&v), "unauthorized");
            let (s, _) = call(
                http.get(url("/v1/status"))
                    .bearer_auth("iom_0000000000000000000000000000000000000000000000"),
            )
            .await?;
            assert_eq!(s, StatusCode::UNAUTHORIZED);
            let (s, _) = call(
                http.get(url("/v1/status"))
                    .header("authorization", "Basic eDp5"),
            )
            .await?;
            assert_eq!(s, StatusCode::UNAUTHORIZED);
            let (s, v) = call(http.get(url("/v1/status")).bearer_auth(&good)).await?;
            assert_eq!(s, StatusCode::OK, "{v}");
            assert_eq!(v["name"], "web");
            // Every error is JSON with a stable code.
            let post = |p: &str| http.post(url(p)).bearer_auth(&good);
            let (s, v) = call(
                post("/v1/ask")
                    .header("content-type", "application/json")
                    .body("{\"prompt\": "),
            )
            .await?;
            assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_json"), "{v}");
            let (s, v) = call(post("/v1/ask").json(&json!({ "promt": "typo" }))).await?;
            assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_json"), "{v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("promt"),
                "{v}"
            );
            let (s, v) = call(post("/v1/ask").body("{\"prompt\":\"hi\"}")).await?;
            assert_eq!(
                (s, code(&v)),
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
                "{v}"
            );
            let big = json!({ "prompt": "x".repeat(2 << 20) });
            let (s, v) = call(post("/v1/ask").json(&big)).await?;
            assert_eq!(
                (s, code(&v)),
                (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
                "{v}"
            );
            let (s, v) = call(post("/v1/webhook").json(&json!({
                "user": "u", "message": "m".repeat(2 << 20)
            })))
            .await?;
            assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
            let unknown = "00112233445566778899aabbccddeeff";
            let (s, v) = call(
                http.get(url(&format!("/v1/conversations/{unknown}")))
                    .bearer_auth(&good),
            )
            .await?;
            assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"), "{v}");
            let (s, v) =
                call(post("/v1/ask").json(&json!({ "prompt": "hi", "conversation": unknown })))
                    .await?;
            assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"), "{v}");
            let (s, v) = call(
                http.get(url(&format!(
                    "/v1/conversations/{unknown}/requests/r1/events"
                )))
                .bearer_auth(&good),
            )
            .await?;
            assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
            let (s, v) = call(
                http.get(url("/v1/conversations/not-an-id"))
                    .bearer_auth(&good),
            )
            .await?;
            assert_eq!(
                (s, code(&v)),
                (StatusCode::BAD_REQUEST, "bad_request"),
                "{v}"
            );
            let (s, v) = call(http.get(url("/v1/schedules/nope")).bearer_auth(&good)).await?;
            assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
            let (s, v) = call(http.delete(url("/v1/status")).bearer_auth(&good)).await?;
            assert_eq!(
                (s, code(&v)),
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
                "{v}"
            );
            let (s, v) = call(http.get(url("/v1/no-such-route")).bearer_auth(&good)).await?;
            assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"), "{v}");
            // Token management is only on the unix socket: over HTTP, 403 with the reason.
            let (s, v) = call(http.get(url("/v1/tokens")).bearer_auth(&good)).await?;
            assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "{v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("unix socket")),
                "{v}"
            );
            let (s, _) = call(post("/v1/tokens").json(&json!({}))).await?;
            assert_eq!(s, StatusCode::FORBIDDEN);
            // A JSON array is not a body, even where its items would fill the fields in order.
            let (s, v) = call(post("/v1/docs").json(&json!([null, null]))).await?;
            assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_json"), "{v}");
            // Bad initial content creates nothing (it used to be a 500 after creating the doc).
            let before = call(http.get(url("/v1/docs")).bearer_auth(&good)).await?.1;
            let (s, v) = call(post("/v1/docs").json(&json!({"content": {"": 1}}))).await?;
            assert_eq!(
                (s, code(&v)),
                (StatusCode::BAD_REQUEST, "bad_request"),
                "{v}"
            );
            let after = call(http.get(url("/v1/docs")).bearer_auth(&good)).await?.1;
            assert_eq!(before, after, "a document was created");
            // Bad webhook input.
            let (s, v) = call(post("/v1/webhook").json(&json!({
                "user": "u", "message": "hi", "callback_url": "file:///etc/passwd"
            })))
            .await?;
            assert_eq!(
                (s, code(&v)),
                (StatusCode::BAD_REQUEST, "bad_request"),
                "{v}"
            );
            // The page and the OpenAPI file load without a token.
            let page = http.get(url("/")).send().await?;
            assert_eq!(page.status().as_u16(), 200);
            assert!(page.text().await?.contains("<script src=\"/app.js\""));
            let spec = http.get(url("/openapi.yaml")).send().await?.text().await?;
            assert!(spec.contains("openapi: 3.1"), "{spec:.200}");
            anyhow::Ok(())
        })?;
        // A revoked token stops working at once.
        let list = node.json(&["token", "list"])?;
        assert!(
            !list.to_string().contains(&good),
            "token list shows a secret: {list}"
        );
        node.cli(&["token", "revoke", &id])?;
        let (s, _) = rt.block_on(call(
            http.get(format!("{base}/v1/status")).bearer_auth(&good),
        ))?;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (code_, err) = node.fail(&["token", "revoke", &id])?;
        assert_eq!(code_, 1);
        assert!(err.contains("no token"), "{err}");
        node.assert_no_panic()
    });
}

#[test]
fn plain_http_off_loopback_is_refused_unless_forced_and_then_needs_a_token() {
    scenario(|| {
        let mut n = Node::new("exposed")?;
        let port = free_port()?;
        let lan = ["--http".to_string(), format!("0.0.0.0:{port}")];
        n.args.extend(lan.clone());
        let e = n
            .start()
            .err()
            .ok_or_else(|| anyhow!("served plain HTTP on 0.0.0.0 unforced"))?;
        let text = format!("{e:#}");
        assert!(text.contains("not a loopback address"), "{text}");
        assert!(text.contains(&format!("--https 0.0.0.0:{port}")), "{text}");
        assert!(text.contains("--insecure-http"), "{text}");
        // Forced, it still needs a token first.
        n.args.push("--insecure-http".into());
        let e = n
            .start()
            .err()
            .ok_or_else(|| anyhow!("started without a token"))?;
        let text = format!("{e:#}");
        assert!(
            text.contains("not a loopback address and no API token exists"),
            "{text}"
        );
        // With a token (created while serving only the socket), the same bind works.
        n.args.truncate(n.args.len() - 3);
        n.start()?;
        let (t, _) = token(&n, "lan")?;
        n.stop()?;
        n.args.extend(lan);
        n.args.push("--insecure-http".into());
        n.start()?;
        let rt = runtime()?;
        let (s, v) = rt.block_on(call(
            reqwest::Client::new()
                .get(format!("http://127.0.0.1:{port}/v1/status"))
                .bearer_auth(&t),
        ))?;
        assert_eq!(s, StatusCode::OK, "{v}");
        Ok(())
    });
}

/// SHA-256 of the first certificate in a PEM file, by `openssl` (not our own code).
fn openssl_fingerprint(pem: &std::path::Path) -> Result<String> {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(pem)
        .output()?;
    if !out.status.success() {
        bail!(
            "openssl x509 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    text.trim()
        .split_once('=')
        .map(|(_, fp)| fp.to_string())
        .ok_or_else(|| anyhow!("openssl printed {text:?}"))
}

/// A client that trusts exactly the certificate in `pem`.
fn pinned_client(pem: &std::path::Path) -> Result<reqwest::Client> {
    let cert = reqwest::Certificate::from_pem(&std::fs::read(pem)?)?;
    Ok(reqwest::Client::builder()
        .tls_certs_only([cert])
        .timeout(Duration::from_secs(10))
        .build()?)
}

#[test]
fn https_with_a_self_signed_certificate_kept_across_restarts() {
    scenario(|| {
        let rt = runtime()?;
        let mut n = Node::new("tls")?;
        let port = free_port()?;
        n.args
            .extend(["--https".to_string(), format!("127.0.0.1:{port}")]);
        n.start()?;
        let (t, _) = token(&n, "phone")?;
        let web = n.status()?["web"].clone();
        assert_eq!(
            web["https"],
            json!(format!("https://127.0.0.1:{port}/")),
            "{web}"
        );
        assert_eq!(web["self_signed"], json!(true), "{web}");
        let pem = n.dir.join("tls/self-signed.pem");
        let fp = openssl_fingerprint(&pem)?;
        assert_eq!(
            web["fingerprint"],
            json!(fp),
            "the fingerprint shown is the certificate's"
        );
        let base = format!("https://127.0.0.1:{port}");
        let client = pinned_client(&pem)?;
        let (s, v) = rt.block_on(call(
            client.get(format!("{base}/v1/status")).bearer_auth(&t),
        ))?;
        assert_eq!(s, StatusCode::OK, "{v}");
        let (s, v) = rt.block_on(call(client.get(format!("{base}/v1/status"))))?;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
        let page =
            rt.block_on(async { client.get(format!("{base}/")).send().await?.text().await })?;
        assert!(page.contains("<html"), "{page}");
        // A client that says nothing, and one that speaks plain HTTP to the TLS port, hold
        // nothing up.
        let _silent = std::net::TcpStream::connect(("127.0.0.1", port))?;
        let plain_client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let plain = rt.block_on(async {
            plain_client
                .get(format!("http://127.0.0.1:{port}/v1/status"))
                .send()
                .await
        });
        assert!(plain.is_err(), "plain HTTP got an answer from the TLS port");
        // A client that does not trust the certificate is refused by its own TLS check.
        let untrusting =
            rt.block_on(async { reqwest::Client::new().get(format!("{base}/")).send().await });
        assert!(
            untrusting.is_err(),
            "an unknown self-signed certificate was accepted"
        );
        let (s, _) = rt.block_on(call(
            client.get(format!("{base}/v1/status")).bearer_auth(&t),
        ))?;
        assert_eq!(s, StatusCode::OK);
        // The same certificate after a restart.
        n.stop()?;
        n.start()?;
        assert_eq!(n.status()?["web"]["fingerprint"], json!(fp));
        n.assert_no_panic()
    });
}

#[test]
fn https_with_the_users_certificate_and_clear_errors_for_bad_files() {
    scenario(|| {
        let rt = runtime()?;
        let mut n = Node::new("own-cert")?;
        let (cert, key) = (n.dir.join("mine.pem"), n.dir.join("mine.key"));
        iom_tests::harness::self_signed_p256(
            &cert,
            &key,
            2,
            "/CN=home.example",
            "DNS:home.example,IP:127.0.0.1",
            &["-addext", "basicConstraints=critical,CA:FALSE"],
        )?;
        let port = free_port()?;
        let base_args = n.args.clone();
        let https_args = |key: &std::path::Path| {
            let mut a = base_args.clone();
            a.extend([
                "--https".to_string(),
                format!("127.0.0.1:{port}"),
                "--tls-cert".into(),
                cert.display().to_string(),
                "--tls-key".into(),
                key.display().to_string(),
            ]);
            a
        };
        n.args = https_args(&n.dir.join("missing.key"));
        let e = n
            .start()
            .err()
            .ok_or_else(|| anyhow!("started with a missing key"))?;
        assert!(format!("{e:#}").contains("missing.key"), "{e:#}");
        n.args = https_args(&key);
        n.start()?;
        let (t, _) = token(&n, "script")?;
        let web = n.status()?["web"].clone();
        assert_eq!(web["self_signed"], json!(false), "{web}");
        assert_eq!(
            web["fingerprint"],
            json!(openssl_fingerprint(&cert)?),
            "{web}"
        );
        assert!(!n.dir.join("tls/self-signed.pem").exists());
        let (s, v) = rt.block_on(call(
            pinned_client(&cert)?
                .get(format!("https://127.0.0.1:{port}/v1/status"))
                .bearer_auth(&t),
        ))?;
        assert_eq!(s, StatusCode::OK, "{v}");
        n.assert_no_panic()
    });
}

/// What the receiver saw: `(status it answered, body, x-iom-request-id)` per POST.
type Seen = Arc<Mutex<Vec<(u16, Value, Option<String>)>>>;

/// A callback receiver: answers 500 to the first `fail_first` POSTs, then 200; records bodies.
struct Receiver {
    url: String,
    seen: Seen,
}

async fn receiver(fail_first: usize) -> Result<Receiver> {
    use axum::extract::State;
    let seen: Seen = Arc::default();
    let app =
        axum::Router::new()
            .route(
                "/hook",
                axum::routing::post(
                    move |State(seen): State<Seen>,
                          headers: axum::http::HeaderMap,
                          body: String| async move {
                        let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                        let status = if s.len() < fail_first { 500 } else { 200 };
                        let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
                        let rid = headers
                            .get("x-iom-request-id")
                            .and_then(|h| h.to_str().ok())
                            .map(str::to_string);
                        s.push((status, v, rid));
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                    },
                ),
            )
            .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(Receiver {
        url: format!("http://{addr}/hook"),
        seen,
    })
}

#[test]
fn webhook_round_trip_with_failing_callback() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let rx = rt.block_on(receiver(2))?;
        let (node, base, t) = agent_http_node(&fake, "hooks")?;
        let http = reqwest::Client::new();
        let started = std::time::Instant::now();
        let (s, accepted) = rt.block_on(call(
            http.post(format!("{base}/v1/webhook"))
                .bearer_auth(&t)
                .json(&json!({
                    "user": "alice@example.com",
                    "message": "What is on my list?",
                    "context": { "ticket": 42 },
                    "callback_url": rx.url,
                })),
        ))?;
        assert_eq!(s, StatusCode::ACCEPTED, "{accepted}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the webhook did not answer at once"
        );
        let rid = accepted["request_id"]
            .as_str()
            .context("no request_id")?
            .to_string();
        let conv = accepted["conversation"]
            .as_str()
            .context("no conversation")?
            .to_string();

        // Two refused deliveries (500), then one accepted, with backoff between them.
        wait_until(
            "the callback to be accepted",
            Duration::from_secs(60),
            || {
                let seen = rx.seen.lock().unwrap_or_else(|e| e.into_inner());
                Ok(seen.iter().any(|(s, _, _)| *s == 200))
            },
        )?;
        let seen = rx.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(
            seen.iter().map(|(s, _, _)| *s).collect::<Vec<_>>(),
            [500, 500, 200],
            "deliveries: {seen:?}"
        );
        let (_, body, header) = &seen[2];
        assert_eq!(body["request_id"], rid.as_str());
        assert_eq!(body["conversation"], conv.as_str());
        assert_eq!(body["status"], "done", "{body}");
        let text = body["text"].as_str().unwrap_or("");
        assert!(text.starts_with("echo: What is on my list?"), "{text}");
        assert!(
            text.contains("\"ticket\": 42"),
            "context not in the prompt: {text}"
        );
        assert!(
            body["usage"]["input_tokens"].as_u64().unwrap_or(0) > 0,
            "{body}"
        );
        assert!(
            body["usage"]["output_tokens"].as_u64().unwrap_or(0) > 0,
            "{body}"
        );
        assert_eq!(header.as_deref(), Some(rid.as_str()));
        // Every attempt carried the same answer.
        assert_eq!(seen[0].1, seen[2].1);

        // The request is in the user's conversation like any other.
        let c = node.json(&["conversations", "show", &conv])?;
        let msgs = c["messages"].as_array().context("no messages")?;
        let req = msgs
            .iter()
            .find(|m| m["request_id"] == rid.as_str())
            .context("request not in the conversation")?;
        assert_eq!(req["interface"], "webhook");
        assert_eq!(req["status"], "done");
        assert!(
            msgs.iter()
                .any(|m| m["reply_to"] == rid.as_str() && m["role"] == "assistant")
        );
        assert_eq!(c["title"], "webhook: alice@example.com");

        // The same user lands in the same conversation; another user gets their own.
        let (_, again) = rt.block_on(call(
            http.post(format!("{base}/v1/webhook"))
                .bearer_auth(&t)
                .json(&json!({ "user": "alice@example.com", "message": "And now?" })),
        ))?;
        assert_eq!(again["conversation"], conv.as_str());
        let (_, other) = rt.block_on(call(
            http.post(format!("{base}/v1/webhook"))
                .bearer_auth(&t)
                .json(&json!({ "user": "bob", "message": "Hi" })),
        ))?;
        assert_ne!(other["conversation"], conv.as_str());
        node.assert_no_panic()
    });
}

#[test]
fn webhook_callback_resumes_after_restart() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        // The receiver is down at first: its port is reserved but nothing listens.
        let (mut node, base, t) = agent_http_node(&fake, "resume")?;
        let port = free_port()?;
        let (s, accepted) = rt.block_on(call(
            reqwest::Client::new()
                .post(format!("{base}/v1/webhook"))
                .bearer_auth(&t)
                .json(&json!({
                    "user": "carol", "message": "Remember this",
                    "callback_url": format!("http://127.0.0.1:{port}/hook"),
                })),
        ))?;
        assert_eq!(s, StatusCode::ACCEPTED);
        let rid = accepted["request_id"]
            .as_str()
            .context("no id")?
            .to_string();
        // Let the first attempt fail, then stop the node mid-retry.
        wait_until("a failed attempt", Duration::from_secs(30), || {
            Ok(node.log_text().contains("webhook callback failed"))
        })?;
        node.stop()?;
        // The receiver comes up; the restarted node delivers the pending callback.
        let seen = rt.block_on(async {
            let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
            let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
            let s2 = seen.clone();
            let app = axum::Router::new().route(
                "/hook",
                axum::routing::post(move |body: String| {
                    let s2 = s2.clone();
                    async move {
                        s2.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(serde_json::from_str(&body).unwrap_or(Value::Null));
                        StatusCode::OK
                    }
                }),
            );
            tokio::spawn(async move {
                let _ = axum::serve(l, app).await;
            });
            anyhow::Ok(seen)
        })?;
        node.start()?;
        wait_until("the resumed callback", Duration::from_secs(60), || {
            Ok(!seen.lock().unwrap_or_else(|e| e.into_inner()).is_empty())
        })?;
        let got = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["request_id"], rid.as_str());
        assert_eq!(got[0]["status"], "done");
        assert!(node.log_text().contains("resuming a webhook callback"));
        Ok(())
    });
}

/// A callback whose receiver refuses every attempt is given up but kept: `iom webhook
/// callbacks` shows it with the last error, a restart does not resume it, `iom webhook retry`
/// delivers it, and unknown ids are clear errors.
#[test]
fn a_given_up_callback_is_listed_and_can_be_retried() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let max = iom_node::http::webhook::MAX_ATTEMPTS as usize;
        let rx = rt.block_on(receiver(max))?; // every attempt of the first round fails
        let (mut node, base, t) = agent_http_node(&fake, "giveup")?;
        let (s, accepted) = rt.block_on(call(
            reqwest::Client::new()
                .post(format!("{base}/v1/webhook"))
                .bearer_auth(&t)
                .json(&json!({ "user": "dave", "message": "Ping", "callback_url": rx.url })),
        ))?;
        assert_eq!(s, StatusCode::ACCEPTED, "{accepted}");
        let rid = accepted["request_id"]
            .as_str()
            .context("no id")?
            .to_string();
        let failed = |node: &Node| -> Result<Option<Value>> {
            Ok(node.json(&["webhook", "callbacks"])?["callbacks"]
                .as_array()
                .and_then(|l| l.iter().find(|c| c["request_id"] == rid.as_str()).cloned())
                .filter(|c| c["state"] == "failed"))
        };
        wait_until(
            "the callback to be given up",
            Duration::from_secs(60),
            || Ok(failed(&node)?.is_some()),
        )?;
        let cb = failed(&node)?.context("not listed")?;
        assert_eq!(cb["attempts"], max, "{cb}");
        assert!(
            cb["last_error"].as_str().unwrap_or("").contains("500"),
            "{cb}"
        );
        assert_eq!(rx.seen.lock().unwrap_or_else(|e| e.into_inner()).len(), max);
        let text = node.cli(&["webhook", "callbacks"])?;
        assert!(text.contains(&rid) && text.contains("failed"), "{text}");

        // A restart does not start it again by itself.
        node.restart()?;
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(rx.seen.lock().unwrap_or_else(|e| e.into_inner()).len(), max);
        assert!(
            failed(&node)?.is_some(),
            "the record was lost in the restart"
        );

        // Retried by hand: delivered (the receiver accepts from now on), and the record goes.
        node.cli(&["webhook", "retry", &rid])?;
        wait_until("the retried callback", Duration::from_secs(30), || {
            let seen = rx.seen.lock().unwrap_or_else(|e| e.into_inner());
            Ok(seen.iter().any(|(s, _, _)| *s == 200))
        })?;
        let seen = rx.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(seen.len(), max + 1, "{seen:?}");
        assert_eq!(seen[max].1["request_id"], rid.as_str());
        assert_eq!(seen[max].1["status"], "done");
        wait_until("the record to go", Duration::from_secs(10), || {
            Ok(node.json(&["webhook", "callbacks"])?["callbacks"]
                .as_array()
                .is_some_and(Vec::is_empty))
        })?;
        for args in [
            ["webhook", "retry", "wh-nope"],
            ["webhook", "drop", "wh-nope"],
        ] {
            let (code, err) = node.fail(&args)?;
            assert_eq!(code, 1, "{args:?}");
            assert!(err.contains("no webhook callback"), "{err}");
        }
        node.assert_no_panic()
    });
}

#[test]
fn browser_pairing_and_sessions_refuse_forged_and_replayed_signatures() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use iom_node::http::browser::{pair_message, session_message};
    use iom_protocol::keys::{DeviceId, DeviceKey};
    scenario(|| {
        let rt = runtime()?;
        let mut n = Node::new("home")?;
        let port = free_port()?;
        n.args
            .extend(["--https".to_string(), format!("127.0.0.1:{port}")]);
        n.start()?;
        let client = pinned_client(&n.dir.join("tls/self-signed.pem"))?;
        let base = format!("https://127.0.0.1:{port}");
        let v = n.json(&["invite", "--web"])?;
        let url = v["url"].as_str().context("no url")?;
        let secret: [u8; 32] = B64
            .decode(url.split_once('#').context("no fragment")?.1)?
            .try_into()
            .map_err(|_| anyhow!("the secret is not 32 bytes"))?;
        let (s, info) = rt.block_on(call(client.get(format!("{base}/v1/pair/info"))))?;
        assert_eq!(s, StatusCode::OK, "{info}");
        let inviter: [u8; 32] = B64
            .decode(info["inviter"].as_str().context("no inviter")?)?
            .try_into()
            .map_err(|_| anyhow!("bad inviter"))?;
        let inviter = DeviceId::from_bytes(inviter)?;
        let key = DeviceKey::from_seed([7; 32]);
        let invite = iom_protocol::invite::invite_id(&secret);
        let proof = iom_protocol::invite::pair_proof(&secret, &inviter, &key.id());
        let pair = |sig: [u8; 64], proof: [u8; 32]| {
            client.post(format!("{base}/v1/pair/browser")).json(&json!({
                "invite": invite.to_string(),
                "key": B64.encode(key.id().as_bytes()),
                "name": "tablet",
                "proof": B64.encode(proof),
                "signature": B64.encode(sig),
            }))
        };
        // A signature by another key, and a wrong proof, are refused and use nothing up.
        let other = DeviceKey::from_seed([8; 32]);
        let (s, v) = rt.block_on(call(pair(
            other.sign(&pair_message(&invite, &proof)),
            proof,
        )))?;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::FORBIDDEN, "bad_signature"),
            "{v}"
        );
        let wrong = [0u8; 32];
        let (s, v) = rt.block_on(call(pair(key.sign(&pair_message(&invite, &wrong)), wrong)))?;
        assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "bad_proof"), "{v}");
        let (s, v) = rt.block_on(call(pair(key.sign(&pair_message(&invite, &proof)), proof)))?;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["kind"], json!("browser"));
        let (s, v) = rt.block_on(call(pair(key.sign(&pair_message(&invite, &proof)), proof)))?;
        assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "invite_used"), "{v}");

        let challenge = || -> Result<[u8; 32]> {
            let (_, v) = rt.block_on(call(client.get(format!("{base}/v1/session/challenge"))))?;
            B64.decode(v["challenge"].as_str().context("no challenge")?)?
                .try_into()
                .map_err(|_| anyhow!("bad challenge"))
        };
        let open = |signer: &DeviceKey, c: &[u8; 32]| {
            client.post(format!("{base}/v1/session")).json(&json!({
                "key": B64.encode(key.id().as_bytes()),
                "challenge": B64.encode(c),
                "signature": B64.encode(signer.sign(&session_message(c))),
            }))
        };
        // Forged: signed by another key.
        let c = challenge()?;
        let (s, v) = rt.block_on(call(open(&other, &c)))?;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::UNAUTHORIZED, "bad_signature"),
            "{v}"
        );
        // A challenge the node never gave.
        let (s, v) = rt.block_on(call(open(&key, &[9; 32])))?;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::UNAUTHORIZED, "bad_challenge"),
            "{v}"
        );
        // Good, once: the cookie is Secure, HttpOnly and SameSite=Strict.
        let c = challenge()?;
        let resp = rt.block_on(async { open(&key, &c).send().await })?;
        assert_eq!(resp.status().as_u16(), 200);
        let set = resp
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .context("no cookie")?
            .to_string();
        for attr in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(set.contains(attr), "{set}");
        }
        let cookie = set.split(';').next().context("empty cookie")?.to_string();
        // Replayed: the same challenge and signature again.
        let (s, v) = rt.block_on(call(open(&key, &c)))?;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::UNAUTHORIZED, "bad_challenge"),
            "{v}"
        );
        // The cookie opens the API, not the admin routes; a made-up cookie opens nothing.
        let with = |path: &str, cookie: &str| {
            client
                .get(format!("{base}{path}"))
                .header("cookie", cookie.to_string())
        };
        let (s, v) = rt.block_on(call(with("/v1/status", &cookie)))?;
        assert_eq!(s, StatusCode::OK, "{v}");
        let (s, _) = rt.block_on(call(with("/v1/status", "iom_session=forged")))?;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, v) = rt.block_on(call(
            client
                .post(format!("{base}/v1/invites"))
                .header("cookie", cookie.clone()),
        ))?;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        // Revoked: the session stops at once, and no new one opens.
        n.cli(&["devices", "revoke", &key.id().to_string()])?;
        let (s, _) = rt.block_on(call(with("/v1/status", &cookie)))?;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let c = challenge()?;
        let (s, v) = rt.block_on(call(open(&key, &c)))?;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::UNAUTHORIZED, "unknown_device"),
            "{v}"
        );
        n.assert_no_panic()
    });
}

/// The page's PWA files load without a token with their types and the page's CSP; every
/// file the page links is in the service worker's app shell (so it opens offline), and the
/// PNG icons are the sizes the manifest says.
#[test]
fn pwa_files_are_served_and_the_app_shell_is_complete() {
    scenario(|| {
        let rt = runtime()?;
        let (node, base) = http_node("pwa", &[])?;
        let http = reqwest::Client::new();
        rt.block_on(async {
            let get = |path: &str| http.get(format!("{base}{path}")).send();
            let mut bodies = std::collections::BTreeMap::new();
            for (path, kind) in [
                ("/", "text/html"),
                ("/app.js", "text/javascript"),
                ("/md.js", "text/javascript"),
                ("/views.js", "text/javascript"),
                ("/key.js", "text/javascript"),
                ("/sw.js", "text/javascript"),
                ("/style.css", "text/css"),
                ("/manifest.webmanifest", "application/manifest+json"),
                ("/icon.svg", "image/svg+xml"),
                ("/icon-192.png", "image/png"),
                ("/icon-512.png", "image/png"),
            ] {
                let r = get(path).await?;
                assert_eq!(r.status().as_u16(), 200, "{path}");
                let h = |n: &str| {
                    r.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                assert!(
                    h("content-type").starts_with(kind),
                    "{path}: {}",
                    h("content-type")
                );
                let csp = h("content-security-policy");
                assert!(
                    csp.contains("script-src 'self'") && csp.contains("manifest-src 'self'"),
                    "{path}: {csp}"
                );
                bodies.insert(path, r.bytes().await?.to_vec());
            }
            let text = |p: &str| String::from_utf8_lossy(&bodies[p]).into_owned();
            // Every script, style sheet, icon and the manifest the page links is in the shell.
            let (index, sw) = (text("/"), text("/sw.js"));
            let shell = sw
                .split_once("const SHELL_FILES = [")
                .and_then(|(_, rest)| rest.split_once("];"))
                .map(|(list, _)| list.to_string())
                .context("no SHELL_FILES in sw.js")?;
            let mut linked = 0;
            for attr in ["src=\"", "href=\""] {
                for part in index.split(attr).skip(1) {
                    let target = part.split('"').next().unwrap_or("");
                    if target.starts_with('/') {
                        linked += 1;
                        assert!(
                            shell.contains(&format!("\"{target}\"")),
                            "{target} is linked by the page but not in the app shell"
                        );
                    }
                }
            }
            assert!(linked >= 8, "only {linked} files linked");
            let manifest: Value = serde_json::from_slice(&bodies["/manifest.webmanifest"])?;
            assert_eq!(manifest["start_url"], "/");
            for icon in manifest["icons"].as_array().context("no icons")? {
                let src = icon["src"].as_str().context("icon without src")?;
                assert!(
                    shell.contains(&format!("\"{src}\"")),
                    "{src} not in the shell"
                );
                let sizes = icon["sizes"].as_str().unwrap_or("");
                if let Some((w, _)) = sizes.split_once('x') {
                    // PNG: the width is the big-endian u32 at byte 16 of the IHDR chunk.
                    let png = &bodies[src];
                    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{src}");
                    let width = u32::from_be_bytes([png[16], png[17], png[18], png[19]]);
                    assert_eq!(width.to_string(), w, "{src}");
                }
            }
            anyhow::Ok(())
        })?;
        node.assert_no_panic()
    });
}
