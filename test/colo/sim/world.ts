/**
 * One seeded run of the COLO simulation: builds the two nodes and the link, draws a fault
 * scenario from the seed, runs the event queue and checks ARCHITECTURE §7's invariants 2, 3,
 * 4 and 5, 1 at a takeover (no output released from a checkpoint the survivor lacks), the
 * outcomes core.ts promises for the events that end COLO, and liveness before any fault and
 * after the last one, after every step; at the end the primary closes and must not act any more.
 */
import type { ColoMessage } from '../../../src/colo/core.js';
import { linkLossGraceMs } from '../../../src/colo/driver.js';
import { limits } from '../../../src/core/limits.js';
import { rng } from '../../framework/rng.js';
import { BLOCKS, Link, PAGES, mix, sameVal, showVal, type Device, type Drain, type Val, type Wire } from './model.js';
import { PrimaryNode, SecondaryNode, type Broken, type World } from './nodes.js';
import { Sim } from './runtime.js';

/** After a failover starts (or the heartbeat is declared lost) it must be done within this. */
const BOUND_MS = 500;
/**
 * After the last fault, a live primary still in COLO must complete a checkpoint within the
 * grace period plus this (the longest notice of a break) plus x-checkpoint-delay + LIVE_MS, or
 * have failed over: the pair reaches a decided state, it never waits for ever.
 */
const SETTLE_MS = 100;
/** Without faults, a checkpoint must complete within x-checkpoint-delay + this. */
const LIVE_MS = 400;
const BASE_MS = 1500;
/** Without faults, a compare trigger must be answered (held output released) within this. */
const TRIGGER_MS = 250;
const HARD_STOP_MS = 30_000;
/** After the primary closes at the end, what was in flight runs on for this long. */
const END_TAIL_MS = 30;

/**
 * crashP / crashS: a node's process dies; breakLink: the channel breaks, both nodes live;
 * hbP: x-colo-lost-heartbeat on the primary with the secondary alive; stray: the primary's
 * side of the channel emits a COLO message out of protocol order (a sender bug; only in
 * hand-written scenarios, never drawn at random); applyFails: the secondary's next apply breaks
 * off half-way (its disk is full), and management may then declare the primary lost to it;
 * panicP: the PVM's guest panics (management may then fence the primary and declare it lost to
 * the secondary); closeP: the primary's process exits (the driver's close(), then the process
 * is gone; a secondary's exit is crashS with drain, its driver tells the core nothing); protoP: a
 * protocol error on the primary (e.g. a malformed frame from the secondary); startFails: the
 * secondary's start action fails; corrupt: the next frame the primary sends on the main channel
 * arrives damaged (its checksum fails, or its payload does not parse); mfdBreak: the multifd
 * channels alone break, the main channel lives on both ways (runs without multifd draw
 * corrupt instead); stall: the network delivers nothing for a while, then everything, in order;
 * exitS: the SVM's guest exits by itself (GUEST_EXITED, then its process ends; the simulated
 * PVM's guest never exits, so the primary's wait for it ends in a failover; only in
 * hand-written scenarios).
 */
export type FaultKind = 'crashP' | 'crashS' | 'breakLink' | 'hbP' | 'stray' | 'applyFails' | 'panicP' | 'closeP' | 'protoP' | 'startFails' | 'corrupt' | 'mfdBreak' | 'stall' | 'exitS';

/** Protocol points a fault can be tied to, so that many land mid-checkpoint. */
const hooks = [
  'P.send.CHECKPOINT_REQUEST',
  'S.recv.CHECKPOINT_REQUEST',
  'S.vmPaused',
  'P.recv.CHECKPOINT_REPLY',
  'P.vmPaused',
  'P.sendState',
  'P.stateCaptured',
  'P.stateSent',
  'S.recv.VMSTATE_SEND',
  'S.frame.pages',
  'S.frame.disk',
  'S.recv.VMSTATE_SIZE',
  'S.frame.device',
  'S.apply',
  'P.recv.VMSTATE_RECEIVED',
  'P.releaseHeld',
  'S.applied',
  'P.recv.VMSTATE_LOADED',
  'P.vmResumed',
  'S.start',
  'S.started',
  'P.recv.CHECKPOINT_READY',
  // During a failover.
  'P.failover',
  'S.failover',
] as const;

/** Points COLO passes once (its start): a fault tied to a later pass of them would never fire. */
const onceHooks: readonly string[] = ['S.start', 'S.started', 'P.recv.CHECKPOINT_READY'];

/** Where a checkpoint's pages are on their way to the secondary. */
const sendingHooks = ['P.stateCaptured', 'P.stateSent', 'S.frame.pages'] as const;

export interface Fault {
  kind: FaultKind;
  trigger: { hook: string; nth: number } | { time: number };
  delay: number;
  /** After how long each end learns the link broke (null: never). */
  noticeP: number | null;
  noticeS: number | null;
  /**
   * drain: a process exit, what was already sent still arrives; pagesLost: a multifd channel
   * of the link broke, the pages in flight are lost and the rest still arrives.
   */
  drain: Drain;
  /** The management layer declares the peer lost on the survivor after this long (null: never). */
  hb: number | null;
  /** ... and says it twice. */
  hbTwice: boolean;
  /** stray: the message. */
  msg?: ColoMessage;
  /** corrupt: the frame's checksum fails (else its payload does not parse). */
  checksum?: boolean;
  /** stall: how long. */
  stallMs?: number;
}

export interface Scenario {
  delayMs: number;
  /** Management sets a new x-checkpoint-delay on the primary at these times (none if absent). */
  delayChanges?: { atMs: number; delayMs: number }[];
  /** Mean interval of the compare's checkpoint triggers (mismatch / timeout); null: none. */
  triggerMeanMs: number | null;
  faults: Fault[];
  /** The secondary's frame loop reads on after a broken channel (the core must drop the rest). */
  readOnAfterBreak?: boolean;
  /** Checkpoint pages go on this many multifd channels (none if absent or 0). */
  multifd?: number;
}

