import net from 'node:net';
import { assert } from '../core/assert.js';
import { ChannelClosedError, ColoError, ImageLockError, StreamError, UsageError, errorMessage } from '../core/errors.js';
import { logger } from '../core/log.js';
import { limits } from '../core/limits.js';
import type { Machine } from '../machine/machine.js';
import { MainChannel } from './channel.js';
import { checkDeviceRam } from './ram-digest.js';
import { DestinationCore, type DestinationAction, type DestinationEvent, type FrameSummary } from './destination-core.js';
import { parseMigrationId } from './multifd-format.js';
import type { MigrationCapabilities } from './params.js';
import type { MultifdReceiver } from './multifd.js';
import { IncomingSession } from './session.js';
import type { MigrationStats } from './status.js';
import { coloWireVersion, FrameType, frameTypeName, parseJsonPayload, streamVersion, type Frame } from './stream.js';
import { decodeZeroRanges } from './ram.js';

const log = logger('migration');

/** What the destination driver needs from the VM process (control/vm.ts implements it). */
export interface IncomingHost {
  readonly machine: Machine;
  /** After `go`: serve clients on the --net address and, if `run`, run the VM. */
  startRunning(run: boolean): Promise<void>;
  event(name: string, data?: Record<string, unknown>): void;
  /** The migration ended without this VM running (failed or cancelled). */
  ended(status: 'failed' | 'cancelled', message: string): void;
  /** The process is exiting (quit, SIGTERM): a migration that breaks off now is expected. */
  readonly exiting?: boolean;
}

export interface IncomingOptions {
  host: string;
  port: number;
  capabilities: MigrationCapabilities;
  /** Multifd receiver threads started when listening began (see MultifdReceiver.spawn). */
  receivers?: MultifdReceiver | null;
  /**
   * COLO hook (a), destination side: when the source asks for x-colo, the session is handed
   * over once the state is loaded (the VM not started) instead of waiting for `go`.
   */
  onHandoff?: (session: IncomingSession, migration: IncomingMigration) => void;
  /** COLO hook, destination side: the session was created, before any frame was read (the RAM cache attaches here). */
  onSession?: (session: IncomingSession) => void;
  /** How long a connected source may take to send its hello and setup (default limits.migrationHandshakeTimeoutMs). */
  helloTimeoutMs?: number;
}

/**
 * `--incoming tcp:HOST:PORT` / `migrate-incoming`: listens, accepts one source, and runs
 * DestinationCore over the frames of the main channel, one at a time: a frame is applied only
 * after the core accepted it, and the machine starts only after `end` was verified, the device
 * state loaded and the source said `go`.
 */
export class IncomingMigration {
  readonly core: DestinationCore;
  session: IncomingSession | null = null;
  private server: net.Server | null = null;
  private currentFrame: Frame | null = null;
  private ended = false;

  constructor(private readonly host: IncomingHost, private readonly opts: IncomingOptions) {
    this.core = new DestinationCore({ capabilities: opts.capabilities, version: streamVersion, coloVersion: coloWireVersion, handoff: opts.onHandoff !== undefined });
  }

  get stats(): MigrationStats {
    return this.core.stats;
  }

