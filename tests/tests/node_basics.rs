//! One real node driven by the `iom` CLI: documents (with history), blobs, memory, the
//! single-node-per-data-dir lock, the "no node running" hint, and bad input of every kind
//! answered with a clear error (and never a panic).

use std::time::Duration;

use anyhow::{Result, bail};
use iom_tests::harness::{Node, random_file, scenario, sha256_file, wait_until};
use serde_json::Value;

fn id_of(v: &Value) -> Result<String> {
    match v["id"].as_str() {
        Some(s) => Ok(s.to_string()),
        None => bail!("no id in {v}"),
    }
}

#[test]
fn fresh_data_dir_status_docs_history_blobs_memory() {
    scenario(fresh_data_dir_status_docs_history_blobs_memory_body);
}

fn fresh_data_dir_status_docs_history_blobs_memory_body() -> Result<()> {
    let mut a = Node::new("a")?;
    // `node run` on an empty dir initialises it.
    assert!(!a.dir.join("keys").exists() || std::fs::read_dir(&a.dir)?.count() <= 1);
    a.start()?;
    let st = a.status()?;
    assert!(
        st["device"].as_str().is_some_and(|d| d.starts_with("12D3")),
        "{st}"
    );
    assert!(st["person"].as_str().is_some_and(|p| p.len() == 64), "{st}");
    assert_eq!(st["documents"], 0, "{st}");
    assert!(
        st["listen"].as_array().is_some_and(|l| !l.is_empty()),
        "{st}"
    );
    let human = a.cli(&["status"])?;
    assert!(human.contains("device:"), "human status: {human}");

    // Documents: new / put / get / log, and reading a past version.
    let id = id_of(&a.json(&["doc", "new", "--content", r#"{"title":"one"}"#])?)?;
    a.cli(&["doc", "put", &id, "title", r#""two""#, "-m", "retitle"])?;
    a.cli(&["doc", "put", &id, "tags.0", "42"])?;
    let now = a.json(&["doc", "get", &id])?;
    assert_eq!(now["content"]["title"], "two", "{now}");
    assert_eq!(a.json(&["doc", "get", &id, "title"])?["content"], "two");
    let log = a.json(&["doc", "log", &id])?;
    let changes = log["changes"].as_array().cloned().unwrap_or_default();
    assert!(changes.len() >= 3, "log: {log}");
    assert!(
        changes.iter().any(|c| c["message"] == "retitle"),
        "log has the message: {log}"
    );
    // The change that set the initial content: the title was "one" then.
    let initial = changes
        .iter()
        .find(|c| c["message"] == "initial content")
        .and_then(|c| c["hash"].as_str())
        .map(str::to_string);
    let Some(initial) = initial else {
        bail!("no initial content change in {log}")
    };
    let past = a.json(&["doc", "get", &id, "--at", &initial])?;
    assert_eq!(past["content"]["title"], "one", "past version: {past}");
    assert!(past["content"].get("tags").is_none(), "{past}");
    let list = a.doc_ids()?;
    assert_eq!(list, vec![id.clone()]);

    // Blobs: a multi-chunk file round-trips byte for byte.
    let src = a.dir.join("in.bin");
    random_file(&src, 5 * 1024 * 1024 + 123, 7)?;
    let added = a.json(&["blob", "add", src.to_str().unwrap_or_default()])?;
    let hash = added["hash"].as_str().unwrap_or_default().to_string();
    assert_eq!(hash, sha256_file(&src)?, "blob id is the sha256: {added}");
    assert_eq!(added["len"], 5 * 1024 * 1024 + 123);
    let out = a.dir.join("out.bin");
    a.cli(&["blob", "get", &hash, "-o", out.to_str().unwrap_or_default()])?;
    assert_eq!(sha256_file(&out)?, hash);
    assert_eq!(a.blob_hashes()?, vec![hash.clone()]);

    // Memory.
    a.cli(&["memory", "append", "I like tea."])?;
    a.cli(&["memory", "append", "Call me Sam."])?;
    let mem = a.json(&["memory", "show"])?;
    let text = mem["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("I like tea.") && text.contains("Call me Sam."),
        "memory: {mem}"
    );
    assert!(text.find("tea").unwrap_or(0) < text.find("Sam").unwrap_or(0));

    // Everything survives a restart.
    a.restart()?;
    assert_eq!(a.json(&["doc", "get", &id])?["content"]["title"], "two");
    assert_eq!(a.blob_hashes()?, vec![hash]);
    assert!(
        a.json(&["memory", "show"])?["text"]
            .as_str()
            .is_some_and(|t| t.contains("Call me Sam."))
    );
    a.assert_no_panic()
}

#[test]
fn second_node_on_same_data_dir_is_refused() {
    scenario(second_node_on_same_data_dir_is_refused_body);
}

fn second_node_on_same_data_dir_is_refused_body() -> Result<()> {
    let mut a = Node::new("a")?;
    a.start()?;
    let out = std::process::Command::new(iom_tests::harness::iom_bin())
        .arg("--data-dir")
        .arg(&a.dir)
        .args([
            "node",
            "run",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .env("NO_COLOR", "1")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(
        err.contains("already running") && err.contains(&a.pid().unwrap_or(0).to_string()),
        "clear error naming the running node: {err}"
    );
    // The first node is unharmed.
    assert!(a.is_running());
    a.json(&["doc", "new"])?;
    a.assert_no_panic()
}

#[test]
fn cli_without_a_node_says_how_to_start_one() {
    scenario(cli_without_a_node_says_how_to_start_one_body);
}

fn cli_without_a_node_says_how_to_start_one_body() -> Result<()> {
    let a = Node::new("idle")?;
    let (code, err) = a.fail(&["doc", "list"])?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no iom node is running") && err.contains("iom node run"),
        "hint: {err}"
    );
    Ok(())
}

#[test]
fn bad_input_gets_clear_errors_and_no_panic() {
    scenario(bad_input_gets_clear_errors_and_no_panic_body);
}

fn bad_input_gets_clear_errors_and_no_panic_body() -> Result<()> {
    let mut a = Node::new("a")?;
    a.start()?;
    let id = id_of(&a.json(&["doc", "new", "--content", r#"{"n":1}"#])?)?;

    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        // Document ids, paths and values.
        (vec!["doc", "get", "zzz"], 1, "is not a document id"),
        (
            vec!["doc", "get", "00000000000000000000000000000000"],
            1,
            "no document",
        ),
        (vec!["doc", "get", &id, "a..b"], 1, "bad path segment"),
        (vec!["doc", "put", &id, "", "1"], 1, "path"),
        (
            vec!["doc", "put", &id, "n.x", "1"],
            1,
            "not a map or a list",
        ),
        (vec!["doc", "get", &id, "--at", "abc"], 1, "bad head"),
        (
            vec![
                "doc",
                "get",
                &id,
                "--at",
                "0000000000000000000000000000000000000000000000000000000000000000",
            ],
            1,
            "not in this document",
        ),
        (vec!["doc", "new", "--content", "{bad"], 2, "not JSON"),
        (vec!["doc", "new", "--content", "[1]"], 2, "JSON object"),
        (
            vec!["doc", "new", "--kind", "nonsense"],
            1,
            "expected one of",
        ),
        // Invite codes.
        (vec!["join", "iom1garbage"], 1, "incomplete"),
        (vec!["join", "hello"], 1, "invite"),
        // Blobs.
        (vec!["blob", "get", "xyz", "-o", "/tmp/never"], 1, "hash"),
        (
            vec![
                "blob",
                "get",
                "0000000000000000000000000000000000000000000000000000000000000000",
                "-o",
                "/tmp/never",
            ],
            1,
            "blob",
        ),
        (
            vec!["blob", "add", "/nonexistent/file"],
            1,
            "/nonexistent/file",
        ),
        // Arguments.
        (vec!["frobnicate"], 2, "unrecognized subcommand"),
        (vec!["doc", "get"], 2, "required"),
        (vec!["invite", "--ttl", "5 parsecs"], 2, "unknown unit"),
    ];
    for (args, code, needle) in &cases {
        let (got, err) = a.fail(args)?;
        assert_eq!(
            got,
            *code,
            "`iom {}` exit code; stderr: {err}",
            args.join(" ")
        );
        assert!(
            err.to_lowercase().contains(&needle.to_lowercase()),
            "`iom {}`: expected {needle:?} in: {err}",
            args.join(" ")
        );
        assert!(!err.contains("panicked"), "{err}");
    }

    // A tampered invite: one character of a real code changed.
    let code = a.invite(false)?;
    let mut chars: Vec<char> = code.chars().collect();
    let mid = chars.len() / 2;
    chars[mid] = if chars[mid] == 'q' { 'p' } else { 'q' };
    let tampered: String = chars.into_iter().collect();
    let (_, err) = a.fail(&["join", &tampered])?;
    assert!(err.contains("typo") || err.contains("checksum"), "{err}");
    // A truncated one.
    let (_, err) = a.fail(&["join", &code[..code.len() - 10]])?;
    assert!(err.contains("incomplete"), "{err}");
    // An expired one.
    let short = a.json(&["invite", "--ttl", "1s"])?["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    std::thread::sleep(Duration::from_millis(2100));
    let other = {
        let mut b = Node::new("b")?;
        b.start()?;
        b
    };
    let (_, err) = other.fail(&["join", &short])?;
    assert!(err.contains("expired"), "{err}");

    // The raw API: a bad JSON body and an unknown route.
    let api = a.api()?;
    let rt = tokio::runtime::Runtime::new()?;
    let bad = rt.block_on(api.put(
        &format!("/v1/docs/{id}"),
        &serde_json::json!({"path": "n", "value": 1, "bogus": true}),
    ));
    assert!(bad.is_err(), "unknown field accepted: {bad:?}");

    // The node is fine after all that.
    assert!(a.is_running());
    assert_eq!(a.json(&["doc", "get", &id, "n"])?["content"], 1);
    a.assert_no_panic()?;
    other.assert_no_panic()
}

#[test]
fn invalid_config_is_refused_before_start() {
    scenario(invalid_config_is_refused_before_start_body);
}

fn invalid_config_is_refused_before_start_body() -> Result<()> {
    let mut a = Node::new("cfg")?;
    std::fs::write(a.dir.join("config.toml"), "nmae = \"x\"\n")?;
    let err = match a.start() {
        Ok(()) => bail!("the node started with an unknown config key"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("nmae"), "the key is named: {err}");
    assert!(err.contains("exit status: 2"), "exit code 2: {err}");
    // A bad value in a known key.
    std::fs::write(a.dir.join("config.toml"), "[storage]\nloaded_docs = 0\n")?;
    let err = match a.start() {
        Ok(()) => bail!("the node started with storage.loaded_docs = 0"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("storage.loaded_docs"), "{err}");
    assert!(err.contains("exit status: 2"), "exit code 2: {err}");
    wait_until("nothing left running", Duration::from_secs(2), || {
        Ok(!a.is_running())
    })
}