interface Snapshot {
  ck: number;
  ram: Val[];
  device: Device;
  disk: Val[];
}

export interface Violation {
  inv: string;
  detail: string;
  at: number;
}

export interface RunStats {
  triggers: number;
  checkpoints: number;
  /** Checkpoints the compare asked for (PrimaryCore.checkpointsBy mismatch + timeout). */
  triggered: number;
  faultsFired: number;
  midCheckpointFaults: number;
  relaunch: boolean;
  failoverP: boolean;
  failoverS: boolean;
  /** A secondary's apply was made to break off. */
  abandoned: boolean;
  /** The secondary's core dropped the rest of a checkpoint that came after a channel broke. */
  droppedAfterBreak: boolean;
  /** Pages on multifd channels came after the main channel's sync: the round barrier waited. */
  barrierWaited: boolean;
  /** A damaged frame of a checkpoint reached the secondary. */
  damaged: boolean;
  /** The multifd channels alone broke. */
  multifdOnly: boolean;
}

export interface RunResult {
  seed: number;
  scenario: string;
  violation: Violation | null;
  endMs: number;
  steps: number;
  trace: string[];
  stats: RunStats;
}

export interface RunOptions {
  seed: number;
  /** false: no faults at all (liveness). */
  faults?: boolean;
  broken?: Broken | null;
  /** A hand-written scenario instead of the seed's. */
  scenario?: Scenario;
  /** Keep the whole trace, not only the last lines. */
  fullTrace?: boolean;
}

function drawScenario(r: () => number, faults: boolean): Scenario {
  // Long delays too, so that a trigger the primary ignored would not hide behind the timer.
  const drawDelay = (): number => Math.round(r() < 0.7 ? 20 + r() * 100 : 300 + r() * 700);
  const delayMs = drawDelay();
  const triggerMeanMs = r() < 0.6 ? Math.round(10 + r() * 190) : null;
  // Now and then management changes the delay, in any phase of a checkpoint.
  const delayChanges = r() < 0.3 ? Array.from({ length: 1 + Math.floor(r() * 2) }, () => ({ atMs: Math.round(r() * 150000) / 100, delayMs: drawDelay() })).sort((a, b) => a.atMs - b.atMs) : [];
  // The driver stops reading at a broken channel; in some runs it does not, so that the core's
  // own guard (never apply the rest of a checkpoint after a break) is under test too.
  const readOnAfterBreak = r() < 0.3;
  // Pages on multifd channels, which they may reach after the main channel's frames behind them.
  const multifd = r() < 0.4 ? 1 + Math.floor(r() * 4) : 0;
  if (!faults || r() < 0.1) return { delayMs, delayChanges, triggerMeanMs, faults: [], readOnAfterBreak, multifd };
  const n = r() < 0.65 ? 1 : 2;
  const out: Fault[] = [];
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
  for (let i = 0; i < n; i++) {
    const x = r();
    let kind: FaultKind =
      x < 0.2 ? 'crashP' : x < 0.36 ? 'crashS' : x < 0.5 ? 'breakLink' : x < 0.6 ? 'hbP' : x < 0.69 ? 'applyFails' : x < 0.74 ? 'panicP' : x < 0.78 ? 'closeP' : x < 0.8 ? 'protoP' : x < 0.83 ? 'startFails' : x < 0.9 ? 'corrupt' : x < 0.98 ? 'mfdBreak' : 'stall';
    if (kind === 'mfdBreak' && multifd === 0) kind = 'corrupt';
    let trigger: Fault['trigger'] = r() < 0.75 ? { hook: pick(hooks), nth: 1 + Math.floor(r() * 6) } : { time: Math.round(r() * 1500 * 100) / 100 };
    if ('hook' in trigger && onceHooks.includes(trigger.hook)) trigger.nth = 1;
    let delay = r() < 0.4 ? 0 : Math.round(r() * 1500) / 100;
    // Armed when an apply begins, so that it breaks that apply.
    if (kind === 'applyFails') [trigger, delay] = [{ hook: 'S.apply', nth: 1 + Math.floor(r() * 6) }, 0];
    // Armed when the start begins, so that it fails.
    if (kind === 'startFails') [trigger, delay] = [{ hook: 'S.start', nth: 1 }, 0];
    const soon = (): number => Math.round((r() < 0.3 ? 0.01 + r() : 0.1 + r() * 50) * 100) / 100;
    const notice = (): number | null => (r() < 0.8 ? soon() : null);
    let noticeP: number | null = null;
    let noticeS: number | null = null;
    let hb: number | null = null;
    const hbDelay = (): number => Math.round((r() < 0.35 ? r() * 4 : 5 + r() * 500) * 100) / 100;
    switch (kind) {
      case 'crashP':
      case 'closeP':
        noticeS = notice();
        hb = r() < 0.85 ? hbDelay() : null;
        break;
      case 'panicP':
        // Management fences the primary (colo up does on GUEST_PANICKED) and declares it lost to the secondary.
        hb = r() < 0.7 ? hbDelay() : null;
        break;
      case 'crashS':
        noticeP = notice();
        hb = r() < 0.5 || noticeP === null ? hbDelay() : null;
        break;
      case 'breakLink':
        noticeP = soon();
        noticeS = soon();
        hb = r() < 0.4 ? hbDelay() : null;
        break;
      case 'hbP':
      case 'protoP':
      case 'startFails':
        break;
      case 'applyFails':
        hb = r() < 0.6 ? hbDelay() : null;
        break;
    }
    const drain: Drain = kind === 'breakLink' ? (r() < 0.35 ? 'pagesLost' : 'none') : r() < 0.5 ? 'drain' : 'none';
    // A multifd channel that breaks, or a damaged frame, matters most while a checkpoint's pages
    // are in flight: most such faults land there.
    if ((drain === 'pagesLost' || kind === 'corrupt') && r() < 0.7) [trigger, delay] = [{ hook: pick(sendingHooks), nth: 1 + Math.floor(r() * 6) }, Math.round(r() * 100) / 100];
    // The primary sees its multifd sockets close (the receiver closes them when it fails).
    if (kind === 'mfdBreak') noticeP = soon();
    const f: Fault = { kind, trigger, delay, noticeP, noticeS, drain, hb, hbTwice: r() < 0.2 };
    if (kind === 'corrupt') f.checksum = r() < 0.5;
    if (kind === 'stall') f.stallMs = Math.round(20 + r() * 1500);
    out.push(f);
  }
  return { delayMs, delayChanges, triggerMeanMs, faults: out, readOnAfterBreak, multifd };
}

