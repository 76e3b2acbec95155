//! The egress proxy of one MCP server: an HTTP/1.1 forward proxy that enforces the server's
//! allowlist and adds its secret headers.
//!
//! - `CONNECT host:port` to an allowed host opens a tunnel (TLS, typically): bytes pass both
//!   ways untouched. The proxy cannot see or change what is inside, so it cannot add a header
//!   to an HTTPS request.
//! - An absolute `http://` request to an allowed host is forwarded (one request per upstream
//!   connection), without hop-by-hop and `Proxy-*` headers, with `Host` set from the URL and
//!   the server's secret headers for that host filled in on the agent node (they replace any
//!   header of the same name the server sent, such as a placeholder).
//! - Anything else is refused: `403` for a host or port not in the allowlist, `400` for a
//!   request that is not proxy-shaped, `502` when the host cannot be reached or a secret is
//!   missing. Every refusal is a log line (`iom::egress`, warn).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Policy;
use super::allow::{Refusal, Target, target_of};

/// Most connections open at once per server.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest wait for an upstream connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a client's request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

type Body = BoxBody<Bytes, hyper::Error>;

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1), and the
/// proxy's own.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Checks a request against the policy: the target, or why it is refused.
pub fn check(policy: &Policy, method: &Method, uri: &Uri) -> Result<Target, Refusal> {
    let target = target_of(method, uri)?;
    if policy.allow.permits(&target) {
        return Ok(target);
    }
    let allowed = if policy.allow.0.is_empty() {
        "nothing".to_string()
    } else {
        policy.allow.to_string()
    };
    Err(Refusal {
        status: StatusCode::FORBIDDEN,
        message: format!(
            "{} is not in the egress allowlist of MCP server {} (it allows {allowed}); an admin \
             can add it with `iom tools add {} --allow-host {} --replace -- ...`",
            target.authority(),
            policy.server,
            policy.server,
            target.authority()
        ),
    })
}

/// Removes hop-by-hop headers, also those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    for n in named {
        if let Ok(name) = HeaderName::from_bytes(n.as_bytes()) {
            headers.remove(name);
        }
    }
    for n in HOP_BY_HOP {
        headers.remove(*n);
    }
}

/// The headers of a forwarded request: hop-by-hop ones gone, `Host` from the target, and the
/// policy's secret headers for the target filled in.
pub fn upstream_headers(
    policy: &Policy,
    target: &Target,
    mut headers: HeaderMap,
) -> Result<HeaderMap, Refusal> {
    strip_hop_by_hop(&mut headers);
    let host = if target.port == 80 {
        target.authority().trim_end_matches(":80").to_string()
    } else {
        target.authority()
    };
    let host = HeaderValue::from_str(&host).map_err(|_| Refusal {
        status: StatusCode::BAD_REQUEST,
        message: format!("{host:?} cannot be a Host header"),
    })?;
    headers.insert(header::HOST, host);
    for inj in policy
        .headers
        .iter()
        .filter(|i| i.rule.matches(&target.host, target.port))
    {
        let missing = |why: String| Refusal {
            status: StatusCode::BAD_GATEWAY,
            message: format!(
                "the {} header for {} cannot be added: {why}",
                inj.name,
                target.authority()
            ),
        };
        let value = inj.value.render().map_err(missing)?;
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| missing("the secret is not a valid header value".into()))?;
        value.set_sensitive(true);
        headers.insert(inj.name.clone(), value);
    }
    Ok(headers)
}

