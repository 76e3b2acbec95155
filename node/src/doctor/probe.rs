//! Gathers the facts the [`super::checks`] judge: from the operating system and Docker
//! (any time) and from the running node's services.

use std::path::Path;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::multiaddr::Protocol;

use super::Finding;
use super::checks::{self, RoleView};
use crate::config::Config;
use crate::identity::SharedIdentity;
use crate::net::Link;
use crate::net::Net;
use crate::trust::TrustBook;

/// How long the Docker checks may take together.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(10);

/// Docker's engine version, and whether `image` is present (`None` when Docker is down).
pub async fn docker(image: &str) -> (Result<String, String>, Option<Result<bool, String>>) {
    let probe = async {
        let docker = crate::agent::sandbox::container::connect_docker()
            .await
            .map_err(|e| e.to_string())?;
        let version = crate::agent::sandbox::container::engine_version(&docker).await;
        let present = match docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(e.to_string()),
        };
        Ok::<_, String>((version, present))
    };
    match tokio::time::timeout(DOCKER_TIMEOUT, probe).await {
        Ok(Ok((version, present))) => (Ok(version), Some(present)),
        Ok(Err(e)) => (Err(e), None),
        Err(_) => (
            Err(format!("no answer within {} s", DOCKER_TIMEOUT.as_secs())),
            None,
        ),
    }
}

/// `(free, total)` bytes of the filesystem holding `path`.
pub fn disk(path: &Path) -> Result<(u64, u64), String> {
    crate::store::space::usage(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Where the API key comes from, or why there is none.
pub fn api_key(config: &Config) -> Result<String, String> {
    crate::agent::claude::ApiKey::from_env_or_file(
        config.api_key.clone(),
        config.agent.key_file.as_deref(),
    )
    .map(|_| match (&config.api_key, &config.agent.key_file) {
        (Some(_), _) => "ANTHROPIC_API_KEY".to_string(),
        (None, Some(f)) => f.display().to_string(),
        (None, None) => "unknown".to_string(),
    })
    .map_err(|e| e.to_string())
}

/// The checks that need no running node: Docker, the image, the API key, the disk.
pub async fn local(config: &Config, role: RoleView) -> Vec<Finding> {
    let (reached, present) = docker(&config.sandbox.image).await;
    let mut out = vec![
        checks::docker(reached, role),
        checks::sandbox_image(&config.sandbox.image, present, role),
        checks::api_key(api_key(config), role),
        checks::workspace_quota(
            config.sandbox.quota,
            crate::agent::sandbox::quota::capability(),
            config.sandbox.workspace_quota_mb,
            config.sandbox.workspaces_total_mb,
            role,
        ),
    ];
    let dir = config.data_dir.display().to_string();
    out.push(match disk(&config.data_dir) {
        Ok((free, total)) => checks::disk(&dir, free, total, config.storage.reserve_mb << 20),
        Err(e) => Finding::new(
            "disk",
            super::Severity::Error,
            format!("cannot read the free space of {dir}: {e}"),
            "check that the data dir exists and is readable",
        ),
    });
    out
}

/// What the CLI checks when no node runs for the data dir.
pub async fn offline(config: &Config) -> Vec<Finding> {
    let mut out = local(config, RoleView::Unknown).await;
    out.push(checks::node_down(&config.data_dir.display().to_string()));
    out
}

/// Every check, on the running node (its config, identity, trust book and network).
pub async fn running(
    config: &Config,
    identity: &SharedIdentity,
    trust: &TrustBook,
    net: &Net,
) -> Vec<Finding> {
    let me = identity.device_id();
    let state = trust.state();
    let role = match state.agent {
        Some(a) if a.device == me => RoleView::Here,
        Some(_) => RoleView::Elsewhere,
        None => RoleView::Nobody,
    };
    let mut out = local(config, role).await;
    out.push(checks::certificates(
        state.is_trusted(&me),
        state.is_revoked(&me),
        state.revoked.len(),
    ));
    let (relays, relayed_peers) = {
        let peers = net.peers.read().unwrap_or_else(|e| e.into_inner());
        let relays: Vec<Finding> = config
            .relays
            .iter()
            .map(|addr| {
                let peer = relay_peer(addr);
                let connected =
                    peer.is_some_and(|p| peers.map.get(&p).is_some_and(|e| !e.conns.is_empty()));
                let reserved = peer.is_some_and(|p| peers.reservations.contains_key(&p));
                checks::relay(&addr.to_string(), connected, reserved)
            })
            .collect();
        let relayed = peers
            .map
            .values()
            .filter(|e| e.link() == Link::Relayed)
            .count();
        (relays, relayed)
    };
    if relays.is_empty() {
        out.push(checks::no_relay());
    } else {
        out.extend(relays);
    }
    let m = crate::metrics::node();
    out.push(checks::hole_punching(
        m.hole_punches_ok.get(),
        m.hole_punches_failed.get(),
        relayed_peers,
    ));
    let newest = trust.certs().iter().map(|c| c.body().issued_at()).max();
    out.push(checks::clock(crate::time::now_secs(), newest));
    out
}

/// The relay's peer id: the last `/p2p/` of its address.
fn relay_peer(addr: &libp2p::Multiaddr) -> Option<PeerId> {
    addr.iter()
        .filter_map(|p| match p {
            Protocol::P2p(peer) => Some(peer),
            _ => None,
        })
        .last()
}
