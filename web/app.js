// fleetcall web client: a device of the fleet in a browser. It speaks the
// device protocol (fleetcall.v1, proto3 JSON, one object per text message;
// signaling/PROTOCOL.md) on /ws/device?token=..., joins a named room (a group
// call of the controller) and exchanges audio, and video when a camera
// exists, with the SFU.
//
// Flow: hello -> welcome (identity and grant from the token) -> media ->
// roomJoin -> ack{callId} -> sdpOffer -> ack, sdpAnswer; server sdpOffers are
// answered with sdpAnswer; heartbeats both ways; after a dropped socket,
// hello.resume; groupLeave to leave.
//
// /?room=R&token=T&autojoin=1 joins without clicks (join links, tests).
// window.fleetcall.pc is the RTCPeerConnection, .speakers the active
// speakers (device ids, the dominant first), .activeSpeaker the identity of
// who talks ("<id> (you)" for this page). In big rooms audio arrives on a few
// "slot-N" streams whose speaker changes; each packet's CSRC is the speaker's
// media id.
'use strict';

const BACKOFF_BASE_MS = 500; // as signaling/src/backoff.rs
const BACKOFF_CAP_MS = 30000;
const MISSED_HEARTBEATS = 3; // the server's rule, applied to its acks
const WELCOME_TIMEOUT_MS = 10000;
const LEAVE_WAIT_MS = 2000;

const fleetcall = {
  pc: null,
  ws: null,
  stream: null,
  room: null,
  deviceId: null, // this page's identity, from welcome.deviceId
  grant: null, // {rooms, publish, subscribe}
  callId: null,
  sessionId: null,
  lastSeq: 0, // highest ServerFrame.seq processed in this session
  participants: new Map(), // device id -> {status, mediaId}; others only
  state: 'idle',
  lastError: null,
  lastErrorCode: null, // e.g. 'ERROR_CODE_FORBIDDEN', or the close code
  speakers: [], // device ids, the dominant speaker first
  activeSpeaker: null, // identity of the dominant speaker
  slots: new Map(), // slot stream id -> RTCRtpReceiver
};
window.fleetcall = fleetcall;

// Connection and session bookkeeping (not part of the page's API).
const link = {
  token: null,
  wanted: false, // the user wants to be in the room: reconnect when lost
  up: false, // welcomed on the current socket
  everUp: false, // a session was welcomed once since the user pressed Join
  resumeToken: null,
  heartbeatMs: 2000,
  attempt: 0, // reconnects since the last welcome
  reconnectTimer: null,
  welcomeTimer: null,
  heartbeatTimer: null,
  hbSeq: 0, // our latest heartbeat
  hbAcked: 0,
  missed: 0,
  rtt: null,
  nextOp: 1,
  pending: new Map(), // op id -> {frame, onReply}
  nextRevision: 1, // of our own offers
  offerRevision: null, // our offer waiting for its sdpAnswer
  leaving: false,
  generation: 0, // of the user's joins: frames queued for an earlier one are dropped
  ownMediaId: null,
  listenTransceiver: null,
};
fleetcall.link = link;

const $ = (id) => document.getElementById(id);

// ---- page -------------------------------------------------------------------

function setStatus(text, cls) {
  fleetcall.state = text;
  const el = $('status');
  el.textContent = text;
  el.className = 'status ' + cls;
}

function showError(text, code) {
  fleetcall.lastError = text || null;
  fleetcall.lastErrorCode = text ? code || null : null;
  const el = $('error');
  el.textContent = text || '';
  el.hidden = !text;
}

// The status pill: what the user needs to know, signaling first.
function renderStatus() {
  const pc = fleetcall.pc;
  if (!link.wanted) return;
  if (!link.up) {
    setStatus(link.everUp ? 'reconnecting' : 'connecting', 'connecting');
  } else if (!pc) {
    setStatus('joining', 'connecting');
  } else {
    const s = pc.connectionState;
    setStatus(s === 'new' ? 'joining' : s, s === 'connected' ? 'connected' : s === 'failed' ? 'failed' : 'connecting');
  }
}

