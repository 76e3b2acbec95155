//! The progress of a running request as the agent writes it into the conversation document
//! (the request's `progress` field, see [`iom_crdt::progress`]), so that every device can
//! stream it.
//!
//! The runner folds each model event into a [`ProgressLog`]: what the document shows so far
//! ([`ProgressLog::shown`]) and the updates not yet written ([`ProgressLog::take_pending`]).
//! The writer appends only those, so a run adds each byte it shows to the history once.

use super::claude::Progress;
use super::runner::truncate;

pub use iom_crdt::progress::{
    ProgressUpdate, ProgressView as RunProgress, ToolProgressView as ToolProgress,
};

/// Most bytes of a tool's output shown in progress (the stored answer keeps more).
pub const PROGRESS_OUTPUT_MAX: usize = 4096;

/// The update that shows model event `p`.
pub fn update_of(p: Progress) -> ProgressUpdate {
    match p {
        Progress::TextDelta(t) => ProgressUpdate::Text(t),
        Progress::ToolCallStarted { id, name, input } => ProgressUpdate::ToolStarted {
            id,
            name,
            input: input.to_string(),
        },
        Progress::ToolCallFinished {
            id,
            output,
            is_error,
            ..
        } => ProgressUpdate::ToolFinished {
            id,
            output: truncate(&output, PROGRESS_OUTPUT_MAX),
            is_error,
        },
        Progress::Retrying {
            attempt,
            wait,
            reason,
        } => ProgressUpdate::Retry(format!(
            "model API busy ({reason}); retry {attempt} in {:.1} s",
            wait.as_secs_f64()
        )),
        Progress::TurnFinished { turn, .. } => ProgressUpdate::TurnFinished(turn),
    }
}

/// What a run has shown, and what of it is not written to the document yet.
#[derive(Debug, Default)]
pub struct ProgressLog {
    shown: RunProgress,
    pending: Vec<ProgressUpdate>,
}

impl ProgressLog {
    /// Folds in one model event.
    pub fn push(&mut self, p: Progress) {
        let u = update_of(p);
        self.shown.apply(&u);
        // Text pieces between two writes become one splice.
        if let (ProgressUpdate::Text(more), Some(ProgressUpdate::Text(last))) =
            (&u, self.pending.last_mut())
        {
            last.push_str(more);
            return;
        }
        self.pending.push(u);
    }

    /// Everything shown so far.
    pub fn shown(&self) -> &RunProgress {
        &self.shown
    }

    /// The updates to write now (oldest first); the log forgets them.
    pub fn take_pending(&mut self) -> Vec<ProgressUpdate> {
        std::mem::take(&mut self.pending)
    }

    /// Puts back updates whose write failed, ahead of any that came since.
    pub fn put_back(&mut self, mut updates: Vec<ProgressUpdate>) {
        updates.append(&mut self.pending);
        self.pending = updates;
    }
}

/// Folds one progress event into what the document shows.
pub fn apply_progress(g: &mut RunProgress, p: Progress) {
    g.apply(&update_of(p));
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn text_between_writes_is_one_splice_and_failed_writes_come_back_first() {
        let mut log = ProgressLog::default();
        log.push(Progress::TextDelta("Hel".into()));
        log.push(Progress::TextDelta("lo".into()));
        log.push(Progress::ToolCallStarted {
            id: "t1".into(),
            name: "bash".into(),
            input: serde_json::json!({"command": "ls"}),
        });
        log.push(Progress::TextDelta(" again".into()));
        let first = log.take_pending();
        assert_eq!(
            first,
            vec![
                ProgressUpdate::Text("Hello".into()),
                ProgressUpdate::ToolStarted {
                    id: "t1".into(),
                    name: "bash".into(),
                    input: r#"{"command":"ls"}"#.into()
                },
                ProgressUpdate::Text(" again".into()),
            ]
        );
        assert!(log.take_pending().is_empty());
        log.push(Progress::ToolCallFinished {
            id: "t1".into(),
            name: "bash".into(),
            output: "x".repeat(10_000),
            is_error: false,
        });
        log.put_back(first.clone());
        let again = log.take_pending();
        assert_eq!(again[..3], first[..]);
        let ProgressUpdate::ToolFinished { output, .. } = &again[3] else {
            panic!("{again:?}");
        };
        assert!(
            output.len() < PROGRESS_OUTPUT_MAX + 40,
            "capped: {}",
            output.len()
        );
        log.push(Progress::Retrying {
            attempt: 1,
            wait: Duration::from_millis(500),
            reason: "529".into(),
        });
        let shown = log.shown();
        assert_eq!(shown.text, "Hello again");
        assert_eq!(shown.tools.len(), 1);
        assert!(shown.tools[0].output.is_some());
        assert_eq!(
            shown.retry.as_deref(),
            Some("model API busy (529); retry 1 in 0.5 s")
        );
    }
}
