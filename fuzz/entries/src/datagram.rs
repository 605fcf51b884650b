//! The SFU core's datagram input (`Sfu::handle_datagram`: demux, then the
//! participant's str0m `Rtc`), with `poll_output` drained after each.
//!
//! The stage (built once per thread): a talker and a listener in one room,
//! both connected over ICE-lite + DTLS-SRTP with real media peers. Records:
//!
//! | tag % 4 | source of the datagram |
//! | --- | --- |
//! | 0 | the talker's own address (a spoofed or mangled packet from it) |
//! | 1 | a stranger |
//! | 2 | the talker's IP on another port |
//! | 3 | the listener's address |
//!
//! After each input the call must go on: nobody was removed, and an audio
//! frame of each reaches the other (so no address mapping was taken over).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::Duration;

use crate::records;
use crate::stage::{SFU_ADDR, Stage};

const TALKER: usize = 0;
const LISTENER: usize = 1;

thread_local! {
    static STAGE: RefCell<Option<Stage>> = const { RefCell::new(None) };
}

/// The stage as the target uses it: talker and listener connected.
pub fn stage() -> Stage {
    let mut stage = Stage::new();
    stage.join_client();
    stage.join_client();
    // Renegotiation (the listener subscribes to the talker) settles.
    let mut forwarded = false;
    for _ in 0..50 {
        stage.run(Duration::from_millis(20));
        forwarded = stage.send_frame(TALKER, LISTENER) > 0 && stage.send_frame(LISTENER, TALKER) > 0;
        if forwarded {
            break;
        }
    }
    assert!(forwarded, "the stage forwards audio both ways");
    stage
}

/// Runs one input (see the module docs).
pub fn run(data: &[u8]) {
    STAGE.with_borrow_mut(|slot| {
        let stage = slot.get_or_insert_with(stage);
        let talker = stage.clients[TALKER].addr;
        let other_port = SocketAddr::new(talker.ip(), talker.port().wrapping_add(1000));
        let stranger: SocketAddr = "10.0.0.66:4066".parse().expect("address");
        for (tag, payload) in records::split(data).take(64) {
            let source = match tag % 4 {
                0 => talker,
                1 => stranger,
                2 => other_port,
                _ => stage.clients[LISTENER].addr,
            };
            stage.sfu.handle_datagram(stage.now, source, SFU_ADDR, payload);
            // Whatever the core answers goes out (to the peers, or nowhere).
            stage.pump();
        }
        stage.run(Duration::from_millis(1));
        assert!(stage.removed.is_empty(), "a datagram removed participants {:?}", stage.removed);
        assert!(stage.send_frame(TALKER, LISTENER) > 0, "after the input the talker's audio no longer reaches the listener");
        assert!(stage.send_frame(LISTENER, TALKER) > 0, "after the input the listener's audio no longer reaches the talker");
    });
}
