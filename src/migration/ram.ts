import { limits } from '../core/limits.js';
import { StreamError } from '../core/errors.js';
import type { Machine } from '../machine/machine.js';
import { regionAt } from '../machine/reserved-region.js';
import type { MainChannel } from './channel.js';
import { RateLimit } from './rate.js';
import { decodeIndexList, encodeIndexList, FrameType, frameTypeName, type Frame } from './stream.js';
import type { PageTarget } from './multifd-recv-worker.js';
import { bufferOf, isZeroBytes, pageBytes, scanPages } from './zero.js';

/**
 * RAM pages on the main channel and the page lists of a round, for both ends. Multifd
 * channels do the same work in their workers (multifd-*-worker.ts).
 */

/** Pages a 4 KiB-page guest RAM of `ramBytes` holds. */
export function pagesOf(ramBytes: number): number {
  return Math.floor(ramBytes / pageBytes);
}

/** Pages of the module's data segments and of colo's reserved region: not zero at boot. */
export function pagesWrittenAtBoot(m: Machine): Uint8Array {
  const map = new Uint8Array(new SharedArrayBuffer(Math.max(1, pagesOf(m.maximumPages * limits.wasmPageBytes))));
  const mark = (start: number, bytes: number): void => {
    if (bytes <= 0) return;
    const first = Math.floor(start / pageBytes);
    const last = Math.min(map.length - 1, Math.floor((start + bytes - 1) / pageBytes));
    for (let p = first; p <= last; p++) map[p] = 1;
  };
  for (const seg of m.guest.dataSegments) mark(seg.offset, seg.size);
  // colo's region where it was at boot (above the initial memory); it moves up only when the
  // guest grows, and then leaves zeros behind.
  const boot = regionAt(m.layout, m.layout.initialPages);
  mark(boot.base, boot.end - boot.base);
  return map;
}

/** The page numbers of `ranges`, ascending, into `list`; returns the count. */
export function fillRanges(list: Uint32Array, ranges: readonly (readonly [number, number])[]): number {
  let n = 0;
  for (const [a, b] of ranges) for (let p = a; p < b; p++) list[n++] = p;
  return n;
}

export const zeroRangesPerFrameMax = limits.ramZeroRangesPerFrameMax;

/** ramZeroRanges payload: count u32, then [start, end) u32 pairs (big-endian, like index lists). */
export function encodeZeroRanges(ranges: readonly (readonly [number, number])[]): Buffer {
  const b = Buffer.alloc(4 + 8 * ranges.length);
  b.writeUInt32BE(ranges.length, 0);
  ranges.forEach(([a, e], i) => {
    b.writeUInt32BE(a, 4 + 8 * i);
    b.writeUInt32BE(e, 8 + 8 * i);
  });
  return b;
}

/** Decode and check (ascending, non-empty, within pagesMax) a ramZeroRanges payload. */
export function decodeZeroRanges(frame: Frame, pagesMax: number): { ranges: [number, number][]; pages: number } {
  const p = frame.payload;
  if (p.byteLength < 4) throw new StreamError('FRAME_INVALID', `ramZeroRanges frame ${frame.seq} is too short`);
  const count = p.readUInt32BE(0);
  if (count > zeroRangesPerFrameMax || p.byteLength !== 4 + 8 * count) {
    throw new StreamError('FRAME_INVALID', `ramZeroRanges frame ${frame.seq}: ${count} ranges in ${p.byteLength} bytes`);
  }
  const ranges: [number, number][] = [];
  let pages = 0;
  let prev = 0;
  for (let i = 0; i < count; i++) {
    const a = p.readUInt32BE(4 + 8 * i);
    const e = p.readUInt32BE(8 + 8 * i);
    if (a >= e || a < prev || e > pagesMax) throw new StreamError('FRAME_RANGE', `ramZeroRanges frame ${frame.seq}: bad range [${a}, ${e}) (guest RAM has at most ${pagesMax} pages)`);
    ranges.push([a, e]);
    pages += e - a;
    prev = e;
  }
  return { ranges, pages };
}

