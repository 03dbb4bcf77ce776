/**
 * The simulated world's parts: the model guest (RAM pages, device state, disk blocks), its disk
 * with the secondary's overlay layer, and the COLO channels between the two nodes (the main one,
 * and multifd channels for checkpoint pages in some runs).
 */
import type { ColoMessage } from '../../../src/colo/core.js';
import type { Owner, Sim } from './runtime.js';

export const PAGES = 64;
export const BLOCKS = 16;
/** Guest time step while running (simulated ms). */
export const TICK_MS = 4;

/**
 * A page's (or disk block's) content, tagged with where it came from: `I` the initial image,
 * `P` a PVM write belonging to checkpoint `ck` (the checkpoint whose pause ends the epoch in
 * which it was written), `S` an SVM write of its own. Values are immutable; copying a page
 * copies the reference.
 */
export interface Val {
  readonly v: number;
  readonly src: 'I' | 'P' | 'S';
  readonly ck: number;
}

export interface Device {
  ticks: number;
  acc: number;
}

export function sameVal(a: Val, b: Val): boolean {
  return a.v === b.v && a.src === b.src && a.ck === b.ck;
}

export function showVal(a: Val): string {
  return `${a.src}${a.src === 'P' ? `#${a.ck}` : ''}:${(a.v >>> 0).toString(16)}`;
}

export function mix(a: number, b: number): number {
  let h = Math.imul(a ^ 0x9e3779b9, 0x85ebca6b) ^ b;
  h = Math.imul(h ^ (h >>> 16), 0xc2b2ae35);
  h ^= h >>> 13;
  return h | 0;
}

/** A disk: a block array, plus (on the secondary) a layer holding the guest's own writes. */
export class Disk {
  layer: Map<number, Val> | null = null;
  constructor(readonly base: Val[]) {}
  read(b: number): Val {
    return this.layer?.get(b) ?? this.base[b]!;
  }
  write(b: number, v: Val): void {
    if (this.layer !== null) this.layer.set(b, v);
    else this.base[b] = v;
  }
  beginLayer(): void {
    this.layer ??= new Map();
  }
  dropLayer(): void {
    this.layer?.clear();
  }
  commitLayer(): void {
    if (this.layer === null) return;
    for (const [b, v] of this.layer) this.base[b] = v;
    this.layer = null;
  }
  view(): Val[] {
    return this.base.map((_, b) => this.read(b));
  }
}

export interface GuestHooks {
  /** The tag a write gets now (the PVM's current checkpoint epoch, or the SVM's own). */
  tag(): { src: 'P' | 'S'; ck: number };
  page(p: number): void;
  block(b: number): void;
  /** A tick ended (its device state, pages and block are written). */
  ticked?(): void;
}

/**
 * The model guest. Each tick it advances its device state from its own state (device, one RAM
 * page it reads, and the tick) plus a little node-local noise, then writes 1–3 pages and
 * sometimes a disk block chosen from that state: so PVM and SVM diverge as real guests do
 * (different timing, different inputs), and state loaded at a checkpoint steers what follows.
 */
export class Guest {
  running = false;
  /** The guest panicked: it stays stopped for good (run state guest-panicked). */
  crashed = false;
  private gen = 0;
  /** Simulated time spent running before the current run (liveness: the PVM must run between checkpoints). */
  private ranBeforeMs = 0;
  private runningSince = 0;

  constructor(
    private readonly sim: Sim,
    private readonly owner: Owner,
    private readonly noise: () => number,
    readonly ram: Val[],
    public device: Device,
    readonly disk: Disk,
    private readonly hooks: GuestHooks,
  ) {}

  start(): void {
    if (this.running || this.crashed) return;
    this.running = true;
    this.runningSince = this.sim.now;
    const gen = ++this.gen;
    this.sim.after(TICK_MS, () => this.tick(gen), this.owner);
  }

  stop(): void {
    if (this.running) this.ranBeforeMs += this.sim.now - this.runningSince;
    this.running = false;
    this.gen += 1;
  }

  crash(): void {
    this.stop();
    this.crashed = true;
  }

