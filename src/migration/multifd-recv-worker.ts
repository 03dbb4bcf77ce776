/**
 * A multifd receiver: one worker thread that listens for one channel of one migration,
 * checks the channel handshake (a channel of another migration is refused), then reads
 * packets and verifies them (header crc32, packet number, round order, fl64 of the page
 * numbers before any data is read, fl64 of the data, page numbers in range) and writes the
 * pages into guest RAM and/or a COLO cache, recording their numbers in a shared byte map when
 * asked. Each SYNC packet is reported to the main thread, which runs the round barrier.
 *
 * Reads go straight where the bytes belong: the header and numbers into staging, and the
 * data of a packet whose pages are contiguous directly into guest RAM (then summed there),
 * other data into staging and copied.
 */
import net from 'node:net';
import { parentPort, workerData } from 'node:worker_threads';
import { limits } from '../core/limits.js';
import { ChannelClosedError, ColoError, StreamError, TimeoutError, errorMessage } from '../core/errors.js';
import { Fl64, Fl64Over } from './checksum.js';
import {
  ChannelStatus,
  PacketFlags,
  channelHelloBytes,
  decodeChannelHello,
  decodePacketHeader,
  encodeChannelAnswer,
  encodePacket,
  multifdVersion,
  packetHeaderBytes,
  slotBytes,
  slotDataOffset,
  type ChannelStatusCode,
  type PacketHeader,
} from './multifd-format.js';
import { bufferOf, isZeroBytes, pageBytes, zeroRunPages } from './zero.js';

/** Where received pages go (COLO hook (b)): guest RAM, a cache, and a record of page numbers. */
export interface PageTarget {
  /** Write pages into guest RAM. */
  ram: boolean;
  /** Also write them into this cache (indexed like guest RAM), or null. */
  cache: SharedArrayBuffer | null;
  /** Set byte [page] to 1 (Atomics.store) for every page received, or null. */
  received: SharedArrayBuffer | null;
}

export interface RecvWorkerData {
  memory: WebAssembly.Memory;
  host: string;
  /** Guest RAM maximum, in 4 KiB pages: a page number at or above it is an error. */
  pagesMax: number;
  /** Int32 slot 0: guest RAM size in 4 KiB pages, raised (and notified) by the main thread when it grows RAM. */
  ramPages: SharedArrayBuffer;
  /**
   * Int32 slot 0: the last round whose barrier passed (every channel of it delivered its
   * SYNC, so all its pages are in place), raised (and notified) by the main thread.
   */
  roundsDone: SharedArrayBuffer;
  fl64: WebAssembly.Module;
  fl64Shared: WebAssembly.Module;
  /** Read through Node's user-buffer path (straight into place); false: 'data' events + copy. */
  userBufferReads: boolean;
  /** A connection that has not sent its whole hello within this time is closed (limits.multifdHelloTimeoutMs). */
  helloTimeoutMs: number;
  /** Connections without their hello at most; a new one past this closes the oldest (limits.multifdPendingConnectionsMax). */
  pendingConnectionsMax: number;
}

/** Which migration and channel this worker serves; sent once the source said hello. */
export interface RecvChannelConfig {
  migrationId: Uint8Array;
  channel: number;
  channels: number;
  target: PageTarget;
  /**
   * One byte per page of guest RAM: 0 = known to be zero (fresh memory the destination never
   * wrote), so a zero page there needs no work at all — reading untouched memory costs a page
   * fault per 4 KiB. Null: always check.
   */
  ramMaybeNonZero: SharedArrayBuffer | null;
}

export type RecvWorkerRequest =
  | { type: 'configure'; config: RecvChannelConfig }
  | { type: 'target'; target: PageTarget; id: number }
  | { type: 'close' };

export type RecvWorkerReply =
  | { type: 'listening'; port: number }
  | { type: 'configured' }
  | { type: 'connected' }
  | { type: 'refused'; status: number }
  | { type: 'sync'; round: number; pages: number; bytes: number }
  | { type: 'targetSet'; id: number }
  | { type: 'eof' }
  | { type: 'error'; code: string; message: string }
  /** A connection that was not (yet) a channel was closed: no hello in time, or too many such. */
  | { type: 'dropped'; level: 'info' | 'warn'; message: string }
  | { type: 'closed' };

