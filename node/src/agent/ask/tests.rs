//! Asking unit tests: a real store in a temp dir, a recording link and runner.

#![allow(clippy::unwrap_used)]

use futures::StreamExt;
use iom_crdt::{DocKind, Role as MsgRole};
use iom_protocol::keys::DeviceKey;

use super::*;
use crate::agent::progress::{ProgressUpdate, RunProgress};
use crate::agent::testkit::{Mesh, asking};

async fn request(asking: &Asking, doc: DocId, rid: &str) -> MessageView {
    let rid = rid.to_string();
    asking
        .conversations()
        .read(doc, move |c| c.find_request(&rid))
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_new_conversation_is_titled_after_the_prompt() {
    let mesh = Mesh::new().await;
    let (asking, _, _) = asking(&mesh, &mesh.admin);
    let prompt = format!("  {}  ", "word ".repeat(30));
    let asked = asking
        .ask(&prompt, None, Interface::Web, Some("r1".into()))
        .await
        .unwrap();
    let doc: DocId = asked.conversation.parse().unwrap();
    let title = asking
        .conversations()
        .read(doc, |c| c.title())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(title, title_from(prompt.trim()));
    assert_eq!(title.chars().count(), 60);
    let req = request(&asking, doc, "r1").await;
    assert_eq!(req.text, prompt.trim());
    assert_eq!(req.status, Some(Status::Pending));
    assert_eq!(req.interface, Some(Interface::Web));
    assert_eq!(req.device, Some(mesh.admin.device_id().to_string()));
    assert_eq!(req.created_at, Some(1_700_000_000));
}

#[tokio::test]
async fn without_an_agent_the_request_is_queued() {
    let mesh = Mesh::new().await;
    let (asking, link, pokes) = asking(&mesh, &mesh.admin);
    let asked = asking.ask("hi", None, Interface::Cli, None).await.unwrap();
    assert!(asked.queued);
    assert_eq!(asked.agent, None);
    assert!(
        asked.note.contains("iom agent assign DEVICE"),
        "{}",
        asked.note
    );
    assert_eq!(asked.request_id.len(), 24, "a random id: 12 bytes in hex");
    assert!(link.notified.lock().unwrap().is_empty());
    assert!(pokes.docs.lock().unwrap().is_empty());
}

#[tokio::test]
async fn when_this_device_is_the_agent_its_runner_is_poked() {
    let mesh = Mesh::new().await;
    mesh.make_agent(&mesh.admin).await;
    let (asking, link, pokes) = asking(&mesh, &mesh.admin);
    let asked = asking.ask("hi", None, Interface::Cli, None).await.unwrap();
    let doc: DocId = asked.conversation.parse().unwrap();
    assert!(!asked.queued);
    assert_eq!(asked.agent, Some(mesh.admin.device_id().to_string()));
    assert_eq!(asked.note, "the agent is this device");
    assert_eq!(*pokes.docs.lock().unwrap(), vec![doc]);
    assert!(link.notified.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_reachable_agent_is_notified_and_an_offline_one_is_not() {
    let mesh = Mesh::new().await;
    let agent = mesh.add_device(false).await;
    mesh.make_agent(&agent).await;
    let (asking, link, pokes) = asking(&mesh, &mesh.admin);
    let name = mesh.trust.state().devices[&agent.device_id()].name.clone();
    let asked = asking
        .ask("hi", None, Interface::Cli, Some("r1".into()))
        .await
        .unwrap();
    let doc: DocId = asked.conversation.parse().unwrap();
    assert!(!asked.queued);
    assert_eq!(asked.note, format!("sent to the agent ({name})"));
    assert_eq!(
        *link.notified.lock().unwrap(),
        vec![(agent.peer_id(), doc, "r1".to_string())]
    );
    assert!(pokes.docs.lock().unwrap().is_empty());
    // Offline: queued in the document, nothing sent.
    link.offline.lock().unwrap().insert(agent.peer_id());
    let asked = asking
        .ask("again", Some(doc), Interface::Cli, Some("r2".into()))
        .await
        .unwrap();
    assert!(asked.queued);
    assert_eq!(asked.agent, Some(agent.device_id().to_string()));
    assert_eq!(
        asked.note,
        format!("the agent ({name}) is offline; the request is queued and runs when it is back")
    );
    assert_eq!(link.notified.lock().unwrap().len(), 1);
    assert_eq!(
        request(&asking, doc, "r2").await.status,
        Some(Status::Pending)
    );
    asking.stop().await;
}

#[tokio::test]
async fn asking_twice_with_one_request_id_adds_one_request() {
    let mesh = Mesh::new().await;
    let (asking, _, _) = asking(&mesh, &mesh.admin);
    let doc = asking.new_conversation("t").await.unwrap();
    for _ in 0..2 {
        asking
            .ask(
                "once",
                Some(doc),
                Interface::Schedule,
                Some("sched-1".into()),
            )
            .await
            .unwrap();
    }
    let n = asking
        .conversations()
        .read(doc, |c| c.requests().len())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn bad_asks_are_refused_with_a_reason() {
    let mesh = Mesh::new().await;
    let (asking, _, _) = asking(&mesh, &mesh.admin);
    let e = asking.ask("  \n ", None, Interface::Cli, None).await;
    assert!(matches!(e, Err(AskError::EmptyPrompt)));
    let long = "x".repeat(MAX_PROMPT_BYTES + 1);
    let e = asking
        .ask(&long, None, Interface::Cli, None)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the prompt is {} bytes; at most {MAX_PROMPT_BYTES}",
            long.len()
        )
    );
    let doc = asking.new_conversation("t").await.unwrap();
    for rid in [String::new(), "r".repeat(129)] {
        let e = asking.ask("hi", Some(doc), Interface::Cli, Some(rid)).await;
        assert!(matches!(e, Err(AskError::BadRequestId)), "{e:?}");
    }
    let missing = DocId::from_bytes([5; 16]);
    let e = asking.ask("hi", Some(missing), Interface::Cli, None).await;
    assert!(matches!(
        e,
        Err(AskError::Conversation(ExistingError::NotFound(_)))
    ));
    let memory = mesh.docs.create(DocKind::Memory).await.unwrap();
    let e = asking.ask("hi", Some(memory), Interface::Cli, None).await;
    assert!(matches!(
        e,
        Err(AskError::Conversation(ExistingError::WrongKind { .. }))
    ));
    // Nothing was written into the conversation by the refused asks.
    let n = asking
        .conversations()
        .read(doc, |c| c.messages().len())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn the_agent_protocol_answers_by_trust_and_role() {
    let mesh = Mesh::new().await;
    let (asking, _, pokes) = asking(&mesh, &mesh.admin);
    let laptop = mesh.add_device(false).await;
    let doc = DocId::from_bytes([8; 16]);
    let notify = || {
        Some(AgentRequest::Notify {
            doc: *doc.as_bytes(),
            request_id: "r1".into(),
        })
    };
    // Trusted, but this device is not the agent.
    let (resp, verdict) = asking.answer(laptop.peer_id(), notify());
    assert!(matches!(resp, AgentResponse::NotAgent));
    assert_eq!(verdict, Verdict::Keep);
    // The agent: accepted, the runner poked.
    mesh.make_agent(&mesh.admin).await;
    pokes.running.store(3, std::sync::atomic::Ordering::SeqCst);
    let (resp, _) = asking.answer(laptop.peer_id(), notify());
    assert!(matches!(resp, AgentResponse::Accepted { queued: 3 }));
    assert_eq!(*pokes.docs.lock().unwrap(), vec![doc]);
    // A stranger is refused, and disconnected once it keeps knocking.
    let stranger = DeviceKey::from_seed([77; 32]).id().to_peer_id();
    let mut verdicts = Vec::new();
    for _ in 0..=crate::sync::gate::MAX_REFUSALS_PER_MINUTE {
        let (resp, verdict) = asking.answer(stranger, notify());
        assert!(
            matches!(&resp, AgentResponse::Refused { reason } if reason.starts_with("not trusted")),
            "{resp:?}"
        );
        verdicts.push(verdict);
    }
    assert!(
        verdicts[..verdicts.len() - 1]
            .iter()
            .all(|v| *v == Verdict::Keep)
    );
    assert_eq!(verdicts.last(), Some(&Verdict::Disconnect));
    assert_eq!(
        pokes.docs.lock().unwrap().len(),
        1,
        "strangers poke nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn following_streams_status_progress_and_the_answer() {
    let mesh = Mesh::new().await;
    let (asking, _, _) = asking(&mesh, &mesh.admin);
    let asked = asking
        .ask("hi", None, Interface::Cli, Some("r1".into()))
        .await
        .unwrap();
    let doc: DocId = asked.conversation.parse().unwrap();
    let events = asking.follow(doc, "r1".into());
    let convs = mesh.conversations();
    let agent = mesh.admin.device_id().to_string();
    let writer = tokio::spawn(async move {
        let step = Duration::from_millis(300);
        let a = agent.clone();
        // The follower reports the request as it finds it (pending) before the agent claims it.
        tokio::time::sleep(step).await;
        convs
            .modify(doc, move |c, now| c.claim("r1", &a, 1, now).map(drop))
            .await
            .unwrap();
        tokio::time::sleep(step).await;
        let first = vec![ProgressUpdate::Text("Hel".into())];
        convs
            .modify(doc, move |c, now| c.append_progress("r1", &first, now))
            .await
            .unwrap();
        tokio::time::sleep(step).await;
        let second = vec![
            ProgressUpdate::Text("lo".into()),
            ProgressUpdate::ToolStarted {
                id: "t1".into(),
                name: "bash".into(),
                input: "{}".into(),
            },
            ProgressUpdate::ToolFinished {
                id: "t1".into(),
                output: "ok".into(),
                is_error: false,
            },
        ];
        convs
            .modify(doc, move |c, now| c.append_progress("r1", &second, now))
            .await
            .unwrap();
        tokio::time::sleep(step).await;
        let usage = iom_crdt::UsageView::new(7, 3);
        convs
            .modify(doc, move |c, now| {
                c.append_assistant("r1", "Hello!", &[], usage, &agent, now)?;
                c.set_status("r1", Status::Done, None, now)
            })
            .await
            .unwrap();
    });
    let got: Vec<RequestEvent> = events.collect().await;
    writer.await.unwrap();
    let agent = Some(mesh.admin.device_id().to_string());
    assert_eq!(
        got,
        vec![
            RequestEvent::Status {
                status: "pending".into(),
                agent: None
            },
            RequestEvent::Status {
                status: "running".into(),
                agent: agent.clone()
            },
            RequestEvent::Text {
                delta: "Hel".into()
            },
            RequestEvent::Text { delta: "lo".into() },
            RequestEvent::ToolStarted {
                name: "bash".into(),
                input: "{}".into()
            },
            RequestEvent::ToolFinished {
                name: "bash".into(),
                output: "ok".into(),
                is_error: false
            },
            RequestEvent::Text { delta: "!".into() },
            RequestEvent::Done {
                text: "Hello!".into(),
                input_tokens: 7,
                output_tokens: 3,
                note: None,
                model: None,
            },
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn following_a_missing_request_fails_at_once() {
    let mesh = Mesh::new().await;
    let (asking, _, _) = asking(&mesh, &mesh.admin);
    let doc = asking.new_conversation("t").await.unwrap();
    let got: Vec<_> = asking.follow(doc, "nope".into()).collect().await;
    assert_eq!(
        got,
        vec![RequestEvent::failed("no request nope in this conversation")]
    );
    let missing = DocId::from_bytes([4; 16]);
    let got: Vec<_> = asking.follow(missing, "r".into()).collect().await;
    assert!(
        matches!(&got[..], [RequestEvent::Failed { error, .. }] if error.starts_with("no document")),
        "{got:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn following_a_failed_request_reports_why() {
    let mesh = Mesh::new().await;
    let (asking, _, _) = asking(&mesh, &mesh.admin);
    let asked = asking
        .ask("hi", None, Interface::Cli, Some("r1".into()))
        .await
        .unwrap();
    let doc: DocId = asked.conversation.parse().unwrap();
    mesh.conversations()
        .modify(doc, |c, now| {
            c.set_status("r1", Status::Failed, Some("interrupted"), now)
        })
        .await
        .unwrap();
    let got: Vec<_> = asking.follow(doc, "r1".into()).collect().await;
    assert_eq!(got, vec![RequestEvent::failed("interrupted")]);
}

fn view(status: Option<Status>, progress: Option<&RunProgress>) -> MessageView {
    MessageView {
        index: 0,
        id: "m".into(),
        role: MsgRole::User,
        text: "q".into(),
        status,
        error: None,
        interface: None,
        device: None,
        created_at: None,
        request_id: Some("r".into()),
        claimed_by: None,
        reply_to: None,
        tool_calls: Vec::new(),
        usage: None,
        model: None,
        progress: progress.cloned(),
        attachments: Vec::new(),
    }
}

#[test]
fn diff_reports_only_what_is_new() {
    let mut seen = Seen::default();
    let mut p = RunProgress {
        text: "ab".into(),
        retry: Some("model API busy".into()),
        ..RunProgress::default()
    };
    let ev = diff(&mut seen, &view(Some(Status::Running), Some(&p)), None);
    assert_eq!(
        ev,
        vec![
            RequestEvent::Status {
                status: "running".into(),
                agent: None
            },
            RequestEvent::Text { delta: "ab".into() },
            RequestEvent::Retry {
                message: "model API busy".into()
            },
        ]
    );
    // Nothing changed: nothing reported.
    assert!(diff(&mut seen, &view(Some(Status::Running), Some(&p)), None).is_empty());
    // The retry notice cleared, more text.
    p.retry = None;
    p.text.push('c');
    let ev = diff(&mut seen, &view(Some(Status::Running), Some(&p)), None);
    assert_eq!(ev, vec![RequestEvent::Text { delta: "c".into() }]);
    // Done without the reply (not synced yet): no event until it is there.
    assert!(diff(&mut seen, &view(Some(Status::Done), Some(&p)), None).is_empty());
    let mut reply = view(None, None);
    reply.role = MsgRole::Assistant;
    reply.text = "abc, done".into();
    let mut req = view(Some(Status::Done), Some(&p));
    req.error = Some("stopped: the turn limit was reached".into());
    let ev = diff(&mut seen, &req, Some(&reply));
    assert_eq!(
        ev,
        vec![
            RequestEvent::Text {
                delta: ", done".into()
            },
            RequestEvent::Done {
                text: "abc, done".into(),
                input_tokens: 0,
                output_tokens: 0,
                note: Some("stopped: the turn limit was reached".into()),
                model: None,
            }
        ]
    );
    // A failure without a reason says "failed".
    let ev = diff(
        &mut Seen::default(),
        &view(Some(Status::Failed), None),
        None,
    );
    assert_eq!(ev, vec![RequestEvent::failed("failed")]);
}

#[tokio::test]
async fn attachments_are_checked_recorded_and_named_in_the_prompt() {
    let mesh = Mesh::new().await;
    let (asking, _, _) = asking(&mesh, &mesh.admin);
    let mut w = mesh.store.blob_writer(None).unwrap();
    w.write(b"12345").unwrap();
    let (id, _) = w.finish().await.unwrap();
    let hash = hex::encode(id);
    let file = |name: &str, hash: &str| Attach {
        name: name.into(),
        hash: hash.into(),
    };
    let asked = asking
        .ask_with(
            "read it",
            None,
            Interface::Cli,
            Some("r1".into()),
            &[file("a.txt", &hash)],
        )
        .await
        .unwrap();
    let doc: DocId = asked.conversation.parse().unwrap();
    let req = request(&asking, doc, "r1").await;
    assert_eq!(
        req.attachments,
        vec![AttachmentView {
            name: "a.txt".into(),
            hash: hash.clone(),
            len: 5
        }]
    );
    assert_eq!(
        req.text,
        format!(
            "read it\n\n[Attached files, readable with your tools:\n- /workspace/attachments/a.txt (5 bytes, sha256 {hash})]"
        )
    );
    // Refused, each with a reason: bad names, a duplicate, a bad hash, a blob not here.
    for bad in ["", ".", "..", "a/b", "x\ny"] {
        let e = asking
            .ask_with("q", None, Interface::Cli, None, &[file(bad, &hash)])
            .await
            .unwrap_err();
        assert!(matches!(e, AskError::BadAttachment(_)), "{bad:?}: {e}");
    }
    let e = asking
        .ask_with(
            "q",
            None,
            Interface::Cli,
            None,
            &[file("a", &hash), file("a", &hash)],
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("two files are named"), "{e}");
    let e = asking
        .ask_with("q", None, Interface::Cli, None, &[file("a", "zz")])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not a blob hash"), "{e}");
    let e = asking
        .ask_with(
            "q",
            None,
            Interface::Cli,
            None,
            &[file("a", &"0".repeat(64))],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, AskError::AttachmentMissing { .. }), "{e}");
    let many: Vec<Attach> = (0..=MAX_ATTACHMENTS)
        .map(|i| file(&format!("f{i}"), &hash))
        .collect();
    let e = asking
        .ask_with("q", None, Interface::Cli, None, &many)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("at most 16"), "{e}");
}
