/**
 * COLO network events on the main channel (frame type coloNet, docs/migration-protocol.md §9):
 * client input the primary mirrors to the secondary, and output the SVM produced, sent back to
 * the primary's compare. Binary, batched; every field is checked on decode.
 *
 *   input batch   u8 1, u32 count, count × (u8 kind, f64 seq, u32 conn, u32 len, len bytes)
 *   output batch  u8 2, u32 epoch, u32 count, count × (u8 kind, u32 conn, f64 offset, u32 len, len bytes)
 *   mirror ready  u8 3, u32 0 (SVM output channel only: the SVM's vCPU reads input there now)
 *   output moved  u8 4, u32 0 (main channel only: the SVM output channel broke on the secondary;
 *                 SVM output goes on the main channel from here on, after what it still delivers)
 *   svm crashed   u8 5, u32 0 (main channel only: the SVM's guest crashed; a checkpoint replaces it)
 *   input held    u8 6, u32 0 (main channel only: the SVM left too much mirrored input untaken on
 *                 the secondary; the primary stops reading its clients and takes a checkpoint)
 *   input free    u8 7, u32 0 (main channel only: that input is down to half; clients are read again)
 *   channel dropped  u8 8, u32 0 (primary → secondary, main channel only: the primary gave the SVM
 *                 output channel up, it delivered nothing; output and mirror go on the main channel)
 *   kind          input: 0 open, 1 data, 2 close; output: 0 out, 1 shut, 2 close
 *
 * The SVM output channel (output-channel.ts) carries the same batches, each after its length
 * (u32): output and the mirror-ready marker from the secondary's vCPU, input from the primary.
 */
import { StreamError } from '../core/errors.js';
import { limits } from '../core/limits.js';
import type { NicInput, NicOutput } from '../net/nic.js';

const inputTag = 1;
const outputTag = 2;
const mirrorReadyTag = 3;
const outputMovedTag = 4;
const svmCrashedTag = 5;
const inputHeldTag = 6;
const inputFreeTag = 7;
const channelDroppedTag = 8;
/** The batches that are one marker (u8 tag, u32 0), by tag. */
const markers = new Map<number, MarkerBatch['type']>([
  [mirrorReadyTag, 'mirror-ready'],
  [outputMovedTag, 'output-moved'],
  [svmCrashedTag, 'svm-crashed'],
  [inputHeldTag, 'input-held'],
  [inputFreeTag, 'input-free'],
  [channelDroppedTag, 'channel-dropped'],
]);
const inputKinds = ['open', 'data', 'close'] as const;
const outputKinds = ['out', 'shut', 'close'] as const;

type MarkerBatch =
  | { type: 'mirror-ready' }
  | { type: 'output-moved' }
  | { type: 'svm-crashed' }
  | { type: 'input-held' }
  | { type: 'input-free' }
  | { type: 'channel-dropped' };

export type NetBatch = { type: 'input'; events: NicInput[] } | { type: 'output'; epoch: number; events: NicOutput[] } | MarkerBatch;

const entryBytes = 17;

/** Split events into payloads of at most limits.coloNetBatchBytes (one event may exceed it alone). */
export function encodeInputs(events: readonly NicInput[]): Buffer[] {
  return inputBatches(events, false);
}

function inputBatches(events: readonly NicInput[], lengthPrefix: boolean): Buffer[] {
  return encodeBatches(events, inputTag, [], inputKinds, (ev) => (ev.kind === 'data' ? ev.bytes : null), (b, at, ev) => {
    b.writeDoubleBE(ev.seq, at);
    b.writeUInt32BE(ev.conn, at + 8);
  }, lengthPrefix);
}

export function encodeOutputs(epoch: number, events: readonly NicOutput[]): Buffer[] {
  return outputBatches(epoch, events, false);
}

function outputBatches(epoch: number, events: readonly NicOutput[], lengthPrefix: boolean): Buffer[] {
  return encodeBatches(events, outputTag, [epoch], outputKinds, (ev) => (ev.kind === 'out' ? ev.bytes : null), (b, at, ev) => {
    b.writeUInt32BE(ev.conn, at);
    b.writeDoubleBE(ev.offset, at + 4);
  }, lengthPrefix);
}

/**
 * Batches of `tag`: u8 tag, the u32 `header` words, u32 count, then each event as u8 kind (its
 * index in `kinds`), the 12 bytes `writeFields` writes, u32 len and its `data`.
 *
 * Each payload is sized first and written into one buffer (no buffer per event, no concat):
 * this runs for every client request on both nodes. Every byte of it is written. With
 * `lengthPrefix` each buffer starts with the payload's length (u32), as the output channel has it.
 */
