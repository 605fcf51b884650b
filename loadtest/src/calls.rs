//! The 1:1 call storm: pairs of QUIC devices that call each other on a
//! schedule — invite, ring, answer after a delay, talk both ways, hang up —
//! measuring invite-to-ringing and answer-to-first-audio, and the loss and
//! latency of each call's audio.
//!
//! One task per pair: [`Pair`] holds its state and handles one input at a
//! time with the `now` the loop read when it woke.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcall_peer::{FRAME, FRAME_TICKS, Mode, Output, Peer, PeerConfig, PeerEvent, Sent};
use fleetcall_signaling::client::{Client, ClientError, ClientEvent};
use fleetcall_signaling::ids::CallId;
use fleetcall_signaling::pb::{CallPhase, ParticipantStatus};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;

use crate::audio::Mic;
use crate::context::Ctx;
use crate::ledger::{Ledger, Match};
use crate::outcome::{GroupResult, Live};
use crate::sockets::{MAX_DATAGRAM, Sockets};

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
    /// The call's WebRTC peer; its socket is in the pair's [`Sockets`].
    peer: Option<Peer>,
    /// When the peer wants time.
    peer_deadline: Option<Instant>,
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
    let name = format!("{}-c{}", ctx.prefix, plan.index);
    let devs: Vec<Dev> = (0..2)
        .map(|m| Dev {
            id: format!("{name}-{m}"),
            client: None,
            mic: Mic::new(ctx.speech_variant(m), ctx.silence.clone(), true, ctx.talk, 0),
            peer: None,
            peer_deadline: None,
            media_up: false,
            waiting_audio: false,
        })
        .collect();
    for (m, start) in plan.starts.iter().enumerate() {
        let (ctx, tx, id, start) = (ctx.clone(), tx.clone(), devs[m].id.clone(), *start);
        tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let started = Instant::now();
            let result = ctx.control.register(&id).await;
            let _ = tx.send((m, Ctl::Registered(result, started.elapsed())));
        });
    }
    let mut pair = Pair {
        next_call: plan.first_call,
        rng: StdRng::seed_from_u64(plan.seed),
        ctx,
        plan,
        tx,
        devs,
        call: None,
        result: GroupResult::default(),
        sockets: Sockets::default(),
    };
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let deadline = pair.deadline();
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some((m, ctl)) = rx.recv() => pair.on_ctl(now(), m, ctl),
            _ = tick.tick() => pair.on_tick(now()),
            m = pair.sockets.readable() => pair.on_readable(now(), m, &mut buf),
            // No deadline: the branch is off.
            () = tokio::time::sleep_until(deadline.unwrap_or_else(now).into()), if deadline.is_some() => {
                pair.on_timeout(now());
            }
        }
    }
    pair.finish().await
}

/// Time from tokio's clock, so paused-time tests work.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A pair's state: its devices, the call in progress, what it measured.
struct Pair {
    ctx: Arc<Ctx>,
    plan: PairPlan,
    tx: mpsc::UnboundedSender<(usize, Ctl)>,
    devs: Vec<Dev>,
    call: Option<Call>,
    next_call: Instant,
    result: GroupResult,
    sockets: Sockets<usize>,
    rng: StdRng,
}

impl Pair {
    /// The earliest of the next call, the call's answer and hangup, and
    /// the peers' timers.
    fn deadline(&self) -> Option<Instant> {
        let call = self.call.iter().flat_map(|c| [c.answer_at, c.hangup_at]).flatten();
        let next_call = (self.next_call <= self.plan.until).then_some(self.next_call);
        let peers = self.devs.iter().filter_map(|d| d.peer_deadline);
        next_call.into_iter().chain(call).chain(peers).min()
    }

