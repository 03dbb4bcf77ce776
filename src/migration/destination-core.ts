import { limits } from '../core/limits.js';
import { newStats, type MigrationStats, type MigrationStatus } from './status.js';
import type { CapabilityName } from './params.js';

/**
 * The migration destination as a state machine: the grammar of the main channel, the counts
 * that prove a round complete, and the switchover. No I/O; destination.ts is the driver. It
 * decodes each frame, asks `step` what to do with it, and applies the frame only when told
 * (`apply`), so nothing out of order ever reaches guest RAM, the disk or the vCPU.
 *
 *   hello → setup → [ready sent] → rounds: (ramSize | ramPages | ramZero | diskBlocks |
 *   diskZero)* roundEnd(n) [barrier: every multifd channel delivered SYNC(n), and the
 *   announced page and block counts match what arrived] … → deviceState → end [totals
 *   match] → restore → [loaded sent] → switchover (`go`) → run → [resumed sent] → completed
 *
 * The machine is started only after `end` was verified, the device state restored and the
 * source said `go`; any error before that fails the migration with the guest never run.
 */
export type DestinationPhase =
  | 'idle'
  | 'listening'
  | 'hello'
  | 'setup'
  | 'preparing'
  | 'rounds'
  | 'barrier'
  | 'device'
  | 'restoring'
  | 'loaded'
  | 'starting'
  | 'completed'
  | 'handoff'
  | 'failed'
  | 'cancelled';

export interface HelloInfo {
  version: number;
  migrationId: string;
  channels: number;
  capabilities: Partial<Record<CapabilityName, boolean>>;
  /** With `x-colo`: the version of COLO's messages the source speaks (stream.ts coloWireVersion). */
  colo?: number;
}

export type FrameSummary =
  | { kind: 'hello'; hello: HelloInfo }
  | { kind: 'setup' }
  | { kind: 'ramSize'; pages: number }
  | { kind: 'pages'; count: number }
  | { kind: 'disk'; count: number }
  | { kind: 'roundEnd'; round: number; pages: number; blocks: number; channels: number }
  | { kind: 'deviceState' }
  | { kind: 'end'; rounds: number; pages: number; blocks: number }
  | { kind: 'switchover'; run: boolean }
  | { kind: 'abort'; reason: string }
  | { kind: 'other'; name: string };

export type DestinationEvent =
  | { type: 'listening'; now: number; host: string; port: number }
  | { type: 'connected'; now: number }
  | { type: 'frame'; now: number; frame: FrameSummary }
  | { type: 'prepared'; now: number; channelPorts: number[]; disk: string }
  | { type: 'barrierDone'; now: number; round: number; multifdPages: number; bytes: number }
  | { type: 'restored'; now: number }
  | { type: 'running'; now: number }
  | { type: 'failure'; now: number; message: string; code: string }
  /** A migration channel failed or was yanked (the main channel's or a multifd channel's error, not this side's own). */
  | { type: 'channelFailure'; now: number; message: string; code: string }
  | { type: 'peerClosed'; now: number };

export type ReplyMessage =
  /** `colo`: with a COLO source, the version of COLO's messages this destination speaks (checked by the source too). */
  | { kind: 'ready'; channelPorts: number[]; disk: string; colo?: number }
  | { kind: 'refuse'; message: string }
  | { kind: 'loaded' }
  | { kind: 'resumed' }
  /** `code`: the failure's stable code (absent from older destinations: DESTINATION_FAILED on the source). */
  | { kind: 'error'; message: string; code?: string };

