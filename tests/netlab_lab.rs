//! The network lab itself (tests/netlab): namespaces come up and go away,
//! and every fault does what it says to real UDP between two namespaces.
//! The scenarios rely on these.

mod common;
mod netlab;
mod quic_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use netlab::{Home, Shape, Way, SERVER_IP};
use tokio::net::UdpSocket;

/// An echo server in the server's namespace (where the test body runs):
/// counts what it receives and the source addresses it saw.
struct Echo {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    sources: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

async fn echo() -> anyhow::Result<Echo> {
    let socket = UdpSocket::bind(SocketAddr::from((SERVER_IP, 0))).await?;
    let addr = socket.local_addr()?;
    let received = Arc::new(AtomicU64::new(0));
    let sources: Arc<std::sync::Mutex<Vec<SocketAddr>>> = Arc::default();
    let (count, seen) = (received.clone(), sources.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            count.fetch_add(1, Ordering::Relaxed);
            seen.lock().unwrap().push(from);
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    Ok(Echo { addr, received, sources })
}

/// What a burst of probes from a namespace got back.
#[derive(Debug)]
struct Probed {
    replies: usize,
    /// Replies that came after a later-numbered one.
    out_of_order: usize,
    /// Shortest round trip.
    fastest: Duration,
}

/// Sends `n` numbered datagrams of `size` bytes from `home` to `to`, one
/// every `gap`, and collects replies until 300 ms after the last.
async fn probe(home: &Home, to: SocketAddr, n: u32, size: usize, gap: Duration) -> anyhow::Result<Probed> {
    home.handle
        .spawn(async move {
            let socket = Arc::new(UdpSocket::bind("0.0.0.0:0").await?);
            let receiver = socket.clone();
            let origin = Instant::now();
            let collect = tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = vec![0u8; 2048];
                while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300) + gap * 2, receiver.recv(&mut buf)).await {
                    let seq = u32::from_be_bytes(buf[..4].try_into().unwrap_or_default());
                    let sent = u64::from_be_bytes(buf[4..12].try_into().unwrap_or_default());
                    let round_trip = Duration::from_micros((origin.elapsed().as_micros() as u64).saturating_sub(sent));
                    seen.push((seq, round_trip, n));
                }
                seen
            });
            for seq in 0..n {
                let mut datagram = vec![0u8; size.max(12)];
                datagram[..4].copy_from_slice(&seq.to_be_bytes());
                datagram[4..12].copy_from_slice(&(origin.elapsed().as_micros() as u64).to_be_bytes());
                socket.send_to(&datagram, to).await?;
                tokio::time::sleep(gap).await;
            }
            let seen = collect.await?;
            let mut highest = None;
            let mut out_of_order = 0;
            for &(seq, _, _) in &seen {
                if highest.is_some_and(|h| seq < h) {
                    out_of_order += 1;
                }
                highest = highest.max(Some(seq));
            }
            let fastest = seen.iter().map(|&(_, round_trip, _)| round_trip).min().unwrap_or(Duration::MAX);
            anyhow::Ok(Probed { replies: seen.len(), out_of_order, fastest })
        })
        .await?
}

#[test]
fn faults_do_what_they_say_on_real_udp() -> anyhow::Result<()> {
    netlab::run("lab-faults", |lab| async move {
        let echo = echo().await?;
        let node = lab.node("probe")?;
        let home = Home::enter(&node.ns)?;
        let gap = Duration::from_millis(2);

        let clear = probe(&home, echo.addr, 20, 64, gap).await?;
        assert_eq!(clear.replies, 20, "a clear link loses nothing on a veth: {clear:?}");

        // Both ways: nothing arrives.
        let before = echo.received.load(Ordering::Relaxed);
        let cut = lab.cut(&node, Way::Both)?;
        let during = probe(&home, echo.addr, 20, 64, gap).await?;
        assert_eq!((during.replies, echo.received.load(Ordering::Relaxed) - before), (0, 0), "cut both ways");
        cut.heal()?;
        assert_eq!(probe(&home, echo.addr, 20, 64, gap).await?.replies, 20, "healed");

        // One way: from the node nothing reaches the server.
        let before = echo.received.load(Ordering::Relaxed);
        let cut = lab.cut(&node, Way::FromNode)?;
        let during = probe(&home, echo.addr, 20, 64, gap).await?;
        assert_eq!((during.replies, echo.received.load(Ordering::Relaxed) - before), (0, 0), "node -> server cut");
        drop(cut);
        // The other way: the server hears everything, the node nothing back.
        let before = echo.received.load(Ordering::Relaxed);
        let cut = lab.cut(&node, Way::ToNode)?;
        let during = probe(&home, echo.addr, 20, 64, gap).await?;
        assert_eq!((during.replies, echo.received.load(Ordering::Relaxed) - before), (0, 20), "server -> node cut");
        drop(cut);

        // 30 % random loss each way: about 49 % of round trips survive.
        let lossy = lab.loss(&node, Way::Both, 30)?;
        let during = probe(&home, echo.addr, 400, 64, Duration::from_micros(500)).await?;
        drop(lossy);
        let share = during.replies as f64 / 400.0;
        assert!((0.35..0.65).contains(&share), "30 % loss each way kept {share:.2} of round trips, expected about 0.49");
        println!("netlab figure: 30 % loss each way kept {share:.2} of 400 round trips");

        // Size filter: small datagrams pass (and are counted), large ones do not.
        let filter = lab.drop_larger_than(&node, echo.addr.port(), 100)?;
        let small = probe(&home, echo.addr, 20, 60, gap).await?;
        let large = probe(&home, echo.addr, 20, 200, gap).await?;
        assert_eq!((small.replies, large.replies), (20, 0), "payloads over 100 bytes dropped");
        assert!(filter.passed()? >= 40, "the 20 small round trips were counted: {}", filter.passed()?);
        drop(filter);

        // The relay: delay both ways, and reordering.
        let relay = lab.relay(echo.addr, Shape { delay: Duration::from_millis(40), ..Shape::default() }).await?;
        let delayed = probe(&home, relay.addr, 10, 64, Duration::from_millis(10)).await?;
        assert_eq!(delayed.replies, 10, "{delayed:?}");
        assert!(delayed.fastest >= Duration::from_millis(80), "40 ms each way: round trip {:?}", delayed.fastest);
        relay.set_shape(Shape { reorder: 0.3, hold: Duration::from_millis(30), ..Shape::default() });
        let shuffled = probe(&home, relay.addr, 100, 64, Duration::from_millis(2)).await?;
        assert_eq!(shuffled.replies, 100);
        assert!(shuffled.out_of_order > 0, "30 % held back 30 ms reorders: {shuffled:?}");
        let sizes = relay.sizes();
        assert_eq!(sizes.upstream.get(&64), Some(&110), "{sizes:?}");
        println!("netlab figure: relay reordered {} of 100 datagrams", shuffled.out_of_order);

        // A new address: the server sees the new source.
        let old = node.ip();
        let new = lab.move_address(&node)?;
        assert_eq!(probe(&home, echo.addr, 5, 64, gap).await?.replies, 5);
        let last = *echo.sources.lock().unwrap().last().context("a source")?;
        assert_eq!(last.ip(), std::net::IpAddr::V4(new), "moved from {old}");

        // Teardown removes every namespace of the lab.
        let prefix = format!("{}-", lab.name);
        drop(relay);
        drop(home);
        drop(lab);
        let left: Vec<String> = std::fs::read_dir("/run/netns")?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        assert!(left.is_empty(), "namespaces left behind: {left:?}");
        Ok(())
    })
}
