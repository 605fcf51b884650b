//! The per-track pipeline: Opus packet in, Opus packet out.

use std::time::Duration;

use audiopus::coder::{Decoder, Encoder};
use audiopus::{Application, Bitrate, Channels, SampleRate, Signal};
use nnnoiseless::DenoiseState;

use crate::meters::{AttenuationMeter, FULL_SCALE, SignalMeter, SpeechMeter, TrackMeters};
use crate::packet::{self, MAX_PACKET_SAMPLES, PacketError};
use crate::protect::{Protection, Protector};
use crate::{BLOCK_SAMPLES, DspError, SAMPLE_RATE};

/// Largest output packet written (bytes); libopus stops below this at any
/// bit rate the config accepts.
const MAX_OUTPUT_BYTES: usize = 4000;

/// Blocks over which suppression fades in or out when switched (50 ms).
const SWITCH_RAMP_BLOCKS: u32 = 5;

/// Blocks RNNoise runs unheard after being switched on, so the fade-in starts
/// from settled state rather than from stale history (30 ms).
const WARMUP_BLOCKS: u32 = 3;

/// Durations (samples per channel) the Opus encoder can code in one call.
const ENCODER_DURATIONS: [usize; 9] = [120, 240, 480, 960, 1920, 2880, 3840, 4800, 5760];

/// Which Opus coder the pipeline's encoder uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderMode {
    /// SILK or hybrid, as a VoIP client would: in-band FEC possible, 6.5 ms
    /// look-ahead, costlier per frame.
    Voip,
    /// CELT only (libopus' restricted low-delay mode): 2.5 ms look-ahead and
    /// about a third of the encoder CPU, but no in-band FEC.
    LowDelay,
}

/// How a pipeline encodes and suppresses. The sample rate is always 48 kHz,
/// the rate WebRTC negotiates for Opus and the rate RNNoise runs at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PipelineConfig {
    /// 1 (mono) or 2 (stereo), as negotiated; output uses the same count.
    pub channels: u8,
    /// In-band FEC in the output (the receiver can rebuild a lost packet).
    pub fec: bool,
    /// Loss rate the encoder plans its FEC for, in percent (0-100). libopus
    /// adds no FEC at 0.
    pub expected_loss_percent: u8,
    /// Discontinuous transmission: DTX input becomes DTX output without any
    /// processing, and the encoder may itself send DTX in silence.
    pub dtx: bool,
    /// Opus encoder complexity, 0-10: CPU against quality.
    pub complexity: u8,
    /// The coder used for the output.
    pub encoder_mode: EncoderMode,
    /// Output bit rate in bits per second (6000-510000).
    pub bitrate: u32,
    /// Whether noise suppression starts on (see [`Pipeline::set_suppression`]).
    pub suppression: bool,
    /// How quiet and distant speech is protected from the suppressor.
    pub protection: Protection,
}

impl Default for PipelineConfig {
    /// Mono, FEC on (planned for 5 % loss), DTX off, VoIP coder at complexity 5
    /// and 48 kbit/s. The bit rate sits above what browsers send (32 kbit/s)
    /// because decoding and re-encoding at the same rate costs intelligibility
    /// on quiet talkers (see the crate README).
    fn default() -> Self {
        Self {
            channels: 1,
            fec: true,
            expected_loss_percent: 5,
            dtx: false,
            complexity: 5,
            encoder_mode: EncoderMode::Voip,
            bitrate: 48_000,
            suppression: true,
            protection: Protection::default(),
        }
    }
}

impl PipelineConfig {
    /// The fast configuration: CELT-only low-delay coder at complexity 2 and
    /// 48 kbit/s, without in-band FEC. About half the CPU of the default and
    /// 12.5 ms instead of 16.5 ms delay, at equal or better measured quality;
    /// the receiving leg loses FEC protection.
    pub fn low_delay() -> Self {
        Self { fec: false, complexity: 2, encoder_mode: EncoderMode::LowDelay, ..Self::default() }
    }
}

/// What happened to the input of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Input {
    /// Decoded normally.
    Decoded,
    /// A DTX packet: passed on as DTX (DTX negotiated) or decoded as comfort
    /// noise and re-encoded (DTX not negotiated).
    Dtx,
    /// A lost packet rebuilt from the FEC data of the next packet.
    FecRecovered,
    /// Replaced by packet loss concealment: lost without FEC, or undecodable.
    Concealed,
}

