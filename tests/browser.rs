//! Headless Chromium pages join rooms through the shipped web client on the
//! one road (`/ws/device`, fleetcall.v1 JSON, a token per page) and hear each
//! other through the SFU; a token for another room does not open this one;
//! the printed guest link works in two tabs; a dropped socket resumes and a
//! lost session rejoins; a listen-only token hears without a microphone.

mod common;

use std::time::{Duration, Instant};

use anyhow::Context;
use common::cdp::{Browser, Page};
use common::Server;
use serde_json::Value;

/// Chromium with fake media is heavy on a 2-core machine: one test's
/// browser at a time, so media timing in one test is not another's load.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const STATE: &str = "window.fleetcall && window.fleetcall.pc ? window.fleetcall.pc.connectionState : 'none'";

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

/// The text of each entry of the page's participant list.
const NAMES: &str = "Array.from(document.querySelectorAll('#participants li')).map(li => li.textContent).join(',')";

/// The device ids the page's participant list shows, itself included.
const LISTED: &str = "Array.from(document.querySelectorAll('#participants li')).map(li => li.dataset.device).sort().join(',')";

async fn inbound_audio(browser: &mut Browser, page: &Page) -> anyhow::Result<i64> {
    Ok(browser.eval(page, INBOUND_AUDIO).await?.as_i64().unwrap_or(-1))
}

async fn text(browser: &mut Browser, page: &Page, expression: &str) -> anyhow::Result<String> {
    Ok(browser.eval(page, expression).await?.as_str().unwrap_or_default().to_owned())
}