export type DestinationAction =
  | { type: 'status'; status: MigrationStatus }
  /** Apply the frame just stepped (pages into RAM, blocks to disk, grow RAM, keep the device blob). */
  | { type: 'apply' }
  /** Check setup against this machine, start `channels` multifd receivers; report prepared. */
  | { type: 'prepare'; channels: number; migrationId: string }
  | { type: 'reply'; message: ReplyMessage }
  /** Wait until every multifd channel delivered SYNC(round); report barrierDone. */
  | { type: 'barrier'; round: number; channels: number }
  /** Load the held device state into the machine; report restored. */
  | { type: 'restore' }
  /** Start the service front end, and the vCPU when `run` (the guest ran on the source); report running. */
  | { type: 'run'; run: boolean }
  | { type: 'handoff' }
  /** `code`: a stable error code (StreamError's codes, or MIGRATION_* for the others). */
  | { type: 'fail'; status: 'failed' | 'cancelled'; message: string; code: string }
  | { type: 'close' }
  | { type: 'log'; level: 'debug' | 'info' | 'warn' | 'error'; message: string };

export interface DestinationCoreOptions {
  capabilities: Partial<Record<CapabilityName, boolean>>;
  /** Stream/multifd version this build speaks. */
  version: number;
  /** The version of COLO's messages this build speaks: a COLO source must name the same. */
  coloVersion: number;
  /** COLO: when the source asks for x-colo, hand the session over once the state is loaded instead of waiting for `go`. */
  handoff?: boolean;
}

export class DestinationCore {
  phase: DestinationPhase = 'idle';
  stats: MigrationStats = newStats(0, 0);
  private readonly opts: DestinationCoreOptions;
  private channels = 0;
  private migrationId = '';
  private handoffAgreed = false;
  /** The source asked for x-colo (and named this build's COLO version): `ready` names it back. */
  private coloAsked = false;
  private rounds = 0;
  private roundPages = 0;
  private roundBlocks = 0;
  private pendingRound: { round: number; pages: number; blocks: number } | null = null;
  private totalPages = 0;
  private totalBlocks = 0;
  private haveDevice = false;
  private connectedAtMs = 0;

  constructor(opts: DestinationCoreOptions) {
    this.opts = opts;
  }

  get finished(): boolean {
    return this.phase === 'completed' || this.phase === 'failed' || this.phase === 'cancelled' || this.phase === 'handoff';
  }

  get channelCount(): number {
    return this.channels;
  }

  step(ev: DestinationEvent): DestinationAction[] {
    if (this.finished) return [];
    try {
      return this.stepInner(ev);
    } catch (err) {
      if (err instanceof ProtocolViolation) return this.fail(ev.now, err.message, err.code);
      throw err;
    }
  }

  private stepInner(ev: DestinationEvent): DestinationAction[] {
    switch (ev.type) {
      case 'listening':
        if (this.phase !== 'idle') return [];
        this.stats = newStats(ev.now, 0);
        this.stats.socketAddress = [{ host: ev.host, port: ev.port }];
        this.phase = 'listening';
        return [this.status('setup')];
      case 'connected':
        if (this.phase !== 'listening') return [];
        this.connectedAtMs = ev.now;
        this.phase = 'hello';
        return [this.status('active')];
      case 'frame':
        return this.onFrame(ev.now, ev.frame);
      case 'prepared':
        if (this.phase !== 'preparing') return [];
        if (this.handoffAgreed && ev.disk === 'shared') {
          // The PVM writes on into the image while the SVM's checkpoints would carry no blocks:
          // at a takeover the SVM would run on the primary's later, unreleased writes.
          const refusal = 'COLO needs a disk of its own on the secondary (or both nodes with --snapshot): both nodes open the same image file';
          return [{ type: 'reply', message: { kind: 'refuse', message: refusal } }, ...this.fail(ev.now, refusal, 'MIGRATION_REFUSED')];
        }
        this.stats.setupTimeMs = ev.now - this.connectedAtMs;
        this.phase = 'rounds';
        // A COLO source checks the version named here: a destination of an older build, which
        // does not check the hello's, names none, and the source refuses it (session.ts).
        return [{ type: 'reply', message: { kind: 'ready', channelPorts: ev.channelPorts, disk: ev.disk, ...(this.coloAsked ? { colo: this.opts.coloVersion } : {}) } }];
      case 'barrierDone':
        return this.onBarrierDone(ev);
      case 'restored':
        if (this.phase !== 'restoring') return [];
        if (this.handoffAgreed) {
          this.phase = 'handoff';
          return [{ type: 'reply', message: { kind: 'loaded' } }, { type: 'handoff' }];
        }
        this.phase = 'loaded';
        return [{ type: 'reply', message: { kind: 'loaded' } }];
      case 'running':
        if (this.phase !== 'starting') return [];
        this.phase = 'completed';
        this.stats.endTimeMs = ev.now;
        this.stats.remainingBytes = 0;
        return [{ type: 'reply', message: { kind: 'resumed' } }, this.status('completed'), { type: 'close' }];
      case 'failure':
        return this.fail(ev.now, ev.message, ev.code);
      case 'channelFailure':
        // After `go` the whole state is here and the source has let go of the guest: a channel
        // that breaks now must not take down the only copy that is about to run.
        if (this.phase === 'starting') return [];
        return this.fail(ev.now, ev.message, ev.code);
      case 'peerClosed':
        if (this.phase === 'listening' || this.phase === 'starting') return [];
        return this.fail(ev.now, `the source closed the connection during the ${this.phaseText()} phase`, 'CHANNEL_CLOSED');
    }
  }

