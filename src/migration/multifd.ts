import { Worker } from 'node:worker_threads';
import { limits } from '../core/limits.js';
import { ChannelClosedError, ColoError, MigrationError, StreamError } from '../core/errors.js';
import { logger } from '../core/log.js';
import { fl64Module, fl64SharedModule } from './checksum.js';
import type { FullRound, SendWorkerData, SendWorkerReply, SendWorkerRequest } from './multifd-send-worker.js';

export type { FullRound } from './multifd-send-worker.js';
import type { PageTarget, RecvChannelConfig, RecvWorkerData, RecvWorkerReply, RecvWorkerRequest } from './multifd-recv-worker.js';

export type { PageTarget } from './multifd-recv-worker.js';

const log = logger('multifd');

function workerError(r: { code: string; message: string }): ColoError {
  if (r.code.startsWith('FRAME_') || r.code.startsWith('STREAM_')) return new StreamError(r.code, r.message);
  if (r.code === 'CHANNEL_CLOSED') return new ChannelClosedError(r.message);
  return new MigrationError(r.code, r.message);
}

export interface MultifdRoundStats {
  normalPages: number;
  zeroPages: number;
  bytes: number;
  packets: number;
  /** Channels that took part (the first `channels`; each ended the round with a SYNC). */
  channels: number;
}

/**
 * The source's multifd channels: one worker thread and one TCP connection each
 * (multifd-send-worker.ts). The page list of a round lives in shared memory; the workers take
 * batches from a shared cursor, so a faster channel takes more of the round.
 */
export class MultifdSender {
  private readonly workers: Worker[] = [];
  private readonly list: SharedArrayBuffer;
  private readonly listView: Uint32Array;
  private readonly control: Int32Array;
  private failure: Error | null = null;
  private readonly failureListeners = new Set<(err: Error) => void>();
  private roundWaiters: ((r: SendWorkerReply) => void)[] = [];
  private closed = false;
  /** connect()s waiting for their workers: destroy() ends them. */
  private readonly closeListeners = new Set<() => void>();
  private readonly progress: ({ round: number; bytes: number } | undefined)[] = [];

  private constructor(readonly channels: number, pagesMax: number) {
    this.list = new SharedArrayBuffer(Math.max(1, pagesMax) * 4);
    this.listView = new Uint32Array(this.list);
    this.control = new Int32Array(new SharedArrayBuffer(16));
  }

  /**
   * Start the worker threads (they warm up and wait); `connect` later. Spawning early (when
   * the multifd capability is set, or while the main channel handshakes) keeps thread
   * start-up out of the migration.
   */
  static spawn(opts: { memory: WebAssembly.Memory; channels: number; pagesMax: number; shadow: SharedArrayBuffer | null }): MultifdSender {
    const s = new MultifdSender(opts.channels, opts.pagesMax);
    const module = fl64Module();
    const ready: Promise<void>[] = [];
    for (let ch = 0; ch < opts.channels; ch++) {
      const data: SendWorkerData = {
        memory: opts.memory,
        shadow: opts.shadow,
        list: s.list,
        control: s.control.buffer as SharedArrayBuffer,
        fl64: module,
      };
      const w = new Worker(new URL('./multifd-send-worker.js', import.meta.url), { workerData: data });
      s.workers.push(w);
      ready.push(
        new Promise<void>((resolve, reject) => {
          w.on('message', (m: SendWorkerReply) => {
            if (m.type === 'ready') resolve();
          });
          w.once('error', (err) => reject(new MigrationError('MULTIFD_WORKER', `multifd sender ${ch} crashed: ${err.message}`)));
          w.once('exit', () => reject(new MigrationError('MULTIFD_WORKER', `multifd sender ${ch} exited`)));
        }),
      );
      w.on('message', (m: SendWorkerReply) => s.onMessage(ch, m));
      w.on('error', (err) => s.fail(new MigrationError('MULTIFD_WORKER', `multifd sender ${ch} crashed: ${err.message}`)));
      w.on('exit', () => {
        if (!s.closed) s.fail(new MigrationError('MULTIFD_WORKER', `multifd sender ${ch} exited`));
      });
    }
    s.ready = Promise.all(ready).then(() => undefined);
    s.ready.catch(() => undefined);
    return s;
  }

