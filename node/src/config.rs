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
//! listen = "127.0.0.1:8080"            # absent: no plain HTTP listener (loopback only)
//! https = "0.0.0.0:8443"               # absent: no HTTPS listener
//! cert = "/etc/iom/cert.pem"           # with `key`; absent: a self-signed certificate
//! key = "/etc/iom/key.pem"
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
    /// `[email]`: the email channel (absent: off).
    #[serde(default)]
    pub email: Option<crate::channels::email::config::RawEmail>,
    /// `[backup]`.
    #[serde(default)]
    pub backup: BackupConfig,
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
    /// Address of the plain HTTP listener. Absent: none.
    pub listen: Option<String>,
    /// Serve plain HTTP on a non-loopback `listen` address anyway (tokens travel in clear).
    #[serde(default)]
    pub insecure: bool,
    /// Address of the HTTPS listener. Absent: none.
    pub https: Option<String>,
    /// PEM certificate chain for HTTPS (with `key`). Absent: a self-signed certificate kept
    /// in the data dir.
    pub cert: Option<PathBuf>,
    /// PEM private key for HTTPS (with `cert`).
    pub key: Option<PathBuf>,
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
    /// The model's context window in tokens: a conversation that would not fit (with
    /// `max_tokens` of room for the answer) has its older turns compacted into a summary.
    /// 0: 200,000 (the Claude models' window).
    pub context_window: u64,
    /// `[agent.budget]`: budgets beyond `daily_token_budget`.
    pub budget: BudgetConfig,
    /// `[agent.prices."MODEL"]`: US dollars per million tokens (`input`, `output`,
    /// `cache_write`, `cache_read`), added to or replacing the built-in Claude prices.
    pub prices: std::collections::BTreeMap<String, crate::agent::cost::Price>,
}

/// `[agent.budget]`: limits per UTC day and month, for the mesh and for each asking device,
/// in tokens and/or US dollars. 0 means no limit. The mesh's daily token limit is
/// `agent.daily_token_budget`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Tokens per month across the mesh.
    pub monthly_tokens: u64,
    /// Dollars per day across the mesh.
    pub daily_usd: f64,
    /// Dollars per month across the mesh.
    pub monthly_usd: f64,
    /// Tokens per day for each asking device.
    pub device_daily_tokens: u64,
    /// Tokens per month for each asking device.
    pub device_monthly_tokens: u64,
    /// Dollars per day for each asking device.
    pub device_daily_usd: f64,
    /// Dollars per month for each asking device.
    pub device_monthly_usd: f64,
    /// `[agent.budget.devices."NAME-OR-ID"]`: one device's limits in place of the
    /// `device_*` ones (`daily_tokens`, `monthly_tokens`, `daily_usd`, `monthly_usd`).
    pub devices: std::collections::BTreeMap<String, DeviceBudget>,
}

/// One device's budget (`[agent.budget.devices."NAME-OR-ID"]`); an absent field keeps the
/// `device_*` default.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceBudget {
    /// Tokens per day.
    pub daily_tokens: Option<u64>,
    /// Tokens per month.
    pub monthly_tokens: Option<u64>,
    /// Dollars per day.
    pub daily_usd: Option<f64>,
    /// Dollars per month.
    pub monthly_usd: Option<f64>,
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
            context_window: 0,
            budget: BudgetConfig::default(),
            prices: std::collections::BTreeMap::new(),
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
    /// Free space (MiB) kept on the disk holding the data dir: below it, new documents,
    /// changes and blobs are refused with a clear error until space is freed.
    pub reserve_mb: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            cache_mb: 16,
            loaded_docs: 128,
            reserve_mb: 256,
        }
    }
}

/// `[backup]`: the backup directory of `iom backup create|list`, and scheduled backups by the
/// running node (`every`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// The backup directory (archives and their catalogs).
    pub dir: Option<PathBuf>,
    /// Back up every this long (`30m`, `6h`, `1d`); absent: no scheduled backups.
    pub every: Option<String>,
    /// Include blobs (incremental: only new ones are copied).
    pub blobs: bool,
    /// Encrypt with the passphrase in this file's first line.
    pub passphrase_file: Option<PathBuf>,
    /// Or encrypt to this age recipient (`age1…`).
    pub recipient: Option<String>,
}