  private onFrame(now: number, f: FrameSummary): DestinationAction[] {
    if (f.kind === 'abort') {
      this.phase = 'cancelled';
      this.stats.endTimeMs = now;
      const message = `the source cancelled the migration${f.reason === '' ? '' : ` (${f.reason})`}`;
      return [this.status('cancelled'), { type: 'fail', status: 'cancelled', message, code: 'MIGRATION_CANCELLED' }];
    }
    switch (this.phase) {
      case 'hello': {
        if (f.kind !== 'hello') throw unexpected(f, 'hello');
        const refusal = this.checkHello(f.hello);
        if (refusal !== null) {
          return [{ type: 'reply', message: { kind: 'refuse', message: refusal } }, ...this.fail(now, refusal, 'MIGRATION_REFUSED')];
        }
        this.channels = f.hello.channels;
        this.migrationId = f.hello.migrationId;
        this.coloAsked = f.hello.capabilities['x-colo'] === true;
        this.handoffAgreed = this.opts.handoff === true && this.coloAsked;
        this.phase = 'setup';
        return [];
      }
      case 'setup':
        if (f.kind !== 'setup') throw unexpected(f, 'setup');
        this.phase = 'preparing';
        return [{ type: 'prepare', channels: this.channels, migrationId: this.migrationId }];
      case 'rounds':
        return this.onRoundFrame(f);
      case 'device':
        if (f.kind !== 'end') throw unexpected(f, 'device');
        return this.onEnd(f);
      case 'loaded':
        if (f.kind !== 'switchover') throw unexpected(f, 'loaded');
        this.phase = 'starting';
        return [{ type: 'run', run: f.run }];
      default:
        throw unexpected(f, this.phaseText());
    }
  }

  private onRoundFrame(f: FrameSummary): DestinationAction[] {
    switch (f.kind) {
      case 'ramSize':
      case 'pages':
        if (f.kind === 'pages') this.roundPages += f.count;
        return [{ type: 'apply' }];
      case 'disk':
        this.roundBlocks += f.count;
        return [{ type: 'apply' }];
      case 'roundEnd':
        if (f.round !== this.rounds + 1) throw new ProtocolViolation(`round ${f.round} ended where round ${this.rounds + 1} was expected`);
        if (f.blocks !== this.roundBlocks) {
          throw new ProtocolViolation(`round ${f.round} announces ${f.blocks} disk blocks but ${this.roundBlocks} arrived`);
        }
        // The round's pages travelled on the first `channels` multifd channels (a small round
        // wakes only the channels it needs); the barrier waits for their SYNCs.
        if (f.channels > this.channels) {
          throw new ProtocolViolation(`round ${f.round} names ${f.channels} multifd channels of ${this.channels}`);
        }
        this.pendingRound = { round: f.round, pages: f.pages, blocks: f.blocks };
        this.phase = 'barrier';
        return [{ type: 'barrier', round: f.round, channels: f.channels }];
      case 'deviceState':
        if (this.rounds === 0) throw new ProtocolViolation('device state arrived before any RAM round');
        if (this.roundPages !== 0 || this.roundBlocks !== 0) throw new ProtocolViolation('device state arrived inside an unfinished round');
        this.haveDevice = true;
        this.phase = 'device';
        return [{ type: 'apply' }];
      default:
        throw unexpected(f, 'rounds');
    }
  }

