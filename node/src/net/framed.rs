//! Length-prefixed CBOR frames over a libp2p stream, read with [`iom_protocol::frame`]'s fuzzed
//! decoder and written with its encoder (one frame codec), with its hard maximum.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use iom_protocol::frame::{FrameDecoder, FrameError, HEADER_LEN, encode_header};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FramedError {
    /// The stream failed or closed.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent a frame over the limit.
    #[error("peer sent a bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The peer sent bytes that are not the expected message.
    #[error("peer sent an undecodable message: {0}")]
    Decode(String),
    /// We failed to encode (a bug).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

impl FramedError {
    /// Whether the peer is to blame (a protocol violation, not a broken connection). A
    /// stream that ends in the middle of a frame is what a dropped connection or a relay
    /// circuit cut at its data limit looks like, so it is not the peer's fault.
    pub fn is_peer_fault(&self) -> bool {
        match self {
            FramedError::Frame(FrameError::Truncated { .. }) => false,
            FramedError::Frame(_) | FramedError::Decode(_) => true,
            FramedError::Io(_) | FramedError::Encode(_) => false,
        }
    }
}

/// Reads one frame through the fuzzed [`FrameDecoder`]; `Ok(None)` on a clean end of stream
/// before a header. It reads only what the current frame still needs
/// ([`FrameDecoder::wanted`]), so it never consumes bytes of the next frame and can be called
/// once per frame on the same stream.
pub async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FramedError> {
    Ok(read_frame_in_place(io, max).await?.map(|(mut buf, start)| {
        buf.drain(..start);
        buf
    }))
}

/// [`read_frame`] as shared bytes: the payload stays where it was read
/// ([`FrameDecoder::next_frame_in_place`]), not moved to the front of its buffer.
pub async fn read_frame_bytes<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> Result<Option<bytes::Bytes>, FramedError> {
    Ok(read_frame_in_place(io, max)
        .await?
        .map(|(buf, start)| bytes::Bytes::from(buf).slice(start..)))
}

async fn read_frame_in_place<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> Result<Option<(Vec<u8>, usize)>, FramedError> {
    let mut decoder = FrameDecoder::new(max);
    loop {
        if let Some((buf, start)) = decoder.next_frame_in_place()? {
            crate::metrics::node()
                .bytes_received
                .add((buf.len() - start) as u64 + 4);
            return Ok(Some((buf, start)));
        }
        // Straight into the decoder's buffer, sized for the whole frame once the header is in.
        let n = io.read(decoder.read_space()).await?;
        decoder.filled(n);
        if n == 0 {
            decoder.finish()?;
            return Ok(None);
        }
    }
}

/// Reads and decodes one message; `Ok(None)` on a clean end of stream.
pub async fn read_msg<T: DeserializeOwned, R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> Result<Option<T>, FramedError> {
    match read_frame(io, max).await? {
        None => Ok(None),
        Some(bytes) => serde_cbor::from_slice(&bytes)
            .map(Some)
            .map_err(|e| FramedError::Decode(e.to_string())),
    }
}

/// Encodes and writes one message, then flushes.
pub async fn write_msg<T: Serialize, W: AsyncWrite + Unpin>(
    io: &mut W,
    msg: &T,
    max: usize,
) -> Result<(), FramedError> {
    let bytes = serde_cbor::to_vec(msg).map_err(|e| FramedError::Encode(e.to_string()))?;
    write_frame(io, &bytes, max).await
}

/// Writes one frame (the header from [`encode_header`], then the payload from its own buffer)
/// and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    payload: &[u8],
    max: usize,
) -> Result<(), FramedError> {
    write_frame_unflushed(io, payload, max).await?;
    io.flush().await?;
    Ok(())
}

/// Writes one frame without flushing: over a buffered writer, frames written back to back go
/// out together (one transport frame, one encryption, one syscall) at the caller's flush.
pub async fn write_frame_unflushed<W: AsyncWrite + Unpin>(
    io: &mut W,
    payload: &[u8],
    max: usize,
) -> Result<(), FramedError> {
    write_frame_parts(io, &[], payload, max).await
}

