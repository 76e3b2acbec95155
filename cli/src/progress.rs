//! Progress on stderr for long CLI work (`iom blob add|get` of large files, `iom sandbox
//! build`): a bar when the total is known, elapsed time when it is not. Drawn only when stderr
//! is a terminal and `--json` is off, so scripts and logs never see it.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Transfers smaller than this finish before a bar would help.
pub const MIN_BYTES: u64 = 8 << 20;
/// Redraw at most this often.
const EVERY: Duration = Duration::from_millis(100);
/// Width of the bar in characters.
const BAR: usize = 30;

/// Whether to draw: only for a person at a terminal, never with `--json`, and only for work
/// large enough (`total`, when known, of at least [`MIN_BYTES`]).
pub fn wanted(json: bool, stderr_is_terminal: bool, total: Option<u64>) -> bool {
    !json && stderr_is_terminal && total.is_none_or(|t| t >= MIN_BYTES)
}

/// One line of progress: `label [=====>    ] 45% 12.0 MiB/26.7 MiB 3.1 MiB/s`, or
/// `label 12.0 MiB 4s` without a total.
pub fn line(label: &str, done: u64, total: Option<u64>, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let human = iom_node::store::human_bytes;
    match total {
        Some(t) if t > 0 => {
            let frac = done as f64 / t as f64;
            format!(
                "{label} {} {}/{} {}/s",
                bar(frac),
                human(done),
                human(t),
                human(rate as u64)
            )
        }
        _ if done > 0 => format!("{label} {} {}s", human(done), elapsed.as_secs()),
        _ => format!("{label} {}s", elapsed.as_secs()),
    }
}

/// One line of progress over counted things: `label [=====>    ]  45% 120/300 documents`, or
/// `label 0 documents` while the total is unknown.
pub fn counted_line(label: &str, done: u64, total: u64, unit: &str) -> String {
    if total == 0 {
        return format!("{label} {done} {unit}");
    }
    format!(
        "{label} {} {done}/{total} {unit}",
        bar(done as f64 / total as f64)
    )
}

/// `[=====>     ]  45%` for a share of the work done (clamped to 0..=1).
fn bar(frac: f64) -> String {
    let frac = frac.clamp(0.0, 1.0);
    let filled = (frac * BAR as f64).round() as usize;
    let bar: String = (0..BAR)
        .map(|i| match i.cmp(&filled) {
            std::cmp::Ordering::Less => '=',
            std::cmp::Ordering::Equal => '>',
            std::cmp::Ordering::Greater => ' ',
        })
        .collect();
    format!("[{bar}] {:>3}%", (frac * 100.0).floor() as u64)
}

/// A progress display (does nothing when not [`wanted`]).
#[derive(Debug)]
pub struct Progress {
    on: bool,
    label: String,
    total: Option<u64>,
    started: Instant,
    state: Mutex<(u64, Option<Instant>)>,
}

impl Progress {
    /// Progress for `label`; on only when [`wanted`] for this terminal.
    pub fn new(label: &str, total: Option<u64>, json: bool) -> Progress {
        Progress {
            on: wanted(json, std::io::stderr().is_terminal(), total),
            label: label.to_string(),
            total,
            started: Instant::now(),
            state: Mutex::new((0, None)),
        }
    }

    /// Whether anything is drawn.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Adds `n` done units and redraws (at most every 100 ms).
    pub fn add(&self, n: u64) {
        if !self.on {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += n;
        let now = Instant::now();
        if s.1.is_some_and(|t| now.duration_since(t) < EVERY) {
            return;
        }
        s.1 = Some(now);
        self.draw(s.0);
    }

    /// Redraws without progress (for work with no measurable steps).
    pub fn tick(&self) {
        self.add(0);
    }

    fn draw(&self, done: u64) {
        let text = line(&self.label, done, self.total, self.started.elapsed());
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{text}");
        let _ = err.flush();
    }

    /// Draws the last state and ends the line.
    pub fn finish(&self) {
        if !self.on {
            return;
        }
        let done = self.state.lock().unwrap_or_else(|e| e.into_inner()).0;
        self.draw(done);
        let _ = writeln!(std::io::stderr());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drawn_only_for_a_terminal_without_json_and_for_large_work() {
        assert!(wanted(false, true, Some(MIN_BYTES)));
        assert!(wanted(false, true, None), "unknown length: elapsed time");
        assert!(
            !wanted(false, false, Some(1 << 30)),
            "stderr is not a terminal"
        );
        assert!(!wanted(true, true, Some(1 << 30)), "--json");
        assert!(
            !wanted(false, true, Some(1 << 20)),
            "small files finish at once"
        );
    }

    #[test]
    fn lines_show_the_bar_the_share_and_the_rate() {
        let l = line("adding f", 5 << 20, Some(10 << 20), Duration::from_secs(2));
        assert_eq!(
            l,
            "adding f [===============>              ]  50% 5.0 MiB/10.0 MiB 2.5 MiB/s"
        );
        let full = line("x", 10, Some(10), Duration::from_secs(1));
        assert!(
            full.contains("[==============================] 100%"),
            "{full}"
        );
        assert_eq!(
            line("building", 0, None, Duration::from_secs(3)),
            "building 3s"
        );
        assert_eq!(
            line("sync", 2048, None, Duration::from_secs(3)),
            "sync 2.0 KiB 3s"
        );
        assert_eq!(
            counted_line("first sync", 15, 30, "documents"),
            "first sync [===============>              ]  50% 15/30 documents"
        );
        assert_eq!(
            counted_line("first sync", 0, 0, "documents"),
            "first sync 0 documents"
        );
    }
}
