//! The real Claude client against the fake Messages API server, over real HTTP.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use iom_node::agent::claude::{
    ApiKey, ClaudeClient, ClaudeConfig, ClaudeError, ContentBlock, Limits, Message,
    MessagesRequest, Progress, Role, StopReason, StoppedBy, StreamEvent, ToolExecutor, ToolResult,
    Turn, Usage, run_conversation,
};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig, Scripted};
use serde_json::{Value, json};

async fn server() -> Result<FakeAnthropic> {
    Ok(FakeAnthropic::start(FakeConfig::default()).await?)
}

fn config(server: &FakeAnthropic, key: &str) -> Result<ClaudeConfig> {
    Ok(ClaudeConfig::new(ApiKey::new(key)?)
        .with_base_url(server.url())
        .with_model("claude-test")
        .with_max_retries(3)
        .with_request_timeout(Duration::from_secs(10))
        .with_retry_delays(Duration::from_millis(20), Duration::from_millis(200)))
}

fn client_with_key(server: &FakeAnthropic, key: &str) -> Result<ClaudeClient> {
    Ok(ClaudeClient::new(config(server, key)?)?)
}

fn client(server: &FakeAnthropic) -> Result<ClaudeClient> {
    client_with_key(server, server.api_key())
}

/// A client with prompt caching off, for the tests that check the plain wire format exactly
/// (the cache breakpoints are checked by the `claude::cache` unit tests and `tests/cost.rs`).
fn plain_client(server: &FakeAnthropic) -> Result<ClaudeClient> {
    Ok(ClaudeClient::new(
        config(server, server.api_key())?.with_prompt_caching(false),
    )?)
}

fn ask(text: &str) -> MessagesRequest {
    MessagesRequest {
        messages: vec![Message::user(text)],
        ..MessagesRequest::default()
    }
}

/// Sends one request and collects the stream events.
async fn stream(
    client: &ClaudeClient,
    req: &MessagesRequest,
) -> (Result<Turn, ClaudeError>, Vec<(Instant, StreamEvent)>) {
    let mut events = Vec::new();
    let result = client
        .stream(req, &mut |ev| events.push((Instant::now(), ev)))
        .await;
    (result, events)
}

fn retries(events: &[(Instant, StreamEvent)]) -> Vec<(u32, Duration, String)> {
    events
        .iter()
        .filter_map(|(_, e)| match e {
            StreamEvent::Retrying {
                attempt,
                wait,
                reason,
            } => Some((*attempt, *wait, reason.clone())),
            _ => None,
        })
        .collect()
}

/// A tiny in-memory file tool set: `write_file {path, content}`, `read_file {path}`.
#[derive(Default)]
struct Files(Mutex<HashMap<String, String>>);

impl ToolExecutor for Files {
    fn run<'a>(
        &'a self,
        name: &'a str,
        input: &'a Value,
    ) -> Pin<Box<dyn Future<Output = ToolResult> + Send + 'a>> {
        Box::pin(async move {
            let path = input["path"].as_str().unwrap_or_default().to_owned();
            let mut files = match self.0.lock() {
                Ok(f) => f,
                Err(_) => return ToolResult::error("lock poisoned"),
            };
            match name {
                "write_file" => {
                    let content = input["content"].as_str().unwrap_or_default();
                    files.insert(path.clone(), content.to_owned());
                    ToolResult::ok(format!("wrote {} bytes to {path}", content.len()))
                }
                "read_file" => match files.get(&path) {
                    Some(content) => ToolResult::ok(content.clone()),
                    None => ToolResult::error(format!("no such file: {path}")),
                },
                other => ToolResult::error(format!("unknown tool {other}")),
            }
        })
    }
}

