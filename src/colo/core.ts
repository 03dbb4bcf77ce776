/**
 * COLO's pure state machines (ARCHITECTURE §5): events in, actions out, no I/O. The drivers
 * (primary.ts, secondary.ts) perform the actions on the migration session and the machine
 * and feed every result back as an event.
 */

/**
 * The COLO control messages: QEMU's seven, in the order one checkpoint uses them, then ours.
 * CHECKPOINT_ABANDONED (P → S, in place of VMSTATE_SEND): the PVM's guest exited before its
 * pause, so the checkpoint cannot be taken; the SVM, paused for it, runs on (to the same exit).
 * GUEST_EXITED (S → P, after the SVM's last output): the SVM's guest exited by itself and the
 * secondary's process ends; the primary waits (bounded) for its own guest's exit instead of
 * taking the end of the link for a lost secondary.
 */
export const coloMessages = [
  'CHECKPOINT_READY',
  'CHECKPOINT_REQUEST',
  'CHECKPOINT_REPLY',
  'VMSTATE_SEND',
  'VMSTATE_SIZE',
  'VMSTATE_RECEIVED',
  'VMSTATE_LOADED',
  'CHECKPOINT_ABANDONED',
  'GUEST_EXITED',
] as const;
export type ColoMessage = (typeof coloMessages)[number];

export function isColoMessage(x: unknown): x is ColoMessage {
  return typeof x === 'string' && (coloMessages as readonly string[]).includes(x);
}

/** QEMU's FailoverStatus. */
export type FailoverState = 'none' | 'require' | 'active' | 'completed' | 'relaunch';
export type ExitReason = 'request' | 'error';
export type ColoMode = 'primary' | 'secondary';

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

/**
 * Why a checkpoint was taken: the timer, the compare (outputs differ, or one side's output
 * waited too long), or a resynchronisation (mirrored input was lost with a broken channel).
 */
export type CheckpointReason = 'periodic' | 'mismatch' | 'timeout' | 'resync';

/** Events common to both sides. */
export type FailoverEvent =
  /** x-colo-lost-heartbeat on this node. */
  | { type: 'lostHeartbeat' }
  /** A channel broke (yank, dead peer). The primary fails over after a grace period; the secondary waits for lostHeartbeat. */
  | { type: 'linkLost'; message: string }
  /** No heartbeat came within the grace period after the link broke (primary only). */
  | { type: 'graceElapsed' }
  | { type: 'failoverDone' };

/**
 * What both sides' failovers share: the phase pair failover → done, QEMU's failover state,
 * the exit reason, and the one rule for a failover that has finished.
 */
abstract class FailoverBook<Phase extends string> {
  abstract phase: Phase | 'failover' | 'done';
  failoverState: FailoverState = 'none';
  exitReason: ExitReason | null = null;
  checkpoints = 0;
  /** A channel broke already (reported once). */
  protected linkLost = false;

  protected get finishing(): boolean {
    return this.phase === 'failover' || this.phase === 'done';
  }

  /** failoverDone: the node runs alone; status completed, COLO_EXIT. */
  protected completeFailover(): [{ type: 'status'; status: 'completed' }, { type: 'exit'; reason: ExitReason }] | [] {
    if (this.phase !== 'failover') return [];
    this.phase = 'done';
    this.failoverState = 'completed';
    return [{ type: 'status', status: 'completed' }, { type: 'exit', reason: this.exitReason ?? 'error' }];
  }

  /**
   * The failover could not run the node on: the VM does not serve, and saying it does (status
   * completed, COLO_EXIT reason request) made a supervisor take it for a survivor. As QEMU's
   * COLO ended by an error: status failed, COLO_EXIT reason error (abandon), `message` logged.
   */
  protected failoverFailed(message: string): [{ type: 'log'; level: 'error'; message: string }, { type: 'status'; status: 'failed' }, { type: 'abandon' }] | [] {
    if (this.phase !== 'failover') return [];
    this.phase = 'done';
    this.failoverState = 'completed';
    this.exitReason = 'error';
    return [{ type: 'log', level: 'error', message }, { type: 'status', status: 'failed' }, { type: 'abandon' }];
  }
}

// ---------------------------------------------------------------- primary

export type PrimaryPhase = 'idle' | 'waitReady' | 'resuming' | 'running' | 'requested' | 'pausing' | 'sending' | 'awaitReceived' | 'awaitLoaded' | 'failover' | 'done';

