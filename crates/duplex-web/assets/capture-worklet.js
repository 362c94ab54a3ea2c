// AudioWorklet processor "duplex-capture": microphone samples at the AudioContext's rate in,
// 20 ms frames of 16 kHz PCM16 out (posted to the main thread, which only forwards them to the
// socket). Resampling happens here rather than on the server: 16 kHz is what the server's VAD
// and recognizers consume, so the uplink carries a third of a 48 kHz stream's bytes
// (256 kbit/s) and the server's front end skips its resampler for browser sessions.
import { Resampler, toPcm16 } from './resampler.js';

class Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.rate = opts.targetRate || 16000;
    // 20 ms: the frame size the protocol recommends.
    this.frameSamples = Math.round(this.rate / 50);
    this.resampler = sampleRate === this.rate ? null : new Resampler(sampleRate, this.rate);
    this.scratch = new Float32Array(this.resampler ? this.resampler.maxOutput(128) : 128);
    this.frame = new Int16Array(this.frameSamples);
    this.fill = 0;
    this.sumSquares = 0;
    this.running = true;
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === 'stop') this.running = false;
    };
  }

  process(inputs) {
    if (!this.running) return false;
    const channel = inputs[0] && inputs[0][0];
    // No input connected yet (or the track ended): nothing to frame.
    if (!channel) return true;
    let samples = channel;
    let n = channel.length;
    if (this.resampler) {
      if (this.scratch.length < this.resampler.maxOutput(n)) {
        this.scratch = new Float32Array(this.resampler.maxOutput(n));
      }
      n = this.resampler.process(channel, this.scratch);
      samples = this.scratch;
    }
    for (let i = 0; i < n; i++) {
      const x = samples[i];
      this.sumSquares += x * x;
      this.frame[this.fill++] = toPcm16(x);
      if (this.fill === this.frameSamples) {
        const rms = Math.sqrt(this.sumSquares / this.frameSamples);
        // The frame ends within this render quantum: stamp it with the quantum's end.
        const t = currentTime + channel.length / sampleRate;
        this.port.postMessage({ type: 'frame', pcm: this.frame.buffer, rms, t }, [
          this.frame.buffer,
        ]);
        this.frame = new Int16Array(this.frameSamples);
        this.fill = 0;
        this.sumSquares = 0;
      }
    }
    return true;
  }
}

registerProcessor('duplex-capture', Capture);
