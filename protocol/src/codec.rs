//! Length-prefixed postcard frames.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of
//! postcard. Every decoder checks the length against a limit before it
//! allocates, so a peer cannot make us buffer more than `max` bytes.

use serde::{de::DeserializeOwned, Serialize};

/// Largest signaling frame either side accepts.
pub const MAX_FRAME: usize = 64 * 1024;

/// Errors from encoding or decoding a frame.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The declared or actual frame length exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    /// The bytes are not a valid message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
    /// The frame had bytes left over after the message.
    #[error("malformed frame: {0} trailing bytes")]
    Trailing(usize),
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let body = postcard::to_stdvec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(CodecError::TooLarge {
            len: body.len(),
            max: MAX_FRAME,
        });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks a frame length prefix against the limit.
pub fn check_len(prefix: [u8; 4], max: usize) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(CodecError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a frame body (without the length prefix); the whole body must be
/// consumed.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    if body.len() > MAX_FRAME {
        return Err(CodecError::TooLarge {
            len: body.len(),
            max: MAX_FRAME,
        });
    }
    let (msg, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(CodecError::Trailing(rest.len()));
    }
    Ok(msg)
}

/// Incremental decoder for a byte stream carrying frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// Appends received bytes. Fails if the buffered data already declares a
    /// frame larger than [`MAX_FRAME`].
    pub fn push(&mut self, data: &[u8]) -> Result<(), CodecError> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 4 {
            check_len(self.buf[..4].try_into().expect("4 bytes"), MAX_FRAME)?;
        }
        Ok(())
    }

    /// Returns the next complete message, if one is buffered.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, CodecError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = check_len(self.buf[..4].try_into().expect("4 bytes"), MAX_FRAME)?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = decode_body(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::{ClientMsg, ServerMsg};
    use proptest::prelude::*;

    #[test]
    fn roundtrip_through_decoder_in_pieces() {
        let msg = ClientMsg::Connect {
            req: 7,
            target: "worker-b".into(),
        };
        let frame = encode_frame(&msg).unwrap();
        let mut dec = FrameDecoder::default();
        for b in &frame {
            assert!(dec.next_frame::<ClientMsg>().unwrap().is_none());
            dec.push(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(dec.next_frame::<ClientMsg>().unwrap(), Some(msg));
    }

    #[test]
    fn oversized_prefix_is_refused_before_buffering() {
        let mut dec = FrameDecoder::default();
        let err = dec.push(&u32::MAX.to_be_bytes()).unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { .. }));
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut body = postcard::to_stdvec(&ServerMsg::Pong { req: 1 }).unwrap();
        body.push(0);
        assert!(matches!(
            decode_body::<ServerMsg>(&body),
            Err(CodecError::Trailing(1))
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_to_ok_or_err(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_body::<ClientMsg>(&data);
            let _ = decode_body::<ServerMsg>(&data);
            let mut dec = FrameDecoder::default();
            if dec.push(&data).is_ok() {
                let _ = dec.next_frame::<ClientMsg>();
            }
        }
    }
}
