//! Browser devices: pairing a browser with an invite URL, and sessions signed with its key.
//!
//! A browser holds its own Ed25519 key (WebCrypto, non-extractable, in IndexedDB); its public
//! key is its device id, like any device's.
//!
//! - `POST /v1/pair/browser`: the browser sends the invite's id, its public key, the pairing
//!   proof `HMAC(secret, "iom-pair-v1" || inviter || browser)` (the secret, from the URL's
//!   fragment, never travels) and an Ed25519 signature over
//!   `"iom-browser-pair-v1" || invite id || proof` (it holds the key it names). The node checks
//!   the invite as `/iom/pair/1` does, marks it used and certifies the browser as a
//!   [`DeviceKind::Browser`](iom_protocol::cert::DeviceKind) device.
//! - `GET /v1/session/challenge`, then `POST /v1/session` with a signature over
//!   `"iom-session-v1" || challenge`: a challenge is good once and for
//!   [`CHALLENGE_TTL`]; the answer sets a `Secure; HttpOnly; SameSite=Strict` cookie for a
//!   session bound to the device. Every request with the cookie checks that the device is still
//!   trusted, so a revocation (made here or arriving by sync) cuts its sessions at once.
//!
//! Sessions live in memory: after a restart the page signs a new challenge by itself.
//! Failed attempts (pairing or sessions) are limited to [`MAX_FAILURES_PER_MINUTE`] per node.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use iom_protocol::id::ContentId;
use iom_protocol::keys::DeviceId;
use iom_protocol::pair::JoinRejection;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::ApiError;
use crate::api::body::JsonBody;
use crate::node::NodeCtx;

/// The session cookie's name.
pub const COOKIE: &str = "iom_session";
/// How long a challenge may be answered.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// How long a session lasts without a new signature.
pub const SESSION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Outstanding challenges kept at most (the oldest go first).
pub const MAX_CHALLENGES: usize = 1024;
/// Sessions kept at most (the oldest go first).
pub const MAX_SESSIONS: usize = 4096;
/// Failed pairing or session attempts per minute, for the whole node.
pub const MAX_FAILURES_PER_MINUTE: usize = 30;

const PAIR_TAG: &[u8] = b"iom-browser-pair-v1";
const SESSION_TAG: &[u8] = b"iom-session-v1";

/// Challenges, sessions and the failure counter of one node.
#[derive(Debug, Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Challenge bytes → when issued.
    challenges: HashMap<[u8; 32], Instant>,
    /// SHA-256 of a session cookie → (device, created).
    sessions: HashMap<[u8; 32], (DeviceId, Instant)>,
    failures: VecDeque<Instant>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new challenge.
    pub fn challenge(&self, now: Instant) -> [u8; 32] {
        let c = crate::time::random_bytes::<32>();
        let mut g = self.lock();
        g.challenges
            .retain(|_, t| now.duration_since(*t) < CHALLENGE_TTL);
        if g.challenges.len() >= MAX_CHALLENGES
            && let Some(oldest) = g
                .challenges
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| *k)
        {
            g.challenges.remove(&oldest);
        }
        g.challenges.insert(c, now);
        c
    }

    /// Takes a challenge: true once, if it was issued and is fresh.
    pub fn take_challenge(&self, c: &[u8; 32], now: Instant) -> bool {
        self.lock()
            .challenges
            .remove(c)
            .is_some_and(|t| now.duration_since(t) < CHALLENGE_TTL)
    }

    /// A new session for `device`; returns the cookie value.
    pub fn open(&self, device: DeviceId, now: Instant) -> String {
        let secret = B64.encode(crate::time::random_bytes::<32>());
        let mut g = self.lock();
        g.sessions
            .retain(|_, (_, t)| now.duration_since(*t) < SESSION_TTL);
        if g.sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = g
                .sessions
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k)
        {
            g.sessions.remove(&oldest);
        }
        g.sessions.insert(hash(&secret), (device, now));
        secret
    }

    /// The device of a live session.
    pub fn device(&self, cookie: &str, now: Instant) -> Option<DeviceId> {
        let g = self.lock();
        g.sessions
            .get(&hash(cookie))
            .filter(|(_, t)| now.duration_since(*t) < SESSION_TTL)
            .map(|(d, _)| *d)
    }

    /// Ends a session.
    pub fn close(&self, cookie: &str) {
        self.lock().sessions.remove(&hash(cookie));
    }

    /// Counts a failure; true when the limit is already reached (refuse without looking).
    fn limited(&self, now: Instant) -> bool {
        let mut g = self.lock();
        while g
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            g.failures.pop_front();
        }
        g.failures.len() >= MAX_FAILURES_PER_MINUTE
    }

    fn fail(&self, now: Instant) {
        self.lock().failures.push_back(now);
    }
}

