//! Schedules fired by the agent exactly once per slot, across an agent restart (SIGKILL) and a
//! role hand-over, with time moved by `IOM_CLOCK_OFFSET_SECS` instead of waiting minutes.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig};
use iom_tests::harness::{Node, runtime, scenario, wait_mesh, wait_until};
use serde_json::Value;

const OFFSET: &str = "IOM_CLOCK_OFFSET_SECS";

fn set_offset(n: &mut Node, secs: i64) {
    n.env.retain(|(k, _)| k != OFFSET);
    n.env.push((OFFSET.into(), secs.to_string()));
}

/// A started node that holds the agent role, with `env` (the fake Messages API's).
fn agent_node(name: &str, env: &[(&str, &str)]) -> Result<Node> {
    let mut n = Node::with_env(name, env)?;
    n.start()?;
    let me = n.device_id()?;
    n.cli(&["agent", "assign", &me])?;
    Ok(n)
}

/// Adds an every-minute schedule on `n`: its id, its conversation and its creation time.
fn add_minute_schedule(n: &Node) -> Result<(String, String, i64)> {
    let added = n.json(&["schedule", "add", "* * * * *", "minute report"])?;
    Ok((
        added["id"].as_str().context("no id")?.to_string(),
        added["conversation"]
            .as_str()
            .context("no conversation")?
            .to_string(),
        added["created_at"].as_i64().context("no created_at")?,
    ))
}

fn schedule(n: &Node, id: &str) -> Result<Value> {
    n.json(&["schedule", "list"])?["schedules"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["id"] == id).cloned())
        .context("schedule not listed")
}

/// `(request id, status)` of every scheduled request in the conversation, in order.
fn sched_requests(n: &Node, conv: &str) -> Result<Vec<(String, String)>> {
    let c = n.json(&["conversations", "show", conv])?;
    Ok(c["messages"]
        .as_array()
        .context("no messages")?
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| {
            (
                m["request_id"].as_str().unwrap_or("").to_string(),
                m["status"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect())
}

/// Each slot's request appears once, slots strictly increase, and all are scheduled requests.
fn assert_once_per_slot(reqs: &[(String, String)], id: &str) -> Result<Vec<i64>> {
    let prefix = format!("sched-{id}-");
    let mut slots = Vec::new();
    for (rid, _) in reqs {
        let slot: i64 = rid
            .strip_prefix(&prefix)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("unexpected request {rid}"))?;
        slots.push(slot);
    }
    let unique: BTreeSet<i64> = slots.iter().copied().collect();
    if unique.len() != slots.len() {
        bail!("a slot fired twice: {slots:?}");
    }
    if slots.windows(2).any(|w| w[0] >= w[1]) {
        bail!("slots out of order: {slots:?}");
    }
    if slots.iter().any(|s| s % 60 != 0) {
        bail!("a slot is not on a minute: {slots:?}");
    }
    Ok(slots)
}

/// Waits until the schedule's last fired slot is at least `min` (fired under `epoch`) and its
/// request is answered.
fn wait_fired(n: &Node, id: &str, conv: &str, min: i64, epoch: u64) -> Result<i64> {
    let mut last = 0;
    wait_until(
        "the schedule to fire and be answered",
        Duration::from_secs(60),
        || {
            let s = schedule(n, id)?;
            last = s["last_fired_slot"].as_i64().unwrap_or(0);
            if last < min || s["last_fired_epoch"].as_u64() != Some(epoch) {
                return Ok(false);
            }
            let rid = format!("sched-{id}-{last}");
            Ok(sched_requests(n, conv)?
                .iter()
                .any(|(r, st)| *r == rid && st == "done"))
        },
    )?;
    Ok(last)
}

#[test]
fn every_minute_fires_once_per_slot_across_restart_and_handover() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let env = fake.node_env();
        let mut a = agent_node("sched-a", &env)?;
        let (id, conv, created) = add_minute_schedule(&a)?;

        // Two minutes later: the agent was "down" for at least two slots. Only the most
        // recent one fires; the older ones are recorded as missed.
        a.stop()?;
        set_offset(&mut a, 120);
        a.start()?;
        let s1 = wait_fired(&a, &id, &conv, created + 61, 1)?;
        let view = schedule(&a, &id)?;
        assert!(view["missed_slots"].as_u64().unwrap_or(0) >= 1, "{view}");
        assert_eq!(view["last_fired_epoch"], 1);
        let before = assert_once_per_slot(&sched_requests(&a, &conv)?, &id)?;
        assert_eq!(before.last(), Some(&s1));

        // An agent crash (SIGKILL) and restart at the same time: the slot does not fire again.
        a.kill();
        a.start()?;
        std::thread::sleep(Duration::from_secs(4));
        let after = assert_once_per_slot(&sched_requests(&a, &conv)?, &id)?;
        // (A real minute boundary may pass meanwhile; then exactly one newer slot appears.)
        assert!(after.len() <= before.len() + 1, "{before:?} -> {after:?}");
        assert_eq!(&after[..before.len()], &before[..]);

        // One more minute: exactly the next slot fires.
        a.stop()?;
        set_offset(&mut a, 180);
        a.start()?;
        let s2 = wait_fired(&a, &id, &conv, s1 + 60, 1)?;

        // Hand-over: B joins and takes the role (epoch 2) with its clock a minute further; it
        // continues from the last slot A recorded.
        let mut b = Node::with_env("sched-b", &env)?;
        set_offset(&mut b, 240);
        b.start()?;
        let code = a.invite(false)?;
        b.cli(&["join", &code])?;
        wait_mesh(&[&a, &b], Duration::from_secs(30))?;
        let b_id = b.device_id()?;
        a.cli(&["agent", "assign", &b_id])?;
        let s3 = wait_fired(&b, &id, &conv, s2 + 60, 2)?;

        // The old agent restarts with the same clock as B, then both a minute further: both
        // see the same slots due, but only the role holder fires them.
        a.stop()?;
        set_offset(&mut a, 240);
        a.start()?;
        std::thread::sleep(Duration::from_secs(3));
        a.stop()?;
        set_offset(&mut a, 300);
        a.start()?;
        b.stop()?;
        set_offset(&mut b, 300);
        b.start()?;
        let s4 = wait_fired(&b, &id, &conv, s3 + 60, 2)?;
        wait_until("A to receive B's answers", Duration::from_secs(30), || {
            Ok(sched_requests(&a, &conv)? == sched_requests(&b, &conv)?)
        })?;
        let all = assert_once_per_slot(&sched_requests(&b, &conv)?, &id)?;
        for s in [s1, s2, s3, s4] {
            assert!(all.contains(&s), "slot {s} missing from {all:?}");
        }
        // Every slot the test waited for was answered. A slot that a real minute boundary
        // brought in while A was being stopped may have been interrupted by that stop: it is
        // then failed ("interrupted", never run twice), as designed.
        let reqs = sched_requests(&b, &conv)?;
        for (rid, st) in &reqs {
            let waited_for = [s1, s2, s3, s4]
                .iter()
                .any(|s| *rid == format!("sched-{id}-{s}"));
            assert!(
                st == "done" || (!waited_for && st == "failed"),
                "{rid} is {st}: {reqs:?}"
            );
        }
        // The answers came from the model: one model call per fired slot, no more.
        let calls = fake.requests().len();
        assert_eq!(calls, all.len(), "model calls {calls} for slots {all:?}");
        // A fired only while it held the role (epoch 1), never after the hand-over.
        let a_fired = a.log_text().matches("schedule fired").count();
        let b_fired = b.log_text().matches("schedule fired").count();
        assert_eq!(
            a_fired + b_fired,
            all.len(),
            "A fired {a_fired}, B {b_fired}: {all:?}"
        );
        assert!(b_fired >= 2, "B fired {b_fired}");
        a.assert_no_panic()?;
        b.assert_no_panic()
    });
}