function nameOf(deviceId) {
  return deviceId === fleetcall.deviceId ? deviceId + ' (you)' : deviceId;
}

const STATUS_TEXT = {
  PARTICIPANT_STATUS_JOINING: 'joining',
  PARTICIPANT_STATUS_RECONNECTING: 'reconnecting',
  PARTICIPANT_STATUS_INVITED: 'invited',
};

function speakerClass(deviceId) {
  const at = fleetcall.speakers.indexOf(deviceId);
  return at === 0 ? 'speaking' : at > 0 ? 'selected' : '';
}

function renderParticipants() {
  const list = $('participants');
  list.replaceChildren();
  if (fleetcall.deviceId && fleetcall.callId) {
    const me = document.createElement('li');
    me.className = ('self ' + speakerClass(fleetcall.deviceId)).trim();
    me.textContent = nameOf(fleetcall.deviceId);
    me.dataset.device = fleetcall.deviceId;
    list.append(me);
  }
  for (const [deviceId, p] of fleetcall.participants) {
    const li = document.createElement('li');
    li.className = speakerClass(deviceId);
    li.textContent = deviceId;
    li.dataset.device = deviceId;
    const note = STATUS_TEXT[p.status];
    if (note) {
      const span = document.createElement('span');
      span.className = 'note';
      span.textContent = ' (' + note + ')';
      li.append(span);
    }
    list.append(li);
  }
  const talking = fleetcall.speakers.length ? nameOf(fleetcall.speakers[0]) : null;
  fleetcall.activeSpeaker = talking;
  $('speaker').textContent = talking ? 'Talking: ' + talking : '';
  $('identity').textContent = fleetcall.deviceId
    ? 'You: ' + fleetcall.deviceId + (fleetcall.grant && !fleetcall.grant.publish ? ' (listen only)' : '')
    : '';
  renderCaptions();
}

// A media id (decimal string, 64 bits) or a CSRC (its low 32 bits) -> key.
function mediaKey(id) {
  try {
    const key = BigInt(id) & 0xffffffffn;
    return key === 0n ? null : String(key);
  } catch (e) {
    return null;
  }
}

function deviceByMedia(id) {
  const key = mediaKey(id);
  if (key === null) return null;
  if (key === link.ownMediaId) return fleetcall.deviceId;
  for (const [deviceId, p] of fleetcall.participants) {
    if (p.mediaId === key) return deviceId;
  }
  return null;
}

// Captions of per-publisher media (stream id = media id); a track may arrive
// before the participant update that names its media id.
function renderCaptions() {
  for (const fig of $('media').querySelectorAll('figure:not(.slot)')) {
    const deviceId = deviceByMedia(fig.dataset.stream);
    fig.querySelector('figcaption').textContent = deviceId ? nameOf(deviceId) : 'participant ' + fig.dataset.stream;
  }
}

// Slot captions follow the speaker in each slot (the packets' CSRC).
function renderSlots() {
  for (const [streamId, receiver] of fleetcall.slots) {
    const fig = document.getElementById('media-' + streamId);
    if (!fig) continue;
    const now = performance.timeOrigin + performance.now();
    const recent = receiver.getContributingSources().filter((s) => now - s.timestamp < 1000);
    const cap = fig.querySelector('figcaption');
    if (!recent.length) {
      cap.textContent = 'quiet';
    } else {
      const deviceId = deviceByMedia(recent[0].source);
      cap.textContent = deviceId ? nameOf(deviceId) : 'participant ' + recent[0].source;
    }
  }
}
setInterval(renderSlots, 500);

function mediaFor(streamId) {
  let fig = document.getElementById('media-' + streamId);
  if (!fig) {
    fig = document.createElement('figure');
    fig.id = 'media-' + streamId;
    fig.dataset.stream = streamId;
    fig.append(document.createElement('figcaption'));
    $('media').append(fig);
  }
  return fig;
}

