//! The 1:1 call storm: pairs of QUIC devices that call each other on a
//! schedule — invite, ring, answer after a delay, talk both ways, hang up —
//! measuring invite-to-ringing and answer-to-first-audio, and the loss and
//! latency of each call's audio.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcall_signaling::client::{Client, ClientEvent};
use fleetcall_signaling::ids::CallId;
use fleetcall_signaling::pb::{CallPhase, ParticipantStatus};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;

use crate::audio::Mic;
use crate::context::Ctx;
use crate::control::register;
use crate::ledger::{Ledger, Match};
use crate::media::{Link, MAX_DATAGRAM, readable};
use crate::outcome::{GroupResult, Live};
use crate::peer::{FRAME_TICKS, PeerEvent, Sent};

const TICK: Duration = Duration::from_millis(20);
/// Audio of a call counts for loss from this long after the answer.
const SETTLE: Duration = Duration::from_secs(1);

/// A pair to run.
#[derive(Debug, Clone)]
pub struct PairPlan {
    /// Its number in the run.
    pub index: usize,
    /// When each device registers (the ramp).
    pub starts: [Instant; 2],
    /// The first call, then one every `interval` until `until`.
    pub first_call: Instant,
    /// Between this pair's calls.
    pub interval: Duration,
    /// No call starts after this.
    pub until: Instant,
    /// How long the callee rings.
    pub answer_after: Duration,
    /// How long a call lasts after the answer.
    pub talk: Duration,
    /// Seed of the pair's random choices.
    pub seed: u64,
}

#[derive(Debug)]
enum Ctl {
    Registered(
        Result<(Client, mpsc::UnboundedReceiver<ClientEvent>), String>,
        Duration,
    ),
    Event(ClientEvent),
    Invited(Result<CallId, String>),
    Failed(String),
}

#[derive(Debug)]
struct Dev {
    id: String,
    client: Option<Client>,
    mic: Mic,
    link: Option<Link>,
    media_up: bool,
    /// The first audio of this call is still to come.
    waiting_audio: bool,
}

/// One call in progress.
#[derive(Debug)]
struct Call {
    id: Option<CallId>,
    invited_at: Instant,
    ringing_seen: bool,
    answer_at: Option<Instant>,
    accepted_at: Option<Instant>,
    hangup_at: Option<Instant>,
    ledger: Ledger,
}