  /** How long the guest has run so far, in simulated ms. */
  get ranMs(): number {
    return this.ranBeforeMs + (this.running ? this.sim.now - this.runningSince : 0);
  }

  private tick(gen: number): void {
    if (!this.running || gen !== this.gen) return;
    const d = this.device;
    d.ticks += 1;
    const seen = this.ram[(d.acc >>> 0) % PAGES]!.v;
    d.acc = mix(mix(d.acc, d.ticks), seen ^ Math.floor(this.noise() * 16));
    const tag = this.hooks.tag();
    const n = 1 + ((d.acc >>> 3) % 3);
    for (let i = 0; i < n; i++) {
      const h = mix(d.acc, i);
      const p = (h >>> 0) % PAGES;
      this.ram[p] = { v: mix(h, d.ticks), src: tag.src, ck: tag.ck };
      this.hooks.page(p);
    }
    if ((d.acc & 7) === 0) {
      const h = mix(d.acc, 99);
      const b = (h >>> 0) % BLOCKS;
      this.disk.write(b, { v: mix(h, this.disk.read(b).v), src: tag.src, ck: tag.ck });
      this.hooks.block(b);
    }
    this.hooks.ticked?.();
    this.sim.after(TICK_MS, () => this.tick(gen), this.owner);
  }
}

// ---------------------------------------------------------------- the main channel

export type Wire =
  | { k: 'colo'; msg: ColoMessage }
  | { k: 'pages'; ck: number; pages: [number, Val][] }
  | { k: 'disk'; ck: number; blocks: [number, Val][] }
  | { k: 'device'; ck: number; dev: Device }
  /** Where pages of checkpoint ck were lost with a broken multifd channel: the round barrier fails there. */
  | { k: 'lost'; ck: number }
  /**
   * With multifd channels: on the main channel after the pages of checkpoint ck, which went as
   * `frames` frames on the multifd channels (the round's barrier: the secondary waits for them).
   */
  | { k: 'sync'; ck: number; frames: number }
  /**
   * A main-channel frame that arrived damaged (a bit flip the link layer missed, a sender bug):
   * `checksum` — its frame checksum fails, so reading the stream fails (StreamError); otherwise
   * it passes the checksum but its payload does not parse (the frame loop's handler throws).
   * `ck`: the checkpoint it belonged to (null: a COLO message).
   */
  | { k: 'corrupt'; ck: number | null; checksum: boolean; was: string };

export function showWire(w: Wire): string {
  switch (w.k) {
    case 'colo':
      return w.msg;
    case 'pages':
      return `pages#${w.ck}[${w.pages.map(([p]) => p).join(',')}]`;
    case 'disk':
      return `disk#${w.ck}[${w.blocks.map(([b]) => b).join(',')}]`;
    case 'device':
      return `device#${w.ck}`;
    case 'lost':
      return `(pages#${w.ck} lost)`;
    case 'sync':
      return `sync#${w.ck}(${w.frames} frames)`;
    case 'corrupt':
      return `(${w.was} corrupt: ${w.checksum ? 'bad checksum' : 'bad payload'})`;
  }
}

export class ChannelClosed extends Error {}

export interface Endpoint {
  readonly owner: Owner;
  deliver(w: Wire): void;
  /** Checkpoint pages from a multifd channel (the receive workers write them into the cache). */
  deliverPages?(w: Wire & { k: 'pages' }): void;
  /** The multifd channels broke: a round barrier waiting for their pages fails (and the receiver reports it). */
  multifdLost?(reason?: string): void;
  linkLost(reason: string): void;
}

/**
 * The main channel: in order per direction, each message with a random delay. A break loses
 * every message not yet delivered — or, when the break is a peer's process exiting (`drain`),
 * lets what was already sent arrive first, as TCP does before the FIN; when only a multifd
 * channel broke (`pagesLost`), pages are lost from then on while the main channel carries the
 * rest until an end closes it (that end reads nothing sent later). Each end learns of a
 * break (linkLost) after a random delay, or never (a host that vanished silently); an end that
 * knows its channel is closed throws on send.
 *
 * With multifd channels (`multifd` > 0) the primary's checkpoint pages go on those, one frame
 * per channel in turn, each channel in order but each with its own delays: so pages overtake
 * each other across channels and the main channel's frames (a sync, VMSTATE_SIZE, the device
 * state) may arrive before them. A `pagesLost` break then loses every page frame not yet
 * delivered and fails the secondary's round barrier.
 */
