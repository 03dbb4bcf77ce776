/**
 * COLO network events on the main channel (frame type coloNet, docs/migration-protocol.md §9):
 * client input the primary mirrors to the secondary, and output the SVM produced, sent back to
 * the primary's compare. Binary, batched; every field is checked on decode.
 *
 *   input batch   u8 1, u32 count, count × (u8 kind, f64 seq, u32 conn, u32 len, len bytes)
 *   output batch  u8 2, u32 epoch, u32 count, count × (u8 kind, u32 conn, f64 offset, u32 len, len bytes)
 *   kind          input: 0 open, 1 data, 2 close; output: 0 out, 1 shut, 2 close
 */
import { StreamError } from '../core/errors.js';
import { limits } from '../core/limits.js';
import type { NicInput, NicOutput } from '../net/nic.js';

const inputTag = 1;
const outputTag = 2;
const inputKinds = ['open', 'data', 'close'] as const;
const outputKinds = ['out', 'shut', 'close'] as const;

export type NetBatch = { type: 'input'; events: NicInput[] } | { type: 'output'; epoch: number; events: NicOutput[] };

/** Split events into payloads of at most limits.coloNetBatchBytes (one event may exceed it alone). */
export function encodeInputs(events: readonly NicInput[]): Buffer[] {
  return encodeBatches(events, (ev) => (ev.kind === 'data' ? ev.bytes : null), (count) => {
    const h = Buffer.alloc(5);
    h.writeUInt8(inputTag, 0);
    h.writeUInt32BE(count, 1);
    return h;
  }, (ev, len) => {
    const b = Buffer.alloc(17);
    b.writeUInt8(inputKinds.indexOf(ev.kind), 0);
    b.writeDoubleBE(ev.seq, 1);
    b.writeUInt32BE(ev.conn, 9);
    b.writeUInt32BE(len, 13);
    return b;
  });
}

export function encodeOutputs(epoch: number, events: readonly NicOutput[]): Buffer[] {
  return encodeBatches(events, (ev) => (ev.kind === 'out' ? ev.bytes : null), (count) => {
    const h = Buffer.alloc(9);
    h.writeUInt8(outputTag, 0);
    h.writeUInt32BE(epoch, 1);
    h.writeUInt32BE(count, 5);
    return h;
  }, (ev, len) => {
    const b = Buffer.alloc(17);
    b.writeUInt8(outputKinds.indexOf(ev.kind), 0);
    b.writeUInt32BE(ev.conn, 1);
    b.writeDoubleBE(ev.offset, 5);
    b.writeUInt32BE(len, 13);
    return b;
  });
}

function encodeBatches<E>(
  events: readonly E[],
  data: (ev: E) => Uint8Array | null,
  header: (count: number) => Buffer,
  entry: (ev: E, len: number) => Buffer,
): Buffer[] {
  const out: Buffer[] = [];
  let parts: Uint8Array[] = [];
  let count = 0;
  let bytes = 0;
  const flush = (): void => {
    if (count === 0) return;
    out.push(Buffer.concat([header(count), ...parts]));
    parts = [];
    count = 0;
    bytes = 0;
  };
  for (const ev of events) {
    const d = data(ev);
    const len = d?.byteLength ?? 0;
    if (count > 0 && bytes + len + 17 > limits.coloNetBatchBytes) flush();
    parts.push(entry(ev, len));
    if (d !== null && len > 0) parts.push(d);
    count += 1;
    bytes += len + 17;
  }
  flush();
  return out;
}

export function decodeNetBatch(payload: Buffer): NetBatch {
  const bad = (what: string): never => {
    throw new StreamError('FRAME_INVALID', `coloNet frame: ${what}`);
  };
  if (payload.byteLength < 5) bad('too short');
  const tag = payload.readUInt8(0);
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
    if (at + 17 > payload.byteLength) bad(`event ${i} truncated`);
    const kind = payload.readUInt8(at);
    const len = payload.readUInt32BE(at + 13);
    if (at + 17 + len > payload.byteLength) bad(`event ${i} data truncated`);
    const bytes = payload.subarray(at + 17, at + 17 + len);
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
    at += 17 + len;
  }
  if (at !== payload.byteLength) bad('trailing bytes');
  return tag === inputTag ? { type: 'input', events: inputs } : { type: 'output', epoch, events: outputs };
}