/// Runs a pair until `stop` fires; returns what it measured.
pub async fn run(
    ctx: Arc<Ctx>,
    plan: PairPlan,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> GroupResult {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut result = GroupResult::default();
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let name = format!("{}-c{}", ctx.prefix, plan.index);
    let mut devs: Vec<Dev> = (0..2)
        .map(|m| Dev {
            id: format!("{name}-{m}"),
            client: None,
            mic: Mic::new(
                ctx.speech_variant(m),
                ctx.silence.clone(),
                true,
                ctx.talk,
                0,
            ),
            link: None,
            media_up: false,
            waiting_audio: false,
        })
        .collect();
    for (m, start) in plan.starts.iter().enumerate() {
        let (ctx, tx, id, start) = (ctx.clone(), tx.clone(), devs[m].id.clone(), *start);
        tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let started = Instant::now();
            let result = register(&ctx, &id).await;
            let _ = tx.send((m, Ctl::Registered(result, started.elapsed())));
        });
    }
    let mut next_call = plan.first_call;
    let mut call: Option<Call> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut scan = 0;
    loop {
        let now = Instant::now();
        for d in &mut devs {
            if let Some(link) = &mut d.link {
                link.flush(now);
            }
        }
        let mut deadline = now + Duration::from_secs(1);
        if next_call <= plan.until {
            deadline = deadline.min(next_call);
        }
        if let Some(c) = &call {
            for t in [c.answer_at, c.hangup_at].into_iter().flatten() {
                deadline = deadline.min(t);
            }
        }
        for d in &devs {
            if let Some(t) = d.link.as_ref().and_then(|l| l.peer.poll_timeout()) {
                deadline = deadline.min(t);
            }
        }
        let links: Vec<(usize, &Link)> = devs
            .iter()
            .enumerate()
            .filter_map(|(m, d)| d.link.as_ref().map(|l| (m, l)))
            .collect();
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some((m, ctl)) = rx.recv() => match ctl {
                Ctl::Registered(Ok((client, mut events)), elapsed) => {
                    result.register.record(elapsed);
                    Live::add(&ctx.live.registered, 1);
                    devs[m].client = Some(client);
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        while let Some(event) = events.recv().await {
                            if tx.send((m, Ctl::Event(event))).is_err() {
                                return;
                            }
                        }
                    });
                }
                Ctl::Registered(Err(e), _) => result.failures.push(&ctx.live, format!("{}: registration: {e}", devs[m].id)),
                Ctl::Invited(Ok(id)) => {
                    if let Some(c) = &mut call {
                        c.id = Some(id);
                    }
                }
                Ctl::Invited(Err(e)) => {
                    result.failures.push(&ctx.live, format!("{}: invite: {e}", devs[0].id));
                    end_call(&ctx, &mut devs, &mut call, &mut result);
                }
                Ctl::Failed(e) => result.failures.push(&ctx.live, format!("{}: {e}", devs[m].id)),
                Ctl::Event(event) => on_event(&ctx, &tx, &mut devs, m, &mut call, &mut result, event, &plan),
            },
            _ = tick.tick() => {
                let now = Instant::now();
                for (m, d) in devs.iter_mut().enumerate() {
                    let (Some(link), Some(c)) = (&mut d.link, &mut call) else { continue };
                    if !d.media_up {
                        continue;
                    }
                    let frame = d.mic.next_frame();
                    match link.peer.send(now, frame) {
                        Sent::Rtp { timestamp, seq } => {
                            let payload = frame.payload.as_deref().unwrap_or_default();
                            c.ledger.on_sent(now, m, timestamp, seq, payload, frame.voice, true);
                            Live::add(&ctx.live.sent, 1);
                        }
                        Sent::Dtx => {}
                        Sent::NotConnected => result.unsent += 1,
                    }
                    link.flush(now);
                }
            }
            m = readable(&links, scan) => {
                drop(links);
                scan = m + 1;
                if let Some(link) = &mut devs[m].link {
                    link.drain_socket(&mut buf);
                }
                peer_events(&ctx, &mut devs, m, &mut call, &mut result);
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                let now = Instant::now();
                if next_call <= now && next_call <= plan.until {
                    next_call += plan.interval;
                    if call.is_some() || devs.iter().any(|d| d.client.is_none()) {
                        result.calls_skipped += 1;
                    } else {
                        place_call(&ctx, &tx, &mut devs, &mut call, &mut result);
                    }
                }
                if let Some(c) = &mut call {
                    if c.answer_at.is_some_and(|t| t <= now) {
                        c.answer_at = None;
                        if let (Some(id), Some(client)) = (c.id, devs[1].client.clone()) {
                            c.accepted_at = Some(now);
                            c.hangup_at = Some(now + plan.talk);
                            devs[0].waiting_audio = true;
                            devs[1].waiting_audio = true;
                            c.ledger = Ledger::new(2, (now + SETTLE, now + plan.talk));
                            result.calls_answered += 1;
                            Live::add(&ctx.live.calls, 1);
                            spawn_request(&tx, 1, "accept", client.accept(id));
                        }
                    }
                    if c.hangup_at.is_some_and(|t| t <= now) {
                        c.hangup_at = None;
                        if let (Some(id), Some(client)) = (c.id, &devs[0].client) {
                            spawn_request(&tx, 0, "hangup", client.hangup(id));
                        }
                    }
                }
                for (m, d) in devs.iter_mut().enumerate() {
                    if let Some(link) = &mut d.link
                        && link.peer.poll_timeout().is_some_and(|t| t <= now) {
                            link.peer.handle_timeout(now);
                        }
                    let _ = m;
                }
                for m in 0..2 {
                    peer_events(&ctx, &mut devs, m, &mut call, &mut result);
                }
            }
        }
    }
    // The end: hang up a call in progress, close both clients.
    if let Some(c) = &call
        && let (Some(id), Some(client)) = (c.id, &devs[0].client)
    {
        let _ = tokio::time::timeout(Duration::from_secs(3), client.hangup(id)).await;
    }
    end_call(&ctx, &mut devs, &mut call, &mut result);
    for d in &mut devs {
        if let Some(client) = d.client.take() {
            tokio::spawn(async move { client.close().await });
        }
    }
    let _ = rng.random::<u8>();
    result
}

