//! `fleetcall device run`: the reference device agent.
//!
//! Registers with the device's certificate, rings when called (answers with
//! `--auto-answer`), calls `--call OTHER` once registered, joins the call's
//! media with one Opus track fed from a looping WAV file (`--mic`, or
//! silence) and writes what it hears, decoded and mixed, to `--record`.
//! Ctrl-C or SIGTERM hang up first, then close the connection.
//!
//! Lifecycle lines go to stdout, one per line, for humans and scripts:
//! `registered ID session N`, `incoming call C from X`, `call C PHASE`,
//! `media connected call C`, `call C ended REASON by X`,
//! `disconnected: DETAIL`, `reconnected session N resumed BOOL`,
//! `session lost: REASON`, `stopped`.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use audiopus::coder::{Decoder, Encoder};
use audiopus::{Application, Channels, SampleRate};
use fleetcall_sfu::client::{MediaConfig, MediaEvent, MediaPeer, FRAME};
use fleetcall_signaling::client::{Client, ClientConfig, ClientEvent};
use fleetcall_signaling::ids::CallId;
use fleetcall_signaling::pb::{CallPhase, EndReason, ParticipantStatus};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Samples in one 20 ms frame at 48 kHz.
const FRAME_SAMPLES: usize = 960;
/// Decoded audio kept per remote stream before the oldest is dropped.
const MAX_BUFFERED: usize = 10 * FRAME_SAMPLES;

/// `fleetcall device run` flags.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The device id (must match the certificate's).
    #[arg(long)]
    pub id: String,
    /// The installation CA certificate (PEM) the server's certificate is checked against.
    #[arg(long)]
    pub ca: PathBuf,
    /// The device certificate (PEM), from `fleetcall device enroll`.
    #[arg(long)]
    pub cert: PathBuf,
    /// The device key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// The server's QUIC address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    pub server: SocketAddr,
    /// The name in the server certificate.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Answer incoming calls at once.
    #[arg(long)]
    pub auto_answer: bool,
    /// Call this device once registered.
    #[arg(long, value_name = "OTHER_ID")]
    pub call: Option<String>,
    /// Microphone: a 48 kHz mono 16-bit WAV file, looped. Silence without it.
    #[arg(long, value_name = "IN.wav")]
    pub mic: Option<PathBuf>,
    /// Write what the device hears (decoded, mixed) to this WAV file.
    #[arg(long, value_name = "OUT.wav")]
    pub record: Option<PathBuf>,
    /// Stop after this many seconds (hanging up first).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// IP of the media socket. Default: the interface that routes to the server.
    #[arg(long)]
    pub media_ip: Option<IpAddr>,
}

/// Runs the agent until Ctrl-C, SIGTERM or `--duration`.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mic = args.mic.as_deref().map(Mic::open).transpose()?;
    let recorder = args.record.as_deref().map(Recorder::create).transpose()?;
    let duration = args
        .duration
        .map(|secs| Duration::try_from_secs_f64(secs).ok().filter(|d| !d.is_zero()).context("--duration must be a positive number of seconds"))
        .transpose()?;
    let media_ip = match args.media_ip {
        Some(ip) => ip,
        None => route_to(args.server).context("finding the interface that reaches the server (set --media-ip)")?,
    };
    check_identity(&args.cert, &args.id)?;
    let mut config = ClientConfig::from_files(args.server, args.server_name.clone(), &args.ca, &args.cert, &args.key)
        .context("loading the device identity")?;
    config.core.software_version = concat!("fleetcall-device/", env!("CARGO_PKG_VERSION")).into();
    let (client, events) = Client::connect(config).await.with_context(|| format!("registering with {}", args.server))?;

    let mut agent = Agent {
        id: args.id.clone(),
        client,
        auto_answer: args.auto_answer,
        media_ip,
        call: None,
        mic,
        encoder: Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip).context("Opus encoder")?,
        recorder,
    };
    let outcome = agent.run(events, args.call.as_deref(), duration).await;
    agent.shutdown().await;
    println!("stopped");
    outcome
}

/// Refuses to run when `--id` is not the identity the certificate carries.
fn check_identity(cert: &Path, id: &str) -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(cert).with_context(|| format!("reading {}", cert.display()))?;
    let named = fleetcall_signaling::pki::device_id_of(&der).with_context(|| format!("{}", cert.display()))?;
    if named != id {
        bail!("{} is the certificate of {named:?}, not of --id {id:?}", cert.display());
    }
    Ok(())
}

