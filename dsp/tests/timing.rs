//! RTP timing: one output packet per input packet or loss, of the same duration,
//! through loss (FEC and PLC) and DTX; and the delay the pipeline reports.

mod common;

use common::*;
use fleetcall_dsp::packet::{self, inspect};
use fleetcall_dsp::{EncoderMode, Input, Pipeline, PipelineConfig};

fn low_delay() -> PipelineConfig {
    PipelineConfig {
        fec: false,
        encoder_mode: EncoderMode::LowDelay,
        ..PipelineConfig::default()
    }
}

#[test]
fn packet_count_and_duration_in_equal_out() {
    for config in [PipelineConfig::default(), low_delay()] {
        for frame_ms in [10, 20, 40, 60] {
            let frame = RATE / 1000 * frame_ms;
            let sender = sender(1, false);
            let packets = encode(&sender, &talker(1.2, 3), frame, 1);
            let mut pipeline = Pipeline::new(config).unwrap();
            let mut receiver = Receiver::new(1);
            let mut out = Vec::new();
            for packet in &packets {
                let processed = pipeline.process(packet, &mut out).unwrap();
                assert_eq!(processed.samples as usize, frame);
                assert_eq!(inspect(&out).unwrap().samples(), frame, "{frame_ms} ms");
                assert_eq!(receiver.receive(&out), frame);
            }
            let meters = pipeline.meters();
            assert_eq!(meters.packets.received, packets.len() as u64);
            assert_eq!(meters.packets.sent, packets.len() as u64);
            assert_eq!(meters.packets.decode_errors, 0);
        }
    }
}

#[test]
fn stereo_keeps_channels_and_duration() {
    let config = PipelineConfig {
        channels: 2,
        ..PipelineConfig::default()
    };
    let mono = talker(1.0, 5);
    let stereo: Vec<f32> = mono.iter().flat_map(|&x| [x, 0.5 * x]).collect();
    let sender = sender(2, false);
    let mut pipeline = Pipeline::new(config).unwrap();
    let mut out = Vec::new();
    for packet in encode(&sender, &stereo, FRAME, 2) {
        pipeline.process(&packet, &mut out).unwrap();
        let info = inspect(&out).unwrap();
        assert!(info.stereo);
        assert_eq!(info.samples(), FRAME);
    }
    assert_eq!(pipeline.meters().packets.decode_errors, 0);
}

/// Losses are filled one output per missing packet: from FEC when the next
/// packet carries it, by concealment otherwise. The output timeline has no
/// hole and every output packet decodes.
#[test]
fn timing_continues_through_loss() {
    let sender = sender(1, false);
    let packets = encode(&sender, &talker(4.0, 11), FRAME, 1);
    let seed = 0x5eed_u64;
    println!("loss pattern seed {seed}");
    let mut rng = Rng(seed);
    // Single losses at random (about 10 %) and one burst of three.
    let lost: Vec<bool> = (0..packets.len())
        .map(|i| (60..63).contains(&i) || (i > 5 && rng.next().is_multiple_of(10)))
        .collect();

    let mut pipeline = Pipeline::new(PipelineConfig::default()).unwrap();
    let mut receiver = Receiver::new(1);
    let mut out = Vec::new();
    let mut missing = 0;
    let (mut fec, mut plc) = (0, 0);
    for (i, packet) in packets.iter().enumerate() {
        if lost[i] {
            missing += 1;
            continue;
        }
        // The gap ends here: conceal all but the last, which may use our FEC.
        for k in 0..missing {
            let next = (k == missing - 1).then_some(&packet[..]);
            let processed = pipeline.process_lost(next, &mut out).unwrap();
            assert_eq!(processed.samples as usize, FRAME);
            match processed.input {
                Input::FecRecovered => fec += 1,
                Input::Concealed => plc += 1,
                other => panic!("loss became {other:?}"),
            }
            assert_eq!(receiver.receive(&out), FRAME);
        }
        missing = 0;
        pipeline.process(packet, &mut out).unwrap();
        assert_eq!(receiver.receive(&out), FRAME);
    }
    let kept = lost.iter().filter(|&&l| !l).count();
    let dropped = packets.len() - kept - missing;
    let meters = pipeline.meters();
    assert_eq!(receiver.audio.len(), (kept + dropped) * FRAME);
    assert_eq!(meters.packets.lost as usize, dropped);
    assert_eq!(
        (
            meters.packets.fec_recovered as usize,
            meters.packets.concealed as usize
        ),
        (fec, plc)
    );
    assert!(fec > 5, "the sender's FEC was used: {fec} of {dropped}");
    assert!(plc >= 2, "the burst needed concealment: {plc}");
}