export function showScenario(s: Scenario): string {
  const f = s.faults.map((x) => {
    const when = 'hook' in x.trigger ? `at ${x.trigger.hook} #${x.trigger.nth}` : `at t=${x.trigger.time}`;
    const parts = [`${x.kind} ${when} +${x.delay}ms`];
    if (x.kind === 'stray') parts.push(`message ${x.msg}`);
    else if (x.kind === 'corrupt') parts.push(x.checksum === true ? 'bad checksum' : 'bad payload');
    else if (x.kind === 'stall') parts.push(`for ${x.stallMs}ms`);
    else if (x.kind === 'mfdBreak') parts.push(`notice P:${x.noticeP}`);
    else if (['crashP', 'crashS', 'breakLink', 'closeP'].includes(x.kind)) parts.push(`notice P:${x.noticeP ?? 'never'} S:${x.noticeS ?? 'never'}${x.drain !== 'none' ? ` ${x.drain}` : ''}`);
    if (x.hb !== null) parts.push(`${x.kind === 'panicP' ? 'fenced, ' : ''}lostHeartbeat on ${['crashP', 'applyFails', 'panicP', 'closeP'].includes(x.kind) ? 'S' : 'P'} +${x.hb}ms${x.hbTwice ? ' (twice)' : ''}`);
    return parts.join(', ');
  });
  const changes = (s.delayChanges ?? []).map((c) => `, then ${c.delayMs}ms at t=${c.atMs}`).join('');
  const readOn = s.readOnAfterBreak === true ? '; the frame loop reads on after a break' : '';
  const multifd = (s.multifd ?? 0) > 0 ? `; pages on ${s.multifd} multifd channels` : '';
  return `x-checkpoint-delay=${s.delayMs}ms${changes}; compare triggers ${s.triggerMeanMs === null ? 'none' : `every ~${s.triggerMeanMs}ms`}${readOn}${multifd}; faults: ${f.length === 0 ? 'none' : f.join(' | ')}`;
}

class SimWorld implements World {
  readonly sim = new Sim();
  readonly link: Link;
  readonly graceMs = linkLossGraceMs;
  readonly boundMs = BOUND_MS;
  readonly P: PrimaryNode;
  readonly S: SecondaryNode;
  private readonly r: () => number;
  private readonly lines: string[] = [];
  private readonly snaps = new Map<number, Snapshot>();
  /**
   * What the secondary must hold at a takeover: the PVM at the pause of the last checkpoint it
   * applied (COLO start's state before any), plus the SVM's own writes and ticks since.
   */
  private svmBase: Snapshot;
  private readonly svmOwnPages = new Map<number, Val>();
  private readonly svmOwnBlocks = new Map<number, Val>();
  private svmOwnDevice: Device | null = null;
  /** Frames of each checkpoint the primary sent, and how many of them the secondary got. */
  private readonly frames = new Map<number, { sent: number; got: number; device: boolean }>();
  /** The last checkpoint every frame of which the world delivered to the secondary (invariant 2). */
  fullyDelivered = 0;
  /** The last checkpoint whose held output the primary released to clients (invariant 1). */
  private releasedCk = 0;
  private readonly hookCounts = new Map<string, number>();
  private readonly panicTries = new Map<Fault, number>();
  private readonly pending: Fault[];
  violation: Violation | null = null;
  faultFired = false;
  /** When the last fault (or x-colo-lost-heartbeat) took effect: liveness after faults counts from it. */
  lastFaultAt = 0;
  /** The longest x-checkpoint-delay of the run. */
  private readonly longestDelayMs: number;
  lastCheckpointAt = 0;
  /** When the PVM last paused for a checkpoint, and how long it had run by then. */
  lastPauseAt = 0;
  ranAtLastPause = 0;
  /** The last step after which the PVM was running. */
  pvmRunningAt = 0;
  /** x-checkpoint-delay in effect, and when management last changed it. */
  delayMs: number;
  delayChangedAt = 0;
  endAt: number;
  /** The oldest compare trigger no VMSTATE_RECEIVED has answered yet. */
  triggerAt: number | null = null;
  /** The oldest resync trigger not yet answered by a checkpoint paused after it (resyncCk: that checkpoint). */
  resyncAt: number | null = null;
  resyncCk: number | null = null;
  stats: RunStats = { triggers: 0, triggered: 0, checkpoints: 0, faultsFired: 0, midCheckpointFaults: 0, relaunch: false, failoverP: false, failoverS: false, abandoned: false, droppedAfterBreak: false, barrierWaited: false, damaged: false, multifdOnly: false };

