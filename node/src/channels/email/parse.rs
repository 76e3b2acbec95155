//! Reading a fetched mail: who wrote it, which thread it belongs to, what it says, and the
//! headers loop protection looks at. Never fails: a mail that cannot be parsed at all gives
//! [`Incoming::broken`], which nobody answers.

use mail_parser::{MessageParser, MimeHeaders};

/// Longest prompt taken from one mail (the rest is cut with a note).
pub const MAX_PROMPT_CHARS: usize = 64 * 1024;
/// Most message ids kept from a `References` header.
const MAX_REFERENCES: usize = 50;

/// A fetched mail, as far as the channel cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Incoming {
    /// `Message-ID` without the angle brackets.
    pub message_id: Option<String>,
    /// `In-Reply-To` ids.
    pub in_reply_to: Vec<String>,
    /// `References` ids, oldest first.
    pub references: Vec<String>,
    /// The `From:` address, lower case.
    pub from: Option<String>,
    /// The `Return-Path:` (envelope sender) as the receiving server recorded it: `Some("")`
    /// for the null sender `<>` (bounces).
    pub return_path: Option<String>,
    /// Subject (decoded).
    pub subject: String,
    /// The text of the mail with quoted earlier mails removed.
    pub text: String,
    /// `Auto-Submitted` value, lower case.
    pub auto_submitted: Option<String>,
    /// `Precedence` value, lower case.
    pub precedence: Option<String>,
    /// Whether the mail came through a mailing list (`List-Id`).
    pub list_id: bool,
    /// Every `Authentication-Results` header, topmost first.
    pub auth_results: Vec<String>,
    /// Attachments: name and size in bytes.
    pub attachments: Vec<(String, usize)>,
    /// Set when the mail could not be parsed as MIME at all.
    pub broken: bool,
}

/// Parses a raw mail.
pub fn parse(raw: &[u8]) -> Incoming {
    let Some(msg) = MessageParser::default().parse(raw) else {
        return Incoming {
            broken: true,
            ..Incoming::default()
        };
    };
    let mut out = Incoming {
        message_id: msg.message_id().and_then(clean_id),
        from: msg
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .map(|a| a.trim().to_lowercase())
            .filter(|a| super::config::is_address(a)),
        subject: msg.subject().unwrap_or("").trim().to_string(),
        ..Incoming::default()
    };
    for (name, value) in msg.headers_raw() {
        let value = unfold(value);
        match name.to_ascii_lowercase().as_str() {
            "in-reply-to" => out.in_reply_to.extend(ids_in(&value)),
            "references" => out.references.extend(ids_in(&value)),
            "auto-submitted" => out.auto_submitted = Some(first_word(&value)),
            "precedence" => out.precedence = Some(first_word(&value)),
            "list-id" => out.list_id = true,
            "authentication-results" => out.auth_results.push(value),
            "return-path" if out.return_path.is_none() => {
                let addr = value.trim().trim_start_matches('<').trim_end_matches('>');
                out.return_path = Some(addr.trim().to_lowercase());
            }
            _ => {}
        }
    }
    if out.references.len() > MAX_REFERENCES {
        out.references
            .drain(..out.references.len() - MAX_REFERENCES);
    }
    let body = msg.body_text(0).map(|t| t.into_owned()).unwrap_or_default();
    out.text = cut(&strip_quoted(&body), MAX_PROMPT_CHARS);
    for part in msg.attachments() {
        let name = part
            .attachment_name()
            .map(|n| n.chars().filter(|c| !c.is_control()).take(200).collect())
            .unwrap_or_else(|| "unnamed".to_string());
        out.attachments.push((name, part.len()));
    }
    out
}

/// Joins folded header lines.
fn unfold(v: &str) -> String {
    v.split(['\r', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn first_word(v: &str) -> String {
    v.split([';', ' ', '\t', '('])
        .find(|s| !s.is_empty())
        .unwrap_or("")
        .to_lowercase()
}

/// A message id without brackets and spaces; `None` when nothing usable is left.
fn clean_id(id: &str) -> Option<String> {
    let id = id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    (!id.is_empty() && id.len() <= 250 && !id.chars().any(|c| c.is_whitespace() || c.is_control()))
        .then(|| id.to_string())
}

/// The `<id>`s in a header value (bare words if it has no brackets).
pub fn ids_in(v: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = v;
    while let Some(start) = rest.find('<') {
        let Some(len) = rest[start..].find('>') else {
            break;
        };
        if let Some(id) = clean_id(&rest[start + 1..start + len]) {
            out.push(id);
        }
        rest = &rest[start + len + 1..];
    }
    if out.is_empty() {
        out.extend(v.split_whitespace().filter_map(clean_id));
    }
    out
}

/// Drops quoted lines (`> ...`) and the "On ... wrote:" line that introduces them, and a
/// signature after `-- `.
pub fn strip_quoted(text: &str) -> String {
    let mut lines: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line == "-- " {
            break;
        }
        if line.trim_start().starts_with('>') {
            if lines
                .last()
                .is_some_and(|l| l.trim_end().ends_with("wrote:"))
            {
                lines.pop();
            }
            continue;
        }
        lines.push(line);
    }
    lines.join("\n").trim().to_string()
}

/// At most `max` characters, with a note when cut.
fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((i, _)) => format!("{}\n[… the rest of the mail was cut]", &text[..i]),
    }
}

