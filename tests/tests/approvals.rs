//! Approvals and the mesh's own tools end to end: real nodes over real sockets, the fake
//! Messages API scripting the tool calls (its echo model asks for `[[tool NAME JSON]]`).
//!
//! - A call marked `ask` waits for an admin device: approved from another device it runs;
//!   denied it never runs and the request fails with the reason; unanswered it expires and
//!   fails the same way. A device without an admin certificate cannot answer.
//! - The agent adds a schedule from a chat (`schedule_add`), and it fires once at its slot
//!   (the node's clock moved past the slot with `IOM_CLOCK_OFFSET_SECS`).

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig};
use iom_tests::harness::{Node, iom_bin, runtime, scenario, wait_mesh, wait_until};
use serde_json::{Value, json};

/// `iom ask PROMPT --json` on `n`, running in the background.
fn ask_in_background(n: &Node, prompt: &str) -> Result<Child> {
    let mut cmd = Command::new(iom_bin());
    cmd.arg("--data-dir")
        .arg(&n.dir)
        .args(["ask", prompt, "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().context("spawning iom ask")
}

/// Waits for a background `iom ask`: its exit code, its JSON and its stderr.
fn finish(mut child: Child) -> Result<(Option<i32>, Value, String)> {
    let status = child.wait()?;
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .context("stdout")?
        .read_to_string(&mut out)?;
    child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut err)?;
    let v = serde_json::from_str(&out).with_context(|| format!("no JSON: {out}\n{err}"))?;
    Ok((status.code(), v, err))
}

/// The one pending approval `n` sees, once it has synced there.
fn pending_on(n: &Node) -> Result<Value> {
    let mut found = Value::Null;
    wait_until(
        "an approval request to reach the device",
        Duration::from_secs(30),
        || {
            let list = n.json(&["approvals"])?;
            match list["approvals"].as_array().map(Vec::as_slice) {
                Some([one]) => {
                    found = one.clone();
                    Ok(true)
                }
                Some([]) | None => Ok(false),
                Some(many) => bail!("more than one pending approval: {many:?}"),
            }
        },
    )?;
    Ok(found)
}

fn memory(n: &Node) -> Result<String> {
    Ok(n.json(&["memory", "show"])?["text"]
        .as_str()
        .unwrap_or("")
        .to_string())
}

fn remember(text: &str) -> String {
    format!("[[tool memory_update {}]]", json!({ "text": text }))
}

#[test]
fn approvals_answered_from_another_device_denied_and_expired() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let mut home = Node::with_env("ap-home", &fake.node_env())?;
        home.start()?;
        let mut laptop = Node::new("ap-laptop")?;
        laptop.start()?;
        let mut phone = Node::new("ap-phone")?;
        phone.start()?;
        laptop.cli(&["join", &home.invite(true)?])?;
        phone.cli(&["join", &home.invite(false)?])?;
        wait_mesh(&[&home, &laptop, &phone], Duration::from_secs(30))?;
        let me = home.device_id()?;
        home.cli(&["agent", "assign", &me])?;
        // The policy is set on the laptop and follows the mesh to the agent.
        laptop.cli(&["approvals", "policy", "set", "memory_*", "ask"])?;
        wait_until(
            "the policy to reach the agent",
            Duration::from_secs(30),
            || {
                let p = home.json(&["approvals", "policy", "list"])?;
                Ok(p["rules"][0]["tool"] == "memory_*" && p["rules"][0]["action"] == "ask")
            },
        )?;

        // 1. Asked on the agent device, approved from the laptop: the call runs.
        let ask = ask_in_background(&home, &remember("likes green tea"))?;
        let a = pending_on(&laptop)?;
        assert_eq!(a["tool"], "memory_update");
        assert_eq!(a["input"], json!({ "text": "likes green tea" }).to_string());
        let touches = a["touches"][0].as_str().unwrap_or("");
        assert!(touches.contains("appends to the memory document"), "{a}");
        assert_eq!(memory(&home)?, "", "the call ran before the answer");
        // The phone holds no admin certificate: it cannot answer.
        let id = a["id"].as_str().context("id")?.to_string();
        let (code, err) = phone.fail(&["approve", &id])?;
        assert_eq!(code, 1);
        assert!(err.contains("not an admin device"), "{err}");
        laptop.cli(&["approve", &id])?;
        let (code, v, err) = finish(ask)?;
        assert_eq!(code, Some(0), "{v}\n{err}");
        assert_eq!(v["result"]["type"], "done", "{v}");
        assert!(
            err.contains(&format!("[approval {id} pending: memory_update")),
            "{err}"
        );
        assert!(err.contains(&format!("iom approve {id}")), "{err}");
        assert!(err.contains(&format!("[approval {id} approved")), "{err}");
        assert_eq!(memory(&home)?, "likes green tea");
        let decided = home.json(&["approvals", "--all"])?;
        assert_eq!(decided["approvals"][0]["state"], "approved", "{decided}");
        assert_eq!(
            decided["approvals"][0]["decided_by"],
            laptop.device_id()?.as_str()
        );

        // 2. Asked on the laptop, denied there: the call never runs, the request fails.
        let ask = ask_in_background(&laptop, &remember("hates tea"))?;
        let a = pending_on(&laptop)?;
        let id = a["id"].as_str().context("id")?.to_string();
        laptop.cli(&["deny", &id, "--reason", "that is not true"])?;
        let (code, v, _) = finish(ask)?;
        assert_eq!(code, Some(1), "{v}");
        let error = v["result"]["error"].as_str().unwrap_or("");
        assert!(
            error.contains(&format!("approval {id} denied by ap-laptop")),
            "{error}"
        );
        assert!(error.contains("that is not true"), "{error}");
        assert_eq!(memory(&home)?, "likes green tea");

        // 3. Nobody answers within the timeout: denied.
        laptop.cli(&["approvals", "policy", "timeout", "3s"])?;
        wait_until(
            "the timeout to reach the agent",
            Duration::from_secs(30),
            || Ok(home.json(&["approvals", "policy", "list"])?["timeout_secs"] == 3),
        )?;
        let ask = ask_in_background(&laptop, &remember("sleeps at noon"))?;
        let (code, v, _) = finish(ask)?;
        assert_eq!(code, Some(1), "{v}");
        let error = v["result"]["error"].as_str().unwrap_or("");
        assert!(
            error.contains("expired: no answer within 3 s: denied"),
            "{error}"
        );
        assert_eq!(memory(&home)?, "likes green tea");
        // Answering it now is too late.
        let all = laptop.json(&["approvals", "--all"])?;
        let expired = all["approvals"]
            .as_array()
            .and_then(|l| l.iter().find(|a| a["state"] == "expired"))
            .context("no expired approval")?;
        let (code, err) = laptop.fail(&["approve", expired["id"].as_str().unwrap_or("")])?;
        assert_eq!(code, 1);
        assert!(err.contains("already expired"), "{err}");
        // Only one memory_update ever ran: the fake saw one successful tool result.
        let ran: usize = fake
            .requests()
            .iter()
            .flat_map(|r| r.tool_results())
            .filter(|(_, content, is_error)| !is_error && content.contains("memory appended"))
            .count();
        assert_eq!(ran, 1);
        home.assert_no_panic()?;
        Ok(())
    });
}

