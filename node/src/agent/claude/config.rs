//! Client configuration and the API key.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default API endpoint.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
/// The default model.
pub const DEFAULT_MODEL: &str = "claude-sonnet-4-5";
/// The `anthropic-version` header value this client speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Largest key file accepted.
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

/// An Anthropic API key. Its `Debug` output is `ApiKey(***)`; it has no `Display`, so it
/// cannot end up in a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// Why no usable API key was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Neither the environment value nor the key file gave a key.
    #[error(
        "no Anthropic API key: set ANTHROPIC_API_KEY in the environment of the agent node \
         (export ANTHROPIC_API_KEY=sk-ant-...), or write the key to {} and run `chmod 600` on it",
        key_file.as_deref().map_or_else(|| "the configured key file".to_owned(), |p| p.display().to_string())
    )]
    Missing {
        /// The key file that was looked for, if one is configured.
        key_file: Option<PathBuf>,
    },
    /// The key file can be read by other users.
    #[error(
        "refusing to use API key file {}: its mode is {mode:04o}, readable by group or others; \
         run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file exists but could not be read.
    #[error("cannot read API key file {}: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key is empty or holds characters an HTTP header cannot carry.
    #[error("the API key from {origin} is malformed: {reason}")]
    Malformed {
        /// `ANTHROPIC_API_KEY` or the file path.
        origin: String,
        /// What is wrong (never the key itself).
        reason: &'static str,
    },
}

impl ApiKey {
    /// Wraps a key after checking it can be sent as a header value.
    pub fn new(key: impl Into<String>) -> Result<Self, KeyError> {
        Self::checked(key.into(), "the caller".to_owned())
    }

    fn checked(key: String, origin: String) -> Result<Self, KeyError> {
        let key = key.trim().to_owned();
        if key.is_empty() {
            return Err(KeyError::Malformed {
                origin,
                reason: "it is empty",
            });
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(KeyError::Malformed {
                origin,
                reason: "it contains spaces, control or non-ASCII characters",
            });
        }
        Ok(Self(key))
    }

    /// Finds the key: a non-empty `env_value` (the caller's `ANTHROPIC_API_KEY`) wins;
    /// otherwise `key_file` is read, which must not be readable by group or others (mode
    /// `0600` or stricter). Surrounding whitespace is trimmed.
    pub fn from_env_or_file(
        env_value: Option<String>,
        key_file: Option<&Path>,
    ) -> Result<Self, KeyError> {
        if let Some(v) = env_value.filter(|v| !v.trim().is_empty()) {
            return Self::checked(v, "ANTHROPIC_API_KEY".to_owned());
        }
        let Some(path) = key_file else {
            return Err(KeyError::Missing { key_file: None });
        };
        let read_err = |source| KeyError::Read {
            path: path.to_owned(),
            source,
        };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyError::Missing {
                    key_file: Some(path.to_owned()),
                });
            }
            Err(e) => return Err(read_err(e)),
        };
        // Check the opened file itself, so a swap between check and read cannot fool us.
        let meta = file.metadata().map_err(read_err)?;
        check_permissions(path, &meta)?;
        let mut text = String::new();
        file.take(MAX_KEY_FILE_BYTES)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        Self::checked(text, path.display().to_string())
    }

    /// The secret, for the `x-api-key` header only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

#[cfg(unix)]
fn check_permissions(path: &Path, meta: &std::fs::Metadata) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_path: &Path, _meta: &std::fs::Metadata) -> Result<(), KeyError> {
    Ok(())
}

/// Settings of a [`ClaudeClient`](super::ClaudeClient). Build with [`ClaudeConfig::new`] and
/// the `with_*` setters.
#[derive(Debug, Clone)]
pub struct ClaudeConfig {
    /// The API key (sent as `x-api-key`).
    pub api_key: ApiKey,
    /// Base URL without `/v1/messages` (from `ANTHROPIC_BASE_URL`; default
    /// [`DEFAULT_BASE_URL`]).
    pub base_url: String,
    /// Model name.
    pub model: String,
    /// Default `max_tokens` per reply.
    pub max_tokens: u32,
    /// Retries after the first attempt on 429, 5xx, 529, connection errors and in-stream
    /// overload errors.
    pub max_retries: u32,
    /// Longest wait for the response headers, and for each chunk of the stream after that.
    pub request_timeout: Duration,
    /// First backoff delay; doubles per retry (with jitter).
    pub retry_base_delay: Duration,
    /// Largest computed backoff delay (a server's `retry-after` is honoured up to 60 s).
    pub retry_max_delay: Duration,
    /// Mark prompt-caching breakpoints in each request ([`super::cache`]). On by default; a
    /// server that speaks the Messages API but rejects `cache_control` needs it off.
    pub prompt_caching: bool,
    /// A provider's `tool_choice` setting (`required`, `none`, `tool:NAME`); `None`: auto.
    pub tool_choice: Option<String>,
}

