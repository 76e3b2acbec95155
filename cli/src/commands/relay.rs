//! `iom relay run`: the cloud relay node (circuit relay v2, AutoNAT v2 server, identify, ping).
//! The work is in `iom_node::relay`; this module parses flags and prints the addresses to give
//! to nodes (`iom node run --relay ADDR`).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use iom_node::relay::{CircuitLimit, RelayConfig, RelayLimits, RelayServer, WebConfig};
use iom_protocol::keys::PersonId;

/// Flags of `iom relay run`.
#[derive(Debug, Clone, Args)]
pub struct RelayRunArgs {
    /// Listen address (multiaddr); repeatable
    /// [default: /ip4/0.0.0.0/tcp/4001 and /ip4/0.0.0.0/udp/4001/quic-v1].
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Public address to advertise (multiaddr, e.g. /ip4/203.0.113.7/tcp/4001); repeatable.
    /// Without it the non-loopback listen addresses are advertised.
    #[arg(long = "external-addr", value_name = "ADDR")]
    pub external_addrs: Vec<String>,
    /// Person (64 hex digits, see `iom status`) whose devices get long, large circuits;
    /// repeatable. Everyone else only gets enough to coordinate a hole punch.
    #[arg(long = "allow-person", value_name = "PERSON")]
    pub allow_persons: Vec<String>,
    /// Lifetime of a circuit opened by an allowed device, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 24 * 60 * 60)]
    pub allowed_circuit_secs: u64,
    /// Bytes a circuit opened by an allowed device may carry, in MiB (0 = unlimited).
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    pub allowed_circuit_mib: u64,
    /// Reservations held at once.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub max_reservations: usize,
    /// Switch off the per-peer and per-IP rate limits on reservations and circuits (test labs).
    #[arg(long)]
    pub no_rate_limits: bool,
    /// Serve Prometheus metrics (`GET /metrics`) on this address (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Forward TLS connections for DEVICE.DOMAIN to that device (SNI passthrough; TLS ends on
    /// the device). Devices of allowed persons register their name; needs wildcard DNS
    /// `*.DOMAIN` pointing at this relay.
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// Where the TLS passthrough listens.
    #[arg(
        long,
        value_name = "IP:PORT",
        default_value = "0.0.0.0:443",
        requires = "domain"
    )]
    pub tls_listen: std::net::SocketAddr,
    /// The port browsers reach the TLS passthrough on, for the URLs devices show (behind a
    /// port mapping); default: the --tls-listen port.
    #[arg(long, value_name = "PORT", requires = "domain")]
    pub tls_public_port: Option<u16>,
    /// Answer ACME HTTP-01 challenges for DEVICE.DOMAIN here (port 80 for a real CA) by
    /// asking the device, so it can get a certificate for its name.
    #[arg(long, value_name = "IP:PORT", requires = "domain")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Forwarded TLS connections one device may have open at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub tls_max_connections_per_device: usize,
    /// Bytes one forwarded TLS connection may carry, in MiB (0 = unlimited).
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub tls_max_mib_per_connection: u64,
    /// A file holding the bearer token `/metrics` requires (needed for a non-loopback
    /// --metrics-listen).
    #[arg(long, value_name = "FILE", requires = "metrics_listen")]
    pub metrics_token_file: Option<std::path::PathBuf>,
}