function encodeBatches<E extends { kind: string }>(
  events: readonly E[],
  tag: number,
  header: readonly number[],
  kinds: readonly string[],
  data: (ev: E) => Uint8Array | null,
  writeFields: (b: Buffer, at: number, ev: E) => void,
  lengthPrefix: boolean,
): Buffer[] {
  const headerBytes = 1 + 4 * header.length + 4;
  const out: Buffer[] = [];
  let i = 0;
  while (i < events.length) {
    let j = i;
    let bytes = 0;
    while (j < events.length) {
      const len = data(events[j]!)?.byteLength ?? 0;
      if (j > i && bytes + len + entryBytes > limits.coloNetBatchBytes) break;
      bytes += len + entryBytes;
      j++;
    }
    const prefix = lengthPrefix ? 4 : 0;
    const whole = Buffer.allocUnsafe(prefix + headerBytes + bytes);
    if (lengthPrefix) whole.writeUInt32BE(headerBytes + bytes, 0);
    const b = whole.subarray(prefix);
    b.writeUInt8(tag, 0);
    for (let w = 0; w < header.length; w++) b.writeUInt32BE(header[w]!, 1 + 4 * w);
    b.writeUInt32BE(j - i, headerBytes - 4);
    let at = headerBytes;
    for (let k = i; k < j; k++) {
      const ev = events[k]!;
      const d = data(ev);
      const len = d?.byteLength ?? 0;
      b.writeUInt8(kinds.indexOf(ev.kind), at);
      writeFields(b, at + 1, ev);
      b.writeUInt32BE(len, at + 13);
      if (d !== null && len > 0) b.set(d, at + entryBytes);
      at += entryBytes + len;
    }
    out.push(whole);
    i = j;
  }
  return out;
}

/**
 * SVM output for the output channel (output-channel.ts), written by the vCPU thread itself:
 * each output batch after its length (u32), all in one buffer (one write).
 */
export function encodeOutputFrames(epoch: number, events: readonly NicOutput[]): Buffer {
  const parts = outputBatches(epoch, events, true);
  return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
}

/** Mirrored input for the output channel, written by the primary: each batch after its length. */
export function encodeInputFrames(events: readonly NicInput[]): Buffer {
  const parts = inputBatches(events, true);
  return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
}

/**
 * The secondary's vCPU took the output channel and reads mirrored input from it from now on;
 * the primary may move the mirror there (at a checkpoint's capture, see network.ts).
 */
export function encodeMirrorReady(): Buffer {
  const b = Buffer.alloc(4 + 5);
  b.writeUInt32BE(5, 0);
  marker(mirrorReadyTag).copy(b, 4);
  return b;
}

/** A marker batch: its tag and a u32 0. */
function marker(tag: number): Buffer {
  const b = Buffer.alloc(5);
  b.writeUInt8(tag, 0);
  return b;
}

/**
 * The secondary's vCPU gave up the SVM output channel (it broke, or the primary read nothing
 * for too long): its output comes on the main channel from after this batch on, and comes
 * after whatever the output channel still delivers (see network.ts). A coloNet payload.
 */
export function encodeOutputMoved(): Buffer {
  return marker(outputMovedTag);
}

/**
 * The SVM's guest crashed (a trap only the secondary took: its run diverged from the PVM's).
 * The primary takes a checkpoint at once, which replaces the dead SVM with the PVM's state,
 * instead of leaving the secondary unable to take over until the next periodic one. A
 * coloNet payload, on the main channel.
 */
export function encodeSvmCrashed(): Buffer {
  return marker(svmCrashedTag);
}

/**
 * The secondary's SVM has more mirrored input untaken than limits.coloSvmInputPendingBytesMax
 * ('held'), or is down to half of it again ('free'): back-pressure on the primary's clients,
 * since the secondary reads the main channel on (checkpoints come on it). A coloNet payload,
 * on the main channel.
 */
export function encodeInputPressure(held: boolean): Buffer {
  return marker(held ? inputHeldTag : inputFreeTag);
}

/**
 * The primary gave the SVM output channel up (it closed its end): it delivered nothing through
 * several compare timeouts, a path that went silent, whose close the secondary may never see.
 * The secondary's vCPU stops writing and reading there; output goes on the main channel, where
 * the mirror comes too. A coloNet payload, primary to secondary, on the main channel.
 */
export function encodeChannelDropped(): Buffer {
  return marker(channelDroppedTag);
}

