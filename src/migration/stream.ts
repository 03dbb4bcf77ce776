import zlib from 'node:zlib';
import { limits } from '../core/limits.js';
import { StreamError } from '../core/errors.js';

/**
 * The colo-vm migration stream (docs/migration-protocol.md): a preamble, then frames.
 *
 *   preamble: "COLOVM\r\n" (8 bytes), format version u32 BE
 *   frame:    type u8 | flags u8 | reserved u16 (0) | seq u32 | length u32 | crc32 u32 | payload
 *
 * `seq` counts frames on one channel from 0, so a dropped, repeated or reordered frame is
 * caught; the CRC covers the first 12 header bytes and the payload; `length` is checked
 * against the frame type's limit before anything is allocated.
 */
export const streamMagic = Buffer.from('COLOVM\r\n', 'latin1');
export const streamVersion = 1;
/**
 * The version of COLO's messages on this stream (`colo` and `coloNet` frames: their names, tags
 * and fields, docs/migration-protocol.md §9). A source with `x-colo` names it in its hello and a
 * destination with another refuses the migration, so two builds that disagree on a message are
 * stopped before COLO starts rather than misreading each other in the middle of it. Bump it with
 * any change to those messages; state files carry no COLO frames and keep `streamVersion`.
 * 2: GUEST_EXITED, CHECKPOINT_ABANDONED; coloNet tags 6–8 (input held, input free, channel dropped).
 */
export const coloWireVersion = 2;
export const preambleBytes = 12;
export const frameHeaderBytes = 16;

export const FrameType = {
  hello: 0x01,
  setup: 0x02,
  ramPages: 0x10,
  ramZero: 0x11,
  roundEnd: 0x12,
  /** Guest RAM grew: JSON {pages} in 64 KiB pages, sent before any page beyond the old size. */
  ramSize: 0x13,
  /** Ranges of pages that are all zero (never written since boot): [start, end) pairs, no data. */
  ramZeroRanges: 0x14,
  diskBlocks: 0x20,
  /** Disk blocks that are all zeros: an index list without data. */
  diskZero: 0x21,
  deviceState: 0x30,
  /** Source → destination: the destination confirmed it loaded the state; run now. */
  switchover: 0x3d,
  abort: 0x3e,
  end: 0x3f,
  /** Destination → source messages on the return direction (ready, refuse, loaded, resumed, error). */
  reply: 0x40,
  /** COLO control messages, both directions (colo/). */
  colo: 0x41,
  /** COLO network events: mirrored client input (P→S), SVM output (S→P); binary, colo/net-wire.ts. */
  coloNet: 0x42,
  /** Reserved: multifd channels carry their own packet format (multifd-format.ts), not frames. */
  mfdPages: 0x50,
  mfdSync: 0x51,
} as const;
export type FrameTypeName = keyof typeof FrameType;

const frameTypeNames = new Map<number, string>(Object.entries(FrameType).map(([k, n]) => [n, k]));

export function frameTypeName(t: number): string {
  return frameTypeNames.get(t) ?? `0x${t.toString(16)}`;
}

/** The largest payload each frame type may carry. */
export function frameLimit(type: number): number {
  if (type === FrameType.deviceState) return limits.deviceStateBytesMax;
  return limits.frameBytesMax;
}

export interface Frame {
  type: number;
  flags: number;
  seq: number;
  payload: Buffer;
}

export function encodePreamble(): Buffer {
  const b = Buffer.alloc(preambleBytes);
  streamMagic.copy(b, 0);
  b.writeUInt32BE(streamVersion, 8);
  return b;
}

/** Header for a frame whose payload is the concatenation of `parts`; returns [header, ...parts]. */
export function encodeFrame(type: number, seq: number, parts: readonly Uint8Array[], flags = 0): Buffer[] {
  let length = 0;
  for (const p of parts) length += p.byteLength;
  if (length > frameLimit(type)) {
    throw new StreamError('FRAME_TOO_LARGE', `${frameTypeName(type)} frame of ${length} bytes exceeds the limit of ${frameLimit(type)}`);
  }
  const h = Buffer.alloc(frameHeaderBytes);
  h.writeUInt8(type, 0);
  h.writeUInt8(flags, 1);
  h.writeUInt16BE(0, 2);
  h.writeUInt32BE(seq >>> 0, 4);
  h.writeUInt32BE(length, 8);
  let crc = zlib.crc32(h.subarray(0, 12));
  for (const p of parts) crc = zlib.crc32(p, crc);
  h.writeUInt32BE(crc >>> 0, 12);
  return [h, ...parts.map((p) => (Buffer.isBuffer(p) ? p : Buffer.from(p.buffer, p.byteOffset, p.byteLength)))];
}

export function jsonPayload(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value), 'utf8');
}

export function parseJsonPayload(frame: Frame): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(frame.payload.toString('utf8'));
  } catch {
    throw new StreamError('FRAME_INVALID', `${frameTypeName(frame.type)} frame does not hold valid JSON`);
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v)) {
    throw new StreamError('FRAME_INVALID', `${frameTypeName(frame.type)} frame does not hold a JSON object`);
  }
  return v as Record<string, unknown>;
}

