//! Gate tests: a real store in a temp dir, certificates of a small mesh, paused time for the
//! expiry. The runner-level tests (a denied call fails the request) are in `runner/tests.rs`.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};

use iom_crdt::Interface;
use iom_crdt::approvals::Rule;
use serde_json::json;

use super::*;
use crate::agent::clock::Clock;
use crate::agent::testkit::Mesh;

/// Counts the calls that really ran.
#[derive(Default)]
struct Counting(AtomicUsize);

impl ToolExecutor for &Counting {
    fn run<'a>(&'a self, name: &'a str, _input: &'a Value) -> BoxFuture<'a, ToolResult> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { ToolResult::ok(format!("ran {name}")) })
    }
}

struct Rig {
    mesh: Mesh,
    gate: Gate,
    doc: DocId,
}

impl Rig {
    /// A conversation with request `r1`, and the policy `tool: action` with `timeout` s.
    async fn new(tool: &str, action: Action, timeout: u64) -> Rig {
        let mesh = Mesh::new().await;
        let conversations = mesh.conversations();
        let doc = conversations.create("t").await.unwrap();
        conversations
            .modify(doc, |c, now| {
                c.append_request("r1", "hi", Interface::Cli, "laptop", now)
            })
            .await
            .unwrap();
        let rule = Rule {
            tool: tool.into(),
            args: None,
            action,
        };
        edit_policy(&mesh.docs, 1, move |s, now| {
            policy::set_rule(s, &rule, now)?;
            policy::set_timeout(s, timeout, now)
        })
        .await
        .unwrap();
        let gate = Gate::new(conversations, mesh.trust.clone());
        Rig { mesh, gate, doc }
    }

    fn agent(&self) -> String {
        self.mesh.admin.device_id().to_string()
    }

