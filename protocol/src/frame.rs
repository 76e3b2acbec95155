//! Length-prefixed frames and CBOR message helpers for the `/iom/*` stream protocols.
//!
//! A frame is a 4-byte big-endian payload length followed by the payload. Every reader has a
//! hard maximum ([`MAX_FRAME_LEN`] unless the protocol says otherwise); a longer length prefix is
//! an error *before* any payload is buffered, so a peer cannot make us allocate more than the
//! maximum.
//!
//! - [`encode_frame`] writes one frame.
//! - [`FrameDecoder`] is a pure incremental decoder: [`push`](FrameDecoder::push) bytes as they
//!   arrive, take whole frames with [`next_frame`](FrameDecoder::next_frame), and call
//!   [`finish`](FrameDecoder::finish) at end of stream to detect a cut-off frame.
//! - [`parse_len`] checks a length prefix, for async readers that read the 4 bytes themselves.
//! - [`encode_message`] / [`decode_message`] turn a serde value into a frame payload and back
//!   (plain serde_cbor, not canonical: only hashed or signed bytes need to be canonical).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The default maximum payload length: 1 MiB.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;
/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// A framing error. Both variants mean the peer misbehaved (or the stream broke): close it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix (or a payload to encode) exceeds the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    Oversized {
        /// The announced or attempted payload length.
        len: u64,
        /// The maximum.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the incomplete frame (header included) that had arrived.
        buffered: usize,
    },
}

/// Encodes `payload` as one frame, refusing payloads longer than `max`.
pub fn encode_frame(payload: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    let header = encode_header(payload.len(), max)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(out)
}

/// The header of a frame whose payload is `len` bytes, refusing lengths over `max`; for writers
/// that send the payload from its own buffer after it ([`encode_frame`] without the copy).
pub fn encode_header(len: usize, max: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    let oversized = || FrameError::Oversized {
        len: len as u64,
        max,
    };
    if len > max {
        return Err(oversized());
    }
    let len = u32::try_from(len).map_err(|_| oversized())?;
    Ok(len.to_be_bytes())
}

/// Checks a frame header and returns the payload length.
pub fn parse_len(header: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    match usize::try_from(len) {
        Ok(len) if len <= max => Ok(len),
        _ => Err(FrameError::Oversized {
            len: u64::from(len),
            max,
        }),
    }
}

/// Incremental frame decoder with a hard maximum frame length.
///
/// After an error the decoder is poisoned: every later call returns the same error (the stream
/// must be closed). It buffers at most what it was given; bytes beyond the current frame are
/// kept for the next one.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max: usize,
    buf: Vec<u8>,
    /// Bytes at the end of `buf` handed out by `read_space` and not yet `filled`.
    unfilled: usize,
    error: Option<FrameError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// A decoder that accepts payloads of up to `max` bytes.
    pub fn new(max: usize) -> FrameDecoder {
        FrameDecoder {
            max,
            buf: Vec::new(),
            unfilled: 0,
            error: None,
        }
    }

    /// The maximum payload length.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes complete the next frame's header, or its payload once the header is
    /// here. A reader that reads at most this many bytes never reads past the frame, so it can
    /// stop after any frame without losing the stream's next bytes. `0`: call
    /// [`FrameDecoder::next_frame`] (a whole frame, or an error, is ready).
    pub fn wanted(&self) -> usize {
        if self.error.is_some() {
            return 0;
        }
        match self.buf.first_chunk::<HEADER_LEN>() {
            None => HEADER_LEN - self.buf.len(),
            Some(header) => match parse_len(*header, self.max) {
                Ok(len) => (HEADER_LEN + len).saturating_sub(self.buf.len()),
                Err(_) => 0,
            },
        }
    }

    /// Space at the end of the buffer for the next read from the stream: exactly
    /// [`FrameDecoder::wanted`] bytes (zeroed), so once a header is in, the buffer is sized for
    /// its whole frame at once. Read into it, then call [`FrameDecoder::filled`] with the number
    /// of bytes read; this is [`FrameDecoder::push`] without the intermediate buffer.
    pub fn read_space(&mut self) -> &mut [u8] {
        let want = self.wanted();
        let start = self.buf.len();
        self.buf.resize(start + want, 0);
        self.unfilled = want;
        &mut self.buf[start..]
    }

    /// Keeps the first `n` bytes of the last [`FrameDecoder::read_space`] (what the read
    /// returned) and drops the rest.
    pub fn filled(&mut self, n: usize) {
        let keep = self.buf.len() - self.unfilled + n.min(self.unfilled);
        self.buf.truncate(keep);
        self.unfilled = 0;
    }

    /// Appends bytes read from the stream. Drain frames with [`FrameDecoder::next_frame`] after
    /// each push: the buffer then never holds more than one maximum frame plus one read.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.error.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Returns the next whole frame's payload, `Ok(None)` if more bytes are needed, or an error
    /// if the length prefix exceeds the maximum.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        Ok(self.next_frame_in_place()?.map(|(mut buf, start)| {
            buf.drain(..start);
            buf
        }))
    }

    /// [`FrameDecoder::next_frame`] without moving the payload: a buffer and where in it the
    /// payload starts (it runs to the end). When exactly one frame is buffered (what a reader
    /// that reads [`FrameDecoder::wanted`] bytes gets) that is the decoder's own buffer, header
    /// included, handed over: a receiver that keeps frames as shared slices saves a move of
    /// every payload.
    pub fn next_frame_in_place(&mut self) -> Result<Option<(Vec<u8>, usize)>, FrameError> {
        if let Some(err) = &self.error {
            return Err(err.clone());
        }
        let Some(header) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = match parse_len(*header, self.max) {
            Ok(len) => len,
            Err(err) => {
                self.buf = Vec::new();
                self.error = Some(err.clone());
                return Err(err);
            }
        };
        if self.buf.len() - HEADER_LEN < len {
            return Ok(None);
        }
        if self.buf.len() == HEADER_LEN + len {
            return Ok(Some((std::mem::take(&mut self.buf), HEADER_LEN)));
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some((payload, 0)))
    }

    /// Call at end of stream: an error if a partial frame is left over.
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(err) = &self.error {
            return Err(err.clone());
        }
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }
}