  constructor(seed: number, readonly scenario: Scenario, broken: Broken | null, private readonly fullTrace: boolean, r: () => number) {
    this.r = r;
    this.delayMs = scenario.delayMs;
    const longest = Math.max(scenario.delayMs, ...(scenario.delayChanges ?? []).map((c) => c.delayMs));
    this.longestDelayMs = longest;
    this.endAt = Math.max(BASE_MS, 5 * longest + 500);
    this.link = new Link(this.sim, r, (s) => this.trace(s));
    this.link.multifd = scenario.multifd ?? 0;
    // The state at COLO start: the initial migration made both sides equal.
    const ram: Val[] = [];
    for (let p = 0; p < PAGES; p++) ram.push({ v: mix(seed, p), src: 'I', ck: 0 });
    const disk: Val[] = [];
    for (let b = 0; b < BLOCKS; b++) disk.push({ v: mix(seed, 1000 + b), src: 'I', ck: 0 });
    const device: Device = { ticks: 0, acc: seed | 0 };
    this.svmBase = { ck: 0, ram: [...ram], device: { ...device }, disk: [...disk] };
    this.link.observer = {
      sent: (from, f) => this.frameSent(from, f),
      delivered: (to, f) => this.frameDelivered(to, f),
    };
    this.P = new PrimaryNode(this, scenario.delayMs, [...ram], { ...device }, [...disk], broken);
    this.S = new SecondaryNode(this, [...ram], { ...device }, [...disk], broken);
    this.link.ends.push(this.P, this.S);
    for (const c of scenario.delayChanges ?? []) {
      this.sim.at(
        c.atMs,
        () => {
          this.trace(`management: x-checkpoint-delay ${this.delayMs} → ${c.delayMs} ms (P ${this.P.core.phase})`);
          this.delayMs = c.delayMs;
          this.delayChangedAt = this.sim.now;
          this.P.setDelay(c.delayMs);
        },
        this.P.owner,
      );
    }
    this.pending = [...scenario.faults];
    for (const f of this.pending) if ('time' in f.trigger) this.sim.at(f.trigger.time + f.delay, () => this.fire(f));
    const mean = scenario.triggerMeanMs;
    if (mean !== null) {
      const next = (): void => {
        this.sim.after(-Math.log(1 - this.r()) * mean, () => {
          if (this.P.compareStopped) return;
          const x = this.r();
          const reason = x < 0.6 ? 'mismatch' : x < 0.85 ? 'timeout' : 'resync';
          this.stats.triggers += 1;
          this.triggerAt ??= this.sim.now;
          if (reason === 'resync' && !this.faultFired) this.resyncAt ??= this.sim.now;
          this.P.trigger(reason);
          next();
        }, this.P.owner);
      };
      next();
    }
  }

  released(ck: number): void {
    this.triggerAt = null;
    this.releasedCk = Math.max(this.releasedCk, ck);
    // Invariant 1: a secondary that serves already must hold this checkpoint (its failover
    // waited for the apply that VMSTATE_RECEIVED announced).
    if (this.S.serving && this.svmBase.ck < ck) this.violate('1', `the primary released the held output of checkpoint ${ck} while the secondary serves from checkpoint ${this.svmBase.ck}: clients saw output its state contradicts`);
    // Lost mirrored input is covered only by a checkpoint whose pause came after the loss.
    if (this.resyncCk !== null && ck >= this.resyncCk) [this.resyncAt, this.resyncCk] = [null, null];
    if (this.P.left || this.P.guest.crashed) this.violate('crash', `the primary released held output of checkpoint ${ck} after its guest crashed: the secondary, which keeps the last checkpoint, could contradict it`);
  }

  /** The primary armed its checkpoint timer: not while lost mirrored input waits for a checkpoint. */
  timerArmed(): void {
    if (!this.faultFired && this.resyncAt !== null && this.resyncCk === null) {
      this.violate('liveness', `mirrored input was lost at t=${this.resyncAt.toFixed(3)} (resync) and no checkpoint paused since, but the primary armed its timer instead of checkpointing`);
    }
  }

  get readOnAfterBreak(): boolean {
    return this.scenario.readOnAfterBreak === true;
  }

  private frameSent(from: 0 | 1, f: Wire): void {
    if (from !== 0 || (f.k !== 'pages' && f.k !== 'disk' && f.k !== 'device')) return;
    const n = this.frames.get(f.ck) ?? { sent: 0, got: 0, device: false };
    n.sent += 1;
    this.frames.set(f.ck, n);
    this.frames.delete(f.ck - 3);
  }

  /**
   * A checkpoint is fully received once its device blob (the last frame sent) and every frame
   * sent before it arrived, in whatever order (pages on multifd channels may come after it).
   */
  private frameDelivered(to: 0 | 1, f: Wire): void {
    if (to === 1 && f.k === 'corrupt' && f.ck !== null) this.stats.damaged = true;
    if (to !== 1 || (f.k !== 'pages' && f.k !== 'disk' && f.k !== 'device')) return;
    const n = this.frames.get(f.ck);
    if (n === undefined) return;
    n.got += 1;
    if (f.k === 'device') n.device = true;
    if (n.device && n.got === n.sent) this.fullyDelivered = Math.max(this.fullyDelivered, f.ck);
  }

  svmWrote(what: 'page' | 'block', i: number, v: Val): void {
    (what === 'page' ? this.svmOwnPages : this.svmOwnBlocks).set(i, v);
  }

  svmTicked(device: Device): void {
    this.svmOwnDevice = { ...device };
  }

