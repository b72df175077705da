//! Length-delimited prost frames on any async byte stream: a varint length,
//! then the encoded message. Used on the agent link's QUIC streams.
//!
//! Not responsible for what the frames mean; only for reading and writing
//! them safely (a frame larger than [`MAX_FRAME_BYTES`] is refused rather than
//! allocated, so a lying peer cannot make us reserve gigabytes).

use bytes::{Buf, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame we accept. A job payload with many variables is well under
/// 1 MiB; 16 MiB leaves room and still bounds memory per stream.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Errors reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream i/o failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is larger than the {MAX_FRAME_BYTES} byte limit")]
    TooLarge(usize),
    #[error("frame length prefix is malformed")]
    BadLength,
    #[error("frame does not decode as {kind}: {source}")]
    Decode {
        kind: &'static str,
        source: prost::DecodeError,
    },
    #[error("stream ended in the middle of a frame")]
    Truncated,
}

/// Writes one message as a length-delimited frame and flushes it.
///
/// # Errors
/// Fails when the stream fails.
pub async fn write_frame<W, M>(writer: &mut W, message: &M) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    M: Message,
{
    let buf = message.encode_length_delimited_to_vec();
    writer.write_all(&buf).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one length-delimited frame. Returns `Ok(None)` when the stream ended
/// cleanly before a new frame began.
///
/// # Errors
/// Fails on I/O errors, a frame over the size limit, a stream that ends
/// mid-frame, or bytes that do not decode as `M`.
pub async fn read_frame<R, M>(reader: &mut R) -> Result<Option<M>, FrameError>
where
    R: AsyncRead + Unpin,
    M: Message + Default,
{
    let Some(len) = read_varint(reader).await? else {
        return Ok(None);
    };
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = BytesMut::zeroed(len);
    match reader.read_exact(&mut buf).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(FrameError::Truncated)
        }
        Err(e) => return Err(e.into()),
    }
    M::decode(buf.freeze())
        .map(Some)
        .map_err(|source| FrameError::Decode {
            kind: std::any::type_name::<M>(),
            source,
        })
}

/// Reads a varint length prefix; `None` on a clean end of stream before it.
async fn read_varint<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<usize>, FrameError> {
    let mut prefix = BytesMut::with_capacity(10);
    loop {
        let mut byte = [0u8; 1];
        let n = reader.read(&mut byte).await?;
        if n == 0 {
            return if prefix.is_empty() {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        prefix.extend_from_slice(&byte);
        if byte[0] & 0x80 == 0 {
            break;
        }
        if prefix.len() >= 10 {
            return Err(FrameError::BadLength);
        }
    }
    let mut buf = prefix.freeze();
    let len = prost::encoding::decode_varint(&mut buf).map_err(|_| FrameError::BadLength)?;
    debug_assert!(!buf.has_remaining());
    usize::try_from(len)
        .map(Some)
        .map_err(|_| FrameError::BadLength)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{agent_message, AgentMessage, Pull};

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let msg = AgentMessage {
            msg: Some(agent_message::Msg::Pull(Pull { free_slots: 3 })),
        };
        let writer = tokio::spawn(async move {
            for _ in 0..100 {
                write_frame(&mut a, &msg).await.unwrap();
            }
        });
        for _ in 0..100 {
            let got: AgentMessage = read_frame(&mut b).await.unwrap().unwrap();
            assert!(matches!(
                got.msg,
                Some(agent_message::Msg::Pull(Pull { free_slots: 3 }))
            ));
        }
        writer.await.unwrap();
        let end: Option<AgentMessage> = read_frame(&mut b).await.unwrap();
        assert!(end.is_none());
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_without_allocating() {
        let mut buf = Vec::new();
        prost::encoding::encode_varint((MAX_FRAME_BYTES + 1) as u64, &mut buf);
        let mut reader = &buf[..];
        let err = read_frame::<_, AgentMessage>(&mut reader)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_)), "{err}");
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let msg = Pull { free_slots: 7 };
        let mut buf = msg.encode_length_delimited_to_vec();
        buf.pop();
        let mut reader = &buf[..];
        let err = read_frame::<_, Pull>(&mut reader).await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
    }
}
