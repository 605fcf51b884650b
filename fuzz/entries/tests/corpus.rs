//! The fuzz targets as a bounded test, the one CI runs (no libFuzzer, no
//! coverage build): every entry over its checked-in corpus
//! (`fuzz/corpus/<target>/`: seeds from real traffic and every crash the
//! fuzzer found), then over seeded pseudo-random inputs: corpus files
//! mutated (bit flips, cuts, insertions, splices, records repeated) and plain
//! random bytes. `FLEETCALL_FUZZ_SEED` replays a run (the seed is printed),
//! `FLEETCALL_FUZZ_SCALE` multiplies the number of generated inputs.
//!
//! `cargo test -p fleetcall-fuzz --test corpus -- --ignored write_seed_corpus`
//! rewrites the seed files from the real code (the regression files are
//! kept).

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};

use fleetcall_fuzz::{TARGETS, records};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus").join(target)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path.file_name().expect("a file").to_string_lossy().into_owned();
            (name, std::fs::read(&path).expect("corpus file"))
        })
        .collect()
}

/// Runs `entry` on `input`; on a panic, saves the input under
/// `target/fuzz-failures/` and says where before failing.
fn run_one(target: &str, what: &str, entry: fn(&[u8]), input: &[u8]) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| entry(input))) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-failures").join(target);
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(what.replace(['/', ' '], "_"));
        let _ = std::fs::write(&path, input);
        eprintln!("{target}: {what} failed; input saved to {}", path.display());
        resume_unwind(panic);
    }
}

fn mutate(rng: &mut StdRng, corpus: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut data = if corpus.is_empty() || rng.random_range(0..8) == 0 {
        let len = rng.random_range(0..512);
        (0..len).map(|_| rng.random::<u8>()).collect()
    } else {
        corpus[rng.random_range(0..corpus.len())].1.clone()
    };
    for _ in 0..rng.random_range(1..=4) {
        match rng.random_range(0..7) {
            // Flip bits.
            0 if !data.is_empty() => {
                for _ in 0..rng.random_range(1..=8) {
                    let i = rng.random_range(0..data.len());
                    data[i] ^= 1 << rng.random_range(0..8);
                }
            }
            // Interesting bytes.
            1 if !data.is_empty() => {
                let i = rng.random_range(0..data.len());
                data[i] = [0x00, 0x01, 0x7f, 0x80, 0xff, b'"', b'{', b'0', b'\n'][rng.random_range(0..9)];
            }
            // Cut.
            2 if !data.is_empty() => {
                let at = rng.random_range(0..data.len());
                data.truncate(at);
            }
            // Remove a range.
            3 if data.len() > 1 => {
                let a = rng.random_range(0..data.len());
                let b = rng.random_range(a..data.len());
                data.drain(a..b);
            }
            // Insert random bytes.
            4 => {
                let at = rng.random_range(0..=data.len());
                let n = rng.random_range(1..32);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random::<u8>()).collect();
                data.splice(at..at, bytes);
            }
            // Splice in another corpus file's tail.
            5 if !corpus.is_empty() => {
                let other = &corpus[rng.random_range(0..corpus.len())].1;
                let from = rng.random_range(0..=other.len());
                let at = rng.random_range(0..=data.len());
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            // Repeat one record (floods of the same frame or datagram).
            _ => {
                let first = records::split(&data).next().map(|(tag, payload)| (tag, payload.to_vec()));
                if let Some((tag, payload)) = first {
                    let payload = &payload[..];
                    let mut flood = Vec::new();
                    for _ in 0..rng.random_range(2..20) {
                        records::push(&mut flood, tag, payload);
                    }
                    data.splice(0..0, flood);
                }
            }
        }
    }
    data
}

