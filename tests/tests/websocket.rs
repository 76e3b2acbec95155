//! The WebSocket API (`GET /v1/ws`) against a real `iom` process with the agent role and the
//! fake Messages API: a tokio-tungstenite client over a real TCP socket (and one over the
//! unix socket) asks and hears the streamed answer; a second socket hears the same request as
//! a mesh event; a revoked token's socket is closed at once with 4001; bad frames get `error`
//! messages and the socket stays open; a client that stops reading is dropped.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::{SinkExt, StreamExt};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig};
use iom_tests::harness::{Node, agent_http_node, runtime, scenario};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A node serving HTTP with the agent role (talking to `fake`); returns it, its port and a
/// token with its id.
fn agent_node(fake: &FakeAnthropic, name: &str) -> Result<(Node, u16, String, String)> {
    let n = agent_http_node(name, &fake.node_env())?;
    Ok((n.node, n.port, n.token, n.token_id))
}

/// Opens `/v1/ws` with the token in `Authorization` (or, with `subprotocol`, the way a
/// browser does: `Sec-WebSocket-Protocol: iom.v1, iom.bearer.TOKEN`).
async fn connect(port: u16, token: &str, subprotocol: bool) -> Result<Ws> {
    let mut req = format!("ws://127.0.0.1:{port}/v1/ws").into_client_request()?;
    let h = req.headers_mut();
    if subprotocol {
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&format!("iom.v1, iom.bearer.{token}"))?,
        );
    } else {
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
        h.insert("sec-websocket-protocol", HeaderValue::from_static("iom.v1"));
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
    let proto = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok());
    if proto != Some("iom.v1") {
        bail!("the server chose subprotocol {proto:?}, not iom.v1");
    }
    Ok(ws)
}

/// The next JSON message (skipping pings), within `within`.
async fn next_json<S>(ws: &mut S, within: Duration) -> Result<Value>
where
    S: futures::Stream<Item = Result<Message, WsError>> + Unpin,
{
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, ws.next())
            .await
            .map_err(|_| anyhow!("no message within {within:?}"))?
            .ok_or_else(|| anyhow!("the socket ended"))??;
        match msg {
            Message::Text(t) => return Ok(serde_json::from_str(t.as_str())?),
            Message::Close(c) => bail!("closed: {c:?}"),
            _ => {}
        }
    }
}

/// Messages until one matches `stop` (included), within `within`.
async fn until<S>(ws: &mut S, within: Duration, stop: impl Fn(&Value) -> bool) -> Result<Vec<Value>>
where
    S: futures::Stream<Item = Result<Message, WsError>> + Unpin,
{
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = next_json(ws, left)
            .await
            .with_context(|| format!("after {} messages: {got:?}", got.len()))?;
        let end = stop(&v);
        got.push(v);
        if end {
            return Ok(got);
        }
    }
}

/// The close frame the server sends next (data messages before it are skipped).
async fn close_frame<S>(ws: &mut S, within: Duration) -> Result<Option<CloseFrame>>
where
    S: futures::Stream<Item = Result<Message, WsError>> + Unpin,
{
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) => bail!("the socket was not closed within {within:?}"),
            Ok(None) => bail!("the socket ended without a close frame"),
            Ok(Some(Err(e))) => bail!("the socket broke without a close frame: {e}"),
            Ok(Some(Ok(Message::Close(c)))) => return Ok(c),
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn is_final_of(v: &Value, id: &str) -> bool {
    v["type"] == "request"
        && v["id"] == id
        && matches!(v["event"]["type"].as_str(), Some("done" | "failed"))
}

