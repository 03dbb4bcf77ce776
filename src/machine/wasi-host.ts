import { randomFillSync } from 'node:crypto';
import { limits } from '../core/limits.js';
import { RestoreError, errorMessage } from '../core/errors.js';
import * as v from '../core/validate.js';
import type { Nic, NicOutput } from '../net/nic.js';
import type { Disk } from '../block/disk.js';
import { DiskIoError } from '../block/disk.js';
import type { Clock } from './devices/clock.js';
import type { Serial } from './devices/serial.js';
import {
  clockid, errno, eventBytes, eventrwflagsHangup, eventtype, fdflags, fdstatBytes, filestatBytes, filetype, ProcExit,
  riflags, rightsAll, sdflags, subclockflagsAbstime, subscriptionBytes, whence,
} from './wasi-abi.js';

/** What the WASI host needs from the vCPU that runs it. */
export interface VcpuHooks {
  /** At the start of every import: end an asyncify rewind; true when this call is its re-entry. */
  finishRewind(): boolean;
  pauseRequested(): boolean;
  /** Begin unwinding the guest at this import (the import's return value is then ignored). */
  startUnwind(): void;
  /** Move queued device input into the devices. */
  drainInput(): void;
  /**
   * Block until input arrives, a pause is requested, or the timeout (ms, null = none) passes.
   * True: the wait is done in the event loop instead: unwind the guest (the vCPU rewinds it
   * after, and the call is made again).
   */
  waitForInput(timeoutMs: number | null): boolean;
  output(out: NicOutput): void;
  /**
   * The guest closed its listening socket (fd 3): the front end stops listening, so that new
   * clients are refused as a real server's are. Optional: a benchmark's stub.
   */
  listenerClosed?(): void;
  /** The host wrote guest memory (for the dirty log). */
  markWrite(ptr: number, len: number): void;
  /**
   * A disk write failed for want of space on the host (QEMU's werror=enospc): report it once
   * per wait (the VM is in io-error), then block until it is time to try again (true) or a
   * pause is requested (false: the caller unwinds, and tries again when rewound).
   */
  waitForDiskSpace(reason: string): boolean;
  /** A disk write went through (ends an io-error, if there was one; cheap otherwise). */
  diskWriteDone(): void;
  /**
   * A disk read, write or sync failed on the host other than a write for want of space: the
   * guest gets EIO and runs on, and the VM reports it (QEMU's rerror=report, and werror=enospc
   * for any other error: BLOCK_IO_ERROR with action report). Optional: a benchmark's stub.
   */
  reportIoError?(operation: 'read' | 'write', nospace: boolean, reason: string): void;
  /**
   * The call moved `bytes` between guest memory and a device: they count against the
   * preemption budget as memory.copy's do, so that the guest's next loop or function-entry
   * check preempts a loop whose calls move megabytes (a pause waits for that check).
   * Optional: a host without preemption (a benchmark's stub) leaves it out.
   */
  chargeBytes?(bytes: number): void;
  /**
   * The console takes nothing for now (its pipe is full): wait a little for it (true), or
   * false when a pause is requested (the caller unwinds, and writes again when rewound).
   * Without it the host tries again at once.
   */
  waitForConsole?(): boolean;
  /**
   * A host call that may have taken long (disk I/O, fsync, a large random_get) returns: when
   * a pause waits, the guest reaches a safe point at its next loop or call, not only after
   * limits.preemptBudget more of them (a loop over such calls never made a pause in time).
   */
  preemptSoon?(): void;
}

export const nicFd = 3;
export const diskFd = 4;

type FdEntry =
  | { fd: number; kind: 'stdin' | 'stdout' | 'stderr' }
  | { fd: number; kind: 'listener'; nonblock: boolean }
  | { fd: number; kind: 'disk'; pos: number }
  | { fd: number; kind: 'conn'; conn: number; nonblock: boolean };

/** No connection: blockUntil's `changed` after a wait that admitted nothing (connection ids start at 1). */
const noConn = -1;

/** What poll_oneoff needs to know of an fd: FdTable.pollCode. */
const fdCodes = { none: 0, listener: 1, conn: 2, other: 3 } as const;

/**
 * The fd table, with a Map's methods over an array indexed by fd: fds are small numbers
 * (allocFd takes the lowest free one, a restored table holds at most 0xffff), and poll_oneoff
 * looks one up per subscription on every call, where a Map's hash lookup showed in profiles.
 * values() goes in fd order. Beside the entries, typed arrays hold what poll needs per fd
 * (its code, and the connection of a conn fd): the entries' shapes differ by kind, and
 * reading `kind` of each made poll's loads polymorphic.
 */
class FdTable {
  private slots: (FdEntry | undefined)[] = [];
  private codes = new Uint8Array(16);
  private connOfFd = new Int32Array(16);

  get(fd: number): FdEntry | undefined {
    return fd < this.slots.length ? this.slots[fd] : undefined;
  }

  has(fd: number): boolean {
    return this.get(fd) !== undefined;
  }

  set(fd: number, e: FdEntry): void {
    while (this.slots.length <= fd) this.slots.push(undefined);
    if (this.codes.length <= fd) {
      const size = Math.max(fd + 1, 2 * this.codes.length);
      const codes = new Uint8Array(size);
      codes.set(this.codes);
      this.codes = codes;
      const conns = new Int32Array(size);
      conns.set(this.connOfFd);
      this.connOfFd = conns;
    }
    this.slots[fd] = e;
    this.codes[fd] = e.kind === 'listener' ? fdCodes.listener : e.kind === 'conn' ? fdCodes.conn : fdCodes.other;
    this.connOfFd[fd] = e.kind === 'conn' ? e.conn : -1;
  }

  delete(fd: number): void {
    if (fd >= this.slots.length) return;
    this.slots[fd] = undefined;
    this.codes[fd] = fdCodes.none;
  }

