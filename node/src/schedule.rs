//! The scheduler: fires each slot of each enabled schedule exactly once, on the device that
//! holds the agent role.
//!
//! Schedules live in the synced [`DocId::SCHEDULES`] document, so they can be added from any
//! device. Every node runs this loop, but it acts only while [`role::my_epoch`] is `Some`.
//! The clock is the wall clock plus `config.clock_offset_secs` (tests move time with
//! `IOM_CLOCK_OFFSET_SECS`); cron expressions are read in UTC.
//!
//! Firing a slot is two steps, in this order:
//! 1. [`Schedules::mark_fired`] in the document (flushed before anything else happens). It only
//!    moves `last_fired_slot` forward, so a slot recorded by any epoch is never fired again; an
//!    agent whose epoch is older than the one recorded stands down; and a new agent after a
//!    hand-over continues from the last recorded slot.
//! 2. [`ask::ask`] into the schedule's conversation with the request id `sched-{id}-{slot}`:
//!    the deterministic id makes a second request for the same slot impossible (requests are
//!    deduplicated by id). If the agent stops between the two steps, it re-asks the recorded
//!    slot when it starts again (same epoch), which the id makes harmless.
//!
//! **Missed slots.** When the agent was down (or no device held the role) for several slots,
//! only the most recent missed slot fires, once, as soon as the agent runs again; older ones
//! are skipped. The number skipped is added to the entry's `missed_slots` and the newest
//! skipped slot is kept in `last_missed_slot`. A new schedule never fires for slots before it
//! was created. See `docs/schedules.md`.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use iom_crdt::{Conversation, DocId, Interface, ScheduleView, Schedules};
use serde_json::json;

use crate::agent::{ask, role};
use crate::docs::{DocsError, Origin};
use crate::node::NodeCtx;

/// How often the scheduler looks at the clock.
pub const TICK: Duration = Duration::from_secs(1);
/// Most slots counted when working out how many were missed.
const MAX_COUNTED: u64 = 100_000;

/// Parses a cron expression (UTC). Standard five-field expressions (`min hour dom month dow`)
/// are accepted, as are the `cron` crate's six or seven fields (with seconds, and years) and
/// `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
pub fn parse_cron(expr: &str) -> Result<cron::Schedule, String> {
    let expr = expr.trim();
    let fields = expr.split_whitespace().count();
    let full = if fields == 5 {
        format!("0 {expr}")
    } else {
        expr.to_string()
    };
    cron::Schedule::from_str(&full).map_err(|e| {
        format!(
            "{expr:?} is not a cron expression ({e}); use five fields `MIN HOUR DAY MONTH WEEKDAY`, \
             e.g. \"*/5 * * * *\" or \"0 9 * * Mon-Fri\" (UTC)"
        )
    })
}

fn utc(secs: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(secs, 0)
}

/// The latest slot at or before `now` (unix seconds).
pub fn latest_slot(schedule: &cron::Schedule, now: i64) -> Option<i64> {
    let after = utc(now.checked_add(1)?)?;
    schedule.after(&after).next_back().map(|t| t.timestamp())
}

/// The next slot after `now`.
pub fn next_slot(schedule: &cron::Schedule, now: i64) -> Option<i64> {
    schedule.after(&utc(now)?).next().map(|t| t.timestamp())
}

/// A slot to fire now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// The slot (unix seconds) to fire.
    pub slot: i64,
    /// Older slots since the last firing that are skipped.
    pub missed: u64,
    /// The newest skipped slot.
    pub last_missed: Option<i64>,
}

/// What to fire for a schedule at `now`: the most recent slot after the last fired one (or
/// after creation, or after it was last enabled again), with the count of older ones skipped.
/// Slots that passed while the schedule was disabled are neither fired nor counted.
pub fn due(view: &ScheduleView, schedule: &cron::Schedule, now: i64) -> Option<Due> {
    if !view.enabled {
        return None;
    }
    let floor = view.last_fired_slot.or(view.created_at)?;
    let floor = view.enabled_at.map_or(floor, |e| floor.max(e));
    let slot = latest_slot(schedule, now)?;
    if slot <= floor {
        return None;
    }
    let (mut missed, mut last_missed) = (0u64, None);
    for t in schedule
        .after(&utc(floor)?)
        .take_while(|t| t.timestamp() < slot)
        .take(MAX_COUNTED as usize)
    {
        missed += 1;
        last_missed = Some(t.timestamp());
    }
    Some(Due {
        slot,
        missed,
        last_missed,
    })
}

/// The request id of a schedule's slot.
pub fn request_id(schedule: &str, slot: i64) -> String {
    format!("sched-{schedule}-{slot}")
}

