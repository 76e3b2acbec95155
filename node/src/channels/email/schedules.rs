//! Schedule results by mail (`iom schedule add … --to email`): each finished slot of a
//! schedule marked `to = "email"` is mailed once to the owner address (`email.owner`). The
//! answer's Message-ID joins the schedule's conversation, so a reply continues it.

use std::sync::Arc;
use std::time::Duration;

use iom_crdt::{DocId, Schedules, Status};
use tokio_util::sync::CancellationToken;

use super::state::{Job, answer_id};
use super::{EmailChannel, smtp};

/// How often the schedules are looked at.
const POLL: Duration = Duration::from_secs(2);

/// Watches the schedules until `cancel`.
pub(super) async fn watch(
    channel: Arc<EmailChannel>,
    sender: Arc<smtp::Sender>,
    cancel: CancellationToken,
) {
    let mut warned = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = cancel.cancelled() => return,
        }
        match due(&channel).await {
            Ok(jobs) if !jobs.is_empty() && channel.cfg.owner.is_none() => {
                if !warned {
                    channel.fail("a schedule delivers by email but email.owner is not set");
                    warned = true;
                }
            }
            Ok(jobs) => {
                for job in jobs {
                    if let Err(e) = channel.state.put_job(&job) {
                        channel.fail(format!("cannot record a schedule mail: {e}"));
                        continue;
                    }
                    if channel.state.flush().await.is_err() {
                        continue;
                    }
                    tracing::info!(request = %job.rid, to = %job.to, "email: mailing a schedule result");
                    channel.spawn_answer(job, sender.clone(), cancel.clone());
                }
            }
            Err(e) => tracing::debug!(error = %e, "email: cannot read the schedules"),
        }
    }
}

/// The finished schedule requests not mailed yet.
async fn due(channel: &EmailChannel) -> Result<Vec<Job>, String> {
    let docs = channel.asking.conversations().docs().clone();
    if docs
        .meta(DocId::SCHEDULES)
        .map_err(|e| e.to_string())?
        .is_none()
    {
        return Ok(Vec::new());
    }
    let list = docs
        .read(DocId::SCHEDULES, |d| {
            Schedules::open(d).map(|s| s.list()).unwrap_or_default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let owner = channel.cfg.owner.clone().unwrap_or_default();
    let mut jobs = Vec::new();
    for s in list
        .into_iter()
        .filter(|s| s.to.as_deref() == Some("email"))
    {
        let Some(conv) = s
            .conversation
            .as_ref()
            .and_then(|c| c.parse::<DocId>().ok())
        else {
            continue;
        };
        if !channel.asking.conversations().is_conversation(conv) {
            continue;
        }
        let prefix = format!("sched-{}-", s.id);
        let since = s.created_at.unwrap_or(0);
        let finished = channel
            .asking
            .conversations()
            .read(conv, move |c| {
                c.messages()
                    .into_iter()
                    .filter(|m| {
                        m.request_id
                            .as_deref()
                            .is_some_and(|r| r.starts_with(&prefix))
                            && matches!(m.status, Some(Status::Done | Status::Failed))
                            && m.created_at.unwrap_or(0) >= since
                    })
                    .map(|m| (m.request_id.unwrap_or_default(), m.text, m.created_at))
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        for (rid, prompt, created) in finished {
            if channel.state.was_sent(&rid).map_err(|e| e.to_string())?
                || channel
                    .state
                    .job(&rid)
                    .map_err(|e| e.to_string())?
                    .is_some()
            {
                continue;
            }
            let title: String = s.prompt.chars().take(60).collect();
            jobs.push(Job {
                answer_id: answer_id(&rid, channel.cfg.domain()),
                rid,
                conversation: conv.to_string(),
                prompt,
                to: owner.clone(),
                subject: format!("Scheduled: {title}"),
                in_reply_to: None,
                references: Vec::new(),
                received_at: created.and_then(|c| u64::try_from(c).ok()).unwrap_or(0),
                attempts: 0,
                last_error: None,
            });
        }
    }
    Ok(jobs)
}