#[test]
fn a_socket_asks_and_hears_the_streamed_answer_and_other_sockets_hear_it_too() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let (node, port, token, _) = agent_node(&fake, "wsask")?;
        let device = node.device_id()?;
        let socket_path = node.dir.join("iom.sock");
        rt.block_on(async {
            let mut a = connect(port, &token, false).await?;
            let mut b = connect(port, &token, true).await?; // the browser way
            for ws in [&mut a, &mut b] {
                let hello = next_json(ws, Duration::from_secs(5)).await?;
                assert_eq!(hello["type"], "hello", "{hello}");
                assert_eq!(hello["protocol"], "iom.v1");
                assert_eq!(hello["device"], device.as_str());
            }
            let prompt = "tell me a long story about sockets and streams and frames";
            a.send(Message::text(
                json!({ "type": "ask", "id": "c1", "prompt": prompt }).to_string(),
            ))
            .await?;
            let got = until(&mut a, Duration::from_secs(30), |v| is_final_of(v, "c1")).await?;
            let asked = got
                .iter()
                .find(|v| v["type"] == "asked")
                .context("no asked message")?;
            assert_eq!(asked["id"], "c1");
            assert_eq!(asked["queued"], false, "{asked}");
            let conv = asked["conversation"].as_str().context("no conversation")?;
            let rid = asked["request_id"].as_str().context("no request id")?;
            let done = got.last().context("nothing")?;
            assert_eq!(done["event"]["type"], "done", "{done}");
            assert_eq!(done["conversation"], conv);
            assert_eq!(done["request_id"], rid);
            let text = done["event"]["text"].as_str().unwrap_or_default();
            assert_eq!(text, format!("echo: {prompt}"));
            // The answer streamed: text deltas before the end that add up to it.
            let deltas: Vec<&str> = got
                .iter()
                .filter(|v| v["type"] == "request" && v["event"]["type"] == "text")
                .map(|v| v["event"]["delta"].as_str().unwrap_or_default())
                .collect();
            assert!(!deltas.is_empty(), "no streamed text: {got:?}");
            assert_eq!(deltas.concat(), text);
            assert!(
                got.iter()
                    .any(|v| v["type"] == "request" && v["event"]["status"] == "running"),
                "no running status: {got:?}"
            );
            // Document changes come too (the conversation, written locally).
            assert!(
                got.iter().any(|v| v["type"] == "doc_changed"
                    && v["doc"] == conv
                    && v["kind"] == "conversation"
                    && v["origin"] == "local"),
                "no doc_changed for the conversation: {got:?}"
            );
            // The other socket hears the same request, without the id it did not choose.
            let seen = until(&mut b, Duration::from_secs(30), |v| {
                v["type"] == "request" && v["request_id"] == rid && v["event"]["type"] == "done"
            })
            .await?;
            let last = seen.last().context("nothing")?;
            assert!(last.get("id").is_none(), "{last}");
            assert_eq!(last["event"]["text"], text.to_string());
            // A ping is answered with its id.
            a.send(Message::text(r#"{"type":"ping","id":"p1"}"#))
                .await?;
            let pong = until(&mut a, Duration::from_secs(5), |v| v["type"] == "pong").await?;
            assert_eq!(pong.last().context("no pong")?["id"], "p1");
            // A follow-up in the same conversation.
            a.send(Message::text(
                json!({ "type": "ask", "id": "c2", "prompt": "and then?", "conversation": conv })
                    .to_string(),
            ))
            .await?;
            let got = until(&mut a, Duration::from_secs(30), |v| is_final_of(v, "c2")).await?;
            let done = got.last().context("nothing")?;
            assert_eq!(done["conversation"], conv);
            assert_eq!(done["event"]["text"], "echo: and then?");
            a.close(None).await?;

            // The unix socket serves the same API without a token (it is the owner's).
            let stream = tokio::net::UnixStream::connect(&socket_path).await?;
            let (mut u, _) =
                tokio_tungstenite::client_async("ws://localhost/v1/ws", stream).await?;
            let hello = next_json(&mut u, Duration::from_secs(5)).await?;
            assert_eq!(hello["type"], "hello");
            u.send(Message::text(
                json!({ "type": "ask", "id": "u1", "prompt": "from the socket" }).to_string(),
            ))
            .await?;
            let got = until(&mut u, Duration::from_secs(30), |v| is_final_of(v, "u1")).await?;
            assert_eq!(
                got.last().context("nothing")?["event"]["text"],
                "echo: from the socket"
            );
            anyhow::Ok(())
        })?;
        // `iom events` prints the same stream as JSON lines.
        let mut events = std::process::Command::new(iom_tests::harness::iom_bin())
            .arg("--data-dir")
            .arg(&node.dir)
            .arg("events")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let stdout = events.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let first = rx.recv_timeout(Duration::from_secs(10))?;
        assert!(first.contains(r#""type":"hello""#), "{first}");
        node.cli(&["ask", "heard by iom events"])?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut done = None;
        while done.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .context("no done event from `iom events`")?;
            let v: Value = serde_json::from_str(&line).with_context(|| line.clone())?;
            if v["type"] == "request" && v["event"]["type"] == "done" {
                done = Some(v);
            }
        }
        let _ = events.kill();
        let _ = events.wait();
        let done = done.context("no done event")?;
        assert_eq!(done["event"]["text"], "echo: heard by iom events", "{done}");
        // The fake model got the prompts the sockets sent.
        assert!(
            fake.requests()
                .iter()
                .any(|r| r.body.to_string().contains("sockets and streams")),
            "the model never saw the prompt"
        );
        node.assert_no_panic()
    });
}

