/**
 * The two nodes of the simulation. Each runs the REAL state machine from src/colo/core.ts and
 * performs its actions the way src/colo/driver.ts does, with coroutines in simulated time in
 * place of promises: VM pause/resume/apply serialised through VmOps, the primary's tasks whose
 * failures become linkLost or protocolError, the secondary's frame loop whose events queue
 * behind each other while failover triggers run inline, its RAM cache and received set.
 */
import {
  PrimaryCore,
  SecondaryCore,
  type PrimaryAction,
  type PrimaryEvent,
  type SecondaryAction,
  type SecondaryEvent,
} from '../../../src/colo/core.js';
import { limits } from '../../../src/core/limits.js';
import { ChannelClosed, Disk, Guest, type Device, type Endpoint, type Link, type Val, type Wire } from './model.js';
import { Signal, VmOps, settle, sleep, spawn, wait, type Co, type Handle, type Owner, type Sim } from './runtime.js';

/** A VM stop or start as the drivers do it: through the node's serial VM operations, taking a little time. */
function switchVm(w: World, ops: VmOps, g: Guest, to: 'stop' | 'start'): ReturnType<VmOps['run']> {
  return ops.run(function* () {
    yield* sleep(w.ms(0.2, 4));
    // As Machine: a panicked guest neither pauses nor resumes (pauseAndSave finds it stopped, cont refuses).
    if (g.crashed) throw new Error('the guest is in state guest-panicked');
    if (to === 'stop') g.stop();
    else g.start();
  });
}

/** What the nodes need from the world around them. */
export interface World {
  readonly sim: Sim;
  readonly link: Link;
  rnd(): number;
  /** Random simulated duration in [lo, hi) ms. */
  ms(lo: number, hi: number): number;
  trace(line: string): void;
  /** A named point of the protocol was reached (fault triggers count these). */
  hook(name: string): void;
  readonly graceMs: number;
  readonly boundMs: number;
  /** The PVM's state at its pause for checkpoint ck (invariant 3's reference). */
  snapshot(ck: number, ram: Val[], device: Device, disk: Val[]): void;
  /** The secondary finished applying checkpoint ck (invariant 3 is checked now). */
  applied(ck: number): void;
  /** The SVM wrote a page or a disk block of its own (kept until the next apply, committed at a takeover). */
  svmWrote(what: 'page' | 'block', i: number, v: Val): void;
  /** An SVM tick ended: its device state is its own from here on. */
  svmTicked(device: Device): void;
  /** The secondary starts serving after its failover: its state is checked now. */
  takeover(): void;
  /**
   * The secondary's frame loop reads on after a broken channel (the core must still drop the
   * rest of that checkpoint: the driver stopping there is one guard, the core the other).
   */
  readonly readOnAfterBreak: boolean;
  checkpointDone(): void;
  /** The primary armed its checkpoint timer. */
  timerArmed(): void;
  /** VMSTATE_RECEIVED on the primary: the compare released the held output of checkpoint ck. */
  released(ck: number): void;
  /** An expected outcome did not happen (invariant or check name, what). */
  violate(inv: string, detail: string): void;
}

/** Deliberately broken drivers, to show the checks can fail. */
export type Broken =
  | 'writeThrough'
  | 'noOwnDirty'
  | 'selfPromote'
  | 'takeoverPaused'
  | 'dropTriggers'
  | 'applyErrorAsStreamError'
  | 'runAfterBrokenApply'
  | 'sendLiveAfterResume'
  | 'ignoreDelaySet'
  /** The compare releases the held output once the checkpoint is sent, not at VMSTATE_RECEIVED. */
  | 'releaseAtSend'
  /** The secondary's frame loop does not wait at a round's sync for the pages still on the multifd channels. */
  | 'noBarrier'
  /** The secondary's frame loop skips a frame whose payload does not parse and reads on. */
  | 'skipDamaged'
  /** The secondary does not close the link after a broken apply (the primary waits for VMSTATE_LOADED). */
  | 'keepLinkAfterBrokenApply';

/** A damaged stream (driver.ts: a StreamError other than STREAM_TRUNCATED). */
class CorruptStream extends Error {}

function showEvent(ev: PrimaryEvent | SecondaryEvent): string {
  if (ev.type === 'trigger') return `trigger (${ev.reason})`;
  return ev.type === 'message' ? `message ${ev.msg}` : ev.type === 'linkLost' || ev.type === 'protocolError' ? `${ev.type} (${ev.message})` : ev.type;
}

