//! The head of a plain HTTP/1.x request, as far as the relay's port-80 listener needs it to
//! answer ACME HTTP-01 challenges for a device: method, path and `Host`. Pure, bounded
//! ([`MAX_HEAD`]), incremental like [`crate::sni`].

/// The largest request head read.
pub const MAX_HEAD: usize = 8 * 1024;
/// The path prefix of HTTP-01 challenges (RFC 8555 §8.3).
pub const ACME_PREFIX: &str = "/.well-known/acme-challenge/";
/// The longest challenge token accepted (Let's Encrypt's are 43 characters).
pub const MAX_TOKEN: usize = 128;

/// What the bytes so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadPeek {
    /// Read more and call again.
    NeedMore,
    /// A whole head.
    Head(RequestHead),
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The request target (origin form, `/…`).
    pub path: String,
    /// The `Host` header, lower case, without a port.
    pub host: Option<String>,
}

/// Why the bytes are not a request head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Longer than [`MAX_HEAD`].
    #[error("request head longer than {MAX_HEAD} bytes")]
    TooLarge,
    /// Not `METHOD /path HTTP/1.x`, or not text.
    #[error("not an HTTP/1 request")]
    NotHttp,
}

/// Parses the beginning of a connection, `buf` being every byte sent so far.
pub fn parse_request_head(buf: &[u8]) -> Result<HeadPeek, HeadError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        // Fail early on bytes no request line starts with.
        if buf
            .iter()
            .take(16)
            .any(|b| !b.is_ascii_graphic() && !b" \r\n".contains(b))
        {
            return Err(HeadError::NotHttp);
        }
        return Ok(HeadPeek::NeedMore);
    };
    if end > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| HeadError::NotHttp)?;
    let mut lines = text.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut parts = request.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::NotHttp);
    };
    let method_ok = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    if !method_ok || !path.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Err(HeadError::NotHttp);
    }
    let mut host = None;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(HeadError::NotHttp)?;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(HeadError::NotHttp);
            }
            let value = value.trim();
            let name = match value.rsplit_once(':') {
                Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => value,
            };
            host = Some(name.to_ascii_lowercase());
        }
    }
    Ok(HeadPeek::Head(RequestHead {
        method: method.to_string(),
        path: path.to_string(),
        host,
    }))
}

/// The token of an HTTP-01 challenge path (`/.well-known/acme-challenge/TOKEN`): base64url
/// characters only (so it is safe as a file name), 1 to [`MAX_TOKEN`] of them.
pub fn acme_token(path: &str) -> Option<&str> {
    let token = path.strip_prefix(ACME_PREFIX)?;
    let ok = !token.is_empty()
        && token.len() <= MAX_TOKEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(token)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_challenge_request_is_read_with_its_host() {
        let req = b"GET /.well-known/acme-challenge/abc_-1 HTTP/1.1\r\nUser-Agent: x\r\nHost: Dev.Relay.Test:80\r\n\r\n";
        for end in 0..req.len() {
            assert_eq!(parse_request_head(&req[..end]).unwrap(), HeadPeek::NeedMore);
        }
        let HeadPeek::Head(head) = parse_request_head(req).unwrap() else {
            panic!("no head");
        };
        assert_eq!(head.method, "GET");
        assert_eq!(head.host.as_deref(), Some("dev.relay.test"));
        assert_eq!(acme_token(&head.path), Some("abc_-1"));
    }

    #[test]
    fn garbage_and_oversized_heads_are_refused() {
        assert_eq!(
            parse_request_head(&[22, 3, 1, 0, 5]),
            Err(HeadError::NotHttp)
        );
        assert_eq!(
            parse_request_head(b"hello there\r\n\r\n"),
            Err(HeadError::NotHttp)
        );
        assert_eq!(
            parse_request_head(b"GET / HTTP/1.1\r\nno colon\r\n\r\n"),
            Err(HeadError::NotHttp)
        );
        assert_eq!(
            parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            Err(HeadError::NotHttp)
        );
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD, b'a');
        assert_eq!(parse_request_head(&big), Err(HeadError::TooLarge));
        let HeadPeek::Head(h) = parse_request_head(b"GET / HTTP/1.0\r\n\r\n").unwrap() else {
            panic!("no head");
        };
        assert_eq!(h.host, None);
    }

    #[test]
    fn only_plain_tokens_are_challenge_tokens() {
        assert_eq!(acme_token("/.well-known/acme-challenge/"), None);
        assert_eq!(acme_token("/.well-known/acme-challenge/../x"), None);
        assert_eq!(acme_token("/.well-known/acme-challenge/a/b"), None);
        assert_eq!(acme_token("/other/abc"), None);
        let long = format!("{ACME_PREFIX}{}", "a".repeat(MAX_TOKEN + 1));
        assert_eq!(acme_token(&long), None);
    }
}
