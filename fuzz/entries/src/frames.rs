//! Control-protocol frame decoding: the QUIC stream's length-delimited
//! protobuf ([`FrameDecoder`]) and the WebSocket's proto3 JSON
//! ([`decode_json`]).

use bytes::BytesMut;
use fleetcall_signaling::pb::ClientFrame;
use fleetcall_signaling::wire::{FrameDecoder, MAX_FRAME_BYTES, decode_json, encode_frame_to_vec, encode_json};

/// What one `decode` call gave, comparable.
#[derive(Debug, PartialEq)]
enum Step {
    Frame(ClientFrame),
    Malformed,
    Fatal(String),
}

/// A byte stream as the QUIC reader sees it. The first byte sets how the
/// rest arrives (chunks of 1..=256 bytes, as `read_buf` may hand them over);
/// the frames decoded must not depend on the chunking, a fatal error must
/// stick, and every decoded frame must survive re-encoding in both codecs.
pub fn protobuf(data: &[u8]) {
    let Some((&chunk, stream)) = data.split_first() else { return };
    let chunk = usize::from(chunk) + 1;

    let whole = decode_all(stream, stream.len().max(1));
    let chunked = decode_all(stream, chunk);
    assert_eq!(whole, chunked, "the frames decoded depend on how the bytes arrived");
    for step in &whole {
        if let Step::Frame(frame) = step {
            round_trip(frame);
        }
    }
}

fn decode_all(stream: &[u8], chunk: usize) -> Vec<Step> {
    let mut decoder = FrameDecoder::new();
    let mut buf = BytesMut::new();
    let mut steps = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match decoder.decode::<ClientFrame>(&mut buf) {
                Ok(Some(frame)) => steps.push(Step::Frame(frame)),
                Ok(None) => break,
                Err(e) if e.is_fatal() => {
                    // Poisoned for good: the reader closes the connection.
                    let again = decoder.decode::<ClientFrame>(&mut BytesMut::from(&[0u8][..]));
                    assert!(again.is_err_and(|e| e.is_fatal()), "a fatal decoder error did not stick");
                    steps.push(Step::Fatal(e.to_string()));
                    return steps;
                }
                Err(_) => steps.push(Step::Malformed),
            }
            assert!(buf.len() < before, "decode made progress without consuming bytes");
        }
        // Ok(None) never sits on a whole frame's worth of buffered bytes
        // (prefix included) without having taken it.
        assert!(buf.len() <= MAX_FRAME_BYTES + 10, "decoder buffers past the frame limit");
    }
    steps
}

/// A decoded frame re-encodes to the same frame in protobuf and in JSON.
fn round_trip(frame: &ClientFrame) {
    let bytes = encode_frame_to_vec(frame).expect("a decoded frame fits the limit again");
    let back: ClientFrame = FrameDecoder::new()
        .decode(&mut BytesMut::from(&bytes[..]))
        .expect("a re-encoded frame decodes")
        .expect("a re-encoded frame is complete");
    assert_eq!(&back, frame, "protobuf round trip changed the frame");
    if let Ok(text) = encode_json(frame) {
        let back: ClientFrame = decode_json(&text).expect("our own JSON decodes");
        assert_eq!(&back, frame, "JSON round trip changed the frame: {text}");
    }
}

/// One WebSocket text message. Non-UTF-8 input is what tungstenite refuses
/// before we see it; it is skipped.
pub fn json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match decode_json::<ClientFrame>(text) {
        Ok(frame) => round_trip(&frame),
        Err(e) => {
            // Every refusal maps to a protocol error code, never a panic.
            let _ = (e.error_code(), e.close_reason(), e.is_fatal());
        }
    }
}
