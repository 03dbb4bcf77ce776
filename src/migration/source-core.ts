import { limits } from '../core/limits.js';
import { newStats, type MigrationStats, type MigrationStatus } from './status.js';

/**
 * The migration source as a state machine (STYLE.md: protocol logic does no I/O). The driver
 * (source.ts) feeds it events — results of the actions it asked for, a cancel, a broken
 * channel — with the time, and performs the actions it returns.
 *
 *   setup ──connected──▶ active: round 1 (every page), then rounds of the pages dirtied during
 *   the round before, until the rest fits in downtime-limit at the measured bandwidth (or
 *   roundsMax) ──▶ stopping (pause the VM) ──▶ device: last round + device state + end ──▶
 *   switchover: wait for the destination's `loaded` ──▶ go sent ──▶ completed (source paused,
 *   postmigrate) — or, for COLO, handoff: the session is handed over instead of completing.
 *
 * The pause is bounded: limits.switchoverTimeoutMs runs from the moment the VM is paused to
 * `go` (or the handoff), and covers writing the last round as well as the wait for `loaded`.
 * A destination that stops reading (frozen, partitioned: a zero TCP window) blocks the last
 * round's writes; when the bound expires the migration fails like any other failure.
 *
 * The run state that matters is the one at the switchover pause, as in QEMU: a VM the user
 * stopped during the migration arrives paused (`go` says run: false), and stays paused here if
 * the migration fails.
 *
 * Cancel or a failure before `go` tears the channels down and gives back the VM if the
 * migration paused it (running again if it ran at the pause); the status becomes
 * cancelled/failed only after that, so a client that sees either status can rely on a source
 * as it was. After `go` nothing can be undone: the
 * destination may be running, so the source stays paused whatever happens to the channels.
 */
export type SourcePhase =
  | 'idle'
  | 'setup'
  | 'active'
  | 'stopping'
  | 'device'
  | 'switchover'
  | 'resuming-destination'
  | 'completed'
  | 'handoff'
  | 'tearing-down'
  | 'failed'
  | 'cancelled';

export interface RoundResult {
  round: number;
  /** Bytes put on the wire for this round, all channels. */
  bytes: number;
  normalPages: number;
  zeroPages: number;
  diskBlocks: number;
  durationMs: number;
  /** Of `bytes`, those the multifd channels carried (0 without multifd, or not known yet). */
  multifdChannelBytes: number;
}

export type SourceEvent =
  | { type: 'start'; now: number; ramBytes: number }
  | { type: 'connected'; now: number }
  | { type: 'roundSent'; now: number; result: RoundResult }
  | { type: 'dirtyCollected'; now: number; pages: number; blocks: number }
  /** The VM is paused for stop-and-copy; vmWasRunning: it ran until this pause (not stopped by the user). */
  | { type: 'vmPaused'; now: number; vmWasRunning: boolean }
  | { type: 'vmPauseFailed'; now: number; message: string }
  | { type: 'finalSent'; now: number; result: RoundResult }
  | { type: 'destinationLoaded'; now: number }
  /** The switchover timer started at the pause expired. */
  | { type: 'switchoverTimeout'; now: number }
  | { type: 'goSent'; now: number }
  | { type: 'destinationResumed'; now: number }
  | { type: 'resumedNoticeTimeout'; now: number }
  | { type: 'cancel'; now: number }
  | { type: 'failure'; now: number; message: string }
  | { type: 'tornDown'; now: number }
  | { type: 'vmResumed'; now: number }
  | { type: 'vmResumeFailed'; now: number; message: string }
  | { type: 'setParameters'; downtimeLimitMs?: number };

export type SourceAction =
  | { type: 'status'; status: MigrationStatus }
  | { type: 'connect' }
  /** Send the pages (round 1: every page) and disk blocks of `round`; report roundSent. */
  | { type: 'sendRound'; round: number; full: boolean }
  /** Collect what was dirtied during the last round; report dirtyCollected. */
  | { type: 'collectDirty' }
  | { type: 'pauseVm' }
  /** Collect again, send the last round, the device state and `end`; report finalSent. */
  | { type: 'sendFinal'; round: number }
  /** Wait for the destination's `loaded` (the switchover timer bounds it). */
  | { type: 'awaitLoaded' }
  /**
   * Start (timeoutMs) or stop (null) the bound on the switchover pause; when it expires,
   * report switchoverTimeout. Started when the VM is paused for stop-and-copy.
   */
  | { type: 'switchoverTimer'; timeoutMs: number | null }
  /** Close the service front end and send `go` (the destination runs the guest if `run`); report goSent. */
  | { type: 'switchover'; run: boolean }
  /** Wait (bounded) for `resumed`; report destinationResumed or resumedNoticeTimeout. */
  | { type: 'awaitResumed'; timeoutMs: number }
  /** Give the open session to the hook (COLO) instead of completing. */
  | { type: 'handoff' }
  /** Close every channel (with an abort frame when cancelling); report tornDown. */
  | { type: 'teardown'; reason: 'cancel' | 'failure'; message: string }
  /**
   * Give back the VM the migration paused: it serves clients again and, if `run` (it ran
   * when the migration paused it), runs; else it stays paused, as the user left it. Report
   * vmResumed. `reason`: how the migration ended (for what the VM logs).
   */
  | { type: 'resumeVm'; run: boolean; reason: 'cancel' | 'failure' }
  /** Release the channels of a finished migration. */
  | { type: 'close' }
  | { type: 'pass'; pass: number }
  | { type: 'log'; level: 'debug' | 'info' | 'warn' | 'error'; message: string };

