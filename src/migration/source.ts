import { assert } from '../core/assert.js';
import { ChannelClosedError, ColoError, MigrationError, errorMessage } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { logger } from '../core/log.js';
import type { DirtyTracker } from '../machine/dirty.js';
import type { Machine } from '../machine/machine.js';
import type { MigrationCapabilities } from './params.js';
import type { MultifdSender } from './multifd.js';
import { SourceSession } from './session.js';
import { SourceCore, type SourceAction, type SourceEvent } from './source-core.js';
import type { MigrationStats } from './status.js';

const log = logger('migration');

/** What the source driver needs from the VM process (control/vm.ts implements it). */
export interface SourceHost {
  readonly machine: Machine;
  readonly tracker: DirtyTracker;
  readonly name: string;
  /**
   * Stop-and-copy: stop reading client input, pause the vCPU. Resolves with whether the VM ran
   * until this pause (read together with the pause, so that a `cont` or `stop` of the user
   * comes wholly before or after it).
   */
  pauseForSwitchover(): Promise<boolean>;
  /**
   * Undo a failed or cancelled migration that paused the VM: serve clients again (reopen the
   * front end if closed) and, if `run`, run; else leave it paused. `reason`: how it ended.
   */
  resumeAfterFailure(run: boolean, reason: 'cancel' | 'failure'): Promise<void>;
  /** Release the service address so that the destination can take it. */
  closeFrontEnd(): Promise<void>;
  /** `go` was sent: this VM must not run again (postmigrate). */
  markMigrated(): void;
  event(name: string, data?: Record<string, unknown>): void;
}

export interface OutgoingOptions {
  host: string;
  port: number;
  /** Multifd channels (0 = none). */
  channels: number;
  capabilities: MigrationCapabilities;
  downtimeLimitMs: number;
  /** Bytes per second allowed (0 = no limit); read at the start of every round (a change during one: setBandwidth). */
  bandwidth: () => number;
  /** Multifd sender threads started ahead of time (see MultifdSender.spawn). */
  senders?: MultifdSender | null;
  /**
   * COLO hook (a): when set, the migration does not complete once the destination loaded the
   * state; the open session (source still paused, destination loaded but not running) is
   * handed over instead.
   */
  onHandoff?: (session: SourceSession, migration: OutgoingMigration) => void;
}

/** Error text with the typed error's code, as error-desc shows it. */
export function describeError(err: unknown): string {
  if (err instanceof ColoError) return `${err.message} [${err.code}]`;
  return errorMessage(err);
}

/**
 * `migrate uri=tcp:HOST:PORT`: the driver of SourceCore. It performs the core's actions on
 * the session and the VM and feeds the results back; every task's completion or failure is
 * one event, so cancel and yank can arrive at any moment.
 */
export class OutgoingMigration {
  readonly core: SourceCore;
  readonly session: SourceSession;
  readonly finished: Promise<void>;
  private resolveFinished!: () => void;
  /** The core's switchover timer (see SourceCore: it bounds the pause of stop-and-copy). */
  private switchoverTimer: NodeJS.Timeout | null = null;
  /** Watches the pre-copy for a stall (limits.migrationStallMs). */
  private watchdog: NodeJS.Timeout | null = null;
  /** The session's progress count when last seen to change, and when. */
  private still: { progress: number; since: number } | null = null;

  constructor(private readonly host: SourceHost, private readonly opts: OutgoingOptions) {
    this.core = new SourceCore({ downtimeLimitMs: opts.downtimeLimitMs, handoff: opts.onHandoff !== undefined });
    this.session = new SourceSession({
      machine: host.machine,
      tracker: host.tracker,
      host: opts.host,
      port: opts.port,
      channels: opts.channels,
      capabilities: opts.capabilities,
      name: host.name,
      senders: opts.senders ?? null,
    });
    this.finished = new Promise((r) => (this.resolveFinished = r));
    void this.finished.then(() => this.stopWatchdog());
    this.session.onFailure((err) => this.dispatch({ type: 'failure', now: now(), message: describeError(err) }));
  }

  get stats(): MigrationStats {
    return this.core.stats;
  }

  start(): void {
    log.info(`migrating to ${this.opts.host}:${this.opts.port}${this.opts.channels > 0 ? ` with ${this.opts.channels} multifd channels` : ''}`);
    this.dispatch({ type: 'start', now: now(), ramBytes: this.host.machine.ram().byteLength });
    this.watchdog = setInterval(() => this.watchActive(), limits.migrationStallMs / 10);
    // It only watches: the migration's own channels and tasks are what keep the process up.
    this.watchdog.unref();
  }

