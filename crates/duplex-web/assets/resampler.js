// A streaming band-limited resampler (windowed sinc), for the AudioWorklet processors: the
// capture worklet turns the microphone's rate (44.1 or 48 kHz) into the 16 kHz the server's
// VAD and recognizer use, the playback worklet turns a server rate into the AudioContext's
// when they differ. Pure code: no Web Audio, no DOM, so Node's test runner checks it.
//
// Each output sample is a weighted sum of the input around its position, weights from a sinc
// low-pass at 90 % of the lower Nyquist frequency (the anti-aliasing filter when
// downsampling) under a Hann window of ZERO_CROSSINGS lobes each side, normalised to sum 1
// so that silence stays silent and DC stays DC.

/** Sinc lobes on each side of an output sample: 8 gives > 40 dB stop-band for ~50 taps. */
const ZERO_CROSSINGS = 8;
/** Pass band as a fraction of the lower Nyquist frequency: the rest is the transition band. */
const PASS = 0.9;

export class Resampler {
  /**
   * @param {number} inRate input samples per second
   * @param {number} outRate output samples per second
   */
  constructor(inRate, outRate) {
    if (!(inRate > 0 && outRate > 0)) throw new RangeError('rates must be positive');
    this.inRate = inRate;
    this.outRate = outRate;
    /** Input samples per output sample. */
    this.step = inRate / outRate;
    /** Cut-off in cycles per input sample, times two (the sinc's scale). */
    this.scale = PASS * Math.min(1, outRate / inRate);
    /** Half-width of the kernel in input samples. */
    this.half = Math.ceil(ZERO_CROSSINGS / this.scale);
    this.buf = new Float32Array(4096);
    // Start with `half` samples of silence so the first output is centred on input sample 0.
    this.len = this.half;
    /** Position of the next output sample in `buf`, in input samples. */
    this.pos = this.half;
  }

  /** Output samples at most produced for `n` input samples (to size `out`). */
  maxOutput(n) {
    return Math.ceil((n + 1) / this.step) + 1;
  }

  /**
   * Consumes `input` and writes the output samples it completes into `out` (sized with
   * `maxOutput`). Returns how many were written. Output lags input by `half` input samples.
   * @param {Float32Array} input
   * @param {Float32Array} out
   */
  process(input, out) {
    this.append(input);
    let n = 0;
    const { buf, half, scale } = this;
    // An output at `pos` needs inputs up to pos + half.
    while (this.pos + half < this.len && n < out.length) {
      const centre = this.pos;
      const first = Math.ceil(centre - half);
      const last = Math.floor(centre + half);
      let acc = 0;
      let norm = 0;
      for (let k = first; k <= last; k++) {
        const d = k - centre;
        const w = kernel(d * scale, d / half);
        acc += buf[k] * w;
        norm += w;
      }
      out[n++] = norm > 0 ? acc / norm : 0;
      this.pos += this.step;
    }
    this.compact();
    return n;
  }

  append(input) {
    if (this.len + input.length > this.buf.length) {
      const grown = new Float32Array(Math.max(this.buf.length * 2, this.len + input.length));
      grown.set(this.buf.subarray(0, this.len));
      this.buf = grown;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
  }

  /** Drops input no future output can reach. */
  compact() {
    const keep = Math.floor(this.pos - this.half) - 1;
    if (keep > 0) {
      this.buf.copyWithin(0, keep, this.len);
      this.len -= keep;
      this.pos -= keep;
    }
  }
}

/** sinc(x) under a Hann window; `u` is the position in the window, -1..1. */
function kernel(x, u) {
  if (u <= -1 || u >= 1) return 0;
  const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
  return sinc * (0.5 + 0.5 * Math.cos(Math.PI * u));
}

/** Float samples (-1..1) to 16-bit PCM, clamped. */
export function toPcm16(x) {
  const s = x < -1 ? -1 : x > 1 ? 1 : x;
  return s < 0 ? Math.round(s * 0x8000) : Math.round(s * 0x7fff);
}

/** G.711 mu-law byte to a float sample. */
export function mulawToFloat(byte) {
  const u = ~byte & 0xff;
  const sign = u & 0x80;
  const exponent = (u >> 4) & 0x07;
  const mantissa = u & 0x0f;
  const magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
  return (sign ? -magnitude : magnitude) / 32768;
}
