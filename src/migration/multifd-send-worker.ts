/**
 * A multifd sender: one worker thread, one TCP connection to the destination. It reads guest
 * RAM directly (the shared WebAssembly.Memory), takes batches of the round's page list from a
 * shared cursor (so faster channels take more), detects zero pages, copies the other pages
 * into a staging slot (what the packet carries is what the destination gets, even if the
 * guest writes the page again meanwhile), sums numbers and data with fl64 and writes the
 * packet. A round ends with a SYNC packet. See docs/migration-protocol.md, "Multifd channels".
 *
 * The worker starts before it knows where to connect (MultifdSender.spawn), warms its code
 * up on private buffers, and connects on request: a migration does not wait for thread
 * start-up or for the JIT.
 */
import net from 'node:net';
import { parentPort, workerData } from 'node:worker_threads';
import { limits } from '../core/limits.js';
import { ChannelClosedError, ColoError, MigrationError, TimeoutError, errorMessage } from '../core/errors.js';
import { Fl64 } from './checksum.js';
import {
  ChannelStatus,
  PacketFlags,
  channelAnswerBytes,
  channelStatusText,
  decodeChannelAnswer,
  encodeChannelHello,
  encodePacketHeader,
  multifdVersion,
  packetHeaderBytes,
  payloadBytesOf,
  slotBytes,
  slotDataOffset,
} from './multifd-format.js';
import { bufferOf, isZeroBytes, pageBytes, scanPages } from './zero.js';
import { RateLimit } from './rate.js';

export interface SendWorkerData {
  memory: WebAssembly.Memory;
  /** ShadowDirtyTracker's shadow: what the destination holds, updated for every page sent. */
  shadow: SharedArrayBuffer | null;
  /** The round's page numbers (Uint32, ascending). */
  list: SharedArrayBuffer;
  /** Int32 slot 0: the next index of `list` to take. */
  control: SharedArrayBuffer;
  fl64: WebAssembly.Module;
}

/** A round of every page in `ranges` (round 1): the list is implicit. */
export interface FullRound {
  ranges: [number, number][];
}

export type SendWorkerRequest =
  | { type: 'connect'; host: string; port: number; migrationId: Uint8Array; channel: number; channels: number }
  /**
   * `memory`: read the round's pages from this copy of guest RAM (same offsets; a COLO
   * checkpoint captured while the guest was paused) instead of guest RAM.
   */
  | { type: 'round'; round: number; count: number; bytesPerSecond: number; full: FullRound | null; memory?: WebAssembly.Memory }
  /** max-bandwidth changed during the round (this channel's share). */
  | { type: 'rate'; bytesPerSecond: number }
  | { type: 'close' };

export type SendWorkerReply =
  | { type: 'ready' }
  | { type: 'connected' }
  | { type: 'roundDone'; round: number; normal: number; zero: number; bytes: number; packets: number }
  /**
   * Bytes written so far in the current round (every 16 packets, or 100 ms, for query-migrate's
   * progress: a throttled channel takes seconds for 16 packets).
   */
  | { type: 'progress'; round: number; bytes: number }
  | { type: 'error'; code: string; message: string }
  | { type: 'closed' };

const d = workerData as SendWorkerData;
const port = parentPort!;
const post = (m: SendWorkerReply): void => port.postMessage(m);

const slots = limits.multifdSendSlots;
const fl = new Fl64(slotBytes * slots, d.fl64);
const staging = fl.buffer();
const stagingView = new DataView(staging.buffer, staging.byteOffset, staging.byteLength);
const batchPages = limits.pagesPerPacketMax;
const zeroMax = limits.multifdZeroPagesPerPacketMax;

/** Where pages come from: guest RAM and the shared list (or private buffers for the warm-up). */
interface Source {
  ram: Buffer;
  refresh: () => Buffer;
  list: Uint32Array;
  control: Int32Array;
  shadow: Buffer | null;
  /** Set for a full round: entries are made from the ranges instead of read from `list`. */
  full: FullRound | null;
}

