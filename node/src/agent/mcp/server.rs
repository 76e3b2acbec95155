//! One MCP server: its supervisor (start, watch, restart with back-off) and its calls.
//!
//! The supervisor starts the server's container ([`super::stdio::launch`]), runs the MCP
//! handshake with `rmcp` (`server/discover`, falling back to `initialize` for older servers),
//! lists its tools, and then waits: for the server to exit, for the output guard to report a
//! fault (garbage, a flood), for a call to time out, or to be stopped. Each failure removes the
//! container, is reported in the server's [`ServerStatus`], and is followed by a restart after
//! a back-off (1 s, doubling, at most [`MAX_BACKOFF`]; reset once a start stays up for
//! [`STABLE_AFTER`]). Nothing here can take the node down: every error becomes a status or an
//! error result for the model.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, CallToolResult, ContentBlock, ProtocolVersion};
use rmcp::service::{ClientLifecycleMode, ClientServiceExt, Peer, RoleClient, RunningService};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::spec::{Phase, ServerSpec, ServerStatus, ToolInfo};
use super::stdio::{self, Health, LaunchSpec};
use crate::agent::claude::ToolResult;

/// Longest wait between restarts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A start that stays up this long resets the back-off.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Longest a start (container + handshake + tool list) may take.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest tool description offered to the model.
const MAX_DESCRIPTION: usize = 1024;

/// A tool as offered to the model.
#[derive(Debug, Clone)]
pub struct OfferedTool {
    /// `mcp__SERVER__TOOL` (made of `[A-Za-z0-9_-]`, at most 128 characters).
    pub name: String,
    /// The server's own name for it.
    pub tool: String,
    /// The Messages API tool definition.
    pub definition: Value,
}

/// Everything a server needs from the node.
#[derive(Clone)]
pub struct Env {
    /// The Docker engine.
    pub docker: bollard::Docker,
    /// Limits for the container.
    pub cfg: crate::agent::sandbox::SandboxConfig,
    /// This node's id (container label).
    pub node: String,
    /// The node's data directory (mount validation).
    pub data_dir: std::path::PathBuf,
}

struct Live {
    peer: Peer<RoleClient>,
    health: Arc<Health>,
    /// Cancelled to end this life (a call timed out).
    kill: CancellationToken,
}

#[derive(Default)]
struct State {
    live: Option<Live>,
    tools: Vec<OfferedTool>,
}

/// A supervised MCP server.
pub struct Server {
    spec: ServerSpec,
    state: Mutex<State>,
    status: watch::Sender<ServerStatus>,
    stop: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Server {
    /// Starts supervising `spec` (a disabled spec is only reported). `changed` is poked on
    /// every status change.
    pub fn start(spec: ServerSpec, env: Env, changed: Arc<Notify>) -> Arc<Server> {
        let phase = if spec.enabled {
            Phase::Starting
        } else {
            Phase::Disabled
        };
        let (status, _) = watch::channel(ServerStatus {
            name: spec.name.clone(),
            phase,
            tools: Vec::new(),
            error: None,
            restarts: 0,
            retry_at: None,
        });
        let server = Arc::new(Server {
            spec,
            state: Mutex::new(State::default()),
            status,
            stop: CancellationToken::new(),
        });
        if server.spec.enabled {
            let s = server.clone();
            tokio::spawn(async move { s.supervise(env, changed).await });
        } else {
            changed.notify_one();
        }
        server
    }

    /// The declaration it runs.
    pub fn spec(&self) -> &ServerSpec {
        &self.spec
    }

    /// Its current status.
    pub fn status(&self) -> ServerStatus {
        self.status.borrow().clone()
    }

    /// Its tools (while ready; empty otherwise), sorted by name.
    pub fn tools(&self) -> Vec<OfferedTool> {
        let st = lock(&self.state);
        if st.live.is_some() {
            st.tools.clone()
        } else {
            Vec::new()
        }
    }

    /// Stops it and removes its container.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    fn set_status(&self, changed: &Notify, f: impl FnOnce(&mut ServerStatus)) {
        self.status.send_modify(f);
        changed.notify_one();
    }