export type Drain = 'none' | 'drain' | 'pagesLost';

export class Link {
  broken = false;
  private brokenAt = Infinity;
  private drain: Drain = 'none';
  readonly closed = [false, false];
  /** When each end closed its channel (it reads nothing sent after that). */
  private readonly closedAt = [Infinity, Infinity];
  private readonly lastArrival = [0, 0];
  readonly ends: Endpoint[] = [];
  /** Multifd channels for checkpoint pages (0: pages go on the main channel). */
  multifd = 0;
  private readonly multifdArrival: number[] = [];
  private nextChannel = 0;
  /** The multifd channels broke (a pagesLost break): no page frame arrives any more. */
  multifdBroken = false;
  /** The primary saw its multifd channels close (a break of them alone): its next page send fails. */
  private multifdClosedOnP = false;
  /** The next frame from the primary that arrives on the main channel (one in flight, or the next sent) is damaged (null: none). */
  corruptNext: { checksum: boolean } | null = null;
  /** Until then nothing arrives (a stalled network: TCP retransmits, both ends live, nobody learns of it). */
  private stalledUntil = 0;
  /**
   * The world watching the wire: every frame sent, and every frame delivered (or lost with a
   * multifd channel), so that it, not a node, knows which checkpoint arrived whole.
   */
  observer: { sent(from: 0 | 1, w: Wire): void; delivered(to: 0 | 1, w: Wire): void } | null = null;

  constructor(private readonly sim: Sim, private readonly rnd: () => number, private readonly trace: (s: string) => void) {}

  send(from: 0 | 1, w: Wire): void {
    if (this.closed[from]) throw new ChannelClosed('the COLO channel is closed');
    if (from === 0 && w.k === 'pages' && this.multifd > 0) {
      this.sendPages(w);
      return;
    }
    // Only a multifd channel broke (pagesLost): the main channel carries on until an end closes it.
    if (this.broken && this.drain !== 'pagesLost') return;
    this.observer?.sent(from, w);
    const sentAt = this.sim.now;
    const t = Math.max(this.sim.now + this.delay(), this.lastArrival[from]!, this.stalledUntil);
    this.lastArrival[from] = t;
    const to = this.ends[1 - from]!;
    this.sim.at(
      t,
      () => {
        if (this.broken && this.drain === 'pagesLost' ? sentAt >= this.closedAt[1 - from]! : this.broken && !(this.drain !== 'none' && sentAt < this.brokenAt)) return;
        // A multifd channel broke: the checkpoint pages it carried are lost, and the round
        // barrier fails where they were due; the main channel's frames behind them still arrive.
        const lost = this.broken && this.drain === 'pagesLost' && w.k === 'pages';
        const corrupt = from === 0 && !lost ? this.corruptNext : null;
        this.corruptNext = corrupt === null ? this.corruptNext : null;
        const ck = 'ck' in w ? w.ck : null;
        const got: Wire = lost ? { k: 'lost', ck: w.ck } : corrupt !== null ? { k: 'corrupt', ck, checksum: corrupt.checksum, was: showWire(w) } : w;
        this.trace(`${from === 0 ? 'P→S' : 'S→P'} ${showWire(got)}`);
        this.observer?.delivered((1 - from) as 0 | 1, got);
        to.deliver(got);
      },
      to.owner,
    );
  }

  private delay(): number {
    return this.rnd() < 0.1 ? 2 + this.rnd() * 20 : 0.05 + this.rnd() * 1.5;
  }

