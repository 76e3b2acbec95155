//! Who gets an answer: only allowlisted senders, checked on the `From:` address, on the
//! envelope sender the receiving server recorded (`Return-Path`), and on the DKIM/SPF results
//! it recorded (`Authentication-Results`), and never automatic mail (RFC 3834
//! `Auto-Submitted`, `Precedence: bulk/list/junk`, mailing lists, bounces, our own mail).
//! The per-thread rate limit is in [`super::state`].

use super::config::EmailConfig;
use super::parse::Incoming;

/// Why a mail is not answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The mail is not MIME at all.
    #[error("the mail cannot be parsed")]
    Broken,
    /// No usable `From:`.
    #[error("no sender address")]
    NoSender,
    /// The sender is not on `email.allow`.
    #[error("{0} is not on the allowlist")]
    NotAllowed(String),
    /// The envelope sender differs and is not allowed either.
    #[error("the envelope sender {0:?} is not on the allowlist")]
    Envelope(String),
    /// A bounce (null envelope sender).
    #[error("a bounce (null envelope sender)")]
    Bounce,
    /// The server recorded failed or missing authentication.
    #[error("authentication results: {0}")]
    Authentication(String),
    /// Automatic mail.
    #[error("automatic mail ({0})")]
    Automatic(String),
    /// Mail from the assistant's own address.
    #[error("mail from the assistant's own address")]
    Own,
    /// Too many answers in this thread lately.
    #[error("rate limit: {0} answers in this thread in the last hour")]
    RateLimited(u32),
    /// Nothing to answer.
    #[error("the mail has no text")]
    Empty,
}

/// Whether `addr` (lower case) is on the allowlist (`user@domain` or `@domain`).
pub fn allowed(cfg: &EmailConfig, addr: &str) -> bool {
    let domain = addr.rsplit_once('@').map(|(_, d)| d);
    cfg.allow.iter().any(|a| match a.strip_prefix('@') {
        Some(d) => domain == Some(d),
        None => a == addr,
    })
}

/// Checks a mail against the allowlist and the loop rules.
pub fn judge(cfg: &EmailConfig, m: &Incoming) -> Result<(), Refusal> {
    if m.broken {
        return Err(Refusal::Broken);
    }
    let from = m.from.as_deref().ok_or(Refusal::NoSender)?;
    if from == cfg.address {
        return Err(Refusal::Own);
    }
    match m.return_path.as_deref() {
        Some("") => return Err(Refusal::Bounce),
        Some(rp) if rp == cfg.address => return Err(Refusal::Own),
        _ => {}
    }
    if let Some(a) = m.auto_submitted.as_deref()
        && a != "no"
    {
        return Err(Refusal::Automatic(format!("Auto-Submitted: {a}")));
    }
    if let Some(p) = m.precedence.as_deref()
        && matches!(p, "bulk" | "list" | "junk")
    {
        return Err(Refusal::Automatic(format!("Precedence: {p}")));
    }
    if m.list_id {
        return Err(Refusal::Automatic("List-Id".into()));
    }
    if !allowed(cfg, from) {
        return Err(Refusal::NotAllowed(from.to_string()));
    }
    if let Some(rp) = m.return_path.as_deref()
        && rp != from
        && !allowed(cfg, rp)
    {
        return Err(Refusal::Envelope(rp.to_string()));
    }
    check_authentication(cfg, &m.auth_results).map_err(Refusal::Authentication)?;
    if m.text.trim().is_empty() && m.subject.trim().is_empty() {
        return Err(Refusal::Empty);
    }
    Ok(())
}

/// One parsed `Authentication-Results` header: the authserv-id and `(method, result)`s.
pub fn parse_auth_results(header: &str) -> (String, Vec<(String, String)>) {
    let mut parts = header.split(';');
    let id = parts
        .next()
        .unwrap_or("")
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_lowercase();
    let results = parts
        .filter_map(|p| {
            let (method, rest) = p.trim().split_once('=')?;
            let result = rest.split_whitespace().next()?.to_lowercase();
            Some((method.trim().to_lowercase(), result))
        })
        .collect();
    (id, results)
}