  /**
   * A pre-copy sends without waiting for an answer, so a destination gone silent (its host
   * gone without FIN or RST, one channel's path forwarding nothing) left the migration active
   * for good, the source's channels holding their buffers: only migrate_cancel or yank ended
   * it. When nothing moves for limits.migrationStallMs (plus, under max-bandwidth, the wait
   * for a few paced writes: a slow migration is not a stalled one), it fails with
   * MIGRATION_STALLED and the VM runs on. The setup and the switchover have their own bounds;
   * a COLO checkpoint has coloCheckpointStallMs.
   */
  private watchActive(): void {
    if (this.core.phase !== 'active' || this.session.failed !== null) {
      this.still = null;
      return;
    }
    const progress = this.session.progress();
    const at = now();
    if (this.still === null || this.still.progress !== progress) {
      this.still = { progress, since: at };
      return;
    }
    const bandwidth = this.opts.bandwidth();
    const pacedMs = bandwidth > 0 ? (limits.migrationStallPacedWrites * Math.max(1, this.opts.channels) * limits.pagesPerPacketMax * limits.pageBytes * 1000) / bandwidth : 0;
    const boundMs = limits.migrationStallMs + pacedMs;
    if (at - this.still.since < boundMs) return;
    const message = `nothing moved to or from the destination for ${Math.round(at - this.still.since)} ms (limits.migrationStallMs): a migration channel stalled`;
    void this.session.destroy(new MigrationError('MIGRATION_STALLED', message));
  }

  private stopWatchdog(): void {
    if (this.watchdog !== null) clearInterval(this.watchdog);
    this.watchdog = null;
    this.still = null;
  }

  /** migrate_cancel: no-op once the migration cannot be undone. */
  cancel(): void {
    this.dispatch({ type: 'cancel', now: now() });
  }

  /** yank: close every channel at once; the migration fails (unless it already completed). */
  yank(): void {
    void this.session.destroy(new ChannelClosedError('the migration channels were yanked'));
  }

  /** migrate-set-parameters max-bandwidth: a throttled round in flight takes it at once (the next rounds read it anyway). */
  setBandwidth(bytesPerSecond: number): void {
    // A rate just lowered may hold the next paced write longer than the stall bound counted.
    this.still = null;
    if (this.core.phase === 'active') this.session.setBandwidth(bytesPerSecond);
  }

  setDowntimeLimit(ms: number): void {
    this.dispatch({ type: 'setParameters', downtimeLimitMs: ms });
  }

  private dispatch(ev: SourceEvent): void {
    for (const a of this.core.step(ev)) this.perform(a);
  }

  /** Run an async task; its result (or failure) comes back as an event. */
  private task(work: () => Promise<SourceEvent | null>, onError?: (err: unknown) => SourceEvent): void {
    work().then(
      (ev) => {
        if (ev !== null) this.dispatch(ev);
      },
      (err: unknown) => this.dispatch(onError?.(err) ?? { type: 'failure', now: now(), message: describeError(err) }),
    );
  }

