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
  /**
   * A migration is about to send every page (and to noteSent() each): afterwards collect()
   * reports pages that changed since they were sent.
   */
  beginFullSend(ram: Uint8Array, ranges: PageRanges): void;
  /**
   * True only for a page known not to have been written since the machine booted (so it
   * holds zeros, unless the module's data segments or colo's reserved region put something
   * there — the caller checks those). False when unknown.
   */
  neverWritten(page: number): boolean;
  /**
   * The same as a map (0 = never written, as neverWritten says; 1 = maybe; on a
   * SharedArrayBuffer, so other threads can read it), or null when nothing is known.
   */
  writtenMap(): Uint8Array | null;
  /** RAM now holds pages that nobody logged (a restore, an incoming migration): know nothing. */
  forgetHistory(): void;
}

const pageBytes = limits.pageBytes;

/** The page numbers of `ranges`, in order. */
export function* pagesInRanges(ranges: PageRanges): Generator<number> {
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

  // `ranges` may reach past `ram`: the guest grew its memory after the caller took the view
  // (a live migration's rounds). Those pages are left to the next call, with a view that has them.

  reset(ram: Uint8Array, ranges: PageRanges): void {
    const r = Buffer.from(ram.buffer, ram.byteOffset, ram.byteLength);
    const end = r.byteLength;
    for (const [a, b] of ranges) if (a * pageBytes < end) r.copy(this.shadowBuf, a * pageBytes, a * pageBytes, Math.min(end, b * pageBytes));
  }

  collect(ram: Uint8Array, ranges: PageRanges): Uint32Array {
    const r = Buffer.from(ram.buffer, ram.byteOffset, ram.byteLength);
    const s = this.shadowBuf;
    const out: number[] = [];
    const pagesInView = Math.floor(r.byteLength / pageBytes);
    for (const p of pagesInRanges(ranges)) {
      if (p >= pagesInView) break; // ranges ascend
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
    if (data === null) {
      // Writing zeros into untouched shadow memory would allocate it: only where needed.
      if (this.shadowBuf.compare(zeroPage, 0, pageBytes, off, off + pageBytes) !== 0) this.shadowBuf.fill(0, off, off + pageBytes);
    } else {
      this.shadowBuf.set(data.subarray(0, pageBytes), off);
    }
  }

  beginFullSend(): void {
    // Every page is about to be sent and noteSent(): the shadow follows from that.
  }

  neverWritten(_page: number): boolean {
    return false;
  }

  writtenMap(): null {
    return null;
  }

  forgetHistory(): void {
    // A shadow compares contents; it keeps no history.
  }
}

const zeroPage = Buffer.alloc(pageBytes);

const zeroChunk = Buffer.alloc(4096);

/** Call `f(i)` for every non-zero byte of map[from, to), skipping zero stretches 4 KiB at a time. */
function forMarked(map: Buffer, from: number, to: number, f: (i: number) => void): void {
  for (let c = from; c < to; c += zeroChunk.byteLength) {
    const end = Math.min(to, c + zeroChunk.byteLength);
    if (map.compare(zeroChunk, 0, end - c, c, end) === 0) continue;
    for (let i = c; i < end; i++) if (map[i] !== 0) f(i);
  }
}

/**
 * Where the dirty byte map is now, read under the region lock: a fresh view of the memory, the
 * map's address, and the asyncify area's pages ([first, last)), which the engine writes without
 * marking the map. Both move when the guest grows its memory (reserved-region.ts).
 */
export interface LogPlace {
  ram: Uint8Array;
  logBase: number;
  always: readonly [number, number];
}

export class LogDirtyTracker implements DirtyTracker {
  readonly kind = 'log';
  /** Pages written since boot, as far as collected (null: unknown). */
  private ever: Uint8Array | null;
  /** The asyncify area's pages as of the last look; collect() reports them every time. */
  private always: readonly [number, number];

  /**
   * @param at where the map and the asyncify area are now; called only inside `locked`.
   * @param locked runs its argument holding the region lock, so that the guest cannot move the
   *   map (a memory.grow) while it is read and cleared.
   * @param history.sinceBoot the map has run since the machine booted (nobody cleared it and
   *   RAM holds nothing it did not see), so a page never marked was never written;
   *   history.pagesMax is the size of guest RAM's maximum in pages.
   */
  constructor(
    private readonly at: () => LogPlace,
    private readonly locked: <T>(fn: () => T) => T = (fn) => fn(),
    history: { sinceBoot: boolean; pagesMax: number } = { sinceBoot: false, pagesMax: 0 },
  ) {
    this.always = locked(() => at().always);
    // Shared: multifd sender threads read it to skip pages that were never written.
    this.ever = history.sinceBoot ? new Uint8Array(new SharedArrayBuffer(Math.max(1, history.pagesMax))) : null;
    if (this.ever !== null) this.ever.fill(1, this.always[0], this.always[1]);
  }

  reset(ram: Uint8Array, ranges: PageRanges): void {
    // Clear mark by mark, as collect does, never with one fill over the map: a mark the guest
    // sets while we scan must survive (the page may already count as never written).
    this.collect(ram, ranges);
  }

  writtenMap(): Uint8Array | null {
    return this.ever;
  }

  beginFullSend(ram: Uint8Array, ranges: PageRanges): void {
    this.reset(ram, ranges);
  }

  neverWritten(page: number): boolean {
    return this.ever !== null && page < this.ever.length && this.ever[page] === 0 && !(page >= this.always[0] && page < this.always[1]);
  }

  forgetHistory(): void {
    this.ever = null;
  }

  /**
   * `ranges` (the caller's statePageRanges) bound the pages reported; the map is read where it
   * is now, not through `_ram`: a view taken before a grow would show the map's old place.
   */
  collect(_ram: Uint8Array, ranges: PageRanges): Uint32Array {
    const out: number[] = [];
    this.locked(() => {
      const { ram, logBase: base, always } = this.at();
      this.always = always;
      const map = Buffer.from(ram.buffer, ram.byteOffset, ram.byteLength);
      const [a0, a1] = always;
      const pagesNow = ram.byteLength / pageBytes;
      for (const [a, b0] of ranges) {
        const b = Math.min(b0, pagesNow);
        // The always-reported pages are marked here, so that one ascending scan reports all.
        for (let p = Math.max(a, a0); p < Math.min(b, a1); p++) ram[base + p] = 1;
        if (b <= a) continue;
        forMarked(map, base + a, base + b, (i) => {
          // Clear before the page is read by the sender: a write after this is marked again.
          ram[i] = 0;
          out.push(i - base);
        });
      }
    });
    if (this.ever !== null) for (const p of out) this.ever[p] = 1;
    return Uint32Array.from(out);
  }

  noteSent(): void {
    // The log needs no record of what was sent.
  }
}
