//! Model providers configured once for the mesh, kept in the settings document
//! ([`crate::DocId::SETTINGS`]).
//!
//! Layout (settings keys, each its own key so that devices adding different providers at the
//! same time merge):
//!
//! | key | value |
//! |---|---|
//! | `models.provider.NAME` | a [`ProviderEntry`] as a JSON object |
//! | `models.default` | the name of the default provider (a [`ModelChoice`] string) |
//! | `models.fallback` | list of provider names tried in order after the chosen one |
//!
//! **No secrets here**: a provider names where its key is on the agent device (an environment
//! variable or a key file), never the key itself. Unknown fields are refused, so a key pasted
//! into the wrong field (`api_key`) is an error, not a synced secret.

use std::borrow::{Borrow, BorrowMut};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::document::{Document, DocumentError};
use crate::settings::{Settings, SettingsError};

/// Settings key prefix of a provider entry.
pub const PROVIDER_PREFIX: &str = "models.provider.";
/// Settings key of the default provider.
pub const KEY_DEFAULT: &str = "models.default";
/// Settings key of the fallback chain.
pub const KEY_FALLBACK: &str = "models.fallback";
/// Longest provider name.
pub const MAX_NAME: usize = 64;

/// The API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// The Anthropic Messages API (`POST {base_url}/v1/messages`): Anthropic itself, or a
    /// server that speaks it (Ollama 0.14+, llama.cpp's `llama-server`).
    Anthropic,
    /// OpenAI-compatible chat completions (`POST {base_url}/v1/chat/completions`): llama.cpp,
    /// Ollama, vLLM, LM Studio, hosted gateways.
    Openai,
}

impl ProviderKind {
    /// The name used in settings and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Openai => "openai",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One configured provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderEntry {
    /// Its name (letters, digits, `-`, `_`, `.`), as used by `--model NAME`.
    pub name: String,
    /// The API it speaks.
    pub kind: ProviderKind,
    /// Base URL without the API path (`http://127.0.0.1:8080`); absent: the kind's hosted
    /// default (only for `anthropic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Model name sent to the server.
    pub model: String,
    /// Environment variable on the agent device that holds the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    /// Key file on the agent device (mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// `max_tokens` per reply; absent: the agent's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Runs on this mesh or its network (no hosted service): it is tried last whenever the
    /// chosen and fallback providers fail, so the assistant keeps answering offline.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    /// Tool choice on the first model call of a request: `auto` (absent), `required`, or
    /// `tool:NAME` (only that tool is offered and it must be called; for small local models
    /// that cannot decide), or for `openai` servers `schema` / `schema:NAME`: the call is
    /// forced by a JSON schema on the reply instead of `tool_choice`, for servers that ignore
    /// `tool_choice` (llama-server with small models). After tool results the model is asked
    /// to answer (`none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<String>,
    /// Retries of a failed call (429, 5xx, connection errors) before it counts as failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Longest wait (seconds) for the response and for each piece of the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// Why a provider entry or a model setting is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelsError {
    /// A field is unusable.
    #[error("{0}")]
    Invalid(String),
    /// No provider of that name.
    #[error("no model provider {0:?} (see `iom models list`)")]
    NotFound(String),
    /// A stored entry does not parse.
    #[error("stored provider entry {key:?} is unreadable: {reason}")]
    Unreadable {
        /// The settings key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The settings document failed.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The document is not a settings document.
    #[error(transparent)]
    Document(#[from] DocumentError),
}

fn invalid(msg: impl Into<String>) -> ModelsError {
    ModelsError::Invalid(msg.into())
}

/// Checks a provider name: 1 to [`MAX_NAME`] of letters, digits, `-`, `_`, `.`.
pub fn check_name(name: &str) -> Result<(), ModelsError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "provider name {name:?}: 1 to {MAX_NAME} letters, digits, '-', '_' or '.'"
        )))
    }
}