  /**
   * The secondary starts serving: every page, disk block and the device state must be those of
   * the last checkpoint it applied, except what the SVM wrote itself since (a failover must
   * not split an apply, nor keep anything of a checkpoint it dropped).
   */
  takeover(): void {
    const g = this.S.guest;
    const base = this.svmBase;
    const bad: string[] = [];
    for (let p = 0; p < PAGES; p++) {
      const want = this.svmOwnPages.get(p) ?? base.ram[p]!;
      if (!sameVal(g.ram[p]!, want)) bad.push(`page ${p}: SVM ${showVal(g.ram[p]!)}, want ${showVal(want)}`);
    }
    const disk = g.disk.view();
    for (let b = 0; b < BLOCKS; b++) {
      const want = this.svmOwnBlocks.get(b) ?? base.disk[b]!;
      if (!sameVal(disk[b]!, want)) bad.push(`disk block ${b}: SVM ${showVal(disk[b]!)}, want ${showVal(want)}`);
    }
    const dev = this.svmOwnDevice ?? base.device;
    if (g.device.ticks !== dev.ticks || g.device.acc !== dev.acc) bad.push(`device: SVM ${JSON.stringify(g.device)}, want ${JSON.stringify(dev)}`);
    this.trace(`S takes over from checkpoint ${base.ck}${this.svmOwnDevice === null ? '' : ' plus its own writes'}`);
    // Invariant 1: clients got the PVM's output up to the pause of every checkpoint whose held
    // output the primary released; a survivor from an older one would contradict it.
    if (base.ck < this.releasedCk) {
      this.violate('1', `the secondary takes over from checkpoint ${base.ck}, but the primary released the held output of checkpoint ${this.releasedCk} to clients`);
      return;
    }
    if (bad.length > 0) this.violate('3', `at the takeover the secondary's state is not checkpoint ${base.ck}'s plus its own writes since: ${bad.slice(0, 4).join('; ')}${bad.length > 4 ? ` (+${bad.length - 4})` : ''}`);
  }

  rnd(): number {
    return this.r();
  }
  ms(lo: number, hi: number): number {
    return lo + this.r() * (hi - lo);
  }
  trace(line: string): void {
    this.lines.push(`${this.sim.now.toFixed(3).padStart(10)}  ${line}`);
    if (!this.fullTrace && this.lines.length > 80) this.lines.splice(0, this.lines.length - 60);
  }
  get traceLines(): string[] {
    return this.lines;
  }

  hook(name: string): void {
    const n = (this.hookCounts.get(name) ?? 0) + 1;
    this.hookCounts.set(name, n);
    for (const f of this.pending) {
      if ('hook' in f.trigger && f.trigger.hook === name && f.trigger.nth === n) this.sim.after(f.delay, () => this.fire(f));
    }
  }

  violate(inv: string, detail: string): void {
    this.violation ??= { inv, detail, at: this.sim.now };
  }

  snapshot(ck: number, ram: Val[], device: Device, disk: Val[]): void {
    this.snaps.set(ck, { ck, ram: [...ram], device: { ...device }, disk: [...disk] });
    // Liveness: without faults the PVM runs between checkpoints (COLO start counts as one).
    const ran = this.P.guest.ranMs;
    if (!this.faultFired && ran <= this.ranAtLastPause) this.violate('liveness', `the PVM paused for checkpoint ${ck} without having run since ${ck === 1 ? 'COLO started' : `its pause for checkpoint ${ck - 1}`} (t=${this.lastPauseAt.toFixed(3)}), with no fault injected`);
    this.lastPauseAt = this.sim.now;
    this.ranAtLastPause = ran;
    if (this.resyncAt !== null) this.resyncCk ??= ck;
    this.snaps.delete(ck - 3);
  }

  /** Invariant 3: right after the apply of checkpoint ck, the SVM equals the PVM at its pause for ck. */
  applied(ck: number): void {
    const snap = this.snaps.get(ck);
    this.trace(`S applied checkpoint ${ck}`);
    if (snap === undefined) {
      this.violate('3', `the secondary applied checkpoint ${ck}, which the primary never paused for`);
      return;
    }
    if (ck > this.fullyDelivered) {
      this.violate('2', `the secondary applied checkpoint ${ck}, but not every frame of it was delivered (fully delivered up to checkpoint ${this.fullyDelivered})`);
      return;
    }
    this.svmBase = snap;
    this.svmOwnPages.clear();
    this.svmOwnBlocks.clear();
    this.svmOwnDevice = null;
    const g = this.S.guest;
    const bad: string[] = [];
    for (let p = 0; p < PAGES; p++) if (!sameVal(g.ram[p]!, snap.ram[p]!)) bad.push(`page ${p}: SVM ${showVal(g.ram[p]!)} PVM ${showVal(snap.ram[p]!)}`);
    const disk = g.disk.view();
    for (let b = 0; b < BLOCKS; b++) if (!sameVal(disk[b]!, snap.disk[b]!)) bad.push(`disk block ${b}: SVM ${showVal(disk[b]!)} PVM ${showVal(snap.disk[b]!)}`);
    if (g.device.ticks !== snap.device.ticks || g.device.acc !== snap.device.acc) bad.push(`device: SVM ${JSON.stringify(g.device)} PVM ${JSON.stringify(snap.device)}`);
    if (bad.length > 0) this.violate('3', `after the apply of checkpoint ${ck} the SVM differs from the PVM at its pause: ${bad.slice(0, 4).join('; ')}${bad.length > 4 ? ` (+${bad.length - 4})` : ''}`);
  }

  checkpointDone(): void {
    this.lastCheckpointAt = this.sim.now;
    this.stats.checkpoints += 1;
  }

  private extendEnd(): void {
    this.endAt = Math.max(this.endAt, this.sim.now + this.graceMs + 600 + BOUND_MS + 100, this.lastFaultAt + this.graceMs + SETTLE_MS + this.longestDelayMs + LIVE_MS + 50);
  }

