// fleetcall web client: joins a room over the signaling WebSocket (/ws) and
// exchanges audio (and video when a camera exists) with the SFU.
// Protocol: signaling/src/protocol.rs. For tests, /?room=R&name=N&autojoin=1
// joins without clicks; window.fleetcall.pc is the RTCPeerConnection,
// window.fleetcall.speakers the active speakers (participant ids, the one
// talking first) and window.fleetcall.activeSpeaker the name of who talks.
// In big rooms audio arrives on a few "slot-N" streams whose speaker changes;
// each packet's CSRC is the speaker's participant id.
'use strict';

const fleetcall = {
  pc: null,
  ws: null,
  stream: null,
  participant: null,
  participants: new Map(), // id -> name
  state: 'idle',
  lastError: null,
  speakers: [], // participant ids, the dominant speaker first
  activeSpeaker: null, // display name of the dominant speaker
  slots: new Map(), // slot stream id -> RTCRtpReceiver
};
window.fleetcall = fleetcall;

const $ = (id) => document.getElementById(id);

function setStatus(text, cls) {
  fleetcall.state = text;
  const el = $('status');
  el.textContent = text;
  el.className = 'status ' + cls;
}

function showError(text) {
  fleetcall.lastError = text;
  const el = $('error');
  el.textContent = text;
  el.hidden = !text;
}

function nameOf(id) {
  if (id === fleetcall.participant) return $('name').value + ' (you)';
  return fleetcall.participants.get(id) || 'participant ' + id;
}

function speakerClass(id) {
  const at = fleetcall.speakers.indexOf(id);
  return at === 0 ? ' speaking' : at > 0 ? ' selected' : '';
}

function renderParticipants() {
  const list = $('participants');
  list.replaceChildren();
  if (fleetcall.participant !== null) {
    const me = document.createElement('li');
    me.className = 'self' + speakerClass(fleetcall.participant);
    me.textContent = $('name').value + ' (you)';
    list.append(me);
  }
  for (const [id, name] of fleetcall.participants) {
    const li = document.createElement('li');
    li.className = speakerClass(id).trim();
    li.textContent = name;
    li.dataset.participant = id;
    list.append(li);
  }
  const talking = fleetcall.speakers.length ? nameOf(fleetcall.speakers[0]) : null;
  fleetcall.activeSpeaker = talking;
  $('speaker').textContent = talking ? 'Talking: ' + talking : '';
}

// Slot captions follow the speaker in each slot (the packets' CSRC).
function renderSlots() {
  for (const [streamId, receiver] of fleetcall.slots) {
    const fig = document.getElementById('media-' + streamId);
    if (!fig) continue;
    const sources = receiver.getContributingSources();
    const recent = sources.filter((s) => performance.timeOrigin + performance.now() - s.timestamp < 1000);
    const cap = fig.querySelector('figcaption');
    cap.textContent = recent.length ? nameOf(recent[0].source) : 'quiet';
  }
}
setInterval(renderSlots, 500);

function mediaFor(participantId) {
  const id = 'media-' + participantId;
  let fig = document.getElementById(id);
  if (!fig) {
    fig = document.createElement('figure');
    fig.id = id;
    const cap = document.createElement('figcaption');
    fig.append(cap);
    $('media').append(fig);
  }
  fig.querySelector('figcaption').textContent =
    fleetcall.participants.get(Number(participantId)) || 'participant ' + participantId;
  return fig;
}

