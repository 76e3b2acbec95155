//! The agent node's MCP servers, kept in line with the mesh's declarations, and the tool
//! host that offers their tools beside the sandbox's.
//!
//! [`McpHub`] owns one [`Server`] per declaration. [`McpHub::apply`] reconciles: new servers
//! start, removed ones stop, changed ones restart. [`McpToolHost`] is the seam the runner
//! sees: a [`ToolHost`] that lists the base host's tools and then every ready server's tools
//! (`mcp__SERVER__TOOL`, sorted), and sends each call to whichever owns it. Approvals can wrap
//! it like any other [`ToolHost`].
//!
//! On [`ToolHost::prepare`] (when this node holds the agent role) it starts a watcher: it
//! reads `mcp.server.*` from the settings document (only what admin devices wrote), applies it,
//! re-reads it on every change of that document and of the trust state, and publishes each
//! server's status as `mcp.status.NAME` so `iom tools list` shows it on every device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use iom_crdt::{DocId, DocKind, Settings};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::server::{Env, Server};
use super::spec::{self, Declarations, STATUS_PREFIX, ServerSpec, ServerStatus};
use crate::agent::claude::ToolResult;
use crate::agent::host::{ToolHost, ToolHostError};
use crate::docs::{Docs, Origin};
use crate::trust::TrustBook;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The MCP servers of this node.
pub struct McpHub {
    cfg: crate::agent::sandbox::SandboxConfig,
    data_dir: std::path::PathBuf,
    node: String,
    docker: tokio::sync::Mutex<Option<bollard::Docker>>,
    servers: Mutex<BTreeMap<String, Arc<Server>>>,
    refused: Mutex<Vec<(String, String)>>,
    /// Poked on every status change.
    pub changed: Arc<Notify>,
}

impl std::fmt::Debug for McpHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpHub")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl McpHub {
    /// A hub with no servers; containers get the limits of `cfg`.
    pub fn new(
        cfg: crate::agent::sandbox::SandboxConfig,
        data_dir: std::path::PathBuf,
        node: String,
    ) -> Arc<McpHub> {
        Arc::new(McpHub {
            cfg,
            data_dir,
            node,
            docker: tokio::sync::Mutex::new(None),
            servers: Mutex::new(BTreeMap::new()),
            refused: Mutex::new(Vec::new()),
            changed: Arc::new(Notify::new()),
        })
    }

    async fn docker(&self) -> Result<bollard::Docker, String> {
        let mut slot = self.docker.lock().await;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let d = crate::agent::sandbox::container::connect_docker()
            .await
            .map_err(|e| e.to_string())?;
        *slot = Some(d.clone());
        Ok(d)
    }

    /// Makes the running servers match `decl`: starts new ones, stops removed ones, restarts
    /// changed ones. Returns an error only when Docker is unreachable (nothing starts then).
    pub async fn apply(&self, decl: Declarations) -> Result<(), String> {
        for (key, why) in &decl.refused {
            tracing::warn!(key = %key, "MCP server declaration refused: {why}");
        }
        *lock(&self.refused) = decl.refused;
        let wanted: BTreeMap<String, ServerSpec> = decl
            .servers
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let needs_docker = wanted.values().any(|s| s.enabled);
        let docker = if needs_docker {
            Some(self.docker().await?)
        } else {
            None
        };
        let mut servers = lock(&self.servers);
        servers.retain(|name, server| {
            let keep = wanted.get(name) == Some(server.spec());
            if !keep {
                server.stop();
            }
            keep
        });
        for (name, s) in wanted {
            if servers.contains_key(&name) {
                continue;
            }
            let env = Env {
                docker: match &docker {
                    Some(d) => d.clone(),
                    None => match bollard::Docker::connect_with_local_defaults() {
                        Ok(d) => d,
                        Err(e) => return Err(e.to_string()),
                    },
                },
                cfg: self.cfg.clone(),
                node: self.node.clone(),
                data_dir: self.data_dir.clone(),
            };
            servers.insert(name, Server::start(s, env, self.changed.clone()));
        }
        drop(servers);
        self.changed.notify_one();
        Ok(())
    }

    /// Every server's status, by name.
    pub fn statuses(&self) -> Vec<ServerStatus> {
        lock(&self.servers).values().map(|s| s.status()).collect()
    }

    /// Declarations refused at the last [`McpHub::apply`]: (key, reason).
    pub fn refused(&self) -> Vec<(String, String)> {
        lock(&self.refused).clone()
    }

    /// The tool definitions of every ready server, sorted by server and tool name.
    pub fn definitions(&self) -> Vec<Value> {
        lock(&self.servers)
            .values()
            .flat_map(|s| s.tools().into_iter().map(|t| t.definition))
            .collect()
    }

    /// Calls `mcp__SERVER__TOOL`.
    pub async fn call(&self, name: &str, input: &Value) -> ToolResult {
        let Some((server, tool)) = split_name(name) else {
            return ToolResult::error(format!("{name} is not an MCP tool name"));
        };
        let found = lock(&self.servers).get(server).cloned();
        let Some(s) = found else {
            return ToolResult::error(format!(
                "there is no MCP server {server:?} (see `iom tools list`)"
            ));
        };
        let Some(real) = s
            .tools()
            .into_iter()
            .find(|t| t.name == name)
            .map(|t| t.tool)
        else {
            return match s.status().phase {
                spec::Phase::Ready => {
                    ToolResult::error(format!("MCP server {server} has no tool {tool:?}"))
                }
                _ => s.call(tool, input, Duration::from_secs(1), 0).await,
            };
        };
        let limit = Duration::from_secs(
            s.spec()
                .timeout_secs
                .unwrap_or(self.cfg.tool_timeout_secs)
                .max(1),
        );
        s.call(&real, input, limit, self.cfg.output_cap_bytes).await
    }

    /// Stops every server (their containers are removed).
    pub fn stop_all(&self) {
        for (_, s) in std::mem::take(&mut *lock(&self.servers)) {
            s.stop();
        }
    }

    /// Removes the MCP containers a previous run of this node left behind.
    pub async fn reap_orphans(&self) {
        let Ok(docker) = self.docker().await else {
            return;
        };
        let filters = std::collections::HashMap::from([(
            "label",
            vec![
                format!(
                    "{}={}",
                    crate::agent::sandbox::container::LABEL_NODE,
                    self.node
                ),
                super::stdio::LABEL_MCP.to_string(),
            ],
        )]);
        let opts = bollard::query_parameters::ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        if let Ok(list) = docker.list_containers(Some(opts)).await {
            for id in list.into_iter().filter_map(|c| c.id) {
                crate::agent::sandbox::container::remove_container(&docker, &id).await;
            }
        }
    }
}