/// Serves the proxy on `listener` until `stop`.
pub async fn serve(listener: TcpListener, policy: Arc<Policy>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let sock = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!(target: "iom::egress", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(target: "iom::egress", server = %policy.server,
                "egress refused: more than {MAX_CONNECTIONS} connections at once");
            continue;
        };
        let (policy, stop) = (policy.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let p = policy.clone();
            let s = stop.clone();
            let svc = hyper::service::service_fn(move |req| {
                let (p, s) = (p.clone(), s.clone());
                async move { Ok::<_, Infallible>(handle(req, p, s).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(sock), svc)
                .with_upgrades();
            tokio::select! {
                () = stop.cancelled() => {}
                r = conn => if let Err(e) = r {
                    tracing::debug!(target: "iom::egress", server = %policy.server, error = %e,
                        "egress connection ended with an error");
                },
            }
        });
    }
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("iom egress proxy: {message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert("x-iom-egress", HeaderValue::from_static("refused"));
    r
}

fn refuse(policy: &Policy, method: &Method, uri: &Uri, r: Refusal) -> Response<Body> {
    tracing::warn!(target: "iom::egress", server = %policy.server, %method, url = %uri,
        status = r.status.as_u16(), "egress refused: {}", r.message);
    text(r.status, &r.message)
}

async fn connect(target: &Target) -> Result<TcpStream, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target.authority())).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("cannot reach {}: {e}", target.authority())),
        Err(_) => Err(format!(
            "{} did not answer within {CONNECT_TIMEOUT:?}",
            target.authority()
        )),
    }
}

async fn handle(
    req: Request<Incoming>,
    policy: Arc<Policy>,
    stop: CancellationToken,
) -> Response<Body> {
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let target = match check(&policy, &method, &uri) {
        Ok(t) => t,
        Err(r) => return refuse(&policy, &method, &uri, r),
    };
    if target.tunnel {
        let upstream = match connect(&target).await {
            Ok(s) => s,
            Err(message) => {
                let r = Refusal {
                    status: StatusCode::BAD_GATEWAY,
                    message,
                };
                return refuse(&policy, &method, &uri, r);
            }
        };
        if policy
            .headers
            .iter()
            .any(|i| i.rule.matches(&target.host, target.port))
        {
            tracing::info!(target: "iom::egress", server = %policy.server, host = %target.authority(),
                "a CONNECT tunnel is opaque: the secret headers for this host are not added (see docs/mcp.md)");
        }
        tracing::info!(target: "iom::egress", server = %policy.server, host = %target.authority(), "egress tunnel opened");
        let server = policy.server.clone();
        tokio::spawn(async move {
            let mut upstream = upstream;
            match hyper::upgrade::on(req).await {
                Ok(up) => {
                    let mut up = TokioIo::new(up);
                    tokio::select! {
                        () = stop.cancelled() => {}
                        r = tokio::io::copy_bidirectional(&mut up, &mut upstream) => {
                            if let Err(e) = r {
                                tracing::debug!(target: "iom::egress", %server, error = %e, "tunnel ended");
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(target: "iom::egress", %server, error = %e, "the client did not take the tunnel");
                }
            }
        });
        return Response::new(
            http_body_util::Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        );
    }
    match forward(req, &target, &policy).await {
        Ok(r) => {
            tracing::info!(target: "iom::egress", server = %policy.server, %method,
                host = %target.authority(), status = r.status().as_u16(), "egress request");
            r
        }
        Err(r) => refuse(&policy, &method, &uri, r),
    }
}

async fn forward(
    req: Request<Incoming>,
    target: &Target,
    policy: &Policy,
) -> Result<Response<Body>, Refusal> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    parts.uri = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = hyper::Version::HTTP_11;
    // Secrets first: a request whose secret is missing never reaches the host.
    parts.headers = upstream_headers(policy, target, std::mem::take(&mut parts.headers))?;
    let upstream = connect(target).await.map_err(|message| Refusal {
        status: StatusCode::BAD_GATEWAY,
        message,
    })?;
    let gateway = |e: hyper::Error| Refusal {
        status: StatusCode::BAD_GATEWAY,
        message: format!("{}: {e}", target.authority()),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(upstream))
        .await
        .map_err(gateway)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(gateway)?;
    let (mut rp, rb) = resp.into_parts();
    strip_hop_by_hop(&mut rp.headers);
    Ok(Response::from_parts(rp, rb.boxed()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
