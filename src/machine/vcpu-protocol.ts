import type { InputCredit, NicOutput, NicState } from '../net/nic.js';
import type { DiskSpec } from '../block/disk.js';
import type { WasiState } from './wasi-host.js';
import type { SerialReport } from './devices/serial.js';

/** Int32 slots of the control block shared by the main thread and the vCPU. */
export const ctl = {
  /** Non-zero: the vCPU must reach a safe point and unwind (2: and post its state with 'paused'). */
  pauseRequest: 0,
  /** Bumped (and notified) whenever input is posted or a pause is requested. */
  wake: 1,
  /** Non-zero: a disk write waiting for space is to be tried again now (`cont` in io-error). */
  retryIo: 2,
  /** COLO secondary: non-zero: output no longer goes to the SVM output channel (a takeover). */
  directOff: 3,
  /** COLO secondary: the checkpoint epoch output on the SVM output channel is tagged with. */
  outEpoch: 4,
  /** The reserved-region lock (reserved-region.ts): 0 free, 1 held. */
  regionLock: 5,
  /** The guest's size in wasm pages (its `colo$pages`), which says where colo's region is; written by the vCPU. */
  guestPages: 6,
  slots: 7,
} as const;

export interface GuestGlobalLayout {
  exportName: string;
  type: 'i32' | 'i64' | 'f32' | 'f64';
}

/**
 * Where colo-vm keeps its own data inside guest memory: a region of `reservedPages` right above
 * the guest's own pages, which moves up when the guest grows and which the guest never sees
 * (reserved-region.ts; `regionAt` says where it is for a given guest size). It holds the
 * asyncify unwind stack and, with store logging, the dirty byte map (one byte per 4 KiB page).
 */
export interface GuestLayout {
  globals: GuestGlobalLayout[];
  initialPages: number;
  reservedPages: number;
  asyncifyBytes: number;
  storeLog: boolean;
  dirtyLogBytes: number;
  preemptBudget: number;
}

export interface VcpuState {
  started: boolean;
  exited: boolean;
  /**
   * Every mutable global by export name: an i32 as a number; an i64 as a bigint; an f32 or f64
   * as a bigint of its bits (floatGlobalBits), since the state travels as JSON, where a
   * number that is Infinity or NaN becomes null and -0 becomes 0. (A NaN's payload is lost
   * anyway: V8 canonicalises it when it hands the global's value to JS.)
   */
  globals: Record<string, number | bigint>;
  memoryPages: number;
  clock: { monotonicNs: bigint };
  serial: { bytesWritten: number };
  nic: NicState;
  wasi: WasiState;
}

const floatBits = new DataView(new ArrayBuffer(8));

/** The bits of an f32 or f64 global's value, as VcpuState.globals holds them. */
export function floatGlobalBits(type: 'f32' | 'f64', value: number): bigint {
  if (type === 'f32') {
    floatBits.setFloat32(0, value, true);
    return BigInt(floatBits.getUint32(0, true));
  }
  floatBits.setFloat64(0, value, true);
  return floatBits.getBigUint64(0, true);
}

/** The value of an f32 or f64 global from its bits (floatGlobalBits), or null when they do not fit the type. */
export function floatGlobalValue(type: 'f32' | 'f64', bits: bigint): number | null {
  if (bits < 0n || bits >= (type === 'f32' ? 1n << 32n : 1n << 64n)) return null;
  if (type === 'f32') {
    floatBits.setUint32(0, Number(bits), true);
    return floatBits.getFloat32(0, true);
  }
  floatBits.setBigUint64(0, bits, true);
  return floatBits.getFloat64(0, true);
}

