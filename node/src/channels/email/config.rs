//! `[email]` in the node's `config.toml`: where the mailbox is, who may write, and limits.
//! The password is never in the file: it comes from `IOM_EMAIL_PASSWORD` or from
//! `password_file` (mode 0600), read when the channel starts.
//!
//! ```toml
//! [email]
//! address = "assistant@example.org"   # the assistant's own address (From: of answers)
//! owner = "me@example.org"            # where `--to email` schedule results go
//! allow = ["me@example.org", "@family.example.org"]
//! username = "assistant@example.org"  # IMAP and SMTP login
//! password_file = "/etc/iom/mail.pass"
//! imap_host = "imap.example.org"      # imap_port 993, imap_security "tls" | "starttls"
//! smtp_host = "smtp.example.org"      # smtp_port 587, smtp_security "starttls" | "tls"
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Environment variable holding the mail password (wins over `password_file`).
pub const PASSWORD_ENV: &str = "IOM_EMAIL_PASSWORD";

/// How a connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// TLS from the first byte (IMAPS 993, SMTPS 465).
    Tls,
    /// Plain connection upgraded with STARTTLS (IMAP 143, submission 587); refused if the
    /// server does not offer it.
    Starttls,
}

/// `[email]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmail {
    /// The assistant's address.
    pub address: String,
    /// The owner's address (schedule results).
    #[serde(default)]
    pub owner: Option<String>,
    /// Allowed senders: whole addresses, or `@domain` for a domain.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Login name (IMAP and SMTP). Absent: the address.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// IMAP host.
    pub imap_host: String,
    /// IMAP port. Absent: 993 (tls) or 143 (starttls).
    #[serde(default)]
    pub imap_port: Option<u16>,
    /// IMAP security. Absent: tls.
    #[serde(default)]
    pub imap_security: Option<Security>,
    /// The mailbox watched. Absent: INBOX.
    #[serde(default)]
    pub mailbox: Option<String>,
    /// SMTP host.
    pub smtp_host: String,
    /// SMTP port. Absent: 587 (starttls) or 465 (tls).
    #[serde(default)]
    pub smtp_port: Option<u16>,
    /// SMTP security. Absent: starttls.
    #[serde(default)]
    pub smtp_security: Option<Security>,
    /// A PEM file of extra CA certificates trusted for both servers (a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Seconds one IDLE lasts before it is renewed (servers drop it after 30 minutes).
    #[serde(default)]
    pub idle_secs: Option<u64>,
    /// Largest mail fetched, in MiB; bigger ones are ignored (logged). Absent: 25.
    #[serde(default)]
    pub max_message_mb: Option<u64>,
    /// Largest total of files attached to an answer, in MiB. Absent: 10.
    #[serde(default)]
    pub max_attachments_mb: Option<u64>,
    /// Answers per mail thread per hour; more mails in that thread are ignored. Absent: 10.
    #[serde(default)]
    pub replies_per_thread_per_hour: Option<u32>,
    /// Only trust `Authentication-Results` headers of this server (its authserv-id). When
    /// set, a sender needs `dkim=pass` or `spf=pass` there.
    #[serde(default)]
    pub authserv_id: Option<String>,
}

/// A checked `[email]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailConfig {
    /// The assistant's address (lower case).
    pub address: String,
    /// The owner's address.
    pub owner: Option<String>,
    /// Allowed senders (lower case).
    pub allow: Vec<String>,
    /// Login name.
    pub username: String,
    /// Password file.
    pub password_file: Option<PathBuf>,
    /// IMAP server.
    pub imap: Server,
    /// The mailbox.
    pub mailbox: String,
    /// SMTP server.
    pub smtp: Server,
    /// Extra CA certificates.
    pub ca_file: Option<PathBuf>,
    /// One IDLE's length.
    pub idle: Duration,
    /// Largest mail fetched.
    pub max_message_bytes: u64,
    /// Largest total of answer attachments.
    pub max_attachment_bytes: u64,
    /// Answers per thread per hour.
    pub replies_per_thread_per_hour: u32,
    /// Trusted authserv-id.
    pub authserv_id: Option<String>,
}

/// A server to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Host name or IP (also the TLS server name).
    pub host: String,
    /// Port.
    pub port: u16,
    /// TLS or STARTTLS.
    pub security: Security,
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self.security {
            Security::Tls => "tls",
            Security::Starttls => "starttls",
        };
        write!(f, "{}:{} ({s})", self.host, self.port)
    }
}

/// Longest IDLE: servers may drop an IDLE after 30 minutes (RFC 2177), so renew before.
pub const MAX_IDLE: Duration = Duration::from_secs(29 * 60);

/// Whether `text` looks like `local@domain` (one `@`, both sides non-empty, no spaces).
pub fn is_address(text: &str) -> bool {
    let mut parts = text.split('@');
    matches!((parts.next(), parts.next(), parts.next()), (Some(l), Some(d), None)
        if !l.is_empty() && !d.is_empty() && !text.chars().any(|c| c.is_whitespace() || c.is_control()))
}

