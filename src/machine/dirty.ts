import { limits } from '../core/limits.js';

/**
 * "Which pages changed since the last time I asked?" — the question pre-copy rounds and COLO
 * checkpoints ask. Two implementations answer it behind one interface:
 *
 * - ShadowDirtyTracker keeps a copy of what the target holds and compares; O(RAM) per
 *   collect, no guest instrumentation;
 * - LogDirtyTracker reads the byte map that instrumented guest stores (and the WASI host)
 *   mark; O(pages) with a cheap scan, the fast one.
 *
 * Pages are 4 KiB, numbered from 0 at guest address 0. `ranges` says which pages belong to
 * the machine state (guest memory plus colo's own asyncify region; not the dirty map).
 */
export type PageRanges = readonly (readonly [number, number])[];

export interface DirtyTracker {
  readonly kind: 'shadow' | 'log';
  /** Forget history: the next collect() reports changes from now on. */
  reset(ram: Uint8Array, ranges: PageRanges): void;
  /** Pages changed since reset() or the previous collect(), in ascending order. */
  collect(ram: Uint8Array, ranges: PageRanges): Uint32Array;
  /**
   * The target now holds `data` (null: zeros) for `page`. A shadow tracker records it, so that
   * what it compares against is exactly what was sent, even if the guest wrote the page again
   * after the send began.
   */
  noteSent(page: number, data: Uint8Array | null): void;
}

const pageBytes = limits.pageBytes;

function* pagesOf(ranges: PageRanges): Generator<number> {
  for (const [a, b] of ranges) for (let p = a; p < b; p++) yield p;
}

export class ShadowDirtyTracker implements DirtyTracker {
  readonly kind = 'shadow';
  /** Shared, so that multifd sender threads can record what they sent. */
  readonly shadow: SharedArrayBuffer;
  private readonly shadowBuf: Buffer;

  constructor(maxRamBytes: number, shadow?: SharedArrayBuffer) {
    this.shadow = shadow ?? new SharedArrayBuffer(maxRamBytes);
    this.shadowBuf = Buffer.from(this.shadow);
  }

  reset(ram: Uint8Array, ranges: PageRanges): void {
    const r = Buffer.from(ram.buffer, ram.byteOffset, ram.byteLength);
    for (const [a, b] of ranges) r.copy(this.shadowBuf, a * pageBytes, a * pageBytes, b * pageBytes);
  }

  collect(ram: Uint8Array, ranges: PageRanges): Uint32Array {
    const r = Buffer.from(ram.buffer, ram.byteOffset, ram.byteLength);
    const s = this.shadowBuf;
    const out: number[] = [];
    for (const p of pagesOf(ranges)) {
      const off = p * pageBytes;
      if (r.compare(s, off, off + pageBytes, off, off + pageBytes) !== 0) {
        out.push(p);
        // Remember the content seen now; noteSent() overwrites it with what is really sent.
        r.copy(s, off, off, off + pageBytes);
      }
    }
    return Uint32Array.from(out);
  }

  noteSent(page: number, data: Uint8Array | null): void {
    const off = page * pageBytes;
    if (data === null) this.shadowBuf.fill(0, off, off + pageBytes);
    else this.shadowBuf.set(data.subarray(0, pageBytes), off);
  }
}

export class LogDirtyTracker implements DirtyTracker {
  readonly kind = 'log';
  /**
   * @param logBase guest address of the byte map (one byte per page).
   * @param always pages reported by every collect(): the asyncify unwind buffer, which the
   *   engine writes without marking the map.
   */
  constructor(private readonly logBase: number, private readonly always: readonly [number, number] = [0, 0]) {}

  reset(ram: Uint8Array, ranges: PageRanges): void {
    for (const [a, b] of ranges) ram.fill(0, this.logBase + a, this.logBase + b);
  }

  collect(ram: Uint8Array, ranges: PageRanges): Uint32Array {
    const out: number[] = [];
    const base = this.logBase;
    for (const [a, b] of ranges) {
      // Scan 8 bytes at a time where the map is aligned: most of it is zero.
      let p = a;
      const view = new DataView(ram.buffer, ram.byteOffset, ram.byteLength);
      while (p < b) {
        if ((base + p) % 8 === 0 && p + 8 <= b && view.getBigUint64(base + p, true) === 0n && (p + 8 <= this.always[0] || p >= this.always[1])) {
          p += 8;
          continue;
        }
        if (ram[base + p] !== 0 || (p >= this.always[0] && p < this.always[1])) {
          // Clear before the page is read by the sender: a write after this is marked again.
          ram[base + p] = 0;
          out.push(p);
        }
        p++;
      }
    }
    return Uint32Array.from(out);
  }

  noteSent(): void {
    // The log needs no record of what was sent.
  }
}
