//! An incremental Server-Sent Events parser (pure, no I/O).
//!
//! Feed it byte chunks as they arrive with [`SseParser::push`]; it returns every event that
//! became complete. It follows the WHATWG `text/event-stream` rules that matter here: lines end
//! in LF, CRLF or CR; `:` starts a comment; `data:` lines of one event are joined with `\n`; one
//! space after the colon is dropped; a blank line dispatches the event. Memory is bounded: an
//! event (or an unfinished line) larger than the configured limit is an error.

/// Default largest event accepted, in bytes.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

/// One parsed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, or `"message"` when absent.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Why the byte stream is not valid SSE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SseError {
    /// One event grew beyond the limit.
    #[error("server-sent event larger than {limit} bytes")]
    EventTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A line is not UTF-8.
    #[error("server-sent event line is not valid UTF-8")]
    InvalidUtf8,
}

/// Incremental parser state.
#[derive(Debug)]
pub struct SseParser {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// Whether the previous chunk ended in CR (a following LF belongs to the same line end).
    after_cr: bool,
    /// Whether we are still at the very start of the stream (a BOM is skipped there).
    at_start: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
    /// Bytes accounted to the current event so far.
    event_bytes: usize,
    max_event_bytes: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseParser {
    /// A parser that rejects events larger than `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            line: Vec::new(),
            after_cr: false,
            at_start: true,
            event: None,
            data: String::new(),
            has_data: false,
            event_bytes: 0,
            max_event_bytes,
        }
    }

    /// Feeds one chunk; returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut out = Vec::new();
        let mut bytes = chunk;
        if self.at_start && !bytes.is_empty() {
            // Skip a UTF-8 BOM, even when it is split across chunks.
            const BOM: &[u8] = b"\xEF\xBB\xBF";
            let have = self.line.len();
            let need = BOM.len() - have;
            let take = need.min(bytes.len());
            if BOM[have..have + take] == bytes[..take] {
                if have + take == BOM.len() {
                    self.line.clear();
                    self.at_start = false;
                } else {
                    self.line.extend_from_slice(&bytes[..take]);
                }
                bytes = &bytes[take..];
            } else {
                self.at_start = false;
            }
        }
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(&mut out)?,
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut out)?;
                }
                _ => {
                    self.line.push(b);
                    self.event_bytes += 1;
                    if self.event_bytes > self.max_event_bytes {
                        return Err(SseError::EventTooLarge {
                            limit: self.max_event_bytes,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        self.at_start = false;
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if self.has_data {
                let data = std::mem::take(&mut self.data);
                out.push(SseEvent {
                    event: self.event.take().unwrap_or_else(|| "message".to_owned()),
                    data,
                });
            }
            self.event = None;
            self.data.clear();
            self.has_data = false;
            self.event_bytes = 0;
            return Ok(());
        }
        let line = std::str::from_utf8(&line).map_err(|_| SseError::InvalidUtf8)?;
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            // `id`, `retry` and unknown fields are ignored.
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "event: message_start\ndata: {\"a\":1}\n\n: a comment\n\nevent: ping\ndata: {}\n\ndata: line one\ndata:line two\ndata\n\n";

    fn expected() -> Vec<SseEvent> {
        vec![
            SseEvent {
                event: "message_start".into(),
                data: "{\"a\":1}".into(),
            },
            SseEvent {
                event: "ping".into(),
                data: "{}".into(),
            },
            SseEvent {
                event: "message".into(),
                data: "line one\nline two\n".into(),
            },
        ]
    }

    fn parse_split(input: &[u8], at: usize) -> Result<Vec<SseEvent>, SseError> {
        let mut p = SseParser::default();
        let mut out = p.push(&input[..at])?;
        out.extend(p.push(&input[at..])?);
        Ok(out)
    }

    #[test]
    fn parses_events_comments_and_multiline_data() -> Result<(), SseError> {
        let mut p = SseParser::default();
        assert_eq!(p.push(STREAM.as_bytes())?, expected());
        Ok(())
    }

    #[test]
    fn split_at_every_byte_boundary_gives_same_events() -> Result<(), SseError> {
        for line_end in ["\n", "\r\n", "\r"] {
            let input = STREAM.replace('\n', line_end);
            for at in 0..=input.len() {
                assert_eq!(
                    parse_split(input.as_bytes(), at)?,
                    expected(),
                    "line end {line_end:?}, split at {at}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn byte_by_byte_with_crlf_and_multibyte_utf8() -> Result<(), SseError> {
        let input = "\u{feff}event: content_block_delta\r\ndata: {\"text\":\"h\u{e9}llo \u{1f600}\"}\r\n\r\n";
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for b in input.as_bytes() {
            out.extend(p.push(std::slice::from_ref(b))?);
        }
        assert_eq!(
            out,
            vec![SseEvent {
                event: "content_block_delta".into(),
                data: "{\"text\":\"h\u{e9}llo \u{1f600}\"}".into()
            }]
        );
        Ok(())
    }

    #[test]
    fn event_without_data_is_not_dispatched() -> Result<(), SseError> {
        let mut p = SseParser::default();
        assert!(p.push(b"event: ping\n\n")?.is_empty());
        // The event name does not leak into the next event.
        assert_eq!(p.push(b"data: x\n\n")?[0].event, "message");
        Ok(())
    }

    #[test]
    fn incomplete_event_waits_for_blank_line() -> Result<(), SseError> {
        let mut p = SseParser::default();
        assert!(p.push(b"event: a\ndata: 1\n")?.is_empty());
        assert_eq!(p.push(b"\n")?.len(), 1);
        Ok(())
    }

    #[test]
    fn oversized_event_is_an_error() {
        let mut p = SseParser::new(64);
        let big = format!("data: {}\n", "x".repeat(100));
        assert_eq!(
            p.push(big.as_bytes()),
            Err(SseError::EventTooLarge { limit: 64 })
        );
        // Also when the size is spread over many data lines.
        let mut p = SseParser::new(64);
        let lines = "data: 0123456789\n".repeat(10);
        assert!(matches!(
            p.push(lines.as_bytes()),
            Err(SseError::EventTooLarge { .. })
        ));
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let mut p = SseParser::default();
        assert_eq!(p.push(b"data: \xff\xfe\n\n"), Err(SseError::InvalidUtf8));
    }
}