/// The local IP the system would use to reach `server` (no packet is sent).
fn route_to(server: SocketAddr) -> std::io::Result<IpAddr> {
    let any: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(server)?;
    Ok(socket.local_addr()?.ip())
}

/// The call the device is in.
struct Call {
    id: CallId,
    phase: CallPhase,
    media: Option<Media>,
}

/// The call's media peer and what it heard.
struct Media {
    peer: MediaPeer,
    events: mpsc::Receiver<MediaEvent>,
    connected: bool,
    mixer: Mixer,
    decoders: BTreeMap<Arc<str>, Decoder>,
}

struct Agent {
    id: String,
    client: Client,
    auto_answer: bool,
    media_ip: IpAddr,
    call: Option<Call>,
    mic: Option<Mic>,
    encoder: Encoder,
    recorder: Option<Recorder>,
}

impl Agent {
    async fn run(&mut self, mut events: mpsc::UnboundedReceiver<ClientEvent>, callee: Option<&str>, duration: Option<Duration>) -> anyhow::Result<()> {
        let deadline = duration.map(|d| tokio::time::Instant::now() + d);
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
        let mut frames = tokio::time::interval(FRAME);
        // After a stall, carry on at the normal pace rather than in a burst.
        frames.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The registration first, so the lines come in the order things happened.
        while let Ok(event) = events.try_recv() {
            self.on_event(event).await;
        }
        if let Some(callee) = callee {
            match self.client.invite(callee).await {
                Ok(call) => {
                    println!("calling {callee}: call {}", call.0);
                    self.call = Some(Call { id: call, phase: CallPhase::Inviting, media: None });
                }
                Err(e) => bail!("calling {callee}: {e}"),
            }
        }
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => { info!("interrupted"); return Ok(()) }
                _ = terminate.recv() => { info!("terminated"); return Ok(()) }
                () = sleep_until(deadline) => { info!("duration reached"); return Ok(()) }
                event = events.recv() => {
                    let Some(event) = event else { bail!("the client stopped") };
                    if let ClientEvent::Ended { close, reason } = &event {
                        // Permanent: this credential will not get in again.
                        println!("refused for good ({}): {reason}", close.as_str_name());
                        bail!("the server refused this device for good ({}): {reason}", close.as_str_name());
                    }
                    self.on_event(event).await;
                }
                event = media_event(&mut self.call) => self.on_media(event),
                _ = frames.tick() => self.on_frame(),
            }
        }
    }

    async fn on_event(&mut self, event: ClientEvent) {
        debug!(?event, "event");
        match event {
            ClientEvent::Connected { session, resumed: true, .. } => println!("reconnected session {} resumed true", session.0),
            ClientEvent::Connected { session, resumed: false, .. } => {
                println!("registered {} session {}", self.id, session.0);
            }
            ClientEvent::Disconnected { detail, .. } => println!("disconnected: {detail}"),
            ClientEvent::SessionUnknown { reason, .. } => {
                // Every call of the old session is over.
                println!("session lost: {reason}");
                self.call = None;
            }
            ClientEvent::Rejected(rejected) => println!("rejected: {}", rejected.reason),
            ClientEvent::ServerError(error) => warn!(code = error.code, message = %error.message, "server error"),
            ClientEvent::IncomingCall(incoming) => {
                let call = CallId(incoming.call_id);
                println!("incoming call {} from {}", call.0, incoming.from);
                if self.call.as_ref().is_some_and(|c| c.id != call) {
                    // The server never alerts a busy device; be safe anyway.
                    spawn_request("decline", self.client.decline(call));
                    return;
                }
                self.call = Some(Call { id: call, phase: CallPhase::Inviting, media: None });
                spawn_request("ringing", self.client.ringing(call));
                if self.auto_answer {
                    spawn_request("accept", self.client.accept(call));
                }
            }
            ClientEvent::CallState(state) => {
                let call = CallId(state.call_id);
                let phase = CallPhase::try_from(state.phase).unwrap_or(CallPhase::Unspecified);
                if self.call.is_none() && phase == CallPhase::Ended {
                    return;
                }
                let current = self.call.get_or_insert_with(|| Call { id: call, phase: CallPhase::Unspecified, media: None });
                if current.id != call {
                    return;
                }
                if current.phase != phase {
                    println!("call {} {}", call.0, phase.as_str_name().trim_start_matches("CALL_PHASE_"));
                    current.phase = phase;
                }
                let joining = state
                    .participants
                    .iter()
                    .any(|p| p.device_id == self.id && p.status == ParticipantStatus::Joining as i32);
                if joining
                    && current.media.is_none()
                    && let Err(e) = self.join_media(call).await
                {
                    warn!(error = %e, "joining media failed");
                }
            }
            ClientEvent::CallEnded(ended) => {
                let reason = EndReason::try_from(ended.reason).unwrap_or(EndReason::Unspecified);
                println!("call {} ended {} by {}", ended.call_id, reason.as_str_name().trim_start_matches("END_REASON_"), ended.by);
                if self.call.as_ref().is_some_and(|c| c.id.0 == ended.call_id) {
                    self.call = None;
                }
            }
            ClientEvent::ParticipantUpdate(update) => {
                let status = ParticipantStatus::try_from(update.status).unwrap_or(ParticipantStatus::Unspecified);
                info!(call = update.call_id, device = %update.device_id, status = status.as_str_name(), "participant");
            }
            ClientEvent::SdpAnswer(answer) => {
                let Some(media) = self.media_of(answer.call_id) else { return };
                if let Err(e) = media.peer.accept_answer(answer.sdp).await {
                    warn!(error = %e, "the SFU's answer was refused");
                }
            }
            ClientEvent::SdpOffer(offer) => {
                let Some(media) = self.media_of(offer.call_id) else { return };
                match media.peer.accept_offer(offer.sdp).await {
                    Ok(sdp) => spawn_request("sdp answer", self.client.sdp_answer(CallId(offer.call_id), offer.revision, sdp)),
                    Err(e) => warn!(error = %e, "the SFU's offer was refused"),
                }
            }
            _ => {}
        }
    }

    fn media_of(&mut self, call: u64) -> Option<&mut Media> {
        self.call.as_mut().filter(|c| c.id.0 == call)?.media.as_mut()
    }

    /// Starts the media peer and offers it to the call.
    async fn join_media(&mut self, call: CallId) -> anyhow::Result<()> {
        let config = MediaConfig { bind: SocketAddr::new(self.media_ip, 0), ..MediaConfig::default() };
        let (peer, events) = MediaPeer::start(config).await?;
        let offer = peer.create_offer().await?;
        spawn_request("sdp offer", self.client.sdp_offer(call, 1, offer));
        if let Some(current) = self.call.as_mut() {
            current.media = Some(Media { peer, events, connected: false, mixer: Mixer::default(), decoders: BTreeMap::new() });
        }
        Ok(())
    }

    fn on_media(&mut self, event: MediaEvent) {
        let Some(call) = self.call.as_mut() else { return };
        let Some(media) = call.media.as_mut() else { return };
        match event {
            MediaEvent::Connected => {
                media.connected = true;
                println!("media connected call {}", call.id.0);
            }
            MediaEvent::Disconnected => {
                media.connected = false;
                info!(call = call.id.0, "media disconnected");
            }
            MediaEvent::Frame(frame) => {
                if self.recorder.is_none() {
                    return;
                }
                let decoder = match media.decoders.entry(frame.stream.clone()) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => match Decoder::new(SampleRate::Hz48000, Channels::Mono) {
                        Ok(decoder) => e.insert(decoder),
                        Err(err) => {
                            warn!(error = %err, "Opus decoder");
                            return;
                        }
                    },
                };
                let mut pcm = [0i16; 6 * FRAME_SAMPLES];
                match decoder.decode(Some(&frame.payload[..]), &mut pcm[..], false) {
                    Ok(n) => media.mixer.push(&frame.stream, &pcm[..n.min(pcm.len())]),
                    // A remote's bad packet costs one frame of its audio.
                    Err(e) => debug!(error = %e, stream = %frame.stream, "undecodable frame"),
                }
            }
            MediaEvent::Failed(reason) => warn!(%reason, "media failed"),
            _ => {}
        }
    }

    /// Every 20 ms: one microphone frame out, one mixed frame to the recording.
    fn on_frame(&mut self) {
        let Some(media) = self.call.as_mut().and_then(|c| c.media.as_mut()) else { return };
        if media.connected {
            let pcm = match self.mic.as_mut() {
                Some(mic) => mic.next_frame(),
                None => [0; FRAME_SAMPLES],
            };
            let mut packet = [0u8; 1275];
            match self.encoder.encode(&pcm, &mut packet) {
                Ok(n) => {
                    let _ = media.peer.send_opus(packet[..n].to_vec());
                }
                Err(e) => warn!(error = %e, "Opus encode"),
            }
        }
        if let Some(recorder) = self.recorder.as_mut()
            && media.connected
            && let Err(e) = recorder.write(&media.mixer.mix())
        {
            warn!(error = %e, "recording failed; stopping it");
            self.recorder = None;
        }
    }

    /// Hangs up the current call, closes the connection, finishes the recording.
    async fn shutdown(&mut self) {
        if let Some(call) = self.call.take() {
            match tokio::time::timeout(Duration::from_secs(3), self.client.hangup(call.id)).await {
                Ok(Ok(())) => println!("hung up call {}", call.id.0),
                Ok(Err(e)) => warn!(error = %e, "hangup failed"),
                Err(_) => warn!("hangup not answered in time"),
            }
        }
        self.client.close().await;
        if let Some(recorder) = self.recorder.take() {
            match recorder.finish() {
                Ok(path) => info!(path = %path.display(), "recording written"),
                Err(e) => warn!(error = %e, "finishing the recording"),
            }
        }
    }
}

