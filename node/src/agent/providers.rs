//! The mesh's model providers made into clients: [`MeshModels`] reads the providers from the
//! synced settings document ([`iom_crdt::Models`]) on every request, finds each one's key on
//! this (the agent) device, and returns a [`ChainClient`] over the chosen provider and its
//! fallbacks.
//!
//! The agent's own `[agent]` configuration is always a provider too, named [`BUILTIN`]
//! (Anthropic, with `ANTHROPIC_API_KEY` or `agent.key_file`); with nothing configured in the
//! document it is the only one, so a mesh that never ran `iom models` behaves as before.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use iom_crdt::{DocId, ModelChoice, ModelSettings, Models, ProviderEntry, ProviderKind};

use super::chain::{ChainClient, Health, Link};
use super::claude::{ApiKey, ClaudeClient, ClaudeConfig, KeyError};
use super::model::{ClaudeFactory, ModelClient, ModelFactory, ModelSetupError};
use super::openai::{OpenAiClient, OpenAiConfig};
use crate::docs::{Docs, DocsError};

/// Name of the provider the agent's own `[agent]` settings define.
pub const BUILTIN: &str = "anthropic";

/// Reads the model settings (empty when the settings document does not exist yet).
pub async fn read_settings(docs: &Docs) -> Result<ModelSettings, DocsError> {
    if docs.meta(DocId::SETTINGS)?.is_none() {
        return Ok(ModelSettings::default());
    }
    docs.read(DocId::SETTINGS, |d| {
        Models::open(d).map(|m| m.read()).unwrap_or_default()
    })
    .await
}

/// Makes [`ChainClient`]s from the mesh's model settings (see the module docs).
pub struct MeshModels {
    docs: Docs,
    builtin: ClaudeFactory,
    health: Arc<Health>,
}

impl std::fmt::Debug for MeshModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshModels").finish_non_exhaustive()
    }
}

impl MeshModels {
    /// Providers from `docs`, with `builtin` (the `[agent]` settings) as [`BUILTIN`].
    pub fn new(docs: Docs, builtin: ClaudeFactory) -> MeshModels {
        MeshModels {
            docs,
            builtin,
            health: Arc::new(Health::default()),
        }
    }

    /// The health of the providers (shared by every request).
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// A client for one provider of the chain, with its `provider/model` label.
    fn link(
        &self,
        settings: &ModelSettings,
        choice: &ModelChoice,
    ) -> Result<(String, Arc<dyn ModelClient>), ModelSetupError> {
        let Some(entry) = settings.provider(&choice.provider) else {
            if choice.provider != BUILTIN {
                return Err(ModelSetupError::Unknown(choice.provider.clone()));
            }
            let key = self.builtin.key()?;
            let mut cfg = self.builtin.config(key);
            if let Some(m) = &choice.model {
                cfg = cfg.with_model(m.clone());
            }
            let label = format!("{BUILTIN}/{}", cfg.model);
            return Ok((label, Arc::new(ClaudeClient::new(cfg)?)));
        };
        let model = choice.model.clone().unwrap_or_else(|| entry.model.clone());
        let label = format!("{}/{model}", entry.name);
        let max_tokens = entry.max_tokens.unwrap_or(self.builtin.max_tokens);
        let setup = |reason: String| ModelSetupError::Provider {
            provider: entry.name.clone(),
            reason,
        };
        let client: Arc<dyn ModelClient> = match entry.kind {
            ProviderKind::Anthropic => {
                let key = match provider_key(entry)? {
                    Some(k) => k,
                    // Anthropic itself: the agent's own key.
                    None if entry.base_url.is_none() => self.builtin.key()?,
                    // A local server speaking the Messages API wants no key.
                    None => ApiKey::new("none").map_err(|e| setup(e.to_string()))?,
                };
                let mut cfg = ClaudeConfig::new(key)
                    .with_model(model)
                    .with_max_tokens(max_tokens)
                    .with_tool_choice(entry.tool_choice.clone());
                if let Some(url) = &entry.base_url {
                    cfg = cfg.with_base_url(url.clone());
                }
                if let Some(n) = entry.retries {
                    cfg = cfg.with_max_retries(n);
                }
                if let Some(t) = entry.timeout_secs {
                    cfg = cfg.with_request_timeout(Duration::from_secs(t));
                }
                Arc::new(ClaudeClient::new(cfg)?)
            }
            ProviderKind::Openai => {
                let base = entry
                    .base_url
                    .clone()
                    .ok_or_else(|| setup("no base_url".into()))?;
                let mut cfg = OpenAiConfig::new(base, model, max_tokens);
                cfg.api_key = provider_key(entry)?;
                cfg.tool_choice = entry.tool_choice.clone().filter(|c| c != "auto");
                if let Some(n) = entry.retries {
                    cfg.max_retries = n;
                }
                if let Some(t) = entry.timeout_secs {
                    cfg.request_timeout = Duration::from_secs(t);
                }
                Arc::new(OpenAiClient::new(cfg).map_err(|e| setup(e.to_string()))?)
            }
        };
        Ok((label, client))
    }

