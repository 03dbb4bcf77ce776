import { ChannelClosedError, ColoProtocolError, QmpCommandError, StreamError, errorMessage } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { logger } from '../core/log.js';
import type { IncomingSession, SourceSession } from '../migration/session.js';
import { FrameType, parseJsonPayload, type Frame } from '../migration/stream.js';
import type { Vm } from '../control/vm.js';
import type { VcpuState } from '../machine/vcpu-protocol.js';
import {
  PrimaryCore,
  SecondaryCore,
  isColoMessage,
  type ColoMessage,
  type ColoMode,
  type ExitReason,
  type PrimaryAction,
  type PrimaryEvent,
  type PrimaryPhase,
  type SecondaryAction,
  type SecondaryEvent,
} from './core.js';

import { defaultDiskSink } from '../migration/disk-sync.js';
import { DiskIoError, type Disk } from '../block/disk.js';
import { PrimaryNet, SecondaryNet } from './network.js';
import { CheckpointBlocks } from './checkpoint-blocks.js';
import { checkDeviceRam } from '../migration/ram-digest.js';
import { latencyTrace } from '../core/latency-trace.js';

const log = logger('colo');

/** How long a primary whose link broke waits for x-colo-lost-heartbeat before going on alone. */
export const linkLossGraceMs = 2000;

/** What a driver reports to the controller. */
export interface DriverHost {
  readonly vm: Vm;
  /** The process is shutting down: failures of the VM are expected, not errors. */
  readonly closing: boolean;
  setStatus(status: 'colo' | 'completed' | 'failed'): void;
  exited(mode: ColoMode, reason: ExitReason): void;
}

/**
 * A failure of the primary's stream that is damage, not a cut: a frame or packet that fails its
 * checksum, comes out of order or does not parse. A stream that merely ended (a closed or reset
 * connection, one cut inside a frame or before its round's SYNC) is a lost link.
 */
function corruptStream(err: unknown): boolean {
  return err instanceof StreamError && err.code !== 'STREAM_TRUNCATED';
}

/** What a failure of the secondary's channels is: a lost link, or a stream that cannot be trusted. */
function channelFailure(err: unknown): SecondaryEvent {
  if (corruptStream(err)) return { type: 'protocolError', message: `${errorMessage(err)} [${(err as StreamError).code}]`, corrupt: true };
  return { type: 'linkLost', message: errorMessage(err) };
}

function messageOf(f: Frame): ColoMessage {
  const r = parseJsonPayload(f);
  if (!isColoMessage(r.msg)) throw new ChannelClosedError(`unknown COLO message ${String(r.msg)}`);
  return r.msg;
}

/** `p` settled, or `ms` passed; never rejects. */
function boundedWait(p: Promise<void>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | null = null;
  return Promise.race([p.catch(() => undefined), new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)))]).finally(() => {
    if (timer !== null) clearTimeout(timer);
  });
}

/** The primary's phases from a checkpoint's request to VMSTATE_LOADED: the SVM is paused for it (or applying it). */
const checkpointPhases: ReadonlySet<PrimaryPhase> = new Set<PrimaryPhase>(['requested', 'pausing', 'sending', 'awaitReceived', 'awaitLoaded']);

/** Runs VM operations one after the other (a failover waits for the one in flight). */
class VmOps {
  private tail: Promise<void> = Promise.resolve();
  run(fn: () => Promise<void>): Promise<void> {
    const next = this.tail.then(fn);
    this.tail = next.catch(() => undefined);
    return next;
  }
  settled(): Promise<void> {
    return this.tail;
  }
}

// ---------------------------------------------------------------- primary

export class PrimaryDriver {
  readonly core: PrimaryCore;
  private timer: NodeJS.Timeout | null = null;
  private crashTimer: NodeJS.Timeout | null = null;
  private grace: NodeJS.Timeout | null = null;
  /** The wait for this guest's exit after the SVM's (limits.coloSvmExitWaitMs). */
  private exitWait: NodeJS.Timeout | null = null;
  /** Watches the checkpoint in flight for a stall (limits.coloCheckpointStallMs). */
  private watchdog: NodeJS.Timeout | null = null;
  /** The session's progress count when last seen to change, and when. */
  private still: { progress: number; since: number } | null = null;
  private readonly ops = new VmOps();
  /** The failover under way (the 'failover' action): settles when it is done (never rejects). */
  private failing: Promise<void> | null = null;
  private pauseStartedAt = 0;
  /** The PVM's vCPU state saved at the checkpoint's pause, for sendState. */
  private pausedState: VcpuState | null = null;
  /** Settles once the last resumeVm has told the vCPU to run (or found it could not). */
  private resumePosted: Promise<void> = Promise.resolve();
  readonly stats = new CheckpointStats();
  readonly net: PrimaryNet;
  /**
   * The guest crashed: COLO ends at once, not at the next checkpoint. Vm's own listener was
   * added first, so GUEST_PANICKED goes out before this COLO_EXIT (colo up fences the primary
   * on the first and must not take the second for a primary going on alone).
   */
  private readonly onPanicked = (message: string): void => this.dispatch({ type: 'guestCrashed', message });

  constructor(private readonly host: DriverHost, private readonly session: SourceSession) {
    this.core = new PrimaryCore(() => host.vm.migration.settings.parameters['x-checkpoint-delay']);
    this.net = new PrimaryNet(
      host.vm,
      session,
      (reason) => {
        if (reason === 'svm-crashed') {
          const gapMs = Math.max(limits.coloSvmCrashResyncGapMinMs, limits.coloSvmCrashResyncGapPauses * this.stats.lastPauseMs);
          this.dispatch({ type: 'svmCrashed', at: performance.now(), gapMs });
          return;
        }
        log.debug(`primary: the compare asks for a checkpoint (${reason})`);
        this.dispatch({ type: 'trigger', reason });
      },
      (err) => this.dispatch({ type: 'protocolError', message: errorMessage(err) }),
      () => checkpointPhases.has(this.core.phase),
    );
  }