const d = workerData as RecvWorkerData;
const port = parentPort!;
const post = (m: RecvWorkerReply): void => port.postMessage(m);

const fl = new Fl64(slotBytes, d.fl64);
const staging = fl.buffer();
const stagingView = new DataView(staging.buffer, staging.byteOffset, staging.byteLength);
const ramSum = new Fl64Over(d.memory, d.fl64Shared);
const ramPagesWord = new Int32Array(d.ramPages);
const roundsDoneWord = new Int32Array(d.roundsDone);

let config: RecvChannelConfig | null = null;
/** Where pages go; module state so that the warm-up can point it at private buffers. */
let ram = bufferOf(d.memory.buffer);
let target: PageTarget = { ram: true, cache: null, received: null };
let cache: Buffer | null = null;
let received: Uint8Array | null = null;
let maybeNonZero: Uint8Array | null = null;
let sumRam = (offset: number, length: number): bigint => ramSum.sum(offset, length);

let server: net.Server | null = null;
let channelSocket: net.Socket | null = null;
/** Accepted connections still reading their hello, oldest first. */
const pending = new Set<Connection>();
/** Since pending last was empty, a connection was dropped to make room (said once per such time). */
let pendingOverflowSaid = false;
let closing = false;
let failed = false;

// ---- parsing state ----
type Section = 'header' | 'numbers' | 'data';
let section: Section = 'header';
let need = packetHeaderBytes;
let filled = 0;
let header: PacketHeader | null = null;
/** Where the data section lands: staging (null) or guest RAM at this byte offset. */
let dataInRamAt: number | null = null;
let expectPacket = 0;
/**
 * Rounds are numbered 1, 2, 3...; a channel takes part in a round or skips it (a small round
 * uses only the first channels), and every round it takes part in ends with its SYNC. So a
 * channel's rounds only go up: the lowest round the next packet may start, and the round in
 * progress (0 between rounds).
 */
let minRound = 1;
let currentRound = 0;
let roundPages = 0;
let roundBytes = 0;

function fail(err: unknown): void {
  if (failed || closing) return;
  failed = true;
  const code = err instanceof ColoError ? err.code : 'CHANNEL_CLOSED';
  post({ type: 'error', code, message: `multifd channel ${config?.channel ?? '?'}: ${errorMessage(err)}` });
  channelSocket?.destroy();
  server?.close();
}

function applyTarget(t: PageTarget): void {
  target = t;
  cache = t.cache === null ? null : bufferOf(t.cache);
  received = t.received === null ? null : new Uint8Array(t.received);
}

function resetParser(): void {
  section = 'header';
  need = packetHeaderBytes;
  filled = 0;
  header = null;
  dataInRamAt = null;
  expectPacket = 0;
  minRound = 1;
  currentRound = 0;
  roundPages = 0;
  roundBytes = 0;
}

/** Where the next read should land. */
function readTarget(): Buffer {
  if (section === 'header') return staging.subarray(filled, need);
  if (section === 'numbers') return staging.subarray(packetHeaderBytes + filled, packetHeaderBytes + need);
  if (dataInRamAt !== null) return ram.subarray(dataInRamAt + filled, dataInRamAt + need);
  return staging.subarray(slotDataOffset + filled, slotDataOffset + need);
}

/** `n` more bytes of the current section arrived (in readTarget()). */
function advance(n: number): void {
  filled += n;
  while (!failed && filled === need) {
    filled = 0;
    if (section === 'header') {
      const h = decodePacketHeader(staging, 0);
      checkOrder(h);
      header = h;
      if (h.payloadBytes === 0) {
        finishPacket(h);
        continue;
      }
      section = 'numbers';
      need = 4 * (h.normal + h.zero);
    } else if (section === 'numbers') {
      const h = header!;
      checkNumbers(h);
      if (h.normal === 0) {
        finishPacket(h);
        section = 'header';
        need = packetHeaderBytes;
        continue;
      }
      dataInRamAt = directTarget(h);
      section = 'data';
      need = h.normal * pageBytes;
    } else {
      finishPacket(header!);
      section = 'header';
      need = packetHeaderBytes;
      dataInRamAt = null;
    }
  }
}

