/**
 * The COLO compare (ARCHITECTURE §5 "Network"), as plain data: no sockets, no timers.
 *
 * Per connection it holds the output each guest produced since the last release, as a stream
 * of items (bytes, shut, close), and releases the common prefix once both guests produced it
 * identically. A difference is a mismatch; output that waits on one side longer than the
 * timeout (or more held bytes than the limit) is a timeout. Both ask for a checkpoint. At a
 * checkpoint everything the PVM produced is released and the SVM's output is dropped: the SVM
 * is about to become the PVM. SVM output carries the checkpoint epoch it was produced in; output
 * of an older epoch is stale and ignored. Output of the next epoch can arrive before the
 * checkpoint that starts it is over on this side (it comes over its own channel, see
 * output-channel.ts): it waits and is compared from the checkpoint on. Likewise the PVM's: once
 * a checkpoint has captured the PVM's state the PVM runs on (ARCHITECTURE §5 step 2), and its
 * output from then on belongs to the next epoch (pvmNextEpoch()); it waits, held, for the
 * checkpoint to be received and is compared from then on.
 */
import { limits } from '../core/limits.js';
import type { NicOutput } from '../net/nic.js';

export type CompareTrigger = 'mismatch' | 'timeout';

type Item =
  /** `out`: the PVM's output these bytes are all of, released as it is when they match whole. */
  | { kind: 'data'; bytes: Uint8Array; at: number; out: NicOutput | null }
  | { kind: 'shut' | 'close'; at: number };

interface Conn {
  /** Offset of the first held byte (= bytes released so far on this connection). */
  released: number;
  /**
   * `released` is known. A connection whose client is gone (delivered() is null) has no offset
   * to start from: it takes the one of the first output either guest produced for it.
   */
  anchored: boolean;
  pvm: Item[];
  svm: Item[];
  /** The guests differ on this connection: nothing more is compared until the checkpoint. */
  mismatched: boolean;
  /** The SVM shut this connection in this epoch: another shut from it is a repeat. */
  svmShut: boolean;
}

export interface CompareLimits {
  /** Output waiting on one side longer than this asks for a checkpoint. */
  timeoutMs: number;
  /** Held bytes (both sides, all connections) above this ask for a checkpoint. */
  heldBytesMax: number;
  /**
   * Connections closed in one epoch (remembered until the next checkpoint) at which a
   * checkpoint is asked for; the oldest are forgotten beyond (default
   * limits.coloCompareClosedConnectionsMax).
   */
  closedConnectionsMax?: number;
}

export interface CompareResult {
  /** Output to write to the clients now, in order. */
  release: readonly NicOutput[];
  trigger: CompareTrigger | null;
}

/** A matched chunk whose SVM copy came this much later than the PVM's is reported to `lateCopy`. */
export const lateCopyMs = 1;

/**
 * Nothing to release and no trigger: most calls (one per guest output event, two per request)
 * end so, and one shared result keeps them from allocating (the primary's main thread is on
 * the path of every request, and what it allocates it collects while every client waits).
 */
const nothing: CompareResult = Object.freeze({ release: Object.freeze([]) as readonly NicOutput[], trigger: null });

export class Compare {
  epoch = 0;
  private conns = new Map<number, Conn>();
  /**
   * Connections whose close both guests produced in this epoch (ids are never reused): anything
   * more of the SVM's for them is a repeat (the vCPU posts a whole batch to the main thread when
   * writing it to the output channel failed part-way, since what it wrote may not have been
   * read), not a new connection to hold output for. Bounded (closedConnectionsMax): at the
   * bound a checkpoint, which empties it, is asked for; a repeat of a connection forgotten
   * beyond it would only be SVM output nothing matches, which asks for one too.
   */
  private closed = new Set<number>();
  private heldBytes = 0;
  private readonly closedMax: number;
  /**
   * When the SVM began to run the current epoch's state (svmResumed()'s `now`; -Infinity for the
   * first epoch, whose state both guests run from COLO's start; +Infinity from checkpoint() until
   * svmResumed(): the SVM is still applying the checkpoint, so nothing waits for it yet).
   */
  private svmRunsSince = Number.NEGATIVE_INFINITY;
  /** A trigger was reported in this epoch (report each kind once). */
  private reported = new Set<CompareTrigger>();
  /** Bytes released because both guests agreed, and at checkpoints (for statistics). */
  matchedBytes = 0;
  checkpointReleasedBytes = 0;
  /**
   * What the compare adds to a reply's latency: per chunk released on a match, how long the
   * PVM's output had waited for the SVM's (0 when the SVM's came first). Sum (ms) and count.
   */
  pvmWaitMsSum = 0;
  matchedChunks = 0;
  /** SVM output of the next epoch, in arrival order, until checkpoint() starts that epoch. */
  private early: { out: NicOutput; at: number }[] = [];
  private earlyBytes = 0;
  /** PVM output produced after the checkpoint in flight captured the PVM (null: none in flight). */
  private pvmEarly: { out: NicOutput; at: number }[] | null = null;
  private pvmEarlyBytes = 0;

