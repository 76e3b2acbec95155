//! MCP server declarations: what `iom tools add` writes into the synced settings document.
//!
//! Each server is one setting, `mcp.server.NAME`, whose value is the [`ServerSpec`] as a JSON
//! **string**: one write, one author, so the agent node can take only declarations that an
//! admin device wrote ([`specs_from`]). The agent publishes each server's state as
//! `mcp.status.NAME` (a [`ServerStatus`] as a JSON string).

use std::collections::BTreeMap;

use iom_crdt::AuthoredString;
use iom_protocol::trust::TrustState;
use serde::{Deserialize, Serialize};

/// Settings key prefix of server declarations.
pub const SPEC_PREFIX: &str = "mcp.server.";
/// Settings key prefix of the agent's status reports.
pub const STATUS_PREFIX: &str = "mcp.status.";
/// Longest server name.
pub const MAX_NAME: usize = 32;

/// One MCP server, as declared in the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// Name: tools are offered as `mcp__NAME__TOOL`.
    pub name: String,
    /// The server's argv inside the container (it is the container's main process and speaks
    /// MCP over stdin/stdout).
    pub command: Vec<String>,
    /// Image to run; `None`: the python image (`iom sandbox build --python`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Whether the agent runs it.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Environment variables (not for secrets: the declaration syncs to every device).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Host paths mounted into the container; checked on the agent node against its
    /// `[sandbox] allowed_roots` and blocked patterns, like the tool sandbox's mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<ServerMount>,
    /// Per-call limit in seconds; `None`: `[sandbox] tool_timeout_secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Hosts it may reach through the agent node's egress proxy, `HOST[:PORT]` (see
    /// [`super::egress`]); empty: no network at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    /// Headers the proxy adds to its plain-HTTP requests to an allowed host, valued from a
    /// secret of the agent node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_headers: Vec<SecretHeader>,
    /// Environment variables set from secrets of the agent node (`VAR` → a template such as
    /// `{env:NAME}`): the server sees these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, String>,
}

/// A header the egress proxy adds for a host; the declaration holds where the secret is on
/// the agent node (`{env:NAME}` or `{file:/path}`), never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretHeader {
    /// `HOST[:PORT]`, one of the server's `allow_hosts`.
    pub host: String,
    /// Header name, e.g. `Authorization`.
    pub header: String,
    /// Value template, e.g. `Bearer {env:GITHUB_TOKEN}`.
    pub value: String,
}

/// Longest per-call limit.
pub const MAX_TIMEOUT_SECS: u64 = 86_400;
/// Most allowlisted hosts per server.
pub const MAX_HOSTS: usize = 64;

fn yes() -> bool {
    true
}

/// A mount of a server's container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerMount {
    /// Host path on the agent node.
    pub host: String,
    /// Absolute path in the container.
    pub container: String,
    /// Read-write when true (read-only by default).
    #[serde(default)]
    pub writable: bool,
}

/// Why a declaration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MCP server {name:?}: {reason}")]
pub struct SpecError {
    /// The server name (or key).
    pub name: String,
    /// What is wrong.
    pub reason: String,
}

impl ServerSpec {
    /// Checks the declaration.
    pub fn validate(&self) -> Result<(), SpecError> {
        let err = |reason: &str| SpecError {
            name: self.name.clone(),
            reason: reason.to_string(),
        };
        check_name(&self.name).map_err(|r| err(&r))?;
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(err("the command is empty"));
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(err("the command contains a NUL byte"));
        }
        for k in self.env.keys().chain(self.secret_env.keys()) {
            if !env_name_ok(k) {
                return Err(err(&format!("{k:?} is not an environment variable name")));
            }
        }
        for (k, t) in &self.secret_env {
            if self.env.contains_key(k) {
                return Err(err(&format!(
                    "{k} is set both by --env and by --secret-env"
                )));
            }
            super::egress::secret::Template::parse(t).map_err(|e| err(&e))?;
        }
        if self.allow_hosts.len() > MAX_HOSTS {
            return Err(err(&format!("more than {MAX_HOSTS} allowed hosts")));
        }
        super::egress::Policy::from_spec(self).map_err(|e| err(&e))?;
        for m in &self.mounts {
            if !m.container.starts_with('/') || !m.host.starts_with(['/', '~']) {
                return Err(err("mount paths must be absolute (HOST:CONTAINER)"));
            }
        }
        if self
            .timeout_secs
            .is_some_and(|t| t == 0 || t > MAX_TIMEOUT_SECS)
        {
            return Err(err(&format!(
                "timeout_secs must be 1 to {MAX_TIMEOUT_SECS}"
            )));
        }
        Ok(())
    }

    /// The image this server runs in.
    pub fn image_or_default(&self) -> &str {
        self.image
            .as_deref()
            .unwrap_or(crate::agent::sandbox::debian_image::PYTHON_IMAGE)
    }
}

fn env_name_ok(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Server names: 1-32 of `[a-z0-9-]`, starting with a letter (no `_`, so `mcp__NAME__TOOL`
/// splits one way only).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a server name: use 1-{MAX_NAME} of a-z, 0-9 and -, starting with a \
             letter"
        ))
    }
}

/// What the agent node reads from the settings document: the declarations it accepts, and
/// the ones it refuses with why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declarations {
    /// Accepted, sorted by name.
    pub servers: Vec<ServerSpec>,
    /// Refused: (key, reason).
    pub refused: Vec<(String, String)>,
}

