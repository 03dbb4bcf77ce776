import { assert } from '../core/assert.js';
import { concatBytes } from '../core/bytes.js';
import { limits } from '../core/limits.js';
import { RestoreError } from '../core/errors.js';
import * as v from '../core/validate.js';

/**
 * The guest NIC (fd 3) as plain data, no I/O.
 *
 * Input arrives as numbered events from the service front end. Events wait in `pending`
 * until the guest *admits* them, and the guest admits one event at a time, only when it
 * would otherwise block (poll_oneoff with nothing ready, a blocking accept/recv with nothing
 * queued). A guest that is a function of its input therefore sees the same sequence of
 * states on the primary and on the secondary, however the bytes were batched on the wire:
 * that is what makes COLO's output comparison agree without a checkpoint per request.
 */
export type NicInput =
  | { seq: number; kind: 'open'; conn: number }
  | { seq: number; kind: 'data'; conn: number; bytes: Uint8Array }
  | { seq: number; kind: 'close'; conn: number };

export type NicOutput =
  | { kind: 'out'; conn: number; offset: number; bytes: Uint8Array }
  | { kind: 'shut'; conn: number; offset: number }
  | { kind: 'close'; conn: number; offset: number };

interface Connection {
  conn: number;
  /** Admitted, unread input. */
  rx: Uint8Array[];
  rxBytes: number;
  /** The client closed its side (admitted). */
  eof: boolean;
  /** Accepted by the guest. */
  accepted: boolean;
  /** Bytes the guest sent on this connection so far. */
  outOffset: number;
  /** The guest shut down its sending side or closed the fd. */
  shutWr: boolean;
  closed: boolean;
  /** Input consumed (read, plus the charge of admitted events) not yet reported as credit. */
  unreported: number;
}

/** Input a connection's guest consumed: the front end may read that much more from its client. */
export interface InputCredit {
  conn: number;
  bytes: number;
}

export interface NicState {
  lastSeq: number;
  admittedSeq: number;
  pending: NicInput[];
  backlog: number[];
  /** The guest has its listening socket (fd 3); false once it closed it. Absent in states of an older colo-vm: true. */
  listening?: boolean;
  conns: {
    conn: number; rx: Uint8Array; eof: boolean; accepted: boolean; outOffset: number; shutWr: boolean; closed: boolean;
  }[];
}

export class Nic {
  private pending: NicInput[] = [];
  private backlog: number[] = [];
  private conns = new Map<number, Connection>();
  /** Highest sequence number enqueued; older or repeated events are stale and dropped. */
  lastSeq = 0;
  admittedSeq = 0;
  /** Credits due to the front end (flow control, see limits.nicConnectionInputWindowBytes); not part of the state. */
  private credits: InputCredit[] = [];
  /**
   * The connection of the event admitOne admitted last (-1 before any). Not part of the state:
   * a poll that found nothing ready and then admits one event re-checks only this connection
   * (and the listener, and clocks) instead of every subscription.
   */
  lastAdmittedConn = -1;
  /**
   * The guest has its listening socket. Once it closed it (WASI preview1 cannot open another)
   * nothing accepts: a client queued for accept, or whose open is admitted later, is closed at
   * once (takeRefused), as a kernel resets a closed listener's queue.
   */
  listening = true;
  /** Connections opened after the listener closed, not yet reported as closed (takeRefused); not part of the state. */
  private refused: number[] = [];

  /** Queue an input event; returns false for a stale (already seen) one. */
  enqueue(ev: NicInput): boolean {
    if (ev.seq <= this.lastSeq) return false;
    assert(this.pending.length < limits.nicPendingEventsMax, 'NIC pending queue overflow');
    this.lastSeq = ev.seq;
    this.pending.push(ev);
    return true;
  }

  /**
   * Events enqueue may still take. The front end's windows keep a primary's (or a lone VM's)
   * queue below the bound; a COLO secondary's mirrored input is not windowed by its own guest,
   * so a secondary that lags its primary leaves the rest in the input ring (drainInput).
   */
  pendingRoom(): number {
    return limits.nicPendingEventsMax - this.pending.length;
  }

  hasPending(): boolean {
    return this.pending.length > 0;
  }

  /** Admit the next pending event into the guest-visible state. */
  admitOne(): boolean {
    const ev = this.pending.shift();
    if (ev === undefined) return false;
    this.admittedSeq = ev.seq;
    this.lastAdmittedConn = ev.conn;
    switch (ev.kind) {
      case 'open': {
        if (this.conns.has(ev.conn)) return true;
        if (!this.listening) {
          this.refused.push(ev.conn);
          return true;
        }
        this.conns.set(ev.conn, {
          conn: ev.conn, rx: [], rxBytes: 0, eof: false, accepted: false, outOffset: 0, shutWr: false, closed: false, unreported: 0,
        });
        this.backlog.push(ev.conn);
        return true;
      }
      case 'data': {
        const c = this.conns.get(ev.conn);
        if (c === undefined) return true;
        if (c.closed || c.eof) {
          this.consumed(c, limits.nicInputEventCharge + ev.bytes.byteLength);
          return true;
        }
        c.rx.push(ev.bytes);
        c.rxBytes += ev.bytes.byteLength;
        this.consumed(c, limits.nicInputEventCharge);
        return true;
      }
      case 'close': {
        const c = this.conns.get(ev.conn);
        if (c !== undefined) c.eof = true;
        return true;
      }
    }
  }

