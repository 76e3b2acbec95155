//! MCP server routes (`/v1/tools`): declare, list, remove, enable and disable the agent's MCP
//! servers in the synced settings document, from any admin device.
//!
//! A declaration is one setting `mcp.server.NAME` holding the server's JSON as a string (see
//! [`crate::agent::mcp::spec`]); the agent node starts, stops or restarts servers as the
//! document changes and reports each one's state as `mcp.status.NAME`, which the list shows.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::routing::{get, put};
use iom_crdt::{DocId, DocKind, Settings};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use super::body::JsonBody;
use crate::agent::mcp::hub::read_entries;
use crate::agent::mcp::spec::{
    self, SPEC_PREFIX, STATUS_PREFIX, SecretHeader, ServerMount, ServerSpec, ServerStatus,
};
use crate::docs::Origin;
use crate::node::NodeCtx;

type Ctx = State<Arc<NodeCtx>>;

/// Routes for MCP servers.
pub fn routes() -> axum::Router<Arc<NodeCtx>> {
    axum::Router::new()
        .route("/v1/tools", get(list).post(add))
        .route("/v1/tools/{name}", get(show).delete(remove))
        .route("/v1/tools/{name}/enabled", put(set_enabled))
}

/// Body of `POST /v1/tools`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddBody {
    /// Server name (`[a-z0-9-]`, tools become `mcp__NAME__TOOL`).
    pub name: String,
    /// The server's argv in its container.
    pub command: Vec<String>,
    /// Image (default: the python image).
    #[serde(default)]
    pub image: Option<String>,
    /// Environment variables (`KEY=VALUE`); not for secrets.
    #[serde(default)]
    pub env: Vec<String>,
    /// Mounts (`HOST:CONTAINER[:rw]`), checked on the agent node against `[sandbox]
    /// allowed_roots`.
    #[serde(default)]
    pub mounts: Vec<String>,
    /// Per-call limit in seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Add it disabled.
    #[serde(default)]
    pub disabled: bool,
    /// Replace a server of the same name.
    #[serde(default)]
    pub replace: bool,
    /// Hosts it may reach through the agent node's egress proxy (`HOST[:PORT]`).
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// Headers the proxy adds: `HOST[:PORT]=Header: value with {env:NAME} or {file:/path}`.
    #[serde(default)]
    pub secret_headers: Vec<String>,
    /// Environment variables from secrets of the agent node: `VAR={env:NAME}` (the server
    /// sees the value).
    #[serde(default)]
    pub secret_env: Vec<String>,
}

/// Body of `PUT /v1/tools/{name}/enabled`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnabledBody {
    /// Whether the agent runs it.
    pub enabled: bool,
}

fn require_admin(ctx: &NodeCtx) -> Result<(), ApiError> {
    if ctx.trust.state().is_admin(&ctx.identity.device_id()) {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "only an admin device can change the agent's MCP servers (they run code on the \
             agent node)",
        ))
    }
}

/// Parses `HOST:CONTAINER[:ro|:rw]`.
fn parse_mount(text: &str) -> Result<ServerMount, ApiError> {
    let parts: Vec<&str> = text.split(':').collect();
    let (host, container, writable) = match parts.as_slice() {
        [h, c] => (*h, *c, false),
        [h, c, "ro"] => (*h, *c, false),
        [h, c, "rw"] => (*h, *c, true),
        _ => {
            return Err(ApiError::bad_request(format!(
                "mount {text:?}: expected HOST:CONTAINER, HOST:CONTAINER:ro or HOST:CONTAINER:rw"
            )));
        }
    };
    Ok(ServerMount {
        host: host.to_string(),
        container: container.to_string(),
        writable,
    })
}

/// Parses `HOST[:PORT]=Header: value` (`--secret-header`).
fn parse_secret_header(text: &str) -> Result<SecretHeader, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "secret header {text:?}: expected HOST[:PORT]=Header: value, e.g. \
             'api.example.com=Authorization: Bearer {{env:EXAMPLE_TOKEN}}'"
        ))
    };
    let (host, rest) = text.split_once('=').ok_or_else(bad)?;
    let (header, value) = rest.split_once(':').ok_or_else(bad)?;
    if host.trim().is_empty() || header.trim().is_empty() {
        return Err(bad());
    }
    Ok(SecretHeader {
        host: host.trim().to_string(),
        header: header.trim().to_string(),
        value: value.trim().to_string(),
    })
}