/** core.step, and a violation that says so when it throws (the run stops there, the seed printed). */
function stepCore<E extends PrimaryEvent | SecondaryEvent, A>(w: World, who: string, core: { phase: string; step(ev: E): A[] }, ev: E): A[] {
  const phase = core.phase;
  try {
    return core.step(ev);
  } catch (err) {
    w.violate('throw', `the ${who}'s core threw on ${showEvent(ev)} in phase ${phase}: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    throw err;
  }
}

function showActions(as: readonly (PrimaryAction | SecondaryAction)[]): string {
  return as
    .filter((a) => a.type !== 'log')
    .map((a) => (a.type === 'send' ? `send ${a.msg}` : a.type === 'failover' || a.type === 'exit' ? `${a.type}(${a.reason})` : a.type))
    .join(', ');
}

// ---------------------------------------------------------------- primary

export class PrimaryNode implements Endpoint {
  readonly owner: Owner = { dead: false };
  readonly core: PrimaryCore;
  readonly guest: Guest;
  private readonly dirtyPages = new Set<number>();
  private readonly dirtyBlocks = new Set<number>();
  /** The checkpoint the PVM's current writes belong to. */
  private epoch = 1;
  private sentCk = 0;
  private timer: Handle | null = null;
  /** x-checkpoint-delay, which management may change while COLO runs. */
  private delayMs: number;
  private grace: Handle | null = null;
  /** The wait for the PVM's exit after GUEST_EXITED (driver.ts armExitWait). */
  private exitWait: Handle | null = null;
  /** When GUEST_EXITED came (null: it did not). */
  /** When GUEST_EXITED reached the primary (the wait for its own guest's exit began). */
  svmExitedAt: number | null = null;
  private readonly ops: VmOps;
  /** Invariant 5: by this time the primary must have finished its failover. */
  deadline: number | null = null;
  exits = 0;
  /** The event that started this node's failover (its COLO_EXIT reason depends on it). */
  private failoverCause: PrimaryEvent['type'] | null = null;
  /** The compare stopped (failover): no more triggers. */
  compareStopped = false;
  /** The driver's close() ran (the process is exiting): the core must not act any more. */
  closed = false;
  /** The core left COLO after its guest crashed (action leave). */
  left = false;

  constructor(private readonly w: World, delayMs: number, ram: Val[], device: Device, disk: Val[], private readonly broken: Broken | null) {
    this.delayMs = delayMs;
    this.core = new PrimaryCore(() => this.delayMs);
    this.ops = new VmOps(w.sim, this.owner);
    this.guest = new Guest(w.sim, this.owner, () => w.rnd(), ram, device, new Disk(disk), {
      tag: () => ({ src: 'P', ck: this.epoch }),
      page: (p) => this.dirtyPages.add(p),
      block: (b) => this.dirtyBlocks.add(b),
    });
  }

  private get finishing(): boolean {
    return this.core.phase === 'failover' || this.core.phase === 'done';
  }

  /** The primary node runs the service front end from the start, and after a failover (a panicked guest answers nobody). */
  get serving(): boolean {
    return !this.owner.dead && !this.guest.crashed;
  }

  start(): void {
    this.dispatch({ type: 'handoff' });
  }

  lostHeartbeat(): void {
    this.dispatch({ type: 'lostHeartbeat' });
  }

  private setTimer(ms: number): void {
    this.timer?.cancel();
    this.timer = this.w.sim.after(
      ms,
      () => {
        this.timer = null;
        this.dispatch({ type: 'timer' });
      },
      this.owner,
    );
  }

  /** migrate-set-parameters x-checkpoint-delay (MigrationControl → ColoController → delaySet). */
  setDelay(ms: number): void {
    this.delayMs = ms;
    if (this.broken !== 'ignoreDelaySet') this.dispatch({ type: 'delaySet' });
  }

  /** The compare reports a mismatch or an output timeout; the network, lost mirrored input (resync). */
  trigger(reason: 'mismatch' | 'timeout' | 'resync'): void {
    if (this.compareStopped || this.broken === 'dropTriggers') return;
    this.dispatch({ type: 'trigger', reason });
  }

  deliver(f: Wire): void {
    if (f.k !== 'colo') {
      this.dispatch({ type: 'protocolError', message: `unexpected ${f.k} frame on the primary` });
      return;
    }
    this.w.hook(`P.recv.${f.msg}`);
    if (f.msg === 'GUEST_EXITED') this.svmExitedAt ??= this.w.sim.now;
    this.dispatch({ type: 'message', msg: f.msg });
  }

  linkLost(reason: string): void {
    this.dispatch({ type: 'linkLost', message: reason });
  }

  /** The PVM's guest panics: Machine's 'panicked' event (driver.ts onPanicked). */
  guestCrashed(): void {
    this.guest.crash();
    this.dispatch({ type: 'guestCrashed', message: 'simulated guest panic' });
  }

  /** driver.ts PrimaryDriver.close(): the process is exiting. */
  close(): void {
    this.closed = true;
    this.dispatch({ type: 'close' });
    this.clearTimersAndDiscard();
  }

  /**
   * driver.ts clearTimers and PrimaryNet.discard (held output dropped, no more triggers): at
   * close, failover and leave.
   */
  private clearTimersAndDiscard(): void {
    this.timer?.cancel();
    this.grace?.cancel();
    this.exitWait?.cancel();
    this.timer = null;
    this.grace = null;
    this.exitWait = null;
    this.compareStopped = true;
  }

  dispatch(ev: PrimaryEvent): void {
    if (this.owner.dead) return;
    const now = this.w.sim.now;
    // After GUEST_EXITED the end of the link is the secondary's exit: the wait for the PVM's own
    // exit bounds what follows (the simulated PVM's guest never exits: a failover at its end).
    const exitDue = this.svmExitedAt === null ? null : this.svmExitedAt + limits.coloSvmExitWaitMs - now;
    const bound = (ev.type === 'linkLost' ? (exitDue ?? this.w.graceMs) : 0) + this.w.boundMs;
    if (ev.type === 'lostHeartbeat' || ev.type === 'linkLost' || ev.type === 'protocolError' || ev.type === 'graceElapsed') {
      this.deadline = Math.min(this.deadline ?? Infinity, now + bound);
    }
    const phase = this.core.phase;
    const closedBefore = this.closed && ev.type !== 'close';
    const actions = stepCore(this.w, 'primary', this.core, ev);
    this.w.trace(`P ${showEvent(ev)} [${phase}→${this.core.phase}] → ${showActions(actions)}`);
    this.expect(ev, phase, actions, closedBefore);
    for (const a of actions) this.perform(a);
  }

  /** What core.ts promises for the events that end COLO on the primary. */
  private expect(ev: PrimaryEvent, before: PrimaryCore['phase'], actions: readonly PrimaryAction[], closedBefore: boolean): void {
    const c = this.core;
    const has = (t: PrimaryAction['type']): boolean => actions.some((a) => a.type === t);
    const active = before !== 'idle' && before !== 'failover' && before !== 'done';
    if (closedBefore && actions.length > 0) this.w.violate('close', `after close the primary's core still acts: ${ev.type} → ${showActions(actions) || 'log'}`);
    if (ev.type === 'close' && (c.phase !== 'done' || actions.length > 0)) this.w.violate('close', `close left the primary's core in phase ${c.phase} with actions [${showActions(actions)}]`);
    if (ev.type === 'guestCrashed' && active && !closedBefore && (c.phase !== 'done' || c.exitReason !== 'error' || !has('leave') || has('failover'))) {
      this.w.violate('crash', `after its guest crashed (phase ${before}) the primary must leave COLO (reason error) without a failover, but it is in phase ${c.phase}, reason ${c.exitReason}, actions [${showActions(actions)}]`);
    }
    if (ev.type === 'protocolError' && active && !closedBefore && (c.phase !== 'failover' || c.exitReason !== 'error' || !has('failover'))) {
      this.w.violate('5', `after a protocol error (phase ${before}) the primary must fail over (reason error), but it is in phase ${c.phase}, reason ${c.exitReason}, actions [${showActions(actions)}]`);
    }
    if (has('failover')) {
      this.failoverCause = ev.type;
      // A broken link alone waits for x-colo-lost-heartbeat for the grace period (docs/migration-protocol.md).
      if (ev.type === 'graceElapsed' && this.svmExitedAt !== null) this.w.violate('svmExit', `the primary failed over for a lost link (phase ${before}) after the secondary said its guest exited`);
      if (ev.type === 'linkLost') this.w.violate('grace', `the primary failed over as soon as its link broke (phase ${before}), without waiting ${this.w.graceMs} ms for x-colo-lost-heartbeat`);
    }
    // COLO_EXIT's reason, as QEMU's: request after a failover x-colo-lost-heartbeat asked for, error otherwise.
    for (const a of actions) {
      if (a.type !== 'exit') continue;
      const want = this.failoverCause === 'lostHeartbeat' ? 'request' : 'error';
      if (a.reason !== want) this.w.violate('exit', `the primary's COLO_EXIT has reason ${a.reason} after a failover started by ${this.failoverCause ?? 'nothing'} (want ${want})`);
    }
  }

  /** driver.ts PrimaryDriver.task */
  private task(work: Co<PrimaryEvent | null>): void {
    const s: Signal<PrimaryEvent | null> = spawn(this.w.sim, this.owner, work);
    s.onSettled(() => {
      if (!s.failed) {
        if (s.value !== null && s.value !== undefined) this.dispatch(s.value);
        return;
      }
      if (this.finishing) return;
      const message = s.error instanceof Error ? s.error.message : String(s.error);
      // guestStopped(): the guest stopped for good under a pause or a resume.
      if (this.guest.crashed) {
        this.dispatch({ type: 'guestCrashed', message });
        return;
      }
      if (s.error instanceof ChannelClosed || this.w.link.closed[0]) this.dispatch({ type: 'linkLost', message });
      else this.dispatch({ type: 'protocolError', message });
    }, this.owner);
  }

  private send(f: Wire): void {
    this.w.link.send(0, f);
  }

  /** Stop or start the PVM as a task; at the end, the protocol point and the core's event. */
  private switchTask(to: 'stop' | 'start', hook: string, type: 'vmPaused' | 'vmResumed'): void {
    const w = this.w;
    const ops = this.ops;
    const g = this.guest;
    this.task(
      (function* (): Co<PrimaryEvent> {
        yield* wait(switchVm(w, ops, g, to));
        w.hook(hook);
        return { type };
      })(),
    );
  }

  private perform(a: PrimaryAction): void {
    const w = this.w;
    const g = this.guest;
    const self = this;
    switch (a.type) {
      case 'status':
      case 'log':
        return;
      case 'send':
        if (a.msg === 'CHECKPOINT_REQUEST') w.hook('P.send.CHECKPOINT_REQUEST');
        try {
          this.send({ k: 'colo', msg: a.msg });
        } catch (err) {
          this.dispatch({ type: 'linkLost', message: (err as Error).message });
        }
        return;
      case 'armTimer':
        w.timerArmed();
        this.setTimer(a.ms);
        return;
      case 'armCrashTimer':
        throw new Error('armCrashTimer: the simulated SVM never crashes, so nothing asks for a crash resync');
      case 'armGrace':
        this.grace ??= w.sim.after(w.graceMs, () => this.dispatch({ type: 'graceElapsed' }), this.owner);
        return;
      case 'uncompared':
        this.compareStopped = true;
        return;
      case 'armExitWait':
        this.exitWait ??= w.sim.after(limits.coloSvmExitWaitMs, () => this.dispatch({ type: 'exitWaitElapsed', ms: limits.coloSvmExitWaitMs }), this.owner);
        return;
      case 'pauseVm':
        this.switchTask('stop', 'P.vmPaused', 'vmPaused');
        return;
      case 'sendState':
        this.task(
          (function* (): Co<PrimaryEvent> {
            // collectDirty: the PVM is paused, this is its state for the checkpoint.
            const ck = ++self.sentCk;
            self.epoch = ck + 1;
            w.hook('P.sendState');
            w.snapshot(ck, g.ram, g.device, g.disk.view());
            const pages = [...self.dirtyPages].sort((x, y) => x - y);
            const blocks = [...self.dirtyBlocks].sort((x, y) => x - y);
            self.dirtyPages.clear();
            self.dirtyBlocks.clear();
            yield* sleep(w.ms(0.05, 2)); // saveVcpu
            // captureCheckpoint: most checkpoints are copied (pages, blocks, device state) and
            // the PVM runs on while the copy travels; one too large to copy is read from RAM
            // as it is sent, the PVM paused until VMSTATE_RECEIVED (as sendRound does).
            const captured = w.rnd() < 0.8;
            const copy = captured
              ? { ram: new Map(pages.map((p): [number, Val] => [p, g.ram[p]!])), disk: new Map(blocks.map((b): [number, Val] => [b, g.disk.read(b)])), dev: { ...g.device } }
              : null;
            const live = copy === null || self.broken === 'sendLiveAfterResume';
            if (copy !== null) {
              w.hook('P.stateCaptured');
              self.dispatch({ type: 'stateCaptured' });
            }
            // The pages in several frames.
            const chunk = 1 + Math.floor(w.rnd() * 12);
            let frames = 0;
            for (let i = 0; i < pages.length; i += chunk) {
              yield* sleep(w.ms(0.05, 1.5));
              self.send({ k: 'pages', ck, pages: pages.slice(i, i + chunk).map((p): [number, Val] => [p, live ? g.ram[p]! : copy.ram.get(p)!]) });
              frames += 1;
            }
            // With multifd the pages went on their channels: the round's sync tells how many.
            if (w.link.multifd > 0) self.send({ k: 'sync', ck, frames });
            if (blocks.length > 0) {
              yield* sleep(w.ms(0.05, 1.5));
              self.send({ k: 'disk', ck, blocks: blocks.map((b): [number, Val] => [b, live ? g.disk.read(b) : copy.disk.get(b)!]) });
            }
            self.send({ k: 'colo', msg: 'VMSTATE_SIZE' });
            self.send({ k: 'device', ck, dev: live ? { ...g.device } : copy.dev });
            w.hook('P.stateSent');
            if (self.broken === 'releaseAtSend') w.released(ck);
            return { type: 'stateSent' };
          })(),
        );
        return;
      case 'releaseHeld':
        w.hook('P.releaseHeld');
        w.released(this.sentCk);
        return;
      case 'checkpointDone':
        w.checkpointDone();
        return;
      case 'resumeVm':
        this.switchTask('start', 'P.vmResumed', 'vmResumed');
        return;
      case 'failover':
        this.clearTimersAndDiscard();
        w.hook('P.failover');
        spawn(
          w.sim,
          this.owner,
          (function* () {
            w.link.destroy(0, 'the primary closed the COLO channels');
            yield* settle(self.ops.settled());
            yield* settle(switchVm(w, self.ops, g, 'start'));
            self.dispatch({ type: 'failoverDone' });
          })(),
        );
        return;
      case 'exit':
        this.exits += 1;
        return;
      case 'leave':
        // driver.ts: timers cleared, held output dropped (not released), channels closed, COLO_EXIT.
        this.left = true;
        this.clearTimersAndDiscard();
        this.exits += 1;
        w.link.destroy(0, 'the primary left COLO (its guest crashed)');
        return;
    }
  }
}

// ---------------------------------------------------------------- secondary

export class SecondaryNode implements Endpoint {
  readonly owner: Owner = { dead: false };
  readonly core = new SecondaryCore();
  readonly guest: Guest;
  private readonly ops: VmOps;
  /** The RAM cache (pages of the PVM as of the last checkpoint, plus the one being received). */
  readonly cache: Val[];
  private readonly received = new Set<number>();
  private readonly ownDirty = new Set<number>();
  private readonly pendingBlocks = new Map<number, Val>();
  private device: { ck: number; dev: Device } | null = null;
  appliedCk = 0;
  private readonly inbox: Wire[] = [];
  private frameWaiter: Signal<void> | null = null;
  /** Page frames of each checkpoint the multifd channels delivered (the round barrier counts them). */
  private readonly multifdFrames = new Map<number, number>();
  /** A round's sync had to wait for pages still on the multifd channels. */
  barrierWaited = false;
  private chain: Signal<void>;
  serving = false;
  deadline: number | null = null;
  sawRelaunch = false;
  droppedAfterBreak = false;
  /** The core was told a channel broke, or closed the link itself. */
  private knowsLinkBroken = false;
  exits = 0;
  /** The next apply breaks off half-way (fault applyFails: a full disk). */
  failNextApply = false;
  /** The core gave this node up after a broken apply (action abandon). */
  abandoned = false;
  /** Its guest exited by itself: the process is ending. */
  exited = false;
  /** When x-colo-lost-heartbeat first reached this node (null: never). */
  heartbeatLostAt: number | null = null;
  /** The start action fails (fault startFails): the SVM could not be run. */
  failStart = false;
  /** When the core was told the start failed (null: never). */
  startFailedAt: number | null = null;

  constructor(private readonly w: World, ram: Val[], device: Device, disk: Val[], private readonly broken: Broken | null) {
    this.ops = new VmOps(w.sim, this.owner);
    // The cache was filled by the initial migration: it equals guest RAM at COLO start.
    this.cache = [...ram];
    this.guest = new Guest(w.sim, this.owner, () => w.rnd(), ram, device, new Disk(disk), {
      tag: () => ({ src: 'S', ck: -1 }),
      page: (p) => {
        this.ownDirty.add(p);
        w.svmWrote('page', p, this.guest.ram[p]!);
      },
      block: (b) => w.svmWrote('block', b, this.guest.disk.read(b)),
      ticked: () => w.svmTicked(this.guest.device),
    });
    this.chain = spawn(w.sim, this.owner, (function* () {})());
  }

  private get finishing(): boolean {
    return this.core.phase === 'failover' || this.core.phase === 'done';
  }

  start(): void {
    void this.dispatch({ type: 'handoff' });
  }

  lostHeartbeat(): void {
    this.heartbeatLostAt ??= this.w.sim.now;
    void this.dispatch({ type: 'lostHeartbeat' });
  }

  deliver(f: Wire): void {
    this.inbox.push(f);
    this.wakePump();
  }

  /** A multifd receive worker: the pages go into the cache whatever the frame loop does. */
  deliverPages(f: Wire & { k: 'pages' }): void {
    this.applyFrame(f);
    this.multifdFrames.set(f.ck, (this.multifdFrames.get(f.ck) ?? 0) + 1);
    this.multifdFrames.delete(f.ck - 3);
    this.w.hook('S.frame.pages');
    this.wakePump();
  }

  /** driver.ts SecondaryDriver.start: session.onFailure reports a multifd receiver's failure at once, as a lost link. */
  multifdLost(reason = 'a multifd channel closed'): void {
    this.wakePump();
    void this.dispatch({ type: 'linkLost', message: reason });
  }

  /** session.barrier: every page frame of checkpoint ck is in, or a channel broke. */
  private *barrier(ck: number, frames: number): Co<void> {
    for (;;) {
      if ((this.multifdFrames.get(ck) ?? 0) >= frames) return;
      if (this.w.link.multifdBroken || this.w.link.closed[1]) throw new ChannelClosed(`the round barrier of checkpoint ${ck} failed: a multifd channel closed`);
      this.barrierWaited = true;
      this.frameWaiter = new Signal<void>(this.w.sim);
      yield* settle(this.frameWaiter);
    }
  }

  /** The SVM's guest exits by itself: driver.ts SecondaryDriver.guestExited (the process then ends). */
  guestExited(): void {
    this.exited = true;
    this.guest.stop();
    void this.dispatch({ type: 'guestExited' }, true);
  }

  linkLost(reason: string): void {
    this.wakePump();
    void this.dispatch({ type: 'linkLost', message: reason });
    // A secondary that promotes itself when its link breaks: what the core must never do.
    if (this.broken === 'selfPromote') void this.dispatch({ type: 'lostHeartbeat' });
  }

  private wakePump(): void {
    const s = this.frameWaiter;
    this.frameWaiter = null;
    s?.resolve();
  }

  private *nextFrame(): Co<Wire> {
    for (;;) {
      const f = this.inbox.shift();
      // A frame whose checksum fails: reading the stream fails (StreamError, not a closed channel).
      if (f?.k === 'corrupt' && f.checksum) throw new CorruptStream(`frame checksum mismatch in ${f.was}`);
      if (f !== undefined) return f;
      if (this.w.link.closed[1]) throw new ChannelClosed('the COLO channel is closed');
      this.frameWaiter = new Signal<void>(this.w.sim);
      yield* settle(this.frameWaiter);
    }
  }

  /** driver.ts SecondaryDriver.pump */
  private *pump(): Co<void> {
    for (;;) {
      let f: Wire;
      try {
        f = yield* this.nextFrame();
      } catch (err) {
        // driver.ts channelFailure: a damaged stream is a protocol error (corrupt), an ended one a lost link.
        const message = (err as Error).message;
        yield* settle(this.dispatch(err instanceof CorruptStream ? { type: 'protocolError', message, corrupt: true } : { type: 'linkLost', message }, true));
        return;
      }
      if (this.finishing) return;
      try {
        if (f.k === 'colo') {
          this.w.hook(`S.recv.${f.msg}`);
          yield* wait(this.dispatch({ type: 'message', msg: f.msg }));
          continue;
        }
        // session.barrier: a multifd channel closed before its SYNC.
        if (f.k === 'lost') throw new ChannelClosed(`the round barrier of checkpoint ${f.ck} failed: a multifd channel closed`);
        // A frame that passed its checksum but does not parse: a protocol error; the loop reads on (as driver.ts).
        if (f.k === 'corrupt') {
          if (this.broken === 'skipDamaged') continue;
          throw new Error(`malformed ${f.was}`);
        }
        if (this.core.phase !== 'receiving') throw new Error(`frame ${f.k} outside a checkpoint`);
        if (f.k === 'sync') {
          if (this.broken !== 'noBarrier') yield* this.barrier(f.ck, f.frames);
          continue;
        }
        this.applyFrame(f);
        this.w.hook(`S.frame.${f.k}`);
        if (f.k === 'device') yield* wait(this.dispatch({ type: 'stateReceived' }));
      } catch (err) {
        if (this.finishing) return;
        const message = (err as Error).message;
        if (err instanceof ChannelClosed) {
          // As driver.ts: nothing after a broken channel is read.
          yield* settle(this.dispatch({ type: 'linkLost', message }));
          if (!this.w.readOnAfterBreak) return;
        } else yield* settle(this.dispatch({ type: 'protocolError', message }));
        if (this.finishing) return;
      }
    }
  }

  /** session.applyFrame with the page target set to the cache (never guest RAM). */
  private applyFrame(f: Wire): void {
    switch (f.k) {
      case 'pages':
        for (const [p, v] of f.pages) {
          this.cache[p] = v;
          this.received.add(p);
          if (this.broken === 'writeThrough') this.guest.ram[p] = v;
        }
        return;
      case 'disk':
        for (const [b, v] of f.blocks) this.pendingBlocks.set(b, v);
        return;
      case 'device':
        this.device = { ck: f.ck, dev: { ...f.dev } };
        return;
      case 'colo':
      case 'corrupt':
        return;
    }
  }

  dispatch(ev: SecondaryEvent, inline = ev.type === 'lostHeartbeat' || ev.type === 'linkLost'): Signal<void> {
    const sim = this.w.sim;
    if (inline) return spawn(sim, this.owner, this.process(ev));
    const prev = this.chain;
    const self = this;
    const p = spawn(
      sim,
      this.owner,
      (function* () {
        yield* settle(prev);
        yield* self.process(ev);
      })(),
    );
    this.chain = p;
    return p;
  }

  private *process(ev: SecondaryEvent): Co<void> {
    if (this.owner.dead) return;
    // A protocol error alone does not make a secondary take over (invariant 4): it waits for
    // lostHeartbeat like after a broken link. Only lostHeartbeat starts the clock.
    if (ev.type === 'lostHeartbeat') {
      this.deadline = Math.min(this.deadline ?? Infinity, this.w.sim.now + this.w.boundMs);
    }
    const phase = this.core.phase;
    const actions = stepCore(this.w, 'secondary', this.core, ev);
    if (ev.type === 'startFailed') this.startFailedAt ??= this.w.sim.now;
    // A failover is right only if x-colo-lost-heartbeat came meanwhile (it waited for the start).
    if (ev.type === 'startFailed' && phase === 'starting' && (this.core.phase === 'starting' || actions.some((a) => (a.type === 'failover' && this.heartbeatLostAt === null) || a.type === 'start'))) {
      this.w.violate('start', `after its start failed the secondary must close the link and wait (phase ${this.core.phase}, actions [${showActions(actions)}])`);
    }
    // After a channel broke no checkpoint starts (the stream has a hole): an SVM paused for one
    // would answer CHECKPOINT_REPLY on a main channel that may live on, and the primary would
    // pause its PVM for a checkpoint that cannot complete.
    if (this.knowsLinkBroken && actions.some((a) => a.type === 'pauseVm' || (a.type === 'send' && a.msg === 'CHECKPOINT_REPLY'))) {
      this.w.violate('hole', `the secondary ${actions.some((a) => a.type === 'pauseVm') ? 'pauses its SVM for' : 'answers'} a checkpoint (${showEvent(ev)} in phase ${phase}) after it knew a COLO channel broke`);
    }
    if (ev.type === 'linkLost' || actions.some((a) => a.type === 'closeLink')) this.knowsLinkBroken = true;
    if (this.core.failoverState === 'relaunch') this.sawRelaunch = true;
    if (actions.some((a) => a.type === 'log' && a.message.includes('came after a COLO channel broke'))) this.droppedAfterBreak = true;
    this.w.trace(`S ${showEvent(ev)} [${phase}→${this.core.phase}] → ${showActions(actions)}`);
    for (const a of actions) {
      let next: SecondaryEvent | null;
      try {
        next = yield* this.perform(a);
      } catch (err) {
        const message = (err as Error).message;
        if (this.finishing) next = null;
        // applyErrorAsStreamError: the driver before it knew applyFailed.
        else if (a.type === 'apply' && this.broken !== 'applyErrorAsStreamError') next = { type: 'applyFailed', message };
        else if (a.type === 'start') next = { type: 'startFailed', message };
        else next = err instanceof ChannelClosed ? { type: 'linkLost', message } : { type: 'protocolError', message };
      }
      if (next !== null) yield* this.process(next);
    }
  }

  private *perform(a: SecondaryAction): Co<SecondaryEvent | null> {
    const w = this.w;
    const g = this.guest;
    const self = this;
    switch (a.type) {
      case 'status':
      case 'log':
      case 'askCheckpoint': // the simulated SVM never crashes
        return null;
      case 'start': {
        w.hook('S.start');
        yield* sleep(w.ms(0.05, 2)); // await session.setPageTarget(...)
        if (this.failStart) throw new Error('simulated: the COLO output channel could not be opened');
        this.ownDirty.clear();
        g.disk.beginLayer();
        try {
          w.link.send(1, { k: 'colo', msg: 'CHECKPOINT_READY' });
        } catch (err) {
          // As driver.ts: a link that broke before COLO started leaves a started SVM; the
          // frame loop reports the break.
          if (!(err instanceof ChannelClosed)) throw err;
        }
        yield* wait(switchVm(w, this.ops, g, 'start'));
        spawn(w.sim, this.owner, this.pump());
        w.hook('S.started');
        return { type: 'started' };
      }
      case 'send':
        w.link.send(1, { k: 'colo', msg: a.msg });
        return null;
      case 'pauseVm':
        yield* wait(switchVm(w, this.ops, g, 'stop'));
        w.hook('S.vmPaused');
        return { type: 'vmPaused' };
      case 'resumeVm':
        // A pause whose checkpoint a broken channel cut off (CHECKPOINT_ABANDONED does not come:
        // the simulated PVM's guest never exits).
        yield* wait(switchVm(w, this.ops, g, 'start'));
        return null;
      case 'beginCheckpoint':
        this.device = null;
        return null;
      case 'apply':
        w.hook('S.apply');
        yield* wait(this.ops.run(() => this.apply()));
        w.hook('S.applied');
        return { type: 'applied' };
      case 'closeLink':
        if (this.broken === 'keepLinkAfterBrokenApply' && this.core.phase === 'done') return null;
        w.link.destroy(1, 'the secondary closed the COLO channels (protocol error)');
        return null;
      case 'failover':
        w.hook('S.failover');
        w.link.destroy(1, 'the secondary closed the COLO channels');
        // The partial checkpoint is dropped: nothing of it reached guest RAM or the disk.
        this.device = null;
        this.pendingBlocks.clear();
        yield* settle(this.ops.settled());
        yield* settle(
          this.ops.run(function* () {
            if (g.running) {
              yield* sleep(w.ms(0.2, 4));
              g.stop();
            }
            g.disk.commitLayer();
            yield* sleep(w.ms(0.2, 4));
            if (self.broken !== 'takeoverPaused') g.start();
            self.serving = true; // startFrontEnd
            w.trace('S serves clients');
            w.takeover();
          }),
        );
        return { type: 'failoverDone' };
      case 'exit':
        this.exits += 1;
        // A secondary fails over only when x-colo-lost-heartbeat asks it to: QEMU's reason request.
        if (a.reason !== 'request') w.violate('exit', `the secondary's COLO_EXIT after its takeover has reason ${a.reason}, not request`);
        return null;
      case 'abandon':
        // driver.ts: the guest stays stopped for good (run state internal-error).
        this.abandoned = true;
        this.exits += 1;
        w.trace('S abandoned: its guest is half old, half new');
        if (this.broken === 'runAfterBrokenApply') this.guest.start(); // as an 'exit' would: "the VM runs here alone"
        return null;
    }
  }

  /** driver.ts SecondaryDriver.apply: one step a failover cannot split. */
  private *apply(): Co<void> {
    const w = this.w;
    if (this.device === null) throw new Error('apply without a complete checkpoint');
    yield* sleep(w.ms(0.5, 8));
    const g = this.guest;
    const device = this.device;
    const own = this.broken === 'noOwnDirty' ? [] : [...this.ownDirty];
    for (const p of own) if (!this.received.has(p)) g.ram[p] = this.cache[p]!;
    for (const p of this.received) g.ram[p] = this.cache[p]!;
    this.received.clear();
    g.disk.dropLayer();
    let written = 0;
    const failAfter = this.failNextApply ? Math.floor(this.pendingBlocks.size / 2) : -1;
    for (const [b, v] of this.pendingBlocks) {
      if (written === failAfter) break;
      g.disk.base[b] = v;
      written += 1;
    }
    if (failAfter >= 0) {
      // As a full disk stops driver.ts applyDiskBlocks: RAM copied, some blocks written.
      this.failNextApply = false;
      throw new Error(`simulated: no space left on device after ${written} of ${this.pendingBlocks.size} disk blocks`);
    }
    this.pendingBlocks.clear();
    g.device = { ...device.dev };
    this.device = null;
    this.ownDirty.clear();
    this.appliedCk = device.ck;
    w.applied(device.ck);
    g.start();
  }
}