  start(): void {
    this.session.onFailure((err) => this.dispatch({ type: 'linkLost', message: errorMessage(err) }));
    this.host.vm.machine.on('panicked', this.onPanicked);
    // The compare and the mirror start with COLO: from here on PVM output waits for the SVM's.
    this.net.start();
    this.dispatch({ type: 'handoff' });
    this.watchdog = setInterval(() => this.watchCheckpoint(), limits.coloCheckpointStallMs / 10);
    void this.pump();
  }

  /**
   * A checkpoint waits on the network in these phases (the PVM's own pause and resume are
   * local): for the secondary's CHECKPOINT_READY, CHECKPOINT_REPLY, VMSTATE_RECEIVED or
   * VMSTATE_LOADED, or for its own channels to take the state. One stalled connection (a
   * multifd channel whose SYNC never arrives, a main channel that carries nothing) held the
   * checkpoint, and the clients' output, for good: nothing else ends such a wait while both
   * processes answer QMP. So when nothing moves for limits.coloCheckpointStallMs, the channels
   * are dropped as by a yank, and the link counts as lost.
   */
  private watchCheckpoint(): void {
    const phase = this.core.phase;
    if (phase !== 'waitReady' && phase !== 'requested' && phase !== 'sending' && phase !== 'awaitReceived' && phase !== 'awaitLoaded') {
      this.still = null;
      return;
    }
    const progress = this.session.progress();
    const now = performance.now();
    if (this.still === null || this.still.progress !== progress) {
      this.still = { progress, since: now };
      return;
    }
    if (now - this.still.since < limits.coloCheckpointStallMs || this.session.failed !== null) return;
    const message = `nothing moved between the nodes for ${limits.coloCheckpointStallMs} ms while a checkpoint waited (phase ${phase}): a COLO channel stalled`;
    log.warn(`primary: ${message}; dropping the COLO channels`);
    void this.session.destroy(new ChannelClosedError(message));
  }

  lostHeartbeat(): void {
    this.dispatch({ type: 'lostHeartbeat' });
  }

  /**
   * The PVM's guest exited by itself (proc_exit), and the process is about to end: no
   * checkpoint starts any more, and this resolves once the output it left in the compare (its
   * last replies) is released by the SVM's copy (the SVM's guest makes the same way to the
   * same exit) or limits.coloGuestExitDrainMs passed. Without the wait those replies, which a
   * VM without COLO sends, were dropped at the exit.
   */
  guestExited(): Promise<void> {
    this.dispatch({ type: 'guestExited' });
    // A failover under way releases the held output once it finds the guest exited: waited for.
    if (this.core.phase === 'failover' && this.failing !== null) return boundedWait(this.failing, limits.coloGuestExitDrainMs);
    if (this.core.phase === 'done' || this.core.phase === 'failover') return Promise.resolve();
    return this.net.pvmOutputSettled(limits.coloGuestExitDrainMs);
  }

  /**
   * The user's cont (after a stop), in turn with the checkpoints' pauses and resumes. As QEMU's
   * qmp_cont: refused only while a checkpoint holds the PVM (run state colo), or before COLO's
   * first resume (finish-migrate: the initial migration's switchover).
   */
  cont(): Promise<void> {
    const m = this.host.vm.machine;
    return this.ops.run(async () => {
      if (m.runState === 'colo') throw new QmpCommandError('GenericError', 'COLO checkpoint in progress');
      if (m.runState === 'finish-migrate') throw new QmpCommandError('GenericError', 'Migration is not finalized yet');
      if (!m.running) await m.cont();
    });
  }

  yank(): void {
    void this.session.destroy(new ChannelClosedError('the COLO channels were yanked'));
  }

  private async pump(): Promise<void> {
    for (;;) {
      let msg: ColoMessage;
      try {
        const f = await this.session.nextColo();
        if (f.type === FrameType.coloNet) {
          this.net.onFrame(f);
          continue;
        }
        msg = messageOf(f);
        if (msg === 'CHECKPOINT_READY') void this.net.openOutputChannel(parseJsonPayload(f).outputPort);
      } catch (err) {
        if (err instanceof ChannelClosedError || this.session.failed !== null) this.dispatch({ type: 'linkLost', message: errorMessage(err) });
        else this.dispatch({ type: 'protocolError', message: errorMessage(err) });
        return;
      }
      log.debug(`primary: received ${msg}`);
      latencyTrace?.event(`P<${msg}`);
      this.dispatch({ type: 'message', msg });
    }
  }

  /** The periodic checkpoint's timer (replacing one that is armed), chained past setTimeout's limit. */
  private setTimer(ms: number): void {
    if (this.timer !== null) clearTimeout(this.timer);
    const step = Math.min(ms, limits.timerMsMax);
    this.timer = setTimeout(() => {
      this.timer = null;
      if (ms > step) this.setTimer(ms - step);
      else this.dispatch({ type: 'timer' });
    }, step);
  }