/// Writes one frame whose payload is `head` then `body` (a message's head, and bytes that live
/// elsewhere, not copied together first), without flushing. The frame header and `head` go in
/// one write: over an unbuffered stream every write is a transport frame of its own.
pub async fn write_frame_parts<W: AsyncWrite + Unpin>(
    io: &mut W,
    head: &[u8],
    body: &[u8],
    max: usize,
) -> Result<(), FramedError> {
    let len = head.len() + body.len();
    let mut first = Vec::with_capacity(HEADER_LEN + head.len());
    first.extend_from_slice(&encode_header(len, max)?);
    first.extend_from_slice(head);
    io.write_all(&first).await?;
    io.write_all(body).await?;
    crate::metrics::node().bytes_sent.add(len as u64 + 4);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_cut_mid_frame_is_not_the_peers_fault() {
        // Header says 10 bytes, 3 arrive, then the stream ends (a dropped connection).
        let mut bytes: &[u8] = &[0, 0, 0, 10, 1, 2, 3];
        let err = read_frame(&mut bytes, 1024).await.err();
        assert!(
            matches!(err, Some(FramedError::Frame(FrameError::Truncated { .. }))),
            "{err:?}"
        );
        assert!(!err.is_some_and(|e| e.is_peer_fault()));
        // An oversized length prefix is.
        let mut bytes: &[u8] = &[0xff, 0, 0, 0];
        let err = read_frame(&mut bytes, 1024).await.err();
        assert!(err.is_some_and(|e| e.is_peer_fault()));
        // A header cut short is not either.
        let mut bytes: &[u8] = &[0, 0];
        let err = read_frame(&mut bytes, 1024).await.err();
        assert!(err.is_some_and(|e| !e.is_peer_fault()));
    }

    #[tokio::test]
    async fn frames_read_one_call_at_a_time_lose_nothing_between_them() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"first", 64).await.unwrap();
        write_frame(&mut wire, b"", 64).await.unwrap();
        write_frame(&mut wire, &[7; 200_000], 300_000)
            .await
            .unwrap();
        let mut io: &[u8] = &wire;
        assert_eq!(
            read_frame(&mut io, 300_000).await.unwrap(),
            Some(b"first".to_vec())
        );
        assert_eq!(
            read_frame(&mut io, 300_000).await.unwrap(),
            Some(Vec::new())
        );
        assert_eq!(
            read_frame(&mut io, 300_000).await.unwrap(),
            Some(vec![7; 200_000])
        );
        assert_eq!(read_frame(&mut io, 300_000).await.unwrap(), None);
    }

    #[tokio::test]
    async fn write_refuses_oversized_payloads_and_writes_nothing() {
        let mut wire = Vec::new();
        let err = write_frame(&mut wire, &[0; 65], 64).await.err();
        assert!(matches!(
            err,
            Some(FramedError::Frame(FrameError::Oversized {
                len: 65,
                max: 64
            }))
        ));
        assert!(wire.is_empty());
    }

    #[tokio::test]
    async fn messages_round_trip_and_garbage_is_the_peers_fault() {
        let mut wire = Vec::new();
        write_msg(&mut wire, &("x".to_string(), 5u32), 64)
            .await
            .unwrap();
        write_frame(&mut wire, &[0xff, 0x13], 64).await.unwrap();
        let mut io: &[u8] = &wire;
        let got: Option<(String, u32)> = read_msg(&mut io, 64).await.unwrap();
        assert_eq!(got, Some(("x".to_string(), 5)));
        let err = read_msg::<(String, u32), _>(&mut io, 64).await.err();
        assert!(matches!(&err, Some(FramedError::Decode(_))), "{err:?}");
        assert!(err.is_some_and(|e| e.is_peer_fault()));
    }

    #[tokio::test]
    async fn a_frame_arriving_in_pieces_over_a_stream_is_whole() {
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let (client, server) = tokio::io::duplex(7);
        let writer = tokio::spawn(async move {
            let mut client = tokio_util::compat::TokioAsyncWriteCompatExt::compat_write(client);
            write_frame(&mut client, &[3; 1000], 1000).await.unwrap();
            write_frame(&mut client, b"end", 1000).await.unwrap();
        });
        let mut server = server.compat();
        assert_eq!(
            read_frame(&mut server, 1000).await.unwrap(),
            Some(vec![3; 1000])
        );
        assert_eq!(
            read_frame(&mut server, 1000).await.unwrap(),
            Some(b"end".to_vec())
        );
        writer.await.unwrap();
        assert_eq!(read_frame(&mut server, 1000).await.unwrap(), None);
    }
}