function checkOrder(h: PacketHeader): void {
  if (h.channel !== config!.channel) throw new StreamError('FRAME_INVALID', `packet ${h.packet} names channel ${h.channel}`);
  if (h.packet !== expectPacket) {
    throw new StreamError('FRAME_ORDER', `packet number ${h.packet} where ${expectPacket} was expected (reordered, dropped or repeated packet)`);
  }
  expectPacket = (expectPacket + 1) >>> 0;
  if (currentRound === 0) {
    if (h.round < minRound) throw new StreamError('FRAME_ORDER', `packet ${h.packet} belongs to round ${h.round}, below round ${minRound} (replayed round)`);
    waitForRound(h.round - 1);
    currentRound = h.round;
  } else if (h.round !== currentRound) {
    throw new StreamError('FRAME_ORDER', `packet ${h.packet} belongs to round ${h.round} where round ${currentRound} was in progress`);
  }
}

/** The numbers are in staging: verify them, range-check them, wait for RAM to hold them. */
function checkNumbers(h: PacketHeader): void {
  const count = h.normal + h.zero;
  if (fl.sum(packetHeaderBytes, 4 * count) !== h.numbersChecksum) {
    throw new StreamError('FRAME_CHECKSUM', `packet ${h.packet}: page numbers checksum mismatch (corrupted stream)`);
  }
  let highest = 0;
  for (let i = 0; i < count; i++) {
    const p = stagingView.getUint32(packetHeaderBytes + 4 * i, true);
    if (p >= d.pagesMax) throw new StreamError('FRAME_RANGE', `packet ${h.packet}: page ${p} is out of range (guest RAM has at most ${d.pagesMax} pages)`);
    if (p > highest) highest = p;
  }
  if (count > 0) waitForRam(highest);
}

/** Guest RAM offset where the data can be read in place (contiguous pages, RAM-only target), or null. */
function directTarget(h: PacketHeader): number | null {
  if (!target.ram || cache !== null || received !== null) return null;
  const first = stagingView.getUint32(packetHeaderBytes, true);
  for (let i = 1; i < h.normal; i++) {
    if (stagingView.getUint32(packetHeaderBytes + 4 * i, true) !== first + i) return null;
  }
  return first * pageBytes;
}

function finishPacket(h: PacketHeader): void {
  roundBytes += packetHeaderBytes + h.payloadBytes;
  if ((h.flags & PacketFlags.sync) !== 0) {
    post({ type: 'sync', round: h.round, pages: roundPages, bytes: roundBytes });
    minRound = h.round + 1;
    currentRound = 0;
    roundPages = 0;
    roundBytes = 0;
    return;
  }
  const numbersAt = packetHeaderBytes;
  if (h.normal > 0) {
    if (dataInRamAt !== null) {
      if (sumRam(dataInRamAt, h.normal * pageBytes) !== h.dataChecksum) {
        throw new StreamError('FRAME_CHECKSUM', `packet ${h.packet}: page data checksum mismatch (corrupted stream)`);
      }
      if (maybeNonZero !== null) maybeNonZero.fill(1, dataInRamAt / pageBytes, dataInRamAt / pageBytes + h.normal);
    } else {
      if (fl.sum(slotDataOffset, h.normal * pageBytes) !== h.dataChecksum) {
        throw new StreamError('FRAME_CHECKSUM', `packet ${h.packet}: page data checksum mismatch (corrupted stream)`);
      }
      for (let i = 0; i < h.normal; i++) {
        const p = stagingView.getUint32(numbersAt + 4 * i, true);
        const src = slotDataOffset + i * pageBytes;
        if (target.ram) {
          staging.copy(ram, p * pageBytes, src, src + pageBytes);
          if (maybeNonZero !== null) maybeNonZero[p] = 1;
        }
        if (cache !== null) staging.copy(cache, p * pageBytes, src, src + pageBytes);
        if (received !== null) Atomics.store(received, p, 1);
      }
    }
  }
  let i = 0;
  while (i < h.zero) {
    const at = numbersAt + 4 * (h.normal + i);
    const p = stagingView.getUint32(at, true);
    // A run is the listed numbers that follow on one by one (at most zeroRunPages): each is
    // checked, so a list out of order zeroes exactly the pages it names.
    let run = 1;
    while (run < zeroRunPages && i + run < h.zero && stagingView.getUint32(at + 4 * run, true) === p + run) run++;
    const off = p * pageBytes;
    const len = run * pageBytes;
    if (target.ram) zeroRamPages(p, run, off, len);
    if (cache !== null && !isZeroBytes(cache, off, len)) cache.fill(0, off, off + len);
    if (received !== null) for (let k = 0; k < run; k++) Atomics.store(received, p + k, 1);
    i += run;
  }
  roundPages += h.normal + h.zero;
}