    fn on_ctl(&mut self, now: Instant, m: usize, ctl: Ctl) {
        match ctl {
            Ctl::Registered(Ok((client, mut events)), elapsed) => {
                self.result.register.record(elapsed);
                Live::add(&self.ctx.live.registered, 1);
                self.devs[m].client = Some(client);
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    while let Some(event) = events.recv().await {
                        if tx.send((m, Ctl::Event(event))).is_err() {
                            return;
                        }
                    }
                });
            }
            Ctl::Registered(Err(e), _) => self.fail(m, format!("registration: {e}")),
            Ctl::Invited(Ok(id)) => {
                if let Some(c) = &mut self.call {
                    c.id = Some(id);
                }
            }
            Ctl::Invited(Err(e)) => {
                self.fail(0, format!("invite: {e}"));
                self.end_call();
            }
            Ctl::Failed(e) => self.fail(m, e),
            Ctl::Event(event) => self.on_event(now, m, event),
        }
    }

    /// Every 20 ms: each device with media sends its microphone's next frame.
    fn on_tick(&mut self, now: Instant) {
        for m in 0..self.devs.len() {
            let d = &mut self.devs[m];
            let (Some(peer), Some(c)) = (&mut d.peer, &mut self.call) else { continue };
            if !d.media_up {
                continue;
            }
            let frame = d.mic.next_frame();
            match peer.send_audio(now, &frame.audio()) {
                Sent::Written { timestamp } => {
                    let payload = frame.payload.as_deref().unwrap_or_default();
                    c.ledger.on_sent(now, m, timestamp, payload, frame.voice, true);
                    Live::add(&self.ctx.live.sent, 1);
                }
                Sent::Dtx => {}
                Sent::NotConnected => self.result.unsent += 1,
            }
            self.drain_peer(now, m);
        }
    }

    /// Device `m`'s socket has datagrams: all of them to its peer.
    fn on_readable(&mut self, now: Instant, m: usize, buf: &mut [u8]) {
        while let Some((n, source)) = self.sockets.try_recv(m, buf) {
            if let Some(peer) = &mut self.devs[m].peer {
                peer.handle_datagram(now, source, &buf[..n]);
            }
        }
        self.drain_peer(now, m);
    }

    fn on_timeout(&mut self, now: Instant) {
        if self.next_call <= now && self.next_call <= self.plan.until {
            self.next_call += self.plan.interval;
            if self.call.is_some() || self.devs.iter().any(|d| d.client.is_none()) {
                self.result.calls_skipped += 1;
            } else {
                self.place_call(now);
            }
        }
        if let Some(c) = &mut self.call {
            if c.answer_at.is_some_and(|t| t <= now) {
                c.answer_at = None;
                if let (Some(id), Some(client)) = (c.id, self.devs[1].client.clone()) {
                    c.accepted_at = Some(now);
                    c.hangup_at = Some(now + self.plan.talk);
                    self.devs[0].waiting_audio = true;
                    self.devs[1].waiting_audio = true;
                    c.ledger = Ledger::new(2, (now + SETTLE, now + self.plan.talk));
                    self.result.calls_answered += 1;
                    Live::add(&self.ctx.live.calls, 1);
                    self.spawn_request(1, "accept", client.accept(id));
                }
            }
            if let Some(c) = &mut self.call
                && c.hangup_at.is_some_and(|t| t <= now)
            {
                c.hangup_at = None;
                if let (Some(id), Some(client)) = (c.id, &self.devs[0].client) {
                    self.spawn_request(0, "hangup", client.hangup(id));
                }
            }
        }
        for m in 0..self.devs.len() {
            if self.devs[m].peer_deadline.is_some_and(|t| t <= now)
                && let Some(peer) = &mut self.devs[m].peer
            {
                peer.handle_timeout(now);
                self.drain_peer(now, m);
            }
        }
    }

    fn fail(&mut self, m: usize, reason: String) {
        let reason = format!("{}: {reason}", self.devs[m].id);
        self.result.failures.push(&self.ctx.live, reason);
    }

    fn spawn_request(&self, m: usize, what: &'static str, request: impl Future<Output = Result<(), ClientError>> + Send + 'static) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            if let Err(e) = request.await {
                let _ = tx.send((m, Ctl::Failed(format!("{what}: {e}"))));
            }
        });
    }

    fn place_call(&mut self, now: Instant) {
        let Some(client) = &self.devs[0].client else {
            return;
        };
        self.result.calls_placed += 1;
        let invite = client.invite(&self.devs[1].id);
        self.call = Some(Call {
            id: None,
            invited_at: now,
            ringing_seen: false,
            answer_at: None,
            accepted_at: None,
            hangup_at: None,
            ledger: Ledger::new(2, (now, now)),
        });
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = invite.await.map_err(|e| e.to_string());
            let _ = tx.send((0, Ctl::Invited(result)));
        });
    }

    fn on_event(&mut self, now: Instant, m: usize, event: ClientEvent) {
        match event {
            ClientEvent::IncomingCall(incoming) if m == 1 => {
                let id = CallId(incoming.call_id);
                if let Some(c) = self.call.as_mut() {
                    c.id.get_or_insert(id);
                    c.answer_at = Some(now + self.plan.answer_after);
                }
                if let Some(client) = &self.devs[1].client {
                    self.spawn_request(1, "ringing", client.ringing(id));
                }
            }
            ClientEvent::CallState(state) => {
                let Some(c) = self.call.as_mut() else { return };
                if c.id.is_some_and(|id| id.0 != state.call_id) {
                    return;
                }
                c.id.get_or_insert(CallId(state.call_id));
                if m == 0 && state.phase == CallPhase::Ringing as i32 && !c.ringing_seen {
                    c.ringing_seen = true;
                    self.result.invite_to_ringing.record(now.saturating_duration_since(c.invited_at));
                }
                let me = &self.devs[m].id;
                let joining = state
                    .participants
                    .iter()
                    .any(|p| p.device_id == *me && p.status == ParticipantStatus::Joining as i32);
                if joining && self.devs[m].peer.is_none() {
                    match self.start_media(now, m) {
                        Ok(offer) => {
                            if let Some(client) = &self.devs[m].client {
                                self.spawn_request(m, "sdp offer", client.sdp_offer(CallId(state.call_id), 1, offer));
                            }
                        }
                        Err(e) => self.fail(m, e),
                    }
                }
            }
            ClientEvent::SdpAnswer(answer) => {
                let Some(peer) = &mut self.devs[m].peer else { return };
                let result = peer.accept_answer(now, &answer.sdp);
                self.drain_peer(now, m);
                if let Err(e) = result {
                    self.fail(m, format!("SDP answer: {e}"));
                }
            }
            ClientEvent::SdpOffer(offer) => {
                let Some(peer) = &mut self.devs[m].peer else { return };
                let result = peer.accept_offer(now, &offer.sdp);
                self.drain_peer(now, m);
                match result {
                    Ok(sdp) => {
                        if let Some(client) = &self.devs[m].client {
                            let answer = client.sdp_answer(CallId(offer.call_id), offer.revision, sdp);
                            self.spawn_request(m, "sdp answer", answer);
                        }
                    }
                    Err(e) => self.fail(m, format!("SDP offer: {e}")),
                }
            }
            ClientEvent::CallEnded(ended)
                if self.call.as_ref().and_then(|c| c.id).is_some_and(|id| id.0 == ended.call_id) =>
            {
                let expected = self.call.as_ref().is_some_and(|c| c.accepted_at.is_some() && c.hangup_at.is_none());
                if !expected {
                    self.fail(m, format!("call ended early: reason {} by {}", ended.reason, ended.by));
                }
                self.end_call();
            }
            _ => {}
        }
    }

    /// Binds device `m`'s media socket and creates its peer; returns the offer.
    fn start_media(&mut self, now: Instant, m: usize) -> Result<String, String> {
        let local = self
            .sockets
            .open(m, self.ctx.bind_ip)
            .map_err(|e| format!("media: binding a media socket on {}: {e}", self.ctx.bind_ip))?;
        // A timestamp residue per member keeps the call's timestamps apart.
        let first_timestamp = (self.rng.random::<u32>() / FRAME_TICKS) * FRAME_TICKS + m as u32;
        let config = PeerConfig { mode: Mode::Rtp, first_timestamp, first_seq: self.rng.random(), ..PeerConfig::default() };
        let offer = Peer::new(now, local, &self.ctx.identity, config)
            .map_err(|e| format!("media: {e}"))
            .and_then(|mut peer| {
                let offer = peer.create_offer(now).map_err(|e| format!("offer: {e}"))?;
                Ok((peer, offer))
            });
        match offer {
            Ok((peer, offer)) => {
                self.devs[m].peer = Some(peer);
                self.drain_peer(now, m);
                Ok(offer)
            }
            Err(e) => {
                self.sockets.close(m);
                Err(e)
            }
        }
    }

    /// Carries out what device `m`'s peer asked for: datagrams out, its
    /// events, its next deadline.
    fn drain_peer(&mut self, now: Instant, m: usize) {
        loop {
            let Some(peer) = &mut self.devs[m].peer else { return };
            match peer.poll_output() {
                Output::Transmit(datagram) => self.sockets.send(m, &datagram),
                Output::Event(event) => self.on_peer_event(now, m, event),
                Output::Timeout(deadline) => {
                    self.devs[m].peer_deadline = deadline;
                    return;
                }
            }
        }
    }

    fn on_peer_event(&mut self, now: Instant, m: usize, event: PeerEvent) {
        match event {
            PeerEvent::Connected if !self.devs[m].media_up => {
                self.devs[m].media_up = true;
                Live::add(&self.ctx.live.media_up, 1);
            }
            PeerEvent::Disconnected if self.devs[m].media_up => {
                self.devs[m].media_up = false;
                Live::sub(&self.ctx.live.media_up, 1);
            }
            PeerEvent::Failed(reason) => self.fail(m, format!("media failed: {reason}")),
            PeerEvent::Packet(packet) => {
                Live::add(&self.ctx.live.received, 1);
                let Some(c) = self.call.as_mut() else { return };
                let found = c.ledger.on_received(now, m, packet.timestamp, &packet.payload);
                if matches!(found, Match::Exact(_) | Match::Payload(_) | Match::Reencoded(_))
                    && self.devs[m].waiting_audio
                    && let Some(accepted) = c.accepted_at
                {
                    self.devs[m].waiting_audio = false;
                    self.result.answer_to_audio.record(now.saturating_duration_since(accepted));
                    c.ledger.start_counting(m, now);
                }
            }
            _ => {}
        }
    }

    fn end_call(&mut self) {
        if let Some(mut c) = self.call.take()
            && c.accepted_at.is_some()
        {
            self.result.add_media(c.ledger.totals(|_, _| true));
        }
        for (m, d) in self.devs.iter_mut().enumerate() {
            d.peer = None;
            d.peer_deadline = None;
            self.sockets.close(m);
            d.waiting_audio = false;
            if d.media_up {
                d.media_up = false;
                Live::sub(&self.ctx.live.media_up, 1);
            }
        }
    }

    /// The end: hangs up a call in progress, closes both clients.
    async fn finish(mut self) -> GroupResult {
        if let Some(c) = &self.call
            && let (Some(id), Some(client)) = (c.id, &self.devs[0].client)
        {
            let _ = tokio::time::timeout(Duration::from_secs(3), client.hangup(id)).await;
        }
        self.end_call();
        for d in &mut self.devs {
            if let Some(client) = d.client.take() {
                tokio::spawn(async move { client.close().await });
            }
        }
        self.result.send_errors += self.sockets.send_errors();
        self.result
    }
}