impl ProviderEntry {
    /// Checks every field (no I/O: URLs are checked for form only).
    pub fn validate(&self) -> Result<(), ModelsError> {
        check_name(&self.name)?;
        let model = self.model.trim();
        if model.is_empty() || model.len() > 256 || model.chars().any(char::is_control) {
            return Err(invalid("model: 1 to 256 printable characters"));
        }
        match &self.base_url {
            Some(url) => {
                let rest = url
                    .strip_prefix("http://")
                    .or_else(|| url.strip_prefix("https://"));
                if rest.is_none_or(|r| r.is_empty() || r.chars().any(char::is_whitespace)) {
                    return Err(invalid(format!(
                        "base_url {url:?}: an http:// or https:// URL without the API path"
                    )));
                }
            }
            None if self.kind == ProviderKind::Openai => {
                return Err(invalid(
                    "base_url is required for an openai provider (e.g. http://127.0.0.1:8080)",
                ));
            }
            None => {}
        }
        if let Some(var) = &self.key_env {
            let ok = !var.is_empty()
                && var.len() <= 128
                && var
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                && !var.as_bytes()[0].is_ascii_digit();
            if !ok {
                return Err(invalid(format!(
                    "key_env {var:?}: the NAME of an environment variable (A-Z, 0-9, _), not a key"
                )));
            }
        }
        if let Some(path) = &self.key_file
            && !path.starts_with('/')
        {
            return Err(invalid(format!(
                "key_file {path:?}: an absolute path on the agent device"
            )));
        }
        if self.max_tokens == Some(0) {
            return Err(invalid("max_tokens must be at least 1"));
        }
        if self.timeout_secs == Some(0) {
            return Err(invalid("timeout_secs must be at least 1"));
        }
        if let Some(choice) = &self.tool_choice {
            let named = |prefix| {
                choice
                    .strip_prefix(prefix)
                    .is_some_and(|t: &str| !t.is_empty() && t.len() <= 64)
            };
            let by_schema = choice == "schema" || named("schema:");
            let ok = matches!(choice.as_str(), "auto" | "required" | "none")
                || named("tool:")
                || by_schema;
            if !ok {
                return Err(invalid(format!(
                    "tool_choice {choice:?}: auto, required, none, tool:NAME, schema or schema:NAME"
                )));
            }
            if by_schema && self.kind != ProviderKind::Openai {
                return Err(invalid(format!(
                    "tool_choice {choice:?}: forcing by schema (response_format) is for openai \
                     servers; use required or tool:NAME"
                )));
            }
        }
        Ok(())
    }

    /// `name/model`, as recorded on answers.
    pub fn label(&self) -> String {
        format!("{}/{}", self.name, self.model)
    }
}

/// A model choice: `NAME` (a provider) or `NAME/MODEL` (a provider with another model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelChoice {
    /// The provider's name.
    pub provider: String,
    /// Another model of that provider.
    pub model: Option<String>,
}

impl ModelChoice {
    /// Parses `NAME` or `NAME/MODEL`.
    pub fn parse(text: &str) -> Result<ModelChoice, ModelsError> {
        let text = text.trim();
        let (provider, model) = match text.split_once('/') {
            Some((p, m)) => (p, Some(m.trim())),
            None => (text, None),
        };
        check_name(provider)?;
        if let Some(m) = model
            && (m.is_empty() || m.len() > 256 || m.chars().any(char::is_control))
        {
            return Err(invalid(format!(
                "model {m:?}: 1 to 256 printable characters"
            )));
        }
        Ok(ModelChoice {
            provider: provider.to_owned(),
            model: model.map(str::to_owned),
        })
    }
}

impl fmt::Display for ModelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.model {
            Some(m) => write!(f, "{}/{m}", self.provider),
            None => f.write_str(&self.provider),
        }
    }
}

/// Everything the mesh has configured about models.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ModelSettings {
    /// The providers, sorted by name.
    pub providers: Vec<ProviderEntry>,
    /// The default choice (`NAME` or `NAME/MODEL`), if set.
    pub default: Option<String>,
    /// Provider names tried in order after the chosen one.
    pub fallback: Vec<String>,
    /// Entries that could not be read (key and reason), kept out of `providers`.
    pub unreadable: Vec<(String, String)>,
}

impl ModelSettings {
    /// The provider called `name`.
    pub fn provider(&self, name: &str) -> Option<&ProviderEntry> {
        self.providers.iter().find(|p| p.name == name)
    }

