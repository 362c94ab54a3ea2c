// Assistant audio playback: a thin handle on the "duplex-playback" AudioWorklet (the jitter
// buffer). Frames go to the worklet as they arrive, undecoded; its reports come back as
// callbacks. `flush` reaches the audio thread with one postMessage, and the worklet empties
// its queue at the start of the next render quantum (128 samples, under 3 ms).

export class Player {
  /**
   * @param {AudioContext} ctx a context whose audioWorklet has playback-worklet.js loaded
   * @param {(report: object) => void} onReport the worklet's messages (see playback-worklet.js)
   */
  constructor(ctx, onReport) {
    this.node = new AudioWorkletNode(ctx, 'duplex-playback', {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
    });
    this.node.port.onmessage = (e) => onReport(e.data);
    this.node.connect(ctx.destination);
    this.format = { encoding: 'pcm16', sample_rate: ctx.sampleRate };
    this.turn = null;
  }

  /** A turn's audio begins (`assistant_audio.start`). */
  begin(turn, format) {
    this.turn = turn;
    if (format) this.format = format;
  }

  /** One binary frame of the current turn. */
  push(data) {
    if (this.turn === null) return false;
    const { encoding, sample_rate: rate } = this.format;
    this.node.port.postMessage({ type: 'audio', turn: this.turn, data, encoding, rate }, [data]);
    return true;
  }

  /** `assistant_audio.end`: play out what is queued. */
  end(turn) {
    this.node.port.postMessage({ type: 'end', turn });
    if (this.turn === turn) this.turn = null;
  }

  /** Barge-in: drop the turn's queued audio at once. */
  flush(turn) {
    this.node.port.postMessage({ type: 'flush', turn });
    if (this.turn === turn) this.turn = null;
  }

  close() {
    this.node.disconnect();
  }
}
