//! What every group task of a run shares (read-only, plus atomic counters).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use fleetcall_peer::DtlsIdentity;

use crate::audio::{Clip, TalkPattern};
use crate::control::Registrar;
use crate::outcome::Live;

/// Shared by the tasks of one run.
#[derive(Debug)]
pub struct Ctx {
    /// The one DTLS certificate of every WebRTC peer of the run.
    pub identity: DtlsIdentity,
    /// The speech clip, one variant per talker of a room (different gain,
    /// so no two talkers of a room ever send the same payload).
    pub speech: Vec<Arc<Clip>>,
    /// What a silent device sends (DTX).
    pub silence: Arc<Clip>,
    /// Talkers' talk/silence pattern.
    pub talk: TalkPattern,
    /// How devices register on the control plane.
    pub control: Registrar,
    /// Local IP of every media socket the tool opens.
    pub bind_ip: IpAddr,
    /// Progress counters.
    pub live: Arc<Live>,
    /// Frames sent in this window count for loss.
    pub window: (Instant, Instant),
    /// When the ramp ends (fault times are counted from here).
    pub ramp_end: Instant,
    /// Prefix of device ids and room names.
    pub prefix: String,
}

impl Ctx {
    /// The speech clip of talker `v` of a room.
    pub fn speech_variant(&self, v: usize) -> Arc<Clip> {
        self.speech[v % self.speech.len()].clone()
    }
}

/// Encodes `variants` versions of the samples, each 3 % quieter than the
/// one before (distinct Opus payloads, same speech).
pub fn speech_variants(
    samples: &[i16],
    variants: usize,
    dtx: bool,
) -> anyhow::Result<Vec<Arc<Clip>>> {
    (0..variants.max(1))
        .map(|v| {
            let gain = 0.97f32.powi(v as i32);
            let scaled: Vec<i16> = samples
                .iter()
                .map(|&s| (f32::from(s) * gain).round() as i16)
                .collect();
            Ok(Arc::new(Clip::encode_with(&scaled, dtx)?))
        })
        .collect()
}