/// Parses the `mcp.server.*` settings; only values written by an admin device of `trust`
/// count (a declaration runs code on the agent node).
pub fn specs_from(entries: &[AuthoredString], trust: &TrustState) -> Declarations {
    let mut out = Declarations::default();
    for e in entries {
        let Some(name) = e.key.strip_prefix(SPEC_PREFIX) else {
            continue;
        };
        let admin = e
            .author
            .and_then(|a| iom_protocol::keys::DeviceId::from_bytes(a).ok())
            .is_some_and(|d| trust.is_admin(&d) && !trust.is_revoked(&d));
        if !admin {
            out.refused.push((
                e.key.clone(),
                "not written by an admin device; ignored".to_string(),
            ));
            continue;
        }
        match serde_json::from_str::<ServerSpec>(&e.text) {
            Ok(s) if s.name != name => out
                .refused
                .push((e.key.clone(), format!("names server {:?}", s.name))),
            Ok(s) => match s.validate() {
                Ok(()) => out.servers.push(s),
                Err(err) => out.refused.push((e.key.clone(), err.reason)),
            },
            Err(err) => out
                .refused
                .push((e.key.clone(), format!("not a server declaration: {err}"))),
        }
    }
    out.servers.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A server's state, as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Its container is starting or the MCP handshake is running.
    Starting,
    /// Ready: its tools are offered to the model.
    Ready,
    /// It failed; it is restarted after a back-off.
    Failed,
    /// Disabled in its declaration.
    Disabled,
}

/// One tool of a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolInfo {
    /// The name the model sees (`mcp__SERVER__TOOL`).
    pub name: String,
    /// The server's own name for it.
    pub tool: String,
    /// Its description (shortened).
    #[serde(default)]
    pub description: String,
}

/// A server's state and tools, as the agent node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    /// Server name.
    pub name: String,
    /// What it is doing.
    pub phase: Phase,
    /// Its tools while ready (the last list otherwise).
    #[serde(default)]
    pub tools: Vec<ToolInfo>,
    /// The last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How many times it was restarted after a failure.
    #[serde(default)]
    pub restarts: u32,
    /// Unix seconds of the next start attempt, while failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<i64>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(name: &str) -> ServerSpec {
        ServerSpec {
            name: name.into(),
            command: vec!["python3".into(), "-m".into(), "mcp_server_time".into()],
            image: None,
            enabled: true,
            env: BTreeMap::new(),
            mounts: Vec::new(),
            timeout_secs: None,
            allow_hosts: Vec::new(),
            secret_headers: Vec::new(),
            secret_env: BTreeMap::new(),
        }
    }

    #[test]
    fn names_split_one_way_and_specs_are_checked() {
        for ok in ["time", "git", "my-server2"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a_b", "Time", "1x", "a b", &"x".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(spec("time").validate().is_ok());
        let mut s = spec("time");
        s.command.clear();
        assert!(s.validate().is_err());
        let mut s = spec("time");
        s.env.insert("BAD-NAME".into(), "x".into());
        assert!(s.validate().is_err());
        let mut s = spec("time");
        s.mounts.push(ServerMount {
            host: "relative".into(),
            container: "/r".into(),
            writable: false,
        });
        assert!(s.validate().is_err());
        let mut s = spec("fetch");
        s.allow_hosts = vec!["api.example.com".into()];
        s.secret_headers.push(SecretHeader {
            host: "api.example.com".into(),
            header: "Authorization".into(),
            value: "Bearer {env:EXAMPLE_TOKEN}".into(),
        });
        s.secret_env
            .insert("OTHER".into(), "{file:/etc/iom/other}".into());
        assert!(s.validate().is_ok(), "{:?}", s.validate());
        let mut bad = s.clone();
        bad.secret_headers[0].host = "other.example.com".into();
        assert!(bad.validate().unwrap_err().reason.contains("not allowed"));
        let mut bad = s.clone();
        bad.secret_headers[0].value = "Bearer sk-literal".into();
        assert!(bad.validate().unwrap_err().reason.contains("placeholder"));
        let mut bad = s.clone();
        bad.secret_headers[0].header = "Host".into();
        assert!(bad.validate().is_err());
        let mut bad = s.clone();
        bad.allow_hosts.push("http://x.org/".into());
        assert!(bad.validate().unwrap_err().reason.contains("not a URL"));
        let mut bad = s;
        bad.env.insert("OTHER".into(), "x".into());
        assert!(bad.validate().unwrap_err().reason.contains("both"));
        let j = serde_json::to_string(&spec("time")).unwrap();
        assert!(!j.contains("env") && !j.contains("image"), "{j}");
        let back: ServerSpec = serde_json::from_str(&j).unwrap();
        assert_eq!(back, spec("time"));
    }

    #[test]
    fn only_declarations_an_admin_wrote_count() {
        let trust = TrustState::default();
        let entries = vec![AuthoredString {
            key: "mcp.server.time".into(),
            text: serde_json::to_string(&spec("time")).unwrap(),
            author: Some([9; 32]),
        }];
        let d = specs_from(&entries, &trust);
        assert!(d.servers.is_empty());
        assert_eq!(d.refused.len(), 1);
        assert!(d.refused[0].1.contains("admin"), "{:?}", d.refused);
    }
}