fn spawn_request(
    tx: &mpsc::UnboundedSender<(usize, Ctl)>,
    m: usize,
    what: &'static str,
    request: impl Future<Output = Result<(), fleetcall_signaling::client::ClientError>> + Send + 'static,
) {
    let tx = tx.clone();
    tokio::spawn(async move {
        if let Err(e) = request.await {
            let _ = tx.send((m, Ctl::Failed(format!("{what}: {e}"))));
        }
    });
}

fn place_call(
    ctx: &Ctx,
    tx: &mpsc::UnboundedSender<(usize, Ctl)>,
    devs: &mut [Dev],
    call: &mut Option<Call>,
    result: &mut GroupResult,
) {
    let Some(client) = &devs[0].client else {
        return;
    };
    let now = Instant::now();
    result.calls_placed += 1;
    *call = Some(Call {
        id: None,
        invited_at: now,
        ringing_seen: false,
        answer_at: None,
        accepted_at: None,
        hangup_at: None,
        ledger: Ledger::new(2, (now, now)),
    });
    let invite = client.invite(&devs[1].id);
    let tx = tx.clone();
    tokio::spawn(async move {
        let result = invite.await.map_err(|e| e.to_string());
        let _ = tx.send((0, Ctl::Invited(result)));
    });
    let _ = ctx;
}

#[allow(clippy::too_many_arguments)]
fn on_event(
    ctx: &Ctx,
    tx: &mpsc::UnboundedSender<(usize, Ctl)>,
    devs: &mut [Dev],
    m: usize,
    call: &mut Option<Call>,
    result: &mut GroupResult,
    event: ClientEvent,
    plan: &PairPlan,
) {
    let now = Instant::now();
    match event {
        ClientEvent::IncomingCall(incoming) if m == 1 => {
            let id = CallId(incoming.call_id);
            if let Some(c) = call.as_mut() {
                c.id.get_or_insert(id);
                c.answer_at = Some(now + plan.answer_after);
            }
            if let Some(client) = &devs[1].client {
                spawn_request(tx, 1, "ringing", client.ringing(id));
            }
        }
        ClientEvent::CallState(state) => {
            let Some(c) = call.as_mut() else { return };
            if c.id.is_some_and(|id| id.0 != state.call_id) {
                return;
            }
            c.id.get_or_insert(CallId(state.call_id));
            if m == 0 && state.phase == CallPhase::Ringing as i32 && !c.ringing_seen {
                c.ringing_seen = true;
                result
                    .invite_to_ringing
                    .record(now.saturating_duration_since(c.invited_at));
            }
            let me = &devs[m].id;
            let joining = state
                .participants
                .iter()
                .any(|p| p.device_id == *me && p.status == ParticipantStatus::Joining as i32);
            if joining && devs[m].link.is_none() {
                let mut rng = rand::rng();
                use rand::RngExt as _;
                let ts_base = (rng.random::<u32>() / FRAME_TICKS) * FRAME_TICKS + m as u32;
                match Link::bind(&ctx.factory, ctx.bind_ip, now, ts_base, rng.random()) {
                    Ok(mut link) => match link.peer.create_offer(now) {
                        Ok(offer) => {
                            devs[m].link = Some(link);
                            if let Some(client) = &devs[m].client {
                                spawn_request(
                                    tx,
                                    m,
                                    "sdp offer",
                                    client.sdp_offer(CallId(state.call_id), 1, offer),
                                );
                            }
                        }
                        Err(e) => result
                            .failures
                            .push(&ctx.live, format!("{}: offer: {e:#}", devs[m].id)),
                    },
                    Err(e) => result
                        .failures
                        .push(&ctx.live, format!("{}: media: {e:#}", devs[m].id)),
                }
            }
        }
        ClientEvent::SdpAnswer(answer) => {
            if let Some(link) = &mut devs[m].link
                && let Err(e) = link.peer.accept_answer(now, &answer.sdp)
            {
                result
                    .failures
                    .push(&ctx.live, format!("{}: SDP answer: {e:#}", devs[m].id));
            }
        }
        ClientEvent::SdpOffer(offer) => {
            let Some(link) = &mut devs[m].link else {
                return;
            };
            match link.peer.accept_offer(now, &offer.sdp) {
                Ok(sdp) => {
                    if let Some(client) = &devs[m].client {
                        spawn_request(
                            tx,
                            m,
                            "sdp answer",
                            client.sdp_answer(CallId(offer.call_id), offer.revision, sdp),
                        );
                    }
                }
                Err(e) => result
                    .failures
                    .push(&ctx.live, format!("{}: SDP offer: {e:#}", devs[m].id)),
            }
        }
        ClientEvent::CallEnded(ended)
            if call
                .as_ref()
                .and_then(|c| c.id)
                .is_some_and(|id| id.0 == ended.call_id) =>
        {
            let expected = call
                .as_ref()
                .is_some_and(|c| c.accepted_at.is_some() && c.hangup_at.is_none());
            if !expected {
                result.failures.push(
                    &ctx.live,
                    format!(
                        "{}: call ended early: reason {} by {}",
                        devs[m].id, ended.reason, ended.by
                    ),
                );
            }
            end_call(ctx, devs, call, result);
        }
        _ => {}
    }
    peer_events(ctx, devs, m, call, result);
}