impl Incoming {
    /// Ids this mail points back to, newest first: `In-Reply-To`, then `References` from
    /// the end.
    pub fn parents(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.in_reply_to.iter().map(String::as_str).collect();
        for r in self.references.iter().rev() {
            if !out.contains(&r.as_str()) {
                out.push(r);
            }
        }
        out
    }

    /// The prompt for the agent: the sender, the subject, the text and the attachment list.
    pub fn prompt(&self) -> String {
        let mut p = format!(
            "Email from {} (subject: {:?}):\n\n{}",
            self.from.as_deref().unwrap_or("?"),
            self.subject,
            self.text
        );
        if !self.attachments.is_empty() {
            p.push_str("\n\n[attachments, not included:");
            for (name, size) in &self.attachments {
                p.push_str(&format!(" {name} ({size} bytes);"));
            }
            p.push(']');
        }
        p
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_gives_its_thread_and_text() {
        let raw = b"From: Alice <Alice@Example.org>\r\n\
To: bot@example.org\r\n\
Subject: Re: lunch\r\n\
Message-ID: <m2@example.org>\r\n\
In-Reply-To: <iom-1@example.org>\r\n\
References: <m1@example.org>\r\n <iom-1@example.org>\r\n\
Return-Path: <alice@example.org>\r\n\
Authentication-Results: mx.example.org; dkim=pass header.d=example.org\r\n\
\r\n\
And tomorrow?\r\n\
\r\n\
On Mon, Bot wrote:\r\n\
> Today at noon.\r\n";
        let m = parse(raw);
        assert_eq!(m.message_id.as_deref(), Some("m2@example.org"));
        assert_eq!(m.from.as_deref(), Some("alice@example.org"));
        assert_eq!(m.return_path.as_deref(), Some("alice@example.org"));
        assert_eq!(m.in_reply_to, vec!["iom-1@example.org"]);
        assert_eq!(m.references, vec!["m1@example.org", "iom-1@example.org"]);
        assert_eq!(m.parents(), vec!["iom-1@example.org", "m1@example.org"]);
        assert_eq!(m.text, "And tomorrow?");
        assert_eq!(m.auth_results.len(), 1);
        assert!(!m.broken);
        assert!(m.prompt().contains("And tomorrow?"));
    }

    #[test]
    fn headers_for_loop_protection() {
        let raw = b"From: a@x.org\r\nAuto-Submitted: auto-replied (vacation)\r\n\
Precedence: Bulk\r\nList-Id: <l.x.org>\r\nReturn-Path: <>\r\n\r\nOut of office\r\n";
        let m = parse(raw);
        assert_eq!(m.auto_submitted.as_deref(), Some("auto-replied"));
        assert_eq!(m.precedence.as_deref(), Some("bulk"));
        assert!(m.list_id);
        assert_eq!(m.return_path.as_deref(), Some(""));
        assert_eq!(m.message_id, None);
    }

    #[test]
    fn odd_mail_does_not_panic() {
        for raw in [
            &b""[..],
            b"\r\n\r\n",
            b"garbage without headers",
            b"From: <>\r\nContent-Type: multipart/mixed; boundary=\"x\"\r\n\r\n--x\r\nbroken",
            b"From: a@x.org\r\nContent-Type: text/plain; charset=x-nobody-uses-this\r\n\r\n\xff\xfe\xfd",
            b"From: a@x.org\r\nMessage-ID: <>\r\nReferences: <<<>>\r\n\r\nhi",
            b"Subject: =?x-unknown?B?////?=\r\n\r\nbody",
        ] {
            let m = parse(raw);
            assert!(m.message_id.is_none(), "{m:?}");
        }
    }

    #[test]
    fn ids_and_quotes() {
        assert_eq!(ids_in("<a@b> <c@d>"), vec!["a@b", "c@d"]);
        assert_eq!(ids_in("a@b"), vec!["a@b"]);
        assert!(ids_in("<>").is_empty());
        assert_eq!(strip_quoted("hi\n-- \nsig"), "hi");
        assert_eq!(strip_quoted("hi\n> q\nmore"), "hi\nmore");
        assert_eq!(cut("abcdef", 3), "abc\n[… the rest of the mail was cut]");
    }
}