#[test]
fn a_revoked_token_is_disconnected_at_once() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let (node, port, token, id) = agent_node(&fake, "wsrevoke")?;
        let other = node.json(&["token", "create", "--name", "other"])?;
        let other = other["token"].as_str().context("no token")?.to_string();
        rt.block_on(async {
            let mut ws = connect(port, &token, false).await?;
            let mut keep = connect(port, &other, true).await?;
            next_json(&mut ws, Duration::from_secs(5)).await?;
            next_json(&mut keep, Duration::from_secs(5)).await?;
            let started = Instant::now();
            node.cli(&["token", "revoke", &id])?;
            let frame = close_frame(&mut ws, Duration::from_secs(5))
                .await?
                .context("a close frame without a code")?;
            let took = started.elapsed();
            assert_eq!(u16::from(frame.code), 4001, "{frame:?}");
            assert_eq!(frame.reason.as_str(), "the token was revoked");
            // "At once": the CLI's own round trip is most of this.
            assert!(took < Duration::from_secs(2), "closed after {took:?}");
            // The socket of another token stays open and answers.
            keep.send(Message::text(r#"{"type":"ping","id":"still"}"#))
                .await?;
            let v = until(&mut keep, Duration::from_secs(5), |v| v["type"] == "pong").await?;
            assert_eq!(v.last().context("no pong")?["id"], "still");
            // The revoked token cannot open a new socket.
            match connect(port, &token, false).await {
                Err(e) => assert!(e.to_string().contains("401"), "{e}"),
                Ok(_) => bail!("a revoked token opened a socket"),
            }
            anyhow::Ok(())
        })?;
        node.assert_no_panic()
    });
}