#[test]
fn the_agent_adds_a_schedule_from_a_chat_and_it_fires_once_at_its_slot() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let mut home = Node::with_env("sched-chat", &fake.node_env())?;
        home.start()?;
        let me = home.device_id()?;
        home.cli(&["agent", "assign", &me])?;
        let call =
            json!({ "cron": "0 9 * * Mon", "prompt": "Remind the person to water the plants." });
        let o = home.try_cli(&["ask", &format!("[[tool schedule_add {call}]]"), "--json"])?;
        let v: Value = serde_json::from_slice(&o.stdout)
            .with_context(|| String::from_utf8_lossy(&o.stderr).into_owned())?;
        assert_eq!(v["result"]["type"], "done", "{v}");
        let conv = v["conversation"]
            .as_str()
            .context("conversation")?
            .to_string();
        let list = home.json(&["schedule", "list"])?;
        let s = list["schedules"][0].clone();
        assert_eq!(s["cron"], "0 9 * * Mon", "{list}");
        assert_eq!(s["conversation"], conv.as_str(), "it posts into the chat");
        let id = s["id"].as_str().context("id")?.to_string();
        let slot = s["next_slot"].as_i64().context("next_slot")?;
        let now = list["now"].as_i64().context("now")?;
        // Monday 09:00 UTC.
        assert_eq!((slot / 86_400 + 4) % 7, 1, "not a Monday: {slot}");
        assert_eq!(slot % 86_400, 9 * 3600);

        // The node wakes up 30 s after the slot.
        home.env.push((
            "IOM_CLOCK_OFFSET_SECS".into(),
            (slot - now + 30).to_string(),
        ));
        home.restart()?;
        let rid = format!("sched-{id}-{slot}");
        wait_until(
            "the schedule to fire and be answered",
            Duration::from_secs(60),
            || {
                let c = home.json(&["conversations", "show", &conv])?;
                Ok(c["messages"].as_array().is_some_and(|m| {
                    m.iter()
                        .any(|m| m["request_id"] == rid.as_str() && m["status"] == "done")
                }))
            },
        )?;
        // Once: a few more scheduler ticks add nothing.
        std::thread::sleep(Duration::from_secs(3));
        let c = home.json(&["conversations", "show", &conv])?;
        let fired: Vec<&Value> = c["messages"]
            .as_array()
            .context("messages")?
            .iter()
            .filter(|m| {
                m["request_id"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("sched-"))
            })
            .collect();
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!(fired[0]["text"], "Remind the person to water the plants.");
        let s = home.json(&["schedule", "list"])?["schedules"][0].clone();
        assert_eq!(s["last_fired_slot"], slot);
        home.assert_no_panic()?;
        Ok(())
    });
}
