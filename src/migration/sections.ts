import { limits } from '../core/limits.js';
import { RestoreError, StreamError } from '../core/errors.js';
import { decodeStateJson, encodeStateJson } from '../core/bytes.js';
import * as v from '../core/validate.js';
import type { Machine } from '../machine/machine.js';
import type { VcpuState } from '../machine/vcpu-protocol.js';
import { decodeIndexList, encodeIndexList, FrameType, parseJsonPayload, type Frame, type FrameEncoder } from './stream.js';

/**
 * The sections of a machine in the stream: setup (what the target must match), RAM pages,
 * disk blocks, device state. Encoding and applying live here so that the file format, the
 * pre-copy channel and COLO checkpoints share one definition.
 */
const pageBytes = limits.pageBytes;
const zeroPage = Buffer.alloc(pageBytes);

export interface SetupInfo {
  moduleHash: string;
  /** The guest instrumentation's version: a paused call stack resumes only under the same. */
  instrumentVersion: number;
  /**
   * The memory the state needs (wasm pages): the guest's and colo's region above it
   * (Machine.statePages). Older sources sent their whole memory, which may be larger; both
   * are taken, if the target's --memory holds them.
   */
  memoryPages: number;
  reservedPages: number;
  storeLog: boolean;
  disk: { sizeBytes: number } | null;
  [key: string]: unknown;
}

export function setupOf(m: Machine, extra: Record<string, unknown> = {}): SetupInfo {
  return {
    moduleHash: m.guest.moduleHash,
    instrumentVersion: m.guest.instrumentVersion,
    memoryPages: m.statePages(),
    reservedPages: m.layout.reservedPages,
    storeLog: m.layout.storeLog,
    disk: m.disk === null ? null : { sizeBytes: m.disk.sizeBytes },
    ...extra,
  };
}

/** Check a source's setup against this machine and grow RAM to match. */
export function applySetup(m: Machine, frame: Frame): SetupInfo {
  const s = parseJsonPayload(frame);
  const moduleHash = typeof s.moduleHash === 'string' ? s.moduleHash : '';
  if (moduleHash !== m.guest.moduleHash) {
    throw new RestoreError('STATE_WRONG_MODULE', `the state belongs to guest module ${moduleHash.slice(0, 16) || '?'}…, not to this one (${m.guest.moduleHash.slice(0, 16)}…)`);
  }
  // The state's paused call stack is asyncify frames laid out by the instrumentation that
  // made them (locals by index): another version would resume them with wrong locals.
  if (s.instrumentVersion !== m.guest.instrumentVersion) {
    throw new RestoreError(
      'STATE_INSTRUMENT',
      `the state was made by a build whose guest instrumentation is version ${typeof s.instrumentVersion === 'number' ? s.instrumentVersion : 'unknown'}, this one's is ${m.guest.instrumentVersion}: its paused guest cannot be resumed here`,
    );
  }
  let memoryPages: number;
  let reservedPages: number;
  try {
    memoryPages = v.uint(s.memoryPages, 'setup.memoryPages', 65536);
    reservedPages = v.uint(s.reservedPages, 'setup.reservedPages', 65536);
  } catch (err) {
    throw new StreamError('FRAME_INVALID', (err as Error).message);
  }
  if (reservedPages !== m.layout.reservedPages || s.storeLog !== m.layout.storeLog) {
    throw new RestoreError('STATE_LAYOUT', 'the state was made with another memory layout (different --memory maximum or dirty-log mode)');
  }
  const disk = s.disk;
  if ((disk === null) !== (m.disk === null)) {
    throw new RestoreError('STATE_DISK', disk === null ? 'the state has no disk but this machine has a --drive' : 'the state has a disk but this machine has no --drive');
  }
  if (disk !== null && m.disk !== null) {
    const size = (disk as Record<string, unknown>).sizeBytes;
    if (size !== m.disk.sizeBytes) throw new RestoreError('STATE_DISK', `the state's disk is ${String(size)} bytes, this drive is ${m.disk.sizeBytes}`);
  }
  m.growRamTo(memoryPages);
  return { ...s, moduleHash, instrumentVersion: m.guest.instrumentVersion, memoryPages, reservedPages, storeLog: m.layout.storeLog, disk: disk as SetupInfo['disk'] };
}

export function isZeroPage(ram: Uint8Array, page: number): boolean {
  const off = page * pageBytes;
  return Buffer.from(ram.buffer, ram.byteOffset + off, pageBytes).equals(zeroPage);
}

/**
 * Encode the given pages as frames: zero pages as indices only, the others with data copied
 * out of guest RAM at encode time (what the frame carries is what the target gets).
 */