export type PrimaryEvent =
  | { type: 'handoff' }
  | { type: 'message'; msg: ColoMessage }
  | { type: 'timer' }
  /**
   * migrate-set-parameters changed x-checkpoint-delay. As in QEMU (colo_checkpoint_delay_set):
   * a checkpoint now, and the new delay from there.
   */
  | { type: 'delaySet' }
  /** The compare, or the network after losing mirrored input, asks for a checkpoint. */
  | { type: 'trigger'; reason: Exclude<CheckpointReason, 'periodic'> }
  /**
   * The secondary says its SVM crashed: a resync checkpoint replaces it, at once unless the
   * last one for a crash was asked for less than gapMs before `at` (ms, the driver's clock).
   */
  | { type: 'svmCrashed'; at: number; gapMs: number }
  /** The wait armed by armCrashTimer ended (`at`: now, the driver's clock). */
  | { type: 'crashTimer'; at: number }
  | { type: 'vmPaused' }
  /** The checkpoint's state (pages, disk blocks, device state) is copied: the PVM may run on while it travels. */
  | { type: 'stateCaptured' }
  | { type: 'stateSent' }
  | { type: 'vmResumed' }
  | { type: 'protocolError'; message: string }
  /** The PVM's guest crashed (GUEST_PANICKED, or its vCPU thread died): it will not run again. */
  | { type: 'guestCrashed'; message: string }
  /**
   * The PVM's guest exited by itself (proc_exit; also fed by a pause that found no guest): no
   * checkpoint starts any more (its pause would find no guest, and would pause the SVM before
   * it produced the output the compare waits for). One past the PVM's pause goes on; one
   * before it (requested, or pausing) cannot be taken and is abandoned (CHECKPOINT_ABANDONED),
   * so the SVM runs on and its copy of the guest's last output releases the PVM's. The process
   * ends soon after (close).
   */
  | { type: 'guestExited' }
  /**
   * The wait armed by armExitWait ended (`ms` long): the secondary's guest exited (GUEST_EXITED)
   * and this one has not.
   */
  | { type: 'exitWaitElapsed'; ms: number }
  /**
   * The process exits (the driver's close()): COLO ends here, silently. What fails from now on
   * (the machine destroyed under a pause, the channels closed) is the exit, not a fault, and
   * nothing is done any more: no timer, no failover, no COLO_EXIT.
   */
  | { type: 'close' }
  /**
   * The failover could not run the PVM on (a crashed guest, a vCPU or a front end that
   * failed): nothing serves here any more.
   */
  | { type: 'resumeFailed'; message: string }
  | FailoverEvent;

export type PrimaryAction =
  | { type: 'status'; status: 'colo' | 'completed' | 'failed' }
  | { type: 'send'; msg: ColoMessage }
  | { type: 'armTimer'; ms: number }
  /** Feed crashTimer after ms (one at a time; cleared with the other timers). */
  | { type: 'armCrashTimer'; ms: number }
  | { type: 'armGrace' }
  /** Feed exitWaitElapsed after limits.coloSvmExitWaitMs (cleared with the other timers). */
  | { type: 'armExitWait' }
  /**
   * The SVM is gone for good (its guest exited): stop mirroring, release all held output and
   * let the PVM's through uncompared from now on. No secondary is left that a release could
   * contradict, and holding it would stall every client until exitWaitElapsed.
   */
  | { type: 'uncompared' }
  | { type: 'pauseVm' }
  /** Collect and send the checkpoint; feed stateCaptured if the state was copied before it is sent, then stateSent. */
  | { type: 'sendState' }
  | { type: 'resumeVm' }
  /** VMSTATE_RECEIVED: the compare releases all held PVM output and starts a new epoch. */
  | { type: 'releaseHeld' }
  /** VMSTATE_LOADED: the SVM runs the checkpoint's state (the compare waits for its output from now on). */
  | { type: 'checkpointDone'; reason: CheckpointReason }
  /**
   * Close the channels, make sure the PVM runs, then stop mirroring and release held output, and
   * feed failoverDone; feed resumeFailed if the PVM cannot run.
   */
  | { type: 'failover'; reason: ExitReason }
  | { type: 'exit'; reason: ExitReason }
  /**
   * The guest crashed: stop timers, drop held output, stop mirroring, close the channels, leave
   * the VM as it is, COLO_EXIT (reason error). Nothing is fed back.
   */
  | { type: 'leave' }
  /**
   * The failover could not run the PVM: drop held output, keep the guest stopped (not in a
   * state to run from), COLO_EXIT (reason error). Nothing is fed back.
   */
  | { type: 'abandon' }
  | { type: 'log'; level: LogLevel; message: string };

