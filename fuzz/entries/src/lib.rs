//! fleetcall-fuzz: one entry function per surface a hostile client reaches,
//! each driving the real project code the way the server does and asserting
//! its invariants. A violated invariant panics (that is what a fuzzer
//! reports); an input the code refuses is fine, as long as it is refused
//! with a value and costs nobody else anything.
//!
//! The same functions run under libFuzzer (`fuzz/fuzz_targets/*.rs`, one
//! thin `fuzz_target!` each) and in this crate's bounded corpus test
//! (`tests/corpus.rs`), which is what CI runs.
//!
//! Targets:
//! * [`frames`]: control-protocol frame decoding, protobuf and JSON;
//! * [`control`]: messages on a registered device's socket into the
//!   sans-IO controller;
//! * [`sdp`]: SDP offers and answers as the controller and the SFU core
//!   take them;
//! * [`datagram`]: the SFU core's datagram input from a joined
//!   participant's address and from strangers;
//! * [`opus`]: Opus packets into the decode -> RNNoise -> encode pipeline;
//! * [`tokens`]: access-token verification.
//!
//! Inputs with several steps use one record format ([`records`]) so seeds
//! can be written by hand or by the seed generator, and read in a hex dump.

pub mod control;
pub mod datagram;
pub mod frames;
pub mod opus;
pub mod sdp;
pub mod stage;
pub mod tokens;

/// An entry function.
pub type Entry = fn(&[u8]);

/// The entry functions by target name, as the corpus folders and the
/// cargo-fuzz binaries are named.
pub const TARGETS: &[(&str, Entry)] = &[
    ("frames_protobuf", frames::protobuf),
    ("frames_json", frames::json),
    ("control", control::run),
    ("sdp", sdp::run),
    ("datagram", datagram::run),
    ("opus", opus::run),
    ("tokens", tokens::run),
];

/// The record format of multi-step inputs: `tag: u8, len: u16 LE, payload`,
/// repeated; a record cut short by the end of the input keeps what is there.
pub mod records {
    /// Splits `data` into `(tag, payload)` records.
    pub fn split(mut data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
        std::iter::from_fn(move || {
            let (&tag, rest) = data.split_first()?;
            let len = match rest {
                [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
                _ => rest.len(),
            };
            let rest = rest.get(2..).unwrap_or_default();
            let (payload, tail) = rest.split_at(len.min(rest.len()));
            data = tail;
            Some((tag, payload))
        })
    }

    /// Appends one record (seed generation; payloads over 64 KiB are cut).
    pub fn push(out: &mut Vec<u8>, tag: u8, payload: &[u8]) {
        let payload = &payload[..payload.len().min(usize::from(u16::MAX))];
        out.push(tag);
        out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        out.extend_from_slice(payload);
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn records_round_trip_and_tolerate_truncation() {
            let mut data = Vec::new();
            super::push(&mut data, 1, b"abc");
            super::push(&mut data, 2, b"");
            super::push(&mut data, 3, b"defg");
            let got: Vec<_> = super::split(&data).collect();
            assert_eq!(got, vec![(1, &b"abc"[..]), (2, &b""[..]), (3, &b"defg"[..])]);
            let cut: Vec<_> = super::split(&data[..data.len() - 2]).collect();
            assert_eq!(cut.last(), Some(&(3, &b"de"[..])));
            assert_eq!(super::split(&[7]).collect::<Vec<_>>(), vec![(7, &b""[..])]);
        }
    }
}