  /** fdCodes.none for a free fd. */
  pollCode(fd: number): number {
    return fd < this.slots.length ? this.codes[fd]! : fdCodes.none;
  }

  /** The connection of a conn fd (pollCode conn). */
  pollConn(fd: number): number {
    return this.connOfFd[fd]!;
  }

  *values(): IterableIterator<FdEntry> {
    for (const e of this.slots) if (e !== undefined) yield e;
  }
}

/** A copy field by field (an object spread makes V8 build a new hidden class per object). */
function copyFdEntry(e: FdEntry): FdEntry {
  switch (e.kind) {
    case 'conn':
      return { fd: e.fd, kind: e.kind, conn: e.conn, nonblock: e.nonblock };
    case 'listener':
      return { fd: e.fd, kind: e.kind, nonblock: e.nonblock };
    case 'disk':
      return { fd: e.fd, kind: e.kind, pos: e.pos };
    default:
      return { fd: e.fd, kind: e.kind };
  }
}

export interface WasiState {
  fds: FdEntry[];
  /**
   * The guest is unwound inside poll_oneoff: the monotonic time (the clock device's, saved
   * with it) its relative timeouts count from. Absent otherwise, and in states of an older
   * colo-vm (that guest's poll starts its timeouts again).
   */
  pollNow?: bigint;
}

/** Returned by a blocking import when it began an unwind; the value is ignored by asyncify. */
const unwinding = 0;

/** What a poll_oneoff subscription waits for, decoded once per call. */
const pollKinds = { clock: 0, badf: 1, writable: 2, listener: 3, conn: 4, always: 5 } as const;

/**
 * Our WASI preview1 host. It runs inside the vCPU worker, reads and writes the shared guest
 * memory, and keeps every piece of host-side guest state (the fd table) as plain data so that
 * a machine can be saved and resumed elsewhere. Blocking calls either complete, or wait for
 * device input, or start an asyncify unwind when a pause is requested.
 */
export class WasiHost {
  private fds = new FdTable();
  private readonly iov = new Uint32Array(2 * limits.iovecsMax);
  private iovCount = 0;
  private view!: DataView;
  private u8!: Uint8Array;
  private bufferLength = -1;
  /**
   * The end of the guest's own memory (its memory.size): above it lies colo's region (the
   * asyncify area and the dirty map, reserved-region.ts), which a guest pointer must not
   * reach. Infinity until the vCPU says (a host of tests and benchmarks has no region).
   */
  private guestBytes = Infinity;
  private readonly argsBytes: Uint8Array[];
  /** Serial.write's wait for a full console. */
  private readonly consoleWait = (): boolean => this.vcpu.waitForConsole?.() ?? true;
  private readonly envBytes: Uint8Array[];

  constructor(
    private readonly memory: WebAssembly.Memory,
    private readonly vcpu: VcpuHooks,
    private readonly devices: { clock: Clock; serial: Serial; nic: Nic; disk: Disk | null },
    args: string[],
    env: string[],
  ) {
    const enc = new TextEncoder();
    this.argsBytes = args.map((a) => enc.encode(a + '\0'));
    this.envBytes = env.map((e) => enc.encode(e + '\0'));
    this.fds.set(0, { fd: 0, kind: 'stdin' });
    this.fds.set(1, { fd: 1, kind: 'stdout' });
    this.fds.set(2, { fd: 2, kind: 'stderr' });
    this.fds.set(nicFd, { fd: nicFd, kind: 'listener', nonblock: false });
    if (devices.disk !== null) this.fds.set(diskFd, { fd: diskFd, kind: 'disk', pos: 0 });
  }

  /**
   * Views of guest memory are cached: reading `memory.buffer` of a shared memory makes a new
   * SharedArrayBuffer object every time (an allocation and a GC-tracked backing-store entry),
   * which cost more than the guest's own work per request. Memory never shrinks, so a view of
   * a shared memory stays valid; inBounds() takes a new one only when an address lies beyond
   * it (the guest grew its memory) or the view was detached (a memory that is not shared,
   * after a grow). Every access goes to an address inBounds() accepted.
   */
  private refresh(): void {
    const buf = this.memory.buffer;
    this.view = new DataView(buf);
    this.u8 = new Uint8Array(buf);
    this.bufferLength = buf.byteLength;
  }

  private mem(): DataView {
    if (this.bufferLength < 0) this.refresh();
    return this.view;
  }

  private bytes(): Uint8Array {
    if (this.bufferLength < 0) this.refresh();
    return this.u8;
  }

  /** The guest's memory now ends at `bytes` (it grew, or a state was restored): see guestBytes. */
  setGuestBytes(bytes: number): void {
    this.guestBytes = bytes;
  }

  private inBounds(ptr: number, len: number): boolean {
    // EFAULT past the guest's own memory, as in the original module (a wild pointer there
    // overwrote colo's region: zeros into the dirty map lost pages from a checkpoint).
    if (ptr < 0 || len < 0 || ptr + len > this.guestBytes) return false;
    // A memory that is not shared detaches its old buffer when it grows (the view's length
    // drops to 0): that too needs a new view.
    if (ptr + len <= this.bufferLength && this.u8.byteLength === this.bufferLength) return true;
    this.refresh();
    return ptr + len <= this.bufferLength;
  }

  /**
   * Read iovecs into `iov` (ptr, len pairs; `iovCount` of them), checking them against memory.
   * One scratch for every call, not an array per call: a request passes two or three of these
   * calls, and what they allocated made the vCPU thread's collections (each one a stall of the
   * guest). Valid until the next call; false: an iovec lies outside memory (or too many).
   */
  private iovecs(iovs: number, count: number): boolean {
    if (count > limits.iovecsMax || !this.inBounds(iovs, count * 8)) return false;
    const dv = this.mem();
    const iov = this.iov;
    for (let i = 0; i < count; i++) {
      const ptr = dv.getUint32(iovs + i * 8, true);
      const len = dv.getUint32(iovs + i * 8 + 4, true);
      if (!this.inBounds(ptr, len)) return false;
      iov[2 * i] = ptr;
      iov[2 * i + 1] = len;
    }
    this.iovCount = count;
    return true;
  }