export class PrimaryCore extends FailoverBook<PrimaryPhase> {
  phase: PrimaryPhase = 'idle';
  readonly checkpointsBy: Record<CheckpointReason, number> = { periodic: 0, mismatch: 0, timeout: 0, resync: 0 };
  /** Reason of the checkpoint in flight. */
  private reason: CheckpointReason = 'periodic';
  /** A trigger that came while no checkpoint could start and none in flight covers it. */
  private wanted: CheckpointReason | null = null;
  /**
   * The PVM was told to resume in the checkpoint in flight (at stateCaptured, or else at
   * VMSTATE_RECEIVED), and it runs again (vmResumed): both before VMSTATE_LOADED, usually.
   */
  private resumeAsked = false;
  private pvmResumed = false;
  /**
   * When the last resync for an SVM crash was asked for, and whether the next one waits for its
   * gap (armCrashTimer). A state that crashes the SVM each time it runs would otherwise be
   * checkpointed back to back, the PVM paused most of the time; a crash now and then is
   * replaced at once.
   */
  private crashResyncAt: number | null = null;
  private crashResyncDue = false;
  /** The PVM's guest exited: no checkpoint is requested any more. */
  private guestExited = false;
  /** The SVM's guest exited (GUEST_EXITED): the secondary's process ends, and no checkpoint starts. */
  private svmExited = false;

  constructor(private readonly delayMs: () => number) {
    super();
  }

  step(ev: PrimaryEvent): PrimaryAction[] {
    switch (ev.type) {
      case 'handoff':
        if (this.phase !== 'idle') return [];
        this.phase = 'waitReady';
        return [{ type: 'status', status: 'colo' }];
      case 'message':
        return this.onMessage(ev.msg);
      case 'timer':
        if (this.phase !== 'running') return [];
        return this.request('periodic');
      case 'delaySet':
        // Waiting on the timer: the checkpoint now (it re-arms with the new delay when it ends).
        // A checkpoint in flight, or COLO's start, arms the timer with the new delay anyway.
        return this.phase === 'running' ? this.request('periodic') : [];
      case 'trigger':
        if (this.phase === 'running') return this.request(ev.reason);
        if (ev.reason === 'resync') {
          // Mirrored input was lost: the checkpoint in flight may have captured the PVM before
          // it took that input, so the next checkpoint is needed whatever the phase, and it
          // counts as this one (it also covers any compare trigger remembered).
          if (this.phase !== 'idle' && this.phase !== 'failover' && this.phase !== 'done') this.wanted = 'resync';
          return [];
        }
        // Before the first checkpoint, or once the one in flight passed VMSTATE_RECEIVED (the
        // compare is in a new epoch), the trigger is about output the next checkpoint must
        // cover. Between CHECKPOINT_REQUEST and VMSTATE_RECEIVED the checkpoint in flight covers it
        // (output the PVM produces after stateCaptured is compared only from VMSTATE_RECEIVED on,
        // and reported then if it differs or waits too long).
        if (this.phase === 'waitReady' || this.phase === 'resuming' || this.phase === 'awaitLoaded') this.wanted ??= ev.reason;
        return [];
      case 'svmCrashed': {
        if (this.phase === 'idle' || this.finishing) return [];
        const wait = this.crashResyncAt === null ? 0 : this.crashResyncAt + ev.gapMs - ev.at;
        if (wait <= 0) return this.crashResync(ev.at);
        if (this.crashResyncDue) return [];
        this.crashResyncDue = true;
        return [{ type: 'armCrashTimer', ms: Math.ceil(wait) }];
      }
      case 'crashTimer':
        // A checkpoint asked for since (crashResyncDue cleared) replaced the crashed SVM already.
        if (!this.crashResyncDue || this.finishing) return [];
        return this.crashResync(ev.at);
      case 'vmPaused':
        if (this.phase !== 'pausing') return [];
        this.phase = 'sending';
        this.resumeAsked = false;
        this.pvmResumed = false;
        return [{ type: 'send', msg: 'VMSTATE_SEND' }, { type: 'sendState' }];
      case 'stateCaptured':
        // The checkpoint is a copy now: the PVM runs on while it travels. Whichever node dies
        // before VMSTATE_RECEIVED, the survivor's state is the last checkpoint's or later and
        // no output of the PVM after its pause has been released (the compare holds it for
        // the next epoch), so nothing a client saw is lost.
        if (this.phase !== 'sending' || this.resumeAsked) return [];
        this.resumeAsked = true;
        return [{ type: 'resumeVm' }];
      case 'stateSent':
        if (this.phase !== 'sending') return [];
        this.phase = 'awaitReceived';
        return [];
      case 'vmResumed':
        if (this.phase === 'sending' || this.phase === 'awaitReceived' || this.phase === 'awaitLoaded') {
          this.pvmResumed = true;
          return [];
        }
        if (this.phase !== 'resuming') return [];
        this.phase = 'running';
        return this.next();
      case 'protocolError':
        return this.startFailover('error', ev.message);
      case 'guestCrashed':
        return this.leave(ev.message);
      case 'guestExited':
        this.guestExited = true;
        // The pause asked for finds no guest (CHECKPOINT_REPLY came before the exit was seen).
        return this.phase === 'pausing' ? this.abandon() : [];
      case 'exitWaitElapsed':
        // A deterministic guest makes the same way to the same exit on both nodes: this one
        // did not, so the runs diverged, and the secondary, gone, protects nothing.
        if (this.finishing || this.guestExited) return [];
        return this.startFailover('error', `the secondary's guest exited ${ev.ms} ms ago and this one has not: the two runs diverged; going on unprotected`);
      case 'close':
        this.phase = 'done';
        return [];
      case 'lostHeartbeat':
        return this.startFailover('request', 'x-colo-lost-heartbeat: the secondary is declared lost');
      case 'linkLost':
        if (this.finishing || this.linkLost) return [];
        this.linkLost = true;
        // The secondary said its guest exited: its process ended, as expected. The wait for this
        // guest's exit (armExitWait) bounds what follows, not the grace of a lost link.
        if (this.svmExited) return [{ type: 'log', level: 'debug', message: `COLO channel closed (${ev.message}) after the secondary's guest exited` }];
        return [{ type: 'log', level: 'info', message: `COLO channel closed (${ev.message}); waiting for x-colo-lost-heartbeat` }, { type: 'armGrace' }];
      case 'graceElapsed':
        return this.startFailover('error', 'the link to the secondary broke');
      case 'failoverDone':
        return this.completeFailover();
      case 'resumeFailed':
        return this.resumeFailed(ev.message);
    }
  }

