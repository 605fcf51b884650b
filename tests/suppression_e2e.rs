//! Noise suppression end to end: a device agent publishes noisy speech with
//! suppression on; the other device's recording (decoded) has at least 6 dB
//! less noise in the speech pauses than what was sent, the talk spurts keep
//! their level within 10 dB, and the server's audio meters report the track
//! as denoised with its noise floor lowered by at least 6 dB.

mod common;
mod quic_support;

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use common::Server;
use quic_support::{enroll, scratch, Agent, PROMPT};
use serde_json::Value;

const RATE: f32 = 48_000.0;

/// Noisy "speech": 600 ms voiced bursts (a 120 Hz glottal pulse train through
/// two formant resonators, about -20 dBFS) and 600 ms pauses, over white noise
/// at about -40 dBFS throughout. Deterministic.
fn write_noisy_speech(path: &Path, seconds: f32) -> anyhow::Result<()> {
    let mut samples = Vec::with_capacity((RATE * seconds) as usize);
    // Two-pole resonators for formants at 700 Hz and 1200 Hz.
    let resonator = |freq: f32, bandwidth: f32| {
        let r = (-std::f32::consts::PI * bandwidth / RATE).exp();
        let theta = 2.0 * std::f32::consts::PI * freq / RATE;
        (2.0 * r * theta.cos(), -r * r)
    };
    let (a1, a2) = resonator(700.0, 90.0);
    let (b1, b2) = resonator(1200.0, 110.0);
    let (mut y1, mut y2, mut z1, mut z2) = (0.0f32, 0.0f32, 0.0f32, 0.0f32);
    let mut seed = 0x2545_f491_u32;
    for i in 0..(RATE * seconds) as usize {
        let t = i as f32 / RATE;
        let voiced = ((t / 0.6) as usize).is_multiple_of(2);
        let period = (RATE / (120.0 + 8.0 * (t * 3.0).sin())) as usize;
        let pulse = if voiced && i % period == 0 { 1.0 } else { 0.0 };
        let y = pulse + a1 * y1 + a2 * y2;
        (y2, y1) = (y1, y);
        let z = y + b1 * z1 + b2 * z2;
        (z2, z1) = (z1, z);
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let noise = (seed as f32 / u32::MAX as f32 - 0.5) * 2.0 * 0.0173 * 32767.0; // uniform, RMS ~ -40 dBFS
        let speech = z * 26.0;
        samples.push((speech + noise).clamp(-32767.0, 32767.0) as i16);
    }
    Ok(fleetcall_peer::wav::write(path, &samples)?)
}

/// Energies (dBFS) of 20 ms frames, skipping digital silence (before media
/// flowed, or a gap), sorted ascending.
fn frame_levels(samples: &[i16]) -> Vec<f64> {
    let mut levels: Vec<f64> = samples
        .chunks(960)
        .filter(|frame| frame.len() == 960)
        .map(|frame| {
            let power = frame.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / 960.0;
            10.0 * (power / 32767f64.powi(2)).max(1e-12).log10()
        })
        .filter(|db| *db > -85.0)
        .collect();
    levels.sort_by(f64::total_cmp);
    levels
}

/// Mean of the levels between two quantiles: pauses are the quietest frames,
/// talk spurts the loudest (half of the signal is each).
fn band(levels: &[f64], from: f64, to: f64) -> f64 {
    let (a, b) = ((levels.len() as f64 * from) as usize, (levels.len() as f64 * to) as usize);
    let slice = &levels[a..b.max(a + 1)];
    slice.iter().sum::<f64>() / slice.len() as f64
}

fn read(path: &Path) -> anyhow::Result<Vec<i16>> {
    Ok(fleetcall_peer::wav::read(path)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denoised_call_has_quieter_pauses_and_the_meters_show_it() -> anyhow::Result<()> {
    let server = Server::start(&["--suppression", "on"])?;
    let noisy = scratch("noisy-speech.wav");
    let recording = scratch("denoised.wav");
    write_noisy_speech(&noisy, 6.0)?;
    let ward = enroll(&server, "ward")?;
    let desk = enroll(&server, "desk")?;

    let mut callee = Agent::spawn(&server, &ward, "ward", &["--auto-answer", "--record", recording.to_str().context("path")?])?;
    callee.line("registered ward", PROMPT * 2).await?;
    let mut caller = Agent::spawn(&server, &desk, "desk", &["--call", "ward", "--mic", noisy.to_str().context("path")?])?;
    caller.line("calling ward: call ", PROMPT * 2).await?;
    callee.line("media connected", PROMPT * 2).await?;
    // Five seconds of talk spurts and pauses through the pipeline.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let meters: Value = serde_json::from_str(&common::http_get(&format!("{}/api/audio", server.url), Some(&server.admin_token)).await?)?;
    // Both devices publish; the caller's is the loud one (the callee sends silence).
    let track = meters
        .as_array()
        .and_then(|tracks| {
            tracks
                .iter()
                .filter(|t| t["packets"]["received"].as_u64().unwrap_or(0) > 100)
                .max_by(|a, b| a["input"]["rms_dbfs"].as_f64().unwrap_or(-200.0).total_cmp(&b["input"]["rms_dbfs"].as_f64().unwrap_or(-200.0)))
        })
        .with_context(|| format!("no processed track with traffic: {meters}"))?
        .clone();
    assert_eq!(track["suppression"], true, "{track}");
    // The meters see the same: the noise floor after suppression is well
    // below the one before (overall attenuation stays small: speech dominates power).
    let floor_in = track["input"]["noise_floor_dbfs"].as_f64().context("input noise floor")?;
    let floor_out = track["output"]["noise_floor_dbfs"].as_f64().context("output noise floor")?;
    assert!(floor_in - floor_out >= 6.0, "meters: noise floor {floor_in:.1} -> {floor_out:.1} dBFS: {track}");

    assert!(common::sigterm(callee.child.id())?);
    callee.line("stopped", PROMPT).await?;
    let _ = caller.child.kill();

    let sent = frame_levels(&read(&noisy)?);
    let heard = frame_levels(&read(&recording)?);
    assert!(heard.len() > 100, "recorded {} frames of audio", heard.len());
    let (sent_pauses, heard_pauses) = (band(&sent, 0.05, 0.35), band(&heard, 0.05, 0.35));
    let (sent_speech, heard_speech) = (band(&sent, 0.65, 0.95), band(&heard, 0.65, 0.95));
    println!(
        "pauses {sent_pauses:.1} -> {heard_pauses:.1} dBFS, talk spurts {sent_speech:.1} -> {heard_speech:.1} dBFS, meters: noise floor {floor_in:.1} -> {floor_out:.1} dBFS"
    );
    assert!(sent_pauses - heard_pauses >= 6.0, "noise in pauses fell by {:.1} dB, expected at least 6", sent_pauses - heard_pauses);
    assert!(sent_speech - heard_speech <= 10.0, "talk spurts fell by {:.1} dB, expected at most 10", sent_speech - heard_speech);
    for path in [noisy, recording] {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
