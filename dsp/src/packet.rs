//! Opus packet inspection without decoding (RFC 6716 section 3).
//!
//! The pipeline must know a packet's duration before it decodes it: a packet that
//! fails to decode is still concealed for exactly that duration, so the output
//! stream keeps its RTP timing. This module reads the table-of-contents (TOC) byte
//! and the frame count; the decoder validates the rest.

use crate::SAMPLE_RATE;

/// Samples per channel in the longest Opus packet (120 ms at 48 kHz).
pub const MAX_PACKET_SAMPLES: usize = SAMPLE_RATE as usize * 120 / 1000;

/// Largest payload accepted: six frames of the per-frame maximum (1275 bytes, RFC
/// 6716 section 3.2.1) plus framing. Real RTP payloads are far smaller; anything
/// larger is hostile or broken and is concealed without being parsed further.
pub const MAX_PACKET_BYTES: usize = 1275 * 6 + 7;

/// Payloads of at most this many bytes carry no coded audio: a TOC byte and at
/// most a frame count. Encoders send them during discontinuous transmission (DTX).
pub const DTX_MAX_BYTES: usize = 2;

/// The coding mode a packet's TOC byte announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// SILK only (speech codec, up to wideband).
    Silk,
    /// SILK for the low band plus CELT above 8 kHz.
    Hybrid,
    /// CELT only (transform codec).
    Celt,
}

/// Audio bandwidth a packet codes (RFC 6716 section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bandwidth {
    /// 4 kHz.
    Narrow,
    /// 6 kHz.
    Medium,
    /// 8 kHz.
    Wide,
    /// 12 kHz.
    SuperWide,
    /// 20 kHz.
    Full,
}

/// What the TOC byte and frame count say about a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// Coding mode of every frame in the packet.
    pub mode: Mode,
    /// Coded audio bandwidth.
    pub bandwidth: Bandwidth,
    /// Samples per channel in one frame, at 48 kHz.
    pub frame_samples: usize,
    /// Frames in the packet (1..=48).
    pub frames: usize,
    /// The stereo flag of the TOC byte.
    pub stereo: bool,
    /// The payload carries no coded audio (DTX or an empty frame).
    pub dtx: bool,
}

impl PacketInfo {
    /// Samples per channel the packet covers: its RTP timestamp increment.
    pub fn samples(&self) -> usize {
        self.frame_samples * self.frames
    }
}

/// Why a payload cannot be an Opus packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketError {
    /// Zero bytes.
    Empty,
    /// More than [`MAX_PACKET_BYTES`].
    Oversize,
    /// The framing (RFC 6716 section 3.2) is inconsistent.
    Malformed,
}

/// Reads the TOC byte and frame count of `payload`.
pub fn inspect(payload: &[u8]) -> Result<PacketInfo, PacketError> {
    let Some(&toc) = payload.first() else {
        return Err(PacketError::Empty);
    };
    if payload.len() > MAX_PACKET_BYTES {
        return Err(PacketError::Oversize);
    }
    let config = toc >> 3;
    let (mode, frame_tenths_ms) = match config {
        0..=11 => (Mode::Silk, [100, 200, 400, 600][usize::from(config % 4)]),
        12..=15 => (Mode::Hybrid, [100, 200][usize::from(config % 2)]),
        _ => (Mode::Celt, [25, 50, 100, 200][usize::from(config % 4)]),
    };
    let bandwidth = match config {
        0..=3 | 16..=19 => Bandwidth::Narrow,
        4..=7 => Bandwidth::Medium,
        8..=11 | 20..=23 => Bandwidth::Wide,
        12..=13 | 24..=27 => Bandwidth::SuperWide,
        _ => Bandwidth::Full,
    };
    let frame_samples = SAMPLE_RATE as usize * frame_tenths_ms / 10_000;
    let frames = match toc & 0b11 {
        0 => 1,
        // Two frames of equal size: the remaining bytes must split evenly.
        1 if (payload.len() - 1).is_multiple_of(2) => 2,
        1 => return Err(PacketError::Malformed),
        // Two frames, the first one's length coded in one or two bytes; it
        // must fit in what follows (a DTX-sized packet is passed on without
        // decoding, so this is the only check it gets).
        2 => match frame_length(&payload[1..]) {
            Some((len, header)) if 1 + header + len <= payload.len() => 2,
            _ => return Err(PacketError::Malformed),
        },
        // An explicit frame count in the second byte; padding needs its
        // length byte, VBR the lengths of all frames but the last.
        _ => match payload.get(1) {
            Some(&count) if count & 0x3f != 0 => {
                let frames = usize::from(count & 0x3f);
                let vbr_lengths = if count & 0x80 != 0 { frames - 1 } else { 0 };
                if payload.len() < 2 + usize::from(count & 0x40 != 0) + vbr_lengths {
                    return Err(PacketError::Malformed);
                }
                frames
            }
            _ => return Err(PacketError::Malformed),
        },
    };
    if frames * frame_samples > MAX_PACKET_SAMPLES {
        return Err(PacketError::Malformed);
    }
    Ok(PacketInfo {
        mode,
        bandwidth,
        frame_samples,
        frames,
        stereo: toc & 0b100 != 0,
        dtx: payload.len() <= DTX_MAX_BYTES,
    })
}