fn scale() -> usize {
    std::env::var("FLEETCALL_FUZZ_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1)
}

/// The corpus, then `generated` mutated and random inputs.
fn exercise(target: &str, generated: usize) {
    let entry = TARGETS.iter().find(|(name, _)| *name == target).expect("a target").1;
    let corpus = corpus(target);
    assert!(!corpus.is_empty(), "{target}: the corpus is empty");
    for (name, input) in &corpus {
        run_one(target, name, entry, input);
    }
    let seed = std::env::var("FLEETCALL_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEED);
    println!("{target}: {} corpus files, {} generated inputs, seed {seed}", corpus.len(), generated * scale());
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..generated * scale() {
        let input = mutate(&mut rng, &corpus);
        run_one(target, &format!("seed-{seed}-input-{i}"), entry, &input);
    }
}

/// The default seed, fixed so CI runs the same inputs every time.
const DEFAULT_SEED: u64 = 15_2026;

#[test]
fn frames_protobuf() {
    exercise("frames_protobuf", 3000);
}

#[test]
fn frames_json() {
    exercise("frames_json", 3000);
}

#[test]
fn control() {
    exercise("control", 3000);
}

#[test]
fn sdp() {
    exercise("sdp", 1000);
}

#[test]
fn datagram() {
    exercise("datagram", 2000);
}

#[test]
fn opus() {
    exercise("opus", 400);
}

#[test]
fn tokens() {
    exercise("tokens", 2000);
}

/// Rewrites the seed files (`seed-*`) from real traffic of the real code.
#[test]
#[ignore = "writes fuzz/corpus; run by hand after a protocol change"]
fn write_seed_corpus() {
    seeds::write_all();
}

mod seeds {
    use std::time::Duration;

    use fleetcall_fuzz::records::push;
    use fleetcall_fuzz::stage::Stage;
    use fleetcall_signaling::grants::{Grant, RoomPattern};
    use fleetcall_signaling::pb::{self, ClientFrame, client_frame::Kind as C};
    use fleetcall_signaling::service::unix_now;
    use fleetcall_signaling::tokens::{AccessTokens, TokenRequest};
    use fleetcall_signaling::wire::{encode_frame_to_vec, encode_json, put_varint};

    use super::corpus_dir;

    fn write(target: &str, name: &str, data: &[u8]) {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), data).expect("seed file");
    }

    fn frame(op_id: u64, kind: C) -> ClientFrame {
        ClientFrame { op_id, kind: Some(kind) }
    }

    fn frames(offer: &str) -> Vec<(&'static str, ClientFrame)> {
        let hello = pb::Hello { min_version: 1, max_version: 1, software_version: "fw 1.2".into(), resume: None };
        let resume = pb::Hello { resume: Some(pb::Resume { session_id: 1, resume_token: vec![1; 32], last_seq: 3 }), ..hello.clone() };
        vec![
            ("hello", frame(0, C::Hello(hello))),
            ("hello-resume", frame(0, C::Hello(resume))),
            ("heartbeat", frame(0, C::Heartbeat(pb::Heartbeat { seq: 7, sent_at_ms: 1234, ack_seq: 2 }))),
            ("heartbeat-ack", frame(0, C::HeartbeatAck(pb::HeartbeatAck { seq: 1, echo_sent_at_ms: 10 }))),
            ("room-join", frame(1, C::RoomJoin(pb::RoomJoin { room: fleetcall_fuzz::control::ROOM.into() }))),
            ("sdp-offer", frame(2, C::SdpOffer(pb::SdpOffer { call_id: 1, session_id: 0, revision: 1, sdp: offer.into() }))),
            ("sdp-answer", frame(3, C::SdpAnswer(pb::SdpAnswer { call_id: 1, session_id: 2, revision: 1, sdp: "v=0\r\n".into() }))),
            ("ice-restart", frame(4, C::IceRestart(pb::IceRestart { call_id: 1, session_id: 2, revision: 2, sdp: offer.into() }))),
            ("invite", frame(5, C::Invite(pb::Invite { callee: "bystander".into() }))),
            ("ringing", frame(6, C::Ringing(pb::Ringing { call_id: 2 }))),
            ("accept", frame(7, C::Accept(pb::Accept { call_id: 2 }))),
            ("decline", frame(8, C::Decline(pb::Decline { call_id: 2 }))),
            ("cancel", frame(9, C::Cancel(pb::Cancel { call_id: 2 }))),
            ("hangup", frame(10, C::Hangup(pb::Hangup { call_id: 1 }))),
            ("group-create", frame(11, C::GroupCreate(pb::GroupCreate { name: "team".into(), invitees: vec!["bystander".into(), "nobody".into()] }))),
            ("group-invite", frame(12, C::GroupInvite(pb::GroupInvite { call_id: 2, invitees: vec!["bystander".into()] }))),
            ("group-join", frame(13, C::GroupJoin(pb::GroupJoin { call_id: 1 }))),
            ("group-leave", frame(14, C::GroupLeave(pb::GroupLeave { call_id: 1 }))),
            ("group-end", frame(15, C::GroupEnd(pb::GroupEnd { call_id: 1 }))),
            ("noise-suppression", frame(16, C::SetNoiseSuppression(pb::SetNoiseSuppression { enabled: true, use_default: false }))),
        ]
    }

    pub fn write_all() {
        let (offer, answer, restart) = fleetcall_fuzz::sdp::real_sdp();
        let frames = frames(&offer);

        // Frames, one file each and all in one stream, in both codecs.
        let mut stream = vec![0x0f];
        for (name, f) in &frames {
            let bytes = encode_frame_to_vec(f).expect("encodes");
            write("frames_protobuf", name, &[&[0xff][..], &bytes].concat());
            stream.extend_from_slice(&bytes);
            write("frames_json", name, encode_json(f).expect("encodes").as_bytes());
        }
        write("frames_protobuf", "all-in-chunks-of-16", &stream);
        let mut oversize = bytes::BytesMut::new();
        put_varint(&mut oversize, 64 * 1024 + 1);
        write("frames_protobuf", "oversize-prefix", &[&[0x00][..], &oversize].concat());
        write("frames_protobuf", "overlong-varint", &[0x03, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01]);
        write("frames_protobuf", "garbage-body-then-hello", &[&[0x02, 0x03, 0xff, 0xff, 0xff][..], &encode_frame_to_vec(&frames[0].1).unwrap()].concat());
        write("frames_json", "browser-hello", br#"{"hello":{"minVersion":1,"maxVersion":1,"softwareVersion":"web"}}"#);
        write("frames_json", "unknown-kind", br#"{"opId":"5","teleport":{"to":"mars"},"extra":1}"#);

        // The controller: sessions of a device, as text, binary and QUIC.
        let text = |name: &str| encode_json(&frames.iter().find(|(n, _)| *n == name).expect("a frame").1).expect("encodes").into_bytes();
        let quic = |name: &str| encode_frame_to_vec(&frames.iter().find(|(n, _)| *n == name).expect("a frame").1).expect("encodes");
        let mut room = Vec::new();
        for name in ["room-join", "sdp-offer", "heartbeat", "ice-restart", "sdp-answer", "noise-suppression"] {
            push(&mut room, 0, &text(name));
        }
        push(&mut room, 3, &[200]);
        push(&mut room, 5, &[]);
        push(&mut room, 3, &[100]);
        push(&mut room, 0, &text("group-leave"));
        write("control", "room-join-offer-restart-leave", &room);
        let mut call = Vec::new();
        for name in ["invite", "cancel", "group-create", "group-invite", "group-end", "hangup"] {
            push(&mut call, 0, &text(name));
            push(&mut call, 3, &[50]);
        }
        write("control", "invite-cancel-group", &call);
        let mut quic_session = Vec::new();
        push(&mut quic_session, 4, &[]);
        for name in ["hello", "room-join", "sdp-offer", "group-join", "accept", "decline", "ringing"] {
            push(&mut quic_session, 2, &quic(name));
        }
        push(&mut quic_session, 2, &[0x02, 0xff, 0xff]);
        push(&mut quic_session, 1, b"binary");
        write("control", "reconnect-quic-session", &quic_session);
        let mut resume = Vec::new();
        push(&mut resume, 0, &text("room-join"));
        push(&mut resume, 4, &[]);
        push(&mut resume, 0, &text("hello-resume"));
        push(&mut resume, 3, &[255]);
        push(&mut resume, 3, &[255]);
        push(&mut resume, 0, &[0xff, 0xfe]);
        write("control", "drop-resume-timeout", &resume);

        // SDP as each of the three entries takes it.
        write("sdp", "join-offer", &[&[0][..], offer.as_bytes()].concat());
        write("sdp", "answer", &[&[1][..], answer.as_bytes()].concat());
        write("sdp", "ice-restart-offer", &[&[2][..], restart.as_bytes()].concat());
        let listen_only = offer.replace("a=sendonly", "a=recvonly");
        write("sdp", "join-offer-recvonly", &[&[0][..], listen_only.as_bytes()].concat());
        let no_fingerprint: String = offer.lines().filter(|l| !l.starts_with("a=fingerprint")).map(|l| format!("{l}\r\n")).collect();
        write("sdp", "join-offer-no-fingerprint", &[&[0][..], no_fingerprint.as_bytes()].concat());

        // Datagrams a real participant sends: STUN, DTLS, SRTP, SRTCP.
        let mut stage = Stage::new();
        stage.capture = Some(Vec::new());
        stage.join_client();
        stage.join_client();
        for _ in 0..20 {
            stage.send_frame(0, 1);
            stage.run(Duration::from_millis(200));
        }
        let captured = stage.capture.take().expect("captured");
        let mut kinds: std::collections::BTreeMap<&str, Vec<Vec<u8>>> = Default::default();
        for d in captured {
            let kind = match d.first() {
                Some(0..=3) => "stun",
                Some(20..=63) => "dtls",
                Some(128..=191) if (200..=207).contains(&d.get(1).copied().unwrap_or(0)) => "srtcp",
                Some(128..=191) => "srtp",
                _ => "other",
            };
            kinds.entry(kind).or_default().push(d);
        }
        for (kind, list) in &kinds {
            for (i, d) in list.iter().take(4).enumerate() {
                for (tag, source) in [(0u8, "talker"), (1, "stranger"), (2, "other-port")] {
                    let mut input = Vec::new();
                    push(&mut input, tag, d);
                    write("datagram", &format!("{kind}-{i}-from-{source}"), &input);
                }
            }
        }
        let mut mixed = Vec::new();
        for list in kinds.values() {
            if let Some(d) = list.last() {
                push(&mut mixed, 0, d);
                push(&mut mixed, 3, d);
                push(&mut mixed, 0, &d[..d.len() / 2]);
            }
        }
        write("datagram", "one-of-each-whole-and-cut", &mixed);

        // Opus from a real encoder: speech-like tone, with FEC, in order,
        // with loss, late and DTX; for each pipeline configuration.
        use audiopus::coder::Encoder;
        use audiopus::{Application, Channels, SampleRate};
        for (choice, channels) in [(0u8, Channels::Mono), (1, Channels::Mono), (2, Channels::Stereo), (3, Channels::Mono)] {
            let mut encoder = Encoder::new(SampleRate::Hz48000, channels, Application::Voip).expect("encoder");
            encoder.set_inband_fec(true).expect("fec");
            encoder.set_packet_loss_perc(10).expect("loss");
            let n = if channels == Channels::Stereo { 2 } else { 1 };
            let mut input = vec![choice];
            let step = |s: i64| (((s + 8) as u8) << 2) & 0xfc;
            for f in 0..12 {
                let pcm: Vec<i16> = (0..960 * n).map(|i| ((((f * 960 + i / n) as f32) * 0.0576).sin() * 8000.0) as i16).collect();
                let mut out = vec![0u8; 1500];
                let len = encoder.encode(&pcm, &mut out).expect("encode");
                let tag = match f {
                    5 => step(4),        // three lost before it
                    8 => step(-2) | 1,   // late, marker set
                    9 => step(3) | 2,    // back ahead, suppression switched
                    _ => step(1),
                };
                push(&mut input, tag, &out[..len]);
            }
            push(&mut input, step(1), &[0x48]); // DTX
            push(&mut input, step(1), &[]); // empty
            write("opus", &format!("config-{choice}-speech-loss-late-dtx"), &input);
        }

        // Tokens as a server mints them, and one forged input to grow from.
        let tokens = AccessTokens::from_secret(b"fuzz-signing-key-0123456789abcde");
        let grant = Grant { rooms: vec![RoomPattern::parse("ward-*").unwrap(), RoomPattern::parse("lab").unwrap()], publish: true, subscribe: false };
        let now = unix_now();
        for (name, guest, issued) in [("valid", false, now), ("guest", true, now), ("expired", false, now - 7200)] {
            let request = TokenRequest { identity: "Nurse A".into(), ttl: Duration::from_secs(3600), grant: grant.clone(), guest };
            let token = tokens.mint(&request, issued).expect("mint");
            write("tokens", name, &[&[0][..], token.as_bytes()].concat());
        }
        write("tokens", "forged-claims", &[1, 0, 1, b'x', 0, 0, 0, 10, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    }
}