impl RawEmail {
    /// Checks every value; the error names the key.
    pub fn validate(self) -> Result<EmailConfig, (String, String)> {
        let bad = |k: &str, m: String| Err((format!("email.{k}"), m));
        let address = self.address.trim().to_lowercase();
        if !is_address(&address) {
            return bad(
                "address",
                format!("{:?} is not an email address", self.address),
            );
        }
        let owner = self.owner.map(|o| o.trim().to_lowercase());
        if let Some(o) = &owner
            && !is_address(o)
        {
            return bad("owner", format!("{o:?} is not an email address"));
        }
        let mut allow = Vec::new();
        for a in &self.allow {
            let a = a.trim().to_lowercase();
            let ok = match a.strip_prefix('@') {
                Some(domain) => is_address(&format!("x@{domain}")),
                None => is_address(&a),
            };
            if !ok {
                return bad("allow", format!("{a:?}: expected an address or @domain"));
            }
            allow.push(a);
        }
        for (k, h) in [
            ("imap_host", &self.imap_host),
            ("smtp_host", &self.smtp_host),
        ] {
            if h.trim().is_empty() || h.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return bad(k, format!("{h:?} is not a host name"));
            }
        }
        let imap_security = self.imap_security.unwrap_or(Security::Tls);
        let smtp_security = self.smtp_security.unwrap_or(Security::Starttls);
        let idle = Duration::from_secs(self.idle_secs.unwrap_or(25 * 60));
        if idle.is_zero() || idle > MAX_IDLE {
            return bad(
                "idle_secs",
                format!("{}: 1 to {}", idle.as_secs(), MAX_IDLE.as_secs()),
            );
        }
        let mb = |v: Option<u64>, d: u64, k: &str| match v.unwrap_or(d) {
            0 => Err((format!("email.{k}"), "must be at least 1".to_string())),
            n if n > 1024 => Err((format!("email.{k}"), format!("{n}: at most 1024"))),
            n => Ok(n << 20),
        };
        let mailbox = self.mailbox.unwrap_or_else(|| "INBOX".into());
        if mailbox.is_empty() || mailbox.chars().any(|c| c.is_control() || c == '"') {
            return bad(
                "mailbox",
                format!("{mailbox:?} is not a usable mailbox name"),
            );
        }
        Ok(EmailConfig {
            username: self.username.unwrap_or_else(|| address.clone()),
            address,
            owner,
            allow,
            password_file: self.password_file,
            imap: Server {
                host: self.imap_host.trim().to_string(),
                port: self.imap_port.unwrap_or(match imap_security {
                    Security::Tls => 993,
                    Security::Starttls => 143,
                }),
                security: imap_security,
            },
            mailbox,
            smtp: Server {
                host: self.smtp_host.trim().to_string(),
                port: self.smtp_port.unwrap_or(match smtp_security {
                    Security::Tls => 465,
                    Security::Starttls => 587,
                }),
                security: smtp_security,
            },
            ca_file: self.ca_file,
            idle,
            max_message_bytes: mb(self.max_message_mb, 25, "max_message_mb")?,
            max_attachment_bytes: mb(self.max_attachments_mb, 10, "max_attachments_mb")?,
            replies_per_thread_per_hour: self.replies_per_thread_per_hour.unwrap_or(10),
            authserv_id: self.authserv_id.map(|s| s.trim().to_lowercase()),
        })
    }
}

impl EmailConfig {
    /// The password: `IOM_EMAIL_PASSWORD`, else the first line of `password_file`.
    pub fn password(&self, env: Option<String>) -> Result<String, String> {
        if let Some(p) = env.filter(|p| !p.is_empty()) {
            return Ok(p);
        }
        let Some(path) = &self.password_file else {
            return Err(format!(
                "no mail password: set {PASSWORD_ENV} or email.password_file"
            ));
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let p = text.lines().next().unwrap_or("").to_string();
        if p.is_empty() {
            return Err(format!("{} is empty", path.display()));
        }
        Ok(p)
    }

    /// The domain of the assistant's address (for Message-IDs).
    pub fn domain(&self) -> &str {
        self.address.rsplit('@').next().unwrap_or("localhost")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn raw() -> RawEmail {
        toml::from_str(
            r#"
            address = "Bot@Example.org"
            allow = ["me@example.org", "@family.example.org"]
            imap_host = "imap.example.org"
            smtp_host = "smtp.example.org"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn defaults_and_lower_case() {
        let c = raw().validate().unwrap();
        assert_eq!(c.address, "bot@example.org");
        assert_eq!(c.username, "bot@example.org");
        assert_eq!(c.imap.port, 993);
        assert_eq!(c.smtp.port, 587);
        assert_eq!(c.smtp.security, Security::Starttls);
        assert_eq!(c.mailbox, "INBOX");
        assert_eq!(c.max_attachment_bytes, 10 << 20);
        assert_eq!(c.domain(), "example.org");
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut r = raw();
        r.allow.push("not an address".into());
        assert_eq!(r.validate().unwrap_err().0, "email.allow");
        let mut r = raw();
        r.address = "nobody".into();
        assert_eq!(r.validate().unwrap_err().0, "email.address");
        let mut r = raw();
        r.idle_secs = Some(3600);
        assert_eq!(r.validate().unwrap_err().0, "email.idle_secs");
        let mut r = raw();
        r.max_message_mb = Some(0);
        assert_eq!(r.validate().unwrap_err().0, "email.max_message_mb");
    }

    #[test]
    fn the_password_comes_from_the_environment_or_the_file() {
        let c = raw().validate().unwrap();
        assert_eq!(c.password(Some("pw".into())).unwrap(), "pw");
        assert!(c.password(None).unwrap_err().contains(PASSWORD_ENV));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pass");
        std::fs::write(&file, "secret\n").unwrap();
        let mut r = raw();
        r.password_file = Some(file);
        assert_eq!(r.validate().unwrap().password(None).unwrap(), "secret");
    }
}
