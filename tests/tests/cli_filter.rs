//! `iom ask` as a Unix filter against real `iom` processes and the fake Messages API: the
//! prompt from stdin (`iom ask -`, and piped input joined to the argument), the output forms
//! (`--output text|json|markdown`, `--json`), and every exit code: 0 answered, 1 failed,
//! 2 bad usage, 3 daily token budget used up, 4 queued. (`--file` needs the Docker sandbox to
//! read the file back: see `tests/agent.rs`.)

use std::io::Write;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig, Scripted};
use iom_tests::harness::{Node, iom_bin, runtime, scenario};
use serde_json::Value;

/// Runs `iom --data-dir DIR ARGS` with `stdin` piped in (`None`: stdin is /dev/null).
fn ask(node: &Node, args: &[&str], stdin: Option<&[u8]>) -> Result<Output> {
    let mut cmd = Command::new(iom_bin());
    cmd.arg("--data-dir")
        .arg(&node.dir)
        .args(args)
        .env_remove("IOM_DATA_DIR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().context("running iom")?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().context("no stdin pipe")?;
        // The CLI may stop reading at the cap; a broken pipe then is expected.
        let _ = pipe.write_all(input);
    }
    Ok(child.wait_with_output()?)
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A node with the fake model's key and URL, `config` as its config.toml.
fn node(fake: &FakeAnthropic, name: &str, config: &str) -> Result<Node> {
    let n = Node::with_env(name, &fake.node_env())?;
    std::fs::write(n.dir.join("config.toml"), config)?;
    Ok(n)
}

/// Whether the model got a request whose newest user message is exactly `prompt`. (Requests
/// queued earlier in the test may run in the background, so "the last request" would race.)
fn model_saw(fake: &FakeAnthropic, prompt: &str) -> bool {
    fake.requests().iter().any(|r| {
        let last =
            r.body["messages"]
                .as_array()
                .and_then(|m| m.last())
                .map(|m| match &m["content"] {
                    Value::String(s) => s.clone(),
                    Value::Array(blocks) => blocks
                        .iter()
                        .filter_map(|b| b["text"].as_str())
                        .collect::<Vec<_>>()
                        .join(""),
                    other => other.to_string(),
                });
        last.as_deref() == Some(prompt)
    })
}

#[test]
fn stdin_prompts_output_forms_and_exit_codes() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let mut n = node(&fake, "filter", "")?;
        n.start()?;

        // No agent yet: queued, exit 4 at once (no waiting), and the note says why.
        let o = ask(&n, &["ask", "anyone there?"], None)?;
        assert_eq!(code(&o), 4, "{}", err(&o));
        assert!(err(&o).contains("queued"), "{}", err(&o));
        assert!(out(&o).contains("conversation "), "{}", out(&o));

        let me = n.device_id()?;
        n.cli(&["agent", "assign", &me])?;

        // `iom ask -`: the prompt is stdin.
        let o = ask(&n, &["ask", "-"], Some(b"line1\nline2\n"))?;
        assert_eq!(code(&o), 0, "{}", err(&o));
        assert_eq!(out(&o), "echo: line1\nline2\n", "{}", err(&o));
        assert!(
            model_saw(&fake, "line1\nline2"),
            "the model did not get the stdin prompt"
        );

        // Piped input with a question: both, the input between delimiter lines.
        let o = ask(&n, &["ask", "what failed?"], Some(b"ok 1\nE: disk full\n"))?;
        assert_eq!(code(&o), 0, "{}", err(&o));
        let want =
            "what failed?\n\n----- begin stdin -----\nok 1\nE: disk full\n----- end stdin -----";
        assert!(
            model_saw(&fake, want),
            "the model did not get the joined prompt"
        );
        assert_eq!(out(&o).trim_end(), format!("echo: {want}"));

        // JSON: the same object for --output json and --json.
        for args in [
            &["ask", "j1", "--output", "json"][..],
            &["ask", "j1", "--json"][..],
        ] {
            let o = ask(&n, args, None)?;
            assert_eq!(code(&o), 0, "{}", err(&o));
            let v: Value = serde_json::from_str(&out(&o)).context("not JSON")?;
            assert_eq!(v["result"]["type"], "done", "{v}");
            assert_eq!(v["result"]["text"], "echo: j1");
            assert!(
                v["conversation"].is_string() && v["request_id"].is_string(),
                "{v}"
            );
        }

        // Markdown: the answer, then a usage line.
        let o = ask(&n, &["ask", "md please", "--output", "markdown"], None)?;
        assert_eq!(code(&o), 0, "{}", err(&o));
        let md = out(&o);
        assert!(md.starts_with("echo: md please\n"), "{md}");
        assert!(
            md.contains("\n---\n*") && md.trim_end().ends_with("out*"),
            "{md}"
        );

        // The model API refuses: the request failed, exit 1, with the reason.
        fake.push_script(Scripted::Status {
            code: 400,
            retry_after: None,
        });
        let o = ask(&n, &["ask", "this will fail"], None)?;
        assert_eq!(code(&o), 1, "{}", err(&o));
        assert!(err(&o).contains("the request failed"), "{}", err(&o));
        fake.push_script(Scripted::Status {
            code: 400,
            retry_after: None,
        });
        let o = ask(&n, &["ask", "this fails too", "--json"], None)?;
        assert_eq!(code(&o), 1, "{}", err(&o));
        let v: Value = serde_json::from_str(&out(&o))?;
        assert_eq!(v["result"]["type"], "failed", "{v}");
        assert_eq!(v["result"]["reason"], "error", "{v}");

        // Bad usage: exit 2, each with a sentence that says what to do.
        let o = ask(&n, &["ask", "-"], None)?;
        assert_eq!(code(&o), 2);
        assert!(err(&o).contains("stdin was empty"), "{}", err(&o));
        let o = ask(&n, &["ask", "x", "--output", "yaml"], None)?;
        assert_eq!(code(&o), 2);
        let big = vec![b'x'; 300 * 1024];
        let o = ask(&n, &["ask", "summarise"], Some(&big))?;
        assert_eq!(code(&o), 2, "{}", err(&o));
        assert!(err(&o).contains("--file"), "{}", err(&o));
        let o = ask(&n, &["ask", "-"], Some(&[0xff, 0xfe, 0x00]))?;
        assert_eq!(code(&o), 2);
        assert!(err(&o).contains("not UTF-8"), "{}", err(&o));
        let o = ask(&n, &["ask", "x", "--file", "/nonexistent/file"], None)?;
        assert_eq!(code(&o), 2);
        assert!(
            err(&o).contains("cannot attach /nonexistent/file"),
            "{}",
            err(&o)
        );
        // --no-stdin ignores what is piped.
        let o = ask(&n, &["ask", "just this", "--no-stdin"], Some(b"ignored\n"))?;
        assert_eq!(code(&o), 0);
        assert!(model_saw(&fake, "just this"));
        assert!(
            !fake
                .requests()
                .iter()
                .any(|r| r.body.to_string().contains("ignored"))
        );

        // --no-wait: queued, exit 4, the ids on stdout. (Last: these run in the background
        // and would take a scripted model answer meant for a later request.)
        let o = ask(&n, &["ask", "later", "--no-wait"], None)?;
        assert_eq!(code(&o), 4, "{}", err(&o));
        assert!(out(&o).starts_with("conversation "), "{}", out(&o));
        let o = ask(&n, &["ask", "later", "--no-wait", "--json"], None)?;
        assert_eq!(code(&o), 4);
        let v: Value = serde_json::from_str(&out(&o))?;
        assert!(v["request_id"].is_string(), "{v}");
        n.assert_no_panic()
    });
}

#[test]
fn a_used_up_budget_exits_3() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        // A request reserves its input estimate (the twelve tool definitions and the prompt,
        // about 1,300 tokens) and max_tokens: 2,500 tokens hold the first, and what it used
        // leaves too little for the second.
        let mut n = node(
            &fake,
            "budget",
            "[agent]\nmax_tokens = 500\ndaily_token_budget = 2500\n",
        )?;
        n.start()?;
        let me = n.device_id()?;
        n.cli(&["agent", "assign", &me])?;
        let o = ask(&n, &["ask", "first of the day"], None)?;
        assert_eq!(code(&o), 0, "{}", err(&o));
        let o = ask(&n, &["ask", "second of the day"], None)?;
        assert_eq!(code(&o), 3, "{}", err(&o));
        assert!(err(&o).contains("daily token budget"), "{}", err(&o));
        let o = ask(&n, &["ask", "third", "--json"], None)?;
        assert_eq!(code(&o), 3);
        let v: Value = serde_json::from_str(&out(&o))?;
        assert_eq!(v["result"]["reason"], "budget_exceeded", "{v}");
        n.assert_no_panic()
    });
}