  /** The bytes the last iovecs() name, in order, at most `bytesMax` of them, in one new array. */
  private gather(bytesMax = Infinity): Uint8Array {
    const iov = this.iov;
    const u8 = this.bytes();
    if (this.iovCount === 1) {
      const one = u8.slice(iov[0]!, iov[0]! + Math.min(iov[1]!, bytesMax));
      this.vcpu.chargeBytes?.(one.byteLength);
      return one;
    }
    const out = new Uint8Array(Math.min(this.totalLen(), bytesMax));
    this.vcpu.chargeBytes?.(out.byteLength);
    let at = 0;
    for (let i = 0; i < this.iovCount && at < out.byteLength; i++) {
      const ptr = iov[2 * i]!;
      const len = Math.min(iov[2 * i + 1]!, out.byteLength - at);
      out.set(u8.subarray(ptr, ptr + len), at);
      at += len;
    }
    return out;
  }

  /** `data` into the buffers the last iovecs() name, in order, as far as it goes. */
  private scatter(data: Uint8Array): void {
    const iov = this.iov;
    const u8 = this.bytes();
    let at = 0;
    for (let i = 0; i < this.iovCount && at < data.byteLength; i++) {
      const ptr = iov[2 * i]!;
      const n = Math.min(iov[2 * i + 1]!, data.byteLength - at);
      u8.set(at === 0 && n === data.byteLength ? data : data.subarray(at, at + n), ptr);
      this.vcpu.markWrite(ptr, n);
      at += n;
    }
  }

  private setU32(ptr: number, value: number): void {
    this.mem().setUint32(ptr, value, true);
    this.vcpu.markWrite(ptr, 4);
  }

  private setU64(ptr: number, value: bigint): void {
    this.mem().setBigUint64(ptr, value, true);
    this.vcpu.markWrite(ptr, 8);
  }

  private totalLen(): number {
    let t = 0;
    for (let i = 0; i < this.iovCount; i++) t += this.iov[2 * i + 1]!;
    return t;
  }

  /**
   * The import table for `wasi_snapshot_preview1`. Every i32 argument is unsigned in WASI
   * (pointers, lengths, fds, ids, flags), but arrives from wasm as a signed number: each one is
   * taken `>>> 0` here, or a pointer above 2 GiB would look negative (EFAULT for a valid
   * address) and a clock id of 2^31 or more would pass an `id > 3` check. The offset of
   * fd_pread and fd_pwrite is a u64 (WASI's filesize) that arrives as a signed BigInt: taken
   * unsigned too, or an offset of 2^63 or more looked negative, passed the bound check and
   * went to the disk as a negative position (a write there landed at the image's start).
   */
  imports(): Record<string, (...args: never[]) => number | void> {
    const h = this;
    return {
      args_sizes_get: (argcPtr: number, sizePtr: number) => h.sizes(h.argsBytes, argcPtr >>> 0, sizePtr >>> 0),
      args_get: (argvPtr: number, bufPtr: number) => h.strings(h.argsBytes, argvPtr >>> 0, bufPtr >>> 0),
      environ_sizes_get: (countPtr: number, sizePtr: number) => h.sizes(h.envBytes, countPtr >>> 0, sizePtr >>> 0),
      environ_get: (envPtr: number, bufPtr: number) => h.strings(h.envBytes, envPtr >>> 0, bufPtr >>> 0),
      clock_res_get: (rawId: number, rawResPtr: number) => {
        const id = rawId >>> 0;
        const resPtr = rawResPtr >>> 0;
        if (!h.inBounds(resPtr, 8)) return errno.fault;
        if (id > clockid.threadCputime) return errno.inval;
        h.setU64(resPtr, 1000n);
        return errno.success;
      },
      clock_time_get: (rawId: number, _precision: bigint, rawTimePtr: number) => {
        const id = rawId >>> 0;
        const timePtr = rawTimePtr >>> 0;
        if (!h.inBounds(timePtr, 8)) return errno.fault;
        if (id === clockid.realtime) h.setU64(timePtr, h.devices.clock.realtimeNs());
        else if (id <= clockid.threadCputime) h.setU64(timePtr, h.devices.clock.monotonicNs());
        else return errno.inval;
        return errno.success;
      },
      random_get: (rawPtr: number, rawLen: number) => {
        const ptr = rawPtr >>> 0;
        const len = rawLen >>> 0;
        if (!h.inBounds(ptr, len)) return errno.fault;
        const tmp = Buffer.alloc(len);
        randomFillSync(tmp);
        h.bytes().set(tmp, ptr);
        h.vcpu.markWrite(ptr, len);
        h.vcpu.preemptSoon?.();
        return errno.success;
      },
      fd_write: (fd: number, iovsPtr: number, iovsLen: number, nPtr: number) => h.fdWrite(fd >>> 0, iovsPtr >>> 0, iovsLen >>> 0, nPtr >>> 0),
      fd_read: (fd: number, iovsPtr: number, iovsLen: number, nPtr: number) => h.fdRead(fd >>> 0, iovsPtr >>> 0, iovsLen >>> 0, nPtr >>> 0),
      fd_pread: (fd: number, iovsPtr: number, iovsLen: number, offset: bigint, nPtr: number) =>
        h.fdPread(fd >>> 0, iovsPtr >>> 0, iovsLen >>> 0, BigInt.asUintN(64, offset), nPtr >>> 0),
      fd_pwrite: (fd: number, iovsPtr: number, iovsLen: number, offset: bigint, nPtr: number) =>
        h.fdPwrite(fd >>> 0, iovsPtr >>> 0, iovsLen >>> 0, BigInt.asUintN(64, offset), nPtr >>> 0),
      fd_sync: (fd: number) => h.fdSync(fd >>> 0),
      fd_datasync: (fd: number) => h.fdSync(fd >>> 0),
      fd_seek: (fd: number, offset: bigint, wh: number, newPtr: number) => h.fdSeek(fd >>> 0, offset, wh >>> 0, newPtr >>> 0),
      fd_tell: (fd: number, newPtr: number) => h.fdSeek(fd >>> 0, 0n, whence.cur, newPtr >>> 0),
      fd_filestat_get: (fd: number, ptr: number) => h.fdFilestat(fd >>> 0, ptr >>> 0),
      fd_fdstat_get: (fd: number, ptr: number) => h.fdFdstat(fd >>> 0, ptr >>> 0),
      fd_fdstat_set_flags: (fd: number, flags: number) => h.fdSetFlags(fd >>> 0, flags >>> 0),
      fd_close: (fd: number) => h.fdClose(fd >>> 0),
      fd_prestat_get: () => errno.badf,
      fd_prestat_dir_name: () => errno.badf,
      sock_accept: (fd: number, flags: number, fdPtr: number) => h.sockAccept(fd >>> 0, flags >>> 0, fdPtr >>> 0),
      sock_recv: (fd: number, iovsPtr: number, iovsLen: number, flags: number, nPtr: number, roFlagsPtr: number) =>
        h.sockRecv(fd >>> 0, iovsPtr >>> 0, iovsLen >>> 0, flags >>> 0, nPtr >>> 0, roFlagsPtr >>> 0),
      sock_send: (fd: number, iovsPtr: number, iovsLen: number, _flags: number, nPtr: number) =>
        h.sockSend(fd >>> 0, iovsPtr >>> 0, iovsLen >>> 0, nPtr >>> 0),
      sock_shutdown: (fd: number, how: number) => h.sockShutdown(fd >>> 0, how >>> 0),
      poll_oneoff: (inPtr: number, outPtr: number, n: number, nPtr: number) => h.pollOneoff(inPtr >>> 0, outPtr >>> 0, n >>> 0, nPtr >>> 0),
      sched_yield: () => {
        h.vcpu.finishRewind();
        if (h.vcpu.pauseRequested()) h.vcpu.startUnwind();
        return errno.success;
      },
      proc_exit: (code: number) => {
        // WASI's exitcode is a u32: 4294967295, not -1 (the process's status is its low byte either way).
        throw new ProcExit(code >>> 0);
      },
    };
  }