/// With `authserv_id` set, the server's own results must show `dkim=pass` or `spf=pass`.
/// Without it, only the topmost header (the receiving server's) is looked at, and a failed
/// DKIM/SPF/DMARC result with no pass refuses the mail.
pub fn check_authentication(cfg: &EmailConfig, headers: &[String]) -> Result<(), String> {
    let results: Vec<(String, String)> = match &cfg.authserv_id {
        Some(id) => headers
            .iter()
            .map(|h| parse_auth_results(h))
            .filter(|(i, _)| i == id)
            .flat_map(|(_, r)| r)
            .collect(),
        None => headers
            .first()
            .map(|h| parse_auth_results(h).1)
            .unwrap_or_default(),
    };
    let is = |m: &str, r: &str| results.iter().any(|(a, b)| a == m && b == r);
    let passed = is("dkim", "pass") || is("spf", "pass");
    if is("dmarc", "fail") {
        return Err("dmarc=fail".into());
    }
    if passed {
        return Ok(());
    }
    if cfg.authserv_id.is_some() {
        return Err(format!(
            "no dkim=pass or spf=pass recorded by {}",
            cfg.authserv_id.as_deref().unwrap_or("")
        ));
    }
    for m in ["dkim", "spf"] {
        for bad in ["fail", "softfail", "permerror"] {
            if is(m, bad) {
                return Err(format!("{m}={bad}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::config::RawEmail;
    use super::*;

    fn cfg(authserv: Option<&str>) -> EmailConfig {
        let mut r: RawEmail = toml::from_str(
            r#"
            address = "bot@example.org"
            allow = ["alice@example.org", "@family.org"]
            imap_host = "h"
            smtp_host = "h"
            "#,
        )
        .unwrap();
        r.authserv_id = authserv.map(String::from);
        r.validate().unwrap()
    }

    fn mail(from: &str) -> Incoming {
        Incoming {
            from: Some(from.into()),
            return_path: Some(from.into()),
            subject: "hi".into(),
            text: "hello".into(),
            ..Incoming::default()
        }
    }

    #[test]
    fn the_allowlist_by_address_and_domain() {
        let c = cfg(None);
        assert_eq!(judge(&c, &mail("alice@example.org")), Ok(()));
        assert_eq!(judge(&c, &mail("bob@family.org")), Ok(()));
        assert_eq!(
            judge(&c, &mail("mallory@example.org")),
            Err(Refusal::NotAllowed("mallory@example.org".into()))
        );
        assert!(judge(&c, &mail("alice@example.org.evil")).is_err());
        let mut m = mail("alice@example.org");
        m.return_path = Some("mallory@evil.org".into());
        assert!(matches!(judge(&c, &m), Err(Refusal::Envelope(_))));
        m.return_path = Some("bob@family.org".into());
        assert_eq!(judge(&c, &m), Ok(()));
    }

    #[test]
    fn automatic_mail_is_never_answered() {
        let c = cfg(None);
        let mut m = mail("alice@example.org");
        m.auto_submitted = Some("auto-replied".into());
        assert!(matches!(judge(&c, &m), Err(Refusal::Automatic(_))));
        m.auto_submitted = Some("no".into());
        assert_eq!(judge(&c, &m), Ok(()));
        for p in ["bulk", "list", "junk"] {
            m.precedence = Some(p.into());
            assert!(matches!(judge(&c, &m), Err(Refusal::Automatic(_))));
        }
        let mut m = mail("alice@example.org");
        m.return_path = Some(String::new());
        assert_eq!(judge(&c, &m), Err(Refusal::Bounce));
        assert_eq!(judge(&c, &mail("bot@example.org")), Err(Refusal::Own));
        let mut m = mail("alice@example.org");
        m.list_id = true;
        assert!(judge(&c, &m).is_err());
        let mut m = mail("alice@example.org");
        m.broken = true;
        assert_eq!(judge(&c, &m), Err(Refusal::Broken));
    }

    #[test]
    fn authentication_results() {
        let c = cfg(None);
        let mut m = mail("alice@example.org");
        m.auth_results = vec!["mx.example.org; dkim=fail header.d=example.org; spf=none".into()];
        assert!(matches!(judge(&c, &m), Err(Refusal::Authentication(_))));
        m.auth_results = vec!["mx.example.org; dkim=fail; spf=pass smtp.mailfrom=x".into()];
        assert_eq!(judge(&c, &m), Ok(()));
        // A lower (older, possibly forged) header is not looked at without an authserv-id.
        m.auth_results = vec!["mx; spf=none".into(), "evil; dkim=fail".into()];
        assert_eq!(judge(&c, &m), Ok(()));
        // With one, the server's own result must pass; others' headers do not count.
        let c = cfg(Some("mx.example.org"));
        m.auth_results = vec!["evil.org; dkim=pass".into()];
        assert!(judge(&c, &m).is_err());
        m.auth_results = vec!["mx.example.org 1; dkim=pass header.d=example.org".into()];
        assert_eq!(judge(&c, &m), Ok(()));
        m.auth_results = vec!["mx.example.org; dkim=pass; dmarc=fail".into()];
        assert!(judge(&c, &m).is_err());
    }
}