  dispatch(ev: PrimaryEvent): void {
    this.notePhase(ev);
    if (latencyTrace !== null && (ev.type === 'vmPaused' || ev.type === 'stateCaptured' || ev.type === 'stateSent' || ev.type === 'vmResumed')) latencyTrace.event(`P:${ev.type}`);
    if (ev.type === 'vmResumed') this.pauseStartedAt = 0;
    for (const a of this.core.step(ev)) this.perform(a);
    if (this.core.phase === 'done') this.host.vm.machine.off('panicked', this.onPanicked);
  }

  /** Where a checkpoint's pause goes (debug log): times since the pause started. */
  private phaseMarks: string[] = [];
  private notePhase(ev: PrimaryEvent): void {
    if (this.pauseStartedAt === 0 || !log.enabled('debug')) return;
    const name = ev.type === 'message' ? ev.msg : ev.type;
    this.phaseMarks.push(`${name} +${(performance.now() - this.pauseStartedAt).toFixed(1)}`);
    if (ev.type === 'vmResumed') {
      log.debug(`primary: checkpoint pause: ${this.phaseMarks.join(', ')}`);
      this.phaseMarks = [];
    }
  }

  private task(work: () => Promise<PrimaryEvent | null>): void {
    work().then(
      (ev) => {
        if (ev !== null) this.dispatch(ev);
      },
      (err: unknown) => {
        if (this.core.phase === 'failover' || this.core.phase === 'done') {
          log.debug(`primary: ${errorMessage(err)} (${this.core.phase === 'failover' ? 'during failover' : 'COLO has ended'})`);
          return;
        }
        // The guest stopped for good under a pause or a resume (cont refuses it): not a COLO fault.
        const stopped = this.guestStopped();
        if (stopped !== 'runnable') {
          if (stopped !== null) this.dispatch(stopped);
          else log.debug(`primary: ${errorMessage(err)} (the guest exited)`);
          return;
        }
        if (err instanceof ChannelClosedError || this.session.failed !== null) this.dispatch({ type: 'linkLost', message: errorMessage(err) });
        else this.dispatch({ type: 'protocolError', message: errorMessage(err) });
      },
    );
  }