  /** The failover could not run the PVM on: saying it goes on unprotected would be a lie (failoverFailed). */
  private resumeFailed(message: string): PrimaryAction[] {
    return this.failoverFailed(`the primary could not go on alone after the failover (${message}): the VM does not run; COLO ended with reason error`);
  }

  /** Running again after a checkpoint (or COLO start): a remembered trigger, or the timer. */
  private next(): PrimaryAction[] {
    const wanted = this.wanted;
    this.wanted = null;
    if (wanted !== null) return this.request(wanted);
    return [{ type: 'armTimer', ms: this.delayMs() }];
  }

  private crashResync(at: number): PrimaryAction[] {
    this.crashResyncAt = at;
    this.crashResyncDue = false;
    return this.step({ type: 'trigger', reason: 'resync' });
  }

  private request(reason: CheckpointReason): PrimaryAction[] {
    if (this.guestExited || this.svmExited) {
      this.phase = 'running';
      return [];
    }
    // Any checkpoint from here on replaces an SVM that crashed before it.
    this.crashResyncDue = false;
    this.phase = 'requested';
    this.reason = reason;
    return [{ type: 'send', msg: 'CHECKPOINT_REQUEST' }];
  }

  private onMessage(msg: ColoMessage): PrimaryAction[] {
    if (this.finishing) return [];
    const expect = (phase: PrimaryPhase, want: ColoMessage): boolean => this.phase === phase && msg === want;
    if (msg === 'GUEST_EXITED' && (this.phase === 'running' || this.phase === 'resuming' || this.phase === 'requested')) return this.svmGuestExited();
    if (expect('waitReady', 'CHECKPOINT_READY')) {
      this.phase = 'resuming';
      return [{ type: 'resumeVm' }];
    }
    if (expect('requested', 'CHECKPOINT_REPLY')) {
      if (this.guestExited) return this.abandon();
      this.phase = 'pausing';
      return [{ type: 'pauseVm' }];
    }
    if (expect('awaitReceived', 'VMSTATE_RECEIVED')) {
      // The secondary holds the whole checkpoint and its apply is one step a failover cannot
      // split: whichever node dies from here on, the survivor's state is this checkpoint's or
      // later. So a PVM that could not run on at stateCaptured (its state was sent from its
      // RAM, not copied) resumes now, while the SVM applies (QEMU waits for VMSTATE_LOADED).
      this.phase = 'awaitLoaded';
      if (this.resumeAsked) return [{ type: 'releaseHeld' }];
      this.resumeAsked = true;
      return [{ type: 'releaseHeld' }, { type: 'resumeVm' }];
    }
    if (expect('awaitLoaded', 'VMSTATE_LOADED')) {
      this.countCheckpoint();
      const done: PrimaryAction = { type: 'checkpointDone', reason: this.reason };
      if (!this.pvmResumed) {
        this.phase = 'resuming';
        return [done];
      }
      this.phase = 'running';
      return [done, ...this.next()];
    }
    return this.startFailover('error', `unexpected COLO message ${msg} in phase ${this.phase}`);
  }

