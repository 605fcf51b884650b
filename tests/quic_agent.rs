//! The reference device agent (`fleetcall device run`) as real processes:
//! one calls the other with a WAV file as its microphone; the callee answers
//! and records what it hears, which must be that tone, through Opus, QUIC
//! signaling and the SFU. SIGTERM hangs up first and exits cleanly.

mod common;
mod quic_support;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use common::Server;
use quic_support::{enroll, scratch, Agent, PROMPT};

fn write_tone(path: &Path, hz: f32, seconds: f32) -> anyhow::Result<()> {
    let samples: Vec<i16> = (0..(48_000.0 * seconds) as usize)
        .map(|i| {
            let t = i as f32 / 48_000.0;
            (8000.0 * (2.0 * std::f32::consts::PI * hz * t).sin()) as i16
        })
        .collect();
    Ok(fleetcall_peer::wav::write(path, &samples)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_carry_a_wav_tone_and_sigterm_hangs_up() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let tone = scratch("tone.wav");
    let recording = scratch("heard.wav");
    write_tone(&tone, 440.0, 1.0)?;
    let ward = enroll(&server, "ward")?;
    let desk = enroll(&server, "desk")?;

    let mut callee = Agent::spawn(&server, &ward, "ward", &["--auto-answer", "--record", recording.to_str().context("path")?])?;
    callee.line("registered ward", PROMPT * 2).await?;
    let mut caller = Agent::spawn(&server, &desk, "desk", &["--call", "ward", "--mic", tone.to_str().context("path")?])?;
    let calling = caller.line("calling ward: call ", PROMPT * 2).await?;
    let call = calling.rsplit(' ').next().unwrap_or_default().to_owned();
    callee.line(&format!("call {call} ACTIVE"), PROMPT * 2).await?;
    caller.line(&format!("call {call} ACTIVE"), PROMPT).await?;
    callee.line("media connected", PROMPT).await?;
    // About a second and a half of the caller's microphone.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let pid = callee.child.id();
    assert!(common::sigterm(pid)?);
    let signalled = Instant::now();
    callee.line(&format!("hung up call {call}"), PROMPT).await?;
    callee.line("stopped", PROMPT).await?;
    let status = loop {
        if let Some(status) = callee.child.try_wait()? {
            break status;
        }
        assert!(signalled.elapsed() < PROMPT, "the agent did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    caller.line(&format!("call {call} ended HANGUP by ward"), PROMPT).await?;

    // The recording is the caller's tone: loud enough, and 440 Hz crosses
    // zero 880 times a second.
    let samples = fleetcall_peer::wav::read(&recording)?;
    let start = samples.iter().position(|s| s.unsigned_abs() > 1000).context("the recording is silent")?;
    let heard = &samples[start..];
    let seconds = heard.len() as f64 / 48_000.0;
    assert!(seconds > 0.5, "heard {seconds:.2} s");
    let rms = (heard.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / heard.len() as f64).sqrt();
    let crossings = heard.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count() as f64 / seconds;
    println!("recorded {seconds:.2} s of audio: rms {rms:.0}, {crossings:.0} zero crossings/s");
    assert!(rms > 2000.0, "rms {rms}");
    assert!((780.0..980.0).contains(&crossings), "{crossings} zero crossings/s is not a 440 Hz tone");
    for path in [tone, recording] {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_a_microphone_in_the_wrong_format() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let files = enroll(&server, "kiosk")?;
    let stereo = scratch("stereo.wav");
    let spec = hound::WavSpec { channels: 2, sample_rate: 44_100, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut writer = hound::WavWriter::create(&stereo, spec)?;
    writer.write_sample(0i16)?;
    writer.write_sample(0i16)?;
    writer.finalize()?;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcall"))
        .args(["device", "run", "--id", "kiosk", "--server", &server.quic_addr.to_string(), "--mic"])
        .arg(&stereo)
        .arg("--ca")
        .arg(&files.ca)
        .arg("--cert")
        .arg(&files.cert)
        .arg("--key")
        .arg(&files.key)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("48000 Hz mono 16-bit") && stderr.contains("44100 Hz"), "{stderr}");
    // The certificate of another device is refused before connecting.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcall"))
        .args(["device", "run", "--id", "someone-else", "--server", &server.quic_addr.to_string()])
        .arg("--ca")
        .arg(&files.ca)
        .arg("--cert")
        .arg(&files.cert)
        .arg("--key")
        .arg(&files.key)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("not of --id"), "{stderr}");
    let _ = std::fs::remove_file(stereo);
    Ok(())
}
