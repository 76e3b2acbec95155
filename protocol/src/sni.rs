//! The server name (SNI) of a TLS ClientHello, for the relay's TLS passthrough, and the names
//! devices get under the relay's domain.
//!
//! [`parse_client_hello`] reads only what it must: the record headers, the handshake header,
//! and the ClientHello up to its `server_name` extension. It never needs more than
//! [`MAX_CLIENT_HELLO`] bytes of handshake (plus record headers), so a caller that buffers
//! what the client sent, up to [`MAX_PEEK`], and calls it again after each read always ends
//! with an answer. It is pure: the caller does the reading, the timeout, and forwards the
//! very bytes it buffered.
//!
//! [`web_name`] derives a device's label (`DEVICE` in `DEVICE.relay.example.com`) from its
//! public key: stable for the life of the key, unique per device, checkable by anyone.

use sha2::{Digest, Sha256};

use crate::keys::DeviceId;

/// The largest ClientHello (handshake body) accepted. Real ones are under 2 KiB (a few KiB
/// with post-quantum key shares); a TLS record holds at most 16 KiB.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;
/// The most bytes a caller needs to buffer: the ClientHello and the headers of the records
/// it may be split over (each at least one byte of payload would be absurd; we allow the
/// split into at most [`MAX_RECORDS`] records).
pub const MAX_PEEK: usize = MAX_CLIENT_HELLO + 4 + MAX_RECORDS * RECORD_HEADER_LEN;
/// The most TLS records a ClientHello may be split over.
pub const MAX_RECORDS: usize = 16;
/// Length of a TLS record header.
pub const RECORD_HEADER_LEN: usize = 5;
/// Length of a device label made by [`web_name`].
pub const WEB_NAME_LEN: usize = 16;

/// The TLS `handshake_failure` alert description.
pub const ALERT_HANDSHAKE_FAILURE: u8 = 40;
/// The TLS `decode_error` alert description.
pub const ALERT_DECODE_ERROR: u8 = 50;
/// The TLS `unrecognized_name` alert description.
pub const ALERT_UNRECOGNIZED_NAME: u8 = 112;

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

/// What the bytes so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// A valid beginning: read more and call again.
    NeedMore,
    /// A whole ClientHello; its `server_name` (lower case), if it has one.
    ServerName(Option<String>),
}

/// Why the bytes are not a ClientHello we forward.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    /// The first record is not a TLS handshake record (plain HTTP, garbage).
    #[error("not a TLS handshake (first byte {0:#04x})")]
    NotTls(u8),
    /// A record's version is not TLS (major version 3).
    #[error("not a TLS record version ({0:#06x})")]
    BadVersion(u16),
    /// The handshake message is not a ClientHello.
    #[error("the first handshake message is not a ClientHello (type {0})")]
    NotClientHello(u8),
    /// The ClientHello is larger than [`MAX_CLIENT_HELLO`] or split over too many records.
    #[error("ClientHello too large or too fragmented")]
    TooLarge,
    /// A length inside the ClientHello does not fit.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The server name is not a valid DNS host name.
    #[error("the server name is not a valid host name")]
    BadName,
}