export interface SourceCoreOptions {
  downtimeLimitMs: number;
  roundsMax?: number;
  /** COLO: hand the session over after the destination loaded the state. */
  handoff?: boolean;
}

export class SourceCore {
  phase: SourcePhase = 'idle';
  stats: MigrationStats = newStats(0, 0);
  round = 0;
  private downtimeLimitMs: number;
  private readonly roundsMax: number;
  private readonly handoff: boolean;
  /** The VM ran when the migration paused it (known once vmPaused arrived). */
  private vmWasRunning = false;
  /** The VM is paused because of this migration (or a pause is on its way). */
  private vmPausedByUs = false;
  private pausing = false;
  private pausedAtMs = 0;
  /** The switchover timer runs (from the pause until go, the handoff or the end). */
  private switchoverTimerOn = false;
  private goSentAtMs = 0;
  private lastCollectMs = 0;
  /**
   * Wire bytes per page or disk block of the last dirty round (a full page's worth until one
   * ran): what the rest will cost. A zero page costs a few bytes, not 4 KiB; an idle guest's
   * rest is mostly pages reported dirty every round whatever happened (the asyncify area),
   * which are zero while the guest waits.
   */
  private wireBytesPerItem: number = limits.pageBytes;
  /** A dirty round moved enough (limits.bandwidthSampleBytesMin) to measure the link. */
  private bandwidthMeasured = false;
  private endReason: 'cancel' | 'failure' | null = null;
  private tornDown = false;
  private resumeIssued = false;

  constructor(opts: SourceCoreOptions) {
    this.downtimeLimitMs = opts.downtimeLimitMs;
    this.roundsMax = opts.roundsMax ?? limits.precopyRoundsMax;
    this.handoff = opts.handoff ?? false;
  }

  get finished(): boolean {
    return this.phase === 'completed' || this.phase === 'failed' || this.phase === 'cancelled' || this.phase === 'handoff';
  }