/// Why an input packet counted as a decode error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InputError {
    /// The payload had no bytes.
    Empty,
    /// The payload exceeded [`MAX_PACKET_BYTES`](crate::packet::MAX_PACKET_BYTES).
    Oversize,
    /// Broken framing, or libopus could not decode it.
    Corrupt,
    /// Mono where stereo was negotiated or the reverse; decoded and remixed.
    ChannelMismatch,
}

/// The result of processing one packet. The output packet is in the caller's
/// buffer and always covers `samples`, the same duration as the input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Processed {
    /// Samples per channel at 48 kHz covered by input and output: the RTP
    /// timestamp increment.
    pub samples: u32,
    /// What happened to the input.
    pub input: Input,
    /// Set when the input counted as a decode error.
    pub error: Option<InputError>,
    /// The output packet carries no audio (DTX or an empty packet).
    pub dtx_out: bool,
    /// RNNoise speech probability of the last 10 ms block (0 when not run).
    pub speech_probability: f32,
}

/// Per-channel state of the signal path.
struct ChannelPath {
    denoiser: Box<DenoiseState<'static>>,
    /// Decoded samples waiting for a full RNNoise block (16-bit units).
    pending_in: Vec<f32>,
    /// Processed samples waiting for the encoder.
    pending_out: Vec<f32>,
    /// The previous input block: the dry signal aligned with RNNoise's output.
    dry: Vec<f32>,
    /// Scratch for the pre-gained block and RNNoise's output.
    scaled: Vec<f32>,
    denoised: Vec<f32>,
}

impl std::fmt::Debug for ChannelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelPath")
            .field("pending_in", &self.pending_in.len())
            .field("pending_out", &self.pending_out.len())
            .finish_non_exhaustive()
    }
}

impl ChannelPath {
    fn new() -> Self {
        let queue = MAX_PACKET_SAMPLES + 2 * BLOCK_SAMPLES;
        Self {
            denoiser: DenoiseState::new(),
            pending_in: Vec::with_capacity(queue),
            pending_out: Vec::with_capacity(queue),
            dry: vec![0.0; BLOCK_SAMPLES],
            scaled: vec![0.0; BLOCK_SAMPLES],
            denoised: vec![0.0; BLOCK_SAMPLES],
        }
    }
}

/// Suppression on/off with a fade, so a policy change mid-call never clicks.
#[derive(Debug, Clone, Copy)]
struct Switch {
    on: bool,
    /// Share of the suppressed signal in the output, 0..=1.
    wet: f32,
    /// Blocks RNNoise still runs unheard before fading in.
    warmup: u32,
}

/// Decode -> noise suppression -> encode for one published Opus track.
///
/// Sans-IO and single-threaded: the caller feeds packets in RTP order and gets
/// exactly one output packet per input packet or per reported loss, of the same
/// duration, so the output keeps the input's RTP timestamps. The audio inside is
/// delayed by [`Pipeline::latency`]. After construction no call allocates, as
/// long as the caller reuses its output `Vec`.
#[derive(Debug)]
pub struct Pipeline {
    config: PipelineConfig,
    decoder: Decoder,
    encoder: Encoder,
    channels: Vec<ChannelPath>,
    protector: Protector,
    switch: Switch,
    /// Decoded interleaved samples in libopus' float scale.
    decoded: Vec<f32>,
    /// Interleaved samples for the encoder in libopus' float scale.
    encode_in: Vec<f32>,
    /// Scratch: the channels' mean, for the protection of stereo tracks.
    mono: Vec<f32>,
    /// Pre-gain of the last two blocks, to undo it on RNNoise's delayed output.
    gains: [f32; 2],
    /// Share of input kept, for the previous block (ramped per sample).
    mix: f32,
    /// Voice probability of the previous block (it describes the block now
    /// leaving RNNoise).
    last_vad: f32,
    /// Duration of the last packet, assumed for a loss.
    last_samples: usize,
    /// Zero samples inserted to serve packets shorter than a block.
    padding: usize,
    lookahead: usize,
    /// The bandwidth the encoder is capped at: that of the input, since the
    /// decoded audio has nothing above it and bits spent there are lost.
    bandwidth: Option<packet::Bandwidth>,
    meters: TrackMeters,
    input_meter: SignalMeter,
    output_meter: SignalMeter,
    speech_meter: SpeechMeter,
    attenuation_meter: AttenuationMeter,
}

