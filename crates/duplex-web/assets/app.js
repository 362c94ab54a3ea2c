// The page: wires the microphone, the socket and the player together and reflects protocol
// events in the UI. No audio is processed here (see the worklets), and every server string is
// shown with textContent, never parsed as HTML.
import { Connection, conversationUrl } from './protocol.js';
import { Microphone, CAPTURE_RATE } from './microphone.js';
import { Player } from './player.js';

/** The server's output rates; the page asks for its AudioContext's rate when listed, so the
 * player needs no resampling. */
const SERVER_RATES = [8000, 16000, 24000, 44100, 48000];
/** A tab hidden this long releases the microphone (the session ends). */
const HIDDEN_RELEASE_MS = 60000;
/** How long "interrupted" stays on the status line before it returns to "listening". */
const INTERRUPTED_SHOW_MS = 800;
/** Bounds of the measurement logs kept for tests and the console (2 min of 20 ms levels). */
const MAX_LEVELS = 6000;
const MAX_EVENTS = 2000;
/** Limits after which the session has nothing left to do (PROTOCOL.md, limit_exceeded). */
const SESSION_ENDING_LIMITS = new Set(['daily_seconds', 'trial_seconds']);

const $ = (id) => document.getElementById(id);
const ui = {
  start: $('start'),
  stop: $('stop'),
  status: $('status'),
  banner: $('banner'),
  errors: $('errors'),
  level: $('level'),
  usage: $('usage'),
  usageText: $('usage-text'),
  transcript: $('transcript'),
  server: $('server'),
  token: $('token'),
  tokenInUrl: $('token-in-url'),
  textForm: $('text-form'),
  text: $('text'),
};

const STATUS_TEXT = {
  idle: 'Idle',
  connecting: 'Connecting…',
  reconnecting: 'Reconnecting…',
  listening: 'Listening',
  thinking: 'Thinking…',
  speaking: 'Speaking',
  interrupted: 'Interrupted',
  limit: 'Limit reached',
  error: 'Error',
};

/** Everything a test (or a curious developer in the console) may want to read. */
const stats = {
  status: 'idle',
  statusHistory: [],
  ctxRate: 0,
  outputRate: 0,
  sessionIds: [],
  micActive: false,
  micStartedAt: null,
  levels: [],
  events: [],
  errors: [],
  limit: null,
  usage: null,
  audioFramesReceived: 0,
  audioBytesReceived: 0,
  marksSent: 0,
  underruns: 0,
  turns: {},
  flushes: [],
};

let session = null;

function now() {
  return session && session.ctx ? session.ctx.currentTime : performance.now() / 1000;
}

function logEvent(type, extra) {
  stats.events.push({ type, t: now(), ...extra });
  if (stats.events.length > MAX_EVENTS) stats.events.shift();
}

function setStatus(state, detail) {
  stats.status = state;
  stats.statusHistory.push(state);
  if (stats.statusHistory.length > MAX_EVENTS) stats.statusHistory.shift();
  ui.status.dataset.state = state;
  const label = STATUS_TEXT[state];
  ui.status.textContent = detail ? `${label.replace('…', '')}: ${detail}` : label;
}

function showBanner(text) {
  ui.banner.textContent = text;
  ui.banner.hidden = !text;
}

function showError(code, message) {
  stats.errors.push({ code, message });
  const li = document.createElement('li');
  const c = document.createElement('code');
  c.textContent = code;
  li.append(c, ` ${message}`);
  ui.errors.append(li);
  while (ui.errors.children.length > 5) ui.errors.firstElementChild.remove();
}

// ---- transcript ------------------------------------------------------------------------

function entry(kind, label) {
  const li = document.createElement('li');
  li.className = kind;
  const who = document.createElement('span');
  who.className = 'who';
  who.textContent = label;
  const text = document.createElement('span');
  text.className = 'text';
  li.append(who, text);
  ui.transcript.append(li);
  li.scrollIntoView({ block: 'nearest' });
  return li;
}

function userTranscript(msg) {
  let li = session.interim;
  if (!li) {
    li = session.interim = entry('user interim', 'You');
  }
  li.querySelector('.text').textContent = msg.text;
  if (msg.is_final) {
    li.classList.remove('interim');
    session.interim = null;
  }
}

function assistantEntry(turn) {
  let li = session.assistant.get(turn);
  if (!li) {
    li = entry('assistant', 'Assistant');
    li.dataset.turn = String(turn);
    session.assistant.set(turn, li);
  }
  return li;
}

