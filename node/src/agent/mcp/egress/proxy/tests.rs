//! The proxy over real loopback sockets: an upstream HTTP server that records what reaches
//! it, the proxy on an ephemeral port, and raw clients.

use std::sync::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::agent::mcp::spec::{SecretHeader, ServerSpec};

/// An upstream that records each request head and answers `200 ok from upstream`.
struct Upstream {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

async fn upstream() -> Upstream {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                s.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf).into_owned());
                let body = "ok from upstream";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\nKeep-Alive: x\r\n\r\n{body}",
                    body.len()
                );
                let _ = c.write_all(resp.as_bytes()).await;
                let _ = c.shutdown().await;
            });
        }
    });
    Upstream { port, seen }
}

struct Proxy {
    addr: std::net::SocketAddr,
    _stop: tokio_util::sync::DropGuard,
}

async fn proxy(policy: Policy) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(serve(l, Arc::new(policy), stop.clone()));
    Proxy {
        addr,
        _stop: stop.drop_guard(),
    }
}

async fn exchange(addr: std::net::SocketAddr, raw: &str) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(raw.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
        .await
        .expect("the proxy answers and closes")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// A proxy for server `fetch` that allows `allowed` and adds `header: value` to it.
async fn proxy_for(allowed: &str, header: &str, value: String) -> Proxy {
    let spec = ServerSpec {
        name: "fetch".into(),
        command: vec!["x".into()],
        image: None,
        enabled: true,
        env: Default::default(),
        mounts: Vec::new(),
        timeout_secs: None,
        allow_hosts: vec![allowed.to_string()],
        secret_headers: vec![SecretHeader {
            host: allowed.to_string(),
            header: header.into(),
            value,
        }],
        secret_env: Default::default(),
    };
    proxy(Policy::from_spec(&spec).unwrap()).await
}

fn secret_file(dir: &tempfile::TempDir, value: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.path().join("token");
    std::fs::write(&p, value).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.display().to_string()
}

#[tokio::test]
async fn allowed_http_is_forwarded_with_the_secret_and_the_rest_is_refused() {
    let good = upstream().await;
    let other = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(&dir, "s3cret-egress-token\n");
    let allowed = format!("127.0.0.1:{}", good.port);
    let p = proxy_for(&allowed, "Authorization", format!("Bearer {{file:{file}}}")).await;

    // Allowed: forwarded in origin form, Host from the URL, the secret replaces the
    // placeholder the client sent, proxy headers gone.
    let r = exchange(
        p.addr,
        &format!(
            "GET http://{allowed}/x?y=1 HTTP/1.1\r\nHost: evil.example\r\nAuthorization: \
             Bearer placeholder\r\nProxy-Authorization: Basic abc\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("ok from upstream"), "{r}");
    assert!(!r.to_ascii_lowercase().contains("keep-alive: x"), "{r}");
    let seen = good.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let head = seen[0].to_ascii_lowercase();
    assert!(head.starts_with("get /x?y=1 http/1.1\r\n"), "{head}");
    assert!(head.contains(&format!("host: {allowed}\r\n")), "{head}");
    assert!(
        seen[0].contains("authorization: Bearer s3cret-egress-token\r\n")
            || seen[0].contains("Authorization: Bearer s3cret-egress-token\r\n"),
        "{head}"
    );
    assert!(
        !head.contains("placeholder") && !head.contains("proxy-authorization"),
        "{head}"
    );

    // Another port of the same address, another host: 403, nothing reaches them.
    for target in [
        format!("http://127.0.0.1:{}/", other.port),
        "http://localhost:80/".to_string(),
    ] {
        let r = exchange(
            p.addr,
            &format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 403"), "{target}: {r}");
        assert!(
            r.contains("not in the egress allowlist of MCP server fetch"),
            "{r}"
        );
        assert!(r.contains(&format!("it allows {allowed}")), "{r}");
    }
    let r = exchange(
        p.addr,
        &format!(
            "CONNECT 127.0.0.1:{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            other.port
        ),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(other.seen.lock().unwrap().is_empty());

    // Not proxy-shaped: 400 with a reason; garbage: 400 from the parser. Never a panic.
    let r = exchange(
        p.addr,
        "GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("absolute URLs"),
        "{r}"
    );
    let r = exchange(
        p.addr,
        "GET https://example.com/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("CONNECT"),
        "{r}"
    );
    let r = exchange(p.addr, "hello, I am not HTTP\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r:?}");
    assert_eq!(good.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn connect_tunnels_to_an_allowed_host_untouched() {
    let good = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(&dir, "never-in-a-tunnel");
    let allowed = format!("127.0.0.1:{}", good.port);
    let p = proxy_for(&allowed, "X-Api-Key", format!("{{file:{file}}}")).await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(format!("CONNECT {allowed} HTTP/1.1\r\nHost: {allowed}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n == 1,
            "the proxy closed: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Inside the tunnel the bytes are the client's: no header is added.
    c.write_all(b"GET /inner HTTP/1.1\r\nHost: inner\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&out).ends_with("ok from upstream"));
    let seen = good.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec!["GET /inner HTTP/1.1\r\nHost: inner\r\n\r\n".to_string()]
    );
}

#[tokio::test]
async fn a_missing_secret_is_a_502_that_does_not_reach_upstream() {
    let good = upstream().await;
    let allowed = format!("127.0.0.1:{}", good.port);
    let p = proxy_for(
        &allowed,
        "Authorization",
        "Bearer {file:/nonexistent/iom-egress-test}".to_string(),
    )
    .await;
    let r = exchange(
        p.addr,
        &format!("GET http://{allowed}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    assert!(
        r.contains("cannot open /nonexistent/iom-egress-test"),
        "{r}"
    );
    assert!(good.seen.lock().unwrap().is_empty());
}

#[test]
fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("close, X-Secret-Hop"),
    );
    h.insert("x-secret-hop", HeaderValue::from_static("1"));
    h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
    h.insert("accept", HeaderValue::from_static("*/*"));
    strip_hop_by_hop(&mut h);
    let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    assert_eq!(names, vec!["accept"]);
}
