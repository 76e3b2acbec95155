//! The model seam: a [`ModelClient`] streams one reply, a [`ModelFactory`] makes a client for
//! each request (so a new API key or setting is picked up without a restart, and a missing key
//! fails the request with a clear reason instead of the node).
//!
//! The Anthropic client ([`ClaudeClient`]) is the production implementation; other providers
//! implement the same trait. Tests use scripted fakes.

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::claude::{
    ApiKey, ClaudeClient, ClaudeConfig, ClaudeError, ConfigError, KeyError, MessagesRequest,
    StreamEvent, Turn,
};

/// Which model answered, and what the user should be told about how (a fallback).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelReport {
    /// `provider/model` of the provider that produced the last reply.
    pub model: Option<String>,
    /// Sentences for the user, e.g. that the primary was overloaded and another answered.
    pub notices: Vec<String>,
}

/// Streams model replies.
pub trait ModelClient: Send + Sync {
    /// Sends `req` and returns the assembled reply, reporting text deltas and retries to `on`
    /// as they happen. Retries of transient failures happen inside.
    fn stream<'a>(
        &'a self,
        req: &'a MessagesRequest,
        on: &'a mut (dyn FnMut(StreamEvent) + Send),
    ) -> BoxFuture<'a, Result<Turn, ClaudeError>>;

    /// What this model takes in its prompt besides text (images, PDFs). Attachments it does
    /// not take stay in the workspace, and the user is told.
    fn accepts(&self) -> super::prompt_files::Accepts {
        super::prompt_files::Accepts::ALL
    }

    /// Which model produced the replies so far, and notices for the user (nothing known by
    /// default).
    fn report(&self) -> ModelReport {
        ModelReport::default()
    }

    /// The model the next call goes to first (`provider/model` or a bare model name), which
    /// prices the run's budget; `None` when unknown.
    fn primary(&self) -> Option<String> {
        None
    }
}

/// The model name in a `provider/model` label (the label itself when it has no provider).
pub fn model_name(label: &str) -> &str {
    label.split_once('/').map_or(label, |(_, model)| model)
}

impl ModelClient for super::openai::OpenAiClient {
    fn stream<'a>(
        &'a self,
        req: &'a MessagesRequest,
        on: &'a mut (dyn FnMut(StreamEvent) + Send),
    ) -> BoxFuture<'a, Result<Turn, ClaudeError>> {
        Box::pin(super::openai::OpenAiClient::stream(self, req, on))
    }

    fn accepts(&self) -> super::prompt_files::Accepts {
        // OpenAI-compatible servers take images as `image_url` parts; PDFs stay in the
        // workspace.
        super::prompt_files::Accepts {
            images: true,
            pdfs: false,
        }
    }

    fn primary(&self) -> Option<String> {
        Some(self.model().to_owned())
    }
}

impl ModelClient for ClaudeClient {
    fn stream<'a>(
        &'a self,
        req: &'a MessagesRequest,
        on: &'a mut (dyn FnMut(StreamEvent) + Send),
    ) -> BoxFuture<'a, Result<Turn, ClaudeError>> {
        Box::pin(ClaudeClient::stream(self, req, on))
    }

    fn primary(&self) -> Option<String> {
        Some(self.config().model.clone())
    }
}

/// Why no model client could be made for a request (the request fails with this reason).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelSetupError {
    /// There is no usable API key on the agent device.
    #[error("the agent device ({device}) has no usable Anthropic API key: {source}")]
    NoKey {
        /// The agent device's name.
        device: String,
        /// Why the key is unusable.
        source: KeyError,
    },
    /// The agent's model settings are invalid.
    #[error("invalid agent configuration: {0}")]
    Config(#[from] ConfigError),
    /// A configured provider cannot be used.
    #[error("model provider {provider}: {reason}")]
    Provider {
        /// Its name.
        provider: String,
        /// Why (never a key).
        reason: String,
    },
    /// The model asked for is not configured.
    #[error("no model provider {0:?} is configured (see `iom models list`)")]
    Unknown(String),
}

/// Makes a model client for a request.
pub trait ModelFactory: Send + Sync {
    /// A client for the default model, ready to use, or why there is none.
    fn client(&self) -> Result<Arc<dyn ModelClient>, ModelSetupError>;

    /// A client for the model a request asked for (`NAME` or `NAME/MODEL`; `None`: the
    /// default), with its fallback chain. By default the choice is ignored.
    fn client_for<'a>(
        &'a self,
        choice: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Arc<dyn ModelClient>, ModelSetupError>> {
        let _ = choice;
        Box::pin(async move { self.client() })
    }
}

/// Makes [`ClaudeClient`]s from the agent's settings; the key is read on every request.
#[derive(Debug, Clone)]
pub struct ClaudeFactory {
    /// This device's name (for the error message when the key is missing).
    pub device_name: String,
    /// `ANTHROPIC_API_KEY`, if set.
    pub api_key: Option<String>,
    /// `agent.key_file`.
    pub key_file: Option<PathBuf>,
    /// `agent.model`.
    pub model: String,
    /// `agent.max_tokens`.
    pub max_tokens: u32,
    /// `agent.base_url` (or `ANTHROPIC_BASE_URL`).
    pub base_url: Option<String>,
}

impl ModelFactory for ClaudeFactory {
    fn client(&self) -> Result<Arc<dyn ModelClient>, ModelSetupError> {
        let key = self.key()?;
        Ok(Arc::new(ClaudeClient::new(self.config(key))?))
    }
}

impl ClaudeFactory {
    /// The client settings for `key`.
    pub fn config(&self, key: ApiKey) -> ClaudeConfig {
        let mut cfg = ClaudeConfig::new(key)
            .with_model(self.model.clone())
            .with_max_tokens(self.max_tokens);
        if let Some(url) = &self.base_url {
            cfg = cfg.with_base_url(url.clone());
        }
        cfg
    }

    /// The key from `ANTHROPIC_API_KEY` or the agent's key file.
    pub fn key(&self) -> Result<ApiKey, ModelSetupError> {
        ApiKey::from_env_or_file(self.api_key.clone(), self.key_file.as_deref()).map_err(|source| {
            ModelSetupError::NoKey {
                device: self.device_name.clone(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factory() -> ClaudeFactory {
        ClaudeFactory {
            device_name: "home".into(),
            api_key: None,
            key_file: None,
            model: "claude-test".into(),
            max_tokens: 100,
            base_url: None,
        }
    }

    #[test]
    fn missing_key_names_the_device() {
        let err = factory().client().err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(
            err.starts_with("the agent device (home) has no usable Anthropic API key"),
            "{err}"
        );
    }

    #[test]
    fn bad_settings_are_a_config_error() {
        let mut f = factory();
        f.api_key = Some("sk-test".into());
        f.base_url = Some("ftp://example.com".into());
        let err = f.client().err();
        assert!(matches!(err, Some(ModelSetupError::Config(_))), "{err:?}");
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.starts_with("invalid agent configuration: "), "{text}");
        f.base_url = None;
        assert!(f.client().is_ok());
    }
}