function onTrack(event) {
  // The listen-only placeholder carries nobody: the others come on the
  // server's renegotiated m-lines.
  if (event.transceiver === link.listenTransceiver) return;
  const stream = event.streams[0];
  const streamId = stream ? stream.id : 'unknown';
  const fig = mediaFor(streamId);
  if (streamId.startsWith('slot-')) {
    fig.className = 'slot';
    fleetcall.slots.set(streamId, event.receiver);
  }
  const tag = event.track.kind === 'video' ? 'video' : 'audio';
  let el = fig.querySelector(tag);
  if (!el) {
    el = document.createElement(tag);
    el.autoplay = true;
    if (tag === 'video') { el.playsInline = true; el.muted = true; }
    fig.prepend(el);
  }
  el.srcObject = stream || new MediaStream([event.track]);
  const gone = () => { el.remove(); if (!fig.querySelector('audio,video')) fig.remove(); };
  event.track.onended = gone;
  if (stream) stream.onremovetrack = (e) => { if (e.track === event.track) gone(); };
  renderCaptions();
}

// ---- messages -----------------------------------------------------------------

function sendNow(frame) {
  const ws = fleetcall.ws;
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(frame));
}

// A request: `body` is {kind: message}; `onReply(frame)` runs in the message
// queue when its ack or error arrives. Unanswered requests go again with the
// same op id after a resume.
function request(body, onReply) {
  const opId = String(link.nextOp++);
  const frame = Object.assign({ opId }, body);
  link.pending.set(opId, { frame, onReply });
  if (link.up) sendNow(frame);
  return opId;
}

// Messages are handled one at a time, in order: an offer must never overtake
// the answer to our join, a replayed frame is recognised by its seq.
let queue = Promise.resolve();
function enqueue(task) {
  queue = queue.then(task).catch((e) => showError(String(e && e.stack ? e.message : e)));
}

function onSocketMessage(ws, event) {
  if (ws !== fleetcall.ws) return; // a socket we gave up on
  let frame;
  try {
    frame = JSON.parse(event.data);
  } catch (e) {
    showError('unreadable message from the server');
    return;
  }
  // Liveness is answered at once, not behind media work in the queue.
  if (frame.heartbeat) {
    sendNow({ heartbeatAck: { seq: frame.heartbeat.seq, echoSentAtMs: frame.heartbeat.sentAtMs } });
    return;
  }
  if (frame.heartbeatAck) {
    onHeartbeatAck(frame.heartbeatAck);
    return;
  }
  if (frame.welcome) clearTimeout(link.welcomeTimer); // the link answers
  const generation = link.generation;
  enqueue(() => generation === link.generation && handle(frame));
}

async function handle(frame) {
  const seq = Number(frame.seq || 0);
  if (seq && seq <= fleetcall.lastSeq) return; // replayed after a resume: seen
  try {
    await dispatch(frame);
  } finally {
    if (seq) fleetcall.lastSeq = Math.max(fleetcall.lastSeq, seq);
  }
}

async function dispatch(frame) {
  const replyTo = frame.replyTo && frame.replyTo !== '0' ? frame.replyTo : null;
  if (replyTo && (frame.ack || frame.error)) {
    const pending = link.pending.get(replyTo);
    link.pending.delete(replyTo);
    if (pending && pending.onReply) await pending.onReply(frame);
    return;
  }
  if (frame.welcome) return onWelcome(frame.welcome);
  if (frame.rejected) return onRejected(frame.rejected);
  if (frame.sessionUnknown) return onSessionUnknown(frame.sessionUnknown);
  if (frame.error) {
    // A problem with a frame we sent; the connection stays.
    const e = frame.error;
    showError(describeError(e.code, e.message), e.code);
    return;
  }
  if (frame.callState) return onCallState(frame.callState);
  if (frame.participantUpdate) return onParticipantUpdate(frame.participantUpdate);
  if (frame.activeSpeakers) return onActiveSpeakers(frame.activeSpeakers);
  if (frame.callEnded) return onCallEnded(frame.callEnded);
  if (frame.sdpOffer) return onServerOffer(frame.sdpOffer);
  if (frame.sdpAnswer) return onSdpAnswer(frame.sdpAnswer);
  // incomingCall and kinds of newer servers: a room page takes no calls.
}