/** Sorted union of two ascending page lists. */
export function mergePages(a: ArrayLike<number>, b: ArrayLike<number>): Uint32Array {
  const out = new Uint32Array(a.length + b.length);
  let i = 0;
  let j = 0;
  let n = 0;
  while (i < a.length || j < b.length) {
    const x = i < a.length ? a[i]! : Infinity;
    const y = j < b.length ? b[j]! : Infinity;
    const v = x <= y ? x : y;
    if (x === v) i++;
    if (y === v) j++;
    if (n === 0 || out[n - 1] !== v) out[n++] = v;
  }
  return out.subarray(0, n);
}

const zeroMapChunk = Buffer.alloc(4096);

export interface PageSendStats {
  normalPages: number;
  zeroPages: number;
  bytes: number;
}

/**
 * Send list entries [0, count) as ramPages / ramZero frames on the main channel (no multifd).
 * The data is copied out of guest RAM when its frame is built; `noteSent` sees that copy.
 */
export async function sendPagesPlain(
  channel: MainChannel,
  memory: WebAssembly.Memory,
  list: Uint32Array,
  count: number,
  noteSent: ((page: number, data: Uint8Array | null) => void) | null,
  rate: RateLimit | number = 0,
): Promise<PageSendStats> {
  const stats: PageSendStats = { normalPages: 0, zeroPages: 0, bytes: 0 };
  const before = channel.bytesSent;
  const limit = typeof rate === 'number' ? new RateLimit(rate) : rate;
  const batch = limits.pagesPerPacketMax;
  const zeroBatch = limits.multifdZeroPagesPerPacketMax;
  let data = Buffer.allocUnsafe(batch * pageBytes);
  let normals: number[] = [];
  let zeros: number[] = [];
  const flushData = (): void => {
    if (normals.length === 0) return;
    channel.sendFrame(FrameType.ramPages, [encodeIndexList(normals), data.subarray(0, normals.length * pageBytes)]);
    stats.normalPages += normals.length;
    normals = [];
    data = Buffer.allocUnsafe(batch * pageBytes); // the socket may still hold the old one
  };
  const flushZero = (): void => {
    if (zeros.length === 0) return;
    channel.sendFrame(FrameType.ramZero, [encodeIndexList(zeros)]);
    stats.zeroPages += zeros.length;
    zeros = [];
  };
  let ram = bufferOf(memory.buffer);
  for (let start = 0; start < count; start += batch) {
    // A channel that ended while this waited (drain, max-bandwidth): stop before reading more
    // pages (and before telling a shadow tracker that they were sent).
    if (channel.error !== null) throw channel.error;
    const end = Math.min(start + batch, count);
    if ((list[end - 1]! + 1) * pageBytes > ram.byteLength) ram = bufferOf(memory.buffer);
    scanPages(
      ram,
      list,
      start,
      end,
      (i, n) => {
        for (let k = 0; k < n; k++) {
          const page = list[i + k]!;
          zeros.push(page);
          noteSent?.(page, null);
        }
        if (zeros.length >= zeroBatch - batch) flushZero();
      },
      (i) => {
        const page = list[i]!;
        const at = normals.length * pageBytes;
        ram.copy(data, at, page * pageBytes, (page + 1) * pageBytes);
        noteSent?.(page, data.subarray(at, at + pageBytes));
        normals.push(page);
        if (normals.length === batch) flushData();
      },
    );
    await channel.drain();
    await limit.pace(channel.bytesSent - before);
  }
  flushData();
  flushZero();
  await channel.drain();
  stats.bytes = channel.bytesSent - before;
  return stats;
}

/**
 * The destination's writer for pages that arrive on the main channel; the same target rules
 * as the multifd receivers (RAM and/or a COLO cache, a record of page numbers, and the map of
 * pages known to be zero so that untouched memory stays untouched).
 */
export class PageSink {
  private target: PageTarget;
  private readonly maybeNonZero: Uint8Array | null;