  private sizes(list: Uint8Array[], countPtr: number, sizePtr: number): number {
    if (!this.inBounds(countPtr, 4) || !this.inBounds(sizePtr, 4)) return errno.fault;
    this.setU32(countPtr, list.length);
    this.setU32(sizePtr, list.reduce((a, b) => a + b.byteLength, 0));
    return errno.success;
  }

  private strings(list: Uint8Array[], ptrsPtr: number, bufPtr: number): number {
    const total = list.reduce((a, b) => a + b.byteLength, 0);
    if (!this.inBounds(ptrsPtr, list.length * 4) || !this.inBounds(bufPtr, total)) return errno.fault;
    let at = bufPtr;
    list.forEach((s, i) => {
      this.setU32(ptrsPtr + i * 4, at);
      this.bytes().set(s, at);
      this.vcpu.markWrite(at, s.byteLength);
      at += s.byteLength;
    });
    return errno.success;
  }

  private fdWrite(fd: number, iovsPtr: number, iovsLen: number, nPtr: number): number {
    this.vcpu.finishRewind();
    const e = this.fds.get(fd);
    if (e === undefined) return errno.badf;
    if (!this.iovecs(iovsPtr, iovsLen) || !this.inBounds(nPtr, 4)) return errno.fault;
    // At most limits.fdIoBytesMax: a longer write is short (the iovecs may name all of memory many times).
    if (e.kind === 'stdout' || e.kind === 'stderr') {
      const data = this.gather(limits.fdIoBytesMax);
      const n = this.devices.serial.write(data, this.consoleWait);
      if (n === 0 && data.byteLength > 0) {
        // A pause came while the console took nothing: the call is made again on resume.
        this.vcpu.startUnwind();
        return unwinding;
      }
      this.setU32(nPtr, n);
      return errno.success;
    }
    if (e.kind === 'disk') {
      const r = this.diskWriteOrWait(this.gather(limits.fdIoBytesMax), e.pos);
      if (r === null) return 0; // unwinding; the call is made again on resume
      if (r.errno !== errno.success) return r.errno;
      e.pos += r.n;
      this.setU32(nPtr, r.n);
      return errno.success;
    }
    if (e.kind === 'conn') return this.sockSend(fd, iovsPtr, iovsLen, nPtr);
    return errno.badf;
  }

  private fdRead(fd: number, iovsPtr: number, iovsLen: number, nPtr: number): number {
    this.vcpu.finishRewind();
    const e = this.fds.get(fd);
    if (e === undefined) return errno.badf;
    if (!this.iovecs(iovsPtr, iovsLen) || !this.inBounds(nPtr, 4)) return errno.fault;
    if (e.kind === 'stdin') {
      this.setU32(nPtr, 0);
      return errno.success;
    }
    if (e.kind === 'disk') {
      const data = new Uint8Array(Math.min(this.totalLen(), limits.fdIoBytesMax));
      const r = this.diskRead(data, e.pos);
      if (r.errno !== errno.success) return r.errno;
      this.scatter(data.subarray(0, r.n));
      e.pos += r.n;
      this.setU32(nPtr, r.n);
      return errno.success;
    }
    if (e.kind === 'conn') return this.sockRecv(fd, iovsPtr, iovsLen, 0, nPtr, null);
    return errno.badf;
  }

  private diskRead(into: Uint8Array, offset: number): { errno: number; n: number } {
    const disk = this.devices.disk;
    if (disk === null) return { errno: errno.badf, n: 0 };
    // The bytes it moves count against the preemption budget (writes are charged in gather).
    this.vcpu.chargeBytes?.(into.byteLength);
    try {
      return { errno: errno.success, n: disk.read(into, offset) };
    } catch (err) {
      this.vcpu.reportIoError?.('read', false, errorMessage(err));
      return { errno: errno.io, n: 0 };
    } finally {
      this.vcpu.preemptSoon?.();
    }
  }