/// Parses repeated `KEY=VALUE` options into a map.
fn key_values(what: &str, items: &[String]) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    for e in items {
        let Some((k, v)) = e.split_once('=') else {
            return Err(ApiError::bad_request(format!(
                "{what} {e:?}: expected KEY=VALUE"
            )));
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

async fn add(State(ctx): Ctx, JsonBody(body): JsonBody<AddBody>) -> Result<Json<Value>, ApiError> {
    require_admin(&ctx)?;
    let env = key_values("env", &body.env)?;
    let spec = ServerSpec {
        name: body.name.clone(),
        command: body.command,
        image: body.image.filter(|i| !i.trim().is_empty()),
        enabled: !body.disabled,
        env,
        mounts: body
            .mounts
            .iter()
            .map(|m| parse_mount(m))
            .collect::<Result<_, _>>()?,
        timeout_secs: body.timeout_secs,
        allow_hosts: body.allow_hosts,
        secret_headers: body
            .secret_headers
            .iter()
            .map(|h| parse_secret_header(h))
            .collect::<Result<_, _>>()?,
        secret_env: key_values("secret env", &body.secret_env)?,
    };
    spec.validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let name = spec.name.clone();
    let exists = current(&ctx).await.contains_key(&name);
    if exists && !body.replace {
        return Err(ApiError::conflict(format!(
            "an MCP server {name:?} exists already (remove it first, or add with --replace)"
        )));
    }
    write(&ctx, &spec).await?;
    show(State(ctx), Path(name)).await
}

async fn write(ctx: &NodeCtx, spec: &ServerSpec) -> Result<(), ApiError> {
    let text = serde_json::to_string(spec).map_err(|e| ApiError::internal(e.to_string()))?;
    let key = format!("{SPEC_PREFIX}{}", spec.name);
    ctx.docs.create(DocKind::Settings).await?;
    let now = crate::time::now_secs() as i64;
    ctx.docs
        .modify(DocId::SETTINGS, Origin::Local, false, move |d| {
            Settings::open(&mut *d)?.set(&key, &Value::String(text), now)?;
            Ok(())
        })
        .await?;
    Ok(())
}

/// Every declaration (also those the agent refuses), by name.
async fn current(ctx: &NodeCtx) -> BTreeMap<String, iom_crdt::AuthoredString> {
    read_entries(&ctx.docs, SPEC_PREFIX)
        .await
        .into_iter()
        .map(|e| (e.key.trim_start_matches(SPEC_PREFIX).to_string(), e))
        .collect()
}

async fn view_all(ctx: &NodeCtx) -> Vec<Value> {
    let entries = current(ctx).await;
    let trust = ctx.trust.state();
    let raw: Vec<iom_crdt::AuthoredString> = entries.values().cloned().collect();
    let decl = spec::specs_from(&raw, &trust);
    let statuses: BTreeMap<String, ServerStatus> = read_entries(&ctx.docs, STATUS_PREFIX)
        .await
        .into_iter()
        .filter_map(|e| serde_json::from_str::<ServerStatus>(&e.text).ok())
        .map(|s| (s.name.clone(), s))
        .collect();
    let mut out = Vec::new();
    for (name, e) in &entries {
        let spec_json = decl
            .servers
            .iter()
            .find(|s| &s.name == name)
            .and_then(|s| serde_json::to_value(s).ok())
            .or_else(|| serde_json::from_str::<Value>(&e.text).ok())
            .unwrap_or(Value::Null);
        let refused = decl
            .refused
            .iter()
            .find(|(k, _)| k == &e.key)
            .map(|(_, why)| why.clone());
        let status = statuses.get(name);
        let state = match (&refused, status) {
            (Some(_), _) => "refused".to_string(),
            (None, Some(s)) => serde_json::to_value(&s.phase)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            (None, None) if spec_json["enabled"] == json!(false) => "disabled".into(),
            (None, None) => "unknown".into(),
        };
        out.push(json!({
            "name": name,
            "spec": spec_json,
            "state": state,
            "refused": refused,
            "error": status.and_then(|s| s.error.clone()),
            "restarts": status.map_or(0, |s| s.restarts),
            "retry_at": status.and_then(|s| s.retry_at),
            "tools": status.map(|s| s.tools.clone()).unwrap_or_default(),
        }));
    }
    out
}

async fn list(State(ctx): Ctx) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "servers": view_all(&ctx).await })))
}

async fn show(State(ctx): Ctx, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    view_all(&ctx)
        .await
        .into_iter()
        .find(|v| v["name"] == json!(name))
        .map(Json)
        .ok_or_else(|| no_such(&name))
}

fn no_such(name: &str) -> ApiError {
    ApiError::not_found(format!("no MCP server {name:?} (see `iom tools list`)"))
}

async fn remove(State(ctx): Ctx, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    require_admin(&ctx)?;
    if !current(&ctx).await.contains_key(&name) {
        return Err(no_such(&name));
    }
    let key = format!("{SPEC_PREFIX}{name}");
    let now = crate::time::now_secs() as i64;
    ctx.docs
        .modify(DocId::SETTINGS, Origin::Local, false, move |d| {
            Settings::open(&mut *d)?.remove(&key, now)?;
            Ok(())
        })
        .await?;
    Ok(Json(json!({ "name": name, "removed": true })))
}

async fn set_enabled(
    State(ctx): Ctx,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<EnabledBody>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&ctx)?;
    let Some(e) = current(&ctx).await.remove(&name) else {
        return Err(no_such(&name));
    };
    let mut spec: ServerSpec = serde_json::from_str(&e.text).map_err(|err| {
        ApiError::conflict(format!(
            "the declaration of {name:?} is unreadable ({err}); add it again with --replace"
        ))
    })?;
    spec.enabled = body.enabled;
    write(&ctx, &spec).await?;
    show(State(ctx), Path(name)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_parse_with_a_mode() {
        let m = parse_mount("/srv/repo:/repo").expect("plain");
        assert!(!m.writable);
        assert!(parse_mount("/a:/b:rw").expect("rw").writable);
        assert!(parse_mount("/a").is_err());
        assert!(parse_mount("/a:/b:xx").is_err());
    }

    #[test]
    fn secret_headers_parse_host_name_and_template() {
        let h = parse_secret_header("127.0.0.1:8080=Authorization: Bearer {env:T}").expect("ok");
        assert_eq!(
            (h.host.as_str(), h.header.as_str(), h.value.as_str()),
            ("127.0.0.1:8080", "Authorization", "Bearer {env:T}")
        );
        for bad in ["no-equals", "host=NoColon", "=X: y", "h= : y"] {
            assert!(parse_secret_header(bad).is_err(), "{bad}");
        }
    }
}