  /**
   * The guest closed its listening socket: the connections it had not accepted are closed
   * (their 'close' outputs); those it accepted go on.
   */
  closeListener(): NicOutput[] {
    this.listening = false;
    const outs: NicOutput[] = [];
    for (const conn of [...this.backlog]) {
      const out = this.close(conn);
      if (out !== null) outs.push(out);
    }
    return outs;
  }

  /** 'close' outputs for the connections opened since the listener closed (none while it is open). */
  takeRefused(): NicOutput[] | null {
    if (this.refused.length === 0) return null;
    const outs: NicOutput[] = this.refused.map((conn) => ({ kind: 'close', conn, offset: 0 }));
    this.refused = [];
    return outs;
  }

  acceptReady(): boolean {
    return this.backlog.length > 0;
  }

  accept(): number | null {
    const conn = this.backlog.shift();
    if (conn === undefined) return null;
    const c = this.conns.get(conn);
    assert(c !== undefined, 'backlog names an unknown connection');
    c.accepted = true;
    return conn;
  }

  /** Readable: data queued, or EOF to report. */
  readReady(conn: number): boolean {
    return this.readableOrNotReady(conn) >= 0;
  }

  /**
   * -1 when `conn` is not readReady, else the bytes a read would find (0 for EOF, or for a
   * connection the NIC does not know): poll needs both, for one lookup.
   */
  readableOrNotReady(conn: number): number {
    const c = this.conns.get(conn);
    if (c === undefined) return 0;
    return c.rxBytes > 0 || c.eof || c.closed ? c.rxBytes : -1;
  }

  /** Read up to `max` bytes: bytes, or 'eof', or 'again' when nothing is admitted yet. */
  recv(conn: number, max: number, peek: boolean): Uint8Array | 'eof' | 'again' {
    const c = this.conns.get(conn);
    if (c === undefined || c.closed) return 'eof';
    if (c.rxBytes === 0) return c.eof ? 'eof' : 'again';
    const want = Math.min(max, c.rxBytes);
    const first = c.rx[0]!;
    if (first.byteLength === want) {
      // The usual case (a request read whole): that chunk as it is, no copy. Nothing else
      // writes its memory (the input ring's reader copies each event out; channel input is a
      // view of a socket read's own buffer), and the caller only reads it.
      if (!peek) {
        c.rx.shift();
        c.rxBytes -= want;
        this.consumed(c, want);
      }
      return first;
    }
    const out = new Uint8Array(want);
    let at = 0;
    let i = 0;
    while (at < out.byteLength) {
      const chunk = c.rx[i];
      assert(chunk !== undefined, 'rx accounting');
      const n = Math.min(chunk.byteLength, out.byteLength - at);
      out.set(chunk.subarray(0, n), at);
      at += n;
      if (!peek) {
        if (n === chunk.byteLength) c.rx.shift();
        else c.rx[0] = chunk.subarray(n);
      } else {
        i++;
      }
    }
    if (!peek) {
      c.rxBytes -= out.byteLength;
      this.consumed(c, out.byteLength);
    }
    return out;
  }

  private consumed(c: Connection, n: number): void {
    c.unreported += n;
    if (c.unreported < limits.nicInputCreditBytes) return;
    this.credits.push({ conn: c.conn, bytes: c.unreported });
    c.unreported = 0;
  }

  /** Credits due since the last call (reported in steps of limits.nicInputCreditBytes per connection). */
  takeCredits(): InputCredit[] | null {
    if (this.credits.length === 0) return null;
    const out = this.credits;
    this.credits = [];
    return out;
  }

  /** The guest sends bytes; returns the output event, or null when the connection is gone. */
  send(conn: number, bytes: Uint8Array): NicOutput | null {
    const c = this.conns.get(conn);
    if (c === undefined || c.closed || c.shutWr) return null;
    const out: NicOutput = { kind: 'out', conn, offset: c.outOffset, bytes };
    c.outOffset += bytes.byteLength;
    return out;
  }

  shutdownWrite(conn: number): NicOutput | null {
    const c = this.conns.get(conn);
    if (c === undefined || c.shutWr) return null;
    c.shutWr = true;
    return { kind: 'shut', conn, offset: c.outOffset };
  }

