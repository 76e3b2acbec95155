//! The scheduler: fires each slot of each enabled schedule exactly once, on the device that
//! holds the agent role.
//!
//! Schedules live in the synced [`DocId::SCHEDULES`] document, so they can be added from any
//! device. Every node runs a [`Scheduler`], but it acts only while this device holds the agent
//! role. Its clock is a [`Clock`](crate::agent::clock::Clock): the wall clock in production,
//! moved by `config.clock_offset_secs` in tests (`IOM_CLOCK_OFFSET_SECS`); cron expressions
//! are read in UTC.
//!
//! Firing a slot is two steps, in this order:
//! 1. [`Schedules::mark_fired`] in the document (flushed before anything else happens). It only
//!    moves `last_fired_slot` forward, so a slot recorded by any epoch is never fired again; an
//!    agent whose epoch is older than the one recorded stands down; and a new agent after a
//!    hand-over continues from the last recorded slot.
//! 2. [`Asking::ask`] into the schedule's conversation with the request id `sched-{id}-{slot}`:
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
use iom_crdt::{
    DocId, DocumentError, Interface, PathError, ScheduleError, ScheduleView, Schedules,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::agent::ask::Asking;
use crate::agent::clock::SharedClock;
use crate::agent::conversations::{EditError, title_from};
use crate::agent::role::AgentRole;
use crate::docs::{Docs, DocsError, Origin};
use crate::identity::SharedIdentity;
use crate::trust::TrustBook;

/// How often the scheduler looks at the clock.
pub const TICK: Duration = Duration::from_secs(1);
/// Most slots counted when working out how many were missed.
const MAX_COUNTED: u64 = 100_000;

/// A cron expression that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "{expr:?} is not a cron expression ({source}); use five fields `MIN HOUR DAY MONTH WEEKDAY`, \
     e.g. \"*/5 * * * *\" or \"0 9 * * Mon-Fri\" (UTC)"
)]
pub struct CronError {
    /// The expression as given (trimmed).
    pub expr: String,
    /// What the parser said.
    pub source: cron::error::Error,
}