  private perform(a: PrimaryAction): void {
    const m = this.host.vm.machine;
    const s = this.session;
    switch (a.type) {
      case 'status':
        this.host.setStatus(a.status);
        return;
      case 'log':
        log[a.level](a.message);
        return;
      case 'send':
        log.debug(`primary: sending ${a.msg}`);
        latencyTrace?.event(`P>${a.msg}`);
        try {
          s.sendColo({ msg: a.msg });
        } catch (err) {
          this.dispatch({ type: 'linkLost', message: errorMessage(err) });
        }
        return;
      case 'armTimer':
        this.setTimer(a.ms);
        return;
      case 'armCrashTimer':
        this.crashTimer ??= setTimeout(() => {
          this.crashTimer = null;
          this.dispatch({ type: 'crashTimer', at: performance.now() });
        }, a.ms);
        return;
      case 'armGrace':
        this.grace ??= setTimeout(() => this.dispatch({ type: 'graceElapsed' }), linkLossGraceMs);
        return;
      case 'uncompared':
        // net.stop(): what the failover does to the network, with COLO still on until this
        // guest's exit or exitWaitElapsed.
        this.net.stop();
        return;
      case 'armExitWait':
        this.exitWait ??= setTimeout(() => this.dispatch({ type: 'exitWaitElapsed', ms: limits.coloSvmExitWaitMs }), limits.coloSvmExitWaitMs);
        return;
      case 'pauseVm':
        this.task(async () => {
          await this.ops.run(async () => {
            this.pauseStartedAt = performance.now();
            this.host.vm.frontEnd?.pauseReading();
            // The vCPU state comes with the pause: one exchange with the vCPU thread less.
            this.pausedState = await m.pauseAndSave('colo');
          });
          if (this.pausedState !== null) return { type: 'vmPaused' };
          // The vCPU stopped otherwise: its guest crashed, or exited (the checkpoint is abandoned, the process ends).
          const stopped = this.guestStopped();
          if (stopped === 'runnable') return { type: 'protocolError', message: `the PVM did not pause (run state ${m.runState})` };
          return stopped ?? { type: 'guestExited' };
        });
        return;
      case 'sendState':
        this.task(async () => {
          const t0 = performance.now();
          // The PVM is paused: its vCPU state, then its dirty pages, disk blocks and device
          // state are copied, and it runs on while the copy travels (stateCaptured). A
          // checkpoint too large to copy is sent from guest RAM with the PVM still paused.
          const vcpu = this.pausedState ?? (await m.saveVcpu());
          this.pausedState = null;
          const t1 = performance.now();
          const captured = s.captureCheckpoint(vcpu);
          const t2 = performance.now();
          if (!captured) this.stats.sentFromRam += 1;
          else {
            this.stats.copied += 1;
            this.net.pvmNextEpoch();
            this.dispatch({ type: 'stateCaptured' });
            // The PVM's pause ends before the copy travels: sending first would keep the
            // resume waiting for this thread. The copy goes as soon as the vCPU has been told
            // to run, not once it says it runs: that answer waits for this thread's next turn.
            await this.resumePosted;
          }
          const r = await s.sendRound('dirty', 0, true);
          const t3 = performance.now();
          s.sendColo({ msg: 'VMSTATE_SIZE' });
          const deviceBytes = captured ? s.sendCapturedDeviceState() : s.sendDeviceState(vcpu);
          const bytes = r.bytes + deviceBytes;
          if (r.multifdBytes === undefined) this.stats.noteBytes(bytes);
          else r.multifdBytes.then((b) => this.stats.noteBytes(bytes + b), () => undefined);
          if (log.enabled('debug')) {
            const t4 = performance.now();
            log.debug(`primary: checkpoint ${r.round}: ${r.normalPages} pages, ${r.zeroPages} zero pages; vCPU state ready in ${(t1 - t0).toFixed(1)} ms, ${captured ? `copied in ${(t2 - t1).toFixed(1)} ms` : 'too large to copy'}, round ${(t3 - t2).toFixed(1)} ms, device ${deviceBytes} bytes sent at +${(t4 - t0).toFixed(1)} ms`);
          }
          return { type: 'stateSent' };
        });
        return;
      case 'releaseHeld':
        this.net.checkpoint();
        return;
      case 'checkpointDone':
        // VMSTATE_LOADED: the SVM runs the checkpoint; the compare's timeout counts from here.
        this.net.svmResumed();
        return;
      case 'resumeVm': {
        let posted = (): void => undefined;
        this.resumePosted = new Promise<void>((resolve) => (posted = resolve));
        this.task(async () => {
          await this.ops.run(async () => {
            if (m.runState === 'finish-migrate') m.setRunState('paused');
            let running: Promise<void> | null = null;
            try {
              // cont() tells the vCPU to run before its first await.
              running = m.running ? null : m.cont();
            } finally {
              posted();
            }
            await running;
            this.host.vm.frontEnd?.resumeReading();
            if (this.pauseStartedAt > 0) this.stats.notePause(performance.now() - this.pauseStartedAt);
          });
          return { type: 'vmResumed' };
        });
        return;
      }
      case 'failover':
        this.clearTimers();
        this.net.detach();
        // The output held for the compare is released (net.stop) once the PVM runs on: the PVM's
        // output is all there is from then on. A PVM that cannot run drops it instead (abandon):
        // a secondary that is not dead after all may still take over from its last checkpoint,
        // which released replies could contradict (invariant 1). Until then the compare goes on
        // holding (its triggers do nothing now), so what the resumed PVM sends comes after it.
        this.failing = (async () => {
          await s.destroy().catch((err: unknown) => log.debug(`closing the COLO channels: ${errorMessage(err)}`));
          await this.ops.settled();
          try {
            await this.ops.run(async () => {
              // Its guest exited by itself (the process waits for its last output, which the
              // failover released): there is nothing to run, and the process ends.
              const stopped = this.guestStopped();
              if (stopped === null) {
                log.debug('primary: its guest exited: nothing to resume after the failover (the process ends)');
                this.net.stop();
                return;
              }
              // Its guest crashed (under the checkpoint the failover waited for, or since): it will not run.
              if (stopped !== 'runnable') throw new ColoProtocolError('COLO_RESUME_FAILED', stopped.type === 'guestCrashed' ? stopped.message : 'the guest cannot run');
              // A VM the user stopped (and no checkpoint resumed since) stays stopped when the
              // primary goes on alone by itself (its link broke): an operator may have stopped it
              // to fence it while the secondary takes over. x-colo-lost-heartbeat runs it, as
              // QEMU's failover does.
              const keepStopped = a.reason === 'error' && m.runState === 'paused';
              if (m.runState === 'finish-migrate' || m.runState === 'colo') m.setRunState('paused');
              if (keepStopped) log.info('primary: the VM stays stopped, as the user left it (stop); cont runs it');
              else if (!m.running) await m.cont();
              const vm = this.host.vm;
              if (vm.frontEnd === null) await vm.startFrontEnd();
              else vm.frontEnd.resumeReading();
              this.net.stop();
            });
          } catch (err) {
            // The process is ending, or the guest exited meanwhile: the VM's own end, no error.
            if (this.host.closing || this.host.vm.exiting || m.runState === 'shutdown') {
              log.debug(`the primary did not resume after the failover (${m.runState === 'shutdown' ? 'its guest exited' : 'shutting down'}): ${errorMessage(err)}`);
              // Its guest's last output goes out, as a VM without COLO sends it (after close(), nothing does).
              this.net.stop();
            } else {
              // A crashed guest, a vCPU or front end that failed: nothing serves here (the core says it, once).
              this.dispatch({ type: 'resumeFailed', message: errorMessage(err) });
              return;
            }
          }
          this.dispatch({ type: 'failoverDone' });
        })();
        return;
      case 'exit':
        if (m.runState === 'shutdown') log.info(`COLO ended on the primary (${a.reason}); its guest exited (the process ends)`);
        else log.info(`COLO ended on the primary (${a.reason}); the VM runs unprotected`);
        this.host.exited('primary', a.reason);
        return;
      case 'abandon':
        // (the failover closed the channels already) The output held for the compare is
        // dropped, as for a guest crash in COLO (leave): this PVM's state does not go on.
        this.net.discard();
        // Not a state to run from: cont is refused from now on (vm.cont). A vCPU the failed
        // resume left running (its front end failed) is stopped; a crashed guest keeps its state.
        void (async () => {
          if (m.running) await m.pause('internal-error').catch((err: unknown) => log.debug(`stopping the guest: ${errorMessage(err)}`));
          if (m.runState !== 'guest-panicked') m.setRunState('internal-error');
          this.host.exited('primary', 'error');
        })();
        return;
      case 'leave':
        this.clearTimers();
        this.net.discard();
        // The secondary sees the link break and waits for x-colo-lost-heartbeat.
        void s.destroy().catch((err: unknown) => log.debug(`closing the COLO channels: ${errorMessage(err)}`));
        this.host.exited('primary', 'error');
        return;
    }
  }

