//! Secrets of MCP servers: where on the agent node a value comes from, never the value.
//!
//! A declaration (which syncs to every device) holds a **template** such as
//! `Bearer {env:GITHUB_TOKEN}` or `{file:/etc/iom/secrets/api-key}`: literal text around one
//! placeholder that names an environment variable of the agent node's process or a file on
//! the agent node (mode `0600` or stricter, like the model key file). The value is read on the
//! agent node when it is needed (each proxied request, each container start), so a rotated
//! file is used without a restart; it never enters a synced document, an image or a
//! workspace. Errors name the source, never the value.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest secret file read.
const MAX_SECRET_BYTES: u64 = 16 * 1024;

/// Where a secret's value is on the agent node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable of the agent node's process.
    Env(String),
    /// A file on the agent node (absolute path).
    File(PathBuf),
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Env(v) => write!(f, "environment variable {v} of the agent node"),
            SecretSource::File(p) => write!(f, "file {} on the agent node", p.display()),
        }
    }
}

/// Literal text around one secret placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    before: String,
    source: SecretSource,
    after: String,
}

impl Template {
    /// Parses `text {env:NAME} text` or `text {file:/path} text` (exactly one placeholder).
    pub fn parse(text: &str) -> Result<Template, String> {
        let hint = "write {env:VARIABLE} or {file:/absolute/path} where the secret goes";
        let Some(open) = text.find('{') else {
            return Err(format!(
                "{text:?} has no secret placeholder: {hint} (never the secret itself: \
                 declarations sync to every device)"
            ));
        };
        let Some(len) = text[open..].find('}') else {
            return Err(format!("{text:?}: the placeholder has no closing }}"));
        };
        let inner = &text[open + 1..open + len];
        let (before, after) = (&text[..open], &text[open + len + 1..]);
        if after.contains('{') {
            return Err(format!("{text:?}: only one placeholder per value"));
        }
        let source = if let Some(v) = inner.strip_prefix("env:") {
            let ok = !v.is_empty()
                && !v.starts_with(|c: char| c.is_ascii_digit())
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(format!("{v:?} is not an environment variable name"));
            }
            SecretSource::Env(v.to_string())
        } else if let Some(p) = inner.strip_prefix("file:") {
            if !p.starts_with('/') || p.contains('\0') {
                return Err(format!("{p:?}: a secret file needs an absolute path"));
            }
            SecretSource::File(PathBuf::from(p))
        } else {
            return Err(format!("{{{inner}}} is not a placeholder: {hint}"));
        };
        if !header_safe(before) || !header_safe(after) {
            return Err(format!("{text:?} contains control characters"));
        }
        Ok(Template {
            before: before.to_string(),
            source,
            after: after.to_string(),
        })
    }

    /// Where the secret comes from.
    pub fn source(&self) -> &SecretSource {
        &self.source
    }

    /// The text with the secret filled in, read now.
    pub fn render(&self) -> Result<String, String> {
        let value = read(&self.source)?;
        Ok(format!("{}{value}{}", self.before, self.after))
    }
}

/// Text a header value (or an environment variable) can carry: no CR, LF, NUL or other
/// control characters except tab.
fn header_safe(s: &str) -> bool {
    !s.chars().any(|c| c.is_control() && c != '\t')
}

/// Reads a secret's value (trimmed).
pub fn read(source: &SecretSource) -> Result<String, String> {
    let value = match source {
        SecretSource::Env(v) => std::env::var(v).map_err(|_| format!("{source} is not set"))?,
        SecretSource::File(p) => read_file(p)?,
    };
    let value = value.trim().to_string();
    if value.is_empty() {
        return Err(format!("{source} is empty"));
    }
    if !header_safe(&value) {
        return Err(format!(
            "{source} holds control characters (a secret must be one line)"
        ));
    }
    Ok(value)
}

fn read_file(path: &Path) -> Result<String, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // Check the opened file itself, so a swap between check and read cannot fool us.
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "refusing secret file {}: its mode is {mode:04o}, readable by group or others; \
                 run `chmod 600 {}`",
                path.display(),
                path.display()
            ));
        }
    }
    if !meta.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    let mut text = String::new();
    file.take(MAX_SECRET_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn templates_need_one_placeholder_and_never_a_value() {
        let t = Template::parse("Bearer {env:IOM_TEST_EGRESS_TOKEN}").unwrap();
        assert_eq!(
            t.source(),
            &SecretSource::Env("IOM_TEST_EGRESS_TOKEN".into())
        );
        let f = Template::parse("{file:/etc/iom/key}").unwrap();
        assert_eq!(f.source(), &SecretSource::File("/etc/iom/key".into()));
        for (bad, says) in [
            ("Bearer sk-123", "no secret placeholder"),
            ("{env:A} {env:B}", "one placeholder"),
            ("{env:1X}", "not an environment variable"),
            ("{file:relative}", "absolute"),
            ("{vault:x}", "not a placeholder"),
            ("{env:X", "closing"),
            ("a\r\nb {env:X}", "control"),
        ] {
            let e = Template::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn files_must_be_private_and_values_one_line() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "s3cret-value\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let t = Template::parse(&format!("token {{file:{}}}!", p.display())).unwrap();
        let e = t.render().unwrap_err();
        assert!(e.contains("chmod 600") && !e.contains("s3cret"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(t.render().unwrap(), "token s3cret-value!");
        std::fs::write(&p, "two\nlines").unwrap();
        let e = t.render().unwrap_err();
        assert!(e.contains("one line") && !e.contains("two"), "{e}");
        let missing = Template::parse("{env:IOM_TEST_EGRESS_SURELY_UNSET}").unwrap();
        assert!(missing.render().unwrap_err().contains("is not set"));
    }
}