fn hash(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

/// The message a browser signs to pair.
pub fn pair_message(invite: &ContentId, proof: &[u8; 32]) -> Vec<u8> {
    [PAIR_TAG, invite.as_bytes(), proof].concat()
}

/// The message a browser signs to open a session.
pub fn session_message(challenge: &[u8; 32]) -> Vec<u8> {
    [SESSION_TAG, challenge].concat()
}

/// The session cookie of a request, if any.
pub fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == COOKIE && !v.is_empty()).then(|| v.to_string())
        })
}

/// The trusted browser device behind a request's session cookie.
pub fn session_device(ctx: &NodeCtx, headers: &HeaderMap) -> Option<DeviceId> {
    let device = ctx.sessions.device(&cookie(headers)?, Instant::now())?;
    ctx.trust.state().is_trusted(&device).then_some(device)
}

/// The routes that need no token: pairing a browser and opening a session.
pub fn routes(ctx: Arc<NodeCtx>) -> axum::Router {
    axum::Router::new()
        .route("/v1/pair/info", get(info))
        .route("/v1/pair/browser", post(pair))
        .route("/v1/session/challenge", get(challenge))
        .route("/v1/session", post(open).delete(close))
        .with_state(ctx)
}

type Ctx = State<Arc<NodeCtx>>;

async fn info(State(ctx): Ctx) -> Json<Value> {
    let me = ctx.identity.device_id();
    Json(json!({
        "inviter": B64.encode(me.as_bytes()),
        "device": me.to_string(),
        "name": ctx.config.name,
    }))
}

fn bytes<const N: usize>(field: &str, text: &str) -> Result<[u8; N], ApiError> {
    B64.decode(text.trim())
        .ok()
        .and_then(|v| <[u8; N]>::try_from(v).ok())
        .ok_or_else(|| ApiError::bad_request(format!("`{field}` is not {N} bytes in base64url")))
}

fn device_key(text: &str) -> Result<DeviceId, ApiError> {
    DeviceId::from_bytes(bytes::<32>("key", text)?)
        .map_err(|_| ApiError::bad_request("`key` is not an Ed25519 public key"))
}

fn signed(key: &DeviceId, msg: &[u8], sig: &str) -> Result<bool, ApiError> {
    let sig = bytes::<64>("signature", sig)?;
    Ok(iom_protocol::keys::verify(key.as_bytes(), msg, &sig).is_ok())
}

fn refused(status: StatusCode, code: &'static str, message: &str) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
    }
}

fn rate_limited() -> ApiError {
    refused(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many failed attempts; wait a minute",
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairBody {
    /// The invite's id, 64 hex digits.
    invite: String,
    /// The browser's Ed25519 public key, base64url.
    key: String,
    /// A name for the device.
    name: String,
    /// The pairing proof, base64url.
    proof: String,
    /// Signature over [`pair_message`], base64url.
    signature: String,
}

async fn pair(State(ctx): Ctx, JsonBody(b): JsonBody<PairBody>) -> Result<Json<Value>, ApiError> {
    let now = Instant::now();
    if ctx.sessions.limited(now) {
        return Err(rate_limited());
    }
    let result = pair_checked(&ctx, &b).await;
    if result.is_err() {
        ctx.sessions.fail(now);
    }
    result
}

async fn pair_checked(ctx: &NodeCtx, b: &PairBody) -> Result<Json<Value>, ApiError> {
    let invite: ContentId = b
        .invite
        .trim()
        .parse()
        .map_err(|_| ApiError::bad_request("`invite` is not 64 hex digits"))?;
    let key = device_key(&b.key)?;
    let proof = bytes::<32>("proof", &b.proof)?;
    let name = b.name.trim();
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "a device name is 1 to 64 printable characters",
        ));
    }
    if !signed(&key, &pair_message(&invite, &proof), &b.signature)? {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "bad_signature",
            "the signature does not match the key",
        ));
    }
    match ctx.pairing.admit_browser(&invite, key, &proof, name).await {
        Ok(_) => Ok(Json(json!({
            "device": key.to_string(),
            "name": name,
            "kind": "browser",
            "person": ctx.trust.person().to_string(),
        }))),
        Err(r) => {
            let code = match r {
                JoinRejection::UnknownInvite => "unknown_invite",
                JoinRejection::AlreadyUsed => "invite_used",
                JoinRejection::Expired => "invite_expired",
                JoinRejection::BadProof => "bad_proof",
                JoinRejection::WrongPerson => "wrong_person",
                JoinRejection::RateLimited => "rate_limited",
                JoinRejection::NotAdmin => "not_admin",
            };
            Err(refused(StatusCode::FORBIDDEN, code, &r.to_string()))
        }
    }
}