/** Where this round's pages are read: guest RAM, or the copy the round came with. */
let roundMemory: WebAssembly.Memory = d.memory;
const guest: Source = {
  ram: bufferOf(d.memory.buffer),
  refresh: () => bufferOf(roundMemory.buffer),
  list: new Uint32Array(d.list),
  control: new Int32Array(d.control),
  shadow: d.shadow === null ? null : bufferOf(d.shadow),
  full: null,
};

/** A full round's entries [start, end) (indices over the concatenated ranges) into `batch`. */
const batch = new Uint32Array(limits.pagesPerPacketMax);
function fullEntries(f: FullRound, start: number, end: number): Uint32Array {
  let r = 0;
  let base = 0;
  while (r < f.ranges.length && start >= base + (f.ranges[r]![1] - f.ranges[r]![0])) {
    base += f.ranges[r]![1] - f.ranges[r]![0];
    r++;
  }
  for (let i = start; i < end; i++) {
    let [a, b] = f.ranges[r]!;
    if (i - base >= b - a) {
      base += b - a;
      r++;
      [a, b] = f.ranges[r]!;
    }
    batch[i - start] = a + (i - base);
  }
  return batch;
}

let socket: net.Socket | null = null;
let channel = 0;
let packetNumber = 0;
let closing = false;
let failed = false;
/** Per slot: resolves when the slot's last write completed. */
const slotFree: (Promise<void> | null)[] = new Array(slots).fill(null);
let nextSlot = 0;
const normals = new Uint32Array(batchPages);
const zeros = new Uint32Array(zeroMax);
let packetNormal = 0;
let packetZero = 0;
/** The longest a round's progress report waits (see SendWorkerReply 'progress'). */
const progressEveryMs = 100;
/** The throttle of the round being sent (null between rounds). */
let roundLimit: RateLimit | null = null;

function fail(err: unknown): void {
  if (failed || closing) return;
  failed = true;
  const code = err instanceof ColoError ? err.code : 'CHANNEL_CLOSED';
  post({ type: 'error', code, message: errorMessage(err) });
  socket?.destroy();
}

function connect(m: Extract<SendWorkerRequest, { type: 'connect' }>): Promise<net.Socket> {
  const peer = `${m.host}:${m.port}`;
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: m.host, port: m.port });
    const timer = setTimeout(() => {
      s.destroy();
      reject(new TimeoutError(`multifd channel ${m.channel}: timed out after ${limits.migrationConnectTimeoutMs} ms connecting to ${peer}`));
    }, limits.migrationConnectTimeoutMs);
    let answer = Buffer.alloc(0);
    s.once('error', (err) => {
      clearTimeout(timer);
      reject(new ChannelClosedError(`multifd channel ${m.channel}: cannot connect to ${peer}: ${err.message}`, { cause: err }));
    });
    s.once('connect', () => {
      s.setNoDelay(true);
      s.write(encodeChannelHello({ version: multifdVersion, migrationId: m.migrationId, channel: m.channel, channels: m.channels }));
    });
    const onData = (chunk: Buffer): void => {
      answer = Buffer.concat([answer, chunk]);
      if (answer.byteLength < channelAnswerBytes) return;
      clearTimeout(timer);
      s.off('data', onData);
      s.removeAllListeners('error');
      s.removeAllListeners('close');
      try {
        const status = decodeChannelAnswer(answer);
        if (status !== ChannelStatus.accepted) {
          s.destroy();
          reject(new MigrationError('MULTIFD_REFUSED', `the destination refused multifd channel ${m.channel}: ${channelStatusText(status)}`));
          return;
        }
      } catch (err) {
        s.destroy();
        reject(err);
        return;
      }
      resolve(s);
    };
    s.on('data', onData);
    s.once('close', () => {
      clearTimeout(timer);
      reject(new ChannelClosedError(`multifd channel ${m.channel}: ${peer} closed the connection during the handshake`));
    });
  });
}