  /**
   * The checkpoint asked for cannot be taken: the PVM's guest exited before its pause. The
   * secondary, whose SVM waits paused for VMSTATE_SEND, is told so and runs the SVM on: it
   * makes the same way to the same exit, and its copy of the guest's last output releases the
   * PVM's, which the compare holds (left paused, it never came and that output was dropped at
   * the exit). Nothing of the checkpoint was sent, and none starts any more.
   */
  private abandon(): PrimaryAction[] {
    this.phase = 'running';
    return [
      { type: 'log', level: 'info', message: "COLO: the guest exited before the checkpoint's pause: checkpoint abandoned; the SVM runs on to its own end" },
      { type: 'send', msg: 'CHECKPOINT_ABANDONED' },
    ];
  }

  /**
   * GUEST_EXITED: the SVM's guest exited by itself, after its last output (which releases the
   * PVM's), and the secondary's process ends. It can come between checkpoints, or in place of
   * CHECKPOINT_REPLY (the SVM's pause found its guest exited): that checkpoint is not taken,
   * none starts any more, and the PVM is not paused for a node that is gone. This guest, on
   * the same way, exits too; if it does not within limits.coloSvmExitWaitMs, the runs diverged
   * (exitWaitElapsed). Meanwhile its output is released uncompared: with the SVM gone no
   * takeover can contradict it, and a diverged PVM's output would otherwise wait that long for
   * a copy that never comes.
   */
  private svmGuestExited(): PrimaryAction[] {
    this.svmExited = true;
    this.wanted = null;
    if (this.phase === 'requested') this.phase = 'running';
    // This guest exited first and its process waits for its last output's copy: an SVM that
    // answered otherwise (the runs diverged at the end) sends none, and that output was dropped
    // after limits.coloGuestExitDrainMs. With the SVM gone nothing can contradict it: released.
    if (this.guestExited) return [{ type: 'log', level: 'info', message: "COLO: the secondary's guest exited too" }, { type: 'uncompared' }];
    return [
      { type: 'log', level: 'info', message: "COLO: the secondary's guest exited (its process ends): no checkpoint starts any more, this guest's output goes to its clients uncompared; waiting for this guest's own exit" },
      { type: 'uncompared' },
      { type: 'armExitWait' },
    ];
  }

  private countCheckpoint(): void {
    this.checkpoints += 1;
    this.checkpointsBy[this.reason] += 1;
  }

  /**
   * COLO ends before VMSTATE_LOADED came, after VMSTATE_RECEIVED: the checkpoint happened all
   * the same (the secondary holds all of it and applies it, a failover waits for that apply;
   * the primary released the output it covers), so it counts, as on the secondary.
   */
  private countCutCheckpoint(): void {
    if (this.phase === 'awaitLoaded') this.countCheckpoint();
  }

  private startFailover(reason: ExitReason, message: string): PrimaryAction[] {
    if (this.finishing || this.phase === 'idle') return [];
    this.countCutCheckpoint();
    this.phase = 'failover';
    this.failoverState = 'active';
    this.exitReason = reason;
    return [{ type: 'log', level: reason === 'request' ? 'info' : 'warn', message: `COLO failover on the primary: ${message}` }, { type: 'failover', reason }];
  }

  /**
   * The PVM's guest crashed. As with QEMU's default panic action the VM stays stopped in
   * guest-panicked, and a guest that does not run has no state to checkpoint: the primary
   * leaves COLO (reason error) instead of sending its dead guest into the healthy SVM. It does
   * not fail over (there is nothing to run alone), and its held output is dropped, not
   * released: the secondary keeps the last checkpoint and is the one to take over (its
   * supervisor or an operator decides, with x-colo-lost-heartbeat), so a reply released now
   * could be contradicted (invariant 1). A checkpoint in flight stays whole or is dropped there.
   */
  private leave(message: string): PrimaryAction[] {
    if (this.finishing || this.phase === 'idle') return [];
    this.countCutCheckpoint();
    this.phase = 'done';
    this.exitReason = 'error';
    return [
      {
        type: 'log',
        level: 'warn',
        message: `COLO ended on the primary: its guest crashed (${message}); the VM stays stopped, the output it held is dropped, and the secondary keeps the last checkpoint until a failover`,
      },
      { type: 'status', status: 'completed' },
      { type: 'leave' },
    ];
  }
}

// ---------------------------------------------------------------- secondary

export type SecondaryPhase = 'idle' | 'starting' | 'running' | 'pausing' | 'replied' | 'receiving' | 'applying' | 'failover' | 'done';