/// A message could not be encoded (a bug on our side).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode message: {0}")]
pub struct EncodeError(pub String);

/// A frame payload is not a valid message of the expected type (the peer misbehaved).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not CBOR, not the expected shape, trailing bytes, or a value that failed validation.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Encodes a message as (plain, non-canonical) CBOR.
pub fn encode_message<T: Serialize>(message: &T) -> Result<Vec<u8>, EncodeError> {
    serde_cbor::to_vec(message).map_err(|e| EncodeError(e.to_string()))
}

/// Decodes a CBOR message, rejecting trailing bytes. Never panics on bad input.
pub fn decode_message<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    serde_cbor::from_slice(payload).map_err(|e| DecodeError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn encode_writes_big_endian_length() {
        assert_eq!(
            encode_frame(b"abc", 16).unwrap(),
            [0, 0, 0, 3, b'a', b'b', b'c']
        );
        assert_eq!(encode_frame(b"", 0).unwrap(), [0, 0, 0, 0]);
    }

    #[test]
    fn encode_refuses_oversized() {
        assert_eq!(
            encode_frame(&[0; 5], 4),
            Err(FrameError::Oversized { len: 5, max: 4 })
        );
    }

    #[test]
    fn parse_len_checks_max() {
        assert_eq!(parse_len([0, 0, 1, 0], 256), Ok(256));
        assert_eq!(
            parse_len([0, 0, 1, 1], 256),
            Err(FrameError::Oversized { len: 257, max: 256 })
        );
        assert_eq!(
            parse_len([0xff; 4], MAX_FRAME_LEN),
            Err(FrameError::Oversized {
                len: u64::from(u32::MAX),
                max: MAX_FRAME_LEN
            })
        );
    }

    #[test]
    fn decoder_handles_byte_by_byte_input() {
        let mut wire = encode_frame(b"hello", 64).unwrap();
        wire.extend(encode_frame(b"", 64).unwrap());
        wire.extend(encode_frame(b"world", 64).unwrap());
        let mut decoder = FrameDecoder::new(64);
        let mut frames = Vec::new();
        for byte in wire {
            decoder.push(&[byte]);
            while let Some(frame) = decoder.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames, [b"hello".to_vec(), vec![], b"world".to_vec()]);
        assert_eq!(decoder.finish(), Ok(()));
    }

    #[test]
    fn decoder_reports_oversized_before_buffering_payload() {
        let mut decoder = FrameDecoder::new(8);
        decoder.push(&[0, 0, 0, 9]);
        assert_eq!(
            decoder.next_frame(),
            Err(FrameError::Oversized { len: 9, max: 8 })
        );
        // Poisoned: stays failed, drops further input.
        decoder.push(&[0; 100]);
        assert_eq!(decoder.buffered(), 0);
        assert_eq!(
            decoder.next_frame(),
            Err(FrameError::Oversized { len: 9, max: 8 })
        );
        assert!(decoder.finish().is_err());
    }

    #[test]
    fn reading_into_read_space_yields_the_same_frames_as_push() {
        let mut wire = encode_frame(b"first", 64).unwrap();
        wire.extend(encode_frame(b"", 64).unwrap());
        wire.extend(encode_frame(&[7u8; 40], 64).unwrap());
        for step in [1usize, 3, 5, 64] {
            let mut d = FrameDecoder::new(64);
            let mut src: &[u8] = &wire;
            let mut frames = Vec::new();
            loop {
                if let Some(f) = d.next_frame().unwrap() {
                    frames.push(f);
                    continue;
                }
                let space = d.read_space();
                let n = space.len().min(step).min(src.len());
                space[..n].copy_from_slice(&src[..n]);
                src = &src[n..];
                d.filled(n);
                if n == 0 {
                    break;
                }
            }
            assert!(d.finish().is_ok());
            assert_eq!(
                frames,
                vec![b"first".to_vec(), Vec::new(), vec![7u8; 40]],
                "step {step}"
            );
        }
        // Past a header, the space is the whole rest of the frame: one allocation.
        let mut d = FrameDecoder::new(1 << 20);
        d.read_space().copy_from_slice(&(300_000u32).to_be_bytes());
        d.filled(4);
        assert_eq!(d.read_space().len(), 300_000);
        d.filled(10);
        assert_eq!(d.buffered(), 14);
    }

    #[test]
    fn wanted_counts_header_then_payload_and_is_zero_when_ready_or_poisoned() {
        let mut decoder = FrameDecoder::new(8);
        assert_eq!(decoder.wanted(), 4);
        decoder.push(&[0, 0]);
        assert_eq!(decoder.wanted(), 2);
        decoder.push(&[0, 3, b'a']);
        assert_eq!(decoder.wanted(), 2);
        decoder.push(b"bc");
        assert_eq!(decoder.wanted(), 0);
        assert_eq!(decoder.next_frame(), Ok(Some(b"abc".to_vec())));
        assert_eq!(decoder.wanted(), 4);
        decoder.push(&[0, 0, 0, 9]);
        assert_eq!(decoder.wanted(), 0);
        assert!(decoder.next_frame().is_err());
        assert_eq!(decoder.wanted(), 0);
    }

    #[test]
    fn decoder_reports_truncated_frame_at_eof() {
        let wire = encode_frame(b"hello", 64).unwrap();
        for cut in 1..wire.len() {
            let mut decoder = FrameDecoder::new(64);
            decoder.push(&wire[..cut]);
            assert_eq!(decoder.next_frame(), Ok(None));
            assert_eq!(
                decoder.finish(),
                Err(FrameError::Truncated { buffered: cut })
            );
        }
    }

    #[test]
    fn garbage_frames_do_not_decode_as_messages() {
        let mut decoder = FrameDecoder::new(64);
        decoder.push(&encode_frame(&[0xff, 0x13, 0x37], 64).unwrap());
        let payload = decoder.next_frame().unwrap().unwrap();
        assert!(matches!(
            decode_message::<Vec<String>>(&payload),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn message_round_trip_and_trailing_bytes() {
        let message = (String::from("x"), 7u32);
        let mut bytes = encode_message(&message).unwrap();
        assert_eq!(decode_message::<(String, u32)>(&bytes).unwrap(), message);
        bytes.push(0);
        assert!(decode_message::<(String, u32)>(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn frames_round_trip_in_any_chunking(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8),
            chunk in 1usize..64,
        ) {
            let mut wire = Vec::new();
            for p in &payloads {
                wire.extend(encode_frame(p, 300).unwrap());
            }
            let mut decoder = FrameDecoder::new(300);
            let mut out = Vec::new();
            for piece in wire.chunks(chunk) {
                decoder.push(piece);
                while let Some(frame) = decoder.next_frame().unwrap() {
                    out.push(frame);
                }
            }
            prop_assert_eq!(out, payloads);
            prop_assert_eq!(decoder.finish(), Ok(()));
        }

        #[test]
        fn reading_what_is_wanted_never_reads_past_a_frame(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..6),
            chunk in 1usize..64,
        ) {
            let mut wire = Vec::new();
            for p in &payloads {
                wire.extend(encode_frame(p, 300).unwrap());
            }
            // A fresh decoder per frame (a stateless reader) sees every frame, because no read
            // took bytes of the next one.
            let mut rest = &wire[..];
            for p in &payloads {
                let mut decoder = FrameDecoder::new(300);
                let frame = loop {
                    if let Some(frame) = decoder.next_frame().unwrap() {
                        break frame;
                    }
                    let n = decoder.wanted().min(chunk).min(rest.len());
                    prop_assert!(n > 0);
                    decoder.push(&rest[..n]);
                    rest = &rest[n..];
                };
                prop_assert_eq!(&frame, p);
                prop_assert_eq!(decoder.buffered(), 0);
                prop_assert_eq!(decoder.wanted(), HEADER_LEN);
            }
            prop_assert!(rest.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut decoder = FrameDecoder::new(64);
            decoder.push(&bytes);
            while let Ok(Some(frame)) = decoder.next_frame() {
                prop_assert!(frame.len() <= 64);
            }
            let _ = decoder.finish();
        }
    }
}