#[test]
fn fec_is_detected_only_when_present() {
    let with_fec = encode(&sender(1, false), &talker(1.0, 2), FRAME, 1);
    let found = with_fec
        .iter()
        .filter(|p| packet::has_fec(p, &inspect(p).unwrap()))
        .count();
    // Only voiced frames carry FEC; the talker pauses 40 % of the time.
    assert!(found > with_fec.len() / 4, "{found} of {}", with_fec.len());

    let mut plain = sender(1, false);
    plain.set_inband_fec(false).unwrap();
    let without = encode(&plain, &talker(1.0, 2), FRAME, 1);
    assert!(
        without
            .iter()
            .all(|p| !packet::has_fec(p, &inspect(p).unwrap()))
    );
}

/// DTX input (1-2 byte packets) becomes DTX output at once when DTX is
/// negotiated, and ordinary packets of the same duration when it is not.
#[test]
fn dtx_in_dtx_out_when_negotiated() {
    let mut signal = talker(1.0, 4);
    signal.extend(std::iter::repeat_n(0.0, RATE * 2));
    signal.extend(talker(1.0, 5));
    let packets = encode(&sender(1, true), &signal, FRAME, 1);
    let dtx_in = packets
        .iter()
        .filter(|p| p.len() <= packet::DTX_MAX_BYTES)
        .count();
    assert!(dtx_in > 50, "the sender went into DTX: {dtx_in}");

    for negotiated in [true, false] {
        let config = PipelineConfig {
            dtx: negotiated,
            ..PipelineConfig::default()
        };
        let mut pipeline = Pipeline::new(config).unwrap();
        let mut receiver = Receiver::new(1);
        let mut out = Vec::new();
        for packet in &packets {
            let processed = pipeline.process(packet, &mut out).unwrap();
            assert_eq!(inspect(&out).unwrap().samples(), FRAME);
            assert_eq!(receiver.receive(&out), FRAME);
            if packet.len() <= packet::DTX_MAX_BYTES {
                assert_eq!(processed.input, Input::Dtx);
                assert_eq!(processed.dtx_out, negotiated, "negotiated {negotiated}");
            }
        }
        let meters = pipeline.meters();
        assert_eq!(meters.packets.dtx as usize, dtx_in);
        if negotiated {
            assert!(meters.packets.dtx_sent as usize >= dtx_in);
        }
        // Speech after the DTX run is coded normally again.
        assert!(out.len() > packet::DTX_MAX_BYTES);
    }
}

/// The delay the pipeline reports is the delay the audio has: find the lag
/// of the best match between input and received output.
#[test]
fn reported_latency_is_the_real_delay() {
    for config in [PipelineConfig::default(), low_delay()] {
        for suppression in [false, true] {
            let config = PipelineConfig {
                suppression,
                ..config
            };
            // Noise bursts: unlike voiced speech, no periodicity to fool the
            // correlation by a pitch period.
            let mut rng = Rng(9);
            let input: Vec<f32> = (0..RATE * 2)
                .map(|i| {
                    rng.uniform()
                        * 0.1
                        * (i as f32 * 3.0 / RATE as f32 * std::f32::consts::TAU)
                            .sin()
                            .max(0.0)
                })
                .collect();
            let sender = sender(1, false);
            let sender_delay = sender.lookahead().unwrap() as usize;
            let mut pipeline = Pipeline::new(config).unwrap();
            let mut receiver = Receiver::new(1);
            let mut out = Vec::new();
            for packet in encode(&sender, &input, FRAME, 1) {
                pipeline.process(&packet, &mut out).unwrap();
                receiver.receive(&out);
            }
            let expected = sender_delay + pipeline.latency_samples();
            let reference = &input[RATE / 2..RATE];
            let lag = (0..2000)
                .max_by(|&a, &b| {
                    let corr = |lag: usize| -> f32 {
                        reference
                            .iter()
                            .zip(&receiver.audio[RATE / 2 + lag..])
                            .map(|(x, y)| x * y)
                            .sum()
                    };
                    corr(a).total_cmp(&corr(b))
                })
                .unwrap();
            assert!(
                lag.abs_diff(expected) <= 24,
                "{:?} suppression {suppression}: lag {lag}, reported {expected}",
                config.encoder_mode
            );
        }
    }
    let latency = |config| Pipeline::new(config).unwrap().latency().as_micros();
    assert_eq!(latency(PipelineConfig::default()), 16_500);
    assert_eq!(latency(low_delay()), 12_500);
}
