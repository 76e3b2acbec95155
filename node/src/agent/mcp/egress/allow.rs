//! The egress allowlist and the proxy's view of a request target, as pure functions.
//!
//! A rule is `HOST[:PORT]` (what `iom tools add --allow-host` takes): a DNS name, `*.SUFFIX`
//! (any name below `SUFFIX`, not `SUFFIX` itself), an IPv4 address or a bracketed IPv6 one.
//! Without a port a rule allows 80 and 443. Names compare case-insensitively, without a
//! trailing dot. [`target_of`] turns what a client sent to the proxy (a `CONNECT host:port`,
//! or an absolute `http://` URL) into a [`Target`], or a [`Refusal`] that says what is wrong.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use hyper::{Method, StatusCode, Uri};

/// Ports a rule without a port allows.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];
/// Longest host name accepted.
const MAX_HOST: usize = 253;

/// One `HOST[:PORT]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    /// Lowercase name without a trailing dot, an IP address (IPv6 without brackets), or
    /// `*.suffix`.
    host: String,
    /// `None`: [`DEFAULT_PORTS`].
    port: Option<u16>,
}

impl HostRule {
    /// Parses `HOST[:PORT]`.
    pub fn parse(text: &str) -> Result<HostRule, String> {
        let t = text.trim();
        if t.contains("://") || t.contains('/') {
            return Err(format!(
                "{text:?}: give a host (HOST or HOST:PORT), not a URL or a path"
            ));
        }
        let (host, port) = split_host_port(t).map_err(|why| format!("{text:?}: {why}"))?;
        let (wild, bare) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host.as_str()),
        };
        let host = normalize_host(bare).map_err(|why| format!("{text:?}: {why}"))?;
        if wild && (host.parse::<Ipv4Addr>().is_ok() || host.contains(':')) {
            return Err(format!("{text:?}: a wildcard needs a name, not an address"));
        }
        if wild && !host.contains('.') {
            return Err(format!(
                "{text:?}: a wildcard must name a domain with a dot (*.example.com)"
            ));
        }
        let host = if wild { format!("*.{host}") } else { host };
        Ok(HostRule { host, port })
    }

    /// Whether this rule allows `host` (normalized, see [`normalize_host`]) on `port`.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let port_ok = match self.port {
            Some(p) => p == port,
            None => DEFAULT_PORTS.contains(&port),
        };
        if !port_ok {
            return false;
        }
        match self.host.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .is_some_and(|head| head.ends_with('.') && head.len() > 1),
            None => self.host == host,
        }
    }
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(p) => write!(f, "{host}:{p}"),
            None => f.write_str(&host),
        }
    }
}

/// Splits `HOST[:PORT]` (IPv6 in brackets).
fn split_host_port(t: &str) -> Result<(String, Option<u16>), String> {
    let port_of = |p: &str| -> Result<u16, String> {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{p:?} is not a port (1-65535)")),
            Ok(n) => Ok(n),
        }
    };
    if let Some(rest) = t.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return Err("an IPv6 address needs a closing ]".into());
        };
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(p) => Some(port_of(p)?),
                None => return Err(format!("unexpected {after:?} after the address")),
            },
        };
        return Ok((addr.to_string(), port));
    }
    match t.matches(':').count() {
        0 => Ok((t.to_string(), None)),
        1 => {
            let (h, p) = t.split_once(':').unwrap_or((t, ""));
            Ok((h.to_string(), Some(port_of(p)?)))
        }
        _ => Err("write an IPv6 address in brackets: [::1]:8080".into()),
    }
}

/// A host as it is compared: lowercase, no trailing dot, IPv6 without brackets. Refuses what
/// is not a DNS name or an IP address.
pub fn normalize_host(host: &str) -> Result<String, String> {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    let h = h
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .map(str::to_string)
        .unwrap_or(h);
    if h.is_empty() {
        return Err("the host is empty".into());
    }
    if h.len() > MAX_HOST {
        return Err(format!("the host is longer than {MAX_HOST} characters"));
    }
    if let Ok(a) = h.parse::<Ipv6Addr>() {
        return Ok(a.to_string());
    }
    if let Ok(a) = h.parse::<Ipv4Addr>() {
        return Ok(a.to_string());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if h.split('.').all(label_ok) {
        Ok(h)
    } else {
        Err(format!("{host:?} is not a host name or an IP address"))
    }
}

/// A server's allowlist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist(pub Vec<HostRule>);

impl Allowlist {
    /// Parses every rule.
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Allowlist, String> {
        rules
            .iter()
            .map(|r| HostRule::parse(r.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map(Allowlist)
    }

    /// Whether any rule allows the target.
    pub fn permits(&self, t: &Target) -> bool {
        self.0.iter().any(|r| r.matches(&t.host, t.port))
    }
}

impl fmt::Display for Allowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&list.join(", "))
    }
}

/// Where a client wants to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Normalized host ([`normalize_host`]).
    pub host: String,
    /// Port.
    pub port: u16,
    /// `CONNECT` (a tunnel, typically TLS), not a plain HTTP request.
    pub tunnel: bool,
}

impl Target {
    /// `host:port` (IPv6 in brackets), for connecting and for messages.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Why the proxy refuses a request, with the status it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `400` for a malformed request, `403` for a host not allowed.
    pub status: StatusCode,
    /// What to tell the client (and the log).
    pub message: String,
}