impl RelayRunArgs {
    /// The relay configuration these flags describe.
    pub fn to_config(&self) -> anyhow::Result<RelayConfig> {
        let parse_addrs = |list: &[String], what: &str| {
            list.iter()
                .map(|a| {
                    a.parse()
                        .with_context(|| format!("{what} {a:?} is not a multiaddr"))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        };
        let listen = if self.listen.is_empty() {
            RelayConfig::default_listen()
        } else {
            parse_addrs(&self.listen, "--listen")?
        };
        let external = parse_addrs(&self.external_addrs, "--external-addr")?;
        let allowed_persons = self
            .allow_persons
            .iter()
            .map(|p| {
                p.parse::<PersonId>()
                    .with_context(|| format!("--allow-person {p:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut limits = RelayLimits {
            allowed: CircuitLimit {
                duration: Duration::from_secs(self.allowed_circuit_secs.min(u64::from(u32::MAX))),
                bytes: self.allowed_circuit_mib.saturating_mul(1024 * 1024),
            },
            max_reservations: self.max_reservations,
            ..RelayLimits::default()
        };
        if self.no_rate_limits {
            limits.rates = None;
        }
        let web = match &self.domain {
            Some(d) => {
                let domain = d.trim_end_matches('.').to_ascii_lowercase();
                iom_protocol::sni::host_name(domain.as_bytes())
                    .map_err(|_| anyhow::anyhow!("--domain {d:?} is not a DNS name"))?;
                let mut web = WebConfig::new(domain, self.tls_listen);
                web.public_port = self.tls_public_port;
                web.http_listen = self.http_listen;
                web.max_connections_per_device = self.tls_max_connections_per_device.max(1);
                web.max_bytes_per_connection =
                    self.tls_max_mib_per_connection.saturating_mul(1024 * 1024);
                Some(web)
            }
            None => None,
        };
        Ok(RelayConfig {
            listen,
            external,
            allowed_persons,
            limits,
            web,
        })
    }
}

/// `iom relay run`: runs the relay with its key in `data_dir/relay.key` until SIGINT/SIGTERM.
pub async fn run(data_dir: &Path, json: bool, args: RelayRunArgs) -> anyhow::Result<()> {
    let config = args.to_config()?;
    let key = iom_node::relay::load_or_create_relay_key(data_dir)?;
    let persons = config.allowed_persons.len();
    let domain = config.web.as_ref().map(|w| w.domain.clone());
    let token = match &args.metrics_token_file {
        Some(path) => Some(read_token(path)?),
        None => None,
    };
    let metrics_listener = match args.metrics_listen {
        Some(addr) => Some(iom_node::relay::metrics_http::bind(addr, token.as_deref()).await?),
        None => None,
    };
    let mut server = RelayServer::new(key, config)?;
    let addrs = server.start().await?;
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let metrics_task =
        metrics_listener.map(|l| iom_node::relay::metrics_http::serve(l, server.metrics(), token));
    let peer_id = server.peer_id();
    if json {
        let line = serde_json::json!({
            "peer_id": peer_id.to_string(),
            "addrs": addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "metrics": metrics_addr.map(|a| format!("http://{a}/metrics")),
            "tls": server.tls_addr().map(|a| a.to_string()),
            "http": server.http_addr().map(|a| a.to_string()),
            "domain": domain,
        });
        println!("{line}");
    } else {
        println!(
            "relay {peer_id} (key {})",
            iom_node::relay::relay_key_path(data_dir).display()
        );
        println!("allowed persons: {persons}");
        println!("give nodes one of these addresses (iom node run --relay ADDR):");
        for addr in &addrs {
            println!("  {addr}");
        }
        if let Some(a) = metrics_addr {
            println!("metrics: http://{a}/metrics");
        }
        if let (Some(a), Some(d)) = (server.tls_addr(), &domain) {
            println!(
                "TLS passthrough for *.{d} on {a} (devices of allowed persons register their name)"
            );
        }
        if let Some(a) = server.http_addr() {
            println!("ACME HTTP-01 challenges answered on http://{a}/");
        }
    }
    let r = server.run(iom_node::node::shutdown_signal()).await;
    if let Some(t) = metrics_task {
        t.abort();
    }
    r?;
    Ok(())
}

/// The bearer token in `path` (trimmed; must not be empty).
fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the metrics token file {}", path.display()))?;
    let token = text.trim().to_string();
    if token.is_empty() || token.len() > 256 || token.chars().any(char::is_control) {
        anyhow::bail!(
            "{}: a metrics token is 1 to 256 printable characters",
            path.display()
        );
    }
    Ok(token)
}