// ---- session ----------------------------------------------------------------

// This tab's id, kept in sessionStorage across reloads of the tab.
const TAB_ID = (() => {
  let id = sessionStorage.getItem('fleetcall-tab');
  if (!id) {
    id = Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, '0')).join('');
    sessionStorage.setItem('fleetcall-tab', id);
  }
  return id;
})();

function connect() {
  clearTimeout(link.reconnectTimer);
  link.reconnectTimer = null;
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  // `tab` keeps a guest link's identity across this tab's reconnects.
  const ws = new WebSocket(scheme + '://' + location.host + '/ws/device?token=' + encodeURIComponent(link.token) + '&tab=' + TAB_ID);
  fleetcall.ws = ws;
  let opened = false;
  ws.onopen = () => {
    if (ws !== fleetcall.ws) return;
    opened = true;
    // lastSeq is what the queue processed so far; frames still queued that
    // the server replays are dropped by their seq.
    const hello = { minVersion: 1, maxVersion: 1, softwareVersion: 'fleetcall-web 1' };
    if (fleetcall.sessionId) {
      hello.resume = { sessionId: fleetcall.sessionId, resumeToken: link.resumeToken, lastSeq: String(fleetcall.lastSeq) };
    }
    sendNow({ hello });
    link.welcomeTimer = setTimeout(() => lost(ws, 'no welcome from the server'), WELCOME_TIMEOUT_MS);
  };
  ws.onmessage = (event) => onSocketMessage(ws, event);
  ws.onclose = (event) => {
    if (ws !== fleetcall.ws) return;
    onClose(ws, event, opened);
  };
  renderStatus();
}

function onWelcome(w) {
  const resumed = w.resumed === true && w.sessionId === fleetcall.sessionId;
  fleetcall.sessionId = w.sessionId;
  link.resumeToken = w.resumeToken;
  link.heartbeatMs = Math.max(100, Number(w.heartbeatIntervalMs || 2000));
  link.up = true;
  link.everUp = true;
  link.attempt = 0;
  if (fleetcall.lastErrorCode === 'reconnecting') showError('');
  fleetcall.deviceId = w.deviceId;
  // proto3 JSON leaves out false and empty fields; a server without grants
  // in its welcome lets the token decide at the first offer.
  const g = w.grant;
  fleetcall.grant = g ? { rooms: g.rooms || [], publish: g.publish === true, subscribe: g.subscribe === true } : { rooms: [], publish: true, subscribe: true };
  startHeartbeats();
  if (resumed) {
    // Media kept flowing; requests without a reply go again (same op id).
    for (const { frame } of link.pending.values()) sendNow(frame);
    renderParticipants();
    renderStatus();
    return;
  }
  // A new session: numbering starts again, nothing of the old one is owed.
  fleetcall.lastSeq = 0;
  link.pending.clear();
  if (fleetcall.pc || fleetcall.callId) teardownMedia(true);
  renderParticipants();
  if (link.wanted) return startCall();
}

function onRejected(r) {
  // A full server may have room later: try again with backoff.
  if (r.code === 'ERROR_CODE_OVERLOADED' && fleetcall.ws) {
    lost(fleetcall.ws, describeError(r.code, r.reason));
    return;
  }
  finish(describeError(r.code, r.reason), r.code);
}