  /**
   * Whether the PVM's guest can still run: 'runnable'; guestCrashed when it crashed; null when
   * it exited (the process is ending: vm.quit, then close()).
   */
  private guestStopped(): PrimaryEvent | 'runnable' | null {
    const st = this.host.vm.machine.runState;
    if (st === 'shutdown') return null;
    if (st === 'guest-panicked' || st === 'internal-error') return { type: 'guestCrashed', message: `the guest is in state ${st}` };
    return 'runnable';
  }

  /**
   * Process exit: the core is done (nothing it is fed from now on acts: no timer, no warning,
   * no COLO_EXIT); held output is dropped, never released (PrimaryNet.discard).
   */
  close(): void {
    this.dispatch({ type: 'close' });
    this.clearTimers();
    this.net.discard();
  }

  private clearTimers(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    if (this.crashTimer !== null) clearTimeout(this.crashTimer);
    if (this.grace !== null) clearTimeout(this.grace);
    if (this.exitWait !== null) clearTimeout(this.exitWait);
    if (this.watchdog !== null) clearInterval(this.watchdog);
    this.timer = null;
    this.crashTimer = null;
    this.grace = null;
    this.exitWait = null;
    this.watchdog = null;
  }
}

// ---------------------------------------------------------------- secondary

export class SecondaryDriver {
  readonly core = new SecondaryCore();
  private readonly ops = new VmOps();
  private cache: SharedArrayBuffer | null = null;
  private received: SharedArrayBuffer | null = null;
  /** Disk blocks of the checkpoint in flight, written only by the apply (null: no disk). */
  private pendingBlocks: CheckpointBlocks | null = null;
  private applyDiskBlocks: () => void = () => undefined;
  /** Run serially: frame-loop events wait for their actions (a checkpoint's pages must not outrun beginCheckpoint). */
  private chain: Promise<void> = Promise.resolve();
  /** close() ran: the process exits. */
  private closed = false;
  readonly net: SecondaryNet;
  /** The SVM's guest crashed: seen at once, in the phase it crashed in (not behind the frame loop). */
  private readonly onPanicked = (message: string): void => {
    this.lastCrash = message;
    void this.dispatch({ type: 'guestCrashed', message }, true);
  };
  /** What the SVM's guest's last crash said (for a takeover refused because of it). */
  private lastCrash = '';

  constructor(private readonly host: DriverHost, private readonly session: IncomingSession, cache: SharedArrayBuffer | null, received: SharedArrayBuffer | null) {
    this.cache = cache;
    this.received = received;
    this.net = new SecondaryNet(host.vm, session);
  }

  start(): void {
    // At once, as a lost link: nothing after the failure may complete a checkpoint.
    this.session.onFailure((err) => void this.dispatch(channelFailure(err), true));
    this.host.vm.machine.on('panicked', this.onPanicked);
    void this.dispatch({ type: 'handoff' });
  }

  /**
   * x-colo-lost-heartbeat. Refused while the SVM's guest lies crashed with no checkpoint to
   * replace it (the primary's crashed too, or is gone; a checkpoint cut off by this failover
   * does not count): taken over, it would serve nothing, while COLO_EXIT (reason request) and
   * the log said it runs alone, and a supervisor took the service for saved. One whose apply is
   * under way is taken: the apply replaces the crashed guest, and the failover waits for it.
   */
  lostHeartbeat(): void {
    const st = this.host.vm.machine.runState;
    if ((st === 'guest-panicked' || st === 'internal-error') && this.core.phase !== 'applying' && this.core.failoverState === 'none') {
      throw new QmpCommandError('GenericError', `the secondary's guest crashed (${this.lastCrash || st}) and no checkpoint has replaced it: this node cannot take over`);
    }
    void this.dispatch({ type: 'lostHeartbeat' });
  }

  /**
   * The SVM's guest exited by itself: its output batched so far goes to the primary before the
   * process ends, then GUEST_EXITED (the primary waits for its own guest's exit, instead of
   * taking this process's end for a lost secondary). Never rejects.
   */
  async guestExited(): Promise<void> {
    this.net.flush();
    try {
      await this.dispatch({ type: 'guestExited' }, true);
      // The start or an apply ran the guest to its exit: the core tells the primary when that
      // step ends (after VMSTATE_LOADED), and the process must not end before.
      if (this.core.phase === 'starting' || this.core.phase === 'applying') {
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([this.chain, new Promise<void>((resolve) => (timer = setTimeout(resolve, limits.coloGuestExitDrainMs)))]);
        clearTimeout(timer);
      }
    } catch (err) {
      log.debug(`secondary: telling the primary the guest exited: ${errorMessage(err)}`);
    }
  }

  /**
   * The user's cont (after a stop), in turn with the checkpoints' pauses and applies. Refused
   * while a checkpoint holds the SVM (run state colo, as QEMU's qmp_cont), and outside the
   * phase where the SVM runs between checkpoints (its start sets up the tracking of its own
   * writes before it may run).
   */
  cont(): Promise<void> {
    const m = this.host.vm.machine;
    return this.ops.run(async () => {
      if (m.runState === 'colo' || this.core.phase !== 'running') throw new QmpCommandError('GenericError', 'COLO checkpoint in progress');
      if (!m.running) await m.cont();
    });
  }

  /**
   * Process exit: nothing more goes to the primary, and nothing fed to the core from now on
   * acts (as the primary's close): a pause or an apply that the exit's destroyed machine fails,
   * or the channels it closes, are the exit, not a broken checkpoint or link (no error that this
   * node lost its copy of the primary, no wait for x-colo-lost-heartbeat, no COLO_EXIT).
   */
  close(): void {
    this.closed = true;
    this.host.vm.machine.off('panicked', this.onPanicked);
    this.net.stop();
    this.pendingBlocks?.close();
  }

