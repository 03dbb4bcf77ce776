import { RestoreError } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { logger } from '../core/log.js';
import { pagesInRanges, type PageRanges } from '../machine/dirty.js';
import { Fl64Over } from './checksum.js';
import type { DeviceBlob } from './sections.js';

/**
 * A checking aid, off by default: with `COLO_VERIFY_RAM=1` in a node's environment, the
 * device state of every migration and COLO checkpoint it sends carries an fl64 sum of each
 * 4 KiB page of the machine state, and a node that loads one compares its own RAM page by
 * page before it runs the guest. A difference fails the load with a RestoreError naming the
 * pages, instead of a guest that runs on from memory its source never had. The test suite
 * turns it on for every node it starts. It costs each side about 0.25 ms per MiB of guest RAM
 * in use, in the pause (65 ms for 256 MiB on the build machine), so it is not for production.
 */
export function ramDigestEnabled(): boolean {
  return process.env.COLO_VERIFY_RAM === '1';
}

const log = logger('migration');

/** The fl64 of each of `pages`, 8 bytes each, in order. */
function pageSums(memory: WebAssembly.Memory, pages: readonly number[]): Buffer {
  const sum = new Fl64Over(memory);
  const out = Buffer.alloc(8 * pages.length);
  pages.forEach((p, i) => out.writeBigUInt64LE(sum.sum(p * limits.pageBytes, limits.pageBytes), 8 * i));
  return out;
}

/** The fl64 of each page in `ranges`, 8 bytes each, in order, base64. */
export function ramDigest(memory: WebAssembly.Memory, ranges: PageRanges): string {
  return pageSums(memory, [...pagesInRanges(ranges)]).toString('base64');
}

/** Throws RestoreError RAM_DIGEST when the pages in `ranges` do not match `expected` (from ramDigest on the source). */
export function checkRamDigest(memory: WebAssembly.Memory, ranges: PageRanges, expected: string, what: string): void {
  const want = Buffer.from(expected, 'base64');
  const pages = [...pagesInRanges(ranges)];
  const have = pageSums(memory, pages);
  if (want.byteLength !== have.byteLength) {
    throw new RestoreError('RAM_DIGEST', `${what}: the source summed ${want.byteLength / 8} pages of RAM, this machine has ${pages.length}`);
  }
  const bad: number[] = [];
  for (let i = 0; i < pages.length; i++) if (want.compare(have, 8 * i, 8 * i + 8, 8 * i, 8 * i + 8) !== 0) bad.push(pages[i]!);
  if (bad.length > 0) {
    throw new RestoreError('RAM_DIGEST', `${what}: guest RAM differs from the source's in ${bad.length} pages (4 KiB page numbers ${bad.slice(0, 16).join(', ')}${bad.length > 16 ? ', ...' : ''})`);
  }
  log.debug(`${what}: guest RAM matches the source's sums (${pages.length} pages)`);
}

/** The machine a device state is built from or loaded into: its RAM and the pages of its state (for a guest of `guestPages`, default its own size). */
interface StateRam {
  readonly memory: WebAssembly.Memory;
  readonly layout: { readonly reservedPages: number };
  statePageRanges(guestPages?: number): PageRanges;
}

/** The device state to send for `vcpu`: with the RAM sums when COLO_VERIFY_RAM is on. */
export function deviceBlobOf(m: StateRam, vcpu: DeviceBlob['vcpu']): DeviceBlob {
  return ramDigestEnabled() ? { vcpu, ramDigest: ramDigest(m.memory, m.statePageRanges()) } : { vcpu };
}

/** Before a loaded state runs: its RAM sums, if it carries them, must match this machine's RAM (RestoreError RAM_DIGEST). */
export function checkDeviceRam(m: StateRam, blob: DeviceBlob, what: string): void {
  if (blob.ramDigest === undefined) return;
  // The pages of the state's guest, which is not loaded yet: its size may differ from this
  // machine's guest (reserved-region.ts).
  // A size that does not fit the memory is refused by the restore itself.
  const pages = (blob.vcpu as { globals?: Record<string, unknown> }).globals?.['colo$pages'];
  const fits = typeof pages === 'number' && Number.isInteger(pages) && pages >= 0 && (pages + m.layout.reservedPages) * limits.wasmPageBytes <= m.memory.buffer.byteLength;
  checkRamDigest(m.memory, m.statePageRanges(fits ? pages : undefined), blob.ramDigest, what);
}