/// Whether the first frame of a SILK or hybrid packet carries low-bit-rate
/// redundancy (in-band FEC) for the packet before it.
///
/// The SILK header starts with one voice-activity bit per 20 ms SILK frame and then
/// the LBRR flag, each coded with probability one half, so they are the leading
/// bits of the first frame's range-coded data (RFC 6716 section 4.2.3). For stereo
/// the side channel's flags follow the mid channel's.
pub fn has_fec(payload: &[u8], info: &PacketInfo) -> bool {
    if info.mode == Mode::Celt || info.dtx {
        return false;
    }
    let Some(&first) = first_frame(payload).and_then(|frame| frame.first()) else {
        return false;
    };
    let silk_frames = (info.frame_samples / (SAMPLE_RATE as usize / 50)).max(1) as u32;
    let mid = (first >> (7 - silk_frames)) & 1 == 1;
    let side = info.stereo && (first >> (6 - 2 * silk_frames)) & 1 == 1;
    mid || side
}

/// The bytes of the first frame, when the framing can be followed.
fn first_frame(payload: &[u8]) -> Option<&[u8]> {
    match payload.first()? & 0b11 {
        0 | 1 => payload.get(1..),
        2 => {
            let (len, header) = frame_length(payload.get(1..)?)?;
            payload.get(1 + header..1 + header + len)
        }
        _ => {
            let count = *payload.get(1)?;
            let mut at = 2;
            if count & 0x40 != 0 {
                // Padding length: each 255 adds 254 and continues.
                loop {
                    let byte = *payload.get(at)?;
                    at += 1;
                    if byte != 255 {
                        break;
                    }
                }
            }
            if count & 0x80 != 0 {
                let (len, header) = frame_length(payload.get(at..)?)?;
                payload.get(at + header..at + header + len)
            } else {
                payload.get(at..)
            }
        }
    }
}

/// A frame length coded in one or two bytes (RFC 6716 section 3.2.1).
fn frame_length(bytes: &[u8]) -> Option<(usize, usize)> {
    let first = usize::from(*bytes.first()?);
    if first < 252 {
        Some((first, 1))
    } else {
        Some((first + 4 * usize::from(*bytes.get(1)?), 2))
    }
}

/// Writes a DTX packet covering the same duration as `dtx_input` into `out`,
/// with the stereo flag of the output stream. Decoders treat the empty frames
/// as discontinuous transmission and play comfort noise or silence.
pub fn write_dtx(dtx_input: &[u8], stereo: bool, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(dtx_input);
    if let Some(toc) = out.first_mut() {
        *toc = (*toc & !0b100) | (u8::from(stereo) << 2);
    }
}