  /** Start listening; resolves with the bound address (port 0 picks one). */
  async listen(): Promise<{ host: string; port: number }> {
    const server = net.createServer({ noDelay: true });
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err) => reject(new UsageError('ADDRESS_UNAVAILABLE', `cannot listen for an incoming migration on ${this.opts.host}:${this.opts.port}: ${err.message}`)));
      server.listen({ host: this.opts.host === '' ? undefined : this.opts.host, port: this.opts.port }, () => resolve());
    });
    this.server = server;
    server.on('error', (err) => log.warn(`incoming migration listener: ${err.message}`));
    server.on('connection', (s) => this.onConnection(s));
    const a = server.address();
    const port = typeof a === 'object' && a !== null ? a.port : this.opts.port;
    log.info(`waiting for an incoming migration on ${this.opts.host}:${port}`);
    await this.run({ type: 'listening', now: now(), host: this.opts.host, port });
    return { host: this.opts.host, port };
  }

  private onConnection(socket: net.Socket): void {
    if (this.session !== null || this.ended) {
      socket.destroy(); // one migration per incoming VM, as in QEMU
      return;
    }
    this.server?.close();
    this.server = null;
    const channel = new MainChannel(socket, `the source at ${socket.remoteAddress ?? '?'}:${socket.remotePort ?? '?'}`);
    this.session = new IncomingSession(channel, { machine: this.host.machine, capabilities: this.opts.capabilities, receivers: this.opts.receivers ?? null });
    log.info(`incoming migration from ${channel.peer.replace(/^the source at /, '')}`);
    this.opts.onSession?.(this.session);
    const session = this.session;
    this.session.onFailure((err) => void this.multifdFailed(session, err));
    void this.pump(this.session);
  }

  private async pump(session: IncomingSession): Promise<void> {
    await this.run({ type: 'connected', now: now() });
    // The listener closed for this connection: a peer that never speaks (a stray client, a
    // source that hung) must not hold the incoming VM for ever, nor one that stops after its
    // hello (a source sends its setup right behind it, and gives up itself when no `ready`
    // comes within the same bound).
    const helloMs = this.opts.helloTimeoutMs ?? limits.migrationHandshakeTimeoutMs;
    const inHandshake = (): boolean => this.core.phase === 'hello' || this.core.phase === 'setup';
    let helloTimer: NodeJS.Timeout | null = setTimeout(() => {
      helloTimer = null;
      if (!inHandshake()) return;
      const missing = this.core.phase === 'hello' ? 'no hello' : 'a hello but no setup';
      void this.run({ type: 'failure', now: now(), message: `${session.channel.peer} sent ${missing} within ${helloMs} ms`, code: 'HANDSHAKE_TIMEOUT' });
    }, helloMs);
    const stopHelloTimer = (): void => {
      if (helloTimer !== null) clearTimeout(helloTimer);
      helloTimer = null;
    };
    try {
      while (!this.core.finished) {
        let f: Frame;
        try {
          f = await session.nextFrame();
          // The hello only: the setup must follow within the same bound.
          if (f.type !== FrameType.hello) stopHelloTimer();
        } catch (err) {
          if (this.core.finished) return;
          // A multifd channel's own error names the real cause (the source then closed the main
          // channel); it may still be on its way from the channel's worker.
          if (err instanceof ChannelClosedError && session.receiver !== null) await session.receiver.whenChannelsEnded(limits.multifdEndWaitMs);
          if (this.core.finished) return;
          if (session.receiverFailure !== null) await this.run(channelFailure(session.receiverFailure));
          else if (err instanceof ChannelClosedError) await this.run({ type: 'peerClosed', now: now() });
          else await this.run(channelFailure(err));
          return;
        }
        this.currentFrame = f;
        let summary: FrameSummary;
        try {
          summary = summarize(f);
        } catch (err) {
          await this.run(failure(err));
          return;
        }
        await this.run({ type: 'frame', now: now(), frame: summary });
      }
    } finally {
      // A refused hello ends the migration with the timer still set.
      stopHelloTimer();
    }
  }

  /** Step the core and perform its actions, in order; results feed back in. */
  private async run(ev: DestinationEvent): Promise<void> {
    for (const a of this.core.step(ev)) {
      let next: DestinationEvent | null;
      try {
        next = await this.perform(a);
      } catch (err) {
        next = failure(err);
      }
      if (next !== null) await this.run(next);
    }
  }

  private async perform(a: DestinationAction): Promise<DestinationEvent | null> {
    const s = this.session;
    switch (a.type) {
      case 'status':
        this.host.event('MIGRATION', { status: a.status });
        return null;
      case 'log':
        log[a.level](a.message);
        return null;
      case 'apply':
        assert(s !== null && this.currentFrame !== null, 'apply without a frame');
        s.applyFrame(this.currentFrame);
        this.stats.transferredBytes = s.channel.bytesReceived + this.multifdBytes;
        return null;
      case 'prepare': {
        assert(s !== null && this.currentFrame !== null, 'prepare without a session');
        parseMigrationId(a.migrationId);
        const ready = await s.prepare(this.currentFrame, a.channels, a.migrationId);
        this.stats.totalBytes = this.host.machine.ram().byteLength;
        return { type: 'prepared', now: now(), channelPorts: ready.channelPorts, disk: ready.disk };
      }
      case 'reply':
        s?.reply(a.message);
        return null;
      case 'barrier': {
        assert(s !== null, 'barrier without a session');
        let r: { pages: number; bytes: number };
        try {
          r = await s.barrier(a.round, a.channels);
        } catch (err) {
          // A cancel cuts the multifd channels and closes the main channel behind its abort
          // frame, which waits unread while this barrier holds the pump.
          const reason = await this.abortBehind(s, err);
          if (reason !== null) return { type: 'frame', now: now(), frame: { kind: 'abort', reason } };
          // No cancel: as when the pump finds the main channel closed, a multifd channel's own
          // error names the real cause, and it may still be on its way from the channel's worker.
          if (isBreak(err) && s.receiver !== null) {
            await s.receiver.whenChannelsEnded(limits.multifdEndWaitMs);
            if (s.receiverFailure !== null) throw s.receiverFailure;
          }
          throw err;
        }
        this.multifdBytes += r.bytes;
        this.stats.multifdBytes = this.multifdBytes;
        this.stats.transferredBytes = s.channel.bytesReceived + this.multifdBytes;
        return { type: 'barrierDone', now: now(), round: a.round, multifdPages: r.pages, bytes: 0 };
      }
      case 'restore': {
        assert(s !== null && s.device !== null, 'restore without device state');
        const m = this.host.machine;
        checkDeviceRam(m, s.device, 'the incoming migration');
        // The source's own image file (the source has no --snapshot): the source let it go at
        // stop-and-copy; it is taken here (write, or read for a --snapshot destination), before
        // `loaded`, so that this VM never runs without it. Another
        // process holding it fails the migration (ImageLockError): the source runs on.
        if (s.diskMode === 'shared') {
          try {
            m.disk?.activate();
          } catch (err) {
            // A cancel that came after the source sent `end` but before this read it: the
            // source, torn down, took its image back behind its abort frame. That is the cause.
            const reason = err instanceof ImageLockError ? await this.abortAhead(s, limits.diskLockAbortWaitMs) : null;
            if (reason !== null) return { type: 'frame', now: now(), frame: { kind: 'abort', reason } };
            throw err;
          }
        }
        await m.restoreVcpu(s.device.vcpu);
        m.setRunState('paused');
        log.info(`state loaded (${this.core.stats.dirtySyncCount} rounds, ${(this.stats.transferredBytes / 1048576).toFixed(1)} MiB); waiting for the source to switch over`);
        return { type: 'restored', now: now() };
      }
      case 'run':
        this.goReceived = true;
        await this.host.startRunning(a.run);
        return { type: 'running', now: now() };
      case 'handoff':
        assert(s !== null && this.opts.onHandoff !== undefined, 'handoff without a hook');
        this.ended = true;
        this.opts.onHandoff(s, this);
        return null;
      case 'close':
        this.ended = true;
        log.info('incoming migration completed; the VM runs here now');
        void s?.close().catch(() => undefined);
        return null;
      case 'fail': {
        this.ended = true;
        // The state may have been loaded (run state paused) without the source's `go`: the
        // source runs the guest on, or may. Back to inmigrate, as QEMU's failed destination,
        // so that `cont` (exit-on-error=false) only sets autostart: never two running copies.
        // (After `go` this is the only copy: a `cont` may still run it.)
        const m = this.host.machine;
        if (!this.goReceived && m.runState === 'paused' && !m.running) m.setRunState('inmigrate');
        // The shared image taken at the restore goes back to the source, which takes it again
        // to run on (inactive again, as QEMU's image of a failed incoming migration).
        if (!this.goReceived && s?.diskMode === 'shared') m.disk?.inactivate();
        if (a.status === 'failed' && a.code !== 'CHANNEL_CLOSED' && a.code !== 'MIGRATION_REFUSED') {
          try {
            s?.reply({ kind: 'error', message: a.message, code: a.code });
          } catch {
            // the channel is gone
          }
        }
        this.server?.close();
        this.server = null;
        if (s !== null) {
          // Let a refusal or error reply reach the source before the connection goes.
          await s.channel.flush().catch(() => undefined);
          await s.destroy();
        }
        if (a.status === 'cancelled') log.info(`incoming migration cancelled: ${a.message}`);
        // This process is going away (its own end breaks the migration, or its source was
        // stopped with it, as when colo up stops a pair that is being protected): no error.
        else if (await this.exitingAfter(a.code)) log.info(`incoming migration ended as this process exits: ${a.message} [${a.code}]`);
        else log.error(`incoming migration failed: ${a.message} [${a.code}]`);
        this.host.ended(a.status, a.code === 'MIGRATION_CANCELLED' ? a.message : `${a.message} [${a.code}]`);
        return null;
      }
    }
  }

  /**
   * A multifd channel failed. One that closed or was cut inside a packet may be a cancel: the
   * source drops its multifd channels at once, and its abort frame comes on the main channel,
   * which the pump reads (a destination that was not reading for a while may see the cut
   * first). So such a break is reported only if the main channel stays open
   * limits.multifdBreakAbortWaitMs; once it ends, the pump reads up to its end and reports the
   * cancel, or the channel's error (a crashed source). Any other error is reported at once.
   */
  private async multifdFailed(s: IncomingSession, err: Error): Promise<void> {
    if (isBreak(err) && !this.core.finished && !s.channel.closed) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, limits.multifdBreakAbortWaitMs);
        const off = s.channel.onClose(done);
        function done(): void {
          clearTimeout(timer);
          off();
          resolve();
        }
      });
    }
    if (isBreak(err) && s.channel.closed) return; // the pump reports how the stream ended
    await this.run(channelFailure(err));
  }

  /**
   * The barrier failed with a broken channel (a multifd channel's, or the main channel's end):
   * with the pump held by the barrier, read on along the main channel (bounded by
   * limits.multifdBreakAbortWaitMs) for the abort frame of a cancel. Returns its reason, or
   * null (the stream ended without one, the time ran out, or the error is not a break).
   */
  private async abortBehind(s: IncomingSession, err: unknown): Promise<string | null> {
    if (!isBreak(err)) return null;
    return this.abortAhead(s, limits.multifdBreakAbortWaitMs);
  }

  /** Read on along the main channel for up to `waitMs` for a cancel's abort frame: its reason, or null. */
  private async abortAhead(s: IncomingSession, waitMs: number): Promise<string | null> {
    const deadline = performance.now() + waitMs;
    for (;;) {
      const left = deadline - performance.now();
      if (left <= 0 || this.core.finished) return null;
      let f: Frame;
      try {
        f = await s.channel.next(left, 'the abort frame of a cancel');
      } catch {
        return null;
      }
      // What precedes the abort belongs to a round that is not completed: dropped, unapplied.
      if (f.type === FrameType.abort) {
        try {
          const summary = summarize(f);
          return summary.kind === 'abort' ? summary.reason : '';
        } catch {
          return '';
        }
      }
    }
  }

  private multifdBytes = 0;
  /** The source said `go`: from then on the guest's only copy is here. */
  private goReceived = false;
  /** close() was called: the process is exiting. */
  private closing = false;
  /** Ends exitingAfter's wait early (close()). */
  private wakeExitWait: (() => void) | null = null;

  /**
   * Whether the migration ended because this process exits. A stream that ended early
   * (CHANNEL_CLOSED, STREAM_TRUNCATED) may be the first sign of a stop that takes both ends:
   * the source, stopped a moment earlier, closed it before this process's own stop arrived
   * (or before its handler ran). Such an ending is judged limits.incomingBreakReportDelayMs
   * later, or at close(), whichever comes first; any other failure at once.
   */
  private async exitingAfter(code: string): Promise<boolean> {
    const exiting = (): boolean => this.closing || this.host.exiting === true;
    if (exiting() || !isBreakCode(code)) return exiting();
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => this.wakeExitWait?.(), limits.incomingBreakReportDelayMs);
      this.wakeExitWait = () => {
        this.wakeExitWait = null;
        clearTimeout(timer);
        resolve();
      };
    });
    return exiting();
  }

  /**
   * yank: drop the channels; the migration fails (the VM never ran). As a broken channel: after
   * `go` the whole state is here and the source has let go of the guest, so a yank then (while
   * the front end waits for its address) must not fail the only copy (QEMU's yank after the
   * load finds only channels it is done with).
   */
  yank(): void {
    void this.run({ type: 'channelFailure', now: now(), message: 'the migration channels were yanked', code: 'CHANNEL_CLOSED' });
  }

  /** Stop listening / drop a running migration (process exit). */
  async close(): Promise<void> {
    this.ended = true;
    this.closing = true;
    this.wakeExitWait?.();
    await new Promise<void>((r) => (this.server === null ? r() : this.server.close(() => r())));
    this.server = null;
    if (this.session !== null) await this.session.destroy();
    else await this.opts.receivers?.destroy();
  }
}