/// The scheduler's clock: wall clock plus the configured offset.
pub fn now(ctx: &NodeCtx) -> i64 {
    crate::time::now_secs() as i64 + ctx.config.clock_offset_secs
}

/// Starts the scheduler loop.
pub fn spawn(ctx: Arc<NodeCtx>) {
    let mut shutdown = ctx.shutdown.clone();
    tokio::spawn(async move {
        let mut state = State::default();
        loop {
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            if let Some(epoch) = role::my_epoch(&ctx)
                && let Err(e) = tick(&ctx, epoch, &mut state).await
            {
                tracing::warn!(error = %e, "scheduler tick failed");
            }
        }
    });
}

#[derive(Default)]
struct State {
    /// `(schedule, slot)` whose request is known to be in its conversation.
    verified: HashSet<(String, i64)>,
    /// Schedules whose cron expression was already reported as unusable.
    warned: HashSet<String>,
}

async fn tick(ctx: &Arc<NodeCtx>, epoch: u64, state: &mut State) -> Result<(), DocsError> {
    if ctx.docs.meta(DocId::SCHEDULES)?.is_none() {
        return Ok(());
    }
    let list = ctx
        .docs
        .read(DocId::SCHEDULES, |d| {
            Schedules::open(d).map(|s| s.list()).unwrap_or_default()
        })
        .await?;
    let now = now(ctx);
    for view in list {
        let schedule = match parse_cron(&view.cron) {
            Ok(s) => s,
            Err(e) => {
                if state.warned.insert(view.id.clone()) {
                    tracing::warn!(schedule = %view.id, error = %e, "schedule skipped");
                }
                continue;
            }
        };
        let Some(conversation) = target(ctx, &view).await? else {
            continue;
        };
        recover(ctx, &view, conversation, epoch, state).await;
        if let Some(d) = due(&view, &schedule, now) {
            fire(ctx, &view, conversation, d, epoch, state).await?;
        }
    }
    Ok(())
}

/// The schedule's conversation if this device has it (it may still be on its way by sync). A
/// schedule without one gets a conversation of its own, recorded in the entry.
async fn target(ctx: &Arc<NodeCtx>, view: &ScheduleView) -> Result<Option<DocId>, DocsError> {
    if let Some(c) = &view.conversation {
        let Ok(id) = c.parse::<DocId>() else {
            return Ok(None);
        };
        return Ok(ctx.docs.meta(id)?.map(|_| id));
    }
    if view.id.contains('.') {
        return Ok(None);
    }
    let id = new_conversation(ctx, &view.prompt).await?;
    let (sid, now) = (view.id.clone(), crate::time::now_secs() as i64);
    let path = format!("{}.{sid}.conversation", iom_crdt::schedules::FIELD_ENTRIES);
    ctx.docs
        .modify(DocId::SCHEDULES, Origin::Local, false, move |d| {
            d.put_json(
                &path,
                json!(id.to_string()),
                &format!("schedule {sid}: conversation"),
                now,
            )
            .map_err(DocsError::from)
        })
        .await?;
    Ok(Some(id))
}

/// Creates the conversation a schedule posts into.
pub async fn new_conversation(ctx: &NodeCtx, prompt: &str) -> Result<DocId, DocsError> {
    crate::agent::ask::new_conversation(ctx, &format!("⏰ {prompt}")).await
}

/// Re-asks the last slot recorded under this epoch if its request is missing (the agent
/// stopped between marking the slot and asking).
async fn recover(
    ctx: &Arc<NodeCtx>,
    view: &ScheduleView,
    conversation: DocId,
    epoch: u64,
    state: &mut State,
) {
    let Some(slot) = view.last_fired_slot else {
        return;
    };
    if view.last_fired_epoch != Some(epoch) || state.verified.contains(&(view.id.clone(), slot)) {
        return;
    }
    let rid = request_id(&view.id, slot);
    let r = rid.clone();
    let present = ctx
        .docs
        .read(conversation, move |d| {
            Conversation::open(d).is_ok_and(|c| c.find_request(&r).is_some())
        })
        .await
        .unwrap_or(false);
    if present {
        state.verified.insert((view.id.clone(), slot));
    } else {
        tracing::info!(schedule = %view.id, slot, "re-asking a slot whose request is missing");
        ask_slot(ctx, view, conversation, slot, state).await;
    }
}

/// Asks a slot's prompt (with the slot's request id, so asking twice is harmless) and records
/// the slot as verified once the request is in the conversation.
async fn ask_slot(
    ctx: &Arc<NodeCtx>,
    view: &ScheduleView,
    conversation: DocId,
    slot: i64,
    state: &mut State,
) {
    let rid = request_id(&view.id, slot);
    match ask::ask(
        ctx,
        &view.prompt,
        Some(conversation),
        Interface::Schedule,
        Some(rid),
    )
    .await
    {
        Ok(_) => {
            state.verified.insert((view.id.clone(), slot));
        }
        Err(e) => tracing::warn!(schedule = %view.id, slot, error = %e.message, "cannot ask"),
    }
}