function zeroRamPages(p: number, run: number, off: number, len: number): void {
  if (maybeNonZero !== null) {
    let known = true;
    for (let k = 0; k < run && known; k++) known = maybeNonZero[p + k] === 0;
    if (known) return;
    for (let k = 0; k < run; k++) maybeNonZero[p + k] = 0;
  }
  if (!isZeroBytes(ram, off, len)) ram.fill(0, off, off + len);
}

/**
 * A page may travel in round n on one channel and again in round n+1 on another. The source
 * starts round n+1 once it has written round n's SYNCs, not once they arrived, so this channel
 * can hold round n+1 while another still applies round n: applying now could let the older
 * copy land last. So the first packet of a round waits until the round before has passed its
 * barrier (as QEMU's receive threads wait at each sync). In COLO the next checkpoint follows
 * the barrier of the last anyway, so this never waits there.
 */
function waitForRound(round: number): void {
  waitForWord(roundsDoneWord, round, limits.multifdRoundOrderWaitMs, () => `round ${round + 1} arrived but round ${round} did not pass its barrier`);
}

/** Block until the main thread raised `word[0]` to at least `atLeast`; TimeoutError after `timeoutMs`. */
function waitForWord(word: Int32Array, atLeast: number, timeoutMs: number, what: () => string): void {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const have = Atomics.load(word, 0);
    if (have >= atLeast) return;
    const left = deadline - performance.now();
    if (left <= 0) throw new TimeoutError(`${what()} within ${timeoutMs} ms`);
    Atomics.wait(word, 0, have, left);
  }
}

/** The main thread grows guest RAM when the source announces it (ramSize frame); wait for that. */
function waitForRam(page: number): void {
  if ((page + 1) * pageBytes <= ram.byteLength) return;
  waitForWord(ramPagesWord, page + 1, limits.ramGrowWaitMs, () => `page ${page} arrived but guest RAM did not grow to hold it`);
  ram = bufferOf(d.memory.buffer);
  if (target.cache !== null) cache = bufferOf(target.cache);
}

// ---- connections ----

function answerAndClose(s: net.Socket, status: ChannelStatusCode): void {
  post({ type: 'refused', status });
  s.on('error', () => undefined);
  s.end(encodeChannelAnswer(status));
  setTimeout(() => s.destroy(), 1000).unref();
}

function checkHello(s: net.Socket, hello: Buffer): boolean {
  let h;
  try {
    h = decodeChannelHello(hello);
  } catch {
    s.destroy();
    return false;
  }
  const c = config;
  if (c === null) {
    s.destroy(); // nobody migrates yet: the source connects only after `ready`
    return false;
  }
  if (h.version !== multifdVersion) {
    answerAndClose(s, ChannelStatus.badVersion);
    return false;
  }
  if (!Buffer.from(h.migrationId).equals(Buffer.from(c.migrationId))) {
    answerAndClose(s, ChannelStatus.wrongMigration);
    return false;
  }
  if (h.channel !== c.channel || h.channels !== c.channels) {
    answerAndClose(s, ChannelStatus.badChannel);
    return false;
  }
  if (channelSocket !== null) {
    answerAndClose(s, ChannelStatus.duplicate);
    return false;
  }
  return true;
}

function adopt(s: net.Socket): void {
  channelSocket = s;
  s.setNoDelay(true);
  s.write(encodeChannelAnswer(ChannelStatus.accepted));
  server?.close();
  server = null;
  resetParser();
  post({ type: 'connected' });
}