impl Refusal {
    fn bad(message: String) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            message,
        }
    }
}

/// The target of a request sent to the proxy: `CONNECT host:port` or an absolute `http://`
/// URL. Anything else is a [`Refusal`] (400).
pub fn target_of(method: &Method, uri: &Uri) -> Result<Target, Refusal> {
    if method == Method::CONNECT {
        let Some(auth) = uri.authority() else {
            return Err(Refusal::bad(format!(
                "CONNECT needs host:port, got {uri:?}"
            )));
        };
        let Some(port) = auth.port_u16().filter(|p| *p != 0) else {
            return Err(Refusal::bad(format!(
                "CONNECT needs host:port with a port, got {auth}"
            )));
        };
        let host = normalize_host(auth.host()).map_err(Refusal::bad)?;
        return Ok(Target {
            host,
            port,
            tunnel: true,
        });
    }
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(Refusal::bad(format!(
                "{uri}: an https URL goes through CONNECT (set HTTPS_PROXY); this proxy does not \
                 open TLS for a client"
            )));
        }
        Some(other) => {
            return Err(Refusal::bad(format!(
                "{uri}: only http URLs and CONNECT pass this proxy, not {other}"
            )));
        }
        None => {
            return Err(Refusal::bad(format!(
                "{uri}: this is the iom egress proxy; send absolute URLs (http://host/path) or \
                 CONNECT host:port"
            )));
        }
    }
    let Some(auth) = uri.authority() else {
        return Err(Refusal::bad(format!("{uri}: the URL has no host")));
    };
    if auth.as_str().contains('@') {
        return Err(Refusal::bad(format!(
            "{uri}: credentials in the URL are not passed on"
        )));
    }
    let port = match auth.port_u16() {
        Some(0) => return Err(Refusal::bad(format!("{uri}: port 0"))),
        Some(p) => p,
        None => 80,
    };
    Ok(Target {
        host: normalize_host(auth.host()).map_err(Refusal::bad)?,
        port,
        tunnel: false,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn t(host: &str, port: u16) -> Target {
        Target {
            host: host.into(),
            port,
            tunnel: false,
        }
    }

    #[test]
    fn rules_parse_and_print_back() {
        for (text, back) in [
            ("API.Example.com", "api.example.com"),
            ("api.example.com.:8443", "api.example.com:8443"),
            ("*.example.com", "*.example.com"),
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("[::1]:9", "[::1]:9"),
            ("[0:0::1]", "[::1]"),
        ] {
            assert_eq!(HostRule::parse(text).unwrap().to_string(), back, "{text}");
        }
        for bad in [
            "",
            "http://example.com",
            "example.com/path",
            "example.com:0",
            "example.com:99999",
            "example.com:x",
            "::1",
            "[::1",
            "*.com",
            "*.127.0.0.1",
            "exa mple.com",
            "-bad.com",
            "a..b",
            &format!("{}.com", "x".repeat(300)),
        ] {
            assert!(HostRule::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn rules_match_host_and_port_exactly() {
        let l = Allowlist::parse(&["api.example.com", "*.cdn.net", "127.0.0.1:8080"]).unwrap();
        assert!(l.permits(&t("api.example.com", 443)));
        assert!(l.permits(&t("api.example.com", 80)));
        assert!(!l.permits(&t("api.example.com", 22)));
        assert!(!l.permits(&t("evil-api.example.com", 443)));
        assert!(!l.permits(&t("api.example.com.evil.org", 443)));
        assert!(!l.permits(&t("example.com", 443)));
        assert!(l.permits(&t("a.cdn.net", 443)));
        assert!(l.permits(&t("a.b.cdn.net", 443)));
        assert!(!l.permits(&t("cdn.net", 443)));
        assert!(!l.permits(&t("xcdn.net", 443)));
        assert!(l.permits(&t("127.0.0.1", 8080)));
        assert!(!l.permits(&t("127.0.0.1", 8081)));
        assert!(!l.permits(&t("127.0.0.2", 8080)));
        assert!(!Allowlist::default().permits(&t("api.example.com", 443)));
    }

    #[test]
    fn targets_come_from_connect_or_absolute_http_urls() {
        let u = |s: &str| s.parse::<Uri>().unwrap();
        let c = target_of(&Method::CONNECT, &u("API.example.com:443")).unwrap();
        assert_eq!(
            c,
            Target {
                host: "api.example.com".into(),
                port: 443,
                tunnel: true
            }
        );
        let g = target_of(&Method::GET, &u("http://127.0.0.1:8080/x?y=1")).unwrap();
        assert_eq!(g.authority(), "127.0.0.1:8080");
        assert!(!g.tunnel);
        assert_eq!(
            target_of(&Method::POST, &u("http://example.com/"))
                .unwrap()
                .port,
            80
        );
        let v6 = target_of(&Method::GET, &u("http://[::1]:81/")).unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.authority()),
            ("::1", "[::1]:81".into())
        );
        for (m, bad, says) in [
            (Method::GET, "/relative", "absolute URLs"),
            (Method::GET, "https://example.com/", "CONNECT"),
            (Method::GET, "ftp://example.com/", "not ftp"),
            (Method::GET, "http://user:pw@example.com/", "credentials"),
            (Method::CONNECT, "example.com", "port"),
        ] {
            let r = target_of(&m, &u(bad)).unwrap_err();
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(r.message.contains(says), "{bad}: {}", r.message);
        }
    }
}