async fn fire(
    ctx: &Arc<NodeCtx>,
    view: &ScheduleView,
    conversation: DocId,
    d: Due,
    epoch: u64,
    state: &mut State,
) -> Result<(), DocsError> {
    let id = view.id.clone();
    let now = crate::time::now_secs() as i64;
    let marked = ctx
        .docs
        .modify(DocId::SCHEDULES, Origin::Local, false, move |doc| {
            let mut s = Schedules::open(&mut *doc)?;
            let Some(current) = s.get(&id) else {
                return Ok((false, 0));
            };
            if !current.enabled || current.last_fired_epoch.is_some_and(|e| e > epoch) {
                return Ok((false, 0));
            }
            let marked = s
                .mark_fired(&id, d.slot, epoch, now)
                .map_err(DocsError::from)?;
            if !marked || d.missed == 0 || id.contains('.') {
                return Ok((marked, 0));
            }
            let entries = iom_crdt::schedules::FIELD_ENTRIES;
            let total = doc
                .get_json(&format!("{entries}.{id}.missed_slots"))
                .ok()
                .flatten()
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
                + d.missed;
            if let Some(last) = d.last_missed {
                doc.put_json(
                    &format!("{entries}.{id}.last_missed_slot"),
                    json!(last),
                    &format!("schedule {id}: last missed slot"),
                    now,
                )
                .map_err(DocsError::from)?;
            }
            doc.put_json(
                &format!("{entries}.{id}.missed_slots"),
                json!(total),
                &format!("schedule {id}: {} missed slot(s) skipped", d.missed),
                now,
            )
            .map_err(DocsError::from)?;
            Ok((true, d.missed))
        })
        .await?;
    let (marked, missed) = marked;
    if !marked {
        return Ok(());
    }
    if missed > 0 {
        tracing::info!(schedule = %view.id, slot = d.slot, missed, "skipped missed slots (policy: fire only the most recent)");
    }
    tracing::info!(schedule = %view.id, slot = d.slot, epoch, "schedule fired");
    ask_slot(ctx, view, conversation, d.slot, state).await;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn view(created: i64, last: Option<i64>) -> ScheduleView {
        ScheduleView {
            id: "s1".into(),
            cron: "* * * * *".into(),
            prompt: "p".into(),
            conversation: None,
            enabled: true,
            last_fired_slot: last,
            last_fired_epoch: last.map(|_| 1),
            created_at: Some(created),
            enabled_at: None,
        }
    }

    #[test]
    fn parses_five_and_six_fields() {
        assert!(parse_cron("* * * * *").is_ok());
        assert!(parse_cron("0 9 * * Mon-Fri").is_ok());
        assert!(parse_cron("30 0 9 * * *").is_ok());
        assert!(parse_cron("@daily").is_ok());
        let e = parse_cron("every minute").unwrap_err();
        assert!(e.contains("five fields"), "{e}");
    }

    #[test]
    fn latest_and_next_slots() {
        let s = parse_cron("* * * * *").unwrap();
        assert_eq!(latest_slot(&s, 600), Some(600));
        assert_eq!(latest_slot(&s, 659), Some(600));
        assert_eq!(next_slot(&s, 600), Some(660));
        assert_eq!(next_slot(&s, 601), Some(660));
    }

    #[test]
    fn due_fires_most_recent_slot_once() {
        let s = parse_cron("* * * * *").unwrap();
        // Created at 10:30 past; nothing due before the first slot.
        assert_eq!(due(&view(630, None), &s, 650), None);
        assert_eq!(
            due(&view(630, None), &s, 665),
            Some(Due {
                slot: 660,
                missed: 0,
                last_missed: None
            })
        );
        // Already fired: nothing until the next slot.
        assert_eq!(due(&view(630, Some(660)), &s, 719), None);
        // Down for three slots: the newest fires, two are skipped.
        assert_eq!(
            due(&view(630, Some(660)), &s, 905),
            Some(Due {
                slot: 900,
                missed: 3,
                last_missed: Some(840)
            })
        );
        let mut off = view(630, None);
        off.enabled = false;
        assert_eq!(due(&off, &s, 10_000), None);
        // Enabled again at 9,990 after being off since 660: the slots in between neither fire
        // nor count as missed; the next one does.
        let mut back = view(630, Some(660));
        back.enabled_at = Some(9_990);
        assert_eq!(due(&back, &s, 9_995), None);
        assert_eq!(
            due(&back, &s, 10_025),
            Some(Due {
                slot: 10_020,
                missed: 0,
                last_missed: None
            })
        );
    }
}