  /** Resolves when every worker started (and warmed up). */
  ready: Promise<void> = Promise.resolve();

  /** Connect every channel (handshake included) to the destination's ports. */
  async connect(host: string, ports: number[], migrationId: Uint8Array): Promise<void> {
    if (ports.length !== this.workers.length) throw new MigrationError('MULTIFD_CHANNELS', `${ports.length} ports for ${this.workers.length} channels`);
    await this.ready;
    await Promise.all(
      this.workers.map(
        (w, ch) =>
          new Promise<void>((resolve, reject) => {
            // A worker ended by destroy() (a cancel while connecting) never answers.
            if (this.closed) {
              reject(new ChannelClosedError('the multifd channels were closed while connecting'));
              return;
            }
            const onClosed = (): void => {
              w.off('message', onMessage);
              reject(new ChannelClosedError('the multifd channels were closed while connecting'));
            };
            this.closeListeners.add(onClosed);
            const onMessage = (m: SendWorkerReply): void => {
              if (m.type === 'connected' || m.type === 'error') this.closeListeners.delete(onClosed);
              if (m.type === 'connected') {
                w.off('message', onMessage);
                resolve();
              } else if (m.type === 'error') {
                w.off('message', onMessage);
                reject(workerError(m));
              }
            };
            w.on('message', onMessage);
            w.postMessage({ type: 'connect', host, port: ports[ch]!, migrationId, channel: ch, channels: ports.length } satisfies SendWorkerRequest);
          }),
      ),
    );
  }

  /** spawn + connect. */
  static async connect(opts: {
    memory: WebAssembly.Memory;
    host: string;
    ports: number[];
    migrationId: Uint8Array;
    pagesMax: number;
    shadow: SharedArrayBuffer | null;
  }): Promise<MultifdSender> {
    const s = MultifdSender.spawn({ memory: opts.memory, channels: opts.ports.length, pagesMax: opts.pagesMax, shadow: opts.shadow });
    try {
      await s.connect(opts.host, opts.ports, opts.migrationId);
    } catch (err) {
      await s.destroy();
      throw err;
    }
    return s;
  }

  onFailure(listener: (err: Error) => void): void {
    this.failureListeners.add(listener);
  }

  /** Grows with every report of packets written (progress, round done): a stalled channel stops it. */
  activity = 0;

  private onMessage(ch: number, m: SendWorkerReply): void {
    if (m.type === 'error') this.fail(workerError(m));
    else if (m.type === 'roundDone') {
      this.activity++;
      for (const w of this.roundWaiters) w(m);
    } else if (m.type === 'progress') {
      this.activity++;
      this.progress[ch] = { round: m.round, bytes: m.bytes };
    }
  }

  /** Bytes the channels reported written so far in `round` (progress, not exact). */
  roundBytes(round: number): number {
    let n = 0;
    for (const p of this.progress) if (p !== undefined && p.round === round) n += p.bytes;
    return n;
  }

  private fail(err: Error): void {
    if (this.failure !== null || this.closed) return;
    this.failure = err;
    for (const l of this.failureListeners) l(err);
    for (const w of this.roundWaiters) w({ type: 'error', code: 'FAILED', message: err.message });
  }

  get failed(): Error | null {
    return this.failure;
  }

  /**
   * Send round `round` on all channels, each channel ending with SYNC(round); resolves when
   * every channel has written its SYNC. `fill` writes the page list entries (ascending) into
   * the shared list and returns their count — or, for a full round, names the ranges of pages
   * and the maps that tell never-written pages (the workers make the entries themselves).
   */
  async sendRound(round: number, fill: ((list: Uint32Array) => number) | FullRound, bytesPerSecond: number): Promise<MultifdRoundStats> {
    return (await this.startRound(round, fill, bytesPerSecond)).done;
  }

  /** The round being sent: the next one waits for it (the page list and cursor are shared). */
  private lastRound: Promise<unknown> = Promise.resolve();