/// Parses the beginning of a TLS connection, `buf` being every byte the client sent so far.
pub fn parse_client_hello(buf: &[u8]) -> Result<Peek, SniError> {
    // Reassemble the handshake bytes from consecutive handshake records.
    let mut handshake: Vec<u8> = Vec::new();
    let mut at = 0usize;
    let mut records = 0usize;
    let mut needed: Option<usize> = None;
    loop {
        if let Some(n) = needed
            && handshake.len() >= n
        {
            break;
        }
        let Some(header) = buf.get(at..at + RECORD_HEADER_LEN) else {
            // Check what we have of the header, so garbage fails at its first byte.
            if let Some(&first) = buf.get(at)
                && first != CONTENT_HANDSHAKE
            {
                return Err(SniError::NotTls(first));
            }
            return Ok(Peek::NeedMore);
        };
        if header[0] != CONTENT_HANDSHAKE {
            return Err(SniError::NotTls(header[0]));
        }
        let version = u16::from_be_bytes([header[1], header[2]]);
        if header[1] != 3 {
            return Err(SniError::BadVersion(version));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 {
            return Err(SniError::Malformed("empty handshake record"));
        }
        records += 1;
        if records > MAX_RECORDS || len > MAX_CLIENT_HELLO + 4 {
            return Err(SniError::TooLarge);
        }
        at += RECORD_HEADER_LEN;
        let Some(payload) = buf.get(at..at + len) else {
            // Use what has arrived of this record to learn the handshake length early.
            handshake.extend_from_slice(&buf[at.min(buf.len())..]);
            check_handshake_header(&handshake)?;
            return Ok(Peek::NeedMore);
        };
        handshake.extend_from_slice(payload);
        at += len;
        if needed.is_none() {
            needed = check_handshake_header(&handshake)?;
        }
    }
    let total = needed.unwrap_or(0);
    parse_hello_body(&handshake[4..total]).map(Peek::ServerName)
}

/// The full handshake message length (header included) once the 4-byte header is there.
fn check_handshake_header(handshake: &[u8]) -> Result<Option<usize>, SniError> {
    let Some(&kind) = handshake.first() else {
        return Ok(None);
    };
    if kind != HANDSHAKE_CLIENT_HELLO {
        return Err(SniError::NotClientHello(kind));
    }
    let Some(len) = handshake.get(1..4) else {
        return Ok(None);
    };
    let len = (usize::from(len[0]) << 16) | (usize::from(len[1]) << 8) | usize::from(len[2]);
    if len > MAX_CLIENT_HELLO {
        return Err(SniError::TooLarge);
    }
    if len == 0 {
        return Err(SniError::Malformed("empty ClientHello"));
    }
    Ok(Some(4 + len))
}

/// A cursor over a ClientHello body.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if self.buf.len() < n {
            return Err(SniError::Malformed(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, SniError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SniError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one- or two-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = usize::from(self.u8(what)?);
        self.take(n, what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = usize::from(self.u16(what)?);
        self.take(n, what)
    }
}

fn parse_hello_body(body: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Reader { buf: body };
    r.take(2, "client version")?;
    r.take(32, "random")?;
    let session = r.vec8("session id")?;
    if session.len() > 32 {
        return Err(SniError::Malformed("session id longer than 32 bytes"));
    }
    let suites = r.vec16("cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("cipher suites"));
    }
    if r.vec8("compression methods")?.is_empty() {
        return Err(SniError::Malformed("compression methods"));
    }
    if r.buf.is_empty() {
        return Ok(None); // No extensions at all.
    }
    let mut ext = Reader {
        buf: r.vec16("extensions")?,
    };
    let mut name = None;
    while !ext.buf.is_empty() {
        let kind = ext.u16("extension type")?;
        let data = ext.vec16("extension data")?;
        if kind != EXT_SERVER_NAME {
            continue;
        }
        if name.is_some() {
            return Err(SniError::Malformed("two server_name extensions"));
        }
        let mut list = Reader { buf: data };
        let mut names = Reader {
            buf: list.vec16("server name list")?,
        };
        while !names.buf.is_empty() {
            let kind = names.u8("server name type")?;
            let host = names.vec16("server name")?;
            if kind == NAME_TYPE_HOST {
                if name.is_some() {
                    return Err(SniError::Malformed("two host names"));
                }
                name = Some(host_name(host)?);
            }
        }
    }
    Ok(name)
}

/// `bytes` as a lower-case DNS host name (letters, digits, `-`, dots between labels of 1 to
/// 63 characters, 253 at most, no trailing dot), or [`SniError::BadName`].
pub fn host_name(bytes: &[u8]) -> Result<String, SniError> {
    let text = std::str::from_utf8(bytes).map_err(|_| SniError::BadName)?;
    if text.is_empty() || text.len() > 253 {
        return Err(SniError::BadName);
    }
    for label in text.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(SniError::BadName);
        }
    }
    Ok(text.to_ascii_lowercase())
}

/// The device label of `host` under `domain` (both lower case): `Some("abc")` for
/// `abc.relay.example.com` under `relay.example.com`; `None` for the domain itself, deeper
/// names, or names elsewhere.
pub fn label_under<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let label = host.strip_suffix(domain)?.strip_suffix('.')?;
    (!label.is_empty() && !label.contains('.')).then_some(label)
}

/// The label a device serves under a relay's domain: 16 characters of lower-case base32 of
/// SHA-256("iom-web-name-v1" || device key), 80 bits.
pub fn web_name(device: &DeviceId) -> String {
    let mut h = Sha256::new();
    h.update(b"iom-web-name-v1");
    h.update(device.as_bytes());
    let digest: [u8; 32] = h.finalize().into();
    let mut name = crate::base32::encode(&digest[..10]);
    name.truncate(WEB_NAME_LEN);
    name
}