  /**
   * `delivered(conn)`: how many bytes of a connection's output its client has already
   * received, for a connection the compare has not seen yet. A connection that existed before
   * COLO started (the usual case when a pair is protected again after a failover, its clients
   * still connected) has output before the compare's time, delivered directly: the compare's
   * offsets go on from there. Without it they would restart at 0, and what the compare releases
   * would land before what the client already has. Null: the front end has no client for the
   * connection (it reset or left, or it predates this front end) while the guests still hold
   * it: its offsets go on from the first output the compare sees of it (both guests are at the
   * same offset when an epoch begins), so its close, or output after what the guests sent before
   * COLO, is no hole (a mismatch) but compared as any.
   */
  constructor(
    private readonly lim: CompareLimits,
    private readonly delivered: (conn: number) => number | null = () => 0,
    /**
     * Told of every chunk released on a match whose SVM copy came more than `lateCopyMs` after
     * the PVM's: when each came (the `now` of pvm() and svm()). For the latency trace; null
     * (the default) costs the hot path one comparison.
     */
    private readonly lateCopy: ((pvmAt: number, svmAt: number) => void) | null = null,
  ) {
    this.closedMax = lim.closedConnectionsMax ?? limits.coloCompareClosedConnectionsMax;
  }

  /** Output of the PVM (the current epoch, or the next one after pvmNextEpoch(): the PVM never rolls back). */
  pvm(out: NicOutput, now: number): CompareResult {
    if (this.pvmEarly !== null) {
      this.pvmEarly.push({ out, at: now });
      this.pvmEarlyBytes += out.kind === 'out' ? out.bytes.byteLength : 0;
      return nothing;
    }
    const c = this.conn(out.conn);
    this.push(c, c.pvm, out, now);
    return this.match(out.conn, c);
  }

  /** Output of the SVM, produced in `epoch`. */
  svm(epoch: number, out: NicOutput, now: number): CompareResult {
    if (epoch === this.epoch + 1) {
      // Past the limit it is dropped: the hole it leaves is a mismatch in that epoch.
      const n = out.kind === 'out' ? out.bytes.byteLength : 0;
      if (this.earlyBytes + n <= this.lim.heldBytesMax) {
        this.early.push({ out, at: now });
        this.earlyBytes += n;
      }
      return nothing;
    }
    if (epoch !== this.epoch || this.closed.has(out.conn)) return nothing;
    const c = this.conn(out.conn);
    if (!this.pushSvm(c, out, now)) return nothing;
    return this.match(out.conn, c);
  }

  /** Hold SVM output; false for a shut the SVM already produced in this epoch (a repeat). */
  private pushSvm(c: Conn, out: NicOutput, now: number): boolean {
    if (out.kind === 'shut') {
      if (c.svmShut) return false;
      c.svmShut = true;
    }
    this.push(c, c.svm, out, now);
    return true;
  }

  /**
   * Periodic scan: output held too long. Output of this epoch that came before the SVM ran its
   * state (the PVM's during the checkpoint's transfer and the SVM's apply, the SVM's that came
   * early) could not be matched before, so its wait counts from there: neither a transfer nor
   * an apply longer than the timeout asks by itself for another checkpoint.
   */
  check(now: number): CompareTrigger | null {
    for (const c of this.conns.values()) {
      const oldest = Math.max(this.svmRunsSince, Math.min(c.pvm[0]?.at ?? Infinity, c.svm[0]?.at ?? Infinity));
      if (now - oldest > this.lim.timeoutMs) return this.report('timeout');
    }
    return null;
  }