  constructor(
    private readonly memory: WebAssembly.Memory,
    readonly pagesMax: number,
    target: PageTarget,
    maybeNonZero: SharedArrayBuffer | null,
  ) {
    this.target = target;
    this.maybeNonZero = maybeNonZero === null ? null : new Uint8Array(maybeNonZero);
  }

  setTarget(t: PageTarget): void {
    this.target = t;
  }

  /** Apply a ramZeroRanges frame: every page of the ranges reads zero afterwards. */
  applyZeroRanges(frame: Frame): number {
    const { ranges, pages } = decodeZeroRanges(frame, this.pagesMax);
    const ram = bufferOf(this.memory.buffer);
    const cache = this.target.cache === null ? null : bufferOf(this.target.cache);
    const received = this.target.received === null ? null : new Uint8Array(this.target.received);
    const maybe = this.maybeNonZero === null ? null : Buffer.from(this.maybeNonZero.buffer, this.maybeNonZero.byteOffset, this.maybeNonZero.byteLength);
    for (const [a, e] of ranges) {
      if (this.target.ram && e * pageBytes > ram.byteLength) {
        throw new StreamError('FRAME_RANGE', `zero pages up to ${e} are beyond guest RAM (${ram.byteLength} bytes): no ramSize frame announced it`);
      }
      for (let p = a; p < e; p++) {
        if (this.target.ram) {
          // Pages this destination never wrote are zero already: skip them a map chunk at a time.
          if (maybe !== null && p % 4096 === 0 && p + 4096 <= e && maybe.compare(zeroMapChunk, 0, 4096, p, p + 4096) === 0) {
            p += 4095;
            continue;
          }
          const known = maybe !== null && maybe[p] === 0;
          if (!known) {
            const off = p * pageBytes;
            if (!isZeroBytes(ram, off, pageBytes)) ram.fill(0, off, off + pageBytes);
            if (maybe !== null) maybe[p] = 0;
          }
        }
        if (cache !== null) {
          const off = p * pageBytes;
          if (!isZeroBytes(cache, off, pageBytes)) cache.fill(0, off, off + pageBytes);
        }
      }
      if (received !== null) for (let p = a; p < e; p++) Atomics.store(received, p, 1);
    }
    return pages;
  }

  /** Apply a ramPages or ramZero frame; returns the number of pages. */
  apply(frame: Frame): number {
    if (frame.type === FrameType.ramZeroRanges) return this.applyZeroRanges(frame);
    const zero = frame.type === FrameType.ramZero;
    if (!zero && frame.type !== FrameType.ramPages) throw new StreamError('FRAME_ORDER', `${frameTypeName(frame.type)} is not a page frame`);
    const { indices, data } = decodeIndexList(frame, zero ? 0 : pageBytes, this.pagesMax);
    const ram = bufferOf(this.memory.buffer);
    const cache = this.target.cache === null ? null : bufferOf(this.target.cache);
    const received = this.target.received === null ? null : new Uint8Array(this.target.received);
    for (let i = 0; i < indices.length; i++) {
      const p = indices[i]!;
      const off = p * pageBytes;
      if (off + pageBytes > ram.byteLength && this.target.ram) {
        throw new StreamError('FRAME_RANGE', `page ${p} is beyond guest RAM (${ram.byteLength} bytes): no ramSize frame announced it`);
      }
      if (zero) {
        if (this.target.ram) {
          const known = this.maybeNonZero !== null && this.maybeNonZero[p] === 0;
          if (!known) {
            if (!isZeroBytes(ram, off, pageBytes)) ram.fill(0, off, off + pageBytes);
            if (this.maybeNonZero !== null) this.maybeNonZero[p] = 0;
          }
        }
        if (cache !== null && !isZeroBytes(cache, off, pageBytes)) cache.fill(0, off, off + pageBytes);
      } else {
        const src = data.subarray(i * pageBytes, (i + 1) * pageBytes);
        if (this.target.ram) {
          ram.set(src, off);
          if (this.maybeNonZero !== null) this.maybeNonZero[p] = 1;
        }
        if (cache !== null) cache.set(src, off);
      }
      if (received !== null) Atomics.store(received, p, 1);
    }
    return indices.length;
  }
}
