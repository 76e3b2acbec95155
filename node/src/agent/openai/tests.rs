//! The client against scripted byte streams from a real loopback socket: each connection
//! reads the request and writes the next scripted response (then hangs, closes, or sends
//! what the script says).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{OpenAiClient, OpenAiConfig, OpenAiError};
use crate::agent::claude::{ClaudeError, Message, MessagesRequest, StopReason, StreamEvent};

/// One scripted response: the raw bytes, and whether to hang after them.
#[derive(Clone)]
struct Reply {
    bytes: Vec<u8>,
    hang: bool,
}

fn sse(status: &str, events: &[&str]) -> Reply {
    let mut body = String::new();
    for e in events {
        body.push_str(&format!("data: {e}\n\n"));
    }
    Reply {
        bytes: format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}"
        )
        .into_bytes(),
        hang: false,
    }
}

fn json_reply(status: &str, body: &str) -> Reply {
    Reply {
        bytes: format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
        hang: false,
    }
}

/// Serves `replies` in order (the last one repeats); returns the base URL and the requests
/// seen.
async fn serve(replies: Vec<Reply>) -> std::io::Result<(String, Arc<Mutex<Vec<String>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        let mut n = 0usize;
        while let Ok((mut sock, _)) = listener.accept().await {
            let reply = replies[n.min(replies.len() - 1)].clone();
            n += 1;
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                // Headers, then the body by content-length.
                loop {
                    let Ok(k) = sock.read(&mut tmp).await else {
                        return;
                    };
                    if k == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..k]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            seen.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(text[end + 4..].to_string());
                            break;
                        }
                    }
                }
                let _ = sock.write_all(&reply.bytes).await;
                if reply.hang {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
    });
    Ok((url, seen))
}

fn client(url: &str, retries: u32) -> Result<OpenAiClient, super::OpenAiConfigError> {
    let mut cfg = OpenAiConfig::new(url, "m", 100);
    cfg.max_retries = retries;
    cfg.request_timeout = Duration::from_millis(400);
    cfg.retry_base_delay = Duration::from_millis(10);
    cfg.retry_max_delay = Duration::from_millis(20);
    OpenAiClient::new(cfg)
}

fn req() -> MessagesRequest {
    MessagesRequest {
        messages: vec![Message::user("hi")],
        tools: Some(serde_json::json!([{"name": "bash", "input_schema": {"type": "object"}}])),
        ..MessagesRequest::default()
    }
}

async fn ask(
    c: &OpenAiClient,
) -> (
    Result<crate::agent::claude::Turn, ClaudeError>,
    Vec<StreamEvent>,
) {
    let mut events = Vec::new();
    let mut on = |e: StreamEvent| events.push(e);
    let r = c.stream(&req(), &mut on).await;
    (r, events)
}

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test]
async fn streams_text_and_a_tool_call_and_sends_openai_json() -> TestResult {
    let (url, seen) = serve(vec![sse(
        "200 OK",
        &[
            r#"{"id":"c","choices":[{"delta":{"content":"ok "}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"t1","function":{"name":"bash","arguments":"{\"command\":"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"ls\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#,
            "[DONE]",
        ],
    )])
    .await?;
    let (r, events) = ask(&client(&url, 0)?).await;
    let turn = r?;
    assert_eq!(turn.stop_reason, StopReason::ToolUse);
    assert_eq!(turn.usage.input_tokens, 5);
    assert!(events.contains(&StreamEvent::TextDelta("ok ".into())));
    let body: serde_json::Value = serde_json::from_str(
        seen.lock()
            .map_err(|_| "poisoned")?
            .first()
            .ok_or("no request")?,
    )?;
    assert_eq!(body["messages"][0]["role"], "user");
    assert_eq!(body["tools"][0]["type"], "function");
    assert_eq!(body["stream"], true);
    Ok(())
}

