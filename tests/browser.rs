//! Two headless Chromium pages join one room through the web client and hear
//! each other through the SFU.

mod common;

use std::time::{Duration, Instant};

use common::cdp::{Browser, Page};
use common::Server;

/// Sum of `packetsReceived` over inbound audio RTP streams of the page's
/// RTCPeerConnection.
const INBOUND_AUDIO: &str = r#"(async () => {
  const pc = window.fleetcall && window.fleetcall.pc;
  if (!pc) return -1;
  let packets = 0;
  (await pc.getStats()).forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'audio') packets += s.packetsReceived;
  });
  return packets;
})()"#;

async fn inbound_audio(browser: &mut Browser, page: &Page) -> anyhow::Result<i64> {
    Ok(browser.eval(page, INBOUND_AUDIO).await?.as_i64().unwrap_or(-1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browser_pages_hear_each_other() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let mut browser = Browser::launch().await?;
    let alice = browser.open(&format!("{}/?room=browser-test&name=Alice&autojoin=1", server.url)).await?;
    let bob = browser.open(&format!("{}/?room=browser-test&name=Bob&autojoin=1", server.url)).await?;

    let state = "window.fleetcall && window.fleetcall.pc ? window.fleetcall.pc.connectionState : 'none'";
    for page in [&alice, &bob] {
        browser.wait_for(page, state, "connected", Duration::from_secs(30)).await?;
    }

    // Inbound audio must keep increasing on both pages.
    let start = Instant::now();
    let mut first = Vec::new();
    for page in [&alice, &bob] {
        first.push(inbound_audio(&mut browser, page).await?);
    }
    loop {
        let mut now = Vec::new();
        for page in [&alice, &bob] {
            now.push(inbound_audio(&mut browser, page).await?);
        }
        if now.iter().zip(&first).all(|(n, f)| *f >= 0 && *n >= f + 50) {
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            anyhow::bail!("inbound audio packets did not increase on both pages: {first:?} -> {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Each page lists the other by name.
    let names = "Array.from(document.querySelectorAll('#participants li')).map(li => li.textContent).join(',')";
    assert!(browser.eval(&alice, names).await?.as_str().unwrap_or_default().contains("Bob"));
    assert!(browser.eval(&bob, names).await?.as_str().unwrap_or_default().contains("Alice"));

    let stats = server.stats().await?;
    assert_eq!(stats["participants"], 2, "{stats}");
    assert!(stats["forwarding_entries"].as_u64().unwrap_or(0) >= 2, "{stats}");

    // Closing the browser closes both sockets: the room empties at once.
    drop(browser);
    let (stats, _) = server
        .wait_stats(Duration::from_secs(10), |s| s["participants"] == 0 && s["rooms"] == 0 && s["forwarding_entries"] == 0)
        .await?;
    assert_eq!(stats["demux_entries"], 0, "{stats}");
    Ok(())
}
