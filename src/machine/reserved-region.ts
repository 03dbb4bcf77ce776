/**
 * colo-vm's own region inside guest memory: the asyncify unwind area and, with store logging,
 * the dirty byte map (one byte per 4 KiB page). It is always the top `reservedPages` wasm pages
 * of the memory, and the instrumented guest never sees it:
 *
 * - `memory.size` returns the memory's size minus the region;
 * - `memory.grow(n)` calls the host (`colo.grow`), which grows the memory by n pages, moves the
 *   region up by n pages, zeroes the pages it leaves and returns the guest's old size. So the
 *   pages a guest gains are exactly the n it asked for, fresh and zero, whether it takes them
 *   from `memory.grow`'s result (wasi-libc's sbrk) or from `memory.size` before and after the
 *   grow (AssemblyScript's allocator).
 *
 * The region's place is therefore a function of the memory's size (`regionAt`), the same on
 * every node that holds the same memory: migration and COLO carry the memory size, never the
 * region's address. The main thread reads the dirty map while the guest may grow the memory
 * (the rounds of a live migration), so a move and a read of the map never overlap: both hold
 * the region lock (a slot of the vCPU control block).
 */
import { limits } from '../core/limits.js';
import type { GuestLayout } from './vcpu-protocol.js';

const wasmPage = limits.wasmPageBytes;

/** Where the region lies in a memory of `memoryBytes` (byte addresses; ends exclusive). */
export interface ReservedRegion {
  /** First byte of the region: the end of the guest's own memory. */
  base: number;
  asyncifyBase: number;
  asyncifyEnd: number;
  /** The dirty byte map (empty without store logging). */
  dirtyLogBase: number;
  dirtyLogEnd: number;
}

export function regionAt(layout: Pick<GuestLayout, 'reservedPages' | 'asyncifyBytes' | 'dirtyLogBytes'>, memoryBytes: number): ReservedRegion {
  const base = memoryBytes - layout.reservedPages * wasmPage;
  return {
    base,
    asyncifyBase: base,
    asyncifyEnd: base + layout.asyncifyBytes,
    dirtyLogBase: base + layout.asyncifyBytes,
    dirtyLogEnd: base + layout.asyncifyBytes + layout.dirtyLogBytes,
  };
}

/** The guest's own size, in wasm pages, of a memory of `memoryBytes`. */
export function guestPagesOf(layout: Pick<GuestLayout, 'reservedPages'>, memoryBytes: number): number {
  return memoryBytes / wasmPage - layout.reservedPages;
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
 * The host side of the instrumented `memory.grow(delta)`: grows `memory` by `delta` pages and
 * moves colo's region (the top `layout.reservedPages` pages) to the new top, zeroing the pages
 * it leaves; with store logging, those pages are marked dirty in the moved map (they now hold
 * guest data, zeros, that a migration target may not have). Returns the guest's size before
 * the grow in pages, or -1 (the guest's memory.grow failure) when the memory cannot grow.
 * The caller holds the region lock. `delta` is the guest's i32, read as unsigned.
 */
export function growGuestMemory(memory: WebAssembly.Memory, layout: GuestLayout, delta: number): number {
  const pages = delta >>> 0;
  const before = memory.buffer.byteLength / wasmPage;
  const guestBefore = before - layout.reservedPages;
  if (pages === 0) return guestBefore;
  try {
    memory.grow(pages);
  } catch {
    return -1; // beyond the maximum, or the host has no memory for it: memory.grow's -1
  }
  const r = layout.reservedPages;
  if (r === 0) return guestBefore;
  const u8 = new Uint8Array(memory.buffer);
  u8.copyWithin((guestBefore + pages) * wasmPage, guestBefore * wasmPage, before * wasmPage);
  const freedEnd = (guestBefore + Math.min(pages, r)) * wasmPage;
  u8.fill(0, guestBefore * wasmPage, freedEnd);
  if (layout.storeLog) {
    const log = regionAt(layout, u8.byteLength).dirtyLogBase;
    u8.fill(1, log + (guestBefore * wasmPage) / limits.pageBytes, log + freedEnd / limits.pageBytes);
  }
  return guestBefore;
}