// The server lost our session (grace over, or restarted): every call of it
// has ended; a fresh welcome follows on this socket and we join again.
function onSessionUnknown() {
  fleetcall.sessionId = null;
  link.resumeToken = null;
  fleetcall.lastSeq = 0;
  link.pending.clear();
  teardownMedia(true);
  renderParticipants();
}

function startHeartbeats() {
  clearInterval(link.heartbeatTimer);
  link.hbSeq = 0;
  link.hbAcked = 0;
  link.missed = 0;
  const ws = fleetcall.ws;
  const beat = () => {
    if (ws !== fleetcall.ws || !link.up) return;
    if (link.hbSeq > link.hbAcked) link.missed += 1;
    if (link.missed >= MISSED_HEARTBEATS) {
      lost(ws, link.missed + ' heartbeats not acknowledged: the server is unreachable');
      return;
    }
    link.hbSeq += 1;
    sendNow({
      heartbeat: { seq: String(link.hbSeq), sentAtMs: String(Math.round(performance.now())), ackSeq: String(fleetcall.lastSeq) },
    });
  };
  beat();
  link.heartbeatTimer = setInterval(beat, link.heartbeatMs);
}

function onHeartbeatAck(ack) {
  const seq = Number(ack.seq || 0);
  if (seq > link.hbAcked) link.hbAcked = seq;
  if (seq === link.hbSeq) link.missed = 0;
  link.rtt = Math.round(performance.now()) - Number(ack.echoSentAtMs || 0);
}

// Close codes are 4000 + CloseReason (fleetcall.proto).
const CLOSE_TEXT = {
  4001: 'protocol error',
  4002: 'message too large',
  4003: 'the server speaks another protocol version',
  4004: 'no hello in time',
  4005: 'heartbeats timed out',
  4006: 'this identity connected again elsewhere (another tab?)',
  4007: 'too many bad messages',
  4008: 'the server is shutting down',
  4009: 'the page stopped reading',
  4010: 'no valid token',
  4011: 'token expired',
  4012: 'access revoked',
  4013: 'this identity is in use by another credential',
  4014: 'this page sent messages too fast',
  4015: 'the server is full',
};
// These will not get better by trying again (a page that floods would
// flood again; a full server is worth a retry, with backoff).
const CLOSE_FINAL = new Set([4001, 4002, 4003, 4006, 4007, 4010, 4011, 4012, 4013, 4014]);

function onClose(ws, event, opened) {
  const code = event.code;
  const text = CLOSE_TEXT[code] || 'connection lost' + (code ? ' (' + code + ')' : '');
  if (!link.wanted) return;
  if (CLOSE_FINAL.has(code)) {
    finish(text, 'close ' + code);
    return;
  }
  if (!opened && !link.everUp) {
    // A refused upgrade reads as 1006 in a browser: wrong origin (HTTP
    // 403) or no server. Retrying a first join would only hide that.
    finish('cannot open the signaling socket: server unreachable, or this page\'s origin is not allowed', 'close ' + code);
    return;
  }
  lost(ws, text);
}

// The socket is gone (or useless): drop it, keep media, resume later.
function lost(ws, why) {
  if (ws !== fleetcall.ws) return;
  clearTimeout(link.welcomeTimer);
  clearInterval(link.heartbeatTimer);
  link.up = false;
  fleetcall.ws = null;
  ws.onclose = null;
  try { ws.close(); } catch (e) { /* already closed */ }
  if (!link.wanted) return;
  // Full jitter, capped exponential: a fleet that lost the server together
  // does not return in one wave.
  const delay = Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** link.attempt);
  link.attempt += 1;
  link.reconnectTimer = setTimeout(connect, delay);
  renderStatus();
  $('speaker').textContent = '';
  showError('signaling: ' + why + '; reconnecting (attempt ' + link.attempt + ')', 'reconnecting');
}

// ---- the room ------------------------------------------------------------------

async function getMedia() {
  try {
    return await navigator.mediaDevices.getUserMedia({ audio: true, video: true });
  } catch (e) {
    // No camera (or no permission for it): audio alone is the common case.
    return await navigator.mediaDevices.getUserMedia({ audio: true });
  }
}