function noteZeroRun(src: Source, list: Uint32Array, i: number, n: number): void {
  const shadow = src.shadow;
  if (shadow === null) return;
  const note = (page: number, count: number): void => {
    const off = page * pageBytes;
    const len = count * pageBytes;
    if (!isZeroBytes(shadow, off, len)) shadow.fill(0, off, off + len);
  };
  const first = list[i]!;
  if (list[i + n - 1] === first + n - 1) note(first, n);
  else for (let k = 0; k < n; k++) note(list[i + k]!, 1);
}

/**
 * Fill slot `slot` with the next packet of the round (entries up to `count` of the list);
 * returns [header+numbers bytes, data bytes], or null when the list is used up.
 */
function fillPacket(src: Source, slot: number, round: number, count: number): [number, number] | null {
  const base = slot * slotBytes;
  const numbersAt = base + packetHeaderBytes;
  const dataAt = base + slotDataOffset;
  let normal = 0;
  let zero = 0;
  // Take batches while the packet holds zero pages only, so that a zero region travels in
  // few packets; a batch with data ends the packet (a batch never holds more pages than fit).
  while (normal === 0 && zero + batchPages <= zeroMax) {
    const claimed = Atomics.add(src.control, 0, batchPages);
    if (claimed >= count) break;
    const claimedEnd = Math.min(claimed + batchPages, count);
    // The entries: a view of the shared list, or made from the ranges of a full round.
    const list = src.full === null ? src.list : fullEntries(src.full, claimed, claimedEnd);
    const start = src.full === null ? claimed : 0;
    const end = src.full === null ? claimedEnd : claimedEnd - claimed;
    const last = list[end - 1]!;
    if ((last + 1) * pageBytes > src.ram.byteLength) src.ram = src.refresh();
    if ((last + 1) * pageBytes > src.ram.byteLength) throw new MigrationError('RAM_RANGE', `page ${last} is outside guest RAM (${src.ram.byteLength} bytes)`);
    scanPages(
      src.ram,
      list,
      start,
      end,
      (i, n) => {
        for (let k = 0; k < n; k++) zeros[zero++] = list[i + k]!;
        noteZeroRun(src, list, i, n);
      },
      (i) => {
        normals[normal++] = list[i]!;
      },
    );
  }
  if (normal + zero === 0) return null;
  // Copy the data pages run by run (one memcpy per run of contiguous pages).
  for (let i = 0; i < normal; ) {
    let j = i + 1;
    while (j < normal && normals[j] === normals[j - 1]! + 1) j++;
    const from = normals[i]! * pageBytes;
    const to = dataAt + i * pageBytes;
    src.ram.copy(staging, to, from, from + (j - i) * pageBytes);
    if (src.shadow !== null) staging.copy(src.shadow, from, to, to + (j - i) * pageBytes);
    i = j;
  }
  let at = numbersAt;
  for (let i = 0; i < normal; i++, at += 4) stagingView.setUint32(at, normals[i]!, true);
  for (let i = 0; i < zero; i++, at += 4) stagingView.setUint32(at, zeros[i]!, true);
  const numbersBytes = 4 * (normal + zero);
  const dataBytes = normal * pageBytes;
  encodePacketHeader(staging, base, {
    flags: 0,
    channel,
    packet: packetNumber++,
    round,
    normal,
    zero,
    payloadBytes: payloadBytesOf(normal, zero),
    numbersChecksum: fl.sum(numbersAt, numbersBytes),
    dataChecksum: fl.sum(dataAt, dataBytes),
  });
  packetNormal += normal;
  packetZero += zero;
  return [packetHeaderBytes + numbersBytes, dataBytes];
}

async function takeSlot(): Promise<number> {
  const slot = nextSlot;
  nextSlot = (nextSlot + 1) % slots;
  const busy = slotFree[slot];
  if (busy !== null && busy !== undefined) await busy;
  return slot;
}

/** Write a slot's header+numbers and data as one writev; the slot is free when it is flushed. */
function send(slot: number, headBytes: number, dataBytes: number): void {
  const s = socket!;
  const base = slot * slotBytes;
  slotFree[slot] = new Promise<void>((resolve) => {
    const done = (err?: Error | null): void => {
      if (err) fail(new ChannelClosedError(`multifd channel ${channel}: ${err.message}`));
      resolve();
    };
    if (dataBytes === 0) {
      s.write(staging.subarray(base, base + headBytes), done);
      return;
    }
    s.cork();
    s.write(staging.subarray(base, base + headBytes));
    s.write(staging.subarray(base + slotDataOffset, base + slotDataOffset + dataBytes), done);
    s.uncork();
  });
}