/// Parses a cron expression (UTC). Standard five-field expressions (`min hour dom month dow`)
/// are accepted, as are the `cron` crate's six or seven fields (with seconds, and years) and
/// `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
pub fn parse_cron(expr: &str) -> Result<cron::Schedule, CronError> {
    let expr = expr.trim();
    let fields = expr.split_whitespace().count();
    let full = if fields == 5 {
        format!("0 {expr}")
    } else {
        expr.to_string()
    };
    cron::Schedule::from_str(&full).map_err(|source| CronError {
        expr: expr.to_string(),
        source,
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

/// Why a scheduler tick failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TickError {
    /// A document could not be read or stored.
    #[error(transparent)]
    Docs(#[from] DocsError),
    /// The schedules document refused the change.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// An entry field could not be written.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A schedule's conversation could not be created.
    #[error(transparent)]
    Conversation(#[from] EditError),
}

impl From<DocumentError> for TickError {
    fn from(e: DocumentError) -> Self {
        TickError::Schedule(ScheduleError::Document(e))
    }
}

/// What a [`Scheduler`] is built from.
pub struct Deps {
    /// This device's keys.
    pub identity: SharedIdentity,
    /// Certificates (who holds the agent role).
    pub trust: Arc<TrustBook>,
    /// The scheduler's clock (slots, creation and edit times of schedules).
    pub clock: SharedClock,
    /// Where slots are asked (and the conversation documents).
    pub asking: Arc<Asking>,
}

#[derive(Debug, Default)]
struct State {
    /// `(schedule, slot)` whose request is known to be in its conversation.
    verified: HashSet<(String, i64)>,
    /// Schedules whose cron expression was already reported as unusable.
    warned: HashSet<String>,
}

/// The scheduler service.
pub struct Scheduler {
    docs: Docs,
    role: AgentRole,
    clock: SharedClock,
    asking: Arc<Asking>,
    state: tokio::sync::Mutex<State>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").finish_non_exhaustive()
    }
}

impl Scheduler {
    /// The scheduler over `deps`.
    pub fn new(deps: Deps) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            docs: deps.asking.conversations().docs().clone(),
            role: AgentRole::new(deps.identity, deps.trust),
            clock: deps.clock,
            asking: deps.asking,
            state: tokio::sync::Mutex::default(),
        })
    }

    /// The scheduler's time (unix seconds).
    pub fn now(&self) -> i64 {
        self.clock.now_secs()
    }

    /// Looks at the clock every [`TICK`] until `shutdown` is cancelled.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                () = shutdown.cancelled() => return,
            }
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "scheduler tick failed");
            }
        }
    }

    /// Creates the conversation a schedule posts into.
    pub async fn new_conversation(&self, prompt: &str) -> Result<DocId, EditError> {
        self.asking
            .conversations()
            .create(&title_from(&format!("⏰ {prompt}")))
            .await
    }

    /// Fires what is due now, if this device holds the agent role.
    pub async fn tick(&self) -> Result<(), TickError> {
        let Some(epoch) = self.role.my_epoch() else {
            return Ok(());
        };
        let mut state = self.state.lock().await;
        if self.docs.meta(DocId::SCHEDULES)?.is_none() {
            return Ok(());
        }
        let list = self
            .docs
            .read(DocId::SCHEDULES, |d| {
                Schedules::open(d).map(|s| s.list()).unwrap_or_default()
            })
            .await?;
        let now = self.now();
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
            let Some(conversation) = self.target(&view).await? else {
                continue;
            };
            self.recover(&view, conversation, epoch, &mut state).await;
            if let Some(d) = due(&view, &schedule, now) {
                self.fire(&view, conversation, d, epoch, &mut state).await?;
            }
        }
        Ok(())
    }

    /// The schedule's conversation if this device has it (it may still be on its way by
    /// sync). A schedule without one gets a conversation of its own, recorded in the entry.
    async fn target(&self, view: &ScheduleView) -> Result<Option<DocId>, TickError> {
        if let Some(c) = &view.conversation {
            let Ok(id) = c.parse::<DocId>() else {
                return Ok(None);
            };
            return Ok(self.docs.meta(id)?.map(|_| id));
        }
        if view.id.contains('.') {
            return Ok(None);
        }
        let id = self.new_conversation(&view.prompt).await?;
        let (sid, now) = (view.id.clone(), self.now());
        let path = format!("{}.{sid}.conversation", iom_crdt::schedules::FIELD_ENTRIES);
        self.docs
            .modify(DocId::SCHEDULES, Origin::Local, false, move |d| {
                Ok(d.put_json(
                    &path,
                    json!(id.to_string()),
                    &format!("schedule {sid}: conversation"),
                    now,
                ))
            })
            .await??;
        Ok(Some(id))
    }

    /// Re-asks the last slot recorded under this epoch if its request is missing (the agent
    /// stopped between marking the slot and asking).
    async fn recover(
        &self,
        view: &ScheduleView,
        conversation: DocId,
        epoch: u64,
        state: &mut State,
    ) {
        let Some(slot) = view.last_fired_slot else {
            return;
        };
        if view.last_fired_epoch != Some(epoch) || state.verified.contains(&(view.id.clone(), slot))
        {
            return;
        }
        let r = request_id(&view.id, slot);
        let present = self
            .asking
            .conversations()
            .read(conversation, move |c| c.find_request(&r).is_some())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        if present {
            state.verified.insert((view.id.clone(), slot));
        } else {
            tracing::info!(schedule = %view.id, slot, "re-asking a slot whose request is missing");
            self.ask_slot(view, conversation, slot, state).await;
        }
    }

    /// Asks a slot's prompt (with the slot's request id, so asking twice is harmless) and
    /// records the slot as verified once the request is in the conversation.
    async fn ask_slot(
        &self,
        view: &ScheduleView,
        conversation: DocId,
        slot: i64,
        state: &mut State,
    ) {
        let rid = request_id(&view.id, slot);
        match self
            .asking
            .ask_model(
                &view.prompt,
                Some(conversation),
                Interface::Schedule,
                Some(rid),
                &[],
                view.model.as_deref(),
            )
            .await
        {
            Ok(_) => {
                state.verified.insert((view.id.clone(), slot));
            }
            Err(e) => tracing::warn!(schedule = %view.id, slot, error = %e, "cannot ask"),
        }
    }

    async fn fire(
        &self,
        view: &ScheduleView,
        conversation: DocId,
        d: Due,
        epoch: u64,
        state: &mut State,
    ) -> Result<(), TickError> {
        let id = view.id.clone();
        let now = self.now();
        let marked = self
            .docs
            .modify(DocId::SCHEDULES, Origin::Local, false, move |doc| {
                Ok(mark(doc, &id, d, epoch, now))
            })
            .await??;
        let (marked, missed) = marked;
        if !marked {
            return Ok(());
        }
        if missed > 0 {
            tracing::info!(schedule = %view.id, slot = d.slot, missed, "skipped missed slots (policy: fire only the most recent)");
        }
        tracing::info!(schedule = %view.id, slot = d.slot, epoch, "schedule fired");
        self.ask_slot(view, conversation, d.slot, state).await;
        Ok(())
    }
}