async function startCall() {
  const generation = link.generation;
  renderStatus();
  const publish = fleetcall.grant.publish;
  if (fleetcall.stream && !fleetcall.stream.getTracks().every((t) => t.readyState === 'live')) stopStream();
  if (publish && !fleetcall.stream) {
    let stream;
    try {
      stream = await getMedia();
    } catch (e) {
      if (generation === link.generation) finish('no microphone: ' + e.message, 'media');
      return;
    }
    if (!link.wanted || generation !== link.generation) {
      stream.getTracks().forEach((t) => t.stop()); // left meanwhile
      return;
    }
    fleetcall.stream = stream;
  }
  const pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
  fleetcall.pc = pc;
  if (publish) {
    for (const track of fleetcall.stream.getTracks()) {
      pc.addTransceiver(track, { direction: 'sendonly', streams: [fleetcall.stream] });
    }
  } else {
    // Listen only: the server refuses any m-line that sends.
    link.listenTransceiver = pc.addTransceiver('audio', { direction: 'recvonly' });
  }
  pc.ontrack = onTrack;
  pc.onconnectionstatechange = () => { if (pc === fleetcall.pc) renderStatus(); };
  pc.oniceconnectionstatechange = () => {
    if (pc === fleetcall.pc && pc.iceConnectionState === 'failed') enqueue(() => restartIce(pc));
  };
  await pc.setLocalDescription(await pc.createOffer());
  renderStatus();
  request({ roomJoin: { room: fleetcall.room } }, (reply) => {
    if (reply.error) {
      finish(describeError(reply.error.code, reply.error.message, 'join'), reply.error.code);
      return;
    }
    if (pc !== fleetcall.pc) return;
    fleetcall.callId = reply.ack.callId;
    renderParticipants();
    offer(pc, 'sdpOffer', pc.localDescription.sdp);
  });
}

// Our offer (the join, or an ICE restart); its answer comes as an sdpAnswer
// event with the same revision.
function offer(pc, kind, sdp) {
  const revision = String(link.nextRevision++);
  link.offerRevision = revision;
  request({ [kind]: { callId: fleetcall.callId, sessionId: fleetcall.sessionId, revision, sdp } }, async (reply) => {
    if (!reply.error || pc !== fleetcall.pc) return;
    if (kind === 'sdpOffer') {
      finish(describeError(reply.error.code, reply.error.message, 'media'), reply.error.code);
    } else {
      link.offerRevision = null;
      if (pc.signalingState === 'have-local-offer') await pc.setLocalDescription({ type: 'rollback' });
      showError(describeError(reply.error.code, reply.error.message, 'media'), reply.error.code);
    }
  });
}

async function restartIce(pc) {
  if (pc !== fleetcall.pc || !fleetcall.callId || pc.signalingState !== 'stable') return;
  await pc.setLocalDescription(await pc.createOffer({ iceRestart: true }));
  offer(pc, 'iceRestart', pc.localDescription.sdp);
}

async function onServerOffer(m) {
  const pc = fleetcall.pc;
  if (!pc || m.callId !== fleetcall.callId) return;
  if (pc.signalingState === 'have-local-offer') {
    // Our ICE restart cancelled this offer; the server offers again.
    return;
  }
  await pc.setRemoteDescription({ type: 'offer', sdp: m.sdp });
  await pc.setLocalDescription(await pc.createAnswer());
  const answer = { callId: m.callId, sessionId: fleetcall.sessionId, revision: m.revision, sdp: pc.localDescription.sdp };
  request({ sdpAnswer: answer }, (reply) => {
    const code = reply.error && reply.error.code;
    // A newer offer superseded this one (or an ICE restart cancelled it):
    // it follows in the queue.
    if (!code || code === 'ERROR_CODE_STALE_REVISION' || code === 'ERROR_CODE_NO_PENDING_OFFER') return;
    showError(describeError(code, reply.error.message, 'media'), code);
  });
}