/// A fatal TLS alert record with `description` (e.g. [`ALERT_UNRECOGNIZED_NAME`]), to send
/// before closing a connection the relay will not forward.
pub fn alert(description: u8) -> [u8; 7] {
    [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A ClientHello handshake message (header included) with these extensions.
    fn hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(32);
        body.extend_from_slice(&[9; 32]);
        body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]);
        body.extend_from_slice(&[1, 0]);
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut msg = vec![1];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    fn sni(host: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend_from_slice(&(host.len() as u16).to_be_bytes());
        entry.extend_from_slice(host.as_bytes());
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&entry);
        (0, data)
    }

    /// `msg` split into records of at most `chunk` bytes.
    fn records(msg: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in msg.chunks(chunk) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    #[test]
    fn the_server_name_is_found_after_other_extensions() {
        let msg = hello(&[
            (10, vec![0, 2, 0, 29]),
            sni("Abc.Relay.Example.com"),
            (43, vec![2, 3, 4]),
        ]);
        let wire = records(&msg, 16 * 1024);
        assert_eq!(
            parse_client_hello(&wire).unwrap(),
            Peek::ServerName(Some("abc.relay.example.com".into()))
        );
    }

    #[test]
    fn every_prefix_asks_for_more_and_fragmented_records_work() {
        let msg = hello(&[sni("x.relay.test")]);
        for chunk in [7, 50, 16 * 1024] {
            let wire = records(&msg, chunk);
            for end in 0..wire.len() {
                assert_eq!(
                    parse_client_hello(&wire[..end]).unwrap(),
                    Peek::NeedMore,
                    "chunk {chunk}, prefix {end}"
                );
            }
            assert_eq!(
                parse_client_hello(&wire).unwrap(),
                Peek::ServerName(Some("x.relay.test".into()))
            );
        }
    }

    #[test]
    fn trailing_bytes_after_the_hello_are_ignored() {
        let mut wire = records(&hello(&[sni("a.b")]), 1000);
        wire.extend_from_slice(b"more records the device will read");
        assert_eq!(
            parse_client_hello(&wire).unwrap(),
            Peek::ServerName(Some("a.b".into()))
        );
    }

    #[test]
    fn no_sni_and_no_extensions_give_none() {
        let wire = records(&hello(&[(10, vec![0, 2, 0, 29])]), 1000);
        assert_eq!(parse_client_hello(&wire).unwrap(), Peek::ServerName(None));
        let mut bare = hello(&[]);
        bare.truncate(bare.len() - 2); // drop the empty extensions block
        let len = (bare.len() - 4) as u32;
        bare[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
        assert_eq!(
            parse_client_hello(&records(&bare, 1000)).unwrap(),
            Peek::ServerName(None)
        );
    }

    #[test]
    fn garbage_fails_at_once() {
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            Err(SniError::NotTls(b'G'))
        );
        assert_eq!(parse_client_hello(b"G"), Err(SniError::NotTls(b'G')));
        assert_eq!(
            parse_client_hello(&[22, 9, 9, 0, 1, 1]),
            Err(SniError::BadVersion(0x0909))
        );
        // A ServerHello (type 2) instead of a ClientHello.
        assert_eq!(
            parse_client_hello(&[22, 3, 3, 0, 4, 2, 0, 0, 0]),
            Err(SniError::NotClientHello(2))
        );
        assert!(matches!(
            parse_client_hello(&[22, 3, 3, 0, 0]),
            Err(SniError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_hellos_are_refused_before_buffering() {
        // The handshake header announces 1 MiB.
        assert_eq!(
            parse_client_hello(&[22, 3, 1, 0, 4, 1, 0x10, 0, 0]),
            Err(SniError::TooLarge)
        );
        // Too many tiny records.
        let wire = records(&hello(&[sni("a.b")]), 1);
        assert_eq!(parse_client_hello(&wire), Err(SniError::TooLarge));
    }

    #[test]
    fn lengths_that_do_not_fit_are_malformed() {
        let mut msg = hello(&[sni("a.b")]);
        // Cipher suites length pointing past the end.
        msg[4 + 2 + 32 + 1 + 32] = 0xff;
        assert!(matches!(
            parse_client_hello(&records(&msg, 1000)),
            Err(SniError::Malformed(_))
        ));
        // A server_name list whose entry runs past it.
        let bad = (0u16, vec![0, 4, 0, 0, 9, b'a']);
        assert!(matches!(
            parse_client_hello(&records(&hello(&[bad]), 1000)),
            Err(SniError::Malformed(_))
        ));
        let twice = hello(&[sni("a.b"), sni("c.d")]);
        assert!(matches!(
            parse_client_hello(&records(&twice, 1000)),
            Err(SniError::Malformed(_))
        ));
    }

    #[test]
    fn bad_host_names_are_refused() {
        for bad in ["", "a..b", "-a.b", "a b", "a.b.", "ä.b", &"x".repeat(64)] {
            let wire = records(&hello(&[sni(bad)]), 1000);
            assert_eq!(parse_client_hello(&wire), Err(SniError::BadName), "{bad:?}");
        }
    }

    #[test]
    fn labels_are_one_level_under_the_domain() {
        assert_eq!(label_under("abc.relay.test", "relay.test"), Some("abc"));
        assert_eq!(label_under("relay.test", "relay.test"), None);
        assert_eq!(label_under("a.abc.relay.test", "relay.test"), None);
        assert_eq!(label_under("abcrelay.test", "relay.test"), None);
        assert_eq!(label_under("abc.other.test", "relay.test"), None);
    }

    #[test]
    fn web_names_are_stable_distinct_host_labels() {
        let a = crate::keys::DeviceKey::from_seed([1; 32]).id();
        let b = crate::keys::DeviceKey::from_seed([2; 32]).id();
        let name = web_name(&a);
        assert_eq!(name, web_name(&a));
        assert_ne!(name, web_name(&b));
        assert_eq!(name.len(), WEB_NAME_LEN);
        assert_eq!(host_name(name.as_bytes()).unwrap(), name);
    }

    #[test]
    fn alerts_are_fatal_alert_records() {
        assert_eq!(alert(ALERT_UNRECOGNIZED_NAME), [21, 3, 3, 0, 2, 2, 112]);
    }
}