export type WorkerRequest =
  | {
      type: 'init';
      module: WebAssembly.Module;
      memory: WebAssembly.Memory;
      ctl: SharedArrayBuffer;
      /** Client input, written by the main thread (input-ring.ts). */
      inputRing: SharedArrayBuffer;
      layout: GuestLayout;
      args: string[];
      env: string[];
      serialFd: number | null;
      disk: DiskSpec | null;
      /** COLO_TRACE_DIR: the vCPU's trace (core/latency-trace.ts SharedTraceLog), else null. */
      trace: SharedArrayBuffer | null;
    }
  | { type: 'run' }
  /** COLO secondary: listen for the SVM output channel (colo/output-channel.ts). */
  | { type: 'output-channel'; host: string; migrationId: Uint8Array }
  | { type: 'save' }
  /** `run`: start the guest right after ('restored', then 'running'). */
  | { type: 'restore'; state: VcpuState; run?: boolean };

export type WorkerReply =
  | { type: 'ready' }
  | { type: 'running' }
  /** `state`: the pause was asked for with the state (Machine.pauseAndSave), saved at the safe point. */
  | { type: 'paused'; state?: VcpuState }
  /**
   * A guest disk access failed on the host. action stop: a write found the filesystem full and
   * the vCPU waits in the call (werror=enospc); report: the guest was given EIO and runs on.
   */
  | { type: 'io-error'; operation: 'read' | 'write'; action: 'stop' | 'report'; nospace: boolean; reason: string }
  /** The write that waited went through; the guest runs on. */
  | { type: 'io-resumed' }
  | { type: 'exited'; code: number }
  | { type: 'panicked'; message: string }
  /** `outs`: an encodeOutputBatch. */
  | { type: 'out'; outs: Uint8Array; credits: InputCredit[] | null }
  | { type: 'output-channel'; port: number }
  /** The guest closed its listening socket (fd 3): its front end stops listening. */
  | { type: 'listener-closed' }
  /** A write to the serial console failed (the first of a streak; its output is dropped), or worked again. */
  | { type: 'serial'; report: SerialReport }
  /** The SVM output channel broke (a failed write, its end seen, a primary that reads nothing): the vCPU closed it and posts its output again. */
  | { type: 'direct-output-failed'; message: string }
  | { type: 'state'; state: VcpuState }
  | { type: 'restored'; connections: number[]; maxConnId: number }
  | { type: 'error'; message: string; code?: string | undefined };

const outputKinds = ['out', 'shut', 'close'] as const;
const outputEntryBytes = 17;

/**
 * Guest output from the vCPU to the main thread as one byte buffer: per event u8 kind
 * (0 out, 1 shut, 2 close), u32 conn, f64 offset, u32 length, and the bytes. A structured
 * clone of the event objects cost the vCPU (and the main thread) a walk over every object and
 * string; this is one copy. Both ends are our own code: decode asserts, it does not validate.
 */
export function encodeOutputBatch(outs: readonly NicOutput[]): Uint8Array {
  let bytes = 0;
  for (const o of outs) bytes += outputEntryBytes + (o.kind === 'out' ? o.bytes.byteLength : 0);
  const b = new Uint8Array(bytes);
  const dv = new DataView(b.buffer);
  let at = 0;
  for (const o of outs) {
    const len = o.kind === 'out' ? o.bytes.byteLength : 0;
    dv.setUint8(at, o.kind === 'out' ? 0 : o.kind === 'shut' ? 1 : 2);
    dv.setUint32(at + 1, o.conn, true);
    dv.setFloat64(at + 5, o.offset, true);
    dv.setUint32(at + 13, len, true);
    if (o.kind === 'out') b.set(o.bytes, at + outputEntryBytes);
    at += outputEntryBytes + len;
  }
  return b;
}

/** The events of an encodeOutputBatch; their bytes are views of `b`. */
export function decodeOutputBatch(b: Uint8Array): NicOutput[] {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const outs: NicOutput[] = [];
  let at = 0;
  while (at < b.byteLength) {
    const kind = outputKinds[dv.getUint8(at)];
    const conn = dv.getUint32(at + 1, true);
    const offset = dv.getFloat64(at + 5, true);
    const len = dv.getUint32(at + 13, true);
    at += outputEntryBytes;
    if (kind === undefined || at + len > b.byteLength) throw new Error('bad output batch from the vCPU');
    outs.push(kind === 'out' ? { kind, conn, offset, bytes: b.subarray(at, at + len) } : { kind, conn, offset });
    at += len;
  }
  return outs;
}