function assistantMessage(msg) {
  if (session.interrupted.has(msg.turn_id)) return; // PROTOCOL.md: ignore after interrupted
  const li = assistantEntry(msg.turn_id);
  const text = li.querySelector('.text');
  if (msg.is_final) text.textContent = msg.text;
  else text.textContent += msg.delta;
}

function markInterrupted(msg) {
  const li = assistantEntry(msg.turn_id);
  const text = li.querySelector('.text');
  const full = text.textContent;
  const heard = msg.heard_text || '';
  text.textContent = '';
  const heardSpan = document.createElement('span');
  heardSpan.className = 'heard';
  heardSpan.textContent = heard;
  text.append(heardSpan);
  const rest = full.startsWith(heard) ? full.slice(heard.length) : '';
  if (rest.trim()) {
    const unheard = document.createElement('span');
    unheard.className = 'unheard';
    unheard.textContent = rest;
    text.append(unheard);
  }
  const cut = document.createElement('span');
  cut.className = 'cut';
  cut.textContent = `Cut off after ${(msg.played_ms / 1000).toFixed(1)} s: you heard up to here.`;
  li.append(cut);
}

// ---- usage ----------------------------------------------------------------------------

function showUsage(u) {
  stats.usage = u;
  if (u.seconds_remaining === null || u.seconds_remaining === undefined) {
    ui.usage.value = 0;
    ui.usageText.textContent = `${u.seconds_used_today} s used today (${u.plan}, unlimited); this session ${u.session_seconds} s.`;
    return;
  }
  const allowance = u.seconds_used_today + u.seconds_remaining;
  ui.usage.value = allowance > 0 ? u.seconds_used_today / allowance : 1;
  ui.usageText.textContent = `${u.seconds_used_today} s of ${allowance} s used today (${u.plan}); this session ${u.session_seconds} s.`;
}

// ---- server messages -----------------------------------------------------------------

function onMessage(msg) {
  logEvent(msg.type, msg.type === 'user_transcript' ? { is_final: msg.is_final } : pick(msg));
  switch (msg.type) {
    case 'session.ready': {
      stats.sessionIds.push(msg.session_id);
      stats.outputRate = msg.output.sample_rate;
      const limit = msg.plan.limits.daily_seconds;
      ui.usageText.textContent =
        limit === null ? `Plan ${msg.plan.name}: unlimited.` : `Plan ${msg.plan.name}: ${limit} s a day.`;
      setStatus('listening');
      break;
    }
    case 'vad.speech_started':
      // The server interrupts the assistant at once; silence it here without waiting for
      // `interrupted`, which follows.
      if (session.speaking !== null) bargeIn(session.speaking, 'speech');
      setStatus('listening');
      break;
    case 'vad.speech_stopped':
      setStatus('thinking');
      break;
    case 'user_transcript':
      userTranscript(msg);
      // Nothing was understood: no answer is coming.
      if (msg.is_final && !msg.text.trim() && stats.status === 'thinking') setStatus('listening');
      break;
    case 'assistant_message':
      assistantMessage(msg);
      break;
    case 'assistant_audio.start':
      session.audioTurn = msg.turn_id;
      session.player.begin(msg.turn_id, msg.format);
      turnStats(msg.turn_id).audioStartAt = now();
      break;
    case 'assistant_audio.end':
      if (session.audioTurn === msg.turn_id) session.audioTurn = null;
      session.player.end(msg.turn_id);
      turnStats(msg.turn_id).endReason = msg.reason;
      break;
    case 'interrupted':
      session.interrupted.add(msg.turn_id);
      bargeIn(msg.turn_id, 'interrupted');
      markInterrupted(msg);
      turnStats(msg.turn_id).interrupted = msg;
      setStatus('interrupted');
      setTimeout(() => {
        if (session && stats.status === 'interrupted') setStatus('listening');
      }, INTERRUPTED_SHOW_MS);
      break;
    case 'usage_update':
      showUsage(msg);
      break;
    case 'limit_exceeded': {
      stats.limit = msg;
      const resets = msg.resets_at ? ` It resets at ${new Date(msg.resets_at).toLocaleString()}.` : '';
      const hint = msg.upgrade_hint ? ` ${msg.upgrade_hint}` : '';
      showBanner(`Limit reached: ${msg.limit.replaceAll('_', ' ')} (${msg.used} of ${msg.allowed}).${resets}${hint}`);
      if (SESSION_ENDING_LIMITS.has(msg.limit)) {
        // Nothing more can be said today: release the microphone now; the server closes.
        releaseMicrophone();
        setStatus('limit');
      }
      break;
    }
    case 'error':
      showError(msg.code, msg.message);
      if (msg.fatal) setStatus('error', msg.message);
      else if (stats.status === 'thinking') setStatus('listening'); // the turn will not come
      break;
    default:
      break; // pong, and types of later versions: ignored (PROTOCOL.md, versioning).
  }
}

