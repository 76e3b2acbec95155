//! Mesh routes: invites, joining, devices and revocation.

use super::body::JsonBody;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use iom_protocol::cert::CertBody;
use iom_protocol::keys::DeviceId;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use crate::devices::{Devices, ResolveError, RevokeError};
use crate::node::NodeCtx;
use crate::pairing::PairError;

type Ctx = State<Arc<NodeCtx>>;

/// Routes for invites, joins and devices.
pub fn routes() -> axum::Router<Arc<NodeCtx>> {
    axum::Router::new()
        .route("/v1/invites", post(invite))
        .route("/v1/join", post(join))
        .route("/v1/devices", get(devices))
        .route("/v1/devices/{device}/revoke", post(revoke))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InviteBody {
    #[serde(default = "default_ttl")]
    ttl_secs: u64,
    #[serde(default)]
    admin: bool,
    /// Also make an `https://…/pair#SECRET` URL for a browser.
    #[serde(default)]
    web: bool,
    /// The URL's origin (`https://home.example:8443`); absent: this node's HTTPS listener.
    #[serde(default)]
    web_base: Option<String>,
}

impl Default for InviteBody {
    fn default() -> InviteBody {
        InviteBody {
            ttl_secs: default_ttl(),
            admin: false,
            web: false,
            web_base: None,
        }
    }
}

/// The origin a browser on the network reaches this node's HTTPS listener at: the listener's
/// address, with a wildcard bind replaced by a LAN address of the node.
async fn web_origin(ctx: &NodeCtx) -> Option<String> {
    let https = ctx.web.get()?.https.clone()?;
    let addr: std::net::SocketAddr = https
        .strip_prefix("https://")?
        .trim_end_matches('/')
        .parse()
        .ok()?;
    let port = addr.port();
    let host = if addr.ip().is_unspecified() {
        ctx.net
            .listen_addrs()
            .await
            .iter()
            .find_map(|a| match a.iter().next() {
                Some(libp2p::multiaddr::Protocol::Ip4(ip))
                    if !ip.is_loopback() && !ip.is_unspecified() =>
                {
                    Some(ip.to_string())
                }
                _ => None,
            })
            .unwrap_or_else(|| "127.0.0.1".into())
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    Some(format!("https://{host}:{port}"))
}

fn default_ttl() -> u64 {
    15 * 60
}

impl From<PairError> for ApiError {
    fn from(e: PairError) -> ApiError {
        match &e {
            PairError::NotAdmin => ApiError::forbidden(e.to_string()),
            PairError::Invite(_) => ApiError::bad_request(e.to_string()),
            PairError::Rejected(r) => ApiError {
                status: axum::http::StatusCode::FORBIDDEN,
                code: match r {
                    iom_protocol::pair::JoinRejection::UnknownInvite => "unknown_invite",
                    iom_protocol::pair::JoinRejection::AlreadyUsed => "invite_used",
                    iom_protocol::pair::JoinRejection::Expired => "invite_expired",
                    iom_protocol::pair::JoinRejection::BadProof => "bad_proof",
                    iom_protocol::pair::JoinRejection::WrongPerson => "wrong_person",
                    iom_protocol::pair::JoinRejection::RateLimited => "rate_limited",
                    iom_protocol::pair::JoinRejection::NotAdmin => "not_admin",
                },
                message: e.to_string(),
            },
            PairError::OtherPerson { .. } => ApiError {
                status: axum::http::StatusCode::CONFLICT,
                code: "wrong_person",
                message: e.to_string(),
            },
            PairError::AlreadyMember => ApiError::conflict(e.to_string()),
            PairError::Net(_) => ApiError::unavailable(e.to_string()),
            _ => ApiError::internal(e.to_string()),
        }
    }
}

async fn invite(
    State(ctx): Ctx,
    body: Option<JsonBody<InviteBody>>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map(|JsonBody(b)| b).unwrap_or_default();
    if body.ttl_secs == 0 || body.ttl_secs > 7 * 24 * 3600 {
        return Err(ApiError::bad_request(
            "ttl must be between 1 second and 7 days",
        ));
    }
    let inv = ctx
        .pairing
        .create_invite(Duration::from_secs(body.ttl_secs), body.admin)
        .await?;
    let code = inv
        .encode()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut lan_url = None;
    let url = if body.web {
        use base64::Engine;
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(inv.secret);
        let base = match body.web_base {
            Some(b) if b.starts_with("https://") => b.trim_end_matches('/').to_string(),
            Some(b) => {
                return Err(ApiError::bad_request(format!(
                    "{b:?}: the invite URL's base must start with https://"
                )));
            }
            // Through the relay when one named this node: reachable from anywhere.
            None => match ctx.relay_names.url() {
                Some(relay) => {
                    lan_url = web_origin(&ctx)
                        .await
                        .map(|lan| format!("{lan}/pair#{secret}"));
                    relay.trim_end_matches('/').to_string()
                }
                None => web_origin(&ctx).await.ok_or_else(|| {
                    ApiError::bad_request(
                        "a web invite needs the HTTPS listener (`iom node run --https IP:PORT`) or \
                         a base URL (`iom invite --web --url https://NAME`)",
                    )
                })?,
            },
        };
        Some(format!("{base}/pair#{secret}"))
    } else {
        None
    };
    Ok(Json(json!({
        "code": code,
        "url": url,
        "lan_url": lan_url,
        "expires": inv.expires_at,
        "expires_at": inv.expires_at,
        "admin": inv.admin,
        "inviter": inv.inviter.to_string(),
        "addrs": inv.addrs,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    code: String,
    #[serde(default)]
    name: Option<String>,
}

async fn join(
    State(ctx): Ctx,
    JsonBody(body): JsonBody<JoinBody>,
) -> Result<Json<Value>, ApiError> {
    let inviter = ctx.pairing.join(body.code.trim(), body.name).await?;
    Ok(Json(json!({
        "joined": true,
        "person": ctx.trust.person().to_string(),
        "inviter": inviter.to_string(),
        "devices": ctx.trust.state().devices.len(),
    })))
}

/// The device list as JSON.
pub fn devices_json(ctx: &NodeCtx) -> Value {
    let state = ctx.trust.state();
    let me = ctx.identity().device.id();
    let peers = ctx.net.peers.read().unwrap_or_else(|e| e.into_inner());
    let certs = ctx.trust.certs();
    let kind_of = |id: &DeviceId| {
        certs
            .iter()
            .find_map(|c| match c.body() {
                CertBody::Device {
                    device,
                    kind: Some(k),
                    ..
                } if device == id => Some(k.as_str()),
                _ => None,
            })
            .unwrap_or("node")
    };
    let mut rows: Vec<Value> = Vec::new();
    let mut push = |id: &DeviceId, name: &str, admin: bool, revoked: bool| {
        let peer = id.to_peer_id();
        let entry = peers.map.get(&peer);
        let link = if *id == me {
            "self".to_string()
        } else {
            entry
                .map(|e| e.link())
                .unwrap_or(crate::net::Link::Offline)
                .to_string()
        };
        rows.push(json!({
            "device": id.to_string(),
            "name": name,
            "kind": kind_of(id),
            "admin": admin,
            "revoked": revoked,
            "this_device": *id == me,
            "agent": state.agent.is_some_and(|a| a.device == *id),
            "connection": link,
            "last_seen": entry.map(|e| e.last_seen).filter(|s| *s > 0),
            "rtt_ms": entry.and_then(|e| e.rtt_ms),
        }));
    };
    for (id, d) in &state.devices {
        push(id, &d.name, d.admin, false);
    }
    for id in &state.revoked {
        let name = certs
            .iter()
            .find_map(|c| match c.body() {
                CertBody::Device { device, name, .. } if device == id => Some(name.clone()),
                _ => None,
            })
            .unwrap_or_default();
        push(id, &name, false, true);
    }
    json!({ "devices": rows })
}

async fn devices(State(ctx): Ctx) -> Json<Value> {
    Json(devices_json(&ctx))
}

/// Finds a device by id, or by a unique name or id prefix.
pub fn resolve_device(ctx: &NodeCtx, text: &str) -> Result<DeviceId, ApiError> {
    crate::devices::resolve(&ctx.trust.state(), text).map_err(|e| match e {
        ResolveError::NotFound(_) => ApiError::not_found(e.to_string()),
        ResolveError::Ambiguous { .. } => ApiError::bad_request(e.to_string()),
    })
}

impl From<RevokeError> for ApiError {
    fn from(e: RevokeError) -> ApiError {
        match &e {
            RevokeError::NotAdmin => ApiError::forbidden(e.to_string()),
            RevokeError::Itself => ApiError::bad_request(e.to_string()),
            RevokeError::Sign(_) => ApiError::internal(e.to_string()),
            RevokeError::Store(_) => ApiError::storage(e.to_string()),
        }
    }
}

async fn revoke(State(ctx): Ctx, Path(device): Path<String>) -> Result<Json<Value>, ApiError> {
    let target = resolve_device(&ctx, &device)?;
    let done = Devices::new(ctx.identity.clone(), ctx.trust.clone())
        .revoke(target, crate::time::now_secs())
        .await?;
    if done.already {
        return Ok(Json(
            json!({ "device": target.to_string(), "revoked": true, "already": true }),
        ));
    }
    Ok(Json(json!({
        "device": target.to_string(),
        "revoked": true,
        "also_untrusted": done.also_untrusted.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })))
}