/// Records slot `d` of schedule `id` as fired by `epoch` (and the missed slots); returns
/// whether it was marked and how many slots were skipped.
fn mark(
    doc: &mut iom_crdt::Document,
    id: &str,
    d: Due,
    epoch: u64,
    now: i64,
) -> Result<(bool, u64), TickError> {
    let mut s = Schedules::open(&mut *doc)?;
    let Some(current) = s.get(id) else {
        return Ok((false, 0));
    };
    if !current.enabled || current.last_fired_epoch.is_some_and(|e| e > epoch) {
        return Ok((false, 0));
    }
    let marked = s.mark_fired(id, d.slot, epoch, now)?;
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
        )?;
    }
    doc.put_json(
        &format!("{entries}.{id}.missed_slots"),
        json!(total),
        &format!("schedule {id}: {} missed slot(s) skipped", d.missed),
        now,
    )?;
    Ok((true, d.missed))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use iom_crdt::{DocKind, Status};

    use super::*;
    use crate::agent::testkit::{Mesh, asking};

    /// 2023-11-14 22:13:20 UTC is the mesh clock's start; 22:14:00 is the next minute.
    const START: i64 = 1_700_000_000;
    const NEXT_MINUTE: i64 = 1_700_000_040;

    struct Rig {
        mesh: Mesh,
        scheduler: Arc<Scheduler>,
        asking: Arc<Asking>,
    }

    async fn rig() -> Rig {
        let mesh = Mesh::new().await;
        let (asking, _, _) = asking(&mesh, &mesh.admin);
        let scheduler = Scheduler::new(Deps {
            identity: mesh.admin.clone(),
            trust: mesh.trust.clone(),
            clock: mesh.clock.clone(),
            asking: asking.clone(),
        });
        Rig {
            mesh,
            scheduler,
            asking,
        }
    }

    impl Rig {
        /// Adds schedule `id` (created now), posting into `conversation` if given.
        async fn add(&self, id: &str, cron: &str, conversation: Option<DocId>) {
            self.mesh.docs.create(DocKind::Schedules).await.unwrap();
            let (id, cron, now) = (id.to_string(), cron.to_string(), self.scheduler.now());
            self.mesh
                .docs
                .modify(DocId::SCHEDULES, Origin::Local, false, move |d| {
                    let conv = conversation.map(|c| c.to_string());
                    Schedules::open(&mut *d)?
                        .add(&id, &cron, "check the news", conv.as_deref(), now)
                        .unwrap();
                    Ok(())
                })
                .await
                .unwrap();
        }

        async fn view(&self, id: &str) -> (ScheduleView, serde_json::Value) {
            let id = id.to_string();
            self.mesh
                .docs
                .read(DocId::SCHEDULES, move |d| {
                    let raw = d.to_json()[iom_crdt::schedules::FIELD_ENTRIES][&id].clone();
                    (Schedules::open(d).unwrap().get(&id).unwrap(), raw)
                })
                .await
                .unwrap()
        }

        async fn requests(&self, doc: DocId) -> Vec<String> {
            self.asking
                .conversations()
                .read(doc, |c| {
                    c.requests()
                        .into_iter()
                        .filter_map(|m| m.request_id)
                        .collect()
                })
                .await
                .unwrap()
                .unwrap()
        }

        async fn set_enabled(&self, id: &str, enabled: bool) {
            let (id, now) = (id.to_string(), self.scheduler.now());
            self.mesh
                .docs
                .modify(DocId::SCHEDULES, Origin::Local, false, move |d| {
                    Schedules::open(&mut *d)?
                        .set_enabled(&id, enabled, now)
                        .unwrap();
                    Ok(())
                })
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn nothing_fires_without_the_agent_role() {
        let rig = rig().await;
        let conv = rig.asking.new_conversation("t").await.unwrap();
        rig.add("s1", "* * * * *", Some(conv)).await;
        rig.mesh.clock.set(NEXT_MINUTE + 5);
        rig.scheduler.tick().await.unwrap();
        assert!(rig.requests(conv).await.is_empty());
        assert_eq!(rig.view("s1").await.0.last_fired_slot, None);
        // Another device holds the role: still nothing here.
        let other = rig.mesh.add_device(false).await;
        rig.mesh.make_agent(&other).await;
        rig.scheduler.tick().await.unwrap();
        assert!(rig.requests(conv).await.is_empty());
    }

    #[tokio::test]
    async fn a_due_slot_fires_exactly_once() {
        let rig = rig().await;
        let epoch = rig.mesh.make_agent(&rig.mesh.admin).await;
        let conv = rig.asking.new_conversation("t").await.unwrap();
        rig.add("s1", "* * * * *", Some(conv)).await;
        // Before the first slot after creation: nothing.
        rig.scheduler.tick().await.unwrap();
        assert!(rig.requests(conv).await.is_empty());
        rig.mesh.clock.set(NEXT_MINUTE + 5);
        rig.scheduler.tick().await.unwrap();
        rig.scheduler.tick().await.unwrap();
        assert_eq!(
            rig.requests(conv).await,
            vec![request_id("s1", NEXT_MINUTE)]
        );
        let (v, raw) = rig.view("s1").await;
        assert_eq!(v.last_fired_slot, Some(NEXT_MINUTE));
        assert_eq!(v.last_fired_epoch, Some(epoch));
        assert_eq!(raw["missed_slots"], serde_json::Value::Null);
        let req = rig
            .asking
            .conversations()
            .read(conv, |c| c.requests().remove(0))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(req.interface, Some(Interface::Schedule));
        assert_eq!(req.text, "check the news");
        assert_eq!(req.status, Some(Status::Pending));
        // The next minute fires the next slot.
        rig.mesh.clock.advance(60);
        rig.scheduler.tick().await.unwrap();
        assert_eq!(rig.requests(conv).await.len(), 2);
    }

    #[tokio::test]
    async fn after_a_gap_only_the_latest_slot_fires_and_the_rest_are_counted() {
        let rig = rig().await;
        rig.mesh.make_agent(&rig.mesh.admin).await;
        let conv = rig.asking.new_conversation("t").await.unwrap();
        rig.add("s1", "* * * * *", Some(conv)).await;
        rig.mesh.clock.set(NEXT_MINUTE + 4 * 60 + 30);
        rig.scheduler.tick().await.unwrap();
        let latest = NEXT_MINUTE + 4 * 60;
        assert_eq!(rig.requests(conv).await, vec![request_id("s1", latest)]);
        let (v, raw) = rig.view("s1").await;
        assert_eq!(v.last_fired_slot, Some(latest));
        assert_eq!(raw["missed_slots"], 4);
        assert_eq!(raw["last_missed_slot"], latest - 60);
        // Another gap adds to the count.
        rig.mesh.clock.advance(3 * 60);
        rig.scheduler.tick().await.unwrap();
        assert_eq!(rig.view("s1").await.1["missed_slots"], 6);
        assert_eq!(rig.requests(conv).await.len(), 2);
    }

    #[tokio::test]
    async fn a_disabled_schedule_does_not_fire_nor_count_missed_slots() {
        let rig = rig().await;
        rig.mesh.make_agent(&rig.mesh.admin).await;
        let conv = rig.asking.new_conversation("t").await.unwrap();
        rig.add("s1", "* * * * *", Some(conv)).await;
        rig.set_enabled("s1", false).await;
        rig.mesh.clock.set(NEXT_MINUTE + 10 * 60);
        rig.scheduler.tick().await.unwrap();
        assert!(rig.requests(conv).await.is_empty());
        // Enabled again: the slots while it was off are neither fired nor counted.
        rig.set_enabled("s1", true).await;
        rig.scheduler.tick().await.unwrap();
        assert!(rig.requests(conv).await.is_empty());
        rig.mesh.clock.advance(60);
        rig.scheduler.tick().await.unwrap();
        assert_eq!(rig.requests(conv).await.len(), 1);
        assert_eq!(
            rig.view("s1").await.1["missed_slots"],
            serde_json::Value::Null
        );
    }

    #[tokio::test]
    async fn a_schedule_without_a_conversation_gets_one() {
        let rig = rig().await;
        rig.mesh.make_agent(&rig.mesh.admin).await;
        rig.add("s1", "* * * * *", None).await;
        rig.scheduler.tick().await.unwrap();
        let (v, _) = rig.view("s1").await;
        let conv: DocId = v.conversation.unwrap().parse().unwrap();
        let title = rig
            .asking
            .conversations()
            .read(conv, |c| c.title())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(title, "⏰ check the news");
        rig.mesh.clock.set(NEXT_MINUTE + 1);
        rig.scheduler.tick().await.unwrap();
        assert_eq!(rig.requests(conv).await.len(), 1);
        // The same conversation is used from then on.
        assert_eq!(rig.view("s1").await.0.conversation, Some(conv.to_string()));
    }

    #[tokio::test]
    async fn a_slot_marked_but_not_asked_is_asked_again() {
        let rig = rig().await;
        let epoch = rig.mesh.make_agent(&rig.mesh.admin).await;
        let conv = rig.asking.new_conversation("t").await.unwrap();
        rig.add("s1", "* * * * *", Some(conv)).await;
        // The agent stopped between marking the slot and asking.
        rig.mesh
            .docs
            .modify(DocId::SCHEDULES, Origin::Local, false, move |d| {
                Schedules::open(&mut *d)?
                    .mark_fired("s1", NEXT_MINUTE, epoch, START)
                    .unwrap();
                Ok(())
            })
            .await
            .unwrap();
        rig.mesh.clock.set(NEXT_MINUTE + 10);
        rig.scheduler.tick().await.unwrap();
        rig.scheduler.tick().await.unwrap();
        assert_eq!(
            rig.requests(conv).await,
            vec![request_id("s1", NEXT_MINUTE)]
        );
    }

    #[tokio::test]
    async fn an_older_epoch_stands_down() {
        let rig = rig().await;
        let conv = rig.asking.new_conversation("t").await.unwrap();
        rig.add("s1", "* * * * *", Some(conv)).await;
        let mine = rig.mesh.make_agent(&rig.mesh.admin).await;
        // A later holder recorded a slot under a higher epoch (seen here by sync).
        rig.mesh
            .docs
            .modify(DocId::SCHEDULES, Origin::Local, false, move |d| {
                Schedules::open(&mut *d)?
                    .mark_fired("s1", START - 20, mine + 1, START)
                    .unwrap();
                Ok(())
            })
            .await
            .unwrap();
        rig.mesh.clock.set(NEXT_MINUTE + 5);
        rig.scheduler.tick().await.unwrap();
        assert!(rig.requests(conv).await.is_empty());
        assert_eq!(rig.view("s1").await.0.last_fired_epoch, Some(mine + 1));
    }

    #[tokio::test]
    async fn an_unusable_cron_expression_skips_only_its_schedule() {
        let rig = rig().await;
        rig.mesh.make_agent(&rig.mesh.admin).await;
        let conv = rig.asking.new_conversation("t").await.unwrap();
        rig.add("bad", "every minute", Some(conv)).await;
        rig.add("good", "* * * * *", Some(conv)).await;
        rig.mesh.clock.set(NEXT_MINUTE + 5);
        rig.scheduler.tick().await.unwrap();
        assert_eq!(
            rig.requests(conv).await,
            vec![request_id("good", NEXT_MINUTE)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_ticks_until_cancelled() {
        let rig = rig().await;
        rig.mesh.make_agent(&rig.mesh.admin).await;
        let conv = rig.asking.new_conversation("t").await.unwrap();
        rig.add("s1", "* * * * *", Some(conv)).await;
        rig.mesh.clock.set(NEXT_MINUTE + 5);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(rig.scheduler.clone().run(cancel.clone()));
        for _ in 0..50 {
            if !rig.requests(conv).await.is_empty() {
                break;
            }
            tokio::time::sleep(TICK).await;
        }
        assert_eq!(rig.requests(conv).await.len(), 1);
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn no_schedules_document_is_not_an_error() {
        let rig = rig().await;
        rig.mesh.make_agent(&rig.mesh.admin).await;
        rig.scheduler.tick().await.unwrap();
        assert!(rig.mesh.docs.meta(DocId::SCHEDULES).unwrap().is_none());
    }

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
            to: None,
            model: None,
        }
    }

    #[test]
    fn parses_five_and_six_fields() {
        assert!(parse_cron("* * * * *").is_ok());
        assert!(parse_cron("0 9 * * Mon-Fri").is_ok());
        assert!(parse_cron("30 0 9 * * *").is_ok());
        assert!(parse_cron("@daily").is_ok());
        let e = parse_cron("every minute").unwrap_err().to_string();
        assert!(e.contains("five fields"), "{e}");
        assert!(
            e.starts_with("\"every minute\" is not a cron expression ("),
            "{e}"
        );
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
