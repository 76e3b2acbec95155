//! The usage report of `iom usage`: tokens and cost per UTC day, asking device, model and
//! conversation, read from the conversation documents (so every device of the mesh can
//! show it). Each answer and each summary records its tokens, cost and model; an answer's
//! device is the device that asked, and a summary's the device whose request made it.

use std::collections::BTreeMap;

use iom_crdt::{DocId, MessageView, Role, SummaryView, UsageView};
use serde::Serialize;

use super::budget::civil_from_days;
use super::conversations::Conversations;
use super::cost;
use crate::docs::DocsError;

/// One recorded use: an answer or a summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The conversation.
    pub conversation: String,
    /// Its title.
    pub title: String,
    /// Unix seconds.
    pub at: i64,
    /// The asking device.
    pub device: String,
    /// The model (`unknown` if not recorded).
    pub model: String,
    /// Tokens and cost.
    pub usage: UsageView,
}

/// Totals of a group of entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Answers and summaries counted.
    pub answers: u64,
    /// Tokens by kind and the cost in nano-dollars (exact).
    #[serde(flatten)]
    pub usage: UsageView,
    /// Every token.
    pub tokens: u64,
    /// Cost in US dollars.
    pub cost_usd: f64,
}

impl Totals {
    fn add(&mut self, u: &UsageView) {
        self.answers += 1;
        self.usage.add(u);
        self.tokens = self.usage.total_tokens();
        self.cost_usd = cost::usd(self.usage.cost_nanos);
    }
}

/// A group's key and totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// The day (`YYYY-MM-DD`), device id, model or conversation id.
    pub key: String,
    /// A device's name or a conversation's title, if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The totals.
    #[serde(flatten)]
    pub totals: Totals,
}

/// The report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Days covered, today included.
    pub days: u32,
    /// The first day covered (`YYYY-MM-DD`, UTC).
    pub since: String,
    /// Everything in the period.
    pub total: Totals,
    /// Today (UTC).
    pub today: Totals,
    /// Per day, newest first.
    pub by_day: Vec<Row>,
    /// Per asking device, dearest first.
    pub by_device: Vec<Row>,
    /// Per model, dearest first.
    pub by_model: Vec<Row>,
    /// Per conversation, dearest first.
    pub by_conversation: Vec<Row>,
}

/// `YYYY-MM-DD` of a UTC day number.
pub fn date(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The answers and summaries of one conversation as entries.
pub fn entries(
    conversation: &str,
    title: &str,
    messages: &[MessageView],
    summaries: &[SummaryView],
) -> Vec<Entry> {
    let asker = |rid: &str| {
        messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User && m.request_id.as_deref() == Some(rid))
            .and_then(|m| m.device.clone())
    };
    let entry = |at: Option<i64>, device: Option<String>, model: Option<&String>, u| Entry {
        conversation: conversation.to_string(),
        title: title.to_string(),
        at: at.unwrap_or(0),
        device: device.unwrap_or_else(|| "unknown".into()),
        model: model.cloned().unwrap_or_else(|| "unknown".into()),
        usage: u,
    };
    let answers = messages
        .iter()
        .filter(|m| m.role == Role::Assistant)
        .filter_map(|m| {
            let u = m.usage?;
            let device = m.reply_to.as_deref().and_then(asker);
            Some(entry(m.created_at, device, m.model.as_ref(), u))
        });
    let summaries = summaries
        .iter()
        .map(|s| entry(s.created_at, s.device.clone(), s.model.as_ref(), s.usage));
    answers.chain(summaries).collect()
}

