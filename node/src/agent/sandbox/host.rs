//! [`DockerHost`]: the [`ToolHost`] of the agent, tools in the conversation's container.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Sandbox, SandboxConfig};
use crate::agent::claude::ToolResult;
use crate::agent::host::{ToolHost, ToolHostError};

/// The Docker sandbox as a [`ToolHost`]. Docker is connected on first use; a failed
/// connection is not kept, so the next call tries again (Docker may have been started, or the
/// error is shown again, fresh). On connecting, orphans of an earlier run are removed and the
/// idle reaper starts; [`ToolHost::shutdown`] stops it and removes every container.
pub struct DockerHost {
    config: SandboxConfig,
    data_dir: PathBuf,
    node: String,
    sandbox: tokio::sync::Mutex<Option<Arc<Sandbox>>>,
    reaper: Mutex<Option<JoinHandle<()>>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for DockerHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerHost")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl DockerHost {
    /// A host for the node `node` (its containers are labelled with it), with workspaces
    /// under `data_dir`.
    pub fn new(config: SandboxConfig, data_dir: PathBuf, node: String) -> DockerHost {
        DockerHost {
            config,
            data_dir,
            node,
            sandbox: tokio::sync::Mutex::new(None),
            reaper: Mutex::new(None),
            stop: CancellationToken::new(),
        }
    }

    async fn sandbox(&self) -> Result<Arc<Sandbox>, ToolHostError> {
        let mut slot = self.sandbox.lock().await;
        if let Some(sb) = slot.as_ref() {
            return Ok(sb.clone());
        }
        let sb = Sandbox::connect(
            self.config.clone(),
            self.data_dir.clone(),
            self.node.clone(),
        )
        .await
        .map_err(ToolHostError::Sandbox)?;
        let sb = Arc::new(sb);
        if let Err(e) = sb.reap_orphans().await {
            tracing::warn!(error = %e, "could not reap orphaned containers");
        }
        // Idle containers are removed after `idle_timeout_secs`; all of them at shutdown.
        let reaper = sb.clone().spawn_reaper(self.stop.clone());
        let old = self
            .reaper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(reaper);
        if let Some(old) = old {
            old.abort();
        }
        *slot = Some(sb.clone());
        Ok(sb)
    }
}

impl ToolHost for DockerHost {
    fn definitions(&self) -> Value {
        super::tools::tool_definitions()
    }

    fn run<'a>(
        &'a self,
        conversation: &'a str,
        name: &'a str,
        input: &'a Value,
    ) -> BoxFuture<'a, ToolResult> {
        Box::pin(async move {
            match self.sandbox().await {
                Ok(sb) => {
                    let out = sb.run_tool(conversation, name, input).await;
                    ToolResult {
                        content: out.output,
                        is_error: out.is_error,
                    }
                }
                Err(e) => ToolResult::error(e.to_string()),
            }
        })
    }

    fn put_attachment<'a>(
        &'a self,
        conversation: &'a str,
        name: &'a str,
        bytes: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), ToolHostError>> {
        Box::pin(async move {
            // Into the workspace's image (mounted first), so attachments count to its quota.
            self.sandbox()
                .await?
                .write_workspace_file(conversation, "attachments", name, bytes)
                .await
                .map(drop)
                .map_err(ToolHostError::Sandbox)
        })
    }

    fn read_workspace_file<'a>(
        &'a self,
        conversation: &'a str,
        path: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<u8>, ToolHostError>> {
        Box::pin(async move {
            self.sandbox()
                .await?
                .read_bytes(conversation, path, max)
                .await
                .map_err(ToolHostError::File)
        })
    }

    fn prepare(&self) -> BoxFuture<'_, Result<(), ToolHostError>> {
        Box::pin(async move { self.sandbox().await.map(drop) })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.stop.cancel();
            let reaper = self.reaper.lock().unwrap_or_else(|e| e.into_inner()).take();
            // The reaper removes every container once stopped.
            match reaper {
                Some(h) => {
                    let _ = h.await;
                }
                None => {
                    let sb = self.sandbox.lock().await.clone();
                    if let Some(sb) = sb {
                        sb.shutdown().await;
                    }
                }
            }
        })
    }
}