  yank(): void {
    void this.session.destroy().catch(() => undefined);
  }

  private get finishing(): boolean {
    return this.core.phase === 'failover' || this.core.phase === 'done';
  }

  private async pump(): Promise<void> {
    const s = this.session;
    for (;;) {
      let f: Frame;
      try {
        f = await s.nextFrame();
      } catch (err) {
        await this.dispatch(channelFailure(err), true);
        return;
      }
      if (this.finishing) return;
      try {
        if (f.type === FrameType.coloNet) {
          this.net.onFrame(f);
          continue;
        }
        if (f.type === FrameType.colo) {
          const msg = messageOf(f);
          log.debug(`secondary: received ${msg}`);
          latencyTrace?.event(`S<${msg}`);
          await this.dispatch({ type: 'message', msg });
          continue;
        }
        if (this.core.phase !== 'receiving') throw new Error(`frame type ${f.type} outside a checkpoint`);
        if (f.type === FrameType.roundEnd) {
          const r = parseJsonPayload(f);
          if (typeof r.round === 'number') await s.barrier(r.round, typeof r.channels === 'number' ? r.channels : -1);
          continue;
        }
        s.applyFrame(f);
        if (f.type === FrameType.deviceState) await this.dispatch({ type: 'stateReceived' });
      } catch (err) {
        if (this.finishing) return;
        if (err instanceof ChannelClosedError || s.receiverFailure !== null) {
          // A multifd channel that broke fails the barrier while the main channel still holds
          // the rest of the checkpoint: nothing after the break is read (the core drops it too).
          // A corrupt packet there is the stream's damage, not a lost link.
          await this.dispatch(channelFailure(s.receiverFailure ?? err), true);
          return;
        }
        await this.dispatch({ type: 'protocolError', message: errorMessage(err) });
        if (this.finishing) return;
      }
    }
  }

  /**
   * Step the core and perform its actions in order; resolves when they (and what they fed
   * back) are done. Frame-loop events queue behind each other (a checkpoint's pages must not
   * outrun beginCheckpoint); `inline` events (failover triggers, results fed back) run at once.
   */
  dispatch(ev: SecondaryEvent, inline = ev.type === 'lostHeartbeat' || ev.type === 'linkLost'): Promise<void> {
    if (inline) return this.process(ev);
    const p = this.chain.then(() => this.process(ev));
    this.chain = p.catch(() => undefined);
    return p;
  }

  private async process(ev: SecondaryEvent): Promise<void> {
    if (this.closed) {
      log.debug(`secondary: ${ev.type} ${'message' in ev ? `(${ev.message}) ` : ''}after close (the process exits)`);
      return;
    }
    const actions = this.core.step(ev);
    // COLO is over here (a takeover, or this node left): a crash from now on is the VM's own.
    if (this.core.phase === 'done' || this.core.phase === 'failover') this.host.vm.machine.off('panicked', this.onPanicked);
    for (const a of actions) {
      let next: SecondaryEvent | null;
      try {
        next = await this.perform(a);
      } catch (err) {
        if (this.finishing || this.closed) {
          log.debug(`secondary: ${errorMessage(err)} (${this.closed ? 'the process exits' : 'during failover'})`);
          next = null;
        } else if (a.type === 'apply') {
          // Whatever stopped it (a full disk, a device state the machine refuses), the guest
          // is now part old, part new.
          next = { type: 'applyFailed', message: errorMessage(err) };
        } else if (a.type === 'start') {
          next = { type: 'startFailed', message: errorMessage(err) };
        } else next = err instanceof ChannelClosedError || this.session.receiverFailure !== null ? { type: 'linkLost', message: errorMessage(err) } : { type: 'protocolError', message: errorMessage(err) };
      }
      if (next !== null) await this.process(next);
    }
  }

