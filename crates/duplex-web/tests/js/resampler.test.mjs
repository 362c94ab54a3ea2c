// Unit tests of the client's resampler and sample codecs (assets/resampler.js), run with
// Node's test runner by tests/js.rs.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Resampler, toPcm16, mulawToFloat } from '../../assets/resampler.js';

function sine(freq, rate, seconds, amp = 0.5) {
  const n = Math.round(rate * seconds);
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) x[i] = amp * Math.sin((2 * Math.PI * freq * i) / rate);
  return x;
}

/** Streams `x` through a new resampler in chunks of `chunk` samples (128 = a render quantum). */
function run(inRate, outRate, x, chunk = 128) {
  const r = new Resampler(inRate, outRate);
  const out = [];
  const buf = new Float32Array(r.maxOutput(chunk));
  for (let i = 0; i < x.length; i += chunk) {
    const n = r.process(x.subarray(i, Math.min(x.length, i + chunk)), buf);
    for (let k = 0; k < n; k++) out.push(buf[k]);
  }
  return Float32Array.from(out);
}

function rms(x, skip = 200) {
  let s = 0;
  for (let i = skip; i < x.length - skip; i++) s += x[i] * x[i];
  return Math.sqrt(s / (x.length - 2 * skip));
}

function zeroCrossings(x) {
  let n = 0;
  for (let i = 1; i < x.length; i++) if (x[i - 1] < 0 !== x[i] < 0) n++;
  return n;
}

test('44.1 kHz to 16 kHz keeps a 1 kHz tone: level, pitch and length', () => {
  const out = run(44100, 16000, sine(1000, 44100, 2));
  assert.ok(Math.abs(out.length - 32000) <= 30, `length ${out.length}`);
  assert.ok(Math.abs(rms(out) - 0.5 / Math.SQRT2) < 0.01, `rms ${rms(out)}`);
  // 1 kHz for 2 s: 4000 zero crossings.
  assert.ok(Math.abs(zeroCrossings(out) - 4000) <= 4, `crossings ${zeroCrossings(out)}`);
});

test('48 kHz to 16 kHz removes a 12 kHz tone instead of folding it to 4 kHz', () => {
  const out = run(48000, 16000, sine(12000, 48000, 1));
  // At least 30 dB below the input's 0.354 RMS.
  assert.ok(rms(out) < 0.0112, `alias rms ${rms(out)}`);
});

test('16 kHz to 44.1 kHz keeps a 440 Hz tone', () => {
  const out = run(16000, 44100, sine(440, 16000, 1));
  assert.ok(Math.abs(out.length - 44100) <= 60, `length ${out.length}`);
  assert.ok(Math.abs(rms(out, 500) - 0.5 / Math.SQRT2) < 0.01, `rms ${rms(out, 500)}`);
});

test('the output does not depend on how the input is chunked', () => {
  const x = sine(700, 44100, 0.5);
  const a = run(44100, 16000, x, 128);
  const b = run(44100, 16000, x, 1000);
  const c = run(44100, 16000, x, 7);
  const n = Math.min(a.length, b.length, c.length);
  assert.ok(n > 7900);
  for (let i = 0; i < n; i++) {
    assert.ok(Math.abs(a[i] - b[i]) < 1e-6 && Math.abs(a[i] - c[i]) < 1e-6, `sample ${i}`);
  }
});

test('silence stays silent and DC stays DC', () => {
  const zeros = run(44100, 16000, new Float32Array(44100));
  assert.ok(zeros.every((v) => v === 0));
  const dc = run(48000, 16000, new Float32Array(48000).fill(0.25));
  for (let i = 100; i < dc.length; i++) assert.ok(Math.abs(dc[i] - 0.25) < 1e-5, `sample ${i}: ${dc[i]}`);
});

test('equal rates keep the signal in place (no delay, a 0.9-Nyquist low-pass only)', () => {
  const x = sine(300, 16000, 0.1);
  const out = run(16000, 16000, x);
  assert.ok(out.length > 1500);
  for (let i = 20; i < out.length; i++) assert.ok(Math.abs(out[i] - x[i]) < 0.005, `sample ${i}: ${out[i]} vs ${x[i]}`);
});

test('PCM16 conversion clamps and rounds', () => {
  assert.equal(toPcm16(0), 0);
  assert.equal(toPcm16(1), 32767);
  assert.equal(toPcm16(-1), -32768);
  assert.equal(toPcm16(2), 32767);
  assert.equal(toPcm16(-3), -32768);
  assert.equal(toPcm16(0.5), 16384);
});

test('mu-law decoding matches G.711', () => {
  assert.equal(mulawToFloat(0xff), 0);
  assert.ok(mulawToFloat(0x7f) === 0);
  assert.equal(mulawToFloat(0x80), 32124 / 32768);
  assert.equal(mulawToFloat(0x00), -32124 / 32768);
  assert.equal(mulawToFloat(0xf0), 120 / 32768);
  assert.equal(mulawToFloat(0x70), -120 / 32768);
});