function pick(msg) {
  const out = {};
  for (const k of ['turn_id', 'audio_ms', 'code', 'played_ms', 'limit', 'reason']) {
    if (k in msg) out[k] = msg[k];
  }
  return out;
}

function turnStats(turn) {
  if (!stats.turns[turn]) stats.turns[turn] = { turn };
  return stats.turns[turn];
}

function bargeIn(turn, reason) {
  if (session.flushed.has(turn)) return;
  session.flushed.add(turn);
  session.player.flush(turn);
  stats.flushes.push({ turn, reason, requestedAt: now() });
}

function onAudio(data) {
  stats.audioFramesReceived++;
  stats.audioBytesReceived += data.byteLength;
  // Frames of a turn this page already silenced may still be in flight: drop them.
  if (session.audioTurn === null || session.flushed.has(session.audioTurn)) return;
  session.player.push(data);
}

function onPlayback(r) {
  if (!session) return;
  const ts = r.turn !== null && r.turn !== undefined ? turnStats(r.turn) : null;
  switch (r.type) {
    case 'started':
      ts.startedAt = r.t;
      session.speaking = r.turn;
      setStatus('speaking');
      break;
    case 'played':
      ts.playedMs = r.played_ms;
      if (session.conn.send({ type: 'playback.mark', turn_id: r.turn, played_ms: r.played_ms })) stats.marksSent++;
      break;
    case 'done':
      if (ts) {
        ts.playedMs = r.played_ms;
        ts.lastAt = r.t;
        ts.done = true;
      }
      if (session.conn.send({ type: 'playback.mark', turn_id: r.turn, played_ms: r.played_ms })) stats.marksSent++;
      if (session.speaking === r.turn) {
        session.speaking = null;
        if (stats.status === 'speaking') setStatus('listening');
      }
      break;
    case 'flushed': {
      const f = stats.flushes.find((x) => x.turn === r.turn && x.flushedAt === undefined);
      if (f) {
        f.flushedAt = now();
        f.lastPlayedAt = r.t;
        f.droppedMs = r.dropped_ms;
      }
      if (ts) {
        ts.playedMs = r.played_ms;
        ts.lastAt = r.t;
      }
      if (session.speaking === r.turn) session.speaking = null;
      break;
    }
    case 'underrun':
      stats.underruns++;
      break;
    default:
      break;
  }
}

// ---- session lifecycle ----------------------------------------------------------------

async function start() {
  ui.start.disabled = true;
  ui.stop.disabled = false;
  showBanner('');
  setStatus('connecting');
  let url;
  try {
    url = conversationUrl(ui.server.value, ui.token.value.trim(), ui.tokenInUrl.checked);
  } catch (e) {
    fail(e.message);
    return;
  }
  const ctx = new AudioContext({ latencyHint: 'interactive' });
  session = {
    ctx,
    mic: null,
    player: null,
    conn: null,
    audioTurn: null,
    speaking: null,
    interim: null,
    assistant: new Map(),
    interrupted: new Set(),
    flushed: new Set(),
  };
  stats.ctxRate = ctx.sampleRate;
  try {
    await ctx.resume();
    await ctx.audioWorklet.addModule('/assets/capture-worklet.js');
    await ctx.audioWorklet.addModule('/assets/playback-worklet.js');
  } catch (e) {
    fail(`audio could not start: ${e.message}`);
    return;
  }
  session.player = new Player(ctx, onPlayback);
  const outputRate = SERVER_RATES.includes(ctx.sampleRate) ? ctx.sampleRate : 48000;
  const current = session;
  session.conn = new Connection({
    url,
    token: ui.token.value.trim(),
    start: {
      type: 'session.start',
      sample_rate: CAPTURE_RATE,
      encoding: 'pcm16',
      output_sample_rate: outputRate,
      output_encoding: 'pcm16',
    },
    onMessage: (m) => session === current && onMessage(m),
    onAudio: (d) => session === current && onAudio(d),
    onState: (s, detail) => session === current && onConnState(s, detail),
  });
  session.conn.open();
}