impl Pipeline {
    /// Creates the decoder, encoder and denoiser state for one track.
    pub fn new(config: PipelineConfig) -> Result<Self, DspError> {
        let channels = match config.channels {
            1 => Channels::Mono,
            2 => Channels::Stereo,
            _ => return Err(DspError::InvalidConfig("channels must be 1 or 2")),
        };
        if config.complexity > 10 {
            return Err(DspError::InvalidConfig("complexity must be 0..=10"));
        }
        if !(6_000..=510_000).contains(&config.bitrate) {
            return Err(DspError::InvalidConfig(
                "bitrate must be 6000..=510000 bit/s",
            ));
        }
        if config.expected_loss_percent > 100 {
            return Err(DspError::InvalidConfig(
                "expected_loss_percent must be 0..=100",
            ));
        }
        let application = match config.encoder_mode {
            EncoderMode::Voip => Application::Voip,
            EncoderMode::LowDelay if config.fec => {
                return Err(DspError::InvalidConfig(
                    "in-band FEC needs EncoderMode::Voip",
                ));
            }
            EncoderMode::LowDelay => Application::LowDelay,
        };
        let decoder = Decoder::new(SampleRate::Hz48000, channels)?;
        let mut encoder = Encoder::new(SampleRate::Hz48000, channels, application)?;
        encoder.set_signal(Signal::Voice)?;
        encoder.set_bitrate(Bitrate::BitsPerSecond(config.bitrate as i32))?;
        encoder.set_encoder_ctl_request(
            audiopus::ffi::OPUS_SET_COMPLEXITY_REQUEST,
            i32::from(config.complexity),
        )?;
        encoder.set_inband_fec(config.fec)?;
        encoder.set_packet_loss_perc(config.expected_loss_percent)?;
        encoder
            .set_encoder_ctl_request(audiopus::ffi::OPUS_SET_DTX_REQUEST, i32::from(config.dtx))?;
        let lookahead = encoder.lookahead()? as usize;

        let n = usize::from(config.channels);
        let mut meters = TrackMeters::default();
        meters.suppression.enabled = config.suppression;
        Ok(Self {
            config,
            decoder,
            encoder,
            channels: (0..n).map(|_| ChannelPath::new()).collect(),
            protector: Protector::new(config.protection),
            switch: Switch {
                on: config.suppression,
                wet: if config.suppression { 1.0 } else { 0.0 },
                warmup: 0,
            },
            decoded: vec![0.0; MAX_PACKET_SAMPLES * n],
            encode_in: vec![0.0; MAX_PACKET_SAMPLES * n],
            mono: vec![0.0; BLOCK_SAMPLES],
            gains: [1.0; 2],
            mix: 0.0,
            last_vad: 0.0,
            last_samples: SAMPLE_RATE as usize / 50,
            padding: 0,
            lookahead,
            bandwidth: None,
            meters,
            input_meter: SignalMeter::default(),
            output_meter: SignalMeter::default(),
            speech_meter: SpeechMeter::default(),
            attenuation_meter: AttenuationMeter::default(),
        })
    }

