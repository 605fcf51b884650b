//! SDP offers and answers as the server handles them: the controller's
//! [`Sdp`] check (`signaling/src/sdp.rs`), then the bridge's parse
//! (`SdpOffer`/`SdpAnswer::from_sdp_string`) and the SFU core's use of it.
//!
//! The stage (built once per thread): one publisher connected in the room.
//! The first byte picks what the rest (UTF-8, as both transports deliver
//! strings) is:
//!
//! | byte % 3 | the SDP is |
//! | --- | --- |
//! | 0 | a join offer (`Sfu::join`) |
//! | 1 | the answer to the SFU's offer to a newcomer (`Sfu::accept_answer`) |
//! | 2 | a newcomer's ICE-restart offer (`Sfu::accept_offer`) |
//!
//! The newcomer of 1 and 2 joins with a real offer first. Afterwards it
//! leaves (if the SFU has not removed it already), and the room must be back
//! to its publisher alone, still connected.

use std::cell::RefCell;
use std::time::Duration;

use fleetcall_sfu::{JoinRequest, LeaveReason, Rights, RoomId, SdpAnswer, SdpOffer};
use fleetcall_signaling::sdp::Sdp;

use crate::stage::{ROOM, Stage};

struct SdpStage {
    stage: Stage,
    /// A real join offer (a media peer's).
    offer: String,
}

thread_local! {
    static STAGE: RefCell<Option<SdpStage>> = const { RefCell::new(None) };
}

fn stage() -> SdpStage {
    let mut stage = Stage::new();
    stage.join_client();
    stage.run(Duration::from_millis(100));
    let (_, offer, _) = stage.offer_from_new_peer(50);
    SdpStage { stage, offer }
}

/// Real SDP for seeds: a media peer's join offer, its answer to the SFU's
/// renegotiation offer after it joined, and its ICE-restart offer.
pub fn real_sdp() -> (String, String, String) {
    let mut s = stage();
    let (mut peer, offer, _) = s.stage.offer_from_new_peer(51);
    let id = s.stage.next_id();
    let request = JoinRequest {
        room: RoomId::from(ROOM),
        participant: id,
        name: "newcomer".into(),
        offer: SdpOffer::from_sdp_string(&offer).expect("real offer"),
        rights: Rights::ALL,
    };
    let now = s.stage.now;
    let joined = s.stage.sfu.join(now, request).expect("join");
    peer.accept_answer(now, &joined.answer.to_sdp_string()).expect("answer");
    s.stage.drain_sfu();
    let server = s.stage.offers.pop().expect("the SFU offers the publisher's track to a newcomer").1;
    let answer = peer.accept_offer(now, &server.to_sdp_string()).expect("the peer answers");
    let restart = peer.restart_ice(now).expect("ICE restart offer");
    (offer, answer, restart)
}

/// `text` with every fingerprint line replaced by the one of `real`.
fn with_fingerprint(text: &str, real: &str) -> String {
    let Some(fingerprint) = real.lines().find(|l| l.starts_with("a=fingerprint:")) else { return text.to_owned() };
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if line.starts_with("a=fingerprint:") {
            out.push_str(fingerprint);
            out.push_str(if line.ends_with("\r\n") { "\r\n" } else if line.ends_with('\n') { "\n" } else { "" });
        } else {
            out.push_str(line);
        }
    }
    out
}

/// Runs one input (see the module docs).
pub fn run(data: &[u8]) {
    let Some((&mode, text)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(text) else { return };
    // The controller: only empty SDP is its to refuse; the rest goes on.
    match Sdp::new(text) {
        Ok(sdp) => {
            assert_eq!(sdp.as_str(), text);
            let _ = sdp.sends_media();
        }
        Err(_) => {
            assert!(text.is_empty(), "the controller refused a non-empty SDP");
            return;
        }
    }
    STAGE.with_borrow_mut(|slot| {
        let s = slot.get_or_insert_with(stage);
        // Seeds come from another process, whose DTLS certificate differs:
        // unless bit 7 says raw, a renegotiation SDP gets this process's
        // fingerprint, so it is judged on the rest.
        let adapted;
        let text = if mode & 0x80 == 0 && mode % 3 != 0 {
            adapted = with_fingerprint(text, &s.offer);
            adapted.as_str()
        } else {
            text
        };
        let stage = &mut s.stage;
        let now = stage.now;
        let id = stage.next_id();
        let join = |stage: &mut Stage, offer: SdpOffer| {
            let request = JoinRequest { room: RoomId::from(ROOM), participant: id, name: "newcomer".into(), offer, rights: Rights::ALL };
            let joined = stage.sfu.join(now, request).is_ok();
            stage.drain_sfu();
            joined
        };
        let joined = match mode % 3 {
            0 => SdpOffer::from_sdp_string(text).is_ok_and(|offer| join(stage, offer)),
            1 => {
                let real = SdpOffer::from_sdp_string(&s.offer).expect("real offer");
                assert!(join(stage, real), "a real offer joins");
                if let Ok(answer) = SdpAnswer::from_sdp_string(text) {
                    assert!(stage.offers.iter().any(|(p, _)| *p == id), "the SFU offered the newcomer the publisher's track");
                    let _ = stage.sfu.accept_answer(now, id, answer);
                    stage.drain_sfu();
                }
                true
            }
            _ => {
                let real = SdpOffer::from_sdp_string(&s.offer).expect("real offer");
                assert!(join(stage, real), "a real offer joins");
                if let Ok(offer) = SdpOffer::from_sdp_string(text) {
                    let _ = stage.sfu.accept_offer(now, id, offer);
                    stage.drain_sfu();
                }
                true
            }
        };
        stage.offers.clear();
        if joined && !stage.removed.contains(&id) {
            stage.sfu.leave(now, id, LeaveReason::Requested).expect("the newcomer is still there to leave");
        }
        stage.pump();
        // The newcomer may be removed for its bad SDP; nobody else may.
        stage.removed.retain(|p| *p != id);
        assert!(stage.removed.is_empty(), "another participant was removed: {:?}", stage.removed);
        let sizes = stage.sfu.room_sizes();
        assert_eq!(sizes, vec![(RoomId::from(ROOM), 1)], "the room is not back to its publisher alone");
        let stats = stage.sfu.stats();
        assert_eq!(stats.participants, 1, "participants left behind: {stats:?}");
        assert!(stage.clients[0].peer.is_connected(), "the publisher lost its connection");
    });
}
