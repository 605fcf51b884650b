//! Offline runner for the quality benchmark (`dsp/bench/quality/`).
//!
//! Reads a 48 kHz mono WAV file, plays it through a simulated sender (a
//! browser-like Opus encoder), optionally through the server pipeline, decodes it
//! as a receiver would, removes the codec and pipeline delay, and writes a WAV
//! file of the same length, so it lines up sample for sample with the input.
//!
//! ```text
//! cargo run -p fleetcall-dsp --release --example quality -- IN.wav OUT.wav --mode MODE [options]
//!   --mode opus       sender -> receiver (what forwarding without processing gives)
//!   --mode transcode  sender -> server decode + encode, suppression off -> receiver
//!   --mode rnnoise    sender -> server with plain RNNoise (no protection) -> receiver
//!   --mode pipeline   sender -> server pipeline as configured by default -> receiver
//!   --complexity N    server encoder complexity (default: the pipeline default)
//!   --bitrate BPS     server bit rate (default: the pipeline default); the sender
//!                     always codes 32 kbit/s
//!   --loss PERCENT    loss rate the server encoder plans its FEC for
//!   --low-delay       server encoder as in `PipelineConfig::low_delay()` (CELT
//!                     only, no FEC); put --complexity after it to override
//!   --fixed-limit DB (first), --low-limit DB, --high-limit DB, --low-snr DB,
//!   --high-snr DB, --pause-extra DB, --target DBFS|off, --max-pre-gain DB,
//!   --threshold P, --hangover MS, --release MS, --band-rise DB|off
//!                     override the protection
//! ```
//! Prints one line of meters and timing as `key=value` pairs to stdout.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use audiopus::coder::{Decoder, Encoder};
use audiopus::{Application, Bitrate, Channels, SampleRate, Signal};
use fleetcall_dsp::{Pipeline, PipelineConfig, Protection};

const FRAME: usize = 960;
/// What a browser sends for mono voice by default.
const SENDER_BITRATE: u32 = 32_000;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Opus,
    Transcode,
    Rnnoise,
    Pipeline,
}

#[derive(Debug)]
struct Args {
    input: String,
    output: String,
    mode: Mode,
    config: PipelineConfig,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut mode = None;
    let mut config = PipelineConfig::default();
    let mut protection = Protection::default();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--mode" => {
                mode = Some(match value("--mode")?.as_str() {
                    "opus" => Mode::Opus,
                    "transcode" => Mode::Transcode,
                    "rnnoise" => Mode::Rnnoise,
                    "pipeline" => Mode::Pipeline,
                    other => bail!("unknown mode {other}"),
                })
            }
            "--complexity" => config.complexity = value(&arg)?.parse()?,
            "--bitrate" => config.bitrate = value(&arg)?.parse()?,
            "--loss" => config.expected_loss_percent = value(&arg)?.parse()?,
            "--low-delay" => {
                let low_delay = PipelineConfig::low_delay();
                config.encoder_mode = low_delay.encoder_mode;
                config.fec = low_delay.fec;
                config.complexity = low_delay.complexity;
            }
            "--low-limit" => protection.low_snr_limit_db = value(&arg)?.parse()?,
            "--high-limit" => protection.high_snr_limit_db = value(&arg)?.parse()?,
            "--low-snr" => protection.low_snr_db = value(&arg)?.parse()?,
            "--high-snr" => protection.high_snr_db = value(&arg)?.parse()?,
            "--pause-extra" => protection.pause_extra_db = value(&arg)?.parse()?,
            "--fixed-limit" => {
                let limit = value(&arg)?.parse()?;
                protection = Protection {
                    ..Protection::fixed_limit(limit)
                };
            }
            "--max-pre-gain" => protection.max_pre_gain_db = value(&arg)?.parse()?,
            "--threshold" => protection.speech_threshold = value(&arg)?.parse()?,
            "--hangover" => protection.hangover_ms = value(&arg)?.parse()?,
            "--release" => protection.release_ms = value(&arg)?.parse()?,
            "--band-rise" => {
                protection.band_rise_db = match value(&arg)?.as_str() {
                    "off" => None,
                    rise => Some(rise.parse()?),
                }
            }
            "--target" => {
                protection.level_target_dbfs = match value(&arg)?.as_str() {
                    "off" => None,
                    level => Some(level.parse()?),
                }
            }
            flag if flag.starts_with("--") => bail!("unknown option {flag}"),
            _ => positional.push(arg),
        }
    }
    let [input, output] = <[String; 2]>::try_from(positional).map_err(|_| {
        anyhow::anyhow!("usage: quality IN.wav OUT.wav --mode opus|transcode|rnnoise|pipeline")
    })?;
    let mode = mode.context("--mode is required")?;
    match mode {
        Mode::Transcode => config.suppression = false,
        Mode::Rnnoise => config.protection = Protection::plain(),
        _ => config.protection = protection,
    }
    Ok(Args {
        input,
        output,
        mode,
        config,
    })
}

