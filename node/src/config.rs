//! Node configuration: `DATA/config.toml`, then environment, then command-line flags, checked
//! as a whole before anything starts ("raw, then validated").
//!
//! ```toml
//! name = "laptop"                      # shown in `iom devices`
//! [network]
//! listen = ["/ip4/0.0.0.0/tcp/4646", "/ip4/0.0.0.0/udp/4646/quic-v1"]
//! relays = ["/ip4/203.0.113.7/tcp/4001/p2p/12D3Koo..."]
//! mdns = true
//! [http]
//! listen = "127.0.0.1:8080"            # absent: no HTTP listener
//! [agent]
//! model = "claude-sonnet-4-5"
//! [sandbox]
//! memory_mb = 256
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use libp2p::Multiaddr;
use serde::Deserialize;

use crate::agent::sandbox::policy::SandboxConfig;

/// Default TCP and UDP (QUIC) port.
pub const DEFAULT_PORT: u16 = 4646;

/// Configuration as written in `config.toml`, before validation.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Device name.
    pub name: Option<String>,
    /// `[network]`.
    #[serde(default)]
    pub network: RawNetwork,
    /// `[http]`.
    #[serde(default)]
    pub http: RawHttp,
    /// `[agent]`.
    #[serde(default)]
    pub agent: AgentConfig,
    /// `[sandbox]`.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// `[storage]`.
    #[serde(default)]
    pub storage: StorageConfig,
}

/// `[network]` as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    /// Listen multiaddrs. Absent: TCP and QUIC on [`DEFAULT_PORT`], all interfaces.
    pub listen: Option<Vec<String>>,
    /// Relay multiaddrs (with `/p2p/RELAY_ID`).
    #[serde(default)]
    pub relays: Vec<String>,
    /// Local-network discovery. Absent: on.
    pub mdns: Option<bool>,
}

/// `[http]` as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    /// Address of the HTTP listener. Absent: none.
    pub listen: Option<String>,
}

/// `[agent]`: limits and model settings used when this node holds the agent role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Model name sent to the Messages API.
    pub model: String,
    /// `max_tokens` per model call.
    pub max_tokens: u32,
    /// Model calls (turns) per request.
    pub max_turns: u32,
    /// Tokens (input + output) per UTC day across the mesh. 0: unlimited.
    pub daily_token_budget: u64,
    /// Requests per device per minute. 0: unlimited.
    pub per_device_rate_per_min: u32,
    /// A file holding the API key (mode 0600). `ANTHROPIC_API_KEY` wins when set.
    pub key_file: Option<PathBuf>,
    /// Base URL of the Messages API. `ANTHROPIC_BASE_URL` wins when set.
    pub base_url: Option<String>,
    /// Characters of history sent per request before older messages are dropped.
    pub history_chars: usize,
    /// What happens to requests that were running when the agent stopped:
    /// `fail` (mark `failed: interrupted`) or `retry` (run them again once).
    pub on_interrupted: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            model: "claude-sonnet-4-5".into(),
            max_tokens: 4096,
            max_turns: 16,
            daily_token_budget: 2_000_000,
            per_device_rate_per_min: 30,
            key_file: None,
            base_url: None,
            history_chars: 100_000,
            on_interrupted: "fail".into(),
        }
    }
}

/// `[storage]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// sled page cache in MiB.
    pub cache_mb: u64,
    /// Documents kept loaded in memory.
    pub loaded_docs: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            cache_mb: 16,
            loaded_docs: 128,
        }
    }
}