    /// The configuration the pipeline was built with (bit rate and suppression
    /// reflect later changes).
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// Processes one received packet and writes one output packet of the same
    /// duration into `out` (cleared first). A payload that cannot be decoded is
    /// concealed and counted, never an error: the stream goes on.
    ///
    /// # Errors
    /// None at present for any input; the `Result` is kept for codec failures
    /// that a future libopus could report.
    pub fn process(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<Processed, DspError> {
        self.meters.packets.received += 1;
        let info = match packet::inspect(payload) {
            Ok(info) => info,
            Err(error) => {
                let error = match error {
                    PacketError::Empty => InputError::Empty,
                    PacketError::Oversize => InputError::Oversize,
                    PacketError::Malformed => InputError::Corrupt,
                };
                return self.conceal(self.last_samples, error, out);
            }
        };
        let mismatch = info.stereo != (self.config.channels == 2);
        if mismatch {
            self.count_error(InputError::ChannelMismatch);
        }
        let error = mismatch.then_some(InputError::ChannelMismatch);
        if info.dtx {
            self.meters.packets.dtx += 1;
            self.last_samples = info.samples();
            if self.config.dtx {
                // Nothing to hear: pass DTX on without decoding or encoding.
                packet::write_dtx(payload, self.config.channels == 2, out);
                return Ok(self.sent(info.samples(), Input::Dtx, error, true));
            }
        }

        let n = info.samples() * usize::from(self.config.channels);
        match self
            .decoder
            .decode_float(Some(payload), &mut self.decoded[..n], false)
        {
            Ok(decoded) if decoded == info.samples() => self.last_samples = decoded,
            // The TOC of a packet that does not decode is no more trustworthy
            // than the rest of it: conceal for the stream's last good duration.
            _ => return self.conceal(self.last_samples, InputError::Corrupt, out),
        }
        let input = if info.dtx { Input::Dtx } else { Input::Decoded };
        if !info.dtx && self.bandwidth != Some(info.bandwidth) {
            self.follow_bandwidth(info.bandwidth);
        }
        self.run(info.samples(), input, error, out)
    }

    /// Writes the output packet for a lost input packet: rebuilt from the in-band
    /// FEC of `next` (the packet after the loss) when it carries some, concealed
    /// otherwise. Call it once per missing sequence number, in order, passing
    /// `next` only for the last one; the lost packet is assumed to last as long
    /// as the previous one.
    ///
    /// # Errors
    /// As [`Pipeline::process`].
    pub fn process_lost(
        &mut self,
        next: Option<&[u8]>,
        out: &mut Vec<u8>,
    ) -> Result<Processed, DspError> {
        self.meters.packets.lost += 1;
        let samples = self.last_samples;
        let n = samples * usize::from(self.config.channels);
        let fec = next.filter(|next| match packet::inspect(next) {
            Ok(info) => packet::has_fec(next, &info),
            Err(_) => false,
        });
        if let Some(next) = fec
            && self
                .decoder
                .decode_float(Some(next), &mut self.decoded[..n], true)
                .is_ok()
        {
            self.meters.packets.fec_recovered += 1;
            return self.run(samples, Input::FecRecovered, None, out);
        }
        self.meters.packets.concealed += 1;
        self.plc(samples);
        self.run(samples, Input::Concealed, None, out)
    }

    /// Switches suppression on or off. The change fades over 50 ms (after 30 ms
    /// of warm-up when switching on), so it can follow a policy change mid-call.
    /// While off, RNNoise does not run and the audio passes with the same delay.
    pub fn set_suppression(&mut self, on: bool) {
        if on && !self.switch.on && self.switch.wet == 0.0 {
            self.switch.warmup = WARMUP_BLOCKS;
        }
        self.switch.on = on;
        self.config.suppression = on;
        self.meters.suppression.enabled = on;
    }

    /// Changes the output bit rate (for example after a bandwidth estimate).
    ///
    /// # Errors
    /// [`DspError::InvalidConfig`] outside 6000..=510000; libopus errors.
    pub fn set_bitrate(&mut self, bitrate: u32) -> Result<(), DspError> {
        if !(6_000..=510_000).contains(&bitrate) {
            return Err(DspError::InvalidConfig(
                "bitrate must be 6000..=510000 bit/s",
            ));
        }
        self.encoder
            .set_bitrate(Bitrate::BitsPerSecond(bitrate as i32))?;
        self.config.bitrate = bitrate;
        Ok(())
    }

    /// The meters of this track, updated by every call.
    pub fn meters(&self) -> &TrackMeters {
        &self.meters
    }

    /// Records how long the caller's last `process` or `process_lost` call took.
    /// The pipeline never reads a clock itself.
    pub fn record_processing_time(&mut self, elapsed: Duration) {
        let timing = &mut self.meters.processing;
        timing.packets += 1;
        timing.audio_samples += self.last_samples as u64;
        timing.total += elapsed;
        timing.last = elapsed;
        timing.max = timing.max.max(elapsed);
    }

    /// Delay of the audio through the pipeline: one RNNoise block (10 ms), the
    /// encoder's look-ahead (6.5 ms in VoIP mode), and padding inserted for
    /// packets shorter than 10 ms, if any arrived.
    pub fn latency(&self) -> Duration {
        let samples = BLOCK_SAMPLES + self.lookahead + self.padding;
        Duration::from_micros(samples as u64 * 1_000_000 / u64::from(SAMPLE_RATE))
    }

    /// The same delay in samples at 48 kHz.
    pub fn latency_samples(&self) -> usize {
        BLOCK_SAMPLES + self.lookahead + self.padding
    }

    fn follow_bandwidth(&mut self, bandwidth: packet::Bandwidth) {
        use audiopus::Bandwidth as Opus;
        let cap = match bandwidth {
            packet::Bandwidth::Narrow => Opus::Narrowband,
            packet::Bandwidth::Medium => Opus::Mediumband,
            packet::Bandwidth::Wide => Opus::Wideband,
            packet::Bandwidth::SuperWide => Opus::Superwideband,
            packet::Bandwidth::Full => Opus::Fullband,
        };
        // A failed cap only costs efficiency; keep the old one and try again on
        // the next packet.
        if self.encoder.set_max_bandwidth(cap).is_ok() {
            self.bandwidth = Some(bandwidth);
        }
    }

    fn count_error(&mut self, error: InputError) {
        let packets = &mut self.meters.packets;
        packets.decode_errors += 1;
        match error {
            InputError::Empty => packets.empty += 1,
            InputError::Oversize => packets.oversize += 1,
            InputError::Corrupt => packets.corrupt += 1,
            InputError::ChannelMismatch => packets.channel_mismatch += 1,
        }
    }

    fn conceal(
        &mut self,
        samples: usize,
        error: InputError,
        out: &mut Vec<u8>,
    ) -> Result<Processed, DspError> {
        self.count_error(error);
        self.meters.packets.concealed += 1;
        self.plc(samples);
        self.run(samples, Input::Concealed, Some(error), out)
    }

    /// Fills `decoded` with libopus' loss concealment for `samples`.
    fn plc(&mut self, samples: usize) {
        let n = samples * usize::from(self.config.channels);
        if self
            .decoder
            .decode_float(None::<&[u8]>, &mut self.decoded[..n], false)
            .is_err()
        {
            // Only a frame size that is not a multiple of 2.5 ms fails here, and
            // durations come from TOC bytes, which cannot express one.
            self.decoded[..n].fill(0.0);
        }
    }

    /// Suppresses and encodes `samples` decoded samples per channel.
    fn run(
        &mut self,
        samples: usize,
        input: Input,
        error: Option<InputError>,
        out: &mut Vec<u8>,
    ) -> Result<Processed, DspError> {
        let n_channels = self.channels.len();
        for (c, path) in self.channels.iter_mut().enumerate() {
            let decoded = self.decoded[..samples * n_channels]
                .iter()
                .skip(c)
                .step_by(n_channels);
            path.pending_in.extend(decoded.map(|x| x * FULL_SCALE));
        }
        while self.channels[0].pending_in.len() >= BLOCK_SAMPLES {
            self.process_block();
            for path in &mut self.channels {
                path.pending_in.drain(..BLOCK_SAMPLES);
            }
        }
        // Packets shorter than a block: pad once with silence, which raises the
        // latency of this stream for good but keeps every packet served.
        let short = samples.saturating_sub(self.channels[0].pending_out.len());
        if short > 0 {
            self.padding += short;
            for path in &mut self.channels {
                path.pending_out
                    .splice(0..0, std::iter::repeat_n(0.0, short));
            }
        }
        for (c, path) in self.channels.iter_mut().enumerate() {
            let frame = self.encode_in[..samples * n_channels]
                .iter_mut()
                .skip(c)
                .step_by(n_channels);
            for (dst, src) in frame.zip(path.pending_out.drain(..samples)) {
                *dst = src / FULL_SCALE;
            }
        }

        out.clear();
        out.resize(MAX_OUTPUT_BYTES, 0);
        let stereo = n_channels == 2;
        let encoded = if ENCODER_DURATIONS.contains(&samples) {
            self.encoder
                .encode_float(&self.encode_in[..samples * n_channels], out)
        } else {
            Err(audiopus::Error::InvalidChannels(0))
        };
        let dtx_out = match encoded {
            Ok(len) => {
                out.truncate(len);
                len <= packet::DTX_MAX_BYTES
            }
            Err(_) => {
                self.meters.packets.encode_errors += 1;
                packet::write_empty(samples, stereo, out);
                true
            }
        };
        Ok(self.sent(samples, input, error, dtx_out))
    }

    fn sent(
        &mut self,
        samples: usize,
        input: Input,
        error: Option<InputError>,
        dtx_out: bool,
    ) -> Processed {
        self.meters.packets.sent += 1;
        self.meters.packets.dtx_sent += u64::from(dtx_out);
        Processed {
            samples: samples as u32,
            input,
            error,
            dtx_out,
            speech_probability: self.last_vad,
        }
    }

    /// Runs one 10 ms block from `pending_in` into `pending_out`.
    fn process_block(&mut self) {
        let switch = &mut self.switch;
        let run_rnnoise = switch.on || switch.wet > 0.0;
        let wet_start = switch.wet;
        if switch.on && switch.warmup > 0 {
            switch.warmup -= 1;
        } else if switch.on {
            switch.wet = (switch.wet + 1.0 / SWITCH_RAMP_BLOCKS as f32).min(1.0);
        } else {
            switch.wet = (switch.wet - 1.0 / SWITCH_RAMP_BLOCKS as f32).max(0.0);
        }
        let wet_end = switch.wet;

        let gain_now = self.protector.pre_gain();
        let [gain_before, gain_last] = self.gains;
        let mut vad = 0.0f32;
        let mut input_power = 0.0f32;
        for path in &mut self.channels {
            let block = &path.pending_in[..BLOCK_SAMPLES];
            input_power += block.iter().map(|x| x * x).sum::<f32>();
            if run_rnnoise {
                for (i, (dst, &x)) in path.scaled.iter_mut().zip(block).enumerate() {
                    *dst = x * ramp(gain_last, gain_now, i);
                }
                let p = path
                    .denoiser
                    .process_frame(&mut path.denoised, &path.scaled);
                // Undo the pre-gain the delayed output was analysed with.
                for (i, y) in path.denoised.iter_mut().enumerate() {
                    *y /= ramp(gain_before, gain_last, i);
                }
                vad = vad.max(p);
            }
        }
        input_power /= (BLOCK_SAMPLES * self.channels.len()) as f32;

        // Meters of the input see this block; without RNNoise, speech is judged
        // by level against the noise floor.
        let floor = self.input_meter.stats.noise_floor_dbfs;
        let speech = if run_rnnoise {
            self.speech_meter.update(vad);
            vad >= 0.5
        } else {
            crate::meters::power_dbfs(input_power) > floor + 6.0
        };
        let mix_start = self.mix;
        let mix_end = if !run_rnnoise {
            1.0
        } else if let [mono] = &self.channels[..] {
            self.protector
                .update(vad, &mono.pending_in[..BLOCK_SAMPLES], input_power)
        } else {
            for (i, m) in self.mono.iter_mut().enumerate() {
                *m = self
                    .channels
                    .iter()
                    .map(|path| path.pending_in[i])
                    .sum::<f32>()
                    / self.channels.len() as f32;
            }
            self.protector.update(vad, &self.mono, input_power)
        };
        self.mix = mix_end;
        self.gains = [gain_last, gain_now];

        let mut dry_power = 0.0f32;
        let mut out_power = 0.0f32;
        for path in &mut self.channels {
            self.input_meter
                .update(&path.pending_in[..BLOCK_SAMPLES], speech);
            let start = path.pending_out.len();
            for i in 0..BLOCK_SAMPLES {
                let dry = path.dry[i];
                let y = if run_rnnoise {
                    let keep = ramp(mix_start, mix_end, i);
                    let wet = ramp(wet_start, wet_end, i) * (1.0 - keep);
                    dry + wet * (path.denoised[i] - dry)
                } else {
                    dry
                };
                dry_power += dry * dry;
                out_power += y * y;
                path.pending_out.push(y);
            }
            self.output_meter
                .update(&path.pending_out[start..], self.last_vad >= 0.5);
            path.dry.copy_from_slice(&path.pending_in[..BLOCK_SAMPLES]);
        }
        let attenuation = self.attenuation_meter.update(dry_power, out_power);
        self.last_vad = vad;

        let meters = &mut self.meters;
        meters.input = self.input_meter.stats;
        meters.output = self.output_meter.stats;
        meters.speech = self.speech_meter.stats;
        meters.suppression.attenuation_db = attenuation;
        meters.suppression.limit_db = if run_rnnoise {
            self.protector.limit_db()
        } else {
            0.0
        };
        meters.suppression.pre_gain_db = 20.0 * gain_now.log10();
        meters.suppression.snr_db = self.protector.snr_db().unwrap_or(0.0);
    }
}

/// Linear interpolation across one block, sample `i` of [`BLOCK_SAMPLES`].
fn ramp(from: f32, to: f32, i: usize) -> f32 {
    from + (to - from) * (i as f32 + 1.0) / BLOCK_SAMPLES as f32
}