  /**
   * Hand round `round` to its channels and return at once with how many take part; `done`
   * resolves when each wrote its SYNC. The caller may go on (a COLO checkpoint sends roundEnd
   * and the device state meanwhile: the destination's barrier waits for the SYNCs anyway).
   */
  /** `memory`: read the pages from this copy of guest RAM (same offsets) instead of guest RAM. */
  async startRound(round: number, fill: ((list: Uint32Array) => number) | FullRound, bytesPerSecond: number, memory?: WebAssembly.Memory): Promise<{ channels: number; done: Promise<MultifdRoundStats> }> {
    await this.lastRound.catch(() => undefined);
    if (this.failure !== null) throw this.failure;
    const full = typeof fill === 'function' ? null : fill;
    const count = full === null ? (fill as (list: Uint32Array) => number)(this.listView) : full.ranges.reduce((n, [a, b]) => n + (b - a), 0);
    Atomics.store(this.control, 0, 0);
    // A round wakes only the channels its pages fill (a checkpoint of a few dozen pages is one
    // packet: handing it to every worker and waiting for every SYNC costs more than it
    // carries); the destination learns the count from roundEnd. Full rounds use them all.
    const k = full !== null ? this.workers.length : Math.min(this.workers.length, Math.ceil(count / limits.pagesPerPacketMax));
    const workers = this.workers.slice(0, k);
    if (k === 0) return { channels: 0, done: Promise.resolve({ normalPages: 0, zeroPages: 0, bytes: 0, packets: 0, channels: 0 }) };
    const done = new Promise<MultifdRoundStats>((resolve, reject) => {
      const stats: MultifdRoundStats = { normalPages: 0, zeroPages: 0, bytes: 0, packets: 0, channels: k };
      let left = workers.length;
      const waiter = (m: SendWorkerReply): void => {
        if (m.type === 'error') {
          this.roundWaiters = this.roundWaiters.filter((w) => w !== waiter);
          reject(this.failure ?? workerError(m));
          return;
        }
        if (m.type !== 'roundDone' || m.round !== round) return;
        stats.normalPages += m.normal;
        stats.zeroPages += m.zero;
        stats.bytes += m.bytes;
        stats.packets += m.packets;
        if (--left === 0) {
          this.roundWaiters = this.roundWaiters.filter((w) => w !== waiter);
          resolve(stats);
        }
      };
      this.roundWaiters.push(waiter);
    });
    this.roundWorkers = workers;
    const perChannel = bytesPerSecond > 0 ? bytesPerSecond / workers.length : 0;
    for (const w of workers) w.postMessage({ type: 'round', round, count, bytesPerSecond: perChannel, full, ...(memory !== undefined ? { memory } : {}) } satisfies SendWorkerRequest);
    this.lastRound = done;
    // A worker's failure also reaches the session through onFailure; whoever awaits done sees it too.
    done.catch(() => undefined);
    return { channels: k, done };
  }

  /** The channels of the last round handed out. */
  private roundWorkers: Worker[] = [];

  /**
   * max-bandwidth changed: the round being sent uses it from now on, shared among its
   * channels (a worker that has finished the round ignores it; the next round is given its rate).
   */
  setBandwidth(bytesPerSecond: number): void {
    if (this.closed || this.roundWorkers.length === 0) return;
    const perChannel = bytesPerSecond > 0 ? bytesPerSecond / this.roundWorkers.length : 0;
    for (const w of this.roundWorkers) w.postMessage({ type: 'rate', bytesPerSecond: perChannel } satisfies SendWorkerRequest);
  }