export function encodePages(
  enc: FrameEncoder,
  ram: Uint8Array,
  pages: ArrayLike<number>,
  onPage?: (page: number, data: Buffer | null) => void,
): { frames: Buffer[]; normal: number; zero: number; bytes: number } {
  const frames: Buffer[] = [];
  let normal = 0;
  let zero = 0;
  let bytes = 0;
  const zeros: number[] = [];
  let idx: number[] = [];
  let data = Buffer.allocUnsafe(limits.pagesPerPacketMax * pageBytes);
  const flush = (): void => {
    if (idx.length === 0) return;
    const payload = data.subarray(0, idx.length * pageBytes);
    for (const f of enc.frame(FrameType.ramPages, [encodeIndexList(idx), payload])) {
      frames.push(f);
      bytes += f.byteLength;
    }
    idx = [];
    data = Buffer.allocUnsafe(limits.pagesPerPacketMax * pageBytes);
  };
  const flushZero = (): void => {
    if (zeros.length === 0) return;
    for (const f of enc.frame(FrameType.ramZero, [encodeIndexList(zeros)])) {
      frames.push(f);
      bytes += f.byteLength;
    }
    zeros.length = 0;
  };
  const ramBuf = Buffer.from(ram.buffer, ram.byteOffset, ram.byteLength);
  for (let i = 0; i < pages.length; i++) {
    const page = pages[i]!;
    const off = page * pageBytes;
    if (ramBuf.compare(zeroPage, 0, pageBytes, off, off + pageBytes) === 0) {
      zeros.push(page);
      zero++;
      onPage?.(page, null);
      if (zeros.length >= limits.frameBytesMax / 8) flushZero();
      continue;
    }
    const at = idx.length * pageBytes;
    ramBuf.copy(data, at, off, off + pageBytes);
    onPage?.(page, data.subarray(at, at + pageBytes));
    idx.push(page);
    normal++;
    if (idx.length === limits.pagesPerPacketMax) flush();
  }
  flush();
  flushZero();
  return { frames, normal, zero, bytes };
}

/** Apply a ramPages or ramZero frame to `ram` (guest RAM or a COLO cache). Returns the page indices. */
export function applyPagesFrame(frame: Frame, ram: Uint8Array, pageCount: number): Uint32Array {
  if (frame.type === FrameType.ramZero) {
    const { indices } = decodeIndexList(frame, 0, pageCount);
    for (const p of indices) ram.fill(0, p * pageBytes, (p + 1) * pageBytes);
    return indices;
  }
  const { indices, data } = decodeIndexList(frame, pageBytes, pageCount);
  for (let i = 0; i < indices.length; i++) {
    ram.set(data.subarray(i * pageBytes, (i + 1) * pageBytes), indices[i]! * pageBytes);
  }
  return indices;
}

const blockBytes = limits.diskBlockBytes;

export function encodeDiskBlocks(enc: FrameEncoder, m: Machine, blocks: readonly number[]): { frames: Buffer[]; bytes: number } {
  const frames: Buffer[] = [];
  let bytes = 0;
  const disk = m.disk;
  if (disk === null) return { frames, bytes };
  const per = limits.pagesPerPacketMax;
  for (let i = 0; i < blocks.length; i += per) {
    const chunk = blocks.slice(i, i + per);
    const data = Buffer.alloc(chunk.length * blockBytes);
    chunk.forEach((b, j) => disk.readBlock(b, data.subarray(j * blockBytes, (j + 1) * blockBytes)));
    for (const f of enc.frame(FrameType.diskBlocks, [encodeIndexList(chunk), data])) {
      frames.push(f);
      bytes += f.byteLength;
    }
  }
  return { frames, bytes };
}

export function decodeDiskBlocks(frame: Frame, blockCount: number): { indices: Uint32Array; data: Buffer } {
  return decodeIndexList(frame, blockBytes, blockCount);
}

export interface DeviceBlob {
  vcpu: VcpuState;
  /** COLO_VERIFY_RAM: the source's per-page sums of guest RAM (ram-digest.ts). */
  ramDigest?: string;
}

export function encodeDeviceState(enc: FrameEncoder, blob: DeviceBlob): Buffer[] {
  return enc.frame(FrameType.deviceState, [encodeStateJson(blob)]);
}

export function decodeDeviceState(frame: Frame): DeviceBlob {
  let value: unknown;
  try {
    value = decodeStateJson(frame.payload);
  } catch {
    throw new StreamError('FRAME_INVALID', 'device state frame does not decode');
  }
  const r = v.record(value, 'device state');
  const vcpu = v.record(r.vcpu, 'device state.vcpu') as unknown as VcpuState;
  if (r.ramDigest === undefined) return { vcpu };
  if (typeof r.ramDigest !== 'string') throw new StreamError('FRAME_INVALID', 'device state.ramDigest: expected a string');
  return { vcpu, ramDigest: r.ramDigest };
}