  private async perform(a: SecondaryAction): Promise<SecondaryEvent | null> {
    const vm = this.host.vm;
    const m = vm.machine;
    const s = this.session;
    switch (a.type) {
      case 'status':
        this.host.setStatus(a.status);
        return null;
      case 'log':
        log[a.level](a.message);
        return null;
      case 'start': {
        if (this.cache === null) {
          // No cache was attached during the initial migration (x-colo turned on late): copy guest RAM now.
          const bytes = m.maximumPages * limits.wasmPageBytes;
          this.cache = new SharedArrayBuffer(bytes);
          new Uint8Array(this.cache).set(m.ram());
          log.info('COLO: RAM cache copied from guest RAM at COLO start');
        }
        this.received ??= new SharedArrayBuffer(Math.ceil((m.maximumPages * limits.wasmPageBytes) / limits.pageBytes));
        await s.setPageTarget({ ram: false, cache: this.cache, received: this.received });
        // Disk blocks of a checkpoint wait (in memory up to a bound, then in a staging file)
        // like its pages wait in the cache: they reach the disk only in the apply, so a
        // failover mid-checkpoint leaves none behind.
        if (m.disk !== null) {
          const write = defaultDiskSink(m.disk);
          const pending = (this.pendingBlocks ??= new CheckpointBlocks(m.disk.blockCount));
          this.applyDiskBlocks = () => pending.apply(write);
          s.setDiskSink((block, data) => pending.put(block, data));
        }
        const tracker = vm.migration.dirtyTracker();
        tracker.reset(m.ram(), m.statePageRanges());
        // SVM output goes to the primary's compare; mirrored input comes in through pump().
        const outputPort = await this.net.start();
        // The SVM's own disk writes go to a layer dropped at every apply and committed at a
        // takeover, so its disk underneath stays the PVM's as of the last checkpoint.
        m.disk?.beginLayer();
        try {
          s.sendColo(outputPort === null ? { msg: 'CHECKPOINT_READY' } : { msg: 'CHECKPOINT_READY', outputPort });
        } catch (err) {
          // The link broke before COLO started: the SVM still runs and the frame loop reports
          // the break, so a failover (x-colo-lost-heartbeat) finds a started secondary.
          log.debug(`secondary: CHECKPOINT_READY not sent: ${errorMessage(err)}`);
        }
        await this.ops.run(async () => {
          if (!m.running) await m.cont();
        });
        void this.pump();
        return { type: 'started' };
      }
      case 'send':
        log.debug(`secondary: sending ${a.msg}`);
        s.sendColo({ msg: a.msg });
        return null;
      case 'pauseVm':
        await this.ops.run(async () => m.pause('colo'));
        latencyTrace?.event('S:paused');
        // The pause found the guest exited: no reply, the primary is told that instead.
        if (m.runState === 'shutdown') return { type: 'guestExited' };
        return { type: 'vmPaused' };
      case 'resumeVm':
        // Only what the checkpoint paused: a guest that exited or crashed meanwhile stays so,
        // and one the user stopped during the pause (run state paused) stays stopped.
        await this.ops.run(async () => {
          if (m.runState !== 'colo') return;
          m.setRunState('paused');
          await m.cont();
        });
        return null;
      case 'closeLink':
        await s.destroy().catch((err: unknown) => log.debug(`closing the COLO channels: ${errorMessage(err)}`));
        return null;
      case 'askCheckpoint':
        this.net.svmCrashed();
        return null;
      case 'beginCheckpoint':
        // The received map was emptied by the last apply; a blob can only be this checkpoint's.
        s.device = null;
        return null;
      case 'apply':
        await this.ops.run(async () => this.apply());
        latencyTrace?.event('S:applied');
        return { type: 'applied' };
      case 'failover':
        this.net.stop();
        await s.destroy().catch((err: unknown) => log.debug(`closing the COLO channels: ${errorMessage(err)}`));
        // The partial checkpoint (pages in the cache, disk blocks in memory, device blob) is
        // dropped: nothing of it reached guest RAM or the disk.
        this.dropCheckpointState();
        await this.ops.settled();
        try {
          await this.ops.run(async () => {
            if (m.runState === 'colo' || m.runState === 'inmigrate') m.setRunState('paused');
            if (m.disk !== null) {
              if (m.running) await m.pause('paused');
              const n = await this.commitLayer(m.disk);
              log.info(`secondary: committed ${n} disk blocks the guest wrote since the last checkpoint`);
            }
            if (!m.running) await m.cont();
            await vm.startFrontEnd({ untilFree: true });
          });
        } catch (err) {
          // The guest exited (in the relaunched apply's run, or under this takeover) or the
          // process is ending: the VM's own end, as on a primary whose guest exited, no error.
          if (this.host.closing || vm.exiting || m.runState === 'shutdown') {
            log.debug(`the secondary did not take over (${m.runState === 'shutdown' ? 'its guest exited' : 'shutting down'}): ${errorMessage(err)}`);
            return { type: 'failoverDone' };
          }
          // A crashed guest, a vCPU or front end that failed: nothing serves here (the core says it, once).
          return { type: 'takeoverFailed', message: errorMessage(err) };
        }
        return { type: 'failoverDone' };
      case 'abandon':
        this.net.stop();
        // (closeLink, just before, destroyed the channels)
        this.dropCheckpointState();
        // Not a state to run from: cont is refused from now on (vm.cont). A vCPU a failed
        // takeover left running is stopped; a crashed guest keeps saying so (query-status), as
        // on the primary.
        if (m.running) await m.pause('internal-error').catch((err: unknown) => log.debug(`stopping the guest: ${errorMessage(err)}`));
        if (m.runState !== 'guest-panicked') m.setRunState('internal-error');
        this.host.exited('secondary', 'error');
        return null;
      case 'exit':
        if (m.runState === 'shutdown') log.info(`COLO ended on the secondary (${a.reason}); its guest exited (the process ends)`);
        else log.info(`COLO ended on the secondary (${a.reason}); the VM runs here alone`);
        this.host.exited('secondary', a.reason);
        return null;
    }
  }

  /**
   * COLO ended on this node (its channels destroyed): what only a checkpoint uses goes. The
   * partial checkpoint is dropped, and the RAM cache (as large as guest RAM), its received map
   * and the staging file are freed: a survivor running alone must not keep twice its guest's
   * memory for good.
   */
  private dropCheckpointState(): void {
    this.session.device = null;
    this.pendingBlocks?.close();
    this.pendingBlocks = null;
    this.applyDiskBlocks = () => undefined;
    this.cache = null;
    this.received = null;
    this.session.dropPageTarget();
  }

  /**
   * Takeover: the SVM's own writes since the last checkpoint become its disk. When the host
   * cannot take them (a full filesystem under a sparse image), the VM waits in state io-error,
   * as for a guest write (BLOCK_IO_ERROR, one warning), and the commit is tried again every
   * limits.diskFullRetryMs: nothing written is lost, and the guest runs only on its whole disk.
   */
  private async commitLayer(disk: Disk): Promise<number> {
    const vm = this.host.vm;
    let since: number | null = null;
    for (;;) {
      try {
        const n = disk.commitLayer();
        if (since !== null) log.info(`secondary: the disk took the guest's writes after ${Date.now() - since} ms; the takeover goes on`);
        return n;
      } catch (err) {
        if (!(err instanceof DiskIoError) || this.host.closing) throw err;
        vm.event('BLOCK_IO_ERROR', { device: 'drive0', 'node-name': 'drive0', operation: 'write', action: 'stop', nospace: err.code === 'DISK_FULL', reason: err.message });
        if (since === null) {
          since = Date.now();
          vm.machine.setRunState('io-error');
          log.warn(`secondary: ${err.message}; the takeover waits in state io-error and tries again every ${limits.diskFullRetryMs} ms`);
        }
      }
      await new Promise((resolve) => setTimeout(resolve, limits.diskFullRetryMs));
    }
  }

