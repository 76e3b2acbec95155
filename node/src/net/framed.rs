//! Length-prefixed CBOR frames over a libp2p stream, with the hard maximum from
//! [`iom_protocol::frame`].

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use iom_protocol::frame::{FrameError, parse_len};
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

/// Reads one frame; `Ok(None)` on a clean end of stream before a header.
pub async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FramedError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = io.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated { buffered: got }.into());
        }
        got += n;
    }
    let len = parse_len(header, max)?;
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FramedError::Frame(FrameError::Truncated { buffered: 4 })
        } else {
            FramedError::Io(e)
        }
    })?;
    Ok(Some(buf))
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

/// Writes one frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    payload: &[u8],
    max: usize,
) -> Result<(), FramedError> {
    if payload.len() > max {
        return Err(FrameError::Oversized {
            len: payload.len() as u64,
            max,
        }
        .into());
    }
    let len = u32::try_from(payload.len()).map_err(|_| FramedError::Encode("too long".into()))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(payload).await?;
    io.flush().await?;
    Ok(())
}

#[cfg(test)]
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
    }
}