/// Overrides from the command line and the environment (flags win over env, env over file).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--name`.
    pub name: Option<String>,
    /// `--listen` (repeatable).
    pub listen: Vec<String>,
    /// `--relay` (repeatable).
    pub relays: Vec<String>,
    /// `--http`.
    pub http: Option<String>,
    /// `--no-mdns`.
    pub no_mdns: bool,
    /// `ANTHROPIC_API_KEY`.
    pub api_key: Option<String>,
    /// `ANTHROPIC_BASE_URL`.
    pub base_url: Option<String>,
    /// `IOM_CLOCK_OFFSET_SECS`: seconds added to the wall clock (schedule tests). Ignored
    /// unless [`TEST_HOOKS`].
    pub clock_offset_secs: Option<i64>,
    /// `IOM_FAULT`: comma-separated fault injections for tests ([`KNOWN_FAULTS`]). Ignored
    /// unless [`TEST_HOOKS`].
    pub faults: Vec<String>,
}

/// A validated configuration: every address parsed, every value in range.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Device name.
    pub name: String,
    /// Parsed listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Parsed relay addresses.
    pub relays: Vec<Multiaddr>,
    /// mDNS on or off.
    pub mdns: bool,
    /// HTTP listener.
    pub http: Option<SocketAddr>,
    /// Agent settings.
    pub agent: AgentConfig,
    /// API key from the environment, if any (only used when this node is the agent).
    pub api_key: Option<String>,
    /// Sandbox settings.
    pub sandbox: SandboxConfig,
    /// Storage settings.
    pub storage: StorageConfig,
    /// Seconds added to the wall clock (tests of schedules); always 0 without [`TEST_HOOKS`].
    pub clock_offset_secs: i64,
    /// Fault injection for tests (`IOM_FAULT=corrupt-blob-chunks`): serve corrupted chunks.
    pub fault_corrupt_blob_chunks: bool,
    /// Fault injection for tests (`IOM_FAULT=garbage-sync`): send garbage sync messages.
    pub fault_garbage_sync: bool,
    /// Fault injection for tests (`IOM_FAULT=garbage-snapshot`): send a whole document that
    /// is not an Automerge document.
    pub fault_garbage_snapshot: bool,
    /// Fault injection for tests (`IOM_FAULT=no-addr-sharing`): do not tell peers where other
    /// devices are (`SyncMsg::Addrs`), so a chain A–B–C stays a chain.
    pub fault_no_addr_sharing: bool,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (names the line and key).
        message: String,
    },
    /// An address is unparsable.
    #[error("invalid {field}: {source}")]
    Address {
        /// Which setting (`listen address`, `relay address`).
        field: &'static str,
        /// Why.
        source: AddrError,
    },
    /// A value is out of range or unparsable.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// Which setting.
        field: String,
        /// Why.
        message: String,
    },
}