async fn challenge(State(ctx): Ctx) -> Json<Value> {
    let c = ctx.sessions.challenge(Instant::now());
    Json(json!({ "challenge": B64.encode(c), "expires_in_secs": CHALLENGE_TTL.as_secs() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenBody {
    /// The device's public key, base64url.
    key: String,
    /// The challenge, as received.
    challenge: String,
    /// Signature over [`session_message`], base64url.
    signature: String,
}

async fn open(State(ctx): Ctx, JsonBody(b): JsonBody<OpenBody>) -> Result<Response, ApiError> {
    let now = Instant::now();
    if ctx.sessions.limited(now) {
        return Err(rate_limited());
    }
    let result = open_checked(&ctx, &b, now);
    if result.is_err() {
        ctx.sessions.fail(now);
    }
    result
}

fn open_checked(ctx: &NodeCtx, b: &OpenBody, now: Instant) -> Result<Response, ApiError> {
    let key = device_key(&b.key)?;
    let challenge = bytes::<32>("challenge", &b.challenge)?;
    let good = signed(&key, &session_message(&challenge), &b.signature)?;
    // The challenge is spent by any answer, good or bad: a replay finds it gone.
    if !ctx.sessions.take_challenge(&challenge, now) {
        return Err(refused(
            StatusCode::UNAUTHORIZED,
            "bad_challenge",
            "unknown, used or expired challenge; ask for a new one",
        ));
    }
    if !good {
        return Err(refused(
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            "the signature does not match the key",
        ));
    }
    let state = ctx.trust.state();
    let Some(device) = state.devices.get(&key) else {
        return Err(refused(
            StatusCode::UNAUTHORIZED,
            "unknown_device",
            "this key is not a device of the mesh (or it was revoked); pair again with a new invite",
        ));
    };
    let cookie = ctx.sessions.open(key, now);
    let mut r = Json(json!({ "device": key.to_string(), "name": device.name })).into_response();
    let value = format!(
        "{COOKIE}={cookie}; Path=/; Max-Age={}; Secure; HttpOnly; SameSite=Strict",
        SESSION_TTL.as_secs()
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

async fn close(State(ctx): Ctx, headers: HeaderMap) -> Response {
    if let Some(c) = cookie(&headers) {
        ctx.sessions.close(&c);
    }
    let mut r = Json(json!({ "closed": true })).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "iom_session=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict",
        ),
    );
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_challenge_is_good_once_and_only_while_fresh() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let c = s.challenge(t0);
        assert!(s.take_challenge(&c, t0));
        assert!(!s.take_challenge(&c, t0), "replayed");
        let c = s.challenge(t0);
        assert!(!s.take_challenge(&c, t0 + CHALLENGE_TTL), "expired");
        assert!(!s.take_challenge(&[0; 32], t0), "never issued");
    }

    #[test]
    fn sessions_and_challenges_are_bounded() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let first = s.challenge(t0);
        for i in 0..MAX_CHALLENGES {
            s.challenge(t0 + Duration::from_millis(1 + i as u64));
        }
        assert!(!s.take_challenge(&first, t0), "the oldest went first");
        let d = iom_protocol::keys::DeviceKey::from_seed([3; 32]).id();
        let c = s.open(d, t0);
        assert_eq!(s.device(&c, t0), Some(d));
        assert_eq!(s.device(&c, t0 + SESSION_TTL), None, "expired");
        assert_eq!(s.device("nope", t0), None);
        s.close(&c);
        assert_eq!(s.device(&c, t0), None);
    }

    #[test]
    fn failures_are_limited_per_minute() {
        let s = Sessions::default();
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES_PER_MINUTE {
            assert!(!s.limited(t0));
            s.fail(t0);
        }
        assert!(s.limited(t0));
        assert!(!s.limited(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; iom_session=xyz; b=2"),
        );
        assert_eq!(cookie(&h).as_deref(), Some("xyz"));
        h.insert(header::COOKIE, HeaderValue::from_static("iom_session="));
        assert_eq!(cookie(&h), None);
    }
}