  private diskWrite(data: Uint8Array, offset: number): { errno: number; n: number; reason?: string } {
    const disk = this.devices.disk;
    if (disk === null) return { errno: errno.badf, n: 0 };
    // POSIX write at the end of a medium: as many bytes as there is room for (a short write),
    // and EFBIG only when none fits.
    if (offset < disk.sizeBytes && offset + data.byteLength > disk.sizeBytes) data = data.subarray(0, disk.sizeBytes - offset);
    try {
      return { errno: errno.success, n: disk.write(data, offset) };
    } catch (err) {
      if (err instanceof DiskIoError) return { errno: errno.fbig, n: 0 };
      if ((err as NodeJS.ErrnoException).code === 'ENOSPC') return { errno: errno.nospc, n: 0, reason: (err as Error).message };
      this.vcpu.reportIoError?.('write', false, errorMessage(err));
      return { errno: errno.io, n: 0 };
    } finally {
      this.vcpu.preemptSoon?.();
    }
  }

  /**
   * A disk write as QEMU's default werror=enospc treats it: a full host filesystem stops the
   * guest inside its write, which is tried again until it goes through, so the guest never sees
   * the error and loses nothing. A retry writes the whole range again: Disk.write marks a block
   * as written only after its bytes are, so a write cut short leaves nothing half-visible.
   * Null: a pause came first, the guest is unwinding (and makes the call again on resume).
   */
  private diskWriteOrWait(data: Uint8Array, offset: number): { errno: number; n: number } | null {
    for (;;) {
      const r = this.diskWrite(data, offset);
      if (r.errno !== errno.nospc) {
        if (r.errno === errno.success) this.vcpu.diskWriteDone();
        return r;
      }
      if (!this.vcpu.waitForDiskSpace(r.reason ?? 'no space left on device')) {
        this.vcpu.startUnwind();
        return null;
      }
    }
  }

  private fdPread(fd: number, iovsPtr: number, iovsLen: number, offset: bigint, nPtr: number): number {
    const e = this.fds.get(fd);
    if (e === undefined) return errno.badf;
    if (e.kind !== 'disk') return e.kind === 'conn' || e.kind === 'listener' ? errno.spipe : errno.badf;
    if (!this.iovecs(iovsPtr, iovsLen) || !this.inBounds(nPtr, 4)) return errno.fault;
    if (offset > BigInt(Number.MAX_SAFE_INTEGER)) return errno.inval;
    const data = new Uint8Array(Math.min(this.totalLen(), limits.fdIoBytesMax));
    const r = this.diskRead(data, Number(offset));
    if (r.errno !== errno.success) return r.errno;
    this.scatter(data.subarray(0, r.n));
    this.setU32(nPtr, r.n);
    return errno.success;
  }

  private fdPwrite(fd: number, iovsPtr: number, iovsLen: number, offset: bigint, nPtr: number): number {
    this.vcpu.finishRewind();
    const e = this.fds.get(fd);
    if (e === undefined) return errno.badf;
    if (e.kind !== 'disk') return e.kind === 'conn' || e.kind === 'listener' ? errno.spipe : errno.badf;
    if (!this.iovecs(iovsPtr, iovsLen) || !this.inBounds(nPtr, 4)) return errno.fault;
    if (offset > BigInt(Number.MAX_SAFE_INTEGER)) return errno.inval;
    const r = this.diskWriteOrWait(this.gather(limits.fdIoBytesMax), Number(offset));
    if (r === null) return 0; // unwinding; the call is made again on resume
    if (r.errno !== errno.success) return r.errno;
    this.setU32(nPtr, r.n);
    return errno.success;
  }

  private fdSync(fd: number): number {
    const e = this.fds.get(fd);
    if (e === undefined) return errno.badf;
    if (e.kind === 'disk') {
      try {
        this.devices.disk?.sync();
      } catch (err) {
        // A failed flush is a write error to QEMU too (operation write).
        this.vcpu.reportIoError?.('write', (err as NodeJS.ErrnoException).code === 'ENOSPC', errorMessage(err));
        return errno.io;
      } finally {
        this.vcpu.preemptSoon?.();
      }
    }
    return errno.success;
  }

  private fdSeek(fd: number, offset: bigint, wh: number, newPtr: number): number {
    const e = this.fds.get(fd);
    if (e === undefined) return errno.badf;
    if (e.kind !== 'disk') return errno.spipe;
    if (!this.inBounds(newPtr, 8)) return errno.fault;
    const base = wh === whence.set ? 0n : wh === whence.cur ? BigInt(e.pos) : wh === whence.end ? BigInt(this.devices.disk!.sizeBytes) : -1n;
    if (base < 0n) return errno.inval;
    const next = base + offset;
    if (next < 0n || next > BigInt(Number.MAX_SAFE_INTEGER)) return errno.inval;
    e.pos = Number(next);
    this.setU64(newPtr, next);
    return errno.success;
  }

  private fdFilestat(fd: number, ptr: number): number {
    const e = this.fds.get(fd);
    if (e === undefined) return errno.badf;
    if (!this.inBounds(ptr, filestatBytes)) return errno.fault;
    const u8 = this.bytes();
    u8.fill(0, ptr, ptr + filestatBytes);
    const dv = this.mem();
    const ft = e.kind === 'disk' ? filetype.regularFile : e.kind === 'conn' || e.kind === 'listener' ? filetype.socketStream : filetype.characterDevice;
    dv.setBigUint64(ptr + 8, BigInt(fd), true);
    dv.setUint8(ptr + 16, ft);
    dv.setBigUint64(ptr + 24, 1n, true);
    if (e.kind === 'disk') dv.setBigUint64(ptr + 32, BigInt(this.devices.disk!.sizeBytes), true);
    this.vcpu.markWrite(ptr, filestatBytes);
    return errno.success;
  }