    /// The providers to try for a request that asked for `choice` (or the default), in
    /// order: the chosen one, then the fallback chain, then every `local` provider not yet
    /// in it. Names without a provider are skipped; `builtin` stands for the provider that
    /// the agent's own configuration defines (used when a name is not in this document).
    pub fn chain(&self, choice: Option<&ModelChoice>, builtin: &str) -> Vec<ModelChoice> {
        let first = choice.cloned().or_else(|| {
            self.default
                .as_deref()
                .and_then(|d| ModelChoice::parse(d).ok())
        });
        let first = first.unwrap_or_else(|| ModelChoice {
            provider: builtin.to_owned(),
            model: None,
        });
        let known = |n: &str| n == builtin || self.provider(n).is_some();
        let mut out: Vec<ModelChoice> = Vec::new();
        let push = |c: ModelChoice, out: &mut Vec<ModelChoice>| {
            if known(&c.provider) && !out.iter().any(|o| o.provider == c.provider) {
                out.push(c);
            }
        };
        push(first, &mut out);
        for name in &self.fallback {
            push(
                ModelChoice {
                    provider: name.clone(),
                    model: None,
                },
                &mut out,
            );
        }
        for p in self.providers.iter().filter(|p| p.local) {
            push(
                ModelChoice {
                    provider: p.name.clone(),
                    model: None,
                },
                &mut out,
            );
        }
        out
    }
}

/// Typed access to the models part of the settings document.
#[derive(Debug)]
pub struct Models<D>(Settings<D>);

impl<D: Borrow<Document>> Models<D> {
    /// Wraps a settings document.
    pub fn open(doc: D) -> Result<Self, DocumentError> {
        Settings::open(doc).map(Models)
    }

    /// Everything configured.
    pub fn read(&self) -> ModelSettings {
        let mut out = ModelSettings::default();
        for (key, value) in self.0.list() {
            if let Some(name) = key.strip_prefix(PROVIDER_PREFIX) {
                match serde_json::from_value::<ProviderEntry>(value) {
                    Ok(p) if p.name == name && p.validate().is_ok() => out.providers.push(p),
                    Ok(_) => out
                        .unreadable
                        .push((key.clone(), "its name or fields are invalid".into())),
                    Err(e) => out.unreadable.push((key.clone(), e.to_string())),
                }
            } else if key == KEY_DEFAULT {
                out.default = value.as_str().map(str::to_owned);
            } else if key == KEY_FALLBACK {
                out.fallback = value
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
            }
        }
        out
    }
}

impl<D: BorrowMut<Document>> Models<D> {
    /// Adds or replaces a provider.
    pub fn put_provider(&mut self, entry: &ProviderEntry, now: i64) -> Result<(), ModelsError> {
        entry.validate()?;
        let value = serde_json::to_value(entry).map_err(|e| invalid(e.to_string()))?;
        self.0
            .set(&format!("{PROVIDER_PREFIX}{}", entry.name), &value, now)?;
        Ok(())
    }

    /// Removes a provider (and its place in the fallback chain and as the default).
    pub fn remove_provider(&mut self, name: &str, now: i64) -> Result<(), ModelsError> {
        if !self.0.remove(&format!("{PROVIDER_PREFIX}{name}"), now)? {
            return Err(ModelsError::NotFound(name.to_owned()));
        }
        let current = self.read();
        if current.fallback.iter().any(|n| n == name) {
            let rest: Vec<&String> = current.fallback.iter().filter(|n| *n != name).collect();
            self.0.set(KEY_FALLBACK, &serde_json::json!(rest), now)?;
        }
        if current
            .default
            .as_deref()
            .and_then(|d| ModelChoice::parse(d).ok())
            .is_some_and(|c| c.provider == name)
        {
            self.0.remove(KEY_DEFAULT, now)?;
        }
        Ok(())
    }

    /// Sets the default choice; `builtin` is the name of the agent's own provider (always
    /// accepted).
    pub fn set_default(
        &mut self,
        choice: &ModelChoice,
        builtin: &str,
        now: i64,
    ) -> Result<(), ModelsError> {
        if choice.provider != builtin && self.read().provider(&choice.provider).is_none() {
            return Err(ModelsError::NotFound(choice.provider.clone()));
        }
        self.0
            .set(KEY_DEFAULT, &Json::String(choice.to_string()), now)?;
        Ok(())
    }