/// Parses `90s`, `15m`, `6h`, `1d` (or plain seconds).
pub fn parse_interval(text: &str) -> Option<std::time::Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult).map(std::time::Duration::from_secs)
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
    /// `--insecure-http`: allow plain HTTP on a non-loopback address.
    pub insecure_http: bool,
    /// `--https`.
    pub https: Option<String>,
    /// `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`.
    pub tls_key: Option<PathBuf>,
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
    /// Plain HTTP listener (loopback, unless forced).
    pub http: Option<SocketAddr>,
    /// HTTPS listener.
    pub https: Option<HttpsConfig>,
    /// Agent settings.
    pub agent: AgentConfig,
    /// API key from the environment, if any (only used when this node is the agent).
    pub api_key: Option<String>,
    /// Sandbox settings.
    pub sandbox: SandboxConfig,
    /// Storage settings.
    pub storage: StorageConfig,
    /// The email channel, if configured.
    pub email: Option<crate::channels::email::config::EmailConfig>,
    /// Backup settings.
    pub backup: BackupConfig,
    /// How often the node backs up by itself (`[backup] every`), if at all.
    pub backup_every: Option<std::time::Duration>,
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

/// The HTTPS listener's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsConfig {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The user's certificate chain and key (PEM files); `None`: self-signed.
    pub cert: Option<(PathBuf, PathBuf)>,
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
        if let Some(addr) = http
            && !addr.ip().is_loopback()
            && !(o.insecure_http || self.http.insecure)
        {
            return Err(invalid(
                "http address",
                format!(
                    "{addr} is not a loopback address, and plain HTTP would send API tokens and \
                     sessions in clear on the network; serve HTTPS there with `--https {addr}` \
                     (`[http] https`), keep plain HTTP on 127.0.0.1, or force it with \
                     `--insecure-http` (`[http] insecure = true`)"
                ),
            ));
        }
        let https = o
            .https
            .or(self.http.https)
            .map(|h| {
                h.parse::<SocketAddr>()
                    .map_err(|e| invalid("https address", format!("{h:?}: {e} (expected IP:PORT)")))
            })
            .transpose()?;
        let cert = match (o.tls_cert.or(self.http.cert), o.tls_key.or(self.http.key)) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "https certificate",
                    "give both the certificate and its key (`--tls-cert` and `--tls-key`, or \
                     `[http] cert` and `key`), or neither for a self-signed certificate"
                        .into(),
                ));
            }
        };
        if cert.is_some() && https.is_none() {
            return Err(invalid(
                "https certificate",
                "a certificate is set but no HTTPS address (`--https IP:PORT`)".into(),
            ));
        }
        let https = https.map(|addr| HttpsConfig { addr, cert });
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
        let b = &agent.budget;
        let dollars = [
            ("agent.budget.daily_usd", Some(b.daily_usd)),
            ("agent.budget.monthly_usd", Some(b.monthly_usd)),
            ("agent.budget.device_daily_usd", Some(b.device_daily_usd)),
            (
                "agent.budget.device_monthly_usd",
                Some(b.device_monthly_usd),
            ),
        ]
        .into_iter()
        .chain(b.devices.values().flat_map(|d| {
            [
                ("agent.budget.devices.*.daily_usd", d.daily_usd),
                ("agent.budget.devices.*.monthly_usd", d.monthly_usd),
            ]
        }));
        for (field, usd) in dollars {
            if let Some(usd) = usd
                && !(usd.is_finite() && usd >= 0.0)
            {
                return Err(invalid(field, format!("{usd}: a dollar amount, 0 or more")));
            }
        }
        for (model, p) in &agent.prices {
            let all = [p.input, p.output, p.cache_write, p.cache_read];
            if model.trim().is_empty() || all.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
                return Err(invalid(
                    "agent.prices",
                    format!(
                        "{model:?}: a model name and prices of 0 or more dollars per million tokens"
                    ),
                ));
            }
        }
        if self.storage.loaded_docs == 0 {
            return Err(invalid("storage.loaded_docs", "must be at least 1".into()));
        }
        let email = self
            .email
            .map(|e| e.validate())
            .transpose()
            .map_err(|(field, message)| ConfigError::Invalid { field, message })?;
        let backup_every = match &self.backup.every {
            None => None,
            Some(text) => {
                let every = parse_interval(text)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        invalid("backup.every", format!("{text:?}: like 30m, 6h or 1d"))
                    })?;
                if self.backup.dir.is_none() {
                    return Err(invalid("backup.every", "needs backup.dir".into()));
                }
                if self.backup.passphrase_file.is_some() == self.backup.recipient.is_some() {
                    return Err(invalid(
                        "backup.every",
                        "needs exactly one of backup.passphrase_file and backup.recipient".into(),
                    ));
                }
                Some(every)
            }
        };
        let hooks = TestHooks::from_overrides(o.clock_offset_secs, o.faults)?;
        Ok(Config {
            data_dir,
            name,
            listen,
            relays,
            mdns: self.network.mdns.unwrap_or(true) && !o.no_mdns,
            http,
            https,
            agent,
            api_key: o.api_key.filter(|k| !k.trim().is_empty()),
            sandbox: self.sandbox,
            storage: self.storage,
            email,
            backup: self.backup,
            backup_every,
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

    fn validate(raw: RawConfig, o: Overrides) -> Result<Config, ConfigError> {
        raw.validate("/tmp/x".into(), o)
    }

    fn invalid_field(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { field, .. } => field,
            ConfigError::Address { field, .. } => field.to_string(),
            other => panic!("not a value error: {other}"),
        }
    }

    #[test]
    fn the_documented_example_parses() {
        let text = r#"
            name = "laptop"
            [network]
            listen = ["/ip4/0.0.0.0/tcp/4646", "/ip4/0.0.0.0/udp/4646/quic-v1"]
            relays = ["/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"]
            mdns = true
            [http]
            listen = "127.0.0.1:8080"
            [agent]
            model = "claude-sonnet-4-5"
            [sandbox]
            memory_mb = 256
        "#;
        let raw: RawConfig = toml::from_str(text).unwrap();
        let c = validate(raw, Overrides::default()).unwrap();
        assert_eq!(c.name, "laptop");
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.relays.len(), 1);
        assert_eq!(c.http, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(c.agent.model, "claude-sonnet-4-5");
    }

    #[test]
    fn a_name_must_be_1_to_64_printable_characters() {
        for bad in ["", &"x".repeat(65), "tab\there"] {
            let o = Overrides {
                name: Some(bad.to_string()),
                ..Default::default()
            };
            let e = validate(RawConfig::default(), o).unwrap_err();
            assert_eq!(invalid_field(e), "name");
        }
        let raw = RawConfig {
            name: Some("file".into()),
            ..Default::default()
        };
        let o = Overrides {
            name: Some("flag".into()),
            ..Default::default()
        };
        assert_eq!(validate(raw.clone(), o).unwrap().name, "flag", "flags win");
        assert_eq!(validate(raw, Overrides::default()).unwrap().name, "file");
    }

    #[test]
    fn listen_addresses_from_flags_replace_the_file() {
        let raw = RawConfig {
            network: RawNetwork {
                listen: Some(vec!["/ip4/127.0.0.1/tcp/1".into()]),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = validate(raw.clone(), Overrides::default()).unwrap();
        assert_eq!(c.listen, vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()]);
        let o = Overrides {
            listen: vec!["[::1]:7".into(), "/ip4/0.0.0.0/udp/9/quic-v1".into()],
            ..Default::default()
        };
        let c = validate(raw, o).unwrap();
        assert_eq!(
            c.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec!["/ip6/::1/tcp/7", "/ip4/0.0.0.0/udp/9/quic-v1"]
        );
    }

    #[test]
    fn address_errors_are_typed_and_keep_their_messages() {
        let e = parse_listen_addr("nope").unwrap_err();
        assert!(matches!(&e, AddrError::Listen { text, .. } if text == "nope"));
        assert!(
            e.to_string()
                .contains("(expected a multiaddr like /ip4/0.0.0.0/tcp/4646)"),
            "{e}"
        );
        let e = parse_relay_addr("/ip4/1.2.3.4/tcp/1").unwrap_err();
        assert!(matches!(e, AddrError::RelayWithoutPeerId { .. }));
        assert_eq!(
            e.to_string(),
            "\"/ip4/1.2.3.4/tcp/1\": must end with /p2p/RELAY_ID (see `iom relay run`)"
        );
        let e = parse_relay_addr("relay.example").unwrap_err();
        assert!(matches!(e, AddrError::Relay { .. }));
        assert!(
            e.to_string().contains("/ip4/IP/tcp/PORT/p2p/RELAY_ID"),
            "{e}"
        );
        let o = Overrides {
            relays: vec!["relay.example".into()],
            ..Default::default()
        };
        let e = validate(RawConfig::default(), o).unwrap_err();
        assert!(e.to_string().starts_with("invalid relay address: "), "{e}");
    }

    #[test]
    fn relays_from_flags_replace_the_file() {
        let id = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
        let raw = RawConfig {
            network: RawNetwork {
                relays: vec![format!("/ip4/10.0.0.1/tcp/4001/p2p/{id}")],
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            validate(raw.clone(), Overrides::default())
                .unwrap()
                .relays
                .len(),
            1
        );
        let o = Overrides {
            relays: vec![
                format!("/ip4/10.0.0.2/tcp/4001/p2p/{id}"),
                format!("/ip4/10.0.0.3/udp/4001/quic-v1/p2p/{id}"),
            ],
            ..Default::default()
        };
        let c = validate(raw, o).unwrap();
        assert_eq!(c.relays.len(), 2);
        assert!(c.relays[0].to_string().starts_with("/ip4/10.0.0.2/"));
    }

    #[test]
    fn the_http_address_is_ip_and_port_and_the_flag_wins() {
        let raw = RawConfig {
            http: RawHttp {
                listen: Some("127.0.0.1:8080".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = validate(raw.clone(), Overrides::default()).unwrap();
        assert_eq!(c.http.unwrap().port(), 8080);
        let o = Overrides {
            http: Some("127.0.0.2:9".into()),
            ..Default::default()
        };
        assert_eq!(validate(raw, o).unwrap().http.unwrap().port(), 9);
        let o = Overrides {
            http: Some("localhost:80".into()),
            ..Default::default()
        };
        let e = validate(RawConfig::default(), o).unwrap_err();
        assert!(e.to_string().contains("(expected IP:PORT)"), "{e}");
        assert_eq!(invalid_field(e), "http address");
    }

    #[test]
    fn plain_http_off_loopback_is_refused_unless_forced() {
        let lan = || Overrides {
            http: Some("0.0.0.0:8080".into()),
            ..Default::default()
        };
        let e = validate(RawConfig::default(), lan()).unwrap_err();
        assert!(e.to_string().contains("--https 0.0.0.0:8080"), "{e}");
        assert!(e.to_string().contains("--insecure-http"), "{e}");
        let forced = Overrides {
            insecure_http: true,
            ..lan()
        };
        assert!(
            validate(RawConfig::default(), forced)
                .unwrap()
                .http
                .is_some()
        );
        let raw = RawConfig {
            http: RawHttp {
                insecure: true,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(validate(raw, lan()).unwrap().http.is_some());
    }

    #[test]
    fn https_takes_an_address_and_both_or_neither_of_cert_and_key() {
        let o = Overrides {
            https: Some("0.0.0.0:8443".into()),
            ..Default::default()
        };
        let c = validate(RawConfig::default(), o.clone()).unwrap();
        let https = c.https.unwrap();
        assert_eq!(https.addr.port(), 8443);
        assert!(https.cert.is_none());
        let half = Overrides {
            tls_cert: Some("c.pem".into()),
            ..o.clone()
        };
        let e = validate(RawConfig::default(), half).unwrap_err();
        assert_eq!(invalid_field(e), "https certificate");
        let raw = RawConfig {
            http: RawHttp {
                cert: Some("c.pem".into()),
                key: Some("k.pem".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = validate(raw.clone(), o).unwrap();
        assert_eq!(
            c.https.unwrap().cert,
            Some((PathBuf::from("c.pem"), PathBuf::from("k.pem")))
        );
        let e = validate(raw, Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("no HTTPS address"), "{e}");
        let bad = Overrides {
            https: Some("host:1".into()),
            ..Default::default()
        };
        let e = validate(RawConfig::default(), bad).unwrap_err();
        assert_eq!(invalid_field(e), "https address");
    }

    #[test]
    fn agent_settings_are_checked() {
        let with = |f: fn(&mut AgentConfig)| {
            let mut raw = RawConfig::default();
            f(&mut raw.agent);
            validate(raw, Overrides::default())
        };
        assert_eq!(
            invalid_field(with(|a| a.max_turns = 0).unwrap_err()),
            "agent"
        );
        assert_eq!(
            invalid_field(with(|a| a.max_tokens = 0).unwrap_err()),
            "agent"
        );
        assert_eq!(
            invalid_field(with(|a| a.on_interrupted = "ignore".into()).unwrap_err()),
            "agent.on_interrupted"
        );
        assert_eq!(
            with(|a| a.on_interrupted = "retry".into())
                .unwrap()
                .agent
                .on_interrupted,
            "retry"
        );
        assert_eq!(
            invalid_field(with(|a| a.base_url = Some("ftp://x".into())).unwrap_err()),
            "agent.base_url"
        );
    }

    #[test]
    fn the_base_url_from_the_environment_wins_and_is_checked() {
        let mut raw = RawConfig::default();
        raw.agent.base_url = Some("https://file.example".into());
        let o = Overrides {
            base_url: Some("http://127.0.0.1:9999".into()),
            ..Default::default()
        };
        let c = validate(raw, o).unwrap();
        assert_eq!(c.agent.base_url.as_deref(), Some("http://127.0.0.1:9999"));
        let o = Overrides {
            base_url: Some("127.0.0.1:9999".into()),
            ..Default::default()
        };
        let e = validate(RawConfig::default(), o).unwrap_err();
        assert_eq!(invalid_field(e), "agent.base_url");
    }

    #[test]
    fn at_least_one_document_stays_loaded() {
        let mut raw = RawConfig::default();
        raw.storage.loaded_docs = 0;
        let e = validate(raw, Overrides::default()).unwrap_err();
        assert_eq!(invalid_field(e), "storage.loaded_docs");
    }

    #[test]
    fn mdns_is_off_by_file_or_by_flag_and_a_blank_api_key_is_none() {
        let mut raw = RawConfig::default();
        raw.network.mdns = Some(false);
        assert!(!validate(raw, Overrides::default()).unwrap().mdns);
        let o = Overrides {
            no_mdns: true,
            api_key: Some("  ".into()),
            ..Default::default()
        };
        let c = validate(RawConfig::default(), o).unwrap();
        assert!(!c.mdns);
        assert_eq!(c.api_key, None);
        let o = Overrides {
            api_key: Some("sk-1".into()),
            ..Default::default()
        };
        assert_eq!(
            validate(RawConfig::default(), o)
                .unwrap()
                .api_key
                .as_deref(),
            Some("sk-1")
        );
    }

    #[test]
    fn test_hooks_are_honoured_only_in_builds_with_the_feature() {
        let o = Overrides {
            clock_offset_secs: Some(3600),
            faults: vec!["garbage-sync".into(), "no-addr-sharing".into(), "".into()],
            ..Default::default()
        };
        let c = validate(RawConfig::default(), o).unwrap();
        assert_eq!(c.clock_offset_secs, if TEST_HOOKS { 3600 } else { 0 });
        assert_eq!(c.fault_garbage_sync, TEST_HOOKS);
        assert_eq!(c.fault_no_addr_sharing, TEST_HOOKS);
        assert!(!c.fault_corrupt_blob_chunks && !c.fault_garbage_snapshot);
        let o = Overrides {
            faults: vec!["explode".into()],
            ..Default::default()
        };
        let r = validate(RawConfig::default(), o);
        if TEST_HOOKS {
            let e = r.unwrap_err();
            assert!(
                e.to_string()
                    .contains("expected one of corrupt-blob-chunks"),
                "{e}"
            );
        } else {
            assert!(r.is_ok(), "ignored without the feature");
        }
    }

    #[test]
    fn loading_a_missing_file_is_empty_and_an_unreadable_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let raw = RawConfig::load(dir.path()).unwrap();
        assert!(raw.name.is_none() && raw.network.listen.is_none());
        std::fs::create_dir(dir.path().join("config.toml")).unwrap();
        let e = RawConfig::load(dir.path()).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), "name = 3\n").unwrap();
        let e = RawConfig::load(dir.path()).unwrap_err();
        assert!(matches!(&e, ConfigError::Parse { path, .. } if path.ends_with("config.toml")));
    }

    #[test]
    fn the_default_data_dir_follows_xdg_then_home() {
        assert_eq!(
            default_data_dir(Some("/x".into()), Some("/home/u".into())),
            PathBuf::from("/x/iom")
        );
        assert_eq!(
            default_data_dir(Some(String::new()), Some("/home/u".into())),
            PathBuf::from("/home/u/.local/share/iom")
        );
        assert_eq!(default_data_dir(None, None), PathBuf::from(".iom"));
        assert_eq!(
            default_data_dir(None, Some(String::new())),
            PathBuf::from(".iom")
        );
    }
}