  private fdFdstat(fd: number, ptr: number): number {
    const e = this.fds.get(fd);
    if (e === undefined) return errno.badf;
    if (!this.inBounds(ptr, fdstatBytes)) return errno.fault;
    const dv = this.mem();
    this.bytes().fill(0, ptr, ptr + fdstatBytes);
    const ft = e.kind === 'disk' ? filetype.regularFile : e.kind === 'conn' || e.kind === 'listener' ? filetype.socketStream : filetype.characterDevice;
    dv.setUint8(ptr, ft);
    const nonblock = (e.kind === 'conn' || e.kind === 'listener') && e.nonblock;
    dv.setUint16(ptr + 2, nonblock ? fdflags.nonblock : 0, true);
    dv.setBigUint64(ptr + 8, rightsAll, true);
    dv.setBigUint64(ptr + 16, rightsAll, true);
    this.vcpu.markWrite(ptr, fdstatBytes);
    return errno.success;
  }

  private fdSetFlags(fd: number, flags: number): number {
    const e = this.fds.get(fd);
    if (e === undefined) return errno.badf;
    if (e.kind === 'conn' || e.kind === 'listener') {
      e.nonblock = (flags & fdflags.nonblock) !== 0;
      return errno.success;
    }
    return (flags & fdflags.nonblock) !== 0 ? errno.notsup : errno.success;
  }

  private fdClose(fd: number): number {
    const e = this.fds.get(fd);
    if (e === undefined) return errno.badf;
    this.fds.delete(fd);
    if (e.kind === 'conn') {
      const out = this.devices.nic.close(e.conn);
      if (out !== null) this.vcpu.output(out);
    } else if (e.kind === 'listener') {
      // The only listener (fd 3: WASI preview1 has no fd_renumber here, nor a way to open one).
      for (const out of this.devices.nic.closeListener()) this.vcpu.output(out);
      this.vcpu.listenerClosed?.();
    }
    return errno.success;
  }

  private allocFd(): number | null {
    for (let fd = diskFd + 1; fd < diskFd + 1 + limits.nicConnectionsMax + 16; fd++) {
      if (!this.fds.has(fd)) return fd;
    }
    return null;
  }

  /**
   * The blocking discipline shared by accept, recv and poll: try, and when the call would
   * block, admit one pending input event and try again; with nothing pending, either unwind
   * for a pause or wait for input. Returns false when the guest is being unwound. `ready` is
   * told what changed since its last (fruitless) call, so it may check only that: `all` on the
   * first call; the connection of the event just admitted (listeners and clocks may have
   * changed too); or noConn after a wait (time passed, input was queued, nothing admitted).
   */
  private blockUntil(ready: (changed: number | 'all') => boolean, deadlineNs: bigint | null): boolean {
    const nic = this.devices.nic;
    let changed: number | 'all' = 'all';
    for (;;) {
      this.vcpu.drainInput();
      if (ready(changed)) return true;
      if (deadlineNs !== null && this.devices.clock.monotonicNs() >= deadlineNs) return true;
      if (nic.admitOne()) {
        if (!nic.listening) this.refuseOpened();
        changed = nic.lastAdmittedConn;
        continue;
      }
      changed = noConn;
      if (this.vcpu.pauseRequested()) {
        this.vcpu.startUnwind();
        return false;
      }
      let timeoutMs: number | null = null;
      if (deadlineNs !== null) {
        const left = deadlineNs - this.devices.clock.monotonicNs();
        timeoutMs = Math.max(0, Math.ceil(Number(left) / 1e6));
      }
      if (this.vcpu.waitForInput(timeoutMs)) {
        this.vcpu.startUnwind();
        return false;
      }
    }
  }

  /** Clients that connected after the guest closed its listener are closed (Nic.takeRefused). */
  private refuseOpened(): void {
    const outs = this.devices.nic.takeRefused();
    if (outs !== null) for (const out of outs) this.vcpu.output(out);
  }

  private sockAccept(fd: number, _flags: number, fdPtr: number): number {
    this.vcpu.finishRewind();
    const e = this.fds.get(fd);
    if (e === undefined) return errno.badf;
    if (e.kind !== 'listener') return errno.notsock;
    if (!this.inBounds(fdPtr, 4)) return errno.fault;
    const nic = this.devices.nic;
    if (e.nonblock) {
      this.vcpu.drainInput();
      if (!nic.acceptReady()) return errno.again;
    } else if (!this.blockUntil(() => nic.acceptReady(), null)) {
      return unwinding;
    }
    const newFd = this.allocFd();
    if (newFd === null) return errno.mfile;
    const conn = nic.accept();
    if (conn === null) return errno.again;
    this.fds.set(newFd, { fd: newFd, kind: 'conn', conn, nonblock: false });
    this.setU32(fdPtr, newFd);
    return errno.success;
  }

  /** `roFlagsPtr` null: fd_read's, which has none. */
  private sockRecv(fd: number, iovsPtr: number, iovsLen: number, flags: number, nPtr: number, roFlagsPtr: number | null): number {
    this.vcpu.finishRewind();
    const e = this.fds.get(fd);
    if (e === undefined) return errno.badf;
    if (e.kind !== 'conn') return errno.notsock;
    // Every pointer before anything is consumed: a bad ro_flags pointer was skipped after the data was taken.
    if (!this.iovecs(iovsPtr, iovsLen) || !this.inBounds(nPtr, 4) || (roFlagsPtr !== null && !this.inBounds(roFlagsPtr, 2))) return errno.fault;
    const nic = this.devices.nic;
    const max = this.totalLen();
    if (e.nonblock) this.vcpu.drainInput();
    else if (!this.blockUntil(() => nic.readReady(e.conn), null)) return unwinding;
    const r = nic.recv(e.conn, max, (flags & riflags.peek) !== 0);
    if (r === 'again') return errno.again;
    const data = r === 'eof' ? new Uint8Array(0) : r;
    this.scatter(data);
    this.setU32(nPtr, data.byteLength);
    if (roFlagsPtr !== null) {
      this.mem().setUint16(roFlagsPtr, 0, true);
      this.vcpu.markWrite(roFlagsPtr, 2);
    }
    return errno.success;
  }