/** A channel that closed or was cut inside a frame or packet: a crash and a cancel both look so. */
function isBreak(err: unknown): boolean {
  return err instanceof ColoError && isBreakCode(err.code);
}

function isBreakCode(code: string): boolean {
  return code === 'CHANNEL_CLOSED' || code === 'STREAM_TRUNCATED';
}

function now(): number {
  return performance.now();
}

function failure(err: unknown): DestinationEvent {
  const code = err instanceof ColoError ? err.code : 'MIGRATION_FAILED';
  return { type: 'failure', now: now(), message: errorMessage(err), code };
}

function channelFailure(err: unknown): DestinationEvent {
  const code = err instanceof ColoError ? err.code : 'MIGRATION_FAILED';
  return { type: 'channelFailure', now: now(), message: errorMessage(err), code };
}

/** What the core needs to know about a frame, with counts read before anything is applied. */
function summarize(f: Frame): FrameSummary {
  switch (f.type) {
    case FrameType.hello: {
      const h = parseJsonPayload(f);
      const caps = h.capabilities;
      if (typeof h.version !== 'number' || typeof h.migrationId !== 'string' || typeof h.channels !== 'number' || caps === null || typeof caps !== 'object') {
        throw new StreamError('FRAME_INVALID', 'hello frame is missing version, migrationId, channels or capabilities');
      }
      if (h.colo !== undefined && !Number.isInteger(h.colo)) throw new StreamError('FRAME_INVALID', `hello frame: colo must be a whole number, not ${JSON.stringify(h.colo)}`);
      const colo = h.colo === undefined ? {} : { colo: h.colo as number };
      return { kind: 'hello', hello: { version: h.version, migrationId: h.migrationId, channels: h.channels, capabilities: caps as Partial<MigrationCapabilities>, ...colo } };
    }
    case FrameType.setup:
      return { kind: 'setup' };
    case FrameType.ramSize:
      return { kind: 'ramSize', pages: 0 };
    case FrameType.ramPages:
    case FrameType.ramZero:
      return { kind: 'pages', count: countOf(f) };
    case FrameType.ramZeroRanges:
      return { kind: 'pages', count: decodeZeroRanges(f, Math.ceil(limits.guestMemoryBytesMax / limits.pageBytes)).pages };
    case FrameType.diskBlocks:
    case FrameType.diskZero:
      return { kind: 'disk', count: countOf(f) };
    case FrameType.roundEnd: {
      const r = parseJsonPayload(f);
      return {
        kind: 'roundEnd',
        round: uintField(r.round, 'roundEnd.round'),
        pages: uintField(r.pages, 'roundEnd.pages'),
        blocks: uintField(r.blocks, 'roundEnd.blocks'),
        // Absent (older sources, plain migration): all channels, or none without multifd.
        channels: r.channels === undefined ? -1 : uintField(r.channels, 'roundEnd.channels'),
      };
    }
    case FrameType.deviceState:
      return { kind: 'deviceState' };
    case FrameType.end: {
      const r = parseJsonPayload(f);
      return { kind: 'end', rounds: uintField(r.rounds, 'end.rounds'), pages: uintField(r.pages, 'end.pages'), blocks: uintField(r.blocks, 'end.blocks') };
    }
    case FrameType.switchover: {
      const r = parseJsonPayload(f);
      return { kind: 'switchover', run: r.run !== false };
    }
    case FrameType.abort: {
      const r = parseJsonPayload(f);
      return { kind: 'abort', reason: typeof r.reason === 'string' ? r.reason : '' };
    }
    default:
      return { kind: 'other', name: frameTypeName(f.type) };
  }
}

function countOf(f: Frame): number {
  if (f.payload.byteLength < 4) throw new StreamError('FRAME_INVALID', `${frameTypeName(f.type)} frame ${f.seq} is too short`);
  return f.payload.readUInt32BE(0);
}

function uintField(x: unknown, what: string): number {
  if (typeof x !== 'number' || !Number.isSafeInteger(x) || x < 0) throw new StreamError('FRAME_INVALID', `${what} must be a non-negative integer`);
  return x;
}
