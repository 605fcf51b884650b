//! Bad input from the network: counted as decode errors, concealed with an
//! output packet of the expected duration, and the stream goes on. No panic.

mod common;

use common::*;
use fleetcall_dsp::packet::{MAX_PACKET_BYTES, inspect};
use fleetcall_dsp::{Input, InputError, Pipeline, PipelineConfig};

/// Feeds `bad` between valid packets and checks the stream around it.
fn around(config: PipelineConfig, bad: &[u8]) -> (fleetcall_dsp::Processed, Pipeline) {
    let packets = encode(
        &sender(config.channels, false),
        &talker(0.4, 1),
        FRAME,
        usize::from(config.channels),
    );
    let mut pipeline = Pipeline::new(config).unwrap();
    let mut receiver = Receiver::new(config.channels);
    let mut out = Vec::new();
    for packet in &packets[..10] {
        pipeline.process(packet, &mut out).unwrap();
        receiver.receive(&out);
    }
    let processed = pipeline.process(bad, &mut out).unwrap();
    assert_eq!(inspect(&out).unwrap().samples(), processed.samples as usize);
    receiver.receive(&out);
    for packet in &packets[10..] {
        let after = pipeline.process(packet, &mut out).unwrap();
        assert_eq!(after.input, Input::Decoded);
        assert_eq!(receiver.receive(&out), FRAME);
    }
    (processed, pipeline)
}

#[test]
fn corrupt_payloads_are_concealed_and_counted() {
    let silk_wb_20ms = 9 << 3;
    let cases: [(&str, Vec<u8>); 4] = [
        ("empty", vec![]),
        ("code 3 with zero frames", vec![silk_wb_20ms | 3, 0]),
        ("code 1 with an odd length", vec![silk_wb_20ms | 1, 1, 2, 3]),
        (
            "code 2 first frame longer than the packet",
            vec![silk_wb_20ms | 2, 200, 1, 2, 3],
        ),
    ];
    for (name, payload) in cases {
        let (processed, pipeline) = around(PipelineConfig::default(), &payload);
        assert_eq!(processed.input, Input::Concealed, "{name}");
        assert_eq!(
            processed.samples as usize, FRAME,
            "{name}: the last duration is kept"
        );
        let expected = if payload.is_empty() {
            InputError::Empty
        } else {
            InputError::Corrupt
        };
        assert_eq!(processed.error, Some(expected), "{name}");
        let packets = pipeline.meters().packets;
        assert_eq!((packets.decode_errors, packets.concealed), (1, 1), "{name}");
    }
}

#[test]
fn huge_packets_are_refused_unparsed() {
    let mut huge = vec![0xa5u8; 100_000];
    huge[0] = 9 << 3;
    for payload in [huge, vec![9 << 3; MAX_PACKET_BYTES + 1]] {
        let (processed, pipeline) = around(PipelineConfig::default(), &payload);
        assert_eq!(processed.error, Some(InputError::Oversize));
        assert_eq!(processed.input, Input::Concealed);
        assert_eq!(pipeline.meters().packets.oversize, 1);
    }
}

#[test]
fn wrong_channel_count_is_counted_but_still_heard() {
    let stereo = encode(&sender(2, false), &vec![0.1; FRAME * 2], FRAME, 2);
    let (processed, pipeline) = around(PipelineConfig::default(), &stereo[0]);
    assert_eq!(
        (processed.input, processed.error),
        (Input::Decoded, Some(InputError::ChannelMismatch))
    );
    let packets = pipeline.meters().packets;
    assert_eq!((packets.decode_errors, packets.channel_mismatch), (1, 1));

    let mono = encode(&sender(1, false), &vec![0.1; FRAME], FRAME, 1);
    let config = PipelineConfig {
        channels: 2,
        ..PipelineConfig::default()
    };
    let (processed, _) = around(config, &mono[0]);
    assert_eq!(processed.error, Some(InputError::ChannelMismatch));
}

/// Random payloads, some with plausible TOC bytes, between valid packets:
/// every call returns a packet of the duration it reports, which decodes.
#[test]
fn random_payloads_never_break_the_stream() {
    let seed = 0xf00d_u64;
    println!("fuzz seed {seed}");
    let mut rng = Rng(seed);
    let valid = encode(&sender(1, false), &talker(2.0, 8), FRAME, 1);
    let mut pipeline = Pipeline::new(PipelineConfig::default()).unwrap();
    let mut receiver = Receiver::new(1);
    let mut out = Vec::new();
    let mut payload = Vec::new();
    for i in 0..1500 {
        payload.clear();
        let len = (rng.next() % 1600) as usize;
        payload.extend((0..len).map(|_| rng.next() as u8));
        let processed = if i % 3 == 0 {
            pipeline
                .process(&valid[i / 3 % valid.len()], &mut out)
                .unwrap()
        } else if i % 7 == 0 {
            pipeline.process_lost(Some(&payload), &mut out).unwrap()
        } else {
            pipeline.process(&payload, &mut out).unwrap()
        };
        let info = inspect(&out).expect("output is an Opus packet");
        assert_eq!(info.samples(), processed.samples as usize);
        assert_eq!(receiver.receive(&out), processed.samples as usize);
    }
    let packets = pipeline.meters().packets;
    assert_eq!(packets.sent, 1500);
    assert!(packets.decode_errors > 100, "{packets:?}");
}

#[test]
fn invalid_configs_are_errors() {
    for config in [
        PipelineConfig {
            channels: 3,
            ..PipelineConfig::default()
        },
        PipelineConfig {
            complexity: 11,
            ..PipelineConfig::default()
        },
        PipelineConfig {
            bitrate: 1000,
            ..PipelineConfig::default()
        },
        PipelineConfig {
            fec: true,
            encoder_mode: fleetcall_dsp::EncoderMode::LowDelay,
            ..PipelineConfig::default()
        },
    ] {
        assert!(Pipeline::new(config).is_err(), "{config:?}");
    }
    let mut pipeline = Pipeline::new(PipelineConfig::default()).unwrap();
    assert!(pipeline.set_bitrate(1).is_err());
    assert!(pipeline.set_bitrate(64_000).is_ok());
}
