/**
 * colo-vm's own region inside guest memory: the asyncify unwind area and, with store logging,
 * the dirty byte map (one byte per 4 KiB page). It lies right above the guest's own pages, and
 * the instrumented guest never sees it:
 *
 * - the guest's size is the mutable global `colo$pages` (part of the state, as every mutable
 *   global): `memory.size` returns it;
 * - `memory.grow(n)` calls the host (`colo.grow`), which moves the region up by n pages
 *   (growing the memory when it has no room), zeroes the pages it leaves, and returns the
 *   guest's old size. So the pages a guest gains are exactly the n it asked for, fresh and
 *   zero, whether it takes them from `memory.grow`'s result (wasi-libc's sbrk) or from
 *   `memory.size` before and after (AssemblyScript's allocator).
 *
 * The memory may be larger than the guest and the region (a COLO secondary that ran ahead of
 * its primary and grew more, then loaded a checkpoint of the smaller primary: a wasm memory
 * cannot shrink). Those pages above the region are zero and belong to no one; the guest gets
 * them, still zero, when it grows.
 *
 * The region's place is therefore a function of the guest's size (`regionAt`), which is in
 * every state: migration and COLO carry no address for it. The vCPU mirrors the size into the
 * control block for the main thread, which reads the dirty map while the guest may grow (the
 * rounds of a live migration); a move and a read of the map never overlap: both hold the
 * region lock (another slot of the control block).
 */
import { limits } from '../core/limits.js';
import type { GuestLayout } from './vcpu-protocol.js';

const wasmPage = limits.wasmPageBytes;
/** A wasm32 memory's largest size in pages. */
const maxWasmPages = 65536;

/** Where the region lies above a guest of `guestPages` wasm pages (byte addresses; ends exclusive). */
export interface ReservedRegion {
  /** First byte of the region: the end of the guest's own memory. */
  base: number;
  asyncifyBase: number;
  asyncifyEnd: number;
  /** The dirty byte map (empty without store logging). */
  dirtyLogBase: number;
  dirtyLogEnd: number;
  /** The end of the region (base + reservedPages wasm pages): above it, memory is zero. */
  end: number;
}

export function regionAt(layout: Pick<GuestLayout, 'reservedPages' | 'asyncifyBytes' | 'dirtyLogBytes'>, guestPages: number): ReservedRegion {
  const base = guestPages * wasmPage;
  return {
    base,
    asyncifyBase: base,
    asyncifyEnd: base + layout.asyncifyBytes,
    dirtyLogBase: base + layout.asyncifyBytes,
    dirtyLogEnd: base + layout.asyncifyBytes + layout.dirtyLogBytes,
    end: base + layout.reservedPages * wasmPage,
  };
}

/** A lock over one Int32Array slot: 0 free, 1 held. Held for microseconds; waits are bounded. */
export class RegionLock {
  constructor(
    private readonly cell: Int32Array,
    private readonly index: number,
  ) {}

  /**
   * Runs `fn` holding the lock. `waitMs`: how long to wait for the other thread to let go
   * before giving up with an Error (it holds the lock only while it moves the region or reads
   * the map, so a long wait means that thread died holding it).
   */
  with<T>(fn: () => T, waitMs = limits.reservedRegionLockWaitMs): T {
    const deadline = Date.now() + waitMs;
    while (Atomics.compareExchange(this.cell, this.index, 0, 1) !== 0) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`colo-vm's reserved-region lock was held for more than ${waitMs} ms`);
      Atomics.wait(this.cell, this.index, 1, Math.min(left, 10));
    }
    try {
      return fn();
    } finally {
      Atomics.store(this.cell, this.index, 0);
      Atomics.notify(this.cell, this.index);
    }
  }
}

/**
 * The host side of the instrumented `memory.grow(delta)` for a guest of `guestPages`: moves
 * colo's region (the `layout.reservedPages` pages above the guest) up by `delta` pages, growing
 * `memory` when it has no room for that, and zeroes the pages the region leaves; with store
 * logging, those pages are marked dirty in the moved map (they now hold guest data, zeros, that
 * a migration target may not have). Returns the guest's new size in pages, or -1 (memory.grow's
 * failure) when the memory cannot grow that far. The caller holds the region lock and sets
 * `colo$pages` and `colo$dirtylog`. `delta` is the guest's i32, read as unsigned.
 */
export function growGuestMemory(memory: WebAssembly.Memory, layout: GuestLayout, guestPages: number, delta: number): number {
  const pages = delta >>> 0;
  if (pages === 0) return guestPages;
  const r = layout.reservedPages;
  const need = guestPages + pages + r;
  if (need > maxWasmPages) return -1;
  const have = memory.buffer.byteLength / wasmPage;
  if (need > have) {
    try {
      memory.grow(need - have);
    } catch {
      return -1; // beyond the maximum, or the host has no memory for it: memory.grow's -1
    }
  }
  if (r === 0) return guestPages + pages;
  const u8 = new Uint8Array(memory.buffer);
  u8.copyWithin((guestPages + pages) * wasmPage, guestPages * wasmPage, (guestPages + r) * wasmPage);
  const freedEnd = (guestPages + Math.min(pages, r)) * wasmPage;
  u8.fill(0, guestPages * wasmPage, freedEnd);
  if (layout.storeLog) {
    const log = regionAt(layout, guestPages + pages).dirtyLogBase;
    u8.fill(1, log + (guestPages * wasmPage) / limits.pageBytes, log + freedEnd / limits.pageBytes);
  }
  return guestPages + pages;
}

/**
 * A guest of `from` pages takes the size `to` from a state (a restore, a COLO checkpoint): the
 * region is now above `to`. Zeroes what lay above the new region's end up to the old one's (a
 * secondary that ran ahead of its primary wrote there: guest pages, or its region), so that
 * memory above the region is zero again, and clears the map at its place (what lies there is
 * no map of this state: the state's pages, or zeros; a restored machine starts its dirty
 * tracking afresh). The caller holds the region lock.
 */
export function regionAfterRestore(memory: WebAssembly.Memory, layout: GuestLayout, from: number, to: number): void {
  const u8 = new Uint8Array(memory.buffer);
  const [was, now] = [regionAt(layout, from), regionAt(layout, to)];
  if (was.end > now.end) u8.fill(0, now.end, was.end);
  u8.fill(0, now.dirtyLogBase, now.dirtyLogEnd);
}