impl ClaudeConfig {
    /// Defaults: [`DEFAULT_BASE_URL`], [`DEFAULT_MODEL`], 4096 max tokens, 4 retries, 120 s
    /// timeout, backoff from 500 ms up to 60 s, prompt caching on.
    pub fn new(api_key: ApiKey) -> Self {
        Self {
            api_key,
            base_url: DEFAULT_BASE_URL.to_owned(),
            model: DEFAULT_MODEL.to_owned(),
            max_tokens: 4096,
            max_retries: 4,
            request_timeout: Duration::from_secs(120),
            retry_base_delay: Duration::from_millis(500),
            retry_max_delay: Duration::from_secs(60),
            prompt_caching: true,
            tool_choice: None,
        }
    }

    /// Turns prompt-caching breakpoints on or off.
    pub fn with_prompt_caching(mut self, on: bool) -> Self {
        self.prompt_caching = on;
        self
    }

    /// Sets the tool choice (`required`, `none`, `tool:NAME`; see
    /// [`iom_crdt::ProviderEntry::tool_choice`]).
    pub fn with_tool_choice(mut self, choice: Option<String>) -> Self {
        self.tool_choice = choice.filter(|c| c != "auto");
        self
    }

    /// Sets the base URL (e.g. from `ANTHROPIC_BASE_URL`).
    pub fn with_base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = url.into();
        self
    }

    /// Sets the model.
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = model.into();
        self
    }

    /// Sets the default `max_tokens`.
    pub fn with_max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = n;
        self
    }

    /// Sets the number of retries.
    pub fn with_max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Sets the response/idle timeout.
    pub fn with_request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }

    /// Sets the backoff range.
    pub fn with_retry_delays(mut self, base: Duration, max: Duration) -> Self {
        self.retry_base_delay = base;
        self.retry_max_delay = max;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write_key(dir: &Path, mode: u32, text: &str) -> std::io::Result<PathBuf> {
        let path = dir.join("key");
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        Ok(path)
    }

    #[test]
    fn key_file_with_0600_is_read_and_trimmed() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = write_key(dir.path(), 0o600, "  sk-ant-secret\n")?;
        let key = ApiKey::from_env_or_file(None, Some(&path))?;
        assert_eq!(key.expose(), "sk-ant-secret");
        assert_eq!(format!("{key:?}"), "ApiKey(***)");
        let path = write_key(dir.path(), 0o400, "sk-ant-ro")?;
        assert_eq!(
            ApiKey::from_env_or_file(None, Some(&path))?.expose(),
            "sk-ant-ro"
        );
        Ok(())
    }

    #[test]
    fn group_or_world_readable_key_file_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let path = write_key(dir.path(), mode, "sk-ant-secret")?;
            let err = ApiKey::from_env_or_file(None, Some(&path))
                .err()
                .ok_or("accepted an insecure key file")?;
            assert!(matches!(err, KeyError::InsecurePermissions { .. }), "{err}");
            let text = err.to_string();
            assert!(text.contains("chmod 600"), "{text}");
            assert!(!text.contains("sk-ant-secret"));
        }
        Ok(())
    }

    #[test]
    fn env_value_wins_and_missing_explains_how_to_set() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = write_key(dir.path(), 0o644, "from-file")?;
        let key = ApiKey::from_env_or_file(Some("sk-env\n".into()), Some(&path))?;
        assert_eq!(key.expose(), "sk-env");

        let missing = dir.path().join("nope");
        let err = ApiKey::from_env_or_file(Some("  ".into()), Some(&missing))
            .err()
            .ok_or("found a key")?;
        assert!(matches!(err, KeyError::Missing { .. }));
        let text = err.to_string();
        assert!(text.contains("ANTHROPIC_API_KEY"), "{text}");
        assert!(text.contains(&missing.display().to_string()), "{text}");
        assert!(matches!(
            ApiKey::from_env_or_file(None, None),
            Err(KeyError::Missing { key_file: None })
        ));
        Ok(())
    }

    #[test]
    fn empty_or_malformed_key_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = write_key(dir.path(), 0o600, "\n\n")?;
        assert!(matches!(
            ApiKey::from_env_or_file(None, Some(&path)),
            Err(KeyError::Malformed { .. })
        ));
        assert!(matches!(
            ApiKey::new("sk ant"),
            Err(KeyError::Malformed { .. })
        ));
        Ok(())
    }
}