    async fn supervise(self: Arc<Self>, env: Env, changed: Arc<Notify>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            self.set_status(&changed, |s| {
                s.phase = Phase::Starting;
                s.retry_at = None;
            });
            let started = tokio::time::Instant::now();
            let error = tokio::select! {
                () = self.stop.cancelled() => None,
                e = self.run_once(&env, &changed) => Some(e),
            };
            {
                let mut st = lock(&self.state);
                st.live = None;
            }
            let Some(error) = error else {
                return;
            };
            if started.elapsed() >= STABLE_AFTER {
                backoff = Duration::from_secs(1);
            }
            tracing::warn!(server = %self.spec.name, error = %error, retry_in = ?backoff, "MCP server failed; restarting after a back-off");
            let retry_at = crate::time::now_secs() as i64 + backoff.as_secs() as i64;
            self.set_status(&changed, |s| {
                s.phase = Phase::Failed;
                s.error = Some(error);
                s.restarts += 1;
                s.retry_at = Some(retry_at);
            });
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One life of the server; returns why it ended. The container is removed on return
    /// (also when the future is dropped at stop).
    async fn run_once(&self, env: &Env, changed: &Notify) -> String {
        let mounts = match self.mounts(env) {
            Ok(m) => m,
            Err(e) => return e,
        };
        let mut vars = vec![
            "PYTHONUNBUFFERED=1".to_string(),
            "PYTHONDONTWRITEBYTECODE=1".to_string(),
        ];
        vars.extend(self.spec.env.iter().map(|(k, v)| format!("{k}={v}")));
        let policy = if self.spec.allow_hosts.is_empty() {
            None
        } else {
            match super::egress::Policy::from_spec(&self.spec) {
                Ok(p) => Some(p),
                Err(e) => return e,
            }
        };
        if policy.is_some() {
            vars.extend(super::egress::proxy_env());
        }
        for (k, t) in &self.spec.secret_env {
            // Only when the declaration says so (`--secret-env`): the server sees this value.
            match super::egress::secret::Template::parse(t).and_then(|t| t.render()) {
                Ok(v) => vars.push(format!("{k}={v}")),
                Err(e) => return format!("the secret for {k} is not available: {e}"),
            }
        }
        let launch = stdio::launch(
            &env.docker,
            LaunchSpec {
                cfg: &env.cfg,
                image: self.spec.image_or_default(),
                command: self.spec.command.clone(),
                env: vars,
                mounts: &mounts,
                node: &env.node,
                name: container_name(&env.node, &self.spec.name),
                server: &self.spec.name,
                max_line: env.cfg.output_cap_bytes.saturating_mul(16).max(1 << 20),
            },
        );
        let launched = match tokio::time::timeout(START_TIMEOUT, launch).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return e,
            Err(_) => return format!("its container did not start within {START_TIMEOUT:?}"),
        };
        let _container = RemoveOnDrop {
            docker: env.docker.clone(),
            id: launched.container.clone(),
        };
        let health = launched.health.clone();
        // The proxy listens inside the container's own network namespace (it has only
        // loopback) before the MCP handshake; it stops when this life ends.
        let _egress = match policy {
            None => None,
            Some(p) => {
                let pid = match env
                    .docker
                    .inspect_container(&launched.container, None)
                    .await
                {
                    Ok(i) => i.state.and_then(|s| s.pid).unwrap_or(0),
                    Err(e) => return format!("cannot inspect its container: {e}"),
                };
                match super::egress::start(pid, p) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        return explain(format!("its egress proxy cannot start: {e}"), &health);
                    }
                }
            }
        };
        let transport = (launched.stdout, launched.stdin);
        let lifecycle = ClientLifecycleMode::Auto {
            preferred_versions: vec![ProtocolVersion::LATEST],
            legacy_version: None,
        };
        let init = async {
            let running: RunningService<RoleClient, ()> = ()
                .serve_with_lifecycle(transport, lifecycle)
                .await
                .map_err(|e| format!("the MCP handshake failed: {e}"))?;
            let tools = running
                .peer()
                .list_all_tools()
                .await
                .map_err(|e| format!("tools/list failed: {e}"))?;
            Ok::<_, String>((running, tools))
        };
        let (running, tools) = match tokio::time::timeout(START_TIMEOUT, init).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return explain(e, &health),
            Err(_) => {
                return explain(
                    format!("no answer to the MCP handshake within {START_TIMEOUT:?}"),
                    &health,
                );
            }
        };
        let offered = offer(&self.spec.name, tools);
        let infos: Vec<ToolInfo> = offered
            .iter()
            .map(|t| ToolInfo {
                name: t.name.clone(),
                tool: t.tool.clone(),
                description: t.definition["description"]
                    .as_str()
                    .map(|d| crate::agent::runner::truncate(d, 200))
                    .unwrap_or_default(),
            })
            .collect();
        let kill = CancellationToken::new();
        {
            let mut st = lock(&self.state);
            st.tools = offered;
            st.live = Some(Live {
                peer: running.peer().clone(),
                health: health.clone(),
                kill: kill.clone(),
            });
        }
        tracing::info!(server = %self.spec.name, tools = infos.len(), "MCP server ready");
        self.set_status(changed, |s| {
            // `error` stays: the last failure is worth seeing while it runs again.
            s.phase = Phase::Ready;
            s.tools = infos;
        });
        let closer = running.cancellation_token();
        let mut quit = tokio::spawn(running.waiting());
        let why = loop {
            tokio::select! {
                () = kill.cancelled() => break "a call timed out, so it was restarted".to_string(),
                () = health.changed.notified() => {
                    if let Some(f) = health.fault() {
                        break f;
                    }
                    if launched.guard.is_finished() {
                        break explain("it exited".into(), &health);
                    }
                }
                _ = &mut quit => break explain("it closed its stdio".into(), &health),
            }
        };
        closer.cancel();
        quit.abort();
        why
    }

    fn mounts(
        &self,
        env: &Env,
    ) -> Result<Vec<crate::agent::sandbox::policy::ResolvedMount>, String> {
        if self.spec.mounts.is_empty() {
            return Ok(Vec::new());
        }
        let cfg = crate::agent::sandbox::SandboxConfig {
            mounts: self
                .spec
                .mounts
                .iter()
                .map(|m| crate::agent::sandbox::policy::MountSpec {
                    host: m.host.clone().into(),
                    container: m.container.clone().into(),
                    writable: m.writable,
                })
                .collect(),
            ..env.cfg.clone()
        };
        crate::agent::sandbox::validate_mounts(&cfg, &env.data_dir).map_err(|e| e.to_string())
    }

    /// Calls one of its tools with a timeout; the output is capped at `cap` bytes.
    pub async fn call(&self, tool: &str, input: &Value, limit: Duration, cap: usize) -> ToolResult {
        let name = &self.spec.name;
        let live = {
            let st = lock(&self.state);
            st.live
                .as_ref()
                .map(|l| (l.peer.clone(), l.health.clone(), l.kill.clone()))
        };
        let Some((peer, health, kill)) = live else {
            let s = self.status();
            let why = s.error.map(|e| format!(": {e}")).unwrap_or_default();
            return ToolResult::error(format!(
                "MCP server {name} is not ready ({:?}{why}); try again shortly",
                s.phase
            ));
        };
        let arguments = match input {
            Value::Object(m) => Some(m.clone()),
            Value::Null => None,
            other => {
                return ToolResult::error(format!("the input must be a JSON object, not {other}"));
            }
        };
        let mut params = CallToolRequestParams::new(tool.to_string());
        params.arguments = arguments;
        match tokio::time::timeout(limit, peer.call_tool(params)).await {
            Ok(Ok(result)) => render(result, cap),
            Ok(Err(e)) => {
                // A crash or a fault: the supervisor sees it too and restarts the server.
                let why = health
                    .fault()
                    .unwrap_or_else(|| explain(e.to_string(), &health));
                ToolResult::error(format!(
                    "MCP server {name} failed during the call: {why}; it is being restarted"
                ))
            }
            Err(_) => {
                kill.cancel();
                ToolResult::error(format!(
                    "MCP server {name} did not answer within {limit:?}; it was restarted"
                ))
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Adds what the guard saw, or the server's stderr, to an error.
fn explain(error: String, health: &Health) -> String {
    if let Some(f) = health.fault() {
        return f;
    }
    let tail = health.stderr_tail();
    if tail.is_empty() {
        error
    } else {
        format!("{error}; its stderr ends: {tail}")
    }
}

/// The container name of a server: `iom-mcp-<node short>-<server>`.
pub fn container_name(node: &str, server: &str) -> String {
    let alnum: Vec<char> = node.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let short: String = alnum[alnum.len().saturating_sub(12)..].iter().collect();
    format!("iom-mcp-{short}-{server}")
}

/// The server's tools as Messages API definitions, sorted by name (a stable order keeps the
/// prompt cache warm). Names the API cannot take are made safe; a collision keeps the first.
pub fn offer(server: &str, tools: Vec<rmcp::model::Tool>) -> Vec<OfferedTool> {
    let mut out: Vec<OfferedTool> = Vec::new();
    for t in tools {
        let safe: String = t
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let mut name = format!("mcp__{server}__{safe}");
        name.truncate(128);
        if out.iter().any(|o| o.name == name) {
            tracing::warn!(server, tool = %t.name, "two MCP tools map to one name; keeping the first");
            continue;
        }
        let mut schema = Value::Object((*t.input_schema).clone());
        if schema.get("type").is_none() {
            schema["type"] = json!("object");
        }
        let description = t
            .description
            .as_deref()
            .or(t.title.as_deref())
            .unwrap_or("");
        let description = crate::agent::runner::truncate(
            &format!("[MCP server {server}] {description}"),
            MAX_DESCRIPTION,
        );
        out.push(OfferedTool {
            definition: json!({
                "name": name,
                "description": description,
                "input_schema": schema,
            }),
            name,
            tool: t.name.to_string(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A tool result as text for the model, capped at `cap` bytes.
pub fn render(result: CallToolResult, cap: usize) -> ToolResult {
    let mut parts: Vec<String> = Vec::new();
    for block in &result.content {
        parts.push(content_text(block));
    }
    if parts.is_empty()
        && let Some(s) = &result.structured_content
    {
        parts.push(s.to_string());
    }
    let text = parts.join("\n");
    let text = if text.len() > cap {
        crate::agent::runner::truncate(&text, cap)
    } else {
        text
    };
    ToolResult {
        content: text,
        is_error: result.is_error.unwrap_or(false),
    }
}

fn content_text(block: &ContentBlock) -> String {
    let v = serde_json::to_value(block).unwrap_or(Value::Null);
    match v["type"].as_str() {
        Some("text") => v["text"].as_str().unwrap_or("").to_string(),
        Some("image") | Some("audio") => format!(
            "[{} content, {}, {} bytes of base64 not shown]",
            v["type"].as_str().unwrap_or(""),
            v["mimeType"].as_str().unwrap_or("?"),
            v["data"].as_str().map_or(0, str::len)
        ),
        Some("resource") => v["resource"]["text"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("[resource {}]", v["resource"]["uri"])),
        _ => v.to_string(),
    }
}

/// Force-removes a container when dropped (also when the supervisor is cancelled).
struct RemoveOnDrop {
    docker: bollard::Docker,
    id: String,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let (docker, id) = (self.docker.clone(), std::mem::take(&mut self.id));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                crate::agent::sandbox::container::remove_container(&docker, &id).await;
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tool(name: &str) -> rmcp::model::Tool {
        serde_json::from_value(json!({
            "name": name,
            "description": "does things",
            "inputSchema": {"properties": {"x": {"type": "string"}}},
        }))
        .unwrap()
    }

    #[test]
    fn tools_are_namespaced_sorted_and_safe() {
        let got = offer(
            "time",
            vec![tool("zone.convert"), tool("get_time"), tool("zone_convert")],
        );
        let names: Vec<&str> = got.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["mcp__time__get_time", "mcp__time__zone_convert"]
        );
        assert_eq!(got[1].tool, "zone.convert");
        assert_eq!(got[0].definition["input_schema"]["type"], "object");
        assert!(
            got[0].definition["description"]
                .as_str()
                .unwrap()
                .starts_with("[MCP server time]")
        );
    }

    #[test]
    fn results_are_text_capped_and_keep_the_error_flag() {
        let r: CallToolResult = serde_json::from_value(json!({
            "content": [
                {"type": "text", "text": "x".repeat(100)},
                {"type": "image", "data": "AAAA", "mimeType": "image/png"}
            ],
            "isError": true
        }))
        .unwrap();
        let out = render(r, 50);
        assert!(out.is_error);
        assert!(out.content.len() < 100, "{}", out.content);
        assert!(out.content.contains("cut"), "{}", out.content);
        let r: CallToolResult =
            serde_json::from_value(json!({"content": [], "structuredContent": {"a": 1}})).unwrap();
        assert_eq!(render(r, 100).content, "{\"a\":1}");
    }

    #[test]
    fn container_names_use_the_node_tail() {
        assert_eq!(
            container_name("12D3KooWabcdefghijklmnop", "git"),
            "iom-mcp-efghijklmnop-git"
        );
    }
}