async function onConnState(state, detail) {
  logEvent(`conn.${state}`, detail ? { detail } : {});
  switch (state) {
    case 'connecting':
      if (stats.status !== 'reconnecting') setStatus('connecting');
      break;
    case 'ready':
      stats.readyCount = (stats.readyCount || 0) + 1;
      // A new session (first or after a reconnect): no turn of the old one is playing.
      session.audioTurn = null;
      session.speaking = null;
      session.flushed.clear();
      if (!session.mic) await openMicrophone();
      break;
    case 'reconnecting':
      if (session.speaking !== null) bargeIn(session.speaking, 'disconnected');
      setStatus('reconnecting', detail);
      break;
    case 'refused':
      showError('connection_refused', detail);
      fail(detail);
      break;
    case 'failed':
      fail(detail);
      break;
    case 'closed':
      end(detail);
      break;
    default:
      break;
  }
}

async function openMicrophone() {
  const current = session;
  try {
    const mic = await Microphone.open(current.ctx, (frame) => {
      if (session !== current) return;
      if (stats.micStartedAt === null) stats.micStartedAt = frame.t;
      stats.levels.push([frame.t, frame.rms]);
      if (stats.levels.length > MAX_LEVELS) stats.levels.shift();
      // A level meter: ~0 dBFS at full scale, floor at -60 dBFS.
      const db = 20 * Math.log10(Math.max(frame.rms, 1e-6));
      ui.level.value = Math.max(0, Math.min(1, (db + 60) / 60));
      current.conn.sendAudio(frame.pcm);
    });
    if (session !== current) {
      mic.close();
      return;
    }
    current.mic = mic;
    stats.micActive = true;
  } catch (e) {
    const why = e && e.name === 'NotAllowedError' ? 'microphone permission was denied' : `microphone: ${e.message}`;
    showError('microphone', why);
    fail(why);
  }
}

function releaseMicrophone() {
  if (session && session.mic) {
    session.mic.close();
    session.mic = null;
  }
  stats.micActive = false;
  ui.level.value = 0;
}

/** Ends the session; `why` (if any) stays on the status line. */
function end(why) {
  const s = session;
  session = null;
  if (s) {
    if (s.mic) s.mic.close();
    if (s.conn) s.conn.close();
    if (s.player) s.player.close();
    s.ctx.close();
  }
  stats.micActive = false;
  ui.level.value = 0;
  ui.start.disabled = false;
  ui.stop.disabled = true;
  // A limit or a fatal error stays on the status line until the next Start.
  if (stats.status === 'limit' || stats.status === 'error') return;
  if (why) setStatus('idle', why);
  else setStatus('idle');
}

function fail(why) {
  setStatus('error', why);
  end();
}

// ---- wiring ---------------------------------------------------------------------------

ui.start.addEventListener('click', () => {
  if (!session) start();
});
ui.stop.addEventListener('click', () => end('stopped'));

ui.textForm.addEventListener('submit', (e) => {
  e.preventDefault();
  const text = ui.text.value.trim();
  if (!text) return;
  if (session && session.conn && session.conn.send({ type: 'input.text', text })) {
    entry('user', 'You (typed)').querySelector('.text').textContent = text;
    ui.text.value = '';
  } else {
    showError('not_connected', 'start a conversation first');
  }
});

// The token lives in this tab's sessionStorage only.
ui.token.value = sessionStorage.getItem('duplex.token') || '';
ui.server.value = sessionStorage.getItem('duplex.server') || '';
ui.token.addEventListener('change', () => sessionStorage.setItem('duplex.token', ui.token.value.trim()));
ui.server.addEventListener('change', () => sessionStorage.setItem('duplex.server', ui.server.value.trim()));
$('settings-form').addEventListener('submit', (e) => e.preventDefault());

let hiddenTimer = null;
document.addEventListener('visibilitychange', () => {
  if (document.hidden && session) {
    hiddenTimer = setTimeout(() => end('the tab was in the background; microphone released'), HIDDEN_RELEASE_MS);
  } else if (hiddenTimer) {
    clearTimeout(hiddenTimer);
    hiddenTimer = null;
  }
});
window.addEventListener('pagehide', () => end());

// Read-only view of the page's counters, for tests and the console.
window.duplexStats = () => {
  const conn = session && session.conn ? session.conn.stats : null;
  return JSON.parse(JSON.stringify({ ...stats, connection: conn, ctxTime: now() }));
};