  /**
   * The checkpoint in flight has captured the PVM, which runs on: its output from now on is the
   * next epoch's (held until checkpoint(), then compared).
   */
  pvmNextEpoch(): void {
    this.pvmEarly ??= [];
  }

  /**
   * A checkpoint (VMSTATE_RECEIVED): release all held PVM output of this epoch, drop the SVM's,
   * start the next epoch with the output of it that came early from either side; what of that
   * already matches is released too, after the rest. Its output waits for the SVM's from
   * svmResumed() on.
   */
  checkpoint(): CompareResult {
    const release = this.drainPvm();
    this.epoch += 1;
    this.svmRunsSince = Number.POSITIVE_INFINITY;
    this.reported.clear();
    this.closed.clear();
    const early = this.early;
    this.early = [];
    this.earlyBytes = 0;
    // Through the same check as svm()'s: a repeated batch (see `closed`) can come early too.
    for (const e of early) this.pushSvm(this.conn(e.out.conn), e.out, e.at);
    let trigger: CompareTrigger | null = null;
    for (const e of this.takePvmEarly()) {
      const r = this.pvm(e.out, e.at);
      for (let i = 0; i < r.release.length; i++) release.push(r.release[i]!);
      trigger ??= r.trigger;
    }
    return { release, trigger };
  }

  /**
   * VMSTATE_LOADED: the SVM has applied the checkpoint and runs its state. Output of this epoch
   * waits for the other guest's from now on (or from when it came, if later): before, the SVM
   * could not produce it, however long its apply took.
   */
  svmResumed(now: number): void {
    this.svmRunsSince = now;
  }

  /** Failover on the primary: everything held is released, in order; the compare is done. */
  releaseAll(): NicOutput[] {
    for (const e of this.takePvmEarly()) {
      const c = this.conn(e.out.conn);
      this.push(c, c.pvm, e.out, e.at);
    }
    return this.drainPvm();
  }

  /** The primary's process exits: everything held is dropped; returns how many bytes (both sides) that was. */
  dropAll(): number {
    const bytes = this.held;
    this.takePvmEarly();
    this.early = [];
    this.earlyBytes = 0;
    this.conns.clear();
    this.heldBytes = 0;
    return bytes;
  }

  /** Bytes of the PVM's output held for the next epoch (see pvmNextEpoch()). */
  get pvmNextEpochBytes(): number {
    return this.pvmEarlyBytes;
  }

  /** Whether any of the PVM's output (bytes, a shut or a close) waits for the SVM's or a checkpoint. */
  get holdsPvmOutput(): boolean {
    if (this.pvmEarly !== null && this.pvmEarly.length > 0) return true;
    for (const c of this.conns.values()) if (c.pvm.length > 0) return true;
    return false;
  }

  /** Bytes held for comparison (both sides), and output waiting for its epoch. */
  get held(): number {
    return this.heldBytes + this.earlyBytes + this.pvmEarlyBytes;
  }

  private takePvmEarly(): { out: NicOutput; at: number }[] {
    const xs = this.pvmEarly ?? [];
    this.pvmEarly = null;
    this.pvmEarlyBytes = 0;
    return xs;
  }

  connectionCount(): number {
    return this.conns.size;
  }

  private drainPvm(): NicOutput[] {
    const release: NicOutput[] = [];
    for (const [id, c] of this.conns) {
      let closed = false;
      for (const it of c.pvm) {
        if (it.kind === 'data') {
          release.push({ kind: 'out', conn: id, offset: c.released, bytes: it.bytes });
          c.released += it.bytes.byteLength;
          this.checkpointReleasedBytes += it.bytes.byteLength;
        } else {
          release.push({ kind: it.kind, conn: id, offset: c.released });
          if (it.kind === 'close') closed = true;
        }
      }
      c.pvm = [];
      c.svm = [];
      c.mismatched = false;
      c.svmShut = false;
      if (closed) this.conns.delete(id);
    }
    this.heldBytes = 0;
    return release;
  }