/// The next media event of the current call, or never.
async fn media_event(call: &mut Option<Call>) -> MediaEvent {
    match call.as_mut().and_then(|c| c.media.as_mut()) {
        Some(media) => match media.events.recv().await {
            Some(event) => event,
            // The peer stopped: nothing more will come.
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Awaits a request in the background, logging a failure.
fn spawn_request(what: &'static str, request: impl Future<Output = Result<(), fleetcall_signaling::client::ClientError>> + Send + 'static) {
    tokio::spawn(async move {
        if let Err(e) = request.await {
            warn!(error = %e, "{what} failed");
        }
    });
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A looping microphone from a WAV file.
#[derive(Debug)]
struct Mic {
    samples: Vec<i16>,
    position: usize,
}

impl Mic {
    /// Loads a 48 kHz mono 16-bit PCM WAV file.
    fn open(path: &Path) -> anyhow::Result<Mic> {
        let reader = hound::WavReader::open(path).with_context(|| format!("opening {}", path.display()))?;
        let spec = reader.spec();
        if spec.sample_rate != 48_000 || spec.channels != 1 || spec.bits_per_sample != 16 || spec.sample_format != hound::SampleFormat::Int {
            bail!(
                "{}: need a 48000 Hz mono 16-bit PCM WAV file, got {} Hz, {} channel(s), {}-bit {:?}",
                path.display(),
                spec.sample_rate,
                spec.channels,
                spec.bits_per_sample,
                spec.sample_format
            );
        }
        let samples = reader.into_samples::<i16>().collect::<Result<Vec<_>, _>>().with_context(|| format!("reading {}", path.display()))?;
        if samples.is_empty() {
            bail!("{}: no samples", path.display());
        }
        Ok(Mic { samples, position: 0 })
    }

    /// The next 20 ms, wrapping around at the end.
    fn next_frame(&mut self) -> [i16; FRAME_SAMPLES] {
        let mut frame = [0; FRAME_SAMPLES];
        for sample in &mut frame {
            *sample = self.samples[self.position];
            self.position = (self.position + 1) % self.samples.len();
        }
        frame
    }
}

/// Decoded audio per remote stream, mixed 20 ms at a time.
#[derive(Debug, Default)]
struct Mixer {
    streams: BTreeMap<Arc<str>, VecDeque<i16>>,
}

impl Mixer {
    fn push(&mut self, stream: &Arc<str>, pcm: &[i16]) {
        let buffer = self.streams.entry(stream.clone()).or_default();
        buffer.extend(pcm);
        // A sender faster than our clock (or a burst) must not grow latency forever.
        let excess = buffer.len().saturating_sub(MAX_BUFFERED);
        buffer.drain(..excess);
    }

    /// One frame: the sum of every stream's next 20 ms, saturating; silence
    /// where a stream has nothing.
    fn mix(&mut self) -> [i16; FRAME_SAMPLES] {
        let mut sum = [0i32; FRAME_SAMPLES];
        for buffer in self.streams.values_mut() {
            for (acc, sample) in sum.iter_mut().zip(buffer.drain(..buffer.len().min(FRAME_SAMPLES))) {
                *acc += i32::from(sample);
            }
        }
        // Clamped to the i16 range first, so the cast cannot wrap.
        sum.map(|s| s.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16)
    }
}

/// The recording: 48 kHz mono 16-bit WAV.
struct Recorder {
    path: PathBuf,
    writer: hound::WavWriter<std::io::BufWriter<std::fs::File>>,
}

impl Recorder {
    fn create(path: &Path) -> anyhow::Result<Recorder> {
        let spec = hound::WavSpec { channels: 1, sample_rate: 48_000, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
        let writer = hound::WavWriter::create(path, spec).with_context(|| format!("creating {}", path.display()))?;
        Ok(Recorder { path: path.to_owned(), writer })
    }

    fn write(&mut self, pcm: &[i16]) -> Result<(), hound::Error> {
        pcm.iter().try_for_each(|&s| self.writer.write_sample(s))
    }

    fn finish(self) -> Result<PathBuf, hound::Error> {
        self.writer.finalize()?;
        Ok(self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("fleetcall-agent-{}-{name}", std::process::id()))
    }

    fn write_wav(path: &Path, rate: u32, channels: u16, samples: &[i16]) {
        let spec = hound::WavSpec { channels, sample_rate: rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
        let mut w = hound::WavWriter::create(path, spec).unwrap();
        for &s in samples {
            w.write_sample(s).unwrap();
        }
        w.finalize().unwrap();
    }

    #[test]
    fn mic_loops_and_refuses_other_formats() {
        let good = temp("good.wav");
        write_wav(&good, 48_000, 1, &(0..1000).map(|i| i as i16).collect::<Vec<_>>());
        let mut mic = Mic::open(&good).unwrap();
        let first = mic.next_frame();
        let second = mic.next_frame();
        assert_eq!(first[959], 959);
        assert_eq!(second[39], 999);
        assert_eq!(second[40], 0, "wraps around");

        let stereo = temp("stereo.wav");
        write_wav(&stereo, 48_000, 2, &[0; 100]);
        let err = Mic::open(&stereo).unwrap_err().to_string();
        assert!(err.contains("48000 Hz mono 16-bit") && err.contains("2 channel"), "{err}");
        let slow = temp("slow.wav");
        write_wav(&slow, 16_000, 1, &[0; 100]);
        assert!(Mic::open(&slow).unwrap_err().to_string().contains("16000 Hz"));
        let empty = temp("empty.wav");
        write_wav(&empty, 48_000, 1, &[]);
        assert!(Mic::open(&empty).is_err());
        assert!(Mic::open(&temp("missing.wav")).is_err());
        for p in [good, stereo, slow, empty] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn mixer_sums_saturates_pads_and_bounds_latency() {
        let mut mixer = Mixer::default();
        let a: Arc<str> = "1".into();
        let b: Arc<str> = "2".into();
        mixer.push(&a, &[20_000; FRAME_SAMPLES]);
        mixer.push(&b, &[20_000; FRAME_SAMPLES / 2]);
        let frame = mixer.mix();
        assert_eq!(frame[0], i16::MAX, "saturates");
        assert_eq!(frame[FRAME_SAMPLES - 1], 20_000, "b ran out: only a");
        assert_eq!(mixer.mix(), [0; FRAME_SAMPLES], "silence when nothing is buffered");
        mixer.push(&a, &vec![1; 3 * MAX_BUFFERED]);
        assert_eq!(mixer.streams[&a].len(), MAX_BUFFERED);
    }

    #[test]
    fn recorder_writes_a_readable_wav() {
        let path = temp("rec.wav");
        let mut rec = Recorder::create(&path).unwrap();
        rec.write(&[7; FRAME_SAMPLES]).unwrap();
        rec.finish().unwrap();
        let reader = hound::WavReader::open(&path).unwrap();
        assert_eq!(reader.spec().sample_rate, 48_000);
        assert_eq!(reader.into_samples::<i16>().count(), FRAME_SAMPLES);
        let _ = std::fs::remove_file(path);
    }
}
