import { limits } from '../core/limits.js';

/**
 * Zero detection for pages and disk blocks: memcmp against a static zero buffer
 * (Buffer.compare), which is an order of magnitude faster than a JavaScript word loop.
 * Runs of contiguous pages are checked 16 pages (64 KiB) per call.
 */
export const pageBytes = limits.pageBytes;
export const zeroRunPages = 16;
const zeros = Buffer.alloc(zeroRunPages * pageBytes);
const zeroBatch = Buffer.alloc(limits.pagesPerPacketMax * pageBytes);

/** True when buf[off, off+len) is all zero bytes. */
export function isZeroBytes(buf: Buffer, off: number, len: number): boolean {
  for (let at = 0; at < len; at += zeros.byteLength) {
    const n = Math.min(zeros.byteLength, len - at);
    if (buf.compare(zeros, 0, n, off + at, off + at + n) !== 0) return false;
  }
  return true;
}

/** Fill with zeros only where not zero already: writing untouched memory would allocate it. */
export function zeroPageIfNeeded(buf: Buffer, page: number): void {
  const off = page * pageBytes;
  if (!isZeroBytes(buf, off, pageBytes)) buf.fill(0, off, off + pageBytes);
}

/** A Buffer over all of a (possibly shared) ArrayBuffer. */
export function bufferOf(ab: ArrayBufferLike): Buffer {
  return Buffer.from(ab as ArrayBuffer);
}

/**
 * For sorted, unique page numbers `list[from..to)`: call `zero(index, n)` for each run of n
 * zero pages and `data(index)` for each other page, in order. Contiguous runs are tested
 * 64 KiB at a time.
 */
export function scanPages(
  ram: Buffer,
  list: Uint32Array,
  from: number,
  to: number,
  zero: (index: number, count: number) => void,
  data: (index: number) => void,
): void {
  // A contiguous, all-zero batch (a large zero region) is one comparison.
  const n = to - from;
  if (n > zeroRunPages && list[to - 1] === list[from]! + n - 1 && n * pageBytes <= zeroBatch.byteLength) {
    const off = list[from]! * pageBytes;
    if (ram.compare(zeroBatch, 0, n * pageBytes, off, off + n * pageBytes) === 0) {
      zero(from, n);
      return;
    }
  }
  let i = from;
  while (i < to) {
    const p = list[i]!;
    if (i + zeroRunPages <= to && list[i + zeroRunPages - 1] === p + zeroRunPages - 1 && isZeroBytes(ram, p * pageBytes, zeroRunPages * pageBytes)) {
      zero(i, zeroRunPages);
      i += zeroRunPages;
      continue;
    }
    if (isZeroBytes(ram, p * pageBytes, pageBytes)) zero(i, 1);
    else data(i);
    i++;
  }
}

const zeroMap = Buffer.alloc(4096);

/**
 * Split page ranges into pages known to be zero (both maps 0 there: never written since boot,
 * not written by boot) and the others. Zero runs shorter than `minRun` pages stay with the
 * others (the channels detect those zeros by reading). Maps are scanned 4096 pages at a time.
 */
export function splitKnownZero(
  ranges: readonly (readonly [number, number])[],
  written: Uint8Array | null,
  boot: Uint8Array,
  minRun = zeroRunPages,
): { zero: [number, number][]; data: [number, number][] } {
  if (written === null) return { zero: [], data: ranges.map(([a, b]) => [a, b]) };
  const w = Buffer.from(written.buffer, written.byteOffset, written.byteLength);
  const bt = Buffer.from(boot.buffer, boot.byteOffset, boot.byteLength);
  const zero: [number, number][] = [];
  const data: [number, number][] = [];
  const push = (list: [number, number][], a: number, b: number): void => {
    const last = list[list.length - 1];
    if (last !== undefined && last[1] === a) last[1] = b;
    else list.push([a, b]);
  };
  for (const [a, b] of ranges) {
    let runStart = a;
    let runZero: boolean | null = null;
    const close = (end: number): void => {
      if (runZero === null || end <= runStart) return;
      push(runZero && end - runStart >= minRun ? zero : data, runStart, end);
    };
    let p = a;
    while (p < b) {
      const end = Math.min(b, p + zeroMap.byteLength);
      const chunkZero = w.compare(zeroMap, 0, end - p, p, end) === 0 && bt.compare(zeroMap, 0, end - p, p, end) === 0;
      if (chunkZero) {
        if (runZero !== true) {
          close(p);
          runStart = p;
          runZero = true;
        }
        p = end;
        continue;
      }
      for (; p < end; p++) {
        const z = (written[p]! | boot[p]!) === 0;
        if (z !== runZero) {
          close(p);
          runStart = p;
          runZero = z;
        }
      }
    }
    close(b);
  }
  // Merging short zero runs into data may have left neighbouring data ranges: join them.
  const joined: [number, number][] = [];
  for (const r of data) push(joined, r[0], r[1]);
  return { zero, data: joined };
}