#[tokio::test]
async fn a_truncated_stream_is_retried_then_fails_clearly() -> TestResult {
    // The connection closes after a piece of a chunk: nothing was delivered, so it is retried.
    let cut = Reply {
        bytes: b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: {\"choi".to_vec(),
        hang: false,
    };
    let (url, seen) = serve(vec![cut]).await?;
    let (r, events) = ask(&client(&url, 2)?).await;
    let err = r.err().ok_or("a truncated stream succeeded")?;
    assert!(
        matches!(&err, ClaudeError::Openai(OpenAiError::Transport { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("after 3 attempts"), "{err}");
    assert!(err.wants_fallback());
    assert_eq!(seen.lock().map_err(|_| "poisoned")?.len(), 3);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, StreamEvent::Retrying { .. }))
            .count(),
        2
    );
    Ok(())
}

#[tokio::test]
async fn a_hung_stream_times_out_and_a_stream_cut_mid_reply_is_not_repeated() -> TestResult {
    let mut hung = sse("200 OK", &[r#"{"choices":[{"delta":{"content":"par"}}]}"#]);
    hung.hang = true;
    let (url, seen) = serve(vec![hung]).await?;
    let started = tokio::time::Instant::now();
    let (r, events) = ask(&client(&url, 3)?).await;
    let err = r.err().ok_or("a hung stream succeeded")?;
    assert!(err.to_string().contains("stalled"), "{err}");
    // Text was delivered, so no retry (it would repeat the text).
    assert_eq!(seen.lock().map_err(|_| "poisoned")?.len(), 1);
    assert_eq!(events, vec![StreamEvent::TextDelta("par".into())]);
    assert!(started.elapsed() < Duration::from_secs(5));
    Ok(())
}

#[tokio::test]
async fn an_error_in_a_200_body_or_in_the_stream_is_a_server_failure() -> TestResult {
    let (url, _) = serve(vec![json_reply(
        "200 OK",
        r#"{"error":{"message":"Loading model","type":"unavailable_error","code":503}}"#,
    )])
    .await?;
    let (r, _) = ask(&client(&url, 1)?).await;
    let err = r.err().ok_or("an error body succeeded")?;
    assert!(err.to_string().contains("Loading model"), "{err}");
    assert!(err.wants_fallback(), "{err}");

    let (url, _) = serve(vec![sse(
        "200 OK",
        &[r#"{"error":{"message":"context overflow","type":"server_error"}}"#],
    )])
    .await?;
    let (r, _) = ask(&client(&url, 0)?).await;
    let err = r.err().ok_or("an in-stream error succeeded")?;
    assert!(err.to_string().contains("context overflow"), "{err}");
    Ok(())
}

#[tokio::test]
async fn statuses_are_classified_rate_limit_quota_auth_and_overload() -> TestResult {
    let cases = [
        (
            json_reply(
                "429 Too Many Requests",
                r#"{"error":{"message":"slow down"}}"#,
            ),
            false,
            true,
        ),
        (
            json_reply(
                "429 Too Many Requests",
                r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota"}}"#,
            ),
            true,
            true,
        ),
        (
            json_reply("401 Unauthorized", r#"{"error":{"message":"bad key"}}"#),
            false,
            false,
        ),
        (json_reply("503 Service Unavailable", "busy"), true, true),
        (
            json_reply("400 Bad Request", r#"{"error":"no such model"}"#),
            false,
            false,
        ),
    ];
    for (reply, fallback, transient) in cases {
        let (url, _) = serve(vec![reply]).await?;
        let (r, _) = ask(&client(&url, 1)?).await;
        let err = r.err().ok_or("an error status succeeded")?;
        assert_eq!(err.wants_fallback(), fallback, "{err}");
        assert_eq!(err.is_transient(), transient, "{err}");
    }
    Ok(())
}

#[tokio::test]
async fn unknown_finish_reasons_invalid_arguments_and_refused_connections() -> TestResult {
    let (url, _) = serve(vec![sse(
        "200 OK",
        &[
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"bash","arguments":"{\"command\": \"echo a\necho"}}]}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"weird_reason"}]}"#,
        ],
    )])
    .await?;
    let (r, _) = ask(&client(&url, 0)?).await;
    let turn = r?;
    // Tool calls win over an unknown reason; unparseable arguments stay as text.
    assert_eq!(turn.stop_reason, StopReason::ToolUse);
    assert!(matches!(
        &turn.content[0],
        crate::agent::claude::ContentBlock::ToolUse {
            input: serde_json::Value::String(_),
            ..
        }
    ));

    // Nobody listens: a clear, fallback-worthy failure.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let (r, _) = ask(&client(&format!("http://127.0.0.1:{port}"), 1)?).await;
    let err = r.err().ok_or("a closed port answered")?;
    assert!(
        err.to_string().starts_with("cannot reach the model server"),
        "{err}"
    );
    assert!(err.wants_fallback());
    Ok(())
}

#[tokio::test]
async fn a_whole_completion_from_a_server_that_ignores_stream_is_accepted() -> TestResult {
    let (url, _) = serve(vec![json_reply(
        "200 OK",
        r#"{"id":"x","choices":[{"message":{"content":"whole"},"finish_reason":"stop"}]}"#,
    )])
    .await?;
    let (r, events) = ask(&client(&url, 0)?).await;
    assert_eq!(r?.text(), "whole");
    assert_eq!(events, vec![StreamEvent::TextDelta("whole".into())]);
    Ok(())
}