/// A disabled schedule does not fire; enabled again, it fires from its next slot only: the
/// slots that passed while it was off neither fire nor count as missed.
#[test]
fn a_disabled_schedule_skips_its_slots_and_resumes_at_the_next_one() {
    scenario(|| {
        let rt = runtime()?;
        let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
        let env = fake.node_env();
        let mut a = agent_node("sched-off", &env)?;
        let (id, conv, _) = add_minute_schedule(&a)?;
        let off = a.json(&["schedule", "disable", &id])?;
        assert_eq!(off["enabled"], false, "{off}");
        // (A real minute boundary may have passed between add and disable.)
        let fired_before = sched_requests(&a, &conv)?.len();

        // Three minutes later, still disabled: nothing fires.
        a.stop()?;
        set_offset(&mut a, 180);
        a.start()?;
        std::thread::sleep(Duration::from_secs(4));
        assert_eq!(sched_requests(&a, &conv)?.len(), fired_before);
        assert_eq!(a.log_text().matches("schedule fired").count(), fired_before);

        // Enabled again: the slots it missed while off do not fire.
        let on = a.json(&["schedule", "enable", &id])?;
        assert_eq!(on["enabled"], true, "{on}");
        let enabled_at = on["enabled_at"].as_i64().context("no enabled_at")?;
        std::thread::sleep(Duration::from_secs(3));
        let reqs = assert_once_per_slot(&sched_requests(&a, &conv)?, &id)?;
        // Only a slot after `enabled_at` may have fired (a real minute boundary).
        assert!(
            reqs[fired_before..].iter().all(|s| *s > enabled_at),
            "fired {reqs:?}, enabled at {enabled_at}"
        );

        // A minute later: the next slot fires, and no slot is counted as missed.
        a.stop()?;
        set_offset(&mut a, 240);
        a.start()?;
        let slot = wait_fired(&a, &id, &conv, enabled_at + 1, 1)?;
        assert!(slot > enabled_at);
        let view = schedule(&a, &id)?;
        assert_eq!(view["missed_slots"], 0, "{view}");
        assert_once_per_slot(&sched_requests(&a, &conv)?, &id)?;
        // Unknown ids are a clear error.
        let (code, err) = a.fail(&["schedule", "disable", "nope"])?;
        assert_eq!(code, 1);
        assert!(err.contains("no schedule"), "{err}");
        a.assert_no_panic()
    });
}