  /** The guest closed the fd: the connection is forgotten. */
  close(conn: number): NicOutput | null {
    const c = this.conns.get(conn);
    if (c === undefined) return null;
    this.conns.delete(conn);
    this.backlog = this.backlog.filter((x) => x !== conn);
    return { kind: 'close', conn, offset: c.outOffset };
  }

  isKnown(conn: number): boolean {
    return this.conns.has(conn);
  }

  connectionIds(): number[] {
    return [...this.conns.keys()];
  }

  /** Highest connection id the guest has seen (so a new front end numbers above it). */
  maxConnId(): number {
    let max = 0;
    for (const c of this.conns.keys()) max = Math.max(max, c);
    for (const ev of this.pending) max = Math.max(max, ev.conn);
    return max;
  }

  /**
   * `beyond`: input that reached this NIC but found its queue full (the vCPU's overflow, in
   * order): it belongs to the state's pending input after the queue's own.
   */
  save(beyond: readonly NicInput[] = []): NicState {
    let lastSeq = this.lastSeq;
    const pending = this.pending.map(savedInput);
    for (const ev of beyond) {
      if (ev.seq <= lastSeq) continue;
      pending.push(savedInput(ev));
      lastSeq = ev.seq;
    }
    return {
      lastSeq,
      admittedSeq: this.admittedSeq,
      pending,
      backlog: [...this.backlog],
      listening: this.listening,
      conns: [...this.conns.values()].map((c) => ({
        conn: c.conn,
        rx: concatBytes(c.rx),
        eof: c.eof,
        accepted: c.accepted,
        outOffset: c.outOffset,
        shutWr: c.shutWr,
        closed: c.closed,
      })),
    };
  }

  restore(raw: unknown): void {
    const s = v.record(raw, 'nic');
    const lastSeq = v.uint(s.lastSeq, 'nic.lastSeq');
    const admittedSeq = v.uint(s.admittedSeq, 'nic.admittedSeq', lastSeq);
    const pending: NicInput[] = [];
    for (const [i, e] of v.array(s.pending, 'nic.pending', limits.nicPendingEventsMax).entries()) {
      const ev = v.record(e, `nic.pending[${i}]`);
      const seq = v.uint(ev.seq, `nic.pending[${i}].seq`, lastSeq);
      const conn = v.uint(ev.conn, `nic.pending[${i}].conn`);
      if (ev.kind === 'open' || ev.kind === 'close') pending.push({ seq, kind: ev.kind, conn });
      else if (ev.kind === 'data') {
        pending.push({ seq, kind: 'data', conn, bytes: v.bytes(ev.bytes, `nic.pending[${i}].bytes`, limits.nicConnectionInputBytesMax) });
      } else throw new RestoreError('STATE_INVALID', `nic.pending[${i}].kind: unknown kind ${String(ev.kind)}`);
    }
    const conns = new Map<number, Connection>();
    for (const [i, e] of v.array(s.conns, 'nic.conns', limits.nicConnectionsMax).entries()) {
      const c = v.record(e, `nic.conns[${i}]`);
      const rx = v.bytes(c.rx, `nic.conns[${i}].rx`, limits.nicConnectionInputBytesMax * 4);
      const conn = v.uint(c.conn, `nic.conns[${i}].conn`);
      conns.set(conn, {
        conn,
        rx: rx.byteLength > 0 ? [rx] : [],
        rxBytes: rx.byteLength,
        eof: v.bool(c.eof, `nic.conns[${i}].eof`),
        accepted: v.bool(c.accepted, `nic.conns[${i}].accepted`),
        outOffset: v.uint(c.outOffset, `nic.conns[${i}].outOffset`),
        shutWr: v.bool(c.shutWr, `nic.conns[${i}].shutWr`),
        closed: v.bool(c.closed, `nic.conns[${i}].closed`),
        unreported: 0,
      });
    }
    const backlog = v.array(s.backlog, 'nic.backlog', limits.nicConnectionsMax).map((x, i) => {
      const conn = v.uint(x, `nic.backlog[${i}]`);
      if (!conns.has(conn)) throw new RestoreError('STATE_INVALID', `nic.backlog[${i}]: unknown connection ${conn}`);
      return conn;
    });
    const listening = s.listening === undefined ? true : v.bool(s.listening, 'nic.listening');
    if (!listening && backlog.length > 0) throw new RestoreError('STATE_INVALID', 'nic.backlog: connections wait for accept on a closed listener');
    this.lastSeq = lastSeq;
    this.admittedSeq = admittedSeq;
    this.listening = listening;
    this.refused = [];
    this.pending = pending;
    this.conns = conns;
    this.backlog = backlog;
    this.credits = [];
  }
}

/** A pending event as a state holds it: copied field by field (an object spread makes V8 build a new hidden class per object). */
function savedInput(ev: NicInput): NicInput {
  return ev.kind === 'data' ? { seq: ev.seq, kind: ev.kind, conn: ev.conn, bytes: ev.bytes } : { seq: ev.seq, kind: ev.kind, conn: ev.conn };
}