/// Writes a packet of `samples` per channel whose frames are all empty: the
/// receiver conceals it. Used when this stream cannot be re-encoded (a duration
/// the encoder does not take, or an encoder failure) so RTP timing still holds.
pub fn write_empty(samples: usize, stereo: bool, out: &mut Vec<u8>) {
    out.clear();
    // CELT fullband configurations 28..=31 cover 2.5, 5, 10 and 20 ms frames.
    let (config, frame) = [(31u8, 960), (30, 480), (29, 240), (28, 120)]
        .into_iter()
        .find(|&(_, frame)| samples.is_multiple_of(frame))
        .unwrap_or((28, 120));
    let frames = (samples / frame).clamp(1, 48) as u8;
    let toc = (config << 3) | (u8::from(stereo) << 2);
    if frames == 1 {
        out.push(toc);
    } else {
        // Code 3, constant bit rate, no padding: zero bytes split into empty frames.
        out.extend_from_slice(&[toc | 0b11, frames]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_durations_of_each_mode() {
        // SILK WB 20 ms, hybrid FB 10 ms, CELT FB 2.5 ms.
        let silk = inspect(&[(9 << 3), 0xaa, 0xbb]).unwrap();
        assert_eq!(
            (silk.mode, silk.samples(), silk.stereo),
            (Mode::Silk, 960, false)
        );
        let hybrid = inspect(&[(14 << 3) | 0b100, 1, 2]).unwrap();
        assert_eq!(
            (hybrid.mode, hybrid.samples(), hybrid.stereo),
            (Mode::Hybrid, 480, true)
        );
        let celt = inspect(&[(28 << 3), 1, 2]).unwrap();
        assert_eq!((celt.mode, celt.samples()), (Mode::Celt, 120));
        assert_eq!(
            (silk.bandwidth, hybrid.bandwidth, celt.bandwidth),
            (Bandwidth::Wide, Bandwidth::Full, Bandwidth::Full)
        );
    }

    #[test]
    fn counts_frames_and_rejects_bad_framing() {
        // Code 1 needs an even number of bytes after the TOC.
        assert_eq!(inspect(&[(9 << 3) | 1, 1, 2]).unwrap().samples(), 1920);
        assert_eq!(inspect(&[(9 << 3) | 1, 1]), Err(PacketError::Malformed));
        // Code 3 with three 20 ms frames, and with a zero count.
        assert_eq!(inspect(&[(9 << 3) | 3, 3, 0]).unwrap().samples(), 2880);
        assert_eq!(inspect(&[(9 << 3) | 3, 0]), Err(PacketError::Malformed));
        // 7 x 20 ms is longer than the 120 ms an Opus packet may last.
        assert_eq!(inspect(&[(9 << 3) | 3, 7]), Err(PacketError::Malformed));
        assert_eq!(inspect(&[]), Err(PacketError::Empty));
        assert_eq!(
            inspect(&vec![8; MAX_PACKET_BYTES + 1]),
            Err(PacketError::Oversize)
        );
    }

    #[test]
    fn framing_that_overruns_the_packet_is_malformed() {
        // Found by fuzzing (fuzz/corpus/opus/crash-dtx-code2-overrun): code
        // 2 announcing a 1-byte first frame with no bytes left was taken for
        // DTX and passed on, an output libopus refuses.
        assert_eq!(inspect(&[0xee, 0x01]), Err(PacketError::Malformed));
        assert_eq!(inspect(&[(9 << 3) | 2]), Err(PacketError::Malformed));
        assert_eq!(inspect(&[(9 << 3) | 2, 252]), Err(PacketError::Malformed));
        assert!(inspect(&[0xee, 0x00]).unwrap().dtx, "two empty frames");
        assert_eq!(inspect(&[(9 << 3) | 2, 1, 7, 8]).unwrap().frames, 2);
        // Code 3: padding without its length byte, VBR without lengths.
        assert_eq!(inspect(&[(9 << 3) | 3, 0x41]), Err(PacketError::Malformed));
        assert_eq!(inspect(&[(9 << 3) | 3, 0x82]), Err(PacketError::Malformed));
        assert!(inspect(&[(9 << 3) | 3, 0x81]).unwrap().dtx, "one VBR frame needs no length");
    }

    #[test]
    fn short_payloads_are_dtx() {
        assert!(inspect(&[9 << 3]).unwrap().dtx);
        assert!(inspect(&[(9 << 3) | 3, 3]).unwrap().dtx);
        assert!(!inspect(&[9 << 3, 0, 0]).unwrap().dtx);
    }

    #[test]
    fn empty_packets_keep_the_duration() {
        let mut out = Vec::new();
        for samples in [120, 480, 960, 1920, 2880, 5760] {
            write_empty(samples, true, &mut out);
            let info = inspect(&out).unwrap();
            assert_eq!(info.samples(), samples);
            assert!(info.stereo && info.dtx);
        }
    }

    #[test]
    fn dtx_copy_takes_the_output_channel_flag() {
        let mut out = Vec::new();
        write_dtx(&[(9 << 3) | 0b100], false, &mut out);
        assert_eq!(out, [9 << 3]);
    }
}
