//! The SMTP side: the answer as a reply in the mail's thread (text/plain plus a simple HTML
//! part, the agent's files attached) and its submission with STARTTLS or TLS (lettre, rustls).

use std::time::Duration;

use lettre::message::header::{ContentType, Header, HeaderName, HeaderValue};
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::config::{EmailConfig, Security};

/// Time limit of one SMTP conversation step.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// An answer to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The assistant's address.
    pub from: String,
    /// The recipient.
    pub to: String,
    /// Subject.
    pub subject: String,
    /// Message-ID (without brackets).
    pub message_id: String,
    /// The mail answered.
    pub in_reply_to: Option<String>,
    /// The thread, oldest first (the answered mail last).
    pub references: Vec<String>,
    /// The text.
    pub text: String,
    /// Files: name and bytes.
    pub attachments: Vec<(String, Vec<u8>)>,
}

/// `Auto-Submitted: auto-replied` (RFC 3834), so other robots do not answer the answer.
#[derive(Debug, Clone)]
struct AutoSubmitted;

impl Header for AutoSubmitted {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Auto-Submitted")
    }
    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AutoSubmitted)
    }
    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "auto-replied".to_string())
    }
}

/// `Re: subject` (not doubled).
pub fn reply_subject(subject: &str) -> String {
    let s = subject.trim();
    if s.is_empty() {
        "Re: your mail".into()
    } else if s.len() >= 3 && s[..3].eq_ignore_ascii_case("re:") {
        s.to_string()
    } else {
        format!("Re: {s}")
    }
}

/// The text as simple HTML: escaped, paragraphs and line breaks kept.
pub fn to_html(text: &str) -> String {
    let esc = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;");
    let paras: Vec<String> = esc
        .split("\n\n")
        .filter(|p| !p.trim().is_empty())
        .map(|p| format!("<p>{}</p>", p.trim().replace('\n', "<br>\n")))
        .collect();
    format!(
        "<!DOCTYPE html>\n<html><body style=\"font-family: sans-serif\">\n{}\n</body></html>\n",
        paras.join("\n")
    )
}

/// The answer as a MIME message.
pub fn build(a: &Answer) -> Result<Message, String> {
    let from: Mailbox = a
        .from
        .parse()
        .map_err(|e| format!("from {:?}: {e}", a.from))?;
    let to: Mailbox = a.to.parse().map_err(|e| format!("to {:?}: {e}", a.to))?;
    let mut b = Message::builder()
        .from(from)
        .to(to)
        .subject(a.subject.clone())
        .message_id(Some(format!("<{}>", a.message_id)))
        .header(AutoSubmitted);
    if let Some(id) = &a.in_reply_to {
        b = b.in_reply_to(format!("<{id}>"));
    }
    if !a.references.is_empty() {
        let refs: Vec<String> = a.references.iter().map(|r| format!("<{r}>")).collect();
        b = b.references(refs.join(" "));
    }
    let body = MultiPart::alternative_plain_html(a.text.clone(), to_html(&a.text));
    let msg = if a.attachments.is_empty() {
        b.multipart(body)
    } else {
        let mut mixed = MultiPart::mixed().multipart(body);
        for (name, bytes) in &a.attachments {
            let part: SinglePart = Attachment::new(name.clone()).body(
                bytes.clone(),
                ContentType::parse("application/octet-stream")
                    .map_err(|e| format!("content type: {e}"))?,
            );
            mixed = mixed.singlepart(part);
        }
        b.multipart(mixed)
    };
    msg.map_err(|e| format!("cannot build the answer: {e}"))
}

/// Why sending failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    /// What happened.
    pub message: String,
    /// The server refused for good (5xx): retrying will not help.
    pub permanent: bool,
}

/// An SMTP submission client.
pub struct Sender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl Sender {
    /// A client for the configured server.
    pub fn new(cfg: &EmailConfig, password: &str) -> Result<Sender, String> {
        let mut params = TlsParameters::builder(cfg.smtp.host.clone());
        for der in super::tls::extra_roots(cfg)? {
            params = params.add_root_certificate(
                Certificate::from_der(der.to_vec()).map_err(|e| format!("email.ca_file: {e}"))?,
            );
        }
        let params = params
            .build_rustls()
            .map_err(|e| format!("SMTP TLS setup: {e}"))?;
        let tls = match cfg.smtp.security {
            Security::Tls => Tls::Wrapper(params),
            Security::Starttls => Tls::Required(params),
        };
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.smtp.host)
            .port(cfg.smtp.port)
            .tls(tls)
            .credentials(Credentials::new(cfg.username.clone(), password.to_string()))
            .timeout(Some(SMTP_TIMEOUT))
            .build();
        Ok(Sender { transport })
    }

    /// Submits `msg`.
    pub async fn send(&self, msg: Message) -> Result<(), SendError> {
        match self.transport.send(msg).await {
            Ok(_) => Ok(()),
            Err(e) => Err(SendError {
                permanent: e.is_permanent(),
                message: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_a_reply_in_the_thread() {
        let a = Answer {
            from: "bot@example.org".into(),
            to: "alice@example.org".into(),
            subject: reply_subject("lunch"),
            message_id: "iom-em-1@example.org".into(),
            in_reply_to: Some("m2@example.org".into()),
            references: vec!["m1@example.org".into(), "m2@example.org".into()],
            text: "Noon <works> & fine.\n\nSee you.".into(),
            attachments: vec![("notes.txt".into(), b"file".to_vec())],
        };
        let raw = String::from_utf8(build(&a).unwrap().formatted()).unwrap();
        assert!(raw.contains("Message-ID: <iom-em-1@example.org>"), "{raw}");
        assert!(raw.contains("In-Reply-To: <m2@example.org>"), "{raw}");
        assert!(
            raw.contains("References: <m1@example.org> <m2@example.org>"),
            "{raw}"
        );
        assert!(raw.contains("Subject: Re: lunch"));
        assert!(raw.contains("Auto-Submitted: auto-replied"));
        assert!(raw.contains("text/plain"));
        assert!(raw.contains("text/html"));
        assert!(raw.contains("notes.txt"));
        let parsed = super::super::parse::parse(raw.as_bytes());
        assert_eq!(parsed.message_id.as_deref(), Some("iom-em-1@example.org"));
        assert_eq!(parsed.in_reply_to, vec!["m2@example.org"]);
        assert_eq!(parsed.attachments.len(), 1);
    }

    #[test]
    fn subjects_and_html() {
        assert_eq!(reply_subject("Re: x"), "Re: x");
        assert_eq!(reply_subject("RE: x"), "RE: x");
        assert_eq!(reply_subject(""), "Re: your mail");
        assert_eq!(reply_subject("x"), "Re: x");
        let h = to_html("a<b>\nc\n\nd");
        assert!(h.contains("<p>a&lt;b&gt;<br>\nc</p>\n<p>d</p>"), "{h}");
    }
}