    /// The chain for `choice` under `settings` (see [`ModelSettings::chain`]). Providers
    /// that cannot be set up (a missing key) are left out with a notice, unless none can.
    pub fn chain(
        &self,
        settings: &ModelSettings,
        choice: Option<&str>,
    ) -> Result<ChainClient, ModelSetupError> {
        let choice = choice
            .map(|c| ModelChoice::parse(c).map_err(|e| ModelSetupError::Unknown(e.to_string())))
            .transpose()?;
        if let Some(c) = &choice
            && c.provider != BUILTIN
            && settings.provider(&c.provider).is_none()
        {
            return Err(ModelSetupError::Unknown(c.provider.clone()));
        }
        let mut links = Vec::new();
        let mut notices = Vec::new();
        let mut first_error = None;
        for c in settings.chain(choice.as_ref(), BUILTIN) {
            match self.link(settings, &c) {
                Ok((label, client)) => links.push(Link { label, client }),
                Err(e) => {
                    notices.push(format!("{c} was skipped: {e}"));
                    first_error.get_or_insert(e);
                }
            }
        }
        if links.is_empty() {
            return Err(first_error.unwrap_or_else(|| ModelSetupError::Unknown(BUILTIN.into())));
        }
        Ok(ChainClient::new(links, self.health.clone(), notices))
    }
}

impl ModelFactory for MeshModels {
    fn client(&self) -> Result<Arc<dyn ModelClient>, ModelSetupError> {
        Ok(Arc::new(self.chain(&ModelSettings::default(), None)?))
    }

    fn client_for<'a>(
        &'a self,
        choice: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Arc<dyn ModelClient>, ModelSetupError>> {
        Box::pin(async move {
            let settings = read_settings(&self.docs).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the model settings; using the defaults");
                ModelSettings::default()
            });
            for (key, why) in &settings.unreadable {
                tracing::warn!(%key, %why, "unreadable model provider entry");
            }
            Ok(Arc::new(self.chain(&settings, choice)?) as Arc<dyn ModelClient>)
        })
    }
}

/// The key a provider names (its environment variable, else its key file); `None` when it
/// names neither.
fn provider_key(entry: &ProviderEntry) -> Result<Option<ApiKey>, ModelSetupError> {
    if entry.key_env.is_none() && entry.key_file.is_none() {
        return Ok(None);
    }
    let env = entry
        .key_env
        .as_deref()
        .and_then(|v| std::env::var(v).ok())
        .filter(|v| !v.trim().is_empty());
    let missing = || {
        let mut how = Vec::new();
        if let Some(v) = &entry.key_env {
            how.push(format!("set {v} in the environment of the agent node"));
        }
        if let Some(f) = &entry.key_file {
            how.push(format!("write the key to {f} (chmod 600)"));
        }
        ModelSetupError::Provider {
            provider: entry.name.clone(),
            reason: format!("no key on the agent device: {}", how.join(", or ")),
        }
    };
    if let Some(v) = env {
        return ApiKey::new(v)
            .map(Some)
            .map_err(|e| ModelSetupError::Provider {
                provider: entry.name.clone(),
                reason: e.to_string(),
            });
    }
    let Some(file) = entry.key_file.as_deref() else {
        return Err(missing());
    };
    match ApiKey::from_env_or_file(None, Some(Path::new(file))) {
        Ok(k) => Ok(Some(k)),
        Err(KeyError::Missing { .. }) => Err(missing()),
        Err(e) => Err(ModelSetupError::Provider {
            provider: entry.name.clone(),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, kind: ProviderKind) -> ProviderEntry {
        ProviderEntry {
            name: name.into(),
            kind,
            base_url: Some("http://127.0.0.1:9".into()),
            model: "m".into(),
            key_env: None,
            key_file: None,
            max_tokens: None,
            local: false,
            tool_choice: None,
            retries: None,
            timeout_secs: None,
        }
    }

    #[test]
    fn keys_are_found_by_name_and_missing_keys_say_where_to_put_them() {
        let mut e = entry("gw", ProviderKind::Openai);
        assert!(matches!(provider_key(&e), Ok(None)));
        e.key_env = Some("IOM_TEST_SURELY_UNSET_KEY".into());
        e.key_file = Some("/nonexistent/key".into());
        let err = provider_key(&e)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("set IOM_TEST_SURELY_UNSET_KEY"), "{err}");
        assert!(err.contains("/nonexistent/key"), "{err}");
    }
}
