//! Three headless Chromium pages in one room with one audio slot, each with
//! its own token: each page plays its own generated WAV as its microphone
//! (Alice talks first, then Bob, Carol never), the page shows who talks (the
//! identities of the tokens), and Carol's single slot carries Alice then Bob
//! as one continuous stream.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cdp::Browser;
use common::Server;

const RATE: u32 = 48_000;

/// A talker-like signal (voiced harmonics, syllables) between `from` and
/// `to` seconds, silence elsewhere, `seconds` long.
fn write_wav(path: &Path, seconds: f32, talk: Option<(f32, f32)>) -> anyhow::Result<()> {
    let spec = hound::WavSpec { channels: 1, sample_rate: RATE, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut writer = hound::WavWriter::create(path, spec)?;
    for n in 0..(seconds * RATE as f32) as u32 {
        let t = n as f32 / RATE as f32;
        let talking = talk.is_some_and(|(from, to)| t >= from && t < to);
        let x = if talking {
            let syllable = (t * 2.5 * std::f32::consts::TAU).sin().abs().powf(0.5);
            let phase = 130.0 * t + 4.0 * (1.0 - (1.3 * std::f32::consts::TAU * t).cos());
            let voiced: f32 = (1..25).map(|h| (std::f32::consts::TAU * (phase * h as f32).fract()).sin() / h as f32).sum();
            0.25 * syllable * voiced
        } else {
            0.0
        };
        writer.write_sample((x.clamp(-1.0, 1.0) * 32767.0) as i16)?;
    }
    writer.finalize()?;
    Ok(())
}

const STATE: &str = "window.fleetcall && window.fleetcall.pc ? window.fleetcall.pc.connectionState : 'none'";
const SPEAKER: &str = "window.fleetcall ? window.fleetcall.activeSpeaker : null";

/// Stats of the page's audio slot 0: packets received and lost, samples
/// played, concealed samples, and the speaker (CSRC) heard last.
const SLOT: &str = r#"(async () => {
  const r = window.fleetcall && window.fleetcall.slots.get('slot-0');
  if (!r) return null;
  let out = null;
  (await r.getStats()).forEach((s) => {
    if (s.type === 'inbound-rtp') out = {
      ssrc: s.ssrc, received: s.packetsReceived, lost: s.packetsLost, discarded: s.packetsDiscarded || 0,
      samples: s.totalSamplesReceived, concealed: s.concealedSamples, silentConcealed: s.silentConcealedSamples,
      codec: s.codecId || '', decoder: s.decoderImplementation || '' };
  });
  const sources = r.getContributingSources();
  if (out) out.csrc = sources.length ? sources[0].source : null;
  return out;
})()"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slot_follows_the_talker_and_stays_continuous() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("fleetcall-speakers-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let wav = |name: &str| -> PathBuf { dir.join(format!("{name}.wav")) };
    // Pages start capturing a second or two apart; the gaps leave room.
    write_wav(&wav("alice"), 30.0, Some((3.0, 10.0)))?;
    write_wav(&wav("bob"), 30.0, Some((15.0, 30.0)))?;
    write_wav(&wav("carol"), 30.0, None)?;

    let server = Server::start(&["--audio-slots", "1"])?;
    let mut browsers = Vec::new();
    let mut pages = Vec::new();
    for name in ["Alice", "Bob", "Carol"] {
        let flag = format!("--use-file-for-fake-audio-capture={}%noloop", wav(&name.to_lowercase()).display());
        let mut browser = Browser::launch_with(&[flag]).await?;
        let token = server.token(name, &["speakers"]);
        let page = browser.open(&format!("{}/?room=speakers&token={token}&autojoin=1", server.url)).await?;
        browser.wait_for(&page, STATE, "connected", Duration::from_secs(30)).await?;
        browsers.push(browser);
        pages.push(page);
    }
    let stats = server.stats().await?;
    assert_eq!((stats["slot_rooms"].as_u64(), stats["audio_slots"].as_u64()), (Some(1), Some(3)), "{stats}");

    // Carol's page shows Alice talking, then Bob; her slot never stalls.
    let carol = 2;
    let start = Instant::now();
    let mut seen = Vec::<String>::new();
    let mut samples: Vec<(Instant, serde_json::Value)> = Vec::new();
    while start.elapsed() < Duration::from_secs(40) {
        let speaker = browsers[carol].eval(&pages[carol], SPEAKER).await?;
        if let Some(name) = speaker.as_str()
            && seen.last().map(String::as_str) != Some(name)
        {
            seen.push(name.to_owned());
        }
        let slot = browsers[carol].eval(&pages[carol], SLOT).await?;
        if !slot.is_null() {
            samples.push((Instant::now(), slot));
        }
        if seen.ends_with(&["Alice".to_owned(), "Bob".to_owned()]) && samples.len() > 10 {
            // Keep listening to Bob for a while.
            tokio::time::sleep(Duration::from_secs(3)).await;
            samples.push((Instant::now(), browsers[carol].eval(&pages[carol], SLOT).await?));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(seen.contains(&"Alice".to_owned()) && seen.ends_with(&["Bob".to_owned()]), "Carol's page showed {seen:?}");
    // Bob's own page names him as the talker too.
    assert_eq!(browsers[1].eval(&pages[1], SPEAKER).await?, serde_json::json!("Bob (you)"));
    // Carol's slot caption names Bob from the packets' CSRC (his media id).
    let caption = "(document.querySelector('#media-slot-0 figcaption') || {}).textContent || ''";
    browsers[carol].wait_for(&pages[carol], caption, "Bob", Duration::from_secs(5)).await?;

    let (first_at, first) = samples.first().cloned().expect("slot stats");
    let (last_at, last) = samples.last().cloned().expect("slot stats");
    assert_eq!(first["ssrc"], last["ssrc"], "one stream across the switch");
    let received = last["received"].as_i64().unwrap_or(0) - first["received"].as_i64().unwrap_or(0);
    let expected = (last_at - first_at).as_secs_f64() * 50.0;
    assert!(received as f64 >= expected * 0.9, "slot packets: {received} in {:?} ({first} -> {last})", last_at - first_at);
    let lost = last["lost"].as_i64().unwrap_or(0);
    assert!(lost <= 10, "packets lost in the slot: {lost} ({last})");
    assert!(last["discarded"].as_i64().unwrap_or(0) <= 10, "packets discarded: {last}");
    // Every pair of samples shows the stream moving (no stall at a switch).
    for pair in samples.windows(2) {
        let (a, b) = (&pair[0].1, &pair[1].1);
        assert!(b["received"].as_i64() > a["received"].as_i64(), "slot stalled: {a} -> {b}");
        assert!(b["samples"].as_i64() > a["samples"].as_i64(), "playout stalled: {a} -> {b}");
    }
    let played = last["samples"].as_f64().unwrap_or(0.0) - first["samples"].as_f64().unwrap_or(0.0);
    let concealed = last["concealed"].as_f64().unwrap_or(0.0) - first["concealed"].as_f64().unwrap_or(0.0);
    assert!(concealed <= 0.1 * played, "concealed {concealed} of {played} samples: decoding went wrong ({last})");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