/** Splits the output channel's byte stream (either way) back into batches (decodeNetBatch each). */
export class ChannelFrameReader {
  private buf: Buffer = Buffer.alloc(0);
  /**
   * Chunks of the batch begun in `buf`, kept apart until it is whole (`need` bytes with `buf`),
   * then joined once: joined at every chunk, a 1 MiB batch read in 64 KiB chunks was copied
   * 16 times over, on the primary's main thread, which every client waits for.
   */
  private more: Buffer[] = [];
  private moreBytes = 0;
  private need = 0;

  push(chunk: Buffer): Buffer[] {
    if (this.buf.byteLength + this.moreBytes + chunk.byteLength < this.need) {
      this.more.push(chunk);
      this.moreBytes += chunk.byteLength;
      return [];
    }
    if (this.buf.byteLength === 0 && this.moreBytes === 0) this.buf = chunk;
    else {
      this.more.push(chunk);
      this.buf = Buffer.concat([this.buf, ...this.more]);
    }
    this.more = [];
    this.moreBytes = 0;
    this.need = 0;
    const frames: Buffer[] = [];
    let at = 0;
    while (this.buf.byteLength - at >= 4) {
      const n = this.buf.readUInt32BE(at);
      if (n > limits.frameBytesMax) throw new StreamError('FRAME_TOO_LARGE', `SVM output channel: a ${n}-byte batch (limit ${limits.frameBytesMax})`);
      if (n < 5) throw new StreamError('FRAME_INVALID', `SVM output channel: a ${n}-byte batch is too short`);
      if (this.buf.byteLength - at - 4 < n) {
        this.need = 4 + n;
        break;
      }
      frames.push(this.buf.subarray(at + 4, at + 4 + n));
      at += 4 + n;
    }
    this.buf = this.buf.subarray(at);
    return frames;
  }

  /** Bytes of a batch not complete yet. */
  get partial(): number {
    return this.buf.byteLength + this.moreBytes;
  }
}

export function decodeNetBatch(payload: Buffer): NetBatch {
  const bad = (what: string): never => {
    throw new StreamError('FRAME_INVALID', `coloNet frame: ${what}`);
  };
  if (payload.byteLength < 5) bad('too short');
  const tag = payload.readUInt8(0);
  const markerType = markers.get(tag);
  if (markerType !== undefined) {
    if (payload.byteLength !== 5 || payload.readUInt32BE(1) !== 0) bad(`${markerType} carries data`);
    return { type: markerType };
  }
  if (tag !== inputTag && tag !== outputTag) bad(`unknown batch type ${tag}`);
  let at = 1;
  let epoch = 0;
  if (tag === outputTag) {
    if (payload.byteLength < 9) bad('too short');
    epoch = payload.readUInt32BE(at);
    at += 4;
  }
  const count = payload.readUInt32BE(at);
  at += 4;
  if (count > limits.nicPendingEventsMax) bad(`${count} events in one batch`);
  const inputs: NicInput[] = [];
  const outputs: NicOutput[] = [];
  for (let i = 0; i < count; i++) {
    if (at + entryBytes > payload.byteLength) bad(`event ${i} truncated`);
    const kind = payload.readUInt8(at);
    const len = payload.readUInt32BE(at + 13);
    if (at + entryBytes + len > payload.byteLength) bad(`event ${i} data truncated`);
    const bytes = payload.subarray(at + entryBytes, at + entryBytes + len);
    if (tag === inputTag) {
      const seq = payload.readDoubleBE(at + 1);
      const conn = payload.readUInt32BE(at + 9);
      if (!Number.isSafeInteger(seq) || seq < 1) bad(`event ${i}: bad sequence number`);
      const k = inputKinds[kind] ?? bad(`event ${i}: unknown input kind ${kind}`);
      if (k !== 'data' && len !== 0) bad(`event ${i}: ${k} carries data`);
      inputs.push(k === 'data' ? { seq, kind: k, conn, bytes } : { seq, kind: k, conn });
    } else {
      const conn = payload.readUInt32BE(at + 1);
      const offset = payload.readDoubleBE(at + 5);
      if (!Number.isSafeInteger(offset) || offset < 0) bad(`event ${i}: bad offset`);
      const k = outputKinds[kind] ?? bad(`event ${i}: unknown output kind ${kind}`);
      if (k !== 'out' && len !== 0) bad(`event ${i}: ${k} carries data`);
      outputs.push(k === 'out' ? { kind: k, conn, offset, bytes } : { kind: k, conn, offset });
    }
    at += entryBytes + len;
  }
  if (at !== payload.byteLength) bad('trailing bytes');
  return tag === inputTag ? { type: 'input', events: inputs } : { type: 'output', epoch, events: outputs };
}
