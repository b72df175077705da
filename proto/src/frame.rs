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

/// Largest message an agent sends on its control stream: a hello naming
/// the attempts it runs, a certificate request. Far below
/// [`MAX_FRAME_BYTES`], which only the coordinator's job assignments need.
pub const MAX_AGENT_MESSAGE_BYTES: usize = 1024 * 1024;

/// Largest header of an output stream (an attempt and an offset).
pub const MAX_OUTPUT_HEADER_BYTES: usize = 4 * 1024;

/// Errors reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream i/o failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is larger than the {1} byte limit")]
    TooLarge(usize, usize),
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
/// Not cancel-safe: dropped half-way (a `select!` branch that lost), it
/// loses the bytes it took and the stream is out of step. Where a read
/// races other events, use a [`FrameReader`].
///
/// # Errors
/// Fails on I/O errors, a frame over the size limit, a stream that ends
/// mid-frame, or bytes that do not decode as `M`.
pub async fn read_frame<R, M>(reader: &mut R) -> Result<Option<M>, FrameError>
where
    R: AsyncRead + Unpin,
    M: Message + Default,
{
    read_frame_limited(reader, MAX_FRAME_BYTES).await
}

/// [`read_frame`] refusing frames longer than `limit` bytes (before
/// reading or allocating them).
///
/// # Errors
/// As [`read_frame`].
pub async fn read_frame_limited<R, M>(reader: &mut R, limit: usize) -> Result<Option<M>, FrameError>
where
    R: AsyncRead + Unpin,
    M: Message + Default,
{
    let Some(len) = read_varint(reader).await? else {
        return Ok(None);
    };
    if len > limit {
        return Err(FrameError::TooLarge(len, limit));
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

/// Reads length-delimited frames from a stream, cancel-safe: a read that is
/// dropped half-way (a `select!` branch that lost) loses nothing, because
/// the bytes it took stay in the reader for the next call. It also takes
/// whatever has arrived in one read instead of a byte at a time.
#[derive(Debug)]
pub struct FrameReader<R> {
    reader: R,
    buf: BytesMut,
    /// Longest frame accepted.
    limit: usize,
}

/// Room made for each read when no frame length asks for more.
const READ_AHEAD: usize = 4096;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R) -> Self {
        Self::with_limit(reader, MAX_FRAME_BYTES)
    }

    /// A reader refusing frames longer than `limit` bytes (at most
    /// [`MAX_FRAME_BYTES`]).
    pub fn with_limit(reader: R, limit: usize) -> Self {
        Self {
            reader,
            buf: BytesMut::new(),
            limit: limit.min(MAX_FRAME_BYTES),
        }
    }

    /// The next frame; `Ok(None)` when the stream ended cleanly between
    /// frames. Cancel-safe.
    ///
    /// # Errors
    /// As [`read_frame`]; after an error the stream is unusable.
    pub async fn next<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        loop {
            let wanted = match frame_prefix(&self.buf, self.limit)? {
                Some((prefix, len)) if self.buf.len() >= prefix + len => {
                    self.buf.advance(prefix);
                    let body = self.buf.split_to(len).freeze();
                    return M::decode(body)
                        .map(Some)
                        .map_err(|source| FrameError::Decode {
                            kind: std::any::type_name::<M>(),
                            source,
                        });
                }
                Some((prefix, len)) => prefix + len - self.buf.len(),
                None => READ_AHEAD,
            };
            self.buf.reserve(wanted.max(READ_AHEAD));
            // Cancel-safe: no byte is taken unless this completes.
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }
}

/// The length prefix at the start of `buf`: its own size and the frame's
/// length, or `None` if it has not all arrived.
fn frame_prefix(buf: &[u8], limit: usize) -> Result<Option<(usize, usize)>, FrameError> {
    let mut len: u64 = 0;
    for (i, &byte) in buf.iter().enumerate().take(10) {
        if i == 9 && byte > 1 {
            return Err(FrameError::BadLength);
        }
        len |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let len = usize::try_from(len).map_err(|_| FrameError::BadLength)?;
            if len > limit {
                return Err(FrameError::TooLarge(len, limit));
            }
            return Ok(Some((i + 1, len)));
        }
    }
    if buf.len() >= 10 {
        Err(FrameError::BadLength)
    } else {
        Ok(None)
    }
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
        assert!(matches!(err, FrameError::TooLarge(..)), "{err}");
    }

    #[tokio::test]
    async fn a_reader_with_a_lower_limit_refuses_what_exceeds_it_unread() {
        let big = Pull { free_slots: 1 }.encode_length_delimited_to_vec();
        let mut reader = &big[..];
        let err = read_frame_limited::<_, Pull>(&mut reader, 1)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(2, 1)), "{err}");
        let mut prefix = Vec::new();
        prost::encoding::encode_varint((MAX_AGENT_MESSAGE_BYTES + 1) as u64, &mut prefix);
        let err = FrameReader::with_limit(&prefix[..], MAX_AGENT_MESSAGE_BYTES)
            .next::<Pull>()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("byte limit"), "{err}");
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

    #[tokio::test]
    async fn a_frame_reader_loses_nothing_when_a_read_is_dropped_half_way() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut frames = FrameReader::new(b);
        let big = AgentMessage {
            msg: Some(agent_message::Msg::Hello(crate::agent::Hello {
                agent_name: "x".repeat(20_000),
                ..Default::default()
            })),
        };
        let small = Pull { free_slots: 7 };
        let mut bytes = big.encode_length_delimited_to_vec();
        let second = Pull { free_slots: 9 }.encode_length_delimited_to_vec();
        for cut in [1, 2, 3, 10_000] {
            // Part of a frame arrives, the read is dropped (another branch
            // won), the rest arrives: the frame still comes out whole.
            let (first, rest) = bytes.split_at(cut);
            a.write_all(first).await.unwrap();
            tokio::select! {
                biased;
                frame = frames.next::<AgentMessage>() => panic!("a partial frame came out: {frame:?}"),
                () = std::future::ready(()) => {}
            }
            a.write_all(rest).await.unwrap();
            let got: AgentMessage = frames.next().await.unwrap().unwrap();
            assert_eq!(got, big);
        }
        // Two frames in one read come out one by one.
        bytes = small.encode_length_delimited_to_vec();
        bytes.extend_from_slice(&second);
        a.write_all(&bytes).await.unwrap();
        drop(a);
        assert_eq!(frames.next::<Pull>().await.unwrap(), Some(small));
        assert_eq!(frames.next::<Pull>().await.unwrap().unwrap().free_slots, 9);
        assert_eq!(frames.next::<Pull>().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_frame_reader_refuses_what_read_frame_refuses() {
        let mut huge = Vec::new();
        prost::encoding::encode_varint((MAX_FRAME_BYTES + 1) as u64, &mut huge);
        let err = FrameReader::new(&huge[..])
            .next::<Pull>()
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(..)), "{err}");
        let mut cut = Pull { free_slots: 7 }.encode_length_delimited_to_vec();
        cut.pop();
        let err = FrameReader::new(&cut[..]).next::<Pull>().await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
        let err = FrameReader::new(&[0xffu8; 11][..])
            .next::<Pull>()
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::BadLength), "{err}");
    }
}