impl RawConfig {
    /// Reads `DATA/config.toml`; a missing file is an empty configuration.
    pub fn load(data_dir: &Path) -> Result<RawConfig, ConfigError> {
        let path = data_dir.join("config.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RawConfig::default()),
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// Merges overrides and validates everything.
    pub fn validate(self, data_dir: PathBuf, o: Overrides) -> Result<Config, ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            field: field.into(),
            message,
        };
        let name = o.name.or(self.name).unwrap_or_else(default_device_name);
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(invalid(
                "name",
                format!("{name:?}: 1 to 64 printable characters"),
            ));
        }
        let listen_raw = if !o.listen.is_empty() {
            o.listen
        } else {
            self.network.listen.unwrap_or_else(|| {
                vec![
                    format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"),
                    format!("/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1"),
                ]
            })
        };
        let listen = listen_raw
            .iter()
            .map(|a| {
                parse_listen_addr(a).map_err(|source| ConfigError::Address {
                    field: "listen address",
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let relays_raw = if o.relays.is_empty() {
            self.network.relays
        } else {
            o.relays
        };
        let relays = relays_raw
            .iter()
            .map(|a| {
                parse_relay_addr(a).map_err(|source| ConfigError::Address {
                    field: "relay address",
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let http = o
            .http
            .or(self.http.listen)
            .map(|h| {
                h.parse::<SocketAddr>()
                    .map_err(|e| invalid("http address", format!("{h:?}: {e} (expected IP:PORT)")))
            })
            .transpose()?;
        let mut agent = self.agent;
        if let Some(url) = o.base_url {
            agent.base_url = Some(url);
        }
        if let Some(url) = &agent.base_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "agent.base_url",
                format!("{url:?}: must start with http:// or https://"),
            ));
        }
        if agent.max_turns == 0 || agent.max_tokens == 0 {
            return Err(invalid(
                "agent",
                "max_turns and max_tokens must be at least 1".into(),
            ));
        }
        if !matches!(agent.on_interrupted.as_str(), "fail" | "retry") {
            return Err(invalid(
                "agent.on_interrupted",
                format!("{:?}: expected \"fail\" or \"retry\"", agent.on_interrupted),
            ));
        }
        if self.storage.loaded_docs == 0 {
            return Err(invalid("storage.loaded_docs", "must be at least 1".into()));
        }
        let hooks = TestHooks::from_overrides(o.clock_offset_secs, o.faults)?;
        Ok(Config {
            data_dir,
            name,
            listen,
            relays,
            mdns: self.network.mdns.unwrap_or(true) && !o.no_mdns,
            http,
            agent,
            api_key: o.api_key.filter(|k| !k.trim().is_empty()),
            sandbox: self.sandbox,
            storage: self.storage,
            clock_offset_secs: hooks.clock_offset_secs,
            fault_corrupt_blob_chunks: hooks.has("corrupt-blob-chunks"),
            fault_garbage_sync: hooks.has("garbage-sync"),
            fault_garbage_snapshot: hooks.has("garbage-snapshot"),
            fault_no_addr_sharing: hooks.has("no-addr-sharing"),
        })
    }
}

/// Why an address in the configuration was refused. The messages name the text as written.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    /// An `IP:PORT` shorthand that does not make a multiaddr.
    #[error("{text:?}: {source}")]
    Shorthand {
        /// The address as written.
        text: String,
        /// What the multiaddr parser said.
        source: libp2p::multiaddr::Error,
    },
    /// Not a multiaddr (nor `IP:PORT`).
    #[error("{text:?}: {source} (expected a multiaddr like /ip4/0.0.0.0/tcp/4646)")]
    Listen {
        /// The address as written.
        text: String,
        /// What the multiaddr parser said.
        source: libp2p::multiaddr::Error,
    },
    /// A relay address that is not a multiaddr.
    #[error("{text:?}: {source} (expected /ip4/IP/tcp/PORT/p2p/RELAY_ID)")]
    Relay {
        /// The address as written.
        text: String,
        /// What the multiaddr parser said.
        source: libp2p::multiaddr::Error,
    },
    /// A relay address that does not name the relay's peer id.
    #[error("{text:?}: must end with /p2p/RELAY_ID (see `iom relay run`)")]
    RelayWithoutPeerId {
        /// The address as written.
        text: String,
    },
}

/// Parses a listen address. Accepts a multiaddr, or `IP:PORT` as a shorthand for TCP.
pub fn parse_listen_addr(text: &str) -> Result<Multiaddr, AddrError> {
    if let Ok(sock) = text.parse::<SocketAddr>() {
        let ip = match sock.ip() {
            std::net::IpAddr::V4(ip) => format!("/ip4/{ip}"),
            std::net::IpAddr::V6(ip) => format!("/ip6/{ip}"),
        };
        return format!("{ip}/tcp/{}", sock.port())
            .parse()
            .map_err(|source| AddrError::Shorthand {
                text: text.into(),
                source,
            });
    }
    text.parse::<Multiaddr>()
        .map_err(|source| AddrError::Listen {
            text: text.into(),
            source,
        })
}

/// Parses a relay address, which must name the relay's peer id.
pub fn parse_relay_addr(text: &str) -> Result<Multiaddr, AddrError> {
    let addr: Multiaddr = text.parse().map_err(|source| AddrError::Relay {
        text: text.into(),
        source,
    })?;
    if !addr
        .iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
    {
        return Err(AddrError::RelayWithoutPeerId { text: text.into() });
    }
    Ok(addr)
}

/// Whether this build honours the test hooks (`IOM_FAULT`, `IOM_CLOCK_OFFSET_SECS`): true only
/// with the `test-hooks` cargo feature, which the shipped binary is built without.
pub const TEST_HOOKS: bool = cfg!(feature = "test-hooks");

/// The fault injections a `test-hooks` build knows (`IOM_FAULT`, comma-separated).
pub const KNOWN_FAULTS: &[&str] = &[
    "corrupt-blob-chunks",
    "garbage-sync",
    "garbage-snapshot",
    "no-addr-sharing",
];

/// The test hooks after the build has had its say: empty unless [`TEST_HOOKS`].
struct TestHooks {
    clock_offset_secs: i64,
    faults: Vec<String>,
}

impl TestHooks {
    fn from_overrides(offset: Option<i64>, faults: Vec<String>) -> Result<TestHooks, ConfigError> {
        let faults: Vec<String> = faults.into_iter().filter(|f| !f.is_empty()).collect();
        if !TEST_HOOKS {
            if offset.is_some() || !faults.is_empty() {
                tracing::warn!(
                    "IOM_FAULT and IOM_CLOCK_OFFSET_SECS are test hooks; this build ignores them"
                );
            }
            return Ok(TestHooks {
                clock_offset_secs: 0,
                faults: Vec::new(),
            });
        }
        if let Some(unknown) = faults.iter().find(|f| !KNOWN_FAULTS.contains(&f.as_str())) {
            return Err(ConfigError::Invalid {
                field: "IOM_FAULT".into(),
                message: format!("{unknown:?}: expected one of {}", KNOWN_FAULTS.join(", ")),
            });
        }
        Ok(TestHooks {
            clock_offset_secs: offset.unwrap_or(0),
            faults,
        })
    }

    fn has(&self, fault: &str) -> bool {
        self.faults.iter().any(|f| f == fault)
    }
}

fn default_device_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && h.len() <= 64)
        .unwrap_or_else(|| "device".into())
}

/// The default data directory: `$XDG_DATA_HOME/iom`, else `~/.local/share/iom`.
pub fn default_data_dir(xdg_data_home: Option<String>, home: Option<String>) -> PathBuf {
    if let Some(x) = xdg_data_home.filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("iom");
    }
    match home.filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/share/iom"),
        None => PathBuf::from(".iom"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = RawConfig::default()
            .validate("/tmp/x".into(), Overrides::default())
            .unwrap();
        assert_eq!(c.listen.len(), 2);
        assert!(c.mdns);
        assert!(c.http.is_none());
    }

    #[test]
    fn bad_values_are_named() {
        let o = Overrides {
            listen: vec!["not-an-addr".into()],
            ..Default::default()
        };
        let e = RawConfig::default().validate("/tmp".into(), o).unwrap_err();
        assert!(e.to_string().contains("listen address"), "{e}");
        let o = Overrides {
            relays: vec!["/ip4/1.2.3.4/tcp/1".into()],
            ..Default::default()
        };
        let e = RawConfig::default().validate("/tmp".into(), o).unwrap_err();
        assert!(e.to_string().contains("/p2p/RELAY_ID"), "{e}");
        let o = Overrides {
            http: Some("localhost".into()),
            ..Default::default()
        };
        assert!(RawConfig::default().validate("/tmp".into(), o).is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), "nmae = \"x\"\n").unwrap();
        let e = RawConfig::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("nmae"), "{e}");
    }

    #[test]
    fn shorthand_listen() {
        assert_eq!(
            parse_listen_addr("127.0.0.1:0").unwrap().to_string(),
            "/ip4/127.0.0.1/tcp/0"
        );
    }
}