/** One accepted connection: it reads the hello, then (if it is our channel) packets. */
class Connection {
  socket: net.Socket | null = null;
  readonly hello = Buffer.alloc(channelHelloBytes);
  helloFilled = 0;
  private helloTimer: NodeJS.Timeout | null = null;

  /**
   * Bound the wait for the hello: the connection is closed after d.helloTimeoutMs, and at most
   * d.pendingConnectionsMax wait at once (the oldest is closed for a new one: a source that
   * connects now is not kept out by idle peers).
   */
  private awaitHello(s: net.Socket): void {
    if (pending.size >= d.pendingConnectionsMax) {
      const oldest = pending.values().next().value as Connection;
      oldest.drop();
      if (!pendingOverflowSaid) {
        pendingOverflowSaid = true;
        post({ type: 'dropped', level: 'warn', message: `more than ${d.pendingConnectionsMax} connections without a channel hello: the oldest are closed` });
      }
    }
    pending.add(this);
    const peer = `${s.remoteAddress ?? '?'}:${s.remotePort ?? '?'}`;
    this.helloTimer = setTimeout(() => {
      this.helloTimer = null;
      this.drop();
      post({ type: 'dropped', level: 'info', message: `closed a connection from ${peer} that sent no channel hello within ${d.helloTimeoutMs} ms` });
    }, d.helloTimeoutMs);
    this.helloTimer.unref();
    s.once('close', () => this.helloDone());
  }

  /** The hello is complete (or the connection gone): no longer bounded as a pending one. */
  helloDone(): void {
    if (this.helloTimer !== null) clearTimeout(this.helloTimer);
    this.helloTimer = null;
    pending.delete(this);
    if (pending.size === 0) pendingOverflowSaid = false;
  }

  drop(): void {
    this.helloDone();
    this.socket?.destroy();
  }

  /** Where the next read lands (user-buffer mode). */
  buffer(): Uint8Array {
    return this.socket !== null && this.socket === channelSocket ? readTarget() : this.hello.subarray(this.helloFilled);
  }

  /** `n` bytes arrived in buffer() (user-buffer mode); false stops reading. */
  onRead(n: number): boolean {
    if (failed || this.socket === null) return false;
    if (this.socket !== channelSocket) {
      this.helloFilled += n;
      if (this.helloFilled < channelHelloBytes) return true;
      this.helloDone();
      if (!checkHello(this.socket, this.hello)) return false;
      adopt(this.socket);
      return true;
    }
    try {
      advance(n);
    } catch (err) {
      fail(err);
      return false;
    }
    return !failed;
  }

  /** A chunk from a 'data' event (fallback mode): copied into place. */
  onChunk(chunk: Buffer): void {
    const s = this.socket!;
    let at = 0;
    if (s !== channelSocket) {
      const n = Math.min(channelHelloBytes - this.helloFilled, chunk.byteLength);
      chunk.copy(this.hello, this.helloFilled, 0, n);
      this.helloFilled += n;
      at = n;
      if (this.helloFilled < channelHelloBytes) return;
      this.helloDone();
      if (!checkHello(s, this.hello)) return;
      adopt(s);
    }
    try {
      while (at < chunk.byteLength && !failed) {
        const dst = readTarget();
        const n = Math.min(dst.byteLength, chunk.byteLength - at);
        chunk.copy(dst, 0, at, at + n);
        at += n;
        advance(n);
      }
    } catch (err) {
      fail(err);
    }
  }

  attach(s: net.Socket, userBuffer: boolean): void {
    this.socket = s;
    s.on('error', (err) => {
      if (s === channelSocket) fail(new ChannelClosedError(`the connection failed: ${err.message}`, { cause: err }));
    });
    s.on('end', () => {
      if (s !== channelSocket) return;
      if (filled > 0 || section !== 'header') fail(new StreamError('STREAM_TRUNCATED', `the stream ended inside packet ${expectPacket - 1}`));
      else if (!closing && !failed) post({ type: 'eof' });
    });
    if (!userBuffer) s.on('data', (chunk: Buffer) => this.onChunk(chunk));
    this.awaitHello(s);
  }
}