function onTrack(event) {
  const stream = event.streams[0];
  const participantId = stream ? stream.id : 'unknown';
  const fig = mediaFor(participantId);
  if (participantId.startsWith('slot-')) {
    fig.className = 'slot';
    fleetcall.slots.set(participantId, event.receiver);
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
  event.track.onended = () => { el.remove(); if (!fig.querySelector('audio,video')) fig.remove(); };
}

async function getMedia() {
  try {
    return await navigator.mediaDevices.getUserMedia({ audio: true, video: true });
  } catch (e) {
    // No camera (or no permission for it): audio alone is the common case.
    return await navigator.mediaDevices.getUserMedia({ audio: true });
  }
}

function send(msg) {
  if (fleetcall.ws && fleetcall.ws.readyState === WebSocket.OPEN) fleetcall.ws.send(JSON.stringify(msg));
}

// Messages are handled one at a time, in order: an offer must never overtake
// the answer to our join.
let queue = Promise.resolve();
function onMessage(event) {
  queue = queue.then(() => handle(JSON.parse(event.data))).catch((e) => showError(String(e)));
}

async function handle(msg) {
  const pc = fleetcall.pc;
  switch (msg.type) {
    case 'joined':
      fleetcall.participant = msg.participant;
      for (const p of msg.participants) fleetcall.participants.set(p.id, p.name);
      renderParticipants();
      await pc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
      break;
    case 'offer':
      await pc.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
      await pc.setLocalDescription(await pc.createAnswer());
      send({ type: 'answer', sdp: pc.localDescription.sdp });
      break;
    case 'answer':
      await pc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
      break;
    case 'participant_joined':
      fleetcall.participants.set(msg.id, msg.name);
      renderParticipants();
      break;
    case 'participant_left':
      fleetcall.participants.delete(msg.id);
      document.getElementById('media-' + msg.id)?.remove();
      renderParticipants();
      break;
    case 'active_speakers':
      fleetcall.speakers = msg.speakers;
      renderParticipants();
      break;
    case 'left':
      teardown('left: ' + msg.reason);
      break;
    case 'error':
      showError(msg.code + ': ' + msg.message);
      break;
  }
}

async function join(room, name) {
  showError('');
  setStatus('connecting', 'connecting');
  $('join').disabled = true;
  $('leave').disabled = false;
  try {
    fleetcall.stream = await getMedia();
  } catch (e) {
    teardown('no microphone: ' + e.message);
    return;
  }
  const pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
  fleetcall.pc = pc;
  for (const track of fleetcall.stream.getTracks()) {
    pc.addTransceiver(track, { direction: 'sendonly', streams: [fleetcall.stream] });
  }
  pc.ontrack = onTrack;
  pc.onconnectionstatechange = () => {
    const s = pc.connectionState;
    setStatus(s, s === 'connected' ? 'connected' : s === 'failed' ? 'failed' : 'connecting');
  };
  await pc.setLocalDescription(await pc.createOffer());

  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const ws = new WebSocket(scheme + '://' + location.host + '/ws');
  fleetcall.ws = ws;
  ws.onmessage = onMessage;
  ws.onopen = () => send({ type: 'join', room, name, sdp: pc.localDescription.sdp });
  ws.onclose = () => { if (fleetcall.ws === ws) teardown('signaling closed'); };
}

function leave() {
  send({ type: 'leave' });
  teardown('left');
}

function teardown(reason) {
  const ws = fleetcall.ws;
  fleetcall.ws = null;
  if (ws) ws.close();
  if (fleetcall.pc) fleetcall.pc.close();
  if (fleetcall.stream) fleetcall.stream.getTracks().forEach((t) => t.stop());
  fleetcall.pc = null;
  fleetcall.stream = null;
  fleetcall.participant = null;
  fleetcall.participants.clear();
  fleetcall.speakers = [];
  fleetcall.slots.clear();
  $('media').replaceChildren();
  renderParticipants();
  setStatus(reason, 'idle');
  $('join').disabled = false;
  $('leave').disabled = true;
}

$('join-form').addEventListener('submit', (e) => {
  e.preventDefault();
  join($('room').value, $('name').value);
});
$('leave').addEventListener('click', leave);

const params = new URLSearchParams(location.search);
if (params.get('room')) $('room').value = params.get('room');
if (params.get('name')) $('name').value = params.get('name');
if (params.get('autojoin') === '1' && params.get('room') && params.get('name')) {
  join(params.get('room'), params.get('name'));
}