  private sockSend(fd: number, iovsPtr: number, iovsLen: number, nPtr: number): number {
    const e = this.fds.get(fd);
    if (e === undefined) return errno.badf;
    if (e.kind !== 'conn') return errno.notsock;
    if (!this.iovecs(iovsPtr, iovsLen) || !this.inBounds(nPtr, 4)) return errno.fault;
    // A larger send is a short write, as a socket's send buffer makes it: the guest sends the
    // rest in its next call (refusing it made kv drop the connection).
    const data = this.gather(limits.nicSendBytesMax);
    const out = this.devices.nic.send(e.conn, data);
    if (out === null) return errno.pipe;
    if (data.byteLength > 0) this.vcpu.output(out);
    this.setU32(nPtr, data.byteLength);
    return errno.success;
  }

  private sockShutdown(fd: number, how: number): number {
    const e = this.fds.get(fd);
    if (e === undefined) return errno.badf;
    if (e.kind !== 'conn') return errno.notsock;
    if ((how & sdflags.wr) !== 0) {
      const out = this.devices.nic.shutdownWrite(e.conn);
      if (out !== null) this.vcpu.output(out);
    }
    return errno.success;
  }

  // poll_oneoff runs for every request a server guest handles, over every connection it has:
  // its subscriptions are decoded once per call into these reused arrays, without BigInts
  // except for clock deadlines, and readiness is computed into `pollReady`. Only the ready
  // ones' userdata is read (into pollUserdata, before any event is written: the guest may pass
  // overlapping buffers).
  private pollKind = new Uint8Array(0);
  private pollArg = new Int32Array(0);
  private pollUserdata = new Uint32Array(0);
  private pollDeadline: bigint[] = [];
  private pollReady = new Int32Array(0);
  private pollNbytes = new Float64Array(0);
  private pollCount = 0;
  /** The call's subscription count and whether it has a clock, for pollCollect. */
  private pollN = 0;
  private pollHasClock = false;
  /** blockUntil's readiness check for poll, made once (a closure per call allocated per request). */
  private readonly pollReadyCheck = (changed: number | 'all'): boolean => this.pollCollect(changed);

  /**
   * The monotonic time a poll_oneoff that unwound (a pause, or a wait for input in the vCPU's
   * event loop) took its relative timeouts from: its re-entry on the rewind keeps the same
   * deadlines, or a guest that waits in the event loop would restart its timeout at every
   * wake-up and never see it expire. Part of the saved state (WasiState.pollNow): a guest
   * restored elsewhere (a migration's target, a COLO secondary at every checkpoint) wakes at
   * the same guest time as it would have here; without it, it slept its whole timeout again
   * from the restore, and a secondary restored more often than that never woke up at all.
   */
  private pollNow: bigint | null = null;

  private pollOneoff(inPtr: number, outPtr: number, n: number, nPtr: number): number {
    const savedNow = this.vcpu.finishRewind() ? this.pollNow : null;
    this.pollNow = null;
    if (n === 0) return errno.inval;
    if (n > limits.pollSubscriptionsMax) return errno.inval;
    if (!this.inBounds(inPtr, n * subscriptionBytes) || !this.inBounds(outPtr, n * eventBytes) || !this.inBounds(nPtr, 4)) {
      return errno.fault;
    }
    if (this.pollKind.length < n) {
      const size = Math.max(n, 2 * this.pollKind.length, 16);
      this.pollKind = new Uint8Array(size);
      this.pollArg = new Int32Array(size);
      this.pollUserdata = new Uint32Array(2 * size);
      this.pollDeadline = new Array<bigint>(size).fill(0n);
      this.pollReady = new Int32Array(size);
      this.pollNbytes = new Float64Array(size);
    }
    const dv = this.mem();
    const kind = this.pollKind;
    const arg = this.pollArg;
    const fds = this.fds;
    let deadline: bigint | null = null;
    let now = 0n;
    for (let i = 0; i < n; i++) {
      const p = inPtr + i * subscriptionBytes;
      const tag = dv.getUint8(p + 8);
      if (tag === eventtype.clock) {
        if (deadline === null) now = savedNow ?? this.devices.clock.monotonicNs();
        const timeout = dv.getBigUint64(p + 24, true);
        const flags = dv.getUint16(p + 40, true);
        const id = dv.getUint32(p + 16, true);
        // A clock the host does not have: EINVAL, as clock_time_get's (it waited on the monotonic one).
        if (id > clockid.threadCputime) return errno.inval;
        // Absolute realtime deadlines are converted to our monotonic clock.
        let d: bigint;
        if ((flags & subclockflagsAbstime) !== 0) {
          d = id === clockid.realtime ? now + (timeout - this.devices.clock.realtimeNs()) : timeout;
        } else {
          d = now + timeout;
        }
        kind[i] = pollKinds.clock;
        this.pollDeadline[i] = d;
        if (deadline === null || d < deadline) deadline = d;
        continue;
      }
      // Neither clock, fd_read nor fd_write: EINVAL for the call (an event with the unknown tag was written back).
      if (tag !== eventtype.fdRead && tag !== eventtype.fdWrite) return errno.inval;
      const fd = dv.getUint32(p + 16, true);
      const code = fds.pollCode(fd);
      // arg: the connection for a conn subscription, else the event type it echoes (fd_read or fd_write).
      if (code === fdCodes.none) {
        kind[i] = pollKinds.badf;
        arg[i] = tag;
      } else if (tag === eventtype.fdWrite) {
        kind[i] = pollKinds.writable;
        arg[i] = tag;
      } else if (code === fdCodes.listener) {
        kind[i] = pollKinds.listener;
        arg[i] = tag;
      } else if (code === fdCodes.conn) {
        kind[i] = pollKinds.conn;
        arg[i] = fds.pollConn(fd);
      } else {
        kind[i] = pollKinds.always;
        arg[i] = tag;
      }
    }
    this.pollN = n;
    this.pollHasClock = deadline !== null;
    if (!this.blockUntil(this.pollReadyCheck, deadline)) {
      if (deadline !== null) this.pollNow = now;
      return unwinding;
    }
    // blockUntil returns after a collect that found events, or at the deadline.
    if (this.pollCount === 0) this.pollCollect('all');
    const u8 = this.bytes();
    const count = this.pollCount;
    const userdata = this.pollUserdata;
    for (let j = 0; j < count; j++) {
      const sub = inPtr + this.pollReady[j]! * subscriptionBytes;
      userdata[2 * j] = dv.getUint32(sub, true);
      userdata[2 * j + 1] = dv.getUint32(sub + 4, true);
    }
    for (let j = 0; j < count; j++) {
      const i = this.pollReady[j]!;
      const p = outPtr + j * eventBytes;
      u8.fill(0, p, p + eventBytes);
      dv.setUint32(p, userdata[2 * j]!, true);
      dv.setUint32(p + 4, userdata[2 * j + 1]!, true);
      const k = kind[i]!;
      const nbytes = this.pollNbytes[j]!;
      dv.setUint16(p + 8, k === pollKinds.badf ? errno.badf : 0, true);
      dv.setUint8(p + 10, k === pollKinds.clock ? eventtype.clock : k === pollKinds.conn ? eventtype.fdRead : arg[i]!);
      dv.setUint32(p + 16, nbytes, true);
      dv.setUint16(p + 24, k === pollKinds.conn && nbytes === 0 ? eventrwflagsHangup : 0, true);
    }
    this.vcpu.markWrite(outPtr, count * eventBytes);
    this.setU32(nPtr, count);
    return errno.success;
  }