export type SecondaryEvent =
  | { type: 'handoff' }
  | { type: 'started' }
  /** The start action failed (the SVM could not be run, its channels set up): COLO never ran. */
  | { type: 'startFailed'; message: string }
  | { type: 'message'; msg: ColoMessage }
  | { type: 'vmPaused' }
  /** Pages (after the barrier) and device blob of the checkpoint are all in. */
  | { type: 'stateReceived' }
  | { type: 'applied' }
  /** The apply broke off half-way (a full disk, a device state the machine refuses). */
  | { type: 'applyFailed'; message: string }
  /** The takeover broke off (the SVM could not be run, its front end not started): this node does not serve. */
  | { type: 'takeoverFailed'; message: string }
  /** The primary's stream cannot be trusted; `corrupt`: it arrived damaged (a checksum, a packet out of order), a fault to log as an error. */
  | { type: 'protocolError'; message: string; corrupt?: boolean }
  /** The SVM's guest crashed (GUEST_PANICKED): a trap the PVM did not take. */
  | { type: 'guestCrashed'; message: string }
  /**
   * The SVM's guest exited by itself (proc_exit; also fed by a checkpoint's pause that found
   * it exited), its output batched so far sent: the process ends soon after.
   */
  | { type: 'guestExited' }
  | FailoverEvent;

export type SecondaryAction =
  | { type: 'status'; status: 'colo' | 'completed' | 'failed' }
  /** Prepare the RAM cache, reset own dirty tracking, send CHECKPOINT_READY, run the SVM, then feed started. */
  | { type: 'start' }
  | { type: 'send'; msg: ColoMessage }
  | { type: 'pauseVm' }
  /** The checkpoint the SVM was paused for was abandoned, or cut off by a broken channel: run it on (unless it stopped for good or by the user). */
  | { type: 'resumeVm' }
  | { type: 'beginCheckpoint' }
  | { type: 'apply' }
  /** Tell the primary the SVM crashed: it takes a checkpoint at once (a resync). */
  | { type: 'askCheckpoint' }
  /** Close the channels (the stream from the primary cannot be trusted); feed nothing back. */
  | { type: 'closeLink' }
  /** Close the channels, drop any partial checkpoint, run the SVM alone, start its front end, then feed failoverDone. */
  | { type: 'failover'; reason: ExitReason }
  | { type: 'exit'; reason: ExitReason }
  /** This node's state is not a checkpoint any more: keep the guest stopped for good, COLO_EXIT. */
  | { type: 'abandon' }
  | { type: 'log'; level: LogLevel; message: string };

export class SecondaryCore extends FailoverBook<SecondaryPhase> {
  phase: SecondaryPhase = 'idle';
  private pending: { reason: ExitReason; message: string } | null = null;
  /** SVM crashes in a row (each right after the checkpoint that replaced the last), and whether one came since the last apply. */
  private crashStreak = 0;
  private crashedSinceApply = false;
  private crashedInApply = false;
  /** The SVM's guest exited while the start or an apply ran it: the primary is told when that ends. */
  private exitedInStep = false;

  step(ev: SecondaryEvent): SecondaryAction[] {
    switch (ev.type) {
      case 'handoff':
        if (this.phase !== 'idle') return [];
        this.phase = 'starting';
        return [{ type: 'status', status: 'colo' }, { type: 'start' }];
      case 'started':
        if (this.phase !== 'starting') return [];
        this.phase = 'running';
        if (this.pending === null && this.exitedInStep) return this.guestExited();
        return this.afterRelaunch();
      case 'startFailed': {
        // No 'started' will come. The node holds the whole initial migration, a state the
        // primary had, so it can still take over: it closes the link (the primary goes on
        // alone) and waits for x-colo-lost-heartbeat, or carries out one that came meanwhile.
        if (this.phase !== 'starting') return [];
        this.phase = 'running';
        return [...this.closeLinkOnce(`COLO could not start on the secondary (${ev.message}); closing the link, waiting for x-colo-lost-heartbeat to take over`), ...this.afterRelaunch()];
      }
      case 'message':
        return this.onMessage(ev.msg);
      case 'vmPaused':
        if (this.phase !== 'pausing') return [];
        if (this.linkLost) {
          // A channel broke during the pause (the main one may live on: a multifd channel
          // broke). No checkpoint can arrive whole, so none is answered: a reply would make the
          // primary pause its PVM for nothing, and the SVM, which can take over, runs on.
          this.phase = 'running';
          return [{ type: 'log', level: 'info', message: 'COLO: a channel broke while the SVM paused for a checkpoint: not answered; the SVM runs on' }, { type: 'resumeVm' }];
        }
        this.phase = 'replied';
        return [{ type: 'send', msg: 'CHECKPOINT_REPLY' }];
      case 'stateReceived':
        // Frames the main channel still delivers after a channel broke may end a checkpoint
        // whose pages did not all come (a multifd channel closed before its SYNC): never apply it.
        if (this.linkLost) return [{ type: 'log', level: 'info', message: 'the rest of a checkpoint came after a COLO channel broke: dropped, not applied' }];
        if (this.phase !== 'receiving') return this.streamBroken('checkpoint state outside a checkpoint');
        this.phase = 'applying';
        return [{ type: 'send', msg: 'VMSTATE_RECEIVED' }, { type: 'apply' }];
      case 'applied': {
        if (this.phase !== 'applying') return [];
        this.checkpoints += 1;
        this.phase = 'running';
        const streak = this.crashStreakEnded();
        if (this.pending !== null) return [...streak, ...this.afterRelaunch()];
        if (this.exitedInStep) return [...streak, { type: 'send', msg: 'VMSTATE_LOADED' }, ...this.guestExited()];
        return [...streak, { type: 'send', msg: 'VMSTATE_LOADED' }];
      }
      case 'applyFailed':
        if (this.phase !== 'applying') return [];
        return this.applyFailed(ev.message);
      case 'protocolError':
        return this.streamBroken(ev.message, ev.corrupt === true ? 'error' : 'warn');
      case 'guestCrashed':
        return this.guestCrashed(ev.message);
      case 'guestExited':
        if (this.phase === 'starting' || this.phase === 'applying') {
          this.exitedInStep = true;
          return [];
        }
        return this.guestExited();
      case 'lostHeartbeat':
        return this.startFailover('request', 'x-colo-lost-heartbeat: the primary is declared lost');
      case 'linkLost':
        if (this.finishing || this.linkLost) return [];
        this.linkLost = true;
        // A secondary never promotes itself: a broken link may be only a broken link, and two
        // nodes serving would break invariant 4. It waits for x-colo-lost-heartbeat.
        return [{ type: 'log', level: 'info', message: `COLO channel closed (${ev.message}); waiting for x-colo-lost-heartbeat to take over` }];
      case 'graceElapsed':
        return [];
      case 'failoverDone':
        return this.completeFailover();
      case 'takeoverFailed':
        return this.takeoverFailed(ev.message);
    }
  }