/**
 * Node gives the user-buffer read path (`onread`) only to sockets it creates for connect().
 * For an accepted connection we create the Socket from the accepted handle ourselves, as
 * net.Server's own connection callback does, so that reads go straight into place instead
 * of through a fresh 64 KiB buffer and a 'data' event each. If Node's internals ever differ,
 * the ordinary 'connection' path (with one copy more) is used.
 */
function listen(): void {
  const srv = net.createServer({ noDelay: true });
  server = srv;
  srv.on('error', (err) => fail(new ChannelClosedError(`cannot listen on ${d.host}: ${err.message}`)));
  srv.listen({ host: d.host === '' ? undefined : d.host, port: 0 }, () => {
    const handle = (srv as unknown as { _handle?: { onconnection?: unknown } })._handle;
    if (d.userBufferReads && handle !== undefined && typeof handle.onconnection === 'function') {
      handle.onconnection = (err: number, clientHandle: unknown): void => {
        if (err !== 0 || clientHandle === undefined || closing || failed) return;
        const conn = new Connection();
        const socket = new net.Socket({
          handle: clientHandle,
          readable: true,
          writable: true,
          onread: { buffer: () => conn.buffer(), callback: (n: number) => conn.onRead(n) },
        } as net.SocketConstructorOpts);
        conn.attach(socket, true);
      };
    } else {
      srv.on('connection', (s) => {
        if (closing || failed) s.destroy();
        else new Connection().attach(s, false);
      });
    }
    const a = srv.address();
    post({ type: 'listening', port: typeof a === 'object' && a !== null ? a.port : 0 });
  });
}

/** Run packets through the parser into private buffers until the JIT has compiled it. */
function warmUp(): void {
  const pages = 256;
  const privateSum = new Fl64(pages * pageBytes + 65536, d.fl64);
  const saved = { ram, sumRam };
  ram = privateSum.buffer().subarray(0, pages * pageBytes);
  sumRam = (o, l) => privateSum.sum(o, l);
  config = { migrationId: new Uint8Array(16), channel: 0, channels: 1, target, ramMaybeNonZero: null };
  const feed = (bytes: Buffer): void => {
    let at = 0;
    while (at < bytes.byteLength) {
      const dst = readTarget();
      const n = Math.min(dst.byteLength, bytes.byteLength - at);
      bytes.copy(dst, 0, at, at + n);
      at += n;
      advance(n);
    }
  };
  const packet = (packetNo: number, numbers: number[], normal: number, data: Buffer): Buffer =>
    encodePacket({ flags: 0, channel: 0, packet: packetNo, round: 1 }, numbers, normal, data, d.fl64);
  resetParser();
  const data = Buffer.alloc(64 * pageBytes, 7);
  const contiguous = packet(0, Array.from({ length: 96 }, (_, i) => i), 64, data);
  const scattered = packet(0, Array.from({ length: 96 }, (_, i) => (i < 64 ? i * 2 : 200 + i - 64)), 64, data);
  for (let rep = 0; rep < 40; rep++) {
    resetParser();
    feed(rep % 2 === 0 ? contiguous : scattered);
  }
  resetParser();
  config = null;
  ram = saved.ram;
  sumRam = saved.sumRam;
}

port.on('message', (m: RecvWorkerRequest) => {
  if (m.type === 'configure') {
    config = m.config;
    applyTarget(m.config.target);
    maybeNonZero = m.config.ramMaybeNonZero === null ? null : new Uint8Array(m.config.ramMaybeNonZero);
    ram = bufferOf(d.memory.buffer);
    post({ type: 'configured' });
  } else if (m.type === 'target') {
    applyTarget(m.target);
    post({ type: 'targetSet', id: m.id });
  } else if (m.type === 'close') {
    closing = true;
    server?.close();
    for (const c of [...pending]) c.drop();
    const s = channelSocket;
    if (s === null || s.destroyed) {
      post({ type: 'closed' });
      return;
    }
    s.once('close', () => post({ type: 'closed' }));
    s.destroy();
  }
});

warmUp();
listen();