  private fire(f: Fault): void {
    const { P, S, link, sim } = this;
    const before = `P ${P.core.phase}, S ${S.core.phase}`;
    const mid =
      (!P.owner.dead && ['requested', 'pausing', 'sending', 'awaitReceived', 'awaitLoaded'].includes(P.core.phase)) ||
      (!S.owner.dead && ['pausing', 'replied', 'receiving', 'applying'].includes(S.core.phase));
    const hb = (node: PrimaryNode | SecondaryNode, who: string): void => {
      if (f.hb === null) return;
      const h = f.hb;
      const say = (): void => {
        this.trace(`management: x-colo-lost-heartbeat on ${who}`);
        this.lastFaultAt = Math.max(this.lastFaultAt, sim.now);
        this.extendEnd();
        node.lostHeartbeat();
      };
      sim.after(h, say, node.owner);
      if (f.hbTwice) sim.after(h + this.ms(0, 20), say, node.owner);
    };
    switch (f.kind) {
      case 'crashP':
        if (P.owner.dead) return;
        this.trace(`FAULT: the primary crashes (${before})`);
        P.owner.dead = true;
        P.guest.stop();
        link.break('the primary crashed', [null, f.noticeS], f.drain);
        hb(S, 'S');
        break;
      case 'crashS':
        if (S.owner.dead) return;
        this.trace(`FAULT: the secondary crashes (${before})`);
        S.owner.dead = true;
        S.guest.stop();
        link.break('the secondary crashed', [f.noticeP, null], f.drain);
        hb(P, 'P');
        break;
      case 'breakLink':
        this.trace(`FAULT: the link breaks (${before})`);
        link.break(f.drain === 'pagesLost' ? 'a multifd channel broke' : 'the link broke', [f.noticeP, f.noticeS], f.drain);
        hb(P, 'P');
        break;
      case 'stray':
        if (P.owner.dead || link.broken) return;
        this.trace(`FAULT: a stray ${f.msg} on the channel (${before})`);
        link.send(0, { k: 'colo', msg: f.msg ?? 'VMSTATE_SEND' });
        break;
      case 'hbP':
        if (P.owner.dead) return;
        this.trace(`FAULT: x-colo-lost-heartbeat on P (${before})`);
        P.lostHeartbeat();
        break;
      case 'applyFails':
        if (S.owner.dead || S.core.phase !== 'applying') return;
        this.trace(`FAULT: the secondary's apply will break off half-way (${before})`);
        S.failNextApply = true;
        this.stats.abandoned = true;
        // Management sees the pair break and (wrongly, here) declares the primary lost to it.
        hb(S, 'S');
        break;
      case 'panicP': {
        if (P.owner.dead || P.guest.crashed) return;
        // A guest panics while it runs: wait for the PVM to run (for a while at most).
        if (!P.guest.running) {
          const tries = (this.panicTries.get(f) ?? 0) + 1;
          this.panicTries.set(f, tries);
          if (tries <= 200) sim.after(1, () => this.fire(f), P.owner);
          return;
        }
        this.trace(`FAULT: the PVM's guest panics (${before})`);
        P.guestCrashed();
        if (f.hb !== null) {
          sim.after(f.hb, () => {
            this.trace('management: the primary is fenced (its process killed)');
            P.owner.dead = true;
            link.break('the primary was fenced', [null, 0.1], 'drain');
          }, P.owner);
          hb(S, 'S');
        }
        break;
      }
      case 'closeP':
        if (P.owner.dead || P.closed) return;
        this.trace(`FAULT: the primary's process exits (${before})`);
        P.close();
        // Its channels close as it exits (its own end sees that too), and the process is gone a
        // little later: what it sent still arrives.
        sim.after(this.ms(0, 1), () => link.destroy(0, 'the primary process is exiting'), P.owner);
        sim.after(this.ms(1, 5), () => {
          this.trace('the primary process is gone');
          P.owner.dead = true;
          P.guest.stop();
          link.break('the primary exited', [null, f.noticeS], 'drain');
          // Management declares it lost once it is gone.
          hb(S, 'S');
        }, P.owner);
        break;
      case 'protoP':
        if (P.owner.dead) return;
        this.trace(`FAULT: a protocol error on the primary (${before})`);
        P.dispatch({ type: 'protocolError', message: 'simulated: a malformed frame from the secondary' });
        break;
      case 'exitS':
        // The SVM's guest exits by itself (the simulated PVM's never does: the runs diverge);
        // only a guest that runs can (not one a checkpoint holds paused).
        if (S.owner.dead || !S.guest.running) return;
        this.trace(`FAULT: the SVM's guest exits (${before})`);
        S.guestExited();
        {
          // As driver.ts: the process ends once a start or an apply that ran the guest is over.
          const gone = (): void => {
            if (S.core.phase === 'starting' || S.core.phase === 'applying') {
              sim.after(1, gone, S.owner);
              return;
            }
            sim.after(this.ms(0, 2), () => {
              this.trace('the secondary process is gone');
              S.owner.dead = true;
              link.break('the secondary exited', [f.noticeP, null], 'drain');
            }, S.owner);
          };
          gone();
        }
        break;
      case 'startFails':
        if (S.owner.dead || S.core.phase !== 'starting') return;
        this.trace(`FAULT: the secondary's start will fail (${before})`);
        S.failStart = true;
        break;
      case 'corrupt':
        if (P.owner.dead || link.broken) return;
        this.trace(`FAULT: the primary's next frame on the main channel arrives damaged (${f.checksum === true ? 'its checksum fails' : 'its payload does not parse'}) (${before})`);
        link.corruptNext = { checksum: f.checksum === true };
        break;
      case 'mfdBreak':
        if (link.broken || link.multifdBroken || link.multifd === 0) return;
        this.trace(`FAULT: the multifd channels break, the main channel lives (${before})`);
        link.breakMultifd('a multifd channel was reset', f.noticeP ?? 0.1);
        this.stats.multifdOnly = true;
        break;
      case 'stall':
        this.trace(`FAULT: the network stalls for ${f.stallMs} ms (${before})`);
        link.stall(f.stallMs ?? 100);
        break;
    }
    this.lastFaultAt = Math.max(this.lastFaultAt, sim.now + (f.kind === 'stall' ? (f.stallMs ?? 100) : 0));
    this.faultFired = true;
    this.stats.faultsFired += 1;
    if (mid) this.stats.midCheckpointFaults += 1;
    this.extendEnd();
  }