  /** The takeover broke off: the guest is kept stopped and nothing serves here (failoverFailed). */
  private takeoverFailed(message: string): SecondaryAction[] {
    return this.failoverFailed(`the secondary could not take over (${message}): the VM does not serve here; COLO ended with reason error`);
  }

  private onMessage(msg: ColoMessage): SecondaryAction[] {
    // After a broken channel no checkpoint starts or goes on: the stream has a hole.
    if (this.finishing || this.pending !== null || this.linkLost) return [];
    if (this.phase === 'running' && msg === 'CHECKPOINT_REQUEST') {
      this.phase = 'pausing';
      return [{ type: 'pauseVm' }];
    }
    if (this.phase === 'replied' && msg === 'VMSTATE_SEND') {
      this.phase = 'receiving';
      return [{ type: 'beginCheckpoint' }];
    }
    if (this.phase === 'replied' && msg === 'CHECKPOINT_ABANDONED') {
      // The PVM's guest exited before its pause: the SVM's state is still the one to compare.
      this.phase = 'running';
      return [{ type: 'log', level: 'info', message: "COLO: the primary's guest exited before the checkpoint's pause: checkpoint abandoned; the SVM runs on" }, { type: 'resumeVm' }];
    }
    if (this.phase === 'receiving' && msg === 'VMSTATE_SIZE') return [];
    return this.streamBroken(`unexpected COLO message ${msg} in phase ${this.phase}`);
  }

  /**
   * The SVM's guest crashed: its run diverged from the PVM's (a trap only it took). Its state
   * is not the PVM's any more, and a dead guest cannot take over, so the primary is asked for a
   * checkpoint now (QEMU's next checkpoint restarts a stopped SVM the same way; waiting for the
   * periodic one left this node unable to take over for up to x-checkpoint-delay). A crash
   * while the checkpoint in flight pauses it needs none: that checkpoint replaces it. With the
   * link lost or a failover waiting, no checkpoint can come.
   */
  private guestCrashed(message: string): SecondaryAction[] {
    if (this.finishing || this.phase === 'idle') return [];
    if (this.linkLost || this.pending !== null) {
      return [{ type: 'log', level: 'warn', message: `the SVM's guest crashed (${message}) and no checkpoint can replace it now (${this.linkLost ? 'the link to the primary is lost' : 'a failover waits'}): this node cannot take over` }];
    }
    // A guest that crashes again right after each checkpoint (a trap its state leads to only
    // here) is said once, not once per checkpoint; the streak's end is said at info.
    // The apply's own run crashed: that is after the apply (applied comes next).
    if (this.phase === 'applying') this.crashedInApply = true;
    else this.crashedSinceApply = true;
    this.crashStreak += 1;
    const level = this.crashStreak === 1 ? 'warn' : 'debug';
    if (this.phase === 'pausing') return [{ type: 'log', level, message: `the SVM's guest crashed (${message}); the checkpoint in flight replaces it` }];
    return [
      { type: 'log', level, message: `the SVM's guest crashed (${message})${this.crashStreak > 1 ? ` again (${this.crashStreak} in a row)` : ''}; asking the primary for a checkpoint to replace it` },
      { type: 'askCheckpoint' },
    ];
  }

