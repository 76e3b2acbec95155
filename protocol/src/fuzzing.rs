//! Fuzz target bodies, shared by the cargo-fuzz crate in `fuzz/` and the stable-Rust smoke test
//! `tests/fuzz_smoke.rs`. Each feeds arbitrary bytes to a decoder; any panic is a bug. They also
//! assert round-trip properties of whatever decodes successfully.

use crate::cert::Certificate;
use crate::frame::{
    FrameDecoder, HEADER_LEN, decode_message, encode_frame, encode_message, parse_len,
};
use crate::invite::Invite;
use crate::pair::{JoinRequest, JoinResponse};
use crate::wire::{AgentRequest, AgentResponse, BlobRequest, BlobResponse, SyncMsg};

/// Frames: the incremental decoder with a small maximum and arbitrary chunking, `parse_len`,
/// `encode_frame` round trips, and pairing-message decoding of every frame.
pub fn fuzz_frame(data: &[u8]) {
    let Some((&[max_byte, chunk_byte], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max = usize::from(max_byte) * 8;
    let chunk = usize::from(chunk_byte).max(1);

    if let Some(header) = rest.first_chunk::<4>()
        && let Ok(len) = parse_len(*header, max)
    {
        assert!(len <= max);
    }

    let mut decoder = FrameDecoder::new(max);
    let mut pushed = Vec::new();
    for piece in rest.chunks(chunk) {
        decoder.push(piece);
        while let Ok(Some(frame)) = decoder.next_frame() {
            assert!(frame.len() <= max);
            let _ = JoinRequest::decode(&frame);
            let _ = JoinResponse::decode(&frame);
            pushed.push(frame);
        }
    }
    let pushed_end = decoder.finish().is_ok();

    // The way production reads (`node/src/net/framed.rs`, `read_frame`): one decoder per
    // frame, reading into `read_space` (never past the frame) with reads of at most `chunk`
    // bytes. It must see the same frames as the push path, and stop at the same place.
    let mut input = rest;
    let mut read = Vec::new();
    let read_end = loop {
        let mut decoder = FrameDecoder::new(max);
        let frame = loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => break Some(frame),
                Ok(None) => {}
                Err(_) => break None,
            }
            let space = decoder.read_space();
            assert!(space.len() <= HEADER_LEN + max, "read_space past the frame");
            let n = space.len().min(chunk).min(input.len());
            space[..n].copy_from_slice(&input[..n]);
            input = &input[n..];
            decoder.filled(n);
            if n == 0 {
                break None;
            }
        };
        match frame {
            Some(frame) => read.push(frame),
            None => break decoder.finish().is_ok(),
        }
    };
    assert_eq!(read, pushed, "the reader and the push path disagree");
    assert_eq!(
        read_end, pushed_end,
        "the reader and the push path end differently"
    );

    if let Ok(wire) = encode_frame(rest, max) {
        let mut decoder = FrameDecoder::new(max);
        decoder.push(&wire);
        assert_eq!(decoder.next_frame().ok().flatten().as_deref(), Some(rest));
        assert!(decoder.finish().is_ok());
    }
    let _ = JoinRequest::decode(rest);
    let _ = JoinResponse::decode(rest);
}

/// Invite codes: any text; a code that parses must re-encode to a code that parses the same.
pub fn fuzz_invite(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let now = data.first().map_or(0, |&b| u64::from(b));
    let _ = Invite::parse(&text, now);
    if let Ok(invite) = Invite::parse_ignoring_expiry(&text) {
        let code = invite.encode();
        assert!(code.is_ok(), "a parsed invite must encode");
        if let Ok(code) = code {
            assert_eq!(Invite::parse_ignoring_expiry(&code).ok(), Some(invite));
        }
    }
}

/// Certificates: `from_bytes` on any bytes; a certificate that decodes must be canonical (its
/// `to_bytes` is the input) and carry a valid signature.
pub fn fuzz_certificate(data: &[u8]) {
    if let Ok(cert) = Certificate::from_bytes(data) {
        assert_eq!(cert.to_bytes(), data);
        assert!(cert.verify_signature().is_ok());
        let state = crate::trust::evaluate(cert.body().person(), [&cert]);
        assert!(state.devices.len() <= 1);
    }
    let _ = serde_cbor::from_slice::<Certificate>(data);
}

/// The messages trusted peers exchange on `/iom/sync/1`, `/iom/blob/1` and `/iom/agent/1`:
/// every decoder sees the bytes, and whatever decodes re-encodes to bytes that decode to the
/// same encoding (nothing a peer sends can turn into a value we cannot handle or send on).
pub fn fuzz_wire(data: &[u8]) {
    round_trip(data, SyncMsg::decode, SyncMsg::encode);
    round_trip(data, BlobResponse::decode, BlobResponse::encode);
    round_trip(
        data,
        decode_message::<BlobRequest>,
        encode_message::<BlobRequest>,
    );
    round_trip(
        data,
        decode_message::<AgentRequest>,
        encode_message::<AgentRequest>,
    );
    round_trip(
        data,
        decode_message::<AgentResponse>,
        encode_message::<AgentResponse>,
    );
}

/// If `data` decodes, its encoding decodes again to the same encoding.
fn round_trip<T, D, E>(
    data: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, D>,
    encode: impl Fn(&T) -> Result<Vec<u8>, E>,
) {
    if let Ok(m) = decode(data)
        && let Ok(bytes) = encode(&m)
    {
        let again = decode(&bytes);
        assert!(again.is_ok(), "a decoded message does not decode again");
        assert_eq!(again.ok().and_then(|m| encode(&m).ok()), Some(bytes));
    }
}