/// `mcp__SERVER__TOOL` → (`SERVER`, `TOOL`); server names have no `_`.
pub fn split_name(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix("mcp__")?;
    let (server, tool) = rest.split_once("__")?;
    (!server.is_empty() && !tool.is_empty()).then_some((server, tool))
}

/// Reads the declarations from the settings document.
pub async fn read_declarations(docs: &Docs, trust: &TrustBook) -> Declarations {
    let entries = read_entries(docs, spec::SPEC_PREFIX).await;
    spec::specs_from(&entries, &trust.state())
}

/// The string settings under `prefix` with their authors (none when there is no settings
/// document yet).
pub async fn read_entries(docs: &Docs, prefix: &str) -> Vec<iom_crdt::AuthoredString> {
    if !matches!(docs.meta(DocId::SETTINGS), Ok(Some(_))) {
        return Vec::new();
    }
    let prefix = prefix.to_string();
    docs.read(DocId::SETTINGS, move |d| {
        Settings::open(d)
            .map(|s| s.strings_with_author(&prefix))
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default()
}

/// The [`ToolHost`] of an agent with MCP servers: the base host's tools, then the servers'.
pub struct McpToolHost {
    base: Arc<dyn ToolHost>,
    hub: Arc<McpHub>,
    docs: Docs,
    trust: Arc<TrustBook>,
    watcher: Mutex<Option<CancellationToken>>,
}

impl std::fmt::Debug for McpToolHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpToolHost")
            .field("hub", &self.hub)
            .finish_non_exhaustive()
    }
}

impl McpToolHost {
    /// Wraps `base`; servers come from the settings document of `docs`.
    pub fn new(
        base: Arc<dyn ToolHost>,
        hub: Arc<McpHub>,
        docs: Docs,
        trust: Arc<TrustBook>,
    ) -> McpToolHost {
        McpToolHost {
            base,
            hub,
            docs,
            trust,
            watcher: Mutex::new(None),
        }
    }

    /// The hub (for status).
    pub fn hub(&self) -> &Arc<McpHub> {
        &self.hub
    }