/**
 * Incremental decoder: push bytes as they arrive, take whole, verified frames out.
 * Pure (no I/O), so the same code reads sockets, files and test vectors.
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private preambleSeen: boolean;
  private nextSeq = 0;
  private failed: StreamError | null = null;

  constructor(opts: { expectPreamble: boolean } = { expectPreamble: true }) {
    this.preambleSeen = !opts.expectPreamble;
  }

  push(data: Uint8Array): void {
    if (data.byteLength === 0) return;
    this.chunks.push(Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength));
    this.buffered += data.byteLength;
  }

  /** Bytes received but not yet returned as frames. */
  get pendingBytes(): number {
    return this.buffered;
  }

  /** The input ended: anything left over is a truncated frame. */
  finish(): void {
    if (this.failed !== null) throw this.failed;
    if (!this.preambleSeen || this.buffered > 0) {
      throw new StreamError('STREAM_TRUNCATED', `the stream ended inside ${this.preambleSeen ? `frame ${this.nextSeq}` : 'its preamble'} (${this.buffered} bytes left over)`);
    }
  }

  /** The next whole frame, or null when more bytes are needed. Throws StreamError on bad input. */
  next(): Frame | null {
    if (this.failed !== null) throw this.failed;
    try {
      return this.decodeNext();
    } catch (err) {
      if (err instanceof StreamError) this.failed = err;
      throw err;
    }
  }

  private decodeNext(): Frame | null {
    if (!this.preambleSeen) {
      if (this.buffered < preambleBytes) return null;
      const p = this.take(preambleBytes);
      if (!p.subarray(0, 8).equals(streamMagic)) {
        throw new StreamError('STREAM_MAGIC', 'not a colo-vm migration stream (bad magic)');
      }
      const version = p.readUInt32BE(8);
      if (version !== streamVersion) {
        throw new StreamError('STREAM_VERSION', `migration stream format version ${version} is not supported (this build speaks version ${streamVersion})`);
      }
      this.preambleSeen = true;
    }
    if (this.buffered < frameHeaderBytes) return null;
    const h = this.peek(frameHeaderBytes);
    const type = h.readUInt8(0);
    const flags = h.readUInt8(1);
    const reserved = h.readUInt16BE(2);
    const seq = h.readUInt32BE(4);
    const length = h.readUInt32BE(8);
    const crc = h.readUInt32BE(12);
    if (!frameTypeNames.has(type)) throw new StreamError('FRAME_TYPE', `unknown frame type 0x${type.toString(16)} at frame ${this.nextSeq}`);
    if (reserved !== 0) throw new StreamError('FRAME_INVALID', `frame ${this.nextSeq}: reserved header bits set`);
    if (length > frameLimit(type)) {
      throw new StreamError('FRAME_TOO_LARGE', `${frameTypeName(type)} frame of ${length} bytes exceeds the limit of ${frameLimit(type)}`);
    }
    if (seq !== this.nextSeq) {
      throw new StreamError('FRAME_ORDER', `frame sequence ${seq} where ${this.nextSeq} was expected (reordered, dropped or repeated frame)`);
    }
    if (this.buffered < frameHeaderBytes + length) return null;
    const header = this.take(frameHeaderBytes);
    const payload = this.take(length);
    const actual = zlib.crc32(payload, zlib.crc32(header.subarray(0, 12))) >>> 0;
    if (actual !== crc) {
      throw new StreamError('FRAME_CHECKSUM', `${frameTypeName(type)} frame ${seq}: checksum mismatch (corrupted stream)`);
    }
    this.nextSeq = (this.nextSeq + 1) >>> 0;
    return { type, flags, seq, payload };
  }

  private peek(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.byteLength >= n) return first.subarray(0, n);
    return Buffer.concat(this.chunks, Math.min(this.buffered, Math.max(n, 0))).subarray(0, n);
  }

  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    let out: Buffer;
    if (first.byteLength >= n) {
      out = first.subarray(0, n);
      if (first.byteLength === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let at = 0;
      while (at < n) {
        const c = this.chunks[0]!;
        const k = Math.min(c.byteLength, n - at);
        c.copy(out, at, 0, k);
        at += k;
        if (k === c.byteLength) this.chunks.shift();
        else this.chunks[0] = c.subarray(k);
      }
    }
    this.buffered -= n;
    return out;
  }
}

/** Sequence-numbering frame writer for one channel. */
export class FrameEncoder {
  private seq = 0;
  frame(type: number, parts: readonly Uint8Array[], flags = 0): Buffer[] {
    const out = encodeFrame(type, this.seq, parts, flags);
    this.seq = (this.seq + 1) >>> 0;
    return out;
  }
  json(type: number, value: unknown): Buffer[] {
    return this.frame(type, [jsonPayload(value)]);
  }
}

/** Page or block list payload: count u32, indices u32[count], then optional data. */
export function encodeIndexList(indices: ArrayLike<number>): Buffer {
  const b = Buffer.alloc(4 + indices.length * 4);
  b.writeUInt32BE(indices.length, 0);
  for (let i = 0; i < indices.length; i++) b.writeUInt32BE(indices[i]!, 4 + i * 4);
  return b;
}

export function decodeIndexList(frame: Frame, unitBytes: number, maxIndex: number): { indices: Uint32Array; data: Buffer } {
  const p = frame.payload;
  if (p.byteLength < 4) throw new StreamError('FRAME_INVALID', `${frameTypeName(frame.type)} frame ${frame.seq} is too short`);
  const count = p.readUInt32BE(0);
  const expect = 4 + count * 4 + count * unitBytes;
  if (p.byteLength !== expect) {
    throw new StreamError('FRAME_INVALID', `${frameTypeName(frame.type)} frame ${frame.seq}: ${count} entries need ${expect} bytes, frame has ${p.byteLength}`);
  }
  const indices = new Uint32Array(count);
  for (let i = 0; i < count; i++) {
    const x = p.readUInt32BE(4 + i * 4);
    if (x >= maxIndex) {
      throw new StreamError('FRAME_RANGE', `${frameTypeName(frame.type)} frame ${frame.seq}: index ${x} is out of range (limit ${maxIndex})`);
    }
    indices[i] = x;
  }
  return { indices, data: p.subarray(4 + count * 4) };
}
