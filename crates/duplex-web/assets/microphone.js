// The microphone: getUserMedia with the browser's echo cancellation, noise suppression and
// automatic gain, fed to the "duplex-capture" AudioWorklet, which posts 20 ms PCM16 frames at
// 16 kHz. This module only wires nodes and hands frames on; no sample is touched here.

/** The rate of the frames sent to the server (see capture-worklet.js for why 16 kHz). */
export const CAPTURE_RATE = 16000;

export class Microphone {
  /**
   * @param {AudioContext} ctx a context whose audioWorklet has capture-worklet.js loaded
   * @param {(frame: {pcm: ArrayBuffer, rms: number, t: number}) => void} onFrame
   */
  static async open(ctx, onFrame) {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: {
        echoCancellation: true,
        noiseSuppression: true,
        autoGainControl: true,
        channelCount: 1,
      },
      video: false,
    });
    const source = ctx.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(ctx, 'duplex-capture', {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      channelCount: 1,
      channelCountMode: 'explicit',
      processorOptions: { targetRate: CAPTURE_RATE },
    });
    node.port.onmessage = (e) => {
      if (e.data.type === 'frame') onFrame(e.data);
    };
    source.connect(node);
    return new Microphone(stream, source, node);
  }

  constructor(stream, source, node) {
    this.stream = stream;
    this.source = source;
    this.node = node;
  }

  /** Whether the browser still delivers audio (false after close or a revoked permission). */
  get live() {
    return this.stream.getAudioTracks().some((t) => t.readyState === 'live');
  }

  /** Releases the device (the browser's recording indicator goes off). */
  close() {
    this.node.port.postMessage({ type: 'stop' });
    this.source.disconnect();
    this.node.disconnect();
    for (const track of this.stream.getTracks()) track.stop();
  }
}