  /**
   * The SVM's guest exited by itself, and the process ends: the primary is told (GUEST_EXITED,
   * after the SVM's last output, in place of CHECKPOINT_REPLY if a checkpoint's pause found the
   * guest exited), so that it waits for its own guest's exit instead of taking the end of the
   * link for a lost secondary. COLO ends here, silently, as on a primary whose guest exited.
   * After a takeover, or with the link lost or a failover waiting, the exit is the VM's own.
   */
  private guestExited(): SecondaryAction[] {
    this.exitedInStep = false;
    if (this.finishing || this.phase === 'idle' || this.linkLost || this.pending !== null) return [];
    this.phase = 'done';
    return [
      { type: 'log', level: 'info', message: "COLO: the SVM's guest exited; telling the primary (the process ends)" },
      { type: 'send', msg: 'GUEST_EXITED' },
    ];
  }

  /** At an apply: the SVM ran the last checkpoint without crashing, after a streak of crashes. */
  private crashStreakEnded(): SecondaryAction[] {
    const ended = !this.crashedSinceApply && this.crashStreak > 0;
    const n = this.crashStreak;
    this.crashedSinceApply = this.crashedInApply;
    this.crashedInApply = false;
    if (!ended) return [];
    this.crashStreak = 0;
    return [{ type: 'log', level: 'info', message: `the SVM ran a checkpoint without crashing, after ${n} crash${n === 1 ? '' : 'es'}` }];
  }

  /**
   * The primary's stream cannot be trusted (a protocol error). The primary may still be
   * serving, so — as for a broken link — the secondary does not promote itself (invariant 4):
   * it closes the channels (the primary sees the link break and goes on alone) and waits for
   * x-colo-lost-heartbeat. Nothing of a partial checkpoint was applied.
   */
  private streamBroken(message: string, level: 'warn' | 'error' = 'warn'): SecondaryAction[] {
    // Once the link is lost the stream has ended: what is said of it after (the same channel
    // failure seen again by the frame loop) is not a fault of its own.
    if (this.finishing || this.linkLost) return [];
    return this.closeLinkOnce(`COLO stream from the primary is broken (${message}); closing it and waiting for x-colo-lost-heartbeat to take over`, level);
  }

  /** Say why (at warn level unless told), and close the link unless it is lost already. */
  private closeLinkOnce(why: string, level: 'warn' | 'error' = 'warn'): SecondaryAction[] {
    const log: SecondaryAction = { type: 'log', level, message: why };
    if (this.linkLost) return [log];
    this.linkLost = true;
    return [log, { type: 'closeLink' }];
  }

  /**
   * The apply broke off half-way: guest RAM, disk and devices no longer hold one checkpoint, so
   * this node can never take over (a takeover must start from a state the primary had). It
   * leaves COLO, closes the link (the primary sees it break and goes on alone) and keeps its
   * guest stopped; a failover that waited for the apply is refused.
   */
  private applyFailed(message: string): SecondaryAction[] {
    const refused = this.pending !== null;
    this.pending = null;
    this.phase = 'done';
    this.failoverState = 'none';
    this.exitReason = 'error';
    const why = `the checkpoint could not be applied (${message}): this node no longer holds a copy of the primary; it leaves COLO and will not take over`;
    return [
      { type: 'log', level: 'error', message: refused ? `${why} (the failover requested during the apply is refused)` : why },
      { type: 'closeLink' },
      { type: 'status', status: 'failed' },
      { type: 'abandon' },
    ];
  }

  private startFailover(reason: ExitReason, message: string): SecondaryAction[] {
    if (this.finishing || this.phase === 'idle') return [];
    if (this.phase === 'applying' || this.phase === 'starting') {
      // The apply (or the start) is one step a failover cannot split: finish it first. As
      // QEMU's states: a failover that came during the apply was picked up and put off until
      // it ends (relaunch); one that came before COLO's loop runs waits for it (require).
      if (this.pending === null) this.pending = { reason, message };
      else if (reason === 'request') this.pending.reason = 'request';
      this.failoverState = this.phase === 'applying' ? 'relaunch' : 'require';
      return [{ type: 'log', level: 'info', message: `COLO failover requested during the ${this.phase === 'applying' ? 'apply' : 'start'}; it runs when that finishes` }];
    }
    this.phase = 'failover';
    this.failoverState = 'active';
    this.exitReason = reason;
    return [{ type: 'log', level: reason === 'request' ? 'info' : 'warn', message: `COLO failover on the secondary: ${message}` }, { type: 'failover', reason }];
  }

  private afterRelaunch(): SecondaryAction[] {
    const p = this.pending;
    if (p === null) return [];
    this.pending = null;
    return this.startFailover(p.reason, p.message);
  }
}