async function onSdpAnswer(m) {
  const pc = fleetcall.pc;
  if (!pc || m.revision !== link.offerRevision || pc.signalingState !== 'have-local-offer') return;
  link.offerRevision = null;
  await pc.setRemoteDescription({ type: 'answer', sdp: m.sdp });
}

function onCallState(m) {
  if (!fleetcall.callId || m.callId !== fleetcall.callId) return;
  fleetcall.participants.clear();
  for (const p of m.participants || []) {
    if (p.status === 'PARTICIPANT_STATUS_GONE') continue;
    if (p.deviceId === fleetcall.deviceId) {
      link.ownMediaId = mediaKey(p.mediaId || 0);
      continue;
    }
    fleetcall.participants.set(p.deviceId, { status: p.status, mediaId: mediaKey(p.mediaId || 0) });
  }
  renderParticipants();
}

function onParticipantUpdate(m) {
  if (m.callId !== fleetcall.callId || m.deviceId === fleetcall.deviceId) return;
  const known = fleetcall.participants.get(m.deviceId);
  const mediaId = mediaKey(m.mediaId || 0) || (known && known.mediaId) || null;
  if (m.status === 'PARTICIPANT_STATUS_GONE') {
    fleetcall.participants.delete(m.deviceId);
    if (mediaId) document.getElementById('media-' + mediaId)?.remove();
  } else {
    fleetcall.participants.set(m.deviceId, { status: m.status, mediaId });
  }
  renderParticipants();
}

function onActiveSpeakers(m) {
  if (m.callId !== fleetcall.callId) return;
  fleetcall.speakers = m.deviceIds || [];
  renderParticipants();
}

const END_TEXT = {
  END_REASON_LEFT: 'left',
  END_REASON_EMPTY: 'the room is empty',
  END_REASON_CONNECTION_LOST: 'connection lost',
  END_REASON_SETUP_TIMEOUT: 'media setup timed out',
  END_REASON_MEDIA_FAILED: 'media failed',
  END_REASON_SERVER_SHUTDOWN: 'the server is shutting down',
  END_REASON_ENDED_BY_OPERATOR: 'ended by an operator',
  END_REASON_REVOKED: 'access revoked',
  END_REASON_CREDENTIAL_EXPIRED: 'token expired',
  END_REASON_HANGUP: 'hung up',
};

function onCallEnded(m) {
  if (m.callId !== fleetcall.callId) return;
  if (m.reason === 'END_REASON_SERVER_SHUTDOWN') {
    // The server goes away and its sessions with it; once it is back the
    // resume fails (sessionUnknown) and we join again.
    teardownMedia(true);
    renderParticipants();
    showError('the server is restarting; rejoining when it is back', m.reason);
    return;
  }
  const text = END_TEXT[m.reason] || (m.reason || 'ended').replace('END_REASON_', '').toLowerCase().replace(/_/g, ' ');
  const by = m.by && m.by !== fleetcall.deviceId ? ' by ' + m.by : '';
  if (m.reason === 'END_REASON_LEFT' && link.leaving) {
    finish('left');
  } else {
    finish('call ended: ' + text + by + (m.detail ? ' (' + m.detail + ')' : ''), m.reason);
  }
}

const ERROR_TEXT = {
  ERROR_CODE_UNAUTHENTICATED: 'no valid token',
  ERROR_CODE_CREDENTIAL_EXPIRED: 'token expired',
  ERROR_CODE_CREDENTIAL_REVOKED: 'access revoked',
  ERROR_CODE_IDENTITY_IN_USE: 'this identity is in use by another credential',
  ERROR_CODE_UNSUPPORTED_VERSION: 'the server speaks another protocol version',
  ERROR_CODE_INVALID_ARGUMENT: 'invalid request',
  ERROR_CODE_OVERLOADED: 'over capacity',
  ERROR_CODE_RATE_LIMITED: 'too many messages',
  ERROR_CODE_ALREADY_IN_CALL: 'already in another call',
  ERROR_CODE_CALL_ENDED: 'the call has ended',
  ERROR_CODE_SHUTTING_DOWN: 'the server is shutting down',
};