  /**
   * Which of the call's pollN subscriptions are ready: indices into pollReady, nbytes into
   * pollNbytes, in subscription order. Unless `changed` is 'all', the previous collect of this
   * call found nothing and the only change since is on that connection (an admitted event) or
   * none (noConn): only subscriptions on it, listeners and clocks can have become ready, and
   * only those are looked up (the NIC's map is not searched once per connection for every event
   * admitted or every wake-up). The result is the same as a full collect's.
   */
  private pollCollect(changed: number | 'all'): boolean {
    const n = this.pollN;
    const nic = this.devices.nic;
    const kind = this.pollKind;
    const arg = this.pollArg;
    const ready = this.pollReady;
    const nbytes = this.pollNbytes;
    const t = this.pollHasClock ? this.devices.clock.monotonicNs() : 0n;
    const all = changed === 'all';
    let count = 0;
    for (let i = 0; i < n; i++) {
      switch (kind[i]) {
        case pollKinds.clock:
          if (t < this.pollDeadline[i]!) continue;
          nbytes[count] = 0;
          break;
        case pollKinds.conn: {
          const conn = arg[i]!;
          if (!all && conn !== changed) continue;
          const bytes = nic.readableOrNotReady(conn);
          if (bytes < 0) continue;
          nbytes[count] = bytes;
          break;
        }
        case pollKinds.listener:
          if (!nic.acceptReady()) continue;
          nbytes[count] = 1;
          break;
        case pollKinds.writable:
          nbytes[count] = 65536;
          break;
        default: // badf, always
          nbytes[count] = 0;
      }
      ready[count++] = i;
    }
    this.pollCount = count;
    return count > 0;
  }

  /** Connections the guest holds fds for. */
  connFds(): { fd: number; conn: number }[] {
    const out: { fd: number; conn: number }[] = [];
    for (const e of this.fds.values()) if (e.kind === 'conn') out.push({ fd: e.fd, conn: e.conn });
    return out;
  }

  save(): WasiState {
    const fds = [...this.fds.values()].map(copyFdEntry);
    return this.pollNow === null ? { fds } : { fds, pollNow: this.pollNow };
  }

  restore(raw: unknown): void {
    const s = v.record(raw, 'wasi');
    const pollNow = s.pollNow === undefined ? null : v.bigintValue(s.pollNow, 'wasi.pollNow');
    if (pollNow !== null && pollNow < 0n) throw new RestoreError('STATE_INVALID', 'wasi.pollNow: expected a time of the guest clock (not negative)');
    const fds = new FdTable();
    for (const [i, x] of v.array(s.fds, 'wasi.fds', limits.nicConnectionsMax + 32).entries()) {
      const e = v.record(x, `wasi.fds[${i}]`);
      const fd = v.uint(e.fd, `wasi.fds[${i}].fd`, 0xffff);
      switch (e.kind) {
        case 'stdin':
        case 'stdout':
        case 'stderr':
          fds.set(fd, { fd, kind: e.kind });
          break;
        case 'listener':
          fds.set(fd, { fd, kind: 'listener', nonblock: v.bool(e.nonblock, `wasi.fds[${i}].nonblock`) });
          break;
        case 'disk':
          if (this.devices.disk === null) throw new RestoreError('STATE_DISK', 'the saved machine has a disk but this one has none (--drive)');
          fds.set(fd, { fd, kind: 'disk', pos: v.uint(e.pos, `wasi.fds[${i}].pos`) });
          break;
        case 'conn':
          fds.set(fd, { fd, kind: 'conn', conn: v.uint(e.conn, `wasi.fds[${i}].conn`), nonblock: v.bool(e.nonblock, `wasi.fds[${i}].nonblock`) });
          break;
        default:
          throw new RestoreError('STATE_INVALID', `wasi.fds[${i}].kind: unknown kind ${String(e.kind)}`);
      }
    }
    this.fds = fds;
    this.pollNow = pollNow;
  }
}