  /** Copy received ∪ own-dirtied pages from the cache into guest RAM, load the device state, run. */
  private async apply(): Promise<void> {
    const vm = this.host.vm;
    const m = vm.machine;
    const s = this.session;
    const device = s.device;
    if (device === null || this.cache === null || this.received === null) throw new Error('apply without a complete checkpoint');
    const started = performance.now();
    latencyTrace?.event('S:applyStart');
    const ram = m.ram();
    const own = vm.migration.dirtyTracker().collect(ram, m.statePageRanges());
    const cache = new Uint8Array(this.cache);
    const received = new Uint8Array(this.received);
    const pb = limits.pageBytes;
    const pages = Math.min(ram.byteLength / pb, received.length);
    let copied = 0;
    const copy = (p: number): void => {
      ram.set(cache.subarray(p * pb, (p + 1) * pb), p * pb);
      copied += 1;
    };
    for (const p of own) {
      if (p < pages && received[p] === 0) copy(p);
    }
    // The SVM's dirty map is no page of its state, so no mark covers it; but when the
    // checkpoint's guest is larger, those pages are the PVM's guest pages (which the cache
    // holds). When it is smaller, the vCPU zeroes them with the rest above the new region.
    const r = m.region();
    for (let p = Math.floor(r.dirtyLogBase / pb); p < Math.min(pages, Math.ceil(r.dirtyLogEnd / pb)); p++) {
      if (received[p] === 0) copy(p);
    }
    for (let p = 0; p < pages; p++) {
      if (received[p] !== 0) {
        received[p] = 0;
        copy(p);
      }
    }
    checkDeviceRam(m, device, 'the checkpoint');
    const ownBlocks = m.disk?.dropLayer() ?? 0;
    this.applyDiskBlocks();
    // colo's region goes above the checkpoint's guest, whose size may differ from the SVM's:
    // the dirty map is then read where the guest will mark it, not at its old place (now
    // guest data, when the guest is larger).
    m.placeRegionFor(device.vcpu.globals['colo$pages'] as number);
    // The copy wrote RAM behind the guest's back: those writes are not the SVM's own. So did
    // placeRegionFor, above the new region (zeros where an SVM ahead had grown): a shadow
    // tracker must see those zeros too, or it keeps the SVM's old bytes there, and when the
    // guest grows back and writes the same bytes (it replays), it finds no change: the page
    // is neither copied at the next apply nor sent by a migration from here after a takeover.
    const [zeroedFrom, zeroedTo] = [m.region().end / pb, r.end / pb];
    const tracked: [number, number][] = zeroedFrom < zeroedTo ? [...m.statePageRanges(), [zeroedFrom, zeroedTo]] : m.statePageRanges();
    vm.migration.dirtyTracker().reset(m.ram(), tracked);
    this.net.nextEpoch();
    // The run state stays colo until the SVM runs (as QEMU's, whose secondary is in colo from
    // its checkpoint's stop to vm_start): paused here told a manager polling query-status
    // that someone had stopped the SVM.
    latencyTrace?.event('S:ramApplied');
    // Load the state and run it in one exchange with the vCPU thread.
    await m.restoreVcpu(device.vcpu, { run: true });
    s.device = null;
    log.debug(`secondary: checkpoint applied (${copied} pages, ${own.length} own, ${ownBlocks} own disk blocks dropped) in ${(performance.now() - started).toFixed(1)} ms`);
  }
}

/** Pause times and sizes of the primary's checkpoints (query-migrate's x-colo entry). */
export class CheckpointStats {
  lastPauseMs = 0;
  maxPauseMs = 0;
  lastBytes = 0;
  /** Checkpoints copied in the pause (the PVM ran on while they travelled), and sent from RAM with the PVM paused (too large to copy). */
  copied = 0;
  sentFromRam = 0;
  private totalBytes = 0;
  private sized = 0;
  private readonly pauses: number[] = [];
  private next = 0;

  notePause(ms: number): void {
    this.lastPauseMs = ms;
    this.maxPauseMs = Math.max(this.maxPauseMs, ms);
    if (this.pauses.length < limits.coloPauseSamplesMax) this.pauses.push(ms);
    else {
      this.pauses[this.next] = ms;
      this.next = (this.next + 1) % limits.coloPauseSamplesMax;
    }
  }

  noteBytes(bytes: number): void {
    this.lastBytes = bytes;
    this.totalBytes += bytes;
    this.sized += 1;
  }

  /** Mean and 99th percentile over the last limits.coloPauseSamplesMax pauses. */
  summary(): { mean: number; p99: number; samples: number; meanBytes: number } {
    const n = this.pauses.length;
    const sorted = [...this.pauses].sort((a, b) => a - b);
    const mean = n === 0 ? 0 : sorted.reduce((a, b) => a + b, 0) / n;
    const p99 = n === 0 ? 0 : sorted[Math.min(n - 1, Math.ceil(n * 0.99) - 1)]!;
    return { mean, p99, samples: n, meanBytes: this.sized === 0 ? 0 : this.totalBytes / this.sized };
  }
}