  private perform(a: SourceAction): void {
    const s = this.session;
    switch (a.type) {
      case 'status':
        this.host.event('MIGRATION', { status: a.status });
        this.onStatus(a.status);
        return;
      case 'pass':
        this.host.event('MIGRATION_PASS', { pass: a.pass });
        return;
      case 'log':
        log[a.level](a.message);
        return;
      case 'connect':
        this.task(async () => {
          await s.connect();
          return { type: 'connected', now: now() };
        });
        return;
      case 'sendRound':
        this.task(async () => {
          const result = await s.sendRound(a.full ? 'full' : 'dirty', this.opts.bandwidth());
          assert(result.round === a.round, `session round ${result.round} differs from core round ${a.round}`);
          log.debug(`round ${a.round}: ${result.normalPages} pages, ${result.zeroPages} zero pages, ${result.diskBlocks} blocks in ${result.durationMs.toFixed(1)} ms`);
          return { type: 'roundSent', now: now(), result };
        });
        return;
      case 'collectDirty':
        this.task(async () => {
          const c = s.collectDirty();
          return { type: 'dirtyCollected', now: now(), pages: c.pages, blocks: c.blocks };
        });
        return;
      case 'pauseVm':
        this.task(
          async () => {
            // The run state at this pause is what the destination takes over (a `stop` during
            // the migration is kept, and so is a `cont` after it), and what a failed migration
            // gives back.
            const vmWasRunning = await this.host.pauseForSwitchover();
            return { type: 'vmPaused', now: now(), vmWasRunning };
          },
          (err) => ({ type: 'vmPauseFailed', now: now(), message: errorMessage(err) }),
        );
        return;
      case 'sendFinal':
        this.task(async () => {
          // One image file for both ends (no --snapshot): the guest is paused and writes no
          // more, so the image is let go here, before the destination can load the state and
          // take it (before it runs). A failure before `go` takes it back (resumeAfterFailure).
          if (s.disk.mode === 'shared' && this.host.machine.disk !== null) {
            this.host.machine.disk.inactivate();
            log.info(`drive '${this.host.machine.disk.imagePath}' released for the destination, which opens the same image`);
          }
          s.collectDirty();
          const result = await s.sendRound('dirty', 0);
          assert(result.round === a.round, `session round ${result.round} differs from core round ${a.round}`);
          const vcpu = await this.host.machine.saveVcpu();
          result.bytes += s.sendDeviceState(vcpu);
          s.sendEnd();
          return { type: 'finalSent', now: now(), result };
        });
        return;
      case 'switchoverTimer':
        if (this.switchoverTimer !== null) clearTimeout(this.switchoverTimer);
        this.switchoverTimer = null;
        if (a.timeoutMs !== null) {
          this.switchoverTimer = setTimeout(() => {
            this.switchoverTimer = null;
            this.dispatch({ type: 'switchoverTimeout', now: now() });
          }, a.timeoutMs);
        }
        return;
      case 'awaitLoaded':
        this.task(async () => {
          // The switchover timer, started at the pause, ends the migration first; this bound
          // only keeps the wait from outliving it.
          await s.waitReply('loaded', limits.switchoverTimeoutMs, 'the destination to load the state');
          return { type: 'destinationLoaded', now: now() };
        });
        return;
      case 'switchover':
        this.task(async () => {
          await this.host.closeFrontEnd();
          if (this.core.phase !== 'resuming-destination') return null;
          s.sendGo(a.run);
          this.host.markMigrated();
          return { type: 'goSent', now: now() };
        });
        return;
      case 'awaitResumed':
        this.task(async () => {
          try {
            await s.waitReply('resumed', a.timeoutMs, 'the destination to resume');
            return { type: 'destinationResumed', now: now() };
          } catch {
            return { type: 'resumedNoticeTimeout', now: now() };
          }
        });
        return;
      case 'handoff':
        assert(this.opts.onHandoff !== undefined, 'handoff without a hook');
        this.opts.onHandoff(s, this);
        this.resolveFinished();
        return;
      case 'teardown':
        this.task(async () => {
          if (a.reason === 'cancel') await s.abort('cancelled on the source');
          else await s.destroy();
          return { type: 'tornDown', now: now() };
        }, () => ({ type: 'tornDown', now: now() }));
        return;
      case 'resumeVm':
        this.task(
          async () => {
            await this.host.resumeAfterFailure(a.run, a.reason);
            return { type: 'vmResumed', now: now() };
          },
          (err) => ({ type: 'vmResumeFailed', now: now(), message: errorMessage(err) }),
        );
        return;
      case 'close':
        void s.close().catch(() => undefined);
        return;
    }
  }

  private onStatus(status: string): void {
    const st = this.core.stats;
    switch (status) {
      case 'completed':
        log.info(
          `migration completed: ${(st.transferredBytes / 1048576).toFixed(1)} MiB in ${Math.round((st.endTimeMs ?? now()) - st.startTimeMs)} ms, ` +
            `${st.dirtySyncCount + 1} rounds, downtime ${Math.round(st.downtimeMs ?? 0)} ms`,
        );
        this.resolveFinished();
        return;
      case 'failed':
        log.warn(`migration failed: ${st.errorDesc ?? 'unknown error'}`);
        this.resolveFinished();
        return;
      case 'cancelled':
        log.info('migration cancelled; the VM keeps running here');
        this.resolveFinished();
        return;
      default:
        log.debug(`migration status ${status}`);
    }
  }
}

function now(): number {
  return performance.now();
}

export type { SourceEvent };