  step(ev: SourceEvent): SourceAction[] {
    switch (ev.type) {
      case 'start':
        if (this.phase !== 'idle') return [];
        this.stats = newStats(ev.now, ev.ramBytes);
        this.phase = 'setup';
        return [this.status('setup'), { type: 'connect' }];
      case 'setParameters':
        if (ev.downtimeLimitMs !== undefined) this.downtimeLimitMs = ev.downtimeLimitMs;
        return [];
      case 'connected':
        if (this.phase !== 'setup') return [];
        this.stats.setupTimeMs = ev.now - this.stats.startTimeMs;
        this.phase = 'active';
        this.round = 1;
        this.lastCollectMs = ev.now;
        return [this.status('active'), { type: 'pass', pass: 1 }, { type: 'sendRound', round: 1, full: true }];
      case 'roundSent':
        if (this.phase !== 'active') return [];
        this.account(ev.result);
        return [{ type: 'collectDirty' }];
      case 'dirtyCollected':
        return this.onDirtyCollected(ev);
      case 'vmPaused':
        this.pausing = false;
        this.vmWasRunning = ev.vmWasRunning;
        if (this.phase !== 'stopping') return this.afterTeardownProgress(ev.now);
        this.pausedAtMs = ev.now;
        this.phase = 'device';
        this.switchoverTimerOn = true;
        return [
          this.status('device'),
          { type: 'switchoverTimer', timeoutMs: limits.switchoverTimeoutMs },
          { type: 'sendFinal', round: this.round + 1 },
        ];
      case 'vmPauseFailed':
        this.pausing = false;
        // The vCPU did not stop (or died): it is not started again (run: false), but the
        // resume still gives back the front end, whose reading the pause had stopped.
        this.vmWasRunning = false;
        // A cancel or failure while the pause was in flight is tearing down already; its end
        // waited for this answer.
        if (this.phase !== 'stopping') return this.afterTeardownProgress(ev.now);
        return this.stop('failure', `the VM could not be paused for stop-and-copy: ${ev.message}`, ev.now);
      case 'finalSent':
        if (this.phase !== 'device') return [];
        this.round += 1;
        this.account(ev.result, true);
        this.stats.remainingBytes = 0;
        this.phase = 'switchover';
        return [{ type: 'awaitLoaded' }];
      case 'destinationLoaded':
        if (this.phase !== 'switchover') return [];
        if (this.handoff) {
          this.phase = 'handoff';
          return [...this.stopSwitchoverTimer(), { type: 'handoff' }];
        }
        this.phase = 'resuming-destination';
        return [{ type: 'switchover', run: this.vmWasRunning }];
      case 'goSent':
        if (this.phase !== 'resuming-destination') return [];
        this.goSentAtMs = ev.now;
        return [...this.stopSwitchoverTimer(), { type: 'awaitResumed', timeoutMs: limits.resumedNoticeTimeoutMs }];
      case 'switchoverTimeout':
        if (!this.switchoverTimerOn) return [];
        this.switchoverTimerOn = false;
        return this.stop('failure', this.switchoverTimeoutMessage(), ev.now);
      case 'destinationResumed':
      case 'resumedNoticeTimeout':
        if (this.phase !== 'resuming-destination' || this.goSentAtMs === 0) return [];
        return this.complete(ev.type === 'destinationResumed' ? ev.now : this.goSentAtMs, ev.now);
      case 'cancel':
        return this.stop('cancel', 'migration cancelled', ev.now);
      case 'failure':
        if (this.phase === 'resuming-destination' && this.goSentAtMs > 0) {
          // `go` went out: the destination may be running, so running here too could make
          // two. Stay paused (postmigrate), as QEMU's source does; the operator decides.
          return [
            { type: 'log', level: 'warn', message: `the channel broke after go was sent (${ev.message}); the source stays paused` },
            ...this.complete(this.goSentAtMs, ev.now),
          ];
        }
        return this.stop('failure', ev.message, ev.now);
      case 'tornDown':
        this.tornDown = true;
        return this.afterTeardownProgress(ev.now);
      case 'vmResumed':
        this.vmPausedByUs = false;
        return this.afterTeardownProgress(ev.now);
      case 'vmResumeFailed':
        this.vmPausedByUs = false;
        return [{ type: 'log', level: 'error', message: `could not resume the VM after the migration ended: ${ev.message}` }, ...this.afterTeardownProgress(ev.now)];
    }
  }

  private stopSwitchoverTimer(): SourceAction[] {
    if (!this.switchoverTimerOn) return [];
    this.switchoverTimerOn = false;
    return [{ type: 'switchoverTimer', timeoutMs: null }];
  }

  /** What the destination had not done when the switchover pause ran out. */
  private switchoverTimeoutMessage(): string {
    const what =
      this.phase === 'device'
        ? 'the destination did not take the last round (it stopped reading)'
        : this.phase === 'switchover'
          ? 'the destination did not confirm that it loaded the state'
          : 'the service address was not released';
    return `the switchover did not finish within switchoverTimeoutMs (${limits.switchoverTimeoutMs} ms) of pausing the VM: ${what} [SWITCHOVER_TIMEOUT]`;
  }

  private status(s: MigrationStatus): SourceAction {
    this.stats.status = s;
    return { type: 'status', status: s };
  }

  /** `final`: the round of stop-and-copy, sent while the VM is paused (QEMU's downtime-bytes). */
  private account(r: RoundResult, final = false): void {
    const s = this.stats;
    s.transferredBytes += r.bytes;
    s.multifdBytes += r.multifdChannelBytes;
    if (final) s.downtimeBytes += r.bytes;
    s.normalPages += r.normalPages;
    s.zeroPages += r.zeroPages;
    s.diskBlocks += r.diskBlocks;
    this.sample(r);
  }

  /**
   * The link's bandwidth, from a round's bytes over its duration. A dirty round that moved
   * enough measures it. Round 1 does not: its time is mostly reading every page and disk
   * block, of which the zero ones put a few bytes each on the wire (an idle guest with a
   * 64 MiB drive: some 100 KB in 200 ms, i.e. 0.5 MB/s on loopback). Taken as the link's rate
   * and never replaced (the rounds after it were too small to count), it priced an idle
   * guest's rest of 16 pages at 660 ms: 30 rounds, then a forced stop-and-copy. Until a dirty
   * round measures the link, the fastest round so far stands for it.
   */
  private sample(r: RoundResult): void {
    const s = this.stats;
    if (r.durationMs > 0) {
      const rate = r.bytes / r.durationMs;
      const measures = r.round > 1 && r.bytes >= limits.bandwidthSampleBytesMin;
      if (measures || (!this.bandwidthMeasured && rate > s.bandwidthBytesPerMs)) {
        s.bandwidthBytesPerMs = rate;
        s.pagesPerSecond = (r.normalPages * 1000) / r.durationMs;
      }
      if (measures) this.bandwidthMeasured = true;
    }
    const items = r.normalPages + r.zeroPages + r.diskBlocks;
    if (r.round > 1 && items > 0) this.wireBytesPerItem = r.bytes / items;
  }

