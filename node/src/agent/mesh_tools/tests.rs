//! The mesh's tools on a real store in a temp dir, beside a fake sandbox.

#![allow(clippy::unwrap_used)]

use std::sync::Mutex;

use iom_crdt::Interface;

use super::*;
use crate::agent::testkit::Mesh;

/// A sandbox stand-in with one file, `out/report.txt`.
#[derive(Default)]
struct FakeSandbox {
    calls: Mutex<Vec<String>>,
}

impl ToolHost for FakeSandbox {
    fn definitions(&self) -> Value {
        json!([{"name": "bash"}])
    }

    fn run<'a>(&'a self, _c: &'a str, name: &'a str, _i: &'a Value) -> BoxFuture<'a, ToolResult> {
        self.calls.lock().unwrap().push(name.to_string());
        Box::pin(async move { ToolResult::ok(format!("sandbox ran {name}")) })
    }

    fn put_attachment<'a>(
        &'a self,
        _c: &'a str,
        _n: &'a str,
        _b: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), ToolHostError>> {
        Box::pin(async { Ok(()) })
    }

    fn read_workspace_file<'a>(
        &'a self,
        _c: &'a str,
        path: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<u8>, ToolHostError>> {
        Box::pin(async move {
            match path {
                "out/report.txt" | "/workspace/out/report.txt" => Ok(b"quarterly: fine\n".to_vec()),
                "big.bin" => Err(ToolHostError::File(format!(
                    "big.bin is larger than {max} bytes"
                ))),
                _ => Err(ToolHostError::File(format!(
                    "{path} is not a readable file"
                ))),
            }
        })
    }

    fn prepare(&self) -> BoxFuture<'_, Result<(), ToolHostError>> {
        Box::pin(async { Ok(()) })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// The blobs announced, `(hash, len)`.
type Announced = Arc<Mutex<Vec<([u8; 32], u64)>>>;

struct Rig {
    mesh: Mesh,
    tools: MeshTools,
    sandbox: Arc<FakeSandbox>,
    announced: Announced,
    doc: DocId,
}

impl Rig {
    /// The tools, and a conversation whose request `r1` from `laptop` is running.
    async fn new() -> Rig {
        let mesh = Mesh::new().await;
        let sandbox = Arc::new(FakeSandbox::default());
        let announced: Announced = Arc::default();
        let a = announced.clone();
        let tools = MeshTools::new(
            sandbox.clone(),
            mesh.conversations(),
            mesh.store.clone(),
            Arc::new(move |id, len| a.lock().unwrap().push((id, len))),
        );
        let doc = mesh.conversations().create("weekly plans").await.unwrap();
        mesh.conversations()
            .modify(doc, |c, now| {
                c.append_request("r1", "plan my week", Interface::Cli, "laptop", now)?;
                c.claim("r1", "agent", 1, now).map(drop)
            })
            .await
            .unwrap();
        Rig {
            mesh,
            tools,
            sandbox,
            announced,
            doc,
        }
    }

    async fn call(&self, name: &str, input: Value) -> ToolResult {
        self.tools.run(&self.doc.to_string(), name, &input).await
    }
}

#[tokio::test]
async fn the_mesh_tools_are_offered_after_the_sandbox_tools() {
    let rig = Rig::new().await;
    let defs = rig.tools.definitions();
    let names: Vec<&str> = defs
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names[0], "bash");
    assert_eq!(&names[1..], NAMES);
    for d in defs.as_array().unwrap().iter().skip(1) {
        assert_eq!(d["input_schema"]["type"], "object");
    }
    // Other tools go to the sandbox.
    assert_eq!(
        rig.call("bash", json!({})).await,
        ToolResult::ok("sandbox ran bash")
    );
    assert_eq!(*rig.sandbox.calls.lock().unwrap(), ["bash"]);
}

#[tokio::test]
async fn memory_is_read_appended_and_replaced() {
    let rig = Rig::new().await;
    assert_eq!(
        rig.call("memory_read", json!({})).await.content,
        "(the memory is empty)"
    );
    let r = rig
        .call("memory_update", json!({"text": "Likes tea."}))
        .await;
    assert!(!r.is_error, "{r:?}");
    rig.call("memory_update", json!({"text": "Lives in Lyon."}))
        .await;
    assert_eq!(
        rig.call("memory_read", json!({})).await.content,
        "Likes tea.\nLives in Lyon."
    );
    rig.call(
        "memory_update",
        json!({"text": "Short.", "mode": "replace"}),
    )
    .await;
    assert_eq!(rig.call("memory_read", json!({})).await.content, "Short.");
    let bad = rig
        .call("memory_update", json!({"text": "x", "mode": "shout"}))
        .await;
    assert!(bad.is_error && bad.content.contains("expected append or replace"));
    let bad = rig.call("memory_update", json!({"txt": "x"})).await;
    assert!(
        bad.is_error && bad.content.contains("invalid input"),
        "{bad:?}"
    );
}