  /** Invariants 2, 4, 5 and liveness: after every step. */
  check(final: boolean): void {
    const { P, S } = this;
    const now = this.sim.now;
    if (!S.owner.dead) {
      // Invariant 2: no page (or disk block) of a checkpoint not fully received.
      const ram = S.guest.ram;
      for (let p = 0; p < PAGES; p++) {
        const v = ram[p]!;
        if (v.src === 'P' && v.ck > this.fullyDelivered) {
          this.violate('2', `SVM RAM page ${p} holds ${showVal(v)} from checkpoint ${v.ck}, but only checkpoints up to ${this.fullyDelivered} were fully delivered to the secondary`);
          return;
        }
      }
      const disk = S.guest.disk.base;
      for (let b = 0; b < BLOCKS; b++) {
        const v = disk[b]!;
        if (v.src === 'P' && v.ck > this.fullyDelivered) {
          this.violate('2', `SVM disk block ${b} holds ${showVal(v)} from checkpoint ${v.ck}, but only checkpoints up to ${this.fullyDelivered} were fully delivered to the secondary`);
          return;
        }
      }
    }
    // Invariant 4: at most one node serves clients.
    if (P.serving && S.serving) {
      this.violate('4', `both nodes serve clients (primary alive in phase ${P.core.phase}, secondary took over)`);
      return;
    }
    // A secondary never promotes itself (a broken link, a protocol error, a failed start, a
    // crashed PVM may all be seen while the primary still serves): only x-colo-lost-heartbeat.
    if (!S.owner.dead && S.serving && S.heartbeatLostAt === null) {
      this.violate('4', `the secondary serves although no x-colo-lost-heartbeat reached it (primary ${P.owner.dead ? 'dead' : `in phase ${P.core.phase}`})`);
      return;
    }
    for (const [name, n] of [['primary', P], ['secondary', S]] as const) {
      if (n.exits > 1) {
        this.violate('5', `the ${name} emitted COLO_EXIT ${n.exits} times`);
        return;
      }
    }
    // A secondary whose start failed closes the link: the primary goes on alone after its grace.
    if (S.startFailedAt !== null && !P.owner.dead && !P.closed && !P.guest.crashed && now > S.startFailedAt + this.graceMs + 10 + BOUND_MS) {
      if (P.core.phase !== 'done' || P.core.failoverState !== 'completed') {
        this.violate('5', `the secondary's start failed at t=${S.startFailedAt.toFixed(3)}, but at t=${now.toFixed(3)} the primary does not run alone (phase ${P.core.phase}, failover state ${P.core.failoverState})`);
        return;
      }
    }
    // A secondary whose apply broke off holds no checkpoint: running or serving from it would
    // contradict output the clients got (invariant 1). A lost heartbeat must be refused.
    if (!S.owner.dead && S.abandoned && (S.serving || S.guest.running)) {
      this.violate('1', `the secondary ${S.serving ? 'serves' : 'runs its guest'} after its apply broke off`);
      return;
    }
    // Invariant 5: a lost heartbeat on a live secondary is carried out or refused, in bounded time.
    if (!S.owner.dead && S.heartbeatLostAt !== null && (now > S.heartbeatLostAt + BOUND_MS || final)) {
      const settled = S.abandoned || (S.core.phase === 'done' && S.core.failoverState === 'completed' && S.guest.running);
      if (!settled && now >= S.heartbeatLostAt + BOUND_MS) {
        this.violate('5', `x-colo-lost-heartbeat reached the secondary at t=${S.heartbeatLostAt.toFixed(3)}, but at t=${now.toFixed(3)} it has neither taken over nor refused (phase ${S.core.phase}, failover state ${S.core.failoverState})`);
        return;
      }
    }
    // Invariant 5: a failover leaves the survivor running, done, completed, within the bound.
    for (const [name, n] of [['primary', P], ['secondary', S]] as const) {
      if (n.owner.dead || (name === 'secondary' && S.abandoned)) continue;
      // A panicked PVM has nothing to run (its expected outcome is checked at guestCrashed);
      // a closed primary, or a secondary whose guest exited, is exiting.
      if (name === 'primary' && (P.guest.crashed || P.closed)) continue;
      if (name === 'secondary' && S.exited) continue;
      if (n.core.phase === 'failover' || n.core.phase === 'done') {
        if (name === 'primary') this.stats.failoverP = true;
        else this.stats.failoverS = true;
        if (n.deadline === null) n.deadline = now + BOUND_MS;
      }
      if (n.core.phase === 'done' && !n.guest.running) {
        this.violate('5', `the ${name} finished its failover but its VM is not running`);
        return;
      }
      if (n.deadline !== null) {
        this.endAt = Math.max(this.endAt, n.deadline + 1);
        if (now > n.deadline || final) {
          const ok = n.core.phase === 'done' && n.core.failoverState === 'completed' && n.guest.running;
          if (!ok && now >= n.deadline) {
            this.violate('5', `the ${name} was due to finish its failover by t=${n.deadline.toFixed(3)}, but at t=${now.toFixed(3)} its phase is ${n.core.phase}, failover state ${n.core.failoverState}, VM ${n.guest.running ? 'running' : 'paused'}`);
            return;
          }
        }
      }
    }
    // Liveness: with no fault yet, checkpoints keep completing, at the delay in effect: a new
    // one counts from its change at the latest (a shorter one takes effect at once).
    const since = Math.max(this.lastCheckpointAt, this.delayChangedAt);
    if (!this.faultFired && now - since > this.delayMs + LIVE_MS) {
      this.violate('liveness', `no checkpoint completed since t=${since.toFixed(3)} (x-checkpoint-delay ${this.delayMs} ms) with no fault injected (P ${P.core.phase}, S ${S.core.phase})`);
    }
    if (!this.faultFired && this.triggerAt !== null && now - this.triggerAt > TRIGGER_MS) {
      this.violate('liveness', `a compare trigger at t=${this.triggerAt.toFixed(3)} got no checkpoint (no VMSTATE_RECEIVED) by t=${now.toFixed(3)} with no fault injected (P ${P.core.phase}, S ${S.core.phase})`);
    }
    if (!this.faultFired && this.resyncAt !== null && now - this.resyncAt > TRIGGER_MS) {
      this.violate('liveness', `mirrored input was lost at t=${this.resyncAt.toFixed(3)} (resync), but by t=${now.toFixed(3)} no checkpoint paused after it was taken (P ${P.core.phase}, S ${S.core.phase})`);
    }
    // Liveness after faults: a live primary that has not failed over keeps completing
    // checkpoints once the faults are past (the grace period for a broken link included): the
    // pair never waits for ever (a failover completed, or COLO going on).
    const pLive = !P.owner.dead && !P.closed && !P.guest.crashed && !P.left;
    if (this.faultFired && pLive && P.core.phase !== 'failover' && P.core.phase !== 'done') {
      // After GUEST_EXITED the primary waits limits.coloSvmExitWaitMs for its own guest's exit, not the grace.
      const waitEnd = P.svmExitedAt === null ? 0 : P.svmExitedAt + limits.coloSvmExitWaitMs + SETTLE_MS;
      const after = Math.max(this.lastCheckpointAt, this.delayChangedAt, this.lastFaultAt + this.graceMs + SETTLE_MS, waitEnd);
      if (now - after > this.delayMs + LIVE_MS) {
        this.violate('liveness', `the last fault was at t=${this.lastFaultAt.toFixed(3)}, but by t=${now.toFixed(3)} the primary has neither failed over nor completed a checkpoint since t=${after.toFixed(3)} (x-checkpoint-delay ${this.delayMs} ms; P ${P.core.phase}, S ${S.owner.dead ? 'dead' : S.core.phase})`);
        return;
      }
    }
    if (P.guest.running) this.pvmRunningAt = now;
    if (final && (!this.faultFired || (pLive && now - this.lastFaultAt > this.graceMs + SETTLE_MS)) && now - this.pvmRunningAt > this.delayMs + LIVE_MS) {
      this.violate('liveness', `at the end the PVM has not run since t=${this.pvmRunningAt.toFixed(3)} (x-checkpoint-delay ${this.delayMs} ms)${this.faultFired ? `, the last fault at t=${this.lastFaultAt.toFixed(3)}` : ', with no fault injected'}`);
    }
    if (final && !this.faultFired && this.stats.checkpoints < 3) this.violate('liveness', `only ${this.stats.checkpoints} checkpoints completed in ${now.toFixed(0)} ms without faults`);
    if (S.sawRelaunch) this.stats.relaunch = true;
    if (S.droppedAfterBreak) this.stats.droppedAfterBreak = true;
    if (S.barrierWaited) this.stats.barrierWaited = true;
  }
}