/// Inbound audio keeps increasing on every page (50 packets = 1 s of audio).
async fn all_hear(browser: &mut Browser, pages: &[&Page]) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut first = Vec::new();
    for page in pages {
        first.push(inbound_audio(browser, page).await?);
    }
    loop {
        let mut now = Vec::new();
        for page in pages {
            now.push(inbound_audio(browser, page).await?);
        }
        if now.iter().zip(&first).all(|(n, f)| *f >= 0 && *n >= f + 50) {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            anyhow::bail!("inbound audio packets did not increase on every page: {first:?} -> {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `GET /api/calls`.
async fn calls(server: &Server) -> anyhow::Result<Vec<Value>> {
    let body = common::http_get(&format!("{}/api/calls", server.url), Some(&server.admin_token)).await?;
    Ok(serde_json::from_str(&body)?)
}

/// The calls that have not ended: (kind, sorted member ids).
async fn live_calls(server: &Server) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let mut live: Vec<_> = calls(server)
        .await?
        .iter()
        .filter(|c| c["phase"] != "CALL_PHASE_ENDED")
        .map(|c| {
            let mut members: Vec<String> =
                c["members"].as_array().into_iter().flatten().filter_map(|m| m["device"].as_str().map(str::to_owned)).collect();
            members.sort();
            (c["kind"].as_str().unwrap_or_default().to_owned(), members)
        })
        .collect();
    live.sort();
    Ok(live)
}

/// The media session the controller holds for `device` in its live call.
async fn media_session(server: &Server, device: &str) -> anyhow::Result<String> {
    for call in calls(server).await? {
        if call["phase"] == "CALL_PHASE_ENDED" {
            continue;
        }
        for member in call["members"].as_array().into_iter().flatten() {
            if member["device"] == device {
                return member["media_session"].as_str().map(str::to_owned).with_context(|| format!("{device} has no media: {member}"));
            }
        }
    }
    anyhow::bail!("{device} is in no live call")
}

fn room_link(server: &Server, room: &str, token: &str) -> String {
    format!("{}/?room={room}&token={token}&autojoin=1", server.url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browser_pages_hear_each_other() -> anyhow::Result<()> {
    let _one = ONE_BROWSER.lock().await;
    // A short resume grace: the end of the test kills the browser, and a
    // socket lost without a leave keeps its member for the grace.
    let server = Server::start(&["--resume-grace-secs", "2"])?;
    let mut browser = Browser::launch().await?;
    let alice = browser.open(&room_link(&server, "browser-test", &server.token("Alice", &["browser-test"]))).await?;
    let bob = browser.open(&room_link(&server, "browser-test", &server.token("Bob", &["browser-test"]))).await?;
    for page in [&alice, &bob] {
        browser.wait_for(page, STATE, "connected", Duration::from_secs(30)).await?;
    }
    all_hear(&mut browser, &[&alice, &bob]).await?;

    // Each page lists the other by the identity in its token.
    assert!(text(&mut browser, &alice, NAMES).await?.contains("Bob"));
    assert!(text(&mut browser, &bob, NAMES).await?.contains("Alice"));
    assert_eq!(text(&mut browser, &alice, "window.fleetcall.deviceId").await?, "Alice");

    let stats = server.stats().await?;
    assert_eq!(stats["participants"], 2, "{stats}");
    assert!(stats["forwarding_entries"].as_u64().unwrap_or(0) >= 2, "{stats}");

    // Carol's token is for another room: her page is refused from this one,
    // and shows why.
    let carol = browser.open(&room_link(&server, "browser-test", &server.token("Carol", &["other-room"]))).await?;
    let code = "window.fleetcall ? String(window.fleetcall.lastErrorCode) : 'none'";
    browser.wait_for(&carol, code, "ERROR_CODE_FORBIDDEN", Duration::from_secs(15)).await?;
    let shown = text(&mut browser, &carol, "document.getElementById('error').textContent").await?;
    assert!(shown.contains("not allowed in this room"), "Carol's page shows {shown:?}");
    assert_eq!(browser.eval(&carol, "window.fleetcall.pc").await?, Value::Null, "a refused page keeps no media");
    // The room she may enter is a different call.
    browser.eval(&carol, "document.getElementById('room').value = 'other-room'; document.getElementById('join').click()").await?;
    browser.wait_for(&carol, STATE, "connected", Duration::from_secs(30)).await?;
    assert_eq!(text(&mut browser, &carol, LISTED).await?, "Carol");
    for page in [&alice, &bob] {
        assert_eq!(text(&mut browser, page, LISTED).await?, "Alice,Bob");
    }
    let rooms = |a: &[&str], b: &[&str]| {
        let room = |m: &[&str]| ("CALL_KIND_ROOM".to_owned(), m.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut v = vec![room(a), room(b)];
        v.sort();
        v
    };
    assert_eq!(live_calls(&server).await?, rooms(&["Alice", "Bob"], &["Carol"]));
    // Nobody talks in Carol's room, and nothing of the first room reaches her.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(inbound_audio(&mut browser, &carol).await?, 0);

    // Alice leaves with the button: Bob's page and the server drop her at
    // once, not after a grace.
    browser.eval(&alice, "document.getElementById('leave').click()").await?;
    browser.wait_for(&bob, LISTED, "Bob", Duration::from_secs(3)).await?;
    assert_eq!(text(&mut browser, &alice, "window.fleetcall.state").await?, "left");
    assert_eq!(live_calls(&server).await?, rooms(&["Bob"], &["Carol"]));

    // Killing the browser drops the sockets without a leave: after the
    // resume grace every room and its media are gone.
    drop(browser);
    let (stats, _) = server
        .wait_stats(Duration::from_secs(10), |s| s["participants"] == 0 && s["rooms"] == 0 && s["forwarding_entries"] == 0)
        .await?;
    assert_eq!(stats["demux_entries"], 0, "{stats}");
    assert_eq!(live_calls(&server).await?, vec![]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_guest_link_lets_two_tabs_talk() -> anyhow::Result<()> {
    let _one = ONE_BROWSER.lock().await;
    let server = Server::start(&[])?;
    let link = server.join_link.clone().context("the server on loopback printed no join link")?;
    let mut browser = Browser::launch().await?;
    let first = browser.open(&link).await?;
    let second = browser.open(&link).await?;
    for page in [&first, &second] {
        browser.wait_for(page, STATE, "connected", Duration::from_secs(30)).await?;
    }
    all_hear(&mut browser, &[&first, &second]).await?;

    // One link, two identities: each tab is its own guest and lists the other.
    let mut ids = Vec::new();
    for page in [&first, &second] {
        let id = text(&mut browser, page, "window.fleetcall.deviceId").await?;
        let number = id.strip_prefix("guest #").with_context(|| format!("identity {id:?}"))?;
        assert!(number.parse::<u64>().is_ok(), "identity {id:?}");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    let mut both = ids.clone();
    both.sort();
    for page in [&first, &second] {
        assert_eq!(text(&mut browser, page, LISTED).await?, both.join(","));
    }
    assert_eq!(live_calls(&server).await?, vec![("CALL_KIND_ROOM".to_owned(), both.clone())]);

    // A guest tab whose socket drops comes back as the same guest, in the
    // same session.
    let session = text(&mut browser, &first, "window.fleetcall.sessionId").await?;
    let resumed = "window.fleetcall.ws && window.fleetcall.ws !== window.oldWs && window.fleetcall.link.up ? window.fleetcall.sessionId : ''";
    browser.eval(&first, "window.oldWs = window.fleetcall.ws; window.fleetcall.ws.close()").await?;
    browser.wait_for(&first, resumed, &session, Duration::from_secs(10)).await?;
    assert_eq!(text(&mut browser, &first, "window.fleetcall.deviceId").await?, ids[0]);
    assert_eq!(live_calls(&server).await?, vec![("CALL_KIND_ROOM".to_owned(), both)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_socket_resumes_and_a_lost_session_rejoins() -> anyhow::Result<()> {
    let _one = ONE_BROWSER.lock().await;
    let server = Server::start(&[])?;
    let mut browser = Browser::launch().await?;
    let alice = browser.open(&room_link(&server, "ward-3", &server.token("Alice", &["ward-*"]))).await?;
    let bob = browser.open(&room_link(&server, "ward-3", &server.token("Bob", &["ward-3"]))).await?;
    for page in [&alice, &bob] {
        browser.wait_for(page, STATE, "connected", Duration::from_secs(30)).await?;
    }
    all_hear(&mut browser, &[&alice, &bob]).await?;
    let session = text(&mut browser, &alice, "window.fleetcall.sessionId").await?;
    let media = media_session(&server, "Alice").await?;

    // The socket drops; the page resumes its session with the same media.
    // Welcomed on a new socket: the session id it holds then.
    let resumed = "window.fleetcall.ws && window.fleetcall.ws !== window.oldWs && window.fleetcall.link.up ? window.fleetcall.sessionId : ''";
    browser.eval(&alice, "window.oldWs = window.fleetcall.ws; window.fleetcall.ws.close()").await?;
    browser.wait_for(&alice, resumed, &session, Duration::from_secs(10)).await?;
    assert_eq!(media_session(&server, "Alice").await?, media, "media kept across the resume");
    all_hear(&mut browser, &[&alice, &bob]).await?;
    assert_eq!(text(&mut browser, &bob, LISTED).await?, "Alice,Bob");

    // The server no longer knows the session the page resumes (as after the
    // grace): sessionUnknown, a fresh welcome, and the page joins again with
    // new media.
    browser.eval(&alice, "window.oldWs = window.fleetcall.ws; window.fleetcall.sessionId = '999999'; window.fleetcall.ws.close()").await?;
    let rejoined = "window.fleetcall.ws !== window.oldWs && window.fleetcall.sessionId && window.fleetcall.sessionId !== '999999' && window.fleetcall.pc ? window.fleetcall.pc.connectionState : ''";
    browser.wait_for(&alice, rejoined, "connected", Duration::from_secs(30)).await?;
    let new_session = text(&mut browser, &alice, "window.fleetcall.sessionId").await?;
    assert_ne!(new_session, session);
    assert_ne!(media_session(&server, "Alice").await?, media, "the rejoin has new media");
    all_hear(&mut browser, &[&alice, &bob]).await?;
    browser.wait_for(&bob, LISTED, "Alice,Bob", Duration::from_secs(5)).await?;
    assert_eq!(live_calls(&server).await?, vec![("CALL_KIND_ROOM".to_owned(), vec!["Alice".to_owned(), "Bob".to_owned()])]);

    // Closing Bob's tab leaves on `pagehide`: Alice sees him go at once,
    // long before the resume grace (10 s) would remove him.
    browser.close(&bob).await?;
    browser.wait_for(&alice, LISTED, "Alice", Duration::from_secs(3)).await?;
    assert_eq!(live_calls(&server).await?, vec![("CALL_KIND_ROOM".to_owned(), vec!["Alice".to_owned()])]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_only_token_hears_without_a_microphone() -> anyhow::Result<()> {
    let _one = ONE_BROWSER.lock().await;
    let server = Server::start(&[])?;
    let mut browser = Browser::launch().await?;
    let alice = browser.open(&room_link(&server, "ward-3", &server.token("Alice", &["ward-3"]))).await?;
    let listener = server.token_with("Lis", &["ward-3"], false, Duration::from_secs(3600));
    let lis = browser.open(&room_link(&server, "ward-3", &listener)).await?;
    for page in [&alice, &lis] {
        browser.wait_for(page, STATE, "connected", Duration::from_secs(30)).await?;
    }
    // The server accepted her offer (a sending m-line would be FORBIDDEN),
    // and she hears Alice.
    all_hear(&mut browser, &[&lis]).await?;
    assert_eq!(browser.eval(&lis, "window.fleetcall.lastErrorCode").await?, Value::Null);
    // No microphone was asked for, and nothing leaves her page.
    assert_eq!(browser.eval(&lis, "window.fleetcall.stream").await?, Value::Null);
    let directions = "window.fleetcall.pc.getTransceivers().map(t => t.currentDirection).join(',')";
    let directions = text(&mut browser, &lis, directions).await?;
    assert!(directions.split(',').all(|d| d == "recvonly" || d == "inactive"), "Lis's transceivers: {directions}");
    let sent = r#"(async () => { let n = 0; (await window.fleetcall.pc.getStats()).forEach((s) => {
      if (s.type === 'outbound-rtp') n += s.packetsSent; }); return n; })()"#;
    assert_eq!(browser.eval(&lis, sent).await?, serde_json::json!(0));
    // Alice lists her and hears nothing from her.
    assert_eq!(text(&mut browser, &alice, LISTED).await?, "Alice,Lis");
    assert!(text(&mut browser, &lis, "document.getElementById('identity').textContent").await?.contains("listen only"));
    assert_eq!(inbound_audio(&mut browser, &alice).await?, 0);
    Ok(())
}
