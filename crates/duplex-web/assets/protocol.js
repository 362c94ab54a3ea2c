// The duplex.v1 socket (proto/PROTOCOL.md): opens the WebSocket with the `duplex.v1`
// subprotocol (and the bearer token as a `bearer.<token>` entry, since browsers cannot set
// headers on a WebSocket), sends `session.start`, hands server messages and audio frames to
// the page, and reconnects with backoff when the connection drops for a reason a retry can
// fix. It owns no audio and no DOM.

export const SUBPROTOCOL = 'duplex.v1';

/** Uplink audio the socket may hold unsent before frames are dropped: ~1 s of 16 kHz PCM16.
 * Beyond it the network is not keeping up, and queueing more would only add latency. */
const MAX_BUFFERED_BYTES = 32000;
/** Reconnect delays: doubling from the first, capped, each with up to 50 % jitter. */
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 10000;
/** Consecutive failed attempts before the page gives up and says so. */
const MAX_ATTEMPTS = 8;

/** Close codes after which a new connection would be refused or pointless (PROTOCOL.md). */
const FINAL_CLOSE = new Map([
  [1000, 'the session ended'],
  [1002, 'the server reported a protocol error'],
  [1009, 'a message was too large'],
  [4000, 'the connection was idle for too long'],
  [4029, 'the plan has no conversation time left'],
]);

/** Fatal errors after which the page reconnects: only the server going away (a restart or a
 * rolling deploy). After any other fatal error a new connection would fail the same way. */
const RETRYABLE_ERRORS = new Set(['server_shutting_down']);

/** The WebSocket URL of a server ('' = the page's own origin). */
export function conversationUrl(server, token, tokenInUrl) {
  let base = server && server.trim() ? server.trim() : location.origin;
  base = base.replace(/^http(s?):/, 'ws$1:').replace(/\/+$/, '');
  if (!/^wss?:\/\//.test(base)) throw new Error(`not a ws:// or http:// URL: ${server}`);
  const url = new URL(base.endsWith('/v1/conversation') ? base : `${base}/v1/conversation`);
  if (token && tokenInUrl) url.searchParams.set('token', token);
  return url;
}

export class Connection {
  /**
   * @param {object} o
   * @param {URL} o.url from conversationUrl
   * @param {string} o.token bearer token or ''
   * @param {object} o.start the session.start message
   * @param {(msg: object) => void} o.onMessage every server JSON message
   * @param {(data: ArrayBuffer) => void} o.onAudio every binary frame
   * @param {(state: string, detail?: string) => void} o.onState
   *   'connecting' | 'ready' | 'reconnecting' (detail: delay) | 'closed' (detail: why) |
   *   'refused' (detail: the server's reason) | 'failed' (detail: why)
   */
  constructor(o) {
    Object.assign(this, o);
    this.ws = null;
    this.ready = false;
    this.stopped = false;
    this.attempts = 0;
    this.timer = null;
    this.fatal = null;
    this.stats = { connects: 0, framesSent: 0, framesDropped: 0, bytesSent: 0 };
  }

  open() {
    this.stopped = false;
    this.connect();
  }

  connect() {
    this.ready = false;
    this.fatal = null;
    this.onState('connecting');
    const protocols = [SUBPROTOCOL];
    if (this.token && !this.url.searchParams.has('token')) protocols.push(`bearer.${this.token}`);
    let ws;
    try {
      ws = new WebSocket(this.url, protocols);
    } catch (e) {
      this.onState('failed', e.message);
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.stats.connects++;
      ws.send(JSON.stringify(this.start));
    };
    ws.onmessage = (e) => {
      if (typeof e.data !== 'string') {
        this.onAudio(e.data);
        return;
      }
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch {
        return; // Not JSON: nothing this version sends; ignore as the protocol asks.
      }
      if (msg.type === 'session.ready') {
        this.ready = true;
        this.attempts = 0;
        this.onState('ready');
      } else if (msg.type === 'error' && msg.fatal) {
        this.fatal = msg.code;
      }
      this.onMessage(msg);
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.ready = false;
      if (this.stopped) return;
      if (!opened) {
        this.diagnose();
        return;
      }
      const final = FINAL_CLOSE.get(e.code);
      if (final) {
        this.onState('closed', e.reason ? `${final} (${e.reason})` : final);
      } else if (this.fatal && !RETRYABLE_ERRORS.has(this.fatal)) {
        this.onState('closed', e.reason || `the server closed the session (${this.fatal})`);
      } else {
        this.retry();
      }
    };
  }

  /** The upgrade failed, and browsers hide its HTTP status: ask the server why with a plain
   * GET of the same URL, which runs the same admission checks (PROTOCOL.md, "Connecting"). */
  async diagnose() {
    const url = new URL(this.url);
    url.protocol = url.protocol === 'wss:' ? 'https:' : 'http:';
    url.searchParams.set('v', '1');
    const headers = this.token ? { Authorization: `Bearer ${this.token}` } : {};
    let status = 0;
    let reason = '';
    try {
      const res = await fetch(url, { headers, cache: 'no-store' });
      status = res.status;
      // duplex answers in one line of plain text; anything else (a proxy's HTML page) is
      // summarised by its status text.
      const plain = (res.headers.get('content-type') || '').startsWith('text/plain');
      reason = plain ? (await res.text()).trim().slice(0, 300) : res.statusText || 'refused';
    } catch {
      // Unreachable (server down, or another origin without CORS): a retry may help.
    }
    if (this.stopped) return;
    // Refusals a retry cannot fix: a bad or missing token, a forbidden origin, a bad URL.
    if ([400, 401, 403, 404].includes(status)) {
      this.onState('refused', `${reason} (HTTP ${status})`);
    } else {
      this.retry(status === 0 ? 'the server is unreachable' : `${reason} (HTTP ${status})`);
    }
  }

  retry(why) {
    if (this.attempts >= MAX_ATTEMPTS) {
      this.onState('failed', why || 'could not reconnect');
      return;
    }
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.attempts);
    const delay = Math.round(base * (0.5 + Math.random() * 0.5));
    this.attempts++;
    this.onState('reconnecting', why ? `${why}; retrying in ${delay} ms` : `retrying in ${delay} ms`);
    this.timer = setTimeout(() => {
      this.timer = null;
      if (!this.stopped) this.connect();
    }, delay);
  }

  /** One 20 ms microphone frame; dropped (and counted) unless a session runs and the socket
   * keeps up. */
  sendAudio(pcm) {
    const ws = this.ws;
    if (!this.ready || !ws || ws.readyState !== WebSocket.OPEN) return;
    if (ws.bufferedAmount > MAX_BUFFERED_BYTES) {
      this.stats.framesDropped++;
      return;
    }
    ws.send(pcm);
    this.stats.framesSent++;
    this.stats.bytesSent += pcm.byteLength;
  }

  /** A client message (input.text, playback.mark, response.interrupt); false if not sent. */
  send(msg) {
    const ws = this.ws;
    if (!this.ready || !ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(msg));
    return true;
  }

  /** Ends the session (`session.end`) and stops reconnecting. */
  close() {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    const ws = this.ws;
    this.ws = null;
    if (ws && ws.readyState === WebSocket.OPEN) {
      if (this.ready) ws.send(JSON.stringify({ type: 'session.end' }));
      ws.close(1000, 'stopped by the user');
    } else if (ws) {
      ws.close();
    }
  }
}