function describeError(code, message, during) {
  let text = ERROR_TEXT[code] || (code || 'error').replace('ERROR_CODE_', '').toLowerCase().replace(/_/g, ' ');
  if (code === 'ERROR_CODE_FORBIDDEN') {
    text = during === 'join' ? 'not allowed in this room' : during === 'media' ? 'this token may not send media' : 'not allowed';
  }
  return text + (message ? ': ' + message : '');
}

// ---- join, leave, teardown ----------------------------------------------------

function join(room, token) {
  if (link.wanted) return;
  showError('');
  link.generation += 1;
  fleetcall.room = room;
  link.token = token;
  link.wanted = true;
  link.everUp = false;
  link.leaving = false;
  link.attempt = 0;
  fleetcall.sessionId = null;
  link.resumeToken = null;
  fleetcall.lastSeq = 0;
  link.pending.clear();
  $('join').disabled = true;
  $('leave').disabled = false;
  connect();
}

function leave() {
  if (!link.wanted) return;
  link.leaving = true;
  if (link.up && fleetcall.callId) {
    request({ groupLeave: { callId: fleetcall.callId } }, () => finish('left'));
    setTimeout(() => { if (link.leaving) finish('left'); }, LEAVE_WAIT_MS);
  } else {
    finish('left');
  }
}

function stopStream() {
  if (fleetcall.stream) fleetcall.stream.getTracks().forEach((t) => t.stop());
  fleetcall.stream = null;
}

// Media of the call down; with `keepStream` the microphone stays open for
// the next join of the same page.
function teardownMedia(keepStream) {
  if (fleetcall.pc) fleetcall.pc.close();
  fleetcall.pc = null;
  if (!keepStream) stopStream();
  fleetcall.callId = null;
  link.offerRevision = null;
  link.ownMediaId = null;
  link.listenTransceiver = null;
  fleetcall.participants.clear();
  fleetcall.speakers = [];
  fleetcall.slots.clear();
  $('media').replaceChildren();
}

// Out of the room for good (left, refused, ended): nothing reconnects.
function finish(reason, code) {
  const wasWanted = link.wanted;
  link.wanted = false;
  link.leaving = false;
  clearTimeout(link.reconnectTimer);
  clearTimeout(link.welcomeTimer);
  clearInterval(link.heartbeatTimer);
  link.up = false;
  const ws = fleetcall.ws;
  fleetcall.ws = null;
  if (ws) ws.close(1000, 'left');
  teardownMedia(false);
  fleetcall.sessionId = null;
  link.pending.clear();
  renderParticipants();
  const failed = code !== undefined && code !== null;
  if (failed) showError(reason, code);
  else if (wasWanted && fleetcall.lastErrorCode === 'reconnecting') showError('');
  setStatus(reason, failed ? 'failed' : 'idle');
  $('join').disabled = false;
  $('leave').disabled = true;
}

$('join-form').addEventListener('submit', (e) => {
  e.preventDefault();
  join($('room').value, $('token').value.trim());
});
$('leave').addEventListener('click', leave);
// Best effort: the others see us leave at once instead of after the resume
// grace. The socket closes with the page anyway.
window.addEventListener('pagehide', () => {
  if (link.up && fleetcall.callId) sendNow({ opId: String(link.nextOp++), groupLeave: { callId: fleetcall.callId } });
});

const params = new URLSearchParams(location.search);
if (params.get('room')) $('room').value = params.get('room');
if (params.get('token')) $('token').value = params.get('token');
if (params.get('autojoin') === '1' && params.get('room') && params.get('token')) {
  join(params.get('room'), params.get('token'));
}