fn tools() -> Value {
    json!([
        {"name": "write_file", "description": "Write a file",
         "input_schema": {"type": "object", "properties": {
             "path": {"type": "string"}, "content": {"type": "string"}}}},
        {"name": "read_file", "description": "Read a file",
         "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}
    ])
}

#[tokio::test]
async fn text_reply_streams_in_several_deltas() -> Result<()> {
    let server = server().await?;
    let client = plain_client(&server)?;
    let question = "hello there, this is a streaming test";
    let (turn, events) = stream(&client, &ask(question)).await;
    let turn = turn?;

    let deltas: Vec<(Instant, String)> = events
        .iter()
        .filter_map(|(t, e)| match e {
            StreamEvent::TextDelta(d) => Some((*t, d.clone())),
            _ => None,
        })
        .collect();
    ensure!(deltas.len() >= 3, "only {} deltas", deltas.len());
    let joined: String = deltas.iter().map(|(_, d)| d.as_str()).collect();
    ensure!(joined == format!("echo: {question}"), "{joined:?}");
    let (first, last) = (deltas[0].0, deltas[deltas.len() - 1].0);
    ensure!(
        last.duration_since(first) >= Duration::from_millis(10),
        "deltas did not arrive over time"
    );
    ensure!(turn.text() == joined);
    ensure!(turn.stop_reason == StopReason::EndTurn);
    ensure!(turn.id.starts_with("msg_"));

    let reqs = server.requests();
    ensure!(reqs.len() == 1);
    let req = &reqs[0];
    ensure!(req.header("x-api-key") == Some(server.api_key()));
    ensure!(req.header("anthropic-version") == Some("2023-06-01"));
    ensure!(req.header("content-type") == Some("application/json"));
    ensure!(req.body["stream"] == json!(true));
    ensure!(req.body["model"] == json!("claude-test"));
    ensure!(req.body["max_tokens"].as_u64().is_some());
    ensure!(req.body["messages"] == json!([{"role": "user", "content": question}]));
    ensure!(req.body.get("tools").is_none() && req.body.get("system").is_none());
    let body_len = req.body.to_string().len() as u64;
    ensure!(turn.usage.input_tokens == body_len / 4, "{:?}", turn.usage);
    ensure!(turn.usage.output_tokens == joined.len() as u64 / 4);
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn tool_use_loop_runs_two_tools_and_sends_results_back() -> Result<()> {
    let server = server().await?;
    let client = plain_client(&server)?;
    let question = r#"please [[tool write_file {"path":"/workspace/a.txt","content":"hi"}]] then [[tool read_file {"path":"/workspace/a.txt"}]]"#;
    let files = Files::default();
    let mut progress = Vec::new();
    let outcome = run_conversation(
        &client,
        Some("You are a test.".into()),
        vec![Message::user(question)],
        tools(),
        &files,
        Limits::default(),
        &mut |p| progress.push(p),
    )
    .await?;

    ensure!(outcome.stopped_by == StoppedBy::EndTurn);
    ensure!(outcome.turns == 3);
    let calls: Vec<(&str, &str, bool)> = outcome
        .tool_calls
        .iter()
        .map(|c| (c.name.as_str(), c.output.as_str(), c.is_error))
        .collect();
    ensure!(
        calls
            == vec![
                ("write_file", "wrote 2 bytes to /workspace/a.txt", false),
                ("read_file", "hi", false)
            ],
        "{calls:?}"
    );
    ensure!(outcome.tool_calls[0].input == json!({"path":"/workspace/a.txt","content":"hi"}));
    ensure!(
        outcome.final_text == format!("echo: {question}\ntool results: hi"),
        "{}",
        outcome.final_text
    );

    // The results went back to the server with the ids the server chose.
    let reqs = server.requests();
    ensure!(reqs.len() == 3);
    let (id1, id2) = (&outcome.tool_calls[0].id, &outcome.tool_calls[1].id);
    ensure!(id1 != id2);
    ensure!(reqs[0].tool_results().is_empty());
    ensure!(
        reqs[1].tool_results()
            == vec![(
                id1.clone(),
                "wrote 2 bytes to /workspace/a.txt".into(),
                false
            )]
    );
    ensure!(reqs[2].tool_results().len() == 2);
    ensure!(reqs[2].tool_results()[1] == (id2.clone(), "hi".into(), false));
    for r in &reqs {
        ensure!(r.body["system"] == json!("You are a test."));
        ensure!(r.body["tools"] == tools());
    }

    // Progress: started/finished for each tool, in order.
    let tool_progress: Vec<String> = progress
        .iter()
        .filter_map(|p| match p {
            Progress::ToolCallStarted { name, .. } => Some(format!("start {name}")),
            Progress::ToolCallFinished { name, .. } => Some(format!("done {name}")),
            _ => None,
        })
        .collect();
    ensure!(
        tool_progress
            == [
                "start write_file",
                "done write_file",
                "start read_file",
                "done read_file"
            ]
    );

    // Usage is summed over the three turns.
    let mut per_turn = Usage::default();
    let mut turns_seen = 0;
    for p in &progress {
        if let Progress::TurnFinished { usage, .. } = p {
            per_turn += *usage;
            turns_seen += 1;
        }
    }
    ensure!(turns_seen == 3);
    ensure!(outcome.usage == per_turn);
    let expected_input: u64 = reqs
        .iter()
        .map(|r| r.body.to_string().len() as u64 / 4)
        .sum();
    ensure!(
        outcome.usage.input_tokens == expected_input,
        "{:?}",
        outcome.usage
    );
    ensure!(outcome.usage.output_tokens > 0);

    // The new messages form a valid history: assistant, user(results), x2, then the answer.
    let roles: Vec<Role> = outcome.new_messages.iter().map(|m| m.role).collect();
    ensure!(
        roles
            == [
                Role::Assistant,
                Role::User,
                Role::Assistant,
                Role::User,
                Role::Assistant
            ]
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn rate_limit_with_retry_after_is_honoured() -> Result<()> {
    let server = server().await?;
    let client = client(&server)?;
    server.push_script(Scripted::Status {
        code: 429,
        retry_after: Some(1),
    });
    let started = Instant::now();
    let (turn, events) = stream(&client, &ask("after the limit")).await;
    let elapsed = started.elapsed();
    ensure!(turn?.text() == "echo: after the limit");
    ensure!(
        elapsed >= Duration::from_secs(1),
        "retried after {elapsed:?}"
    );
    let r = retries(&events);
    ensure!(r.len() == 1, "{r:?}");
    ensure!(r[0].0 == 1 && r[0].1 == Duration::from_secs(1));
    ensure!(r[0].2.contains("429"), "{}", r[0].2);
    ensure!(server.requests().len() == 2);
    Ok(())
}

#[tokio::test]
async fn overloaded_twice_then_success() -> Result<()> {
    let server = server().await?;
    let client = client(&server)?;
    server.push_scripts([
        Scripted::Status {
            code: 529,
            retry_after: None,
        },
        Scripted::Status {
            code: 529,
            retry_after: None,
        },
    ]);
    let (turn, events) = stream(&client, &ask("busy?")).await;
    ensure!(turn?.text() == "echo: busy?");
    let r = retries(&events);
    ensure!(r.iter().map(|x| x.0).collect::<Vec<_>>() == [1, 2], "{r:?}");
    ensure!(r.iter().all(|x| x.2.contains("529")));
    ensure!(server.requests().len() == 3);
    Ok(())
}

#[tokio::test]
async fn server_errors_until_retries_run_out() -> Result<()> {
    let server = server().await?;
    let client = client(&server)?; // 3 retries = 4 attempts
    server.push_scripts((0..4).map(|_| Scripted::Status {
        code: 500,
        retry_after: None,
    }));
    let (turn, events) = stream(&client, &ask("x")).await;
    match turn {
        Err(ClaudeError::Server {
            status: 500,
            attempts: 4,
            ..
        }) => {}
        other => bail!("unexpected {other:?}"),
    }
    ensure!(retries(&events).len() == 3);
    ensure!(server.requests().len() == 4);
    Ok(())
}

#[tokio::test]
async fn in_stream_overload_before_content_is_retried() -> Result<()> {
    let server = server().await?;
    let client = client(&server)?;
    server.push_script(Scripted::StreamError("overloaded_error".into()));
    let (turn, events) = stream(&client, &ask("again")).await;
    ensure!(turn?.text() == "echo: again");
    ensure!(retries(&events).len() == 1);
    ensure!(server.requests().len() == 2);
    Ok(())
}

#[tokio::test]
async fn in_stream_error_after_content_is_not_retried() -> Result<()> {
    let server = server().await?;
    let client = client(&server)?;
    server.push_script(Scripted::StreamErrorAfterText {
        text: "partial answer".into(),
        error_type: "overloaded_error".into(),
    });
    let (turn, events) = stream(&client, &ask("q")).await;
    ensure!(
        matches!(&turn, Err(ClaudeError::Interrupted { error_type, .. }) if error_type == "overloaded_error"),
        "{turn:?}"
    );
    ensure!(retries(&events).is_empty());
    ensure!(server.requests().len() == 1);
    Ok(())
}

#[tokio::test]
async fn wrong_key_gives_auth_error_without_the_key() -> Result<()> {
    let server = server().await?;
    let secret = "sk-ant-wrong-secret-0123456789";
    let client = client_with_key(&server, secret)?;
    let (turn, events) = stream(&client, &ask("let me in")).await;
    let err = match turn {
        Err(e) => e,
        Ok(t) => bail!("accepted a wrong key: {t:?}"),
    };
    ensure!(err == ClaudeError::Auth, "{err:?}");
    let text = err.to_string();
    ensure!(text.contains("rejected the API key"), "{text}");
    ensure!(!text.contains(secret) && !format!("{err:?}").contains(secret));
    ensure!(!format!("{:?}", client.config()).contains(secret));
    ensure!(retries(&events).is_empty());
    ensure!(server.requests().len() == 1, "401 must not be retried");
    Ok(())
}

#[tokio::test]
async fn bad_request_is_not_retried() -> Result<()> {
    let server = server().await?;
    let client = client(&server)?;
    // Starting with an assistant message is invalid for the API.
    let req = MessagesRequest {
        messages: vec![Message::assistant("hi")],
        ..MessagesRequest::default()
    };
    let (turn, _) = stream(&client, &req).await;
    match turn {
        Err(ClaudeError::BadRequest {
            status: 400,
            message,
        }) => {
            ensure!(message.contains("first message"), "{message}")
        }
        other => bail!("unexpected {other:?}"),
    }
    ensure!(server.requests().len() == 1);
    Ok(())
}

#[tokio::test]
async fn max_turns_stops_the_loop() -> Result<()> {
    let server = server().await?;
    let client = client(&server)?;
    let question = r#"[[tool write_file {"path":"a","content":"1"}]] [[tool write_file {"path":"b","content":"2"}]] [[tool write_file {"path":"c","content":"3"}]]"#;
    let files = Files::default();
    let limits = Limits {
        max_turns: 2,
        ..Limits::default()
    };
    let outcome = run_conversation(
        &client,
        None,
        vec![Message::user(question)],
        tools(),
        &files,
        limits,
        &mut |_| {},
    )
    .await?;
    ensure!(outcome.stopped_by == StoppedBy::MaxTurns);
    ensure!(outcome.turns == 2);
    ensure!(
        outcome.tool_calls.len() == 1,
        "only the first turn's tool runs"
    );
    ensure!(server.requests().len() == 2);
    ensure!(files.0.lock().map(|f| f.len()).unwrap_or(0) == 1);
    // The unrun call is closed with an error result so the history stays valid.
    let last = outcome.new_messages.last().context("no new messages")?;
    ensure!(last.role == Role::User);
    let blocks = last.content.to_blocks();
    ensure!(
        matches!(&blocks[..], [ContentBlock::ToolResult { is_error: true, content, .. }] if content.contains("turn limit")),
        "{blocks:?}"
    );
    ensure!(outcome.stopped_by.to_string().contains("turn limit"));
    Ok(())
}

#[tokio::test]
async fn max_tokens_stops_with_reason() -> Result<()> {
    let server = server().await?;
    let client = client(&server)?;
    let limits = Limits {
        max_tokens: Some(3),
        ..Limits::default()
    };
    let outcome = run_conversation(
        &client,
        None,
        vec![Message::user(
            "a question long enough to need more than three tokens",
        )],
        Value::Null,
        &Files::default(),
        limits,
        &mut |_| {},
    )
    .await?;
    ensure!(outcome.stopped_by == StoppedBy::MaxTokens);
    ensure!(
        outcome.final_text == "echo: a ques",
        "{}",
        outcome.final_text
    );
    ensure!(server.requests()[0].body["max_tokens"] == json!(3));
    Ok(())
}

#[tokio::test]
async fn malformed_sse_is_a_protocol_error() -> Result<()> {
    let server = server().await?;
    let client = client(&server)?;
    server.push_script(Scripted::Garbage);
    let (turn, events) = stream(&client, &ask("q")).await;
    ensure!(matches!(turn, Err(ClaudeError::Protocol(_))), "{turn:?}");
    ensure!(retries(&events).is_empty());
    ensure!(server.requests().len() == 1);
    // The client is still usable afterwards.
    let (turn, _) = stream(&client, &ask("still there?")).await;
    ensure!(turn?.text() == "echo: still there?");
    Ok(())
}

#[tokio::test]
async fn stalled_response_times_out_and_is_retried() -> Result<()> {
    let server = server().await?;
    let cfg = ClaudeConfig::new(ApiKey::new(server.api_key())?)
        .with_base_url(server.url())
        .with_max_retries(2)
        .with_request_timeout(Duration::from_millis(300))
        .with_retry_delays(Duration::from_millis(10), Duration::from_millis(50));
    let client = ClaudeClient::new(cfg)?;
    server.push_script(Scripted::Delay(Duration::from_secs(3)));
    let started = Instant::now();
    let (turn, events) = stream(&client, &ask("slow")).await;
    ensure!(turn?.text() == "echo: slow");
    ensure!(started.elapsed() < Duration::from_secs(3));
    let r = retries(&events);
    ensure!(r.len() == 1 && r[0].2 == "timeout", "{r:?}");
    Ok(())
}

#[tokio::test]
async fn unreachable_server_is_a_transport_error_after_retries() -> Result<()> {
    // A port with nothing listening.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", listener.local_addr()?);
    drop(listener);
    let cfg = ClaudeConfig::new(ApiKey::new("sk-ant-x")?)
        .with_base_url(url)
        .with_max_retries(1)
        .with_retry_delays(Duration::from_millis(10), Duration::from_millis(20));
    let client = ClaudeClient::new(cfg)?;
    let mut events = Vec::new();
    let result = client
        .stream(&ask("anyone?"), &mut |e| events.push(e))
        .await;
    ensure!(
        matches!(result, Err(ClaudeError::Transport(_))),
        "{result:?}"
    );
    ensure!(
        events
            .iter()
            .filter(|e| matches!(e, StreamEvent::Retrying { .. }))
            .count()
            == 1
    );
    Ok(())
}

#[tokio::test]
async fn instant_mode_answers_with_the_same_stream() -> Result<()> {
    let server = FakeAnthropic::start(FakeConfig {
        instant: true,
        ..FakeConfig::default()
    })
    .await?;
    let client = client(&server)?;
    let (turn, events) = stream(&client, &ask("fast")).await;
    ensure!(turn?.text() == "echo: fast");
    ensure!(
        events
            .iter()
            .any(|(_, e)| matches!(e, StreamEvent::TextDelta(_)))
    );
    server.shutdown().await?;
    Ok(())
}
