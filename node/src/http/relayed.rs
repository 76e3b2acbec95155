//! Reach from anywhere: a node serving HTTPS registers its name with each relay it uses
//! (`/iom/web-name/1`, see [`crate::relay::web`]) and takes the TLS connections the relay
//! forwards for that name (`/iom/tls-forward/1`) into its own HTTPS listener. TLS ends here,
//! with this node's certificate.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use libp2p::PeerId;
use libp2p::multiaddr::Protocol;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::tls::RelayedSender;
use crate::node::NodeCtx;
use crate::relay::acme_http::ACME_HTTP_PROTOCOL;
use crate::relay::web::{REGISTER_EVERY, TLS_FORWARD_PROTOCOL, register_web_name};

/// Retry delay while a relay has not (yet) accepted the name.
const RETRY: Duration = Duration::from_secs(2);

/// The name a relay gave this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelayName {
    /// The relay.
    pub relay: String,
    /// `LABEL.DOMAIN`.
    pub host: String,
    /// `https://LABEL.DOMAIN[:PORT]/`.
    pub url: String,
}

/// The names relays gave this node (for `iom status` and invite URLs).
#[derive(Debug, Clone, Default)]
pub struct RelayNames {
    inner: Arc<RwLock<Vec<RelayName>>>,
}

impl RelayNames {
    /// All names, in the order of the configured relays.
    pub fn list(&self) -> Vec<RelayName> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first name's URL, if a relay named this node.
    pub fn url(&self) -> Option<String> {
        self.list().into_iter().next().map(|n| n.url)
    }

    fn set(&self, relay: PeerId, name: Option<RelayName>) {
        let mut list = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let key = relay.to_string();
        list.retain(|n| n.relay != key);
        if let Some(n) = name {
            list.push(n);
        }
    }
}

/// Where ACME clients put HTTP-01 challenge files (`--http.webroot` / `--webroot -w`).
pub fn webroot(ctx: &NodeCtx) -> std::path::PathBuf {
    ctx.config.data_dir.join(WEBROOT)
}

/// The webroot under the data dir.
pub const WEBROOT: &str = "tls/webroot";

/// Answers the relays' `/iom/acme-http/1` questions from the webroot.
fn serve_acme(ctx: &Arc<NodeCtx>, relays: &[PeerId], stop: CancellationToken) {
    let mut control = ctx.net.control();
    let mut incoming = match control.accept(ACME_HTTP_PROTOCOL) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!("cannot answer ACME challenges through the relay: {e}");
            return;
        }
    };
    let (allowed, root) = (relays.to_vec(), webroot(ctx));
    // Made here, so an ACME client can be pointed at it (`lego --http.webroot`) as it is.
    let challenges = root.join(".well-known/acme-challenge");
    if let Err(e) = std::fs::create_dir_all(&challenges) {
        tracing::warn!(dir = %challenges.display(), "cannot create the ACME webroot: {e}");
    }
    tokio::spawn(async move {
        loop {
            let (peer, stream) = tokio::select! {
                () = stop.cancelled() => return,
                next = incoming.next() => match next {
                    Some(s) => s,
                    None => return,
                },
            };
            if !allowed.contains(&peer) {
                continue;
            }
            let root = root.clone();
            tokio::spawn(async move {
                let answer = crate::relay::acme_http::answer_query(stream, &root);
                match tokio::time::timeout(Duration::from_secs(10), answer).await {
                    Ok(Ok(())) => tracing::info!(%peer, "answered an ACME challenge query"),
                    Ok(Err(e)) => tracing::debug!(%peer, "ACME challenge query failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "ACME challenge query timed out"),
                }
            });
        }
    });
}

/// The current retry delay, doubling the next one (up to [`REGISTER_EVERY`]).
fn backoff(retry: &mut Duration) -> Duration {
    let now = *retry;
    *retry = (*retry * 2).min(REGISTER_EVERY);
    now
}

/// The peer ids of the configured relays.
fn relay_peers(ctx: &NodeCtx) -> Vec<PeerId> {
    ctx.config
        .relays
        .iter()
        .filter_map(|a| {
            a.iter().find_map(|p| match p {
                Protocol::P2p(id) => Some(id),
                _ => None,
            })
        })
        .collect()
}

/// Takes forwarded TLS connections from the configured relays into `sender`, and keeps this
/// node's name registered with each of them, until `stop`.
pub fn start(ctx: &Arc<NodeCtx>, sender: RelayedSender, stop: CancellationToken) {
    let relays = relay_peers(ctx);
    if relays.is_empty() {
        return;
    }
    let mut control = ctx.net.control();
    let mut incoming = match control.accept(TLS_FORWARD_PROTOCOL) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!("cannot take relayed TLS connections: {e}");
            return;
        }
    };
    let allowed = relays.clone();
    let stop_accept = stop.clone();
    tokio::spawn(async move {
        loop {
            let (peer, stream) = tokio::select! {
                () = stop_accept.cancelled() => return,
                next = incoming.next() => match next {
                    Some(s) => s,
                    None => return,
                },
            };
            if !allowed.contains(&peer) {
                tracing::info!(%peer, "refused a TLS forward from a peer that is not our relay");
                continue;
            }
            if !sender.offer(stream) {
                tracing::info!(%peer, "too many relayed TLS handshakes waiting; dropped one");
            }
        }
    });
    serve_acme(ctx, &relays, stop.clone());
    for relay in relays {
        let (ctx, stop) = (ctx.clone(), stop.clone());
        tokio::spawn(async move {
            let mut control = ctx.net.control();
            let mut named = false;
            let mut retry = RETRY;
            loop {
                let wait = match register_web_name(&mut control, relay).await {
                    Ok(reply) if reply.ok => {
                        let (Some(host), Some(url)) = (reply.host, reply.url) else {
                            tracing::info!(%relay, "relay accepted the web name but sent none");
                            break;
                        };
                        if !named {
                            tracing::info!(%relay, %url, "reachable through the relay");
                            named = true;
                        }
                        let name = RelayName {
                            relay: relay.to_string(),
                            host,
                            url,
                        };
                        ctx.relay_names.set(relay, Some(name));
                        retry = RETRY;
                        REGISTER_EVERY
                    }
                    Ok(reply) => {
                        tracing::debug!(%relay, reason = %reply.reason, "relay refused the web name");
                        backoff(&mut retry)
                    }
                    Err(e) => {
                        tracing::debug!(%relay, error = %e, "cannot register the web name");
                        if named {
                            ctx.relay_names.set(relay, None);
                            named = false;
                        }
                        backoff(&mut retry)
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        });
    }
}