fn read_wav(path: &str) -> Result<Vec<f32>> {
    let mut reader = hound::WavReader::open(path).with_context(|| format!("open {path}"))?;
    let spec = reader.spec();
    if spec.sample_rate != 48_000 || spec.channels != 1 {
        bail!(
            "{path}: need 48 kHz mono, got {} Hz {} ch",
            spec.sample_rate,
            spec.channels
        );
    }
    Ok(match spec.sample_format {
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1i64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|s| s as f32 * scale))
                .collect::<Result<_, _>>()?
        }
        hound::SampleFormat::Float => reader.samples::<f32>().collect::<Result<_, _>>()?,
    })
}

fn write_wav(path: &str, samples: &[f32]) -> Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 48_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec)?;
    for &s in samples {
        writer.write_sample((s * 32768.0).round().clamp(-32768.0, 32767.0) as i16)?;
    }
    writer.finalize()?;
    Ok(())
}

/// A browser-like sender: VoIP mode, complexity 10, in-band FEC.
fn sender(bitrate: u32) -> Result<Encoder> {
    let mut encoder = Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip)?;
    encoder.set_signal(Signal::Voice)?;
    encoder.set_bitrate(Bitrate::BitsPerSecond(bitrate as i32))?;
    encoder.set_encoder_ctl_request(audiopus::ffi::OPUS_SET_COMPLEXITY_REQUEST, 10)?;
    encoder.set_inband_fec(true)?;
    encoder.set_packet_loss_perc(10)?;
    Ok(encoder)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let input = read_wav(&args.input)?;
    let encoder = sender(SENDER_BITRATE)?;
    let mut decoder = Decoder::new(SampleRate::Hz48000, Channels::Mono)?;
    let mut pipeline = match args.mode {
        Mode::Opus => None,
        _ => Some(Pipeline::new(args.config)?),
    };
    let delay =
        encoder.lookahead()? as usize + pipeline.as_ref().map_or(0, Pipeline::latency_samples);

    // Feed whole frames, plus enough silence to flush the delay out.
    let frames = (input.len() + delay).div_ceil(FRAME);
    let mut padded = input.clone();
    padded.resize(frames * FRAME, 0.0);

    let mut packet = vec![0u8; 4000];
    let mut processed = Vec::with_capacity(4000);
    let mut pcm = vec![0.0f32; FRAME];
    let mut output = Vec::with_capacity(padded.len());
    let mut busy = Duration::ZERO;
    for frame in padded.chunks_exact(FRAME) {
        let len = encoder.encode_float(frame, &mut packet)?;
        let mut payload = &packet[..len];
        if let Some(pipeline) = pipeline.as_mut() {
            let start = Instant::now();
            pipeline.process(payload, &mut processed)?;
            let elapsed = start.elapsed();
            pipeline.record_processing_time(elapsed);
            busy += elapsed;
            payload = &processed;
        }
        let n = decoder.decode_float(Some(payload), &mut pcm[..], false)?;
        output.extend_from_slice(&pcm[..n]);
    }
    let aligned = &output[delay..delay + input.len()];
    write_wav(&args.output, aligned)?;

    let frames_f = frames as f64;
    match &pipeline {
        Some(pipeline) => {
            let m = pipeline.meters();
            println!(
                "us_per_frame={:.1} latency_ms={:.2} in_rms={:.1} in_peak={:.1} in_floor={:.1} in_snr={:.1} \
                 out_rms={:.1} out_floor={:.1} out_snr={:.1} speech_ratio={:.2} atten_db={:.1} pre_gain_db={:.1} prot_snr={:.1} limit={:.1} \
                 clip_in={:.5} packets={} dtx_sent={} errors={}",
                busy.as_secs_f64() * 1e6 / frames_f,
                pipeline.latency().as_secs_f64() * 1e3,
                m.input.rms_dbfs,
                m.input.peak_dbfs,
                m.input.noise_floor_dbfs,
                m.input.snr_db,
                m.output.rms_dbfs,
                m.output.noise_floor_dbfs,
                m.output.snr_db,
                m.speech.ratio,
                m.suppression.attenuation_db,
                m.suppression.pre_gain_db,
                m.suppression.snr_db,
                m.suppression.limit_db,
                m.input.clipping_ratio(),
                m.packets.sent,
                m.packets.dtx_sent,
                m.packets.decode_errors,
            );
        }
        None => println!("us_per_frame=0 latency_ms=0"),
    }
    Ok(())
}
