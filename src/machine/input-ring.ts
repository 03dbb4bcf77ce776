/**
 * Client input from the main thread to the vCPU worker: a single-producer single-consumer
 * byte ring in a SharedArrayBuffer. A message per batch (structured clone, an eventfd write
 * to wake the worker's loop, a receive on the other side) cost more per request than the
 * guest's own work; a ring costs two copies and two atomic stores.
 *
 * Layout: Int32 [0] = bytes written (mod 2^31, producer), [1] = bytes read (consumer), then
 * `capacity` bytes of records: u32 length of the rest, u8 kind (0 open, 1 data, 2 close),
 * f64 seq, u32 conn, data. Records wrap around the end of the ring.
 */
import type { NicInput } from '../net/nic.js';

const headerBytes = 8;
const recordHeaderBytes = 4 + 1 + 8 + 4;
const kinds = ['open', 'data', 'close'] as const;

/** `capacity` must be a power of two (positions count modulo 2^31). */
export function createInputRing(capacity: number): SharedArrayBuffer {
  if (capacity < 64 || (capacity & (capacity - 1)) !== 0 || capacity > 2 ** 30) throw new RangeError(`input ring capacity ${capacity} is not a power of two`);
  return new SharedArrayBuffer(headerBytes + capacity);
}

class Ring {
  protected readonly idx: Int32Array;
  protected readonly bytes: Uint8Array;
  protected readonly view: DataView;
  readonly capacity: number;
  private readonly scratch = new DataView(new ArrayBuffer(recordHeaderBytes));
  private readonly scratchU8: Uint8Array;

  constructor(buffer: SharedArrayBuffer) {
    this.idx = new Int32Array(buffer, 0, 2);
    this.bytes = new Uint8Array(buffer, headerBytes);
    this.view = new DataView(buffer, headerBytes);
    this.capacity = this.bytes.byteLength;
    this.scratchU8 = new Uint8Array(this.scratch.buffer);
  }

  protected used(): number {
    return (Atomics.load(this.idx, 0) - Atomics.load(this.idx, 1)) & 0x7fffffff;
  }

  protected copyIn(at: number, src: Uint8Array): void {
    const pos = at % this.capacity;
    const first = Math.min(src.byteLength, this.capacity - pos);
    this.bytes.set(first === src.byteLength ? src : src.subarray(0, first), pos);
    if (first < src.byteLength) this.bytes.set(src.subarray(first), 0);
  }

  protected copyOut(at: number, n: number): Uint8Array {
    const pos = at % this.capacity;
    if (pos + n <= this.capacity) return this.bytes.slice(pos, pos + n);
    const out = new Uint8Array(n);
    const first = Math.min(n, this.capacity - pos);
    out.set(this.bytes.subarray(pos, pos + first), 0);
    if (first < n) out.set(this.bytes.subarray(0, n - first), first);
    return out;
  }

  protected header(): { dv: DataView; u8: Uint8Array } {
    return { dv: this.scratch, u8: this.scratchU8 };
  }
}

export class InputRingWriter extends Ring {
  /**
   * Append events in order; returns how many fit (the rest must be offered again later: the
   * worker has not read enough yet).
   */
  write(events: readonly NicInput[]): number {
    let head = Atomics.load(this.idx, 0);
    let free = this.capacity - this.used();
    const { dv, u8 } = this.header();
    let n = 0;
    for (const ev of events) {
      const data = ev.kind === 'data' ? ev.bytes : null;
      const len = recordHeaderBytes + (data?.byteLength ?? 0);
      if (len > free) break;
      dv.setUint32(0, len - 4, true);
      dv.setUint8(4, kinds.indexOf(ev.kind));
      dv.setFloat64(5, ev.seq, true);
      dv.setUint32(13, ev.conn, true);
      this.copyIn(head, u8);
      if (data !== null && data.byteLength > 0) this.copyIn(head + recordHeaderBytes, data);
      head = (head + len) & 0x7fffffff;
      free -= len;
      n++;
    }
    if (n > 0) Atomics.store(this.idx, 0, head);
    return n;
  }

  /** Whether one event of this size can ever fit. */
  fits(ev: NicInput): boolean {
    return recordHeaderBytes + (ev.kind === 'data' ? ev.bytes.byteLength : 0) <= this.capacity;
  }
}

export class InputRingReader extends Ring {
  /** Take the complete records written so far, `max` at most (the rest stay for a later read). */
  read(into: (ev: NicInput) => void, max = Infinity): number {
    const head = Atomics.load(this.idx, 0);
    let tail = Atomics.load(this.idx, 1);
    let n = 0;
    const { dv, u8 } = this.header();
    while (tail !== head && n < max) {
      // The record header into the scratch (it may wrap around the end): no allocation.
      for (let i = 0, pos = tail % this.capacity; i < recordHeaderBytes; i++, pos = pos + 1 === this.capacity ? 0 : pos + 1) u8[i] = this.bytes[pos]!;
      const len = dv.getUint32(0, true) + 4;
      const kind = kinds[dv.getUint8(4)];
      const seq = dv.getFloat64(5, true);
      const conn = dv.getUint32(13, true);
      if (kind === 'data') into({ seq, kind, conn, bytes: this.copyOut(tail + recordHeaderBytes, len - recordHeaderBytes) });
      else if (kind !== undefined) into({ seq, kind, conn });
      tail = (tail + len) & 0x7fffffff;
      n++;
    }
    if (n > 0) Atomics.store(this.idx, 1, tail);
    return n;
  }
}
