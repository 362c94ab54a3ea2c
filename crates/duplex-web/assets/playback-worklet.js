// AudioWorklet processor "duplex-playback": a jitter buffer for assistant audio. The main
// thread hands it the server's binary frames untouched (PCM16 or mu-law at the session's
// output rate); decoding, resampling (only when the server's rate differs from the
// AudioContext's), buffering, and the playback clock all live here, on the audio thread.
//
// Messages in:  {type:'audio', turn, data:ArrayBuffer, encoding, rate}
//               {type:'end', turn}     no more audio for the turn: play out what is queued
//               {type:'flush', turn}   barge-in: drop everything queued, now
// Messages out: {type:'started', turn, t}           first sample of a turn played at time t
//               {type:'played', turn, played_ms}    every MARK_MS of a turn played
//               {type:'done', turn, played_ms, t}   the turn's last queued sample played
//               {type:'flushed', turn, played_ms, dropped_ms, t}  t: time of the last sample
//                                                   played before the flush
//               {type:'underrun', turn, t}          the queue ran dry mid-turn
// Times are AudioContext times (seconds) of the sample's place in the output stream.
import { Resampler, mulawToFloat } from './resampler.js';

/** Audio queued before a turn starts playing: absorbs network jitter at 60 ms of latency. */
const PREBUFFER_MS = 60;
/** After an underrun, wait for this much before resuming, so one late frame doesn't stutter. */
const REBUFFER_MS = 40;
/** How often the page reports progress with playback.mark. */
const MARK_MS = 200;
/** The server paces at ~300 ms ahead; far more than that queued means it is not pacing. */
const MAX_QUEUED_MS = 10000;

class Playback extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ms = sampleRate / 1000;
    /** Queue of {turn, data: Float32Array, offset}. */
    this.queue = [];
    this.queued = 0;
    this.playing = false;
    this.threshold = PREBUFFER_MS * this.ms;
    /** Turn whose samples are being played, its count, and when it was last marked. */
    this.turn = null;
    this.turnSamples = 0;
    this.markedSamples = 0;
    this.ended = new Set();
    this.resampler = null;
    this.resamplerRate = 0;
    this.lastOut = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(m) {
    if (m.type === 'audio') this.enqueue(m);
    else if (m.type === 'end') this.end(m.turn);
    else if (m.type === 'flush') this.flush(m.turn);
  }

  enqueue(m) {
    let samples;
    if (m.encoding === 'mulaw') {
      const bytes = new Uint8Array(m.data);
      samples = new Float32Array(bytes.length);
      for (let i = 0; i < bytes.length; i++) samples[i] = mulawToFloat(bytes[i]);
    } else {
      const pcm = new Int16Array(m.data);
      samples = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
    }
    if (m.rate !== sampleRate) {
      if (!this.resampler || this.resamplerRate !== m.rate) {
        this.resampler = new Resampler(m.rate, sampleRate);
        this.resamplerRate = m.rate;
      }
      const out = new Float32Array(this.resampler.maxOutput(samples.length));
      samples = out.subarray(0, this.resampler.process(samples, out));
    }
    if (this.queued + samples.length > MAX_QUEUED_MS * this.ms) {
      this.port.postMessage({ type: 'overflow', turn: m.turn, dropped: samples.length });
      return;
    }
    this.queue.push({ turn: m.turn, data: samples, offset: 0 });
    this.queued += samples.length;
  }

  end(turn) {
    const queued = this.queue.some((c) => c.turn === turn);
    if (queued || (turn === this.turn && this.playing)) {
      this.ended.add(turn);
    } else {
      // Nothing of it left to play (no audio at all, or it ran dry before its end came).
      const played = turn === this.turn ? this.turnSamples : 0;
      this.port.postMessage({ type: 'done', turn, played_ms: Math.round(played / this.ms), t: this.lastOut });
    }
  }

  flush(turn) {
    let dropped = 0;
    for (const c of this.queue) dropped += c.data.length - c.offset;
    this.queue = [];
    this.queued = 0;
    this.playing = false;
    this.threshold = PREBUFFER_MS * this.ms;
    // Everything queued goes, whatever turn it belongs to: a barge-in silences the assistant.
    const reported = turn === undefined || turn === null ? this.turn : turn;
    const played = this.turn === reported ? this.turnSamples : 0;
    this.port.postMessage({
      type: 'flushed',
      turn: reported,
      played_ms: Math.round(played / this.ms),
      dropped_ms: Math.round(dropped / this.ms),
      t: this.lastOut,
    });
    this.ended.clear();
  }

  process(_inputs, outputs) {
    const out = outputs[0];
    const n = out[0].length;
    const left = out[0];
    let i = 0;
    if (!this.playing && this.queue.length > 0) {
      const head = this.queue[0].turn;
      if (this.queued >= this.threshold || this.ended.has(head)) this.playing = true;
    }
    while (this.playing && i < n && this.queue.length > 0) {
      const chunk = this.queue[0];
      if (chunk.turn !== this.turn) {
        this.turn = chunk.turn;
        this.turnSamples = 0;
        this.markedSamples = 0;
        this.port.postMessage({ type: 'started', turn: chunk.turn, t: currentTime + i / sampleRate });
      }
      const take = Math.min(n - i, chunk.data.length - chunk.offset);
      left.set(chunk.data.subarray(chunk.offset, chunk.offset + take), i);
      chunk.offset += take;
      i += take;
      this.queued -= take;
      this.turnSamples += take;
      this.lastOut = currentTime + i / sampleRate;
      if (chunk.offset === chunk.data.length) this.queue.shift();
      if (this.turnSamples - this.markedSamples >= MARK_MS * this.ms) {
        this.markedSamples = this.turnSamples;
        this.port.postMessage({
          type: 'played',
          turn: this.turn,
          played_ms: Math.round(this.turnSamples / this.ms),
        });
      }
      const next = this.queue.length > 0 ? this.queue[0].turn : null;
      if (next !== this.turn && this.ended.has(this.turn)) {
        // The turn's last sample left the queue: it is done.
        this.ended.delete(this.turn);
        this.port.postMessage({
          type: 'done',
          turn: this.turn,
          played_ms: Math.round(this.turnSamples / this.ms),
          t: this.lastOut,
        });
        if (next === null) {
          this.playing = false;
          this.threshold = PREBUFFER_MS * this.ms;
        }
      }
    }
    if (this.playing && i < n && this.queue.length === 0) {
      // Ran dry before the turn's end arrived: wait for a little audio again.
      this.playing = false;
      this.threshold = REBUFFER_MS * this.ms;
      this.port.postMessage({ type: 'underrun', turn: this.turn, t: currentTime + i / sampleRate });
    }
    for (let k = i; k < n; k++) left[k] = 0;
    for (let c = 1; c < out.length; c++) out[c].set(left);
    return true;
  }
}

registerProcessor('duplex-playback', Playback);