  /** End the connections after what was written (bounded), then stop the workers. */
  async close(timeoutMs = 2000): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all(
      this.workers.map(
        (w) =>
          new Promise<void>((resolve) => {
            const timer = setTimeout(resolve, timeoutMs);
            w.on('message', (m: SendWorkerReply) => {
              if (m.type === 'closed') {
                clearTimeout(timer);
                resolve();
              }
            });
            w.postMessage({ type: 'close' } satisfies SendWorkerRequest);
          }),
      ),
    );
    await Promise.all(this.workers.map((w) => w.terminate()));
  }

  /** Stop at once (the sockets die with the workers). */
  async destroy(): Promise<void> {
    this.closed = true;
    for (const l of [...this.closeListeners]) l();
    this.closeListeners.clear();
    // A round still being sent (a channel stalled) ends with the channels, not never.
    for (const w of this.roundWaiters) w({ type: 'error', code: 'CHANNEL_CLOSED', message: 'the multifd channels were closed' });
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

/**
 * The destination's multifd channels: one worker per channel, each listening on its own port
 * (announced to the source in the `ready` reply) and writing pages straight into guest RAM or
 * the COLO cache. `barrier(round)` resolves once every channel delivered SYNC(round).
 */
export class MultifdReceiver {
  private readonly workers: Worker[] = [];
  readonly ports: number[] = [];
  private readonly synced: Map<number, { channels: number; pages: number; bytes: number }> = new Map();
  private failure: Error | null = null;
  private barrierWaiter: { round: number; channels: number; resolve: (r: { pages: number; bytes: number }) => void; reject: (e: Error) => void } | null = null;
  private readonly failureListeners = new Set<(err: Error) => void>();
  private targetId = 0;
  private targetAcks = new Map<number, { left: number; resolve: () => void }>();
  private closed = false;
  /** A worker thread exited: it answers nothing any more. */
  private workersGone = false;
  private connectedCount = 0;
  /** Channels that ended (clean EOF or an error), and whoever waits for all of them to. */
  private readonly endedChannels = new Set<number>();
  private endWaiters: (() => void)[] = [];
  /** Each channel's last SYNC round: a channel that ended before the awaited round's SYNC fails the barrier. */
  private readonly lastSync = new Map<number, number>();
  /** The first error that names a cause more precise than a closed connection. */
  private preciseFailure: Error | null = null;

  /** The RAM-size word the workers wait on (IncomingSession publishes guest RAM growth there). */
  ramPages: SharedArrayBuffer = new SharedArrayBuffer(4);
  /** The last round whose barrier passed: a worker starts applying round n only after n-1 (multifd-recv-worker.ts waitForRound). */
  private readonly roundsDone = new Int32Array(new SharedArrayBuffer(4));

  private constructor(readonly channels: number) {
  }

  /**
   * Start `channels` workers listening on `host` (ephemeral ports); `configure` them once the
   * source said which migration it is. Spawned when the destination starts listening, so
   * that thread start-up is not part of the migration.
   */
  static async spawn(opts: {
    memory: WebAssembly.Memory;
    host: string;
    channels: number;
    pagesMax: number;
    ramPages: SharedArrayBuffer;
    /** Default limits.multifdHelloTimeoutMs. */
    helloTimeoutMs?: number;
    /** Default limits.multifdPendingConnectionsMax. */
    pendingConnectionsMax?: number;
  }): Promise<MultifdReceiver> {
    const r = new MultifdReceiver(opts.channels);
    r.ramPages = opts.ramPages;
    const listening: Promise<number>[] = [];
    for (let ch = 0; ch < opts.channels; ch++) {
      const data: RecvWorkerData = {
        memory: opts.memory,
        host: opts.host,
        pagesMax: opts.pagesMax,
        ramPages: opts.ramPages,
        roundsDone: r.roundsDone.buffer as SharedArrayBuffer,
        fl64: fl64Module(),
        fl64Shared: fl64SharedModule(),
        userBufferReads: process.env.COLO_MULTIFD_COPY_READS === undefined,
        helloTimeoutMs: opts.helloTimeoutMs ?? limits.multifdHelloTimeoutMs,
        pendingConnectionsMax: opts.pendingConnectionsMax ?? limits.multifdPendingConnectionsMax,
      };
      const w = new Worker(new URL('./multifd-recv-worker.js', import.meta.url), { workerData: data });
      r.workers.push(w);
      listening.push(
        new Promise<number>((resolve, reject) => {
          w.on('message', (m: RecvWorkerReply) => {
            if (m.type === 'listening') resolve(m.port);
            else if (m.type === 'error') reject(workerError(m));
          });
          w.once('exit', () => reject(new MigrationError('MULTIFD_WORKER', `multifd receiver ${ch} exited before listening`)));
        }),
      );
      w.on('message', (m: RecvWorkerReply) => r.onMessage(ch, m));
      w.on('error', (err) => r.fail(new MigrationError('MULTIFD_WORKER', `multifd receiver ${ch} crashed: ${err.message}`)));
      w.on('exit', () => {
        r.workersGone = true;
        r.endTargets();
        if (!r.closed) r.fail(new MigrationError('MULTIFD_WORKER', `multifd receiver ${ch} exited`));
      });
    }
    try {
      r.ports.push(...(await Promise.all(listening)));
    } catch (err) {
      await r.destroy();
      throw err;
    }
    return r;
  }

  /** Tell every worker which migration and channel it serves and where pages go. */
  async configure(migrationId: Uint8Array, target: PageTarget, ramMaybeNonZero: SharedArrayBuffer | null): Promise<void> {
    await Promise.all(
      this.workers.map(
        (w, ch) =>
          new Promise<void>((resolve) => {
            const onMessage = (m: RecvWorkerReply): void => {
              if (m.type === 'configured') {
                w.off('message', onMessage);
                resolve();
              }
            };
            w.on('message', onMessage);
            const config: RecvChannelConfig = { migrationId, channel: ch, channels: this.channels, target, ramMaybeNonZero };
            w.postMessage({ type: 'configure', config } satisfies RecvWorkerRequest);
          }),
      ),
    );
  }

  /** spawn + configure. */
  static async start(opts: {
    memory: WebAssembly.Memory;
    host: string;
    migrationId: Uint8Array;
    channels: number;
    pagesMax: number;
    ramPages: SharedArrayBuffer;
    ramMaybeNonZero: SharedArrayBuffer | null;
    target: PageTarget;
    helloTimeoutMs?: number;
    pendingConnectionsMax?: number;
  }): Promise<MultifdReceiver> {
    const r = await MultifdReceiver.spawn(opts);
    await r.configure(opts.migrationId, opts.target, opts.ramMaybeNonZero);
    return r;
  }

  onFailure(listener: (err: Error) => void): void {
    this.failureListeners.add(listener);
  }

  /** Channels that completed their handshake. */
  get connected(): number {
    return this.connectedCount;
  }

  private onMessage(ch: number, m: RecvWorkerReply): void {
    switch (m.type) {
      case 'connected':
        this.connectedCount++;
        return;
      case 'refused':
        log.info(`multifd channel ${ch}: refused a connection (${m.status === 1 ? 'another migration' : `status ${m.status}`})`);
        return;
      case 'dropped':
        // Not the migration's failure: a peer that is not (yet) one of its channels.
        log[m.level](`multifd channel ${ch}: ${m.message}`);
        return;
      case 'sync': {
        this.lastSync.set(ch, m.round);
        const s = this.synced.get(m.round) ?? { channels: 0, pages: 0, bytes: 0 };
        s.channels++;
        s.pages += m.pages;
        s.bytes += m.bytes;
        this.synced.set(m.round, s);
        this.checkBarrier();
        return;
      }
      case 'targetSet': {
        const a = this.targetAcks.get(m.id);
        if (a !== undefined && --a.left === 0) {
          this.targetAcks.delete(m.id);
          a.resolve();
        }
        return;
      }
      case 'eof':
        // the source closed a channel cleanly: the main channel says whether that was expected
        this.channelEnded(ch);
        return;
      case 'error': {
        const err = workerError(m);
        if (m.code !== 'CHANNEL_CLOSED') this.preciseFailure ??= err;
        // Failed first: the barrier a channel's end checks would otherwise fail with its own
        // 'ended before the end of round' (a break, which the destination then holds as a
        // possible cancel) in place of this error.
        this.fail(err);
        this.channelEnded(ch);
        return;
      }
      default:
        return;
    }
  }

  private channelEnded(ch: number): void {
    this.endedChannels.add(ch);
    this.checkBarrier();
    if (this.endedChannels.size < this.connectedCount) return;
    const waiters = this.endWaiters;
    this.endWaiters = [];
    for (const w of waiters) w();
  }

  /**
   * The cause of a failed migration, preferring a channel's own verdict (a corrupt, truncated
   * or reordered packet) over "the connection closed", which is what every other channel sees
   * once the source gives up.
   */
  get cause(): Error | null {
    return this.preciseFailure ?? this.failure;
  }

  /**
   * Resolves once every connected channel has ended (EOF or an error), or after `timeoutMs`.
   * When the main channel closes, a multifd channel's own error may still be on its way from
   * its worker; waiting for it lets the destination name the real cause.
   */
  whenChannelsEnded(timeoutMs: number): Promise<void> {
    if (this.endedChannels.size >= this.connectedCount) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(done, timeoutMs);
      function done(): void {
        clearTimeout(timer);
        resolve();
      }
      this.endWaiters.push(done);
    });
  }

  private checkBarrier(): void {
    const b = this.barrierWaiter;
    if (b === null) return;
    const s = this.synced.get(b.round) ?? (b.channels === 0 ? { channels: 0, pages: 0, bytes: 0 } : undefined);
    if (s === undefined || s.channels < b.channels) {
      // A channel the round needs ended (cleanly, between packets) without its SYNC: the SYNC
      // can never come, and waiting would hang the destination.
      for (const ch of this.endedChannels) {
        if (ch < b.channels && (this.lastSync.get(ch) ?? 0) < b.round) {
          this.fail(new StreamError('STREAM_TRUNCATED', `multifd channel ${ch} ended before the end of round ${b.round}`));
          return;
        }
      }
      return;
    }
    this.synced.delete(b.round);
    this.barrierWaiter = null;
    if (b.round > Atomics.load(this.roundsDone, 0)) {
      Atomics.store(this.roundsDone, 0, b.round);
      Atomics.notify(this.roundsDone, 0);
    }
    b.resolve({ pages: s.pages, bytes: s.bytes });
  }

  private fail(err: Error): void {
    if (this.failure !== null || this.closed) return;
    this.failure = err;
    for (const l of this.failureListeners) l(err);
    const b = this.barrierWaiter;
    this.barrierWaiter = null;
    b?.reject(err);
  }

  /** Resolves with the pages and bytes of `round` once its channels (the first `channels`; -1: all) delivered SYNC(round). */
  barrier(round: number, channels = -1): Promise<{ pages: number; bytes: number }> {
    if (this.failure !== null) return Promise.reject(this.failure);
    if (this.barrierWaiter !== null) return Promise.reject(new MigrationError('MULTIFD_BARRIER', 'one barrier at a time'));
    // Channels may be rounds ahead (the source does not wait for the barrier); each round's
    // SYNCs are recorded, and the workers check that rounds come in order.
    return new Promise((resolve, reject) => {
      this.barrierWaiter = { round, channels: channels < 0 ? this.channels : Math.min(channels, this.channels), resolve, reject };
      this.checkBarrier();
    });
  }

  /**
   * Redirect received pages (COLO hook); resolves once every worker applies it, or once the
   * workers are ended (destroy, close, one exited): no page comes from them any more, and a
   * thread that is gone never answers (the secondary's COLO start, and a takeover that waits
   * for it, hung on a yank at the hand-off).
   */
  setTarget(target: PageTarget): Promise<void> {
    if (this.closed || this.workersGone) return Promise.resolve();
    const id = ++this.targetId;
    return new Promise((resolve) => {
      this.targetAcks.set(id, { left: this.workers.length, resolve });
      for (const w of this.workers) w.postMessage({ type: 'target', target, id } satisfies RecvWorkerRequest);
    });
  }

  /** The workers are ended (or one is): what waits for their answer to setTarget settles. */
  private endTargets(): void {
    for (const a of this.targetAcks.values()) a.resolve();
    this.targetAcks.clear();
  }

  async close(timeoutMs = 2000): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.endTargets();
    const b = this.barrierWaiter;
    this.barrierWaiter = null;
    b?.reject(new ChannelClosedError('the multifd channels were closed'));
    await Promise.all(
      this.workers.map(
        (w) =>
          new Promise<void>((resolve) => {
            const timer = setTimeout(resolve, timeoutMs);
            w.on('message', (m: RecvWorkerReply) => {
              if (m.type === 'closed') {
                clearTimeout(timer);
                resolve();
              }
            });
            w.postMessage({ type: 'close' } satisfies RecvWorkerRequest);
          }),
      ),
    );
    await Promise.all(this.workers.map((w) => w.terminate()));
  }

  async destroy(): Promise<void> {
    this.closed = true;
    this.endTargets();
    const b = this.barrierWaiter;
    this.barrierWaiter = null;
    b?.reject(new ChannelClosedError('the multifd channels were closed'));
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

