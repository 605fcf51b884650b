//! Framing for the QUIC control stream and the JSON form for WebSocket.
//!
//! On QUIC every frame is a protobuf message prefixed by its length as a
//! protobuf varint: the standard "length-delimited" format that protobuf
//! libraries in other languages read and write (`parseDelimitedFrom`,
//! `writeDelimitedTo`). A frame body is at most [`MAX_FRAME_BYTES`].
//!
//! [`FrameDecoder`] is sans-IO: the caller owns the buffer, appends whatever
//! bytes arrived, and pulls complete frames until it gets `Ok(None)`.
//!
//! On WebSocket every text message is one frame in the canonical proto3 JSON
//! mapping ([`decode_json`], [`encode_json`]).
//!
//! Unknown fields are skipped by both decoders. An unknown `oneof kind`
//! decodes to `kind: None`; the controller answers it with an
//! `UNKNOWN_MESSAGE` error and keeps the connection.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use serde::{Serialize, de::DeserializeOwned};

use crate::Error;

/// Largest frame body in bytes, on both transports.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

/// Longest varint: 10 bytes carry 64 bits.
const MAX_VARINT_BYTES: usize = 10;

/// Appends `msg` to `dst` as one length-delimited frame.
pub fn encode_frame<M: Message>(msg: &M, dst: &mut BytesMut) -> Result<(), Error> {
    let len = msg.encoded_len();
    if len > MAX_FRAME_BYTES {
        return Err(Error::MessageTooLarge {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    dst.reserve(len + prost::length_delimiter_len(len));
    // Cannot fail: capacity was reserved above.
    msg.encode_length_delimited(dst)
        .map_err(|_| Error::MessageTooLarge {
            len,
            max: MAX_FRAME_BYTES,
        })
}

/// [`encode_frame`] into a fresh vector.
pub fn encode_frame_to_vec<M: Message>(msg: &M) -> Result<Vec<u8>, Error> {
    let mut buf = BytesMut::new();
    encode_frame(msg, &mut buf)?;
    Ok(buf.to_vec())
}

/// Incremental decoder of length-delimited frames.
///
/// After a fatal error (see [`Error::is_fatal`]) the stream cannot be
/// resynchronised; the decoder keeps returning that error.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame: usize,
    failed: Option<Fatal>,
}

#[derive(Debug, Clone, Copy)]
enum Fatal {
    TooLarge(u64),
    BadPrefix,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder with the protocol's limit, [`MAX_FRAME_BYTES`].
    pub fn new() -> Self {
        Self::with_max_frame(MAX_FRAME_BYTES)
    }

    /// A decoder with another limit (tests, tools).
    pub fn with_max_frame(max_frame: usize) -> Self {
        FrameDecoder {
            max_frame,
            failed: None,
        }
    }

    /// Takes the next complete frame off the front of `src`.
    ///
    /// `Ok(None)`: more bytes are needed. `Err` with a non-fatal error: one
    /// frame was consumed and was not a valid message; call again for the next.
    pub fn decode<M: Message + Default>(&mut self, src: &mut BytesMut) -> Result<Option<M>, Error> {
        if let Some(fatal) = self.failed {
            return Err(self.fatal_error(fatal));
        }
        let (len, prefix_len) = match self.read_prefix(src) {
            Ok(Some(v)) => v,
            Ok(None) => return Ok(None),
            Err(fatal) => {
                self.failed = Some(fatal);
                return Err(self.fatal_error(fatal));
            }
        };
        // `read_prefix` checked len <= max_frame, so it fits in usize.
        let len = len as usize;
        if src.len() < prefix_len + len {
            src.reserve(prefix_len + len - src.len());
            return Ok(None);
        }
        src.advance(prefix_len);
        let body = src.split_to(len);
        M::decode(body.freeze()).map(Some).map_err(Error::from)
    }

    /// Parses the varint prefix without consuming it: `(body length, prefix length)`.
    fn read_prefix(&self, src: &[u8]) -> Result<Option<(u64, usize)>, Fatal> {
        let mut value: u64 = 0;
        for (i, &byte) in src.iter().take(MAX_VARINT_BYTES).enumerate() {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if value > self.max_frame as u64 {
                // More prefix bytes can only make it larger.
                return Err(Fatal::TooLarge(value));
            }
            if byte & 0x80 == 0 {
                return Ok(Some((value, i + 1)));
            }
        }
        if src.len() >= MAX_VARINT_BYTES {
            return Err(Fatal::BadPrefix);
        }
        Ok(None)
    }

    fn fatal_error(&self, fatal: Fatal) -> Error {
        match fatal {
            Fatal::TooLarge(len) => Error::FrameTooLarge {
                len,
                max: self.max_frame,
            },
            Fatal::BadPrefix => Error::BadLengthPrefix,
        }
    }
}

/// Decodes one WebSocket text frame (canonical proto3 JSON; unknown fields
/// ignored, an unknown kind gives `kind: None`).
pub fn decode_json<M: DeserializeOwned>(text: &str) -> Result<M, Error> {
    if text.len() > MAX_FRAME_BYTES {
        return Err(Error::FrameTooLarge {
            len: text.len() as u64,
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(serde_json::from_str(text)?)
}

/// Encodes one frame as a WebSocket text frame.
pub fn encode_json<M: Serialize>(msg: &M) -> Result<String, Error> {
    let text = serde_json::to_string(msg)?;
    if text.len() > MAX_FRAME_BYTES {
        return Err(Error::MessageTooLarge {
            len: text.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(text)
}

/// Writes a varint; used by tests and tools that build raw frames.
pub fn put_varint(dst: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        dst.put_u8((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    dst.put_u8(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{self, client_frame::Kind};

    fn hello() -> pb::ClientFrame {
        pb::ClientFrame {
            op_id: 0,
            kind: Some(Kind::Hello(pb::Hello {
                min_version: 1,
                max_version: 1,
                software_version: "fw 1.2".into(),
                resume: None,
            })),
        }
    }

    #[test]
    fn frames_decode_one_byte_at_a_time() {
        let mut wire = BytesMut::new();
        encode_frame(&hello(), &mut wire).unwrap();
        let invite = pb::ClientFrame {
            op_id: 7,
            kind: Some(Kind::Invite(pb::Invite {
                callee: "b".repeat(300),
            })),
        };
        encode_frame(&invite, &mut wire).unwrap();

        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in wire.iter() {
            buf.put_u8(*byte);
            while let Some(frame) = dec.decode::<pb::ClientFrame>(&mut buf).unwrap() {
                got.push(frame);
            }
        }
        assert_eq!(got, vec![hello(), invite]);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversize_prefix_is_fatal_before_the_body_arrives() {
        let mut buf = BytesMut::new();
        put_varint(&mut buf, (MAX_FRAME_BYTES + 1) as u64);
        let mut dec = FrameDecoder::new();
        let err = dec.decode::<pb::ClientFrame>(&mut buf).unwrap_err();
        assert!(
            matches!(err, Error::FrameTooLarge { len, .. } if len == MAX_FRAME_BYTES as u64 + 1)
        );
        assert!(err.is_fatal());
        // Poisoned: the stream cannot be trusted any more.
        let mut more = BytesMut::from(&encode_frame_to_vec(&hello()).unwrap()[..]);
        assert!(
            dec.decode::<pb::ClientFrame>(&mut more)
                .unwrap_err()
                .is_fatal()
        );
    }

    #[test]
    fn a_prefix_announcing_4_gib_is_refused_with_nothing_reserved() {
        // 2^32, and no body at all: refused on the prefix alone.
        let mut buf = BytesMut::new();
        put_varint(&mut buf, 1 << 32);
        let capacity = buf.capacity();
        let err = FrameDecoder::new().decode::<pb::ClientFrame>(&mut buf).unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { .. }), "{err}");
        assert!(buf.capacity() <= capacity.max(MAX_FRAME_BYTES), "no room reserved for the announced body");
        // Refused as soon as the prefix passes the limit, before it ends.
        let mut partial = BytesMut::from(&[0xff, 0xff, 0xff][..]);
        assert!(FrameDecoder::new().decode::<pb::ClientFrame>(&mut partial).unwrap_err().is_fatal());
    }

    #[test]
    fn frame_of_exactly_the_limit_is_accepted() {
        let mut buf = BytesMut::new();
        // A frame of MAX bytes: field 1 (op_id) varint 1, then padding as an
        // unknown bytes field 15 that prost skips.
        let pad = MAX_FRAME_BYTES - 2 - 1 - 3;
        let mut body = BytesMut::new();
        body.put_u8(0x08);
        body.put_u8(0x01);
        body.put_u8((15 << 3) | 2);
        put_varint(&mut body, pad as u64);
        body.put_bytes(0xaa, pad);
        assert_eq!(body.len(), MAX_FRAME_BYTES);
        put_varint(&mut buf, body.len() as u64);
        buf.extend_from_slice(&body);
        let frame: pb::ClientFrame = FrameDecoder::new().decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame.op_id, 1);
        assert_eq!(frame.kind, None);
    }

    #[test]
    fn garbage_body_is_not_fatal_and_the_stream_stays_in_sync() {
        let mut buf = BytesMut::new();
        put_varint(&mut buf, 3);
        buf.extend_from_slice(&[0xff, 0xff, 0xff]);
        encode_frame(&hello(), &mut buf).unwrap();
        let mut dec = FrameDecoder::new();
        let err = dec.decode::<pb::ClientFrame>(&mut buf).unwrap_err();
        assert!(matches!(err, Error::Malformed(_)), "{err:?}");
        assert!(!err.is_fatal());
        assert_eq!(
            dec.decode::<pb::ClientFrame>(&mut buf).unwrap(),
            Some(hello())
        );
    }

    #[test]
    fn overlong_varint_is_fatal() {
        let mut dec = FrameDecoder::with_max_frame(usize::MAX);
        let mut buf = BytesMut::from(&[0x80u8; 11][..]);
        assert!(matches!(
            dec.decode::<pb::ClientFrame>(&mut buf),
            Err(Error::BadLengthPrefix)
        ));
    }

    #[test]
    fn unknown_kind_decodes_to_none_in_binary_and_json() {
        // op_id = 5, then field 63 (tag 0xfa 0x03, length-delimited, empty):
        // a kind from a future version.
        let mut fixed = BytesMut::new();
        put_varint(&mut fixed, 5);
        fixed.extend_from_slice(&[0x08, 0x05, 0xfa, 0x03, 0x00]);
        let frame: pb::ClientFrame = FrameDecoder::new().decode(&mut fixed).unwrap().unwrap();
        assert_eq!(
            frame,
            pb::ClientFrame {
                op_id: 5,
                kind: None
            }
        );

        let json = r#"{"opId":"5","teleport":{"to":"mars"},"extra":1}"#;
        let frame: pb::ClientFrame = decode_json(json).unwrap();
        assert_eq!(
            frame,
            pb::ClientFrame {
                op_id: 5,
                kind: None
            }
        );
    }

    #[test]
    fn json_uses_the_canonical_proto3_mapping() {
        let frame = pb::ServerFrame {
            reply_to: 0,
            seq: 0,
            kind: Some(pb::server_frame::Kind::CallEnded(pb::CallEnded {
                call_id: u64::MAX,
                reason: pb::EndReason::RingTimeout as i32,
                by: String::new(),
                detail: String::new(),
            })),
        };
        let text = encode_json(&frame).unwrap();
        assert_eq!(
            text,
            r#"{"callEnded":{"callId":"18446744073709551615","reason":"END_REASON_RING_TIMEOUT"}}"#
        );
        assert_eq!(decode_json::<pb::ServerFrame>(&text).unwrap(), frame);

        let hello_json = r#"{"hello":{"minVersion":1,"maxVersion":1,"softwareVersion":"web"}}"#;
        let frame: pb::ClientFrame = decode_json(hello_json).unwrap();
        assert!(matches!(frame.kind, Some(Kind::Hello(ref h)) if h.max_version == 1));
    }

    #[test]
    fn json_garbage_and_oversize_are_errors() {
        assert!(matches!(
            decode_json::<pb::ClientFrame>("{not json"),
            Err(Error::MalformedJson(_))
        ));
        let big = format!(
            r#"{{"invite":{{"callee":"{}"}}}}"#,
            "x".repeat(MAX_FRAME_BYTES)
        );
        let err = decode_json::<pb::ClientFrame>(&big).unwrap_err();
        assert!(err.is_fatal());
    }

    #[test]
    fn encoding_refuses_oversize_messages() {
        let frame = pb::ServerFrame {
            reply_to: 0,
            seq: 0,
            kind: Some(pb::server_frame::Kind::SdpOffer(pb::SdpOffer {
                sdp: "v".repeat(MAX_FRAME_BYTES),
                ..Default::default()
            })),
        };
        assert!(matches!(
            encode_frame_to_vec(&frame),
            Err(Error::MessageTooLarge { .. })
        ));
    }
}