  private conn(id: number): Conn {
    let c = this.conns.get(id);
    if (c === undefined) {
      const delivered = this.delivered(id);
      c = { released: delivered ?? 0, anchored: delivered !== null, pvm: [], svm: [], mismatched: false, svmShut: false };
      this.conns.set(id, c);
    }
    return c;
  }

  private push(c: Conn, side: Item[], out: NicOutput, now: number): void {
    if (!c.anchored) {
      c.released = out.offset;
      c.anchored = true;
    }
    // Offsets say where the output belongs: after what this side produced so far.
    let end = c.released;
    for (const it of side) if (it.kind === 'data') end += it.bytes.byteLength;
    if (out.kind !== 'out') {
      // A shut or close after bytes this side never delivered (a hole) cannot be compared.
      if (out.offset !== end) c.mismatched = true;
      side.push({ kind: out.kind, at: now });
      return;
    }
    // Skip what this side already produced (a repeat).
    let bytes = out.bytes;
    if (out.offset < end) bytes = bytes.subarray(Math.min(bytes.byteLength, end - out.offset));
    else if (out.offset > end) {
      // A gap cannot be compared: the guests disagree about what came before.
      c.mismatched = true;
    }
    if (bytes.byteLength === 0) return;
    side.push({ kind: 'data', bytes, at: now, out: bytes === out.bytes ? out : null });
    this.heldBytes += bytes.byteLength;
  }

  private match(id: number, c: Conn): CompareResult {
    let release: NicOutput[] | null = null;
    if (!c.mismatched) {
      while (c.pvm.length > 0 && c.svm.length > 0) {
        const a = c.pvm[0]!;
        const b = c.svm[0]!;
        if (a.kind !== b.kind) {
          c.mismatched = true;
          break;
        }
        if (a.kind === 'data' && b.kind === 'data') {
          const n = Math.min(a.bytes.byteLength, b.bytes.byteLength);
          if (!sameBytes(a.bytes, b.bytes, n)) {
            c.mismatched = true;
            break;
          }
          const whole = n === a.bytes.byteLength;
          (release ??= []).push(
            whole && a.out !== null && a.out.offset === c.released ? a.out : { kind: 'out', conn: id, offset: c.released, bytes: whole ? a.bytes : a.bytes.subarray(0, n) },
          );
          c.released += n;
          this.matchedBytes += n;
          this.matchedChunks += 1;
          if (b.at > a.at) {
            this.pvmWaitMsSum += b.at - a.at;
            if (this.lateCopy !== null && b.at - a.at > lateCopyMs) this.lateCopy(a.at, b.at);
          }
          this.heldBytes -= 2 * n;
          if (whole) c.pvm.shift();
          else c.pvm[0] = { kind: 'data', bytes: a.bytes.subarray(n), at: a.at, out: null };
          if (n === b.bytes.byteLength) c.svm.shift();
          else c.svm[0] = { kind: 'data', bytes: b.bytes.subarray(n), at: b.at, out: null };
          continue;
        }
        (release ??= []).push({ kind: a.kind as 'shut' | 'close', conn: id, offset: c.released });
        c.pvm.shift();
        c.svm.shift();
        if (a.kind === 'close') {
          this.conns.delete(id);
          this.closed.add(id);
          if (this.closed.size > this.closedMax) this.closed.delete(this.closed.values().next().value!);
          break;
        }
      }
    }
    let trigger: CompareTrigger | null = null;
    if (c.mismatched) trigger = this.report('mismatch');
    else if (this.heldBytes > this.lim.heldBytesMax || this.closed.size >= this.closedMax) trigger = this.report('timeout');
    if (release === null && trigger === null) return nothing;
    return { release: release ?? nothing.release, trigger };
  }

  private report(t: CompareTrigger): CompareTrigger | null {
    if (this.reported.has(t)) return null;
    this.reported.add(t);
    return t;
  }
}

/** Below this many bytes a loop beats making two Buffer views and calling into C++ (most replies are this short). */
const loopCompareBytesMax = 64;

function sameBytes(a: Uint8Array, b: Uint8Array, n: number): boolean {
  if (n <= loopCompareBytesMax) {
    for (let i = 0; i < n; i++) if (a[i] !== b[i]) return false;
    return true;
  }
  return Buffer.from(a.buffer, a.byteOffset, n).equals(Buffer.from(b.buffer, b.byteOffset, n));
}