  private onBarrierDone(ev: Extract<DestinationEvent, { type: 'barrierDone' }>): DestinationAction[] {
    const r = this.pendingRound;
    if (this.phase !== 'barrier' || r === null || r.round !== ev.round) return [];
    const got = this.roundPages + ev.multifdPages;
    if (got !== r.pages) throw new ProtocolViolation(`round ${r.round} announces ${r.pages} pages but ${got} arrived`);
    this.rounds = r.round;
    this.totalPages += got;
    this.totalBlocks += r.blocks;
    this.stats.dirtySyncCount = this.rounds;
    this.stats.transferredBytes += ev.bytes;
    this.roundPages = 0;
    this.roundBlocks = 0;
    this.pendingRound = null;
    this.phase = 'rounds';
    return [];
  }

  private onEnd(f: Extract<FrameSummary, { kind: 'end' }>): DestinationAction[] {
    if (!this.haveDevice) throw new ProtocolViolation('end arrived without device state');
    if (f.rounds !== this.rounds || f.pages !== this.totalPages || f.blocks !== this.totalBlocks) {
      throw new ProtocolViolation(
        `the stream announces ${f.rounds} rounds, ${f.pages} pages and ${f.blocks} blocks but ${this.rounds}, ${this.totalPages} and ${this.totalBlocks} arrived`,
      );
    }
    this.phase = 'restoring';
    return [{ type: 'restore' }];
  }

  private checkHello(h: HelloInfo): string | null {
    if (h.version !== this.opts.version) return `the source speaks migration protocol version ${h.version}, this destination ${this.opts.version}`;
    const mine = this.opts.capabilities;
    if (!Number.isInteger(h.channels) || h.channels < 0) return `the source names ${h.channels} multifd channels, not a whole number of 0 or more`;
    if (h.channels > 0 && mine.multifd !== true) {
      return `the source uses multifd (${h.channels} channels) but the capability multifd is off on the destination`;
    }
    if (h.channels === 0 && mine.multifd === true) {
      return 'the destination expects multifd channels but the capability multifd is off on the source';
    }
    if (h.channels > limits.multifdChannelsMax) return `the source asks for ${h.channels} multifd channels, more than the ${limits.multifdChannelsMax} allowed`;
    if (h.capabilities['x-colo'] === true && mine['x-colo'] !== true) {
      return 'the source asks for COLO but the capability x-colo is off on the destination';
    }
    if (h.capabilities['x-colo'] === true && h.colo !== this.opts.coloVersion) {
      if (h.colo === undefined) return `the source asks for COLO but does not say which COLO protocol version it speaks (this destination: ${this.opts.coloVersion})`;
      return `the source speaks COLO protocol version ${h.colo}, this destination ${this.opts.coloVersion}`;
    }
    return null;
  }

  private status(s: MigrationStatus): DestinationAction {
    this.stats.status = s;
    return { type: 'status', status: s };
  }

  private fail(now: number, message: string, code: string): DestinationAction[] {
    if (this.finished) return [];
    this.phase = 'failed';
    this.stats.errorDesc = `${message} [${code}]`;
    this.stats.endTimeMs = now;
    return [this.status('failed'), { type: 'fail', status: 'failed', message, code }];
  }

  private phaseText(): string {
    return this.phase;
  }
}

class ProtocolViolation extends Error {
  constructor(message: string, readonly code = 'STREAM_INCOMPLETE') {
    super(message);
  }
}

function unexpected(f: FrameSummary, phase: string): ProtocolViolation {
  const name = f.kind === 'other' ? f.name : f.kind;
  return new ProtocolViolation(`unexpected ${name} frame in the ${phase} phase (a reordered or foreign stream)`, 'FRAME_ORDER');
}