#[tokio::test]
async fn schedules_are_added_listed_and_removed() {
    let rig = Rig::new().await;
    let r = rig
        .call(
            "schedule_add",
            json!({"cron": "0 9 * * Mon", "prompt": "Remind the person to water the plants."}),
        )
        .await;
    assert!(!r.is_error, "{r:?}");
    let added: Value = serde_json::from_str(&r.content).unwrap();
    assert_eq!(added["conversation"], rig.doc.to_string());
    assert!(
        added["next_slot_utc"]
            .as_str()
            .unwrap()
            .ends_with("09:00 UTC (Monday)")
    );
    let id = added["id"].as_str().unwrap().to_string();
    let listed: Value =
        serde_json::from_str(&rig.call("schedule_list", json!({})).await.content).unwrap();
    assert_eq!(listed["schedules"][0]["id"], id.as_str());
    assert_eq!(listed["schedules"][0]["cron"], "0 9 * * Mon");
    // In a new conversation.
    let r = rig
        .call(
            "schedule_add",
            json!({"cron": "@daily", "prompt": "news", "conversation": "new"}),
        )
        .await;
    let other: Value = serde_json::from_str(&r.content).unwrap();
    assert_ne!(other["conversation"], rig.doc.to_string());
    let bad = rig
        .call(
            "schedule_add",
            json!({"cron": "every monday", "prompt": "x"}),
        )
        .await;
    assert!(
        bad.is_error && bad.content.contains("not a cron expression"),
        "{bad:?}"
    );
    let r = rig.call("schedule_remove", json!({"id": id})).await;
    assert!(!r.is_error, "{r:?}");
    let r = rig.call("schedule_remove", json!({"id": id})).await;
    assert!(r.is_error && r.content.contains("no schedule"));
}

#[tokio::test]
async fn past_conversations_are_searched_by_every_word() {
    let rig = Rig::new().await;
    let c = rig.mesh.conversations();
    let old = c.create("trip").await.unwrap();
    c.modify(old, |c, now| {
        c.append_request(
            "q1",
            "Book the train to Lyon on Friday",
            Interface::Cli,
            "l",
            now,
        )?;
        c.append_assistant(
            "q1",
            "Booked the 8:04 TGV to LYON.",
            &[],
            Default::default(),
            "a",
            now,
        )
        .map(drop)
    })
    .await
    .unwrap();
    let r = rig
        .call("conversations_search", json!({"query": "lyon train"}))
        .await;
    let found: Value = serde_json::from_str(&r.content).unwrap();
    let results = found["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{found}");
    assert_eq!(results[0]["conversation"], old.to_string());
    assert_eq!(results[0]["role"], "user");
    assert_eq!(results[0]["this_conversation"], false);
    let r = rig
        .call("conversations_search", json!({"query": "lyon"}))
        .await;
    let found: Value = serde_json::from_str(&r.content).unwrap();
    assert_eq!(found["results"].as_array().unwrap().len(), 2);
    let r = rig
        .call("conversations_search", json!({"query": "  "}))
        .await;
    assert!(r.is_error);
    assert_eq!(snippet("abc", "zzz"), "abc");
    let long = format!("{}needle{}", "é".repeat(150), "x".repeat(400));
    let s = snippet(&long, "needle");
    assert!(
        s.starts_with('…') && s.ends_with('…') && s.contains("needle"),
        "{s}"
    );
}

#[tokio::test]
async fn a_workspace_file_is_stored_announced_and_sent_to_the_asking_device() {
    let rig = Rig::new().await;
    let r = rig
        .call("send_file", json!({"path": "out/report.txt"}))
        .await;
    assert!(!r.is_error, "{r:?}");
    let sent = rig
        .mesh
        .docs
        .read(rig.doc, |d| Outbox::open(d).unwrap().list())
        .await
        .unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].name, "report.txt");
    assert_eq!(sent[0].to, "laptop");
    assert_eq!(sent[0].request_id, "r1");
    assert_eq!(sent[0].len, 16);
    let hash: [u8; 32] = hex::decode(&sent[0].hash).unwrap().try_into().unwrap();
    let meta = rig.mesh.store.blob_meta(&hash).unwrap().unwrap();
    assert_eq!(
        rig.mesh.store.blob_chunk(&hash, &meta, 0).unwrap(),
        b"quarterly: fine\n"
    );
    assert_eq!(*rig.announced.lock().unwrap(), [(hash, 16)]);
    for (input, says) in [
        (json!({"path": "nope.txt"}), "not a readable file"),
        (json!({"path": "big.bin"}), "larger than"),
        (
            json!({"path": "out/report.txt", "name": "../x"}),
            "not a usable file name",
        ),
    ] {
        let r = rig.call("send_file", input).await;
        assert!(r.is_error && r.content.contains(says), "{r:?}");
    }
}