    /// Sets the fallback chain (every name must be a provider or `builtin`).
    pub fn set_fallback(
        &mut self,
        names: &[String],
        builtin: &str,
        now: i64,
    ) -> Result<(), ModelsError> {
        let current = self.read();
        for n in names {
            if n != builtin && current.provider(n).is_none() {
                return Err(ModelsError::NotFound(n.clone()));
            }
        }
        self.0.set(KEY_FALLBACK, &serde_json::json!(names), now)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actor::actor_for;
    use crate::kind::DocKind;

    fn local(name: &str) -> ProviderEntry {
        ProviderEntry {
            name: name.into(),
            kind: ProviderKind::Openai,
            base_url: Some("http://127.0.0.1:8080".into()),
            model: "smollm2".into(),
            key_env: None,
            key_file: None,
            max_tokens: None,
            local: true,
            tool_choice: None,
            retries: None,
            timeout_secs: None,
        }
    }

    #[test]
    fn add_default_fallback_remove_and_chain() {
        let mut d = Document::new(DocKind::Settings, &actor_for(&[1; 32], [1; 8]), 1).expect("new");
        let mut m = Models::open(&mut d).expect("open");
        m.put_provider(&local("llama"), 2).expect("add");
        let mut gw = local("gateway");
        gw.local = false;
        gw.key_env = Some("GATEWAY_KEY".into());
        m.put_provider(&gw, 2).expect("add");
        m.set_default(
            &ModelChoice::parse("gateway/big").expect("parse"),
            "anthropic",
            3,
        )
        .expect("default");
        m.set_fallback(&["anthropic".into()], "anthropic", 3)
            .expect("fallback");
        assert!(matches!(
            m.set_fallback(&["nope".into()], "anthropic", 3),
            Err(ModelsError::NotFound(_))
        ));
        let s = m.read();
        assert_eq!(s.providers.len(), 2);
        let chain: Vec<String> = s
            .chain(None, "anthropic")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(chain, ["gateway/big", "anthropic", "llama"]);
        let asked = ModelChoice::parse("llama").expect("parse");
        let chain: Vec<String> = s
            .chain(Some(&asked), "anthropic")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(chain, ["llama", "anthropic"]);
        m.remove_provider("gateway", 4).expect("rm");
        let s = m.read();
        assert_eq!(s.default, None);
        assert!(matches!(
            m.remove_provider("gateway", 5),
            Err(ModelsError::NotFound(_))
        ));
        // With nothing configured, the agent's own provider answers.
        let empty = ModelSettings::default();
        let chain = empty.chain(None, "anthropic");
        assert_eq!(chain.len(), 1);
        assert_eq!(chain[0].provider, "anthropic");
    }

    #[test]
    fn secrets_and_bad_fields_are_refused() {
        let key_in_entry = serde_json::json!({
            "name": "x", "kind": "openai", "base_url": "http://h", "model": "m",
            "api_key": "sk-secret"
        });
        assert!(serde_json::from_value::<ProviderEntry>(key_in_entry).is_err());
        let mut p = local("x");
        p.key_env = Some("sk-ant-abc".into());
        assert!(p.validate().is_err());
        let mut p = local("x");
        p.base_url = Some("ftp://h".into());
        assert!(p.validate().is_err());
        let mut p = local("bad name");
        assert!(p.validate().is_err());
        p.name = "ok".into();
        p.tool_choice = Some("tool:bash".into());
        assert!(p.validate().is_ok());
        p.tool_choice = Some("maybe".into());
        assert!(p.validate().is_err());
        p.tool_choice = Some("schema:bash".into());
        assert!(p.validate().is_ok(), "local() is an openai server");
        p.kind = ProviderKind::Anthropic;
        assert!(
            p.validate()
                .is_err_and(|e| e.to_string().contains("for openai"))
        );
        let mut p = local("x");
        p.base_url = None;
        assert!(p.validate().is_err(), "openai needs a base URL");
        assert!(ModelChoice::parse("a/b/c").is_ok_and(|c| c.model.as_deref() == Some("b/c")));
        assert!(ModelChoice::parse("").is_err());
    }

    #[test]
    fn unreadable_entries_are_reported_not_used() {
        let mut d = Document::new(DocKind::Settings, &actor_for(&[1; 32], [1; 8]), 1).expect("new");
        let mut s = Settings::open(&mut d).expect("open");
        s.set("models.provider.junk", &serde_json::json!({"name": 3}), 2)
            .expect("set");
        s.set(
            "models.provider.other",
            &serde_json::to_value(local("mismatch")).expect("json"),
            2,
        )
        .expect("set");
        let m = Models::open(&d).expect("open");
        let r = m.read();
        assert!(r.providers.is_empty());
        assert_eq!(r.unreadable.len(), 2);
    }
}