    /// Waits (paused time) for the one pending approval and returns its id.
    async fn pending(&self) -> String {
        for _ in 0..200 {
            let list = list(&self.mesh.docs, self.mesh.clock.now_secs(), false)
                .await
                .unwrap();
            if let Some(f) = list.first() {
                return f.approval.id.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no approval request appeared");
    }

    async fn answer(
        &self,
        by: &SharedIdentity,
        id: &str,
        d: Decision,
    ) -> Result<Found, AnswerError> {
        answer(
            &self.mesh.docs,
            by,
            &self.mesh.trust,
            self.mesh.clock.now_secs(),
            id,
            d,
            Some("because".into()),
        )
        .await
    }

    async fn state(&self, id: &str) -> ApprovalView {
        self.gate.approval(self.doc, id).await.unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn an_approval_answered_by_another_admin_device_runs_the_call() {
    let rig = Rig::new("memory_*", Action::Ask, 600).await;
    let laptop = rig.mesh.add_device(true).await;
    let ran = Counting::default();
    let gated = Gated::new(&rig.gate, &ran, rig.doc, "r1", &rig.agent());
    let input = json!({"text": "likes tea"});
    let call = gated.run("memory_update", &input);
    let answer = async {
        let id = rig.pending().await;
        let v = rig.state(&id).await;
        assert_eq!(v.tool, "memory_update");
        assert_eq!(v.input, input.to_string());
        assert_eq!(v.request_id, "r1");
        assert!(
            v.touches[0].contains("appends to the memory document"),
            "{:?}",
            v.touches
        );
        assert_eq!(v.rule.as_deref(), Some("approvals.rule.memory_*"));
        assert_eq!(ran.0.load(Ordering::SeqCst), 0, "ran before the answer");
        rig.answer(&laptop, &id, Decision::Approve).await.unwrap();
        id
    };
    let (result, id) = tokio::join!(call, answer);
    assert_eq!(result, ToolResult::ok("ran memory_update"));
    assert_eq!(ran.0.load(Ordering::SeqCst), 1);
    let v = rig.state(&id).await;
    assert_eq!(v.state, State::Approved);
    assert_eq!(v.decided_by, Some(laptop.device_id().to_string()));
    // Answered once: a second answer is refused.
    assert!(matches!(
        rig.answer(&laptop, &id, Decision::Deny).await,
        Err(AnswerError::Decided { .. })
    ));
    // Not matched by the rule: runs without asking.
    assert_eq!(
        gated.run("bash", &json!({})).await,
        ToolResult::ok("ran bash")
    );
}

#[tokio::test(start_paused = true)]
async fn a_denied_call_never_runs_and_halts_the_run_with_the_reason() {
    let rig = Rig::new("bash", Action::Ask, 600).await;
    let phone = rig.mesh.add_device(true).await;
    let ran = Counting::default();
    let gated = Gated::new(&rig.gate, &ran, rig.doc, "r1", &rig.agent());
    let input = json!({"command": "rm -rf /workspace"});
    // The run: one tool call, then it would go on.
    let run = async {
        let r = gated.run("bash", &input).await;
        Ok::<_, ClaudeError>(r)
    };
    let answer = async {
        let id = rig.pending().await;
        rig.answer(&phone, &id, Decision::Deny).await.unwrap();
        id
    };
    let (result, id) = tokio::join!(gated.guard(run), answer);
    let why = match result {
        Err(RunError::Halted(why)) => why,
        other => panic!("expected a halt, got {other:?}"),
    };
    assert!(why.contains("denied by device2: because"), "{why}");
    assert!(why.contains("bash was not run"), "{why}");
    assert_eq!(ran.0.load(Ordering::SeqCst), 0);
    assert_eq!(rig.state(&id).await.state, State::Denied);
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_approval_expires_as_denied() {
    let rig = Rig::new("*", Action::Ask, 600).await;
    let ran = Counting::default();
    let gated = Gated::new(&rig.gate, &ran, rig.doc, "r1", &rig.agent());
    let started = tokio::time::Instant::now();
    let run = async { Ok::<_, ClaudeError>(gated.run("read_file", &json!({"path": "a"})).await) };
    let result = gated.guard(run).await;
    let why = match result {
        Err(RunError::Halted(why)) => why,
        other => panic!("expected a halt, got {other:?}"),
    };
    assert!(
        why.contains("expired: no answer within 600 s: denied"),
        "{why}"
    );
    assert!(started.elapsed() >= Duration::from_secs(600));
    assert!(started.elapsed() < Duration::from_secs(605));
    assert_eq!(ran.0.load(Ordering::SeqCst), 0);
    let found = list(&rig.mesh.docs, rig.mesh.clock.now_secs(), true)
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].approval.state, State::Expired);
}

#[tokio::test(start_paused = true)]
async fn only_admin_devices_answer_and_forged_answers_are_ignored() {
    let rig = Rig::new("bash", Action::Ask, 30).await;
    let guest = rig.mesh.add_device(false).await;
    let ran = Counting::default();
    let gated = Gated::new(&rig.gate, &ran, rig.doc, "r1", &rig.agent());
    let run = async { Ok::<_, ClaudeError>(gated.run("bash", &json!({"command": "ls"})).await) };
    let forge = async {
        let id = rig.pending().await;
        // The API refuses a device without an admin certificate.
        assert!(matches!(
            rig.answer(&guest, &id, Decision::Approve).await,
            Err(AnswerError::NotAdmin)
        ));
        // Written into the document anyway (a modified build): signed by a non-admin, and
        // one claiming to be the admin with a bad signature. Neither counts.
        let v = rig.state(&id).await;
        let payload = policy::answer_payload(rig.doc, &id, &v.digest(), Decision::Approve, 5);
        let forged = [
            AnswerView {
                device: guest.device_id().to_string(),
                decision: Decision::Approve,
                reason: None,
                at: 5,
                signature: hex::encode(guest.read().device.sign(&payload)),
            },
            AnswerView {
                device: rig.agent(),
                decision: Decision::Approve,
                reason: None,
                at: 5,
                signature: hex::encode([7u8; 64]),
            },
        ];
        for a in forged {
            let id = id.clone();
            edit(&rig.mesh.docs, rig.doc, 5, move |ap, now| {
                ap.answer(&id, &a, now)
            })
            .await
            .unwrap();
        }
        // An answer signed over another call does not count either.
        let other = policy::answer_payload(rig.doc, &id, &[0; 32], Decision::Approve, 5);
        let a = AnswerView {
            device: rig.agent(),
            decision: Decision::Approve,
            reason: None,
            at: 5,
            signature: hex::encode(rig.mesh.admin.read().device.sign(&other)),
        };
        let id2 = id.clone();
        edit(&rig.mesh.docs, rig.doc, 5, move |ap, now| {
            ap.answer(&id2, &a, now)
        })
        .await
        .unwrap();
    };
    let (result, ()) = tokio::join!(gated.guard(run), forge);
    assert!(matches!(result, Err(RunError::Halted(w)) if w.contains("expired")));
    assert_eq!(ran.0.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn deny_rules_refuse_and_no_rule_allows() {
    let rig = Rig::new("mcp__git__*", Action::Deny, 600).await;
    let ran = Counting::default();
    let gated = Gated::new(&rig.gate, &ran, rig.doc, "r1", &rig.agent());
    let r = gated.run("mcp__git__push", &json!({})).await;
    assert!(r.is_error && r.content.contains("policy denies"), "{r:?}");
    assert_eq!(ran.0.load(Ordering::SeqCst), 0);
    assert_eq!(
        gated.run("mcp__time__now", &json!({})).await,
        ToolResult::ok("ran mcp__time__now")
    );
    assert!(
        list(&rig.mesh.docs, rig.mesh.clock.now_secs(), true)
            .await
            .unwrap()
            .is_empty()
    );
}

#[test]
fn touches_say_what_a_call_does() {
    let t = touches(
        "send_file",
        &json!({"path": "/workspace/out/r.pdf"}),
        "laptop",
    );
    assert_eq!(
        t,
        ["sends /workspace/out/r.pdf to device laptop (stored as a blob on every device)"]
    );
    let t = touches("mcp__git__commit", &json!({}), "x");
    assert_eq!(
        t,
        ["calls tool commit of MCP server git (in its own container)"]
    );
    let t = touches("bash", &json!({"command": "ls"}), "x");
    assert!(t[0].ends_with(": ls"));
}