/// Folds `entries` into a report of the `days` UTC days up to the one of `now` (at least 1).
pub fn fold(
    entries: &[Entry],
    now: i64,
    days: u32,
    device_name: &dyn Fn(&str) -> Option<String>,
) -> Report {
    let days = days.max(1);
    let today = now.max(0) / 86_400;
    let first = today - i64::from(days) + 1;
    let mut total = Totals::default();
    let mut today_totals = Totals::default();
    let mut by_day: BTreeMap<i64, Totals> = BTreeMap::new();
    let mut by_device: BTreeMap<&str, Totals> = BTreeMap::new();
    let mut by_model: BTreeMap<&str, Totals> = BTreeMap::new();
    let mut by_conv: BTreeMap<&str, (Totals, &str)> = BTreeMap::new();
    for e in entries {
        let day = e.at.max(0) / 86_400;
        if day < first || day > today {
            continue;
        }
        total.add(&e.usage);
        if day == today {
            today_totals.add(&e.usage);
        }
        by_day.entry(day).or_default().add(&e.usage);
        by_device.entry(&e.device).or_default().add(&e.usage);
        by_model.entry(&e.model).or_default().add(&e.usage);
        by_conv
            .entry(&e.conversation)
            .or_insert_with(|| (Totals::default(), &e.title))
            .0
            .add(&e.usage);
    }
    let dearest = |mut rows: Vec<Row>| {
        rows.sort_by(|a, b| {
            (b.totals.usage.cost_nanos, b.totals.tokens)
                .cmp(&(a.totals.usage.cost_nanos, a.totals.tokens))
        });
        rows
    };
    Report {
        days,
        since: date(first),
        total,
        today: today_totals,
        by_day: by_day
            .into_iter()
            .rev()
            .map(|(d, totals)| Row {
                key: date(d),
                name: None,
                totals,
            })
            .collect(),
        by_device: dearest(
            by_device
                .into_iter()
                .map(|(d, totals)| Row {
                    key: d.to_string(),
                    name: device_name(d),
                    totals,
                })
                .collect(),
        ),
        by_model: dearest(
            by_model
                .into_iter()
                .map(|(m, totals)| Row {
                    key: m.to_string(),
                    name: None,
                    totals,
                })
                .collect(),
        ),
        by_conversation: dearest(
            by_conv
                .into_iter()
                .map(|(c, (totals, title))| Row {
                    key: c.to_string(),
                    name: Some(title.to_string()),
                    totals,
                })
                .collect(),
        ),
    }
}

/// Every answer and summary in the conversations stored here.
pub async fn collect(conversations: &Conversations) -> Result<Vec<Entry>, DocsError> {
    let mut out = Vec::new();
    for id in conversations.list()? {
        let got = conversations
            .read(id, move |c| {
                entries(&id.to_string(), &c.title(), &c.messages(), &c.summaries())
            })
            .await?;
        match got {
            Ok(mut e) => out.append(&mut e),
            Err(e) => tracing::debug!(conversation = %id, error = %e, "not read for usage"),
        }
    }
    Ok(out)
}

/// The usage of conversation `doc` (what the page shows beside it).
pub async fn of_conversation(
    conversations: &Conversations,
    doc: DocId,
) -> Result<Option<UsageView>, DocsError> {
    Ok(conversations.read(doc, |c| c.usage_totals()).await?.ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(conv: &str, at: i64, device: &str, model: &str, tokens: u64, nanos: u64) -> Entry {
        Entry {
            conversation: conv.into(),
            title: format!("title {conv}"),
            at,
            device: device.into(),
            model: model.into(),
            usage: UsageView {
                input_tokens: tokens,
                output_tokens: 1,
                cache_creation_input_tokens: 0,
                cache_read_input_tokens: 2,
                cost_nanos: nanos,
            },
        }
    }

    #[test]
    fn groups_by_day_device_model_and_conversation() {
        let day = 86_400;
        let now = 20_000 * day + 100;
        let entries = vec![
            e("c1", now - 10, "laptop", "claude-sonnet-4-5", 10, 1_000),
            e("c1", now - day, "phone", "claude-sonnet-4-5", 20, 2_000),
            e("c2", now - 2 * day, "phone", "local", 30, 0),
            e("c3", now - 9 * day, "phone", "local", 40, 0), // outside 7 days
        ];
        let names = |d: &str| (d == "phone").then(|| "Phone".to_string());
        let r = fold(&entries, now, 7, &names);
        assert_eq!(r.days, 7);
        assert_eq!(r.since, date(20_000 - 6));
        assert_eq!(r.total.answers, 3);
        assert_eq!(r.total.usage.input_tokens, 60);
        assert_eq!(r.total.tokens, 60 + 3 + 6);
        assert_eq!(r.total.usage.cost_nanos, 3_000);
        assert_eq!(r.today.answers, 1);
        assert_eq!(r.today.usage.cost_nanos, 1_000);
        assert_eq!(
            r.by_day.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(),
            [date(20_000), date(19_999), date(19_998)]
        );
        assert_eq!(r.by_device[0].key, "phone");
        assert_eq!(r.by_device[0].name.as_deref(), Some("Phone"));
        assert_eq!(r.by_device[0].totals.answers, 2);
        assert_eq!(r.by_model[0].key, "claude-sonnet-4-5");
        assert_eq!(r.by_model[1].totals.cost_usd, 0.0);
        assert_eq!(r.by_conversation[0].key, "c1");
        assert_eq!(r.by_conversation[0].name.as_deref(), Some("title c1"));
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(20_423), "2025-12-01");
        // One day only: today.
        assert_eq!(fold(&entries, now, 0, &names).total.answers, 1);
    }
}
