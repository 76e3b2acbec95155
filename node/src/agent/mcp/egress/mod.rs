//! Egress for MCP servers that need the network: off by default, allowlisted hosts only,
//! through a proxy in the agent node.
//!
//! A server declared with `--allow-host HOST[:PORT]` still runs with `--network none`. Once
//! its container runs, the agent node opens a listener on `127.0.0.1:`[`PROXY_PORT`] **inside
//! the container's network namespace** ([`netns`]) and serves an HTTP forward proxy on it
//! ([`proxy`]) that allows only the server's hosts ([`allow`]) and adds its secret headers to
//! plain-HTTP requests ([`secret`]). The container gets `HTTP_PROXY`/`HTTPS_PROXY` pointing
//! there; it has no other address to reach.

pub mod allow;
pub mod netns;
pub mod proxy;
pub mod secret;

use std::sync::Arc;

use hyper::header::HeaderName;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::spec::ServerSpec;
use allow::{Allowlist, HostRule};
use secret::Template;

/// The proxy's port on the container's loopback.
pub const PROXY_PORT: u16 = 3128;

/// Headers the proxy never lets a declaration set.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
];

/// A header the proxy adds for a host.
#[derive(Debug, Clone)]
pub struct Injection {
    /// Requests it applies to.
    pub rule: HostRule,
    /// The header.
    pub name: HeaderName,
    /// Its value, with the secret's place.
    pub value: Template,
}

/// What the proxy of one server enforces.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The server's name (for messages and logs).
    pub server: String,
    /// Hosts it may reach.
    pub allow: Allowlist,
    /// Headers added to its plain-HTTP requests.
    pub headers: Vec<Injection>,
}

impl Policy {
    /// The policy of a declaration (checks it: rules, header names, templates, and that every
    /// secret header's host is allowed).
    pub fn from_spec(spec: &ServerSpec) -> Result<Policy, String> {
        let allow = Allowlist::parse(&spec.allow_hosts)?;
        let mut headers = Vec::new();
        for h in &spec.secret_headers {
            let rule = HostRule::parse(&h.host)?;
            let name = HeaderName::from_bytes(h.header.trim().as_bytes())
                .map_err(|_| format!("{:?} is not a header name", h.header))?;
            if RESERVED_HEADERS.contains(&name.as_str()) {
                return Err(format!("the proxy does not set the {name} header"));
            }
            if !allow.0.contains(&rule) {
                return Err(format!(
                    "the secret header for {rule} names a host that is not allowed (add \
                     --allow-host {rule})"
                ));
            }
            let value = Template::parse(&h.value)?;
            headers.push(Injection { rule, name, value });
        }
        Ok(Policy {
            server: spec.name.clone(),
            allow,
            headers,
        })
    }
}

/// The environment a server with egress gets (the proxy, for the usual clients: curl,
/// Python's urllib/requests/httpx, pip, Node.js 24+ with `NODE_USE_ENV_PROXY`).
pub fn proxy_env() -> Vec<String> {
    let url = format!("http://127.0.0.1:{PROXY_PORT}");
    let mut env: Vec<String> = ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]
        .iter()
        .map(|k| format!("{k}={url}"))
        .collect();
    env.push("NODE_USE_ENV_PROXY=1".into());
    env
}

/// A running proxy; stops when dropped.
pub struct Running {
    _stop: DropGuard,
}

/// Opens the proxy inside the network namespace of `pid` and serves `policy` there.
pub fn start(pid: i64, policy: Policy) -> Result<Running, String> {
    let std_listener = netns::listen_in(pid, PROXY_PORT)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)
        .map_err(|e| format!("cannot use the proxy's listener: {e}"))?;
    let stop = CancellationToken::new();
    tracing::info!(target: "iom::egress", server = %policy.server, allow = %policy.allow,
        "egress proxy listening in the server's container");
    tokio::spawn(proxy::serve(listener, Arc::new(policy), stop.clone()));
    Ok(Running {
        _stop: stop.drop_guard(),
    })
}