async function runRound(round: number, count: number, bytesPerSecond: number, full: FullRound | null, memory: WebAssembly.Memory): Promise<void> {
  guest.full = full;
  if (memory !== roundMemory) {
    roundMemory = memory;
    guest.ram = guest.refresh();
  }
  packetNormal = 0;
  packetZero = 0;
  let bytes = 0;
  let packets = 0;
  let progressAt = performance.now();
  const limit = new RateLimit(bytesPerSecond);
  roundLimit = limit;
  for (;;) {
    if (failed) return;
    const slot = await takeSlot();
    const n = fillPacket(guest, slot, round, count);
    if (n === null) {
      nextSlot = slot; // unused: hand it to the SYNC packet
      break;
    }
    send(slot, n[0], n[1]);
    bytes += n[0] + n[1];
    packets++;
    if ((packets & 15) === 0 || performance.now() - progressAt >= progressEveryMs) {
      progressAt = performance.now();
      post({ type: 'progress', round, bytes });
    }
    await limit.pace(bytes);
  }
  const slot = await takeSlot();
  const base = slot * slotBytes;
  encodePacketHeader(staging, base, {
    flags: PacketFlags.sync,
    channel,
    packet: packetNumber++,
    round,
    normal: 0,
    zero: 0,
    payloadBytes: 0,
    numbersChecksum: fl.sum(base, 0),
    dataChecksum: fl.sum(base, 0),
  });
  roundLimit = null;
  send(slot, packetHeaderBytes, 0);
  bytes += packetHeaderBytes;
  packets++;
  await slotFree[slot];
  if (failed) return;
  post({ type: 'roundDone', round, normal: packetNormal, zero: packetZero, bytes, packets });
}

/** Run the packet builder on private buffers until the JIT has compiled it. */
function warmUp(): void {
  const pages = 512;
  const ram = Buffer.alloc(pages * pageBytes);
  for (let p = 0; p < pages; p += 2) ram.fill((p & 0x7f) + 1, p * pageBytes, (p + 1) * pageBytes);
  const list = new Uint32Array(pages);
  const control = new Int32Array(1);
  const src: Source = { ram, refresh: () => ram, list, control, shadow: null, full: null };
  for (let rep = 0; rep < 24; rep++) {
    for (let p = 0; p < pages; p++) list[p] = p;
    src.full = rep % 2 === 0 ? { ranges: [[0, 100], [100, pages]] } : null;
    control[0] = 0;
    while (fillPacket(src, 0, 0, pages) !== null) {
      // discard
    }
  }
  packetNumber = 0;
}

port.on('message', (m: SendWorkerRequest) => {
  if (m.type === 'connect') {
    channel = m.channel;
    connect(m).then(
      (s) => {
        socket = s;
        s.on('data', () => fail(new MigrationError('MULTIFD_PROTOCOL', `multifd channel ${channel}: unexpected data from the destination`)));
        s.on('error', (err) => fail(new ChannelClosedError(`multifd channel ${channel}: ${err.message}`, { cause: err })));
        s.on('close', () => fail(new ChannelClosedError(`multifd channel ${channel}: the destination closed the connection`)));
        post({ type: 'connected' });
      },
      (err) => fail(err),
    );
  } else if (m.type === 'round') {
    runRound(m.round, m.count, m.bytesPerSecond, m.full, m.memory ?? d.memory).catch(fail);
  } else if (m.type === 'rate') {
    roundLimit?.set(m.bytesPerSecond);
  } else if (m.type === 'close') {
    closing = true;
    if (socket === null || socket.destroyed) {
      post({ type: 'closed' });
      return;
    }
    socket.once('close', () => post({ type: 'closed' }));
    socket.end();
  }
});

warmUp();
post({ type: 'ready' });