    fn start_watcher(&self) {
        let mut w = lock(&self.watcher);
        if w.is_some() {
            return;
        }
        let stop = CancellationToken::new();
        *w = Some(stop.clone());
        drop(w);
        let status_stop = stop.clone();
        let (hub, docs, trust) = (self.hub.clone(), self.docs.clone(), self.trust.clone());
        tokio::spawn(async move {
            hub.reap_orphans().await;
            let mut changes = docs.subscribe();
            let mut trust_rx = trust.subscribe();
            let mut last = None;
            loop {
                let decl = read_declarations(&docs, &trust).await;
                if last.as_ref() != Some(&decl) {
                    match hub.apply(decl.clone()).await {
                        Ok(()) => last = Some(decl),
                        Err(e) => {
                            tracing::warn!(error = %e, "MCP servers cannot start; retrying in 10 s");
                            last = None;
                        }
                    }
                }
                let retry = last.is_none();
                tokio::select! {
                    () = stop.cancelled() => break,
                    ch = changes.recv() => match ch {
                        Ok(c) if c.id != DocId::SETTINGS => continue,
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => break,
                    },
                    r = trust_rx.changed() => if r.is_err() { break },
                    () = tokio::time::sleep(Duration::from_secs(10)), if retry => {}
                }
            }
            hub.stop_all();
        });
        // Status reports into the settings document, at most one write per server change
        // and per second.
        let (hub, docs, stop) = (self.hub.clone(), self.docs.clone(), status_stop);
        tokio::spawn(async move {
            let mut published: BTreeMap<String, String> = BTreeMap::new();
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = hub.changed.notified() => {}
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Err(e) = publish(&hub, &docs, &mut published).await {
                    tracing::debug!(error = %e, "cannot publish MCP server status");
                }
            }
        });
    }
}

/// Writes changed statuses as `mcp.status.NAME` and removes those of servers now gone.
async fn publish(
    hub: &McpHub,
    docs: &Docs,
    published: &mut BTreeMap<String, String>,
) -> Result<(), crate::docs::DocsError> {
    let now: BTreeMap<String, String> = hub
        .statuses()
        .into_iter()
        .map(|s| {
            let text = serde_json::to_string(&s).unwrap_or_default();
            (s.name, text)
        })
        .collect();
    if &now == published {
        return Ok(());
    }
    docs.create(DocKind::Settings).await?;
    let (want, had) = (now.clone(), published.clone());
    let ts = crate::time::now_secs() as i64;
    docs.modify(DocId::SETTINGS, Origin::Local, false, move |d| {
        let mut s = Settings::open(&mut *d)?;
        let existing: Vec<String> = s
            .strings_with_author(STATUS_PREFIX)
            .into_iter()
            .map(|e| e.key)
            .collect();
        for (name, text) in &want {
            if had.get(name) != Some(text) {
                s.set(
                    &format!("{STATUS_PREFIX}{name}"),
                    &Value::String(text.clone()),
                    ts,
                )?;
            }
        }
        for key in existing {
            let name = key.trim_start_matches(STATUS_PREFIX);
            if !want.contains_key(name) {
                s.remove(&key, ts)?;
            }
        }
        Ok(())
    })
    .await?;
    *published = now;
    Ok(())
}

impl ToolHost for McpToolHost {
    fn definitions(&self) -> Value {
        let mut defs = match self.base.definitions() {
            Value::Array(a) => a,
            other => vec![other],
        };
        defs.extend(self.hub.definitions());
        Value::Array(defs)
    }

    fn run<'a>(
        &'a self,
        conversation: &'a str,
        name: &'a str,
        input: &'a Value,
    ) -> BoxFuture<'a, ToolResult> {
        if split_name(name).is_some() {
            Box::pin(self.hub.call(name, input))
        } else {
            self.base.run(conversation, name, input)
        }
    }

    fn put_attachment<'a>(
        &'a self,
        conversation: &'a str,
        name: &'a str,
        bytes: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), ToolHostError>> {
        self.base.put_attachment(conversation, name, bytes)
    }

    fn prepare(&self) -> BoxFuture<'_, Result<(), ToolHostError>> {
        self.start_watcher();
        self.base.prepare()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let stop = lock(&self.watcher).take();
            if let Some(t) = stop {
                t.cancel();
            }
            self.hub.stop_all();
            self.base.shutdown().await;
            // The supervisors remove their containers as they stop; make sure of it.
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.hub.reap_orphans().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names_split_at_the_server() {
        assert_eq!(
            split_name("mcp__time__get_current_time"),
            Some(("time", "get_current_time"))
        );
        assert_eq!(split_name("mcp__git__a__b"), Some(("git", "a__b")));
        assert_eq!(split_name("bash"), None);
        assert_eq!(split_name("mcp____x"), None);
        assert_eq!(split_name("mcp__time__"), None);
    }
}