#[test]
fn bad_frames_get_errors_and_the_socket_stays_open() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let (node, port, token, _) = agent_node(&fake, "wsbad")?;
        rt.block_on(async {
            // No token, a wrong token: the upgrade is refused with 401.
            let no_token = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/v1/ws"))
                .await
                .err()
                .context("a socket without a token")?;
            assert!(no_token.to_string().contains("401"), "{no_token}");
            let wrong = connect(
                port,
                "iom_000000000000000000000000000000000000000000000000",
                false,
            )
            .await
            .err()
            .context("a socket with a wrong token")?;
            assert!(wrong.to_string().contains("401"), "{wrong}");

            let mut ws = connect(port, &token, false).await?;
            next_json(&mut ws, Duration::from_secs(5)).await?;
            let unknown = "00112233445566778899aabbccddeeff";
            let cases: Vec<(Message, Option<&str>, &str, &str)> = vec![
                (Message::text("{not json"), None, "bad_frame", "not JSON"),
                (
                    Message::binary(vec![1u8, 2, 3]),
                    None,
                    "bad_frame",
                    "binary",
                ),
                (
                    Message::text(r#"{"id":"k1"}"#),
                    Some("k1"),
                    "bad_message",
                    "`type`",
                ),
                (
                    Message::text(r#"{"type":"fly","id":"k2"}"#),
                    Some("k2"),
                    "bad_message",
                    "unknown message type",
                ),
                (
                    Message::text(r#"{"type":"ask","id":"k3"}"#),
                    Some("k3"),
                    "bad_message",
                    "prompt",
                ),
                (
                    Message::text(r#"{"type":"ask","id":"k4","prompt":"   "}"#),
                    Some("k4"),
                    "bad_request",
                    "the prompt is empty",
                ),
                (
                    Message::text(
                        json!({"type":"ask","id":"k5","prompt":"x","conversation":unknown})
                            .to_string(),
                    ),
                    Some("k5"),
                    "not_found",
                    "no conversation",
                ),
                (
                    Message::text(
                        json!({"type":"ask","id":"k6","prompt":"x","conversation":"nope"})
                            .to_string(),
                    ),
                    Some("k6"),
                    "bad_request",
                    "not a document id",
                ),
                (
                    Message::text(
                        json!({"type":"ask","id":"k7","prompt":"x".repeat(300 * 1024)}).to_string(),
                    ),
                    Some("k7"),
                    "bad_request",
                    "bytes; at most",
                ),
            ];
            for (frame, id, code, words) in cases {
                ws.send(frame).await?;
                let v = until(&mut ws, Duration::from_secs(5), |v| v["type"] == "error").await?;
                let e = v.last().context("no error")?;
                assert_eq!(e["code"], code, "{e}");
                assert_eq!(e["id"].as_str(), id, "{e}");
                let msg = e["message"].as_str().unwrap_or_default();
                assert!(msg.contains(words), "{msg:?} lacks {words:?}");
            }
            // Still open: a ping is answered.
            ws.send(Message::text(r#"{"type":"ping","id":"alive"}"#))
                .await?;
            let v = until(&mut ws, Duration::from_secs(5), |v| v["type"] == "pong").await?;
            assert_eq!(v.last().context("no pong")?["id"], "alive");
            // A message over the limit closes with 1009 and says why.
            let (mut tx, mut rx) = ws.split();
            let big = Message::text("x".repeat((1 << 20) + 100));
            let sending = tokio::spawn(async move { tx.send(big).await });
            let frame = close_frame(&mut rx, Duration::from_secs(5))
                .await?
                .context("no close code")?;
            sending.abort();
            assert_eq!(u16::from(frame.code), 1009, "{frame:?}");
            assert!(frame.reason.as_str().contains("at most"), "{frame:?}");
            anyhow::Ok(())
        })?;
        // The node is fine: a new socket works.
        rt.block_on(async {
            let mut ws = connect(port, &token, false).await?;
            let hello = next_json(&mut ws, Duration::from_secs(5)).await?;
            assert_eq!(hello["type"], "hello");
            anyhow::Ok(())
        })?;
        node.assert_no_panic()
    });
}

#[test]
fn a_client_that_stops_reading_is_dropped_and_node_memory_stays_flat() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let (node, port, token, _) = agent_node(&fake, "wsslow")?;
        let rss_before = node.proc_kib("VmRSS").context("no VmRSS")?;
        let sent = rt.block_on(async {
            let ws = connect(port, &token, false).await?;
            let (mut tx, mut rx) = ws.split();
            // Send pings with long ids and never read: the pongs pile up in the kernel's
            // buffers, then in the node's queue, and the node gives up on us.
            let id = "i".repeat(120);
            let ping = json!({ "type": "ping", "id": id }).to_string();
            let mut sent = 0u64;
            let deadline = Instant::now() + Duration::from_secs(40);
            let dropped = loop {
                if Instant::now() > deadline {
                    break false;
                }
                let r = tokio::time::timeout(
                    Duration::from_secs(3),
                    tx.send(Message::text(ping.clone())),
                )
                .await;
                match r {
                    Ok(Ok(())) => sent += 1,
                    // The node stopped reading us (it closed), or the socket broke.
                    Err(_) | Ok(Err(_)) => break true,
                }
            };
            assert!(
                dropped,
                "the node kept a client that never reads ({sent} pings)"
            );
            // Reading now: the pongs that made it, then the end of the socket.
            let mut pongs = 0u64;
            while let Ok(Some(Ok(m))) =
                tokio::time::timeout(Duration::from_secs(10), rx.next()).await
            {
                if let Message::Text(t) = m
                    && t.as_str().contains("pong")
                {
                    pongs += 1;
                }
            }
            assert!(pongs < sent, "every ping was answered: {pongs} of {sent}");
            anyhow::Ok(sent)
        })?;
        let log = node.log_text();
        assert!(
            log.contains("too slow"),
            "the node's log does not say why it dropped the client"
        );
        let rss_after = node.proc_kib("VmRSS").context("no VmRSS")?;
        eprintln!("{sent} pings; node VmRSS {rss_before} KiB before, {rss_after} KiB after");
        assert!(
            rss_after < rss_before + 64 * 1024,
            "the node grew from {rss_before} to {rss_after} KiB"
        );
        node.assert_no_panic()
    });
}