  /** Checkpoint pages on the next multifd channel: in order on it, in any order with the others. */
  private sendPages(w: Wire & { k: 'pages' }): void {
    if (this.multifdClosedOnP) throw new ChannelClosed('a multifd channel is closed');
    if (this.broken && this.drain !== 'pagesLost') return;
    this.observer?.sent(0, w);
    const ch = this.nextChannel;
    this.nextChannel = (ch + 1) % this.multifd;
    const sentAt = this.sim.now;
    const t = Math.max(this.sim.now + this.delay(), this.multifdArrival[ch] ?? 0, this.stalledUntil);
    this.multifdArrival[ch] = t;
    const to = this.ends[1]!;
    this.sim.at(
      t,
      () => {
        // The secondary closed its channels, or they broke (in a process exit what was sent before still arrives).
        if (this.closed[1] || this.multifdBroken || (this.broken && !(this.drain === 'drain' && sentAt < this.brokenAt))) return;
        this.trace(`P→S multifd ${ch}: ${showWire(w)}`);
        this.observer?.delivered(1, w);
        to.deliverPages?.(w);
      },
      to.owner,
    );
  }

  /**
   * The link breaks; `notice[i]` says whether end i learns of it (and when). `drain`: what was
   * in flight still arrives (the end learns of the break after it), or all of it but the pages
   * (a multifd channel broke; the end may learn of it before the rest arrives).
   */
  break(reason: string, notice: [number | null, number | null], drain: Drain = 'none'): void {
    if (this.broken) return;
    this.broken = true;
    this.brokenAt = this.sim.now;
    this.drain = drain;
    this.trace(`link breaks (${reason})${drain === 'drain' ? ', in-flight data drains' : drain === 'pagesLost' ? ', in-flight pages are lost, the rest drains' : ''}`);
    if (drain === 'pagesLost' && this.multifd > 0) {
      // A multifd channel's receive fails at once: the barrier waiting for its pages gives up.
      this.multifdBroken = true;
      const s = this.ends[1]!;
      this.sim.after(0, () => s.multifdLost?.(), s.owner);
    }
    for (const i of [0, 1] as const) {
      const d = notice[i];
      if (d === null) continue;
      const end = this.ends[i]!;
      // In drain mode an end sees the close only after the data sent towards it.
      const t = drain === 'drain' ? Math.max(this.sim.now + d, this.lastArrival[1 - i]! + 0.01) : this.sim.now + d;
      this.sim.at(
        t,
        () => {
          this.close(i);
          end.linkLost(reason);
        },
        end.owner,
      );
    }
  }

  /**
   * The multifd channels alone break (a receive worker refused a packet and closed its socket,
   * or a connection was reset) while the main channel lives on, both ways: the secondary's
   * receiver fails at once (its round barrier too), the primary sees the close after
   * `noticeP` (its next page send fails). Neither end's main channel closes for it.
   */
  breakMultifd(reason: string, noticeP: number): void {
    if (this.broken || this.multifdBroken || this.multifd === 0) return;
    this.multifdBroken = true;
    this.trace(`multifd channels break (${reason}); the main channel lives`);
    const s = this.ends[1]!;
    this.sim.after(0, () => s.multifdLost?.(reason), s.owner);
    const p = this.ends[0]!;
    this.sim.after(
      noticeP,
      () => {
        this.multifdClosedOnP = true;
        p.linkLost(reason);
      },
      p.owner,
    );
  }

  /** The network stalls for `ms`: every frame sent until it ends arrives after it, in order. */
  stall(ms: number): void {
    this.stalledUntil = Math.max(this.stalledUntil, this.sim.now + ms);
    this.trace(`the network stalls until t=${this.stalledUntil.toFixed(3)}`);
  }

  private close(end: 0 | 1): void {
    if (this.closed[end]) return;
    this.closed[end] = true;
    this.closedAt[end] = this.sim.now;
  }

  /** A node closes its own channels (a failover): it sees it at once, the peer soon after. */
  destroy(from: 0 | 1, reason: string): void {
    this.close(from);
    const peer = 1 - from;
    const notice: [number | null, number | null] = [null, null];
    notice[from] = 0;
    notice[peer] = 0.1 + this.rnd() * 5;
    if (this.broken) {
      const end = this.ends[from]!;
      this.sim.after(0, () => end.linkLost(reason), end.owner);
      return;
    }
    this.break(reason, notice, 'drain');
  }
}