export function runSeed(opts: RunOptions): RunResult {
  const r = rng(opts.seed * 2654435761 + 12345);
  const drawn = drawScenario(r, opts.faults ?? true);
  const scenario = opts.scenario ?? drawn;
  const w = new SimWorld(opts.seed, scenario, opts.broken ?? null, opts.fullTrace ?? false, r);
  try {
    run(w);
  } catch (err) {
    // An exception (from a core, or the simulation itself) fails the seed like a violation, so
    // that the failure names the seed and the scenario.
    w.violate('throw', `the simulation threw: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
  }
  w.stats.triggered = w.P.core.checkpointsBy.mismatch + w.P.core.checkpointsBy.timeout;
  return { seed: opts.seed, scenario: showScenario(scenario), violation: w.violation, endMs: w.sim.now, steps: w.sim.steps, trace: w.traceLines, stats: w.stats };
}

function run(w: SimWorld): void {
  w.P.start();
  w.S.start();
  w.check(false);
  while (w.violation === null && w.sim.now < HARD_STOP_MS) {
    if (!w.sim.step(w.endAt)) break;
    w.check(false);
  }
  if (w.violation === null) {
    w.sim.now = Math.max(w.sim.now, w.endAt);
    w.check(true);
  }
  // The primary's process exits at the end (unless it did already): its core must not act any
  // more while what was in flight completes.
  if (w.violation === null && !w.P.owner.dead && !w.P.closed) {
    w.trace('end: the primary closes');
    w.P.close();
    w.link.destroy(0, 'the primary process is exiting');
    const until = w.sim.now + END_TAIL_MS;
    while (w.violation === null && w.sim.step(until));
  }
}

export function describeFailure(res: RunResult): string {
  const v = res.violation;
  if (v === null) return `seed ${res.seed}: no violation`;
  return [
    `COLO simulation seed ${res.seed}: invariant ${v.inv} violated at t=${v.at.toFixed(3)} ms: ${v.detail}`,
    `scenario: ${res.scenario}`,
    `rerun: COLO_SIM_SEED=${res.seed} node --test dist/test/colo/simulation.test.js  (COLO_SIM_TRACE=1 for the whole trace)`,
    'last events:',
    ...res.trace.slice(-40),
  ].join('\n');
}