fn peer_events(
    ctx: &Ctx,
    devs: &mut [Dev],
    m: usize,
    call: &mut Option<Call>,
    result: &mut GroupResult,
) {
    loop {
        let Some(link) = &mut devs[m].link else {
            return;
        };
        let Some(event) = link.peer.poll_event() else {
            return;
        };
        let now = Instant::now();
        match event {
            PeerEvent::Connected => {
                if !devs[m].media_up {
                    devs[m].media_up = true;
                    Live::add(&ctx.live.media_up, 1);
                }
            }
            PeerEvent::Disconnected => {
                if devs[m].media_up {
                    devs[m].media_up = false;
                    Live::sub(&ctx.live.media_up, 1);
                }
            }
            PeerEvent::Failed(reason) => result
                .failures
                .push(&ctx.live, format!("{}: media failed: {reason}", devs[m].id)),
            PeerEvent::Packet(packet) => {
                Live::add(&ctx.live.received, 1);
                let Some(c) = call.as_mut() else { continue };
                let found = c
                    .ledger
                    .on_received(now, m, packet.timestamp, &packet.payload);
                if matches!(
                    found,
                    Match::Exact(_) | Match::Payload(_) | Match::Reencoded(_)
                ) && devs[m].waiting_audio
                    && let Some(accepted) = c.accepted_at
                {
                    devs[m].waiting_audio = false;
                    result
                        .answer_to_audio
                        .record(now.saturating_duration_since(accepted));
                    c.ledger.start_counting(m, now);
                }
            }
        }
    }
}

fn end_call(ctx: &Ctx, devs: &mut [Dev], call: &mut Option<Call>, result: &mut GroupResult) {
    if let Some(mut c) = call.take()
        && c.accepted_at.is_some()
    {
        result.add_media(c.ledger.totals(|_, _| true));
    }
    for d in devs.iter_mut() {
        d.link = None;
        d.waiting_audio = false;
        if d.media_up {
            d.media_up = false;
            Live::sub(&ctx.live.media_up, 1);
        }
    }
}