  private onDirtyCollected(ev: Extract<SourceEvent, { type: 'dirtyCollected' }>): SourceAction[] {
    if (this.phase !== 'active') return [];
    const s = this.stats;
    s.dirtySyncCount += 1;
    const elapsed = Math.max(1, ev.now - this.lastCollectMs);
    this.lastCollectMs = ev.now;
    s.dirtyPagesRate = (ev.pages * 1000) / elapsed;
    s.remainingBytes = ev.pages * limits.pageBytes + ev.blocks * limits.diskBlockBytes;
    // The rest costs on the wire what the last dirty round's pages and blocks cost each.
    const wireBytes = (ev.pages + ev.blocks) * this.wireBytesPerItem;
    // Before any round took measurable time, assume a slow link rather than a fast one.
    const bandwidth = s.bandwidthBytesPerMs > 0 ? s.bandwidthBytesPerMs : 1;
    s.expectedDowntimeMs = wireBytes / bandwidth;
    if (s.expectedDowntimeMs <= this.downtimeLimitMs || this.round >= this.roundsMax) {
      this.phase = 'stopping';
      this.vmPausedByUs = true;
      this.pausing = true;
      // The rest names the disk blocks too: a guest writing its disk fast leaves few pages and
      // many blocks, and "0 dirty pages, 900 ms of downtime expected" explained nothing.
      const rest = ev.blocks > 0 ? `${ev.pages} dirty pages and ${ev.blocks} dirty disk blocks` : `${ev.pages} dirty pages`;
      if (s.expectedDowntimeMs <= this.downtimeLimitMs) {
        const why = `${rest} fit in the downtime limit (${s.expectedDowntimeMs.toFixed(1)} ms expected)`;
        return [{ type: 'log', level: 'debug', message: `stop-and-copy after round ${this.round}: ${why}` }, { type: 'pauseVm' }];
      }
      // Unlike QEMU, which goes on iterating for ever, the switchover is forced: the guest
      // dirties faster than the link carries. The pause will exceed the user's downtime-limit,
      // which a debug line left unexplained.
      const message =
        `stop-and-copy forced after ${this.roundsMax} rounds (limits.precopyRoundsMax): the guest dirties ${ev.blocks > 0 ? 'memory and disk' : 'memory'} faster than the link carries it; ` +
        `${rest}, ${s.expectedDowntimeMs.toFixed(0)} ms of downtime expected, above downtime-limit (${this.downtimeLimitMs} ms)`;
      return [{ type: 'log', level: 'warn', message }, { type: 'pauseVm' }];
    }
    this.round += 1;
    return [{ type: 'pass', pass: this.round }, { type: 'sendRound', round: this.round, full: false }];
  }

  private stop(reason: 'cancel' | 'failure', message: string, now: number): SourceAction[] {
    switch (this.phase) {
      case 'idle':
      case 'completed':
      case 'failed':
      case 'cancelled':
      case 'handoff':
      case 'tearing-down':
        return [];
      case 'resuming-destination':
        // Before `go` was written the destination cannot run: undo. After, nothing can.
        if (this.goSentAtMs > 0) return [];
        break;
      default:
        break;
    }
    this.endReason = reason;
    this.phase = 'tearing-down';
    if (reason === 'failure') this.stats.errorDesc = message;
    const out: SourceAction[] = [...this.stopSwitchoverTimer()];
    if (reason === 'cancel') out.push(this.status('cancelling'));
    out.push({ type: 'teardown', reason, message });
    this.stats.endTimeMs = now;
    return out;
  }

  private afterTeardownProgress(now: number): SourceAction[] {
    if (this.phase !== 'tearing-down' || !this.tornDown || this.pausing) return [];
    if (this.vmPausedByUs) {
      if (this.resumeIssued) return [];
      this.resumeIssued = true;
      return [{ type: 'resumeVm', run: this.vmWasRunning, reason: this.endReason! }];
    }
    const reason = this.endReason!;
    this.phase = reason === 'cancel' ? 'cancelled' : 'failed';
    this.stats.endTimeMs = now;
    return [this.status(reason === 'cancel' ? 'cancelled' : 'failed')];
  }

  private complete(resumedAtMs: number, now: number): SourceAction[] {
    this.phase = 'completed';
    this.stats.downtimeMs = resumedAtMs - this.pausedAtMs;
    this.stats.endTimeMs = now;
    this.stats.remainingBytes = 0;
    return [this.status('completed'), { type: 'close' }];
  }
}
